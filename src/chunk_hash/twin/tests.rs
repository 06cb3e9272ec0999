use super::*;
use proptest::prelude::*;
use sha2::{Digest, Sha256};

fn sha256(parts: &[&[u8]]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update(part);
    }
    hasher.finalize().into()
}

fn state_after(bytes: &[u8]) -> Sha256State {
    let mut state = Sha256State::new();
    state.update(bytes);
    state
}

/// Deterministic filler bytes.
fn bytes(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8)
        .collect()
}

fn sha_ni_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    return has_sha_ni();
    #[cfg(not(target_arch = "x86_64"))]
    return false;
}

#[test]
fn standard_vectors() {
    let empty = hex("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    let abc = hex("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    let two_blocks = hex("248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
    assert_eq!(Sha256State::new().finalize(), empty);
    assert_eq!(state_after(b"abc").finalize(), abc);
    let msg = b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
    assert_eq!(state_after(msg).finalize(), two_blocks);

    let (mut first, mut second) = (Sha256State::new(), Sha256State::new());
    update_both(&mut first, &mut second, b"abc");
    assert_eq!((first.finalize(), second.finalize()), (abc, abc));
    let (mut first, mut second) = (Sha256State::new(), Sha256State::new());
    update_both(&mut first, &mut second, msg);
    assert_eq!(
        (first.finalize(), second.finalize()),
        (two_blocks, two_blocks)
    );
}

fn hex(s: &str) -> [u8; 32] {
    core::array::from_fn(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap())
}

#[test]
fn default_is_new() {
    assert_eq!(Sha256State::default(), Sha256State::new());
}

#[test]
fn empty_input() {
    let (mut first, mut second) = (Sha256State::new(), state_after(b"prefix"));
    let before = (first.clone(), second.clone());
    update_both(&mut first, &mut second, b"");
    assert_eq!((first.clone(), second.clone()), before);
    first.update(b"");
    assert_eq!(first, before.0);
    assert_eq!(first.finalize(), sha256(&[]));
    assert_eq!(second.finalize(), sha256(&[b"prefix"]));
}

#[test]
fn exact_multiples_of_64() {
    for blocks in 0..=20 {
        let data = bytes(64 * blocks, blocks as u8);
        let expected = sha256(&[&data]);

        let (mut first, mut second) = (Sha256State::new(), Sha256State::new());
        update_both(&mut first, &mut second, &data);
        assert_eq!(first.finalize(), expected, "{blocks} blocks in one call");
        assert_eq!(second.finalize(), expected, "{blocks} blocks in one call");
        assert!(first.pending.is_empty() && second.pending.is_empty());

        let (mut first, mut second) = (Sha256State::new(), Sha256State::new());
        for block in data.chunks(64) {
            update_both(&mut first, &mut second, block);
        }
        assert_eq!(first.finalize(), expected, "{blocks} blocks one by one");
        assert_eq!(second.finalize(), expected, "{blocks} blocks one by one");

        // Both states one block in, with different contents.
        let (mut first, mut second) = (state_after(&[1; 64]), state_after(&[2; 64]));
        update_both(&mut first, &mut second, &data);
        assert_eq!(first.finalize(), sha256(&[&[1; 64], &data]));
        assert_eq!(second.finalize(), sha256(&[&[2; 64], &data]));
    }
}

#[test]
fn padding_boundaries() {
    // Pending lengths around 55/56 need one or two padding blocks.
    for len in 0..200 {
        let data = bytes(len, 7);
        assert_eq!(state_after(&data).finalize(), sha256(&[&data]), "len {len}");
    }
}

#[test]
fn finalize_does_not_consume() {
    let mut state = state_after(b"hello ");
    assert_eq!(state.finalize(), state.finalize());
    state.update(b"world");
    assert_eq!(state.finalize(), sha256(&[b"hello world"]));
}

#[test]
fn to_bytes_layout() {
    let state = state_after(&bytes(130, 3));
    let serialized = state.to_bytes();
    assert_eq!(serialized.len(), 40 + 2);
    assert_eq!(&serialized[32..40], &130u64.to_be_bytes());
    assert_eq!(&serialized[40..], &bytes(130, 3)[128..]);
    assert_eq!(&serialized[..4], &state.words[0].to_be_bytes());
    assert_eq!(Sha256State::new().to_bytes().len(), 40);
}

#[test]
fn malformed_from_bytes_is_none() {
    let good = state_after(&bytes(70, 1)).to_bytes(); // 6 pending bytes
    assert!(Sha256State::from_bytes(&good).is_some());
    // Too short for the header.
    assert_eq!(Sha256State::from_bytes(&[]), None);
    assert_eq!(Sha256State::from_bytes(&good[..39]), None);
    // Pending bytes missing or extra.
    assert_eq!(Sha256State::from_bytes(&good[..45]), None);
    assert_eq!(Sha256State::from_bytes(&good[..40]), None);
    let mut extra = good.clone();
    extra.push(0);
    assert_eq!(Sha256State::from_bytes(&extra), None);
    // Length says no pending bytes, but there are 64 (a whole block is never pending).
    let mut whole = Sha256State::new().to_bytes();
    whole[32..40].copy_from_slice(&64u64.to_be_bytes());
    assert!(Sha256State::from_bytes(&whole).is_some());
    whole.extend_from_slice(&[0; 64]);
    assert_eq!(Sha256State::from_bytes(&whole), None);
    // Too long for any state.
    assert_eq!(Sha256State::from_bytes(&[0; 40 + 64]), None);
    // Length consistent with the pending bytes but not with the header.
    let mut wrong_length = good;
    wrong_length[32..40].copy_from_slice(&5u64.to_be_bytes());
    assert_eq!(Sha256State::from_bytes(&wrong_length), None);
}

#[test]
fn compress_twice_matches_compress256() {
    let data = bytes(64 * 37, 9);
    let blocks = data.as_chunks::<64>().0;
    let (mut a, mut b) = (H0, [1, 2, 3, 4, 5, 6, 7, 8]);
    compress_twice(&mut a, &mut b, blocks);
    let (mut ea, mut eb) = (H0, [1, 2, 3, 4, 5, 6, 7, 8]);
    compress256(&mut ea, blocks);
    compress256(&mut eb, blocks);
    assert_eq!((a, b), (ea, eb));
}

#[test]
fn sha_ni_path_is_taken_when_available() {
    let data = bytes(1000, 5);
    let (mut first, mut second) = (state_after(b"x"), state_after(b"y"));
    let twin = update_both_with(&mut first, &mut second, &data, true);
    assert_eq!(twin, sha_ni_available());
    // Different pending lengths always take the fallback.
    let (mut first, mut second) = (state_after(b"x"), state_after(b"yy"));
    assert!(!update_both_with(&mut first, &mut second, &data, true));
    // Forcing the fallback.
    assert!(!update_both_with(&mut first, &mut second, &data, false));
}

#[test]
fn portable_and_sha_ni_paths_agree() {
    for (prefix_a, prefix_b, len) in [(0, 0, 10_000), (5, 69, 3333), (63, 127, 64), (3, 9, 777)] {
        let data = bytes(len, len as u8);
        let (a0, b0) = (
            state_after(&bytes(prefix_a, 1)),
            state_after(&bytes(prefix_b, 2)),
        );
        let (mut fa, mut fb) = (a0.clone(), b0.clone());
        let (mut ta, mut tb) = (a0, b0);
        assert!(!update_both_with(&mut fa, &mut fb, &data, false));
        let twin = update_both_with(&mut ta, &mut tb, &data, true);
        assert_eq!(twin, sha_ni_available() && prefix_a % 64 == prefix_b % 64);
        assert_eq!((&fa, &fb), (&ta, &tb));
    }
}

/// A prefix for the second state: unrelated, the same length modulo 64 with
/// other contents, or equal to the first state's prefix.
fn prefixes() -> impl Strategy<Value = (Vec<u8>, Vec<u8>)> {
    (
        prop::collection::vec(any::<u8>(), 0..200),
        prop::collection::vec(any::<u8>(), 0..200),
        0..3u8,
        0..3usize,
    )
        .prop_map(|(a, mut b, mode, extra_blocks)| {
            match mode {
                0 => {}
                1 => b.resize(a.len() % 64 + 64 * extra_blocks, 0xA5),
                _ => b = a.clone(),
            }
            (a, b)
        })
}

/// Cut points within `len`, and for each piece whether to use `update_both`.
fn pieces(data: &[u8], cuts: &[(usize, bool)]) -> Vec<(core::ops::Range<usize>, bool)> {
    let mut points: Vec<(usize, bool)> = cuts
        .iter()
        .map(|&(c, both)| (c % (data.len() + 1), both))
        .collect();
    points.sort();
    let mut start = 0;
    let mut out = Vec::new();
    for (point, both) in points.into_iter().chain([(data.len(), true)]) {
        out.push((start..point, both));
        start = point;
    }
    out
}

proptest! {
    #[test]
    fn prop_matches_sha2(
        data in prop::collection::vec(any::<u8>(), 0..5000),
        (prefix_a, prefix_b) in prefixes(),
        cuts in prop::collection::vec((any::<usize>(), any::<bool>()), 0..8),
    ) {
        let (mut first, mut second) = (state_after(&prefix_a), state_after(&prefix_b));
        for (range, both) in pieces(&data, &cuts) {
            if both {
                update_both(&mut first, &mut second, &data[range]);
            } else {
                first.update(&data[range.clone()]);
                second.update(&data[range]);
            }
        }
        prop_assert_eq!(first.finalize(), sha256(&[&prefix_a, &data]));
        prop_assert_eq!(second.finalize(), sha256(&[&prefix_b, &data]));
    }

    #[test]
    fn prop_portable_matches_sha_ni(
        data in prop::collection::vec(any::<u8>(), 0..5000),
        (prefix_a, prefix_b) in prefixes(),
        cuts in prop::collection::vec(any::<usize>(), 0..8),
    ) {
        let (mut fa, mut fb) = (state_after(&prefix_a), state_after(&prefix_b));
        let (mut ta, mut tb) = (fa.clone(), fb.clone());
        let cuts: Vec<(usize, bool)> = cuts.into_iter().map(|c| (c, true)).collect();
        for (range, _) in pieces(&data, &cuts) {
            update_both_with(&mut fa, &mut fb, &data[range.clone()], false);
            update_both_with(&mut ta, &mut tb, &data[range], true);
            prop_assert_eq!((&fa, &fb), (&ta, &tb));
        }
    }

    #[test]
    fn prop_round_trip_mid_stream(
        data in prop::collection::vec(any::<u8>(), 0..5000),
        cut in any::<usize>(),
        other_prefix in prop::collection::vec(any::<u8>(), 0..100),
    ) {
        let cut = cut % (data.len() + 1);
        let (mut first, mut second) = (Sha256State::new(), state_after(&other_prefix));
        update_both(&mut first, &mut second, &data[..cut]);
        let mut first = Sha256State::from_bytes(&first.to_bytes()).expect("round trip");
        let mut second = Sha256State::from_bytes(&second.to_bytes()).expect("round trip");
        prop_assert_eq!(first.to_bytes().len(), 40 + cut % 64);
        update_both(&mut first, &mut second, &data[cut..]);
        prop_assert_eq!(first.finalize(), sha256(&[&data]));
        prop_assert_eq!(second.finalize(), sha256(&[&other_prefix, &data]));
    }
}
