//! A checkpoint store with the Redis adapter's semantics, in memory.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::FakeClock;
use crate::error::{CheckpointError, FencedWriteError};
use crate::metadata::ChunkRecord;
use crate::notify::Announcement;
use crate::scan::FileIdentity;
use crate::store::CheckpointStore;
use crate::store::ports::{
    AssemblyProgress, Claim, Completion, LeaseStatus, Renewal, StoredStatus, StoredStream,
};
use crate::store::ports::{CorruptRecord, Loaded};

/// A lease: who holds it, until when.
#[derive(Debug, Clone)]
struct Lease {
    owner: String,
    until: Instant,
}

/// What every replica's [`FakeCheckpoints`] shares: the "server".
#[derive(Debug, Default)]
struct Server {
    /// Identity key → stream id.
    identities: BTreeMap<String, String>,
    streams: BTreeMap<String, StoredStream>,
    fences: BTreeMap<String, u64>,
    leases: BTreeMap<String, Lease>,
    /// Owner → membership expiry.
    replicas: BTreeMap<String, Instant>,
    assemblies: BTreeMap<String, AssemblyProgress>,
    /// Stream id → why its record reads back as corrupt.
    corrupt: BTreeMap<String, String>,
    /// The outbox: every event queued, once per id, in order.
    announced: Vec<Announcement>,
    /// Stream id → when its record expires (it was retired).
    expiries: BTreeMap<String, Instant>,
    down: bool,
}

impl Server {
    /// Queues the event unless its id was queued before.
    fn enqueue(&mut self, announcement: Option<&Announcement>) -> bool {
        match announcement {
            Some(event) if !self.announced.iter().any(|known| known.id == event.id) => {
                self.announced.push(event.clone());
                true
            }
            _ => false,
        }
    }

    fn load(&self, id: &str) -> Option<Loaded> {
        let stream = self.streams.get(id)?;
        Some(match self.corrupt.get(id) {
            Some(reason) => Err(CorruptRecord {
                id: id.to_string(),
                path: Some(stream.rel_path.clone()),
                reason: reason.clone(),
            }),
            None => Ok(stream.clone()),
        })
    }
}

/// An in-memory checkpoint store with the Redis adapter's semantics (leases
/// with fencing tokens, atomic registration, write-back only where missing).
/// [`replica`](Self::replica) gives another process's view of the same data.
#[derive(Debug, Clone)]
pub struct FakeCheckpoints {
    server: Arc<Mutex<Server>>,
    owner: String,
    ttl: Duration,
    clock: FakeClock,
}

impl FakeCheckpoints {
    pub fn new(owner: &str, ttl: Duration, clock: FakeClock) -> Self {
        Self {
            server: Arc::default(),
            owner: owner.to_string(),
            ttl,
            clock,
        }
    }

    /// The same store as seen by another replica, `owner`.
    pub fn replica(&self, owner: &str) -> Self {
        Self {
            owner: owner.to_string(),
            ..self.clone()
        }
    }

    /// Every call fails while `down`.
    pub fn set_down(&self, down: bool) {
        self.lock_server().down = down;
    }

    /// The server restarted without its data.
    pub fn wipe(&self) {
        let mut server = self.lock_server();
        let down = server.down;
        *server = Server {
            down,
            ..Server::default()
        };
    }

    /// Another replica, `owner`, takes the stream's lease (as if this
    /// replica's had lapsed).
    pub fn steal(&self, stream_id: &str, owner: &str) {
        let until = self.clock.now() + self.ttl;
        let mut server = self.lock_server();
        *server.fences.entry(stream_id.to_string()).or_default() += 1;
        server.leases.insert(
            stream_id.to_string(),
            Lease {
                owner: owner.to_string(),
                until,
            },
        );
    }

    /// From now on the stream's record reads back as corrupt, for `reason`.
    pub fn corrupt(&self, stream_id: &str, reason: &str) {
        self.lock_server()
            .corrupt
            .insert(stream_id.to_string(), reason.to_string());
    }

    /// The stream's record, as stored.
    pub fn stream(&self, stream_id: &str) -> Option<StoredStream> {
        self.lock_server().streams.get(stream_id).cloned()
    }

    /// Every event queued in the outbox, in order.
    pub fn announced(&self) -> Vec<Announcement> {
        self.lock_server().announced.clone()
    }

    /// Ids of every stored stream (records that expired are gone).
    pub fn stream_ids(&self) -> Vec<String> {
        self.lock_server().streams.keys().cloned().collect()
    }

    /// When the stream's record expires, if it was retired.
    pub fn expiry(&self, stream_id: &str) -> Option<Instant> {
        self.lock_server().expiries.get(stream_id).copied()
    }

    /// Who holds the stream's lease now.
    pub fn lease_holder(&self, stream_id: &str) -> Option<String> {
        let now = self.clock.now();
        self.lock_server()
            .leases
            .get(stream_id)
            .filter(|lease| lease.until > now)
            .map(|lease| lease.owner.clone())
    }

