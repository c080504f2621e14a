//! The sans-IO protocol core: RFC 6455 over byte slices, with no sockets,
//! threads or locks.
//!
//! The server drives these types; they are public so that they can be
//! fuzzed and tested on their own. Their shape may change between minor
//! versions.

pub mod assemble;
pub mod conn;
pub mod frame;
pub mod handshake;

pub use crate::error::DecodeError;
