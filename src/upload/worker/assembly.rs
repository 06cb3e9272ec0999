//! Server-side assembly of a completed stream into one playable object,
//! `{prefix}{id}/{file_name}`, from its chunk objects: no byte is uploaded
//! twice, S3 copies them (UploadPartCopy).
//!
//! A stream of up to `ASSEMBLY_MAX_PARTS` chunks (S3 allows 10,000) is one
//! multipart upload with a part per chunk. A longer one (97 GiB at 10 MiB
//! chunks: an all-day 4K recording) is assembled in two levels: groups of
//! chunks into intermediate objects `{prefix}{id}/assembly-r{rev}-{n:05}`,
//! each within the part ceiling and within 5 GiB (S3's largest copy source),
//! then the intermediates into the final object. Intermediates are deleted
//! once the final object is verified. Every copied part is checkpointed in
//! Redis, so a crash resumes where it stopped; an intermediate finished
//! before the crash is recognised by its size.

use std::collections::BTreeMap;

use log::{info, warn};

use super::{Stop, Worker};
use crate::error::StorageError;
use crate::metadata::{Assembled, KeyLayout, StreamMetadata, StreamStatus, content_type_for};
use crate::store::ObjectInfo;
use crate::store::ports::AssemblyProgress;
use crate::upload::job::{AssembleJob, Outcome};

/// S3's largest source object for an UploadPartCopy without a byte range.
const MAX_COPY_SOURCE_BYTES: u64 = 5 * 1024 * 1024 * 1024;

/// Makes a refused request (4xx: upload gone, chunk missing, access
/// denied) a final answer for `storage_retry`: the assembly then starts over
/// later with backoff, instead of retrying the same request forever.
fn client_error_is_final<T>(
    result: Result<T, StorageError>,
) -> Result<Result<T, StorageError>, StorageError> {
    match result {
        Err(err) if err.is_client_error() => Ok(Err(err)),
        other => other.map(Ok),
    }
}

/// One object to compose from others, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Composition {
    key: String,
    /// Source keys, one part each.
    sources: Vec<String>,
    /// The size the composed object must have.
    size_bytes: u64,
}

/// The compositions that assemble `metadata`, in order: intermediates
/// first (none when the chunks fit in one upload), the final object last.
/// `Err` says why the stream cannot be assembled.
fn plan(
    layout: &KeyLayout,
    metadata: &StreamMetadata,
    max_parts: usize,
) -> Result<Vec<Composition>, String> {
    let chunks = &metadata.chunks;
    let final_key = layout.assembled(
        &metadata.stream_id,
        &metadata.source.file_name,
        metadata.revision,
    );
    let whole = |key: String, parts: &[crate::metadata::ChunkRecord]| Composition {
        key,
        sources: parts.iter().map(|chunk| chunk.key.clone()).collect(),
        size_bytes: parts.iter().map(|chunk| chunk.size_bytes).sum(),
    };
    if chunks.len() <= max_parts {
        return Ok(vec![whole(final_key, chunks)]);
    }
    let largest_chunk = chunks
        .iter()
        .map(|chunk| chunk.size_bytes)
        .max()
        .unwrap_or(1);
    let per_group = max_parts
        .min(usize::try_from(MAX_COPY_SOURCE_BYTES / largest_chunk.max(1)).unwrap_or(usize::MAX));
    let groups = chunks.len().div_ceil(per_group.max(1));
    if per_group < 2 || groups > max_parts {
        return Err(format!(
            "{} chunks do not fit in two levels of {max_parts} parts of at most 5 GiB (use a larger CHUNK_SIZE)",
            chunks.len()
        ));
    }
    let mut plan: Vec<Composition> = chunks
        .chunks(per_group)
        .enumerate()
        .map(|(index, group)| {
            whole(
                layout.assembly_part(&metadata.stream_id, metadata.revision, index),
                group,
            )
        })
        .collect();
    plan.push(Composition {
        key: final_key,
        sources: plan.iter().map(|step| step.key.clone()).collect(),
        size_bytes: metadata.total_size_bytes,
    });
    Ok(plan)
}

