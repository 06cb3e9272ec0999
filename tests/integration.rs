//! End-to-end scenarios against a real redis-server and a real s3s-fs, driving
//! the real `chunkstream` binary. Every scenario ends with the byte-exact
//! check: the chunk objects, concatenated in index order, equal the source.

mod support;

use std::process::Command;
use std::time::Duration;

use chunkstream::metadata::StreamStatus;
use chunkstream::store::ObjectStore;
use support::{MIB, TestEnv, append, pseudo_random, require_tool, uploads_in_log, wait_for};

#[test]
fn a_files_dropped_whole_are_uploaded_byte_exact() {
    let Some(env) = TestEnv::start() else { return };
    let daemon = env.start_daemon(&[("CHUNK_SIZE", "10MiB")]);
    let files = [
        ("one-byte.mp4", 1),
        ("sub/exactly-ten.mp4", 10 * MIB),
        ("sub/deeper/twenty-five-plus-three.MP4", 25 * MIB + 3),
    ];
    for (seed, (rel, size)) in files.iter().enumerate() {
        env.drop_file(rel, &pseudo_random(*size, seed as u64));
    }
    for (rel, size) in files {
        let meta = env.wait_complete(rel);
        assert_eq!(meta.total_size_bytes, size);
        assert_eq!(meta.chunks.len() as u64, size.div_ceil(10 * MIB), "{rel}");
        assert_eq!(meta.chunk_size_bytes, 10 * MIB);
        assert_eq!(meta.revision, 1);
        assert_eq!(meta.source.file_name, rel.rsplit('/').next().unwrap());
        assert_eq!(meta.media.duration_seconds, None, "random bytes are no MP4");
        assert!(
            meta.stream_id
                .starts_with(meta.source.file_name.rsplit_once('.').unwrap().0)
        );
        env.assert_byte_exact(&meta, &env.file(rel));
    }
    assert_eq!(daemon.metric("chunkstream_chunks_uploaded_total"), 5.0);
    assert_eq!(
        daemon.metric("chunkstream_uploaded_bytes_total"),
        (35 * MIB + 4) as f64
    );
    assert_eq!(
        daemon.metric("chunkstream_streams_completed_total{status=\"complete\"}"),
        3.0
    );
    let (status, log) = daemon.terminate();
    assert!(status.success(), "SIGTERM exits 0: {status:?}\n{log}");
    assert!(
        !log.contains(support::SECRET_KEY),
        "secret leaked into logs"
    );
}

#[test]
fn b_a_file_growing_in_bursts_uploads_chunk_zero_while_it_grows() {
    let Some(env) = TestEnv::start() else { return };
    let daemon = env.start_daemon(&[("STREAM_TIMEOUT", "3s")]);
    let path = env.file("cams/growing.mp4");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut written = 0u64;
    let mut seed = 0;
    let mut burst = |written: &mut u64| {
        append(&path, &pseudo_random(2 * MIB, seed));
        seed += 1;
        *written += 2 * MIB;
        std::thread::sleep(Duration::from_millis(400));
    };
    // Grow in bursts, pausing less than STREAM_TIMEOUT, until chunk 0 shows up.
    let mut chunk_zero_seen_while_growing = false;
    for _ in 0..300 {
        burst(&mut written);
        let ids = env.registered_stream_ids();
        if let Some(id) = ids.first()
            && env.exists(&format!("{}{id}/chunk-000000", env.prefix))
        {
            chunk_zero_seen_while_growing = true;
            break;
        }
    }
    assert!(chunk_zero_seen_while_growing);
    // A few more bursts after that, then a partial tail, then quiet.
    for _ in 0..3 {
        burst(&mut written);
    }
    append(&path, &pseudo_random(12345, 99));
    let meta = env.wait_complete("cams/growing.mp4");
    assert_eq!(meta.total_size_bytes, written + 12345);
    assert!(meta.stream_duration_seconds > 0.0);
    env.assert_byte_exact(&meta, &path);
    assert_eq!(daemon.metric("chunkstream_chunks_reuploaded_total"), 0.0);
}

