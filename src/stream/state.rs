//! The pure lifecycle of one stream: one enum, one `step` function, no I/O.
//!
//! Everything that decides *what happens to a stream* lives here, so it can be
//! tested exhaustively with a fake clock: time is a parameter (`now`), never
//! read. The coordinator feeds in observations and job results as [`Event`]s,
//! carries out the returned [`Action`]s, and asks [`StreamState::wanted`]
//! which job (if any) the stream needs next. At most one job per stream is in
//! flight, which is what keeps a stream's chunks in order.

use std::time::{Duration, Instant};

use crate::config::RetryPolicy;

/// Where a stream is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The file may still grow: full chunks are uploaded as they appear.
    Active,
    /// Quiet for `STREAM_TIMEOUT`: the finalize job (tail, verification,
    /// metadata, completion mark) is running.
    Finalizing,
    /// Metadata written. Watched in case the file grows again (reopen).
    Complete,
    /// Given up without completing; the coordinator drops it.
    Closed(CloseReason),
}

/// Why a stream was closed as incomplete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The file got shorter while it was being uploaded.
    Truncated,
    /// Another file (a new inode) now sits at the stream's path.
    Replaced,
    /// The file disappeared (deleted, or renamed out of the tree or to an
    /// extension we do not watch) for longer than the grace period.
    Vanished,
}

impl CloseReason {
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Truncated => "truncated",
            CloseReason::Replaced => "replaced",
            CloseReason::Vanished => "vanished",
        }
    }
}

/// Something that happened to the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A poll saw the file with this size and mtime.
    Observed { size: u64, mtime_ns: i128 },
    /// A poll that covers the file's path did not find it.
    Missing,
    /// A poll found a different file at the stream's path, and not the stream's.
    Replaced,
    /// A poll could not see the file: an error on it or on a directory above
    /// it, or the whole watch directory was unreadable. Nothing is concluded:
    /// the `gap` since the previous poll does not count towards inactivity,
    /// and an absence seen so far has to be seen afresh for the full grace.
    Unseen { gap: Duration },
    /// A job was handed to a worker.
    Dispatched(Work),
    /// A full chunk was uploaded and checkpointed.
    ChunkUploaded { index: u64 },
    /// The finalize job completed the stream for exactly this size and mtime.
    Finalized { size: u64, mtime_ns: i128 },
    /// The finalize job stopped because the file changed while it ran.
    FinalizeInterrupted,
    /// The assembly job finished (or found nothing to do).
    Assembled,
    /// The disposal job deleted or moved the file.
    Disposed,
    /// The disposal job found the file changed since its completion, or not
    /// at its path: nothing was touched; it is tried again after a backoff,
    /// and a growth reopens the stream meanwhile.
    DisposalRefused,
    /// A job failed for a reason the worker could not retry away (for example
    /// a read error); the stream backs off and tries again.
    JobFailed,
    /// A job was abandoned because the process is shutting down.
    JobCancelled,
    /// This process claimed the stream and took over what its checkpoint
    /// record says (another replica may have worked on it meanwhile).
    Adopted(Adoption),
}

/// What a claimed stream's checkpoint record says, for [`Event::Adopted`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Adoption {
    /// The size and mtime of the record's completion, if it is complete.
    pub completed: Option<(u64, i128)>,
    /// That completion has no assembled object yet.
    pub assembly_missing: bool,
    /// Leading full chunks the record holds.
    pub full_chunks_done: u64,
}

/// A job the stream wants a worker to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    /// Upload full chunk `index`.
    Upload { index: u64 },
    /// Upload the tail, verify every chunk against the file, write metadata,
    /// and mark the stream complete. `size` is the size it expects.
    Finalize { size: u64 },
    /// Assemble the complete stream into one object server-side.
    Assemble,
    /// Verify the complete stream in S3, then delete or move its file
    /// (`ON_COMPLETE`).
    Dispose,
}

/// What the coordinator must do as a consequence of an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Record the stream as incomplete (metadata + Redis) and drop it.
    Close(CloseReason),
    /// The file now holds different content: start a new stream for it. The
    /// old stream is kept as it is (complete) or closed by a `Close` before.
    Restart,
    /// The stream is complete and its file is gone: drop it from the table.
    Forget,
    /// A complete stream changed again and is active once more.
    Reopened,
}

