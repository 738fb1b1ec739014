//! The frame codec: varint length prefix + protobuf `Frame`, sans-IO.
//!
//! [`FrameDecoder`] is fed arbitrary chunks of the byte stream
//! ([`FrameDecoder::handle_bytes`]) and yields whole frames
//! ([`FrameDecoder::poll_frame`]). Frames are split off its buffer without
//! copying, and `bytes` fields of the decoded frame (message bodies) are
//! slices of that same allocation. [`FrameEncoder`] appends frames to the
//! caller's buffer.

use bytes::{Buf, Bytes, BytesMut};
use prost::Message;

use crate::error::{DecodeError, EncodeError};
use crate::limits::{FRAME_BYTES_MAX_DEFAULT, LENGTH_PREFIX_BYTES_MAX};
use crate::v1::Frame;

/// Incremental frame decoder for one direction of one connection.
///
/// Call [`handle_bytes`](Self::handle_bytes) with whatever arrived (any
/// split: a frame in many pieces, many frames in one piece), then call
/// [`poll_frame`](Self::poll_frame) until it returns `Ok(None)`. At end of
/// stream call [`handle_eof`](Self::handle_eof) to learn whether the peer
/// stopped in the middle of a frame.
///
/// A length prefix above the limit is rejected before any memory is reserved
/// for the frame. Errors in the length prefix leave the stream unframeable:
/// the decoder then returns the same error forever. Errors inside a frame
/// (malformed protobuf, unknown body) consume just that frame.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: BytesMut,
    frame_bytes_max: u32,
    failed: Option<DecodeError>,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new(FRAME_BYTES_MAX_DEFAULT)
    }
}

enum Prefix {
    /// More bytes are needed to know the length.
    Incomplete,
    /// The frame is `len` bytes long after a prefix of `prefix_bytes`.
    Complete { len: u64, prefix_bytes: usize },
}

impl FrameDecoder {
    /// A decoder that accepts frames of at most `frame_bytes_max` bytes.
    #[must_use]
    pub fn new(frame_bytes_max: u32) -> Self {
        Self {
            buf: BytesMut::new(),
            frame_bytes_max,
            failed: None,
        }
    }

    /// Changes the limit (after Hello/Welcome negotiated one). Applies to
    /// frames whose prefix has not been read yet.
    pub fn set_frame_bytes_max(&mut self, frame_bytes_max: u32) {
        self.frame_bytes_max = frame_bytes_max;
    }

    /// The limit in force.
    #[must_use]
    pub fn frame_bytes_max(&self) -> u32 {
        self.frame_bytes_max
    }

    /// Feeds bytes received from the peer. Call [`poll_frame`](Self::poll_frame)
    /// afterwards until it returns `Ok(None)`.
    pub fn handle_bytes(&mut self, data: &[u8]) {
        if self.failed.is_none() {
            self.buf.extend_from_slice(data);
        }
    }

