//! A checkpoint store that only records what a worker writes.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use crate::error::{CheckpointError, FencedWriteError};
use crate::metadata::ChunkRecord;
use crate::notify::Announcement;
use crate::scan::FileIdentity;
use crate::store::CheckpointStore;
use crate::store::ports::Loaded;
use crate::store::ports::{
    AssemblyProgress, Claim, Completion, LeaseStatus, Renewal, StoredStream,
};

/// Records the checkpoints a worker writes, with no lease semantics (see
/// [`FakeCheckpoints`] for those). With `taken_over` set, every fenced
/// write is refused, as when another replica claimed the stream.
#[derive(Default, Clone)]
pub struct MemoryCheckpoints {
    pub chunks: Arc<Mutex<Vec<(String, ChunkRecord)>>>,
    pub completed: Arc<Mutex<Vec<String>>>,
    /// Events queued with completions and closes, and on their own.
    pub announced: Arc<Mutex<Vec<Announcement>>>,
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
    fn record_identity(
        &mut self,
        _: &str,
        _: FileIdentity,
        _: FileIdentity,
    ) -> Result<(), CheckpointError> {
        Ok(())
    }
    fn mark_complete(
        &mut self,
        id: &str,
        _: u64,
        completion: &Completion,
    ) -> Result<(), FencedWriteError> {
        self.fence()?;
        self.completed.lock().unwrap().push(id.into());
        self.announced
            .lock()
            .unwrap()
            .extend(completion.announcement.clone());
        Ok(())
    }
    fn mark_incomplete(
        &mut self,
        _: &str,
        _: u64,
        _: &str,
        announcement: Option<&Announcement>,
    ) -> Result<(), FencedWriteError> {
        self.fence()?;
        self.announced.lock().unwrap().extend(announcement.cloned());
        Ok(())
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
    fn retire_stream(
        &mut self,
        _: FileIdentity,
        _: &str,
        _: std::time::Duration,
    ) -> Result<(), CheckpointError> {
        Ok(())
    }
    fn announce(&mut self, announcement: &Announcement) -> Result<bool, CheckpointError> {
        self.announced.lock().unwrap().push(announcement.clone());
        Ok(true)
    }
}
