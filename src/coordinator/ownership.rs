//! Ownership, as the coordinator exercises it: claiming a stream's lease
//! (and merging in what its record says), renewing every lease every third
//! of `LEASE_TTL`, noticing one lost, giving leases up, and writing back a
//! record Redis lost. The bookkeeping itself is `crate::lease`.

use super::*;

impl Coordinator {
    /// Renews this process's leases and its place among the live replicas,
    /// every third of `LEASE_TTL`. A lease found lost is dropped (its stream
    /// now belongs to another replica); a stream whose record is gone (Redis
    /// lost its data) is written back, so the next renewal keeps it.
    pub(super) fn renew_leases(&mut self, sent: Instant) {
        if !self.ownership.renewal_due(sent) {
            return;
        }
        let held = self.ownership.held();
        let leases: Vec<(&str, u64)> = held
            .iter()
            .map(|(id, token)| (id.as_str(), *token))
            .collect();
        match self.checkpoints.renew(&leases) {
            Ok(renewal) => {
                let mut without_record: HashMap<&str, u64> = HashMap::new();
                for ((stream_id, token), status) in held.iter().zip(renewal.statuses) {
                    match status {
                        LeaseStatus::Held => self.ownership.granted(stream_id, *token, sent),
                        LeaseStatus::Lost => self.lose_lease(stream_id),
                        LeaseStatus::NoRecord => {
                            without_record.insert(stream_id, *token);
                        }
                    }
                }
                if !without_record.is_empty() {
                    // One pass over the table, however many records are gone.
                    let lost: Vec<(crate::store::StoredStream, u64)> = self
                        .table
                        .iter()
                        .filter_map(|stream| {
                            let token = without_record.get(stream.id.as_str())?;
                            Some((stream.to_stored(), *token))
                        })
                        .collect();
                    for (stored, token) in lost {
                        self.write_back(&stored, Some(token));
                    }
                }
                self.ownership.renewal_done(sent, Some(renewal.replicas));
            }
            Err(err) => {
                // The leases hold for the rest of their TTL; workers stop
                // writing objects once that runs out.
                debug!("cannot renew {} leases: {err}", held.len());
                self.events
                    .dependency_checked(Dependency::Redis, Err(err.to_string()));
                self.ownership.renewal_done(sent, None);
            }
        }
    }

    /// Writes back the record of one stream whose record Redis lost: with
    /// `token` when this process owns it, else this replica's view of it.
    pub(super) fn write_back(&mut self, stored: &crate::store::StoredStream, token: Option<u64>) {
        let stream_id = stored.id.as_str();
        match self.checkpoints.restore_stream(stored, token) {
            Ok(true) => warn!(
                stream_id = stream_id;
                "stream {stream_id}: its record was gone from Redis; wrote back what this replica knew"
            ),
            Ok(false) => {}
            Err(err) => warn!("stream {stream_id}: cannot write its record back: {err}"),
        }
    }

    /// Drops a lease another replica took (or that could not be trusted any
    /// more), saying so once.
    pub(super) fn lose_lease(&mut self, stream_id: &str) {
        if self.ownership.drop_lease(stream_id) {
            warn!(
                stream_id = stream_id;
                "stream {stream_id}: lost the lease (another replica claimed it, or it lapsed while this one was paused or cut off); this replica stops writing for it"
            );
            self.events.lease_lost();
        }
    }

    /// Gives a lease up, if held.
    pub(super) fn release(&mut self, stream_id: &str) {
        let Some(token) = self.ownership.token(stream_id) else {
            return;
        };
        self.ownership.drop_lease(stream_id);
        if let Err(err) = self.checkpoints.release(stream_id, token) {
            debug!("stream {stream_id}: cannot release its lease ({err}); it lapses by itself");
        }
    }

    /// At the end of a drain: gives up every lease whose stream has no job
    /// still running, so other replicas take them over at once, and leaves
    /// the live-replica set.
    pub(super) fn give_up_leases(&mut self) {
        for (stream_id, _) in self.ownership.held() {
            if !self.in_flight.contains_key(&stream_id) {
                self.release(&stream_id);
            }
        }
        if let Err(err) = self.checkpoints.leave() {
            debug!(
                "cannot leave the replica set ({err}); this replica drops out of it after LEASE_TTL"
            );
        }
    }

