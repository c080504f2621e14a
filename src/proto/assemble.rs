//! Streaming decoder: raw bytes in, complete messages and control frames out.
//!
//! Payload bytes are unmasked straight into the message being assembled, so
//! a frame never has to sit whole in a buffer before it is processed, and
//! text is checked for UTF-8 as each chunk arrives: an invalid byte fails
//! the message at once, not when its last fragment comes in.

use crate::error::{DecodeError, ProtocolError};
use crate::message::{CloseCode, CloseFrame, Message};
use crate::proto::frame::{MAX_HEADER_LEN, OpCode, extend_masked, parse_header};

/// Most bytes a payload buffer kept for reuse may hold (see
/// [`recycle_payload`]).
const SPARE_PAYLOAD: usize = 256;
/// What glibc's allocator takes for `bytes`: a header word, rounded up to
/// 16-byte steps, 32 at least.
pub(crate) const fn heap_step(bytes: usize) -> usize {
    let step = (bytes + 8 + 15) & !15;
    if step < 32 { 32 } else { step }
}

thread_local! {
    /// A small payload's buffer whose bytes were copied into a client's
    /// queue on this thread (a reply's, a pong's, or a `Vec` of the user's
    /// gathered there) or written out by it, kept for the next message
    /// this thread decodes: an
    /// echo of small messages would otherwise allocate and free one a
    /// message (about 100 instructions of glibc's). Taken only by a
    /// message for which a new buffer would take as much memory (see
    /// [`payload_buffer`]). One a thread, at most [`SPARE_PAYLOAD`] bytes,
    /// counted nowhere. `None` on a thread that never decoded (a main
    /// loop's, which sends the workers' messages): what it gives back
    /// goes to the decoders by way of [`SHELF`].
    static SPARE: std::cell::Cell<Option<Vec<u8>>> = const { std::cell::Cell::new(None) };

    /// Small payload buffers beyond the spare: those given back on a
    /// thread that does not decode (a main loop's, or any user thread that
    /// sends), or displaced from a decoding thread's spare, until they
    /// make a group for the shelf; and a group taken from the shelf, until
    /// used (or let go of, if none fits). Fewer than [`SHELF_GROUP`] when
    /// a call ends (about 4 KiB of heap), counted nowhere.
    static LOOSE: std::cell::RefCell<Vec<Vec<u8>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Loose buffers a thread hands to the shelf at once.
const SHELF_GROUP: usize = 16;
/// Groups the shelf holds at most: 64 buffers of at most 256 B. The shelf
/// is the process's, shared by its servers, and outlives them.
const SHELF_GROUPS: usize = 4;

/// Payload buffers given back on a thread that does not decode, or beyond
/// a worker's spare, in groups, for the threads that decode (see
/// [`crate::shelf`]): one lock a group.
static SHELF: crate::shelf::Shelf<Vec<Vec<u8>>> = crate::shelf::Shelf::process_wide(SHELF_GROUPS);

/// Keep `buf` for this thread's next message, its bytes no longer needed,
/// if it is small: as its spare if this thread decodes, else for the
/// shelf.
pub(crate) fn recycle_payload(mut buf: Vec<u8>) {
    if buf.capacity() == 0 || buf.capacity() > SPARE_PAYLOAD {
        return;
    }
    buf.clear();
    // `try_with`: a send may come from another thread-local's destructor
    // after this one is gone (the buffer is then simply dropped).
    let _ = SPARE.try_with(|spare| {
        // On a decoding thread, the spare it displaces (none if a message
        // took it); elsewhere, the buffer itself.
        let loose = match spare.take() {
            Some(older) => {
                spare.set(Some(buf));
                older
            }
            None => buf,
        };
        if loose.capacity() > 0 {
            keep_loose(loose);
        }
    });
}

/// Keep `buf` with this thread's loose buffers; a full set goes to the
/// shelf as a group. So the decoders get back what a thread that does
/// not decode gives back, and what a worker that writes more than it
/// decodes does (a main loop's larger replies are written by whichever
/// worker flushes them).
#[cold]
fn keep_loose(buf: Vec<u8>) {
    let _ = LOOSE.try_with(|loose| {
        let mut loose = loose.borrow_mut();
        loose.push(buf);
        if loose.len() >= SHELF_GROUP {
            let fresh = Vec::with_capacity(SHELF_GROUP);
            let group = std::mem::replace(&mut *loose, fresh);
            debug_assert!(group.len() <= SHELF_GROUP);
            SHELF.put(group);
        }
    });
}

/// An empty buffer for a payload of `n` bytes: this thread's spare, or
/// one of a group from the shelf, if it holds `n` and takes no more memory
/// than a new one would (the same allocator step), else a new one. So a
/// message kept by the user (or in the main loop's channel) holds what it
/// held before buffers were reused.
fn payload_buffer(n: usize) -> Vec<u8> {
    if n > 0 && n <= SPARE_PAYLOAD {
        let spare = SPARE.try_with(|spare| {
            // From now on this thread keeps a buffer given back.
            match spare.replace(Some(Vec::new())) {
                Some(v) if fits(&v, n) => Some(v),
                other => {
                    spare.set(other.or(Some(Vec::new())));
                    None
                }
            }
        });
        if let Ok(Some(v)) = spare {
            return v;
        }
        if let Some(v) = loose_buffer(n) {
            return v;
        }
    }
    Vec::with_capacity(n)
}

/// Whether a buffer given back may take a payload of `n` bytes.
fn fits(v: &Vec<u8>, n: usize) -> bool {
    v.capacity() >= n && heap_step(v.capacity()) == heap_step(n)
}

/// One of this thread's loose buffers that fits `n`, taking a group from
/// the shelf if it has none left. If none fits, all are let go: they are
/// of other sizes than this thread decodes (a main loop's replies larger
/// than its requests), and kept they would be looked through again at
/// every message, or go back to the shelf for another decoder to look
/// through. (Apart, so that the spare's path stays as short as it was.)
#[cold]
fn loose_buffer(n: usize) -> Option<Vec<u8>> {
    LOOSE
        .try_with(|loose| {
            let mut loose = loose.borrow_mut();
            if loose.is_empty()
                && let Some(group) = SHELF.take()
            {
                *loose = group;
            }
            match loose.iter().rposition(|v| fits(v, n)) {
                Some(at) => Some(loose.swap_remove(at)),
                None => {
                    loose.clear();
                    None
                }
            }
        })
        .ok()
        .flatten()
}

/// Size limits the decoder enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest message, all fragments together, in bytes.
    pub max_message_size: usize,
    /// Largest single frame payload, in bytes.
    pub max_frame_size: usize,
    /// Most frames one message may be split into.
    pub max_fragments: u32,
}

