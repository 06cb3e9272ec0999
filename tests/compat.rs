//! The S3 compatibility suite: the same scenarios against three real S3
//! implementations, each started fresh per scenario on a loopback port.
//!
//! - s3s-fs 0.14.1: verifies SigV4 and `x-amz-checksum-sha256`; no
//!   ListMultipartUploads (501).
//! - Ceph RGW 16 (tests/testbeds/rgw): a production S3 that ignores
//!   `x-amz-checksum-sha256`, refuses a `us-east-1` location constraint,
//!   answers CompleteMultipartUpload with an empty ETag.
//! - moto server: AWS-strict bucket creation.
//!
//! Every scenario ends byte-exact. docs/compatibility.md reports what this
//! suite covers.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use chunkstream::metadata::StreamMetadata;
use chunkstream::store::{BucketAdmin, ObjectStore};
use support::proxy::CorruptingProxy;
use support::{
    ACCESS_KEY, BUCKET, MIB, S3Kind, SECRET_KEY, TestEnv, append, chunkstream_binary,
    pseudo_random, require_tool, sha256_file, wait_for,
};

fn start(kind: S3Kind) -> Option<TestEnv> {
    TestEnv::start_on(kind, ACCESS_KEY, SECRET_KEY)
}

/// Whether the start-up probe must find checksum verification on `kind`.
fn verifies_checksums(kind: S3Kind) -> bool {
    match kind {
        S3Kind::S3sFs => true,
        S3Kind::Rgw => false,
        S3Kind::Moto => MOTO_VERIFIES_CHECKSUMS,
    }
}

/// Found by the probe against moto 5.x.
const MOTO_VERIFIES_CHECKSUMS: bool = false;

/// `chunkstream run` with the test environment plus `overrides`, to its exit.
fn run_to_exit(env: &TestEnv, overrides: &[(&str, &str)]) -> Output {
    let mut vars: BTreeMap<String, String> = env.daemon_env();
    for (key, value) in overrides {
        vars.insert(key.to_string(), value.to_string());
    }
    support::run_to_exit(vars)
}

/// Every object under the prefix is either a stream's metadata or one of its
/// chunks, and every chunk holds exactly the bytes of its range of the source.
fn assert_every_object_matches_its_source(env: &TestEnv, sources: &BTreeMap<String, &Path>) {
    let metadata: Vec<StreamMetadata> = env.all_metadata();
    let mut expected: BTreeMap<String, (&Path, u64, u64)> = BTreeMap::new();
    for meta in &metadata {
        let source = sources[&meta.source.path];
        for chunk in &meta.chunks {
            expected.insert(chunk.key.clone(), (source, chunk.offset, chunk.size_bytes));
        }
    }
    for key in env.keys() {
        if key.ends_with("/metadata.json") {
            continue;
        }
        let (source, offset, size) = expected
            .get(&key)
            .unwrap_or_else(|| panic!("{key} is in the bucket but in no metadata"));
        let stored = env.store.get(&key).expect("chunk");
        let mut original = vec![0u8; *size as usize];
        std::os::unix::fs::FileExt::read_exact_at(
            &std::fs::File::open(source).unwrap(),
            &mut original,
            *offset,
        )
        .unwrap();
        assert!(stored == original, "{key} differs from its source range");
    }
}

fn readiness(daemon: &support::Daemon) -> serde_json::Value {
    let (_, body) = daemon.http("GET", "/readyz");
    serde_json::from_str(&body).expect("/readyz is JSON")
}

/// A fresh bucket is created with `S3_REGION=us-east-1` and a custom
/// endpoint; the checksum probe reports what the server does; files present
/// at start upload byte-exact; a kill -9 mid-stream resumes under the same id.
fn bucket_probe_pre_existing_files_and_a_restart(kind: S3Kind) {
    let Some(env) = start(kind) else { return };
    assert!(env.keys().is_empty(), "the bucket does not exist yet");
    let big = env.drop_file("big.mp4", &pseudo_random(12 * MIB + 5, 1));
    let small = env.drop_file("nested/small.mp4", &pseudo_random(300 * 1024, 2));
    let daemon = env.start_daemon(&[("S3_REGION", "us-east-1"), ("LEASE_TTL", "3s")]);
    for (rel, path) in [("big.mp4", &big), ("nested/small.mp4", &small)] {
        let meta = env.wait_complete(rel);
        env.assert_byte_exact(&meta, path);
    }
    let log = daemon.log();
    assert!(
        log.contains(&format!("created bucket \"{BUCKET}\"")),
        "{log}"
    );

    let verified = verifies_checksums(kind);
    let ready = readiness(&daemon);
    assert_eq!(
        ready["s3_integrity"]["checksum_verified"], verified,
        "{ready}"
    );
    assert_eq!(ready["s3_integrity"]["content_md5"], !verified, "{ready}");
    assert_eq!(
        daemon.metric("chunkstream_s3_checksum_verified"),
        f64::from(u8::from(verified))
    );
    assert_eq!(
        daemon.metric("chunkstream_s3_content_md5"),
        f64::from(u8::from(!verified))
    );
    let status = Command::new(chunkstream_binary())
        .args(["status", "--url", &daemon.url()])
        .output()
        .expect("status runs");
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(status.contains("s3 integrity:"), "{status}");
    assert!(
        !env.keys().iter().any(|key| key.contains(".chunkstream/")),
        "the probe's scratch object is deleted: {:?}",
        env.keys()
    );

    let growing = env.file("growing.mp4");
    append(&growing, &pseudo_random(7 * MIB, 3));
    let mut growing_id = None;
    wait_for("chunk 0 of growing.mp4 checkpointed", || {
        growing_id = env
            .registered_stream_ids()
            .into_iter()
            .find(|id| id.starts_with("growing-") && env.checkpointed_chunks(id) == 1);
        growing_id.is_some()
    });
    let first_log = daemon.kill_hard();
    append(&growing, &pseudo_random(6 * MIB + 11, 4));
    // A short lease: the crashed process's claim lapses quickly.
    let daemon = env.start_daemon(&[("LEASE_TTL", "3s")]);
    let meta = env.wait_complete("growing.mp4");
    assert_eq!(
        Some(&meta.stream_id),
        growing_id.as_ref(),
        "same stream after the restart\n{first_log}\n----\n{}",
        daemon.log()
    );
    env.assert_byte_exact(&meta, &growing);
    drop(daemon);
}

