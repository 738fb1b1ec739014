//! After the fill: Sync, history and Send latency of cold and hot conversations (one request at
//! a time, on an otherwise idle server), and the check that conversations still hold what was
//! acknowledged.

use std::collections::HashMap;
use std::net::SocketAddr;

use anyhow::bail;
use hdrhistogram::Histogram;
use serde::Serialize;
use starling_protocol::v1::{self, frame::Body};

use super::fill::send_body;
use super::{Convs, Layout, open_conn};
use crate::accounts::Account;
use crate::clock::Stopwatch;
use crate::net::{StarlingConn, describe_error};
use crate::report::{self, Summary};

/// Open recipient connections kept at once (each Sync opens its recipient's).
const RECIPIENT_CONNS_MAX: usize = 64;
/// Pages one verification reads at most per conversation.
const VERIFY_PAGES_MAX: u32 = 50;
/// Messages per history page in the verification (a page is also capped at 48 KiB).
const VERIFY_PAGE: u32 = 100;

/// Latencies of one kind of conversation.
#[derive(Debug, Clone, Serialize)]
pub(super) struct OpStats {
    /// Sync by the recipient (its map at every conversation's latest seq, this one's one
    /// short): → the one Deliver and SyncDone.
    pub(super) sync_us: Summary,
    /// GetHistory, the latest page (50) → HistoryPage.
    pub(super) history_us: Summary,
    /// Send → SendAck.
    pub(super) send_us: Summary,
    /// Answers that were not what the conversation held.
    pub(super) wrong: u64,
    pub(super) first_wrong: Vec<String>,
}

/// The outcome of one verification.
#[derive(Debug, Clone, Default, Serialize)]
pub(super) struct Verified {
    pub(super) conversations: u64,
    /// Of them, the ones whose every message was counted (at most `VERIFY_PAGES_MAX` pages).
    pub(super) counted: u64,
    pub(super) wrong: u64,
    pub(super) first_wrong: Vec<String>,
    pub(super) secs: f64,
}

/// The probes' connections: one per sender account, recipients' as needed.
#[derive(Debug)]
pub(super) struct Probe<'a> {
    dst: SocketAddr,
    accounts: &'a [Account],
    layout: Layout,
    senders: Vec<StarlingConn>,
    recipients: HashMap<usize, StarlingConn>,
    sent: u64,
}

impl<'a> Probe<'a> {
    pub(super) async fn open(
        dst: SocketAddr,
        accounts: &'a [Account],
        layout: Layout,
    ) -> anyhow::Result<Self> {
        let mut p = Self {
            dst,
            accounts,
            layout,
            senders: Vec::new(),
            recipients: HashMap::new(),
            sent: 0,
        };
        p.fresh().await?;
        Ok(p)
    }

    /// New connections for every sender, none for recipients: a phase's connections are never
    /// older than the phase, so none reaches the server's idle timeout however slow the
    /// requests are.
    async fn fresh(&mut self) -> anyhow::Result<()> {
        self.recipients.clear();
        self.senders.clear();
        for (i, acc) in self.accounts[..self.layout.senders as usize]
            .iter()
            .enumerate()
        {
            self.senders
                .push(open_conn(self.dst, acc, i as u64).await?.0);
        }
        Ok(())
    }

    async fn recipient(&mut self, r: usize) -> anyhow::Result<&mut StarlingConn> {
        if !self.recipients.contains_key(&r) {
            if self.recipients.len() >= RECIPIENT_CONNS_MAX {
                self.recipients.clear();
            }
            let idx = self.layout.senders as usize + r;
            let c = open_conn(self.dst, &self.accounts[idx], idx as u64)
                .await?
                .0;
            self.recipients.insert(r, c);
        }
        self.recipients
            .get_mut(&r)
            .ok_or_else(|| anyhow::anyhow!("recipient connection {r} vanished"))
    }

