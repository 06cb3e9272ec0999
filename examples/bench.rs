//! The benchmark harness behind `scripts/bench.sh`: chunkstream against
//! rclone on the same loopback S3 server, plus memory, polling and Redis cost.
//!
//! It reuses the integration tests' plumbing (real `redis-server` and
//! `s3s-fs`, the release binary) and prints figures; it never fails on speed.
//! With `--write-doc` it replaces the results section of docs/benchmarks.md.
//! `--quick` shrinks every data set (for trying the harness, not for figures).

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use support::{BUCKET, Daemon, MIB, TestEnv, pseudo_random};

/// One row of the results table.
struct Figure {
    name: String,
    value: String,
    target: String,
    met: Option<bool>,
}

struct Bench {
    env: TestEnv,
    binary: PathBuf,
    quick: bool,
    figures: Vec<Figure>,
    notes: Vec<String>,
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn percentile(values: &mut [f64], p: f64) -> f64 {
    values.sort_by(f64::total_cmp);
    let index = ((values.len() - 1) as f64 * p).round() as usize;
    values[index]
}

/// Peak resident set size of a live process (VmHWM), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

/// CPU time (user + system) of a live process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks: f64 = fields.get(11..13).map_or(0.0, |f| {
        f.iter().filter_map(|v| v.parse::<f64>().ok()).sum()
    });
    ticks / 100.0 // USER_HZ is 100 on Linux
}

/// Records every command Redis receives (`redis-cli MONITOR`) until stopped.
struct RedisMonitor {
    child: std::process::Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl RedisMonitor {
    fn start(env: &TestEnv) -> Self {
        let dir = tempfile::tempdir().expect("dir");
        let log = dir.path().join("monitor.log");
        let child = Command::new("redis-cli")
            .args(["-p", &env.redis.port.to_string(), "MONITOR"])
            .stdout(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("redis-cli MONITOR");
        std::thread::sleep(Duration::from_millis(200));
        Self {
            child,
            log,
            _dir: dir,
        }
    }

    /// (round trips, commands by name). A command a Lua script runs is
    /// tagged `[lua]` and is no round trip of its own.
    fn stop(mut self) -> (u64, BTreeMap<String, u64>) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let mut round_trips = 0;
        let mut by_name = BTreeMap::new();
        for line in text.lines().filter(|l| l.contains("] \"")) {
            let name = line
                .split("] \"")
                .nth(1)
                .and_then(|rest| rest.split('"').next())
                .unwrap_or("?")
                .to_ascii_uppercase();
            if !line.contains(" lua]") {
                round_trips += 1;
                *by_name.entry(name).or_insert(0) += 1;
            }
        }
        (round_trips, by_name)
    }
}

impl Bench {
    /// A daemon on `watch` with benchmark settings plus `overrides`; its
    /// state (Redis keys, S3 prefix) is fresh, named by `run`.
    fn daemon(&self, watch: &Path, run: &str, overrides: &[(&str, &str)]) -> Daemon {
        let mut env = self.env.daemon_env();
        env.insert("WATCH_DIR".into(), watch.display().to_string());
        env.insert("S3_PREFIX".into(), format!("{run}/"));
        env.insert("REDIS_KEY_PREFIX".into(), format!("bench-{run}"));
        env.insert("LOG_LEVEL".into(), "warn".into());
        for (key, value) in [
            ("STREAM_TIMEOUT", "1s"),
            ("POLL_INTERVAL", "200ms"),
            ("WORKERS", "4"),
            ("CHUNK_SIZE", "10MiB"),
        ] {
            env.insert(key.into(), value.into());
        }
        for (key, value) in overrides {
            env.insert(key.to_string(), value.to_string());
        }
        Daemon::start_binary(&self.binary, env, watch, None)
    }

    fn completed(daemon: &Daemon) -> f64 {
        daemon.metric("chunkstream_streams_completed_total{status=\"complete\"}")
    }

