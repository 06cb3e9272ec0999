//! One worker thread: receive a job, do its I/O, send the result back.
//!
//! A chunk job is read (positioned read into a reused buffer) → sha256 → PUT
//! (retried with capped exponential backoff and full jitter, for as long as
//! the source file exists) → checkpoint (retried the same way). A chunk counts
//! as uploaded only once its checkpoint is written. A retried PUT is harmless
//! because chunk keys are deterministic.
//!
//! Shutdown: the `shutdown` channel is disconnected when a drain starts. A
//! worker then finishes the attempt it is in, does not start another, and
//! reports the job as cancelled; queued jobs are cancelled without starting.
//!
//! Ownership: a job runs under a claim (its fencing token). Every checkpoint
//! and completion mark is refused by Redis once another replica claimed the
//! stream, and no object is written once the stream's lease in
//! [`HeldLeases`] can no longer be trusted, so a replica that was paused or
//! cut off stops by itself; the job then ends as `LeaseLost`. The metadata object is written only right after Redis
//! confirmed the claim.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use log::{debug, info, warn};
use sha2::{Digest, Sha256};

use crate::config::RetryPolicy;
use crate::error::{FencedWriteError, SourceError, StorageError};
use crate::events::Events;
use crate::health::Dependency;
use crate::lease::HeldLeases;
use crate::media::mp4_duration_seconds;
use crate::metadata::{
    ChunkRecord, KeyLayout, Media, SCHEMA_VERSION, Source, StreamMetadata, StreamStatus, rfc3339,
};
use crate::store::redis::Completion;
use crate::store::{CheckpointStore, ObjectStore};
use crate::upload::job::{ChunkJob, CloseJob, FinalizeJob, Job, JobResult, Outcome, StreamFacts};

mod assembly;

/// Why a retry loop gave up.
enum Stop {
    Cancelled,
    SourceGone,
    LeaseLost,
}

impl Stop {
    /// The job's outcome when it stops for this reason; `source_gone` is
    /// what a vanished source means for the job at hand.
    fn outcome(self, source_gone: impl FnOnce() -> Outcome) -> Outcome {
        match self {
            Stop::Cancelled => Outcome::Cancelled,
            Stop::LeaseLost => Outcome::LeaseLost,
            Stop::SourceGone => source_gone(),
        }
    }

    /// The outcome of a job that reads no source file (close, assembly):
    /// a stop means a shutdown or a lost lease.
    fn stopped(self) -> Outcome {
        self.outcome(|| Outcome::Cancelled)
    }
}

/// A file's size, mtime and identity at one moment.
#[derive(Debug, PartialEq, Eq)]
struct Snapshot {
    size: u64,
    mtime_ns: i128,
    device: u64,
    inode: u64,
}

