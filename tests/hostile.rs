//! Hostile data read back from the servers: corrupt `metadata.json` makes
//! `restore` and `verify` exit 1 with a line naming the problem (never a
//! panic, exit 101), and a corrupt checkpoint record quarantines its stream
//! in the daemon instead of crashing it.

mod support;

use chunkstream::store::ObjectStore;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use support::TestEnv;

const STREAM: &str = "cam-0123456789ab";

fn put(env: &TestEnv, key: &str, body: &[u8]) {
    let digest: [u8; 32] = Sha256::digest(body).into();
    env.store
        .put(key, body, "application/octet-stream", &digest)
        .unwrap();
}

/// A valid two-chunk stream of 15 bytes in the bucket; returns its metadata.
fn valid_stream(env: &TestEnv) -> Value {
    let key = |index: u64| format!("{}{STREAM}/chunk-{index:06}", env.prefix);
    let (first, second) = (b"0123456789".as_slice(), b"abcde".as_slice());
    put(env, &key(0), first);
    put(env, &key(1), second);
    let chunk = |index: u64, offset: u64, body: &[u8]| {
        json!({
            "index": index, "key": key(index), "offset": offset,
            "size_bytes": body.len(), "sha256": hex::encode(Sha256::digest(body)),
            "uploaded_at": "2026-01-01T00:00:00.000Z",
        })
    };
    json!({
        "schema_version": 1, "stream_id": STREAM, "revision": 1, "status": "complete",
        "source": {"path": "cam.mp4", "file_name": "cam.mp4"},
        "total_size_bytes": 15,
        "sha256": hex::encode(Sha256::digest(b"0123456789abcde")),
        "chunk_size_bytes": 10,
        "chunks": [chunk(0, 0, first), chunk(1, 10, second)],
        "started_at": "2026-01-01T00:00:00.000Z", "completed_at": "2026-01-01T00:01:00.000Z",
        "stream_duration_seconds": 60.0, "media": {"duration_seconds": null},
    })
}

fn run(env: &TestEnv, args: &[&str]) -> (Option<i32>, String) {
    let output = env.command(args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.code(), text)
}

#[test]
fn corrupt_metadata_makes_restore_and_verify_exit_1() {
    let Some(env) = TestEnv::start() else { return };
    let metadata_key = format!("{}{STREAM}/metadata.json", env.prefix);
    let valid = valid_stream(&env);
    put(&env, &metadata_key, valid.to_string().as_bytes());
    let out = tempfile::tempdir().unwrap();
    let restored = out.path().join("valid.mp4");
    let (code, text) = run(&env, &["restore", STREAM, restored.to_str().unwrap()]);
    assert_eq!(code, Some(0), "the valid stream restores: {text}");
    assert_eq!(std::fs::read(&restored).unwrap(), b"0123456789abcde");
    let (code, text) = run(&env, &["verify", STREAM, "--deep"]);
    assert_eq!(code, Some(0), "{text}");

    let body = valid.to_string();
    let corrupt = |edit: &dyn Fn(&mut Value)| {
        let mut value = valid.clone();
        edit(&mut value);
        value.to_string()
    };
    let cases: Vec<(&str, String, &str)> = vec![
        ("truncated", body[..body.len() / 2].to_string(), "JSON"),
        (
            "wrong types",
            corrupt(&|v| v["chunk_size_bytes"] = json!("ten")),
            "JSON",
        ),
        (
            "chunk size 0",
            corrupt(&|v| v["chunk_size_bytes"] = json!(0)),
            "chunk size is 0",
        ),
        (
            "out-of-range index",
            corrupt(&|v| v["chunks"][1]["index"] = json!(u64::MAX)),
            "has index",
        ),
        (
            "huge sizes",
            corrupt(&|v| {
                v["chunk_size_bytes"] = json!(u64::MAX);
                v["chunks"][0]["size_bytes"] = json!(u64::MAX);
                v["chunks"][1]["offset"] = json!(u64::MAX);
                v["total_size_bytes"] = json!(u64::MAX);
            }),
            "beyond 2^64",
        ),
        (
            "huge count",
            corrupt(&|v| v["total_size_bytes"] = json!(u64::MAX)),
            "add up to",
        ),
    ];
    for (case, body, says) in cases {
        put(&env, &metadata_key, body.as_bytes());
        let target = out.path().join(format!("{}.mp4", case.replace(' ', "-")));
        let (code, text) = run(&env, &["restore", STREAM, target.to_str().unwrap()]);
        assert_eq!(code, Some(1), "restore, {case}: {text}");
        assert!(
            text.contains(&metadata_key) && text.contains(says),
            "restore, {case}: {text}"
        );
        assert!(!target.exists(), "restore, {case}: no output");
        for args in [&["verify", STREAM][..], &["verify", STREAM, "--deep"]] {
            let (code, text) = run(&env, args);
            assert_eq!(code, Some(1), "{args:?}, {case}: {text}");
            assert!(text.contains(says), "{args:?}, {case}: {text}");
        }
    }
}

#[test]
fn a_corrupt_checkpoint_record_quarantines_its_stream_and_the_daemon_goes_on() {
    let Some(env) = TestEnv::start() else { return };
    let daemon = env.start_daemon(&[]);
    env.drop_file("bad.mp4", &support::pseudo_random(7 * support::MIB, 1));
    let bad = env.wait_complete("bad.mp4");
    let (status, log) = daemon.terminate();
    assert!(status.success(), "{log}");

    // Chunk size 0 in the record (its short field name `cs`), and a chunk
    // record that is not JSON.
    let mut redis = env.redis.connection();
    let record = format!("cstest:stream:{}", bad.stream_id);
    let _: () = redis::cmd("HSET")
        .arg(&record)
        .arg("cs")
        .arg("0")
        .query(&mut redis)
        .unwrap();
    let _: () = redis::cmd("HSET")
        .arg(format!("{record}:chunks"))
        .arg("99")
        .arg("{\"index\":")
        .query(&mut redis)
        .unwrap();

    let daemon = env.start_daemon(&[]);
    let good_source = env.drop_file("good.mp4", &support::pseudo_random(7 * support::MIB, 2));
    let good = env.wait_complete("good.mp4");
    env.assert_byte_exact(&good, &good_source);
    let (code, body) = daemon.http("GET", "/streams");
    assert_eq!(code, 200, "{body}");
    let streams: Value = serde_json::from_str(&body).unwrap();
    let quarantined = streams["streams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|stream| stream["stream_id"] == bad.stream_id.as_str())
        .unwrap_or_else(|| panic!("the bad stream is listed: {body}"));
    assert_eq!(quarantined["state"], "quarantined", "{body}");
    assert_eq!(quarantined["path"], "bad.mp4", "{body}");
    assert!(
        quarantined["last_error"]
            .as_str()
            .unwrap()
            .contains("chunk size 0"),
        "{body}"
    );
    let (_, status_text) = run(&env, &["status", "--url", &daemon.url()]);
    assert!(status_text.contains("quarantined bad.mp4"), "{status_text}");
    assert_eq!(daemon.metric("chunkstream_streams_quarantined"), 1.0);
    // The bucket still holds the complete stream as it was.
    assert_eq!(env.metadata_for("bad.mp4").unwrap(), bad);
    let (status, log) = daemon.terminate();
    assert!(status.success(), "{log}");
    assert!(
        log.contains(&format!("stream {} is corrupt", bad.stream_id))
            || log.contains(&format!("stream {} is quarantined", bad.stream_id)),
        "{log}"
    );
    assert!(!log.contains("panicked"), "{log}");
}
