//! The soak benchmark (docs/benchmarks.md): many short streams through
//! the real binary, a real `redis-server` and `s3s-fs`, to show that Redis
//! and the daemon stay bounded.
//!
//! It drops `--streams N` small files (default 10,000), waits until every
//! stream is complete, and reads Redis `used_memory` (per complete stream,
//! above the empty baseline) and the keys left. Then it deletes every file,
//! waits for `RECORD_RETENTION`, and reads them again: nothing of the
//! streams may be left (leaked keys). The daemon's RSS is sampled
//! throughout. It prints figures and fails only on leaked keys; with
//! `--write-doc` it replaces the soak section of docs/benchmarks.md.

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use support::{Daemon, TestEnv, pseudo_random};

const START: &str = "<!-- soak:results:start -->";
const END: &str = "<!-- soak:results:end -->";
const PREFIX: &str = "soak";
const RETENTION: Duration = Duration::from_secs(30);
/// Files per directory, as a recorder would spread them.
const PER_DIRECTORY: usize = 500;
/// Bytes per file: one short chunk.
const FILE_SIZE: u64 = 64 * 1024;

/// Current resident set size of a live process (VmRSS), in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

fn used_memory(connection: &mut redis::Connection) -> u64 {
    let info: String = redis::cmd("INFO").arg("memory").query(connection).unwrap();
    info.lines()
        .find_map(|line| line.strip_prefix("used_memory:"))
        .and_then(|value| value.trim().parse().ok())
        .expect("used_memory")
}

fn keys(connection: &mut redis::Connection) -> Vec<String> {
    let mut keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{PREFIX}:*"))
        .query(connection)
        .unwrap();
    keys.sort();
    keys
}

/// Keys of streams (records, chunk records, leases): what must not leak.
fn stream_keys(keys: &[String]) -> Vec<&String> {
    keys.iter()
        .filter(|key| key.contains(":stream:") || key.contains(":lease:"))
        .collect()
}

/// Keeps the daemon's RSS over time: (seconds since start, bytes).
struct RssSeries {
    started: Instant,
    samples: Vec<(f64, u64)>,
}

impl RssSeries {
    fn sample(&mut self, daemon: &Daemon) {
        self.samples.push((
            self.started.elapsed().as_secs_f64(),
            rss(daemon.process.pid()),
        ));
    }

