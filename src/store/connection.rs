//! The connection to the Redis master, and keeping it usable.
//!
//! The redis crate neither reconnects nor follows a failover by itself, so
//! this is where both happen. A [`Link`] holds at most one connection: to
//! the one server of `REDIS_URL`, or to whichever server the sentinels of
//! `REDIS_SENTINELS` name as master now (checked with `ROLE`, since a
//! sentinel may not know of a failover yet). A failed connection, or a
//! server that turned out not to be the master, is dropped, and the next
//! call opens a new one, so callers only ever see a retryable error.
//!
//! With Sentinel, a write counts only once a replica has it (`WAIT 1`):
//! Redis replicates asynchronously, and a failover to a replica that missed
//! a write would forget it, a lease or a fencing token included.

use std::sync::Mutex;
use std::time::Duration;

use redis::{Connection, RedisResult};

use crate::config::{RedisConfig, SentinelConfig, redact_url};
use crate::error::CheckpointError;

/// Where the master is: one fixed server (`REDIS_URL`), or whichever server
/// the sentinels name now.
enum Target {
    Server(redis::Client),
    Sentinel(Sentinels),
}

/// Redis Sentinel: asked for the master's address on every new connection.
struct Sentinels {
    /// In the order to ask them; the last one that answered goes first.
    sentinels: Vec<redis::ConnectionInfo>,
    master_name: String,
    /// Password for the master.
    master_settings: redis::RedisConnectionInfo,
}

/// What this process last reported about the master. Every coordinator,
/// worker and probe has its own link; this is shared so that a failover,
/// or a master left without replica, is logged once per process.
struct Reported {
    master: Option<(String, u16)>,
    unreplicated: bool,
}

static REPORTED: Mutex<Reported> = Mutex::new(Reported {
    master: None,
    unreplicated: false,
});

fn reported() -> std::sync::MutexGuard<'static, Reported> {
    REPORTED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Logs a failover the first time any link of this process finds the
/// master `name` at a new address.
fn report_master(name: &str, address: &(String, u16)) {
    let mut reported = reported();
    if reported.master.as_ref() == Some(address) {
        return;
    }
    if let Some((old_host, old_port)) = &reported.master {
        log::warn!(
            "Redis master {name:?} moved from {old_host}:{old_port} to {}:{} (failover); carrying on there",
            address.0,
            address.1
        );
    }
    reported.master = Some(address.clone());
}

/// Logs when the master has no replica left (writes are then not
/// replicated), and when it has one again.
fn report_replicas(replicas: usize, shown_url: &str) {
    let mut reported = reported();
    match (replicas, reported.unreplicated) {
        (0, false) => log::warn!(
            "Redis master of {shown_url} has no replica: writes are not replicated until one is back"
        ),
        (1.., true) => log::info!("Redis master of {shown_url} has a replica again"),
        _ => return,
    }
    reported.unreplicated = replicas == 0;
}

impl Sentinels {
    fn new(config: &SentinelConfig) -> Self {
        let settings = |password: &Option<String>| {
            let settings = redis::RedisConnectionInfo::default();
            match password {
                Some(password) => settings.set_password(password),
                None => settings,
            }
        };
        let sentinel_settings = settings(&config.sentinel_password);
        Self {
            sentinels: config
                .sentinels
                .iter()
                .map(|(host, port)| {
                    tcp_info(host, *port).set_redis_settings(sentinel_settings.clone())
                })
                .collect(),
            master_name: config.master.clone(),
            master_settings: settings(&config.password),
        }
    }

