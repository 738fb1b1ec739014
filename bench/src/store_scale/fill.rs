//! The fill phase: `--messages` Sends through one connection per sender account, each keeping
//! the server's in-flight window full. The first `--conversations` messages go one to each
//! conversation (creating it), the rest to conversations drawn from the Zipf popularity.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context as _, bail};
use hdrhistogram::Histogram;
use serde::Serialize;
use starling_protocol::v1::{self, frame::Body};

use super::{Convs, Layout, Rng, Zipf, open_conn};
use crate::accounts::Account;
use crate::clock::{self, Stopwatch};
use crate::net::{StarlingConn, describe_error};
use crate::report::{self, Summary};

/// Messages drawn ahead for one sender at a time.
const BATCH: usize = 256;
/// Most messages drawn but not yet sent, over all senders (a slow sender holds up the rest).
const QUEUED_MAX: usize = 1 << 22;
/// A sender that has written nothing for this long pings (the server's default idle timeout
/// is 90 s).
const IDLE_PING_NS: u64 = 20_000_000_000;
/// Errors after which the fill gives up.
const ERRORS_MAX: u64 = 100;

/// What the fill is asked to do.
#[derive(Debug, Clone)]
pub(super) struct FillParams {
    pub(super) messages: u64,
    pub(super) body_bytes: usize,
    pub(super) deadline: Duration,
    pub(super) zipf_s: f64,
    pub(super) seed: u64,
    pub(super) server_pid: Option<u32>,
}

/// What the fill did.
#[derive(Debug, Clone, Serialize)]
pub(super) struct FillOutcome {
    pub(super) messages_acked: u64,
    pub(super) errors: u64,
    /// Sends refused with OVERLOADED (and a retry interval) and sent again.
    pub(super) retries: u64,
    pub(super) first_errors: Vec<String>,
    pub(super) secs: f64,
    /// Seconds until as many messages as conversations were acknowledged: about the time to
    /// create them all, as each conversation's first message (which creates it) is drawn
    /// before any other (a sender may be retrying a creation while others have moved on).
    pub(super) create_secs: Option<f64>,
    pub(super) messages_per_s: f64,
    /// Stopped by `--fill-secs` before all messages were sent.
    pub(super) stopped_by_time: bool,
    /// Send → SendAck with the window full: mostly queueing, not the server's latency.
    pub(super) ack_us: Summary,
    pub(super) window: usize,
    pub(super) server_cpu_cores: Option<f64>,
    pub(super) loadgen_cpu_cores: f64,
}

/// Which conversation each sender sends to next.
#[derive(Debug)]
struct Gen {
    layout: Layout,
    next: u64,
    total: u64,
    zipf: Zipf,
    rng: Rng,
    queues: Vec<VecDeque<u32>>,
    queued: usize,
    stop: bool,
}

impl Gen {
    fn take(&mut self, s: usize) -> Option<u32> {
        if self.queues[s].is_empty() {
            self.refill(s);
        }
        let v = self.queues[s].pop_front();
        if v.is_some() {
            self.queued -= 1;
        }
        v
    }

    fn refill(&mut self, s: usize) {
        while self.queues[s].len() < BATCH
            && self.queued < QUEUED_MAX
            && !self.stop
            && self.next < self.total
        {
            // One message to each conversation first (in order), then the popularity.
            let i = if self.next < self.layout.convs {
                self.next as u32
            } else {
                self.zipf.sample(&mut self.rng)
            };
            self.next += 1;
            self.queues[self.layout.sender_of(i)].push_back(i);
            self.queued += 1;
        }
    }

    fn done(&self, s: usize) -> bool {
        self.queues[s].is_empty() && (self.stop || self.next >= self.total)
    }

    /// Time is up: nothing more is drawn, what was drawn is not sent.
    fn halt(&mut self) {
        self.stop = true;
        for q in &mut self.queues {
            q.clear();
        }
        self.queued = 0;
    }
}

