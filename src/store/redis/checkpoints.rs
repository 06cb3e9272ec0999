//! [`CheckpointStore`] on Redis: every read and write the coordinator and
//! the workers make, each one command, pipeline or script.

use super::*;

impl CheckpointStore for RedisStore {
    fn ping(&mut self) -> Result<(), CheckpointError> {
        self.with_connection(|con, _| redis::cmd("PING").query::<String>(con).map(|_| ()))
    }

    fn load_streams(&mut self) -> Result<Vec<Loaded>, CheckpointError> {
        let index: BTreeMap<String, String> = self
            .with_connection(|con, keys| redis::cmd("HGETALL").arg(keys.identities()).query(con))?;
        let ids: Vec<String> = index.into_values().collect();
        let mut streams = Vec::with_capacity(ids.len());
        for batch in ids.chunks(LOAD_BATCH) {
            type Hash = BTreeMap<String, String>;
            let replies: Vec<(Hash, Hash)> = self.with_connection(|con, keys| {
                let mut pipe = redis::pipe();
                for id in batch {
                    pipe.cmd("HGETALL").arg(keys.stream(id));
                    pipe.cmd("HGETALL").arg(keys.chunks(id));
                }
                let flat: Vec<Hash> = pipe.query(con)?;
                let mut pairs = Vec::with_capacity(batch.len());
                let mut iter = flat.into_iter();
                while let (Some(fields), Some(chunks)) = (iter.next(), iter.next()) {
                    pairs.push((fields, chunks));
                }
                Ok(pairs)
            })?;
            for (id, (fields, chunks)) in batch.iter().zip(replies) {
                // A stream in the index with no record left is registered
                // afresh when its file is seen.
                streams.extend(decode_stream(id, &fields, &chunks));
            }
        }
        Ok(streams)
    }

    fn load_stream(&mut self, id: &str) -> Result<Option<Loaded>, CheckpointError> {
        let (fields, chunks): (BTreeMap<String, String>, BTreeMap<String, String>) = self
            .with_connection(|con, keys| {
                redis::pipe()
                    .cmd("HGETALL")
                    .arg(keys.stream(id))
                    .cmd("HGETALL")
                    .arg(keys.chunks(id))
                    .query(con)
            })?;
        Ok(decode_stream(id, &fields, &chunks))
    }

    fn register_stream(
        &mut self,
        stream: &StoredStream,
        retired: Option<&str>,
    ) -> Result<String, CheckpointError> {
        let register = self.register.clone();
        self.with_write(|con, keys| {
            let mut invocation = register.key(keys.identities());
            invocation
                .key(keys.stream(&stream.id))
                .arg(stream.identity.key())
                .arg(&stream.id)
                .arg(retired.unwrap_or(""));
            for (name, value) in stream_fields(stream) {
                invocation.arg(name).arg(value);
            }
            invocation.invoke(con)
        })
    }

    fn checkpoint_chunk(
        &mut self,
        stream_id: &str,
        token: u64,
        chunk: &ChunkRecord,
    ) -> Result<(), FencedWriteError> {
        // One script: atomic by itself, one round trip per chunk.
        let json = serde_json::to_string(chunk).expect("chunk records serialize");
        let target = self.keys.chunks(stream_id);
        self.write_fenced(
            stream_id,
            token,
            &FencedWrite {
                target,
                delete: &[],
                set: vec![(chunk.index.to_string(), json)],
                drop_chunks: false,
                release: false,
                announcement: None,
            },
        )
    }

    fn record_path(&mut self, stream_id: &str, rel_path: &str) -> Result<(), CheckpointError> {
        self.with_write(|con, keys| {
            redis::cmd("HSET")
                .arg(keys.stream(stream_id))
                .arg("path")
                .arg(rel_path)
                .query(con)
        })
    }

    fn record_identity(
        &mut self,
        stream_id: &str,
        old: FileIdentity,
        new: FileIdentity,
    ) -> Result<(), CheckpointError> {
        let rekey = self.rekey.clone();
        self.with_connection(|con, keys| {
            rekey
                .key(keys.identities())
                .key(keys.stream(stream_id))
                .arg(old.key())
                .arg(new.key())
                .arg(stream_id)
                .invoke::<i64>(con)
                .map(|_| ())
        })
    }