impl Worker {
    /// Assembles a complete stream (see the module doc) and records the
    /// assembled object in its metadata.
    pub(super) fn assemble(&mut self, job: &AssembleJob) -> Result<Outcome, Stop> {
        let stream_id = job.stream.stream_id.as_str();
        let token = job.stream.token;
        let metadata_key = self.layout.metadata(stream_id);
        let body =
            self.storage_retry((stream_id, token), None, || self.store.get(&metadata_key))?;
        let mut metadata = match StreamMetadata::decode(&body) {
            Ok(metadata) => metadata,
            Err(err) => {
                return Ok(Outcome::Failed(format!("{metadata_key}: {err}")));
            }
        };
        if metadata.revision != job.revision || metadata.status != StreamStatus::Complete {
            // Superseded by a newer revision, which gets its own assembly.
            return Ok(Outcome::Assembled { revision: 0 });
        }
        let steps = match plan(&self.layout, &metadata, self.assembly_max_parts) {
            Ok(steps) => steps,
            Err(why) => {
                warn!(stream_id = stream_id; "stream {stream_id}: not assembled: {why}");
                return Ok(Outcome::Assembled { revision: 0 });
            }
        };
        let Some((last, intermediates)) = steps.split_last() else {
            return Ok(Outcome::Assembled { revision: 0 });
        };
        for step in intermediates {
            let done =
                self.storage_retry((stream_id, token), None, || self.store.head(&step.key))?;
            if done.is_some_and(|object| object.size == step.size_bytes) {
                continue;
            }
            if let Err(problem) = self.compose(job, metadata.revision, step)? {
                return self.restart_assembly((stream_id, token), &problem);
            }
        }
        let (object, etag) = match self.compose(job, metadata.revision, last)? {
            Ok(composed) => composed,
            Err(problem) => return self.restart_assembly((stream_id, token), &problem),
        };
        for step in intermediates {
            self.storage_retry((stream_id, token), None, || self.store.delete(&step.key))?;
        }
        metadata.assembled = Some(Assembled {
            key: last.key.clone(),
            size_bytes: object.size,
            etag: etag.filter(|e| !e.is_empty()).unwrap_or(object.etag),
        });
        self.write_metadata(&metadata, token)?;
        let revision = metadata.revision;
        self.checkpoint_with_retry("assembly", |store| {
            store.finish_assembly(stream_id, token, revision)
        })?;
        info!(
            stream_id = stream_id;
            "stream {stream_id}: assembled {} ({} bytes from {} chunks, server-side{})",
            last.key,
            object.size,
            metadata.chunks.len(),
            if intermediates.is_empty() {
                String::new()
            } else {
                format!(", in two levels via {} intermediate objects", intermediates.len())
            }
        );
        Ok(Outcome::Assembled { revision })
    }

    /// Composes `step.key` from its sources with one multipart upload,
    /// resuming the upload recorded in Redis when it is for this key and
    /// revision (any other recorded upload is aborted). `Ok(Err(_))` when the
    /// upload cannot be finished and the assembly must start over.
    fn compose(
        &mut self,
        job: &AssembleJob,
        revision: u32,
        step: &Composition,
    ) -> Result<Result<(ObjectInfo, Option<String>), StorageError>, Stop> {
        let stream_id = job.stream.stream_id.as_str();
        let token = job.stream.token;
        let key = &step.key;
        let recorded =
            self.checkpoint_with_retry("assembly", |store| Ok(store.load_assembly(stream_id)?))?;
        let mut progress = match recorded {
            Some(progress) if progress.revision == revision && &progress.key == key => {
                info!(
                    stream_id = stream_id;
                    "stream {stream_id}: resuming the assembly of {key} ({} of {} parts done)",
                    progress.parts.len(),
                    step.sources.len()
                );
                progress
            }
            stale => {
                if let Some(stale) = stale {
                    // Best effort: an unfinished upload costs storage, nothing
                    // else, and the hourly sweep removes it too.
                    match self.store.abort_multipart(&stale.key, &stale.upload_id) {
                        Ok(()) => info!(
                            "stream {stream_id}: aborted the earlier multipart upload of {} (revision {})",
                            stale.key, stale.revision
                        ),
                        Err(err) => warn!(
                            "stream {stream_id}: cannot abort an earlier multipart upload: {err}"
                        ),
                    }
                }
                let content_type = content_type_for(key);
                let upload_id = self.storage_retry((stream_id, token), None, || {
                    self.store.initiate_multipart(key, content_type)
                })?;
                let progress = AssemblyProgress {
                    revision,
                    key: key.clone(),
                    upload_id,
                    parts: BTreeMap::new(),
                };
                self.checkpoint_with_retry("assembly", |store| {
                    store.save_assembly(stream_id, token, Some(&progress))
                })?;
                progress
            }
        };

        for (number, source) in (1u32..).zip(&step.sources) {
            if progress.parts.contains_key(&number) {
                continue;
            }
            if self.shutting_down() {
                return Err(Stop::Cancelled);
            }
            let copied = self.storage_retry((stream_id, token), None, || {
                client_error_is_final(self.store.upload_part_copy(
                    key,
                    &progress.upload_id,
                    number,
                    source,
                ))
            })?;
            match copied {
                Ok(etag) => {
                    progress.parts.insert(number, etag);
                    self.checkpoint_with_retry("assembly", |store| {
                        store.save_assembly(stream_id, token, Some(&progress))
                    })?;
                }
                Err(missing) => return Ok(Err(missing)),
            }
        }

        let parts: Vec<(u32, String)> = progress
            .parts
            .iter()
            .map(|(number, etag)| (*number, etag.clone()))
            .collect();
        let completed = self.storage_retry((stream_id, token), None, || {
            client_error_is_final(
                self.store
                    .complete_multipart(key, &progress.upload_id, &parts),
            )
        })?;
        // A retried complete whose first attempt succeeded finds no upload.
        let etag = completed.ok();
        let head = self.storage_retry((stream_id, token), None, || self.store.head(key))?;
        Ok(match head {
            Some(object) if object.size == step.size_bytes => Ok((object, etag)),
            other => Err(StorageError::Other {
                key: key.clone(),
                detail: format!(
                    "assembled object has {:?} bytes, expected {}",
                    other.map(|o| o.size),
                    step.size_bytes
                ),
            }),
        })
    }

