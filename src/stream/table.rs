//! The table of streams, keyed by file identity, owned by the coordinator.
//!
//! It turns each scan into events for the pure state machine (observed,
//! missing, unseen, replaced), applies them, and reports the changes the
//! coordinator must act on: new files to register, streams to close or
//! forget, reopens and renames, and files whose inode number changed under a
//! stream's path, which the coordinator checks by content before they
//! continue the stream (see docs/architecture.md, "File identity"). It does no
//! I/O itself.
//!
//! It also decides when the watch directory as a whole cannot be trusted
//! (blind): the scan could not read it, it is another file system than a
//! moment ago, or it is empty while streams are open (a network mount that
//! dropped away leaves an empty local directory). While blind, every stream
//! is unseen: nothing completes, vanishes or is replaced.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use crate::metadata::ChunkRecord;
use crate::scan::{FileIdentity, Observation, Scan};
use crate::store::{StoredStatus, StoredStream};
use crate::stream::state::{Action, CloseReason, Event, Phase, Rules, StreamState};
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
    pub chunks: BTreeMap<u64, ChunkRecord>,
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
    /// incomplete, or elsewhere (another replica owns it).
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
    /// A stream just registered for `observation`.
    pub fn new(id: String, observation: &Observation, chunk_size: u64, now: Instant) -> Self {
        let wall = SystemTime::now();
        Self {
            id,
            identity: observation.identity,
            rel_path: observation.rel_path.to_string(),
            abs_path: observation.abs_path.to_path_buf(),
            file_name: file_name(&observation.rel_path),
            state: StreamState::new(chunk_size, observation.size, observation.mtime_ns, now),
            chunks: BTreeMap::new(),
            started_at: wall,
            last_change_at: wall,
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
        assemble: bool,
    ) -> Option<Self> {
        let state = match stored.status {
            StoredStatus::Incomplete => return None,
            StoredStatus::Complete => {
                let mut state = StreamState::completed(
                    stored.chunk_size,
                    stored.completed_size,
                    stored.completed_mtime_ns,
                    now,
                );
                state.assembly_pending = assemble && stored.assembled_revision < stored.revision;
                state
            }
            StoredStatus::Active => {
                let mut state = StreamState::new(stored.chunk_size, 0, 0, now);
                // What was checkpointed tells how far the file had got; a
                // shorter file on the first poll is then seen as truncated.
                state.size = contiguous_bytes(&stored.chunks);
                state.full_chunks_done = leading_full_chunks(&stored.chunks, stored.chunk_size);
                state
            }
        };
        Some(Self {
            abs_path: watch_dir.join(&stored.rel_path),
            id: stored.id,
            identity: stored.identity,
            rel_path: stored.rel_path,
            file_name: stored.file_name,
            state,
            chunks: stored.chunks,
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
    pub fn adopt(&mut self, stored: StoredStream, assemble: bool) -> bool {
        let state = &mut self.state;
        let available = state.size / state.chunk_size;
        match stored.status {
            StoredStatus::Incomplete => return false,
            StoredStatus::Complete => {
                let completed = (stored.completed_size, stored.completed_mtime_ns);
                state.completed = Some(completed);
                if (state.size, state.mtime_ns) == completed {
                    state.phase = Phase::Complete;
                    state.assembly_pending =
                        assemble && stored.assembled_revision < stored.revision;
                } else {
                    // Changed since that completion: a new revision.
                    state.phase = Phase::Active;
                    state.assembly_pending = false;
                }
            }
            StoredStatus::Active => {
                state.phase = Phase::Active;
                state.assembly_pending = false;
            }
        }
        state.full_chunks_done =
            leading_full_chunks(&stored.chunks, stored.chunk_size).min(available);
        self.chunks = stored.chunks;
        self.revision = stored.revision;
        self.assembled_revision = stored.assembled_revision;
        self.started_at = stored.started_at;
        true
    }

    /// Whether the stream needs an owner: it is being uploaded, or its last
    /// completion still has to be assembled.
    pub fn needs_owner(&self) -> bool {
        self.is_active() || (self.state.phase == Phase::Complete && self.state.assembly_pending)
    }

    /// The record as the checkpoint store should hold it.
    pub fn to_stored(&self) -> StoredStream {
        let (status, (completed_size, completed_mtime_ns)) = match self.state.phase {
            Phase::Complete => (
                StoredStatus::Complete,
                self.state
                    .completed
                    .unwrap_or((self.state.size, self.state.mtime_ns)),
            ),
            Phase::Closed(_) => (StoredStatus::Incomplete, (0, 0)),
            Phase::Active | Phase::Finalizing => (StoredStatus::Active, (0, 0)),
        };
        StoredStream {
            id: self.id.clone(),
            identity: self.identity,
            rel_path: self.rel_path.clone(),
            file_name: self.file_name.clone(),
            chunk_size: self.state.chunk_size,
            started_at: self.started_at,
            last_change_at: self.last_change_at,
            status,
            revision: self.revision,
            completed_size,
            completed_mtime_ns,
            assembled_revision: self.assembled_revision,
            chunks: self.chunks.clone(),
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
            chunk_size: self.state.chunk_size,
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
        matches!(self.state.phase, Phase::Active | Phase::Finalizing)
    }

    /// Counts bytes this process uploaded, for the rate in the view.
    pub fn record_upload(&mut self, bytes: u64, job_started: Instant) {
        self.first_upload_this_run.get_or_insert(job_started);
        self.uploaded_this_run += bytes;
    }

    pub fn view(&self, now: Instant) -> StreamView {
        let state = match self.state.phase {
            Phase::Active if self.state.in_flight => "uploading",
            Phase::Active if self.state.missing_since.is_some() => "missing",
            Phase::Active if self.state.unseen => "unseen",
            Phase::Active if self.state.retry_at.is_some_and(|at| at > now) => "backoff",
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
            size_bytes: self.state.size,
            uploaded_bytes: self.uploaded_bytes(),
            chunks_uploaded: self.chunks.len() as u64,
            last_change_seconds_ago: now
                .saturating_duration_since(self.state.last_change)
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
    chunks
        .values()
        .enumerate()
        .take_while(|(position, chunk)| {
            chunk.index == *position as u64 && chunk.size_bytes == chunk_size
        })
        .count() as u64
}

fn contiguous_bytes(chunks: &BTreeMap<u64, ChunkRecord>) -> u64 {
    let mut next = 0;
    for chunk in chunks.values() {
        if chunk.offset != next {
            break;
        }
        next += chunk.size_bytes;
    }
    next
}

/// The last component of a `/`-separated relative path.
pub fn file_name(rel_path: &str) -> String {
    rel_path.rsplit('/').next().unwrap_or(rel_path).to_string()
}

/// What the coordinator has to act on after a scan or a job result.
#[derive(Debug)]
pub enum Change {
    /// A file with no stream: register one.
    Discovered(Observation),
    /// Removed from the table: record it as incomplete.
    Closed(Box<TrackedStream>, CloseReason),
    /// Removed from the table: complete and gone, nothing to write.
    Forgotten(Box<TrackedStream>),
    /// A complete stream is active again.
    Reopened { id: String, path: String },
    /// The same file is now at another path.
    Moved {
        id: String,
        from: String,
        to: String,
    },
    /// The stream's file is not to be seen under its identity, and a file
    /// with another identity sits at its path: the same file with a new inode
    /// number (a FUSE or SMB client after an outage, a remount), or a new
    /// file. The coordinator compares contents, then calls
    /// [`StreamTable::rekey`] or applies [`Event::Replaced`].
    IdentityChanged {
        identity: FileIdentity,
        seen: Observation,
    },
}

#[derive(Debug, Default)]
pub struct StreamTable {
    streams: HashMap<FileIdentity, TrackedStream>,
    /// When the last scan was applied (blind or not).
    last_scan: Option<Instant>,
    /// Why the watch directory cannot be trusted now, if it cannot.
    blind: Option<String>,
    /// The last scan was blind: inode numbers may have been handed out anew
    /// (a remount), so the next scan matches streams by path first.
    after_blindness: bool,
}

impl StreamTable {
    pub fn insert(&mut self, stream: TrackedStream) {
        self.streams.insert(stream.identity, stream);
    }

    pub fn len(&self) -> usize {
        self.streams.len()
    }

    pub fn is_empty(&self) -> bool {
        self.streams.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &TrackedStream> {
        self.streams.values()
    }

    /// Records that a job was just handed out for the stream.
    pub fn mark_dispatched(&mut self, identity: &FileIdentity, now: Instant) {
        if let Some(stream) = self.streams.get_mut(identity) {
            stream.last_dispatch = Some(now);
        }
    }

    pub fn get(&self, identity: &FileIdentity) -> Option<&TrackedStream> {
        self.streams.get(identity)
    }

    pub fn stream_mut(&mut self, identity: &FileIdentity) -> Option<&mut TrackedStream> {
        self.streams.get_mut(identity)
    }

    pub fn remove(&mut self, identity: &FileIdentity) -> Option<TrackedStream> {
        self.streams.remove(identity)
    }

    /// The stream for a job result, if it is still the same stream.
    pub fn get_mut(&mut self, stream: &StreamRef) -> Option<&mut TrackedStream> {
        self.streams
            .get_mut(&stream.identity)
            .filter(|tracked| tracked.id == stream.stream_id)
    }

    /// Applies one event to one stream and settles the resulting actions.
    pub fn apply(
        &mut self,
        identity: FileIdentity,
        event: Event,
        now: Instant,
        rules: &Rules,
    ) -> Vec<Change> {
        let Some(stream) = self.streams.get_mut(&identity) else {
            return Vec::new();
        };
        let last_change = stream.state.last_change;
        let actions = stream.state.step(event, now, rules);
        // An unseen poll moves the timer, not the file's last change.
        let unseen = matches!(event, Event::Unseen { .. });
        if stream.state.last_change != last_change && !unseen {
            stream.last_change_at = SystemTime::now();
        }
        let mut changes = Vec::new();
        for action in actions {
            match action {
                Action::Close(reason) => {
                    if let Some(stream) = self.streams.remove(&identity) {
                        changes.push(Change::Closed(Box::new(stream), reason));
                    }
                }
                Action::Forget => {
                    if let Some(stream) = self.streams.remove(&identity) {
                        changes.push(Change::Forgotten(Box::new(stream)));
                    }
                }
                // The file is still in the scan with no stream for it now, so
                // it is discovered afresh.
                Action::Restart => {}
                Action::Reopened => {
                    if let Some(stream) = self.streams.get(&identity) {
                        changes.push(Change::Reopened {
                            id: stream.id.clone(),
                            path: stream.rel_path.clone(),
                        });
                    }
                }
            }
        }
        changes
    }

    /// Why the watch directory could not be trusted at the last scan.
    pub fn blind(&self) -> Option<&str> {
        self.blind.as_deref()
    }

    /// Why nothing may be concluded from `scan`, if that is so.
    fn blindness(&self, scan: &Scan) -> Option<String> {
        if let Some(reason) = &scan.blind {
            return Some(reason.clone());
        }
        let open = self.streams.values().filter(|s| s.is_active()).count();
        (scan.root_entries == 0 && open > 0).then(|| {
            format!(
                "watch directory is empty while {open} streams are open (a network mount that dropped away looks like this)"
            )
        })
    }

    /// Feeds one scan to every stream and finds new files.
    pub fn apply_scan(&mut self, scan: &Scan, now: Instant, rules: &Rules) -> Vec<Change> {
        let gap = self
            .last_scan
            .map_or(Duration::ZERO, |last| now.saturating_duration_since(last));
        self.last_scan = Some(now);
        self.blind = self.blindness(scan);
        let mut identities: Vec<FileIdentity> = self.streams.keys().copied().collect();
        identities.sort();
        let mut changes = Vec::new();
        if self.blind.is_some() {
            self.after_blindness = true;
            for identity in identities {
                changes.extend(self.apply(identity, Event::Unseen { gap }, now, rules));
            }
            return changes;
        }
        let path_first = std::mem::take(&mut self.after_blindness);

        let mut by_identity: HashMap<FileIdentity, &Observation> = HashMap::new();
        let mut by_path: HashMap<&str, &Observation> = HashMap::new();
        for observation in &scan.files {
            // A second hard link to the same file is the same stream.
            by_identity
                .entry(observation.identity)
                .or_insert(observation);
            by_path.insert(&observation.rel_path, observation);
        }

        // Identities that a stream may take over: not to be discovered.
        let mut claimed: HashSet<FileIdentity> = HashSet::new();
        for identity in identities {
            let stream = &self.streams[&identity];
            let at_path = by_path
                .get(stream.rel_path.as_str())
                .filter(|seen| seen.identity != identity);
            let candidate = at_path.filter(|seen| {
                // Another stream's file moved onto this path: a replacement.
                // After a blind spell, inode numbers prove nothing.
                path_first || !self.streams.contains_key(&seen.identity)
            });
            let event = match (by_identity.get(&identity), candidate) {
                (found, Some(seen)) if path_first || found.is_none() => {
                    claimed.insert(seen.identity);
                    // A job result comes back under the old identity: the
                    // check waits until no job is out.
                    if !stream.state.in_flight {
                        changes.push(Change::IdentityChanged {
                            identity,
                            seen: (*seen).clone(),
                        });
                    }
                    continue;
                }
                (Some(seen), _) => {
                    if *seen.rel_path != *stream.rel_path {
                        let from = stream.rel_path.clone();
                        let stream = self.streams.get_mut(&identity).expect("present");
                        stream.rel_path = seen.rel_path.to_string();
                        stream.abs_path = seen.abs_path.to_path_buf();
                        stream.file_name = file_name(&seen.rel_path);
                        changes.push(Change::Moved {
                            id: stream.id.clone(),
                            from,
                            to: seen.rel_path.to_string(),
                        });
                    }
                    Event::Observed {
                        size: seen.size,
                        mtime_ns: seen.mtime_ns,
                    }
                }
                (None, _) if !scan.proves_absent(&stream.rel_path, identity.device) => {
                    Event::Unseen { gap }
                }
                (None, _) if at_path.is_some() => Event::Replaced,
                (None, _) => Event::Missing,
            };
            changes.extend(self.apply(identity, event, now, rules));
        }

        let mut new_files: Vec<&Observation> = by_identity
            .values()
            .filter(|observation| {
                !self.streams.contains_key(&observation.identity)
                    && !claimed.contains(&observation.identity)
            })
            .copied()
            .collect();
        new_files.sort_by(|a, b| a.rel_path.cmp(&b.rel_path));
        changes.extend(
            new_files
                .into_iter()
                .map(|observation| Change::Discovered(observation.clone())),
        );
        changes
    }

    /// Moves streams to the new identities of their files (their contents
    /// matched), all at once, so that two files that swapped inode numbers
    /// in a remount swap streams too. A pair whose new identity belongs to a
    /// stream that stays is skipped. Returns (stream id, old, new) per move.
    pub fn rekey(
        &mut self,
        moves: Vec<(FileIdentity, Observation)>,
    ) -> Vec<(String, FileIdentity, FileIdentity)> {
        let mut targets = HashSet::new();
        let mut moves: Vec<(FileIdentity, Observation)> = moves
            .into_iter()
            .filter(|(_, seen)| targets.insert(seen.identity))
            .collect();
        loop {
            let leaving: HashSet<FileIdentity> = moves.iter().map(|(old, _)| *old).collect();
            let before = moves.len();
            moves.retain(|(_, seen)| {
                !self.streams.contains_key(&seen.identity) || leaving.contains(&seen.identity)
            });
            if moves.len() == before {
                break;
            }
        }
        let moving: Vec<(TrackedStream, Observation)> = moves
            .into_iter()
            .filter_map(|(old, seen)| Some((self.streams.remove(&old)?, seen)))
            .collect();
        let mut moved = Vec::with_capacity(moving.len());
        for (mut stream, seen) in moving {
            let old = stream.identity;
            stream.identity = seen.identity;
            stream.rel_path = seen.rel_path.to_string();
            stream.abs_path = seen.abs_path.to_path_buf();
            stream.file_name = file_name(&seen.rel_path);
            moved.push((stream.id.clone(), old, seen.identity));
            self.streams.insert(seen.identity, stream);
        }
        moved
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RetryPolicy;
    use crate::scan::WATCH_DIR_DEVICE;
    use std::time::Duration;

    const CHUNK: u64 = 10;

    fn rules() -> Rules {
        Rules {
            stream_timeout: Duration::from_secs(30),
            vanish_grace: Duration::from_secs(30),
            retry: RetryPolicy {
                base_delay: Duration::from_secs(1),
                max_delay: Duration::from_secs(8),
            },
            assemble: false,
        }
    }

    fn file(path: &str, inode: u64, size: u64) -> Observation {
        Observation {
            rel_path: path.into(),
            abs_path: PathBuf::from("/w").join(path).into(),
            identity: FileIdentity {
                device: WATCH_DIR_DEVICE,
                inode,
            },
            size,
            mtime_ns: size as i128,
        }
    }

    fn scan(files: Vec<Observation>) -> Scan {
        Scan::clear(files)
    }

    /// Registers every discovered file, as the coordinator would.
    fn settle(table: &mut StreamTable, changes: Vec<Change>, now: Instant) -> Vec<Change> {
        let mut rest = Vec::new();
        for change in changes {
            match change {
                Change::Discovered(observation) => {
                    let id = format!("s{}", observation.identity.inode);
                    table.insert(TrackedStream::new(id, &observation, CHUNK, now));
                }
                other => rest.push(other),
            }
        }
        rest
    }

    /// A table that tracks `files` (all discovered and registered).
    fn tracking(files: Vec<Observation>) -> (StreamTable, Instant) {
        let mut table = StreamTable::default();
        let now = Instant::now();
        let changes = table.apply_scan(&scan(files), now, &rules());
        settle(&mut table, changes, now);
        (table, now)
    }

    #[test]
    fn same_name_in_two_directories_is_two_streams() {
        let mut table = StreamTable::default();
        let now = Instant::now();
        let changes = table.apply_scan(
            &scan(vec![file("a/cam.mp4", 1, 5), file("b/cam.mp4", 2, 5)]),
            now,
            &rules(),
        );
        assert_eq!(
            changes
                .iter()
                .filter(|c| matches!(c, Change::Discovered(_)))
                .count(),
            2
        );
    }

    #[test]
    fn a_rename_keeps_the_stream_and_records_the_new_path() {
        let (mut table, now) = tracking(vec![file("cam.mp4.mp4", 1, 5)]);
        let changes = table.apply_scan(&scan(vec![file("done/cam.mp4", 1, 5)]), now, &rules());
        assert!(matches!(&changes[..], [Change::Moved { to, .. }] if to == "done/cam.mp4"));
        assert_eq!(table.len(), 1);
        assert_eq!(table.iter().next().unwrap().file_name, "cam.mp4");
    }

    #[test]
    fn a_replaced_file_closes_the_old_stream_and_starts_a_new_one() {
        let (mut table, now) = tracking(vec![file("cam.mp4", 1, 5)]);
        let changes = table.apply_scan(&scan(vec![file("cam.mp4", 2, 3)]), now, &rules());
        // The coordinator compares contents first; here they differ.
        assert!(matches!(
            &changes[..],
            [Change::IdentityChanged { identity, seen }]
                if identity.inode == 1 && seen.identity.inode == 2
        ));
        let changes = table.apply(
            FileIdentity {
                device: WATCH_DIR_DEVICE,
                inode: 1,
            },
            Event::Replaced,
            now,
            &rules(),
        );
        assert!(matches!(&changes[..], [Change::Closed(s, CloseReason::Replaced)] if s.id == "s1"));
    }

    #[test]
    fn a_file_with_a_new_inode_number_and_the_same_bytes_keeps_its_stream() {
        let (mut table, now) = tracking(vec![file("cam.mp4", 3, 25)]);
        let changes = table.apply_scan(&scan(vec![file("cam.mp4", 4, 30)]), now, &rules());
        let [Change::IdentityChanged { identity, seen }] = &changes[..] else {
            panic!("{changes:?}");
        };
        let moved = table.rekey(vec![(*identity, seen.clone())]);
        assert_eq!(moved.len(), 1);
        assert_eq!(moved[0].0, "s3");
        let later = now + Duration::from_secs(1);
        assert!(
            table
                .apply_scan(&scan(vec![file("cam.mp4", 4, 30)]), later, &rules())
                .is_empty()
        );
        let stream = table.iter().next().unwrap();
        assert_eq!((stream.id.as_str(), stream.state.size), ("s3", 30));
    }

    #[test]
    fn after_a_blind_spell_streams_are_matched_by_path_first() {
        // A remount handed the two files each other's inode numbers.
        let files = vec![file("a.mp4", 1, 25), file("b.mp4", 2, 25)];
        let (mut table, now) = tracking(files);
        let blind = Scan {
            blind: Some("ENOTCONN".into()),
            ..Scan::default()
        };
        assert!(table.apply_scan(&blind, now, &rules()).is_empty());
        assert!(table.blind().is_some());
        let swapped = vec![file("a.mp4", 2, 25), file("b.mp4", 1, 25)];
        let changes = table.apply_scan(&scan(swapped), now, &rules());
        assert!(table.blind().is_none());
        let moves: Vec<(FileIdentity, Observation)> = changes
            .into_iter()
            .map(|change| match change {
                Change::IdentityChanged { identity, seen } => (identity, seen),
                other => panic!("not a rename: {other:?}"),
            })
            .collect();
        assert_eq!(table.rekey(moves).len(), 2);
        let a = table.iter().find(|s| s.rel_path == "a.mp4").unwrap();
        assert_eq!((a.id.as_str(), a.identity.inode), ("s1", 2));
    }

    #[test]
    fn an_unreadable_file_is_kept_however_long_it_lasts() {
        let (mut table, now) = tracking(vec![file("cam.mp4", 1, 5)]);
        let unreadable = Scan {
            unreadable: vec!["cam.mp4".into()],
            root_entries: 1,
            ..Scan::clear(vec![])
        };
        for minute in 1..=10 {
            let later = now + Duration::from_secs(60 * minute);
            assert!(table.apply_scan(&unreadable, later, &rules()).is_empty());
            let stream = table.iter().next().unwrap();
            assert_eq!(stream.state.wanted(later, &rules()), None, "no completion");
            assert_eq!(stream.view(later).state, "unseen");
        }
    }

    #[test]
    fn a_local_directory_where_a_mount_was_proves_nothing() {
        // cams/ was a mount (device 9) below the watch directory.
        let mut cam = file("cams/cam.mp4", 1, 5);
        cam.identity.device = 9;
        let (mut table, now) = tracking(vec![cam, file("top.mp4", 2, 5)]);
        // The mount dropped away: cams/ is an empty local directory.
        let mut dropped = scan(vec![file("top.mp4", 2, 5)]);
        dropped.listed.insert("cams".into(), WATCH_DIR_DEVICE);
        let later = now + Duration::from_secs(3600);
        assert!(table.apply_scan(&dropped, now, &rules()).is_empty());
        assert!(table.apply_scan(&dropped, later, &rules()).is_empty());
        let cam = table.iter().find(|s| s.rel_path == "cams/cam.mp4").unwrap();
        assert_eq!(cam.view(later).state, "unseen");
        // Listed on its own file system and absent: gone.
        let mut gone = scan(vec![file("top.mp4", 2, 5)]);
        gone.listed.insert("cams".into(), 9);
        let much_later = later + Duration::from_secs(1);
        assert!(table.apply_scan(&gone, much_later, &rules()).is_empty());
        let changes = table.apply_scan(&gone, much_later + Duration::from_secs(31), &rules());
        assert!(matches!(
            &changes[..],
            [Change::Closed(_, CloseReason::Vanished)]
        ));
    }

    #[test]
    fn an_empty_watch_dir_with_open_streams_is_blind() {
        let (mut table, now) = tracking(vec![file("cam.mp4", 1, 5)]);
        let later = now + Duration::from_secs(3600);
        assert!(table.apply_scan(&scan(vec![]), later, &rules()).is_empty());
        assert!(table.blind().unwrap().contains("empty"));
        assert_eq!(table.len(), 1);
    }

    #[test]
    fn a_truncated_file_closes_and_is_rediscovered() {
        let (mut table, now) = tracking(vec![file("cam.mp4", 1, 25)]);
        let changes = table.apply_scan(&scan(vec![file("cam.mp4", 1, 4)]), now, &rules());
        assert!(matches!(
            &changes[0],
            Change::Closed(_, CloseReason::Truncated)
        ));
        assert!(matches!(&changes[1], Change::Discovered(o) if o.size == 4));
    }

    #[test]
    fn an_unreadable_watch_dir_changes_nothing() {
        let (mut table, now) = tracking(vec![file("cam.mp4", 1, 25)]);
        let unreadable = Scan {
            blind: Some("EIO".into()),
            ..Scan::default()
        };
        let later = now + Duration::from_secs(3600);
        assert!(table.apply_scan(&unreadable, later, &rules()).is_empty());
        assert!(table.iter().next().unwrap().state.missing_since.is_none());
    }

    #[test]
    fn a_deleted_file_is_closed_after_the_grace_period() {
        let (mut table, now) = tracking(vec![file("cam.mp4", 1, 25)]);
        // Something else is still in the directory: it is not a lost mount.
        let without = Scan {
            root_entries: 1,
            ..scan(vec![])
        };
        assert!(table.apply_scan(&without, now, &rules()).is_empty());
        let later = now + Duration::from_secs(31);
        let changes = table.apply_scan(&without, later, &rules());
        assert!(matches!(
            &changes[..],
            [Change::Closed(_, CloseReason::Vanished)]
        ));
        assert!(table.is_empty());
    }

    #[test]
    fn resumed_streams_continue_after_their_last_full_chunk() {
        let chunk = |index: u64, size: u64| ChunkRecord {
            index,
            key: format!("k{index}"),
            offset: index * CHUNK,
            size_bytes: size,
            sha256: String::new(),
            uploaded_at: String::new(),
        };
        let stored = StoredStream {
            id: "cam-1".into(),
            identity: FileIdentity {
                device: 1,
                inode: 1,
            },
            rel_path: "cam.mp4".into(),
            file_name: "cam.mp4".into(),
            chunk_size: CHUNK,
            started_at: SystemTime::UNIX_EPOCH,
            last_change_at: SystemTime::UNIX_EPOCH,
            status: StoredStatus::Active,
            revision: 0,
            completed_size: 0,
            completed_mtime_ns: 0,
            assembled_revision: 0,
            chunks: BTreeMap::from([(0, chunk(0, CHUNK)), (1, chunk(1, CHUNK)), (2, chunk(2, 4))]),
        };
        let resumed =
            TrackedStream::from_stored(stored.clone(), Path::new("/w"), Instant::now(), false)
                .unwrap();
        assert_eq!(resumed.state.full_chunks_done, 2);
        assert_eq!(resumed.state.size, 24);
        assert_eq!(resumed.abs_path, PathBuf::from("/w/cam.mp4"));
        let closed = StoredStream {
            status: StoredStatus::Incomplete,
            ..stored
        };
        assert!(
            TrackedStream::from_stored(closed, Path::new("/w"), Instant::now(), false).is_none()
        );
    }
}
