//! Frame headers: any bytes parse to a header, "incomplete", or an error,
//! and a parsed header re-encodes to a parseable one of the same length.
#![no_main]

use enjent::proto::frame::{encode_header_rsv, parse_header};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let rsv = data.first().map_or(0, |b| b & 0x7);
    let Ok(Some((h, n))) = parse_header(data, rsv) else {
        return;
    };
    assert!(n <= data.len() && n >= 2);
    if let Ok(len) = usize::try_from(h.len) {
        let mut out = [0u8; 10];
        let m = encode_header_rsv(&mut out, h.fin, h.rsv, h.opcode, len);
        let (back, k) = parse_header(&out[..m], rsv).unwrap().unwrap();
        assert_eq!((back.len, back.opcode, back.fin, k), (h.len, h.opcode, h.fin, m));
    }
});
