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
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::bandwidth::Bandwidth;
use crate::config::S3Config;
use crate::error::StorageError;

/// What the workers and `restore` need from S3.
pub trait ObjectStore: Send + Sync {
    /// Stores `body` at `key`. The server checks the body against `sha256`
    /// (sent as `x-amz-checksum-sha256`) and, where that is not proven to be
    /// verified, against `Content-MD5`, so a corrupted transfer is rejected.
    fn put(
        &self,
        key: &str,
        body: &[u8],
        content_type: &str,
        sha256: &[u8; 32],
    ) -> Result<(), StorageError>;

    /// Removes the object at `key`; an absent object is no error.
    fn delete(&self, key: &str) -> Result<(), StorageError>;

    /// The whole object at `key` (callers only fetch chunk-sized objects).
    fn get(&self, key: &str) -> Result<Vec<u8>, StorageError>;

    /// Bytes `[start, end]` (inclusive) of the object at `key`.
    fn get_range(&self, key: &str, start: u64, end: u64) -> Result<Vec<u8>, StorageError>;

    /// The object's size and ETag, or `None` if there is no object at `key`.
    fn head(&self, key: &str) -> Result<Option<ObjectInfo>, StorageError>;

    /// Starts a multipart upload; returns its upload id.
    fn initiate_multipart(&self, key: &str, content_type: &str) -> Result<String, StorageError>;

    /// Copies the whole object `source_key` (same bucket) into part
    /// `part_number` server-side (UploadPartCopy); returns the part's ETag.
    fn upload_part_copy(
        &self,
        key: &str,
        upload_id: &str,
        part_number: u32,
        source_key: &str,
    ) -> Result<String, StorageError>;

    /// Completes the upload from `(part number, ETag)` pairs; returns the
    /// object's ETag.
    fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[(u32, String)],
    ) -> Result<String, StorageError>;

    /// Aborts the upload (its parts are discarded).
    fn abort_multipart(&self, key: &str, upload_id: &str) -> Result<(), StorageError>;
}

/// Lifetime of a presigned URL: used at once, so only clock skew matters.
const PRESIGNED_URL_SECONDS: u32 = 3600;

/// What HEAD tells about an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub size: u64,
    pub etag: String,
}

/// The value of the first `<tag>…</tag>` in an XML body, unescaped.
fn xml_value(body: &str, tag: &str) -> Option<String> {
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
fn percent_encode(value: &str, also_keep: &[u8]) -> String {
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

/// What the start-up probe found out about the server's integrity checks,
/// and what this process does about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Integrity {
    /// The server refused a body whose `x-amz-checksum-sha256` was wrong.
    pub checksum_verified: bool,
    /// Requests with a body carry `Content-MD5` (`S3_CONTENT_MD5`).
    pub content_md5: bool,
}

/// A multipart upload the server still holds open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenUpload {
    pub key: String,
    pub upload_id: String,
    /// When it was initiated; `None` if the server's date did not parse.
    pub initiated: Option<SystemTime>,
}

