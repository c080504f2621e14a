//! A server whose clients carry data of their own, built from the upgrade
//! request by a client-init strategy (the seed's
//! `ClientInitializationStrategy`). Clients must give a name in the query
//! string and a `session` cookie; others are refused with 403.
//!
//! ```text
//! cargo run --example custom_client -- [ADDR]
//! # then connect to ws://127.0.0.1:13003/?name=ann with Cookie: session=...
//! ```

use enjent::{Error, Event, Reject, Request, WebSocketServer};

#[path = "support/args.rs"]
mod args;

/// What the server knows about each client.
struct Member {
    name: String,
    session: String,
}

/// The client-init strategy: runs once per handshake, on a pool worker.
fn admit(req: &Request) -> Result<Member, Reject> {
    let name = req
        .query_param("name")
        .filter(|n| !n.trim().is_empty())
        .ok_or_else(|| Reject::forbidden("add ?name=YOUR_NAME to the URL"))?;
    // The name is printed and sent to everyone: no control characters
    // (terminal escapes, line breaks that would forge a line).
    if name.chars().any(char::is_control) {
        return Err(Reject::forbidden("a name has no control characters"));
    }
    let session = req
        .cookie("session")
        .ok_or_else(|| Reject::forbidden("a session cookie is required"))?;
    Ok(Member {
        name,
        session: session.to_owned(),
    })
}

fn main() -> Result<(), Error> {
    let Some(addr) = args::addr_or_help(
        "custom_client",
        "clients with data of their own (a name in the query, a session cookie)",
        "127.0.0.1:13003",
    )?
    else {
        return Ok(());
    };
    let server = WebSocketServer::with_client_init(admit).start(addr.as_str())?;
    println!("listening on ws://{}", server.local_addr());
    for event in server.events() {
        match event {
            Event::Connect { client } => {
                let m = client.data();
                // The session is a secret: say that one came, not what
                // it is (a real server would check it here or in
                // `admit`).
                println!("{} joined (a session of {} bytes)", m.name, m.session.len());
                // A client that left already gives `Err(Closed)`: no
                // reason to stop serving the others.
                let _ = client.send(format!("welcome, {}", m.name));
            }
            Event::Message { client, message } => {
                if let Some(text) = message.as_text() {
                    // One line of plain text, on the terminal and to the
                    // others: control characters become spaces.
                    let text: String = text
                        .chars()
                        .map(|c| if c.is_control() { ' ' } else { c })
                        .collect();
                    let line = format!("{}: {}", client.data().name, text);
                    println!("{line}");
                    server.broadcast(line);
                }
            }
            Event::Disconnect { client, .. } => println!("{} left", client.data().name),
            Event::Error { error, .. } => eprintln!("error: {error}"),
            _ => {}
        }
    }
    Ok(())
}
