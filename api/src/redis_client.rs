//! The api's one Redis client, shared by the user cache and the rate limiter: one multiplexed
//! connection that every request shares, kept by redis's [`ConnectionManager`], each call bounded by
//! `REDIS_TIMEOUT_MS`.
//!
//! One connection and no pool: concurrent calls pipeline on it, and round-robin over four such
//! connections served cached reads no faster (BENCHMARKS.md, "Redis connection model").
//!
//! Reconnection is the manager's, set up so that no call waits on a dead connection for long:
//! - A call that finds the connection dropped fails (the request falls back to PostgreSQL) and the
//!   manager dials a new one in the background; calls made meanwhile wait for that dial, within
//!   their deadline. The manager never hands out a connection known to be broken.
//! - A network that drops packets silently closes nothing: `TCP_USER_TIMEOUT` makes the kernel abort
//!   a connection whose data has gone unacknowledged for the longer of `REDIS_TIMEOUT_MS` and 1 s,
//!   and the manager replaces it like a dropped one.
//! - The first dial of a manager runs in a task of its own, so that it finishes even when every call
//!   that waits for it gives up first (the manager would otherwise dial only while a call waits).
//! - Each dial is one attempt, so its failure reaches the calls waiting on it and is logged (at most
//!   once per 10 s); the next call dials again, paced by the callers' own back-off (the cache's read
//!   pause, the rate limiter's local fallback).
//! - The manager re-dials only after I/O errors and would return a refused login forever, so an
//!   authentication failure replaces the manager.

use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use anyhow::Context;
use common::config::RedisConfig;
use common::telemetry::Throttle;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::io::tcp::TcpSettings;
use redis::{ConnectionAddr, ErrorKind, IntoConnectionInfo, RedisError, RedisResult, TlsCertificates};
use tracing::Instrument;

/// Longest one dial (TCP, TLS, `AUTH`, `SELECT`) may take; calls give up on it sooner, at their own
/// deadline.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Shortest time unacknowledged data may wait before the kernel aborts the connection.
const MIN_DEAD_CONNECTION_TIMEOUT: Duration = Duration::from_secs(1);

/// A Redis client. Cheap to clone; dials as soon as it is made, in the background.
#[derive(Clone)]
pub struct RedisClient(Arc<Inner>);

struct Inner {
    client: redis::Client,
    /// Replaced only after a refused login (see the module's documentation).
    connection: RwLock<ConnectionManager>,
    timeout: Duration,
    /// Connection failures are logged at most once per 10 s.
    log_throttle: Throttle,
}

impl RedisClient {
    /// A client for `config`'s server, dialling in the background.
    pub fn new(config: &RedisConfig) -> anyhow::Result<Self> {
        let client = client(config)?;
        let connection = manager(&client).context("cannot set up the Redis connection")?;
        let inner = Arc::new(Inner {
            client,
            connection: RwLock::new(connection.clone()),
            timeout: config.timeout,
            log_throttle: Throttle::new(Duration::from_secs(10)),
        });
        inner.dial(connection);
        Ok(Self(inner))
    }

    /// Runs `operation` on the shared connection within `REDIS_TIMEOUT_MS`, the wait for a dial
    /// included.
    /// `name` (the command, e.g. `GET`) names the call's span in a trace.
    pub async fn call<T, Fut>(
        &self,
        name: &'static str,
        operation: impl FnOnce(ConnectionManager) -> Fut,
    ) -> RedisResult<T>
    where
        Fut: Future<Output = RedisResult<T>>,
    {
        let connection = self.0.connection.read().unwrap_or_else(PoisonError::into_inner).clone();
        let span = common::traces::redis(name);
        let result = match tokio::time::timeout(self.0.timeout, operation(connection)).instrument(span.clone()).await {
            Ok(result) => result.inspect_err(|err| self.0.failed(err)),
            Err(_) => Err(std::io::Error::from(std::io::ErrorKind::TimedOut).into()),
        };
        if result.is_err() {
            common::traces::record_error(&span);
        }
        result
    }

