//! Data-directory safety and storage faults through the real binary: the
//! shard count recorded in the data dir, the TLS material's set refused
//! when half-written, and a disk that fills or a filesystem that goes
//! read-only under a stream of Sends (truthful answers, health endpoints, the
//! shard refusing writes and serving reads, recovery in place once space is
//! back, nothing lost or invented), and a metadata store fault (exit with
//! status 74).

use std::collections::BTreeMap;
use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use starling_protocol::v1::frame::Body;

use starling_protocol::v1::{self, ErrorCode};

use super::{KillOnDrop, Server, call, client_tls, email, now, register, text, whole_history};

/// Starts `starling serve` on `<dir>/data` with `args` (after the test
/// defaults: ephemeral ports, auto driver), optionally restricted to one CPU
/// (so "one shard per core" means one). Returns the server and the lines it
/// printed up to `ready`.
fn launch(dir: tempfile::TempDir, args: &[&str], one_cpu: bool) -> (Server, Vec<String>) {
    launch_logging_to(dir, args, one_cpu, None)
}

/// [`launch`], with the server's stderr going to `stderr` if given.
fn launch_logging_to(
    dir: tempfile::TempDir,
    args: &[&str],
    one_cpu: bool,
    stderr: Option<&Path>,
) -> (Server, Vec<String>) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_starling"));
    cmd.arg("serve")
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .args(["--driver", "auto"])
        .args(args)
        .env("STARLING_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(match stderr {
            Some(p) => Stdio::from(std::fs::File::create(p).unwrap()),
            None => Stdio::inherit(),
        });
    if one_cpu {
        let cpu = first_allowed_cpu();
        use std::os::unix::process::CommandExt as _;
        // Safety: the closure runs in the forked child before exec and only
        // makes the sched_setaffinity(2) system call on a stack value: no
        // allocation, no lock.
        unsafe {
            cmd.pre_exec(move || {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(cpu, &mut set);
                if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let mut child = KillOnDrop(cmd.spawn().unwrap());
    let stdout = child.0.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let (mut tls_addr, mut metrics_addr, mut ca) = (None, None, None);
    let mut lines = Vec::new();
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("server did not become ready");
        if let Some(a) = line.strip_prefix("listening (TLS 1.3): ") {
            tls_addr = Some(a.parse().unwrap());
        } else if let Some(a) = line.strip_prefix("metrics: http://") {
            metrics_addr = Some(a.trim_end_matches("/metrics").parse().unwrap());
        } else if let Some(p) = line.trim().strip_prefix("CA certificate:") {
            ca = Some(PathBuf::from(p.trim()));
        }
        let ready = line == "ready";
        lines.push(line);
        if ready {
            break;
        }
    }
    let ca = ca.unwrap();
    let tls = client_tls(&ca);
    let srv = Server {
        child,
        dir,
        tls_addr: tls_addr.unwrap(),
        metrics_addr: metrics_addr.unwrap(),
        media_addr: None,
        ca,
        tls,
        startup: lines.clone(),
    };
    (srv, lines)
}

/// A config (in `root`, beside the data dir's mount) under which devices' last-seen times are
/// not written during a test, so that the fault a test injects is met by the write the test
/// makes (a last-seen write meeting it first would stop the server with another reason).
fn no_last_seen_writes(root: &Path) -> PathBuf {
    let cfg = root.join("starling.toml");
    std::fs::write(&cfg, "[accounts]\nlast_seen_flush_ms = 60000\n").unwrap();
    cfg
}

fn first_allowed_cpu() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    super::allowed_cpus(&status)
        .unwrap()
        .split([',', '-'])
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// Every file under `dir` with its size and modification and change times:
/// any write, truncation, creation, removal or rename shows.
fn fingerprint(dir: &Path) -> BTreeMap<PathBuf, (u64, i64, i64, i64, i64)> {
    use std::os::unix::fs::MetadataExt as _;
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let m = e.metadata().unwrap();
            if m.is_dir() {
                todo.push(e.path());
            }
            out.insert(
                e.path(),
                (
                    m.len(),
                    m.mtime(),
                    m.mtime_nsec(),
                    m.ctime(),
                    m.ctime_nsec(),
                ),
            );
        }
    }
    out
}

/// What a start that is expected to fail printed, and how it ended.
#[derive(Debug)]
pub(super) struct Refused {
    pub(super) code: Option<i32>,
    pub(super) stderr: String,
}

/// Runs `starling serve` on `data` with `args` and waits for it to exit
/// (it must, within 30 s: a start that is supposed to be refused).
pub(super) fn serve_expecting_exit(data: &Path, args: &[&str]) -> Refused {
    let mut child = super::KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_starling"))
            .arg("serve")
            .arg("--data-dir")
            .arg(data)
            .args(["--listen", "127.0.0.1:0", "--metrics-listen", "off"])
            .args(args)
            .env("STARLING_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let deadline = now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = child.0.try_wait().unwrap() {
            break st;
        }
        assert!(now() < deadline, "the server started instead of refusing");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    use std::io::Read as _;
    child
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    Refused {
        code: status.code(),
        stderr,
    }
}

