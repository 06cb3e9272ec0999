//! Multipart hygiene: aborts the multipart uploads that nothing will finish.
//!
//! An assembly that crashed and then started over, or whose Redis record was
//! lost, leaves a multipart upload behind; its parts cost storage until
//! someone aborts it (S3 never expires them without a lifecycle rule). At
//! start and then every [`SWEEP_INTERVAL`], uploads under `S3_PREFIX` older
//! than `MULTIPART_MAX_AGE` are aborted, except the one a live assembly
//! records in Redis for its stream. A server without ListMultipartUploads
//! (s3s-fs answers 501) is reported once and not asked again.

use std::time::{Duration, SystemTime};

use log::{info, warn};

use crate::error::StorageError;
use crate::store::{CheckpointStore, ObjectStore, OpenUpload, S3Store};

/// How often the sweep runs after the one at start.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(3600);

/// What one sweep did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SweepReport {
    pub open: usize,
    pub aborted: usize,
}

/// Whether the sweep can run against this server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Support {
    Unknown,
    Listed,
    /// The server does not implement ListMultipartUploads.
    Unsupported,
}

/// Sweeps now. `support` remembers whether the server can list uploads.
pub fn sweep(
    s3: &S3Store,
    checkpoints: &mut dyn CheckpointStore,
    prefix: &str,
    max_age: Duration,
    support: &mut Support,
) -> Result<SweepReport, StorageError> {
    if *support == Support::Unsupported {
        return Ok(SweepReport::default());
    }
    let uploads = match s3.open_uploads(prefix) {
        Ok(uploads) => uploads,
        Err(StorageError::Http {
            status: 501 | 405, ..
        }) => {
            info!(
                "the S3 server does not list multipart uploads (ListMultipartUploads); abandoned uploads are not swept (a bucket lifecycle rule can expire them)"
            );
            *support = Support::Unsupported;
            return Ok(SweepReport::default());
        }
        Err(err) => return Err(err),
    };
    *support = Support::Listed;
    let now = SystemTime::now();
    let mut report = SweepReport {
        open: uploads.len(),
        aborted: 0,
    };
    for upload in uploads {
        if !abandoned(&upload, now, max_age) || is_live(checkpoints, prefix, &upload) {
            continue;
        }
        match s3.abort_multipart(&upload.key, &upload.upload_id) {
            Ok(()) => {
                info!(
                    "aborted the abandoned multipart upload {} of {}",
                    upload.upload_id, upload.key
                );
                report.aborted += 1;
            }
            Err(err) => warn!("cannot abort the multipart upload of {}: {err}", upload.key),
        }
    }
    Ok(report)
}

/// Older than `max_age`; an upload without a readable date is left alone.
fn abandoned(upload: &OpenUpload, now: SystemTime, max_age: Duration) -> bool {
    upload
        .initiated
        .and_then(|initiated| now.duration_since(initiated).ok())
        .is_some_and(|age| age > max_age)
}

/// Whether a live assembly records this upload (or Redis cannot tell).
fn is_live(checkpoints: &mut dyn CheckpointStore, prefix: &str, upload: &OpenUpload) -> bool {
    let Some(stream_id) = upload
        .key
        .strip_prefix(prefix)
        .and_then(|rest| rest.split_once('/'))
        .map(|(stream_id, _)| stream_id)
    else {
        return false;
    };
    match checkpoints.load_assembly(stream_id) {
        Ok(progress) => progress.is_some_and(|progress| progress.upload_id == upload.upload_id),
        Err(err) => {
            warn!(
                "cannot tell whether the upload of {} is live: {err}",
                upload.key
            );
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upload(age: Option<Duration>) -> OpenUpload {
        OpenUpload {
            key: "p/s/cam.mp4".into(),
            upload_id: "u".into(),
            initiated: age.map(|age| SystemTime::now() - age),
        }
    }

    #[test]
    fn only_uploads_older_than_the_bound_are_abandoned() {
        let hour = Duration::from_secs(3600);
        let now = SystemTime::now();
        assert!(abandoned(&upload(Some(2 * hour)), now, hour));
        assert!(!abandoned(&upload(Some(hour / 2)), now, hour));
        assert!(!abandoned(&upload(None), now, hour), "no date: keep");
    }
}
