//! Failed and panicked jobs, a full job channel, restarts, drains and
//! corrupt records.

use super::*;

#[test]
fn a_failed_job_is_retried_after_a_backoff() {
    let mut world = world();
    world.write("cam.mp4", 15 * MIB);
    world.poll();
    let job = world.one_job();
    world.report(&job, Outcome::Failed("permission denied".into()));
    assert!(world.jobs().is_empty(), "not at once");
    world.poll();
    assert!(world.jobs().is_empty(), "not before the backoff");
    world.poll_for(SECOND);
    let retry = world.one_job();
    assert_eq!(chunk_indices(&[retry]), vec![0]);
    assert_eq!(world.metric("chunkstream_source_errors_total"), 1.0);
}

#[test]
fn a_job_that_panicked_is_retried_and_the_stream_completes() {
    let mut world = world();
    world.write("cam.mp4", 5 * MIB);
    world.poll();
    world.poll_for(QUIET);
    let job = world.one_job();
    // What a worker reports for a job that panicked.
    world.report(&job, Outcome::Failed("job panicked: boom".into()));
    world.poll_for(SECOND);
    let retry = world.one_job();
    assert_eq!(kind(&retry), "finalize");
    world.finish(&retry);
    let id = world.stream_id("cam.mp4");
    assert_eq!(
        world.store().stream(&id).unwrap().status,
        StoredStatus::Complete
    );
}

#[test]
fn a_cancelled_job_is_dispatched_again() {
    let mut world = world();
    world.write("cam.mp4", 15 * MIB);
    world.poll();
    let job = world.one_job();
    world.report(&job, Outcome::Cancelled);
    world.poll_for(SECOND);
    assert_eq!(chunk_indices(&world.jobs()), vec![0]);
}

#[test]
fn at_most_twice_workers_uploads_are_out_and_the_other_streams_wait_in_line() {
    let mut world = world_with_workers(1);
    for n in 0..3 {
        world.write(&format!("cam{n}.mp4"), 15 * MIB);
    }
    world.poll();
    let first = world.jobs();
    assert_eq!(
        chunk_indices(&first),
        vec![0, 0],
        "WORKERS uploading, WORKERS ready for a buffer"
    );
    // One finishes: the next stream in line gets its upload.
    world.finish(&first[0]);
    world.advance(SECOND);
    world.poll();
    let next = world.jobs();
    assert_eq!(next.len(), 1);
    assert_eq!(distinct_streams(first.iter().chain(&next)), 3);
}

#[test]
fn completions_do_not_wait_behind_uploads() {
    let mut world = world_with_workers(1);
    for n in 1..=3 {
        world.write(&format!("busy-{n}.mp4"), 35 * MIB);
    }
    world.write("done.mp4", 5 * MIB);
    world.poll();
    let uploads = world.jobs();
    assert_eq!(chunk_indices(&uploads), vec![0, 0], "the upload slots");
    // While those uploads run and the third recording waits for a slot, the
    // quiet file's completion goes out.
    world.poll_for(QUIET + SECOND);
    let next = world.jobs();
    assert_eq!(next.iter().map(kind).collect::<Vec<_>>(), ["finalize"]);
    assert_eq!(next[0].stream().stream_id, world.stream_id("done.mp4"));
    // An upload slot frees: the waiting recording is next.
    world.finish(&uploads[0]);
    world.advance(SECOND);
    world.poll();
    let after = world.jobs();
    assert_eq!(chunk_indices(&after), vec![0]);
    assert_eq!(after[0].stream().stream_id, world.stream_id("busy-3.mp4"));
}

#[test]
fn a_full_job_channel_holds_the_other_streams_in_line() {
    // WORKERS=1: three worker threads, a channel of three jobs.
    let mut world = world_with_workers(1);
    for n in 0..4 {
        world.write(&format!("cam{n}.mp4"), 5 * MIB);
    }
    world.poll();
    world.advance(QUIET);
    world.poll();
    let channel = &world.replicas[0].jobs;
    assert_eq!(channel.len(), 3, "as many as the channel holds");
    // A worker takes one job: the next turn fills the slot.
    let taken = channel.recv().unwrap();
    world.advance(SECOND);
    world.poll();
    let queued = world.jobs();
    assert_eq!(queued.len(), 3);
    assert!(
        queued
            .iter()
            .chain([&taken])
            .all(|job| kind(job) == "finalize")
    );
    assert_eq!(distinct_streams(queued.iter().chain([&taken])), 4);
}

