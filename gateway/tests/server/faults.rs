//! Data-directory safety and storage faults through the real binary: the
//! TLS material's set is refused when half-written.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use super::{Server, now};

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
