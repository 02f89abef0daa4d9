//! Two workers in one consumer group.

use std::time::Duration;

use serde_json::Value;

use crate::helpers::{ApiHandle, Stack, postgres_proxy};

async fn assigned(stack: &Stack, worker: std::net::SocketAddr) -> bool {
    stack.holds_partitions(&format!("http://{worker}")).await
}

#[tokio::test(flavor = "multi_thread")]
async fn two_workers_share_the_partitions_and_one_takes_over_when_the_other_stops() {
    let stack = Stack::start(&[]).await;
    let first = stack.start_worker().await;
    let second = stack.start_worker().await;
    testkit::eventually("both workers to hold partitions", Duration::from_secs(60), || async {
        (assigned(&stack, first.http).await && assigned(&stack, second.http).await).then_some(())
    })
    .await;

    let mut users = Vec::new();
    for _ in 0..10 {
        users.push(stack.create_user().await);
    }
    for user in &users {
        for _ in 0..10 {
            stack.post_event(user, "before").await;
        }
    }
    stack.wait_until_drained(Duration::from_secs(60)).await;

    let survivor_http = second.http;
    first.stop().await;
    for user in &users {
        for _ in 0..10 {
            stack.post_event(user, "after").await;
        }
    }
    stack.wait_until_drained(Duration::from_secs(90)).await;
    assert!(assigned(&stack, survivor_http).await);
    for user in &users {
        let stats = stack.stats(user).await;
        assert_eq!(stats["events_by_type"], serde_json::json!({"before": 10, "after": 10}), "{user}");
    }
    second.stop().await;
}

/// Several api replicas write; one publishes at a time, and when it stops another takes over.
#[tokio::test(flavor = "multi_thread")]
async fn outbox_rows_of_every_api_replica_are_published_and_publishing_fails_over() {
    let mut stack = Stack::start(&[]).await;
    let worker = stack.start_worker().await;
    // The primary replica started alone, so it holds the publisher lock; two more join.
    let second = ApiHandle::start(stack.config.clone()).await;
    let third = ApiHandle::start(stack.config.clone()).await;
    let user = stack.create_user().await;
    let client = stack.client.clone();
    let post = |replica: std::net::SocketAddr, event_type: &'static str| {
        let client = client.clone();
        let user = user.clone();
        async move {
            let body = serde_json::json!({"user_id": user, "type": event_type, "data": 1});
            let response = client.post(format!("http://{replica}/api/v1/events")).json(&body).send().await.unwrap();
            assert_eq!(response.status(), 201);
        }
    };
    for _ in 0..10 {
        post(stack.api, "first").await;
        post(second.address, "second").await;
        post(third.address, "third").await;
    }
    stack.wait_until_drained(Duration::from_secs(60)).await;

    // The publisher stops; one of the others takes the lock over and publishes what they write.
    stack.stop_primary_api().await;
    for _ in 0..10 {
        post(second.address, "second").await;
        post(third.address, "third").await;
    }
    stack.wait_until_drained(Duration::from_secs(60)).await;
    let stats: Value = stack
        .client
        .get(format!("http://{}/api/v1/users/{user}/stats", third.address))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats["events_by_type"], serde_json::json!({"first": 10, "second": 20, "third": 20}));
    second.stop().await;
    third.stop().await;
    worker.stop().await;
}

/// librdkafka keeps a partition's pause flag through revocation and reassignment. A worker that
/// paused fetching for backpressure, lost partitions to a second worker, resumed what it still held,
/// and later got the others back must fetch from those again (they once stalled consumption for good).
#[tokio::test(flavor = "multi_thread")]
async fn partitions_paused_for_backpressure_are_fetched_again_when_they_come_back() {
    let (postgres, port) = postgres_proxy().await;
    let stack = Stack::start(&[]).await;
    let mut users = Vec::new();
    for _ in 0..16 {
        users.push(stack.create_user().await);
    }
    let mut first =
        // Debug for the pipeline: its "backpressure" line says when fetching paused.
        stack.spawn_binary(
            "worker",
            &[("DB_PORT", &port), ("LOG_LEVEL", "info,worker::pipeline=debug"), ("WORKER_MAX_IN_FLIGHT", "8")],
        );
    let assignments = || first.output().iter().filter(|line| line.contains("partitions assigned")).count();
    testkit::eventually("the first worker to hold partitions", Duration::from_secs(60), || async {
        (assignments() > 0).then_some(())
    })
    .await;

    // Its lanes retry while PostgreSQL is cut: in flight reaches the limit and it pauses every partition.
    postgres.cut();
    for user in &users {
        for _ in 0..2 {
            stack.post_event(user, "paused").await;
        }
    }
    testkit::eventually("the first worker to pause fetching", Duration::from_secs(30), || async {
        first.output().iter().any(|line| line.contains("backpressure") && line.contains("\"pause\":true")).then_some(())
    })
    .await;
    let second = stack.start_worker().await;
    testkit::eventually("the second worker to take partitions over", Duration::from_secs(60), || async {
        assigned(&stack, second.http).await.then_some(())
    })
    .await;
    postgres.restore();
    stack.wait_until_drained(Duration::from_secs(60)).await;

    // The second leaves: the partitions the first had paused come back to it.
    let assigned_before = assignments();
    second.stop().await;
    testkit::eventually("the first worker to get the partitions back", Duration::from_secs(60), || async {
        (assignments() > assigned_before).then_some(())
    })
    .await;
    for user in &users {
        stack.post_event(user, "returned").await;
    }
    stack.wait_until_drained(Duration::from_secs(60)).await;
    for user in &users {
        let stats = stack.stats(user).await;
        assert_eq!(stats["events_by_type"], serde_json::json!({"paused": 2, "returned": 1}), "{user}");
    }
    first.signal("TERM");
    assert!(first.exit_within(Duration::from_secs(30)).await.success());
}
