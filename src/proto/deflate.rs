//! permessage-deflate (RFC 7692): negotiating the extension, and
//! compressing and inflating one message at a time.
//!
//! By default neither side keeps a compression context between messages
//! (`server_no_context_takeover` and `client_no_context_takeover` in every
//! answer), so a connection holds no zlib state at all: each thread keeps
//! one compressor per window size and one inflater, reset after every
//! message. [`Compression::context_takeover`] trades memory (hundreds of
//! KiB per client) for better ratios on streams of similar messages.

use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use flate2::{Compress, Decompress, FlushCompress, FlushDecompress, Status};
use parking_lot::Mutex;

use crate::error::{DecodeError, ProtocolError};

/// The tail every compressed message leaves out (RFC 7692 section 7.2.1).
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// permessage-deflate settings for [`Builder::compression`](crate::Builder::compression).
///
/// ```
/// # use enjent::Compression;
/// let c = Compression::default().threshold(512).level(3);
/// assert_eq!((c.get_threshold(), c.get_level(), c.get_context_takeover()), (512, 3, false));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compression {
    context_takeover: bool,
    max_contexts: usize,
    threshold: usize,
    level: u8,
    skip_incompressible: bool,
}

impl Default for Compression {
    /// No context takeover, messages from 256 bytes compressed, level 6,
    /// incompressible messages sent plain.
    fn default() -> Self {
        Compression {
            context_takeover: false,
            max_contexts: 512,
            threshold: 256,
            level: 6,
            skip_incompressible: true,
        }
    }
}

impl Compression {
    /// Keep each connection's compression context between messages where
    /// the client allows it: better ratios for similar messages, at the
    /// cost of zlib's state per client (about 430 KB with 15-bit windows:
    /// 385 KB for a compressor and 41 KB for an inflater), made when the
    /// connection first compresses or inflates a message,
    /// and kept until it closes. At most
    /// [`max_contexts`](Compression::max_contexts) connections keep
    /// contexts at once. Default: off; every answer then asks both sides
    /// to reset after each message, and connections hold no zlib state.
    pub fn context_takeover(mut self, on: bool) -> Self {
        self.context_takeover = on;
        self
    }

    /// With [`context_takeover`](Compression::context_takeover), how many
    /// connections may keep contexts at once: a client that connects while
    /// this many do is answered as if context takeover were off (RFC 7692
    /// lets the server ask both sides to reset), and a place is free again
    /// when a connection that had one ends. This bounds the contexts' zlib
    /// state (about 430 KB each), which no other limit counts: a crowd of
    /// clients offering the extension would otherwise cost that much
    /// each. Default: 512 (at most about 220 MB).
    pub fn max_contexts(mut self, connections: usize) -> Self {
        self.max_contexts = connections;
        self
    }

    /// How many connections may keep contexts at once.
    pub fn get_max_contexts(&self) -> usize {
        self.max_contexts
    }

    /// Messages shorter than this many bytes are sent uncompressed.
    /// Without context takeover, each compressed message costs about 6 µs
    /// of CPU besides the compression itself, whatever its size (the reset
    /// of zlib's state after each).
    /// Default: 256.
    pub fn threshold(mut self, bytes: usize) -> Self {
        self.threshold = bytes;
        self
    }

    /// zlib level, 0 (store) to 9 (smallest); clamped to 9. Default: 6.
    pub fn level(mut self, level: u8) -> Self {
        self.level = level.min(9);
        self
    }

    /// Send a message plain when compressing it would not make it smaller
    /// (RFC 7692 lets every message choose). Default: on. Turn it off for
    /// peers that mishandle uncompressed messages on a compressed
    /// connection (the Autobahn runner `kosoku` 0.1.0 is one). Applies
    /// without context takeover; with it, every message over the
    /// threshold is compressed.
    pub fn skip_incompressible(mut self, on: bool) -> Self {
        self.skip_incompressible = on;
        self
    }

    /// Whether incompressible messages go plain.
    pub fn get_skip_incompressible(&self) -> bool {
        self.skip_incompressible
    }

    /// Whether contexts are kept between messages.
    pub fn get_context_takeover(&self) -> bool {
        self.context_takeover
    }

    /// The size threshold in bytes.
    pub fn get_threshold(&self) -> usize {
        self.threshold
    }

    /// The zlib level.
    pub fn get_level(&self) -> u8 {
        self.level
    }

    /// The most these settings can make a message of `len` bytes grow:
    /// nothing when a message that compression does not shrink goes out
    /// plain; else an eighth, and the blocks' headers. zlib sends each
    /// block the smallest of stored, fixed-Huffman and its own tree, and
    /// fixed Huffman takes at most nine bits a byte (a literal from 144
    /// up; a match takes less). Stored blocks, the usual answer to noise,
    /// add 5 B in 16 KiB or more, but they cannot be used with windows
    /// under 32 KiB, and level 1 (zlib's quick mode) writes fixed blocks
    /// only, so an eighth is what it comes to there.
    pub(crate) fn worst_growth(&self, len: usize) -> usize {
        growth(self.context_takeover || !self.skip_incompressible, len)
    }
}

/// See [`Compression::worst_growth`]; `may_grow`: whether a message that
/// compression does not shrink is sent compressed all the same.
fn growth(may_grow: bool, len: usize) -> usize {
    if may_grow {
        len / 8 + len / 4096 + 64
    } else {
        0
    }
}

/// The parameters both sides agreed on for one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Agreed {
    /// Our compressor starts afresh for every message.
    pub server_no_context_takeover: bool,
    /// The client's compressor starts afresh for every message.
    pub client_no_context_takeover: bool,
    /// Largest window our compressor may use, 8 to 15 bits. zlib cannot
    /// compress with a 256-byte window, so at 8 every message goes out
    /// uncompressed (allowed: compression is per message).
    pub server_max_window_bits: u8,
}

