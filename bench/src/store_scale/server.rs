//! The `starling` server this tool starts, stops and restarts (only the process it spawned), its
//! readiness (`GET /readyz` on the metrics listener) and a sampler of its RSS and data directory.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde::Serialize;

use crate::clock::Stopwatch;
use crate::report;

/// How the server is started, each time the same way.
#[derive(Debug, Clone)]
pub(super) struct ServerCmd {
    pub(super) bin: PathBuf,
    pub(super) config: PathBuf,
    pub(super) data_dir: PathBuf,
    pub(super) tls_listen: SocketAddr,
    pub(super) plain_listen: SocketAddr,
    pub(super) metrics_listen: SocketAddr,
    pub(super) shards: u32,
    pub(super) log: PathBuf,
}

/// The running server: the child this tool spawned, never another process.
#[derive(Debug)]
pub(super) struct Server {
    cmd: ServerCmd,
    child: Option<Child>,
    started: Option<Stopwatch>,
    /// The log's length when the server was last started.
    log_start: u64,
    /// The current pid (0 while none runs), for the sampler.
    pid: Arc<AtomicU32>,
}

impl Server {
    pub(super) fn new(cmd: ServerCmd) -> Self {
        Self {
            cmd,
            child: None,
            started: None,
            log_start: 0,
            pid: Arc::new(AtomicU32::new(0)),
        }
    }

    pub(super) fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Its peak RSS so far (`VmHWM`), in KiB.
    pub(super) fn peak_rss_kib(&self) -> Option<u64> {
        self.pid().and_then(hwm_kib)
    }

    /// Its RSS now, in KiB.
    pub(super) fn rss_kib(&self) -> Option<u64> {
        self.pid().and_then(report::rss_kib)
    }

    /// The server's own account of opening its storage since the last start (its log lines
    /// that say "storage opened": per shard, how long and what it replayed).
    pub(super) fn storage_opened_lines(&self) -> Vec<String> {
        let text = std::fs::read(&self.cmd.log).unwrap_or_default();
        let from = usize::try_from(self.log_start).unwrap_or(0).min(text.len());
        String::from_utf8_lossy(&text[from..])
            .lines()
            .filter(|l| l.contains("storage opened"))
            .map(|l| {
                l.split_once("storage opened")
                    .map_or(l, |(_, rest)| rest)
                    .trim()
                    .to_owned()
            })
            .collect()
    }

