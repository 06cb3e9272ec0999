//! Keys, ids, the metadata schema and its validating decoder (with property tests).

use super::*;

fn sample() -> StreamMetadata {
    let layout = KeyLayout::new("streams/");
    StreamMetadata {
        schema_version: SCHEMA_VERSION,
        stream_id: "cam1-0123456789ab".into(),
        revision: 1,
        status: StreamStatus::Complete,
        reason: None,
        source: Source {
            path: "sub/cam1.mp4".into(),
            file_name: "cam1.mp4".into(),
        },
        total_size_bytes: 15,
        sha256: Some(sha256_hex(b"x")),
        chunk_size_bytes: 10,
        chunks: vec![
            ChunkRecord {
                index: 0,
                key: layout.chunk("cam1-0123456789ab", 0),
                offset: 0,
                size_bytes: 10,
                sha256: sha256_hex(b"a"),
                uploaded_at: rfc3339(SystemTime::UNIX_EPOCH),
                xxh3: None,
                whole_sha256: None,
            },
            ChunkRecord {
                index: 1,
                key: layout.chunk("cam1-0123456789ab", 1),
                offset: 10,
                size_bytes: 5,
                sha256: sha256_hex(b"b"),
                uploaded_at: rfc3339(SystemTime::UNIX_EPOCH),
                xxh3: None,
                whole_sha256: None,
            },
        ],
        started_at: "2026-01-01T00:00:00.000Z".into(),
        completed_at: "2026-01-01T00:01:00.000Z".into(),
        stream_duration_seconds: 42.0,
        media: Media {
            duration_seconds: None,
        },
        assembled: None,
        chunks_deleted: false,
    }
}

#[test]
fn content_types_follow_the_extension() {
    assert_eq!(content_type_for("cam.MP4"), "video/mp4");
    assert_eq!(content_type_for("cam.mov"), "video/quicktime");
    assert_eq!(content_type_for("cam"), "application/octet-stream");
}

#[test]
fn metadata_round_trips_with_the_documented_field_names() {
    let meta = sample();
    let json = serde_json::to_value(&meta).unwrap();
    for field in [
        "schema_version",
        "stream_id",
        "revision",
        "status",
        "source",
        "total_size_bytes",
        "sha256",
        "chunk_size_bytes",
        "chunks",
        "started_at",
        "completed_at",
        "stream_duration_seconds",
        "media",
    ] {
        assert!(json.get(field).is_some(), "{field} missing");
    }
    assert_eq!(json["status"], "complete");
    assert_eq!(json["media"]["duration_seconds"], serde_json::Value::Null);
    assert_eq!(
        json["chunks"][1]["key"],
        "streams/cam1-0123456789ab/chunk-000001"
    );
    assert!(json.get("reason").is_none());
    let back: StreamMetadata = serde_json::from_value(json).unwrap();
    assert_eq!(back, meta);
    assert_eq!(back.check_chunk_layout(), Ok(()));
}

#[test]
fn layout_check_finds_gaps_and_size_mismatches() {
    let mut gap = sample();
    gap.chunks[1].offset = 11;
    assert!(
        gap.check_chunk_layout()
            .unwrap_err()
            .contains("starts at 11")
    );
    let mut short = sample();
    short.total_size_bytes = 16;
    assert!(short.check_chunk_layout().is_err());
}

#[test]
fn decode_refuses_a_zero_chunk_size_an_index_gap_and_overflowing_sizes() {
    let encode = |meta: &StreamMetadata| serde_json::to_vec(meta).unwrap();
    assert_eq!(StreamMetadata::decode(&encode(&sample())), Ok(sample()));
    let mut zero = sample();
    zero.chunk_size_bytes = 0;
    assert_eq!(
        StreamMetadata::decode(&encode(&zero)),
        Err(MetadataError::ZeroChunkSize)
    );
    let mut gap = sample();
    gap.chunks[1].index = 7;
    assert!(matches!(
        StreamMetadata::decode(&encode(&gap)),
        Err(MetadataError::Layout(_))
    ));
    let mut huge = sample();
    huge.chunk_size_bytes = u64::MAX;
    huge.chunks[0].size_bytes = u64::MAX;
    huge.chunks[1].offset = u64::MAX;
    huge.chunks[1].size_bytes = 2;
    assert!(matches!(
        StreamMetadata::decode(&encode(&huge)),
        Err(MetadataError::Layout(_))
    ));
    let body = encode(&sample());
    assert!(matches!(
        StreamMetadata::decode(&body[..body.len() / 2]),
        Err(MetadataError::Json(_))
    ));
    let wrong_type = String::from_utf8(body)
        .unwrap()
        .replace("\"chunk_size_bytes\":10", "\"chunk_size_bytes\":\"10\"");
    assert!(matches!(
        StreamMetadata::decode(wrong_type.as_bytes()),
        Err(MetadataError::Json(_))
    ));
}

