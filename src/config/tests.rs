//! Configuration: defaults, units, and every refusal naming its variable.

use super::*;

/// Settings as if only `flags` were given on the command line.
fn settings(flags: &[&str]) -> Settings {
    let mut argv = vec!["chunkstream"];
    argv.extend_from_slice(flags);
    Cli::try_parse_from(argv).expect("flags parse").settings
}

fn config(flags: &[&str]) -> Result<Config, ConfigError> {
    let dir = std::env::temp_dir();
    let watch = format!("--watch-dir={}", dir.display());
    let mut all = vec![watch.as_str()];
    all.extend_from_slice(flags);
    Config::from_settings(&settings(&all))
}

#[test]
fn defaults_are_valid() {
    let config = config(&[]).unwrap();
    assert_eq!(config.chunk_size, 10 * 1024 * 1024);
    assert_eq!(config.poll_interval, Duration::from_secs(1));
    assert_eq!(config.stream_timeout, Duration::from_secs(30));
    assert_eq!(config.workers, 4);
    assert_eq!(config.file_extensions, vec!["mp4"]);
    assert_eq!(config.s3.bucket, "video-streams");
    assert!(config.s3.path_style);
    assert!(config.s3.endpoint.is_none());
    assert_eq!(config.shutdown_timeout, Duration::from_secs(25));
    assert_eq!(config.metrics_addr.port(), 9102);
    assert_eq!(config.lease.ttl, Duration::from_secs(30));
    assert_eq!(config.lease.max_owned_streams, None);
    assert_eq!(config.events.max_len, 100_000);
    assert!(!config.events.enabled(), "no event destination by default");
}

#[test]
fn either_event_destination_enables_events() {
    let stream = config(&["--events-stream=chunkstream:events"]).unwrap();
    assert_eq!(stream.events.stream.as_deref(), Some("chunkstream:events"));
    assert!(stream.events.enabled());
    let hook = config(&[
        "--webhook-url=https://hooks.example.test/chunkstream",
        "--webhook-secret=s3cret",
        "--webhook-timeout=3s",
    ])
    .unwrap();
    let webhook = hook.events.webhook.as_ref().expect("webhook");
    assert_eq!(webhook.timeout, Duration::from_secs(3));
    assert_eq!(webhook.secret.as_deref(), Some("s3cret"));
    assert!(hook.events.enabled());
}

#[test]
fn sizes_accept_units_and_plain_bytes() {
    assert_eq!(
        config(&["--chunk-size=16MB"]).unwrap().chunk_size,
        16_000_000
    );
    assert_eq!(
        config(&["--chunk-size=5242880"]).unwrap().chunk_size,
        MIN_CHUNK_SIZE
    );
}

#[test]
fn every_bad_value_names_its_variable() {
    let cases: &[(&str, &str)] = &[
        ("--chunk-size=4MiB", "CHUNK_SIZE"),
        ("--chunk-size=-5MiB", "CHUNK_SIZE"),
        ("--chunk-size=lots", "CHUNK_SIZE"),
        ("--poll-interval=0s", "POLL_INTERVAL"),
        ("--lease-ttl=500ms", "LEASE_TTL"),
        ("--lease-ttl=forever", "LEASE_TTL"),
        ("--max-owned-streams=-1", "MAX_OWNED_STREAMS"),
        ("--max-owned-streams=few", "MAX_OWNED_STREAMS"),
        ("--poll-interval=soon", "POLL_INTERVAL"),
        ("--stream-timeout=-1s", "STREAM_TIMEOUT"),
        ("--workers=0", "WORKERS"),
        ("--workers=-3", "WORKERS"),
        ("--workers=many", "WORKERS"),
        ("--s3-endpoint=minio:9000", "S3_ENDPOINT"),
        ("--s3-bucket=Bad_Bucket", "S3_BUCKET"),
        ("--s3-path-style=maybe", "S3_PATH_STYLE"),
        ("--assemble=sometimes", "ASSEMBLE"),
        (
            "--delete-chunks-after-assembly=maybe",
            "DELETE_CHUNKS_AFTER_ASSEMBLY",
        ),
        (
            "--delete-chunks-after-assembly=true",
            "DELETE_CHUNKS_AFTER_ASSEMBLY",
        ),
        ("--redis-url=http://localhost", "REDIS_URL"),
        ("--metrics-addr=localhost", "METRICS_ADDR"),
        ("--log-level=loud", "LOG_LEVEL"),
        ("--log-format=xml", "LOG_FORMAT"),
        ("--shutdown-timeout=0ms", "SHUTDOWN_TIMEOUT"),
        ("--file-extensions=,", "FILE_EXTENSIONS"),
        ("--retry-base-delay=1m", "RETRY_MAX_DELAY"),
        ("--aws-access-key-id=AKIA", "AWS_SECRET_ACCESS_KEY"),
        ("--s3-request-timeout=never", "S3_REQUEST_TIMEOUT"),
        ("--redis-timeout=0s", "REDIS_TIMEOUT"),
        ("--redis-sentinels=s1", "REDIS_SENTINELS"),
        ("--redis-sentinels=s1:0", "REDIS_SENTINELS"),
        ("--redis-sentinels=s1:26379", "REDIS_SENTINEL_MASTER"),
        ("--redis-sentinel-master=m", "REDIS_SENTINEL_MASTER"),
        ("--redis-sentinel-password=pw", "REDIS_SENTINEL_PASSWORD"),
        ("--redis-password=pw", "REDIS_PASSWORD"),
        ("--instance-id=pod 0", "INSTANCE_ID"),
        ("--instance-id=a#b", "INSTANCE_ID"),
        ("--events-stream=my events", "EVENTS_STREAM"),
        ("--events-maxlen=0", "EVENTS_MAXLEN"),
        ("--events-maxlen=lots", "EVENTS_MAXLEN"),
        ("--webhook-url=ftp://example.test/hook", "WEBHOOK_URL"),
        ("--webhook-url=example.test/hook", "WEBHOOK_URL"),
        ("--webhook-url=http://", "WEBHOOK_URL"),
        ("--webhook-secret=s3cret", "WEBHOOK_SECRET"),
        ("--webhook-timeout=0s", "WEBHOOK_TIMEOUT"),
        ("--webhook-timeout=soon", "WEBHOOK_TIMEOUT"),
        ("--record-retention=0s", "RECORD_RETENTION"),
        ("--on-complete=archive", "ON_COMPLETE"),
        ("--on-complete=move", "COMPLETED_DIR"),
        ("--completed-dir=/", "COMPLETED_DIR"),
        ("--on-complete-delay=soon", "ON_COMPLETE_DELAY"),
    ];
    for (flag, variable) in cases {
        let err = config(&[flag]).expect_err(flag);
        assert_eq!(err.variable, *variable, "{flag}");
        assert!(err.to_string().contains(variable), "{flag}: {err}");
    }
}

