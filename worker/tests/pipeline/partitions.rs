//! Real network partitions (SPEC §3): a binary runs in a network namespace of its own and the test
//! drops its packets to one dependency with nftables. Nothing is closed or refused, so only the
//! service's own deadlines can notice. For each: what clients see while it lasts, and full recovery
//! with nothing lost or applied twice once it heals.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use testkit::{Broker, FaultProxy, Netns, Process};

use crate::helpers::{Stack, jwks_proxy_at};

/// A stack whose broker, PostgreSQL, Redis and JWKS are also reachable from a network namespace, over
/// its link, each through a port of its own that the test can partition.
struct Isolated {
    netns: Netns,
    postgres: FaultProxy,
    redis: FaultProxy,
    /// Keeps the proxy to the test issuer's keys running.
    _jwks: FaultProxy,
    jwks_url: String,
    stack: Stack,
}

impl Isolated {
    async fn start(overrides: &[(&str, &str)]) -> Self {
        let netns = Netns::create();
        let host = IpAddr::V4(netns.host_ip());
        let stack = Stack::start_on(Broker::start_at(host).await, overrides).await;
        let upstream = |host: &str, port: &str| format!("{}:{}", stack.vars[host], stack.vars[port]);
        let postgres = FaultProxy::in_front_of_at(&upstream("DB_HOST", "DB_PORT"), host).await;
        let redis = FaultProxy::in_front_of_at(&upstream("REDIS_HOST", "REDIS_PORT"), host).await;
        let (jwks, jwks_url) = jwks_proxy_at(&stack.vars, host).await;
        Self { netns, postgres, redis, _jwks: jwks, jwks_url, stack }
    }

    /// A binary of the workspace inside the namespace, its HTTP port on the namespace's address.
    fn spawn(&self, name: &str, extra: &[(&str, &str)]) -> (Process, String) {
        let port = testkit::closed_port().to_string();
        let host = self.netns.host_ip().to_string();
        let mut vars = self.stack.vars.clone();
        for (name, value) in [
            ("DB_HOST", host.clone()),
            ("DB_PORT", self.postgres.addr().port().to_string()),
            ("REDIS_HOST", host.clone()),
            ("REDIS_PORT", self.redis.addr().port().to_string()),
            ("AUTH_JWKS_URL", self.jwks_url.clone()),
            ("SERVER_HOST", "0.0.0.0".to_owned()),
            ("SERVER_PORT", port.clone()),
            ("WORKER_HTTP_PORT", port.clone()),
            ("RUN_MIGRATIONS", "false".to_owned()),
        ] {
            vars.insert(name.to_owned(), value);
        }
        vars.extend(extra.iter().map(|(name, value)| ((*name).to_owned(), (*value).to_owned())));
        let binary = std::path::PathBuf::from(env!("CARGO_BIN_EXE_worker")).with_file_name(name);
        let process = Process::spawn_command(self.netns.command(&binary), &vars);
        (process, format!("http://{}:{port}", self.netns.ip()))
    }

    /// An api inside the namespace, once it is ready.
    async fn spawn_api(&self, extra: &[(&str, &str)]) -> (Process, String) {
        let (process, api) = self.spawn("api", extra);
        self.stack.wait_for_readiness(&api, 200).await;
        (process, api)
    }

    async fn create_user(&self, api: &str) -> String {
        let body = json!({"email": format!("{}@example.com", testkit::unique()), "first_name": "N", "last_name": "S"});
        let response = self.stack.client.post(format!("{api}/api/v1/users")).json(&body).send().await.unwrap();
        assert_eq!(response.status(), 201);
        response.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned()
    }

    /// Posts `count` events, each acknowledged.
    async fn post_events(&self, api: &str, user: &str, count: usize) {
        for n in 0..count {
            let body = json!({"user_id": user, "type": "partition", "data": n});
            let response = self.stack.client.post(format!("{api}/api/v1/events")).json(&body).send().await.unwrap();
            assert_eq!(response.status(), 201);
        }
    }

