//! In-memory fakes of the ports and a fake clock, for unit tests.
//!
//! The coordinator's scenarios and the workers' tests run against these in
//! milliseconds, with no server and no sleep: time moves only when a test
//! calls [`FakeClock::advance`], and the checkpoint store can be made to fail
//! ([`FakeCheckpoints::set_down`]), to lose its data ([`FakeCheckpoints::wipe`]),
//! to hold a corrupt record ([`FakeCheckpoints::corrupt`])
//! or to hand a lease to another replica ([`FakeCheckpoints::steal`]).
//! Compiled for tests only.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, UNIX_EPOCH};

use crate::config::{Cli, Config};
use crate::stream::Now;

mod bucket;
mod checkpoints;
mod recorder;

pub use bucket::{MemoryStore, MemoryUpload};
pub use checkpoints::FakeCheckpoints;
pub use recorder::MemoryCheckpoints;

/// A clock that moves only when told to; clones share the time. Its wall
/// clock starts at a fixed date and moves with it.
#[derive(Debug, Clone)]
pub struct FakeClock {
    start: Instant,
    now: Arc<Mutex<Instant>>,
}

impl Default for FakeClock {
    fn default() -> Self {
        let start = Instant::now();
        Self {
            start,
            now: Arc::new(Mutex::new(start)),
        }
    }
}

impl FakeClock {
    pub fn now(&self) -> Instant {
        *self.now.lock().expect("clock lock")
    }

    /// Both clocks, as the daemon's loop reads them for a turn.
    pub fn reading(&self) -> Now {
        let instant = self.now();
        Now {
            instant,
            // 2026-11-30T00:00:00Z, plus the time the test let pass.
            wall: UNIX_EPOCH + Duration::from_secs(1_795_996_800) + (instant - self.start),
        }
    }

    pub fn advance(&self, by: Duration) {
        *self.now.lock().expect("clock lock") += by;
    }
}

/// A validated configuration as if only `flags` were given, watching
/// `watch_dir`.
pub fn config(watch_dir: &Path, flags: &[&str]) -> Config {
    use clap::Parser;
    let watch = format!("--watch-dir={}", watch_dir.display());
    let argv = ["chunkstream", watch.as_str()]
        .into_iter()
        .chain(flags.iter().copied());
    let cli = Cli::try_parse_from(argv).expect("test flags parse");
    Config::from_settings(&cli.settings).expect("test flags are valid")
}