    /// The decoder's buffer, for I/O that reads straight into it (saving a
    /// copy). Bytes appended here are treated like [`handle_bytes`](Self::handle_bytes).
    pub fn read_buf(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    /// Bytes received that are not yet part of a returned frame.
    #[must_use]
    pub fn buffered_bytes(&self) -> usize {
        self.buf.len()
    }

    /// Frees the buffer's memory if it holds no partial frame, so an idle
    /// connection keeps no read buffer. Returns whether it did.
    pub fn release_buffer(&mut self) -> bool {
        if self.buf.is_empty() {
            self.buf = BytesMut::new();
            true
        } else {
            false
        }
    }

    /// Returns the next whole frame, `Ok(None)` if more bytes are needed, or
    /// an error. After an error with [`DecodeError::is_fatal`] the connection
    /// should be answered with an Error frame and closed.
    #[must_use = "a decoded frame or error must be handled"]
    pub fn poll_frame(&mut self) -> Result<Option<Frame>, DecodeError> {
        if let Some(err) = &self.failed {
            return Err(err.clone());
        }
        let (len, prefix_bytes) = match parse_prefix(&self.buf) {
            Ok(Prefix::Incomplete) => return Ok(None),
            Ok(Prefix::Complete { len, prefix_bytes }) => (len, prefix_bytes),
            Err(err) => return Err(self.fail(err)),
        };
        if len > u64::from(self.frame_bytes_max) {
            let err = DecodeError::Oversized {
                len,
                max: self.frame_bytes_max,
            };
            return Err(self.fail(err));
        }
        // Cannot truncate: len <= frame_bytes_max <= u32::MAX.
        let len = len as usize;
        let total = prefix_bytes + len;
        if self.buf.len() < total {
            // The limit was checked above, so this reservation is bounded.
            self.buf.reserve(total - self.buf.len());
            return Ok(None);
        }
        self.buf.advance(prefix_bytes);
        let frame_bytes = self.buf.split_to(len).freeze();
        decode_frame(frame_bytes).map(Some)
    }

    /// Tells the decoder the stream has ended. Returns an error if the peer
    /// stopped inside a frame (or the stream had already failed).
    pub fn handle_eof(&self) -> Result<(), DecodeError> {
        if let Some(err) = &self.failed {
            return Err(err.clone());
        }
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::Truncated {
                buffered: self.buf.len(),
            })
        }
    }

    fn fail(&mut self, err: DecodeError) -> DecodeError {
        self.buf = BytesMut::new();
        self.failed = Some(err.clone());
        err
    }
}

/// Reads the length prefix at the start of `buf`.
fn parse_prefix(buf: &[u8]) -> Result<Prefix, DecodeError> {
    let mut len: u64 = 0;
    for (i, &byte) in buf.iter().take(LENGTH_PREFIX_BYTES_MAX).enumerate() {
        len |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            // A last byte of zero after others means a longer-than-needed
            // encoding: refuse it so every length has exactly one encoding.
            if i > 0 && byte == 0 {
                return Err(DecodeError::OverlongVarint);
            }
            return Ok(Prefix::Complete {
                len,
                prefix_bytes: i + 1,
            });
        }
    }
    if buf.len() >= LENGTH_PREFIX_BYTES_MAX {
        Err(DecodeError::OverlongVarint)
    } else {
        Ok(Prefix::Incomplete)
    }
}

/// Decodes one frame's protobuf bytes (without prefix).
fn decode_frame(mut bytes: Bytes) -> Result<Frame, DecodeError> {
    // Merging into a default frame (rather than `Frame::decode`) keeps what
    // was decoded before an error, so the Error can name the request.
    let mut frame = Frame::default();
    match frame.merge(&mut bytes) {
        Ok(()) if frame.body.is_none() => Err(DecodeError::UnknownFrameType {
            request_id: frame.request_id,
        }),
        Ok(()) => Ok(frame),
        Err(source) => Err(DecodeError::Malformed {
            request_id: frame.request_id,
            source,
        }),
    }
}

/// Encodes frames for a peer that accepts at most `frame_bytes_max` bytes.
#[derive(Debug, Clone, Copy)]
pub struct FrameEncoder {
    frame_bytes_max: u32,
}

impl Default for FrameEncoder {
    fn default() -> Self {
        Self::new(FRAME_BYTES_MAX_DEFAULT)
    }
}

impl FrameEncoder {
    /// An encoder for a peer whose limit is `frame_bytes_max`.
    #[must_use]
    pub fn new(frame_bytes_max: u32) -> Self {
        Self { frame_bytes_max }
    }

    /// Changes the peer's limit (after negotiation).
    pub fn set_frame_bytes_max(&mut self, frame_bytes_max: u32) {
        self.frame_bytes_max = frame_bytes_max;
    }

    /// The peer's limit.
    #[must_use]
    pub fn frame_bytes_max(&self) -> u32 {
        self.frame_bytes_max
    }

