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
use std::fs::File;
use std::ops::ControlFlow;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use log::{debug, error, warn};
use sha2::{Digest, Sha256};

use crate::chunk_hash::ChunkHashes;
use crate::config::{MAX_CHUNK_SIZE, RetryPolicy};
use crate::error::{FencedWriteError, SourceError, StorageError};
use crate::events::Events;
use crate::health::Dependency;
use crate::lease::HeldLeases;
use crate::metadata::{ChunkRecord, KeyLayout, rfc3339};
use crate::retry::with_backoff;
use crate::store::{CheckpointStore, ObjectStore};
use crate::upload::job::{ChunkJob, Job, JobResult, Outcome};
pub use chunk_buffer::BufferPool;
use chunk_buffer::ChunkBuffer;

mod assembly;
mod chunk_buffer;
mod completion;
mod disposal;

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
/// Makes an I/O error on `path` a [`SourceError`].
fn source_error(path: &Path) -> impl Fn(std::io::Error) -> SourceError + '_ {
    move |source| SourceError {
        path: path.to_path_buf(),
        source,
    }
}

/// `len` as a buffer length, refused if it is larger than any chunk.
fn chunk_length(path: &Path, len: u64) -> Result<usize, SourceError> {
    usize::try_from(len)
        .ok()
        .filter(|&len| u64::try_from(len).is_ok_and(|len| len <= MAX_CHUNK_SIZE))
        .ok_or_else(|| {
            source_error(path)(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("a read of {len} bytes is larger than any chunk"),
            ))
        })
}

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
    /// Delete the chunk objects once the assembled object is verified
    /// (`DELETE_CHUNKS_AFTER_ASSEMBLY`).
    delete_chunks_after_assembly: bool,
    /// Whether completions and closes queue their event (a destination is
    /// configured).
    announce: bool,
    /// Reused for every chunk.
    buffer: ChunkBuffer,
    /// Failed attempts and the last failure during the current job.
    job_attempts: JobAttempts,
}

/// Failed attempts and the last failure during one job, for its result.
#[derive(Default)]
struct JobAttempts {
    failures: Cell<u32>,
    last_error: RefCell<Option<String>>,
}

impl JobAttempts {
    /// Counts a failed attempt.
    fn failed(&self, error: String) {
        self.failures.set(self.failures.get().saturating_add(1));
        self.last_error.replace(Some(error));
    }

    /// The count and last error so far; the next job starts afresh.
    fn take(&self) -> (u32, Option<String>) {
        (self.failures.replace(0), self.last_error.take())
    }
}

