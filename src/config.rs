//! Command line and environment → one validated, immutable [`Config`].
//!
//! Every setting is both a flag and an environment variable (clap `env`). The
//! raw values are kept as strings in [`Settings`] so that validation, done once
//! here, can produce messages that name the variable; a bad value exits with
//! code 2 before anything else starts.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use bytesize::ByteSize;
use clap::{Args, Parser, Subcommand};
use log::LevelFilter;

use crate::error::ConfigError;
use crate::logging::LogFormat;

mod aws;
mod cli;
mod events;
mod lifecycle;
mod stores;

pub use aws::{
    ContainerEndpoint, CredentialChain, ObjectLock, ObjectPolicy, S3Tls, Sse, WebIdentity,
};
pub use cli::{Cli, Command, Settings};
pub use events::{EventsConfig, WebhookConfig};
pub use lifecycle::OnComplete;
pub use stores::{
    ContentMd5, DEFAULT_REDIS_URL, RedisConfig, S3Config, S3Credentials, SentinelConfig,
};

/// S3's smallest multipart part; chunks must be at least this big so that they
/// can later be assembled server-side.
pub const MIN_CHUNK_SIZE: u64 = 5 * 1024 * 1024;
/// S3's largest single PUT.
pub const MAX_CHUNK_SIZE: u64 = 5 * 1024 * 1024 * 1024;
/// Upper bound for `WORKERS`; more threads than this only add contention.
pub const MAX_WORKERS: usize = 256;
/// S3's limit on the parts of one multipart upload.
pub const MAX_MULTIPART_PARTS: usize = 10_000;

/// Everything the daemon needs, validated.
#[derive(Debug, Clone)]
pub struct Config {
    pub watch_dir: PathBuf,
    /// Lower-case extensions without the dot.
    pub file_extensions: Vec<String>,
    /// INCLUDE/EXCLUDE (with FILE_EXTENSIONS as the include shorthand).
    pub rules: crate::rules::Rules,
    pub bandwidth: crate::bandwidth::BandwidthPolicy,
    pub poll_interval: Duration,
    pub stream_timeout: Duration,
    pub chunk_size: u64,
    pub workers: usize,
    /// Assemble `{prefix}{stream_id}/{file_name}` from the chunks at completion.
    pub assemble: bool,
    /// Delete the chunk objects once the assembled object is verified.
    pub delete_chunks_after_assembly: bool,
    /// Most parts per multipart upload when assembling (S3 allows 10,000).
    pub assembly_max_parts: usize,
    /// Abandoned multipart uploads older than this are aborted.
    pub multipart_max_age: Duration,
    pub s3: S3Config,
    pub redis: RedisConfig,
    pub retry: RetryPolicy,
    pub metrics_addr: SocketAddr,
    pub log_level: LevelFilter,
    pub log_format: LogFormat,
    pub shutdown_timeout: Duration,
    pub lease: LeasePolicy,
    /// `Some` when the master is found through Redis Sentinel.
    pub sentinel: Option<SentinelConfig>,
    /// `INSTANCE_ID`, if set: this replica's stable name.
    pub instance_id: Option<String>,
    /// Where completion events go (docs/events.md).
    pub events: EventsConfig,
    /// How long Redis keeps the record of a stream whose file is gone.
    pub record_retention: Duration,
    /// What happens to a file once its stream is complete and verified.
    pub on_complete: OnComplete,
    /// How long after completion the file is deleted or moved.
    pub on_complete_delay: Duration,
}

/// How replicas share streams (see docs/scaling.md).
#[derive(Debug, Clone, Copy)]
pub struct LeasePolicy {
    /// A claim lasts this long unless renewed.
    pub ttl: Duration,
    /// Cap on the streams this replica owns at once (`None`: fair share only).
    pub max_owned_streams: Option<usize>,
}

/// The shortest `LEASE_TTL`: renewals go out every third of it.
pub const MIN_LEASE_TTL: Duration = Duration::from_secs(1);

/// Capped exponential backoff with full jitter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub base_delay: Duration,
    pub max_delay: Duration,
}

impl RetryPolicy {
    /// The upper bound of the delay before retry number `attempt` (0-based):
    /// `min(max, base × 2^attempt)`. The actual sleep is uniform in `[0, bound]`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.base_delay
            .checked_mul(factor)
            .map_or(self.max_delay, |delay| delay.min(self.max_delay))
    }

    /// A full-jitter delay for retry number `attempt`.
    pub fn delay(&self, attempt: u32) -> Duration {
        let ceiling = self.ceiling(attempt);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(crate::random_u64() % nanos.saturating_add(1))
    }
}

