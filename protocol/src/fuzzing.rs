//! Entry points for the cargo-fuzz targets in `fuzz/`, also run over the
//! committed corpus by `protocol/tests/codec.rs`. Each asserts the codec's properties on arbitrary input;
//! a failed assertion is a bug the fuzzer reports.

use bytes::BytesMut;

use crate::limits::FRAME_BYTES_MAX_DEFAULT;
use crate::{DecodeError, FrameDecoder, FrameEncoder, v1::Frame};

/// Everything a decoder yields for `chunks`, up to its first fatal error,
/// plus the end-of-stream verdict.
fn decode_chunks<'a>(
    chunks: impl IntoIterator<Item = &'a [u8]>,
    frame_bytes_max: u32,
) -> (Vec<Result<Frame, DecodeError>>, Result<(), DecodeError>) {
    let mut decoder = FrameDecoder::new(frame_bytes_max);
    let mut out = Vec::new();
    for chunk in chunks {
        decoder.handle_bytes(chunk);
        loop {
            match decoder.poll_frame() {
                Ok(Some(frame)) => out.push(Ok(frame)),
                Ok(None) => break,
                Err(err) if err.is_fatal() => {
                    out.push(Err(err.clone()));
                    return (out, Err(err));
                }
                Err(err) => out.push(Err(err)),
            }
        }
    }
    let eof = decoder.handle_eof();
    (out, eof)
}

/// Arbitrary bytes never panic the decoder, and never make it hold more
/// than the input.
pub fn decode_bytes(data: &[u8]) {
    let mut decoder = FrameDecoder::new(FRAME_BYTES_MAX_DEFAULT);
    decoder.handle_bytes(data);
    while let Ok(Some(_)) | Err(DecodeError::UnknownFrameType { .. }) = decoder.poll_frame() {}
    let _ = decoder.handle_eof();
}

/// The first byte picks split points: the stream decodes to the same frames
/// and errors however it is cut.
pub fn decode_split(data: &[u8]) {
    let Some((&seed, stream)) = data.split_first() else {
        return;
    };
    let whole = decode_chunks([stream], FRAME_BYTES_MAX_DEFAULT);
    let step = usize::from(seed % 17) + 1;
    let mut chunks = Vec::new();
    let mut rest = stream;
    let mut i = 0usize;
    while !rest.is_empty() {
        // Chunk sizes cycle through 1..=step+i%3, covering tiny and mixed splits.
        let n = (step + i % 3).min(rest.len());
        let (chunk, tail) = rest.split_at(n);
        chunks.push(chunk);
        rest = tail;
        i += 1;
    }
    let split = decode_chunks(chunks, FRAME_BYTES_MAX_DEFAULT);
    assert_eq!(whole, split, "split decoding differs (step {step})");
}

/// decode → encode → decode gives the same frames, and re-encoding is stable.
pub fn roundtrip(data: &[u8]) {
    let (results, _) = decode_chunks([data], FRAME_BYTES_MAX_DEFAULT);
    let frames: Vec<Frame> = results.into_iter().filter_map(Result::ok).collect();
    let encoder = FrameEncoder::new(u32::MAX);
    let mut wire = BytesMut::new();
    for frame in &frames {
        // The canonical re-encoding may be longer or shorter than the input
        // (packed fields, dropped unknown fields), hence the u32::MAX limit.
        encoder
            .encode(frame, &mut wire)
            .expect("any decoded frame encodes");
    }
    let first = wire.clone();
    let (again, eof) = decode_chunks([&first[..]], u32::MAX);
    assert_eq!(eof, Ok(()));
    let again: Vec<Frame> = again
        .into_iter()
        .map(|r| r.expect("re-encoded frame must decode"))
        .collect();
    assert_eq!(frames, again, "decode → encode → decode changed frames");
    let mut second = BytesMut::new();
    for frame in &again {
        encoder.encode(frame, &mut second).expect("encodable");
    }
    assert_eq!(first, second, "encoding is not stable");
}
