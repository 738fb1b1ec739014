//! The Starling members of `fanout`: member 0 of a group creates it and sends; the others
//! learn their positions with a first Sync, then receive, acknowledge cumulatively (held up to
//! `--ack-delay-us`) and catch up by Sync when the server hints that they fell behind (or, in
//! a group fanned out on read, that it has new messages).

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Context as _, bail};
use starling_protocol::v1::{self, frame::Body};

use super::worker::{self, CONTENT_TYPE, Member, Plan, Seen};
use crate::net::{StarlingConn, Stream, describe_error, source_addr};

/// Connects member `i` (Hello with its account's token), then sends or receives.
pub(crate) async fn member(ctx: &Member, i: u64) -> anyhow::Result<()> {
    let (g, m) = (i / ctx.online, i % ctx.online);
    let acc = ctx
        .accounts
        .get((g * ctx.group_size + m) as usize)
        .context("the accounts file has too few accounts")?;
    let dst = ctx.target.addr();
    let s = Stream::connect(
        dst,
        source_addr(i, ctx.sources, dst),
        ctx.tls.as_ref(),
        Duration::from_secs(30),
    )
    .await?;
    let mut c = StarlingConn::new(s);
    let w = c.hello(Some(&acc.access_token)).await?;
    let limits = w.limits.unwrap_or_default();
    let heartbeat_ns =
        (u64::from(limits.heartbeat_ms) * 1_000_000).clamp(1_000_000_000, ctx.plan.heartbeat_ns);
    // A receiver counts as connected once it knows its positions.
    let mut r = Receiver::default();
    if m != 0 {
        r.catch_up(&mut c).await?;
    }
    ctx.rec.counts.borrow_mut().connected += 1;
    if m == 0 {
        let first = (g * ctx.group_size) as usize + 1;
        let others: Vec<u64> = ctx
            .accounts
            .get(first..first + ctx.group_size as usize - 1)
            .context("the accounts file has too few accounts")?
            .iter()
            .map(|a| a.user_id)
            .collect();
        let conv = create_group(&mut c, g, &others, ctx.plan.members_per_request).await?;
        ctx.rec.counts.borrow_mut().groups_created += 1;
        let window = match ctx.plan.inflight {
            0 => limits.inflight_requests_max as usize,
            n => n.min(limits.inflight_requests_max as usize),
        }
        .max(1);
        send(ctx, &mut c, g, conv, window, heartbeat_ns).await
    } else {
        receive(ctx, &mut c, g, r, heartbeat_ns).await
    }
}

/// CreateGroup with the first `per_request` members, AddGroupMembers for the rest; the
/// group's conversation.
async fn create_group(
    c: &mut StarlingConn,
    g: u64,
    others: &[u64],
    per_request: usize,
) -> anyhow::Result<u64> {
    let (head, tail) = others.split_at(per_request.min(others.len()));
    let conv = match c
        .request(Body::CreateGroup(v1::CreateGroup {
            name: format!("bench {g}"),
            member_user_ids: head.to_vec(),
            ..Default::default()
        }))
        .await?
    {
        Body::GroupInfo(info) => info.conversation_id,
        Body::Error(e) => bail!("CreateGroup refused: {}", describe_error(&e)),
        other => bail!("unexpected answer to CreateGroup: {}", other.kind().name()),
    };
    for chunk in tail.chunks(per_request) {
        match c
            .request(Body::AddGroupMembers(v1::AddGroupMembers {
                conversation_id: conv,
                user_ids: chunk.to_vec(),
            }))
            .await?
        {
            Body::Error(e) => bail!("AddGroupMembers refused: {}", describe_error(&e)),
            Body::GroupInfo(_) | Body::Done(_) => {}
            other => bail!(
                "unexpected answer to AddGroupMembers: {}",
                other.kind().name()
            ),
        }
    }
    Ok(conv)
}

