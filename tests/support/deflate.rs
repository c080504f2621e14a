//! A client's side of permessage-deflate, written by hand with flate2
//! (the test clients at hand do not speak the extension).

use std::io::Write;
use std::net::{SocketAddr, TcpStream};

use flate2::{Compress, Decompress, FlushCompress, FlushDecompress};

use super::{REQUEST, raw, read_101};

pub const PDE: &str = "Sec-WebSocket-Extensions: permessage-deflate";

/// Upgrade with `extra` header lines; the `101` head and the socket.
pub fn upgrade(addr: SocketAddr, extra: &str) -> (String, TcpStream) {
    let mut s = raw(addr);
    let req = REQUEST.replace("\r\n\r\n", &format!("\r\n{extra}\r\n"));
    s.write_all(req.as_bytes()).unwrap();
    let head = read_101(&mut s);
    (head, s)
}

pub fn extensions(head: &str) -> Option<&str> {
    head.lines()
        .find_map(|l| l.strip_prefix("Sec-WebSocket-Extensions: "))
}

/// What a client compressor sends for one message (sync flush, tail cut).
pub fn deflate_with(c: &mut Compress, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 64);
    let start = c.total_in();
    loop {
        if out.len() == out.capacity() {
            out.reserve(out.capacity() + 64);
        }
        let done = (c.total_in() - start) as usize;
        c.compress_vec(&data[done..], &mut out, FlushCompress::Sync)
            .unwrap();
        if (c.total_in() - start) as usize == data.len() && out.len() < out.capacity() {
            break;
        }
    }
    assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
    out.truncate(out.len() - 4);
    out
}

pub fn deflate(data: &[u8]) -> Vec<u8> {
    deflate_with(
        &mut Compress::new(flate2::Compression::default(), false),
        data,
    )
}

pub fn inflate_with(d: &mut Decompress, data: &[u8]) -> Vec<u8> {
    let mut input = data.to_vec();
    input.extend_from_slice(&[0, 0, 0xff, 0xff]);
    let mut out = Vec::with_capacity(data.len() * 4 + 1024);
    let start = d.total_in();
    loop {
        if out.len() == out.capacity() {
            out.reserve(out.capacity());
        }
        let done = (d.total_in() - start) as usize;
        d.decompress_vec(&input[done..], &mut out, FlushDecompress::Sync)
            .unwrap();
        if (d.total_in() - start) as usize == input.len() && out.len() < out.capacity() {
            return out;
        }
    }
}

pub fn inflate(data: &[u8]) -> Vec<u8> {
    inflate_with(&mut Decompress::new(false), data)
}