impl Config {
    /// Validates every daemon setting. The watch directory must exist.
    pub fn from_settings(settings: &Settings) -> Result<Self, ConfigError> {
        let watch_dir = PathBuf::from(non_empty("WATCH_DIR", &settings.watch_dir)?);
        if !watch_dir.is_dir() {
            return Err(ConfigError::bad_value(
                "WATCH_DIR",
                &settings.watch_dir,
                "not an existing directory",
            ));
        }
        let file_extensions = parse_extensions(&settings.file_extensions)?;
        let chunk_size = parse_size("CHUNK_SIZE", &settings.chunk_size)?;
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
            return Err(ConfigError::bad_value(
                "CHUNK_SIZE",
                &settings.chunk_size,
                "must be between 5 MiB (the S3 multipart minimum) and 5 GiB",
            ));
        }
        let workers = parse_count("WORKERS", &settings.workers, MAX_WORKERS)?;
        let retry = RetryPolicy {
            base_delay: parse_duration("RETRY_BASE_DELAY", &settings.retry_base_delay)?,
            max_delay: parse_duration("RETRY_MAX_DELAY", &settings.retry_max_delay)?,
        };
        if retry.max_delay < retry.base_delay {
            return Err(ConfigError::bad_value(
                "RETRY_MAX_DELAY",
                &settings.retry_max_delay,
                "must not be shorter than RETRY_BASE_DELAY",
            ));
        }
        let metrics_addr = settings.metrics_addr.parse().map_err(|_| {
            ConfigError::bad_value(
                "METRICS_ADDR",
                &settings.metrics_addr,
                "expected HOST:PORT with an IP address, e.g. 0.0.0.0:9102",
            )
        })?;
        let sentinel = SentinelConfig::from_settings(settings)?;
        let on_complete = OnComplete::from_settings(settings, &watch_dir)?;
        let assemble = parse_bool("ASSEMBLE", &settings.assemble)?;
        let s3 = S3Config::from_settings(settings)?;
        let delete_chunks_after_assembly =
            parse_delete_chunks(settings, assemble, s3.policy.object_lock.is_some())?;
        Ok(Self {
            watch_dir,
            rules: crate::rules::Rules::parse(
                &settings.include,
                &settings.exclude,
                &file_extensions,
            )?,
            bandwidth: crate::bandwidth::BandwidthPolicy::parse(
                &settings.bandwidth_limit,
                &settings.bandwidth_schedule,
                &settings.tz,
            )?,
            file_extensions,
            poll_interval: parse_duration("POLL_INTERVAL", &settings.poll_interval)?,
            stream_timeout: parse_duration("STREAM_TIMEOUT", &settings.stream_timeout)?,
            chunk_size,
            workers,
            assemble,
            delete_chunks_after_assembly,
            assembly_max_parts: parse_count(
                "ASSEMBLY_MAX_PARTS",
                &settings.assembly_max_parts,
                MAX_MULTIPART_PARTS,
            )
            .and_then(|parts| {
                if parts < 2 {
                    Err(ConfigError::bad_value(
                        "ASSEMBLY_MAX_PARTS",
                        &settings.assembly_max_parts,
                        "must be at least 2",
                    ))
                } else {
                    Ok(parts)
                }
            })?,
            multipart_max_age: parse_duration("MULTIPART_MAX_AGE", &settings.multipart_max_age)?,
            s3,
            redis: RedisConfig::from_settings(settings, sentinel.as_ref())?,
            retry,
            metrics_addr,
            log_level: parse_log_level(&settings.log_level)?,
            log_format: parse_log_format(&settings.log_format)?,
            shutdown_timeout: parse_duration("SHUTDOWN_TIMEOUT", &settings.shutdown_timeout)?,
            lease: LeasePolicy::from_settings(settings)?,
            sentinel,
            instance_id: parse_instance_id(&settings.instance_id)?,
            events: EventsConfig::from_settings(settings)?,
            record_retention: parse_duration("RECORD_RETENTION", &settings.record_retention)?,
            on_complete,
            on_complete_delay: lifecycle::parse_delay(
                "ON_COMPLETE_DELAY",
                &settings.on_complete_delay,
            )?,
        })
    }
}

impl LeasePolicy {
    fn from_settings(settings: &Settings) -> Result<Self, ConfigError> {
        let ttl = parse_duration("LEASE_TTL", &settings.lease_ttl)?;
        if ttl < MIN_LEASE_TTL {
            return Err(ConfigError::bad_value(
                "LEASE_TTL",
                &settings.lease_ttl,
                "must be at least 1s",
            ));
        }
        let max_owned_streams = match settings.max_owned_streams.trim().parse::<usize>() {
            Ok(0) => None,
            Ok(cap) => Some(cap),
            Err(_) => {
                return Err(ConfigError::bad_value(
                    "MAX_OWNED_STREAMS",
                    &settings.max_owned_streams,
                    "expected a whole number (0: no fixed cap)",
                ));
            }
        };
        Ok(Self {
            ttl,
            max_owned_streams,
        })
    }
}

/// `INSTANCE_ID`: empty means none; otherwise a name like a pod's.
fn parse_instance_id(value: &str) -> Result<Option<String>, ConfigError> {
    let id = value.trim();
    if id.is_empty() {
        return Ok(None);
    }
    let valid = id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !valid {
        return Err(ConfigError::bad_value(
            "INSTANCE_ID",
            value,
            "expected at most 128 characters of a-z, A-Z, 0-9, '-', '_' and '.' (e.g. the pod name)",
        ));
    }
    Ok(Some(id.to_string()))
}