#[test]
fn sentinel_mode_replaces_the_url_and_never_combines_with_it() {
    let chosen = config(&[
        "--redis-sentinels=10.0.0.1:26379, sentinel-1:26380,[::1]:26381",
        "--redis-sentinel-master=mymaster",
        "--redis-sentinel-password=SENTINELSECRET",
        "--redis-password=MASTERSECRET",
    ])
    .unwrap();
    let sentinel = chosen.sentinel.as_ref().unwrap();
    assert_eq!(
        sentinel.sentinels,
        vec![
            ("10.0.0.1".to_string(), 26379),
            ("sentinel-1".to_string(), 26380),
            ("::1".to_string(), 26381)
        ]
    );
    assert_eq!(sentinel.master, "mymaster");
    assert_eq!(
        chosen.redis.url,
        "redis+sentinel://10.0.0.1:26379,sentinel-1:26380,::1:26381/mymaster"
    );
    let shown = format!("{chosen:?}");
    assert!(!shown.contains("SECRET"), "{shown}");

    let both = config(&[
        "--redis-url=redis://r:6379/0",
        "--redis-sentinels=s:26379",
        "--redis-sentinel-master=m",
    ])
    .unwrap_err();
    assert_eq!(both.variable, "REDIS_URL");
    assert!(both.to_string().contains("not both"), "{both}");
    // Empty values (as Compose passes them) are unset.
    let single = config(&["--redis-sentinels=", "--redis-password=", "--instance-id="]).unwrap();
    assert!(single.sentinel.is_none());
    assert_eq!(single.redis.url, DEFAULT_REDIS_URL);
    assert_eq!(single.instance_id, None);
    let named = config(&["--instance-id=chunkstream-0"]).unwrap();
    assert_eq!(named.instance_id.as_deref(), Some("chunkstream-0"));
}

#[test]
fn missing_watch_dir_is_a_config_error() {
    let err = Config::from_settings(&settings(&["--watch-dir=/no/such/dir"])).unwrap_err();
    assert_eq!(err.variable, "WATCH_DIR");
    assert!(err.to_string().contains("/no/such/dir"));
}

#[test]
fn extensions_are_case_insensitive_and_trimmed() {
    let config = config(&["--file-extensions= MP4, .mov"]).unwrap();
    assert_eq!(config.file_extensions, vec!["mp4", "mov"]);
}

#[test]
fn secrets_never_appear_in_debug_or_errors() {
    let config = config(&[
        "--aws-access-key-id=AKIDEXAMPLE",
        "--aws-secret-access-key=TOPSECRET",
        "--redis-url=redis://user:hunter2@localhost:6379/0",
        "--webhook-url=https://hook:webhookpass@hooks.example.test/in",
        "--webhook-secret=HMACSECRET",
    ])
    .unwrap();
    let shown = format!("{config:?}");
    assert!(!shown.contains("TOPSECRET"));
    assert!(!shown.contains("webhookpass"));
    assert!(!shown.contains("HMACSECRET"));
    assert!(!shown.contains("hunter2"));
    assert!(shown.contains("AKIDEXAMPLE"));
    let err = settings(&["--redis-url=redis://:hunter2@", "--watch-dir=/"]);
    if let Err(err) = Config::from_settings(&err) {
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }
}

