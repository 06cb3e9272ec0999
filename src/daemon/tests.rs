//! The daemon's wiring with real worker threads and in-memory stores.

use super::*;
use crate::lease::HeldLeases;
use crate::rules::Rules;
use crate::scan::{DirectoryLister, FsLister};
use crate::store::StoredStatus;
use crate::testing::{FakeCheckpoints, FakeClock, MemoryStore, config};

#[test]
fn instance_ids_are_unique_per_process_and_name_the_host() {
    let (a, b) = (instance_id(), instance_id());
    assert_ne!(a, b);
    assert!(a.contains(&format!("-{}-", std::process::id())), "{a}");
}

/// Real worker threads, a real directory, in-memory stores: a job that
/// panics is retried and its stream completes, and a drain that starts
/// while a job is panicking ends at once instead of waiting out
/// `SHUTDOWN_TIMEOUT` for a result that never comes.
#[test]
fn a_panicking_job_is_retried_to_completion_and_never_holds_up_a_drain() {
    let dir = tempfile::tempdir().unwrap();
    let chunk = 5 * 1024 * 1024;
    std::fs::write(dir.path().join("cam.mp4"), vec![7u8; chunk + 10]).unwrap();
    let config = config(
        dir.path(),
        &[
            "--chunk-size=5MiB",
            "--stream-timeout=200ms",
            "--retry-base-delay=10ms",
            "--retry-max-delay=50ms",
            "--workers=2",
            "--shutdown-timeout=20s",
        ],
    );
    let checkpoints = FakeCheckpoints::new("replica-0", config.lease.ttl, FakeClock::default());
    let bucket = Arc::new(MemoryStore::default());
    *bucket.panics_left.lock().unwrap() = 1;
    let metrics = Arc::new(Metrics::new());
    let leases = Arc::new(HeldLeases::new(config.lease.ttl));
    let (job_tx, job_rx) = bounded::<Job>(config.workers);
    let (result_tx, results) = bounded::<JobResult>(config.workers * 2);
    let (shutdown_tx, shutdown_rx) = bounded::<()>(1);
    let workers: Vec<_> = (0..config.workers)
        .map(|_| {
            let worker = Worker::new(
                bucket.clone(),
                Box::new(checkpoints.clone()),
                KeyLayout::new(""),
                config.retry,
                shutdown_rx.clone(),
                metrics.clone(),
                leases.clone(),
            );
            let (jobs, results) = (job_rx.clone(), result_tx.clone());
            std::thread::spawn(move || worker.run(jobs, results))
        })
        .collect();
    let mut coordinator = Coordinator::new(
        config.clone(),
        Box::new(checkpoints.clone()),
        Box::new(RealFs),
        job_tx,
        Observers {
            events: metrics.clone(),
            readiness: metrics.readiness(),
            instance: "replica-0".into(),
            leases,
        },
        Instant::now(),
    );
    let mut lister = FsLister::new(
        dir.path().to_path_buf(),
        Rules::default(),
        config.stream_timeout * 2,
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let complete = |checkpoints: &FakeCheckpoints| {
        checkpoints.stream_ids().into_iter().any(|id| {
            checkpoints
                .stream(&id)
                .is_some_and(|stream| stream.status == StoredStatus::Complete)
        })
    };
    while !complete(&checkpoints) {
        assert!(Instant::now() < deadline, "the stream never completed");
        let observations = Observations {
            scan: Some(lister.scan()),
            results: results.try_iter().collect(),
        };
        coordinator.turn(read_clocks(), observations);
        std::thread::sleep(Duration::from_millis(20));
    }
    let (text, _) = metrics.render();
    assert!(
        text.contains("chunkstream_worker_panics_total 1"),
        "the panic was counted"
    );
    let keys: Vec<String> = bucket.objects.lock().unwrap().keys().cloned().collect();
    let count = |suffix: &str| keys.iter().filter(|key| key.contains(suffix)).count();
    assert_eq!(
        count("/chunk-"),
        2,
        "both chunks, after the retry: {keys:?}"
    );
    assert_eq!(count("/metadata.json"), 1, "{keys:?}");

    // A second file, whose first job panics while the drain starts.
    *bucket.panics_left.lock().unwrap() = 1;
    std::fs::write(dir.path().join("cam2.mp4"), vec![8u8; chunk + 10]).unwrap();
    let puts_before = *bucket.puts.lock().unwrap();
    while *bucket.puts.lock().unwrap() == puts_before {
        assert!(
            Instant::now() < deadline,
            "the second stream's job never ran"
        );
        let observations = Observations {
            scan: Some(lister.scan()),
            results: results.try_iter().collect(),
        };
        coordinator.turn(read_clocks(), observations);
        std::thread::sleep(Duration::from_millis(5));
    }
    let started = Instant::now();
    let outcome = drain(
        &mut coordinator,
        &results,
        shutdown_tx,
        config.shutdown_timeout,
    );
    assert_eq!(outcome, RunOutcome::Drained);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "drained in {:?}",
        started.elapsed()
    );
    for worker in workers {
        worker
            .join()
            .expect("every worker thread is alive to the end");
    }
}