#[test]
fn c_an_mp4_recorded_in_real_time_is_byte_exact_after_the_header_patch() {
    let Some(ffmpeg) = require_tool("ffmpeg") else {
        return;
    };
    let Some(env) = TestEnv::start() else { return };
    let daemon = env.start_daemon(&[("STREAM_TIMEOUT", "3s")]);
    let path = env.file("live/recording.mp4");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut recorder = support::record_in_real_time(&ffmpeg, &path, 10, &[]);
    let mut chunk_zero_uploaded_while_recording = false;
    while recorder.try_wait().expect("ffmpeg status").is_none() {
        if !chunk_zero_uploaded_while_recording {
            chunk_zero_uploaded_while_recording = env
                .registered_stream_ids()
                .first()
                .is_some_and(|id| env.exists(&format!("{}{id}/chunk-000000", env.prefix)));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(recorder.wait().unwrap().success(), "ffmpeg failed");

    let meta = env.wait_complete("live/recording.mp4");
    env.assert_byte_exact(&meta, &path);
    let expected = support::ffprobe_duration(&path);
    let duration = meta.media.duration_seconds.expect("an MP4 duration");
    assert!(
        (duration - expected).abs() <= 0.1,
        "media duration {duration} vs ffprobe {expected}"
    );
    if chunk_zero_uploaded_while_recording {
        // ffmpeg rewrote the mdat size inside chunk 0 after it was uploaded.
        assert!(daemon.metric("chunkstream_chunks_reuploaded_total") >= 1.0);
    }
}

#[test]
fn d_kill_9_mid_stream_then_restart_uploads_only_what_was_not_checkpointed() {
    let Some(env) = TestEnv::start() else { return };
    let daemon = env.start_daemon(&[("STREAM_TIMEOUT", "60s")]);
    let path = env.file("crash.mp4");
    append(&path, &pseudo_random(12 * MIB, 1));
    wait_for("two chunks uploaded", || {
        daemon.metric("chunkstream_chunks_uploaded_total") >= 2.0
    });
    let first_log = daemon.kill_hard();
    assert!(first_log.contains("discovered crash.mp4"), "{first_log}");

    // The recording goes on while chunkstream is down.
    append(&path, &pseudo_random(8 * MIB + 777, 2));
    let ids = env.registered_stream_ids();
    assert_eq!(ids.len(), 1, "one stream registered");
    let checkpointed = env.checkpointed_chunks(&ids[0]);
    assert!(checkpointed >= 2);

    let daemon = env.start_daemon(&[("STREAM_TIMEOUT", "2s")]);
    let meta = env.wait_complete("crash.mp4");
    assert_eq!(meta.stream_id, ids[0], "the stream id survives the restart");
    env.assert_byte_exact(&meta, &path);
    let total_chunks = meta.chunks.len() as f64;
    assert_eq!(total_chunks, 5.0);
    assert_eq!(
        daemon.metric("chunkstream_chunks_uploaded_total"),
        total_chunks - checkpointed as f64,
        "only chunks without a checkpoint are uploaded again"
    );
    assert_eq!(daemon.metric("chunkstream_chunks_reuploaded_total"), 0.0);
    assert_eq!(daemon.metric("chunkstream_streams_discovered_total"), 0.0);
}

#[test]
fn e_a_restart_with_completed_files_uploads_nothing_again() {
    let Some(env) = TestEnv::start() else { return };
    let daemon = env.start_daemon(&[]);
    let rels = ["done-a.mp4", "nested/done-b.mp4"];
    for (seed, rel) in rels.iter().enumerate() {
        env.drop_file(rel, &pseudo_random(6 * MIB + seed as u64, seed as u64));
    }
    let before: Vec<_> = rels.iter().map(|rel| env.wait_complete(rel)).collect();
    let (status, _) = daemon.terminate();
    assert!(status.success());

    let daemon = env.start_daemon(&[]);
    // Several polls and more than STREAM_TIMEOUT: anything that would be
    // re-uploaded has had every chance to be.
    wait_for("the restarted daemon to track both files", || {
        daemon.metric("chunkstream_files_tracked") == 2.0
    });
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(daemon.metric("chunkstream_chunks_uploaded_total"), 0.0);
    assert_eq!(daemon.metric("chunkstream_streams_discovered_total"), 0.0);
    assert_eq!(daemon.metric("chunkstream_streams_active"), 0.0);
    for (rel, old) in rels.iter().zip(before) {
        let now = env.metadata_for(rel).expect("metadata");
        assert_eq!(now, old, "metadata of {rel} untouched");
        env.assert_byte_exact(&now, &env.file(rel));
    }
    let (status, log) = daemon.terminate();
    assert!(status.success(), "{log}");
}

#[test]
fn f_restore_round_trips_and_rejects_a_tampered_chunk() {
    let Some(env) = TestEnv::start() else { return };
    let daemon = env.start_daemon(&[]);
    let source = env.drop_file("restore-me.mp4", &pseudo_random(11 * MIB + 5, 7));
    let meta = env.wait_complete("restore-me.mp4");
    env.assert_byte_exact(&meta, &source);
    drop(daemon);

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
        support::sha256_file(&source)
    );

    // Same length, other bytes: only the checksums can tell.
    let victim = &meta.chunks[1];
    let mut bytes = env.store.get(&victim.key).unwrap();
    bytes[100] ^= 0xff;
    let digest: [u8; 32] = sha2::Digest::finalize(sha2::Digest::chain_update(
        <sha2::Sha256 as sha2::Digest>::new(),
        &bytes,
    ))
    .into();
    // The server checks x-amz-checksum-sha256: a body that does not match
    // the checksum chunkstream computed is refused, not stored.
    let refused = env
        .store
        .put(&victim.key, &bytes, "application/octet-stream", &[0u8; 32])
        .expect_err("a wrong checksum is rejected");
    assert!(refused.is_client_error(), "{refused}");
    env.store
        .put(&victim.key, &bytes, "application/octet-stream", &digest)
        .unwrap();
    let tampered = out_dir.path().join("tampered.mp4");
    let output = env.command(&["restore", &meta.stream_id, tampered.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "restore must fail on a tampered chunk"
    );
    assert!(stderr.contains("chunk 1"), "{stderr}");
    assert!(!tampered.exists(), "no output on failure");
    assert!(!out_dir.path().join("tampered.mp4.partial").exists());

    let output = env.command(&[
        "restore",
        "no-such-stream",
        out_dir.path().join("x").to_str().unwrap(),
    ]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("no-such-stream"));
}

#[test]
fn g_a_complete_file_that_grows_again_is_reopened_with_a_new_revision() {
    let Some(env) = TestEnv::start() else { return };
    let daemon = env.start_daemon(&[]);
    let path = env.drop_file("reopen.mp4", &pseudo_random(7 * MIB, 3));
    let first = env.wait_complete("reopen.mp4");
    assert_eq!(first.revision, 1);
    append(&path, &pseudo_random(6 * MIB, 4));
    let second = env.wait_revision("reopen.mp4", 2);
    assert_eq!(second.stream_id, first.stream_id);
    env.assert_byte_exact(&second, &path);
    // Chunks 0 and 1 (old tail, now full) and 2 (new tail): 2 + 2 in total.
    assert_eq!(daemon.metric("chunkstream_chunks_uploaded_total"), 4.0);
}

#[test]
fn h_a_deleted_and_a_truncated_file_are_closed_as_incomplete() {
    let Some(env) = TestEnv::start() else { return };
    let daemon = env.start_daemon(&[("STREAM_TIMEOUT", "3s")]);
    let deleted = env.file("deleted.mp4");
    let truncated = env.file("truncated.mp4");
    append(&deleted, &pseudo_random(6 * MIB, 5));
    append(&truncated, &pseudo_random(6 * MIB, 6));
    wait_for("chunk 0 of both", || {
        daemon.metric("chunkstream_chunks_uploaded_total") >= 2.0
    });
    std::fs::remove_file(&deleted).unwrap();
    let shorter = pseudo_random(1000, 8);
    std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&truncated)
        .unwrap();
    append(&truncated, &shorter);

    wait_for("incomplete metadata for both", || {
        env.all_metadata()
            .iter()
            .filter(|meta| meta.status == StreamStatus::Incomplete)
            .count()
            == 2
    });
    let all = env.all_metadata();
    let reason = |rel: &str| {
        all.iter()
            .find(|m| m.source.path == rel && m.status == StreamStatus::Incomplete)
            .and_then(|m| m.reason.clone())
    };
    assert_eq!(reason("deleted.mp4").as_deref(), Some("vanished"));
    assert_eq!(reason("truncated.mp4").as_deref(), Some("truncated"));
    // The new, shorter content is a new stream of its own.
    let fresh = env.wait_complete("truncated.mp4");
    env.assert_byte_exact(&fresh, &truncated);
    assert_eq!(
        daemon.metric("chunkstream_streams_completed_total{status=\"incomplete\"}"),
        2.0
    );
}

#[test]
fn config_errors_exit_2_and_name_the_variable() {
    let cases = [
        ("CHUNK_SIZE", "1MiB"),
        ("POLL_INTERVAL", "fast"),
        ("WORKERS", "0"),
        ("S3_ENDPOINT", "not a url"),
        ("METRICS_ADDR", "nowhere"),
        ("WATCH_DIR", "/definitely/not/here"),
    ];
    let watch = tempfile::tempdir().unwrap();
    for (variable, value) in cases {
        let output = Command::new(env!("CARGO_BIN_EXE_chunkstream"))
            .env_clear()
            .env("WATCH_DIR", watch.path())
            .env(variable, value)
            .output()
            .expect("runs");
        assert_eq!(output.status.code(), Some(2), "{variable}={value}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(variable), "{variable}: {stderr}");
        assert!(stderr.contains(value), "{variable}: {stderr}");
    }
}

#[test]
fn help_and_version_work() {
    let help = Command::new(env!("CARGO_BIN_EXE_chunkstream"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(help.status.success());
    let text = String::from_utf8_lossy(&help.stdout);
    for variable in [
        "WATCH_DIR",
        "CHUNK_SIZE",
        "STREAM_TIMEOUT",
        "REDIS_URL",
        "S3_BUCKET",
    ] {
        assert!(text.contains(variable), "--help lists {variable}");
    }
    let version = Command::new(env!("CARGO_BIN_EXE_chunkstream"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&version.stdout).contains(env!("CARGO_PKG_VERSION")));
}

/// Pipes exposition text through `promtool check metrics`.
fn promtool_check_metrics(promtool: &std::path::Path, text: &str) {
    use std::io::Write;
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn i_metrics_health_readiness_streams_status_and_json_logs() {
    let Some(promtool) = require_tool("promtool") else {
        return;
    };
    let Some(mut env) = TestEnv::start() else {
        return;
    };
    let daemon = env.start_daemon(&[("LOG_FORMAT", "json"), ("STREAM_TIMEOUT", "3s")]);
    let url = daemon.url();

    assert!(
        env.command(&["healthcheck", "--url", &url])
            .status
            .success()
    );
    assert_eq!(daemon.http("GET", "/nope").0, 404);
    assert_eq!(daemon.http("POST", "/metrics").0, 405);
    wait_for("ready", || daemon.http("GET", "/readyz").0 == 200);
    let (_, ready) = daemon.http("GET", "/readyz");
    let ready: serde_json::Value = serde_json::from_str(&ready).unwrap();
    // s3s-fs verifies x-amz-checksum-sha256, so no Content-MD5 is needed.
    assert_eq!(
        ready,
        serde_json::json!({
            "redis": "ok",
            "s3": "ok",
            "watch_dir": "ok",
            "s3_integrity": {"checksum_verified": true, "content_md5": false},
            "s3_credentials_source": "environment"
        })
    );

    // A recording in progress: one full chunk up, the tail waiting.
    let path = env.file("cams/live.mp4");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    append(&path, &pseudo_random(6 * MIB, 11));
    let mut in_progress = None;
    wait_for("/streams to show the first chunk", || {
        let (status, body) = daemon.http("GET", "/streams");
        let snapshot: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        in_progress = snapshot["streams"]
            .as_array()
            .and_then(|streams| streams.first().cloned())
            .filter(|s| status == 200 && s["uploaded_bytes"] == 5 * MIB);
        in_progress.is_some()
    });
    let stream = in_progress.unwrap();
    assert_eq!(stream["path"], "cams/live.mp4");
    assert_eq!(stream["size_bytes"], 6 * MIB);
    assert_eq!(stream["chunks_uploaded"], 1);
    for field in [
        "stream_id",
        "state",
        "last_change_seconds_ago",
        "retries",
        "last_error",
    ] {
        assert!(stream.get(field).is_some(), "/streams lacks {field}");
    }
    promtool_check_metrics(&promtool, &daemon.try_metrics().unwrap());

    let status_json = env.command(&["status", "--json", "--url", &url]);
    assert!(status_json.status.success());
    let parsed: serde_json::Value = serde_json::from_slice(&status_json.stdout).unwrap();
    assert_eq!(parsed["streams"][0]["path"], "cams/live.mp4");
    let status_text = env.command(&["status", "--url", &url]);
    let text = String::from_utf8_lossy(&status_text.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines.len(),
        3,
        "one stream line, the S3 integrity row and a summary:\n{text}"
    );
    assert!(
        lines[0].starts_with('[') && lines[0].contains("cams/live.mp4"),
        "{text}"
    );
    assert!(lines[0].contains("83.3%"), "{text}");
    assert_eq!(
        lines[1],
        "s3 integrity: the server verifies x-amz-checksum-sha256; no Content-MD5"
    );
    assert!(lines[2].contains("1 active"), "{text}");

    let meta = env.wait_complete("cams/live.mp4");
    env.assert_byte_exact(&meta, &path);
    let text = daemon.try_metrics().unwrap();
    promtool_check_metrics(&promtool, &text);
    assert_eq!(
        daemon.metric("chunkstream_chunks_uploaded_total"),
        meta.chunks.len() as f64
    );
    assert_eq!(
        daemon.metric("chunkstream_uploaded_bytes_total"),
        (6 * MIB) as f64
    );
    assert_eq!(daemon.metric("chunkstream_streams_discovered_total"), 1.0);
    assert_eq!(
        daemon.metric("chunkstream_streams_completed_total{status=\"complete\"}"),
        1.0
    );
    assert_eq!(
        daemon.metric("chunkstream_stream_completion_lag_seconds_count"),
        1.0
    );
    assert_eq!(daemon.metric("chunkstream_pending_bytes"), 0.0);
    assert_eq!(daemon.metric("chunkstream_poll_interval_seconds"), 0.1);
    assert!(text.contains("process_resident_memory_bytes"));

    // S3 goes away: not ready, storage down; back again: ready.
    env.s3.stop();
    wait_for("/readyz to report S3", || {
        daemon.http("GET", "/readyz").0 == 503
    });
    let (_, body) = daemon.http("GET", "/readyz");
    let report: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        report["s3"].as_str().unwrap().starts_with("error: "),
        "{body}"
    );
    assert_eq!(report["redis"], "ok");
    assert!(!body.contains(support::SECRET_KEY));
    assert_eq!(daemon.metric("chunkstream_storage_up"), 0.0);
    assert_eq!(
        daemon.http("GET", "/healthz").0,
        200,
        "alive while S3 is down"
    );
    env.s3.restart();
    wait_for("ready again", || daemon.http("GET", "/readyz").0 == 200);
    assert_eq!(daemon.metric("chunkstream_storage_up"), 1.0);

    let (status, log) = daemon.terminate();
    assert!(status.success());
    let mut with_stream_id = 0;
    for line in log.lines() {
        let value: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|err| panic!("not JSON ({err}): {line}"));
        assert!(value["ts"].is_string() && value["level"].is_string() && value["msg"].is_string());
        with_stream_id += usize::from(value.get("stream_id").is_some());
    }
    assert!(
        with_stream_id >= 3,
        "lifecycle lines carry stream_id:\n{log}"
    );
    assert!(!log.contains(support::SECRET_KEY));

    let dead = format!("http://127.0.0.1:{}", support::free_port());
    let output = env.command(&["healthcheck", "--url", &dead]);
    assert_eq!(output.status.code(), Some(1));
    let output = env.command(&["status", "--url", &dead]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("no chunkstream listening at"));
}

#[test]
fn alert_rules_pass_promtool_check_and_unit_tests() {
    let Some(promtool) = require_tool("promtool") else {
        return;
    };
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus");
    for args in [
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts_test.yml"],
    ] {
        let output = Command::new(&promtool)
            .args(args)
            .current_dir(&dir)
            .output()
            .expect("promtool runs");
        assert!(
            output.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

// ---- The Compose configuration ---------------------------------------------

fn repo_file(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(name)
}

/// `docker-compose.yml`'s `services.app.environment`, values as written.
fn compose_app_environment() -> std::collections::BTreeMap<String, String> {
    let text = std::fs::read_to_string(repo_file("docker-compose.yml")).unwrap();
    let compose: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).unwrap();
    let environment = compose["services"]["app"]["environment"]
        .as_mapping()
        .expect("app.environment is a mapping");
    environment
        .iter()
        .map(|(key, value)| {
            let value = match value {
                serde_yaml_ng::Value::String(text) => text.clone(),
                serde_yaml_ng::Value::Null => String::new(),
                other => serde_yaml_ng::to_string(other).unwrap().trim().to_string(),
            };
            (key.as_str().unwrap().to_string(), value)
        })
        .collect()
}

/// What Compose substitutes when no variable is set: `${VAR:-default}` →
/// `default`, `${VAR}` → empty.
fn with_compose_defaults(value: &str) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find('}').expect("closed ${") + start;
        let inner = &rest[start + 2..end];
        if let Some((_, default)) = inner.split_once(":-") {
            out.push_str(default);
        }
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

fn names_in_help() -> std::collections::BTreeSet<String> {
    let output = Command::new(env!("CARGO_BIN_EXE_chunkstream"))
        .arg("--help")
        .output()
        .unwrap();
    let text = String::from_utf8(output.stdout).unwrap();
    text.split("[env: ")
        .skip(1)
        .map(|rest| rest.split(['=', ']']).next().unwrap().trim().to_string())
        .collect()
}

fn names_in_sample_env() -> std::collections::BTreeSet<String> {
    std::fs::read_to_string(repo_file("sample.env"))
        .unwrap()
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| line.split('=').next().unwrap().to_string())
        .collect()
}

/// The names in the first column of the main table of docs/configuration.md.
fn names_in_configuration_doc() -> std::collections::BTreeSet<String> {
    let text = std::fs::read_to_string(repo_file("docs/configuration.md")).unwrap();
    let main_table = text.split("## Compose-only").next().unwrap();
    main_table
        .lines()
        .filter_map(|line| line.strip_prefix("| `"))
        .map(|rest| rest.split('`').next().unwrap().to_string())
        .collect()
}

#[test]
fn the_four_lists_of_settings_are_identical() {
    let help = names_in_help();
    assert!(help.len() >= 20, "--help lists env names: {help:?}");
    let compose: std::collections::BTreeSet<String> =
        compose_app_environment().into_keys().collect();
    assert_eq!(names_in_sample_env(), help, "sample.env vs --help");
    assert_eq!(
        compose, help,
        "docker-compose.yml app.environment vs --help"
    );
    assert_eq!(
        names_in_configuration_doc(),
        help,
        "docs/configuration.md vs --help"
    );
}

#[test]
fn compose_defaults_match_the_binary_defaults_except_container_wiring() {
    let sample: std::collections::BTreeMap<String, String> =
        std::fs::read_to_string(repo_file("sample.env"))
            .unwrap()
            .lines()
            .filter(|line| !line.trim().is_empty() && !line.starts_with('#'))
            .map(|line| {
                let (key, value) = line.split_once('=').unwrap();
                (key.to_string(), value.to_string())
            })
            .collect();
    // Values that differ on purpose: where the container finds its inputs
    // and services, the bundled MinIO's credentials, and assembly (on for
    // the bundled setup).
    let wiring = [
        "ASSEMBLE",
        "WATCH_DIR",
        "S3_ENDPOINT",
        "REDIS_URL",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
    ];
    for (key, value) in compose_app_environment() {
        if !wiring.contains(&key.as_str()) {
            assert_eq!(with_compose_defaults(&value), sample[&key], "{key}");
        }
    }
}

/// The release build the container would ship, built by scripts/test.sh.
fn release_binary() -> Option<std::path::PathBuf> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| repo_file("target"));
    let binary = target.join("release/chunkstream");
    if binary.is_file() {
        return Some(binary);
    }
    if support::may_skip_without("the release build") {
        return None;
    }
    panic!(
        "{} is missing: build it with cargo build --release --locked (scripts/test.sh does), or set CHUNKSTREAM_SKIP_SERVER_TESTS=1 to skip this test",
        binary.display()
    );
}

#[test]
fn container_equivalent_smoke_test_with_the_compose_environment() {
    use std::os::unix::fs::PermissionsExt;
    let Some(binary) = release_binary() else {
        return;
    };
    let compose = compose_app_environment();
    let mut env_map: std::collections::BTreeMap<String, String> = compose
        .iter()
        .map(|(key, value)| (key.clone(), with_compose_defaults(value)))
        .collect();
    let Some(mut env) = TestEnv::start_with_keys(
        &env_map["AWS_ACCESS_KEY_ID"],
        &env_map["AWS_SECRET_ACCESS_KEY"],
    ) else {
        return;
    };

    // Map the Compose service names to this test's servers; nothing else changes.
    assert_eq!(env_map["S3_ENDPOINT"], "http://minio:9000");
    env_map.insert("S3_ENDPOINT".into(), env.s3.endpoint());
    assert!(env_map["REDIS_URL"].starts_with("redis://redis:6379/"));
    let redis_url =
        env_map["REDIS_URL"].replace("redis:6379", &format!("127.0.0.1:{}", env.redis.port));
    env_map.insert("REDIS_URL".into(), redis_url);
    assert_eq!(env_map["WATCH_DIR"], "/input-videos");
    let text = std::fs::read_to_string(repo_file("docker-compose.yml")).unwrap();
    assert!(text.contains("${INPUT_DIR:-./input-videos}:/input-videos:ro"));
    let input = tempfile::tempdir().unwrap();
    env_map.insert("WATCH_DIR".into(), input.path().display().to_string());
    assert_eq!(
        env_map["METRICS_ADDR"], "0.0.0.0:9102",
        "mapped to a free loopback port"
    );

    // What the test reads back uses the same bucket, prefix and keys.
    env.prefix = env_map["S3_PREFIX"].clone();
    env.store = chunkstream::store::S3Store::new(&chunkstream::config::S3Config {
        bucket: env_map["S3_BUCKET"].clone(),
        ..support::s3_config(
            &env.s3.endpoint(),
            &env.prefix,
            &env_map["AWS_ACCESS_KEY_ID"],
            &env_map["AWS_SECRET_ACCESS_KEY"],
        )
    })
    .unwrap();

    // A read-only input directory, as mounted with :ro.
    let source = input.path().join("camera-7.mp4");
    std::fs::write(&source, pseudo_random(12 * MIB + 1, 77)).unwrap();
    std::fs::set_permissions(&source, std::fs::Permissions::from_mode(0o444)).unwrap();
    std::fs::set_permissions(input.path(), std::fs::Permissions::from_mode(0o555)).unwrap();

    // The image runs as uid/gid 10001.
    let user = support::running_as_root().then_some(10001);
    let daemon =
        support::Daemon::start_binary(&binary, env_map.clone(), std::path::Path::new("/"), user);
    let meta = env.wait_complete_at(&source, "camera-7.mp4");
    env.assert_byte_exact(&meta, &source);
    assert_eq!(
        meta.chunk_size_bytes,
        10 * MIB,
        "the Compose default CHUNK_SIZE"
    );

    // The image's HEALTHCHECK command, with the same environment.
    let health = Command::new(&binary)
        .arg("healthcheck")
        .env_clear()
        .envs(&env_map)
        .arg("--url")
        .arg(daemon.url())
        .status()
        .unwrap();
    assert!(health.success());
    let (status, log) = daemon.terminate();
    assert!(status.success(), "{log}");
    assert!(
        !log.contains(&env_map["AWS_SECRET_ACCESS_KEY"]),
        "secret in logs"
    );
}

// ---- Resilience ------------------------------------------------------------

#[test]
fn r1_an_s3_outage_mid_stream_is_ridden_out_without_operator_action() {
    let Some(mut env) = TestEnv::start() else {
        return;
    };
    let daemon = env.start_daemon(&[("STREAM_TIMEOUT", "3s")]);
    let path = env.file("outage.mp4");
    append(&path, &pseudo_random(6 * MIB, 21));
    wait_for("chunk 0", || {
        daemon.metric("chunkstream_chunks_uploaded_total") >= 1.0
    });

    env.s3.stop();
    append(&path, &pseudo_random(9 * MIB, 22));
    wait_for("/readyz to report the outage", || {
        daemon.http("GET", "/readyz").0 == 503
    });
    wait_for("several failed attempts, counted by kind", || {
        daemon.metric_sum("chunkstream_upload_errors_total") >= 3.0
    });
    assert!(daemon.metric("chunkstream_upload_errors_total{kind=\"connect\"}") >= 1.0);
    // Several backoff periods (RETRY_MAX_DELAY is 1 s here) pass with S3 down.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(daemon.metric("chunkstream_storage_up"), 0.0);

    env.s3.restart();
    append(&path, &pseudo_random(4321, 23));
    let meta = env.wait_complete("outage.mp4");
    env.assert_byte_exact(&meta, &path);
    wait_for("ready again", || daemon.http("GET", "/readyz").0 == 200);
}

#[test]
fn r2_a_hung_s3_times_out_and_uploads_continue_after_sigcont() {
    let Some(env) = TestEnv::start() else { return };
    let daemon = env.start_daemon(&[("S3_REQUEST_TIMEOUT", "2s"), ("STREAM_TIMEOUT", "3s")]);
    let path = env.file("hung.mp4");
    append(&path, &pseudo_random(6 * MIB, 31));
    wait_for("chunk 0", || {
        daemon.metric("chunkstream_chunks_uploaded_total") >= 1.0
    });

    env.s3.signal("STOP");
    append(&path, &pseudo_random(9 * MIB, 32));
    wait_for("a request timeout", || {
        daemon.metric("chunkstream_upload_errors_total{kind=\"timeout\"}") >= 1.0
    });
    env.s3.signal("CONT");

    let meta = env.wait_complete("hung.mp4");
    env.assert_byte_exact(&meta, &path);
}

#[test]
fn r3_redis_restarts_with_and_without_its_data_lose_nothing() {
    let Some(mut env) = TestEnv::start() else {
        return;
    };
    let daemon = env.start_daemon(&[("STREAM_TIMEOUT", "3s")]);
    let path = env.file("redis-bounce.mp4");
    append(&path, &pseudo_random(6 * MIB, 41));
    wait_for("chunk 0", || {
        daemon.metric("chunkstream_chunks_uploaded_total") >= 1.0
    });

    // With persistence: the checkpoints are still there.
    env.redis.crash_and_restart(true);
    append(&path, &pseudo_random(5 * MIB, 42));
    wait_for("chunk 1", || {
        daemon.metric("chunkstream_chunks_uploaded_total") >= 2.0
    });
    let ids = env.registered_stream_ids();
    assert_eq!(ids.len(), 1);
    wait_for("both checkpoints", || env.checkpointed_chunks(&ids[0]) == 2);

    // Without: every key is gone; chunkstream writes back what it knows.
    env.redis.crash_and_restart(false);
    append(&path, &pseudo_random(5 * MIB + 1234, 43));
    let meta = env.wait_complete("redis-bounce.mp4");
    assert_eq!(meta.stream_id, ids[0]);
    env.assert_byte_exact(&meta, &path);
    // Written back while active, then compacted by the completion: the
    // record says complete and its chunk records live in metadata.json.
    wait_for("the lost records written back", || {
        env.registered_stream_ids() == ids
            && redis_field(&env, &ids[0], "status").as_deref() == Some("complete")
            && env.checkpointed_chunks(&ids[0]) == 0
    });
    let (status, log) = daemon.terminate();
    assert!(status.success());
    assert!(log.contains("lost 1 stream records"), "{log}");

    // So a restart of chunkstream finds the stream complete: nothing again.
    let daemon = env.start_daemon(&[]);
    wait_for("the stream resumed as complete", || {
        daemon.metric("chunkstream_files_tracked") == 1.0
    });
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(daemon.metric("chunkstream_chunks_uploaded_total"), 0.0);
    assert_eq!(daemon.metric("chunkstream_streams_active"), 0.0);
}

#[test]
fn r4_kill_9_at_ten_random_moments_loses_nothing_and_repeats_no_checkpointed_chunk() {
    let Some(env) = TestEnv::start() else { return };
    let settings = [("STREAM_TIMEOUT", "4s"), ("LOG_FORMAT", "json")];
    let rels = ["k/one.mp4", "k/two.mp4", "three.mp4"];
    std::fs::create_dir_all(env.file("k")).unwrap();
    let paths: Vec<_> = rels.iter().map(|rel| env.file(rel)).collect();

    // Three recordings grow in the background, in 1 MiB bursts.
    let writer_paths = paths.clone();
    let writer = std::thread::spawn(move || {
        for round in 0..24u64 {
            for (n, path) in writer_paths.iter().enumerate() {
                append(path, &pseudo_random(MIB, round * 10 + n as u64));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        for (n, path) in writer_paths.iter().enumerate() {
            append(path, &pseudo_random(1000 + n as u64, 999));
        }
    });

    let mut rng = 0x5eed_u64;
    let mut next_pause = || {
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        Duration::from_millis(200 + (rng >> 33) % 1300)
    };
    let mut uploads_seen = 0;
    for kill in 0..10 {
        let checkpointed_before = env.checkpointed_indices();
        let daemon = env.start_daemon(&settings);
        std::thread::sleep(next_pause());
        let log = daemon.kill_hard();
        let uploads = uploads_in_log(&log);
        uploads_seen += uploads.len();
        for upload in uploads {
            assert!(
                !checkpointed_before.contains(&upload),
                "run {kill} uploaded checkpointed chunk {upload:?} again"
            );
        }
    }
    writer.join().unwrap();

    let checkpointed_before = env.checkpointed_indices();
    let daemon = env.start_daemon(&settings);
    let ids_before = env.registered_stream_ids();
    assert_eq!(ids_before.len(), 3, "stream ids survive every crash");
    for (rel, path) in rels.iter().zip(&paths) {
        let meta = env.wait_complete(rel);
        assert!(ids_before.contains(&meta.stream_id));
        env.assert_byte_exact(&meta, path);
    }
    let (status, log) = daemon.terminate();
    assert!(status.success());
    let uploads = uploads_in_log(&log);
    uploads_seen += uploads.len();
    for upload in uploads {
        assert!(
            !checkpointed_before.contains(&upload),
            "final run repeated {upload:?}"
        );
    }
    assert!(
        uploads_seen >= 15,
        "the logs show the uploads ({uploads_seen})"
    );
}

#[test]
fn r5_sigterm_mid_chunk_drains_and_exits_0_then_a_restart_completes() {
    let Some(env) = TestEnv::start() else { return };
    let daemon = env.start_daemon(&[("STREAM_TIMEOUT", "3s"), ("SHUTDOWN_TIMEOUT", "20s")]);
    let path = env.drop_file("big.mp4", &pseudo_random(40 * MIB + 9, 51));
    wait_for("the first chunk", || {
        daemon.metric("chunkstream_chunks_uploaded_total") >= 1.0
    });
    let (status, log) = daemon.terminate();
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(log.contains("shutdown requested"), "{log}");
    assert!(log.contains("drained:"), "{log}");

    let daemon = env.start_daemon(&[("STREAM_TIMEOUT", "3s")]);
    let meta = env.wait_complete("big.mp4");
    env.assert_byte_exact(&meta, &path);
    assert!(daemon.metric("chunkstream_chunks_uploaded_total") < meta.chunks.len() as f64);
}

#[test]
fn r6_a_drain_past_shutdown_timeout_exits_1_and_a_second_signal_exits_at_once() {
    let Some(env) = TestEnv::start() else { return };
    let settings = [
        ("S3_REQUEST_TIMEOUT", "60s"),
        ("SHUTDOWN_TIMEOUT", "2s"),
        ("STREAM_TIMEOUT", "3s"),
    ];
    let daemon = env.start_daemon(&settings);
    wait_for("ready", || daemon.http("GET", "/readyz").0 == 200);
    // S3 hangs with a chunk PUT in flight.
    env.s3.signal("STOP");
    let path = env.drop_file("stuck.mp4", &pseudo_random(7 * MIB, 61));
    wait_for("a job in flight", || {
        daemon.metric("chunkstream_inflight_jobs") >= 1.0
    });
    let (status, log) = daemon.terminate();
    assert_eq!(status.code(), Some(1), "{log}");
    let ids = env.registered_stream_ids();
    assert!(
        log.contains("SHUTDOWN_TIMEOUT") && log.contains(&ids[0]),
        "{log}"
    );

    // Still hung: this one blocks in its start-up bucket check. The first
    // SIGTERM asks for a drain; the second ends it at once.
    let mut daemon = env.start_daemon(&[("SHUTDOWN_TIMEOUT", "60s")]);
    daemon.process.signal("TERM");
    std::thread::sleep(Duration::from_millis(300));
    daemon.process.signal("TERM");
    assert_eq!(daemon.process.wait_exit().code(), Some(130));

    env.s3.signal("CONT");
    let _daemon = env.start_daemon(&[("STREAM_TIMEOUT", "3s")]);
    let meta = env.wait_complete("stuck.mp4");
    env.assert_byte_exact(&meta, &path);
}

#[test]
fn r7_secrets_never_appear_in_output() {
    let redis_password = "RedisPassw0rd-Zx81q";
    let wrong_secret = "WrongS3Secret-Qk47v";
    let Some(redis) = support::RedisServer::start_with_args(&["--requirepass", redis_password])
    else {
        return;
    };
    let Some(env) = TestEnv::start() else { return };

    // Wrong S3 secret: the bucket check fails and is retried.
    let daemon = env.start_daemon(&[("AWS_SECRET_ACCESS_KEY", wrong_secret)]);
    wait_for("two failed bucket checks", || {
        daemon.log().matches("checking bucket failed").count() >= 2
    });
    let (_, readyz) = daemon.http("GET", "/readyz");
    let log = daemon.kill_hard();
    assert!(
        log.contains(support::BUCKET) && log.contains(&env.s3.endpoint()),
        "{log}"
    );
    assert!(
        !log.contains(wrong_secret) && !readyz.contains(wrong_secret),
        "{log}"
    );

    // Wrong Redis password: loading checkpoints fails and is retried.
    let url = format!("redis://:{redis_password}-wrong@127.0.0.1:{}/0", redis.port);
    let daemon = env.start_daemon(&[("REDIS_URL", &url)]);
    wait_for("two failed checkpoint loads", || {
        daemon.log().matches("loading checkpoints failed").count() >= 2
    });
    let (_, readyz) = daemon.http("GET", "/readyz");
    let log = daemon.kill_hard();
    assert!(
        log.contains(":***@127.0.0.1"),
        "the URL is shown redacted: {log}"
    );
    assert!(
        !log.contains(redis_password) && !readyz.contains(redis_password),
        "{log}"
    );

    // And a config error mentioning the URL does not show it either.
    let output = env.command(&[
        "--redis-url",
        &format!("redis://:{redis_password}@[bad"),
        "run",
    ]);
    assert_eq!(output.status.code(), Some(2));
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(!all.contains(redis_password), "{all}");
    let help = env.command(&["--help"]);
    assert!(!String::from_utf8_lossy(&help.stdout).contains(support::SECRET_KEY));
}

fn set_mode(path: &std::path::Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Lines of the log that mention `needle`.
fn mentions(log: &str, needle: &str) -> usize {
    log.lines().filter(|line| line.contains(needle)).count()
}

#[test]
fn r8_bad_input_is_handled_row_by_row_and_the_other_streams_go_on() {
    let Some(ffmpeg) = require_tool("ffmpeg") else {
        return;
    };
    let Some(env) = TestEnv::start() else { return };
    let watch = env.watch.path();
    // Run as a non-root uid so that file permissions apply.
    set_mode(watch, 0o755);
    let user = support::running_as_root().then_some(10001);
    let mut daemon_env = env.daemon_env();
    daemon_env.insert("STREAM_TIMEOUT".into(), "3s".into());

    // Rows that are ignored.
    std::fs::create_dir_all(watch.join("dir.mp4")).unwrap();
    std::fs::write(watch.join(".hidden.mp4"), b"hidden").unwrap();
    std::fs::write(watch.join("rec.mp4.tmp"), b"temp").unwrap();
    std::os::unix::fs::symlink(watch.join("nowhere"), watch.join("broken.mp4")).unwrap();
    std::fs::create_dir_all(watch.join("loop")).unwrap();
    std::os::unix::fs::symlink(watch, watch.join("loop/again")).unwrap();
    // Rows that must be uploaded byte-exact.
    std::fs::write(watch.join("empty.mp4"), b"").unwrap();
    std::fs::write(watch.join("not-video.mp4"), pseudo_random(MIB, 81)).unwrap();
    let status = Command::new(&ffmpeg)
        .args(["-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi"])
        .args([
            "-i",
            "testsrc=size=320x240:rate=25:duration=2",
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
        ])
        .arg(env.staging.path().join("full.mp4"))
        .status()
        .unwrap();
    assert!(status.success());
    let video = std::fs::read(env.staging.path().join("full.mp4")).unwrap();
    std::fs::write(watch.join("truncated.mp4"), &video[..video.len() / 2]).unwrap();
    let long_name = format!("{}.mp4", "very-long-name ".repeat(16));
    let odd_names = ["name with spaces ünïcödé.mp4", long_name.as_str()];
    for (n, name) in odd_names.iter().enumerate() {
        std::fs::write(watch.join(name), pseudo_random(1000 + n as u64, 82)).unwrap();
    }
    for dir in ["a", "b"] {
        std::fs::create_dir_all(watch.join(dir)).unwrap();
        std::fs::write(watch.join(dir).join("same.mp4"), pseudo_random(2000, 83)).unwrap();
    }
    let future = watch.join("future.mp4");
    std::fs::write(&future, pseudo_random(3000, 84)).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&future)
        .unwrap()
        .set_modified(std::time::SystemTime::now() + Duration::from_secs(50 * 365 * 86400))
        .unwrap();
    let unreadable = watch.join("unreadable.mp4");
    std::fs::write(&unreadable, pseudo_random(4000, 85)).unwrap();
    set_mode(&unreadable, 0o000);
    std::fs::write(watch.join("rec.mp4.part"), pseudo_random(5000, 86)).unwrap();

    let daemon = support::Daemon::start_binary(
        std::path::Path::new(env!("CARGO_BIN_EXE_chunkstream")),
        daemon_env,
        watch,
        user,
    );
    let uploaded = [
        "not-video.mp4",
        "truncated.mp4",
        "a/same.mp4",
        "b/same.mp4",
        "future.mp4",
        odd_names[0],
        odd_names[1],
    ];
    for rel in uploaded {
        let meta = env.wait_complete(rel);
        env.assert_byte_exact(&meta, &env.file(rel));
        assert_eq!(
            meta.media.duration_seconds, None,
            "{rel} is no readable MP4"
        );
        assert_eq!(meta.source.file_name, rel.rsplit('/').next().unwrap());
        let chunk_key = &meta.chunks[0].key;
        assert!(
            chunk_key.len() <= 1024 && chunk_key.is_ascii(),
            "{chunk_key}"
        );
    }
    let same: Vec<String> = ["a/same.mp4", "b/same.mp4"]
        .iter()
        .map(|rel| env.metadata_for(rel).unwrap().stream_id)
        .collect();
    assert_ne!(same[0], same[1], "same name, two streams");
    let log = daemon.log();
    assert_eq!(
        mentions(&log, "not-video.mp4 is not a readable MP4"),
        1,
        "{log}"
    );

    // The unreadable file: warned once with its path, counted, retried.
    wait_for("read failures to be counted", || {
        daemon.metric("chunkstream_source_errors_total") >= 3.0
    });
    assert_eq!(
        mentions(&daemon.log(), "unreadable.mp4 failed"),
        1,
        "{}",
        daemon.log()
    );
    set_mode(&unreadable, 0o644);
    let meta = env.wait_complete("unreadable.mp4");
    env.assert_byte_exact(&meta, &unreadable);

    // The zero-byte file is tracked but never completed, until it has bytes.
    assert!(env.metadata_for("empty.mp4").is_none());
    append(&watch.join("empty.mp4"), &pseudo_random(6000, 87));
    let meta = env.wait_complete("empty.mp4");
    env.assert_byte_exact(&meta, &watch.join("empty.mp4"));

    // A .part renamed to its final name is picked up.
    std::fs::rename(watch.join("rec.mp4.part"), watch.join("rec.mp4")).unwrap();
    let meta = env.wait_complete("rec.mp4");
    env.assert_byte_exact(&meta, &watch.join("rec.mp4"));

    // Ignored rows never became streams; symlinks were warned about once.
    for ignored in ["dir.mp4", ".hidden.mp4", "rec.mp4.tmp", "broken.mp4"] {
        assert!(env.metadata_for(ignored).is_none(), "{ignored}");
    }
    let log = daemon.log();
    assert_eq!(mentions(&log, "broken.mp4"), 1, "{log}");
    assert!(mentions(&log, "loop") <= 1, "{log}");
    assert_eq!(
        daemon.metric("chunkstream_streams_completed_total{status=\"incomplete\"}"),
        0.0
    );
}

#[test]
fn r9_renames_within_the_tree_and_a_vanishing_watch_dir() {
    let Some(env) = TestEnv::start() else { return };
    let daemon = env.start_daemon(&[("STREAM_TIMEOUT", "3s")]);
    let watch = env.watch.path();
    // Renamed inside the tree while growing: one stream, final path recorded.
    let moving = watch.join("moving.mp4");
    append(&moving, &pseudo_random(6 * MIB, 91));
    wait_for("chunk 0", || {
        daemon.metric("chunkstream_chunks_uploaded_total") >= 1.0
    });
    std::fs::create_dir_all(watch.join("done")).unwrap();
    std::fs::rename(&moving, watch.join("done/moved.mp4")).unwrap();
    append(&watch.join("done/moved.mp4"), &pseudo_random(MIB, 92));
    let meta = env.wait_complete("done/moved.mp4");
    env.assert_byte_exact(&meta, &watch.join("done/moved.mp4"));
    assert_eq!(daemon.metric("chunkstream_streams_discovered_total"), 1.0);

    // Renamed away and back within the grace period: the stream continues.
    let back = watch.join("back.mp4");
    append(&back, &pseudo_random(2 * MIB, 93));
    wait_for("back.mp4 discovered", || {
        daemon.metric("chunkstream_streams_discovered_total") == 2.0
    });
    std::fs::rename(&back, watch.join("back.mov")).unwrap();
    std::thread::sleep(Duration::from_millis(800));
    std::fs::rename(watch.join("back.mov"), &back).unwrap();
    let meta = env.wait_complete("back.mp4");
    env.assert_byte_exact(&meta, &back);
    assert_eq!(daemon.metric("chunkstream_streams_discovered_total"), 2.0);

    // The whole watch directory goes away (an unmount) for longer than the
    // grace period: nothing is treated as deleted, and it resumes after.
    let recording = watch.join("while-away.mp4");
    let uploaded = daemon.metric("chunkstream_chunks_uploaded_total");
    append(&recording, &pseudo_random(6 * MIB, 94));
    wait_for("its chunk 0", || {
        daemon.metric("chunkstream_chunks_uploaded_total") > uploaded
    });
    let away = env.staging.path().join("away");
    std::fs::rename(watch, &away).unwrap();
    std::thread::sleep(Duration::from_secs(5));
    std::fs::rename(&away, watch).unwrap();
    append(&recording, &pseudo_random(MIB, 95));
    let meta = env.wait_complete("while-away.mp4");
    env.assert_byte_exact(&meta, &recording);
    assert_eq!(
        daemon.metric("chunkstream_streams_completed_total{status=\"incomplete\"}"),
        0.0
    );
    assert_eq!(
        mentions(&daemon.log(), "is not readable"),
        1,
        "{}",
        daemon.log()
    );

    // Renamed to an extension we do not watch: closed as vanished.
    let gone = watch.join("gone.mp4");
    let uploaded = daemon.metric("chunkstream_chunks_uploaded_total");
    append(&gone, &pseudo_random(6 * MIB, 96));
    wait_for("its chunk 0", || {
        daemon.metric("chunkstream_chunks_uploaded_total") > uploaded
    });
    std::fs::rename(&gone, watch.join("gone.mov")).unwrap();
    wait_for("gone.mp4 closed as vanished", || {
        env.all_metadata()
            .iter()
            .any(|m| m.source.path == "gone.mp4" && m.reason.as_deref() == Some("vanished"))
    });
}

// ---- Server-side assembly, list and verify --------------------------------

fn redis_field(env: &TestEnv, stream_id: &str, field: &str) -> Option<String> {
    let mut connection = env.redis.connection();
    redis::cmd("HGET")
        .arg(format!("cstest:stream:{stream_id}"))
        .arg(field)
        .query(&mut connection)
        .unwrap()
}

#[test]
fn s1_assembly_of_three_chunks_one_chunk_and_a_reopened_stream() {
    let Some(env) = TestEnv::start() else { return };
    let _daemon = env.start_daemon(&[("ASSEMBLE", "true")]);
    let three = env.drop_file("three chunks.mp4", &pseudo_random(12 * MIB + 7, 101));
    let one = env.drop_file("one.mp4", &pseudo_random(1234, 102));
    for (rel, path, chunks) in [("three chunks.mp4", &three, 3), ("one.mp4", &one, 1)] {
        let meta = env.wait_assembled(rel, 1);
        env.assert_byte_exact(&meta, path);
        assert_eq!(meta.chunks.len(), chunks);
        let assembled = meta.assembled.clone().unwrap();
        assert_eq!(
            assembled.key,
            format!("{}{}/{rel}", env.prefix, meta.stream_id)
        );
        assert_eq!(assembled.size_bytes, meta.total_size_bytes);
        assert_eq!(
            env.object_sha256(&assembled.key, assembled.size_bytes),
            support::sha256_file(path)
        );
        assert_eq!(
            redis_field(&env, &meta.stream_id, "assembly"),
            None,
            "no upload left open"
        );
    }

    // The file grows after completion: revision 2 is assembled again.
    append(&one, &pseudo_random(6 * MIB, 103));
    let meta = env.wait_assembled("one.mp4", 2);
    env.assert_byte_exact(&meta, &one);
    let assembled = meta.assembled.unwrap();
    assert_eq!(assembled.size_bytes, 6 * MIB + 1234);
    assert_eq!(
        env.object_sha256(&assembled.key, assembled.size_bytes),
        support::sha256_file(&one)
    );

    // restore --from-assembled reads the single object, still verified.
    let out = tempfile::tempdir().unwrap();
    let target = out.path().join("one.mp4");
    let output = env.command(&[
        "restore",
        "--from-assembled",
        &meta.stream_id,
        target.to_str().unwrap(),
    ]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(support::sha256_file(&target), support::sha256_file(&one));
}

#[test]
fn s2_kill_9_mid_assembly_resumes_and_leaves_no_upload_open() {
    let Some(env) = TestEnv::start() else { return };
    let daemon = env.start_daemon(&[("ASSEMBLE", "true")]);
    let path = env.drop_file("long.mp4", &pseudo_random(100 * MIB, 111));
    let meta = env.wait_complete("long.mp4");
    // Catch the assembly in progress, freeze S3 so it cannot move on, and
    // kill chunkstream there.
    let mut progress = None;
    wait_for("the assembly to start", || {
        progress = redis_field(&env, &meta.stream_id, "assembly");
        progress.is_some()
            || redis_field(&env, &meta.stream_id, "assembled_revision").as_deref() == Some("1")
    });
    env.s3.signal("STOP");
    daemon.kill_hard();
    env.s3.signal("CONT");
    let recorded: Option<chunkstream::store::AssemblyProgress> =
        redis_field(&env, &meta.stream_id, "assembly")
            .map(|json| serde_json::from_str(&json).unwrap());
    if let Some(recorded) = &recorded {
        assert!(recorded.parts.len() < 20, "killed mid-assembly");
    }

    let _daemon = env.start_daemon(&[("ASSEMBLE", "true")]);
    let meta = env.wait_assembled("long.mp4", 1);
    env.assert_byte_exact(&meta, &path);
    let assembled = meta.assembled.unwrap();
    assert_eq!(
        env.object_sha256(&assembled.key, assembled.size_bytes),
        support::sha256_file(&path)
    );
    // s3s-fs cannot list multipart uploads (501), so check chunkstream's own
    // record: nothing left in progress, revision 1 assembled.
    assert_eq!(redis_field(&env, &meta.stream_id, "assembly"), None);
    assert_eq!(
        redis_field(&env, &meta.stream_id, "assembled_revision").as_deref(),
        Some("1")
    );
}

#[test]
fn s3_verify_and_list_report_what_is_in_the_bucket() {
    let Some(env) = TestEnv::start() else { return };
    let daemon = env.start_daemon(&[("ASSEMBLE", "true")]);
    let good = env.drop_file("good.mp4", &pseudo_random(11 * MIB, 121));
    let broken = env.drop_file("broken.mp4", &pseudo_random(11 * MIB, 122));
    let good_meta = env.wait_assembled("good.mp4", 1);
    let broken_meta = env.wait_assembled("broken.mp4", 1);
    env.assert_byte_exact(&good_meta, &good);
    env.assert_byte_exact(&broken_meta, &broken);
    drop(daemon);

    let listed = env.command(&["list", "--json"]);
    assert!(listed.status.success());
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    let mut ids: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["stream_id"].as_str().unwrap())
        .collect();
    ids.sort();
    let mut expected = vec![good_meta.stream_id.as_str(), broken_meta.stream_id.as_str()];
    expected.sort();
    assert_eq!(ids, expected);
    for entry in listed.as_array().unwrap() {
        assert_eq!(entry["status"], "complete");
        assert_eq!(entry["chunks"], 3);
        assert_eq!(entry["size_bytes"], 11 * MIB);
        assert!(entry["assembled_key"].as_str().unwrap().ends_with(".mp4"));
    }
    let table = env.command(&["list"]);
    assert_eq!(
        String::from_utf8_lossy(&table.stdout).lines().count(),
        3,
        "header + 2 streams"
    );

    let verify = |args: &[&str]| {
        let output = env.command(args);
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).to_string(),
        )
    };
    let (ok, text) = verify(&["verify", "--all", "--deep"]);
    assert!(ok, "{text}");
    assert!(
        text.contains("verified 2 streams (deep): all good"),
        "{text}"
    );

    // Tamper with chunk 1 of one stream (same length), delete chunk 2 of it.
    let tampered = &broken_meta.chunks[1];
    let mut bytes = env.store.get(&tampered.key).unwrap();
    bytes[7] ^= 1;
    let digest: [u8; 32] = sha2::Digest::finalize(sha2::Digest::chain_update(
        <sha2::Sha256 as sha2::Digest>::new(),
        &bytes,
    ))
    .into();
    env.store
        .put(&tampered.key, &bytes, "application/octet-stream", &digest)
        .unwrap();
    let (ok, text) = verify(&["verify", &broken_meta.stream_id]);
    assert!(ok, "a shallow check sees sizes only: {text}");
    let (ok, text) = verify(&["verify", &broken_meta.stream_id, "--deep"]);
    assert!(!ok);
    assert!(
        text.contains("chunk 1") && text.contains("does not match"),
        "{text}"
    );
    let deleted = &broken_meta.chunks[2];
    std::fs::remove_file(
        env.s3
            .dir
            .path()
            .join("data")
            .join(support::BUCKET)
            .join(&deleted.key),
    )
    .unwrap();
    let (ok, text) = verify(&["verify", "--all"]);
    assert!(!ok);
    assert!(
        text.contains(&format!(
            "{}: chunk 2 ({}) is missing",
            broken_meta.stream_id, deleted.key
        )),
        "{text}"
    );
    assert!(
        !text.contains(&good_meta.stream_id),
        "the good stream has no problem: {text}"
    );
    let (ok, _) = verify(&["verify", &good_meta.stream_id, "--deep"]);
    assert!(ok);
}

#[test]
fn r10_a_new_inode_with_the_same_bytes_continues_its_stream_other_bytes_replace_it() {
    let Some(env) = TestEnv::start() else { return };
    let daemon = env.start_daemon(&[("STREAM_TIMEOUT", "8s")]);
    let cam = env.file("cam.mp4");
    let first = pseudo_random(6 * MIB, 101);
    append(&cam, &first);
    wait_for("chunk 0", || {
        daemon.metric("chunkstream_chunks_uploaded_total") >= 1.0
    });
    // The same recording under a new inode number (what a FUSE or SMB client
    // can do after an outage), grown meanwhile: the stream goes on.
    let mut grown = first.clone();
    grown.extend(pseudo_random(MIB, 102));
    env.drop_file("cam.mp4", &grown);
    let meta = env.wait_complete("cam.mp4");
    env.assert_byte_exact(&meta, &cam);
    assert_eq!(daemon.metric("chunkstream_streams_discovered_total"), 1.0);
    assert_eq!(
        mentions(&daemon.log(), "first chunk matches; continuing the stream"),
        1,
        "{}",
        daemon.log()
    );

    // Other bytes under a new inode at the same path: a replacement.
    let other = env.file("other.mp4");
    let uploaded = daemon.metric("chunkstream_chunks_uploaded_total");
    append(&other, &pseudo_random(6 * MIB, 103));
    wait_for("chunk 0 of other.mp4", || {
        daemon.metric("chunkstream_chunks_uploaded_total") > uploaded
    });
    env.drop_file("other.mp4", &pseudo_random(7 * MIB, 104));
    let meta = env.wait_complete("other.mp4");
    env.assert_byte_exact(&meta, &other);
    let replaced: Vec<_> = env
        .all_metadata()
        .into_iter()
        .filter(|m| m.source.path == "other.mp4" && m.status == StreamStatus::Incomplete)
        .collect();
    assert_eq!(replaced.len(), 1);
    assert_eq!(replaced[0].reason.as_deref(), Some("replaced"));
    assert_ne!(replaced[0].stream_id, meta.stream_id);
}