    /// Asks the sentinels in turn for the master and connects to it, making
    /// sure it is a master (a sentinel may not know of a failover yet).
    /// Returns the connection and how many replicas the master has.
    fn connect_master(&mut self, timeout: Duration) -> Result<(Connection, usize), String> {
        let mut failures = Vec::new();
        for position in 0..self.sentinels.len() {
            let sentinel = &self.sentinels[position];
            let sentinel_shown = format!("sentinel {}", sentinel.addr());
            let address = open(sentinel, timeout).and_then(|mut con| {
                redis::cmd("SENTINEL")
                    .arg("get-master-addr-by-name")
                    .arg(&self.master_name)
                    .query::<Option<(String, u16)>>(&mut con)
            });
            let (host, port) = match address {
                Ok(Some(address)) => address,
                Ok(None) => {
                    failures.push(format!(
                        "{sentinel_shown} does not know master {:?}",
                        self.master_name
                    ));
                    continue;
                }
                Err(err) => {
                    failures.push(format!("{sentinel_shown}: {err}"));
                    continue;
                }
            };
            let master_info =
                tcp_info(&host, port).set_redis_settings(self.master_settings.clone());
            let connected = open(&master_info, timeout).and_then(|mut con| {
                let replicas = master_replicas(&mut con)?;
                Ok((con, replicas))
            });
            match connected {
                Ok((con, Some(replicas))) => {
                    self.sentinels[..=position].rotate_right(1);
                    report_master(&self.master_name, &(host, port));
                    return Ok((con, replicas));
                }
                Ok((_, None)) => failures.push(format!(
                    "{sentinel_shown} names {host}:{port}, which is not a master (yet)"
                )),
                Err(err) => failures.push(format!(
                    "master {host}:{port} (from {sentinel_shown}): {err}"
                )),
            }
        }
        Err(failures.join("; "))
    }
}

fn tcp_info(host: &str, port: u16) -> redis::ConnectionInfo {
    use redis::IntoConnectionInfo;
    redis::ConnectionAddr::Tcp(host.to_string(), port)
        .into_connection_info()
        .expect("a TCP address is a valid connection info")
}

/// A connection with connect, read and write timeouts.
fn open(info: &redis::ConnectionInfo, timeout: Duration) -> RedisResult<Connection> {
    redis::Client::open(info.clone())?
        .get_connection_with_timeout(timeout)
        .and_then(|connection| with_timeouts(connection, timeout))
}

fn with_timeouts(connection: Connection, timeout: Duration) -> RedisResult<Connection> {
    connection.set_read_timeout(Some(timeout))?;
    connection.set_write_timeout(Some(timeout))?;
    Ok(connection)
}

/// `ROLE`: `None` unless the server is a master; else how many replicas
/// are connected to it. (One still in its first sync cannot acknowledge
/// yet: writes then fail the `WAIT` and are retried until it can, which is
/// safer than counting it out.)
fn master_replicas(con: &mut Connection) -> RedisResult<Option<usize>> {
    let role: Vec<redis::Value> = redis::cmd("ROLE").query(con)?;
    let text = |value: &redis::Value| redis::from_redis_value_ref::<String>(value).ok();
    if role.first().and_then(text).as_deref() != Some("master") {
        return Ok(None);
    }
    let replicas = match role.get(2) {
        Some(redis::Value::Array(replicas)) => replicas.len(),
        _ => 0,
    };
    Ok(Some(replicas))
}

/// A connection to the Redis master, replaced after any failure that
/// makes it unusable.
pub(super) struct Link {
    target: Target,
    connection: Option<Connection>,
    /// Sentinel mode: replicas of the connected master that acknowledge
    /// writes (from `ROLE`); 0 while it has none.
    replicas: usize,
    /// Connect, read and write timeout (`REDIS_TIMEOUT`).
    timeout: Duration,
    /// Where Redis is, for messages (no password).
    shown_url: String,
}

