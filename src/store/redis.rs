//! The checkpoint store: a trait, and its Redis implementation.
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
//! - `P:stream:{id}:chunks` hash: chunk index → chunk record (JSON).
//! - `P:lease:{id}` string: the owner id of the replica that holds the
//!   stream, expiring after `LEASE_TTL` unless renewed.
//! - `P:replicas` sorted set: live owner ids, scored by when they expire.
//! - `P:instance:{ID}` string: with `INSTANCE_ID`, the owner id of its live
//!   incarnation, expiring unless refreshed (see `instance`).

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::{Connection, RedisResult, Script};

use super::connection::Link;
use crate::config::{RedisConfig, SentinelConfig};
use crate::error::{CheckpointError, FencedWriteError};
use crate::metadata::{ChunkRecord, unix_millis};
use crate::scan::FileIdentity;

/// Streams loaded per pipelined round trip at start.
const LOAD_BATCH: usize = 256;

/// A stream's status in the checkpoint store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredStatus {
    Active,
    Complete,
    Incomplete,
}

impl StoredStatus {
    fn as_str(self) -> &'static str {
        match self {
            StoredStatus::Active => "active",
            StoredStatus::Complete => "complete",
            StoredStatus::Incomplete => "incomplete",
        }
    }

    fn parse(value: &str) -> Option<Self> {
        match value {
            "active" => Some(StoredStatus::Active),
            "complete" => Some(StoredStatus::Complete),
            "incomplete" => Some(StoredStatus::Incomplete),
            _ => None,
        }
    }
}

/// Everything known about a stream, as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredStream {
    pub id: String,
    pub identity: FileIdentity,
    pub rel_path: String,
    pub file_name: String,
    pub chunk_size: u64,
    pub started_at: SystemTime,
    pub last_change_at: SystemTime,
    pub status: StoredStatus,
    /// Completed revisions so far (0 until the first completion).
    pub revision: u32,
    /// Size and mtime at the last completion.
    pub completed_size: u64,
    pub completed_mtime_ns: i128,
    /// The revision whose assembled object exists (0: none).
    pub assembled_revision: u32,
    pub chunks: BTreeMap<u64, ChunkRecord>,
}

/// A server-side assembly in progress, checkpointed after every part so a
/// crash resumes it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AssemblyProgress {
    /// The stream revision being assembled.
    pub revision: u32,
    pub key: String,
    pub upload_id: String,
    /// Part number → ETag of the parts copied so far.
    pub parts: BTreeMap<u32, String>,
}

/// The facts written when a stream completes.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub revision: u32,
    pub size: u64,
    pub mtime_ns: i128,
    pub last_change_at: SystemTime,
    pub completed_at: SystemTime,
    /// Give the lease up in the same step (nothing more to do for the
    /// stream: no assembly wanted).
    pub release_lease: bool,
}

/// Who this process is when it claims streams, and how long a claim lasts.
#[derive(Debug, Clone)]
pub struct LeaseHolder {
    /// Unique per process: `app::instance_id`, or with `INSTANCE_ID` an
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

/// The answer to a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This process owns the stream now; its writes carry `token`.
    Granted { token: u64 },
    /// Another replica owns it for at least `remaining` more.
    HeldBy { owner: String, remaining: Duration },
    /// The stream has no record (yet, or any more): nothing to claim.
    NoRecord,
}

/// What a renewal found for one lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseStatus {
    /// Still this process's, for another `LEASE_TTL`.
    Held,
    /// Claimed by another replica since: stop writing for the stream.
    Lost,
    /// The stream's record is gone (Redis lost its data): write it back,
    /// then renew again.
    NoRecord,
}

/// The result of one renewal round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Renewal {
    /// Replicas alive now, this one included.
    pub replicas: usize,
    /// One status per lease, in the order asked.
    pub statuses: Vec<LeaseStatus>,
}

/// What the coordinator and the workers need from the checkpoint store.
///
/// Writes about a stream's progress take the fencing `token` of the claim
/// they are made under; they fail with [`FencedWriteError::LeaseLost`] unless
/// this process still holds the stream's lease with that token.
pub trait CheckpointStore: Send {
    /// Round trip to check the store is reachable.
    fn ping(&mut self) -> Result<(), CheckpointError>;

    /// Every live stream (those in the identity index), with their chunks.
    fn load_streams(&mut self) -> Result<Vec<StoredStream>, CheckpointError>;