/// The most a message of `n` bytes may take compressed: deflate's worst
/// case (stored blocks, for data that does not compress) with room to
/// spare for other compressors' block sizes.
pub(crate) fn compressed_bound(n: usize) -> usize {
    n.saturating_add(n >> 3)
        .saturating_add(n >> 6)
        .saturating_add(16)
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_size: 1 << 20,
            max_frame_size: 1 << 20,
            max_fragments: 1024,
        }
    }
}

/// What the decoder produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// A complete data message.
    Message(Message),
    /// A ping with its payload.
    Ping(Vec<u8>),
    /// A pong with its payload.
    Pong(Vec<u8>),
    /// A close frame; `None` if it carried no status code.
    Close(Option<CloseFrame>),
}

#[derive(Debug)]
enum State {
    /// Collecting a header; `have` bytes of it are in `buf`.
    Header { buf: [u8; MAX_HEADER_LEN], have: u8 },
    /// Copying a payload.
    Payload {
        opcode: OpCode,
        fin: bool,
        mask: [u8; 4],
        /// Bytes of this payload still to come.
        remaining: u64,
        /// Bytes of this payload already seen (for the mask phase).
        done: u64,
    },
}

/// A data message in the middle of being assembled.
#[derive(Debug)]
struct Partial {
    text: bool,
    /// RSV1 was set on the first frame: the payload is deflated.
    compressed: bool,
    buf: Vec<u8>,
    /// `buf[..utf8_ok]` is known to be valid UTF-8 (text only).
    utf8_ok: usize,
    frames: u32,
}

/// The read side of one connection.
///
/// Feed it bytes with [`Decoder::decode`] until it returns `Ok(None)`.
///
/// ```
/// # use enjent::proto::assemble::{Decoder, Incoming, Limits};
/// # use enjent::Message;
/// let mut d = Decoder::new(Limits::default());
/// // "Hi" masked with key [1, 2, 3, 4], split over two reads.
/// let wire = [0x81, 0x82, 1, 2, 3, 4, b'H' ^ 1, b'i' ^ 2];
/// let mut first = &wire[..5];
/// assert_eq!(d.decode(&mut first), Ok(None));
/// let mut rest = &wire[5..];
/// assert_eq!(d.decode(&mut rest), Ok(Some(Incoming::Message(Message::Text("Hi".into())))));
/// ```
#[derive(Debug)]
pub struct Decoder {
    limits: Limits,
    state: State,
    msg: Option<Partial>,
    /// Payload of a control frame that arrived in pieces.
    control: Vec<u8>,
    require_mask: bool,
    /// RSV bits an extension claims (RSV1 with permessage-deflate).
    allowed_rsv: u8,
    #[cfg(feature = "deflate")]
    inflater: Option<crate::proto::deflate::Inflater>,
}

impl Decoder {
    /// A decoder for client-to-server traffic: every frame must be masked.
    pub fn new(limits: Limits) -> Decoder {
        Decoder {
            limits,
            state: State::Header {
                buf: [0; MAX_HEADER_LEN],
                have: 0,
            },
            msg: None,
            control: Vec::new(),
            require_mask: true,
            allowed_rsv: 0,
            #[cfg(feature = "deflate")]
            inflater: None,
        }
    }

    /// Accept compressed messages (RSV1 set on their first frame), as
    /// permessage-deflate was negotiated.
    #[cfg(feature = "deflate")]
    pub fn set_inflater(&mut self, inflater: crate::proto::deflate::Inflater) {
        self.inflater = Some(inflater);
        self.allowed_rsv = RSV1;
    }

    /// Forget any unfinished frame or message, releasing its memory.
    pub fn reset(&mut self) {
        self.state = State::Header {
            buf: [0; MAX_HEADER_LEN],
            have: 0,
        };
        self.msg = None;
        self.control = Vec::new();
    }

    /// Whether the decoder holds nothing a fresh one would not: no
    /// unfinished frame, message or control payload, and no compression
    /// state kept between messages. Such a decoder can be dropped between
    /// messages and made again with [`Decoder::new`], the same limits and
    /// (if it had one) a fresh `Inflater` made as the first was (for a
    /// client that keeps its context, one that keeps it too:
    /// `Deflater::inflater`), since an inflater that will keep a context
    /// holds none until its first message.
    pub fn is_at_rest(&self) -> bool {
        #[cfg(feature = "deflate")]
        if self
            .inflater
            .as_ref()
            .is_some_and(crate::proto::deflate::Inflater::has_context)
        {
            return false;
        }
        !self.is_mid_message() && self.control.is_empty()
    }

    /// Whether the next byte starts a frame (a message may be unfinished:
    /// a control frame may come between its fragments).
    pub fn at_frame_start(&self) -> bool {
        matches!(self.state, State::Header { have: 0, .. })
    }

    /// Bytes still to come of a control frame begun (at least one while
    /// its header is not all there); `None` between frames, or in a data
    /// frame.
    pub fn control_frame_left(&self) -> Option<usize> {
        match &self.state {
            State::Header { buf, have } if *have > 0 && buf[0] & 0x08 != 0 => {
                let have = usize::from(*have);
                if have < 2 {
                    return Some(1);
                }
                let mask = if buf[1] & 0x80 != 0 { 4 } else { 0 };
                let len = usize::from(buf[1] & 0x7f);
                Some((2 + mask + len).saturating_sub(have).max(1))
            }
            State::Payload {
                opcode, remaining, ..
            } if opcode.is_control() => Some(usize::try_from(*remaining).unwrap_or(usize::MAX)),
            _ => None,
        }
    }

    /// Whether bytes of an unfinished frame or message are held.
    pub fn is_mid_message(&self) -> bool {
        self.msg.is_some() || !matches!(self.state, State::Header { have: 0, .. })
    }

    /// Bytes received and held for an unfinished message (never what a
    /// header announced: memory is reserved as bytes arrive, so a header
    /// alone costs nothing). The buffer they are in grows by doubling, so
    /// it may be up to twice as large; a finished message gives the excess
    /// back (`fit`).
    pub fn buffered(&self) -> usize {
        self.msg.as_ref().map_or(0, |m| m.buf.len()) + self.control.len()
    }

