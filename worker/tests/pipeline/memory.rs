//! The worker's memory under a backlog of maximum-size events it cannot finish (issue 16): bounded by
//! `WORKER_MAX_IN_FLIGHT_BYTES`, not only by the message count.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::kafka::CONSUMER_PREFETCH_MAX_BYTES;
use serde_json::json;

use crate::helpers::{Stack, postgres_proxy};

const MIB: u64 = 1024 * 1024;

/// The peak resident set of a process, sampled on a thread of its own every 10 ms until dropped.
struct RssSampler {
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssSampler {
    fn start(pid: u32) -> Self {
        let (peak, stop) = (Arc::new(AtomicU64::new(rss_bytes(pid))), Arc::new(AtomicBool::new(false)));
        let (peak_of_thread, stop_of_thread) = (Arc::clone(&peak), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            while !stop_of_thread.load(Ordering::Relaxed) {
                peak_of_thread.fetch_max(rss_bytes(pid), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        Self { peak, stop, thread: Some(thread) }
    }

    fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// `VmRSS` of a process, in bytes (0 once it is gone).
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().strip_suffix("kB"))
        .and_then(|kib| kib.trim().parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

/// A sample of the worker's `/metrics`.
async fn metric(client: &reqwest::Client, metrics_url: &str, name: &str) -> Option<u64> {
    let text = client.get(metrics_url).send().await.ok()?.text().await.ok()?;
    let value = text.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))?;
    value.trim().parse::<f64>().ok().map(|value| value as u64)
}

/// With PostgreSQL cut from the worker, nothing it fetches can finish, so it holds everything it
/// fetches until it pauses. A backlog of maximum-size events (`EVENT_MAX_DATA_BYTES` of `data` each,
/// ~200 MiB in all) would be held whole under the message bound alone (3,200 < `WORKER_MAX_IN_FLIGHT`,
/// 4,000); with `WORKER_MAX_IN_FLIGHT_BYTES` at 32 MiB it pauses at a sixth of it, and its resident
/// memory stays within what that bound, the lanes' decoded copies and librdkafka's prefetch queue
/// allow on top of its idle size. Once the database is back, every event is applied exactly once.
#[tokio::test(flavor = "multi_thread")]
#[expect(clippy::print_stdout, reason = "the peak RSS is the figure this fault test reports")]
async fn a_backlog_of_maximum_size_events_during_a_postgres_outage_keeps_worker_memory_bounded() {
    const LIMIT_BYTES: u64 = 32 * MIB;
    const EVENTS: usize = 3200;
    const USERS: usize = 16;
    let (proxy, port) = postgres_proxy().await;
    let stack = Stack::start(&[]).await;
    let max_data_bytes = stack.config.events.max_data_bytes;
    let mut users = Vec::new();
    for _ in 0..USERS {
        users.push(stack.create_user().await);
    }
    let http_port = testkit::closed_port().to_string();
    let metrics_url = format!("http://127.0.0.1:{http_port}/metrics");
    let mut worker = stack.spawn_binary(
        "worker",
        &[
            ("DB_PORT", &port),
            ("WORKER_HTTP_PORT", &http_port),
            ("WORKER_MAX_IN_FLIGHT_BYTES", &LIMIT_BYTES.to_string()),
            // Debug for the pipeline: its "backpressure" line says when fetching paused, and why.
            ("LOG_LEVEL", "info,worker::pipeline=debug"),
        ],
    );
    let pid = worker.child.id().expect("the worker runs");
    // Warm up (connections, lanes, the consumer's buffers): the idle size is measured after real work.
    for user in &users {
        stack.post_event(user, "warm-up").await;
    }
    stack.wait_until_drained(Duration::from_secs(60)).await;
    let idle = rss_bytes(pid);
    let sampler = RssSampler::start(pid);

    proxy.cut();
    // The largest `data` the api accepts: a JSON string of exactly EVENT_MAX_DATA_BYTES.
    let data = "x".repeat(max_data_bytes - 2);
    let mut posters = tokio::task::JoinSet::new();
    for user in &users {
        let (client, url, user, data) = (stack.client.clone(), stack.url("/api/v1/events"), user.clone(), data.clone());
        posters.spawn(async move {
            for _ in 0..EVENTS / USERS {
                let body = json!({"user_id": user, "type": "backlog", "data": data});
                let response = client.post(&url).json(&body).send().await.unwrap();
                assert_eq!(response.status(), 201, "{}", response.text().await.unwrap_or_default());
            }
        });
    }
    posters.join_all().await;
    let backlog = EVENTS / USERS * USERS;

    // The worker has taken what it will: everything published, and it either paused (at the byte
    // bound) or took the whole backlog (as it would under the message bound alone).
    testkit::eventually("the worker to stop fetching the backlog", Duration::from_secs(120), || async {
        let published = stack.outbox_rows().await == 0;
        let held = metric(&stack.client, &metrics_url, "worker_events_in_flight_bytes").await?;
        let consumed = metric(&stack.client, &metrics_url, "worker_events_consumed_total").await?;
        // Everything there is: each user's `user_created`, the warm-up events and the backlog.
        let everything = (2 * USERS + backlog) as u64;
        (published && (held >= LIMIT_BYTES || consumed >= everything)).then_some(())
    })
    .await;
    // Then a further window of samples: the lanes decode their batches and librdkafka drops what it
    // had prefetched after the pause. More samples can only raise the peak, never hide one.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let peak = sampler.peak();
    drop(sampler);
    let in_flight = metric(&stack.client, &metrics_url, "worker_events_in_flight").await.unwrap_or_default();
    let held = metric(&stack.client, &metrics_url, "worker_events_in_flight_bytes").await.unwrap_or_default();
    // In flight: the bound plus the message that crossed it; the lanes' decoded copies of the batches
    // they retry: as much again; librdkafka's prefetch queue; 16 MiB for the allocator's slack.
    let allowed = idle + 2 * LIMIT_BYTES + CONSUMER_PREFETCH_MAX_BYTES as u64 + 16 * MIB;
    let mib = |bytes: u64| bytes as f64 / MIB as f64;
    println!(
        "worker memory: peak RSS {:.1} MiB (idle {:.1} MiB, allowed {:.1} MiB) with {backlog} events of \
         {max_data_bytes} bytes of data backlogged ({in_flight} in flight holding {:.1} MiB, \
         WORKER_MAX_IN_FLIGHT_BYTES {:.0} MiB)",
        mib(peak),
        mib(idle),
        mib(allowed),
        mib(held),
        mib(LIMIT_BYTES),
    );
    assert!(peak <= allowed, "peak RSS {:.1} MiB over {:.1} MiB", mib(peak), mib(allowed));
    assert!(in_flight < backlog as u64, "the byte bound paused fetching before the backlog was all in flight");
    assert!(
        worker.output().iter().any(|line| line.contains("backpressure") && line.contains("\"pause\":true")),
        "the worker paused fetching"
    );
    assert_eq!(stack.pending_events().await, backlog as i64, "nothing applied while PostgreSQL is cut");

    proxy.restore();
    stack.wait_until_drained(Duration::from_secs(120)).await;
    for user in &users {
        let stats = stack.stats(user).await;
        assert_eq!(stats["events_by_type"], json!({"warm-up": 1, "backlog": EVENTS / USERS}), "{user}");
    }
    assert_eq!(stack.processed_events().await, (USERS + backlog) as i64);
    worker.signal("TERM");
    assert!(worker.exit_within(Duration::from_secs(30)).await.success());
}
