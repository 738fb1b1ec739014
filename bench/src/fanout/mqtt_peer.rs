//! The MQTT members of `fanout`, like for like with Starling's: member 0 of a group is one
//! MQTT 3.1.1 publisher at QoS 1 to the topic `sb-fanout/G`, the other N − 1 subscribe to it at
//! QoS 1 and PUBACK what they receive (held up to `--ack-delay-us`, as Starling's receivers
//! hold their DeliveryAck). Same schedule, bodies and records.

use std::time::Duration;

use anyhow::{Context as _, bail};
use bytes::{Buf as _, BytesMut};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::worker::{self, Member, Seen};
use crate::mqtt::{self, Packet};
use crate::net::{Stream, source_addr};

struct Conn {
    stream: Stream,
    rbuf: BytesMut,
    wbuf: BytesMut,
}

impl Conn {
    async fn flush(&mut self) -> anyhow::Result<()> {
        if !self.wbuf.is_empty() {
            self.stream.write_all(&self.wbuf).await?;
            self.wbuf.clear();
        }
        self.stream.flush().await?;
        Ok(())
    }

    async fn read_some(&mut self) -> anyhow::Result<()> {
        self.rbuf.reserve(16 * 1024);
        if self.stream.read_buf(&mut self.rbuf).await? == 0 {
            bail!("broker closed the connection");
        }
        Ok(())
    }
}

fn topic(g: u64) -> String {
    format!("sb-fanout/{g}")
}

/// Connects member `i` (CONNECT; a receiver also SUBSCRIBEs), then publishes or receives.
pub(crate) async fn member(ctx: &Member, i: u64) -> anyhow::Result<()> {
    let (g, m) = (i / ctx.online, i % ctx.online);
    let dst = ctx.target.addr();
    let stream = Stream::connect(
        dst,
        source_addr(i, ctx.sources, dst),
        ctx.tls.as_ref(),
        Duration::from_secs(30),
    )
    .await?;
    let mut c = Conn {
        stream,
        rbuf: BytesMut::with_capacity(16 * 1024),
        wbuf: BytesMut::new(),
    };
    mqtt::connect(&mut c.wbuf, &format!("sbf-{g}-{m}"));
    if m > 0 {
        mqtt::subscribe(&mut c.wbuf, 1, &topic(g));
    }
    c.flush().await?;
    let (mut connack, mut suback) = (false, m == 0);
    while !(connack && suback) {
        c.read_some().await?;
        while let Some((p, n)) = mqtt::parse(&c.rbuf)? {
            match p {
                Packet::ConnAck { return_code: 0 } => connack = true,
                Packet::ConnAck { return_code } => bail!("CONNACK refused: {return_code}"),
                Packet::SubAck { granted: 1, .. } => suback = true,
                Packet::SubAck { granted, .. } => bail!("SUBACK granted {granted:#x}, not QoS 1"),
                _ => {}
            }
            c.rbuf.advance(n);
        }
    }
    ctx.rec.counts.borrow_mut().connected += 1;
    if m == 0 {
        // Nothing to create: the topic exists once subscribed to.
        ctx.rec.counts.borrow_mut().groups_created += 1;
        publish(ctx, &mut c, g).await
    } else {
        receive(ctx, &mut c, g).await
    }
}

async fn publish(ctx: &Member, c: &mut Conn, g: u64) -> anyhow::Result<()> {
    let (plan, rec, timer) = (&ctx.plan, &*ctx.rec, &*ctx.timer);
    if !worker::wait_for_start(rec).await {
        return Ok(());
    }
    let Some(start) = rec.start_ns.get() else {
        return Ok(());
    };
    let window = if plan.inflight == 0 {
        64
    } else {
        plan.inflight
    };
    let topic = topic(g);
    let mut pid_k = vec![0u64; 65536];
    let mut body = Vec::with_capacity(plan.body_bytes);
    let mut pacer = worker::Pacer::new(start, g, window);
    let mut next_pid = 0u16;
    loop {
        let now = rec.now_ns();
        let mut sent = 0;
        while let Some(sched) = pacer.due(plan, now) {
            let next_k = pacer.next_k;
            worker::write_body(&mut body, rec.mono(sched), g, next_k, plan.body_bytes);
            next_pid = next_pid.checked_add(1).unwrap_or(1);
            pid_k[usize::from(next_pid)] = next_k;
            mqtt::publish_qos1(&mut c.wbuf, next_pid, &topic, &body);
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
            r = c.read_some() => {
                r?;
                let now = rec.now_ns();
                while let Some((p, n)) = mqtt::parse(&c.rbuf)? {
                    if let Packet::PubAck { packet_id } = p {
                        let k = pid_k[usize::from(packet_id)];
                        if k >= plan.warm_k {
                            let sched = plan.sched_ns(start, g, k);
                            rec.ack
                                .borrow_mut()
                                .saturating_record(now.saturating_sub(sched) / 1000);
                        }
                        pacer.acked();
                        rec.counts.borrow_mut().acked += 1;
                    }
                    c.rbuf.advance(n);
                }
            }
            () = timer.sleep_until_ns(wake) => {}
        }
    }
}

async fn receive(ctx: &Member, c: &mut Conn, g: u64) -> anyhow::Result<()> {
    let (plan, rec, timer) = (&ctx.plan, &*ctx.rec, &*ctx.timer);
    let mut seen = Seen::new(g, plan.n);
    let mut held_since: Option<u64> = None;
    loop {
        let now = rec.now_ns();
        let done = rec.start_ns.get().is_some() && seen.complete(plan);
        let over = done || worker::run_over(rec, plan);
        if !c.wbuf.is_empty() && (over || held_since.is_some_and(|t| now >= t + plan.ack_delay_ns))
        {
            c.flush().await?;
            held_since = None;
        }
        if over {
            return Ok(());
        }
        let mut wake = now + 50_000_000;
        if let Some(t) = held_since {
            wake = wake.min(t + plan.ack_delay_ns);
        }
        if let Some(s) = rec.start_ns.get() {
            wake = wake.min(s + plan.run_ns);
        }
        tokio::select! {
            r = c.read_some() => {
                r?;
                let now = rec.now_ns();
                let mut consumed = 0;
                while let Some((p, n)) = mqtt::parse(&c.rbuf[consumed..])? {
                    if let Packet::Publish { qos, packet_id, payload, .. } = p {
                        seen.on_body(payload, plan, rec, now).context("a PUBLISH")?;
                        if qos == 1 {
                            mqtt::puback(&mut c.wbuf, packet_id);
                            held_since.get_or_insert(now);
                        }
                    }
                    consumed += n;
                }
                c.rbuf.advance(consumed);
            }
            () = timer.sleep_until_ns(plan.quantize(wake)) => {}
        }
    }
}
