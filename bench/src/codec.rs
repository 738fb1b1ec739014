//! `starling-bench codec`: single-core frame codec throughput (wall clock),
//! a quick complement to the criterion bench (`cargo bench --bench codec`).
//! With a small `--frames` it also serves as a callgrind workload
//! (instructions per frame are repeatable on a noisy machine).

use std::hint::black_box;

use anyhow::ensure;
use bytes::{Bytes, BytesMut};
use clap::{Args, ValueEnum};
use starling_protocol::v1::{self, frame::Body};
use starling_protocol::{FrameDecoder, FrameEncoder};

use crate::clock::Stopwatch;

/// Which codec operations to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Op {
    /// Decode, then encode.
    Both,
    /// Decode only.
    Decode,
    /// Encode only.
    Encode,
}

/// Which frame to measure.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum FrameChoice {
    /// A Send with a 100-byte body.
    Send,
    /// A Deliver with a 100-byte body.
    Deliver,
}

#[derive(Debug, Args)]
pub(crate) struct CodecArgs {
    /// Frames to decode and to encode.
    #[arg(long, default_value_t = 5_000_000)]
    frames: u64,
    /// The frame to measure.
    #[arg(long, value_enum, default_value_t = FrameChoice::Send)]
    frame: FrameChoice,
    /// Which half to run (one half alone suits callgrind).
    #[arg(long, value_enum, default_value_t = Op::Both)]
    op: Op,
    /// Message body size in bytes.
    #[arg(long, default_value_t = 100)]
    body_bytes: usize,
}

/// A Send with a `body_bytes` body, as a client sends it.
pub(crate) fn send_frame(body_bytes: usize) -> v1::Frame {
    v1::Frame {
        request_id: 123_456,
        body: Some(Body::Send(v1::Send {
            client_msg_id: Bytes::from_static(&[0x42; 16]),
            to: Some(v1::Recipient {
                target: Some(v1::recipient::Target::UserId(1_000_002)),
            }),
            content_type: "text/plain".into(),
            body: Bytes::from(vec![b'x'; body_bytes]),
            media: None,
            reply_to_seq: 0,
            first_attempt: false,
            change: None,
            set_timer: None,
        })),
    }
}

/// A Deliver with a `body_bytes` body, as the server pushes it.
pub(crate) fn deliver_frame(body_bytes: usize) -> v1::Frame {
    v1::Frame {
        request_id: 0,
        body: Some(Body::Deliver(v1::Deliver {
            message: Some(v1::Message {
                conversation_id: 9_876_543,
                seq: 1_234_567,
                sender_user_id: 1_000_001,
                sender_device_id: 2,
                client_msg_id: Bytes::from_static(&[0x42; 16]),
                server_ts_ms: 1_790_000_000_123,
                content_type: "text/plain".into(),
                body: Bytes::from(vec![b'x'; body_bytes]),
                media: None,
                reply_to_seq: 0,
                group_changed: None,
                ..Default::default()
            }),
        })),
    }
}

pub(crate) fn run(args: &CodecArgs) -> anyhow::Result<()> {
    let frame = match args.frame {
        FrameChoice::Send => send_frame(args.body_bytes),
        FrameChoice::Deliver => deliver_frame(args.body_bytes),
    };
    // Frames arrive in socket-sized chunks of 64 frames.
    const CHUNK_FRAMES: u64 = 64;
    let encoder = FrameEncoder::default();
    let mut chunk = BytesMut::new();
    for _ in 0..CHUNK_FRAMES {
        encoder.encode(&frame, &mut chunk)?;
    }
    let frame_bytes = chunk.len() as u64 / CHUNK_FRAMES;
    let rounds = args.frames.div_ceil(CHUNK_FRAMES);
    let frames = rounds * CHUNK_FRAMES;

    let mut decoder = FrameDecoder::default();
    let mut decoded = 0u64;
    let watch = Stopwatch::start();
    let decode_rounds = if args.op == Op::Encode { 0 } else { rounds };
    for _ in 0..decode_rounds {
        decoder.handle_bytes(black_box(&chunk));
        while let Some(f) = decoder.poll_frame()? {
            black_box(&f);
            decoded += 1;
        }
    }
    let decode_secs = watch.elapsed_secs();
    ensure!(
        decoded == decode_rounds * CHUNK_FRAMES,
        "decoded {decoded} of {frames} frames"
    );

    let mut out = BytesMut::with_capacity(chunk.len());
    let watch = Stopwatch::start();
    let encode_rounds = if args.op == Op::Decode { 0 } else { rounds };
    for _ in 0..encode_rounds {
        out.clear();
        for _ in 0..CHUNK_FRAMES {
            encoder.encode(black_box(&frame), &mut out)?;
        }
        black_box(&out);
    }
    let encode_secs = watch.elapsed_secs();

    println!(
        "frame: {:?}, {} bytes on the wire, {} frames",
        args.frame, frame_bytes, frames
    );
    println!(
        "{:<8} {:>14} {:>10} {:>10}",
        "op", "frames/s", "MB/s", "ns/frame"
    );
    let halves = [
        ("decode", decode_secs, decode_rounds),
        ("encode", encode_secs, encode_rounds),
    ];
    for (op, secs, op_rounds) in halves {
        if op_rounds == 0 {
            continue;
        }
        let per_sec = frames as f64 / secs;
        println!(
            "{:<8} {:>14.0} {:>10.1} {:>10.1}",
            op,
            per_sec,
            per_sec * frame_bytes as f64 / 1e6,
            secs * 1e9 / frames as f64
        );
    }
    Ok(())
}
