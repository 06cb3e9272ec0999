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

/// S3's smallest multipart part; chunks must be at least this big so that they
/// can later be assembled server-side.
pub const MIN_CHUNK_SIZE: u64 = 5 * 1024 * 1024;
/// S3's largest single PUT.
pub const MAX_CHUNK_SIZE: u64 = 5 * 1024 * 1024 * 1024;
/// Upper bound for `WORKERS`; more threads than this only add contention.
pub const MAX_WORKERS: usize = 256;
/// S3's limit on the parts of one multipart upload.
pub const MAX_MULTIPART_PARTS: usize = 10_000;

#[derive(Debug, Parser)]
#[command(
    name = "chunkstream",
    version,
    about = "Uploads growing video files from a polled directory to S3 in ordered, checkpointed chunks.",
    long_about = "Polls WATCH_DIR (works on NFS/SMB, where inotify does not), uploads every matching \
file in ordered CHUNK_SIZE chunks to S3 while it grows, checkpoints each chunk in Redis so a restart \
resumes where it stopped, and writes a metadata.json per stream once the file has been quiet for \
STREAM_TIMEOUT.\n\nWith no subcommand, `run` is assumed."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub settings: Settings,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon (the default).
    Run,
    /// Show what a running instance is uploading, with progress (reads /streams).
    Status {
        /// The instance's HTTP address; defaults to METRICS_ADDR on this host.
        #[arg(long)]
        url: Option<String>,
        /// Print the raw /streams JSON.
        #[arg(long)]
        json: bool,
        /// Refresh every second (redrawn in place in a terminal).
        #[arg(long)]
        watch: bool,
    },
    /// Exit 0 if a running instance's /healthz is OK, else 1 (for Docker HEALTHCHECK).
    Healthcheck {
        /// The instance's HTTP address; defaults to METRICS_ADDR on this host.
        #[arg(long)]
        url: Option<String>,
    },
    /// Dry run: walk WATCH_DIR with INCLUDE/EXCLUDE and print what would be uploaded, skipped (and why), or is done according to Redis.
    Scan,
    /// Download a stream's chunks, verify every checksum, and write the file.
    Restore {
        /// The stream id (the folder name under S3_PREFIX in the bucket).
        stream_id: String,
        /// Where to write the restored file; it appears only once verified.
        output: PathBuf,
        /// Download the assembled object instead of the chunks (still verified).
        #[arg(long)]
        from_assembled: bool,
    },
    /// List the streams in the bucket (from their metadata.json), oldest completion first.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Check streams in the bucket: chunks present with their sizes; --deep also checks every checksum.
    Verify {
        /// The stream to check.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        stream_id: Option<String>,
        /// Check every stream in the bucket.
        #[arg(long)]
        all: bool,
        /// Download and check every chunk's sha256, the whole stream's, and the assembled object.
        #[arg(long)]
        deep: bool,
    },
}

