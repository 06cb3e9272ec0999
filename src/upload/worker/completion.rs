//! The jobs that end a stream revision: completion (verify every chunk
//! against the file, re-upload what changed, write `metadata.json`, mark the
//! stream complete) and close (record an incomplete stream's uploaded
//! prefix). Both write the metadata object only after Redis confirmed the
//! lease, so a replica that lost the stream never overwrites its new owner's.

use std::collections::BTreeMap;
use std::fs::File;
use std::time::SystemTime;

use super::{Stop, Worker, sha256, snapshot};
use crate::chunk_hash::{ChunkHashes, ChunkOnDisk, Resumption, RunningSha256, WholeFile};
use crate::error::SourceError;
use crate::media::mp4_duration_seconds;
use crate::metadata::{
    ChunkRecord, Media, SCHEMA_VERSION, Source, StreamMetadata, StreamStatus, contiguous_prefix,
    rfc3339,
};
use crate::notify::{StreamEvent, StreamSubject};
use crate::readback::fetch_metadata;
use crate::store::ports::{Completion, HeadPrint};
use crate::upload::job::{CloseJob, FinalizeJob, Outcome, StreamFacts};
use log::{info, warn};

impl Worker {
    pub(super) fn finalize(
        &mut self,
        job: &FinalizeJob,
        chunks: &mut BTreeMap<u64, ChunkRecord>,
    ) -> Outcome {
        let stream_id = job.stream.stream_id.as_str();
        let token = job.stream.token;
        let path = job.path.as_path();
        let before = match snapshot(path) {
            Ok(before) => before,
            Err(err) => return Outcome::Failed(format!("cannot stat {}: {err}", path.display())),
        };
        // The identity's device part is normalized (see `FileIdentity`); at
        // the stream's own path, the inode alone tells the file apart.
        let same_file = before.inode == job.stream.identity.inode;
        if !same_file || before.size != job.expected_size {
            return Outcome::FinalizeInterrupted;
        }
        let file = match File::open(path) {
            Ok(file) => file,
            Err(err) => return Outcome::Failed(format!("cannot open {}: {err}", path.display())),
        };
        self.recall_earlier_revision(stream_id, &job.facts, chunks);

        let chunk_size = job.facts.chunk_size;
        let chunk_count = before.size.div_ceil(chunk_size);
        let mut whole = WholeFile::new(chunk_size);
        let last_state = chunks
            .iter()
            .rev()
            .find(|(_, record)| record.whole_sha256.is_some())
            .map(|(&index, _)| index);
        let mut reuploaded = 0u32;
        let unreadable = |err: SourceError| {
            if err.source.kind() == std::io::ErrorKind::UnexpectedEof {
                Outcome::FinalizeInterrupted
            } else {
                Outcome::Failed(err.to_string())
            }
        };
        let span = |index: u64| {
            let offset = index * chunk_size;
            (offset, chunk_size.min(before.size - offset))
        };
        // Reads chunk `index` whole into the buffer; `expected` is its fast
        // hash when it was fingerprinted already, and bytes that differ from
        // it now mean the file is changing.
        let load = |worker: &mut Worker, index: u64, expected: Option<&str>| {
            let (offset, len) = span(index);
            worker
                .read_into_buffer(&file, path, offset, len)
                .map_err(unreadable)?;
            let xxh3 = worker.buffer.fast_hash();
            match expected {
                Some(expected) if expected != xxh3 => Err(Outcome::FinalizeInterrupted),
                _ => Ok(xxh3),
            }
        };
        for index in 0..chunk_count {
            if self.shutting_down() {
                return Outcome::Cancelled;
            }
            let (offset, len) = span(index);
            let previous = chunks.get(&index).filter(|p| p.size_bytes == len);
            let recorded = previous.and_then(|p| p.whole_sha256.as_ref());
            let state_ahead = last_state.is_some_and(|last| last > index);
            // A chunk that can be told unchanged by its fast hash, and whose
            // whole-file state can come from a record, is only fingerprinted
            // (read in cache-sized pieces); any other is read whole.
            let fingerprint_only = previous.is_some_and(|p| p.xxh3.is_some())
                && !whole.must_hash(index, recorded.is_some(), state_ahead);
            let read = if fingerprint_only {
                self.fingerprint(&file, path, offset, len)
                    .map_err(unreadable)
            } else {
                load(self, index, None)
            };
            let xxh3 = match read {
                Ok(xxh3) => xxh3,
                Err(outcome) => return outcome,
            };
            let mut in_buffer = !fingerprint_only;
            // A record from before xxh3 was recorded is checked with sha256.
            let mut digest = None;
            let unchanged = previous.is_some_and(|p| match &p.xxh3 {
                Some(recorded) => *recorded == xxh3,
                None => p.sha256 == hex::encode(*digest.insert(sha256(self.buffer.bytes()))),
            });
            let on_disk = ChunkOnDisk {
                index,
                size: len,
                xxh3: &xxh3,
                unchanged,
            };
            let whole_sha256 = match whole.resume(&on_disk, recorded, state_ahead) {
                Resumption::Resumed(state) => Some(state),
                Resumption::PassedOver => None,
                Resumption::NeedsBytes => {
                    if !in_buffer {
                        if let Err(outcome) = load(self, index, Some(&xxh3)) {
                            return outcome;
                        }
                        in_buffer = true;
                    }
                    if unchanged || digest.is_some() {
                        Some(whole.hash_next(self.buffer.bytes(), &xxh3))
                    } else {
                        // Uploaded below: its own digest comes in the same pass.
                        let (chunk_digest, state) =
                            whole.hash_next_with_digest(self.buffer.bytes(), &xxh3);
                        digest = Some(chunk_digest);
                        Some(state)
                    }
                }
            };
            if unchanged {
                if let Some(record) = chunks.get_mut(&index) {
                    record.whole_sha256 = whole_sha256;
                }
                continue;
            }
            if !in_buffer && let Err(outcome) = load(self, index, Some(&xxh3)) {
                return outcome;
            }
            // Same place, same length, other bytes: the writer rewrote them
            // (ffmpeg patching the mdat size, or a +faststart rewrite).
            let changed = previous.is_some();
            let hashes = ChunkHashes {
                sha256: digest.unwrap_or_else(|| sha256(self.buffer.bytes())),
                xxh3,
                whole_sha256,
            };
            match self.store_buffer_as_chunk(
                (stream_id, token),
                path,
                (index, offset),
                hashes,
                changed,
            ) {
                Ok(record) => {
                    if changed {
                        reuploaded += 1;
                        info!(
                            stream_id = stream_id, chunk = index;
                            "stream {stream_id}: chunk {index} changed on disk after upload; uploaded again"
                        );
                    }
                    chunks.insert(index, record);
                }
                Err(stop) => return stop.outcome(|| Outcome::FinalizeInterrupted),
            }
        }
        chunks.retain(|&index, _| index < chunk_count);
        // Chunks passed over in the hope of resuming from a later state that
        // turned out stale (a reopened file rewritten before it) are read
        // and hashed again.
        if let Some(from) = whole.behind() {
            for index in from..chunk_count {
                if self.shutting_down() {
                    return Outcome::Cancelled;
                }
                match load(self, index, None) {
                    Ok(xxh3) => whole.catch_up(self.buffer.bytes(), &xxh3),
                    Err(outcome) => return outcome,
                };
            }
        }

        match snapshot(path) {
            Ok(after) if after == before => {}
            _ => return Outcome::FinalizeInterrupted,
        }

        let hashed_for_whole_file = whole.hashed_bytes();
        let checkpoint = whole.checkpoint().cloned();
        let completed_at = SystemTime::now();
        let metadata = StreamMetadata {
            total_size_bytes: before.size,
            sha256: Some(hex::encode(whole.finish())),
            chunks: published_with_checkpoint(chunks, checkpoint),
            media: Media {
                duration_seconds: mp4_duration_seconds(path),
            },
            ..metadata_of(stream_id, &job.facts, StreamStatus::Complete, completed_at)
        };
        if metadata.media.duration_seconds.is_none() {
            warn!(
                "stream {stream_id}: {} is not a readable MP4; uploaded byte-exact, media duration unknown",
                path.display()
            );
        }
        if let Err(stop) = self.write_metadata(&metadata, token) {
            return stop.outcome(|| Outcome::Cancelled);
        }
        let announcement = self.announce.then(|| {
            let sha256 = metadata.sha256.as_deref().unwrap_or_default();
            StreamEvent::completed(
                subject(&metadata, &job.facts),
                &self.layout,
                (before.size, sha256, chunk_count),
                completed_at,
            )
            .announcement()
        });
        let completion = Completion {
            revision: job.facts.revision,
            size: before.size,
            mtime_ns: before.mtime_ns,
            last_change_at: job.facts.last_change_at,
            completed_at,
            head: chunks.get(&0).map(HeadPrint::of),
            release_lease: job.release_lease,
            announcement,
        };
        if let Err(stop) = self.checkpoint_with_retry("completion", |store| {
            store.mark_complete(stream_id, token, &completion)
        }) {
            return stop.outcome(|| Outcome::Cancelled);
        }
        info!(
            stream_id = stream_id, path = job.facts.rel_path.as_str();
            "stream {stream_id}: complete ({}, {} bytes, {} chunks, {reuploaded} re-uploaded after verification, {hashed_for_whole_file} bytes hashed again for the whole-file sha256, media {}, revision {})",
            job.facts.rel_path,
            before.size,
            chunk_count,
            metadata
                .media
                .duration_seconds
                .map_or("unknown".to_string(), |s| format!("{s:.2}s")),
            job.facts.revision
        );
        Outcome::Finalized {
            size: before.size,
            mtime_ns: before.mtime_ns,
            revision: job.facts.revision,
            completed_at,
            lease_released: job.release_lease,
        }
    }

