//! Credentials and object policy against real local servers: each source of
//! the AWS credential chain uploads a stream byte-exact (container
//! credentials and an IMDSv2 stand-in, both HTTP servers in this test, web
//! identity from moto's STS, a profile file against s3s-fs), short-lived
//! credentials are refreshed mid-upload, no credentials stop the start, and
//! every object written
//! carries the object policy (HEAD against moto). No test reaches the
//! instance-metadata address or any host off this machine.

mod support;

use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use support::stub::{Stub, credentials_json, header};
use support::{
    ACCESS_KEY, BUCKET, MIB, S3Kind, SECRET_KEY, TestEnv, append, pseudo_random, wait_for,
};

/// The daemon with [`TestEnv::keyless_env`] plus `extra`.
fn start_without_keys(env: &TestEnv, extra: &[(&str, &str)]) -> support::Daemon {
    let mut vars = env.keyless_env();
    for (key, value) in extra {
        vars.insert(key.to_string(), value.to_string());
    }
    support::Daemon::start(vars, env.watch.path())
}

/// Drops a recording of `size` bytes, waits for it to complete and checks
/// it byte for byte.
fn uploads_byte_exact(env: &TestEnv, rel: &str, size: u64, seed: u64) {
    let path = env.drop_file(rel, &pseudo_random(size, seed));
    let meta = env.wait_complete(rel);
    env.assert_byte_exact(&meta, &path);
}

#[test]
fn container_credentials_that_expire_in_40s_are_refreshed_during_an_upload() {
    let Some(env) = TestEnv::start() else { return };
    // Credentials that expire 40 s after each request, for the pod's token.
    let server = Stub::start(|request, n| match header(request, "Authorization") {
        Some(token) if token == "Bearer pod-token" => (
            200,
            credentials_json(&format!("session-{n}"), Duration::from_secs(40)),
        ),
        _ => (401, String::new()),
    });
    let url = format!("{}/v2/credentials/pod", server.base);
    let token_file = env.staging.path().join("token");
    std::fs::write(&token_file, "Bearer pod-token\n").unwrap();
    let daemon = start_without_keys(
        &env,
        &[
            ("AWS_CONTAINER_CREDENTIALS_FULL_URI", &url),
            (
                "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
                token_file.to_str().unwrap(),
            ),
            ("STREAM_TIMEOUT", "4s"),
        ],
    );
    // The stream grows for longer than half the credentials' lifetime.
    let path = env.file("cam-container.mp4");
    let started = std::time::Instant::now();
    let mut seed = 1;
    while started.elapsed() < Duration::from_secs(30) {
        append(&path, &pseudo_random(3 * MIB, seed));
        seed += 1;
        std::thread::sleep(Duration::from_secs(2));
    }
    let meta = env.wait_complete("cam-container.mp4");
    env.assert_byte_exact(&meta, &path);
    assert!(
        server.answered.load(Ordering::SeqCst) >= 2,
        "the credentials were refreshed"
    );
    let log = daemon.log();
    assert!(log.contains("credentials: container credentials"), "{log}");
    assert!(
        log.contains("credentials: refreshed from container credentials"),
        "{log}"
    );
    assert_eq!(daemon.metric_sum("chunkstream_upload_errors_total"), 0.0);
    assert!(!log.contains("pod-token"), "the token is never logged");
    daemon.terminate();
}

#[test]
fn web_identity_assumes_a_role_at_moto_sts() {
    let Some(env) = TestEnv::start_on(S3Kind::Moto, ACCESS_KEY, SECRET_KEY) else {
        return;
    };
    let token_file = env.staging.path().join("web-identity-token");
    std::fs::write(&token_file, "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJjYW0ifQ.c2ln").unwrap();
    let daemon = start_without_keys(
        &env,
        &[
            ("AWS_ROLE_ARN", "arn:aws:iam::123456789012:role/chunkstream"),
            ("AWS_WEB_IDENTITY_TOKEN_FILE", token_file.to_str().unwrap()),
            ("AWS_ENDPOINT_URL_STS", &env.s3.endpoint()),
        ],
    );
    uploads_byte_exact(&env, "cam-irsa.mp4", 7 * MIB, 3);
    let log = daemon.log();
    assert!(
        log.contains("credentials: web identity (role arn:aws:iam::123456789012:role/chunkstream"),
        "{log}"
    );
    daemon.terminate();
}

#[test]
fn a_profile_in_a_shared_credentials_file_signs_for_s3s_fs() {
    let Some(env) = TestEnv::start() else { return };
    let file = env.staging.path().join("credentials");
    std::fs::write(
        &file,
        format!("[default]\naws_access_key_id = wrong\naws_secret_access_key = wrong\n\n[cameras]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n"),
    )
    .unwrap();
    let daemon = start_without_keys(
        &env,
        &[
            ("AWS_PROFILE", "cameras"),
            ("AWS_SHARED_CREDENTIALS_FILE", file.to_str().unwrap()),
            ("AWS_CONFIG_FILE", "/nonexistent/config"),
        ],
    );
    uploads_byte_exact(&env, "cam-profile.mp4", 6 * MIB, 4);
    let log = daemon.log();
    assert!(
        log.contains("credentials: shared profile \"cameras\""),
        "{log}"
    );
    assert!(!log.contains(SECRET_KEY), "the secret is never logged");
    daemon.terminate();
}

