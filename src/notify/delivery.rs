//! The delivery thread: takes the oldest due event from the outbox, appends
//! it to `EVENTS_STREAM` (once per id), POSTs it to `WEBHOOK_URL`, and
//! removes it only once both have it. A failure postpones the event with
//! capped exponential backoff (`RETRY_BASE_DELAY` up to `RETRY_MAX_DELAY`,
//! full jitter) and is counted; the event keeps its id and its place.
//!
//! One event is taken at a time and hidden from other replicas for the
//! webhook timeout plus [`DELIVERY_HOLD_MARGIN`], so replicas do not deliver
//! the same event twice in the normal case, and an event whose deliverer
//! was killed is due again soon after.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError};
use log::{info, warn};
use serde::Deserialize;

use super::event::{Announcement, EventType};
use super::webhook::Webhook;
use crate::config::{EventsConfig, RetryPolicy};
use crate::events::Events;
use crate::store::ports::{Outbox, PendingEvent};

/// How long past the webhook timeout a taken event stays hidden from other
/// readers: time for the Redis round trips around the POST.
pub const DELIVERY_HOLD_MARGIN: Duration = Duration::from_secs(5);

/// How often an empty (or unreachable) outbox is looked at again.
const IDLE_POLL: Duration = Duration::from_millis(500);

/// The part of an event's JSON the delivery needs: its type.
#[derive(Deserialize)]
struct Kind {
    #[serde(rename = "type")]
    kind: EventType,
}

/// Starts the delivery thread; it ends when `shutdown` closes (an event
/// being delivered then is finished or comes back after its hold).
pub fn spawn_delivery(
    outbox: Box<dyn Outbox>,
    config: &EventsConfig,
    retry: RetryPolicy,
    events: Arc<dyn Events>,
    shutdown: Receiver<()>,
) -> std::io::Result<JoinHandle<()>> {
    let mut delivery = Delivery {
        outbox,
        stream: config.stream.clone(),
        max_len: config.max_len,
        webhook: config
            .webhook
            .as_ref()
            .map(|hook| Webhook::new(&hook.url, hook.secret.as_deref(), hook.timeout)),
        hold: config
            .webhook
            .as_ref()
            .map_or(Duration::ZERO, |hook| hook.timeout)
            + DELIVERY_HOLD_MARGIN,
        retry,
        events,
    };
    std::thread::Builder::new()
        .name("events".into())
        .spawn(move || delivery.run(&shutdown))
}

struct Delivery {
    outbox: Box<dyn Outbox>,
    stream: Option<String>,
    max_len: u64,
    webhook: Option<Webhook>,
    hold: Duration,
    retry: RetryPolicy,
    events: Arc<dyn Events>,
}

/// Which destination refused an event, and why.
struct Refused {
    destination: &'static str,
    reason: String,
}

impl Delivery {
    fn run(&mut self, shutdown: &Receiver<()>) {
        let mut outbox_failures = 0u32;
        loop {
            let wait = match self.outbox.claim_due(self.hold) {
                Ok(Some(pending)) => {
                    outbox_failures = 0;
                    self.deliver(pending);
                    Duration::ZERO
                }
                Ok(None) => {
                    outbox_failures = 0;
                    self.publish_pending();
                    IDLE_POLL
                }
                Err(err) => {
                    if outbox_failures == 0 {
                        warn!("cannot read the event outbox: {err}; retrying");
                    }
                    outbox_failures = outbox_failures.saturating_add(1);
                    self.retry.ceiling(outbox_failures).max(IDLE_POLL)
                }
            };
            match shutdown.recv_timeout(wait) {
                Err(RecvTimeoutError::Timeout) => {}
                _ => return,
            }
        }
    }

    fn publish_pending(&mut self) {
        if let Ok(count) = self.outbox.pending() {
            self.events.events_pending(count);
        }
    }

    /// Delivers one event to every destination, then removes it; or
    /// postpones it after a failure.
    fn deliver(&mut self, pending: PendingEvent) {
        let outcome = match serde_json::from_str::<Kind>(&pending.json) {
            Ok(Kind { kind }) => self.send(&pending, kind),
            Err(err) => Err(Refused {
                destination: "outbox",
                reason: format!("its JSON in the outbox does not parse: {err}"),
            }),
        };
        match outcome {
            Ok(()) => {
                if let Err(err) = self.outbox.delivered(&pending.id) {
                    // It comes back after its hold and is delivered again,
                    // with the same id.
                    warn!(
                        "event {}: delivered, but cannot remove it from the outbox: {err}",
                        pending.id
                    );
                    return;
                }
                self.events.event_delivered();
                if pending.attempts > 0 {
                    info!(
                        "event {}: delivered after {} failed attempts",
                        pending.id, pending.attempts
                    );
                }
            }
            Err(refused) => {
                self.events.event_delivery_failed(refused.destination);
                let attempts = pending.attempts.saturating_add(1);
                let delay = self.retry.delay(attempts - 1);
                // The 1st, 2nd, 4th, … failure: an outage is visible
                // without a line per retry.
                if attempts.is_power_of_two() {
                    warn!(
                        "event {}: delivery to {} failed ({attempts} attempts so far): {}; retrying with backoff",
                        pending.id, refused.destination, refused.reason
                    );
                }
                if let Err(err) = self.outbox.postpone(&pending.id, attempts, delay) {
                    warn!(
                        "event {}: cannot reschedule it: {err}; it is due again after its hold",
                        pending.id
                    );
                }
            }
        }
    }

    fn send(&mut self, pending: &PendingEvent, kind: EventType) -> Result<(), Refused> {
        if let Some(stream) = &self.stream {
            self.outbox
                .publish(stream, self.max_len, pending, kind.as_str())
                .map_err(|err| Refused {
                    destination: "redis_stream",
                    reason: err.to_string(),
                })?;
        }
        if let Some(webhook) = &self.webhook {
            let announcement = Announcement {
                id: pending.id.clone(),
                kind,
                json: pending.json.clone(),
            };
            webhook.deliver(&announcement).map_err(|reason| Refused {
                destination: "webhook",
                reason,
            })?;
        }
        Ok(())
    }
}