    /// Writes the stream's metadata object, right after Redis confirmed that
    /// this process still holds the stream with `token`: a replica that lost
    /// the stream never replaces the metadata its new owner wrote.
    pub(super) fn write_metadata(
        &mut self,
        metadata: &StreamMetadata,
        token: u64,
    ) -> Result<(), Stop> {
        let body = serde_json::to_vec_pretty(metadata).expect("metadata serializes");
        let key = self.layout.metadata(&metadata.stream_id);
        self.checkpoint_with_retry("lease check", |store| {
            store.confirm_lease(&metadata.stream_id, token)
        })?;
        self.put_with_retry(
            (&metadata.stream_id, token),
            &key,
            "application/json",
            &body,
            &sha256(&body),
            None,
        )
    }

    /// Fills in, from the stream's `metadata.json`, the chunk records of the
    /// revision before `facts.revision` that `chunks` lacks: Redis and the
    /// coordinator drop them at completion. Chunks whose record cannot be
    /// read back are simply uploaded again (their keys are deterministic),
    /// and so are the chunks of a revision whose chunk objects were deleted
    /// after assembly: the new revision never refers to a missing object.
    fn recall_earlier_revision(
        &self,
        stream_id: &str,
        facts: &StreamFacts,
        chunks: &mut BTreeMap<u64, ChunkRecord>,
    ) {
        if facts.revision <= 1 || chunks.contains_key(&0) {
            return;
        }
        match fetch_metadata(self.store.as_ref(), &self.layout, stream_id) {
            Ok(earlier) if earlier.revision + 1 == facts.revision && earlier.chunks_deleted => {
                info!(
                    "stream {stream_id}: the chunk objects of revision {} were deleted after assembly; its chunks are uploaded again",
                    earlier.revision
                )
            }
            Ok(earlier)
                if earlier.revision + 1 == facts.revision
                    && earlier.chunk_size_bytes == facts.chunk_size =>
            {
                for record in earlier.chunks {
                    chunks.entry(record.index).or_insert(record);
                }
            }
            Ok(earlier) => warn!(
                "stream {stream_id}: metadata.json holds revision {}, not {}; its chunks are verified by uploading them again",
                earlier.revision,
                facts.revision - 1
            ),
            Err(err) => warn!(
                "stream {stream_id}: cannot read the chunk records of revision {} back ({err}); its chunks are verified by uploading them again",
                facts.revision - 1
            ),
        }
    }

