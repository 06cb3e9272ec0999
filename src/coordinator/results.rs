//! Applying job results: a chunk checkpointed, a stream completed, a job
//! failed (retried with backoff; the 1st, 10th, 100th failure in a row is
//! logged), a lease lost. A stream that wants more work is queued at once,
//! not at the next poll.

use super::announce::subject;
use super::*;

impl Coordinator {
    pub(super) fn handle_result(&mut self, result: JobResult, now: Instant) {
        self.in_flight.remove(&result.stream.stream_id);
        let Some(stream) = self.table.get_mut(&result.stream) else {
            match result.outcome {
                Outcome::Closed => self.events.stream_closed("incomplete", 0.0),
                Outcome::LeaseLost => self.lose_lease(&result.stream.stream_id),
                _ => {}
            }
            self.release(&result.stream.stream_id);
            return;
        };
        stream.retries += u64::from(result.failed_attempts);
        if result.last_error.is_some() {
            stream.last_error = result.last_error;
        }
        let job_started = stream.last_dispatch.unwrap_or(now);
        // What a refused disposal saw of the file, applied after the result.
        let mut refused_at = None;
        // The `file.deleted` / `file.moved` event of a disposal, queued once
        // the stream is no longer borrowed.
        let mut file_left = None;
        if let Some(chunks) = result.chunks {
            let before = stream.uploaded_bytes();
            stream.chunks = chunks;
            let grown = stream.uploaded_bytes().saturating_sub(before);
            stream.record_upload(grown, job_started);
        }
        let event = match result.outcome {
            Outcome::ChunkUploaded(record) => {
                let index = record.index;
                stream.record_upload(record.size_bytes, job_started);
                stream.chunks.insert(index, *record);
                Event::ChunkUploaded { index }
            }
            Outcome::Finalized {
                size,
                mtime_ns,
                revision,
                completed_at,
                lease_released,
            } => {
                if lease_released {
                    // The completion mark gave the lease up (a stream that
                    // grew meanwhile is claimed again).
                    self.ownership.drop_lease(&stream.id);
                }
                stream.revision = revision;
                stream.settle_completion();
                let lag = completed_at
                    .duration_since(stream.last_change_at)
                    .map_or(0.0, |d| d.as_secs_f64());
                self.events.stream_closed("complete", lag);
                Event::Finalized { size, mtime_ns }
            }
            Outcome::FinalizeInterrupted => {
                info!(
                    stream_id = stream.id.as_str(), path = stream.rel_path.as_str();
                    "stream {}: {} changed during completion; waiting for it to settle again",
                    stream.id, stream.rel_path
                );
                Event::FinalizeInterrupted
            }
            Outcome::Failed(reason) => {
                self.events.source_error();
                // The 1st, 10th, 100th, … failure in a row: a permanent
                // problem (permissions) is warned about once, and stays
                // visible in the logs without a line per retry.
                let failures_in_a_row = stream.state.failures() + 1;
                if failures_in_a_row == 1 || is_power_of_ten(failures_in_a_row) {
                    warn!(
                        stream_id = stream.id.as_str(), path = stream.rel_path.as_str();
                        "stream {}: job for {} failed ({failures_in_a_row} in a row): {reason}; retrying with backoff",
                        stream.id, stream.rel_path
                    );
                }
                Event::JobFailed
            }
            Outcome::Assembled { revision } => {
                stream.assembled_revision = stream.assembled_revision.max(revision);
                Event::Assembled
            }
            Outcome::Disposed {
                disposal,
                size,
                sha256,
            } => {
                match &disposal {
                    Disposal::Moved(to) => info!(
                        stream_id = stream.id.as_str(), path = stream.rel_path.as_str();
                        "stream {}: verified in S3; moved {} to {}",
                        stream.id, stream.rel_path, to.display()
                    ),
                    Disposal::Deleted => info!(
                        stream_id = stream.id.as_str(), path = stream.rel_path.as_str();
                        "stream {}: verified in S3; deleted {}",
                        stream.id, stream.rel_path
                    ),
                }
                self.events
                    .file_disposed(&stream.id, &stream.rel_path, &disposal);
                let moved_to = match &disposal {
                    Disposal::Moved(to) => Some(to.display().to_string()),
                    Disposal::Deleted => None,
                };
                // Its id names the completed revision: a retried queueing
                // of the same disposal is one event.
                file_left = Some(StreamEvent::file_left(
                    subject(stream, stream.revision),
                    (size, &sha256),
                    moved_to.as_deref(),
                    SystemTime::now(),
                ));
                Event::Disposed
            }
            Outcome::DisposalRefused { reason, seen } => {
                info!(
                    stream_id = stream.id.as_str(), path = stream.rel_path.as_str();
                    "stream {}: {} is kept: {reason}",
                    stream.id, stream.rel_path
                );
                refused_at = seen;
                Event::DisposalRefused
            }
            Outcome::Cancelled => Event::JobCancelled,
            Outcome::LeaseLost => {
                self.lose_lease(&result.stream.stream_id);
                Event::JobCancelled
            }
            Outcome::Closed => return,
        };
        if let Some(event) = file_left {
            self.announce(event);
        }
        let identity = result.stream.identity;
        let finalized = matches!(event, Event::Finalized { .. });
        let mut changes = self.table.apply(identity, event, self.at(now), &self.rules);
        if let Some((size, mtime_ns)) = refused_at {
            // The file changed after its completion: reopen at once.
            changes.extend(self.table.apply(
                identity,
                Event::Observed { size, mtime_ns },
                self.at(now),
                &self.rules,
            ));
        }
        let needs_owner = self
            .table
            .get(&identity)
            .is_some_and(|stream| stream.needs_owner());
        if !needs_owner {
            // Complete (and assembled, if wanted): the lease is given up.
            self.release(&result.stream.stream_id);
        }
        if let Some(stream) = self.table.get(&identity) {
            let view = finalized.then(|| stream.view(now));
            // Its next chunk goes out as soon as there is room, not at the
            // next poll.
            let wants_more = stream.state.wanted(now, &self.rules).is_some();
            if let Some(view) = view {
                self.remember(view);
            }
            if wants_more {
                self.enqueue(identity);
            }
        }
        self.apply_changes(changes, now);
    }

    /// Keeps a completed or closed stream visible in `/streams` for a while.
    pub(super) fn remember(&mut self, view: StreamView) {
        self.recent.retain(|old| old.stream_id != view.stream_id);
        if self.recent.len() == RECENT_STREAMS {
            self.recent.pop_front();
        }
        self.recent.push_back(view);
    }
}
