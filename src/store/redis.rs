//! The Redis adapter: implements the `CheckpointStore` port (`store/ports.rs`).
//!
//! Redis holds what makes a restart resume exactly: which file (device:inode)
//! is which stream, and every chunk that was uploaded. It is also where
//! replicas sharing one directory agree on who works on which stream: a
//! stream has one owner at a time, the holder of its lease, and every write
//! about a stream's progress is fenced (see docs/scaling.md).
//!
//! Every write is a single atomic operation (one command, a MULTI/EXEC
//! pipeline, or a Lua script) and writes absolute values, so a retried write
//! whose reply was lost can never count twice. Connections, reconnects,
//! Sentinel and the replication of writes are `connection`'s business;
//! every call has connect, read and write timeouts.
//!
//! Key layout (`P` is `REDIS_KEY_PREFIX`):
//! - `P:identities` hash: `device:inode` → stream id, for live streams.
//! - `P:stream:{id}` hash: the stream's record (path, status, revision, …,
//!   and `fence`, the fencing token of the stream's latest claim).
//! - `P:stream:{id}:chunks` hash: chunk index → chunk record (JSON), for the
//!   revision in progress only: completion drops it (`metadata.json` holds
//!   the records), so a complete stream costs one small hash.
//!
//! Once a stream's file is gone, its record and chunk records expire after
//! `RECORD_RETENTION` (docs/storage-layout.md has the bytes per stream).
//! - `P:lease:{id}` string: the owner id of the replica that holds the
//!   stream, expiring after `LEASE_TTL` unless renewed.
//! - `P:replicas` sorted set: live owner ids, scored by when they expire.
//! - `P:instance:{ID}` string: with `INSTANCE_ID`, the owner id of its live
//!   incarnation, expiring unless refreshed (see `instance`).
//! - `P:outbox` hash (event id → event JSON), `P:outbox:due` sorted set (event
//!   id by when it is due), `P:outbox:attempts` and `P:outbox:published`
//!   hashes, and `P:announced:{event id}` strings that expire after a day:
//!   the durable outbox of completion events (see `outbox`).

use std::collections::BTreeMap;
use std::time::Duration;

use redis::{Connection, RedisResult, Script};

use super::connection::Link;
use crate::config::{RedisConfig, SentinelConfig};
use crate::error::{CheckpointError, FencedWriteError};
use crate::metadata::{ChunkRecord, unix_millis};
use crate::notify::Announcement;
use crate::scan::FileIdentity;
use crate::store::ports::Loaded;
use crate::store::ports::{
    AssemblyProgress, CheckpointStore, Claim, Completion, LeaseStatus, Outbox, PendingEvent,
    Renewal, StoredStatus, StoredStream,
};
use crate::store::record::{
    COMPLETED_MTIME_NS, COMPLETED_SIZE, HEAD, LAST_CHANGE_AT_MS, REVISION, decode_stream,
    head_field, stream_fields,
};

mod checkpoints;
mod instance;
mod outbox;
mod scripts;

use scripts::*;

/// Streams loaded per pipelined round trip at start.
const LOAD_BATCH: usize = 256;

/// Who this process is when it claims streams, and how long a claim lasts.
#[derive(Debug, Clone)]
pub struct LeaseHolder {
    /// Unique per process: `daemon::instance_id`, or with `INSTANCE_ID` an
    /// incarnation of it ([`LeaseHolder::incarnation`]).
    pub owner: String,
    pub ttl: Duration,
}

/// Separates an `INSTANCE_ID` from the per-process part of an owner id;
/// `INSTANCE_ID` cannot contain it, nor can host names.
const INCARNATION_SEPARATOR: char = '#';

impl LeaseHolder {
    /// The owner id of one process running as `INSTANCE_ID` `id`.
    pub fn incarnation(id: &str, nonce: u64) -> String {
        format!("{id}{INCARNATION_SEPARATOR}{:08x}", nonce & 0xffff_ffff)
    }

    /// The `INSTANCE_ID` this owner is an incarnation of, if any.
    pub fn instance(&self) -> Option<&str> {
        self.owner
            .split_once(INCARNATION_SEPARATOR)
            .map(|(id, _)| id)
    }

