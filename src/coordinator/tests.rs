//! The coordinator's scenarios, each a short story on a fake clock: files
//! appear, grow, go quiet, vanish or move; jobs go out on the job channel and
//! the test plays the worker; the checkpoint store is the in-memory fake,
//! shared between replicas. No thread, no server, no sleep.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, bounded};

use super::*;
use crate::health::Dependency;
use crate::lease::HeldLeases;
use crate::metadata::{ChunkRecord, KeyLayout};
use crate::metrics::Metrics;
use crate::scan::{FileIdentity, Observation, Scan, WATCH_DIR_DEVICE};
use crate::store::ports::{Completion, StoredStatus};
use crate::testing::{FakeCheckpoints, FakeClock, config};
use crate::upload::job::{Job, JobResult, Outcome};

const MIB: u64 = 1024 * 1024;
/// The default `CHUNK_SIZE`.
const CHUNK: u64 = 10 * MIB;
/// The default `STREAM_TIMEOUT`.
const QUIET: Duration = Duration::from_secs(30);
/// The default `LEASE_TTL`.
const TTL: Duration = Duration::from_secs(30);
const SECOND: Duration = Duration::from_secs(1);

#[test]
fn powers_of_ten_pace_the_repeated_warnings() {
    let warned: Vec<u32> = (1..=1000).filter(|&n| is_power_of_ten(n)).collect();
    assert_eq!(warned, vec![1, 10, 100, 1000]);
}

/// One replica: a coordinator, the job channel it fills, its view of the
/// checkpoint store, and its metrics.
struct Replica {
    coordinator: Coordinator,
    jobs: Receiver<Job>,
    store: FakeCheckpoints,
    metrics: Arc<Metrics>,
}

/// The watch directory (as the scanner would report it), the clock, and
/// the replicas.
struct World {
    clock: FakeClock,
    root: PathBuf,
    files: BTreeMap<String, Observation>,
    next_inode: u64,
    next_mtime: i128,
    replicas: Vec<Replica>,
}

/// A world with one replica and `WORKERS` job slots.
fn world_with_workers(workers: usize) -> World {
    let clock = FakeClock::default();
    let store = FakeCheckpoints::new("replica-0", TTL, clock.clone());
    let mut world = World {
        clock,
        // Only its name is used: no file is read.
        root: std::env::temp_dir(),
        files: BTreeMap::new(),
        next_inode: 100,
        next_mtime: 1,
        replicas: Vec::new(),
    };
    world.add_replica(store, workers);
    world
}

fn world() -> World {
    world_with_workers(4)
}

impl World {
    fn add_replica(&mut self, store: FakeCheckpoints, workers: usize) {
        let config = config(&self.root, &[&format!("--workers={workers}")]);
        let (jobs_tx, jobs) = bounded(workers);
        let metrics = Arc::new(Metrics::new());
        let coordinator = Coordinator::new(
            config,
            Box::new(store.clone()),
            jobs_tx,
            Observers {
                events: metrics.clone(),
                readiness: metrics.readiness(),
                instance: format!("replica-{}", self.replicas.len()),
                leases: Arc::new(HeldLeases::new(TTL)),
            },
            self.clock.now(),
        );
        self.replicas.push(Replica {
            coordinator,
            jobs,
            store,
            metrics,
        });
    }

    /// A second replica on the same checkpoint store.
    fn add_second_replica(&mut self) {
        let store = self.replicas[0].store.replica("replica-1");
        self.add_replica(store, 4);
    }

    fn store(&self) -> &FakeCheckpoints {
        &self.replicas[0].store
    }

    fn now(&self) -> Instant {
        self.clock.now()
    }

    fn advance(&self, by: Duration) {
        self.clock.advance(by);
    }

    /// Writes `rel` to `size` bytes (a new file if it does not exist).
    fn write(&mut self, rel: &str, size: u64) {
        self.next_mtime += 1;
        let mtime_ns = self.next_mtime;
        if let Some(file) = self.files.get_mut(rel) {
            file.size = size;
            file.mtime_ns = mtime_ns;
            return;
        }
        self.next_inode += 1;
        let abs: Arc<Path> = Arc::from(self.root.join(rel).as_path());
        self.files.insert(
            rel.to_string(),
            Observation {
                rel_path: Arc::from(rel),
                abs_path: abs,
                identity: FileIdentity {
                    device: WATCH_DIR_DEVICE,
                    inode: self.next_inode,
                },
                size,
                mtime_ns,
            },
        );
    }

    /// Rewrites bytes in place: same size, new mtime.
    fn touch(&mut self, rel: &str) {
        let size = self.files[rel].size;
        self.write(rel, size);
    }

    fn remove(&mut self, rel: &str) {
        self.files.remove(rel);
    }

    fn rename(&mut self, from: &str, to: &str) {
        let mut file = self.files.remove(from).expect("file exists");
        file.rel_path = Arc::from(to);
        file.abs_path = Arc::from(self.root.join(to).as_path());
        self.files.insert(to.to_string(), file);
    }