/// ffmpeg records in real time with `+faststart`, which rewrites the whole
/// file at the end: the bucket ends up with the final bytes.
fn live_recording_with_faststart(kind: S3Kind) {
    let Some(ffmpeg) = require_tool("ffmpeg") else {
        return;
    };
    let Some(env) = start(kind) else { return };
    let _daemon = env.start_daemon(&[("STREAM_TIMEOUT", "3s")]);
    let path = env.file("live/faststart.mp4");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut recorder =
        support::record_in_real_time(&ffmpeg, &path, 6, &["-movflags", "+faststart"]);
    assert!(recorder.wait().unwrap().success(), "ffmpeg failed");
    let meta = env.wait_complete("live/faststart.mp4");
    env.assert_byte_exact(&meta, &path);
    let expected = support::ffprobe_duration(&path);
    let duration = meta.media.duration_seconds.expect("an MP4 duration");
    assert!(
        (duration - expected).abs() <= 0.1,
        "{duration} vs {expected}"
    );
}

/// With a part ceiling of 2, a 4-chunk stream assembles in two levels; the
/// intermediates are removed and `restore` rebuilds the file both ways.
fn two_level_assembly_and_restore(kind: S3Kind) {
    let Some(env) = start(kind) else { return };
    let daemon = env.start_daemon(&[("ASSEMBLE", "true"), ("ASSEMBLY_MAX_PARTS", "2")]);
    let source = env.drop_file("long.mp4", &pseudo_random(15 * MIB + 3, 5));
    let meta = env.wait_assembled("long.mp4", 1);
    assert_eq!(meta.chunks.len(), 4);
    env.assert_byte_exact(&meta, &source);
    let assembled = meta.assembled.clone().expect("assembled");
    assert_eq!(assembled.size_bytes, meta.total_size_bytes);
    assert_eq!(
        env.object_sha256(&assembled.key, assembled.size_bytes),
        sha256_file(&source)
    );
    assert!(
        daemon
            .log()
            .contains("in two levels via 2 intermediate objects")
    );
    assert!(
        !env.keys().iter().any(|key| key.contains("/assembly-r")),
        "intermediate objects are deleted: {:?}",
        env.keys()
    );
    drop(daemon);

    let out = tempfile::tempdir().unwrap();
    for (name, extra) in [
        ("chunks.mp4", None),
        ("assembled.mp4", Some("--from-assembled")),
    ] {
        let target = out.path().join(name);
        let mut args = vec!["restore", meta.stream_id.as_str(), target.to_str().unwrap()];
        args.extend(extra);
        let output = env.command(&args);
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(sha256_file(&target), sha256_file(&source), "{name}");
    }
}

/// A proxy flips bits in request bodies on the way to the server: the
/// server refuses every corrupted body (checksum or Content-MD5), the
/// uploads are retried, and nothing in the bucket differs from its source.
fn a_corrupting_network_never_gets_a_bad_body_stored(kind: S3Kind) {
    let Some(env) = start(kind) else { return };
    let proxy = CorruptingProxy::start(env.s3.port, 7);
    let endpoint = proxy.endpoint();
    let daemon = env.start_daemon(&[
        ("S3_ENDPOINT", endpoint.as_str()),
        ("S3_REQUEST_TIMEOUT", "10s"),
        ("WORKERS", "3"),
    ]);
    let rels = ["one.mp4", "two.mp4", "deep/three.mp4"];
    let paths: Vec<_> = rels
        .iter()
        .enumerate()
        .map(|(seed, rel)| {
            env.drop_file(
                rel,
                &pseudo_random(11 * MIB + seed as u64, 10 + seed as u64),
            )
        })
        .collect();
    for (rel, path) in rels.iter().zip(&paths) {
        let meta = env.wait_complete(rel);
        env.assert_byte_exact(&meta, path);
    }
    assert!(proxy.flips() >= 1, "the proxy corrupted nothing");
    assert!(
        daemon.metric("chunkstream_upload_errors_total{kind=\"integrity\"}") >= 1.0,
        "no upload was refused as corrupted; flips: {}\n{}",
        proxy.flips(),
        daemon.log()
    );
    let sources: BTreeMap<String, &Path> = rels
        .iter()
        .map(|rel| rel.to_string())
        .zip(paths.iter().map(|path| path.as_path()))
        .collect();
    assert_every_object_matches_its_source(&env, &sources);
}

