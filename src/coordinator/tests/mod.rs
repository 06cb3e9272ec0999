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
use crate::upload::job::{FinalizeJob, Job, JobResult, Outcome};
use crate::watchfs::RealFs;

mod announcements;
mod disposal;
mod lifecycle;
mod ownership;
mod recovery;
mod retention;

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
    /// The settings every replica of the world runs with.
    args: Vec<String>,
}

/// A world with one replica and `WORKERS` job slots.
fn world_with_workers(workers: usize) -> World {
    world_with(&[&format!("--workers={workers}")])
}

/// A world with one replica configured with `args`.
fn world_with(args: &[&str]) -> World {
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
        args: args.iter().map(|arg| (*arg).to_string()).collect(),
    };
    world.add_replica(store);
    world
}

fn world() -> World {
    world_with_workers(4)
}

impl World {
    fn add_replica(&mut self, store: FakeCheckpoints) {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let config = config(&self.root, &args);
        let (jobs_tx, jobs) = bounded(crate::upload::worker_threads(config.workers));
        let metrics = Arc::new(Metrics::new());
        let coordinator = Coordinator::new(
            config,
            Box::new(store.clone()),
            Box::new(RealFs),
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
        self.add_replica(store);
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

    /// What the scanner reports. A file that is not a video (say
    /// `notes.txt`) stays in the watch directory, so removing the last video
    /// is not mistaken for a mount that dropped away.
    fn scan(&self) -> Scan {
        let files: Vec<Observation> = self.files.values().cloned().collect();
        Scan {
            root_entries: files.len() + 1,
            ..Scan::clear(files)
        }
    }

    /// One poll of replica `n`: a turn with a fresh scan.
    fn poll_replica(&mut self, n: usize) {
        let scan = self.scan();
        self.replicas[n].coordinator.turn(
            self.clock.reading(),
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
                Outcome::ChunkUploaded(Box::new(record))
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
                    head: finalize
                        .chunks
                        .get(&0)
                        .map(crate::store::ports::HeadPrint::of),
                    release_lease: finalize.release_lease,
                    announcement: None,
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
                    .mark_incomplete(&stream.stream_id, stream.token, close.reason.as_str(), None)
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
            Job::Dispose(dispose) => {
                store
                    .confirm_lease(&stream.stream_id, stream.token)
                    .expect("the disposal runs under the lease");
                self.files.remove(&dispose.rel_path);
                Outcome::Disposed {
                    disposal: crate::events::Disposal::Deleted,
                    size: dispose.size,
                    sha256: "ab".into(),
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
        self.replicas[n].coordinator.turn(
            self.clock.reading(),
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

    /// Replaces the replicas with one new process on the same store, which
    /// resumes from the records; returns how many it resumed.
    fn restart(&mut self) -> usize {
        let loaded = self.store().clone().load_streams().unwrap();
        let store = self.store().replica("replica-restarted");
        self.replicas.clear();
        self.add_replica(store);
        let now = self.now();
        self.replicas[0].coordinator.resume(loaded, now)
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
        xxh3: None,
        whole_sha256: None,
    }
}

/// How many streams `jobs` are for.
fn distinct_streams<'a>(jobs: impl IntoIterator<Item = &'a Job>) -> usize {
    let streams: std::collections::BTreeSet<&str> = jobs
        .into_iter()
        .map(|job| job.stream().stream_id.as_str())
        .collect();
    streams.len()
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
        Job::Dispose(_) => "dispose",
    }
}

/// Writes `rel` at `size` and lets its full chunks upload; returns its id.
fn uploaded(world: &mut World, rel: &str, size: u64) -> String {
    world.write(rel, size);
    world.poll();
    world.work_off();
    world.stream_id(rel)
}

/// `cam.mp4` with its first chunk uploaded, then its lease taken by
/// replica-9, which this replica notices at its next renewal. Returns its id.
fn taken_over(world: &mut World) -> String {
    let id = uploaded(world, "cam.mp4", 15 * MIB);
    world.store().steal(&id, "replica-9");
    world.poll_for(TTL / 3 + SECOND);
    id
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

/// `cam.mp4`, complete at 25 MiB as stream `id`, grows to 35 MiB: its new
/// full chunk (2) is uploaded, then revision 2's finalize job goes out, which
/// is returned (as the job and its contents).
fn grown_to_revision_2(world: &mut World, id: &str) -> (Job, FinalizeJob) {
    world.write("cam.mp4", 35 * MIB);
    world.advance(SECOND);
    world.poll();
    assert_eq!(chunk_indices(&world.work_off()), vec![2], "the new bytes");
    world.poll_for(QUIET);
    let finalize = world.one_job();
    let Job::Finalize(job) = &finalize else {
        panic!("{finalize:?}")
    };
    assert_eq!((job.stream.stream_id.as_str(), job.facts.revision), (id, 2));
    let job = job.clone();
    (finalize, job)
}
