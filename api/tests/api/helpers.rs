//! `spawn_app()`: the real api on port 0 with its own database and Redis key prefix.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use api::App;
use common::config::Config;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use uuid::Uuid;

/// A running api and what a test needs to talk to it.
pub struct TestApp {
    pub address: SocketAddr,
    pub client: reqwest::Client,
    pub config: Config,
    /// The variables the app was configured with, to start a second replica on the same data.
    pub vars: HashMap<String, String>,
    stop: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
}

/// Where the test services are; overridable with the app's own variables.
fn service_defaults() -> Vec<(&'static str, String)> {
    let env = |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.to_owned());
    vec![
        ("DB_HOST", env("DB_HOST", "127.0.0.1")),
        ("DB_PORT", env("DB_PORT", "5432")),
        ("DB_USER", env("DB_USER", "postgres")),
        ("DB_PASSWORD", env("DB_PASSWORD", "postgres")),
        ("REDIS_HOST", env("REDIS_HOST", "127.0.0.1")),
        ("REDIS_PORT", env("REDIS_PORT", "6379")),
        ("SERVER_HOST", "127.0.0.1".to_owned()),
        ("SERVER_PORT", "0".to_owned()),
        ("DB_POOL_MIN_IDLE", "0".to_owned()),
        ("DB_POOL_MAX_SIZE", "8".to_owned()),
        ("KAFKA_BROKERS", env("KAFKA_BROKERS", "127.0.0.1:9092")),
        ("KAFKA_TOPIC_PARTITIONS", "4".to_owned()),
        ("KAFKA_SESSION_TIMEOUT_MS", "6000".to_owned()),
        ("SHUTDOWN_TIMEOUT", "5".to_owned()),
    ]
}

/// A new, empty database; returns its name. Test databases are dropped by `scripts/test` before a run.
pub async fn create_database() -> String {
    let name = format!("hlms_test_{}", Uuid::new_v4().simple());
    let defaults: HashMap<_, _> = service_defaults().into_iter().collect();
    let url = format!(
        "host={} port={} user={} password={} dbname=postgres",
        defaults["DB_HOST"], defaults["DB_PORT"], defaults["DB_USER"], defaults["DB_PASSWORD"]
    );
    let mut conn = AsyncPgConnection::establish(&url).await.expect("PostgreSQL is reachable");
    diesel::sql_query(format!("CREATE DATABASE {name}")).execute(&mut conn).await.expect("create test database");
    name
}

/// An api with defaults for tests and a fresh database.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(&[]).await
}

/// An api with some variables overridden.
pub async fn spawn_app_with(overrides: &[(&str, &str)]) -> TestApp {
    let mut vars: HashMap<String, String> =
        service_defaults().into_iter().map(|(name, value)| (name.to_owned(), value)).collect();
    vars.insert("DB_NAME".into(), create_database().await);
    vars.insert("REDIS_KEY_PREFIX".into(), format!("test:{}:", Uuid::new_v4().simple()));
    vars.insert("KAFKA_TOPIC".into(), format!("test-{}", Uuid::new_v4().simple()));
    for (name, value) in overrides {
        vars.insert((*name).to_owned(), (*value).to_owned());
    }
    spawn_app_from(vars).await
}

/// Another api process on the same database and Redis prefix (a second replica).
pub async fn spawn_replica(of: &TestApp) -> TestApp {
    let mut vars = of.vars.clone();
    vars.insert("RUN_MIGRATIONS".into(), "false".into());
    spawn_app_from(vars).await
}

/// An api built from exactly these variables.
pub async fn spawn_app_from(vars: HashMap<String, String>) -> TestApp {
    let config = Config::from_lookup(|name| vars.get(name).cloned()).expect("valid test config");
    let app = App::build(config.clone()).await.expect("app builds");
    let address = app.local_addr().expect("bound");
    let (stop, stopped) = oneshot::channel::<()>();
    let handle = tokio::spawn(app.run_until_stopped(async {
        let _ = stopped.await;
    }));
    let client = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().expect("client");
    TestApp { address, client, config, vars, stop: Some(stop), handle: Some(handle) }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.address, path)
    }

    /// Triggers graceful shutdown and waits until `run_until_stopped` returns.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.handle.take().expect("running").await.expect("server task did not panic")
    }

    /// Starts shutdown without waiting for it.
    pub fn begin_stop(&mut self) -> JoinHandle<anyhow::Result<()>> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.handle.take().expect("running")
    }

    pub async fn create_user(&self, email: &str) -> Value {
        let response = self
            .client
            .post(self.url("/api/v1/users"))
            .json(&json!({"email": email, "first_name": "Test", "last_name": "User"}))
            .send()
            .await
            .expect("request sent");
        assert_eq!(response.status(), 201, "create user {email}");
        response.json().await.expect("json body")
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let response = self.client.get(self.url(path)).send().await.expect("request sent");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    pub async fn put(&self, path: &str, body: Value) -> (u16, Value) {
        let response = self.client.put(self.url(path)).json(&body).send().await.expect("request sent");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    pub async fn delete(&self, path: &str) -> u16 {
        self.client.delete(self.url(path)).send().await.expect("request sent").status().as_u16()
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(handle) = &self.handle {
            handle.abort();
        }
    }
}

/// A unique email for this test run.
pub fn unique_email(tag: &str) -> String {
    format!("{tag}-{}@example.com", Uuid::new_v4().simple())
}

/// Asserts an error body has the contract's shape and returns its `code`.
pub fn error_code(body: &Value) -> &str {
    assert!(body["error"].as_str().is_some_and(|message| !message.is_empty()), "error message in {body}");
    assert!(body["request_id"].as_str().is_some_and(|id| !id.is_empty()), "request_id in {body}");
    body["code"].as_str().expect("code")
}

/// A local port with nothing listening on it.
pub fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}
