//! The disposal job (`ON_COMPLETE=delete|move`): a complete stream's file
//! leaves the watch directory only once the stream is verified in S3
//! (`metadata.json` of this revision, every chunk's size by HEAD, and with
//! `ASSEMBLE=true` the assembled object; once the chunk objects were deleted
//! after assembly, the assembled object alone), only while this process holds the
//! stream's lease, and only if the file is still exactly what was verified
//! (size, mtime and inode, checked right before the unlink or rename). A
//! file that changed is left alone and its stream reopens.
//!
//! A move is a rename when `COMPLETED_DIR` is on the same file system;
//! otherwise the file is copied (fsynced, its sha256 checked against
//! `metadata.json`) and the original deleted. Failures (a read-only mount,
//! permissions) are counted and the job fails, to be retried with backoff;
//! uploads of other streams never wait for it.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use super::{Snapshot, Worker, snapshot};
use crate::config::OnComplete;
use crate::events::Disposal;
use crate::metadata::{StreamMetadata, StreamStatus};
use crate::readback::fetch_metadata;
use crate::upload::job::{DisposeJob, Outcome};

/// Bytes read per step when a move has to copy across file systems.
const COPY_PIECE: usize = 1 << 20;

impl Worker {
    pub(super) fn dispose(&mut self, job: &DisposeJob) -> Outcome {
        let action = job.action.action();
        let metadata = match self.verify_in_s3(job) {
            Ok(metadata) => metadata,
            Err(reason) => {
                self.events.on_complete_failed(action);
                return Outcome::Failed(format!(
                    "{} is kept: the stream is not verified in S3 yet: {reason}",
                    job.rel_path
                ));
            }
        };
        let (stream_id, token) = (job.stream.stream_id.as_str(), job.stream.token);
        if let Err(stop) =
            self.checkpoint_with_retry("lease check", |store| store.confirm_lease(stream_id, token))
        {
            return stop.stopped();
        }
        if let Err(refused) = unchanged(job) {
            return refused;
        }
        let done = match &job.action {
            OnComplete::Keep => {
                return Outcome::Failed("ON_COMPLETE=keep disposes of nothing".into());
            }
            OnComplete::Delete => fs::remove_file(&job.path)
                .map(|()| {
                    sync_parent(&job.path);
                    Disposal::Deleted
                })
                .map_err(|err| format!("cannot delete {}: {err}", job.path.display())),
            OnComplete::Move(dir) => self.move_file(job, dir, &metadata),
        };
        match done {
            Ok(disposal) => Outcome::Disposed {
                disposal,
                size: metadata.total_size_bytes,
                sha256: metadata.sha256.unwrap_or_default(),
            },
            Err(reason) => {
                self.events.on_complete_failed(action);
                Outcome::Failed(reason)
            }
        }
    }

    /// The stream's objects as this revision's `metadata.json` lists them:
    /// complete, the file's size, every chunk in order and present at its
    /// recorded size (each was checked against its sha256 by S3 on upload;
    /// skipped when the chunks were deleted after a verified assembly), and
    /// the assembled object when one is wanted or stands in for the chunks.
    fn verify_in_s3(&self, job: &DisposeJob) -> Result<StreamMetadata, String> {
        let stream_id = job.stream.stream_id.as_str();
        let metadata = fetch_metadata(self.store.as_ref(), &self.layout, stream_id)
            .map_err(|err| err.to_string())?;
        if metadata.status != StreamStatus::Complete || metadata.revision != job.revision {
            return Err(format!(
                "metadata.json holds revision {} ({:?}), not complete revision {}",
                metadata.revision, metadata.status, job.revision
            ));
        }
        if metadata.total_size_bytes != job.size || metadata.sha256.is_none() {
            return Err(format!(
                "metadata.json says {} bytes, the file had {}",
                metadata.total_size_bytes, job.size
            ));
        }
        let mut offset = 0;
        for chunk in &metadata.chunks {
            if chunk.offset != offset {
                return Err(format!("chunk {} is not at byte {offset}", chunk.index));
            }
            if !metadata.chunks_deleted {
                self.expect_object(&chunk.key, chunk.size_bytes)?;
            }
            offset += chunk.size_bytes;
        }
        if offset != job.size {
            return Err(format!("the chunks hold {offset} of {} bytes", job.size));
        }
        if job.assembled || metadata.chunks_deleted {
            let assembled = metadata
                .assembled
                .as_ref()
                .ok_or("the assembled object is not recorded yet")?;
            self.expect_object(&assembled.key, job.size)?;
        }
        Ok(metadata)
    }

    fn expect_object(&self, key: &str, size: u64) -> Result<(), String> {
        match self.store.head(key) {
            Ok(Some(info)) if info.size == size => Ok(()),
            Ok(Some(info)) => Err(format!("{key} has {} bytes, not {size}", info.size)),
            Ok(None) => Err(format!("{key} is missing")),
            Err(err) => Err(format!("cannot check {key}: {err}")),
        }
    }

