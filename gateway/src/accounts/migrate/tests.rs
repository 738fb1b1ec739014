use super::old_format::{OldAccounts, write};
use super::*;
use starling_storage::accounts::{AccountStore as _, OtpOutcome, RotateOutcome, SignIn};

fn sha(s: &str) -> [u8; 32] {
    let mut out = [0; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, s.as_bytes()).as_ref());
    out
}

fn old_accounts() -> OldAccounts {
    OldAccounts {
        users: vec![
            (
                "phone:+15550001".into(),
                1,
                OldUser {
                    display_name: "Ana".into(),
                    about: "climbing".into(),
                    phone: Some("+15550001".into()),
                    created_at_ms: 10,
                    next_device_id: 3,
                    ..OldUser::default()
                },
                Some(vec![4; 32]),
            ),
            (
                "email:ben@x.org".into(),
                2,
                OldUser {
                    display_name: "Ben".into(),
                    email: Some("ben@x.org".into()),
                    password_hash: Some("$argon2id$v=19$x".into()),
                    created_at_ms: 20,
                    next_device_id: 2,
                    ..OldUser::default()
                },
                None,
            ),
        ],
        devices: vec![
            (
                1,
                1,
                OldDevice {
                    name: "phone".into(),
                    platform: "android".into(),
                    created_at_ms: 11,
                    last_seen_ms: 12,
                },
            ),
            (1, 2, OldDevice::default()),
            (2, 1, OldDevice::default()),
        ],
        sessions: vec![
            (
                1,
                OldSession {
                    user_id: 1,
                    device_id: 1,
                    created_at_ms: 11,
                    revoked: false,
                    refresh_sha256: hex::encode(sha("ana-2")),
                    refresh_expires_at_ms: u64::MAX,
                },
                vec![hex::encode(sha("ana-1"))],
            ),
            (
                2,
                OldSession {
                    user_id: 1,
                    device_id: 2,
                    created_at_ms: 13,
                    revoked: true,
                    refresh_sha256: hex::encode(sha("ana-x")),
                    refresh_expires_at_ms: u64::MAX,
                },
                Vec::new(),
            ),
            (
                3,
                OldSession {
                    user_id: 2,
                    device_id: 1,
                    created_at_ms: 21,
                    revoked: false,
                    refresh_sha256: hex::encode(sha("ben-1")),
                    refresh_expires_at_ms: u64::MAX,
                },
                Vec::new(),
            ),
        ],
        otps: vec![(
            "email:cy@x.org".into(),
            OldOtp {
                mac: hex::encode([7u8; 32]),
                expires_at_ms: u64::MAX,
                attempts_left: 4,
                sent_at_ms: 30,
            },
        )],
        counters: vec![("user".into(), 3), ("session".into(), 4)],
        windows: vec![("otp-ip:10.0.0.1".into(), (5, 3_600_000, 2))],
    }
}

fn meta_of(dir: &Path) -> EmbeddedMeta {
    EmbeddedMeta::open(&dir.join("meta.redb")).unwrap()
}

#[test]
fn an_old_data_dir_is_moved_whole_and_the_old_file_kept() {
    let dir = tempfile::tempdir().unwrap();
    write(&dir.path().join(OLD_FILE), &old_accounts()).unwrap();
    let meta = meta_of(dir.path());
    // The copy of a user's name an earlier release kept in meta.redb is replaced.
    meta.commit(MetaBatch::default().put(&User {
        id: UserId(1),
        display_name: "Ana (stale copy)".into(),
        ..User::default()
    }))
    .unwrap();
    let line = run(dir.path(), &meta).unwrap().unwrap();
    assert!(
        line.contains("moved 2 users, 3 devices, 3 sessions and 11 other records"),
        "{line}"
    );
    assert!(!dir.path().join(OLD_FILE).exists());
    assert!(dir.path().join(MOVED_FILE).exists());
    assert_eq!(run(dir.path(), &meta).unwrap(), None, "nothing left to do");

    let ana = meta.user_get(UserId(1)).unwrap().unwrap();
    assert_eq!(
        (
            ana.display_name.as_str(),
            ana.phone_e164.as_str(),
            ana.account.clone().unwrap().about.as_str()
        ),
        ("Ana", "+15550001", "climbing")
    );
    let ben = meta.user_get(UserId(2)).unwrap().unwrap();
    assert_eq!(ben.password_hash.as_deref(), Some("$argon2id$v=19$x"));
    assert_eq!(ben.account.unwrap().email, "ben@x.org");
    assert_eq!(
        meta.user_by_ident("email:ben@x.org").unwrap(),
        Some(UserId(2))
    );
    assert_eq!(meta.user_by_phone_key(&[4; 32]).unwrap(), Some(UserId(1)));
    let devices = meta.devices(UserId(1)).unwrap();
    assert_eq!(devices.len(), 2);
    assert_eq!(
        (devices[0].name.as_str(), devices[0].last_seen_ms),
        ("phone", TimestampMs(12))
    );
    // Refresh tokens: the current one rotates, a replaced one is reuse.
    let RotateOutcome::Rotated(s) = meta
        .refresh_rotate(&sha("ana-2"), &sha("ana-3"), TimestampMs(u64::MAX), 100)
        .unwrap()
    else {
        panic!("the current token did not rotate")
    };
    assert_eq!((s.id, s.user, s.device), (1, UserId(1), DeviceId(1)));
    assert_eq!(
        meta.refresh_rotate(&sha("ana-1"), &sha("ana-4"), TimestampMs(u64::MAX), 100)
            .unwrap(),
        RotateOutcome::Reused(1)
    );
    assert!(meta.session_get(2).unwrap().unwrap().revoked);
    // Removing a device revokes its moved sessions.
    assert_eq!(
        meta.device_remove(UserId(2), DeviceId(1)).unwrap(),
        Some(vec![3])
    );
    assert_eq!(
        meta.otp_consume("email:cy@x.org", 100, &|o| o.code_hmac == [7; 32])
            .unwrap(),
        OtpOutcome::Accepted
    );
    assert_eq!(
        meta.windows_load().unwrap(),
        vec![RateWindow {
            key: "otp-ip:10.0.0.1".into(),
            start_ms: 5,
            window_ms: 3_600_000,
            count: 2
        }]
    );
    // The counters go on where the old store left them.
    let (cy, _) = meta
        .user_create("email:cy@x.org", &User::default(), None)
        .unwrap();
    assert_eq!(cy, UserId(3));
    let (d, sid) = meta
        .sign_in(&SignIn {
            user: UserId(1),
            device_name: "",
            platform: "",
            refresh_hash: [9; 32],
            refresh_expires: TimestampMs(u64::MAX),
            now: TimestampMs(1),
        })
        .unwrap();
    assert_eq!((d, sid), (DeviceId(3), 4));
}

