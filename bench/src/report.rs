//! What every load subcommand reports: latency histograms (merged across
//! worker processes), process CPU and memory from `/proc`, the kernel's
//! socket memory, the machine's load, and the `--json` file.

use std::io::Write as _;
use std::path::Path;

use anyhow::Context as _;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// The share of a core over which a process counts as saturated: the load generator's own
/// (per process) and, in `compare-report`, the server's (pinned to one core).
pub(crate) const SATURATED_SHARE: f64 = 0.85;

/// Latencies are recorded in microseconds, 1 µs .. 1 h, 3 significant digits.
pub(crate) fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("constant bounds are valid")
}

/// A histogram as (value, count) pairs, to cross process boundaries.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct HistData(pub(crate) Vec<(u64, u64)>);

impl HistData {
    pub(crate) fn of(h: &Histogram<u64>) -> Self {
        Self(
            h.iter_recorded()
                .map(|v| (v.value_iterated_to(), v.count_at_value()))
                .collect(),
        )
    }

    pub(crate) fn merge_into(&self, h: &mut Histogram<u64>) {
        for &(v, n) in &self.0 {
            h.saturating_record_n(v, n);
        }
    }
}

/// Percentiles of one latency histogram, in microseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Summary {
    pub(crate) count: u64,
    pub(crate) min_us: u64,
    pub(crate) mean_us: f64,
    pub(crate) p50_us: u64,
    pub(crate) p90_us: u64,
    pub(crate) p99_us: u64,
    pub(crate) p999_us: u64,
    pub(crate) p9999_us: u64,
    pub(crate) max_us: u64,
}

impl Summary {
    pub(crate) fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        Self {
            count: h.len(),
            min_us: h.min(),
            mean_us: h.mean(),
            p50_us: h.value_at_quantile(0.5),
            p90_us: h.value_at_quantile(0.9),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            p9999_us: h.value_at_quantile(0.9999),
            max_us: h.max(),
        }
    }
}

/// Prints a latency table: one row per named histogram.
pub(crate) fn print_latency_table(rows: &[(&str, &Summary)]) {
    println!(
        "{:<22} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10}",
        "latency (µs)", "count", "p50", "p90", "p99", "p99.9", "p99.99", "max"
    );
    for (name, s) in rows {
        println!(
            "{:<22} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10}",
            name, s.count, s.p50_us, s.p90_us, s.p99_us, s.p999_us, s.p9999_us, s.max_us
        );
    }
}

/// CPU time (user + system) of a process, in seconds, from `/proc/PID/stat`.
pub(crate) fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start after ") ".
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime is field 14, stime field 15.
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / clock_ticks())
}

/// This process's CPU time in seconds.
pub(crate) fn own_cpu_secs() -> f64 {
    cpu_secs(std::process::id()).unwrap_or(0.0)
}

fn clock_ticks() -> f64 {
    // USER_HZ is 100 on every Linux architecture we run on.
    100.0
}

/// Resident set size of a process in KiB (`VmRSS`).
pub(crate) fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The kernel's TCP socket counters (`/proc/net/sockstat`, this network
/// namespace: both ends of loopback connections count).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub(crate) struct SockStat {
    pub(crate) tcp_inuse: u64,
    pub(crate) tcp_orphan: u64,
    pub(crate) tcp_tw: u64,
    /// Pages of socket buffer memory (4 KiB each).
    pub(crate) tcp_mem_pages: u64,
}

impl SockStat {
    pub(crate) fn read() -> Self {
        let s = std::fs::read_to_string("/proc/net/sockstat").unwrap_or_default();
        let mut out = Self::default();
        if let Some(line) = s.lines().find(|l| l.starts_with("TCP:")) {
            let f: Vec<&str> = line.split_whitespace().collect();
            for pair in f[1..].chunks(2) {
                if let [k, v] = pair {
                    let v = v.parse().unwrap_or(0);
                    match *k {
                        "inuse" => out.tcp_inuse = v,
                        "orphan" => out.tcp_orphan = v,
                        "tw" => out.tcp_tw = v,
                        "mem" => out.tcp_mem_pages = v,
                        _ => {}
                    }
                }
            }
        }
        out
    }
}

/// Kernel slab memory of the per-socket caches (`/proc/slabinfo`, needs
/// root): bytes of active `TCP`, `sock_inode_cache`, `filp` and
/// `eventpoll_epi` objects. Counts both ends of loopback connections.
pub(crate) fn socket_slab_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/slabinfo").ok()?;
    let mut total = 0u64;
    for line in s.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if let [name, active, _num, size, ..] = f[..]
            && matches!(name, "TCP" | "sock_inode_cache" | "filp" | "eventpoll_epi")
        {
            total += active.parse::<u64>().ok()? * size.parse::<u64>().ok()?;
        }
    }
    Some(total)
}

/// The 1-minute load average.
pub(crate) fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// Facts about the machine and the moment, written into every JSON report.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Machine {
    pub(crate) unix_time: u64,
    pub(crate) cores: usize,
    pub(crate) loadavg_1m_start: f64,
    pub(crate) kernel: String,
}

impl Machine {
    pub(crate) fn now() -> Self {
        Self {
            unix_time: crate::clock::unix_secs(),
            cores: std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
            loadavg_1m_start: loadavg(),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_owned(),
        }
    }
}

/// Writes `value` as pretty JSON to `path`.
pub(crate) fn write_json(path: &Path, value: &impl Serialize) -> anyhow::Result<()> {
    let mut f =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    serde_json::to_writer_pretty(&mut f, value)?;
    f.write_all(b"\n")?;
    println!("wrote {}", path.display());
    Ok(())
}

/// Overwrites the live progress line on stderr.
pub(crate) fn progress(line: &str) {
    let mut e = std::io::stderr().lock();
    let _ = write!(e, "\r\x1b[2K{line}");
    let _ = e.flush();
}

/// Ends the live progress line.
pub(crate) fn progress_done() {
    eprintln!();
}
