//! Transport security and least privilege (SPEC §9): PostgreSQL and Redis over TLS against servers
//! whose certificates a CA made by the test issued; the refusals (another CA, another name, a
//! plain-text server under a TLS mode), each a clear error and never a silent downgrade; and the
//! limits of the runtime role the whole suite runs as.

use std::collections::HashMap;
use std::time::Duration;

use common::config::{Config, DatabaseConfig};
use common::postgres::Connector;
use diesel::sql_types::Bool;
use diesel_async::RunQueryDsl;
use serde_json::json;
use testkit::PrivatePostgres;
use testkit::redis::PrivateRedis;
use testkit::tls::TestCa;

use crate::helpers::{spawn_app_from, unique_email};

/// `DB_*` for a private server: `host` is what the client dials (and checks the name of).
fn database(server: &PrivatePostgres, host: &str, tls: &[(&str, &str)]) -> DatabaseConfig {
    let mut vars: HashMap<String, String> = [
        ("DB_HOST", host.to_owned()),
        ("DB_PORT", server.port.to_string()),
        ("DB_USER", "postgres".to_owned()),
        ("DB_NAME", "postgres".to_owned()),
        ("DB_CONNECT_TIMEOUT", "3".to_owned()),
    ]
    .into_iter()
    .map(|(name, value)| (name.to_owned(), value))
    .collect();
    vars.extend(tls.iter().map(|(name, value)| ((*name).to_owned(), (*value).to_owned())));
    Config::from_lookup(|name| vars.get(name).cloned()).unwrap().database
}

/// Connects; `Ok(whether the session is encrypted)` as the server sees it, or the error's text.
async fn session_encrypted(config: &DatabaseConfig) -> Result<bool, String> {
    let mut conn = Connector::new(config, "test").unwrap().connect().await.map_err(|err| err.to_string())?;
    Ok(diesel::select(diesel::dsl::sql::<Bool>("(SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid())"))
        .get_result(&mut conn)
        .await
        .unwrap())
}

/// (host dialled, `DB_SSLMODE`, `DB_SSLROOTCERT`, encrypted or the error's telling part).
type Case<'a> = (&'a str, &'a str, Option<&'a str>, Result<bool, &'a str>);