/// The raw settings, exactly as given by flags or the environment.
#[derive(Debug, Clone, Args)]
pub struct Settings {
    /// Directory to poll, recursively (subdirectories included).
    #[arg(
        long,
        env = "WATCH_DIR",
        default_value = "./input-videos",
        global = true
    )]
    pub watch_dir: String,
    /// Comma-separated file extensions to upload, case-insensitive: the shorthand for INCLUDE=*.mp4,... used while INCLUDE is empty.
    #[arg(long, env = "FILE_EXTENSIONS", default_value = "mp4", global = true)]
    pub file_extensions: String,
    /// Comma-separated globs on the path relative to WATCH_DIR (** any depth; no / means any depth); empty means FILE_EXTENSIONS.
    #[arg(long, env = "INCLUDE", default_value = "", global = true)]
    pub include: String,
    /// Comma-separated globs never uploaded (wins over INCLUDE); the default leaves out hidden and partial files; set it empty to re-include them.
    #[arg(long, env = "EXCLUDE", default_value = crate::rules::DEFAULT_EXCLUDE, global = true)]
    pub exclude: String,
    /// Upload bandwidth cap in bytes per second shared by all workers (e.g. 20MiB); empty or off means unlimited.
    #[arg(long, env = "BANDWIDTH_LIMIT", default_value = "", global = true)]
    pub bandwidth_limit: String,
    /// Time windows with their own cap, first match wins, e.g. "Mon-Fri 08:00-18:00=5MiB, *=off"; outside them BANDWIDTH_LIMIT applies.
    #[arg(long, env = "BANDWIDTH_SCHEDULE", default_value = "", global = true)]
    pub bandwidth_schedule: String,
    /// Time zone of BANDWIDTH_SCHEDULE: an IANA name (Europe/Berlin) or POSIX TZ string.
    #[arg(long, env = "TZ", default_value = "UTC", global = true)]
    pub tz: String,
    /// How often the directory is scanned (e.g. 500ms, 5s).
    #[arg(long, env = "POLL_INTERVAL", default_value = "1s", global = true)]
    pub poll_interval: String,
    /// A stream is complete after this long with no change in size or mtime.
    #[arg(long, env = "STREAM_TIMEOUT", default_value = "30s", global = true)]
    pub stream_timeout: String,
    /// Chunk size in bytes or with units (10MiB, 16MB); at least 5 MiB.
    #[arg(long, env = "CHUNK_SIZE", default_value = "10MiB", global = true)]
    pub chunk_size: String,
    /// Number of upload threads.
    #[arg(long, env = "WORKERS", default_value = "4", global = true)]
    pub workers: String,
    /// S3 endpoint URL, e.g. http://minio:9000; empty means AWS.
    #[arg(long, env = "S3_ENDPOINT", default_value = "", global = true)]
    pub s3_endpoint: String,
    /// S3 region.
    #[arg(long, env = "S3_REGION", default_value = "us-east-1", global = true)]
    pub s3_region: String,
    /// Bucket for chunks and metadata; created at start if missing.
    #[arg(
        long,
        env = "S3_BUCKET",
        default_value = "video-streams",
        global = true
    )]
    pub s3_bucket: String,
    /// Key prefix for every object, e.g. streams/.
    #[arg(long, env = "S3_PREFIX", default_value = "", global = true)]
    pub s3_prefix: String,
    /// Path-style addressing (needed for MinIO); false for virtual-hosted style.
    #[arg(long, env = "S3_PATH_STYLE", default_value = "true", global = true)]
    pub s3_path_style: String,
    /// Create the bucket at start if it is missing; with false a missing bucket stops the start.
    #[arg(long, env = "S3_CREATE_BUCKET", default_value = "true", global = true)]
    pub s3_create_bucket: String,
    /// Content-MD5 on every request with a body: auto (when the server is not proven to verify x-amz-checksum-sha256), always or never.
    #[arg(long, env = "S3_CONTENT_MD5", default_value = "auto", global = true)]
    pub s3_content_md5: String,
    /// Most parts in one multipart upload; longer streams assemble in two levels.
    #[arg(
        long,
        env = "ASSEMBLY_MAX_PARTS",
        default_value = "10000",
        global = true
    )]
    pub assembly_max_parts: String,
    /// Multipart uploads under S3_PREFIX older than this, not owned by a live assembly, are aborted (checked at start and hourly).
    #[arg(long, env = "MULTIPART_MAX_AGE", default_value = "24h", global = true)]
    pub multipart_max_age: String,
    /// Assemble a playable single object per stream server-side (UploadPartCopy) at completion.
    #[arg(long, env = "ASSEMBLE", default_value = "false", global = true)]
    pub assemble: String,
    /// Timeout for each whole S3 request; a timeout is retried.
    #[arg(long, env = "S3_REQUEST_TIMEOUT", default_value = "60s", global = true)]
    pub s3_request_timeout: String,
    /// S3 access key id.
    #[arg(long, env = "AWS_ACCESS_KEY_ID", global = true, hide_env_values = true)]
    pub aws_access_key_id: Option<String>,
    /// S3 secret access key.
    #[arg(
        long,
        env = "AWS_SECRET_ACCESS_KEY",
        global = true,
        hide_env_values = true
    )]
    pub aws_secret_access_key: Option<String>,
    /// Redis URL for checkpoints, one server; rediss:// for TLS. Default redis://127.0.0.1:6379/0; leave it unset with REDIS_SENTINELS.
    #[arg(long, env = "REDIS_URL", global = true, hide_env_values = true)]
    pub redis_url: Option<String>,
    /// Redis Sentinels, host:port,host:port,...: instead of REDIS_URL, follow the master they name through failovers.
    #[arg(long, env = "REDIS_SENTINELS", default_value = "", global = true)]
    pub redis_sentinels: String,
    /// The master name the sentinels monitor (required with REDIS_SENTINELS).
    #[arg(long, env = "REDIS_SENTINEL_MASTER", default_value = "", global = true)]
    pub redis_sentinel_master: String,
    /// Password of the sentinels themselves, if they require one.
    #[arg(
        long,
        env = "REDIS_SENTINEL_PASSWORD",
        global = true,
        hide_env_values = true
    )]
    pub redis_sentinel_password: Option<String>,
    /// Password of the Redis master the sentinels name (with REDIS_URL, put it in the URL instead).
    #[arg(long, env = "REDIS_PASSWORD", global = true, hide_env_values = true)]
    pub redis_password: Option<String>,
    /// Namespace for every Redis key.
    #[arg(
        long,
        env = "REDIS_KEY_PREFIX",
        default_value = "chunkstream",
        global = true
    )]
    pub redis_key_prefix: String,
    /// Connect, read and write timeout for each Redis call.
    #[arg(long, env = "REDIS_TIMEOUT", default_value = "5s", global = true)]
    pub redis_timeout: String,
    /// First retry delay after a failed upload or checkpoint; doubles per attempt.
    #[arg(long, env = "RETRY_BASE_DELAY", default_value = "200ms", global = true)]
    pub retry_base_delay: String,
    /// Cap on the retry delay.
    #[arg(long, env = "RETRY_MAX_DELAY", default_value = "30s", global = true)]
    pub retry_max_delay: String,
    /// Listen address for /metrics and /healthz; port 0 picks a free port.
    #[arg(
        long,
        env = "METRICS_ADDR",
        default_value = "0.0.0.0:9102",
        global = true
    )]
    pub metrics_addr: String,
    /// Log level: error, warn, info, debug, trace or off.
    #[arg(long, env = "LOG_LEVEL", default_value = "info", global = true)]
    pub log_level: String,
    /// Log format: text, or json (one object per line).
    #[arg(long, env = "LOG_FORMAT", default_value = "text", global = true)]
    pub log_format: String,
    /// The longest a drain on SIGTERM/SIGINT may take.
    #[arg(long, env = "SHUTDOWN_TIMEOUT", default_value = "25s", global = true)]
    pub shutdown_timeout: String,
    /// How long a replica's claim on a stream lasts unless renewed (renewed every third of it); another replica takes the stream over after it.
    #[arg(long, env = "LEASE_TTL", default_value = "30s", global = true)]
    pub lease_ttl: String,
    /// Most streams one replica owns at once; 0 means its fair share of the active streams, with no fixed cap.
    #[arg(long, env = "MAX_OWNED_STREAMS", default_value = "0", global = true)]
    pub max_owned_streams: String,
    /// Stable name of this replica (e.g. the pod name), so a restart takes its streams back at once; empty means a fresh identity per process. Never give two live processes the same one.
    #[arg(long, env = "INSTANCE_ID", default_value = "", global = true)]
    pub instance_id: String,
}

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

