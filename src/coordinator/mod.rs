//! The coordinator: every decision about streams, and nothing else.
//!
//! One thread owns all stream state. Each turn it applies what the scanner
//! saw and what the workers did, steps the streams, and hands jobs to the
//! worker pool over a bounded channel (never blocking: a full channel just
//! waits for the next turn), dispatching a stream's next chunk as soon as
//! its previous one is done. Workers never touch the table; they only send
//! results.
//!
//! Replicas: every replica scans the whole directory and tracks every stream,
//! but hands out jobs only for streams whose lease it holds. It claims a
//! stream when the stream wants work and its fair share allows, renews its
//! leases every third of `LEASE_TTL`, and gives a lease up when the stream
//! is complete or closed (see `lease` and docs/scaling.md).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use crossbeam_channel::{Sender, TrySendError};
use log::{debug, error, info, warn};

use crate::config::Config;
use crate::events::{Disposal, Events, Gauges};
use crate::health::{Dependency, Readiness};
use crate::http::StreamsSnapshot;
use crate::lease::{HeldLeases, Ownership};
use crate::metadata::{Source, new_stream_id};
use crate::notify::{Announcement, StreamEvent, StreamSubject};
use crate::random_u64;
use crate::scan::{FileIdentity, Observation, Scan};
use crate::store::CheckpointStore;
use crate::store::ports::{Claim, LeaseStatus};
use crate::store::ports::{CorruptRecord, Loaded};
use crate::stream::Now;
use crate::stream::state::{Event, Rules, Work};
use crate::stream::table::{Change, StreamTable, StreamView, TrackedStream, file_name};
use crate::upload::job::{
    AssembleJob, ChunkJob, CloseJob, DisposeJob, FinalizeJob, Job, JobResult, Outcome,
};
use crate::watchfs::FileSystem;

mod announce;
mod changes;
mod dispatch;
mod ownership;
mod results;

/// How a run ended.
#[derive(Debug, PartialEq, Eq)]
pub enum RunOutcome {
    /// Drained: every in-flight job finished or was cancelled cleanly.
    Drained,
    /// `SHUTDOWN_TIMEOUT` passed with these streams' jobs still running.
    DrainTimedOut(Vec<String>),
}

fn is_power_of_ten(mut n: u32) -> bool {
    while n >= 10 && n.is_multiple_of(10) {
        n /= 10;
    }
    n == 1
}

/// What arrived since the last turn.
#[derive(Debug, Default)]
pub struct Observations {
    /// The scanner's latest scan, if a new one is in.
    pub scan: Option<Scan>,
    /// Results of finished jobs.
    pub results: Vec<JobResult>,
}

/// Where the coordinator reports what it does, and who it is.
pub struct Observers {
    pub events: Arc<dyn Events>,
    pub readiness: Arc<Readiness>,
    /// This process's owner id.
    pub instance: String,
    /// The leases this process holds, shared with the workers.
    pub leases: Arc<HeldLeases>,
}

/// Why a claim did not give this process a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Unclaimed {
    /// The stream has no record (Redis lost it).
    NoRecord,
    /// Another replica holds it, or Redis cannot be reached.
    Elsewhere,
    /// Its record cannot be trusted.
    Corrupt(CorruptRecord),
}

/// New files registered per poll at most; the rest wait for the next poll.
const REGISTRATIONS_PER_POLL: usize = 2000;

/// How many completed or closed streams `/streams` keeps showing.
const RECENT_STREAMS: usize = 50;

