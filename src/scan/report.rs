//! What the scanner logs about paths it cannot read, and how often.
//!
//! A network file system that flaps (an NFS server that answers every other
//! call, a FUSE client reconnecting) would otherwise fill the log with a
//! warning and a recovery line per poll. So each path is warned about when it
//! starts failing (or fails with another errno), its recovery is logged, and a
//! path that keeps failing and recovering is warned about at most once per
//! [`WARN_INTERVAL`], with the count of failures in between. The decisions are
//! returned as lines, so tests can check them without a logger.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

/// What one walk found wrong, before it is logged.
#[derive(Default)]
pub(super) struct Problems {
    /// Path → (errno name, message), for paths that could not be read.
    pub(super) unreadable: HashMap<String, (String, String)>,
    /// Path → note, for entries skipped on purpose (symbolic links).
    pub(super) notes: HashMap<String, String>,
}

/// A path whose failures are warned about at most once per this long, however
/// often it fails and recovers.
const WARN_INTERVAL: Duration = Duration::from_secs(60);

/// What was logged about one unreadable path.
struct Reported {
    errno: String,
    failing: bool,
    warned_at: Instant,
    /// Whether this failure was warned about (then its end is logged too).
    warned_this_time: bool,
    /// Failures since the last warning that were not warned about.
    suppressed: u64,
}

/// Decides what to log about problems: a warning with the path and errno
/// when a path starts failing (or fails with another errno), a line when it
/// is readable again, and for a path that keeps failing and recovering, at
/// most one warning per [`WARN_INTERVAL`], counting the failures in between.
/// Skipped entries (links) are noted once while they are there.
#[derive(Default)]
pub(super) struct ProblemLog {
    unreadable: HashMap<String, Reported>,
    noted: HashSet<String>,
}

impl ProblemLog {
    pub(super) fn lines(&mut self, problems: Problems, now: Instant) -> Vec<(log::Level, String)> {
        let mut lines = Vec::new();
        let failing_now: HashSet<String> = problems.unreadable.keys().cloned().collect();
        for (path, (errno, message)) in problems.unreadable {
            let Some(known) = self.unreadable.get_mut(&path) else {
                lines.push((log::Level::Warn, message));
                let reported = Reported {
                    errno,
                    failing: true,
                    warned_at: now,
                    warned_this_time: true,
                    suppressed: 0,
                };
                self.unreadable.insert(path, reported);
                continue;
            };
            if known.failing && known.errno == errno {
                continue;
            }
            if now.saturating_duration_since(known.warned_at) >= WARN_INTERVAL {
                let message = match known.suppressed {
                    0 => message,
                    n => format!("{message} (it failed {n} more times since the last warning)"),
                };
                lines.push((log::Level::Warn, message));
                known.warned_at = now;
                known.warned_this_time = true;
                known.suppressed = 0;
            } else {
                known.warned_this_time = false;
                known.suppressed += 1;
            }
            known.failing = true;
            known.errno = errno;
        }
        for (path, known) in &mut self.unreadable {
            if known.failing && !failing_now.contains(path) {
                known.failing = false;
                if known.warned_this_time {
                    lines.push((
                        log::Level::Info,
                        format!(
                            "{path:?} is readable again (it was failing with {})",
                            known.errno
                        ),
                    ));
                }
            }
        }
        // A path that recovered and stayed quiet for a whole interval is
        // forgotten: its next failure is warned about at once.
        self.unreadable.retain(|_, known| {
            known.failing || now.saturating_duration_since(known.warned_at) < WARN_INTERVAL
        });
        let noted_now: HashSet<String> = problems.notes.keys().cloned().collect();
        for (path, message) in problems.notes {
            if !self.noted.contains(&path) {
                lines.push((log::Level::Warn, message));
            }
        }
        self.noted = noted_now;
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::watchfs::errno_name;
    use std::io;

    #[test]
    fn a_flapping_path_is_warned_about_at_most_once_a_minute() {
        let mut log = ProblemLog::default();
        let t0 = Instant::now();
        let eio = |path: &str| {
            let mut problems = Problems::default();
            let err = io::Error::from_raw_os_error(5);
            problems.unreadable.insert(
                path.to_string(),
                (errno_name(&err), format!("cannot stat {path}")),
            );
            problems
        };
        let at = |seconds| t0 + Duration::from_secs(seconds);
        let levels = |lines: Vec<(log::Level, String)>| -> Vec<log::Level> {
            lines.into_iter().map(|(level, _)| level).collect()
        };
        assert_eq!(levels(log.lines(eio("a.mp4"), at(0))), [log::Level::Warn]);
        assert!(log.lines(eio("a.mp4"), at(1)).is_empty(), "still failing");
        assert_eq!(
            levels(log.lines(Problems::default(), at(2))),
            [log::Level::Info],
            "readable again"
        );
        // Fails and recovers twice more within the minute: silent.
        for second in [3, 5] {
            assert!(log.lines(eio("a.mp4"), at(second)).is_empty());
            assert!(log.lines(Problems::default(), at(second + 1)).is_empty());
        }
        let lines = log.lines(eio("a.mp4"), at(61));
        assert_eq!(lines.len(), 1);
        assert!(lines[0].1.contains("failed 2 more times"), "{lines:?}");
        // Another path is independent (and a.mp4 is readable again).
        let lines = log.lines(eio("b.mp4"), at(62));
        assert_eq!(levels(lines.clone()), [log::Level::Warn, log::Level::Info]);
        assert!(lines[0].1.contains("b.mp4") && lines[1].1.contains("a.mp4"));
    }
}
