//! Handing out jobs: which streams want one, in what order (longest waiting
//! first, so a busy stream cannot starve the others), under what lease, and
//! never more than the bounded job channel holds. While S3 or Redis is down,
//! nothing new goes out.

use super::*;
use crate::metadata::whole_sha256_before;

impl Coordinator {
    pub(super) fn dispatch(&mut self, now: Instant) {
        let Some(jobs) = self.jobs.clone() else {
            return;
        };
        // The breaker: while S3 or Redis is down, in-flight jobs keep retrying
        // with backoff, and nothing new goes out until the probe (or one of
        // those retries) succeeds.
        if self.readiness.is_down(Dependency::Storage) || self.readiness.is_down(Dependency::Redis)
        {
            return;
        }
        while let Some(job) = self.waiting_closes.pop_front() {
            let stream_id = job.stream().stream_id.clone();
            match jobs.try_send(job) {
                Ok(()) => {
                    self.in_flight.insert(stream_id, "close");
                }
                Err(TrySendError::Full(job) | TrySendError::Disconnected(job)) => {
                    self.waiting_closes.push_front(job);
                    return;
                }
            }
        }
        // Streams that want a chunk upload while the most there may be are
        // out wait, in order, behind the other work: completions never queue
        // behind uploads (`upload::worker_threads`).
        let mut uploads_in_flight = self
            .in_flight
            .values()
            .filter(|kind| **kind == "chunk")
            .count();
        let mut held_back = Vec::new();
        while let Some(identity) = self.ready.pop_front() {
            self.queued.remove(&identity);
            let Some(stream) = self.table.get(&identity) else {
                continue;
            };
            let Some(mut work) = stream.state.wanted(now, &self.rules) else {
                continue;
            };
            let token = match self.ownership.token(&stream.id) {
                Some(token) => token,
                None => {
                    if !self.ownership.worth_claiming(&stream.id, now)
                        || !self.ownership.may_claim(self.demand)
                    {
                        continue;
                    }
                    let Some(token) = self.claim(identity, now) else {
                        continue;
                    };
                    // The claim merged in the stream's record, which may
                    // change the job.
                    let Some(merged) = self
                        .table
                        .get(&identity)
                        .and_then(|stream| stream.state.wanted(now, &self.rules))
                    else {
                        continue;
                    };
                    work = merged;
                    token
                }
            };
            let Some(stream) = self.table.get(&identity) else {
                continue;
            };
            if matches!(work, Work::Upload { .. })
                && uploads_in_flight >= crate::upload::max_uploads_in_flight(self.config.workers)
            {
                self.queued.insert(identity);
                held_back.push(identity);
                continue;
            }
            let job = match work {
                Work::Upload { index } => {
                    let offset = index * stream.state.chunk_size();
                    Job::Chunk(ChunkJob {
                        stream: stream.stream_ref(token),
                        path: stream.abs_path.clone(),
                        index,
                        offset,
                        len: stream.state.chunk_size(),
                        whole_sha256_before: whole_sha256_before(&stream.chunks, index),
                    })
                }
                Work::Finalize { size } => Job::Finalize(FinalizeJob {
                    stream: stream.stream_ref(token),
                    path: stream.abs_path.clone(),
                    facts: stream.facts(),
                    expected_size: size,
                    chunks: stream.chunks.clone(),
                    release_lease: !self.rules.assemble && !self.rules.dispose,
                }),
                Work::Assemble => Job::Assemble(AssembleJob {
                    stream: stream.stream_ref(token),
                    revision: stream.revision,
                }),
                Work::Dispose => {
                    let (size, mtime_ns) = stream
                        .state
                        .last_completion()
                        .unwrap_or((stream.state.size(), stream.state.mtime_ns()));
                    Job::Dispose(DisposeJob {
                        stream: stream.stream_ref(token),
                        path: stream.abs_path.clone(),
                        rel_path: stream.rel_path.clone(),
                        revision: stream.revision,
                        size,
                        mtime_ns,
                        assembled: self.rules.assemble,
                        action: self.config.on_complete.clone(),
                    })
                }
            };
            let stream_id = stream.id.clone();
            match jobs.try_send(job) {
                Ok(()) => {
                    let kind = match work {
                        Work::Upload { .. } => {
                            uploads_in_flight += 1;
                            "chunk"
                        }
                        Work::Finalize { .. } => "finalize",
                        Work::Assemble => "assemble",
                        Work::Dispose => "dispose",
                    };
                    self.in_flight.insert(stream_id, kind);
                    self.table
                        .apply(identity, Event::Dispatched(work), self.at(now), &self.rules);
                    self.table.mark_dispatched(&identity, now);
                }
                Err(_) => {
                    // No room: it stays first in line.
                    self.queued.insert(identity);
                    self.ready.push_front(identity);
                    break;
                }
            }
        }
        for identity in held_back.into_iter().rev() {
            self.ready.push_front(identity);
        }
    }

    /// Queues every stream that wants a job, longest-waiting first so a busy
    /// stream cannot starve the others. Runs once per poll: between polls,
    /// only job results make a stream want something new (see `enqueue`).
    pub(super) fn queue_ready_streams(&mut self, now: Instant) {
        // One pass: the streams that want a job, and (for the fair share)
        // how many streams need an owner.
        let mut demand = 0;
        let mut ready: Vec<(Option<Instant>, FileIdentity)> = Vec::new();
        for stream in self.table.iter() {
            demand += usize::from(stream.needs_owner());
            if !self.queued.contains(&stream.identity)
                && stream.state.wanted(now, &self.rules).is_some()
            {
                ready.push((stream.last_dispatch, stream.identity));
            }
        }
        self.demand = demand;
        ready.sort();
        for (_, identity) in ready {
            self.enqueue(identity);
        }
    }

    /// Puts a stream at the back of the dispatch queue (once).
    pub(super) fn enqueue(&mut self, identity: FileIdentity) {
        if self.queued.insert(identity) {
            self.ready.push_back(identity);
        }
    }
}
