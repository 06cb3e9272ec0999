//! Object keys, stream ids, chunk records and the `metadata.json` schema.
//!
//! These are the public, durable interface of chunkstream: what lands in the
//! bucket and what `restore` reads back. Keeping them in one module keeps the
//! writer and every reader on the same definitions.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::chunk_hash::RunningSha256;

/// Bumped only on an incompatible change to [`StreamMetadata`].
pub const SCHEMA_VERSION: u32 = 1;

/// The longest stem kept in a stream id; the rest of the name lives on in
/// `source.file_name`. Keeps every key far below S3's 1024-byte limit.
const MAX_STEM_BYTES: usize = 96;

/// Builds object keys under the configured prefix.
#[derive(Debug, Clone)]
pub struct KeyLayout {
    prefix: String,
    /// Object Lock: no key is ever written twice with different bytes.
    immutable_objects: bool,
}

impl KeyLayout {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_string(),
            immutable_objects: false,
        }
    }

    /// With `true` (`S3_OBJECT_LOCK_MODE` set), chunk keys also name their
    /// bytes and later revisions assemble to keys of their own: see
    /// [`KeyLayout::chunk_holding`] and [`KeyLayout::assembled`].
    pub fn with_immutable_objects(mut self, immutable: bool) -> Self {
        self.immutable_objects = immutable;
        self
    }

    /// `{prefix}{stream_id}/chunk-{index:06}`; the zero padding makes a plain
    /// listing sort in chunk order.
    pub fn chunk(&self, stream_id: &str, index: u64) -> String {
        format!("{}{index:06}", self.chunk_prefix(stream_id))
    }

    /// `{prefix}{stream_id}/chunk-`: what every chunk key of the stream
    /// starts with.
    pub fn chunk_prefix(&self, stream_id: &str) -> String {
        format!("{}{stream_id}/chunk-", self.prefix)
    }

    /// The key chunk `index` is written to when its bytes hash to `sha256`:
    /// [`KeyLayout::chunk`], or with immutable chunks (Object Lock)
    /// `chunk-{index:06}-{16 hex digits of the sha256}`. Changed bytes (the
    /// header ffmpeg rewrites at the end of a recording, the grown tail of a
    /// reopened stream) then go to a new key instead of over a locked object;
    /// `metadata.json` names the key of every chunk.
    pub fn chunk_holding(&self, stream_id: &str, index: u64, sha256: &[u8; 32]) -> String {
        let key = self.chunk(stream_id, index);
        if self.immutable_objects {
            format!("{key}-{}", hex::encode(&sha256[..8]))
        } else {
            key
        }
    }

    /// `{prefix}{stream_id}/{file_name}`: the whole file, assembled
    /// server-side from the chunks. With immutable objects (Object Lock), a
    /// reopened stream's later revision goes to
    /// `{prefix}{stream_id}/r{revision}/{file_name}` instead of over the
    /// locked first one.
    pub fn assembled(&self, stream_id: &str, file_name: &str, revision: u32) -> String {
        if self.immutable_objects && revision > 1 {
            format!("{}{stream_id}/r{revision}/{file_name}", self.prefix)
        } else {
            format!("{}{stream_id}/{file_name}", self.prefix)
        }
    }

    /// `{prefix}{stream_id}/assembly-r{revision}-{index:05}`: an intermediate
    /// object of a two-level assembly, deleted once the final object exists.
    pub fn assembly_part(&self, stream_id: &str, revision: u32, index: usize) -> String {
        format!("{}{stream_id}/assembly-r{revision}-{index:05}", self.prefix)
    }

    /// `{prefix}{stream_id}/metadata.json`.
    pub fn metadata(&self, stream_id: &str) -> String {
        format!("{}{stream_id}/metadata.json", self.prefix)
    }
}

/// A stream id: the file's stem made safe for S3 keys, then a unique suffix.
/// `suffix_source` should differ for every new stream (it is hashed).
pub fn new_stream_id(file_name: &str, suffix_source: &[u8]) -> String {
    let stem = file_name
        .rsplit_once('.')
        .map_or(file_name, |(stem, _)| stem);
    let mut safe: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    safe.truncate(MAX_STEM_BYTES);
    let safe = safe.trim_matches('.');
    let safe = if safe.is_empty() { "stream" } else { safe };
    let digest = sha256_hex(suffix_source);
    format!("{safe}-{}", &digest[..12])
}

/// The last component of a `/`-separated relative path.
pub fn file_name(rel_path: &str) -> String {
    rel_path.rsplit('/').next().unwrap_or(rel_path).to_string()
}

