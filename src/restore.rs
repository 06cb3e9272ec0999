//! `chunkstream restore`: rebuild a stream's file from its chunks, verified.
//!
//! Chunks are fetched one at a time in index order (memory stays at one
//! chunk; once the chunk objects were deleted after assembly, each chunk's
//! range of the assembled object), each checked against its recorded size and sha256, and the whole
//! file against the stream's sha256. The output appears under its final name
//! only once everything matched; on any mismatch nothing is left behind.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use log::warn;
use sha2::{Digest, Sha256};

use crate::config::S3Config;
use crate::error::AppError;
use crate::metadata::{KeyLayout, StreamMetadata, StreamStatus};
use crate::readback::{fetch_chunk, fetch_metadata, read_in_ranges};
use crate::store::{ObjectStore, S3Store};

/// What was restored.
#[derive(Debug)]
pub struct Restored {
    pub bytes: u64,
    pub chunks: usize,
    pub sha256: String,
}

pub fn restore(
    s3: &S3Config,
    stream_id: &str,
    output: &Path,
    from_assembled: bool,
) -> Result<Restored, AppError> {
    let store = S3Store::new(s3)?;
    restore_from(
        &store,
        &KeyLayout::new(&s3.prefix),
        stream_id,
        output,
        from_assembled,
    )
}

pub fn restore_from(
    store: &dyn ObjectStore,
    layout: &KeyLayout,
    stream_id: &str,
    output: &Path,
    from_assembled: bool,
) -> Result<Restored, AppError> {
    if output.exists() {
        return Err(AppError::Integrity(format!(
            "{} already exists; choose another output path",
            output.display()
        )));
    }
    let metadata = fetch_metadata(store, layout, stream_id)?;
    if metadata.status == StreamStatus::Incomplete {
        warn!(
            "stream {stream_id} is incomplete ({}): restoring the {} bytes that were uploaded",
            metadata.reason.as_deref().unwrap_or("unknown reason"),
            metadata.total_size_bytes
        );
    }
    let partial = partial_path(output);
    let result = if from_assembled {
        write_assembled(store, &metadata, &partial)
    } else {
        write_verified(store, &metadata, &partial)
    };
    match result {
        Ok(restored) => {
            std::fs::rename(&partial, output).map_err(|source| AppError::Output {
                path: output.to_path_buf(),
                source,
            })?;
            Ok(restored)
        }
        Err(err) => {
            let _ = std::fs::remove_file(&partial);
            Err(err)
        }
    }
}

fn output_error(path: &Path, source: std::io::Error) -> AppError {
    AppError::Output {
        path: path.to_path_buf(),
        source,
    }
}

/// Creates the partial output; it must not exist yet.
fn create_partial(partial: &Path) -> Result<File, AppError> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(partial)
        .map_err(|source| output_error(partial, source))
}

fn partial_path(output: &Path) -> PathBuf {
    let mut name = output.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    output.with_file_name(name)
}

/// Downloads the assembled object in chunk-sized ranges and checks it against
/// the stream's size and sha256.
fn write_assembled(
    store: &dyn ObjectStore,
    metadata: &StreamMetadata,
    partial: &Path,
) -> Result<Restored, AppError> {
    let assembled = metadata.assembled.as_ref().ok_or_else(|| {
        AppError::Integrity(format!(
            "stream {} has no assembled object; restore without --from-assembled",
            metadata.stream_id
        ))
    })?;
    let expected = metadata.sha256.as_ref().ok_or_else(|| {
        AppError::Integrity(format!(
            "stream {} has no sha256 to check against",
            metadata.stream_id
        ))
    })?;
    let mut file = create_partial(partial)?;
    let mut whole = Sha256::new();
    let size = metadata.total_size_bytes;
    read_in_ranges(
        store,
        &assembled.key,
        size,
        metadata.chunk_size_bytes,
        |bytes| -> Result<(), AppError> {
            whole.update(bytes);
            file.write_all(bytes)
                .map_err(|source| output_error(partial, source))
        },
    )?;
    seal(
        file,
        partial,
        whole,
        Some(expected),
        &format!("assembled {}", assembled.key),
        metadata,
    )
}

/// Checks the whole file's sha256 against `expected` (if there is one),
/// then makes the partial output durable.
fn seal(
    file: File,
    partial: &Path,
    whole: Sha256,
    expected: Option<&String>,
    what: &str,
    metadata: &StreamMetadata,
) -> Result<Restored, AppError> {
    let digest = hex::encode(whole.finalize());
    if let Some(expected) = expected
        && &digest != expected
    {
        return Err(AppError::Integrity(format!(
            "{what} sha256 {digest} does not match metadata {expected}"
        )));
    }
    file.sync_all()
        .map_err(|source| output_error(partial, source))?;
    Ok(Restored {
        bytes: metadata.total_size_bytes,
        chunks: metadata.chunks.len(),
        sha256: digest,
    })
}

fn write_verified(
    store: &dyn ObjectStore,
    metadata: &StreamMetadata,
    partial: &Path,
) -> Result<Restored, AppError> {
    let mut file = create_partial(partial)?;
    let mut whole = Sha256::new();
    for chunk in &metadata.chunks {
        let body = fetch_chunk(store, metadata, chunk)?;
        chunk.check(&body).map_err(AppError::Integrity)?;
        whole.update(&body);
        file.write_all(&body)
            .map_err(|source| output_error(partial, source))?;
    }
    seal(
        file,
        partial,
        whole,
        metadata.sha256.as_ref(),
        &format!("stream {}", metadata.stream_id),
        metadata,
    )
}
