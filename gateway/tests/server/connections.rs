//! Many connections held at once: idle connections with heartbeats, in child processes when one
//! process's open-file cap is not enough.

use super::*;

/// Server RSS in KiB, from /proc.
pub(super) fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Sum of a per-shard counter or gauge in the server's /metrics.
pub(super) fn metric_sum(srv: &Server, name: &str) -> i64 {
    let prefix = format!("{name}{{");
    srv.metrics()
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<i64>().ok())
        .sum()
}

pub(super) fn open_connections(srv: &Server) -> i64 {
    metric_sum(srv, "starling_connections")
}

/// The hidden child entry of `ten_thousand_idle_connections_with_heartbeats`.
pub(super) const IDLE_CHILD_TEST: &str = "connections::idle_connections_child";

/// What a child process reports on stdout (`starling-child k=v ...`).
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct ChildStatus {
    /// Connections opened and authenticated.
    opened: usize,
    /// Connections that failed to open, or stopped answering pings.
    lost: usize,
    /// Complete ping rounds over all of its connections.
    passes: u64,
    /// At exit: connections whose close the server answered with end of stream.
    closed: Option<usize>,
    /// Its stdout ended (it exited).
    eof: bool,
}

impl ChildStatus {
    fn parse(&mut self, line: &str) {
        let Some(rest) = line.strip_prefix("starling-child ") else {
            return;
        };
        for kv in rest.split_whitespace() {
            let Some((k, v)) = kv.split_once('=') else {
                continue;
            };
            let Ok(v) = v.parse::<u64>() else { continue };
            match k {
                "opened" => self.opened = v as usize,
                "lost" => self.lost = v as usize,
                "passes" => self.passes = v,
                "closed" => self.closed = Some(v as usize),
                _ => {}
            }
        }
    }
}

/// The connection-holding child processes of the idle-connections test and
/// what they reported so far.
pub(super) struct Children {
    procs: Vec<KillOnDrop>,
    stdin: Vec<Option<std::process::ChildStdin>>,
    shares: Vec<usize>,
    status: Vec<ChildStatus>,
    rx: std::sync::mpsc::Receiver<(usize, Option<String>)>,
    /// Exiting is expected (their stdin was closed).
    stopping: bool,
}

impl Children {
    /// Re-executes this test binary `shares.len()` times, running only the
    /// hidden child test; child `k` opens `shares[k]` connections.
    fn spawn(srv: &Server, token: &[String], shares: Vec<usize>, ping_ms: u64) -> Children {
        let exe = std::env::current_exe().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let mut procs = Vec::new();
        let mut stdin = Vec::new();
        for (k, share) in shares.iter().enumerate() {
            let mut child = Command::new(&exe)
                .args([
                    IDLE_CHILD_TEST,
                    "--exact",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env("STARLING_CONN_CHILD", k.to_string())
                .env("STARLING_CHILD_ADDR", srv.tls_addr.to_string())
                .env("STARLING_CHILD_CA", &srv.ca)
                .env("STARLING_CHILD_TOKEN", &token[k % token.len()])
                .env("STARLING_CHILD_COUNT", share.to_string())
                .env("STARLING_CHILD_PING_MS", ping_ms.to_string())
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap();
            stdin.push(child.stdin.take());
            let out = child.stdout.take().unwrap();
            procs.push(KillOnDrop(child));
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    if tx.send((k, Some(line))).is_err() {
                        return;
                    }
                }
                let _ = tx.send((k, None));
            });
        }
        Children {
            procs,
            stdin,
            status: vec![ChildStatus::default(); shares.len()],
            shares,
            rx,
            stopping: false,
        }
    }

    /// Reads the children's reports until `done` holds; fails on a lost
    /// connection, an unexpected exit, or after `limit`.
    fn until(&mut self, what: &str, limit: Duration, mut done: impl FnMut(&Children) -> bool) {
        let deadline = now() + limit;
        loop {
            for (k, st) in self.status.iter().enumerate() {
                assert_eq!(st.lost, 0, "child {k} lost connections: {st:?}");
                if st.eof && !self.stopping {
                    let exit = self.procs[k].0.wait();
                    panic!("child {k} exited early ({exit:?}): {st:?}");
                }
            }
            if done(self) {
                return;
            }
            let left = deadline.saturating_duration_since(now());
            assert!(
                !left.is_zero(),
                "timed out waiting for {what}: {:?}",
                self.status
            );
            match self.rx.recv_timeout(left.min(Duration::from_secs(1))) {
                Ok((k, Some(line))) => self.status[k].parse(&line),
                Ok((k, None)) => self.status[k].eof = true,
                Err(_) => {}
            }
        }
    }

    fn opened(&self) -> usize {
        self.status.iter().map(|s| s.opened).sum()
    }

    /// Closes their stdin (they close their connections and exit), then
    /// checks that each exited successfully after a clean close of all its
    /// connections.
    fn stop(mut self) {
        self.stopping = true;
        for s in &mut self.stdin {
            drop(s.take());
        }
        self.until(
            "the children to close and exit",
            Duration::from_secs(120),
            |c| c.status.iter().all(|s| s.eof),
        );
        for (k, p) in self.procs.iter_mut().enumerate() {
            let deadline = now() + Duration::from_secs(30);
            let st = loop {
                if let Some(st) = p.0.try_wait().unwrap() {
                    break st;
                }
                assert!(now() < deadline, "child {k} did not exit");
                std::thread::sleep(Duration::from_millis(50));
            };
            assert!(st.success(), "child {k}: {st:?}");
            assert_eq!(
                self.status[k].closed,
                Some(self.shares[k]),
                "child {k}: every connection closed cleanly"
            );
        }
    }
}

