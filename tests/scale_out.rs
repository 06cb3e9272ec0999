//! Several replicas on one directory, against real redis-server and s3s-fs:
//! they share the work, one owner per stream, a dead replica's streams are
//! taken over, a paused one is fenced out, and a Redis restart loses and
//! duplicates nothing. Every scenario ends byte-exact.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chunkstream::error::FencedWriteError;
use chunkstream::metadata::{ChunkRecord, StreamMetadata};
use chunkstream::store::ports::{Claim, Completion, LeaseStatus};
use chunkstream::store::{CheckpointStore, ObjectStore, StoredStatus};
use support::{
    Daemon, LEASE_TTL, MIB, TestEnv, append, pseudo_random, store_for, stored_stream,
    uploads_in_log, wait_for, wait_for_long,
};

/// Starts `count` replicas on the environment's directory and waits until
/// each sees all of them.
fn start_replicas(env: &TestEnv, count: usize, overrides: &[(&str, &str)]) -> Vec<Daemon> {
    let lease_ttl = format!("{}s", LEASE_TTL.as_secs());
    let mut settings = vec![("LEASE_TTL", lease_ttl.as_str()), ("LOG_FORMAT", "json")];
    settings.extend_from_slice(overrides);
    let replicas: Vec<Daemon> = (0..count).map(|_| env.start_daemon(&settings)).collect();
    wait_for("every replica to count all of them", || {
        replicas
            .iter()
            .all(|replica| replica.metric("chunkstream_replicas") == count as f64)
    });
    replicas
}

