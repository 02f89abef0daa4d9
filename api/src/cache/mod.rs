//! Redis cache of `GET /api/v1/users/{id}` responses (cache-aside), safe against stale fills.
//!
//! Every entry is `"<version>|<json body>"`, or `"<version>|"` for a deleted user (a tombstone).
//! All writes go through one Lua compare-and-set that only replaces an entry with a strictly newer
//! version. So a GET that read the row just before a PUT or DELETE committed cannot put the old state
//! back after the write has stored its own (newer) entry: its fill is refused by Redis itself.
//! Fills are also dropped when the database read they carry is older than half the TTL, so a newer
//! entry can never have expired before the stale fill lands.
//!
//! Redis is never on the critical path: each call has a short timeout, errors are logged and turn
//! into a miss, and after a failure reads skip Redis for a moment instead of each paying the
//! timeout. A write whose cache update fails is retried in the background (every
//! [`WRITE_RETRY_INTERVAL`] at most) until it lands or the old entry has surely expired; meanwhile
//! this replica bypasses the cache for that user.
//!
//! Other replicas do not know which writes failed, so after an outage a replica trusts Redis again
//! only once it has answered for a whole [`READ_BACKOFF`]: long enough for every replica's failed
//! writes to land first (chaos-tested: `worker/tests/pipeline/chaos`). What no cache-aside design can
//! cover without failing writes is a replica cut off from Redis while others still reach it: they may
//! serve the previous state until the cut-off replica's retry lands.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::backoff::Backoff;
use common::config::RedisConfig;
use prometheus::IntCounterVec;
use redis::{RedisResult, Script};
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::redis_client::RedisClient;

/// Stores `ARGV[1] | ARGV[2]` with a TTL of `ARGV[3]` ms unless the entry has an equal or newer version.
const COMPARE_AND_SET: &str = r"
local current = redis.call('GET', KEYS[1])
if current then
  local separator = string.find(current, '|', 1, true)
  if separator and tonumber(string.sub(current, 1, separator - 1)) >= tonumber(ARGV[1]) then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. ARGV[2], 'PX', ARGV[3])
return 1
";

/// After a failure, reads skip Redis this long, and after that until Redis has answered for this long.
const READ_BACKOFF: Duration = Duration::from_secs(1);

/// Longest pause between retries of a cache update that failed; well under [`READ_BACKOFF`], so a
/// retry lands before any replica reads again after an outage.
const WRITE_RETRY_INTERVAL: Duration = Duration::from_millis(200);

/// What the cache knows about a user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// The serialized user, ready to be the response body.
    Hit(Bytes),
    /// The user was deleted.
    Deleted,
    /// Nothing usable: ask PostgreSQL.
    Miss,
}

/// The user cache. Cheap to clone.
#[derive(Clone)]
pub struct UserCache(Option<Arc<Inner>>);

struct Inner {
    redis: RedisClient,
    key_prefix: String,
    ttl: Duration,
    compare_and_set: Script,
    started: Instant,
    /// Milliseconds since `started` before which reads skip Redis.
    reads_paused_until_ms: AtomicU64,
    /// A call failed since Redis last proved healthy: the next read probes instead of reading.
    suspect: AtomicBool,
    /// Users whose latest write has not reached Redis yet.
    pending_writes: Mutex<HashSet<Uuid>>,
    /// Size of `pending_writes`, so the hot path skips the lock when nothing is pending.
    pending_count: std::sync::atomic::AtomicUsize,
    /// `cache_operations_total{operation, result}`.
    operations: IntCounterVec,
}

impl UserCache {
    /// A cache over `redis`, or a cache that always misses when `CACHE_TTL` is 0.
    pub fn new(redis: RedisClient, config: &RedisConfig, operations: IntCounterVec) -> Self {
        let Some(ttl) = config.cache_ttl else {
            return Self(None);
        };
        Self(Some(Arc::new(Inner {
            redis,
            key_prefix: config.key_prefix.clone(),
            ttl,
            compare_and_set: Script::new(COMPARE_AND_SET),
            started: Instant::now(),
            reads_paused_until_ms: AtomicU64::new(0),
            suspect: AtomicBool::new(false),
            pending_writes: Mutex::new(HashSet::new()),
            pending_count: std::sync::atomic::AtomicUsize::new(0),
            operations,
        })))
    }

    /// Looks a user up. Never fails: any problem is a [`Lookup::Miss`].
    pub async fn get(&self, id: Uuid) -> Lookup {
        let Some(inner) = &self.0 else { return Lookup::Miss };
        if inner.reads_paused() || inner.is_pending(id) || inner.probing_after_outage().await {
            inner.count("get", "skipped");
            return Lookup::Miss;
        }
        let key = inner.key(id);
        let result = inner
            .redis
            .call("GET", |mut conn| async move {
                redis::cmd("GET").arg(&key).query_async::<Option<Vec<u8>>>(&mut conn).await
            })
            .await;
        match result {
            Ok(Some(entry)) => {
                inner.count("get", "hit");
                decode(Bytes::from(entry))
            }
            Ok(None) => {
                inner.count("get", "miss");
                Lookup::Miss
            }
            Err(err) => {
                inner.count("get", "error");
                tracing::warn!(error = %err, "cache read failed; serving from PostgreSQL");
                inner.pause_reads();
                Lookup::Miss
            }
        }
    }