    fn wait(
        &mut self,
        daemon: &Daemon,
        what: &str,
        limit: Duration,
        mut done: impl FnMut() -> bool,
    ) {
        let deadline = Instant::now() + limit;
        let mut next_sample = Instant::now();
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            if Instant::now() >= next_sample {
                self.sample(daemon);
                next_sample += Duration::from_secs(5);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        self.sample(daemon);
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let write_doc = args.iter().any(|a| a == "--write-doc");
    let streams: usize = args
        .iter()
        .position(|a| a == "--streams")
        .and_then(|i| args.get(i + 1)?.parse().ok())
        .unwrap_or(10_000);
    let binary: PathBuf = args
        .iter()
        .position(|a| a == "--binary")
        .and_then(|i| args.get(i + 1))
        .map_or_else(
            || Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/chunkstream"),
            PathBuf::from,
        );
    let binary = binary
        .canonicalize()
        .unwrap_or_else(|err| panic!("no binary at {}: {err}", binary.display()));

    let env = TestEnv::start().expect("redis-server and s3s-fs (scripts/test.sh installs them)");
    let mut redis = env.redis.connection();
    let mut daemon_env = env.daemon_env();
    for (key, value) in [
        ("REDIS_KEY_PREFIX", PREFIX),
        ("LOG_LEVEL", "warn"),
        ("POLL_INTERVAL", "500ms"),
        ("STREAM_TIMEOUT", "2s"),
        ("WORKERS", "8"),
        ("RECORD_RETENTION", "30s"),
    ] {
        daemon_env.insert(key.into(), value.into());
    }
    let daemon = Daemon::start_binary(&binary, daemon_env, env.watch.path(), None);
    std::thread::sleep(Duration::from_secs(2));
    let baseline = used_memory(&mut redis);
    let baseline_keys = keys(&mut redis);
    let mut series = RssSeries {
        started: Instant::now(),
        samples: Vec::new(),
    };
    series.sample(&daemon);

    let began = Instant::now();
    for n in 0..streams {
        let rel = format!("cam{:03}/rec-{n:05}.mp4", n / PER_DIRECTORY);
        env.drop_file(&rel, &pseudo_random(FILE_SIZE, n as u64));
    }
    let complete =
        |daemon: &Daemon| daemon.metric("chunkstream_streams_completed_total{status=\"complete\"}");
    series.wait(
        &daemon,
        "every stream complete",
        Duration::from_secs(3 * 3600),
        || complete(&daemon) >= streams as f64,
    );
    let took = began.elapsed();
    // Let the last completions' writes settle.
    std::thread::sleep(Duration::from_secs(3));
    let after_completion = used_memory(&mut redis);
    let completed_keys = keys(&mut redis);
    let chunk_hashes = completed_keys
        .iter()
        .filter(|k| k.ends_with(":chunks"))
        .count();
    let leases = completed_keys
        .iter()
        .filter(|k| k.contains(":lease:"))
        .count();
    let records: Vec<&String> = completed_keys
        .iter()
        .filter(|k| k.contains(":stream:") && !k.ends_with(":chunks"))
        .collect();
    let record_bytes: u64 = records
        .iter()
        .take(1000)
        .map(|key| {
            redis::cmd("MEMORY")
                .arg("USAGE")
                .arg(key.as_str())
                .query::<u64>(&mut redis)
                .unwrap()
        })
        .sum::<u64>()
        / records.len().clamp(1, 1000) as u64;
    let identities: u64 = redis::cmd("HLEN")
        .arg(format!("{PREFIX}:identities"))
        .query(&mut redis)
        .unwrap();
    let per_stream = after_completion.saturating_sub(baseline) / streams as u64;
    let rss_complete = rss(daemon.process.pid());

    // Every file goes; after the vanish grace and RECORD_RETENTION nothing
    // of the streams may be left.
    let deleted_at = Instant::now();
    for entry in std::fs::read_dir(env.watch.path()).unwrap() {
        std::fs::remove_dir_all(entry.unwrap().path()).unwrap();
    }
    series.wait(&daemon, "every record expired", RETENTION * 20, || {
        stream_keys(&keys(&mut redis)).is_empty()
    });
    let expired_after = deleted_at.elapsed();
    let after_retention = used_memory(&mut redis);
    let final_keys = keys(&mut redis);
    let leaked: Vec<String> = final_keys
        .iter()
        .filter(|key| !baseline_keys.contains(key) && !key.ends_with(":identities"))
        .cloned()
        .collect();
    let identities_left: u64 = redis::cmd("HLEN")
        .arg(format!("{PREFIX}:identities"))
        .query(&mut redis)
        .unwrap();
    let rss_end = rss(daemon.process.pid());
    let peak = series
        .samples
        .iter()
        .map(|(_, bytes)| *bytes)
        .max()
        .unwrap_or(0);
    let (status, _) = daemon.terminate();

    let mut report = format!(
        "Run on {} with {} cores: {streams} streams of {} KiB, WORKERS=8, POLL_INTERVAL=500ms, STREAM_TIMEOUT=2s, RECORD_RETENTION=30s, `{}`.\n\n",
        humantime::format_rfc3339_seconds(SystemTime::now()),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        FILE_SIZE / 1024,
        binary
            .strip_prefix(env!("CARGO_MANIFEST_DIR"))
            .unwrap_or(&binary)
            .display(),
    );
    report.push_str("| figure | result | target |\n|---|---|---|\n");
    let rows = [
        (
            "streams completed",
            format!("{streams} in {:.0} s", took.as_secs_f64()),
            String::new(),
        ),
        (
            "Redis `used_memory` per complete stream, file present (above the empty baseline)",
            format!("{per_stream} B"),
            "≤ 512 B".into(),
        ),
        (
            "`MEMORY USAGE` of one compact record (mean of up to 1000)",
            format!("{record_bytes} B"),
            String::new(),
        ),
        (
            "identity entries / chunk-record hashes / leases once complete",
            format!("{identities} / {chunk_hashes} / {leases}"),
            format!("{streams} / 0 / 0"),
        ),
        (
            "Redis `used_memory` after deletion + RECORD_RETENTION, above the baseline",
            format!("{} B", after_retention.saturating_sub(baseline) as i64),
            "≈ 0".into(),
        ),
        (
            "records gone after the files were deleted",
            format!("{:.0} s", expired_after.as_secs_f64()),
            "≤ grace + 30 s + poll".into(),
        ),
        (
            "leaked keys (stream keys, leases, identity entries left)",
            format!("{} keys, {identities_left} identity entries", leaked.len()),
            "none".into(),
        ),
        (
            "daemon RSS: start / all complete / peak / end",
            format!(
                "{} / {} / {} / {}",
                mib(series.samples[0].1),
                mib(rss_complete),
                mib(peak),
                mib(rss_end)
            ),
            String::new(),
        ),
    ];
    for (name, value, target) in rows {
        report.push_str(&format!("| {name} | {value} | {target} |\n"));
    }
    report.push_str("\nRSS over time (seconds since the first file: MiB): ");
    let step = (series.samples.len() / 12).max(1);
    let points: Vec<String> = series
        .samples
        .iter()
        .step_by(step)
        .map(|(at, bytes)| format!("{at:.0}s: {:.1}", *bytes as f64 / (1024.0 * 1024.0)))
        .collect();
    report.push_str(&points.join(", "));
    report.push('\n');
    println!("{report}");
    if !leaked.is_empty() {
        println!("leaked: {:?}", &leaked[..leaked.len().min(20)]);
    }
    if write_doc {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/benchmarks.md");
        let doc = std::fs::read_to_string(&path).expect("docs/benchmarks.md");
        let (head, rest) = doc.split_once(START).expect("soak start marker");
        let (_, tail) = rest.split_once(END).expect("soak end marker");
        std::fs::write(&path, format!("{head}{START}\n{report}{END}{tail}")).expect("write doc");
        println!("updated {}", path.display());
    }
    assert!(status.success(), "the daemon drained cleanly");
    assert!(leaked.is_empty() && identities_left == 0, "leaked keys");
}