/// How to reach the bucket.
#[derive(Clone)]
pub struct S3Config {
    /// `None` means AWS itself.
    pub endpoint: Option<String>,
    pub region: String,
    pub bucket: String,
    pub prefix: String,
    pub path_style: bool,
    pub request_timeout: Duration,
    pub credentials: Option<S3Credentials>,
    /// Create a missing bucket at start.
    pub create_bucket: bool,
    pub content_md5: ContentMd5,
}

/// When requests with a body carry `Content-MD5` (`S3_CONTENT_MD5`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentMd5 {
    /// Unless the start-up probe proved that the server verifies
    /// `x-amz-checksum-sha256`.
    Auto,
    Always,
    Never,
}

impl ContentMd5 {
    /// Whether to send it, given what the probe found.
    pub fn wanted(self, server_verifies_checksum: bool) -> bool {
        match self {
            ContentMd5::Auto => !server_verifies_checksum,
            ContentMd5::Always => true,
            ContentMd5::Never => false,
        }
    }
}

/// A key pair. `Debug` never shows the secret.
#[derive(Clone)]
pub struct S3Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
}

impl std::fmt::Debug for S3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Config")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("path_style", &self.path_style)
            .field("request_timeout", &self.request_timeout)
            .field("create_bucket", &self.create_bucket)
            .field("content_md5", &self.content_md5)
            .field(
                "access_key_id",
                &self.credentials.as_ref().map(|c| c.access_key_id.as_str()),
            )
            .finish()
    }
}

