//! Bounded state: a complete stream keeps a compact record (no chunk
//! records, the first chunk's fingerprint), and the record of a stream whose
//! file is gone expires after `RECORD_RETENTION`.

use super::*;

const RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

#[test]
fn a_complete_stream_keeps_no_chunk_records_only_its_first_chunks_fingerprint() {
    let mut world = world();
    let id = complete_one(&mut world, "cam.mp4");
    let stored = world.store().stream(&id).unwrap();
    assert_eq!(stored.status, StoredStatus::Complete);
    assert!(stored.chunks.is_empty(), "{:?}", stored.chunks);
    let head = stored.head.expect("the first chunk's fingerprint is kept");
    assert_eq!(head.size_bytes, CHUNK);
    assert_eq!(head.sha256, chunk_record(&id, 0, 0, CHUNK).sha256[..32]);
}

#[test]
fn a_complete_stream_resumed_from_its_compact_record_is_not_uploaded_again() {
    let mut world = world();
    let id = complete_one(&mut world, "cam.mp4");
    assert_eq!(world.restart(), 1);
    world.poll_for(QUIET * 2);
    assert!(world.jobs().is_empty(), "unchanged: nothing to upload");

    // It grows: only the new full chunk goes out, then a finalize job for
    // revision 2 without the old records (the worker reads them back from
    // metadata.json).
    let (_, job) = grown_to_revision_2(&mut world, &id);
    assert_eq!(job.chunks.keys().copied().collect::<Vec<_>>(), vec![2]);
}

#[test]
fn a_stream_taken_over_from_its_compact_record_uploads_only_what_is_new() {
    let mut world = world();
    complete_one(&mut world, "cam.mp4");
    world.add_second_replica();
    world.poll_replica(1);
    world.write("cam.mp4", 35 * MIB);
    world.advance(SECOND);
    // Replica 1 sees the growth first and claims the stream.
    world.poll_replica(1);
    let jobs = world.jobs_of(1);
    assert_eq!(chunk_indices(&jobs), vec![2], "{jobs:?}");
}

#[test]
fn the_record_of_a_complete_file_that_is_gone_expires_after_the_retention() {
    let mut world = world();
    let id = complete_one(&mut world, "cam.mp4");
    world.remove("cam.mp4");
    world.poll_for(QUIET + SECOND);
    assert!(world.store().expiry(&id).is_some(), "set to expire");
    world.advance(RETENTION - 2 * QUIET);
    assert_eq!(
        world.store().stream_ids(),
        vec![id],
        "kept for the retention"
    );
    world.advance(2 * QUIET);
    assert!(world.store().stream_ids().is_empty());
}

#[test]
fn the_record_of_a_closed_stream_expires_after_the_retention() {
    let mut world = world();
    let id = uploaded(&mut world, "cam.mp4", 15 * MIB);
    world.remove("cam.mp4");
    world.poll_for(QUIET + SECOND);
    let close = world.one_job();
    world.finish(&close);
    assert!(world.store().expiry(&id).is_some());
    world.advance(RETENTION);
    assert!(world.store().stream_ids().is_empty());
}

#[test]
fn a_retirement_that_failed_while_redis_was_down_is_retried() {
    let mut world = world();
    let id = complete_one(&mut world, "cam.mp4");
    world.remove("cam.mp4");
    world.store().set_down(true);
    world.poll_for(QUIET + SECOND);
    assert_eq!(world.store().expiry(&id), None);
    world.store().set_down(false);
    world.poll();
    assert!(world.store().expiry(&id).is_some(), "retried after a scan");
    world.advance(RETENTION);
    assert!(world.store().stream_ids().is_empty());
}
