//! Abuse of the account front door, through the real binary: password-login
//! floods, forged identifiers, rate limits across restarts, and the
//! one-time code's attempt count as the protocol documents it.

use super::*;

fn password_login(ident: Option<v1::Identifier>, password: &str) -> Body {
    Body::Login(v1::Login {
        identifier: ident,
        credential: Some(v1::login::Credential::Password(password.into())),
        device: None,
    })
}

fn error_of(b: &Body) -> &v1::Error {
    match b {
        Body::Error(e) => e,
        other => panic!("expected Error, got {other:?}"),
    }
}

/// What a flooding connection was answered.
#[derive(Debug, Default)]
struct FloodTally {
    invalid_credentials: u64,
    rate_limited: u64,
    /// Distinct refusal messages, each with the largest retry_after_ms seen.
    reasons: std::collections::BTreeMap<String, u32>,
    /// Refusals that did not say when to retry.
    without_retry: u64,
    other: Vec<String>,
}

/// 32 unauthenticated connections from 16 addresses send password logins
/// for unknown e-mail addresses (4 pipelined per connection) as fast as
/// they are answered. Once over the limits they are refused with
/// RATE_LIMITED and a retry_after_ms, without a hash; meanwhile a logged-in
/// user's Sends are acknowledged and new connections are welcomed; after
/// the flood a real password login works.
#[test]
fn a_password_login_flood_is_refused_while_everyone_else_is_served() {
    let srv = Server::start("auto", "");
    let (mut a, _ga, mut b, gb) = ana_and_ben(&srv);
    assert!(matches!(
        call(
            &mut b,
            Body::SetPassword(v1::SetPassword {
                new_password: "correct horse battery".into(),
            })
        ),
        Body::Done(_)
    ));

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood_for = Duration::from_secs(4);
    let mut flooders = Vec::new();
    for t in 0..32u8 {
        let (addr, tls, stop) = (srv.tls_addr, srv.tls.clone(), stop.clone());
        flooders.push(std::thread::spawn(move || {
            let source = std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2 + t % 16));
            let tcp = tcp_connect(addr, Some(source), None).unwrap();
            let mut c = Client::over(tcp, &tls);
            assert!(matches!(
                c.request(Body::Hello(v1::Hello {
                    protocol_version: 1,
                    ..Default::default()
                })),
                Body::Welcome(_)
            ));
            let mut tally = FloodTally::default();
            let started = now();
            let mut n = 0u32;
            while now() - started < flood_for && !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let first = c.next_id;
                for _ in 0..4 {
                    let id = c.next_id;
                    c.next_id += 1;
                    n += 1;
                    c.send(
                        id,
                        password_login(email(&format!("flood-{t}-{n}@example.org")), "guess"),
                    );
                }
                for id in first..first + 4 {
                    let f = c.recv().expect("flooding connection closed");
                    assert_eq!(f.request_id, id, "{f:?}");
                    let e = error_of(f.body.as_ref().unwrap()).clone();
                    match ErrorCode::try_from(e.code) {
                        Ok(ErrorCode::InvalidCredentials) => tally.invalid_credentials += 1,
                        Ok(ErrorCode::RateLimited) => {
                            tally.rate_limited += 1;
                            if e.retry_after_ms == 0 {
                                tally.without_retry += 1;
                            }
                            let r = tally.reasons.entry(e.message).or_default();
                            *r = (*r).max(e.retry_after_ms);
                        }
                        _ => tally.other.push(format!("{e:?}")),
                    }
                }
            }
            tally
        }));
    }

    // Meanwhile: Ana's messages to Ben are acknowledged, and new
    // connections are welcomed (behaviour, not latency).
    let started = now();
    let mut sent = 0u8;
    let mut hellos = 0;
    while now() - started < flood_for - Duration::from_millis(500) && sent < 200 {
        match call(&mut a, text(sent + 1, gb.user_id, "still here")) {
            Body::SendAck(_) => sent += 1,
            other => panic!("Send during the flood: {other:?}"),
        }
        if sent.is_multiple_of(5) {
            let mut h = srv.connect();
            let w = h.request(Body::Hello(v1::Hello {
                protocol_version: 1,
                ..Default::default()
            }));
            assert!(
                matches!(w, Body::Welcome(_)),
                "Hello during the flood: {w:?}"
            );
            hellos += 1;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = FloodTally::default();
    for f in flooders {
        let t = f.join().unwrap();
        total.invalid_credentials += t.invalid_credentials;
        total.rate_limited += t.rate_limited;
        total.without_retry += t.without_retry;
        total.other.extend(t.other);
        for (m, r) in t.reasons {
            let e = total.reasons.entry(m).or_default();
            *e = (*e).max(r);
        }
    }
    eprintln!("flood: {total:?}; meanwhile {sent} sends acknowledged, {hellos} hellos welcomed");
    assert!(sent >= 10 && hellos >= 2, "sent {sent}, hellos {hellos}");
    assert!(total.other.is_empty(), "{:?}", total.other);
    // Some were checked (and failed), far more were refused, every refusal
    // said when to retry, and each named its limit.
    assert!(total.invalid_credentials > 0, "{total:?}");
    assert!(total.rate_limited > total.invalid_credentials, "{total:?}");
    assert_eq!(total.without_retry, 0, "{total:?}");
    assert!(
        total.reasons.keys().all(|m| m.contains("password")),
        "{total:?}"
    );
    // The flood spent the global and per-address budgets, not Ben's: his
    // password login works once the server is ready for it again.
    let mut c = srv.hello("");
    let deadline = now() + Duration::from_secs(20);
    loop {
        match c.request(password_login(
            email("ben@example.org"),
            "correct horse battery",
        )) {
            Body::SessionGranted(g) => {
                assert_eq!(g.user_id, gb.user_id);
                break;
            }
            Body::Error(e) if e.code == ErrorCode::RateLimited as i32 => {
                assert!(e.retry_after_ms > 0, "{e:?}");
                assert!(now() < deadline, "still refused: {e:?}");
                std::thread::sleep(Duration::from_millis(u64::from(e.retry_after_ms)));
            }
            other => panic!("{other:?}"),
        }
    }
}

/// An unknown identifier, an account without a password and a wrong
/// password get the same answer, and the same refusal once the
/// identifier's failed-login budget is spent.
#[test]
fn password_logins_do_not_tell_accounts_apart() {
    let srv = Server::start(
        "auto",
        "[accounts]\npassword_failures_per_identifier_per_hour = 2\n",
    );
    let mut a = srv.hello("");
    register(&srv, &mut a, email("ana@example.org"), "ana@example.org");
    let mut b = srv.hello("");
    register(&srv, &mut b, email("ben@example.org"), "ben@example.org");
    assert!(matches!(
        b.request(Body::SetPassword(v1::SetPassword {
            new_password: "correct horse battery".into(),
        })),
        Body::Done(_)
    ));
    let mut c = srv.hello("");
    let mut answers = Vec::new();
    for ident in ["nobody@example.org", "ana@example.org", "ben@example.org"] {
        let mut per_ident = Vec::new();
        for _ in 0..3 {
            let r = c.request(password_login(email(ident), "wrong password"));
            let e = error_of(&r);
            per_ident.push((e.code, e.message.clone(), e.retry_after_ms > 0));
        }
        answers.push(per_ident);
    }
    let invalid = (
        ErrorCode::InvalidCredentials as i32,
        "wrong identifier or password".to_owned(),
        false,
    );
    let refused = (
        ErrorCode::RateLimited as i32,
        "too many failed password logins for this identifier".to_owned(),
        true,
    );
    for per_ident in &answers {
        assert_eq!(
            per_ident,
            &[invalid.clone(), invalid.clone(), refused.clone()]
        );
    }
}

/// The e-mail that once wrote a forged line into otp.log is refused with
/// INVALID_ARGUMENT, and otp.log is untouched; so are other identifiers and
/// texts that break the documented rules. A valid request then appends
/// exactly one `<identifier> <code>` line.
#[test]
fn forged_identifiers_leave_otp_log_untouched() {
    let srv = Server::start("auto", "");
    let mut c = srv.hello("");
    let before = srv.otp_log();
    for ident in [
        email("x\n+1999 000000@rel.test"),
        email("a b@example.org"),
        email("a\r@example.org"),
        email("a@@example.org"),
        email(&format!("{}@example.org", "l".repeat(65))),
        email("a@localhost"),
        phone("+0123456789"),
        phone("+1 415 555 0100"),
        None,
    ] {
        let e = c.request(Body::RequestOtp(v1::RequestOtp {
            identifier: ident.clone(),
        }));
        assert_eq!(err_code(&e), ErrorCode::InvalidArgument, "{ident:?}: {e:?}");
    }
    assert_eq!(srv.otp_log(), before);
    assert!(!srv.otp_log().contains("+1999"));

    let sent = c.request(Body::RequestOtp(v1::RequestOtp {
        identifier: email(" Ana@Example.org "),
    }));
    assert!(matches!(sent, Body::OtpSent(_)), "{sent:?}");
    let log = srv.otp_log();
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len(), 1, "{log:?}");
    let (ident, code) = lines[0].split_once(' ').unwrap();
    assert_eq!(ident, "ana@example.org");
    assert!(
        code.len() == 6 && code.bytes().all(|b| b.is_ascii_digit()),
        "{log:?}"
    );

    // Free text with line breaks or control characters is refused before
    // the code is spent, and the code still works afterwards.
    let verify = |c: &mut Client, name: &str, device: &str| {
        c.request(Body::VerifyOtp(v1::VerifyOtp {
            identifier: email("ana@example.org"),
            code: code.to_owned(),
            device: Some(v1::DeviceInfo {
                name: device.into(),
                platform: "linux".into(),
            }),
            display_name: name.into(),
        }))
    };
    for (name, device) in [("Ana\nroot", "phone"), ("Ana", "phone\u{1b}[2J")] {
        let e = verify(&mut c, name, device);
        assert_eq!(err_code(&e), ErrorCode::InvalidArgument, "{e:?}");
    }
    assert!(matches!(
        verify(&mut c, "Ana", "phone"),
        Body::SessionGranted(_)
    ));
    let e = c.request(Body::UpdateProfile(v1::UpdateProfile {
        display_name: Some("Ana\u{0}".into()),
        ..Default::default()
    }));
    assert_eq!(err_code(&e), ErrorCode::InvalidArgument, "{e:?}");
}