/// A filesystem that failed a second after the first start left `ca.pem`
/// empty (or lost `server.key`). The next start must not generate a new CA
/// over the one clients may already trust: it refuses, naming the file, and
/// changes nothing.
#[test]
fn a_half_written_tls_set_is_refused_not_regenerated() {
    let mut srv = Server::start("auto", "");
    assert!(srv.sigterm().success());
    let tls = srv.dir.path().join("data/tls");
    let server_pem = std::fs::read(tls.join("server.pem")).unwrap();
    let server_key = std::fs::read(tls.join("server.key")).unwrap();
    let ca_pem = std::fs::read(tls.join("ca.pem")).unwrap();
    std::fs::write(tls.join("ca.pem"), b"").unwrap();

    let out = serve_expecting_exit(&srv.dir.path().join("data"), &[]);
    assert_eq!(out.code, Some(1), "{out:?}");
    let ca = tls.join("ca.pem").display().to_string();
    assert!(out.stderr.contains(&ca), "{out:?}");
    assert!(out.stderr.contains("is empty"), "{out:?}");
    assert!(out.stderr.contains("Refusing to generate"), "{out:?}");
    assert_eq!(out.stderr.trim().lines().count(), 1, "{out:?}");
    assert!(std::fs::read(tls.join("ca.pem")).unwrap().is_empty());
    assert_eq!(std::fs::read(tls.join("server.pem")).unwrap(), server_pem);
    assert_eq!(std::fs::read(tls.join("server.key")).unwrap(), server_key);

    // The CA is whole again but the key is gone: still refused, and the CA
    // clients trust is not replaced.
    std::fs::write(tls.join("ca.pem"), &ca_pem).unwrap();
    std::fs::remove_file(tls.join("server.key")).unwrap();
    let out = serve_expecting_exit(&srv.dir.path().join("data"), &[]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("server.key is missing"), "{out:?}");
    assert_eq!(std::fs::read(tls.join("ca.pem")).unwrap(), ca_pem);
    assert!(!tls.join("server.key").exists());
}

/// One conversation of the shard-count test: its id and the bodies sent
/// in it so far (seq i+1 holds bodies[i]).
struct Conv {
    id: u64,
    peer: u64,
    bodies: Vec<String>,
}

/// Sends one more message in `conv` and checks it gets the next seq.
fn send_next(a: &mut super::Client, conv: &mut Conv) {
    let n = conv.bodies.len();
    let body = format!("conv {} message {}", conv.id, n + 1);
    let cmid = u8::try_from(n + 1).unwrap();
    let Body::SendAck(ack) = call(a, text(cmid, conv.peer, &body)) else {
        panic!("send refused")
    };
    assert_eq!(ack.conversation_id, conv.id);
    assert_eq!((ack.seq, ack.duplicate), (n as u64 + 1, false), "{body}");
    conv.bodies.push(body);
}

/// Every message of every conversation is there, at its seq.
fn check_histories(a: &mut super::Client, convs: &[Conv]) {
    for c in convs {
        let got: Vec<(u64, String)> = whole_history(a, c.id)
            .into_iter()
            .map(|m| (m.seq, String::from_utf8(m.body.to_vec()).unwrap()))
            .collect();
        let want: Vec<(u64, String)> = (1..).zip(c.bodies.iter().cloned()).collect();
        assert_eq!(got, want, "conversation {}", c.id);
    }
}

/// Issue 34 §1: a data dir written with two shards, then started with one
/// (or on a one-core machine), moved conversations: seqs restarted at 1 and
/// history vanished. Now the count is recorded; an explicit other count is
/// refused with the data untouched, the automatic count uses the recorded
/// one, and a data dir from before the record has its count inferred.
#[test]
fn the_shard_count_of_existing_data_cannot_change() {
    use starling_router::ids::{ConvId, owner_shard};
    let (mut srv, lines) = launch(tempfile::tempdir().unwrap(), &["--shards", "2"], false);
    assert!(
        lines
            .iter()
            .any(|l| l == "layout: 2 shards (new data dir, recorded)"),
        "{lines:?}"
    );
    let mut a = srv.hello("");
    let ga = register(&srv, &mut a, email("ana@example.org"), "ana@example.org");
    // Conversations with peers until both shards own some (a conversation
    // owned by shard 1 is one a single-shard start would lose).
    let mut convs: Vec<Conv> = Vec::new();
    for k in 0..12 {
        let ident = format!("peer{k}@example.org");
        let mut c = srv.hello("");
        let g = register(&srv, &mut c, email(&ident), &ident);
        let Body::SendAck(ack) = call(&mut a, text(1, g.user_id, "first")) else {
            panic!()
        };
        let mut conv = Conv {
            id: ack.conversation_id,
            peer: g.user_id,
            bodies: vec!["first".to_owned()],
        };
        send_next(&mut a, &mut conv);
        send_next(&mut a, &mut conv);
        convs.push(conv);
        let on = |s| {
            convs
                .iter()
                .filter(|c| owner_shard(ConvId(c.id), 2) == s)
                .count()
        };
        if convs.len() >= 3 && on(0) > 0 && on(1) > 0 {
            break;
        }
    }
    assert!(convs.iter().any(|c| owner_shard(ConvId(c.id), 2) == 1));
    drop(a);
    assert!(srv.sigterm().success());
    let data = srv.dir.path().join("data");
    let layout = std::fs::read_to_string(data.join("layout.toml")).unwrap();
    assert!(layout.contains("shards = 2"), "{layout}");
    let before = fingerprint(&data);

    // An explicit other count: refused, naming both counts and what to do;
    // nothing in the data dir changed.
    let out = serve_expecting_exit(&data, &["--shards", "1"]);
    assert_eq!(out.code, Some(1), "{out:?}");
    for want in [
        "holds 2 shards",
        "asks for 1",
        "--shards 2",
        "not supported yet",
    ] {
        assert!(out.stderr.contains(want), "{want}: {out:?}");
    }
    assert_eq!(out.stderr.trim().lines().count(), 1, "{out:?}");
    assert_eq!(fingerprint(&data), before);

    // Automatic on a one-CPU machine: the recorded 2, and everything is
    // where it was: history whole, seqs continue.
    let Server { dir, .. } = srv;
    let (mut srv, lines) = launch(dir, &["--shards", "0"], true);
    assert!(
        lines
            .iter()
            .any(|l| l == "layout: 2 shards (recorded in the data dir)"),
        "{lines:?}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with("shards: 2 ")),
        "{lines:?}"
    );
    let mut a = srv.hello(&ga.access_token);
    check_histories(&mut a, &convs);
    for c in &mut convs {
        send_next(&mut a, c);
    }
    drop(a);
    assert!(srv.sigterm().success());

    // A data dir from before the record: an explicit other count is
    // refused (and nothing is recorded); automatic infers 2 from shards/.
    std::fs::remove_file(data.join("layout.toml")).unwrap();
    let before = fingerprint(&data);
    let out = serve_expecting_exit(&data, &["--shards", "1"]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("holds 2 shards"), "{out:?}");
    assert!(out.stderr.contains("found shards/0 .. shards/1"), "{out:?}");
    assert_eq!(fingerprint(&data), before);
    let Server { dir, .. } = srv;
    let (mut srv, lines) = launch(dir, &[], true);
    assert!(
        lines
            .iter()
            .any(|l| l == "layout: 2 shards (inferred from shards/ and recorded)"),
        "{lines:?}"
    );
    let layout = std::fs::read_to_string(data.join("layout.toml")).unwrap();
    assert!(layout.contains("shards = 2"), "{layout}");
    assert!(layout.contains("owner_shard = \"mix64-mod/1\""), "{layout}");
    let mut a = srv.hello(&ga.access_token);
    for c in &mut convs {
        send_next(&mut a, c);
    }
    check_histories(&mut a, &convs);
    drop(a);
    assert!(srv.sigterm().success());
}

