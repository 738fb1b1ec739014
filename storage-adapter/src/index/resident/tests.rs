//! Unit tests of the resident structures.

use super::*;

fn p(n: u32) -> Ptr {
    Ptr {
        seg: 0,
        off: n,
        len: 1,
        crc: n,
        id: 0,
    }
}

#[test]
fn conversation_vectors_take_any_seq_order_and_mark_gaps_as_holes() {
    let mut c = ConvIx::default();
    c.set(5, p(5));
    c.set(6, p(6));
    c.set(9, p(9));
    c.set(3, p(3));
    assert_eq!(c.first, 3);
    assert_eq!(c.end(), 10);
    assert_eq!(c.get(3), Some(p(3)));
    assert!(c.get(4).unwrap().is_hole());
    assert!(c.get(7).unwrap().is_hole());
    assert_eq!(c.get(9), Some(p(9)));
    assert_eq!(c.get(10), None);
    assert_eq!(c.get(2), None);
    c.set(6, p(60));
    assert_eq!(c.get(6), Some(p(60)));
}

#[test]
fn conversation_vectors_span_chunks() {
    let n = 2 * PTR_CHUNK as u64 + 7;
    let mut c = ConvIx::default();
    for seq in 10..10 + n {
        c.set(seq, p(seq as u32));
    }
    assert_eq!(c.end(), 10 + n);
    assert_eq!(c.ptrs.len(), n as usize);
    assert_eq!(c.ptrs.rest.len(), 2);
    assert!(c.ptrs.rest.iter().all(|k| k.capacity() == PTR_CHUNK));
    for seq in [10, 10 + PTR_CHUNK as u64 - 1, 10 + PTR_CHUNK as u64, 9 + n] {
        assert_eq!(c.get(seq), Some(p(seq as u32)));
    }
    assert_eq!(c.get(10 + n), None);
    let lo = PTR_CHUNK - 2;
    let got: Vec<Ptr> = c.ptrs.range(lo, lo + 4).collect();
    let want: Vec<Ptr> = (lo..lo + 4).map(|i| p(10 + i as u32)).collect();
    assert_eq!(got, want);
    assert!(c.ptrs.iter().eq((10..10 + n).map(|s| p(s as u32))));
    // A gap across a chunk boundary fills with holes; an older seq rebuilds in order.
    c.set(10 + n + PTR_CHUNK as u64, p(1));
    assert!(c.get(10 + n).unwrap().is_hole());
    assert_eq!(c.get(10 + n + PTR_CHUNK as u64), Some(p(1)));
    c.set(3, p(3));
    assert_eq!((c.first, c.get(3), c.get(10)), (3, Some(p(3)), Some(p(10))));
    assert!(c.get(4).unwrap().is_hole());
    assert_eq!(c.end(), 11 + n + PTR_CHUNK as u64);
    assert_eq!(c.get(9 + n), Some(p((9 + n) as u32)));
}

#[test]
fn split_maps_spread_unmixed_conversation_ids_over_their_tables() {
    // Ids with structure only in their high or low half (derived 1:1 ids look like this).
    for ids in [
        (0..4096u128).collect::<Vec<_>>(),
        (0..4096u128).map(|i| i << 64).collect(),
        (0..4096u128).map(|i| (i << 64) | (i + 1)).collect(),
    ] {
        let mut m: SplitMap<ConvId, u64> = SplitMap::default();
        for (n, id) in ids.iter().enumerate() {
            m.insert(ConvId(*id), n as u64);
        }
        assert_eq!(m.len(), 4096);
        assert!(m.0.iter().all(|t| t.len() < 48), "one table holds too many");
        assert!(
            ids.iter()
                .enumerate()
                .all(|(n, id)| m[&ConvId(*id)] == n as u64)
        );
    }
}

/// The tables' shares of the keys are staggered: they add up to one, the last table's is
/// twice the first's, and random keys land in the tables in those proportions (so the tables'
/// loads, and with them their growth points, are spread over a factor of two; with equal
/// shares every table of a large map grew within the same ~0.5% of inserts, and
/// `measure::split_map_growth` measures what that cost).
#[test]
fn split_tables_get_staggered_shares() {
    let total: f64 = (0..SPLIT_TABLES).map(split_share).sum();
    assert!((total - 1.0).abs() < 1e-9, "{total}");
    let ratio = split_share(SPLIT_TABLES - 1) / split_share(0);
    assert!((ratio - 2.0).abs() < 0.01, "{ratio}");
    assert_eq!(split_table(0), 0);
    assert_eq!(split_table(u64::MAX), SPLIT_TABLES - 1);

    let mut m: SplitMap<u64, u64> = SplitMap::default();
    let n = 400_000u64;
    for k in 0..n {
        m.insert(mix64(k), k);
    }
    assert_eq!(m.len(), n as usize);
    let eighth = SPLIT_TABLES / 8;
    let count =
        |r: std::ops::Range<usize>| -> f64 { r.map(|i| m.0[i].len()).sum::<usize>() as f64 };
    let share = |r: std::ops::Range<usize>| -> f64 { r.map(split_share).sum() };
    let (lo, hi) = (0..eighth, SPLIT_TABLES - eighth..SPLIT_TABLES);
    let want = share(hi.clone()) / share(lo.clone());
    let got = count(hi) / count(lo);
    assert!((got / want - 1.0).abs() < 0.03, "got {got}, want {want}");
    assert!(want > 1.7, "{want}");
}

/// Ids whose tags are equal are all candidates, newest first, in a full chunk and in the
/// filling one; rewriting a pointer in a full chunk rebuilds that chunk's table.
#[test]
fn ids_that_share_a_tag_are_all_candidates_newest_first() {
    let mut c = ConvIx::default();
    let tagged = |n: u32, tag: u32| Ptr { id: tag, ..p(n) };
    for seq in 1..=PTR_CHUNK as u64 + 3 {
        let tag = if seq % 1000 == 7 {
            42
        } else {
            1000 + seq as u32
        };
        c.set(seq, tagged(seq as u32, tag));
    }
    c.set(PTR_CHUNK as u64 + 2, tagged(9, 42));
    // Find tag 42 directly: the chunks hold seqs 1..=4096 and 4097..=4099.
    assert_eq!(c.ptrs.with_tag(1, 42), vec![PTR_CHUNK + 1]);
    assert_eq!(c.ptrs.with_tag(0, 42), vec![4006, 3006, 2006, 1006, 6]);
    assert!(c.ptrs.with_tag(0, 43).is_empty());
    let old = c;
    let mut c = ConvIx {
        first: old.first,
        ..ConvIx::default()
    };
    for q in old.ptrs.iter() {
        c.ptrs.push(q);
    }
    c.set(2, tagged(2, 42));
    assert_eq!(c.ptrs.with_tag(0, 42), vec![4006, 3006, 2006, 1006, 6, 1]);
    c.set(7, p(7));
    assert_eq!(c.ptrs.with_tag(0, 42), vec![4006, 3006, 2006, 1006, 1]);
}
