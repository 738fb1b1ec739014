"""Presence, typing and GetProfiles, against the real `starling` binary: who may follow whom,
the snapshot and pushed updates (AWAY, OFFLINE with last_seen_ms), typing to the other member
and its server-side expiry, public profiles (see protocol/README.md, "Presence, typing and
profiles")."""

import time

from flows import Server, body, expect, expect_error, hello, register, text, cmid


def run_all(pb, binary, check):
    srv = Server(binary, pb, "[accounts]\nargon2_memory_kib = 1024\n"
                             "[router]\npresence_coalesce_ms = 50\ntyping_expiry_ms = 1000\n")
    try:
        flows(pb, srv, check)
    finally:
        srv.stop()


def update(conn, state):
    """The next PresenceUpdate pushed to `conn` with `state` (coalescing may skip others)."""
    while True:
        f, _ = conn.until(lambda f: body(f)[0] == "presence_update")
        expect(f.request_id == 0, f"a push carries request_id 0: {f}")
        if f.presence_update.state == state:
            return f.presence_update


def flows(pb, srv, check):
    s = {}

    def setup():
        a, b = srv.connect(), srv.connect()
        w = hello(pb, a)
        for name in ("presence", "typing", "profiles"):
            expect(name in w.features, f"{name} not in {list(w.features)}")
        hello(pb, b)
        s["a"], s["ga"] = a, register(pb, srv, a, "ana@presence.test", "Ana")
        s["b"], s["gb"] = b, register(pb, srv, b, "ben@presence.test", "Ben")
    check("presence: Welcome lists presence, typing, profiles", setup)

    def not_visible():
        f, _ = s["a"].call("subscribe_presence",
                           pb.SubscribePresence(user_ids=[s["gb"].user_id]))
        expect_error(pb, f, "PERMISSION_DENIED")
        f, _ = s["a"].call("get_profiles", pb.GetProfiles(user_ids=[s["gb"].user_id]))
        expect(body(f)[0] == "profiles" and len(f.profiles.profiles) == 0, f"{f}")
    check("presence: no shared conversation, no contact: PERMISSION_DENIED, no profile",
          not_visible)

    def snapshot_and_updates():
        a, b, ga, gb = s["a"], s["b"], s["ga"], s["gb"]
        f, _ = a.call("send", text(pb, gb.user_id, cmid(9, 1), "hi ben"))
        expect(body(f)[0] == "send_ack", f"{f}")
        s["conv"] = f.send_ack.conversation_id
        f, _ = a.call("subscribe_presence", pb.SubscribePresence(user_ids=[gb.user_id]))
        kind, snap = body(f)
        expect(kind == "presence_snapshot" and len(snap.users) == 1, f"{f}")
        u = snap.users[0]
        expect((u.user_id, u.state, u.last_seen_ms)
               == (gb.user_id, pb.PRESENCE_STATE_ONLINE, 0), f"{u}")
        f, _ = b.call("set_presence", pb.SetPresence(state=pb.PRESENCE_STATE_AWAY))
        expect(body(f)[0] == "done", f"{f}")
        update(a, pb.PRESENCE_STATE_AWAY)
        f, _ = b.call("set_presence", pb.SetPresence(state=pb.PRESENCE_STATE_OFFLINE))
        expect_error(pb, f, "INVALID_ARGUMENT")
        f, _ = b.call("set_presence", pb.SetPresence(state=pb.PRESENCE_STATE_ONLINE))
        update(a, pb.PRESENCE_STATE_ONLINE)
    check("presence: snapshot, then AWAY and ONLINE pushed to the follower",
          snapshot_and_updates)

    def typing():
        a, b, conv = s["a"], s["b"], s["conv"]
        a.send(0, "typing", pb.Typing(conversation_id=conv, state=pb.TYPING_STATE_TYPING))
        f, _ = b.until(lambda f: body(f)[0] == "typing")
        t = f.typing
        expect(f.request_id == 0 and (t.conversation_id, t.state, t.user_id)
               == (conv, pb.TYPING_STATE_TYPING, s["ga"].user_id), f"{f}")
        t0 = time.monotonic()
        f, _ = b.until(lambda f: body(f)[0] == "typing")
        expect(f.typing.state == pb.TYPING_STATE_STOPPED, f"{f}")
        return f"STOPPED after {(time.monotonic() - t0) * 1000:.0f} ms"
    check("typing: pushed to the other member, expires into STOPPED", typing)

    def offline_and_profiles():
        a, gb = s["a"], s["gb"]
        t0 = int(time.time() * 1000)
        s["b"].close()
        u = update(a, pb.PRESENCE_STATE_OFFLINE)
        expect(u.last_seen_ms >= t0 - 1000, f"{u}")
        f, _ = a.call("get_profiles", pb.GetProfiles(user_ids=[gb.user_id, 999999]))
        ps = f.profiles.profiles
        expect(len(ps) == 1 and ps[0].user_id == gb.user_id and ps[0].display_name == "Ben"
               and ps[0].email == "" and ps[0].phone == "", f"{f}")
    check("presence: OFFLINE with last_seen_ms; GetProfiles: public fields of visible users",
          offline_and_profiles)
