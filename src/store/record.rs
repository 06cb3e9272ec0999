//! A stream's checkpoint record as Redis holds it: the field list written,
//! and the validating decoder for what is read back.
//!
//! Redis is outside this process: a record may have been written by an older
//! version, edited by hand, or damaged. Decoding is the one edge where its
//! strings become a [`StoredStream`]; anything that would later make the
//! coordinator or a worker compute an absurd offset (a chunk size of 0, an
//! index beyond any file, a record at the wrong offset) is a
//! [`CorruptRecord`] that names the stream and says why, and the daemon
//! quarantines that stream instead of trusting it.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::config::MAX_CHUNK_SIZE;
use crate::metadata::{ChunkRecord, MAX_CHUNKS, file_name, unix_millis};
use crate::scan::FileIdentity;
use crate::store::ports::{
    CorruptRecord, HEAD_PRINT_HEX, HeadPrint, Loaded, StoredStatus, StoredStream,
};

pub(crate) fn from_unix_millis(millis: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(millis)
}

/// The record fields of a stream, as (name, value) pairs.
pub(crate) fn stream_fields(stream: &StoredStream) -> Vec<(&'static str, String)> {
    let mut fields = vec![
        ("id", stream.id.clone()),
        ("identity", stream.identity.key()),
        ("path", stream.rel_path.clone()),
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
    ];
    // Absent means 0: every complete stream's record is a little smaller.
    if stream.assembled_revision > 0 {
        fields.push(("assembled_revision", stream.assembled_revision.to_string()));
    }
    if stream.status == StoredStatus::Complete
        && let Some(head) = &stream.head
    {
        fields.push(head_field(head));
    }
    fields
}

/// The field that holds a complete stream's [`HeadPrint`]; its size is not
/// stored, as the first chunk of a complete stream holds
/// `min(chunk_size, completed_size)` bytes.
pub(crate) fn head_field(head: &HeadPrint) -> (&'static str, String) {
    ("head_sha256", head.sha256.clone())
}

/// Rebuilds stream `id` from its record and chunk hash. `None` if there is
/// no record at all (the stream is then unknown and registered afresh);
/// a [`CorruptRecord`] if there is one that cannot be trusted.
pub(crate) fn decode_stream(
    id: &str,
    fields: &BTreeMap<String, String>,
    chunks: &BTreeMap<String, String>,
) -> Option<Loaded> {
    if fields.is_empty() {
        return None;
    }
    let corrupt = |reason: String| CorruptRecord {
        id: id.to_string(),
        path: fields.get("path").cloned(),
        reason,
    };
    Some(decode_fields(fields, chunks).map_err(corrupt))
}

