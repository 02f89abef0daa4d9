//! Kafka over TLS (SPEC §9): the relay's producer and the worker's consumer group through a TLS
//! terminator in front of the broker, the brokers' certificates verified against a CA the test made;
//! the refusals (another CA, another name, a plain-text broker); and SASL as far as the local broker
//! allows (tansu can require authentication but, on memory storage, holds no user to log in as).

use std::time::Duration;

use common::config::Config;
use testkit::Broker;
use testkit::tls::TestCa;

use crate::helpers::Stack;

#[tokio::test(flavor = "multi_thread")]
async fn events_flow_end_to_end_over_verified_tls() {
    let ca = TestCa::new("kafka");
    let broker = Broker::start_tls(&ca.server_cert(&["localhost"]), false).await;
    let root = ca.ca_file();
    let stack = Stack::start_on(
        broker,
        &[("KAFKA_SECURITY_PROTOCOL", "SSL"), ("KAFKA_SSL_CA_LOCATION", root.to_str().unwrap())],
    )
    .await;
    assert!(stack.config.kafka.brokers.starts_with("localhost:"));
    events_flow_end_to_end(&stack).await;
}

/// Events posted to the api reach the worker through the broker (the relay's producer, then the
/// worker's consumer group) and are counted.
async fn events_flow_end_to_end(stack: &Stack) {
    let worker = stack.start_worker().await;
    let user = stack.create_user().await;
    for _ in 0..5 {
        stack.post_event(&user, "page_view").await;
    }
    stack.wait_until_drained(Duration::from_secs(60)).await;
    assert_eq!(stack.stats(&user).await["events_total"], 5);
    worker.stop().await;
}

