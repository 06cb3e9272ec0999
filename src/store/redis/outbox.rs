//! [`Outbox`] on Redis: the durable queue of completion events between the
//! write that decided them and their delivery.
//!
//! An event enters in the same Lua script as the decision it announces (or
//! through `announce`), is taken by one replica at a time for a while
//! (`claim_due`: a visibility timeout, so a killed process's event comes
//! back), is appended to the events stream at most once per id, and leaves
//! only once every destination has it. Times come from the server's clock,
//! so replicas with skewed clocks agree on what is due.

use super::*;

/// How long an event id is remembered after it was queued, so the same
/// decision seen again (a retried write, another replica, a restart soon
/// after) is not announced twice: one day, in milliseconds.
pub(super) const ANNOUNCED_MEMORY_MS: u64 = 24 * 60 * 60 * 1000;

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

impl Outbox for RedisStore {
    fn claim_due(&mut self, hold: Duration) -> Result<Option<PendingEvent>, CheckpointError> {
        let script = self.claim_due.clone();
        let reply: Vec<String> = self.with_write(|con, keys| {
            script
                .key(keys.outbox_due())
                .key(keys.outbox())
                .key(keys.outbox_attempts())
                .arg(millis(hold))
                .invoke(con)
        })?;
        let mut fields = reply.into_iter();
        Ok(match (fields.next(), fields.next(), fields.next()) {
            (Some(id), Some(json), Some(attempts)) => Some(PendingEvent {
                id,
                json,
                attempts: attempts.parse().unwrap_or(0),
            }),
            _ => None,
        })
    }

    fn publish(
        &mut self,
        stream: &str,
        max_len: u64,
        event: &PendingEvent,
        kind: &str,
    ) -> Result<(), CheckpointError> {
        let script = self.publish.clone();
        self.with_write(|con, keys| {
            script
                .key(keys.outbox_published())
                .key(stream)
                .arg(&event.id)
                .arg(max_len)
                .arg(kind)
                .arg(&event.json)
                .invoke::<i64>(con)
                .map(drop)
        })
    }

    fn delivered(&mut self, id: &str) -> Result<(), CheckpointError> {
        self.with_write(|con, keys| {
            redis::pipe()
                .atomic()
                .hdel(keys.outbox(), id)
                .ignore()
                .zrem(keys.outbox_due(), id)
                .ignore()
                .hdel(keys.outbox_attempts(), id)
                .ignore()
                .hdel(keys.outbox_published(), id)
                .ignore()
                .query::<()>(con)
        })
    }

    fn postpone(
        &mut self,
        id: &str,
        attempts: u32,
        delay: Duration,
    ) -> Result<(), CheckpointError> {
        let script = self.postpone.clone();
        self.with_write(|con, keys| {
            script
                .key(keys.outbox_due())
                .key(keys.outbox())
                .key(keys.outbox_attempts())
                .arg(id)
                .arg(attempts)
                .arg(millis(delay))
                .invoke::<i64>(con)
                .map(drop)
        })
    }

    fn pending(&mut self) -> Result<u64, CheckpointError> {
        self.with_connection(|con, keys| redis::cmd("ZCARD").arg(keys.outbox_due()).query(con))
    }
}
