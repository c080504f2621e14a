//! The decoder and message assembler behind a connection's close state
//! machine: any byte stream, split anywhere, never panics, and splitting
//! does not change what comes out.
#![no_main]

use enjent::proto::assemble::Limits;
use enjent::proto::conn::{Connection, Output};
use libfuzzer_sys::fuzz_target;

fn run(data: &[u8], split: usize) -> Vec<Output> {
    let limits = Limits {
        max_message_size: 1 << 16,
        max_frame_size: 1 << 15,
        max_fragments: 64,
    };
    let mut c = Connection::new(limits);
    let mut out = Vec::new();
    for chunk in data.chunks(split.max(1)) {
        let mut rest = chunk;
        while let Some(o) = c.read(&mut rest) {
            out.push(o);
        }
    }
    out
}

fuzz_target!(|input: (u8, &[u8])| {
    let (split, data) = input;
    let whole = run(data, data.len());
    let pieces = run(data, usize::from(split));
    assert_eq!(whole, pieces);
});