impl S3Config {
    /// The endpoint as shown in logs and errors.
    pub fn endpoint_display(&self) -> String {
        self.endpoint
            .clone()
            .unwrap_or_else(|| format!("AWS S3 ({})", self.region))
    }
}

/// How to reach Redis.
#[derive(Clone)]
pub struct RedisConfig {
    /// `REDIS_URL`; with Sentinel, a description for messages only
    /// (`redis+sentinel://HOST:PORT,.../MASTER`, no passwords).
    pub url: String,
    pub key_prefix: String,
    pub timeout: Duration,
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &redact_url(&self.url))
            .field("key_prefix", &self.key_prefix)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// How to find the Redis master through Redis Sentinel.
#[derive(Clone)]
pub struct SentinelConfig {
    /// Sentinel addresses (host, port), in the order given.
    pub sentinels: Vec<(String, u16)>,
    /// The master name the sentinels monitor.
    pub master: String,
    /// `REDIS_SENTINEL_PASSWORD`: for the sentinels.
    pub sentinel_password: Option<String>,
    /// `REDIS_PASSWORD`: for the master.
    pub password: Option<String>,
}

impl std::fmt::Debug for SentinelConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = |secret: &Option<String>| secret.as_ref().map(|_| "***");
        f.debug_struct("SentinelConfig")
            .field("sentinels", &self.sentinels)
            .field("master", &self.master)
            .field("sentinel_password", &shown(&self.sentinel_password))
            .field("password", &shown(&self.password))
            .finish()
    }
}

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
            assemble: parse_bool("ASSEMBLE", &settings.assemble)?,
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
            s3: S3Config::from_settings(settings)?,
            redis: RedisConfig::from_settings(settings, sentinel.as_ref())?,
            retry,
            metrics_addr,
            log_level: parse_log_level(&settings.log_level)?,
            log_format: parse_log_format(&settings.log_format)?,
            shutdown_timeout: parse_duration("SHUTDOWN_TIMEOUT", &settings.shutdown_timeout)?,
            lease: LeasePolicy::from_settings(settings)?,
            sentinel,
            instance_id: parse_instance_id(&settings.instance_id)?,
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