    /// The server, without the records that expired by now.
    fn lock_server(&self) -> MutexGuard<'_, Server> {
        let now = self.clock.now();
        let mut server = self.server.lock().expect("fake server lock");
        let expired: Vec<String> = server
            .expiries
            .iter()
            .filter(|(_, until)| **until <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            server.expiries.remove(&id);
            server.streams.remove(&id);
            server.fences.remove(&id);
            server.assemblies.remove(&id);
        }
        server
    }

    /// The server, unless it is down, without the records that expired.
    fn up(&self) -> Result<MutexGuard<'_, Server>, CheckpointError> {
        let server = self.lock_server();
        if server.down {
            return Err(CheckpointError {
                url: "redis://fake".into(),
                detail: "connection refused".into(),
            });
        }
        Ok(server)
    }

    fn holds(&self, server: &Server, stream_id: &str, token: u64) -> bool {
        let now = self.clock.now();
        server.streams.contains_key(stream_id)
            && server.fences.get(stream_id) == Some(&token)
            && server
                .leases
                .get(stream_id)
                .is_some_and(|lease| lease.owner == self.owner && lease.until > now)
    }

    /// Runs a fenced write on the stream's record.
    fn fenced(
        &self,
        stream_id: &str,
        token: u64,
        write: impl FnOnce(&mut Server),
    ) -> Result<(), FencedWriteError> {
        let mut server = self.up()?;
        if !self.holds(&server, stream_id, token) {
            return Err(FencedWriteError::LeaseLost);
        }
        write(&mut server);
        Ok(())
    }
}

impl CheckpointStore for FakeCheckpoints {
    fn ping(&mut self) -> Result<(), CheckpointError> {
        self.up().map(drop)
    }

    fn load_streams(&mut self) -> Result<Vec<Loaded>, CheckpointError> {
        let server = self.up()?;
        Ok(server
            .identities
            .values()
            .filter_map(|id| server.load(id))
            .collect())
    }

    fn load_stream(&mut self, id: &str) -> Result<Option<Loaded>, CheckpointError> {
        Ok(self.up()?.load(id))
    }

    fn register_stream(
        &mut self,
        stream: &StoredStream,
        retired: Option<&str>,
    ) -> Result<String, CheckpointError> {
        let mut server = self.up()?;
        let key = stream.identity.key();
        if let Some(current) = server.identities.get(&key)
            && current != &stream.id
            && Some(current.as_str()) != retired
        {
            return Ok(current.clone());
        }
        server.identities.insert(key, stream.id.clone());
        server.streams.insert(stream.id.clone(), stream.clone());
        Ok(stream.id.clone())
    }

    fn checkpoint_chunk(
        &mut self,
        stream_id: &str,
        token: u64,
        chunk: &ChunkRecord,
    ) -> Result<(), FencedWriteError> {
        self.fenced(stream_id, token, |server| {
            if let Some(stream) = server.streams.get_mut(stream_id) {
                stream.chunks.insert(chunk.index, chunk.clone());
            }
        })
    }

    fn record_path(&mut self, stream_id: &str, rel_path: &str) -> Result<(), CheckpointError> {
        if let Some(stream) = self.up()?.streams.get_mut(stream_id) {
            stream.rel_path = rel_path.to_string();
        }
        Ok(())
    }

    fn record_identity(
        &mut self,
        stream_id: &str,
        old: FileIdentity,
        new: FileIdentity,
    ) -> Result<(), CheckpointError> {
        let mut server = self.up()?;
        if server.identities.get(&old.key()).map(String::as_str) == Some(stream_id) {
            server.identities.remove(&old.key());
        }
        server.identities.insert(new.key(), stream_id.to_string());
        if let Some(stream) = server.streams.get_mut(stream_id) {
            stream.identity = new;
        }
        Ok(())
    }

    fn mark_complete(
        &mut self,
        stream_id: &str,
        token: u64,
        completion: &Completion,
    ) -> Result<(), FencedWriteError> {
        self.fenced(stream_id, token, |server| {
            if let Some(stream) = server.streams.get_mut(stream_id) {
                stream.status = StoredStatus::Complete;
                stream.revision = completion.revision;
                stream.completed_size = completion.size;
                stream.completed_mtime_ns = completion.mtime_ns;
                stream.last_change_at = completion.last_change_at;
                stream.chunks.clear();
                stream.head.clone_from(&completion.head);
            }
            if completion.release_lease {
                server.leases.remove(stream_id);
            }
            server.enqueue(completion.announcement.as_ref());
        })
    }