    /// Stores what a GET read from PostgreSQL, in the background (the response does not wait).
    /// `read_started` is when that database read began. Returns the background task, if one was
    /// started, for a test to wait on.
    pub fn fill(&self, id: Uuid, version: i64, body: Bytes, read_started: Instant) -> Option<JoinHandle<()>> {
        let inner = self.0.as_ref()?;
        if inner.reads_paused() || inner.is_pending(id) {
            return None;
        }
        let inner = Arc::clone(inner);
        Some(tokio::spawn(async move {
            // Past half the TTL a newer entry might have expired already; the fill could resurrect
            // the old state, so it is dropped.
            if read_started.elapsed() > inner.ttl / 2 {
                return;
            }
            if let Err(err) = inner.compare_and_set(id, version, &body).await {
                inner.count("fill", "error");
                tracing::warn!(error = %err, "cache fill failed");
                inner.pause_reads();
            }
        }))
    }

    /// Records a user's new state after a write committed; returns once Redis has it or the attempt
    /// failed (then it is retried in the background).
    pub async fn store(&self, id: Uuid, version: i64, body: Bytes) {
        self.write(id, version, body).await;
    }

    /// Records that a user was deleted; `version` is the deleted row's version.
    pub async fn store_deleted(&self, id: Uuid, version: i64) {
        self.write(id, version + 1, Bytes::new()).await;
    }

    async fn write(&self, id: Uuid, version: i64, body: Bytes) {
        let Some(inner) = &self.0 else { return };
        if let Err(err) = inner.compare_and_set(id, version, &body).await {
            inner.count("write", "error");
            tracing::warn!(error = %err, "cache update after a write failed; retrying in the background");
            inner.pause_reads();
            inner.retry_in_background(id, version, body);
        }
    }

    /// Round-trips a PING, for health checks.
    pub async fn ping(&self) -> Result<(), String> {
        let Some(inner) = &self.0 else { return Err("cache disabled (CACHE_TTL=0)".into()) };
        inner.ping().await.map_err(|err| err.to_string())
    }

    /// Whether the cache is turned on.
    pub fn is_enabled(&self) -> bool {
        self.0.is_some()
    }
}

impl Inner {
    async fn ping(&self) -> RedisResult<()> {
        self.redis.ping().await
    }

    fn count(&self, operation: &str, result: &str) {
        self.operations.with_label_values(&[operation, result]).inc();
    }

    fn key(&self, id: Uuid) -> String {
        format!("{}user:{}", self.key_prefix, id)
    }

    async fn compare_and_set(&self, id: Uuid, version: i64, body: &[u8]) -> RedisResult<()> {
        let key = self.key(id);
        let ttl_ms = u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX);
        self.redis
            .call("EVALSHA", |mut conn| async move {
                self.compare_and_set
                    .key(&key)
                    .arg(version)
                    .arg(body)
                    .arg(ttl_ms)
                    .invoke_async::<i64>(&mut conn)
                    .await
                    .map(drop)
            })
            .await
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn reads_paused(&self) -> bool {
        self.now_ms() < self.reads_paused_until_ms.load(Ordering::Relaxed)
    }

    fn pause_reads(&self) {
        self.suspect.store(true, Ordering::Relaxed);
        self.extend_pause();
    }

    fn extend_pause(&self) {
        let until = self.now_ms() + u64::try_from(READ_BACKOFF.as_millis()).unwrap_or(u64::MAX);
        self.reads_paused_until_ms.fetch_max(until, Ordering::Relaxed);
    }

    /// After a failure, the first read past the pause probes Redis (one caller at a time) instead of
    /// reading: if Redis answers, reads stay off for another [`READ_BACKOFF`], which lets the writes
    /// that failed during the outage, on every replica, land before this one trusts Redis again.
    /// Returns whether the caller must skip Redis.
    async fn probing_after_outage(&self) -> bool {
        if !self.suspect.load(Ordering::Relaxed) {
            return false;
        }
        if self.suspect.compare_exchange(true, false, Ordering::AcqRel, Ordering::Relaxed).is_err() {
            return true; // another request is probing
        }
        match self.ping().await {
            Ok(()) => self.extend_pause(),
            Err(_) => self.pause_reads(),
        }
        true
    }

    fn is_pending(&self, id: Uuid) -> bool {
        self.pending_count.load(Ordering::Acquire) > 0
            && self.pending_writes.lock().is_ok_and(|pending| pending.contains(&id))
    }

    /// Keeps trying to land a write's entry until it does, or until any entry it should replace has
    /// expired (one TTL after the write): from then on Redis cannot serve the old state any more.
    fn retry_in_background(self: &Arc<Self>, id: Uuid, version: i64, body: Bytes) {
        if let Ok(mut pending) = self.pending_writes.lock() {
            pending.insert(id);
            self.pending_count.store(pending.len(), Ordering::Release);
        }
        let inner = Arc::clone(self);
        tokio::spawn(async move {
            let give_up_at = Instant::now() + inner.ttl;
            let mut backoff = Backoff::new(Duration::from_millis(50), WRITE_RETRY_INTERVAL);
            while Instant::now() < give_up_at {
                tokio::time::sleep(backoff.next_delay()).await;
                if inner.compare_and_set(id, version, &body).await.is_ok() {
                    break;
                }
            }
            if let Ok(mut pending) = inner.pending_writes.lock() {
                pending.remove(&id);
                inner.pending_count.store(pending.len(), Ordering::Release);
            }
        });
    }
}

fn decode(entry: Bytes) -> Lookup {
    let Some(separator) = entry.iter().position(|&byte| byte == b'|') else {
        return Lookup::Miss;
    };
    let body = entry.slice(separator + 1..);
    if body.is_empty() { Lookup::Deleted } else { Lookup::Hit(body) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_entries_and_tombstones() {
        assert_eq!(decode(Bytes::from_static(b"3|{\"a\":1}")), Lookup::Hit(Bytes::from_static(b"{\"a\":1}")));
        assert_eq!(decode(Bytes::from_static(b"4|")), Lookup::Deleted);
        assert_eq!(decode(Bytes::from_static(b"garbage")), Lookup::Miss);
    }
}