    pub(super) fn close(&mut self, job: &CloseJob) -> Result<Outcome, Stop> {
        let stream_id = job.stream.stream_id.as_str();
        let mut known = job.chunks.clone();
        self.recall_earlier_revision(stream_id, &job.facts, &mut known);
        let chunks: Vec<ChunkRecord> = contiguous_prefix(&known)
            .map(ChunkRecord::published)
            .collect();
        let uploaded = chunks.iter().map(|chunk| chunk.size_bytes).sum();
        let metadata = StreamMetadata {
            reason: Some(job.reason.as_str().to_string()),
            total_size_bytes: uploaded,
            chunks,
            ..metadata_of(
                stream_id,
                &job.facts,
                StreamStatus::Incomplete,
                SystemTime::now(),
            )
        };
        let token = job.stream.token;
        self.write_metadata(&metadata, token)?;
        let reason = job.reason.as_str();
        let announcement = self.announce.then(|| {
            StreamEvent::given_up(
                subject(&metadata, &job.facts),
                &self.layout,
                reason,
                (metadata.total_size_bytes, metadata.chunks.len() as u64),
                SystemTime::now(),
            )
            .announcement()
        });
        self.checkpoint_with_retry("close", |store| {
            store.mark_incomplete(stream_id, token, reason, announcement.as_ref())
        })?;
        warn!(
            stream_id = stream_id, path = job.facts.rel_path.as_str();
            "stream {stream_id}: closed as incomplete ({reason}) for {}, {} bytes uploaded in {} chunks",
            job.facts.rel_path,
            metadata.total_size_bytes,
            metadata.chunks.len()
        );
        Ok(Outcome::Closed)
    }
}

