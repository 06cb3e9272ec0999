//! Streams: the pure lifecycle (`state`), one stream as tracked (`tracked`),
//! and the table that feeds them (`table`).

use std::time::{Instant, SystemTime};

pub mod state;
pub mod table;
pub mod tracked;

/// When something happened to a stream, as the caller read its clocks:
/// nothing under `stream/` reads a clock itself. The monotonic instant runs
/// the timers; the wall time is what records and metadata show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    pub instant: Instant,
    pub wall: SystemTime,
}
