//! Limits, timeouts and pool size, with their defaults.

use std::time::Duration;

/// Most workers a server may have: each is a thread with its own stack
/// and read buffer, and the pool starts them all at once.
const MAX_WORKERS: usize = 4096;

/// The largest `kernel_send_buffer` taken (the kernel caps what it gives
/// far lower unless its `net.core.wmem_max` is raised).
const KERNEL_SEND_BUFFER_MAX: usize = 1 << 30;

/// The server's limits and timeouts. Built with
/// [`Builder`](crate::Builder); read back with
/// [`WebSocketServer::config`](crate::WebSocketServer::config).
#[derive(Debug, Clone)]
pub struct Config {
    pub(crate) max_connections: usize,
    pub(crate) max_message_size: usize,
    pub(crate) max_frame_size: Option<usize>,
    pub(crate) max_fragments: u32,
    pub(crate) max_handshake_bytes: usize,
    pub(crate) handshake_timeout: Duration,
    pub(crate) ping_interval: Option<Duration>,
    pub(crate) idle_timeout: Option<Duration>,
    pub(crate) close_timeout: Duration,
    pub(crate) max_backpressure: usize,
    pub(crate) workers: usize,
    pub(crate) max_connections_per_ip: usize,
    pub(crate) kernel_send_buffer: Option<usize>,
    pub(crate) max_buffered_bytes: usize,
    pub(crate) max_queued_bytes: usize,
    pub(crate) slow_client_policy: SlowClientPolicy,
    pub(crate) high_water: usize,
    pub(crate) low_water: usize,
    pub(crate) event_queue_bytes: usize,
    pub(crate) queue_unhandled_events: bool,
    pub(crate) max_topics_per_client: usize,
    pub(crate) max_topic_len: usize,
    pub(crate) max_topics: usize,
    pub(crate) bridge_prefix: String,
    pub(crate) bridge_outbox_bytes: usize,
    pub(crate) protocols: Vec<String>,
    pub(crate) allowed_origins: Option<Vec<String>>,
    pub(crate) trust_proxy: bool,
    pub(crate) forwarded_header: String,
    /// Connections' interest is oneshot, re-armed after every job, even
    /// where the poller has an edge-triggered mode: the fallback of
    /// systems whose poller has none (Windows, illumos), for the tests to
    /// run here. Set by the environment variable
    /// `ENJENT_ONESHOT_READINESS` (see the README's How it works).
    pub(crate) oneshot_readiness: bool,
    #[cfg(feature = "deflate")]
    pub(crate) compression: Option<crate::proto::deflate::Compression>,
}

/// What happens when a `send` would push a client's queue over the hard
/// limit, `max_backpressure`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SlowClientPolicy {
    /// The message is refused with
    /// [`Error::Backpressure`](crate::Error::Backpressure); the client
    /// stays, and a [`Drain`](crate::Event::Drain) event says when its
    /// queue is down to the low-water mark again. The default.
    Refuse,
    /// The message is refused as with `Refuse`, and the client is closed
    /// with 1008 (policy violation) once what is queued has gone, or
    /// dropped after `close_timeout` if it never reads. No `Drain` comes
    /// for it.
    Close,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_connections: 1_000_000,
            max_message_size: 1 << 20,
            max_frame_size: None,
            max_fragments: 1 << 17,
            max_handshake_bytes: 16 * 1024,
            handshake_timeout: Duration::from_secs(10),
            ping_interval: Some(Duration::from_secs(30)),
            idle_timeout: Some(Duration::from_secs(75)),
            close_timeout: Duration::from_secs(5),
            max_backpressure: 1 << 20,
            workers: std::thread::available_parallelism().map_or(4, |n| 2 * n.get()),
            max_connections_per_ip: usize::MAX,
            kernel_send_buffer: None,
            max_buffered_bytes: 256 << 20,
            max_queued_bytes: 256 << 20,
            slow_client_policy: SlowClientPolicy::Refuse,
            high_water: 128 * 1024,
            low_water: 32 * 1024,
            event_queue_bytes: 64 << 20,
            queue_unhandled_events: false,
            max_topics_per_client: 256,
            max_topic_len: 256,
            max_topics: 1_000_000,
            bridge_prefix: "enjent:".into(),
            bridge_outbox_bytes: 8 << 20,
            protocols: Vec::new(),
            allowed_origins: None,
            trust_proxy: false,
            forwarded_header: "X-Forwarded-For".into(),
            oneshot_readiness: std::env::var_os("ENJENT_ONESHOT_READINESS")
                .is_some_and(|v| !v.is_empty() && v != "0"),
            #[cfg(feature = "deflate")]
            compression: Some(crate::proto::deflate::Compression::default()),
        }
    }
}

