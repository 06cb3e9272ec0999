//! The ports: what the coordinator, the workers and the daemon need of the
//! two stores, as small traits, with the types they exchange.
//!
//! The Redis adapter (`redis.rs`) implements [`CheckpointStore`]; the S3
//! adapter (`s3.rs`) implements [`ObjectStore`] and [`BucketAdmin`]. Nothing
//! else talks to either server, and `crate::testing` has in-memory fakes of
//! all three for the unit tests.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::error::{CheckpointError, FencedWriteError, StorageError};
use crate::metadata::ChunkRecord;
use crate::notify::Announcement;
use crate::scan::FileIdentity;

// ---- the object store ----

/// What the workers and `restore` need from S3.
pub trait ObjectStore: Send + Sync {
    /// Stores `body` at `key`. The server checks the body against `sha256`
    /// (sent as `x-amz-checksum-sha256`) and, where that is not proven to be
    /// verified, against `Content-MD5`, so a corrupted transfer is rejected.
    fn put(
        &self,
        key: &str,
        body: &[u8],
        content_type: &str,
        sha256: &[u8; 32],
    ) -> Result<(), StorageError>;

    /// Removes the object at `key`; an absent object is no error.
    fn delete(&self, key: &str) -> Result<(), StorageError>;

    /// The whole object at `key` (callers only fetch chunk-sized objects).
    fn get(&self, key: &str) -> Result<Vec<u8>, StorageError>;

    /// Bytes `[start, end]` (inclusive) of the object at `key`.
    fn get_range(&self, key: &str, start: u64, end: u64) -> Result<Vec<u8>, StorageError>;

    /// The object's size and ETag, or `None` if there is no object at `key`.
    fn head(&self, key: &str) -> Result<Option<ObjectInfo>, StorageError>;

    /// Starts a multipart upload; returns its upload id.
    fn initiate_multipart(&self, key: &str, content_type: &str) -> Result<String, StorageError>;

    /// Copies the whole object `source_key` (same bucket) into part
    /// `part_number` server-side (UploadPartCopy); returns the part's ETag.
    fn upload_part_copy(
        &self,
        key: &str,
        upload_id: &str,
        part_number: u32,
        source_key: &str,
    ) -> Result<String, StorageError>;

    /// Completes the upload from `(part number, ETag)` pairs; returns the
    /// object's ETag.
    fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[(u32, String)],
    ) -> Result<String, StorageError>;

    /// Aborts the upload (its parts are discarded).
    fn abort_multipart(&self, key: &str, upload_id: &str) -> Result<(), StorageError>;
}

/// What HEAD tells about an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub size: u64,
    pub etag: String,
}

/// What the start-up probe found out about the server's integrity checks,
/// and what this process does about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Integrity {
    /// The server refused a body whose `x-amz-checksum-sha256` was wrong.
    pub checksum_verified: bool,
    /// Requests with a body carry `Content-MD5` (`S3_CONTENT_MD5`).
    pub content_md5: bool,
}

/// A multipart upload the server still holds open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenUpload {
    pub key: String,
    pub upload_id: String,
    /// When it was initiated; `None` if the server's date did not parse.
    pub initiated: Option<SystemTime>,
}

/// Why the bucket is not usable yet.
#[derive(Debug, thiserror::Error)]
pub enum BucketError {
    /// Waiting cannot help (the bucket is missing and may not be created).
    #[error("{0}")]
    Fatal(String),
    /// Worth retrying: the server, the network or permissions may change.
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// What the daemon needs of the bucket beyond objects: start-up checks, the
/// readiness probe, and the listings behind `list`, `verify --all` and the
/// multipart sweep.
pub trait BucketAdmin: ObjectStore {
    /// Checks that the bucket exists, creating it when allowed.
    fn ensure_bucket(&self) -> Result<(), BucketError>;
    /// Finds out whether the server verifies `x-amz-checksum-sha256`.
    fn probe_integrity(&mut self) -> Result<Integrity, StorageError>;
    /// One cheap request, for readiness.
    fn probe(&self) -> Result<(), StorageError>;
    /// Every key under `prefix`.
    fn list_keys(&self, prefix: &str) -> Result<Vec<String>, StorageError>;
    /// The multipart uploads the server holds open under `prefix`.
    fn open_uploads(&self, prefix: &str) -> Result<Vec<OpenUpload>, StorageError>;
}

// ---- the checkpoint store ----

/// A stream's status in the checkpoint store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredStatus {
    Active,
    Complete,
    Incomplete,
}