/// The single owner of the stream table.
pub struct Coordinator {
    config: Config,
    rules: Rules,
    table: StreamTable,
    checkpoints: Box<dyn CheckpointStore>,
    events: Arc<dyn Events>,
    jobs: Option<Sender<Job>>,
    readiness: Arc<Readiness>,
    instance: String,
    /// Recently completed or closed streams, newest last.
    recent: VecDeque<StreamView>,
    /// Close jobs waiting for room in the job channel.
    waiting_closes: VecDeque<Job>,
    /// Streams that want a job, in dispatch order, and the same as a set.
    ready: VecDeque<FileIdentity>,
    queued: std::collections::HashSet<FileIdentity>,
    /// Stream ids with a job at a worker.
    in_flight: HashMap<String, &'static str>,
    /// The leases this process holds, and what it knows of the others'.
    ownership: Ownership,
    /// Streams that need an owner (active, or waiting for assembly), counted
    /// at the last poll: what the replicas share.
    demand: usize,
    /// Identity → stream id of streams just closed or forgotten whose identity
    /// mapping may still be in Redis; a new stream may take it over.
    retired: HashMap<FileIdentity, String>,
    /// Stream id → identity of streams whose retirement (identity mapping
    /// removed, records set to expire) failed and is retried.
    unretired: BTreeMap<String, FileIdentity>,
    /// Whether the last registration failed (to log an outage once).
    registration_failing: bool,
    /// Redis recoveries already answered with a write-back.
    redis_recoveries_handled: u64,
    /// Streams whose checkpoint record cannot be trusted, by id: neither
    /// uploaded nor closed, shown in `/streams` until the record is fixed
    /// or deleted and the process restarted.
    quarantined: BTreeMap<String, Quarantined>,
    /// Paths the last scan could not read.
    unreadable_paths: usize,
    /// Events decided here (reopened, quarantined) that Redis did not take
    /// yet, oldest first; retried every turn (see `announce`).
    unannounced: VecDeque<Announcement>,
    /// Reads a file's first bytes, to tell a file whose inode number changed
    /// (network file systems) from a new one.
    files: Box<dyn FileSystem>,
    /// The wall time of the current turn, for the timestamps streams record.
    wall_clock: SystemTime,
}

/// A quarantined stream: its file (if known) and why.
#[derive(Debug, Clone)]
struct Quarantined {
    identity: Option<FileIdentity>,
    path: String,
    reason: String,
}

impl Coordinator {
    pub fn new(
        config: Config,
        checkpoints: Box<dyn CheckpointStore>,
        files: Box<dyn FileSystem>,
        jobs: Sender<Job>,
        observers: Observers,
        now: Instant,
    ) -> Self {
        let ownership = Ownership::new(config.lease, observers.leases, now);
        let rules = Rules {
            stream_timeout: config.stream_timeout,
            vanish_grace: config.stream_timeout,
            retry: config.retry,
            assemble: config.assemble,
            dispose: config.on_complete.disposes(),
            dispose_delay: config.on_complete_delay,
        };
        Self {
            config,
            rules,
            table: StreamTable::default(),
            checkpoints,
            events: observers.events,
            jobs: Some(jobs),
            readiness: observers.readiness,
            instance: observers.instance,
            recent: VecDeque::with_capacity(RECENT_STREAMS),
            waiting_closes: VecDeque::new(),
            ready: VecDeque::new(),
            queued: std::collections::HashSet::new(),
            in_flight: HashMap::new(),
            ownership,
            demand: 0,
            retired: HashMap::new(),
            unretired: BTreeMap::new(),
            registration_failing: false,
            redis_recoveries_handled: 0,
            quarantined: BTreeMap::new(),
            unreadable_paths: 0,
            unannounced: VecDeque::new(),
            files,
            wall_clock: SystemTime::UNIX_EPOCH,
        }
    }

    /// Loads checkpointed streams into the table. Returns how many.
    pub fn resume(&mut self, stored: Vec<Loaded>, now: Instant) -> usize {
        let mut resumed = 0;
        for stream in stored {
            let stream = match stream {
                Ok(stream) => stream,
                Err(corrupt) => {
                    self.quarantine(corrupt, None);
                    continue;
                }
            };
            if let Some(tracked) =
                TrackedStream::from_stored(stream, &self.config.watch_dir, now, &self.rules)
            {
                debug!(
                    "stream {}: resumed for {} ({} chunks checkpointed)",
                    tracked.id,
                    tracked.rel_path,
                    tracked.chunks.len()
                );
                self.table.insert(tracked);
                resumed += 1;
            }
        }
        resumed
    }

