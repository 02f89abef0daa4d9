//! Per-client rate limits shared by every replica (SPEC §8): `RATE_LIMIT_RPS` sustained,
//! `RATE_LIMIT_BURST` at once, one GCRA bucket per client in Redis ([`gcra`]).
//!
//! A Redis round trip per request would cost about what a whole cached GET costs, so a replica takes
//! units from the shared bucket in small batches and hands them out locally: one unit at a time for a
//! client that sends little (exact), more for a busy one, never more than 10 ms of its rate, and a batch
//! not used within [`LEASE_MS`] is dropped. So every replica together never admits more than the
//! limit; at worst a client is refused while another replica still holds a few of its units.
//!
//! Redis down or slower than `REDIS_TIMEOUT_MS`: each replica limits each client to the same rate in
//! memory (so N replicas admit up to N times the limit; a client's local bucket starts from what the
//! shared one last said), and after [`SHARED_PAUSE_MS`] one request at a time tries Redis again.
//! Never a 5xx, never a wait beyond the Redis timeout.

pub mod client_address;
pub mod gcra;

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use common::config::RateLimitConfig;
use http::{HeaderMap, HeaderValue};
use prometheus::IntCounter;
use redis::Script;

use self::gcra::{Grant, Rate};
use crate::metrics::ApiMetrics;
use crate::redis_client::RedisClient;

/// A batch of units not used within this long is dropped.
const LEASE_MS: f64 = 100.0;

/// After Redis failed, limit locally this long before trying it again.
const SHARED_PAUSE_MS: u64 = 1000;

/// Clients tracked in memory before idle ones are forgotten.
const MAX_TRACKED_CLIENTS: usize = 10_000;

/// The answer for one request, and the `RateLimit-*` headers it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Whether the request may go on.
    pub allowed: bool,
    /// `RateLimit-Limit`: the bucket's size.
    pub limit: u32,
    /// `RateLimit-Remaining`: requests the client could make at once now.
    pub remaining: u32,
    /// `RateLimit-Reset`: seconds until the bucket is full again.
    pub reset_secs: u64,
    /// `Retry-After` of a refusal, in seconds (at least 1).
    pub retry_after_secs: u64,
}

impl Decision {
    /// Adds the three `RateLimit-*` headers.
    pub fn write_headers(&self, headers: &mut HeaderMap) {
        headers.insert("ratelimit-limit", HeaderValue::from(self.limit));
        headers.insert("ratelimit-remaining", HeaderValue::from(self.remaining));
        headers.insert("ratelimit-reset", HeaderValue::from(self.reset_secs));
    }
}

/// What this replica knows of one client.
#[derive(Debug, Default)]
struct ClientState {
    /// Units taken from the shared bucket and not handed out yet, and until when they may be.
    leased: u32,
    lease_expires_ms: f64,
    /// Units the next batch asks for.
    batch: u32,
    /// Last known remaining units and the time the bucket is full again (local clock).
    remaining: u32,
    full_at_ms: f64,
    /// The shared bucket refused until then: refuse locally without asking again.
    refused_until_ms: f64,
    /// The in-memory bucket used while Redis is away.
    local_tat: f64,
}

/// The limiter. `None` in the state when `RATE_LIMIT_RPS=0`.
pub struct RateLimiter {
    rate: Rate,
    max_batch: u32,
    redis: RedisClient,
    script: Script,
    key_prefix: String,
    clients: Mutex<HashMap<Box<str>, ClientState>>,
    started: Instant,
    /// Redis failed: until this time (ms since `started`) nobody asks it, then one request at a time.
    shared_paused_until_ms: AtomicU64,
    shared_suspect: AtomicBool,
    /// `rate_limit_decisions_total{decision, source}`, indexed by `[limited][Source]`.
    decisions: [[IntCounter; 2]; 2],
}

/// Where a decision came from (the `source` label).
#[derive(Clone, Copy)]
enum Source {
    /// The bucket in Redis (directly, or units leased from it).
    Shared = 0,
    /// This replica's own bucket, while Redis is away.
    Local = 1,
}

