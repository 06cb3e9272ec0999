//! Test plumbing: real servers as child processes, the real binary, and the
//! byte-exact check every scenario ends with.
//!
//! `redis-server` and `s3s-fs` (with SigV4 keys) are started on free loopback
//! ports with their own temp dirs. Without them a test is skipped, except when
//! `CI=true`, where a missing server is a failure.

#![allow(dead_code)] // each test uses a different subset of the helpers

pub mod proxy;
pub mod stub;
pub mod tls;
pub mod webhook;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use chunkstream::config::{ContentMd5, RedisConfig, S3Config, S3Credentials};
use chunkstream::metadata::StreamMetadata;
use chunkstream::scan::FileIdentity;
use chunkstream::store::redis::LeaseHolder;
use chunkstream::store::{
    BucketAdmin, ObjectStore, RedisStore, S3Store, StoredStatus, StoredStream,
};
use sha2::{Digest, Sha256};
use tempfile::TempDir;

pub const ACCESS_KEY: &str = "chunkstream-test-access";
pub const SECRET_KEY: &str = "chunkstream-test-secret-Zq9";
pub const BUCKET: &str = "test-videos";
pub const MIB: u64 = 1024 * 1024;

/// Generous: the machine may be slow and busy; conditions are polled.
pub const DEADLINE: Duration = Duration::from_secs(120);

pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Whether a test may skip because `what` (a tool or server) is missing:
/// only when `CHUNKSTREAM_SKIP_SERVER_TESTS=1` is set, and never with
/// CI=true. Says so when it does.
pub fn may_skip_without(what: &str) -> bool {
    let skip = !in_ci() && std::env::var("CHUNKSTREAM_SKIP_SERVER_TESTS").is_ok_and(|v| v == "1");
    if skip {
        eprintln!("skipping: {what} is missing and CHUNKSTREAM_SKIP_SERVER_TESTS=1");
    }
    skip
}

/// Finds a tool on PATH or in ~/.cargo/bin.
fn find_tool(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cargo/bin"));
    }
    dirs.into_iter()
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// The tool's path. A missing tool fails the test, naming it, unless
/// `CHUNKSTREAM_SKIP_SERVER_TESTS=1` is set (never honoured when CI=true):
/// then `None`, and the caller returns early, saying it skipped.
pub fn require_tool(name: &str) -> Option<PathBuf> {
    if let Some(path) = find_tool(name) {
        return Some(path);
    }
    if in_ci() {
        panic!("{name} is required when CI=true; run scripts/test.sh");
    }
    if may_skip_without(name) {
        return None;
    }
    panic!(
        "{name} not found on PATH or in ~/.cargo/bin: install it (scripts/test.sh does), or set CHUNKSTREAM_SKIP_SERVER_TESTS=1 to skip the tests that need it"
    );
}

/// The binary under test: Cargo's for integration tests, the release build
/// for the benchmark (which is an example, where Cargo names no binary).
pub fn chunkstream_binary() -> PathBuf {
    option_env!("CARGO_BIN_EXE_chunkstream").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/chunkstream"),
        PathBuf::from,
    )
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("a free loopback port")
}

/// A free loopback port whose successor is free too (the Ceph monitor
/// listens on both: msgr2 and the legacy protocol). Both are held while
/// looking, so the pair is free when this returns.
pub fn free_port_pair() -> u16 {
    loop {
        let first = TcpListener::bind("127.0.0.1:0").expect("a free loopback port");
        let port = first.local_addr().expect("its address").port();
        if port < u16::MAX && TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return port;
        }
    }
}

/// Polls `condition` every 50 ms until it holds or `DEADLINE` passes.
pub fn wait_for(what: &str, condition: impl FnMut() -> bool) {
    wait_for_long(what, DEADLINE, condition);
}

/// Polls `condition` every 50 ms until it holds or `limit` passes.
pub fn wait_for_long(what: &str, limit: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if condition() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out after {limit:?} waiting for {what}");
}

