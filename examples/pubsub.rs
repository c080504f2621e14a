//! Topics over a text protocol, the one load generators and black-box
//! tests drive.
//!
//! ```text
//! cargo run --release --example pubsub -- [ADDR] [--max-message-size BYTES]
//! ```
//!
//! Default address: 127.0.0.1:13004. Each text message from a client is a
//! command:
//!
//! - `sub TOPIC`: subscribe to TOPIC;
//! - `unsub TOPIC`: unsubscribe;
//! - `pub TOPIC PAYLOAD`: publish PAYLOAD (everything after the second
//!   space) as a text message to every subscriber of TOPIC but the sender.
//!
//! TOPIC has no spaces. Anything else, and a subscription over a limit,
//! is answered with a text message starting `error: `.

use enjent::{Client, Error, Message, WebSocketServer};

fn usage(why: &str) -> Error {
    eprintln!("{why}\nusage: pubsub [ADDR] [--max-message-size BYTES]");
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

fn main() -> Result<(), Error> {
    let mut addr = "127.0.0.1:13004".to_string();
    let mut builder = WebSocketServer::builder();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--max-message-size" => {
                let n = args.next().and_then(|v| v.parse().ok());
                let n = n.ok_or_else(|| usage("--max-message-size needs a number of bytes"))?;
                builder = builder.max_message_size(n);
            }
            "-h" | "--help" => return Err(usage("topics over a text protocol")),
            a if a.starts_with('-') => return Err(usage(&format!("unknown option {a}"))),
            a => addr = a.to_string(),
        }
    }
    let server = builder.on_message(command).start(addr.as_str())?;
    println!("listening on ws://{}", server.local_addr());
    // The closures do the work; this waits until the process is killed.
    for _ in server.events() {}
    Ok(())
}
