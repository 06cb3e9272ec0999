//! Logging setup: simplelog to stderr, UTC RFC 3339 timestamps, our crate only.
//!
//! Dependencies' own debug output (HTTP client internals) is filtered out so
//! `LOG_LEVEL=debug` shows chunkstream's per-chunk events and nothing noisier.

use log::LevelFilter;
use simplelog::{ConfigBuilder, WriteLogger};

/// Installs the global logger. Safe to call once per process.
pub fn init(level: LevelFilter) {
    let config = ConfigBuilder::new()
        .set_time_format_rfc3339()
        .set_thread_level(LevelFilter::Off)
        .set_target_level(LevelFilter::Off)
        .set_location_level(LevelFilter::Off)
        .add_filter_allow_str("chunkstream")
        .build();
    // Only fails if a logger is already installed, which is then kept.
    let _ = WriteLogger::init(level, config, std::io::stderr());
}
