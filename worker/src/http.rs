//! The worker's small HTTP server on `WORKER_HTTP_PORT`: liveness, readiness and metrics.

use std::convert::Infallible;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// What readiness is computed from.
#[derive(Clone)]
pub struct Health {
    /// The consumer holds at least one partition (reported; a member with none is idle, not broken).
    pub assigned: watch::Receiver<bool>,
    /// Shutdown began.
    pub stopping: watch::Receiver<bool>,
    /// What `/metrics` renders.
    pub metrics: std::sync::Arc<crate::metrics::WorkerMetrics>,
}

/// Serves until `stop` turns true.
pub async fn serve(listener: TcpListener, health: Health, mut stop: watch::Receiver<bool>) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(std::time::Duration::from_secs(5));
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let health = health.clone();
                let service = service_fn(move |request| {
                    let health = health.clone();
                    async move { Ok::<_, Infallible>(route(&health, &request)) }
                });
                let connection = builder.serve_connection(TokioIo::new(stream), service).into_owned();
                tokio::spawn(connection);
            }
            _ = stop.wait_for(|stopped| *stopped) => break,
        }
    }
}

fn route(health: &Health, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    let request_id = common::request_id::of(request);
    let mut response = answer(health, request, &request_id);
    response.headers_mut().insert(common::request_id::HEADER, request_id);
    response
}

fn answer(health: &Health, request: &Request<Incoming>, request_id: &http::HeaderValue) -> Response<Full<Bytes>> {
    let path = request.uri().path().trim_end_matches('/');
    match (request.method().as_str(), path) {
        ("GET", "/health/live") => json(StatusCode::OK, r#"{"status":"ok"}"#),
        ("GET", "/health/ready") => {
            // The worker only starts serving after it reached the broker and subscribed, so until
            // shutdown it is consuming, or idle in its group when it holds no partition.
            if *health.stopping.borrow() {
                json(StatusCode::SERVICE_UNAVAILABLE, r#"{"status":"shutting_down"}"#)
            } else if *health.assigned.borrow() {
                json(StatusCode::OK, r#"{"status":"ready","assigned":true}"#)
            } else {
                json(StatusCode::OK, r#"{"status":"ready","assigned":false}"#)
            }
        }
        ("GET", "/metrics") => {
            let mut response = Response::new(Full::new(Bytes::from(common::metrics::encode(&health.metrics.registry))));
            response
                .headers_mut()
                .insert(header::CONTENT_TYPE, http::HeaderValue::from_static(common::metrics::CONTENT_TYPE));
            response
        }
        (_, "/health/live" | "/health/ready" | "/metrics") => {
            let mut response =
                error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed", "method_not_allowed", request_id);
            response.headers_mut().insert(header::ALLOW, http::HeaderValue::from_static("GET"));
            response
        }
        _ => error(StatusCode::NOT_FOUND, "no route for this path", "route_not_found", request_id),
    }
}

/// An error in the api's shape (`common::wire::ErrorBody`), so that clients and dashboards read both
/// binaries' errors the same way.
fn error(status: StatusCode, message: &str, code: &str, request_id: &http::HeaderValue) -> Response<Full<Bytes>> {
    let body = common::wire::ErrorBody {
        error: message.to_owned(),
        code: code.to_owned(),
        details: None,
        request_id: String::from_utf8_lossy(request_id.as_bytes()).into_owned(),
    };
    let mut response = Response::new(Full::new(Bytes::from(serde_json::to_vec(&body).expect("serializable"))));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    response
}

fn json(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    response
}