/// The group's sender: `plan.n` messages on the schedule, at most `window` unacknowledged.
async fn send(
    ctx: &Member,
    c: &mut StarlingConn,
    g: u64,
    conv: u64,
    window: usize,
    heartbeat_ns: u64,
) -> anyhow::Result<()> {
    let (plan, rec, timer) = (&ctx.plan, &*ctx.rec, &*ctx.timer);
    ping_until_start(c, rec, heartbeat_ns).await?;
    let Some(start) = rec.start_ns.get() else {
        return Ok(());
    };
    let mut body = Vec::with_capacity(plan.body_bytes);
    let mut pacer = worker::Pacer::new(start, g, window);
    loop {
        let now = rec.now_ns();
        let mut sent = 0;
        while let Some(sched) = pacer.due(plan, now) {
            let next_k = pacer.next_k;
            worker::write_body(&mut body, rec.mono(sched), g, next_k, plan.body_bytes);
            let mut id = [0u8; 16];
            id[..8].copy_from_slice(&sched.to_le_bytes());
            id[8..].copy_from_slice(&next_k.to_le_bytes());
            let rid = c.rid();
            c.push(
                rid,
                Body::Send(v1::Send {
                    client_msg_id: bytes::Bytes::copy_from_slice(&id),
                    to: Some(v1::Recipient {
                        target: Some(v1::recipient::Target::ConversationId(conv)),
                    }),
                    content_type: CONTENT_TYPE.to_owned(),
                    body: bytes::Bytes::copy_from_slice(&body),
                    media: None,
                    reply_to_seq: 0,
                    first_attempt: true,
                    change: None,
                    set_timer: None,
                }),
            )?;
            pacer.sent(plan, rec, now, sched);
            sent += 1;
        }
        let wake = pacer.after_burst(plan, now);
        if sent > 0 {
            rec.counts.borrow_mut().sent += sent;
            c.flush().await?;
        }
        if pacer.done(plan) || worker::run_over(rec, plan) {
            return Ok(());
        }
        tokio::select! {
            n = c.read_some() => {
                if n? == 0 { bail!("server closed the connection"); }
                while let Some(f) = c.next_frame()? {
                    match f.body {
                        Some(Body::SendAck(a)) => {
                            let sched = a
                                .client_msg_id
                                .get(..8)
                                .and_then(|b| b.try_into().ok())
                                .map(u64::from_le_bytes)
                                .context("SendAck with a foreign client_msg_id")?;
                            let k = a
                                .client_msg_id
                                .get(8..16)
                                .and_then(|b| b.try_into().ok())
                                .map(u64::from_le_bytes)
                                .unwrap_or(0);
                            if k >= plan.warm_k {
                                rec.ack
                                    .borrow_mut()
                                    .saturating_record(rec.now_ns().saturating_sub(sched) / 1000);
                            }
                            pacer.acked();
                            rec.counts.borrow_mut().acked += 1;
                        }
                        Some(Body::Receipt(_) | Body::GroupReceipts(_)) => {
                            rec.counts.borrow_mut().receipts += 1;
                        }
                        Some(Body::Error(e)) => bail!("Send refused: {}", describe_error(&e)),
                        Some(Body::Goodbye(g)) => bail!("server said Goodbye: {}", g.message),
                        _ => {}
                    }
                }
            }
            () = timer.sleep_until_ns(wake) => {}
        }
    }
}

/// Before the start: answers nothing, reads and drops what comes (group events), pings.
async fn ping_until_start(
    c: &mut StarlingConn,
    rec: &super::Rec,
    heartbeat_ns: u64,
) -> anyhow::Result<()> {
    let mut last_ping = rec.now_ns();
    while rec.start_ns.get().is_none() {
        if crate::workers::stop_requested() {
            return Ok(());
        }
        if rec.now_ns() > last_ping + heartbeat_ns {
            c.push(0, Body::Ping(v1::Ping { nonce: 1 }))?;
            c.flush().await?;
            last_ping = rec.now_ns();
        }
        tokio::select! {
            n = c.read_some() => {
                if n? == 0 { bail!("server closed the connection"); }
                while let Some(f) = c.next_frame()? {
                    match f.body {
                        Some(Body::Error(e)) => bail!("server error: {}", describe_error(&e)),
                        Some(Body::Goodbye(g)) => bail!("server said Goodbye: {}", g.message),
                        _ => {}
                    }
                }
            }
            () = tokio::time::sleep(Duration::from_millis(5)) => {}
        }
    }
    Ok(())
}

/// A receiving member: from the connection on until it has every message of its group or the
/// run is over.
async fn receive(
    ctx: &Member,
    c: &mut StarlingConn,
    g: u64,
    mut r: Receiver,
    heartbeat_ns: u64,
) -> anyhow::Result<()> {
    let (plan, rec, timer) = (&ctx.plan, &*ctx.rec, &*ctx.timer);
    let mut seen = Seen::new(g, plan.n);
    let mut last_write = rec.now_ns();
    loop {
        let now = rec.now_ns();
        let done = rec.start_ns.get().is_some() && seen.complete(plan);
        let over = done || worker::run_over(rec, plan);
        if r.ack_unsent.is_some()
            && (over || r.held_since.is_some_and(|t| now >= t + plan.ack_delay_ns))
        {
            r.push_ack(c)?;
        }
        if now > last_write + heartbeat_ns {
            c.push(0, Body::Ping(v1::Ping { nonce: 1 }))?;
        }
        if c.pending_write() > 0 {
            c.flush().await?;
            last_write = rec.now_ns();
        }
        if over {
            return Ok(());
        }
        let mut wake = last_write + heartbeat_ns;
        if let Some(t) = r.held_since {
            wake = wake.min(t + plan.ack_delay_ns);
        }
        if let Some(s) = rec.start_ns.get() {
            wake = wake.min(s + plan.run_ns);
        } else {
            // Before the start, look at the parent's signal now and then.
            wake = wake.min(now + 50_000_000);
        }
        tokio::select! {
            n = c.read_some() => {
                if n? == 0 { bail!("server closed the connection"); }
                r.on_frames(c, &mut seen, plan, rec)?;
            }
            () = timer.sleep_until_ns(plan.quantize(wake)) => {}
        }
    }
}

