use std::path::Path;

use super::*;

fn open(dir: &Path) -> EmbeddedMeta {
    EmbeddedMeta::open(&dir.join("meta.redb")).unwrap()
}

fn otp(ident: &str, sent_ms: u64) -> OtpRecord {
    OtpRecord {
        ident: ident.into(),
        code_hmac: [9; 32],
        expires_ms: TimestampMs(sent_ms + 300_000),
        attempts_left: 3,
        created_ms: TimestampMs(sent_ms),
    }
}

fn window(key: &str, start_ms: u64, count: u32) -> RateWindow {
    RateWindow {
        key: key.into(),
        start_ms,
        window_ms: 3_600_000,
        count,
    }
}

fn new_user(name: &str) -> User {
    User {
        display_name: name.into(),
        created_ms: TimestampMs(1),
        account: Some(AccountFields {
            email: format!("{name}@x.org"),
            ..AccountFields::default()
        }),
        ..User::default()
    }
}

fn sign_in(meta: &EmbeddedMeta, user: UserId, refresh: u8, now: u64) -> (DeviceId, u64) {
    meta.sign_in(&SignIn {
        user,
        device_name: "phone",
        platform: "linux",
        refresh_hash: [refresh; 32],
        refresh_expires: TimestampMs(now + 1000),
        now: TimestampMs(now),
    })
    .unwrap()
}

#[test]
fn a_code_and_its_rate_limit_windows_are_written_together_and_durably() {
    let dir = tempfile::tempdir().unwrap();
    let meta = open(dir.path());
    let rows = || {
        (
            vec![
                window("otp-ip:10.0.0.1", 1000, 1),
                window("otp-ident:email:a@x.org", 1000, 1),
            ],
            Vec::new(),
        )
    };
    let a = "email:a@x.org";
    assert_eq!(
        meta.otp_issue(&otp(a, 1000), 30_000, 1000, &rows).unwrap(),
        OtpIssue::Issued
    );
    // Within the resend interval: refused, and the windows are not asked for.
    let never = || -> WindowWrites { panic!("windows written for a refused code") };
    assert_eq!(
        meta.otp_issue(&otp(a, 21_000), 30_000, 21_000, &never)
            .unwrap(),
        OtpIssue::TooSoon(10_000)
    );
    let more = || {
        (
            vec![window("otp-ip:10.0.0.1", 1000, 2)],
            vec!["otp-ident:email:a@x.org".to_owned()],
        )
    };
    assert_eq!(
        meta.otp_issue(&otp(a, 31_000), 30_000, 31_000, &more)
            .unwrap(),
        OtpIssue::Issued
    );
    drop(meta);
    let meta = open(dir.path());
    assert_eq!(
        meta.windows_load().unwrap(),
        vec![window("otp-ip:10.0.0.1", 1000, 2)]
    );
    meta.windows_write(
        &[window("password-failures:email:a@x.org", 5, 3)],
        &["otp-ip:10.0.0.1".to_owned()],
    )
    .unwrap();
    assert_eq!(
        meta.windows_load().unwrap(),
        vec![window("password-failures:email:a@x.org", 5, 3)]
    );
    assert_eq!(
        meta.get::<OtpRecord>(a.as_bytes()).unwrap(),
        Some(otp(a, 31_000))
    );
}

#[test]
fn a_code_is_consumed_once_and_wrong_guesses_spend_its_attempts() {
    let dir = tempfile::tempdir().unwrap();
    let meta = open(dir.path());
    let none = || (Vec::new(), Vec::new());
    let a = "email:a@x.org";
    assert_eq!(
        meta.otp_consume(a, 1, &|_| true).unwrap(),
        OtpOutcome::Expired,
        "no code"
    );
    meta.otp_issue(&otp(a, 0), 0, 0, &none).unwrap();
    assert_eq!(
        meta.otp_consume(a, 1, &|_| false).unwrap(),
        OtpOutcome::Wrong(2)
    );
    assert_eq!(
        meta.otp_consume(a, 1, &|r| r.code_hmac == [9; 32]).unwrap(),
        OtpOutcome::Accepted
    );
    assert_eq!(
        meta.otp_consume(a, 1, &|_| true).unwrap(),
        OtpOutcome::Expired,
        "consumed"
    );
    meta.otp_issue(&otp(a, 10), 0, 10, &none).unwrap();
    for left in [2, 1, 0] {
        assert_eq!(
            meta.otp_consume(a, 11, &|_| false).unwrap(),
            OtpOutcome::Wrong(left)
        );
    }
    assert_eq!(
        meta.otp_consume(a, 11, &|_| true).unwrap(),
        OtpOutcome::Exhausted,
        "even the right code, once the attempts are spent"
    );
    // An expired code is deleted when met.
    assert_eq!(
        meta.otp_consume(a, 10 + 300_000, &|_| true).unwrap(),
        OtpOutcome::Expired
    );
    assert_eq!(meta.get::<OtpRecord>(a.as_bytes()).unwrap(), None);
}

