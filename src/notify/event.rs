//! The completion events themselves: their types, their JSON, and their ids.
//!
//! An event is built where the decision it announces is persisted, and its id
//! derives from the stream id, the revision and the type, so every retry of
//! that decision (a lost Redis reply, a second replica seeing the same
//! reopen, a restart) produces the same id, and receivers can deduplicate on
//! it. docs/events.md is the receiver's reference for this JSON.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::metadata::{KeyLayout, Source, rfc3339};

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventType {
    /// A stream revision is complete: metadata.json is stored.
    #[serde(rename = "stream.completed")]
    StreamCompleted,
    /// A completed stream's file changed again; a new revision follows.
    #[serde(rename = "stream.reopened")]
    StreamReopened,
    /// A stream was given up (closed as incomplete) or quarantined.
    #[serde(rename = "stream.failed")]
    StreamFailed,
    /// The local file was deleted after its upload was verified.
    #[serde(rename = "file.deleted")]
    FileDeleted,
    /// The local file was moved to `COMPLETED_DIR` after verification.
    #[serde(rename = "file.moved")]
    FileMoved,
}

impl EventType {
    /// The name in the JSON and in `X-Chunkstream-Event`.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::StreamCompleted => "stream.completed",
            EventType::StreamReopened => "stream.reopened",
            EventType::StreamFailed => "stream.failed",
            EventType::FileDeleted => "file.deleted",
            EventType::FileMoved => "file.moved",
        }
    }
}

/// Where a stream's objects are in the bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Objects {
    /// The key of `metadata.json` (it lists every chunk with its sha256).
    pub metadata: String,
    /// Chunk `i` is at `{chunk_prefix}{i:06}`.
    pub chunk_prefix: String,
    pub chunk_count: u64,
}

/// One event, exactly as delivered (the JSON body of the webhook and the
/// `event` field of the Redis stream entry).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamEvent {
    /// Stable across retries: `{stream_id}/{revision}/{type}`.
    pub id: String,
    #[serde(rename = "type")]
    pub kind: EventType,
    pub stream_id: String,
    /// The revision the event is about (0 when unknown: a quarantined record).
    pub revision: u32,
    pub source: Source,
    /// The file's size (completed and file events), or the bytes uploaded as
    /// a contiguous prefix (failed); null when unknown.
    pub size_bytes: Option<u64>,
    /// The whole file's sha256 in hex; only for a completed revision.
    pub sha256: Option<String>,
    /// Null when the stream has no objects worth naming (quarantined).
    pub objects: Option<Objects>,
    /// Why a stream failed: `truncated`, `replaced`, `vanished`, or
    /// `quarantined: …`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// `file.moved`: where the file is now (absolute path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moved_to: Option<String>,
    /// When the stream was first seen (RFC 3339), when known.
    pub started_at: Option<String>,
    /// When the revision completed (completed and file events).
    pub completed_at: Option<String>,
    /// When the decision this event announces was made.
    pub occurred_at: String,
}

/// The facts every event about a stream carries.
#[derive(Debug, Clone)]
pub struct StreamSubject<'a> {
    pub stream_id: &'a str,
    pub revision: u32,
    pub source: Source,
    pub started_at: Option<SystemTime>,
}

/// An event ready for the outbox: its id, its type, and its JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announcement {
    pub id: String,
    pub kind: EventType,
    pub json: String,
}

impl StreamEvent {
    /// The event with no optional facts yet; the constructors fill them in.
    fn about(kind: EventType, subject: StreamSubject<'_>, occurred_at: SystemTime) -> Self {
        Self {
            id: event_id(subject.stream_id, subject.revision, kind),
            kind,
            stream_id: subject.stream_id.to_string(),
            revision: subject.revision,
            source: subject.source,
            size_bytes: None,
            sha256: None,
            objects: None,
            reason: None,
            moved_to: None,
            started_at: subject.started_at.map(rfc3339),
            completed_at: None,
            occurred_at: rfc3339(occurred_at),
        }
    }

    /// `stream.completed`: revision `subject.revision` is in the bucket.
    pub fn completed(
        subject: StreamSubject<'_>,
        layout: &KeyLayout,
        (size, sha256, chunk_count): (u64, &str, u64),
        completed_at: SystemTime,
    ) -> Self {
        let objects = Some(objects(layout, subject.stream_id, chunk_count));
        Self {
            size_bytes: Some(size),
            sha256: Some(sha256.to_string()),
            objects,
            completed_at: Some(rfc3339(completed_at)),
            ..Self::about(EventType::StreamCompleted, subject, completed_at)
        }
    }

    /// `stream.reopened`: completed revision `subject.revision` changed on
    /// disk (now `size` bytes); the next completion is a new revision.
    pub fn reopened(subject: StreamSubject<'_>, size: u64, occurred_at: SystemTime) -> Self {
        Self {
            size_bytes: Some(size),
            ..Self::about(EventType::StreamReopened, subject, occurred_at)
        }
    }

