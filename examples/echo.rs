//! Echo server, the one benchmarks and the Autobahn run start.
//!
//! ```text
//! cargo run --release --example echo -- [ADDR] [echo|broadcast] [--max-message-size BYTES] [--main-loop] [--trust-proxy]
//!     [--workers N] [--ping-interval SECS] [--no-keepalive] [--kernel-send-buffer BYTES]
//!     [--compress-all] [--compress-level N] (these two: feature deflate)
//! ```
//!
//! `echo` (the default) sends every message back to its sender;
//! `broadcast` relays it to every connected client, the sender included.
//! Default address: 127.0.0.1:13003. Messages are handled in an
//! `on_message` closure on the workers; `--main-loop` handles them in a
//! `for event in server.events()` loop instead (the other event style, for
//! benchmarks). `--trust-proxy` is for running behind a reverse proxy
//! (`tests/nginx.rs`): the server believes the last `X-Forwarded-For` entry
//! and prints one line per connection, `connect ID from PEER forwarded IP`
//! (`forwarded -` when the request carried no address).
//!
//! Built with `--features deflate`, it accepts permessage-deflate offers
//! with the library's defaults; `--compress-all` compresses every
//! message, however short or incompressible. The Autobahn run needs that:
//! its runner (kosoku 0.1.0) errors on an uncompressed message in a
//! compressed session, although RFC 7692 allows one. `--compress-level N`
//! sets zlib's level (default 6).

use enjent::{Client, Error, Event, Message, WebSocketServer};

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Echo,
    Broadcast,
}

const USAGE: &str = "usage: echo [ADDR] [echo|broadcast] [--max-message-size BYTES] \
[--ping-interval SECS] [--no-keepalive] [--workers N] [--main-loop] [--trust-proxy] \
[--kernel-send-buffer BYTES] [--compress-all] [--compress-level N]

  ADDR                default 127.0.0.1:13003
  echo | broadcast    each message back to its sender (default), or to every client
  --ping-interval     keepalive, at least 0.07 s (default 30); silent clients are
                      closed after two and a half intervals
  --no-keepalive      no pings and no idle timeout
  --workers N         the pool's threads (default twice the cores)
  --main-loop         handle messages in an event loop instead of closures
  --trust-proxy       believe X-Forwarded-For and print each client's address
  --kernel-send-buffer BYTES
                      each client's send buffer in the kernel (SO_SNDBUF;
                      default: the kernel's sizing)
  --compress-all, --compress-level N
                      (built with --features deflate) compress every message,
                      at zlib level N (0-9, default 6)";

fn usage(why: &str) -> Error {
    eprintln!("{why}\n{USAGE}");
    Error::InvalidInput("bad arguments")
}

/// Echo `message` back. Flow control guarantees that a reply of the
/// message's size is never refused for the client's own queue while the
/// client reads (the server stops reading a client that falls behind
/// instead), so a refusal is worth a line on stderr (a bug, or the whole
/// server over `max_queued_bytes`); a client that has gone is not.
fn echo(client: &Client, message: Message) {
    if let Err(e) = client.send(message)
        && !matches!(e.error(), Error::Closed)
    {
        eprintln!("echo to client {} refused: {e}", client.id());
    }
}

/// The `--trust-proxy` line: who connected, as the TCP peer and as the
/// proxy says.
fn print_connect(client: &Client) {
    let forwarded = client.forwarded_addr().map(|ip| ip.to_string());
    println!(
        "connect {} from {} forwarded {}",
        client.id(),
        client.peer_addr(),
        forwarded.as_deref().unwrap_or("-")
    );
}

