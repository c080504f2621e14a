//! Frame header codec and masking (RFC 6455 section 5.2).
//!
//! Pure functions over byte slices. Parsing returns `Ok(None)` for input
//! that is merely incomplete, as `httparse` returns `Status::Partial`.

use crate::error::ProtocolError;

/// The largest header: 2 bytes, 8 of extended length, 4 of mask.
pub const MAX_HEADER_LEN: usize = 14;

/// A frame opcode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpCode {
    /// 0x0: continues a fragmented message.
    Continuation,
    /// 0x1: first frame of a text message.
    Text,
    /// 0x2: first frame of a binary message.
    Binary,
    /// 0x8: close.
    Close,
    /// 0x9: ping.
    Ping,
    /// 0xA: pong.
    Pong,
}

impl OpCode {
    /// Decode the low four bits of the first header byte.
    pub fn from_u8(op: u8) -> Result<OpCode, ProtocolError> {
        Ok(match op {
            0x0 => OpCode::Continuation,
            0x1 => OpCode::Text,
            0x2 => OpCode::Binary,
            0x8 => OpCode::Close,
            0x9 => OpCode::Ping,
            0xA => OpCode::Pong,
            other => return Err(ProtocolError::ReservedOpcode(other)),
        })
    }

    /// The wire value.
    pub fn as_u8(self) -> u8 {
        match self {
            OpCode::Continuation => 0x0,
            OpCode::Text => 0x1,
            OpCode::Binary => 0x2,
            OpCode::Close => 0x8,
            OpCode::Ping => 0x9,
            OpCode::Pong => 0xA,
        }
    }

    /// Close, ping and pong are control frames.
    pub fn is_control(self) -> bool {
        matches!(self, OpCode::Close | OpCode::Ping | OpCode::Pong)
    }
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Final fragment of a message.
    pub fin: bool,
    /// RSV1-3 as the low three bits.
    pub rsv: u8,
    /// The opcode.
    pub opcode: OpCode,
    /// The masking key, if the frame is masked.
    pub mask: Option<[u8; 4]>,
    /// Payload length in bytes.
    pub len: u64,
}

