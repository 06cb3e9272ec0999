//! The workers' memory for file bytes. Whole chunks are held in buffers
//! from a [`BufferPool`]: `WORKERS` of them, each grown to the chunk size
//! once and never zeroed again, shared by all worker threads, so memory stays
//! bounded however many threads check completions. A worker takes one only
//! while a job needs a whole chunk in memory (to upload or hash it), and
//! gives it back when the job ends. The completion check mostly only
//! fingerprints chunks; it reads them in pieces into a small buffer of its
//! own, which stay in the CPU cache instead of copying 10 MiB out to memory
//! and reading it back.

use std::fs::File;
use std::os::unix::fs::FileExt;

use crossbeam_channel::{Receiver, Sender, bounded};
use xxhash_rust::xxh3::Xxh3Default;

use crate::chunk_hash::{CACHED_PIECE as PIECE, fast_hash, xxh3_hex};

/// A fixed number of chunk buffers, shared by the worker threads.
#[derive(Clone)]
pub struct BufferPool {
    give_back: Sender<Vec<u8>>,
    take: Receiver<Vec<u8>>,
}

impl BufferPool {
    pub fn new(buffers: usize) -> Self {
        let (give_back, take) = bounded(buffers);
        for _ in 0..buffers {
            give_back.send(Vec::new()).expect("room for every buffer");
        }
        Self { give_back, take }
    }
}

pub(super) struct ChunkBuffer {
    pool: BufferPool,
    held: Option<Vec<u8>>,
    len: usize,
    piece: Vec<u8>,
}

impl Default for ChunkBuffer {
    /// A buffer of its own, for a worker that shares none.
    fn default() -> Self {
        Self::from_pool(BufferPool::new(1))
    }
}

impl Drop for ChunkBuffer {
    fn drop(&mut self) {
        self.release();
    }
}

impl ChunkBuffer {
    pub(super) fn from_pool(pool: BufferPool) -> Self {
        Self {
            pool,
            held: None,
            len: 0,
            piece: Vec::new(),
        }
    }

    /// Reads `[offset, offset + len)` of `file` into a chunk buffer, waiting
    /// for one from the pool if this worker holds none.
    pub(super) fn fill(&mut self, file: &File, offset: u64, len: usize) -> std::io::Result<()> {
        self.len = 0;
        let pool = &self.pool;
        let storage = self.held.get_or_insert_with(|| {
            // This buffer holds a sender of the pool: it never disconnects.
            pool.take.recv().unwrap_or_default()
        });
        if storage.len() < len {
            storage.resize(len, 0);
        }
        file.read_exact_at(&mut storage[..len], offset)?;
        self.len = len;
        Ok(())
    }

    /// The bytes the last [`ChunkBuffer::fill`] read.
    pub(super) fn bytes(&self) -> &[u8] {
        self.held
            .as_deref()
            .map_or(&[], |storage| &storage[..self.len])
    }

    /// Gives the chunk buffer back to the pool, and frees the piece buffer
    /// (at the end of every job: only threads checking a completion hold
    /// one).
    pub(super) fn release(&mut self) {
        self.len = 0;
        self.piece = Vec::new();
        if let Some(storage) = self.held.take() {
            // The pool has room for every buffer it handed out.
            let _ = self.pool.give_back.try_send(storage);
        }
    }

    /// The [`fast_hash`] of `[offset, offset + len)` of `file`, read in
    /// pieces: the buffer's bytes are left as they were.
    pub(super) fn fingerprint(
        &mut self,
        file: &File,
        offset: u64,
        len: usize,
    ) -> std::io::Result<String> {
        self.piece.resize(PIECE, 0);
        let mut hasher = Xxh3Default::new();
        let mut done = 0;
        while done < len {
            let piece = &mut self.piece[..PIECE.min(len - done)];
            file.read_exact_at(piece, offset + done as u64)?;
            hasher.update(piece);
            done += piece.len();
        }
        Ok(xxh3_hex(hasher.digest128()))
    }

    /// The [`fast_hash`] of the buffer's bytes.
    pub(super) fn fast_hash(&self) -> String {
        fast_hash(self.bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fingerprint_read_in_pieces_is_the_fast_hash_of_the_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let bytes: Vec<u8> = (0..PIECE * 2 + 123).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        let file = File::open(&path).unwrap();
        let mut buffer = ChunkBuffer::default();
        buffer.fill(&file, 7, 100).unwrap();
        for (offset, len) in [(0, bytes.len()), (5, PIECE), (PIECE + 1, PIECE + 3), (9, 0)] {
            assert_eq!(
                buffer.fingerprint(&file, offset as u64, len).unwrap(),
                fast_hash(&bytes[offset..offset + len])
            );
        }
        assert_eq!(buffer.bytes(), &bytes[7..107], "the buffer is untouched");
        buffer.fill(&file, 0, 10).unwrap();
        assert_eq!(
            buffer.bytes(),
            &bytes[..10],
            "a shorter read after a longer one"
        );
        assert!(buffer.fill(&file, bytes.len() as u64 - 5, 10).is_err());
        assert!(
            buffer.bytes().is_empty(),
            "a failed read leaves no stale bytes"
        );
    }
}
