//! The worker's memory for file bytes: one buffer for the chunk being
//! uploaded, which grows to the chunk size once and is never zeroed again,
//! and a small one for the completion check, which only fingerprints a chunk
//! and so reads it in pieces that stay in the CPU cache instead of copying
//! 10 MiB out to memory and reading it back.

use std::fs::File;
use std::os::unix::fs::FileExt;

use xxhash_rust::xxh3::Xxh3Default;

use crate::chunk_hash::{CACHED_PIECE as PIECE, fast_hash, xxh3_hex};

#[derive(Default)]
pub(super) struct ChunkBuffer {
    storage: Vec<u8>,
    len: usize,
    piece: Vec<u8>,
}

impl ChunkBuffer {
    /// Reads `[offset, offset + len)` of `file` into the buffer.
    pub(super) fn fill(&mut self, file: &File, offset: u64, len: usize) -> std::io::Result<()> {
        if self.storage.len() < len {
            self.storage.resize(len, 0);
        }
        self.len = 0;
        file.read_exact_at(&mut self.storage[..len], offset)?;
        self.len = len;
        Ok(())
    }

    /// The bytes the last [`ChunkBuffer::fill`] read.
    pub(super) fn bytes(&self) -> &[u8] {
        &self.storage[..self.len]
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
