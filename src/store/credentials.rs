//! The AWS credential chain, and keeping temporary credentials fresh.
//!
//! aws-creds 0.40 (under rust-s3) hard-codes the STS host and sends
//! `AssumeRoleWithWebIdentity` as a GET that STS implementations other than
//! AWS ignore, and it refreshes only when a request finds the credentials
//! already expired. So the chain is walked here, in the AWS SDKs' order, with
//! ureq (with the S3 client's TLS trust, so a private CA in `AWS_CA_BUNDLE`
//! covers STS and the container endpoint too); aws-creds supplies only the
//! `Credentials` value rust-s3 signs with.
//!
//! [`Provider::current`] is read for every request, so a refresh swaps the
//! credentials under a lock without pausing anything: requests signed before
//! the swap keep a signature that stays valid until the old credentials
//! expire, which a refresh ahead of expiry leaves minutes away.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, SystemTime};

use log::{info, warn};
use s3::creds::Credentials;
use serde::Deserialize;

use super::https::HttpsTrust;
use super::s3::{percent_encode, xml_value};
use crate::config::{ContainerEndpoint, CredentialChain, S3Config, WebIdentity};
use crate::error::{AppError, ConfigError};

/// Refresh this long before expiry, or at half the lifetime when shorter.
const REFRESH_AHEAD: Duration = Duration::from_secs(300);
/// Backoff between failed refreshes: doubles from the first, up to the cap.
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_CAP: Duration = Duration::from_secs(60);
/// Timeout of each request to a credentials endpoint.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The instance-metadata service answers at once or not at all.
const IMDS_TIMEOUT: Duration = Duration::from_secs(2);

/// One place credentials come from, named as in the logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Environment,
    WebIdentity,
    Profile,
    Container,
    InstanceMetadata,
}

impl Source {
    pub fn name(self) -> &'static str {
        match self {
            Source::Environment => "environment",
            Source::WebIdentity => "web identity",
            Source::Profile => "shared profile",
            Source::Container => "container credentials",
            Source::InstanceMetadata => "EC2 instance metadata",
        }
    }
}

/// A key pair, with the session token and expiry of temporary credentials.
#[derive(Clone)]
struct Fetched {
    access_key_id: String,
    secret_access_key: String,
    session_token: Option<String>,
    expires: Option<SystemTime>,
}

/// The JSON the container endpoint and IMDS answer with.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct JsonCredentials {
    access_key_id: String,
    secret_access_key: String,
    token: Option<String>,
    expiration: Option<String>,
}

/// The outcome of the last refresh, for `/readyz` and the metrics.
#[derive(Debug, Clone, Default)]
pub struct RefreshHealth {
    /// Failed refresh attempts since the process started.
    pub failures: u64,
    /// The last attempt's error, `None` once a refresh succeeds.
    pub last_error: Option<String>,
}

/// The current credentials of the source the chain settled on.
pub struct Provider {
    source: Source,
    chain: CredentialChain,
    agent: ureq::Agent,
    current: RwLock<(Credentials, Fetched)>,
    obtained: Mutex<SystemTime>,
    health: Mutex<RefreshHealth>,
}

