//! Frames out to this shard's connections, and each connection's push budget (see
//! `docs/design/messaging.md`, "Slow consumers").
//!
//! Every frame is charged to its connection's backlog (`Conn::queued_bytes`) with exactly its
//! size on the wire, and the gateway's `handle_conn_flushed` takes it off again. Answers to the
//! client's own requests are always queued (its in-flight request limit bounds them); a push
//! that takes the backlog over the budget makes the connection *behind*: later pushes are not
//! queued, only the latest seq per conversation is remembered, and once the backlog is down to
//! half the budget the connection gets one `MessagesAvailable` per conversation and pushes
//! resume. A backlog over budget for `slow_consumer_close_ms` without a break closes the
//! connection with `SLOW_CONSUMER`.

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};
use starling_protocol::FrameKind;
use starling_protocol::v1::{self, ErrorCode, frame::Body};

use super::directory::Directory;
use super::frames::{CloseRequest, Transmit, encode_frame, frame};
use crate::ids::ConnId;

/// What waits for the gateway: frames to write and connections to close.
pub(super) struct Outbound {
    transmits: VecDeque<Transmit>,
    /// Where frames are encoded (see [`Transmit`]).
    encode_buf: BytesMut,
    closes: VecDeque<CloseRequest>,
    /// A connection's backlog budget (`ShardConfig::conn_outbound_bytes_max`).
    budget_bytes: u64,
    /// How long a backlog may stay over budget (`ShardConfig::slow_consumer_close_ms`).
    close_ms: u64,
}

impl Outbound {
    pub(super) fn new(budget_bytes: u64, close_ms: u64) -> Outbound {
        Outbound {
            transmits: VecDeque::new(),
            encode_buf: BytesMut::new(),
            closes: VecDeque::new(),
            budget_bytes,
            close_ms,
        }
    }

    /// Queues `f` for `conn`. `push` frames count against the outbound budget and switch the
    /// connection to hints once it is exhausted; responses are always queued (the client asked
    /// for them and its in-flight request limit bounds them).
    pub(super) fn emit(
        &mut self,
        dir: &mut Directory,
        conn: ConnId,
        f: v1::Frame,
        push: bool,
        now_ms: u64,
    ) -> bool {
        if !takes(dir, conn, push) {
            return false;
        }
        let kind = f.body.as_ref().map(Body::kind);
        let bytes = self.encode(&f);
        self.emit_encoded(dir, conn, bytes, f.request_id, kind, push, now_ms)
    }

    /// Pushes one frame to several connections, encoding it (`encode`, into the encode buffer)
    /// only for the first that takes it; `cached` carries the encoding from one connection to
    /// the next.
    pub(super) fn push_shared(
        &mut self,
        dir: &mut Directory,
        conn: ConnId,
        cached: &mut Option<Bytes>,
        kind: FrameKind,
        now_ms: u64,
        encode: impl FnOnce(&mut BytesMut) -> Bytes,
    ) -> bool {
        if !takes(dir, conn, true) {
            return false;
        }
        let bytes = match cached {
            Some(b) => b.clone(),
            None => cached.insert(encode(&mut self.encode_buf)).clone(),
        };
        self.emit_encoded(dir, conn, bytes, 0, Some(kind), true, now_ms)
    }

    /// Encodes `f` as it goes on the wire.
    pub(super) fn encode(&mut self, f: &v1::Frame) -> Bytes {
        encode_frame(&mut self.encode_buf, f)
    }

