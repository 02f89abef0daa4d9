//! A whole stack per test: fresh database, private broker, in-process api, workers on demand.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use common::config::Config;
use diesel::QueryableByName;
use diesel::sql_types::BigInt;
use diesel_async::RunQueryDsl;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::OwnedMessage;
use serde_json::{Value, json};
use testkit::{Broker, FaultProxy, Process};
use tokio::process::{Child, Command};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A database, a broker and a running api.
pub struct Stack {
    pub broker: Broker,
    pub vars: HashMap<String, String>,
    pub config: Config,
    pub api: SocketAddr,
    pub client: reqwest::Client,
    primary: Option<ApiHandle>,
}

/// An in-process api replica.
pub struct ApiHandle {
    pub address: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl ApiHandle {
    /// Starts a replica on the stack's database and broker.
    pub async fn start(config: Config) -> Self {
        let vars: HashMap<&str, String> = testkit::auth::vars(&testkit::auth::shared_issuer().server.url).into();
        let auth = common::config::AuthConfig::from_lookup(|name| vars.get(name).cloned()).unwrap();
        let app = api::App::build(config, &auth).await.unwrap();
        let address = app.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(app.run_until_stopped(async {
            let _ = stopped.await;
        }));
        testkit::auth::wait_for_keys(&format!("http://{address}")).await;
        Self { address, stop: Some(stop), task }
    }

    /// Graceful stop (as on SIGTERM).
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(30), &mut self.task).await.unwrap().unwrap().unwrap();
    }
}

/// An in-process worker.
pub struct WorkerHandle {
    pub http: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl WorkerHandle {
    /// Graceful stop (as on SIGTERM); waits until the worker has committed and left its group.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(30), &mut self.task).await.unwrap().unwrap().unwrap();
    }
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    count: i64,
}

impl Stack {
    pub async fn start(overrides: &[(&str, &str)]) -> Self {
        Self::start_on(Broker::start().await, overrides).await
    }

    /// A stack on this broker.
    pub async fn start_on(broker: Broker, overrides: &[(&str, &str)]) -> Self {
        testkit::init_test_logging();
        let mut vars = testkit::service_vars();
        vars.insert("DB_NAME".into(), testkit::create_database().await);
        vars.insert("KAFKA_BROKERS".into(), broker.bootstrap());
        vars.insert("OUTBOX_POLL_INTERVAL_MS".into(), "50".into());
        vars.insert("WORKER_RETRY_BACKOFF_MS".into(), "20".into());
        for (name, value) in overrides {
            vars.insert((*name).into(), (*value).into());
        }
        let config = Config::from_lookup(|name| vars.get(name).cloned()).unwrap();
        // Topics first, as the worker would: a consumer subscribing to a missing topic gets nothing.
        common::kafka::ensure_topics(&config.kafka).await.unwrap();
        let api = ApiHandle::start(config.clone()).await;
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .default_headers(testkit::auth::all_scopes_headers())
            .build()
            .unwrap();
        Self { broker, vars, config, api: api.address, client, primary: Some(api) }
    }

    /// Stops the first api replica (the one started with the stack, which took the publisher lock).
    pub async fn stop_primary_api(&mut self) {
        self.primary.take().expect("primary api running").stop().await;
    }

    pub async fn start_worker(&self) -> WorkerHandle {
        let worker = worker::Worker::build(self.config.clone()).await.unwrap();
        let http = worker.http_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(worker.run_until_stopped(async {
            let _ = stopped.await;
        }));
        WorkerHandle { http, stop: Some(stop), task }
    }

    /// A binary of this workspace (`api` or `worker`) as a child process with the stack's variables
    /// plus `extra`; its stdout lines are collected.
    pub fn spawn_binary(&self, name: &str, extra: &[(&str, &str)]) -> Process {
        // `api` is built next to `worker` (same target directory) when the workspace's tests build.
        let worker = std::path::PathBuf::from(env!("CARGO_BIN_EXE_worker"));
        let path = worker.with_file_name(name);
        let mut vars = self.vars.clone();
        vars.extend(extra.iter().map(|(name, value)| ((*name).to_owned(), (*value).to_owned())));
        Process::spawn(&path, &vars)
    }

    /// The worker binary as a child process (for kill -9).
    pub fn spawn_worker_process(&self) -> Child {
        Command::new(env!("CARGO_BIN_EXE_worker"))
            .env_clear()
            .envs(&self.vars)
            .env("LOG_LEVEL", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    }

    /// Waits until the api process at `api` (`http://host:port`) answers its liveness probe.
    pub async fn wait_live(&self, api: &str) {
        testkit::eventually("the api process to listen", Duration::from_secs(30), || async {
            self.client.get(format!("{api}/health/live")).send().await.ok().filter(|r| r.status() == 200)
        })
        .await;
    }

    /// A metric's value (the first sample whose line starts with `series`) from `base`'s `/metrics`.
    pub async fn metric(&self, base: &str, series: &str) -> Option<f64> {
        let text = self.client.get(format!("{base}/metrics")).send().await.ok()?.text().await.ok()?;
        text.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
    }

    /// Waits until the api at `base` (`http://host:port`) answers its readiness probe with `status`
    /// (readiness reads a background check taken every second, so it follows within about one).
    pub async fn wait_for_readiness(&self, base: &str, status: u16) {
        testkit::eventually(&format!("{base} readiness {status}"), Duration::from_secs(30), || async {
            let response = self.client.get(format!("{base}/health/ready")).send().await.ok()?;
            (response.status().as_u16() == status).then_some(())
        })
        .await;
    }

    /// Whether the worker whose health port is at `base` (`http://host:port`) holds partitions.
    pub async fn holds_partitions(&self, base: &str) -> bool {
        let ready =
            async { self.client.get(format!("{base}/health/ready")).send().await.ok()?.json::<Value>().await.ok() };
        ready.await.is_some_and(|ready| ready["assigned"] == true)
    }

    /// Waits until every worker in `bases` holds partitions.
    pub async fn wait_until_assigned(&self, bases: &[String]) {
        testkit::eventually("every worker to hold partitions", Duration::from_secs(60), || async {
            for base in bases {
                if !self.holds_partitions(base).await {
                    return None;
                }
            }
            Some(())
        })
        .await;
    }

    /// `count` new users; with 8 or more, every partition of a 4-partition topic almost surely gets
    /// one (each is missed with probability (3/4)^count).
    pub async fn create_users(&self, count: usize) -> Vec<String> {
        let mut users = Vec::with_capacity(count);
        for _ in 0..count {
            users.push(self.create_user().await);
        }
        users
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.api, path)
    }

