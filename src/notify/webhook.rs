//! The webhook: one HTTP POST per event, signed with HMAC-SHA256 when
//! `WEBHOOK_SECRET` is set, with `WEBHOOK_TIMEOUT` on the whole request.
//!
//! Only a 2xx answer counts as delivered; anything else (another status, a
//! timeout, a refused connection) is a failed attempt that the delivery loop
//! retries from the outbox with backoff.

use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use super::event::Announcement;

/// The header names, a contract with receivers (docs/events.md).
pub const EVENT_HEADER: &str = "X-Chunkstream-Event";
pub const DELIVERY_HEADER: &str = "X-Chunkstream-Delivery";
pub const SIGNATURE_HEADER: &str = "X-Chunkstream-Signature";

/// `sha256=<hex HMAC-SHA256 of body under secret>`.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Posts events to one URL.
pub struct Webhook {
    url: String,
    secret: Option<Vec<u8>>,
    agent: ureq::Agent,
}

impl Webhook {
    pub fn new(url: &str, secret: Option<&str>, timeout: Duration) -> Self {
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            .build()
            .into();
        Self {
            url: url.to_string(),
            secret: secret.map(|secret| secret.as_bytes().to_vec()),
            agent,
        }
    }

    /// POSTs the event; `Err` says why it did not count as delivered.
    pub fn deliver(&self, event: &Announcement) -> Result<(), String> {
        let body = event.json.as_bytes();
        let mut request = self
            .agent
            .post(&self.url)
            .header("Content-Type", "application/json")
            .header(EVENT_HEADER, event.kind.as_str())
            .header(DELIVERY_HEADER, &event.id);
        if let Some(secret) = &self.secret {
            request = request.header(SIGNATURE_HEADER, signature(secret, body));
        }
        let mut response = request.send(body).map_err(|err| err.to_string())?;
        let status = response.status();
        // Read (a bounded part of) the body so the answer is complete.
        let _ = response
            .body_mut()
            .with_config()
            .limit(64 * 1024)
            .read_to_vec();
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("answered HTTP {}", status.as_u16()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_the_hex_hmac_sha256_of_the_body() {
        // RFC 4231, test case 2.
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn a_different_secret_or_body_gives_another_signature() {
        let body = br#"{"id":"cam1-3f9a0c1b2d4e/1/stream.completed"}"#;
        let signed = signature(b"secret", body);
        assert_ne!(signed, signature(b"secret2", body));
        assert_ne!(signed, signature(b"secret", b"{}"));
    }
}
