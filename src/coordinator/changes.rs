//! What the coordinator does about what a scan changed: new files are
//! registered in Redis before any upload (a few thousand per poll at most),
//! renamed ones get their new path recorded, closed ones are queued for a
//! close job, and a stream whose record cannot be trusted is quarantined.
//! Also the write-back after Redis came back without its data.

use super::announce::subject;
use super::*;

impl Coordinator {
    /// Feeds a scan to the stream table, and says when the watch directory
    /// goes blind or can be seen again (no stream completes, vanishes or is
    /// replaced meanwhile).
    pub(super) fn apply_scan(&mut self, scan: Scan, now: Instant) {
        self.unreadable_paths = scan.unreadable_count();
        let was_blind = self.table.blind().map(str::to_string);
        let changes = self.table.apply_scan(&scan, self.at(now), &self.rules);
        let blind = self.table.blind().map(str::to_string);
        match (&blind, &was_blind) {
            (Some(reason), _) if blind != was_blind => warn!(
                "{reason}; no stream completes, vanishes or is replaced until the watch directory can be seen again"
            ),
            (None, Some(_)) => info!("the watch directory can be seen again; decisions resume"),
            _ => {}
        }
        self.readiness.set_watch_dir(blind);
        self.apply_changes(changes, now);
    }

    /// Decides, by content, whether files that sit at a stream's path with a
    /// new identity are the stream's file: the sha256 of its first chunk as
    /// uploaded must match the file's first bytes. Matches continue their
    /// stream under the new identity; a mismatch is a replacement; a read
    /// error decides nothing (the next scan asks again). A stream with no
    /// chunk uploaded yet has nothing to compare and continues: every byte
    /// it uploads later is read from the file it then has.
    pub(super) fn resolve_identity_changes(
        &mut self,
        candidates: Vec<(FileIdentity, Observation)>,
        now: Instant,
    ) {
        let mut same = Vec::new();
        for (identity, seen) in candidates {
            let Some(stream) = self.table.get(&identity) else {
                continue;
            };
            let verdict = match stream.head_print() {
                None => Ok(true),
                Some(first) => match self.files.head_sha256(&seen.abs_path, first.size_bytes) {
                    Ok(digest) => Ok(first.matches(&digest)),
                    Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
                    Err(err) => Err(err),
                },
            };
            match verdict {
                Ok(true) => same.push((identity, seen)),
                Ok(false) => {
                    let changes =
                        self.table
                            .apply(identity, Event::Replaced, self.at(now), &self.rules);
                    self.apply_changes(changes, now);
                    // The replaced stream was closed only once no job was
                    // out; the new file is registered on the next scan.
                }
                Err(err) => debug!(
                    "cannot read {} to compare it with its stream ({}: {err}); asking again on the next scan",
                    seen.rel_path,
                    crate::watchfs::errno_name(&err)
                ),
            }
        }
        for (stream_id, old, new) in self.table.rekey(same) {
            self.queued.remove(&old);
            info!(
                stream_id = stream_id.as_str();
                "stream {stream_id}: its file now has identity {} (was {}), and its first chunk matches; continuing the stream",
                new.key(),
                old.key()
            );
            if let Err(err) = self.checkpoints.record_identity(&stream_id, old, new) {
                warn!(
                    "stream {stream_id}: cannot record its new identity {}: {err}",
                    new.key()
                );
            }
        }
    }

