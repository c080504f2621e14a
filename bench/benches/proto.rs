//! Micro-benchmarks of the protocol core: frame header parse and encode,
//! unmasking (word-at-a-time against byte-at-a-time), UTF-8 validation of
//! text, and decoding whole messages.
//!
//! ```text
//! cd bench && cargo bench --bench proto
//! ```

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use enjent::proto::assemble::{Decoder, Limits};
use enjent::proto::frame::{
    OpCode, apply_mask, apply_mask_bytewise, encode_header, extend_masked, parse_header,
};

fn masked(first: u8, payload: &[u8]) -> Vec<u8> {
    let key = [0x11, 0x22, 0x33, 0x44];
    let mut out = vec![first];
    let n = payload.len();
    if n < 126 {
        out.push(0x80 | n as u8);
    } else if n <= 0xFFFF {
        out.push(0x80 | 126);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(n as u64).to_be_bytes());
    }
    out.extend_from_slice(&key);
    let start = out.len();
    out.extend_from_slice(payload);
    apply_mask(&mut out[start..], key, 0);
    out
}

fn headers(c: &mut Criterion) {
    let mut g = c.benchmark_group("header");
    let small = masked(0x82, &[0; 32]);
    let large = masked(0x82, &vec![0; 70_000]);
    g.bench_function("parse 32 B frame", |b| {
        b.iter(|| parse_header(black_box(&small), 0))
    });
    g.bench_function("parse 70 KB frame", |b| {
        b.iter(|| parse_header(black_box(&large), 0))
    });
    g.bench_function("encode", |b| {
        let mut out = [0u8; 10];
        b.iter(|| encode_header(&mut out, true, OpCode::Binary, black_box(70_000)))
    });
    g.finish();
}

fn masking(c: &mut Criterion) {
    let mut g = c.benchmark_group("unmask");
    for size in [32usize, 1024, 65536] {
        let mut data = vec![7u8; size];
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_function(format!("word-at-a-time {size} B"), |b| {
            b.iter(|| apply_mask(black_box(&mut data), [1, 2, 3, 4], 1))
        });
        g.bench_function(format!("byte-at-a-time {size} B"), |b| {
            b.iter(|| apply_mask_bytewise(black_box(&mut data), [1, 2, 3, 4], 1))
        });
        // Into a new message buffer, as the decoder does: in one pass
        // into its spare capacity, against copying and then unmasking.
        let src = vec![7u8; size];
        g.bench_function(format!("into a message, one pass {size} B"), |b| {
            b.iter(|| {
                let mut dst = Vec::with_capacity(size);
                extend_masked(&mut dst, black_box(&src), [1, 2, 3, 4], 1);
                dst
            })
        });
        g.bench_function(format!("into a message, copy then unmask {size} B"), |b| {
            b.iter(|| {
                let mut dst = Vec::with_capacity(size);
                dst.extend_from_slice(black_box(&src));
                apply_mask(&mut dst, [1, 2, 3, 4], 1);
                dst
            })
        });
    }
    g.finish();
}

fn decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode");
    let ascii = "hello websocket world ".repeat(3000);
    let mixed = "héllo wörld €uro ✓ ".repeat(3000);
    for (name, text) in [("ascii", &ascii), ("multibyte", &mixed)] {
        let wire = masked(0x81, text.as_bytes());
        g.throughput(Throughput::Bytes(text.len() as u64));
        g.bench_function(format!("text message, {name}, {} B", text.len()), |b| {
            b.iter(|| {
                let mut d = Decoder::new(Limits::default());
                let mut input = black_box(&wire[..]);
                d.decode(&mut input).unwrap()
            })
        });
        // The same text in 64 fragments: incremental UTF-8 checking.
        let bytes = text.as_bytes();
        let mut frag = Vec::new();
        let mut start = 0;
        let parts = 64;
        for k in 0..parts {
            let mut end = if k == parts - 1 {
                bytes.len()
            } else {
                bytes.len() * (k + 1) / parts
            };
            while end < bytes.len() && (bytes[end] & 0xC0) == 0x80 {
                end += 1;
            }
            let op = if k == 0 { 0x01 } else { 0x00 } | if k == parts - 1 { 0x80 } else { 0 };
            frag.extend(masked(op, &bytes[start..end]));
            start = end;
        }
        g.bench_function(format!("text in 64 fragments, {name}"), |b| {
            b.iter(|| {
                let mut d = Decoder::new(Limits::default());
                let mut input = black_box(&frag[..]);
                d.decode(&mut input).unwrap()
            })
        });
    }
    let small = masked(0x82, &[5; 32]).repeat(1000);
    g.throughput(Throughput::Elements(1000));
    g.bench_function("1000 binary 32 B messages", |b| {
        b.iter(|| {
            let mut d = Decoder::new(Limits::default());
            let mut input = black_box(&small[..]);
            let mut n = 0;
            while let Ok(Some(_)) = d.decode(&mut input) {
                n += 1;
            }
            n
        })
    });
    g.finish();
}

criterion_group!(benches, headers, masking, decode);
criterion_main!(benches);
