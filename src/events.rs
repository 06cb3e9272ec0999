//! Every observable event, as one trait.
//!
//! The coordinator and the workers report what happened through [`Events`]
//! and never touch metrics directly (the Vector file-source pattern). The
//! Prometheus implementation lives in `metrics.rs`; tests pass [`NoEvents`].

use std::path::PathBuf;

use crate::health::Dependency;
use crate::store::Integrity;
use crate::store::credentials::RefreshHealth;

/// Things worth counting or timing. Implementations must be cheap and must not
/// block: they are called from the coordinator loop and the workers.
pub trait Events: Send + Sync {
    /// A new stream was registered.
    fn stream_discovered(&self) {}
    /// A chunk object was written and checkpointed; `reupload` when the
    /// completion verification found that its bytes had changed.
    fn chunk_uploaded(&self, _bytes: u64, _seconds: f64, _reupload: bool) {}
    /// One failed attempt of an S3 request, by error kind.
    fn upload_error(&self, _kind: &'static str) {}
    /// A job failed on the source file (unreadable, read error, gone).
    fn source_error(&self) {}
    /// One failed attempt to write a checkpoint.
    fn checkpoint_error(&self) {}
    /// A job panicked in a worker; it was turned into a failed result and
    /// is retried with backoff.
    fn worker_panicked(&self) {}
    /// A stream was closed: `complete` or `incomplete`. `lag_seconds` is the
    /// time from its last change to its metadata being written.
    fn stream_closed(&self, _status: &'static str, _lag_seconds: f64) {}
    /// A directory scan finished.
    fn scan_finished(&self, _seconds: f64, _unix_time: f64) {}
    /// The outcome of a real request to, or a probe of, a dependency.
    fn dependency_checked(&self, _dependency: Dependency, _outcome: Result<(), String>) {}
    /// What the start-up probe found about the server's integrity checks.
    fn storage_integrity(&self, _integrity: Integrity) {}
    /// How refreshing temporary S3 credentials goes (checked by the probe).
    fn credentials_refresh(&self, _health: &RefreshHealth) {}
    /// The multipart sweep aborted `count` abandoned uploads.
    fn multipart_uploads_aborted(&self, _count: u64) {}
    /// This process claimed a stream's lease.
    fn lease_claimed(&self) {}
    /// This process found that another replica took one of its streams over.
    fn lease_lost(&self) {}
    /// A completion event reached every destination and left the outbox.
    fn event_delivered(&self) {}
    /// One failed attempt to deliver a completion event, by destination
    /// (`redis_stream`, `webhook`, `outbox`); it is retried with backoff.
    fn event_delivery_failed(&self, _destination: &'static str) {}
    /// Completion events waiting in the outbox (due or backing off).
    fn events_pending(&self, _count: u64) {}
    /// A complete stream's file left the watch directory (`ON_COMPLETE`):
    /// the one place where a `file.deleted` / `file.moved` announcement
    /// belongs. Called by the coordinator as it applies the result.
    fn file_disposed(&self, _stream_id: &str, _rel_path: &str, _disposal: &Disposal) {}
    /// Deleting or moving a complete stream's file failed (`action`: delete
    /// or move), or the stream could not be verified in S3 first; it is
    /// retried with backoff.
    fn on_complete_failed(&self, _action: &'static str) {}
    /// Gauges, refreshed by the coordinator after each loop turn.
    fn gauges(&self, _gauges: &Gauges) {}
}

/// What a disposal did with the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposal {
    Deleted,
    /// Moved to this path.
    Moved(PathBuf),
}

impl Disposal {
    /// The name used in logs and metric labels.
    pub fn as_str(&self) -> &'static str {
        match self {
            Disposal::Deleted => "deleted",
            Disposal::Moved(_) => "moved",
        }
    }
}

/// Point-in-time figures the coordinator knows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Gauges {
    pub streams_active: u64,
    pub files_tracked: u64,
    pub inflight_jobs: u64,
    pub pending_bytes: u64,
    /// Streams whose lease this process holds.
    pub streams_owned: u64,
    /// Live replicas on this Redis (this one included), at the last renewal.
    pub replicas: u64,
    /// Paths under the watch directory the last scan could not read (the
    /// watch directory itself counts as one).
    pub unreadable_paths: u64,
    /// Whether the watch directory as a whole cannot be trusted (unreadable,
    /// remounted, or emptied while streams are open).
    pub watch_dir_blind: bool,
    /// Streams whose checkpoint record cannot be trusted.
    pub streams_quarantined: u64,
}

/// Discards everything.
pub struct NoEvents;

impl Events for NoEvents {}
