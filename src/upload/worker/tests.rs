//! The worker's jobs against an in-memory bucket and checkpoint store.

use std::collections::BTreeMap;
use std::io::Write;

use super::*;
use crate::config::RetryPolicy;
use crate::events::NoEvents;
use crate::metadata::{StreamMetadata, StreamStatus};
use crate::scan::FileIdentity;
use crate::store::ports::AssemblyProgress;
use crate::testing::{MemoryCheckpoints, MemoryStore};
use crate::upload::job::{AssembleJob, StreamRef};
use crate::upload::job::{FinalizeJob, StreamFacts};
use std::time::Duration;

/// The fencing token the test jobs run under.
const TOKEN: u64 = 1;

fn worker(store: Arc<MemoryStore>, checkpoints: MemoryCheckpoints) -> (Worker, Sender<()>) {
    let (shutdown_tx, shutdown_rx) = crossbeam_channel::bounded(1);
    let worker = Worker::new(
        store,
        Box::new(checkpoints),
        KeyLayout::new("p/"),
        RetryPolicy {
            base_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(5),
        },
        shutdown_rx,
        Arc::new(NoEvents),
        held_leases(&["a-1", "cam-1"]),
    );
    (worker, shutdown_tx)
}

/// Leases on `streams` with [`TOKEN`], trusted for an hour.
fn held_leases(streams: &[&str]) -> Arc<HeldLeases> {
    let leases = Arc::new(HeldLeases::new(Duration::from_secs(3600)));
    for stream in streams {
        leases.renewed(stream, TOKEN, Instant::now());
    }
    leases
}

/// A file `cam.mp4` holding `content`, an in-memory bucket and checkpoint
/// store, and a worker wired to them, for stream `cam-1`.
struct Fixture {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    store: Arc<MemoryStore>,
    checkpoints: MemoryCheckpoints,
    worker: Worker,
    _keep: Sender<()>,
    stream: StreamRef,
}

impl Fixture {
    fn new(content: &[u8]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cam.mp4");
        std::fs::write(&path, content).unwrap();
        let store = Arc::new(MemoryStore::default());
        let checkpoints = MemoryCheckpoints::default();
        let (worker, keep) = worker(store.clone(), checkpoints.clone());
        let stream = StreamRef {
            identity: identity_of(&path),
            stream_id: "cam-1".into(),
            token: TOKEN,
        };
        Self {
            _dir: dir,
            path,
            store,
            checkpoints,
            worker,
            _keep: keep,
            stream,
        }
    }
}

fn identity_of(path: &Path) -> FileIdentity {
    let meta = std::fs::metadata(path).unwrap();
    FileIdentity {
        device: meta.dev(),
        inode: meta.ino(),
    }
}

#[test]
fn a_chunk_is_retried_through_failures_then_checkpointed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.mp4");
    std::fs::write(&path, b"0123456789abcdef").unwrap();
    let store = Arc::new(MemoryStore::default());
    *store.failures_left.lock().unwrap() = 3;
    let checkpoints = MemoryCheckpoints::default();
    let (mut worker, _keep) = worker(store.clone(), checkpoints.clone());
    let result = worker.execute(Job::Chunk(ChunkJob {
        stream: StreamRef {
            identity: identity_of(&path),
            stream_id: "a-1".into(),
            token: TOKEN,
        },
        path: path.clone(),
        index: 1,
        offset: 8,
        len: 8,
        whole_sha256_before: None,
    }));
    let Outcome::ChunkUploaded(record) = result.outcome else {
        panic!("{:?}", result.outcome)
    };
    assert_eq!(record.key, "p/a-1/chunk-000001");
    assert_eq!(store.get(&record.key).unwrap(), b"89abcdef");
    assert_eq!(*store.puts.lock().unwrap(), 4);
    assert_eq!(checkpoints.chunks.lock().unwrap().len(), 1);
}

/// Counts panicked jobs.
#[derive(Default)]
struct PanicCount(std::sync::atomic::AtomicU32);

