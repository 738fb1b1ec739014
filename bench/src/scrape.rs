//! The server's own view of a run: Starling's `starling_send_ack_seconds` histogram (from the
//! read that brought a Send to the queueing of its SendAck), scraped from `/metrics` before and
//! after the run. Next to the load generator's numbers it tells whose time a latency is: the
//! server's, or the sockets', the load generator's and the in-flight window's.

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::{TcpStream, ToSocketAddrs as _};
use std::time::Duration;

use anyhow::Context as _;
use serde::Serialize;

const METRIC: &str = "starling_send_ack_seconds_bucket";

/// Cumulative bucket counts summed over shards, by upper bound in µs (`u64::MAX` = `+Inf`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Buckets(BTreeMap<u64, u64>);

/// What the server measured between two scrapes. A quantile is the upper bound of the bucket it
/// falls in (`None`: beyond the last finite bound).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub(crate) struct ServerAck {
    pub(crate) count: u64,
    pub(crate) p50_le_us: Option<u64>,
    pub(crate) p90_le_us: Option<u64>,
    pub(crate) p99_le_us: Option<u64>,
    pub(crate) p999_le_us: Option<u64>,
}

/// `GET /metrics` from `addr` (HOST:PORT): the exposition text.
pub(crate) fn get_metrics(addr: &str) -> anyhow::Result<String> {
    let sa = addr
        .to_socket_addrs()
        .with_context(|| format!("resolving {addr}"))?
        .next()
        .with_context(|| format!("{addr} resolves to nothing"))?;
    let timeout = Duration::from_secs(2);
    let mut s = TcpStream::connect_timeout(&sa, timeout)
        .with_context(|| format!("connecting to the metrics endpoint {addr}"))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: starling\r\n\r\n")?;
    let mut body = String::new();
    s.read_to_string(&mut body)
        .with_context(|| format!("reading {addr}/metrics"))?;
    Ok(body)
}

/// `GET /metrics` from `addr` (HOST:PORT) and its SendAck buckets.
pub(crate) fn fetch(addr: &str) -> anyhow::Result<Buckets> {
    let body = get_metrics(addr)?;
    let b = parse(&body);
    anyhow::ensure!(
        !b.0.is_empty(),
        "{addr}/metrics has no {METRIC} (not a Starling server, or an older one)"
    );
    Ok(b)
}

/// The SendAck buckets in a Prometheus text exposition, summed over shards.
pub(crate) fn parse(text: &str) -> Buckets {
    let mut b = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(METRIC) else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once(' ') else {
            continue;
        };
        let Some(le) = labels
            .split("le=\"")
            .nth(1)
            .and_then(|s| s.split('"').next())
        else {
            continue;
        };
        let bound = if le == "+Inf" {
            u64::MAX
        } else {
            match le.parse::<f64>() {
                #[allow(
                    clippy::cast_possible_truncation,
                    clippy::cast_sign_loss,
                    reason = "a bucket bound in µs"
                )]
                Ok(secs) => (secs * 1e6).round() as u64,
                Err(_) => continue,
            }
        };
        let Ok(n) = value.trim().parse::<u64>() else {
            continue;
        };
        *b.entry(bound).or_insert(0) += n;
    }
    Buckets(b)
}

/// What happened between `before` and `after`.
pub(crate) fn delta(before: &Buckets, after: &Buckets) -> ServerAck {
    let cum: Vec<(u64, u64)> = after
        .0
        .iter()
        .map(|(&le, &n)| {
            (
                le,
                n.saturating_sub(before.0.get(&le).copied().unwrap_or(0)),
            )
        })
        .collect();
    let count = cum.last().map_or(0, |&(_, n)| n);
    let q = |p: f64| -> Option<u64> {
        if count == 0 {
            return None;
        }
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss,
            reason = "a rank within the count"
        )]
        let rank = ((count as f64) * p).ceil().max(1.0) as u64;
        cum.iter()
            .find(|&&(_, n)| n >= rank)
            .map(|&(le, _)| le)
            .filter(|&le| le != u64::MAX)
    };
    ServerAck {
        count,
        p50_le_us: q(0.5),
        p90_le_us: q(0.9),
        p99_le_us: q(0.99),
        p999_le_us: q(0.999),
    }
}

/// A bound for a table: "≤ 2.5" (ms), or "> last" for the `+Inf` bucket.
pub(crate) fn show_ms(le_us: Option<u64>) -> String {
    le_us.map_or_else(
        || "> 1000".to_owned(),
        |us| format!("≤ {}", us as f64 / 1000.0),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(counts: [u64; 4]) -> String {
        // Two shards; the second has no observations.
        let mut s = String::from(
            "# HELP starling_send_ack_seconds x\n# TYPE starling_send_ack_seconds histogram\n",
        );
        for (le, n) in ["0.0005", "0.001", "0.0025", "+Inf"].iter().zip(counts) {
            s.push_str(&format!(
                "starling_send_ack_seconds_bucket{{shard=\"0\",le=\"{le}\"}} {n}\n"
            ));
            s.push_str(&format!(
                "starling_send_ack_seconds_bucket{{shard=\"1\",le=\"{le}\"}} 0\n"
            ));
        }
        s.push_str("starling_send_ack_seconds_count{shard=\"0\"} 7\nstarling_frames_in_total{shard=\"0\"} 9\n");
        s
    }

    #[test]
    fn buckets_sum_over_shards_and_quantiles_come_from_the_delta() {
        let before = parse(&text([10, 10, 10, 10]));
        assert_eq!(before.0.get(&500), Some(&10));
        assert_eq!(before.0.get(&u64::MAX), Some(&10));
        // 100 more: 50 ≤ 0.5 ms, 45 in (0.5, 1], 4 in (1, 2.5], 1 beyond.
        let after = parse(&text([60, 105, 109, 110]));
        let d = delta(&before, &after);
        assert_eq!(d.count, 100);
        assert_eq!(d.p50_le_us, Some(500));
        assert_eq!(d.p90_le_us, Some(1_000));
        assert_eq!(d.p99_le_us, Some(2_500));
        assert_eq!(d.p999_le_us, None);
        assert_eq!(show_ms(d.p99_le_us), "≤ 2.5");
        assert_eq!(show_ms(None), "> 1000");
        let none = delta(&after, &after);
        assert_eq!((none.count, none.p50_le_us), (0, None));
    }
}