/// The events topic's metadata, fetched as the service's clients would; the error's text otherwise.
async fn fetch_metadata(vars: Vec<(&'static str, String)>) -> Result<(), String> {
    let topic = ("KAFKA_TOPIC", format!("tls-{}", testkit::unique()));
    let value = |name: &str| vars.iter().chain([&topic]).find(|(var, _)| *var == name).map(|(_, value)| value.clone());
    let config = Config::from_lookup(value).unwrap();
    let deadline = common::kafka::ENSURE_TOPICS_TIMEOUT + Duration::from_secs(10);
    let result = tokio::time::timeout(deadline, common::kafka::ensure_topics(&config.kafka)).await;
    result.expect("ensure_topics gives up by itself").map_err(|err| format!("{err:#}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn kafka_refuses_another_ca_another_name_a_plain_text_broker_and_unknown_sasl_users() {
    let ca = TestCa::new("kafka");
    let other_ca = TestCa::new("someone else");
    let cert = ca.server_cert(&["localhost"]);
    let tls = Broker::start_tls(&cert, false).await;
    let authenticating = Broker::start_tls(&cert, true).await;
    let plain = Broker::start().await;
    let (ours, theirs) = (ca.ca_file(), other_ca.ca_file());
    let (ours, theirs) = (ours.to_str().unwrap(), theirs.to_str().unwrap());
    let by_address = tls.bootstrap().replace("localhost", "127.0.0.1");
    let ssl = |brokers: &str, root: &str| {
        vec![
            ("KAFKA_BROKERS", brokers.to_owned()),
            ("KAFKA_SECURITY_PROTOCOL", "SSL".into()),
            ("KAFKA_SSL_CA_LOCATION", root.to_owned()),
        ]
    };
    let sasl = |mechanism: &str| {
        vec![
            ("KAFKA_BROKERS", authenticating.bootstrap()),
            ("KAFKA_SECURITY_PROTOCOL", "SASL_SSL".into()),
            ("KAFKA_SSL_CA_LOCATION", ours.to_owned()),
            ("KAFKA_SASL_MECHANISM", mechanism.to_owned()),
            ("KAFKA_SASL_USERNAME", "nobody".into()),
            ("KAFKA_SASL_PASSWORD", "wrong".into()),
        ]
    };
    // (case, variables, what the error must say; None: connects)
    let cases = [
        ("verified", ssl(&tls.bootstrap(), ours), None),
        ("another CA", ssl(&tls.bootstrap(), theirs), Some("certificate verify failed")),
        ("another name", ssl(&by_address, ours), Some("certificate verify failed")),
        ("a plain-text broker", ssl(&plain.bootstrap(), ours), Some("did not answer")),
        ("SCRAM-SHA-512, unknown user", sasl("SCRAM-SHA-512"), Some("SASL")),
        ("SCRAM-SHA-256, unknown user", sasl("SCRAM-SHA-256"), Some("SASL")),
        ("PLAIN, unknown user", sasl("PLAIN"), Some("SASL")),
    ];
    // At once: each refusal takes the whole timeout.
    let probes: Vec<_> = cases.iter().map(|(_, vars, _)| tokio::spawn(fetch_metadata(vars.clone()))).collect();
    for ((case, _, expected), probe) in cases.iter().zip(probes) {
        let outcome = probe.await.unwrap();
        match expected {
            None => assert_eq!(outcome, Ok(()), "{case}"),
            Some(needle) => {
                let error = outcome.expect_err(case);
                assert!(error.contains(needle) && error.starts_with("Kafka at "), "{case}: {error}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_worker_stops_at_start_when_postgres_or_kafka_refuse_its_settings() {
    let ca = TestCa::new("dependencies");
    let other_ca = TestCa::new("someone else");
    let cert = ca.server_cert(&["localhost"]);
    let postgres = testkit::PrivatePostgres::start_with_tls(&cert);
    let broker = Broker::start_tls(&cert, false).await;
    let mut vars = testkit::service_vars();
    for (name, value) in [
        ("DB_PORT", postgres.port.to_string()),
        ("DB_NAME", "postgres".into()),
        ("DB_SSLMODE", "verify-full".into()),
        ("DB_SSLROOTCERT", ca.ca_file().display().to_string()),
        ("KAFKA_BROKERS", broker.bootstrap()),
        ("KAFKA_SECURITY_PROTOCOL", "SSL".into()),
        ("KAFKA_SSL_CA_LOCATION", ca.ca_file().display().to_string()),
        ("LOG_FORMAT", "json".into()),
    ] {
        vars.insert(name.into(), value);
    }
    let worker = std::path::PathBuf::from(env!("CARGO_BIN_EXE_worker"));
    // (what is refused, the variable that makes it so, the log line's dependency and reason)
    let other_root = other_ca.ca_file().display().to_string();
    let cases = [
        ("PostgreSQL's certificate", ("DB_HOST", "127.0.0.1"), "postgres", "certificate not valid for name"),
        ("Kafka's certificate", ("KAFKA_SSL_CA_LOCATION", other_root.as_str()), "kafka", "certificate verify failed"),
        ("a database PostgreSQL does not have", ("DB_NAME", "hlms_no_such_database"), "postgres", "does not exist"),
    ];
    for (case, (name, value), dependency, reason) in cases {
        let mut vars = vars.clone();
        vars.insert("DB_HOST".into(), "localhost".into());
        vars.insert(name.into(), value.into());
        let mut process = testkit::Process::spawn(&worker, &vars);
        let status = process.exit_within(common::kafka::ENSURE_TOPICS_TIMEOUT * 2).await;
        assert!(!status.success(), "{case}: the worker kept running");
        let logged = process.output().into_iter().any(|line| {
            let line: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            line["level"] == "ERROR" && line["dependency"] == dependency && line.to_string().contains(reason)
        });
        assert!(logged, "{case}: no error line naming {dependency} and {reason:?} in {:#?}", process.output());
    }

    // An unreachable PostgreSQL is an outage, not a refusal: the worker starts, and retries.
    let http = testkit::closed_port();
    vars.insert("DB_HOST".into(), "localhost".into());
    vars.insert("DB_PORT".into(), testkit::closed_port().to_string());
    vars.insert("WORKER_HTTP_PORT".into(), http.to_string());
    let mut process = testkit::Process::spawn(&worker, &vars);
    let ready = format!("http://127.0.0.1:{http}/health/ready");
    testkit::eventually("the worker ready without PostgreSQL", Duration::from_secs(30), || async {
        let status = reqwest::get(&ready).await.ok()?.status();
        (status == 200).then_some(())
    })
    .await;
    assert!(process.child.try_wait().unwrap().is_none(), "the worker exited on an outage");
}

/// SASL_SSL with SCRAM end to end, on nisshi: unlike tansu on memory storage it holds users while it
/// requires authentication, and it serves TLS itself.
#[tokio::test(flavor = "multi_thread")]
async fn events_flow_end_to_end_over_sasl_ssl_with_scram_and_wrong_passwords_are_refused() {
    let ca = TestCa::new("kafka");
    let users = [("hlms", "s3cret-512", "scram512"), ("hlms256", "s3cret-256", "scram256")];
    let broker = Broker::start_nisshi_sasl(&ca.server_cert(&["localhost"]), &users).await;
    let brokers = broker.bootstrap();
    let root = ca.ca_file().display().to_string();
    let sasl = |mechanism: &str, user: &str, password: &str| {
        vec![
            ("KAFKA_BROKERS", brokers.clone()),
            ("KAFKA_SECURITY_PROTOCOL", "SASL_SSL".to_owned()),
            ("KAFKA_SSL_CA_LOCATION", root.clone()),
            ("KAFKA_SASL_MECHANISM", mechanism.to_owned()),
            ("KAFKA_SASL_USERNAME", user.to_owned()),
            ("KAFKA_SASL_PASSWORD", password.to_owned()),
        ]
    };
    assert_eq!(fetch_metadata(sasl("SCRAM-SHA-256", "hlms256", "s3cret-256")).await, Ok(()));
    let refused =
        [("SCRAM-SHA-512", "hlms", "wrong"), ("SCRAM-SHA-256", "hlms", "s3cret-512"), ("PLAIN", "hlms", "s3cret-512")];
    // At once: each refusal takes the whole timeout.
    let probes: Vec<_> = refused.iter().map(|(m, u, p)| tokio::spawn(fetch_metadata(sasl(m, u, p)))).collect();
    for ((mechanism, user, _), probe) in refused.iter().zip(probes) {
        let error = probe.await.unwrap().expect_err(mechanism);
        assert!(error.contains("SASL") || error.contains("uthentication"), "{mechanism} {user}: {error}");
    }

    let stack = Stack::start_on(
        broker,
        &sasl("SCRAM-SHA-512", "hlms", "s3cret-512")
            .iter()
            .map(|(name, value)| (*name, value.as_str()))
            .collect::<Vec<_>>(),
    )
    .await;
    events_flow_end_to_end(&stack).await;
}
