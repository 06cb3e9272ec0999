//! The AWS credential chain, and keeping temporary credentials fresh: the
//! chain and the refresh in `chain`, one file per source, and here what they
//! share.
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

use std::path::Path;
use std::time::SystemTime;

use serde::Deserialize;

mod chain;
mod container;
mod imds;
mod profile;
mod web_identity;

pub use chain::Provider;

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
    /// The source the chain settled on, as the logs name it.
    pub source: &'static str,
    /// When the current credentials expire (`None`: they do not).
    pub expires: Option<SystemTime>,
    /// Failed refresh attempts since the process started.
    pub failures: u64,
    /// The last attempt's error, `None` once a refresh succeeds.
    pub last_error: Option<String>,
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