#[test]
fn a_user_is_created_once_per_identifier_and_is_the_record_the_router_reads() {
    let dir = tempfile::tempdir().unwrap();
    let meta = open(dir.path());
    let key = [7; 32];
    let (ana, created) = meta
        .user_create("email:ana@x.org", &new_user("ana"), Some(&key))
        .unwrap();
    assert!(created);
    let (again, created) = meta
        .user_create("email:ana@x.org", &new_user("other"), None)
        .unwrap();
    assert_eq!((again, created), (ana, false));
    let (ben, _) = meta
        .user_create("email:ben@x.org", &new_user("ben"), None)
        .unwrap();
    assert_eq!((ana, ben), (UserId(1), UserId(2)));
    assert_eq!(meta.user_by_ident("email:ben@x.org").unwrap(), Some(ben));
    assert_eq!(meta.user_by_ident("email:cy@x.org").unwrap(), None);
    assert_eq!(meta.user_by_phone_key(&key).unwrap(), Some(ana));
    assert_eq!(meta.user_by_phone_key(&[8; 32]).unwrap(), None);

    // A rename is the record the router reads for titles: no copy.
    let renamed = meta
        .user_update(ana, &|u| u.display_name = "Ana B.".into())
        .unwrap()
        .unwrap();
    let seen = meta.get::<User>(&keys::user(ana)).unwrap().unwrap();
    assert_eq!(seen, renamed);
    assert_eq!(seen.display_name, "Ana B.");
    assert_eq!(seen.account.unwrap().email, "ana@x.org");
    assert_eq!(meta.user_update(UserId(77), &|_| {}).unwrap(), None);
}

#[test]
fn sign_ins_number_devices_and_profile_changes_between_them_keep_the_numbering() {
    let dir = tempfile::tempdir().unwrap();
    let meta = open(dir.path());
    let (ana, _) = meta
        .user_create("email:ana@x.org", &new_user("ana"), None)
        .unwrap();
    let (d1, s1) = sign_in(&meta, ana, 1, 100);
    meta.user_update(ana, &|u| u.password_hash = Some("phc".into()))
        .unwrap();
    let (d2, s2) = sign_in(&meta, ana, 2, 200);
    let u = meta.user_get(ana).unwrap().unwrap();
    assert_eq!(u.password_hash.as_deref(), Some("phc"));
    assert_eq!(u.account.unwrap().next_device_id, 3);
    assert_eq!((d1, d2), (DeviceId(1), DeviceId(2)));
    assert_eq!((s1, s2), (1, 2));
    let devices = meta.devices(ana).unwrap();
    assert_eq!(
        devices
            .iter()
            .map(|d| (d.device, d.last_seen_ms))
            .collect::<Vec<_>>(),
        vec![(d1, TimestampMs(100)), (d2, TimestampMs(200))]
    );
    let s = meta.session_get(s2).unwrap().unwrap();
    assert_eq!((s.user, s.device, s.revoked), (ana, d2, false));
    assert!(
        meta.sign_in(&SignIn {
            user: UserId(99),
            device_name: "",
            platform: "",
            refresh_hash: [0; 32],
            refresh_expires: TimestampMs(0),
            now: TimestampMs(0),
        })
        .is_err()
    );
}

#[test]
fn refresh_tokens_rotate_and_a_reused_one_revokes_its_session() {
    let dir = tempfile::tempdir().unwrap();
    let meta = open(dir.path());
    let (ana, _) = meta
        .user_create("email:ana@x.org", &new_user("ana"), None)
        .unwrap();
    let (d, s) = sign_in(&meta, ana, 1, 100);
    assert_eq!(
        meta.refresh_rotate(&[5; 32], &[6; 32], TimestampMs(5000), 200)
            .unwrap(),
        RotateOutcome::Unknown
    );
    let RotateOutcome::Rotated(now) = meta
        .refresh_rotate(&[1; 32], &[2; 32], TimestampMs(5000), 200)
        .unwrap()
    else {
        panic!("not rotated")
    };
    assert_eq!((now.id, now.user, now.device), (s, ana, d));
    assert_eq!(now.expires_ms, TimestampMs(5000));
    // The new token expires at 5000.
    assert_eq!(
        meta.refresh_rotate(&[2; 32], &[3; 32], TimestampMs(9000), 5000)
            .unwrap(),
        RotateOutcome::Expired
    );
    // The replaced one again: the session is revoked, for every token.
    assert_eq!(
        meta.refresh_rotate(&[1; 32], &[4; 32], TimestampMs(9000), 300)
            .unwrap(),
        RotateOutcome::Reused(s)
    );
    assert!(meta.session_get(s).unwrap().unwrap().revoked);
    assert_eq!(
        meta.refresh_rotate(&[2; 32], &[4; 32], TimestampMs(9000), 300)
            .unwrap(),
        RotateOutcome::Revoked
    );
    assert!(meta.session_revoke(s).unwrap());
    assert!(!meta.session_revoke(77).unwrap());
}