fn wait_for_port(port: u16) {
    wait_for(&format!("port {port} to accept connections"), || {
        TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
}

fn log_file(dir: &Path, name: &str) -> (File, PathBuf) {
    let path = dir.join(name);
    (File::create(&path).expect("log file"), path)
}

/// A child process that is killed when dropped.
pub struct Process {
    pub child: Child,
    pub log: PathBuf,
}

impl Process {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{signal} failed");
    }

    pub fn kill_hard(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for exit, up to `DEADLINE`.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "process did not exit");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct RedisServer {
    pub process: Process,
    pub port: u16,
    dir: TempDir,
    /// Extra arguments (for example a password).
    extra_args: Vec<String>,
}

impl RedisServer {
    pub fn start() -> Option<Self> {
        Self::start_with_args(&[])
    }

    /// Starts redis-server with AOF persistence (`appendfsync always`, so a
    /// kill -9 loses nothing) plus `extra_args`.
    pub fn start_with_args(extra_args: &[&str]) -> Option<Self> {
        let binary = require_tool("redis-server")?;
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let extra_args: Vec<String> = extra_args.iter().map(|a| a.to_string()).collect();
        let process = Self::spawn(&binary, dir.path(), port, &extra_args);
        Some(Self {
            process,
            port,
            dir,
            extra_args,
        })
    }

    fn spawn(binary: &Path, dir: &Path, port: u16, extra_args: &[String]) -> Process {
        let (log, log_path) = log_file(dir, &format!("redis-{}.log", free_port()));
        let child = Command::new(binary)
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .arg("--dir")
            .arg(dir)
            .args(extra_args)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("redis-server starts");
        wait_for_port(port);
        Process {
            child,
            log: log_path,
        }
    }

    /// kill -9, then a new server on the same port: with the data directory
    /// (persistence) or with an emptied one (data lost).
    pub fn crash_and_restart(&mut self, keep_data: bool) {
        self.process.kill_hard();
        if !keep_data {
            for entry in std::fs::read_dir(self.dir.path()).expect("redis dir") {
                let path = entry.expect("entry").path();
                if path.is_dir() {
                    std::fs::remove_dir_all(&path).expect("clear redis data");
                } else if !path.to_string_lossy().ends_with(".log") {
                    std::fs::remove_file(&path).expect("clear redis data");
                }
            }
        }
        let binary = require_tool("redis-server").expect("redis-server was found before");
        self.process = Self::spawn(&binary, self.dir.path(), self.port, &self.extra_args);
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn connection(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .and_then(|client| client.get_connection())
            .expect("redis connection")
    }
}

/// The S3 implementations the tests run against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum S3Kind {
    /// s3s-fs 0.14.1: checks SigV4 and `x-amz-checksum-*`.
    S3sFs,
    /// Ceph RADOS Gateway 16 (tests/testbeds/rgw): a production S3 that
    /// ignores `x-amz-checksum-sha256`.
    Rgw,
    /// moto server: AWS-strict bucket creation, no signature checks.
    Moto,
}

impl S3Kind {
    /// The binary a test needs for this server.
    fn tool(self) -> &'static str {
        match self {
            S3Kind::S3sFs => "s3s-fs",
            S3Kind::Rgw => "radosgw",
            S3Kind::Moto => "moto_server",
        }
    }
}

/// A Ceph cluster started by tests/testbeds/rgw/start.sh: mon, OSD and
/// radosgw run in the background, so this stops them by their PID files.
pub struct RgwCluster {
    state: TempDir,
}

impl RgwCluster {
    fn script(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/testbeds/rgw")
            .join(name)
    }

    fn start(port: u16, keys: &(String, String)) -> Self {
        use std::sync::atomic::{AtomicU16, Ordering};
        // 100 ports for the OSD's messengers, a fresh range per cluster.
        static NEXT_OSD_PORTS: AtomicU16 = AtomicU16::new(41_000);
        let osd_ports = NEXT_OSD_PORTS.fetch_add(100, Ordering::SeqCst);
        let state = tempfile::tempdir().expect("rgw state dir");
        let output = Command::new("bash")
            .arg(Self::script("start.sh"))
            .args([port.to_string(), keys.0.clone(), keys.1.clone()])
            .env("RGW_DIR", state.path().join("rgw"))
            .env("MON_PORT", free_port_pair().to_string())
            .env("OSD_PORT_MIN", osd_ports.to_string())
            .env("MEMSTORE_BYTES", (2u64 << 30).to_string())
            .stdin(Stdio::null())
            .output()
            .expect("start.sh runs");
        assert!(
            output.status.success(),
            "Ceph RGW did not start: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        Self { state }
    }

    fn stop(&self) {
        let _ = Command::new("bash")
            .arg(Self::script("stop.sh"))
            .arg("--wipe")
            .env("RGW_DIR", self.state.path().join("rgw"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

impl Drop for RgwCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What runs the server: a child process, or a Ceph cluster.
enum S3Backend {
    Child(Process),
    Rgw(RgwCluster),
}

pub struct S3Server {
    backend: S3Backend,
    pub kind: S3Kind,
    pub port: u16,
    pub dir: TempDir,
    keys: (String, String),
}

impl S3Server {
    /// s3s-fs, requiring these SigV4 keys.
    pub fn start(access_key: &str, secret_key: &str) -> Option<Self> {
        Self::start_kind(S3Kind::S3sFs, access_key, secret_key)
    }

    pub fn start_kind(kind: S3Kind, access_key: &str, secret_key: &str) -> Option<Self> {
        let binary = require_tool(kind.tool())?;
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir_all(dir.path().join("data")).expect("data dir");
        let port = free_port();
        let keys = (access_key.to_string(), secret_key.to_string());
        let backend = Self::spawn(kind, &binary, dir.path(), port, &keys);
        Some(Self {
            backend,
            kind,
            port,
            dir,
            keys,
        })
    }

    fn spawn(
        kind: S3Kind,
        binary: &Path,
        dir: &Path,
        port: u16,
        keys: &(String, String),
    ) -> S3Backend {
        let (log, log_path) = log_file(dir, &format!("{}-{}.log", kind.tool(), free_port()));
        let mut command = Command::new(binary);
        match kind {
            S3Kind::Rgw => return S3Backend::Rgw(RgwCluster::start(port, keys)),
            S3Kind::S3sFs => command
                .args(["--host", "127.0.0.1", "--port", &port.to_string()])
                .args(["--access-key", &keys.0, "--secret-key", &keys.1])
                .arg(dir.join("data")),
            S3Kind::Moto => command.args(["-H", "127.0.0.1", "-p", &port.to_string()]),
        };
        let child = command
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("the S3 server starts");
        wait_for_port(port);
        S3Backend::Child(Process {
            child,
            log: log_path,
        })
    }

    fn process(&self) -> &Process {
        match &self.backend {
            S3Backend::Child(process) => process,
            S3Backend::Rgw(_) => panic!("the Ceph RGW test bed is not one process"),
        }
    }

    /// Sends a signal to the server process (STOP/CONT to hang it).
    pub fn signal(&self, signal: &str) {
        self.process().signal(signal);
    }

    /// Kills the server (its data stays).
    pub fn stop(&mut self) {
        match &mut self.backend {
            S3Backend::Child(process) => process.kill_hard(),
            S3Backend::Rgw(_) => panic!("the Ceph RGW test bed is not restartable"),
        }
    }

    /// Starts it again on the same port and data directory.
    pub fn restart(&mut self) {
        let binary = require_tool(self.kind.tool()).expect("the server was found before");
        self.backend = Self::spawn(self.kind, &binary, self.dir.path(), self.port, &self.keys);
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

/// Both servers, a watched directory, and a client for the bucket.
pub struct TestEnv {
    pub redis: RedisServer,
    pub s3: S3Server,
    pub watch: TempDir,
    /// Outside the watched tree, on the same file system, for atomic drops.
    pub staging: TempDir,
    pub store: S3Store,
    pub prefix: String,
}

impl TestEnv {
    /// `None` (skip) when a server binary is missing outside CI.
    pub fn start() -> Option<Self> {
        Self::start_with_keys(ACCESS_KEY, SECRET_KEY)
    }

    /// Like `start`, with the S3 server requiring these SigV4 keys.
    pub fn start_with_keys(access_key: &str, secret_key: &str) -> Option<Self> {
        Self::start_on(S3Kind::S3sFs, access_key, secret_key)
    }

    /// Like `start_with_keys`, against the S3 implementation `kind`.
    pub fn start_on(kind: S3Kind, access_key: &str, secret_key: &str) -> Option<Self> {
        let redis = RedisServer::start()?;
        let s3 = S3Server::start_kind(kind, access_key, secret_key)?;
        let watch = tempfile::tempdir().expect("watch dir");
        let staging = tempfile::tempdir().expect("staging dir");
        let prefix = "streams/".to_string();
        let store = S3Store::new(&s3_config(&s3.endpoint(), &prefix, access_key, secret_key))
            .expect("S3 client");
        Some(Self {
            redis,
            s3,
            watch,
            staging,
            store,
            prefix,
        })
    }

    /// The environment the daemon runs with (short timings for tests).
    pub fn daemon_env(&self) -> BTreeMap<String, String> {
        let pairs = [
            ("WATCH_DIR", self.watch.path().display().to_string()),
            ("S3_ENDPOINT", self.s3.endpoint()),
            ("S3_BUCKET", BUCKET.to_string()),
            ("S3_PREFIX", self.prefix.clone()),
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY.to_string()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.to_string()),
            ("REDIS_URL", self.redis.url()),
            ("REDIS_KEY_PREFIX", "cstest".to_string()),
            ("POLL_INTERVAL", "100ms".to_string()),
            ("STREAM_TIMEOUT", "2s".to_string()),
            ("CHUNK_SIZE", "5MiB".to_string()),
            ("WORKERS", "2".to_string()),
            ("RETRY_BASE_DELAY", "50ms".to_string()),
            ("RETRY_MAX_DELAY", "1s".to_string()),
            ("SHUTDOWN_TIMEOUT", "20s".to_string()),
            ("LOG_LEVEL", "debug".to_string()),
            // Never ask the real instance-metadata address for anything.
            ("AWS_EC2_METADATA_DISABLED", "true".to_string()),
        ];
        pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
    }

    /// [`TestEnv::daemon_env`] without the static keys.
    pub fn keyless_env(&self) -> BTreeMap<String, String> {
        let mut vars = self.daemon_env();
        vars.remove("AWS_ACCESS_KEY_ID");
        vars.remove("AWS_SECRET_ACCESS_KEY");
        vars
    }

    /// Starts the daemon with `daemon_env` plus `overrides`.
    pub fn start_daemon(&self, overrides: &[(&str, &str)]) -> Daemon {
        let mut env = self.daemon_env();
        for (key, value) in overrides {
            env.insert(key.to_string(), value.to_string());
        }
        Daemon::start(env, self.watch.path())
    }

    pub fn file(&self, rel: &str) -> PathBuf {
        self.watch.path().join(rel)
    }

    /// Writes `bytes` outside the tree, then renames it in: a file that
    /// appears whole.
    pub fn drop_file(&self, rel: &str, bytes: &[u8]) -> PathBuf {
        let staged = self.staging.path().join(rel.replace('/', "_"));
        std::fs::write(&staged, bytes).expect("write staged file");
        let target = self.file(rel);
        std::fs::create_dir_all(target.parent().expect("parent")).expect("dirs");
        std::fs::rename(&staged, &target).expect("rename into watch dir");
        target
    }

    pub fn exists(&self, key: &str) -> bool {
        match self.store.get(key) {
            Ok(_) => true,
            Err(err) if err.is_not_found() => false,
            Err(err) => panic!("GET {key}: {err}"),
        }
    }

    pub fn keys(&self) -> Vec<String> {
        match self.store.list_keys(&self.prefix) {
            Ok(keys) => keys,
            // The bucket does not exist until the daemon creates it.
            Err(err) if err.is_not_found() => Vec::new(),
            Err(err) => panic!("list: {err}"),
        }
    }

    /// Every `metadata.json` in the bucket, parsed.
    pub fn all_metadata(&self) -> Vec<StreamMetadata> {
        self.keys()
            .into_iter()
            .filter(|key| key.ends_with("/metadata.json"))
            .map(|key| {
                let body = self.store.get(&key).expect("metadata");
                serde_json::from_slice(&body).expect("metadata parses")
            })
            .collect()
    }

    /// The metadata of the stream whose source is `rel`, at least `revision`.
    pub fn metadata_for(&self, rel: &str) -> Option<StreamMetadata> {
        self.all_metadata()
            .into_iter()
            .filter(|meta| meta.source.path == rel)
            .max_by_key(|meta| meta.revision)
    }

    /// Waits until `rel` has complete metadata of `revision`.
    pub fn wait_revision(&self, rel: &str, revision: u32) -> StreamMetadata {
        let mut found = None;
        wait_for(&format!("revision {revision} of {rel}"), || {
            found = self.metadata_for(rel).filter(|meta| {
                meta.revision == revision
                    && meta.status == chunkstream::metadata::StreamStatus::Complete
            });
            found.is_some()
        });
        found.expect("found")
    }

    /// Waits until `rel` has complete metadata whose size matches the file.
    pub fn wait_complete(&self, rel: &str) -> StreamMetadata {
        self.wait_complete_at(&self.file(rel), rel)
    }

    /// Like `wait_complete`, for a source file outside `self.watch`.
    pub fn wait_complete_at(&self, source: &Path, rel: &str) -> StreamMetadata {
        let size = std::fs::metadata(source).expect("source").len();
        let mut found = None;
        wait_for(&format!("complete metadata for {rel}"), || {
            found = self.all_metadata().into_iter().find(|meta| {
                meta.source.path == rel
                    && meta.status == chunkstream::metadata::StreamStatus::Complete
                    && meta.total_size_bytes == size
            });
            found.is_some()
        });
        found.expect("found")
    }

    /// The end of every scenario: the chunk objects of the stream, listed
    /// from the bucket and concatenated in index order, equal `source` byte
    /// for byte (sha256), and agree with the metadata.
    pub fn assert_byte_exact(&self, meta: &StreamMetadata, source: &Path) {
        let chunk_prefix = format!("{}{}/chunk-", self.prefix, meta.stream_id);
        let mut chunk_keys: Vec<String> = self
            .keys()
            .into_iter()
            .filter(|key| key.starts_with(&chunk_prefix))
            .collect();
        chunk_keys.sort();
        assert_eq!(
            chunk_keys.len(),
            meta.chunks.len(),
            "chunk objects in the bucket vs metadata for {}",
            meta.stream_id
        );
        for (index, key) in chunk_keys.iter().enumerate() {
            assert_eq!(key, &meta.chunks[index].key, "chunk order");
        }
        self.assert_byte_exact_via_metadata(meta, source);
    }

    /// The chunks named in the metadata, concatenated in index order, equal
    /// `source` byte for byte (sha256), whatever else the bucket holds (with
    /// Object Lock, the chunks a rewrite superseded stay).
    pub fn assert_byte_exact_via_metadata(&self, meta: &StreamMetadata, source: &Path) {
        let mut whole = Sha256::new();
        let mut total = 0u64;
        for chunk in &meta.chunks {
            let body = self.store.get(&chunk.key).expect("chunk");
            total += body.len() as u64;
            whole.update(&body);
        }
        let assembled = hex::encode(whole.finalize());
        let expected = sha256_file(source);
        assert_eq!(total, std::fs::metadata(source).unwrap().len(), "size");
        assert_eq!(
            assembled,
            expected,
            "reassembled chunks differ from {}",
            source.display()
        );
        assert_eq!(
            meta.sha256.as_deref(),
            Some(expected.as_str()),
            "metadata sha256"
        );
        assert_eq!(meta.check_chunk_layout(), Ok(()));
    }

    /// The end of a scenario whose chunk objects were deleted after
    /// assembly: no chunk object of the stream is left, and each chunk's
    /// range of the assembled object, concatenated in index order, equals
    /// `source` byte for byte (sha256) and matches its recorded sha256.
    pub fn assert_byte_exact_from_assembled(&self, meta: &StreamMetadata, source: &Path) {
        assert!(meta.chunks_deleted, "{meta:?}");
        let chunk_prefix = format!("{}{}/chunk-", self.prefix, meta.stream_id);
        let left: Vec<String> = self
            .keys()
            .into_iter()
            .filter(|key| key.starts_with(&chunk_prefix))
            .collect();
        assert!(left.is_empty(), "chunk objects left: {left:?}");
        let mut whole = Sha256::new();
        for chunk in &meta.chunks {
            let body = chunkstream::readback::fetch_chunk(&self.store, meta, chunk).expect("range");
            assert_eq!(chunk.check(&body), Ok(()));
            whole.update(&body);
        }
        let expected = sha256_file(source);
        assert_eq!(
            hex::encode(whole.finalize()),
            expected,
            "reassembled ranges"
        );
        assert_eq!(meta.sha256.as_deref(), Some(expected.as_str()));
        assert_eq!(meta.check_chunk_layout(), Ok(()));
    }

    /// The sha256 of an object, read in ranges.
    pub fn object_sha256(&self, key: &str, size: u64) -> String {
        chunkstream::readback::sha256_of_object(&self.store, key, size, 5 * MIB).unwrap()
    }

    /// Waits for metadata of `rel` that carries an assembled object of `revision`.
    pub fn wait_assembled(&self, rel: &str, revision: u32) -> StreamMetadata {
        let mut found = None;
        wait_for(&format!("{rel} assembled at revision {revision}"), || {
            found = self
                .all_metadata()
                .into_iter()
                .find(|m| m.source.path == rel && m.revision == revision && m.assembled.is_some());
            found.is_some()
        });
        found.expect("found")
    }

    /// Stream ids in the Redis identity index.
    pub fn registered_stream_ids(&self) -> Vec<String> {
        let mut connection = self.redis.connection();
        redis::cmd("HVALS")
            .arg("cstest:identities")
            .query(&mut connection)
            .expect("HVALS")
    }

    /// The chunk indices Redis has checkpointed, per registered stream.
    pub fn checkpointed_indices(&self) -> std::collections::BTreeSet<(String, u64)> {
        let mut connection = self.redis.connection();
        let mut all = std::collections::BTreeSet::new();
        for id in self.registered_stream_ids() {
            let indices: Vec<u64> = redis::cmd("HKEYS")
                .arg(format!("cstest:stream:{id}:chunks"))
                .query(&mut connection)
                .expect("HKEYS");
            all.extend(indices.into_iter().map(|index| (id.clone(), index)));
        }
        all
    }

    /// How many chunks Redis has checkpointed for a stream.
    pub fn checkpointed_chunks(&self, stream_id: &str) -> u64 {
        let mut connection = self.redis.connection();
        redis::cmd("HLEN")
            .arg(format!("cstest:stream:{stream_id}:chunks"))
            .query(&mut connection)
            .expect("HLEN")
    }

    /// Runs `chunkstream <args>` as a one-shot command with the daemon env.
    pub fn command(&self, args: &[&str]) -> std::process::Output {
        Command::new(chunkstream_binary())
            .env_clear()
            .envs(self.daemon_env())
            .args(args)
            .output()
            .expect("chunkstream runs")
    }
}

/// `chunkstream run` in the foreground with `vars` (and a free metrics
/// port), for starts that are expected to end by themselves.
pub fn run_to_exit(mut vars: BTreeMap<String, String>) -> std::process::Output {
    vars.insert("METRICS_ADDR".into(), "127.0.0.1:0".into());
    Command::new(chunkstream_binary())
        .arg("run")
        .env_clear()
        .envs(vars)
        .output()
        .expect("chunkstream runs")
}

pub fn s3_config(endpoint: &str, prefix: &str, access_key: &str, secret_key: &str) -> S3Config {
    S3Config {
        endpoint: Some(endpoint.to_string()),
        region: "us-east-1".into(),
        bucket: BUCKET.into(),
        prefix: prefix.into(),
        path_style: true,
        request_timeout: Duration::from_secs(30),
        credentials: Some(S3Credentials {
            access_key_id: access_key.into(),
            secret_access_key: secret_key.into(),
            session_token: None,
        }),
        create_bucket: true,
        content_md5: ContentMd5::Always,
        anonymous: false,
        chain: Default::default(),
        policy: Default::default(),
        tls: Default::default(),
    }
}

/// The real `chunkstream` binary, running as a daemon.
pub struct Daemon {
    pub process: Process,
    pub metrics_port: u16,
    _log_dir: TempDir,
}

impl Daemon {
    pub fn start(env: BTreeMap<String, String>, cwd: &Path) -> Self {
        Self::start_binary(&chunkstream_binary(), env, cwd, None)
    }

    /// Runs `binary run` with exactly `env` (plus a free loopback
    /// `METRICS_ADDR`), optionally as another user.
    pub fn start_binary(
        binary: &Path,
        mut env: BTreeMap<String, String>,
        cwd: &Path,
        uid_gid: Option<u32>,
    ) -> Self {
        use std::os::unix::process::CommandExt;
        let metrics_port = free_port();
        env.insert("METRICS_ADDR".into(), format!("127.0.0.1:{metrics_port}"));
        let log_dir = tempfile::tempdir().expect("log dir");
        let (log, log_path) = log_file(log_dir.path(), "chunkstream.log");
        let mut command = Command::new(binary);
        command
            .arg("run")
            .env_clear()
            .envs(&env)
            .current_dir(cwd)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        if let Some(id) = uid_gid {
            command.uid(id).gid(id);
        }
        let child = command.spawn().expect("chunkstream starts");
        let daemon = Self {
            process: Process {
                child,
                log: log_path,
            },
            metrics_port,
            _log_dir: log_dir,
        };
        wait_for("the metrics endpoint", || daemon.try_metrics().is_some());
        daemon
    }

    pub fn try_metrics(&self) -> Option<String> {
        ureq::get(format!("http://127.0.0.1:{}/metrics", self.metrics_port))
            .call()
            .ok()?
            .body_mut()
            .read_to_string()
            .ok()
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.metrics_port)
    }

    /// Status and body of a GET (or another method) on the HTTP endpoint.
    pub fn http(&self, method: &str, path: &str) -> (u16, String) {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        let url = format!("{}{path}", self.url());
        let mut response = match method {
            "GET" => agent.get(&url).call(),
            "POST" => agent.post(&url).send_empty(),
            other => panic!("unsupported method {other}"),
        }
        .expect("HTTP request");
        let status = response.status().as_u16();
        (
            status,
            response.body_mut().read_to_string().unwrap_or_default(),
        )
    }

    /// The value of one sample, e.g. `chunkstream_chunks_uploaded_total` or
    /// `chunkstream_streams_completed_total{status="complete"}`.
    pub fn metric(&self, sample: &str) -> f64 {
        let text = self.try_metrics().expect("metrics reachable");
        text.lines()
            .find_map(|line| {
                let (name, value) = line.rsplit_once(' ')?;
                (name == sample).then(|| value.parse().expect("number"))
            })
            .unwrap_or_else(|| panic!("no sample {sample} in:\n{text}"))
    }

    /// The sum of every sample of a metric across its labels.
    pub fn metric_sum(&self, name: &str) -> f64 {
        let text = self.try_metrics().expect("metrics reachable");
        text.lines()
            .filter(|line| !line.starts_with('#'))
            .filter_map(|line| {
                let (sample, value) = line.rsplit_once(' ')?;
                let metric = sample.split('{').next()?;
                (metric == name).then(|| value.parse::<f64>().expect("number"))
            })
            .sum()
    }

    pub fn log(&self) -> String {
        self.process.log_text()
    }

    /// SIGTERM, then the exit status.
    pub fn terminate(mut self) -> (ExitStatus, String) {
        self.process.signal("TERM");
        let status = self.process.wait_exit();
        (status, self.log())
    }

    /// SIGKILL: no chance to drain.
    pub fn kill_hard(mut self) -> String {
        self.process.kill_hard();
        self.log()
    }
}

/// What the log message of every uploaded chunk contains.
pub const UPLOADED: &str = " uploaded (";

/// The entries of a JSON log whose message contains `fragment`, in order.
pub fn log_entries(log: &str, fragment: &str) -> Vec<serde_json::Value> {
    log.lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|entry| {
            entry["msg"]
                .as_str()
                .is_some_and(|msg| msg.contains(fragment))
        })
        .collect()
}

/// The (stream id, chunk) pairs a JSON log says were uploaded, in order.
pub fn uploads_in_log(log: &str) -> Vec<(String, u64)> {
    log_entries(log, UPLOADED)
        .into_iter()
        .filter_map(|entry| {
            Some((
                entry["stream_id"].as_str()?.to_string(),
                entry["chunk"].as_u64()?,
            ))
        })
        .collect()
}

/// Encodes `seconds` of noisy test video in real time (`-re`), so the file
/// grows like a camera recording and ffmpeg patches the header at the end
/// (`extra_output_args` such as `-movflags +faststart` rewrite more).
pub fn record_in_real_time(
    ffmpeg: &std::path::Path,
    output: &std::path::Path,
    seconds: u32,
    extra_output_args: &[&str],
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
        .args(extra_output_args)
        .arg(output)
        .spawn()
        .expect("ffmpeg starts")
}

pub fn ffprobe_duration(path: &std::path::Path) -> f64 {
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

/// Deterministic incompressible-looking bytes (xorshift), fast to make.
pub fn pseudo_random(len: u64, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len as usize);
    while (out.len() as u64) < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len as usize);
    out
}

pub fn append(path: &Path, bytes: &[u8]) {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("open for append");
    file.write_all(bytes).expect("append");
    file.sync_all().expect("sync");
}

pub fn sha256_file(path: &Path) -> String {
    let mut file = File::open(path).expect("open source");
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let read = file.read(&mut buffer).expect("read");
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
    }
    hex::encode(hasher.finalize())
}

/// Whether this process runs as root (then tests run the binary as 10001).
pub fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with("Uid:"))
                .and_then(|line| line.split_whitespace().nth(2).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

/// Short, so takeovers happen within a test; renewals go out every second.
pub const LEASE_TTL: Duration = Duration::from_secs(3);

/// A Redis checkpoint store on the environment's server, as replica `owner`
/// holding leases for [`LEASE_TTL`].
pub fn store_for(env: &TestEnv, owner: &str) -> RedisStore {
    let config = RedisConfig {
        ca_file: None,
        url: env.redis.url(),
        key_prefix: "cstest".into(),
        timeout: Duration::from_secs(5),
    };
    let holder = LeaseHolder {
        owner: owner.into(),
        ttl: LEASE_TTL,
    };
    RedisStore::new(&config, holder).expect("Redis client")
}

/// A fresh, active stream record with id `id` for `cam.mp4`.
pub fn stored_stream(id: &str) -> StoredStream {
    StoredStream {
        id: id.to_string(),
        identity: FileIdentity {
            device: 0,
            inode: 42,
        },
        rel_path: "cam.mp4".into(),
        file_name: "cam.mp4".into(),
        chunk_size: 5 * MIB,
        started_at: std::time::SystemTime::now(),
        last_change_at: std::time::SystemTime::now(),
        status: StoredStatus::Active,
        revision: 0,
        completed_size: 0,
        completed_mtime_ns: 0,
        assembled_revision: 0,
        chunks: BTreeMap::new(),
        head: None,
    }
}

/// Where the tests point `EVENTS_STREAM`.
pub const EVENTS_STREAM: &str = "cstest:events";

/// Every entry of [`EVENTS_STREAM`]: (event id, type, JSON).
pub fn stream_entries(env: &TestEnv) -> Vec<(String, String, serde_json::Value)> {
    let mut con = env.redis.connection();
    let entries: Vec<(String, Vec<String>)> = redis::cmd("XRANGE")
        .arg(EVENTS_STREAM)
        .arg("-")
        .arg("+")
        .query(&mut con)
        .expect("XRANGE");
    entries
        .into_iter()
        .map(|(_, fields)| {
            let field = |name: &str| {
                fields
                    .chunks(2)
                    .find(|pair| pair[0] == name)
                    .map(|pair| pair[1].clone())
                    .unwrap_or_default()
            };
            let event = serde_json::from_str(&field("event")).expect("event JSON");
            (field("id"), field("type"), event)
        })
        .collect()
}