impl Events for PanicCount {
    fn worker_panicked(&self) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

#[test]
fn a_panicking_job_becomes_a_failed_result_and_the_worker_lives_on() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.mp4");
    std::fs::write(&path, b"0123456789abcdef").unwrap();
    let store = Arc::new(MemoryStore::default());
    *store.panics_left.lock().unwrap() = 1;
    let checkpoints = MemoryCheckpoints::default();
    let (mut worker, keep) = worker(store.clone(), checkpoints.clone());
    let panics = Arc::new(PanicCount::default());
    worker.events = panics.clone();
    let job = Job::Chunk(ChunkJob {
        stream: StreamRef {
            identity: identity_of(&path),
            stream_id: "a-1".into(),
            token: TOKEN,
        },
        path: path.clone(),
        index: 0,
        offset: 0,
        len: 8,
        whole_sha256_before: None,
    });
    let (jobs_tx, jobs_rx) = crossbeam_channel::bounded(1);
    let (results_tx, results_rx) = crossbeam_channel::bounded(1);
    let thread = std::thread::spawn(move || worker.run(jobs_rx, results_tx));
    jobs_tx.send(job.clone()).unwrap();
    let failed = results_rx.recv_timeout(Duration::from_secs(5)).unwrap();
    let Outcome::Failed(reason) = &failed.outcome else {
        panic!("{:?}", failed.outcome)
    };
    assert!(reason.contains("injected panic"), "{reason}");
    assert_eq!(failed.stream.stream_id, "a-1");
    assert_eq!(panics.0.load(std::sync::atomic::Ordering::SeqCst), 1);
    // The same thread takes the retry, which succeeds.
    jobs_tx.send(job).unwrap();
    let retried = results_rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert!(
        matches!(retried.outcome, Outcome::ChunkUploaded(_)),
        "{:?}",
        retried.outcome
    );
    assert_eq!(store.get("p/a-1/chunk-000000").unwrap(), b"01234567");
    // Closing the job channel ends the thread at once: nothing is stuck.
    drop((jobs_tx, keep));
    let started = Instant::now();
    thread.join().unwrap();
    assert!(started.elapsed() < Duration::from_secs(1));
}

#[test]
fn a_shutdown_cancels_retries_and_queued_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.mp4");
    std::fs::write(&path, b"0123456789").unwrap();
    let store = Arc::new(MemoryStore::default());
    *store.failures_left.lock().unwrap() = u32::MAX;
    let (mut worker, shutdown) = worker(store, MemoryCheckpoints::default());
    drop(shutdown);
    let result = worker.execute(Job::Chunk(ChunkJob {
        stream: StreamRef {
            identity: identity_of(&path),
            stream_id: "a-1".into(),
            token: TOKEN,
        },
        path,
        index: 0,
        offset: 0,
        len: 10,
        whole_sha256_before: None,
    }));
    assert_eq!(result.outcome, Outcome::Cancelled);
}

/// Completing `cam.mp4` (8-byte chunks) at `size`, with these chunks
/// already uploaded.
fn finalize_job(
    stream: StreamRef,
    path: &Path,
    size: u64,
    chunks: BTreeMap<u64, ChunkRecord>,
) -> Job {
    Job::Finalize(FinalizeJob {
        stream,
        path: path.to_path_buf(),
        facts: StreamFacts {
            rel_path: "cam.mp4".into(),
            file_name: "cam.mp4".into(),
            chunk_size: 8,
            started_at: SystemTime::now(),
            last_change_at: SystemTime::now(),
            revision: 1,
        },
        expected_size: size,
        chunks,
        release_lease: true,
    })
}

#[test]
fn a_replica_that_lost_the_stream_writes_no_metadata_and_no_completion() {
    let fixture = Fixture::new(b"AAAAAAAABB");
    let Fixture {
        path,
        store,
        checkpoints,
        mut worker,
        stream,
        _keep,
        _dir,
        ..
    } = fixture;
    // Chunks went up, then another replica claimed the stream.
    checkpoints
        .taken_over
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let result = worker.execute(finalize_job(stream, &path, 10, BTreeMap::new()));
    assert_eq!(result.outcome, Outcome::LeaseLost);
    assert!(store.get("p/cam-1/metadata.json").is_err());
    assert!(checkpoints.completed.lock().unwrap().is_empty());
    assert!(checkpoints.chunks.lock().unwrap().is_empty());
}

