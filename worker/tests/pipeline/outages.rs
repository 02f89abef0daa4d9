//! Outages of PostgreSQL and crashes of the api (SPEC §3): requests fail fast and honestly while the
//! database is away, everything recovers by itself, and no acknowledged event is lost or applied twice.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::helpers::{Stack, postgres_proxy};

async fn post_events(stack: &Stack, api: &str, user: &str, count: usize) -> usize {
    let mut acknowledged = 0;
    for n in 0..count {
        let body = json!({"user_id": user, "type": "outage", "data": n});
        let response = stack.client.post(format!("{api}/api/v1/events")).json(&body).send().await.unwrap();
        let status = response.status();
        assert_eq!(status, 201, "{}", response.text().await.unwrap_or_default());
        acknowledged += 1;
    }
    acknowledged
}

#[tokio::test(flavor = "multi_thread")]
async fn with_postgres_cut_the_api_answers_503_promptly_and_recovers_without_a_restart() {
    let (proxy, port) = postgres_proxy().await;
    let stack = Stack::start(&[("DB_PORT", &port), ("DB_POOL_TIMEOUT_MS", "1000"), ("DB_CONNECT_TIMEOUT", "2")]).await;
    let user = stack.create_user().await;
    let path = format!("/api/v1/users/{user}");
    stack.wait_for_readiness(&stack.url(""), 200).await;

    proxy.cut();
    for (method, url, body) in [
        ("GET", stack.url("/api/v1/users?limit=1"), None),
        ("PUT", stack.url(&path), Some(json!({"first_name": "Cut"}))),
        ("POST", stack.url("/api/v1/events"), Some(json!({"user_id": user, "type": "cut", "data": 1}))),
    ] {
        let started = Instant::now();
        let mut request = stack.client.request(method.parse().unwrap(), &url);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let elapsed = started.elapsed();
        assert_eq!(response.status(), 503, "{method} {url}");
        assert!(response.headers().contains_key("retry-after"), "{method} {url}: Retry-After");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["code"], "service_unavailable", "{body}");
        // Bounded by the pool's checkout timeout, far below the request timeout.
        assert!(elapsed < Duration::from_secs(5), "{method} took {elapsed:?} with PostgreSQL cut");
    }
    stack.wait_for_readiness(&stack.url(""), 503).await;
    assert_eq!(stack.client.get(stack.url("/health/live")).send().await.unwrap().status(), 200);

    proxy.restore();
    testkit::eventually("the api to serve again after PostgreSQL came back", Duration::from_secs(15), || async {
        let response = stack.client.put(stack.url(&path)).json(&json!({"first_name": "Back"})).send().await.ok()?;
        (response.status() == 200).then_some(())
    })
    .await;
    stack.wait_for_readiness(&stack.url(""), 200).await;
    assert_eq!(stack.get(&path).await["first_name"], "Back");
}

/// The worker cannot reach PostgreSQL while events keep arriving: it applies nothing, commits
/// nothing, stays in its group (no rebalance), and applies every event exactly once when the
/// database is back.
#[tokio::test(flavor = "multi_thread")]
async fn with_postgres_cut_the_worker_waits_in_its_group_and_resumes_exactly_once() {
    let (proxy, port) = postgres_proxy().await;
    let stack = Stack::start(&[]).await;
    let user = stack.create_user().await;
    let mut worker =
        stack.spawn_binary("worker", &[("DB_PORT", &port), ("LOG_LEVEL", "info"), ("WORKER_RETRY_BACKOFF_MS", "100")]);
    let before = post_events(&stack, &stack.url(""), &user, 5).await;
    stack.wait_until_drained(Duration::from_secs(60)).await;

    proxy.cut();
    let during = post_events(&stack, &stack.url(""), &user, 50).await;
    // Long enough for a poll-interval or session timeout to bite if the worker stopped polling.
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(stack.pending_events().await, 50, "nothing applied while PostgreSQL is cut");
    proxy.restore();
    stack.wait_until_drained(Duration::from_secs(60)).await;

    let stats = stack.stats(&user).await;
    assert_eq!(stats["events_by_type"]["outage"], (before + during) as i64, "{stats}");
    let assignments = worker.output().iter().filter(|line| line.contains("partitions assigned")).count();
    let revocations = worker.output().iter().filter(|line| line.contains("partitions revoked")).count();
    assert_eq!((assignments, revocations), (1, 0), "the worker kept its partitions through the outage");
    worker.signal("TERM");
    assert!(worker.exit_within(Duration::from_secs(30)).await.success());
}

