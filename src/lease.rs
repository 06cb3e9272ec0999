//! Stream ownership when several replicas share one directory.
//!
//! Every replica scans the whole directory and tracks every stream, but only
//! the holder of a stream's lease (in Redis) uploads, completes or closes it.
//! This module keeps this process's side of that: the leases it holds with
//! their fencing tokens, when other replicas' leases are worth asking about
//! again, how many streams it may own (its fair share), and until when each
//! lease can be trusted, which workers check before they write an object.
//! The Redis side (claim, renew, release, fenced writes) lives in
//! `store::redis`; docs/scaling.md explains the whole model.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::LeasePolicy;

/// The leases this process holds, shared between the coordinator (which
/// claims, renews and gives them up) and the workers (which check them before
/// every object write).
///
/// A lease is trusted until most of `LEASE_TTL` after the request that
/// granted or last renewed it was sent. When renewals stop succeeding (a long
/// pause, a partition) it runs out, and workers stop writing objects for the
/// stream before another replica can have taken it over.
///
/// With `INSTANCE_ID`, every lease also depends on this process still being
/// the instance's live incarnation: a restart of the same instance takes
/// the leases over at once, so writes stop as soon as the liveness key can
/// no longer be trusted (see `instance`).
#[derive(Debug)]
pub struct HeldLeases {
    /// The part of `LEASE_TTL` trusted from the moment a request was sent.
    trusted: Duration,
    leases: Mutex<HashMap<String, HeldLease>>,
    /// With `INSTANCE_ID`: until when this process is certainly its live
    /// incarnation. `None` without one.
    incarnation_until: Mutex<Option<Instant>>,
}

#[derive(Debug, Clone, Copy)]
struct HeldLease {
    token: u64,
    valid_until: Instant,
}

impl HeldLeases {
    pub fn new(ttl: Duration) -> Self {
        Self {
            // A tenth of the TTL covers the drift between this clock and
            // Redis's, and the time the request took to arrive.
            trusted: ttl - ttl / 10,
            leases: Mutex::new(HashMap::new()),
            incarnation_until: Mutex::new(None),
        }
    }

    /// Records that this process held its `INSTANCE_ID`'s liveness key,
    /// lasting `ttl`, by a request sent at `sent`. From the first call on,
    /// every lease is trusted only while this is.
    pub fn incarnation_confirmed(&self, ttl: Duration, sent: Instant) {
        let until = sent + (ttl - ttl / 10);
        let mut current = self
            .incarnation_until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *current = Some(current.map_or(until, |known| known.max(until)));
    }

