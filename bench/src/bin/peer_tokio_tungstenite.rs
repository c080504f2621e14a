//! Peer server for benchmarks: tokio (multi-thread runtime) + tokio-tungstenite.
//! Same command line (`peer_tokio_tungstenite [ADDR] [echo|broadcast|pubsub] [--max-message-size BYTES]`)
//! and behaviour as enjent's `examples/echo` (and, in `pubsub` mode, `examples/pubsub`).

use std::collections::HashMap;
use std::io::Write;
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc::{UnboundedSender, unbounded_channel};
use tokio_tungstenite::tungstenite::{Error, Message, protocol::WebSocketConfig};
use tokio_tungstenite::{WebSocketStream, accept_async_with_config};

#[path = "../peer_cli.rs"]
mod peer_cli;

use peer_cli::{Membership, Mode, NOT_TEXT, Rooms, parse_args};

/// Every connected client (broadcast mode), by id: the sender of its writer task.
type Registry = Arc<Mutex<HashMap<u64, UnboundedSender<Message>>>>;

/// Pubsub mode: the members of each room.
type RoomMap = Arc<Rooms<UnboundedSender<Message>>>;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let (addr, mode, max) = parse_args("peer_tokio_tungstenite", "a tokio-tungstenite echo server");
    let config = WebSocketConfig::default()
        .max_message_size(Some(max))
        .max_frame_size(Some(max));
    let listener = TcpListener::bind(&addr).await?;
    println!("listening on ws://{}", listener.local_addr()?);
    std::io::stdout().flush()?;

    let clients = Registry::default();
    let rooms = RoomMap::default();
    let mut next_id = 0u64;
    loop {
        // Accept errors (such as running out of file descriptors) are skipped.
        if let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            let (id, clients, rooms) = (next_id, clients.clone(), rooms.clone());
            next_id += 1;
            tokio::spawn(async move {
                let Ok(ws) = accept_async_with_config(stream, Some(config)).await else {
                    return;
                };
                // Errors just end the connection.
                let _ = match mode {
                    Mode::Echo => echo(ws).await,
                    Mode::Broadcast => broadcast(ws, id, &clients).await,
                    Mode::Pubsub => pubsub(ws, id, &rooms).await,
                };
            });
        }
    }
}

/// Sends every data message back. Pings and the close handshake are answered
/// by tungstenite itself; the stream ends once the close reply is flushed.
async fn echo(mut ws: WebSocketStream<TcpStream>) -> Result<(), Error> {
    while let Some(message) = ws.next().await {
        let message = message?;
        if message.is_text() || message.is_binary() {
            ws.send(message).await?;
        }
    }
    Ok(())
}

/// Starts a writer task fed by an unbounded channel; returns its sender.
fn spawn_writer(
    mut sink: futures_util::stream::SplitSink<WebSocketStream<TcpStream>, Message>,
) -> UnboundedSender<Message> {
    let (tx, mut rx) = unbounded_channel::<Message>();
    tokio::spawn(async move {
        // Write whatever is queued, then flush once. Ends when every sender
        // is gone, or on the first write error.
        while let Some(message) = rx.recv().await {
            sink.feed(message).await?;
            while let Ok(message) = rx.try_recv() {
                sink.feed(message).await?;
            }
            sink.flush().await?;
        }
        Ok::<_, Error>(())
    });
    tx
}

/// The commands of `examples/pubsub`; a publish is copied once and its
/// payload shared by every member's queue.
async fn pubsub(ws: WebSocketStream<TcpStream>, id: u64, rooms: &RoomMap) -> Result<(), Error> {
    let (sink, mut stream) = ws.split();
    let me = spawn_writer(sink);
    let mut membership = Membership::new(id);
    let result = async {
        while let Some(message) = stream.next().await {
            let reply = match message? {
                Message::Text(text) => membership.command(rooms, &me, &text, |topic, payload| {
                    let payload = Message::Text(payload.into());
                    rooms.publish(topic, id, |member| drop(member.send(payload.clone())));
                }),
                Message::Binary(_) => Some(NOT_TEXT),
                _ => None,
            };
            if let Some(reply) = reply {
                let _ = me.send(Message::text(reply));
            }
        }
        Ok(())
    }
    .await;
    membership.leave(rooms);
    result
}

/// Reads on this task, writes on a writer task.
async fn broadcast(
    ws: WebSocketStream<TcpStream>,
    id: u64,
    clients: &Registry,
) -> Result<(), Error> {
    let (sink, mut stream) = ws.split();
    // The writer ends when its sender is removed from the registry.
    clients.lock().unwrap().insert(id, spawn_writer(sink));
    let result = async {
        while let Some(message) = stream.next().await {
            let message = message?;
            if message.is_text() || message.is_binary() {
                for client in clients.lock().unwrap().values() {
                    let _ = client.send(message.clone());
                }
            }
        }
        Ok(())
    }
    .await;
    clients.lock().unwrap().remove(&id);
    result
}
