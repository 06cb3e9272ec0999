//! The object store: a trait, and its rust-s3 (sync) implementation.
//!
//! rust-s3 is used in its synchronous mode (attohttpc underneath, no async
//! runtime). Its own retries are switched off: the caller owns the retry
//! policy, because only the caller knows whether the source file still exists.
//! Errors are mapped to the small set of kinds the metrics report.
//!
//! Integrity does not depend on the server: at start the store finds out
//! whether the server verifies `x-amz-checksum-sha256` (Ceph RGW, for one,
//! ignores it) and, where that is not proven, every body also carries
//! `Content-MD5`, which every S3 implementation verifies; a single-part PUT's
//! MD5 ETag is compared with what was sent. Server quirks met in the field
//! (see docs/compatibility.md) are absorbed here: bucket creation without a
//! `us-east-1` location constraint, unquoted or empty ETags.

use std::io;
use std::sync::Arc;
use std::time::SystemTime;

use base64::Engine;
use http::{HeaderMap, HeaderValue};
use log::{info, warn};
use s3::creds::Credentials;
use s3::error::S3Error;
use s3::{Bucket, Region};
use sha2::{Digest, Sha256};

use super::credentials::{Provider, RefreshHealth};
use crate::bandwidth::Bandwidth;
use crate::config::{ObjectPolicy, S3Config, Sse};
use crate::error::{AppError, StorageError};
use crate::store::ports::{
    BucketAdmin, BucketError, Integrity, ObjectInfo, ObjectStore, OpenUpload,
};

mod admin;

/// Lifetime of a presigned URL: used at once, so only clock skew matters.
const PRESIGNED_URL_SECONDS: u32 = 3600;

/// The value of the first `<tag>…</tag>` in an XML body, unescaped.
pub(crate) fn xml_value(body: &str, tag: &str) -> Option<String> {
    let open = format!("<{tag}>");
    let start = body.find(&open)? + open.len();
    let end = body[start..].find(&format!("</{tag}>"))? + start;
    Some(
        body[start..end]
            .replace("&quot;", "\"")
            .replace("&amp;", "&"),
    )
}