    /// `stream.failed`: closed as incomplete for `reason`, with `uploaded`
    /// bytes as a contiguous prefix in `chunk_count` chunks.
    pub fn given_up(
        subject: StreamSubject<'_>,
        layout: &KeyLayout,
        reason: &str,
        (uploaded, chunk_count): (u64, u64),
        occurred_at: SystemTime,
    ) -> Self {
        let objects = Some(objects(layout, subject.stream_id, chunk_count));
        Self {
            size_bytes: Some(uploaded),
            objects,
            reason: Some(reason.to_string()),
            ..Self::about(EventType::StreamFailed, subject, occurred_at)
        }
    }

    /// `stream.failed`: the stream's checkpoint record cannot be trusted,
    /// so nothing more is done for it until an operator steps in.
    pub fn quarantined(subject: StreamSubject<'_>, reason: &str, occurred_at: SystemTime) -> Self {
        Self {
            reason: Some(format!("quarantined: {reason}")),
            ..Self::about(EventType::StreamFailed, subject, occurred_at)
        }
    }

    /// `file.deleted` (`moved_to` is `None`) or `file.moved`: the local file
    /// of completed revision `subject.revision` (`size` bytes, `sha256`) left
    /// the watch directory after its objects were verified.
    pub fn file_left(
        subject: StreamSubject<'_>,
        (size, sha256): (u64, &str),
        moved_to: Option<&str>,
        occurred_at: SystemTime,
    ) -> Self {
        let kind = match moved_to {
            Some(_) => EventType::FileMoved,
            None => EventType::FileDeleted,
        };
        Self {
            size_bytes: Some(size),
            sha256: Some(sha256.to_string()),
            moved_to: moved_to.map(str::to_string),
            ..Self::about(kind, subject, occurred_at)
        }
    }

    /// The event as it goes into the outbox.
    pub fn announcement(&self) -> Announcement {
        Announcement {
            id: self.id.clone(),
            kind: self.kind,
            json: serde_json::to_string(self).expect("events serialize"),
        }
    }
}

/// `{stream_id}/{revision}/{type}`: the same decision always gets the same id.
pub fn event_id(stream_id: &str, revision: u32, kind: EventType) -> String {
    format!("{stream_id}/{revision}/{}", kind.as_str())
}

fn objects(layout: &KeyLayout, stream_id: &str, chunk_count: u64) -> Objects {
    Objects {
        metadata: layout.metadata(stream_id),
        chunk_prefix: layout.chunk_prefix(stream_id),
        chunk_count,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subject() -> StreamSubject<'static> {
        StreamSubject {
            stream_id: "cam1-3f9a0c1b2d4e",
            revision: 2,
            source: Source {
                path: "sub/cam1.mp4".into(),
                file_name: "cam1.mp4".into(),
            },
            started_at: None,
        }
    }

    #[test]
    fn the_id_names_the_stream_the_revision_and_the_type() {
        let event = StreamEvent::reopened(subject(), 7, SystemTime::UNIX_EPOCH);
        assert_eq!(event.id, "cam1-3f9a0c1b2d4e/2/stream.reopened");
        let again = StreamEvent::reopened(subject(), 9, SystemTime::now());
        assert_eq!(again.id, event.id, "the same decision, the same id");
    }

    #[test]
    fn file_events_say_whether_the_file_was_deleted_or_moved() {
        let deleted = StreamEvent::file_left(subject(), (7, "ab"), None, SystemTime::now());
        assert_eq!(deleted.kind, EventType::FileDeleted);
        assert_eq!(deleted.id, "cam1-3f9a0c1b2d4e/2/file.deleted");
        let moved = StreamEvent::file_left(
            subject(),
            (7, "ab"),
            Some("/done/cam1.mp4"),
            SystemTime::now(),
        );
        assert_eq!(moved.kind, EventType::FileMoved);
        let json: serde_json::Value = serde_json::from_str(&moved.announcement().json).unwrap();
        assert_eq!(json["type"], "file.moved");
        assert_eq!(json["moved_to"], "/done/cam1.mp4");
        assert_eq!(json["sha256"], "ab");
        assert_eq!(json["size_bytes"], 7);
    }

    #[test]
    fn fields_that_do_not_apply_are_null_or_absent() {
        let event = StreamEvent::quarantined(subject(), "chunk size 0", SystemTime::UNIX_EPOCH);
        let json: serde_json::Value = serde_json::from_str(&event.announcement().json).unwrap();
        assert_eq!(json["type"], "stream.failed");
        assert_eq!(json["reason"], "quarantined: chunk size 0");
        assert!(json["objects"].is_null());
        assert!(json["sha256"].is_null());
        assert!(json.get("moved_to").is_none());
        assert_eq!(json["occurred_at"], "1970-01-01T00:00:00.000Z");
    }
}