impl Link {
    /// A link to the one server of `config.url`.
    pub(super) fn server(config: &RedisConfig) -> Result<Self, CheckpointError> {
        let shown_url = redact_url(&config.url);
        let failure = |detail: String| CheckpointError {
            url: shown_url.clone(),
            detail,
        };
        let client = match &config.ca_file {
            None => redis::Client::open(config.url.as_str()),
            Some(path) => {
                let pem = std::fs::read(path).map_err(|err| {
                    failure(format!("reading REDIS_CA_FILE {}: {err}", path.display()))
                })?;
                let certificates = redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem),
                };
                redis::Client::build_with_tls(config.url.as_str(), certificates)
            }
        }
        .map_err(|err| failure(err.to_string()))?;
        Ok(Self::to(Target::Server(client), config))
    }

    /// A link to the master the sentinels name.
    pub(super) fn sentinel(config: &RedisConfig, sentinel: &SentinelConfig) -> Self {
        Self::to(Target::Sentinel(Sentinels::new(sentinel)), config)
    }

    fn to(target: Target, config: &RedisConfig) -> Self {
        Self {
            target,
            connection: None,
            replicas: 0,
            timeout: config.timeout,
            shown_url: redact_url(&config.url),
        }
    }

    /// Runs `call` on a live connection, opening one if needed. Any I/O-level
    /// failure, or an answer that the server is not a usable master, drops the
    /// connection so that the next call reconnects (with Sentinel, to
    /// whichever server is the master by then).
    pub(super) fn call<T>(
        &mut self,
        call: impl FnOnce(&mut Connection) -> RedisResult<T>,
    ) -> Result<T, CheckpointError> {
        if self.connection.is_none() {
            let (connection, replicas) = match &mut self.target {
                Target::Server(client) => client
                    .get_connection_with_timeout(self.timeout)
                    .and_then(|connection| with_timeouts(connection, self.timeout))
                    .map(|connection| (connection, 0))
                    .map_err(|err| self.error(&err))?,
                Target::Sentinel(sentinels) => sentinels
                    .connect_master(self.timeout)
                    .map_err(|detail| self.failure(&detail))?,
            };
            self.connection = Some(connection);
            self.replicas = replicas;
        }
        let connection = self.connection.as_mut().expect("connected above");
        let result = call(connection);
        result.map_err(|err| self.failed(&err))
    }

    /// Runs a write, then, with Sentinel, makes sure a replica has it before
    /// it counts: a failover promotes a replica, and a write only the dead
    /// master had would be lost, a fencing token or a lease included (see
    /// docs/reliability.md).
    pub(super) fn write<T>(
        &mut self,
        call: impl FnOnce(&mut Connection) -> RedisResult<T>,
    ) -> Result<T, CheckpointError> {
        let value = self.call(call)?;
        if matches!(self.target, Target::Sentinel(_)) {
            self.replicated()?;
        }
        Ok(value)
    }

    /// `WAIT 1` for the writes made on this connection so far, while the
    /// master has a replica. A master without one (its replica died or is
    /// resyncing) is used as it is, with a warning: refusing would make the
    /// replica a single point of failure. Every call here runs on the
    /// connection the write used: a failure returns before anything could
    /// reconnect to another server.
    fn replicated(&mut self) -> Result<(), CheckpointError> {
        let wait_millis = u64::try_from((self.timeout / 2).as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let wait = |con: &mut Connection| -> RedisResult<i64> {
            redis::cmd("WAIT").arg(1).arg(wait_millis).query(con)
        };
        let had = self.replicas;
        if had > 0 && self.call(wait)? >= 1 {
            return Ok(());
        }
        // No replica known, or none acknowledged: what does the master have now?
        let Some(now) = self.call(master_replicas)? else {
            self.connection = None;
            return Err(self.failure("the server is no longer the master; retrying"));
        };
        self.replicas = now;
        report_replicas(now, &self.shown_url);
        if now == 0 {
            return Ok(());
        }
        // A replica (re)appeared since the last write: wait for it once.
        if had == 0 && self.call(wait)? >= 1 {
            return Ok(());
        }
        Err(self.failure(&format!(
            "no replica acknowledged the write within {wait_millis} ms; retrying"
        )))
    }

    /// An error about this link that is not a Redis error.
    pub(super) fn failure(&self, detail: &str) -> CheckpointError {
        CheckpointError {
            url: self.shown_url.clone(),
            detail: detail.to_string(),
        }
    }

    /// The error for a failed call; drops the connection when the failure
    /// means it, or the server behind it, cannot be used any more.
    fn failed(&mut self, err: &redis::RedisError) -> CheckpointError {
        use redis::{ErrorKind, ServerErrorKind};
        if err.is_io_error()
            || err.is_connection_dropped()
            || err.is_timeout()
            || err.is_connection_refusal()
            || matches!(
                err.kind(),
                ErrorKind::Server(
                    ServerErrorKind::ReadOnly
                        | ServerErrorKind::MasterDown
                        | ServerErrorKind::BusyLoading
                )
            )
        {
            self.connection = None;
        }
        self.error(err)
    }

    fn error(&self, err: &redis::RedisError) -> CheckpointError {
        CheckpointError {
            url: self.shown_url.clone(),
            detail: err.to_string(),
        }
    }
}