    fn mark_complete(
        &mut self,
        stream_id: &str,
        token: u64,
        completion: &Completion,
    ) -> Result<(), FencedWriteError> {
        let mut set = vec![
            ("status", StoredStatus::Complete.as_str().to_string()),
            (REVISION.name, completion.revision.to_string()),
            (COMPLETED_SIZE.name, completion.size.to_string()),
            (COMPLETED_MTIME_NS.name, completion.mtime_ns.to_string()),
            (
                LAST_CHANGE_AT_MS.name,
                unix_millis(completion.last_change_at).to_string(),
            ),
        ];
        if let Some(head) = &completion.head {
            set.push(head_field(head));
        }
        // `file_name` is derived from the path now, and the fields set here
        // have short names: older records drop the long ones.
        let legacy = [
            "file_name",
            REVISION.legacy,
            COMPLETED_SIZE.legacy,
            COMPLETED_MTIME_NS.legacy,
            LAST_CHANGE_AT_MS.legacy,
            HEAD.legacy,
        ];
        // The chunk records go with the completion: metadata.json holds them.
        let write = FencedWrite {
            drop_chunks: true,
            release: completion.release_lease,
            announcement: completion.announcement.as_ref(),
            ..FencedWrite::record(self.keys.stream(stream_id), &legacy, &set)
        };
        self.write_fenced(stream_id, token, &write)
    }

    fn mark_incomplete(
        &mut self,
        stream_id: &str,
        token: u64,
        reason: &str,
        announcement: Option<&Announcement>,
    ) -> Result<(), FencedWriteError> {
        let set = [
            ("status", StoredStatus::Incomplete.as_str().to_string()),
            ("reason", reason.to_string()),
        ];
        let write = FencedWrite {
            announcement,
            ..FencedWrite::record(self.keys.stream(stream_id), &[], &set)
        };
        self.write_fenced(stream_id, token, &write)
    }

    fn confirm_lease(&mut self, stream_id: &str, token: u64) -> Result<(), FencedWriteError> {
        self.write_record_fenced(stream_id, token, &[], &[])
    }

    fn restore_stream(
        &mut self,
        stream: &StoredStream,
        token: Option<u64>,
    ) -> Result<bool, CheckpointError> {
        let restore = self.restore.clone();
        let mut fields = stream_fields(stream);
        if let Some(token) = token {
            fields.push(("fence", token.to_string()));
        }
        self.with_write(|con, keys| {
            let mut invocation = restore.key(keys.identities());
            invocation
                .key(keys.stream(&stream.id))
                .key(keys.chunks(&stream.id))
                .arg(stream.identity.key())
                .arg(&stream.id)
                .arg(if token.is_some() { "1" } else { "0" })
                .arg(fields.len());
            for (name, value) in &fields {
                invocation.arg(*name).arg(value);
            }
            for (index, chunk) in &stream.chunks {
                invocation
                    .arg(index)
                    .arg(serde_json::to_string(chunk).expect("chunk records serialize"));
            }
            invocation.invoke::<i64>(con).map(|written| written == 1)
        })
    }

    fn load_assembly(
        &mut self,
        stream_id: &str,
    ) -> Result<Option<AssemblyProgress>, CheckpointError> {
        let json: Option<String> = self.with_connection(|con, keys| {
            redis::cmd("HGET")
                .arg(keys.stream(stream_id))
                .arg("assembly")
                .query(con)
        })?;
        Ok(json.and_then(|json| serde_json::from_str(&json).ok()))
    }

    fn save_assembly(
        &mut self,
        stream_id: &str,
        token: u64,
        progress: Option<&AssemblyProgress>,
    ) -> Result<(), FencedWriteError> {
        match progress {
            Some(progress) => {
                let json = serde_json::to_string(progress).expect("progress serializes");
                self.write_record_fenced(stream_id, token, &[], &[("assembly", json)])
            }
            None => self.write_record_fenced(stream_id, token, &["assembly"], &[]),
        }
    }

