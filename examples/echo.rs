//! Echo server, the one benchmarks and the Autobahn run start.
//!
//! ```text
//! cargo run --release --example echo -- [ADDR] [echo|broadcast] [--max-message-size BYTES]
//! ```
//!
//! `echo` (the default) sends every message back to its sender;
//! `broadcast` relays it to every connected client, the sender included.
//! Default address: 127.0.0.1:13003.

use enjent::{Error, WebSocketServer};

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Echo,
    Broadcast,
}

fn usage(why: &str) -> Error {
    eprintln!("{why}\nusage: echo [ADDR] [echo|broadcast] [--max-message-size BYTES]");
    Error::InvalidInput("bad arguments")
}

fn main() -> Result<(), Error> {
    let mut addr = "127.0.0.1:13003".to_string();
    let mut mode = Mode::Echo;
    let mut builder = WebSocketServer::builder();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "echo" => mode = Mode::Echo,
            "broadcast" => mode = Mode::Broadcast,
            "--max-message-size" => {
                let n = args.next().and_then(|v| v.parse().ok());
                let n = n.ok_or_else(|| usage("--max-message-size needs a number of bytes"))?;
                builder = builder.max_message_size(n);
            }
            "-h" | "--help" => return Err(usage("an echo server")),
            a if a.starts_with('-') => return Err(usage(&format!("unknown option {a}"))),
            a => addr = a.to_string(),
        }
    }
    let server = builder
        // Everything is handled on the workers; nothing goes to the event
        // channel (which would wake the main thread twice a connection).
        .on_connect(|_| {})
        .on_disconnect(|_, _, _| {})
        .on_message(move |client, message| {
            match mode {
                // A client that is gone or over its backpressure limit
                // simply misses its echo.
                Mode::Echo => {
                    let _ = client.send(message);
                }
                Mode::Broadcast => {
                    client.server().broadcast(message);
                }
            }
        })
        .start(addr.as_str())?;
    println!("listening on ws://{}", server.local_addr());
    // The main thread just keeps the server alive until the process is
    // killed: with every event taken by a closure, this waits forever.
    for event in server.events() {
        drop(event);
    }
    Ok(())
}
