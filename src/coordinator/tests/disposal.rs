//! `ON_COMPLETE=delete|move`: when a complete stream's file is disposed of,
//! by whom, and what a change or a failure in the meantime does.

use super::*;
use crate::events::Disposal;

fn deleting(extra: &[&str]) -> World {
    let mut args = vec!["--workers=4", "--on-complete=delete"];
    args.extend_from_slice(extra);
    world_with(&args)
}

#[test]
fn a_verified_complete_file_is_deleted_by_its_lease_holder_then_forgotten() {
    let mut world = deleting(&[]);
    let id = complete_one(&mut world, "cam.mp4");
    assert_eq!(
        world.store().lease_holder(&id).as_deref(),
        Some("replica-0"),
        "the lease is kept for the disposal"
    );
    let dispose = world.one_job();
    let Job::Dispose(job) = &dispose else {
        panic!("{dispose:?}")
    };
    assert_eq!((job.revision, job.size), (1, 25 * MIB));
    assert_eq!(job.stream.stream_id, id);
    world.finish(&dispose);
    assert_eq!(world.store().lease_holder(&id), None, "given up");
    assert!(world.store().expiry(&id).is_some(), "its record expires");
    assert_eq!(
        world.metric("chunkstream_files_disposed_total{action=\"deleted\"}"),
        1.0
    );
    world.poll_for(QUIET * 2);
    assert!(world.jobs().is_empty(), "nothing more to do");
}

#[test]
fn with_keep_nothing_is_disposed_of() {
    let mut world = world();
    let id = complete_one(&mut world, "cam.mp4");
    assert_eq!(world.store().lease_holder(&id), None);
    world.poll_for(QUIET * 2);
    assert!(world.jobs().is_empty());
}

#[test]
fn the_delay_holds_the_disposal_back_and_a_growth_meanwhile_reopens_instead() {
    let mut world = deleting(&["--on-complete-delay=10m"]);
    let id = complete_one(&mut world, "cam.mp4");
    world.poll_for(Duration::from_secs(300));
    assert!(world.jobs().is_empty(), "within ON_COMPLETE_DELAY");
    let (finalize, _) = grown_to_revision_2(&mut world, &id);
    world.finish(&finalize);
    world.poll_for(Duration::from_secs(599));
    assert!(
        world.jobs().is_empty(),
        "the delay counts from the new completion"
    );
    world.poll_for(SECOND);
    let Job::Dispose(job) = world.one_job() else {
        panic!("a disposal")
    };
    assert_eq!((job.revision, job.size), (2, 35 * MIB));
}

#[test]
fn a_file_changed_since_verification_is_kept_and_its_stream_reopens() {
    let mut world = deleting(&[]);
    complete_one(&mut world, "cam.mp4");
    let dispose = world.one_job();
    // An append between the verification and the unlink.
    world.write("cam.mp4", 26 * MIB);
    let seen = world.files["cam.mp4"].clone();
    world.report(
        &dispose,
        Outcome::DisposalRefused {
            reason: "it changed".into(),
            seen: Some((seen.size, seen.mtime_ns)),
        },
    );
    assert_eq!(world.view("cam.mp4").unwrap().state, "active", "reopened");
    world.poll_for(QUIET);
    assert_eq!(kind(&world.one_job()), "finalize", "the new bytes go up");
}

#[test]
fn a_failed_disposal_is_retried_with_backoff_and_never_holds_up_uploads() {
    let mut world = deleting(&[]);
    complete_one(&mut world, "cam.mp4");
    let dispose = world.one_job();
    world.report(
        &dispose,
        Outcome::Failed("cannot delete cam.mp4: Read-only file system".into()),
    );
    world.write("other.mp4", 15 * MIB);
    world.poll();
    let jobs = world.jobs();
    assert_eq!(
        jobs.iter().map(kind).collect::<Vec<_>>(),
        vec!["chunk"],
        "the other file uploads; the disposal waits for its backoff"
    );
    world.finish(&jobs[0]);
    world.poll_for(Duration::from_secs(31));
    let retried = world.jobs();
    assert!(
        retried.iter().any(|job| kind(job) == "dispose"),
        "retried later: {retried:?}"
    );
}

#[test]
fn only_the_lease_holder_disposes_of_a_file() {
    let mut world = deleting(&[]);
    world.add_second_replica();
    let id = complete_one(&mut world, "cam.mp4");
    world.poll_replica(1);
    world.poll_replica(1);
    assert!(
        world.jobs_of(1).is_empty(),
        "replica 1 does not hold the lease"
    );
    let dispose = world.one_job();
    assert_eq!(dispose.stream().stream_id, id);
    assert_eq!(kind(&dispose), "dispose");
}

#[test]
fn with_assembly_the_file_is_disposed_of_only_after_the_assembly() {
    let mut world = deleting(&["--assemble=true"]);
    complete_one(&mut world, "cam.mp4");
    let assemble = world.one_job();
    assert_eq!(kind(&assemble), "assemble");
    world.finish(&assemble);
    let Job::Dispose(job) = world.one_job() else {
        panic!("a disposal after the assembly")
    };
    assert!(job.assembled, "the assembled object is verified too");
}

#[test]
fn a_moved_file_is_announced_with_its_destination() {
    let mut world = deleting(&["--events-stream=chunkstream:events"]);
    let id = complete_one(&mut world, "cam.mp4");
    let dispose = world.one_job();
    world.files.remove("cam.mp4");
    let moved = Outcome::Disposed {
        disposal: Disposal::Moved(PathBuf::from("/done/cam.mp4")),
        size: 25 * MIB,
        sha256: "ab".into(),
    };
    world.report(&dispose, moved.clone());
    assert_eq!(
        world.metric("chunkstream_files_disposed_total{action=\"moved\"}"),
        1.0
    );
    // A duplicate of the result adds nothing: the event's id names the
    // completed revision.
    world.report(&dispose, moved);
    let announced = world.store().announced();
    assert_eq!(announced.len(), 1, "{announced:?}");
    assert_eq!(announced[0].id, format!("{id}/1/file.moved"));
    let event: crate::notify::StreamEvent = serde_json::from_str(&announced[0].json).unwrap();
    assert_eq!(event.moved_to.as_deref(), Some("/done/cam.mp4"));
    assert_eq!(
        (event.size_bytes, event.sha256.as_deref()),
        (Some(25 * MIB), Some("ab"))
    );
}