impl StoredStatus {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            StoredStatus::Active => "active",
            StoredStatus::Complete => "complete",
            StoredStatus::Incomplete => "incomplete",
        }
    }

    pub(crate) fn parse(value: &str) -> Option<Self> {
        match value {
            "active" => Some(StoredStatus::Active),
            "complete" => Some(StoredStatus::Complete),
            "incomplete" => Some(StoredStatus::Incomplete),
            _ => None,
        }
    }
}

/// Everything known about a stream, as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredStream {
    pub id: String,
    pub identity: FileIdentity,
    pub rel_path: String,
    pub file_name: String,
    pub chunk_size: u64,
    pub started_at: SystemTime,
    pub last_change_at: SystemTime,
    pub status: StoredStatus,
    /// Completed revisions so far (0 until the first completion).
    pub revision: u32,
    /// Size and mtime at the last completion.
    pub completed_size: u64,
    pub completed_mtime_ns: i128,
    /// The revision whose assembled object exists (0: none).
    pub assembled_revision: u32,
    /// The chunk records of the revision in progress. A complete stream keeps
    /// none here: its `metadata.json` holds them (see docs/storage-layout.md).
    pub chunks: BTreeMap<u64, ChunkRecord>,
    /// The first chunk's fingerprint, kept once the chunk records are
    /// dropped: what tells the stream's file from another one at its path.
    pub head: Option<HeadPrint>,
}

/// The size and sha256 of a stream's first chunk: enough to tell, by
/// content, whether a file at the stream's path with a new identity is the
/// stream's file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeadPrint {
    pub size_bytes: u64,
    /// The first [`HEAD_PRINT_HEX`] lower-case hex digits (128 bits) of the
    /// chunk's sha256: ample to tell two files apart, and half the bytes in
    /// every complete stream's record.
    pub sha256: String,
}

/// Hex digits of a first chunk's sha256 kept in a [`HeadPrint`].
pub const HEAD_PRINT_HEX: usize = 32;

impl HeadPrint {
    /// The fingerprint of a stream whose first chunk is `chunk`.
    pub fn of(chunk: &ChunkRecord) -> Self {
        Self {
            size_bytes: chunk.size_bytes,
            sha256: chunk.sha256.chars().take(HEAD_PRINT_HEX).collect(),
        }
    }

    /// Whether a file whose first `size_bytes` hash to `sha256` (full hex)
    /// starts like the stream's file.
    pub fn matches(&self, sha256: &str) -> bool {
        !self.sha256.is_empty() && sha256.starts_with(&self.sha256)
    }
}

/// A server-side assembly in progress, checkpointed after every part so a
/// crash resumes it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AssemblyProgress {
    /// The stream revision being assembled.
    pub revision: u32,
    pub key: String,
    pub upload_id: String,
    /// Part number → ETag of the parts copied so far.
    pub parts: BTreeMap<u32, String>,
}

/// The facts written when a stream completes.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub revision: u32,
    pub size: u64,
    pub mtime_ns: i128,
    pub last_change_at: SystemTime,
    pub completed_at: SystemTime,
    /// The first chunk's fingerprint, kept while the chunk records are
    /// dropped (`metadata.json` holds them now).
    pub head: Option<HeadPrint>,
    /// Give the lease up in the same step (nothing more to do for the
    /// stream: no assembly or disposal of its file wanted).
    pub release_lease: bool,
    /// The `stream.completed` event, put in the outbox in the same atomic
    /// step (`None` when no event destination is configured).
    pub announcement: Option<Announcement>,
}

