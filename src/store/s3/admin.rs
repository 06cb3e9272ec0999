//! The bucket itself rather than its objects: the start-up check (and
//! creation), the integrity probe, the readiness probe and the listings.

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
            .map_err(|err| map_error(err, &self.config, ""))?;
        let mut request = self.agent.put(&url);
        for (name, value) in &headers {
            request = request.header(name, value);
        }
        let mut response = request
            .send(body.as_bytes())
            .map_err(|err| map_ureq_error(err, &self.config, ""))?;
        http_outcome(&mut response, "").map(|_| ())
    }

    /// HEAD on the bucket: true if it exists and these credentials reach it.
    fn bucket_exists(&self) -> Result<bool, StorageError> {
        match self.bucket().head_object("") {
            Ok(_) => Ok(true),
            Err(S3Error::HttpFailWithBody(404 | 403, _)) => Ok(false),
            Err(err) => Err(map_error(err, &self.config, "")),
        }
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
        self.bucket()
            .list_page(String::new(), None, None, None, Some(1))
            .map(|_| ())
            .map_err(|err| map_error(err, &self.config, ""))
    }
    /// Keys under `prefix` (a listing, paginated by rust-s3).
    fn list_keys(&self, prefix: &str) -> Result<Vec<String>, StorageError> {
        let pages = self
            .bucket()
            .list(prefix.to_string(), None)
            .map_err(|err| map_error(err, &self.config, prefix))?;
        Ok(pages
            .into_iter()
            .flat_map(|page| page.contents.into_iter().map(|object| object.key))
            .collect())
    }
    /// The multipart uploads open under `prefix` (ListMultipartUploads).
    fn open_uploads(&self, prefix: &str) -> Result<Vec<OpenUpload>, StorageError> {
        let pages = self
            .bucket()
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
}
