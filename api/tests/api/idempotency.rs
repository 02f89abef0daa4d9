//! `Idempotency-Key` on writes (SPEC §10): replays, mismatches, bad keys, failures not stored, keys
//! per client, requests in flight, answers lost to a cut connection or to an api killed after its
//! commit, and expiry. Effects are counted where they land: rows in PostgreSQL and messages on the
//! app's own Kafka topic.

use std::time::{Duration, Instant};

use common::config::Config;
use diesel::QueryableByName;
use diesel::sql_types::BigInt;
use diesel_async::{AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use reqwest::{Method, Response};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::helpers::{
    TestApp, authorization_line, client_with_token, error_code, spawn_app, spawn_app_with, unique_email,
};

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    count: i64,
}

async fn count(database: &str, sql: &str) -> i64 {
    let mut conn = testkit::connect(database).await;
    diesel::sql_query(sql).get_result::<Count>(&mut conn).await.unwrap().count
}

async fn rows(app: &TestApp, table: &str) -> i64 {
    count(&app.config.database.name, &format!("SELECT count(*) AS count FROM {table}")).await
}

/// Sends `body` (raw text, sent as it is) with `method` to `path`, with `key` if any.
async fn send(
    client: &reqwest::Client,
    app: &TestApp,
    method: Method,
    path: &str,
    key: Option<&str>,
    body: &str,
) -> Response {
    let mut request = client.request(method, app.url(path));
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    if !body.is_empty() {
        request = request.header("content-type", "application/json").body(body.to_owned());
    }
    request.send().await.unwrap()
}

/// Status, `Location`, `Idempotent-Replayed`, and the body's bytes.
async fn parts(response: Response) -> (u16, Option<String>, Option<String>, Vec<u8>) {
    let header = |name: &str| response.headers().get(name).map(|value| value.to_str().unwrap().to_owned());
    let (status, location, replayed) = (response.status().as_u16(), header("location"), header("idempotent-replayed"));
    (status, location, replayed, response.bytes().await.unwrap().to_vec())
}

fn user_body(email: &str) -> String {
    json!({"email": email, "first_name": "Idem", "last_name": "Potent"}).to_string()
}

fn event_body(user_id: &str) -> String {
    json!({"user_id": user_id, "type": "purchase", "data": {"amount": 42}}).to_string()
}

/// Every message about `user_id` (its Kafka key) on `config`'s topic, as (event type, value), once
/// the outbox has been published. How the end is known: the outbox is empty only once Kafka has
/// acknowledged every row, and a marker then produced with the same key lands in the same partition
/// after all of them, so reading up to the marker reads everything the api published about the user
/// (a broker's watermarks can lag behind its acknowledgements).
async fn published_about(config: &Config, user_id: &str) -> Vec<(String, Value)> {
    let database = config.database.name.clone();
    testkit::eventually("the outbox to be published", Duration::from_secs(30), || async {
        (count(&database, "SELECT count(*) AS count FROM outbox").await == 0).then_some(())
    })
    .await;
    let kafka = config.kafka.clone();
    let marker = format!("marker-{}", testkit::unique());
    let producer: FutureProducer = common::kafka::producer_config(&kafka).create().unwrap();
    let headers = OwnedHeaders::new().insert(Header { key: "event-type", value: Some("test-marker") });
    let record = FutureRecord::to(&kafka.topic).key(user_id).payload(&marker).headers(headers);
    producer.send(record, Duration::from_secs(10)).await.map_err(|(err, _)| err).unwrap();
    let user_id = user_id.to_owned();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = common::kafka::client_config(&kafka)
            .set("group.id", format!("reader-{}", testkit::unique()))
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let metadata = consumer.fetch_metadata(Some(&kafka.topic), Duration::from_secs(10)).unwrap();
        let mut assignment = TopicPartitionList::new();
        for partition in metadata.topics()[0].partitions() {
            assignment.add_partition_offset(&kafka.topic, partition.id(), Offset::Beginning).unwrap();
        }
        consumer.assign(&assignment).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut messages = Vec::new();
        loop {
            assert!(Instant::now() < deadline, "the marker did not come back in time; read so far: {messages:?}");
            let Some(message) = consumer.poll(Duration::from_millis(200)) else { continue };
            let message = message.unwrap();
            if message.key() != Some(user_id.as_bytes()) {
                continue;
            }
            if message.payload() == Some(marker.as_bytes()) {
                return messages;
            }
            let event_type = message
                .headers()
                .and_then(|headers| headers.iter().find(|header| header.key == "event-type"))
                .and_then(|header| header.value)
                .map(|value| String::from_utf8_lossy(value).into_owned())
                .unwrap_or_default();
            let value = serde_json::from_slice(message.payload().unwrap_or_default()).unwrap_or(Value::Null);
            messages.push((event_type, value));
        }
    })
    .await
    .unwrap()
}

