//! The events the coordinator queues itself: a reopen and a quarantine,
//! once per decision, and not lost while Redis is down.

use super::*;
use crate::notify::{EventType, StreamEvent, event_id};

fn world_with_events() -> World {
    world_with(&["--workers=4", "--events-stream=chunkstream:events"])
}

fn announced_ids(world: &World) -> Vec<String> {
    world
        .store()
        .announced()
        .iter()
        .map(|event| event.id.clone())
        .collect()
}

#[test]
fn a_reopen_is_announced_once_with_the_completed_revision() {
    let mut world = world_with_events();
    let id = complete_one(&mut world, "cam.mp4");
    world.write("cam.mp4", 35 * MIB);
    world.advance(SECOND);
    world.poll();
    world.poll_for(5 * SECOND);
    let reopened = event_id(&id, 1, EventType::StreamReopened);
    assert_eq!(announced_ids(&world), vec![reopened.clone()]);
    let event: StreamEvent = serde_json::from_str(&world.store().announced()[0].json).unwrap();
    assert_eq!(event.kind, EventType::StreamReopened);
    assert_eq!(event.source.path, "cam.mp4");
    assert_eq!(event.size_bytes, Some(35 * MIB));
}

#[test]
fn a_reopen_seen_while_redis_is_down_is_announced_once_it_is_back() {
    let mut world = world_with_events();
    let id = complete_one(&mut world, "cam.mp4");
    world.store().set_down(true);
    world.write("cam.mp4", 35 * MIB);
    world.advance(SECOND);
    world.poll();
    world.poll_for(3 * SECOND);
    assert!(world.store().announced().is_empty());
    world.store().set_down(false);
    world.poll_for(2 * SECOND);
    assert_eq!(
        announced_ids(&world),
        vec![event_id(&id, 1, EventType::StreamReopened)]
    );
}

#[test]
fn a_quarantined_stream_is_announced_as_failed() {
    let mut world = world_with_events();
    world.write("bad.mp4", 15 * MIB);
    world.poll();
    world.work_off();
    let bad = world.stream_id("bad.mp4");
    world
        .store()
        .corrupt(&bad, "chunk size 0 is outside 1..=5368709120");
    world.restart();
    world.poll_for(3 * SECOND);
    let announced = world.store().announced();
    assert_eq!(announced.len(), 1, "{announced:?}");
    let event: StreamEvent = serde_json::from_str(&announced[0].json).unwrap();
    assert_eq!(event.id, event_id(&bad, 0, EventType::StreamFailed));
    assert!(event.reason.unwrap().contains("quarantined: chunk size 0"));
    assert_eq!(event.source.path, "bad.mp4");
}

#[test]
fn without_a_destination_nothing_is_queued() {
    let mut world = world();
    complete_one(&mut world, "cam.mp4");
    world.write("cam.mp4", 35 * MIB);
    world.advance(SECOND);
    world.poll_for(3 * SECOND);
    assert!(world.store().announced().is_empty());
}
