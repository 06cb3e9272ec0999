//! The daemon: start-up, the coordinator loop, and the drain on shutdown.
//!
//! One coordinator thread owns all stream state. Each turn it scans (every
//! `POLL_INTERVAL`), steps the streams, hands jobs to the worker pool over a
//! bounded channel (never blocking: a full channel just waits for the next
//! turn), and applies results as they arrive, dispatching the stream's next
//! chunk straight away. Workers never touch the table; they only send results.
//!
//! Replicas: every replica scans the whole directory and tracks every stream,
//! but hands out jobs only for streams whose lease it holds. It claims a
//! stream when the stream wants work and its fair share allows, renews its
//! leases every third of `LEASE_TTL`, and gives a lease up when the stream
//! is complete or closed (see `lease` and docs/scaling.md).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, Sender, TrySendError, bounded, select};
use log::{debug, error, info, warn};

use crate::bandwidth::Bandwidth;
use crate::config::Config;
use crate::error::AppError;
use crate::events::{Events, Gauges};
use crate::health::{Dependency, Heartbeat, Readiness};
use crate::http::{HttpState, StreamsRequest, StreamsSnapshot};
use crate::lease::{HeldLeases, Ownership};
use crate::metadata::{KeyLayout, new_stream_id};
use crate::metrics::Metrics;
use crate::scan::{DirectoryLister, FileIdentity, FsLister, Observation};
use crate::store::redis::{Claim, LeaseHolder, LeaseStatus};
use crate::store::{BucketError, CheckpointStore, Integrity, ObjectStore, RedisStore, S3Store};
use crate::stream::state::{Event, Rules, Work};
use crate::stream::table::{Change, StreamTable, StreamView, TrackedStream, file_name};
use crate::upload::job::{AssembleJob, ChunkJob, CloseJob, FinalizeJob, Job, JobResult, Outcome};
use crate::upload::{Worker, sweep};
use crate::{http, instance, random_u64};

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

/// Waits `delay`, or less if a stop is requested. True if a stop was requested.
fn stop_requested_within(stop: &Receiver<()>, delay: Duration) -> bool {
    !matches!(
        stop.recv_timeout(delay),
        Err(crossbeam_channel::RecvTimeoutError::Timeout)
    )
}

/// Retries `attempt` with backoff until it succeeds or a stop is requested.
fn until_ready<T, E: std::fmt::Display>(
    config: &Config,
    stop: &Receiver<()>,
    heartbeat: &Heartbeat,
    what: &str,
    mut attempt: impl FnMut() -> Result<T, E>,
) -> Option<T> {
    let mut failures = 0u32;
    loop {
        heartbeat.beat();
        match attempt() {
            Ok(value) => return Some(value),
            Err(err) => {
                let delay = config.retry.ceiling(failures);
                error!(
                    "{what} failed: {err}; retrying in {}",
                    humantime::format_duration(Duration::from_millis(delay.as_millis() as u64))
                );
                if stop_requested_within(stop, delay) {
                    return None;
                }
                failures = failures.saturating_add(1);
            }
        }
    }
}

/// This process's owner id: host name, pid and a random part.
pub fn instance_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_string())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "host".to_string());
    format!(
        "{host}-{}-{:06x}",
        std::process::id(),
        random_u64() & 0xff_ffff
    )
}