/// A client that spent its address's one-time-code budget is still refused
/// after the server restarts (SIGKILL, same data dir), with a retry_after_ms
/// counting down the same window; the same holds for an identifier's failed
/// password logins and for the guesses left on a pending code.
#[test]
fn rate_limits_survive_a_restart() {
    let srv = Server::start(
        "auto",
        "[accounts]\notp_requests_per_ip_per_hour = 3\n\
         password_failures_per_identifier_per_hour = 3\n",
    );
    let mut c = srv.hello("");
    register(&srv, &mut c, email("ana@example.org"), "ana@example.org");
    assert!(matches!(
        c.request(Body::SetPassword(v1::SetPassword {
            new_password: "correct horse battery".into(),
        })),
        Body::Done(_)
    ));
    // Budget: 3 codes per address per hour; Ana's registration was one.
    let mut c = srv.hello("");
    for ident in ["ben@example.org", "eve@example.org"] {
        let sent = c.request(Body::RequestOtp(v1::RequestOtp {
            identifier: email(ident),
        }));
        assert!(matches!(sent, Body::OtpSent(_)), "{sent:?}");
    }
    let refused = c.request(Body::RequestOtp(v1::RequestOtp {
        identifier: email("zoe@example.org"),
    }));
    let refused_at = now();
    let e = error_of(&refused);
    assert_eq!(
        (ErrorCode::try_from(e.code).unwrap(), e.message.as_str()),
        (
            ErrorCode::RateLimited,
            "too many codes requested from this address"
        )
    );
    let first_retry = u64::from(e.retry_after_ms);
    assert!(first_retry > 3_500_000, "{e:?}");
    // Two wrong passwords for Ana (of 3; a failure count is written from
    // the second on), and one wrong guess at Ben's code (of 5).
    for _ in 0..2 {
        assert_eq!(
            err_code(&c.request(password_login(email("ana@example.org"), "wrong"))),
            ErrorCode::InvalidCredentials
        );
    }
    let ben_code = srv.code_for("ben@example.org");
    let wrong = if ben_code == "000000" {
        "000001"
    } else {
        "000000"
    };
    let guess = |c: &mut Client, code: &str| {
        c.request(Body::VerifyOtp(v1::VerifyOtp {
            identifier: email("ben@example.org"),
            code: code.into(),
            ..Default::default()
        }))
    };
    assert_eq!(err_code(&guess(&mut c, wrong)), ErrorCode::OtpInvalid);

    let srv = srv.kill9_and_restart("auto");
    let mut c = srv.hello("");
    let refused = c.request(Body::RequestOtp(v1::RequestOtp {
        identifier: email("zoe@example.org"),
    }));
    let elapsed = u64::try_from((now() - refused_at).as_millis()).unwrap();
    let e = error_of(&refused);
    assert_eq!(e.code, ErrorCode::RateLimited as i32, "{e:?}");
    // The same window: what was left of it, less the time that passed.
    let retry = u64::from(e.retry_after_ms);
    assert!(
        retry <= first_retry && retry + elapsed + 2000 >= first_retry,
        "retry_after_ms {retry} after {elapsed} ms; it was {first_retry}"
    );
    // Ana's third wrong password spends her budget; the next try is refused.
    assert_eq!(
        err_code(&c.request(password_login(email("ana@example.org"), "wrong"))),
        ErrorCode::InvalidCredentials
    );
    let e = c.request(password_login(
        email("ana@example.org"),
        "correct horse battery",
    ));
    assert_eq!(
        (err_code(&e), error_of(&e).message.as_str()),
        (
            ErrorCode::RateLimited,
            "too many failed password logins for this identifier"
        )
    );
    // Ben's code: 4 guesses were left, so 3 more wrong ones and the 4th is
    // the last.
    for _ in 0..3 {
        assert_eq!(err_code(&guess(&mut c, wrong)), ErrorCode::OtpInvalid);
    }
    assert_eq!(
        err_code(&guess(&mut c, wrong)),
        ErrorCode::OtpAttemptsExceeded
    );
}

