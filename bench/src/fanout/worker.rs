//! A `fanout` worker process: connects its share of the members (connection `g × N + m` is
//! member `m` of group `g`), lets each group's sender create its group, reports set-up done,
//! and on the parent's signal runs the schedule. What both systems share: the body, the plan,
//! a receiver's bookkeeping.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;

use super::{FanoutArgs, Rec, mqtt_peer, starling};
use crate::accounts::{Account, AccountsFile};
use crate::net::{Target, tls_for};
use crate::report;
use crate::timer::Timer;
use crate::workers;

/// Body header: scheduled send (`CLOCK_MONOTONIC` ns), group, index in the group.
pub(crate) const BODY_HEADER: usize = 24;

/// The content type of the benchmark's messages (group events and the like are skipped).
pub(crate) const CONTENT_TYPE: &str = "application/x-starling-bench-fanout";

pub(crate) fn write_body(buf: &mut Vec<u8>, sched_mono: u64, g: u64, k: u64, len: usize) {
    buf.clear();
    buf.extend_from_slice(&sched_mono.to_le_bytes());
    buf.extend_from_slice(&g.to_le_bytes());
    buf.extend_from_slice(&k.to_le_bytes());
    buf.resize(len.max(BODY_HEADER), 0x2a);
}

/// (scheduled send, group, index) of a benchmark body.
pub(crate) fn read_body(b: &[u8]) -> Option<(u64, u64, u64)> {
    let word = |i: usize| Some(u64::from_le_bytes(b.get(i..i + 8)?.try_into().ok()?));
    Some((word(0)?, word(8)?, word(16)?))
}

/// The schedule and settings every member of a worker shares.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Plan {
    pub(crate) groups: u64,
    /// Messages per group, of which the first `warm_k` are not recorded.
    pub(crate) n: u64,
    pub(crate) warm_k: u64,
    /// Between two messages of one group.
    pub(crate) interval_ns: u64,
    pub(crate) body_bytes: usize,
    pub(crate) inflight: usize,
    pub(crate) tick_ns: u64,
    pub(crate) ack_delay_ns: u64,
    pub(crate) delivery_acks: bool,
    /// How long after the start members keep going at most.
    pub(crate) run_ns: u64,
    pub(crate) heartbeat_ns: u64,
    pub(crate) members_per_request: usize,
}

impl Plan {
    fn of(args: &FanoutArgs) -> Self {
        Self {
            groups: args.groups,
            n: args.per_group(),
            warm_k: args.warm_k(),
            interval_ns: (1e9 * args.groups as f64 / args.rate) as u64,
            body_bytes: args.body_bytes,
            inflight: args.inflight,
            tick_ns: args.tick_us.max(1) * 1000,
            ack_delay_ns: args.ack_delay_us * 1000,
            delivery_acks: !args.no_delivery_acks,
            run_ns: (args.duration_secs + args.drain_secs) * 1_000_000_000,
            heartbeat_ns: 20_000_000_000,
            members_per_request: args.members_per_request,
        }
    }

    /// Group `g`'s message `k`, in ns since the worker's epoch.
    pub(crate) fn sched_ns(&self, start_ns: u64, g: u64, k: u64) -> u64 {
        start_ns + self.interval_ns * g / self.groups.max(1) + k * self.interval_ns
    }

    /// Rounds a wake-up up to the tick grid.
    pub(crate) fn quantize(&self, t: u64) -> u64 {
        t.div_ceil(self.tick_ns).saturating_mul(self.tick_ns)
    }
}

/// A group sender's open loop, the same for Starling and the MQTT peer: the next message, how
/// many are unacknowledged (at most `window`), and which sends waited for the window.
pub(crate) struct Pacer {
    pub(crate) next_k: u64,
    inflight: usize,
    window: usize,
    start: u64,
    g: u64,
    /// The highest index that was due while the window was full: sends up to it waited.
    blocked_upto: Option<u64>,
}

impl Pacer {
    pub(crate) fn new(start: u64, g: u64, window: usize) -> Self {
        Self {
            next_k: 0,
            inflight: 0,
            window,
            start,
            g,
            blocked_upto: None,
        }
    }

    /// The scheduled time of message `next_k`, if the window has room and it is due at `now`.
    pub(crate) fn due(&self, plan: &Plan, now: u64) -> Option<u64> {
        if self.next_k >= plan.n || self.inflight >= self.window {
            return None;
        }
        let sched = plan.sched_ns(self.start, self.g, self.next_k);
        (sched <= now).then_some(sched)
    }

    /// Message `next_k`, scheduled at `sched`, went out at `now`: its send lag and whether it
    /// waited for the window are recorded.
    pub(crate) fn sent(&mut self, plan: &Plan, rec: &Rec, now: u64, sched: u64) {
        if self.next_k >= plan.warm_k {
            rec.lag
                .borrow_mut()
                .saturating_record(now.saturating_sub(sched) / 1000);
        }
        if self.blocked_upto.is_some_and(|b| self.next_k <= b) {
            rec.counts.borrow_mut().window_waits += 1;
        }
        self.next_k += 1;
        self.inflight += 1;
    }