    /// [`Outbound::emit`] of a frame encoded already, for a connection that takes it.
    #[allow(clippy::too_many_arguments)]
    fn emit_encoded(
        &mut self,
        dir: &mut Directory,
        conn: ConnId,
        bytes: Bytes,
        request_id: u64,
        kind: Option<FrameKind>,
        push: bool,
        now_ms: u64,
    ) -> bool {
        let Some(c) = dir.conns.get_mut(&conn) else {
            return false;
        };
        debug_assert!(!(push && c.behind), "callers check `takes` before encoding");
        // Exactly what the gateway will report written for it (`handle_conn_flushed`): an
        // overestimate would leak, and a connection would end up "behind" for good.
        c.queued_bytes += bytes.len() as u64;
        if c.queued_bytes > self.budget_bytes {
            // Answers count towards the backlog as pushes do, but only a push makes the
            // connection behind (answers are bounded by the in-flight request limit).
            if push {
                c.behind = true;
            }
            let m = c.more();
            if m.over_since_ms.is_none() && !m.closing {
                m.over_since_ms = Some(now_ms);
            }
            if c.watched() {
                dir.watched.insert(conn);
            }
        }
        self.transmits.push_back(Transmit {
            conn,
            bytes,
            request_id,
            kind,
        });
        true
    }

    /// The gateway wrote `bytes` of `conn`'s frames: within the budget again, the close clock
    /// stops; down to half of it, a connection that was behind gets its hints. Returns how many
    /// hints it got.
    pub(super) fn flushed(
        &mut self,
        dir: &mut Directory,
        conn: ConnId,
        bytes: u64,
        now_ms: u64,
    ) -> u64 {
        let Some(c) = dir.conns.get_mut(&conn) else {
            return 0;
        };
        c.queued_bytes = c.queued_bytes.saturating_sub(bytes);
        if c.queued_bytes <= self.budget_bytes
            && let Some(m) = &mut c.more
        {
            // Within the budget again: the close clock stops.
            m.over_since_ms = None;
        }
        self.hints(dir, conn, now_ms)
    }

    /// A connection that is behind and whose backlog is down to half its budget is no longer
    /// behind: it gets one `MessagesAvailable` per conversation it missed pushes of, and pushes
    /// resume. Returns how many hints it got.
    pub(super) fn hints(&mut self, dir: &mut Directory, conn: ConnId, now_ms: u64) -> u64 {
        let Some(c) = dir.conns.get_mut(&conn) else {
            return 0;
        };
        if !c.behind || c.queued_bytes > self.budget_bytes / 2 {
            return 0;
        }
        c.behind = false;
        let hints = c.more.as_mut().map(|m| std::mem::take(&mut m.hints));
        c.tidy();
        if !c.watched() {
            dir.watched.remove(&conn);
        }
        let Some(hints) = hints else {
            return 0;
        };
        let mut n = 0;
        for (conv, seq) in hints {
            n += 1;
            let f = frame(
                0,
                Body::MessagesAvailable(v1::MessagesAvailable {
                    conversation_id: conv.0,
                    up_to_seq: seq,
                }),
            );
            self.emit(dir, conn, f, false, now_ms);
        }
        n
    }

    /// The device is catching up (a Sync): pushes resume and its hints are void. The backlog's
    /// close clock runs on: a Sync does not make the socket read faster.
    pub(super) fn caught_up(dir: &mut Directory, conn: ConnId) {
        let Some(c) = dir.conns.get_mut(&conn) else {
            return;
        };
        c.behind = false;
        if let Some(m) = &mut c.more {
            m.hints.clear();
        }
        c.tidy();
        if !c.watched() {
            dir.watched.remove(&conn);
        }
    }

    /// The tick's look at the watched connections: hints for those drained enough, a close for
    /// those over budget for `close_ms`. Returns how many hints went out.
    pub(super) fn sweep(&mut self, dir: &mut Directory, now_ms: u64) -> u64 {
        let mut hints = 0;
        let conns: Vec<ConnId> = dir.watched.iter().copied().collect();
        let (budget, close_ms) = (self.budget_bytes, self.close_ms);
        for id in conns {
            hints += self.hints(dir, id, now_ms);
            let Some(c) = dir.conns.get_mut(&id) else {
                dir.watched.remove(&id);
                continue;
            };
            if c.queued_bytes > budget
                && c.over_since_ms()
                    .is_some_and(|t| now_ms.saturating_sub(t) >= close_ms)
            {
                c.more().closing = true;
                self.closes.push_back(CloseRequest {
                    conn: id,
                    code: ErrorCode::SlowConsumer,
                    message: format!(
                        "{} bytes unread, over {budget} for {close_ms} ms",
                        c.queued_bytes
                    ),
                });
            }
            if !c.watched() {
                dir.watched.remove(&id);
            }
        }
        hints
    }