/// Sleeps `delay` before a retry; false if a shutdown started meanwhile.
fn wait_for_retry(shutdown: &Receiver<()>, delay: std::time::Duration) -> bool {
    match shutdown.recv_timeout(delay) {
        Err(RecvTimeoutError::Timeout) | Ok(()) => {
            !matches!(shutdown.try_recv(), Err(TryRecvError::Disconnected))
        }
        Err(RecvTimeoutError::Disconnected) => false,
    }
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
            delete_chunks_after_assembly: false,
            announce: false,
            buffer: ChunkBuffer::default(),
            job_attempts: JobAttempts::default(),
        }
    }

    /// Sets the part ceiling for assemblies (`ASSEMBLY_MAX_PARTS`).
    pub fn with_assembly_max_parts(mut self, max_parts: usize) -> Self {
        self.assembly_max_parts = max_parts;
        self
    }

    /// Deletes the chunk objects after a verified assembly
    /// (`DELETE_CHUNKS_AFTER_ASSEMBLY`).
    pub fn with_delete_chunks_after_assembly(mut self, delete: bool) -> Self {
        self.delete_chunks_after_assembly = delete;
        self
    }

    /// Takes chunk buffers from `pool`, shared with other workers, instead
    /// of having one of its own.
    pub fn with_buffer_pool(mut self, pool: BufferPool) -> Self {
        self.buffer = ChunkBuffer::from_pool(pool);
        self
    }

    /// Makes completions and closes queue their event in the outbox.
    pub fn with_announcements(mut self, announce: bool) -> Self {
        self.announce = announce;
        self
    }

    /// Executes jobs until the job channel closes or results cannot be sent.
    /// Every job yields a result, even one that panicked (see
    /// [`execute_supervised`](Self::execute_supervised)), so the thread
    /// outlives its jobs and the coordinator never waits on a dead one.
    pub fn run(mut self, jobs: Receiver<Job>, results: Sender<JobResult>) {
        for job in jobs.iter() {
            let result = self.execute_supervised(job);
            if results.send(result).is_err() {
                break;
            }
        }
    }

    /// Executes a job, turning a panic into a failed result: logged with
    /// the stream id, counted, and retried with backoff by the coordinator
    /// like any other failure.
    pub fn execute_supervised(&mut self, job: Job) -> JobResult {
        let stream = job.stream().clone();
        let executed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.execute(job)));
        // The chunk buffer goes back to the pool between jobs (whatever a
        // panicked job left in it is dropped with it).
        self.buffer.release();
        executed.unwrap_or_else(|payload| {
            let message = payload
                .downcast_ref::<&str>()
                .map(|text| (*text).to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "no message".to_string());
            let stream_id = stream.stream_id.as_str();
            error!(
                stream_id = stream_id;
                "stream {stream_id}: a job panicked ({message}); it is retried with backoff"
            );
            self.events.worker_panicked();
            self.job_attempts.take();
            let reason = format!("job panicked: {message}");
            JobResult {
                stream,
                outcome: Outcome::Failed(reason.clone()),
                chunks: None,
                failed_attempts: 1,
                last_error: Some(reason),
            }
        })
    }

    pub fn execute(&mut self, job: Job) -> JobResult {
        let stream = job.stream().clone();
        self.job_attempts.take();
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
                Job::Dispose(job) => (self.dispose(&job), None),
            }
        };
        let (failed_attempts, last_error) = self.job_attempts.take();
        JobResult {
            stream,
            outcome,
            chunks,
            failed_attempts,
            last_error,
        }
    }

    fn shutting_down(&self) -> bool {
        matches!(self.shutdown.try_recv(), Err(TryRecvError::Disconnected))
    }

    /// Reads `[offset, offset + len)` of `file` into the reused buffer.
    fn read_into_buffer(
        &mut self,
        file: &File,
        path: &Path,
        offset: u64,
        len: u64,
    ) -> Result<(), SourceError> {
        let len = chunk_length(path, len)?;
        self.buffer
            .fill(file, offset, len)
            .map_err(source_error(path))
    }

    /// The [`crate::chunk_hash::fast_hash`] of `[offset, offset + len)` of
    /// `file`, read without filling the buffer.
    fn fingerprint(
        &mut self,
        file: &File,
        path: &Path,
        offset: u64,
        len: u64,
    ) -> Result<String, SourceError> {
        let len = chunk_length(path, len)?;
        self.buffer
            .fingerprint(file, offset, len)
            .map_err(source_error(path))
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
        let wait = |delay| wait_for_retry(&self.shutdown, delay);
        with_backoff(self.retry, wait, |attempt| {
            if !self.leases.is_valid(stream_id, token, Instant::now()) {
                return ControlFlow::Break(Err(Stop::LeaseLost));
            }
            match operation() {
                Ok(value) => {
                    self.events.dependency_checked(Dependency::Storage, Ok(()));
                    return ControlFlow::Break(Ok(value));
                }
                Err(err) => {
                    self.events.upload_error(err.kind());
                    if worth_logging(attempt) {
                        warn!(
                            "S3 request failed (attempt {}): {err}; retrying with backoff",
                            attempt + 1
                        );
                    }
                    self.job_attempts.failed(err.to_string());
                    // A refused request (4xx) means S3 is up; the probe tells
                    // whether the bucket itself is usable.
                    if !err.is_client_error() {
                        self.events
                            .dependency_checked(Dependency::Storage, Err(err.to_string()));
                    }
                }
            }
            if source.is_some_and(|path| !path.exists()) {
                return ControlFlow::Break(Err(Stop::SourceGone));
            }
            ControlFlow::Continue(())
        })
        .unwrap_or(Err(Stop::Cancelled))
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
        let wait = |delay| wait_for_retry(&self.shutdown, delay);
        with_backoff(self.retry, wait, |attempt| {
            match operation(self.checkpoints.as_mut()) {
                Ok(value) => {
                    self.events.dependency_checked(Dependency::Redis, Ok(()));
                    ControlFlow::Break(Ok(value))
                }
                Err(FencedWriteError::LeaseLost) => {
                    self.events.dependency_checked(Dependency::Redis, Ok(()));
                    ControlFlow::Break(Err(Stop::LeaseLost))
                }
                Err(FencedWriteError::Unavailable(err)) => {
                    self.events.checkpoint_error();
                    if worth_logging(attempt) {
                        warn!(
                            "cannot write checkpoint ({what}), attempt {}: {err}; retrying",
                            attempt + 1
                        );
                    }
                    self.job_attempts.failed(err.to_string());
                    self.events
                        .dependency_checked(Dependency::Redis, Err(err.to_string()));
                    ControlFlow::Continue(())
                }
            }
        })
        .unwrap_or(Err(Stop::Cancelled))
    }

    /// Uploads the buffer, with its `hashes`, as chunk `index` and
    /// checkpoints it.
    fn store_buffer_as_chunk(
        &mut self,
        (stream_id, token): (&str, u64),
        path: &Path,
        (index, offset): (u64, u64),
        hashes: ChunkHashes,
        reupload: bool,
    ) -> Result<ChunkRecord, Stop> {
        let started = Instant::now();
        let key = self.layout.chunk_holding(stream_id, index, &hashes.sha256);
        self.put_with_retry(
            (stream_id, token),
            &key,
            "application/octet-stream",
            self.buffer.bytes(),
            &hashes.sha256,
            Some(path),
        )?;
        let record = ChunkRecord {
            index,
            key,
            offset,
            size_bytes: self.buffer.bytes().len() as u64,
            sha256: hex::encode(hashes.sha256),
            uploaded_at: rfc3339(SystemTime::now()),
            xxh3: Some(hashes.xxh3),
            whole_sha256: hashes.whole_sha256,
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
            .map_err(source_error(&job.path))
            .and_then(|file| self.read_into_buffer(&file, &job.path, job.offset, job.len));
        if let Err(err) = read {
            return Outcome::Failed(err.to_string());
        }
        let hashes = ChunkHashes::of(self.buffer.bytes(), job.whole_sha256_before.as_ref());
        match self.store_buffer_as_chunk(
            (&job.stream.stream_id, job.stream.token),
            &job.path,
            (job.index, job.offset),
            hashes,
            false,
        ) {
            Ok(record) => Outcome::ChunkUploaded(Box::new(record)),
            Err(stop) => {
                stop.outcome(|| Outcome::Failed(format!("{} is gone", job.path.display())))
            }
        }
    }
}

#[cfg(test)]
mod tests;