    /// Waits until nothing is pending or unpublished, then checks (through the api at `api`) that
    /// every stored event of `user` was counted exactly once.
    async fn assert_applied_once(&self, api: &str, user: &str, at_least: i64) {
        self.stack.wait_until_drained(Duration::from_secs(90)).await;
        let events = format!("{api}/api/v1/events?user_id={user}&limit=100");
        let stored: Value = self.stack.client.get(events).send().await.unwrap().json().await.unwrap();
        let stored = stored["total"].as_i64().unwrap();
        assert!(stored >= at_least, "{stored} events stored, {at_least} acknowledged");
        let stats = self.stack.stats_from(api, user).await;
        assert_eq!(stats["events_total"], stored, "{stats}");
    }
}

/// api ↔ PostgreSQL dropped: writes get 503 + `Retry-After` within the client-side deadline (never
/// near `REQUEST_TIMEOUT`), the api is not ready; healed, it is ready again and every stored event is
/// applied once.
#[tokio::test(flavor = "multi_thread")]
async fn api_cut_from_postgres_answers_503_within_the_deadline_and_recovers() {
    let env = Isolated::start(&[]).await;
    let worker = env.stack.start_worker().await;
    let limits = [
        ("DB_STATEMENT_TIMEOUT_MS", "1000"),
        ("DB_POOL_TIMEOUT_MS", "1000"),
        ("DB_CONNECT_TIMEOUT", "2"),
        ("REQUEST_TIMEOUT", "5"),
    ];
    let (_api_process, api) = env.spawn_api(&limits).await;
    let user = env.create_user(&api).await;
    env.post_events(&api, &user, 3).await;

    env.netns.partition(env.postgres.addr().port());
    let mut slowest = Duration::ZERO;
    for n in 0..8 {
        let started = Instant::now();
        let body = json!({"user_id": user, "type": "partition", "data": n});
        let response = env.stack.client.post(format!("{api}/api/v1/events")).json(&body).send().await.unwrap();
        let took = started.elapsed();
        slowest = slowest.max(took);
        assert_eq!(response.status(), 503, "write {n}");
        assert_eq!(response.headers()["retry-after"], "1");
        assert!(took < Duration::from_secs(4), "write {n} answered in {took:?}");
    }
    env.stack.wait_for_readiness(&api, 503).await;

    env.netns.heal(env.postgres.addr().port());
    let healed = Instant::now();
    env.stack.wait_for_readiness(&api, 200).await;
    let recovery = healed.elapsed();
    env.post_events(&api, &user, 3).await;
    env.assert_applied_once(&api, &user, 6).await;
    eprintln!(
        "api cut from PostgreSQL: 8 writes 503, the slowest in {slowest:?} (deadline 2 s); ready {recovery:?} after the heal"
    );
    worker.stop().await;
}

