//! Data-directory safety and storage faults through the real binary: the
//! shard count recorded in the data dir, the TLS material's set refused
//! when half-written.

use std::collections::BTreeMap;
use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use starling_protocol::v1::frame::Body;

use super::{KillOnDrop, Server, call, client_tls, email, now, register, text, whole_history};

/// Starts `starling serve` on `<dir>/data` with `args` (after the test
/// defaults: ephemeral ports, auto driver), optionally restricted to one CPU
/// (so "one shard per core" means one). Returns the server and the lines it
/// printed up to `ready`.
fn launch(dir: tempfile::TempDir, args: &[&str], one_cpu: bool) -> (Server, Vec<String>) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_starling"));
    cmd.arg("serve")
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .args(["--driver", "auto"])
        .args(args)
        .env("STARLING_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
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
        ca,
        tls,
    };
    (srv, lines)
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
struct Refused {
    code: Option<i32>,
    stderr: String,
}

/// Runs `starling serve` on `data` with `args` and waits for it to exit
/// (it must, within 30 s: a start that is supposed to be refused).
fn serve_expecting_exit(data: &Path, args: &[&str]) -> Refused {
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
    use starling_router::ids::owner_shard;
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
        let on = |s| convs.iter().filter(|c| owner_shard(c.id, 2) == s).count();
        if convs.len() >= 3 && on(0) > 0 && on(1) > 0 {
            break;
        }
    }
    assert!(convs.iter().any(|c| owner_shard(c.id, 2) == 1));
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
