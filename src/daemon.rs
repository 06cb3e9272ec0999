//! The daemon's wiring: start-up, the threads, and the drain on shutdown.
//!
//! Start-up waits for the bucket and Redis (retrying with backoff until a
//! stop), then starts the HTTP server, the probe, the worker pool and the
//! scanner, and hands the coordinator its channels. A stop request ends the
//! coordinator's loop; the drain then lets in-flight jobs settle within
//! `SHUTDOWN_TIMEOUT`. Nothing here decides anything about a stream: that is
//! the coordinator's job.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, Sender, bounded, never, select};
use log::{error, info, warn};

use crate::bandwidth::Bandwidth;
use crate::config::Config;
pub use crate::coordinator::RunOutcome;
use crate::coordinator::{Coordinator, Observations, Observers};
use crate::error::AppError;
use crate::events::Events;
use crate::health::{Dependency, Heartbeat};
use crate::http::{HttpState, StreamsRequest};
use crate::lease::HeldLeases;
use crate::metadata::KeyLayout;
use crate::metrics::Metrics;
use crate::retry::with_backoff;
use crate::scan::{FsLister, Scan};
use crate::store::redis::LeaseHolder;
use crate::store::{
    BucketAdmin, BucketError, CheckpointStore, Integrity, ObjectStore, RedisStore, S3Store,
};
use crate::stream::Now;
use crate::upload::job::{Job, JobResult};
use crate::upload::{BufferPool, Worker, sweep};
use crate::watchfs::RealFs;
use crate::{http, instance, notify, random_u64, scanner};

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
    let wait = |delay| !stop_requested_within(stop, delay);
    with_backoff(config.retry, wait, |_| {
        heartbeat.beat();
        match attempt() {
            Ok(value) => ControlFlow::Break(value),
            Err(err) => {
                error!("{what} failed: {err}; retrying with backoff");
                ControlFlow::Continue(())
            }
        }
    })
}

/// How a start-up check of the bucket ended, when it did not fail in a way
/// worth retrying.
enum BucketCheck {
    /// The bucket is usable; the probe found how uploads are verified.
    Ready(Integrity),
    /// Retrying cannot help (the bucket is missing and may not be created).
    Fatal(String),
}

