//! What compression contexts cost a server whose clients keep them
//! (`Compression::context_takeover`): zlib's state is made when a
//! connection first needs it, and `max_contexts` bounds how many
//! connections keep it. Heap as glibc counts it, so this file holds one
//! test, alone in its process. Run with `--features deflate`.

#![cfg(all(feature = "deflate", target_os = "linux", target_env = "gnu"))]

mod support;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use enjent::{Compression, WebSocketServer};
use flate2::{Compress, Decompress};
use support::deflate::*;
use support::*;

/// Bytes the process has from malloc now (its arenas' and its mappings').
#[allow(unsafe_code)]
fn heap_in_use() -> i64 {
    // SAFETY: `mallinfo2` takes nothing and reads glibc's own counters.
    let m = unsafe { libc::mallinfo2() };
    (m.uordblks + m.hblkhd) as i64
}

const AS_WITHOUT: &str =
    "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

/// A crowd of clients that offer the extension costs no zlib state until
/// each sends something, and then at most `max_contexts` of them keep
/// contexts: the rest are answered as if context takeover were off. A
/// place is free again when a client that had one leaves. Before contexts
/// were made when first used and bounded, 120 idle clients cost 256 KiB
/// each at the handshake, and 120 that each sent a message about 370 KiB.
#[test]
fn contexts_are_made_when_used_and_no_more_than_max_contexts() {
    raise_fd_limit();
    const CLIENTS: usize = 120;
    const MOST: usize = 10;
    let server = WebSocketServer::builder()
        .workers(2)
        .on_message(|c, m| {
            let _ = c.send(m);
        })
        .compression(Some(
            Compression::default()
                .context_takeover(true)
                .max_contexts(MOST),
        ))
        .start("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr();
    // Each worker's stateless compressor and inflater, made once: a
    // client without a context has one message echoed first.
    let (head, mut warm) = upgrade(
        addr,
        &format!("{PDE}; server_no_context_takeover; client_no_context_takeover\r\n"),
    );
    assert_eq!(extensions(&head), Some(AS_WITHOUT));
    let text = "All work and no play makes Jack a dull boy. ".repeat(70);
    for _ in 0..8 {
        warm.write_all(&frame(0xC1, &deflate(text.as_bytes())))
            .unwrap();
        let (first, payload) = read_frame(&mut warm);
        assert_eq!((first, inflate(&payload)), (0xC1, text.as_bytes().to_vec()));
    }

    // Clients that allow the server smaller windows, 9 to 14 bits: each
    // thread compresses with 15, 12 or 9 bits whatever the sizes asked (a
    // stateless compressor is over 200 KiB at any window), so two more
    // compressors a worker at most. Each compressor a size was made
    // before: up to six more a worker.
    let start = heap_in_use();
    for bits in 9..=14u8 {
        for _ in 0..4 {
            let offer = format!(
                "{PDE}; server_max_window_bits={bits}; server_no_context_takeover; \
                 client_no_context_takeover\r\n"
            );
            let (head, mut s) = upgrade(addr, &offer);
            assert_eq!(
                extensions(&head),
                Some(format!("{AS_WITHOUT}; server_max_window_bits={bits}").as_str())
            );
            s.write_all(&frame(0xC1, &deflate(text.as_bytes())))
                .unwrap();
            let (first, payload) = read_frame(&mut s);
            assert_eq!(first, 0xC1);
            let mut theirs = Decompress::new_with_window_bits(false, bits);
            assert_eq!(inflate_with(&mut theirs, &payload), text.as_bytes());
        }
    }
    let windows = heap_in_use() - start;
    assert!(
        windows < 4 * (512 << 10),
        "clients asking for six window sizes grew the heap by {windows} B"
    );

    let before = heap_in_use();
    let mut clients: Vec<(bool, TcpStream)> = (0..CLIENTS)
        .map(|i| {
            let (head, s) = upgrade(addr, &format!("{PDE}\r\n"));
            let keeps = extensions(&head) == Some("permessage-deflate");
            assert!(
                keeps || extensions(&head) == Some(AS_WITHOUT),
                "client {i} was answered {:?}",
                extensions(&head)
            );
            (keeps, s)
        })
        .collect();
    let idle = heap_in_use() - before;
    let kept = clients.iter().filter(|c| c.0).count();
    assert_eq!(kept, MOST, "clients answered with context takeover");
    assert!(
        idle < (CLIENTS as i64) << 14,
        "{CLIENTS} idle clients grew the heap by {idle} B"
    );

    // Each sends two messages and reads their echoes, the second
    // compressed against the first where both sides keep contexts.
    for (keeps, s) in &mut clients {
        let mut ours = Compress::new(flate2::Compression::default(), false);
        let mut theirs = Decompress::new(false);
        let mut sizes = Vec::new();
        for _ in 0..2 {
            let payload = if *keeps {
                deflate_with(&mut ours, text.as_bytes())
            } else {
                deflate(text.as_bytes())
            };
            s.write_all(&frame(0xC1, &payload)).unwrap();
            let (first, echoed) = read_frame(s);
            assert_eq!(first, 0xC1);
            sizes.push(echoed.len());
            let back = if *keeps {
                inflate_with(&mut theirs, &echoed)
            } else {
                inflate(&echoed)
            };
            assert_eq!(back, text.as_bytes());
        }
        if *keeps {
            assert!(sizes[1] * 2 < sizes[0], "no context kept: {sizes:?}");
        }
    }
    let busy = heap_in_use() - before;
    // A context pair is about 370 KiB; the clients without one hold a
    // few KiB each at most.
    let bound = (MOST as i64) * (512 << 10) + ((CLIENTS as i64) << 14);
    assert!(
        busy < bound,
        "{CLIENTS} clients, {MOST} with contexts, grew the heap by {busy} B (bound {bound} B)"
    );

    // The clients with contexts leave: their places go to the next ones.
    let leaving: Vec<TcpStream> = clients
        .iter()
        .filter(|c| c.0)
        .map(|c| c.1.try_clone().unwrap())
        .collect();
    clients.retain(|c| !c.0);
    drop(leaving);
    // Their contexts and places go when their jobs let go of them, a
    // little after they leave the count of connections.
    let t = Instant::now();
    let mut after;
    loop {
        after = heap_in_use() - before;
        if server.connections() <= CLIENTS - MOST + 1 && after < busy - (MOST as i64) * (256 << 10)
        {
            break;
        }
        assert!(
            t.elapsed() < WAIT,
            "the contexts were not let go: {} connections, {busy} B before they left, {after} B after",
            server.connections()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    eprintln!(
        "heap grown: {windows} B for six window sizes; {idle} B idle, {busy} B after the messages, {after} B once the {MOST} left"
    );
    // A new client gets a context again.
    let (head, _s) = upgrade(addr, &format!("{PDE}\r\n"));
    assert_eq!(extensions(&head), Some("permessage-deflate"));
}
