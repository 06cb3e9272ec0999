//! The checkpoint store: a trait, and its Redis implementation.
//!
//! Redis holds what makes a restart resume exactly: which file (device:inode)
//! is which stream, and every chunk that was uploaded. Every write is a single
//! atomic operation (one command, a MULTI/EXEC pipeline, or a Lua script) and
//! writes absolute values, so a retried write whose reply was lost can never
//! count twice. The redis crate does not reconnect by itself, so a failed
//! connection is dropped here and the next call opens a new one; every call has
//! connect, read and write timeouts.
//!
//! Key layout (`P` is `REDIS_KEY_PREFIX`):
//! - `P:identities` hash: `device:inode` → stream id, for live streams.
//! - `P:stream:{id}` hash: the stream's record (path, status, revision, …).
//! - `P:stream:{id}:chunks` hash: chunk index → chunk record (JSON).

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::{Connection, RedisResult, Script};

use crate::config::{RedisConfig, redact_url};
use crate::error::CheckpointError;
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
}

/// What the coordinator and the workers need from the checkpoint store.
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

    /// Records an uploaded chunk. Idempotent.
    fn checkpoint_chunk(
        &mut self,
        stream_id: &str,
        chunk: &ChunkRecord,
    ) -> Result<(), CheckpointError>;

    /// Records the path a stream was last seen at.
    fn record_path(&mut self, stream_id: &str, rel_path: &str) -> Result<(), CheckpointError>;

    /// Marks the stream complete. Idempotent.
    fn mark_complete(
        &mut self,
        stream_id: &str,
        completion: &Completion,
    ) -> Result<(), CheckpointError>;

    /// Marks the stream incomplete, with the reason. Idempotent.
    fn mark_incomplete(&mut self, stream_id: &str, reason: &str) -> Result<(), CheckpointError>;

    /// Writes the stream back (record, chunks, identity mapping) if its record
    /// is missing, as after a Redis restart that lost its data. Returns
    /// whether anything was written.
    fn restore_stream(&mut self, stream: &StoredStream) -> Result<bool, CheckpointError>;

    /// The assembly in progress for the stream, if any.
    fn load_assembly(
        &mut self,
        stream_id: &str,
    ) -> Result<Option<AssemblyProgress>, CheckpointError>;

    /// Records assembly progress (absolute: the whole record is replaced),
    /// or with `None` forgets it.
    fn save_assembly(
        &mut self,
        stream_id: &str,
        progress: Option<&AssemblyProgress>,
    ) -> Result<(), CheckpointError>;

    /// Atomically records that `revision` is assembled (or, with
    /// `revision` 0, that nothing is) and drops the progress record.
    fn finish_assembly(&mut self, stream_id: &str, revision: u32) -> Result<(), CheckpointError>;

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
}

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
/// missing, so that anything a worker wrote since Redis came back wins.
const RESTORE_LUA: &str = r"
if redis.call('HEXISTS', KEYS[2], 'id') == 1 then
  return 0
end
if not redis.call('HGET', KEYS[1], ARGV[1]) then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
local fields = tonumber(ARGV[3])
local first_chunk = 4 + fields * 2
for i = 4, first_chunk - 1, 2 do
  redis.call('HSETNX', KEYS[2], ARGV[i], ARGV[i + 1])
end
for i = first_chunk, #ARGV, 2 do
  redis.call('HSETNX', KEYS[3], ARGV[i], ARGV[i + 1])
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
    client: redis::Client,
    connection: Option<Connection>,
    keys: Keys,
    timeout: Duration,
    shown_url: String,
    register: Script,
    restore: Script,
    forget: Script,
}

impl RedisStore {
    pub fn new(config: &RedisConfig) -> Result<Self, CheckpointError> {
        let shown_url = redact_url(&config.url);
        let client = redis::Client::open(config.url.as_str()).map_err(|err| CheckpointError {
            url: shown_url.clone(),
            detail: err.to_string(),
        })?;
        Ok(Self {
            client,
            connection: None,
            keys: Keys {
                prefix: config.key_prefix.clone(),
            },
            timeout: config.timeout,
            shown_url,
            register: Script::new(REGISTER_LUA),
            restore: Script::new(RESTORE_LUA),
            forget: Script::new(FORGET_LUA),
        })
    }

