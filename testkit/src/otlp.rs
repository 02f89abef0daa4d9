//! An OTLP trace receiver: takes exports over http/protobuf (`POST /v1/traces`) or gRPC, decodes
//! them with the OpenTelemetry proto definitions, and keeps every span it was sent.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use prost::Message;

/// One span as received.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    /// The resource's `service.name`.
    pub service: String,
    /// The span's name.
    pub name: String,
    /// Hex, as in `traceparent`.
    pub trace_id: String,
    /// Hex.
    pub span_id: String,
    /// Hex; empty for a trace's root.
    pub parent_span_id: String,
    /// The W3C `tracestate` the span carried.
    pub trace_state: String,
    /// OTLP `SpanKind` (2 server, 3 client, 5 consumer).
    pub kind: i32,
    /// OTLP status code (2: error).
    pub status_code: i32,
    /// Attributes with string, integer or boolean values, as text.
    pub attributes: HashMap<String, String>,
}

#[derive(Default)]
struct Received {
    spans: Mutex<Vec<ReceivedSpan>>,
    exports: AtomicUsize,
}

impl Received {
    fn take(&self, request: ExportTraceServiceRequest) {
        let mut spans = self.spans.lock().unwrap();
        for resource_spans in request.resource_spans {
            let resource = resource_spans.resource.map(|resource| attributes(&resource.attributes)).unwrap_or_default();
            let service = resource.get("service.name").cloned().unwrap_or_default();
            for span in resource_spans.scope_spans.into_iter().flat_map(|scope| scope.spans) {
                spans.push(ReceivedSpan {
                    service: service.clone(),
                    name: span.name,
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    trace_state: span.trace_state,
                    kind: span.kind,
                    status_code: span.status.map_or(0, |status| status.code),
                    attributes: attributes(&span.attributes),
                });
            }
        }
    }
}

fn attributes(pairs: &[opentelemetry_proto::tonic::common::v1::KeyValue]) -> HashMap<String, String> {
    let text = |value: &Value| match value {
        Value::StringValue(text) => Some(text.clone()),
        Value::IntValue(number) => Some(number.to_string()),
        Value::BoolValue(flag) => Some(flag.to_string()),
        Value::DoubleValue(number) => Some(number.to_string()),
        _ => None,
    };
    pairs.iter().filter_map(|pair| Some((pair.key.clone(), text(pair.value.as_ref()?.value.as_ref()?)?))).collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// A running receiver; stops with the test's runtime.
pub struct OtlpReceiver {
    /// What `OTEL_EXPORTER_OTLP_ENDPOINT` should say (the base URL: http/protobuf appends `/v1/traces`).
    pub endpoint: String,
    received: Arc<Received>,
}

impl OtlpReceiver {
    /// An http/protobuf receiver on a free port.
    pub async fn http() -> Self {
        Self::http_at("127.0.0.1:0".parse().unwrap()).await
    }

    /// An http/protobuf receiver on `address` (e.g. the exporters' default `127.0.0.1:4318`).
    pub async fn http_at(address: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind(address).await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let received = Arc::new(Received::default());
        let shared = Arc::clone(&received);
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let received = Arc::clone(&shared);
                let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                    let received = Arc::clone(&received);
                    async move { Ok::<_, hyper::Error>(answer(&received, request).await) }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        Self { endpoint, received }
    }

    /// A gRPC receiver on a free port.
    pub async fn grpc() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let received = Arc::new(Received::default());
        let service = TraceServiceServer::new(Grpc(Arc::clone(&received)));
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let service = hyper_util::service::TowerToHyperService::new(service.clone());
                tokio::spawn(async move {
                    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let _ = builder.serve_connection(TokioIo::new(stream), service).await;
                });
            }
        });
        Self { endpoint, received }
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.received.spans.lock().unwrap().clone()
    }

    /// Export requests received so far.
    pub fn exports(&self) -> usize {
        self.received.exports.load(Ordering::SeqCst)
    }

    /// Waits until `found` finds what it looks for among the spans received, up to `timeout`; else
    /// panics listing what was received.
    pub async fn wait_for<T>(&self, what: &str, timeout: Duration, found: impl Fn(&[ReceivedSpan]) -> Option<T>) -> T {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(found) = found(&self.spans()) {
                return found;
            }
            if tokio::time::Instant::now() >= deadline {
                let spans: Vec<String> = self.spans().iter().map(|span| format!("{span:?}")).collect();
                panic!("timed out after {timeout:?} waiting for {what}; received:\n{}", spans.join("\n"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn answer(received: &Received, request: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let respond = |status: u16, body: Vec<u8>| {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
        response.headers_mut().insert("content-type", "application/x-protobuf".parse().unwrap());
        response
    };
    // Counted before anything is checked: a test that expects nothing counts anything sent anywhere.
    received.exports.fetch_add(1, Ordering::SeqCst);
    if request.method() != hyper::Method::POST || request.uri().path() != "/v1/traces" {
        return respond(404, Vec::new());
    }
    let Ok(body) = request.into_body().collect().await else { return respond(400, Vec::new()) };
    match ExportTraceServiceRequest::decode(body.to_bytes()) {
        Ok(export) => {
            received.take(export);
            respond(200, ExportTraceServiceResponse::default().encode_to_vec())
        }
        Err(_) => respond(400, Vec::new()),
    }
}

struct Grpc(Arc<Received>);

#[tonic::async_trait]
impl TraceService for Grpc {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.exports.fetch_add(1, Ordering::SeqCst);
        self.0.take(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}