// ---------------------------------------------------------------------------------------------
// storage faults

/// The exit status after a storage fault (`starling_gateway::health::EXIT_STORAGE_FAULT`).
const EXIT_STORAGE_FAULT: i32 = 74;

/// Runs a system tool (root: mount, mkfs), failing the test with its output if it fails.
fn run(tool: &str, args: &[&str]) {
    let path = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from(tool));
    let out = Command::new(&path).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{tool} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A filesystem mounted at `<root>/data` for one test: unmounted when dropped, also when the
/// test panics (drop the servers using it first: declare the mount before them).
pub(super) struct Mount {
    point: PathBuf,
    /// The ext4 image's directory (removed after the unmount).
    image: Option<tempfile::TempDir>,
}

impl Mount {
    /// A tmpfs of `bytes` (filling it is a full disk).
    pub(super) fn tmpfs(root: &Path, bytes: u64) -> Mount {
        let point = root.join("data");
        std::fs::create_dir(&point).unwrap();
        let size = format!("size={bytes}");
        run(
            "mount",
            &["-t", "tmpfs", "-o", &size, "tmpfs", point.to_str().unwrap()],
        );
        Mount { point, image: None }
    }

    /// An ext4 filesystem on a loop device, mounted `errors=remount-ro`: on an error the
    /// kernel makes it read-only under the running server, as a real disk's error would.
    /// (`mount -o remount,ro` is refused with EBUSY while the server holds files open for
    /// writing, so it cannot make a filesystem read-only under a running server.)
    pub(super) fn ext4(root: &Path, mib: u64) -> Mount {
        let image = tempfile::tempdir().unwrap();
        let file = image.path().join("fs.img");
        std::fs::File::create(&file)
            .unwrap()
            .set_len(mib << 20)
            .unwrap();
        run("mkfs.ext4", &["-q", "-F", file.to_str().unwrap()]);
        let point = root.join("data");
        std::fs::create_dir(&point).unwrap();
        let m = Mount {
            point,
            image: Some(image),
        };
        m.mount_ext4();
        m
    }

    fn image_file(&self) -> PathBuf {
        self.image.as_ref().unwrap().path().join("fs.img")
    }

    fn mount_ext4(&self) {
        run(
            "mount",
            &[
                "-o",
                "loop,errors=remount-ro",
                self.image_file().to_str().unwrap(),
                self.point.to_str().unwrap(),
            ],
        );
    }

    /// Bytes in use (statvfs).
    fn used_bytes(&self) -> u64 {
        let path = std::ffi::CString::new(self.point.to_str().unwrap()).unwrap();
        // Safety: a zeroed statvfs is a valid out-value; the path is a NUL-terminated string
        // that outlives the call.
        let st = unsafe {
            let mut st: libc::statvfs = std::mem::zeroed();
            assert_eq!(libc::statvfs(path.as_ptr(), &mut st), 0);
            st
        };
        (st.f_blocks - st.f_bfree) * st.f_frsize
    }

    /// Changes a tmpfs's size (to the bytes in use: the disk is full).
    pub(super) fn resize(&self, bytes: u64) {
        let size = format!("remount,size={bytes}");
        run("mount", &["-o", &size, self.point.to_str().unwrap()]);
    }

