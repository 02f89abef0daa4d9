//! Per-client rate limits (SPEC §8) against the real app and real Redis: the budget is shared by
//! replicas, keyed by the token's client, and survives Redis going away without a single 5xx.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use testkit::auth::SigningKey;

use crate::helpers::{TestApp, client_with_token, error_code, spawn_app_with, spawn_replica};

/// Status and the three `RateLimit-*` headers of a GET.
async fn get(client: &reqwest::Client, url: &str) -> (u16, [u64; 3], reqwest::header::HeaderMap) {
    let response = client.get(url).send().await.unwrap();
    let header = |name: &str| response.headers().get(name).map_or(u64::MAX, |v| v.to_str().unwrap().parse().unwrap());
    let limits = [header("ratelimit-limit"), header("ratelimit-remaining"), header("ratelimit-reset")];
    (response.status().as_u16(), limits, response.headers().clone())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_over_its_burst_gets_429_with_retry_after_and_every_answer_says_what_is_left() {
    let app = spawn_app_with(&[("RATE_LIMIT_RPS", "1"), ("RATE_LIMIT_BURST", "3")]).await;
    // A route that answers without the database (400 invalid_id), so four requests take far less than
    // the second it takes the bucket to gain a unit, even on a loaded machine.
    let url = app.url("/api/v1/users/not-a-uuid");
    for remaining in [2, 1, 0] {
        let (status, [limit, left, reset], _) = get(&app.client, &url).await;
        assert_eq!((status, limit, left), (400, 3, remaining));
        assert!((1..=3).contains(&reset), "RateLimit-Reset {reset}");
    }
    let response = app.client.get(&url).send().await.unwrap();
    assert_eq!(response.status(), 429);
    let retry_after: u64 = response.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert_eq!(retry_after, 1);
    assert_eq!(response.headers()["ratelimit-remaining"], "0");
    assert_eq!(error_code(&response.json().await.unwrap()), "rate_limited");
    // Another client has a budget of its own; errors of limited routes carry the headers too.
    let mut claims = SigningKey::claims("users:read");
    claims["client_id"] = json!("someone-else");
    let other = client_with_token(&testkit::auth::shared_issuer().key.sign(&claims));
    let (status, [_, left, _], _) = get(&other, &app.url(&format!("/api/v1/users/{}", uuid::Uuid::new_v4()))).await;
    assert_eq!((status, left), (404, 2));
    // Probes, metrics and the document are never limited.
    for path in ["/health/live", "/health/ready", "/metrics", "/openapi.json"] {
        for _ in 0..5 {
            let (status, [limit, ..], _) = get(&app.client, &app.url(path)).await;
            assert_eq!((status, limit), (200, u64::MAX), "{path}");
        }
    }
    // Once the bucket refills, the client is served again.
    testkit::eventually("the bucket to refill", Duration::from_secs(5), || async {
        (get(&app.client, &url).await.0 == 400).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_replicas_share_one_clients_budget() {
    let first = spawn_app_with(&[("RATE_LIMIT_RPS", "1"), ("RATE_LIMIT_BURST", "4")]).await;
    let second = spawn_replica(&first).await;
    let urls = [&first, &second, &first, &second, &first, &second].map(|app: &TestApp| app.url("/api/v1/users/x"));
    let mut seen = Vec::new();
    for url in &urls {
        seen.push(get(&first.client, url).await.0);
    }
    assert_eq!(seen, [400, 400, 400, 400, 429, 429]);
}

/// A busy client's units are taken from Redis in batches; whatever the replicas hand out together
/// stays within the limit (burst + rate × time), and the batching does not starve the client.
#[tokio::test(flavor = "multi_thread")]
async fn under_load_two_replicas_together_never_admit_more_than_the_limit() {
    let (rps, burst) = (400.0, 100.0);
    let first = spawn_app_with(&[("RATE_LIMIT_RPS", "400"), ("RATE_LIMIT_BURST", "100")]).await;
    let second = spawn_replica(&first).await;
    let (allowed, limited, other) =
        (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for n in 0..8 {
        let url =
            if n % 2 == 0 { first.url("/api/v1/users/stats-none") } else { second.url("/api/v1/users/stats-none") };
        let (client, allowed, limited, other) = (first.client.clone(), allowed.clone(), limited.clone(), other.clone());
        tasks.push(tokio::spawn(async move {
            while started.elapsed() < Duration::from_secs(2) {
                match client.get(&url).send().await.unwrap().status().as_u16() {
                    400 => allowed.fetch_add(1, Ordering::Relaxed),
                    429 => limited.fetch_add(1, Ordering::Relaxed),
                    _ => other.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let (allowed, limited) = (allowed.load(Ordering::Relaxed), limited.load(Ordering::Relaxed));
    let ceiling = burst + rps * elapsed;
    eprintln!("{allowed} allowed, {limited} limited in {elapsed:.2} s; the limit allows at most {ceiling:.0}");
    assert_eq!(other.load(Ordering::Relaxed), 0, "answers other than 400 (invalid id) and 429");
    assert!(limited > 0, "the load never reached the limit; the test proves nothing");
    assert!(allowed as f64 <= ceiling + 1.0, "{allowed} admitted, more than the limit's {ceiling:.0}");
    assert!(allowed as f64 >= 0.5 * ceiling, "{allowed} admitted, far below the limit's {ceiling:.0}");
}

/// Requests of one client that miss this replica's leased units at the same moment each fetch a
/// batch; every unit fetched must be used, or a client well within its budget would be refused.
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_requests_within_the_burst_are_never_refused() {
    let first = spawn_app_with(&[("RATE_LIMIT_RPS", "2000"), ("RATE_LIMIT_BURST", "2000")]).await;
    let second = spawn_replica(&first).await;
    let refused = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for n in 0..16 {
        let url = if n % 2 == 0 { first.url("/api/v1/users/x") } else { second.url("/api/v1/users/x") };
        let (client, refused) = (first.client.clone(), refused.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..90 {
                if client.get(&url).send().await.unwrap().status() == 429 {
                    refused.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(refused.load(Ordering::Relaxed), 0, "1,440 requests within a burst of 2,000 were refused");
}

#[tokio::test(flavor = "multi_thread")]
async fn with_redis_cut_each_replica_limits_locally_and_never_fails_or_stalls() {
    let proxy = crate::cache::redis_proxy().await;
    let redis_port = proxy.addr().port().to_string();
    let app = spawn_app_with(&[
        ("REDIS_PORT", &redis_port),
        ("RATE_LIMIT_RPS", "1"),
        ("RATE_LIMIT_BURST", "3"),
        ("REDIS_TIMEOUT_MS", "100"),
    ])
    .await;
    let url = app.url("/api/v1/users");
    assert_eq!(get(&app.client, &url).await.0, 200);
    proxy.cut();
    // The shared bucket is gone: the replica's own bucket takes over from what the shared one said
    // (one of three units used), not from a full bucket.
    let mut statuses = Vec::new();
    let mut slowest = Duration::ZERO;
    for _ in 0..6 {
        let started = Instant::now();
        statuses.push(get(&app.client, &url).await.0);
        slowest = slowest.max(started.elapsed());
    }
    eprintln!("statuses with Redis cut: {statuses:?}; slowest {slowest:?} (REDIS_TIMEOUT_MS=100)");
    assert!(statuses.iter().all(|status| *status == 200 || *status == 429), "{statuses:?}");
    assert_eq!(statuses.iter().filter(|status| **status == 200).count(), 2, "{statuses:?}");
    assert!(slowest < Duration::from_millis(500), "a request waited {slowest:?} with Redis cut");
    let metrics = app.client.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains(r#"rate_limit_decisions_total{decision="limited",source="local"} 4"#), "{metrics}");
    // Redis back: the shared bucket decides again (after the pause, one probe at a time).
    proxy.restore();
    let before = shared_decisions(&app).await;
    testkit::eventually("shared decisions again", Duration::from_secs(10), || async {
        get(&app.client, &url).await;
        (shared_decisions(&app).await > before).then_some(())
    })
    .await;
}

/// Decisions taken on the shared bucket so far, allowed or limited.
async fn shared_decisions(app: &TestApp) -> u64 {
    let metrics = app.client.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    metrics
        .lines()
        .filter(|line| line.starts_with("rate_limit_decisions_total") && line.contains(r#"source="shared""#))
        .map(|line| line.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum()
}

/// The Lua script and its Rust twin answer alike, on real Redis (intervals of a second, so the few
/// milliseconds between calls cannot change an answer).
#[tokio::test]
async fn the_shared_script_and_the_local_bucket_agree() {
    use api::ratelimit::gcra::{Rate, SHARED_SCRIPT};
    let vars = testkit::service_vars();
    let url = format!("redis://{}:{}/", vars["REDIS_HOST"], vars["REDIS_PORT"]);
    let mut redis = redis::Client::open(url).unwrap().get_multiplexed_async_connection().await.unwrap();
    let script = redis::Script::new(SHARED_SCRIPT);
    // The last: the highest rate allowed, whose interval (10 µs) is far below a millisecond.
    for (rps, burst, wants) in
        [(1, 3, vec![1, 1, 1, 1]), (1, 5, vec![2, 4, 1]), (2, 1, vec![3, 1]), (100_000, 64, vec![64])]
    {
        let key = format!("{}gcra-twin", vars["REDIS_KEY_PREFIX"]);
        let rate = Rate::new(rps, burst);
        let mut tat = 0.0;
        for wanted in wants {
            let (granted, remaining, reset_ms, retry_ms): (u32, u32, u64, u64) = script
                .key(&key)
                .arg(rate.interval_ms())
                .arg(rate.burst())
                .arg(wanted)
                .invoke_async(&mut redis)
                .await
                .unwrap();
            let local = rate.take(&mut tat, 1_000_000.0, wanted);
            assert_eq!(
                (granted, remaining),
                (local.granted, local.remaining),
                "{rps}/s, burst {burst}, {wanted} wanted"
            );
            let close = |shared: u64, local: f64| (shared as f64 - local).abs() <= 50.0;
            assert!(
                close(reset_ms, local.reset_ms) && close(retry_ms, local.retry_after_ms.max(0.0)),
                "{rps}/s: {reset_ms}/{retry_ms} vs {local:?}"
            );
        }
        let _: () = redis::cmd("DEL").arg(&key).query_async(&mut redis).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn without_tokens_the_client_is_the_peer_or_what_a_trusted_proxy_says() {
    let limited = |trusted: &'static str| async move {
        let app = spawn_app_with(&[
            ("AUTH_MODE", "none"),
            ("RATE_LIMIT_RPS", "1"),
            ("RATE_LIMIT_BURST", "1"),
            ("TRUSTED_PROXIES", trusted),
        ])
        .await;
        let client = reqwest::Client::new();
        let mut statuses = Vec::new();
        for forwarded in ["198.51.100.1", "198.51.100.2", "198.51.100.3"] {
            let response =
                client.get(app.url("/api/v1/users")).header("x-forwarded-for", forwarded).send().await.unwrap();
            statuses.push(response.status().as_u16());
        }
        statuses
    };
    // The test's peer is 127.0.0.1: trusted, each forwarded address is a client of its own.
    assert_eq!(limited("127.0.0.1/32").await, [200, 200, 200]);
    // Not trusted: the header is ignored and all three are the same client.
    assert_eq!(limited("10.0.0.0/8").await, [200, 429, 429]);
}