#[test]
fn no_object_is_written_once_the_lease_can_no_longer_be_trusted() {
    let Fixture {
        path,
        store,
        mut worker,
        stream,
        _keep,
        _dir,
        ..
    } = Fixture::new(b"AAAAAAAABB");
    worker.leases.revoke("cam-1");
    let result = worker.execute(finalize_job(stream.clone(), &path, 10, BTreeMap::new()));
    assert_eq!(result.outcome, Outcome::LeaseLost);
    assert_eq!(*store.puts.lock().unwrap(), 0);
    // A claim with another token does not count either.
    worker.leases.renewed("cam-1", TOKEN + 1, Instant::now());
    let result = worker.execute(finalize_job(stream, &path, 10, BTreeMap::new()));
    assert_eq!(result.outcome, Outcome::LeaseLost);
    assert_eq!(*store.puts.lock().unwrap(), 0);
}

#[test]
fn finalize_reuploads_changed_chunks_and_writes_metadata() {
    let chunk = 8u64;
    let Fixture {
        _dir,
        path,
        store,
        checkpoints,
        mut worker,
        _keep,
        stream,
    } = Fixture::new(b"AAAAAAAABBBBBBBBCC");
    // Chunk 0 was uploaded before the writer patched its first bytes.
    let stale = ChunkRecord {
        index: 0,
        key: "p/cam-1/chunk-000000".into(),
        offset: 0,
        size_bytes: chunk,
        sha256: hex::encode(sha256(b"xxxxxxxx")),
        uploaded_at: rfc3339(SystemTime::now()),
        xxh3: None,
        whole_sha256: None,
    };
    let result = worker.execute(finalize_job(
        stream,
        &path,
        18,
        BTreeMap::from([(0, stale)]),
    ));
    assert!(
        matches!(result.outcome, Outcome::Finalized { size: 18, .. }),
        "{:?}",
        result.outcome
    );
    let chunks = result.chunks.unwrap();
    assert_eq!(chunks.len(), 3);
    assert_eq!(store.get("p/cam-1/chunk-000000").unwrap(), b"AAAAAAAA");
    assert_eq!(store.get("p/cam-1/chunk-000002").unwrap(), b"CC");
    let metadata: StreamMetadata =
        serde_json::from_slice(&store.get("p/cam-1/metadata.json").unwrap()).unwrap();
    assert_eq!(metadata.status, StreamStatus::Complete);
    assert_eq!(
        metadata.sha256.as_deref(),
        Some(hex::encode(sha256(b"AAAAAAAABBBBBBBBCC")).as_str())
    );
    assert_eq!(metadata.check_chunk_layout(), Ok(()));
    assert_eq!(metadata.media.duration_seconds, None);
    assert_eq!(checkpoints.completed.lock().unwrap().as_slice(), ["cam-1"]);
}

#[test]
fn finalize_of_a_file_that_changed_size_is_interrupted() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cam.mp4");
    std::fs::write(&path, b"AAAA").unwrap();
    let (mut worker, _keep) = worker(
        Arc::new(MemoryStore::default()),
        MemoryCheckpoints::default(),
    );
    let stream = StreamRef {
        identity: identity_of(&path),
        stream_id: "cam-1".into(),
        token: TOKEN,
    };
    let result = worker.execute(finalize_job(stream, &path, 3, BTreeMap::new()));
    assert_eq!(result.outcome, Outcome::FinalizeInterrupted);
}

#[test]
fn assembly_copies_the_chunks_server_side_and_records_it_in_the_metadata() {
    let Fixture {
        _dir,
        path,
        store,
        checkpoints,
        mut worker,
        _keep,
        stream,
    } = Fixture::new(b"AAAAAAAABBBBBBBBCC");
    let finalized = worker.execute(finalize_job(stream.clone(), &path, 18, BTreeMap::new()));
    assert!(matches!(finalized.outcome, Outcome::Finalized { .. }));
    // A stale upload of an older revision is aborted first.
    let stale = store
        .initiate_multipart("p/cam-1/cam.mp4", "video/mp4")
        .unwrap();
    *checkpoints.assembly.lock().unwrap() = Some(AssemblyProgress {
        revision: 0,
        key: "p/cam-1/cam.mp4".into(),
        upload_id: stale.clone(),
        parts: BTreeMap::new(),
    });

    let result = worker.execute(Job::Assemble(AssembleJob {
        stream,
        revision: 1,
    }));
    assert_eq!(result.outcome, Outcome::Assembled { revision: 1 });
    assert_eq!(store.get("p/cam-1/cam.mp4").unwrap(), b"AAAAAAAABBBBBBBBCC");
    assert!(
        !store.uploads.lock().unwrap().contains_key(&stale),
        "stale upload aborted"
    );
    let metadata: StreamMetadata =
        serde_json::from_slice(&store.get("p/cam-1/metadata.json").unwrap()).unwrap();
    let assembled = metadata.assembled.expect("assembled recorded");
    assert_eq!(assembled.key, "p/cam-1/cam.mp4");
    assert_eq!(assembled.size_bytes, 18);
    assert_eq!(*checkpoints.assembled_revision.lock().unwrap(), 1);
    assert!(checkpoints.assembly.lock().unwrap().is_none());
}

