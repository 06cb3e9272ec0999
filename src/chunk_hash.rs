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
//! when every chunk so far is unchanged the whole-file state is taken from
//! the records instead of from the bytes ([`WholeFile`]).
//!
//! The states form a chain: each record names the state it resumed from (by
//! its xxh3), so a record whose predecessor was re-uploaded later (ffmpeg
//! patching the mdat size at the end of a recording) is recognized as stale,
//! and completion hashes the file's bytes from that chunk on. Records written
//! before these fields existed have neither, and fall back to sha256.

use serde::{Deserialize, Serialize};
use sha2::digest::array::Array;
use sha2::digest::common::hazmat::SerializableState;
use sha2::{Digest, Sha256};
use xxhash_rust::xxh3::xxh3_128;

/// The xxh3-128 of `bytes`, in hex: tells a changed chunk from an unchanged
/// one. Not cryptographic: it detects what a writer rewrote, not tampering.
pub fn fast_hash(bytes: &[u8]) -> String {
    format!("{:032x}", xxh3_128(bytes))
}

/// The whole-file sha256 state after one chunk, as checkpointed with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunningSha256 {
    /// sha2's serialized state over every byte from 0 to this chunk's end,
    /// in hex.
    pub state: String,
    /// The [`fast_hash`] of the state this one was resumed from (the
    /// previous chunk's, or the initial state for chunk 0).
    pub resumed_from: String,
}

impl RunningSha256 {
    /// The state after `bytes`, resumed from `before` (a serialized state);
    /// `None` if `before` is not one.
    pub fn extend(before: &str, bytes: &[u8]) -> Option<Self> {
        let mut hasher = deserialize(before)?;
        hasher.update(bytes);
        Some(Self::after(before, &hasher))
    }

    fn after(before: &str, hasher: &Sha256) -> Self {
        Self {
            state: serialize(hasher),
            resumed_from: fast_hash(before.as_bytes()),
        }
    }
}

/// The serialized state before chunk 0.
pub fn initial_state() -> String {
    serialize(&Sha256::new())
}

fn serialize(hasher: &Sha256) -> String {
    hex::encode(hasher.serialize())
}

fn deserialize(state: &str) -> Option<Sha256> {
    let bytes = hex::decode(state).ok()?;
    let array = Array::try_from(bytes.as_slice()).ok()?;
    Sha256::deserialize(&array).ok()
}

/// The whole-file sha256 during completion, which walks the file's chunks in
/// order.
pub enum WholeFile {
    /// Every chunk so far is unchanged and its recorded state is part of an
    /// unbroken chain: this is the state after the previous chunk, and no
    /// byte has been hashed.
    Recorded { hasher: Sha256, serialized: String },
    /// The chain broke (a changed chunk, a stale or missing state): the
    /// file's bytes are hashed from there on.
    Hashing(Sha256),
}

impl Default for WholeFile {
    fn default() -> Self {
        WholeFile::Recorded {
            hasher: Sha256::new(),
            serialized: initial_state(),
        }
    }
}

impl WholeFile {
    /// Takes in the next chunk: `bytes` as read now, and `unchanged`, the
    /// recorded state of the chunk if its bytes are the ones uploaded.
    /// Returns the state after this chunk, for a record written now.
    pub fn advance(&mut self, unchanged: Option<&RunningSha256>, bytes: &[u8]) -> RunningSha256 {
        match self {
            WholeFile::Recorded { hasher, serialized } => {
                let link = fast_hash(serialized.as_bytes());
                let resumed = unchanged
                    .filter(|running| running.resumed_from == link)
                    .and_then(|running| Some((deserialize(&running.state)?, running)));
                if let Some((next, running)) = resumed {
                    *hasher = next;
                    serialized.clone_from(&running.state);
                    return running.clone();
                }
                let mut hashing = hasher.clone();
                hashing.update(bytes);
                let running = RunningSha256::after(serialized, &hashing);
                *self = WholeFile::Hashing(hashing);
                running
            }
            WholeFile::Hashing(hasher) => {
                let before = serialize(hasher);
                hasher.update(bytes);
                RunningSha256::after(&before, hasher)
            }
        }
    }

    /// True while no byte had to be hashed: the common case.
    pub fn from_records(&self) -> bool {
        matches!(self, WholeFile::Recorded { .. })
    }

    pub fn finish(self) -> [u8; 32] {
        match self {
            WholeFile::Recorded { hasher, .. } | WholeFile::Hashing(hasher) => {
                hasher.finalize().into()
            }
        }
    }
}

#[cfg(test)]
mod tests;
