"""Starling framing and a minimal blocking client, written from protocol/README.md.

A frame on the wire is varint(length) followed by `length` bytes of a protobuf
`starling.v1.Frame`. The length is an unsigned LEB128 varint in its shortest
form, at most 5 bytes.
"""

import os
import socket
import ssl
import subprocess
import sys
import tempfile

LENGTH_PREFIX_BYTES_MAX = 5
FRAME_BYTES_MAX_DEFAULT = 65536


def generate_python(proto_dir):
    """Compiles the package's .proto files into a temporary directory and imports
    starling.proto's module (which re-exports the others: they are imported publicly)."""
    out = tempfile.mkdtemp(prefix="starling-pb-")
    files = sorted(os.path.join(proto_dir, f) for f in os.listdir(proto_dir) if f.endswith(".proto"))
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{proto_dir}",
         f"--python_out={out}", *files],
        check=True)
    sys.path.insert(0, out)
    import starling_pb2  # noqa: E402  (generated just now)
    return starling_pb2


def encode_varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def decode_varint(buf):
    """Returns (value, bytes used), or None if `buf` holds no complete prefix yet.

    Raises ValueError for a prefix longer than 5 bytes or not in shortest form.
    """
    value = 0
    for i, b in enumerate(buf[:LENGTH_PREFIX_BYTES_MAX]):
        value |= (b & 0x7F) << (7 * i)
        if not b & 0x80:
            if i > 0 and b == 0:
                raise ValueError("length prefix not in shortest form")
            return value, i + 1
    if len(buf) >= LENGTH_PREFIX_BYTES_MAX:
        raise ValueError("length prefix longer than 5 bytes")
    return None


def frame_bytes(frame):
    payload = frame.SerializeToString(deterministic=True)
    return encode_varint(len(payload)) + payload


class ConnectionClosed(Exception):
    pass


class Conn:
    """One TLS connection speaking frames. Not thread-safe; every read times out."""

    def __init__(self, pb, addr, ca_file, server_name="localhost", timeout_s=10.0):
        self.pb = pb
        ctx = ssl.create_default_context(cafile=ca_file)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        raw = socket.create_connection(addr, timeout=timeout_s)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = ctx.wrap_socket(raw, server_hostname=server_name)
        self.buf = b""
        self.next_id = 1
        self.frame_bytes_max = FRAME_BYTES_MAX_DEFAULT

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def new_id(self):
        rid = self.next_id
        self.next_id += 1
        return rid

    def frame(self, request_id, kind, msg):
        """A Frame whose body case `kind` (e.g. "hello") holds `msg`."""
        f = self.pb.Frame(request_id=request_id)
        getattr(f, kind).CopyFrom(msg)
        return f

    def send(self, request_id, kind, msg):
        self.send_raw(frame_bytes(self.frame(request_id, kind, msg)))

    def send_raw(self, data):
        self.sock.sendall(data)

    def recv(self):
        """The next frame; raises ConnectionClosed at end of stream."""
        while True:
            prefix = decode_varint(self.buf)
            if prefix is not None:
                length, used = prefix
                if length > self.frame_bytes_max:
                    raise ValueError(f"frame of {length} bytes over the limit")
                if len(self.buf) >= used + length:
                    payload = self.buf[used:used + length]
                    self.buf = self.buf[used + length:]
                    return self.pb.Frame.FromString(payload)
            try:
                chunk = self.sock.recv(65536)
            except (ConnectionResetError, ssl.SSLError) as e:
                raise ConnectionClosed(str(e)) from e
            if not chunk:
                raise ConnectionClosed("end of stream")
            self.buf += chunk

    def closed(self):
        """True if the server closes the connection before sending another frame."""
        try:
            self.recv()
            return False
        except ConnectionClosed:
            return True

    def request(self, kind, msg):
        """Sends a request and returns the next frame, which must answer it."""
        rid = self.new_id()
        self.send(rid, kind, msg)
        f = self.recv()
        if f.request_id != rid:
            raise AssertionError(f"expected the answer to {rid}, got {f}")
        return f

    def call(self, kind, msg):
        """Sends a request and returns its final answer; frames in between (pushes, a Sync's
        stream) are returned too, as (answer, before)."""
        rid = self.new_id()
        self.send(rid, kind, msg)
        before = []
        while True:
            f = self.recv()
            if f.request_id == rid and f.WhichOneof("body") not in ("deliver", "receipt",
                                                                "group_receipts"):
                return f, before
            before.append(f)

    def until(self, pred):
        """Reads until a frame satisfies `pred`; returns it and the frames before it."""
        before = []
        while True:
            f = self.recv()
            if pred(f):
                return f, before
            before.append(f)