/// Percent-encodes `value` (SigV4 URI encoding), keeping the unreserved
/// characters and any in `also_keep`.
pub(crate) fn percent_encode(value: &str, also_keep: &[u8]) -> String {
    let mut encoded = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || b"-_.~".contains(&byte) || also_keep.contains(&byte) {
            encoded.push(byte as char);
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

/// An S3 or S3-compatible bucket.
#[derive(Clone)]
pub struct S3Store {
    /// Signs with anonymous credentials; [`S3Store::bucket`] adds the
    /// current ones.
    bucket: Box<Bucket>,
    /// `None`: anonymous (`S3_ANONYMOUS=true`).
    credentials: Option<Arc<Provider>>,
    /// Headers every object written carries.
    policy: HeaderMap,
    config: S3Config,
    /// For requests rust-s3 presigns: chunk PUTs and UploadPartCopy. It keeps
    /// connections alive (rust-s3 opens one per request).
    agent: ureq::Agent,
    /// Until [`S3Store::probe_integrity`] runs: nothing proven, so
    /// `Content-MD5` goes out unless `S3_CONTENT_MD5=never`.
    integrity: Integrity,
    /// The shared upload cap every request body draws from, if any.
    bandwidth: Option<Arc<Bandwidth>>,
}

impl S3Store {
    /// Resolves the credentials (see [`Provider::resolve`]): finding none
    /// without `S3_ANONYMOUS=true` is a configuration error.
    pub fn new(config: &S3Config) -> Result<Self, AppError> {
        // Retries belong to the caller; see the module doc.
        s3::set_retries(0);
        let anonymous = Credentials::anonymous().map_err(|err| StorageError::Other {
            key: String::new(),
            detail: format!("credentials: {err}"),
        })?;
        let bucket = Bucket::new(&config.bucket, region(config)?, anonymous)
            .map_err(|err| map_error(err, config, ""))?;
        let mut bucket = if config.path_style {
            bucket.with_path_style()
        } else {
            bucket
        };
        bucket.set_request_timeout(Some(config.request_timeout));
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(config.request_timeout))
            .http_status_as_error(false)
            .build()
            .into();
        let credentials = Provider::resolve(config)?;
        Ok(Self {
            bucket,
            credentials,
            policy: policy_headers(&config.policy, SystemTime::now())?,
            config: config.clone(),
            agent,
            integrity: Integrity {
                checksum_verified: false,
                content_md5: config.content_md5.wanted(false),
            },
            bandwidth: None,
        })
    }

    /// Sends every request body through `bandwidth`.
    pub fn with_bandwidth(mut self, bandwidth: Arc<Bandwidth>) -> Self {
        self.bandwidth = Some(bandwidth);
        self
    }

    /// The bucket, signing with the current credentials.
    fn bucket(&self) -> Box<Bucket> {
        let mut bucket = self.bucket.clone();
        if let Some(provider) = &self.credentials {
            bucket.set_credentials(provider.current());
        }
        bucket
    }

    /// How refreshing temporary credentials goes (`None`: nothing to refresh).
    pub fn credentials_health(&self) -> Option<RefreshHealth> {
        self.credentials.as_ref().map(|provider| provider.health())
    }

    /// The object policy headers, with an Object Lock retain-until date
    /// counted from now.
    fn policy(&self, key: &str) -> Result<HeaderMap, StorageError> {
        if self.config.policy.object_lock.is_none() {
            return Ok(self.policy.clone());
        }
        policy_headers(&self.config.policy, SystemTime::now()).map_err(|err| StorageError::Other {
            key: key.to_string(),
            detail: err.to_string(),
        })
    }

    /// A PUT through a URL that rust-s3 presigns, sent by ureq straight from
    /// the caller's buffer (rust-s3's own PUT copies the body and hashes it
    /// twice more). The request is UNSIGNED-PAYLOAD; integrity comes from
    /// `x-amz-checksum-sha256` and, when `md5` is given, `Content-MD5`, both
    /// signed headers the server checks against the body. Returns the ETag.
    fn send_put(
        &self,
        key: &str,
        body: &[u8],
        content_type: &str,
        sha256: &[u8; 32],
        md5: Option<&[u8; 16]>,
        mut headers: HeaderMap,
    ) -> Result<Option<String>, StorageError> {
        let base64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
        let mut pairs = vec![
            ("x-amz-checksum-sha256", base64(sha256)),
            ("content-type", content_type.to_string()),
        ];
        if let Some(md5) = md5 {
            pairs.push(("content-md5", base64(md5)));
        }
        for (name, value) in &pairs {
            let value = HeaderValue::from_str(value).map_err(|err| StorageError::Other {
                key: key.to_string(),
                detail: format!("header value {value:?}: {err}"),
            })?;
            headers.insert(*name, value);
        }
        let url = self
            .bucket()
            .presign_put(key, PRESIGNED_URL_SECONDS, Some(headers.clone()), None)
            .map_err(|err| map_error(err, &self.config, key))?;
        let mut request = self.agent.put(&url);
        for (name, value) in &headers {
            request = request.header(name, value);
        }
        let sent = match &self.bandwidth {
            Some(bandwidth) => request
                .header("content-length", body.len())
                .config()
                .timeout_global(Some(
                    bandwidth.request_timeout(self.config.request_timeout, body.len() as u64),
                ))
                .build()
                .send(ureq::SendBody::from_reader(&mut bandwidth.reader(body))),
            None => request.send(body),
        };
        let mut response = sent.map_err(|err| map_ureq_error(err, &self.config, key))?;
        let etag = response
            .headers()
            .get("etag")
            .and_then(|value| value.to_str().ok())
            .map(str::to_string);
        http_outcome(&mut response, key)?;
        Ok(etag)
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

/// `Ok` with the body for a 2xx answer, else the error it stands for; a
/// refusal of the body as corrupted is [`StorageError::Corrupted`].
fn http_outcome(
    response: &mut http::Response<ureq::Body>,
    key: &str,
) -> Result<String, StorageError> {
    let status = response.status().as_u16();
    let body = response.body_mut().read_to_string().unwrap_or_default();
    if (200..300).contains(&status) {
        return Ok(body);
    }
    let summary = summarize_body(&body);
    if status == 400
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
        status,
        key: key.to_string(),
        body: summary,
    })
}

/// An ETag in its quoted form (Ceph RGW answers UploadPartCopy unquoted).
fn quoted(etag: &str) -> String {
    format!("\"{}\"", etag.trim_matches('"'))
}

/// Checks a single-part PUT's ETag against the MD5 of what was sent. Only a
/// plain MD5 ETag (32 hex digits) is compared; other forms say nothing.
fn check_etag(key: &str, etag: &str, md5: &[u8; 16]) -> Result<(), StorageError> {
    let etag = etag.trim_matches('"');
    let expected = hex::encode(md5);
    let is_md5 = etag.len() == 32 && etag.bytes().all(|byte| byte.is_ascii_hexdigit());
    if is_md5 && !etag.eq_ignore_ascii_case(&expected) {
        return Err(StorageError::Corrupted {
            key: key.to_string(),
            detail: format!("stored with ETag {etag}, but the MD5 of the body sent is {expected}"),
        });
    }
    Ok(())
}

impl ObjectStore for S3Store {
    fn put(
        &self,
        key: &str,
        body: &[u8],
        content_type: &str,
        sha256: &[u8; 32],
    ) -> Result<(), StorageError> {
        let md5 = self.integrity.content_md5.then(|| md5::compute(body).0);
        let policy = self.policy(key)?;
        let etag = self.send_put(key, body, content_type, sha256, md5.as_ref(), policy)?;
        // With SSE-KMS the ETag is not the body's MD5 (Content-MD5 and the
        // checksum still protect the body).
        let etag_is_md5 = !matches!(self.config.policy.sse, Some(Sse::Kms { .. }));
        match (md5, etag) {
            (Some(md5), Some(etag)) if etag_is_md5 => check_etag(key, &etag, &md5),
            _ => Ok(()),
        }
    }

    fn get(&self, key: &str) -> Result<Vec<u8>, StorageError> {
        self.bucket()
            .get_object(key)
            .map(|response| response.to_vec())
            .map_err(|err| map_error(err, &self.config, key))
    }

    fn get_range(&self, key: &str, start: u64, end: u64) -> Result<Vec<u8>, StorageError> {
        self.bucket()
            .get_object_range(key, start, Some(end))
            .map(|response| response.to_vec())
            .map_err(|err| map_error(err, &self.config, key))
    }

    fn head(&self, key: &str) -> Result<Option<ObjectInfo>, StorageError> {
        match self.bucket().head_object(key) {
            Ok((head, _)) => Ok(Some(ObjectInfo {
                size: head
                    .content_length
                    .and_then(|len| u64::try_from(len).ok())
                    .unwrap_or(0),
                etag: head.e_tag.unwrap_or_default(),
            })),
            Err(S3Error::HttpFailWithBody(404, _)) => Ok(None),
            Err(err) => Err(map_error(err, &self.config, key)),
        }
    }

    fn delete(&self, key: &str) -> Result<(), StorageError> {
        match self.bucket().delete_object(key) {
            Ok(_) | Err(S3Error::HttpFailWithBody(404, _)) => Ok(()),
            Err(err) => Err(map_error(err, &self.config, key)),
        }
    }

    fn initiate_multipart(&self, key: &str, content_type: &str) -> Result<String, StorageError> {
        self.bucket()
            .with_extra_headers(self.policy(key)?)
            .map_err(|err| map_error(err, &self.config, key))?
            .initiate_multipart_upload(key, content_type)
            .map(|response| response.upload_id)
            .map_err(|err| map_error(err, &self.config, key))
    }

    /// rust-s3 has no UploadPartCopy, so this presigns the PUT with rust-s3
    /// (the signer, with `x-amz-copy-source` as a signed header and the part
    /// number and upload id as signed query parameters) and sends it with
    /// ureq. No hand-written SigV4.
    fn upload_part_copy(
        &self,
        key: &str,
        upload_id: &str,
        part_number: u32,
        source_key: &str,
    ) -> Result<String, StorageError> {
        let copy_source = format!(
            "/{}/{}",
            self.config.bucket,
            percent_encode(source_key, b"/")
        );
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-amz-copy-source",
            HeaderValue::from_str(&copy_source).map_err(|err| StorageError::Other {
                key: key.to_string(),
                detail: format!("copy source {copy_source:?}: {err}"),
            })?,
        );
        let queries = std::collections::HashMap::from([
            ("partNumber".to_string(), part_number.to_string()),
            ("uploadId".to_string(), upload_id.to_string()),
        ]);
        let url = self
            .bucket()
            .presign_put(key, PRESIGNED_URL_SECONDS, Some(headers), Some(queries))
            .map_err(|err| map_error(err, &self.config, key))?;
        // rust-s3 0.38 signs the custom query parameters but leaves them out
        // of the URL it returns; add them (unless a fixed version did).
        let url = if url.contains("partNumber=") {
            url
        } else {
            format!(
                "{url}&partNumber={part_number}&uploadId={}",
                percent_encode(upload_id, b"")
            )
        };
        let mut response = self
            .agent
            .put(&url)
            .header("x-amz-copy-source", &copy_source)
            .send_empty()
            .map_err(|err| map_ureq_error(err, &self.config, key))?;
        let body = http_outcome(&mut response, key)?;
        // S3 may answer 200 with an error document for a copy.
        if body.contains("<Error>") {
            return Err(StorageError::Http {
                status: 500,
                key: key.to_string(),
                body: summarize_body(&body),
            });
        }
        xml_value(&body, "ETag")
            .map(|etag| quoted(&etag))
            .ok_or_else(|| StorageError::Other {
                key: key.to_string(),
                detail: "UploadPartCopy answer has no ETag".to_string(),
            })
    }

    fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[(u32, String)],
    ) -> Result<String, StorageError> {
        let parts = parts
            .iter()
            .map(|(part_number, etag)| s3::serde_types::Part {
                part_number: *part_number,
                etag: quoted(etag),
            })
            .collect();
        let body = match self
            .bucket()
            .complete_multipart_upload(key, upload_id, parts)
        {
            Ok(response) => String::from_utf8_lossy(response.as_slice()).to_string(),
            // rust-s3 insists on the root element's name, which moto spells
            // differently; a 2xx without an error document is a success.
            Err(S3Error::HttpFailWithBody(200..=299, body)) if !body.contains("<Error>") => body,
            // S3 may answer 200 with an error document: retry it as a 5xx.
            Err(S3Error::HttpFailWithBody(200..=299, body)) => {
                return Err(StorageError::Http {
                    status: 500,
                    key: key.to_string(),
                    body: summarize_body(&body),
                });
            }
            Err(err) => return Err(map_error(err, &self.config, key)),
        };
        // Ceph RGW answers with an empty ETag; callers HEAD the object then.
        Ok(xml_value(&body, "ETag").unwrap_or_default())
    }

    fn abort_multipart(&self, key: &str, upload_id: &str) -> Result<(), StorageError> {
        match self.bucket().abort_upload(key, upload_id) {
            Ok(()) | Err(S3Error::HttpFailWithBody(404, _)) => Ok(()),
            Err(err) => Err(map_error(err, &self.config, key)),
        }
    }
}

