//! Graceful shutdown: in-flight requests finish, new connections are refused, readiness turns 503.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::{authorization_line, spawn_app, unique_email};

#[tokio::test(flavor = "multi_thread")]
async fn in_flight_requests_finish_after_shutdown_starts() {
    let mut app = spawn_app().await;
    let body = format!(r#"{{"email":"{}","first_name":"Drain","last_name":"Me"}}"#, unique_email("drain"));
    let mut stream = TcpStream::connect(app.address).await.unwrap();
    let head = format!(
        "POST /api/v1/users HTTP/1.1\r\nHost: x\r\n{}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        authorization_line(),
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&body.as_bytes()[..10]).await.unwrap();
    app.wait_for_in_flight(1).await;

    let address = app.address;
    let stopped = app.begin_stop();
    testkit::eventually("the listener closed after shutdown began", Duration::from_secs(5), || async {
        TcpStream::connect(address).await.is_err().then_some(())
    })
    .await;

    stream.write_all(&body.as_bytes()[10..]).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response)).await.unwrap().unwrap();
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 201"), "{response}");

    tokio::time::timeout(Duration::from_secs(10), stopped).await.unwrap().unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_server_stops_promptly() {
    let app = spawn_app().await;
    assert_eq!(app.get("/health/live").await.0, 200);
    tokio::time::timeout(Duration::from_secs(5), app.stop()).await.unwrap().unwrap();
}