/// Lower-case hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Milliseconds since the Unix epoch (0 before it).
pub fn unix_millis(time: SystemTime) -> u64 {
    time.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// RFC 3339 with milliseconds, UTC.
pub fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_millis(time).to_string()
}

/// One uploaded chunk, as checkpointed in Redis and listed in the metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRecord {
    pub index: u64,
    pub key: String,
    pub offset: u64,
    pub size_bytes: u64,
    pub sha256: String,
    pub uploaded_at: String,
    /// The chunk's xxh3-128, with which completion tells an unchanged chunk
    /// without sha256 (`chunk_hash`). Records written before it existed
    /// have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xxh3: Option<String>,
    /// The whole-file sha256 state after this chunk: every checkpoint has
    /// one, `metadata.json` only the last full chunk's (see `chunk_hash`).
    #[serde(
        default,
        rename = "whole_file_sha256_state",
        alias = "whole_sha256",
        skip_serializing_if = "Option::is_none"
    )]
    pub whole_sha256: Option<RunningSha256>,
}

impl ChunkRecord {
    /// The record as `metadata.json` lists it: without the whole-file
    /// state, which completion adds to the last full chunk only.
    pub fn published(&self) -> ChunkRecord {
        ChunkRecord {
            whole_sha256: None,
            ..self.clone()
        }
    }

    /// Checks downloaded bytes against the record: size, then sha256.
    pub fn check(&self, body: &[u8]) -> Result<(), String> {
        if body.len() as u64 != self.size_bytes {
            return Err(format!(
                "chunk {} ({}) has {} bytes, metadata says {}",
                self.index,
                self.key,
                body.len(),
                self.size_bytes
            ));
        }
        let digest = sha256_hex(body);
        if digest != self.sha256 {
            return Err(format!(
                "chunk {} ({}) sha256 {digest} does not match metadata {}",
                self.index, self.key, self.sha256
            ));
        }
        Ok(())
    }
}

/// The serialized whole-file sha256 state a chunk upload resumes from: the
/// initial state for chunk 0, the previous chunk's recorded state otherwise
/// (`None` when that record has none; the new record then has none either).
pub fn whole_sha256_before(
    chunks: &std::collections::BTreeMap<u64, ChunkRecord>,
    index: u64,
) -> Option<RunningSha256> {
    match index.checked_sub(1) {
        None => Some(RunningSha256::initial()),
        Some(previous) => chunks
            .get(&previous)
            .and_then(|record| record.whole_sha256.clone()),
    }
}

/// The chunks that form a usable prefix of the file: from chunk 0 on, each
/// at the index and offset where its predecessor ends. Completion, close,
/// resume and `/streams` all count progress by this one rule.
pub fn contiguous_prefix(
    chunks: &std::collections::BTreeMap<u64, ChunkRecord>,
) -> impl Iterator<Item = &ChunkRecord> {
    let mut next_offset: u64 = 0;
    chunks
        .values()
        .enumerate()
        .take_while(move |(position, chunk)| {
            let fits = chunk.index == *position as u64 && chunk.offset == next_offset;
            next_offset = next_offset.saturating_add(chunk.size_bytes);
            fits
        })
        .map(|(_, chunk)| chunk)
}

/// Where the stream came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Source {
    /// Relative to `WATCH_DIR`, `/`-separated; the last path it was seen at.
    pub path: String,
    pub file_name: String,
}

/// Media facts read from the file's MP4 boxes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Media {
    /// Null when the file is not a readable MP4.
    pub duration_seconds: Option<f64>,
}

/// The single object assembled from the chunks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assembled {
    pub key: String,
    pub size_bytes: u64,
    pub etag: String,
}

/// The Content-Type of an assembled file, from its extension.
pub fn content_type_for(file_name: &str) -> &'static str {
    let extension = file_name
        .rsplit_once('.')
        .map(|(_, ext)| ext.to_ascii_lowercase())
        .unwrap_or_default();
    match extension.as_str() {
        "mp4" | "m4v" => "video/mp4",
        "mov" => "video/quicktime",
        "mkv" => "video/x-matroska",
        "ts" => "video/mp2t",
        _ => "application/octet-stream",
    }
}

/// `complete` or `incomplete`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StreamStatus {
    Complete,
    Incomplete,
}

