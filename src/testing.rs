//! In-memory fakes of the ports and a fake clock, for unit tests.
//!
//! The coordinator's scenarios and the workers' tests run against these in
//! milliseconds, with no server and no sleep: time moves only when a test
//! calls [`FakeClock::advance`], and the checkpoint store can be made to fail
//! ([`FakeCheckpoints::set_down`]), to lose its data ([`FakeCheckpoints::wipe`]),
//! to hold a corrupt record ([`FakeCheckpoints::corrupt`])
//! or to hand a lease to another replica ([`FakeCheckpoints::steal`]).
//! Compiled for tests only.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::config::{Cli, Config};
use sha2::{Digest, Sha256};

use crate::error::{CheckpointError, FencedWriteError, StorageError};
use crate::metadata::ChunkRecord;
use crate::scan::FileIdentity;
use crate::store::ports::{
    AssemblyProgress, Claim, Completion, LeaseStatus, Renewal, StoredStatus, StoredStream,
};
use crate::store::record::{CorruptRecord, Loaded};
use crate::store::{CheckpointStore, ObjectInfo, ObjectStore};

/// A clock that moves only when told to; clones share the time.
#[derive(Debug, Clone)]
pub struct FakeClock(Arc<Mutex<Instant>>);

impl Default for FakeClock {
    fn default() -> Self {
        Self(Arc::new(Mutex::new(Instant::now())))
    }
}

impl FakeClock {
    pub fn now(&self) -> Instant {
        *self.0.lock().expect("clock lock")
    }

    pub fn advance(&self, by: Duration) {
        *self.0.lock().expect("clock lock") += by;
    }
}

/// A validated configuration as if only `flags` were given, watching
/// `watch_dir`.
pub fn config(watch_dir: &Path, flags: &[&str]) -> Config {
    use clap::Parser;
    let watch = format!("--watch-dir={}", watch_dir.display());
    let argv = ["chunkstream", watch.as_str()]
        .into_iter()
        .chain(flags.iter().copied());
    let cli = Cli::try_parse_from(argv).expect("test flags parse");
    Config::from_settings(&cli.settings).expect("test flags are valid")
}

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
    down: bool,
}

impl Server {
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

    /// Ids of every stored stream.
    pub fn stream_ids(&self) -> Vec<String> {
        self.lock_server().streams.keys().cloned().collect()
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

    fn lock_server(&self) -> MutexGuard<'_, Server> {
        self.server.lock().expect("fake server lock")
    }

