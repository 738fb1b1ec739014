//! Block and Unblock through the real binary: targets are checked, one user's requests are
//! limited in rate and in number, repeating one writes nothing, and a flood of them from one
//! connection takes effect in order while other users' messages keep flowing.

use super::*;

fn block(user_id: u64) -> Body {
    Body::Block(v1::Block { user_id })
}

fn unblock(user_id: u64) -> Body {
    Body::Unblock(v1::Unblock { user_id })
}

/// A user registered by e-mail on a connection of their own.
fn user(srv: &Server, name: &str) -> (Client, v1::SessionGranted) {
    let mut c = srv.hello("");
    let mail = format!("{name}@example.org");
    let g = register(srv, &mut c, email(&mail), &mail);
    (c, g)
}

#[test]
fn block_targets_are_checked_and_blocks_are_limited_in_rate_and_number() {
    let srv = Server::start(
        "auto",
        "[router]\nblocks_max = 2\nblock_requests_per_s = 1\nblock_requests_burst = 6\n",
    );
    let (mut a, ga, mut b, gb) = ana_and_ben(&srv);
    let (_c, gc) = user(&srv, "cleo");
    let (_d, gd) = user(&srv, "dan");
    let first = call(&mut b, text(1, ga.user_id, "hello ana"));
    assert!(matches!(first, Body::SendAck(_)), "{first:?}");

    // A user that does not exist, and oneself.
    let e = call(&mut a, block(gd.user_id + 1000));
    assert_eq!(err_code(&e), ErrorCode::NotFound, "{e:?}");
    let e = call(&mut a, block(ga.user_id));
    assert_eq!(err_code(&e), ErrorCode::InvalidArgument, "{e:?}");

    // Ben is blocked; blocking him again is answered the same way.
    assert!(matches!(call(&mut a, block(gb.user_id)), Body::Done(_)));
    assert!(matches!(call(&mut a, block(gb.user_id)), Body::Done(_)));
    assert_eq!(
        err_code(&call(&mut b, text(2, ga.user_id, "still there?"))),
        ErrorCode::Blocked
    );

    // Two blocks is this server's most: a third is refused and says what to do.
    assert!(matches!(call(&mut a, block(gc.user_id)), Body::Done(_)));
    let over = call(&mut a, block(gd.user_id));
    assert_eq!(err_code(&over), ErrorCode::PermissionDenied, "{over:?}");
    let Body::Error(over) = over else {
        unreachable!()
    };
    assert!(over.message.contains("unblock someone first"), "{over:?}");

    // Six at once, then one a second: five are spent. A burst of ten pipelined requests gets
    // what is left, then RATE_LIMITED with the time to wait.
    let first_id = a.next_id;
    for i in 0..10 {
        a.send(first_id + i, unblock(gd.user_id));
    }
    a.next_id += 10;
    let mut answers = Vec::new();
    while answers.len() < 10 {
        let f = a.recv().expect("an answer");
        if (first_id..first_id + 10).contains(&f.request_id) {
            answers.push(f.body.unwrap());
        }
    }
    let limited: Vec<&v1::Error> = answers
        .iter()
        .filter_map(|b| match b {
            Body::Error(e) if e.code == ErrorCode::RateLimited as i32 => Some(e),
            _ => None,
        })
        .collect();
    assert!(
        (7..10).contains(&limited.len()),
        "{} of 10 limited: {answers:?}",
        limited.len()
    );
    assert!(limited.iter().all(|e| e.retry_after_ms > 0), "{limited:?}");
    assert!(
        answers
            .iter()
            .all(|b| matches!(b, Body::Done(_)) || err_code(b) == ErrorCode::RateLimited),
        "{answers:?}"
    );

    // Unblocking Ben (once the budget refilled) lets him write again.
    std::thread::sleep(Duration::from_millis(1100));
    assert!(matches!(call(&mut a, unblock(gb.user_id)), Body::Done(_)));
    let again = call(&mut b, text(3, ga.user_id, "hello again"));
    assert!(matches!(again, Body::SendAck(_)), "{again:?}");
}

/// Sends `bodies` from `c`, at most `window` unanswered at a time, and returns the answers in
/// request order (pushes in between are skipped).
fn pipeline(c: &mut Client, bodies: Vec<Body>, window: usize) -> Vec<Body> {
    let first_id = c.next_id;
    let n = bodies.len() as u64;
    c.next_id += n;
    let mut answers: std::collections::BTreeMap<u64, Body> = std::collections::BTreeMap::new();
    let mut sent = 0u64;
    let mut bodies = bodies.into_iter();
    while (answers.len() as u64) < n {
        while sent < n && sent - (answers.len() as u64) < (window as u64) {
            c.send(first_id + sent, bodies.next().unwrap());
            sent += 1;
        }
        let f = c.recv().expect("connection closed");
        if (first_id..first_id + n).contains(&f.request_id) {
            let old = answers.insert(f.request_id, f.body.unwrap());
            assert!(old.is_none(), "request {} answered twice", f.request_id);
        }
    }
    answers.into_values().collect()
}

#[test]
fn a_block_flood_is_applied_in_order_while_messages_flow() {
    let srv = Server::start(
        "auto",
        "[router]\nblock_requests_per_s = 100000\nblock_requests_burst = 100000\n",
    );
    let (mut a, ga, mut b, gb) = ana_and_ben(&srv);
    let (mut c, gc) = user(&srv, "cleo");
    let (mut d, gd) = user(&srv, "dan");
    assert!(matches!(
        call(&mut b, text(1, ga.user_id, "hi")),
        Body::SendAck(_)
    ));
    // Floods of Block/Unblock of Ben from Ana, alternating, 48 unanswered at a time; the last
    // request of a flood decides. Cleo and Dan exchange messages between floods.
    for (round, last_blocks) in [false, true, false, true].into_iter().enumerate() {
        let n = 300 + usize::from(last_blocks);
        let bodies: Vec<Body> = (0..n)
            .map(|i| {
                if i % 2 == 0 {
                    block(gb.user_id)
                } else {
                    unblock(gb.user_id)
                }
            })
            .collect();
        let answers = pipeline(&mut a, bodies, 48);
        assert_eq!(answers.len(), n);
        assert!(
            answers.iter().all(|b| matches!(b, Body::Done(_))),
            "{answers:?}"
        );
        let k = u8::try_from(round).unwrap();
        let acked = call(&mut c, text(10 + k, gd.user_id, "meanwhile"));
        assert!(matches!(acked, Body::SendAck(_)), "{acked:?}");
        let acked = call(&mut d, text(20 + k, gc.user_id, "and back"));
        assert!(matches!(acked, Body::SendAck(_)), "{acked:?}");
        let from_ben = call(&mut b, text(30 + k, ga.user_id, "can I write?"));
        if last_blocks {
            assert_eq!(err_code(&from_ben), ErrorCode::Blocked, "{from_ben:?}");
        } else {
            assert!(matches!(from_ben, Body::SendAck(_)), "{from_ben:?}");
        }
    }
}