    /// `ID#` for an incarnation, empty otherwise: what the scripts match
    /// earlier incarnations by.
    fn incarnation_prefix(&self) -> String {
        self.instance()
            .map(|id| format!("{id}{INCARNATION_SEPARATOR}"))
            .unwrap_or_default()
    }
}

/// What a claim on this process's `INSTANCE_ID` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstanceClaim {
    /// This process is the instance's live incarnation now.
    Taken,
    /// Another incarnation holds it, for `remaining` (`None`: no expiry).
    HeldBy {
        owner: String,
        remaining: Option<Duration>,
    },
}

/// Key names under the prefix.
#[derive(Debug, Clone)]
struct Keys {
    prefix: String,
}

impl Keys {
    fn identities(&self) -> String {
        format!("{}:identities", self.prefix)
    }
    fn stream(&self, id: &str) -> String {
        format!("{}:stream:{id}", self.prefix)
    }
    fn chunks(&self, id: &str) -> String {
        format!("{}:stream:{id}:chunks", self.prefix)
    }
    fn lease(&self, id: &str) -> String {
        format!("{}:lease:{id}", self.prefix)
    }
    fn replicas(&self) -> String {
        format!("{}:replicas", self.prefix)
    }
    /// The liveness key of an `INSTANCE_ID` (held by its live incarnation).
    fn instance(&self, id: &str) -> String {
        format!("{}:instance:{id}", self.prefix)
    }
    fn outbox(&self) -> String {
        format!("{}:outbox", self.prefix)
    }
    fn outbox_due(&self) -> String {
        format!("{}:outbox:due", self.prefix)
    }
    fn outbox_attempts(&self) -> String {
        format!("{}:outbox:attempts", self.prefix)
    }
    fn outbox_published(&self) -> String {
        format!("{}:outbox:published", self.prefix)
    }
    /// Says that event `id` was queued (recently); expires.
    fn announced(&self, id: &str) -> String {
        format!("{}:announced:{id}", self.prefix)
    }
}

/// A Redis connection that is replaced after any connection-level failure.
pub struct RedisStore {
    link: Link,
    keys: Keys,
    holder: LeaseHolder,
    register: Script,
    restore: Script,
    retire: Script,
    rekey: Script,
    fenced_write: Script,
    claim: Script,
    renew: Script,
    release: Script,
    instance_claim: Script,
    instance_refresh: Script,
    announce: Script,
    claim_due: Script,
    publish: Script,
    postpone: Script,
}

/// A fenced write: which hash, which fields to delete, which pairs to set,
/// whether the stream's chunk records are dropped and the lease is given
/// up, and which event is queued, all in the same step.
struct FencedWrite<'a> {
    target: String,
    delete: &'a [&'a str],
    set: Vec<(String, String)>,
    /// Delete the stream's chunk records (at completion: metadata.json
    /// holds them now).
    drop_chunks: bool,
    release: bool,
    announcement: Option<&'a Announcement>,
}

impl<'a> FencedWrite<'a> {
    /// A write of record fields (`delete`, then `set`) and nothing else.
    fn record(target: String, delete: &'a [&'a str], set: &[(&str, String)]) -> Self {
        Self {
            target,
            delete,
            set: owned_pairs(set),
            drop_chunks: false,
            release: false,
            announcement: None,
        }
    }
}

impl RedisStore {
    /// A store on the one server of `config.url`.
    pub fn new(config: &RedisConfig, holder: LeaseHolder) -> Result<Self, CheckpointError> {
        Ok(Self::on(Link::server(config)?, config, holder))
    }

    /// A store on the server the configuration names: `REDIS_URL`, or the
    /// master the sentinels name, followed through failovers.
    pub fn connect(
        config: &RedisConfig,
        sentinel: Option<&SentinelConfig>,
        holder: LeaseHolder,
    ) -> Result<Self, CheckpointError> {
        match sentinel {
            Some(sentinel) => Ok(Self::on(Link::sentinel(config, sentinel), config, holder)),
            None => Self::new(config, holder),
        }
    }