    pub async fn create_user(&self) -> String {
        let response = self
            .client
            .post(self.url("/api/v1/users"))
            .json(&json!({"email": format!("{}@example.com", testkit::unique()), "first_name": "E", "last_name": "T"}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
        response.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned()
    }

    pub async fn post_event(&self, user_id: &str, event_type: &str) -> Value {
        let response = self
            .client
            .post(self.url("/api/v1/events"))
            .json(&json!({"user_id": user_id, "type": event_type, "data": {"n": 1}}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
        response.json().await.unwrap()
    }

    pub async fn get(&self, path: &str) -> Value {
        self.client.get(self.url(path)).send().await.unwrap().json().await.unwrap()
    }

    pub async fn stats(&self, user_id: &str) -> Value {
        self.get(&format!("/api/v1/users/{user_id}/stats")).await
    }

    async fn count(&self, sql: &str) -> i64 {
        let mut conn = testkit::connect(&self.config.database.name).await;
        diesel::sql_query(sql).get_result::<Count>(&mut conn).await.unwrap().count
    }

    /// Rows waiting in the outbox.
    pub async fn outbox_rows(&self) -> i64 {
        self.count("SELECT count(*) AS count FROM outbox").await
    }

    /// A user's stats as served by the api at `api`.
    pub async fn stats_from(&self, api: &str, user_id: &str) -> Value {
        self.client.get(format!("{api}/api/v1/users/{user_id}/stats")).send().await.unwrap().json().await.unwrap()
    }

    /// Events not yet processed.
    pub async fn pending_events(&self) -> i64 {
        self.count("SELECT count(*) AS count FROM events WHERE status = 'pending'").await
    }

    /// Client events the worker has applied.
    pub async fn processed_events(&self) -> i64 {
        self.count("SELECT count(*) AS count FROM events WHERE status = 'processed'").await
    }

    /// Waits until every event is processed (or failed) and the outbox is empty.
    pub async fn wait_until_drained(&self, timeout: Duration) {
        testkit::eventually("every event processed and the outbox drained", timeout, || async {
            let outbox = self.outbox_rows().await;
            (outbox == 0 && self.pending_events().await == 0).then_some(())
        })
        .await;
    }

    /// Sum of every user's processed counters.
    pub async fn counted_total(&self) -> i64 {
        self.count("SELECT coalesce(sum(count), 0)::bigint AS count FROM user_event_stats").await
    }

    /// A consumer of `topic` in a group of its own, from the beginning.
    pub fn reader(&self, topic: &str) -> StreamConsumer {
        let mut config = common::kafka::client_config(&self.config.kafka);
        config
            .set("group.id", format!("reader-{}", testkit::unique()))
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", "6000")
            .set("heartbeat.interval.ms", "1000");
        let consumer: StreamConsumer = config.create().unwrap();
        consumer.subscribe(&[topic]).unwrap();
        consumer
    }
}

/// A proxy on `ip` in front of the test issuer's JWKS server (`AUTH_JWKS_URL` in `vars`), and the
/// `AUTH_JWKS_URL` through it: for binaries in a network namespace, which cannot reach 127.0.0.1.
pub async fn jwks_proxy_at(vars: &HashMap<String, String>, ip: std::net::IpAddr) -> (FaultProxy, String) {
    let rest = vars["AUTH_JWKS_URL"].strip_prefix("http://").expect("the test issuer serves plain HTTP");
    let (upstream, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let proxy = FaultProxy::in_front_of_at(upstream, ip).await;
    let url = format!("http://{}{path}", proxy.addr());
    (proxy, url)
}

/// A proxy in front of the test PostgreSQL server, and the `DB_PORT` that goes through it.
pub async fn postgres_proxy() -> (FaultProxy, String) {
    let vars = testkit::service_vars();
    let proxy = FaultProxy::in_front_of(&format!("{}:{}", vars["DB_HOST"], vars["DB_PORT"])).await;
    let port = proxy.addr().port().to_string();
    (proxy, port)
}

/// Reads until `wanted` matches a message, or panics after `timeout`.
pub async fn read_until(
    consumer: &StreamConsumer,
    timeout: Duration,
    wanted: impl Fn(&OwnedMessage) -> bool,
) -> OwnedMessage {
    tokio::time::timeout(timeout, async {
        loop {
            let message = consumer.recv().await.unwrap().detach();
            if wanted(&message) {
                return message;
            }
        }
    })
    .await
    .expect("the wanted message arrived")
}

pub use worker::lanes::header;
