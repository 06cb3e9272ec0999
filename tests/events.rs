//! Completion events against real servers: redis-server, s3s-fs, the real
//! binary, and a webhook receiver written here on a std `TcpListener` that
//! checks every signature and records every delivery id. Each stream that
//! completes must show up exactly once in the Redis stream and (by id) at
//! the webhook, through a webhook outage and a kill -9 mid-delivery; every
//! scenario with the daemon ends byte-exact. One more drives the outbox's
//! Redis scripts directly, as two replicas would.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use chunkstream::metadata::StreamMetadata;

use support::webhook::{Answer, Receiver, SECRET};
use support::{EVENTS_STREAM, MIB, TestEnv, append, pseudo_random, stream_entries, wait_for};

fn stream_ids_of(env: &TestEnv, kind: &str) -> Vec<String> {
    stream_entries(env)
        .into_iter()
        .filter(|(_, entry_kind, _)| entry_kind == kind)
        .map(|(id, _, _)| id)
        .collect()
}

/// Events left in the outbox.
fn outbox_len(env: &TestEnv) -> u64 {
    let mut con = env.redis.connection();
    redis::cmd("ZCARD")
        .arg("cstest:outbox:due")
        .query(&mut con)
        .expect("ZCARD")
}

fn event_settings(receiver: &Receiver) -> Vec<(&'static str, String)> {
    vec![
        ("EVENTS_STREAM", EVENTS_STREAM.to_string()),
        ("WEBHOOK_URL", receiver.url()),
        ("WEBHOOK_SECRET", SECRET.to_string()),
        ("WEBHOOK_TIMEOUT", "3s".to_string()),
    ]
}

fn as_overrides<'a>(settings: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    settings
        .iter()
        .map(|(name, value)| (*name, value.as_str()))
        .collect()
}

fn completed_id(meta: &StreamMetadata) -> String {
    format!("{}/{}/stream.completed", meta.stream_id, meta.revision)
}

/// Drops `count` files and waits for each to complete; returns their
/// metadata, byte-exact.
fn complete_files(env: &TestEnv, count: u64, seed: u64) -> Vec<StreamMetadata> {
    let names: Vec<String> = (0..count).map(|n| format!("cam{seed}-{n}.mp4")).collect();
    for (n, name) in names.iter().enumerate() {
        env.drop_file(
            name,
            &pseudo_random(6 * MIB + 1000 * n as u64, seed + n as u64),
        );
    }
    names
        .iter()
        .map(|name| {
            let meta = env.wait_complete(name);
            env.assert_byte_exact(&meta, &env.file(name));
            meta
        })
        .collect()
}

/// The promise of every scenario: each expected `stream.completed` id
/// arrived at the webhook (signed; duplicates only with the same id), is in
/// the Redis stream exactly once, and nothing is left in the outbox.
fn assert_each_completion_delivered_once(
    env: &TestEnv,
    receiver: &Receiver,
    expected: &BTreeSet<String>,
) {
    wait_for("every stream.completed at the webhook", || {
        receiver.ids_of("stream.completed") == *expected
    });
    wait_for("the outbox to empty", || outbox_len(env) == 0);
    receiver.assert_all_signed();
    let mut in_stream = stream_ids_of(env, "stream.completed");
    in_stream.sort();
    assert_eq!(
        in_stream,
        expected.iter().cloned().collect::<Vec<_>>(),
        "appended once each, however often the webhook was tried"
    );
}

#[test]
fn every_completed_stream_is_announced_once_in_the_stream_and_at_the_webhook() {
    let Some(env) = TestEnv::start() else { return };
    let receiver = Receiver::started();
    let settings = event_settings(&receiver);
    let daemon = env.start_daemon(&as_overrides(&settings));
    let metas = complete_files(&env, 3, 10);
    let expected: BTreeSet<String> = metas.iter().map(completed_id).collect();
    assert_each_completion_delivered_once(&env, &receiver, &expected);
    // The event carries what a downstream system needs.
    let meta = &metas[0];
    let delivery = receiver
        .accepted()
        .into_iter()
        .find(|delivery| delivery.id == completed_id(meta))
        .expect("delivered");
    let event = &delivery.body;
    assert_eq!(event["stream_id"], meta.stream_id.as_str());
    assert_eq!(event["revision"], 1);
    assert_eq!(event["source"]["path"], meta.source.path.as_str());
    assert_eq!(event["size_bytes"], meta.total_size_bytes);
    assert_eq!(event["sha256"], meta.sha256.as_deref().unwrap());
    assert_eq!(
        event["objects"]["metadata"],
        format!("{}{}/metadata.json", env.prefix, meta.stream_id)
    );
    assert_eq!(event["objects"]["chunk_count"], meta.chunks.len());
    assert_eq!(
        format!(
            "{}000000",
            event["objects"]["chunk_prefix"].as_str().unwrap()
        ),
        meta.chunks[0].key
    );

    // A completed file that grows again: reopened, then revision 2.
    let path = env.file(&meta.source.path);
    append(&path, &pseudo_random(2 * MIB, 99));
    let reopened = format!("{}/1/stream.reopened", meta.stream_id);
    let second = format!("{}/2/stream.completed", meta.stream_id);
    wait_for("reopened and revision 2 at the webhook", || {
        receiver.ids_of("stream.reopened") == BTreeSet::from([reopened.clone()])
            && receiver.ids_of("stream.completed").contains(&second)
    });
    let revision_two = env.wait_complete(&meta.source.path);
    env.assert_byte_exact(&revision_two, &path);
    wait_for("the outbox to empty", || outbox_len(&env) == 0);
    assert_eq!(stream_ids_of(&env, "stream.reopened"), vec![reopened]);
    assert_eq!(stream_ids_of(&env, "stream.completed").len(), 4);
    receiver.assert_all_signed();
    assert_eq!(daemon.metric("chunkstream_events_delivered_total"), 5.0);
    assert_eq!(daemon.metric("chunkstream_events_pending"), 0.0);
}

