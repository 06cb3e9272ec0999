use super::*;

const CHUNK: usize = 100; // not a multiple of sha256's 64-byte block

fn data(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// The records of chunks uploaded in order, each resuming the previous
/// chunk's state, as chunk jobs write them.
fn uploaded(file: &[u8]) -> Vec<RunningSha256> {
    let mut before = initial_state();
    file.chunks(CHUNK)
        .map(|chunk| {
            let running = RunningSha256::extend(&before, chunk).expect("a valid state");
            before = running.state.clone();
            running
        })
        .collect()
}

/// Completion over `file`, where `unchanged(i)` says whether chunk `i`
/// still has the bytes its record was written for.
fn complete(
    file: &[u8],
    records: &[RunningSha256],
    unchanged: impl Fn(usize) -> bool,
) -> (bool, [u8; 32]) {
    let mut whole = WholeFile::default();
    for (index, chunk) in file.chunks(CHUNK).enumerate() {
        let record = records.get(index).filter(|_| unchanged(index));
        whole.advance(record, chunk);
    }
    (whole.from_records(), whole.finish())
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

#[test]
fn the_running_state_of_the_last_chunk_is_the_whole_files_sha256() {
    let file = data(1_050, 1);
    let records = uploaded(&file);
    assert_eq!(records.len(), 11);
    let (from_records, digest) = complete(&file, &records, |_| true);
    assert!(from_records, "nothing changed, so nothing is hashed again");
    assert_eq!(digest, sha256(&file));
}

#[test]
fn a_changed_chunk_makes_completion_hash_the_bytes_from_there_on() {
    let uploaded_file = data(1_050, 1);
    let records = uploaded(&uploaded_file);
    let mut file = uploaded_file.clone();
    file[340] ^= 0xff; // chunk 3
    let (from_records, digest) = complete(&file, &records, |index| index != 3);
    assert!(!from_records);
    assert_eq!(digest, sha256(&file));
}

#[test]
fn a_state_resumed_from_a_predecessor_that_was_uploaded_again_is_not_trusted() {
    // Revision 1: chunk 0 changed at completion and was uploaded again, so
    // chunk 1's state still resumes from the old chunk 0.
    let first = data(300, 1);
    let mut records = uploaded(&first);
    let mut file = first.clone();
    file[40] ^= 0xff;
    let mut whole = WholeFile::default();
    records[0] = whole.advance(None, &file[..CHUNK]);
    // Revision 2: every chunk's bytes match its record, but the chain is
    // broken after chunk 0.
    let (from_records, digest) = complete(&file, &records, |_| true);
    assert!(!from_records);
    assert_eq!(digest, sha256(&file));
}

#[test]
fn completion_records_states_that_a_later_completion_can_resume() {
    let file = data(250, 7);
    let mut whole = WholeFile::default();
    let records: Vec<RunningSha256> = file
        .chunks(CHUNK)
        .map(|chunk| whole.advance(None, chunk))
        .collect();
    assert_eq!(whole.finish(), sha256(&file));
    let (from_records, digest) = complete(&file, &records, |_| true);
    assert!(from_records);
    assert_eq!(digest, sha256(&file));
}

#[test]
fn a_state_that_does_not_decode_is_hashed_around() {
    let file = data(300, 3);
    let mut records = uploaded(&file);
    records[1].state = "zz".into();
    let (from_records, digest) = complete(&file, &records, |_| true);
    assert!(!from_records);
    assert_eq!(digest, sha256(&file));
    assert!(RunningSha256::extend("00", b"x").is_none());
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