/// `url` with the password (if any) replaced by `***`, safe for logs.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(user, _)| user);
            if userinfo.contains(':') {
                format!("{scheme}://{user}:***@{host}{path}")
            } else {
                // redis://secret@host uses the user part as the password.
                format!("{scheme}://***@{host}{path}")
            }
        }
        None => url.to_string(),
    }
}

/// Validates only the log level, so logging can start before the rest.
pub fn parse_log_level(value: &str) -> Result<LevelFilter, ConfigError> {
    LevelFilter::from_str(value.trim()).map_err(|_| {
        ConfigError::bad_value(
            "LOG_LEVEL",
            value,
            "expected one of off, error, warn, info, debug, trace",
        )
    })
}

/// Validates only the log format, so logging can start before the rest.
pub fn parse_log_format(value: &str) -> Result<LogFormat, ConfigError> {
    match value.trim().to_ascii_lowercase().as_str() {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        _ => Err(ConfigError::bad_value(
            "LOG_FORMAT",
            value,
            "expected text or json",
        )),
    }
}

fn non_empty<'a>(variable: &'static str, value: &'a str) -> Result<&'a str, ConfigError> {
    let trimmed = value.trim();
    if trimmed.is_empty() {
        Err(ConfigError::bad_value(variable, value, "must not be empty"))
    } else {
        Ok(trimmed)
    }
}

fn parse_duration(variable: &'static str, value: &str) -> Result<Duration, ConfigError> {
    let duration = humantime::parse_duration(non_empty(variable, value)?).map_err(|err| {
        ConfigError::bad_value(variable, value, format!("{err} (use e.g. 500ms, 5s, 1m)"))
    })?;
    if duration.is_zero() {
        return Err(ConfigError::bad_value(
            variable,
            value,
            "must be greater than zero",
        ));
    }
    Ok(duration)
}

fn parse_size(variable: &'static str, value: &str) -> Result<u64, ConfigError> {
    let trimmed = non_empty(variable, value)?;
    if trimmed.starts_with('-') {
        return Err(ConfigError::bad_value(
            variable,
            value,
            "must not be negative",
        ));
    }
    trimmed
        .parse::<ByteSize>()
        .map(|size| size.as_u64())
        .map_err(|err| {
            ConfigError::bad_value(variable, value, format!("{err} (use e.g. 10MiB, 16MB)"))
        })
}

fn parse_count(variable: &'static str, value: &str, max: usize) -> Result<usize, ConfigError> {
    match non_empty(variable, value)?.parse::<usize>() {
        Ok(count) if (1..=max).contains(&count) => Ok(count),
        _ => Err(ConfigError::bad_value(
            variable,
            value,
            format!("expected a whole number from 1 to {max}"),
        )),
    }
}

/// `DELETE_CHUNKS_AFTER_ASSEMBLY`: only with `ASSEMBLE=true` (nothing else
/// would hold the bytes) and never with Object Lock (locked chunks cannot be
/// deleted).
fn parse_delete_chunks(
    settings: &Settings,
    assemble: bool,
    object_lock: bool,
) -> Result<bool, ConfigError> {
    let value = &settings.delete_chunks_after_assembly;
    let delete = parse_bool("DELETE_CHUNKS_AFTER_ASSEMBLY", value)?;
    let refusal = if !delete {
        None
    } else if !assemble {
        Some("needs ASSEMBLE=true: without an assembled object the chunks are the only copy")
    } else if object_lock {
        Some("cannot be used with S3_OBJECT_LOCK_MODE: locked chunks cannot be deleted")
    } else {
        None
    };
    match refusal {
        Some(why) => Err(ConfigError::bad_value(
            "DELETE_CHUNKS_AFTER_ASSEMBLY",
            value,
            why,
        )),
        None => Ok(delete),
    }
}

fn parse_bool(variable: &'static str, value: &str) -> Result<bool, ConfigError> {
    match value.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(ConfigError::bad_value(
            variable,
            value,
            "expected true or false",
        )),
    }
}

fn parse_extensions(value: &str) -> Result<Vec<String>, ConfigError> {
    let extensions: Vec<String> = value
        .split(',')
        .map(|ext| ext.trim().trim_start_matches('.').to_ascii_lowercase())
        .filter(|ext| !ext.is_empty())
        .collect();
    if extensions.is_empty() {
        return Err(ConfigError::bad_value(
            "FILE_EXTENSIONS",
            value,
            "list at least one extension, e.g. mp4,mov",
        ));
    }
    if let Some(bad) = extensions
        .iter()
        .find(|ext| ext.contains(['/', '\\', ' ', '.']))
    {
        return Err(ConfigError::bad_value(
            "FILE_EXTENSIONS",
            value,
            format!("{bad:?} is not a plain extension"),
        ));
    }
    Ok(extensions)
}

#[cfg(test)]
mod tests;