/// Parse a frame header from the start of `buf`.
///
/// Returns the header and its length in bytes, `Ok(None)` if `buf` holds
/// only part of a header, or the rule the header breaks. `allowed_rsv` is
/// the set of RSV bits an extension has claimed (0 without extensions).
///
/// ```
/// # use enjent::proto::frame::{parse_header, OpCode};
/// let (h, n) = parse_header(&[0x81, 0x85, 1, 2, 3, 4], 0).unwrap().unwrap();
/// assert_eq!((h.opcode, h.len, n), (OpCode::Text, 5, 6));
/// assert!(parse_header(&[0x81], 0).unwrap().is_none());
/// ```
pub fn parse_header(
    buf: &[u8],
    allowed_rsv: u8,
) -> Result<Option<(FrameHeader, usize)>, ProtocolError> {
    let (b0, b1) = match buf {
        [b0, b1, ..] => (*b0, *b1),
        _ => return Ok(None),
    };
    let fin = b0 & 0x80 != 0;
    let rsv = (b0 >> 4) & 0x7;
    if rsv & !allowed_rsv != 0 {
        return Err(ProtocolError::ReservedBits);
    }
    let opcode = OpCode::from_u8(b0 & 0x0F)?;
    let masked = b1 & 0x80 != 0;
    let len7 = b1 & 0x7F;
    if opcode.is_control() {
        if !fin {
            return Err(ProtocolError::FragmentedControlFrame);
        }
        if len7 > 125 {
            return Err(ProtocolError::ControlFrameTooLong);
        }
    }
    let ext = match len7 {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let header_len = 2 + ext + if masked { 4 } else { 0 };
    if buf.len() < header_len {
        return Ok(None);
    }
    let len = match ext {
        2 => u64::from(u16::from_be_bytes([buf[2], buf[3]])),
        8 => {
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            let l = u64::from_be_bytes(b);
            if l >> 63 != 0 {
                return Err(ProtocolError::InvalidLength);
            }
            l
        }
        _ => u64::from(len7),
    };
    let mask = if masked {
        let m = &buf[2 + ext..2 + ext + 4];
        Some([m[0], m[1], m[2], m[3]])
    } else {
        None
    };
    Ok(Some((
        FrameHeader {
            fin,
            rsv,
            opcode,
            mask,
            len,
        },
        header_len,
    )))
}

/// Encode an unmasked (server-to-client) frame header into `out`, returning
/// its length.
///
/// ```
/// # use enjent::proto::frame::{encode_header, OpCode};
/// let mut out = [0u8; 10];
/// let n = encode_header(&mut out, true, OpCode::Binary, 300);
/// assert_eq!(&out[..n], &[0x82, 126, 1, 44]);
/// ```
pub fn encode_header(out: &mut [u8; 10], fin: bool, opcode: OpCode, len: usize) -> usize {
    encode_header_rsv(out, fin, 0, opcode, len)
}

/// [`encode_header`] with RSV bits (for extensions).
pub fn encode_header_rsv(
    out: &mut [u8; 10],
    fin: bool,
    rsv: u8,
    opcode: OpCode,
    len: usize,
) -> usize {
    out[0] = (u8::from(fin) << 7) | ((rsv & 0x7) << 4) | opcode.as_u8();
    if len < 126 {
        out[1] = len as u8;
        2
    } else if len <= usize::from(u16::MAX) {
        out[1] = 126;
        out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        4
    } else {
        out[1] = 127;
        out[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    }
}

/// Encode a whole unmasked frame (header and payload) into a new buffer.
pub fn encode_frame(opcode: OpCode, payload: &[u8]) -> Vec<u8> {
    let mut head = [0u8; 10];
    let n = encode_header(&mut head, true, opcode, payload.len());
    let mut out = Vec::with_capacity(n + payload.len());
    out.extend_from_slice(&head[..n]);
    out.extend_from_slice(payload);
    out
}

/// XOR `buf` with `mask`, as if `buf` started `offset` bytes into the
/// payload. Works eight bytes at a time.
///
/// ```
/// # use enjent::proto::frame::apply_mask;
/// let mut data = *b"hello";
/// apply_mask(&mut data, [1, 2, 3, 4], 0);
/// apply_mask(&mut data[..2], [1, 2, 3, 4], 0);
/// apply_mask(&mut data[2..], [1, 2, 3, 4], 2);
/// assert_eq!(&data, b"hello");
/// ```
pub fn apply_mask(buf: &mut [u8], mask: [u8; 4], offset: usize) {
    let (m, wide) = wide_mask(mask, offset);
    xor_words(buf, m, wide);
}

/// The mask as it applies from `offset` on, and as a word of two copies.
fn wide_mask(mask: [u8; 4], offset: usize) -> ([u8; 4], u64) {
    // Byte `i` of the result is byte `i + offset` of the mask.
    let m = u32::from_le_bytes(mask)
        .rotate_right(8 * (offset & 3) as u32)
        .to_le_bytes();
    let half = u64::from(u32::from_ne_bytes(m));
    (m, half | half << 32)
}

/// XOR `buf` with the mask `m` (`wide` is two copies of it), a word at a
/// time.
fn xor_words(buf: &mut [u8], m: [u8; 4], wide: u64) {
    let mut chunks = buf.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        chunk.copy_from_slice(&(u64::from_ne_bytes(word) ^ wide).to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= m[i & 3];
    }
}

/// Append `src` to `dst` masked (or unmasked: it is the same XOR), as
/// copying it and then calling [`apply_mask`] would, but in one pass over
/// memory: each 256-byte block is masked straight into `dst`'s spare
/// capacity. For 64 KiB this takes about 0.7 of the time of masking each
/// block into a buffer on the stack and appending it from there (how it
/// was done before), and a third of that of copying, then masking in
/// place (`cd bench && cargo bench --bench proto -- unmask`).
#[allow(unsafe_code)]
pub fn extend_masked(dst: &mut Vec<u8>, src: &[u8], mask: [u8; 4], offset: usize) {
    let (m, wide) = wide_mask(mask, offset);
    dst.reserve(src.len());
    let start = dst.len();
    let out = &mut dst.spare_capacity_mut()[..src.len()];
    // Whole 256-byte blocks first, through arrays of a fixed length,
    // which the compiler unrolls and vectorizes; then words, then bytes.
    const BLOCK: usize = 256;
    let mut blocks_out = out.chunks_exact_mut(BLOCK);
    let mut blocks_in = src.chunks_exact(BLOCK);
    for (o, i) in (&mut blocks_out).zip(&mut blocks_in) {
        let o: &mut [std::mem::MaybeUninit<u8>; BLOCK] = o.try_into().expect("a whole block");
        let i: &[u8; BLOCK] = i.try_into().expect("a whole block");
        for j in 0..BLOCK / 8 {
            mask_word_into(&mut o[j * 8..j * 8 + 8], &i[j * 8..j * 8 + 8], wide);
        }
    }
    let mut outs = blocks_out.into_remainder().chunks_exact_mut(8);
    let mut ins = blocks_in.remainder().chunks_exact(8);
    for (o, i) in (&mut outs).zip(&mut ins) {
        mask_word_into(o, i, wide);
    }
    // Whole words keep the mask's phase, so the rest starts at phase 0
    // of the rotated mask.
    for (k, (o, &b)) in outs
        .into_remainder()
        .iter_mut()
        .zip(ins.remainder())
        .enumerate()
    {
        o.write(b ^ m[k & 3]);
    }
    // SAFETY: `reserve` made room for `src.len()` more bytes, and each of
    // the `src.len()` bytes of spare capacity past `start` was written
    // above, exactly once: `out` and `src` are both `src.len()` long, so
    // their blocks, then the words of what is left, then the bytes left
    // after those, pair one to one. (Should anything above panic, the
    // length is not set: nothing unwritten is ever read.)
    unsafe { dst.set_len(start + src.len()) };
}

/// Write the 8 bytes of `i`, masked with `wide`, into the 8 of `o`.
#[inline(always)]
fn mask_word_into(o: &mut [std::mem::MaybeUninit<u8>], i: &[u8], wide: u64) {
    let mut word = [0u8; 8];
    word.copy_from_slice(&i[..8]);
    let masked = (u64::from_ne_bytes(word) ^ wide).to_ne_bytes();
    for (o, b) in o[..8].iter_mut().zip(masked) {
        o.write(b);
    }
}

/// Byte-at-a-time masking, kept as the reference the fast one is tested
/// (and benchmarked) against.
pub fn apply_mask_bytewise(buf: &mut [u8], mask: [u8; 4], offset: usize) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b ^= mask[(offset + i) & 3];
    }
}