impl Provider {
    /// Walks the chain. `Ok(None)` means anonymous (`S3_ANONYMOUS=true`).
    /// No credentials at all is a configuration error (exit 2) listing the
    /// sources tried; a source that is configured but fails stops the start.
    pub fn resolve(config: &S3Config, trust: &HttpsTrust) -> Result<Option<Arc<Self>>, AppError> {
        if config.anonymous {
            info!("credentials: none, S3_ANONYMOUS=true (requests are unsigned)");
            return Ok(None);
        }
        let chain = config.chain.clone();
        let agent = trust.agent(REQUEST_TIMEOUT);
        let mut tried = Vec::new();
        let mut found = None;
        if let Some(pair) = &config.credentials {
            found = Some((
                Source::Environment,
                Fetched {
                    access_key_id: pair.access_key_id.clone(),
                    secret_access_key: pair.secret_access_key.clone(),
                    session_token: pair.session_token.clone(),
                    expires: None,
                },
            ));
        }
        tried.push("environment (AWS_ACCESS_KEY_ID)".to_string());
        for source in [
            Source::WebIdentity,
            Source::Profile,
            Source::Container,
            Source::InstanceMetadata,
        ] {
            if found.is_some() {
                break;
            }
            match fetch(source, &chain, &agent) {
                Ok(Some(fetched)) => found = Some((source, fetched)),
                Ok(None) => tried.push(describe(source, &chain)),
                Err(err) => {
                    return Err(AppError::Startup(format!(
                        "credentials from {}: {err}",
                        describe(source, &chain)
                    )));
                }
            }
        }
        let Some((source, fetched)) = found else {
            return Err(AppError::Config(ConfigError {
                variable: "S3_ANONYMOUS",
                reason: format!(
                    "no AWS credentials found; tried {}. Provide credentials, or set S3_ANONYMOUS=true for unsigned requests",
                    tried.join(", ")
                ),
            }));
        };
        info!(
            "credentials: {}, access key id {}{}",
            describe(source, &chain),
            fetched.access_key_id,
            match fetched.expires {
                Some(at) => format!(
                    ", temporary until {}",
                    humantime::format_rfc3339_seconds(at)
                ),
                None => String::new(),
            }
        );
        let provider = Arc::new(Self {
            source,
            chain,
            agent,
            current: RwLock::new((signing(&fetched)?, fetched)),
            obtained: Mutex::new(SystemTime::now()),
            health: Mutex::new(RefreshHealth::default()),
        });
        if provider.expires().is_some() {
            let weak = Arc::downgrade(&provider);
            std::thread::Builder::new()
                .name("credentials".into())
                .spawn(move || refresh_loop(weak))
                .map_err(|err| AppError::Startup(format!("credentials refresh thread: {err}")))?;
        }
        Ok(Some(provider))
    }

    /// The credentials to sign the next request with.
    pub fn current(&self) -> Credentials {
        self.current
            .read()
            .map(|guard| guard.0.clone())
            .unwrap_or_else(|poisoned| poisoned.into_inner().0.clone())
    }

    pub fn health(&self) -> RefreshHealth {
        self.health
            .lock()
            .map(|guard| guard.clone())
            .unwrap_or_default()
    }

    fn expires(&self) -> Option<SystemTime> {
        self.current.read().ok().and_then(|guard| guard.1.expires)
    }

    /// When to refresh: 5 minutes before expiry, or at half the lifetime
    /// when that is sooner.
    fn refresh_at(&self) -> Option<SystemTime> {
        let expires = self.expires()?;
        let obtained = self.obtained.lock().map(|at| *at).ok()?;
        let lifetime = expires.duration_since(obtained).unwrap_or_default();
        Some(expires - REFRESH_AHEAD.min(lifetime / 2))
    }

    fn refresh(&self) -> Result<(), String> {
        let fetched = fetch(self.source, &self.chain, &self.agent)?
            .ok_or_else(|| format!("{} no longer has credentials", self.source.name()))?;
        // A source that has not rotated yet answers the same credentials:
        // try again after a backoff rather than in a tight loop.
        if let (Some(new), Some(old)) = (fetched.expires, self.expires())
            && new <= old
        {
            return Err(format!(
                "{} answered credentials that still expire at {}",
                self.source.name(),
                humantime::format_rfc3339_seconds(new)
            ));
        }
        let credentials = signing(&fetched).map_err(|err| err.to_string())?;
        info!(
            "credentials: refreshed from {}{}",
            self.source.name(),
            fetched
                .expires
                .map(|at| format!(", valid until {}", humantime::format_rfc3339_seconds(at)))
                .unwrap_or_default()
        );
        if let Ok(mut obtained) = self.obtained.lock() {
            *obtained = SystemTime::now();
        }
        if let Ok(mut current) = self.current.write() {
            *current = (credentials, fetched);
        }
        Ok(())
    }

    fn record(&self, outcome: &Result<(), String>) {
        if let Ok(mut health) = self.health.lock() {
            match outcome {
                Ok(()) => health.last_error = None,
                Err(err) => {
                    health.failures += 1;
                    health.last_error = Some(err.clone());
                }
            }
        }
    }
}