/// The chunk records as `metadata.json` lists them: the last full chunk
/// keeps its whole-file sha256 state, from which a later revision resumes.
fn published_with_checkpoint(
    chunks: &BTreeMap<u64, ChunkRecord>,
    checkpoint: Option<(u64, RunningSha256)>,
) -> Vec<ChunkRecord> {
    chunks
        .values()
        .map(|record| ChunkRecord {
            whole_sha256: checkpoint
                .as_ref()
                .filter(|(index, _)| *index == record.index)
                .map(|(_, state)| state.clone()),
            ..record.published()
        })
        .collect()
}

/// What every event about this revision names: the stream and its file.
fn subject<'a>(metadata: &'a StreamMetadata, facts: &StreamFacts) -> StreamSubject<'a> {
    StreamSubject {
        stream_id: &metadata.stream_id,
        revision: metadata.revision,
        source: metadata.source.clone(),
        started_at: Some(facts.started_at),
    }
}

/// The metadata every stream revision has, whatever its status: no bytes,
/// no chunks, no sha256 and no media facts until the caller fills them in.
fn metadata_of(
    stream_id: &str,
    facts: &StreamFacts,
    status: StreamStatus,
    completed_at: SystemTime,
) -> StreamMetadata {
    StreamMetadata {
        schema_version: SCHEMA_VERSION,
        stream_id: stream_id.to_string(),
        revision: facts.revision,
        status,
        reason: None,
        source: Source {
            path: facts.rel_path.clone(),
            file_name: facts.file_name.clone(),
        },
        total_size_bytes: 0,
        sha256: None,
        chunk_size_bytes: facts.chunk_size,
        chunks: Vec::new(),
        started_at: rfc3339(facts.started_at),
        completed_at: rfc3339(completed_at),
        stream_duration_seconds: facts
            .last_change_at
            .duration_since(facts.started_at)
            .map_or(0.0, |d| d.as_secs_f64()),
        media: Media {
            duration_seconds: None,
        },
        assembled: None,
        chunks_deleted: false,
    }
}
