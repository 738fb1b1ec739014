//! The shared shape of the closed-loop throughput subcommands (`heartbeats`,
//! `handshakes`): workers count operations and record latencies for a fixed
//! duration; the parent shows a live rate, samples the server's CPU, and
//! merges the results.

use std::cell::RefCell;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::clock::Stopwatch;
use crate::report::{self, HistData, Summary};
use crate::workers::{self, Tally, WorkerArgs, Workers};

/// Counters a worker reports.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub(crate) struct Counts {
    /// Operations completed (pongs, handshakes).
    pub(crate) ops: u64,
    /// A second kind of operation (resumed handshakes).
    pub(crate) ops2: u64,
    pub(crate) errors: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct WorkerResult {
    counts: Counts,
    hist: HistData,
    cpu_secs: f64,
    busy_secs: f64,
    errors: Vec<String>,
}

/// Worker-side state shared by its tasks (single-threaded).
#[derive(Debug)]
pub(crate) struct WorkerState {
    pub(crate) counts: RefCell<Counts>,
    pub(crate) hist: RefCell<hdrhistogram::Histogram<u64>>,
    pub(crate) errors: RefCell<Vec<String>>,
    pub(crate) deadline: Stopwatch,
    pub(crate) duration: Duration,
}

impl WorkerState {
    pub(crate) fn new(duration: Duration) -> Self {
        Self {
            counts: RefCell::default(),
            hist: RefCell::new(report::histogram()),
            errors: RefCell::default(),
            deadline: Stopwatch::start(),
            duration,
        }
    }

    /// Whether the run is over (time up or the parent said stop).
    pub(crate) fn over(&self) -> bool {
        self.deadline.elapsed() >= self.duration || workers::stop_requested()
    }

    pub(crate) fn error(&self, e: &anyhow::Error) {
        self.counts.borrow_mut().errors += 1;
        let mut errs = self.errors.borrow_mut();
        if errs.len() < 10 {
            errs.push(format!("{e:#}"));
        }
    }

    /// Emits progress every 500 ms until the run is over.
    pub(crate) async fn report_loop(&self) {
        while !self.over() {
            tokio::time::sleep(Duration::from_millis(500)).await;
            workers::emit("progress", &*self.counts.borrow());
        }
    }

    /// Emits the final result.
    pub(crate) fn finish(&self, cpu0: f64) {
        workers::emit(
            "result",
            &WorkerResult {
                counts: self.counts.borrow().clone(),
                hist: HistData::of(&self.hist.borrow()),
                cpu_secs: report::own_cpu_secs() - cpu0,
                busy_secs: self.deadline.elapsed_secs(),
                errors: self.errors.borrow().clone(),
            },
        );
    }
}

/// What the parent measured.
#[derive(Debug, Serialize)]
pub(crate) struct Outcome {
    pub(crate) counts: Counts,
    pub(crate) secs: f64,
    pub(crate) ops_per_s: f64,
    pub(crate) ops2_per_s: f64,
    pub(crate) latency_us: Summary,
    pub(crate) server_cpu_cores: Option<f64>,
    pub(crate) loadgen_cpu_cores: f64,
    pub(crate) loadavg_1m_end: f64,
    pub(crate) errors: Vec<String>,
}

/// Runs the workers, shows `label` with a live rate, and merges.
pub(crate) fn run_parent(
    label: &str,
    w: &WorkerArgs,
    duration: Duration,
    server_pid: Option<u32>,
) -> anyhow::Result<Outcome> {
    let procs = w.procs.max(1) as usize;
    let mut ws = Workers::spawn(w.procs)?;
    let sw = Stopwatch::start();
    let cpu0 = server_pid.and_then(report::cpu_secs);
    let mut tally: Tally<Counts, WorkerResult> = Tally::new(procs);
    let mut last = (0.0, 0u64);
    let mut rate = 0.0;
    let mut server_cpu_end = None;
    loop {
        if let Some(m) = ws.recv(Duration::from_millis(200))?
            && tally.apply(&m, |r| &r.counts)?
            && server_cpu_end.is_none()
        {
            server_cpu_end = Some((server_pid.and_then(report::cpu_secs), sw.elapsed_secs()));
        }
        let ops: u64 = tally.progress.iter().map(|p| p.ops).sum();
        let errs: u64 = tally.progress.iter().map(|p| p.errors).sum();
        let t = sw.elapsed_secs();
        if t - last.0 >= 1.0 {
            rate = (ops - last.1) as f64 / (t - last.0);
            last = (t, ops);
        }
        report::progress(&format!(
            "{label}: {t:.0}/{}s  {ops} done  {rate:.0}/s  errors {errs}",
            duration.as_secs()
        ));
        if tally.all_done() {
            break;
        }
        if sw.elapsed() > duration + Duration::from_secs(60) {
            ws.stop_all();
        }
    }
    report::progress_done();
    ws.wait()?;
    let results: Vec<WorkerResult> = tally.into_results();
    let mut hist = report::histogram();
    let mut counts = Counts::default();
    let mut errors = Vec::new();
    let mut secs: f64 = 0.0;
    let mut lg_cpu = 0.0;
    for r in &results {
        r.hist.merge_into(&mut hist);
        counts.ops += r.counts.ops;
        counts.ops2 += r.counts.ops2;
        counts.errors += r.counts.errors;
        errors.extend(r.errors.iter().cloned());
        secs = secs.max(r.busy_secs);
        lg_cpu += r.cpu_secs;
    }
    let server_cpu_cores = match (cpu0, server_cpu_end) {
        (Some(a), Some((Some(b), t))) if t > 0.0 => Some((b - a) / t),
        _ => None,
    };
    Ok(Outcome {
        ops_per_s: counts.ops as f64 / secs.max(1e-3),
        ops2_per_s: counts.ops2 as f64 / secs.max(1e-3),
        counts,
        secs,
        latency_us: Summary::of(&hist),
        server_cpu_cores,
        loadgen_cpu_cores: lg_cpu / secs.max(1e-3),
        loadavg_1m_end: report::loadavg(),
        errors: errors.into_iter().take(20).collect(),
    })
}
