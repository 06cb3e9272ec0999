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

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use crate::scan::{FileIdentity, Observation, Scan};
use crate::stream::Now;
use crate::stream::state::{Action, CloseReason, Event, Rules};
use crate::upload::job::StreamRef;

pub use super::tracked::{StreamView, TrackedStream, file_name};

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
    Reopened {
        identity: FileIdentity,
        id: String,
        path: String,
    },
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
        at: Now,
        rules: &Rules,
    ) -> Vec<Change> {
        let Some(stream) = self.streams.get_mut(&identity) else {
            return Vec::new();
        };
        let last_change = stream.state.last_change();
        let actions = stream.state.step(event, at.instant, rules);
        // An unseen poll moves the timer, not the file's last change.
        let unseen = matches!(event, Event::Unseen { .. });
        if stream.state.last_change() != last_change && !unseen {
            stream.last_change_at = at.wall;
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
                            identity,
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
    pub fn apply_scan(&mut self, scan: &Scan, at: Now, rules: &Rules) -> Vec<Change> {
        let gap = self.last_scan.map_or(Duration::ZERO, |last| {
            at.instant.saturating_duration_since(last)
        });
        self.last_scan = Some(at.instant);
        self.blind = self.blindness(scan);
        let mut identities: Vec<FileIdentity> = self.streams.keys().copied().collect();
        identities.sort();
        let mut changes = Vec::new();
        if self.blind.is_some() {
            self.after_blindness = true;
            for identity in identities {
                changes.extend(self.apply(identity, Event::Unseen { gap }, at, rules));
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
                    if !stream.state.in_flight() {
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
            changes.extend(self.apply(identity, event, at, rules));
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
mod tests;