fn snapshot(path: &Path) -> std::io::Result<Snapshot> {
    let meta = std::fs::metadata(path)?;
    Ok(Snapshot {
        size: meta.len(),
        mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
        device: meta.dev(),
        inode: meta.ino(),
    })
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Failed attempts are logged on the 1st, 2nd, 4th, 8th, … attempt, so an
/// outage is visible without a line per retry.
fn worth_logging(attempt: u32) -> bool {
    attempt.is_power_of_two() || attempt == 0
}

pub struct Worker {
    pub store: Arc<dyn ObjectStore>,
    pub checkpoints: Box<dyn CheckpointStore>,
    pub layout: KeyLayout,
    pub retry: RetryPolicy,
    pub shutdown: Receiver<()>,
    pub events: Arc<dyn Events>,
    pub leases: Arc<HeldLeases>,
    /// Most parts in one multipart upload (`ASSEMBLY_MAX_PARTS`).
    assembly_max_parts: usize,
    /// Reused for every chunk; grows to the chunk size once.
    buffer: Vec<u8>,
    /// Failed attempts and the last failure during the current job.
    job_failures: Cell<u32>,
    job_last_error: RefCell<Option<String>>,
}

impl Worker {
    pub fn new(
        store: Arc<dyn ObjectStore>,
        checkpoints: Box<dyn CheckpointStore>,
        layout: KeyLayout,
        retry: RetryPolicy,
        shutdown: Receiver<()>,
        events: Arc<dyn Events>,
        leases: Arc<HeldLeases>,
    ) -> Self {
        Self {
            store,
            checkpoints,
            layout,
            retry,
            shutdown,
            events,
            leases,
            assembly_max_parts: crate::config::MAX_MULTIPART_PARTS,
            buffer: Vec::new(),
            job_failures: Cell::new(0),
            job_last_error: RefCell::new(None),
        }
    }

    /// Sets the part ceiling for assemblies (`ASSEMBLY_MAX_PARTS`).
    pub fn with_assembly_max_parts(mut self, max_parts: usize) -> Self {
        self.assembly_max_parts = max_parts;
        self
    }

    /// Executes jobs until the job channel closes or results cannot be sent.
    pub fn run(mut self, jobs: Receiver<Job>, results: Sender<JobResult>) {
        for job in jobs.iter() {
            let result = self.execute(job);
            if results.send(result).is_err() {
                break;
            }
        }
    }

    pub fn execute(&mut self, job: Job) -> JobResult {
        let stream = job.stream().clone();
        self.job_failures.set(0);
        self.job_last_error.replace(None);
        let (outcome, chunks) = if self.shutting_down() {
            (Outcome::Cancelled, None)
        } else {
            match job {
                Job::Chunk(job) => (self.upload_chunk(&job), None),
                Job::Finalize(job) => {
                    let mut chunks = job.chunks.clone();
                    let outcome = self.finalize(&job, &mut chunks);
                    (outcome, Some(chunks))
                }
                Job::Close(job) => (self.close(&job).unwrap_or_else(Stop::stopped), None),
                Job::Assemble(job) => (self.assemble(&job).unwrap_or_else(Stop::stopped), None),
            }
        };
        JobResult {
            stream,
            outcome,
            chunks,
            failed_attempts: self.job_failures.get(),
            last_error: self.job_last_error.take(),
        }
    }

    /// Counts a failed attempt against the current job.
    fn attempt_failed(&self, error: String) {
        self.job_failures
            .set(self.job_failures.get().saturating_add(1));
        self.job_last_error.replace(Some(error));
    }

    fn shutting_down(&self) -> bool {
        matches!(self.shutdown.try_recv(), Err(TryRecvError::Disconnected))
    }

    /// Sleeps before retry `attempt`; false if a shutdown started meanwhile.
    fn wait_before_retry(&self, attempt: u32) -> bool {
        match self.shutdown.recv_timeout(self.retry.delay(attempt)) {
            Err(RecvTimeoutError::Timeout) | Ok(()) => !self.shutting_down(),
            Err(RecvTimeoutError::Disconnected) => false,
        }
    }

    /// Reads `[offset, offset + len)` of `file` into the reused buffer.
    fn read_into_buffer(
        &mut self,
        file: &File,
        path: &Path,
        offset: u64,
        len: u64,
    ) -> Result<(), SourceError> {
        let len = usize::try_from(len).expect("chunk sizes fit in memory");
        self.buffer.resize(len, 0);
        file.read_exact_at(&mut self.buffer[..len], offset)
            .map_err(|source| SourceError {
                path: path.to_path_buf(),
                source,
            })
    }

    /// Runs an S3 operation until it succeeds, retrying with backoff while
    /// `source` exists (or always, when `source` is `None`). An operation
    /// that must not be retried for some errors returns them inside `Ok`.
    /// No attempt starts once the stream's lease (`lease`: id and token)
    /// can no longer be trusted.
    fn storage_retry<T>(
        &self,
        (stream_id, token): (&str, u64),
        source: Option<&Path>,
        mut operation: impl FnMut() -> Result<T, StorageError>,
    ) -> Result<T, Stop> {
        let mut attempt = 0u32;
        loop {
            if !self.leases.is_valid(stream_id, token, Instant::now()) {
                return Err(Stop::LeaseLost);
            }
            match operation() {
                Ok(value) => {
                    self.events.dependency_checked(Dependency::Storage, Ok(()));
                    return Ok(value);
                }
                Err(err) => {
                    self.events.upload_error(err.kind());
                    if worth_logging(attempt) {
                        warn!(
                            "S3 request failed (attempt {}): {err}; retrying with backoff",
                            attempt + 1
                        );
                    }
                    self.attempt_failed(err.to_string());
                    // A refused request (4xx) means S3 is up; the probe tells
                    // whether the bucket itself is usable.
                    if !err.is_client_error() {
                        self.events
                            .dependency_checked(Dependency::Storage, Err(err.to_string()));
                    }
                }
            }
            if source.is_some_and(|path| !path.exists()) {
                return Err(Stop::SourceGone);
            }
            if !self.wait_before_retry(attempt) {
                return Err(Stop::Cancelled);
            }
            attempt = attempt.saturating_add(1);
        }
    }

    /// PUTs `body` at `key`, retrying while `source` exists.
    fn put_with_retry(
        &self,
        lease: (&str, u64),
        key: &str,
        content_type: &str,
        body: &[u8],
        digest: &[u8; 32],
        source: Option<&Path>,
    ) -> Result<(), Stop> {
        self.storage_retry(lease, source, || {
            self.store.put(key, body, content_type, digest)
        })
    }

    /// Runs a checkpoint operation until it succeeds, a shutdown starts, or
    /// Redis says the stream belongs to another replica now.
    fn checkpoint_with_retry<T>(
        &mut self,
        what: &str,
        mut operation: impl FnMut(&mut dyn CheckpointStore) -> Result<T, FencedWriteError>,
    ) -> Result<T, Stop> {
        let mut attempt = 0u32;
        loop {
            match operation(self.checkpoints.as_mut()) {
                Ok(value) => {
                    self.events.dependency_checked(Dependency::Redis, Ok(()));
                    return Ok(value);
                }
                Err(FencedWriteError::LeaseLost) => {
                    self.events.dependency_checked(Dependency::Redis, Ok(()));
                    return Err(Stop::LeaseLost);
                }
                Err(FencedWriteError::Unavailable(err)) => {
                    self.events.checkpoint_error();
                    if worth_logging(attempt) {
                        warn!(
                            "cannot write checkpoint ({what}), attempt {}: {err}; retrying",
                            attempt + 1
                        );
                    }
                    self.attempt_failed(err.to_string());
                    self.events
                        .dependency_checked(Dependency::Redis, Err(err.to_string()));
                }
            }
            if !self.wait_before_retry(attempt) {
                return Err(Stop::Cancelled);
            }
            attempt = attempt.saturating_add(1);
        }
    }

    /// Uploads the buffer, whose sha256 is `digest`, as chunk `index` and
    /// checkpoints it.
    fn store_buffer_as_chunk(
        &mut self,
        (stream_id, token): (&str, u64),
        path: &Path,
        (index, offset): (u64, u64),
        digest: [u8; 32],
        reupload: bool,
    ) -> Result<ChunkRecord, Stop> {
        let started = Instant::now();
        let key = self.layout.chunk(stream_id, index);
        self.put_with_retry(
            (stream_id, token),
            &key,
            "application/octet-stream",
            &self.buffer,
            &digest,
            Some(path),
        )?;
        let record = ChunkRecord {
            index,
            key,
            offset,
            size_bytes: self.buffer.len() as u64,
            sha256: hex::encode(digest),
            uploaded_at: rfc3339(SystemTime::now()),
        };
        self.checkpoint_with_retry("chunk", |store| {
            store.checkpoint_chunk(stream_id, token, &record)
        })?;
        self.events
            .chunk_uploaded(record.size_bytes, started.elapsed().as_secs_f64(), reupload);
        debug!(
            stream_id = stream_id, path:% = path.display(), chunk = index;
            "stream {stream_id}: chunk {index} uploaded ({} bytes at offset {offset}, {})",
            record.size_bytes,
            path.display()
        );
        Ok(record)
    }

    fn upload_chunk(&mut self, job: &ChunkJob) -> Outcome {
        let read = File::open(&job.path)
            .map_err(|source| SourceError {
                path: job.path.clone(),
                source,
            })
            .and_then(|file| self.read_into_buffer(&file, &job.path, job.offset, job.len));
        if let Err(err) = read {
            return Outcome::Failed(err.to_string());
        }
        let digest = sha256(&self.buffer);
        match self.store_buffer_as_chunk(
            (&job.stream.stream_id, job.stream.token),
            &job.path,
            (job.index, job.offset),
            digest,
            false,
        ) {
            Ok(record) => Outcome::ChunkUploaded(record),
            Err(stop) => {
                stop.outcome(|| Outcome::Failed(format!("{} is gone", job.path.display())))
            }
        }
    }

    fn finalize(&mut self, job: &FinalizeJob, chunks: &mut BTreeMap<u64, ChunkRecord>) -> Outcome {
        let stream_id = job.stream.stream_id.as_str();
        let token = job.stream.token;
        let path = job.path.as_path();
        let before = match snapshot(path) {
            Ok(before) => before,
            Err(err) => return Outcome::Failed(format!("cannot stat {}: {err}", path.display())),
        };
        // The identity's device part is normalized (see `FileIdentity`); at
        // the stream's own path, the inode alone tells the file apart.
        let same_file = before.inode == job.stream.identity.inode;
        if !same_file || before.size != job.expected_size {
            return Outcome::FinalizeInterrupted;
        }
        let file = match File::open(path) {
            Ok(file) => file,
            Err(err) => return Outcome::Failed(format!("cannot open {}: {err}", path.display())),
        };

        let chunk_size = job.facts.chunk_size;
        let chunk_count = before.size.div_ceil(chunk_size);
        let mut whole = Sha256::new();
        let mut reuploaded = 0u32;
        for index in 0..chunk_count {
            if self.shutting_down() {
                return Outcome::Cancelled;
            }
            let offset = index * chunk_size;
            let len = chunk_size.min(before.size - offset);
            if let Err(err) = self.read_into_buffer(&file, path, offset, len) {
                if err.source.kind() == std::io::ErrorKind::UnexpectedEof {
                    return Outcome::FinalizeInterrupted;
                }
                return Outcome::Failed(err.to_string());
            }
            whole.update(&self.buffer);
            let digest = sha256(&self.buffer);
            let previous = chunks.get(&index);
            if previous.is_some_and(|p| p.size_bytes == len && p.sha256 == hex::encode(digest)) {
                continue;
            }
            // Same place, same length, other bytes: the writer rewrote them
            // (ffmpeg patching the mdat size, or a +faststart rewrite).
            let changed = previous.is_some_and(|p| p.size_bytes == len);
            match self.store_buffer_as_chunk(
                (stream_id, token),
                path,
                (index, offset),
                digest,
                changed,
            ) {
                Ok(record) => {
                    if changed {
                        reuploaded += 1;
                        info!(
                            stream_id = stream_id, chunk = index;
                            "stream {stream_id}: chunk {index} changed on disk after upload; uploaded again"
                        );
                    }
                    chunks.insert(index, record);
                }
                Err(stop) => return stop.outcome(|| Outcome::FinalizeInterrupted),
            }
        }
        chunks.retain(|&index, _| index < chunk_count);

        match snapshot(path) {
            Ok(after) if after == before => {}
            _ => return Outcome::FinalizeInterrupted,
        }

        let completed_at = SystemTime::now();
        let metadata = StreamMetadata {
            schema_version: SCHEMA_VERSION,
            stream_id: stream_id.to_string(),
            revision: job.facts.revision,
            status: StreamStatus::Complete,
            reason: None,
            source: source_of(&job.facts),
            total_size_bytes: before.size,
            sha256: Some(hex::encode(whole.finalize())),
            chunk_size_bytes: chunk_size,
            chunks: chunks.values().cloned().collect(),
            started_at: rfc3339(job.facts.started_at),
            completed_at: rfc3339(completed_at),
            stream_duration_seconds: stream_duration(&job.facts),
            media: Media {
                duration_seconds: mp4_duration_seconds(path),
            },
            assembled: None,
        };
        if metadata.media.duration_seconds.is_none() {
            warn!(
                "stream {stream_id}: {} is not a readable MP4; uploaded byte-exact, media duration unknown",
                path.display()
            );
        }
        if let Err(stop) = self.write_metadata(&metadata, token) {
            return stop.outcome(|| Outcome::Cancelled);
        }
        let completion = Completion {
            revision: job.facts.revision,
            size: before.size,
            mtime_ns: before.mtime_ns,
            last_change_at: job.facts.last_change_at,
            completed_at,
            release_lease: job.release_lease,
        };
        if let Err(stop) = self.checkpoint_with_retry("completion", |store| {
            store.mark_complete(stream_id, token, &completion)
        }) {
            return stop.outcome(|| Outcome::Cancelled);
        }
        info!(
            stream_id = stream_id, path = job.facts.rel_path.as_str();
            "stream {stream_id}: complete ({}, {} bytes, {} chunks, {reuploaded} re-uploaded after verification, media {}, revision {})",
            job.facts.rel_path,
            before.size,
            chunk_count,
            metadata
                .media
                .duration_seconds
                .map_or("unknown".to_string(), |s| format!("{s:.2}s")),
            job.facts.revision
        );
        Outcome::Finalized {
            size: before.size,
            mtime_ns: before.mtime_ns,
            revision: job.facts.revision,
            completed_at,
            lease_released: job.release_lease,
        }
    }

    /// Writes the stream's metadata object, right after Redis confirmed that
    /// this process still holds the stream with `token`: a replica that lost
    /// the stream never replaces the metadata its new owner wrote.
    fn write_metadata(&mut self, metadata: &StreamMetadata, token: u64) -> Result<(), Stop> {
        let body = serde_json::to_vec_pretty(metadata).expect("metadata serializes");
        let key = self.layout.metadata(&metadata.stream_id);
        self.checkpoint_with_retry("lease check", |store| {
            store.confirm_lease(&metadata.stream_id, token)
        })?;
        self.put_with_retry(
            (&metadata.stream_id, token),
            &key,
            "application/json",
            &body,
            &sha256(&body),
            None,
        )
    }

    fn close(&mut self, job: &CloseJob) -> Result<Outcome, Stop> {
        let stream_id = job.stream.stream_id.as_str();
        // Only the contiguous run from chunk 0 is a usable prefix of the file.
        let mut chunks = Vec::new();
        let mut next_offset = 0;
        for (index, record) in &job.chunks {
            if *index != chunks.len() as u64 || record.offset != next_offset {
                break;
            }
            next_offset += record.size_bytes;
            chunks.push(record.clone());
        }
        let metadata = StreamMetadata {
            schema_version: SCHEMA_VERSION,
            stream_id: stream_id.to_string(),
            revision: job.facts.revision,
            status: StreamStatus::Incomplete,
            reason: Some(job.reason.as_str().to_string()),
            source: source_of(&job.facts),
            total_size_bytes: next_offset,
            sha256: None,
            chunk_size_bytes: job.facts.chunk_size,
            chunks,
            started_at: rfc3339(job.facts.started_at),
            completed_at: rfc3339(SystemTime::now()),
            stream_duration_seconds: stream_duration(&job.facts),
            media: Media {
                duration_seconds: None,
            },
            assembled: None,
        };
        let token = job.stream.token;
        self.write_metadata(&metadata, token)?;
        let reason = job.reason.as_str();
        self.checkpoint_with_retry("close", |store| {
            store.mark_incomplete(stream_id, token, reason)
        })?;
        warn!(
            stream_id = stream_id, path = job.facts.rel_path.as_str();
            "stream {stream_id}: closed as incomplete ({reason}) for {}, {} bytes uploaded in {} chunks",
            job.facts.rel_path,
            metadata.total_size_bytes,
            metadata.chunks.len()
        );
        Ok(Outcome::Closed)
    }
}

fn source_of(facts: &StreamFacts) -> Source {
    Source {
        path: facts.rel_path.clone(),
        file_name: facts.file_name.clone(),
    }
}

fn stream_duration(facts: &StreamFacts) -> f64 {
    facts
        .last_change_at
        .duration_since(facts.started_at)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RetryPolicy;
    use crate::error::CheckpointError;
    use crate::events::NoEvents;
    use crate::scan::FileIdentity;
    use crate::store::redis::{AssemblyProgress, Claim, LeaseStatus, Renewal, StoredStream};
    use crate::upload::job::{AssembleJob, StreamRef};
    use std::sync::Mutex;
    use std::time::Duration;

    /// An in-memory bucket that can be told to fail the next N puts.
    #[derive(Default)]
    struct MemoryStore {
        objects: Mutex<BTreeMap<String, Vec<u8>>>,
        failures_left: Mutex<u32>,
        puts: Mutex<u32>,
        uploads: Mutex<BTreeMap<String, MemoryUpload>>,
    }

    /// An upload in progress: (key, part number → bytes), by upload id.
    type MemoryUpload = (String, BTreeMap<u32, Vec<u8>>);

    fn missing(key: &str) -> StorageError {
        StorageError::Http {
            status: 404,
            key: key.into(),
            body: String::new(),
        }
    }

    impl ObjectStore for MemoryStore {
        fn put(
            &self,
            key: &str,
            body: &[u8],
            _: &str,
            digest: &[u8; 32],
        ) -> Result<(), StorageError> {
            *self.puts.lock().unwrap() += 1;
            let mut failures = self.failures_left.lock().unwrap();
            if *failures > 0 {
                *failures -= 1;
                return Err(StorageError::Http {
                    status: 503,
                    key: key.into(),
                    body: "slow down".into(),
                });
            }
            assert_eq!(&sha256(body), digest, "checksum header matches body");
            self.objects
                .lock()
                .unwrap()
                .insert(key.into(), body.to_vec());
            Ok(())
        }
        fn get(&self, key: &str) -> Result<Vec<u8>, StorageError> {
            self.objects
                .lock()
                .unwrap()
                .get(key)
                .cloned()
                .ok_or_else(|| missing(key))
        }
        fn get_range(&self, key: &str, start: u64, end: u64) -> Result<Vec<u8>, StorageError> {
            let all = self.get(key)?;
            Ok(all[start as usize..=(end as usize).min(all.len() - 1)].to_vec())
        }
        fn head(&self, key: &str) -> Result<Option<crate::store::ObjectInfo>, StorageError> {
            Ok(self
                .objects
                .lock()
                .unwrap()
                .get(key)
                .map(|body| crate::store::ObjectInfo {
                    size: body.len() as u64,
                    etag: "\"memory\"".into(),
                }))
        }
        fn delete(&self, key: &str) -> Result<(), StorageError> {
            self.objects.lock().unwrap().remove(key);
            Ok(())
        }
        fn initiate_multipart(&self, key: &str, _: &str) -> Result<String, StorageError> {
            let mut uploads = self.uploads.lock().unwrap();
            let id = format!("upload-{}", uploads.len());
            uploads.insert(id.clone(), (key.into(), BTreeMap::new()));
            Ok(id)
        }
        fn upload_part_copy(
            &self,
            key: &str,
            id: &str,
            part: u32,
            source: &str,
        ) -> Result<String, StorageError> {
            let body = self.get(source)?;
            let mut uploads = self.uploads.lock().unwrap();
            let upload = uploads
                .get_mut(id)
                .filter(|u| u.0 == key)
                .ok_or_else(|| missing(key))?;
            upload.1.insert(part, body);
            Ok(format!("\"part-{part}\""))
        }
        fn complete_multipart(
            &self,
            key: &str,
            id: &str,
            parts: &[(u32, String)],
        ) -> Result<String, StorageError> {
            let (_, copied) = self
                .uploads
                .lock()
                .unwrap()
                .remove(id)
                .ok_or_else(|| missing(key))?;
            assert_eq!(parts.len(), copied.len());
            let body: Vec<u8> = copied.into_values().flatten().collect();
            self.objects.lock().unwrap().insert(key.into(), body);
            Ok("\"whole-1\"".into())
        }
        fn abort_multipart(&self, _: &str, id: &str) -> Result<(), StorageError> {
            self.uploads.lock().unwrap().remove(id);
            Ok(())
        }
    }

    /// Records checkpoints in memory. With `taken_over` set, every fenced
    /// write is refused, as when another replica claimed the stream.
    #[derive(Default, Clone)]
    struct MemoryCheckpoints {
        chunks: Arc<Mutex<Vec<(String, ChunkRecord)>>>,
        completed: Arc<Mutex<Vec<String>>>,
        assembly: Arc<Mutex<Option<AssemblyProgress>>>,
        assembled_revision: Arc<Mutex<u32>>,
        taken_over: Arc<std::sync::atomic::AtomicBool>,
    }

    impl MemoryCheckpoints {
        fn fence(&self) -> Result<(), FencedWriteError> {
            if self.taken_over.load(std::sync::atomic::Ordering::Relaxed) {
                Err(FencedWriteError::LeaseLost)
            } else {
                Ok(())
            }
        }
    }

    impl CheckpointStore for MemoryCheckpoints {
        fn ping(&mut self) -> Result<(), CheckpointError> {
            Ok(())
        }
        fn load_streams(&mut self) -> Result<Vec<StoredStream>, CheckpointError> {
            Ok(Vec::new())
        }
        fn load_stream(&mut self, _: &str) -> Result<Option<StoredStream>, CheckpointError> {
            Ok(None)
        }
        fn register_stream(
            &mut self,
            s: &StoredStream,
            _: Option<&str>,
        ) -> Result<String, CheckpointError> {
            Ok(s.id.clone())
        }
        fn checkpoint_chunk(
            &mut self,
            id: &str,
            _: u64,
            chunk: &ChunkRecord,
        ) -> Result<(), FencedWriteError> {
            self.fence()?;
            self.chunks.lock().unwrap().push((id.into(), chunk.clone()));
            Ok(())
        }
        fn record_path(&mut self, _: &str, _: &str) -> Result<(), CheckpointError> {
            Ok(())
        }
        fn record_identity(
            &mut self,
            _: &str,
            _: FileIdentity,
            _: FileIdentity,
        ) -> Result<(), CheckpointError> {
            Ok(())
        }
        fn mark_complete(
            &mut self,
            id: &str,
            _: u64,
            _: &Completion,
        ) -> Result<(), FencedWriteError> {
            self.fence()?;
            self.completed.lock().unwrap().push(id.into());
            Ok(())
        }
        fn mark_incomplete(&mut self, _: &str, _: u64, _: &str) -> Result<(), FencedWriteError> {
            self.fence()
        }
        fn confirm_lease(&mut self, _: &str, _: u64) -> Result<(), FencedWriteError> {
            self.fence()
        }
        fn restore_stream(
            &mut self,
            _: &StoredStream,
            _: Option<u64>,
        ) -> Result<bool, CheckpointError> {
            Ok(false)
        }
        fn claim(&mut self, _: &str) -> Result<Claim, CheckpointError> {
            Ok(Claim::Granted { token: 1 })
        }
        fn renew(&mut self, leases: &[(&str, u64)]) -> Result<Renewal, CheckpointError> {
            Ok(Renewal {
                replicas: 1,
                statuses: vec![LeaseStatus::Held; leases.len()],
            })
        }
        fn release(&mut self, _: &str, _: u64) -> Result<(), CheckpointError> {
            Ok(())
        }
        fn leave(&mut self) -> Result<(), CheckpointError> {
            Ok(())
        }
        fn load_assembly(&mut self, _: &str) -> Result<Option<AssemblyProgress>, CheckpointError> {
            Ok(self.assembly.lock().unwrap().clone())
        }
        fn save_assembly(
            &mut self,
            _: &str,
            _: u64,
            progress: Option<&AssemblyProgress>,
        ) -> Result<(), FencedWriteError> {
            self.fence()?;
            *self.assembly.lock().unwrap() = progress.cloned();
            Ok(())
        }
        fn finish_assembly(
            &mut self,
            _: &str,
            _: u64,
            revision: u32,
        ) -> Result<(), FencedWriteError> {
            self.fence()?;
            *self.assembled_revision.lock().unwrap() = revision;
            *self.assembly.lock().unwrap() = None;
            Ok(())
        }
        fn forget_identity(&mut self, _: FileIdentity, _: &str) -> Result<(), CheckpointError> {
            Ok(())
        }
    }

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
        }));
        let Outcome::ChunkUploaded(record) = result.outcome else {
            panic!("{:?}", result.outcome)
        };
        assert_eq!(record.key, "p/a-1/chunk-000001");
        assert_eq!(store.get(&record.key).unwrap(), b"89abcdef");
        assert_eq!(*store.puts.lock().unwrap(), 4);
        assert_eq!(checkpoints.chunks.lock().unwrap().len(), 1);
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
}