    /// Moves the file to `dir`, at its path under the watch directory (with
    /// the stream id added to its name if another file is already there).
    fn move_file(
        &mut self,
        job: &DisposeJob,
        dir: &Path,
        metadata: &StreamMetadata,
    ) -> Result<Disposal, String> {
        let to = destination(dir, &job.rel_path, &job.stream.stream_id);
        if let Some(parent) = to.parent() {
            fs::create_dir_all(parent)
                .map_err(|err| format!("cannot create {}: {err}", parent.display()))?;
        }
        match fs::rename(&job.path, &to) {
            Ok(()) => {
                sync_parent(&to);
                sync_parent(&job.path);
                return Ok(Disposal::Moved(to));
            }
            Err(err) if err.kind() == std::io::ErrorKind::CrossesDevices => {}
            Err(err) => {
                return Err(format!(
                    "cannot move {} to {}: {err}",
                    job.path.display(),
                    to.display()
                ));
            }
        }
        let expected = metadata.sha256.as_deref().unwrap_or_default();
        let partial = to.with_extension(format!("partial-{}", job.stream.stream_id));
        copy_verified(&job.path, &partial, job.size, expected).map_err(|err| {
            let _ = fs::remove_file(&partial);
            format!(
                "cannot copy {} to {}: {err}",
                job.path.display(),
                partial.display()
            )
        })?;
        // The original goes only if it is still what was verified and copied.
        if let Err(refused) = unchanged(job) {
            let _ = fs::remove_file(&partial);
            return Err(match refused {
                Outcome::DisposalRefused { reason, .. } => reason,
                other => format!("{other:?}"),
            });
        }
        fs::rename(&partial, &to).map_err(|err| {
            format!(
                "cannot rename {} to {}: {err}",
                partial.display(),
                to.display()
            )
        })?;
        sync_parent(&to);
        fs::remove_file(&job.path).map_err(|err| {
            format!(
                "copied to {} but cannot delete {}: {err}",
                to.display(),
                job.path.display()
            )
        })?;
        sync_parent(&job.path);
        Ok(Disposal::Moved(to))
    }
}

/// The file as it is now, if it is still what was verified: same size,
/// mtime and inode. Otherwise the outcome that leaves it alone.
fn unchanged(job: &DisposeJob) -> Result<Snapshot, Outcome> {
    match snapshot(&job.path) {
        Ok(now)
            if now.size == job.size
                && now.mtime_ns == job.mtime_ns
                && now.inode == job.stream.identity.inode =>
        {
            Ok(now)
        }
        Ok(now) => Err(Outcome::DisposalRefused {
            reason: format!(
                "it changed since it was verified ({} bytes then, {} now)",
                job.size, now.size
            ),
            seen: Some((now.size, now.mtime_ns)),
        }),
        Err(err) => Err(Outcome::DisposalRefused {
            reason: format!("cannot stat it ({err}); the next scans decide"),
            seen: None,
        }),
    }
}

/// Where `rel_path` goes under `dir`: the same relative path, or, if a file
/// is already there, the name with the stream id before the extension.
fn destination(dir: &Path, rel_path: &str, stream_id: &str) -> PathBuf {
    let to = dir.join(rel_path);
    if fs::symlink_metadata(&to).is_err() {
        return to;
    }
    let name = to
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    let renamed = match name.rsplit_once('.') {
        Some((stem, ext)) => format!("{stem}.{stream_id}.{ext}"),
        None => format!("{name}.{stream_id}"),
    };
    to.with_file_name(renamed)
}

/// Copies `from` to a new file `to`, fsyncs it, and checks that it holds
/// `size` bytes whose sha256 is `sha256` (hex).
fn copy_verified(from: &Path, to: &Path, size: u64, sha256: &str) -> std::io::Result<()> {
    use sha2::{Digest, Sha256};
    let mut source = File::open(from)?;
    let mut target = File::options().write(true).create_new(true).open(to)?;
    let mut piece = vec![0u8; COPY_PIECE];
    let mut hasher = Sha256::new();
    let mut copied = 0u64;
    loop {
        let read = source.read(&mut piece)?;
        if read == 0 {
            break;
        }
        hasher.update(&piece[..read]);
        target.write_all(&piece[..read])?;
        copied += read as u64;
    }
    target.sync_all()?;
    let digest = hex::encode(hasher.finalize());
    if copied != size || digest != sha256 {
        return Err(std::io::Error::other(format!(
            "the copy holds {copied} bytes with sha256 {digest}, expected {size} bytes with {sha256}"
        )));
    }
    Ok(())
}

/// Makes a rename or unlink in `path`'s directory durable (best effort: some
/// network file systems refuse to open a directory).
fn sync_parent(path: &Path) {
    if let Some(parent) = path.parent()
        && let Ok(dir) = File::open(parent)
    {
        let _ = dir.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(bytes: &[u8]) -> String {
        crate::metadata::sha256_hex(bytes)
    }

    #[test]
    fn a_copy_is_verified_against_the_recorded_sha256() {
        let dir = tempfile::tempdir().unwrap();
        let from = dir.path().join("a.mp4");
        fs::write(&from, b"recording").unwrap();
        let good = dir.path().join("good");
        copy_verified(&from, &good, 9, &sha(b"recording")).unwrap();
        assert_eq!(fs::read(&good).unwrap(), b"recording");
        let bad = dir.path().join("bad");
        let err = copy_verified(&from, &bad, 9, &sha(b"other")).unwrap_err();
        assert!(err.to_string().contains("expected 9 bytes"), "{err}");
        let err = copy_verified(&from, &good, 9, &sha(b"recording")).unwrap_err();
        assert_eq!(
            err.kind(),
            std::io::ErrorKind::AlreadyExists,
            "never overwrites"
        );
    }

    #[test]
    fn a_destination_never_replaces_an_existing_file() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            destination(dir.path(), "cams/a.mp4", "a-1234"),
            dir.path().join("cams/a.mp4")
        );
        fs::create_dir_all(dir.path().join("cams")).unwrap();
        fs::write(dir.path().join("cams/a.mp4"), b"older").unwrap();
        assert_eq!(
            destination(dir.path(), "cams/a.mp4", "a-1234"),
            dir.path().join("cams/a.a-1234.mp4")
        );
    }
}
