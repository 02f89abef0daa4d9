//! The cache's Redis connections: bb8-redis's manager with a way to throw a connection away.
//!
//! bb8-redis never reports a multiplexed connection as broken, so one the network cut would stay in
//! the pool, failing every call on it, until the process restarted (the chaos soak caught exactly
//! that: a replica whose cache updates failed for good while the other served what they should have
//! replaced). Each connection here carries a flag that a failed call sets; bb8 drops a flagged
//! connection when it comes back to the pool and dials a new one.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bb8_redis::RedisConnectionManager;
use redis::RedisError;
use redis::aio::MultiplexedConnection;

/// A pooled connection: a multiplexed connection (cheap to clone, pipelines concurrent calls) and
/// its shared "broken" flag.
#[derive(Clone)]
pub struct Connection {
    /// The connection itself.
    pub redis: MultiplexedConnection,
    broken: Arc<AtomicBool>,
}

impl Connection {
    /// Marks the connection unusable: the pool replaces it.
    pub fn discard(&self) {
        self.broken.store(true, Ordering::Relaxed);
    }

    /// Whether a call found it broken.
    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Relaxed)
    }
}

/// Whether an error means the connection itself is gone (as opposed to an error reply).
pub fn breaks_connection(err: &RedisError) -> bool {
    err.is_io_error() || err.is_connection_dropped() || err.is_unrecoverable_error() || err.is_timeout()
}

/// The bb8 manager of [`Connection`]s.
pub struct Manager(pub RedisConnectionManager);

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
