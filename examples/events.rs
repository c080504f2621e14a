//! The seed README's example in Rust: a main loop over the event
//! receiver, printing connects, messages and disconnects.
//!
//! ```text
//! cargo run --example events -- [ADDR]
//! ```

use enjent::{Error, Event, WebSocketServer};

#[path = "support/args.rs"]
mod args;

fn main() -> Result<(), Error> {
    let Some(addr) = args::addr_or_help(
        "events",
        "the seed README's example: prints every connect, message and disconnect",
        "127.0.0.1:13003",
    )?
    else {
        return Ok(());
    };
    // Starting fails with Error::Bind (the seed's WebSocketServerException)
    // if the address is taken.
    let server = match WebSocketServer::bind(addr.as_str()) {
        Ok(server) => server,
        Err(e) => {
            eprintln!("An error occurred when starting the WebSocket server - {e}");
            return Err(e);
        }
    };
    println!("listening on ws://{}", server.local_addr());
    for event in server.events() {
        match event {
            Event::Connect { client } => {
                println!("Got a new socket ID: {}", client.id());
            }
            Event::Message { client, message } => match message.as_text() {
                Some(text) => println!("User {} says : {}", client.id(), printable(text)),
                None => println!("User {} sent {} bytes", client.id(), message.len()),
            },
            Event::Disconnect { client, close, .. } => {
                println!("User {} disconnected ({close})", client.id());
            }
            Event::Error { error, .. } => eprintln!("error: {error}"),
            _ => {}
        }
    }
    Ok(())
}

/// A client's text fit for a terminal: its control characters (the
/// escape that starts a terminal's commands among them, and line breaks
/// that would forge a line of this log) written as escapes, `\u{1b}`.
fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}