    pub(super) fn apply_changes(&mut self, changes: Vec<Change>, now: Instant) {
        let mut registered = 0;
        let mut identity_changes = Vec::new();
        for change in changes {
            match change {
                Change::IdentityChanged { identity, seen } => {
                    identity_changes.push((identity, seen));
                }
                // Each registration is a Redis round trip on this thread: a
                // burst of new files is spread over several polls so the
                // loop (and /healthz) stays responsive.
                Change::Discovered(_) if registered == REGISTRATIONS_PER_POLL => {}
                Change::Discovered(observation) if self.is_quarantined(observation.identity) => {}
                Change::Discovered(observation) => {
                    registered += 1;
                    self.register(&observation, now);
                }
                Change::Closed(stream, reason) => {
                    self.retire(stream.identity, &stream.id);
                    self.ownership.forget(&stream.id);
                    // Only the stream's owner records it as incomplete; a
                    // replica that sees it first claims it to do so.
                    let Some((token, chunks)) = self.claim_for_close(&stream, now) else {
                        continue;
                    };
                    let mut view = stream.view(now);
                    view.state = "incomplete".to_string();
                    self.remember(view);
                    warn!(
                        stream_id = stream.id.as_str(), path = stream.rel_path.as_str();
                        "stream {}: {} was {}; closing it as incomplete",
                        stream.id,
                        stream.rel_path,
                        reason.as_str()
                    );
                    self.waiting_closes.push_back(Job::Close(CloseJob {
                        stream: stream.stream_ref(token),
                        facts: stream.facts(),
                        reason,
                        chunks,
                    }));
                }
                Change::Forgotten(stream) => {
                    info!(
                        stream_id = stream.id.as_str(), path = stream.rel_path.as_str();
                        "stream {}: {} is gone or replaced; it stays complete in the bucket",
                        stream.id, stream.rel_path
                    );
                    self.retire(stream.identity, &stream.id);
                    self.release(&stream.id);
                    self.ownership.forget(&stream.id);
                }
                Change::Reopened { identity, id, path } => {
                    info!(
                        stream_id = id.as_str(), path = path.as_str();
                        "stream {id}: {path} grew after completion; reopened"
                    );
                    if let Some(stream) = self.table.get(&identity) {
                        let event = StreamEvent::reopened(
                            subject(stream, stream.revision),
                            stream.state.size(),
                            SystemTime::now(),
                        );
                        self.announce(event);
                    }
                }
                Change::Moved { id, from, to } => {
                    info!(
                        stream_id = id.as_str(), path = to.as_str();
                        "stream {id}: renamed from {from} to {to}"
                    );
                    if let Err(err) = self.checkpoints.record_path(&id, &to) {
                        warn!("stream {id}: cannot record new path {to}: {err}");
                    }
                }
            }
        }
        if !identity_changes.is_empty() {
            self.resolve_identity_changes(identity_changes, now);
        }
    }

    /// After Redis was down, it may have restarted without its data: write
    /// back every stream whose record is gone, so that a later restart of
    /// chunkstream still resumes them. Retried on the next turn if it fails.
    pub(super) fn write_back_after_redis_recovery(&mut self) {
        let recoveries = self.readiness.redis_recoveries();
        if recoveries == self.redis_recoveries_handled {
            return;
        }
        let mut restored = 0;
        for stream in self.table.iter() {
            // What another replica owns, only it knows for sure; every
            // replica writes back what is complete, so that no complete file
            // is taken for a new one.
            let token = self.ownership.token(&stream.id);
            if token.is_none() && stream.needs_owner() {
                continue;
            }
            match self.checkpoints.restore_stream(&stream.to_stored(), token) {
                Ok(written) => restored += usize::from(written),
                Err(err) => {
                    warn!("Redis is back but writing checkpoints back failed: {err}; retrying");
                    return;
                }
            }
        }
        self.redis_recoveries_handled = recoveries;
        if restored > 0 {
            warn!(
                "Redis had lost {restored} stream records (restarted without persistence?); wrote them back"
            );
        } else {
            info!("Redis is back with every checkpoint intact");
        }
    }

    /// Drops the identity → stream mapping of a stream that ended, unless a
    /// new stream for the same identity takes it over first, and lets its
    /// records expire after `RECORD_RETENTION`. A failure is retried after
    /// every scan (`retry_retirements`), so no record is left to live forever.
    pub(super) fn retire(&mut self, identity: FileIdentity, stream_id: &str) {
        let keep_for = self.config.record_retention;
        match self
            .checkpoints
            .retire_stream(identity, stream_id, keep_for)
        {
            Ok(()) => {
                if self.retired.get(&identity).map(String::as_str) == Some(stream_id) {
                    self.retired.remove(&identity);
                }
                self.unretired.remove(stream_id);
            }
            Err(err) => {
                if self
                    .unretired
                    .insert(stream_id.to_string(), identity)
                    .is_none()
                {
                    warn!(
                        "stream {stream_id}: cannot update the identity index and expire its records: {err}; retrying after the next scan"
                    );
                }
                self.retired.insert(identity, stream_id.to_string());
            }
        }
    }

