//! HTTP-level behaviour shared by all routes: errors, limits, timeouts, request ids.

use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::{authorization_line, error_code, spawn_app, spawn_app_with, unique_email};

#[tokio::test(flavor = "multi_thread")]
async fn unknown_route_is_json_404_and_wrong_method_is_405_with_allow() {
    let app = spawn_app().await;
    let (status, body) = app.get("/api/v2/nothing").await;
    assert_eq!((status, error_code(&body)), (404, "route_not_found"));

    let response = app.client.patch(app.url("/api/v1/users")).send().await.unwrap();
    assert_eq!(response.status(), 405);
    assert_eq!(response.headers()["allow"], "GET, POST");
    assert_eq!(error_code(&response.json().await.unwrap()), "method_not_allowed");

    let response =
        app.client.post(app.url("/api/v1/users/0192c5a5-0000-7000-8000-000000000000/")).send().await.unwrap();
    assert_eq!(response.status(), 405);
    assert_eq!(response.headers()["allow"], "GET, PUT, DELETE");
}

#[tokio::test(flavor = "multi_thread")]
async fn trailing_slash_works_on_every_route() {
    let app = spawn_app().await;
    let user = app.create_user(&unique_email("slash")).await;
    let id = user["id"].as_str().unwrap();
    for path in ["/api/v1/users/".to_owned(), format!("/api/v1/users/{id}/"), "/health/live/".into()] {
        assert_eq!(app.get(&path).await.0, 200, "{path}");
    }
    let response = app
        .client
        .post(app.url("/api/v1/users/"))
        .json(&serde_json::json!({"email": unique_email("slash2"), "first_name": "A", "last_name": "B"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
}

#[tokio::test(flavor = "multi_thread")]
async fn non_json_bodies_are_415_and_malformed_json_is_400() {
    let app = spawn_app().await;
    let body = r#"{"email":"a@b.cd","first_name":"A","last_name":"B"}"#;
    for content_type in [None, Some("text/plain"), Some("application/x-www-form-urlencoded")] {
        let mut request = app.client.post(app.url("/api/v1/users")).body(body);
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 415, "{content_type:?}");
        assert_eq!(error_code(&response.json().await.unwrap()), "unsupported_media_type");
    }
    let with_charset = app
        .client
        .post(app.url("/api/v1/users"))
        .header("content-type", "application/json; charset=utf-8")
        .body(body.replace("a@b.cd", &unique_email("charset")))
        .send()
        .await
        .unwrap();
    assert_eq!(with_charset.status(), 201);

    for malformed in ["{", "", "[]", "{\"email\":}", "null"] {
        let response = app
            .client
            .post(app.url("/api/v1/users"))
            .header("content-type", "application/json")
            .body(malformed)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{malformed:?}");
        let code = error_code(&response.json::<Value>().await.unwrap()).to_owned();
        assert!(code == "invalid_json" || code == "invalid_body", "{malformed:?}: {code}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bodies_over_one_mebibyte_are_413_declared_or_streamed() {
    let app = spawn_app().await;
    let big = format!(r#"{{"email":"a@b.cd","first_name":"{}","last_name":"B"}}"#, "x".repeat(1024 * 1024));
    let response = app
        .client
        .post(app.url("/api/v1/users"))
        .header("content-type", "application/json")
        .body(big.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    assert_eq!(error_code(&response.json().await.unwrap()), "payload_too_large");

    // Chunked, so no Content-Length to reject up front: the cap applies while reading. This client
    // writes its whole body before it reads anything, as simple clients do; it must still read the
    // 413, not a connection reset because the server closed with 1 MiB of it unread.
    let mut stream = TcpStream::connect(app.address).await.unwrap();
    let head = format!(
        "POST /api/v1/users HTTP/1.1\r\nHost: x\r\n{}Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        authorization_line()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    for chunk in format!("{big}{big}").as_bytes().chunks(64 * 1024) {
        stream.write_all(format!("{:x}\r\n", chunk.len()).as_bytes()).await.unwrap();
        stream.write_all(chunk).await.unwrap();
        stream.write_all(b"\r\n").await.unwrap();
    }
    stream.write_all(b"0\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await.unwrap().unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("payload_too_large"), "{answer}");

    // The same through an HTTP client that streams the body and reads the answer as soon as it comes.
    let chunks: Vec<Result<String, std::io::Error>> =
        big.as_bytes().chunks(64 * 1024).map(|c| Ok(String::from_utf8_lossy(c).into_owned())).collect();
    let response = app
        .client
        .post(app.url("/api/v1/users"))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
}

#[tokio::test(flavor = "multi_thread")]
async fn request_id_is_echoed_or_generated() {
    let app = spawn_app().await;
    let response = app.client.get(app.url("/health/live")).header("x-request-id", "trace-me-42").send().await.unwrap();
    assert_eq!(response.headers()["x-request-id"], "trace-me-42");

    let response = app.client.get(app.url("/nope")).header("x-request-id", "err-7").send().await.unwrap();
    assert_eq!(response.headers()["x-request-id"], "err-7");
    assert_eq!(response.json::<Value>().await.unwrap()["request_id"], "err-7");

    let response = app.client.get(app.url("/health/live")).send().await.unwrap();
    let generated = response.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert!(uuid::Uuid::try_parse(&generated).is_ok(), "{generated}");
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_headers_are_cut_off() {
    let app = spawn_app_with(&[("HTTP_HEADER_READ_TIMEOUT", "1")]).await;
    let mut stream = TcpStream::connect(app.address).await.unwrap();
    stream.write_all(b"GET /health/live HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let started = Instant::now();
    let mut buffer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut buffer)).await;
    assert!(read.is_ok(), "connection still open after 10 s of incomplete headers");
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_that_outlives_the_timeout_gets_503() {
    let app = spawn_app_with(&[("REQUEST_TIMEOUT", "1")]).await;
    let mut stream = TcpStream::connect(app.address).await.unwrap();
    let head = format!(
        "POST /api/v1/users HTTP/1.1\r\nHost: x\r\n{}Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{",
        authorization_line()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    // The body never completes.
    let started = Instant::now();
    let mut buffer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        let mut chunk = [0u8; 4096];
        while !String::from_utf8_lossy(&buffer).contains("request_timeout") {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    let text = String::from_utf8_lossy(&buffer);
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    assert!(text.to_ascii_lowercase().contains("retry-after: 1"), "{text}");
    assert!(text.contains("request_timeout"), "{text}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread")]
async fn liveness_and_readiness() {
    let app = spawn_app().await;
    assert_eq!(app.get("/health/live").await, (200, serde_json::json!({"status": "ok"})));
    assert_eq!(app.get("/health/ready").await.0, 200);
    let (status, health) = app.get("/health").await;
    assert_eq!((status, health["status"].as_str()), (200, Some("healthy")), "{health}");
    assert_eq!(health["checks"]["postgres"]["status"], "up");
    assert!(health["checks"]["postgres"]["latency_ms"].is_number());
    assert!(health["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')));
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_down_is_unready_but_alive() {
    let port = testkit::closed_port().to_string();
    let app = spawn_app_with(&[("DB_PORT", &port), ("RUN_MIGRATIONS", "false"), ("DB_POOL_TIMEOUT_MS", "300")]).await;
    assert_eq!(app.get("/health/live").await.0, 200);
    assert_eq!(app.get("/health/ready").await.0, 503);
    let (status, health) = app.get("/health").await;
    assert_eq!((status, health["status"].as_str()), (503, Some("unhealthy")));
    let response = app.client.get(app.url("/api/v1/users")).send().await.unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "1");
    let body: Value = response.json().await.unwrap();
    assert_eq!(error_code(&body), "service_unavailable");
    assert!(!body.to_string().contains(&port), "a 5xx must not leak internals: {body}");
}
