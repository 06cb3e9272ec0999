//! Walking the chain in the SDKs' order at start, and refreshing the
//! temporary credentials of the source it settled on ahead of expiry.

use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, SystemTime};

use log::{info, warn};
use s3::creds::Credentials;

use super::container::container_credentials;
use super::imds::instance_metadata;
use super::profile::{profile, profile_paths};
use super::web_identity::web_identity;
use super::{Fetched, RefreshHealth, Source};
use crate::config::{CredentialChain, S3Config};
use crate::error::{AppError, ConfigError};
use crate::store::https::HttpsTrust;

/// Refresh this long before expiry, or at half the lifetime when shorter.
const REFRESH_AHEAD: Duration = Duration::from_secs(300);
/// Backoff between failed refreshes: doubles from the first, up to the cap.
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_CAP: Duration = Duration::from_secs(60);
/// Timeout of each request to a credentials endpoint.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

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
        let refreshes = self
            .health
            .lock()
            .map(|guard| guard.clone())
            .unwrap_or_default();
        RefreshHealth {
            source: self.source.name(),
            expires: self.expires(),
            ..refreshes
        }
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

#[cfg(test)]
mod tests {
    use super::*;

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