    /// Retries the retirements that failed (Redis was unreachable).
    pub(super) fn retry_retirements(&mut self) {
        let pending: Vec<(String, FileIdentity)> = self
            .unretired
            .iter()
            .map(|(id, identity)| (id.clone(), *identity))
            .collect();
        for (stream_id, identity) in pending {
            self.retire(identity, &stream_id);
            if self.unretired.contains_key(&stream_id) {
                return;
            }
        }
    }

    /// Gives a new file its stream id, stored in Redis before any upload.
    pub(super) fn register(&mut self, observation: &Observation, now: Instant) {
        let unique = format!(
            "{}|{}|{}|{}",
            observation.identity.key(),
            observation.rel_path,
            std::process::id(),
            random_u64()
        );
        let candidate = TrackedStream::new(
            new_stream_id(&file_name(&observation.rel_path), unique.as_bytes()),
            observation,
            self.config.chunk_size,
            self.at(now),
        );
        let retired = self.retired.get(&observation.identity).cloned();
        let registered = self
            .checkpoints
            .register_stream(&candidate.to_stored(), retired.as_deref());
        let id = match registered {
            Ok(id) => {
                if self.registration_failing {
                    info!("stream registration works again");
                    self.registration_failing = false;
                }
                self.retired.remove(&observation.identity);
                id
            }
            Err(err) => {
                self.events
                    .dependency_checked(Dependency::Redis, Err(err.to_string()));
                if !self.registration_failing {
                    error!(
                        "cannot register {} in Redis: {err}; new files wait until Redis is back",
                        observation.rel_path
                    );
                    self.registration_failing = true;
                }
                return;
            }
        };
        if id == candidate.id {
            info!(
                stream_id = id.as_str(), path = &*observation.rel_path;
                "stream {id}: discovered {} ({} bytes)",
                observation.rel_path, observation.size
            );
            self.events.stream_discovered();
            self.table.insert(candidate);
            return;
        }
        // Someone registered this file first: continue their stream.
        match self.checkpoints.load_stream(&id) {
            Ok(Some(Err(corrupt))) => self.quarantine(corrupt, Some(observation.identity)),
            Ok(Some(Ok(stored))) => {
                if let Some(tracked) =
                    TrackedStream::from_stored(stored, &self.config.watch_dir, now, &self.rules)
                {
                    info!(
                        "stream {id}: {} already registered; continuing it",
                        observation.rel_path
                    );
                    self.table.insert(tracked);
                }
            }
            Ok(None) => warn!(
                "stream {id}: registered for {} but has no record",
                observation.rel_path
            ),
            Err(err) => warn!("stream {id}: cannot load its record: {err}"),
        }
    }

    /// Takes a stream whose record cannot be trusted out of service: it is
    /// neither uploaded nor closed (either could destroy what is in the
    /// bucket), its file is not registered again, and `/streams` shows it as
    /// `quarantined` with the reason. Logged once per stream.
    pub(super) fn quarantine(&mut self, corrupt: CorruptRecord, identity: Option<FileIdentity>) {
        let id = corrupt.id.clone();
        if let Some(known) = self.quarantined.get_mut(&id) {
            known.identity = known.identity.or(identity);
            return;
        }
        error!(
            stream_id = id.as_str();
            "{corrupt}; stream {id} is quarantined: nothing is uploaded or closed for it until its record is fixed or deleted (then restart)"
        );
        let path = corrupt.path.clone().unwrap_or_default();
        let event = StreamEvent::quarantined(
            StreamSubject {
                stream_id: &id,
                revision: 0,
                source: Source {
                    file_name: file_name(&path),
                    path,
                },
                started_at: None,
            },
            &corrupt.reason,
            SystemTime::now(),
        );
        self.announce(event);
        self.quarantined.insert(
            id,
            Quarantined {
                identity,
                path: corrupt.path.unwrap_or_default(),
                reason: corrupt.reason,
            },
        );
    }

    pub(super) fn is_quarantined(&self, identity: FileIdentity) -> bool {
        self.quarantined
            .values()
            .any(|stream| stream.identity == Some(identity))
    }
}