#[test]
fn removing_a_device_revokes_its_sessions_only_and_last_seen_only_rises() {
    let dir = tempfile::tempdir().unwrap();
    let meta = open(dir.path());
    let (ana, _) = meta
        .user_create("email:ana@x.org", &new_user("ana"), None)
        .unwrap();
    let (d1, s1) = sign_in(&meta, ana, 1, 100);
    let (d2, s2) = sign_in(&meta, ana, 2, 100);
    meta.devices_seen(&[
        (ana, d1, TimestampMs(500)),
        (ana, d2, TimestampMs(50)),
        (UserId(9), DeviceId(1), TimestampMs(500)),
    ])
    .unwrap();
    let seen: Vec<_> = meta
        .devices(ana)
        .unwrap()
        .iter()
        .map(|d| d.last_seen_ms)
        .collect();
    assert_eq!(seen, vec![TimestampMs(500), TimestampMs(100)]);
    assert_eq!(meta.device_remove(ana, d1).unwrap(), Some(vec![s1]));
    assert_eq!(meta.device_remove(ana, d1).unwrap(), None);
    assert!(meta.session_get(s1).unwrap().unwrap().revoked);
    assert!(!meta.session_get(s2).unwrap().unwrap().revoked);
    assert_eq!(meta.devices(ana).unwrap().len(), 1);
    // A removed device's last seen is not written back.
    meta.devices_seen(&[(ana, d1, TimestampMs(900))]).unwrap();
    assert_eq!(meta.devices(ana).unwrap().len(), 1);
}

#[test]
fn changes_of_one_user_from_two_threads_at_once_all_land() {
    let dir = tempfile::tempdir().unwrap();
    let meta = std::sync::Arc::new(open(dir.path()));
    let (ana, _) = meta
        .user_create("email:ana@x.org", &new_user("ana"), None)
        .unwrap();
    let threads: Vec<_> = ["a", "b"]
        .into_iter()
        .map(|mark| {
            let meta = meta.clone();
            std::thread::spawn(move || {
                for _ in 0..20 {
                    meta.user_update(ana, &|u| {
                        u.account
                            .get_or_insert_with(AccountFields::default)
                            .about
                            .push_str(mark);
                    })
                    .unwrap()
                    .unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let about = meta.user_get(ana).unwrap().unwrap().account.unwrap().about;
    assert_eq!(
        (about.matches('a').count(), about.matches('b').count()),
        (20, 20)
    );
}

fn push_token(user: UserId, device: DeviceId, token: &str) -> PushToken {
    PushToken {
        user,
        device,
        provider: "fcm".into(),
        token: token.as_bytes().to_vec(),
        app_id: "org.example.chat".into(),
        sandbox: false,
        updated_ms: TimestampMs(7),
    }
}

#[test]
fn a_push_token_is_one_per_device_durable_and_goes_with_its_device() {
    let dir = tempfile::tempdir().unwrap();
    let meta = open(dir.path());
    let (ana, _) = meta
        .user_create("email:ana@x.org", &new_user("ana"), None)
        .unwrap();
    let (d1, _) = sign_in(&meta, ana, 1, 100);
    let (d2, _) = sign_in(&meta, ana, 2, 100);
    assert!(meta.push_token_set(&push_token(ana, d1, "first")).unwrap());
    assert!(meta.push_token_set(&push_token(ana, d1, "second")).unwrap());
    assert!(meta.push_token_set(&push_token(ana, d2, "other")).unwrap());
    // No device, no token.
    assert!(
        !meta
            .push_token_set(&push_token(ana, DeviceId(99), "x"))
            .unwrap()
    );
    assert_eq!(meta.push_token(ana, DeviceId(99)).unwrap(), None);
    drop(meta);
    let meta = open(dir.path());
    assert_eq!(
        meta.push_token(ana, d1).unwrap(),
        Some(push_token(ana, d1, "second"))
    );
    assert!(meta.push_token_remove(ana, d1).unwrap());
    assert!(!meta.push_token_remove(ana, d1).unwrap());
    assert_eq!(meta.push_token(ana, d1).unwrap(), None);
    // Removing a device removes its token.
    meta.device_remove(ana, d2).unwrap();
    assert_eq!(meta.push_token(ana, d2).unwrap(), None);
    // So does ending the device's session (Logout).
    let (d3, s3) = sign_in(&meta, ana, 3, 100);
    assert!(meta.push_token_set(&push_token(ana, d3, "third")).unwrap());
    assert!(meta.session_revoke(s3).unwrap());
    assert_eq!(meta.push_token(ana, d3).unwrap(), None);
}
