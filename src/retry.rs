//! The one retry loop.
//!
//! Start-up checks, S3 requests and checkpoint writes all retry the same way:
//! an attempt, then a full-jitter backoff from [`RetryPolicy`], until the
//! attempt settles the matter or the caller's wait says to give up (a stop
//! or shutdown arrived while sleeping). Each caller decides only what an
//! attempt means and how it waits.

use std::ops::ControlFlow;
use std::time::Duration;

use crate::config::RetryPolicy;

/// Runs `attempt` (given its 0-based number) until it breaks with a result.
/// Between attempts `wait` sleeps for the backoff it is given and returns
/// false to give up, which ends the loop with `None`.
pub fn with_backoff<R>(
    policy: RetryPolicy,
    mut wait: impl FnMut(Duration) -> bool,
    mut attempt: impl FnMut(u32) -> ControlFlow<R>,
) -> Option<R> {
    let mut number = 0u32;
    loop {
        if let ControlFlow::Break(result) = attempt(number) {
            return Some(result);
        }
        if !wait(policy.delay(number)) {
            return None;
        }
        number = number.saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: RetryPolicy = RetryPolicy {
        base_delay: Duration::from_millis(100),
        max_delay: Duration::from_millis(400),
    };

    #[test]
    fn a_first_success_never_waits() {
        let mut waits = 0;
        let result = with_backoff(
            POLICY,
            |_| {
                waits += 1;
                true
            },
            |_| ControlFlow::Break("done"),
        );
        assert_eq!((result, waits), (Some("done"), 0));
    }

    #[test]
    fn failures_wait_within_the_growing_ceiling_until_success() {
        let mut delays = Vec::new();
        let result = with_backoff(
            POLICY,
            |delay| {
                delays.push(delay);
                true
            },
            |number| {
                if number == 4 {
                    ControlFlow::Break(number)
                } else {
                    ControlFlow::Continue(())
                }
            },
        );
        assert_eq!(result, Some(4));
        assert_eq!(delays.len(), 4);
        for (number, delay) in delays.into_iter().enumerate() {
            assert!(
                delay <= POLICY.ceiling(number as u32),
                "{number}: {delay:?}"
            );
        }
    }

    #[test]
    fn a_wait_that_gives_up_ends_the_loop() {
        let mut waits = 0;
        let mut attempts = 0;
        let result: Option<()> = with_backoff(
            POLICY,
            |_| {
                waits += 1;
                waits < 3
            },
            |_| {
                attempts += 1;
                ControlFlow::Continue(())
            },
        );
        assert_eq!((result, attempts, waits), (None, 3, 3));
    }
}