/// `OtpSent.attempts_allowed` as documented: that many guesses, the right
/// one included. Each wrong guess before the last is OTP_INVALID; the last
/// wrong one is OTP_ATTEMPTS_EXCEEDED and burns the code, after which even
/// the right code is OTP_ATTEMPTS_EXCEEDED; a new code is had with
/// RequestOtp once resend_after_ms has passed (RATE_LIMITED before).
#[test]
fn otp_attempts_allowed_counts_every_guess() {
    let srv = Server::start(
        "auto",
        "[accounts]\notp_attempts_max = 3\notp_resend_ms = 1500\n",
    );
    let mut c = srv.hello("");
    let request = |c: &mut Client, ident: &str| {
        c.request(Body::RequestOtp(v1::RequestOtp {
            identifier: email(ident),
        }))
    };
    let guess = |c: &mut Client, ident: &str, code: &str| {
        c.request(Body::VerifyOtp(v1::VerifyOtp {
            identifier: email(ident),
            code: code.into(),
            ..Default::default()
        }))
    };
    let wrong_for = |code: &str| if code == "000000" { "000001" } else { "000000" }.to_owned();

    // The last allowed guess may be the right one.
    let Body::OtpSent(sent) = request(&mut c, "ana@example.org") else {
        panic!()
    };
    assert_eq!(sent.attempts_allowed, 3);
    let code = srv.code_for("ana@example.org");
    for _ in 0..2 {
        assert_eq!(
            err_code(&guess(&mut c, "ana@example.org", &wrong_for(&code))),
            ErrorCode::OtpInvalid
        );
    }
    assert!(matches!(
        guess(&mut c, "ana@example.org", &code),
        Body::SessionGranted(_)
    ));

    // The last wrong guess burns the code.
    let mut c = srv.hello("");
    let Body::OtpSent(sent) = request(&mut c, "ben@example.org") else {
        panic!()
    };
    let sent_at = now();
    let code = srv.code_for("ben@example.org");
    let codes: Vec<ErrorCode> = (0..3)
        .map(|_| err_code(&guess(&mut c, "ben@example.org", &wrong_for(&code))))
        .collect();
    assert_eq!(
        codes,
        [
            ErrorCode::OtpInvalid,
            ErrorCode::OtpInvalid,
            ErrorCode::OtpAttemptsExceeded
        ]
    );
    assert_eq!(
        err_code(&guess(&mut c, "ben@example.org", &code)),
        ErrorCode::OtpAttemptsExceeded
    );
    // A new code: refused until resend_after_ms, then sent, and it works.
    let e = request(&mut c, "ben@example.org");
    if now() - sent_at < Duration::from_millis(u64::from(sent.resend_after_ms)) {
        let e = error_of(&e);
        assert_eq!(e.code, ErrorCode::RateLimited as i32, "{e:?}");
        assert!(e.retry_after_ms > 0 && e.retry_after_ms <= sent.resend_after_ms);
        std::thread::sleep(Duration::from_millis(u64::from(e.retry_after_ms)));
        assert!(matches!(
            request(&mut c, "ben@example.org"),
            Body::OtpSent(_)
        ));
    } else {
        assert!(matches!(e, Body::OtpSent(_)), "{e:?}");
    }
    let code = srv.code_for("ben@example.org");
    assert!(matches!(
        guess(&mut c, "ben@example.org", &code),
        Body::SessionGranted(_)
    ));
}
