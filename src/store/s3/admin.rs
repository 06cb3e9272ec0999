//! The bucket itself rather than its objects: the start-up check (and
//! creation), the integrity probe, the readiness probe and the listings.

use s3::serde_types::{ListBucketResult, ListMultipartUploadsResult};

use super::*;

impl S3Store {
    /// CreateBucket, with a `LocationConstraint` only outside `us-east-1`:
    /// AWS, moto and Ceph RGW refuse `us-east-1` as a constraint, whatever
    /// the endpoint (rust-s3 sends it for every custom endpoint, so the
    /// request is presigned by rust-s3 and sent here).
    fn create_bucket(&self) -> Result<(), StorageError> {
        let body = create_bucket_body(&self.config.region);
        let mut headers = HeaderMap::new();
        if self.config.policy.object_lock.is_some() {
            headers.insert(
                "x-amz-bucket-object-lock-enabled",
                HeaderValue::from_static("true"),
            );
        }
        let url = self
            .bucket()
            .presign_put("", PRESIGNED_URL_SECONDS, Some(headers.clone()), None)
            .map_err(|err| map_signing_error(err, ""))?;
        self.exchange(Method::PUT, &url, &headers, body.as_bytes(), "")?
            .success("")
            .map(|_| ())
    }

    /// HEAD on the bucket: true if it exists and these credentials reach it.
    fn bucket_exists(&self) -> Result<bool, StorageError> {
        let answer = self.send("", Command::HeadObject)?;
        if matches!(answer.status, 404 | 403) {
            return Ok(false);
        }
        answer.success("").map(|_| true)
    }
}

/// The CreateBucket body for `region`: none for `us-east-1`.
pub(super) fn create_bucket_body(region: &str) -> String {
    if region == "us-east-1" {
        String::new()
    } else {
        format!(
            "<CreateBucketConfiguration xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><LocationConstraint>{region}</LocationConstraint></CreateBucketConfiguration>"
        )
    }
}

impl BucketAdmin for S3Store {
    /// Makes sure the bucket exists: creates it when missing (unless
    /// `S3_CREATE_BUCKET=false`). An existing bucket that these credentials
    /// may not create (or list) counts as ready when HEAD finds it.
    fn ensure_bucket(&self) -> Result<(), BucketError> {
        let listed = match self.probe() {
            Ok(()) => return Ok(()),
            // Waiting does not make a certificate trusted.
            Err(StorageError::Tls { endpoint, detail }) => {
                return Err(BucketError::Fatal(format!(
                    "TLS to S3 endpoint {endpoint} failed: {detail}; if its certificate comes from a private CA, set AWS_CA_BUNDLE to that CA's PEM bundle (S3_INSECURE_TLS=true skips verification, for tests only)"
                )));
            }
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
    /// Finds out once whether the server verifies `x-amz-checksum-sha256`:
    /// PUTs a scratch object under the prefix with a deliberately wrong
    /// checksum, expects a refusal, and deletes the object if it was stored.
    /// Sets and returns what requests carry from now on.
    fn probe_integrity(&mut self) -> Result<Integrity, StorageError> {
        let key = format!(
            "{}.chunkstream/checksum-probe-{:016x}",
            self.config.prefix,
            crate::random_u64()
        );
        let body = b"chunkstream checks whether this server verifies x-amz-checksum-sha256\n";
        let wrong: [u8; 32] = Sha256::digest(b"not the body").into();
        // The scratch object carries the policy but no Object Lock, so that
        // it can be deleted.
        let mut policy = self.policy(&key)?;
        policy.remove("x-amz-object-lock-mode");
        policy.remove("x-amz-object-lock-retain-until-date");
        let checksum_verified = match self.send_put(&key, body, "text/plain", &wrong, None, policy)
        {
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
        // Even a refused body may have been kept (s3s-fs 0.14 does). A
        // bucket with default retention may refuse the delete: the scratch
        // object then stays until its retention ends.
        match self.delete(&key) {
            Err(err) if err.is_client_error() => {
                warn!("the checksum probe object {key} could not be deleted: {err}")
            }
            other => other?,
        }
        self.integrity = Integrity {
            checksum_verified,
            content_md5: self.config.content_md5.wanted(checksum_verified),
        };
        Ok(self.integrity)
    }
    /// A cheap request that succeeds only if the bucket is reachable and
    /// usable with these credentials.
    fn probe(&self) -> Result<(), StorageError> {
        self.list_page("", None, Some(1)).map(|_| ())
    }
    /// Keys under `prefix` (ListObjectsV2, page after page).
    fn list_keys(&self, prefix: &str) -> Result<Vec<String>, StorageError> {
        let mut keys = Vec::new();
        let mut token = None;
        loop {
            let page = self.list_page(prefix, token.take(), None)?;
            keys.extend(page.contents.into_iter().map(|object| object.key));
            match page.next_continuation_token {
                Some(next) if page.is_truncated => token = Some(next),
                _ => return Ok(keys),
            }
        }
    }
    /// The multipart uploads open under `prefix` (ListMultipartUploads,
    /// page after page).
    fn open_uploads(&self, prefix: &str) -> Result<Vec<OpenUpload>, StorageError> {
        let mut uploads = Vec::new();
        let (mut key_marker, mut upload_id_marker) = (None, None);
        loop {
            let command = Command::ListMultipartUploads {
                prefix: Some(prefix),
                delimiter: None,
                key_marker: key_marker.take(),
                upload_id_marker: upload_id_marker.take(),
                max_uploads: None,
            };
            let page: ListMultipartUploadsResult = parse_listing(self.send("/", command)?, prefix)?;
            uploads.extend(page.uploads.into_iter().map(|upload| OpenUpload {
                initiated:
                    humantime::parse_rfc3339_weak(upload.initiated.trim_end_matches('Z')).ok(),
                key: upload.key,
                upload_id: upload.id,
            }));
            match page.next_marker {
                Some(next) if page.is_truncated => {
                    key_marker = Some(next);
                    upload_id_marker = page.next_upload_id_marker;
                }
                _ => return Ok(uploads),
            }
        }
    }
}

impl S3Store {
    /// One page of ListObjectsV2 under `prefix`.
    fn list_page(
        &self,
        prefix: &str,
        continuation_token: Option<String>,
        max_keys: Option<usize>,
    ) -> Result<ListBucketResult, StorageError> {
        let command = Command::ListObjectsV2 {
            prefix: prefix.to_string(),
            delimiter: None,
            continuation_token,
            start_after: None,
            max_keys,
        };
        parse_listing(self.send("/", command)?, prefix)
    }
}

/// A listing's XML answer, into rust-s3's type for it.
fn parse_listing<T: serde::de::DeserializeOwned>(
    answer: transport::Answer,
    prefix: &str,
) -> Result<T, StorageError> {
    let answer = answer.success(prefix)?;
    quick_xml::de::from_str(&answer.text()).map_err(|err| StorageError::Other {
        key: prefix.to_string(),
        detail: format!("listing answer: {err}"),
    })
}
