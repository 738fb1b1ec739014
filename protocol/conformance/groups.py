"""The documented group flows (protocol/README.md, "Groups"), against the real server: every
group request, events delivered as Messages with group_changed (live, by Sync, in history),
who sees what after joining and leaving, and the refusals."""

import group_receipts
from vectors import fail

GROUP_BIT = 1 << 63
EVENT_PREFIX = b"\xffSTRLGRP"


def _body(frame):
    kind = frame.WhichOneof("body")
    return kind, getattr(frame, kind) if kind else None


def _expect(cond, why):
    if not cond:
        fail(why)


def _error(pb, frame, code_name):
    kind, msg = _body(frame)
    _expect(kind == "error", f"expected Error {code_name}, got {frame}")
    got = pb.ErrorCode.Name(msg.code)
    _expect(got == "ERROR_CODE_" + code_name, f"expected {code_name}, got {got}: {msg.message}")
    return msg


def _info(frame):
    kind, info = _body(frame)
    _expect(kind == "group_info", f"expected GroupInfo, got {frame}")
    return info


def _event(pb, c, seq, conv):
    """The next pushed Deliver of `conv` on `c`, which must be the group event at `seq`."""
    f, _ = c.until(lambda f: _body(f)[0] == "deliver" and f.request_id == 0
                   and f.deliver.message.conversation_id == conv)
    m = f.deliver.message
    _expect(m.seq == seq and m.HasField("group_changed"), f"expected the event at {seq}: {m}")
    _expect(m.client_msg_id.startswith(EVENT_PREFIX) and m.sender_device_id == 0
            and not m.body and not m.content_type, f"an event's fields: {m}")
    return m


def _kind(pb, m):
    return pb.GroupChangeKind.Name(m.group_changed.kind) if m.HasField("group_changed") else None


def _to_group(pb, conv, cmid, words):
    return pb.Send(client_msg_id=cmid, to=pb.Recipient(conversation_id=conv),
                   content_type="text/plain", body=words.encode())


