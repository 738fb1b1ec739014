"""The end-to-end key directory, against the real `starling` binary (see protocol/README.md,
"End-to-end key directory"): UploadKeys with an Ed25519-signed prekey and its refusals,
FetchKeyBundles taking one one-time prekey per fetch (lowest key id first, none twice, then
the signed prekey only) and none with list_only, the visibility rule, the low-stock
PrekeyCount push, and DeviceListChanged when a peer signs in a new device.

Ed25519 signing (RFC 8032) is written out below from the RFC, so that the suite needs no
crypto package; the server checks the signature with its own implementation."""

import hashlib
import os
import time

from flows import Server, body, expect, expect_error, hello, register, text, cmid

# ------------------------------------------------------------------ Ed25519 (RFC 8032, §5.1)
P = 2 ** 255 - 19
L = 2 ** 252 + 27742317777372353535851937790883648493
D = -121665 * pow(121666, P - 2, P) % P


def _recover_x(y, sign):
    x2 = (y * y - 1) * pow(D * y * y + 1, P - 2, P) % P
    x = pow(x2, (P + 3) // 8, P)
    if (x * x - x2) % P != 0:
        x = x * pow(2, (P - 1) // 4, P) % P
    return P - x if x % 2 != sign else x


_GY = 4 * pow(5, P - 2, P) % P
_GX = _recover_x(_GY, 0)
_G = (_GX, _GY, 1, _GX * _GY % P)


def _add(a, b):
    A = (a[1] - a[0]) * (b[1] - b[0]) % P
    B = (a[1] + a[0]) * (b[1] + b[0]) % P
    C = 2 * a[3] * b[3] * D % P
    E = 2 * a[2] * b[2] % P
    e, f, g, h = B - A, E - C, E + C, B + A
    return (e * f % P, g * h % P, f * g % P, e * h % P)


def _mul(s, pt):
    q = (0, 1, 1, 0)
    while s:
        if s & 1:
            q = _add(q, pt)
        pt, s = _add(pt, pt), s >> 1
    return q


def _compress(pt):
    zi = pow(pt[2], P - 2, P)
    x, y = pt[0] * zi % P, pt[1] * zi % P
    return (y | (x & 1) << 255).to_bytes(32, "little")


def _expand(secret):
    h = hashlib.sha512(secret).digest()
    a = int.from_bytes(h[:32], "little") & ((1 << 254) - 8) | (1 << 254)
    return a, h[32:]


def ed25519_public(secret):
    return _compress(_mul(_expand(secret)[0], _G))


def ed25519_sign(secret, msg):
    a, prefix = _expand(secret)
    pub = _compress(_mul(a, _G))
    r = int.from_bytes(hashlib.sha512(prefix + msg).digest(), "little") % L
    big_r = _compress(_mul(r, _G))
    k = int.from_bytes(hashlib.sha512(big_r + pub + msg).digest(), "little") % L
    return big_r + ((r + k * a) % L).to_bytes(32, "little")


# RFC 8032 §7.1, test 1: the helper is right before the server is asked anything.
_SK = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
assert ed25519_public(_SK).hex() == \
    "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
assert ed25519_sign(_SK, b"").hex() == (
    "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bac"
    "c61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b")


# ------------------------------------------------------------------ flows

def upload(pb, secret, first, n, spk=b"\x5a" * 32):
    """A full UploadKeys: identity, signed prekey (signed over its 32 bytes), n one-time
    prekeys with ids first.. (32 bytes each; the server checks only their length)."""
    return pb.UploadKeys(
        identity_key=ed25519_public(secret), registration_id=7,
        signed_prekey=pb.SignedPrekey(key_id=1, public_key=spk,
                                      signature=ed25519_sign(secret, spk)),
        one_time_prekeys=[pb.OneTimePrekey(key_id=i, public_key=i.to_bytes(32, "big"))
                          for i in range(first, first + n)])


def run_all(pb, binary, check):
    srv = Server(binary, pb, "[accounts]\nargon2_memory_kib = 1024\n"
                             "[keys]\nlow_stock_threshold = 3\n")
    try:
        flows(pb, srv, check)
    finally:
        srv.stop()


def flows(pb, srv, check):
    s = {"secret": os.urandom(32)}

    def setup():
        a, b, c = srv.connect(), srv.connect(), srv.connect()
        w = hello(pb, a)
        expect("e2e_keys" in w.features, f"e2e_keys not in {list(w.features)}")
        hello(pb, b)
        hello(pb, c)
        s["a"], s["ga"] = a, register(pb, srv, a, "ana@keys.test", "Ana")
        s["b"], s["gb"] = b, register(pb, srv, b, "ben@keys.test", "Ben")
        s["c"], s["gc"] = c, register(pb, srv, c, "cy@keys.test", "Cy")
    check("keys: Welcome lists e2e_keys", setup)

    def uploads():
        a, secret = s["a"], s["secret"]
        f, _ = a.call("upload_keys", pb.UploadKeys())
        expect(body(f)[0] == "prekey_count" and f.prekey_count.one_time_prekeys == 0, f"{f}")
        bad = upload(pb, secret, 1, 1)
        bad.signed_prekey.public_key = b"\x5b" * 32
        f, _ = a.call("upload_keys", bad)
        expect_error(pb, f, "INVALID_ARGUMENT")
        f, _ = a.call("upload_keys", upload(pb, secret, 1, 101))
        expect_error(pb, f, "INVALID_ARGUMENT")
        short = upload(pb, secret, 1, 1)
        short.identity_key = b"\x01" * 31
        f, _ = a.call("upload_keys", short)
        expect_error(pb, f, "INVALID_ARGUMENT")
        f, _ = a.call("upload_keys", upload(pb, secret, 1, 5))
        expect(body(f)[0] == "prekey_count" and f.prekey_count.one_time_prekeys == 5, f"{f}")
        clash = upload(pb, secret, 1, 1)
        clash.one_time_prekeys[0].public_key = b"\xee" * 32
        f, _ = a.call("upload_keys", clash)
        expect_error(pb, f, "ALREADY_EXISTS")
    check("keys: UploadKeys verifies the Ed25519 signature, lengths and counts; "
          "answers PrekeyCount", uploads)

    def fetches():
        a, b, c, ga = s["a"], s["b"], s["c"], s["ga"]
        fetch = pb.FetchKeyBundles(user_id=ga.user_id)
        f, _ = b.call("fetch_key_bundles", fetch)
        expect(body(f)[0] == "key_bundles" and len(f.key_bundles.bundles) == 0,
               f"nothing shared yet, no bundle: {f}")
        f, _ = b.call("send", text(pb, ga.user_id, cmid(11, 1), "hi"))
        expect(body(f)[0] == "send_ack", f"{f}")
        got = []
        for _ in range(7):
            f, _ = b.call("fetch_key_bundles", fetch)
            bundles = f.key_bundles.bundles
            expect(len(bundles) == 1, f"{f}")
            k = bundles[0]
            expect(k.identity_key == ed25519_public(s["secret"]) and k.registration_id == 7
                   and k.signed_prekey.signature == ed25519_sign(s["secret"], b"\x5a" * 32),
                   f"{k}")
            got.append(k.one_time_prekey.key_id if k.HasField("one_time_prekey") else None)
        expect(got == [1, 2, 3, 4, 5, None, None], f"handed out {got}")
        f, _ = c.call("fetch_key_bundles", fetch)
        expect(len(f.key_bundles.bundles) == 0, f"cy shares nothing with ana: {f}")
        # 5 → 2 crossed the threshold of 3 once: one PrekeyCount push to Ana's device.
        time.sleep(0.4)
        f, before = a.call("ping", pb.Ping(nonce=5))
        pushes = [p for p in before if body(p)[0] == "prekey_count"]
        expect(len(pushes) == 1 and pushes[0].request_id == 0
               and pushes[0].prekey_count.one_time_prekeys == 2, f"{before}")
    check("keys: FetchKeyBundles takes one one-time prekey each, then the signed prekey only; "
          "one low-stock PrekeyCount push", fetches)

    def list_only():
        a, b, c, ga = s["a"], s["b"], s["c"], s["ga"]
        f, _ = a.call("upload_keys", pb.UploadKeys(one_time_prekeys=[
            pb.OneTimePrekey(key_id=i, public_key=i.to_bytes(32, "big")) for i in (20, 21)]))
        expect(f.prekey_count.one_time_prekeys == 2, f"{f}")
        listing = pb.FetchKeyBundles(user_id=ga.user_id, list_only=True)
        for _ in range(3):
            f, _ = b.call("fetch_key_bundles", listing)
            bundles = f.key_bundles.bundles
            expect(len(bundles) == 1 and not bundles[0].HasField("one_time_prekey")
                   and bundles[0].identity_key == ed25519_public(s["secret"])
                   and bundles[0].HasField("signed_prekey"), f"{f}")
        f, _ = c.call("fetch_key_bundles", listing)
        expect(len(f.key_bundles.bundles) == 0, f"cy shares nothing with ana: {f}")
        f, _ = a.call("upload_keys", pb.UploadKeys())
        expect(f.prekey_count.one_time_prekeys == 2, f"a listing takes nothing: {f}")
        device = bundles[0].device_id
        f, _ = b.call("fetch_key_bundles",
                      pb.FetchKeyBundles(user_id=ga.user_id, device_ids=[device]))
        k = f.key_bundles.bundles
        expect(len(k) == 1 and k[0].one_time_prekey.key_id == 20, f"{f}")
        f, _ = b.call("fetch_key_bundles", pb.FetchKeyBundles(user_id=0, list_only=True))
        expect_error(pb, f, "INVALID_ARGUMENT")
    check("keys: FetchKeyBundles with list_only lists the devices and takes no one-time "
          "prekey; device_ids then claim one", list_only)

    def device_list_changed():
        b, ga = s["b"], s["ga"]
        a2 = srv.connect()
        hello(pb, a2)
        g2 = register(pb, srv, a2, "ana@keys.test", "Ana")
        f, _ = b.until(lambda f: body(f)[0] == "device_list_changed"
                       and f.device_list_changed.user_id == ga.user_id)
        expect(f.request_id == 0 and list(f.device_list_changed.added_device_ids)
               == [g2.device_id], f"{f}")
        a2.close()
    check("keys: a peer's new device is pushed as DeviceListChanged", device_list_changed)