#[derive(Debug)]
struct State {
    draws: RefCell<Gen>,
    convs: RefCell<Convs>,
    hist: RefCell<Histogram<u64>>,
    acked: Arc<AtomicU64>,
    acked_here: Cell<u64>,
    create_secs: Cell<Option<f64>>,
    errors: Cell<u64>,
    retries: Cell<u64>,
    first_errors: RefCell<Vec<String>>,
    finished: Cell<usize>,
    body: bytes::Bytes,
    sw: Stopwatch,
}

/// Runs the fill; gives back the conversations' state with what was acknowledged.
pub(super) fn fill(
    dst: SocketAddr,
    accounts: &[Account],
    layout: Layout,
    p: &FillParams,
    convs: Convs,
    acked: Arc<AtomicU64>,
) -> anyhow::Result<(FillOutcome, Convs)> {
    anyhow::ensure!(
        p.messages >= layout.convs,
        "--messages ({}) must be at least --conversations ({}): the first message of each \
         conversation creates it",
        p.messages,
        layout.convs
    );
    let zipf = Zipf::new(layout.convs, p.zipf_s);
    let st = Rc::new(State {
        draws: RefCell::new(Gen {
            layout,
            next: 0,
            total: p.messages,
            zipf,
            rng: Rng(p.seed),
            queues: vec![VecDeque::new(); layout.senders as usize],
            queued: 0,
            stop: false,
        }),
        convs: RefCell::new(convs),
        hist: RefCell::new(report::histogram()),
        acked,
        acked_here: Cell::new(0),
        create_secs: Cell::new(None),
        errors: Cell::new(0),
        retries: Cell::new(0),
        first_errors: RefCell::new(Vec::new()),
        finished: Cell::new(0),
        body: bytes::Bytes::from(vec![b'x'; p.body_bytes]),
        sw: Stopwatch::start(),
    });
    let cpu0 = p.server_pid.and_then(report::cpu_secs);
    let own0 = report::own_cpu_secs();
    let senders = &accounts[..layout.senders as usize];
    let to_users: Rc<Vec<u64>> = Rc::new(
        accounts[layout.senders as usize..]
            .iter()
            .map(|a| a.user_id)
            .collect(),
    );
    let window = crate::workers::block_on(async {
        tokio::task::LocalSet::new()
            .run_until(drive(
                dst,
                senders,
                to_users,
                layout,
                p.deadline,
                st.clone(),
            ))
            .await
    })??;
    let secs = st.sw.elapsed_secs();
    let st = Rc::try_unwrap(st).map_err(|_| anyhow::anyhow!("a sender task outlived the fill"))?;
    let n = st.acked_here.get();
    let out = FillOutcome {
        messages_acked: n,
        errors: st.errors.get(),
        retries: st.retries.get(),
        first_errors: st.first_errors.into_inner(),
        secs,
        create_secs: st.create_secs.get(),
        messages_per_s: n as f64 / secs.max(1e-9),
        stopped_by_time: st.draws.borrow().stop,
        ack_us: Summary::of(&st.hist.borrow()),
        window,
        server_cpu_cores: cpu0
            .zip(p.server_pid.and_then(report::cpu_secs))
            .map(|(a, b)| (b - a) / secs.max(1e-9)),
        loadgen_cpu_cores: (report::own_cpu_secs() - own0) / secs.max(1e-9),
    };
    Ok((out, st.convs.into_inner()))
}

/// Opens the senders, runs them and a progress/deadline task; the in-flight window.
async fn drive(
    dst: SocketAddr,
    senders: &[Account],
    to_users: Rc<Vec<u64>>,
    layout: Layout,
    deadline: Duration,
    st: Rc<State>,
) -> anyhow::Result<usize> {
    let mut conns = Vec::with_capacity(senders.len());
    let mut window = usize::MAX;
    for (i, acc) in senders.iter().enumerate() {
        let (c, w) = open_conn(dst, acc, i as u64).await?;
        window = window.min(w);
        conns.push(c);
    }
    let mut tasks = Vec::new();
    for (s, c) in conns.into_iter().enumerate() {
        let (st, to_users) = (st.clone(), to_users.clone());
        tasks.push(tokio::task::spawn_local(async move {
            let r = sender(s, c, window, layout, &to_users, &st).await;
            st.finished.set(st.finished.get() + 1);
            if r.is_err() {
                // One sender's failure ends the fill: the others stop drawing.
                st.draws.borrow_mut().halt();
            }
            r
        }));
    }
    let total = st.draws.borrow().total;
    while st.finished.get() < tasks.len() {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let n = st.acked_here.get();
        let secs = st.sw.elapsed_secs();
        report::progress(&format!(
            "fill: {n}/{total} messages acknowledged, {:.0}/s, {:.0} s",
            n as f64 / secs.max(1e-3),
            secs
        ));
        if st.sw.elapsed() > deadline && !st.draws.borrow().stop {
            st.draws.borrow_mut().halt();
        }
    }
    report::progress_done();
    for t in tasks {
        t.await.context("a sender task panicked")??;
    }
    Ok(window)
}