/// Parsed parameters of one offer.
#[derive(Default)]
struct Offer {
    server_no_context_takeover: bool,
    client_no_context_takeover: bool,
    server_max_window_bits: Option<u8>,
    client_max_window_bits: Option<Option<u8>>,
}

/// Pick the first permessage-deflate offer in `header` (the
/// `Sec-WebSocket-Extensions` values, comma-joined) that can be honoured.
/// Returns what was agreed and the response header's value, or `None` to
/// decline (no offer, or none valid).
///
/// ```
/// # use enjent::proto::deflate::negotiate;
/// # use enjent::Compression;
/// let (agreed, answer) = negotiate(
///     "permessage-deflate; client_max_window_bits, permessage-deflate",
///     &Compression::default(),
/// ).unwrap();
/// assert_eq!(answer, "permessage-deflate; server_no_context_takeover; client_no_context_takeover");
/// assert_eq!(agreed.server_max_window_bits, 15);
/// assert!(negotiate("permessage-deflate; x=1", &Compression::default()).is_none());
/// ```
pub fn negotiate(header: &str, config: &Compression) -> Option<(Agreed, String)> {
    for offer in split_outside_quotes(header, ',') {
        let mut parts = split_outside_quotes(offer, ';');
        let name = parts.next().unwrap_or("").trim();
        if !name.eq_ignore_ascii_case("permessage-deflate") {
            continue;
        }
        let Some(offer) = parse_offer(parts) else {
            continue;
        };
        let agreed = Agreed {
            server_no_context_takeover: offer.server_no_context_takeover
                || !config.context_takeover,
            // The server may ask for this even if the client did not offer
            // it (RFC 7692 section 7.1.1.2).
            client_no_context_takeover: offer.client_no_context_takeover
                || !config.context_takeover,
            server_max_window_bits: offer.server_max_window_bits.unwrap_or(15),
        };
        let mut answer = String::from("permessage-deflate");
        if agreed.server_no_context_takeover {
            answer.push_str("; server_no_context_takeover");
        }
        if agreed.client_no_context_takeover {
            answer.push_str("; client_no_context_takeover");
        }
        if let Some(bits) = offer.server_max_window_bits {
            answer.push_str(&format!("; server_max_window_bits={bits}"));
        }
        // `client_max_window_bits` needs no answer: every inflater here
        // uses the largest window, which reads any smaller one.
        let _ = offer.client_max_window_bits;
        return Some((agreed, answer));
    }
    None
}

/// Parameters of one offer; `None` if any is unknown, repeated or has an
/// invalid value (the offer is then declined).
fn parse_offer<'a>(params: impl Iterator<Item = &'a str>) -> Option<Offer> {
    let mut offer = Offer::default();
    for param in params {
        let (name, value) = match param.split_once('=') {
            Some((n, v)) => (n.trim(), Some(unquote(v.trim())?)),
            None => (param.trim(), None),
        };
        match name.to_ascii_lowercase().as_str() {
            "server_no_context_takeover" if value.is_none() => {
                if std::mem::replace(&mut offer.server_no_context_takeover, true) {
                    return None;
                }
            }
            "client_no_context_takeover" if value.is_none() => {
                if std::mem::replace(&mut offer.client_no_context_takeover, true) {
                    return None;
                }
            }
            "server_max_window_bits" => {
                let bits = window_bits(value?)?;
                if offer.server_max_window_bits.replace(bits).is_some() {
                    return None;
                }
            }
            "client_max_window_bits" => {
                let bits = match value {
                    Some(v) => Some(window_bits(v)?),
                    None => None,
                };
                if offer.client_max_window_bits.replace(bits).is_some() {
                    return None;
                }
            }
            _ => return None,
        }
    }
    Some(offer)
}

/// A window size: 8 to 15, decimal, no leading zero.
fn window_bits(v: &str) -> Option<u8> {
    if v.len() > 2 || v.starts_with('0') || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse().ok().filter(|b| (8..=15).contains(b))
}

fn unquote(v: &str) -> Option<&str> {
    match v.strip_prefix('"') {
        Some(rest) => rest.strip_suffix('"'),
        None => Some(v),
    }
}

/// Split on `sep` where it is not inside a quoted string.
fn split_outside_quotes(s: &str, sep: char) -> impl Iterator<Item = &str> {
    let mut rest = Some(s);
    std::iter::from_fn(move || {
        let s = rest?;
        let mut quoted = false;
        for (i, c) in s.char_indices() {
            match c {
                '"' => quoted = !quoted,
                c if c == sep && !quoted => {
                    rest = Some(&s[i + 1..]);
                    return Some(&s[..i]);
                }
                _ => {}
            }
        }
        rest = None;
        Some(s)
    })
}

thread_local! {
    /// One compressor per (window bits, level) this thread has needed.
    static COMPRESSORS: RefCell<Vec<(u8, u8, Compress)>> = const { RefCell::new(Vec::new()) };
    /// One inflater, reset before every message.
    static INFLATER: RefCell<Option<Decompress>> = const { RefCell::new(None) };
}

/// A place among the connections that may keep compression contexts
/// ([`Compression::max_contexts`]), given back when dropped.
#[derive(Debug)]
pub struct ContextPermit(Arc<AtomicUsize>);

impl ContextPermit {
    /// Take a place in `held` (the count of places taken), if fewer than
    /// `most` are.
    pub fn take(held: &Arc<AtomicUsize>, most: usize) -> Option<ContextPermit> {
        held.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < most).then_some(n + 1)
        })
        .ok()
        .map(|_| ContextPermit(Arc::clone(held)))
    }
}