    /// Runs `call` on a live connection, opening one if needed. Any I/O-level
    /// failure drops the connection so that the next call reconnects.
    fn with_connection<T>(
        &mut self,
        call: impl FnOnce(&mut Connection, &Keys) -> RedisResult<T>,
    ) -> Result<T, CheckpointError> {
        if self.connection.is_none() {
            let connection = self
                .client
                .get_connection_with_timeout(self.timeout)
                .and_then(|connection| {
                    connection.set_read_timeout(Some(self.timeout))?;
                    connection.set_write_timeout(Some(self.timeout))?;
                    Ok(connection)
                })
                .map_err(|err| self.error(&err))?;
            self.connection = Some(connection);
        }
        let connection = self.connection.as_mut().expect("connected above");
        let result = call(connection, &self.keys);
        match result {
            Ok(value) => Ok(value),
            Err(err) => {
                if err.is_io_error()
                    || err.is_connection_dropped()
                    || err.is_timeout()
                    || err.is_connection_refusal()
                {
                    self.connection = None;
                }
                Err(self.error(&err))
            }
        }
    }

    fn error(&self, err: &redis::RedisError) -> CheckpointError {
        CheckpointError {
            url: self.shown_url.clone(),
            detail: err.to_string(),
        }
    }
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
        self.with_connection(|con, keys| {
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
        chunk: &ChunkRecord,
    ) -> Result<(), CheckpointError> {
        // One command: atomic by itself, one round trip per chunk.
        let json = serde_json::to_string(chunk).expect("chunk records serialize");
        self.with_connection(|con, keys| {
            redis::cmd("HSET")
                .arg(keys.chunks(stream_id))
                .arg(chunk.index)
                .arg(&json)
                .query(con)
        })
    }

    fn record_path(&mut self, stream_id: &str, rel_path: &str) -> Result<(), CheckpointError> {
        self.with_connection(|con, keys| {
            redis::cmd("HSET")
                .arg(keys.stream(stream_id))
                .arg("path")
                .arg(rel_path)
                .query(con)
        })
    }

    fn mark_complete(
        &mut self,
        stream_id: &str,
        completion: &Completion,
    ) -> Result<(), CheckpointError> {
        self.with_connection(|con, keys| {
            redis::cmd("HSET")
                .arg(keys.stream(stream_id))
                .arg("status")
                .arg(StoredStatus::Complete.as_str())
                .arg("revision")
                .arg(completion.revision)
                .arg("completed_size")
                .arg(completion.size)
                .arg("completed_mtime_ns")
                .arg(completion.mtime_ns.to_string())
                .arg("last_change_at_ms")
                .arg(unix_millis(completion.last_change_at))
                .arg("completed_at_ms")
                .arg(unix_millis(completion.completed_at))
                .query(con)
        })
    }

    fn mark_incomplete(&mut self, stream_id: &str, reason: &str) -> Result<(), CheckpointError> {
        self.with_connection(|con, keys| {
            redis::cmd("HSET")
                .arg(keys.stream(stream_id))
                .arg("status")
                .arg(StoredStatus::Incomplete.as_str())
                .arg("reason")
                .arg(reason)
                .query(con)
        })
    }

    fn restore_stream(&mut self, stream: &StoredStream) -> Result<bool, CheckpointError> {
        let restore = self.restore.clone();
        let fields = stream_fields(stream);
        self.with_connection(|con, keys| {
            let mut invocation = restore.key(keys.identities());
            invocation
                .key(keys.stream(&stream.id))
                .key(keys.chunks(&stream.id))
                .arg(stream.identity.key())
                .arg(&stream.id)
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
        progress: Option<&AssemblyProgress>,
    ) -> Result<(), CheckpointError> {
        let json = progress.map(|p| serde_json::to_string(p).expect("progress serializes"));
        self.with_connection(|con, keys| match &json {
            Some(json) => redis::cmd("HSET")
                .arg(keys.stream(stream_id))
                .arg("assembly")
                .arg(json)
                .query(con),
            None => redis::cmd("HDEL")
                .arg(keys.stream(stream_id))
                .arg("assembly")
                .query(con),
        })
    }

    fn finish_assembly(&mut self, stream_id: &str, revision: u32) -> Result<(), CheckpointError> {
        self.with_connection(|con, keys| {
            redis::pipe()
                .atomic()
                .hset(keys.stream(stream_id), "assembled_revision", revision)
                .ignore()
                .hdel(keys.stream(stream_id), "assembly")
                .ignore()
                .query(con)
        })
    }

    fn forget_identity(
        &mut self,
        identity: FileIdentity,
        stream_id: &str,
    ) -> Result<(), CheckpointError> {
        let forget = self.forget.clone();
        self.with_connection(|con, keys| {
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