    /// One stream by id, if its record exists.
    fn load_stream(&mut self, id: &str) -> Result<Option<StoredStream>, CheckpointError>;

    /// Maps the stream's identity to `stream.id` and stores its record, in one
    /// atomic step, unless the identity already maps to another stream that is
    /// not `retired`. Returns the id the identity maps to afterwards.
    fn register_stream(
        &mut self,
        stream: &StoredStream,
        retired: Option<&str>,
    ) -> Result<String, CheckpointError>;

    /// Records an uploaded chunk. Idempotent. Fenced.
    fn checkpoint_chunk(
        &mut self,
        stream_id: &str,
        token: u64,
        chunk: &ChunkRecord,
    ) -> Result<(), FencedWriteError>;

    /// Records the path a stream was last seen at.
    fn record_path(&mut self, stream_id: &str, rel_path: &str) -> Result<(), CheckpointError>;

    /// Records that the stream's file now has identity `new` (it had `old`):
    /// the index maps `new` to the stream, and `old` no longer does.
    fn record_identity(
        &mut self,
        stream_id: &str,
        old: FileIdentity,
        new: FileIdentity,
    ) -> Result<(), CheckpointError>;

    /// Marks the stream complete. Idempotent. Fenced.
    fn mark_complete(
        &mut self,
        stream_id: &str,
        token: u64,
        completion: &Completion,
    ) -> Result<(), FencedWriteError>;

    /// Marks the stream incomplete, with the reason. Idempotent. Fenced.
    fn mark_incomplete(
        &mut self,
        stream_id: &str,
        token: u64,
        reason: &str,
    ) -> Result<(), FencedWriteError>;

    /// Succeeds only while this process holds the stream with `token`: the
    /// check made right before an object write that must not come from a
    /// replica that lost the stream (its metadata).
    fn confirm_lease(&mut self, stream_id: &str, token: u64) -> Result<(), FencedWriteError>;

    /// Writes the stream back (record, chunks, identity mapping) if its record
    /// is missing, as after a Redis restart that lost its data. `token` is the
    /// fencing token this process holds the stream with, if it does. Returns
    /// whether anything was written.
    fn restore_stream(
        &mut self,
        stream: &StoredStream,
        token: Option<u64>,
    ) -> Result<bool, CheckpointError>;

    /// Claims the stream's lease for this process if no other holds it.
    fn claim(&mut self, stream_id: &str) -> Result<Claim, CheckpointError>;

    /// Renews the leases this process holds (stream id, token), and its
    /// membership in the live-replica set.
    fn renew(&mut self, leases: &[(&str, u64)]) -> Result<Renewal, CheckpointError>;

    /// Gives the lease up, if this process still holds it with `token`.
    fn release(&mut self, stream_id: &str, token: u64) -> Result<(), CheckpointError>;

    /// Leaves the live-replica set (at the end of a drain).
    fn leave(&mut self) -> Result<(), CheckpointError>;

    /// The assembly in progress for the stream, if any.
    fn load_assembly(
        &mut self,
        stream_id: &str,
    ) -> Result<Option<AssemblyProgress>, CheckpointError>;

    /// Records assembly progress (absolute: the whole record is replaced),
    /// or with `None` forgets it. Fenced.
    fn save_assembly(
        &mut self,
        stream_id: &str,
        token: u64,
        progress: Option<&AssemblyProgress>,
    ) -> Result<(), FencedWriteError>;

    /// Atomically records that `revision` is assembled (or, with
    /// `revision` 0, that nothing is) and drops the progress record. Fenced.
    fn finish_assembly(
        &mut self,
        stream_id: &str,
        token: u64,
        revision: u32,
    ) -> Result<(), FencedWriteError>;

    /// Removes the identity → stream mapping if it still points to `stream_id`.
    fn forget_identity(
        &mut self,
        identity: FileIdentity,
        stream_id: &str,
    ) -> Result<(), CheckpointError>;
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
}

/// The fencing check every lease-guarded script starts with: the stream's
/// latest claim is the caller's (`token`), and its lease is the caller's or
/// has lapsed with no claim since, in which case the caller takes it back.
/// Taking back a lapsed lease is safe because the token proves that nobody
/// claimed the stream in between.
const HOLDS_LUA: &str = r"
local function holds(lease, record, owner, token, ttl)
  if redis.call('HGET', record, 'fence') ~= token then
    return false
  end
  local holder = redis.call('GET', lease)
  if holder == owner then
    return true
  end
  if holder then
    return false
  end
  redis.call('SET', lease, owner, 'PX', ttl)
  return true
