//! Frame codec throughput: decode and encode of a Send with a 100-byte body
//! and of a Deliver (the two hottest frames).
//!
//! `cargo bench -p starling-bench --bench codec`
//!
//! Each benchmark processes one frame per iteration, so criterion's
//! "elements/s" is frames per second; the `bytes` group reports bytes/s.

use bytes::{Bytes, BytesMut};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use starling_protocol::v1::{self, frame::Body};
use starling_protocol::{FrameDecoder, FrameEncoder};
use std::hint::black_box;

/// The server's allocator, so allocation costs match production.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn send_frame() -> v1::Frame {
    v1::Frame {
        request_id: 123_456,
        body: Some(Body::Send(v1::Send {
            client_msg_id: Bytes::from_static(&[0x42; 16]),
            to: Some(v1::Recipient {
                target: Some(v1::recipient::Target::UserId(1_000_002)),
            }),
            content_type: "text/plain".into(),
            body: Bytes::from(vec![b'x'; 100]),
            media: None,
            reply_to_seq: 0,
            first_attempt: false,
            change: None,
            set_timer: None,
        })),
    }
}

fn deliver_frame() -> v1::Frame {
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
                body: Bytes::from(vec![b'x'; 100]),
                media: None,
                reply_to_seq: 0,
                group_changed: None,
                ..Default::default()
            }),
        })),
    }
}

/// Many copies of `frame` back to back, as they would arrive on a socket.
fn stream_of(frame: &v1::Frame, copies: usize) -> (Vec<u8>, usize) {
    let mut wire = BytesMut::new();
    let mut one = 0;
    for _ in 0..copies {
        one = FrameEncoder::default().encode(frame, &mut wire).unwrap();
    }
    (wire.to_vec(), one)
}

fn codec(c: &mut Criterion) {
    const BATCH: usize = 1024;
    for (name, frame) in [
        ("send_100B", send_frame()),
        ("deliver_100B", deliver_frame()),
    ] {
        let (stream, frame_len) = stream_of(&frame, BATCH);

        let mut group = c.benchmark_group(format!("decode/{name}"));
        // Decoding a 1,024-frame stream fed as one chunk per iteration; the
        // per-frame cost includes feeding the bytes into the decoder.
        group.throughput(Throughput::Elements(BATCH as u64));
        group.bench_function("frames", |b| {
            let mut decoder = FrameDecoder::default();
            b.iter(|| {
                decoder.handle_bytes(black_box(&stream));
                let mut n = 0;
                while let Ok(Some(f)) = decoder.poll_frame() {
                    black_box(&f);
                    n += 1;
                }
                assert_eq!(n, BATCH);
            });
        });
        group.throughput(Throughput::Bytes((BATCH * frame_len) as u64));
        group.bench_function("bytes", |b| {
            let mut decoder = FrameDecoder::default();
            b.iter(|| {
                decoder.handle_bytes(black_box(&stream));
                while let Ok(Some(f)) = decoder.poll_frame() {
                    black_box(&f);
                }
            });
        });
        group.finish();

        let mut group = c.benchmark_group(format!("encode/{name}"));
        group.throughput(Throughput::Elements(BATCH as u64));
        let encoder = FrameEncoder::default();
        let mut out = BytesMut::with_capacity(BATCH * frame_len);
        group.bench_function("frames", |b| {
            b.iter(|| {
                out.clear();
                for _ in 0..BATCH {
                    encoder.encode(black_box(&frame), &mut out).unwrap();
                }
                black_box(&out);
            });
        });
        group.throughput(Throughput::Bytes((BATCH * frame_len) as u64));
        group.bench_function("bytes", |b| {
            b.iter(|| {
                out.clear();
                for _ in 0..BATCH {
                    encoder.encode(black_box(&frame), &mut out).unwrap();
                }
                black_box(&out);
            });
        });
        group.finish();
    }
}

criterion_group!(benches, codec);
criterion_main!(benches);