/// Runs the daemon until `stop` receives a message (or is disconnected).
pub fn run(config: Config, stop: Receiver<()>) -> Result<RunOutcome, AppError> {
    let metrics = Arc::new(Metrics::new());
    metrics.set_poll_interval(config.poll_interval);
    let events: Arc<dyn Events> = metrics.clone();
    let heartbeat = Arc::new(Heartbeat::default());
    let (streams_tx, streams_rx) = bounded::<StreamsRequest>(8);
    let http = http::HttpServer::start(
        config.metrics_addr,
        HttpState {
            metrics: metrics.clone(),
            heartbeat: heartbeat.clone(),
            liveness_limit: config.poll_interval * 3 + Duration::from_secs(5),
            streams: streams_tx,
        },
    )?;
    let instance = match &config.instance_id {
        Some(id) => LeaseHolder::incarnation(id, random_u64()),
        None => instance_id(),
    };
    info!(
        "chunkstream {} starting as {instance}; metrics on http://{}; effective config: {config:?}",
        env!("CARGO_PKG_VERSION"),
        http.addr
    );

    crate::watchfs::report_mount(&config.watch_dir, config.stream_timeout);

    let holder = LeaseHolder {
        owner: instance.clone(),
        ttl: config.lease.ttl,
    };
    let leases = Arc::new(HeldLeases::new(config.lease.ttl));
    let bandwidth = Arc::new(Bandwidth::new(config.bandwidth.clone(), config.workers));
    metrics.watch_bandwidth(bandwidth.clone());
    let mut s3 = S3Store::new(&config.s3)?.with_bandwidth(bandwidth);
    let bucket_ready = until_ready(&config, &stop, &heartbeat, "checking bucket", || {
        let outcome = s3.ensure_bucket().map_err(|err| match err {
            BucketError::Fatal(reason) => Err(reason),
            BucketError::Storage(err) => Ok(format!(
                "bucket {:?} at {}: {err}",
                config.s3.bucket,
                config.s3.endpoint_display()
            )),
        });
        let shown = outcome.clone().map_err(|err| match err {
            Ok(retryable) | Err(retryable) => retryable,
        });
        events.dependency_checked(Dependency::Storage, shown);
        match outcome {
            Err(Err(fatal)) => Ok(Err(fatal)),
            Err(Ok(retryable)) => Err(retryable),
            Ok(()) => s3
                .probe_integrity()
                .map(Ok)
                .map_err(|err| format!("checksum probe in bucket {:?}: {err}", config.s3.bucket)),
        }
    });
    let integrity = match bucket_ready {
        None => {
            http.stop();
            return Ok(RunOutcome::Drained);
        }
        Some(Err(fatal)) => {
            http.stop();
            return Err(AppError::Startup(fatal));
        }
        Some(Ok(integrity)) => integrity,
    };
    report_integrity(&config, integrity);
    events.storage_integrity(integrity);

    let redis_store =
        || RedisStore::connect(&config.redis, config.sentinel.as_ref(), holder.clone());
    let mut checkpoints = redis_store()?;
    let (liveness_tx, liveness_rx) = bounded::<bool>(1);
    let liveness = match &config.instance_id {
        Some(id) => {
            let mut store = redis_store()?;
            let waiting = (config.retry, &*heartbeat);
            if !instance::take_over(&mut store, id, &leases, waiting, &stop)? {
                http.stop();
                return Ok(RunOutcome::Drained);
            }
            Some(instance::spawn_heartbeat(
                store,
                id.clone(),
                leases.clone(),
                liveness_rx,
            )?)
        }
        None => None,
    };
    let Some(stored) = until_ready(&config, &stop, &heartbeat, "loading checkpoints", || {
        let loaded = checkpoints.load_streams();
        let outcome = loaded.as_ref().map(|_| ()).map_err(|err| err.to_string());
        events.dependency_checked(Dependency::Redis, outcome);
        loaded
    }) else {
        http.stop();
        return Ok(RunOutcome::Drained);
    };

    let (job_tx, job_rx) = bounded::<Job>(config.workers);
    let (result_tx, result_rx) = bounded::<JobResult>(config.workers * 2);
    let (shutdown_tx, shutdown_rx) = bounded::<()>(1);
    let probe = spawn_probe(
        s3.clone(),
        redis_store()?,
        events.clone(),
        &config,
        shutdown_rx.clone(),
    )?;
    let store: Arc<dyn ObjectStore> = Arc::new(s3);
    let mut workers: Vec<JoinHandle<()>> = Vec::with_capacity(config.workers);
    for number in 0..config.workers {
        let worker = Worker::new(
            store.clone(),
            Box::new(redis_store()?),
            KeyLayout::new(&config.s3.prefix),
            config.retry,
            shutdown_rx.clone(),
            events.clone(),
            leases.clone(),
        )
        .with_assembly_max_parts(config.assembly_max_parts);
        let (jobs, results) = (job_rx.clone(), result_tx.clone());
        let handle = std::thread::Builder::new()
            .name(format!("worker-{number}"))
            .spawn(move || worker.run(jobs, results))
            .map_err(|err| AppError::Startup(format!("cannot start worker thread: {err}")))?;
        workers.push(handle);
    }
    drop((job_rx, result_tx, shutdown_rx));

    let mut coordinator = Coordinator::new(
        config.clone(),
        Box::new(FsLister::new(
            config.watch_dir.clone(),
            config.rules.clone(),
            // Quiet for twice the completion timeout: complete, or waiting.
            config.stream_timeout * 2,
        )),
        Box::new(checkpoints),
        Channels {
            jobs: job_tx,
            results: result_rx,
            streams: streams_rx,
        },
        Observers {
            events,
            heartbeat,
            readiness: metrics.readiness(),
            instance,
            leases,
        },
    );
    let resumed = coordinator.resume(stored);
    info!("resumed {resumed} streams from checkpoints");
    coordinator.run_until(&stop);
    let outcome = coordinator.drain(shutdown_tx);
    if outcome == RunOutcome::Drained {
        for worker in workers {
            let _ = worker.join();
        }
        let _ = probe.join();
    }
    // After a clean drain the liveness key is given up, so a restart need
    // not wait for it; otherwise it lapses while stuck jobs die with us.
    let _ = liveness_tx.send(outcome == RunOutcome::Drained);
    if let Some(liveness) = liveness {
        let _ = liveness.join();
    }
    http.stop();
    Ok(outcome)
}

