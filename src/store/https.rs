//! The one place the daemon's HTTPS clients get their trust settings.
//!
//! Every request to S3 and to the AWS credential endpoints (STS, the
//! container endpoint, instance metadata) goes through a ureq agent built
//! here, so `AWS_CA_BUNDLE` and `S3_INSECURE_TLS` hold for all of them. rust-s3
//! only signs: its own transport (attohttpc) cannot take a private CA.

use std::sync::Arc;
use std::time::Duration;

use log::warn;
use ureq::tls::{Certificate, PemItem, RootCerts, TlsConfig};

use crate::config::S3Tls;
use crate::error::{AppError, ConfigError};

/// The TLS settings of every S3 and credential client: read once at start.
#[derive(Clone)]
pub struct HttpsTrust {
    tls: Arc<TlsConfig>,
}

impl HttpsTrust {
    /// Reads `AWS_CA_BUNDLE` (a file that cannot be read, or holds no
    /// certificate, is a configuration error) and warns about
    /// `S3_INSECURE_TLS`.
    pub fn new(setting: &S3Tls) -> Result<Self, AppError> {
        let tls = match setting {
            S3Tls::WebRoots => TlsConfig::default(),
            S3Tls::Insecure => {
                warn!(
                    "S3_INSECURE_TLS=true: the certificates of S3, STS and the credential endpoints are NOT verified; anyone on the path can read and change the uploads"
                );
                TlsConfig::builder().disable_verification(true).build()
            }
            S3Tls::CaBundle(path) => {
                let bad = |reason: String| {
                    AppError::Config(ConfigError {
                        variable: "AWS_CA_BUNDLE",
                        reason: format!("{}: {reason}", path.display()),
                    })
                };
                let pem = std::fs::read(path).map_err(|err| bad(err.to_string()))?;
                let bundle = bundle_certificates(&pem).map_err(bad)?;
                let system = rustls_native_certs::load_native_certs();
                for err in &system.errors {
                    warn!("loading the system's CA certificates: {err}");
                }
                let roots: Vec<Certificate<'static>> = system
                    .certs
                    .iter()
                    .map(|der| Certificate::from_der(der).to_owned())
                    .chain(bundle)
                    .collect();
                TlsConfig::builder()
                    .root_certs(RootCerts::new_with_certs(&roots))
                    .build()
            }
        };
        Ok(Self { tls: Arc::new(tls) })
    }

    /// An agent whose requests each end within `timeout`. Non-2xx answers
    /// are answers, not errors: the callers classify them.
    pub fn agent(&self, timeout: Duration) -> ureq::Agent {
        ureq::Agent::config_builder()
            .tls_config(self.tls.as_ref().clone())
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            .build()
            .into()
    }
}

/// The certificates of a PEM bundle; none at all is an error.
fn bundle_certificates(pem: &[u8]) -> Result<Vec<Certificate<'static>>, String> {
    let mut certificates = Vec::new();
    for item in ureq::tls::parse_pem(pem) {
        match item.map_err(|err| format!("not a PEM bundle: {err}"))? {
            PemItem::Certificate(certificate) => certificates.push(certificate),
            _ => continue,
        }
    }
    if certificates.is_empty() {
        return Err("no certificate in the bundle".into());
    }
    Ok(certificates)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bundle_without_certificates_is_refused() {
        assert!(bundle_certificates(b"").is_err());
        assert!(bundle_certificates(b"just text\n").is_err());
    }

    #[test]
    fn an_unreadable_bundle_names_the_variable() {
        let err = HttpsTrust::new(&S3Tls::CaBundle("/nonexistent/ca.pem".into()))
            .err()
            .expect("refused");
        assert!(err.to_string().contains("AWS_CA_BUNDLE"), "{err}");
    }
}