fn decode_fields(
    fields: &BTreeMap<String, String>,
    chunk_fields: &BTreeMap<String, String>,
) -> Result<StoredStream, String> {
    let text = |name: &str| {
        fields
            .get(name)
            .map(String::as_str)
            .ok_or_else(|| format!("field {name} is missing"))
    };
    let parsed = |name: &str| -> Result<u64, String> {
        let value = text(name)?;
        value
            .parse()
            .map_err(|_| format!("field {name} is {value:?}, not a number"))
    };
    let small = |name: &str| -> Result<u32, String> {
        u32::try_from(parsed(name)?).map_err(|_| format!("field {name} is out of range"))
    };
    let optional = |name: &str| -> Result<u64, String> {
        if fields.contains_key(name) {
            parsed(name)
        } else {
            Ok(0)
        }
    };
    let chunk_size = parsed("chunk_size")?;
    if !(1..=MAX_CHUNK_SIZE).contains(&chunk_size) {
        return Err(format!(
            "chunk size {chunk_size} is outside 1..={MAX_CHUNK_SIZE}"
        ));
    }
    let identity = text("identity")?;
    let status = text("status")?;
    let completed_mtime_ns = match fields.get("completed_mtime_ns") {
        None => 0,
        Some(value) => value
            .parse()
            .map_err(|_| format!("field completed_mtime_ns is {value:?}, not a number"))?,
    };
    let assembled_revision = if fields.contains_key("assembled_revision") {
        small("assembled_revision")?
    } else {
        0
    };
    let head = match fields.get("head_sha256") {
        None => None,
        Some(sha256)
            if sha256.len() == HEAD_PRINT_HEX && sha256.bytes().all(|b| b.is_ascii_hexdigit()) =>
        {
            Some(HeadPrint {
                size_bytes: chunk_size.min(optional("completed_size")?),
                sha256: sha256.to_ascii_lowercase(),
            })
        }
        Some(other) => {
            return Err(format!(
                "field head_sha256 is {other:?}, not {HEAD_PRINT_HEX} hex digits"
            ));
        }
    }
    .filter(|head| head.size_bytes > 0);
    Ok(StoredStream {
        id: text("id")?.to_string(),
        identity: FileIdentity::parse_key(identity)
            .ok_or_else(|| format!("identity {identity:?} is not device:inode"))?,
        rel_path: text("path")?.to_string(),
        // The file name is the path's last component (a rename changes
        // both); records written before it was derived still hold a
        // `file_name` field, which is ignored.
        file_name: file_name(text("path")?),
        chunk_size,
        started_at: from_unix_millis(parsed("started_at_ms")?),
        last_change_at: from_unix_millis(parsed("last_change_at_ms")?),
        status: StoredStatus::parse(status)
            .ok_or_else(|| format!("status {status:?} is not active, complete or incomplete"))?,
        revision: small("revision")?,
        completed_size: optional("completed_size")?,
        completed_mtime_ns,
        assembled_revision,
        chunks: decode_chunks(chunk_fields, chunk_size)?,
        head,
    })
}