/// The answer to a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This process owns the stream now; its writes carry `token`.
    Granted { token: u64 },
    /// Another replica owns it for at least `remaining` more.
    HeldBy { owner: String, remaining: Duration },
    /// The stream has no record (yet, or any more): nothing to claim.
    NoRecord,
}

/// What a renewal found for one lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseStatus {
    /// Still this process's, for another `LEASE_TTL`.
    Held,
    /// Claimed by another replica since: stop writing for the stream.
    Lost,
    /// The stream's record is gone (Redis lost its data): write it back,
    /// then renew again.
    NoRecord,
}

/// The result of one renewal round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Renewal {
    /// Replicas alive now, this one included.
    pub replicas: usize,
    /// One status per lease, in the order asked.
    pub statuses: Vec<LeaseStatus>,
}

/// What the coordinator and the workers need from the checkpoint store.
///
/// Writes about a stream's progress take the fencing `token` of the claim
/// they are made under; they fail with [`FencedWriteError::LeaseLost`] unless
/// this process still holds the stream's lease with that token.
pub trait CheckpointStore: Send {
    /// Round trip to check the store is reachable.
    fn ping(&mut self) -> Result<(), CheckpointError>;

    /// Every live stream (those in the identity index), with their chunks;
    /// a record that cannot be trusted comes back as a
    /// [`CorruptRecord`].
    fn load_streams(&mut self) -> Result<Vec<Loaded>, CheckpointError>;

    /// One stream by id, if its record exists.
    fn load_stream(&mut self, id: &str) -> Result<Option<Loaded>, CheckpointError>;

    /// Maps the stream's identity to `stream.id` and stores its record, in one
    /// atomic step, unless the identity already maps to another stream that is
    /// not `retired`. Returns the id the identity maps to afterwards.
    fn register_stream(
        &mut self,
        stream: &StoredStream,
        retired: Option<&str>,
    ) -> Result<String, CheckpointError>;

    /// Records an uploaded chunk. Idempotent. Fenced.
    fn checkpoint_chunk(
        &mut self,
        stream_id: &str,
        token: u64,
        chunk: &ChunkRecord,
    ) -> Result<(), FencedWriteError>;

    /// Records the path a stream was last seen at.
    fn record_path(&mut self, stream_id: &str, rel_path: &str) -> Result<(), CheckpointError>;

    /// Records that the stream's file now has identity `new` (it had `old`):
    /// the index maps `new` to the stream, and `old` no longer does.
    fn record_identity(
        &mut self,
        stream_id: &str,
        old: FileIdentity,
        new: FileIdentity,
    ) -> Result<(), CheckpointError>;

    /// Marks the stream complete and drops its chunk records, leaving the
    /// compact record that recognises the unchanged file. Idempotent. Fenced.
    fn mark_complete(
        &mut self,
        stream_id: &str,
        token: u64,
        completion: &Completion,
    ) -> Result<(), FencedWriteError>;

    /// Marks the stream incomplete, with the reason, and puts its
    /// `stream.failed` event (if any) in the outbox in the same atomic step.
    /// Idempotent. Fenced.
    fn mark_incomplete(
        &mut self,
        stream_id: &str,
        token: u64,
        reason: &str,
        announcement: Option<&Announcement>,
    ) -> Result<(), FencedWriteError>;

    /// Succeeds only while this process holds the stream with `token`: the
    /// check made right before an object write that must not come from a
    /// replica that lost the stream (its metadata).
    fn confirm_lease(&mut self, stream_id: &str, token: u64) -> Result<(), FencedWriteError>;

    /// Writes the stream back (record, chunks, identity mapping) if its record
    /// is missing, as after a Redis restart that lost its data. `token` is the
    /// fencing token this process holds the stream with, if it does. Returns
    /// whether anything was written.
    fn restore_stream(
        &mut self,
        stream: &StoredStream,
        token: Option<u64>,
    ) -> Result<bool, CheckpointError>;

