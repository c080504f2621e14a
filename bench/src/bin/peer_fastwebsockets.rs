//! Peer server for benchmarks: tokio (multi-thread runtime) + hyper 1 + fastwebsockets.
//! Same command line (`peer_fastwebsockets [ADDR] [echo|broadcast|pubsub] [--max-message-size BYTES]`)
//! and behaviour as enjent's `examples/echo` (and, in `pubsub` mode, `examples/pubsub`).
//! Broadcast and pubsub modes need fastwebsockets' `unstable-split` feature.

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use fastwebsockets::{FragmentCollector, FragmentCollectorRead, Frame, OpCode, Payload};
use fastwebsockets::{WebSocket, WebSocketError, upgrade};
use http_body_util::Empty;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, server::conn::http1, service::service_fn, upgrade::Upgraded};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::mpsc::{UnboundedSender, unbounded_channel};

#[path = "../peer_cli.rs"]
mod peer_cli;

use peer_cli::{Membership, Mode, NOT_TEXT, Rooms, parse_args};

type Ws = WebSocket<TokioIo<Upgraded>>;

/// What a writer task is asked to send: one whole, unmasked frame.
type Outgoing = (OpCode, Bytes);

/// Shared by all connections.
struct Shared {
    mode: Mode,
    max_message_size: usize,
    next_id: AtomicU64,
    /// Every connected client (broadcast mode), by id: the sender of its writer task.
    clients: Mutex<HashMap<u64, UnboundedSender<Outgoing>>>,
    /// Pubsub mode: the members of each room.
    rooms: Rooms<UnboundedSender<Outgoing>>,
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let (addr, mode, max_message_size) =
        parse_args("peer_fastwebsockets", "a fastwebsockets echo server");
    let listener = TcpListener::bind(&addr).await?;
    println!("listening on ws://{}", listener.local_addr()?);
    std::io::stdout().flush()?;

    let shared = Arc::new(Shared {
        mode,
        max_message_size,
        next_id: 0.into(),
        clients: Default::default(),
        rooms: Default::default(),
    });
    loop {
        // Accept errors (such as running out of file descriptors) are skipped.
        if let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            let shared = shared.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| upgrade(req, shared.clone()));
                let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
                let _ = conn.with_upgrades().await;
            });
        }
    }
}

/// Answers the HTTP upgrade request and runs the WebSocket on a task of its own.
async fn upgrade(
    mut req: Request<Incoming>,
    shared: Arc<Shared>,
) -> Result<Response<Empty<Bytes>>, WebSocketError> {
    let (response, fut) = upgrade::upgrade(&mut req)?;
    tokio::spawn(async move {
        let Ok(mut ws) = fut.await else { return };
        ws.set_auto_close(true);
        ws.set_auto_pong(true);
        ws.set_max_message_size(shared.max_message_size);
        // Errors just end the connection.
        let _ = match shared.mode {
            Mode::Echo => echo(ws).await,
            Mode::Broadcast => broadcast(ws, &shared).await,
            Mode::Pubsub => pubsub(ws, &shared).await,
        };
    });
    Ok(response)
}

async fn echo(ws: Ws) -> Result<(), WebSocketError> {
    let mut ws = FragmentCollector::new(ws);
    loop {
        let frame = ws.read_frame().await?;
        match frame.opcode {
            OpCode::Close => return Ok(()), // auto_close has already replied
            OpCode::Text | OpCode::Binary => ws.write_frame(frame).await?,
            _ => {}
        }
    }
}

/// Reads on this task, writes on a task of its own fed by an unbounded channel;
/// pongs and the close reply go through that channel too.
async fn broadcast(ws: Ws, shared: &Shared) -> Result<(), WebSocketError> {
    let (rx, mut tx) = ws.split(tokio::io::split);
    let mut rx = FragmentCollectorRead::new(rx);
    let (out, mut queue) = unbounded_channel::<Outgoing>();
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    shared.clients.lock().unwrap().insert(id, out.clone());
    tokio::spawn(async move {
        while let Some((opcode, payload)) = queue.recv().await {
            tx.write_frame(Frame::new(true, opcode, None, Payload::Borrowed(&payload)))
                .await?;
            if opcode == OpCode::Close {
                break;
            }
        }
        Ok::<_, WebSocketError>(())
    });
    let mut obligated = |frame: Frame| {
        let sent = out.send((frame.opcode, Bytes::copy_from_slice(&frame.payload)));
        std::future::ready(sent.map_err(|_| WebSocketError::ConnectionClosed))
    };
    let result = loop {
        let frame = match rx.read_frame(&mut obligated).await {
            Ok(frame) => frame,
            Err(e) => break Err(e),
        };
        match frame.opcode {
            OpCode::Close => break Ok(()),
            OpCode::Text | OpCode::Binary => {
                let payload = match frame.payload {
                    Payload::Bytes(bytes) => bytes.freeze(),
                    other => Bytes::copy_from_slice(&other),
                };
                for client in shared.clients.lock().unwrap().values() {
                    let _ = client.send((frame.opcode, payload.clone()));
                }
            }
            _ => {}
        }
    };
    shared.clients.lock().unwrap().remove(&id);
    result
}

/// The commands of `examples/pubsub`, read on this task; replies and
/// deliveries go through the writer task, as in broadcast mode. A publish
/// copies its payload once; every member's queue shares it.
async fn pubsub(ws: Ws, shared: &Shared) -> Result<(), WebSocketError> {
    let (rx, mut tx) = ws.split(tokio::io::split);
    let mut rx = FragmentCollectorRead::new(rx);
    let (out, mut queue) = unbounded_channel::<Outgoing>();
    tokio::spawn(async move {
        while let Some((opcode, payload)) = queue.recv().await {
            tx.write_frame(Frame::new(true, opcode, None, Payload::Borrowed(&payload)))
                .await?;
            if opcode == OpCode::Close {
                break;
            }
        }
        Ok::<_, WebSocketError>(())
    });
    let mut obligated = |frame: Frame| {
        let sent = out.send((frame.opcode, Bytes::copy_from_slice(&frame.payload)));
        std::future::ready(sent.map_err(|_| WebSocketError::ConnectionClosed))
    };
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let mut membership = Membership::new(id);
    let rooms = &shared.rooms;
    let result = loop {
        let frame = match rx.read_frame(&mut obligated).await {
            Ok(frame) => frame,
            Err(e) => break Err(e),
        };
        let reply = match frame.opcode {
            OpCode::Close => break Ok(()),
            OpCode::Text => match std::str::from_utf8(&frame.payload) {
                Ok(text) => membership.command(rooms, &out, text, |topic, payload| {
                    let payload = Bytes::copy_from_slice(payload.as_bytes());
                    rooms.publish(topic, id, |member| {
                        let _ = member.send((OpCode::Text, payload.clone()));
                    });
                }),
                Err(_) => break Err(WebSocketError::InvalidUTF8),
            },
            OpCode::Binary => Some(NOT_TEXT),
            _ => None,
        };
        if let Some(reply) = reply {
            let _ = out.send((OpCode::Text, Bytes::from_static(reply.as_bytes())));
        }
    };
    membership.leave(rooms);
    result
}
