//! The frames the shard hands the gateway, encoded once each as they go on the wire
//! ([`Transmit`]); the requests to close a connection ([`CloseRequest`]); and the `Error` frame
//! that answers a request the router refuses ([`Refusal`]).

use bytes::{Bytes, BytesMut};
use prost::Message as _;
use starling_protocol::FrameKind;
use starling_protocol::v1::{self, ErrorCode, frame::Body};
use starling_storage::StorageError;

use crate::ids::ConnId;

/// A frame for the gateway to write to one of this shard's connections, already encoded as it
/// goes on the wire (length prefix and protobuf). The router encodes each frame once, where it
/// is made: a `Deliver` pushed to several devices is one shared buffer, and the frame's size,
/// which the outbound budget is charged with, is exactly `bytes.len()`.
#[derive(Debug)]
pub struct Transmit {
    /// The connection.
    pub conn: ConnId,
    /// The encoded frame. Not checked against the peer's frame limit: the gateway does that.
    pub bytes: Bytes,
    /// The frame's `request_id` (responses carry the request's; pushes carry 0).
    pub request_id: u64,
    /// What the frame is (`None`: it has no body, which the router never emits).
    pub kind: Option<FrameKind>,
}

impl Transmit {
    /// The frame, decoded again (for tests and diagnostics; the gateway writes `bytes`).
    #[must_use]
    pub fn frame(&self) -> Option<v1::Frame> {
        let mut d = starling_protocol::FrameDecoder::new(u32::MAX);
        d.handle_bytes(&self.bytes);
        d.poll_frame().ok().flatten()
    }
}

/// The router asks the gateway to close a connection (after sending it `Goodbye`).
#[derive(Debug)]
pub struct CloseRequest {
    /// The connection.
    pub conn: ConnId,
    /// Why.
    pub code: ErrorCode,
    /// Detail for the Goodbye and logs.
    pub message: String,
}

/// Encoded frames are cut from buffers of this size (one allocation per buffer, not per frame).
const ENCODE_CHUNK_BYTES: usize = 64 * 1024;

/// Appends `f` as it goes on the wire to `buf` and splits it off; `buf` is refilled in
/// [`ENCODE_CHUNK_BYTES`] allocations, which the frames cut from them share.
pub(super) fn encode_frame(buf: &mut BytesMut, f: &v1::Frame) -> Bytes {
    let len = f.encoded_len();
    let need = prost::encoding::encoded_len_varint(len as u64) + len;
    encode_into(buf, need, |b| starling_protocol::put_framed(f, len, b))
}

/// Appends `need` bytes with `put` to the encode chunk `buf` (a fresh chunk if it has no room)
/// and splits them off.
pub(super) fn encode_into(
    buf: &mut BytesMut,
    need: usize,
    put: impl FnOnce(&mut BytesMut) -> usize,
) -> Bytes {
    if buf.capacity() - buf.len() < need {
        *buf = BytesMut::with_capacity(need.max(ENCODE_CHUNK_BYTES));
    }
    let n = put(buf);
    debug_assert_eq!(n, need);
    buf.split().freeze()
}

/// A frame with `body`, answering request `request_id` (0 for a push).
pub(super) fn frame(request_id: u64, body: Body) -> v1::Frame {
    v1::Frame {
        request_id,
        body: Some(body),
    }
}

/// An `Error` frame answering request `request_id`.
pub(super) fn error_frame(
    request_id: u64,
    code: ErrorCode,
    message: impl Into<String>,
) -> v1::Frame {
    frame(
        request_id,
        Body::Error(v1::Error {
            code: code as i32,
            message: message.into(),
            retry_after_ms: 0,
        }),
    )
}

/// An `Error` frame that tells the client when to try again.
pub(super) fn retry_frame(
    request_id: u64,
    code: ErrorCode,
    message: String,
    retry_after_ms: u32,
) -> v1::Frame {
    frame(
        request_id,
        Body::Error(v1::Error {
            code: code as i32,
            message,
            retry_after_ms,
        }),
    )
}

/// A refusal: the code and message of the `Error` frame that answers the request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Refusal(pub(crate) ErrorCode, pub(crate) String);

impl Refusal {
    pub(crate) fn storage(what: &str, e: &StorageError) -> Refusal {
        Refusal(ErrorCode::StorageFailure, format!("{what}: {e}"))
    }

    /// A read that was dropped without running: the read threads stopped.
    pub(crate) fn storage_stopped() -> Refusal {
        Refusal(
            ErrorCode::StorageFailure,
            "the storage read threads stopped before this was read".into(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_encoded_as_they_go_on_the_wire_and_share_a_chunk() {
        let mut buf = BytesMut::new();
        let a = error_frame(7, ErrorCode::NotFound, "no such user");
        let b = frame(0, Body::Done(v1::Done {}));
        let ea = encode_frame(&mut buf, &a);
        let eb = encode_frame(&mut buf, &b);
        // Exactly what the gateway writes (and charges the connection for).
        assert_eq!(ea.len(), starling_protocol::framed_len(&a));
        assert_eq!(eb.len(), starling_protocol::framed_len(&b));
        // Both were cut from one chunk, one after the other, which has room for more.
        assert_eq!(ea.as_ptr().wrapping_add(ea.len()), eb.as_ptr());
        assert_eq!(buf.capacity(), ENCODE_CHUNK_BYTES - ea.len() - eb.len());
        let t = Transmit {
            conn: ConnId(1),
            bytes: ea,
            request_id: 7,
            kind: a.body.as_ref().map(Body::kind),
        };
        assert_eq!(t.frame(), Some(a));
    }

    #[test]
    fn a_frame_larger_than_a_chunk_gets_its_own_buffer() {
        let mut buf = BytesMut::new();
        let big = error_frame(1, ErrorCode::Internal, "x".repeat(ENCODE_CHUNK_BYTES + 10));
        let e = encode_frame(&mut buf, &big);
        assert_eq!(e.len(), starling_protocol::framed_len(&big));
        let t = Transmit {
            conn: ConnId(1),
            bytes: e,
            request_id: 1,
            kind: None,
        };
        assert_eq!(t.frame(), Some(big));
    }

    #[test]
    fn retry_frames_say_when() {
        let f = retry_frame(3, ErrorCode::RateLimited, "slow down".into(), 250);
        let Some(Body::Error(e)) = f.body else {
            panic!("{f:?}")
        };
        assert_eq!(
            (e.code, e.retry_after_ms),
            (ErrorCode::RateLimited as i32, 250)
        );
        assert_eq!(f.request_id, 3);
    }
}