/// Refreshes ahead of expiry until the provider is dropped; a failure is
/// retried with capped exponential backoff.
fn refresh_loop(provider: Weak<Provider>) {
    let mut backoff = RETRY_FIRST;
    loop {
        let wait = {
            let Some(provider) = provider.upgrade() else {
                return;
            };
            let Some(at) = provider.refresh_at() else {
                return;
            };
            at.duration_since(SystemTime::now()).unwrap_or_default()
        };
        // Sleep in steps so a dropped provider ends the thread soon.
        if !wait.is_zero() {
            std::thread::sleep(wait.min(Duration::from_secs(5)));
            continue;
        }
        let Some(provider) = provider.upgrade() else {
            return;
        };
        let outcome = provider.refresh();
        provider.record(&outcome);
        match outcome {
            Ok(()) => backoff = RETRY_FIRST,
            Err(err) => {
                warn!(
                    "credentials: refreshing from {} failed: {err}; retrying in {}s",
                    provider.source.name(),
                    backoff.as_secs()
                );
                drop(provider);
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(RETRY_CAP);
            }
        }
    }
}

/// rust-s3's credentials. No expiry is set on purpose: rust-s3 would then
/// "refresh" them through aws-creds' own chain; the refresh is ours.
fn signing(fetched: &Fetched) -> Result<Credentials, AppError> {
    Credentials::new(
        Some(&fetched.access_key_id),
        Some(&fetched.secret_access_key),
        fetched.session_token.as_deref(),
        None,
        None,
    )
    .map_err(|err| AppError::Startup(format!("credentials: {err}")))
}