impl S3Config {
    /// Validates the S3 settings alone (all that `restore` needs).
    pub fn from_settings(settings: &Settings) -> Result<Self, ConfigError> {
        let endpoint = match settings.s3_endpoint.trim() {
            "" => None,
            url => {
                let (scheme, rest) = url.split_once("://").ok_or_else(|| {
                    ConfigError::bad_value(
                        "S3_ENDPOINT",
                        url,
                        "expected an http:// or https:// URL",
                    )
                })?;
                if !matches!(scheme, "http" | "https") || rest.is_empty() || rest.contains(' ') {
                    return Err(ConfigError::bad_value(
                        "S3_ENDPOINT",
                        url,
                        "expected an http:// or https:// URL",
                    ));
                }
                Some(url.trim_end_matches('/').to_string())
            }
        };
        let bucket = non_empty("S3_BUCKET", &settings.s3_bucket)?.to_string();
        let valid_bucket = (3..=63).contains(&bucket.len())
            && bucket
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
        if !valid_bucket {
            return Err(ConfigError::bad_value(
                "S3_BUCKET",
                &bucket,
                "bucket names are 3-63 characters of a-z, 0-9, '-' and '.'",
            ));
        }
        let prefix = settings.s3_prefix.clone();
        if prefix.starts_with('/') || prefix.len() > 512 {
            return Err(ConfigError::bad_value(
                "S3_PREFIX",
                &prefix,
                "must not start with '/' and must be at most 512 bytes",
            ));
        }
        let credentials = match (
            settings
                .aws_access_key_id
                .as_deref()
                .filter(|v| !v.is_empty()),
            settings
                .aws_secret_access_key
                .as_deref()
                .filter(|v| !v.is_empty()),
        ) {
            (Some(id), Some(secret)) => Some(S3Credentials {
                access_key_id: id.to_string(),
                secret_access_key: secret.to_string(),
            }),
            (None, None) => None,
            (Some(_), None) => {
                return Err(ConfigError {
                    variable: "AWS_SECRET_ACCESS_KEY",
                    reason: "missing while AWS_ACCESS_KEY_ID is set".into(),
                });
            }
            (None, Some(_)) => {
                return Err(ConfigError {
                    variable: "AWS_ACCESS_KEY_ID",
                    reason: "missing while AWS_SECRET_ACCESS_KEY is set".into(),
                });
            }
        };
        Ok(Self {
            endpoint,
            region: non_empty("S3_REGION", &settings.s3_region)?.to_string(),
            bucket,
            prefix,
            path_style: parse_bool("S3_PATH_STYLE", &settings.s3_path_style)?,
            request_timeout: parse_duration("S3_REQUEST_TIMEOUT", &settings.s3_request_timeout)?,
            credentials,
            create_bucket: parse_bool("S3_CREATE_BUCKET", &settings.s3_create_bucket)?,
            content_md5: match settings.s3_content_md5.trim().to_ascii_lowercase().as_str() {
                "auto" => ContentMd5::Auto,
                "always" => ContentMd5::Always,
                "never" => ContentMd5::Never,
                _ => {
                    return Err(ConfigError::bad_value(
                        "S3_CONTENT_MD5",
                        &settings.s3_content_md5,
                        "expected auto, always or never",
                    ));
                }
            },
        })
    }
}

/// A setting given as an empty string counts as unset (Compose passes
/// `${VAR:-}` through as empty).
fn given(value: &Option<String>) -> Option<&str> {
    value.as_deref().map(str::trim).filter(|v| !v.is_empty())
}

