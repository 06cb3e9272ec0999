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

/// The children's CPU time (user + sys) from bash's `times`, whose second
/// line reads like `0m1.234s 0m0.567s`.
fn children_cpu_seconds(times: &str) -> f64 {
    let seconds = |field: &str| {
        let (minutes, rest) = field.split_once('m')?;
        Some(minutes.parse::<f64>().ok()? * 60.0 + rest.trim_end_matches('s').parse::<f64>().ok()?)
    };
    times
        .lines()
        .last()
        .map(|line| line.split_whitespace().filter_map(seconds).sum())
        .unwrap_or(0.0)
}

/// Copies every file of `data` into `pieces` of at most `size` bytes, the
/// objects the curl ceiling PUTs.
fn split_into_chunks(data: &Path, pieces: &Path, size: u64) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(data)
        .expect("data dir")
        .map(|entry| entry.expect("entry").path())
        .collect();
    files.sort();
    for file in files {
        let bytes = std::fs::read(&file).expect("read");
        for (index, piece) in bytes.chunks(size as usize).enumerate() {
            let name = file.file_name().expect("name").to_string_lossy();
            let path = pieces.join(format!("{name}.{index:03}"));
            std::fs::write(&path, piece).expect("write piece");
            out.push(path);
        }
    }
    out
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
        self.daemon_of(&self.binary, watch, run, overrides)
    }

    /// [`daemon`](Self::daemon), running `binary` (a wrapper, say).
    fn daemon_of(
        &self,
        binary: &Path,
        watch: &Path,
        run: &str,
        overrides: &[(&str, &str)],
    ) -> Daemon {
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
        Daemon::start_binary(binary, env, watch, None)
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

    /// rclone with the settings of one contender, timed, with its CPU time
    /// (user + sys, from the shell's `times`).
    fn rclone(&self, rclone: &Path, data: &Path, target: &str, extra: &[&str]) -> (f64, f64) {
        let started = Instant::now();
        let output = Command::new("bash")
            .arg("-c")
            .arg(r#""$@" >/dev/null || exit 1; times"#)
            .arg("bash")
            .arg(rclone)
            .arg("copy")
            .arg(data)
            .arg(format!("bench:{BUCKET}/{target}"))
            .args(["--transfers", "4", "--s3-chunk-size", "10M"])
            .args(extra)
            // A CA bundle from the environment breaks rclone's plain-HTTP client.
            .env_remove("AWS_CA_BUNDLE")
            .env("RCLONE_CONFIG_BENCH_TYPE", "s3")
            .env("RCLONE_CONFIG_BENCH_PROVIDER", "Other")
            .env("RCLONE_CONFIG_BENCH_ENDPOINT", self.env.s3.endpoint())
            .env("RCLONE_CONFIG_BENCH_ACCESS_KEY_ID", support::ACCESS_KEY)
            .env("RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY", support::SECRET_KEY)
            .env("RCLONE_CONFIG_BENCH_REGION", "us-east-1")
            .env("RCLONE_CONFIG_BENCH_FORCE_PATH_STYLE", "true")
            .output()
            .expect("rclone runs");
        let elapsed = started.elapsed().as_secs_f64();
        assert!(output.status.success(), "rclone copy failed");
        (
            elapsed,
            children_cpu_seconds(&String::from_utf8_lossy(&output.stdout)),
        )
    }

    /// The server's ceiling: the same bytes in 10 MiB pieces, PUT by four
    /// curl processes at a time, signed with `UNSIGNED-PAYLOAD` so curl
    /// hashes nothing. Returns the seconds it took.
    /// The server's ceiling: `pieces` PUT by 4 parallel curl processes that
    /// hash nothing. With `checksums` (each piece's sha256 in base64), every
    /// PUT carries `x-amz-checksum-sha256` as chunkstream's do, so the server
    /// verifies it: the ceiling for a client that asks for that check.
    fn curl_ceiling(&self, pieces: &[PathBuf], checksums: Option<&[String]>, target: &str) -> f64 {
        let next = AtomicU64::new(0);
        let started = Instant::now();
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    loop {
                        let number = next.fetch_add(1, Ordering::SeqCst) as usize;
                        let Some(piece) = pieces.get(number) else {
                            break;
                        };
                        let name = piece.file_name().expect("name").to_string_lossy();
                        let mut curl = Command::new("curl");
                        if let Some(checksums) = checksums {
                            curl.args([
                                "-H",
                                &format!("x-amz-checksum-sha256: {}", checksums[number]),
                            ]);
                        }
                        let status = curl
                            .args(["-sS", "-f", "-o", "/dev/null", "--upload-file"])
                            .arg(piece)
                            .args(["--aws-sigv4", "aws:amz:us-east-1:s3", "--user"])
                            .arg(format!("{}:{}", support::ACCESS_KEY, support::SECRET_KEY))
                            .args(["-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD"])
                            .arg(format!(
                                "{}/{BUCKET}/{target}/{name}",
                                self.env.s3.endpoint()
                            ))
                            .status()
                            .expect("curl runs");
                        assert!(status.success(), "curl PUT failed");
                    }
                });
            }
        });
        started.elapsed().as_secs_f64()
    }

    /// Figures of the throughput comparison: every contender runs once per
    /// round, alternating, and the medians are compared, because wall times
    /// on a shared machine swing by tens of percent between minutes.
    fn throughput_versus_rclone(&mut self) {
        let (count, size) = if self.quick {
            (4, 16 * MIB)
        } else {
            (8, 64 * MIB)
        };
        let data = self.files("tp", count, size);
        let pieces_dir = tempfile::tempdir().expect("dir");
        let pieces = split_into_chunks(data.path(), pieces_dir.path(), 10 * MIB);
        let checksums: Vec<String> = pieces
            .iter()
            .map(|piece| {
                use base64::Engine as _;
                use sha2::Digest as _;
                let digest = sha2::Sha256::digest(std::fs::read(piece).expect("piece"));
                base64::engine::general_purpose::STANDARD.encode(digest)
            })
            .collect();
        let rclone =
            support::require_tool("rclone").expect("rclone (scripts/bench.sh installs it)");
        let full_chunk_bytes = count as u64 * (size / (10 * MIB)) * 10 * MIB;
        let mut runs: BTreeMap<&str, Vec<(f64, f64)>> = BTreeMap::new();
        let mut upload_phases = Vec::new();
        let mut start_ups = Vec::new();
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
                let (start_up, upload_phase) = Self::wait_completed_timing_uploads(
                    &daemon,
                    started,
                    count as f64,
                    full_chunk_bytes as f64,
                );
                let elapsed = started.elapsed().as_secs_f64();
                if md5 == "auto" {
                    upload_phases.push(upload_phase);
                    start_ups.push(start_up);
                }
                runs.entry(if md5 == "auto" { "ours" } else { "ours-md5" })
                    .or_default()
                    .push((elapsed, cpu_seconds(daemon.process.pid())));
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
            let single = self.rclone(&rclone, data.path(), &format!("rclone-{round}"), &[]);
            runs.entry("rclone").or_default().push(single);
            let multipart = self.rclone(
                &rclone,
                data.path(),
                &format!("rclone-mp-{round}"),
                &["--s3-upload-cutoff", "10M"],
            );
            runs.entry("rclone-multipart").or_default().push(multipart);
            let ceiling = self.curl_ceiling(&pieces, None, &format!("curl-{round}"));
            runs.entry("curl").or_default().push((ceiling, 0.0));
            let checked =
                self.curl_ceiling(&pieces, Some(&checksums), &format!("curl-checksum-{round}"));
            runs.entry("curl-checksum")
                .or_default()
                .push((checked, 0.0));
        }
        let total_mib = (count as u64 * size / MIB) as f64;
        let gib = total_mib / 1024.0;
        let time = |name: &str| median(&mut runs[name].iter().map(|r| r.0).collect::<Vec<_>>());
        let cpu =
            |name: &str| median(&mut runs[name].iter().map(|r| r.1).collect::<Vec<_>>()) / gib;
        for (name, label) in [
            ("ours", "chunkstream"),
            ("ours-md5", "chunkstream, S3_CONTENT_MD5=always"),
            ("rclone", "rclone (single PUT per file)"),
            (
                "rclone-multipart",
                "rclone --s3-upload-cutoff 10M (multipart)",
            ),
            ("curl", "4 × curl PUT of 10 MiB pieces (the ceiling)"),
            (
                "curl-checksum",
                "the same with x-amz-checksum-sha256, which the server verifies",
            ),
        ] {
            self.notes.push(format!(
                "{label}, runs (s): {}; CPU (user + sys) per GiB, median: {}.",
                runs[name]
                    .iter()
                    .map(|r| format!("{:.2}", r.0))
                    .collect::<Vec<_>>()
                    .join(" / "),
                if name.starts_with("curl") {
                    "not measured".to_string()
                } else {
                    format!("{:.2} s", cpu(name))
                }
            ));
        }
        let runs_of = |times: &[f64]| {
            times
                .iter()
                .map(|t| format!("{t:.2}"))
                .collect::<Vec<_>>()
                .join(" / ")
        };
        self.notes.push(format!(
            "Throughput: {count} × {} MiB. chunkstream's time includes start-up, STREAM_TIMEOUT (1 s) and the completion check. Its start-up (process start until /readyz answers 200: Redis, the bucket and checksum probes) took {} s; its upload phase (from there until every full chunk is uploaded) {} s.",
            size / MIB,
            runs_of(&start_ups),
            runs_of(&upload_phases)
        ));
        for (versus, label) in [
            ("rclone", "rclone"),
            ("rclone-multipart", "rclone multipart"),
        ] {
            let ratio = time("ours") / time(versus);
            self.figures.push(Figure {
                name: format!(
                    "time for {count}×{} MiB, chunkstream / {label} (median of 3)",
                    size / MIB
                ),
                value: format!(
                    "{:.2} s / {:.2} s = {ratio:.2} ({:.0} vs {:.0} MiB/s)",
                    time("ours"),
                    time(versus),
                    total_mib / time("ours"),
                    total_mib / time(versus)
                ),
                target: "≤ 0.9".into(),
                met: Some(ratio <= 0.9),
            });
            let cpu_ratio = cpu("ours") / cpu(versus);
            self.figures.push(Figure {
                name: format!("CPU (user + sys) per GiB, chunkstream / {label}"),
                value: format!(
                    "{:.2} s / {:.2} s = {cpu_ratio:.2}",
                    cpu("ours"),
                    cpu(versus)
                ),
                target: "≤ 0.5".into(),
                met: Some(cpu_ratio <= 0.5),
            });
        }
        let ceiling_rate = total_mib / time("curl");
        let upload_rate = full_chunk_bytes as f64 / MIB as f64 / median(&mut upload_phases);
        self.figures.push(Figure {
            name:
                "upload phase (from readiness) / the server's ceiling (4 × curl, UNSIGNED-PAYLOAD)"
                    .into(),
            value: format!(
                "{upload_rate:.0} / {ceiling_rate:.0} MiB/s = {:.2}",
                upload_rate / ceiling_rate
            ),
            target: "≥ 0.9".into(),
            met: Some(upload_rate / ceiling_rate >= 0.9),
        });
        let checked_rate = total_mib / time("curl-checksum");
        self.figures.push(Figure {
            name: "upload phase / the ceiling when the server verifies x-amz-checksum-sha256 (as for every chunkstream PUT)".into(),
            value: format!(
                "{upload_rate:.0} / {checked_rate:.0} MiB/s = {:.2}",
                upload_rate / checked_rate
            ),
            target: "—".into(),
            met: None,
        });
        self.figures.push(Figure {
            name: "end to end / the server's ceiling (includes STREAM_TIMEOUT 1 s)".into(),
            value: format!(
                "{:.0} / {ceiling_rate:.0} MiB/s = {:.2}",
                total_mib / time("ours"),
                time("curl") / time("ours")
            ),
            target: "—".into(),
            met: None,
        });
        self.figures.push(Figure {
            name: "S3_CONTENT_MD5=always: time and CPU per GiB against the default".into(),
            value: format!(
                "{:.2} s / {:.2} s; {:.2} s / {:.2} s per GiB",
                time("ours-md5"),
                time("ours"),
                cpu("ours-md5"),
                cpu("ours")
            ),
            target: "—".into(),
            met: None,
        });
        self.figures.push(Figure {
            name: "Redis round trips per chunk (all of them, over chunks)".into(),
            value: format!("{round_trips_per_chunk:.2}"),
            target: "≤ 2".into(),
            met: Some(round_trips_per_chunk <= 2.0),
        });
    }

    /// Waits for `count` completed streams and returns the start-up (from
    /// process start until `/readyz` answers 200) and the upload phase (from
    /// there until `full_chunk_bytes` were uploaded), in seconds.
    fn wait_completed_timing_uploads(
        daemon: &Daemon,
        started: Instant,
        count: f64,
        full_chunk_bytes: f64,
    ) -> (f64, f64) {
        let mut ready = None;
        let mut uploaded = None;
        support::wait_for_long(
            &format!("{count} completed streams"),
            Duration::from_secs(1800),
            || {
                if ready.is_none() && daemon.http("GET", "/readyz").0 == 200 {
                    ready = Some(started.elapsed().as_secs_f64());
                }
                if uploaded.is_none()
                    && daemon.metric("chunkstream_uploaded_bytes_total") >= full_chunk_bytes
                {
                    uploaded = Some(started.elapsed().as_secs_f64());
                }
                Self::completed(daemon) >= count
            },
        );
        let end = started.elapsed().as_secs_f64();
        let ready = ready.unwrap_or(end);
        (ready, uploaded.unwrap_or(end) - ready)
    }

    /// 200 streams that complete at the same moment, as when every camera
    /// of a site rolls its recording over on the hour: each file already has
    /// a full chunk uploaded, then all get their last bytes at once. The
    /// figure is the time from that last write until every stream is
    /// complete (metadata.json written).
    fn completion_burst(&mut self) {
        let streams: usize = if self.quick { 40 } else { 200 };
        let dir = tempfile::tempdir().expect("dir");
        let daemon = self.daemon(dir.path(), "burst", &[]);
        let path = |n: usize| dir.path().join(format!("cam{n:03}.mp4"));
        let block = pseudo_random(10 * MIB, 11);
        for n in 0..streams {
            let mut head = block.clone();
            head[..8].copy_from_slice(&(n as u64).to_le_bytes());
            support::append(&path(n), &head);
        }
        // Keep every file growing (a little, every 300 ms) until each has
        // its first chunk uploaded.
        let mut tick = 0u64;
        support::wait_for_long(
            "every burst stream's chunk 0 uploaded",
            Duration::from_secs(1800),
            || {
                tick += 1;
                for n in 0..streams {
                    support::append(&path(n), &tick.to_le_bytes());
                }
                std::thread::sleep(Duration::from_millis(300));
                daemon.metric("chunkstream_chunks_uploaded_total") >= streams as f64
            },
        );
        // A stream that went quiet while the harness was slow completed
        // already; the last write reopens it, and it completes once more.
        let earlier = Self::completed(&daemon);
        let tail = pseudo_random(64 * 1024, 12);
        for n in 0..streams {
            support::append(&path(n), &tail);
        }
        let last_write = Instant::now();
        let mut first = None;
        while Self::completed(&daemon) < earlier + streams as f64 {
            if first.is_none() && Self::completed(&daemon) > earlier {
                first = Some(last_write.elapsed().as_secs_f64());
            }
            assert!(
                last_write.elapsed() < Duration::from_secs(600),
                "burst stuck"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let last = last_write.elapsed().as_secs_f64();
        let _ = daemon.terminate();
        let bound = 1.0 + 0.2 + 2.0;
        self.figures.push(Figure {
            name: format!(
                "{streams} streams completing at once (10 MiB + 64 KiB each): first / last metadata.json after the last write"
            ),
            value: format!("{:.2} s / {last:.2} s", first.unwrap_or(last)),
            target: format!("last ≤ STREAM_TIMEOUT + POLL_INTERVAL + 2 s = {bound:.1} s"),
            met: Some(last <= bound),
        });
    }

    /// Counted work, repeatable where wall and CPU times are not: the
    /// instructions the worker pool executes (callgrind, collecting only
    /// inside `Worker::execute_supervised`) to upload and complete 2 files of
    /// 16 MiB, once unchanged and once with a header byte rewritten before
    /// completion (ffmpeg's mdat patch).
    fn instructions(&mut self) {
        let valgrind = support::require_tool("valgrind").expect("valgrind");
        let mib_per_file = if self.quick { 12 } else { 16 };
        for (label, patch) in [("unchanged files", false), ("chunk 0 patched", true)] {
            let work = tempfile::tempdir().expect("dir");
            let out = work.path().join("callgrind.out");
            let wrapper = work.path().join("chunkstream-under-callgrind");
            std::fs::write(
                &wrapper,
                format!(
                    "#!/bin/sh\nexec {} --tool=callgrind --callgrind-out-file={} '--toggle-collect=*Worker*execute_supervised*' {} \"$@\"\n",
                    valgrind.display(),
                    out.display(),
                    self.binary.display()
                ),
            )
            .expect("wrapper");
            std::fs::set_permissions(
                &wrapper,
                std::os::unix::fs::PermissionsExt::from_mode(0o755),
            )
            .expect("chmod");
            let watch = tempfile::tempdir().expect("dir");
            let daemon = self.daemon_of(
                &wrapper,
                watch.path(),
                &format!("ir-{patch}"),
                &[
                    // Long enough that every full chunk goes up before the
                    // completion check, even under valgrind.
                    ("STREAM_TIMEOUT", "60s"),
                    ("POLL_INTERVAL", "500ms"),
                    ("WORKERS", "2"),
                    ("CHUNK_SIZE", "5MiB"),
                ],
            );
            for n in 0..2u64 {
                let mut bytes = pseudo_random(mib_per_file * MIB, 20 + n);
                let path = watch.path().join(format!("ir{n}.mp4"));
                if patch {
                    // Uploaded with one header, completed with another.
                    bytes[40] ^= 0xff;
                    std::fs::write(&path, &bytes).expect("write");
                    let full = (mib_per_file / 5) as f64 * 2.0;
                    if n == 1 {
                        support::wait_for_long("full chunks", Duration::from_secs(900), || {
                            daemon.metric("chunkstream_chunks_uploaded_total") >= full
                        });
                        for m in 0..2u64 {
                            let path = watch.path().join(format!("ir{m}.mp4"));
                            let mut patched = std::fs::read(&path).expect("read");
                            patched[40] ^= 0xff;
                            std::fs::write(&path, &patched).expect("write");
                        }
                    }
                } else {
                    std::fs::write(&path, &bytes).expect("write");
                }
            }
            support::wait_for_long("2 completed streams", Duration::from_secs(1800), || {
                Self::completed(&daemon) >= 2.0
            });
            let _ = daemon.terminate();
            let profile = std::fs::read_to_string(&out).unwrap_or_default();
            let instructions: u64 = profile
                .lines()
                .find_map(|line| {
                    line.strip_prefix("summary:")
                        .or(line.strip_prefix("totals:"))
                })
                .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
                .unwrap_or(0);
            let bytes = 2 * mib_per_file * MIB;
            self.figures.push(Figure {
                name: format!(
                    "instructions in the worker pool per uploaded byte, 2 × {mib_per_file} MiB, {label} (callgrind)"
                ),
                value: format!("{:.1}", instructions as f64 / bytes as f64),
                target: "—".into(),
                met: None,
            });
        }
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
    // BENCH_BINARY measures another build (a "before" row) with this harness.
    let binary = std::env::var_os("BENCH_BINARY").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/chunkstream"),
        PathBuf::from,
    );
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
    if wanted("instructions") {
        bench.instructions();
    }
    if wanted("burst") {
        bench.completion_burst();
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
