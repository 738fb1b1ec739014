//! A device's last seen follows its connections (sign-in, authentication, disconnection), is
//! shown by ListDevices at once, and is written — coalesced, every `last_seen_flush_ms` — so
//! that it survives a SIGKILL.

use super::messaging::call;
use super::*;

fn last_seen(c: &mut Client, device_id: u32) -> u64 {
    match call(c, Body::ListDevices(v1::ListDevices {})) {
        Body::DeviceList(l) => {
            l.devices
                .iter()
                .find(|d| d.device_id == device_id)
                .unwrap_or_else(|| panic!("device {device_id} not in {l:?}"))
                .last_seen_ms
        }
        other => panic!("{other:?}"),
    }
}

/// Signs in a new device of `ident` with a one-time code.
fn sign_in(srv: &Server, ident: Option<v1::Identifier>, key: &str) -> v1::SessionGranted {
    let mut c = srv.hello("");
    let sent = c.request(Body::RequestOtp(v1::RequestOtp {
        identifier: ident.clone(),
    }));
    assert!(matches!(sent, Body::OtpSent(_)), "{sent:?}");
    match c.request(Body::Login(v1::Login {
        identifier: ident,
        credential: Some(v1::login::Credential::OtpCode(srv.code_for(key))),
        device: None,
    })) {
        Body::SessionGranted(g) => g,
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_devices_last_seen_follows_its_connections_and_survives_a_crash() {
    let srv = Server::start(
        "auto",
        "[accounts]\notp_resend_ms = 0\nlast_seen_flush_ms = 50\n",
    );
    let mut a = srv.hello("");
    let g1 = register(&srv, &mut a, email("ana@example.org"), "ana@example.org");
    drop(a);
    let g2 = sign_in(&srv, email("ana@example.org"), "ana@example.org");
    assert_ne!(g1.device_id, g2.device_id);
    let mut watcher = srv.hello(&g2.access_token);
    let signed_in = last_seen(&mut watcher, g1.device_id);
    assert!(signed_in > 0 && signed_in <= unix_ms());

    // Authenticating again moves it.
    std::thread::sleep(Duration::from_millis(20));
    let before = unix_ms();
    let mut d1 = srv.hello(&g1.access_token);
    // Written within `last_seen_flush_ms` of the authentication (later on a loaded machine).
    let deadline = now() + Duration::from_secs(10);
    loop {
        let t = last_seen(&mut watcher, g1.device_id);
        if t >= before {
            break;
        }
        assert!(
            now() < deadline,
            "the authentication was not noted: {t} < {before}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // So does the connection's end.
    std::thread::sleep(Duration::from_millis(20));
    let before = unix_ms();
    match call(&mut d1, Body::Ping(v1::Ping { nonce: 1 })) {
        Body::Pong(_) => {}
        other => panic!("{other:?}"),
    }
    drop(d1);
    let deadline = now() + Duration::from_secs(10);
    let closed = loop {
        let t = last_seen(&mut watcher, g1.device_id);
        if t >= before {
            break t;
        }
        assert!(now() < deadline, "the disconnection was not noted");
        std::thread::sleep(Duration::from_millis(20));
    };

    // Written within the flush interval: a SIGKILL keeps it.
    std::thread::sleep(Duration::from_millis(500));
    drop(watcher);
    let srv = srv.kill9_and_restart("auto");
    let mut watcher = srv.hello(&g2.access_token);
    assert_eq!(last_seen(&mut watcher, g1.device_id), closed);
}