    /// Consume bytes from the front of `input` until one item is complete
    /// (returned) or `input` is empty (`Ok(None)`).
    ///
    /// # Errors
    ///
    /// The rule the bytes broke; after an error the decoder must not be fed
    /// again.
    pub fn decode(&mut self, input: &mut &[u8]) -> Result<Option<Incoming>, DecodeError> {
        loop {
            match &mut self.state {
                State::Header { buf, have } => {
                    if input.is_empty() {
                        return Ok(None);
                    }
                    let have_n = usize::from(*have);
                    // Fast path: a whole header at the front of the input.
                    let parsed = if have_n == 0 {
                        parse_header(input, self.allowed_rsv)?.map(|(h, n)| {
                            *input = &input[n..];
                            h
                        })
                    } else {
                        None
                    };
                    let header = match parsed {
                        Some(h) => h,
                        None => {
                            let take = (MAX_HEADER_LEN - have_n).min(input.len());
                            buf[have_n..have_n + take].copy_from_slice(&input[..take]);
                            match parse_header(&buf[..have_n + take], self.allowed_rsv)? {
                                Some((h, n)) => {
                                    *input = &input[n - have_n..];
                                    h
                                }
                                None => {
                                    *have = (have_n + take) as u8;
                                    *input = &input[take..];
                                    return Ok(None);
                                }
                            }
                        }
                    };
                    let mask = match header.mask {
                        Some(m) => m,
                        None if self.require_mask => {
                            return Err(ProtocolError::UnmaskedFrame.into());
                        }
                        None => [0; 4],
                    };
                    let compressed = header.rsv & RSV1 != 0;
                    if compressed
                        && (header.opcode.is_control() || header.opcode == OpCode::Continuation)
                    {
                        return Err(ProtocolError::CompressedControlOrContinuation.into());
                    }
                    // Fast path: a whole data frame that is a whole
                    // message (no fragment, no compression) at the front
                    // of the input, within the limits, is made into its
                    // message at once, as the path below would make it.
                    if have_n == 0
                        && header.fin
                        && !compressed
                        && self.msg.is_none()
                        && matches!(header.opcode, OpCode::Text | OpCode::Binary)
                        && header.len <= input.len() as u64
                        && header.len <= self.limits.max_frame_size as u64
                        && header.len <= self.limits.max_message_size as u64
                    {
                        // The conditions above repeat `start_frame`'s rules
                        // for a first frame. In debug builds (the tests) a
                        // frame taken here must also pass `start_frame`
                        // itself, so that a rule added there and not here
                        // fails the tests of that rule instead of being
                        // skipped by whole frames.
                        #[cfg(debug_assertions)]
                        {
                            let judged = self.start_frame(header.opcode, header.len, compressed);
                            assert!(
                                judged.is_ok(),
                                "the fast path took a frame start_frame refuses: {judged:?}"
                            );
                            self.msg = None;
                        }
                        let n = header.len as usize;
                        let mut buf = payload_buffer(n);
                        extend_masked(&mut buf, &input[..n], mask, 0);
                        *input = &input[n..];
                        let message = if header.opcode == OpCode::Text {
                            Message::Text(
                                String::from_utf8(buf).map_err(|_| ProtocolError::InvalidUtf8)?,
                            )
                        } else {
                            Message::Binary(buf)
                        };
                        return Ok(Some(Incoming::Message(message)));
                    }
                    self.start_frame(header.opcode, header.len, compressed)?;
                    self.state = State::Payload {
                        opcode: header.opcode,
                        fin: header.fin,
                        mask,
                        remaining: header.len,
                        done: 0,
                    };
                }
                State::Payload {
                    opcode,
                    fin,
                    mask,
                    remaining,
                    done,
                } => {
                    let (opcode, fin, mask) = (*opcode, *fin, *mask);
                    let take = (*remaining).min(input.len() as u64) as usize;
                    let offset = (*done & 3) as usize;
                    *remaining -= take as u64;
                    *done += take as u64;
                    let last_chunk = *remaining == 0;
                    let chunk = &input[..take];
                    *input = &input[take..];
                    if opcode.is_control() {
                        extend_masked(&mut self.control, chunk, mask, offset);
                    } else {
                        // start_frame guarantees a partial message exists.
                        let Some(msg) = self.msg.as_mut() else {
                            return Err(ProtocolError::UnexpectedContinuation.into());
                        };
                        if msg.frames == 1 {
                            // Later frames grow it as `Vec` does: sized to
                            // each frame's end, a message of many small
                            // frames would be copied whole at each one.
                            reserve_piece(&mut msg.buf, chunk.len(), *remaining);
                        }
                        extend_masked(&mut msg.buf, chunk, mask, offset);
                        // A text message that completes here is validated
                        // once, below; otherwise check what we have so far.
                        if msg.text && !msg.compressed && !(fin && last_chunk) {
                            check_utf8_prefix(msg)?;
                        }
                    }
                    if !last_chunk {
                        return Ok(None);
                    }
                    self.state = State::Header {
                        buf: [0; MAX_HEADER_LEN],
                        have: 0,
                    };
                    if let Some(item) = self.finish_frame(opcode, fin)? {
                        return Ok(Some(item));
                    }
                }
            }
        }
    }

    /// Check a new frame against the message in progress and the limits.
    fn start_frame(
        &mut self,
        opcode: OpCode,
        len: u64,
        compressed: bool,
    ) -> Result<(), DecodeError> {
        if opcode.is_control() {
            return Ok(());
        }
        // The limits are on what a message is: a compressed one may take
        // a little more on the wire (incompressible data grows), and its
        // inflated size is held to the message limit as it inflates.
        // A frame out of sequence is a protocol error (1002) whatever its
        // size: judged before the limits (1009).
        match (opcode, self.msg.is_some()) {
            (OpCode::Continuation, false) => {
                return Err(ProtocolError::UnexpectedContinuation.into());
            }
            (OpCode::Text | OpCode::Binary, true) => {
                return Err(ProtocolError::ExpectedContinuation.into());
            }
            _ => {}
        }
        let compressed = compressed || self.msg.as_ref().is_some_and(|m| m.compressed);
        let on_wire = |n: usize| if compressed { compressed_bound(n) } else { n } as u64;
        let frame_limit = on_wire(self.limits.max_frame_size);
        if len > frame_limit {
            return Err(DecodeError::TooLarge {
                size: len,
                limit: frame_limit,
            });
        }
        let limit = on_wire(self.limits.max_message_size);
        match (opcode, self.msg.as_mut()) {
            (OpCode::Continuation, None) => Err(ProtocolError::UnexpectedContinuation.into()),
            (OpCode::Continuation, Some(msg)) => {
                msg.frames += 1;
                if msg.frames > self.limits.max_fragments {
                    return Err(ProtocolError::TooManyFragments.into());
                }
                let size = msg.buf.len() as u64 + len;
                if size > limit {
                    return Err(DecodeError::TooLarge { size, limit });
                }
                Ok(())
            }
            (_, Some(_)) => Err(ProtocolError::ExpectedContinuation.into()),
            (op, None) => {
                if len > limit {
                    return Err(DecodeError::TooLarge { size: len, limit });
                }
                self.msg = Some(Partial {
                    text: op == OpCode::Text,
                    compressed,
                    // Grown as bytes arrive (by at most twice what came),
                    // never from the header's word alone.
                    buf: Vec::new(),
                    utf8_ok: 0,
                    frames: 1,
                });
                Ok(())
            }
        }
    }

