//! Contact discovery's rate limit, through the real binary: it counts new
//! numbers looked up, not requests (`accounts.discover_numbers_per_hour`).

use super::*;

fn sha(phone: &str) -> bytes::Bytes {
    ring::digest::digest(&ring::digest::SHA256, phone.as_bytes())
        .as_ref()
        .to_vec()
        .into()
}

fn discover(c: &mut Client, phones: &[&str]) -> Body {
    call(
        c,
        Body::DiscoverContacts(v1::DiscoverContacts {
            phone_sha256: phones.iter().map(|p| sha(p)).collect(),
        }),
    )
}

fn matches(b: &Body) -> Vec<u64> {
    match b {
        Body::ContactMatches(m) => m.matches.iter().map(|m| m.user_id).collect(),
        other => panic!("expected ContactMatches, got {other:?}"),
    }
}

/// With a budget of 5 new numbers an hour: the same number looked up 25
/// times is answered every time (it was the 21st request that failed for
/// an hour when requests were counted); new numbers are counted up to the
/// budget, then refused whole with retry_after_ms while known ones still
/// pass; a malformed request charges nothing; another user has a budget of
/// its own.
#[test]
fn discovery_counts_new_numbers_not_requests() {
    let srv = Server::start("auto", "[accounts]\ndiscover_numbers_per_hour = 5\n");
    let mut a = srv.hello("");
    let ga = register(&srv, &mut a, phone("+14155550100"), "+14155550100");
    let mut b = srv.hello("");
    register(&srv, &mut b, email("ben@example.org"), "ben@example.org");

    for _ in 0..25 {
        assert_eq!(matches(&discover(&mut b, &["+14155550100"])), [ga.user_id]);
    }
    // 1 of 5 spent; 4 new ones (and the known one again) fit exactly.
    let four = [
        "+14155550101",
        "+14155550102",
        "+14155550103",
        "+14155550104",
    ];
    let mut with_known = four.to_vec();
    with_known.push("+14155550100");
    assert_eq!(matches(&discover(&mut b, &with_known)), [ga.user_id]);

    // A malformed hash is INVALID_ARGUMENT and costs nothing.
    let bad = call(
        &mut b,
        Body::DiscoverContacts(v1::DiscoverContacts {
            phone_sha256: vec![vec![1u8; 31].into()],
        }),
    );
    assert_eq!(err_code(&bad), ErrorCode::InvalidArgument);

    // The budget is spent: a new number is refused, whole, with a retry time.
    let refused = discover(&mut b, &["+14155550100", "+14155550105"]);
    let Body::Error(e) = &refused else {
        panic!("expected RATE_LIMITED, got {refused:?}")
    };
    assert_eq!(err_code(&refused), ErrorCode::RateLimited);
    assert!(
        e.retry_after_ms > 3_500_000 && e.retry_after_ms <= 3_600_000,
        "{e:?}"
    );
    assert!(e.message.contains("new numbers"), "{e:?}");
    // Numbers looked up before still pass, in any mix.
    for _ in 0..5 {
        assert_eq!(
            matches(&discover(&mut b, &["+14155550103", "+14155550100"])),
            [ga.user_id]
        );
    }

    // Ana's budget is her own: 5 new numbers, then one more is refused.
    let ana_five = [
        "+14155550201",
        "+14155550202",
        "+14155550203",
        "+14155550204",
        "+14155550205",
    ];
    assert!(matches(&discover(&mut a, &ana_five)).is_empty());
    assert_eq!(
        err_code(&discover(&mut a, &["+14155550206"])),
        ErrorCode::RateLimited
    );
}