/// api ↔ Redis dropped: every request is still served from PostgreSQL, each within a bound set by
/// `REDIS_TIMEOUT_MS`, and `/health` says Redis is down; healed, a write made during the partition
/// reaches the cache, so the other replica stops serving the previous state.
#[tokio::test(flavor = "multi_thread")]
async fn api_cut_from_redis_serves_every_request_and_the_cache_catches_up() {
    let env = Isolated::start(&[]).await;
    let (_api_process, api) = env.spawn_api(&[("REDIS_TIMEOUT_MS", "200")]).await;
    let user = env.create_user(&api).await;
    let user_url = |base: &str| format!("{base}/api/v1/users/{user}");
    // Cached by both replicas' reads.
    let cached: Value = env.stack.client.get(user_url(&api)).send().await.unwrap().json().await.unwrap();
    assert_eq!(cached["first_name"], "N");

    env.netns.partition(env.redis.addr().port());
    let mut slowest = Duration::ZERO;
    for n in 0..6 {
        let started = Instant::now();
        let name = format!("during-{n}");
        let put = env.stack.client.put(user_url(&api)).json(&json!({"first_name": name})).send().await.unwrap();
        assert_eq!(put.status(), 200);
        let get: Value = env.stack.client.get(user_url(&api)).send().await.unwrap().json().await.unwrap();
        assert_eq!(get["first_name"], name.as_str(), "the partitioned replica reads what it wrote");
        slowest = slowest.max(started.elapsed());
    }
    assert!(slowest < Duration::from_secs(3), "a PUT and a GET took {slowest:?}");
    let health: Value = env.stack.client.get(format!("{api}/health")).send().await.unwrap().json().await.unwrap();
    assert_ne!(health["checks"]["redis"]["status"], "up", "{health}");

    env.netns.heal(env.redis.addr().port());
    let healed = Instant::now();
    testkit::eventually("the other replica to serve the last write", Duration::from_secs(30), || async {
        let get: Value = env
            .stack
            .client
            .get(env.stack.url(&format!("/api/v1/users/{user}")))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        (get["first_name"] == "during-5").then_some(())
    })
    .await;
    eprintln!(
        "api cut from Redis: a PUT + GET pair took at most {slowest:?} (REDIS_TIMEOUT_MS 200); the cache caught up {:?} after the heal",
        healed.elapsed()
    );
}

/// The publishing api cut from Kafka while another replica still reaches it: its writes stay fast
/// (they never wait on Kafka), it stops renewing the publisher's lease because nothing is
/// acknowledged, and the other replica publishes everything within `OUTBOX_TAKEOVER_TIMEOUT` and a
/// quarter. Healed, nothing is lost or applied twice.
#[tokio::test(flavor = "multi_thread")]
async fn a_publisher_cut_from_kafka_hands_the_outbox_to_a_replica_that_reaches_it() {
    let mut env = Isolated::start(&[("OUTBOX_TAKEOVER_TIMEOUT", "4")]).await;
    env.stack.stop_primary_api().await;
    let worker = env.stack.start_worker().await;
    let (_publisher_process, publisher) = env.spawn_api(&[("OUTBOX_TAKEOVER_TIMEOUT", "4")]).await;
    testkit::eventually("the api in the namespace to publish", Duration::from_secs(30), || async {
        (env.stack.metric(&publisher, "outbox_publishing").await == Some(1.0)).then_some(())
    })
    .await;
    let other = crate::helpers::ApiHandle::start(env.stack.config.clone()).await;
    let user = env.create_user(&publisher).await;
    env.post_events(&publisher, &user, 3).await;
    env.stack.wait_until_drained(Duration::from_secs(60)).await;

    let kafka_port = env.stack.broker.proxy.addr().port();
    env.netns.partition(kafka_port);
    let cut = Instant::now();
    let started = Instant::now();
    env.post_events(&publisher, &user, 10).await;
    let writes_took = started.elapsed();
    testkit::eventually("the other replica to publish the outbox", Duration::from_secs(60), || async {
        (env.stack.outbox_rows().await == 0).then_some(())
    })
    .await;
    let takeover = cut.elapsed();
    assert!(writes_took < Duration::from_secs(2), "10 writes took {writes_took:?} with Kafka cut");
    assert!(takeover < Duration::from_secs(6), "published {takeover:?} after the cut");
    assert_eq!(env.stack.metric(&format!("http://{}", other.address), "outbox_publishing").await, Some(1.0));

    env.netns.heal(kafka_port);
    env.post_events(&publisher, &user, 3).await;
    env.assert_applied_once(&publisher, &user, 16).await;
    eprintln!(
        "publisher cut from Kafka: 10 writes in {writes_took:?}; the other replica published {takeover:?} after the cut (OUTBOX_TAKEOVER_TIMEOUT 4 s)"
    );
    other.stop().await;
    worker.stop().await;
}