    /// Appends `frame` (prefix and body) to `dst`; returns the bytes added.
    /// Nothing is appended if the frame is too large for the peer.
    pub fn encode(&self, frame: &Frame, dst: &mut BytesMut) -> Result<usize, EncodeError> {
        let len = frame.encoded_len();
        if len > self.frame_bytes_max as usize {
            return Err(EncodeError::Oversized {
                len,
                max: self.frame_bytes_max,
            });
        }
        dst.reserve(prost::encoding::encoded_len_varint(len as u64) + len);
        Ok(put_framed(frame, len, dst))
    }
}

/// Appends `frame` as it goes on the wire, its length prefix and then its encoding, where `len`
/// is `frame.encoded_len()` (callers have it already); returns the bytes appended. No limit is
/// checked: [`FrameEncoder::encode`] checks the peer's first, and the router, which does not
/// know the peer, leaves that check to the gateway.
pub fn put_framed(frame: &Frame, len: usize, dst: &mut BytesMut) -> usize {
    debug_assert_eq!(len, frame.encoded_len());
    let before = dst.len();
    prost::encoding::encode_varint(len as u64, dst);
    frame.encode_raw(dst);
    dst.len() - before
}

/// The `Frame` field number of `Deliver` (`frame::Body::Deliver`).
const DELIVER_FIELD: u32 = 52;

/// The `Deliver` field number of its `Message` (`Deliver::message`).
const DELIVER_MESSAGE_FIELD: u32 = 1;

/// `(payload, deliver)`: the payload length of a `Frame { request_id: 0, body: Deliver { message }
/// }` whose message encodes in `message_len` bytes, and the length of its `Deliver`.
fn deliver_lens(message_len: usize) -> (usize, usize) {
    use prost::encoding::{encoded_len_varint, key_len};
    let deliver =
        key_len(DELIVER_MESSAGE_FIELD) + encoded_len_varint(message_len as u64) + message_len;
    let payload = key_len(DELIVER_FIELD) + encoded_len_varint(deliver as u64) + deliver;
    (payload, deliver)
}

/// The bytes [`put_deliver_framed`] appends for a message whose `encoded_len()` is
/// `message_len`.
#[must_use]
pub fn deliver_framed_len(message_len: usize) -> usize {
    let (payload, _) = deliver_lens(message_len);
    prost::encoding::encoded_len_varint(payload as u64) + payload
}

/// Appends the push `Frame { request_id: 0, body: Deliver { message } }` as [`put_framed`] would,
/// byte for byte, from a borrowed message: the router pushes every message it makes durable, and
/// building the owned frame cloned the message (its byte fields and its `content_type` string)
/// once per push. `message_len` is `message.encoded_len()` (the caller needed it already for
/// [`deliver_framed_len`]). Returns the bytes appended.
pub fn put_deliver_framed(
    message: &crate::v1::Message,
    message_len: usize,
    dst: &mut BytesMut,
) -> usize {
    use prost::encoding::{WireType, encode_key, encode_varint};
    debug_assert_eq!(message_len, message.encoded_len());
    let before = dst.len();
    let (payload, deliver) = deliver_lens(message_len);
    encode_varint(payload as u64, dst);
    encode_key(DELIVER_FIELD, WireType::LengthDelimited, dst);
    encode_varint(deliver as u64, dst);
    encode_key(DELIVER_MESSAGE_FIELD, WireType::LengthDelimited, dst);
    encode_varint(message_len as u64, dst);
    message.encode_raw(dst);
    dst.len() - before
}

/// The bytes `frame` takes on the wire: its length prefix plus its encoding. Exactly what
/// [`FrameEncoder::encode`] appends, so byte budgets kept with it (the router's per-connection
/// outbound accounting) balance with what the transport reports written.
#[must_use]
pub fn framed_len(frame: &Frame) -> usize {
    let len = frame.encoded_len();
    prost::encoding::encoded_len_varint(len as u64) + len
}