/// Says once, at start, how uploads are protected against corruption.
fn report_integrity(config: &Config, integrity: Integrity) {
    let endpoint = config.s3.endpoint_display();
    match (integrity.checksum_verified, integrity.content_md5) {
        (true, false) => info!(
            "S3 at {endpoint} verifies x-amz-checksum-sha256: every body is checked by the server"
        ),
        (true, true) => info!(
            "S3 at {endpoint} verifies x-amz-checksum-sha256; Content-MD5 is sent too (S3_CONTENT_MD5=always)"
        ),
        (false, true) => info!(
            "S3 at {endpoint} does not verify x-amz-checksum-sha256; every body carries Content-MD5 instead"
        ),
        (false, false) => warn!(
            "S3 at {endpoint} does not verify x-amz-checksum-sha256 and S3_CONTENT_MD5=never: a body corrupted in transit would be stored"
        ),
    }
}

/// How often the probe checks S3 and Redis while both are up.
const PROBE_INTERVAL: Duration = Duration::from_secs(5);

/// Keeps readiness fresh when no real traffic does: pings Redis and lists one
/// key of the bucket every [`PROBE_INTERVAL`], or at the retry backoff (up to
/// `RETRY_MAX_DELAY`) while something is down. It also runs the multipart
/// sweep, at start and every [`sweep::SWEEP_INTERVAL`]. Ends when `shutdown`
/// closes.
fn spawn_probe(
    s3: S3Store,
    mut redis: RedisStore,
    events: Arc<dyn Events>,
    config: &Config,
    shutdown: Receiver<()>,
) -> Result<JoinHandle<()>, AppError> {
    let retry = config.retry;
    let (prefix, max_age) = (config.s3.prefix.clone(), config.multipart_max_age);
    std::thread::Builder::new()
        .name("probe".into())
        .spawn(move || {
            let mut failures = 0u32;
            let mut sweep_support = sweep::Support::Unknown;
            let mut next_sweep = Instant::now();
            loop {
                let storage = s3.probe().map_err(|err| err.to_string());
                let checkpoints = redis.ping().map_err(|err| err.to_string());
                let healthy = storage.is_ok() && checkpoints.is_ok();
                events.dependency_checked(Dependency::Storage, storage);
                events.dependency_checked(Dependency::Redis, checkpoints);
                if healthy && Instant::now() >= next_sweep {
                    match sweep::sweep(&s3, &mut redis, &prefix, max_age, &mut sweep_support) {
                        Ok(report) => {
                            next_sweep = Instant::now() + sweep::SWEEP_INTERVAL;
                            events.multipart_uploads_aborted(report.aborted as u64);
                        }
                        Err(err) => warn!("multipart sweep failed: {err}; trying again later"),
                    }
                }
                let delay = if healthy {
                    failures = 0;
                    PROBE_INTERVAL
                } else {
                    failures = failures.saturating_add(1);
                    retry.ceiling(failures)
                };
                if stop_requested_within(&shutdown, delay) {
                    return;
                }
            }
        })
        .map_err(|err| AppError::Startup(format!("cannot start probe thread: {err}")))
}

/// The coordinator's channels.
pub struct Channels {
    pub jobs: Sender<Job>,
    pub results: Receiver<JobResult>,
    pub streams: Receiver<StreamsRequest>,
}

/// Where the coordinator reports what it does, and who it is.
pub struct Observers {
    pub events: Arc<dyn Events>,
    pub heartbeat: Arc<Heartbeat>,
    pub readiness: Arc<Readiness>,
    /// This process's owner id.
    pub instance: String,
    /// The leases this process holds, shared with the workers.
    pub leases: Arc<HeldLeases>,
}

/// Why a claim did not give this process a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unclaimed {
    /// The stream has no record (Redis lost it).
    NoRecord,
    /// Another replica holds it, or Redis cannot be reached.
    Elsewhere,
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
    lister: Box<dyn DirectoryLister>,
    checkpoints: Box<dyn CheckpointStore>,
    events: Arc<dyn Events>,
    jobs: Option<Sender<Job>>,
    results: Receiver<JobResult>,
    streams_requests: Receiver<StreamsRequest>,
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
    heartbeat: Arc<Heartbeat>,
    /// Whether the last registration failed (to log an outage once).
    registration_failing: bool,
    /// Redis recoveries already answered with a write-back.
    redis_recoveries_handled: u64,
    /// Paths the last scan could not read.
    unreadable_paths: usize,
}

