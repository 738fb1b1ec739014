//! DeliveryAck and ReadCursor with a request id during a storage fault: every one gets exactly
//! one answer — `Done` once durable, or `Error{STORAGE_FAILURE}` saying the cursor was not
//! recorded — on a real filesystem that runs out of space.

use super::*;

/// A tmpfs of `size`, unmounted (lazily: the server may still hold files) on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap().keep();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .status()
            .expect("run mount(8)");
        assert!(
            st.success(),
            "mounting a {size} tmpfs at {} failed: this test fills a real filesystem and needs root",
            dir.display()
        );
        Tmpfs(dir)
    }

    /// Writes a file until the filesystem is full.
    fn fill(&self) {
        let mut f = std::fs::File::create(self.0.join("filler")).unwrap();
        for chunk in [1 << 20, 64 << 10, 4 << 10, 512] {
            let buf = vec![7u8; chunk];
            while f.write_all(&buf).is_ok() {}
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn cursor_requests_are_answered_once_when_the_disk_is_full() {
    // Room for the two shards' preallocated log segments (4 x 64 MiB) and a little more.
    let fs = Tmpfs::mount("320m");
    let srv = Server::start_in(tempfile::tempdir_in(&fs.0).unwrap(), "auto", "");
    let (mut a, _ga, mut b, gb) = ana_and_ben(&srv);
    let conv = match call(&mut a, text(1, gb.user_id, "hello")) {
        Body::SendAck(ack) => ack.conversation_id,
        other => panic!("{other:?}"),
    };
    fs.fill();
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
    for body in [delivered, read.clone(), read] {
        b.send(b.next_id, body);
        b.next_id += 1;
    }
    let ids = first..b.next_id;
    let mut answers = std::collections::BTreeMap::new();
    while answers.len() < ids.clone().count() {
        let f = b.recv().expect("the connection stays open");
        assert!(!is_answer_to_zero(&f), "{f:?}");
        if ids.contains(&f.request_id) {
            let again = answers.insert(f.request_id, f.body.unwrap());
            assert!(again.is_none(), "request {} answered twice", f.request_id);
        }
    }
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
    // The server keeps retrying the cursors; no request gets a second answer meanwhile.
    std::thread::sleep(Duration::from_millis(300));
    b.send(99, Body::Ping(v1::Ping { nonce: 5 }));
    let (_, before) = recv_until(&mut b, |f| matches!(f.body, Some(Body::Pong(_))));
    assert!(
        before
            .iter()
            .all(|f| !is_answer_to_zero(f) && !ids.contains(&f.request_id)),
        "{before:?}"
    );
}

/// An answer (not a push) to a request sent without an id.
fn is_answer_to_zero(f: &v1::Frame) -> bool {
    f.request_id == 0 && matches!(f.body, Some(Body::Done(_) | Body::Error(_)))
}
