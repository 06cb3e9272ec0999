//! What happens after upload: `ON_COMPLETE`, `COMPLETED_DIR` and
//! `ON_COMPLETE_DELAY`, validated so that a moved file can never land where
//! it would be uploaded again.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{Settings, non_empty};
use crate::error::ConfigError;

/// What happens to a local file once its stream is complete and verified in
/// S3 (`ON_COMPLETE`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OnComplete {
    /// Leave it where it is.
    Keep,
    /// Delete it.
    Delete,
    /// Move it under this directory (`COMPLETED_DIR`), at its path relative
    /// to `WATCH_DIR`.
    Move(PathBuf),
}

impl OnComplete {
    /// Whether the file leaves the watch directory.
    pub fn disposes(&self) -> bool {
        !matches!(self, OnComplete::Keep)
    }

    /// The name used in logs and metric labels.
    pub fn action(&self) -> &'static str {
        match self {
            OnComplete::Keep => "keep",
            OnComplete::Delete => "delete",
            OnComplete::Move(_) => "move",
        }
    }

    pub(super) fn from_settings(
        settings: &Settings,
        watch_dir: &Path,
    ) -> Result<Self, ConfigError> {
        let completed_dir = settings.completed_dir.trim();
        let action = match settings.on_complete.trim().to_ascii_lowercase().as_str() {
            "keep" => OnComplete::Keep,
            "delete" => OnComplete::Delete,
            "move" => {
                if completed_dir.is_empty() {
                    return Err(ConfigError::bad_value(
                        "COMPLETED_DIR",
                        &settings.completed_dir,
                        "must be set with ON_COMPLETE=move",
                    ));
                }
                let dir = PathBuf::from(completed_dir);
                if !dir.is_dir() {
                    return Err(ConfigError::bad_value(
                        "COMPLETED_DIR",
                        &settings.completed_dir,
                        "not an existing directory",
                    ));
                }
                let inside =
                    |outer: &Path, inner: &Path| match (outer.canonicalize(), inner.canonicalize())
                    {
                        (Ok(outer), Ok(inner)) => inner.starts_with(outer),
                        _ => false,
                    };
                if inside(watch_dir, &dir) || inside(&dir, watch_dir) {
                    return Err(ConfigError::bad_value(
                        "COMPLETED_DIR",
                        &settings.completed_dir,
                        "must be outside WATCH_DIR (and not contain it): moved files would be uploaded again",
                    ));
                }
                OnComplete::Move(dir)
            }
            _ => {
                return Err(ConfigError::bad_value(
                    "ON_COMPLETE",
                    &settings.on_complete,
                    "expected keep, delete or move",
                ));
            }
        };
        if !completed_dir.is_empty() && !matches!(action, OnComplete::Move(_)) {
            return Err(ConfigError::bad_value(
                "COMPLETED_DIR",
                &settings.completed_dir,
                "is only used with ON_COMPLETE=move",
            ));
        }
        Ok(action)
    }
}

/// A duration that may be zero (a delay).
pub(super) fn parse_delay(variable: &'static str, value: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(non_empty(variable, value)?).map_err(|err| {
        ConfigError::bad_value(variable, value, format!("{err} (use e.g. 0s, 10m, 1h)"))
    })
}
