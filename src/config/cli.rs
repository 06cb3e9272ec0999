//! The command line: subcommands and every setting as a flag with its
//! environment variable, kept as raw strings so that validation (in the
//! parent module) can name the variable in every refusal.

use super::*;

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
    /// With ASSEMBLE=true: delete a stream's chunk objects once its assembled object is verified (read back against every chunk's sha256); metadata.json records chunks_deleted, and restore and verify read the assembled object. Not with S3_OBJECT_LOCK_MODE.
    #[arg(
        long,
        env = "DELETE_CHUNKS_AFTER_ASSEMBLY",
        default_value = "false",
        global = true
    )]
    pub delete_chunks_after_assembly: String,
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
    /// Session token of temporary keys given in AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY.
    #[arg(long, env = "AWS_SESSION_TOKEN", global = true, hide_env_values = true)]
    pub aws_session_token: Option<String>,
    /// Role to assume with a web identity token (EKS IRSA); needs AWS_WEB_IDENTITY_TOKEN_FILE.
    #[arg(long, env = "AWS_ROLE_ARN", global = true)]
    pub aws_role_arn: Option<String>,
    /// File holding the web identity token (re-read at every refresh).
    #[arg(long, env = "AWS_WEB_IDENTITY_TOKEN_FILE", global = true)]
    pub aws_web_identity_token_file: Option<String>,
    /// Session name for AssumeRoleWithWebIdentity (default: chunkstream-<host>).
    #[arg(long, env = "AWS_ROLE_SESSION_NAME", global = true)]
    pub aws_role_session_name: Option<String>,
    /// STS endpoint for AssumeRoleWithWebIdentity (default: https://sts.<S3_REGION>.amazonaws.com).
    #[arg(long, env = "AWS_ENDPOINT_URL_STS", global = true)]
    pub aws_endpoint_url_sts: Option<String>,
    /// Profile in the shared credentials and config files (default: default).
    #[arg(long, env = "AWS_PROFILE", global = true)]
    pub aws_profile: Option<String>,
    /// Shared credentials file (default: ~/.aws/credentials).
    #[arg(long, env = "AWS_SHARED_CREDENTIALS_FILE", global = true)]
    pub aws_shared_credentials_file: Option<String>,
    /// Shared config file (default: ~/.aws/config).
    #[arg(long, env = "AWS_CONFIG_FILE", global = true)]
    pub aws_config_file: Option<String>,
    /// Container credentials URL (EKS Pod Identity, ECS with a full URI).
    #[arg(long, env = "AWS_CONTAINER_CREDENTIALS_FULL_URI", global = true)]
    pub aws_container_credentials_full_uri: Option<String>,
    /// Container credentials path on 169.254.170.2 (ECS task roles).
    #[arg(long, env = "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", global = true)]
    pub aws_container_credentials_relative_uri: Option<String>,
    /// Authorization header for the container credentials endpoint.
    #[arg(
        long,
        env = "AWS_CONTAINER_AUTHORIZATION_TOKEN",
        global = true,
        hide_env_values = true
    )]
    pub aws_container_authorization_token: Option<String>,
    /// File holding the container authorization token (EKS Pod Identity; re-read at every refresh).
    #[arg(long, env = "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", global = true)]
    pub aws_container_authorization_token_file: Option<String>,
    /// Skip the EC2 instance metadata service (IMDSv2) in the credential chain.
    #[arg(
        long,
        env = "AWS_EC2_METADATA_DISABLED",
        default_value = "false",
        global = true
    )]
    pub aws_ec2_metadata_disabled: String,
    /// Instance metadata endpoint (default: http://169.254.169.254).
    #[arg(long, env = "AWS_EC2_METADATA_SERVICE_ENDPOINT", global = true)]
    pub aws_ec2_metadata_service_endpoint: Option<String>,
    /// Send unsigned requests on purpose; without it, finding no credentials stops the start.
    #[arg(long, env = "S3_ANONYMOUS", default_value = "false", global = true)]
    pub s3_anonymous: String,
    /// PEM bundle of CAs (a private or self-signed CA) trusted for HTTPS to S3, STS and the credential endpoints, in addition to the system's roots.
    #[arg(long, env = "AWS_CA_BUNDLE", global = true)]
    pub aws_ca_bundle: Option<String>,
    /// Skip certificate verification for HTTPS to S3, STS and the credential endpoints (testing only; warned about at every start).
    #[arg(long, env = "S3_INSECURE_TLS", default_value = "false", global = true)]
    pub s3_insecure_tls: String,
    /// Server-side encryption of every object written: AES256 or aws:kms (empty: the bucket's default).
    #[arg(long, env = "S3_SSE", default_value = "", global = true)]
    pub s3_sse: String,
    /// KMS key for S3_SSE=aws:kms (empty: the account's AWS managed key).
    #[arg(long, env = "S3_SSE_KMS_KEY_ID", default_value = "", global = true)]
    pub s3_sse_kms_key_id: String,
    /// Storage class of every object written, e.g. STANDARD_IA, GLACIER_IR (empty: the bucket's default).
    #[arg(long, env = "S3_STORAGE_CLASS", default_value = "", global = true)]
    pub s3_storage_class: String,
    /// Object Lock mode of every object written: GOVERNANCE or COMPLIANCE (empty: none); needs S3_OBJECT_LOCK_RETAIN. Changed chunks then go to new keys, never over a locked object.
    #[arg(long, env = "S3_OBJECT_LOCK_MODE", default_value = "", global = true)]
    pub s3_object_lock_mode: String,
    /// How long each object stays locked from its upload, e.g. 30d.
    #[arg(long, env = "S3_OBJECT_LOCK_RETAIN", default_value = "", global = true)]
    pub s3_object_lock_retain: String,
    /// Tags of every object written, k=v,k2=v2 (sent as x-amz-tagging).
    #[arg(long, env = "S3_TAGS", default_value = "", global = true)]
    pub s3_tags: String,
    /// Redis URL for checkpoints, one server; rediss:// for TLS. Default redis://127.0.0.1:6379/0; leave it unset with REDIS_SENTINELS.
    #[arg(long, env = "REDIS_URL", global = true, hide_env_values = true)]
    pub redis_url: Option<String>,
    /// PEM file of the CA (private or self-signed) that signed the rediss:// server's certificate; replaces the system roots for Redis.
    #[arg(long, env = "REDIS_CA_FILE", global = true)]
    pub redis_ca_file: Option<String>,
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
    /// Redis stream that completion events (stream.completed, stream.reopened, stream.failed, ...) are appended to, e.g. chunkstream:events; empty means none.
    #[arg(long, env = "EVENTS_STREAM", default_value = "", global = true)]
    pub events_stream: String,
    /// Approximate cap on the length of EVENTS_STREAM (XADD MAXLEN ~); older entries are trimmed.
    #[arg(long, env = "EVENTS_MAXLEN", default_value = "100000", global = true)]
    pub events_maxlen: String,
    /// URL that every completion event is POSTed to as JSON, retried from a durable outbox in Redis until it answers 2xx; empty means none.
    #[arg(long, env = "WEBHOOK_URL", global = true, hide_env_values = true)]
    pub webhook_url: Option<String>,
    /// Secret for X-Chunkstream-Signature: sha256=<hex HMAC-SHA256 of the body>; empty means unsigned.
    #[arg(long, env = "WEBHOOK_SECRET", global = true, hide_env_values = true)]
    pub webhook_secret: Option<String>,
    /// Timeout of one webhook POST (connect, send and answer); a timeout is retried with backoff.
    #[arg(long, env = "WEBHOOK_TIMEOUT", default_value = "10s", global = true)]
    pub webhook_timeout: String,
    /// How long Redis keeps the record of a stream whose file is gone (deleted, moved away, replaced); complete streams stay in the bucket.
    #[arg(long, env = "RECORD_RETENTION", default_value = "7d", global = true)]
    pub record_retention: String,
    /// What happens to a file once its stream is complete and verified in S3: keep, delete, or move (to COMPLETED_DIR).
    #[arg(long, env = "ON_COMPLETE", default_value = "keep", global = true)]
    pub on_complete: String,
    /// With ON_COMPLETE=move: where completed files go, at their path under WATCH_DIR (outside WATCH_DIR; another file system works too).
    #[arg(long, env = "COMPLETED_DIR", default_value = "", global = true)]
    pub completed_dir: String,
    /// How long after completion the file is deleted or moved (a growth meanwhile reopens the stream instead).
    #[arg(long, env = "ON_COMPLETE_DELAY", default_value = "0s", global = true)]
    pub on_complete_delay: String,
}
