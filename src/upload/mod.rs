//! The work that leaves the coordinator: job descriptions and the worker pool
//! that executes them.
//!
//! Workers are stateless executors. A job carries everything it needs (a
//! snapshot of the stream's chunk records, for a finalize), and the result
//! carries back everything the coordinator must learn, so no state is shared
//! between threads. Beside them, the multipart sweep (`sweep`) aborts the
//! uploads that no assembly will finish.

pub mod job;
pub mod sweep;
pub mod worker;

pub use job::{AssembleJob, ChunkJob, CloseJob, FinalizeJob, Job, JobResult, Outcome, StreamRef};
pub use worker::{BufferPool, Worker};

/// Worker threads for `workers` (`WORKERS`): three times as many, sharing
/// `workers` chunk buffers ([`BufferPool`]). The coordinator has at most
/// [`max_uploads_in_flight`] chunk uploads out: `workers` uploading and as
/// many holding the next chunk job until a buffer is free, so a worker never
/// waits for the coordinator between two chunks. The last third is free for
/// completion checks, which mostly need no chunk buffer: they never wait
/// behind uploads.
pub fn worker_threads(workers: usize) -> usize {
    workers * 3
}

/// Chunk upload jobs the coordinator has out at most (see
/// [`worker_threads`]).
pub fn max_uploads_in_flight(workers: usize) -> usize {
    workers * 2
}
