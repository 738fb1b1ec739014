"""Edits, deletes for everyone, reactions and replies (protocol/README.md, "Edits, deletes,
reactions and replies"), against the real `starling` binary: a change is a Send with
`change` set, acknowledged and pushed like a message; history and Sync serve each message as it
is now; every refusal has its code."""

import time

from flows import Server, body, expect, expect_error, hello, register, cmid

EDIT_WINDOW_MS = 1500


def run_all(pb, binary, check):
    srv = Server(binary, pb, "[accounts]\nargon2_memory_kib = 1024\n"
                             f"[router]\nedit_window_ms = {EDIT_WINDOW_MS}\n")
    try:
        flows(pb, srv, check)
    finally:
        srv.stop()


def change_send(pb, conv, tag, i, kind, target, emoji="", words=b""):
    return pb.Send(client_msg_id=cmid(tag, i), to=pb.Recipient(conversation_id=conv),
                   content_type="text/plain" if words else "", body=words,
                   change=pb.MessageChange(kind=kind, target_seq=target, emoji=emoji))


def flows(pb, srv, check):
    s = {}

    def setup():
        a, b = srv.connect(), srv.connect()
        hello(pb, a)
        hello(pb, b)
        s["a"], s["ga"] = a, register(pb, srv, a, "ana@changes.test", "Ana")
        s["b"], s["gb"] = b, register(pb, srv, b, "ben@changes.test", "Ben")
        f, _ = a.call("send", pb.Send(client_msg_id=cmid(40, 1),
                                      to=pb.Recipient(user_id=s["gb"].user_id),
                                      content_type="text/plain", body=b"helo"))
        expect(body(f)[0] == "send_ack" and f.send_ack.seq == 1, f"{f}")
        s["conv"] = f.send_ack.conversation_id
        b.until(lambda f: body(f)[0] == "deliver" and f.deliver.message.seq == 1)
    check("changes: a message to change", setup)

    def edit_and_react():
        a, b, conv = s["a"], s["b"], s["conv"]
        f, _ = a.call("send", change_send(pb, conv, 41, 1, pb.CHANGE_KIND_EDIT, 1,
                                          words=b"hello"))
        expect(body(f)[0] == "send_ack" and f.send_ack.seq == 2, f"{f}")
        f, _ = b.until(lambda f: body(f)[0] == "deliver" and f.deliver.message.seq == 2)
        m = f.deliver.message
        expect(m.HasField("change") and m.change.kind == pb.CHANGE_KIND_EDIT
               and m.change.target_seq == 1 and m.body == b"hello", f"{m}")
        f, _ = b.call("send", change_send(pb, conv, 42, 1, pb.CHANGE_KIND_REACT, 1, "👍"))
        expect(body(f)[0] == "send_ack" and f.send_ack.seq == 3, f"{f}")
        # A reply names a message of the conversation.
        f, _ = b.call("send", pb.Send(client_msg_id=cmid(42, 2),
                                      to=pb.Recipient(conversation_id=conv),
                                      content_type="text/plain", body=b"yes", reply_to_seq=1))
        expect(body(f)[0] == "send_ack" and f.send_ack.seq == 4, f"{f}")
        f, _ = a.call("get_history", pb.GetHistory(conversation_id=conv))
        msgs = {m.seq: m for m in f.history_page.messages}
        expect(sorted(msgs) == [1, 2, 3, 4], f"{f}")
        m1 = msgs[1]
        expect(m1.body == b"hello" and m1.edited_ts_ms > 0 and not m1.deleted, f"{m1}")
        expect([(r.user_id, r.emoji) for r in m1.reactions] == [(s["gb"].user_id, "👍")],
               f"{m1}")
        expect(msgs[3].change.kind == pb.CHANGE_KIND_REACT and msgs[4].reply_to_seq == 1,
               f"{msgs[3]} {msgs[4]}")
    check("changes: edit and reaction are entries; history serves the message as edited, "
          "with its reactions; a reply", edit_and_react)

    def refusals():
        a, b, conv = s["a"], s["b"], s["conv"]
        f, _ = b.call("send", change_send(pb, conv, 43, 1, pb.CHANGE_KIND_EDIT, 1,
                                          words=b"mine now"))
        expect_error(pb, f, "PERMISSION_DENIED")
        f, _ = b.call("send", change_send(pb, conv, 43, 2, pb.CHANGE_KIND_DELETE, 1))
        expect_error(pb, f, "PERMISSION_DENIED")
        f, _ = a.call("send", change_send(pb, conv, 43, 3, pb.CHANGE_KIND_REACT, 99, "👍"))
        expect_error(pb, f, "NOT_FOUND")
        f, _ = a.call("send", change_send(pb, conv, 43, 4, pb.CHANGE_KIND_REACT, 3, "👍"))
        expect_error(pb, f, "INVALID_ARGUMENT")  # a change is not a message
        f, _ = a.call("send", change_send(pb, conv, 43, 5, pb.CHANGE_KIND_EDIT, 1, "x",
                                          words=b"x"))
        expect_error(pb, f, "INVALID_ARGUMENT")
        f, _ = a.call("send", change_send(pb, conv, 43, 6, pb.CHANGE_KIND_REACT, 1, "x" * 65))
        expect_error(pb, f, "INVALID_ARGUMENT")
        f, _ = a.call("send", pb.Send(client_msg_id=cmid(43, 7),
                                      to=pb.Recipient(conversation_id=conv),
                                      content_type="text/plain", body=b"?", reply_to_seq=99))
        expect_error(pb, f, "NOT_FOUND")
        time.sleep(EDIT_WINDOW_MS / 1000 + 0.3)
        f, _ = a.call("send", change_send(pb, conv, 43, 8, pb.CHANGE_KIND_EDIT, 1,
                                          words=b"too late"))
        expect_error(pb, f, "FAILED_PRECONDITION")
    check("changes: not yours, no such message, inconsistent, edit window over", refusals)

    def delete():
        a, b, conv = s["a"], s["b"], s["conv"]
        f, _ = a.call("send", change_send(pb, conv, 44, 1, pb.CHANGE_KIND_DELETE, 1))
        expect(body(f)[0] == "send_ack" and not f.send_ack.duplicate, f"{f}")
        seq = f.send_ack.seq
        f, _ = a.call("send", change_send(pb, conv, 44, 1, pb.CHANGE_KIND_DELETE, 1))
        expect(f.send_ack.seq == seq and f.send_ack.duplicate, f"a retry: {f}")
        f, _ = a.call("send", change_send(pb, conv, 44, 2, pb.CHANGE_KIND_DELETE, 1))
        expect_error(pb, f, "FAILED_PRECONDITION")
        f, _ = b.call("send", change_send(pb, conv, 44, 3, pb.CHANGE_KIND_REACT, 1, "🎉"))
        expect_error(pb, f, "FAILED_PRECONDITION")
        f, before = b.call("sync", pb.Sync(last_seq={conv: 0}))
        synced = {x.deliver.message.seq: x.deliver.message for x in before
                  if x.request_id == f.request_id and body(x)[0] == "deliver"}
        f, _ = b.call("get_history", pb.GetHistory(conversation_id=conv))
        for served in (synced, {m.seq: m for m in f.history_page.messages}):
            m1 = served[1]
            expect(m1.deleted and m1.body == b"" and m1.content_type == ""
                   and not m1.reactions, f"{m1}")
            expect(served[2].change.kind == pb.CHANGE_KIND_EDIT and served[2].body == b"",
                   f"the edit's content is gone too: {served[2]}")
            expect(served[seq].change.kind == pb.CHANGE_KIND_DELETE, f"{served[seq]}")
    check("changes: delete for everyone; a retry is the same entry; history and Sync serve "
          "no content", delete)
