//! Topics over a text protocol, the one load generators and black-box
//! tests drive.
//!
//! ```text
//! cargo run --release --example pubsub -- [ADDR] [--max-message-size BYTES] [--kernel-send-buffer BYTES]
//! cargo run --release --features redis --example pubsub -- [ADDR] --redis redis://127.0.0.1:6379
//! ```
//!
//! With `--redis URL`, the server is one instance of a cluster: its topics
//! are shared through Redis with every other instance on the same Redis,
//! and the bridge's ups and downs are reported on stderr.
//!
//! Default address: 127.0.0.1:13004. Each text message from a client is a
//! command:
//!
//! - `sub TOPIC`: subscribe to TOPIC;
//! - `unsub TOPIC`: unsubscribe;
//! - `pub TOPIC PAYLOAD`: publish PAYLOAD (everything after the second
//!   space) as a text message to every subscriber of TOPIC but the sender.
//!
//! TOPIC has no spaces and at most 64 bytes, and a client holds at most
//! 16 topics (100,000 in all). Anything else, and a subscription over a
//! limit, is answered with a text message starting `error: `.

use enjent::{Client, Error, Message, WebSocketServer};

const USAGE: &str =
    "usage: pubsub [ADDR] [--max-message-size BYTES] [--kernel-send-buffer BYTES] [--redis URL]";

fn usage(why: &str) -> Error {
    eprintln!("{why}\n{USAGE}");
    Error::InvalidInput("bad arguments")
}

/// Carry out one command from `client`.
fn command(client: &Client, message: Message) {
    let Some(text) = message.as_text() else {
        return reply(client, "error: commands are text");
    };
    let (verb, rest) = text.split_once(' ').unwrap_or((text, ""));
    match verb {
        "sub" if !rest.is_empty() && !rest.contains(' ') => {
            if let Err(e) = client.subscribe(rest) {
                reply(client, &format!("error: {e}"));
            }
        }
        "unsub" if !rest.is_empty() && !rest.contains(' ') => {
            client.unsubscribe(rest);
        }
        "pub" => match rest.split_once(' ') {
            Some((topic, payload)) if !topic.is_empty() => {
                client.publish(topic, payload);
            }
            _ => reply(client, "error: pub TOPIC PAYLOAD"),
        },
        _ => reply(client, "error: sub TOPIC, unsub TOPIC or pub TOPIC PAYLOAD"),
    }
}

fn reply(client: &Client, text: &str) {
    // A client that is gone needs no answer.
    let _ = client.send(text);
}

#[cfg(feature = "redis")]
fn with_redis(builder: enjent::Builder, url: &str) -> Result<enjent::Builder, Error> {
    let bridge = enjent::bridge::RedisBridge::new(url)?;
    Ok(builder
        .bridge(bridge)
        .on_bridge(|event| eprintln!("{event}")))
}

#[cfg(not(feature = "redis"))]
fn with_redis(_: enjent::Builder, _: &str) -> Result<enjent::Builder, Error> {
    Err(usage(
        "--redis needs the redis feature: cargo run --features redis --example pubsub",
    ))
}

fn main() -> Result<(), Error> {
    let mut addr = "127.0.0.1:13004".to_string();
    // Clients name their own topics here, so the library's default
    // limits (256 topics of 256-byte names a client, a million in all)
    // would let a few thousand clients use up every topic and cost
    // about 100 KB each: this protocol's clients get fewer, shorter ones.
    let mut builder = WebSocketServer::builder()
        .max_topics_per_client(16)
        .max_topic_len(64)
        .max_topics(100_000);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--max-message-size" => {
                let n = args.next().and_then(|v| v.parse().ok());
                let n = n.ok_or_else(|| usage("--max-message-size needs a number of bytes"))?;
                builder = builder.max_message_size(n);
            }
            // Anyone may subscribe here: a cap on what the kernel holds
            // for a subscriber that never reads (see the README's
            // paragraph on the kernel's buffers).
            "--kernel-send-buffer" => {
                let n = args.next().and_then(|v| v.parse().ok());
                let n = n.ok_or_else(|| usage("--kernel-send-buffer needs a number of bytes"))?;
                builder = builder.kernel_send_buffer(Some(n));
            }
            "--redis" => {
                let url = args.next().ok_or_else(|| usage("--redis needs a URL"))?;
                builder = with_redis(builder, &url)?;
            }
            "-h" | "--help" => {
                println!("topics over a text protocol\n{USAGE}");
                return Ok(());
            }
            a if a.starts_with('-') => return Err(usage(&format!("unknown option {a}"))),
            a => addr = a.to_string(),
        }
    }
    let server = builder
        .on_message(command)
        // A closure that panicked, or a failure the server recovered
        // from: nothing else reports these in the closure style.
        .on_error(|_, e| eprintln!("error: {e}"))
        .start(addr.as_str())?;
    println!("listening on ws://{}", server.local_addr());
    // The closures do the work; this waits until the process is killed.
    for _ in server.events() {}
    Ok(())
}