impl Drop for ContextPermit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The window a stateless compressor uses for a client that allows at
/// most `bits`: 15, 12 or 9 (8: none). RFC 7692 only forbids a window
/// larger than the client's; three sizes keep each thread to three
/// stateless compressors (zlib's state is over 200 KiB whatever the
/// window) however many sizes clients ask for. A connection's own
/// compressor (context takeover) uses the client's size.
fn window_for(bits: u8) -> u8 {
    match bits {
        15.. => 15,
        12..=14 => 12,
        9..=11 => 9,
        _ => 8,
    }
}

/// The sending half of a connection's extension.
#[derive(Debug)]
pub struct Deflater {
    bits: u8,
    level: u8,
    threshold: usize,
    skip_incompressible: bool,
    /// Whether the client keeps its context: a fresh [`Inflater`] for
    /// this connection must then keep it too ([`Deflater::inflater`]).
    client_context: bool,
    /// Present only with context takeover: the connection's own
    /// compressor, made for the first message it compresses, and locked
    /// across compressing and queueing so the wire order is the
    /// compression order.
    context: Option<Box<Mutex<Option<Compress>>>>,
    /// The connection's place among those that keep contexts.
    permit: Option<ContextPermit>,
}

impl Deflater {
    /// The sending side for what was agreed.
    pub fn new(agreed: &Agreed, config: &Compression) -> Deflater {
        let bits = agreed.server_max_window_bits;
        let context =
            (!agreed.server_no_context_takeover && bits > 8).then(|| Box::new(Mutex::new(None)));
        Deflater {
            bits,
            level: config.level,
            threshold: config.threshold,
            skip_incompressible: config.skip_incompressible,
            client_context: !agreed.client_no_context_takeover,
            context,
            permit: None,
        }
    }

    /// Hold `permit` for as long as this connection lives (its contexts
    /// live as long), if it keeps a context either way; else let it go.
    pub fn hold(&mut self, permit: ContextPermit) {
        if self.context.is_some() || self.client_context {
            self.permit = Some(permit);
        }
    }

    /// A fresh receiving side for this connection: one that keeps the
    /// client's context if the client keeps it.
    pub fn inflater(&self) -> Inflater {
        Inflater {
            keeps: self.client_context,
            context: None,
        }
    }

    /// Whether a message of `len` bytes is to be compressed.
    pub fn wants(&self, len: usize) -> bool {
        len >= self.threshold && self.bits > 8
    }

    /// The most bytes a message of `len` bytes is sent as.
    pub fn worst_len(&self, len: usize) -> usize {
        if !self.wants(len) {
            return len;
        }
        let may_grow = self.context.is_some() || !self.skip_incompressible;
        len.saturating_add(growth(may_grow, len))
    }

    /// The window size, for sharing one compressed broadcast frame among
    /// the connections that agreed on the same one; `None` when this
    /// connection keeps a context and must compress on its own.
    pub fn shared_variant(&self) -> Option<u8> {
        self.context.is_none().then_some(window_for(self.bits))
    }

    /// Whether this connection keeps a compression context (then use
    /// [`compress_in_context`](Deflater::compress_in_context)).
    pub fn keeps_context(&self) -> bool {
        self.context.is_some()
    }

    /// Compress `payload` as one message with no context; `None` when that
    /// would not make it smaller and such messages are to go plain.
    pub fn compress_once(&self, payload: &[u8]) -> Option<Vec<u8>> {
        let z = compress_fresh(self.bits, self.level, payload);
        (z.len() < payload.len() || !self.skip_incompressible).then_some(z)
    }

    /// Compress `payload` with the connection's context and hand it to
    /// `send` while the context is still locked, so that messages reach
    /// the wire in the order they were compressed. If `send` fails, the
    /// context is reset: a receiver can always follow a fresh context,
    /// which never refers back to what it did not get. Without a context
    /// this compresses as [`compress_once`](Deflater::compress_once) does
    /// (always compressed).
    pub fn compress_in_context<R, E>(
        &self,
        payload: &[u8],
        send: impl FnOnce(Vec<u8>) -> Result<R, E>,
    ) -> Result<R, E> {
        match &self.context {
            None => send(compress_fresh(self.bits, self.level, payload)),
            Some(ctx) => {
                let mut c = ctx.lock();
                let c = c.get_or_insert_with(|| {
                    Compress::new_with_window_bits(
                        flate2::Compression::new(self.level.into()),
                        false,
                        self.bits,
                    )
                });
                let z = deflate(c, payload);
                let r = send(z);
                if r.is_err() {
                    c.reset();
                }
                r
            }
        }
    }
}

/// Compress one message with this thread's stateless compressor for
/// `bits` and `level`.
pub fn compress_fresh(bits: u8, level: u8, payload: &[u8]) -> Vec<u8> {
    let bits = window_for(bits);
    COMPRESSORS.with(|cell| {
        let mut all = cell.borrow_mut();
        let at = match all.iter().position(|(b, l, _)| *b == bits && *l == level) {
            Some(i) => i,
            None => {
                let c = Compress::new_with_window_bits(
                    flate2::Compression::new(level.into()),
                    false,
                    bits,
                );
                all.push((bits, level, c));
                all.len() - 1
            }
        };
        let c = &mut all[at].2;
        let z = deflate(c, payload);
        c.reset();
        z
    })
}