/// Why the bucket is not usable yet.
#[derive(Debug, thiserror::Error)]
pub enum BucketError {
    /// Waiting cannot help (the bucket is missing and may not be created).
    #[error("{0}")]
    Fatal(String),
    /// Worth retrying: the server, the network or permissions may change.
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// An S3 or S3-compatible bucket.
#[derive(Clone)]
pub struct S3Store {
    bucket: Box<Bucket>,
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
    pub fn new(config: &S3Config) -> Result<Self, StorageError> {
        // Retries belong to the caller; see the module doc.
        s3::set_retries(0);
        let bucket = Bucket::new(&config.bucket, region(config)?, credentials(config)?)
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
        Ok(Self {
            bucket,
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

    /// Makes sure the bucket exists: creates it when missing (unless
    /// `S3_CREATE_BUCKET=false`). An existing bucket that these credentials
    /// may not create (or list) counts as ready when HEAD finds it.
    pub fn ensure_bucket(&self) -> Result<(), BucketError> {
        let listed = match self.probe() {
            Ok(()) => return Ok(()),
            Err(err) => err,
        };
        if !listed.is_not_found() {
            // Listing may be forbidden while the bucket is usable.
            return match self.bucket_exists()? {
                true => Ok(()),
                false => Err(listed.into()),
            };
        }
        if !self.config.create_bucket {
            return Err(BucketError::Fatal(format!(
                "bucket {:?} does not exist at {} and S3_CREATE_BUCKET=false; create it, or set S3_CREATE_BUCKET=true",
                self.config.bucket,
                self.config.endpoint_display()
            )));
        }
        match self.create_bucket() {
            Ok(()) => {
                info!(
                    "created bucket {:?} at {}",
                    self.config.bucket,
                    self.config.endpoint_display()
                );
                Ok(())
            }
            Err(StorageError::Http { status: 409, body, .. })
                if body.starts_with("BucketAlreadyOwnedByYou") =>
            {
                Ok(())
            }
            Err(err @ StorageError::Http { status: 403, .. }) => match self.bucket_exists()? {
                true => Ok(()),
                false => Err(err.into()),
            },
            Err(StorageError::Http { status, body, .. }) if body.contains("LocationConstraint") => {
                Err(StorageError::Other {
                    key: String::new(),
                    detail: format!(
                        "creating the bucket was refused (HTTP {status}: {body}); S3_REGION={:?} must name a region the server accepts (Ceph RGW: its zonegroup, often \"default\")",
                        self.config.region
                    ),
                }
                .into())
            }
            Err(err) => Err(err.into()),
        }
    }

    /// CreateBucket, with a `LocationConstraint` only outside `us-east-1`:
    /// AWS, moto and Ceph RGW refuse `us-east-1` as a constraint, whatever
    /// the endpoint (rust-s3 sends it for every custom endpoint, so the
    /// request is presigned by rust-s3 and sent here).
    fn create_bucket(&self) -> Result<(), StorageError> {
        let body = create_bucket_body(&self.config.region);
        let url = self
            .bucket
            .presign_put("", PRESIGNED_URL_SECONDS, None, None)
            .map_err(|err| map_error(err, &self.config, ""))?;
        let mut response = self
            .agent
            .put(&url)
            .send(body.as_bytes())
            .map_err(|err| map_ureq_error(err, &self.config, ""))?;
        http_outcome(&mut response, "").map(|_| ())
    }

    /// HEAD on the bucket: true if it exists and these credentials reach it.
    fn bucket_exists(&self) -> Result<bool, StorageError> {
        match self.bucket.head_object("") {
            Ok(_) => Ok(true),
            Err(S3Error::HttpFailWithBody(404 | 403, _)) => Ok(false),
            Err(err) => Err(map_error(err, &self.config, "")),
        }
    }

    /// Finds out once whether the server verifies `x-amz-checksum-sha256`:
    /// PUTs a scratch object under the prefix with a deliberately wrong
    /// checksum, expects a refusal, and deletes the object if it was stored.
    /// Sets and returns what requests carry from now on.
    pub fn probe_integrity(&mut self) -> Result<Integrity, StorageError> {
        let key = format!(
            "{}.chunkstream/checksum-probe-{:016x}",
            self.config.prefix,
            crate::random_u64()
        );
        let body = b"chunkstream checks whether this server verifies x-amz-checksum-sha256\n";
        let wrong: [u8; 32] = Sha256::digest(b"not the body").into();
        let checksum_verified = match self.send_put(&key, body, "text/plain", &wrong, None) {
            Err(StorageError::Corrupted { .. }) => true,
            Ok(_) => false,
            Err(err) if err.is_client_error() => {
                warn!(
                    "the checksum probe PUT of {key} was refused: {err}; treating x-amz-checksum-sha256 as not verified"
                );
                false
            }
            Err(err) => return Err(err),
        };
        // Even a refused body may have been kept (s3s-fs 0.14 does).
        self.delete(&key)?;
        self.integrity = Integrity {
            checksum_verified,
            content_md5: self.config.content_md5.wanted(checksum_verified),
        };
        Ok(self.integrity)
    }

    /// A cheap request that succeeds only if the bucket is reachable and
    /// usable with these credentials.
    pub fn probe(&self) -> Result<(), StorageError> {
        self.bucket
            .list_page(String::new(), None, None, None, Some(1))
            .map(|_| ())
            .map_err(|err| map_error(err, &self.config, ""))
    }

    /// Keys under `prefix` (a listing, paginated by rust-s3).
    pub fn list_keys(&self, prefix: &str) -> Result<Vec<String>, StorageError> {
        let pages = self
            .bucket
            .list(prefix.to_string(), None)
            .map_err(|err| map_error(err, &self.config, prefix))?;
        Ok(pages
            .into_iter()
            .flat_map(|page| page.contents.into_iter().map(|object| object.key))
            .collect())
    }

    /// The multipart uploads open under `prefix` (ListMultipartUploads).
    pub fn open_uploads(&self, prefix: &str) -> Result<Vec<OpenUpload>, StorageError> {
        let pages = self
            .bucket
            .list_multiparts_uploads(Some(prefix), None)
            .map_err(|err| map_error(err, &self.config, prefix))?;
        Ok(pages
            .into_iter()
            .flat_map(|page| page.uploads)
            .map(|upload| OpenUpload {
                initiated: humantime::parse_rfc3339_weak(upload.initiated.trim_end_matches('Z'))
                    .ok(),
                key: upload.key,
                upload_id: upload.id,
            })
            .collect())
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
    ) -> Result<Option<String>, StorageError> {
        let base64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
        let mut pairs = vec![
            ("x-amz-checksum-sha256", base64(sha256)),
            ("content-type", content_type.to_string()),
        ];
        if let Some(md5) = md5 {
            pairs.push(("content-md5", base64(md5)));
        }
        let mut headers = HeaderMap::new();
        for (name, value) in &pairs {
            let value = HeaderValue::from_str(value).map_err(|err| StorageError::Other {
                key: key.to_string(),
                detail: format!("header value {value:?}: {err}"),
            })?;
            headers.insert(*name, value);
        }
        let url = self
            .bucket
            .presign_put(key, PRESIGNED_URL_SECONDS, Some(headers), None)
            .map_err(|err| map_error(err, &self.config, key))?;
        let mut request = self.agent.put(&url);
        for (name, value) in &pairs {
            request = request.header(*name, value);
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

/// The CreateBucket body for `region`: none for `us-east-1`.
fn create_bucket_body(region: &str) -> String {
    if region == "us-east-1" {
        String::new()
    } else {
        format!(
            "<CreateBucketConfiguration xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><LocationConstraint>{region}</LocationConstraint></CreateBucketConfiguration>"
        )
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
        let etag = self.send_put(key, body, content_type, sha256, md5.as_ref())?;
        match (md5, etag) {
            (Some(md5), Some(etag)) => check_etag(key, &etag, &md5),
            _ => Ok(()),
        }
    }

    fn get(&self, key: &str) -> Result<Vec<u8>, StorageError> {
        self.bucket
            .get_object(key)
            .map(|response| response.to_vec())
            .map_err(|err| map_error(err, &self.config, key))
    }

    fn get_range(&self, key: &str, start: u64, end: u64) -> Result<Vec<u8>, StorageError> {
        self.bucket
            .get_object_range(key, start, Some(end))
            .map(|response| response.to_vec())
            .map_err(|err| map_error(err, &self.config, key))
    }

    fn head(&self, key: &str) -> Result<Option<ObjectInfo>, StorageError> {
        match self.bucket.head_object(key) {
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
        match self.bucket.delete_object(key) {
            Ok(_) | Err(S3Error::HttpFailWithBody(404, _)) => Ok(()),
            Err(err) => Err(map_error(err, &self.config, key)),
        }
    }

    fn initiate_multipart(&self, key: &str, content_type: &str) -> Result<String, StorageError> {
        self.bucket
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
            .bucket
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
        let body = match self.bucket.complete_multipart_upload(key, upload_id, parts) {
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
        match self.bucket.abort_upload(key, upload_id) {
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

fn credentials(config: &S3Config) -> Result<Credentials, StorageError> {
    let credentials = match &config.credentials {
        Some(pair) => Credentials::new(
            Some(&pair.access_key_id),
            Some(&pair.secret_access_key),
            None,
            None,
            None,
        ),
        None => Credentials::anonymous(),
    };
    credentials.map_err(|err| StorageError::Other {
        key: String::new(),
        detail: format!("credentials: {err}"),
    })
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
    let pick = |tag: &str| {
        let open = format!("<{tag}>");
        let start = body.find(&open)? + open.len();
        let end = body[start..].find("</")? + start;
        Some(body[start..end].to_string())
    };
    match (pick("Code"), pick("Message")) {
        (Some(code), Some(message)) => format!("{code}: {message}"),
        (Some(code), None) => code,
        _ => body.chars().take(200).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_sources_are_percent_encoded_but_keep_slashes() {
        assert_eq!(
            percent_encode("p/cam-1/chunk-000001", b"/"),
            "p/cam-1/chunk-000001"
        );
        assert_eq!(percent_encode("a b/ü+x", b"/"), "a%20b/%C3%BC%2Bx");
        assert_eq!(percent_encode("a/b+c=d", b""), "a%2Fb%2Bc%3Dd");
        assert_eq!(
            xml_value("<R><ETag>&quot;abc-3&quot;</ETag></R>", "ETag").as_deref(),
            Some("\"abc-3\"")
        );
    }

    #[test]
    fn a_plain_md5_etag_must_match_what_was_sent() {
        let md5 = md5::compute(b"body").0;
        let hex = hex::encode(md5);
        assert!(check_etag("k", &format!("\"{hex}\""), &md5).is_ok());
        assert!(check_etag("k", &hex.to_uppercase(), &md5).is_ok());
        let other = hex::encode(md5::compute(b"bodY").0);
        let err = check_etag("k", &format!("\"{other}\""), &md5).expect_err("mismatch");
        assert_eq!(err.kind(), "integrity");
        // Multipart and encrypted-object ETags are not MD5s: nothing to compare.
        assert!(check_etag("k", "\"abc-3\"", &md5).is_ok());
        assert!(check_etag("k", "", &md5).is_ok());
    }

    #[test]
    fn create_bucket_sends_no_constraint_for_us_east_1_only() {
        assert_eq!(create_bucket_body("us-east-1"), "");
        assert!(
            create_bucket_body("eu-central-1")
                .contains("<LocationConstraint>eu-central-1</LocationConstraint>")
        );
    }

    #[test]
    fn error_bodies_are_summarized() {
        let xml = "<?xml version=\"1.0\"?><Error><Code>SignatureDoesNotMatch</Code><Message>bad sig</Message></Error>";
        assert_eq!(summarize_body(xml), "SignatureDoesNotMatch: bad sig");
        assert_eq!(summarize_body("plain"), "plain");
    }

    #[test]
    fn http_errors_keep_their_status() {
        use std::time::Duration;
        let config = S3Config {
            endpoint: Some("http://127.0.0.1:1".into()),
            region: "us-east-1".into(),
            bucket: "b".into(),
            prefix: String::new(),
            path_style: true,
            request_timeout: Duration::from_secs(1),
            credentials: None,
            create_bucket: true,
            content_md5: crate::config::ContentMd5::Auto,
        };
        let err = map_error(S3Error::HttpFailWithBody(503, "busy".into()), &config, "k");
        assert_eq!(err.kind(), "http_5xx");
        let err = map_error(S3Error::HttpFailWithBody(403, "no".into()), &config, "k");
        assert_eq!(err.kind(), "http_4xx");
        let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
        assert_eq!(
            map_error(S3Error::Io(refused), &config, "k").kind(),
            "connect"
        );
    }
}
