//! The object store: a trait, and its S3 implementation.
//!
//! rust-s3 (sync mode, no async runtime) signs every request; ureq sends it
//! (see `transport`), so one agent with the daemon's TLS trust
//! (`AWS_CA_BUNDLE`, `S3_INSECURE_TLS`) carries all S3 traffic. Nothing is
//! retried here: the caller owns the retry policy, because only the caller
//! knows whether the source file still exists. Errors are mapped to the
//! small set of kinds the metrics report.
//!
//! Integrity does not depend on the server: at start the store finds out
//! whether the server verifies `x-amz-checksum-sha256` (Ceph RGW, for one,
//! ignores it) and, where that is not proven, every body also carries
//! `Content-MD5`, which every S3 implementation verifies; a single-part PUT's
//! MD5 ETag is compared with what was sent. Server quirks met in the field
//! (see docs/compatibility.md) are absorbed here: bucket creation without a
//! `us-east-1` location constraint, unquoted or empty ETags.

use std::sync::Arc;
use std::time::SystemTime;

use base64::Engine;
use http::{HeaderMap, HeaderValue, Method};
use log::{info, warn};
use s3::command::Command;
use s3::creds::Credentials;
use s3::serde_types::{CompleteMultipartUploadData, InitiateMultipartUploadResponse, Part};
use s3::{Bucket, Region};
use sha2::{Digest, Sha256};

use super::credentials::{Provider, RefreshHealth};
use super::https::HttpsTrust;
use crate::bandwidth::Bandwidth;
use crate::config::{ObjectPolicy, S3Config, Sse};
use crate::error::{AppError, StorageError};
use crate::store::ports::{
    BucketAdmin, BucketError, Integrity, ObjectInfo, ObjectStore, OpenUpload,
};

mod admin;
mod transport;

use transport::map_signing_error;

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
    /// Sends every request (see `transport`); it keeps connections alive.
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
        let anonymous = Credentials::anonymous().map_err(|err| StorageError::Other {
            key: String::new(),
            detail: format!("credentials: {err}"),
        })?;
        let bucket = Bucket::new(&config.bucket, region(config)?, anonymous)
            .map_err(|err| map_signing_error(err, ""))?;
        let bucket = if config.path_style {
            bucket.with_path_style()
        } else {
            bucket
        };
        let trust = HttpsTrust::new(&config.tls)?;
        let agent = trust.agent(config.request_timeout);
        let credentials = Provider::resolve(config, &trust)?;
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
            .map_err(|err| map_signing_error(err, key))?;
        let answer = self
            .exchange(Method::PUT, &url, &headers, body, key)?
            .success(key)?;
        Ok(answer.header("etag"))
    }
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
        Ok(self.send(key, Command::GetObject)?.success(key)?.body)
    }

    fn get_range(&self, key: &str, start: u64, end: u64) -> Result<Vec<u8>, StorageError> {
        let range = Command::GetObjectRange {
            start,
            end: Some(end),
        };
        Ok(self.send(key, range)?.success(key)?.body)
    }

    fn head(&self, key: &str) -> Result<Option<ObjectInfo>, StorageError> {
        let answer = self.send(key, Command::HeadObject)?;
        if answer.status == 404 {
            return Ok(None);
        }
        let answer = answer.success(key)?;
        Ok(Some(ObjectInfo {
            size: answer
                .header("content-length")
                .and_then(|len| len.parse().ok())
                .unwrap_or(0),
            etag: answer.header("etag").unwrap_or_default(),
        }))
    }

    fn delete(&self, key: &str) -> Result<(), StorageError> {
        let answer = self.send(key, Command::DeleteObject)?;
        if answer.status != 404 {
            answer.success(key)?;
        }
        Ok(())
    }

    fn initiate_multipart(&self, key: &str, content_type: &str) -> Result<String, StorageError> {
        let bucket = self
            .bucket()
            .with_extra_headers(self.policy(key)?)
            .map_err(|err| map_signing_error(err, key))?;
        let answer = self
            .send_signed_by(
                &bucket,
                key,
                Command::InitiateMultipartUpload { content_type },
            )?
            .success(key)?;
        quick_xml::de::from_str::<InitiateMultipartUploadResponse>(&answer.text())
            .map(|initiated| initiated.upload_id)
            .map_err(|err| StorageError::Other {
                key: key.to_string(),
                detail: format!("CreateMultipartUpload answer: {err}"),
            })
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
            .presign_put(
                key,
                PRESIGNED_URL_SECONDS,
                Some(headers.clone()),
                Some(queries),
            )
            .map_err(|err| map_signing_error(err, key))?;
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
        let body = self
            .exchange(Method::PUT, &url, &headers, &[], key)?
            .document(key)?;
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
        let data = CompleteMultipartUploadData {
            parts: parts
                .iter()
                .map(|(part_number, etag)| Part {
                    part_number: *part_number,
                    etag: quoted(etag),
                })
                .collect(),
        };
        let body = self
            .send(key, Command::CompleteMultipartUpload { upload_id, data })?
            .document(key)?;
        // Ceph RGW answers with an empty ETag; callers HEAD the object then.
        Ok(xml_value(&body, "ETag").unwrap_or_default())
    }

    fn abort_multipart(&self, key: &str, upload_id: &str) -> Result<(), StorageError> {
        let answer = self.send(key, Command::AbortMultipartUpload { upload_id })?;
        if answer.status != 404 {
            answer.success(key)?;
        }
        Ok(())
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

#[cfg(test)]
mod tests;