/// Deflate `payload` with a sync flush and strip the trailing empty block.
fn deflate(c: &mut Compress, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() / 2 + 64);
    let start_in = c.total_in();
    loop {
        let consumed = (c.total_in() - start_in) as usize;
        if out.len() == out.capacity() {
            out.reserve(out.capacity().max(64));
        }
        // Errors only on misuse (a finished stream), which never happens
        // here: every flush is a sync flush. Stop rather than spin if it
        // ever did.
        if c.compress_vec(&payload[consumed..], &mut out, FlushCompress::Sync)
            .is_err()
        {
            debug_assert!(false, "deflate failed");
            break;
        }
        let consumed = (c.total_in() - start_in) as usize;
        // Done once all input is in and the flush did not fill the buffer.
        if consumed == payload.len() && out.len() < out.capacity() {
            break;
        }
    }
    if out.ends_with(&TAIL) {
        out.truncate(out.len() - TAIL.len());
    }
    if out.is_empty() {
        // An empty message right after a sync flush: zlib writes nothing
        // for a second flush with no input, but the receiver appends the
        // tail to what we send, and the tail alone is half a stored block
        // header. One zero byte makes it an empty stored block (RFC 7692
        // section 7.2.3.6).
        out.push(0x00);
    }
    out
}

/// The receiving half: inflates compressed messages.
#[derive(Debug, Default)]
pub struct Inflater {
    /// Whether the client keeps its context between messages.
    keeps: bool,
    /// The client's context, made for its first compressed message.
    context: Option<Box<Decompress>>,
}

impl Inflater {
    /// The receiving side for what was agreed.
    pub fn new(agreed: &Agreed) -> Inflater {
        Inflater {
            keeps: !agreed.client_no_context_takeover,
            context: None,
        }
    }

    /// Whether it holds the client's context (state a fresh `Inflater`
    /// would not have).
    pub fn has_context(&self) -> bool {
        self.context.is_some()
    }

    /// Inflate one message's payload, failing with
    /// [`DecodeError::TooLarge`] as soon as the output passes `limit`
    /// (a small payload can expand a thousandfold).
    ///
    /// # Errors
    ///
    /// `TooLarge` over the limit, [`ProtocolError::BadCompression`] for
    /// data that is not deflate.
    pub fn inflate(&mut self, payload: &[u8], limit: usize) -> Result<Vec<u8>, DecodeError> {
        self.inflate_fragments(payload, limit, 1)
    }

    /// [`inflate`](Self::inflate) for a message that came in `fragments`
    /// frames: a sender may end a deflate stream in each, so that many
    /// more are allowed on top of what the payload's size allows (a few
    /// for each 64 bytes).
    ///
    /// # Errors
    ///
    /// As [`inflate`](Self::inflate).
    pub fn inflate_fragments(
        &mut self,
        payload: &[u8],
        limit: usize,
        fragments: u32,
    ) -> Result<Vec<u8>, DecodeError> {
        let streams = 2 + payload.len() / 64 + fragments as usize;
        if self.keeps && self.context.is_none() {
            self.context = Some(Box::new(Decompress::new_with_window_bits(false, 15)));
        }
        match &mut self.context {
            Some(d) => {
                let r = inflate(d, true, payload, limit, streams);
                if r.is_err() {
                    d.reset(false);
                }
                r
            }
            None => INFLATER.with(|cell| {
                let mut slot = cell.borrow_mut();
                let d = slot.get_or_insert_with(|| Decompress::new_with_window_bits(false, 15));
                let r = inflate(d, false, payload, limit, streams);
                d.reset(false);
                r
            }),
        }
    }
}

fn inflate(
    d: &mut Decompress,
    keep_window: bool,
    payload: &[u8],
    limit: usize,
    mut streams_left: usize,
) -> Result<Vec<u8>, DecodeError> {
    if payload.is_empty() {
        // Not what RFC 7692 has a sender write for an empty message (one
        // zero byte), but plainly one: the tail alone would leave a kept
        // context half-way through a stored block's header.
        return Ok(Vec::new());
    }
    let most = limit.saturating_add(1);
    let mut out: Vec<u8> = Vec::with_capacity(payload.len().saturating_mul(2).max(64).min(most));
    // Every final block ends a stream, and what follows starts another: a
    // reset, and with a context a window of up to 32 KiB copied back in.
    // Two bytes make a final block, so unbounded, a message of them buys
    // work out of all proportion to its size: both are held to a few
    // times the payload (`streams_left` allows one a fragment besides: a
    // sender ends a stream per message, or per fragment at most; each
    // fragment costs a frame, and `max_fragments` bounds them).
    let mut window_bytes_left = payload.len().saturating_mul(4).saturating_add(64 << 10);
    // The payload ended exactly where a deflate stream did (a sender that
    // ends each message with a final block and no empty block after it,
    // as zlib's `Z_FINISH` does): the message is complete, and the tail
    // would leave a fresh stream half-way through a block header.
    let mut ended_with_stream = false;
    // What the payload alone inflated to.
    let mut before_tail = 0;
    // A sender that left the tail on (RFC 7692 has it removed) ended with
    // a whole empty stored block: nothing to append. (What a sender that
    // removed it ends with cannot end in `0xff`: its last byte holds the
    // empty block's header bits, all zero, and zero padding.)
    let tail: &[u8] = if payload.ends_with(&TAIL) { &[] } else { &TAIL };
    for (i, input) in [payload, tail].into_iter().enumerate() {
        if i == 1 && ended_with_stream {
            break;
        }
        before_tail = out.len();
        let mut pos = 0;
        loop {
            if out.len() == out.capacity() {
                // Grow by doubling, but never past one byte over the limit.
                let room = most.saturating_sub(out.len()).min(out.len().max(64));
                out.reserve_exact(room.max(1));
            }
            let (in_before, out_before) = (d.total_in(), out.len());
            let status = d
                .decompress_vec(&input[pos..], &mut out, FlushDecompress::Sync)
                .map_err(|_| ProtocolError::BadCompression)?;
            let took = (d.total_in() - in_before) as usize;
            pos += took;
            if out.len() > limit {
                return Err(DecodeError::TooLarge {
                    size: out.len() as u64,
                    limit: limit as u64,
                });
            }
            if status == Status::StreamEnd {
                // A block with BFINAL set ends one deflate stream; what
                // follows starts another (RFC 7692 section 7.2.3.4). With
                // a context, the new stream may refer back to what came
                // before: the message's own output stands in for the
                // window (earlier messages are not kept).
                streams_left = streams_left
                    .checked_sub(1)
                    .ok_or(ProtocolError::TooManyDeflateStreams)?;
                ended_with_stream = i == 0 && pos == input.len();
                d.reset(false);
                if keep_window && !out.is_empty() {
                    let window = &out[out.len().saturating_sub(32 << 10)..];
                    window_bytes_left = window_bytes_left
                        .checked_sub(window.len())
                        .ok_or(ProtocolError::TooManyDeflateStreams)?;
                    d.set_dictionary(window)
                        .map_err(|_| ProtocolError::BadCompression)?;
                }
                continue;
            }
            if pos == input.len() && out.len() < out.capacity() {
                break;
            }
            if took == 0 && out.len() == out_before && out.len() < out.capacity() {
                return Err(ProtocolError::BadCompression.into());
            }
        }
    }
    // What RFC 7692 has a sender write ends with the header of an empty
    // stored block, whose length fields (the tail) it removed: the tail
    // completes that block, adds nothing, and leaves the inflater between
    // blocks. A payload cut short, or corrupt, leaves it inside a block
    // instead, where the tail and what came before pass for data: the
    // message would carry bytes the peer never sent (a stored block's
    // cut leaves the tail itself as the last four), or end early (a cut
    // in a block's header). Refused, as data that does not inflate: the
    // tail must add nothing, and then what `between_blocks` feeds must be
    // taken as empty blocks. Only data made to pass that could, and such
    // a sender could as well have sent what it inflates to.
    if !ended_with_stream && (out.len() != before_tail || !between_blocks(d, keep_window)) {
        return Err(ProtocolError::BadCompression.into());
    }
    Ok(out)
}

