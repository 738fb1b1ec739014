"""The documented flows, against the real `starling` binary."""

import os
import shutil
import subprocess
import tempfile
import threading
import time

import groups
from vectors import fail
from wire import Conn, encode_varint, frame_bytes


class Server:
    """`starling serve` on a temporary data directory and ephemeral ports."""

    def __init__(self, binary, pb, config_toml=""):
        self.pb = pb
        self.dir = tempfile.mkdtemp(prefix="starling-conformance-")
        cfg = os.path.join(self.dir, "starling.toml")
        with open(cfg, "w") as f:
            f.write(config_toml)
        self.data = os.path.join(self.dir, "data")
        self.proc = subprocess.Popen(
            [binary, "serve", "--config", cfg, "--data-dir", self.data,
             "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--shards", "2"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            env={**os.environ, "STARLING_LOG": "warn"})
        self.addr, self.ca, self.media, lines = None, None, None, []
        ready = threading.Event()

        def read_stdout():
            for line in self.proc.stdout:
                line = line.strip()
                lines.append(line)
                if line.startswith("listening (TLS 1.3): "):
                    host, port = line.split(": ", 1)[1].rsplit(":", 1)
                    self.addr = (host, int(port))
                elif line.startswith("media (HTTPS): "):
                    host, port = line.split(": ", 1)[1].split(" ")[0].rsplit(":", 1)
                    self.media = (host, int(port))
                elif line.startswith("CA certificate:"):
                    self.ca = line.split(":", 1)[1].strip()
                elif line == "ready":
                    ready.set()

        threading.Thread(target=read_stdout, daemon=True).start()
        if not ready.wait(60) or self.addr is None or self.ca is None:
            self.stop()
            raise RuntimeError(f"the server did not start: {lines}")

    def connect(self, **kw):
        return Conn(self.pb, self.addr, self.ca, **kw)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        # Each data dir preallocates its log segments; leave nothing behind.
        shutil.rmtree(self.dir, ignore_errors=True)

    def otp_code(self, identifier):
        """The last code the development server wrote for `identifier` to <data>/otp.log."""
        with open(os.path.join(self.data, "otp.log")) as f:
            lines = [l.split() for l in f if l.startswith(identifier + " ")]
        if not lines:
            fail(f"no code for {identifier} in otp.log")
        return lines[-1][-1]


def body(frame):
    """(case name, message) of a frame's body."""
    kind = frame.WhichOneof("body")
    return kind, getattr(frame, kind) if kind else None


def expect(cond, why):
    if not cond:
        fail(why)


def expect_error(pb, frame, code_name):
    kind, msg = body(frame)
    expect(kind == "error", f"expected Error {code_name}, got {frame}")
    got = pb.ErrorCode.Name(msg.code)
    expect(got == "ERROR_CODE_" + code_name, f"expected {code_name}, got {got}: {msg.message}")
    return msg


def hello(pb, conn, token=""):
    f = conn.request("hello", pb.Hello(protocol_version=1, access_token=token))
    kind, w = body(f)
    expect(kind == "welcome", f"expected Welcome, got {f}")
    return w


def register(pb, srv, conn, email, name):
    """RequestOtp, the code from otp.log, VerifyOtp: a new user with one device."""
    ident = pb.Identifier(email=email)
    f = conn.request("request_otp", pb.RequestOtp(identifier=ident))
    expect(body(f)[0] == "otp_sent", f"RequestOtp: {f}")
    code = srv.otp_code(email)
    f = conn.request("verify_otp", pb.VerifyOtp(
        identifier=ident, code=code, display_name=name,
        device=pb.DeviceInfo(name="conformance", platform="python")))
    kind, g = body(f)
    expect(kind == "session_granted", f"VerifyOtp: {f}")
    return g


def text(pb, to_user, cmid, words):
    return pb.Send(client_msg_id=cmid, to=pb.Recipient(user_id=to_user),
                   content_type="text/plain", body=words.encode())


def cmid(tag, i):
    return bytes([tag]) * 12 + i.to_bytes(4, "big")


def run_all(pb, binary, check):
    srv = Server(binary, pb, "[accounts]\nargon2_memory_kib = 1024\n")
    try:
        main_flows(pb, srv, check)
    finally:
        srv.stop()
    short = Server(binary, pb, "[accounts]\naccess_token_ttl_ms = 1000\n")
    try:
        check("expired token: Welcome with auth_error TOKEN_EXPIRED, then Refresh in place",
              lambda: expired_token(pb, short))
    finally:
        short.stop()


def main_flows(pb, srv, check):
    s = {}  # state shared by the steps below

    def welcome():
        c = srv.connect()
        c.send(41, "hello", pb.Hello(protocol_version=1))
        f = c.recv()
        kind, w = body(f)
        expect(kind == "welcome", f"{f}")
        expect(f.request_id == 41, "Welcome echoes Hello's request_id")
        expect(not w.HasField("authenticated") and not w.HasField("auth_error"), f"{w}")
        lim = w.limits
        expect(lim.frame_bytes_max >= 1024 and lim.inflight_requests_max > 0
               and 0 < lim.heartbeat_ms < lim.idle_timeout_ms, f"limits {lim}")
        registry = {"messaging", "history", "conversation_list", "block", "password_login",
                    "contact_discovery", "groups", "presence", "typing", "profiles", "media",
                    "e2e_keys", "push"}
        expect(set(w.features) <= registry, f"unknown feature names in {list(w.features)}")
        expect("messaging" in w.features, f"{list(w.features)}")
        s["features"], s["limits"] = list(w.features), lim
        c.close()
        return f"features {list(w.features)}"
    check("Hello/Welcome: request_id echo, limits, features", welcome)

    def request_id_zero():
        c = srv.connect()
        c.send(0, "hello", pb.Hello(protocol_version=1))
        f = c.recv()
        expect(f.request_id == 0, f"{f}")
        expect_error(pb, f, "INVALID_ARGUMENT")
        hello(pb, c)  # still waiting for its Hello
        c.send(0, "get_me", pb.GetMe())
        f = c.recv()
        expect(f.request_id == 0, f"{f}")
        expect_error(pb, f, "INVALID_ARGUMENT")
        c.close()
    check("request_id 0: refused with INVALID_ARGUMENT, not carried out", request_id_zero)

    def first_frame_not_hello():
        c = srv.connect()
        expect_error(pb, c.request("ping", pb.Ping(nonce=1)), "UNEXPECTED_FRAME")
        expect(c.closed(), "the connection stays open")
    check("first frame not Hello: UNEXPECTED_FRAME, closed", first_frame_not_hello)

    def unknown_frame_type():
        c = srv.connect()
        hello(pb, c)
        # request_id 9, then field 999 (a body case this server does not know).
        payload = bytes([0x08, 0x09]) + encode_varint(999 << 3) + bytes([0x01])
        c.send_raw(encode_varint(len(payload)) + payload)
        f = c.recv()
        expect(f.request_id == 9, f"{f}")
        expect_error(pb, f, "UNKNOWN_FRAME_TYPE")
        f = c.request("ping", pb.Ping(nonce=3))
        expect(body(f)[0] == "pong", f"the connection did not stay open: {f}")
        c.close()
    check("unknown frame type: UNKNOWN_FRAME_TYPE, stays open", unknown_frame_type)

    def oversized_frame():
        c = srv.connect()
        hello(pb, c)
        c.send_raw(encode_varint(s["limits"].frame_bytes_max + 1))
        expect_error(pb, c.recv(), "FRAME_TOO_LARGE")
        expect(c.closed(), "the connection stays open")
    check("oversized frame: FRAME_TOO_LARGE, closed", oversized_frame)

    def sign_up():
        a, b = srv.connect(), srv.connect()
        hello(pb, a)
        hello(pb, b)
        s["ga"] = register(pb, srv, a, "ana@conformance.test", "Ana")
        s["gb"] = register(pb, srv, b, "ben@conformance.test", "Ben")
        expect(s["ga"].new_user and s["ga"].access_token and s["ga"].refresh_token, f"{s['ga']}")
        f = a.request("get_me", pb.GetMe())
        expect(body(f)[0] == "profile" and f.profile.user_id == s["ga"].user_id, f"{f}")
        s["a"], s["b"] = a, b
    check("RequestOtp, code from otp.log, VerifyOtp: SessionGranted authenticates", sign_up)

    def ping_pong():
        c = s["a"]
        c.send(77, "ping", pb.Ping(nonce=12345))
        f = c.recv()
        expect(f.request_id == 77 and body(f)[0] == "pong" and f.pong.nonce == 12345, f"{f}")
    check("Ping/Pong: nonce and request_id echoed", ping_pong)

    def invalid_token():
        c = srv.connect()
        w = hello(pb, c, token="not.a.token")
        expect(not w.HasField("authenticated"), f"{w}")
        expect(pb.ErrorCode.Name(w.auth_error.code) == "ERROR_CODE_TOKEN_INVALID", f"{w}")
        expect_error(pb, c.request("get_me", pb.GetMe()), "UNAUTHENTICATED")
        f = c.request("authenticate", pb.Authenticate(access_token=s["ga"].access_token))
        expect(body(f)[0] == "done", f"{f}")
        f = c.request("get_me", pb.GetMe())
        expect(body(f)[0] == "profile", f"{f}")
        c.close()
    check("invalid token: Welcome with auth_error TOKEN_INVALID, then Authenticate", invalid_token)

    def second_device():
        a = s["a"]
        f = a.request("set_password", pb.SetPassword(new_password="correct horse battery"))
        expect(body(f)[0] == "done", f"{f}")
        c = srv.connect()
        hello(pb, c)
        f = c.request("login", pb.Login(
            identifier=pb.Identifier(email="ana@conformance.test"),
            password="correct horse battery",
            device=pb.DeviceInfo(name="second", platform="python")))
        kind, g = body(f)
        expect(kind == "session_granted" and g.user_id == s["ga"].user_id
               and g.device_id != s["ga"].device_id, f"{f}")
        s["a2"], s["ga2"] = c, g
    check("SetPassword, Login with a password: a second device", second_device)

    def send_and_deliver():
        a, a2, b = s["a"], s["a2"], s["b"]
        f, _ = a.call("send", text(pb, s["gb"].user_id, cmid(1, 1), "hello ben"))
        kind, ack = body(f)
        expect(kind == "send_ack" and ack.seq == 1 and not ack.duplicate, f"{f}")
        s["conv"] = ack.conversation_id
        for who, c in (("the peer", b), ("the sender's other device", a2)):
            f, before = c.until(lambda f: body(f)[0] == "deliver")
            expect(f.request_id == 0, f"{who}: {f}")
            m = f.deliver.message
            expect((m.seq, m.sender_user_id, m.sender_device_id, m.body)
                   == (1, s["ga"].user_id, s["ga"].device_id, b"hello ben"), f"{who}: {m}")
            expect(not any(body(x)[0] == "send_ack" for x in before), f"{who}: {before}")
        # A retry with the same client_msg_id is answered from dedup.
        f, _ = a.call("send", text(pb, s["gb"].user_id, cmid(1, 1), "hello ben"))
        expect(f.send_ack.seq == 1 and f.send_ack.duplicate, f"{f}")
    check("Send/SendAck, Deliver to the peer and to the sender's other device", send_and_deliver)

    def cursors_and_receipts():
        a, b, conv = s["a"], s["b"], s["conv"]
        for kind, msg, receipt in (
                ("delivery_ack", pb.DeliveryAck(conversation_id=conv, up_to_seq=1),
                 pb.RECEIPT_KIND_DELIVERED),
                ("read_cursor", pb.ReadCursor(conversation_id=conv, up_to_seq=1),
                 pb.RECEIPT_KIND_READ)):
            f, _ = b.call(kind, msg)
            expect(body(f)[0] == "done", f"{kind}: {f}")
            f, _ = a.until(lambda f: body(f)[0] == "receipt" and f.receipt.kind == receipt)
            r = f.receipt
            expect((r.conversation_id, r.up_to_seq, r.by_user_id) == (conv, 1, s["gb"].user_id),
                   f"{r}")
    check("DeliveryAck/ReadCursor answered Done, Receipt to the sender", cursors_and_receipts)

    def sync():
        a2, conv = s["a2"], s["conv"]
        f, before = a2.call("sync", pb.Sync(last_seq={conv: 0}))
        kind, done = body(f)
        expect(kind == "sync_done", f"{f}")
        mine = [x for x in before if x.request_id == f.request_id]
        msgs = [x.deliver.message.seq for x in mine if body(x)[0] == "deliver"]
        receipts = {(x.receipt.by_user_id, x.receipt.kind, x.receipt.up_to_seq)
                    for x in mine if body(x)[0] == "receipt"}
        expect(msgs == [1] and done.messages == 1, f"messages {msgs}, {done}")
        expect((s["gb"].user_id, pb.RECEIPT_KIND_READ, 1) in receipts, f"{receipts}")
        expect((s["gb"].user_id, pb.RECEIPT_KIND_DELIVERED, 1) in receipts, f"{receipts}")
        expect(done.receipts == len(receipts), f"{done} vs {receipts}")
        # The caller's own read cursor comes too.
        f, _ = s["a"].call("read_cursor", pb.ReadCursor(conversation_id=conv, up_to_seq=1))
        expect(body(f)[0] == "done", f"{f}")
        f, before = s["b"].call("sync", pb.Sync())
        receipts = {(x.receipt.by_user_id, x.receipt.kind) for x in before
                    if x.request_id == f.request_id and body(x)[0] == "receipt"}
        expect((s["gb"].user_id, pb.RECEIPT_KIND_READ) in receipts, f"{receipts}")
        expect((s["ga"].user_id, pb.RECEIPT_KIND_READ) in receipts, f"{receipts}")
    check("Sync: messages, receipts (the caller's read cursor included), SyncDone", sync)

    def history():
        a, gb = s["a"], s["gb"]
        rids = []
        for i in range(2, 231):  # seqs 2..230, pipelined within the in-flight limit
            rid = a.new_id()
            a.send(rid, "send", text(pb, gb.user_id, cmid(2, i), f"message {i}"))
            rids.append(rid)
            if len(rids) == s["limits"].inflight_requests_max or i == 230:
                while rids:
                    f = a.recv()
                    if f.request_id in rids:
                        expect(body(f)[0] == "send_ack", f"{f}")
                        rids.remove(f.request_id)
        conv = s["conv"]
        f, _ = a.call("get_history", pb.GetHistory(conversation_id=conv))
        page = f.history_page
        expect([m.seq for m in page.messages] == list(range(181, 231)) and page.has_more,
               f"default page: {[m.seq for m in page.messages]}")
        f, _ = a.call("get_history", pb.GetHistory(conversation_id=conv, after_seq=0, limit=1000))
        page = f.history_page
        expect(len(page.messages) == 200 and page.messages[0].seq == 1 and page.has_more,
               f"capped page: {len(page.messages)}")
        f, _ = a.call("get_history", pb.GetHistory(conversation_id=conv, before_seq=3, limit=10))
        page = f.history_page
        expect([m.seq for m in page.messages] == [1, 2] and not page.has_more, f"{page}")
        return "default 50, at most 200, paging both ways"
    check("GetHistory: paging and limits", history)

    def conversation_list():
        f, _ = s["b"].call("list_conversations", pb.ListConversations())
        kind, lst = body(f)
        expect(kind == "conversation_list" and len(lst.conversations) == 1, f"{f}")
        c = lst.conversations[0]
        expect((c.conversation_id, c.kind, c.peer_user_id, c.last_seq)
               == (s["conv"], pb.CONVERSATION_KIND_DIRECT, s["ga"].user_id, 230), f"{c}")
    check("ListConversations", conversation_list)

    def block_unblock():
        a, b = s["a"], s["b"]
        f, _ = b.call("block", pb.Block(user_id=s["ga"].user_id))
        expect(body(f)[0] == "done", f"{f}")
        f, _ = a.call("send", text(pb, s["gb"].user_id, cmid(3, 1), "blocked?"))
        expect_error(pb, f, "BLOCKED")
        f, _ = b.call("unblock", pb.Unblock(user_id=s["ga"].user_id))
        expect(body(f)[0] == "done", f"{f}")
        f, _ = a.call("send", text(pb, s["gb"].user_id, cmid(3, 2), "unblocked"))
        expect(body(f)[0] == "send_ack", f"{f}")
    check("Block/Unblock", block_unblock)

    def not_supported():
        expect("media" not in s["features"], "this server offers media now: pick another")
        f, _ = s["a"].call("request_upload", pb.RequestUpload(content_type="image/png",
                                                               size_bytes=10))
        e = expect_error(pb, f, "NOT_SUPPORTED")
        expect(e.retry_after_ms == 0, f"{e}")
        expect("media" in e.message and "not implemented" not in e.message, e.message)
    check("NOT_SUPPORTED for a feature not in Welcome.features", not_supported)

    def inflight_limit():
        a, gb, limit = s["a"], s["gb"], s["limits"].inflight_requests_max
        n = limit + 20
        frames, ids = b"", {}
        for i in range(n):
            rid = a.new_id()
            ids[rid] = cmid(4, i)
            frames += frame_bytes(a.frame(rid, "send", text(pb, gb.user_id, ids[rid], "burst")))
        a.send_raw(frames)  # one write: the server reads them before answering any
        acked, refused = set(), 0
        while len(ids) > 0:
            f = a.recv()
            if f.request_id not in ids:
                continue
            sent = ids.pop(f.request_id)
            kind, msg = body(f)
            if kind == "send_ack":
                acked.add(sent)
            else:
                expect_error(pb, f, "TOO_MANY_IN_FLIGHT")
                refused += 1
        expect(refused >= 1 and len(acked) >= limit, f"{len(acked)} acked, {refused} refused")
        stored = set()
        after = 0
        while True:
            f, _ = a.call("get_history",
                          pb.GetHistory(conversation_id=s["conv"], after_seq=after, limit=200))
            page = f.history_page
            stored |= {m.client_msg_id for m in page.messages}
            if not page.has_more or not page.messages:
                break
            after = page.messages[-1].seq
        burst = {cmid(4, i) for i in range(n)}
        expect(stored & burst == acked, "refused Sends were carried out")
        return f"{len(acked)} acked, {refused} refused of {n} in one write (limit {limit})"
    check("in-flight limit: the excess gets TOO_MANY_IN_FLIGHT and is not carried out",
          inflight_limit)

    groups.flows(pb, srv, s, check)

    for k in ("a", "a2", "b"):
        if k in s:
            s[k].close()


def expired_token(pb, srv):
    c = srv.connect()
    hello(pb, c)
    g = register(pb, srv, c, "eve@conformance.test", "Eve")
    c.close()
    time.sleep(2.2)  # the access token lives 1 s
    c = srv.connect()
    w = hello(pb, c, token=g.access_token)
    expect(not w.HasField("authenticated"), f"{w}")
    expect(pb.ErrorCode.Name(w.auth_error.code) == "ERROR_CODE_TOKEN_EXPIRED", f"{w}")
    f = c.request("refresh", pb.Refresh(refresh_token=g.refresh_token))
    kind, g2 = body(f)
    expect(kind == "session_granted" and g2.user_id == g.user_id, f"{f}")
    f = c.request("get_me", pb.GetMe())
    expect(body(f)[0] == "profile", f"not authenticated after Refresh: {f}")
    c.close()
