//! The SDK's outbox across a storage fault of the real `starling` binary: the server's
//! filesystem goes read-only under a stream of sends, the server answers `STORAGE_FAILURE`
//! (outcome unknown, or stored nothing) and either waits, serving reads, to reopen its log in
//! place once the filesystem is writable again, or — if a metadata write failed too — says
//! `Goodbye{STORAGE_FAILURE}` and exits with status 74. The test then restarts it on the
//! remounted filesystem, as a supervisor or an operator would; the SDK resends every
//! unacknowledged message with its `client_msg_id` and `first_attempt = false`, and every
//! message ends up stored exactly once.
//!
//! Needs root (a loop device with ext4, mounted `errors=remount-ro`, made read-only through
//! ext4's `trigger_fs_error`, as an I/O error of a real disk would).

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use starling_client::{
    Client, ClientConfig, ConnectOptions, Event, HistoryAnchor, Identifier, Profile, Target,
    TlsTrust, Transport, v1,
};

#[path = "../../testsupport/server_binary.rs"]
mod server_binary;

/// `target/<profile>/starling`, built if needed.
fn server_binary() -> PathBuf {
    server_binary::server_binary_beside(Path::new(env!("CARGO_BIN_EXE_starling-cli")))
}

/// Runs a system tool, failing the test with its output if it fails.
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

/// ext4 on a loop device at `point`, unmounted when dropped (also on panic).
struct Ext4 {
    image: tempfile::TempDir,
    point: PathBuf,
}

impl Ext4 {
    fn new(point: &Path) -> Ext4 {
        let image = tempfile::tempdir().unwrap();
        let file = image.path().join("fs.img");
        std::fs::File::create(&file)
            .unwrap()
            .set_len(320 << 20)
            .unwrap();
        run("mkfs.ext4", &["-q", "-F", file.to_str().unwrap()]);
        std::fs::create_dir_all(point).unwrap();
        let fs = Ext4 {
            image,
            point: point.to_owned(),
        };
        fs.mount();
        fs
    }

    fn mount(&self) {
        let img = self.image.path().join("fs.img");
        run(
            "mount",
            &[
                "-o",
                "loop,errors=remount-ro",
                img.to_str().unwrap(),
                self.point.to_str().unwrap(),
            ],
        );
    }