#[test]
fn a_webhook_that_is_down_then_broken_then_back_loses_nothing() {
    let Some(env) = TestEnv::start() else { return };
    // Nobody listens at first: connections are refused.
    let mut receiver = Receiver::unstarted();
    let settings = event_settings(&receiver);
    let daemon = env.start_daemon(&as_overrides(&settings));
    let metas = complete_files(&env, 3, 20);
    let expected: BTreeSet<String> = metas.iter().map(completed_id).collect();
    wait_for("failed webhook deliveries", || {
        daemon.metric("chunkstream_event_delivery_failures_total{destination=\"webhook\"}") >= 3.0
    });
    // The stream has each event already, once, while the webhook waits.
    wait_for("the stream to have all three", || {
        stream_ids_of(&env, "stream.completed").len() == 3
    });
    assert!(daemon.metric("chunkstream_events_pending") >= 1.0);

    // Up, but answering 500 for a while.
    receiver.answer(Answer::ServerError);
    receiver.start();
    wait_for("requests answered 500", || receiver.requests() >= 2);
    assert!(receiver.accepted().is_empty());

    receiver.answer(Answer::Ok);
    assert_each_completion_delivered_once(&env, &receiver, &expected);
    for (meta, name) in metas
        .iter()
        .zip(["cam20-0.mp4", "cam20-1.mp4", "cam20-2.mp4"])
    {
        env.assert_byte_exact(meta, &env.file(name));
    }
}

#[test]
fn a_kill_9_during_delivery_then_a_restart_delivers_everything_with_the_same_ids() {
    let Some(env) = TestEnv::start() else { return };
    let receiver = Receiver::started();
    // Each POST is held for a while, so the kill lands mid-delivery.
    receiver.answer(Answer::Slowly(Duration::from_secs(2)));
    let settings = event_settings(&receiver);
    let daemon = env.start_daemon(&as_overrides(&settings));
    let names = ["cam30-0.mp4", "cam30-1.mp4", "cam30-2.mp4"];
    for (n, name) in names.iter().enumerate() {
        env.drop_file(name, &pseudo_random(6 * MIB + n as u64, 30 + n as u64));
    }
    wait_for("a delivery in flight", || receiver.requests() >= 1);
    daemon.kill_hard();
    assert!(
        receiver.ids_of("stream.completed").len() < names.len(),
        "the kill came before every event was delivered"
    );

    receiver.answer(Answer::Ok);
    let daemon = env.start_daemon(&as_overrides(&settings));
    let metas: Vec<StreamMetadata> = names.iter().map(|name| env.wait_complete(name)).collect();
    let expected: BTreeSet<String> = metas.iter().map(completed_id).collect();
    assert_each_completion_delivered_once(&env, &receiver, &expected);
    // Duplicates at the webhook carry the same id; nothing else arrived.
    let delivered: BTreeSet<String> = receiver.accepted().into_iter().map(|d| d.id).collect();
    assert_eq!(delivered, expected);
    for meta in &metas {
        env.assert_byte_exact(meta, &env.file(&meta.source.path));
    }
    drop(daemon);
}

