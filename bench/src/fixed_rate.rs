//! Posts events at a fixed rate (open loop: requests are sent on schedule whether or not earlier ones
//! finished), for the worker's processing-delay measurement in `bench/run`.
//!
//! Usage: `fixed-rate <api base url> <rate per second> <seconds> <file of user ids>`; prints the
//! number of events acknowledged and the number refused (any other answer, or none). Refusals are
//! reported, not fatal: an overloaded api shedding load with 503 is behaving as designed.
//!
//! Why not `oha -q` or k6: each event here goes to a user drawn from the seeded ids, as real traffic
//! does. oha sends one constant body, which would put every event on one user, so on one Kafka key,
//! one partition and one worker lane, and the delay measured would be that lane's queue. k6 could
//! vary the body, but it would be one more tool to install for this one measurement, where these
//! forty lines reuse the workspace's own HTTP client.

use std::time::{Duration, Instant};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, base, rate, seconds, ids] = args.as_slice() else {
        anyhow::bail!("usage: fixed-rate <api base url> <rate per second> <seconds> <file of user ids>");
    };
    let rate: f64 = rate.parse()?;
    let seconds: f64 = seconds.parse()?;
    let users: Vec<String> = std::fs::read_to_string(ids)?.lines().map(str::to_owned).collect();
    anyhow::ensure!(!users.is_empty(), "no user ids in {ids}");
    let client = reqwest::Client::builder().pool_max_idle_per_host(256).build()?;
    let url = format!("{base}/api/v1/events");
    let total = (rate * seconds) as usize;
    let interval = Duration::from_secs_f64(1.0 / rate);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(total);
    for n in 0..total {
        tokio::time::sleep_until((started + interval * n as u32).into()).await;
        let (client, url) = (client.clone(), url.clone());
        let body = serde_json::json!({"user_id": users[n % users.len()], "type": "bench", "data": {"n": n}});
        tasks.push(tokio::spawn(async move {
            client.post(&url).json(&body).send().await.map(|r| r.status().as_u16() == 201).unwrap_or(false)
        }));
    }
    let mut acknowledged = 0;
    for task in tasks {
        if task.await.unwrap_or(false) {
            acknowledged += 1;
        }
    }
    #[expect(clippy::print_stdout, reason = "the result is the program's output")]
    {
        println!("{acknowledged} {}", total - acknowledged);
    }
    Ok(())
}