/// A receiver's protocol state.
#[derive(Debug, Default)]
struct Receiver {
    /// Per conversation, the highest seq up to which this connection has every entry it may
    /// see (from the first it got: its join): the DeliveryAck and Sync position. Every known
    /// conversation goes into each Sync, so that an account's other conversations (an earlier
    /// run's) are not sent again.
    upto: HashMap<u64, u64>,
    syncing: bool,
    /// A hint came while a Sync was under way: sync again when it is done.
    resync: bool,
    /// The connection's first Sync, before the run: positions only, nothing recorded.
    catching_up: bool,
    /// The cumulative DeliveryAck not yet queued, and since when it waits (ns).
    ack_unsent: Option<(u64, u64)>,
    held_since: Option<u64>,
}

impl Receiver {
    /// Before the run: one Sync of everything the account has (an earlier run's groups and
    /// conversations), to learn its positions, so that the run's Syncs fetch only the run's
    /// messages.
    async fn catch_up(&mut self, c: &mut StarlingConn) -> anyhow::Result<()> {
        self.catching_up = true;
        self.push_sync(c)?;
        c.flush().await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while self.catching_up {
            let n = tokio::time::timeout_at(deadline, c.read_some())
                .await
                .context("no end of the first Sync within 60 s")??;
            if n == 0 {
                bail!("server closed the connection");
            }
            while let Some(f) = c.next_frame()? {
                match f.body {
                    Some(Body::Deliver(d)) => {
                        let msg = d.message.context("Deliver without a message")?;
                        self.advance(msg.conversation_id, msg.seq);
                    }
                    Some(Body::SyncDone(done)) => {
                        self.syncing = false;
                        if done.truncated.is_empty() {
                            self.catching_up = false;
                        } else {
                            for t in &done.truncated {
                                self.upto.entry(t.conversation_id).or_insert(0);
                            }
                            self.push_sync(c)?;
                            c.flush().await?;
                        }
                    }
                    Some(Body::Error(e)) => bail!("server error: {}", describe_error(&e)),
                    Some(Body::Goodbye(g)) => bail!("server said Goodbye: {}", g.message),
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// Entry `seq` of `conv` arrived: the contiguous position moves if it was the next one
    /// (live Delivers come in seq order; after a gap the position waits for the Sync that
    /// fills it). The first entry of a conversation sets it (a member's first visible seq).
    fn advance(&mut self, conv: u64, seq: u64) -> u64 {
        let u = self.upto.entry(conv).or_insert(0);
        if *u == 0 || seq == *u + 1 {
            *u = seq;
        }
        *u
    }

    fn on_frames(
        &mut self,
        c: &mut StarlingConn,
        seen: &mut Seen,
        plan: &Plan,
        rec: &super::Rec,
    ) -> anyhow::Result<()> {
        let now = rec.now_ns();
        while let Some(f) = c.next_frame()? {
            match f.body {
                Some(Body::Deliver(d)) => {
                    let msg = d.message.context("Deliver without a message")?;
                    let upto = self.advance(msg.conversation_id, msg.seq);
                    if msg.content_type == CONTENT_TYPE {
                        seen.on_body(&msg.body, plan, rec, now)?;
                    }
                    if plan.delivery_acks {
                        self.ack_unsent = Some((msg.conversation_id, upto));
                        self.held_since.get_or_insert(now);
                    }
                }
                Some(Body::MessagesAvailable(h)) => {
                    rec.counts.borrow_mut().hints += 1;
                    self.upto.entry(h.conversation_id).or_insert(0);
                    if self.syncing {
                        self.resync = true;
                    } else {
                        self.sync(c, rec)?;
                    }
                }
                Some(Body::SyncDone(done)) => {
                    self.syncing = false;
                    if !done.truncated.is_empty() || std::mem::take(&mut self.resync) {
                        self.sync(c, rec)?;
                    }
                }
                Some(Body::Receipt(_) | Body::GroupReceipts(_)) => {
                    rec.counts.borrow_mut().receipts += 1;
                }
                Some(Body::Error(e)) => bail!("server error: {}", describe_error(&e)),
                Some(Body::Goodbye(g)) => bail!("server said Goodbye: {}", g.message),
                _ => {}
            }
        }
        Ok(())
    }

    /// Asks for everything after the contiguous position of every known conversation.
    fn sync(&mut self, c: &mut StarlingConn, rec: &super::Rec) -> anyhow::Result<()> {
        self.push_sync(c)?;
        rec.counts.borrow_mut().syncs += 1;
        Ok(())
    }

    fn push_sync(&mut self, c: &mut StarlingConn) -> anyhow::Result<()> {
        let rid = c.rid();
        c.push(
            rid,
            Body::Sync(v1::Sync {
                last_seq: self.upto.iter().map(|(&k, &v)| (k, v)).collect(),
            }),
        )?;
        self.syncing = true;
        Ok(())
    }

    fn push_ack(&mut self, c: &mut StarlingConn) -> anyhow::Result<()> {
        if let Some((conv, seq)) = self.ack_unsent.take() {
            c.push(
                0,
                Body::DeliveryAck(v1::DeliveryAck {
                    conversation_id: conv,
                    up_to_seq: seq,
                }),
            )?;
        }
        self.held_since = None;
        Ok(())
    }
}