#[test]
fn the_outbox_takes_an_event_only_with_its_decision_once_and_hands_it_to_one_reader() {
    use chunkstream::notify::{StreamEvent, StreamSubject};
    use chunkstream::store::CheckpointStore;
    use chunkstream::store::ports::{Claim, Completion, Outbox};

    let Some(env) = TestEnv::start() else { return };
    let (mut a, mut b) = (
        support::store_for(&env, "replica-a"),
        support::store_for(&env, "replica-b"),
    );
    a.register_stream(&support::stored_stream("s"), None)
        .unwrap();
    let Claim::Granted { token: stale } = a.claim("s").unwrap() else {
        panic!("a claims")
    };
    let mut redis = env.redis.connection();
    let _: () = redis::cmd("DEL")
        .arg("cstest:lease:s")
        .query(&mut redis)
        .unwrap();
    let Claim::Granted { token } = b.claim("s").unwrap() else {
        panic!("b claims the lapsed stream")
    };
    let layout = chunkstream::metadata::KeyLayout::new("p/");
    let event = StreamEvent::completed(
        StreamSubject {
            stream_id: "s",
            revision: 1,
            source: chunkstream::metadata::Source {
                path: "cam.mp4".into(),
                file_name: "cam.mp4".into(),
            },
            started_at: None,
        },
        &layout,
        (10, "ab", 1),
        std::time::SystemTime::now(),
    )
    .announcement();
    let completion = Completion {
        revision: 1,
        size: 10,
        mtime_ns: 1,
        last_change_at: std::time::SystemTime::now(),
        completed_at: std::time::SystemTime::now(),
        head: None,
        release_lease: false,
        announcement: Some(event.clone()),
    };
    let chunk = chunkstream::metadata::ChunkRecord {
        index: 0,
        key: "p/s/chunk-000000".into(),
        offset: 0,
        size_bytes: 10,
        sha256: "ab".into(),
        uploaded_at: "2026-01-01T00:00:00Z".into(),
        xxh3: None,
        whole_sha256: None,
    };
    b.checkpoint_chunk("s", token, &chunk).unwrap();
    let chunks_kept = |redis: &mut redis::Connection| -> bool {
        redis::cmd("EXISTS")
            .arg("cstest:stream:s:chunks")
            .query(redis)
            .unwrap()
    };
    // The fenced-out replica's completion is refused, and so is its event;
    // the chunk records stay.
    assert!(a.mark_complete("s", stale, &completion).is_err());
    assert_eq!(outbox_len(&env), 0);
    assert!(chunks_kept(&mut redis));
    // The owner's completion carries it and drops the chunk records in the
    // same step; a retried write does not add it twice.
    b.mark_complete("s", token, &completion).unwrap();
    assert!(!chunks_kept(&mut redis));
    b.mark_complete("s", token, &completion).unwrap();
    assert!(!b.announce(&event).unwrap(), "already queued");
    assert_eq!(outbox_len(&env), 1);

    // One reader at a time: the other sees nothing while it is held.
    let hold = Duration::from_secs(30);
    let taken = a.claim_due(hold).unwrap().expect("due");
    assert_eq!((taken.id.as_str(), taken.attempts), (event.id.as_str(), 0));
    assert_eq!(b.claim_due(hold).unwrap(), None);
    // Appended once per id, however often it is tried.
    a.publish(EVENTS_STREAM, 100, &taken, "stream.completed")
        .unwrap();
    b.publish(EVENTS_STREAM, 100, &taken, "stream.completed")
        .unwrap();
    assert_eq!(
        stream_ids_of(&env, "stream.completed"),
        vec![event.id.clone()]
    );
    // A failure makes it due again, counted.
    a.postpone(&taken.id, 1, Duration::ZERO).unwrap();
    let again = b.claim_due(hold).unwrap().expect("due again");
    assert_eq!(again.attempts, 1);
    b.delivered(&again.id).unwrap();
    assert_eq!(outbox_len(&env), 0);
    assert_eq!(a.pending().unwrap(), 0);
    let leftovers: Vec<String> = redis::cmd("KEYS")
        .arg("cstest:outbox*")
        .query(&mut redis)
        .unwrap();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn a_stream_given_up_is_announced_as_failed_and_its_successor_as_completed() {
    let Some(env) = TestEnv::start() else { return };
    let receiver = Receiver::started();
    let mut settings = event_settings(&receiver);
    settings.push(("STREAM_TIMEOUT", "3s".to_string()));
    let daemon = env.start_daemon(&as_overrides(&settings));
    let path = env.file("truncated.mp4");
    append(&path, &pseudo_random(6 * MIB, 40));
    wait_for("chunk 0", || {
        daemon.metric("chunkstream_chunks_uploaded_total") >= 1.0
    });
    std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    append(&path, &pseudo_random(1000, 41));

    let fresh = env.wait_complete("truncated.mp4");
    env.assert_byte_exact(&fresh, &path);
    wait_for("stream.failed at the webhook", || {
        !receiver.ids_of("stream.failed").is_empty()
    });
    let failed = receiver
        .accepted()
        .into_iter()
        .find(|delivery| delivery.kind == "stream.failed")
        .expect("failed");
    let event = &failed.body;
    assert_eq!(event["reason"], "truncated");
    assert_eq!(event["size_bytes"], 5 * MIB, "chunk 0 was uploaded");
    assert_eq!(event["objects"]["chunk_count"], 1);
    assert_ne!(event["stream_id"], fresh.stream_id.as_str());
    assert_eq!(
        failed.id,
        format!("{}/1/stream.failed", event["stream_id"].as_str().unwrap())
    );
    assert_each_completion_delivered_once(&env, &receiver, &BTreeSet::from([completed_id(&fresh)]));
    assert_eq!(stream_ids_of(&env, "stream.failed"), vec![failed.id]);
}