    /// Round-trips a PING.
    pub async fn ping(&self) -> RedisResult<()> {
        self.call("PING", |mut conn| async move { redis::cmd("PING").query_async::<()>(&mut conn).await }).await
    }
}

impl Inner {
    /// Logs a failed or dropped connection and replaces the manager after a refused login.
    fn failed(self: &Arc<Self>, err: &RedisError) {
        self.log(err);
        if err.kind() == ErrorKind::AuthenticationFailed
            && let Ok(fresh) = manager(&self.client)
        {
            *self.connection.write().unwrap_or_else(PoisonError::into_inner) = fresh.clone();
            self.dial(fresh);
        }
    }

    /// Logs a failed or dropped connection (not an error reply: the callers log those, as they do
    /// calls past their deadline).
    fn log(&self, err: &RedisError) {
        let refused = err.kind() == ErrorKind::AuthenticationFailed;
        if (err.is_io_error() || refused) && self.log_throttle.allow() {
            tracing::warn!(dependency = "redis", error = %err, "Redis connection failed");
        }
    }

    /// Drives a new manager's first dial to its end. The manager dials lazily, and only while a call
    /// waits for it: calls that give up at their deadline would leave a dial that needs longer (a TLS
    /// handshake on a busy machine) unfinished, and make it time out. Its reconnections it drives
    /// itself.
    fn dial(self: &Arc<Self>, connection: ConnectionManager) {
        let inner = Arc::clone(self);
        tokio::spawn(async move {
            let mut connection = connection;
            let ping = async { redis::cmd("PING").query_async::<()>(&mut connection).await };
            if let Ok(Err(err)) = tokio::time::timeout(CONNECT_TIMEOUT * 2, ping).await {
                inner.log(&err);
            }
        });
    }
}

/// A manager that dials on first use, once per attempt (see the module's documentation); calls are
/// bounded by `REDIS_TIMEOUT_MS` in [`RedisClient::call`], so responses have no timeout of their own.
fn manager(client: &redis::Client) -> RedisResult<ConnectionManager> {
    let config = ConnectionManagerConfig::new()
        .set_number_of_retries(0)
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(None);
    ConnectionManager::new_lazy_with_config(client.clone(), config)
}

/// A client for `config`'s server: TLS with `REDIS_TLS` (the server's name always verified, against
/// `REDIS_CA_CERT` or the system's roots), an ACL user with `REDIS_USERNAME`.
fn client(config: &RedisConfig) -> anyhow::Result<redis::Client> {
    let mut redis_settings = redis::RedisConnectionInfo::default().set_db(i64::from(config.db));
    if let Some(username) = &config.username {
        redis_settings = redis_settings.set_username(username);
    }
    if let Some(password) = &config.password {
        redis_settings = redis_settings.set_password(password.expose());
    }
    let address = match config.tls {
        false => ConnectionAddr::Tcp(config.host.clone(), config.port),
        true => {
            ConnectionAddr::TcpTls { host: config.host.clone(), port: config.port, insecure: false, tls_params: None }
        }
    };
    let tcp = TcpSettings::default().set_user_timeout(config.timeout.max(MIN_DEAD_CONNECTION_TIMEOUT));
    let info = address.into_connection_info()?.set_redis_settings(redis_settings).set_tcp_settings(tcp);
    match (&config.ca_cert, config.tls) {
        (Some(path), true) => {
            // Checked here so that a bad file stops the start instead of failing every connection.
            common::tls::load_roots(path).context("REDIS_CA_CERT cannot be used")?;
            let root_cert = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
            Ok(redis::Client::build_with_tls(info, TlsCertificates { client_tls: None, root_cert: Some(root_cert) })?)
        }
        _ => Ok(redis::Client::open(info)?),
    }
}
