//! `starling-bench` subcommands end to end against the real `starling` binary (built on demand
//! from this workspace), at a tiny size: they must run, stop by themselves and report what the
//! server did. Figures are benchmarks' business (BENCHMARKS.md), not these tests'.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

#[path = "../../testsupport/server_binary.rs"]
mod server_binary;

/// `target/<profile>/starling`, built if needed.
fn server_binary() -> PathBuf {
    server_binary::server_binary_beside(Path::new(env!("CARGO_BIN_EXE_starling-bench")))
}

/// A `starling serve --shards 1` on a fresh data directory, killed on drop.
struct Server {
    child: Child,
    data: PathBuf,
    target: String,
}

impl Server {
    fn start(bin: &Path, data: &Path) -> Server {
        let err_path = data.with_extension("stderr");
        let err_file = std::fs::File::create(&err_path).unwrap();
        let mut child = Command::new(bin)
            .args(["serve", "--shards", "1", "--metrics-listen", "off"])
            .arg("--data-dir")
            .arg(data)
            .args(["--listen", "127.0.0.1:0"])
            .env("STARLING_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(err_file)
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
            let Ok(line) = rx.recv_timeout(Duration::from_secs(30)) else {
                let _ = child.kill();
                let _ = child.wait();
                let err = std::fs::read_to_string(&err_path).unwrap_or_default();
                panic!("server did not become ready; its stderr:\n{err}");
            };
            if let Some(a) = line.strip_prefix("listening (TLS 1.3): ") {
                addr = Some(a.trim().to_owned());
            } else if line == "ready" {
                break;
            }
        }
        Server {
            child,
            data: data.to_owned(),
            target: format!("tls://{}", addr.unwrap()),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `starling-bench ARGS`; panics with its output if it fails.
fn bench(args: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_starling-bench"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "starling-bench {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn fanout_runs_end_to_end_with_a_group_of_three() {
    let bin = server_binary();
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&bin, &tmp.path().join("data"));
    let data = server.data.to_str().unwrap();
    let accounts = tmp.path().join("accounts.json");
    let accounts = accounts.to_str().unwrap();
    // No accounts yet: fanout registers the 3 it needs through the server's OTP flow.
    let report = tmp.path().join("fanout.json");
    let pid = server.child.id().to_string();
    bench(&[
        "fanout",
        "--target",
        &server.target,
        "--data-dir",
        data,
        "--accounts",
        accounts,
        "--group-size",
        "3",
        "--groups",
        "1",
        "--rate",
        "10",
        "--duration-secs",
        "1",
        "--warmup-secs",
        "0",
        "--drain-secs",
        "5",
        "--server-pid",
        &pid,
        "--json",
        report.to_str().unwrap(),
    ]);
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(r["subcommand"], "fanout");
    let outcomes = r["outcomes"].as_array().unwrap();
    assert_eq!(outcomes.len(), 1, "no --peer: Starling only");
    let o = &outcomes[0];
    assert_eq!(o["system"], "starling");
    let c = &o["counts"];
    // One group created with its 3 members online; 10 messages sent and acknowledged, each
    // delivered once to each of the 2 receivers.
    assert_eq!(c["connected"], 3, "{o}");
    assert_eq!(c["groups_created"], 1, "{o}");
    assert_eq!(c["sent"], 10, "{o}");
    assert_eq!(c["acked"], 10, "{o}");
    assert_eq!(c["delivered"], 20, "{o}");
    assert_eq!(c["duplicates"], 0, "{o}");
    assert_eq!(c["errors"], 0, "{o}");
    assert_eq!(o["missing"], 0, "{o}");
    assert_eq!(o["incomplete_messages"], 0, "{o}");
    assert_eq!(o["deliver_us"]["count"], 20, "{o}");
    assert_eq!(o["last_member_us"]["count"], 10, "{o}");
    let saved: Value = serde_json::from_str(&std::fs::read_to_string(accounts).unwrap()).unwrap();
    assert_eq!(saved["accounts"].as_array().unwrap().len(), 3);
    assert!(o["deliveries_per_s"].as_f64().unwrap() > 0.0, "{o}");
    assert!(o["server_cpu_cores"].as_f64().is_some(), "{o}");
}

/// A loopback port free a moment ago.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn store_scale_fills_restarts_and_checks_what_was_acknowledged() {
    let bin = server_binary();
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("starling.toml");
    std::fs::write(
        &config,
        "[accounts]\notp_requests_per_ip_per_hour = 100000\naccess_token_ttl_ms = 86400000\n\
         [limits]\ninflight_requests_max = 64\n",
    )
    .unwrap();
    let report = tmp.path().join("store-scale.json");
    let addr = |p: u16| format!("127.0.0.1:{p}");
    // The tool starts, kills and restarts the server itself.
    bench(&[
        "store-scale",
        "--starling",
        bin.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
        "--data-dir",
        tmp.path().join("data").to_str().unwrap(),
        "--accounts",
        tmp.path().join("accounts.json").to_str().unwrap(),
        "--tls-listen",
        &addr(free_port()),
        "--plain-listen",
        &addr(free_port()),
        "--metrics-listen",
        &addr(free_port()),
        "--shards",
        "2",
        "--messages",
        "3000",
        "--conversations",
        "300",
        "--senders",
        "10",
        "--ops",
        "20",
        "--verify",
        "40",
        "--sample-secs",
        "1",
        "--ready-timeout-secs",
        "60",
        "--json",
        report.to_str().unwrap(),
    ]);
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(r["subcommand"], "store-scale");
    let o = &r["outcome"];
    assert_eq!(o["accounts"], 10 + 30, "{o}");
    assert_eq!(o["fill"]["messages_acked"], 3000, "{o}");
    assert_eq!(o["fill"]["errors"], 0, "{o}");
    for kind in ["cold", "hot"] {
        for op in ["sync_us", "history_us", "send_us"] {
            assert_eq!(o[kind][op]["count"], 20, "{kind} {op}: {o}");
        }
        assert_eq!(o[kind]["wrong"], 0, "{o}");
    }
    for restart in ["sigkill", "sigterm"] {
        let v = &o[restart]["verified"];
        assert_eq!(v["conversations"], 40, "{restart}: {o}");
        assert_eq!(v["wrong"], 0, "{restart}: {o}");
        assert!(o[restart]["ready_secs"].as_f64().unwrap() > 0.0, "{o}");
    }
    assert!(o["sigterm"]["stop_secs"].as_f64().is_some(), "{o}");
    assert!(o["peak_rss_all_kib"].as_u64().unwrap() > 0, "{o}");
    assert!(o["disk_after_fill_bytes"].as_u64().unwrap() > 0, "{o}");
}
