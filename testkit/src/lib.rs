//! Test support shared by the integration tests of `api` and `worker`: where the real services are,
//! fresh databases, a private tansu broker reachable through a proxy that can cut the network, and a
//! token issuer with a real JWKS endpoint ([`auth`]).

#![expect(clippy::unwrap_used, reason = "test support: a panic is how a test reports failure")]

pub mod auth;
mod broker;
mod netns;
pub mod otlp;
mod postgres;
mod process;
mod proxy;
pub mod redis;
pub mod tls;

use std::collections::HashMap;
use std::time::Duration;

use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

pub use broker::Broker;
pub use netns::Netns;
pub use postgres::PrivatePostgres;
pub use process::Process;
pub use proxy::FaultProxy;

/// Variables that point an app at the local test services (each overridable from the environment)
/// and make it trust the process's [`auth::shared_issuer`].
pub fn service_vars() -> HashMap<String, String> {
    let env = |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.to_owned());
    let auth = auth::vars(&auth::shared_issuer().server.url);
    [
        ("DB_HOST", env("DB_HOST", "127.0.0.1")),
        ("DB_PORT", env("DB_PORT", "5432")),
        // The binaries run as a role with DML only; migrations run as the server's superuser.
        ("DB_USER", RUNTIME_ROLE.to_owned()),
        ("DB_PASSWORD", "not-checked-by-trust-auth".to_owned()),
        ("DB_MIGRATION_USER", env("DB_USER", "postgres")),
        ("DB_MIGRATION_PASSWORD", env("DB_PASSWORD", "postgres")),
        ("REDIS_HOST", env("REDIS_HOST", "127.0.0.1")),
        ("REDIS_PORT", env("REDIS_PORT", "6379")),
        ("KAFKA_BROKERS", env("KAFKA_BROKERS", "127.0.0.1:9092")),
        ("SERVER_HOST", "127.0.0.1".to_owned()),
        ("SERVER_PORT", "0".to_owned()),
        ("WORKER_HTTP_PORT", "0".to_owned()),
        ("DB_POOL_MIN_IDLE", "0".to_owned()),
        ("DB_POOL_MAX_SIZE", "8".to_owned()),
        ("KAFKA_TOPIC_PARTITIONS", "4".to_owned()),
        ("KAFKA_SESSION_TIMEOUT_MS", "6000".to_owned()),
        ("SHUTDOWN_TIMEOUT", "5".to_owned()),
        ("REDIS_KEY_PREFIX", format!("test:{}:", unique())),
        ("KAFKA_TOPIC", format!("test-{}", unique())),
        ("KAFKA_GROUP_ID", format!("test-{}", unique())),
    ]
    .into_iter()
    .chain(auth)
    .map(|(name, value)| (name.to_owned(), value))
    .collect()
}

/// A short unique token for names.
pub fn unique() -> String {
    Uuid::new_v4().simple().to_string()
}

/// The role the binaries run as in tests: it may read and write the service's tables, nothing more
/// (`api migrate` grants it that). [`create_database`] makes sure it exists.
pub const RUNTIME_ROLE: &str = "hlms_app";

/// A libpq connection string to `database` on the test server, as the superuser that owns the
/// schema (tests set up and inspect what the service cannot).
pub fn connection_string(database: &str) -> String {
    let vars = service_vars();
    format!(
        "host={} port={} user={} password={} dbname={database}",
        vars["DB_HOST"], vars["DB_PORT"], vars["DB_MIGRATION_USER"], vars["DB_MIGRATION_PASSWORD"]
    )
}

/// Connects to a test database as its owner.
pub async fn connect(database: &str) -> AsyncPgConnection {
    AsyncPgConnection::establish(&connection_string(database)).await.unwrap()
}

/// Creates [`RUNTIME_ROLE`] on the server `conn` is connected to, unless it exists. Concurrent
/// tests may race to create it; the loser's error is the proof it exists.
pub async fn ensure_runtime_role(conn: &mut AsyncPgConnection) {
    diesel::sql_query(format!(
        "DO $$ BEGIN CREATE ROLE {RUNTIME_ROLE} LOGIN; \
         EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$"
    ))
    .execute(conn)
    .await
    .unwrap();
}

/// A new, empty database (`hlms_test_*`, dropped by `scripts/test` before the next run).
pub async fn create_database() -> String {
    create_database_named(&format!("hlms_test_{}", unique())).await
}

/// A new, empty database with this name.
pub async fn create_database_named(name: &str) -> String {
    let mut conn = connect("postgres").await;
    ensure_runtime_role(&mut conn).await;
    diesel::sql_query(format!("CREATE DATABASE {name}")).execute(&mut conn).await.unwrap();
    name.to_owned()
}

/// Drops a database, closing whatever is still connected to it.
pub async fn drop_database(name: &str) {
    let mut conn = connect("postgres").await;
    diesel::sql_query(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(&mut conn).await.unwrap();
}

/// Waits until something listens on 127.0.0.1:`port` (a server the test started), or panics naming
/// `what` after 10 s.
pub async fn wait_until_listening(port: u16, what: &str) {
    eventually(&format!("{what} listening on port {port}"), Duration::from_secs(10), || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok().map(drop)
    })
    .await;
}

/// A local port with nothing listening on it.
pub fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// Polls `check` until it returns `Some`, or panics with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// With `TEST_LOG` set (e.g. `TEST_LOG=info,worker=debug`), the app's logs go to the test output.
pub fn init_test_logging() {
    if let Ok(filter) = std::env::var("TEST_LOG") {
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
    }
}

#[derive(diesel::QueryableByName)]
struct PlanCacheMode {
    #[diesel(sql_type = diesel::sql_types::Text)]
    plan_cache_mode: String,
}

/// The session's `plan_cache_mode`, as the server reports it.
pub async fn plan_cache_mode(conn: &mut AsyncPgConnection) -> Result<String, diesel::result::Error> {
    use diesel_async::RunQueryDsl;
    let setting: PlanCacheMode = diesel::sql_query("SHOW plan_cache_mode").get_result(conn).await?;
    Ok(setting.plan_cache_mode)
}
