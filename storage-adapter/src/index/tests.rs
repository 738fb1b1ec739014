//! Tests of the index as a whole: dedup over chunks, index files, paging and the sweep.

use super::resident::{PTR_CHUNK, Ptr};
use super::state::State;
use super::*;
use crate::types::ClientMsgId;

fn p(n: u32) -> Ptr {
    Ptr {
        seg: 0,
        off: n,
        len: 1,
        crc: n,
        id: 0,
    }
}

fn id(n: u64) -> ClientMsgId {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&n.to_le_bytes());
    b[8..].copy_from_slice(&(!n).to_le_bytes());
    ClientMsgId(b)
}

/// Every id is found in its seq's chunk, full chunks by their tag tables and the last by a
/// scan, and `below` walks on to older chunks.
#[test]
fn id_tags_find_every_entry_across_chunks_newest_chunk_first() {
    let mut st = State::fresh();
    let conv = ConvId(3);
    let n = 3 * PTR_CHUNK as u64 + 10;
    for seq in 1..=n {
        st.insert(conv, Seq(seq), id(seq), p(seq as u32));
    }
    st.insert(conv, Seq(n + 1), ClientMsgId::NONE, p(0));
    let c = &st.convs[&conv];
    assert_eq!(c.ptrs.tags.len(), 3, "one tag table per full chunk");
    assert!(c.ptrs.tags.iter().all(|t| t.len() == PTR_CHUNK));
    for seq in (1..=n)
        .step_by(97)
        .chain([1, PTR_CHUNK as u64, PTR_CHUNK as u64 + 1, n])
    {
        let (found, chunk_first) = st.dedup_candidates(conv, id(seq), 0, u64::MAX).unwrap();
        assert!(found.contains(&seq), "seq {seq}: {found:?}");
        assert_eq!(
            chunk_first,
            1 + (seq - 1) / PTR_CHUNK as u64 * PTR_CHUNK as u64
        );
    }
    // An id nobody sent: one call walks every chunk (none has the tag), then none is left.
    assert_eq!(
        st.dedup_candidates(conv, id(n + 100), 0, u64::MAX),
        Some((Vec::new(), 1))
    );
    assert_eq!(st.dedup_candidates(conv, id(n + 100), 0, 1), None);
    // Below a chunk's first seq, the walk starts at the chunk before it.
    let (found, first) = st
        .dedup_candidates(conv, id(5), 0, 1 + PTR_CHUNK as u64)
        .unwrap();
    assert_eq!((found, first), (vec![5], 1));
    assert_eq!(
        st.dedup_candidates(conv, id(PTR_CHUNK as u64 + 5), 0, 1 + PTR_CHUNK as u64),
        Some((Vec::new(), 1))
    );
    assert_eq!(
        st.dedup_candidates(conv, ClientMsgId::NONE, 0, u64::MAX),
        None
    );
    assert_eq!(st.dedup_candidates(ConvId(4), id(1), 0, u64::MAX), None);
}