    /// Whether `conn` has room for a push that may be held back or dropped (presence, typing):
    /// it is here, not behind, and its backlog is at most half its budget, so such pushes never
    /// make a connection behind and never delay its messages.
    pub(super) fn has_headroom(&self, dir: &Directory, conn: ConnId) -> bool {
        dir.conns
            .get(&conn)
            .is_some_and(|c| !c.behind && c.queued_bytes <= self.budget_bytes / 2)
    }

    /// When the first close clock runs out, if one runs.
    pub(super) fn close_due_ms(&self, dir: &Directory) -> Option<u64> {
        dir.watched
            .iter()
            .filter_map(|id| dir.conns.get(id)?.over_since_ms())
            .min()
            .map(|t| t + self.close_ms)
    }

    /// The next frame to write.
    pub(super) fn next_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next connection to close.
    pub(super) fn next_close(&mut self) -> Option<CloseRequest> {
        self.closes.pop_front()
    }
}

/// Whether `conn` is here and, for a push, not behind (checked before encoding anything).
fn takes(dir: &Directory, conn: ConnId, push: bool) -> bool {
    dir.conns.get(&conn).is_some_and(|c| !(push && c.behind))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::ConvId;
    use starling_storage::{DeviceId, UserId};

    const BUDGET: u64 = 1000;
    const CLOSE_MS: u64 = 50;

    fn setup() -> (Outbound, Directory) {
        let mut d = Directory::default();
        d.open(ConnId(1), UserId(1), DeviceId(1));
        d.open(ConnId(2), UserId(2), DeviceId(1));
        (Outbound::new(BUDGET, CLOSE_MS), d)
    }

    /// A frame of about `bytes` bytes on the wire.
    fn sized(request_id: u64, bytes: usize) -> v1::Frame {
        frame(
            request_id,
            Body::Error(v1::Error {
                message: "x".repeat(bytes - 10),
                ..v1::Error::default()
            }),
        )
    }

    /// The fan-out could not push seq `seq` of conversation `conv` to `c`.
    fn missed(d: &mut Directory, c: ConnId, conv: u64, seq: u64) {
        let hints = &mut d.conns.get_mut(&c).unwrap().more().hints;
        hints.insert(ConvId(conv), seq);
    }

    fn written(o: &mut Outbound) -> Vec<Transmit> {
        std::iter::from_fn(|| o.next_transmit()).collect()
    }

    #[test]
    fn a_push_over_budget_makes_the_connection_behind_until_it_drains_to_half() {
        let (mut o, mut d) = setup();
        let c = ConnId(1);
        assert!(o.emit(&mut d, c, sized(0, 400), true, 1));
        assert!(o.emit(&mut d, c, sized(0, 400), true, 1));
        assert!(!d.conns[&c].behind);
        // The push that goes over the budget is queued; the next is not.
        assert!(o.emit(&mut d, c, sized(0, 400), true, 1));
        assert!(d.conns[&c].behind && d.watched.contains(&c));
        assert!(!o.emit(&mut d, c, sized(0, 400), true, 1));
        // Answers are queued whatever the backlog (and counted).
        assert!(o.emit(&mut d, c, sized(9, 100), false, 1));
        let queued: u64 = written(&mut o).iter().map(|t| t.bytes.len() as u64).sum();
        assert_eq!(d.conns[&c].queued_bytes, queued);
        // What the fan-out could not push is remembered as a hint.
        missed(&mut d, c, 7, 9);
        // Within the budget, but not down to half: still behind.
        assert_eq!(o.flushed(&mut d, c, queued - BUDGET, 2), 0);
        assert!(d.conns[&c].behind);
        // Down to half: one hint per conversation, pushes resume, nothing left to watch.
        assert_eq!(o.flushed(&mut d, c, BUDGET / 2, 3), 1);
        let hint = written(&mut o).pop().unwrap().frame().unwrap();
        assert_eq!(
            hint.body,
            Some(Body::MessagesAvailable(v1::MessagesAvailable {
                conversation_id: 7,
                up_to_seq: 9,
            }))
        );
        assert!(!d.conns[&c].behind && !d.watched.contains(&c));
        assert!(d.conns[&c].more.is_none(), "nothing boxed is left in use");
        assert!(o.emit(&mut d, c, sized(0, 100), true, 3));
        // Another connection was never affected.
        assert!(o.emit(&mut d, ConnId(2), sized(0, 100), true, 3));
        // Nor is one that is gone.
        assert!(!o.emit(&mut d, ConnId(3), sized(0, 100), false, 3));
    }

    #[test]
    fn a_backlog_over_budget_for_close_ms_closes_the_connection_once() {
        let (mut o, mut d) = setup();
        let c = ConnId(1);
        assert!(o.emit(&mut d, c, sized(1, 1200), false, 10));
        assert!(!d.conns[&c].behind, "an answer does not make it behind");
        assert_eq!(o.close_due_ms(&d), Some(10 + CLOSE_MS));
        o.sweep(&mut d, 10 + CLOSE_MS - 1);
        assert!(o.next_close().is_none());
        o.sweep(&mut d, 10 + CLOSE_MS);
        let close = o.next_close().expect("closed");
        assert_eq!((close.conn, close.code), (c, ErrorCode::SlowConsumer));
        assert!(
            close.message.contains("over 1000 for 50 ms"),
            "{}",
            close.message
        );
        // Left alone until it is gone.
        assert_eq!(o.close_due_ms(&d), None);
        o.sweep(&mut d, 10 + 3 * CLOSE_MS);
        assert!(o.next_close().is_none());
        assert!(!d.watched.contains(&c));
    }

    #[test]
    fn the_close_clock_stops_whenever_the_backlog_is_within_budget() {
        let (mut o, mut d) = setup();
        let c = ConnId(1);
        assert!(o.emit(&mut d, c, sized(1, 1200), false, 10));
        o.flushed(&mut d, c, 400, 30);
        assert_eq!(o.close_due_ms(&d), None);
        o.sweep(&mut d, 30);
        assert!(d.watched.is_empty());
        // Over again: the clock starts again from then.
        assert!(o.emit(&mut d, c, sized(2, 300), false, 40));
        assert_eq!(o.close_due_ms(&d), Some(40 + CLOSE_MS));
        o.sweep(&mut d, 10 + CLOSE_MS);
        assert!(o.next_close().is_none());
    }

    #[test]
    fn a_push_to_several_connections_is_encoded_once() {
        let (mut o, mut d) = setup();
        let mut cached = None;
        let mut encodings = 0;
        for c in [ConnId(1), ConnId(2)] {
            assert!(
                o.push_shared(&mut d, c, &mut cached, FrameKind::Error, 1, |buf| {
                    encodings += 1;
                    encode_frame(buf, &sized(0, 50))
                })
            );
        }
        assert_eq!(encodings, 1);
        let t = written(&mut o);
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].bytes.as_ptr(), t[1].bytes.as_ptr(), "one buffer");
        assert_eq!(d.conns[&ConnId(2)].queued_bytes, t[1].bytes.len() as u64);
    }

    #[test]
    fn a_sync_ends_the_behind_state_and_voids_the_hints() {
        let (mut o, mut d) = setup();
        let c = ConnId(1);
        assert!(o.emit(&mut d, c, sized(0, 1200), true, 1));
        missed(&mut d, c, 7, 9);
        Outbound::caught_up(&mut d, c);
        let conn = &d.conns[&c];
        assert!(!conn.behind);
        assert!(conn.more.as_ref().unwrap().hints.is_empty());
        // The close clock runs on.
        assert_eq!(o.close_due_ms(&d), Some(1 + CLOSE_MS));
    }
}
