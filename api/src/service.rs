//! One request, start to finish: request id, routing, the request deadline, the handler, the log line.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use common::traces;
use http::Request;
use hyper::body::Incoming;
use tracing::Instrument;
use uuid::Uuid;

use crate::events::handlers as events;
use crate::health;
use crate::http::body::{parse_json, read_body};
use crate::http::error::ApiError;
use crate::http::query::Pagination;
use crate::http::response::HttpResponse;
use crate::idempotency::{self, Idempotent};
use crate::outbox::Origin;
use crate::ratelimit::client_address::client_address;
use crate::routes::{Endpoint, RouteMatch};
use crate::state::AppState;
use crate::users::handlers as users;

/// Serves one request from `peer`. Infallible: every failure becomes a JSON error response.
pub async fn handle(state: AppState, peer: IpAddr, request: Request<Incoming>) -> HttpResponse {
    let started = Instant::now();
    let request_id_header = common::request_id::of(&request);
    // Only visible ASCII gets in (see `request_id`), so the text form always exists.
    let request_id = request_id_header.to_str().unwrap_or_default();
    let method = request.method().clone();
    let route = state.routes.lookup(method.as_str(), request.uri().path());
    let (endpoint, template) = match &route {
        RouteMatch::Found { endpoint, template, .. } => (Some(*endpoint), *template),
        RouteMatch::MethodNotAllowed { template, .. } => (None, *template),
        RouteMatch::NotFound => (None, "unmatched"),
    };
    // Probes and scrapes are never refused (an overloaded pod is alive, and operators need its
    // metrics) nor traced (a trace per probe would bury the requests).
    let exempt = template.starts_with("/health") || template == "/metrics" || template == "/openapi.json";
    macro_rules! request_span {
        ($target:literal) => {
            tracing::info_span!(
                target: $target,
                "request",
                request_id = %request_id,
                http.method = %method,
                http.route = template,
                client_id = tracing::field::Empty,
                http.response.status_code = tracing::field::Empty,
                trace_id = tracing::field::Empty,
                span_id = tracing::field::Empty,
                otel.name = tracing::field::Empty,
                otel.kind = tracing::field::Empty,
                otel.status_code = tracing::field::Empty,
            )
        };
    }
    let span = if exempt { request_span!("api::probe") } else { request_span!("api::request") };
    if traces::is_on() && !exempt {
        span.record("otel.name", format!("{method} {template}"));
        span.record("otel.kind", "server");
        let headers = request.headers();
        traces::continue_trace(&span, |name| headers.get(name).and_then(|value| value.to_str().ok()));
    }
    async {
        let permit = if exempt { None } else { state.in_flight.try_acquire().ok() };
        let result = if permit.is_none() && !exempt {
            state.metrics.http_rejected.inc();
            Err(ApiError::Overloaded)
        } else {
            let deadline = state.config.server.request_timeout;
            match tokio::time::timeout(deadline, dispatch(&state, request_id, peer, route, request)).await {
                Ok(result) => result,
                Err(_) => Err(ApiError::Timeout),
            }
        };
        drop(permit);
        let mut response = result.unwrap_or_else(|err| err.into_response(request_id));
        response.headers_mut().insert(common::request_id::HEADER, request_id_header.clone());
        let elapsed = started.elapsed();
        let status = response.status().as_u16();
        state.metrics.observe_request(endpoint, template, method.as_str(), status, elapsed);
        if traces::is_on() {
            let span = tracing::Span::current();
            span.record("http.response.status_code", status);
            if status >= 500 {
                traces::record_error(&span);
            }
        }
        tracing::info!(http.status = status, duration_ms = elapsed.as_secs_f64() * 1000.0, "request completed");
        response
    }
    .instrument(span)
    .await
}

async fn dispatch(
    state: &AppState,
    request_id: &str,
    peer: IpAddr,
    route: RouteMatch,
    request: Request<Incoming>,
) -> Result<HttpResponse, ApiError> {
    let (endpoint, id) = match route {
        RouteMatch::Found { endpoint, id, .. } => (endpoint, id),
        RouteMatch::MethodNotAllowed { allow, .. } => return Err(ApiError::MethodNotAllowed(allow)),
        RouteMatch::NotFound => return Err(ApiError::RouteNotFound),
    };
    let (parts, body) = request.into_parts();
    // Routes without a scope (probes, metrics, the document) are neither authenticated nor limited.
    let Some(scope) = endpoint.scope() else {
        return run(state, request_id, endpoint, id, None, parts, body).await;
    };
    let clients = &state.clients;
    let client = clients.auth.authenticate(&parts, scope, &state.metrics.auth_rejections).await?;
    if let Some(client) = &client {
        tracing::Span::current().record("client_id", &*client.id);
    }
    // Who the caller is for its rate limit and its idempotency keys (SPEC §8, §10): the token's
    // client, or with authentication off the client's address. Prefixed, so that a client whose id
    // reads like an address never shares a budget or keys with that address.
    let identity: Arc<str> = match &client {
        Some(client) => format!("client:{}", client.id).into(),
        None => {
            let address = client_address(peer, &parts.headers, &state.config.rate_limit.trusted_proxies);
            format!("address:{address}").into()
        }
    };
    let Some(limiter) = &clients.rate_limiter else {
        return run(state, request_id, endpoint, id, Some(&identity), parts, body).await;
    };
    let decision = limiter.check(&identity).await;
    let result = if decision.allowed {
        run(state, request_id, endpoint, id, Some(&identity), parts, body).await
    } else {
        Err(ApiError::RateLimited(decision.retry_after_secs))
    };
    let mut response = result.unwrap_or_else(|err| err.into_response(request_id));
    decision.write_headers(response.headers_mut());
    Ok(response)
}