impl SentinelConfig {
    /// `None` in single-server mode (`REDIS_URL`). Exactly one mode: the
    /// Sentinel settings without `REDIS_SENTINELS`, or `REDIS_URL` with it,
    /// are errors that name the variable.
    fn from_settings(settings: &Settings) -> Result<Option<Self>, ConfigError> {
        let sentinels = settings.redis_sentinels.trim();
        let master = settings.redis_sentinel_master.trim();
        if sentinels.is_empty() {
            let needs_sentinels = [
                ("REDIS_SENTINEL_MASTER", !master.is_empty()),
                (
                    "REDIS_SENTINEL_PASSWORD",
                    given(&settings.redis_sentinel_password).is_some(),
                ),
                ("REDIS_PASSWORD", given(&settings.redis_password).is_some()),
            ];
            if let Some((variable, _)) = needs_sentinels.into_iter().find(|(_, set)| *set) {
                return Err(ConfigError {
                    variable,
                    reason:
                        "only used with REDIS_SENTINELS (with REDIS_URL, put a password in the URL)"
                            .into(),
                });
            }
            return Ok(None);
        }
        if given(&settings.redis_url).is_some() {
            return Err(ConfigError {
                variable: "REDIS_URL",
                reason: "set either REDIS_URL (one server) or REDIS_SENTINELS (failover), not both"
                    .into(),
            });
        }
        let sentinels = sentinels
            .split(',')
            .map(str::trim)
            .filter(|address| !address.is_empty())
            .map(|address| {
                parse_host_port(address).ok_or_else(|| {
                    ConfigError::bad_value(
                        "REDIS_SENTINELS",
                        address,
                        "expected host:port,host:port,... (e.g. sentinel-0:26379)",
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let master = non_empty("REDIS_SENTINEL_MASTER", master)?;
        if master.chars().any(char::is_whitespace) {
            return Err(ConfigError::bad_value(
                "REDIS_SENTINEL_MASTER",
                master,
                "must not contain whitespace",
            ));
        }
        Ok(Some(Self {
            sentinels,
            master: master.to_string(),
            sentinel_password: given(&settings.redis_sentinel_password).map(str::to_string),
            password: given(&settings.redis_password).map(str::to_string),
        }))
    }

    /// The sentinels and the master name, for messages (no passwords).
    pub fn describe(&self) -> String {
        let addresses: Vec<String> = self
            .sentinels
            .iter()
            .map(|(host, port)| format!("{host}:{port}"))
            .collect();
        format!("redis+sentinel://{}/{}", addresses.join(","), self.master)
    }
}

/// `host:port` or `[v6]:port`, with a port above 0.
fn parse_host_port(address: &str) -> Option<(String, u16)> {
    let (host, port) = address.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = port.parse::<u16>().ok().filter(|&port| port > 0)?;
    (!host.is_empty() && !host.contains(char::is_whitespace)).then(|| (host.to_string(), port))
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

/// The single-server default of `REDIS_URL`.
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379/0";

impl RedisConfig {
    /// `REDIS_URL`, or with `sentinel` a description of it (validated by
    /// [`SentinelConfig::from_settings`]).
    fn from_settings(
        settings: &Settings,
        sentinel: Option<&SentinelConfig>,
    ) -> Result<Self, ConfigError> {
        let key_prefix = non_empty("REDIS_KEY_PREFIX", &settings.redis_key_prefix)?.to_string();
        if key_prefix.chars().any(char::is_whitespace) {
            return Err(ConfigError::bad_value(
                "REDIS_KEY_PREFIX",
                &key_prefix,
                "must not contain whitespace",
            ));
        }
        let timeout = parse_duration("REDIS_TIMEOUT", &settings.redis_timeout)?;
        if let Some(sentinel) = sentinel {
            return Ok(Self {
                url: sentinel.describe(),
                key_prefix,
                timeout,
            });
        }
        let url = given(&settings.redis_url)
            .unwrap_or(DEFAULT_REDIS_URL)
            .to_string();
        let shown = redact_url(&url);
        if !(url.starts_with("redis://")
            || url.starts_with("rediss://")
            || url.starts_with("unix://")
            || url.starts_with("redis+unix://"))
        {
            return Err(ConfigError::bad_value(
                "REDIS_URL",
                &shown,
                "expected redis://, rediss:// or unix:// URL",
            ));
        }
        if let Err(err) = redis::Client::open(url.as_str()) {
            let detail = err.to_string().replace(&url, &shown);
            return Err(ConfigError::bad_value("REDIS_URL", &shown, detail));
        }
        Ok(Self {
            url,
            key_prefix,
            timeout,
        })
    }
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
mod tests {
    use super::*;

    /// Settings as if only `flags` were given on the command line.
    fn settings(flags: &[&str]) -> Settings {
        let mut argv = vec!["chunkstream"];
        argv.extend_from_slice(flags);
        Cli::try_parse_from(argv).expect("flags parse").settings
    }

    fn config(flags: &[&str]) -> Result<Config, ConfigError> {
        let dir = std::env::temp_dir();
        let watch = format!("--watch-dir={}", dir.display());
        let mut all = vec![watch.as_str()];
        all.extend_from_slice(flags);
        Config::from_settings(&settings(&all))
    }

    #[test]
    fn defaults_are_valid() {
        let config = config(&[]).unwrap();
        assert_eq!(config.chunk_size, 10 * 1024 * 1024);
        assert_eq!(config.poll_interval, Duration::from_secs(1));
        assert_eq!(config.stream_timeout, Duration::from_secs(30));
        assert_eq!(config.workers, 4);
        assert_eq!(config.file_extensions, vec!["mp4"]);
        assert_eq!(config.s3.bucket, "video-streams");
        assert!(config.s3.path_style);
        assert!(config.s3.endpoint.is_none());
        assert_eq!(config.shutdown_timeout, Duration::from_secs(25));
        assert_eq!(config.metrics_addr.port(), 9102);
        assert_eq!(config.lease.ttl, Duration::from_secs(30));
        assert_eq!(config.lease.max_owned_streams, None);
    }

    #[test]
    fn sizes_accept_units_and_plain_bytes() {
        assert_eq!(
            config(&["--chunk-size=16MB"]).unwrap().chunk_size,
            16_000_000
        );
        assert_eq!(
            config(&["--chunk-size=5242880"]).unwrap().chunk_size,
            MIN_CHUNK_SIZE
        );
    }

    #[test]
    fn every_bad_value_names_its_variable() {
        let cases: &[(&str, &str)] = &[
            ("--chunk-size=4MiB", "CHUNK_SIZE"),
            ("--chunk-size=-5MiB", "CHUNK_SIZE"),
            ("--chunk-size=lots", "CHUNK_SIZE"),
            ("--poll-interval=0s", "POLL_INTERVAL"),
            ("--lease-ttl=500ms", "LEASE_TTL"),
            ("--lease-ttl=forever", "LEASE_TTL"),
            ("--max-owned-streams=-1", "MAX_OWNED_STREAMS"),
            ("--max-owned-streams=few", "MAX_OWNED_STREAMS"),
            ("--poll-interval=soon", "POLL_INTERVAL"),
            ("--stream-timeout=-1s", "STREAM_TIMEOUT"),
            ("--workers=0", "WORKERS"),
            ("--workers=-3", "WORKERS"),
            ("--workers=many", "WORKERS"),
            ("--s3-endpoint=minio:9000", "S3_ENDPOINT"),
            ("--s3-bucket=Bad_Bucket", "S3_BUCKET"),
            ("--s3-path-style=maybe", "S3_PATH_STYLE"),
            ("--assemble=sometimes", "ASSEMBLE"),
            ("--redis-url=http://localhost", "REDIS_URL"),
            ("--metrics-addr=localhost", "METRICS_ADDR"),
            ("--log-level=loud", "LOG_LEVEL"),
            ("--log-format=xml", "LOG_FORMAT"),
            ("--shutdown-timeout=0ms", "SHUTDOWN_TIMEOUT"),
            ("--file-extensions=,", "FILE_EXTENSIONS"),
            ("--retry-base-delay=1m", "RETRY_MAX_DELAY"),
            ("--aws-access-key-id=AKIA", "AWS_SECRET_ACCESS_KEY"),
            ("--s3-request-timeout=never", "S3_REQUEST_TIMEOUT"),
            ("--redis-timeout=0s", "REDIS_TIMEOUT"),
            ("--redis-sentinels=s1", "REDIS_SENTINELS"),
            ("--redis-sentinels=s1:0", "REDIS_SENTINELS"),
            ("--redis-sentinels=s1:26379", "REDIS_SENTINEL_MASTER"),
            ("--redis-sentinel-master=m", "REDIS_SENTINEL_MASTER"),
            ("--redis-sentinel-password=pw", "REDIS_SENTINEL_PASSWORD"),
            ("--redis-password=pw", "REDIS_PASSWORD"),
            ("--instance-id=pod 0", "INSTANCE_ID"),
            ("--instance-id=a#b", "INSTANCE_ID"),
        ];
        for (flag, variable) in cases {
            let err = config(&[flag]).expect_err(flag);
            assert_eq!(err.variable, *variable, "{flag}");
            assert!(err.to_string().contains(variable), "{flag}: {err}");
        }
    }

    #[test]
    fn sentinel_mode_replaces_the_url_and_never_combines_with_it() {
        let chosen = config(&[
            "--redis-sentinels=10.0.0.1:26379, sentinel-1:26380,[::1]:26381",
            "--redis-sentinel-master=mymaster",
            "--redis-sentinel-password=SENTINELSECRET",
            "--redis-password=MASTERSECRET",
        ])
        .unwrap();
        let sentinel = chosen.sentinel.as_ref().unwrap();
        assert_eq!(
            sentinel.sentinels,
            vec![
                ("10.0.0.1".to_string(), 26379),
                ("sentinel-1".to_string(), 26380),
                ("::1".to_string(), 26381)
            ]
        );
        assert_eq!(sentinel.master, "mymaster");
        assert_eq!(
            chosen.redis.url,
            "redis+sentinel://10.0.0.1:26379,sentinel-1:26380,::1:26381/mymaster"
        );
        let shown = format!("{chosen:?}");
        assert!(!shown.contains("SECRET"), "{shown}");

        let both = config(&[
            "--redis-url=redis://r:6379/0",
            "--redis-sentinels=s:26379",
            "--redis-sentinel-master=m",
        ])
        .unwrap_err();
        assert_eq!(both.variable, "REDIS_URL");
        assert!(both.to_string().contains("not both"), "{both}");
        // Empty values (as Compose passes them) are unset.
        let single =
            config(&["--redis-sentinels=", "--redis-password=", "--instance-id="]).unwrap();
        assert!(single.sentinel.is_none());
        assert_eq!(single.redis.url, DEFAULT_REDIS_URL);
        assert_eq!(single.instance_id, None);
        let named = config(&["--instance-id=chunkstream-0"]).unwrap();
        assert_eq!(named.instance_id.as_deref(), Some("chunkstream-0"));
    }

    #[test]
    fn missing_watch_dir_is_a_config_error() {
        let err = Config::from_settings(&settings(&["--watch-dir=/no/such/dir"])).unwrap_err();
        assert_eq!(err.variable, "WATCH_DIR");
        assert!(err.to_string().contains("/no/such/dir"));
    }

    #[test]
    fn extensions_are_case_insensitive_and_trimmed() {
        let config = config(&["--file-extensions= MP4, .mov"]).unwrap();
        assert_eq!(config.file_extensions, vec!["mp4", "mov"]);
    }

    #[test]
    fn secrets_never_appear_in_debug_or_errors() {
        let config = config(&[
            "--aws-access-key-id=AKIDEXAMPLE",
            "--aws-secret-access-key=TOPSECRET",
            "--redis-url=redis://user:hunter2@localhost:6379/0",
        ])
        .unwrap();
        let shown = format!("{config:?}");
        assert!(!shown.contains("TOPSECRET"));
        assert!(!shown.contains("hunter2"));
        assert!(shown.contains("AKIDEXAMPLE"));
        let err = settings(&["--redis-url=redis://:hunter2@", "--watch-dir=/"]);
        if let Err(err) = Config::from_settings(&err) {
            assert!(!err.to_string().contains("hunter2"), "{err}");
        }
    }

    #[test]
    fn redaction_handles_every_userinfo_form() {
        assert_eq!(redact_url("redis://h:6379/0"), "redis://h:6379/0");
        assert_eq!(redact_url("redis://u:p@h:1/0"), "redis://u:***@h:1/0");
        assert_eq!(redact_url("redis://:p@h"), "redis://:***@h");
        assert_eq!(redact_url("rediss://p@h/2"), "rediss://***@h/2");
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_and_jitters_below_it() {
        let policy = RetryPolicy {
            base_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(30),
        };
        assert_eq!(policy.ceiling(0), Duration::from_millis(200));
        assert_eq!(policy.ceiling(3), Duration::from_millis(1600));
        assert_eq!(policy.ceiling(20), Duration::from_secs(30));
        assert_eq!(policy.ceiling(u32::MAX), Duration::from_secs(30));
        for attempt in 0..40 {
            assert!(policy.delay(attempt) <= policy.ceiling(attempt));
        }
    }
}