#[test]
fn a_completion_queues_its_event_with_the_revision_sizes_and_keys() {
    let Fixture {
        _dir,
        path,
        checkpoints,
        worker,
        _keep,
        stream,
        ..
    } = Fixture::new(b"AAAAAAAABBBBBBBBCC");
    let mut worker = worker.with_announcements(true);
    let result = worker.execute(finalize_job(stream, &path, 18, BTreeMap::new()));
    assert!(matches!(result.outcome, Outcome::Finalized { .. }));
    let announced = checkpoints.announced.lock().unwrap().clone();
    assert_eq!(announced.len(), 1, "{announced:?}");
    assert_eq!(announced[0].id, "cam-1/1/stream.completed");
    let event: crate::notify::StreamEvent = serde_json::from_str(&announced[0].json).unwrap();
    assert_eq!(event.size_bytes, Some(18));
    assert_eq!(
        event.sha256.as_deref(),
        Some(hex::encode(sha256(b"AAAAAAAABBBBBBBBCC")).as_str())
    );
    let objects = event.objects.unwrap();
    assert_eq!(objects.metadata, "p/cam-1/metadata.json");
    assert_eq!(objects.chunk_prefix, "p/cam-1/chunk-");
    assert_eq!(objects.chunk_count, 3);
    assert_eq!(event.source.path, "cam.mp4");
}

#[test]
fn without_a_destination_a_completion_queues_no_event() {
    let Fixture {
        _dir,
        path,
        checkpoints,
        mut worker,
        _keep,
        stream,
        ..
    } = Fixture::new(b"AAAAAAAABB");
    let result = worker.execute(finalize_job(stream, &path, 10, BTreeMap::new()));
    assert!(matches!(result.outcome, Outcome::Finalized { .. }));
    assert!(checkpoints.announced.lock().unwrap().is_empty());
}

#[test]
fn a_close_queues_stream_failed_with_the_reason_and_the_uploaded_prefix() {
    let Fixture {
        _dir,
        checkpoints,
        worker,
        _keep,
        stream,
        ..
    } = Fixture::new(b"AAAAAAAABB");
    let mut worker = worker.with_announcements(true);
    let chunk = chunk_zero_from_an_earlier_upload();
    let close = Job::Close(crate::upload::job::CloseJob {
        stream,
        facts: StreamFacts {
            rel_path: "cam.mp4".into(),
            file_name: "cam.mp4".into(),
            chunk_size: 8,
            started_at: SystemTime::now(),
            last_change_at: SystemTime::now(),
            revision: 1,
        },
        reason: crate::stream::state::CloseReason::Vanished,
        chunks: BTreeMap::from([(0, chunk)]),
    });
    assert_eq!(worker.execute(close).outcome, Outcome::Closed);
    let announced = checkpoints.announced.lock().unwrap().clone();
    assert_eq!(announced.len(), 1, "{announced:?}");
    assert_eq!(announced[0].id, "cam-1/1/stream.failed");
    let event: crate::notify::StreamEvent = serde_json::from_str(&announced[0].json).unwrap();
    assert_eq!(event.reason.as_deref(), Some("vanished"));
    assert_eq!(event.size_bytes, Some(8));
    assert_eq!(event.objects.unwrap().chunk_count, 1);
}

