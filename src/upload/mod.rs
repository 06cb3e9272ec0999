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

/// Worker threads for `workers` (`WORKERS`): twice as many, sharing
/// `workers` chunk buffers ([`BufferPool`]). The coordinator never has more
/// than `workers` chunk uploads in flight, so the other half is free for
/// completion checks, which mostly need no chunk buffer.
pub fn worker_threads(workers: usize) -> usize {
    workers * 2
}
