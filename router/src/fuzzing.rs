//! Entry point for the cargo-fuzz target `message_envelope` in `fuzz/`: the envelope a message
//! entry's body carries in the log (content type, reply-to seq, media or a change of an earlier
//! message, opaque body), decoded whenever history, sync or fan-out reads a stored message back.

/// The envelope decoders (versions 1 to 5) never panic on stored bytes; whatever version 1, 3
/// or 5 accepts re-encodes to exactly those bytes, whatever version 2 or 4 accepts to a message
/// that reads back the same.
pub fn message_envelope(data: &[u8]) {
    let _ = crate::shard::fuzz_envelope(data);
    let _ = crate::shard::fuzz_envelope_v2(data);
    let _ = crate::shard::fuzz_envelope_v3(data);
    let _ = crate::shard::fuzz_envelope_v4(data);
    let _ = crate::shard::fuzz_envelope_v5(data);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shard::{
        fuzz_envelope, fuzz_envelope_v3, fuzz_envelope_v4, fuzz_envelope_v5, sample_envelope,
    };

    #[test]
    fn envelopes_round_trip_and_damaged_ones_are_refused() {
        let good = sample_envelope();
        assert!(fuzz_envelope(&good));
        // Too short for its content-type length, then for its reply-to seq.
        assert!(!fuzz_envelope(&good[..1]));
        assert!(!fuzz_envelope(&good[..2 + 10 + 4]));
        // A content type that is not UTF-8.
        let mut bad = good.clone();
        bad[2] = 0xFF;
        assert!(!fuzz_envelope(&bad));
        // A content-type length past the end.
        let mut long = good;
        long[0] = 0xFF;
        long[1] = 0xFF;
        assert!(!fuzz_envelope(&long));
        // A change: accepted and re-encoded; cut inside its emoji, or of an unknown kind: not.
        let react = std::fs::read(
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../fuzz/corpus/message_envelope/seed-reaction"),
        )
        .unwrap();
        assert!(fuzz_envelope_v3(&react));
        assert!(!fuzz_envelope_v3(&react[..react.len() - 1]));
        let mut unknown = react.clone();
        unknown[2 + 8] = 9;
        assert!(!fuzz_envelope_v3(&unknown));
        // A change never replies: one whose reply-to field is not 0 is damaged (the fuzzer's
        // find: it was accepted and re-encoded with 0).
        let mut replying = react.clone();
        replying[2 + 1] = 0x80;
        assert!(!fuzz_envelope_v3(&replying));
        // An expiring message and a timer change: accepted; cut short, or with an expiry of 0
        // or an inner version that is not 1 to 3: not.
        let seed = |name: &str| {
            std::fs::read(
                std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                    .join("../fuzz/corpus/message_envelope")
                    .join(name),
            )
            .unwrap()
        };
        let expiring = seed("seed-expiring");
        assert!(fuzz_envelope_v4(&expiring));
        assert!(!fuzz_envelope_v4(&expiring[..9]));
        let mut zero = expiring.clone();
        zero[..8].fill(0);
        assert!(!fuzz_envelope_v4(&zero));
        let mut inner = expiring.clone();
        inner[8] = 5;
        assert!(!fuzz_envelope_v4(&inner));
        let timer = seed("seed-timer");
        assert!(fuzz_envelope_v5(&timer));
        assert!(!fuzz_envelope_v5(&timer[..7]));
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../fuzz/corpus/message_envelope");
        for ent in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            message_envelope(&std::fs::read(ent.unwrap().path()).unwrap());
        }
    }
}
