//! How every S3 request travels: rust-s3 signs it, the store's ureq agent
//! (built with the daemon's TLS trust, see `store::https`) sends it, and the
//! answer is classified here into the errors the callers retry or report.
//!
//! rust-s3's own transport (attohttpc) cannot trust a private CA, so it is
//! never used: requests rust-s3 can express are signed as rust-s3 would send
//! them (its `AttoRequest` yields the URL, the signed headers and the body);
//! the others (chunk PUTs straight from the caller's buffer, UploadPartCopy,
//! CreateBucket without a `us-east-1` constraint) go out through URLs rust-s3
//! presigns.

use std::io;

use http::header::CONTENT_LENGTH;
use http::{HeaderMap, HeaderValue, Method};
use s3::Bucket;
use s3::command::{Command, HttpMethod};
use s3::error::S3Error;
use s3::request::Request as _;
use s3::request::blocking::AttoRequest;

use super::{S3Store, xml_value};
use crate::config::S3Config;
use crate::error::StorageError;

/// A server's answer, whatever its status.
pub(super) struct Answer {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The answer of a 2xx, else the error it stands for; a refusal of the
    /// body as corrupted is [`StorageError::Corrupted`].
    pub fn success(self, key: &str) -> Result<Answer, StorageError> {
        if (200..300).contains(&self.status) {
            return Ok(self);
        }
        let summary = summarize_body(&self.text());
        if self.status == 400
            && CORRUPTION_CODES
                .iter()
                .any(|code| summary.starts_with(code))
        {
            return Err(StorageError::Corrupted {
                key: key.to_string(),
                detail: summary,
            });
        }
        Err(StorageError::Http {
            status: self.status,
            key: key.to_string(),
            body: summary,
        })
    }

    /// The body of a 2xx answer that is not an error document: S3 may
    /// answer a copy or a completion with 200 and an error, retried as a 5xx.
    pub fn document(self, key: &str) -> Result<String, StorageError> {
        let body = self.success(key)?.text();
        if body.contains("<Error>") {
            return Err(StorageError::Http {
                status: 500,
                key: key.to_string(),
                body: summarize_body(&body),
            });
        }
        Ok(body)
    }

    /// A header's value, if it is text.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|value| value.to_str().ok())
            .map(str::to_string)
    }
}

/// The error codes servers answer a body that fails its checksum or
/// Content-MD5 with (AWS, MinIO, Ceph RGW, s3s, moto).
const CORRUPTION_CODES: [&str; 4] = [
    "BadDigest",
    "InvalidDigest",
    "XAmzContentChecksumMismatch",
    "XAmzContentSHA256Mismatch",
];

impl S3Store {
    /// Sends `command` on `path` (a key, or `/` for the bucket) as rust-s3
    /// signs it, with the current credentials.
    pub(super) fn send(&self, path: &str, command: Command<'_>) -> Result<Answer, StorageError> {
        self.send_signed_by(&self.bucket(), path, command)
    }

    /// [`S3Store::send`] with a bucket that adds headers of its own.
    pub(super) fn send_signed_by(
        &self,
        bucket: &Bucket,
        path: &str,
        command: Command<'_>,
    ) -> Result<Answer, StorageError> {
        let method = match command.http_verb() {
            HttpMethod::Get => Method::GET,
            HttpMethod::Put => Method::PUT,
            HttpMethod::Post => Method::POST,
            HttpMethod::Delete => Method::DELETE,
            HttpMethod::Head => Method::HEAD,
        };
        let signing_error = |err| map_signing_error(err, path);
        let request = AttoRequest::new(bucket, path, command).map_err(signing_error)?;
        let url = request.url().map_err(signing_error)?;
        let headers = request.headers().map_err(signing_error)?;
        let body = request.request_body().map_err(signing_error)?;
        self.exchange(method, url.as_str(), &headers, &body, path)
    }

    /// Sends one request through the agent and reads the whole answer. A
    /// body draws from the bandwidth cap, if there is one, with a timeout
    /// that allows for the cap.
    pub(super) fn exchange(
        &self,
        method: Method,
        url: &str,
        headers: &HeaderMap,
        body: &[u8],
        key: &str,
    ) -> Result<Answer, StorageError> {
        let mut builder = http::Request::builder().method(method).uri(url);
        for (name, value) in headers {
            builder = builder.header(name, value);
        }
        let building = |err: http::Error| StorageError::Other {
            key: key.to_string(),
            detail: format!("building the request: {err}"),
        };
        let sent = match self.bandwidth.as_ref().filter(|_| !body.is_empty()) {
            None => self.agent.run(builder.body(body).map_err(building)?),
            Some(bandwidth) => {
                let mut throttled = bandwidth.reader(body);
                let mut request = builder
                    .body(ureq::SendBody::from_reader(&mut throttled))
                    .map_err(building)?;
                // A reader's length is unknown to ureq; S3 wants no chunking.
                request
                    .headers_mut()
                    .insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
                let timeout =
                    bandwidth.request_timeout(self.config.request_timeout, body.len() as u64);
                let request = self
                    .agent
                    .configure_request(request)
                    .timeout_global(Some(timeout))
                    .build();
                self.agent.run(request)
            }
        };
        let mut response = sent.map_err(|err| map_ureq_error(err, &self.config, key))?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response
            .body_mut()
            .with_config()
            .limit(u64::MAX)
            .read_to_vec()
            .map_err(|err| map_ureq_error(err, &self.config, key))?;
        Ok(Answer {
            status,
            headers,
            body,
        })
    }
}

/// rust-s3 failed to build or sign a request (no I/O happens there).
pub(super) fn map_signing_error(err: S3Error, key: &str) -> StorageError {
    StorageError::Other {
        key: key.to_string(),
        detail: format!("signing: {err}"),
    }
}

pub(super) fn map_ureq_error(err: ureq::Error, config: &S3Config, key: &str) -> StorageError {
    let key = key.to_string();
    match err {
        ureq::Error::Timeout(_) => StorageError::Timeout { key },
        ureq::Error::Rustls(_) | ureq::Error::Tls(_) | ureq::Error::Pem(_) => StorageError::Tls {
            endpoint: config.endpoint_display(),
            detail: err.to_string(),
        },
        ureq::Error::ConnectionFailed | ureq::Error::HostNotFound => StorageError::Connect {
            endpoint: config.endpoint_display(),
            detail: err.to_string(),
        },
        ureq::Error::Io(io) => match io.kind() {
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => StorageError::Timeout { key },
            io::ErrorKind::InvalidData if io.to_string().contains("certificate") => {
                StorageError::Tls {
                    endpoint: config.endpoint_display(),
                    detail: io.to_string(),
                }
            }
            io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::NotConnected
            | io::ErrorKind::AddrNotAvailable
            | io::ErrorKind::HostUnreachable
            | io::ErrorKind::NetworkUnreachable
            | io::ErrorKind::UnexpectedEof => StorageError::Connect {
                endpoint: config.endpoint_display(),
                detail: io.to_string(),
            },
            _ => StorageError::Other {
                key,
                detail: io.to_string(),
            },
        },
        other => StorageError::Other {
            key,
            detail: other.to_string(),
        },
    }
}

/// S3 error bodies are XML; keep the code and message, and keep it short.
pub(super) fn summarize_body(body: &str) -> String {
    match (xml_value(body, "Code"), xml_value(body, "Message")) {
        (Some(code), Some(message)) => format!("{code}: {message}"),
        (Some(code), None) => code,
        _ => body.chars().take(200).collect(),
    }
}