    fn on(link: Link, config: &RedisConfig, holder: LeaseHolder) -> Self {
        Self {
            link,
            keys: Keys {
                prefix: config.key_prefix.clone(),
            },
            holder,
            register: Script::new(REGISTER_LUA),
            restore: Script::new(RESTORE_LUA),
            retire: Script::new(RETIRE_LUA),
            rekey: Script::new(REKEY_LUA),
            fenced_write: Script::new(&format!("{HOLDS_LUA}{ENQUEUE_LUA}{FENCED_WRITE_LUA}")),
            claim: Script::new(CLAIM_LUA),
            renew: Script::new(&format!("{HOLDS_LUA}{RENEW_LUA}")),
            release: Script::new(RELEASE_LUA),
            instance_claim: Script::new(INSTANCE_CLAIM_LUA),
            instance_refresh: Script::new(INSTANCE_REFRESH_LUA),
            announce: Script::new(&format!("{ENQUEUE_LUA}{ANNOUNCE_LUA}")),
            claim_due: Script::new(CLAIM_DUE_LUA),
            publish: Script::new(PUBLISH_LUA),
            postpone: Script::new(POSTPONE_LUA),
        }
    }

    fn ttl_millis(&self) -> u64 {
        u64::try_from(self.holder.ttl.as_millis()).unwrap_or(u64::MAX)
    }

    /// Runs one fenced write for the stream.
    fn write_fenced(
        &mut self,
        stream_id: &str,
        token: u64,
        write: &FencedWrite<'_>,
    ) -> Result<(), FencedWriteError> {
        let script = self.fenced_write.clone();
        let (owner, ttl) = (self.holder.owner.clone(), self.ttl_millis());
        let written: i64 = self.with_write(|con, keys| {
            let mut invocation = script.key(keys.lease(stream_id));
            invocation.key(keys.stream(stream_id)).key(&write.target);
            // Fixed places (see FENCED_WRITE_LUA): the chunk hash is always
            // KEYS[4], the event's keys follow only with an event.
            invocation.key(keys.chunks(stream_id));
            if let Some(event) = write.announcement {
                invocation
                    .key(keys.announced(&event.id))
                    .key(keys.outbox())
                    .key(keys.outbox_due());
            }
            invocation
                .arg(&owner)
                .arg(token.to_string())
                .arg(ttl)
                .arg(if write.release { "1" } else { "0" })
                .arg(if write.drop_chunks { "1" } else { "0" })
                .arg(write.delete.len());
            for name in write.delete {
                invocation.arg(*name);
            }
            for (name, value) in &write.set {
                invocation.arg(name).arg(value);
            }
            if let Some(event) = write.announcement {
                invocation
                    .arg(&event.id)
                    .arg(&event.json)
                    .arg(outbox::ANNOUNCED_MEMORY_MS);
            }
            invocation.invoke(con)
        })?;
        match written {
            1 => Ok(()),
            -1 => Err(FencedWriteError::Unavailable(self.link.failure(&format!(
                "the record of stream {stream_id} is gone (Redis lost its data?); \
                 waiting for it to be written back"
            )))),
            _ => Err(FencedWriteError::LeaseLost),
        }
    }

    /// A fenced write of record fields (`delete`, then `set`).
    fn write_record_fenced(
        &mut self,
        stream_id: &str,
        token: u64,
        delete: &[&str],
        set: &[(&str, String)],
    ) -> Result<(), FencedWriteError> {
        let target = self.keys.stream(stream_id);
        self.write_fenced(stream_id, token, &FencedWrite::record(target, delete, set))
    }

    /// Runs a read on the master (see [`Link::call`]).
    fn with_connection<T>(
        &mut self,
        call: impl FnOnce(&mut Connection, &Keys) -> RedisResult<T>,
    ) -> Result<T, CheckpointError> {
        let keys = &self.keys;
        self.link.call(|con| call(con, keys))
    }

    /// Runs a write on the master (see [`Link::write`]).
    fn with_write<T>(
        &mut self,
        call: impl FnOnce(&mut Connection, &Keys) -> RedisResult<T>,
    ) -> Result<T, CheckpointError> {
        let keys = &self.keys;
        self.link.write(|con| call(con, keys))
    }
}

/// Borrowed (name, value) pairs as owned ones, for a fenced write.
fn owned_pairs(pairs: &[(&str, String)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(name, value)| ((*name).to_string(), value.clone()))
        .collect()
}

#[cfg(test)]
mod tests;