    fn unmount(&self) {
        for _ in 0..50 {
            if Command::new("umount")
                .arg(&self.point)
                .status()
                .is_ok_and(|s| s.success())
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = Command::new("umount").arg("-l").arg(&self.point).status();
    }

    /// The kernel makes the filesystem read-only (an `ext4_error` with errors=remount-ro).
    fn force_read_only(&self) {
        let out = Command::new("findmnt")
            .args(["-n", "-o", "SOURCE", self.point.to_str().unwrap()])
            .output()
            .unwrap();
        let dev = String::from_utf8(out.stdout).unwrap();
        let dev = dev.trim().trim_start_matches("/dev/");
        std::fs::write(format!("/sys/fs/ext4/{dev}/trigger_fs_error"), b"1").unwrap();
    }
}

impl Drop for Ext4 {
    fn drop(&mut self) {
        self.unmount();
    }
}

struct Server {
    /// Taken when the test waits for the server to exit on its own.
    child: Option<Child>,
    addr: SocketAddr,
}

impl Server {
    fn start(bin: &Path, data: &Path, listen: &str) -> Server {
        let mut child = Command::new(bin)
            .args(["serve", "--shards", "1", "--metrics-listen", "off"])
            .arg("--data-dir")
            .arg(data)
            .args(["--listen", listen])
            .env("STARLING_LOG", "error")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let mut addr = None;
        loop {
            let line = rx
                .recv_timeout(Duration::from_secs(30))
                .expect("server did not become ready");
            if let Some(a) = line.strip_prefix("listening (TLS 1.3): ") {
                addr = Some(a.parse().unwrap());
            } else if line == "ready" {
                break;
            }
        }
        Server {
            child: Some(child),
            addr: addr.unwrap(),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn otp(data: &Path, identifier: &str) -> String {
    let log = std::fs::read_to_string(data.join("otp.log")).unwrap();
    log.lines()
        .rev()
        .filter_map(|l| l.split_once(' '))
        .find(|(id, _)| *id == identifier)
        .map(|(_, code)| code.trim().to_owned())
        .expect("no code in otp.log")
}

async fn register(
    connect: &ConnectOptions,
    data: &Path,
    profile: &Profile,
    phone: &str,
) -> v1::SessionGranted {
    let id = Identifier::Phone(phone.to_owned());
    Client::request_otp(connect, &id).await.unwrap();
    let device = v1::DeviceInfo {
        name: "test".into(),
        platform: "linux".into(),
    };
    Client::verify_otp(connect, profile, &id, &otp(data, phone), "T", device)
        .await
        .unwrap()
}

/// Waits up to 3 s for the server to exit on its own after a storage fault: its exit status,
/// or `None` if it stays up (its log waits to be reopened in place), killed then.
async fn exit_status(mut child: Child) -> Option<std::process::ExitStatus> {
    for _ in 0..150 {
        if let Some(st) = child.try_wait().unwrap() {
            return Some(st);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

#[tokio::test]
async fn the_outbox_resolves_every_send_across_a_storage_fault() {
    const MESSAGES: usize = 400;
    let bin = server_binary();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let fs = Ext4::new(&data);
    let server = Server::start(&bin, &data, "127.0.0.1:0");
    let addr = server.addr;
    let mut connect = ConnectOptions::new(
        addr.to_string(),
        Transport::Tls(TlsTrust::CaFile(data.join("tls/ca.pem"))),
    );
    connect.request_timeout = Duration::from_secs(5);
    let ana = Profile::open(tmp.path().join("ana")).unwrap();
    let ben = Profile::open(tmp.path().join("ben")).unwrap();
    register(&connect, &data, &ana, "+15550100031").await;
    let b = register(&connect, &data, &ben, "+15550100032").await;

    let mut cfg = ClientConfig::new(connect, ana.dir());
    cfg.receive_messages = false;
    cfg.backoff.base = Duration::from_millis(50);
    cfg.backoff.cap = Duration::from_millis(500);
    let (client, mut events) = Client::start(cfg).unwrap();
    // Every send is queued at once: many are in flight when the filesystem fails.
    let mut sends = Vec::new();
    for i in 0..MESSAGES {
        let c = client.clone();
        sends.push(tokio::spawn(async move {
            let _ = c
                .send(
                    Target::User(b.user_id),
                    "text/plain",
                    format!("m{i:05}").into_bytes(),
                )
                .await;
        }));
    }

    // The fault: after the first acknowledgements, the filesystem goes read-only; the server
    // exits with 74 or stays up refusing writes (and is stopped). It comes back (filesystem
    // mounted again) on the same address.
    let mut sent: BTreeMap<Vec<u8>, v1::SendAck> = BTreeMap::new();
    let mut server = Some(server);
    let mut faulted = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while sent.len() < MESSAGES {
        let event = tokio::time::timeout_at(deadline, events.next())
            .await
            .unwrap_or_else(|_| panic!("only {} of {MESSAGES} sends resolved", sent.len()))
            .expect("client stopped");
        match event {
            Event::Sent(ack) => {
                let again = sent.insert(ack.client_msg_id.to_vec(), ack);
                assert!(again.is_none(), "a message reported sent twice");
                if sent.len() == 40 && !faulted {
                    faulted = true;
                    fs.force_read_only();
                    let child = server.as_mut().and_then(|s| s.child.take()).unwrap();
                    if let Some(st) = exit_status(child).await {
                        assert_eq!(st.code(), Some(74), "{st:?}");
                    }
                    fs.unmount();
                    fs.mount();
                    server = Some(Server::start(&bin, &data, &addr.to_string()));
                }
            }
            Event::SendFailed { error, .. } => panic!("a send refused for good: {error}"),
            _ => {}
        }
    }
    assert!(faulted);
    for s in sends {
        s.await.unwrap();
    }
    assert!(client.profile().outbox().unwrap().entries().is_empty());

    // Every message once, seqs 1..=MESSAGES.
    let conv = sent.values().next().unwrap().conversation_id;
    let mut seen = Vec::new();
    let mut after = 0;
    loop {
        let page = client
            .history(conv, HistoryAnchor::After(after), 200)
            .await
            .unwrap();
        let Some(last) = page.messages.last() else {
            break;
        };
        after = last.seq;
        seen.extend(page.messages);
    }
    let seqs: Vec<u64> = seen.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, (1..=MESSAGES as u64).collect::<Vec<_>>());
    let mut bodies: Vec<Vec<u8>> = seen.iter().map(|m| m.body.to_vec()).collect();
    bodies.sort();
    bodies.dedup();
    assert_eq!(bodies.len(), MESSAGES, "every message exactly once");
    for m in &seen {
        assert_eq!(sent[&m.client_msg_id.to_vec()].seq, m.seq);
    }
    client.shutdown().await;
    drop(server);
    drop(fs);
}