/// A writer thread that appends `steps` blocks of `step` bytes to each file,
/// one round every `every`, and can be told to stop early.
struct Writers {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writers {
    fn start(paths: Vec<PathBuf>, step: u64, steps: u64, every: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            for round in 0..steps {
                if stopping.load(Ordering::Relaxed) {
                    return;
                }
                for (n, path) in paths.iter().enumerate() {
                    append(path, &pseudo_random(step, round * 100 + n as u64));
                }
                std::thread::sleep(every);
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) {
        if let Some(thread) = self.thread.take() {
            thread.join().expect("writer thread");
        }
    }
}

impl Drop for Writers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Every file complete, byte-exact, with exactly one `metadata.json`.
fn assert_all_complete_once(env: &TestEnv, rels: &[String]) -> Vec<StreamMetadata> {
    let metas: Vec<StreamMetadata> = rels.iter().map(|rel| env.wait_complete(rel)).collect();
    for (rel, meta) in rels.iter().zip(&metas) {
        env.assert_byte_exact(meta, &env.file(rel));
    }
    let mut per_file: BTreeMap<String, usize> = BTreeMap::new();
    for meta in env.all_metadata() {
        *per_file.entry(meta.source.path).or_default() += 1;
    }
    for rel in rels {
        assert_eq!(
            per_file.get(rel),
            Some(&1),
            "metadata.json objects for {rel}"
        );
    }
    assert_eq!(per_file.len(), rels.len(), "no metadata for unknown files");
    metas
}

/// No chunk key was uploaded by two replicas. (Re-uploads by verification
/// come from the stream's owner, so they never count across replicas.)
fn assert_no_chunk_uploaded_by_two_replicas(logs: &[String]) {
    let uploads: Vec<BTreeSet<(String, u64)>> = logs
        .iter()
        .map(|log| uploads_in_log(log).into_iter().collect())
        .collect();
    for (a, first) in uploads.iter().enumerate() {
        for (b, second) in uploads.iter().enumerate().skip(a + 1) {
            let shared: Vec<_> = first.intersection(second).collect();
            assert!(
                shared.is_empty(),
                "replicas {a} and {b} both uploaded {shared:?}"
            );
        }
    }
}

fn redis_get(env: &TestEnv, key: &str) -> Option<String> {
    let mut connection = env.redis.connection();
    redis::cmd("GET")
        .arg(key)
        .query(&mut connection)
        .expect("GET")
}

fn redis_hash(env: &TestEnv, key: &str) -> BTreeMap<String, String> {
    let mut connection = env.redis.connection();
    redis::cmd("HGETALL")
        .arg(key)
        .query(&mut connection)
        .expect("HGETALL")
}

/// The replica's owner id and the stream ids it owns, from `/streams`.
fn owned_streams(replica: &Daemon) -> (String, Vec<String>) {
    let (status, body) = replica.http("GET", "/streams");
    assert_eq!(status, 200);
    let snapshot: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    let owned = snapshot["streams"]
        .as_array()
        .expect("streams")
        .iter()
        .filter(|stream| stream["owned"] == true)
        .filter_map(|stream| Some(stream["stream_id"].as_str()?.to_string()))
        .collect();
    (
        snapshot["instance"].as_str().expect("instance").to_string(),
        owned,
    )
}

fn chunk_record(index: u64) -> ChunkRecord {
    ChunkRecord {
        index,
        key: format!("s/chunk-{index:06}"),
        offset: index * 5 * MIB,
        size_bytes: 5 * MIB,
        sha256: "00".into(),
        uploaded_at: "t".into(),
        xxh3: None,
        whole_sha256: None,
    }
}

#[test]
fn m0_the_lease_scripts_give_one_owner_and_fence_out_a_stale_one() {
    let Some(env) = TestEnv::start() else { return };
    let (mut a, mut b) = (store_for(&env, "replica-a"), store_for(&env, "replica-b"));
    assert_eq!(a.claim("s").unwrap(), Claim::NoRecord, "nothing registered");
    a.register_stream(&stored_stream("s"), None).unwrap();

    let Claim::Granted { token: first } = a.claim("s").unwrap() else {
        panic!("a claims a free stream")
    };
    assert!(matches!(
        b.claim("s").unwrap(),
        Claim::HeldBy { ref owner, remaining } if owner == "replica-a" && remaining <= LEASE_TTL
    ));
    a.checkpoint_chunk("s", first, &chunk_record(0)).unwrap();
    assert!(
        matches!(
            b.checkpoint_chunk("s", first, &chunk_record(0)),
            Err(FencedWriteError::LeaseLost)
        ),
        "a token is worth nothing to another owner"
    );
    let renewal = a.renew(&[("s", first)]).unwrap();
    assert_eq!(renewal.statuses, vec![LeaseStatus::Held]);
    b.renew(&[]).unwrap();
    assert_eq!(a.renew(&[("s", first)]).unwrap().replicas, 2);

    // a's lease lapses while it is paused, with nobody taking over: it may
    // simply carry on (the token proves nobody claimed in between).
    let mut redis = env.redis.connection();
    let _: () = redis::cmd("DEL")
        .arg("cstest:lease:s")
        .query(&mut redis)
        .unwrap();
    a.checkpoint_chunk("s", first, &chunk_record(1)).unwrap();
    assert_eq!(
        redis::cmd("GET")
            .arg("cstest:lease:s")
            .query::<Option<String>>(&mut redis)
            .unwrap()
            .as_deref(),
        Some("replica-a"),
        "taken back"
    );

    // Now it lapses and b claims: a is fenced out of every write.
    let _: () = redis::cmd("DEL")
        .arg("cstest:lease:s")
        .query(&mut redis)
        .unwrap();
    let Claim::Granted { token: second } = b.claim("s").unwrap() else {
        panic!("b claims a lapsed lease")
    };
    assert!(second > first);
    let completion = Completion {
        revision: 1,
        size: 10,
        mtime_ns: 1,
        last_change_at: std::time::SystemTime::now(),
        completed_at: std::time::SystemTime::now(),
        head: None,
        release_lease: false,
        announcement: None,
    };
    assert!(matches!(
        a.checkpoint_chunk("s", first, &chunk_record(2)),
        Err(FencedWriteError::LeaseLost)
    ));
    assert!(matches!(
        a.mark_complete("s", first, &completion),
        Err(FencedWriteError::LeaseLost)
    ));
    assert!(matches!(
        a.confirm_lease("s", first),
        Err(FencedWriteError::LeaseLost)
    ));
    assert!(matches!(
        a.mark_incomplete("s", first, "vanished", None),
        Err(FencedWriteError::LeaseLost)
    ));
    assert_eq!(
        a.renew(&[("s", first)]).unwrap().statuses,
        vec![LeaseStatus::Lost]
    );
    let before = b.load_stream("s").unwrap().expect("record").expect("valid");
    assert_eq!(
        before.chunks.len(),
        2,
        "only a's writes made under its lease"
    );
    b.mark_complete("s", second, &completion).unwrap();

    // b releases at completion; a's old token still counts for nothing.
    a.release("s", first).unwrap();
    assert!(
        redis::cmd("EXISTS")
            .arg("cstest:lease:s")
            .query::<bool>(&mut redis)
            .unwrap(),
        "a cannot release b's lease"
    );
    b.release("s", second).unwrap();
    assert!(matches!(
        a.mark_complete("s", first, &completion),
        Err(FencedWriteError::LeaseLost)
    ));
    let record = b.load_stream("s").unwrap().expect("record").expect("valid");
    assert_eq!(record.status, StoredStatus::Complete);
    assert!(
        record.chunks.is_empty(),
        "completion drops the chunk records (metadata.json holds them)"
    );

    // A completion with nothing left to do gives the lease up in the same step.
    let Claim::Granted { token: third } = a.claim("s").unwrap() else {
        panic!("a claims the released stream")
    };
    let last = Completion {
        release_lease: true,
        ..completion.clone()
    };
    a.mark_complete("s", third, &last).unwrap();
    assert!(
        !redis::cmd("EXISTS")
            .arg("cstest:lease:s")
            .query::<bool>(&mut redis)
            .unwrap()
    );

    // Redis lost the record: a fenced write waits for it to be written back.
    let _: () = redis::cmd("DEL")
        .arg("cstest:stream:s")
        .query(&mut redis)
        .unwrap();
    assert!(matches!(
        b.checkpoint_chunk("s", second, &chunk_record(2)),
        Err(FencedWriteError::Unavailable(_))
    ));
    assert_eq!(
        b.renew(&[("s", second)]).unwrap().statuses,
        vec![LeaseStatus::NoRecord]
    );
    b.leave().unwrap();
    assert_eq!(a.renew(&[]).unwrap().replicas, 1);
}

#[test]
fn m1_three_replicas_share_thirty_files_and_no_chunk_is_uploaded_twice() {
    let Some(env) = TestEnv::start() else { return };
    let replicas = start_replicas(&env, 3, &[("STREAM_TIMEOUT", "4s")]);

    // 24 files dropped whole, of mixed sizes (some under one chunk, some
    // several), and 6 that grow while the replicas work.
    let mut rels = Vec::new();
    for n in 0..24u64 {
        let rel = format!("cam{}/still-{n:02}.mp4", n % 4);
        let size = [200 * 1024, 3 * MIB, 6 * MIB, 11 * MIB][(n % 4) as usize] + n * 1000;
        env.drop_file(&rel, &pseudo_random(size, n));
        rels.push(rel);
    }
    let mut growing = Vec::new();
    for n in 0..6 {
        let rel = format!("live/rec-{n}.mp4");
        growing.push(env.drop_file(&rel, b""));
        rels.push(rel);
    }
    let writers = Writers::start(growing, 512 * 1024, 20, Duration::from_millis(150));
    writers.finish();

    assert_all_complete_once(&env, &rels);
    let logs: Vec<String> = replicas.iter().map(Daemon::log).collect();
    assert_no_chunk_uploaded_by_two_replicas(&logs);
    for (n, replica) in replicas.iter().enumerate() {
        let completed = replica.metric("chunkstream_streams_completed_total{status=\"complete\"}");
        assert!(
            completed > 0.0 && replica.metric("chunkstream_chunks_uploaded_total") > 0.0,
            "replica {n} did no work ({completed} streams completed)"
        );
        assert_eq!(replica.metric("chunkstream_leases_lost_total"), 0.0);
    }
    let completed: f64 = replicas
        .iter()
        .map(|r| r.metric("chunkstream_streams_completed_total{status=\"complete\"}"))
        .sum();
    assert_eq!(completed, rels.len() as f64, "each file completed once");
}

#[test]
fn m2_a_replica_killed_mid_run_has_its_streams_finished_by_the_others() {
    let Some(env) = TestEnv::start() else { return };
    let mut replicas = start_replicas(&env, 3, &[("STREAM_TIMEOUT", "3s")]);
    let rels: Vec<String> = (0..6).map(|n| format!("rec-{n}.mp4")).collect();
    let paths: Vec<PathBuf> = rels.iter().map(|rel| env.drop_file(rel, b"")).collect();
    // About 12 MiB each over ~12 s: two full chunks and a tail per file.
    let writers = Writers::start(paths, 512 * 1024, 24, Duration::from_millis(500));

    // The victim: a replica that owns streams and has uploaded some chunks.
    let mut victim = None;
    wait_for("a replica to be mid-work", || {
        victim = replicas.iter().position(|replica| {
            replica.metric("chunkstream_chunks_uploaded_total") > 0.0
                && !owned_streams(replica).1.is_empty()
        });
        victim.is_some()
    });
    let victim = replicas.remove(victim.expect("found"));
    let (victim_id, taken) = owned_streams(&victim);
    victim.kill_hard();
    let killed_at = Instant::now();

    // Within LEASE_TTL + POLL_INTERVAL (with a wide margin for a busy
    // machine), every stream it owned has another owner.
    let mut taken_over = BTreeMap::new();
    wait_for_long(
        "the dead replica's streams to be claimed",
        LEASE_TTL * 8,
        || {
            let finished: BTreeSet<String> = env
                .all_metadata()
                .into_iter()
                .map(|meta| meta.stream_id)
                .collect();
            for id in &taken {
                let claimed = redis_get(&env, &format!("cstest:lease:{id}"))
                    .is_some_and(|owner| owner != victim_id);
                if claimed || finished.contains(id) {
                    taken_over.entry(id.clone()).or_insert(killed_at.elapsed());
                }
            }
            taken_over.len() == taken.len()
        },
    );
    writers.finish();

    let metas = assert_all_complete_once(&env, &rels);
    for id in &taken {
        assert!(
            metas.iter().any(|meta| &meta.stream_id == id),
            "stream {id} of the dead replica was finished under its own id"
        );
    }
    let claims: f64 = replicas
        .iter()
        .map(|r| r.metric("chunkstream_lease_claims_total"))
        .sum();
    assert!(claims >= taken.len() as f64);
}

#[test]
fn m3_a_paused_replica_is_fenced_out_and_cannot_undo_the_new_owners_work() {
    let Some(env) = TestEnv::start() else { return };
    let replicas = start_replicas(&env, 2, &[("STREAM_TIMEOUT", "2s")]);
    let rel = "fenced.mp4";
    let path = env.drop_file(rel, b"");
    append(&path, &pseudo_random(6 * MIB, 1));

    // The owner uploads chunk 0; then it is paused for well over LEASE_TTL.
    let mut owner = None;
    wait_for("the owner to upload chunk 0", || {
        owner = replicas
            .iter()
            .position(|replica| replica.metric("chunkstream_chunks_uploaded_total") >= 1.0);
        owner.is_some()
    });
    let (paused, other) = match owner.expect("found") {
        0 => (&replicas[0], &replicas[1]),
        _ => (&replicas[1], &replicas[0]),
    };
    let (_, owned) = owned_streams(paused);
    let stream_id = owned.first().expect("the paused replica owns it").clone();
    paused.process.signal("STOP");

    // Meanwhile the file grows and settles; the other replica takes over
    // after the lease lapses and completes it.
    append(&path, &pseudo_random(7 * MIB, 2));
    let meta = env.wait_complete(rel);
    assert_eq!(meta.stream_id, stream_id);
    assert!(other.metric("chunkstream_lease_claims_total") >= 1.0);
    let metadata_key = format!("{}{stream_id}/metadata.json", env.prefix);
    let metadata_before = env.store.get(&metadata_key).expect("metadata");
    let record_before = redis_hash(&env, &format!("cstest:stream:{stream_id}"));
    let chunks_before = redis_hash(&env, &format!("cstest:stream:{stream_id}:chunks"));
    assert_eq!(record_before["status"], "complete");

    // Resumed, it must find out it lost the lease and write nothing.
    paused.process.signal("CONT");
    wait_for("the resumed replica to notice it lost the lease", || {
        paused.log().contains("lost the lease")
            && paused.metric("chunkstream_streams_owned") == 0.0
            && paused.metric("chunkstream_inflight_jobs") == 0.0
    });
    assert_eq!(paused.metric("chunkstream_leases_lost_total"), 1.0);
    // Give it a few more turns (and renewals) to do anything wrong.
    std::thread::sleep(LEASE_TTL);
    assert_eq!(
        env.store.get(&metadata_key).expect("metadata"),
        metadata_before,
        "the completed metadata was overwritten"
    );
    let record_after = redis_hash(&env, &format!("cstest:stream:{stream_id}"));
    for field in ["status", "rev", "sz", "mt"] {
        assert_eq!(
            record_after[field], record_before[field],
            "record field {field}"
        );
    }
    assert_eq!(
        redis_hash(&env, &format!("cstest:stream:{stream_id}:chunks")),
        chunks_before,
        "the checkpoint moved"
    );
    env.assert_byte_exact(&meta, &path);
    let (_, owned_after) = owned_streams(paused);
    assert!(owned_after.is_empty(), "{owned_after:?}");
}

#[test]
fn m4_a_redis_restart_during_a_multi_replica_run_loses_and_duplicates_nothing() {
    let Some(mut env) = TestEnv::start() else {
        return;
    };
    let replicas = start_replicas(&env, 3, &[("STREAM_TIMEOUT", "3s")]);
    let rels: Vec<String> = (0..6).map(|n| format!("r/rec-{n}.mp4")).collect();
    let paths: Vec<PathBuf> = rels.iter().map(|rel| env.drop_file(rel, b"")).collect();
    let writers = Writers::start(paths, 512 * 1024, 24, Duration::from_millis(400));
    wait_for("chunks to be uploaded", || {
        replicas
            .iter()
            .map(|r| r.metric("chunkstream_chunks_uploaded_total"))
            .sum::<f64>()
            >= 3.0
    });

    // Redis dies (kill -9) and comes back with its AOF a moment later.
    env.redis.crash_and_restart(true);

    // The leases are re-established: while the files still grow, every
    // active stream's lease is held by a live replica.
    let live: BTreeSet<String> = replicas.iter().map(|r| owned_streams(r).0).collect();
    wait_for("the leases to be held again after the restart", || {
        let owned: Vec<String> = replicas.iter().flat_map(|r| owned_streams(r).1).collect();
        !owned.is_empty()
            && owned.iter().all(|id| {
                redis_get(&env, &format!("cstest:lease:{id}"))
                    .is_some_and(|holder| live.contains(&holder))
            })
    });
    writers.finish();

    assert_all_complete_once(&env, &rels);
    let logs: Vec<String> = replicas.iter().map(Daemon::log).collect();
    assert_no_chunk_uploaded_by_two_replicas(&logs);
    for replica in &replicas {
        assert_eq!(replica.metric("chunkstream_leases_lost_total"), 0.0);
    }
    assert_eq!(env.registered_stream_ids().len(), rels.len());
}