/// What a source is, with the settings that point at it (never a secret).
fn describe(source: Source, chain: &CredentialChain) -> String {
    match source {
        Source::Environment => "environment (AWS_ACCESS_KEY_ID)".into(),
        Source::WebIdentity => match &chain.web_identity {
            Some(web) => format!(
                "web identity (role {} at {})",
                web.role_arn, web.sts_endpoint
            ),
            None => "web identity (AWS_ROLE_ARN unset)".into(),
        },
        Source::Profile => format!(
            "shared profile {:?} ({})",
            chain.profile,
            profile_paths(chain)
                .iter()
                .map(|path| path.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Source::Container => match &chain.container {
            Some(container) => format!("container credentials ({})", container.uri),
            None => "container credentials (AWS_CONTAINER_CREDENTIALS_*_URI unset)".into(),
        },
        Source::InstanceMetadata => match &chain.imds_endpoint {
            Some(endpoint) => format!("EC2 instance metadata ({endpoint})"),
            None => "EC2 instance metadata (AWS_EC2_METADATA_DISABLED=true)".into(),
        },
    }
}

/// `Ok(None)`: the source is not configured (or, for IMDS, not there).
fn fetch(
    source: Source,
    chain: &CredentialChain,
    agent: &ureq::Agent,
) -> Result<Option<Fetched>, String> {
    match source {
        Source::Environment => Ok(None),
        Source::WebIdentity => chain
            .web_identity
            .as_ref()
            .map(|web| web_identity(web, agent))
            .transpose(),
        Source::Profile => profile(chain),
        Source::Container => chain
            .container
            .as_ref()
            .map(|container| container_credentials(container, agent))
            .transpose(),
        Source::InstanceMetadata => match &chain.imds_endpoint {
            Some(endpoint) => Ok(instance_metadata(endpoint, agent)),
            None => Ok(None),
        },
    }
}

fn read_trimmed(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path)
        .map(|text| text.trim().to_string())
        .map_err(|err| format!("reading {}: {err}", path.display()))
}

fn parse_expiry(value: &str) -> Result<SystemTime, String> {
    humantime::parse_rfc3339_weak(value.trim().trim_end_matches('Z'))
        .map_err(|err| format!("expiration {value:?}: {err}"))
}

/// `AssumeRoleWithWebIdentity`, POSTed as a form as the AWS SDKs do (an
/// unsigned call: the token is the proof).
fn web_identity(web: &WebIdentity, agent: &ureq::Agent) -> Result<Fetched, String> {
    let token = read_trimmed(&web.token_file)?;
    let form = format!(
        "Action=AssumeRoleWithWebIdentity&Version=2011-06-15&RoleArn={}&RoleSessionName={}&WebIdentityToken={}",
        percent_encode(&web.role_arn, b""),
        percent_encode(&web.session_name, b""),
        percent_encode(&token, b"")
    );
    let mut response = agent
        .post(&format!("{}/", web.sts_endpoint))
        .header("content-type", "application/x-www-form-urlencoded")
        .send(form.as_bytes())
        .map_err(|err| format!("STS at {}: {err}", web.sts_endpoint))?;
    let status = response.status().as_u16();
    let body = response.body_mut().read_to_string().unwrap_or_default();
    if status != 200 {
        return Err(format!(
            "STS at {} answered HTTP {status}: {}",
            web.sts_endpoint,
            xml_value(&body, "Message").unwrap_or_else(|| body.chars().take(200).collect())
        ));
    }
    let field = |tag: &str| xml_value(&body, tag).ok_or_else(|| format!("STS answer has no {tag}"));
    Ok(Fetched {
        access_key_id: field("AccessKeyId")?,
        secret_access_key: field("SecretAccessKey")?,
        session_token: Some(field("SessionToken")?),
        expires: Some(parse_expiry(&field("Expiration")?)?),
    })
}

/// The JSON answer of the container endpoint or IMDS.
fn from_json(body: &str, what: &str) -> Result<Fetched, String> {
    let json: JsonCredentials =
        serde_json::from_str(body).map_err(|err| format!("{what} answer: {err}"))?;
    Ok(Fetched {
        access_key_id: json.access_key_id,
        secret_access_key: json.secret_access_key,
        session_token: json.token.filter(|token| !token.is_empty()),
        expires: json.expiration.as_deref().map(parse_expiry).transpose()?,
    })
}

/// ECS task roles and EKS Pod Identity: a GET with the authorization token.
fn container_credentials(
    container: &ContainerEndpoint,
    agent: &ureq::Agent,
) -> Result<Fetched, String> {
    let token = match (&container.token_file, &container.token) {
        (Some(file), _) => Some(read_trimmed(file)?),
        (None, token) => token.clone(),
    };
    let mut request = agent.get(&container.uri);
    if let Some(token) = &token {
        request = request.header("authorization", token);
    }
    let mut response = request
        .call()
        .map_err(|err| format!("{}: {err}", container.uri))?;
    let status = response.status().as_u16();
    let body = response.body_mut().read_to_string().unwrap_or_default();
    if status != 200 {
        return Err(format!("{} answered HTTP {status}", container.uri));
    }
    from_json(&body, &container.uri)
}

/// IMDSv2: a session token, the role name, then the role's credentials.
/// Any failure means "not on EC2" (`None`), as in the SDKs.
fn instance_metadata(endpoint: &str, agent: &ureq::Agent) -> Option<Fetched> {
    let token = agent
        .put(&format!("{endpoint}/latest/api/token"))
        .config()
        .timeout_global(Some(IMDS_TIMEOUT))
        .build()
        .header("x-aws-ec2-metadata-token-ttl-seconds", "21600")
        .send_empty()
        .ok()
        .filter(|response| response.status() == 200)?
        .body_mut()
        .read_to_string()
        .ok()?;
    let get = |path: &str| -> Option<String> {
        let mut response = agent
            .get(&format!(
                "{endpoint}/latest/meta-data/iam/security-credentials/{path}"
            ))
            .header("x-aws-ec2-metadata-token", &token)
            .call()
            .ok()?;
        (response.status() == 200).then_some(())?;
        response.body_mut().read_to_string().ok()
    };
    let role = get("")?.lines().next()?.trim().to_string();
    match from_json(&get(&role)?, "instance metadata") {
        Ok(fetched) => Some(fetched),
        Err(err) => {
            warn!("credentials: {err}");
            None
        }
    }
}

/// The credentials file, then the config file (where the section of a
/// profile other than `default` is `[profile NAME]`).
fn profile_paths(chain: &CredentialChain) -> Vec<PathBuf> {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    vec![
        chain
            .shared_credentials_file
            .clone()
            .unwrap_or_else(|| home.join(".aws/credentials")),
        chain
            .config_file
            .clone()
            .unwrap_or_else(|| home.join(".aws/config")),
    ]
}

/// Static keys from the shared files. Profiles that assume a role or run a
/// process are not followed: they fail clearly rather than silently.
fn profile(chain: &CredentialChain) -> Result<Option<Fetched>, String> {
    let paths = profile_paths(chain);
    let sections = [
        chain.profile.clone(),
        if chain.profile == "default" {
            "default".to_string()
        } else {
            format!("profile {}", chain.profile)
        },
    ];
    for (path, section) in paths.iter().zip(sections) {
        let Ok(text) = std::fs::read_to_string(path) else {
            continue;
        };
        let Some(values) = ini_section(&text, &section) else {
            continue;
        };
        match (
            values.get("aws_access_key_id"),
            values.get("aws_secret_access_key"),
        ) {
            (Some(id), Some(secret)) => {
                return Ok(Some(Fetched {
                    access_key_id: id.clone(),
                    secret_access_key: secret.clone(),
                    session_token: values.get("aws_session_token").cloned(),
                    expires: None,
                }));
            }
            _ if values.keys().any(|key| {
                matches!(
                    key.as_str(),
                    "role_arn" | "credential_process" | "sso_session" | "sso_start_url"
                )
            }) =>
            {
                return Err(format!(
                    "profile {:?} in {} assumes a role or uses SSO or a credential process, which chunkstream does not follow; give it static keys, or use web identity or container credentials",
                    chain.profile,
                    path.display()
                ));
            }
            _ => {}
        }
    }
    Ok(None)
}

/// The `key = value` pairs of `[section]` in an INI file.
fn ini_section(text: &str, section: &str) -> Option<HashMap<String, String>> {
    let mut current: Option<&str> = None;
    let mut values: Option<HashMap<String, String>> = None;
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = Some(name.trim());
            if current == Some(section) {
                values.get_or_insert_with(HashMap::new);
            }
            continue;
        }
        if current == Some(section)
            && let (Some(map), Some((key, value))) = (values.as_mut(), line.split_once('='))
        {
            map.insert(key.trim().to_ascii_lowercase(), value.trim().to_string());
        }
    }
    values
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ini_sections_are_read_by_name() {
        let text = "[default]\naws_access_key_id = A\n# note\n[profile cam]\nAWS_SECRET_ACCESS_KEY=s = x\n";
        assert_eq!(
            ini_section(text, "default").unwrap()["aws_access_key_id"],
            "A"
        );
        assert_eq!(
            ini_section(text, "profile cam").unwrap()["aws_secret_access_key"],
            "s = x"
        );
        assert!(ini_section(text, "other").is_none());
    }

    #[test]
    fn container_json_keeps_the_token_and_expiry() {
        let fetched = from_json(
            r#"{"AccessKeyId":"AK","SecretAccessKey":"S","Token":"T","Expiration":"2030-01-02T03:04:05Z"}"#,
            "test",
        )
        .unwrap();
        assert_eq!(fetched.session_token.as_deref(), Some("T"));
        assert_eq!(
            fetched.expires,
            Some(humantime::parse_rfc3339("2030-01-02T03:04:05Z").unwrap())
        );
    }

    #[test]
    fn refresh_comes_five_minutes_early_or_at_half_life() {
        let provider = |lifetime: Duration| {
            let now = SystemTime::now();
            let fetched = Fetched {
                access_key_id: "AK".into(),
                secret_access_key: "S".into(),
                session_token: None,
                expires: Some(now + lifetime),
            };
            let provider = Provider {
                source: Source::Container,
                chain: CredentialChain::default(),
                agent: ureq::Agent::new_with_defaults(),
                current: RwLock::new((signing(&fetched).unwrap(), fetched)),
                obtained: Mutex::new(now),
                health: Mutex::new(RefreshHealth::default()),
            };
            provider.refresh_at().unwrap().duration_since(now).unwrap()
        };
        assert_eq!(
            provider(Duration::from_secs(3600)),
            Duration::from_secs(3300)
        );
        assert_eq!(provider(Duration::from_secs(100)), Duration::from_secs(50));
    }
}