/// The record of chunk 0 holding `AAAAAAAA` as an earlier upload (or
/// metadata.json) gives it: without the checkpoint-only hashes.
fn chunk_zero_from_an_earlier_upload() -> ChunkRecord {
    ChunkRecord {
        index: 0,
        key: "p/cam-1/chunk-000000".into(),
        offset: 0,
        size_bytes: 8,
        sha256: hex::encode(sha256(b"AAAAAAAA")),
        uploaded_at: rfc3339(SystemTime::now()),
        xxh3: None,
        whole_sha256: None,
    }
}

/// Uploads every full 8-byte chunk of the fixture's file in order, as the
/// coordinator dispatches them, and returns their records.
fn upload_full_chunks(fixture: &mut Fixture, size: u64) -> BTreeMap<u64, ChunkRecord> {
    let mut chunks = BTreeMap::new();
    for index in 0..size / 8 {
        let result = fixture.worker.execute(Job::Chunk(ChunkJob {
            stream: fixture.stream.clone(),
            path: fixture.path.clone(),
            index,
            offset: index * 8,
            len: 8,
            whole_sha256_before: crate::metadata::whole_sha256_before(&chunks, index),
        }));
        let Outcome::ChunkUploaded(record) = result.outcome else {
            panic!("{:?}", result.outcome)
        };
        chunks.insert(index, *record);
    }
    chunks
}

fn completed_metadata(store: &MemoryStore) -> StreamMetadata {
    serde_json::from_slice(&store.get("p/cam-1/metadata.json").unwrap()).unwrap()
}

#[test]
fn completion_of_an_unchanged_file_uploads_only_the_tail_and_the_metadata() {
    let content = b"AAAAAAAABBBBBBBBCCCCCCCCDD";
    let mut fixture = Fixture::new(content);
    let chunks = upload_full_chunks(&mut fixture, 26);
    assert!(
        chunks
            .values()
            .all(|c| c.xxh3.is_some() && c.whole_sha256.is_some())
    );
    let puts_before = *fixture.store.puts.lock().unwrap();
    let job = finalize_job(fixture.stream.clone(), &fixture.path, 26, chunks);
    let result = fixture.worker.execute(job);
    assert!(matches!(
        result.outcome,
        Outcome::Finalized { size: 26, .. }
    ));
    assert_eq!(*fixture.store.puts.lock().unwrap(), puts_before + 2);
    let metadata = completed_metadata(&fixture.store);
    assert_eq!(metadata.sha256, Some(hex::encode(sha256(content))));
    assert_eq!(metadata.chunks.len(), 4);
    // Every chunk lists its fast hash; only the last full chunk (2) keeps
    // the whole-file state, for a later revision to resume from.
    assert!(metadata.chunks.iter().all(|c| c.xxh3.is_some()));
    let with_state: Vec<u64> = metadata
        .chunks
        .iter()
        .filter(|c| c.whole_sha256.is_some())
        .map(|c| c.index)
        .collect();
    assert_eq!(with_state, [2]);
}

#[test]
fn completion_finds_a_rewritten_chunk_by_its_fast_hash_and_rehashes_the_file() {
    let mut fixture = Fixture::new(b"AAAAAAAABBBBBBBBCCCCCCCCDD");
    let chunks = upload_full_chunks(&mut fixture, 26);
    // The writer patches a header field in chunk 0 at the end.
    let content = b"AxAAAAAABBBBBBBBCCCCCCCCDD";
    std::fs::write(&fixture.path, content).unwrap();
    let job = finalize_job(fixture.stream.clone(), &fixture.path, 26, chunks);
    let result = fixture.worker.execute(job);
    assert!(matches!(
        result.outcome,
        Outcome::Finalized { size: 26, .. }
    ));
    assert_eq!(
        fixture.store.get("p/cam-1/chunk-000000").unwrap(),
        b"AxAAAAAA"
    );
    let metadata = completed_metadata(&fixture.store);
    assert_eq!(metadata.sha256, Some(hex::encode(sha256(content))));
    assert_eq!(metadata.chunks[0].sha256, hex::encode(sha256(b"AxAAAAAA")));
    assert_eq!(metadata.chunks[1].sha256, hex::encode(sha256(b"BBBBBBBB")));
    // The records this completion left hold states for the bytes on disk
    // (chunk 1's was computed over the old chunk 0, and is replaced): a
    // later walk resumes from them without hashing.
    let records = result.chunks.unwrap();
    let mut whole = crate::chunk_hash::WholeFile::new(8);
    for (index, bytes) in content.chunks(8).enumerate() {
        let xxh3 = crate::chunk_hash::fast_hash(bytes);
        let chunk = crate::chunk_hash::ChunkOnDisk {
            index: index as u64,
            size: bytes.len() as u64,
            xxh3: &xxh3,
            unchanged: true,
        };
        let recorded = records[&(index as u64)].whole_sha256.as_ref();
        assert!(matches!(
            whole.resume(&chunk, recorded, false),
            crate::chunk_hash::Resumption::Resumed(_)
        ));
    }
    assert_eq!(whole.hashed_bytes(), 0);
    assert_eq!(whole.finish(), sha256(content));
}

