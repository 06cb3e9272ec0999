//! The lifecycle step by step, on a fake clock.

use super::*;

const CHUNK: u64 = 10;

/// 30 s timeout and grace, 1 to 8 s backoff, no assembly (the table's
/// tests share them).
pub(crate) fn rules() -> Rules {
    Rules {
        stream_timeout: Duration::from_secs(30),
        vanish_grace: Duration::from_secs(30),
        retry: RetryPolicy {
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(8),
        },
        assemble: false,
        dispose: false,
        dispose_delay: Duration::ZERO,
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
    let mut s = StreamState::completed(CHUNK, 25, 25, false, clock.at(0), &rules);
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
    let mut done = StreamState::completed(CHUNK, 25, 25, false, clock.at(0), &rules);
    assert_eq!(
        done.step(Event::Replaced, clock.at(1), &rules),
        vec![Action::Forget]
    );
}

#[test]
fn a_complete_file_that_grows_is_reopened_and_reuploads_its_old_tail() {
    let clock = Clock(Instant::now());
    let rules = rules();
    let mut s = StreamState::completed(CHUNK, 25, 25, false, clock.at(0), &rules);
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
    let mut s = StreamState::completed(CHUNK, 25, 25, false, clock.at(0), &rules);
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
    for seed in 0..300 {
        // Half the runs delete complete files (ON_COMPLETE=delete).
        let rules = Rules {
            dispose: seed % 2 == 0,
            ..rules()
        };
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
                    Some(Work::Dispose) => match rng.next(3) {
                        0 => Event::JobFailed,
                        1 => Event::DisposalRefused,
                        _ => Event::Disposed,
                    },
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

#[test]
fn adoption_takes_over_the_record_and_keeps_the_files_own_observations() {
    let clock = Clock(Instant::now());
    let rules = Rules {
        assemble: true,
        ..rules()
    };
    let adoption = |completed, full_chunks_done| {
        Event::Adopted(Adoption {
            completed,
            assembly_missing: true,
            full_chunks_done,
        })
    };

    // The record's completion covers the file as seen: complete, and its
    // assembly is still wanted.
    let mut same = StreamState::new(CHUNK, 25, 25, clock.at(0));
    same.step(adoption(Some((25, 25)), 2), clock.at(1), &rules);
    assert_eq!(same.phase(), Phase::Complete);
    assert!(same.assembly_pending());
    assert_eq!(same.wanted(clock.at(1), &rules), Some(Work::Assemble));

    // The file grew past that completion: active again, from the record's
    // chunks, and never past what the file holds.
    let mut grown = StreamState::new(CHUNK, 45, 45, clock.at(0));
    grown.step(adoption(Some((25, 25)), 2), clock.at(1), &rules);
    assert_eq!(grown.phase(), Phase::Active);
    assert_eq!(grown.last_completion(), Some((25, 25)));
    assert_eq!(
        grown.wanted(clock.at(1), &rules),
        Some(Work::Upload { index: 2 })
    );

    let mut shorter = StreamState::new(CHUNK, 15, 15, clock.at(0));
    shorter.step(adoption(None, 3), clock.at(1), &rules);
    assert_eq!(shorter.phase(), Phase::Active);
    assert_eq!(shorter.full_chunks_done(), 1);
    assert!(!shorter.assembly_pending());
}
