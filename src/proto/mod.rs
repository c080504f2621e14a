//! The sans-IO protocol core: RFC 6455 (and RFC 7692 with the `deflate`
//! feature) over byte slices, with no sockets or threads, and no locks
//! but the one a deflate context is kept under.
//!
//! The server drives these types; they are public so that they can be
//! fuzzed and tested on their own. Their shape may change between minor
//! versions.

pub mod assemble;
pub mod conn;
#[cfg(feature = "deflate")]
pub mod deflate;
pub mod frame;
pub mod handshake;

pub use crate::error::DecodeError;
