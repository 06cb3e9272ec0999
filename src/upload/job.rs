//! Jobs sent to workers, and the results they send back.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::SystemTime;

use crate::config::OnComplete;
use crate::events::Disposal;
use crate::metadata::ChunkRecord;
use crate::scan::FileIdentity;
use crate::stream::state::CloseReason;

/// Which stream a job or result belongs to. The id guards against results
/// for a stream that was replaced in the meantime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamRef {
    pub identity: FileIdentity,
    pub stream_id: String,
    /// The fencing token of this process's claim on the stream: every
    /// checkpoint the job writes is refused once another replica claimed it.
    pub token: u64,
}

/// Facts about the stream that go into its metadata.
#[derive(Debug, Clone)]
pub struct StreamFacts {
    pub rel_path: String,
    pub file_name: String,
    pub chunk_size: u64,
    pub started_at: SystemTime,
    pub last_change_at: SystemTime,
    /// The revision this metadata write will have.
    pub revision: u32,
}

/// Upload one full chunk of a growing file.
#[derive(Debug, Clone)]
pub struct ChunkJob {
    pub stream: StreamRef,
    pub path: PathBuf,
    pub index: u64,
    pub offset: u64,
    pub len: u64,
    /// The whole-file sha256 state after the previous chunk
    /// (`metadata::whole_sha256_before`), which this chunk's record extends.
    pub whole_sha256_before: Option<crate::chunk_hash::RunningSha256>,
}

/// Upload the tail, verify every chunk against the file (re-uploading what
/// changed), write `metadata.json` and mark the stream complete.
#[derive(Debug, Clone)]
pub struct FinalizeJob {
    pub stream: StreamRef,
    pub path: PathBuf,
    pub facts: StreamFacts,
    pub expected_size: u64,
    /// The chunks uploaded so far.
    pub chunks: BTreeMap<u64, ChunkRecord>,
    /// Give the lease up with the completion mark (no assembly follows).
    pub release_lease: bool,
}

/// Record a stream as incomplete: metadata with what was uploaded, and the
/// status in Redis.
#[derive(Debug, Clone)]
pub struct CloseJob {
    pub stream: StreamRef,
    pub facts: StreamFacts,
    pub reason: CloseReason,
    pub chunks: BTreeMap<u64, ChunkRecord>,
}

/// Assemble a complete stream's chunks into one object server-side.
#[derive(Debug, Clone)]
pub struct AssembleJob {
    pub stream: StreamRef,
    /// The completed revision to assemble.
    pub revision: u32,
}

/// Verify a complete stream in S3, then delete or move its file
/// (`ON_COMPLETE`), unless the file changed since its completion.
#[derive(Debug, Clone)]
pub struct DisposeJob {
    pub stream: StreamRef,
    pub path: PathBuf,
    pub rel_path: String,
    /// The completed revision, and the file's size and mtime at completion.
    pub revision: u32,
    pub size: u64,
    pub mtime_ns: i128,
    /// The assembled object must be there too (`ASSEMBLE=true`).
    pub assembled: bool,
    /// Delete, or move under a directory.
    pub action: OnComplete,
}

#[derive(Debug, Clone)]
pub enum Job {
    Chunk(ChunkJob),
    Finalize(FinalizeJob),
    Close(CloseJob),
    Assemble(AssembleJob),
    Dispose(DisposeJob),
}

impl Job {
    pub fn stream(&self) -> &StreamRef {
        match self {
            Job::Chunk(job) => &job.stream,
            Job::Finalize(job) => &job.stream,
            Job::Close(job) => &job.stream,
            Job::Assemble(job) => &job.stream,
            Job::Dispose(job) => &job.stream,
        }
    }
}

/// How a job ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// A chunk job's chunk is in S3 and checkpointed. Boxed: with its
    /// checkpoint-only hashes the record is the largest outcome by far.
    ChunkUploaded(Box<ChunkRecord>),
    /// The stream is complete at this size and mtime.
    Finalized {
        size: u64,
        mtime_ns: i128,
        revision: u32,
        completed_at: SystemTime,
        /// The completion mark also gave the stream's lease up.
        lease_released: bool,
    },
    /// The file changed while the finalize job ran; it will run again later.
    FinalizeInterrupted,
    /// The close job recorded the stream as incomplete.
    Closed,
    /// The assembly job is done: `revision` is assembled, or 0 when there was
    /// nothing to assemble (superseded, or too many chunks for S3).
    Assembled { revision: u32 },
    /// The disposal job deleted or moved the file, verified in S3 as `size`
    /// bytes with this sha256 (hex).
    Disposed {
        disposal: Disposal,
        size: u64,
        sha256: String,
    },
    /// The disposal job touched nothing: the file changed since its
    /// completion (`seen`: its size and mtime now), or is not at its path
    /// (the next scans decide whether it moved or vanished).
    DisposalRefused {
        reason: String,
        seen: Option<(u64, i128)>,
    },
    /// The job could not be done now (the reason is already logged).
    Failed(String),
    /// Abandoned because the process is shutting down.
    Cancelled,
    /// Abandoned because this process no longer holds the stream's lease
    /// (or could not renew it in time to trust it).
    LeaseLost,
}

#[derive(Debug, Clone)]
pub struct JobResult {
    pub stream: StreamRef,
    pub outcome: Outcome,
    /// For a finalize job: the chunk records after it ran (verification may
    /// have re-uploaded some), whatever the outcome.
    pub chunks: Option<BTreeMap<u64, ChunkRecord>>,
    /// Request attempts that failed during the job (each was retried).
    pub failed_attempts: u32,
    /// The last of those failures.
    pub last_error: Option<String>,
}