/// kill -9 of the api while its outbox holds rows Kafka never acknowledged: another replica (or the
/// restarted one) publishes them, and each is applied once.
#[tokio::test(flavor = "multi_thread")]
async fn an_api_killed_with_unpublished_outbox_rows_loses_none_of_them() {
    let mut stack = Stack::start(&[]).await;
    // The in-process replica would publish too; this test wants the killed process to be the only one.
    stack.stop_primary_api().await;
    let port = testkit::closed_port().to_string();
    let api = format!("http://127.0.0.1:{port}");
    let mut process = stack.spawn_binary("api", &[("SERVER_PORT", &port), ("RUN_MIGRATIONS", "false")]);
    stack.wait_live(&api).await;

    stack.broker.proxy.cut();
    let mut users = Vec::new();
    for n in 0..4 {
        let body = json!({"email": format!("crash{n}-{}@example.com", testkit::unique()), "first_name": "C", "last_name": "D"});
        let response = stack.client.post(format!("{api}/api/v1/users")).json(&body).send().await.unwrap();
        assert_eq!(response.status(), 201);
        users.push(response.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned());
    }
    let mut expected = HashMap::new();
    for user in &users {
        expected.insert(user.clone(), post_events(&stack, &api, user, 25).await);
    }
    process.signal("KILL");
    process.exit_within(Duration::from_secs(10)).await;
    assert!(stack.outbox_rows().await >= 100, "the outbox held the unpublished events at the crash");

    stack.broker.proxy.restore();
    let restarted = stack.spawn_binary("api", &[("SERVER_PORT", &port), ("RUN_MIGRATIONS", "false")]);
    stack.wait_live(&api).await;
    let worker = stack.start_worker().await;
    stack.wait_until_drained(Duration::from_secs(90)).await;
    for (user, count) in &expected {
        let stats = stack.stats_from(&api, user).await;
        assert_eq!(stats["events_by_type"]["outage"], *count as i64, "{stats}");
    }
    assert_eq!(stack.counted_total().await, 100);
    worker.stop().await;
    drop(restarted);
}

/// A stack on a PostgreSQL server of its own (to stop or freeze), failing fast while it is away, with
/// a worker and a user who has 5 acknowledged events.
async fn on_a_private_postgres(
    extra: &[(&str, &str)],
) -> (testkit::PrivatePostgres, Stack, crate::helpers::WorkerHandle, String) {
    let postgres = testkit::PrivatePostgres::start();
    let port = postgres.port.to_string();
    let mut vars = vec![
        ("DB_PORT", port.as_str()),
        ("DB_NAME", "postgres"),
        ("DB_POOL_TIMEOUT_MS", "1000"),
        ("DB_CONNECT_TIMEOUT", "2"),
    ];
    vars.extend_from_slice(extra);
    let stack = Stack::start(&vars).await;
    let worker = stack.start_worker().await;
    let user = stack.create_user().await;
    assert_eq!(post_events(&stack, &stack.url(""), &user, 5).await, 5);
    (postgres, stack, worker, user)
}