    /// After a burst of sends at `now`: notes what is due while the window is full, and returns
    /// when to wake next (the next send's slot, or the end of the run).
    pub(crate) fn after_burst(&mut self, plan: &Plan, now: u64) -> u64 {
        let more = self.next_k < plan.n;
        if more
            && self.inflight >= self.window
            && plan.sched_ns(self.start, self.g, self.next_k) <= now
        {
            let due = (now - plan.sched_ns(self.start, self.g, 0)) / plan.interval_ns.max(1);
            self.blocked_upto = Some(due.min(plan.n - 1));
        }
        if more && self.inflight < self.window {
            plan.quantize(plan.sched_ns(self.start, self.g, self.next_k))
        } else {
            self.start + plan.run_ns
        }
    }

    /// Every message sent and acknowledged.
    pub(crate) fn done(&self, plan: &Plan) -> bool {
        self.next_k >= plan.n && self.inflight == 0
    }

    /// One send was acknowledged.
    pub(crate) fn acked(&mut self) {
        self.inflight = self.inflight.saturating_sub(1);
    }
}

/// What one receiving member saw.
#[derive(Debug)]
pub(crate) struct Seen {
    pub(crate) g: u64,
    bits: Vec<u64>,
    pub(crate) got: u64,
}

impl Seen {
    pub(crate) fn new(g: u64, n: u64) -> Self {
        Self {
            g,
            bits: vec![0; n.div_ceil(64) as usize],
            got: 0,
        }
    }

    /// A benchmark body arrived at `now`: records it once, counts a copy as a duplicate.
    pub(crate) fn on_body(
        &mut self,
        body: &[u8],
        plan: &Plan,
        rec: &Rec,
        now: u64,
    ) -> anyhow::Result<()> {
        let (sched, g, k) = read_body(body).context("a message with a foreign body")?;
        anyhow::ensure!(
            g == self.g && k < plan.n,
            "message {k} of group {g} arrived at a member of group {}",
            self.g
        );
        let (w, b) = ((k / 64) as usize, k % 64);
        if self.bits[w] & (1 << b) != 0 {
            rec.counts.borrow_mut().duplicates += 1;
            return Ok(());
        }
        self.bits[w] |= 1 << b;
        self.got += 1;
        rec.delivered((g * plan.n + k) as usize, sched, now, k >= plan.warm_k);
        Ok(())
    }

    pub(crate) fn complete(&self, plan: &Plan) -> bool {
        self.got >= plan.n
    }
}

/// Whether a member should stop: the run is over (or the parent stopped it).
pub(crate) fn run_over(rec: &Rec, plan: &Plan) -> bool {
    workers::stop_requested()
        || rec
            .start_ns
            .get()
            .is_some_and(|s| rec.now_ns() > s + plan.run_ns)
}

