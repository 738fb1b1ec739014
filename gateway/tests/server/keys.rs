//! The end-to-end key directory through the real binary (two shards): UploadKeys and its
//! refusals, FetchKeyBundles under the visibility rule, one-time prekeys handed out once to
//! connections racing on both shards, the stock surviving SIGKILL, the low-stock push once
//! per crossing, and DeviceListChanged on sign-in and RemoveDevice.

use ring::signature::KeyPair as _;

use super::*;

/// A device's keys: an Ed25519 identity that signs the signed prekey.
struct DeviceKeys {
    identity: ring::signature::Ed25519KeyPair,
}

impl DeviceKeys {
    fn new() -> Self {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        DeviceKeys {
            identity: ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap(),
        }
    }

    fn identity_key(&self) -> bytes::Bytes {
        self.identity.public_key().as_ref().to_vec().into()
    }

    /// A full upload: identity, a signed prekey and `n` one-time prekeys from `first`.
    fn upload(&self, first: u32, n: u32) -> v1::UploadKeys {
        let spk = [0x5a; 32];
        v1::UploadKeys {
            identity_key: self.identity_key(),
            registration_id: 77,
            signed_prekey: Some(v1::SignedPrekey {
                key_id: 1,
                public_key: spk.to_vec().into(),
                signature: self.identity.sign(&spk).as_ref().to_vec().into(),
            }),
            one_time_prekeys: (first..first + n)
                .map(|i| v1::OneTimePrekey {
                    key_id: i,
                    public_key: otk(i),
                })
                .collect(),
        }
    }
}

fn otk(id: u32) -> bytes::Bytes {
    let mut k = [0u8; 32];
    k[..4].copy_from_slice(&id.to_be_bytes());
    k.to_vec().into()
}

fn count(b: &Body) -> u32 {
    match b {
        Body::PrekeyCount(c) => c.one_time_prekeys,
        other => panic!("expected PrekeyCount, got {other:?}"),
    }
}

fn bundles(b: Body) -> Vec<v1::KeyBundle> {
    match b {
        Body::KeyBundles(k) => k.bundles,
        other => panic!("expected KeyBundles, got {other:?}"),
    }
}

fn fetch(c: &mut Client, user: u64) -> Vec<v1::KeyBundle> {
    bundles(call(
        c,
        Body::FetchKeyBundles(v1::FetchKeyBundles {
            user_id: user,
            device_ids: vec![],
            list_only: false,
        }),
    ))
}

fn list(c: &mut Client, user: u64, device_ids: Vec<u32>) -> Body {
    call(
        c,
        Body::FetchKeyBundles(v1::FetchKeyBundles {
            user_id: user,
            device_ids,
            list_only: true,
        }),
    )
}

/// Frames of kind `pred` that arrive on `c` before a Ping's Pong (pushes queued before the
/// Ping are on the wire before its Pong).
fn pushes_until_pong(c: &mut Client, pred: impl Fn(&Body) -> bool) -> Vec<Body> {
    std::thread::sleep(Duration::from_millis(400)); // pushes travel on the shards' tick
    let id = c.next_id;
    c.next_id += 1;
    c.send(id, Body::Ping(v1::Ping { nonce: 1 }));
    let (_, before) = recv_until(c, |f| f.request_id == id);
    before
        .into_iter()
        .filter(|f| f.request_id == 0)
        .filter_map(|f| f.body)
        .filter(|b| pred(b))
        .collect()
}