/// 10,000 authenticated idle TLS connections that only heartbeat, held by
/// child processes (this test binary re-executed; one process may hold at
/// most 20,000 files): the server's gauge reaches the total, heartbeats
/// keep every connection open past the idle timeout, nothing is closed,
/// the server's memory per connection is bounded, and every connection
/// closes cleanly when its process ends. The count can be changed with
/// STARLING_IDLE_CONNS (each child holds at most 5,000).
#[test]
pub(super) fn ten_thousand_idle_connections_with_heartbeats() {
    let total: usize = std::env::var("STARLING_IDLE_CONNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    // Children ping every second (also while still opening); a connection
    // silent for 8 s is closed, and the connections are held for longer
    // than that once all are open.
    let idle_ms = 8000;
    let toml = format!(
        "[limits]\ntimer_tick_ms = 100\nheartbeat_ms = 1000\nidle_timeout_ms = {idle_ms}\n"
    );
    let srv = Server::start("auto", &toml);
    let pid = srv.child.0.id();
    // One user per child; each child opens all its connections with its
    // user's token (a session may hold many connections).
    let procs = total.div_ceil(5000).max(2);
    let tokens: Vec<String> = (0..procs)
        .map(|k| {
            let who = format!("idle{k}@example.org");
            let mut c = srv.hello("");
            register(&srv, &mut c, email(&who), &who).access_token
        })
        .collect();
    // The registration connections were dropped above: wait until the
    // server has closed them.
    let deadline = now() + Duration::from_secs(30);
    while open_connections(&srv) != 0 {
        assert!(now() < deadline, "registration connections stay open");
        std::thread::sleep(Duration::from_millis(50));
    }
    let rss_before = rss_kib(pid);
    let shares: Vec<usize> = (0..procs)
        .map(|k| total / procs + usize::from(k < total % procs))
        .collect();
    let t0 = now();
    let mut children = Children::spawn(&srv, &tokens, shares, 1000);

    children.until("all connections to open", Duration::from_secs(300), |c| {
        c.opened() == total
    });
    let opened = t0.elapsed();
    let deadline = now() + Duration::from_secs(60);
    while open_connections(&srv) != total as i64 {
        assert!(now() < deadline, "gauge: {}", srv.metrics());
        std::thread::sleep(Duration::from_millis(100));
    }
    let rss_open = rss_kib(pid);

    // Hold past the idle timeout, then wait for one more complete ping
    // round of every child: each connection answered after it had been
    // open longer than the idle timeout.
    let hold = Duration::from_millis(idle_ms + 2000);
    let held_from = now();
    children.until("the hold", hold + Duration::from_secs(60), |_| {
        held_from.elapsed() >= hold
    });
    let passes: Vec<u64> = children.status.iter().map(|s| s.passes).collect();
    children.until(
        "a ping round after the hold",
        Duration::from_secs(120),
        |c| c.status.iter().zip(&passes).all(|(s, p)| s.passes > *p),
    );
    let held = open_connections(&srv);
    let rss_held = rss_kib(pid);
    let m = srv.metrics();
    assert_eq!(held, total as i64, "{m}");
    assert_eq!(
        metric_sum(&srv, "starling_heartbeat_timeouts_total"),
        0,
        "{m}"
    );

    children.stop();
    let deadline = now() + Duration::from_secs(60);
    while open_connections(&srv) != 0 {
        assert!(now() < deadline, "connections left open: {}", srv.metrics());
        std::thread::sleep(Duration::from_millis(100));
    }

    let per_conn = (rss_open.saturating_sub(rss_before) * 1024) / total as u64;
    println!(
        "{total} idle TLS connections from {procs} processes opened in {opened:?}; server RSS {rss_before} KiB -> {rss_open} KiB open (~{per_conn} bytes per connection) -> {rss_held} KiB after holding {:?}",
        held_from.elapsed()
    );
    // Generous bounds: an idle connection costs a few KiB (TLS state, no
    // read buffer); holding them with heartbeats does not grow memory.
    assert!(per_conn < 48 * 1024, "{per_conn} bytes per idle connection");
    assert!(
        rss_held <= rss_open + rss_open / 4 + 16 * 1024,
        "RSS grew while holding: {rss_open} KiB -> {rss_held} KiB"
    );
}

/// Counters of one connection-holding thread of a child process.
#[derive(Default)]
pub(super) struct HoldStats {
    opened: std::sync::atomic::AtomicUsize,
    lost: std::sync::atomic::AtomicUsize,
    passes: std::sync::atomic::AtomicU64,
    closed: std::sync::atomic::AtomicUsize,
}

/// What a child holds: where, as whom, how many, how often it pings.
pub(super) struct HoldSpec {
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    token: String,
    /// Source addresses (127.0.0.x) to spread connections over.
    sources: Vec<std::net::IpAddr>,
    ping: Duration,
    deadline: Instant,
}

/// A new connection from `source`, authenticated with Hello{token}.
pub(super) fn open_authenticated(
    spec: &HoldSpec,
    source: std::net::IpAddr,
) -> Result<Client, String> {
    let tcp = tcp_connect(spec.addr, Some(source), None).map_err(|e| e.to_string())?;
    let mut c = Client::over(tcp, &spec.tls);
    c.try_send(
        1,
        Body::Hello(v1::Hello {
            protocol_version: 1,
            access_token: spec.token.clone(),
            ..Default::default()
        }),
    )
    .map_err(|e| e.to_string())?;
    match c.recv() {
        Some(v1::Frame {
            body: Some(Body::Welcome(w)),
            ..
        }) if w.authenticated.is_some() => Ok(c),
        other => Err(format!("no authenticated Welcome: {other:?}")),
    }
}

/// One thread of a child: opens `count` connections, pinging the open ones
/// every `spec.ping` (pipelined over the connections) until `stop`, then
/// closes them all (close_notify, FIN) and waits for the server's end of
/// stream on each.
pub(super) fn hold_connections(
    spec: &HoldSpec,
    worker: usize,
    count: usize,
    st: &HoldStats,
    stop: &std::sync::atomic::AtomicBool,
) {
    use std::sync::atomic::Ordering::Relaxed;
    let mut conns: Vec<Option<Client>> = Vec::with_capacity(count);
    let mut next_ping = now() + spec.ping;
    let mut nonce = 1u64;
    while !stop.load(Relaxed) && now() < spec.deadline {
        if now() >= next_ping {
            nonce += 1;
            for slot in &mut conns {
                if let Some(c) = slot
                    && c.try_send(nonce, Body::Ping(v1::Ping { nonce })).is_err()
                {
                    eprintln!("ping write failed");
                    *slot = None;
                    st.lost.fetch_add(1, Relaxed);
                }
            }
            for slot in &mut conns {
                if let Some(c) = slot {
                    match c.recv() {
                        Some(v1::Frame {
                            request_id,
                            body: Some(Body::Pong(_)),
                        }) if request_id == nonce => {}
                        other => {
                            eprintln!("no Pong: {other:?}");
                            *slot = None;
                            st.lost.fetch_add(1, Relaxed);
                        }
                    }
                }
            }
            if conns.len() == count {
                st.passes.fetch_add(1, Relaxed);
            }
            next_ping = now() + spec.ping;
        } else if conns.len() < count {
            let i = worker + 2 * conns.len();
            match open_authenticated(spec, spec.sources[i % spec.sources.len()]) {
                Ok(c) => {
                    conns.push(Some(c));
                    st.opened.fetch_add(1, Relaxed);
                }
                Err(e) => {
                    eprintln!("opening connection {i}: {e}");
                    conns.push(None);
                    st.lost.fetch_add(1, Relaxed);
                }
            }
        } else {
            let left = next_ping.saturating_duration_since(now());
            std::thread::sleep(left.min(Duration::from_millis(50)));
        }
    }
    for c in conns.iter_mut().flatten() {
        c.s.conn.send_close_notify();
        let _ = c.s.flush();
        let _ = c.s.sock.shutdown(Shutdown::Write);
    }
    for c in conns.iter_mut().flatten() {
        let mut buf = [0u8; 256];
        // The server answers end of stream by closing (it need not send
        // close_notify back); a frame, a timeout or a reset is not clean.
        let clean = match c.s.read(&mut buf) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => e.kind() == std::io::ErrorKind::UnexpectedEof,
        };
        if clean {
            st.closed.fetch_add(1, Relaxed);
        }
    }
}