    /// The server, unless it is down.
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
            }
            if completion.release_lease {
                server.leases.remove(stream_id);
            }
        })
    }

    fn mark_incomplete(
        &mut self,
        stream_id: &str,
        token: u64,
        _reason: &str,
    ) -> Result<(), FencedWriteError> {
        self.fenced(stream_id, token, |server| {
            if let Some(stream) = server.streams.get_mut(stream_id) {
                stream.status = StoredStatus::Incomplete;
            }
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

    fn forget_identity(
        &mut self,
        identity: FileIdentity,
        stream_id: &str,
    ) -> Result<(), CheckpointError> {
        let mut server = self.up()?;
        let key = identity.key();
        if server.identities.get(&key).map(String::as_str) == Some(stream_id) {
            server.identities.remove(&key);
        }
        Ok(())
    }
}

/// An in-memory bucket that can be told to fail the next N puts.
#[derive(Default)]
pub struct MemoryStore {
    pub objects: Mutex<BTreeMap<String, Vec<u8>>>,
    pub failures_left: Mutex<u32>,
    /// Puts that panic (a stand-in for any bug in a job).
    pub panics_left: Mutex<u32>,
    pub puts: Mutex<u32>,
    pub uploads: Mutex<BTreeMap<String, MemoryUpload>>,
}

/// An upload in progress: (key, part number → bytes), by upload id.
pub type MemoryUpload = (String, BTreeMap<u32, Vec<u8>>);

fn missing(key: &str) -> StorageError {
    StorageError::Http {
        status: 404,
        key: key.into(),
        body: String::new(),
    }
}

impl ObjectStore for MemoryStore {
    fn put(&self, key: &str, body: &[u8], _: &str, digest: &[u8; 32]) -> Result<(), StorageError> {
        *self.puts.lock().unwrap() += 1;
        let panics = std::mem::replace(&mut *self.panics_left.lock().unwrap(), 0);
        if panics > 0 {
            *self.panics_left.lock().unwrap() = panics - 1;
            panic!("injected panic in put {key}");
        }
        let mut failures = self.failures_left.lock().unwrap();
        if *failures > 0 {
            *failures -= 1;
            return Err(StorageError::Http {
                status: 503,
                key: key.into(),
                body: "slow down".into(),
            });
        }
        assert_eq!(
            &<[u8; 32]>::from(Sha256::digest(body)),
            digest,
            "checksum header matches body"
        );
        self.objects
            .lock()
            .unwrap()
            .insert(key.into(), body.to_vec());
        Ok(())
    }
    fn get(&self, key: &str) -> Result<Vec<u8>, StorageError> {
        self.objects
            .lock()
            .unwrap()
            .get(key)
            .cloned()
            .ok_or_else(|| missing(key))
    }
    fn get_range(&self, key: &str, start: u64, end: u64) -> Result<Vec<u8>, StorageError> {
        let all = self.get(key)?;
        Ok(all[start as usize..=(end as usize).min(all.len() - 1)].to_vec())
    }
    fn head(&self, key: &str) -> Result<Option<ObjectInfo>, StorageError> {
        Ok(self
            .objects
            .lock()
            .unwrap()
            .get(key)
            .map(|body| ObjectInfo {
                size: body.len() as u64,
                etag: "\"memory\"".into(),
            }))
    }
    fn delete(&self, key: &str) -> Result<(), StorageError> {
        self.objects.lock().unwrap().remove(key);
        Ok(())
    }
    fn initiate_multipart(&self, key: &str, _: &str) -> Result<String, StorageError> {
        let mut uploads = self.uploads.lock().unwrap();
        let id = format!("upload-{}", uploads.len());
        uploads.insert(id.clone(), (key.into(), BTreeMap::new()));
        Ok(id)
    }
    fn upload_part_copy(
        &self,
        key: &str,
        id: &str,
        part: u32,
        source: &str,
    ) -> Result<String, StorageError> {
        let body = self.get(source)?;
        let mut uploads = self.uploads.lock().unwrap();
        let upload = uploads
            .get_mut(id)
            .filter(|u| u.0 == key)
            .ok_or_else(|| missing(key))?;
        upload.1.insert(part, body);
        Ok(format!("\"part-{part}\""))
    }
    fn complete_multipart(
        &self,
        key: &str,
        id: &str,
        parts: &[(u32, String)],
    ) -> Result<String, StorageError> {
        let (_, copied) = self
            .uploads
            .lock()
            .unwrap()
            .remove(id)
            .ok_or_else(|| missing(key))?;
        assert_eq!(parts.len(), copied.len());
        let body: Vec<u8> = copied.into_values().flatten().collect();
        self.objects.lock().unwrap().insert(key.into(), body);
        Ok("\"whole-1\"".into())
    }
    fn abort_multipart(&self, _: &str, id: &str) -> Result<(), StorageError> {
        self.uploads.lock().unwrap().remove(id);
        Ok(())
    }
}

/// Records the checkpoints a worker writes, with no lease semantics (see
/// [`FakeCheckpoints`] for those). With `taken_over` set, every fenced
/// write is refused, as when another replica claimed the stream.
#[derive(Default, Clone)]
pub struct MemoryCheckpoints {
    pub chunks: Arc<Mutex<Vec<(String, ChunkRecord)>>>,
    pub completed: Arc<Mutex<Vec<String>>>,
    pub assembly: Arc<Mutex<Option<AssemblyProgress>>>,
    pub assembled_revision: Arc<Mutex<u32>>,
    pub taken_over: Arc<AtomicBool>,
}

impl MemoryCheckpoints {
    fn fence(&self) -> Result<(), FencedWriteError> {
        if self.taken_over.load(std::sync::atomic::Ordering::Relaxed) {
            Err(FencedWriteError::LeaseLost)
        } else {
            Ok(())
        }
    }
}

impl CheckpointStore for MemoryCheckpoints {
    fn ping(&mut self) -> Result<(), CheckpointError> {
        Ok(())
    }
    fn load_streams(&mut self) -> Result<Vec<Loaded>, CheckpointError> {
        Ok(Vec::new())
    }
    fn load_stream(&mut self, _: &str) -> Result<Option<Loaded>, CheckpointError> {
        Ok(None)
    }
    fn register_stream(
        &mut self,
        s: &StoredStream,
        _: Option<&str>,
    ) -> Result<String, CheckpointError> {
        Ok(s.id.clone())
    }
    fn checkpoint_chunk(
        &mut self,
        id: &str,
        _: u64,
        chunk: &ChunkRecord,
    ) -> Result<(), FencedWriteError> {
        self.fence()?;
        self.chunks.lock().unwrap().push((id.into(), chunk.clone()));
        Ok(())
    }
    fn record_path(&mut self, _: &str, _: &str) -> Result<(), CheckpointError> {
        Ok(())
    }
    fn mark_complete(&mut self, id: &str, _: u64, _: &Completion) -> Result<(), FencedWriteError> {
        self.fence()?;
        self.completed.lock().unwrap().push(id.into());
        Ok(())
    }
    fn mark_incomplete(&mut self, _: &str, _: u64, _: &str) -> Result<(), FencedWriteError> {
        self.fence()
    }
    fn confirm_lease(&mut self, _: &str, _: u64) -> Result<(), FencedWriteError> {
        self.fence()
    }
    fn restore_stream(
        &mut self,
        _: &StoredStream,
        _: Option<u64>,
    ) -> Result<bool, CheckpointError> {
        Ok(false)
    }
    fn claim(&mut self, _: &str) -> Result<Claim, CheckpointError> {
        Ok(Claim::Granted { token: 1 })
    }
    fn renew(&mut self, leases: &[(&str, u64)]) -> Result<Renewal, CheckpointError> {
        Ok(Renewal {
            replicas: 1,
            statuses: vec![LeaseStatus::Held; leases.len()],
        })
    }
    fn release(&mut self, _: &str, _: u64) -> Result<(), CheckpointError> {
        Ok(())
    }
    fn leave(&mut self) -> Result<(), CheckpointError> {
        Ok(())
    }
    fn load_assembly(&mut self, _: &str) -> Result<Option<AssemblyProgress>, CheckpointError> {
        Ok(self.assembly.lock().unwrap().clone())
    }
    fn save_assembly(
        &mut self,
        _: &str,
        _: u64,
        progress: Option<&AssemblyProgress>,
    ) -> Result<(), FencedWriteError> {
        self.fence()?;
        *self.assembly.lock().unwrap() = progress.cloned();
        Ok(())
    }
    fn finish_assembly(&mut self, _: &str, _: u64, revision: u32) -> Result<(), FencedWriteError> {
        self.fence()?;
        *self.assembled_revision.lock().unwrap() = revision;
        *self.assembly.lock().unwrap() = None;
        Ok(())
    }
    fn forget_identity(&mut self, _: FileIdentity, _: &str) -> Result<(), CheckpointError> {
        Ok(())
    }
}