#[test]
fn key_uploads_are_checked_and_the_stock_survives_sigkill() {
    let srv = Server::start("auto", "");
    let mut a = srv.hello("");
    let ga = register(&srv, &mut a, email("ada@example.org"), "ada@example.org");
    let keys = DeviceKeys::new();

    // An empty upload asks for the count.
    assert_eq!(
        count(&call(&mut a, Body::UploadKeys(v1::UploadKeys::default()))),
        0
    );
    let refused = |a: &mut Client, up: v1::UploadKeys, code: ErrorCode, says: &str| {
        let b = call(a, Body::UploadKeys(up));
        assert_eq!(err_code(&b), code, "{b:?}");
        let Body::Error(e) = &b else { unreachable!() };
        assert!(e.message.contains(says), "{e:?}");
    };
    let mut no_identity = keys.upload(1, 1);
    no_identity.identity_key = bytes::Bytes::new();
    refused(
        &mut a,
        no_identity,
        ErrorCode::InvalidArgument,
        "first UploadKeys",
    );
    let mut no_spk = keys.upload(1, 1);
    no_spk.signed_prekey = None;
    refused(&mut a, no_spk, ErrorCode::InvalidArgument, "signed_prekey");
    let mut bad_sig = keys.upload(1, 1);
    bad_sig.signed_prekey.as_mut().unwrap().public_key = vec![0x5b; 32].into();
    refused(
        &mut a,
        bad_sig,
        ErrorCode::InvalidArgument,
        "Ed25519 signature",
    );
    let mut short_sig = keys.upload(1, 1);
    short_sig.signed_prekey.as_mut().unwrap().signature = vec![1; 63].into();
    refused(&mut a, short_sig, ErrorCode::InvalidArgument, "64 bytes");
    let mut short_spk = keys.upload(1, 1);
    short_spk.signed_prekey.as_mut().unwrap().public_key = vec![0x5a; 33].into();
    refused(
        &mut a,
        short_spk,
        ErrorCode::InvalidArgument,
        "signed_prekey.public_key",
    );
    let mut long_identity = keys.upload(1, 1);
    long_identity.identity_key = vec![1; 33].into();
    refused(
        &mut a,
        long_identity,
        ErrorCode::InvalidArgument,
        "32 bytes",
    );
    let mut short_otk = keys.upload(1, 2);
    short_otk.one_time_prekeys[1].public_key = vec![1; 31].into();
    refused(
        &mut a,
        short_otk,
        ErrorCode::InvalidArgument,
        "one-time prekey 2",
    );
    refused(
        &mut a,
        keys.upload(1, 101),
        ErrorCode::InvalidArgument,
        "at most 100",
    );
    let mut dup = keys.upload(1, 3);
    dup.one_time_prekeys[2].key_id = 1;
    refused(&mut a, dup, ErrorCode::InvalidArgument, "appears twice");
    // Nothing of the refused uploads was stored.
    assert_eq!(
        count(&call(&mut a, Body::UploadKeys(v1::UploadKeys::default()))),
        0
    );

    for first in [1, 101, 201, 301, 401] {
        let n = count(&call(&mut a, Body::UploadKeys(keys.upload(first, 100))));
        assert_eq!(n, first + 99);
    }
    // The stock limit (500 by default).
    refused(
        &mut a,
        keys.upload(501, 1),
        ErrorCode::InvalidArgument,
        "more than the 500",
    );
    // A retry of an upload is accepted; another key under a stored id is not.
    assert_eq!(
        count(&call(&mut a, Body::UploadKeys(keys.upload(1, 100)))),
        500
    );
    let mut other = keys.upload(7, 1);
    other.one_time_prekeys[0].public_key = vec![0xee; 32].into();
    refused(
        &mut a,
        other,
        ErrorCode::AlreadyExists,
        "already in the stock",
    );
    // A malformed fetch.
    let b = call(
        &mut a,
        Body::FetchKeyBundles(v1::FetchKeyBundles {
            user_id: 0,
            device_ids: vec![],
            list_only: false,
        }),
    );
    assert_eq!(err_code(&b), ErrorCode::InvalidArgument);
    let b = call(
        &mut a,
        Body::FetchKeyBundles(v1::FetchKeyBundles {
            user_id: ga.user_id,
            device_ids: (0..65).collect(),
            list_only: false,
        }),
    );
    assert_eq!(err_code(&b), ErrorCode::InvalidArgument);

    // Own bundles are visible; the fetch took key 1.
    let me = ga.clone();
    let got = fetch(&mut a, me.user_id);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].device_id, me.device_id);
    assert_eq!(got[0].identity_key, keys.identity_key());
    assert_eq!(got[0].registration_id, 77);
    assert_eq!(got[0].one_time_prekey.as_ref().unwrap().key_id, 1);
    assert_eq!(got[0].one_time_prekey.as_ref().unwrap().public_key, otk(1));

    // SIGKILL: the stock (499) and the claim of key 1 survive.
    drop(a);
    let srv = srv.kill9_and_restart("auto");
    let mut a = srv.hello(&ga.access_token);
    assert_eq!(
        count(&call(&mut a, Body::UploadKeys(v1::UploadKeys::default()))),
        499
    );
    let got = fetch(&mut a, me.user_id);
    assert_eq!(got[0].one_time_prekey.as_ref().unwrap().key_id, 2);

    // A new identity starts over: the old one-time prekeys go.
    let fresh = DeviceKeys::new();
    assert_eq!(
        count(&call(&mut a, Body::UploadKeys(fresh.upload(1000, 3)))),
        3
    );
    let got = fetch(&mut a, me.user_id);
    assert_eq!(got[0].identity_key, fresh.identity_key());
    assert_eq!(got[0].one_time_prekey.as_ref().unwrap().key_id, 1000);
}

