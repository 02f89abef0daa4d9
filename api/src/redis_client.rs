//! The api's one Redis client, shared by the user cache and the rate limiter: one multiplexed
//! connection that every request shares, each call bounded by `REDIS_TIMEOUT_MS`.
//!
//! The connections come from bb8-redis's manager, with a way to throw one away: bb8-redis never
//! reports a multiplexed connection as broken, so one the network cut would stay in the pool, failing
//! every call on it, until the process restarted (the chaos soak caught exactly that: a replica whose
//! cache updates failed for good while the other served what they should have replaced). Each
//! connection here carries a flag that a failed call sets; bb8 drops a flagged connection when it comes
//! back to the pool and dials a new one.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bb8_redis::RedisConnectionManager;
use common::config::RedisConfig;
use redis::aio::MultiplexedConnection;
use redis::{ConnectionAddr, ConnectionInfo, IntoConnectionInfo, RedisError, RedisResult};

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
        let manager = Manager(RedisConnectionManager::new(connection_info(config)?)?);
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

fn connection_info(config: &RedisConfig) -> RedisResult<ConnectionInfo> {
    let mut redis_settings = redis::RedisConnectionInfo::default().set_db(i64::from(config.db));
    if let Some(password) = &config.password {
        redis_settings = redis_settings.set_password(password.expose());
    }
    Ok(ConnectionAddr::Tcp(config.host.clone(), config.port).into_connection_info()?.set_redis_settings(redis_settings))
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
struct Manager(RedisConnectionManager);

impl bb8::ManageConnection for Manager {
    type Connection = Connection;
    type Error = RedisError;

    async fn connect(&self) -> Result<Connection, RedisError> {
        Ok(Connection { redis: self.0.connect().await?, broken: Arc::new(AtomicBool::new(false)) })
    }

    async fn is_valid(&self, conn: &mut Connection) -> Result<(), RedisError> {
        self.0.is_valid(&mut conn.redis).await
    }

    fn has_broken(&self, conn: &mut Connection) -> bool {
        conn.broken.load(Ordering::Relaxed)
    }
}
