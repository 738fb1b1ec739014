//! # starling-protocol
//!
//! **Owns:** the wire protocol: the schema (`proto/*.proto`, entry `starling.proto`, package
//! `starling.v1`), the Rust types generated from it ([`v1`]), the frame codec
//! ([`FrameDecoder`], [`FrameEncoder`], and the writers the router encodes its
//! outbound frames with: [`put_framed`], [`put_deliver_framed`],
//! [`framed_len`]), the protocol limits ([`limits`]), the registry of optional
//! feature names ([`features`]) and the mapping from
//! codec errors to wire error codes.
//!
//! **Is not:** I/O. This crate is sans-IO and deterministic, in the manner of
//! quinn-proto: bytes in, frames out; the caller owns sockets, buffers and
//! clocks. It never reads the time, never blocks and never panics on input.
//!
//! **Must not touch:** a runtime, a socket, a clock or a disk. CI checks that
//! it depends on no runtime crate (`.ci/run`, "protocol stays sans-IO").
//!
//! ## Framing
//!
//! A connection carries frames back to back, each a varint length (shortest
//! form, at most 5 bytes) followed by that many bytes of a protobuf
//! [`v1::Frame`]. `protocol/README.md` specifies it for other-language
//! clients; `protocol/tests/vectors/` holds golden vectors.
//!
//! ```
//! use bytes::BytesMut;
//! use starling_protocol::{FrameDecoder, FrameEncoder, v1};
//!
//! let frame = v1::Frame {
//!     request_id: 7,
//!     body: Some(v1::frame::Body::Ping(v1::Ping { nonce: 42 })),
//! };
//! let mut wire = BytesMut::new();
//! FrameEncoder::default().encode(&frame, &mut wire)?;
//!
//! let mut decoder = FrameDecoder::default();
//! decoder.handle_bytes(&wire);
//! assert_eq!(decoder.poll_frame()?, Some(frame));
//! assert_eq!(decoder.poll_frame()?, None);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![forbid(unsafe_code)]

mod codec;
mod error;
pub mod features;
pub mod limits;

pub use codec::{
    FrameDecoder, FrameEncoder, deliver_framed_len, framed_len, framed_payload_len,
    put_deliver_framed, put_framed,
};
pub use error::{DecodeError, EncodeError};

/// The generated `starling.v1` types.
#[allow(
    missing_docs,
    unreachable_pub,
    clippy::all,
    clippy::pedantic,
    clippy::doc_markdown,
    clippy::derive_partial_eq_without_eq
)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/starling.v1.rs"));
    include!(concat!(env!("OUT_DIR"), "/frame_kinds.rs"));
}

pub use v1::FrameKind;

/// The compiled schema as a `google.protobuf.FileDescriptorSet`, for
/// reflection (e.g. printing frames as JSON) and for other tools.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/starling_descriptor.bin"));

/// The protocol version this crate speaks (`Hello.protocol_version`).
pub const PROTOCOL_VERSION: u32 = 1;

/// Property checks shared by the cargo-fuzz targets in `fuzz/` and by the
/// test that replays the committed fuzz corpus. Not a stable API.
#[doc(hidden)]
pub mod fuzzing;
