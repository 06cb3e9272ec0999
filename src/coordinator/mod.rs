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
use std::time::Instant;

use crossbeam_channel::{Sender, TrySendError};
use log::{debug, error, info, warn};

use crate::config::Config;
use crate::events::{Events, Gauges};
use crate::health::{Dependency, Readiness};
use crate::http::StreamsSnapshot;
use crate::lease::{HeldLeases, Ownership};
use crate::metadata::new_stream_id;
use crate::random_u64;
use crate::scan::{FileIdentity, Observation, Scan};
use crate::store::CheckpointStore;
use crate::store::record::{CorruptRecord, Loaded};
use crate::store::redis::{Claim, LeaseStatus};
use crate::stream::state::{Event, Rules, Work};
use crate::stream::table::{Change, StreamTable, StreamView, TrackedStream, file_name};
use crate::upload::job::{AssembleJob, ChunkJob, CloseJob, FinalizeJob, Job, JobResult, Outcome};

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
    /// Whether the last registration failed (to log an outage once).
    registration_failing: bool,
    /// Redis recoveries already answered with a write-back.
    redis_recoveries_handled: u64,
    /// Streams whose checkpoint record cannot be trusted, by id: neither
    /// uploaded nor closed, shown in `/streams` until the record is fixed
    /// or deleted and the process restarted.
    quarantined: BTreeMap<String, Quarantined>,
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
            registration_failing: false,
            redis_recoveries_handled: 0,
            quarantined: BTreeMap::new(),
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
            if let Some(tracked) = TrackedStream::from_stored(
                stream,
                &self.config.watch_dir,
                now,
                self.config.assemble,
            ) {
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
    pub fn turn(&mut self, now: Instant, observations: Observations) {
        for result in observations.results {
            self.handle_result(result, now);
        }
        if let Some(scan) = observations.scan {
            let changes = self.table.apply_scan(&scan, now, &self.rules);
            self.apply_changes(changes, now);
            self.queue_ready_streams(now);
            self.publish_gauges();
        }
        self.write_back_after_redis_recovery();
        self.renew_leases(now);
        self.dispatch(now);
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

    fn apply_changes(&mut self, changes: Vec<Change>, now: Instant) {
        let mut registered = 0;
        for change in changes {
            match change {
                // Each registration is a Redis round trip on this thread: a
                // burst of new files is spread over several polls so the
                // loop (and /healthz) stays responsive.
                Change::Discovered(_) if registered == REGISTRATIONS_PER_POLL => {}
                Change::Discovered(observation) if self.is_quarantined(observation.identity) => {}
                Change::Discovered(observation) => {
                    registered += 1;
                    self.register(&observation, now);
                }
                Change::Closed(stream, reason) => {
                    self.retire(stream.identity, &stream.id);
                    self.ownership.forget(&stream.id);
                    // Only the stream's owner records it as incomplete; a
                    // replica that sees it first claims it to do so.
                    let Some((token, chunks)) = self.claim_for_close(&stream, now) else {
                        continue;
                    };
                    let mut view = stream.view(now);
                    view.state = "incomplete".to_string();
                    self.remember(view);
                    warn!(
                        stream_id = stream.id.as_str(), path = stream.rel_path.as_str();
                        "stream {}: {} was {}; closing it as incomplete",
                        stream.id,
                        stream.rel_path,
                        reason.as_str()
                    );
                    self.waiting_closes.push_back(Job::Close(CloseJob {
                        stream: stream.stream_ref(token),
                        facts: stream.facts(),
                        reason,
                        chunks,
                    }));
                }
                Change::Forgotten(stream) => {
                    info!(
                        stream_id = stream.id.as_str(), path = stream.rel_path.as_str();
                        "stream {}: {} is gone or replaced; it stays complete in the bucket",
                        stream.id, stream.rel_path
                    );
                    self.retire(stream.identity, &stream.id);
                    self.release(&stream.id);
                    self.ownership.forget(&stream.id);
                }
                Change::Reopened { id, path } => {
                    info!(
                        stream_id = id.as_str(), path = path.as_str();
                        "stream {id}: {path} grew after completion; reopened"
                    );
                }
                Change::Moved { id, from, to } => {
                    info!(
                        stream_id = id.as_str(), path = to.as_str();
                        "stream {id}: renamed from {from} to {to}"
                    );
                    if let Err(err) = self.checkpoints.record_path(&id, &to) {
                        warn!("stream {id}: cannot record new path {to}: {err}");
                    }
                }
            }
        }
    }

    /// After Redis was down, it may have restarted without its data: write
    /// back every stream whose record is gone, so that a later restart of
    /// chunkstream still resumes them. Retried on the next turn if it fails.
    fn write_back_after_redis_recovery(&mut self) {
        let recoveries = self.readiness.redis_recoveries();
        if recoveries == self.redis_recoveries_handled {
            return;
        }
        let mut restored = 0;
        for stream in self.table.iter() {
            // What another replica owns, only it knows for sure; every
            // replica writes back what is complete, so that no complete file
            // is taken for a new one.
            let token = self.ownership.token(&stream.id);
            if token.is_none() && stream.needs_owner() {
                continue;
            }
            match self.checkpoints.restore_stream(&stream.to_stored(), token) {
                Ok(written) => restored += usize::from(written),
                Err(err) => {
                    warn!("Redis is back but writing checkpoints back failed: {err}; retrying");
                    return;
                }
            }
        }
        self.redis_recoveries_handled = recoveries;
        if restored > 0 {
            warn!(
                "Redis had lost {restored} stream records (restarted without persistence?); wrote them back"
            );
        } else {
            info!("Redis is back with every checkpoint intact");
        }
    }

    /// Drops the identity → stream mapping of a stream that ended, unless a
    /// new stream for the same identity takes it over first.
    fn retire(&mut self, identity: FileIdentity, stream_id: &str) {
        match self.checkpoints.forget_identity(identity, stream_id) {
            Ok(()) => {
                self.retired.remove(&identity);
            }
            Err(err) => {
                warn!("stream {stream_id}: cannot update the identity index: {err}");
                self.retired.insert(identity, stream_id.to_string());
            }
        }
    }

    /// Gives a new file its stream id, stored in Redis before any upload.
    fn register(&mut self, observation: &Observation, now: Instant) {
        let unique = format!(
            "{}|{}|{}|{}",
            observation.identity.key(),
            observation.rel_path,
            std::process::id(),
            random_u64()
        );
        let candidate = TrackedStream::new(
            new_stream_id(&file_name(&observation.rel_path), unique.as_bytes()),
            observation,
            self.config.chunk_size,
            now,
        );
        let retired = self.retired.get(&observation.identity).cloned();
        let registered = self
            .checkpoints
            .register_stream(&candidate.to_stored(), retired.as_deref());
        let id = match registered {
            Ok(id) => {
                if self.registration_failing {
                    info!("stream registration works again");
                    self.registration_failing = false;
                }
                self.retired.remove(&observation.identity);
                id
            }
            Err(err) => {
                self.events
                    .dependency_checked(Dependency::Redis, Err(err.to_string()));
                if !self.registration_failing {
                    error!(
                        "cannot register {} in Redis: {err}; new files wait until Redis is back",
                        observation.rel_path
                    );
                    self.registration_failing = true;
                }
                return;
            }
        };
        if id == candidate.id {
            info!(
                stream_id = id.as_str(), path = &*observation.rel_path;
                "stream {id}: discovered {} ({} bytes)",
                observation.rel_path, observation.size
            );
            self.events.stream_discovered();
            self.table.insert(candidate);
            return;
        }
        // Someone registered this file first: continue their stream.
        match self.checkpoints.load_stream(&id) {
            Ok(Some(Err(corrupt))) => self.quarantine(corrupt, Some(observation.identity)),
            Ok(Some(Ok(stored))) => {
                if let Some(tracked) = TrackedStream::from_stored(
                    stored,
                    &self.config.watch_dir,
                    now,
                    self.config.assemble,
                ) {
                    info!(
                        "stream {id}: {} already registered; continuing it",
                        observation.rel_path
                    );
                    self.table.insert(tracked);
                }
            }
            Ok(None) => warn!(
                "stream {id}: registered for {} but has no record",
                observation.rel_path
            ),
            Err(err) => warn!("stream {id}: cannot load its record: {err}"),
        }
    }

    /// Takes a stream whose record cannot be trusted out of service: it is
    /// neither uploaded nor closed (either could destroy what is in the
    /// bucket), its file is not registered again, and `/streams` shows it as
    /// `quarantined` with the reason. Logged once per stream.
    fn quarantine(&mut self, corrupt: CorruptRecord, identity: Option<FileIdentity>) {
        let id = corrupt.id.clone();
        if let Some(known) = self.quarantined.get_mut(&id) {
            known.identity = known.identity.or(identity);
            return;
        }
        error!(
            stream_id = id.as_str();
            "{corrupt}; stream {id} is quarantined: nothing is uploaded or closed for it until its record is fixed or deleted (then restart)"
        );
        self.quarantined.insert(
            id,
            Quarantined {
                identity,
                path: corrupt.path.unwrap_or_default(),
                reason: corrupt.reason,
            },
        );
    }

    fn is_quarantined(&self, identity: FileIdentity) -> bool {
        self.quarantined
            .values()
            .any(|stream| stream.identity == Some(identity))
    }

    /// Renews this process's leases and its place among the live replicas,
    /// every third of `LEASE_TTL`. A lease found lost is dropped (its stream
    /// now belongs to another replica); a stream whose record is gone (Redis
    /// lost its data) is written back, so the next renewal keeps it.
    fn renew_leases(&mut self, sent: Instant) {
        if !self.ownership.renewal_due(sent) {
            return;
        }
        let held = self.ownership.held();
        let leases: Vec<(&str, u64)> = held
            .iter()
            .map(|(id, token)| (id.as_str(), *token))
            .collect();
        match self.checkpoints.renew(&leases) {
            Ok(renewal) => {
                let mut without_record: HashMap<&str, u64> = HashMap::new();
                for ((stream_id, token), status) in held.iter().zip(renewal.statuses) {
                    match status {
                        LeaseStatus::Held => self.ownership.granted(stream_id, *token, sent),
                        LeaseStatus::Lost => self.lose_lease(stream_id),
                        LeaseStatus::NoRecord => {
                            without_record.insert(stream_id, *token);
                        }
                    }
                }
                if !without_record.is_empty() {
                    // One pass over the table, however many records are gone.
                    let lost: Vec<(crate::store::StoredStream, u64)> = self
                        .table
                        .iter()
                        .filter_map(|stream| {
                            let token = without_record.get(stream.id.as_str())?;
                            Some((stream.to_stored(), *token))
                        })
                        .collect();
                    for (stored, token) in lost {
                        self.write_back(&stored, Some(token));
                    }
                }
                self.ownership.renewal_done(sent, Some(renewal.replicas));
            }
            Err(err) => {
                // The leases hold for the rest of their TTL; workers stop
                // writing objects once that runs out.
                debug!("cannot renew {} leases: {err}", held.len());
                self.events
                    .dependency_checked(Dependency::Redis, Err(err.to_string()));
                self.ownership.renewal_done(sent, None);
            }
        }
    }

    /// Writes back the record of one stream whose record Redis lost: with
    /// `token` when this process owns it, else this replica's view of it.
    fn write_back(&mut self, stored: &crate::store::StoredStream, token: Option<u64>) {
        let stream_id = stored.id.as_str();
        match self.checkpoints.restore_stream(stored, token) {
            Ok(true) => warn!(
                stream_id = stream_id;
                "stream {stream_id}: its record was gone from Redis; wrote back what this replica knew"
            ),
            Ok(false) => {}
            Err(err) => warn!("stream {stream_id}: cannot write its record back: {err}"),
        }
    }

    /// Drops a lease another replica took (or that could not be trusted any
    /// more), saying so once.
    fn lose_lease(&mut self, stream_id: &str) {
        if self.ownership.drop_lease(stream_id) {
            warn!(
                stream_id = stream_id;
                "stream {stream_id}: lost the lease (another replica claimed it, or it lapsed while this one was paused or cut off); this replica stops writing for it"
            );
            self.events.lease_lost();
        }
    }

    /// Gives a lease up, if held.
    fn release(&mut self, stream_id: &str) {
        let Some(token) = self.ownership.token(stream_id) else {
            return;
        };
        self.ownership.drop_lease(stream_id);
        if let Err(err) = self.checkpoints.release(stream_id, token) {
            debug!("stream {stream_id}: cannot release its lease ({err}); it lapses by itself");
        }
    }

    /// At the end of a drain: gives up every lease whose stream has no job
    /// still running, so other replicas take them over at once, and leaves
    /// the live-replica set.
    fn give_up_leases(&mut self) {
        for (stream_id, _) in self.ownership.held() {
            if !self.in_flight.contains_key(&stream_id) {
                self.release(&stream_id);
            }
        }
        if let Err(err) = self.checkpoints.leave() {
            debug!(
                "cannot leave the replica set ({err}); this replica drops out of it after LEASE_TTL"
            );
        }
    }

    /// Claims a stream's lease and reads its record, unless this is the
    /// stream's first claim (fencing token 1) and `first_claim_reads` is
    /// false.
    fn claim_lease(
        &mut self,
        stream_id: &str,
        now: Instant,
        first_claim_reads: bool,
    ) -> Result<(u64, Option<crate::store::StoredStream>), Unclaimed> {
        let sent = now;
        match self.checkpoints.claim(stream_id) {
            Ok(Claim::Granted { token }) => {
                self.ownership.granted(stream_id, token, sent);
                self.events.lease_claimed();
                debug!(stream_id = stream_id; "stream {stream_id}: claimed (fencing token {token})");
                if token == 1 && !first_claim_reads {
                    return Ok((token, None));
                }
                match self.checkpoints.load_stream(stream_id) {
                    Ok(Some(Ok(stored))) => Ok((token, Some(stored))),
                    Ok(Some(Err(corrupt))) => {
                        self.release(stream_id);
                        Err(Unclaimed::Corrupt(corrupt))
                    }
                    Ok(None) => {
                        self.release(stream_id);
                        Err(Unclaimed::NoRecord)
                    }
                    Err(err) => {
                        warn!("stream {stream_id}: claimed, but cannot read its record: {err}");
                        self.release(stream_id);
                        Err(Unclaimed::Elsewhere)
                    }
                }
            }
            Ok(Claim::HeldBy { owner, remaining }) => {
                debug!("stream {stream_id}: owned by {owner} for {remaining:?} more");
                self.ownership.held_by_other(stream_id, now, remaining);
                Err(Unclaimed::Elsewhere)
            }
            Ok(Claim::NoRecord) => Err(Unclaimed::NoRecord),
            Err(err) => {
                self.events
                    .dependency_checked(Dependency::Redis, Err(err.to_string()));
                Err(Unclaimed::Elsewhere)
            }
        }
    }

    /// Claims a tracked stream that wants work and merges in its record.
    /// Returns the fencing token if the stream still wants an owner after
    /// that (a stream another replica completed meanwhile does not).
    fn claim(&mut self, identity: FileIdentity, now: Instant) -> Option<u64> {
        let stream_id = self.table.get(&identity)?.id.clone();
        let (token, stored) = match self.claim_lease(&stream_id, now, false) {
            // The first claim ever: every progress write is fenced, so
            // nobody wrote anything but the registration this replica read.
            Ok((token, None)) => return Some(token),
            Ok((token, Some(stored))) => (token, stored),
            Err(Unclaimed::NoRecord) => {
                // Redis lost the record and its owner (if any) has not
                // written it back: write back what this replica knows, and
                // claim the stream on a later poll.
                let stored = self.table.get(&identity)?.to_stored();
                self.write_back(&stored, None);
                return None;
            }
            Err(Unclaimed::Elsewhere) => return None,
            Err(Unclaimed::Corrupt(corrupt)) => {
                self.table.remove(&identity);
                self.ownership.forget(&stream_id);
                self.quarantine(corrupt, Some(identity));
                return None;
            }
        };
        let stream = self.table.stream_mut(&identity)?;
        if !stream.adopt(stored, self.config.assemble) {
            // Closed as incomplete by another replica: forget it; its file,
            // if still there, is discovered afresh.
            self.table.remove(&identity);
            self.release(&stream_id);
            self.ownership.forget(&stream_id);
            return None;
        }
        if stream.needs_owner() {
            Some(token)
        } else {
            self.release(&stream_id);
            None
        }
    }

    /// The token and chunk records to close a stream with, if this replica
    /// owns it or can claim it; `None` if another replica owns it (and will
    /// close it) or it is already complete or closed.
    fn claim_for_close(
        &mut self,
        stream: &TrackedStream,
        now: Instant,
    ) -> Option<(
        u64,
        std::collections::BTreeMap<u64, crate::metadata::ChunkRecord>,
    )> {
        if let Some(token) = self.ownership.token(&stream.id) {
            return Some((token, stream.chunks.clone()));
        }
        let (token, stored) = match self.claim_lease(&stream.id, now, true) {
            Ok(claimed) => claimed,
            Err(Unclaimed::Corrupt(corrupt)) => {
                self.quarantine(corrupt, Some(stream.identity));
                return None;
            }
            Err(Unclaimed::NoRecord | Unclaimed::Elsewhere) => return None,
        };
        let stored = stored?;
        if stored.status == crate::store::StoredStatus::Active {
            Some((token, stored.chunks))
        } else {
            self.release(&stream.id);
            None
        }
    }

    fn dispatch(&mut self, now: Instant) {
        let Some(jobs) = self.jobs.clone() else {
            return;
        };
        // The breaker: while S3 or Redis is down, in-flight jobs keep retrying
        // with backoff, and nothing new goes out until the probe (or one of
        // those retries) succeeds.
        if self.readiness.is_down(Dependency::Storage) || self.readiness.is_down(Dependency::Redis)
        {
            return;
        }
        while let Some(job) = self.waiting_closes.pop_front() {
            let stream_id = job.stream().stream_id.clone();
            match jobs.try_send(job) {
                Ok(()) => {
                    self.in_flight.insert(stream_id, "close");
                }
                Err(TrySendError::Full(job) | TrySendError::Disconnected(job)) => {
                    self.waiting_closes.push_front(job);
                    return;
                }
            }
        }
        while let Some(identity) = self.ready.pop_front() {
            self.queued.remove(&identity);
            let Some(stream) = self.table.get(&identity) else {
                continue;
            };
            let Some(mut work) = stream.state.wanted(now, &self.rules) else {
                continue;
            };
            let token = match self.ownership.token(&stream.id) {
                Some(token) => token,
                None => {
                    if !self.ownership.worth_claiming(&stream.id, now)
                        || !self.ownership.may_claim(self.demand)
                    {
                        continue;
                    }
                    let Some(token) = self.claim(identity, now) else {
                        continue;
                    };
                    // The claim merged in the stream's record, which may
                    // change the job.
                    let Some(merged) = self
                        .table
                        .get(&identity)
                        .and_then(|stream| stream.state.wanted(now, &self.rules))
                    else {
                        continue;
                    };
                    work = merged;
                    token
                }
            };
            let Some(stream) = self.table.get(&identity) else {
                continue;
            };
            let job = match work {
                Work::Upload { index } => {
                    let offset = index * stream.state.chunk_size;
                    Job::Chunk(ChunkJob {
                        stream: stream.stream_ref(token),
                        path: stream.abs_path.clone(),
                        index,
                        offset,
                        len: stream.state.chunk_size,
                    })
                }
                Work::Finalize { size } => Job::Finalize(FinalizeJob {
                    stream: stream.stream_ref(token),
                    path: stream.abs_path.clone(),
                    facts: stream.facts(),
                    expected_size: size,
                    chunks: stream.chunks.clone(),
                    release_lease: !self.rules.assemble,
                }),
                Work::Assemble => Job::Assemble(AssembleJob {
                    stream: stream.stream_ref(token),
                    revision: stream.revision,
                }),
            };
            let stream_id = stream.id.clone();
            match jobs.try_send(job) {
                Ok(()) => {
                    let kind = match work {
                        Work::Upload { .. } => "chunk",
                        Work::Finalize { .. } => "finalize",
                        Work::Assemble => "assemble",
                    };
                    self.in_flight.insert(stream_id, kind);
                    self.table
                        .apply(identity, Event::Dispatched(work), now, &self.rules);
                    self.table.mark_dispatched(&identity, now);
                }
                Err(_) => {
                    // No room: it stays first in line.
                    self.queued.insert(identity);
                    self.ready.push_front(identity);
                    return;
                }
            }
        }
    }

    /// Queues every stream that wants a job, longest-waiting first so a busy
    /// stream cannot starve the others. Runs once per poll: between polls,
    /// only job results make a stream want something new (see `enqueue`).
    fn queue_ready_streams(&mut self, now: Instant) {
        // One pass: the streams that want a job, and (for the fair share)
        // how many streams need an owner.
        let mut demand = 0;
        let mut ready: Vec<(Option<Instant>, FileIdentity)> = Vec::new();
        for stream in self.table.iter() {
            demand += usize::from(stream.needs_owner());
            if !self.queued.contains(&stream.identity)
                && stream.state.wanted(now, &self.rules).is_some()
            {
                ready.push((stream.last_dispatch, stream.identity));
            }
        }
        self.demand = demand;
        ready.sort();
        for (_, identity) in ready {
            self.enqueue(identity);
        }
    }

    /// Puts a stream at the back of the dispatch queue (once).
    fn enqueue(&mut self, identity: FileIdentity) {
        if self.queued.insert(identity) {
            self.ready.push_back(identity);
        }
    }

    fn handle_result(&mut self, result: JobResult, now: Instant) {
        self.in_flight.remove(&result.stream.stream_id);
        let Some(stream) = self.table.get_mut(&result.stream) else {
            match result.outcome {
                Outcome::Closed => self.events.stream_closed("incomplete", 0.0),
                Outcome::LeaseLost => self.lose_lease(&result.stream.stream_id),
                _ => {}
            }
            self.release(&result.stream.stream_id);
            return;
        };
        stream.retries += u64::from(result.failed_attempts);
        if result.last_error.is_some() {
            stream.last_error = result.last_error;
        }
        let job_started = stream.last_dispatch.unwrap_or(now);
        if let Some(chunks) = result.chunks {
            let before = stream.uploaded_bytes();
            stream.chunks = chunks;
            let grown = stream.uploaded_bytes().saturating_sub(before);
            stream.record_upload(grown, job_started);
        }
        let event = match result.outcome {
            Outcome::ChunkUploaded(record) => {
                let index = record.index;
                stream.record_upload(record.size_bytes, job_started);
                stream.chunks.insert(index, record);
                Event::ChunkUploaded { index }
            }
            Outcome::Finalized {
                size,
                mtime_ns,
                revision,
                completed_at,
                lease_released,
            } => {
                if lease_released {
                    // The completion mark gave the lease up (a stream that
                    // grew meanwhile is claimed again).
                    self.ownership.drop_lease(&stream.id);
                }
                stream.revision = revision;
                let lag = completed_at
                    .duration_since(stream.last_change_at)
                    .map_or(0.0, |d| d.as_secs_f64());
                self.events.stream_closed("complete", lag);
                Event::Finalized { size, mtime_ns }
            }
            Outcome::FinalizeInterrupted => {
                info!(
                    stream_id = stream.id.as_str(), path = stream.rel_path.as_str();
                    "stream {}: {} changed during completion; waiting for it to settle again",
                    stream.id, stream.rel_path
                );
                Event::FinalizeInterrupted
            }
            Outcome::Failed(reason) => {
                self.events.source_error();
                // The 1st, 10th, 100th, … failure in a row: a permanent
                // problem (permissions) is warned about once, and stays
                // visible in the logs without a line per retry.
                let failures_in_a_row = stream.state.failures + 1;
                if failures_in_a_row == 1 || is_power_of_ten(failures_in_a_row) {
                    warn!(
                        stream_id = stream.id.as_str(), path = stream.rel_path.as_str();
                        "stream {}: job for {} failed ({failures_in_a_row} in a row): {reason}; retrying with backoff",
                        stream.id, stream.rel_path
                    );
                }
                Event::JobFailed
            }
            Outcome::Assembled { revision } => {
                stream.assembled_revision = stream.assembled_revision.max(revision);
                Event::Assembled
            }
            Outcome::Cancelled => Event::JobCancelled,
            Outcome::LeaseLost => {
                self.lose_lease(&result.stream.stream_id);
                Event::JobCancelled
            }
            Outcome::Closed => return,
        };
        let identity = result.stream.identity;
        let finalized = matches!(event, Event::Finalized { .. });
        let changes = self.table.apply(identity, event, now, &self.rules);
        let needs_owner = self
            .table
            .get(&identity)
            .is_some_and(|stream| stream.needs_owner());
        if !needs_owner {
            // Complete (and assembled, if wanted): the lease is given up.
            self.release(&result.stream.stream_id);
        }
        if let Some(stream) = self.table.get(&identity) {
            let view = finalized.then(|| stream.view(now));
            // Its next chunk goes out as soon as there is room, not at the
            // next poll.
            let wants_more = stream.state.wanted(now, &self.rules).is_some();
            if let Some(view) = view {
                self.remember(view);
            }
            if wants_more {
                self.enqueue(identity);
            }
        }
        self.apply_changes(changes, now);
    }

    /// Keeps a completed or closed stream visible in `/streams` for a while.
    fn remember(&mut self, view: StreamView) {
        self.recent.retain(|old| old.stream_id != view.stream_id);
        if self.recent.len() == RECENT_STREAMS {
            self.recent.pop_front();
        }
        self.recent.push_back(view);
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
        }
    }

    fn publish_gauges(&self) {
        let mut gauges = Gauges {
            files_tracked: self.table.len() as u64,
            inflight_jobs: self.in_flight.len() as u64,
            streams_owned: self.ownership.held_count() as u64,
            replicas: self.ownership.replicas() as u64,
            streams_quarantined: self.quarantined.len() as u64,
            ..Gauges::default()
        };
        for stream in self.table.iter().filter(|s| s.is_active()) {
            gauges.streams_active += 1;
            gauges.pending_bytes += stream.state.size.saturating_sub(stream.uploaded_bytes());
        }
        self.events.gauges(&gauges);
    }
}

#[cfg(test)]
mod tests;