impl Config {
    /// Most open connections (handshakes included); more are answered
    /// `503`.
    pub fn max_connections(&self) -> usize {
        self.max_connections
    }

    /// Largest incoming message in bytes; over it, close 1009.
    pub fn max_message_size(&self) -> usize {
        self.max_message_size
    }

    /// Largest incoming frame payload in bytes; over it, close 1009.
    pub fn max_frame_size(&self) -> usize {
        self.max_frame_size.unwrap_or(self.max_message_size)
    }

    /// Most frames one incoming message may be split into.
    pub fn max_fragments(&self) -> u32 {
        self.max_fragments
    }

    /// Largest upgrade request in bytes; over it, `431` (`414` if the
    /// request line alone is). More than
    /// [`MAX_HEADERS`](crate::proto::handshake::MAX_HEADERS) (64) header
    /// lines get `431` too, whatever their size (not a setting).
    pub fn max_handshake_bytes(&self) -> usize {
        self.max_handshake_bytes
    }

    /// Time a client has to complete its upgrade request.
    pub fn handshake_timeout(&self) -> Duration {
        self.handshake_timeout
    }

    /// Silence after which the server pings a client.
    pub fn ping_interval(&self) -> Option<Duration> {
        self.ping_interval
    }

    /// Silence after which a client is disconnected.
    pub fn idle_timeout(&self) -> Option<Duration> {
        self.idle_timeout
    }

    /// Time the peer has to answer a close frame.
    pub fn close_timeout(&self) -> Duration {
        self.close_timeout
    }

    /// The hard limit in force: the most queued for one client (its bytes,
    /// and 64 B for each piece waiting: a frame is one or two) before
    /// `send` refuses. At least `high_water + max_message_size + 1 KiB`,
    /// plus what compression may add to a message (see
    /// [`Builder::max_backpressure`](crate::Builder::max_backpressure)).
    pub fn max_backpressure(&self) -> usize {
        self.hard_limit()
    }

    /// Bytes a client may hold before the server stops reading it.
    pub fn high_water(&self) -> usize {
        self.high_water
    }

    /// Bytes a paused client must be down to before it is read again.
    pub fn low_water(&self) -> usize {
        self.low_water
    }

    pub(crate) fn hard_limit(&self) -> usize {
        self.max_backpressure.max(
            self.high_water
                .saturating_add(self.max_message_size)
                .saturating_add(self.compression_growth())
                .saturating_add(crate::runtime::flow::HEADROOM),
        )
    }

    /// The most compression can add to a message of `max_message_size`
    /// (zero when it is sent plain whenever compressing does not pay).
    fn compression_growth(&self) -> usize {
        #[cfg(feature = "deflate")]
        if let Some(c) = &self.compression {
            return c.worst_growth(self.max_message_size);
        }
        0
    }

    /// Worker threads in the pool.
    pub fn workers(&self) -> usize {
        self.workers
    }

    /// Most connections (handshakes included) from one IP address.
    pub fn max_connections_per_ip(&self) -> usize {
        self.max_connections_per_ip
    }

    /// The send buffer asked of the kernel for each client's socket
    /// (`SO_SNDBUF`), or `None` for the kernel's own sizing.
    pub fn kernel_send_buffer(&self) -> Option<usize> {
        self.kernel_send_buffer
    }

    /// Most bytes of unfinished incoming messages, all clients together.
    pub fn max_buffered_bytes(&self) -> usize {
        self.max_buffered_bytes
    }

    /// Most bytes queued to clients, all clients together (see
    /// [`Builder::max_queued_bytes`](crate::Builder::max_queued_bytes)):
    /// the budget in force, at least one client's hard limit
    /// ([`max_backpressure`](Config::max_backpressure)).
    pub fn max_queued_bytes(&self) -> usize {
        self.max_queued_bytes.max(self.hard_limit())
    }

    /// What a send over `max_backpressure` does.
    pub fn slow_client_policy(&self) -> SlowClientPolicy {
        self.slow_client_policy
    }

    /// Most topics one client may be subscribed to.
    pub fn max_topics_per_client(&self) -> usize {
        self.max_topics_per_client
    }

    /// Longest topic name, in bytes.
    pub fn max_topic_len(&self) -> usize {
        self.max_topic_len
    }

    /// Most topics (with at least one subscriber) on the server.
    pub fn max_topics(&self) -> usize {
        self.max_topics
    }

    /// What the bridge's channel names start with (see
    /// [`Builder::bridge_prefix`](crate::Builder::bridge_prefix)).
    pub fn bridge_prefix(&self) -> &str {
        &self.bridge_prefix
    }

