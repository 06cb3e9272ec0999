//! How to reach the two stores: the S3 bucket (endpoint, credentials,
//! integrity options) and Redis (one server or Sentinel), each validated
//! from [`Settings`] with errors that name the variable.

use super::*;

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
    /// `S3_ANONYMOUS`: unsigned requests are intended.
    pub anonymous: bool,
    /// Where to look for credentials after the environment.
    pub chain: CredentialChain,
    pub policy: ObjectPolicy,
    pub tls: S3Tls,
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
    pub session_token: Option<String>,
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
            .field("anonymous", &self.anonymous)
            .field("chain", &self.chain)
            .field("policy", &self.policy)
            .field("tls", &self.tls)
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
    /// `REDIS_CA_FILE`: the CA the `rediss://` server's certificate is
    /// checked against.
    pub ca_file: Option<PathBuf>,
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
                session_token: given(&settings.aws_session_token).map(str::to_string),
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
            anonymous: parse_bool("S3_ANONYMOUS", &settings.s3_anonymous)?,
            chain: CredentialChain::from_settings(settings)?,
            policy: ObjectPolicy::from_settings(settings)?,
            tls: S3Tls::from_settings(settings)?,
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
pub(super) fn given(value: &Option<String>) -> Option<&str> {
    value.as_deref().map(str::trim).filter(|v| !v.is_empty())
}

impl SentinelConfig {
    /// `None` in single-server mode (`REDIS_URL`). Exactly one mode: the
    /// Sentinel settings without `REDIS_SENTINELS`, or `REDIS_URL` with it,
    /// are errors that name the variable.
    pub(super) fn from_settings(settings: &Settings) -> Result<Option<Self>, ConfigError> {
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

/// The single-server default of `REDIS_URL`.
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379/0";

impl RedisConfig {
    /// `REDIS_URL`, or with `sentinel` a description of it (validated by
    /// [`SentinelConfig::from_settings`]).
    pub(super) fn from_settings(
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
        let ca_file = given(&settings.redis_ca_file).map(PathBuf::from);
        if let Some(sentinel) = sentinel {
            if ca_file.is_some() {
                return Err(ConfigError {
                    variable: "REDIS_CA_FILE",
                    reason: "not supported with REDIS_SENTINELS yet; use REDIS_URL=rediss://"
                        .into(),
                });
            }
            return Ok(Self {
                url: sentinel.describe(),
                key_prefix,
                timeout,
                ca_file,
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
        if ca_file.is_some() && !url.starts_with("rediss://") {
            return Err(ConfigError {
                variable: "REDIS_CA_FILE",
                reason: format!("only with a rediss:// REDIS_URL, not {shown}"),
            });
        }
        Ok(Self {
            url,
            key_prefix,
            timeout,
            ca_file,
        })
    }
}