/// Timing and sizing that every stream shares.
#[derive(Debug, Clone, Copy)]
pub struct Rules {
    pub stream_timeout: Duration,
    /// How long a file may be missing before its stream is closed or dropped,
    /// so that a rename away and back, or a flaky listing, is harmless.
    pub vanish_grace: Duration,
    /// Back-off after failed jobs (the ceiling is used, without jitter).
    pub retry: RetryPolicy,
    /// Whether complete streams are assembled into one object.
    pub assemble: bool,
    /// Whether a complete stream's file is deleted or moved (`ON_COMPLETE`),
    /// and how long after its completion (`ON_COMPLETE_DELAY`).
    pub dispose: bool,
    pub dispose_delay: Duration,
}

/// The state of one stream. Only `step` changes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamState {
    phase: Phase,
    chunk_size: u64,
    /// Last observed size and mtime.
    size: u64,
    mtime_ns: i128,
    /// Local monotonic time of the last observed change.
    last_change: Instant,
    missing_since: Option<Instant>,
    /// Leading full chunks that are uploaded and checkpointed.
    full_chunks_done: u64,
    in_flight: bool,
    /// Failed jobs in a row, and when the next try is allowed.
    failures: u32,
    retry_at: Option<Instant>,
    /// The size and mtime the last completion covered, if any.
    completed: Option<(u64, i128)>,
    /// The last completion still has to be assembled into one object.
    assembly_pending: bool,
    /// The file still has to be deleted or moved, from `dispose_after` on.
    disposal_pending: bool,
    dispose_after: Option<Instant>,
    /// The last poll could not see the file (an error, or a blind watch
    /// directory).
    unseen: bool,
}

impl StreamState {
    /// A stream seen for the first time (or resumed with `full_chunks_done`
    /// chunks already checkpointed).
    pub fn new(chunk_size: u64, size: u64, mtime_ns: i128, now: Instant) -> Self {
        Self {
            phase: Phase::Active,
            chunk_size,
            size,
            mtime_ns,
            last_change: now,
            missing_since: None,
            full_chunks_done: 0,
            in_flight: false,
            failures: 0,
            retry_at: None,
            completed: None,
            assembly_pending: false,
            disposal_pending: false,
            dispose_after: None,
            unseen: false,
        }
    }

    /// A stream that completed earlier, at this size and mtime, with the
    /// duties that follow a completion as `rules` ask; with
    /// `assembly_missing`, that completion has no assembled object yet.
    pub fn completed(
        chunk_size: u64,
        size: u64,
        mtime_ns: i128,
        assembly_missing: bool,
        now: Instant,
        rules: &Rules,
    ) -> Self {
        let mut state = Self {
            full_chunks_done: size / chunk_size,
            completed: Some((size, mtime_ns)),
            ..Self::new(chunk_size, size, mtime_ns, now)
        };
        state.settle(now, rules);
        state.assembly_pending &= assembly_missing;
        state
    }

    /// Enters `Complete`, with the duties that follow a completion.
    fn settle(&mut self, now: Instant, rules: &Rules) {
        self.phase = Phase::Complete;
        self.assembly_pending = rules.assemble;
        self.disposal_pending = rules.dispose;
        self.dispose_after = Some(now + rules.dispose_delay);
    }

    /// Whether the stream still needs its lease holder after completion:
    /// for the assembly, or to delete or move its file.
    pub fn has_duties(&self) -> bool {
        self.phase == Phase::Complete && (self.assembly_pending || self.disposal_pending)
    }

