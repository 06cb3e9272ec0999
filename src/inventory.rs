//! `chunkstream list` and `chunkstream verify`: what is in the bucket, and
//! whether it is intact.
//!
//! Both work from the bucket alone (each stream's `metadata.json`), so they
//! answer for any instance, running or not. `verify` checks that every chunk
//! exists with its recorded size; `--deep` also downloads the chunks (one at a
//! time, so memory stays at one chunk) and checks every sha256, the whole
//! stream's sha256, and the assembled object if there is one. Once the chunk
//! objects were deleted after assembly, the assembled object stands in for
//! them: its size is checked, and `--deep` checks each chunk's range of it.

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::error::AppError;
use crate::metadata::{KeyLayout, StreamMetadata, StreamStatus};
use crate::readback::{fetch_chunk, fetch_metadata, sha256_of_object};
use crate::store::{BucketAdmin, ObjectStore};

/// One line of `list`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StreamSummary {
    pub stream_id: String,
    pub status: StreamStatus,
    pub path: String,
    pub size_bytes: u64,
    pub chunks: usize,
    pub media_duration_seconds: Option<f64>,
    pub completed_at: String,
    pub revision: u32,
    pub assembled_key: Option<String>,
}

impl From<&StreamMetadata> for StreamSummary {
    fn from(meta: &StreamMetadata) -> Self {
        Self {
            stream_id: meta.stream_id.clone(),
            status: meta.status,
            path: meta.source.path.clone(),
            size_bytes: meta.total_size_bytes,
            chunks: meta.chunks.len(),
            media_duration_seconds: meta.media.duration_seconds,
            completed_at: meta.completed_at.clone(),
            revision: meta.revision,
            assembled_key: meta.assembled.as_ref().map(|a| a.key.clone()),
        }
    }
}

/// Every stream's metadata under `prefix`, oldest completion first.
pub fn all_metadata(
    store: &dyn BucketAdmin,
    prefix: &str,
) -> Result<Vec<StreamMetadata>, AppError> {
    let mut streams = Vec::new();
    for key in store.list_keys(prefix)? {
        let Some(stream_id) = key
            .strip_prefix(prefix)
            .and_then(|rest| rest.strip_suffix("/metadata.json"))
            .filter(|id| !id.contains('/'))
        else {
            continue;
        };
        match fetch_metadata(store, &KeyLayout::new(prefix), stream_id) {
            Ok(meta) => streams.push(meta),
            Err(err) => log::warn!("skipping {key}: {err}"),
        }
    }
    // RFC 3339 in UTC sorts as text.
    streams.sort_by(|a, b| a.completed_at.cmp(&b.completed_at));
    Ok(streams)
}

/// The `list` table: a header, then one line per stream.
pub fn render_list(streams: &[StreamMetadata]) -> String {
    let mut out = format!(
        "{:<40} {:<10} {:>14} {:>6} {:>10} {:<24} {}\n",
        "STREAM", "STATUS", "BYTES", "CHUNKS", "DURATION", "COMPLETED", "ASSEMBLED"
    );
    for meta in streams {
        let summary = StreamSummary::from(meta);
        out.push_str(&format!(
            "{:<40} {:<10} {:>14} {:>6} {:>10} {:<24} {}\n",
            summary.stream_id,
            match summary.status {
                StreamStatus::Complete => "complete",
                StreamStatus::Incomplete => "incomplete",
            },
            summary.size_bytes,
            summary.chunks,
            summary
                .media_duration_seconds
                .map_or("-".to_string(), |s| format!("{s:.2}s")),
            summary.completed_at,
            summary.assembled_key.as_deref().unwrap_or("-"),
        ));
    }
    out
}

/// Checks one stream; returns one line per problem (empty: all good).
pub fn verify_stream(
    store: &dyn ObjectStore,
    layout: &KeyLayout,
    stream_id: &str,
    deep: bool,
) -> Vec<String> {
    let metadata = match fetch_metadata(store, layout, stream_id) {
        Ok(metadata) => metadata,
        Err(err) => return vec![format!("{stream_id}: {err}")],
    };
    let mut problems = Vec::new();
    let mut problem = |text: String| problems.push(format!("{stream_id}: {text}"));
    let mut whole = Sha256::new();
    let mut whole_readable = true;
    for chunk in &metadata.chunks {
        if deep {
            match fetch_chunk(store, &metadata, chunk) {
                Ok(body) => {
                    if let Err(mismatch) = chunk.check(&body) {
                        problem(mismatch);
                    }
                    whole.update(&body);
                }
                Err(err) if err.is_not_found() => {
                    whole_readable = false;
                    problem(format!("chunk {} ({}) is missing", chunk.index, chunk.key));
                }
                Err(err) => {
                    whole_readable = false;
                    problem(format!("chunk {} ({}): {err}", chunk.index, chunk.key));
                }
            }
        } else if !metadata.chunks_deleted {
            match store.head(&chunk.key) {
                Ok(Some(object)) if object.size == chunk.size_bytes => {}
                Ok(Some(object)) => problem(format!(
                    "chunk {} ({}) has {} bytes, metadata says {}",
                    chunk.index, chunk.key, object.size, chunk.size_bytes
                )),
                Ok(None) => problem(format!("chunk {} ({}) is missing", chunk.index, chunk.key)),
                Err(err) => problem(format!("chunk {} ({}): {err}", chunk.index, chunk.key)),
            }
        }
    }
    if deep
        && whole_readable
        && let Some(expected) = &metadata.sha256
    {
        let digest = hex::encode(whole.finalize());
        if &digest != expected {
            problem(format!(
                "the chunks' sha256 {digest} does not match metadata {expected}"
            ));
        }
    }
    if let Some(assembled) = &metadata.assembled {
        match store.head(&assembled.key) {
            Ok(Some(object)) if object.size == assembled.size_bytes => {
                // With the chunks deleted, their ranges were its deep check.
                if deep && !metadata.chunks_deleted {
                    match sha256_of_object(
                        store,
                        &assembled.key,
                        object.size,
                        metadata.chunk_size_bytes,
                    ) {
                        Ok(digest) if Some(&digest) == metadata.sha256.as_ref() => {}
                        Ok(digest) => problem(format!(
                            "assembled {} sha256 {digest} does not match metadata {}",
                            assembled.key,
                            metadata.sha256.as_deref().unwrap_or("(none)")
                        )),
                        Err(err) => problem(format!("assembled {}: {err}", assembled.key)),
                    }
                }
            }
            Ok(Some(object)) => problem(format!(
                "assembled {} has {} bytes, metadata says {}",
                assembled.key, object.size, assembled.size_bytes
            )),
            Ok(None) => problem(format!("assembled {} is missing", assembled.key)),
            Err(err) => problem(format!("assembled {}: {err}", assembled.key)),
        }
    }
    problems
}