/// Each chunk record must sit where its index says, within one chunk size.
fn decode_chunks(
    fields: &BTreeMap<String, String>,
    chunk_size: u64,
) -> Result<BTreeMap<u64, ChunkRecord>, String> {
    if fields.len() > MAX_CHUNKS {
        return Err(format!(
            "{} chunk records is more than the {MAX_CHUNKS} a stream can have",
            fields.len()
        ));
    }
    let mut chunks = BTreeMap::new();
    for (field, json) in fields {
        let record: ChunkRecord = serde_json::from_str(json)
            .map_err(|err| format!("chunk record {field:?} is not a chunk record: {err}"))?;
        let index = record.index;
        if field.parse::<u64>().ok() != Some(index) {
            return Err(format!("chunk record {field:?} holds chunk {index}"));
        }
        if index >= MAX_CHUNKS as u64 {
            return Err(format!("chunk index {index} is beyond {MAX_CHUNKS}"));
        }
        if record.offset != index * chunk_size {
            return Err(format!(
                "chunk {index} starts at {} instead of {}",
                record.offset,
                index * chunk_size
            ));
        }
        if !(1..=chunk_size).contains(&record.size_bytes) {
            return Err(format!(
                "chunk {index} has {} bytes, not 1..={chunk_size}",
                record.size_bytes
            ));
        }
        chunks.insert(index, record);
    }
    Ok(chunks)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream() -> StoredStream {
        StoredStream {
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
                    xxh3: None,
                    whole_sha256: None,
                },
            )]),
            head: Some(HeadPrint {
                size_bytes: 12,
                sha256: "ab".repeat(16),
            }),
        }
    }

    type Hashes = (BTreeMap<String, String>, BTreeMap<String, String>);

    fn encode(stream: &StoredStream) -> Hashes {
        let fields = stream_fields(stream)
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        let chunks = stream
            .chunks
            .iter()
            .map(|(i, c)| (i.to_string(), serde_json::to_string(c).unwrap()))
            .collect();
        (fields, chunks)
    }

    fn reason(fields: &BTreeMap<String, String>, chunks: &BTreeMap<String, String>) -> String {
        match decode_stream("cam-1", fields, chunks) {
            Some(Err(corrupt)) => corrupt.reason,
            other => panic!("expected a corrupt record, got {other:?}"),
        }
    }

    #[test]
    fn a_stored_stream_round_trips_through_its_fields() {
        let (fields, chunks) = encode(&stream());
        assert_eq!(decode_stream("cam-1", &fields, &chunks), Some(Ok(stream())));
        assert_eq!(decode_stream("cam-1", &BTreeMap::new(), &chunks), None);
    }

    #[test]
    fn corrupt_records_say_why() {
        let (fields, chunks) = encode(&stream());
        let with = |name: &str, value: &str| {
            let mut fields = fields.clone();
            fields.insert(name.into(), value.into());
            fields
        };
        assert!(reason(&with("chunk_size", "0"), &chunks).contains("chunk size 0"));
        assert!(reason(&with("chunk_size", "ten"), &chunks).contains("not a number"));
        assert!(reason(&with("status", "paused"), &chunks).contains("status"));
        assert!(reason(&with("revision", "99999999999"), &chunks).contains("out of range"));
        assert!(reason(&with("head_sha256", "abc"), &chunks).contains("hex digits"));
        let mut missing = fields.clone();
        missing.remove("identity");
        let corrupt = decode_stream("cam-1", &missing, &chunks)
            .unwrap()
            .unwrap_err();
        assert_eq!(corrupt.path.as_deref(), Some("a/cam.mp4"));
        assert!(corrupt.reason.contains("identity"), "{corrupt}");

        let chunk = |json: &str| BTreeMap::from([("0".to_string(), json.to_string())]);
        assert!(reason(&fields, &chunk("{\"index\":")).contains("not a chunk record"));
        let mut far = stream().chunks[&0].clone();
        far.index = u64::MAX;
        let far = BTreeMap::from([(u64::MAX.to_string(), serde_json::to_string(&far).unwrap())]);
        assert!(reason(&fields, &far).contains("beyond"));
        let mut shifted = stream().chunks[&0].clone();
        shifted.offset = 1;
        assert!(
            reason(&fields, &chunk(&serde_json::to_string(&shifted).unwrap()))
                .contains("starts at 1")
        );
        let mut empty = stream().chunks[&0].clone();
        empty.size_bytes = 0;
        assert!(
            reason(&fields, &chunk(&serde_json::to_string(&empty).unwrap())).contains("0 bytes")
        );
    }

    proptest::proptest! {
        #[test]
        fn decoding_arbitrary_fields_never_panics(
            fields in proptest::collection::btree_map("[a-z_]{1,20}", ".{0,24}", 0..16),
            chunks in proptest::collection::btree_map("[0-9]{1,20}", ".{0,64}", 0..4),
        ) {
            let _ = decode_stream("cam-1", &fields, &chunks);
        }

        #[test]
        fn decoded_records_hold_offsets_that_cannot_overflow(
            chunk_size in proptest::prelude::any::<u64>(),
            index in proptest::prelude::any::<u64>(),
            offset in proptest::prelude::any::<u64>(),
            size in proptest::prelude::any::<u64>(),
            value in proptest::prelude::any::<i128>(),
        ) {
            let mut record = stream();
            record.chunk_size = chunk_size;
            record.completed_mtime_ns = value;
            let chunk = ChunkRecord { index, offset, size_bytes: size, ..stream().chunks[&0].clone() };
            record.chunks = BTreeMap::from([(index, chunk)]);
            let (fields, chunks) = encode(&record);
            if let Some(Ok(decoded)) = decode_stream("cam-1", &fields, &chunks) {
                proptest::prop_assert!((1..=MAX_CHUNK_SIZE).contains(&decoded.chunk_size));
                for (index, chunk) in &decoded.chunks {
                    let end = index.checked_mul(decoded.chunk_size)
                        .and_then(|start| start.checked_add(chunk.size_bytes));
                    proptest::prop_assert!(end.is_some());
                }
            }
        }
    }
}