impl RateLimiter {
    /// A limiter for `config`, or `None` when limiting is off.
    pub fn new(config: &RateLimitConfig, redis: RedisClient, key_prefix: &str, metrics: &ApiMetrics) -> Option<Self> {
        let rps = config.rps?.get();
        let counter = |decision, source| metrics.rate_limit_decisions.with_label_values(&[decision, source]);
        Some(Self {
            rate: Rate::new(rps, config.burst.get()),
            // 10 ms of the rate, within the burst: one unit each below 100 requests per second.
            max_batch: (rps / 100).clamp(1, 64).min(config.burst.get()),
            redis,
            script: Script::new(gcra::SHARED_SCRIPT),
            key_prefix: format!("{key_prefix}ratelimit:"),
            clients: Mutex::new(HashMap::new()),
            started: Instant::now(),
            shared_paused_until_ms: AtomicU64::new(0),
            shared_suspect: AtomicBool::new(false),
            decisions: [
                [counter("allowed", "shared"), counter("allowed", "local")],
                [counter("limited", "shared"), counter("limited", "local")],
            ],
        })
    }

    /// Round-trips a PING to the limiter's Redis (for `/health`).
    pub async fn ping(&self) -> Result<(), String> {
        self.redis.ping().await.map_err(|err| err.to_string())
    }

    /// Decides one request of `client`.
    pub async fn check(&self, client: &str) -> Decision {
        let now = self.now_ms();
        let wanted = match self.take_leased(client, now) {
            Ok(decision) => return self.counted(decision, Source::Shared),
            Err(wanted) => wanted,
        };
        if self.may_ask_redis(now) {
            match self.take_shared(client, wanted).await {
                Ok(grant) => {
                    self.shared_suspect.store(false, Ordering::Relaxed);
                    return self.counted(self.record_shared(client, self.now_ms(), grant), Source::Shared);
                }
                Err(err) => {
                    tracing::warn!(error = %err, "rate limit: Redis unavailable; limiting in memory per replica");
                    let until = self.now_ms() as u64 + SHARED_PAUSE_MS;
                    self.shared_paused_until_ms.fetch_max(until, Ordering::Relaxed);
                    self.shared_suspect.store(true, Ordering::Relaxed);
                }
            }
        }
        let decision = self.take_local(client, self.now_ms());
        self.counted(decision, Source::Local)
    }