    fn finish_assembly(
        &mut self,
        stream_id: &str,
        token: u64,
        revision: u32,
    ) -> Result<(), FencedWriteError> {
        self.write_record_fenced(
            stream_id,
            token,
            &["assembly"],
            &[("assembled_revision", revision.to_string())],
        )
    }

    fn claim(&mut self, stream_id: &str) -> Result<Claim, CheckpointError> {
        let script = self.claim.clone();
        let (owner, ttl) = (self.holder.owner.clone(), self.ttl_millis());
        let prefix = self.holder.incarnation_prefix();
        let instance = self.holder.instance().unwrap_or_default().to_string();
        let (token, holder, remaining_ms): (i64, String, i64) = self.with_write(|con, keys| {
            script
                .key(keys.lease(stream_id))
                .key(keys.stream(stream_id))
                .key(keys.instance(&instance))
                .arg(&owner)
                .arg(ttl)
                .arg(&prefix)
                .invoke(con)
        })?;
        Ok(match token {
            -1 => Claim::NoRecord,
            0 => Claim::HeldBy {
                owner: holder,
                remaining: Duration::from_millis(u64::try_from(remaining_ms).unwrap_or(0)),
            },
            token => Claim::Granted {
                token: u64::try_from(token).unwrap_or(0),
            },
        })
    }

    fn renew(&mut self, leases: &[(&str, u64)]) -> Result<Renewal, CheckpointError> {
        let script = self.renew.clone();
        let (owner, ttl) = (self.holder.owner.clone(), self.ttl_millis());
        let reply: Vec<i64> = self.with_write(|con, keys| {
            let mut invocation = script.key(keys.replicas());
            for (stream_id, _) in leases {
                invocation
                    .key(keys.lease(stream_id))
                    .key(keys.stream(stream_id));
            }
            invocation.arg(&owner).arg(ttl);
            for (_, token) in leases {
                invocation.arg(token.to_string());
            }
            invocation.invoke(con)
        })?;
        let replicas = reply
            .first()
            .and_then(|&count| usize::try_from(count).ok())
            .unwrap_or(1)
            .max(1);
        let statuses = reply
            .iter()
            .skip(1)
            .map(|status| match status {
                1 => LeaseStatus::Held,
                2 => LeaseStatus::NoRecord,
                _ => LeaseStatus::Lost,
            })
            .collect();
        Ok(Renewal { replicas, statuses })
    }

    fn release(&mut self, stream_id: &str, token: u64) -> Result<(), CheckpointError> {
        let script = self.release.clone();
        let owner = self.holder.owner.clone();
        self.with_write(|con, keys| {
            script
                .key(keys.lease(stream_id))
                .key(keys.stream(stream_id))
                .arg(&owner)
                .arg(token.to_string())
                .invoke::<i64>(con)
                .map(|_| ())
        })
    }

    fn leave(&mut self) -> Result<(), CheckpointError> {
        let owner = self.holder.owner.clone();
        self.with_write(|con, keys| {
            redis::cmd("ZREM")
                .arg(keys.replicas())
                .arg(&owner)
                .query::<i64>(con)
                .map(|_| ())
        })
    }

    fn announce(&mut self, announcement: &Announcement) -> Result<bool, CheckpointError> {
        let script = self.announce.clone();
        self.with_write(|con, keys| {
            script
                .key(keys.announced(&announcement.id))
                .key(keys.outbox())
                .key(keys.outbox_due())
                .arg(&announcement.id)
                .arg(&announcement.json)
                .arg(outbox::ANNOUNCED_MEMORY_MS)
                .invoke::<i64>(con)
                .map(|queued| queued == 1)
        })
    }

    fn retire_stream(
        &mut self,
        identity: FileIdentity,
        stream_id: &str,
        keep_for: Duration,
    ) -> Result<(), CheckpointError> {
        let retire = self.retire.clone();
        let millis = u64::try_from(keep_for.as_millis()).unwrap_or(u64::MAX);
        self.with_write(|con, keys| {
            retire
                .key(keys.identities())
                .key(keys.stream(stream_id))
                .key(keys.chunks(stream_id))
                .arg(identity.key())
                .arg(stream_id)
                .arg(millis)
                .invoke::<i64>(con)
                .map(|_| ())
        })
    }
}
