//! Randomized tests of the protocol core on the stable toolchain, over the
//! same entry points as the fuzz targets in `fuzz/`: arbitrary bytes never
//! panic, and well-formed traffic decodes the same however it is split.

use enjent::proto::assemble::{Decoder, Incoming, Limits};
use enjent::proto::conn::{Connection, Output};
mod support;

use enjent::proto::frame::parse_header;
use enjent::proto::handshake::parse_request;
use support::frame_with_key;

/// xorshift64*: deterministic, seedable, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn small_limits() -> Limits {
    Limits {
        max_message_size: 4096,
        max_frame_size: 2048,
        max_fragments: 16,
    }
}

#[test]
fn arbitrary_bytes_never_panic_the_decoder_or_the_connection() {
    let mut rng = Rng(0x1234_5678_9ABC_DEF1);
    for _ in 0..20_000 {
        let len = rng.below(300);
        let mut data = rng.bytes(len);
        // Bias towards plausible headers: masked, small lengths.
        if !data.is_empty() && rng.below(2) == 0 {
            data[0] = [0x81, 0x82, 0x01, 0x00, 0x80, 0x88, 0x89, 0x8A][rng.below(8)];
        }
        if data.len() > 1 && rng.below(2) == 0 {
            data[1] = 0x80 | (rng.below(130) as u8);
        }
        let _ = parse_header(&data, 0);
        let mut c = Connection::new(small_limits());
        let mut rest = &data[..];
        while let Some(out) = c.read(&mut rest) {
            if let Output::Fail { .. } = out {
                break;
            }
        }
    }
}

#[test]
fn arbitrary_bytes_never_panic_the_handshake_parser() {
    let base = b"GET /x?a=%41 HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nCookie: a=b\r\n\r\n";
    let mut rng = Rng(42);
    for _ in 0..20_000 {
        let mut req = base.to_vec();
        for _ in 0..rng.below(6) {
            let i = rng.below(req.len());
            match rng.below(3) {
                0 => req[i] = rng.next() as u8,
                1 => {
                    req.remove(i);
                }
                _ => req.insert(i, rng.next() as u8),
            }
        }
        let cut = rng.below(req.len() + 1);
        if let Ok(Some((r, n))) = parse_request(&req[..cut], 8192) {
            assert!(n <= cut);
            let _ = (r.query_param("a"), r.cookie("a"), r.header("host"));
        }
    }
}

#[test]
fn valid_traffic_decodes_the_same_however_it_is_split() {
    let mut rng = Rng(7);
    for round in 0..300 {
        // A random sequence of messages, some fragmented, with pings
        // between fragments.
        let mut wire = Vec::new();
        let mut expected = Vec::new();
        for _ in 0..rng.below(8) + 1 {
            let text = rng.below(2) == 0;
            let n = rng.below(3000);
            let payload: Vec<u8> = if text {
                "abé€"
                    .chars()
                    .cycle()
                    .take(n / 2)
                    .collect::<String>()
                    .into_bytes()
            } else {
                rng.bytes(n)
            };
            let len = payload.len();
            // Keep text valid when cut at a fragment boundary: split on
            // char boundaries only.
            let pieces = rng.below(4) + 1;
            let mut cuts: Vec<usize> = (0..pieces - 1).map(|_| rng.below(len + 1)).collect();
            cuts.sort_unstable();
            let mut start = 0;
            let mut bounds = Vec::new();
            for c in cuts.into_iter().chain([len]) {
                let mut c = c.max(start);
                while text && c < len && (payload[c] & 0xC0) == 0x80 {
                    c += 1;
                }
                bounds.push((start, c));
                start = c;
            }
            for (k, (a, b)) in bounds.iter().enumerate() {
                let first = k == 0;
                let last = k == bounds.len() - 1;
                let op = if first { if text { 1 } else { 2 } } else { 0 };
                let key = [rng.next() as u8, rng.next() as u8, 3, 4];
                wire.extend(frame_with_key(
                    op | if last { 0x80 } else { 0 },
                    &payload[*a..*b],
                    key,
                ));
                if !last && rng.below(3) == 0 {
                    wire.extend(frame_with_key(0x89, b"ping", key));
                    expected.push(Incoming::Ping(b"ping".to_vec()));
                }
            }
            expected.push(Incoming::Message(if text {
                enjent::Message::Text(String::from_utf8(payload).unwrap())
            } else {
                enjent::Message::Binary(payload)
            }));
        }
        let mut d = Decoder::new(Limits::default());
        let mut got = Vec::new();
        let mut pos = 0;
        while pos < wire.len() {
            let step = 1 + rng.below(700);
            let mut chunk = &wire[pos..(pos + step).min(wire.len())];
            pos += chunk.len();
            while let Some(item) = d
                .decode(&mut chunk)
                .unwrap_or_else(|e| panic!("round {round}: {e:?}"))
            {
                got.push(item);
            }
        }
        assert_eq!(got, expected, "round {round}");
    }
}
