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

/// The Grafana dashboard (deploy/grafana/) only names metrics the binaries really export: after some
/// traffic, every metric name in every panel's query shows in a live `/metrics` of the api or the
/// worker (label sets appear once used, so the test drives each path the dashboard shows).
#[tokio::test(flavor = "multi_thread")]
async fn every_dashboard_query_names_metrics_the_binaries_export() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/highload-microservice.json");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut wanted = std::collections::BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            wanted.extend(metric_names(target["expr"].as_str().unwrap()));
        }
    }
    assert!(wanted.len() > 15, "{wanted:?}");

    let stack = Stack::start(&[("RATE_LIMIT_RPS", "1000")]).await;
    let worker = stack.start_worker().await;
    let user = stack.create_user().await;
    stack.get(&format!("/api/v1/users/{user}")).await;
    stack.get(&format!("/api/v1/users/{user}")).await;
    stack.post_event(&user, "dashboard").await;
    stack.wait_until_drained(Duration::from_secs(60)).await;
    // The worker samples its lag every 10 s; everything else is there after the traffic above.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let missing = loop {
        let mut exported = std::collections::BTreeSet::new();
        for base in [stack.url(""), format!("http://{}", worker.http)] {
            let text = stack.client.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
            let names =
                text.lines().filter(|line| !line.starts_with('#')).filter_map(|line| line.split(['{', ' ']).next());
            exported.extend(names.map(str::to_owned));
        }
        let missing: Vec<_> = wanted.iter().filter(|name| !exported.contains(*name)).cloned().collect();
        if missing.is_empty() || tokio::time::Instant::now() >= deadline {
            break missing;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(missing.is_empty(), "the dashboard reads metrics no binary exports: {missing:?}");
    worker.stop().await;
}

/// The metric names a PromQL expression reads: identifiers that are not functions (followed by `(`),
/// keywords, or label names (inside `{…}`, or the list after `by`/`without`), and not durations.
fn metric_names(expr: &str) -> Vec<String> {
    const KEYWORDS: [&str; 23] = [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        // Aggregations, which may be followed by `by (…)` rather than their `(`.
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
    ];
    let mut names = Vec::new();
    let (bytes, mut index, mut after_grouping) = (expr.as_bytes(), 0, false);
    while index < bytes.len() {
        match bytes[index] {
            b'{' | b'[' | b'"' => {
                let close = match bytes[index] {
                    b'{' => b'}',
                    b'[' => b']',
                    _ => b'"',
                };
                index += 1 + bytes[index + 1..].iter().position(|&b| b == close).unwrap_or(bytes.len());
            }
            b'(' if after_grouping => {
                index += bytes[index..].iter().position(|&b| b == b')').unwrap_or(bytes.len());
                after_grouping = false;
            }
            byte if byte.is_ascii_alphabetic() || byte == b'_' => {
                let start = index;
                while index < bytes.len()
                    && (bytes[index].is_ascii_alphanumeric() || matches!(bytes[index], b'_' | b':'))
                {
                    index += 1;
                }
                let word = &expr[start..index];
                let next = expr[index..].trim_start().chars().next();
                after_grouping = matches!(word, "by" | "without" | "on" | "ignoring");
                if next != Some('(') && !KEYWORDS.contains(&word) {
                    names.push(word.to_owned());
                }
                continue;
            }
            _ => {}
        }
        index += 1;
    }
    names
}

#[test]
fn metric_names_skip_functions_labels_and_keywords() {
    let expr = r#"histogram_quantile(0.99, sum by (le, route) (rate(http_request_duration_seconds_bucket{route!~"/x"}[5m]))) / sum(max by (partition) (kafka_consumer_lag)) and on(job) up"#;
    assert_eq!(metric_names(expr), ["http_request_duration_seconds_bucket", "kafka_consumer_lag", "up"]);
}
