//! Completion events: telling the next system that a recording is ready
//! (or reopened, failed, deleted, moved) without it polling the bucket.
//!
//! Events are decided where the stream's state changes and written to a
//! durable outbox in Redis in the same atomic step (`store::ports::Outbox`);
//! the delivery thread here drains the outbox to the Redis stream
//! `EVENTS_STREAM` and the `WEBHOOK_URL`, retrying with backoff until both
//! have taken it. Delivery is at least once, with an id that is stable
//! across retries, crashes and replicas. See docs/events.md.

mod delivery;
mod event;
mod webhook;

pub use delivery::{DELIVERY_HOLD_MARGIN, spawn_delivery};
pub use event::{Announcement, EventType, Objects, StreamEvent, StreamSubject, event_id};
pub use webhook::{DELIVERY_HEADER, EVENT_HEADER, SIGNATURE_HEADER, Webhook, signature};