#[test]
fn a_restart_resumes_after_the_checkpointed_chunks() {
    let mut world = world();
    world.write("cam.mp4", 25 * MIB);
    world.poll();
    let job = world.one_job();
    world.finish(&job);
    let id = job.stream().stream_id.clone();
    assert_eq!(world.restart(), 1);
    // The old process's lease lapses first.
    world.advance(TTL);
    world.poll();
    let jobs = world.jobs();
    assert_eq!(chunk_indices(&jobs), vec![1]);
    assert_eq!(jobs[0].stream().stream_id, id);
}

#[test]
fn a_drain_waits_for_jobs_in_flight_and_hands_out_no_more() {
    let mut world = world();
    world.write("a.mp4", 15 * MIB);
    world.write("b.mp4", 25 * MIB);
    world.poll();
    let jobs = world.jobs();
    assert_eq!(jobs.len(), 2);
    let coordinator = &mut world.replicas[0].coordinator;
    coordinator.begin_drain();
    assert!(coordinator.has_jobs_out());
    world.finish(&jobs[0]);
    world.poll();
    assert!(world.jobs().is_empty(), "no new job while draining");
    let still_out = jobs[1].stream().stream_id.clone();
    assert_eq!(
        world.replicas[0].coordinator.in_flight(),
        vec![still_out.clone()]
    );
    world.finish(&jobs[1]);
    let coordinator = &mut world.replicas[0].coordinator;
    assert!(!coordinator.has_jobs_out());
    assert_eq!(coordinator.finish_drain(), RunOutcome::Drained);
    assert_eq!(
        world.store().lease_holder(&still_out),
        None,
        "leases given up"
    );
}

#[test]
fn a_drain_past_its_timeout_names_the_streams_still_out() {
    let mut world = world();
    world.write("a.mp4", 15 * MIB);
    world.poll();
    let job = world.one_job();
    let coordinator = &mut world.replicas[0].coordinator;
    coordinator.begin_drain();
    let id = job.stream().stream_id.clone();
    assert_eq!(
        coordinator.finish_drain(),
        RunOutcome::DrainTimedOut(vec![id.clone()])
    );
    assert_eq!(
        world.store().lease_holder(&id).as_deref(),
        Some("replica-0"),
        "the lease of a running job is kept"
    );
}

#[test]
fn a_corrupt_record_at_start_quarantines_its_stream_and_the_others_go_on() {
    let mut world = world();
    world.write("bad.mp4", 15 * MIB);
    world.write("good.mp4", 15 * MIB);
    world.poll();
    world.work_off();
    let bad = world.stream_id("bad.mp4");
    world
        .store()
        .corrupt(&bad, "chunk size 0 is outside 1..=5368709120");
    // A restart reads the records back.
    assert_eq!(world.restart(), 1, "only the good stream resumes");
    world.advance(TTL);
    world.write("bad.mp4", 25 * MIB);
    world.write("good.mp4", 25 * MIB);
    world.poll();
    let jobs = world.work_off();
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    assert_eq!(jobs[0].stream().stream_id, world.stream_id("good.mp4"));
    let view = world.view("bad.mp4").unwrap();
    assert_eq!(view.state, "quarantined");
    assert!(view.last_error.unwrap().contains("chunk size 0"));
    assert_eq!(world.store().stream_ids().len(), 2, "not registered again");
    assert_eq!(world.metric("chunkstream_streams_quarantined"), 1.0);
}

#[test]
fn a_record_found_corrupt_at_claim_time_quarantines_the_stream() {
    let mut world = world();
    let id = taken_over(&mut world);
    world
        .store()
        .corrupt(&id, "chunk 7 starts at 1 instead of 73400320");
    // replica-9's lease lapses; the claim reads the record back.
    world.write("cam.mp4", 25 * MIB);
    world.poll_for(TTL);
    assert!(world.jobs().is_empty());
    let view = world.view("cam.mp4").unwrap();
    assert_eq!(view.state, "quarantined");
    assert!(view.last_error.unwrap().contains("chunk 7"));
    world.poll_for(5 * SECOND);
    assert!(world.jobs().is_empty(), "it stays out of service");
}
