//! The completion-event settings: where events go (`EVENTS_STREAM`,
//! `WEBHOOK_URL`) and how (`EVENTS_MAXLEN`, `WEBHOOK_SECRET`,
//! `WEBHOOK_TIMEOUT`), validated with the variable named in every refusal.

use super::*;

/// Where completion events are delivered; with neither destination, no
/// event is queued at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventsConfig {
    /// The Redis stream key events are appended to (`EVENTS_STREAM`).
    pub stream: Option<String>,
    /// Approximate cap on the stream's length (`EVENTS_MAXLEN`).
    pub max_len: u64,
    pub webhook: Option<WebhookConfig>,
}

/// `WEBHOOK_URL` and how to call it.
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookConfig {
    pub url: String,
    /// Signs each body with HMAC-SHA256 when set.
    pub secret: Option<String>,
    /// For the whole request.
    pub timeout: Duration,
}

/// Never prints the secret, nor a password in the URL.
impl std::fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("url", &redact_url(&self.url))
            .field("secret", &self.secret.as_ref().map(|_| "***"))
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl EventsConfig {
    /// Whether any destination is configured (events are queued at all).
    pub fn enabled(&self) -> bool {
        self.stream.is_some() || self.webhook.is_some()
    }

    pub(super) fn from_settings(settings: &Settings) -> Result<Self, ConfigError> {
        let stream = settings.events_stream.trim();
        if stream.contains(char::is_whitespace) {
            return Err(ConfigError::bad_value(
                "EVENTS_STREAM",
                &settings.events_stream,
                "a Redis key without spaces, e.g. chunkstream:events (empty: no stream)",
            ));
        }
        let max_len = match settings.events_maxlen.trim().parse::<u64>() {
            Ok(max_len) if max_len > 0 => max_len,
            _ => {
                return Err(ConfigError::bad_value(
                    "EVENTS_MAXLEN",
                    &settings.events_maxlen,
                    "expected a whole number of entries, at least 1",
                ));
            }
        };
        let url = settings.webhook_url.as_deref().unwrap_or("").trim();
        let secret = settings
            .webhook_secret
            .as_deref()
            .filter(|secret| !secret.is_empty());
        let timeout = parse_duration("WEBHOOK_TIMEOUT", &settings.webhook_timeout)?;
        let webhook = if url.is_empty() {
            if secret.is_some() {
                return Err(ConfigError::bad_value(
                    "WEBHOOK_SECRET",
                    "***",
                    "is set but WEBHOOK_URL is not",
                ));
            }
            None
        } else {
            Some(WebhookConfig {
                url: parse_webhook_url(url)?,
                secret: secret.map(str::to_string),
                timeout,
            })
        };
        Ok(Self {
            stream: (!stream.is_empty()).then(|| stream.to_string()),
            max_len,
            webhook,
        })
    }
}

/// An absolute http(s) URL with a host.
fn parse_webhook_url(url: &str) -> Result<String, ConfigError> {
    let refuse = |why: &str| ConfigError::bad_value("WEBHOOK_URL", &redact_url(url), why);
    let uri: http::Uri = url
        .parse()
        .map_err(|err| refuse(&format!("not a URL: {err}")))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err(refuse("expected an http:// or https:// URL")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(refuse("the URL has no host"));
    }
    Ok(url.to_string())
}