    /// A frame's payload is complete: produce what it finishes, if anything.
    fn finish_frame(&mut self, opcode: OpCode, fin: bool) -> Result<Option<Incoming>, DecodeError> {
        match opcode {
            OpCode::Ping => Ok(Some(Incoming::Ping(std::mem::take(&mut self.control)))),
            OpCode::Pong => Ok(Some(Incoming::Pong(std::mem::take(&mut self.control)))),
            OpCode::Close => {
                let payload = std::mem::take(&mut self.control);
                parse_close(&payload).map(|c| Some(Incoming::Close(c)))
            }
            _ if !fin => Ok(None),
            _ => {
                let Some(mut msg) = self.msg.take() else {
                    return Err(ProtocolError::UnexpectedContinuation.into());
                };
                if msg.compressed {
                    msg.buf = self.inflate(&msg.buf, msg.frames)?;
                }
                fit(&mut msg.buf);
                if msg.text {
                    // Fragmented text is validated twice (incrementally, to
                    // fail fast, then here): a String made from the checked
                    // bytes without a second pass would need `unsafe`
                    // (`from_utf8_unchecked`), resting the string's
                    // validity on the incremental check being right. The
                    // cost is one extra pass over fragmented text only.
                    String::from_utf8(msg.buf)
                        .map(|s| Some(Incoming::Message(Message::Text(s))))
                        .map_err(|_| ProtocolError::InvalidUtf8.into())
                } else {
                    Ok(Some(Incoming::Message(Message::Binary(msg.buf))))
                }
            }
        }
    }
}

/// RSV1 in a header's `rsv` field: the permessage-deflate bit.
const RSV1: u8 = 0b100;

impl Decoder {
    #[cfg(feature = "deflate")]
    fn inflate(&mut self, payload: &[u8], frames: u32) -> Result<Vec<u8>, DecodeError> {
        match self.inflater.as_mut() {
            Some(i) => i.inflate_fragments(payload, self.limits.max_message_size, frames),
            None => Err(ProtocolError::ReservedBits.into()),
        }
    }

    /// Without the feature RSV1 is never allowed, so nothing is
    /// compressed.
    #[cfg(not(feature = "deflate"))]
    fn inflate(&mut self, _payload: &[u8], _frames: u32) -> Result<Vec<u8>, DecodeError> {
        Err(ProtocolError::ReservedBits.into())
    }
}

/// Room for `piece` more bytes of a frame that will have `after` bytes
/// still to come: grown by doubling, as `Vec` grows, but never past the
/// frame's end, so that a frame read in pieces ends in a buffer of its
/// size. Its header's word only bounds the growth and never sets it: at
/// most twice what has come is reserved.
fn reserve_piece(buf: &mut Vec<u8>, piece: usize, after: u64) {
    let need = buf.len().saturating_add(piece);
    if need <= buf.capacity() {
        return;
    }
    let doubled = buf.capacity().saturating_mul(2).max(need);
    let frame_end = need.saturating_add(usize::try_from(after).unwrap_or(usize::MAX));
    buf.reserve_exact(doubled.min(frame_end) - buf.len());
}

/// Give back what a finished message's buffer holds beyond its length,
/// where that is much: it grew by doubling as its bytes came (or as it
/// inflated), up to twice its length, and what holds it from here (the
/// event channel, whose budget counts a message's length; the user) would
/// hold the rest with it. A small excess is kept (no reallocation for a
/// message whose buffer was sized to it, the common case); a small
/// message left in a large buffer (one inflated from padding, say) is
/// shrunk too, since the channel charges it little more than its length.
fn fit(buf: &mut Vec<u8>) {
    if buf.capacity() - buf.len() > buf.len() / 8 + 64 {
        buf.shrink_to_fit();
    }
}

/// Advance `msg.utf8_ok` over newly added bytes, failing on the first
/// invalid sequence. An incomplete sequence at the end is left for later.
fn check_utf8_prefix(msg: &mut Partial) -> Result<(), DecodeError> {
    match std::str::from_utf8(&msg.buf[msg.utf8_ok..]) {
        Ok(_) => {
            msg.utf8_ok = msg.buf.len();
            Ok(())
        }
        Err(e) if e.error_len().is_some() => Err(ProtocolError::InvalidUtf8.into()),
        Err(e) => {
            msg.utf8_ok += e.valid_up_to();
            Ok(())
        }
    }
}

