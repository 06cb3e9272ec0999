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
pub use worker::Worker;
