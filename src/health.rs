//! Liveness and readiness state shared between the coordinator, the workers,
//! the probe thread and the HTTP thread.
//!
//! Liveness (`/healthz`) is the coordinator's heartbeat: the loop finished a
//! turn recently. Readiness (`/readyz`) is whether Redis and S3 answered at
//! the last check, from real operations and from a periodic probe, and
//! whether the watch directory can be seen (a network mount that is down or
//! dropped away makes it degraded). Readiness also drives the storage
//! breaker: while S3 is down, no new jobs go out.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::metadata::unix_millis;
use crate::store::Integrity;
use crate::store::credentials::RefreshHealth;

fn unix_millis_now() -> u64 {
    unix_millis(SystemTime::now())
}

/// When the coordinator last finished a loop turn.
#[derive(Debug, Default)]
pub struct Heartbeat {
    unix_millis: AtomicU64,
}

impl Heartbeat {
    pub fn beat(&self) {
        self.unix_millis.store(unix_millis_now(), Ordering::Relaxed);
    }

    /// Time since the last beat (`None` before the first one).
    pub fn age(&self) -> Option<Duration> {
        match self.unix_millis.load(Ordering::Relaxed) {
            0 => None,
            last => Some(Duration::from_millis(
                unix_millis_now().saturating_sub(last),
            )),
        }
    }
}

/// A dependency chunkstream needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dependency {
    Redis,
    Storage,
}

/// `"ok"` or `"error: …"` per dependency and `"ok"` or `"degraded: …"` for
/// the watch directory, as `/readyz` shows it, and how uploads are protected
/// against corruption once the probe has run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReadinessReport {
    pub redis: String,
    pub s3: String,
    pub watch_dir: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub s3_integrity: Option<Integrity>,
    /// `"error: …"` while refreshing temporary credentials fails.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub s3_credentials: Option<String>,
    /// Where the S3 credentials come from and, for temporary ones, when the
    /// current ones expire (absent when anonymous or not known yet).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub s3_credentials_source: Option<String>,
}

impl ReadinessReport {
    pub fn ready(&self) -> bool {
        self.redis == "ok"
            && self.s3 == "ok"
            && self.watch_dir == "ok"
            && self.s3_credentials.is_none()
    }
}

/// The outcome of the last check of each dependency. Starts as unknown
/// ("error: not checked yet"), so an instance is not ready before it knows.
#[derive(Debug, Default)]
pub struct Readiness {
    redis: Mutex<Option<Result<(), String>>>,
    storage: Mutex<Option<Result<(), String>>>,
    /// How many times Redis came back after being down; the coordinator then
    /// writes back whatever Redis may have lost.
    redis_recoveries: AtomicU64,
    /// Why the watch directory cannot be trusted now, if it cannot.
    watch_dir: Mutex<Option<String>>,
    integrity: Mutex<Option<Integrity>>,
    /// The last credential refresh error, until a refresh succeeds.
    credentials: Mutex<Option<RefreshHealth>>,
}

impl Readiness {
    fn slot(&self, dependency: Dependency) -> &Mutex<Option<Result<(), String>>> {
        match dependency {
            Dependency::Redis => &self.redis,
            Dependency::Storage => &self.storage,
        }
    }

    /// Records a check. Returns true when this changed the up/down state.
    pub fn record(&self, dependency: Dependency, outcome: Result<(), String>) -> bool {
        let mut slot = self.slot(dependency).lock().expect("readiness lock");
        let was_up = matches!(*slot, Some(Ok(())));
        let was_down = matches!(*slot, Some(Err(_)));
        let is_up = outcome.is_ok();
        *slot = Some(outcome);
        if dependency == Dependency::Redis && was_down && is_up {
            self.redis_recoveries.fetch_add(1, Ordering::SeqCst);
        }
        was_up != is_up
    }

    /// Times Redis came back after a failed check.
    pub fn redis_recoveries(&self) -> u64 {
        self.redis_recoveries.load(Ordering::SeqCst)
    }

    /// Whether the last check of `dependency` failed (unknown is not down).
    pub fn is_down(&self, dependency: Dependency) -> bool {
        matches!(
            *self.slot(dependency).lock().expect("readiness lock"),
            Some(Err(_))
        )
    }

    /// Records whether (and why) the watch directory cannot be seen.
    pub fn set_watch_dir(&self, blind: Option<String>) {
        *self.watch_dir.lock().expect("readiness lock") = blind;
    }

    pub fn set_integrity(&self, integrity: Integrity) {
        *self.integrity.lock().expect("readiness lock") = Some(integrity);
    }

    pub fn integrity(&self) -> Option<Integrity> {
        *self.integrity.lock().expect("readiness lock")
    }

    pub fn set_credentials(&self, health: RefreshHealth) {
        *self.credentials.lock().expect("readiness lock") = Some(health);
    }

    pub fn report(&self) -> ReadinessReport {
        let show = |dependency| match &*self.slot(dependency).lock().expect("readiness lock") {
            Some(Ok(())) => "ok".to_string(),
            Some(Err(detail)) => format!("error: {detail}"),
            None => "error: not checked yet".to_string(),
        };
        let watch_dir = match &*self.watch_dir.lock().expect("readiness lock") {
            None => "ok".to_string(),
            Some(reason) => format!("degraded: {reason}"),
        };
        let credentials = self.credentials.lock().expect("readiness lock").clone();
        ReadinessReport {
            redis: show(Dependency::Redis),
            s3: show(Dependency::Storage),
            watch_dir,
            s3_integrity: self.integrity(),
            s3_credentials: credentials
                .as_ref()
                .and_then(|health| health.last_error.as_ref())
                .map(|err| format!("error: refreshing credentials: {err}")),
            s3_credentials_source: credentials.as_ref().map(|health| match health.expires {
                Some(expires) => format!(
                    "{}, expires {}",
                    health.source,
                    humantime::format_rfc3339_seconds(expires)
                ),
                None => health.source.to_string(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_needs_both_dependencies_checked_and_up() {
        let readiness = Readiness::default();
        assert!(!readiness.report().ready());
        assert!(
            !readiness.is_down(Dependency::Storage),
            "unknown is not down"
        );
        assert!(readiness.record(Dependency::Redis, Ok(())));
        assert!(readiness.record(Dependency::Storage, Ok(())));
        assert!(readiness.report().ready());
        assert!(!readiness.record(Dependency::Storage, Ok(())), "no change");
        assert!(readiness.record(Dependency::Storage, Err("connection refused".into())));
        let report = readiness.report();
        assert_eq!(report.s3, "error: connection refused");
        assert_eq!(report.redis, "ok");
        assert!(readiness.is_down(Dependency::Storage));
        assert_eq!(readiness.redis_recoveries(), 0);
        readiness.record(Dependency::Redis, Err("broken pipe".into()));
        readiness.record(Dependency::Redis, Ok(()));
        assert_eq!(readiness.redis_recoveries(), 1);
        readiness.record(Dependency::Storage, Ok(()));
        assert!(readiness.report().ready());
        readiness.set_watch_dir(Some("watch directory /w is not readable (EIO)".into()));
        let report = readiness.report();
        assert!(!report.ready());
        assert_eq!(
            report.watch_dir,
            "degraded: watch directory /w is not readable (EIO)"
        );
        readiness.set_watch_dir(None);
        assert!(readiness.report().ready());
    }

    #[test]
    fn heartbeat_age_is_none_before_the_first_beat() {
        let heartbeat = Heartbeat::default();
        assert_eq!(heartbeat.age(), None);
        heartbeat.beat();
        assert!(heartbeat.age().unwrap() < Duration::from_secs(5));
    }
}
