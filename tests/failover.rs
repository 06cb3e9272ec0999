//! No single point of failure, against real servers: a Redis master killed
//! mid-upload while two replicas run through Redis Sentinel, and a replica
//! with an `INSTANCE_ID` killed and restarted at once, or started twice.
//! Every scenario ends byte-exact.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use support::{
    Daemon, MIB, Process, RedisServer, TestEnv, UPLOADED, append, chunkstream_binary, free_port,
    log_entries, pseudo_random, require_tool, uploads_in_log, wait_for,
};

const MASTER_NAME: &str = "cstest-master";

/// Three sentinels watching one master on loopback, quorum 2, declaring it
/// down after one second.
struct Sentinels {
    /// Killed when dropped.
    _processes: Vec<Process>,
    ports: Vec<u16>,
    _dir: tempfile::TempDir,
}

impl Sentinels {
    fn start(master_port: u16) -> Option<Self> {
        let binary = require_tool("redis-sentinel")?;
        let dir = tempfile::tempdir().expect("sentinel dir");
        let mut processes = Vec::new();
        let mut ports = Vec::new();
        for number in 0..3 {
            let port = free_port();
            let config = dir.path().join(format!("sentinel-{number}.conf"));
            std::fs::write(
                &config,
                format!(
                    "port {port}\nbind 127.0.0.1\ndir {}\n\
                     sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} 2\n\
                     sentinel down-after-milliseconds {MASTER_NAME} 1000\n\
                     sentinel failover-timeout {MASTER_NAME} 10000\n",
                    dir.path().display()
                ),
            )
            .expect("sentinel config");
            let log = dir.path().join(format!("sentinel-{number}.log"));
            let output = std::fs::File::create(&log).expect("sentinel log");
            let child = Command::new(&binary)
                .arg(&config)
                .stdout(output.try_clone().expect("log"))
                .stderr(output)
                .spawn()
                .expect("redis-sentinel starts");
            processes.push(Process { child, log });
            ports.push(port);
        }
        Some(Self {
            _processes: processes,
            ports,
            _dir: dir,
        })
    }

    fn query<T: redis::FromRedisValue>(&self, port: u16, args: &[&str]) -> Option<T> {
        let mut connection = redis::Client::open(format!("redis://127.0.0.1:{port}"))
            .ok()?
            .get_connection_with_timeout(Duration::from_secs(2))
            .ok()?;
        redis::cmd("SENTINEL").arg(args).query(&mut connection).ok()
    }

    /// Until every sentinel knows the replica and the two other sentinels,
    /// without which no failover can be agreed on.
    fn wait_ready(&self) {
        wait_for("the sentinels to know the replica and each other", || {
            self.ports.iter().all(|&port| {
                let replicas: Vec<redis::Value> = self
                    .query(port, &["replicas", MASTER_NAME])
                    .unwrap_or_default();
                let others: Vec<redis::Value> = self
                    .query(port, &["sentinels", MASTER_NAME])
                    .unwrap_or_default();
                replicas.len() == 1 && others.len() == 2
            })
        });
    }

    fn master_port(&self) -> Option<u16> {
        self.ports.iter().find_map(|&port| {
            self.query::<(String, u16)>(port, &["get-master-addr-by-name", MASTER_NAME])
                .map(|(_, master)| master)
        })
    }

    fn addresses(&self) -> String {
        let addresses: Vec<String> = self
            .ports
            .iter()
            .map(|port| format!("127.0.0.1:{port}"))
            .collect();
        addresses.join(",")
    }
}

/// The timestamps of the chunk uploads in a JSON log.
fn upload_times(log: &str) -> Vec<SystemTime> {
    log_entries(log, UPLOADED)
        .into_iter()
        .filter_map(|entry| humantime::parse_rfc3339(entry["ts"].as_str()?).ok())
        .collect()
}

/// How many times each stream was logged complete, over several logs.
fn completions(logs: &[String]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for entry in logs.iter().flat_map(|log| log_entries(log, ": complete (")) {
        let id = entry["stream_id"].as_str().unwrap_or_default().to_string();
        *counts.entry(id).or_default() += 1;
    }
    counts
}

