//! The title of a direct conversation is the peer's current display name: UpdateProfile's new
//! name reaches the conversation list (and GetProfiles) before its `Profile` answer, whether the
//! conversation's state is in the router's memory or was evicted, and across a restart. There
//! is one record of a user, the account itself, so there is no copy to bring up to date.

use super::*;

fn rename(c: &mut Client, name: &str) {
    match call(
        c,
        Body::UpdateProfile(v1::UpdateProfile {
            display_name: Some(name.into()),
            ..Default::default()
        }),
    ) {
        Body::Profile(p) => assert_eq!(p.display_name, name),
        other => panic!("{other:?}"),
    }
}

/// `of`'s display name as `c` sees it through GetProfiles.
fn profile_name(c: &mut Client, of: u64) -> String {
    match call(c, Body::GetProfiles(v1::GetProfiles { user_ids: vec![of] })) {
        Body::Profiles(p) => p.profiles[0].display_name.clone(),
        other => panic!("{other:?}"),
    }
}

/// The title of `conv` in `c`'s conversation list.
fn title(c: &mut Client, conv: u64) -> String {
    match call(c, Body::ListConversations(v1::ListConversations::default())) {
        Body::ConversationList(l) => l
            .conversations
            .iter()
            .find(|s| s.conversation_id == conv)
            .map(|s| s.title.clone())
            .unwrap_or_else(|| panic!("{conv} not in {l:?}")),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_renamed_peer_shows_under_the_new_name_in_the_conversation_list() {
    // Idle conversation states leave the router's memory after 200 ms.
    let srv = Server::start("auto", "[router]\nconv_idle_evict_ms = 200\n");
    let (mut a, ga, mut b, gb) = ana_and_ben(&srv);
    let conv = match call(&mut a, text(1, gb.user_id, "hi ben")) {
        Body::SendAck(ack) => ack.conversation_id,
        other => panic!("{other:?}"),
    };
    assert_eq!(title(&mut a, conv), "Ana", "both registered as Ana");

    // The conversation's state is in memory (just used): the new name shows at once.
    rename(&mut b, "Benjamin");
    assert_eq!(title(&mut a, conv), "Benjamin");
    assert_eq!(profile_name(&mut a, gb.user_id), "Benjamin");
    assert_eq!(title(&mut b, conv), "Ana", "Ben's own list shows Ana");

    // Evicted (nothing used it for a while): loaded again, with the current name.
    let deadline = now() + Duration::from_secs(20);
    while metric_sum(&srv, "starling_conversations_evicted_total") < 1 {
        assert!(now() < deadline, "the idle conversation was never evicted");
        std::thread::sleep(Duration::from_millis(100));
    }
    rename(&mut b, "Ben B.");
    assert_eq!(title(&mut a, conv), "Ben B.");

    // The name was durable before the Profile answer: a SIGKILL right after keeps it.
    rename(&mut b, "Benny");
    drop((a, b));
    let srv = srv.kill9_and_restart("auto");
    let mut a = srv.hello(&ga.access_token);
    assert_eq!(title(&mut a, conv), "Benny");
    assert_eq!(profile_name(&mut a, gb.user_id), "Benny");
}

/// A user who registered and never signed in again is titled with the name given at
/// registration (no sign-in has to copy it anywhere first), and a rename by one device reaches
/// the peer while the renamed user's other device stays connected.
#[test]
fn the_name_given_at_registration_titles_the_conversation_at_once() {
    let srv = Server::start("auto", "");
    let mut a = srv.hello("");
    let ga = register(&srv, &mut a, email("ana@example.org"), "ana@example.org");
    let mut c = srv.hello("");
    let sent = c.request(Body::RequestOtp(v1::RequestOtp {
        identifier: email("cy@example.org"),
    }));
    assert!(matches!(sent, Body::OtpSent(_)), "{sent:?}");
    let gc = match c.request(Body::VerifyOtp(v1::VerifyOtp {
        identifier: email("cy@example.org"),
        code: srv.code_for("cy@example.org"),
        device: None,
        display_name: "Cy".into(),
    })) {
        Body::SessionGranted(g) => g,
        other => panic!("{other:?}"),
    };
    drop(c);
    let mut a = srv.hello(&ga.access_token);
    let conv = match call(&mut a, text(1, gc.user_id, "hi cy")) {
        Body::SendAck(ack) => ack.conversation_id,
        other => panic!("{other:?}"),
    };
    assert_eq!(title(&mut a, conv), "Cy");
    assert_eq!(profile_name(&mut a, gc.user_id), "Cy");
    let mut c = srv.hello(&gc.access_token);
    rename(&mut c, "Cyrus");
    assert_eq!(title(&mut a, conv), "Cyrus");
    assert_eq!(profile_name(&mut a, gc.user_id), "Cyrus");
}
