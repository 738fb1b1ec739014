//! Codec errors. Each says whose fault it is and maps to a wire error code
//! (`ErrorCode::from(&err)`), in the manner of rustls' `Error` →
//! `AlertDescription`.

use crate::v1::ErrorCode;

/// Why bytes from the peer could not be decoded into a frame. All of these
/// are the peer's fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The length prefix announced more bytes than the negotiated maximum.
    /// Detected before anything is allocated for the frame.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    Oversized {
        /// The announced length.
        len: u64,
        /// The limit in force.
        max: u32,
    },
    /// The length prefix is longer than 5 bytes or not in shortest form.
    #[error("length prefix is not a minimal varint of at most 5 bytes")]
    OverlongVarint,
    /// The stream ended in the middle of a frame or of its length prefix.
    #[error("stream ended inside a frame ({buffered} bytes buffered)")]
    Truncated {
        /// Bytes received of the incomplete frame.
        buffered: usize,
    },
    /// The frame's bytes are not a valid protobuf `Frame`.
    #[error("malformed frame (request {request_id}): {source}")]
    Malformed {
        /// The frame's `request_id` if it could be read, else 0.
        request_id: u64,
        /// What prost objected to.
        source: prost::DecodeError,
    },
    /// The frame is well formed but its body case is unknown (or absent).
    /// The stream is intact: the connection may continue.
    #[error("unknown frame type (request {request_id})")]
    UnknownFrameType {
        /// The frame's `request_id`, for the Error answer.
        request_id: u64,
    },
}

impl DecodeError {
    /// True when the byte stream can no longer be framed (or must not be
    /// trusted) and the connection should be closed after sending an Error.
    /// Only [`DecodeError::UnknownFrameType`] leaves the connection usable.
    #[must_use]
    pub fn is_fatal(&self) -> bool {
        !matches!(self, DecodeError::UnknownFrameType { .. })
    }

    /// The `request_id` to answer with, when the frame got that far.
    #[must_use]
    pub fn request_id(&self) -> u64 {
        match self {
            DecodeError::Malformed { request_id, .. }
            | DecodeError::UnknownFrameType { request_id } => *request_id,
            _ => 0,
        }
    }
}

impl From<&DecodeError> for ErrorCode {
    fn from(err: &DecodeError) -> Self {
        match err {
            DecodeError::Oversized { .. } => ErrorCode::FrameTooLarge,
            DecodeError::OverlongVarint | DecodeError::Truncated { .. } => {
                ErrorCode::BadLengthPrefix
            }
            DecodeError::Malformed { .. } => ErrorCode::MalformedFrame,
            DecodeError::UnknownFrameType { .. } => ErrorCode::UnknownFrameType,
        }
    }
}

/// Why a frame could not be encoded. These are the caller's fault (a bug or
/// a missing check), never the peer's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The encoded frame is larger than the peer accepts.
    #[error("encoded frame of {len} bytes exceeds the peer's limit of {max} bytes")]
    Oversized {
        /// The encoded length.
        len: usize,
        /// The peer's limit.
        max: u32,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_unknown_frame_type_is_recoverable() {
        let recoverable = DecodeError::UnknownFrameType { request_id: 3 };
        assert!(!recoverable.is_fatal());
        assert_eq!(recoverable.request_id(), 3);
        for fatal in [
            DecodeError::Oversized { len: 10, max: 5 },
            DecodeError::OverlongVarint,
            DecodeError::Truncated { buffered: 1 },
        ] {
            assert!(fatal.is_fatal(), "{fatal}");
            assert_eq!(fatal.request_id(), 0);
        }
    }

    #[test]
    fn codes_are_stable() {
        let code = |e: &DecodeError| ErrorCode::from(e) as i32;
        assert_eq!(code(&DecodeError::Oversized { len: 2, max: 1 }), 101);
        assert_eq!(code(&DecodeError::OverlongVarint), 109);
        assert_eq!(code(&DecodeError::Truncated { buffered: 0 }), 109);
        assert_eq!(code(&DecodeError::UnknownFrameType { request_id: 0 }), 102);
    }
}