#[test]
fn after_a_crash_between_the_commit_and_the_rename_the_next_start_only_renames() {
    let dir = tempfile::tempdir().unwrap();
    let old = dir.path().join(OLD_FILE);
    write(&old, &old_accounts()).unwrap();
    let meta = meta_of(dir.path());
    // The commit of a start that crashed before its rename.
    let (batch, _) = read_old(&old, 1).unwrap();
    meta.commit(&batch).unwrap();
    // Served after the crash's restart would not be: but were anything changed since, the
    // rename must not undo it.
    meta.user_update(UserId(1), &|u| u.display_name = "Ana B.".into())
        .unwrap();
    let line = run(dir.path(), &meta).unwrap().unwrap();
    assert!(line.contains("was already moved"), "{line}");
    assert!(!old.exists() && dir.path().join(MOVED_FILE).exists());
    assert_eq!(
        meta.user_get(UserId(1)).unwrap().unwrap().display_name,
        "Ana B."
    );
}

#[test]
fn damaged_or_conflicting_data_dirs_are_refused_and_nothing_is_changed() {
    // A file that is not a redb database.
    let dir = tempfile::tempdir().unwrap();
    let old = dir.path().join(OLD_FILE);
    std::fs::write(&old, b"not a database").unwrap();
    let meta = meta_of(dir.path());
    let e = run(dir.path(), &meta).unwrap_err().to_string();
    assert!(e.contains("Restore the file from a backup"), "{e}");
    assert!(old.exists());
    assert!(meta.scan::<IdentIndex>(&[], 1).unwrap().is_empty());

    // A damaged record: nothing is half moved.
    let dir = tempfile::tempdir().unwrap();
    let old = dir.path().join(OLD_FILE);
    let mut a = old_accounts();
    a.sessions[2].1.refresh_sha256 = "zz".into();
    write(&old, &a).unwrap();
    let meta = meta_of(dir.path());
    let e = run(dir.path(), &meta).unwrap_err().to_string();
    assert!(e.contains("a refresh token hash \"zz\""), "{e}");
    assert!(old.exists());
    assert!(meta.scan::<IdentIndex>(&[], 1).unwrap().is_empty());
    assert_eq!(meta.user_get(UserId(1)).unwrap(), None);

    // meta.redb has accounts of its own.
    let dir = tempfile::tempdir().unwrap();
    let old = dir.path().join(OLD_FILE);
    write(&old, &old_accounts()).unwrap();
    let meta = meta_of(dir.path());
    meta.user_create("email:dee@x.org", &User::default(), None)
        .unwrap();
    let e = run(dir.path(), &meta).unwrap_err().to_string();
    assert!(e.contains("keep one"), "{e}");
    assert!(old.exists());
    assert_eq!(meta.user_by_ident("email:ben@x.org").unwrap(), None);

    // The old file and a moved one both present.
    std::fs::write(dir.path().join(MOVED_FILE), b"").unwrap();
    let e = run(dir.path(), &meta).unwrap_err().to_string();
    assert!(e.contains("move one of them out of it"), "{e}");
}
