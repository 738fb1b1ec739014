//! Load-generator processes. Every process is capped at 20,000 open files,
//! so a subcommand that holds many connections re-runs itself `--procs`
//! times with `--worker I` added. A worker runs one single-threaded tokio
//! runtime, prints `@@{json}` lines (progress and result) on stdout, and
//! stops early when its stdin closes; each line on its stdin is a signal
//! (the reconnect storm's "drop now"). The parent aggregates and reports.

use std::io::{BufRead as _, BufReader, Write as _};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Flags every multi-process subcommand has.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct WorkerArgs {
    /// Load-generator processes (each holds at most ~19,000 sockets).
    #[arg(long, default_value_t = 1)]
    pub(crate) procs: u32,
    /// Internal: this process is worker I of --procs.
    #[arg(long, hide = true)]
    pub(crate) worker: Option<u32>,
}

impl WorkerArgs {
    /// This worker's share of `total` items, and the index of its first.
    pub(crate) fn share(&self, total: u64) -> (u64, u64) {
        let p = u64::from(self.procs.max(1));
        let i = u64::from(self.worker.unwrap_or(0));
        let base = total / p;
        let extra = total % p;
        let count = base + u64::from(i < extra);
        let first = i * base + i.min(extra);
        (count, first)
    }
}

/// One line from a worker.
#[derive(Debug)]
pub(crate) struct Msg {
    pub(crate) worker: usize,
    pub(crate) kind: String,
    pub(crate) value: serde_json::Value,
}

impl Msg {
    pub(crate) fn parse<T: DeserializeOwned>(&self) -> anyhow::Result<T> {
        serde_json::from_value(self.value.clone())
            .with_context(|| format!("worker {} sent a bad {} line", self.worker, self.kind))
    }
}

/// Running worker processes.
#[derive(Debug)]
pub(crate) struct Workers {
    children: Vec<Child>,
    stdins: Vec<Option<ChildStdin>>,
    rx: Receiver<Option<Msg>>,
    open: usize,
}

impl Workers {
    /// Starts `procs` copies of this command line with `--worker I`.
    pub(crate) fn spawn(procs: u32) -> anyhow::Result<Self> {
        Self::spawn_with(procs, &[])
    }

    /// Starts `procs` copies of this command line with `extra` and `--worker I` added.
    pub(crate) fn spawn_with(procs: u32, extra: &[&str]) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("finding our own executable")?;
        let mut args: Vec<String> = std::env::args().skip(1).collect();
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        let (tx, rx) = channel();
        let mut children = Vec::new();
        let mut stdins = Vec::new();
        for i in 0..procs {
            let mut child = Command::new(&exe)
                .args(&args)
                .arg("--worker")
                .arg(i.to_string())
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .context("starting a worker process")?;
            let out = child.stdout.take().context("worker stdout")?;
            stdins.push(child.stdin.take());
            let tx = tx.clone();
            let worker = i as usize;
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    let Some(json) = line.strip_prefix("@@") else {
                        eprintln!("[worker {worker}] {line}");
                        continue;
                    };
                    let Ok(serde_json::Value::Object(mut m)) = serde_json::from_str(json) else {
                        eprintln!("[worker {worker}] unparsable: {line}");
                        continue;
                    };
                    let kind = m
                        .remove("k")
                        .and_then(|k| k.as_str().map(str::to_owned))
                        .unwrap_or_default();
                    let value = m.remove("v").unwrap_or_default();
                    if tx
                        .send(Some(Msg {
                            worker,
                            kind,
                            value,
                        }))
                        .is_err()
                    {
                        break;
                    }
                }
                let _ = tx.send(None);
            });
            children.push(child);
        }
        Ok(Self {
            children,
            stdins,
            rx,
            open: procs as usize,
        })
    }

    /// The next line from any worker; `Ok(None)` on timeout; an error once
    /// every worker has exited.
    pub(crate) fn recv(&mut self, timeout: Duration) -> anyhow::Result<Option<Msg>> {
        loop {
            match self.rx.recv_timeout(timeout) {
                Ok(Some(m)) => return Ok(Some(m)),
                Ok(None) => {
                    self.open -= 1;
                    if self.open == 0 {
                        bail!("all workers exited");
                    }
                }
                Err(RecvTimeoutError::Timeout) => return Ok(None),
                Err(RecvTimeoutError::Disconnected) => bail!("all workers exited"),
            }
        }
    }

    /// Sends every worker one signal line (see [`signals`]).
    pub(crate) fn signal_all(&mut self) {
        for s in self.stdins.iter_mut().flatten() {
            let _ = s.write_all(b"go\n");
            let _ = s.flush();
        }
    }

    /// Asks every worker to finish (closes their stdin).
    pub(crate) fn stop_all(&mut self) {
        for s in &mut self.stdins {
            s.take();
        }
    }

    /// Waits for every worker; fails if one failed.
    pub(crate) fn wait(mut self) -> anyhow::Result<()> {
        self.stop_all();
        let mut failed = Vec::new();
        for (i, c) in self.children.iter_mut().enumerate() {
            let st = c.wait()?;
            if !st.success() {
                failed.push(format!("worker {i}: {st}"));
            }
        }
        if !failed.is_empty() {
            bail!("{}", failed.join("; "));
        }
        Ok(())
    }
}

/// The parent's view of its workers: each one's latest progress line and, once it has
/// finished, its result (which carries its final progress too).
#[derive(Debug)]
pub(crate) struct Tally<P, R> {
    pub(crate) progress: Vec<P>,
    pub(crate) results: Vec<Option<R>>,
}