end
";

/// A fenced write to one hash (the record or the chunks): delete the named
/// fields, then set the given pairs, only if the caller holds the stream;
/// then, if asked, give the lease up. KEYS: lease, record, target hash.
/// ARGV: owner, token, ttl, release (1 or 0), the number of fields to
/// delete, their names, then field/value pairs. Returns 1 when written, 0
/// when the caller does not hold the stream, -1 when the record is gone
/// (Redis lost its data; the owner writes it back).
const FENCED_WRITE_LUA: &str = r"
if redis.call('HEXISTS', KEYS[2], 'id') == 0 then
  return -1
end
if not holds(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3]) then
  return 0
end
local deleted = tonumber(ARGV[5])
for i = 6, 5 + deleted do
  redis.call('HDEL', KEYS[3], ARGV[i])
end
if #ARGV > 5 + deleted then
  redis.call('HSET', KEYS[3], unpack(ARGV, 6 + deleted))
end
if ARGV[4] == '1' then
  redis.call('DEL', KEYS[1])
end
return 1
";

/// Claim a stream that has a record and no other holder: set the lease and
/// bump the fencing token. A holder that is an earlier incarnation of the
/// caller's `INSTANCE_ID` (ARGV[3], `ID#`, empty without one) counts as no
/// holder once the caller holds the instance's liveness key (KEYS[3]): that
/// process is gone, and this is instant resume. Returns {token, owner, ttl
/// ms}; token 0 when someone else holds it, -1 when there is no record.
const CLAIM_LUA: &str = r"
if redis.call('HEXISTS', KEYS[2], 'id') == 0 then
  return {-1, '', 0}
end
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then
  local predecessor = ARGV[3] ~= '' and string.sub(holder, 1, #ARGV[3]) == ARGV[3]
    and redis.call('GET', KEYS[3]) == ARGV[1]
  if not predecessor then
    return {0, holder, redis.call('PTTL', KEYS[1])}
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return {redis.call('HINCRBY', KEYS[2], 'fence', 1), ARGV[1], tonumber(ARGV[2])}
";

/// Heartbeat in the replica set (dropping members that expired), then renew
/// each lease. KEYS: the replica set, then (lease, record) per stream. ARGV:
/// owner, ttl, then one token per stream. Returns the live replica count,
/// then per stream 1 (held), 0 (lost) or 2 (no record).
const RENEW_LUA: &str = r"
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local result = {redis.call('ZCARD', KEYS[1])}
for i = 2, #KEYS, 2 do
  local token = ARGV[2 + i / 2]
  if redis.call('HEXISTS', KEYS[i + 1], 'id') == 0 then
    table.insert(result, 2)
  elseif holds(KEYS[i], KEYS[i + 1], ARGV[1], token, ARGV[2]) then
    redis.call('PEXPIRE', KEYS[i], ARGV[2])
    table.insert(result, 1)
  else
    table.insert(result, 0)
  end
end
return result
";

/// Take an `INSTANCE_ID`'s liveness key unless another incarnation holds it,
/// and drop earlier incarnations from the replica set. KEYS: the liveness
/// key, the replica set. ARGV: owner, ttl, the incarnation prefix `ID#`.
/// Returns {1, owner, ttl} when taken, else {0, holder, its PTTL}.
const INSTANCE_CLAIM_LUA: &str = r"
local current = redis.call('GET', KEYS[1])
if current and current ~= ARGV[1] then
  return {0, current, redis.call('PTTL', KEYS[1])}
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
for _, member in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  if member ~= ARGV[1] and string.sub(member, 1, #ARGV[3]) == ARGV[3] then
    redis.call('ZREM', KEYS[2], member)
  end
end
return {1, ARGV[1], tonumber(ARGV[2])}
";

/// Keep (ttl > 0) or give up (ttl 0) an `INSTANCE_ID`'s liveness key, unless
/// another incarnation took it: 1 done, 0 taken. A key that lapsed (Redis
/// was out of reach) is taken again: no other incarnation claimed it.
/// KEYS: the liveness key. ARGV: owner, ttl.
const INSTANCE_REFRESH_LUA: &str = r"
local current = redis.call('GET', KEYS[1])
if current and current ~= ARGV[1] then
  return 0
end
if ARGV[2] == '0' then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
return 1
";

/// Delete the lease only if the caller still holds it with this token.
const RELEASE_LUA: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] and redis.call('HGET', KEYS[2], 'fence') == ARGV[2] then
  redis.call('DEL', KEYS[1])
end
return 1
";

/// Map the identity to the new stream and write its record, unless another
/// (non-retired) stream already owns the identity.
const REGISTER_LUA: &str = r"
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current and current ~= ARGV[2] and current ~= ARGV[3] then
  return current
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], unpack(ARGV, 4))
return ARGV[2]
";