/// Child side of `ten_thousand_idle_connections_with_heartbeats`: does
/// nothing unless STARLING_CONN_CHILD is set (the parent runs this binary
/// with `idle_connections_child --exact`). Opens STARLING_CHILD_COUNT
/// authenticated connections on two threads, holds them with pings,
/// reports `starling-child opened=N lost=N passes=N` lines, and when its
/// stdin closes (or after 10 minutes) closes them and reports `closed=N`.
#[test]
pub(super) fn idle_connections_child() {
    use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
    let Ok(k) = std::env::var("STARLING_CONN_CHILD") else {
        return;
    };
    let k: u8 = k.parse().unwrap();
    let var = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} not set"));
    let count: usize = var("STARLING_CHILD_COUNT").parse().unwrap();
    // Four source addresses per child (127.0.0.2.. for child 0), so that
    // ephemeral ports never run short.
    let sources = (0..4)
        .map(|i| std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2 + 4 * k + i)))
        .collect();
    let spec = HoldSpec {
        addr: var("STARLING_CHILD_ADDR").parse().unwrap(),
        tls: client_tls(std::path::Path::new(&var("STARLING_CHILD_CA"))),
        token: var("STARLING_CHILD_TOKEN"),
        sources,
        ping: Duration::from_millis(var("STARLING_CHILD_PING_MS").parse().unwrap()),
        deadline: now() + Duration::from_secs(600),
    };
    let stop = AtomicBool::new(false);
    let stats = [HoldStats::default(), HoldStats::default()];
    std::thread::scope(|s| {
        let stop = &stop;
        s.spawn(move || {
            // The parent closes our stdin to end the test (or dies).
            let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
            stop.store(true, Relaxed);
        });
        let workers: Vec<_> = stats
            .iter()
            .enumerate()
            .map(|(w, st)| {
                let n = count / 2 + usize::from(w < count % 2);
                let spec = &spec;
                s.spawn(move || hold_connections(spec, w, n, st, stop))
            })
            .collect();
        let mut last = String::new();
        loop {
            let finished = workers
                .iter()
                .all(std::thread::ScopedJoinHandle::is_finished);
            let sum = |f: &dyn Fn(&HoldStats) -> usize| stats.iter().map(f).sum::<usize>();
            let line = format!(
                "starling-child opened={} lost={} passes={}",
                sum(&|s| s.opened.load(Relaxed)),
                sum(&|s| s.lost.load(Relaxed)),
                stats
                    .iter()
                    .map(|s| s.passes.load(Relaxed))
                    .min()
                    .unwrap_or(0),
            );
            if line != last {
                println!("{line}");
                last = line;
            }
            if finished {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        for w in workers {
            w.join().unwrap();
        }
        let closed: usize = stats.iter().map(|s| s.closed.load(Relaxed)).sum();
        println!("starling-child closed={closed}");
        // The stdin thread ends at EOF; exit without waiting for it if
        // we stopped on the deadline.
        if !stop.load(Relaxed) {
            std::process::exit(1);
        }
    });
}