    /// Forgets a multipart upload that cannot be finished (gone, or wrong),
    /// so the next attempt starts a fresh one.
    fn restart_assembly(
        &mut self,
        (stream_id, token): (&str, u64),
        problem: &StorageError,
    ) -> Result<Outcome, Stop> {
        self.checkpoint_with_retry("assembly", |store| {
            store.save_assembly(stream_id, token, None)
        })?;
        Ok(Outcome::Failed(format!("assembly starts over: {problem}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::ChunkRecord;

    fn metadata(chunks: u64, chunk_size: u64) -> StreamMetadata {
        let records: Vec<ChunkRecord> = (0..chunks)
            .map(|index| ChunkRecord {
                index,
                key: format!("p/s/chunk-{index:06}"),
                offset: index * chunk_size,
                size_bytes: chunk_size,
                sha256: String::new(),
                uploaded_at: String::new(),
                xxh3: None,
                whole_sha256: None,
            })
            .collect();
        let mut metadata: StreamMetadata = serde_json::from_value(serde_json::json!({
            "schema_version": 1, "stream_id": "s", "revision": 2, "status": "complete",
            "source": {"path": "cam.mp4", "file_name": "cam.mp4"},
            "total_size_bytes": chunks * chunk_size, "chunk_size_bytes": chunk_size,
            "chunks": [], "started_at": "", "completed_at": "",
            "stream_duration_seconds": 0.0, "media": {"duration_seconds": null}
        }))
        .expect("test metadata");
        metadata.chunks = records;
        metadata
    }

    #[test]
    fn streams_within_the_part_ceiling_assemble_in_one_upload() {
        let steps = plan(&KeyLayout::new("p/"), &metadata(3, 10), 3).expect("plan");
        assert_eq!(steps.len(), 1);
        assert_eq!(steps[0].key, "p/s/cam.mp4");
        assert_eq!(steps[0].sources.len(), 3);
        assert_eq!(steps[0].size_bytes, 30);
    }

    #[test]
    fn longer_streams_assemble_through_intermediates_within_the_ceiling() {
        let steps = plan(&KeyLayout::new("p/"), &metadata(7, 10), 3).expect("plan");
        let keys: Vec<&str> = steps.iter().map(|step| step.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "p/s/assembly-r2-00000",
                "p/s/assembly-r2-00001",
                "p/s/assembly-r2-00002",
                "p/s/cam.mp4"
            ]
        );
        assert_eq!(steps[2].sources, ["p/s/chunk-000006"]);
        assert_eq!(steps[3].sources.len(), 3);
        assert_eq!(steps[3].size_bytes, 70);
        assert!(steps.iter().all(|step| step.sources.len() <= 3));
        let copied: u64 = steps[..3].iter().map(|step| step.size_bytes).sum();
        assert_eq!(copied, 70, "every chunk lands in exactly one intermediate");
    }

    #[test]
    fn intermediates_stay_within_the_copy_source_limit() {
        let gib = 1024 * 1024 * 1024;
        let steps = plan(&KeyLayout::new("p/"), &metadata(12, gib), 10).expect("plan");
        assert!(
            steps[..steps.len() - 1]
                .iter()
                .all(|step| step.size_bytes <= 5 * gib)
        );
        assert_eq!(
            steps.len(),
            4,
            "groups of five 1 GiB chunks, then the final"
        );
    }

    #[test]
    fn a_stream_beyond_two_levels_is_refused_with_a_reason() {
        let why = plan(&KeyLayout::new("p/"), &metadata(10, 10), 3).expect_err("too long");
        assert!(why.contains("10 chunks"), "{why}");
    }
}
