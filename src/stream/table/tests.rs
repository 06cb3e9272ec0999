//! The stream table: scans in, changes out.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::*;
use crate::metadata::ChunkRecord;
use crate::scan::WATCH_DIR_DEVICE;
use crate::store::{StoredStatus, StoredStream};
use crate::stream::state::tests::rules;
use std::time::{Duration, SystemTime};

const CHUNK: u64 = 10;

fn file(path: &str, inode: u64, size: u64) -> Observation {
    Observation {
        rel_path: path.into(),
        abs_path: PathBuf::from("/w").join(path).into(),
        identity: FileIdentity {
            device: WATCH_DIR_DEVICE,
            inode,
        },
        size,
        mtime_ns: size as i128,
    }
}

fn scan(files: Vec<Observation>) -> Scan {
    Scan::clear(files)
}

/// `now` with a fixed wall time.
fn at(now: Instant) -> Now {
    Now {
        instant: now,
        wall: SystemTime::UNIX_EPOCH,
    }
}

/// Registers every discovered file, as the coordinator would.
fn settle(table: &mut StreamTable, changes: Vec<Change>, now: Instant) -> Vec<Change> {
    let mut rest = Vec::new();
    for change in changes {
        match change {
            Change::Discovered(observation) => {
                let id = format!("s{}", observation.identity.inode);
                table.insert(TrackedStream::new(id, &observation, CHUNK, at(now)));
            }
            other => rest.push(other),
        }
    }
    rest
}

/// A table that tracks `files` (all discovered and registered).
fn tracking(files: Vec<Observation>) -> (StreamTable, Instant) {
    let mut table = StreamTable::default();
    let now = Instant::now();
    let changes = table.apply_scan(&scan(files), at(now), &rules());
    settle(&mut table, changes, now);
    (table, now)
}

#[test]
fn same_name_in_two_directories_is_two_streams() {
    let mut table = StreamTable::default();
    let now = Instant::now();
    let changes = table.apply_scan(
        &scan(vec![file("a/cam.mp4", 1, 5), file("b/cam.mp4", 2, 5)]),
        at(now),
        &rules(),
    );
    assert_eq!(
        changes
            .iter()
            .filter(|c| matches!(c, Change::Discovered(_)))
            .count(),
        2
    );
}

#[test]
fn a_rename_keeps_the_stream_and_records_the_new_path() {
    let (mut table, now) = tracking(vec![file("cam.mp4.mp4", 1, 5)]);
    let changes = table.apply_scan(&scan(vec![file("done/cam.mp4", 1, 5)]), at(now), &rules());
    assert!(matches!(&changes[..], [Change::Moved { to, .. }] if to == "done/cam.mp4"));
    assert_eq!(table.len(), 1);
    assert_eq!(table.iter().next().unwrap().file_name, "cam.mp4");
}

#[test]
fn a_replaced_file_closes_the_old_stream_and_starts_a_new_one() {
    let (mut table, now) = tracking(vec![file("cam.mp4", 1, 5)]);
    let changes = table.apply_scan(&scan(vec![file("cam.mp4", 2, 3)]), at(now), &rules());
    // The coordinator compares contents first; here they differ.
    assert!(matches!(
        &changes[..],
        [Change::IdentityChanged { identity, seen }]
            if identity.inode == 1 && seen.identity.inode == 2
    ));
    let changes = table.apply(
        FileIdentity {
            device: WATCH_DIR_DEVICE,
            inode: 1,
        },
        Event::Replaced,
        at(now),
        &rules(),
    );
    assert!(matches!(&changes[..], [Change::Closed(s, CloseReason::Replaced)] if s.id == "s1"));
}