fn map_ureq_error(err: ureq::Error, config: &S3Config, key: &str) -> StorageError {
    match err {
        ureq::Error::Timeout(_) => StorageError::Timeout {
            key: key.to_string(),
        },
        ureq::Error::Io(io) => map_error(S3Error::Io(io), config, key),
        ureq::Error::ConnectionFailed | ureq::Error::HostNotFound => StorageError::Connect {
            endpoint: config.endpoint_display(),
            detail: err.to_string(),
        },
        other => StorageError::Other {
            key: key.to_string(),
            detail: other.to_string(),
        },
    }
}

fn region(config: &S3Config) -> Result<Region, StorageError> {
    match &config.endpoint {
        Some(endpoint) => Ok(Region::Custom {
            region: config.region.clone(),
            endpoint: endpoint.clone(),
        }),
        None => config.region.parse().map_err(|err| StorageError::Other {
            key: String::new(),
            detail: format!("unknown S3_REGION {:?}: {err}", config.region),
        }),
    }
}

/// The headers of `S3_SSE`, `S3_STORAGE_CLASS`, `S3_OBJECT_LOCK_*` (retained
/// until `now` plus the retention) and `S3_TAGS`.
fn policy_headers(policy: &ObjectPolicy, now: SystemTime) -> Result<HeaderMap, StorageError> {
    let mut pairs: Vec<(&str, String)> = Vec::new();
    match &policy.sse {
        Some(Sse::Aes256) => pairs.push(("x-amz-server-side-encryption", "AES256".into())),
        Some(Sse::Kms { key_id }) => {
            pairs.push(("x-amz-server-side-encryption", "aws:kms".into()));
            if let Some(key_id) = key_id {
                pairs.push((
                    "x-amz-server-side-encryption-aws-kms-key-id",
                    key_id.clone(),
                ));
            }
        }
        None => {}
    }
    if let Some(class) = &policy.storage_class {
        pairs.push(("x-amz-storage-class", class.clone()));
    }
    if let Some(lock) = &policy.object_lock {
        pairs.push(("x-amz-object-lock-mode", lock.mode.clone()));
        pairs.push((
            "x-amz-object-lock-retain-until-date",
            humantime::format_rfc3339_seconds(now + lock.retain).to_string(),
        ));
    }
    if !policy.tags.is_empty() {
        let tagging = policy
            .tags
            .iter()
            .map(|(key, value)| {
                format!(
                    "{}={}",
                    percent_encode(key, b""),
                    percent_encode(value, b"")
                )
            })
            .collect::<Vec<_>>()
            .join("&");
        pairs.push(("x-amz-tagging", tagging));
    }
    let mut headers = HeaderMap::new();
    for (name, value) in pairs {
        let value = HeaderValue::from_str(&value).map_err(|err| StorageError::Other {
            key: String::new(),
            detail: format!("{name}: {value:?}: {err}"),
        })?;
        headers.insert(name, value);
    }
    Ok(headers)
}