    fn incarnation_valid(&self, now: Instant) -> bool {
        self.incarnation_until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_none_or(|until| now < until)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, HeldLease>> {
        self.leases
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records that the stream's lease was granted or renewed with `token`
    /// by a request sent at `sent`.
    pub fn renewed(&self, stream_id: &str, token: u64, sent: Instant) {
        let valid_until = sent + self.trusted;
        self.lock()
            .entry(stream_id.to_string())
            .and_modify(|lease| {
                if lease.token != token {
                    *lease = HeldLease { token, valid_until };
                } else {
                    lease.valid_until = lease.valid_until.max(valid_until);
                }
            })
            .or_insert(HeldLease { token, valid_until });
    }

    /// Forgets a lease given up or lost; true if it was held.
    pub fn revoke(&self, stream_id: &str) -> bool {
        self.lock().remove(stream_id).is_some()
    }

    /// The fencing token if this process holds the stream.
    pub fn token(&self, stream_id: &str) -> Option<u64> {
        self.lock().get(stream_id).map(|lease| lease.token)
    }

    /// Whether the stream is still certainly held with `token` at `now`.
    pub fn is_valid(&self, stream_id: &str, token: u64, now: Instant) -> bool {
        self.lock()
            .get(stream_id)
            .is_some_and(|lease| lease.token == token && now < lease.valid_until)
            && self.incarnation_valid(now)
    }

    /// Every held lease (stream id, token), sorted.
    pub fn all(&self) -> Vec<(String, u64)> {
        let mut held: Vec<(String, u64)> = self
            .lock()
            .iter()
            .map(|(id, lease)| (id.clone(), lease.token))
            .collect();
        held.sort();
        held
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The leases this process holds, and what it knows of the others'.
#[derive(Debug)]
pub struct Ownership {
    policy: LeasePolicy,
    leases: Arc<HeldLeases>,
    /// Stream id → when a claim is worth trying again (another replica held
    /// the lease until then).
    held_elsewhere: HashMap<String, Instant>,
    /// Live replicas at the last renewal (1 before the first).
    replicas: usize,
    next_renewal: Instant,
}

impl Ownership {
    pub fn new(policy: LeasePolicy, leases: Arc<HeldLeases>, now: Instant) -> Self {
        Self {
            policy,
            leases,
            held_elsewhere: HashMap::new(),
            replicas: 1,
            next_renewal: now,
        }
    }

    /// The fencing token if this process holds the stream.
    pub fn token(&self, stream_id: &str) -> Option<u64> {
        self.leases.token(stream_id)
    }

    pub fn held_count(&self) -> usize {
        self.leases.len()
    }

    /// Every held lease, for a renewal.
    pub fn held(&self) -> Vec<(String, u64)> {
        self.leases.all()
    }

    /// Records a lease granted or renewed by a request sent at `sent`.
    pub fn granted(&mut self, stream_id: &str, token: u64, sent: Instant) {
        self.held_elsewhere.remove(stream_id);
        self.leases.renewed(stream_id, token, sent);
    }

    /// Forgets a lease given up or lost; true if it was held.
    pub fn drop_lease(&mut self, stream_id: &str) -> bool {
        self.leases.revoke(stream_id)
    }

    /// Another replica holds the stream for at least `remaining`.
    pub fn held_by_other(&mut self, stream_id: &str, now: Instant, remaining: Duration) {
        // Asked again once that lease would have run out, or within one TTL
        // if it said nothing useful, so a takeover is never late by more than
        // a poll after the lease lapses.
        let wait = remaining.min(self.policy.ttl);
        self.held_elsewhere
            .insert(stream_id.to_string(), now + wait);
    }

    /// Whether a claim on the stream is worth a round trip now.
    pub fn worth_claiming(&self, stream_id: &str, now: Instant) -> bool {
        self.held_elsewhere
            .get(stream_id)
            .is_none_or(|&until| now >= until)
    }

    /// Forgets what it knew about a stream that left the table.
    pub fn forget(&mut self, stream_id: &str) {
        self.held_elsewhere.remove(stream_id);
    }

    /// How many streams this process may own while `demand` streams want an
    /// owner: its share among the live replicas (rounded up, so together they
    /// always cover every stream), and never more than `MAX_OWNED_STREAMS`.
    pub fn claim_limit(&self, demand: usize) -> usize {
        let share = demand.div_ceil(self.replicas).max(1);
        self.policy
            .max_owned_streams
            .map_or(share, |cap| share.min(cap))
    }

    pub fn may_claim(&self, demand: usize) -> bool {
        self.held_count() < self.claim_limit(demand)
    }

    pub fn replicas(&self) -> usize {
        self.replicas
    }

    /// Whether the leases are due for renewal (every third of `LEASE_TTL`).
    pub fn renewal_due(&self, now: Instant) -> bool {
        now >= self.next_renewal
    }

    /// When the next renewal is due.
    pub fn next_renewal(&self) -> Instant {
        self.next_renewal
    }

    /// Schedules the next renewal; `replicas` is what this one counted.
    pub fn renewal_done(&mut self, now: Instant, replicas: Option<usize>) {
        if let Some(replicas) = replicas {
            self.replicas = replicas.max(1);
        }
        self.next_renewal = now + self.policy.ttl / 3;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(cap: Option<usize>) -> LeasePolicy {
        LeasePolicy {
            ttl: Duration::from_secs(30),
            max_owned_streams: cap,
        }
    }

    fn new_ownership(cap: Option<usize>, now: Instant) -> Ownership {
        Ownership::new(
            policy(cap),
            Arc::new(HeldLeases::new(Duration::from_secs(30))),
            now,
        )
    }

    #[test]
    fn the_fair_share_covers_every_stream_and_respects_the_cap() {
        let now = Instant::now();
        let mut ownership = new_ownership(None, now);
        assert_eq!(ownership.claim_limit(30), 30, "alone, it owns everything");
        ownership.renewal_done(now, Some(3));
        assert_eq!(ownership.claim_limit(30), 10);
        assert_eq!(ownership.claim_limit(31), 11, "rounded up");
        assert_eq!(ownership.claim_limit(0), 1);
        assert_eq!(new_ownership(Some(4), now).claim_limit(30), 4);
    }

    #[test]
    fn claims_stop_at_the_limit_and_resume_when_a_lease_is_dropped() {
        let now = Instant::now();
        let mut ownership = new_ownership(Some(2), now);
        ownership.granted("a", 1, now);
        assert!(ownership.may_claim(10));
        ownership.granted("b", 7, now);
        assert!(!ownership.may_claim(10));
        assert_eq!(ownership.token("b"), Some(7));
        assert!(ownership.drop_lease("a"));
        assert!(!ownership.drop_lease("a"));
        assert!(ownership.may_claim(10));
        assert_eq!(ownership.held(), vec![("b".to_string(), 7)]);
    }

    #[test]
    fn another_replicas_lease_is_asked_about_again_when_it_would_lapse() {
        let now = Instant::now();
        let mut ownership = new_ownership(None, now);
        ownership.held_by_other("s", now, Duration::from_secs(5));
        assert!(!ownership.worth_claiming("s", now + Duration::from_secs(4)));
        assert!(ownership.worth_claiming("s", now + Duration::from_secs(5)));
        // A lease with no expiry is asked about again within one TTL.
        ownership.held_by_other("t", now, Duration::MAX);
        assert!(ownership.worth_claiming("t", now + Duration::from_secs(30)));
        ownership.granted("s", 3, now);
        assert!(ownership.worth_claiming("s", now));
    }

    #[test]
    fn renewals_are_due_every_third_of_the_ttl() {
        let now = Instant::now();
        let mut ownership = new_ownership(None, now);
        assert!(ownership.renewal_due(now));
        ownership.renewal_done(now, Some(2));
        assert_eq!(ownership.replicas(), 2);
        assert!(!ownership.renewal_due(now + Duration::from_secs(9)));
        assert_eq!(ownership.next_renewal(), now + Duration::from_secs(10));
        assert!(ownership.renewal_due(now + Duration::from_secs(10)));
    }

    #[test]
    fn a_lease_is_trusted_for_most_of_its_ttl_after_the_request_and_per_token() {
        let leases = HeldLeases::new(Duration::from_secs(10));
        let sent = Instant::now();
        assert!(!leases.is_valid("s", 1, sent), "nothing held yet");
        leases.renewed("s", 1, sent);
        assert!(leases.is_valid("s", 1, sent + Duration::from_secs(8)));
        assert!(!leases.is_valid("s", 1, sent + Duration::from_secs(9)));
        assert!(!leases.is_valid("s", 2, sent), "another claim's token");
        // An older renewal never shortens it.
        leases.renewed("s", 1, sent - Duration::from_secs(5));
        assert!(leases.is_valid("s", 1, sent + Duration::from_secs(8)));
        assert!(leases.revoke("s"));
        assert!(!leases.is_valid("s", 1, sent));
    }

    #[test]
    fn with_an_instance_id_a_lease_is_trusted_only_while_the_incarnation_is() {
        let leases = HeldLeases::new(Duration::from_secs(30));
        let sent = Instant::now();
        leases.renewed("s", 1, sent);
        assert!(leases.is_valid("s", 1, sent + Duration::from_secs(20)));
        leases.incarnation_confirmed(Duration::from_secs(3), sent);
        assert!(leases.is_valid("s", 1, sent + Duration::from_secs(2)));
        assert!(!leases.is_valid("s", 1, sent + Duration::from_secs(3)));
        // A later heartbeat extends it; an older one never shortens it.
        leases.incarnation_confirmed(Duration::from_secs(3), sent + Duration::from_secs(2));
        leases.incarnation_confirmed(Duration::from_secs(3), sent);
        assert!(leases.is_valid("s", 1, sent + Duration::from_secs(4)));
    }
}