    fn wait_completed(daemon: &Daemon, count: f64) {
        support::wait_for_long(
            &format!("{count} completed streams"),
            Duration::from_secs(1800),
            || Self::completed(daemon) >= count,
        );
    }

    fn files(&self, name: &str, count: usize, size: u64) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("data dir");
        let block = pseudo_random(MIB, 7);
        for n in 0..count {
            let path = dir.path().join(format!("{name}-{n:03}.mp4"));
            let mut file = std::fs::File::create(&path).expect("create");
            let mut written = 0;
            while written < size {
                let take = (size - written).min(MIB) as usize;
                // Incompressible, and different per file and per MiB.
                let mut piece = block[..take].to_vec();
                piece[..8].copy_from_slice(&(n as u64 * 1_000_000 + written).to_le_bytes());
                std::io::Write::write_all(&mut file, &piece).expect("write");
                written += take as u64;
            }
        }
        dir
    }

    fn throughput_versus_rclone(&mut self) {
        let (count, size) = if self.quick {
            (4, 16 * MIB)
        } else {
            (8, 64 * MIB)
        };
        let data = self.files("tp", count, size);
        let rclone =
            support::require_tool("rclone").expect("rclone (scripts/bench.sh installs it)");
        let mut ours = Vec::new();
        let mut with_md5 = Vec::new();
        let (mut cpu_ours, mut cpu_md5) = (Vec::new(), Vec::new());
        let mut theirs = Vec::new();
        let mut round_trips_per_chunk = 0.0;
        for round in 0..3 {
            // s3s-fs verifies x-amz-checksum-sha256, so `auto` sends no
            // Content-MD5; `always` measures what the extra MD5 pass costs.
            for md5 in ["auto", "always"] {
                let monitor = (round == 0 && md5 == "auto").then(|| RedisMonitor::start(&self.env));
                let started = Instant::now();
                let daemon = self.daemon(
                    data.path(),
                    &format!("cs-{md5}-{round}"),
                    &[("S3_CONTENT_MD5", md5)],
                );
                Self::wait_completed(&daemon, count as f64);
                let (times, cpu) = if md5 == "auto" {
                    (&mut ours, &mut cpu_ours)
                } else {
                    (&mut with_md5, &mut cpu_md5)
                };
                times.push(started.elapsed().as_secs_f64());
                cpu.push(cpu_seconds(daemon.process.pid()));
                let chunks = daemon.metric("chunkstream_chunks_uploaded_total");
                let _ = daemon.terminate();
                if let Some(monitor) = monitor {
                    let (round_trips, by_name) = monitor.stop();
                    round_trips_per_chunk = round_trips as f64 / chunks;
                    self.notes.push(format!(
                        "Redis, first throughput round: {round_trips} round trips for {chunks} chunks of {count} streams: {by_name:?}."
                    ));
                }
            }

            let started = Instant::now();
            let status = Command::new(&rclone)
                .arg("copy")
                .arg(data.path())
                .arg(format!("bench:{BUCKET}/rclone-{round}"))
                .args(["--transfers", "4", "--s3-chunk-size", "10M"])
                // A CA bundle from the environment breaks rclone's plain-HTTP client.
                .env_remove("AWS_CA_BUNDLE")
                .env("RCLONE_CONFIG_BENCH_TYPE", "s3")
                .env("RCLONE_CONFIG_BENCH_PROVIDER", "Other")
                .env("RCLONE_CONFIG_BENCH_ENDPOINT", self.env.s3.endpoint())
                .env("RCLONE_CONFIG_BENCH_ACCESS_KEY_ID", support::ACCESS_KEY)
                .env("RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY", support::SECRET_KEY)
                .env("RCLONE_CONFIG_BENCH_REGION", "us-east-1")
                .env("RCLONE_CONFIG_BENCH_FORCE_PATH_STYLE", "true")
                .status()
                .expect("rclone runs");
            assert!(status.success(), "rclone copy failed");
            theirs.push(started.elapsed().as_secs_f64());
        }
        let total_mib = (count as u64 * size / MIB) as f64;
        let show = |times: &[f64]| {
            times
                .iter()
                .map(|t| format!("{t:.2}"))
                .collect::<Vec<_>>()
                .join(" / ")
        };
        let (ours_median, theirs_median) = (median(&mut ours.clone()), median(&mut theirs.clone()));
        self.notes.push(format!(
            "Throughput: {count} × {} MiB. chunkstream runs (s): {}; rclone runs (s): {}. chunkstream's time includes start-up, STREAM_TIMEOUT (1 s) and the verification re-read.",
            size / MIB,
            show(&ours),
            show(&theirs)
        ));
        let ratio = ours_median / theirs_median;
        self.figures.push(Figure {
            name: format!(
                "time for {count}×{} MiB, chunkstream / rclone (median of 3)",
                size / MIB
            ),
            value: format!(
                "{ours_median:.2} s / {theirs_median:.2} s = {ratio:.2} ({:.0} vs {:.0} MiB/s)",
                total_mib / ours_median,
                total_mib / theirs_median
            ),
            target: "≤ 1.0".into(),
            met: Some(ratio <= 1.0),
        });
        let md5_median = median(&mut with_md5.clone());
        let gib = total_mib / 1024.0;
        self.notes.push(format!(
            "S3_CONTENT_MD5=always runs (s): {}; CPU per GiB (user + sys, median): {:.2} s without Content-MD5, {:.2} s with it.",
            show(&with_md5),
            median(&mut cpu_ours) / gib,
            median(&mut cpu_md5) / gib
        ));
        let md5_ratio = md5_median / theirs_median;
        self.figures.push(Figure {
            name: "the same with S3_CONTENT_MD5=always, chunkstream / rclone".into(),
            value: format!("{md5_median:.2} s / {theirs_median:.2} s = {md5_ratio:.2}"),
            target: "≤ 1.0".into(),
            met: Some(md5_ratio <= 1.0),
        });
        self.figures.push(Figure {
            name: "Redis round trips per chunk (all of them, over chunks)".into(),
            value: format!("{round_trips_per_chunk:.2}"),
            target: "≤ 2".into(),
            met: Some(round_trips_per_chunk <= 2.0),
        });
    }

