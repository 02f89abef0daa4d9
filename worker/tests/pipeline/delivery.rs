//! Effects, message format, idempotency, dead letters and ordering.

use std::time::Duration;

use common::kafka::headers;
use diesel_async::RunQueryDsl;
use rdkafka::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::Value;

use crate::helpers::{Stack, header, read_until};

const DRAIN: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread")]
async fn an_event_is_processed_end_to_end_and_its_message_matches_the_contract() {
    let stack = Stack::start(&[]).await;
    let worker = stack.start_worker().await;
    let user = stack.create_user().await;
    let response = stack
        .client
        .post(stack.url("/api/v1/events"))
        .header("x-request-id", "e2e-request-1")
        .json(&serde_json::json!({"user_id": user, "type": "login", "data": "{\"action\": \"login\"}"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let event: Value = response.json().await.unwrap();
    let id = event["id"].as_str().unwrap().to_owned();

    let processed = testkit::eventually("the event to be processed", DRAIN, || async {
        let current = stack.get(&format!("/api/v1/events/{id}")).await;
        (current["status"] == "processed").then_some(current)
    })
    .await;
    assert!(processed["processed_at"].as_str().unwrap() >= event["created_at"].as_str().unwrap());
    let stats = stack.stats(&user).await;
    assert_eq!(stats["events_total"], 1);
    assert_eq!(stats["events_by_type"], serde_json::json!({"login": 1}));
    assert_eq!(stats["last_event_at"], event["created_at"]);
    let metrics =
        stack.client.get(format!("http://{}/metrics", worker.http)).send().await.unwrap().text().await.unwrap();
    for needle in [
        "worker_events_consumed_total 2",
        r#"worker_events_finished_total{outcome="processed"} 1"#,
        r#"worker_events_finished_total{outcome="lifecycle"} 1"#,
        "worker_event_processing_seconds_bucket",
        r#"worker_event_age_seconds_count{stage="published"} 2"#,
        r#"worker_event_age_seconds_count{stage="received"} 2"#,
        r#"worker_event_age_seconds_count{stage="processed"} 2"#,
        "worker_events_in_flight",
        "process_resident_memory_bytes",
    ] {
        assert!(metrics.contains(needle), "worker metrics lack {needle}:\n{metrics}");
    }
    // An event only gets older along the way.
    let age_sum = |stage: &str| -> f64 {
        let prefix = format!("worker_event_age_seconds_sum{{stage=\"{stage}\"}} ");
        metrics.lines().find_map(|line| line.strip_prefix(prefix.as_str())).unwrap().parse().unwrap()
    };
    let (published, received, processed) = (age_sum("published"), age_sum("received"), age_sum("processed"));
    assert!(
        0.0 <= published && published <= received && received <= processed,
        "ages out of order: published {published}, received {received}, processed {processed}"
    );

    // SPEC §4: key = user_id, JSON value with the seed's field names, the three headers.
    let reader = stack.reader(&stack.config.kafka.topic);
    // user_created precedes login on the user's partition.
    let created = read_until(&reader, DRAIN, |m| header(m, headers::EVENT_TYPE) == Some("user_created")).await;
    let created: Value = serde_json::from_slice(created.payload().unwrap()).unwrap();
    assert_eq!(created["data"]["id"], user.as_str());
    let message = read_until(&reader, DRAIN, |m| header(m, headers::EVENT_TYPE) == Some("login")).await;
    assert_eq!(message.key(), Some(user.as_bytes()));
    let value: Value = serde_json::from_slice(message.payload().unwrap()).unwrap();
    assert_eq!(value["id"], event["id"]);
    assert_eq!(value["user_id"], user.as_str());
    assert_eq!(value["type"], "login");
    assert_eq!(value["data"], "{\"action\": \"login\"}");
    assert_eq!(value["timestamp"], event["created_at"]);
    assert_eq!(header(&message, headers::CONTENT_TYPE), Some("application/json"));
    assert_eq!(header(&message, headers::REQUEST_ID), Some("e2e-request-1"));

    // Deleting the user removes its events and stats; nothing stale is served.
    let deleted = stack.client.delete(stack.url(&format!("/api/v1/users/{user}"))).send().await.unwrap();
    assert_eq!(deleted.status(), 204);
    let gone = stack.client.get(stack.url(&format!("/api/v1/events/{id}"))).send().await.unwrap();
    assert_eq!(gone.status(), 404);
    let stats = stack.client.get(stack.url(&format!("/api/v1/users/{user}/stats"))).send().await.unwrap();
    assert_eq!(stats.status(), 404);
    stack.wait_until_drained(DRAIN).await;
    assert_eq!(stack.counted_total().await, 0);
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_same_message_delivered_again_is_counted_once() {
    let stack = Stack::start(&[]).await;
    let worker = stack.start_worker().await;
    let user = stack.create_user().await;
    let event = stack.post_event(&user, "login").await;
    stack.wait_until_drained(DRAIN).await;

    // Replay the event's exact message twice, as Kafka would after a crash or rebalance.
    let reader = stack.reader(&stack.config.kafka.topic);
    let original = read_until(&reader, DRAIN, |m| header(m, headers::EVENT_TYPE) == Some("login")).await;
    let producer: FutureProducer = common::kafka::producer_config(&stack.config.kafka).create().unwrap();
    for _ in 0..2 {
        let record = FutureRecord::to(&stack.config.kafka.topic)
            .key(original.key().unwrap())
            .payload(original.payload().unwrap());
        producer.send(record, Duration::from_secs(10)).await.unwrap();
    }
    // A later event of the same user is applied after the replays (same partition, same lane).
    let barrier = stack.post_event(&user, "barrier").await;
    testkit::eventually("the barrier event", DRAIN, || async {
        let current = stack.get(&format!("/api/v1/events/{}", barrier["id"].as_str().unwrap())).await;
        (current["status"] == "processed").then_some(())
    })
    .await;
    let stats = stack.stats(&user).await;
    assert_eq!(stats["events_by_type"], serde_json::json!({"login": 1, "barrier": 1}), "replays changed nothing");
    assert_eq!(stats["events_total"], 2);
    let processed = stack.get(&format!("/api/v1/events/{}", event["id"].as_str().unwrap())).await;
    assert_eq!(processed["status"], "processed");
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn poison_messages_are_dead_lettered_and_the_partition_keeps_moving() {
    let stack = Stack::start(&[("WORKER_MAX_RETRIES", "2"), ("KAFKA_TOPIC_PARTITIONS", "1")]).await;
    // Make one event type fail inside the database, every time: a message that decodes but cannot apply.
    let mut conn = testkit::connect(&stack.config.database.name).await;
    diesel::sql_query(
        "CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN IF NEW.type = 'poison' THEN RAISE EXCEPTION 'poison event refused'; END IF; RETURN NEW; END $$",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    diesel::sql_query(
        "CREATE TRIGGER refuse_poison BEFORE INSERT ON user_event_stats FOR EACH ROW EXECUTE FUNCTION refuse_poison()",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    let worker = stack.start_worker().await;
    let user = stack.create_user().await;

    // An undecodable message, straight onto the (single) partition.
    let producer: FutureProducer = common::kafka::producer_config(&stack.config.kafka).create().unwrap();
    producer
        .send(
            FutureRecord::to(&stack.config.kafka.topic).key(user.as_str()).payload("not json {"),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    let poison = stack.post_event(&user, "poison").await;
    let fine = stack.post_event(&user, "fine").await;

    stack.wait_until_drained(DRAIN).await;
    let poison = stack.get(&format!("/api/v1/events/{}", poison["id"].as_str().unwrap())).await;
    assert_eq!(poison["status"], "failed");
    assert_eq!(poison["processed_at"], Value::Null);
    let fine = stack.get(&format!("/api/v1/events/{}", fine["id"].as_str().unwrap())).await;
    assert_eq!(fine["status"], "processed", "later messages on the partition still processed");
    assert_eq!(stack.stats(&user).await["events_by_type"], serde_json::json!({"fine": 1}));

    let dlq = stack.reader(&stack.config.kafka.dlq_topic());
    let undecodable = read_until(&dlq, DRAIN, |m| m.payload() == Some(b"not json {".as_slice())).await;
    assert!(header(&undecodable, headers::ERROR).unwrap().starts_with("undecodable"));
    let failed = read_until(&dlq, DRAIN, |m| header(m, headers::EVENT_TYPE) == Some("poison")).await;
    assert!(header(&failed, headers::ERROR).unwrap().contains("poison event refused"), "error header");
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn one_users_events_are_applied_in_order_under_concurrency() {
    let stack = Stack::start(&[("WORKER_CONCURRENCY", "8")]).await;
    let worker = stack.start_worker().await;
    let mut users = Vec::new();
    for _ in 0..8 {
        users.push(stack.create_user().await);
    }
    // Users post concurrently; each user's events one after another, so created_at orders them.
    let mut posting = Vec::new();
    for user in users.clone() {
        let client = stack.client.clone();
        let url = stack.url("/api/v1/events");
        posting.push(tokio::spawn(async move {
            for n in 0..40 {
                let body = serde_json::json!({"user_id": user, "type": format!("step{}", n % 3), "data": n});
                assert_eq!(client.post(&url).json(&body).send().await.unwrap().status(), 201);
            }
        }));
    }
    for task in posting {
        task.await.unwrap();
    }
    stack.wait_until_drained(DRAIN).await;
    for user in users {
        let page = stack.get(&format!("/api/v1/events?user_id={user}&limit=100")).await;
        let mut events: Vec<(String, String)> = page["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| (e["created_at"].as_str().unwrap().to_owned(), e["processed_at"].as_str().unwrap().to_owned()))
            .collect();
        assert_eq!(events.len(), 40);
        events.sort();
        for pair in events.windows(2) {
            assert!(pair[0].1 <= pair[1].1, "user {user}: an event was applied before an earlier one: {pair:?}");
        }
        assert_eq!(stack.stats(&user).await["events_total"], 40);
    }
    worker.stop().await;
}
