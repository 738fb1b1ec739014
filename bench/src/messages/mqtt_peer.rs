//! The MQTT side of `starling-bench messages`: one MQTT 3.1.1 client connection per member at
//! QoS 1 (CONNECT, SUBSCRIBE to its own topic, PUBLISH to its peer's), driven by the same plan,
//! endpoints and records as the Starling side, so both systems are measured alike.

#[allow(clippy::wildcard_imports)]
use super::*;

/// One MQTT client connection.
pub(crate) struct MqttConn {
    stream: Stream,
    rbuf: BytesMut,
    wbuf: BytesMut,
}

impl MqttConn {
    /// CONNECT (clean session) and SUBSCRIBE to `topic` at QoS 1.
    pub(super) async fn open(stream: Stream, client_id: &str, topic: &str) -> anyhow::Result<Self> {
        let mut c = Self {
            stream,
            rbuf: BytesMut::with_capacity(16 * 1024),
            wbuf: BytesMut::new(),
        };
        mqtt::connect(&mut c.wbuf, client_id);
        mqtt::subscribe(&mut c.wbuf, 1, topic);
        c.flush().await?;
        let (mut connack, mut suback) = (false, false);
        while !(connack && suback) {
            if c.read_some().await? == 0 {
                bail!("broker closed the connection during CONNECT");
            }
            while let Some((p, n)) = mqtt::parse(&c.rbuf)? {
                match p {
                    Packet::ConnAck { return_code: 0 } => connack = true,
                    Packet::ConnAck { return_code } => bail!("CONNACK refused: {return_code}"),
                    Packet::SubAck { granted: 1, .. } => suback = true,
                    Packet::SubAck { granted, .. } => {
                        bail!("SUBACK granted {granted:#x}, not QoS 1")
                    }
                    _ => {}
                }
                c.rbuf.advance(n);
            }
        }
        Ok(c)
    }

    async fn flush(&mut self) -> anyhow::Result<()> {
        if !self.wbuf.is_empty() {
            self.stream.write_all(&self.wbuf).await?;
            self.wbuf.clear();
        }
        self.stream.flush().await?;
        Ok(())
    }

    async fn read_some(&mut self) -> anyhow::Result<usize> {
        self.rbuf.reserve(16 * 1024);
        Ok(self.stream.read_buf(&mut self.rbuf).await?)
    }
}

#[allow(
    clippy::too_many_arguments,
    reason = "the hot path's state, passed apart to borrow it apart"
)]
fn due_mqtt(
    c: &mut MqttConn,
    ep: &mut Ep,
    peer_topic: &str,
    plan: &Plan,
    inflight_max: usize,
    dir: u8,
    rec: &Rec,
    body: &mut Vec<u8>,
) {
    let now = rec.now_ns();
    let mut sent = 0;
    if ep.pid_sched.is_empty() {
        ep.pid_sched = vec![0; 65536];
    }
    let first_sched = (ep.next_k < ep.n).then(|| ep.sched_ns(plan.start_ns, ep.next_k));
    while ep.next_k < ep.n && ep.inflight < inflight_max {
        let sched = ep.sched_ns(plan.start_ns, ep.next_k);
        if sched > now {
            break;
        }
        write_body(body, sched, ep.next_k, dir, plan.body_bytes);
        ep.next_pid = ep.next_pid.checked_add(1).unwrap_or(1);
        ep.pid_sched[usize::from(ep.next_pid)] = sched;
        mqtt::publish_qos1(&mut c.wbuf, ep.next_pid, peer_topic, body);
        rec.record_lag(sched, now);
        ep.next_k += 1;
        ep.inflight += 1;
        sent += 1;
    }
    rec.count_sends(
        sent,
        ep.note_window(plan.start_ns, now, inflight_max, first_sched, sent),
    );
    if sent > 0 {
        ep.urgent = true;
    }
}

fn on_mqtt_packets(c: &mut MqttConn, m: usize, eps: &mut [Ep; 2], rec: &Rec) -> anyhow::Result<()> {
    let now = rec.now_ns();
    let mut consumed = 0;
    while let Some((p, n)) = mqtt::parse(&c.rbuf[consumed..])? {
        match p {
            Packet::PubAck { packet_id } => {
                let sched = eps[m].pid_sched[usize::from(packet_id)];
                rec.record_ack(sched, now);
                eps[m].inflight = eps[m].inflight.saturating_sub(1);
                rec.counts.borrow_mut().acked += 1;
            }
            Packet::Publish {
                qos,
                packet_id,
                payload,
                ..
            } => {
                let (sched, k, _dir) =
                    read_body(payload).context("PUBLISH of a foreign payload")?;
                if eps[m].mark(k) {
                    rec.record(&rec.deliver, sched, now);
                    eps[m].delivered += 1;
                    rec.counts.borrow_mut().delivered += 1;
                    *rec.last_delivery_ns.borrow_mut() = now;
                } else {
                    rec.counts.borrow_mut().duplicates += 1;
                }
                if qos == 1 {
                    // Held like Starling's DeliveryAck (`--ack-delay-us`): like with like.
                    mqtt::puback(&mut c.wbuf, packet_id);
                    eps[m].ack_held_since.get_or_insert(now);
                }
            }
            _ => {}
        }
        consumed += n;
    }
    c.rbuf.advance(consumed);
    Ok(())
}

pub(super) async fn mqtt_pair(
    mut c: [MqttConn; 2],
    topics: [String; 2],
    mut eps: [Ep; 2],
    plan: Plan,
    rec: &Rec,
    timer: &Timer,
) -> anyhow::Result<()> {
    let inflight_max = if plan.inflight == 0 {
        64
    } else {
        plan.inflight
    };
    let mut body = Vec::with_capacity(plan.body_bytes);
    let [c0, c1] = &mut c;
    loop {
        due_mqtt(
            c0,
            &mut eps[0],
            &topics[1],
            &plan,
            inflight_max,
            0,
            rec,
            &mut body,
        );
        due_mqtt(
            c1,
            &mut eps[1],
            &topics[0],
            &plan,
            inflight_max,
            1,
            rec,
            &mut body,
        );
        let now = rec.now_ns();
        if !c0.wbuf.is_empty() && eps[0].must_write(now, &plan) {
            c0.flush().await?;
            eps[0].written();
        }
        if !c1.wbuf.is_empty() && eps[1].must_write(now, &plan) {
            c1.flush().await?;
            eps[1].written();
        }
        if pair_done(&eps) || rec.now_ns() > plan.drain_ns || workers::stop_requested() {
            // Acknowledge what was received (the broker would otherwise resend it).
            for (c, e) in [(&mut *c0, &eps[0]), (&mut *c1, &eps[1])] {
                if !c.wbuf.is_empty() && e.ack_held_since.is_some() {
                    c.flush().await?;
                }
            }
            return Ok(());
        }
        let wake = next_wake(&eps, &plan, inflight_max);
        tokio::select! {
            n = c0.read_some() => {
                if n? == 0 { bail!("broker closed the connection"); }
                on_mqtt_packets(c0, 0, &mut eps, rec)?;
            }
            n = c1.read_some() => {
                if n? == 0 { bail!("broker closed the connection"); }
                on_mqtt_packets(c1, 1, &mut eps, rec)?;
            }
            () = timer.sleep_until_ns(wake) => {}
        }
    }
}
