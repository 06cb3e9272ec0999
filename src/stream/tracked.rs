//! One stream as the coordinator tracks it: the pure state, plus what the
//! coordinator needs around it (ids, paths, chunk records, progress for
//! `/streams`), and the conversions to and from its checkpoint record.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use serde::{Deserialize, Serialize};

pub use crate::metadata::file_name;
use crate::metadata::{ChunkRecord, contiguous_prefix};
use crate::scan::{FileIdentity, Observation};
use crate::store::ports::HeadPrint;
use crate::store::{StoredStatus, StoredStream};
use crate::stream::Now;
use crate::stream::state::{Adoption, Event, Phase, Rules, StreamState};
use crate::upload::job::{StreamFacts, StreamRef};

/// One stream as the coordinator tracks it.
#[derive(Debug, Clone)]
pub struct TrackedStream {
    pub id: String,
    pub identity: FileIdentity,
    pub rel_path: String,
    pub abs_path: PathBuf,
    pub file_name: String,
    pub state: StreamState,
    /// The chunk records of the revision in progress. Dropped at completion
    /// (`metadata.json` holds them; the next revision's jobs read them back
    /// from there), so a complete stream costs little memory.
    pub chunks: BTreeMap<u64, ChunkRecord>,
    /// The first chunk's fingerprint, kept when the records are dropped.
    pub head: Option<HeadPrint>,
    pub started_at: SystemTime,
    pub last_change_at: SystemTime,
    /// Completed revisions so far.
    pub revision: u32,
    /// The revision whose assembled object exists (0: none).
    pub assembled_revision: u32,
    /// When a job was last handed out for it (for fair dispatch).
    pub last_dispatch: Option<Instant>,
    /// Failed request attempts so far, and the last failure.
    pub retries: u64,
    pub last_error: Option<String>,
    /// Bytes this process uploaded for the stream, since when (for the rate).
    pub uploaded_this_run: u64,
    pub first_upload_this_run: Option<Instant>,
}

/// One stream as `/streams` and `chunkstream status` show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamView {
    pub stream_id: String,
    pub path: String,
    /// uploading, active, backoff, missing, unseen, finalizing, complete,
    /// incomplete, elsewhere (another replica owns it), or quarantined (its
    /// checkpoint record cannot be trusted; `last_error` says why).
    pub state: String,
    pub size_bytes: u64,
    pub uploaded_bytes: u64,
    pub chunks_uploaded: u64,
    pub last_change_seconds_ago: f64,
    pub retries: u64,
    pub last_error: Option<String>,
    /// Average upload rate of this process for the stream.
    pub upload_rate_bytes_per_second: f64,
    pub revision: u32,
    /// Whether this replica holds the stream's lease (uploads it).
    #[serde(default)]
    pub owned: bool,
}

impl TrackedStream {
    /// A stream just registered for `observation`, seen at `wall` time.
    pub fn new(id: String, observation: &Observation, chunk_size: u64, at: Now) -> Self {
        Self {
            id,
            identity: observation.identity,
            rel_path: observation.rel_path.to_string(),
            abs_path: observation.abs_path.to_path_buf(),
            file_name: file_name(&observation.rel_path),
            state: StreamState::new(
                chunk_size,
                observation.size,
                observation.mtime_ns,
                at.instant,
            ),
            chunks: BTreeMap::new(),
            head: None,
            started_at: at.wall,
            last_change_at: at.wall,
            revision: 0,
            assembled_revision: 0,
            last_dispatch: None,
            retries: 0,
            last_error: None,
            uploaded_this_run: 0,
            first_upload_this_run: None,
        }
    }

    /// A stream resumed from its checkpoint. Closed streams are not resumed.
    /// With `assemble`, a complete stream whose last revision has no
    /// assembled object yet wants one.
    pub fn from_stored(
        stored: StoredStream,
        watch_dir: &Path,
        now: Instant,
        rules: &Rules,
    ) -> Option<Self> {
        let state = match stored.status {
            StoredStatus::Incomplete => return None,
            StoredStatus::Complete => StreamState::completed(
                stored.chunk_size,
                stored.completed_size,
                stored.completed_mtime_ns,
                stored.assembled_revision < stored.revision,
                now,
                rules,
            ),
            StoredStatus::Active => StreamState::resumed(
                stored.chunk_size,
                contiguous_bytes(&stored.chunks),
                leading_full_chunks(&stored.chunks, stored.chunk_size),
                now,
            ),
        };
        Some(Self {
            abs_path: watch_dir.join(&stored.rel_path),
            id: stored.id,
            identity: stored.identity,
            rel_path: stored.rel_path,
            file_name: stored.file_name,
            state,
            chunks: stored.chunks,
            head: stored.head,
            started_at: stored.started_at,
            last_change_at: stored.last_change_at,
            revision: stored.revision,
            assembled_revision: stored.assembled_revision,
            last_dispatch: None,
            retries: 0,
            last_error: None,
            uploaded_this_run: 0,
            first_upload_this_run: None,
        })
    }

    /// Takes over what the stream's record says (chunks, revision, status),
    /// as this process claims a stream another replica may have worked on,
    /// and keeps its own observations of the file (size, mtime, how long it
    /// has been quiet). False if the record says the stream was closed as
    /// incomplete: it is then dropped, and its file (if still there) is
    /// discovered afresh.
    pub fn adopt(&mut self, stored: StoredStream, now: Instant, rules: &Rules) -> bool {
        let completed = match stored.status {
            StoredStatus::Incomplete => return false,
            StoredStatus::Complete => Some((stored.completed_size, stored.completed_mtime_ns)),
            StoredStatus::Active => None,
        };
        // A complete record keeps no chunk records: its metadata.json lists
        // every chunk of the completed size.
        let completed_chunks = completed.map_or(0, |(size, _)| size / stored.chunk_size);
        let adoption = Adoption {
            completed,
            assembly_missing: stored.assembled_revision < stored.revision,
            full_chunks_done: leading_full_chunks(&stored.chunks, stored.chunk_size)
                .max(completed_chunks),
        };
        self.state.step(Event::Adopted(adoption), now, rules);
        self.chunks = stored.chunks;
        self.head = stored.head.or(self.head.take());
        self.revision = stored.revision;
        self.assembled_revision = stored.assembled_revision;
        self.started_at = stored.started_at;
        true
    }