#[tokio::test(flavor = "multi_thread")]
async fn postgres_tls_modes_verify_as_libpq_does() {
    let ca = TestCa::new("postgres");
    let other_ca = TestCa::new("someone else");
    let server = PrivatePostgres::start_with_tls(&ca.server_cert(&["localhost"]));
    let (ours, theirs) = (ca.ca_file(), other_ca.ca_file());
    let (ours, theirs) = (ours.to_str().unwrap(), theirs.to_str().unwrap());
    let cases: [Case; 13] = [
        ("localhost", "verify-full", Some(ours), Ok(true)),
        ("127.0.0.1", "verify-full", Some(theirs), Err("invalid peer certificate: UnknownIssuer")),
        ("127.0.0.1", "verify-full", Some(ours), Err("certificate not valid for name \"127.0.0.1\"")),
        ("localhost", "verify-full", Some(theirs), Err("invalid peer certificate: UnknownIssuer")),
        ("127.0.0.1", "verify-ca", Some(ours), Ok(true)),
        ("localhost", "verify-ca", Some(theirs), Err("invalid peer certificate: UnknownIssuer")),
        // Another name does not excuse another CA (verify-ca skips only the name check).
        ("127.0.0.1", "verify-ca", Some(theirs), Err("invalid peer certificate: UnknownIssuer")),
        // libpq: `require` with a root certificate checks the chain, as verify-ca does.
        ("127.0.0.1", "require", Some(ours), Ok(true)),
        ("localhost", "require", Some(theirs), Err("invalid peer certificate: UnknownIssuer")),
        ("127.0.0.1", "require", Some(theirs), Err("invalid peer certificate: UnknownIssuer")),
        ("127.0.0.1", "require", None, Ok(true)),
        ("127.0.0.1", "prefer", None, Ok(true)),
        ("localhost", "disable", None, Ok(false)),
    ];
    for (host, mode, root, expected) in cases {
        let mut tls = vec![("DB_SSLMODE", mode)];
        tls.extend(root.map(|root| ("DB_SSLROOTCERT", root)));
        let outcome = session_encrypted(&database(&server, host, &tls)).await;
        let case = format!("{host} {mode} {root:?}: {outcome:?}\n{}", server.log());
        match expected {
            Ok(encrypted) => assert_eq!(outcome, Ok(encrypted), "{case}"),
            Err(needle) => {
                let error = outcome.as_ref().expect_err(&case);
                assert!(error.contains(needle), "{case}");
                let target = format!("postgres at {host}:{}/postgres", server.port);
                assert!(error.starts_with(&target), "the error names the database: {case}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tls_mode_never_falls_back_to_a_plain_text_server() {
    let ca = TestCa::new("postgres");
    let server = PrivatePostgres::start();
    let root = ca.ca_file();
    for mode in ["require", "verify-ca", "verify-full"] {
        let config =
            database(&server, "localhost", &[("DB_SSLMODE", mode), ("DB_SSLROOTCERT", root.to_str().unwrap())]);
        let error = session_encrypted(&config).await.expect_err(mode);
        assert!(error.contains("server does not support TLS"), "{mode}: {error}");
    }
    // `prefer` is the one mode that may: libpq's meaning.
    assert_eq!(session_encrypted(&database(&server, "localhost", &[("DB_SSLMODE", "prefer")])).await, Ok(false));
}

/// The test defaults pointed at a private PostgreSQL, whose own `postgres` database the api uses.
fn vars_for(server: &PrivatePostgres, overrides: &[(&str, &str)]) -> HashMap<String, String> {
    let mut vars = testkit::service_vars();
    vars.insert("DB_PORT".into(), server.port.to_string());
    vars.insert("DB_NAME".into(), "postgres".into());
    vars.insert("DB_POOL_TIMEOUT_MS".into(), "1000".into());
    vars.extend(overrides.iter().map(|(name, value)| ((*name).to_owned(), (*value).to_owned())));
    vars
}

#[tokio::test(flavor = "multi_thread")]
async fn the_api_serves_over_verified_tls_and_refuses_a_certificate_for_another_host() {
    let ca = TestCa::new("postgres");
    let server = PrivatePostgres::start_with_tls(&ca.server_cert(&["localhost"]));
    let root = ca.ca_file();
    let tls = [("DB_SSLMODE", "verify-full"), ("DB_SSLROOTCERT", root.to_str().unwrap())];

    // Verified: migrations (as the owner) and requests (as the runtime role) go over TLS.
    let app = spawn_app_from(vars_for(&server, &[&tls[..], &[("DB_HOST", "localhost")]].concat())).await;
    let email = unique_email("tls");
    let created = app.create_user(&email).await;
    let (status, body) = app.get(&format!("/api/v1/users/{}", created["id"].as_str().unwrap())).await;
    assert_eq!((status, body["email"].as_str()), (200, Some(email.as_str())));
    drop(app);

    // The same server dialled by an address its certificate does not name: the binary stops at start
    // (migrations), saying which database and why.
    let vars = vars_for(&server, &[&tls[..], &[("DB_HOST", "127.0.0.1"), ("LOG_FORMAT", "json")]].concat());
    let output =
        tokio::process::Command::new(env!("CARGO_BIN_EXE_api")).env_clear().envs(&vars).output().await.unwrap();
    assert!(!output.status.success());
    let said = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    let target = format!("postgres at 127.0.0.1:{}/postgres", server.port);
    assert!(said.contains(&target) && said.contains("certificate not valid for name"), "{said}");

    // Without migrations at start it runs, but is not ready, and a log line says why.
    let mut vars = vars;
    vars.insert("RUN_MIGRATIONS".into(), "false".into());
    // A free port may be taken by another test's server before this api binds it: then the api exits,
    // and the probes below would reach the other server. Another port, then.
    let (port, process) = loop {
        let port = testkit::closed_port();
        vars.insert("SERVER_PORT".into(), port.to_string());
        let mut process = testkit::Process::spawn(env!("CARGO_BIN_EXE_api").as_ref(), &vars);
        let bound = testkit::eventually("the api listening or gone", Duration::from_secs(10), || {
            let exited = process.child.try_wait().ok().flatten().is_some();
            let listening = process.output().iter().any(|line| line.contains("api listening"));
            async move { (exited || listening).then_some(listening) }
        })
        .await;
        if bound {
            break (port, process);
        }
    };
    // Once its issuer's keys are loaded, PostgreSQL alone keeps it from being ready.
    let url = |path: &str| format!("http://127.0.0.1:{port}{path}");
    testkit::eventually("the api answering with its keys loaded", Duration::from_secs(10), || async {
        let health: serde_json::Value = reqwest::get(url("/health")).await.ok()?.json().await.ok()?;
        (health["checks"]["jwks"]["status"] == "up").then_some(())
    })
    .await;
    assert_eq!(reqwest::get(url("/health/ready")).await.unwrap().status(), 503);
    let line = process.line_containing("cannot connect to PostgreSQL", Duration::from_secs(10)).await;
    let line: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(line["dependency"], json!("postgres"));
    assert_eq!(line["level"], json!("ERROR"));
    assert!(line["error"].as_str().unwrap().contains("certificate not valid for name"), "{line}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_runtime_role_has_dml_only() {
    let app = crate::helpers::spawn_app().await;
    assert_eq!(app.config.database.user, testkit::RUNTIME_ROLE);
    let mut conn = Connector::new(&app.config.database, "test").unwrap().connect().await.unwrap();
    for statement in [
        "DROP TABLE users",
        "ALTER TABLE users ADD COLUMN nickname text",
        "TRUNCATE events",
        "CREATE TABLE scratch (id int)",
        "DELETE FROM __diesel_schema_migrations",
        "CREATE INDEX ON users (last_name)",
    ] {
        let error = diesel::sql_query(statement).execute(&mut conn).await.expect_err(statement).to_string();
        assert!(error.contains("permission denied") || error.contains("must be owner"), "{statement}: {error}");
    }
    // What the service does, it may.
    let email = unique_email("dml");
    diesel::sql_query(format!(
        "INSERT INTO users (id, email, first_name, last_name, version, created_at, updated_at) \
         VALUES (gen_random_uuid(), '{email}', 'D', 'M', 1, now(), now())"
    ))
    .execute(&mut conn)
    .await
    .unwrap();
    assert_eq!(diesel::sql_query(format!("DELETE FROM users WHERE email = '{email}'")).execute(&mut conn).await, Ok(1));
}

/// Points `vars` at the private TLS server `redis` (its certificate issued by `ca`), as the ACL user
/// `hlms` with the password `s3cret`.
fn use_tls_redis(vars: &mut HashMap<String, String>, ca: &TestCa, redis: &PrivateRedis) {
    for (name, value) in [
        ("REDIS_HOST", "localhost".to_owned()),
        ("REDIS_PORT", redis.port.to_string()),
        ("REDIS_TLS", "true".to_owned()),
        ("REDIS_CA_CERT", ca.ca_file().to_str().unwrap().to_owned()),
        ("REDIS_USERNAME", "hlms".to_owned()),
        ("REDIS_PASSWORD", "s3cret".to_owned()),
    ] {
        vars.insert(name.into(), value);
    }
}

/// The ACL of the service's Redis user: its own keys, and only the commands it sends.
fn acl(prefix: &str) -> String {
    format!("hlms on >s3cret ~{prefix}* resetchannels -@all +get +set +evalsha +eval +script|load +time +ping")
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_over_tls_as_an_acl_user_serves_the_cache_and_the_limiter() {
    let ca = TestCa::new("redis");
    let mut vars = testkit::service_vars();
    vars.insert("DB_NAME".into(), testkit::create_database().await);
    let prefix = vars["REDIS_KEY_PREFIX"].clone();
    let redis = PrivateRedis::start_tls(&ca, &ca.server_cert(&["localhost"]), &[&acl(&prefix)]);
    use_tls_redis(&mut vars, &ca, &redis);
    vars.insert("RATE_LIMIT_RPS".into(), "1000".into());
    let app = spawn_app_from(vars).await;
    let id = app.create_user(&unique_email("redis-tls")).await["id"].as_str().unwrap().to_owned();
    // `/health` shows the background check's last sample: the first may have met a connection still
    // in its TLS handshake.
    testkit::eventually("/health to report Redis up", Duration::from_secs(10), || async {
        let (_, health) = app.get("/health").await;
        (health["checks"]["redis"]["status"] == json!("up")).then_some(())
    })
    .await;
    // The first read fills the cache in the background; a later one is served from it.
    let served_from_redis = [
        r#"cache_operations_total{operation="get",result="hit"}"#,
        r#"rate_limit_decisions_total{decision="allowed",source="shared"}"#,
    ];
    testkit::eventually("a cache hit and a limiter decision through Redis", Duration::from_secs(10), || async {
        assert_eq!(app.get(&format!("/api/v1/users/{id}")).await.0, 200);
        let metrics = app.client.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
        served_from_redis
            .iter()
            .all(|series| {
                let count = metrics.lines().find_map(|line| line.strip_prefix(series));
                count.is_some_and(|count| count.trim().parse::<f64>().unwrap() >= 1.0)
            })
            .then_some(())
    })
    .await;
}

/// A login Redis refuses (the service's ACL user not there yet) is not the end: once the user exists,
/// the api reaches Redis without a restart.
#[tokio::test(flavor = "multi_thread")]
async fn a_refused_redis_login_is_retried_until_the_user_exists() {
    let ca = TestCa::new("redis");
    let redis = PrivateRedis::start_tls(&ca, &ca.server_cert(&["localhost"]), &["admin on >adminpw ~* +@all"]);
    let mut vars = testkit::service_vars();
    vars.insert("DB_NAME".into(), testkit::create_database().await);
    use_tls_redis(&mut vars, &ca, &redis);
    let mut admin_vars = vars.clone();
    let app = spawn_app_from(vars).await;
    testkit::eventually("/health to report the refused login", Duration::from_secs(10), || async {
        let (_, health) = app.get("/health").await;
        let error = health["checks"]["redis"]["error"].as_str()?.to_owned();
        error.contains("AuthenticationFailed").then_some(())
    })
    .await;

    admin_vars.insert("REDIS_USERNAME".into(), "admin".into());
    admin_vars.insert("REDIS_PASSWORD".into(), "adminpw".into());
    let admin = Config::from_lookup(|name: &str| admin_vars.get(name).cloned()).unwrap().redis;
    let admin = api::redis_client::RedisClient::new(&admin).unwrap();
    let prefix = app.config.redis.key_prefix.clone();
    testkit::eventually("the service's ACL user created", Duration::from_secs(10), || async {
        let user = acl(&prefix);
        let rules: Vec<String> = user.split(' ').skip(1).map(str::to_owned).collect();
        let created = admin.call("ACL", |mut conn| async move {
            redis::cmd("ACL").arg("SETUSER").arg("hlms").arg(rules).query_async::<()>(&mut conn).await
        });
        created.await.ok()
    })
    .await;
    testkit::eventually("/health to report Redis up", Duration::from_secs(10), || async {
        let (_, health) = app.get("/health").await;
        (health["checks"]["redis"]["status"] == json!("up")).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_refusals_are_reported_and_requests_fall_back_to_postgres() {
    let ca = TestCa::new("redis");
    let other_ca = TestCa::new("someone else");
    let redis = PrivateRedis::start_tls(&ca, &ca.server_cert(&["localhost"]), &[&acl("elsewhere:")]);
    let (ours, theirs) = (ca.ca_file(), other_ca.ca_file());
    let shared = testkit::service_vars();
    let tls_port = redis.port.to_string();
    let cases: [(&str, &str, &str, &str); 4] = [
        // (what goes wrong, host, port, CA)
        ("another CA", "localhost", &tls_port, theirs.to_str().unwrap()),
        ("another name", "127.0.0.1", &tls_port, ours.to_str().unwrap()),
        ("a plain-text server", &shared["REDIS_HOST"], &shared["REDIS_PORT"], ours.to_str().unwrap()),
        // Verified and logged in, but the ACL keeps the user off this prefix: every command refused.
        ("keys outside the ACL", "localhost", &tls_port, ours.to_str().unwrap()),
    ];
    let mut vars = testkit::service_vars();
    vars.insert("DB_NAME".into(), testkit::create_database().await);
    for (problem, host, port, root) in cases {
        for (name, value) in [
            ("REDIS_HOST", host),
            ("REDIS_PORT", port),
            ("REDIS_TLS", "true"),
            ("REDIS_CA_CERT", root),
            ("REDIS_USERNAME", "hlms"),
            ("REDIS_PASSWORD", "s3cret"),
            ("RATE_LIMIT_RPS", "1000"),
        ] {
            vars.insert(name.into(), value.into());
        }
        let app = spawn_app_from(vars.clone()).await;
        let id = app.create_user(&unique_email("redis-refused")).await["id"].as_str().unwrap().to_owned();
        assert_eq!(app.get(&format!("/api/v1/users/{id}")).await.0, 200, "{problem}");
        let (status, health) = app.get("/health").await;
        assert_eq!((status, &health["checks"]["postgres"]["status"]), (200, &json!("up")), "{problem}: {health}");
        if problem != "keys outside the ACL" {
            assert_eq!(health["checks"]["redis"]["status"], json!("down"), "{problem}: {health}");
        }
        let metrics = app.client.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
        let fell_back = r#"rate_limit_decisions_total{decision="allowed",source="local"}"#;
        assert!(metrics.contains(fell_back), "{problem}: the limiter did not fall back\n{metrics}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unusable_ca_file_stops_the_start_naming_the_variable() {
    let dir = std::env::temp_dir().join(format!("hlms-ca-{}", testkit::unique()));
    std::fs::create_dir_all(&dir).unwrap();
    let not_a_bundle = dir.join("ca.pem");
    std::fs::write(&not_a_bundle, "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n").unwrap();
    let path = not_a_bundle.to_str().unwrap();
    for (var, extra) in [("REDIS_CA_CERT", ("REDIS_TLS", "true")), ("DB_SSLROOTCERT", ("DB_SSLMODE", "verify-full"))] {
        let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_api"))
            .env_clear()
            .envs(testkit::service_vars())
            .env("RUN_MIGRATIONS", "false")
            .env(var, path)
            .env(extra.0, extra.1)
            .output()
            .await
            .unwrap();
        assert!(!output.status.success(), "{var}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(var) && stderr.contains("holds no PEM certificate"), "{var}: {stderr}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn refused_redis_and_kafka_certificates_are_logged_and_leave_the_api_degraded_not_down() {
    let ca = TestCa::new("dependencies");
    let other_ca = TestCa::new("someone else");
    let cert = ca.server_cert(&["localhost"]);
    let redis = PrivateRedis::start_tls(&ca, &cert, &[]);
    let broker = testkit::Broker::start_tls(&cert, false).await;
    let port = testkit::closed_port();
    let mut vars = testkit::service_vars();
    for (name, value) in [
        ("DB_NAME", testkit::create_database().await),
        ("SERVER_PORT", port.to_string()),
        ("LOG_FORMAT", "json".into()),
        ("REDIS_HOST", "localhost".into()),
        ("REDIS_PORT", redis.port.to_string()),
        ("REDIS_TLS", "true".into()),
        ("REDIS_CA_CERT", other_ca.ca_file().display().to_string()),
        ("KAFKA_BROKERS", broker.bootstrap()),
        ("KAFKA_SECURITY_PROTOCOL", "SSL".into()),
        ("KAFKA_SSL_CA_LOCATION", other_ca.ca_file().display().to_string()),
    ] {
        vars.insert(name.into(), value);
    }
    let process = testkit::Process::spawn(env!("CARGO_BIN_EXE_api").as_ref(), &vars);
    // Ready: requests are served from PostgreSQL and the outbox keeps the events (SPEC §6); a cache or
    // a broker that cannot be verified degrades the api rather than taking every replica down.
    let url = |path: &str| format!("http://127.0.0.1:{port}{path}");
    testkit::eventually("the api ready", Duration::from_secs(20), || async {
        let status = reqwest::get(url("/health/ready")).await.ok()?.status();
        (status == 200).then_some(())
    })
    .await;
    let health: serde_json::Value = reqwest::get(url("/health")).await.unwrap().json().await.unwrap();
    assert_eq!(health["status"], json!("degraded"), "{health}");
    assert_eq!(health["checks"]["redis"]["status"], json!("down"), "{health}");
    assert_eq!(health["checks"]["kafka"]["status"], json!("down"), "{health}");
    // Each refusal is a log line naming the dependency and the reason.
    for (needle, dependency, reason) in [
        ("Redis connection failed", "redis", "invalid peer certificate: UnknownIssuer"),
        ("could not ensure Kafka topics", "kafka", "certificate verify failed"),
    ] {
        let line = process.line_containing(needle, common::kafka::ENSURE_TOPICS_TIMEOUT * 2).await;
        let line: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(line["dependency"], json!(dependency), "{line}");
        assert!(line["error"].as_str().unwrap().contains(reason), "{line}");
    }
}
