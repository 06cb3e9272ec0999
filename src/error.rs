//! Typed errors with the context an operator needs (variable, path, key).
//!
//! Library code returns these; only `main` flattens them into a message and an
//! exit code. Configuration errors are their own type because they map to exit
//! code 2 and must name the offending variable.

use std::path::PathBuf;

/// A setting that failed validation. The message always names the variable.
#[derive(Debug, thiserror::Error)]
#[error("invalid {variable}: {reason}")]
pub struct ConfigError {
    /// The environment variable (also the flag's env name) that was rejected.
    pub variable: &'static str,
    /// Why, including the offending value unless the value is a secret.
    pub reason: String,
}

impl ConfigError {
    /// An error for `variable` whose message quotes the rejected `value`.
    pub fn bad_value(variable: &'static str, value: &str, why: impl std::fmt::Display) -> Self {
        Self {
            variable,
            reason: format!("{value:?}: {why}"),
        }
    }
}

/// Failures talking to the object store.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("S3 request for {key:?} timed out")]
    Timeout { key: String },
    #[error("cannot connect to S3 endpoint {endpoint}: {detail}")]
    Connect { endpoint: String, detail: String },
    /// The TLS handshake failed: most often a certificate that is not
    /// trusted (a private CA without `AWS_CA_BUNDLE`).
    #[error("TLS to S3 endpoint {endpoint} failed (certificate or handshake): {detail}")]
    Tls { endpoint: String, detail: String },
    #[error("S3 answered HTTP {status} for {key:?}: {body}")]
    Http {
        status: u16,
        key: String,
        body: String,
    },
    #[error("S3 request for {key:?} failed: {detail}")]
    Other { key: String, detail: String },
    /// The server refused the body as corrupted (checksum or Content-MD5
    /// mismatch), or stored something other than what was sent.
    #[error("S3 integrity check failed for {key:?}: {detail}")]
    Corrupted { key: String, detail: String },
}

impl StorageError {
    /// The small, fixed set of labels used for the `upload_errors_total` metric.
    pub fn kind(&self) -> &'static str {
        match self {
            StorageError::Timeout { .. } => "timeout",
            StorageError::Connect { .. } => "connect",
            StorageError::Tls { .. } => "tls",
            StorageError::Http { status, .. } if *status >= 500 => "http_5xx",
            StorageError::Http { .. } => "http_4xx",
            StorageError::Other { .. } => "other",
            StorageError::Corrupted { .. } => "integrity",
        }
    }

    /// A 4xx answer (or a stored body that failed its check): the request
    /// itself was refused, so the store is up.
    pub fn is_client_error(&self) -> bool {
        matches!(self, StorageError::Http { status, .. } if (400..500).contains(status))
            || matches!(self, StorageError::Corrupted { .. })
    }

    /// Whether the object is definitely absent (as opposed to unreachable).
    pub fn is_not_found(&self) -> bool {
        matches!(self, StorageError::Http { status: 404, .. })
    }
}

/// Failures talking to the checkpoint store.
#[derive(Debug, thiserror::Error)]
#[error("Redis at {url}: {detail}")]
pub struct CheckpointError {
    /// The Redis URL with any password removed.
    pub url: String,
    pub detail: String,
}

/// Why a write that only the stream's lease holder may make was not made.
#[derive(Debug, thiserror::Error)]
pub enum FencedWriteError {
    /// Another replica claimed the stream since this process did (or the
    /// stream's record is gone): this process must stop writing for it.
    #[error("this replica no longer holds the stream's lease")]
    LeaseLost,
    /// Redis could not be reached; the write may be retried.
    #[error(transparent)]
    Unavailable(#[from] CheckpointError),
}

/// Failures reading a source file.
#[derive(Debug, thiserror::Error)]
#[error("reading {path}: {source}")]
pub struct SourceError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// Anything that can stop a command (`run`, `restore`) as a whole.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("{0}")]
    Startup(String),
    #[error("{0}")]
    Integrity(String),
    #[error("writing {path}: {source}")]
    Output {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}