    fn growing_files(&mut self) {
        let (files, seconds): (u64, u64) = if self.quick { (2, 5) } else { (4, 20) };
        let stream_timeout = 2.0;
        let poll = 0.2;
        let dir = tempfile::tempdir().expect("dir");
        let daemon = self.daemon(dir.path(), "growing", &[("STREAM_TIMEOUT", "2s")]);
        let written = Arc::new(AtomicU64::new(0));
        let done = Arc::new(AtomicBool::new(false));
        let writer = {
            let (written, done, root) = (written.clone(), done.clone(), dir.path().to_path_buf());
            std::thread::spawn(move || {
                let block = pseudo_random(2 * MIB, 3);
                let started = Instant::now();
                // 2 MiB per file every 100 ms: 20 MiB/s per file.
                for tick in 0..seconds * 10 {
                    for n in 0..files {
                        let mut piece = block.clone();
                        piece[..8].copy_from_slice(&(tick * 100 + n).to_le_bytes());
                        support::append(&root.join(format!("g{n}.mp4")), &piece);
                        written.fetch_add(2 * MIB, Ordering::SeqCst);
                    }
                    let next = Duration::from_millis(100 * (tick + 1));
                    std::thread::sleep(next.saturating_sub(started.elapsed()));
                }
                done.store(true, Ordering::SeqCst);
            })
        };
        let mut lags = Vec::new();
        while !done.load(Ordering::SeqCst) {
            let uploaded = daemon.metric("chunkstream_uploaded_bytes_total") as u64;
            lags.push(written.load(Ordering::SeqCst).saturating_sub(uploaded) as f64 / MIB as f64);
            std::thread::sleep(Duration::from_millis(250));
        }
        writer.join().expect("writer");
        let last_write = Instant::now();
        Self::wait_completed(&daemon, files as f64);
        let latency = last_write.elapsed().as_secs_f64();
        let _ = daemon.terminate();
        let target = stream_timeout + poll + 1.0;
        self.figures.push(Figure {
            name: format!(
                "growing: upload lag behind {files} writers at 20 MiB/s each (p50 / max)"
            ),
            value: format!(
                "{:.0} MiB / {:.0} MiB",
                percentile(&mut lags.clone(), 0.5),
                percentile(&mut lags, 1.0)
            ),
            target: format!("(≥ {files} × one partial chunk is inherent)"),
            met: None,
        });
        self.figures.push(Figure {
            name: "growing: completion latency after the last write".into(),
            value: format!("{latency:.2} s"),
            target: format!("≤ STREAM_TIMEOUT + POLL_INTERVAL + 1 s = {target:.1} s"),
            met: Some(latency <= target),
        });
    }