/// Abandoned multipart uploads under the prefix are aborted at start; the
/// one a live assembly records in Redis is kept. s3s-fs cannot list them:
/// that is said once.
fn abandoned_multipart_uploads_are_swept(kind: S3Kind) {
    let Some(env) = start(kind) else { return };
    let daemon = env.start_daemon(&[]);
    wait_for("the bucket", || readiness(&daemon)["s3"] == "ok");
    drop(daemon);
    let stale_key = format!("{}stale-stream/cam.mp4", env.prefix);
    let live_key = format!("{}live-stream/cam.mp4", env.prefix);
    let stale = env
        .store
        .initiate_multipart(&stale_key, "video/mp4")
        .unwrap();
    let live = env
        .store
        .initiate_multipart(&live_key, "video/mp4")
        .unwrap();
    let progress = serde_json::json!({
        "revision": 1, "key": live_key, "upload_id": live, "parts": {}
    });
    let _: () = redis::cmd("HSET")
        .arg("cstest:stream:live-stream")
        .arg("assembly")
        .arg(progress.to_string())
        .query(&mut env.redis.connection())
        .unwrap();
    std::thread::sleep(Duration::from_millis(2100));

    let daemon = env.start_daemon(&[("MULTIPART_MAX_AGE", "1s")]);
    if kind == S3Kind::S3sFs {
        wait_for("the sweep to report that it cannot list uploads", || {
            daemon.log().contains("does not list multipart uploads")
        });
        std::thread::sleep(Duration::from_secs(6));
        assert_eq!(
            daemon
                .log()
                .matches("does not list multipart uploads")
                .count(),
            1
        );
        return;
    }
    let open_ids = || -> Vec<String> {
        env.store
            .open_uploads(&env.prefix)
            .unwrap()
            .into_iter()
            .map(|upload| upload.upload_id)
            .collect()
    };
    wait_for("the stale upload to be aborted", || {
        !open_ids().contains(&stale)
    });
    assert!(
        open_ids().contains(&live),
        "the live assembly's upload is kept"
    );
    assert_eq!(
        daemon.metric("chunkstream_multipart_uploads_aborted_total"),
        1.0
    );
    env.store.abort_multipart(&live_key, &live).unwrap();
}

/// Without permission to create it, a missing bucket stops the start with a
/// message naming it; a region other than us-east-1 is sent as a location
/// constraint, which RGW refuses (readiness says why) and the others accept.
fn bucket_creation_settings(kind: S3Kind) {
    let Some(env) = start(kind) else { return };
    let output = run_to_exit(&env, &[("S3_CREATE_BUCKET", "false")]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("bucket \"{BUCKET}\" does not exist"))
            && stderr.contains("S3_CREATE_BUCKET"),
        "{stderr}"
    );

    let daemon = env.start_daemon(&[("S3_REGION", "eu-central-1")]);
    if kind == S3Kind::Rgw {
        wait_for("readiness to say why the bucket is missing", || {
            readiness(&daemon)["s3"]
                .as_str()
                .is_some_and(|s3| s3.contains("S3_REGION"))
        });
        return;
    }
    let source = env.drop_file("eu.mp4", &pseudo_random(6 * MIB, 8));
    let meta = env.wait_complete("eu.mp4");
    env.assert_byte_exact(&meta, &source);
}

/// Runs each scenario against each server, as `<server>::<scenario>`.
macro_rules! on_every_server {
    ($($scenario:ident),* $(,)?) => {
        mod s3s_fs {
            $(#[test] fn $scenario() { super::$scenario(super::S3Kind::S3sFs) })*
        }
        mod rgw {
            $(#[test] fn $scenario() { super::$scenario(super::S3Kind::Rgw) })*
        }
        mod moto {
            $(#[test] fn $scenario() { super::$scenario(super::S3Kind::Moto) })*
        }
    };
}

on_every_server!(
    bucket_probe_pre_existing_files_and_a_restart,
    live_recording_with_faststart,
    two_level_assembly_and_restore,
    a_corrupting_network_never_gets_a_bad_body_stored,
    abandoned_multipart_uploads_are_swept,
    bucket_creation_settings,
);