/// Waits for the parent's signal to start (`rec.start_ns` set); false if told to stop instead.
pub(crate) async fn wait_for_start(rec: &Rec) -> bool {
    while rec.start_ns.get().is_none() {
        if workers::stop_requested() {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    true
}

pub(crate) fn run(args: &FanoutArgs, system: &str) -> anyhow::Result<()> {
    workers::watch_stdin();
    let target = Target::parse(match (system, &args.peer) {
        ("peer", Some(p)) => p,
        _ => &args.target,
    })?;
    let tls = tls_for(&target, args.ca.as_deref(), args.data_dir.as_deref(), false)?;
    let accounts: Rc<Vec<Account>> = Rc::new(if target.is_mqtt() {
        Vec::new()
    } else {
        AccountsFile::load(&args.accounts)?.accounts
    });
    let (count, first) = args.w.share(args.connections());
    let plan = Plan::of(args);
    let cpu0 = report::own_cpu_secs();
    let rec = Rc::new(Rec::new((plan.n * plan.groups) as usize));
    let senders_here = (first..first + count)
        .filter(|i| i % args.online() == 0)
        .count() as u64;
    workers::block_on(async {
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async {
                let timer = Timer::start(rec.epoch).context("creating the timerfd")?;
                let members = Rc::new(RefCell::new(Vec::new()));
                let next = Rc::new(RefCell::new(first));
                let mut lanes = Vec::new();
                for _ in 0..32 {
                    let ctx = Member {
                        target: target.clone(),
                        tls: tls.clone(),
                        accounts: accounts.clone(),
                        rec: rec.clone(),
                        timer: timer.clone(),
                        plan,
                        group_size: args.group_size,
                        online: args.online(),
                        sources: args.sources,
                    };
                    let (members, next) = (members.clone(), next.clone());
                    lanes.push(tokio::task::spawn_local(async move {
                        loop {
                            let i = {
                                let mut n = next.borrow_mut();
                                if *n >= first + count || workers::stop_requested() {
                                    return;
                                }
                                *n += 1;
                                *n - 1
                            };
                            let ctx = ctx.clone();
                            members
                                .borrow_mut()
                                .push(tokio::task::spawn_local(async move {
                                    let (g, m) = (i / ctx.online, i % ctx.online);
                                    let r = if ctx.target.is_mqtt() {
                                        mqtt_peer::member(&ctx, i).await
                                    } else {
                                        starling::member(&ctx, i).await
                                    };
                                    if let Err(e) = r {
                                        ctx.rec.error(&e.context(format!("group {g} member {m}")));
                                    }
                                    ctx.rec.counts.borrow_mut().finished += 1;
                                }));
                        }
                    }));
                }
                let mut setup_reported = false;
                for tick in 0u64.. {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    let lanes_done = lanes.iter().all(tokio::task::JoinHandle::is_finished);
                    if !setup_reported && lanes_done {
                        let c = rec.counts.borrow();
                        // Every connection tried, and every group of ours created or failed.
                        let tried = c.connected + c.errors >= count
                            && c.groups_created + c.errors >= senders_here;
                        drop(c);
                        if tried {
                            rec.counts.borrow_mut().setup_done = 1;
                            setup_reported = true;
                        }
                    }
                    if rec.start_ns.get().is_none() && workers::signals() > 0 {
                        // The senders of every worker start together: at the first 100-ms mark
                        // of CLOCK_MONOTONIC at least 200 ms after the signal (which reaches
                        // the workers within a few ms of each other).
                        rec.start_ns.set(Some(
                            start_after(rec.mono(rec.now_ns())) - rec.epoch_mono_ns,
                        ));
                        rec.counts.borrow_mut().scheduled = senders_here * plan.n;
                    }
                    if tick % 10 == 0 {
                        workers::emit("progress", &*rec.counts.borrow());
                    }
                    let all_done = lanes_done
                        && members
                            .borrow()
                            .iter()
                            .all(tokio::task::JoinHandle::is_finished);
                    if (all_done && setup_reported) || workers::stop_requested() {
                        break;
                    }
                }
                workers::emit("result", &rec.result(report::own_cpu_secs() - cpu0));
                Ok::<(), anyhow::Error>(())
            })
            .await
    })?
}

/// The start of the senders (`CLOCK_MONOTONIC` ns) for a signal seen at `mono_now`.
fn start_after(mono_now: u64) -> u64 {
    const GRID_NS: u64 = 100_000_000;
    (mono_now + 200_000_000).div_ceil(GRID_NS) * GRID_NS
}

/// What a member's task needs.
#[derive(Clone)]
pub(crate) struct Member {
    pub(crate) target: Target,
    pub(crate) tls: Option<Arc<rustls::ClientConfig>>,
    pub(crate) accounts: Rc<Vec<Account>>,
    pub(crate) rec: Rc<Rec>,
    pub(crate) timer: Rc<Timer>,
    pub(crate) plan: Plan,
    pub(crate) group_size: u64,
    /// Members per group with a connection: connection `i` is member `i % online` of group
    /// `i / online`.
    pub(crate) online: u64,
    pub(crate) sources: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_round_trip_and_short_ones_are_foreign() {
        let mut b = Vec::new();
        write_body(&mut b, 123, 4, 5, 100);
        assert_eq!(b.len(), 100);
        assert_eq!(read_body(&b), Some((123, 4, 5)));
        assert_eq!(read_body(&b[..23]), None);
    }

    #[test]
    fn a_member_records_each_message_once_and_refuses_another_groups() {
        let plan = Plan {
            groups: 2,
            n: 3,
            warm_k: 1,
            interval_ns: 1_000_000,
            body_bytes: 24,
            inflight: 0,
            tick_ns: 100_000,
            ack_delay_ns: 0,
            delivery_acks: true,
            run_ns: 1,
            heartbeat_ns: 1,
            members_per_request: 10,
        };
        let rec = Rec::new(6);
        let mut seen = Seen::new(1, 3);
        let mut b = Vec::new();
        for k in [0, 1, 1, 2] {
            write_body(&mut b, rec.mono(0), 1, k, 24);
            seen.on_body(&b, &plan, &rec, 2_000_000).unwrap();
        }
        assert!(seen.complete(&plan));
        let c = rec.counts.borrow().clone();
        assert_eq!(
            (c.delivered, c.measured_deliveries, c.duplicates),
            (3, 2, 1)
        );
        assert_eq!(&rec.got.borrow()[..], &[0, 0, 0, 0, 1, 1]);
        assert!(rec.slowest_us.borrow()[4] >= 2000);
        write_body(&mut b, 0, 0, 1, 24);
        assert!(seen.on_body(&b, &plan, &rec, 0).is_err());
        assert_eq!(start_after(1_050_000_001), 1_300_000_000);
        // Sends of group 1 are offset by half an interval from group 0's.
        assert_eq!(plan.sched_ns(10, 1, 2), 10 + 500_000 + 2_000_000);
    }
}