/// PostgreSQL stopped outright (not just unreachable) and started again: the api answers 503 with
/// `Retry-After` promptly while it is down, readiness follows, and the api and the worker carry on by
/// themselves afterwards, every acknowledged event applied once.
#[tokio::test(flavor = "multi_thread")]
async fn with_postgres_stopped_and_started_again_everything_recovers_by_itself() {
    let (postgres, stack, worker, user) = on_a_private_postgres(&[]).await;
    let mut acknowledged = 5;

    postgres.stop_server();
    let started = Instant::now();
    let response = stack
        .client
        .post(stack.url("/api/v1/events"))
        .json(&json!({"user_id": user, "type": "outage", "data": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    assert!(response.headers().contains_key("retry-after"));
    assert!(started.elapsed() < Duration::from_secs(5), "answered in {:?}", started.elapsed());
    stack.wait_for_readiness(&stack.url(""), 503).await;
    assert_eq!(stack.client.get(stack.url("/health/live")).send().await.unwrap().status(), 200);

    postgres.start_server();
    testkit::eventually("the api to be ready again", Duration::from_secs(30), || async {
        let response = stack.client.get(stack.url("/health/ready")).send().await.ok()?;
        (response.status() == 200).then_some(())
    })
    .await;
    acknowledged += post_events(&stack, &stack.url(""), &user, 5).await;
    let stats = testkit::eventually("every acknowledged event applied", Duration::from_secs(60), || async {
        let stats = stack.stats(&user).await;
        (stats["events_by_type"]["outage"] == acknowledged as i64).then_some(stats)
    })
    .await;
    assert_eq!(stats["events_by_type"]["outage"], acknowledged as i64, "{stats}");
    worker.stop().await;
}

/// PostgreSQL frozen (`SIGSTOP`: its sockets stay open, nothing answers, nothing is refused), the
/// hang that no server-side timeout or TCP keepalive reports: requests get 503 + `Retry-After` within
/// the client-side deadline (`DB_STATEMENT_TIMEOUT_MS` + 1 s) and never past `REQUEST_TIMEOUT`, the api
/// is not ready, and once the server runs again everything recovers and every stored event is applied
/// exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn with_postgres_frozen_requests_get_503_within_the_deadline_and_everything_recovers() {
    let (postgres, stack, worker, user) =
        on_a_private_postgres(&[("DB_STATEMENT_TIMEOUT_MS", "1000"), ("REQUEST_TIMEOUT", "5")]).await;
    let mut acknowledged = 5;

    postgres.freeze();
    // Enough requests to meet every pooled connection (each then hung) and then an empty pool.
    let mut slowest = Duration::ZERO;
    for n in 0..12 {
        let started = Instant::now();
        let response = stack
            .client
            .post(stack.url("/api/v1/events"))
            .json(&json!({"user_id": user, "type": "outage", "data": n}))
            .send()
            .await
            .unwrap();
        let took = started.elapsed();
        slowest = slowest.max(took);
        assert_eq!(response.status(), 503, "request {n}");
        assert!(response.headers().contains_key("retry-after"));
        // The deadline is 2 s; the request timeout 5 s.
        assert!(took < Duration::from_secs(4), "request {n} answered in {took:?}");
    }
    stack.wait_for_readiness(&stack.url(""), 503).await;
    eprintln!(
        "PostgreSQL frozen: 12 writes answered 503, the slowest in {slowest:?} (deadline 2 s, REQUEST_TIMEOUT 5 s)"
    );

    postgres.thaw();
    let thawed = Instant::now();
    testkit::eventually("the api to be ready again", Duration::from_secs(30), || async {
        let response = stack.client.get(stack.url("/health/ready")).send().await.ok()?;
        (response.status() == 200).then_some(())
    })
    .await;
    eprintln!("ready again {:?} after the thaw", thawed.elapsed());
    acknowledged += post_events(&stack, &stack.url(""), &user, 5).await;
    // A 503 is no promise that nothing was written: a statement the frozen server had already
    // received runs when it thaws (the client gave up, the server never knew). So the check is that
    // every stored event, at least every acknowledged one, is applied exactly once.
    let stored =
        stack.get(&format!("/api/v1/events?user_id={user}&type=outage&limit=100")).await["total"].as_i64().unwrap();
    assert!(stored >= acknowledged as i64, "{stored} stored, {acknowledged} acknowledged");
    let stats = testkit::eventually("every stored event applied", Duration::from_secs(60), || async {
        let stats = stack.stats(&user).await;
        (stats["events_by_type"]["outage"] == stored).then_some(stats)
    })
    .await;
    eprintln!("{acknowledged} acknowledged, {stored} stored (written before a 503), all applied once");
    // Applied once each: a double application would overshoot.
    assert_eq!(stats["events_total"], stored, "{stats}");
    worker.stop().await;
}

/// Probes and scrapes read what the background checks sampled: 1,000 scrapes of `/metrics` and
/// 1,000 readiness probes issue no SQL. Counted in the server's own log (`log_statement = all`), so
/// every statement of every session shows, the background's included (the relay's polls, the
/// lease, the once-a-second check), which bound the count.
#[tokio::test(flavor = "multi_thread")]
async fn scrapes_and_probes_issue_no_sql() {
    let postgres = testkit::PrivatePostgres::start();
    postgres.execute("ALTER DATABASE postgres SET log_statement = 'all'");
    let port = postgres.port.to_string();
    let stack = Stack::start(&[("DB_PORT", &port), ("DB_NAME", "postgres"), ("OUTBOX_POLL_INTERVAL_MS", "1000")]).await;
    stack.wait_for_readiness(&stack.url(""), 200).await;
    let statements = || {
        postgres
            .log()
            .lines()
            .filter(|line| line.contains("LOG:  statement:") || line.contains("LOG:  execute "))
            .count()
    };
    let before = statements();
    let started = Instant::now();
    for _ in 0..1000 {
        let response = stack.client.get(stack.url("/metrics")).send().await.unwrap();
        assert_eq!(response.status(), 200);
        let response = stack.client.get(stack.url("/health/ready")).send().await.unwrap();
        assert_eq!(response.status(), 200);
    }
    let took = started.elapsed();
    let during = statements() - before;
    eprintln!("1,000 scrapes and 1,000 probes in {took:?}: {during} statements in all, from the background tasks");
    // The background runs a handful of statements a second (relay poll, lease renewal, the checks of
    // the pool and of the event writer's sessions).
    let background = 10 * (took.as_secs() as usize + 1);
    assert!(during <= background, "{during} statements in {took:?}: scrapes or probes query PostgreSQL");
}
