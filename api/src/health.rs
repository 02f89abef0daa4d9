//! Liveness, readiness and the seed's `/health` report (SPEC §2 "Health and metrics").

use chrono::{SecondsFormat, Utc};
use http::StatusCode;
use serde_json::{Value, json};

use crate::auth::Authenticator;
use crate::http::response::{self, HttpResponse};
use crate::samples::{self, Sample, Samples};
use crate::state::AppState;

/// `GET /health/live`: the process runs. Touches nothing else.
pub fn live() -> HttpResponse {
    // A constant: the probe is hit every few seconds by every kubelet, and benchmarked as the floor.
    response::json_bytes(StatusCode::OK, bytes::Bytes::from_static(br#"{"status":"ok"}"#))
}

/// `GET /health/ready`: the issuer's keys are loaded (with `AUTH_MODE=jwt`), PostgreSQL answered
/// the last background check (at most [`samples::STALE_AFTER`] ago), and shutdown has not begun.
/// Reads samples only: no I/O per probe.
pub fn ready(state: &AppState) -> HttpResponse {
    if state.is_shutting_down() {
        return response::json(StatusCode::SERVICE_UNAVAILABLE, &json!({"status": "shutting_down"}));
    }
    if !state.clients.auth.is_ready() {
        let error = "the issuer's JWK Set is not loaded yet";
        return response::json(StatusCode::SERVICE_UNAVAILABLE, &json!({"status": "not_ready", "error": error}));
    }
    match postgres_now(&state.samples) {
        Ok(()) => response::json(StatusCode::OK, &json!({"status": "ready"})),
        Err(error) => response::json(StatusCode::SERVICE_UNAVAILABLE, &json!({"status": "not_ready", "error": error})),
    }
}

/// Whether the latest PostgreSQL sample is recent and good.
fn postgres_now(samples: &Samples) -> Result<(), String> {
    match samples.postgres() {
        None => Err("PostgreSQL not checked yet".into()),
        Some(sample) if sample.age() > samples::STALE_AFTER => {
            Err(format!("no PostgreSQL check finished for {} ms", sample.age().as_millis()))
        }
        Some(sample) => sample.result,
    }
}

/// `GET /health`: every dependency, as last checked in the background (each with the check's age).
/// PostgreSQL down is `unhealthy` (503); Redis or Kafka down is `degraded` (200): requests still work
/// (the cache falls back to PostgreSQL, the outbox holds events).
pub fn report(state: &AppState) -> HttpResponse {
    let samples = &state.samples;
    let postgres = (check(samples.postgres()), postgres_now(samples).is_ok());
    let redis_used = state.cache.is_enabled() || state.clients.rate_limiter.is_some();
    let redis = if redis_used { checked(samples.redis()) } else { (json!({"status": "disabled"}), true) };
    let kafka = checked(samples.kafka());
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

/// A sample as the report shows it, and whether it counts as up.
fn checked(sample: Option<Sample>) -> (Value, bool) {
    let up = sample.as_ref().is_some_and(|sample| sample.result.is_ok() && sample.age() <= samples::STALE_AFTER);
    (check(sample), up)
}

fn check(sample: Option<Sample>) -> Value {
    let Some(sample) = sample else {
        return json!({"status": "down", "error": "not checked yet"});
    };
    let (latency_ms, age_ms) = (sample.latency.as_secs_f64() * 1000.0, sample.age().as_millis() as u64);
    match sample.result {
        Ok(()) => json!({"status": "up", "latency_ms": latency_ms, "age_ms": age_ms}),
        Err(error) => json!({"status": "down", "latency_ms": latency_ms, "age_ms": age_ms, "error": error}),
    }
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

/// `GET /metrics`: Prometheus text. Pool and in-flight gauges are read from memory now; the outbox
/// backlog comes from the last background check. No I/O per scrape.
pub fn metrics(state: &AppState) -> HttpResponse {
    state.metrics.sample_pools(&[&state.db, state.event_writer.pool()]);
    state.metrics.sample_in_flight(state.config.server.max_inflight_requests, state.in_flight.available_permits());
    let mut response = response::text(StatusCode::OK, common::metrics::encode(&state.metrics.registry));
    response
        .headers_mut()
        .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static(common::metrics::CONTENT_TYPE));
    response
}
