//! Object keys, stream ids, chunk records and the `metadata.json` schema.
//!
//! These are the public, durable interface of chunkstream: what lands in the
//! bucket and what `restore` reads back. Keeping them in one module keeps the
//! writer and every reader on the same definitions.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// Bumped only on an incompatible change to [`StreamMetadata`].
pub const SCHEMA_VERSION: u32 = 1;

/// The longest stem kept in a stream id; the rest of the name lives on in
/// `source.file_name`. Keeps every key far below S3's 1024-byte limit.
const MAX_STEM_BYTES: usize = 96;

/// Builds object keys under the configured prefix.
#[derive(Debug, Clone)]
pub struct KeyLayout {
    prefix: String,
}

impl KeyLayout {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_string(),
        }
    }

    /// `{prefix}{stream_id}/chunk-{index:06}`; the zero padding makes a plain
    /// listing sort in chunk order.
    pub fn chunk(&self, stream_id: &str, index: u64) -> String {
        format!("{}{stream_id}/chunk-{index:06}", self.prefix)
    }

    /// `{prefix}{stream_id}/{file_name}`: the whole file, assembled
    /// server-side from the chunks.
    pub fn assembled(&self, stream_id: &str, file_name: &str) -> String {
        format!("{}{stream_id}/{file_name}", self.prefix)
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
}

impl ChunkRecord {
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
}

impl StreamMetadata {
    /// Checks that the chunks are contiguous from offset 0 and add up to the
    /// total size. Returns a description of the first problem.
    pub fn check_chunk_layout(&self) -> Result<(), String> {
        let mut expected_offset = 0;
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
            expected_offset += chunk.size_bytes;
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
mod tests {
    use super::*;

    fn sample() -> StreamMetadata {
        let layout = KeyLayout::new("streams/");
        StreamMetadata {
            schema_version: SCHEMA_VERSION,
            stream_id: "cam1-0123456789ab".into(),
            revision: 1,
            status: StreamStatus::Complete,
            reason: None,
            source: Source {
                path: "sub/cam1.mp4".into(),
                file_name: "cam1.mp4".into(),
            },
            total_size_bytes: 15,
            sha256: Some(sha256_hex(b"x")),
            chunk_size_bytes: 10,
            chunks: vec![
                ChunkRecord {
                    index: 0,
                    key: layout.chunk("cam1-0123456789ab", 0),
                    offset: 0,
                    size_bytes: 10,
                    sha256: sha256_hex(b"a"),
                    uploaded_at: rfc3339(SystemTime::UNIX_EPOCH),
                },
                ChunkRecord {
                    index: 1,
                    key: layout.chunk("cam1-0123456789ab", 1),
                    offset: 10,
                    size_bytes: 5,
                    sha256: sha256_hex(b"b"),
                    uploaded_at: rfc3339(SystemTime::UNIX_EPOCH),
                },
            ],
            started_at: "2026-01-01T00:00:00.000Z".into(),
            completed_at: "2026-01-01T00:01:00.000Z".into(),
            stream_duration_seconds: 42.0,
            media: Media {
                duration_seconds: None,
            },
            assembled: None,
        }
    }

    #[test]
    fn content_types_follow_the_extension() {
        assert_eq!(content_type_for("cam.MP4"), "video/mp4");
        assert_eq!(content_type_for("cam.mov"), "video/quicktime");
        assert_eq!(content_type_for("cam"), "application/octet-stream");
    }

    #[test]
    fn metadata_round_trips_with_the_documented_field_names() {
        let meta = sample();
        let json = serde_json::to_value(&meta).unwrap();
        for field in [
            "schema_version",
            "stream_id",
            "revision",
            "status",
            "source",
            "total_size_bytes",
            "sha256",
            "chunk_size_bytes",
            "chunks",
            "started_at",
            "completed_at",
            "stream_duration_seconds",
            "media",
        ] {
            assert!(json.get(field).is_some(), "{field} missing");
        }
        assert_eq!(json["status"], "complete");
        assert_eq!(json["media"]["duration_seconds"], serde_json::Value::Null);
        assert_eq!(
            json["chunks"][1]["key"],
            "streams/cam1-0123456789ab/chunk-000001"
        );
        assert!(json.get("reason").is_none());
        let back: StreamMetadata = serde_json::from_value(json).unwrap();
        assert_eq!(back, meta);
        assert_eq!(back.check_chunk_layout(), Ok(()));
    }

    #[test]
    fn layout_check_finds_gaps_and_size_mismatches() {
        let mut gap = sample();
        gap.chunks[1].offset = 11;
        assert!(
            gap.check_chunk_layout()
                .unwrap_err()
                .contains("starts at 11")
        );
        let mut short = sample();
        short.total_size_bytes = 16;
        assert!(short.check_chunk_layout().is_err());
    }

    #[test]
    fn stream_ids_are_key_safe_unique_and_keep_the_stem() {
        let a = new_stream_id("cam 1 ünïcode.mp4", b"a");
        assert!(a.starts_with("cam_1_"), "{a}");
        assert!(
            a.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        );
        assert_ne!(a, new_stream_id("cam 1 ünïcode.mp4", b"b"));
        let long = new_stream_id(&format!("{}.mp4", "x".repeat(2000)), b"c");
        assert!(long.len() <= MAX_STEM_BYTES + 13);
        assert!(new_stream_id(".mp4", b"d").starts_with("stream-"));
        assert!(new_stream_id("...", b"e").starts_with("stream-"));
    }

    #[test]
    fn chunk_keys_sort_in_index_order() {
        let layout = KeyLayout::new("");
        assert_eq!(layout.chunk("s", 7), "s/chunk-000007");
        assert!(layout.chunk("s", 9) < layout.chunk("s", 10));
        assert_eq!(layout.metadata("s"), "s/metadata.json");
    }
}