    /// Spawns `starling serve` (its output appended to the log file).
    pub(super) fn start(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(self.child.is_none(), "the server already runs");
        let c = &self.cmd;
        let log_start = std::fs::metadata(&c.log).map_or(0, |m| m.len());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&c.log)
            .with_context(|| format!("opening {}", c.log.display()))?;
        let child = Command::new(&c.bin)
            .arg("serve")
            .arg("--config")
            .arg(&c.config)
            .arg("--data-dir")
            .arg(&c.data_dir)
            .arg("--listen")
            .arg(c.tls_listen.to_string())
            .arg("--dangerous-plaintext-listen")
            .arg(c.plain_listen.to_string())
            .arg("--metrics-listen")
            .arg(c.metrics_listen.to_string())
            .arg("--shards")
            .arg(c.shards.to_string())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", c.bin.display()))?;
        self.pid.store(child.id(), Ordering::Relaxed);
        self.log_start = log_start;
        self.child = Some(child);
        self.started = Some(Stopwatch::start());
        Ok(())
    }

    /// Seconds from the spawn until `/readyz` answered 200 (polled every 5 ms).
    pub(super) fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<f64> {
        let started = self.started.context("the server was not started")?;
        loop {
            if readyz(self.cmd.metrics_listen) {
                return Ok(started.elapsed_secs());
            }
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                self.child = None;
                self.pid.store(0, Ordering::Relaxed);
                bail!(
                    "the server exited ({status}) before it was ready; the end of {}:\n{}",
                    self.cmd.log.display(),
                    log_tail(&self.cmd.log)
                );
            }
            if started.elapsed() > timeout {
                bail!(
                    "the server was not ready within {} s; the end of {}:\n{}",
                    timeout.as_secs(),
                    self.cmd.log.display(),
                    log_tail(&self.cmd.log)
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// SIGKILL, then reaps it.
    pub(super) fn kill(&mut self) -> anyhow::Result<()> {
        let mut child = self.child.take().context("no server runs")?;
        child.kill().context("SIGKILL to the server")?;
        child.wait()?;
        self.pid.store(0, Ordering::Relaxed);
        Ok(())
    }

    /// SIGTERM (a clean stop); seconds until it exited. After `timeout`, SIGKILL and an error.
    pub(super) fn terminate(&mut self, timeout: Duration) -> anyhow::Result<f64> {
        let mut child = self.child.take().context("no server runs")?;
        let pid = libc::pid_t::try_from(child.id()).context("pid out of range")?;
        let sw = Stopwatch::start();
        // SAFETY: `kill` has no memory effects; `pid` is our own child, not yet reaped (so
        // its pid cannot have been reused).
        if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
            bail!("SIGTERM to the server: {}", std::io::Error::last_os_error());
        }
        loop {
            if let Some(status) = child.try_wait()? {
                self.pid.store(0, Ordering::Relaxed);
                anyhow::ensure!(
                    status.success(),
                    "the server's clean stop ended with {status}; the end of {}:\n{}",
                    self.cmd.log.display(),
                    log_tail(&self.cmd.log)
                );
                return Ok(sw.elapsed_secs());
            }
            if sw.elapsed() > timeout {
                let _ = child.kill();
                let _ = child.wait();
                self.pid.store(0, Ordering::Relaxed);
                bail!(
                    "the server did not stop within {} s of SIGTERM",
                    timeout.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// A sampler of this server's RSS and the data directory's disk use.
    pub(super) fn sampler(&self, every: Duration, acked: Arc<AtomicU64>) -> Sampler {
        Sampler::spawn(self.pid.clone(), self.cmd.data_dir.clone(), every, acked)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Never leave the server behind (an error ends the run early).
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `GET /readyz` answered 200.
fn readyz(addr: SocketAddr) -> bool {
    let get = || -> std::io::Result<bool> {
        let t = Duration::from_millis(500);
        let mut s = TcpStream::connect_timeout(&addr, t)?;
        s.set_read_timeout(Some(t))?;
        s.set_write_timeout(Some(t))?;
        s.write_all(b"GET /readyz HTTP/1.0\r\nHost: starling\r\n\r\n")?;
        let mut head = [0u8; 12];
        s.read_exact(&mut head)?;
        Ok(head.ends_with(b" 200"))
    };
    get().unwrap_or(false)
}

/// The last lines of the server's log, for an error.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// Peak resident set size of a process in KiB (`VmHWM`).
pub(super) fn hwm_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Bytes the files under `dir` occupy on disk (allocated blocks).
pub(super) fn disk_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut total = 0;
    for e in entries.flatten() {
        let Ok(md) = e.metadata() else { continue };
        if md.is_dir() {
            total += disk_bytes(&e.path());
        } else {
            total += md.blocks() * 512;
        }
    }
    total
}

/// One sample.
#[derive(Debug, Clone, Serialize)]
pub(super) struct Sample {
    pub(super) secs: f64,
    pub(super) phase: &'static str,
    pub(super) rss_kib: u64,
    /// The process's peak RSS so far (`VmHWM`).
    pub(super) hwm_kib: u64,
    pub(super) disk_bytes: u64,
    pub(super) messages_acked: u64,
}

/// Samples the server every few seconds on a thread of its own, tagged with the phase.
#[derive(Debug)]
pub(super) struct Sampler {
    stop: Arc<AtomicBool>,
    phase: Arc<Mutex<&'static str>>,
    thread: Option<std::thread::JoinHandle<Vec<Sample>>>,
}

impl Sampler {
    fn spawn(pid: Arc<AtomicU32>, dir: PathBuf, every: Duration, acked: Arc<AtomicU64>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let phase = Arc::new(Mutex::new("start"));
        let (stop2, phase2) = (stop.clone(), phase.clone());
        let thread = std::thread::spawn(move || {
            let sw = Stopwatch::start();
            let mut out = Vec::new();
            while !stop2.load(Ordering::Relaxed) {
                let p = pid.load(Ordering::Relaxed);
                if p != 0
                    && let Some(rss_kib) = report::rss_kib(p)
                {
                    out.push(Sample {
                        secs: sw.elapsed_secs(),
                        phase: phase2.lock().map_or("?", |g| *g),
                        rss_kib,
                        hwm_kib: hwm_kib(p).unwrap_or(rss_kib),
                        disk_bytes: disk_bytes(&dir),
                        messages_acked: acked.load(Ordering::Relaxed),
                    });
                }
                // Sleep in short steps, so that a stop is quick.
                let step = Duration::from_millis(50);
                let t = Stopwatch::start();
                while t.elapsed() < every && !stop2.load(Ordering::Relaxed) {
                    std::thread::sleep(step);
                }
            }
            out
        });
        Self {
            stop,
            phase,
            thread: Some(thread),
        }
    }

    pub(super) fn phase(&self, name: &'static str) {
        if let Ok(mut g) = self.phase.lock() {
            *g = name;
        }
    }

    pub(super) fn finish(mut self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