    /// Claims a stream's lease and reads its record, unless this is the
    /// stream's first claim (fencing token 1) and `first_claim_reads` is
    /// false.
    pub(super) fn claim_lease(
        &mut self,
        stream_id: &str,
        now: Instant,
        first_claim_reads: bool,
    ) -> Result<(u64, Option<crate::store::StoredStream>), Unclaimed> {
        let sent = now;
        match self.checkpoints.claim(stream_id) {
            Ok(Claim::Granted { token }) => {
                self.ownership.granted(stream_id, token, sent);
                self.events.lease_claimed();
                debug!(stream_id = stream_id; "stream {stream_id}: claimed (fencing token {token})");
                if token == 1 && !first_claim_reads {
                    return Ok((token, None));
                }
                match self.checkpoints.load_stream(stream_id) {
                    Ok(Some(Ok(stored))) => Ok((token, Some(stored))),
                    Ok(Some(Err(corrupt))) => {
                        self.release(stream_id);
                        Err(Unclaimed::Corrupt(corrupt))
                    }
                    Ok(None) => {
                        self.release(stream_id);
                        Err(Unclaimed::NoRecord)
                    }
                    Err(err) => {
                        warn!("stream {stream_id}: claimed, but cannot read its record: {err}");
                        self.release(stream_id);
                        Err(Unclaimed::Elsewhere)
                    }
                }
            }
            Ok(Claim::HeldBy { owner, remaining }) => {
                debug!("stream {stream_id}: owned by {owner} for {remaining:?} more");
                self.ownership.held_by_other(stream_id, now, remaining);
                Err(Unclaimed::Elsewhere)
            }
            Ok(Claim::NoRecord) => Err(Unclaimed::NoRecord),
            Err(err) => {
                self.events
                    .dependency_checked(Dependency::Redis, Err(err.to_string()));
                Err(Unclaimed::Elsewhere)
            }
        }
    }

    /// Claims a tracked stream that wants work and merges in its record.
    /// Returns the fencing token if the stream still wants an owner after
    /// that (a stream another replica completed meanwhile does not).
    pub(super) fn claim(&mut self, identity: FileIdentity, now: Instant) -> Option<u64> {
        let stream_id = self.table.get(&identity)?.id.clone();
        let (token, stored) = match self.claim_lease(&stream_id, now, false) {
            // The first claim ever: every progress write is fenced, so
            // nobody wrote anything but the registration this replica read.
            Ok((token, None)) => return Some(token),
            Ok((token, Some(stored))) => (token, stored),
            Err(Unclaimed::NoRecord) => {
                // Redis lost the record and its owner (if any) has not
                // written it back: write back what this replica knows, and
                // claim the stream on a later poll.
                let stored = self.table.get(&identity)?.to_stored();
                self.write_back(&stored, None);
                return None;
            }
            Err(Unclaimed::Elsewhere) => return None,
            Err(Unclaimed::Corrupt(corrupt)) => {
                self.table.remove(&identity);
                self.ownership.forget(&stream_id);
                self.quarantine(corrupt, Some(identity));
                return None;
            }
        };
        let stream = self.table.stream_mut(&identity)?;
        if !stream.adopt(stored, now, &self.rules) {
            // Closed as incomplete by another replica: forget it; its file,
            // if still there, is discovered afresh.
            self.table.remove(&identity);
            self.release(&stream_id);
            self.ownership.forget(&stream_id);
            return None;
        }
        if stream.needs_owner() {
            Some(token)
        } else {
            self.release(&stream_id);
            None
        }
    }

    /// The token and chunk records to close a stream with, if this replica
    /// owns it or can claim it; `None` if another replica owns it (and will
    /// close it) or it is already complete or closed.
    pub(super) fn claim_for_close(
        &mut self,
        stream: &TrackedStream,
        now: Instant,
    ) -> Option<(
        u64,
        std::collections::BTreeMap<u64, crate::metadata::ChunkRecord>,
    )> {
        if let Some(token) = self.ownership.token(&stream.id) {
            return Some((token, stream.chunks.clone()));
        }
        let (token, stored) = match self.claim_lease(&stream.id, now, true) {
            Ok(claimed) => claimed,
            Err(Unclaimed::Corrupt(corrupt)) => {
                self.quarantine(corrupt, Some(stream.identity));
                return None;
            }
            Err(Unclaimed::NoRecord | Unclaimed::Elsewhere) => return None,
        };
        let stored = stored?;
        if stored.status == crate::store::StoredStatus::Active {
            Some((token, stored.chunks))
        } else {
            self.release(&stream.id);
            None
        }
    }
}
