//! Life after upload, end to end against a real redis-server and s3s-fs:
//! the compact Redis record of a complete stream, records of gone files
//! expiring after `RECORD_RETENTION`, and `ON_COMPLETE=delete|move` with
//! its safety rules (a disposal is announced once in `EVENTS_STREAM`), and
//! `DELETE_CHUNKS_AFTER_ASSEMBLY`. Every scenario ends with the byte-exact
//! check against a reference copy of what was written (the source itself
//! may be gone).

mod support;

use std::path::{Path, PathBuf};

use chunkstream::metadata::{StreamMetadata, StreamStatus};
use support::{
    Daemon, EVENTS_STREAM, MIB, TestEnv, append, pseudo_random, stream_entries, wait_for,
};

/// Keeps a copy of `bytes` outside the watch directory, for the final
/// byte-exact check once the source is deleted or moved.
fn reference(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// Waits for complete metadata of `rel` at `size` bytes.
fn wait_complete_sized(env: &TestEnv, rel: &str, size: u64) -> StreamMetadata {
    let mut found = None;
    wait_for(
        &format!("complete metadata for {rel} at {size} bytes"),
        || {
            found = env.all_metadata().into_iter().find(|meta| {
                meta.source.path == rel
                    && meta.status == StreamStatus::Complete
                    && meta.total_size_bytes == size
            });
            found.is_some()
        },
    );
    found.unwrap()
}

fn redis_keys(env: &TestEnv) -> Vec<String> {
    let mut connection = env.redis.connection();
    let mut keys: Vec<String> = redis::cmd("KEYS")
        .arg("cstest:*")
        .query(&mut connection)
        .unwrap();
    keys.sort();
    keys
}

fn redis_query<T: redis::FromRedisValue>(env: &TestEnv, command: &[&str]) -> T {
    let mut connection = env.redis.connection();
    let mut cmd = redis::cmd(command[0]);
    for arg in &command[1..] {
        cmd.arg(*arg);
    }
    cmd.query(&mut connection).unwrap()
}

#[test]
fn l1_a_complete_stream_keeps_a_compact_record_and_gone_files_expire() {
    let Some(env) = TestEnv::start() else { return };
    let daemon = env.start_daemon(&[("RECORD_RETENTION", "3s")]);
    let kept = env.drop_file("kept.mp4", &pseudo_random(12 * MIB + 5, 1));
    let gone = env.drop_file("gone.mp4", &pseudo_random(6 * MIB, 2));
    let kept_meta = env.wait_complete("kept.mp4");
    let gone_meta = env.wait_complete("gone.mp4");
    env.assert_byte_exact(&kept_meta, &kept);
    env.assert_byte_exact(&gone_meta, &gone);

    let record = format!("cstest:stream:{}", kept_meta.stream_id);
    wait_for("the chunk records dropped at completion", || {
        !redis_keys(&env).contains(&format!("{record}:chunks"))
    });
    let head: String = redis_query(&env, &["HGET", &record, "head"]);
    assert_eq!(
        head,
        kept_meta.chunks[0].sha256[..32],
        "first chunk's fingerprint"
    );
    let bytes: u64 = redis_query(&env, &["MEMORY", "USAGE", &record]);
    assert!(bytes <= 512, "compact record: {bytes} bytes");
    let encoding: String = redis_query(&env, &["OBJECT", "ENCODING", &record]);
    assert_eq!(encoding, "listpack");

    // The gone file's record expires after RECORD_RETENTION; the kept
    // one stays as long as its file is there.
    std::fs::remove_file(&gone).unwrap();
    let gone_record = format!("cstest:stream:{}", gone_meta.stream_id);
    wait_for("the gone file's record set to expire", || {
        redis_query::<i64>(&env, &["PTTL", &gone_record]) > 0
    });
    wait_for("the gone file's record expired", || {
        !redis_keys(&env).contains(&gone_record)
    });
    assert_eq!(redis_query::<i64>(&env, &["PTTL", &record]), -1, "kept");
    let keys = redis_keys(&env);
    assert!(
        keys.iter().all(|key| !key.contains(&gone_meta.stream_id)),
        "{keys:?}"
    );

    // A restart recognises the unchanged complete file from its compact
    // record and uploads nothing again.
    let uploaded = daemon.metric("chunkstream_chunks_uploaded_total");
    assert_eq!(uploaded, 5.0);
    let (status, log) = daemon.terminate();
    assert!(status.success(), "{log}");
    let daemon = env.start_daemon(&[("RECORD_RETENTION", "3s")]);
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert_eq!(daemon.metric("chunkstream_chunks_uploaded_total"), 0.0);
    assert_eq!(daemon.metric("chunkstream_streams_discovered_total"), 0.0);
    // It grows: the earlier chunk records come back from metadata.json, so
    // only the changed tail and the new bytes are uploaded.
    append(&kept, &pseudo_random(MIB, 3));
    let second = env.wait_revision("kept.mp4", 2);
    assert_eq!(second.stream_id, kept_meta.stream_id);
    env.assert_byte_exact(&second, &kept);
    assert_eq!(
        daemon.metric("chunkstream_chunks_uploaded_total"),
        1.0,
        "only the tail chunk (index 2)"
    );
}

/// Waits for metadata of `rel` at `revision` whose chunk objects were
/// deleted after assembly.
fn wait_chunks_deleted(env: &TestEnv, rel: &str, revision: u32) -> StreamMetadata {
    let mut found = None;
    wait_for(
        &format!("{rel} revision {revision} with its chunks deleted"),
        || {
            found = env
                .all_metadata()
                .into_iter()
                .find(|m| m.source.path == rel && m.revision == revision && m.chunks_deleted);
            found.is_some()
        },
    );
    found.unwrap()
}

/// `chunkstream restore` of `meta`'s stream, byte-exact with `source`, and
/// `chunkstream verify --deep` clean.
fn assert_restores_and_verifies(env: &TestEnv, meta: &StreamMetadata, source: &Path) {
    let out_dir = tempfile::tempdir().unwrap();
    let restored = out_dir.path().join("restored.mp4");
    let output = env.command(&["restore", &meta.stream_id, restored.to_str().unwrap()]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        support::sha256_file(&restored),
        support::sha256_file(source)
    );
    let output = env.command(&["verify", &meta.stream_id, "--deep"]);
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn l5_chunks_deleted_after_assembly_restore_verify_grow_and_dispose() {
    let Some(env) = TestEnv::start() else { return };
    let settings = [
        ("ASSEMBLE", "true"),
        ("DELETE_CHUNKS_AFTER_ASSEMBLY", "true"),
    ];
    let daemon = env.start_daemon(&settings);
    let source = env.drop_file("assembled.mp4", &pseudo_random(12 * MIB + 5, 20));
    let first = wait_chunks_deleted(&env, "assembled.mp4", 1);
    let assembled = first.assembled.as_ref().expect("assembled");
    assert!(env.exists(&assembled.key));
    assert!(first.chunks.iter().all(|chunk| !env.exists(&chunk.key)));
    env.assert_byte_exact_from_assembled(&first, &source);
    assert_restores_and_verifies(&env, &first, &source);

    // A late append: the earlier chunk objects are gone, so the new
    // revision uploads every chunk again, assembles, and deletes them.
    append(&source, &pseudo_random(MIB, 21));
    let second = wait_chunks_deleted(&env, "assembled.mp4", 2);
    assert_eq!(second.stream_id, first.stream_id);
    env.assert_byte_exact_from_assembled(&second, &source);
    assert_restores_and_verifies(&env, &second, &source);
    let (status, log) = daemon.terminate();
    assert!(status.success(), "{log}");

    // ON_COMPLETE=delete verifies the assembled object in place of the
    // deleted chunks before it deletes the file.
    let references = tempfile::tempdir().unwrap();
    let deleting = env.start_daemon(&[settings[0], settings[1], ("ON_COMPLETE", "delete")]);
    let bytes = pseudo_random(6 * MIB + 3, 22);
    let expected = reference(references.path(), "disposed.mp4", &bytes);
    let disposed = env.drop_file("disposed.mp4", &bytes);
    let meta = wait_chunks_deleted(&env, "disposed.mp4", 1);
    wait_for("the file deleted after verification", || !disposed.exists());
    wait_for("the disposal counted", || {
        deleting.metric("chunkstream_files_disposed_total{action=\"deleted\"}") >= 1.0
    });
    env.assert_byte_exact_from_assembled(&meta, &expected);
    assert_restores_and_verifies(&env, &meta, &expected);
}

#[test]
fn l2_on_complete_delete_and_move_dispose_only_of_verified_files() {
    let Some(env) = TestEnv::start() else { return };
    let references = tempfile::tempdir().unwrap();
    let deleting = env.start_daemon(&[("ON_COMPLETE", "delete"), ("RECORD_RETENTION", "2s")]);
    let bytes = pseudo_random(11 * MIB, 10);
    let expected = reference(references.path(), "deleted.mp4", &bytes);
    let source = env.drop_file("cams/deleted.mp4", &bytes);
    let meta = wait_complete_sized(&env, "cams/deleted.mp4", bytes.len() as u64);
    wait_for("the deleted file gone from the input", || !source.exists());
    env.assert_byte_exact(&meta, &expected);
    // Counted as the coordinator applies the result, just after the unlink.
    wait_for("the disposal counted once", || {
        deleting.metric("chunkstream_files_disposed_total{action=\"deleted\"}") == 1.0
    });
    assert!(
        deleting
            .log()
            .contains("verified in S3; deleted cams/deleted.mp4")
    );
    wait_for("its Redis record expired", || {
        redis_keys(&env)
            .iter()
            .all(|key| !key.contains(&meta.stream_id))
    });
    let (status, log) = deleting.terminate();
    assert!(status.success(), "{log}");

    let completed = tempfile::tempdir().unwrap();
    let completed_dir = completed.path().display().to_string();
    let moving = env.start_daemon(&[
        ("ON_COMPLETE", "move"),
        ("COMPLETED_DIR", &completed_dir),
        ("EVENTS_STREAM", EVENTS_STREAM),
    ]);
    let bytes = pseudo_random(7 * MIB + 1, 11);
    let source = env.drop_file("cams/moved.mp4", &bytes);
    let meta = wait_complete_sized(&env, "cams/moved.mp4", bytes.len() as u64);
    let moved = completed.path().join("cams/moved.mp4");
    wait_for("the file moved to COMPLETED_DIR", || {
        !source.exists() && moved.exists()
    });
    env.assert_byte_exact(&meta, &moved);
    // Counted as the coordinator applies the result, just after the unlink.
    wait_for("the disposal counted once", || {
        moving.metric("chunkstream_files_disposed_total{action=\"moved\"}") == 1.0
    });
    // Announced once, with where the file is now and what was verified.
    let id = format!("{}/{}/file.moved", meta.stream_id, meta.revision);
    let mut announced = Vec::new();
    wait_for("the file.moved event in EVENTS_STREAM", || {
        announced = stream_entries(&env)
            .into_iter()
            .filter(|(_, kind, _)| kind == "file.moved")
            .collect();
        !announced.is_empty()
    });
    assert_eq!(announced.len(), 1, "{announced:?}");
    let (event_id, _, event) = &announced[0];
    assert_eq!(event_id, &id);
    assert_eq!(event["moved_to"], moved.display().to_string());
    assert_eq!(event["size_bytes"], bytes.len() as u64);
    assert_eq!(event["sha256"], meta.sha256.clone().expect("sha256"));
}

#[test]
fn l3_a_file_appended_during_the_delay_is_kept_and_its_new_bytes_uploaded() {
    let Some(env) = TestEnv::start() else { return };
    let references = tempfile::tempdir().unwrap();
    let daemon = env.start_daemon(&[("ON_COMPLETE", "delete"), ("ON_COMPLETE_DELAY", "4s")]);
    let first = pseudo_random(6 * MIB, 20);
    let source = env.drop_file("late.mp4", &first);
    wait_complete_sized(&env, "late.mp4", first.len() as u64);
    // Within ON_COMPLETE_DELAY: the recorder writes again.
    let more = pseudo_random(2 * MIB, 21);
    append(&source, &more);
    let expected = reference(
        references.path(),
        "late.mp4",
        &[first.as_slice(), more.as_slice()].concat(),
    );
    let mut second = None;
    wait_for("revision 2 with the appended bytes", || {
        assert!(
            source.exists() || second.is_some(),
            "deleted before its new bytes were uploaded"
        );
        second = env.metadata_for("late.mp4").filter(|meta| {
            meta.revision == 2
                && meta.status == StreamStatus::Complete
                && meta.total_size_bytes == 8 * MIB
        });
        second.is_some()
    });
    let second = second.unwrap();
    env.assert_byte_exact(&second, &expected);
    wait_for("deleted after the new revision's delay", || {
        !source.exists()
    });
    // Counted as the coordinator applies the result, just after the unlink.
    wait_for("the disposal counted once", || {
        daemon.metric("chunkstream_files_disposed_total{action=\"deleted\"}") == 1.0
    });
}

#[test]
fn l4_a_delete_that_fails_is_logged_counted_retried_and_never_blocks_uploads() {
    let Some(env) = TestEnv::start() else { return };
    let watch = env.watch.path();
    let locked = watch.join("locked");
    std::fs::create_dir_all(&locked).unwrap();
    set_mode(watch, 0o777);
    // The daemon runs as a non-root uid so that permissions apply: it may
    // read `locked/` but not delete from it.
    set_mode(&locked, 0o755);
    let user = support::running_as_root().then_some(10001);
    if user.is_none() {
        set_mode(&locked, 0o555);
    }
    let references = tempfile::tempdir().unwrap();
    let bytes = pseudo_random(6 * MIB, 30);
    let expected = reference(references.path(), "stuck.mp4", &bytes);
    let stuck = locked.join("stuck.mp4");
    std::fs::write(&stuck, &bytes).unwrap();
    set_mode(&stuck, 0o644);
    let mut daemon_env = env.daemon_env();
    daemon_env.insert("ON_COMPLETE".into(), "delete".into());
    let daemon = Daemon::start_binary(&support::chunkstream_binary(), daemon_env, watch, user);

    let meta = wait_complete_sized(&env, "locked/stuck.mp4", bytes.len() as u64);
    wait_for("a counted failure", || {
        daemon.metric("chunkstream_on_complete_failures_total{action=\"delete\"}") >= 1.0
    });
    let log = daemon.log();
    assert!(
        log.lines().any(|line| line.contains("cannot delete")
            && line.contains("locked/stuck.mp4")
            && line.contains("ermission denied")),
        "a clear log line with the path:\n{log}"
    );
    assert!(stuck.exists());
    // Uploads go on meanwhile: another file completes and is deleted.
    let other_bytes = pseudo_random(3 * MIB, 31);
    let other_expected = reference(references.path(), "other.mp4", &other_bytes);
    let other = env.drop_file("other.mp4", &other_bytes);
    let other_meta = wait_complete_sized(&env, "other.mp4", other_bytes.len() as u64);
    wait_for("the other file deleted", || !other.exists());
    env.assert_byte_exact(&other_meta, &other_expected);
    // Once the directory is writable, a later retry deletes the file.
    set_mode(&locked, 0o777);
    wait_for("the stuck file deleted on a retry", || !stuck.exists());
    env.assert_byte_exact(&meta, &expected);
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}