    /// Fills the tmpfs: its size becomes what is in use.
    pub(super) fn fill(&self) {
        for _ in 0..20 {
            let used = self.used_bytes();
            let size = format!("remount,size={used}");
            let ok = Command::new("mount")
                .args(["-o", &size, self.point.to_str().unwrap()])
                .stderr(Stdio::null())
                .status()
                .unwrap()
                .success();
            if ok {
                return;
            }
            // Something grew meanwhile (the log's spare maker): measure again.
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("could not fill {}", self.point.display());
    }

    /// The kernel turns the ext4 filesystem read-only (`ext4_error`, errors=remount-ro).
    pub(super) fn force_read_only(&self) {
        let out = Command::new("findmnt")
            .args(["-n", "-o", "SOURCE", self.point.to_str().unwrap()])
            .output()
            .unwrap();
        let dev = String::from_utf8(out.stdout).unwrap();
        let dev = dev.trim().trim_start_matches("/dev/");
        std::fs::write(format!("/sys/fs/ext4/{dev}/trigger_fs_error"), b"1").unwrap();
    }

    /// Unmounts and mounts the ext4 filesystem again (writable; its journal is replayed).
    pub(super) fn remount_ext4(&self) {
        self.unmount();
        self.mount_ext4();
    }

    fn unmount(&self) {
        for _ in 0..50 {
            let ok = Command::new("umount")
                .arg(&self.point)
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = Command::new("umount").arg("-l").arg(&self.point).status();
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        self.unmount();
    }
}

/// One GET on the metrics listener: (status code, body).
fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use std::io::{Read as _, Write as _};
    let mut out = String::new();
    let sent = std::net::TcpStream::connect(addr).and_then(|mut s| {
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())?;
        s.read_to_string(&mut out)
    });
    if let Err(e) = sent {
        return (0, e.to_string());
    }
    let code = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    (code, body)
}

/// Message `i` of a fault test: its client_msg_id and its body both name `i`.
fn fat_send(i: u32, to: u64, body_bytes: usize, first_attempt: bool) -> Body {
    let mut cmid = [0x5au8; 16];
    cmid[..4].copy_from_slice(&i.to_be_bytes());
    let mut body = format!("m{i:07} ").into_bytes();
    body.resize(body_bytes.max(body.len()), b'x');
    Body::Send(v1::Send {
        client_msg_id: cmid.to_vec().into(),
        to: Some(v1::Recipient {
            target: Some(v1::recipient::Target::UserId(to)),
        }),
        content_type: "text/plain".into(),
        body: body.into(),
        first_attempt,
        ..Default::default()
    })
}

/// The message index a [`fat_send`] body names.
fn index_of(body: &[u8]) -> u32 {
    std::str::from_utf8(&body[1..8]).unwrap().parse().unwrap()
}

/// What the server said about one Send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// SendAck with this seq.
    Acked(u64),
    /// STORAGE_FAILURE: the outcome is unknown.
    Unknown,
    /// STORAGE_FAILURE: this Send stored nothing.
    NotStored,
}

/// How a stream of Sends ended.
#[derive(Debug)]
struct StreamEnd {
    outcomes: BTreeMap<u32, Outcome>,
    conv: u64,
}

impl StreamEnd {
    fn count(&self, f: impl Fn(&Outcome) -> bool) -> usize {
        self.outcomes.values().filter(|o| f(o)).count()
    }
}

/// Sends `fat_send(i)` for i = `first`, `first` + 1, ... (at most `window` outstanding) until
/// `refusals` of them were refused because the shard's log had already failed
/// (`STORAGE_SHARD_FAILED`: it refuses writes while it recovers); then sends nothing more and
/// waits for every answer. `progress(acked, failures)` runs after every answer. Panics on any
/// answer other than SendAck or STORAGE_FAILURE, on a Goodbye or a close (the server must keep
/// serving), and if the shard does not fail within 20,000 messages or 45 s.
fn stream_until_refused(
    c: &mut super::Client,
    first: u32,
    to: u64,
    body_bytes: usize,
    window: usize,
    refusals: usize,
    mut progress: impl FnMut(usize, usize),
) -> StreamEnd {
    let max = first + 20_000;
    use std::collections::HashMap;
    let deadline = now() + Duration::from_secs(45);
    let mut outcomes = BTreeMap::new();
    let mut inflight: HashMap<u64, u32> = HashMap::new();
    let (mut next, mut acked, mut failures, mut refused, mut conv) = (first, 0usize, 0, 0, 0u64);
    loop {
        assert!(now() < deadline, "no refusals within 45 s: {outcomes:?}");
        while refused < refusals && inflight.len() < window {
            assert!(next < max, "no storage fault within {max} messages");
            let rid = c.next_id;
            c.next_id += 1;
            c.send(rid, fat_send(next, to, body_bytes, true));
            inflight.insert(rid, next);
            next += 1;
        }
        if refused >= refusals && inflight.is_empty() {
            break;
        }
        let f = c.recv().expect("the server kept the connection");
        let answer = inflight.remove(&f.request_id).filter(|_| f.request_id != 0);
        match (f.body, answer) {
            (Some(Body::SendAck(a)), Some(i)) => {
                conv = a.conversation_id;
                acked += 1;
                outcomes.insert(i, Outcome::Acked(a.seq));
            }
            (Some(Body::Error(e)), Some(i)) if e.code == ErrorCode::StorageFailure as i32 => {
                failures += 1;
                let o = if e.message == starling_router::STORAGE_SHARD_FAILED {
                    refused += 1;
                    Outcome::NotStored
                } else if e.message == starling_router::STORAGE_NOT_STORED {
                    Outcome::NotStored
                } else {
                    Outcome::Unknown
                };
                outcomes.insert(i, o);
            }
            (body, i) => panic!("send {i:?}: unexpected {body:?}"),
        }
        progress(acked, failures);
    }
    StreamEnd { outcomes, conv }
}

