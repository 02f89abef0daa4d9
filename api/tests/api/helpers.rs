//! `spawn_app()`: the real api on port 0 with its own database and Redis key prefix.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use api::App;
use common::config::{AuthConfig, Config};
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

pub use testkit::{closed_port, create_database};

/// An api with defaults for tests and a fresh database.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(&[]).await
}

/// An api with some variables overridden.
pub async fn spawn_app_with(overrides: &[(&str, &str)]) -> TestApp {
    spawn_app_from(vars_with(overrides).await).await
}

/// The test defaults with a fresh database and these overrides.
async fn vars_with(overrides: &[(&str, &str)]) -> HashMap<String, String> {
    let mut vars = testkit::service_vars();
    vars.insert("DB_NAME".into(), create_database().await);
    for (name, value) in overrides {
        vars.insert((*name).to_owned(), (*value).to_owned());
    }
    vars
}

/// Another api process on the same database and Redis prefix (a second replica).
pub async fn spawn_replica(of: &TestApp) -> TestApp {
    let mut vars = of.vars.clone();
    vars.insert("RUN_MIGRATIONS".into(), "false".into());
    spawn_app_from(vars).await
}

/// An api built from exactly these variables, once it has loaded its issuer's keys.
pub async fn spawn_app_from(vars: HashMap<String, String>) -> TestApp {
    let app = start_app(vars).await;
    testkit::auth::wait_for_keys(&app.url("")).await;
    app
}

/// An api with some variables overridden, without waiting for its issuer's keys.
pub async fn spawn_app_unready(overrides: &[(&str, &str)]) -> TestApp {
    start_app(vars_with(overrides).await).await
}

async fn start_app(vars: HashMap<String, String>) -> TestApp {
    let config = Config::from_lookup(|name| vars.get(name).cloned()).expect("valid test config");
    let auth = AuthConfig::from_lookup(|name| vars.get(name).cloned()).expect("valid test auth config");
    let app = App::build(config.clone(), &auth).await.expect("app builds");
    let address = app.local_addr().expect("bound");
    let (stop, stopped) = oneshot::channel::<()>();
    let handle = tokio::spawn(app.run_until_stopped(async {
        let _ = stopped.await;
    }));
    let client = client_with_token(&testkit::auth::token(testkit::auth::ALL_SCOPES));
    TestApp { address, client, config, vars, stop: Some(stop), handle: Some(handle) }
}

/// A client that sends `Authorization: Bearer <token>` on every request.
pub fn client_with_token(token: &str) -> reqwest::Client {
    let headers = testkit::auth::bearer_headers(token);
    reqwest::Client::builder().timeout(Duration::from_secs(30)).default_headers(headers).build().expect("client")
}

/// `Authorization: Bearer <token granting every scope>\r\n`, for tests that write HTTP by hand.
pub fn authorization_line() -> String {
    format!("Authorization: Bearer {}\r\n", testkit::auth::token(testkit::auth::ALL_SCOPES))
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

    /// Waits until exactly `requests` hold an in-flight permit (as `/metrics` samples it).
    pub async fn wait_for_in_flight(&self, requests: usize) {
        let wanted = format!("http_requests_in_flight {requests}\n");
        testkit::eventually(&format!("{requests} requests in flight"), Duration::from_secs(5), || async {
            let metrics = self.client.get(self.url("/metrics")).send().await.ok()?.text().await.ok()?;
            metrics.contains(&wanted).then_some(())
        })
        .await;
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