/// One sender account's connection: keeps `window` Sends in flight until its share is sent.
async fn sender(
    s: usize,
    mut c: StarlingConn,
    window: usize,
    layout: Layout,
    to_users: &[u64],
    st: &State,
) -> anyhow::Result<()> {
    let mut inflight: HashMap<u64, (u32, u64)> = HashMap::with_capacity(window);
    let mut k = 0u64;
    // Sends the server asked to have again later (OVERLOADED: the creation of new direct
    // conversations is bounded per shard), and a congestion window: halved on such a refusal
    // (at most once per retry interval), grown by one per window of acknowledgements.
    let mut retry: VecDeque<u32> = VecDeque::new();
    let mut cwnd = window as f64;
    let mut paused_until = 0u64;
    let mut last_write = clock::monotonic_ns();
    loop {
        if st.draws.borrow().stop {
            retry.clear();
        }
        let mut pushed = false;
        while inflight.len() < (cwnd as usize).max(1) && clock::monotonic_ns() >= paused_until {
            let next = match retry.pop_front() {
                Some(i) => Some(i),
                None => st.draws.borrow_mut().take(s),
            };
            let Some(i) = next else {
                break;
            };
            let rid = c.rid();
            c.push(
                rid,
                send_body(to_users[layout.recipient_of(i)], s, k, i, &st.body),
            )?;
            k += 1;
            inflight.insert(rid, (i, clock::monotonic_ns()));
            pushed = true;
        }
        if pushed {
            c.flush().await?;
            last_write = clock::monotonic_ns();
        }
        if inflight.is_empty() {
            if retry.is_empty() && st.draws.borrow().done(s) {
                return Ok(());
            }
            // Idle (waiting for the others): a Ping now and then, within the server's idle
            // timeout.
            if clock::monotonic_ns() > last_write + IDLE_PING_NS {
                c.push(0, Body::Ping(v1::Ping { nonce: 0 }))?;
                c.flush().await?;
                last_write = clock::monotonic_ns();
            }
            // Paused for a retry, or every sender's queue is at its cap (wait for the others).
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        }
        match tokio::time::timeout(Duration::from_secs(30), c.read_some()).await {
            Err(_) => bail!(
                "sender {s}: no answer for 30 s with {} Sends outstanding",
                inflight.len()
            ),
            Ok(r) => {
                if r? == 0 {
                    bail!("the server closed sender {s}'s connection");
                }
            }
        }
        let now = clock::monotonic_ns();
        while let Some(f) = c.next_frame()? {
            // Pushes (request_id 0) are not ours.
            let Some((i, t0)) = inflight.remove(&f.request_id) else {
                continue;
            };
            match f.body {
                Some(Body::SendAck(a)) => {
                    cwnd = (cwnd + 1.0 / cwnd).min(window as f64);
                    st.convs.borrow_mut().ack(i, a.conversation_id, a.seq);
                    let _ = st
                        .hist
                        .borrow_mut()
                        .record((now.saturating_sub(t0) / 1000).max(1));
                    let n = st.acked_here.get() + 1;
                    st.acked_here.set(n);
                    st.acked.fetch_add(1, Ordering::Relaxed);
                    if n == layout.convs {
                        st.create_secs.set(Some(st.sw.elapsed_secs()));
                    }
                }
                Some(Body::Error(e))
                    if e.code == v1::ErrorCode::Overloaded as i32 && e.retry_after_ms > 0 =>
                {
                    retry.push_back(i);
                    st.retries.set(st.retries.get() + 1);
                    if now >= paused_until {
                        cwnd = (cwnd / 2.0).max(1.0);
                        paused_until = now + u64::from(e.retry_after_ms) * 1_000_000;
                    }
                }
                Some(Body::Error(e)) => {
                    let n = st.errors.get() + 1;
                    st.errors.set(n);
                    let why = describe_error(&e);
                    if st.first_errors.borrow().len() < 5 {
                        st.first_errors.borrow_mut().push(why.clone());
                    }
                    if n > ERRORS_MAX {
                        bail!("{n} Sends were refused; the last: {why}");
                    }
                }
                other => bail!(
                    "unexpected answer to a Send: {}",
                    other.map_or("nothing", |b| b.kind().name())
                ),
            }
        }
    }
}