#[test]
fn a_record_from_before_the_fast_hash_is_verified_with_sha256() {
    let content = b"AAAAAAAABB";
    let Fixture {
        _dir,
        path,
        store,
        mut worker,
        _keep,
        stream,
        ..
    } = Fixture::new(content);
    let old = chunk_zero_from_an_earlier_upload();
    let result = worker.execute(finalize_job(stream, &path, 10, BTreeMap::from([(0, old)])));
    assert!(matches!(
        result.outcome,
        Outcome::Finalized { size: 10, .. }
    ));
    // Only the tail and the metadata: chunk 0 matched its sha256.
    assert_eq!(*store.puts.lock().unwrap(), 2);
    let metadata = completed_metadata(&store);
    assert_eq!(metadata.sha256, Some(hex::encode(sha256(content))));
}

#[test]
fn a_grown_revision_checks_the_records_read_back_from_metadata_by_their_fast_hash() {
    let mut fixture = Fixture::new(b"AAAAAAAABBBBBBBBCC");
    let chunks = upload_full_chunks(&mut fixture, 18);
    let first = fixture.worker.execute(finalize_job(
        fixture.stream.clone(),
        &fixture.path,
        18,
        chunks,
    ));
    assert!(matches!(first.outcome, Outcome::Finalized { size: 18, .. }));
    // The file grows, and its writer rewrites chunk 1 on the way. Redis and
    // the coordinator dropped revision 1's records at its completion;
    // metadata.json lists them with their xxh3, and the whole-file state
    // after chunk 1, which no longer matches: completion passes chunk 0
    // over, finds chunk 1 changed, and reads chunk 0 again to hash it.
    let content = b"AAAAAAAABxBBBBBBCCCCCCCCDD";
    std::fs::write(&fixture.path, content).unwrap();
    let dropped = BTreeMap::new();
    let grown = fixture.worker.execute(Job::Chunk(ChunkJob {
        stream: fixture.stream.clone(),
        path: fixture.path.clone(),
        index: 2,
        offset: 16,
        len: 8,
        whole_sha256_before: crate::metadata::whole_sha256_before(&dropped, 2),
    }));
    let Outcome::ChunkUploaded(chunk_2) = grown.outcome else {
        panic!("{:?}", grown.outcome)
    };
    assert!(chunk_2.whole_sha256.is_none());
    let puts_before = *fixture.store.puts.lock().unwrap();
    let Job::Finalize(mut second) = finalize_job(
        fixture.stream.clone(),
        &fixture.path,
        26,
        BTreeMap::from([(2, *chunk_2)]),
    ) else {
        unreachable!()
    };
    second.facts.revision = 2;
    let result = fixture.worker.execute(Job::Finalize(second));
    assert!(
        matches!(result.outcome, Outcome::Finalized { size: 26, .. }),
        "{:?}",
        result.outcome
    );
    // Chunk 1 (changed), the tail and the metadata; chunk 0 matched the
    // xxh3 metadata.json lists for it.
    assert_eq!(*fixture.store.puts.lock().unwrap(), puts_before + 3);
    assert_eq!(
        fixture.store.get("p/cam-1/chunk-000001").unwrap(),
        b"BxBBBBBB"
    );
    let metadata = completed_metadata(&fixture.store);
    assert_eq!(metadata.revision, 2);
    assert_eq!(metadata.sha256, Some(hex::encode(sha256(content))));
    let listed: Vec<_> = metadata.chunks.iter().map(|c| c.sha256.clone()).collect();
    let expected: Vec<_> = content
        .chunks(8)
        .map(|bytes| hex::encode(sha256(bytes)))
        .collect();
    assert_eq!(listed, expected);
}

