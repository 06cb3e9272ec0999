//! `INSTANCE_ID`: a stable name that lets a restarted replica take its
//! streams back at once, and keeps two live processes from sharing one name.
//!
//! Without `INSTANCE_ID` every process is a new owner (`daemon::instance_id`),
//! so the streams of one that crashed wait until their leases lapse
//! (`LEASE_TTL`). With it, each process is an incarnation `ID#nonce` of the
//! instance, and the instance's liveness key in Redis names the live
//! incarnation. The key lasts [`LIVENESS_TTL`] and a thread refreshes it
//! every [`HEARTBEAT`].
//!
//! At start a process takes the key: at once if it is free, once it lapses
//! if the previous incarnation died (within [`LIVENESS_TTL`]), and never
//! while another live process keeps refreshing it: then it refuses to start
//! (exit 2). Holding the key, its claims take over the leases of earlier
//! incarnations without waiting (the claim script checks the key). Its
//! workers write objects only while the key is confirmed (see
//! `lease::HeldLeases`), so they stop before another incarnation can have
//! taken it; a process that finds its key taken exits at once.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use log::{debug, error, info, warn};

use crate::config::RetryPolicy;
use crate::error::{AppError, ConfigError};
use crate::health::Heartbeat;
use crate::lease::HeldLeases;
use crate::store::RedisStore;
use crate::store::redis::InstanceClaim;

/// How long the liveness key lasts without a refresh: the longest a
/// restart waits for a crashed predecessor's key to lapse.
pub const LIVENESS_TTL: Duration = Duration::from_secs(2);

/// How often the live incarnation refreshes its key.
pub const HEARTBEAT: Duration = Duration::from_millis(500);

/// How often a starting process looks at a key held by another incarnation.
const WATCH: Duration = Duration::from_millis(200);

/// Slack when telling a refreshed key from one that just ages.
const REFRESH_MARGIN: Duration = Duration::from_millis(150);

/// Takes the liveness key of `INSTANCE_ID` `id` for this process (`store`'s
/// owner), beating `alive` meanwhile. Returns false if a stop was requested
/// first, and a configuration error naming `INSTANCE_ID` if another live
/// process holds it.
pub fn take_over(
    store: &mut RedisStore,
    id: &str,
    leases: &HeldLeases,
    (retry, alive): (RetryPolicy, &Heartbeat),
    stop: &Receiver<()>,
) -> Result<bool, AppError> {
    // The holder last seen, the TTL it had left, and when that was asked.
    let mut seen: Option<(String, Option<Duration>, Instant)> = None;
    let mut failures = 0u32;
    loop {
        alive.beat();
        let sent = Instant::now();
        let delay = match store.claim_instance(LIVENESS_TTL) {
            Ok(InstanceClaim::Taken) => {
                leases.incarnation_confirmed(LIVENESS_TTL, sent);
                info!("running as INSTANCE_ID {id}; streams it held before resume at once");
                return Ok(true);
            }
            Ok(InstanceClaim::HeldBy { owner, remaining }) => {
                match &seen {
                    Some((previous, left, asked)) => {
                        let aged = left.map(|left| left.saturating_sub(sent - *asked));
                        let refreshed = *previous != owner
                            || remaining
                                .zip(aged)
                                .is_some_and(|(now, aged)| now > aged + REFRESH_MARGIN);
                        let waited_too_long = sent - *asked > LIVENESS_TTL * 3;
                        if refreshed || waited_too_long {
                            return Err(another_process(id, &owner));
                        }
                    }
                    None => {
                        info!(
                            "INSTANCE_ID {id} was last held by {owner}; waiting for its liveness key to lapse (at most {})",
                            humantime::format_duration(LIVENESS_TTL)
                        );
                        seen = Some((owner, remaining, sent));
                    }
                }
                WATCH
            }
            Err(err) => {
                warn!("cannot take INSTANCE_ID {id} in Redis: {err}; retrying");
                failures = failures.saturating_add(1);
                retry.delay(failures)
            }
        };
        if !matches!(stop.recv_timeout(delay), Err(RecvTimeoutError::Timeout)) {
            return Ok(false);
        }
    }
}

fn another_process(id: &str, owner: &str) -> AppError {
    AppError::Config(ConfigError {
        variable: "INSTANCE_ID",
        reason: format!(
            "another live process runs as INSTANCE_ID {id} ({owner} keeps its liveness key fresh); \
             give every replica its own INSTANCE_ID, e.g. the pod name"
        ),
    })
}

/// Starts the thread that refreshes the liveness key every [`HEARTBEAT`],
/// until `stop` says whether to give the key up (true: a clean drain, so a
/// restart need not wait) or closes.
pub fn spawn_heartbeat(
    mut store: RedisStore,
    id: String,
    leases: Arc<HeldLeases>,
    stop: Receiver<bool>,
) -> Result<JoinHandle<()>, AppError> {
    std::thread::Builder::new()
        .name("instance".into())
        .spawn(move || {
            loop {
                match stop.recv_timeout(HEARTBEAT) {
                    Ok(true) => {
                        if let Err(err) = store.refresh_instance(Duration::ZERO) {
                            debug!("cannot give INSTANCE_ID {id} up ({err}); it lapses by itself");
                        }
                        return;
                    }
                    Ok(false) | Err(RecvTimeoutError::Disconnected) => return,
                    Err(RecvTimeoutError::Timeout) => {}
                }
                let sent = Instant::now();
                match store.refresh_instance(LIVENESS_TTL) {
                    Ok(true) => leases.incarnation_confirmed(LIVENESS_TTL, sent),
                    Ok(false) => {
                        error!(
                            "another process took over INSTANCE_ID {id} (this one was cut off from Redis for longer than {}); \
                             exiting at once so that two processes never own streams",
                            humantime::format_duration(LIVENESS_TTL)
                        );
                        // The workers already stopped writing (the key is no
                        // longer confirmed); nothing is left to drain.
                        std::process::exit(2);
                    }
                    Err(err) => debug!("cannot refresh INSTANCE_ID {id}: {err}"),
                }
            }
        })
        .map_err(|err| AppError::Startup(format!("cannot start instance thread: {err}")))
}