    fn scan(&self) -> Scan {
        Scan {
            files: self.files.values().cloned().collect(),
            root_readable: true,
            ..Scan::default()
        }
    }

    /// One poll of replica `n`: a turn with a fresh scan.
    fn poll_replica(&mut self, n: usize) {
        let now = self.now();
        let scan = self.scan();
        self.replicas[n].coordinator.turn(
            now,
            Observations {
                scan: Some(scan),
                results: Vec::new(),
            },
        );
    }

    fn poll(&mut self) {
        self.poll_replica(0);
    }

    /// Polls every second for `duration`.
    fn poll_for(&mut self, duration: Duration) {
        let end = self.now() + duration;
        while self.now() < end {
            self.advance(SECOND);
            self.poll();
        }
    }

    /// The jobs replica `n` handed out since the last look.
    fn jobs_of(&self, n: usize) -> Vec<Job> {
        self.replicas[n].jobs.try_iter().collect()
    }

    fn jobs(&self) -> Vec<Job> {
        self.jobs_of(0)
    }

    /// The one job handed out since the last look.
    fn one_job(&self) -> Job {
        let mut jobs = self.jobs();
        assert_eq!(jobs.len(), 1, "{jobs:?}");
        jobs.remove(0)
    }

    /// Plays the worker of replica `n`: does what the job's success writes
    /// to the checkpoint store, and reports it.
    fn finish_on(&mut self, n: usize, job: &Job) {
        let stream = job.stream().clone();
        let store = &mut self.replicas[n].store;
        let outcome = match job {
            Job::Chunk(chunk) => {
                let record = chunk_record(&stream.stream_id, chunk.index, chunk.offset, chunk.len);
                store
                    .checkpoint_chunk(&stream.stream_id, stream.token, &record)
                    .expect("the chunk is checkpointed under the lease");
                Outcome::ChunkUploaded(record)
            }
            Job::Finalize(finalize) => {
                let rel = finalize.facts.rel_path.as_str();
                let mtime_ns = self.files.get(rel).map_or(0, |file| file.mtime_ns);
                let completion = Completion {
                    revision: finalize.facts.revision,
                    size: finalize.expected_size,
                    mtime_ns,
                    last_change_at: finalize.facts.last_change_at,
                    completed_at: SystemTime::now(),
                    release_lease: finalize.release_lease,
                };
                store
                    .mark_complete(&stream.stream_id, stream.token, &completion)
                    .expect("completion is recorded under the lease");
                Outcome::Finalized {
                    size: finalize.expected_size,
                    mtime_ns,
                    revision: finalize.facts.revision,
                    completed_at: completion.completed_at,
                    lease_released: finalize.release_lease,
                }
            }
            Job::Close(close) => {
                store
                    .mark_incomplete(&stream.stream_id, stream.token, close.reason.as_str())
                    .expect("the close is recorded under the lease");
                Outcome::Closed
            }
            Job::Assemble(assemble) => {
                store
                    .finish_assembly(&stream.stream_id, stream.token, assemble.revision)
                    .expect("the assembly is recorded under the lease");
                Outcome::Assembled {
                    revision: assemble.revision,
                }
            }
        };
        self.report_on(n, job, outcome);
    }

    fn finish(&mut self, job: &Job) {
        self.finish_on(0, job);
    }

    /// Reports `outcome` for `job` to replica `n`.
    fn report_on(&mut self, n: usize, job: &Job, outcome: Outcome) {
        let chunks = match job {
            Job::Finalize(finalize) => Some(finalize.chunks.clone()),
            _ => None,
        };
        let result = JobResult {
            stream: job.stream().clone(),
            outcome,
            chunks,
            failed_attempts: 0,
            last_error: None,
        };
        let now = self.now();
        self.replicas[n].coordinator.turn(
            now,
            Observations {
                scan: None,
                results: vec![result],
            },
        );
    }

    fn report(&mut self, job: &Job, outcome: Outcome) {
        self.report_on(0, job, outcome);
    }

    /// Finishes every job as it comes, until none is handed out.
    fn work_off(&mut self) -> Vec<Job> {
        let mut done = Vec::new();
        loop {
            let jobs = self.jobs();
            if jobs.is_empty() {
                return done;
            }
            for job in jobs {
                self.finish(&job);
                done.push(job);
            }
        }
    }

    /// `/streams` as replica 0 shows it.
    fn view(&self, rel: &str) -> Option<crate::stream::table::StreamView> {
        self.replicas[0]
            .coordinator
            .snapshot(self.now())
            .streams
            .into_iter()
            .find(|view| view.path == rel)
    }

    fn stream_id(&self, rel: &str) -> String {
        self.view(rel).expect("tracked").stream_id
    }

    fn metric(&self, name: &str) -> f64 {
        let (text, _) = self.replicas[0].metrics.render();
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or(0.0)
    }
}

