//! End-to-end scenarios against a real redis-server and a real s3s-fs, driving
//! the real `chunkstream` binary. Every scenario ends with the byte-exact
//! check: the chunk objects, concatenated in index order, equal the source.

mod support;

use std::process::Command;
use std::time::Duration;

use chunkstream::metadata::StreamStatus;
use chunkstream::store::ObjectStore;
use support::{MIB, TestEnv, append, pseudo_random, require_tool, wait_for};

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

/// Encodes `seconds` of noisy test video in real time (`-re`), so the file
/// grows like a camera recording and ffmpeg patches the header at the end.
fn record_in_real_time(
    ffmpeg: &std::path::Path,
    output: &std::path::Path,
    seconds: u32,
) -> std::process::Child {
    Command::new(ffmpeg)
        .args(["-hide_banner", "-loglevel", "error", "-y", "-re"])
        .args(["-f", "lavfi", "-i", "testsrc=size=640x360:rate=25"])
        .args(["-vf", "noise=alls=60:allf=t"])
        .args(["-t", &seconds.to_string()])
        .args([
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
            "-g",
            "25",
            "-b:v",
            "12M",
        ])
        .args(["-maxrate", "12M", "-bufsize", "4M", "-pix_fmt", "yuv420p"])
        .arg(output)
        .spawn()
        .expect("ffmpeg starts")
}

fn ffprobe_duration(path: &std::path::Path) -> f64 {
    let output = Command::new("ffprobe")
        .args(["-v", "error", "-show_entries", "format=duration"])
        .args(["-of", "default=noprint_wrappers=1:nokey=1"])
        .arg(path)
        .output()
        .expect("ffprobe runs");
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .expect("ffprobe prints a duration")
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
    let mut recorder = record_in_real_time(&ffmpeg, &path, 10);
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
    let expected = ffprobe_duration(&path);
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
    let mut second = None;
    wait_for("revision 2", || {
        second = env
            .metadata_for("reopen.mp4")
            .filter(|meta| meta.revision == 2 && meta.status == StreamStatus::Complete);
        second.is_some()
    });
    let second = second.unwrap();
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
    assert_eq!(ready, serde_json::json!({"redis": "ok", "s3": "ok"}));

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
    assert_eq!(lines.len(), 2, "one stream line and a summary:\n{text}");
    assert!(
        lines[0].starts_with('[') && lines[0].contains("cams/live.mp4"),
        "{text}"
    );
    assert!(lines[0].contains("83.3%"), "{text}");
    assert!(lines[1].contains("1 active"), "{text}");

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
    // and services, and the bundled MinIO's credentials.
    let wiring = [
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
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{} is missing; scripts/test.sh builds it",
        binary.display()
    );
    eprintln!("skipping: no release build (cargo build --release --locked)");
    None
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