/// `{prefix}{stream_id}/metadata.json`, schema version 1.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamMetadata {
    pub schema_version: u32,
    pub stream_id: String,
    /// 1 for the first completion; +1 each time a reopened stream completes again.
    pub revision: u32,
    pub status: StreamStatus,
    /// Why an incomplete stream was closed: truncated, replaced or vanished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub source: Source,
    /// The size of the stream: the file's size, or for an incomplete stream the
    /// bytes that were uploaded.
    pub total_size_bytes: u64,
    /// Whole-stream sha256; null for an incomplete stream whose file is gone.
    pub sha256: Option<String>,
    pub chunk_size_bytes: u64,
    pub chunks: Vec<ChunkRecord>,
    pub started_at: String,
    pub completed_at: String,
    pub stream_duration_seconds: f64,
    pub media: Media,
    /// The playable single object, once assembled (`ASSEMBLE=true`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assembled: Option<Assembled>,
    /// The chunk objects were deleted once the assembled object was verified
    /// (`DELETE_CHUNKS_AFTER_ASSEMBLY=true`). `chunks` still records every
    /// chunk's offset, size and sha256: readers check those ranges of the
    /// assembled object instead.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub chunks_deleted: bool,
}

/// The most chunks a stream may list: 10 million chunks of the smallest
/// chunk size is far beyond any recording, so more is corrupt data.
pub const MAX_CHUNKS: usize = 10_000_000;

/// Why bytes read back from the bucket are not usable stream metadata.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetadataError {
    #[error("not valid stream metadata JSON: {0}")]
    Json(String),
    #[error("schema version {0} is not {SCHEMA_VERSION}")]
    SchemaVersion(u32),
    #[error("chunk size is 0")]
    ZeroChunkSize,
    #[error("{0} chunks is more than the {MAX_CHUNKS} a stream can have")]
    TooManyChunks(usize),
    #[error("{0}")]
    Layout(String),
}

impl StreamMetadata {
    /// Decodes and validates `metadata.json` as read back from the bucket:
    /// the only way readers get a [`StreamMetadata`] from outside the
    /// process, so none of them meets a chunk size of 0, a gap, or sizes
    /// that overflow.
    pub fn decode(body: &[u8]) -> Result<Self, MetadataError> {
        let metadata: Self =
            serde_json::from_slice(body).map_err(|err| MetadataError::Json(err.to_string()))?;
        metadata.validate()?;
        Ok(metadata)
    }

    /// The checks [`decode`](Self::decode) makes, for metadata in hand.
    pub fn validate(&self) -> Result<(), MetadataError> {
        if self.schema_version != SCHEMA_VERSION {
            return Err(MetadataError::SchemaVersion(self.schema_version));
        }
        if self.chunk_size_bytes == 0 {
            return Err(MetadataError::ZeroChunkSize);
        }
        if self.chunks.len() > MAX_CHUNKS {
            return Err(MetadataError::TooManyChunks(self.chunks.len()));
        }
        self.check_chunk_layout().map_err(MetadataError::Layout)?;
        if let Some(assembled) = &self.assembled
            && assembled.size_bytes != self.total_size_bytes
        {
            return Err(MetadataError::Layout(format!(
                "assembled {} has {} bytes, the stream {}",
                assembled.key, assembled.size_bytes, self.total_size_bytes
            )));
        }
        if self.chunks_deleted && self.assembled.is_none() {
            return Err(MetadataError::Layout(
                "chunks_deleted without an assembled object".into(),
            ));
        }
        Ok(())
    }

    /// Checks that the chunks are contiguous from offset 0, none larger than
    /// the chunk size, and add up to the total size. Returns a description
    /// of the first problem.
    pub fn check_chunk_layout(&self) -> Result<(), String> {
        let mut expected_offset: u64 = 0;
        for (position, chunk) in self.chunks.iter().enumerate() {
            if chunk.index != position as u64 {
                return Err(format!("chunk #{position} has index {}", chunk.index));
            }
            if chunk.offset != expected_offset {
                return Err(format!(
                    "chunk {} starts at {} instead of {expected_offset}",
                    chunk.index, chunk.offset
                ));
            }
            if chunk.size_bytes > self.chunk_size_bytes {
                return Err(format!(
                    "chunk {} has {} bytes, more than the chunk size {}",
                    chunk.index, chunk.size_bytes, self.chunk_size_bytes
                ));
            }
            expected_offset = expected_offset
                .checked_add(chunk.size_bytes)
                .ok_or_else(|| format!("chunk {} ends beyond 2^64 bytes", chunk.index))?;
        }
        if expected_offset != self.total_size_bytes {
            return Err(format!(
                "chunks add up to {expected_offset} bytes, metadata says {}",
                self.total_size_bytes
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
