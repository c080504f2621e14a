//! Peer server for benchmarks: blocking tungstenite, one OS thread per client
//! (and, in broadcast and pubsub modes, a second one to write).
//! Same command line (`peer_tungstenite_threads [ADDR] [echo|broadcast|pubsub] [--max-message-size BYTES]`)
//! and behaviour as enjent's `examples/echo` (and, in `pubsub` mode, `examples/pubsub`).

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::thread;

use tungstenite::protocol::{Role, WebSocketConfig};
use tungstenite::{Message, Result, WebSocket, accept_with_config};

#[path = "../peer_cli.rs"]
mod peer_cli;

use peer_cli::{Membership, Mode, NOT_TEXT, Rooms, parse_args};

/// Every connected client (broadcast mode), by id: the sender of its writer thread.
type Registry = Arc<Mutex<HashMap<u64, Sender<Message>>>>;

/// Pubsub mode: the members of each room.
type RoomMap = Arc<Rooms<Sender<Message>>>;

/// The socket as the reading thread uses it. In broadcast mode its writes are
/// dropped after the handshake: the writer thread sends pongs and the close
/// reply instead, so that frames from two threads never interleave.
struct ReadSide {
    stream: TcpStream,
    discard_writes: bool,
}

impl Read for ReadSide {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.stream.read(buf)
    }
}

impl Write for ReadSide {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.discard_writes {
            Ok(buf.len())
        } else {
            self.stream.write(buf)
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        self.stream.flush()
    }
}

fn main() -> io::Result<()> {
    let (addr, mode, max) = parse_args(
        "peer_tungstenite_threads",
        "a thread-per-client tungstenite echo server",
    );
    let config = WebSocketConfig::default()
        .max_message_size(Some(max))
        .max_frame_size(Some(max));
    let listener = TcpListener::bind(&addr)?;
    println!("listening on ws://{}", listener.local_addr()?);
    io::stdout().flush()?;

    let clients = Registry::default();
    let rooms = RoomMap::default();
    for (id, stream) in (0u64..).zip(listener.incoming()) {
        let Ok(stream) = stream else { continue };
        let _ = stream.set_nodelay(true);
        let (clients, rooms) = (clients.clone(), rooms.clone());
        thread::spawn(move || {
            let side = ReadSide {
                stream,
                discard_writes: false,
            };
            // Errors just end the connection.
            if let Ok(ws) = accept_with_config(side, Some(config)) {
                let _ = match mode {
                    Mode::Echo => echo(ws),
                    Mode::Broadcast => broadcast(ws, id, &clients),
                    Mode::Pubsub => pubsub(ws, id, &rooms),
                };
            }
        });
    }
    Ok(())
}

/// Sends every data message back. Pings and the close handshake are answered
/// by tungstenite itself; `read` fails once the close reply is flushed.
fn echo(mut ws: WebSocket<ReadSide>) -> Result<()> {
    loop {
        let message = ws.read()?;
        if message.is_text() || message.is_binary() {
            ws.send(message)?;
        }
    }
}

/// Starts the writer thread of a connection whose reads stay on this
/// thread; returns the sender that feeds it.
fn spawn_writer(ws: &mut WebSocket<ReadSide>) -> Result<Sender<Message>> {
    let stream = ws.get_ref().stream.try_clone()?;
    ws.get_mut().discard_writes = true;
    let mut out = WebSocket::from_raw_socket(stream, Role::Server, Some(*ws.get_config()));
    let (tx, rx) = channel();
    thread::spawn(move || {
        let _ = write_all(&mut out, rx);
        // Closes the connection after the close reply, and wakes the reader on errors.
        let _ = out.get_ref().shutdown(Shutdown::Both);
    });
    Ok(tx)
}

fn broadcast(mut ws: WebSocket<ReadSide>, id: u64, clients: &Registry) -> Result<()> {
    let tx = spawn_writer(&mut ws)?;
    clients.lock().unwrap().insert(id, tx.clone());
    let result = loop {
        match ws.read() {
            Ok(message) if message.is_text() || message.is_binary() => {
                for client in clients.lock().unwrap().values() {
                    let _ = client.send(message.clone());
                }
            }
            Ok(Message::Ping(payload)) => drop(tx.send(Message::Pong(payload))),
            Ok(Message::Close(frame)) => {
                let _ = tx.send(Message::Close(frame)); // the writer replies, then closes
                break Ok(());
            }
            Ok(_) => {}
            Err(e) => break Err(e),
        }
    };
    clients.lock().unwrap().remove(&id);
    if result.is_err() {
        let _ = ws.get_ref().stream.shutdown(Shutdown::Both);
    }
    result
}

/// The commands of `examples/pubsub`; a publish copies its payload once and
/// every member's queue shares it.
fn pubsub(mut ws: WebSocket<ReadSide>, id: u64, rooms: &RoomMap) -> Result<()> {
    let tx = spawn_writer(&mut ws)?;
    let mut membership = Membership::new(id);
    let result = loop {
        let reply = match ws.read() {
            Ok(Message::Text(text)) => membership.command(rooms, &tx, &text, |topic, payload| {
                let payload = Message::Text(payload.into());
                rooms.publish(topic, id, |member| drop(member.send(payload.clone())));
            }),
            Ok(Message::Binary(_)) => Some(NOT_TEXT),
            Ok(Message::Ping(payload)) => {
                let _ = tx.send(Message::Pong(payload));
                None
            }
            Ok(Message::Close(frame)) => {
                let _ = tx.send(Message::Close(frame)); // the writer replies, then closes
                break Ok(());
            }
            Ok(_) => None,
            Err(e) => break Err(e),
        };
        if let Some(reply) = reply {
            let _ = tx.send(Message::text(reply));
        }
    };
    membership.leave(rooms);
    if result.is_err() {
        let _ = ws.get_ref().stream.shutdown(Shutdown::Both);
    }
    result
}

/// Writes whatever is queued, then flushes once. Ends on the first error (a
/// write after the close reply is one) or when every sender is gone.
fn write_all(out: &mut WebSocket<TcpStream>, rx: Receiver<Message>) -> Result<()> {
    while let Ok(message) = rx.recv() {
        out.write(message)?;
        while let Ok(message) = rx.try_recv() {
            out.write(message)?;
        }
        out.flush()?;
    }
    Ok(())
}
