//! A file's life: discovery, growth, completion, late appends, header
//! rewrites, vanishing, truncation and renames.

use super::*;

#[test]
fn a_new_file_is_registered_before_any_upload() {
    let mut world = world();
    world.write("cam.mp4", 3 * MIB);
    world.poll();
    let ids = world.store().stream_ids();
    assert_eq!(ids.len(), 1);
    let stored = world.store().stream(&ids[0]).unwrap();
    assert_eq!(stored.rel_path, "cam.mp4");
    assert_eq!(stored.status, StoredStatus::Active);
    assert!(
        world.jobs().is_empty(),
        "less than a chunk, not quiet: no job"
    );
    assert_eq!(world.metric("chunkstream_streams_discovered_total"), 1.0);
}

#[test]
fn a_growing_file_uploads_each_full_chunk_in_order() {
    let mut world = world();
    world.write("cam.mp4", 5 * MIB);
    world.poll();
    assert!(world.jobs().is_empty());
    world.write("cam.mp4", 12 * MIB);
    world.advance(SECOND);
    world.poll();
    let first = world.one_job();
    let Job::Chunk(chunk) = &first else {
        panic!("{first:?}")
    };
    assert_eq!((chunk.index, chunk.offset, chunk.len), (0, 0, CHUNK));
    world.write("cam.mp4", 31 * MIB);
    world.finish(&first);
    // The next chunk goes out with the result, not at the next poll.
    let second = world.jobs();
    assert!(second.is_empty(), "the size grew unseen: {second:?}");
    world.advance(SECOND);
    world.poll();
    let rest = world.work_off();
    assert_eq!(chunk_indices(&rest), vec![1, 2]);
    let stored = world.store().stream(&world.stream_id("cam.mp4")).unwrap();
    assert_eq!(stored.chunks.len(), 3);
}

#[test]
fn one_stream_has_one_job_out_at_a_time() {
    let mut world = world();
    world.write("cam.mp4", 45 * MIB);
    world.poll();
    let jobs = world.jobs();
    assert_eq!(chunk_indices(&jobs), vec![0], "four chunks ready, one job");
    world.finish(&jobs[0]);
    assert_eq!(chunk_indices(&world.jobs()), vec![1]);
}

#[test]
fn a_quiet_file_completes_after_stream_timeout() {
    let mut world = world();
    world.write("cam.mp4", 25 * MIB);
    world.poll();
    world.work_off();
    world.poll_for(QUIET - SECOND);
    assert!(world.jobs().is_empty(), "not quiet long enough yet");
    world.advance(SECOND);
    world.poll();
    let finalize = world.one_job();
    let Job::Finalize(job) = &finalize else {
        panic!("{finalize:?}")
    };
    assert_eq!(job.expected_size, 25 * MIB);
    assert_eq!(job.chunks.len(), 2, "the full chunks go along");
    world.finish(&finalize);
    let id = world.stream_id("cam.mp4");
    let stored = world.store().stream(&id).unwrap();
    assert_eq!(stored.status, StoredStatus::Complete);
    assert_eq!(world.store().lease_holder(&id), None, "lease given up");
    assert_eq!(world.view("cam.mp4").unwrap().state, "complete");
    assert_eq!(
        world.metric("chunkstream_streams_completed_total{status=\"complete\"}"),
        1.0
    );
}

#[test]
fn a_file_smaller_than_a_chunk_completes_in_one_job() {
    let mut world = world();
    world.write("small.mp4", 3 * MIB);
    world.poll();
    world.poll_for(QUIET);
    let job = world.one_job();
    assert_eq!(kind(&job), "finalize");
    world.finish(&job);
    assert!(world.jobs().is_empty());
}

#[test]
fn an_empty_file_never_completes() {
    let mut world = world();
    world.write("empty.mp4", 0);
    world.poll();
    world.poll_for(QUIET * 2);
    assert!(world.jobs().is_empty());
    assert_eq!(world.view("empty.mp4").unwrap().size_bytes, 0);
}

#[test]
fn a_late_append_reopens_the_stream_with_a_new_revision() {
    let mut world = world();
    let id = complete_one(&mut world, "cam.mp4");
    world.write("cam.mp4", 35 * MIB);
    world.advance(SECOND);
    world.poll();
    let chunks = world.work_off();
    assert_eq!(chunk_indices(&chunks), vec![2], "only the new full chunk");
    world.poll_for(QUIET);
    let finalize = world.one_job();
    let Job::Finalize(job) = &finalize else {
        panic!("{finalize:?}")
    };
    assert_eq!(job.facts.revision, 2);
    assert_eq!(job.stream.stream_id, id, "same stream");
    world.finish(&finalize);
    assert_eq!(world.store().stream(&id).unwrap().revision, 2);
}

