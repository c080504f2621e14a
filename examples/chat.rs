//! A chat room: one port serves the page (`chat.html`, through `on_http`)
//! and the WebSocket it talks to.
//!
//! ```text
//! cargo run --example chat -- [ADDR]
//! # then open http://127.0.0.1:9002/ in two browser tabs
//! ```
//!
//! The page asks for a name and opens `ws://HOST/chat?name=NAME`. The
//! client-init strategy takes the name from the query and refuses with 403
//! a missing or empty one, one over 32 characters, or one with characters
//! other than letters, digits, spaces and `-_.` (so no name starts a line
//! the way a notice does).
//!
//! Wire format: every text message the server sends is one line for the
//! log: `NAME: TEXT` for a chat message, `* NAME joined` and `* NAME left`
//! for notices. Each text message from a client is sent to everyone, the
//! sender included, as `NAME: TEXT`. A binary message is echoed unchanged
//! to its sender only (the browser test checks it comes back byte-exact).
//!
//! Any origin may connect; a real deployment would add
//! `Builder::allowed_origins` with its own site.

use enjent::{Error, HttpResponse, Message, Reject, Request, WebSocketServer};

const PAGE: &str = include_str!("chat.html");
const MAX_NAME: usize = 32;

/// The client-init strategy: the client's data is its name.
fn admit(req: &Request) -> Result<String, Reject> {
    if req.path() != "/chat" {
        return Err(Reject::new(404).body("the chat is at /chat?name=NAME"));
    }
    let name = req.query_param("name").unwrap_or_default();
    let name = name.trim();
    let allowed = |c: char| c.is_alphanumeric() || " -_.".contains(c);
    if name.is_empty() || name.chars().count() > MAX_NAME || !name.chars().all(allowed) {
        return Err(Reject::forbidden(
            "a name of 1 to 32 letters, digits, spaces, - _ or . is required",
        ));
    }
    Ok(name.to_owned())
}

/// Plain HTTP requests: the page at `/`, nothing else.
fn page(req: &Request) -> HttpResponse {
    match (req.method(), req.path()) {
        ("GET", "/" | "/index.html") => HttpResponse::new(200)
            .content_type("text/html; charset=utf-8")
            .header("Cache-Control", "no-cache")
            .body(PAGE),
        (_, "/" | "/index.html") => HttpResponse::new(405).header("Allow", "GET"),
        _ => HttpResponse::new(404).body("not found"),
    }
}

fn main() -> Result<(), Error> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9002".into());
    let server = WebSocketServer::with_client_init(admit)
        .max_message_size(64 * 1024)
        .on_http(page)
        .on_connect(|client| {
            println!("{} joined from {}", client.data(), client.ip());
            client
                .server()
                .broadcast(format!("* {} joined", client.data()));
        })
        .on_message(|client, message| match message {
            Message::Text(text) if text.trim().is_empty() => {}
            Message::Text(text) => {
                client
                    .server()
                    .broadcast(format!("{}: {text}", client.data()));
            }
            // Back to the sender only. A client that is gone or over its
            // backpressure limit misses it.
            Message::Binary(bytes) => {
                let _ = client.send(Message::Binary(bytes));
            }
        })
        .on_disconnect(|client, close, _| {
            println!("{} left ({close})", client.data());
            client
                .server()
                .broadcast(format!("* {} left", client.data()));
        })
        .start(addr.as_str())?;
    println!("listening on ws://{}", server.local_addr());
    println!("open http://{}/ in a browser", server.local_addr());
    // The closures do the work; this waits until the process is killed.
    for _ in server.events() {}
    Ok(())
}