impl<P: DeserializeOwned + Clone + Default, R: DeserializeOwned> Tally<P, R> {
    pub(crate) fn new(procs: usize) -> Self {
        Self {
            progress: vec![P::default(); procs],
            results: (0..procs).map(|_| None).collect(),
        }
    }

    /// Applies one worker line: a `progress` line replaces that worker's progress, a `result`
    /// line records its result and its final progress (`progress_of`). Returns whether the line
    /// was a result; other kinds are ignored.
    pub(crate) fn apply(
        &mut self,
        m: &Msg,
        progress_of: impl Fn(&R) -> &P,
    ) -> anyhow::Result<bool> {
        let slot = m.worker;
        anyhow::ensure!(
            slot < self.progress.len(),
            "a line from unknown worker {slot}"
        );
        match m.kind.as_str() {
            "progress" => self.progress[slot] = m.parse()?,
            "result" => {
                let r: R = m.parse()?;
                self.progress[slot] = progress_of(&r).clone();
                self.results[slot] = Some(r);
                return Ok(true);
            }
            _ => {}
        }
        Ok(false)
    }

    /// Whether every worker has sent its result.
    pub(crate) fn all_done(&self) -> bool {
        self.results.iter().all(Option::is_some)
    }

    /// Whether at least one worker has sent its result.
    pub(crate) fn any_done(&self) -> bool {
        self.results.iter().any(Option::is_some)
    }

    /// The results that arrived, in worker order.
    pub(crate) fn into_results(self) -> Vec<R> {
        self.results.into_iter().flatten().collect()
    }
}

/// Worker side: prints one `@@` line.
pub(crate) fn emit(kind: &str, value: &impl Serialize) {
    #[derive(Serialize)]
    struct Line<'a, T> {
        k: &'a str,
        v: &'a T,
    }
    let mut line = b"@@".to_vec();
    if serde_json::to_writer(&mut line, &Line { k: kind, v: value }).is_ok() {
        line.push(b'\n');
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(&line);
        let _ = out.flush();
    }
}

static STOP: AtomicBool = AtomicBool::new(false);
static SIGNALS: AtomicU64 = AtomicU64::new(0);

/// Worker side: how many signal lines the parent has sent.
pub(crate) fn signals() -> u64 {
    SIGNALS.load(Ordering::Relaxed)
}

/// Worker side: whether the parent asked us to stop (stdin closed).
pub(crate) fn stop_requested() -> bool {
    STOP.load(Ordering::Relaxed)
}

/// Worker side: watches stdin and flags [`stop_requested`] when it closes.
pub(crate) fn watch_stdin() {
    std::thread::spawn(|| {
        for line in std::io::stdin().lock().lines() {
            if line.is_err() {
                break;
            }
            SIGNALS.fetch_add(1, Ordering::Relaxed);
        }
        STOP.store(true, Ordering::Relaxed);
    });
}

/// Runs `f` on a single-threaded tokio runtime.
pub(crate) fn block_on<F: std::future::Future>(f: F) -> anyhow::Result<F::Output> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    Ok(rt.block_on(f))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, Clone, PartialEq, serde::Deserialize)]
    struct P {
        n: u64,
    }

    #[derive(Debug, serde::Deserialize)]
    struct R {
        p: P,
        note: String,
    }

    fn of(r: &R) -> &P {
        &r.p
    }

    fn line(worker: usize, kind: &str, value: serde_json::Value) -> Msg {
        Msg {
            worker,
            kind: kind.into(),
            value,
        }
    }

    #[test]
    fn tally_keeps_the_latest_progress_and_each_result() {
        let mut t: Tally<P, R> = Tally::new(2);
        assert!(
            !t.apply(&line(0, "progress", serde_json::json!({"n": 3})), of)
                .unwrap()
        );
        assert!(
            !t.apply(&line(1, "progress", serde_json::json!({"n": 4})), of)
                .unwrap()
        );
        assert!(
            !t.apply(&line(0, "progress", serde_json::json!({"n": 5})), of)
                .unwrap()
        );
        assert!(
            !t.apply(&line(1, "hello", serde_json::json!(null)), of)
                .unwrap()
        );
        assert_eq!(t.progress, vec![P { n: 5 }, P { n: 4 }]);
        assert!(!t.any_done());

        let r = serde_json::json!({"p": {"n": 9}, "note": "one"});
        assert!(t.apply(&line(1, "result", r), of).unwrap());
        assert_eq!(t.progress, vec![P { n: 5 }, P { n: 9 }]);
        assert!(t.any_done() && !t.all_done());

        let r = serde_json::json!({"p": {"n": 6}, "note": "zero"});
        assert!(t.apply(&line(0, "result", r), of).unwrap());
        assert!(t.all_done());
        let notes: Vec<String> = t.into_results().into_iter().map(|r| r.note).collect();
        assert_eq!(notes, ["zero", "one"]);
    }

    #[test]
    fn tally_rejects_bad_lines_with_the_worker_named() {
        let mut t: Tally<P, R> = Tally::new(1);
        let e = t
            .apply(&line(0, "progress", serde_json::json!({"n": "x"})), of)
            .unwrap_err();
        assert!(
            format!("{e:#}").contains("worker 0 sent a bad progress line"),
            "{e:#}"
        );
        let e = t
            .apply(&line(3, "progress", serde_json::json!({"n": 1})), of)
            .unwrap_err();
        assert!(format!("{e:#}").contains("unknown worker 3"), "{e:#}");
        assert_eq!(t.progress, vec![P { n: 0 }]);
        assert!(!t.any_done());
    }
}