    /// Each of the three sets gets one kind of request: Sync, history, Send (so that no
    /// request finds what another one just read in memory, when the sets are distinct).
    pub(super) async fn measure(
        &mut self,
        convs: &mut Convs,
        sets: [&[u32]; 3],
        label: &str,
    ) -> anyhow::Result<OpStats> {
        let mut hs: [Histogram<u64>; 3] = [
            report::histogram(),
            report::histogram(),
            report::histogram(),
        ];
        let mut wrong = Vec::new();
        self.fresh().await?;
        for (n, &i) in sets[0].iter().enumerate() {
            if let Some(w) = self.sync(convs, i, &mut hs[0]).await? {
                wrong.push(w);
            }
            progress(label, "Sync", n, sets[0].len());
        }
        self.fresh().await?;
        for (n, &i) in sets[1].iter().enumerate() {
            if let Some(w) = self.history(convs, i, &mut hs[1]).await? {
                wrong.push(w);
            }
            progress(label, "history", n, sets[1].len());
        }
        self.fresh().await?;
        for (n, &i) in sets[2].iter().enumerate() {
            if let Some(w) = self.send(convs, i, &mut hs[2]).await? {
                wrong.push(w);
            }
            progress(label, "Send", n, sets[2].len());
        }
        report::progress_done();
        Ok(OpStats {
            sync_us: Summary::of(&hs[0]),
            history_us: Summary::of(&hs[1]),
            send_us: Summary::of(&hs[2]),
            wrong: wrong.len() as u64,
            first_wrong: wrong.into_iter().take(5).collect(),
        })
    }

    async fn sync(
        &mut self,
        convs: &Convs,
        i: u32,
        h: &mut Histogram<u64>,
    ) -> anyhow::Result<Option<String>> {
        let last = convs.last_seq[i as usize];
        if last == 0 {
            return Ok(Some(format!(
                "conversation {i} has no acknowledged message"
            )));
        }
        let layout = self.layout;
        let r = layout.recipient_of(i);
        // The recipient has every one of its conversations up to date but this one.
        let map: std::collections::BTreeMap<u64, u64> = layout
            .convs_of_recipient(r)
            .filter(|&j| convs.id[j as usize] != 0)
            .map(|j| {
                let seq = convs.last_seq[j as usize];
                (convs.id[j as usize], if j == i { seq - 1 } else { seq })
            })
            .collect();
        let c = self.recipient(r).await?;
        let rid = c.rid();
        let sw = Stopwatch::start();
        c.push(rid, Body::Sync(v1::Sync { last_seq: map }))?;
        c.flush().await?;
        let mut seqs = Vec::new();
        loop {
            let f = c.recv().await?;
            if f.request_id != rid {
                continue;
            }
            match f.body {
                Some(Body::Deliver(d)) => {
                    seqs.extend(d.message.map(|m| (m.conversation_id, m.seq)));
                }
                Some(Body::SyncDone(_)) => break,
                Some(Body::Error(e)) => bail!("Sync refused: {}", describe_error(&e)),
                _ => {}
            }
        }
        record(h, sw);
        let want = [(convs.id[i as usize], last)];
        Ok((seqs != want).then(|| format!("Sync of conversation {i} gave {seqs:?}, not {want:?}")))
    }

    async fn history(
        &mut self,
        convs: &Convs,
        i: u32,
        h: &mut Histogram<u64>,
    ) -> anyhow::Result<Option<String>> {
        let (id, last) = (convs.id[i as usize], convs.last_seq[i as usize]);
        let c = &mut self.senders[self.layout.sender_of(i)];
        let sw = Stopwatch::start();
        let page = history_page(c, id, None, 50).await?;
        record(h, sw);
        let got = page.messages.last().map_or(0, |m| m.seq);
        Ok((got != last)
            .then(|| format!("the latest page of conversation {i} ends at seq {got}, not {last}")))
    }

