//! The api's one Redis client, shared by the user cache and the rate limiter: one multiplexed
//! connection that every request shares, each call bounded by `REDIS_TIMEOUT_MS`.
//!
//! The connections come from a bb8 pool whose manager can throw one away. bb8-redis's manager was
//! used before, but it never reports a multiplexed connection as broken, so one the network cut
//! stayed in the pool, failing every call on it, until the process restarted (the chaos soak caught
//! exactly that), and it cannot be given a CA bundle for TLS. Each connection here carries a flag that
//! a failed call sets; bb8 drops a flagged connection when it comes back to the pool and dials anew.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use common::config::RedisConfig;
use common::telemetry::Throttle;
use redis::aio::MultiplexedConnection;
use redis::{ConnectionAddr, IntoConnectionInfo, RedisError, RedisResult, TlsCertificates};

/// A Redis client. Cheap to clone; connects on first use.
#[derive(Clone)]
pub struct RedisClient(Arc<Inner>);

struct Inner {
    pool: bb8::Pool<Manager>,
    /// See [`RedisClient::shared_connection`].
    shared: RwLock<Option<Connection>>,
    timeout: Duration,
}

impl RedisClient {
    /// A client for `config`'s server; nothing is dialled until the first call.
    pub fn new(config: &RedisConfig) -> anyhow::Result<Self> {
        let manager = Manager { client: client(config)?, log_throttle: Throttle::new(Duration::from_secs(10)) };
        let pool = bb8::Pool::builder()
            .max_size(config.pool_max_size.get())
            .connection_timeout(config.timeout)
            // Each checkout test is a PING round trip; a broken connection shows up as an error instead.
            .test_on_check_out(false)
            .build_unchecked(manager);
        Ok(Self(Arc::new(Inner { pool, shared: RwLock::new(None), timeout: config.timeout })))
    }

    /// Runs `operation` on the shared multiplexed connection within `REDIS_TIMEOUT_MS`, getting a
    /// connection included. A failure of the connection itself discards it, so the pool dials a new one.
    pub async fn call<T, Fut>(&self, operation: impl FnOnce(MultiplexedConnection) -> Fut) -> RedisResult<T>
    where
        Fut: Future<Output = RedisResult<T>>,
    {
        let deadline = tokio::time::Instant::now() + self.0.timeout;
        let connection = self.shared_connection(deadline).await?;
        let result = match tokio::time::timeout_at(deadline, operation(connection.redis.clone())).await {
            Ok(result) => result,
            Err(_) => Err(timed_out()),
        };
        if let Err(err) = &result
            && breaks_connection(err)
        {
            connection.discard();
        }
        result
    }

    /// Round-trips a PING.
    pub async fn ping(&self) -> RedisResult<()> {
        self.call(|mut conn| async move { redis::cmd("PING").query_async::<()>(&mut conn).await }).await
    }

    /// The connection every request shares until a call finds it broken; then the next one the pool
    /// hands out (checking out per call cost a lock and a timer per request, and one multiplexed
    /// connection pipelines concurrent calls anyway: measured in `bench/run`).
    async fn shared_connection(&self, deadline: tokio::time::Instant) -> RedisResult<Connection> {
        if let Some(connection) = self.0.shared.read().ok().and_then(|shared| shared.clone())
            && !connection.is_broken()
        {
            return Ok(connection);
        }
        let connection = match tokio::time::timeout_at(deadline, self.0.pool.get()).await {
            Ok(pooled) => pooled.map_err(pool_error)?.clone(),
            Err(_) => return Err(timed_out()),
        };
        if let Ok(mut shared) = self.0.shared.write() {
            *shared = Some(connection.clone());
        }
        Ok(connection)
    }
}

fn pool_error(err: bb8::RunError<RedisError>) -> RedisError {
    match err {
        bb8::RunError::User(err) => err,
        bb8::RunError::TimedOut => RedisError::from((redis::ErrorKind::Io, "no connection in time")),
    }
}

fn timed_out() -> RedisError {
    RedisError::from((redis::ErrorKind::Io, "timed out"))
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
    let info = address.into_connection_info()?.set_redis_settings(redis_settings);
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

/// A pooled connection: a multiplexed connection (cheap to clone, pipelines concurrent calls) and
/// its shared "broken" flag.
#[derive(Clone)]
struct Connection {
    /// The connection itself.
    redis: MultiplexedConnection,
    broken: Arc<AtomicBool>,
}

impl Connection {
    /// Marks the connection unusable: the pool replaces it.
    fn discard(&self) {
        self.broken.store(true, Ordering::Relaxed);
    }

    /// Whether a call found it broken.
    fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Relaxed)
    }
}

/// Whether an error means the connection itself is gone (as opposed to an error reply).
fn breaks_connection(err: &RedisError) -> bool {
    err.is_io_error() || err.is_connection_dropped() || err.is_unrecoverable_error() || err.is_timeout()
}

/// The bb8 manager of [`Connection`]s.
struct Manager {
    client: redis::Client,
    /// Failed dials are logged at most once per 10 s.
    log_throttle: Throttle,
}

impl bb8::ManageConnection for Manager {
    type Connection = Connection;
    type Error = RedisError;

    async fn connect(&self) -> Result<Connection, RedisError> {
        let redis = self.client.get_multiplexed_async_connection().await.inspect_err(|err| {
            if self.log_throttle.allow() {
                tracing::warn!(dependency = "redis", error = %err, "cannot connect to Redis");
            }
        })?;
        Ok(Connection { redis, broken: Arc::new(AtomicBool::new(false)) })
    }

    async fn is_valid(&self, conn: &mut Connection) -> Result<(), RedisError> {
        redis::cmd("PING").query_async(&mut conn.redis).await
    }

    fn has_broken(&self, conn: &mut Connection) -> bool {
        conn.broken.load(Ordering::Relaxed)
    }
}