#[test]
fn redaction_handles_every_userinfo_form() {
    assert_eq!(redact_url("redis://h:6379/0"), "redis://h:6379/0");
    assert_eq!(redact_url("redis://u:p@h:1/0"), "redis://u:***@h:1/0");
    assert_eq!(redact_url("redis://:p@h"), "redis://:***@h");
    assert_eq!(redact_url("rediss://p@h/2"), "rediss://***@h/2");
}

#[test]
fn backoff_doubles_up_to_the_cap_and_jitters_below_it() {
    let policy = RetryPolicy {
        base_delay: Duration::from_millis(200),
        max_delay: Duration::from_secs(30),
    };
    assert_eq!(policy.ceiling(0), Duration::from_millis(200));
    assert_eq!(policy.ceiling(3), Duration::from_millis(1600));
    assert_eq!(policy.ceiling(20), Duration::from_secs(30));
    assert_eq!(policy.ceiling(u32::MAX), Duration::from_secs(30));
    for attempt in 0..40 {
        assert!(policy.delay(attempt) <= policy.ceiling(attempt));
    }
}

#[test]
fn on_complete_defaults_to_keep_and_move_needs_a_directory_outside_watch_dir() {
    let config = config(&[]).unwrap();
    assert_eq!(config.on_complete, OnComplete::Keep);
    assert_eq!(config.on_complete_delay, Duration::ZERO);
    assert_eq!(config.record_retention, Duration::from_secs(7 * 24 * 3600));

    let watch = tempfile::tempdir().unwrap();
    let inside = watch.path().join("done");
    std::fs::create_dir(&inside).unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let with = |completed: &std::path::Path| {
        let watch_dir = format!("--watch-dir={}", watch.path().display());
        let completed_dir = format!("--completed-dir={}", completed.display());
        Config::from_settings(&settings(&[
            &watch_dir,
            "--on-complete=move",
            &completed_dir,
            "--on-complete-delay=10m",
        ]))
    };
    let err = with(&inside).unwrap_err();
    assert_eq!(err.variable, "COMPLETED_DIR");
    assert!(err.to_string().contains("outside WATCH_DIR"), "{err}");
    let config = with(elsewhere.path()).unwrap();
    assert_eq!(
        config.on_complete,
        OnComplete::Move(elsewhere.path().to_path_buf())
    );
    assert_eq!(config.on_complete_delay, Duration::from_secs(600));
    let err = with(&elsewhere.path().join("missing")).unwrap_err();
    assert_eq!(err.variable, "COMPLETED_DIR");
}

#[test]
fn tls_trust_is_a_ca_bundle_or_no_verification_never_both() {
    // The flags override an AWS_CA_BUNDLE in the environment running the tests.
    let no_bundle = "--aws-ca-bundle=";
    assert_eq!(config(&[no_bundle]).unwrap().s3.tls, S3Tls::WebRoots);
    assert_eq!(
        config(&["--aws-ca-bundle=/etc/ca.pem"]).unwrap().s3.tls,
        S3Tls::CaBundle(PathBuf::from("/etc/ca.pem"))
    );
    assert_eq!(
        config(&[no_bundle, "--s3-insecure-tls=true"])
            .unwrap()
            .s3
            .tls,
        S3Tls::Insecure
    );
    let both = config(&["--aws-ca-bundle=/etc/ca.pem", "--s3-insecure-tls=true"]).unwrap_err();
    assert_eq!(both.variable, "S3_INSECURE_TLS");
    assert_eq!(
        config(&[no_bundle, "--s3-insecure-tls=maybe"])
            .unwrap_err()
            .variable,
        "S3_INSECURE_TLS"
    );
}

#[test]
fn chunks_are_deleted_after_assembly_only_when_asked_and_possible() {
    assert!(
        !config(&["--assemble=true"])
            .unwrap()
            .delete_chunks_after_assembly
    );
    let both = ["--assemble=true", "--delete-chunks-after-assembly=true"];
    assert!(config(&both).unwrap().delete_chunks_after_assembly);
    let locked = [
        "--assemble=true",
        "--delete-chunks-after-assembly=true",
        "--s3-object-lock-mode=GOVERNANCE",
        "--s3-object-lock-retain=1d",
    ];
    let err = config(&locked).expect_err("object lock");
    assert_eq!(err.variable, "DELETE_CHUNKS_AFTER_ASSEMBLY");
    assert!(err.to_string().contains("S3_OBJECT_LOCK_MODE"), "{err}");
}