/// 8 connections of one user, on both shards, race for a device's 50 one-time prekeys: 50
/// distinct keys go out, then bundles with the signed prekey only. The device gets one
/// PrekeyCount push when its stock falls below 20 (not one per fetch). Someone who shares no
/// conversation sees no bundles.
#[test]
fn racing_fetches_on_both_shards_never_share_a_one_time_prekey() {
    for driver in DRIVERS {
        let srv = Server::start(driver, "");
        let mut a = srv.hello("");
        let ga = register(&srv, &mut a, email("ada@example.org"), "ada@example.org");
        let mut b = srv.hello("");
        let gb = register(&srv, &mut b, email("ben@example.org"), "ben@example.org");
        let mut c = srv.hello("");
        register(&srv, &mut c, email("cy@example.org"), "cy@example.org");
        let ua = ga.user_id;
        let keys = DeviceKeys::new();
        assert_eq!(
            count(&call(&mut a, Body::UploadKeys(keys.upload(1, 50)))),
            50
        );

        // Not visible yet (no shared conversation): empty, like an unknown user.
        assert!(fetch(&mut b, ua).is_empty());
        assert!(fetch(&mut b, 999_999).is_empty());
        let ack = call(&mut b, text(1, ua, "hi"));
        assert!(matches!(ack, Body::SendAck(_)), "{ack:?}");
        assert!(
            fetch(&mut c, ua).is_empty(),
            "cy shares no conversation with ada"
        );

        let mut conns: Vec<Client> = (0..8).map(|_| srv.hello(&gb.access_token)).collect();
        let open = |metrics: &str, shard: usize| -> i64 {
            metrics
                .lines()
                .find_map(|l| {
                    l.strip_prefix(&format!("starling_connections{{shard=\"{shard}\"}} "))
                })
                .unwrap()
                .parse()
                .unwrap()
        };
        // The kernel spreads connections over the shards' listeners by a hash of their
        // addresses, not evenly: reconnect one until both shards have some (bounded).
        for _ in 0..64 {
            let metrics = srv.metrics();
            if open(&metrics, 0) >= 1 && open(&metrics, 1) >= 1 {
                break;
            }
            drop(conns.pop());
            std::thread::sleep(std::time::Duration::from_millis(20));
            conns.push(srv.hello(&gb.access_token));
        }
        let metrics = srv.metrics();
        for shard in 0..2 {
            assert!(
                open(&metrics, shard) >= 1,
                "no connection on shard {shard}:\n{metrics}"
            );
        }
        let start = Arc::new(std::sync::Barrier::new(conns.len()));
        let threads: Vec<_> = conns
            .drain(..)
            .map(|mut conn| {
                let start = start.clone();
                std::thread::spawn(move || {
                    start.wait();
                    (0..10)
                        .map(|_| {
                            let got = fetch(&mut conn, ua);
                            assert_eq!(got.len(), 1);
                            assert!(got[0].signed_prekey.is_some());
                            got[0].one_time_prekey.as_ref().map(|k| k.key_id)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut handed = Vec::new();
        let mut signed_only = 0;
        for t in threads {
            for k in t.join().unwrap() {
                match k {
                    Some(id) => handed.push(id),
                    None => signed_only += 1,
                }
            }
        }
        handed.sort_unstable();
        assert_eq!(handed, (1..=50).collect::<Vec<_>>(), "{driver}");
        assert_eq!(signed_only, 30, "{driver}");

        // One low-stock push (50 → ... → 19 crossed 20 once), carrying 19.
        let low = pushes_until_pong(&mut a, |b| matches!(b, Body::PrekeyCount(_)));
        assert_eq!(low.len(), 1, "{driver}: {low:?}");
        assert_eq!(count(&low[0]), 19);
        assert_eq!(
            count(&call(&mut a, Body::UploadKeys(v1::UploadKeys::default()))),
            0
        );
        // Refilled to 25 (armed again), then taken below 20 again: one more push.
        assert_eq!(
            count(&call(&mut a, Body::UploadKeys(keys.upload(100, 25)))),
            25
        );
        for _ in 0..6 {
            fetch(&mut b, ua);
        }
        let low = pushes_until_pong(&mut a, |b| matches!(b, Body::PrekeyCount(_)));
        assert_eq!(low.len(), 1, "{driver}: {low:?}");
        assert_eq!(count(&low[0]), 19);
    }
}

/// A sign-in (a new device) and RemoveDevice are pushed to the user's peers as
/// DeviceListChanged (on their connections that have used the directory); the removed device's
/// keys leave the directory.
#[test]
fn device_list_changes_reach_conversation_peers() {
    let srv = Server::start("auto", "");
    let mut a = srv.hello("");
    let ga = register(&srv, &mut a, email("ada@example.org"), "ada@example.org");
    let mut b = srv.hello("");
    let gb = register(&srv, &mut b, email("ben@example.org"), "ben@example.org");
    // Another connection of Ben's that never uses the directory.
    let mut b_plain = srv.hello(&gb.access_token);
    let mut c = srv.hello("");
    register(&srv, &mut c, email("cy@example.org"), "cy@example.org");
    let ua = ga.user_id;
    assert!(matches!(call(&mut b, text(1, ua, "hi")), Body::SendAck(_)));
    // The directory's pushes go to connections that have used it: an empty UploadKeys.
    for conn in [&mut b, &mut c] {
        assert_eq!(
            count(&call(conn, Body::UploadKeys(v1::UploadKeys::default()))),
            0
        );
    }
    assert_eq!(
        count(&call(
            &mut a,
            Body::UploadKeys(DeviceKeys::new().upload(1, 5))
        )),
        5
    );

    // Ada signs in on a second device, which uploads keys too.
    let mut a2 = srv.hello("");
    let ga2 = register(&srv, &mut a2, email("ada@example.org"), "ada@example.org");
    let d2 = ga2.device_id;
    assert_eq!(
        count(&call(
            &mut a2,
            Body::UploadKeys(DeviceKeys::new().upload(1, 5))
        )),
        5
    );
    // (Each sign-in also told the user's own connections of their own new device.)
    let is_change = |b: &Body| matches!(b, Body::DeviceListChanged(c) if c.user_id == ua);
    let seen = pushes_until_pong(&mut b, is_change);
    assert_eq!(seen.len(), 1, "{seen:?}");
    let Body::DeviceListChanged(ch) = &seen[0] else {
        unreachable!()
    };
    assert_eq!(
        (ch.user_id, ch.added_device_ids.as_slice()),
        (ua, &[d2][..])
    );
    assert!(pushes_until_pong(&mut b_plain, is_change).is_empty());
    // Ada's first device hears of it too; Cy, who shares nothing with Ada, does not.
    let of_d2 =
        |b: &Body| matches!(b, Body::DeviceListChanged(c) if c.added_device_ids.contains(&d2));
    assert_eq!(pushes_until_pong(&mut a, of_d2).len(), 1);
    assert!(pushes_until_pong(&mut c, is_change).is_empty());
    assert_eq!(fetch(&mut b, ua).len(), 2);

    // The second device is removed: Ben is told, and its keys are gone.
    let done = call(
        &mut a,
        Body::RemoveDevice(v1::RemoveDevice { device_id: d2 }),
    );
    assert!(matches!(done, Body::Done(_)), "{done:?}");
    let seen = pushes_until_pong(&mut b, is_change);
    assert_eq!(seen.len(), 1, "{seen:?}");
    let Body::DeviceListChanged(ch) = &seen[0] else {
        unreachable!()
    };
    assert_eq!(ch.removed_device_ids, [d2]);
    let left = fetch(&mut b, ua);
    assert_eq!(left.len(), 1);
    assert_ne!(left[0].device_id, d2);
}

/// A list_only FetchKeyBundles lists a user's devices with their identity and signed prekey
/// and takes no one-time prekey (the stock and the next claim are unchanged); it follows the
/// same visibility rule and refuses the same bad input; device_ids then claim for one device.
#[test]
fn a_listing_takes_no_one_time_prekey() {
    let srv = Server::start("auto", "");
    let mut a = srv.hello("");
    let ga = register(&srv, &mut a, email("ada@example.org"), "ada@example.org");
    let mut a2 = srv.hello("");
    let ga2 = register(&srv, &mut a2, email("ada@example.org"), "ada@example.org");
    let mut b = srv.hello("");
    register(&srv, &mut b, email("ben@example.org"), "ben@example.org");
    let mut c = srv.hello("");
    register(&srv, &mut c, email("cy@example.org"), "cy@example.org");
    let ua = ga.user_id;
    assert!(matches!(call(&mut b, text(1, ua, "hi")), Body::SendAck(_)));
    let (k1, k2) = (DeviceKeys::new(), DeviceKeys::new());
    assert_eq!(count(&call(&mut a, Body::UploadKeys(k1.upload(1, 5)))), 5);
    assert_eq!(count(&call(&mut a2, Body::UploadKeys(k2.upload(1, 5)))), 5);

    for _ in 0..3 {
        let got = bundles(list(&mut b, ua, vec![]));
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(got.iter().all(|b| b.one_time_prekey.is_none()), "{got:?}");
        assert_eq!(got[0].device_id, ga.device_id);
        assert_eq!(got[0].identity_key, k1.identity_key());
        assert_eq!(got[1].identity_key, k2.identity_key());
        assert!(got.iter().all(|b| b.signed_prekey.is_some()));
    }
    let only = bundles(list(&mut b, ua, vec![ga2.device_id]));
    assert_eq!(only.len(), 1);
    assert_eq!(only[0].device_id, ga2.device_id);
    // Nothing was taken: both stocks are whole, the next claim is key 1.
    for conn in [&mut a, &mut a2] {
        assert_eq!(
            count(&call(conn, Body::UploadKeys(v1::UploadKeys::default()))),
            5
        );
    }
    let claimed = bundles(call(
        &mut b,
        Body::FetchKeyBundles(v1::FetchKeyBundles {
            user_id: ua,
            device_ids: vec![ga2.device_id],
            list_only: false,
        }),
    ));
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].device_id, ga2.device_id);
    assert_eq!(claimed[0].one_time_prekey.as_ref().unwrap().key_id, 1);
    assert_eq!(
        count(&call(&mut a, Body::UploadKeys(v1::UploadKeys::default()))),
        5
    );
    assert_eq!(
        count(&call(&mut a2, Body::UploadKeys(v1::UploadKeys::default()))),
        4
    );

    // The visibility rule and the refusals of a fetch hold for a listing.
    assert!(bundles(list(&mut c, ua, vec![])).is_empty());
    assert_eq!(
        err_code(&list(&mut b, 0, vec![])),
        ErrorCode::InvalidArgument
    );
    assert_eq!(
        err_code(&list(&mut b, ua, (0..65).collect())),
        ErrorCode::InvalidArgument
    );

    // A removed device is no longer listed.
    let done = call(
        &mut a,
        Body::RemoveDevice(v1::RemoveDevice {
            device_id: ga2.device_id,
        }),
    );
    assert!(matches!(done, Body::Done(_)), "{done:?}");
    let left = bundles(list(&mut b, ua, vec![]));
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].device_id, ga.device_id);
}
