//! The liveness key of this process's `INSTANCE_ID` (see `crate::instance`):
//! only for owners that are incarnations; the others never call these.

use super::*;

impl RedisStore {
    fn instance_key(&self) -> Result<String, CheckpointError> {
        self.holder
            .instance()
            .map(|id| self.keys.instance(id))
            .ok_or_else(|| self.link.failure("this process has no INSTANCE_ID"))
    }

    /// Takes the instance's liveness key for `ttl`, unless another
    /// incarnation holds it.
    pub fn claim_instance(&mut self, ttl: Duration) -> Result<InstanceClaim, CheckpointError> {
        let key = self.instance_key()?;
        let script = self.instance_claim.clone();
        let owner = self.holder.owner.clone();
        let prefix = self.holder.incarnation_prefix();
        let millis = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        let (taken, holder, remaining_ms): (i64, String, i64) = self.with_write(|con, keys| {
            script
                .key(&key)
                .key(keys.replicas())
                .arg(&owner)
                .arg(millis)
                .arg(&prefix)
                .invoke(con)
        })?;
        Ok(if taken == 1 {
            InstanceClaim::Taken
        } else {
            InstanceClaim::HeldBy {
                owner: holder,
                remaining: u64::try_from(remaining_ms).ok().map(Duration::from_millis),
            }
        })
    }

    /// Keeps the liveness key for another `ttl` (or, with a zero `ttl`, gives
    /// it up). False if another incarnation took it.
    pub fn refresh_instance(&mut self, ttl: Duration) -> Result<bool, CheckpointError> {
        let key = self.instance_key()?;
        let script = self.instance_refresh.clone();
        let owner = self.holder.owner.clone();
        let millis = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        let kept: i64 =
            self.with_write(|con, _| script.key(&key).arg(&owner).arg(millis).invoke(con))?;
        Ok(kept == 1)
    }
}
