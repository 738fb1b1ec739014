"""Disappearing messages (protocol/README.md, "Disappearing messages and retention"), against
the real `starling` binary: a timer change is a Send with `set_timer`, acknowledged and pushed
as an entry with `timer_changed`; later messages carry `expires_at_ms` (SendAck and Deliver);
once it passes, GetHistory and Sync no longer serve them; a bad timer is INVALID_ARGUMENT."""

import time

from flows import Server, body, expect, expect_error, hello, register, cmid

TIMER_SECS = 5


def run_all(pb, binary, check):
    srv = Server(binary, pb, "[accounts]\nargon2_memory_kib = 1024\n")
    try:
        flows(pb, srv, check)
    finally:
        srv.stop()


def timer_send(pb, conv, tag, i, seconds):
    return pb.Send(client_msg_id=cmid(tag, i), to=pb.Recipient(conversation_id=conv),
                   set_timer=pb.DisappearingTimer(seconds=seconds))


def flows(pb, srv, check):
    s = {}

    def setup():
        a, b = srv.connect(), srv.connect()
        hello(pb, a)
        hello(pb, b)
        s["a"], s["ga"] = a, register(pb, srv, a, "ana@timer.test", "Ana")
        s["b"], s["gb"] = b, register(pb, srv, b, "ben@timer.test", "Ben")
        f, _ = a.call("send", pb.Send(client_msg_id=cmid(60, 1),
                                      to=pb.Recipient(user_id=s["gb"].user_id),
                                      content_type="text/plain", body=b"kept"))
        expect(body(f)[0] == "send_ack" and f.send_ack.expires_at_ms == 0, f"{f}")
        s["conv"] = f.send_ack.conversation_id
        b.until(lambda f: body(f)[0] == "deliver" and f.deliver.message.seq == 1)
    check("disappearing: a conversation", setup)

    def bad_timer():
        f, _ = s["b"].call("send", timer_send(pb, s["conv"], 61, 1, 1))
        expect_error(pb, f, "INVALID_ARGUMENT")
        f, _ = s["b"].call("send", pb.Send(
            client_msg_id=cmid(61, 2), to=pb.Recipient(conversation_id=s["conv"]),
            content_type="text/plain", body=b"x",
            set_timer=pb.DisappearingTimer(seconds=60)))
        expect_error(pb, f, "INVALID_ARGUMENT")
    check("disappearing: a timer under 5 s, or one with content, is INVALID_ARGUMENT", bad_timer)

    def timer_entry():
        a, b, conv = s["a"], s["b"], s["conv"]
        f, _ = b.call("send", timer_send(pb, conv, 62, 1, TIMER_SECS))
        expect(body(f)[0] == "send_ack" and f.send_ack.seq == 2, f"{f}")
        f, _ = a.until(lambda f: body(f)[0] == "deliver" and f.deliver.message.seq == 2)
        m = f.deliver.message
        expect(m.HasField("timer_changed") and m.timer_changed.seconds == TIMER_SECS
               and m.expires_at_ms == 0, f"{m}")
    check("disappearing: the timer change is an entry, pushed with timer_changed", timer_entry)

    def expiry():
        a, b, conv = s["a"], s["b"], s["conv"]
        f, _ = a.call("send", pb.Send(client_msg_id=cmid(63, 1),
                                      to=pb.Recipient(conversation_id=conv),
                                      content_type="text/plain", body=b"soon gone"))
        ack = f.send_ack
        expect(ack.seq == 3 and ack.expires_at_ms == ack.server_ts_ms + TIMER_SECS * 1000,
               f"{f}")
        f, _ = b.until(lambda f: body(f)[0] == "deliver" and f.deliver.message.seq == 3)
        expect(f.deliver.message.expires_at_ms == ack.expires_at_ms, f"{f}")
        f, _ = b.call("get_history", pb.GetHistory(conversation_id=conv))
        expect([m.seq for m in f.history_page.messages] == [1, 2, 3], f"{f}")
        while time.time() * 1000 < ack.expires_at_ms + 100:
            time.sleep(0.1)
        f, _ = b.call("get_history", pb.GetHistory(conversation_id=conv))
        expect([m.seq for m in f.history_page.messages] == [1, 2], f"{f}")
        sync = pb.Sync()
        sync.last_seq[conv] = 0
        done, before = b.call("sync", sync)
        expect(body(done)[0] == "sync_done", f"{done}")
        seqs = [f.deliver.message.seq for f in before
                if body(f)[0] == "deliver" and f.request_id == done.request_id]
        expect(seqs == [1, 2], f"{seqs}")
    check("disappearing: a later message carries expires_at_ms and is gone from history and "
          "Sync once it passes", expiry)