/// The disposal of `cam.mp4` as completed at its current size and mtime.
fn dispose_job(fixture: &Fixture, action: crate::config::OnComplete) -> Job {
    let meta = std::fs::metadata(&fixture.path).unwrap();
    Job::Dispose(crate::upload::job::DisposeJob {
        stream: fixture.stream.clone(),
        path: fixture.path.clone(),
        rel_path: "cam.mp4".into(),
        revision: 1,
        size: meta.len(),
        mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
        assembled: false,
        action,
    })
}

/// `cam.mp4` completed (its chunks and metadata.json in the bucket).
fn completed_fixture() -> Fixture {
    let mut fixture = Fixture::new(b"AAAAAAAABB");
    let finalize = finalize_job(fixture.stream.clone(), &fixture.path, 10, BTreeMap::new());
    let result = fixture.worker.execute(finalize);
    assert!(
        matches!(result.outcome, Outcome::Finalized { .. }),
        "{:?}",
        result.outcome
    );
    fixture
}

#[test]
fn a_verified_unchanged_file_is_deleted() {
    let mut fixture = completed_fixture();
    let job = dispose_job(&fixture, crate::config::OnComplete::Delete);
    let result = fixture.worker.execute(job);
    assert_eq!(
        result.outcome,
        Outcome::Disposed {
            disposal: crate::events::Disposal::Deleted,
            size: 10,
            sha256: hex::encode(sha256(b"AAAAAAAABB")),
        }
    );
    assert!(!fixture.path.exists());
}

#[test]
fn a_file_that_changed_since_verification_is_kept() {
    let mut fixture = completed_fixture();
    let job = dispose_job(&fixture, crate::config::OnComplete::Delete);
    // An append after the completion the job was made for.
    std::fs::OpenOptions::new()
        .append(true)
        .open(&fixture.path)
        .unwrap()
        .write_all(b"C")
        .unwrap();
    let result = fixture.worker.execute(job);
    let Outcome::DisposalRefused { seen, .. } = result.outcome else {
        panic!("{:?}", result.outcome)
    };
    assert_eq!(seen.map(|(size, _)| size), Some(11));
    assert_eq!(std::fs::read(&fixture.path).unwrap(), b"AAAAAAAABBC");
}

#[test]
fn a_stream_missing_from_s3_is_not_disposed_of() {
    let mut fixture = completed_fixture();
    fixture.store.delete("p/cam-1/chunk-000001").unwrap();
    let job = dispose_job(&fixture, crate::config::OnComplete::Delete);
    let result = fixture.worker.execute(job);
    let Outcome::Failed(reason) = &result.outcome else {
        panic!("{:?}", result.outcome)
    };
    assert!(reason.contains("chunk-000001 is missing"), "{reason}");
    assert!(fixture.path.exists());
}

#[test]
fn a_replica_that_lost_the_stream_disposes_of_nothing() {
    let mut fixture = completed_fixture();
    fixture
        .checkpoints
        .taken_over
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let job = dispose_job(&fixture, crate::config::OnComplete::Delete);
    let result = fixture.worker.execute(job);
    assert_eq!(result.outcome, Outcome::LeaseLost);
    assert!(fixture.path.exists());
}

#[test]
fn a_move_renames_into_the_completed_directory() {
    let mut fixture = completed_fixture();
    let completed = tempfile::tempdir().unwrap();
    let job = dispose_job(
        &fixture,
        crate::config::OnComplete::Move(completed.path().to_path_buf()),
    );
    let result = fixture.worker.execute(job);
    let moved = completed.path().join("cam.mp4");
    assert_eq!(
        result.outcome,
        Outcome::Disposed {
            disposal: crate::events::Disposal::Moved(moved.clone()),
            size: 10,
            sha256: hex::encode(sha256(b"AAAAAAAABB")),
        }
    );
    assert_eq!(std::fs::read(moved).unwrap(), b"AAAAAAAABB");
    assert!(!fixture.path.exists());
}

