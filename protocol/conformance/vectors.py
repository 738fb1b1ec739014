"""Golden vectors (protocol/tests/vectors), checked both ways with the standard protobuf
runtime: hex -> message equals the JSON, and JSON -> bytes equals the hex (maps compared by
decoding, as protocol/README.md says)."""

import json
import os

from google.protobuf import json_format

from wire import decode_varint


def has_map_entries(msg):
    """True if `msg` or a message inside it has a non-empty map field."""
    for field, value in msg.ListFields():
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            if len(value):
                return True
        elif field.message_type is not None:
            items = value if field.label == field.LABEL_REPEATED else [value]
            if any(has_map_entries(v) for v in items):
                return True
    return False


def check_all(pb, vectors_dir, check):
    names = sorted(n[:-4] for n in os.listdir(vectors_dir) if n.endswith(".hex"))
    check("vectors: found", lambda: f"{len(names)} vectors" if len(names) > 60 else fail(
        f"only {len(names)} vectors in {vectors_dir}"))
    for name in names:
        with open(os.path.join(vectors_dir, name + ".hex")) as f:
            wire = bytes.fromhex(f.read().strip())
        with open(os.path.join(vectors_dir, name + ".json")) as f:
            json_text = f.read()
        check(f"vector {name}: hex decodes to the JSON",
              lambda: hex_to_json(pb, wire, json_text))
        check(f"vector {name}: JSON encodes to the hex",
              lambda: json_to_hex(pb, wire, json_text))


def split(wire):
    length, used = decode_varint(wire)
    if used + length != len(wire):
        fail(f"length prefix says {length}, {len(wire) - used} bytes follow")
    return wire[used:]


def hex_to_json(pb, wire, json_text):
    decoded = pb.Frame.FromString(split(wire))
    expected = json_format.Parse(json_text, pb.Frame())
    if decoded != expected:
        fail(f"decoded {decoded} but the JSON says {expected}")
    # The canonical JSON of what we decoded is the committed JSON (as JSON values).
    ours = json_format.MessageToDict(decoded)
    if ours != json.loads(json_text):
        fail(f"our JSON {ours} differs from the committed one")
    return decoded.WhichOneof("body")


def json_to_hex(pb, wire, json_text):
    msg = json_format.Parse(json_text, pb.Frame())
    ours = msg.SerializeToString(deterministic=True)
    payload = split(wire)
    if ours == payload:
        return "byte-identical"
    if has_map_entries(msg) and pb.Frame.FromString(ours) == pb.Frame.FromString(payload):
        return "maps compared by decoding"
    fail(f"encoded {ours.hex()} but the vector is {payload.hex()}")


class CheckFailed(Exception):
    pass


def fail(why):
    raise CheckFailed(why)
