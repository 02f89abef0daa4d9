//! Frozen processes (`kill -STOP`: a paused VM, a hung process; its sockets stay open, so nothing
//! announces the failure), SPEC §3. A publishing api that stops is replaced within
//! `OUTBOX_TAKEOVER_TIMEOUT` and, resumed, publishes nothing more under the lease it lost; a frozen
//! worker's partitions go to another worker, and resumed, it rejoins; nothing is lost or applied twice.

use std::time::{Duration, Instant};

use serde_json::json;
use testkit::Process;

use crate::helpers::Stack;

const TAKEOVER_TIMEOUT: Duration = Duration::from_secs(4);

/// An api binary on a port of its own, its base URL.
async fn start_api(stack: &Stack) -> (Process, String) {
    let port = testkit::closed_port().to_string();
    let api = format!("http://127.0.0.1:{port}");
    let process = stack.spawn_binary(
        "api",
        &[
            ("SERVER_PORT", &port),
            ("RUN_MIGRATIONS", "false"),
            ("OUTBOX_TAKEOVER_TIMEOUT", &TAKEOVER_TIMEOUT.as_secs().to_string()),
        ],
    );
    stack.wait_live(&api).await;
    (process, api)
}

async fn publishing(stack: &Stack, api: &str) -> bool {
    stack.metric(api, "outbox_publishing").await == Some(1.0)
}

async fn post_events(stack: &Stack, api: &str, user: &str, count: usize) {
    for n in 0..count {
        let body = json!({"user_id": user, "type": "takeover", "data": n});
        let response = stack.client.post(format!("{api}/api/v1/events")).json(&body).send().await.unwrap();
        assert_eq!(response.status(), 201);
    }
}

/// `kill -STOP` on the publisher (a paused VM, a hung process: its sockets stay open, so nothing
/// announces the failure): the other replica publishes within the takeover timeout, and the frozen
/// one, resumed, finds its lease gone and publishes nothing more. Every event is applied once.
#[tokio::test(flavor = "multi_thread")]
async fn a_frozen_publisher_is_replaced_within_the_takeover_timeout_and_stays_quiet_when_it_resumes() {
    let mut stack = Stack::start(&[]).await;
    // Only the two processes below publish: the in-process replica leaves the stage.
    stack.stop_primary_api().await;
    let (first, first_api) = start_api(&stack).await;
    testkit::eventually("the first replica to publish", Duration::from_secs(30), || async {
        publishing(&stack, &first_api).await.then_some(())
    })
    .await;
    let (second, second_api) = start_api(&stack).await;
    let worker = stack.start_worker().await;
    let body = json!({"email": format!("{}@example.com", testkit::unique()), "first_name": "T", "last_name": "O"});
    let response = stack.client.post(format!("{first_api}/api/v1/users")).json(&body).send().await.unwrap();
    assert_eq!(response.status(), 201);
    let user = response.json::<serde_json::Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
    post_events(&stack, &first_api, &user, 10).await;
    stack.wait_until_drained(Duration::from_secs(60)).await;
    assert!(!publishing(&stack, &second_api).await, "one publisher at a time");

    let published_before_the_freeze = stack.metric(&first_api, "outbox_published_total").await.unwrap();
    first.signal("STOP");
    let frozen_at = Instant::now();
    post_events(&stack, &second_api, &user, 20).await;
    testkit::eventually("the second replica to publish what it accepted", Duration::from_secs(60), || async {
        (stack.outbox_rows().await == 0).then_some(())
    })
    .await;
    let takeover = frozen_at.elapsed();
    eprintln!("takeover from a frozen publisher: {takeover:?} (OUTBOX_TAKEOVER_TIMEOUT {TAKEOVER_TIMEOUT:?})");
    assert!(takeover <= TAKEOVER_TIMEOUT, "published {takeover:?} after the freeze");
    assert!(publishing(&stack, &second_api).await);
    stack.wait_until_drained(Duration::from_secs(60)).await;

    // Frozen for longer than its lease: when it resumes it must notice before it publishes again.
    first.signal("CONT");
    first.line_containing("another replica took over publishing the outbox", Duration::from_secs(30)).await;
    post_events(&stack, &first_api, &user, 10).await;
    stack.wait_until_drained(Duration::from_secs(60)).await;
    assert!(!publishing(&stack, &first_api).await);
    assert_eq!(stack.metric(&first_api, "outbox_published_total").await.unwrap(), published_before_the_freeze);
    assert_eq!(stack.stats_from(&second_api, &user).await["events_by_type"], json!({"takeover": 40}));
    assert_eq!(stack.counted_total().await, 40);

    worker.stop().await;
    drop((first, second));
}

/// A worker frozen for longer than the session timeout while it holds partitions (and events in
/// flight): the group gives its partitions to the other worker, which applies everything, the frozen
/// one's unfinished events included (its offsets were never committed); resumed, it rejoins the group
/// and consumes again. Every event is applied exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn a_frozen_worker_loses_its_partitions_and_rejoins_when_resumed() {
    let stack = Stack::start(&[]).await;
    let other = stack.start_worker().await;
    let port = testkit::closed_port().to_string();
    let frozen = stack.spawn_binary("worker", &[("WORKER_HTTP_PORT", &port)]);
    let frozen_base = format!("http://127.0.0.1:{port}");
    let assigned = |base: String| {
        let client = stack.client.clone();
        async move {
            let ready: serde_json::Value =
                client.get(format!("{base}/health/ready")).send().await.ok()?.json().await.ok()?;
            (ready["assigned"] == true).then_some(())
        }
    };
    testkit::eventually("both workers to hold partitions", Duration::from_secs(60), || async {
        assigned(frozen_base.clone()).await?;
        assigned(format!("http://{}", other.http)).await
    })
    .await;
    // Users enough that both workers' partitions get events (4 partitions, 8 keys).
    let mut users = Vec::new();
    for _ in 0..8 {
        users.push(stack.create_user().await);
    }
    for user in &users {
        for _ in 0..3 {
            stack.post_event(user, "frozen").await;
        }
    }

    frozen.signal("STOP");
    let frozen_at = Instant::now();
    for user in &users {
        for _ in 0..3 {
            stack.post_event(user, "frozen").await;
        }
    }
    stack.wait_until_drained(Duration::from_secs(90)).await;
    let taken_over = frozen_at.elapsed();

    let assignments = || frozen.output().iter().filter(|line| line.contains("partitions assigned")).count();
    let assigned_before = assignments();
    frozen.signal("CONT");
    let resumed = Instant::now();
    testkit::eventually("the resumed worker to be given partitions again", Duration::from_secs(90), || async {
        (assignments() > assigned_before).then_some(())
    })
    .await;
    let rejoined = resumed.elapsed();
    for user in &users {
        stack.post_event(user, "frozen").await;
    }
    stack.wait_until_drained(Duration::from_secs(90)).await;
    for user in &users {
        let stored = stack.get(&format!("/api/v1/events?user_id={user}&limit=100")).await["total"].as_i64().unwrap();
        assert_eq!(stack.stats(user).await["events_total"], stored, "{user}");
    }
    eprintln!(
        "worker frozen: everything applied by the other worker {taken_over:?} after the freeze (session timeout 6 s); the resumed one was given partitions again {rejoined:?} after SIGCONT"
    );
    other.stop().await;
    drop(frozen);
}