fn main() -> Result<(), Error> {
    let mut addr = "127.0.0.1:13003".to_string();
    let mut mode = Mode::Echo;
    let mut main_loop = false;
    let mut trust_proxy = false;
    let mut builder = WebSocketServer::builder();
    #[cfg(feature = "deflate")]
    let mut compression = enjent::Compression::default();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "echo" => mode = Mode::Echo,
            "broadcast" => mode = Mode::Broadcast,
            "--main-loop" => main_loop = true,
            "--trust-proxy" => trust_proxy = true,
            #[cfg(feature = "deflate")]
            "--compress-all" => {
                compression = compression.threshold(0).skip_incompressible(false);
            }
            #[cfg(feature = "deflate")]
            "--compress-level" => {
                let n = args.next().and_then(|v| v.parse().ok()).filter(|n| *n <= 9);
                let n = n.ok_or_else(|| usage("--compress-level needs a zlib level, 0 to 9"))?;
                compression = compression.level(n);
            }
            #[cfg(not(feature = "deflate"))]
            "--compress-all" | "--compress-level" => {
                return Err(usage(&format!(
                    "{arg} needs the build's --features deflate"
                )));
            }
            "--max-message-size" => {
                let n = args.next().and_then(|v| v.parse().ok());
                let n = n.ok_or_else(|| usage("--max-message-size needs a number of bytes"))?;
                builder = builder.max_message_size(n);
            }
            "--kernel-send-buffer" => {
                let n = args.next().and_then(|v| v.parse().ok());
                let n = n.ok_or_else(|| usage("--kernel-send-buffer needs a number of bytes"))?;
                builder = builder.kernel_send_buffer(Some(n));
            }
            "--no-keepalive" => {
                builder = builder.ping_interval(None).idle_timeout(None);
            }
            "--workers" => {
                let n = args.next().and_then(|v| v.parse().ok());
                let n = n.ok_or_else(|| usage("--workers needs a number of threads"))?;
                builder = builder.workers(n);
            }
            "--ping-interval" => {
                let secs: Option<f64> = args.next().and_then(|v| v.parse().ok());
                // The library wants two keepalive ticks (50 ms at least)
                // between a ping and the idle timeout set below.
                let secs = secs.filter(|s| *s >= 0.07).ok_or_else(|| {
                    usage("--ping-interval needs a number of seconds, at least 0.07")
                })?;
                // Silent clients are closed after two and a half pings'
                // worth of silence (the library's 30 s and 75 s).
                let every = std::time::Duration::try_from_secs_f64(secs)
                    .ok()
                    .filter(|d| d.as_secs() < 1 << 40)
                    .ok_or_else(|| usage("--ping-interval is too long"))?;
                builder = builder
                    .ping_interval(Some(every))
                    .idle_timeout(Some(every * 5 / 2));
            }
            "-h" | "--help" => {
                println!("an echo server\n{USAGE}");
                return Ok(());
            }
            a if a.starts_with('-') => return Err(usage(&format!("unknown option {a}"))),
            a => addr = a.to_string(),
        }
    }
    builder = builder.trust_proxy(trust_proxy);
    #[cfg(feature = "deflate")]
    {
        builder = builder.compression(Some(compression));
    }
    if !main_loop {
        builder = builder
            // Everything on the workers; nothing goes to the event channel
            // (which would wake the main thread twice a connection).
            .on_connect(move |client| {
                if trust_proxy {
                    print_connect(client);
                }
            })
            .on_disconnect(|_, _, _| {})
            // A closure that panicked, or a failure the server recovered
            // from: nothing else reports these in the closure style.
            .on_error(|client, e| match client {
                Some(c) => eprintln!("error (client {}): {e}", c.id()),
                None => eprintln!("error: {e}"),
            })
            .on_message(move |client, message| match mode {
                Mode::Echo => echo(client, message),
                Mode::Broadcast => {
                    client.server().broadcast(message);
                }
            });
    }
    let server = builder.start(addr.as_str())?;
    println!("listening on ws://{}", server.local_addr());
    // With closures this waits until the process is killed; in main-loop
    // mode it is where the work happens.
    for event in server.events() {
        match event {
            Event::Message { client, message } => match mode {
                Mode::Echo => echo(&client, message),
                Mode::Broadcast => {
                    server.broadcast(message);
                }
            },
            Event::Connect { client } if trust_proxy => print_connect(&client),
            Event::Error { client, error } => match client {
                Some(c) => eprintln!("error (client {}): {error}", c.id()),
                None => eprintln!("error: {error}"),
            },
            _ => {}
        }
    }
    Ok(())
}