    /// One turn: applies what the workers did and what the scanner saw,
    /// renews leases when due, and hands out the jobs that fit in the job
    /// channel. `now` is the only clock the coordinator reads, so tests drive
    /// it with a fake one.
    pub fn turn(&mut self, now: Now, observations: Observations) {
        self.wall_clock = now.wall;
        let now = now.instant;
        for result in observations.results {
            self.handle_result(result, now);
        }
        if let Some(scan) = observations.scan {
            self.retry_retirements();
            self.apply_scan(scan, now);
            self.queue_ready_streams(now);
            self.publish_gauges();
        }
        self.write_back_after_redis_recovery();
        self.retry_announcements();
        self.renew_leases(now);
        self.dispatch(now);
    }

    /// `now` with the wall time of this turn.
    fn at(&self, now: Instant) -> Now {
        Now {
            instant: now,
            wall: self.wall_clock,
        }
    }

    /// When the next turn is due even if nothing arrives: the next lease
    /// renewal.
    pub fn next_deadline(&self) -> Instant {
        self.ownership.next_renewal()
    }

    /// Stops handing out jobs: closes this side of the job channel, so the
    /// workers end once it is empty. In-flight jobs still report back.
    pub fn begin_drain(&mut self) {
        drop(self.jobs.take());
    }

    /// Whether a job is at a worker.
    pub fn has_jobs_out(&self) -> bool {
        !self.in_flight.is_empty()
    }

    /// Stream ids with a job out, sorted.
    pub fn in_flight(&self) -> Vec<String> {
        let mut streams: Vec<String> = self.in_flight.keys().cloned().collect();
        streams.sort();
        streams
    }

    /// Ends a drain: gives up every lease whose stream has no job still
    /// running, and says how the drain went.
    pub fn finish_drain(&mut self) -> RunOutcome {
        self.give_up_leases();
        self.publish_gauges();
        let streams = self.in_flight();
        if streams.is_empty() {
            info!("drained: every in-flight job settled; exiting");
            RunOutcome::Drained
        } else {
            error!(
                "SHUTDOWN_TIMEOUT ({}) passed with jobs still running for streams: {}; they resume on the next start",
                humantime::format_duration(self.config.shutdown_timeout),
                streams.join(", ")
            );
            RunOutcome::DrainTimedOut(streams)
        }
    }

    /// Active streams (oldest change first), then the recent ones (newest first).
    pub fn snapshot(&self, now: Instant) -> StreamsSnapshot {
        let mut streams: Vec<StreamView> = self
            .table
            .iter()
            .filter(|stream| stream.is_active())
            .map(|stream| {
                let mut view = stream.view(now);
                view.owned = self.ownership.token(&stream.id).is_some();
                if !view.owned {
                    // Its progress is known to its owner, not to this replica.
                    view.state = "elsewhere".to_string();
                    view.upload_rate_bytes_per_second = 0.0;
                }
                view
            })
            .collect();
        streams.extend(self.quarantined.iter().map(|(id, stream)| StreamView {
            stream_id: id.clone(),
            path: stream.path.clone(),
            state: "quarantined".to_string(),
            size_bytes: 0,
            uploaded_bytes: 0,
            chunks_uploaded: 0,
            last_change_seconds_ago: 0.0,
            retries: 0,
            last_error: Some(stream.reason.clone()),
            upload_rate_bytes_per_second: 0.0,
            revision: 0,
            owned: false,
        }));
        streams.sort_by(|a, b| a.path.cmp(&b.path));
        streams.extend(self.recent.iter().rev().cloned());
        StreamsSnapshot {
            instance: self.instance.clone(),
            streams,
            // The HTTP thread adds what the probe found.
            s3_integrity: None,
            watch_dir_blind: self.table.blind().map(str::to_string),
        }
    }

    fn publish_gauges(&self) {
        let mut gauges = Gauges {
            files_tracked: self.table.len() as u64,
            inflight_jobs: self.in_flight.len() as u64,
            streams_owned: self.ownership.held_count() as u64,
            replicas: self.ownership.replicas() as u64,
            streams_quarantined: self.quarantined.len() as u64,
            unreadable_paths: self.unreadable_paths as u64,
            watch_dir_blind: self.table.blind().is_some(),
            ..Gauges::default()
        };
        for stream in self.table.iter().filter(|s| s.is_active()) {
            gauges.streams_active += 1;
            gauges.pending_bytes += stream.state.size().saturating_sub(stream.uploaded_bytes());
        }
        self.events.gauges(&gauges);
    }
}

#[cfg(test)]
mod tests;
