//! Debian's Prometheus server (the `prometheus` package that `scripts/lib.sh` `ensure_prometheus`
//! installs, or `PROMETHEUS_BIN`) scrapes a running api and worker with the project's alert rules
//! loaded: a series of each comes back through its query API, and a rule of `alerts.yaml` evaluates
//! on the api's real series. The rules' logic is unit-tested by `promtool test rules`; this proves the
//! names and labels they read are what a real scrape produces.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;
use tokio::process::Command;

use crate::helpers::Stack;

/// The rules every deployment loads (deploy/prometheus/alerts.yaml).
fn alert_rules() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus/alerts.yaml")
}

/// The instant-query result vector for `query`, or `None` while the server cannot answer.
async fn query(client: &reqwest::Client, prometheus: &str, query: &str) -> Option<Vec<Value>> {
    // Percent-encoded by hand: the workspace's reqwest is built without its `query` feature.
    let encoded: String = query
        .bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => char::from(byte).to_string(),
            _ => format!("%{byte:02X}"),
        })
        .collect();
    let response = client.get(format!("{prometheus}/api/v1/query?query={encoded}")).send().await.ok()?;
    let body: Value = response.json().await.ok()?;
    (body["status"] == "success").then(|| body["data"]["result"].as_array().cloned().unwrap_or_default())
}

/// Waits until `promql` returns at least one series, and returns the first one's value.
async fn wait_for_series(client: &reqwest::Client, prometheus: &str, promql: &str) -> f64 {
    testkit::eventually(&format!("Prometheus to return {promql}"), Duration::from_secs(60), || async {
        let series = query(client, prometheus, promql).await?;
        series.first()?["value"][1].as_str()?.parse().ok()
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn prometheus_scrapes_the_api_and_the_worker_and_evaluates_the_alert_rules() {
    let stack = Stack::start(&[]).await;
    let worker = stack.start_worker().await;
    let user = stack.create_user().await;
    stack.post_event(&user, "scraped").await;
    stack.wait_until_drained(Duration::from_secs(60)).await;

    let directory = std::env::temp_dir().join(format!("hlms-prometheus-{}", testkit::unique()));
    std::fs::create_dir_all(&directory).unwrap();
    let config = directory.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {rules}\n\
             scrape_configs:\n\
             \x20 - job_name: api\n    static_configs:\n      - targets: ['{api}']\n\
             \x20 - job_name: worker\n    static_configs:\n      - targets: ['{worker}']\n",
            rules = alert_rules().canonicalize().unwrap().display(),
            api = stack.api,
            worker = worker.http,
        ),
    )
    .unwrap();
    let port = testkit::closed_port();
    let binary = std::env::var("PROMETHEUS_BIN").unwrap_or_else(|_| "/usr/bin/prometheus".to_owned());
    let mut command = Command::new(&binary);
    command.args([
        format!("--config.file={}", config.display()),
        format!("--storage.tsdb.path={}", directory.join("data").display()),
        format!("--web.listen-address=127.0.0.1:{port}"),
        "--log.level=warn".to_owned(),
    ]);
    let mut server = testkit::Process::spawn_command(command, &HashMap::new());
    let prometheus = format!("http://127.0.0.1:{port}");

    // Both targets scraped and up.
    assert_eq!(wait_for_series(&stack.client, &prometheus, r#"up{job="api"} == 1"#).await, 1.0);
    assert_eq!(wait_for_series(&stack.client, &prometheus, r#"up{job="worker"} == 1"#).await, 1.0);
    // A series of each binary, with the values this test caused.
    let created = r#"http_requests_total{job="api",route="/api/v1/users",method="POST",status="2xx"}"#;
    assert!(wait_for_series(&stack.client, &prometheus, &format!("{created} >= 1")).await >= 1.0);
    let consumed = r#"worker_events_consumed_total{job="worker"} >= 1"#;
    assert!(wait_for_series(&stack.client, &prometheus, consumed).await >= 1.0);
    // The rule file loaded, and a recording rule of it evaluates on the scraped series: the api's
    // readiness probes (this test's /health/ready is not polled, so the pod counts as not failing).
    assert_eq!(wait_for_series(&stack.client, &prometheus, "api:readiness_probe_failing:1m").await, 0.0);
    let groups = testkit::eventually("the rule groups to be loaded", Duration::from_secs(10), || async {
        let body: Value =
            stack.client.get(format!("{prometheus}/api/v1/rules")).send().await.ok()?.json().await.ok()?;
        let groups = body["data"]["groups"].as_array()?.len();
        (groups > 0).then_some(groups)
    })
    .await;
    let in_file =
        std::fs::read_to_string(alert_rules()).unwrap().lines().filter(|l| l.starts_with("  - name: ")).count();
    assert_eq!(groups, in_file, "every group of alerts.yaml is loaded");

    server.signal("TERM");
    assert!(server.exit_within(Duration::from_secs(30)).await.success());
    worker.stop().await;
    std::fs::remove_dir_all(&directory).unwrap();
}