#[test]
fn chunks_deleted_after_a_verified_assembly_leave_a_readable_stream() {
    let mut fixture = Fixture::new(b"AAAAAAAABBBBBBBBCC");
    fixture.worker = std::mem::replace(
        &mut fixture.worker,
        worker(fixture.store.clone(), fixture.checkpoints.clone()).0,
    )
    .with_delete_chunks_after_assembly(true);
    let finalize = finalize_job(fixture.stream.clone(), &fixture.path, 18, BTreeMap::new());
    assert!(matches!(
        fixture.worker.execute(finalize).outcome,
        Outcome::Finalized { .. }
    ));
    let assemble = || {
        Job::Assemble(AssembleJob {
            stream: fixture.stream.clone(),
            revision: 1,
        })
    };
    let result = fixture.worker.execute(assemble());
    assert_eq!(result.outcome, Outcome::Assembled { revision: 1 });
    let store = fixture.store.as_ref();
    let layout = KeyLayout::new("p/");
    let metadata = crate::readback::fetch_metadata(store, &layout, "cam-1").unwrap();
    assert!(metadata.chunks_deleted);
    assert_eq!(metadata.chunks.len(), 3, "chunk records kept");
    for chunk in &metadata.chunks {
        assert_eq!(
            store.head(&chunk.key).unwrap(),
            None,
            "{} deleted",
            chunk.key
        );
    }
    assert!(crate::inventory::verify_stream(store, &layout, "cam-1", true).is_empty());
    assert!(crate::inventory::verify_stream(store, &layout, "cam-1", false).is_empty());
    let out = tempfile::tempdir().unwrap();
    let restored = out.path().join("restored.mp4");
    crate::restore::restore_from(store, &layout, "cam-1", &restored, false).unwrap();
    assert_eq!(std::fs::read(&restored).unwrap(), b"AAAAAAAABBBBBBBBCC");

    // A crash between recording the deletion and finishing it: the job
    // runs again and only finishes the deletion.
    store
        .put(
            "p/cam-1/chunk-000001",
            b"BBBBBBBB",
            "application/octet-stream",
            &sha256(b"BBBBBBBB"),
        )
        .unwrap();
    assert_eq!(
        fixture.worker.execute(assemble()).outcome,
        Outcome::Assembled { revision: 1 }
    );
    assert_eq!(store.head("p/cam-1/chunk-000001").unwrap(), None);

    // A corrupted assembled object: verify names the chunk whose range differs.
    store
        .put(
            "p/cam-1/cam.mp4",
            b"AAAAAAAABBBBBBBXCC",
            "video/mp4",
            &sha256(b"AAAAAAAABBBBBBBXCC"),
        )
        .unwrap();
    let problems = crate::inventory::verify_stream(store, &layout, "cam-1", true);
    assert!(
        problems.iter().any(|p| p.contains("chunk 1")),
        "{problems:?}"
    );
}

#[test]
fn disposal_verifies_the_assembled_object_when_the_chunks_are_deleted() {
    let mut fixture = completed_fixture();
    let layout = KeyLayout::new("p/");
    let mut metadata =
        crate::readback::fetch_metadata(fixture.store.as_ref(), &layout, "cam-1").unwrap();
    for chunk in &metadata.chunks {
        fixture.store.delete(&chunk.key).unwrap();
    }
    metadata.assembled = Some(crate::metadata::Assembled {
        key: "p/cam-1/cam.mp4".into(),
        size_bytes: 10,
        etag: String::new(),
    });
    metadata.chunks_deleted = true;
    let body = serde_json::to_vec(&metadata).unwrap();
    let put = |key: &str, bytes: &[u8]| {
        fixture
            .store
            .put(key, bytes, "application/json", &sha256(bytes))
            .unwrap();
    };
    put("p/cam-1/metadata.json", &body);
    let job = dispose_job(&fixture, crate::config::OnComplete::Delete);
    let Outcome::Failed(reason) = fixture.worker.execute(job).outcome else {
        panic!("disposed of a stream whose assembled object is missing")
    };
    assert!(reason.contains("p/cam-1/cam.mp4 is missing"), "{reason}");
    assert!(fixture.path.exists());

    put("p/cam-1/cam.mp4", b"AAAAAAAABB");
    let job = dispose_job(&fixture, crate::config::OnComplete::Delete);
    assert_eq!(
        fixture.worker.execute(job).outcome,
        Outcome::Disposed {
            disposal: crate::events::Disposal::Deleted,
            size: 10,
            sha256: hex::encode(sha256(b"AAAAAAAABB")),
        }
    );
    assert!(!fixture.path.exists());
}