    /// Normally yes. After a failure: no during the pause, then yes for one caller at a time (the
    /// probe), so a hung Redis costs one request its timeout per pause, not every request.
    fn may_ask_redis(&self, now: f64) -> bool {
        if !self.shared_suspect.load(Ordering::Relaxed) {
            return true;
        }
        let paused_until = self.shared_paused_until_ms.load(Ordering::Relaxed);
        (now as u64) >= paused_until
            && self
                .shared_paused_until_ms
                .compare_exchange(paused_until, now as u64 + SHARED_PAUSE_MS, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
    }

    /// Serves the request from what this replica holds, or says how many units to ask Redis for.
    fn take_leased(&self, client: &str, now: f64) -> Result<Decision, u32> {
        let mut clients = self.clients.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let Some(state) = clients.get_mut(client) else { return Err(1) };
        if now < state.refused_until_ms {
            return Ok(self.decision(false, 0, state.full_at_ms - now, state.refused_until_ms - now));
        }
        if state.leased > 0 && now < state.lease_expires_ms {
            state.leased -= 1;
            state.remaining = state.remaining.saturating_sub(1);
            return Ok(self.decision(true, state.remaining, state.full_at_ms - now, 0.0));
        }
        // A batch used up before it expired: the client is busy, ask for more; one that expired with
        // units left: ask for fewer; a client idle since its batch ran out keeps its size.
        if state.leased == 0 && now < state.lease_expires_ms {
            state.batch = (state.batch * 2).min(self.max_batch);
        } else if state.leased > 0 {
            state.batch = (state.batch / 2).max(1);
        }
        state.leased = 0;
        Err(state.batch)
    }

    async fn take_shared(&self, client: &str, wanted: u32) -> redis::RedisResult<Grant> {
        let key = format!("{}{client}", self.key_prefix);
        let (granted, remaining, reset_ms, retry_after_ms): (u32, u32, u64, u64) = self
            .redis
            .call("EVALSHA", |mut conn| async move {
                self.script
                    .key(&key)
                    .arg(self.rate.interval_ms())
                    .arg(self.rate.burst())
                    .arg(wanted)
                    .invoke_async(&mut conn)
                    .await
            })
            .await?;
        Ok(Grant { granted, remaining, reset_ms: reset_ms as f64, retry_after_ms: retry_after_ms as f64 })
    }

    fn record_shared(&self, client: &str, now: f64, grant: Grant) -> Decision {
        let mut clients = self.clients.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let state = self.state(&mut clients, client, now);
        state.full_at_ms = now + grant.reset_ms;
        if grant.granted == 0 {
            // Requests that missed together each asked Redis: units another one fetched a moment ago
            // are this client's already, so this request spends one of those instead of being refused.
            if state.leased > 0 && now < state.lease_expires_ms {
                state.leased -= 1;
                state.remaining = state.leased;
                return self.decision(true, state.remaining, grant.reset_ms, 0.0);
            }
            state.refused_until_ms = now + grant.retry_after_ms;
            return self.decision(false, 0, grant.reset_ms, grant.retry_after_ms);
        }
        // This request takes one unit; the rest join what this replica holds for the client. Requests
        // that missed at the same moment each fetched a batch, and none of those units may be lost:
        // they are gone from the shared bucket either way.
        if now >= state.lease_expires_ms {
            state.leased = 0;
        }
        state.leased += grant.granted - 1;
        state.lease_expires_ms = now + LEASE_MS;
        state.remaining = grant.remaining + state.leased;
        self.decision(true, state.remaining, grant.reset_ms, 0.0)
    }

    fn take_local(&self, client: &str, now: f64) -> Decision {
        let mut clients = self.clients.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let state = self.state(&mut clients, client, now);
        // Start from what the shared bucket last said, not from a full bucket at every Redis blip.
        state.local_tat = state.local_tat.max(state.full_at_ms);
        let grant = self.rate.take(&mut state.local_tat, now, 1);
        self.decision(grant.granted > 0, grant.remaining, grant.reset_ms, grant.retry_after_ms)
    }

    /// The client's entry, made if new. When too many are tracked, those with nothing pending go, and if
    /// that is not enough, all of them (which only forgets leased units and local buckets: it never
    /// admits more than the shared limit, and it bounds the memory and how often the sweep runs).
    fn state<'a>(
        &self,
        clients: &'a mut HashMap<Box<str>, ClientState>,
        client: &str,
        now: f64,
    ) -> &'a mut ClientState {
        if clients.len() >= MAX_TRACKED_CLIENTS && !clients.contains_key(client) {
            clients.retain(|_, state| {
                (state.leased > 0 && now < state.lease_expires_ms)
                    || now < state.refused_until_ms
                    || now < state.local_tat
            });
            if clients.len() >= MAX_TRACKED_CLIENTS / 2 {
                clients.clear();
            }
        }
        clients.entry(client.into()).or_insert_with(|| ClientState { batch: 1, ..ClientState::default() })
    }

    fn decision(&self, allowed: bool, remaining: u32, reset_ms: f64, retry_after_ms: f64) -> Decision {
        Decision {
            allowed,
            limit: self.rate.burst(),
            remaining,
            reset_secs: (reset_ms.max(0.0) / 1000.0).ceil() as u64,
            retry_after_secs: ((retry_after_ms / 1000.0).ceil() as u64).max(1),
        }
    }

    fn counted(&self, decision: Decision, source: Source) -> Decision {
        self.decisions[usize::from(!decision.allowed)][source as usize].inc();
        decision
    }

    fn now_ms(&self) -> f64 {
        self.started.elapsed().as_secs_f64() * 1000.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroU32;

    fn limiter() -> RateLimiter {
        let config = RateLimitConfig {
            rps: NonZeroU32::new(1000),
            burst: NonZeroU32::new(1000).unwrap(),
            trusted_proxies: Vec::new(),
        };
        let vars = |_: &str| None;
        let redis_config = common::config::Config::from_lookup(vars).unwrap().redis;
        // Never called: only the bookkeeping after Redis's answers is exercised.
        let redis = RedisClient::new(&redis_config).unwrap();
        RateLimiter::new(&config, redis, "test:", &ApiMetrics::new()).unwrap()
    }

    // A runtime only because the Redis client dials in a task of its own.
    #[tokio::test]
    async fn an_empty_answer_spends_units_a_concurrent_request_just_fetched() {
        let limiter = limiter();
        let granted = Grant { granted: 3, remaining: 0, reset_ms: 1000.0, retry_after_ms: 0.0 };
        let empty = Grant { granted: 0, remaining: 0, reset_ms: 1000.0, retry_after_ms: 5.0 };
        assert!(limiter.record_shared("c", 0.0, granted).allowed);
        // Two units left over from the batch: two requests whose own fetch came back empty are served.
        for left in [1, 0] {
            let decision = limiter.record_shared("c", 1.0, empty);
            assert!(decision.allowed && decision.remaining == left, "{decision:?}");
        }
        assert!(!limiter.record_shared("c", 2.0, empty).allowed, "nothing held any more");
        // Held units expire with their lease.
        assert!(limiter.record_shared("d", 0.0, granted).allowed);
        assert!(!limiter.record_shared("d", LEASE_MS + 1.0, empty).allowed);
    }
}
