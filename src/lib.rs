//! chunkstream: polls a directory (NFS-friendly) and uploads growing video
//! files to S3 in ordered, checkpointed chunks, with per-stream metadata.
//!
//! The binary (`main.rs`) is glue; everything testable lives here. See
//! docs/architecture.md for how the pieces fit.

pub mod bandwidth;
pub mod chunk_hash;
pub mod client;
pub mod config;
pub mod coordinator;
pub mod daemon;
pub mod dry_run;
pub mod error;
pub mod events;
pub mod health;
pub mod http;
pub mod instance;
pub mod inventory;
pub mod lease;
pub mod logging;
pub mod media;
pub mod metadata;
pub mod metrics;
pub mod notify;
pub mod readback;
pub mod restore;
pub mod retry;
pub mod rules;
pub mod scan;
pub mod scanner;
pub mod status_page;
pub mod store;
pub mod stream;
#[cfg(test)]
pub mod testing;
pub mod upload;
pub mod watchfs;

/// A random number from the standard library's per-process random keys; good
/// enough for backoff jitter and unique suffixes, with no extra crate.
pub fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    hasher.finish()
}