/// The payload length of one whole encoded frame (what [`FrameEncoder::encode`] appended):
/// its length prefix, checked against the bytes that follow it. `None` unless `framed` is
/// exactly one prefix and that many bytes.
#[must_use]
pub fn framed_payload_len(framed: &[u8]) -> Option<u64> {
    let mut rest = framed;
    let len = prost::encoding::decode_varint(&mut rest).ok()?;
    (rest.len() as u64 == len).then_some(len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::{self, frame::Body};

    #[test]
    fn framed_payload_len_reads_what_the_encoder_wrote() {
        let mut buf = BytesMut::new();
        let f = ping(7, 9);
        let n = FrameEncoder::default().encode(&f, &mut buf).unwrap();
        assert_eq!(n, framed_len(&f));
        assert_eq!(framed_payload_len(&buf), Some(f.encoded_len() as u64));
        assert_eq!(framed_payload_len(&buf[..buf.len() - 1]), None);
        let mut longer = buf.to_vec();
        longer.push(0);
        assert_eq!(framed_payload_len(&longer), None);
        assert_eq!(framed_payload_len(&[]), None);
        assert_eq!(framed_payload_len(&[0xff; 11]), None);
    }

    #[test]
    fn deliver_frames_from_a_borrowed_message_are_the_owned_frames_bytes() {
        let small = v1::Message {
            conversation_id: 1,
            seq: 1,
            ..v1::Message::default()
        };
        let full = v1::Message {
            conversation_id: u64::MAX,
            seq: 1 << 40,
            sender_user_id: 77,
            sender_device_id: 3,
            client_msg_id: bytes::Bytes::from_static(&[9; 16]),
            server_ts_ms: 1_700_000_000_000,
            content_type: "text/plain".into(),
            body: bytes::Bytes::from(vec![0xab; 300]),
            media: None,
            reply_to_seq: 5,
            group_changed: None,
            ..Default::default()
        };
        // Bodies around the one- and two-byte length prefixes of the message, the Deliver and
        // the frame.
        let sizes = [
            0, 1, 100, 105, 110, 115, 120, 125, 127, 128, 200, 16_300, 16_400, 70_000,
        ];
        let bodies = sizes.map(|n| v1::Message {
            body: bytes::Bytes::from(vec![1; n]),
            ..full.clone()
        });
        for m in [small, v1::Message::default(), full].iter().chain(&bodies) {
            let owned = Frame {
                request_id: 0,
                body: Some(Body::Deliver(v1::Deliver {
                    message: Some(m.clone()),
                })),
            };
            let mut want = BytesMut::new();
            let n = put_framed(&owned, owned.encoded_len(), &mut want);
            let mut got = BytesMut::from(&b"x"[..]);
            assert_eq!(put_deliver_framed(m, m.encoded_len(), &mut got), n);
            assert_eq!(&got[1..], &want[..]);
            assert_eq!(deliver_framed_len(m.encoded_len()), n);
            assert_eq!(deliver_framed_len(m.encoded_len()), framed_len(&owned));
        }
    }

    fn ping(request_id: u64, nonce: u64) -> Frame {
        Frame {
            request_id,
            body: Some(Body::Ping(v1::Ping { nonce })),
        }
    }

    fn encode(frames: &[Frame]) -> BytesMut {
        let mut out = BytesMut::new();
        for f in frames {
            FrameEncoder::default().encode(f, &mut out).unwrap();
        }
        out
    }

    #[test]
    fn framed_len_is_what_encode_appends() {
        // Lengths around the varint prefix's 1→2 and 2→3 byte steps.
        for body_len in [
            0usize, 1, 100, 120, 125, 126, 127, 128, 200, 16_370, 16_400, 60_000,
        ] {
            let f = Frame {
                request_id: 7,
                body: Some(Body::Error(v1::Error {
                    message: "x".repeat(body_len),
                    ..Default::default()
                })),
            };
            let mut out = BytesMut::new();
            let n = FrameEncoder::default().encode(&f, &mut out).unwrap();
            assert_eq!(
                (n, out.len()),
                (framed_len(&f), framed_len(&f)),
                "{body_len}"
            );
        }
    }

    /// Feeds `input` in one piece and returns every poll result until the
    /// decoder wants more bytes or fails fatally.
    fn check(input: &[u8], max: u32) -> Vec<Result<Frame, DecodeError>> {
        let mut d = FrameDecoder::new(max);
        d.handle_bytes(input);
        let mut out = Vec::new();
        loop {
            match d.poll_frame() {
                Ok(Some(f)) => out.push(Ok(f)),
                Ok(None) => break,
                Err(e) => {
                    let fatal = e.is_fatal();
                    out.push(Err(e));
                    if fatal {
                        break;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn prefix_forms() {
        assert!(matches!(parse_prefix(&[]), Ok(Prefix::Incomplete)));
        assert!(matches!(parse_prefix(&[0x80]), Ok(Prefix::Incomplete)));
        assert!(matches!(
            parse_prefix(&[0x05]),
            Ok(Prefix::Complete {
                len: 5,
                prefix_bytes: 1
            })
        ));
        assert!(matches!(
            parse_prefix(&[0xac, 0x02]),
            Ok(Prefix::Complete {
                len: 300,
                prefix_bytes: 2
            })
        ));
        // Non-minimal: 5 encoded in two bytes.
        assert_eq!(
            parse_prefix(&[0x85, 0x00]).err(),
            Some(DecodeError::OverlongVarint)
        );
        // Six bytes.
        assert_eq!(
            parse_prefix(&[0xff, 0xff, 0xff, 0xff, 0xff, 0x01]).err(),
            Some(DecodeError::OverlongVarint)
        );
        // Five-byte maximum is accepted as a prefix (and then the limit applies).
        assert!(matches!(
            parse_prefix(&[0xff, 0xff, 0xff, 0xff, 0x7f]),
            Ok(Prefix::Complete { len, prefix_bytes: 5 }) if len == (1u64 << 35) - 1
        ));
    }

    #[test]
    fn many_frames_in_one_chunk() {
        let frames = [ping(1, 10), ping(2, 20), ping(0, 30)];
        let got = check(&encode(&frames), FRAME_BYTES_MAX_DEFAULT);
        let want: Vec<_> = frames.into_iter().map(Ok).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn byte_at_a_time() {
        let frames = [ping(1, u64::MAX), ping(2, 0)];
        let wire = encode(&frames);
        let mut d = FrameDecoder::default();
        let mut got = Vec::new();
        for b in wire.iter() {
            d.handle_bytes(&[*b]);
            while let Some(f) = d.poll_frame().unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got, frames);
        assert_eq!(d.handle_eof(), Ok(()));
    }

    #[test]
    fn oversized_is_rejected_before_allocating() {
        // A prefix announcing 2^34 bytes.
        let mut d = FrameDecoder::new(1024);
        d.handle_bytes(&[0x80, 0x80, 0x80, 0x80, 0x40]);
        let err = d.poll_frame().unwrap_err();
        assert_eq!(
            err,
            DecodeError::Oversized {
                len: 1 << 34,
                max: 1024
            }
        );
        assert!(d.read_buf().capacity() < 1024);
        // Poisoned: later bytes are ignored, the error repeats.
        d.handle_bytes(&encode(&[ping(1, 1)]));
        assert_eq!(d.poll_frame().unwrap_err(), err);
        assert_eq!(d.handle_eof().unwrap_err(), err);
    }

    #[test]
    fn limit_is_inclusive() {
        let f = ping(1, 1);
        let len = f.encoded_len() as u32;
        assert_eq!(
            check(&encode(std::slice::from_ref(&f)), len),
            vec![Ok(f.clone())]
        );
        assert_eq!(
            check(&encode(&[f]), len - 1),
            vec![Err(DecodeError::Oversized {
                len: u64::from(len),
                max: len - 1
            })]
        );
    }

    #[test]
    fn truncated_stream() {
        let wire = encode(&[ping(1, 1)]);
        let mut d = FrameDecoder::default();
        d.handle_bytes(&wire[..wire.len() - 1]);
        assert_eq!(d.poll_frame(), Ok(None));
        assert_eq!(
            d.handle_eof(),
            Err(DecodeError::Truncated {
                buffered: wire.len() - 1
            })
        );
        // A lone continuation byte of a prefix is truncated too.
        let mut d = FrameDecoder::default();
        d.handle_bytes(&[0x81]);
        assert_eq!(d.poll_frame(), Ok(None));
        assert_eq!(d.handle_eof(), Err(DecodeError::Truncated { buffered: 1 }));
    }

    #[test]
    fn unknown_body_keeps_the_stream() {
        // Frame{request_id: 9, field 999: varint 1}: a body case from the future.
        let unknown = [0x08, 0x09, 0xb8, 0x3e, 0x01];
        let mut wire = BytesMut::new();
        wire.extend_from_slice(&[unknown.len() as u8]);
        wire.extend_from_slice(&unknown);
        wire.extend_from_slice(&[0x00]); // empty frame: no body either
        wire.extend_from_slice(&encode(&[ping(3, 3)]));
        assert_eq!(
            check(&wire, FRAME_BYTES_MAX_DEFAULT),
            vec![
                Err(DecodeError::UnknownFrameType { request_id: 9 }),
                Err(DecodeError::UnknownFrameType { request_id: 0 }),
                Ok(ping(3, 3)),
            ]
        );
    }

    #[test]
    fn malformed_protobuf_names_the_request() {
        // request_id 5, then field 10 (hello) length-delimited with a length
        // running past the end.
        let bad = [0x08, 0x05, 0x52, 0x7f];
        let mut wire = vec![bad.len() as u8];
        wire.extend_from_slice(&bad);
        let got = check(&wire, FRAME_BYTES_MAX_DEFAULT);
        assert_eq!(got.len(), 1);
        let err = got[0].clone().unwrap_err();
        assert!(
            matches!(err, DecodeError::Malformed { request_id: 5, .. }),
            "{err:?}"
        );
        assert!(err.is_fatal());
        // Invalid wire type 7 in the first byte: request id unknown.
        let got = check(&[0x01, 0x0f], FRAME_BYTES_MAX_DEFAULT);
        assert!(matches!(
            got[0],
            Err(DecodeError::Malformed { request_id: 0, .. })
        ));
    }

    #[test]
    fn bodies_are_zero_copy() {
        let body = Bytes::from(vec![0xab; 100]);
        let frame = Frame {
            request_id: 1,
            body: Some(Body::Send(v1::Send {
                client_msg_id: Bytes::from_static(&[7; 16]),
                body: body.clone(),
                ..Default::default()
            })),
        };
        let wire = encode(&[frame]);
        let mut d = FrameDecoder::default();
        d.handle_bytes(&wire);
        let range = d.read_buf().as_ptr_range();
        let Some(Frame {
            body: Some(Body::Send(send)),
            ..
        }) = d.poll_frame().unwrap()
        else {
            panic!("not a send")
        };
        assert_eq!(send.body, body);
        assert!(range.contains(&send.body.as_ptr()), "body was copied");
    }

    #[test]
    fn encoder_refuses_frames_the_peer_cannot_take() {
        let f = ping(1, 1);
        let len = f.encoded_len();
        let mut out = BytesMut::new();
        let enc = FrameEncoder::new(len as u32 - 1);
        assert_eq!(
            enc.encode(&f, &mut out),
            Err(EncodeError::Oversized {
                len,
                max: len as u32 - 1
            })
        );
        assert!(out.is_empty());
        assert_eq!(
            FrameEncoder::new(len as u32).encode(&f, &mut out),
            Ok(len + 1)
        );
    }

    #[test]
    fn release_buffer_only_when_empty() {
        let wire = encode(&[ping(1, 1)]);
        let mut d = FrameDecoder::default();
        d.handle_bytes(&wire[..2]);
        assert!(!d.release_buffer());
        d.handle_bytes(&wire[2..]);
        assert!(d.poll_frame().unwrap().is_some());
        assert!(d.release_buffer());
        assert_eq!(d.read_buf().capacity(), 0);
    }
}
