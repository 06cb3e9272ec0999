//! Operator controls (issue 18), through the real binary against real
//! redis-server and s3s-fs: INCLUDE/EXCLUDE deciding what is uploaded, the
//! bandwidth cap, `chunkstream scan`, and the status page in a real headless
//! browser.

mod support;

use std::process::Command;

use support::{TestEnv, pseudo_random, require_tool, wait_for_long};

const MIB: u64 = 1024 * 1024;

fn repo_file(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(name)
}

/// Drops the `skipped` files first, then the `uploaded` ones; once every
/// uploaded file is complete (byte-exact), none of the skipped ones, which
/// were in the directory longer, may have been registered.
fn assert_rules_decide(env: &TestEnv, uploaded: &[&str], skipped: &[&str]) {
    for (seed, rel) in skipped.iter().enumerate() {
        env.drop_file(rel, &pseudo_random(1000 + seed as u64, seed as u64));
    }
    for (seed, rel) in uploaded.iter().enumerate() {
        env.drop_file(
            rel,
            &pseudo_random(3 * MIB + seed as u64, 100 + seed as u64),
        );
    }
    for rel in uploaded {
        let meta = env.wait_complete(rel);
        env.assert_byte_exact(&meta, &env.file(rel));
    }
    for rel in skipped {
        assert!(env.metadata_for(rel).is_none(), "{rel} was uploaded");
    }
    assert_eq!(env.registered_stream_ids().len(), uploaded.len());
}

#[test]
fn include_and_exclude_decide_what_is_uploaded_at_any_depth_and_in_unicode() {
    let Some(env) = TestEnv::start() else { return };
    let _daemon = env.start_daemon(&[
        ("INCLUDE", "site-*/**/*.mp4,*.mov"),
        // Replaces the default, so hidden files are included again.
        ("EXCLUDE", "**/archive/**,*-preview.*"),
    ]);
    assert_rules_decide(
        &env,
        &[
            "site-a/cam1/2026/día-東京.mp4",
            "site-b/x.mp4",
            "elsewhere/deep/clip.mov",
            ".hidden.mov",
        ],
        &[
            "site-a/archive/old.mp4",
            "site-a/cam1/x-preview.mp4",
            "other/y.mp4",
            "site-c.mp4",
        ],
    );
}

#[test]
fn by_default_file_extensions_decide_and_hidden_and_partial_files_are_skipped() {
    let Some(env) = TestEnv::start() else { return };
    let _daemon = env.start_daemon(&[("FILE_EXTENSIONS", "mp4,mkv")]);
    assert_rules_decide(
        &env,
        &["cam/a.mp4", "ünïcode/b.MKV"],
        &[
            ".a.mp4",
            ".cache/c.mp4",
            "cam/d.mp4.part",
            "cam/e.tmp",
            "cam/.~lock.mp4",
            "notes.txt",
        ],
    );
}

#[test]
fn bad_patterns_and_bandwidth_settings_exit_2_naming_the_variable() {
    let watch = tempfile::tempdir().unwrap();
    for (variable, value) in [
        ("INCLUDE", "cam/[a.mp4"),
        ("EXCLUDE", "*.{mp4,mov"),
        ("BANDWIDTH_LIMIT", "fast"),
        ("BANDWIDTH_SCHEDULE", "Mon-Fri 08:00-18:00"),
        ("TZ", "Mars/Olympus_Mons"),
    ] {
        for args in [&[][..], &["scan"][..]] {
            let output = Command::new(env!("CARGO_BIN_EXE_chunkstream"))
                .env_clear()
                .env("WATCH_DIR", watch.path())
                .env(variable, value)
                .args(args)
                .output()
                .expect("runs");
            assert_eq!(output.status.code(), Some(2), "{variable}={value} {args:?}");
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert!(stderr.contains(variable), "{variable}: {stderr}");
        }
    }
}

/// A 1 s S3_REQUEST_TIMEOUT cannot carry a 5 MiB chunk at 2 MiB/s shared by
/// two workers; the timeout grows with the body, so the upload completes.
#[test]
fn a_throttled_chunk_is_not_timed_out_and_the_gauge_shows_the_cap() {
    let Some(env) = TestEnv::start() else { return };
    let daemon = env.start_daemon(&[("BANDWIDTH_LIMIT", "2MiB"), ("S3_REQUEST_TIMEOUT", "1s")]);
    assert_eq!(
        daemon.metric("chunkstream_bandwidth_limit_bytes"),
        (2 * MIB) as f64
    );
    let rel = "slow/cam.mp4";
    env.drop_file(rel, &pseudo_random(6 * MIB, 7));
    let meta = env.wait_complete(rel);
    env.assert_byte_exact(&meta, &env.file(rel));
}

#[test]
fn scan_lists_what_would_be_uploaded_skipped_or_is_done() {
    let Some(env) = TestEnv::start() else { return };
    let daemon = env.start_daemon(&[]);
    env.drop_file("cam/done.mp4", &pseudo_random(1000, 1));
    env.wait_complete("cam/done.mp4");
    daemon.terminate();
    env.drop_file("cam/new.mp4", &pseudo_random(10, 2));
    env.drop_file("cam/new.mp4.part", &pseudo_random(10, 3));
    let output = env.command(&["scan"]);
    assert!(output.status.success());
    let stdout = String::from_utf8_lossy(&output.stdout);
    for line in [
        "done    cam/done.mp4 (1000 bytes)",
        "upload  cam/new.mp4 (10 bytes)",
        "skip    cam/new.mp4.part (excluded by EXCLUDE pattern \"*.part\")",
        "1 to upload, 1 done, 1 skipped",
    ] {
        assert!(stdout.lines().any(|l| l == line), "{line:?} in:\n{stdout}");
    }
}

/// The status page in Debian's headless chromium, driven by Playwright for
/// Python (tests/browser/status_page.py): a progress bar advances while a
/// throttled file uploads, a hostile file name renders as text and fires no
/// dialog, and the page is saved to docs/status-page.png.
#[test]
fn the_status_page_shows_progress_and_escapes_file_names_in_a_real_browser() {
    let Some(chromium) = require_tool("chromium") else {
        return;
    };
    let Some(python) = require_tool("python3") else {
        return;
    };
    let has_playwright = Command::new(&python)
        .args(["-c", "import playwright.sync_api"])
        .status()
        .is_ok_and(|status| status.success());
    if !has_playwright {
        assert!(
            !support::in_ci(),
            "the Python package playwright is required when CI=true; run scripts/test.sh"
        );
        eprintln!("skipping: Python playwright not installed (scripts/test.sh installs it)");
        return;
    }
    let Some(env) = TestEnv::start() else { return };
    let daemon = env.start_daemon(&[("BANDWIDTH_LIMIT", "1MiB"), ("WORKERS", "1")]);
    env.drop_file("<img src=x onerror=alert(1)>.mp4", &pseudo_random(1000, 1));
    env.drop_file("site-a/cam1/recording.mp4", &pseudo_random(12 * MIB, 2));
    wait_for_long(
        "both streams to be listed",
        std::time::Duration::from_secs(60),
        || daemon.http("GET", "/streams").1.matches("\"path\"").count() == 2,
    );
    let output = Command::new(&python)
        .arg(repo_file("tests/browser/status_page.py"))
        .arg(daemon.url())
        .arg(&chromium)
        .arg(repo_file("docs/status-page.png"))
        .output()
        .expect("python runs");
    assert!(
        output.status.success(),
        "browser test failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