/// Polls `path` on the metrics listener until it answers `code` (or panics after `secs`);
/// the body.
fn wait_http(addr: std::net::SocketAddr, path: &str, code: u16, secs: u64) -> String {
    let deadline = now() + Duration::from_secs(secs);
    loop {
        let (got, body) = http_get(addr, path);
        if got == code {
            return body;
        }
        assert!(now() < deadline, "{path}: still {got} {body}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// While shard 0's log is failed: `/readyz` says 503 naming it, `/healthz` says 200 (the
/// process is alive: no supervisor restart), the gauges say which shard failed; the process is
/// still running.
fn check_shard_failed_reported(srv: &mut Server) {
    let body = wait_http(srv.metrics_addr, "/readyz", 503, 30);
    assert!(
        body.starts_with("storage fault: shard 0: log failed: "),
        "{body}"
    );
    assert!(body.contains("recovers in place"), "{body}");
    assert_eq!(body.trim_end().lines().count(), 1, "{body}");
    assert_eq!(http_get(srv.metrics_addr, "/healthz").0, 200);
    let m = http_get(srv.metrics_addr, "/metrics").1;
    assert!(m.contains("starling_ready 0\n"), "{m}");
    assert!(
        m.contains("starling_storage_failed{shard=\"0\"} 1\n"),
        "{m}"
    );
    assert!(
        srv.child.0.try_wait().unwrap().is_none(),
        "the server exited"
    );
}

/// The acknowledged messages of `end` from seq `after` on, read with GetHistory on `c`: each
/// at its acknowledged seq, nothing else among them.
fn check_reads(c: &mut super::Client, end: &StreamEnd, after: u64) {
    let got: Vec<(u64, u32)> = history_after(c, end.conv, after)
        .iter()
        .map(|m| (m.seq, index_of(&m.body)))
        .collect();
    let want: Vec<(u64, u32)> = end
        .outcomes
        .iter()
        .filter_map(|(&i, o)| match o {
            Outcome::Acked(seq) if *seq > after => Some((*seq, i)),
            _ => None,
        })
        .collect();
    assert_eq!(got, want, "history after seq {after}");
}

/// What the health endpoints said once `/healthz` stopped answering 200.
#[derive(Debug)]
struct FaultSeen {
    healthz: (u16, String),
    readyz: (u16, String),
    metrics: String,
}

/// Polls `/healthz` every few ms until it answers something other than 200, then reads
/// `/readyz` and `/metrics` at once; `None` if the server went away first.
fn watch_health(addr: std::net::SocketAddr) -> std::thread::JoinHandle<Option<FaultSeen>> {
    std::thread::spawn(move || {
        let deadline = now() + Duration::from_secs(120);
        while now() < deadline {
            let healthz = http_get(addr, "/healthz");
            match healthz.0 {
                200 => std::thread::sleep(Duration::from_millis(5)),
                0 => return None,
                _ => {
                    let readyz = http_get(addr, "/readyz");
                    let metrics = http_get(addr, "/metrics").1;
                    return Some(FaultSeen {
                        healthz,
                        readyz,
                        metrics,
                    });
                }
            }
        }
        None
    })
}

/// Waits for the server to exit on its own (after a fault); its status.
fn wait_exit(srv: &mut Server) -> std::process::ExitStatus {
    let deadline = now() + Duration::from_secs(20);
    loop {
        if let Some(st) = srv.child.0.try_wait().unwrap() {
            return st;
        }
        assert!(now() < deadline, "the server did not exit after the fault");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A connection authenticated by `token` that takes frames up to 1 MiB (whole history pages
/// of large messages).
fn hello_large(srv: &Server, token: &str) -> super::Client {
    let mut c = srv.connect();
    let w = c.request(Body::Hello(v1::Hello {
        protocol_version: 1,
        access_token: token.into(),
        frame_bytes_max: 1 << 20,
        ..Default::default()
    }));
    assert!(matches!(w, Body::Welcome(_)), "{w:?}");
    c
}

/// Every message of `conv` after `after_seq`, by paging GetHistory.
fn history_after(c: &mut super::Client, conv: u64, after_seq: u64) -> Vec<v1::Message> {
    let mut out: Vec<v1::Message> = Vec::new();
    loop {
        let after = out.last().map_or(after_seq, |m| m.seq);
        let Body::HistoryPage(p) = call(
            c,
            Body::GetHistory(v1::GetHistory {
                conversation_id: conv,
                anchor: Some(v1::get_history::Anchor::AfterSeq(after)),
                limit: 200,
            }),
        ) else {
            panic!("GetHistory refused")
        };
        let more = p.has_more && !p.messages.is_empty();
        out.extend(p.messages);
        if !more {
            return out;
        }
    }
}

/// Retries `fat_send(i)` (same client_msg_id, first_attempt = false) for every `i` with at most
/// 32 outstanding; the SendAcks by `i`.
fn retry_all(
    c: &mut super::Client,
    to: u64,
    indexes: &[u32],
    body_bytes: usize,
) -> BTreeMap<u32, v1::SendAck> {
    let mut acks = BTreeMap::new();
    for chunk in indexes.chunks(32) {
        let mut ids = std::collections::HashMap::new();
        for &i in chunk {
            let rid = c.next_id;
            c.next_id += 1;
            c.send(rid, fat_send(i, to, body_bytes, false));
            ids.insert(rid, i);
        }
        while !ids.is_empty() {
            let f = c.recv().expect("connection closed during retries");
            if let Some(i) = ids.remove(&f.request_id) {
                match f.body {
                    Some(Body::SendAck(a)) => {
                        acks.insert(i, a);
                    }
                    other => panic!("retry of {i}: {other:?}"),
                }
            }
        }
    }
    acks
}

/// After the restart: everything acknowledged is there at its seq; nothing said not to be
/// stored is; a retry of every unacknowledged Send (same client_msg_id, first_attempt =
/// false) resolves it: the original seq with `duplicate` if it was stored, a new seq if not.
/// In the end every message is there exactly once, at seqs 1..=n.
///
/// Reading every body back would take most of a minute in a debug build, so the acknowledged
/// messages are checked by retrying them (with a short body: the server must answer from
/// dedup with the acknowledged seq, as a device's outbox relies on), and the history is read
/// in full from just before the first unacknowledged message on, which is where anything the
/// fault touched has its seq.
///
/// `in_place`: the log was reopened in place, cut back to what it had made durable, so no
/// unacknowledged message may be there (nothing refused reappears).
fn check_and_resolve(
    srv: &Server,
    token: &str,
    to: u64,
    body_bytes: usize,
    end: &StreamEnd,
    in_place: bool,
) {
    let mut a = hello_large(srv, token);
    let acked: Vec<(u32, u64)> = end
        .outcomes
        .iter()
        .filter_map(|(&i, o)| match o {
            Outcome::Acked(seq) => Some((i, *seq)),
            _ => None,
        })
        .collect();
    let open: Vec<u32> = end
        .outcomes
        .iter()
        .filter(|(_, o)| !matches!(o, Outcome::Acked(_)))
        .map(|(&i, _)| i)
        .collect();
    // Acknowledged before the first unacknowledged message: below the region the fault touched.
    let first_open = open.first().copied().unwrap_or(u32::MAX);
    let from_seq = acked
        .iter()
        .filter(|(i, _)| *i < first_open)
        .map(|(_, seq)| *seq)
        .max()
        .unwrap_or(0)
        .saturating_sub(8);
    let tail = history_after(&mut a, end.conv, from_seq);
    let stored: BTreeMap<u32, u64> = tail.iter().map(|m| (index_of(&m.body), m.seq)).collect();
    let again = retry_all(
        &mut a,
        to,
        &acked.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
        9,
    );
    for &(i, seq) in &acked {
        let ack = &again[&i];
        assert_eq!((ack.seq, ack.duplicate), (seq, true), "acked message {i}");
        if seq > from_seq {
            assert_eq!(
                stored.get(&i),
                Some(&seq),
                "acked message {i} in the history"
            );
        }
    }
    for (&i, &o) in &end.outcomes {
        if o == Outcome::NotStored || (in_place && !matches!(o, Outcome::Acked(_))) {
            assert_eq!(stored.get(&i), None, "message {i} ({o:?}) is not stored");
        }
    }
    let resolved = retry_all(&mut a, to, &open, body_bytes);
    let mut resolved_present = 0;
    for &i in &open {
        let ack = &resolved[&i];
        assert_eq!(ack.conversation_id, end.conv);
        match stored.get(&i) {
            Some(&seq) => {
                assert_eq!((ack.seq, ack.duplicate), (seq, true), "retry of stored {i}");
                resolved_present += 1;
            }
            None => assert!(!ack.duplicate, "retry of absent {i}: {ack:?}"),
        }
    }
    let all = history_after(&mut a, end.conv, from_seq);
    let seqs: Vec<u64> = all.iter().map(|m| m.seq).collect();
    let want: Vec<u64> = (from_seq + 1..=end.outcomes.len() as u64).collect();
    assert_eq!(seqs, want, "seqs after the retries");
    let mut indexes: Vec<u32> = all.iter().map(|m| index_of(&m.body)).collect();
    indexes.sort_unstable();
    let mut want: Vec<u32> = acked
        .iter()
        .filter(|(_, seq)| *seq > from_seq)
        .map(|(i, _)| *i)
        .chain(open.iter().copied())
        .collect();
    want.sort_unstable();
    assert_eq!(indexes, want, "every message exactly once");
    println!(
        "afterwards: {} of {} unacknowledged were stored",
        resolved_present,
        open.len()
    );
}

/// The server's last stderr line.
fn last_line(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .last()
        .unwrap_or("")
        .to_owned()
}

/// Issue 34 §2, issue 37 §3: the disk fills under a stream of Sends. Every Send is answered
/// truthfully (acknowledged, outcome unknown, or stored nothing); the shard then refuses
/// writes with STORAGE_FAILURE and keeps serving reads; `/readyz` names the failed shard while
/// `/healthz` stays 200; the process does not exit. Once space is back the shard's log is
/// reopened in place: the shard serves writes again, nothing acknowledged is lost, no refused
/// or unknown message is there (their retries are new messages), seqs continue without a gap.
#[test]
fn a_full_disk_under_a_stream_of_sends_recovers_in_place() {
    let root = tempfile::tempdir().unwrap();
    let mount = Mount::tmpfs(root.path(), 512 << 20);
    let log = root.path().join("stderr-1.log");
    let cfg = root.path().join("starling.toml");
    std::fs::write(
        &cfg,
        "[accounts]\nlast_seen_flush_ms = 60000\n[storage]\nrecovery_retry_ms = 200\n",
    )
    .unwrap();
    let args = ["--shards", "1", "--config", cfg.to_str().unwrap()];
    let (mut srv, _) = launch_logging_to(root, &args, false, Some(&log));
    let mut a = srv.hello("");
    let ga = register(&srv, &mut a, email("ana@example.org"), "ana@example.org");
    let mut b = srv.hello("");
    let gb = register(&srv, &mut b, email("ben@example.org"), "ben@example.org");
    drop(b);
    let mut a = hello_large(&srv, &ga.access_token);
    // The conversation exists (its metadata is written) before the disk fills.
    let Body::SendAck(first) = call(&mut a, fat_send(0, gb.user_id, 16, true)) else {
        panic!("first message refused")
    };
    // The disk is full from now on: the log writes into its preallocated segment and spare,
    // then cannot make the next one.
    mount.fill();
    let body_bytes = 56 << 10;
    assert_eq!(http_get(srv.metrics_addr, "/readyz").0, 200);
    let mut end = stream_until_refused(&mut a, 1, gb.user_id, body_bytes, 4, 8, |_, _| {});
    end.outcomes.insert(0, Outcome::Acked(first.seq));
    end.conv = first.conversation_id;
    let unknown = end.count(|o| *o == Outcome::Unknown);
    let not_stored = end.count(|o| *o == Outcome::NotStored);
    let acked = end.count(|o| matches!(o, Outcome::Acked(_)));
    println!("{acked} acked, {unknown} outcome unknown, {not_stored} not stored");
    assert!(
        unknown > 0,
        "the in-flight batch's senders hear 'unknown': {end:?}"
    );
    check_shard_failed_reported(&mut srv);

    // Still full: reads keep working, writes are refused, the server stays up through several
    // recovery attempts.
    let last_acked = end
        .outcomes
        .values()
        .filter_map(|o| match o {
            Outcome::Acked(seq) => Some(*seq),
            _ => None,
        })
        .max()
        .unwrap();
    check_reads(&mut a, &end, last_acked.saturating_sub(6));
    std::thread::sleep(Duration::from_millis(800));
    let e = call(&mut a, fat_send(1_000_000, gb.user_id, 16, true));
    let Body::Error(e) = e else {
        panic!("a Send while the disk is full: {e:?}")
    };
    assert_eq!(e.code, ErrorCode::StorageFailure as i32, "{e:?}");
    assert_eq!(e.message, starling_router::STORAGE_SHARD_FAILED);
    end.outcomes.insert(1_000_000, Outcome::NotStored);
    check_shard_failed_reported(&mut srv);

    // Space returns: the shard recovers in place, without a restart.
    mount.resize(1 << 30);
    wait_http(srv.metrics_addr, "/readyz", 200, 30);
    let m = http_get(srv.metrics_addr, "/metrics").1;
    assert!(
        m.contains("starling_storage_failed{shard=\"0\"} 0\n"),
        "{m}"
    );
    assert!(m.contains("starling_ready 1\n"), "{m}");
    check_reads(&mut a, &end, last_acked.saturating_sub(6));
    drop(a);
    check_and_resolve(&srv, &ga.access_token, gb.user_id, body_bytes, &end, true);
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert!(
        stderr.contains("reopened in place"),
        "the recovery is logged:\n{stderr}"
    );
    assert!(srv.sigterm().success());
    drop(srv);
    drop(mount);
}

/// Issue 34 §2, issue 37 §3: the filesystem goes read-only under a stream of Sends: the same
/// truthful answers; the shard refuses writes and serves reads, and the process stays up,
/// trying to reopen its log, for as long as the filesystem stays read-only. (An ext4 made
/// read-only by an error cannot be made writable under a running server: its journal is
/// aborted until it is unmounted. So it is stopped, the filesystem mounted again, and the
/// start after it resolves the rest.) A start while it is read-only fails at once.
#[test]
fn a_read_only_filesystem_under_a_stream_of_sends() {
    let root = tempfile::tempdir().unwrap();
    let mount = Mount::ext4(root.path(), 320);
    let log = root.path().join("stderr-1.log");
    let cfg = root.path().join("starling.toml");
    std::fs::write(
        &cfg,
        "[accounts]\nlast_seen_flush_ms = 60000\n[storage]\nrecovery_retry_ms = 200\n",
    )
    .unwrap();
    let args = ["--shards", "1", "--config", cfg.to_str().unwrap()];
    let (srv, _) = launch_logging_to(root, &args, false, Some(&log));
    let mut a = srv.hello("");
    let ga = register(&srv, &mut a, email("ana@example.org"), "ana@example.org");
    let mut b = srv.hello("");
    let gb = register(&srv, &mut b, email("ben@example.org"), "ben@example.org");
    drop(b);
    let mut a = hello_large(&srv, &ga.access_token);
    let body_bytes = 2 << 10;
    let mut srv = srv;
    let mut forced = false;
    let end = stream_until_refused(&mut a, 0, gb.user_id, body_bytes, 16, 8, |acked, _| {
        if acked >= 200 && !forced {
            forced = true;
            mount.force_read_only();
        }
    });
    println!(
        "{} acked, {} outcome unknown, {} not stored",
        end.count(|o| matches!(o, Outcome::Acked(_))),
        end.count(|o| *o == Outcome::Unknown),
        end.count(|o| *o == Outcome::NotStored),
    );
    check_shard_failed_reported(&mut srv);
    let last_acked = end
        .outcomes
        .values()
        .filter_map(|o| match o {
            Outcome::Acked(seq) => Some(*seq),
            _ => None,
        })
        .max()
        .unwrap();
    check_reads(&mut a, &end, last_acked.saturating_sub(20));
    // Several recovery attempts later: still up, still refusing, still reading.
    std::thread::sleep(Duration::from_millis(1_000));
    check_shard_failed_reported(&mut srv);
    check_reads(&mut a, &end, last_acked.saturating_sub(20));
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert!(
        stderr.contains("cannot be reopened yet") && stderr.contains("Read-only file system"),
        "the failed attempts are logged:\n{stderr}"
    );
    drop(a);
    assert!(
        srv.sigterm().success(),
        "a failed shard drains and stops like the others"
    );

    // Still read-only: the start fails at once, naming the reason.
    let Server { dir, .. } = srv;
    let out = serve_expecting_exit(&dir.path().join("data"), &["--shards", "1"]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("storage fault at start-up"), "{out:?}");
    assert!(out.stderr.contains("Read-only file system"), "{out:?}");

    mount.remount_ext4();
    let (srv, _) = launch(dir, &["--shards", "1"], false);
    check_and_resolve(&srv, &ga.access_token, gb.user_id, body_bytes, &end, false);
    drop(srv);
    drop(mount);
}

/// A fault met by a metadata store rather than the log (the first message of a conversation
/// writes its membership to `meta.redb`; a one-time code is stored there too): the
/// request is answered `STORAGE_FAILURE`, and the server stops with status 74 naming the
/// store, as for the log — instead of failing every later metadata write until a manual
/// restart. (Read-only, so that the store's write fails whatever room its file has.)
#[test]
fn a_metadata_store_fault_stops_the_server_too() {
    let root = tempfile::tempdir().unwrap();
    let mount = Mount::ext4(root.path(), 320);
    let log = root.path().join("stderr-1.log");
    let cfg = no_last_seen_writes(root.path());
    let args = ["--shards", "1", "--config", cfg.to_str().unwrap()];
    let (srv, _) = launch_logging_to(root, &args, false, Some(&log));
    let mut a = srv.hello("");
    let ga = register(&srv, &mut a, email("ana@example.org"), "ana@example.org");
    let mut b = srv.hello("");
    let gb = register(&srv, &mut b, email("ben@example.org"), "ben@example.org");
    let mut a = srv.hello(&ga.access_token);
    let watcher = watch_health(srv.metrics_addr);
    mount.force_read_only();
    let e = call(&mut a, fat_send(0, gb.user_id, 16, true));
    let Body::Error(e) = e else {
        panic!("the first message of a conversation on a read-only disk: {e:?}")
    };
    assert_eq!(e.code, ErrorCode::StorageFailure as i32, "{e:?}");
    let seen = watcher.join().unwrap().expect("a 503 before the exit");
    assert!(
        seen.healthz.1.starts_with("storage fault: meta.redb: "),
        "{seen:?}"
    );
    assert_eq!(seen.readyz.0, 503, "{seen:?}");
    assert!(
        seen.readyz.1.starts_with("storage fault: meta.redb: "),
        "{seen:?}"
    );
    assert!(seen.metrics.contains("starling_ready 0\n"), "{seen:?}");
    assert!(
        seen.metrics
            .contains("starling_storage_failed{shard=\"0\"} 0\n"),
        "{seen:?}"
    );
    let mut srv = srv;
    let st = wait_exit(&mut srv);
    assert_eq!(st.code(), Some(EXIT_STORAGE_FAULT), "{st:?}");
    let line = last_line(&log);
    assert!(
        line.starts_with("starling: storage fault: meta.redb: "),
        "{line}"
    );
    assert!(line.contains("Read-only file system"), "{line}");

    // Writable again: the message was not stored; its retry is. Then a one-time code cannot
    // be stored.
    mount.remount_ext4();
    let Server { dir, .. } = srv;
    let log = dir.path().join("stderr-2.log");
    let args = ["--shards", "1", "--config", cfg.to_str().unwrap()];
    let (srv, _) = launch_logging_to(dir, &args, false, Some(&log));
    let mut a = srv.hello(&ga.access_token);
    let Body::SendAck(ack) = call(&mut a, fat_send(0, gb.user_id, 16, false)) else {
        panic!("the retry after the restart")
    };
    assert_eq!((ack.seq, ack.duplicate), (1, false));
    let mut c = srv.hello("");
    mount.force_read_only();
    let e = c.request(Body::RequestOtp(v1::RequestOtp {
        identifier: email("cy@example.org"),
    }));
    assert_eq!(super::err_code(&e), ErrorCode::StorageFailure, "{e:?}");
    let mut srv = srv;
    let st = wait_exit(&mut srv);
    assert_eq!(st.code(), Some(EXIT_STORAGE_FAULT), "{st:?}");
    let line = last_line(&log);
    assert!(
        line.starts_with("starling: storage fault: meta.redb: "),
        "{line}"
    );
    drop(srv);
    drop(mount);
}