/// The messages of this type.
fn of_type<'a>(messages: &'a [(String, Value)], event_type: &str) -> Vec<&'a Value> {
    messages.iter().filter(|(kind, _)| kind == event_type).map(|(_, value)| value).collect()
}

/// A retry with the same key, method, path and the same JSON (other spacing and key order) gets the
/// first answer back, marked as replayed, with nothing written or published again: for each write.
#[tokio::test(flavor = "multi_thread")]
async fn a_retry_gets_the_first_answer_and_nothing_is_written_or_published_again() {
    let app = spawn_app().await;
    let client = &app.client;
    let email = unique_email("idem");
    let body = user_body(&email);
    let first = parts(send(client, &app, Method::POST, "/api/v1/users", Some("create-1"), &body).await).await;
    assert_eq!((first.0, first.2.as_deref()), (201, None), "{first:?}");
    let reordered = format!(r#" {{ "last_name": "Potent", "first_name": "Idem", "email": "{email}" }} "#);
    // The trailing slash is the same route, hence the same request.
    let retry = parts(send(client, &app, Method::POST, "/api/v1/users/", Some("create-1"), &reordered).await).await;
    assert_eq!(retry.2.as_deref(), Some("true"), "marked as a replay");
    assert_eq!((retry.0, &retry.1, &retry.3), (first.0, &first.1, &first.3), "the same status, Location and body");
    let user: Value = serde_json::from_slice(&first.3).unwrap();
    let id = user["id"].as_str().unwrap().to_owned();
    assert_eq!(rows(&app, "users").await, 1);

    let path = format!("/api/v1/users/{id}");
    let change = json!({"first_name": "Changed"}).to_string();
    let first = parts(send(client, &app, Method::PUT, &path, Some("update-1"), &change).await).await;
    assert_eq!(first.0, 200, "{first:?}");
    let retry = parts(send(client, &app, Method::PUT, &path, Some("update-1"), &change).await).await;
    assert_eq!((retry.0, retry.2.as_deref(), &retry.3), (200, Some("true"), &first.3));
    let version = count(&app.config.database.name, "SELECT version AS count FROM users").await;
    assert_eq!(version, 2, "one update, not two");

    let first =
        parts(send(client, &app, Method::POST, "/api/v1/events", Some("event-1"), &event_body(&id)).await).await;
    assert_eq!(first.0, 201, "{first:?}");
    let retry =
        parts(send(client, &app, Method::POST, "/api/v1/events", Some("event-1"), &event_body(&id)).await).await;
    assert_eq!((retry.0, retry.2.as_deref(), &retry.1, &retry.3), (201, Some("true"), &first.1, &first.3));
    let event: Value = serde_json::from_slice(&first.3).unwrap();
    assert_eq!(rows(&app, "events").await, 1);

    // Without the key, a second DELETE would be a 404: the replay is the first answer, a 204.
    let first = parts(send(client, &app, Method::DELETE, &path, Some("delete-1"), "").await).await;
    assert_eq!((first.0, first.2.as_deref()), (204, None));
    let retry = parts(send(client, &app, Method::DELETE, &path, Some("delete-1"), "").await).await;
    assert_eq!((retry.0, retry.2.as_deref(), retry.3.len()), (204, Some("true"), 0));
    assert_eq!(rows(&app, "users").await, 0);
    assert_eq!(rows(&app, "idempotency_keys").await, 4, "one stored answer per key");

    let metrics = app.client.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    for outcome in ["stored", "replayed"] {
        let line = format!("idempotent_requests_total{{outcome=\"{outcome}\"}} 4\n");
        assert!(metrics.contains(&line), "{line} in {metrics}");
    }

    let messages = published_about(&app.config, &id).await;
    for event_type in ["user_created", "user_updated", "user_deleted"] {
        assert_eq!(of_type(&messages, event_type).len(), 1, "{event_type}: {messages:?}");
    }
    let purchases = of_type(&messages, "purchase");
    assert_eq!(purchases.len(), 1, "{messages:?}");
    assert_eq!(purchases[0]["id"], event["id"]);
}

/// A key already used for another method, path or body is 422 `idempotency_key_mismatch`, even
/// when the other body would fail validation; nothing is written.
#[tokio::test(flavor = "multi_thread")]
async fn a_key_reused_for_another_request_is_a_mismatch() {
    let app = spawn_app().await;
    let client = &app.client;
    let first = send(client, &app, Method::POST, "/api/v1/users", Some("k"), &user_body(&unique_email("m"))).await;
    assert_eq!(first.status(), 201);
    let id = first.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
    let other_user = user_body(&unique_email("m2"));
    for (method, path, body) in [
        (Method::POST, "/api/v1/users".to_owned(), other_user.as_str()),
        (Method::POST, "/api/v1/users".to_owned(), r#"{"email": "not an address"}"#),
        (Method::POST, "/api/v1/events".to_owned(), &*event_body(&id)),
        (Method::PUT, format!("/api/v1/users/{id}"), r#"{"first_name": "X"}"#),
        (Method::DELETE, format!("/api/v1/users/{id}"), ""),
    ] {
        let response = send(client, &app, method.clone(), &path, Some("k"), body).await;
        assert_eq!(response.status(), 422, "{method} {path} {body}");
        assert_eq!(error_code(&response.json().await.unwrap()), "idempotency_key_mismatch", "{method} {path}");
    }
    assert_eq!((rows(&app, "users").await, rows(&app, "events").await), (1, 0));
    let user = app.get(&format!("/api/v1/users/{id}")).await;
    assert_eq!((user.0, &user.1["first_name"]), (200, &json!("Idem")), "neither updated nor deleted");
}

/// A key that is empty, longer than 255 characters or not printable ASCII is 400 and runs nothing.
#[tokio::test(flavor = "multi_thread")]
async fn bad_keys_are_refused() {
    let app = spawn_app().await;
    let too_long = "k".repeat(256);
    let longest = "k".repeat(255);
    for key in [&b""[..], too_long.as_bytes(), b"caf\xc3\xa9", b"tab\there"] {
        let response = app
            .client
            .post(app.url("/api/v1/users"))
            .header("idempotency-key", reqwest::header::HeaderValue::from_bytes(key).unwrap())
            .json(&json!({"email": unique_email("bad"), "first_name": "A", "last_name": "B"}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{key:?}");
        assert_eq!(error_code(&response.json().await.unwrap()), "invalid_idempotency_key");
    }
    assert_eq!(rows(&app, "users").await, 0);
    let body = user_body(&unique_email("longest"));
    let response = send(&app.client, &app, Method::POST, "/api/v1/users", Some(&longest), &body).await;
    assert_eq!(response.status(), 201, "255 characters, spaces allowed");
    let response = send(&app.client, &app, Method::POST, "/api/v1/users", Some(" a key ~ with spaces "), &body).await;
    assert_eq!(response.status(), 409, "a fresh key runs: the email is taken");
}

/// Failures are not stored: after a 400 and after a 409, a corrected retry with the same key runs.
#[tokio::test(flavor = "multi_thread")]
async fn failures_are_not_stored_so_a_corrected_retry_runs() {
    let app = spawn_app().await;
    let client = &app.client;
    let invalid = json!({"email": "not an address", "first_name": "A", "last_name": "B"}).to_string();
    let response = send(client, &app, Method::POST, "/api/v1/users", Some("fix-me"), &invalid).await;
    assert_eq!(response.status(), 400);
    let taken = unique_email("taken");
    app.create_user(&taken).await;
    let response = send(client, &app, Method::POST, "/api/v1/users", Some("fix-me"), &user_body(&taken)).await;
    assert_eq!(response.status(), 409);
    assert_eq!(error_code(&response.json().await.unwrap()), "email_taken");
    assert_eq!(rows(&app, "idempotency_keys").await, 0, "no failure was stored");

    let fixed = user_body(&unique_email("fixed"));
    let (status, _, replayed, _) =
        parts(send(client, &app, Method::POST, "/api/v1/users", Some("fix-me"), &fixed).await).await;
    assert_eq!((status, replayed), (201, None), "the corrected request ran");
    assert_eq!(rows(&app, "users").await, 2);
}

/// Keys belong to the client that sent them: another client's request with the same key runs as
/// its own, and each client's retry gets its own answer.
#[tokio::test(flavor = "multi_thread")]
async fn keys_are_scoped_per_client() {
    let app = spawn_app().await;
    let mut claims = testkit::auth::SigningKey::claims(testkit::auth::ALL_SCOPES);
    claims["client_id"] = json!("another-client");
    let other = client_with_token(&testkit::auth::shared_issuer().key.sign(&claims));
    let (mine, theirs) = (user_body(&unique_email("mine")), user_body(&unique_email("theirs")));
    let first = parts(send(&app.client, &app, Method::POST, "/api/v1/users", Some("shared"), &mine).await).await;
    let second = parts(send(&other, &app, Method::POST, "/api/v1/users", Some("shared"), &theirs).await).await;
    assert_eq!((first.0, second.0, second.2.as_deref()), (201, 201, None), "not a mismatch, not a replay");
    assert_ne!(first.3, second.3);
    let again = parts(send(&other, &app, Method::POST, "/api/v1/users", Some("shared"), &theirs).await).await;
    assert_eq!((again.2.as_deref(), &again.3), (Some("true"), &second.3), "their own answer");
    let again = parts(send(&app.client, &app, Method::POST, "/api/v1/users", Some("shared"), &mine).await).await;
    assert_eq!((again.2.as_deref(), &again.3), (Some("true"), &first.3), "my own answer");
    assert_eq!(rows(&app, "users").await, 2);
}

/// While the first request with a key is still running, another with the key is 409
/// `idempotency_key_in_use` with `Retry-After: 1` at once (it does not wait for the first); once the
/// first has committed, the key replays its answer. The first is held in flight by a row lock the
/// test takes on the user it updates.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_in_flight_holds_its_key() {
    let app = spawn_app().await;
    let id = app.create_user(&unique_email("busy")).await["id"].as_str().unwrap().to_owned();
    let mut blocker: AsyncPgConnection = testkit::connect(&app.config.database.name).await;
    blocker.batch_execute(&format!("BEGIN; SELECT 1 FROM users WHERE id = '{id}' FOR UPDATE")).await.unwrap();
    let path = format!("/api/v1/users/{id}");
    let change = json!({"last_name": "Once"}).to_string();
    let first = {
        let (client, url) = (app.client.clone(), app.url(&path));
        let change = change.clone();
        tokio::spawn(async move {
            let request = client.put(url).header("idempotency-key", "busy").header("content-type", "application/json");
            parts(request.body(change).send().await.unwrap()).await
        })
    };
    let database = app.config.database.name.clone();
    testkit::eventually("the first update to wait on the row lock", Duration::from_secs(10), || async {
        let sql = "SELECT count(*) AS count FROM pg_stat_activity \
                   WHERE datname = current_database() AND wait_event_type = 'Lock'";
        (count(&database, sql).await == 1).then_some(())
    })
    .await;

    let started = Instant::now();
    let response = send(&app.client, &app, Method::PUT, &path, Some("busy"), &change).await;
    assert_eq!(response.status(), 409);
    assert_eq!(response.headers()["retry-after"], "1");
    assert_eq!(error_code(&response.json().await.unwrap()), "idempotency_key_in_use");
    // Waiting for the first would last until the test commits below: REQUEST_TIMEOUT (10 s), then 503.
    assert!(started.elapsed() < Duration::from_secs(5), "answered without waiting: {:?}", started.elapsed());

    blocker.batch_execute("COMMIT").await.unwrap();
    let first = first.await.unwrap();
    assert_eq!((first.0, first.2.as_deref()), (200, None));
    let retry = parts(send(&app.client, &app, Method::PUT, &path, Some("busy"), &change).await).await;
    assert_eq!((retry.0, retry.2.as_deref(), &retry.3), (200, Some("true"), &first.3));
    let version = count(&app.config.database.name, "SELECT version AS count FROM users").await;
    assert_eq!(version, 2, "updated once");
}

/// Twenty identical requests at once: one 201, the others 409 or a replay of that 201, and one event
/// (events have no unique column that would hide a duplicate).
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_duplicates_make_one_effect() {
    let app = spawn_app_with(&[("DB_POOL_MAX_SIZE", "24")]).await;
    let id = app.create_user(&unique_email("crowd")).await["id"].as_str().unwrap().to_owned();
    let body = event_body(&id);
    let requests = (0..20).map(|_| send(&app.client, &app, Method::POST, "/api/v1/events", Some("crowd"), &body));
    let answers = futures_util::future::join_all(requests.map(|response| async { parts(response.await).await })).await;
    let fresh: Vec<_> = answers.iter().filter(|answer| answer.0 == 201 && answer.2.is_none()).collect();
    assert_eq!(fresh.len(), 1, "{answers:?}");
    for answer in &answers {
        match answer.0 {
            201 => assert_eq!(&answer.3, &fresh[0].3, "a replay of the one that ran"),
            409 => assert!(String::from_utf8_lossy(&answer.3).contains("idempotency_key_in_use")),
            other => panic!("unexpected {other}: {answer:?}"),
        }
    }
    assert_eq!(rows(&app, "events").await, 1);
    let messages = published_about(&app.config, &id).await;
    assert_eq!(of_type(&messages, "purchase").len(), 1, "{messages:?}");
}

/// Writes `body` to `address` as a request with `key` and returns the open connection, unread.
async fn send_raw(address: std::net::SocketAddr, path: &str, key: &str, body: &str) -> TcpStream {
    let mut stream = TcpStream::connect(address).await.unwrap();
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\n{}Content-Type: application/json\r\nIdempotency-Key: {key}\r\n\
         Content-Length: {}\r\n\r\n{body}",
        authorization_line(),
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    stream
}

/// Retries until the answer is not 409 (honouring `Retry-After`), for at most 20 s.
async fn retry_until_settled(
    app: &TestApp,
    path: &str,
    key: &str,
    body: &str,
) -> (u16, Option<String>, Option<String>, Vec<u8>) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let answer = parts(send(&app.client, app, Method::POST, path, Some(key), body).await).await;
        if answer.0 != 409 {
            return answer;
        }
        assert!(Instant::now() < deadline, "still in flight: {answer:?}");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The connection is cut after the request was sent, the answer never read: the retry with the key
/// gets the committed answer (a replay), and there is one event and one message. Also when the cut
/// comes at once, whether or not the first request got to run.
#[tokio::test(flavor = "multi_thread")]
async fn an_answer_lost_to_a_cut_connection_is_replayed_to_the_retry() {
    let app = spawn_app().await;
    let id = app.create_user(&unique_email("cut")).await["id"].as_str().unwrap().to_owned();
    let body = event_body(&id);
    let stream = send_raw(app.address, "/api/v1/events", "lost-answer", &body).await;
    let database = app.config.database.name.clone();
    testkit::eventually("the event to be committed", Duration::from_secs(10), || async {
        (count(&database, "SELECT count(*) AS count FROM events").await == 1).then_some(())
    })
    .await;
    drop(stream);
    let retry = retry_until_settled(&app, "/api/v1/events", "lost-answer", &body).await;
    assert_eq!((retry.0, retry.2.as_deref()), (201, Some("true")), "{retry:?}");
    let event: Value = serde_json::from_slice(&retry.3).unwrap();
    assert_eq!(retry.1, Some(format!("/api/v1/events/{}", event["id"].as_str().unwrap())));
    assert_eq!(rows(&app, "events").await, 1);

    let cut_at_once = send_raw(app.address, "/api/v1/events", "cut-at-once", &body).await;
    drop(cut_at_once);
    let retry = retry_until_settled(&app, "/api/v1/events", "cut-at-once", &body).await;
    assert_eq!(retry.0, 201, "{retry:?}");
    assert_eq!(rows(&app, "events").await, 2, "one event per key");
    let messages = published_about(&app.config, &id).await;
    assert_eq!(of_type(&messages, "purchase").len(), 2, "{messages:?}");
}

/// The api is killed (SIGKILL) after committing a user it never answered for, with Kafka out of
/// reach so that the message is still in the outbox: after a restart, the retry with the key gets
/// the committed answer, and there is one user and exactly one `user_created` on the topic.
#[tokio::test(flavor = "multi_thread")]
async fn an_api_killed_after_its_commit_leaves_the_answer_for_the_retry() {
    testkit::init_test_logging();
    let broker = testkit::Broker::start().await;
    let mut vars = testkit::service_vars();
    let database = testkit::create_database().await;
    let port = testkit::closed_port();
    vars.insert("DB_NAME".into(), database.clone());
    vars.insert("KAFKA_BROKERS".into(), broker.bootstrap());
    vars.insert("SERVER_PORT".into(), port.to_string());
    vars.insert("OUTBOX_POLL_INTERVAL_MS".into(), "50".into());
    vars.insert("LOG_LEVEL".into(), "warn".into());
    // The killed api held the publisher's lease: the restarted one takes over once it lapses.
    vars.insert("OUTBOX_TAKEOVER_TIMEOUT".into(), "2".into());
    let config = Config::from_lookup(|name| vars.get(name).cloned()).unwrap();
    common::kafka::ensure_topics(&config.kafka).await.unwrap();
    let binary = std::path::Path::new(env!("CARGO_BIN_EXE_api"));
    let base = format!("http://127.0.0.1:{port}");
    let mut api = testkit::Process::spawn(binary, &vars);
    testkit::wait_until_listening(port, "the api").await;
    testkit::auth::wait_for_keys(&base).await;

    broker.proxy.cut();
    let body = user_body(&unique_email("crash"));
    let address = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let stream = send_raw(address, "/api/v1/users", "survives-a-crash", &body).await;
    testkit::eventually("the user to be committed", Duration::from_secs(10), || async {
        (count(&database, "SELECT count(*) AS count FROM idempotency_keys").await == 1).then_some(())
    })
    .await;
    api.signal("KILL");
    api.exit_within(Duration::from_secs(10)).await;
    drop(stream);
    assert_eq!(count(&database, "SELECT count(*) AS count FROM outbox").await, 1, "unpublished at the crash");

    broker.proxy.restore();
    vars.insert("RUN_MIGRATIONS".into(), "false".into());
    let _restarted = testkit::Process::spawn(binary, &vars);
    testkit::wait_until_listening(port, "the restarted api").await;
    testkit::auth::wait_for_keys(&base).await;
    let client = client_with_token(&testkit::auth::token(testkit::auth::ALL_SCOPES));
    let retry = client
        .post(format!("{base}/api/v1/users"))
        .header("idempotency-key", "survives-a-crash")
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let (status, location, replayed, bytes) = parts(retry).await;
    assert_eq!((status, replayed.as_deref()), (201, Some("true")));
    let user: Value = serde_json::from_slice(&bytes).unwrap();
    let id = user["id"].as_str().unwrap();
    assert_eq!(location, Some(format!("/api/v1/users/{id}")));
    assert_eq!(count(&database, "SELECT count(*) AS count FROM users").await, 1);
    let messages = published_about(&config, id).await;
    assert_eq!(of_type(&messages, "user_created").len(), 1, "{messages:?}");
    assert_eq!(messages.len(), 1, "nothing else about the user: {messages:?}");
}

/// After `IDEMPOTENCY_TTL` the expiry job deletes the stored answer, and the key runs anew.
#[tokio::test(flavor = "multi_thread")]
async fn expired_keys_are_deleted_and_then_run_anew() {
    let app = spawn_app_with(&[("IDEMPOTENCY_TTL", "1")]).await;
    let id = app.create_user(&unique_email("expiry")).await["id"].as_str().unwrap().to_owned();
    let body = event_body(&id);
    let first = parts(send(&app.client, &app, Method::POST, "/api/v1/events", Some("short-lived"), &body).await).await;
    assert_eq!(first.0, 201);
    assert_eq!(rows(&app, "idempotency_keys").await, 1);
    let database = app.config.database.name.clone();
    testkit::eventually("the expiry job to delete the key", Duration::from_secs(10), || async {
        (count(&database, "SELECT count(*) AS count FROM idempotency_keys").await == 0).then_some(())
    })
    .await;
    let metrics = app.client.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("idempotency_keys_expired_total 1\n"), "{metrics}");
    let again = parts(send(&app.client, &app, Method::POST, "/api/v1/events", Some("short-lived"), &body).await).await;
    assert_eq!((again.0, again.2.as_deref()), (201, None), "ran anew");
    assert_ne!(again.3, first.3);
    assert_eq!(rows(&app, "events").await, 2);
}

/// A row past `expires_at` that the job has not deleted yet no longer counts: the key runs anew and
/// its new answer replaces the row entirely (no `Location` left over from the old answer).
#[tokio::test(flavor = "multi_thread")]
async fn an_expired_key_runs_anew_before_the_job_deletes_it() {
    let app = spawn_app().await;
    let body = user_body(&unique_email("stale"));
    let first = parts(send(&app.client, &app, Method::POST, "/api/v1/users", Some("reused"), &body).await).await;
    assert_eq!(first.0, 201);
    let id = serde_json::from_slice::<Value>(&first.3).unwrap()["id"].as_str().unwrap().to_owned();
    let mut conn = testkit::connect(&app.config.database.name).await;
    conn.batch_execute("UPDATE idempotency_keys SET expires_at = now() - interval '1 second'").await.unwrap();

    // Another request with the key: not a mismatch any more, it runs.
    let path = format!("/api/v1/users/{id}");
    let deleted = parts(send(&app.client, &app, Method::DELETE, &path, Some("reused"), "").await).await;
    assert_eq!((deleted.0, deleted.2.as_deref()), (204, None), "{deleted:?}");
    let replay = parts(send(&app.client, &app, Method::DELETE, &path, Some("reused"), "").await).await;
    assert_eq!((replay.0, replay.2.as_deref(), replay.1.as_deref()), (204, Some("true"), None), "{replay:?}");
    let live = "SELECT count(*) AS count FROM idempotency_keys WHERE method = 'DELETE' AND expires_at > now()";
    assert_eq!(count(&app.config.database.name, live).await, 1);
    assert_eq!(rows(&app, "idempotency_keys").await, 1, "replaced, not added");
}