/// Write a stream back if its record is gone (no `id` field): the record
/// fields, the chunk records and the identity mapping, each only where
/// missing, so that anything a worker wrote since Redis came back wins. The
/// stream's owner (ARGV[3] = 1, with its `fence` among the fields) also fills
/// in a record that another replica wrote back first without a fencing token.
const RESTORE_LUA: &str = r"
if redis.call('HEXISTS', KEYS[2], 'id') == 1 then
  if ARGV[3] ~= '1' or redis.call('HEXISTS', KEYS[2], 'fence') == 1 then
    return 0
  end
end
if not redis.call('HGET', KEYS[1], ARGV[1]) then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
local fields = tonumber(ARGV[4])
local first_chunk = 5 + fields * 2
for i = 5, first_chunk - 1, 2 do
  redis.call('HSETNX', KEYS[2], ARGV[i], ARGV[i + 1])
end
for i = first_chunk, #ARGV, 2 do
  redis.call('HSETNX', KEYS[3], ARGV[i], ARGV[i + 1])
end
return 1
";

/// Move a stream from identity ARGV[1] to ARGV[2] in the index and in its
/// record (if it has one).
const REKEY_LUA: &str = r"
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[3] then
  redis.call('HDEL', KEYS[1], ARGV[1])
end
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
if redis.call('HEXISTS', KEYS[2], 'id') == 1 then
  redis.call('HSET', KEYS[2], 'identity', ARGV[2])
end
return 1
";

/// Delete the identity mapping only if it still points at this stream.
const FORGET_LUA: &str = r"
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  redis.call('HDEL', KEYS[1], ARGV[1])
end
return 1
";

/// A Redis connection that is replaced after any connection-level failure.
pub struct RedisStore {
    link: Link,
    keys: Keys,
    holder: LeaseHolder,
    register: Script,
    restore: Script,
    forget: Script,
    rekey: Script,
    fenced_write: Script,
    claim: Script,
    renew: Script,
    release: Script,
    instance_claim: Script,
    instance_refresh: Script,
}

