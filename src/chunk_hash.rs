//! The hashes that let completion verify a stream without hashing it again
//! with sha256.
//!
//! The metadata contract needs two sha256 digests over every byte: each
//! chunk's and the whole file's. Both are computed once, while the chunk is
//! uploaded: the chunk's for its PUT, and the whole file's by resuming the
//! sha256 state the previous chunk's record left ([`RunningSha256`]). Each
//! record also keeps an xxh3-128 of the chunk ([`fast_hash`]), an order of
//! magnitude cheaper than sha256. At completion the file is read once more
//! and only xxh3'd: a chunk whose xxh3 matches its record is unchanged, and
//! the whole-file state is taken from the records instead of from the bytes
//! ([`WholeFile`]).
//!
//! A state is trusted only for the bytes it was computed over. Each one
//! carries the *lineage* of those bytes: a fast hash chained over the xxh3 of
//! every chunk from chunk 0 to its own ([`lineage_after`]). Completion
//! computes the lineage of the bytes on disk as it reads them, and takes a
//! recorded state only where the two agree. So a state computed before its
//! predecessor was rewritten (ffmpeg patching the mdat size at the end of a
//! recording) is recognized as stale, and a state need not exist for every
//! chunk: `metadata.json` keeps one, after the last full chunk, which lets a
//! file that grows after completion be hashed from there on instead of from
//! byte 0. Records without a state (or with one that does not decode) are
//! hashed from their bytes.

mod twin;

use serde::{Deserialize, Serialize};
use twin::{Sha256State, update_both};
use xxhash_rust::xxh3::{Xxh3Default, xxh3_128};

/// Bytes hashed at a time when several hashes run over the same bytes: small
/// enough to stay in the CPU's cache between them.
pub const CACHED_PIECE: usize = 64 * 1024;

/// The xxh3-128 of `bytes`, in hex: tells a changed chunk from an unchanged
/// one. Not cryptographic: it detects what a writer rewrote, not tampering.
pub fn fast_hash(bytes: &[u8]) -> String {
    xxh3_hex(xxh3_128(bytes))
}

/// An xxh3-128 digest as [`fast_hash`] writes it (for digests computed in
/// pieces).
pub fn xxh3_hex(digest: u128) -> String {
    format!("{digest:032x}")
}

/// The whole-file sha256 state after one chunk, as checkpointed with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunningSha256 {
    /// The sha256 state over every byte from 0 to this chunk's end
    /// ([`Sha256State::to_bytes`]), in hex.
    pub state: String,
    /// The [`lineage_after`] of those bytes. Records written before it
    /// existed have none, and their state is never trusted.
    #[serde(default)]
    pub lineage: String,
}

impl RunningSha256 {
    /// The state before chunk 0.
    pub fn initial() -> Self {
        Self {
            state: serialize(&Sha256State::new()),
            lineage: String::new(),
        }
    }
}

/// What a chunk job computes over the chunk it uploads, in one pass: its
/// sha256 and xxh3, and the whole-file state after it when the state after
/// the previous chunk is known.
pub struct ChunkHashes {
    pub sha256: [u8; 32],
    pub xxh3: String,
    pub whole_sha256: Option<RunningSha256>,
}

impl ChunkHashes {
    /// Hashes `bytes`, resuming the whole-file state from `before` (the
    /// state after the previous chunk). Both sha256 computations run through
    /// the bytes together ([`update_both`]), at about the cost of one.
    pub fn of(bytes: &[u8], before: Option<&RunningSha256>) -> Self {
        let mut fast = Xxh3Default::new();
        let mut chunk = Sha256State::new();
        let mut whole = before.and_then(|before| Some((deserialize(&before.state)?, before)));
        // Piece by piece, so that each hash reads bytes the previous one
        // just brought into the cache.
        for piece in bytes.chunks(CACHED_PIECE) {
            fast.update(piece);
            match &mut whole {
                Some((whole, _)) => update_both(&mut chunk, whole, piece),
                None => chunk.update(piece),
            }
        }
        let xxh3 = xxh3_hex(fast.digest128());
        Self {
            sha256: chunk.finalize(),
            whole_sha256: whole.map(|(whole, before)| RunningSha256 {
                state: serialize(&whole),
                lineage: lineage_after(&before.lineage, &xxh3),
            }),
            xxh3,
        }
    }
}

/// The lineage of a file's bytes up to the end of a chunk: the lineage up to
/// the chunk before (empty before chunk 0), chained with the chunk's
/// [`fast_hash`].
pub fn lineage_after(previous: &str, xxh3: &str) -> String {
    fast_hash(format!("{previous}/{xxh3}").as_bytes())
}

fn serialize(hasher: &Sha256State) -> String {
    hex::encode(hasher.to_bytes())
}

fn deserialize(state: &str) -> Option<Sha256State> {
    Sha256State::from_bytes(&hex::decode(state).ok()?)
}

/// One chunk as completion finds it in the file.
pub struct ChunkOnDisk<'a> {
    pub index: u64,
    pub size: u64,
    /// The [`fast_hash`] of its bytes.
    pub xxh3: &'a str,
    /// Whether its bytes are the ones its record was written for.
    pub unchanged: bool,
}

/// What [`WholeFile::resume`] made of a chunk.
#[derive(Debug, PartialEq, Eq)]
pub enum Resumption {
    /// The state after the chunk came from its record.
    Resumed(RunningSha256),
    /// The chunk is passed over for now, in the hope of resuming from a
    /// later record; [`WholeFile::behind`] says if it must be read again.
    PassedOver,
    /// The chunk's bytes must be hashed now: [`WholeFile::hash_next`].
    NeedsBytes,
}

