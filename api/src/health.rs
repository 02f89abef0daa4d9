//! Liveness, readiness and the seed's `/health` report (SPEC §2 "Health and metrics").

use std::time::{Duration, Instant};

use chrono::{SecondsFormat, Utc};
use diesel_async::RunQueryDsl;
use http::StatusCode;
use serde_json::{Value, json};

use crate::auth::Authenticator;
use crate::http::response::{self, HttpResponse};
use crate::state::AppState;

/// A dependency check never takes longer than this, so probes answer promptly.
const CHECK_TIMEOUT: Duration = Duration::from_secs(1);

/// `GET /health/live`: the process runs. Touches nothing else.
pub fn live() -> HttpResponse {
    // A constant: the probe is hit every few seconds by every kubelet, and benchmarked as the floor.
    response::json_bytes(StatusCode::OK, bytes::Bytes::from_static(br#"{"status":"ok"}"#))
}

/// `GET /health/ready`: PostgreSQL answers, the issuer's keys are loaded (with `AUTH_MODE=jwt`) and
/// shutdown has not begun.
pub async fn ready(state: &AppState) -> HttpResponse {
    if state.is_shutting_down() {
        return response::json(StatusCode::SERVICE_UNAVAILABLE, &json!({"status": "shutting_down"}));
    }
    if !state.clients.auth.is_ready() {
        let error = "the issuer's JWK Set is not loaded yet";
        return response::json(StatusCode::SERVICE_UNAVAILABLE, &json!({"status": "not_ready", "error": error}));
    }
    match check_postgres(state).await {
        Ok(()) => response::json(StatusCode::OK, &json!({"status": "ready"})),
        Err(error) => response::json(StatusCode::SERVICE_UNAVAILABLE, &json!({"status": "not_ready", "error": error})),
    }
}

/// `GET /health`: every dependency, checked concurrently. PostgreSQL down is `unhealthy` (503);
/// Redis or Kafka down is `degraded` (200): requests still work (the cache falls back to PostgreSQL,
/// the outbox holds events).
pub async fn report(state: &AppState) -> HttpResponse {
    let limiter = state.clients.rate_limiter.as_ref();
    let redis_check = async {
        match limiter {
            Some(limiter) if !state.cache.is_enabled() => limiter.ping().await,
            _ => state.cache.ping().await,
        }
    };
    let (postgres, redis, kafka) =
        tokio::join!(timed(check_postgres(state)), timed(redis_check), timed(check_kafka(state)));
    let redis_used = state.cache.is_enabled() || limiter.is_some();
    let redis = if redis_used { redis } else { (json!({"status": "disabled"}), true) };
    let (auth, jwks) = auth_report(&state.clients.auth);
    let status = match (postgres.1 && state.clients.auth.is_ready(), redis.1 && kafka.1 && jwks.1) {
        (false, _) => "unhealthy",
        (true, false) => "degraded",
        (true, true) => "healthy",
    };
    let code = if status == "unhealthy" { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK };
    response::json(
        code,
        &json!({
            "status": status,
            "timestamp": Utc::now().to_rfc3339_opts(SecondsFormat::Micros, true),
            "auth": auth,
            "checks": {"postgres": postgres.0, "redis": redis.0, "kafka": kafka.0, "jwks": jwks.0},
        }),
    )
}

/// `"auth"` of the report, and the JWKS check: `up` when loaded and the last refresh worked, `stale`
/// (degraded: tokens still verify against the last good set) when it failed, `down` before any load.
fn auth_report(auth: &Authenticator) -> (&'static str, (Value, bool)) {
    let Authenticator::Jwt(verifier) = auth else {
        return ("disabled", (json!({"status": "disabled"}), true));
    };
    let keys = verifier.keys();
    let check = match (keys.is_loaded(), keys.last_error()) {
        (true, None) => (json!({"status": "up"}), true),
        (true, Some(error)) => (json!({"status": "stale", "error": error}), false),
        (false, error) => (json!({"status": "down", "error": error.unwrap_or_else(|| "loading".into())}), false),
    };
    ("jwt", check)
}

async fn check_postgres(state: &AppState) -> Result<(), String> {
    let check = async {
        state
            .db
            .run(|conn| {
                Box::pin(async move { Ok::<_, anyhow::Error>(diesel::sql_query("SELECT 1").execute(conn).await?) })
            })
            .await
            .map_err(|err| format!("{err:#}"))?;
        Ok(())
    };
    tokio::time::timeout(CHECK_TIMEOUT, check).await.unwrap_or_else(|_| Err("timed out".into()))
}

/// `GET /metrics`: Prometheus text. Pool state and the outbox backlog are sampled now.
pub async fn metrics(state: &AppState) -> HttpResponse {
    state.metrics.sample_pool(&state.db, state.config.database.pool_max_size.get());
    state.metrics.sample_in_flight(state.config.server.max_inflight_requests, state.in_flight.available_permits());
    let backlog = async {
        let count = diesel::dsl::select(diesel::dsl::sql::<diesel::sql_types::BigInt>("(SELECT count(*) FROM outbox)"));
        state
            .db
            .run(|conn| Box::pin(async move { Ok::<_, anyhow::Error>(count.get_result::<i64>(conn).await?) }))
            .await
            .ok()
    };
    if let Ok(Some(backlog)) = tokio::time::timeout(CHECK_TIMEOUT / 2, backlog).await {
        state.metrics.outbox_backlog.set(backlog);
    }
    let mut response = response::text(StatusCode::OK, common::metrics::encode(&state.metrics.registry));
    response
        .headers_mut()
        .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static(common::metrics::CONTENT_TYPE));
    response
}

/// Asks a broker for the events topic's metadata (librdkafka's call blocks, so it runs off the runtime).
async fn check_kafka(state: &AppState) -> Result<(), String> {
    let producer = state.producer.clone();
    let topic = state.config.kafka.topic.clone();
    tokio::task::spawn_blocking(move || {
        use rdkafka::producer::Producer;
        producer
            .client()
            .fetch_metadata(Some(&topic), CHECK_TIMEOUT.mul_f32(0.9))
            .map(drop)
            .map_err(|err| err.to_string())
    })
    .await
    .map_err(|err| err.to_string())?
}

/// Runs a check with a deadline; returns its JSON report and whether it passed.
async fn timed(check: impl Future<Output = Result<(), String>>) -> (Value, bool) {
    let started = Instant::now();
    let result = tokio::time::timeout(CHECK_TIMEOUT, check).await.unwrap_or_else(|_| Err("timed out".into()));
    let latency_ms = started.elapsed().as_secs_f64() * 1000.0;
    match result {
        Ok(()) => (json!({"status": "up", "latency_ms": latency_ms}), true),
        Err(error) => (json!({"status": "down", "latency_ms": latency_ms, "error": error}), false),
    }
}
