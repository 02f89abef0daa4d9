//! Traces (SPEC §11) against a real OTLP receiver: the api and worker binaries export their spans,
//! which the receiver decodes with the OpenTelemetry proto definitions.

use std::time::Duration;

use serde_json::{Value, json};
use testkit::otlp::{OtlpReceiver, ReceivedSpan};

use crate::helpers::Stack;

const EXPORTED: Duration = Duration::from_secs(30);
/// OTLP span kinds.
const SERVER: i32 = 2;
const CLIENT: i32 = 3;
const CONSUMER: i32 = 5;

fn port() -> String {
    testkit::closed_port().to_string()
}

/// The variables of a binary that exports to `receiver` (quickly: the batch delay is 5 s by default).
fn exporting_to(receiver: &OtlpReceiver) -> Vec<(&'static str, String)> {
    vec![("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint.clone()), ("OTEL_BSP_SCHEDULE_DELAY", "100".into())]
}

fn spawn(stack: &Stack, binary: &str, vars: &[(&'static str, String)]) -> testkit::Process {
    let mut all: Vec<(&str, &str)> = vec![("RUN_MIGRATIONS", "false"), ("LOG_FORMAT", "json"), ("LOG_LEVEL", "info")];
    all.extend(vars.iter().map(|(name, value)| (*name, value.as_str())));
    stack.spawn_binary(binary, &all)
}

async fn create_user(stack: &Stack, base: &str, headers: &[(&str, &str)]) -> String {
    let body =
        json!({"email": format!("traced.{}@example.com", testkit::unique()), "first_name": "T", "last_name": "R"});
    let mut request = stack.client.post(format!("{base}/api/v1/users")).json(&body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), 201);
    response.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned()
}

/// POSTs an event for `user` with a trace context; returns the event's id.
async fn post_traced_event(stack: &Stack, base: &str, user: &str, traceparent: &str, tracestate: &str) -> String {
    let response = stack
        .client
        .post(format!("{base}/api/v1/events"))
        .header("traceparent", traceparent)
        .header("tracestate", tracestate)
        .json(&json!({"user_id": user, "type": "traced", "data": {}}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    response.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned()
}

fn child_of<'a>(spans: &'a [ReceivedSpan], parent: &ReceivedSpan, name: &str) -> Option<&'a ReceivedSpan> {
    spans.iter().find(|span| span.name == name && span.parent_span_id == parent.span_id)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_posted_event_is_one_trace_from_the_request_through_kafka_to_the_worker() {
    let receiver = OtlpReceiver::http().await;
    let stack = Stack::start(&[]).await;
    let (api_port, worker_port) = (port(), port());
    let mut api_vars = exporting_to(&receiver);
    api_vars.push(("SERVER_PORT", api_port.clone()));
    let mut worker_vars = exporting_to(&receiver);
    worker_vars.push(("WORKER_HTTP_PORT", worker_port));
    let api = spawn(&stack, "api", &api_vars);
    let worker = spawn(&stack, "worker", &worker_vars);
    let base = format!("http://127.0.0.1:{api_port}");
    stack.wait_for_readiness(&base, 200).await;
    let user = create_user(&stack, &base, &[]).await;

    let (trace_id, caller_span) = (testkit::unique(), testkit::unique()[..16].to_owned());
    let traceparent = format!("00-{trace_id}-{caller_span}-01");
    let event_id = post_traced_event(&stack, &base, &user, &traceparent, "caller=7").await;

    // The api's request span continues the caller's trace, with its database and outbox work under it.
    let request = receiver
        .wait_for("the api's request span", EXPORTED, |spans| {
            spans.iter().find(|span| span.trace_id == trace_id && span.kind == SERVER).cloned()
        })
        .await;
    assert_eq!(request.service, "highload-api");
    assert_eq!(request.name, "POST /api/v1/events");
    assert_eq!(request.parent_span_id, caller_span, "the caller's span is the parent");
    assert_eq!(request.trace_state, "caller=7");
    assert_eq!(request.attributes["http.route"], "/api/v1/events");
    assert_eq!(request.attributes["http.response.status_code"], "201");
    assert_eq!(request.attributes["client_id"], testkit::auth::CLIENT_ID);
    let postgres = receiver
        .wait_for("the request's PostgreSQL span", EXPORTED, |spans| child_of(spans, &request, "postgres").cloned())
        .await;
    assert_eq!((postgres.trace_id.as_str(), postgres.kind), (trace_id.as_str(), CLIENT));
    let insert = receiver
        .wait_for("the outbox insert's span", EXPORTED, |spans| child_of(spans, &postgres, "outbox insert").cloned())
        .await;
    assert!(!insert.attributes.contains_key("db.operation.batch.size"), "a lone event is no batch: {insert:?}");

    // The worker's span for the event is a child of the request's span: the context went through
    // the outbox row and the Kafka headers.
    let applied = receiver
        .wait_for("the worker's span of the event", EXPORTED, |spans| {
            spans.iter().find(|span| span.kind == CONSUMER && span.trace_id == trace_id).cloned()
        })
        .await;
    assert_eq!(applied.parent_span_id, request.span_id, "{applied:?}");
    assert_eq!(applied.kind, CONSUMER);
    assert_eq!(applied.attributes["event.id"], event_id);
    assert_eq!(applied.trace_state, "caller=7");
    // The statement that applied it sits under an event's span: its own, or that of the first event
    // of its lane's batch (the user's `user_created` may have arrived in the same fetch).
    receiver
        .wait_for("the worker's PostgreSQL span under an event's", EXPORTED, |spans| {
            spans
                .iter()
                .filter(|span| span.service == "highload-worker" && span.kind == CONSUMER)
                .find_map(|event| child_of(spans, event, "postgres"))
                .cloned()
        })
        .await;

    // A caller's oversized tracestate is not stored with the message (W3C lets a platform drop one
    // beyond 512 characters): the trace goes on without it.
    let (long_trace, long_caller) = (testkit::unique(), testkit::unique()[..16].to_owned());
    let long_state: Vec<String> = (0..20).map(|n| format!("k{n}={}", "v".repeat(200))).collect();
    let long_parent = format!("00-{long_trace}-{long_caller}-01");
    post_traced_event(&stack, &base, &user, &long_parent, &long_state.join(",")).await;
    let long_applied = receiver
        .wait_for("the worker's span of the event with a long tracestate", EXPORTED, |spans| {
            spans.iter().find(|span| span.kind == CONSUMER && span.trace_id == long_trace).cloned()
        })
        .await;
    assert_eq!(long_applied.trace_state, "", "{long_applied:?}");

    // Log lines inside a span carry its ids.
    let api_line = api.line_containing(&format!("\"trace_id\":\"{trace_id}\""), EXPORTED).await;
    assert!(api_line.contains(&format!("\"span_id\":\"{}\"", request.span_id)), "{api_line}");
    let worker_line = worker.line_containing(&format!("\"trace_id\":\"{trace_id}\""), EXPORTED).await;
    assert!(worker_line.contains(&format!("\"span_id\":\"{}\"", applied.span_id)), "{worker_line}");

    // A malformed traceparent starts a new trace instead of failing or being trusted.
    let (garbage, request_id) = (format!("00-{trace_id}-not-a-span-id-01"), format!("malformed-{}", testkit::unique()));
    create_user(&stack, &base, &[("traceparent", &garbage), ("x-request-id", &request_id)]).await;
    let fresh = receiver
        .wait_for("the span of the request with a malformed traceparent", EXPORTED, |spans| {
            spans
                .iter()
                .find(|span| span.kind == SERVER && span.attributes.get("request_id") == Some(&request_id))
                .cloned()
        })
        .await;
    assert_eq!(fresh.parent_span_id, "", "a new trace's request span is its root");
    assert_ne!(fresh.trace_id, trace_id);
    assert!(fresh.trace_id.len() == 32 && fresh.trace_id != "0".repeat(32), "{fresh:?}");
    // Probes are not traced.
    assert!(
        receiver
            .spans()
            .iter()
            .all(|span| !span.attributes.get("http.route").is_some_and(|route| route.starts_with("/health")))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn over_grpc_the_api_exports_its_spans_and_probes_are_never_traced() {
    let receiver = OtlpReceiver::grpc().await;
    let stack = Stack::start(&[]).await;
    let api_port = port();
    let mut vars = exporting_to(&receiver);
    vars.extend([("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc".into()), ("SERVER_PORT", api_port.clone())]);
    vars.push(("OTEL_SERVICE_NAME", "edge-api".into()));
    let _api = spawn(&stack, "api", &vars);
    let base = format!("http://127.0.0.1:{api_port}");
    stack.wait_for_readiness(&base, 200).await;
    for probe in ["/health/live", "/health/ready", "/health", "/metrics"] {
        assert_eq!(stack.client.get(format!("{base}{probe}")).send().await.unwrap().status(), 200);
    }
    let user = create_user(&stack, &base, &[]).await;
    let (trace_id, caller_span) = (testkit::unique(), testkit::unique()[..16].to_owned());
    let response = stack
        .client
        .get(format!("{base}/api/v1/users/{user}"))
        .header("traceparent", format!("00-{trace_id}-{caller_span}-01"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let request = receiver
        .wait_for("the GET's span over gRPC", EXPORTED, |spans| {
            spans.iter().find(|span| span.trace_id == trace_id && span.kind == SERVER).cloned()
        })
        .await;
    assert_eq!((request.service.as_str(), request.name.as_str()), ("edge-api", "GET /api/v1/users/{id}"));
    assert_eq!(request.parent_span_id, caller_span);
    let cache_read =
        receiver.wait_for("the GET's Redis span", EXPORTED, |spans| child_of(spans, &request, "redis").cloned()).await;
    assert_eq!((cache_read.kind, cache_read.attributes["db.operation.name"].as_str()), (CLIENT, "GET"));
    // The POST's span was exported before the GET's: had a probe been traced, it would be there too.
    let routes: Vec<String> =
        receiver.spans().iter().filter_map(|span| span.attributes.get("http.route").cloned()).collect();
    assert!(routes.iter().all(|route| route.starts_with("/api/")), "{routes:?}");
    assert!(routes.iter().any(|route| route == "/api/v1/users"), "{routes:?}");
}

/// With no endpoint (the exporters' default one is listened on here, in case anything went there) or
/// with `OTEL_SDK_DISABLED`, nothing is exported, even at shutdown, when queued spans would be flushed.
#[tokio::test(flavor = "multi_thread")]
async fn with_no_endpoint_or_the_sdk_disabled_nothing_is_exported() {
    let default_endpoint = OtlpReceiver::http_at("127.0.0.1:4318".parse().unwrap()).await;
    let receiver = OtlpReceiver::http().await;
    let stack = Stack::start(&[]).await;
    let (quiet_port, disabled_port) = (port(), port());
    let fast = ("OTEL_BSP_SCHEDULE_DELAY", "100".to_owned());
    let mut quiet = spawn(&stack, "api", &[("SERVER_PORT", quiet_port.clone()), fast.clone()]);
    let mut disabled_vars = exporting_to(&receiver);
    disabled_vars.extend([("SERVER_PORT", disabled_port.clone()), ("OTEL_SDK_DISABLED", "true".into())]);
    let mut disabled = spawn(&stack, "api", &disabled_vars);
    for api_port in [&quiet_port, &disabled_port] {
        let base = format!("http://127.0.0.1:{api_port}");
        stack.wait_for_readiness(&base, 200).await;
        let traceparent = format!("00-{}-{}-01", testkit::unique(), &testkit::unique()[..16]);
        create_user(&stack, &base, &[("traceparent", &traceparent)]).await;
    }
    for api in [&mut quiet, &mut disabled] {
        api.signal("TERM");
        assert!(api.exit_within(Duration::from_secs(30)).await.success());
        assert!(!api.output().iter().any(|line| line.contains("trace_id")), "no trace ids in logs without traces");
    }
    assert_eq!((default_endpoint.exports(), receiver.exports()), (0, 0));
}