/// Parse a close frame's payload (RFC 6455 section 5.5.1).
pub fn parse_close(payload: &[u8]) -> Result<Option<CloseFrame>, DecodeError> {
    match payload {
        [] => Ok(None),
        [_] => Err(ProtocolError::InvalidClosePayload.into()),
        [hi, lo, reason @ ..] => {
            let code = CloseCode::new(u16::from_be_bytes([*hi, *lo]));
            if !code.is_sendable() {
                return Err(ProtocolError::InvalidCloseCode(code.as_u16()).into());
            }
            let reason = std::str::from_utf8(reason).map_err(|_| ProtocolError::InvalidUtf8)?;
            Ok(Some(CloseFrame::new(code, reason)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::runtime::testing::client_frame as frame;

    /// Decode everything, returning items and the first error.
    fn run(d: &mut Decoder, mut input: &[u8]) -> (Vec<Incoming>, Option<DecodeError>) {
        let mut items = Vec::new();
        loop {
            match d.decode(&mut input) {
                Ok(Some(i)) => items.push(i),
                Ok(None) => return (items, None),
                Err(e) => return (items, Some(e)),
            }
        }
    }

    fn decode_all(input: &[u8]) -> (Vec<Incoming>, Option<DecodeError>) {
        run(&mut Decoder::new(Limits::default()), input)
    }

    fn text(s: &str) -> Incoming {
        Incoming::Message(Message::Text(s.into()))
    }

    /// Whole frames at the front of the input take a fast path; split
    /// anywhere they take the general one. Both give the same items, the
    /// same first error and buffers of the same size, for streams of
    /// valid and broken frames alike, at the limits and past them.
    #[test]
    fn whole_frames_decode_as_frames_in_pieces_do() {
        // The frame limit below the message limit, and above it.
        for limits in [(200, 150), (100, 150)].map(|(message, frame)| Limits {
            max_message_size: message,
            max_frame_size: frame,
            max_fragments: 3,
        }) {
            decodes_whole_as_in_pieces(limits);
        }
    }

    fn decodes_whole_as_in_pieces(limits: Limits) {
        let big = [b'a'; 200];
        let streams: Vec<Vec<Vec<u8>>> = vec![
            vec![
                frame(0x81, b"hi"),
                frame(0x82, &[0, 1, 2]),
                frame(0x82, b""),
            ],
            vec![
                frame(0x81, b""),
                frame(0x89, b"p"),
                frame(0x81, &big[..150]),
            ],
            // Over the frame limit, and over it by one.
            vec![frame(0x82, &big[..151])],
            vec![frame(0x82, &big[..150]), frame(0x81, &[0xff])],
            // Invalid UTF-8, whole and after a valid message.
            vec![frame(0x81, &[0xc3])],
            vec![frame(0x81, b"ok"), frame(0x81, &[b'a', 0xed, 0xa0, 0x80])],
            // A data frame while a fragmented message is in progress.
            vec![frame(0x01, b"ab"), frame(0x82, b"c")],
            vec![frame(0x01, b"ab"), frame(0x89, b""), frame(0x80, b"cd")],
            // Fragments over the message limit, and too many of them.
            vec![frame(0x02, &big[..150]), frame(0x80, &big[..51])],
            vec![
                frame(0x02, b"a"),
                frame(0x00, b"b"),
                frame(0x00, b"c"),
                frame(0x80, b"d"),
            ],
            // Reserved bits, a reserved opcode, an unmasked frame.
            vec![frame(0xc1, b"x")],
            vec![frame(0x83, b"x")],
            vec![vec![0x81, 0x01, b'x']],
            // A close, and a continuation with nothing to continue.
            vec![frame(0x88, &[0x03, 0xe8]), frame(0x81, b"after")],
            vec![frame(0x80, b"x")],
        ];
        let decode = |wire: &[u8], split: Option<usize>| {
            let mut d = Decoder::new(limits);
            let (mut items, mut err) = match split {
                Some(at) => run(&mut d, &wire[..at]),
                None => run(&mut d, wire),
            };
            if let (Some(at), None) = (split, &err) {
                let (more, e) = run(&mut d, &wire[at..]);
                items.extend(more);
                err = e;
            }
            let capacities: Vec<usize> = items
                .iter()
                .map(|i| match i {
                    Incoming::Message(Message::Text(s)) => s.capacity(),
                    Incoming::Message(Message::Binary(b)) => b.capacity(),
                    _ => 0,
                })
                .collect();
            (items, err, capacities)
        };
        for stream in &streams {
            let wire = stream.concat();
            let whole = decode(&wire, None);
            for at in 0..=wire.len() {
                assert_eq!(decode(&wire, Some(at)), whole, "{wire:02x?} split at {at}");
            }
            // A byte at a time: never a whole frame at the front.
            let mut d = Decoder::new(limits);
            let (mut items, mut err) = (Vec::new(), None);
            for b in wire.chunks(1) {
                let (more, e) = run(&mut d, b);
                items.extend(more);
                if e.is_some() {
                    err = e;
                    break;
                }
            }
            assert_eq!(
                (&items, &err),
                (&whole.0, &whole.1),
                "{wire:02x?} a byte at a time"
            );
        }
    }

    /// Decode one whole frame (the path that takes a spare buffer) and
    /// return its message's bytes.
    fn one(first: u8, payload: &[u8]) -> Vec<u8> {
        let mut d = Decoder::new(Limits::default());
        let wire = frame(first, payload);
        let (items, err) = run(&mut d, &wire);
        assert_eq!(err, None);
        match items.into_iter().next() {
            Some(Incoming::Message(m)) => m.into_bytes(),
            other => panic!("{other:?}"),
        }
    }

    /// A small buffer recycled is taken by the next message that a new
    /// buffer would hold in as much memory, holds that message's bytes
    /// only, and otherwise stays for a later one; a large one is not kept.
    /// On a thread that never decoded nothing is kept as the spare.
    #[test]
    fn a_recycled_buffer_serves_only_a_message_it_fits_closely() {
        SPARE.take();
        recycle_payload(vec![9; 40]);
        assert!(
            SPARE.take().is_none(),
            "kept as the spare on a thread that never decoded"
        );
        LOOSE.with(|l| l.borrow_mut().clear());
        let first = one(0x82, &[1; 40]);
        let (ptr, cap) = (first.as_ptr(), first.capacity());
        assert_eq!((cap, heap_step(cap)), (40, 48));
        recycle_payload(first);
        // Taken by a message in the same step, 15 B shorter.
        let again = one(0x81, &[b'a'; 25]);
        assert_eq!(again.as_ptr(), ptr, "the spare was not taken");
        assert_eq!(again, [b'a'; 25]);
        recycle_payload(again);
        // Not by one longer than it holds, nor one a smaller step holds:
        // those are allocated.
        let longer = one(0x82, &[2; 41]);
        assert_ne!(longer.as_ptr(), ptr);
        let shorter = one(0x82, &[3; 24]);
        assert_ne!(shorter.as_ptr(), ptr);
        assert_eq!(shorter.capacity(), shorter.len());
        // Nor by an empty message (which allocates nothing).
        assert_eq!(one(0x82, b"").capacity(), 0);
        // It waited for one that fits.
        let fits = one(0x82, &[4; 33]);
        assert_eq!(fits.as_ptr(), ptr);
        assert_eq!(fits, vec![4; 33]);
        // A large buffer, or one with none, is not kept; nor does either
        // displace the one kept.
        recycle_payload(fits);
        recycle_payload(Vec::with_capacity(SPARE_PAYLOAD + 1));
        recycle_payload(Vec::new());
        let kept = SPARE.take().unwrap();
        assert_eq!(kept.capacity(), 40);
        SPARE.set(Some(kept));
        recycle_payload(Vec::with_capacity(SPARE_PAYLOAD));
        assert_eq!(SPARE.take().unwrap().capacity(), SPARE_PAYLOAD);
    }

    /// On a thread that never decoded, small buffers given back gather
    /// in groups of 16 for the shelf. A
    /// thread that decodes and whose spare does not serve takes a buffer
    /// from its group that fits, as the spare's rule says, or, if none
    /// does, lets them all go and makes a new one; a spare displaced joins
    /// its loose buffers.
    #[test]
    fn buffers_given_back_where_nothing_decodes_go_to_the_decoders_in_groups() {
        std::thread::spawn(|| {
            for _ in 0..SHELF_GROUP - 1 {
                recycle_payload(Vec::with_capacity(40));
            }
            assert!(SPARE.take().is_none(), "a spare where nothing decodes");
            assert_eq!(LOOSE.with(|l| l.borrow().len()), SHELF_GROUP - 1);
            recycle_payload(Vec::with_capacity(40));
            LOOSE.with(|l| {
                let l = l.borrow();
                assert!(l.is_empty(), "a group of 16 not put on the shelf");
                assert_eq!(l.capacity(), SHELF_GROUP, "no room kept for the next");
            });
        })
        .join()
        .unwrap();
        std::thread::spawn(|| {
            let fits = Vec::<u8>::with_capacity(40);
            let ptr = fits.as_ptr();
            LOOSE.with(|l| *l.borrow_mut() = vec![fits, Vec::with_capacity(200)]);
            let first = one(0x82, &[6; 40]);
            assert_eq!(
                first.as_ptr(),
                ptr,
                "a buffer of the group that fits not taken"
            );
            assert_eq!(first, [6; 40]);
            // The other is of another allocator step than 40 bytes take:
            // let go, and a new buffer made.
            let second = one(0x82, &[7; 40]);
            assert_eq!(second.capacity(), 40, "a buffer of another step taken");
            assert_eq!(second, [7; 40]);
            LOOSE.with(|l| assert!(l.borrow().is_empty(), "a buffer that fits none kept"));
            // A spare displaced by a buffer given back joins the loose ones.
            recycle_payload(first);
            recycle_payload(second);
            LOOSE.with(|l| {
                let l = l.borrow();
                assert_eq!(l.len(), 1);
                assert_eq!(l[0].as_ptr(), ptr, "the displaced spare not kept");
            });
            // A full set none of which fits is let go whole: the list never
            // holds more than a group.
            LOOSE.with(|l| {
                *l.borrow_mut() = (0..SHELF_GROUP).map(|_| Vec::with_capacity(200)).collect();
            });
            SPARE.set(Some(Vec::new()));
            assert_eq!(one(0x82, &[8; 40]), [8; 40]);
            LOOSE.with(|l| assert!(l.borrow().is_empty()));
        })
        .join()
        .unwrap();
    }

    /// Recycling and decoding from a thread-local's destructor after the
    /// spare's own is gone do without it (`with` would panic there, and a
    /// panic in a destructor aborts the process).
    #[test]
    fn recycling_after_the_spare_is_gone_does_without_it() {
        struct Late;
        impl Drop for Late {
            fn drop(&mut self) {
                // Else this test would not test what it is named for.
                assert!(SPARE.try_with(|_| ()).is_err(), "the spare is still there");
                recycle_payload(vec![1; 10]);
                assert_eq!(one(0x82, &[5; 10]), [5; 10]);
            }
        }
        thread_local! {
            static LATE: std::cell::RefCell<Option<Late>> = const { std::cell::RefCell::new(None) };
        }
        std::thread::spawn(|| {
            // Registered first, so destroyed after the spare.
            LATE.with(|l| *l.borrow_mut() = Some(Late));
            recycle_payload(vec![1; 10]);
            assert_eq!(one(0x82, &[5; 10]), [5; 10]);
        })
        .join()
        .unwrap();
    }

    /// What is left of a control frame begun, byte by byte: what a look
    /// at a starved connection takes (`service::look_for_the_end`).
    #[test]
    fn a_control_frame_begun_says_what_is_left_of_it() {
        for (first, payload) in [(0x88, &b"\x03\xe8bye"[..]), (0x89, b""), (0x8a, &[7; 125])] {
            let wire = frame(first, payload);
            let mut d = Decoder::new(Limits::default());
            assert_eq!(d.control_frame_left(), None, "between frames");
            for i in 0..wire.len() {
                let left = d.control_frame_left();
                if i > 0 {
                    let left = left.expect("in the frame");
                    assert!(
                        left >= 1 && left <= wire.len() - i,
                        "{first:x} at {i}: {left}"
                    );
                    if i >= 6 {
                        assert_eq!(left, wire.len() - i, "{first:x} at {i}");
                    }
                }
                let (items, err) = run(&mut d, &wire[i..=i]);
                assert_eq!(err, None);
                assert_eq!(items.len(), usize::from(i + 1 == wire.len()));
            }
            assert_eq!(d.control_frame_left(), None, "after it");
        }
        // A message's frame begun is none of it.
        let mut d = Decoder::new(Limits::default());
        let wire = frame(0x82, &[1, 2, 3]);
        run(&mut d, &wire[..1]);
        assert_eq!(d.control_frame_left(), None);
        run(&mut d, &wire[1..7]);
        assert_eq!(d.control_frame_left(), None);
    }

    /// What is reserved for a frame is at most about twice what of it has
    /// come, whatever its header announced: a header alone costs nothing.
    #[test]
    fn a_frames_header_alone_reserves_nothing() {
        let limits = Limits {
            max_message_size: 1 << 20,
            max_frame_size: 1 << 20,
            ..Limits::default()
        };
        let wire = frame(0x82, &vec![7u8; 1 << 20]);
        let mut d = Decoder::new(limits);
        // The header (14 bytes), then 10 bytes of the payload, then
        // pieces of growing size.
        let mut at = 14;
        let (_, err) = run(&mut d, &wire[..at]);
        assert_eq!(err, None);
        assert_eq!(d.msg.as_ref().map_or(0, |m| m.buf.capacity()), 0);
        for piece in [10usize, 100, 1000, 10_000, 100_000] {
            let (_, err) = run(&mut d, &wire[at..at + piece]);
            assert_eq!(err, None);
            at += piece;
            let m = d.msg.as_ref().expect("mid-message");
            assert!(
                m.buf.capacity() <= 2 * m.buf.len(),
                "{} reserved for {} received",
                m.buf.capacity(),
                m.buf.len()
            );
        }
    }

    /// A message of two frames, the second growing the buffer the first
    /// filled: fitted when finished.
    #[test]
    fn a_fragmented_message_is_fitted_when_finished() {
        for (first, second) in [(36_000usize, 4_000usize), (1_170, 1)] {
            let len = first + second;
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let mut wire = frame(0x02, &payload[..first]);
            wire.extend(frame(0x80, &payload[first..]));
            let mut d = Decoder::new(Limits::default());
            expect_fitted(&mut d, &wire, &payload);
        }
    }

    /// Feed `wire` to `d`: it must finish one binary message, `payload`,
    /// in a buffer little larger than it.
    fn expect_fitted(d: &mut Decoder, wire: &[u8], payload: &[u8]) {
        let (items, err) = run(d, wire);
        assert_eq!(err, None);
        let [Incoming::Message(Message::Binary(got))] = &items[..] else {
            panic!("{items:?}");
        };
        assert_eq!(got, payload);
        let len = payload.len();
        assert!(
            got.capacity() <= len + len / 8 + 64,
            "{len}: capacity {}",
            got.capacity()
        );
    }

    /// A frame whose bytes came in pieces grows its buffer by doubling,
    /// up to the frame's end: finished, the message holds little more
    /// than its length (the event channel's budget counts its length).
    #[test]
    fn a_message_that_came_in_pieces_is_fitted_when_finished() {
        for (len, first) in [(40_000usize, 36_000usize), (70_000, 69_998), (5_000, 4_000)] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let wire = frame(0x82, &payload);
            let cut = wire.len() - (len - first);
            let mut d = Decoder::new(Limits::default());
            let (items, err) = run(&mut d, &wire[..cut]);
            assert!(items.is_empty() && err.is_none());
            let (items, err) = run(&mut d, &wire[cut..cut + 1]);
            assert!(items.is_empty() && err.is_none());
            assert_eq!(d.buffered(), first + 1);
            // Doubled, but not past the frame's end.
            let held = d.msg.as_ref().map_or(0, |m| m.buf.capacity());
            assert!(held <= len, "{len}: {held} reserved mid-frame");
            expect_fitted(&mut d, &wire[cut + 1..], &payload);
            assert_eq!(d.buffered(), 0);
        }
    }

    #[test]
    fn single_text_and_binary() {
        let mut wire = frame(0x81, b"hello");
        wire.extend(frame(0x82, &[0, 1, 2]));
        let (items, err) = decode_all(&wire);
        assert_eq!(err, None);
        assert_eq!(
            items,
            vec![
                text("hello"),
                Incoming::Message(Message::Binary(vec![0, 1, 2]))
            ]
        );
    }

    #[test]
    fn byte_by_byte_equals_all_at_once() {
        let payload: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
        let mut wire = frame(0x02, &payload[..1000]);
        wire.extend(frame(0x89, b"ping!"));
        wire.extend(frame(0x80, &payload[1000..]));
        wire.extend(frame(0x81, "ünïcödé".as_bytes()));
        let (whole, err) = decode_all(&wire);
        assert_eq!(err, None);
        let mut d = Decoder::new(Limits::default());
        let mut pieces = Vec::new();
        for b in &wire {
            let (items, err) = run(&mut d, std::slice::from_ref(b));
            assert_eq!(err, None);
            pieces.extend(items);
        }
        assert_eq!(whole, pieces);
        assert_eq!(
            whole,
            vec![
                Incoming::Ping(b"ping!".to_vec()),
                Incoming::Message(Message::Binary(payload)),
                text("ünïcödé"),
            ]
        );
    }

    #[test]
    fn fragmented_text_with_interleaved_control() {
        let mut wire = frame(0x01, b"fra");
        wire.extend(frame(0x8A, b"pong"));
        wire.extend(frame(0x00, b"gmen"));
        wire.extend(frame(0x80, b"ted"));
        let (items, err) = decode_all(&wire);
        assert_eq!(err, None);
        assert_eq!(
            items,
            vec![Incoming::Pong(b"pong".to_vec()), text("fragmented")]
        );
    }

    #[test]
    fn empty_fragments_and_messages() {
        let mut wire = frame(0x01, b"");
        wire.extend(frame(0x00, b""));
        wire.extend(frame(0x80, b""));
        wire.extend(frame(0x82, b""));
        let (items, err) = decode_all(&wire);
        assert_eq!(err, None);
        assert_eq!(
            items,
            vec![text(""), Incoming::Message(Message::Binary(vec![]))]
        );
    }

    #[test]
    fn sequence_errors() {
        let (_, err) = decode_all(&frame(0x80, b"x"));
        assert_eq!(err, Some(ProtocolError::UnexpectedContinuation.into()));
        let mut wire = frame(0x01, b"a");
        wire.extend(frame(0x81, b"b"));
        let (_, err) = decode_all(&wire);
        assert_eq!(err, Some(ProtocolError::ExpectedContinuation.into()));
    }

    #[test]
    fn a_frame_out_of_sequence_is_a_protocol_error_whatever_its_size() {
        // Headers alone: a continuation that announces 2 MiB with no
        // message begun, and a new text frame of 2 MiB inside a message.
        // Both are 1002, not the 1009 their size alone would earn.
        let header = |first: u8| {
            let mut h = vec![first, 0x80 | 127];
            h.extend((2u64 << 20).to_be_bytes());
            h.extend([1, 2, 3, 4]);
            h
        };
        let (_, err) = decode_all(&header(0x80));
        assert_eq!(err, Some(ProtocolError::UnexpectedContinuation.into()));
        let mut wire = frame(0x01, b"a");
        wire.extend(header(0x81));
        let (_, err) = decode_all(&wire);
        assert_eq!(err, Some(ProtocolError::ExpectedContinuation.into()));
    }

    #[test]
    fn unmasked_frame_is_refused() {
        let (_, err) = decode_all(&[0x81, 0x01, b'a']);
        assert_eq!(err, Some(ProtocolError::UnmaskedFrame.into()));
    }

    #[test]
    fn utf8_fails_fast_inside_a_fragmented_message() {
        // The first fragment is valid; the second has an invalid byte; the
        // message is never finished. The error must come without the end.
        let mut wire = frame(0x01, "κόσμε".as_bytes());
        wire.extend(frame(
            0x00,
            &[
                0xCE, 0xBA, 0xE1, 0xBD, 0xB9, 0xCF, 0x83, 0xCE, 0xBC, 0xCE, 0xB5, 0xED, 0xA0, 0x80,
            ],
        ));
        let (items, err) = decode_all(&wire);
        assert!(items.is_empty());
        assert_eq!(err, Some(ProtocolError::InvalidUtf8.into()));
    }

    #[test]
    fn utf8_fails_fast_inside_one_frame_arriving_in_pieces() {
        let wire = frame(0x81, &[b'a', b'b', 0xFF, b'c', b'd', b'e']);
        let mut d = Decoder::new(Limits::default());
        // Header plus "ab" and the bad byte: the error must come now, not
        // when the frame's last bytes arrive.
        let (_, err) = run(&mut d, &wire[..9]);
        assert_eq!(err, Some(ProtocolError::InvalidUtf8.into()));
    }

    #[test]
    fn utf8_split_code_point_across_fragments_is_fine() {
        let s = "€uro";
        let b = s.as_bytes();
        let mut wire = frame(0x01, &b[..1]);
        wire.extend(frame(0x00, &b[1..2]));
        wire.extend(frame(0x80, &b[2..]));
        assert_eq!(decode_all(&wire), (vec![text(s)], None));
    }

    #[test]
    fn utf8_truncated_at_message_end() {
        let (_, err) = decode_all(&frame(0x81, &[b'a', 0xE2, 0x82]));
        assert_eq!(err, Some(ProtocolError::InvalidUtf8.into()));
        let mut wire = frame(0x01, b"a");
        wire.extend(frame(0x80, &[0xE2, 0x82]));
        let (_, err) = decode_all(&wire);
        assert_eq!(err, Some(ProtocolError::InvalidUtf8.into()));
    }

    #[test]
    fn utf8_edge_cases() {
        let valid: [&[u8]; 5] = [
            &[0x7F],
            &[0xDF, 0xBF],
            &[0xEF, 0xBF, 0xBF],
            &[0xF4, 0x8F, 0xBF, 0xBF],
            &[0xF0, 0x90, 0x80, 0x80],
        ];
        for v in valid {
            assert_eq!(decode_all(&frame(0x81, v)).1, None, "{v:?}");
        }
        let invalid: [&[u8]; 7] = [
            &[0xC0, 0x80],             // overlong NUL
            &[0xED, 0xA0, 0x80],       // surrogate
            &[0xF4, 0x90, 0x80, 0x80], // above U+10FFFF
            &[0xF8, 0x88, 0x80, 0x80, 0x80],
            &[0x80],
            &[0xFE],
            &[0xE0, 0x80, 0xAF], // overlong
        ];
        for v in invalid {
            assert_eq!(
                decode_all(&frame(0x81, v)).1,
                Some(ProtocolError::InvalidUtf8.into()),
                "{v:?}"
            );
        }
    }

    #[test]
    fn close_frames() {
        assert_eq!(
            decode_all(&frame(0x88, b"")),
            (vec![Incoming::Close(None)], None)
        );
        let mut p = 1000u16.to_be_bytes().to_vec();
        p.extend_from_slice(b"bye");
        assert_eq!(
            decode_all(&frame(0x88, &p)),
            (
                vec![Incoming::Close(Some(CloseFrame::new(
                    CloseCode::NORMAL,
                    "bye"
                )))],
                None
            )
        );
        assert_eq!(
            decode_all(&frame(0x88, &[3])).1,
            Some(ProtocolError::InvalidClosePayload.into())
        );
        for bad in [
            0u16, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000,
        ] {
            assert_eq!(
                decode_all(&frame(0x88, &bad.to_be_bytes())).1,
                Some(ProtocolError::InvalidCloseCode(bad).into()),
                "{bad}"
            );
        }
        for good in [
            1000u16, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 3999, 4000, 4999,
        ] {
            assert_eq!(
                decode_all(&frame(0x88, &good.to_be_bytes())).1,
                None,
                "{good}"
            );
        }
        let mut p = 1000u16.to_be_bytes().to_vec();
        p.extend_from_slice(&[0xFF, 0xFE]);
        assert_eq!(
            decode_all(&frame(0x88, &p)).1,
            Some(ProtocolError::InvalidUtf8.into())
        );
    }

    #[test]
    fn control_frame_rules() {
        assert_eq!(
            decode_all(&frame(0x89, &[0; 126])).1,
            Some(ProtocolError::ControlFrameTooLong.into())
        );
        assert_eq!(
            decode_all(&frame(0x09, b"")).1,
            Some(ProtocolError::FragmentedControlFrame.into())
        );
        assert_eq!(
            decode_all(&frame(0x89, &[7; 125])),
            (vec![Incoming::Ping(vec![7; 125])], None)
        );
    }

    #[test]
    fn limits() {
        let limits = Limits {
            max_message_size: 10,
            max_frame_size: 6,
            max_fragments: 3,
        };
        let (_, err) = run(&mut Decoder::new(limits), &frame(0x82, &[0; 7]));
        assert_eq!(err, Some(DecodeError::TooLarge { size: 7, limit: 6 }));
        let mut wire = frame(0x02, &[0; 6]);
        wire.extend(frame(0x80, &[0; 5]));
        let (_, err) = run(&mut Decoder::new(limits), &wire);
        assert_eq!(
            err,
            Some(DecodeError::TooLarge {
                size: 11,
                limit: 10
            })
        );
        let mut wire = frame(0x02, &[0; 1]);
        for _ in 0..3 {
            wire.extend(frame(0x00, &[0; 1]));
        }
        let (_, err) = run(&mut Decoder::new(limits), &wire);
        assert_eq!(err, Some(ProtocolError::TooManyFragments.into()));
        // The limit is checked from the header alone: no payload needed.
        let (_, err) = run(&mut Decoder::new(limits), &frame(0x82, &[0; 100])[..8]);
        assert_eq!(
            err,
            Some(DecodeError::TooLarge {
                size: 100,
                limit: 6
            })
        );
    }

    #[test]
    fn reserved_bits_and_opcodes() {
        assert_eq!(
            decode_all(&frame(0xC1, b"x")).1,
            Some(ProtocolError::ReservedBits.into())
        );
        assert_eq!(
            decode_all(&frame(0x83, b"")).1,
            Some(ProtocolError::ReservedOpcode(3).into())
        );
        assert_eq!(
            decode_all(&frame(0x8F, b"")).1,
            Some(ProtocolError::ReservedOpcode(15).into())
        );
    }

    #[test]
    fn messages_before_an_error_are_delivered() {
        let mut wire = frame(0x81, b"one");
        wire.extend(frame(0x81, b"two"));
        wire.extend(frame(0xF1, b"bad"));
        let (items, err) = decode_all(&wire);
        assert_eq!(items, vec![text("one"), text("two")]);
        assert_eq!(err, Some(ProtocolError::ReservedBits.into()));
    }

    #[test]
    fn idle_decoder_holds_no_heap() {
        let mut d = Decoder::new(Limits::default());
        let (items, _) = run(&mut d, &frame(0x82, &[1; 5000]));
        assert_eq!(items.len(), 1);
        assert!(!d.is_mid_message());
        assert_eq!(d.buffered(), 0);
    }
}