    fn memory(&mut self) {
        let limit = 4 * 10 * MIB + 16 * MIB;
        let cases: Vec<(usize, u64, &str)> = if self.quick {
            vec![
                (1, 256 * MIB, "one 256 MiB file"),
                (8, 32 * MIB, "8 × 32 MiB"),
            ]
        } else {
            vec![
                (1, 2048 * MIB, "one 2 GiB file"),
                (64, 64 * MIB, "64 × 64 MiB"),
            ]
        };
        for (n, (count, size, label)) in cases.into_iter().enumerate() {
            let data = self.files(&format!("mem{n}"), count, size);
            let daemon = self.daemon(data.path(), &format!("mem-{n}"), &[]);
            Self::wait_completed(&daemon, count as f64);
            let peak = peak_rss(daemon.process.pid());
            let _ = daemon.terminate();
            self.figures.push(Figure {
                name: format!("peak RSS, {label}, WORKERS=4, CHUNK_SIZE=10MiB"),
                value: format!("{:.1} MiB", peak as f64 / MIB as f64),
                target: format!("≤ {} MiB", limit / MIB),
                met: Some(peak <= limit),
            });
        }
    }

    fn polling(&mut self) {
        let (dirs, per_dir) = if self.quick { (10, 100) } else { (100, 1000) };
        let total = dirs * per_dir;
        let root = tempfile::tempdir().expect("dir");
        for d in 0..dirs {
            let dir = root.path().join(format!("d{d:03}"));
            std::fs::create_dir_all(&dir).expect("dir");
            for f in 0..per_dir {
                std::fs::write(
                    dir.join(format!("f{f:04}.mp4")),
                    ((d * per_dir + f) as u64).to_le_bytes(),
                )
                .expect("write");
            }
        }
        let started = Instant::now();
        let daemon = self.daemon(
            root.path(),
            "poll",
            &[("POLL_INTERVAL", "1s"), ("WORKERS", "8")],
        );
        Self::wait_completed(&daemon, total as f64);
        let setup = started.elapsed().as_secs_f64();
        let before = (
            daemon.metric("chunkstream_scan_duration_seconds_sum"),
            daemon.metric("chunkstream_scan_duration_seconds_count"),
        );
        std::thread::sleep(Duration::from_secs(if self.quick { 5 } else { 15 }));
        let after = (
            daemon.metric("chunkstream_scan_duration_seconds_sum"),
            daemon.metric("chunkstream_scan_duration_seconds_count"),
        );
        let _ = daemon.terminate();
        let mean_ms = (after.0 - before.0) / (after.1 - before.1) * 1000.0;
        self.notes.push(format!(
            "Polling: uploading and completing the {total} files first took {setup:.0} s."
        ));
        self.figures.push(Figure {
            name: format!("one poll over {total} tracked, completed files (mean)"),
            value: format!("{mean_ms:.0} ms"),
            target: "≤ 150 ms".into(),
            met: Some(mean_ms <= 150.0),
        });

        // Idle CPU with 1,000 completed files at a 1 s poll.
        let idle = tempfile::tempdir().expect("dir");
        for f in 0..1000u32 {
            std::fs::write(idle.path().join(format!("i{f:04}.mp4")), f.to_le_bytes())
                .expect("write");
        }
        let daemon = self.daemon(idle.path(), "idle", &[("POLL_INTERVAL", "1s")]);
        Self::wait_completed(&daemon, 1000.0);
        std::thread::sleep(Duration::from_secs(2));
        let window = if self.quick { 10.0 } else { 60.0 };
        let pid = daemon.process.pid();
        let cpu_before = cpu_seconds(pid);
        std::thread::sleep(Duration::from_secs_f64(window));
        let cpu = (cpu_seconds(pid) - cpu_before) / window * 100.0;
        let _ = daemon.terminate();
        self.figures.push(Figure {
            name: format!("idle CPU, 1,000 completed files, 1 s poll, over {window:.0} s"),
            value: format!("{cpu:.2} % of one core"),
            target: "< 0.5 %".into(),
            met: Some(cpu < 0.5),
        });
    }