    /// A stream resumed from its checkpoint before the file is seen again:
    /// `checkpointed_bytes` tell how far the file had got (a shorter file on
    /// the first poll is then seen as truncated), and `full_chunks_done`
    /// leading chunks need no upload.
    pub fn resumed(
        chunk_size: u64,
        checkpointed_bytes: u64,
        full_chunks_done: u64,
        now: Instant,
    ) -> Self {
        Self {
            size: checkpointed_bytes,
            full_chunks_done,
            ..Self::new(chunk_size, 0, 0, now)
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    /// The last observed size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The last observed mtime.
    pub fn mtime_ns(&self) -> i128 {
        self.mtime_ns
    }

    /// When the file last changed, on the local monotonic clock.
    pub fn last_change(&self) -> Instant {
        self.last_change
    }

    /// Since when the file has been missing, if it is.
    pub fn missing_since(&self) -> Option<Instant> {
        self.missing_since
    }

    /// Leading full chunks that are uploaded and checkpointed.
    pub fn full_chunks_done(&self) -> u64 {
        self.full_chunks_done
    }

    pub fn in_flight(&self) -> bool {
        self.in_flight
    }

    /// Failed jobs in a row.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// When the next try is allowed after a failure.
    pub fn retry_at(&self) -> Option<Instant> {
        self.retry_at
    }

    /// The size and mtime the last completion covered, if any.
    pub fn last_completion(&self) -> Option<(u64, i128)> {
        self.completed
    }

    /// The last completion still has to be assembled into one object.
    pub fn assembly_pending(&self) -> bool {
        self.assembly_pending
    }

    /// The last poll could not see the file.
    pub fn unseen(&self) -> bool {
        self.unseen
    }

    /// Number of full chunks in the last observed size.
    fn full_chunks_available(&self) -> u64 {
        self.size / self.chunk_size
    }

    /// The job this stream needs now, if any. Pure: it only reads.
    pub fn wanted(&self, now: Instant, rules: &Rules) -> Option<Work> {
        if self.in_flight
            || self.missing_since.is_some()
            || self.retry_at.is_some_and(|at| now < at)
        {
            return None;
        }
        if self.phase == Phase::Complete && self.assembly_pending && rules.assemble {
            return Some(Work::Assemble);
        }
        if self.phase == Phase::Complete
            && self.disposal_pending
            && rules.dispose
            && self.dispose_after.is_none_or(|at| now >= at)
        {
            return Some(Work::Dispose);
        }
        if self.phase != Phase::Active {
            return None;
        }
        if self.full_chunks_done < self.full_chunks_available() {
            return Some(Work::Upload {
                index: self.full_chunks_done,
            });
        }
        let quiet = now.saturating_duration_since(self.last_change);
        if self.size > 0 && quiet >= rules.stream_timeout {
            return Some(Work::Finalize { size: self.size });
        }
        None
    }

    fn back_off(&mut self, now: Instant, rules: &Rules) {
        self.retry_at = Some(now + rules.retry.ceiling(self.failures));
        self.failures = self.failures.saturating_add(1);
    }

    fn succeeded(&mut self) {
        self.failures = 0;
        self.retry_at = None;
    }

    fn reopen(&mut self, now: Instant) -> Vec<Action> {
        self.phase = Phase::Active;
        // The next completion is assembled (and its file disposed of)
        // instead; a backoff of those duties does not hold the new bytes up.
        self.assembly_pending = false;
        self.disposal_pending = false;
        self.succeeded();
        self.last_change = now;
        // A partial tail chunk from the last completion is no longer a full
        // chunk's worth: it is uploaded again once it is full.
        self.full_chunks_done = self.full_chunks_done.min(self.full_chunks_available());
        vec![Action::Reopened]
    }

    /// Advances the stream. Returns what the coordinator must do.
    pub fn step(&mut self, event: Event, now: Instant, rules: &Rules) -> Vec<Action> {
        match (self.phase, event) {
            (Phase::Closed(_), _) => Vec::new(),

            (_, Event::Adopted(adoption)) => {
                self.phase = Phase::Active;
                self.assembly_pending = false;
                self.disposal_pending = false;
                if let Some(completed) = adoption.completed {
                    self.completed = Some(completed);
                    // Changed since that completion: a new revision.
                    if (self.size, self.mtime_ns) == completed {
                        self.settle(now, rules);
                        self.assembly_pending &= adoption.assembly_missing;
                    }
                }
                self.full_chunks_done = adoption.full_chunks_done.min(self.full_chunks_available());
                Vec::new()
            }

            (_, Event::Unseen { gap }) => {
                self.unseen = true;
                self.missing_since = None;
                self.last_change = (self.last_change + gap).min(now);
                Vec::new()
            }

            (_, Event::Dispatched(work)) => {
                self.in_flight = true;
                if let Work::Finalize { .. } = work {
                    self.phase = Phase::Finalizing;
                }
                Vec::new()
            }

            (Phase::Active | Phase::Finalizing, Event::Observed { size, mtime_ns }) => {
                self.unseen = false;
                self.missing_since = None;
                if size < self.size {
                    if self.in_flight {
                        // Decide once the job is back; the next poll repeats this.
                        return Vec::new();
                    }
                    self.phase = Phase::Closed(CloseReason::Truncated);
                    return vec![Action::Close(CloseReason::Truncated), Action::Restart];
                }
                if size != self.size || mtime_ns != self.mtime_ns {
                    self.size = size;
                    self.mtime_ns = mtime_ns;
                    self.last_change = now;
                }
                Vec::new()
            }

            (Phase::Complete, Event::Observed { size, mtime_ns }) => {
                self.unseen = false;
                self.missing_since = None;
                let (done_size, done_mtime) = self.completed.unwrap_or((self.size, self.mtime_ns));
                if size < done_size {
                    self.phase = Phase::Closed(CloseReason::Truncated);
                    return vec![Action::Forget, Action::Restart];
                }
                if size == done_size && mtime_ns == done_mtime {
                    return Vec::new();
                }
                self.size = size;
                self.mtime_ns = mtime_ns;
                self.reopen(now)
            }

            (phase, Event::Missing) => {
                self.unseen = false;
                let since = *self.missing_since.get_or_insert(now);
                if self.in_flight || now.saturating_duration_since(since) < rules.vanish_grace {
                    return Vec::new();
                }
                if phase == Phase::Complete {
                    self.phase = Phase::Closed(CloseReason::Vanished);
                    vec![Action::Forget]
                } else {
                    self.phase = Phase::Closed(CloseReason::Vanished);
                    vec![Action::Close(CloseReason::Vanished)]
                }
            }

            (phase, Event::Replaced) => {
                if self.in_flight {
                    return Vec::new();
                }
                self.phase = Phase::Closed(CloseReason::Replaced);
                if phase == Phase::Complete {
                    vec![Action::Forget]
                } else {
                    vec![Action::Close(CloseReason::Replaced)]
                }
            }

            (_, Event::ChunkUploaded { index }) => {
                self.in_flight = false;
                self.succeeded();
                if index == self.full_chunks_done {
                    self.full_chunks_done += 1;
                }
                Vec::new()
            }

            (Phase::Finalizing, Event::Finalized { size, mtime_ns }) => {
                self.in_flight = false;
                self.succeeded();
                self.completed = Some((size, mtime_ns));
                self.full_chunks_done = size / self.chunk_size;
                if self.size == size && self.mtime_ns == mtime_ns {
                    self.settle(now, rules);
                    Vec::new()
                } else if self.size < size {
                    // Shrank while finalizing: the next poll restarts it.
                    self.phase = Phase::Complete;
                    self.size = size;
                    self.mtime_ns = mtime_ns;
                    Vec::new()
                } else {
                    // It changed after the finalize job's last look.
                    self.reopen(now)
                }
            }

            (Phase::Finalizing, Event::FinalizeInterrupted) => {
                self.in_flight = false;
                self.phase = Phase::Active;
                self.last_change = now;
                Vec::new()
            }

            (_, Event::JobFailed) => {
                self.in_flight = false;
                if self.phase == Phase::Finalizing {
                    self.phase = Phase::Active;
                }
                self.back_off(now, rules);
                Vec::new()
            }

            (_, Event::Assembled) => {
                self.in_flight = false;
                self.succeeded();
                if self.phase == Phase::Complete {
                    self.assembly_pending = false;
                }
                Vec::new()
            }

            (Phase::Complete, Event::Disposed) => {
                self.in_flight = false;
                self.succeeded();
                self.disposal_pending = false;
                self.phase = Phase::Closed(CloseReason::Vanished);
                vec![Action::Forget]
            }

            (_, Event::Disposed) => {
                self.in_flight = false;
                Vec::new()
            }

            (_, Event::DisposalRefused) => {
                self.in_flight = false;
                self.back_off(now, rules);
                Vec::new()
            }

            (_, Event::JobCancelled) => {
                self.in_flight = false;
                if self.phase == Phase::Finalizing {
                    self.phase = Phase::Active;
                }
                Vec::new()
            }

            // Results that do not fit the phase (a stale finalize result) change nothing.
            (
                Phase::Active | Phase::Complete,
                Event::Finalized { .. } | Event::FinalizeInterrupted,
            ) => {
                self.in_flight = false;
                Vec::new()
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;
