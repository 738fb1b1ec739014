"""Group receipts (protocol/README.md, "Groups", receipts), against the real server: a member's
cursors reach the sender as aggregate GroupReceipts counts, not as Receipt frames to the other
members; GetReceipts names who received and read a message."""

from vectors import fail


def _expect(cond, why):
    if not cond:
        fail(why)


def flows(pb, s, conv, seq, check):
    """`conv` is a group of Ana (devices a, a2) and Ben (b); Ana sent `seq`, Ben received it."""

    def aggregated():
        a, b = s["a"], s["b"]
        ana, ben = s["ga"].user_id, s["gb"].user_id
        for kind, msg in (("delivery_ack", pb.DeliveryAck(conversation_id=conv, up_to_seq=seq)),
                          ("read_cursor", pb.ReadCursor(conversation_id=conv, up_to_seq=seq))):
            f, before = b.call(kind, msg)
            _expect(f.WhichOneof("body") == "done", f"{f}")

        def counted(f):
            if f.WhichOneof("body") != "group_receipts" or f.request_id != 0:
                return False
            g = f.group_receipts
            return g.conversation_id == conv and any(
                m.seq == seq and (m.delivered, m.read, m.recipients) == (1, 1, 1)
                for m in g.messages)
        _, before = a.until(counted)
        for f in before:
            if f.WhichOneof("body") == "receipt":
                _expect(f.receipt.by_user_id == ana, f"a member's receipt pushed: {f}")
        f, _ = a.call("get_receipts", pb.GetReceipts(conversation_id=conv, seq=seq))
        _expect(f.WhichOneof("body") == "receipt_detail", f"{f}")
        d = f.receipt_detail
        _expect((d.sender_user_id, list(d.delivered_user_ids), list(d.read_user_ids),
                 d.recipients) == (ana, [ben], [ben], 1), f"{d}")
        f, _ = a.call("get_receipts", pb.GetReceipts(conversation_id=conv, seq=0))
        _expect(f.WhichOneof("body") == "error"
                and pb.ErrorCode.Name(f.error.code) == "ERROR_CODE_INVALID_ARGUMENT", f"{f}")
    check("groups: receipts aggregated for the sender (GroupReceipts), detail by GetReceipts",
          aggregated)