def flows(pb, srv, s, check):
    """`s` holds the main flows' users: a and a2 (Ana's two devices), b (Ben)."""
    g = {}

    def features():
        _expect("groups" in s["features"], f"groups not offered: {s['features']}")
    check("groups: Welcome.features lists groups", features)

    def create():
        a, a2, b = s["a"], s["a2"], s["b"]
        ana, ben = s["ga"].user_id, s["gb"].user_id
        f, _ = a.call("create_group", pb.CreateGroup(name="Climbing", member_user_ids=[ben]))
        info = _info(f)
        _expect(info.conversation_id & GROUP_BIT and info.version == 1, f"{info}")
        _expect([(m.user_id, pb.GroupRole.Name(m.role)) for m in info.members]
                == [(ana, "GROUP_ROLE_ADMIN"), (ben, "GROUP_ROLE_MEMBER")], f"{info}")
        g["conv"] = conv = info.conversation_id
        for c in (a2, b):
            m = _event(pb, c, 1, conv)
            ev = m.group_changed
            _expect(_kind(pb, m) == "GROUP_CHANGE_KIND_CREATED" and list(ev.user_ids) == [ana, ben]
                    and ev.by_user_id == ana and not ev.group.members, f"{m}")
    check("groups: CreateGroup answers GroupInfo; the CREATED event is seq 1, pushed", create)

    def read_and_send():
        a, a2, b, conv = s["a"], s["a2"], s["b"], g["conv"]
        f, _ = b.call("get_group_info", pb.GetGroupInfo(conversation_id=conv))
        _expect(_info(f).name == "Climbing", f"{f}")
        f, _ = a.call("send", _to_group(pb, conv, b"\x07" * 16, "hi group"))
        _expect(_body(f)[0] == "send_ack" and f.send_ack.seq == 2, f"{f}")
        for c in (a2, b):
            f, _ = c.until(lambda f: _body(f)[0] == "deliver"
                           and f.deliver.message.conversation_id == conv)
            _expect(f.deliver.message.seq == 2, f"{f}")
        f, _ = a.call("send", _to_group(pb, conv, EVENT_PREFIX + b"\x00" * 8, "spoof"))
        _error(pb, f, "INVALID_ARGUMENT")
    check("groups: GetGroupInfo, Send to the group, the event id prefix is reserved",
          read_and_send)

    if "conv" in g:
        group_receipts.flows(pb, s, g["conv"], 2, check)
    else:
        # Reported as one failure, not a crash of the whole suite.
        check("group receipts: not run, CreateGroup failed above",
              lambda: _expect(False, "no group"))

    def refusals():
        a, b, conv = s["a"], s["b"], g["conv"]
        ben = s["gb"].user_id
        f, _ = b.call("add_group_members", pb.AddGroupMembers(conversation_id=conv,
                                                              user_ids=[s["ga"].user_id]))
        _error(pb, f, "PERMISSION_DENIED")
        f, _ = b.call("update_group", pb.UpdateGroup(conversation_id=conv, name="x"))
        _error(pb, f, "PERMISSION_DENIED")
        f, _ = a.call("get_group_info", pb.GetGroupInfo(conversation_id=GROUP_BIT | 4242))
        _error(pb, f, "NOT_FOUND")
        f, _ = a.call("get_group_info", pb.GetGroupInfo(conversation_id=0))
        _error(pb, f, "INVALID_ARGUMENT")
        f, _ = a.call("add_group_members", pb.AddGroupMembers(conversation_id=conv,
                                                              user_ids=[99_999_999]))
        _error(pb, f, "NOT_FOUND")
        f, _ = a.call("update_group", pb.UpdateGroup(conversation_id=conv))
        _error(pb, f, "INVALID_ARGUMENT")
        e = _error(pb, a.call("leave_group", pb.LeaveGroup(conversation_id=conv))[0],
                   "PERMISSION_DENIED")
        _expect("SetGroupRole" in e.message, e.message)
        f, _ = a.call("set_group_role", pb.SetGroupRole(conversation_id=conv, user_id=ben,
                                                        role=pb.GROUP_ROLE_UNSPECIFIED))
        _error(pb, f, "INVALID_ARGUMENT")
    check("groups: refusals (admins only, no such group, bad arguments, the last admin)",
          refusals)

    def role_update_only_admins():
        a, b, conv = s["a"], s["b"], g["conv"]
        ben = s["gb"].user_id
        f, _ = a.call("set_group_role", pb.SetGroupRole(conversation_id=conv, user_id=ben,
                                                        role=pb.GROUP_ROLE_ADMIN))
        _expect(_info(f).version == 2, f"{f}")
        m = _event(pb, b, 3, conv)
        _expect(_kind(pb, m) == "GROUP_CHANGE_KIND_ROLE_CHANGED"
                and m.group_changed.role == pb.GROUP_ROLE_ADMIN, f"{m}")
        f, _ = a.call("set_group_role", pb.SetGroupRole(conversation_id=conv, user_id=ben,
                                                        role=pb.GROUP_ROLE_MEMBER))
        _event(pb, b, 4, conv)
        f, _ = a.call("update_group", pb.UpdateGroup(conversation_id=conv, name="Crag",
                                                     only_admins_send=True))
        info = _info(f)
        _expect(info.only_admins_send and info.name == "Crag", f"{info}")
        m = _event(pb, b, 5, conv)
        _expect(_kind(pb, m) == "GROUP_CHANGE_KIND_UPDATED", f"{m}")
        f, _ = b.call("send", _to_group(pb, conv, b"\x08" * 16, "may I?"))
        _error(pb, f, "PERMISSION_DENIED")
    check("groups: SetGroupRole, UpdateGroup, only admins send", role_update_only_admins)

    def remove_then_nothing():
        a, b, conv = s["a"], s["b"], g["conv"]
        ben = s["gb"].user_id
        f, _ = a.call("remove_group_members",
                      pb.RemoveGroupMembers(conversation_id=conv, user_ids=[ben]))
        _expect([m.user_id for m in _info(f).members] == [s["ga"].user_id], f"{f}")
        m = _event(pb, b, 6, conv)
        _expect(_kind(pb, m) == "GROUP_CHANGE_KIND_MEMBERS_REMOVED", f"{m}")
        f, _ = a.call("send", _to_group(pb, conv, b"\x09" * 16, "after ben"))
        _expect(f.send_ack.seq == 7, f"{f}")
        # Ben's Sync and history end at his removal; the list still shows the group.
        f, before = b.call("sync", pb.Sync())
        seqs = [x.deliver.message.seq for x in before
                if _body(x)[0] == "deliver" and x.request_id == f.request_id
                and x.deliver.message.conversation_id == conv]
        _expect(seqs == [1, 2, 3, 4, 5, 6], f"Sync gave {seqs}")
        f, _ = b.call("get_history", pb.GetHistory(conversation_id=conv))
        _expect([m.seq for m in f.history_page.messages] == [1, 2, 3, 4, 5, 6], f"{f}")
        f, _ = b.call("list_conversations", pb.ListConversations())
        line = [c for c in f.conversation_list.conversations if c.conversation_id == conv]
        _expect(line and line[0].last_seq == 6 and line[0].title == "Crag"
                and pb.ConversationKind.Name(line[0].kind) == "CONVERSATION_KIND_GROUP", f"{f}")
        f, _ = b.call("get_group_info", pb.GetGroupInfo(conversation_id=conv))
        _error(pb, f, "NOT_A_MEMBER")
    check("groups: RemoveGroupMembers; the removed member reads up to its removal only",
          remove_then_nothing)

    def add_then_from_join():
        a, b, conv = s["a"], s["b"], g["conv"]
        ben = s["gb"].user_id
        f, _ = a.call("add_group_members", pb.AddGroupMembers(conversation_id=conv,
                                                              user_ids=[ben]))
        _expect(len(_info(f).members) == 2, f"{f}")
        m = _event(pb, b, 8, conv)
        _expect(_kind(pb, m) == "GROUP_CHANGE_KIND_MEMBERS_ADDED"
                and list(m.group_changed.user_ids) == [ben], f"{m}")
        f, _ = b.call("get_history", pb.GetHistory(conversation_id=conv))
        _expect([m.seq for m in f.history_page.messages] == [8], f"history before the join: {f}")
        f, _ = a.call("set_group_role", pb.SetGroupRole(conversation_id=conv, user_id=ben,
                                                        role=pb.GROUP_ROLE_ADMIN))
        _event(pb, b, 9, conv)
        f, _ = a.call("leave_group", pb.LeaveGroup(conversation_id=conv))
        _expect(_body(f)[0] == "done", f"{f}")
        m = _event(pb, b, 10, conv)
        _expect(_kind(pb, m) == "GROUP_CHANGE_KIND_MEMBER_LEFT", f"{m}")
    check("groups: AddGroupMembers (history from the join), LeaveGroup answered Done",
          add_then_from_join)