proptest::proptest! {
    #[test]
    fn decoding_arbitrary_bytes_never_panics(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
        let _ = StreamMetadata::decode(&body);
    }

    #[test]
    fn decoded_metadata_is_always_usable(
        chunk_size in proptest::prelude::any::<u64>(),
        total in proptest::prelude::any::<u64>(),
        chunks in proptest::collection::vec(
            (proptest::prelude::any::<u64>(), proptest::prelude::any::<u64>(), proptest::prelude::any::<u64>()),
            0..6,
        ),
    ) {
        let mut meta = sample();
        meta.chunk_size_bytes = chunk_size;
        meta.total_size_bytes = total;
        meta.chunks = chunks
            .into_iter()
            .map(|(index, offset, size_bytes)| ChunkRecord {
                index: index % 8,
                offset,
                size_bytes,
                ..sample().chunks[0].clone()
            })
            .collect();
        if let Ok(decoded) = StreamMetadata::decode(&serde_json::to_vec(&meta).unwrap()) {
            // What readers rely on: ranges of a non-zero size, chunks in
            // index order, sizes that add up without overflow.
            proptest::prop_assert!(decoded.chunk_size_bytes > 0);
            let mut offset = 0u64;
            for (position, chunk) in decoded.chunks.iter().enumerate() {
                proptest::prop_assert_eq!(chunk.index, position as u64);
                proptest::prop_assert_eq!(chunk.offset, offset);
                offset = offset.checked_add(chunk.size_bytes).unwrap();
            }
            proptest::prop_assert_eq!(offset, decoded.total_size_bytes);
        }
    }
}

#[test]
fn stream_ids_are_key_safe_unique_and_keep_the_stem() {
    let a = new_stream_id("cam 1 ünïcode.mp4", b"a");
    assert!(a.starts_with("cam_1_"), "{a}");
    assert!(
        a.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    );
    assert_ne!(a, new_stream_id("cam 1 ünïcode.mp4", b"b"));
    let long = new_stream_id(&format!("{}.mp4", "x".repeat(2000)), b"c");
    assert!(long.len() <= MAX_STEM_BYTES + 13);
    assert!(new_stream_id(".mp4", b"d").starts_with("stream-"));
    assert!(new_stream_id("...", b"e").starts_with("stream-"));
}

#[test]
fn chunk_keys_sort_in_index_order() {
    let layout = KeyLayout::new("");
    assert_eq!(layout.chunk("s", 7), "s/chunk-000007");
    assert!(layout.chunk("s", 9) < layout.chunk("s", 10));
    assert_eq!(layout.metadata("s"), "s/metadata.json");
}

#[test]
fn a_chunk_record_from_before_the_fast_hash_still_decodes_and_metadata_lists_no_running_state() {
    let old = r#"{"index":0,"key":"k","offset":0,"size_bytes":3,"sha256":"ab","uploaded_at":"t"}"#;
    let record: ChunkRecord = serde_json::from_str(old).unwrap();
    assert_eq!(record.xxh3, None);
    assert_eq!(record.whole_sha256, None);
    let new = ChunkRecord {
        xxh3: Some("00".into()),
        whole_sha256: Some(crate::chunk_hash::RunningSha256 {
            state: "11".into(),
            lineage: "22".into(),
        }),
        ..record.clone()
    };
    let json = serde_json::to_string(&new).unwrap();
    assert!(json.contains(r#""whole_file_sha256_state":{"state":"11","lineage":"22"}"#));
    let stored: ChunkRecord = serde_json::from_str(&json).unwrap();
    assert_eq!(stored, new);
    let published = new.published();
    assert_eq!(published.xxh3.as_deref(), Some("00"));
    assert_eq!(published.whole_sha256, None);
    // A checkpoint written before the rename, with the field that named
    // the predecessor's state instead of a lineage: decodes, never trusted.
    let earlier = r#"{"index":0,"key":"k","offset":0,"size_bytes":3,"sha256":"ab","uploaded_at":"t","whole_sha256":{"state":"11","resumed_from":"22"}}"#;
    let earlier: ChunkRecord = serde_json::from_str(earlier).unwrap();
    assert_eq!(earlier.whole_sha256.unwrap().lineage, "");
}

#[test]
fn with_object_lock_changed_bytes_get_a_new_chunk_key() {
    let plain = KeyLayout::new("p/");
    let locked = KeyLayout::new("p/").with_immutable_objects(true);
    let first: [u8; 32] = [0xab; 32];
    let rewritten: [u8; 32] = [0x01; 32];
    assert_eq!(plain.chunk_holding("s", 0, &first), "p/s/chunk-000000");
    assert_eq!(plain.chunk_holding("s", 0, &rewritten), "p/s/chunk-000000");
    assert_eq!(
        locked.chunk_holding("s", 0, &first),
        "p/s/chunk-000000-abababababababab"
    );
    assert_ne!(
        locked.chunk_holding("s", 0, &first),
        locked.chunk_holding("s", 0, &rewritten)
    );
    assert_eq!(plain.assembled("s", "a.mp4", 2), "p/s/a.mp4");
    assert_eq!(locked.assembled("s", "a.mp4", 1), "p/s/a.mp4");
    assert_eq!(locked.assembled("s", "a.mp4", 2), "p/s/r2/a.mp4");
    // A listing still sorts by index.
    assert!(locked.chunk_holding("s", 1, &first) > locked.chunk_holding("s", 0, &rewritten));
}
