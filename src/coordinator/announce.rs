//! The events the coordinator itself decides: `stream.reopened` (a complete
//! stream's file changed again) and `stream.failed` for a quarantined
//! stream. Neither decision is a Redis write of its own, so the event is
//! queued through `CheckpointStore::announce` right away, and kept here
//! (bounded) and retried every turn while Redis cannot take it. Events of
//! decisions that workers persist (completed, closed) are queued by the
//! workers, atomically with that write.

use super::*;

/// The most events kept while Redis is out of reach; beyond it the oldest
/// is dropped, with an error in the log.
const UNANNOUNCED_LIMIT: usize = 10_000;

/// The subject of an event about `stream` at `revision`.
pub(super) fn subject(stream: &TrackedStream, revision: u32) -> StreamSubject<'_> {
    StreamSubject {
        stream_id: &stream.id,
        revision,
        source: Source {
            path: stream.rel_path.clone(),
            file_name: stream.file_name.clone(),
        },
        started_at: Some(stream.started_at),
    }
}

impl Coordinator {
    /// Queues `event` in the outbox, if any event destination is configured.
    pub(super) fn announce(&mut self, event: StreamEvent) {
        if !self.config.events.enabled() {
            return;
        }
        if self.unannounced.len() == UNANNOUNCED_LIMIT
            && let Some(dropped) = self.unannounced.pop_front()
        {
            error!(
                "event {}: Redis has been out of reach for {UNANNOUNCED_LIMIT} events; dropping it",
                dropped.id
            );
        }
        self.unannounced.push_back(event.announcement());
        self.retry_announcements();
    }

    /// Hands the waiting events to the outbox, oldest first, until Redis
    /// refuses one (the rest wait for the next turn).
    pub(super) fn retry_announcements(&mut self) {
        while let Some(event) = self.unannounced.front() {
            match self.checkpoints.announce(event) {
                Ok(_) => {
                    self.unannounced.pop_front();
                }
                Err(err) => {
                    debug!(
                        "event {}: cannot queue it in Redis yet ({err}); retrying next turn",
                        event.id
                    );
                    return;
                }
            }
        }
    }
}