#[test]
fn no_credentials_anywhere_exits_2_naming_every_source_tried() {
    let Some(env) = TestEnv::start() else { return };
    let mut vars = env.keyless_env();
    vars.insert("HOME".into(), env.staging.path().display().to_string());
    let output = support::run_to_exit(vars);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    for source in [
        "environment",
        "web identity",
        "shared profile",
        "container credentials",
        "EC2 instance metadata (AWS_EC2_METADATA_DISABLED=true)",
        "S3_ANONYMOUS=true",
    ] {
        assert!(stderr.contains(source), "{source} in {stderr}");
    }
}

/// `request` with a placeholder signature: moto reads the access key but
/// checks no signature (unsigned requests are anonymous).
fn placeholder_signed(
    request: ureq::RequestBuilder<ureq::typestate::WithoutBody>,
) -> ureq::RequestBuilder<ureq::typestate::WithoutBody> {
    request.header(
        "authorization",
        format!("AWS4-HMAC-SHA256 Credential={ACCESS_KEY}/20260101/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=00"),
    )
}

/// The headers of HEAD `key` on moto.
fn head(env: &TestEnv, key: &str) -> http::HeaderMap {
    let url = format!("{}/{BUCKET}/{key}", env.s3.endpoint());
    let response = placeholder_signed(ureq::head(&url))
        .call()
        .unwrap_or_else(|err| panic!("HEAD {url}: {err}"));
    response.headers().clone()
}

#[test]
fn every_object_carries_sse_storage_class_tags_and_object_lock_on_moto() {
    let Some(env) = TestEnv::start_on(S3Kind::Moto, ACCESS_KEY, SECRET_KEY) else {
        return;
    };
    let daemon = env.start_daemon(&[
        ("S3_SSE", "AES256"),
        ("S3_STORAGE_CLASS", "STANDARD_IA"),
        ("S3_OBJECT_LOCK_MODE", "GOVERNANCE"),
        ("S3_OBJECT_LOCK_RETAIN", "2d"),
        ("S3_TAGS", "site=north gate,kind=cctv"),
        ("ASSEMBLE", "true"),
    ]);
    let path = env.drop_file("cam-policy.mp4", &pseudo_random(11 * MIB, 5));
    let meta = env.wait_assembled("cam-policy.mp4", 1);
    env.assert_byte_exact(&meta, &path);
    let keys = env.keys();
    assert!(
        keys.len() >= 4,
        "chunks, metadata and the assembled object: {keys:?}"
    );
    let soon = SystemTime::now() + Duration::from_secs(86_400);
    for key in keys.iter().filter(|key| !key.contains(".chunkstream/")) {
        let headers = head(&env, key);
        let value = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_else(|| panic!("{key}: no {name} in {headers:?}"))
                .to_string()
        };
        assert_eq!(value("x-amz-server-side-encryption"), "AES256", "{key}");
        assert_eq!(value("x-amz-storage-class"), "STANDARD_IA", "{key}");
        assert_eq!(value("x-amz-tagging-count"), "2", "{key}");
        // moto 5.2 drops Object Lock headers on CreateMultipartUpload (AWS
        // applies them), so the assembled object is checked for the rest only.
        if key.ends_with("/cam-policy.mp4") {
            continue;
        }
        assert_eq!(value("x-amz-object-lock-mode"), "GOVERNANCE", "{key}");
        let until = humantime::parse_rfc3339_weak(
            value("x-amz-object-lock-retain-until-date").trim_end_matches('Z'),
        )
        .expect("a date");
        assert!(until > soon, "{key} is retained for 2 days");
    }
    wait_for("no failed requests", || {
        daemon.metric_sum("chunkstream_upload_errors_total") == 0.0
    });
    daemon.terminate();
}

/// The keys under `prefix` with the number of versions (and delete markers)
/// each has in moto's versioned bucket (ListObjectVersions).
fn versions_per_key(env: &TestEnv, prefix: &str) -> std::collections::BTreeMap<String, usize> {
    let url = format!("{}/{BUCKET}?versions&prefix={prefix}", env.s3.endpoint());
    let body = placeholder_signed(ureq::get(&url))
        .call()
        .unwrap_or_else(|err| panic!("GET {url}: {err}"))
        .body_mut()
        .read_to_string()
        .expect("versions listing");
    assert!(!body.contains("<IsTruncated>true"), "one page: {body}");
    let mut versions = std::collections::BTreeMap::new();
    for entry in body.split("<Key>").skip(1) {
        let key = entry.split("</Key>").next().expect("a key").to_string();
        *versions.entry(key).or_insert(0) += 1;
    }
    versions
}

