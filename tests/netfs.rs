//! chunkstream on a real network file system: the test bed in
//! tests/testbeds/netfs (a loopback sshd exporting a directory over SFTP,
//! mounted with sshfs), with the recording written on the server side and
//! chunkstream polling the mount, while the server goes down, freezes, or the
//! mount dies, drops away or loses its permissions.
//!
//! Every scenario ends the same way: the recording is complete in the bucket,
//! its chunk objects concatenated equal the server's file byte for byte, it
//! is exactly one stream, and no stream was closed as incomplete.
//!
//! Each test has its own test bed (own port, own temp dir), Redis and S3
//! server, so the tests run in parallel. Needs `openssh-server
//! openssh-client sshfs fuse3` and `/dev/fuse` (scripts/test.sh installs
//! them); outside CI a missing tool skips, with `CI=true` it fails.

mod support;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use support::{
    Daemon, MIB, TestEnv, chunkstream_binary, free_port, pseudo_random, require_tool,
    running_as_root, wait_for, wait_for_long,
};
use tempfile::TempDir;

/// The outage lengths the issue names.
const SERVER_OUTAGE: Duration = Duration::from_secs(20);
const FREEZE: Duration = Duration::from_secs(15);
const PERMISSION_LOSS: Duration = Duration::from_secs(10);
/// Longer than the test's `STREAM_TIMEOUT` (the vanish grace too), so that a
/// fault that lasts this long would have closed a stream before the fix.
const STREAM_TIMEOUT: &str = "3s";
const LONGER_THAN_STREAM_TIMEOUT: Duration = Duration::from_secs(6);

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// One test bed: a server directory exported by its own sshd and mounted
/// with sshfs. Stopped (unmounted, sshd ended) when dropped.
struct NetFs {
    root: TempDir,
    port: u16,
    settings: Vec<(String, String)>,
    /// Where sshfs mounts, and what chunkstream watches: the mount itself,
    /// or the directory above it.
    mount: PathBuf,
    watch: PathBuf,
}

impl NetFs {
    /// A test bed with `NETFS_*` `settings`, not started yet.
    fn new(settings: &[(&str, &str)]) -> Self {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().expect("test bed root");
        // chunkstream runs as uid 10001 and must reach the mount point.
        std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod test bed root");
        std::fs::create_dir_all(root.path().join("server")).expect("server dir");
        let mount = root.path().join("mnt");
        Self {
            port: free_port(),
            settings: settings
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            watch: mount.clone(),
            mount,
            root,
        }
    }

    /// Mounts at `watch/cams` and has chunkstream watch `watch`: one mount
    /// per camera below a local watch directory.
    fn mounted_below_watch(mut self) -> Self {
        self.watch = self.root.path().join("watch");
        self.mount = self.watch.join("cams");
        std::fs::create_dir_all(&self.mount).expect("mount point");
        let mount = self.mount.display().to_string();
        self.settings.push(("NETFS_MOUNT".to_string(), mount));
        self
    }

    /// Starts sshd and mounts. `None` (skip) when a tool is missing outside CI.
    fn start(self) -> Option<Self> {
        let output = self.script("start.sh", &[]);
        if output.status.success() {
            return Some(self);
        }
        let stderr = String::from_utf8_lossy(&output.stderr);
        if stderr.contains("error: missing:") && !in_ci() {
            eprintln!("skipping: {stderr}");
            return None;
        }
        panic!(
            "the netfs test bed did not start:\n{}{stderr}",
            String::from_utf8_lossy(&output.stdout)
        );
    }

