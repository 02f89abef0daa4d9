//! Two workers in one consumer group.

use std::time::Duration;

use serde_json::Value;

use crate::helpers::Stack;

async fn assigned(client: &reqwest::Client, worker: std::net::SocketAddr) -> bool {
    let ready: Value = client.get(format!("http://{worker}/health/ready")).send().await.unwrap().json().await.unwrap();
    ready["assigned"] == true
}

#[tokio::test(flavor = "multi_thread")]
async fn two_workers_share_the_partitions_and_one_takes_over_when_the_other_stops() {
    let stack = Stack::start(&[]).await;
    let first = stack.start_worker().await;
    let second = stack.start_worker().await;
    testkit::eventually("both workers to hold partitions", Duration::from_secs(60), || async {
        (assigned(&stack.client, first.http).await && assigned(&stack.client, second.http).await).then_some(())
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
    assert!(assigned(&stack.client, survivor_http).await);
    for user in &users {
        let stats = stack.stats(user).await;
        assert_eq!(stats["events_by_type"], serde_json::json!({"before": 10, "after": 10}), "{user}");
    }
    second.stop().await;
}