#[test]
fn a_header_rewrite_restarts_the_quiet_timer() {
    let mut world = world();
    world.write("cam.mp4", 25 * MIB);
    world.poll();
    world.work_off();
    world.poll_for(QUIET - 5 * SECOND);
    // ffmpeg patches the mdat size: same length, new bytes.
    world.touch("cam.mp4");
    world.poll();
    world.poll_for(QUIET - SECOND);
    assert!(world.jobs().is_empty(), "quiet only since the rewrite");
    world.poll_for(SECOND);
    assert_eq!(kind(&world.one_job()), "finalize");
}

#[test]
fn a_change_during_completion_waits_for_the_file_to_settle_again() {
    let mut world = world();
    world.write("cam.mp4", 5 * MIB);
    world.poll();
    world.poll_for(QUIET);
    let finalize = world.one_job();
    world.report(&finalize, Outcome::FinalizeInterrupted);
    world.touch("cam.mp4");
    world.poll();
    world.poll_for(QUIET - SECOND);
    assert!(world.jobs().is_empty());
    world.poll_for(SECOND);
    assert_eq!(kind(&world.one_job()), "finalize");
}

#[test]
fn a_vanished_file_is_closed_as_incomplete_after_the_grace() {
    let mut world = world();
    let id = uploaded(&mut world, "cam.mp4", 15 * MIB);
    world.remove("cam.mp4");
    world.poll_for(QUIET - SECOND);
    assert!(world.jobs().is_empty(), "still within the grace");
    world.poll_for(2 * SECOND);
    let close = world.one_job();
    let Job::Close(job) = &close else {
        panic!("{close:?}")
    };
    assert_eq!(job.reason.as_str(), "vanished");
    assert_eq!(job.chunks.len(), 1, "the uploaded chunk goes along");
    world.finish(&close);
    assert_eq!(
        world.store().stream(&id).unwrap().status,
        StoredStatus::Incomplete
    );
    assert!(
        world
            .view("cam.mp4")
            .is_some_and(|view| view.state == "incomplete")
    );
}

#[test]
fn a_file_back_within_the_grace_continues_its_stream() {
    let mut world = world();
    world.write("cam.mp4", 15 * MIB);
    world.poll();
    world.work_off();
    let file = world.files["cam.mp4"].clone();
    world.remove("cam.mp4");
    world.poll_for(10 * SECOND);
    world.files.insert("cam.mp4".into(), file);
    world.poll_for(QUIET);
    assert_eq!(kind(&world.one_job()), "finalize");
    assert_eq!(world.store().stream_ids().len(), 1);
}

#[test]
fn a_completed_file_that_is_deleted_stays_complete() {
    let mut world = world();
    let id = complete_one(&mut world, "cam.mp4");
    world.remove("cam.mp4");
    world.poll_for(QUIET * 2);
    assert!(world.jobs().is_empty(), "nothing to close");
    assert_eq!(
        world.store().stream(&id).unwrap().status,
        StoredStatus::Complete
    );
}

#[test]
fn a_truncated_file_is_closed_and_its_new_content_is_a_new_stream() {
    let mut world = world();
    let id = uploaded(&mut world, "cam.mp4", 15 * MIB);
    world.write("cam.mp4", 2 * MIB);
    world.advance(SECOND);
    world.poll();
    let close = world.one_job();
    let Job::Close(job) = &close else {
        panic!("{close:?}")
    };
    assert_eq!(job.reason.as_str(), "truncated");
    world.finish(&close);
    world.advance(SECOND);
    world.poll();
    let ids = world.store().stream_ids();
    assert_eq!(ids.len(), 2, "{ids:?}");
    assert_ne!(world.stream_id("cam.mp4"), id);
}

#[test]
fn a_renamed_file_keeps_its_stream_and_records_the_new_path() {
    let mut world = world();
    let id = uploaded(&mut world, "cam.mp4", 15 * MIB);
    world.rename("cam.mp4", "archive/cam.mp4");
    world.advance(SECOND);
    world.poll();
    assert_eq!(world.stream_id("archive/cam.mp4"), id);
    assert_eq!(
        world.store().stream(&id).unwrap().rel_path,
        "archive/cam.mp4"
    );
    world.poll_for(QUIET);
    let finalize = world.one_job();
    let Job::Finalize(job) = &finalize else {
        panic!("{finalize:?}")
    };
    assert_eq!(job.path, world.root.join("archive/cam.mp4"));
}