/// The whole-file sha256 during completion, which walks the file's chunks in
/// order. It resumes from every recorded state whose lineage matches the
/// bytes on disk, and hashes bytes only where none does.
pub struct WholeFile {
    chunk_size: u64,
    /// The state over chunks `0..next`, and the lineage of those chunks.
    hasher: Sha256State,
    hasher_lineage: String,
    next: u64,
    /// How many chunks were walked, and their lineage as they are on disk.
    walked: u64,
    walked_lineage: String,
    /// Whether every chunk walked so far matched its record.
    intact: bool,
    hashed_bytes: u64,
    /// The latest state known after a full chunk.
    checkpoint: Option<(u64, RunningSha256)>,
}

impl WholeFile {
    pub fn new(chunk_size: u64) -> Self {
        Self {
            chunk_size,
            hasher: Sha256State::new(),
            hasher_lineage: String::new(),
            next: 0,
            walked: 0,
            walked_lineage: String::new(),
            intact: true,
            hashed_bytes: 0,
            checkpoint: None,
        }
    }

    /// Whether chunk `index` will need its bytes hashed whatever they are:
    /// the state after it cannot come from a record (none is recorded, or an
    /// earlier chunk changed) and it cannot be passed over. The caller then
    /// reads the chunk whole instead of only fingerprinting it.
    pub fn must_hash(&self, index: u64, state_recorded: bool, state_ahead: bool) -> bool {
        self.next == index && (!self.intact || (!state_recorded && !state_ahead))
    }

    /// Takes in the next chunk. `recorded` is the state its record holds, if
    /// any; `state_ahead` says whether a later chunk's record holds one, so
    /// that unchanged bytes may be passed over in the hope of resuming there.
    pub fn resume(
        &mut self,
        chunk: &ChunkOnDisk,
        recorded: Option<&RunningSha256>,
        state_ahead: bool,
    ) -> Resumption {
        self.walked = chunk.index + 1;
        self.walked_lineage = lineage_after(&self.walked_lineage, chunk.xxh3);
        self.intact &= chunk.unchanged;
        let trusted = recorded
            .filter(|running| running.lineage == self.walked_lineage)
            .and_then(|running| Some((deserialize(&running.state)?, running)));
        if let Some((hasher, running)) = trusted {
            self.hasher = hasher;
            self.hasher_lineage.clone_from(&running.lineage);
            self.next = chunk.index + 1;
            self.note(chunk.index, chunk.size, running);
            return Resumption::Resumed(running.clone());
        }
        if self.next == chunk.index && !(self.intact && state_ahead) {
            return Resumption::NeedsBytes;
        }
        Resumption::PassedOver
    }

    /// Hashes the bytes of the chunk [`WholeFile::resume`] just asked for
    /// (`xxh3` is their [`fast_hash`]) and returns the state after it.
    pub fn hash_next(&mut self, bytes: &[u8], xxh3: &str) -> RunningSha256 {
        debug_assert_eq!(self.next + 1, self.walked, "the chunk just resumed");
        self.hash(bytes, xxh3, None)
    }

    /// [`WholeFile::hash_next`] for a chunk that is uploaded too: its own
    /// sha256 is computed in the same pass ([`update_both`]) and returned
    /// with the state.
    pub fn hash_next_with_digest(&mut self, bytes: &[u8], xxh3: &str) -> ([u8; 32], RunningSha256) {
        debug_assert_eq!(self.next + 1, self.walked, "the chunk just resumed");
        let mut chunk = Sha256State::new();
        let running = self.hash(bytes, xxh3, Some(&mut chunk));
        (chunk.finalize(), running)
    }

    /// The first chunk whose bytes were passed over and are still needed:
    /// the caller reads it and every later chunk again, in order, into
    /// [`WholeFile::catch_up`].
    pub fn behind(&self) -> Option<u64> {
        (self.next < self.walked).then_some(self.next)
    }

    /// Hashes the next chunk that was passed over (`xxh3` is the
    /// [`fast_hash`] of its bytes).
    pub fn catch_up(&mut self, bytes: &[u8], xxh3: &str) -> RunningSha256 {
        self.hash(bytes, xxh3, None)
    }

    /// Bytes this completion hashed with sha256 (none in the common case).
    pub fn hashed_bytes(&self) -> u64 {
        self.hashed_bytes
    }

    /// The state after the last full chunk whose state is known, for the
    /// next revision to resume from.
    pub fn checkpoint(&self) -> Option<&(u64, RunningSha256)> {
        self.checkpoint.as_ref()
    }

    pub fn finish(self) -> [u8; 32] {
        debug_assert!(self.behind().is_none(), "every chunk is hashed");
        self.hasher.finalize()
    }

    /// Hashes the next chunk's bytes into the state, and into `chunk` as
    /// well if given.
    fn hash(&mut self, bytes: &[u8], xxh3: &str, chunk: Option<&mut Sha256State>) -> RunningSha256 {
        match chunk {
            Some(chunk) => update_both(chunk, &mut self.hasher, bytes),
            None => self.hasher.update(bytes),
        }
        self.hashed_bytes += bytes.len() as u64;
        self.hasher_lineage = lineage_after(&self.hasher_lineage, xxh3);
        let running = RunningSha256 {
            state: serialize(&self.hasher),
            lineage: self.hasher_lineage.clone(),
        };
        let index = self.next;
        self.next += 1;
        self.note(index, bytes.len() as u64, &running);
        running
    }

    fn note(&mut self, index: u64, size: u64, running: &RunningSha256) {
        let later = self.checkpoint.as_ref().is_none_or(|(at, _)| index > *at);
        if size == self.chunk_size && later {
            self.checkpoint = Some((index, running.clone()));
        }
    }
}

#[cfg(test)]
mod tests;