    fn mark_incomplete(
        &mut self,
        stream_id: &str,
        token: u64,
        _reason: &str,
        announcement: Option<&Announcement>,
    ) -> Result<(), FencedWriteError> {
        self.fenced(stream_id, token, |server| {
            if let Some(stream) = server.streams.get_mut(stream_id) {
                stream.status = StoredStatus::Incomplete;
            }
            server.enqueue(announcement);
        })
    }

    fn confirm_lease(&mut self, stream_id: &str, token: u64) -> Result<(), FencedWriteError> {
        self.fenced(stream_id, token, |_| {})
    }

    fn restore_stream(
        &mut self,
        stream: &StoredStream,
        token: Option<u64>,
    ) -> Result<bool, CheckpointError> {
        let mut server = self.up()?;
        if server.streams.contains_key(&stream.id) {
            return Ok(false);
        }
        server
            .identities
            .entry(stream.identity.key())
            .or_insert_with(|| stream.id.clone());
        server.streams.insert(stream.id.clone(), stream.clone());
        if let Some(token) = token {
            server.fences.insert(stream.id.clone(), token);
        }
        Ok(true)
    }

    fn claim(&mut self, stream_id: &str) -> Result<Claim, CheckpointError> {
        let now = self.clock.now();
        let mut server = self.up()?;
        if !server.streams.contains_key(stream_id) {
            return Ok(Claim::NoRecord);
        }
        if let Some(lease) = server.leases.get(stream_id)
            && lease.until > now
            && lease.owner != self.owner
        {
            return Ok(Claim::HeldBy {
                owner: lease.owner.clone(),
                remaining: lease.until - now,
            });
        }
        server.leases.insert(
            stream_id.to_string(),
            Lease {
                owner: self.owner.clone(),
                until: now + self.ttl,
            },
        );
        let fence = server.fences.entry(stream_id.to_string()).or_default();
        *fence += 1;
        Ok(Claim::Granted { token: *fence })
    }

    fn renew(&mut self, leases: &[(&str, u64)]) -> Result<Renewal, CheckpointError> {
        let now = self.clock.now();
        let mut server = self.up()?;
        server.replicas.insert(self.owner.clone(), now + self.ttl);
        server.replicas.retain(|_, until| *until > now);
        let mut statuses = Vec::with_capacity(leases.len());
        for (stream_id, token) in leases {
            let status = if !server.streams.contains_key(*stream_id) {
                LeaseStatus::NoRecord
            } else if self.holds(&server, stream_id, *token) {
                if let Some(lease) = server.leases.get_mut(*stream_id) {
                    lease.until = now + self.ttl;
                }
                LeaseStatus::Held
            } else {
                LeaseStatus::Lost
            };
            statuses.push(status);
        }
        Ok(Renewal {
            replicas: server.replicas.len(),
            statuses,
        })
    }

    fn release(&mut self, stream_id: &str, token: u64) -> Result<(), CheckpointError> {
        let mut server = self.up()?;
        if self.holds(&server, stream_id, token) {
            server.leases.remove(stream_id);
        }
        Ok(())
    }

    fn leave(&mut self) -> Result<(), CheckpointError> {
        self.up()?.replicas.remove(&self.owner);
        Ok(())
    }

    fn load_assembly(
        &mut self,
        stream_id: &str,
    ) -> Result<Option<AssemblyProgress>, CheckpointError> {
        Ok(self.up()?.assemblies.get(stream_id).cloned())
    }

    fn save_assembly(
        &mut self,
        stream_id: &str,
        token: u64,
        progress: Option<&AssemblyProgress>,
    ) -> Result<(), FencedWriteError> {
        self.fenced(stream_id, token, |server| match progress {
            Some(progress) => {
                server
                    .assemblies
                    .insert(stream_id.to_string(), progress.clone());
            }
            None => {
                server.assemblies.remove(stream_id);
            }
        })
    }

    fn finish_assembly(
        &mut self,
        stream_id: &str,
        token: u64,
        revision: u32,
    ) -> Result<(), FencedWriteError> {
        self.fenced(stream_id, token, |server| {
            server.assemblies.remove(stream_id);
            if let Some(stream) = server.streams.get_mut(stream_id) {
                stream.assembled_revision = revision;
            }
        })
    }

    fn announce(&mut self, announcement: &Announcement) -> Result<bool, CheckpointError> {
        Ok(self.up()?.enqueue(Some(announcement)))
    }

    fn retire_stream(
        &mut self,
        identity: FileIdentity,
        stream_id: &str,
        keep_for: Duration,
    ) -> Result<(), CheckpointError> {
        let now = self.clock.now();
        let mut server = self.up()?;
        let key = identity.key();
        if server.identities.get(&key).map(String::as_str) == Some(stream_id) {
            server.identities.remove(&key);
        }
        if server.streams.contains_key(stream_id) {
            let until = now + keep_for;
            let expiry = server
                .expiries
                .entry(stream_id.to_string())
                .or_insert(until);
            *expiry = (*expiry).min(until);
        }
        Ok(())
    }
}