    async fn send(
        &mut self,
        convs: &mut Convs,
        i: u32,
        h: &mut Histogram<u64>,
    ) -> anyhow::Result<Option<String>> {
        let s = self.layout.sender_of(i);
        let to = self.accounts[self.layout.senders as usize + self.layout.recipient_of(i)].user_id;
        // Client ids apart from the fill's (whose sender numbers are below 2^31).
        let body = bytes::Bytes::from(vec![b'y'; 200]);
        let msg = send_body(to, s | 1 << 31, self.sent, i, &body);
        self.sent += 1;
        let sw = Stopwatch::start();
        let answer = self.senders[s].request(msg).await?;
        record(h, sw);
        match answer {
            Body::SendAck(a) => {
                let (id, last) = (convs.id[i as usize], convs.last_seq[i as usize]);
                convs.ack(i, a.conversation_id, a.seq);
                Ok((a.conversation_id != id || a.seq <= last).then(|| {
                    format!(
                        "a Send into conversation {i} ({id}, last seq {last}) was acknowledged \
                         as {}:{}",
                        a.conversation_id, a.seq
                    )
                }))
            }
            Body::Error(e) => Ok(Some(format!(
                "a Send into conversation {i}: {}",
                describe_error(&e)
            ))),
            other => bail!("unexpected answer to a Send: {}", other.kind().name()),
        }
    }

    /// Every conversation of `sample` ends at the seq last acknowledged in it, and (where it
    /// has at most `VERIFY_PAGES_MAX` pages) holds as many messages as were acknowledged.
    pub(super) async fn verify(
        &mut self,
        convs: &Convs,
        sample: &[u32],
    ) -> anyhow::Result<Verified> {
        let sw = Stopwatch::start();
        let mut v = Verified::default();
        let mut wrong = Vec::new();
        for (n, &i) in sample.iter().enumerate() {
            let (id, last, acked) = (
                convs.id[i as usize],
                convs.last_seq[i as usize],
                u64::from(convs.acked[i as usize]),
            );
            if id == 0 {
                continue;
            }
            v.conversations += 1;
            let c = &mut self.senders[self.layout.sender_of(i)];
            let page = history_page(c, id, None, 1).await?;
            let got = page.messages.last().map_or(0, |m| m.seq);
            if got != last {
                wrong.push(format!(
                    "conversation {i} ends at seq {got}, acknowledged {last}"
                ));
                continue;
            }
            if acked <= u64::from(VERIFY_PAGES_MAX * VERIFY_PAGE / 2) {
                let mut count = 0u64;
                let mut after = 0u64;
                let mut pages = 0;
                loop {
                    let page = history_page(c, id, Some(after), VERIFY_PAGE).await?;
                    count += page.messages.len() as u64;
                    after = page.messages.last().map_or(after, |m| m.seq);
                    pages += 1;
                    if !page.has_more || page.messages.is_empty() || pages >= VERIFY_PAGES_MAX {
                        break;
                    }
                }
                if count != acked {
                    wrong.push(format!(
                        "conversation {i} holds {count} messages, acknowledged {acked}"
                    ));
                    continue;
                }
                v.counted += 1;
            }
            if n.is_multiple_of(50) {
                report::progress(&format!("verify: {n}/{}", sample.len()));
            }
        }
        report::progress_done();
        v.wrong = wrong.len() as u64;
        v.first_wrong = wrong.into_iter().take(5).collect();
        v.secs = sw.elapsed_secs();
        Ok(v)
    }
}

fn progress(label: &str, what: &str, n: usize, of: usize) {
    if n.is_multiple_of(100) {
        report::progress(&format!("{label}: {what} {n}/{of}"));
    }
}

fn record(h: &mut Histogram<u64>, sw: Stopwatch) {
    let us = u64::try_from(sw.elapsed().as_micros()).unwrap_or(u64::MAX);
    let _ = h.record(us.max(1));
}

async fn history_page(
    c: &mut StarlingConn,
    conv: u64,
    after: Option<u64>,
    limit: u32,
) -> anyhow::Result<v1::HistoryPage> {
    let answer = c
        .request(Body::GetHistory(v1::GetHistory {
            conversation_id: conv,
            anchor: after.map(v1::get_history::Anchor::AfterSeq),
            limit,
        }))
        .await?;
    match answer {
        Body::HistoryPage(p) => Ok(p),
        Body::Error(e) => bail!("GetHistory of {conv} refused: {}", describe_error(&e)),
        other => bail!("unexpected answer to GetHistory: {}", other.kind().name()),
    }
}
