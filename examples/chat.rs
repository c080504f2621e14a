//! A chat with rooms: one port serves the page (`chat.html`, through
//! `on_http`) and the WebSocket it talks to.
//!
//! ```text
//! cargo run --example chat -- [ADDR]
//! # then open http://127.0.0.1:9002/ in two browser tabs
//! # (http://127.0.0.1:9002/?room=ROOM fills in the room)
//! ```
//!
//! The page asks for a name and a room and opens
//! `ws://HOST/chat?name=NAME&room=ROOM`. The client-init strategy takes
//! both from the query and refuses with 403 a missing name, and a name or
//! a room that is empty, over 32 characters, or has characters other than
//! letters, digits, spaces and `-_.` (so no name starts a line the way a
//! notice does). Without a `room` parameter the client is in `lobby`.
//!
//! Each room is a topic: a client subscribes to its room's topic when it
//! connects, and everything it says is published to that topic only, so
//! lines and notices never leave their room. The subscription ends by
//! itself when the client goes.
//!
//! Wire format: every text message the server sends is one line for the
//! log: `NAME: TEXT` for a chat message, `* NAME joined` and `* NAME left`
//! for notices. Each text message from a client is sent to everyone in
//! its room, the sender included, as `NAME: TEXT`. A binary message is
//! echoed unchanged to its sender only (the browser test checks it comes
//! back byte-exact).
//!
//! Any origin may connect; a real deployment would add
//! `Builder::allowed_origins` with its own site.

use std::sync::atomic::{AtomicBool, Ordering};

use enjent::{CloseCode, Error, HttpResponse, Message, Reject, Request, WebSocketServer};

#[path = "support/args.rs"]
mod args;

const PAGE: &str = include_str!("chat.html");
const MAX_NAME: usize = 32;
const DEFAULT_ROOM: &str = "lobby";

/// A client's data: who it is and which room (topic) it is in.
struct Member {
    name: String,
    room: String,
    /// Set once the member is in its room: one refused there never
    /// joined, and its leaving is not announced.
    joined: AtomicBool,
}

/// A name or a room: trimmed, 1 to [`MAX_NAME`] characters, each a
/// letter, a digit, a space or one of `-_.`.
fn valid(value: &str) -> Option<&str> {
    let value = value.trim();
    let allowed = |c: char| c.is_alphanumeric() || " -_.".contains(c);
    let ok = !value.is_empty() && value.chars().count() <= MAX_NAME && value.chars().all(allowed);
    ok.then_some(value)
}

/// The client-init strategy: name and room from the query.
fn admit(req: &Request) -> Result<Member, Reject> {
    if req.path() != "/chat" {
        return Err(Reject::new(404).body("the chat is at /chat?name=NAME&room=ROOM"));
    }
    let name = req.query_param("name").unwrap_or_default();
    let Some(name) = valid(&name) else {
        return Err(Reject::forbidden(
            "a name of 1 to 32 letters, digits, spaces, - _ or . is required",
        ));
    };
    let room = req.query_param("room");
    let room = match room.as_deref() {
        None => DEFAULT_ROOM,
        Some(room) => valid(room).ok_or_else(|| {
            Reject::forbidden("a room is 1 to 32 letters, digits, spaces, - _ or .")
        })?,
    };
    Ok(Member {
        name: name.to_owned(),
        room: room.to_owned(),
        joined: AtomicBool::new(false),
    })
}

/// Plain HTTP requests: the page at `/`, nothing else.
fn page(req: &Request) -> HttpResponse {
    match (req.method(), req.path()) {
        // HEAD is GET without the body (RFC 9110 section 9.3.2), which the
        // server leaves out.
        ("GET" | "HEAD", "/" | "/index.html") => HttpResponse::new(200)
            .content_type("text/html; charset=utf-8")
            .header("Cache-Control", "no-cache")
            .body(PAGE),
        (_, "/" | "/index.html") => HttpResponse::new(405).header("Allow", "GET, HEAD"),
        _ => HttpResponse::new(404).body("not found"),
    }
}

fn main() -> Result<(), Error> {
    let Some(addr) = args::addr_or_help(
        "chat",
        "chat rooms, with the page at http://ADDR/",
        "127.0.0.1:9002",
    )?
    else {
        return Ok(());
    };
    let server = WebSocketServer::with_client_init(admit)
        .max_message_size(64 * 1024)
        .on_http(page)
        .on_connect(|client| {
            let Member { name, room, joined } = client.data();
            // Only the server-wide topic limit (a million rooms by
            // default) can refuse this: then there is no room to be in.
            if let Err(e) = client.subscribe(room) {
                eprintln!("{name} cannot join room {room}: {e}");
                let _ = client.close(CloseCode::TRY_AGAIN_LATER, "too many rooms");
                return;
            }
            joined.store(true, Ordering::Relaxed);
            println!("{name} joined room {room} from {}", client.ip());
            // To the whole room, the newcomer included.
            client.server().publish(room, format!("* {name} joined"));
        })
        .on_message(|client, message| match message {
            Message::Text(text) if text.trim().is_empty() => {}
            Message::Text(text) => {
                let Member { name, room, joined } = client.data();
                if !joined.load(Ordering::Relaxed) {
                    return;
                }
                // One line, as the wire format says: a client's line
                // breaks (or other control characters) would let it
                // write what looks like a notice, `* Bob left`.
                let line: String = text
                    .chars()
                    .map(|c| if c.is_control() { ' ' } else { c })
                    .collect();
                // To the whole room, the sender included (`client.publish`
                // would leave the sender out).
                client.server().publish(room, format!("{name}: {line}"));
            }
            // Back to the sender only. A client that is gone or over its
            // backpressure limit misses it.
            Message::Binary(bytes) => {
                let _ = client.send(Message::Binary(bytes));
            }
        })
        // A closure that panicked, or a failure the server recovered
        // from: nothing else reports these in the closure style.
        .on_error(|_, e| eprintln!("error: {e}"))
        .on_disconnect(|client, close, _| {
            let Member { name, room, joined } = client.data();
            if !joined.load(Ordering::Relaxed) {
                // Refused at `on_connect`: it was never in the room.
                return;
            }
            println!("{name} left room {room} ({close})");
            // Its subscription is already gone: this reaches the others.
            client.server().publish(room, format!("* {name} left"));
        })
        .start(addr.as_str())?;
    println!("listening on ws://{}", server.local_addr());
    println!("open http://{}/ in a browser", server.local_addr());
    // The closures do the work; this waits until the process is killed.
    for _ in server.events() {}
    Ok(())
}