#[test]
fn a_file_with_a_new_inode_number_and_the_same_bytes_keeps_its_stream() {
    let (mut table, now) = tracking(vec![file("cam.mp4", 3, 25)]);
    let changes = table.apply_scan(&scan(vec![file("cam.mp4", 4, 30)]), at(now), &rules());
    let [Change::IdentityChanged { identity, seen }] = &changes[..] else {
        panic!("{changes:?}");
    };
    let moved = table.rekey(vec![(*identity, seen.clone())]);
    assert_eq!(moved.len(), 1);
    assert_eq!(moved[0].0, "s3");
    let later = now + Duration::from_secs(1);
    assert!(
        table
            .apply_scan(&scan(vec![file("cam.mp4", 4, 30)]), at(later), &rules())
            .is_empty()
    );
    let stream = table.iter().next().unwrap();
    assert_eq!((stream.id.as_str(), stream.state.size()), ("s3", 30));
}

#[test]
fn after_a_blind_spell_streams_are_matched_by_path_first() {
    // A remount handed the two files each other's inode numbers.
    let files = vec![file("a.mp4", 1, 25), file("b.mp4", 2, 25)];
    let (mut table, now) = tracking(files);
    let blind = Scan {
        blind: Some("ENOTCONN".into()),
        ..Scan::default()
    };
    assert!(table.apply_scan(&blind, at(now), &rules()).is_empty());
    assert!(table.blind().is_some());
    let swapped = vec![file("a.mp4", 2, 25), file("b.mp4", 1, 25)];
    let changes = table.apply_scan(&scan(swapped), at(now), &rules());
    assert!(table.blind().is_none());
    let moves: Vec<(FileIdentity, Observation)> = changes
        .into_iter()
        .map(|change| match change {
            Change::IdentityChanged { identity, seen } => (identity, seen),
            other => panic!("not a rename: {other:?}"),
        })
        .collect();
    assert_eq!(table.rekey(moves).len(), 2);
    let a = table.iter().find(|s| s.rel_path == "a.mp4").unwrap();
    assert_eq!((a.id.as_str(), a.identity.inode), ("s1", 2));
}

#[test]
fn an_unreadable_file_is_kept_however_long_it_lasts() {
    let (mut table, now) = tracking(vec![file("cam.mp4", 1, 5)]);
    let unreadable = Scan {
        unreadable: vec!["cam.mp4".into()],
        root_entries: 1,
        ..Scan::clear(vec![])
    };
    for minute in 1..=10 {
        let later = now + Duration::from_secs(60 * minute);
        assert!(
            table
                .apply_scan(&unreadable, at(later), &rules())
                .is_empty()
        );
        let stream = table.iter().next().unwrap();
        assert_eq!(stream.state.wanted(later, &rules()), None, "no completion");
        assert_eq!(stream.view(later).state, "unseen");
    }
}

#[test]
fn a_local_directory_where_a_mount_was_proves_nothing() {
    // cams/ was a mount (device 9) below the watch directory.
    let mut cam = file("cams/cam.mp4", 1, 5);
    cam.identity.device = 9;
    let (mut table, now) = tracking(vec![cam, file("top.mp4", 2, 5)]);
    // The mount dropped away: cams/ is an empty local directory.
    let mut dropped = scan(vec![file("top.mp4", 2, 5)]);
    dropped.listed.insert("cams".into(), WATCH_DIR_DEVICE);
    let later = now + Duration::from_secs(3600);
    assert!(table.apply_scan(&dropped, at(now), &rules()).is_empty());
    assert!(table.apply_scan(&dropped, at(later), &rules()).is_empty());
    let cam = table.iter().find(|s| s.rel_path == "cams/cam.mp4").unwrap();
    assert_eq!(cam.view(later).state, "unseen");
    // Listed on its own file system and absent: gone.
    let mut gone = scan(vec![file("top.mp4", 2, 5)]);
    gone.listed.insert("cams".into(), 9);
    let much_later = later + Duration::from_secs(1);
    assert!(table.apply_scan(&gone, at(much_later), &rules()).is_empty());
    let changes = table.apply_scan(&gone, at(much_later + Duration::from_secs(31)), &rules());
    assert!(matches!(
        &changes[..],
        [Change::Closed(_, CloseReason::Vanished)]
    ));
}