    /// Completion events: `count` small streams complete while the webhook
    /// is down, so their events wait in the outbox; what that costs in Redis
    /// and in failed attempts, then how fast the backlog drains once the
    /// webhook is back.
    fn events(&mut self) {
        let count: usize = if self.quick { 100 } else { 1000 };
        let data = tempfile::tempdir().expect("dir");
        for n in 0..count {
            std::fs::write(
                data.path().join(format!("ev{n:04}.mp4")),
                pseudo_random(4096, n as u64),
            )
            .expect("write");
        }
        let mut receiver = support::webhook::Receiver::unstarted();
        let url = receiver.url();
        let daemon = self.daemon(
            data.path(),
            "events",
            &[
                ("EVENTS_STREAM", "bench-events:stream"),
                ("WEBHOOK_URL", &url),
                ("WEBHOOK_SECRET", support::webhook::SECRET),
                ("RETRY_MAX_DELAY", "5s"),
            ],
        );
        let outage = Instant::now();
        Self::wait_completed(&daemon, count as f64);
        let mut redis = self.env.redis.connection();
        let queued = |redis: &mut redis::Connection| -> u64 {
            redis::cmd("ZCARD")
                .arg("bench-events:outbox:due")
                .query(redis)
                .expect("ZCARD")
        };
        support::wait_for("every event queued", || queued(&mut redis) == count as u64);
        let memory = |redis: &mut redis::Connection, key: &str| -> u64 {
            redis::cmd("MEMORY")
                .arg("USAGE")
                .arg(key)
                .arg("SAMPLES")
                .arg(0)
                .query::<Option<u64>>(redis)
                .expect("MEMORY USAGE")
                .unwrap_or(0)
        };
        let outbox: u64 = [
            "outbox",
            "outbox:due",
            "outbox:attempts",
            "outbox:published",
        ]
        .iter()
        .map(|key| memory(&mut redis, &format!("bench-events:{key}")))
        .sum();
        let marker_keys: Vec<String> = redis::cmd("KEYS")
            .arg("bench-events:announced:*")
            .query(&mut redis)
            .expect("KEYS");
        let marker = marker_keys.first().map_or(0, |key| memory(&mut redis, key));
        // Let the outage last a while, to see what it costs in attempts.
        std::thread::sleep(Duration::from_secs(if self.quick { 5 } else { 30 }));
        let outage_seconds = outage.elapsed().as_secs_f64();
        let attempts =
            daemon.metric("chunkstream_event_delivery_failures_total{destination=\"webhook\"}");
        receiver.start();
        let back = Instant::now();
        support::wait_for_long("the backlog to drain", Duration::from_secs(600), || {
            queued(&mut redis) == 0
        });
        let drain = back.elapsed().as_secs_f64();
        let delivered = receiver.ids_of("stream.completed").len();
        let _ = daemon.terminate();
        receiver.stop();
        self.figures.push(Figure {
            name: format!("events: Redis per event waiting in the outbox ({count} queued)"),
            value: format!(
                "{:.0} B, then {marker} B for a day once delivered",
                outbox as f64 / count as f64
            ),
            target: "—".into(),
            met: None,
        });
        self.figures.push(Figure {
            name: format!("events: webhook attempts during a {outage_seconds:.0} s outage with {count} events waiting"),
            value: format!("{attempts:.0}"),
            target: "one per backoff period, not per event".into(),
            met: Some(attempts < count as f64),
        });
        self.figures.push(Figure {
            name: format!("events: backlog of {count} drained after the webhook came back"),
            value: format!(
                "{drain:.1} s ({:.0} events/s), {delivered} distinct ids",
                count as f64 / drain
            ),
            target: format!("all {count}"),
            met: Some(delivered == count),
        });
    }

