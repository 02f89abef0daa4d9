//! The events API and stats, success and error cases (SPEC §2 "Events"), and the outbox rows they
//! write (SPEC §3). The worker side is tested in `worker/tests`.

use std::time::Duration;

use diesel::QueryableByName;
use diesel::sql_types::{Nullable, Text};
use diesel_async::RunQueryDsl;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::{TestApp, error_code, spawn_app, spawn_app_with, unique_email};

async fn post_event(app: &TestApp, body: Value) -> (u16, Value) {
    let response = app.client.post(app.url("/api/v1/events")).json(&body).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[derive(QueryableByName, Debug)]
struct OutboxEntry {
    #[diesel(sql_type = Text)]
    event_type: String,
    #[diesel(sql_type = Text)]
    payload: String,
    #[diesel(sql_type = Nullable<Text>)]
    request_id: Option<String>,
}

async fn outbox_entries(app: &TestApp) -> Vec<OutboxEntry> {
    let mut conn = testkit::connect(&app.config.database.name).await;
    diesel::sql_query("SELECT event_type, payload, request_id FROM outbox ORDER BY id").load(&mut conn).await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn create_and_get_keep_data_exactly_as_sent() {
    let app = spawn_app().await;
    let user = app.create_user(&unique_email("ev")).await;
    let user_id = user["id"].as_str().unwrap();
    for data in [r#""{\"action\": \"login\"}""#, r#"{"z": 1,  "a": [true, null]}"#, "null", "1.50", "[]"] {
        let body = format!(r#"{{"user_id":"{user_id}","type":"login","data":{data}}}"#);
        let response = app
            .client
            .post(app.url("/api/v1/events"))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201, "{data}");
        let location = response.headers()["location"].to_str().unwrap().to_owned();
        let text = response.text().await.unwrap();
        assert!(text.contains(&format!(r#""data":{data}"#)), "data not byte-exact: {text}");
        let created: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(created["status"], "pending");
        assert_eq!(created["processed_at"], Value::Null);
        assert_eq!(created["type"], "login");
        let fetched = app.client.get(app.url(&location)).send().await.unwrap().text().await.unwrap();
        assert_eq!(fetched, text, "GET returns what POST returned");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn create_errors() {
    let app = spawn_app_with(&[("EVENT_MAX_DATA_BYTES", "32")]).await;
    let user = app.create_user(&unique_email("ev-err")).await;
    let user_id = user["id"].as_str().unwrap();

    let (status, body) = post_event(&app, json!({"user_id": Uuid::new_v4(), "type": "t", "data": 1})).await;
    assert_eq!((status, error_code(&body)), (404, "not_found"));

    let (status, body) = post_event(&app, json!({"user_id": user_id, "type": "t", "data": "x".repeat(40)})).await;
    assert_eq!((status, error_code(&body)), (413, "payload_too_large"));

    let cases = [
        (json!({}), vec!["user_id", "type", "data"]),
        (json!({"user_id": "nope", "type": "t", "data": 1}), vec!["user_id"]),
        (json!({"user_id": user_id, "type": "has space", "data": 1}), vec!["type"]),
        (json!({"user_id": user_id, "type": "", "data": 1}), vec!["type"]),
        (json!({"user_id": user_id, "type": "x".repeat(101), "data": 1}), vec!["type"]),
        (json!({"user_id": user_id, "type": "user_deleted", "data": 1}), vec!["type"]),
        (json!({"user_id": user_id, "type": 5, "data": 1}), vec!["type"]),
        (json!({"user_id": user_id, "type": "t", "data": 1, "extra": 2}), vec!["extra"]),
    ];
    for (body, fields) in cases {
        let (status, error) = post_event(&app, body.clone()).await;
        assert_eq!((status, error_code(&error)), (400, "validation_failed"), "{body}");
        let reported: Vec<_> =
            error["details"].as_array().unwrap().iter().map(|d| d["field"].as_str().unwrap()).collect();
        assert_eq!(reported, fields, "{body}");
    }
    let response = app.client.post(app.url("/api/v1/events")).body("{}").send().await.unwrap();
    assert_eq!(response.status(), 415);

    let (status, body) = app.get("/api/v1/events/xyz").await;
    assert_eq!((status, error_code(&body)), (400, "invalid_id"));
    let (status, body) = app.get(&format!("/api/v1/events/{}", Uuid::new_v4())).await;
    assert_eq!((status, error_code(&body)), (404, "not_found"));
    assert!(
        outbox_entries(&app).await.iter().all(|entry| entry.event_type == "user_created"),
        "failed writes left no event"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn list_filters_by_user_and_type() {
    let app = spawn_app().await;
    let alice = app.create_user(&unique_email("alice")).await["id"].as_str().unwrap().to_owned();
    let bob = app.create_user(&unique_email("bob")).await["id"].as_str().unwrap().to_owned();
    for (user, event_type) in [(&alice, "login"), (&alice, "click"), (&bob, "login"), (&alice, "login")] {
        assert_eq!(post_event(&app, json!({"user_id": user, "type": event_type, "data": {}})).await.0, 201);
    }
    let (_, all) = app.get("/api/v1/events").await;
    assert_eq!(all["total"], 4);
    let (_, page) = app.get(&format!("/api/v1/events?user_id={alice}&type=login&limit=1")).await;
    assert_eq!((page["total"].clone(), page["limit"].clone()), (json!(2), json!(1)));
    assert_eq!(page["events"].as_array().unwrap().len(), 1);
    let (_, by_type) = app.get("/api/v1/events?type=click").await;
    assert_eq!(by_type["total"], 1);
    let (_, none) = app.get(&format!("/api/v1/events?user_id={}", Uuid::new_v4())).await;
    assert_eq!(none, json!({"events": [], "total": 0, "page": 1, "limit": 10, "next_cursor": null}));
    let created: Vec<_> =
        all["events"].as_array().unwrap().iter().map(|e| e["created_at"].as_str().unwrap().to_owned()).collect();
    let mut sorted = created.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(created, sorted, "newest first");

    // A filtered walk by cursor.
    let cursor = page["next_cursor"].as_str().expect("alice has a second login");
    let (_, second) = app.get(&format!("/api/v1/events?user_id={alice}&type=login&limit=1&cursor={cursor}")).await;
    assert_eq!(second["events"].as_array().unwrap().len(), 1);
    assert_ne!(second["events"][0]["id"], page["events"][0]["id"]);
    assert!(second["next_cursor"].is_null(), "{second}");

    // Deleting a user takes their events out of the unfiltered total too (the cascade is counted).
    assert_eq!(app.delete(&format!("/api/v1/users/{alice}")).await, 204);
    let (_, all) = app.get("/api/v1/events").await;
    assert_eq!(all["total"], 1);

    for query in ["user_id=nope", "type=bad%20type", "page=0", "limit=500", "cursor=x"] {
        let (status, body) = app.get(&format!("/api/v1/events?{query}")).await;
        assert_eq!((status, error_code(&body)), (400, "validation_failed"), "{query}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn stats_for_a_user_without_processed_events_and_for_unknown_users() {
    let app = spawn_app().await;
    let user = app.create_user(&unique_email("stats")).await;
    let user_id = user["id"].as_str().unwrap();
    assert_eq!(post_event(&app, json!({"user_id": user_id, "type": "login", "data": 1})).await.0, 201);
    let (status, stats) = app.get(&format!("/api/v1/users/{user_id}/stats")).await;
    assert_eq!(status, 200);
    assert_eq!(stats, json!({"user_id": user_id, "events_total": 0, "events_by_type": {}, "last_event_at": null}));
    let (status, body) = app.get(&format!("/api/v1/users/{}/stats", Uuid::new_v4())).await;
    assert_eq!((status, error_code(&body)), (404, "not_found"));
    let (status, body) = app.get("/api/v1/users/abc/stats/").await;
    assert_eq!((status, error_code(&body)), (400, "invalid_id"));
}

#[tokio::test(flavor = "multi_thread")]
async fn every_write_puts_its_message_in_the_outbox_in_the_same_transaction() {
    // A broker that does not exist: nothing is published, so the outbox keeps every row to inspect.
    let port = testkit::closed_port().to_string();
    let app = spawn_app_with(&[("KAFKA_BROKERS", &format!("127.0.0.1:{port}"))]).await;
    let email = unique_email("outbox");
    let user = app.create_user(&email).await;
    let user_id = user["id"].as_str().unwrap();
    let path = format!("/api/v1/users/{user_id}");
    let response = app
        .client
        .post(app.url("/api/v1/events"))
        .header("x-request-id", "req-outbox-1")
        .json(&json!({"user_id": user_id, "type": "purchase", "data": {"sku": "x\"y"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201, "POST answers while Kafka is unreachable");
    let event: Value = response.json().await.unwrap();
    assert_eq!(app.put(&path, json!({"first_name": "Q\"uote"})).await.0, 200);
    assert_eq!(app.put(&path, json!({"email": "bad"})).await.0, 400, "a rejected write adds nothing");
    let before_delete = outbox_entries(&app).await;
    let updated: Value = serde_json::from_str(&before_delete[2].payload).unwrap();
    assert_eq!(updated["data"]["first_name"], "Q\"uote", "lifecycle data is the user's fields, escaped");
    assert_eq!(updated["data"]["email"], email.as_str());
    assert_eq!(app.delete(&path).await, 204);

    let entries = outbox_entries(&app).await;
    let types: Vec<_> = entries.iter().map(|entry| entry.event_type.as_str()).collect();
    assert_eq!(types, ["user_created", "purchase", "user_updated", "user_deleted"]);

    let purchase: Value = serde_json::from_str(&entries[1].payload).unwrap();
    assert_eq!(entries[1].request_id.as_deref(), Some("req-outbox-1"));
    assert_eq!(purchase["id"], event["id"]);
    assert_eq!(purchase["user_id"], user_id);
    assert_eq!(purchase["type"], "purchase");
    assert_eq!(purchase["data"], json!({"sku": "x\"y"}));
    assert_eq!(purchase["timestamp"], event["created_at"]);

    // The user is deleted: the messages about it not yet published keep only its id (SPEC §9).
    for entry in &entries {
        assert!(!entry.payload.contains(&email) && !entry.payload.contains("uote"), "personal data: {}", entry.payload);
    }
    for lifecycle in [&entries[0], &entries[2], &entries[3]] {
        let message: Value = serde_json::from_str(&lifecycle.payload).unwrap();
        assert_eq!(message["data"], json!({"id": user_id}), "{}", lifecycle.payload);
        assert_eq!(message["user_id"], user_id);
    }

    // The user's events went with the user.
    let (status, _) = app.get(&format!("/api/v1/events/{}", event["id"].as_str().unwrap())).await;
    assert_eq!(status, 404);
    let (_, listed) = app.get(&format!("/api/v1/events?user_id={user_id}")).await;
    assert_eq!(listed["total"], 0);
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    count: i64,
}

async fn count(conn: &mut diesel_async::AsyncPgConnection, sql: &str) -> i64 {
    diesel::sql_query(sql).get_result::<Count>(conn).await.unwrap().count
}

/// Concurrent POSTs share insert statements (`events::writer`), and each request still gets its own
/// answer: an unknown user's event is left out (404) and an event PostgreSQL refuses fails alone
/// (500), while the others of the same statement are written, each with its outbox row.
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_events_share_a_statement_and_each_gets_its_own_answer() {
    let port = testkit::closed_port().to_string();
    // The first statements wait on a lock the test holds: no timeout may cut them short on a slow machine.
    let app = std::sync::Arc::new(
        spawn_app_with(&[
            ("KAFKA_BROKERS", &format!("127.0.0.1:{port}")),
            ("DB_STATEMENT_TIMEOUT_MS", "60000"),
            ("REQUEST_TIMEOUT", "90"),
        ])
        .await,
    );
    let mut users = Vec::new();
    for n in 0..4 {
        users.push(app.create_user(&unique_email(&format!("batch{n}"))).await["id"].as_str().unwrap().to_owned());
    }
    let database = app.config.database.name.clone();
    let mut admin = testkit::connect(&database).await;
    // Events PostgreSQL refuses: one for no reason of the client's (500), one as if its user was
    // deleted between the statement's check and its insert (the foreign key: 404).
    diesel::sql_query(
        "CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
         IF NEW.type = 'poison' THEN RAISE EXCEPTION 'poisoned event'; END IF; \
         RAISE foreign_key_violation USING MESSAGE = 'the user was deleted meanwhile'; END $$",
    )
    .execute(&mut admin)
    .await
    .unwrap();
    diesel::sql_query(
        "CREATE TRIGGER refuse_poison BEFORE INSERT ON events FOR EACH ROW \
         WHEN (NEW.type IN ('poison', 'gone')) EXECUTE FUNCTION refuse_poison()",
    )
    .execute(&mut admin)
    .await
    .unwrap();

    // Every statement slot is taken by an insert waiting on the totals' lock, so the requests that
    // follow queue, and the next statement takes them all at once.
    let mut blocker = testkit::connect(&database).await;
    diesel::sql_query("BEGIN").execute(&mut blocker).await.unwrap();
    diesel::sql_query("LOCK TABLE row_counts IN SHARE MODE").execute(&mut blocker).await.unwrap();
    let post = |user: String, event_type: &'static str| {
        let app = std::sync::Arc::clone(&app);
        tokio::spawn(async move {
            let (status, body) = post_event(&app, json!({"user_id": user, "type": event_type, "data": {}})).await;
            (event_type, status, body)
        })
    };
    let slots = api::events::writer::STATEMENTS_IN_FLIGHT;
    let mut requests = Vec::new();
    for n in 0..slots {
        requests.push(post(users[0].clone(), "login"));
        let waiting = format!(
            "SELECT count(*) AS count FROM pg_stat_activity WHERE datname = '{database}' AND wait_event_type = 'Lock'"
        );
        testkit::eventually("an insert waiting on the lock", Duration::from_secs(10), || {
            let waiting = waiting.clone();
            let database = database.clone();
            async move {
                let mut conn = testkit::connect(&database).await;
                (count(&mut conn, &waiting).await == n as i64 + 1).then_some(())
            }
        })
        .await;
    }
    for n in 0..40 {
        let (user, event_type) = match n % 8 {
            0 => (Uuid::new_v4().to_string(), "login"),
            1 => (users[n % 4].clone(), "poison"),
            2 => (users[n % 4].clone(), "gone"),
            _ => (users[n % 4].clone(), "login"),
        };
        requests.push(post(user, event_type));
    }
    app.wait_for_in_flight(slots + 40).await;
    diesel::sql_query("COMMIT").execute(&mut blocker).await.unwrap();

    let mut written = Vec::new();
    for request in requests {
        let (event_type, status, body) = request.await.unwrap();
        match (event_type, status) {
            ("login", 201) => written.push(body["id"].as_str().unwrap().to_owned()),
            ("login" | "gone", 404) => assert_eq!(error_code(&body), "not_found"),
            ("poison", 500) => assert_eq!(error_code(&body), "internal_error"),
            other => panic!("unexpected answer {other:?}: {body}"),
        }
    }
    assert_eq!(written.len(), slots + 25, "every event of an existing user was written");

    // The 40 queued requests went in one statement (the batch-size histogram's largest bucket).
    let metrics = app.client.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let at_most_16 = metrics.lines().find_map(|line| line.strip_prefix("event_insert_batch_size_bucket{le=\"16\"} "));
    let all = metrics.lines().find_map(|line| line.strip_prefix("event_insert_batch_size_count "));
    let (at_most_16, all): (u64, u64) = (at_most_16.unwrap().parse().unwrap(), all.unwrap().parse().unwrap());
    assert!(all > at_most_16, "no statement held more than 16 events:\n{metrics}");

    // Each written event has exactly one outbox row, and nothing else was written.
    let ids = written.iter().map(|id| format!("'{id}'")).collect::<Vec<_>>().join(",");
    let events = format!("SELECT count(*) AS count FROM events WHERE id IN ({ids})");
    assert_eq!(count(&mut admin, &events).await, written.len() as i64);
    assert_eq!(count(&mut admin, "SELECT count(*) AS count FROM events").await, written.len() as i64);
    let messages = format!("SELECT count(*) AS count FROM outbox WHERE event_id IN ({ids})");
    assert_eq!(count(&mut admin, &messages).await, written.len() as i64);
    let (_, listed) = app.get("/api/v1/events?limit=1").await;
    assert_eq!(listed["total"], written.len() as u64, "the list's total counts every batch's events");
}