fn chunk_record(stream_id: &str, index: u64, offset: u64, len: u64) -> ChunkRecord {
    ChunkRecord {
        index,
        key: KeyLayout::new("").chunk(stream_id, index),
        offset,
        size_bytes: len,
        sha256: format!("{index:064}"),
        uploaded_at: "2026-01-01T00:00:00.000Z".into(),
    }
}

fn chunk_indices(jobs: &[Job]) -> Vec<u64> {
    jobs.iter()
        .filter_map(|job| match job {
            Job::Chunk(chunk) => Some(chunk.index),
            _ => None,
        })
        .collect()
}

fn kind(job: &Job) -> &'static str {
    match job {
        Job::Chunk(_) => "chunk",
        Job::Finalize(_) => "finalize",
        Job::Close(_) => "close",
        Job::Assemble(_) => "assemble",
    }
}

/// Takes a 25 MiB file through its two full chunks and its completion.
fn complete_one(world: &mut World, rel: &str) -> String {
    world.write(rel, 25 * MIB);
    world.poll();
    let chunks = world.work_off();
    assert_eq!(chunk_indices(&chunks), vec![0, 1]);
    world.poll_for(QUIET);
    let finalize = world.one_job();
    assert_eq!(kind(&finalize), "finalize");
    world.finish(&finalize);
    world.stream_id(rel)
}

// ---- a file's life ----

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
    world.write("cam.mp4", 15 * MIB);
    world.poll();
    world.work_off();
    let id = world.stream_id("cam.mp4");
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
    world.write("cam.mp4", 15 * MIB);
    world.poll();
    world.work_off();
    let id = world.stream_id("cam.mp4");
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
    world.write("cam.mp4", 15 * MIB);
    world.poll();
    world.work_off();
    let id = world.stream_id("cam.mp4");
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

// ---- ownership ----

#[test]
fn a_lease_taken_by_another_replica_stops_this_ones_jobs() {
    let mut world = world();
    world.write("cam.mp4", 15 * MIB);
    world.poll();
    world.work_off();
    let id = world.stream_id("cam.mp4");
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
    world.write("cam.mp4", 15 * MIB);
    world.poll();
    world.work_off();
    let id = world.stream_id("cam.mp4");
    world.store().steal(&id, "replica-9");
    world.poll_for(TTL / 3 + SECOND);
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
    let mut streams: Vec<String> = first
        .iter()
        .chain(&second)
        .map(|job| job.stream().stream_id.clone())
        .collect();
    streams.sort();
    streams.dedup();
    assert_eq!(streams.len(), 4, "no stream twice");
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

// ---- outages ----

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
    world.write("cam.mp4", 15 * MIB);
    world.poll();
    world.work_off();
    let id = world.stream_id("cam.mp4");
    let readiness = world.replicas[0].metrics.readiness();
    readiness.record(Dependency::Redis, Err("connection refused".into()));
    world.store().wipe();
    readiness.record(Dependency::Redis, Ok(()));
    world.poll();
    let stored = world.store().stream(&id).expect("written back");
    assert_eq!(stored.chunks.len(), 1, "with its checkpointed chunk");
}

// ---- failures ----

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

// ---- the job channel ----

#[test]
fn a_full_job_channel_holds_the_other_streams_in_line() {
    let mut world = world_with_workers(2);
    for n in 0..4 {
        world.write(&format!("cam{n}.mp4"), 15 * MIB);
    }
    world.poll();
    let channel = &world.replicas[0].jobs;
    assert_eq!(channel.len(), 2, "as many as the channel holds");
    // A worker takes one job: the next turn fills the slot.
    let taken = channel.recv().unwrap();
    world.advance(SECOND);
    world.poll();
    let queued = world.jobs();
    assert_eq!(queued.len(), 2);
    let mut streams: Vec<&str> = queued
        .iter()
        .chain([&taken])
        .map(|job| job.stream().stream_id.as_str())
        .collect();
    streams.sort();
    streams.dedup();
    assert_eq!(streams.len(), 3, "three streams served, one still waits");
}

// ---- restart and drain ----

#[test]
fn a_restart_resumes_after_the_checkpointed_chunks() {
    let mut world = world();
    world.write("cam.mp4", 25 * MIB);
    world.poll();
    let job = world.one_job();
    world.finish(&job);
    let id = job.stream().stream_id.clone();
    // A new process on the same store.
    let stored = world.store().clone().load_streams().unwrap();
    let store = world.store().replica("replica-restarted");
    world.replicas.clear();
    world.add_replica(store, 4);
    let now = world.now();
    assert_eq!(world.replicas[0].coordinator.resume(stored, now), 1);
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

// ---- hostile records ----

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
    let loaded = world.store().clone().load_streams().unwrap();
    let store = world.store().replica("replica-restarted");
    world.replicas.clear();
    world.add_replica(store, 4);
    let now = world.now();
    assert_eq!(world.replicas[0].coordinator.resume(loaded, now), 1);
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
    world.write("cam.mp4", 15 * MIB);
    world.poll();
    world.work_off();
    let id = world.stream_id("cam.mp4");
    world.store().steal(&id, "replica-9");
    world.poll_for(TTL / 3 + SECOND);
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