impl Coordinator {
    pub fn new(
        config: Config,
        lister: Box<dyn DirectoryLister>,
        checkpoints: Box<dyn CheckpointStore>,
        channels: Channels,
        observers: Observers,
    ) -> Self {
        let ownership = Ownership::new(config.lease, observers.leases, Instant::now());
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
            lister,
            checkpoints,
            events: observers.events,
            jobs: Some(channels.jobs),
            results: channels.results,
            streams_requests: channels.streams,
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
            heartbeat: observers.heartbeat,
            registration_failing: false,
            redis_recoveries_handled: 0,
            unreadable_paths: 0,
        }
    }

    /// Loads checkpointed streams into the table. Returns how many.
    pub fn resume(&mut self, stored: Vec<crate::store::StoredStream>) -> usize {
        let now = Instant::now();
        let mut resumed = 0;
        for stream in stored {
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

    /// The coordinator loop, until a stop is requested.
    pub fn run_until(&mut self, stop: &Receiver<()>) {
        let mut next_scan = Instant::now();
        loop {
            let now = Instant::now();
            if now >= next_scan {
                self.scan(now);
                self.queue_ready_streams(now);
                self.publish_gauges();
                next_scan = now + self.config.poll_interval;
            }
            self.write_back_after_redis_recovery();
            self.renew_leases();
            self.dispatch(Instant::now());
            self.heartbeat.beat();
            // Wake for the next scan, or the next lease renewal if sooner
            // (POLL_INTERVAL may be longer than a third of LEASE_TTL).
            let wake = next_scan.min(self.ownership.next_renewal());
            let wait = wake.saturating_duration_since(Instant::now());
            select! {
                recv(self.results) -> result => {
                    if let Ok(result) = result {
                        self.handle_result(result);
                    }
                }
                recv(self.streams_requests) -> request => {
                    if let Ok(reply) = request {
                        let _ = reply.try_send(self.snapshot());
                    }
                }
                recv(stop) -> _ => {
                    info!("shutdown requested: no new scans or jobs; draining in-flight work");
                    return;
                }
                default(wait) => {}
            }
            while let Ok(result) = self.results.try_recv() {
                self.handle_result(result);
            }
        }
    }

    /// Lets in-flight jobs finish (each is at most one chunk's work), within
    /// `SHUTDOWN_TIMEOUT`. Dropping `shutdown` tells workers to stop retrying
    /// and to cancel queued jobs.
    pub fn drain(&mut self, shutdown: Sender<()>) -> RunOutcome {
        drop(shutdown);
        drop(self.jobs.take());
        let deadline = Instant::now() + self.config.shutdown_timeout;
        let inflight_at_start = self.in_flight.len();
        while !self.in_flight.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match self.results.recv_timeout(left) {
                Ok(result) => self.handle_result(result),
                Err(_) => break,
            }
        }
        self.give_up_leases();
        self.publish_gauges();
        if self.in_flight.is_empty() {
            info!("drained: {inflight_at_start} in-flight jobs settled; exiting");
            RunOutcome::Drained
        } else {
            let mut streams: Vec<String> = self.in_flight.keys().cloned().collect();
            streams.sort();
            error!(
                "SHUTDOWN_TIMEOUT ({}) passed with jobs still running for streams: {}; they resume on the next start",
                humantime::format_duration(self.config.shutdown_timeout),
                streams.join(", ")
            );
            RunOutcome::DrainTimedOut(streams)
        }
    }

    fn scan(&mut self, now: Instant) {
        let started = Instant::now();
        let scan = self.lister.scan();
        let elapsed = started.elapsed().as_secs_f64();
        let unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.events.scan_finished(elapsed, unix);
        self.unreadable_paths = scan.unreadable_count();
        let was_blind = self.table.blind().map(str::to_string);
        let changes = self.table.apply_scan(&scan, now, &self.rules);
        let blind = self.table.blind().map(str::to_string);
        match (&blind, &was_blind) {
            (Some(reason), _) if blind != was_blind => warn!(
                "{reason}; no stream completes, vanishes or is replaced until the watch directory can be seen again"
            ),
            (None, Some(_)) => info!("the watch directory can be seen again; decisions resume"),
            _ => {}
        }
        self.readiness.set_watch_dir(blind);
        self.apply_changes(changes, now);
    }

    /// Decides, by content, whether files that sit at a stream's path with a
    /// new identity are the stream's file: the sha256 of its first chunk as
    /// uploaded must match the file's first bytes. Matches continue their
    /// stream under the new identity; a mismatch is a replacement; a read
    /// error decides nothing (the next scan asks again). A stream with no
    /// chunk uploaded yet has nothing to compare and continues: every byte
    /// it uploads later is read from the file it then has.
    fn resolve_identity_changes(
        &mut self,
        candidates: Vec<(FileIdentity, Observation)>,
        now: Instant,
    ) {
        let mut same = Vec::new();
        for (identity, seen) in candidates {
            let Some(stream) = self.table.get(&identity) else {
                continue;
            };
            let verdict = match stream.chunks.get(&0) {
                None => Ok(true),
                Some(first) => match self.lister.head_sha256(&seen.abs_path, first.size_bytes) {
                    Ok(digest) => Ok(digest == first.sha256),
                    Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
                    Err(err) => Err(err),
                },
            };
            match verdict {
                Ok(true) => same.push((identity, seen)),
                Ok(false) => {
                    let changes = self
                        .table
                        .apply(identity, Event::Replaced, now, &self.rules);
                    self.apply_changes(changes, now);
                    // The replaced stream was closed only once no job was
                    // out; the new file is registered on the next scan.
                }
                Err(err) => debug!(
                    "cannot read {} to compare it with its stream ({}: {err}); asking again on the next scan",
                    seen.rel_path,
                    crate::watchfs::errno_name(&err)
                ),
            }
        }
        for (stream_id, old, new) in self.table.rekey(same) {
            self.queued.remove(&old);
            info!(
                stream_id = stream_id.as_str();
                "stream {stream_id}: its file now has identity {} (was {}), and its first chunk matches; continuing the stream",
                new.key(),
                old.key()
            );
            if let Err(err) = self.checkpoints.record_identity(&stream_id, old, new) {
                warn!(
                    "stream {stream_id}: cannot record its new identity {}: {err}",
                    new.key()
                );
            }
        }
    }

    fn apply_changes(&mut self, changes: Vec<Change>, now: Instant) {
        let mut registered = 0;
        let mut identity_changes = Vec::new();
        for change in changes {
            match change {
                Change::IdentityChanged { identity, seen } => {
                    identity_changes.push((identity, seen));
                }
                // Each registration is a Redis round trip on this thread: a
                // burst of new files is spread over several polls so the
                // loop (and /healthz) stays responsive.
                Change::Discovered(_) if registered == REGISTRATIONS_PER_POLL => {}
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
        if !identity_changes.is_empty() {
            self.resolve_identity_changes(identity_changes, now);
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
            Ok(Some(stored)) => {
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

    /// Renews this process's leases and its place among the live replicas,
    /// every third of `LEASE_TTL`. A lease found lost is dropped (its stream
    /// now belongs to another replica); a stream whose record is gone (Redis
    /// lost its data) is written back, so the next renewal keeps it.
    fn renew_leases(&mut self) {
        let sent = Instant::now();
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
        let sent = Instant::now();
        match self.checkpoints.claim(stream_id) {
            Ok(Claim::Granted { token }) => {
                self.ownership.granted(stream_id, token, sent);
                self.events.lease_claimed();
                debug!(stream_id = stream_id; "stream {stream_id}: claimed (fencing token {token})");
                if token == 1 && !first_claim_reads {
                    return Ok((token, None));
                }
                match self.checkpoints.load_stream(stream_id) {
                    Ok(Some(stored)) => Ok((token, Some(stored))),
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
        let (token, stored) = self.claim_lease(&stream.id, now, true).ok()?;
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

    fn handle_result(&mut self, result: JobResult) {
        self.in_flight.remove(&result.stream.stream_id);
        let now = Instant::now();
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
    fn snapshot(&self) -> StreamsSnapshot {
        let now = Instant::now();
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
            unreadable_paths: self.unreadable_paths as u64,
            watch_dir_blind: self.table.blind().is_some(),
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
mod tests {
    use super::*;

    #[test]
    fn powers_of_ten_pace_the_repeated_warnings() {
        let warned: Vec<u32> = (1..=1000).filter(|&n| is_power_of_ten(n)).collect();
        assert_eq!(warned, vec![1, 10, 100, 1000]);
    }

    #[test]
    fn instance_ids_are_unique_per_process_and_name_the_host() {
        let (a, b) = (instance_id(), instance_id());
        assert_ne!(a, b);
        assert!(a.contains(&format!("-{}-", std::process::id())), "{a}");
    }
}
