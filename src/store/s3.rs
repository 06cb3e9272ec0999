//! The object store: a trait, and its rust-s3 (sync) implementation.
//!
//! rust-s3 is used in its synchronous mode (attohttpc underneath, no async
//! runtime). Its own retries are switched off: the caller owns the retry
//! policy, because only the caller knows whether the source file still exists.
//! Errors are mapped to the small set of kinds the metrics report.

use base64::Engine;
use http::{HeaderMap, HeaderValue};
use s3::creds::Credentials;
use s3::error::S3Error;
use s3::{Bucket, BucketConfiguration, Region};
use std::io;

use crate::config::S3Config;
use crate::error::StorageError;

/// What the workers and `restore` need from S3.
pub trait ObjectStore: Send + Sync {
    /// Stores `body` at `key`. The server checks the body against `sha256`
    /// (sent as `x-amz-checksum-sha256`), so a corrupted transfer is rejected.
    fn put(
        &self,
        key: &str,
        body: &[u8],
        content_type: &str,
        sha256: &[u8; 32],
    ) -> Result<(), StorageError>;

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

/// An S3 or S3-compatible bucket.
#[derive(Clone)]
pub struct S3Store {
    bucket: Box<Bucket>,
    config: S3Config,
    /// For requests rust-s3 presigns: chunk PUTs and UploadPartCopy. It keeps
    /// connections alive (rust-s3 opens one per request).
    agent: ureq::Agent,
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
        })
    }

    /// Creates the bucket unless it already exists.
    pub fn ensure_bucket(&self) -> Result<(), StorageError> {
        match self.probe() {
            Ok(()) => return Ok(()),
            Err(err) if err.is_not_found() => {}
            Err(err) => return Err(err),
        }
        let region = region(&self.config)?;
        let credentials = credentials(&self.config)?;
        let created = if self.config.path_style {
            Bucket::create_with_path_style(
                &self.config.bucket,
                region,
                credentials,
                BucketConfiguration::default(),
            )
        } else {
            Bucket::create(
                &self.config.bucket,
                region,
                credentials,
                BucketConfiguration::default(),
            )
        };
        match created {
            Ok(_) | Err(S3Error::HttpFailWithBody(409, _)) => Ok(()),
            Err(err) => Err(map_error(err, &self.config, "")),
        }
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
}

impl ObjectStore for S3Store {
    /// A PUT through a URL that rust-s3 presigns, sent by ureq straight from
    /// the caller's buffer. rust-s3's own PUT copies the body and hashes it
    /// twice more (SigV4 payload hash and Content-MD5); the presigned request
    /// is UNSIGNED-PAYLOAD, and integrity comes from `x-amz-checksum-sha256`,
    /// a signed header the server checks against the body.
    fn put(
        &self,
        key: &str,
        body: &[u8],
        content_type: &str,
        sha256: &[u8; 32],
    ) -> Result<(), StorageError> {
        let checksum = base64::engine::general_purpose::STANDARD.encode(sha256);
        let header_value = |value: &str| {
            HeaderValue::from_str(value).map_err(|err| StorageError::Other {
                key: key.to_string(),
                detail: format!("header value {value:?}: {err}"),
            })
        };
        let mut headers = HeaderMap::new();
        headers.insert("x-amz-checksum-sha256", header_value(&checksum)?);
        headers.insert("content-type", header_value(content_type)?);
        let url = self
            .bucket
            .presign_put(key, PRESIGNED_URL_SECONDS, Some(headers), None)
            .map_err(|err| map_error(err, &self.config, key))?;
        let mut response = self
            .agent
            .put(&url)
            .header("x-amz-checksum-sha256", &checksum)
            .header("content-type", content_type)
            .send(body)
            .map_err(|err| map_ureq_error(err, &self.config, key))?;
        let status = response.status().as_u16();
        if (200..300).contains(&status) {
            return Ok(());
        }
        let body = response.body_mut().read_to_string().unwrap_or_default();
        Err(StorageError::Http {
            status,
            key: key.to_string(),
            body: summarize_body(&body),
        })
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
        let status = response.status().as_u16();
        let body = response
            .body_mut()
            .read_to_string()
            .map_err(|err| map_ureq_error(err, &self.config, key))?;
        // S3 may answer 200 with an error document for a copy.
        if status != 200 || body.contains("<Error>") {
            return Err(StorageError::Http {
                status: if status == 200 { 500 } else { status },
                key: key.to_string(),
                body: summarize_body(&body),
            });
        }
        xml_value(&body, "ETag").ok_or_else(|| StorageError::Other {
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
                etag: etag.clone(),
            })
            .collect();
        let response = self
            .bucket
            .complete_multipart_upload(key, upload_id, parts)
            .map_err(|err| map_error(err, &self.config, key))?;
        let body = String::from_utf8_lossy(response.as_slice()).to_string();
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