/// A fenced write: which hash, which fields to delete, which pairs to set,
/// and whether the lease is given up in the same step.
struct FencedWrite<'a> {
    target: String,
    delete: &'a [&'a str],
    set: Vec<(String, String)>,
    release: bool,
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
            forget: Script::new(FORGET_LUA),
            rekey: Script::new(REKEY_LUA),
            fenced_write: Script::new(&format!("{HOLDS_LUA}{FENCED_WRITE_LUA}")),
            claim: Script::new(CLAIM_LUA),
            renew: Script::new(&format!("{HOLDS_LUA}{RENEW_LUA}")),
            release: Script::new(RELEASE_LUA),
            instance_claim: Script::new(INSTANCE_CLAIM_LUA),
            instance_refresh: Script::new(INSTANCE_REFRESH_LUA),
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
            invocation
                .key(keys.stream(stream_id))
                .key(&write.target)
                .arg(&owner)
                .arg(token.to_string())
                .arg(ttl)
                .arg(if write.release { "1" } else { "0" })
                .arg(write.delete.len());
            for name in write.delete {
                invocation.arg(*name);
            }
            for (name, value) in &write.set {
                invocation.arg(name).arg(value);
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
        self.update_record_fenced(stream_id, token, delete, set, false)
    }

    /// A fenced write of record fields that may also give the lease up.
    fn update_record_fenced(
        &mut self,
        stream_id: &str,
        token: u64,
        delete: &[&str],
        set: &[(&str, String)],
        release: bool,
    ) -> Result<(), FencedWriteError> {
        let target = self.keys.stream(stream_id);
        self.write_fenced(
            stream_id,
            token,
            &FencedWrite {
                target,
                delete,
                set: owned_pairs(set),
                release,
            },
        )
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

// The liveness key of this process's `INSTANCE_ID` (see `instance`): only
// for owners that are incarnations; the others never call these.
impl RedisStore {
    fn instance_key(&self) -> Result<String, CheckpointError> {
        self.holder
            .instance()
            .map(|id| self.keys.instance(id))
            .ok_or_else(|| self.link.failure("this process has no INSTANCE_ID"))
    }

    /// Takes the instance's liveness key for `ttl`, unless another
    /// incarnation holds it.
    pub fn claim_instance(&mut self, ttl: Duration) -> Result<InstanceClaim, CheckpointError> {
        let key = self.instance_key()?;
        let script = self.instance_claim.clone();
        let owner = self.holder.owner.clone();
        let prefix = self.holder.incarnation_prefix();
        let millis = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        let (taken, holder, remaining_ms): (i64, String, i64) = self.with_write(|con, keys| {
            script
                .key(&key)
                .key(keys.replicas())
                .arg(&owner)
                .arg(millis)
                .arg(&prefix)
                .invoke(con)
        })?;
        Ok(if taken == 1 {
            InstanceClaim::Taken
        } else {
            InstanceClaim::HeldBy {
                owner: holder,
                remaining: u64::try_from(remaining_ms).ok().map(Duration::from_millis),
            }
        })
    }

    /// Keeps the liveness key for another `ttl` (or, with a zero `ttl`, gives
    /// it up). False if another incarnation took it.
    pub fn refresh_instance(&mut self, ttl: Duration) -> Result<bool, CheckpointError> {
        let key = self.instance_key()?;
        let script = self.instance_refresh.clone();
        let owner = self.holder.owner.clone();
        let millis = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        let kept: i64 =
            self.with_write(|con, _| script.key(&key).arg(&owner).arg(millis).invoke(con))?;
        Ok(kept == 1)
    }
}

/// Borrowed (name, value) pairs as owned ones, for a fenced write.
fn owned_pairs(pairs: &[(&str, String)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(name, value)| ((*name).to_string(), value.clone()))
        .collect()
}

fn from_unix_millis(millis: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(millis)
}

/// The record fields of a stream, as (name, value) pairs.
fn stream_fields(stream: &StoredStream) -> Vec<(&'static str, String)> {
    vec![
        ("id", stream.id.clone()),
        ("identity", stream.identity.key()),
        ("path", stream.rel_path.clone()),
        ("file_name", stream.file_name.clone()),
        ("chunk_size", stream.chunk_size.to_string()),
        ("started_at_ms", unix_millis(stream.started_at).to_string()),
        (
            "last_change_at_ms",
            unix_millis(stream.last_change_at).to_string(),
        ),
        ("status", stream.status.as_str().to_string()),
        ("revision", stream.revision.to_string()),
        ("completed_size", stream.completed_size.to_string()),
        ("completed_mtime_ns", stream.completed_mtime_ns.to_string()),
        ("assembled_revision", stream.assembled_revision.to_string()),
    ]
}

/// Rebuilds a stream from its record and chunk hash; `None` if the record is
/// missing or unreadable (it is then treated as unknown and re-registered).
fn parse_stream(
    fields: &BTreeMap<String, String>,
    chunks: &BTreeMap<String, String>,
) -> Option<StoredStream> {
    let get = |name: &str| fields.get(name).map(String::as_str);
    let number = |name: &str| get(name).and_then(|v| v.parse::<u64>().ok());
    let chunks = chunks
        .iter()
        .filter_map(|(index, json)| {
            let record: ChunkRecord = serde_json::from_str(json).ok()?;
            (index.parse::<u64>().ok()? == record.index).then_some((record.index, record))
        })
        .collect();
    Some(StoredStream {
        id: get("id")?.to_string(),
        identity: FileIdentity::parse_key(get("identity")?)?,
        rel_path: get("path")?.to_string(),
        file_name: get("file_name")?.to_string(),
        chunk_size: number("chunk_size").filter(|&size| size > 0)?,
        started_at: from_unix_millis(number("started_at_ms")?),
        last_change_at: from_unix_millis(number("last_change_at_ms")?),
        status: StoredStatus::parse(get("status")?)?,
        revision: number("revision").and_then(|r| u32::try_from(r).ok())?,
        completed_size: number("completed_size").unwrap_or(0),
        completed_mtime_ns: get("completed_mtime_ns")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        assembled_revision: number("assembled_revision")
            .and_then(|r| u32::try_from(r).ok())
            .unwrap_or(0),
        chunks,
    })
}

impl CheckpointStore for RedisStore {
    fn ping(&mut self) -> Result<(), CheckpointError> {
        self.with_connection(|con, _| redis::cmd("PING").query::<String>(con).map(|_| ()))
    }

    fn load_streams(&mut self) -> Result<Vec<StoredStream>, CheckpointError> {
        let index: BTreeMap<String, String> = self
            .with_connection(|con, keys| redis::cmd("HGETALL").arg(keys.identities()).query(con))?;
        let ids: Vec<String> = index.into_values().collect();
        let mut streams = Vec::with_capacity(ids.len());
        for batch in ids.chunks(LOAD_BATCH) {
            type Hash = BTreeMap<String, String>;
            let replies: Vec<(Hash, Hash)> = self.with_connection(|con, keys| {
                let mut pipe = redis::pipe();
                for id in batch {
                    pipe.cmd("HGETALL").arg(keys.stream(id));
                    pipe.cmd("HGETALL").arg(keys.chunks(id));
                }
                let flat: Vec<Hash> = pipe.query(con)?;
                let mut pairs = Vec::with_capacity(batch.len());
                let mut iter = flat.into_iter();
                while let (Some(fields), Some(chunks)) = (iter.next(), iter.next()) {
                    pairs.push((fields, chunks));
                }
                Ok(pairs)
            })?;
            for (id, (fields, chunks)) in batch.iter().zip(replies) {
                match parse_stream(&fields, &chunks) {
                    Some(stream) => streams.push(stream),
                    None => log::warn!("ignoring unreadable checkpoint record for stream {id}"),
                }
            }
        }
        Ok(streams)
    }

    fn load_stream(&mut self, id: &str) -> Result<Option<StoredStream>, CheckpointError> {
        let (fields, chunks): (BTreeMap<String, String>, BTreeMap<String, String>) = self
            .with_connection(|con, keys| {
                redis::pipe()
                    .cmd("HGETALL")
                    .arg(keys.stream(id))
                    .cmd("HGETALL")
                    .arg(keys.chunks(id))
                    .query(con)
            })?;
        Ok(parse_stream(&fields, &chunks))
    }

    fn register_stream(
        &mut self,
        stream: &StoredStream,
        retired: Option<&str>,
    ) -> Result<String, CheckpointError> {
        let register = self.register.clone();
        self.with_write(|con, keys| {
            let mut invocation = register.key(keys.identities());
            invocation
                .key(keys.stream(&stream.id))
                .arg(stream.identity.key())
                .arg(&stream.id)
                .arg(retired.unwrap_or(""));
            for (name, value) in stream_fields(stream) {
                invocation.arg(name).arg(value);
            }
            invocation.invoke(con)
        })
    }

    fn checkpoint_chunk(
        &mut self,
        stream_id: &str,
        token: u64,
        chunk: &ChunkRecord,
    ) -> Result<(), FencedWriteError> {
        // One script: atomic by itself, one round trip per chunk.
        let json = serde_json::to_string(chunk).expect("chunk records serialize");
        let target = self.keys.chunks(stream_id);
        self.write_fenced(
            stream_id,
            token,
            &FencedWrite {
                target,
                delete: &[],
                set: vec![(chunk.index.to_string(), json)],
                release: false,
            },
        )
    }

    fn record_path(&mut self, stream_id: &str, rel_path: &str) -> Result<(), CheckpointError> {
        self.with_write(|con, keys| {
            redis::cmd("HSET")
                .arg(keys.stream(stream_id))
                .arg("path")
                .arg(rel_path)
                .query(con)
        })
    }

    fn record_identity(
        &mut self,
        stream_id: &str,
        old: FileIdentity,
        new: FileIdentity,
    ) -> Result<(), CheckpointError> {
        let rekey = self.rekey.clone();
        self.with_connection(|con, keys| {
            rekey
                .key(keys.identities())
                .key(keys.stream(stream_id))
                .arg(old.key())
                .arg(new.key())
                .arg(stream_id)
                .invoke::<i64>(con)
                .map(|_| ())
        })
    }

    fn mark_complete(
        &mut self,
        stream_id: &str,
        token: u64,
        completion: &Completion,
    ) -> Result<(), FencedWriteError> {
        let set = [
            ("status", StoredStatus::Complete.as_str().to_string()),
            ("revision", completion.revision.to_string()),
            ("completed_size", completion.size.to_string()),
            ("completed_mtime_ns", completion.mtime_ns.to_string()),
            (
                "last_change_at_ms",
                unix_millis(completion.last_change_at).to_string(),
            ),
            (
                "completed_at_ms",
                unix_millis(completion.completed_at).to_string(),
            ),
        ];
        self.update_record_fenced(stream_id, token, &[], &set, completion.release_lease)
    }

    fn mark_incomplete(
        &mut self,
        stream_id: &str,
        token: u64,
        reason: &str,
    ) -> Result<(), FencedWriteError> {
        let set = [
            ("status", StoredStatus::Incomplete.as_str().to_string()),
            ("reason", reason.to_string()),
        ];
        self.write_record_fenced(stream_id, token, &[], &set)
    }

    fn confirm_lease(&mut self, stream_id: &str, token: u64) -> Result<(), FencedWriteError> {
        self.write_record_fenced(stream_id, token, &[], &[])
    }

    fn restore_stream(
        &mut self,
        stream: &StoredStream,
        token: Option<u64>,
    ) -> Result<bool, CheckpointError> {
        let restore = self.restore.clone();
        let mut fields = stream_fields(stream);
        if let Some(token) = token {
            fields.push(("fence", token.to_string()));
        }
        self.with_write(|con, keys| {
            let mut invocation = restore.key(keys.identities());
            invocation
                .key(keys.stream(&stream.id))
                .key(keys.chunks(&stream.id))
                .arg(stream.identity.key())
                .arg(&stream.id)
                .arg(if token.is_some() { "1" } else { "0" })
                .arg(fields.len());
            for (name, value) in &fields {
                invocation.arg(*name).arg(value);
            }
            for (index, chunk) in &stream.chunks {
                invocation
                    .arg(index)
                    .arg(serde_json::to_string(chunk).expect("chunk records serialize"));
            }
            invocation.invoke::<i64>(con).map(|written| written == 1)
        })
    }

    fn load_assembly(
        &mut self,
        stream_id: &str,
    ) -> Result<Option<AssemblyProgress>, CheckpointError> {
        let json: Option<String> = self.with_connection(|con, keys| {
            redis::cmd("HGET")
                .arg(keys.stream(stream_id))
                .arg("assembly")
                .query(con)
        })?;
        Ok(json.and_then(|json| serde_json::from_str(&json).ok()))
    }

    fn save_assembly(
        &mut self,
        stream_id: &str,
        token: u64,
        progress: Option<&AssemblyProgress>,
    ) -> Result<(), FencedWriteError> {
        match progress {
            Some(progress) => {
                let json = serde_json::to_string(progress).expect("progress serializes");
                self.write_record_fenced(stream_id, token, &[], &[("assembly", json)])
            }
            None => self.write_record_fenced(stream_id, token, &["assembly"], &[]),
        }
    }

    fn finish_assembly(
        &mut self,
        stream_id: &str,
        token: u64,
        revision: u32,
    ) -> Result<(), FencedWriteError> {
        self.write_record_fenced(
            stream_id,
            token,
            &["assembly"],
            &[("assembled_revision", revision.to_string())],
        )
    }

    fn claim(&mut self, stream_id: &str) -> Result<Claim, CheckpointError> {
        let script = self.claim.clone();
        let (owner, ttl) = (self.holder.owner.clone(), self.ttl_millis());
        let prefix = self.holder.incarnation_prefix();
        let instance = self.holder.instance().unwrap_or_default().to_string();
        let (token, holder, remaining_ms): (i64, String, i64) = self.with_write(|con, keys| {
            script
                .key(keys.lease(stream_id))
                .key(keys.stream(stream_id))
                .key(keys.instance(&instance))
                .arg(&owner)
                .arg(ttl)
                .arg(&prefix)
                .invoke(con)
        })?;
        Ok(match token {
            -1 => Claim::NoRecord,
            0 => Claim::HeldBy {
                owner: holder,
                remaining: Duration::from_millis(u64::try_from(remaining_ms).unwrap_or(0)),
            },
            token => Claim::Granted {
                token: u64::try_from(token).unwrap_or(0),
            },
        })
    }

    fn renew(&mut self, leases: &[(&str, u64)]) -> Result<Renewal, CheckpointError> {
        let script = self.renew.clone();
        let (owner, ttl) = (self.holder.owner.clone(), self.ttl_millis());
        let reply: Vec<i64> = self.with_write(|con, keys| {
            let mut invocation = script.key(keys.replicas());
            for (stream_id, _) in leases {
                invocation
                    .key(keys.lease(stream_id))
                    .key(keys.stream(stream_id));
            }
            invocation.arg(&owner).arg(ttl);
            for (_, token) in leases {
                invocation.arg(token.to_string());
            }
            invocation.invoke(con)
        })?;
        let replicas = reply
            .first()
            .and_then(|&count| usize::try_from(count).ok())
            .unwrap_or(1)
            .max(1);
        let statuses = reply
            .iter()
            .skip(1)
            .map(|status| match status {
                1 => LeaseStatus::Held,
                2 => LeaseStatus::NoRecord,
                _ => LeaseStatus::Lost,
            })
            .collect();
        Ok(Renewal { replicas, statuses })
    }

    fn release(&mut self, stream_id: &str, token: u64) -> Result<(), CheckpointError> {
        let script = self.release.clone();
        let owner = self.holder.owner.clone();
        self.with_write(|con, keys| {
            script
                .key(keys.lease(stream_id))
                .key(keys.stream(stream_id))
                .arg(&owner)
                .arg(token.to_string())
                .invoke::<i64>(con)
                .map(|_| ())
        })
    }

    fn leave(&mut self) -> Result<(), CheckpointError> {
        let owner = self.holder.owner.clone();
        self.with_write(|con, keys| {
            redis::cmd("ZREM")
                .arg(keys.replicas())
                .arg(&owner)
                .query::<i64>(con)
                .map(|_| ())
        })
    }

    fn forget_identity(
        &mut self,
        identity: FileIdentity,
        stream_id: &str,
    ) -> Result<(), CheckpointError> {
        let forget = self.forget.clone();
        self.with_write(|con, keys| {
            forget
                .key(keys.identities())
                .arg(identity.key())
                .arg(stream_id)
                .invoke::<i64>(con)
                .map(|_| ())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_incarnation_names_its_instance_and_other_owners_name_none() {
        let incarnation = LeaseHolder {
            owner: LeaseHolder::incarnation("chunkstream-0", 0x1_0000_0abc),
            ttl: Duration::from_secs(30),
        };
        assert_eq!(incarnation.owner, "chunkstream-0#00000abc");
        assert_eq!(incarnation.instance(), Some("chunkstream-0"));
        assert_eq!(incarnation.incarnation_prefix(), "chunkstream-0#");
        let fresh = LeaseHolder {
            owner: "host-12-abcdef".into(),
            ..incarnation
        };
        assert_eq!(fresh.instance(), None);
        assert_eq!(fresh.incarnation_prefix(), "");
    }

    #[test]
    fn a_stored_stream_round_trips_through_its_fields() {
        let stream = StoredStream {
            id: "cam-1".into(),
            identity: FileIdentity {
                device: 7,
                inode: 9,
            },
            rel_path: "a/cam.mp4".into(),
            file_name: "cam.mp4".into(),
            chunk_size: 5 << 20,
            started_at: from_unix_millis(1_000),
            last_change_at: from_unix_millis(2_000),
            status: StoredStatus::Complete,
            revision: 2,
            completed_size: 12,
            completed_mtime_ns: -5,
            assembled_revision: 1,
            chunks: BTreeMap::from([(
                0,
                ChunkRecord {
                    index: 0,
                    key: "cam-1/chunk-000000".into(),
                    offset: 0,
                    size_bytes: 12,
                    sha256: "ab".into(),
                    uploaded_at: "t".into(),
                },
            )]),
        };
        let fields: BTreeMap<String, String> = stream_fields(&stream)
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        let chunks = stream
            .chunks
            .iter()
            .map(|(i, c)| (i.to_string(), serde_json::to_string(c).unwrap()))
            .collect();
        assert_eq!(parse_stream(&fields, &chunks), Some(stream));
        assert_eq!(parse_stream(&BTreeMap::new(), &chunks), None);
    }
}