    /// Bytes of envelopes that may wait for the bridge.
    pub fn bridge_outbox_bytes(&self) -> usize {
        self.bridge_outbox_bytes
    }

    /// Whether the closure style also queues events that have no closure.
    pub fn queue_unhandled_events(&self) -> bool {
        self.queue_unhandled_events
    }

    /// Budget of the event channel, in bytes.
    pub fn event_queue_bytes(&self) -> usize {
        self.event_queue_bytes
    }

    /// Subprotocols the server speaks, most preferred first.
    pub fn protocols(&self) -> &[String] {
        &self.protocols
    }

    /// Origins allowed to connect (`None`: any).
    pub fn allowed_origins(&self) -> Option<&[String]> {
        self.allowed_origins.as_deref()
    }

    /// Whether the proxy's forwarded-address header is believed.
    pub fn trust_proxy(&self) -> bool {
        self.trust_proxy
    }

    /// The header the client's address is read from behind a trusted
    /// proxy.
    pub fn forwarded_header(&self) -> &str {
        &self.forwarded_header
    }

    /// permessage-deflate settings (`None`: never negotiated).
    #[cfg(feature = "deflate")]
    pub fn compression(&self) -> Option<crate::proto::deflate::Compression> {
        self.compression
    }

    pub(crate) fn validate(&self) -> Result<(), &'static str> {
        if self.workers == 0 || self.workers > MAX_WORKERS {
            return Err("workers must be at least 1 and at most 4,096");
        }
        if self.max_connections == 0 {
            return Err("max_connections must be at least 1");
        }
        if self.max_connections > crate::runtime::registry::MAX_SLOTS {
            return Err("max_connections must be at most 2^32 (2^20 on 32-bit targets)");
        }
        if self.max_message_size == 0 {
            return Err("max_message_size must be at least 1");
        }
        if self.max_frame_size() == 0 {
            return Err("max_frame_size must be at least 1");
        }
        if self.max_connections_per_ip == 0 {
            return Err("max_connections_per_ip must be at least 1");
        }
        if let Some(b) = self.kernel_send_buffer
            && (b == 0 || b > KERNEL_SEND_BUFFER_MAX)
        {
            return Err("kernel_send_buffer must be at least 1 byte and at most 1 GiB");
        }
        if self.bridge_outbox_bytes == 0 {
            return Err("bridge_outbox_bytes must be at least 1");
        }
        if self.event_queue_bytes == 0 {
            return Err("event_queue_bytes must be at least 1");
        }
        if self.high_water == 0 || self.low_water >= self.high_water {
            return Err("low_water must be below high_water, and high_water above 0");
        }
        if self.max_fragments == 0 {
            return Err("max_fragments must be at least 1");
        }
        if self.max_handshake_bytes < 256 {
            return Err("max_handshake_bytes must be at least 256");
        }
        // The timers count whole milliseconds: a shorter time would be
        // zero, which closes every client at once.
        const MS: Duration = Duration::from_millis(1);
        if self.handshake_timeout < MS || self.close_timeout < MS {
            return Err("handshake_timeout and close_timeout must be at least 1 ms");
        }
        if self.ping_interval.is_some_and(|d| d < MS) || self.idle_timeout.is_some_and(|d| d < MS) {
            return Err("ping_interval and idle_timeout must be at least 1 ms (or None)");
        }
        // A ping goes out up to a keepalive tick late (deadlines are
        // rounded to it), and its pong needs time to come back: a ping
        // that late would find the client closed for idleness. (An idle
        // timeout past what the timers can count never fires.)
        if let (Some(ping), Some(idle)) = (self.ping_interval, self.idle_timeout) {
            let (ping_ms, idle_ms) = (crate::runtime::ms(ping), crate::runtime::ms(idle));
            let tick = crate::runtime::timer::Timers::keepalive_tick(Some(ping), Some(idle));
            if idle_ms < crate::runtime::NEVER_MS && ping_ms.saturating_add(2 * tick) > idle_ms {
                return Err(
                    "ping_interval must end, with two keepalive ticks (a thirty-second of \
                     it, 50 ms to 1 s) to spare, before idle_timeout: a silent client would be \
                     closed before its ping came back",
                );
            }
        }
        if self.max_buffered_bytes == 0 {
            return Err("max_buffered_bytes must be at least 1 (usize::MAX for no budget)");
        }
        if self.max_queued_bytes == 0 {
            return Err("max_queued_bytes must be at least 1 (usize::MAX for no budget)");
        }
        Ok(())
    }
}
