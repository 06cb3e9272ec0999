//! Reading a stream back from the bucket: its validated `metadata.json`, its
//! chunks (from their own objects, or from the assembled object once they
//! were deleted), and large objects in bounded ranges.
//!
//! `restore`, `verify` and the worker's assembly all read what an earlier run
//! wrote, and the bucket is outside this process: anything can be there. This
//! module is the one edge where those bytes become a validated
//! [`StreamMetadata`] (or a typed error naming the key), and it sits below
//! `restore` and `inventory` so neither imports the other.

use sha2::{Digest, Sha256};

use crate::error::{AppError, StorageError};
use crate::metadata::{ChunkRecord, KeyLayout, StreamMetadata};
use crate::store::ObjectStore;

/// Reads and validates the stream's metadata. A missing object, an
/// unreadable one and a corrupt one are each an [`AppError::Integrity`]
/// that names the key.
pub fn fetch_metadata(
    store: &dyn ObjectStore,
    layout: &KeyLayout,
    stream_id: &str,
) -> Result<StreamMetadata, AppError> {
    let key = layout.metadata(stream_id);
    let body = store.get(&key).map_err(|err| {
        if err.is_not_found() {
            AppError::Integrity(format!("no stream {stream_id:?}: {key} does not exist"))
        } else {
            AppError::Storage(err)
        }
    })?;
    StreamMetadata::decode(&body).map_err(|err| AppError::Integrity(format!("{key}: {err}")))
}

/// A chunk's bytes, for its caller to check against the record: its own
/// object, or, once the chunk objects were deleted after assembly
/// (`chunks_deleted`), the same byte range of the assembled object. Memory
/// stays at one chunk either way.
pub fn fetch_chunk(
    store: &dyn ObjectStore,
    metadata: &StreamMetadata,
    chunk: &ChunkRecord,
) -> Result<Vec<u8>, StorageError> {
    match &metadata.assembled {
        Some(assembled) if metadata.chunks_deleted => fetch_range(store, &assembled.key, chunk),
        _ => store.get(&chunk.key),
    }
}

/// The byte range `chunk` covers in the whole-file object `key`. A short
/// object is an error.
pub fn fetch_range(
    store: &dyn ObjectStore,
    key: &str,
    chunk: &ChunkRecord,
) -> Result<Vec<u8>, StorageError> {
    let Some(last) = (chunk.offset + chunk.size_bytes).checked_sub(1) else {
        return Ok(Vec::new());
    };
    let bytes = store.get_range(key, chunk.offset, last)?;
    if bytes.len() as u64 != chunk.size_bytes {
        return Err(StorageError::Other {
            key: key.to_string(),
            detail: format!(
                "object ends before byte {} (chunk {})",
                last + 1,
                chunk.index
            ),
        });
    }
    Ok(bytes)
}

/// The sha256 of a large object, read in `piece`-sized ranges.
pub fn sha256_of_object(
    store: &dyn ObjectStore,
    key: &str,
    size: u64,
    piece: u64,
) -> Result<String, StorageError> {
    let mut hasher = Sha256::new();
    read_in_ranges(store, key, size, piece, |bytes| {
        hasher.update(bytes);
        Ok(())
    })?;
    Ok(hex::encode(hasher.finalize()))
}

/// Reads the first `size` bytes of an object in `piece`-sized ranges (so
/// memory stays at one piece; a `piece` of 0 reads one byte at a time),
/// handing each to `each`. A short object is an error.
pub fn read_in_ranges<E: From<StorageError>>(
    store: &dyn ObjectStore,
    key: &str,
    size: u64,
    piece: u64,
    mut each: impl FnMut(&[u8]) -> Result<(), E>,
) -> Result<(), E> {
    let piece = piece.max(1);
    let mut offset: u64 = 0;
    while offset < size {
        let end = offset.saturating_add(piece).min(size) - 1;
        let bytes = store.get_range(key, offset, end)?;
        if bytes.len() as u64 != end - offset + 1 {
            return Err(StorageError::Other {
                key: key.to_string(),
                detail: format!("object is shorter than {size} bytes"),
            }
            .into());
        }
        each(&bytes)?;
        offset = end + 1;
    }
    Ok(())
}