/// The I/O error at the bottom of a transport error, if there is one.
fn io_cause(err: &S3Error) -> Option<&io::Error> {
    match err {
        S3Error::Io(io) => Some(io),
        S3Error::Atto(atto) => match atto.kind() {
            attohttpc::ErrorKind::Io(io) => Some(io),
            _ => None,
        },
        _ => None,
    }
}

fn map_error(err: S3Error, config: &S3Config, key: &str) -> StorageError {
    let key = key.to_string();
    if let S3Error::HttpFailWithBody(status, body) = &err {
        return StorageError::Http {
            status: *status,
            key,
            body: summarize_body(body),
        };
    }
    if let Some(io) = io_cause(&err) {
        return match io.kind() {
            // rust-s3's sync client reports its request timeout as BrokenPipe.
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock | io::ErrorKind::BrokenPipe => {
                StorageError::Timeout { key }
            }
            io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
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
        };
    }
    StorageError::Other {
        key,
        detail: err.to_string(),
    }
}

/// S3 error bodies are XML; keep the code and message, and keep it short.
fn summarize_body(body: &str) -> String {
    match (xml_value(body, "Code"), xml_value(body, "Message")) {
        (Some(code), Some(message)) => format!("{code}: {message}"),
        (Some(code), None) => code,
        _ => body.chars().take(200).collect(),
    }
}

#[cfg(test)]
mod tests;
