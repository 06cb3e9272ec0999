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
//!
//! A failure also pauses the loop for the event's backoff: while a webhook
//! is down, a backlog of thousands of events costs one attempt per backoff
//! period, not one per event, and once it is back the first success drains
//! the backlog at full speed.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

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

/// How often `chunkstream_events_pending` is refreshed while busy.
const PENDING_REFRESH: Duration = Duration::from_secs(1);

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
        pending_refreshed: None,
        failures_in_a_row: 0,
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
    /// When `chunkstream_events_pending` was last refreshed.
    pending_refreshed: Option<Instant>,
    /// Failed deliveries in a row, of any events: the backoff grows with it
    /// as well as with the event's own attempts.
    failures_in_a_row: u32,
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
                    let pause = self.deliver(pending);
                    self.refresh_pending(pause.is_some());
                    pause.unwrap_or(Duration::ZERO)
                }
                Ok(None) => {
                    outbox_failures = 0;
                    self.refresh_pending(true);
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

    /// Publishes the outbox's size: when `idle`, or every
    /// [`PENDING_REFRESH`] while busy.
    fn refresh_pending(&mut self, idle: bool) {
        let due = self
            .pending_refreshed
            .is_none_or(|last| last.elapsed() >= PENDING_REFRESH);
        if (idle || due)
            && let Ok(count) = self.outbox.pending()
        {
            self.events.events_pending(count);
            self.pending_refreshed = Some(Instant::now());
        }
    }

    /// Delivers one event to every destination, then removes it; or
    /// postpones it after a failure, and returns the backoff to pause for.
    fn deliver(&mut self, pending: PendingEvent) -> Option<Duration> {
        let outcome = match serde_json::from_str::<Kind>(&pending.json) {
            Ok(Kind { kind }) => self.send(&pending, kind),
            Err(err) => Err(Refused {
                destination: "outbox",
                reason: format!("its JSON in the outbox does not parse: {err}"),
            }),
        };
        match outcome {
            Ok(()) => {
                self.failures_in_a_row = 0;
                if let Err(err) = self.outbox.delivered(&pending.id) {
                    // It comes back after its hold and is delivered again,
                    // with the same id.
                    warn!(
                        "event {}: delivered, but cannot remove it from the outbox: {err}",
                        pending.id
                    );
                    return None;
                }
                self.events.event_delivered();
                if pending.attempts > 0 {
                    info!(
                        "event {}: delivered after {} failed attempts",
                        pending.id, pending.attempts
                    );
                }
                None
            }
            Err(refused) => {
                self.events.event_delivery_failed(refused.destination);
                let attempts = pending.attempts.saturating_add(1);
                self.failures_in_a_row = self.failures_in_a_row.saturating_add(1);
                let delay = self.retry.delay(self.backoff_step(pending.attempts));
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
                Some(delay)
            }
        }
    }

    /// Which step of the backoff a failed event waits for: its own failed
    /// attempts before this one, or the failures in a row before this one,
    /// whichever is more (a webhook that is down backs off once for all).
    fn backoff_step(&self, earlier_attempts: u32) -> u32 {
        earlier_attempts.max(self.failures_in_a_row.saturating_sub(1))
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

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::error::CheckpointError;
    use crate::metrics::Metrics;

    /// The outbox's calls, recorded; `publish` fails while `refuse` is set.
    #[derive(Default)]
    struct Recorded {
        published: Vec<String>,
        delivered: Vec<String>,
        postponed: Vec<(String, u32, Duration)>,
        refuse: bool,
    }

    struct FakeOutbox(Arc<Mutex<Recorded>>);

    impl Outbox for FakeOutbox {
        fn claim_due(&mut self, _: Duration) -> Result<Option<PendingEvent>, CheckpointError> {
            Ok(None)
        }
        fn publish(
            &mut self,
            _: &str,
            _: u64,
            event: &PendingEvent,
            _: &str,
        ) -> Result<(), CheckpointError> {
            let mut recorded = self.0.lock().unwrap();
            if recorded.refuse {
                return Err(CheckpointError {
                    url: "redis://fake".into(),
                    detail: "connection refused".into(),
                });
            }
            recorded.published.push(event.id.clone());
            Ok(())
        }
        fn delivered(&mut self, id: &str) -> Result<(), CheckpointError> {
            self.0.lock().unwrap().delivered.push(id.to_string());
            Ok(())
        }
        fn postpone(
            &mut self,
            id: &str,
            attempts: u32,
            delay: Duration,
        ) -> Result<(), CheckpointError> {
            let postponed = (id.to_string(), attempts, delay);
            self.0.lock().unwrap().postponed.push(postponed);
            Ok(())
        }
        fn pending(&mut self) -> Result<u64, CheckpointError> {
            Ok(0)
        }
    }

    const RETRY: RetryPolicy = RetryPolicy {
        base_delay: Duration::from_secs(1),
        max_delay: Duration::from_secs(8),
    };

    fn delivery(refuse: bool) -> (Delivery, Arc<Mutex<Recorded>>, Arc<Metrics>) {
        let recorded = Arc::new(Mutex::new(Recorded {
            refuse,
            ..Recorded::default()
        }));
        let metrics = Arc::new(Metrics::new());
        let delivery = Delivery {
            outbox: Box::new(FakeOutbox(recorded.clone())),
            stream: Some("events".to_string()),
            max_len: 10,
            webhook: None,
            hold: DELIVERY_HOLD_MARGIN,
            retry: RETRY,
            events: metrics.clone(),
            pending_refreshed: None,
            failures_in_a_row: 0,
        };
        (delivery, recorded, metrics)
    }

    fn pending(attempts: u32, json: &str) -> PendingEvent {
        PendingEvent {
            id: "cam-1/1/stream.completed".to_string(),
            json: json.to_string(),
            attempts,
        }
    }

    const COMPLETED: &str = r#"{"id":"cam-1/1/stream.completed","type":"stream.completed"}"#;

    fn sample(metrics: &Metrics, name: &str) -> String {
        let (text, _) = metrics.render();
        text.lines()
            .find(|line| line.starts_with(name))
            .unwrap_or_default()
            .to_string()
    }

    #[test]
    fn a_delivered_event_leaves_the_outbox() {
        let (mut delivery, recorded, metrics) = delivery(false);
        assert_eq!(delivery.deliver(pending(0, COMPLETED)), None, "no pause");
        let recorded = recorded.lock().unwrap();
        assert_eq!(recorded.published, vec!["cam-1/1/stream.completed"]);
        assert_eq!(recorded.delivered, vec!["cam-1/1/stream.completed"]);
        assert!(recorded.postponed.is_empty());
        assert!(sample(&metrics, "chunkstream_events_delivered_total").ends_with(" 1"));
    }

    #[test]
    fn a_failed_event_stays_with_its_id_and_backs_off_more_each_time() {
        let (mut delivery, recorded, metrics) = delivery(true);
        let pauses: Vec<Option<Duration>> = (0..6)
            .map(|attempts| delivery.deliver(pending(attempts, COMPLETED)))
            .collect();
        let recorded = recorded.lock().unwrap();
        assert!(recorded.delivered.is_empty(), "never removed undelivered");
        assert_eq!(recorded.postponed.len(), 6);
        for (n, (id, attempts, delay)) in recorded.postponed.iter().enumerate() {
            assert_eq!(id, "cam-1/1/stream.completed");
            assert_eq!(*attempts, n as u32 + 1);
            assert!(*delay <= RETRY.ceiling(n as u32), "{n}: {delay:?}");
            assert_eq!(pauses[n], Some(*delay), "the loop pauses as long");
        }
        assert_eq!(RETRY.ceiling(0), Duration::from_secs(1));
        assert_eq!(RETRY.ceiling(5), Duration::from_secs(8), "capped");
        let failures = sample(
            &metrics,
            "chunkstream_event_delivery_failures_total{destination=\"redis_stream\"}",
        );
        assert!(failures.ends_with(" 6"), "{failures}");
    }

    #[test]
    fn failures_of_different_events_in_a_row_back_off_together() {
        let (mut delivery, _, _) = delivery(true);
        let mut steps = Vec::new();
        for _ in 0..4 {
            // Each a different event's first attempt.
            delivery.deliver(pending(0, COMPLETED));
            steps.push(delivery.backoff_step(0));
        }
        assert_eq!(steps, vec![0, 1, 2, 3]);
        assert_eq!(delivery.backoff_step(7), 7, "an event's own attempts count");
        delivery.outbox = Box::new(FakeOutbox(Arc::new(Mutex::new(Recorded::default()))));
        assert_eq!(delivery.deliver(pending(0, COMPLETED)), None);
        assert_eq!(delivery.backoff_step(0), 0, "a success resets it");
    }

    #[test]
    fn an_event_whose_json_does_not_parse_is_kept_and_counted() {
        let (mut delivery, recorded, metrics) = delivery(false);
        delivery.deliver(pending(0, "{not json"));
        let recorded = recorded.lock().unwrap();
        assert!(recorded.published.is_empty());
        assert!(recorded.delivered.is_empty());
        assert_eq!(recorded.postponed.len(), 1);
        let failures = sample(
            &metrics,
            "chunkstream_event_delivery_failures_total{destination=\"outbox\"}",
        );
        assert!(failures.ends_with(" 1"), "{failures}");
    }
}
