//! Metrics, overload protection and what logs may not contain (SPEC §6).

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::helpers::{authorization_line, error_code, spawn_app, spawn_app_with, unique_email};

#[tokio::test(flavor = "multi_thread")]
async fn metrics_are_prometheus_text_labelled_by_route_template() {
    let app = spawn_app().await;
    let user = app.create_user(&unique_email("metrics")).await;
    let path = format!("/api/v1/users/{}", user["id"].as_str().unwrap());
    app.get(&path).await;
    app.get(&path).await;
    app.get("/api/v1/users/not-a-uuid").await;
    let response = app.client.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("text/plain; version=0.0.4"));
    let text = response.text().await.unwrap();
    for needle in [
        r#"http_requests_total{method="GET",route="/api/v1/users/{id}",status="2xx"} 2"#,
        r#"http_requests_total{method="GET",route="/api/v1/users/{id}",status="4xx"} 1"#,
        r#"http_requests_total{method="POST",route="/api/v1/users",status="2xx"} 1"#,
        r#"http_request_duration_seconds_bucket{method="GET",route="/api/v1/users/{id}",le="0.005"}"#,
        "http_requests_in_flight",
        r#"cache_operations_total{operation="get",result="hit"}"#,
        r#"db_pool_connections{state="idle"}"#,
        // The pool's 8 (DB_POOL_MAX_SIZE) and the event writer's 2 sessions.
        "db_pool_max_connections 10",
        "db_pool_waits_total",
        "outbox_backlog",
        "outbox_published_total",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
    ] {
        assert!(text.contains(needle), "missing {needle} in\n{text}");
    }
    assert!(!text.contains(user["id"].as_str().unwrap()), "raw paths must not become labels");
}

/// Series of the request metrics in a scrape.
async fn request_series(app: &crate::helpers::TestApp) -> Vec<String> {
    let text = app.client.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    text.lines()
        .filter(|line| {
            line.starts_with("http_requests_total{") || line.starts_with("http_request_duration_seconds_bucket{")
        })
        .map(|line| line.rsplit_once(' ').unwrap().0.to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn made_up_http_methods_are_one_label_value_and_add_no_series() {
    let app = spawn_app().await;
    let send = |method: String, path: &'static str| {
        let request = app.client.request(reqwest::Method::from_bytes(method.as_bytes()).unwrap(), app.url(path));
        async move { request.send().await.unwrap().status().as_u16() }
    };
    // One made-up method on an unknown path and on a known one: the `other` series exist from here on.
    assert_eq!(send("MADEUP".into(), "/nope").await, 404);
    assert_eq!(send("MADEUP".into(), "/api/v1/users").await, 405);
    let before = request_series(&app).await;
    for i in 0..1000 {
        let path = if i % 2 == 0 { "/nope" } else { "/api/v1/users" };
        let status = send(format!("M{i}X"), path).await;
        assert!(status == 404 || status == 405, "method M{i}X on {path}: {status}");
    }
    let after = request_series(&app).await;
    assert_eq!(after.len(), before.len(), "1,000 made-up methods added series: {after:#?}");
    assert!(after.iter().any(|series| series.contains(r#"method="other""#)), "{after:#?}");
    assert!(!after.iter().any(|series| series.contains("M1X")), "a made-up method became a label");
}

#[tokio::test(flavor = "multi_thread")]
async fn beyond_max_inflight_requests_the_answer_is_503_with_retry_after() {
    let app = spawn_app_with(&[("MAX_INFLIGHT_REQUESTS", "1"), ("REQUEST_TIMEOUT", "5")]).await;
    // Occupy the only slot with a request whose body never completes.
    let mut stream = TcpStream::connect(app.address).await.unwrap();
    let head = format!(
        "POST /api/v1/users HTTP/1.1\r\nHost: x\r\n{}Content-Type: application/json\r\nContent-Length: 50\r\n\r\n{{",
        authorization_line()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    app.wait_for_in_flight(1).await;

    let response = app.client.get(app.url("/api/v1/users")).send().await.unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "1");
    assert_eq!(error_code(&response.json().await.unwrap()), "overloaded");
    // Probes are never refused.
    assert_eq!(app.get("/health/live").await.0, 200);
    assert_eq!(app.get("/health/ready").await.0, 200);
    let metrics = app.client.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("http_requests_rejected_total 1"), "{metrics}");

    drop(stream);
    app.wait_for_in_flight(0).await;
    assert_eq!(app.get("/api/v1/users").await.0, 200, "the slot is free again");
}

/// The outbox gauges come from the background check: with Kafka unreachable a created user's
/// message waits, and `/metrics` shows the backlog and its oldest row's age growing (by the
/// database's clock), without a query per scrape.
#[tokio::test(flavor = "multi_thread")]
async fn the_outbox_backlog_and_its_oldest_rows_age_are_sampled() {
    let unreachable = format!("127.0.0.1:{}", testkit::closed_port());
    let app = spawn_app_with(&[("KAFKA_BROKERS", &unreachable)]).await;
    app.create_user(&unique_email("backlog")).await;
    let gauge = |text: &str, name: &str| -> Option<i64> {
        text.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    };
    let age =
        testkit::eventually("the oldest row to be 2 s old in /metrics", std::time::Duration::from_secs(15), || async {
            let text = app.client.get(app.url("/metrics")).send().await.ok()?.text().await.ok()?;
            let (backlog, age) = (gauge(&text, "outbox_backlog")?, gauge(&text, "outbox_oldest_age_seconds")?);
            (backlog >= 1 && age >= 2).then_some(age)
        })
        .await;
    assert!(age < 15, "{age} s: older than the test");
}