    /// The bandwidth cap, end to end and in the bucket itself: the rate the
    /// daemon achieves under `BANDWIDTH_LIMIT=20MiB` over 30 s (from the
    /// uploaded-bytes counter, 10 MiB chunks, so ±1 chunk of resolution), and
    /// how soon a `BANDWIDTH_SCHEDULE` boundary a few seconds ahead takes
    /// effect: in the daemon's gauge, and in the bytes four threads get
    /// through one shared bucket, in 100 ms windows.
    fn bandwidth(&mut self) {
        let limit = 20 * MIB;
        let seconds = if self.quick { 10.0 } else { 30.0 };
        let size = (limit as f64 * (seconds + 15.0)) as u64;
        let dir = tempfile::tempdir().expect("dir");
        let daemon = self.daemon(
            dir.path(),
            "bandwidth",
            &[("BANDWIDTH_LIMIT", "20MiB"), ("CHUNK_SIZE", "10MiB")],
        );
        let staged = self.files("bw", 1, size);
        std::fs::rename(
            staged.path().join("bw-000.mp4"),
            dir.path().join("bw-000.mp4"),
        )
        .expect("move in");
        let uploaded = || daemon.metric("chunkstream_uploaded_bytes_total");
        support::wait_for_long("the first chunk", Duration::from_secs(120), || {
            uploaded() > 0.0
        });
        let (start_bytes, start) = (uploaded(), Instant::now());
        std::thread::sleep(Duration::from_secs_f64(seconds));
        let rate = (uploaded() - start_bytes) / start.elapsed().as_secs_f64();
        let _ = daemon.terminate();
        let error = rate / limit as f64 - 1.0;
        self.figures.push(Figure {
            name: format!(
                "bandwidth: achieved rate over {seconds:.0} s with BANDWIDTH_LIMIT=20MiB, 4 workers"
            ),
            value: format!("{:.2} MiB/s ({:+.1} %)", rate / MIB as f64, error * 100.0),
            target: "20 MiB/s ± 10 %".into(),
            met: Some(error.abs() <= 0.10),
        });

        let (schedule, boundary_at) = schedule_from_soon();
        let dir = tempfile::tempdir().expect("dir");
        let daemon = self.daemon(
            dir.path(),
            "schedule",
            &[
                ("BANDWIDTH_LIMIT", "20MiB"),
                ("BANDWIDTH_SCHEDULE", &schedule),
            ],
        );
        let mut gauge_switch = None;
        while Instant::now() < boundary_at + Duration::from_secs(3) {
            if gauge_switch.is_none()
                && daemon.metric("chunkstream_bandwidth_limit_bytes") == (5 * MIB) as f64
            {
                gauge_switch = Some(Instant::now());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = daemon.terminate();
        let delay = |at: Option<Instant>, boundary: Instant| {
            at.map(|at| at.saturating_duration_since(boundary).as_secs_f64())
        };
        let gauge_delay = delay(gauge_switch, boundary_at);
        let (schedule, boundary_at) = schedule_from_soon();
        let policy = chunkstream::bandwidth::BandwidthPolicy::parse("20MiB", &schedule, "UTC")
            .expect("schedule parses");
        let bucket = Arc::new(chunkstream::bandwidth::Bandwidth::new(policy, 4));
        let moved = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let body = pseudo_random(10 * MIB, 3);
        let body = Arc::new(body);
        let readers: Vec<_> = (0..4)
            .map(|_| {
                let (bucket, moved, stop, body) =
                    (bucket.clone(), moved.clone(), stop.clone(), body.clone());
                std::thread::spawn(move || {
                    let mut buf = vec![0; 256 * 1024];
                    while !stop.load(Ordering::SeqCst) {
                        let mut reader = bucket.reader(&body);
                        while let Ok(n @ 1..) = std::io::Read::read(&mut reader, &mut buf) {
                            moved.fetch_add(n as u64, Ordering::SeqCst);
                            if stop.load(Ordering::SeqCst) {
                                break;
                            }
                        }
                    }
                })
            })
            .collect();
        // Samples until 3 s past the boundary, 100 ms apart.
        let until = boundary_at + Duration::from_secs(3);
        let mut samples = Vec::new();
        while Instant::now() < until {
            samples.push((Instant::now(), moved.load(Ordering::SeqCst)));
            std::thread::sleep(Duration::from_millis(100));
        }
        stop.store(true, Ordering::SeqCst);
        for reader in readers {
            reader.join().expect("reader");
        }
        // The first 100 ms window from which every window runs at or below
        // 5 MiB/s + 20 %.
        let rates: Vec<(Instant, f64)> = samples
            .windows(2)
            .map(|pair| {
                let dt = pair[1].0.duration_since(pair[0].0).as_secs_f64();
                (pair[0].0, (pair[1].1 - pair[0].1) as f64 / dt)
            })
            .collect();
        let slow = 5.0 * MIB as f64 * 1.2;
        let switched = (0..rates.len())
            .find(|&i| rates[i..].iter().all(|(_, rate)| *rate <= slow))
            .map(|i| rates[i].0);
        let bucket_delay = delay(switched, boundary_at);
        let before: Vec<f64> = rates
            .iter()
            .filter(|(at, _)| *at + Duration::from_secs(1) < boundary_at)
            .map(|(_, rate)| *rate / MIB as f64)
            .collect();
        let after: Vec<f64> = rates
            .iter()
            .filter(|(at, _)| *at > boundary_at + Duration::from_secs(1))
            .map(|(_, rate)| *rate / MIB as f64)
            .collect();
        let mean = |values: &[f64]| values.iter().sum::<f64>() / values.len().max(1) as f64;
        let show = |d: Option<f64>| d.map_or("never".to_string(), |d| format!("{d:.2} s"));
        self.figures.push(Figure {
            name: "bandwidth: schedule switch 20 → 5 MiB/s, gauge in the daemon".into(),
            value: show(gauge_delay),
            target: "≤ 1 s after the boundary".into(),
            met: Some(gauge_delay.is_some_and(|d| d <= 1.0)),
        });
        self.figures.push(Figure {
            name: "bandwidth: schedule switch 20 → 5 MiB/s, bytes through the shared bucket (4 threads, 100 ms windows)".into(),
            value: format!(
                "{} ({:.1} MiB/s before, {:.1} MiB/s after)",
                show(bucket_delay),
                mean(&before),
                mean(&after)
            ),
            target: "≤ 1 s after the boundary".into(),
            met: Some(bucket_delay.is_some_and(|d| d <= 1.0)),
        });
    }

    fn report(&self) -> String {
        let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
        let memory = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|info| {
                info.lines()
                    .next()
                    .map(|l| l.split_whitespace().nth(1).unwrap_or("0").to_string())
            })
            .and_then(|kib| kib.parse::<u64>().ok())
            .map_or("?".to_string(), |kib| {
                format!("{:.0} GiB", kib as f64 / 1024.0 / 1024.0)
            });
        let version = |tool: &str, flag: &str| {
            Command::new(tool)
                .arg(flag)
                .output()
                .ok()
                .and_then(|o| {
                    String::from_utf8_lossy(&o.stdout)
                        .lines()
                        .next()
                        .map(str::to_string)
                })
                .unwrap_or_else(|| "?".into())
        };
        let mut out = format!(
            "Run on {} with {cores} cores and {memory} of memory: chunkstream {}, {}, {}, s3s-fs 0.14.1, {}.{}\n\n",
            humantime::format_rfc3339_seconds(SystemTime::now()),
            env!("CARGO_PKG_VERSION"),
            version("rustc", "--version"),
            version("rclone", "version"),
            version("redis-server", "--version")
                .split(" sha=")
                .next()
                .unwrap_or("?"),
            if self.quick {
                " **Quick mode: small data sets, not comparable.**"
            } else {
                ""
            }
        );
        out.push_str("| figure | result | target | met |\n|---|---|---|---|\n");
        for figure in &self.figures {
            let met = match figure.met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "—",
            };
            out.push_str(&format!(
                "| {} | {} | {} | {met} |\n",
                figure.name, figure.value, figure.target
            ));
        }
        out.push('\n');
        for note in &self.notes {
            out.push_str(&format!("- {note}\n"));
        }
        out
    }
}