/// Empty stored blocks, not final, each `00 00 00 ff ff`: 2,560 bits,
/// more than the longest dynamic block header (about 2,290).
const EMPTY_STORED_RUN: [u8; 320] = {
    let mut run = [0u8; 320];
    let mut i = 0;
    while i < 64 {
        run[i * 5 + 3] = 0xff;
        run[i * 5 + 4] = 0xff;
        i += 1;
    }
    run
};

/// An empty final block (fixed codes, just the end-of-block code).
const EMPTY_FINAL: [u8; 2] = [0x03, 0x00];

/// Whether the inflater is between deflate blocks. Without a context
/// (the inflater is reset after each message) it is fed an empty final
/// block: between blocks that ends the stream at once, adding nothing;
/// inside a block its 16 bits are data (which comes out), codes, or part
/// of a header (no header is that short; the tail's 32 bits before it
/// may, rarely, have ended one), and the stream does not end
/// there. A context must not end its stream (what came before would be
/// lost): it is fed a run of empty stored blocks that are not final,
/// which between blocks are taken whole and add nothing (the window is
/// unchanged), and inside a block are data, codes, more header bits than
/// any header has, or an error. The run costs about 0.4 µs, the final
/// block next to nothing.
fn between_blocks(d: &mut Decompress, keep_window: bool) -> bool {
    let (probe, ends): (&[u8], Status) = if keep_window {
        (&EMPTY_STORED_RUN, Status::Ok)
    } else {
        (&EMPTY_FINAL, Status::StreamEnd)
    };
    let (in_before, out_before) = (d.total_in(), d.total_out());
    let mut spill = [0u8; 64];
    matches!(d.decompress(probe, &mut spill, FlushDecompress::Sync), Ok(s) if s == ends)
        && d.total_in() - in_before == probe.len() as u64
        && d.total_out() == out_before
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the hard limit's margin assumes: no message grows by more
    /// than `worst_growth`, at any level and window, fresh or in a
    /// context, for bytes that compress worst at level 1 (144 to 255,
    /// nine bits each as fixed-Huffman literals) and for noise.
    #[test]
    fn no_message_grows_past_worst_growth() {
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let worst: Vec<u8> = (0..300_000).map(|_| 144 + (next() % 112) as u8).collect();
        let noise: Vec<u8> = (0..300_000).map(|_| next() as u8).collect();
        // Worst bytes with three-byte matches far back (the longest
        // distance codes) mixed in.
        let mut far = worst.clone();
        for k in 40_000..far.len() {
            if k % 7 < 3 {
                far[k] = far[k - 32_000 + (k % 7)];
            }
        }
        for level in 0..=9 {
            let config = Compression::default().context_takeover(true).level(level);
            for bits in 9..=15 {
                let agreed = Agreed {
                    server_no_context_takeover: false,
                    client_no_context_takeover: false,
                    server_max_window_bits: bits,
                };
                let d = Deflater::new(&agreed, &config);
                for data in [&worst, &noise, &far] {
                    for len in [0, 1, 300, 70_000, 300_000] {
                        let bound = len + config.worst_growth(len);
                        let fresh = compress_fresh(bits, level, &data[..len]).len();
                        assert!(
                            fresh <= bound,
                            "level {level}, {bits} bits, {len} B: {fresh}"
                        );
                        // Twice in one context: the second refers back.
                        for _ in 0..2 {
                            let z = d
                                .compress_in_context(&data[..len], |z| Ok::<_, ()>(z.len()))
                                .unwrap();
                            assert!(z <= bound, "level {level}, {bits} bits, {len} B: {z}");
                        }
                    }
                }
            }
        }
        // Sent plain when compressing does not pay: no growth to allow for.
        assert_eq!(Compression::default().level(1).worst_growth(1 << 20), 0);
    }

    fn agreed(header: &str) -> Option<(Agreed, String)> {
        negotiate(header, &Compression::default())
    }

    #[test]
    fn offers_accepted_and_answered() {
        let (a, r) = agreed("permessage-deflate").unwrap();
        assert_eq!(
            r,
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
        );
        assert_eq!(a.server_max_window_bits, 15);
        let (a, r) = agreed("permessage-deflate; server_max_window_bits=9").unwrap();
        assert_eq!(a.server_max_window_bits, 9);
        assert!(r.ends_with("; server_max_window_bits=9"), "{r}");
        let (a, _) = agreed("permessage-deflate; server_max_window_bits=\"10\"").unwrap();
        assert_eq!(a.server_max_window_bits, 10);
        assert!(agreed("permessage-deflate; client_max_window_bits=12").is_some());
        assert!(agreed("PerMessage-Deflate ; Client_Max_Window_Bits").is_some());
    }

    #[test]
    fn invalid_offers_are_declined_and_the_next_one_taken() {
        for bad in [
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; server_max_window_bits=7",
            "permessage-deflate; server_max_window_bits=16",
            "permessage-deflate; server_max_window_bits=09",
            "permessage-deflate; server_max_window_bits=1a",
            "permessage-deflate; client_max_window_bits=0",
            "permessage-deflate; server_no_context_takeover=1",
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            "permessage-deflate; unknown",
            "x-webkit-deflate-frame",
            "",
        ] {
            assert!(agreed(bad).is_none(), "{bad}");
        }
        let (a, _) = agreed(
            "permessage-deflate; server_max_window_bits=99, permessage-deflate; server_max_window_bits=12",
        )
        .unwrap();
        assert_eq!(a.server_max_window_bits, 12);
    }

    #[test]
    fn context_takeover_only_when_configured_and_allowed() {
        let keep = Compression::default().context_takeover(true);
        let (a, r) = negotiate("permessage-deflate", &keep).unwrap();
        assert!(!a.server_no_context_takeover && !a.client_no_context_takeover);
        assert_eq!(r, "permessage-deflate");
        let (a, r) = negotiate("permessage-deflate; server_no_context_takeover", &keep).unwrap();
        assert!(a.server_no_context_takeover && !a.client_no_context_takeover);
        assert_eq!(r, "permessage-deflate; server_no_context_takeover");
    }

    #[test]
    fn roundtrip_with_and_without_context() {
        let text = "the quick brown fox jumps over the lazy dog ".repeat(50);
        for bits in 9..=15 {
            let z = compress_fresh(bits, 6, text.as_bytes());
            assert!(z.len() < text.len() / 5, "{bits}: {}", z.len());
            let back = Inflater::default().inflate(&z, 1 << 20).unwrap();
            assert_eq!(back, text.as_bytes());
        }
        // With a context, the second message refers back to the first.
        let a = Agreed {
            server_no_context_takeover: false,
            client_no_context_takeover: false,
            server_max_window_bits: 15,
        };
        let d = Deflater::new(&a, &Compression::default().context_takeover(true));
        let mut i = Inflater::new(&a);
        let mut sizes = Vec::new();
        assert!(d.keeps_context());
        for _ in 0..2 {
            d.compress_in_context(text.as_bytes(), |z| {
                sizes.push(z.len());
                assert_eq!(i.inflate(&z, 1 << 20).unwrap(), text.as_bytes());
                Ok::<(), ()>(())
            })
            .unwrap();
        }
        assert!(sizes[1] < sizes[0], "{sizes:?}");
    }

    #[test]
    fn inflating_is_bounded_by_the_limit() {
        let zeros = vec![0u8; 10 << 20];
        let z = compress_fresh(15, 9, &zeros);
        assert!(z.len() < 20_000, "{}", z.len());
        match Inflater::default().inflate(&z, 1 << 20) {
            Err(DecodeError::TooLarge { size, limit }) => {
                assert_eq!(limit, 1 << 20);
                assert_eq!(size, limit + 1);
            }
            other => panic!("{:?}", other.map(|v| v.len())),
        }
        // Exactly at the limit is fine.
        let z = compress_fresh(15, 9, &zeros[..1 << 20]);
        assert_eq!(
            Inflater::default().inflate(&z, 1 << 20).unwrap().len(),
            1 << 20
        );
    }

    /// The examples of RFC 7692 section 7.2.3, all "Hello".
    #[test]
    fn rfc_7692_examples() {
        let hello = b"Hello".to_vec();
        let fresh = |bytes: &[u8]| Inflater::default().inflate(bytes, 1 << 20);
        // 7.2.3.1: one compressed block.
        assert_eq!(
            fresh(&[0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00]),
            Ok(hello.clone())
        );
        // 7.2.3.3: a stored (uncompressed) block.
        let stored = [
            0x00, 0x05, 0x00, 0xfa, 0xff, 0x48, 0x65, 0x6c, 0x6c, 0x6f, 0x00,
        ];
        assert_eq!(fresh(&stored), Ok(hello.clone()));
        // 7.2.3.4: a final block, then the start of the empty one.
        let bfinal = [0xf3, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00, 0x00];
        assert_eq!(fresh(&bfinal), Ok(hello.clone()));
        // 7.2.3.5: two blocks in one message.
        let two = [
            0xf2, 0x48, 0x05, 0x00, 0x00, 0x00, 0xff, 0xff, 0xca, 0xc9, 0xc9, 0x07, 0x00,
        ];
        assert_eq!(fresh(&two), Ok(hello.clone()));
        // 7.2.3.2: with a context, the second message refers to the first,
        // also when the first ended with a final block.
        let kept = Agreed {
            server_no_context_takeover: true,
            client_no_context_takeover: false,
            server_max_window_bits: 15,
        };
        for first in [&[0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00][..], &bfinal] {
            let mut i = Inflater::new(&kept);
            assert_eq!(i.inflate(first, 1 << 20), Ok(hello.clone()));
            assert_eq!(
                i.inflate(&[0xf2, 0x00, 0x11, 0x00, 0x00], 1 << 20),
                Ok(hello.clone())
            );
        }
    }

    /// Was a bug: an empty message after a compressed one, in one
    /// context, went out as an empty payload (zlib writes nothing for a
    /// second sync flush with no input), which left the receiver half-way
    /// through a stored block's header, so the next message failed.
    #[test]
    fn an_empty_message_in_a_context_is_an_empty_stored_block() {
        let a = Agreed {
            server_no_context_takeover: false,
            client_no_context_takeover: false,
            server_max_window_bits: 15,
        };
        let d = Deflater::new(
            &a,
            &Compression::default().context_takeover(true).threshold(0),
        );
        let mut i = Inflater::new(&a);
        let text = "some text to compress, some text to compress ".repeat(20);
        for message in [text.as_str(), "", "", text.as_str(), ""] {
            d.compress_in_context(message.as_bytes(), |z| {
                assert!(
                    !z.is_empty(),
                    "an empty payload for {} bytes",
                    message.len()
                );
                assert_eq!(i.inflate(&z, 1 << 20).unwrap(), message.as_bytes());
                Ok::<(), ()>(())
            })
            .unwrap();
        }
    }

    /// Was a bug: a message ending exactly where its deflate stream ends
    /// (zlib's `Z_FINISH`, no empty block after the final one) had the tail
    /// fed to a fresh stream, which a context kept half-way through a
    /// block header: the next message was refused.
    #[test]
    fn messages_ended_by_a_final_block_keep_a_context_usable() {
        let kept = Agreed {
            server_no_context_takeover: true,
            client_no_context_takeover: false,
            server_max_window_bits: 15,
        };
        let text = "ended with a final block, no empty block after it ".repeat(40);
        let finished = |bytes: &[u8]| {
            let mut c = Compress::new(flate2::Compression::default(), false);
            let mut v = Vec::with_capacity(bytes.len() + 64);
            c.compress_vec(bytes, &mut v, FlushCompress::Finish)
                .unwrap();
            v
        };
        for mut i in [Inflater::new(&kept), Inflater::default()] {
            for _ in 0..3 {
                let z = finished(text.as_bytes());
                assert_eq!(i.inflate(&z, 1 << 20).unwrap(), text.as_bytes());
            }
            // And the usual form still works after them.
            let z = compress_fresh(15, 6, text.as_bytes());
            assert_eq!(i.inflate(&z, 1 << 20).unwrap(), text.as_bytes());
        }
    }

    /// Several streams in one message, each ended with a final block:
    /// without a context nothing is copied back between them, so the
    /// copy-back allowance cannot refuse it (a version of the D2 fix did).
    /// And an empty payload is an empty message that leaves a context
    /// as it was.
    #[test]
    fn several_finished_streams_and_empty_payloads_are_accepted() {
        let text = "several finished streams in one message, ".repeat(600);
        let mut payload = Vec::new();
        for _ in 0..4 {
            let mut c = Compress::new(flate2::Compression::default(), false);
            let mut v = Vec::with_capacity(text.len() + 64);
            c.compress_vec(text.as_bytes(), &mut v, FlushCompress::Finish)
                .unwrap();
            payload.extend_from_slice(&v);
        }
        let back = Inflater::default().inflate(&payload, 1 << 20).unwrap();
        assert_eq!(back, text.repeat(4).as_bytes());
        let kept = Agreed {
            server_no_context_takeover: true,
            client_no_context_takeover: false,
            server_max_window_bits: 15,
        };
        let mut i = Inflater::new(&kept);
        let mut c = Compress::new(flate2::Compression::default(), false);
        let mut sync = |data: &[u8]| {
            let mut v = Vec::with_capacity(data.len() + 64);
            c.compress_vec(data, &mut v, FlushCompress::Sync).unwrap();
            v.truncate(v.len() - 4);
            v
        };
        let first = sync(text.as_bytes());
        assert_eq!(i.inflate(&first, 1 << 20).unwrap(), text.as_bytes());
        assert_eq!(i.inflate(&[], 1 << 20).unwrap(), b"");
        let again = sync(text.as_bytes());
        assert_eq!(i.inflate(&again, 1 << 20).unwrap(), text.as_bytes());
    }

    #[test]
    fn extreme_limits_do_not_panic() {
        let z = compress_fresh(15, 6, &[7u8; 1000]);
        assert_eq!(
            Inflater::default().inflate(&z, usize::MAX).unwrap().len(),
            1000
        );
        assert!(matches!(
            Inflater::default().inflate(&z, 1),
            Err(DecodeError::TooLarge { size: 2, limit: 1 })
        ));
        assert!(Inflater::default().inflate(&z, 0).is_err());
    }

    /// Was a bug (found by a review): a payload cut short inside a block
    /// inflated to whatever the tail completed: part of the message,
    /// bytes never sent, or a stored block's data with the tail itself at
    /// its end. Every cut is refused now, or (where the cut bytes only
    /// held what the tail puts back) inflates to the whole message.
    #[test]
    fn a_payload_cut_short_is_refused_not_delivered_in_part() {
        let text = "The quick brown fox jumps over the lazy dog. ".repeat(40);
        let noise: Vec<u8> = (0..3000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let kept = Agreed {
            server_no_context_takeover: true,
            client_no_context_takeover: false,
            server_max_window_bits: 15,
        };
        let mut refused = 0;
        for (message, level) in [
            (text.as_bytes(), 6),
            (text.as_bytes(), 1),
            (&noise[..], 6),
            (&noise[..], 0),
        ] {
            let z = compress_fresh(15, level, message);
            assert_eq!(Inflater::default().inflate(&z, 1 << 20).unwrap(), message);
            for cut in 1..z.len().min(80) {
                let short = &z[..z.len() - cut];
                for mut i in [Inflater::default(), Inflater::new(&kept)] {
                    match i.inflate(short, 1 << 20) {
                        Err(DecodeError::Protocol(ProtocolError::BadCompression)) => refused += 1,
                        Ok(back) => assert!(
                            back == message,
                            "cut {cut} at level {level}: {} bytes delivered of {}",
                            back.len(),
                            message.len()
                        ),
                        Err(e) => panic!("cut {cut}: {e:?}"),
                    }
                }
            }
        }
        assert!(refused > 200, "{refused}");
        // A stored block announcing 100 bytes, 10 of them sent.
        let mut stored = vec![0x00, 100, 0x00, !100u8, 0xff];
        stored.extend_from_slice(&[b'A'; 10]);
        for mut i in [Inflater::default(), Inflater::new(&kept)] {
            assert_eq!(
                i.inflate(&stored, 1 << 20),
                Err(DecodeError::Protocol(ProtocolError::BadCompression))
            );
        }
        // A context that refused a message still inflates whole ones.
        let mut i = Inflater::new(&kept);
        let z = compress_fresh(15, 6, text.as_bytes());
        assert!(i.inflate(&z[..z.len() - 7], 1 << 20).is_err());
        assert_eq!(i.inflate(&z, 1 << 20).unwrap(), text.as_bytes());
    }

    /// A cut in a dynamic block's header, where the tail and one empty
    /// block after it were read as more header bits (a review of the first
    /// version of the check found a message cut there delivered as what
    /// the blocks before it held): a message of several blocks, each
    /// ended by a sync flush at a known place, cut at every byte of the
    /// 300 after each.
    #[test]
    fn a_payload_cut_in_a_block_header_is_refused() {
        let kept = Agreed {
            server_no_context_takeover: true,
            client_no_context_takeover: false,
            server_max_window_bits: 15,
        };
        let mut c = Compress::new(flate2::Compression::new(6), false);
        let (mut z, mut ends, mut message) = (Vec::new(), Vec::new(), Vec::new());
        // Letters in no pattern deflate finds: dynamic blocks of mostly
        // literals, each a few KiB.
        let alphabet = b"abcdefghij klmnop, qrst.\n";
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..5 {
            let part: Vec<u8> = (0..6000)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    alphabet[(x % alphabet.len() as u64) as usize]
                })
                .collect();
            let mut v = Vec::with_capacity(part.len() + 64);
            c.compress_vec(&part, &mut v, FlushCompress::Sync).unwrap();
            z.extend_from_slice(&v);
            ends.push(z.len());
            message.extend_from_slice(&part);
        }
        z.truncate(z.len() - 4);
        let mut fresh = Inflater::default();
        assert_eq!(fresh.inflate(&z, 1 << 20).unwrap(), message);
        let mut refused = 0;
        for w in ends.windows(2) {
            let (end, next) = (w[0], w[1]);
            assert!(next - end > 1000, "a block of {} bytes", next - end);
            for cut in end + 1..end + 300 {
                for mut i in [Inflater::default(), Inflater::new(&kept)] {
                    match i.inflate(&z[..cut], 1 << 20) {
                        Err(_) => refused += 1,
                        Ok(back) => panic!(
                            "cut at {cut} (a block starts at {end}, context {}): {} bytes delivered",
                            i.has_context(),
                            back.len()
                        ),
                    }
                }
            }
        }
        assert_eq!(refused, 2 * 4 * 299);
    }

    /// A sender that leaves the tail on (against RFC 7692, which has it
    /// removed) sent a whole empty stored block at the end: inflated as
    /// sent, without a second tail after it, with or without a context.
    #[test]
    fn a_payload_with_its_tail_left_on_is_inflated() {
        let text = "left on the tail ".repeat(30);
        let kept = Agreed {
            server_no_context_takeover: true,
            client_no_context_takeover: false,
            server_max_window_bits: 15,
        };
        let mut c = Compress::new(flate2::Compression::default(), false);
        let mut i = Inflater::new(&kept);
        for k in 0..3 {
            let mut v = Vec::with_capacity(text.len() + 64);
            c.compress_vec(text.as_bytes(), &mut v, FlushCompress::Sync)
                .unwrap();
            assert!(v.ends_with(&TAIL));
            assert_eq!(i.inflate(&v, 1 << 20).unwrap(), text.as_bytes());
            if k == 0 {
                // Later ones refer back to it: only a context reads them.
                let fresh = Inflater::default().inflate(&v, 1 << 20);
                assert_eq!(fresh.unwrap(), text.as_bytes());
            }
        }
    }

    #[test]
    fn garbage_is_refused_and_the_inflater_recovers() {
        let mut i = Inflater::default();
        assert_eq!(
            i.inflate(&[0xff, 0xff, 0xff, 0xff, 0x00], 1 << 20),
            Err(DecodeError::Protocol(ProtocolError::BadCompression))
        );
        let z = compress_fresh(15, 6, b"hello hello hello");
        assert_eq!(i.inflate(&z, 1 << 20).unwrap(), b"hello hello hello");
    }

    #[test]
    fn incompressible_payloads_go_plain() {
        let a = agreed("permessage-deflate").unwrap().0;
        let d = Deflater::new(&a, &Compression::default());
        let mut x = 0x1234_5678u32;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        assert!(!d.keeps_context());
        assert!(d.compress_once(&noise).is_none());
        assert!(!d.wants(255) && d.wants(256));
    }
}
