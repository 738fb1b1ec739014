//! DeliveryAck and ReadCursor with a request id during a storage fault, on a real filesystem
//! that fails under the server: none gets two answers or a wrong one (`Error{STORAGE_FAILURE}`
//! says the cursor was not recorded), the server stops as after any storage fault, and after
//! the restart the same requests are recorded.
//!
//! The filesystem turns read-only rather than full: `meta.redb` also holds the accounts, whose
//! earlier transactions leave free pages inside the file, and a cursor write that fits in them
//! needs no room on the disk (and rightly succeeds on a full one).

use super::*;

#[test]
fn cursor_requests_are_answered_once_when_the_disk_fails() {
    // The data dir on an ext4 image with room for the two shards' preallocated log segments
    // (4 x 64 MiB) and a little more. Declared before the server: unmounted after it stops.
    let root = tempfile::tempdir().unwrap();
    let fs = super::faults::Mount::ext4(root.path(), 320);
    let srv = Server::start_in(root, "auto", "");
    let (mut a, _ga, mut b, gb) = ana_and_ben(&srv);
    let conv = match call(&mut a, text(1, gb.user_id, "hello")) {
        Body::SendAck(ack) => ack.conversation_id,
        other => panic!("{other:?}"),
    };
    fs.force_read_only();
    let delivered = Body::DeliveryAck(v1::DeliveryAck {
        conversation_id: conv,
        up_to_seq: 1,
    });
    let read = Body::ReadCursor(v1::ReadCursor {
        conversation_id: conv,
        up_to_seq: 1,
    });
    // Without a request id: never answered, as always.
    b.send(0, delivered.clone());
    let first = b.next_id;
    for body in [delivered.clone(), read.clone(), read.clone()] {
        b.send(b.next_id, body);
        b.next_id += 1;
    }
    let ids = first..b.next_id;
    // A failed metadata write is a storage fault: the server stops (exit status 74, see
    // `faults`). Until then each request gets at most one answer, an Error saying the cursor was
    // not recorded; the connection then gets Goodbye{STORAGE_FAILURE} and is closed. A request
    // left without an answer was not carried out, and is sent again after reconnecting.
    let mut answers = std::collections::BTreeMap::new();
    let goodbye = loop {
        let f = b.recv().expect("a Goodbye before the connection closes");
        assert!(!is_answer_to_zero(&f), "{f:?}");
        match f.body {
            Some(Body::Goodbye(g)) => break g,
            Some(body) if ids.contains(&f.request_id) => {
                let again = answers.insert(f.request_id, body);
                assert!(again.is_none(), "request {} answered twice", f.request_id);
            }
            _ => {}
        }
    };
    assert_eq!(
        goodbye.code,
        ErrorCode::StorageFailure as i32,
        "{goodbye:?}"
    );
    for (id, body) in &answers {
        let Body::Error(e) = body else {
            panic!("request {id}: {body:?}")
        };
        assert_eq!(e.code, ErrorCode::StorageFailure as i32, "{e:?}");
        assert!(
            e.message.contains("not recorded") && e.message.contains("sent again"),
            "{e:?}"
        );
    }
    b.expect_closed();
    let Server { mut child, dir, .. } = srv;
    let deadline = now() + Duration::from_secs(20);
    let status = loop {
        if let Some(st) = child.0.try_wait().unwrap() {
            break st;
        }
        assert!(now() < deadline, "the server did not exit after the fault");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(74), "{status:?}");

    // Writable again: the restarted server records the same requests sent again.
    fs.remount_ext4();
    let toml = std::fs::read_to_string(dir.path().join("starling.toml")).unwrap();
    let srv = Server::start_in(dir, "auto", &toml);
    let mut b = srv.hello(&gb.access_token);
    for body in [delivered, read] {
        assert!(
            matches!(call(&mut b, body.clone()), Body::Done(_)),
            "{body:?} after the restart"
        );
    }
}

/// An answer (not a push) to a request sent without an id.
fn is_answer_to_zero(f: &v1::Frame) -> bool {
    f.request_id == 0 && matches!(f.body, Some(Body::Done(_) | Body::Error(_)))
}