    /// Whether the stream needs an owner: it is being uploaded, or its last
    /// completion still has to be assembled or its file disposed of.
    pub fn needs_owner(&self) -> bool {
        self.is_active() || self.state.has_duties()
    }

    /// Drops the chunk records of a completed revision (its `metadata.json`
    /// holds them), keeping the first chunk's fingerprint.
    pub fn settle_completion(&mut self) {
        if let Some(first) = self.chunks.get(&0) {
            self.head = Some(HeadPrint::of(first));
        }
        self.chunks.clear();
    }

    /// The first chunk's fingerprint: from its record while the revision is
    /// in progress, else as kept at completion.
    pub fn head_print(&self) -> Option<HeadPrint> {
        self.chunks.get(&0).map(HeadPrint::of).or(self.head.clone())
    }

    /// The record as the checkpoint store should hold it: a complete stream
    /// without its chunk records.
    pub fn to_stored(&self) -> StoredStream {
        let (status, (completed_size, completed_mtime_ns)) = match self.state.phase() {
            Phase::Complete => (
                StoredStatus::Complete,
                self.state
                    .last_completion()
                    .unwrap_or((self.state.size(), self.state.mtime_ns())),
            ),
            Phase::Closed(_) => (StoredStatus::Incomplete, (0, 0)),
            Phase::Active | Phase::Finalizing => (StoredStatus::Active, (0, 0)),
        };
        StoredStream {
            id: self.id.clone(),
            identity: self.identity,
            rel_path: self.rel_path.clone(),
            file_name: self.file_name.clone(),
            chunk_size: self.state.chunk_size(),
            started_at: self.started_at,
            last_change_at: self.last_change_at,
            status,
            revision: self.revision,
            completed_size,
            completed_mtime_ns,
            assembled_revision: self.assembled_revision,
            chunks: match status {
                StoredStatus::Complete => BTreeMap::new(),
                StoredStatus::Active | StoredStatus::Incomplete => self.chunks.clone(),
            },
            head: self.head_print(),
        }
    }

    /// The stream, for a job run under the claim with fencing `token`.
    pub fn stream_ref(&self, token: u64) -> StreamRef {
        StreamRef {
            identity: self.identity,
            stream_id: self.id.clone(),
            token,
        }
    }

    /// Facts for the next metadata write (the next revision).
    pub fn facts(&self) -> StreamFacts {
        StreamFacts {
            rel_path: self.rel_path.clone(),
            file_name: self.file_name.clone(),
            chunk_size: self.state.chunk_size(),
            started_at: self.started_at,
            last_change_at: self.last_change_at,
            revision: self.revision + 1,
        }
    }

    /// Bytes uploaded as a contiguous prefix of the file.
    pub fn uploaded_bytes(&self) -> u64 {
        contiguous_bytes(&self.chunks)
    }

    pub fn is_active(&self) -> bool {
        matches!(self.state.phase(), Phase::Active | Phase::Finalizing)
    }

    /// Counts bytes this process uploaded, for the rate in the view.
    pub fn record_upload(&mut self, bytes: u64, job_started: Instant) {
        self.first_upload_this_run.get_or_insert(job_started);
        self.uploaded_this_run += bytes;
    }

    pub fn view(&self, now: Instant) -> StreamView {
        let state = match self.state.phase() {
            Phase::Active if self.state.in_flight() => "uploading",
            Phase::Active if self.state.missing_since().is_some() => "missing",
            Phase::Active if self.state.unseen() => "unseen",
            Phase::Active if self.state.retry_at().is_some_and(|at| at > now) => "backoff",
            Phase::Active => "active",
            Phase::Finalizing => "finalizing",
            Phase::Complete => "complete",
            Phase::Closed(_) => "incomplete",
        };
        let rate = self.first_upload_this_run.map_or(0.0, |since| {
            let seconds = now.saturating_duration_since(since).as_secs_f64();
            if seconds > 0.0 {
                self.uploaded_this_run as f64 / seconds
            } else {
                0.0
            }
        });
        StreamView {
            stream_id: self.id.clone(),
            path: self.rel_path.clone(),
            state: state.to_string(),
            size_bytes: self.state.size(),
            uploaded_bytes: self.uploaded_bytes(),
            chunks_uploaded: self.chunks.len() as u64,
            last_change_seconds_ago: now
                .saturating_duration_since(self.state.last_change())
                .as_secs_f64(),
            retries: self.retries,
            last_error: self.last_error.clone(),
            upload_rate_bytes_per_second: rate,
            revision: self.revision,
            owned: false,
        }
    }
}

/// How many chunks from chunk 0 on are uploaded and full-sized.
fn leading_full_chunks(chunks: &BTreeMap<u64, ChunkRecord>, chunk_size: u64) -> u64 {
    contiguous_prefix(chunks)
        .take_while(|chunk| chunk.size_bytes == chunk_size)
        .count() as u64
}

fn contiguous_bytes(chunks: &BTreeMap<u64, ChunkRecord>) -> u64 {
    contiguous_prefix(chunks)
        .map(|chunk| chunk.size_bytes)
        .sum()
}