#[test]
fn an_empty_watch_dir_with_open_streams_is_blind() {
    let (mut table, now) = tracking(vec![file("cam.mp4", 1, 5)]);
    let later = now + Duration::from_secs(3600);
    assert!(
        table
            .apply_scan(&scan(vec![]), at(later), &rules())
            .is_empty()
    );
    assert!(table.blind().unwrap().contains("empty"));
    assert_eq!(table.len(), 1);
}

#[test]
fn a_truncated_file_closes_and_is_rediscovered() {
    let (mut table, now) = tracking(vec![file("cam.mp4", 1, 25)]);
    let changes = table.apply_scan(&scan(vec![file("cam.mp4", 1, 4)]), at(now), &rules());
    assert!(matches!(
        &changes[0],
        Change::Closed(_, CloseReason::Truncated)
    ));
    assert!(matches!(&changes[1], Change::Discovered(o) if o.size == 4));
}

#[test]
fn an_unreadable_watch_dir_changes_nothing() {
    let (mut table, now) = tracking(vec![file("cam.mp4", 1, 25)]);
    let unreadable = Scan {
        blind: Some("EIO".into()),
        ..Scan::default()
    };
    let later = now + Duration::from_secs(3600);
    assert!(
        table
            .apply_scan(&unreadable, at(later), &rules())
            .is_empty()
    );
    assert!(table.iter().next().unwrap().state.missing_since().is_none());
}

#[test]
fn a_deleted_file_is_closed_after_the_grace_period() {
    let (mut table, now) = tracking(vec![file("cam.mp4", 1, 25)]);
    // Something else is still in the directory: it is not a lost mount.
    let without = Scan {
        root_entries: 1,
        ..scan(vec![])
    };
    assert!(table.apply_scan(&without, at(now), &rules()).is_empty());
    let later = now + Duration::from_secs(31);
    let changes = table.apply_scan(&without, at(later), &rules());
    assert!(matches!(
        &changes[..],
        [Change::Closed(_, CloseReason::Vanished)]
    ));
    assert!(table.is_empty());
}

#[test]
fn resumed_streams_continue_after_their_last_full_chunk() {
    let chunk = |index: u64, size: u64| ChunkRecord {
        index,
        key: format!("k{index}"),
        offset: index * CHUNK,
        size_bytes: size,
        sha256: String::new(),
        uploaded_at: String::new(),
        xxh3: None,
        whole_sha256: None,
    };
    let stored = StoredStream {
        id: "cam-1".into(),
        identity: FileIdentity {
            device: 1,
            inode: 1,
        },
        rel_path: "cam.mp4".into(),
        file_name: "cam.mp4".into(),
        chunk_size: CHUNK,
        started_at: SystemTime::UNIX_EPOCH,
        last_change_at: SystemTime::UNIX_EPOCH,
        status: StoredStatus::Active,
        revision: 0,
        completed_size: 0,
        completed_mtime_ns: 0,
        assembled_revision: 0,
        chunks: BTreeMap::from([(0, chunk(0, CHUNK)), (1, chunk(1, CHUNK)), (2, chunk(2, 4))]),
        head: None,
    };
    let resumed =
        TrackedStream::from_stored(stored.clone(), Path::new("/w"), Instant::now(), &rules())
            .unwrap();
    assert_eq!(resumed.state.full_chunks_done(), 2);
    assert_eq!(resumed.state.size(), 24);
    assert_eq!(resumed.abs_path, PathBuf::from("/w/cam.mp4"));
    let closed = StoredStream {
        status: StoredStatus::Incomplete,
        ..stored
    };
    assert!(
        TrackedStream::from_stored(closed, Path::new("/w"), Instant::now(), &rules()).is_none()
    );
}
