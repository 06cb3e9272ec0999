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
    /// A job failed for a reason the worker could not retry away (for example
    /// a read error); the stream backs off and tries again.
    JobFailed,
    /// A job was abandoned because the process is shutting down.
    JobCancelled,
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
}

/// The state of one stream. Only `step` changes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamState {
    pub phase: Phase,
    pub chunk_size: u64,
    /// Last observed size and mtime.
    pub size: u64,
    pub mtime_ns: i128,
    /// Local monotonic time of the last observed change.
    pub last_change: Instant,
    pub missing_since: Option<Instant>,
    /// Leading full chunks that are uploaded and checkpointed.
    pub full_chunks_done: u64,
    pub in_flight: bool,
    /// Failed jobs in a row, and when the next try is allowed.
    pub failures: u32,
    pub retry_at: Option<Instant>,
    /// The size and mtime the last completion covered, if any.
    pub completed: Option<(u64, i128)>,
    /// The last completion still has to be assembled into one object.
    pub assembly_pending: bool,
    /// The last poll could not see the file (an error, or a blind watch
    /// directory).
    pub unseen: bool,
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
            unseen: false,
        }
    }

    /// A stream that completed earlier, at this size and mtime.
    pub fn completed(chunk_size: u64, size: u64, mtime_ns: i128, now: Instant) -> Self {
        Self {
            phase: Phase::Complete,
            full_chunks_done: size / chunk_size,
            completed: Some((size, mtime_ns)),
            ..Self::new(chunk_size, size, mtime_ns, now)
        }
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
        // The next completion is assembled instead.
        self.assembly_pending = false;
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
                    self.phase = Phase::Complete;
                    self.assembly_pending = rules.assemble;
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
mod tests {
    use super::*;

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

    /// A fake clock: an origin and seconds elapsed.
    struct Clock(Instant);
    impl Clock {
        fn at(&self, seconds: u64) -> Instant {
            self.0 + Duration::from_secs(seconds)
        }
    }

    fn observed(size: u64) -> Event {
        Event::Observed {
            size,
            mtime_ns: size as i128,
        }
    }

    /// Dispatches a finalize at `now` and completes it a second later, for a
    /// file of `size` bytes (whose mtime the tests set to its size).
    fn finalize(s: &mut StreamState, size: u64, now: Instant, rules: &Rules) {
        s.step(Event::Dispatched(Work::Finalize { size }), now, rules);
        s.step(
            Event::Finalized {
                size,
                mtime_ns: size as i128,
            },
            now + Duration::from_secs(1),
            rules,
        );
    }

    /// Dispatches whatever the stream wants and returns it.
    fn dispatch(state: &mut StreamState, now: Instant) -> Option<Work> {
        let work = state.wanted(now, &rules())?;
        state.step(Event::Dispatched(work), now, &rules());
        Some(work)
    }

    #[test]
    fn a_growing_file_uploads_full_chunks_in_order_then_finalizes_after_quiet() {
        let clock = Clock(Instant::now());
        let rules = rules();
        let mut s = StreamState::new(CHUNK, 5, 5, clock.at(0));
        assert_eq!(s.wanted(clock.at(0), &rules), None, "no full chunk yet");

        s.step(observed(25), clock.at(1), &rules);
        assert_eq!(
            dispatch(&mut s, clock.at(1)),
            Some(Work::Upload { index: 0 })
        );
        assert_eq!(
            s.wanted(clock.at(1), &rules),
            None,
            "one job in flight at most"
        );
        s.step(Event::ChunkUploaded { index: 0 }, clock.at(2), &rules);
        assert_eq!(
            dispatch(&mut s, clock.at(2)),
            Some(Work::Upload { index: 1 })
        );
        s.step(Event::ChunkUploaded { index: 1 }, clock.at(3), &rules);
        assert_eq!(s.wanted(clock.at(3), &rules), None, "the tail waits");

        assert_eq!(
            s.wanted(clock.at(30), &rules),
            None,
            "29 s of quiet is not enough"
        );
        assert_eq!(
            dispatch(&mut s, clock.at(31)),
            Some(Work::Finalize { size: 25 })
        );
        assert_eq!(s.phase, Phase::Finalizing);
        let actions = s.step(
            Event::Finalized {
                size: 25,
                mtime_ns: 25,
            },
            clock.at(32),
            &rules,
        );
        assert!(actions.is_empty());
        assert_eq!(s.phase, Phase::Complete);
        assert_eq!(s.wanted(clock.at(100), &rules), None);
    }

    #[test]
    fn any_change_restarts_the_quiet_period() {
        let clock = Clock(Instant::now());
        let rules = rules();
        let mut s = StreamState::new(CHUNK, 5, 5, clock.at(0));
        s.step(
            Event::Observed {
                size: 5,
                mtime_ns: 99,
            },
            clock.at(20),
            &rules,
        );
        assert_eq!(s.wanted(clock.at(45), &rules), None, "mtime change counts");
        assert_eq!(
            s.wanted(clock.at(50), &rules),
            Some(Work::Finalize { size: 5 })
        );
    }

    #[test]
    fn an_mtime_in_the_future_does_not_matter() {
        let clock = Clock(Instant::now());
        let rules = rules();
        let far_future = i128::from(u64::MAX);
        let mut s = StreamState::new(CHUNK, 5, far_future, clock.at(0));
        s.step(
            Event::Observed {
                size: 5,
                mtime_ns: far_future,
            },
            clock.at(10),
            &rules,
        );
        assert_eq!(
            s.wanted(clock.at(30), &rules),
            Some(Work::Finalize { size: 5 })
        );
    }

    #[test]
    fn an_empty_file_is_never_finalized_but_is_picked_up_when_it_gets_bytes() {
        let clock = Clock(Instant::now());
        let rules = rules();
        let mut s = StreamState::new(CHUNK, 0, 0, clock.at(0));
        assert_eq!(s.wanted(clock.at(1000), &rules), None);
        s.step(observed(3), clock.at(1000), &rules);
        assert_eq!(
            s.wanted(clock.at(1030), &rules),
            Some(Work::Finalize { size: 3 })
        );
    }

    #[test]
    fn shrinking_closes_the_stream_as_truncated_and_restarts() {
        let clock = Clock(Instant::now());
        let rules = rules();
        let mut s = StreamState::new(CHUNK, 25, 25, clock.at(0));
        assert_eq!(
            dispatch(&mut s, clock.at(0)),
            Some(Work::Upload { index: 0 })
        );
        assert!(
            s.step(observed(3), clock.at(1), &rules).is_empty(),
            "decided only once the job is back"
        );
        s.step(Event::ChunkUploaded { index: 0 }, clock.at(2), &rules);
        let actions = s.step(observed(3), clock.at(3), &rules);
        assert_eq!(
            actions,
            vec![Action::Close(CloseReason::Truncated), Action::Restart]
        );
        assert_eq!(s.phase, Phase::Closed(CloseReason::Truncated));
    }

    #[test]
    fn a_vanished_file_is_closed_after_the_grace_period_unless_it_returns() {
        let clock = Clock(Instant::now());
        let rules = rules();
        let mut s = StreamState::new(CHUNK, 25, 25, clock.at(0));
        assert!(s.step(Event::Missing, clock.at(1), &rules).is_empty());
        assert_eq!(
            s.wanted(clock.at(2), &rules),
            None,
            "nothing dispatched while missing"
        );
        s.step(observed(25), clock.at(10), &rules);
        assert_eq!(
            s.missing_since, None,
            "renamed back within the grace period"
        );
        assert!(s.step(Event::Missing, clock.at(11), &rules).is_empty());
        let actions = s.step(Event::Missing, clock.at(41), &rules);
        assert_eq!(actions, vec![Action::Close(CloseReason::Vanished)]);
    }

    #[test]
    fn unseen_polls_stop_the_inactivity_and_vanish_timers() {
        let clock = Clock(Instant::now());
        let rules = rules();
        let mut s = StreamState::new(CHUNK, 5, 5, clock.at(0));
        // 100 s blind, one poll every 10 s: still not quiet for 30 s.
        for t in (10..=100).step_by(10) {
            s.step(
                Event::Unseen {
                    gap: Duration::from_secs(10),
                },
                clock.at(t),
                &rules,
            );
            assert_eq!(s.wanted(clock.at(t), &rules), None, "blind at {t} s");
        }
        assert_eq!(s.wanted(clock.at(129), &rules), None);
        assert_eq!(
            s.wanted(clock.at(130), &rules),
            Some(Work::Finalize { size: 5 }),
            "30 s of quiet actually seen"
        );
        // An absence interrupted by an unseen poll starts over.
        s.step(Event::Missing, clock.at(101), &rules);
        s.step(
            Event::Unseen {
                gap: Duration::from_secs(1),
            },
            clock.at(102),
            &rules,
        );
        assert!(s.step(Event::Missing, clock.at(103), &rules).is_empty());
        assert!(s.step(Event::Missing, clock.at(132), &rules).is_empty());
        assert_eq!(
            s.step(Event::Missing, clock.at(133), &rules),
            vec![Action::Close(CloseReason::Vanished)]
        );
    }

    #[test]
    fn a_complete_file_that_vanishes_is_forgotten() {
        let clock = Clock(Instant::now());
        let rules = rules();
        let mut s = StreamState::completed(CHUNK, 25, 25, clock.at(0));
        s.step(Event::Missing, clock.at(1), &rules);
        assert_eq!(
            s.step(Event::Missing, clock.at(31), &rules),
            vec![Action::Forget]
        );
    }

    #[test]
    fn replacement_closes_an_active_stream_and_forgets_a_complete_one() {
        let clock = Clock(Instant::now());
        let rules = rules();
        let mut active = StreamState::new(CHUNK, 25, 25, clock.at(0));
        assert_eq!(
            active.step(Event::Replaced, clock.at(1), &rules),
            vec![Action::Close(CloseReason::Replaced)]
        );
        let mut done = StreamState::completed(CHUNK, 25, 25, clock.at(0));
        assert_eq!(
            done.step(Event::Replaced, clock.at(1), &rules),
            vec![Action::Forget]
        );
    }

    #[test]
    fn a_complete_file_that_grows_is_reopened_and_reuploads_its_old_tail() {
        let clock = Clock(Instant::now());
        let rules = rules();
        let mut s = StreamState::completed(CHUNK, 25, 25, clock.at(0));
        assert!(s.step(observed(25), clock.at(1), &rules).is_empty());
        assert_eq!(
            s.step(observed(42), clock.at(2), &rules),
            vec![Action::Reopened]
        );
        assert_eq!(s.phase, Phase::Active);
        assert_eq!(
            dispatch(&mut s, clock.at(2)),
            Some(Work::Upload { index: 2 })
        );
        s.step(Event::ChunkUploaded { index: 2 }, clock.at(3), &rules);
        assert_eq!(
            s.wanted(clock.at(3), &rules),
            Some(Work::Upload { index: 3 })
        );
    }

    #[test]
    fn a_complete_file_that_shrinks_starts_a_new_stream() {
        let clock = Clock(Instant::now());
        let rules = rules();
        let mut s = StreamState::completed(CHUNK, 25, 25, clock.at(0));
        assert_eq!(
            s.step(observed(7), clock.at(1), &rules),
            vec![Action::Forget, Action::Restart]
        );
    }

    #[test]
    fn growth_during_finalize_reopens_when_the_result_arrives() {
        let clock = Clock(Instant::now());
        let rules = rules();
        let mut s = StreamState::new(CHUNK, 5, 5, clock.at(0));
        assert_eq!(
            dispatch(&mut s, clock.at(30)),
            Some(Work::Finalize { size: 5 })
        );
        s.step(observed(8), clock.at(31), &rules);
        let actions = s.step(
            Event::Finalized {
                size: 5,
                mtime_ns: 5,
            },
            clock.at(32),
            &rules,
        );
        assert_eq!(actions, vec![Action::Reopened]);
        assert_eq!(s.completed, Some((5, 5)));
        assert_eq!(s.wanted(clock.at(40), &rules), None);
        assert_eq!(
            s.wanted(clock.at(62), &rules),
            Some(Work::Finalize { size: 8 })
        );
    }

    #[test]
    fn an_interrupted_finalize_waits_for_quiet_again() {
        let clock = Clock(Instant::now());
        let rules = rules();
        let mut s = StreamState::new(CHUNK, 5, 5, clock.at(0));
        dispatch(&mut s, clock.at(30));
        s.step(Event::FinalizeInterrupted, clock.at(31), &rules);
        assert_eq!(s.phase, Phase::Active);
        assert_eq!(s.wanted(clock.at(32), &rules), None);
        assert_eq!(
            s.wanted(clock.at(61), &rules),
            Some(Work::Finalize { size: 5 })
        );
    }

    #[test]
    fn failures_back_off_exponentially_and_success_resets() {
        let clock = Clock(Instant::now());
        let rules = rules();
        let mut s = StreamState::new(CHUNK, 25, 25, clock.at(0));
        dispatch(&mut s, clock.at(0));
        s.step(Event::JobFailed, clock.at(0), &rules);
        assert_eq!(s.wanted(clock.at(0), &rules), None);
        dispatch(&mut s, clock.at(1)).expect("retried after 1 s");
        s.step(Event::JobFailed, clock.at(1), &rules);
        assert_eq!(s.wanted(clock.at(2), &rules), None, "now 2 s");
        dispatch(&mut s, clock.at(3)).expect("retried after 2 s");
        s.step(Event::ChunkUploaded { index: 0 }, clock.at(3), &rules);
        assert_eq!(s.failures, 0);
        assert_eq!(
            s.wanted(clock.at(3), &rules),
            Some(Work::Upload { index: 1 })
        );
    }

    #[test]
    fn a_cancelled_finalize_is_simply_redone() {
        let clock = Clock(Instant::now());
        let rules = rules();
        let mut s = StreamState::new(CHUNK, 5, 5, clock.at(0));
        dispatch(&mut s, clock.at(30));
        s.step(Event::JobCancelled, clock.at(31), &rules);
        assert_eq!(
            s.wanted(clock.at(31), &rules),
            Some(Work::Finalize { size: 5 })
        );
    }

    #[test]
    fn with_assembly_on_a_completed_stream_is_assembled_once() {
        let clock = Clock(Instant::now());
        let rules = Rules {
            assemble: true,
            ..rules()
        };
        let mut s = StreamState::new(CHUNK, 5, 5, clock.at(0));
        finalize(&mut s, 5, clock.at(30), &rules);
        assert_eq!(s.wanted(clock.at(31), &rules), Some(Work::Assemble));
        s.step(Event::Dispatched(Work::Assemble), clock.at(31), &rules);
        s.step(Event::JobFailed, clock.at(32), &rules);
        assert_eq!(s.wanted(clock.at(32), &rules), None, "backs off");
        assert_eq!(
            s.wanted(clock.at(34), &rules),
            Some(Work::Assemble),
            "retried"
        );
        s.step(Event::Dispatched(Work::Assemble), clock.at(34), &rules);
        s.step(Event::Assembled, clock.at(35), &rules);
        assert_eq!(s.phase, Phase::Complete);
        assert_eq!(s.wanted(clock.at(100), &rules), None);
        // Growing again reopens; the next completion is assembled again.
        assert_eq!(
            s.step(observed(8), clock.at(101), &rules),
            vec![Action::Reopened]
        );
        assert!(!s.assembly_pending);
    }

    #[test]
    fn without_assembly_nothing_is_wanted_after_completion() {
        let clock = Clock(Instant::now());
        let rules = rules();
        let mut s = StreamState::new(CHUNK, 5, 5, clock.at(0));
        finalize(&mut s, 5, clock.at(30), &rules);
        assert_eq!(s.wanted(clock.at(31), &rules), None);
    }

    /// A tiny deterministic generator so the property test needs no crate.
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self, bound: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 33) % bound
        }
    }

    /// Random sequences of grow / pause / shrink / replace / vanish / job
    /// results, checked against invariants that must always hold.
    #[test]
    fn random_sequences_keep_the_invariants() {
        let rules = rules();
        for seed in 0..300 {
            let mut rng = Lcg(seed);
            let origin = Instant::now();
            let mut t = 0u64;
            let mut size = rng.next(40);
            let mut s = StreamState::new(CHUNK, size, size as i128, origin);
            let mut in_flight: Option<Work> = None;
            for _ in 0..200 {
                t += rng.next(20);
                let now = origin + Duration::from_secs(t);
                let event = match rng.next(9) {
                    0 | 1 => {
                        size += rng.next(30);
                        observed(size)
                    }
                    2 => observed(size),
                    3 => {
                        size = rng.next(size + 1);
                        observed(size)
                    }
                    4 => Event::Missing,
                    5 if rng.next(2) == 0 => Event::Replaced,
                    5 => Event::Unseen {
                        gap: Duration::from_secs(rng.next(20)),
                    },
                    _ => match in_flight.take() {
                        Some(Work::Upload { index }) => Event::ChunkUploaded { index },
                        Some(Work::Finalize { size }) => match rng.next(3) {
                            0 => Event::JobFailed,
                            1 => Event::FinalizeInterrupted,
                            _ => Event::Finalized {
                                size,
                                mtime_ns: size as i128,
                            },
                        },
                        Some(Work::Assemble) => Event::Assembled,
                        None => observed(size),
                    },
                };
                let actions = s.step(event, now, &rules);
                if let Phase::Closed(_) = s.phase {
                    assert!(!actions.is_empty(), "seed {seed}: closing always says so");
                    break;
                }
                assert!(
                    s.full_chunks_done * CHUNK <= s.size.max(s.completed.map_or(0, |c| c.0)),
                    "seed {seed}: never more chunks than bytes"
                );
                if let Some(work) = s.wanted(now, &rules) {
                    assert!(in_flight.is_none(), "seed {seed}: one job at a time");
                    if let Work::Upload { index } = work {
                        assert_eq!(index, s.full_chunks_done, "seed {seed}: in order");
                        assert!(
                            (index + 1) * CHUNK <= s.size,
                            "seed {seed}: full chunks only"
                        );
                    }
                    s.step(Event::Dispatched(work), now, &rules);
                    in_flight = Some(work);
                }
                assert_eq!(s.in_flight, in_flight.is_some(), "seed {seed}");
            }
        }
    }
}