/// A Send of the fill's body to `to_user`; its client id names the sender, its count and the
/// conversation (unique within a run).
pub(super) fn send_body(to_user: u64, s: usize, k: u64, conv: u32, body: &bytes::Bytes) -> Body {
    let mut id = [0u8; 16];
    id[..4].copy_from_slice(&(s as u32).to_le_bytes());
    // Never all zeroes (the server refuses that id).
    id[4..12].copy_from_slice(&(k + 1).to_le_bytes());
    id[12..].copy_from_slice(&conv.to_le_bytes());
    Body::Send(v1::Send {
        client_msg_id: bytes::Bytes::copy_from_slice(&id),
        to: Some(v1::Recipient {
            target: Some(v1::recipient::Target::UserId(to_user)),
        }),
        content_type: "application/octet-stream".to_owned(),
        body: body.clone(),
        media: None,
        reply_to_seq: 0,
        first_attempt: true,
        change: None,
        set_timer: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draws(total: u64, convs: u64, senders: u64) -> Gen {
        let layout = Layout { convs, senders };
        Gen {
            layout,
            next: 0,
            total,
            zipf: Zipf::new(convs, 1.0),
            rng: Rng(3),
            queues: vec![VecDeque::new(); senders as usize],
            queued: 0,
            stop: false,
        }
    }

    #[test]
    fn each_conversation_gets_its_first_message_in_order_then_the_popularity() {
        let mut g = draws(5000, 100, 4);
        let mut per_sender: Vec<Vec<u32>> = vec![Vec::new(); 4];
        let mut n = 0;
        while n < 5000 {
            for (s, got) in per_sender.iter_mut().enumerate() {
                if let Some(i) = g.take(s) {
                    assert_eq!(g.layout.sender_of(i), s, "a sender only gets its own");
                    got.push(i);
                    n += 1;
                }
            }
        }
        assert!((0..4).all(|s| g.done(s)));
        for (s, got) in per_sender.iter().enumerate() {
            // Its 25 conversations, in order, first.
            let first: Vec<u32> = (0..25).map(|j| (j * 4 + s) as u32).collect();
            assert_eq!(got[..25], first[..]);
        }
        // Conversation 0 (rank 1) is the most popular after that.
        let count = |i: u32| per_sender[0].iter().filter(|&&j| j == i).count();
        assert!(count(0) > count(4) && count(4) > count(96));
    }

    #[test]
    fn a_halt_drops_what_was_drawn_and_ends_every_sender() {
        let mut g = draws(1_000_000, 100, 2);
        assert!(g.take(0).is_some());
        g.halt();
        assert_eq!(g.queued, 0);
        assert!(g.take(0).is_none() && g.take(1).is_none());
        assert!(g.done(0) && g.done(1));
    }

    #[test]
    fn client_ids_are_distinct_and_never_all_zeroes() {
        let body = bytes::Bytes::from_static(b"x");
        let id = |s, k, i| match send_body(1, s, k, i, &body) {
            Body::Send(m) => m.client_msg_id,
            _ => unreachable!(),
        };
        assert!(id(0, 0, 0).iter().any(|&b| b != 0));
        assert_ne!(id(0, 0, 0), id(0, 1, 0));
        assert_ne!(id(0, 0, 0), id(1, 0, 0));
        assert_ne!(id(0, 0, 0), id(1 << 31, 0, 0));
    }
}