#[test]
fn with_object_lock_a_rewritten_header_goes_to_a_new_key_and_no_object_is_overwritten() {
    let Some(env) = TestEnv::start_on(S3Kind::Moto, ACCESS_KEY, SECRET_KEY) else {
        return;
    };
    let daemon = env.start_daemon(&[
        ("S3_OBJECT_LOCK_MODE", "GOVERNANCE"),
        ("S3_OBJECT_LOCK_RETAIN", "1d"),
        ("STREAM_TIMEOUT", "8s"),
    ]);
    // A recording in progress: two full chunks go up while it grows.
    let path = env.drop_file("cam-locked.mp4", &pseudo_random(11 * MIB, 31));
    let mut stream_id = String::new();
    wait_for("the first two chunks checkpointed", || {
        stream_id = env.registered_stream_ids().pop().unwrap_or_default();
        !stream_id.is_empty() && env.checkpointed_chunks(&stream_id) >= 2
    });
    // The end of the recording: the header near byte 40 is patched (as
    // ffmpeg patches the mdat size), and the tail is written.
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.seek(SeekFrom::Start(40)).unwrap();
        file.write_all(b"patched mdat size").unwrap();
    }
    append(&path, &pseudo_random(MIB, 32));
    let meta = env.wait_complete("cam-locked.mp4");
    env.assert_byte_exact_via_metadata(&meta, &path);

    let versions = versions_per_key(&env, &format!("{}{stream_id}/", env.prefix));
    let first_chunks: Vec<&String> = versions
        .keys()
        .filter(|key| key.contains("/chunk-000000-"))
        .collect();
    assert_eq!(
        first_chunks.len(),
        2,
        "the chunk as uploaded while recording and as rewritten: {versions:?}"
    );
    assert!(
        first_chunks.contains(&&meta.chunks[0].key),
        "metadata names the rewritten chunk: {:?}",
        meta.chunks[0]
    );
    for (key, count) in &versions {
        assert_eq!(*count, 1, "{key} was written more than once: {versions:?}");
    }
    daemon.terminate();
}

#[test]
fn a_failing_refresh_shows_in_readyz_and_the_metric_while_uploads_go_on() {
    let Some(env) = TestEnv::start() else { return };
    // Answers once with credentials for 20 s, then refuses every refresh.
    let server = Stub::start(|_, n| match n {
        0 => (200, credentials_json("t", Duration::from_secs(20))),
        _ => (503, "unavailable".to_string()),
    });
    let url = format!("{}/creds", server.base);
    let daemon = start_without_keys(&env, &[("AWS_CONTAINER_CREDENTIALS_FULL_URI", &url)]);
    wait_for("a failed refresh counted", || {
        daemon.metric_sum("chunkstream_credentials_refresh_failures_total") >= 1.0
    });
    wait_for("/readyz shows the refresh error", || {
        let (status, body) = daemon.http("GET", "/readyz");
        status == 503 && body.contains("refreshing credentials")
    });
    // The credentials are still valid: a stream uploads meanwhile.
    uploads_byte_exact(&env, "cam-during.mp4", 6 * MIB, 9);
    daemon.terminate();
}

#[test]
fn an_ec2_instance_profile_is_read_with_the_imdsv2_token_flow() {
    let Some(env) = TestEnv::start() else { return };
    // A local stand-in for the instance metadata service, reached through
    // AWS_EC2_METADATA_SERVICE_ENDPOINT (never 169.254.169.254).
    let server = Stub::start(|request, _| {
        let token = header(request, "x-aws-ec2-metadata-token");
        let role_path = "/latest/meta-data/iam/security-credentials/";
        match (request.method(), request.url(), token.as_deref()) {
            (tiny_http::Method::Put, "/latest/api/token", _) => (200, "imds-session".into()),
            (_, path, Some("imds-session")) if path == role_path => {
                (200, "camera-uploader\n".into())
            }
            (_, path, Some("imds-session")) if path == format!("{role_path}camera-uploader") => {
                (200, credentials_json("instance", Duration::from_secs(3600)))
            }
            _ => (401, String::new()),
        }
    });
    let endpoint = server.base.clone();
    let daemon = start_without_keys(
        &env,
        &[
            ("AWS_EC2_METADATA_DISABLED", "false"),
            ("AWS_EC2_METADATA_SERVICE_ENDPOINT", &endpoint),
            ("HOME", env.staging.path().to_str().unwrap()),
        ],
    );
    uploads_byte_exact(&env, "cam-ec2.mp4", 6 * MIB, 12);
    let log = daemon.log();
    assert!(
        log.contains(&format!("credentials: EC2 instance metadata ({endpoint})")),
        "{log}"
    );
    daemon.terminate();
}
