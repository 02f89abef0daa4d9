//! The real binaries as processes: graceful shutdown under load, the second signal, and what their
//! JSON logs carry (one request id across api and worker) and never carry (emails, secrets).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::AsyncWriteExt;

use crate::helpers::Stack;

fn free_port() -> String {
    testkit::closed_port().to_string()
}

async fn wait_ready(client: &reqwest::Client, url: &str) {
    testkit::eventually(&format!("{url} to be ready"), Duration::from_secs(30), || async {
        client.get(url).send().await.ok().filter(|r| r.status() == 200).map(drop)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_under_load_fails_no_accepted_request_and_exits_zero_in_time() {
    let stack = Stack::start(&[]).await;
    let user = stack.create_user().await;
    let port = free_port();
    let mut api =
        stack.spawn_binary("api", &[("SERVER_PORT", &port), ("SHUTDOWN_TIMEOUT", "10"), ("RUN_MIGRATIONS", "false")]);
    let base = format!("http://127.0.0.1:{port}");
    wait_ready(&stack.client, &format!("{base}/health/ready")).await;

    let stop = Arc::new(AtomicBool::new(false));
    let (succeeded, server_errors) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut load = Vec::new();
    for _ in 0..8 {
        let (stop, succeeded, server_errors) = (stop.clone(), succeeded.clone(), server_errors.clone());
        let (url, user) = (format!("{base}/api/v1/events"), user.clone());
        load.push(tokio::spawn(async move {
            // A new connection per request: a refused connection was never accepted.
            let client = reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .default_headers(testkit::auth::all_scopes_headers())
                .build()
                .unwrap();
            let mut acknowledged = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let body = serde_json::json!({"user_id": user, "type": "load", "data": 1});
                match client.post(&url).json(&body).send().await {
                    Ok(response) if response.status() == 201 => {
                        succeeded.fetch_add(1, Ordering::Relaxed);
                        acknowledged.push(response.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned());
                    }
                    Ok(response) => {
                        server_errors.fetch_add(1, Ordering::Relaxed);
                        panic!("an accepted request failed: {}", response.status());
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                }
            }
            acknowledged
        }));
    }
    // Under way: requests are being accepted when the signal comes.
    testkit::eventually("the load under way", Duration::from_secs(10), || async {
        (succeeded.load(Ordering::Relaxed) >= 20).then_some(())
    })
    .await;
    let before = succeeded.load(Ordering::Relaxed);
    let signalled = Instant::now();
    api.signal("TERM");
    let status = api.exit_within(Duration::from_secs(15)).await;
    stop.store(true, Ordering::Relaxed);
    assert!(status.success(), "exit status {status}");
    assert!(signalled.elapsed() < Duration::from_secs(10), "took {:?}", signalled.elapsed());
    let mut acknowledged = Vec::new();
    for task in load {
        acknowledged.extend(task.await.unwrap());
    }
    assert!(before > 0, "the load never got going");
    assert_eq!(server_errors.load(Ordering::Relaxed), 0);

    // Every acknowledged write is durable and reaches the worker.
    let worker = stack.start_worker().await;
    stack.wait_until_drained(Duration::from_secs(60)).await;
    assert_eq!(stack.stats(&user).await["events_by_type"]["load"], acknowledged.len());
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_signal_exits_at_once() {
    let stack = Stack::start(&[]).await;
    let port = free_port();
    let mut api =
        stack.spawn_binary("api", &[("SERVER_PORT", &port), ("SHUTDOWN_TIMEOUT", "30"), ("RUN_MIGRATIONS", "false")]);
    wait_ready(&stack.client, &format!("http://127.0.0.1:{port}/health/ready")).await;
    // A request that never completes keeps the drain waiting.
    let mut stream = tokio::net::TcpStream::connect(format!("127.0.0.1:{port}")).await.unwrap();
    let head = format!(
        "POST /api/v1/users HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\n\
         Content-Length: 50\r\n\r\n{{",
        testkit::auth::token(testkit::auth::ALL_SCOPES)
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let metrics = format!("http://127.0.0.1:{port}/metrics");
    testkit::eventually("the request in flight", Duration::from_secs(5), || async {
        let text = stack.client.get(&metrics).send().await.ok()?.text().await.ok()?;
        text.contains("http_requests_in_flight 1\n").then_some(())
    })
    .await;
    api.signal("TERM");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(api.child.try_wait().unwrap().is_none(), "still draining after the first signal");
    let started = Instant::now();
    api.signal("INT");
    let status = api.exit_within(Duration::from_secs(5)).await;
    assert_eq!(status.code(), Some(130));
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_worker_commits_so_a_restart_redelivers_nothing_processed() {
    let stack = Stack::start(&[]).await;
    let mut users = Vec::new();
    for _ in 0..10 {
        users.push(stack.create_user().await);
    }
    let http = free_port();
    let mut worker = stack.spawn_binary("worker", &[("WORKER_HTTP_PORT", &http), ("LOG_LEVEL", "warn")]);
    for round in 0..30 {
        for user in &users {
            stack.post_event(user, &format!("r{}", round % 3)).await;
        }
    }
    testkit::eventually("some events to be processed", Duration::from_secs(60), || async {
        (stack.pending_events().await < 300).then_some(())
    })
    .await;
    worker.signal("TERM");
    let status = worker.exit_within(Duration::from_secs(15)).await;
    assert!(status.success(), "exit status {status}");

    let restarted = stack.start_worker().await;
    stack.wait_until_drained(Duration::from_secs(60)).await;
    let metrics =
        stack.client.get(format!("http://{}/metrics", restarted.http)).send().await.unwrap().text().await.unwrap();
    assert!(
        !metrics.contains(r#"worker_events_finished_total{outcome="duplicate"}"#),
        "the restarted worker was redelivered events the stopped one had processed:\n{metrics}"
    );
    assert_eq!(stack.counted_total().await, 300);
    restarted.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn one_request_id_follows_an_event_through_both_binaries_and_no_log_line_has_personal_data() {
    let secret = "hunter2-not-for-logs";
    let stack = Stack::start(&[]).await;
    let (port, http) = (free_port(), free_port());
    let env = [
        ("SERVER_PORT", port.as_str()),
        ("WORKER_HTTP_PORT", http.as_str()),
        ("DB_PASSWORD", secret),
        ("LOG_FORMAT", "json"),
        ("LOG_LEVEL", "info"),
        ("RUN_MIGRATIONS", "false"),
    ];
    let mut api = stack.spawn_binary("api", &env);
    let mut worker = stack.spawn_binary("worker", &env);
    let base = format!("http://127.0.0.1:{port}");
    wait_ready(&stack.client, &format!("{base}/health/ready")).await;

    let email = format!("private.person.{}@example.com", testkit::unique());
    let create = serde_json::json!({"email": email, "first_name": "Private", "last_name": "Person"});
    let user: Value =
        stack.client.post(format!("{base}/api/v1/users")).json(&create).send().await.unwrap().json().await.unwrap();
    let user_id = user["id"].as_str().unwrap();
    let conflict = stack.client.post(format!("{base}/api/v1/users")).json(&create).send().await.unwrap();
    assert_eq!(conflict.status(), 409);
    let bad = serde_json::json!({"email": format!("not an email {email}")});
    let invalid = stack.client.put(format!("{base}/api/v1/users/{user_id}")).json(&bad).send().await.unwrap();
    assert_eq!(invalid.status(), 400);
    let token = testkit::auth::token(testkit::auth::ALL_SCOPES);
    let event = stack
        .client
        .post(format!("{base}/api/v1/events"))
        .bearer_auth(&token)
        .header("x-request-id", "trace-abc-123")
        .json(&serde_json::json!({"user_id": user_id, "type": "login", "data": {"email": email}}))
        .send()
        .await
        .unwrap();
    assert_eq!(event.status(), 201);
    stack.wait_until_drained(Duration::from_secs(60)).await;
    api.signal("TERM");
    worker.signal("TERM");
    api.exit_within(Duration::from_secs(15)).await;
    worker.exit_within(Duration::from_secs(15)).await;

    let lines: Vec<(&str, String)> = api
        .output()
        .into_iter()
        .map(|l| ("api", l))
        .chain(worker.output().into_iter().map(|l| ("worker", l)))
        .collect();
    assert!(lines.len() > 5);
    for (binary, line) in &lines {
        let parsed: Value = serde_json::from_str(line).unwrap_or_else(|_| panic!("{binary}: not a JSON line: {line}"));
        assert!(parsed["level"].is_string() && parsed["timestamp"].is_string(), "{line}");
        assert!(!line.contains(&email), "{binary} logged an email: {line}");
        assert!(!line.contains(secret), "{binary} logged a secret: {line}");
        assert!(!line.contains(token.rsplit('.').next().unwrap()), "{binary} logged the bearer token: {line}");
    }
    let traced: Vec<&(&str, String)> = lines.iter().filter(|(_, line)| line.contains("trace-abc-123")).collect();
    assert!(traced.iter().any(|(b, l)| *b == "api" && l.contains("request completed")), "api request line: {traced:?}");
    // The request line names the caller (the token's client_id), never the token.
    let client = format!(r#""client_id":"{}""#, testkit::auth::CLIENT_ID);
    assert!(traced.iter().any(|(b, l)| *b == "api" && l.contains(&client)), "client_id in {traced:?}");
    assert!(
        traced.iter().any(|(b, l)| *b == "worker" && l.contains("event finished")),
        "worker event line: {traced:?}"
    );
}

/// The worker's HTTP errors have the api's shape (`error`, `code`, `request_id`) and echo
/// `X-Request-Id`, so one client and one dashboard read both binaries alike.
#[tokio::test(flavor = "multi_thread")]
async fn the_workers_http_errors_have_the_apis_shape() {
    let stack = Stack::start(&[]).await;
    let worker = stack.start_worker().await;
    let base = format!("http://{}", worker.http);

    let response = stack.client.get(format!("{base}/nope")).header("x-request-id", "probe-7").send().await.unwrap();
    assert_eq!(response.status(), 404);
    assert_eq!(response.headers()["x-request-id"], "probe-7");
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        (body["code"].as_str(), body["request_id"].as_str()),
        (Some("route_not_found"), Some("probe-7")),
        "{body}"
    );
    assert!(body["error"].is_string(), "{body}");

    let response = stack.client.post(format!("{base}/metrics")).send().await.unwrap();
    assert_eq!(response.status(), 405);
    assert_eq!(response.headers()["allow"], "GET");
    let generated = response.headers()["x-request-id"].to_str().unwrap().to_owned();
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], "method_not_allowed");
    assert_eq!(body["request_id"], generated.as_str());
    worker.stop().await;
}