/// Appends `rounds` blocks of `block` bytes to each file, one round every
/// `every`, on a thread.
fn grow(
    paths: Vec<PathBuf>,
    block: u64,
    rounds: u64,
    every: Duration,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for round in 0..rounds {
            for (number, path) in paths.iter().enumerate() {
                append(path, &pseudo_random(block, round * 16 + number as u64));
            }
            std::thread::sleep(every);
        }
    })
}

fn still_running(daemon: &mut Daemon) -> bool {
    daemon.process.child.try_wait().expect("try_wait").is_none()
}

#[test]
fn f1_a_redis_master_killed_mid_upload_fails_over_to_its_replica_with_no_chunk_lost_or_doubled() {
    let Some(mut env) = TestEnv::start() else {
        return;
    };
    let master_port = env.redis.port.to_string();
    let Some(replica) = RedisServer::start_with_args(&["--replicaof", "127.0.0.1", &master_port])
    else {
        return;
    };
    let Some(sentinels) = Sentinels::start(env.redis.port) else {
        return;
    };
    sentinels.wait_ready();
    let addresses = sentinels.addresses();
    let settings = [
        ("REDIS_URL", ""),
        ("REDIS_SENTINELS", addresses.as_str()),
        ("REDIS_SENTINEL_MASTER", MASTER_NAME),
        ("LEASE_TTL", "5s"),
        ("LOG_FORMAT", "json"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ];
    let mut replicas: Vec<Daemon> = (0..2).map(|_| env.start_daemon(&settings)).collect();
    wait_for("both replicas to see each other", || {
        replicas
            .iter()
            .all(|replica| replica.metric("chunkstream_replicas") == 2.0)
    });

    // Four recordings, 24 MiB each, growing for about ten seconds.
    let rels: Vec<String> = (0..4).map(|n| format!("cam{n}.mp4")).collect();
    let paths: Vec<PathBuf> = rels.iter().map(|rel| env.file(rel)).collect();
    let writer = grow(paths.clone(), MIB / 2, 48, Duration::from_millis(200));
    wait_for("a few chunks uploaded before the failover", || {
        replicas
            .iter()
            .map(|replica| uploads_in_log(&replica.log()).len())
            .sum::<usize>()
            >= 4
    });

    let killed_at = SystemTime::now();
    env.redis.process.kill_hard();
    wait_for("the sentinels to promote the replica", || {
        sentinels.master_port() == Some(replica.port)
    });
    let promoted = killed_at.elapsed().unwrap_or_default();
    writer.join().expect("writer thread");

    let metas: Vec<_> = rels.iter().map(|rel| env.wait_complete(rel)).collect();
    for (meta, path) in metas.iter().zip(&paths) {
        env.assert_byte_exact(meta, path);
    }
    for replica in &mut replicas {
        assert!(
            still_running(replica),
            "a replica exited:\n{}",
            replica.log()
        );
    }
    let logs: Vec<String> = replicas.iter().map(Daemon::log).collect();

    // No chunk key uploaded by both replicas; each stream completed once.
    let mut uploaded_by: BTreeMap<(String, u64), usize> = BTreeMap::new();
    for (number, log) in logs.iter().enumerate() {
        for upload in uploads_in_log(log) {
            let owner = uploaded_by.entry(upload.clone()).or_insert(number);
            assert_eq!(*owner, number, "{upload:?} uploaded by both replicas");
        }
    }
    let completed = completions(&logs);
    for meta in &metas {
        assert_eq!(
            completed.get(&meta.stream_id),
            Some(&1),
            "{}",
            meta.stream_id
        );
    }
    for log in &logs {
        assert_eq!(
            log.matches("(failover); carrying on there").count(),
            1,
            "each replica follows the failover and says so once:\n{log}"
        );
    }

    // The outage uploads saw: from the kill to the first chunk checkpointed
    // on the new master.
    let times: Vec<SystemTime> = logs.iter().flat_map(|log| upload_times(log)).collect();
    let first_after = times
        .iter()
        .filter(|&&time| time > killed_at)
        .min()
        .expect("uploads after the failover");
    let outage = first_after.duration_since(killed_at).unwrap_or_default();
    println!(
        "failover outage: the sentinels named the new master {:.1} s after SIGKILL of the old one; \
         the first chunk after it was checkpointed {:.1} s after the SIGKILL",
        promoted.as_secs_f64(),
        outage.as_secs_f64()
    );
    assert!(
        outage < Duration::from_secs(30),
        "uploads resumed only {outage:?} after the master died"
    );
}

/// The id of the only registered stream, once there is exactly one.
fn only_stream(env: &TestEnv) -> Option<String> {
    let ids = env.registered_stream_ids();
    (ids.len() == 1).then(|| ids[0].clone())
}

/// Starts `chunkstream run` with the environment's settings plus
/// `overrides`, without waiting for it to serve anything.
fn spawn_chunkstream(env: &TestEnv, overrides: &[(&str, &str)], log_dir: &Path) -> Process {
    let log = log_dir.join("twin.log");
    let output = std::fs::File::create(&log).expect("log");
    let child = Command::new(chunkstream_binary())
        .arg("run")
        .env_clear()
        .envs(env.daemon_env())
        .envs(overrides.iter().copied())
        .env("METRICS_ADDR", format!("127.0.0.1:{}", free_port()))
        .stdin(Stdio::null())
        .stdout(output.try_clone().expect("log"))
        .stderr(output)
        .spawn()
        .expect("chunkstream starts");
    Process { child, log }
}

#[test]
fn i1_a_replica_restarted_with_its_instance_id_resumes_at_once_and_a_twin_is_refused() {
    let Some(env) = TestEnv::start() else {
        return;
    };
    const POLL_INTERVAL: Duration = Duration::from_secs(1);
    let settings = [
        ("INSTANCE_ID", "chunkstream-0"),
        ("POLL_INTERVAL", "1s"),
        ("LEASE_TTL", "30s"),
        ("STREAM_TIMEOUT", "8s"),
        ("LOG_FORMAT", "json"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ];
    let rel = "live.mp4";
    let path = env.file(rel);
    append(&path, &pseudo_random(5 * MIB + 1000, 1));
    let first = env.start_daemon(&settings);
    let mut stream_id = None;
    wait_for("the first chunk checkpointed", || {
        stream_id = only_stream(&env);
        stream_id
            .as_ref()
            .is_some_and(|id| env.checkpointed_chunks(id) == 1)
    });
    let stream_id = stream_id.expect("stream id");

    // kill -9, the next chunk's bytes arrive, and the same instance restarts
    // at once, while the dead process's lease still has ~30 s to run.
    first.kill_hard();
    append(&path, &pseudo_random(5 * MIB, 2));
    let restarted_at = Instant::now();
    let second = env.start_daemon(&settings);
    wait_for("the next chunk after the restart", || {
        env.checkpointed_chunks(&stream_id) >= 2
    });
    let resumed = restarted_at.elapsed();
    println!(
        "instant resume: the next chunk landed {:.1} s after the restart",
        resumed.as_secs_f64()
    );
    assert!(
        resumed < POLL_INTERVAL + Duration::from_secs(5),
        "the restarted instance took {resumed:?} (bound: POLL_INTERVAL + 5 s)"
    );

    // A second live process with the same INSTANCE_ID refuses to start.
    let log_dir = tempfile::tempdir().expect("log dir");
    let mut twin = spawn_chunkstream(&env, &settings, log_dir.path());
    let status = twin.wait_exit();
    let twin_log = twin.log_text();
    assert_eq!(status.code(), Some(2), "{twin_log}");
    assert!(
        twin_log.contains("INSTANCE_ID") && twin_log.contains("another live process"),
        "{twin_log}"
    );
    assert!(uploads_in_log(&twin_log).is_empty(), "{twin_log}");

    // The live one still owns the stream and finishes it.
    append(&path, &pseudo_random(3 * MIB, 3));
    let meta = env.wait_complete(rel);
    assert_eq!(meta.stream_id, stream_id, "the same stream continued");
    env.assert_byte_exact(&meta, &path);
    assert_eq!(second.metric("chunkstream_leases_lost_total"), 0.0);
    let (status, log) = second.terminate();
    assert!(status.success(), "{log}");
}