/// A `BANDWIDTH_SCHEDULE` of 5 MiB/s from a whole second about six seconds
/// ahead (UTC), and the instant of that boundary.
fn schedule_from_soon() -> (String, Instant) {
    let now = jiff::Timestamp::now();
    let boundary = jiff::Timestamp::from_second(now.as_second() + 6).expect("in range");
    let end = boundary + jiff::SignedDuration::from_secs(60);
    let hms = |t: jiff::Timestamp| t.strftime("%H:%M:%S").to_string();
    let ahead = Duration::from_millis((boundary.as_millisecond() - now.as_millisecond()) as u64);
    (
        format!("{}-{}=5MiB", hms(boundary), hms(end)),
        Instant::now() + ahead,
    )
}

const START: &str = "<!-- bench:results:start -->";
const END: &str = "<!-- bench:results:end -->";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let write_doc = args.iter().any(|a| a == "--write-doc");
    let only: Vec<&String> = args.iter().filter(|a| !a.starts_with("--")).collect();
    let binary = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/chunkstream");
    assert!(
        binary.is_file(),
        "build first: cargo build --release --locked"
    );
    let env = TestEnv::start().expect("redis-server and s3s-fs (scripts/test.sh installs them)");
    let mut bench = Bench {
        env,
        binary,
        quick,
        figures: Vec::new(),
        notes: Vec::new(),
    };
    let wanted = |name: &str| only.is_empty() || only.iter().any(|o| o.as_str() == name);
    if wanted("throughput") {
        bench.throughput_versus_rclone();
    }
    if wanted("growing") {
        bench.growing_files();
    }
    if wanted("memory") {
        bench.memory();
    }
    if wanted("polling") {
        bench.polling();
    }
    if wanted("events") {
        bench.events();
    }
    if wanted("bandwidth") {
        bench.bandwidth();
    }
    let report = bench.report();
    println!("{report}");
    if write_doc {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/benchmarks.md");
        let doc = std::fs::read_to_string(&path).expect("docs/benchmarks.md");
        let (head, rest) = doc.split_once(START).expect("results start marker");
        let (_, tail) = rest.split_once(END).expect("results end marker");
        std::fs::write(&path, format!("{head}{START}\n{report}{END}{tail}")).expect("write doc");
        println!("updated {}", path.display());
    }
}