    fn script(&self, name: &str, args: &[&str]) -> std::process::Output {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/testbeds/netfs");
        Command::new(dir.join(name))
            .args(args)
            .env("NETFS_ROOT", self.root.path())
            .env("NETFS_PORT", self.port.to_string())
            .envs(self.settings.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .output()
            .expect("test bed script runs")
    }

    /// `fault.sh args`, which must succeed.
    fn fault(&self, args: &[&str]) {
        let output = self.script("fault.sh", args);
        assert!(
            output.status.success(),
            "fault.sh {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    fn server(&self) -> PathBuf {
        self.root.path().join("server")
    }

    fn mount(&self) -> PathBuf {
        self.mount.clone()
    }
}

impl Drop for NetFs {
    fn drop(&mut self) {
        // Thawed first, so that nothing hangs on a frozen server.
        let _ = self.script("fault.sh", &["thaw"]);
        let output = self.script("stop.sh", &[]);
        if !output.status.success() {
            eprintln!(
                "netfs stop.sh failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
}

/// Something writing a recording on the server side.
enum Writer {
    /// ffmpeg encoding a live test picture in real time (~1.25 MB/s).
    Ffmpeg(Child),
    /// A thread appending 256 KiB every 200 ms until told to stop.
    Bytes {
        stop: Arc<AtomicBool>,
        thread: JoinHandle<()>,
    },
}

impl Writer {
    fn ffmpeg(ffmpeg: &Path, target: &Path, seconds: u64) -> Self {
        let child = Command::new(ffmpeg)
            .args(["-hide_banner", "-loglevel", "error", "-y", "-re"])
            .args([
                "-f",
                "lavfi",
                "-i",
                "testsrc2=size=640x360:rate=25,noise=alls=30:allf=t",
            ])
            .args(["-t", &seconds.to_string()])
            .args(["-c:v", "libx264", "-preset", "ultrafast", "-b:v", "10M"])
            .args(["-maxrate", "10M", "-bufsize", "5M", "-pix_fmt", "yuv420p"])
            .arg(target)
            .stdin(Stdio::null())
            .spawn()
            .expect("ffmpeg starts");
        Writer::Ffmpeg(child)
    }

    fn bytes(target: &Path) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        // Opened once, like a camera: losing the directory's permissions
        // does not stop the writer.
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(target)
            .expect("open the recording");
        let thread = std::thread::spawn(move || {
            let mut seed = 1;
            while !stopping.load(Ordering::SeqCst) {
                file.write_all(&pseudo_random(256 * 1024, seed))
                    .expect("append");
                file.sync_all().expect("sync");
                seed += 1;
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        Writer::Bytes { stop, thread }
    }

    /// Lets the writer go on for `more` (ffmpeg: until its end), then ends it.
    fn finish(self, more: Duration) {
        match self {
            Writer::Ffmpeg(mut child) => {
                let status = child.wait().expect("ffmpeg runs");
                assert!(status.success(), "ffmpeg failed");
            }
            Writer::Bytes { stop, thread } => {
                std::thread::sleep(more);
                stop.store(true, Ordering::SeqCst);
                thread.join().expect("writer thread");
            }
        }
    }
}

/// A test bed, the servers, and chunkstream polling the mount. Dropped in
/// this order: chunkstream, the mount, the servers.
struct Scenario {
    daemon: Daemon,
    netfs: NetFs,
    env: TestEnv,
}

impl Scenario {
    /// Starts everything; `prepare` runs on the server directory before the
    /// mount exists. `None` (skip) when a tool is missing outside CI.
    fn start(netfs_settings: &[(&str, &str)], prepare: impl FnOnce(&Path)) -> Option<Self> {
        Self::start_on(NetFs::new(netfs_settings), prepare)
    }

    /// Like `start`, on a test bed set up already.
    fn start_on(netfs: NetFs, prepare: impl FnOnce(&Path)) -> Option<Self> {
        let env = TestEnv::start()?;
        prepare(&netfs.server());
        let netfs = netfs.start()?;
        let mut daemon_env = env.daemon_env();
        for (key, value) in [
            ("WATCH_DIR", netfs.watch.display().to_string()),
            ("STREAM_TIMEOUT", STREAM_TIMEOUT.to_string()),
            ("POLL_INTERVAL", "200ms".to_string()),
            ("LOG_FORMAT", "json".to_string()),
        ] {
            daemon_env.insert(key.to_string(), value);
        }
        // Not root, so that permissions apply to chunkstream.
        let user = running_as_root().then_some(10001);
        let daemon = Daemon::start_binary(&chunkstream_binary(), daemon_env, Path::new("/"), user);
        Some(Self { daemon, netfs, env })
    }

    fn source(&self, name: &str) -> PathBuf {
        self.netfs.server().join(name)
    }

    /// The recording's path relative to `WATCH_DIR`.
    fn rel(&self, name: &str) -> String {
        let mount = self.netfs.mount.strip_prefix(&self.netfs.watch);
        let below = mount.expect("the mount is at or below WATCH_DIR");
        below.join(name).display().to_string()
    }

    /// Waits until chunkstream uploaded `n` chunks: the recording is a
    /// stream with data in the bucket before the fault.
    fn wait_for_chunks(&self, n: f64) {
        wait_for(&format!("{n} chunks uploaded"), || {
            self.daemon.metric("chunkstream_chunks_uploaded_total") >= n
        });
    }

    /// The body of `/readyz`.
    fn readyz(&self) -> serde_json::Value {
        let (_, body) = self.daemon.http("GET", "/readyz");
        serde_json::from_str(&body).expect("/readyz is JSON")
    }

    /// Waits until `/readyz` and the metric say the watch directory is blind,
    /// with `reason` in the readiness report.
    fn wait_blind(&self, reason: &str) {
        let mut last = serde_json::Value::Null;
        wait_for_long(
            &format!("/readyz to report a blind watch dir ({reason})"),
            Duration::from_secs(30),
            || {
                last = self.readyz();
                last["watch_dir"]
                    .as_str()
                    .is_some_and(|w| w.starts_with("degraded:") && w.contains(reason))
            },
        );
        assert_eq!(self.daemon.http("GET", "/readyz").0, 503, "{last}");
        assert_eq!(self.daemon.metric("chunkstream_watch_dir_blind"), 1.0);
    }

    /// Waits until chunkstream's log has a line containing every needle.
    fn wait_log(&self, needles: &[&str]) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let log = self.daemon.log();
            if log
                .lines()
                .any(|line| needles.iter().all(|needle| line.contains(needle)))
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no log line with {needles:?} in:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The end of every scenario: complete, byte-exact, one stream, nothing
    /// incomplete, and the watch directory seen again.
    fn assert_one_exact_stream(&self, name: &str) {
        let source = self.source(name);
        let meta = self.env.wait_complete_at(&source, &self.rel(name));
        self.env.assert_byte_exact(&meta, &source);
        let streams: BTreeSet<String> = self
            .env
            .keys()
            .iter()
            .filter_map(|key| key.strip_prefix(&self.env.prefix)?.split('/').next())
            .map(str::to_string)
            .collect();
        let log = self.daemon.log();
        assert_eq!(
            streams,
            BTreeSet::from([meta.stream_id.clone()]),
            "exactly one stream in the bucket; log:\n{log}"
        );
        assert!(
            self.env
                .all_metadata()
                .iter()
                .all(|m| m.status == chunkstream::metadata::StreamStatus::Complete),
            "no incomplete metadata"
        );
        assert_eq!(
            self.daemon
                .metric("chunkstream_streams_completed_total{status=\"incomplete\"}"),
            0.0,
            "{log}"
        );
        assert_eq!(
            self.daemon.metric("chunkstream_streams_discovered_total"),
            1.0,
            "{log}"
        );
        assert!(!log.contains("closing it as incomplete"), "{log}");
        wait_for("the watch directory seen again", || {
            self.readyz()["watch_dir"] == "ok"
        });
    }

    /// The common shape: a recording written on the server (`writer`, or
    /// 256 KiB every 200 ms), a first chunk uploaded, then `fault` breaks
    /// and mends the mount while the writer goes on; then the writer ends
    /// and the recording must be one exact stream.
    fn record_through(&self, name: &str, writer: Option<Writer>, fault: impl FnOnce(&Self)) {
        let writer = writer.unwrap_or_else(|| Writer::bytes(&self.source(name)));
        self.wait_for_chunks(1.0);
        fault(self);
        writer.finish(Duration::from_secs(3));
        self.assert_one_exact_stream(name);
    }

    /// `fault.sh start`, then waits until chunkstream reports the watch
    /// directory blind with `reason`, runs `meanwhile`, holds the fault for
    /// `length` in all, and ends it with `fault.sh` on each of `end`.
    fn outage(
        &self,
        start: &str,
        reason: &str,
        length: Duration,
        meanwhile: impl FnOnce(&Self),
        end: &[&str],
    ) {
        let started = Instant::now();
        self.netfs.fault(&[start]);
        self.wait_blind(reason);
        meanwhile(self);
        std::thread::sleep(length.saturating_sub(started.elapsed()));
        for action in end {
            self.netfs.fault(&[action]);
        }
    }
}

#[test]
fn a_live_ffmpeg_recording_on_the_mount_is_uploaded_byte_exact() {
    let Some(ffmpeg) = require_tool("ffmpeg") else {
        return;
    };
    let Some(s) = Scenario::start(&[("NETFS_DIR_CACHE", "no")], |_| {}) else {
        return;
    };
    let writer = Writer::ffmpeg(&ffmpeg, &s.source("live.mp4"), 10);
    s.wait_for_chunks(1.0);
    writer.finish(Duration::ZERO);
    s.assert_one_exact_stream("live.mp4");
    assert!(
        s.daemon.log().contains("is on fuse.sshfs"),
        "{}",
        s.daemon.log()
    );
}

#[test]
fn a_20s_server_outage_mid_recording_with_stable_inode_numbers() {
    let Some(ffmpeg) = require_tool("ffmpeg") else {
        return;
    };
    let Some(s) = Scenario::start(
        &[("NETFS_DIR_CACHE", "no"), ("NETFS_NOFORGET", "1")],
        |_| {},
    ) else {
        return;
    };
    let writer = Writer::ffmpeg(&ffmpeg, &s.source("outage.mp4"), 32);
    s.record_through("outage.mp4", Some(writer), |s| {
        s.outage("down", "EIO", SERVER_OUTAGE, |_| {}, &["up"]);
    });
}

#[test]
fn a_20s_server_outage_that_changes_inode_numbers_keeps_the_stream() {
    let Some(s) = Scenario::start(
        &[("NETFS_DIR_CACHE", "no"), ("NETFS_NOFORGET", "0")],
        |_| {},
    ) else {
        return;
    };
    s.record_through("renumbered.mp4", None, |s| {
        // Another reader looks the file up while the server is down: without
        // noforget, sshfs then forgets its inode number and hands out a new
        // one.
        let lookup_fails = |s: &Scenario| {
            wait_for("a lookup on the mount to fail", || {
                std::fs::metadata(s.netfs.mount().join("renumbered.mp4")).is_err()
            });
        };
        s.outage("down", "EIO", SERVER_OUTAGE, lookup_fails, &["up"]);
        s.wait_log(&["its first chunk matches; continuing the stream"]);
    });
}

#[test]
fn a_frozen_server_for_15s() {
    let Some(s) = Scenario::start(&[("NETFS_DIR_CACHE", "no")], |_| {}) else {
        return;
    };
    // After ServerAlive gives up (about 6 s), a listing fails with EIO.
    s.record_through("frozen.mp4", None, |s| {
        s.outage("freeze", "EIO", FREEZE, |_| {}, &["thaw"]);
    });
}

#[test]
fn a_killed_fuse_client_and_a_remount() {
    let Some(s) = Scenario::start(&[("NETFS_DIR_CACHE", "no")], |_| {}) else {
        return;
    };
    s.record_through("remounted.mp4", None, |s| {
        s.outage(
            "kill-client",
            "ENOTCONN",
            LONGER_THAN_STREAM_TIMEOUT,
            |_| {},
            &["remount"],
        );
    });
}

#[test]
fn a_mount_that_drops_away_closes_nothing_and_shows_in_readyz() {
    // Without reconnect, sshfs exits when the server goes: the mount point
    // is an empty local directory.
    let Some(s) = Scenario::start(
        &[("NETFS_DIR_CACHE", "no"), ("NETFS_RECONNECT", "0")],
        |_| {},
    ) else {
        return;
    };
    s.record_through("dropped.mp4", None, |s| {
        s.outage(
            "down",
            "empty while 1 streams are open",
            LONGER_THAN_STREAM_TIMEOUT,
            |s| {
                let entries = std::fs::read_dir(s.netfs.mount()).map(Iterator::count);
                assert_eq!(entries.ok(), Some(0), "an empty local directory");
            },
            &["up", "remount"],
        );
    });
}

#[test]
fn a_10s_permission_loss_on_the_watch_dir_closes_nothing() {
    use std::os::unix::fs::PermissionsExt;
    // default_permissions: the kernel checks the mode bits for chunkstream's
    // user, as NFS and SMB servers do.
    let Some(s) = Scenario::start(
        &[
            ("NETFS_DIR_CACHE", "no"),
            ("NETFS_SSHFS_OPTS", "default_permissions"),
        ],
        |_| {},
    ) else {
        return;
    };
    let chmod = |mode| {
        let permissions = std::fs::Permissions::from_mode(mode);
        std::fs::set_permissions(s.netfs.server(), permissions).unwrap();
    };
    s.record_through("denied.mp4", None, |s| {
        let denied = Instant::now();
        // Listable, but no entry can be stat'ed (no x bit).
        chmod(0o644);
        s.wait_log(&["denied.mp4", "EACCES"]);
        assert!(s.daemon.metric("chunkstream_unreadable_paths") >= 1.0);
        std::thread::sleep(PERMISSION_LOSS.saturating_sub(denied.elapsed()));
        chmod(0o755);
    });
    assert_eq!(s.daemon.metric("chunkstream_unreadable_paths"), 0.0);
}

#[test]
fn a_long_cached_listing_whose_stat_fails_closes_nothing() {
    // sshfs's own cache keeps listings for 45 s. The file exists before the
    // mount, so the first listing already has it.
    let Some(s) = Scenario::start(
        &[("NETFS_DIR_CACHE", "yes"), ("NETFS_DCACHE_TIMEOUT", "45")],
        |server| std::fs::write(server.join("cached.mp4"), pseudo_random(6 * MIB, 7)).unwrap(),
    ) else {
        return;
    };
    s.record_through("cached.mp4", None, |s| {
        let down = Instant::now();
        s.netfs.fault(&["down"]);
        // Some reader's failed open drops the file's cached attributes (not
        // the listing's): from then on its stat fails while it is listed.
        wait_for("an open on the mount to fail", || {
            std::fs::File::open(s.netfs.mount().join("cached.mp4")).is_err()
        });
        s.wait_log(&["cached.mp4", "cannot stat", "EIO"]);
        std::thread::sleep(SERVER_OUTAGE.saturating_sub(down.elapsed()));
        s.netfs.fault(&["up"]);
    });
}

#[test]
fn a_camera_mount_below_the_watch_dir_that_drops_away_closes_nothing() {
    // WATCH_DIR is a local directory; the camera's share is mounted at
    // WATCH_DIR/cams. Without reconnect, sshfs exits when the server goes,
    // and cams/ is an empty local directory, which proves nothing.
    let netfs = NetFs::new(&[("NETFS_DIR_CACHE", "no"), ("NETFS_RECONNECT", "0")]);
    let Some(s) = Scenario::start_on(netfs.mounted_below_watch(), |_| {}) else {
        return;
    };
    s.record_through("below.mp4", None, |s| {
        let dropped = Instant::now();
        s.netfs.fault(&["down"]);
        s.wait_log(&["cams", "is another file system than a moment ago"]);
        assert_eq!(
            std::fs::read_dir(s.netfs.mount()).map(Iterator::count).ok(),
            Some(0),
            "an empty local directory"
        );
        std::thread::sleep(LONGER_THAN_STREAM_TIMEOUT.saturating_sub(dropped.elapsed()));
        s.netfs.fault(&["up"]);
        s.netfs.fault(&["remount"]);
    });
}
