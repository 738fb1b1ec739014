"""Media (protocol/README.md, "Media"), against the real `starling` binary with its media
endpoint: RequestUpload, the PUT with the grant's headers, a Send naming the object, Deliver
carrying the MediaRef, RequestDownload by the recipient, the GET (whole and by Range), and the
refusals: a tampered URL, a type not allowed, a non-member, media never uploaded."""

import hashlib
import http.client
import ssl
from urllib.parse import urlsplit

from flows import Server, body, expect, expect_error, hello, register, cmid


def run_all(pb, binary, check):
    srv = Server(binary, pb, "[accounts]\nargon2_memory_kib = 1024\n"
                             "[media]\nlisten = \"127.0.0.1:0\"\n"
                             "content_types = [\"image/png\"]\n")
    try:
        flows(pb, srv, check)
    finally:
        srv.stop()


def https(srv, method, url, headers=None, data=b""):
    """One request to the media endpoint (trusting the server's development CA): (status,
    headers, body)."""
    ctx = ssl.create_default_context(cafile=srv.ca)
    u = urlsplit(url)
    conn = http.client.HTTPSConnection(u.hostname, u.port, context=ctx, timeout=30)
    # The development certificate names localhost and 127.0.0.1.
    path = u.path + ("?" + u.query if u.query else "")
    conn.request(method, path, body=data or None, headers=headers or {})
    r = conn.getresponse()
    out = (r.status, dict(r.getheaders()), r.read())
    conn.close()
    return out


def flows(pb, srv, check):
    s = {}
    blob = bytes(range(256)) * 64

    def setup():
        a, b, c = srv.connect(), srv.connect(), srv.connect()
        w = hello(pb, a)
        expect("media" in w.features, f"media not in {list(w.features)}")
        hello(pb, b)
        hello(pb, c)
        s["a"], s["ga"] = a, register(pb, srv, a, "ana@media.test", "Ana")
        s["b"], s["gb"] = b, register(pb, srv, b, "ben@media.test", "Ben")
        s["c"], s["gc"] = c, register(pb, srv, c, "cy@media.test", "Cy")
    check("media: Welcome lists media", setup)

    def upload():
        a = s["a"]
        sha = hashlib.sha256(blob).digest()
        f, _ = a.call("request_upload", pb.RequestUpload(
            content_type="text/html", size_bytes=len(blob), sha256=sha))
        expect_error(pb, f, "INVALID_ARGUMENT")
        f, _ = a.call("request_upload", pb.RequestUpload(
            content_type="image/png", size_bytes=len(blob), sha256=sha))
        kind, g = body(f)
        expect(kind == "upload_grant", f"{f}")
        expect(g.media_id == sha.hex() and g.method == "PUT", f"{g}")
        expect(dict(g.headers) == {"content-type": "image/png",
                                   "content-length": str(len(blob))}, f"{g.headers}")
        tampered = g.upload_url.replace("size=", "size=1")
        status, _, _ = https(srv, "PUT", tampered, dict(g.headers), blob)
        expect(status == 403, f"tampered URL: {status}")
        status, _, text = https(srv, "PUT", g.upload_url, dict(g.headers), blob)
        expect(status == 201, f"upload: {status} {text}")
        s["media"] = pb.MediaRef(media_id=g.media_id, content_type="image/png",
                                 size_bytes=len(blob), sha256=sha, file_name="blob.png")
    check("media: RequestUpload, PUT with the grant's headers (tampered URL: 403)", upload)

    def send_and_deliver():
        a, b, gb = s["a"], s["b"], s["gb"]
        ghost = pb.MediaRef()
        ghost.CopyFrom(s["media"])
        ghost.media_id = "ab" * 32
        f, _ = a.call("send", pb.Send(client_msg_id=cmid(7, 2), to=pb.Recipient(
            user_id=gb.user_id), content_type="text/plain", body=b"", media=ghost))
        expect_error(pb, f, "NOT_FOUND")
        f, _ = a.call("send", pb.Send(client_msg_id=cmid(7, 1), to=pb.Recipient(
            user_id=gb.user_id), content_type="text/plain", body=b"see", media=s["media"]))
        expect(body(f)[0] == "send_ack", f"{f}")
        s["conv"], s["seq"] = f.send_ack.conversation_id, f.send_ack.seq
        f, _ = b.until(lambda f: body(f)[0] == "deliver")
        expect(f.deliver.message.media == s["media"], f"{f}")
    check("media: Send names the object, Deliver carries the MediaRef (unknown media: "
          "NOT_FOUND)", send_and_deliver)

    def download():
        b, c = s["b"], s["c"]
        req = pb.RequestDownload(media_id=s["media"].media_id, conversation_id=s["conv"],
                                 seq=s["seq"])
        f, _ = c.call("request_download", req)
        expect_error(pb, f, "NOT_A_MEMBER")
        f, _ = b.call("request_download", req)
        kind, g = body(f)
        expect(kind == "download_grant", f"{f}")
        status, _, data = https(srv, "GET", g.download_url)
        expect(status == 200 and data == blob, f"download: {status}, {len(data)} bytes")
        status, h, data = https(srv, "GET", g.download_url, {"Range": "bytes=10-19"})
        expect(status == 206 and data == blob[10:20], f"range: {status} {data!r}")
        expect({k.lower(): v for k, v in h.items()}.get("content-range") == f"bytes 10-19/{len(blob)}", f"{h}")
    check("media: RequestDownload for a member (non-member: NOT_A_MEMBER), GET and Range",
          download)
