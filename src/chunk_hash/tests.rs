use super::*;
use sha2::{Digest, Sha256};

const CHUNK: usize = 100; // not a multiple of sha256's 64-byte block

fn data(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// The states of chunks uploaded in order, each resuming the previous
/// chunk's state, as chunk jobs write them.
fn uploaded(file: &[u8]) -> Vec<Option<RunningSha256>> {
    let mut before = RunningSha256::initial();
    file.chunks(CHUNK)
        .map(|chunk| {
            let hashes = ChunkHashes::of(chunk, Some(&before));
            assert_eq!(hashes.sha256, sha256(chunk));
            let running = hashes.whole_sha256.expect("a valid state");
            before = running.clone();
            Some(running)
        })
        .collect()
}

/// Completion over `file`, where `unchanged(i)` says whether chunk `i`
/// still has the bytes its record was written for: the digest, the bytes
/// hashed, and the checkpoint left for a later revision.
fn complete(
    file: &[u8],
    records: &[Option<RunningSha256>],
    unchanged: impl Fn(usize) -> bool,
) -> ([u8; 32], u64, Option<(u64, RunningSha256)>) {
    let mut whole = WholeFile::new(CHUNK as u64);
    let last_state = records.iter().rposition(Option::is_some);
    for (index, bytes) in file.chunks(CHUNK).enumerate() {
        let xxh3 = fast_hash(bytes);
        let chunk = ChunkOnDisk {
            index: index as u64,
            size: bytes.len() as u64,
            xxh3: &xxh3,
            unchanged: unchanged(index),
        };
        let recorded = records.get(index).and_then(Option::as_ref);
        let state_ahead = last_state.is_some_and(|last| last > index);
        let must_hash = whole.must_hash(index as u64, recorded.is_some(), state_ahead);
        match whole.resume(&chunk, recorded, state_ahead) {
            Resumption::NeedsBytes => {
                whole.hash_next(bytes, &xxh3);
            }
            Resumption::Resumed(_) | Resumption::PassedOver => {
                assert!(!must_hash, "chunk {index} was said to need its bytes");
            }
        }
    }
    if let Some(from) = whole.behind() {
        for bytes in file.chunks(CHUNK).skip(from as usize) {
            whole.catch_up(bytes, &fast_hash(bytes));
        }
    }
    let hashed = whole.hashed_bytes();
    let checkpoint = whole.checkpoint().cloned();
    (whole.finish(), hashed, checkpoint)
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

#[test]
fn the_running_state_of_the_last_chunk_is_the_whole_files_sha256() {
    let file = data(1_050, 1);
    let records = uploaded(&file);
    assert_eq!(records.len(), 11);
    let (digest, hashed, checkpoint) = complete(&file, &records, |_| true);
    assert_eq!(hashed, 0, "nothing changed, so nothing is hashed again");
    assert_eq!(digest, sha256(&file));
    assert_eq!(
        checkpoint.map(|(index, _)| index),
        Some(9),
        "the last full chunk"
    );
}

#[test]
fn a_changed_chunk_makes_completion_hash_the_bytes_from_there_on() {
    let uploaded_file = data(1_050, 1);
    let records = uploaded(&uploaded_file);
    let mut file = uploaded_file.clone();
    file[340] ^= 0xff; // chunk 3
    let (digest, hashed, _) = complete(&file, &records, |index| index != 3);
    assert_eq!(digest, sha256(&file));
    assert_eq!(hashed, 1_050 - 300, "chunks 3 to 10");
}

#[test]
fn a_state_computed_before_its_predecessor_was_uploaded_again_is_not_trusted() {
    // Revision 1: chunk 0 changed at completion and was uploaded again, so
    // chunk 1's state was computed over the old chunk 0.
    let first = data(300, 1);
    let mut records = uploaded(&first);
    let mut file = first.clone();
    file[40] ^= 0xff;
    records[0] = ChunkHashes::of(&file[..CHUNK], Some(&RunningSha256::initial())).whole_sha256;
    // Revision 2: every chunk's bytes match its record, but the states
    // after chunk 0 belong to other bytes.
    let (digest, hashed, _) = complete(&file, &records, |_| true);
    assert_eq!(digest, sha256(&file));
    assert_eq!(hashed, 200, "chunks 1 and 2");
}

/// The records a later revision of `first` finds for `now`: only the state
/// `metadata.json` kept after the last full chunk of `first`'s completion,
/// at the returned index.
fn checkpoint_of_completed(first: &[u8], now: &[u8]) -> (u64, Vec<Option<RunningSha256>>) {
    let (_, _, checkpoint) = complete(first, &uploaded(first), |_| true);
    let (at, state) = checkpoint.expect("a checkpoint");
    let mut records = vec![None; now.len().div_ceil(CHUNK)];
    records[at as usize] = Some(state);
    (at, records)
}

#[test]
fn a_grown_file_resumes_from_the_checkpoint_of_its_last_completion() {
    // metadata.json keeps one state, after the last full chunk; the chunks
    // before it are passed over, only the growth is hashed.
    let first = data(1_050, 5);
    let mut grown = first.clone();
    grown.extend(data(420, 6));
    let (at, records) = checkpoint_of_completed(&first, &grown);
    let (digest, hashed, _) = complete(&grown, &records, |index| index <= at as usize);
    assert_eq!(digest, sha256(&grown));
    assert_eq!(hashed, grown.len() as u64 - 1_000);
}

#[test]
fn a_checkpoint_behind_a_rewritten_chunk_makes_completion_read_the_skipped_chunks_again() {
    let first = data(1_050, 5);
    let mut rewritten = first.clone();
    rewritten[540] ^= 0xff; // chunk 5, before the checkpoint at 9
    let (at, records) = checkpoint_of_completed(&first, &rewritten);
    assert_eq!(at, 9);
    let (digest, hashed, _) = complete(&rewritten, &records, |index| index != 5);
    assert_eq!(digest, sha256(&rewritten));
    assert_eq!(
        hashed, 1_050,
        "chunks 0 to 4 were passed over, then read again"
    );
}

#[test]
fn completion_records_states_that_a_later_completion_can_resume() {
    let file = data(250, 7);
    let mut whole = WholeFile::new(CHUNK as u64);
    let records: Vec<Option<RunningSha256>> = file
        .chunks(CHUNK)
        .enumerate()
        .map(|(index, bytes)| {
            let xxh3 = fast_hash(bytes);
            let chunk = ChunkOnDisk {
                index: index as u64,
                size: bytes.len() as u64,
                xxh3: &xxh3,
                unchanged: false,
            };
            assert!(whole.must_hash(index as u64, false, false));
            assert_eq!(whole.resume(&chunk, None, false), Resumption::NeedsBytes);
            Some(whole.hash_next(bytes, &xxh3))
        })
        .collect();
    assert_eq!(whole.finish(), sha256(&file));
    let (digest, hashed, _) = complete(&file, &records, |_| true);
    assert_eq!(hashed, 0);
    assert_eq!(digest, sha256(&file));
}

#[test]
fn a_state_that_does_not_decode_or_has_no_lineage_is_hashed_around() {
    let file = data(300, 3);
    let mut records = uploaded(&file);
    records[1].as_mut().unwrap().state = "zz".into();
    let (digest, hashed, _) = complete(&file, &records, |_| true);
    assert_eq!(digest, sha256(&file));
    assert_eq!(hashed, 0, "chunk 1 is passed over, chunk 2 resumes");
    let mut records = uploaded(&file);
    records[0].as_mut().unwrap().lineage.clear(); // written before lineages
    let (digest, hashed, _) = complete(&file, &records, |_| true);
    assert_eq!(digest, sha256(&file));
    assert_eq!(hashed, 0, "chunk 0 is passed over, chunk 1 resumes");
    let garbage = RunningSha256 {
        state: "00".into(),
        lineage: String::new(),
    };
    let hashes = ChunkHashes::of(b"x", Some(&garbage));
    assert!(hashes.whole_sha256.is_none());
    assert_eq!(hashes.sha256, sha256(b"x"), "the chunk's own digest still");
}

#[test]
fn the_fast_hash_tells_chunks_apart() {
    let a = data(CHUNK, 1);
    let mut b = a.clone();
    b[0] ^= 1;
    assert_eq!(fast_hash(&a), fast_hash(&a.clone()));
    assert_ne!(fast_hash(&a), fast_hash(&b));
    assert_eq!(fast_hash(&a).len(), 32);
}

#[test]
fn hashes_of_a_chunk_larger_than_a_cached_piece_match_one_pass_hashes() {
    let prefix = data(333, 9); // the whole-file state has a partial block
    let chunk = data(2 * CACHED_PIECE + 77, 4);
    let before = ChunkHashes::of(&prefix, Some(&RunningSha256::initial()))
        .whole_sha256
        .expect("a state");
    let hashes = ChunkHashes::of(&chunk, Some(&before));
    assert_eq!(hashes.sha256, sha256(&chunk));
    assert_eq!(hashes.xxh3, fast_hash(&chunk));
    let whole = hashes.whole_sha256.expect("a state");
    assert_eq!(whole.lineage, lineage_after(&before.lineage, &hashes.xxh3));
    let mut file = prefix.clone();
    file.extend(&chunk);
    assert_eq!(deserialize(&whole.state).unwrap().finalize(), sha256(&file));
    let alone = ChunkHashes::of(&chunk, None);
    assert_eq!((alone.sha256, alone.whole_sha256), (sha256(&chunk), None));
}

#[test]
fn a_chunk_hashed_for_upload_gets_its_digest_and_the_same_state() {
    let file = data(250, 2);
    let walk = |with_digest: bool| {
        let mut whole = WholeFile::new(CHUNK as u64);
        let mut digests = Vec::new();
        for (index, bytes) in file.chunks(CHUNK).enumerate() {
            let xxh3 = fast_hash(bytes);
            let chunk = ChunkOnDisk {
                index: index as u64,
                size: bytes.len() as u64,
                xxh3: &xxh3,
                unchanged: false,
            };
            assert_eq!(whole.resume(&chunk, None, false), Resumption::NeedsBytes);
            if with_digest {
                let (digest, _) = whole.hash_next_with_digest(bytes, &xxh3);
                digests.push(digest);
            } else {
                whole.hash_next(bytes, &xxh3);
            }
        }
        (digests, whole.checkpoint().cloned(), whole.finish())
    };
    let (digests, checkpoint, digest) = walk(true);
    let expected: Vec<[u8; 32]> = file.chunks(CHUNK).map(sha256).collect();
    assert_eq!(digests, expected);
    assert_eq!(digest, sha256(&file));
    let (_, plain_checkpoint, plain_digest) = walk(false);
    assert_eq!((checkpoint, digest), (plain_checkpoint, plain_digest));
}