    /// Claims the stream's lease for this process if no other holds it.
    fn claim(&mut self, stream_id: &str) -> Result<Claim, CheckpointError>;

    /// Renews the leases this process holds (stream id, token), and its
    /// membership in the live-replica set.
    fn renew(&mut self, leases: &[(&str, u64)]) -> Result<Renewal, CheckpointError>;

    /// Gives the lease up, if this process still holds it with `token`.
    fn release(&mut self, stream_id: &str, token: u64) -> Result<(), CheckpointError>;

    /// Leaves the live-replica set (at the end of a drain).
    fn leave(&mut self) -> Result<(), CheckpointError>;

    /// The assembly in progress for the stream, if any.
    fn load_assembly(
        &mut self,
        stream_id: &str,
    ) -> Result<Option<AssemblyProgress>, CheckpointError>;

    /// Records assembly progress (absolute: the whole record is replaced),
    /// or with `None` forgets it. Fenced.
    fn save_assembly(
        &mut self,
        stream_id: &str,
        token: u64,
        progress: Option<&AssemblyProgress>,
    ) -> Result<(), FencedWriteError>;

    /// Atomically records that `revision` is assembled (or, with
    /// `revision` 0, that nothing is) and drops the progress record. Fenced.
    fn finish_assembly(
        &mut self,
        stream_id: &str,
        token: u64,
        revision: u32,
    ) -> Result<(), FencedWriteError>;

    /// A stream whose file is gone (or closed): removes the identity →
    /// stream mapping if it still points to `stream_id`, and lets the
    /// stream's record and chunk records expire after `keep_for`
    /// (`RECORD_RETENTION`), in one atomic step.
    fn retire_stream(
        &mut self,
        identity: FileIdentity,
        stream_id: &str,
        keep_for: Duration,
    ) -> Result<(), CheckpointError>;

    /// Puts an event in the durable outbox, from where it is delivered at
    /// least once. An event whose id was announced within the last day is
    /// not queued again (the same decision seen twice: a retried write, a
    /// second replica). Returns whether it was queued. For decisions written
    /// in their own step (completion, close), prefer the announcement field
    /// of that write, which is atomic with it.
    fn announce(&mut self, announcement: &Announcement) -> Result<bool, CheckpointError>;
}

// ---- the event outbox ----

/// An event waiting in the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingEvent {
    pub id: String,
    /// The event's JSON, as queued.
    pub json: String,
    /// Failed delivery attempts so far.
    pub attempts: u32,
}

/// What the delivery loop needs of the outbox (docs/events.md).
pub trait Outbox: Send {
    /// The oldest due event, hidden from every other reader for `hold` (if
    /// this process dies, it is due again after that).
    fn claim_due(&mut self, hold: Duration) -> Result<Option<PendingEvent>, CheckpointError>;
    /// Appends the event to the Redis stream `stream` (approximately trimmed
    /// to `max_len` entries), once per event id however often it is called.
    fn publish(
        &mut self,
        stream: &str,
        max_len: u64,
        event: &PendingEvent,
        kind: &str,
    ) -> Result<(), CheckpointError>;
    /// Removes a delivered event from the outbox.
    fn delivered(&mut self, id: &str) -> Result<(), CheckpointError>;
    /// Makes a failed event due again after `delay`, with its attempt count.
    fn postpone(&mut self, id: &str, attempts: u32, delay: Duration)
    -> Result<(), CheckpointError>;
    /// Events in the outbox, due or not.
    fn pending(&mut self) -> Result<u64, CheckpointError>;
}

/// A stream whose record cannot be trusted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the checkpoint record of stream {id} is corrupt: {reason}")]
pub struct CorruptRecord {
    pub id: String,
    /// The path the record names, when that much is readable.
    pub path: Option<String>,
    pub reason: String,
}

/// A record read back: usable, or corrupt.
pub type Loaded = Result<StoredStream, CorruptRecord>;
