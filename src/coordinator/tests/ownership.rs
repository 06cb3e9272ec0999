//! Leases across replicas, and Redis or S3 outages.

use super::*;

#[test]
fn a_lease_taken_by_another_replica_stops_this_ones_jobs() {
    let mut world = world();
    let id = uploaded(&mut world, "cam.mp4", 15 * MIB);
    assert_eq!(
        world.store().lease_holder(&id).as_deref(),
        Some("replica-0")
    );
    world.store().steal(&id, "replica-9");
    // The renewal (every third of LEASE_TTL) finds the lease lost.
    world.poll_for(TTL / 3 + SECOND);
    assert_eq!(world.metric("chunkstream_leases_lost_total"), 1.0);
    world.write("cam.mp4", 25 * MIB);
    world.poll_for(5 * SECOND);
    assert!(world.jobs().is_empty(), "another replica owns it");
    assert!(!world.view("cam.mp4").unwrap().owned);
}

#[test]
fn a_lost_lease_is_claimed_again_once_it_lapses() {
    let mut world = world();
    let id = taken_over(&mut world);
    world.write("cam.mp4", 25 * MIB);
    world.poll_for(5 * SECOND);
    assert!(world.jobs().is_empty());
    // replica-9 died: its lease lapses and this replica takes over.
    world.poll_for(TTL);
    let jobs = world.jobs();
    assert_eq!(chunk_indices(&jobs), vec![1], "continues after chunk 0");
    assert_eq!(
        world.store().lease_holder(&id).as_deref(),
        Some("replica-0")
    );
}

#[test]
fn a_job_that_reports_its_lease_lost_is_not_retried_here() {
    let mut world = world();
    world.write("cam.mp4", 15 * MIB);
    world.poll();
    let job = world.one_job();
    let id = job.stream().stream_id.clone();
    world.store().steal(&id, "replica-9");
    world.report(&job, Outcome::LeaseLost);
    world.poll_for(5 * SECOND);
    assert!(world.jobs().is_empty());
    assert_eq!(world.metric("chunkstream_leases_lost_total"), 1.0);
}

#[test]
fn replicas_share_the_streams_fairly() {
    let mut world = world();
    world.add_second_replica();
    // Both replicas join the replica set, and count each other at their
    // next renewal, before there is anything to claim.
    world.poll_replica(0);
    world.poll_replica(1);
    world.advance(TTL / 3 + SECOND);
    for n in 0..4 {
        world.write(&format!("cam{n}.mp4"), 15 * MIB);
    }
    world.poll_replica(0);
    world.poll_replica(1);
    // The second replica tracks the streams the first registered from its
    // next scan on.
    world.advance(SECOND);
    world.poll_replica(0);
    world.poll_replica(1);
    let (first, second) = (world.jobs_of(0), world.jobs_of(1));
    assert_eq!(first.len() + second.len(), 4, "{first:?} {second:?}");
    assert_eq!(first.len(), 2, "a fair share each");
    assert_eq!(
        distinct_streams(first.iter().chain(&second)),
        4,
        "no stream twice"
    );
}

#[test]
fn two_replicas_that_see_a_new_file_register_one_stream() {
    let mut world = world();
    world.add_second_replica();
    world.write("cam.mp4", 3 * MIB);
    world.poll_replica(0);
    world.poll_replica(1);
    assert_eq!(world.store().stream_ids().len(), 1);
    let view = world.replicas[1]
        .coordinator
        .snapshot(world.now())
        .streams
        .remove(0);
    assert_eq!(view.stream_id, world.stream_id("cam.mp4"));
}

#[test]
fn new_files_wait_while_redis_is_down_and_register_when_it_is_back() {
    let mut world = world();
    world.store().set_down(true);
    world.write("cam.mp4", 15 * MIB);
    world.poll_for(3 * SECOND);
    assert!(world.view("cam.mp4").is_none());
    assert!(world.jobs().is_empty());
    world.store().set_down(false);
    // The probe sees Redis back.
    let readiness = world.replicas[0].metrics.readiness();
    readiness.record(Dependency::Redis, Ok(()));
    world.poll_for(SECOND);
    assert!(world.view("cam.mp4").is_some());
    assert_eq!(chunk_indices(&world.jobs()), vec![0]);
}

#[test]
fn no_job_goes_out_while_the_bucket_is_down() {
    let mut world = world();
    world.write("cam.mp4", 15 * MIB);
    let readiness = world.replicas[0].metrics.readiness();
    readiness.record(Dependency::Storage, Err("connection refused".into()));
    world.poll_for(3 * SECOND);
    assert!(world.jobs().is_empty(), "the breaker holds jobs back");
    readiness.record(Dependency::Storage, Ok(()));
    world.poll_for(SECOND);
    assert_eq!(chunk_indices(&world.jobs()), vec![0]);
}

#[test]
fn records_redis_lost_are_written_back_when_it_recovers() {
    let mut world = world();
    let id = uploaded(&mut world, "cam.mp4", 15 * MIB);
    let readiness = world.replicas[0].metrics.readiness();
    readiness.record(Dependency::Redis, Err("connection refused".into()));
    world.store().wipe();
    readiness.record(Dependency::Redis, Ok(()));
    world.poll();
    let stored = world.store().stream(&id).expect("written back");
    assert_eq!(stored.chunks.len(), 1, "with its checkpointed chunk");
}