/// Encode a close frame's payload: code then reason.
pub fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut p = Vec::with_capacity(2 + reason.len());
    p.extend_from_slice(&code.to_be_bytes());
    p.extend_from_slice(reason.as_bytes());
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    macro_rules! header {
        ($name:ident, $bytes:expr, $rsv:expr, Err($e:expr)) => {
            #[test]
            fn $name() {
                assert_eq!(parse_header(&$bytes, $rsv), Err($e));
            }
        };
        ($name:ident, $bytes:expr, $rsv:expr, Partial) => {
            #[test]
            fn $name() {
                assert_eq!(parse_header(&$bytes, $rsv), Ok(None));
            }
        };
        ($name:ident, $bytes:expr, $rsv:expr, ($fin:expr, $op:expr, $mask:expr, $len:expr, $hl:expr)) => {
            #[test]
            fn $name() {
                let (h, n) = parse_header(&$bytes, $rsv).unwrap().unwrap();
                assert_eq!(h.fin, $fin);
                assert_eq!(h.opcode, $op);
                assert_eq!(h.mask, $mask);
                assert_eq!(h.len, $len);
                assert_eq!(n, $hl);
            }
        };
    }

    header!(empty, [], 0, Partial);
    header!(one_byte, [0x81], 0, Partial);
    header!(
        short_text,
        [0x81, 0x05],
        0,
        (true, OpCode::Text, None, 5, 2)
    );
    header!(masked_missing_key, [0x81, 0x85, 1, 2], 0, Partial);
    header!(
        masked,
        [0x82, 0x80, 9, 8, 7, 6],
        0,
        (true, OpCode::Binary, Some([9, 8, 7, 6]), 0, 6)
    );
    header!(
        len16,
        [0x02, 0xFE, 0x01, 0x00, 1, 2, 3, 4],
        0,
        (false, OpCode::Binary, Some([1, 2, 3, 4]), 256, 8)
    );
    header!(len16_partial, [0x02, 0xFE, 0x01], 0, Partial);
    header!(
        len64,
        [0x80, 0xFF, 0, 0, 0, 1, 0, 0, 0, 0, 1, 2, 3, 4],
        0,
        (true, OpCode::Continuation, Some([1, 2, 3, 4]), 1 << 32, 14)
    );
    header!(
        len64_top_bit,
        [0x82, 0x7F, 0x80, 0, 0, 0, 0, 0, 0, 0],
        0,
        Err(ProtocolError::InvalidLength)
    );
    header!(
        rsv1,
        [0xC1, 0x80, 0, 0, 0, 0],
        0,
        Err(ProtocolError::ReservedBits)
    );
    header!(
        rsv1_allowed,
        [0xC1, 0x80, 0, 0, 0, 0],
        0b100,
        (true, OpCode::Text, Some([0; 4]), 0, 6)
    );
    header!(rsv3, [0x91, 0x80], 0b100, Err(ProtocolError::ReservedBits));
    header!(
        opcode3,
        [0x83, 0x80],
        0,
        Err(ProtocolError::ReservedOpcode(3))
    );
    header!(
        opcode11,
        [0x8B, 0x80],
        0,
        Err(ProtocolError::ReservedOpcode(11))
    );
    header!(
        ping_fragmented,
        [0x09, 0x80],
        0,
        Err(ProtocolError::FragmentedControlFrame)
    );
    header!(
        ping_126,
        [0x89, 0xFE, 0, 126],
        0,
        Err(ProtocolError::ControlFrameTooLong)
    );
    header!(
        ping_125,
        [0x89, 0x7D],
        0,
        (true, OpCode::Ping, None, 125, 2)
    );
    header!(
        close_empty,
        [0x88, 0x80, 1, 1, 1, 1],
        0,
        (true, OpCode::Close, Some([1; 4]), 0, 6)
    );

    #[test]
    fn encode_roundtrip_all_sizes() {
        for len in [0usize, 1, 125, 126, 127, 65535, 65536, 1 << 20] {
            let mut out = [0u8; 10];
            let n = encode_header(&mut out, true, OpCode::Binary, len);
            let (h, hl) = parse_header(&out[..n], 0).unwrap().unwrap();
            assert_eq!(hl, n);
            assert_eq!(h.len, len as u64);
            assert!(h.fin);
            assert_eq!(h.mask, None);
        }
    }

    #[test]
    fn fast_mask_matches_bytewise_at_every_offset_and_length() {
        let mask = [0xA1, 0x02, 0xF3, 0x44];
        for len in 0..40 {
            for offset in 0..8 {
                let data: Vec<u8> = (0..len as u8).collect();
                let mut a = data.clone();
                let mut b = data.clone();
                apply_mask(&mut a, mask, offset);
                apply_mask_bytewise(&mut b, mask, offset);
                assert_eq!(a, b, "len {len} offset {offset}");
            }
        }
    }

    #[test]
    fn extend_masked_matches_bytewise() {
        let mask = [0xA1, 0x02, 0xF3, 0x44];
        for len in (0..40)
            .chain(250..270)
            .chain(505..520)
            .chain([4096, 65_537])
        {
            for offset in 0..9 {
                let data: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
                let mut expected = data.clone();
                apply_mask_bytewise(&mut expected, mask, offset);
                // Onto a buffer with no room (it grows), and onto one
                // whose spare capacity holds a marker, as a reused one
                // does: every byte must be written, none left as it was.
                let mut tight = vec![9u8; 3];
                tight.shrink_to_fit();
                let mut roomy = vec![0xEE; len + 40];
                roomy.truncate(3);
                roomy.fill(9);
                for mut got in [tight, roomy] {
                    let capacity = got.capacity();
                    extend_masked(&mut got, &data, mask, offset);
                    assert_eq!(got[..3], [9, 9, 9], "len {len} offset {offset}");
                    assert!(got[3..] == expected[..], "len {len} offset {offset}");
                    if capacity >= len + 3 {
                        assert_eq!(got.capacity(), capacity, "no growth when it fits");
                    }
                }
            }
        }
    }

    #[test]
    fn every_truncation_of_a_header_is_partial() {
        let full = [0x82, 0xFF, 0, 0, 0, 0, 0, 1, 0, 0, 1, 2, 3, 4];
        for cut in 0..full.len() {
            assert_eq!(parse_header(&full[..cut], 0), Ok(None), "cut {cut}");
        }
        assert!(parse_header(&full, 0).unwrap().is_some());
    }
}
