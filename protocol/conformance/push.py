"""RegisterPushToken / UnregisterPushToken against the real `starling` binary: Done for each
platform's documented token form, INVALID_ARGUMENT for malformed ones (see
protocol/README.md, "Push notifications")."""

import base64
import json

from flows import Server, body, expect, expect_error, hello, register

# The generator of P-256, uncompressed (0x04 || x || y): a point on the curve.
P256_G = bytes.fromhex(
    "04"
    "6B17D1F2E12C4247F8BCE6E563A440F277037D812DEB33A0F4A13945D898C296"
    "4FE342E2FE1A7F9B8EE7EB4A7C0F9E162BCE33576B315ECECBB6406837BF51F5")


def b64url(b):
    return base64.urlsafe_b64encode(b).decode().rstrip("=")


def run_all(pb, binary, check):
    srv = Server(binary, pb, "[accounts]\nargon2_memory_kib = 1024\n")
    try:
        flows(pb, srv, check)
    finally:
        srv.stop()


def flows(pb, srv, check):
    s = {}

    def setup():
        a = srv.connect()
        w = hello(pb, a)
        expect("push" in w.features, f"push not in {list(w.features)}")
        s["a"], s["g"] = a, register(pb, srv, a, "ana@push.test", "Ana")
    check("push: Welcome lists push", setup)

    def done(req):
        f, _ = s["a"].call("register_push_token", req)
        expect(body(f)[0] == "done", f"{req}: {f}")

    def register_each_platform():
        done(pb.RegisterPushToken(platform=pb.PUSH_PLATFORM_FCM, token="dX:APA91b-token"))
        done(pb.RegisterPushToken(platform=pb.PUSH_PLATFORM_APNS, token="AB" * 32,
                                  app_id="org.example.chat", sandbox=True))
        sub = {"endpoint": "https://push.example.net/w/1", "expirationTime": None,
               "keys": {"p256dh": b64url(P256_G), "auth": b64url(bytes(range(16)))}}
        done(pb.RegisterPushToken(platform=pb.PUSH_PLATFORM_WEB_PUSH, token=json.dumps(sub)))
    check("push: RegisterPushToken answers Done for APNs, FCM and Web Push", register_each_platform)

    def refused():
        cases = [
            (pb.RegisterPushToken(platform=pb.PUSH_PLATFORM_UNSPECIFIED, token="x"), "platform"),
            (pb.RegisterPushToken(platform=pb.PUSH_PLATFORM_FCM, token=""), "empty"),
            (pb.RegisterPushToken(platform=pb.PUSH_PLATFORM_APNS, token="AB" * 32), "app_id"),
            (pb.RegisterPushToken(platform=pb.PUSH_PLATFORM_FCM, token="x", sandbox=True),
             "sandbox"),
            (pb.RegisterPushToken(platform=pb.PUSH_PLATFORM_WEB_PUSH, token=json.dumps(
                {"endpoint": "https://push.example.net/w",
                 "keys": {"p256dh": b64url(b"\x04" * 65), "auth": b64url(bytes(16))}})),
             "p256dh"),
        ]
        for req, field in cases:
            f, _ = s["a"].call("register_push_token", req)
            e = expect_error(pb, f, "INVALID_ARGUMENT")
            expect(field in e.message, f"{field}: {e.message}")
    check("push: malformed tokens are INVALID_ARGUMENT naming the field", refused)

    def unregister():
        for _ in range(2):
            f, _ = s["a"].call("unregister_push_token", pb.UnregisterPushToken())
            expect(body(f)[0] == "done", f"{f}")
    check("push: UnregisterPushToken answers Done (also with no token)", unregister)