/// worker ↔ PostgreSQL dropped: the worker's lanes give up on each attempt at the deadline and retry
/// without committing offsets; healed, it applies the backlog, each event once.
#[tokio::test(flavor = "multi_thread")]
async fn worker_cut_from_postgres_retries_and_applies_everything_once_when_healed() {
    let env = Isolated::start(&[]).await;
    let limits = [("DB_STATEMENT_TIMEOUT_MS", "1000"), ("DB_POOL_TIMEOUT_MS", "1000"), ("DB_CONNECT_TIMEOUT", "2")];
    let (worker_process, worker) = env.spawn("worker", &limits);
    testkit::eventually("the worker in the namespace to hold partitions", Duration::from_secs(60), || async {
        let ready: Value =
            env.stack.client.get(format!("{worker}/health/ready")).send().await.ok()?.json().await.ok()?;
        (ready["assigned"] == true).then_some(())
    })
    .await;
    let user = env.stack.create_user().await;
    for _ in 0..3 {
        env.stack.post_event(&user, "partition").await;
    }
    env.stack.wait_until_drained(Duration::from_secs(60)).await;

    env.netns.partition(env.postgres.addr().port());
    for _ in 0..10 {
        env.stack.post_event(&user, "partition").await;
    }
    worker_process.line_containing("database unavailable; retrying", Duration::from_secs(30)).await;
    assert!(env.stack.pending_events().await > 0, "nothing can be applied while the worker is cut off");

    env.netns.heal(env.postgres.addr().port());
    let healed = Instant::now();
    env.assert_applied_once(&env.stack.url(""), &user, 13).await;
    eprintln!("worker cut from PostgreSQL: the backlog applied {:?} after the heal", healed.elapsed());
}

/// worker ↔ Kafka dropped while a second worker runs: the group notices within the session timeout
/// and the other worker takes the partitions over, so events keep being applied; healed, the cut
/// worker rejoins and everything is applied once.
#[tokio::test(flavor = "multi_thread")]
async fn worker_cut_from_kafka_loses_its_partitions_to_the_other_and_rejoins() {
    let env = Isolated::start(&[]).await;
    let host_worker = env.stack.start_worker().await;
    let (_worker_process, worker) = env.spawn("worker", &[]);
    env.stack.wait_until_assigned(&[worker.clone(), format!("http://{}", host_worker.http)]).await;
    let users = env.stack.create_users(8).await;

    let kafka_port = env.stack.broker.proxy.addr().port();
    env.netns.partition(kafka_port);
    let cut = Instant::now();
    for user in &users {
        for _ in 0..3 {
            env.stack.post_event(user, "partition").await;
        }
    }
    env.stack.wait_until_drained(Duration::from_secs(90)).await;
    let drained = cut.elapsed();

    env.netns.heal(kafka_port);
    let healed = Instant::now();
    let consumed_before = env.stack.metric(&worker, "worker_events_consumed_total").await.unwrap_or(0.0);
    testkit::eventually("the cut worker to rejoin and consume again", Duration::from_secs(90), || async {
        // Events keep coming until the rejoined worker has been given partitions and consumed some.
        env.stack.post_event(&users[0], "partition").await;
        for user in &users[1..] {
            env.stack.post_event(user, "partition").await;
        }
        let consumed = env.stack.metric(&worker, "worker_events_consumed_total").await?;
        (consumed > consumed_before).then_some(())
    })
    .await;
    let rejoined = healed.elapsed();
    env.stack.wait_until_drained(Duration::from_secs(90)).await;
    for user in &users {
        let stored =
            env.stack.get(&format!("/api/v1/events?user_id={user}&limit=100")).await["total"].as_i64().unwrap();
        assert_eq!(env.stack.stats(user).await["events_total"], stored, "{user}");
    }
    eprintln!(
        "worker cut from Kafka: everything applied by the other worker {drained:?} after the cut (session timeout 6 s); the cut one consumed again {rejoined:?} after the heal"
    );
    host_worker.stop().await;
}