/// Makes sure the bucket exists, then probes how the server verifies
/// bodies. `Err` is a failure worth retrying.
fn check_bucket(s3: &mut S3Store, config: &Config) -> Result<BucketCheck, String> {
    match s3.ensure_bucket() {
        Err(BucketError::Fatal(reason)) => return Ok(BucketCheck::Fatal(reason)),
        Err(BucketError::Storage(err)) => {
            return Err(format!(
                "bucket {:?} at {}: {err}",
                config.s3.bucket,
                config.s3.endpoint_display()
            ));
        }
        Ok(()) => {}
    }
    s3.probe_integrity()
        .map(BucketCheck::Ready)
        .map_err(|err| format!("checksum probe in bucket {:?}: {err}", config.s3.bucket))
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
    let bandwidth = Arc::new(Bandwidth::new(
        config.bandwidth.clone(),
        crate::upload::worker_threads(config.workers),
    ));
    metrics.watch_bandwidth(bandwidth.clone());
    let mut s3 = S3Store::new(&config.s3)?.with_bandwidth(bandwidth);
    // /readyz names the credential source from the start, not only once the
    // probe thread runs.
    if let Some(health) = s3.credentials_health() {
        events.credentials_refresh(&health);
    }
    let bucket_ready = until_ready(&config, &stop, &heartbeat, "checking bucket", || {
        let checked = check_bucket(&mut s3, &config);
        let shown = match &checked {
            Ok(BucketCheck::Ready(_)) => Ok(()),
            Ok(BucketCheck::Fatal(reason)) | Err(reason) => Err(reason.clone()),
        };
        events.dependency_checked(Dependency::Storage, shown);
        checked
    });
    let integrity = match bucket_ready {
        None => {
            http.stop();
            return Ok(RunOutcome::Drained);
        }
        Some(BucketCheck::Fatal(reason)) => {
            http.stop();
            return Err(AppError::Startup(reason));
        }
        Some(BucketCheck::Ready(integrity)) => integrity,
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

    let threads = crate::upload::worker_threads(config.workers);
    let buffers = BufferPool::new(config.workers);
    let (job_tx, job_rx) = bounded::<Job>(threads);
    let (result_tx, result_rx) = bounded::<JobResult>(threads * 2);
    let (shutdown_tx, shutdown_rx) = bounded::<()>(1);
    let probe = spawn_probe(
        s3.clone(),
        redis_store()?,
        events.clone(),
        &config,
        shutdown_rx.clone(),
    )?;
    let store: Arc<dyn ObjectStore> = Arc::new(s3);
    let mut workers: Vec<JoinHandle<()>> = Vec::with_capacity(threads);
    for number in 0..threads {
        let worker = Worker::new(
            store.clone(),
            Box::new(redis_store()?),
            KeyLayout::new(&config.s3.prefix)
                .with_immutable_objects(config.s3.policy.object_lock.is_some()),
            config.retry,
            shutdown_rx.clone(),
            events.clone(),
            leases.clone(),
        )
        .with_assembly_max_parts(config.assembly_max_parts)
        .with_delete_chunks_after_assembly(config.delete_chunks_after_assembly)
        .with_announcements(config.events.enabled())
        .with_buffer_pool(buffers.clone());
        let (jobs, results) = (job_rx.clone(), result_tx.clone());
        let handle = std::thread::Builder::new()
            .name(format!("worker-{number}"))
            .spawn(move || worker.run(jobs, results))
            .map_err(|err| AppError::Startup(format!("cannot start worker thread: {err}")))?;
        workers.push(handle);
    }
    let delivery = if config.events.enabled() {
        let outbox = Box::new(redis_store()?);
        let thread = notify::spawn_delivery(
            outbox,
            &config.events,
            config.retry,
            events.clone(),
            shutdown_rx.clone(),
        )
        .map_err(|err| AppError::Startup(format!("cannot start events thread: {err}")))?;
        Some(thread)
    } else {
        None
    };
    let (scans, _scanner) = scanner::spawn(
        Box::new(FsLister::new(
            config.watch_dir.clone(),
            config.rules.clone(),
            // Quiet for twice the completion timeout: complete, or waiting.
            config.stream_timeout * 2,
        )),
        config.poll_interval,
        events.clone(),
        shutdown_rx.clone(),
    )
    .map_err(|err| AppError::Startup(format!("cannot start scanner thread: {err}")))?;
    drop((job_rx, result_tx, shutdown_rx));

    let mut coordinator = Coordinator::new(
        config.clone(),
        Box::new(checkpoints),
        Box::new(RealFs),
        job_tx,
        Observers {
            events,
            readiness: metrics.readiness(),
            instance,
            leases,
        },
        Instant::now(),
    );
    let resumed = coordinator.resume(stored, Instant::now());
    info!("resumed {resumed} streams from checkpoints");
    let liveness_beat = config.poll_interval;
    drive(
        &mut coordinator,
        Inputs {
            scans,
            results: result_rx.clone(),
            streams: streams_rx,
        },
        &stop,
        (&heartbeat, liveness_beat),
    );
    let outcome = drain(
        &mut coordinator,
        &result_rx,
        shutdown_tx,
        config.shutdown_timeout,
    );
    // The scanner is not joined: a walk hung on a dead mount would hold the
    // exit up; it ends with the process.
    if outcome == RunOutcome::Drained {
        for worker in workers {
            let _ = worker.join();
        }
        let _ = probe.join();
        if let Some(delivery) = delivery {
            let _ = delivery.join();
        }
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

/// What the coordinator's loop waits on.
struct Inputs {
    scans: Receiver<Scan>,
    results: Receiver<JobResult>,
    streams: Receiver<StreamsRequest>,
}

/// The coordinator's loop: a turn whenever a scan or a job result arrives,
/// a lease renewal is due, or `beat` (the heartbeat) passes, until a stop is
/// requested.
fn drive(
    coordinator: &mut Coordinator,
    mut inputs: Inputs,
    stop: &Receiver<()>,
    (heartbeat, beat): (&Heartbeat, Duration),
) {
    let mut observations = Observations::default();
    loop {
        coordinator.turn(read_clocks(), std::mem::take(&mut observations));
        heartbeat.beat();
        let wait = coordinator
            .next_deadline()
            .saturating_duration_since(Instant::now())
            .min(beat);
        select! {
            recv(inputs.scans) -> scan => match scan {
                Ok(scan) => observations.scan = Some(scan),
                Err(_) => {
                    // Only a bug ends the scanner early; /healthz then shows
                    // no new scans. Never spin on the closed channel.
                    error!("the scanner thread ended; no more scans");
                    inputs.scans = never();
                }
            },
            recv(inputs.results) -> result => match result {
                Ok(result) => observations.results.push(result),
                Err(_) => inputs.results = never(),
            },
            recv(inputs.streams) -> request => match request {
                Ok(reply) => {
                    let _ = reply.try_send(coordinator.snapshot(Instant::now()));
                }
                Err(_) => inputs.streams = never(),
            },
            recv(stop) -> _ => {
                info!("shutdown requested: no new scans or jobs; draining in-flight work");
                return;
            }
            default(wait) => {}
        }
        observations.results.extend(inputs.results.try_iter());
    }
}

/// Both clocks, now: the coordinator and the streams read none themselves.
fn read_clocks() -> Now {
    Now {
        instant: Instant::now(),
        wall: SystemTime::now(),
    }
}

/// Lets in-flight jobs finish (each is at most one chunk's work), within
/// `timeout`. Dropping `shutdown` tells workers to stop retrying and to
/// cancel queued jobs; every job, even one that panicked, reports back.
fn drain(
    coordinator: &mut Coordinator,
    results: &Receiver<JobResult>,
    shutdown: Sender<()>,
    timeout: Duration,
) -> RunOutcome {
    drop(shutdown);
    coordinator.begin_drain();
    let deadline = Instant::now() + timeout;
    while coordinator.has_jobs_out() {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(result) = results.recv_timeout(left) else {
            break;
        };
        let observations = Observations {
            scan: None,
            results: vec![result],
        };
        coordinator.turn(read_clocks(), observations);
    }
    coordinator.finish_drain()
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
                if let Some(health) = s3.credentials_health() {
                    events.credentials_refresh(&health);
                }
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

#[cfg(test)]
mod tests;