/// Runs the endpoint's handler; `caller` is the caller's identity on authenticated routes.
async fn run(
    state: &AppState,
    request_id: &str,
    endpoint: Endpoint,
    id: Option<String>,
    caller: Option<&str>,
    parts: http::request::Parts,
    body: Incoming,
) -> Result<HttpResponse, ApiError> {
    match endpoint {
        Endpoint::HealthLive => Ok(health::live()),
        Endpoint::HealthReady => Ok(health::ready(state)),
        Endpoint::Health => Ok(health::report(state)),
        Endpoint::Metrics => Ok(health::metrics(state)),
        Endpoint::OpenApi => Ok(crate::http::response::json_bytes(
            http::StatusCode::OK,
            Bytes::from_static(crate::OPENAPI_DOCUMENT.as_bytes()),
        )),
        Endpoint::ListUsers => users::list(state, Pagination::from_query(parts.uri.query())?).await,
        Endpoint::GetUser => users::get(state, parse_id(id)?).await,
        Endpoint::UserStats => events::stats(state, parse_id(id)?).await,
        Endpoint::ListEvents => events::list(state, parts.uri.query()).await,
        Endpoint::GetEvent => events::get(state, parse_id(id)?).await,
        Endpoint::CreateUser | Endpoint::UpdateUser | Endpoint::DeleteUser | Endpoint::CreateEvent => {
            let caller = caller.ok_or_else(|| ApiError::Internal(anyhow::anyhow!("a write route without a caller")))?;
            write(state, request_id, endpoint, id, caller, parts, body).await
        }
    }
}

/// Runs a write: reads its body and its `Idempotency-Key` (SPEC §10), answers at once from a
/// committed answer to the key, else runs the handler, which stores its answer with its write.
async fn write(
    state: &AppState,
    request_id: &str,
    endpoint: Endpoint,
    id: Option<String>,
    caller: &str,
    parts: http::request::Parts,
    body: Incoming,
) -> Result<HttpResponse, ApiError> {
    let key = idempotency::Key::from_headers(&parts.headers)?;
    // DELETE has no body to read; one sent anyway is ignored, as without a key.
    let body = if endpoint == Endpoint::DeleteUser { Bytes::new() } else { read_body(&parts.headers, body).await? };
    let idempotent = key.map(|key| {
        let (method, path) = (parts.method.as_str(), parts.uri.path());
        Idempotent::new(caller.to_owned(), key, method, path, &body, state.config.idempotency_ttl)
    });
    let counted = idempotent.is_some();
    let result = run_write(state, request_id, endpoint, id, &body, idempotent).await;
    if counted {
        let outcome = idempotency::Outcome::of(&result).as_str();
        state.metrics.idempotent_requests.with_label_values(&[outcome]).inc();
    }
    result
}

/// [`write`] once the body is read: a committed answer to the key first, else the handler.
async fn run_write(
    state: &AppState,
    request_id: &str,
    endpoint: Endpoint,
    id: Option<String>,
    body: &[u8],
    idempotent: Option<Idempotent>,
) -> Result<HttpResponse, ApiError> {
    if let Some(idempotent) = &idempotent
        && let Some(replay) = idempotency::replay(&state.db, idempotent).await?
    {
        return Ok(replay);
    }
    // Inside the request's span: its trace context goes with the messages the write causes.
    let origin = &Origin::of_request(request_id);
    match endpoint {
        Endpoint::CreateUser => users::create(state, origin, parse_json(body)?, idempotent).await,
        Endpoint::UpdateUser => {
            let id = parse_id(id)?;
            users::update(state, origin, id, parse_json(body)?, idempotent).await
        }
        Endpoint::DeleteUser => users::delete(state, origin, parse_id(id)?, idempotent).await,
        Endpoint::CreateEvent => events::create(state, origin, parse_json(body)?, idempotent).await,
        other => Err(ApiError::Internal(anyhow::anyhow!("{other:?} is not a write"))),
    }
}

fn parse_id(raw: Option<String>) -> Result<Uuid, ApiError> {
    raw.as_deref()
        .and_then(|raw| Uuid::try_parse(raw).ok())
        .ok_or_else(|| ApiError::bad_request("invalid_id", "id must be a UUID"))
}
