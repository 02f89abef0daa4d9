//! Chaos soak: two api replicas and two workers (processes, in a network namespace) against one
//! PostgreSQL, Redis and broker, each reached through a fault proxy; a steady mixed workload records
//! every acknowledged write while a schedule of faults drawn from a seed kills, restarts, freezes
//! (`SIGSTOP`), cuts (connections closed) and partitions (packets dropped) things. Then, healed
//! and drained, the invariants of SPEC §3 are checked against that record:
//!
//! - every acknowledged event is processed, and counted exactly once (the counters equal the
//!   processed events, per user and type, and the acknowledged ones for users with no uncertain write);
//! - no acknowledged user write is lost; a deleted user and its events are gone everywhere;
//! - no read after an acknowledged write showed the state before it;
//! - the outbox is drained, nothing is pending or dead-lettered, and no process panicked.
//!
//! `CHAOS_SECONDS` (default 75) and `CHAOS_SEED` (default from the clock; printed, and
//! replays the same workload and sequence of faults) tune it; `scripts/chaos` runs the long soak.

#![expect(clippy::print_stdout, reason = "the soak's summary table is its report")]

mod cluster;
mod workload;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use diesel::QueryableByName;
use diesel::sql_types::{BigInt, Text};
use diesel_async::RunQueryDsl;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::Value;
use tokio::sync::watch;

use self::cluster::{Cluster, Fault};
use self::workload::Record;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_soak_loses_nothing_and_applies_nothing_twice() {
    let seconds: u64 = std::env::var("CHAOS_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(75);
    let seed: u64 = std::env::var("CHAOS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    });
    println!("chaos: seed {seed} (CHAOS_SEED={seed} replays it), {seconds} s");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .default_headers(testkit::auth::all_scopes_headers())
        .build()
        .unwrap();
    let mut cluster = Cluster::start(&client).await;

    let record = Arc::new(Mutex::new(Record::default()));
    let (stop, stopped) = watch::channel(false);
    let clients = tokio::spawn(workload::run(cluster.api_urls(), seed, 4, 8.0, Arc::clone(&record), stopped));

    let mut faults: BTreeMap<Fault, u32> = BTreeMap::new();
    let mut rng = StdRng::seed_from_u64(seed);
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(seconds) {
        tokio::time::sleep(Duration::from_millis(rng.random_range(2_000..6_000))).await;
        let fault = Fault::ALL[rng.random_range(0..Fault::ALL.len())];
        let which = rng.random_range(0..2);
        // A freeze may outlast the consumer session (6 s) and the publisher's lease (4 s).
        let longest = if matches!(fault, Fault::FreezeApi | Fault::FreezeWorker) { 9_000 } else { 4_000 };
        let outage = Duration::from_millis(rng.random_range(500..longest));
        let at = started.elapsed().as_secs_f64();
        cluster.inject(fault, which, outage, &client).await;
        *faults.entry(fault).or_default() += 1;
        // The fault timeline, with the backlog, so a stall can be matched to what preceded it.
        let pending = count(&cluster.database, "SELECT count(*) AS count FROM events WHERE status = 'pending'").await;
        println!("chaos {at:7.1} s: {} (#{which}, {} ms); {pending} events pending", fault.label(), outage.as_millis());
    }
    stop.send(true).unwrap();
    clients.await.unwrap();
    let ran_for = started.elapsed();

    // Healed (every fault undoes itself); every process must still be up by itself.
    let mut crashed = Vec::new();
    for service in cluster.apis.iter_mut().chain(cluster.workers.iter_mut()) {
        if !service.is_running() {
            crashed.push(service.name.clone());
        }
    }
    let drained = wait_until_drained(&cluster.database, Duration::from_secs(180)).await;
    let record = Arc::try_unwrap(record).ok().unwrap().into_inner().unwrap();
    let checks = check_invariants(&cluster, &client, &record).await;
    let mut results = vec![
        ("no process died by itself".to_owned(), crashed.is_empty(), format!("{crashed:?}")),
        (
            "outbox drained, nothing pending (within 180 s)".to_owned(),
            drained.is_ok(),
            drained.err().unwrap_or_default(),
        ),
    ];
    results.extend(checks);
    let panics = cluster.panics();
    results.push(("no panic in any log".to_owned(), panics.is_empty(), panics.join("\n")));

    print_summary(seed, ran_for, &record, &faults, &results);
    let failed: Vec<_> =
        results.iter().filter(|(_, ok, _)| !ok).map(|(name, _, detail)| format!("{name}: {detail}")).collect();
    assert!(
        failed.is_empty(),
        "chaos seed {seed}: invariants violated (process logs in {}):\n{}",
        cluster.log_dir.display(),
        failed.join("\n")
    );
    let _ = std::fs::remove_dir_all(&cluster.log_dir);
    for service in cluster.apis.iter_mut().chain(cluster.workers.iter_mut()) {
        service.kill().await;
    }
    testkit::drop_database(&cluster.database).await;
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    count: i64,
}

#[derive(QueryableByName, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct UserTypeCount {
    #[diesel(sql_type = Text)]
    user_id: String,
    #[diesel(sql_type = Text)]
    event_type: String,
    #[diesel(sql_type = BigInt)]
    count: i64,
}

#[derive(QueryableByName)]
struct EventState {
    #[diesel(sql_type = Text)]
    id: String,
    #[diesel(sql_type = Text)]
    status: String,
}

async fn count(database: &str, sql: &str) -> i64 {
    let mut conn = testkit::connect(database).await;
    diesel::sql_query(sql).get_result::<Count>(&mut conn).await.unwrap().count
}

async fn wait_until_drained(database: &str, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        let outbox = count(database, "SELECT count(*) AS count FROM outbox").await;
        let pending = count(database, "SELECT count(*) AS count FROM events WHERE status = 'pending'").await;
        if outbox == 0 && pending == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("{outbox} outbox rows and {pending} pending events left"));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn check_invariants(cluster: &Cluster, client: &reqwest::Client, record: &Record) -> Vec<(String, bool, String)> {
    let db = &cluster.database;
    let mut conn = testkit::connect(db).await;
    let mut results = Vec::new();

    // Every acknowledged event of a user that still exists is processed; a deleted user's are gone.
    let states: HashMap<String, String> = diesel::sql_query("SELECT id::text, status FROM events")
        .load::<EventState>(&mut conn)
        .await
        .unwrap()
        .into_iter()
        .map(|event| (event.id, event.status))
        .collect();
    let mut lost = Vec::new();
    let mut of_deleted = Vec::new();
    for (id, (user, _)) in &record.events {
        let user_state = &record.users[user];
        match states.get(id).map(String::as_str) {
            Some("processed") if user_state.deleted && !user_state.uncertain => of_deleted.push(id.clone()),
            Some("processed") => {}
            None if user_state.deleted => {}
            other => lost.push(format!("{id}: {other:?}")),
        }
    }
    results.push((
        format!("every acknowledged event processed ({} events)", record.events.len()),
        lost.is_empty(),
        lost.join(", "),
    ));
    let failed = count(db, "SELECT count(*) AS count FROM events WHERE status = 'failed'").await;
    results.push(("nothing dead-lettered".to_owned(), failed == 0, format!("{failed} failed events")));

    // Exactly once in effect: the counters are the processed events, per user and type.
    let counted: Vec<UserTypeCount> =
        diesel::sql_query("SELECT user_id::text, type AS event_type, count FROM user_event_stats ORDER BY 1, 2")
            .load(&mut conn)
            .await
            .unwrap();
    let processed: Vec<UserTypeCount> = diesel::sql_query(
        "SELECT user_id::text, type AS event_type, count(*) AS count FROM events WHERE status = 'processed'
          GROUP BY 1, 2 ORDER BY 1, 2",
    )
    .load(&mut conn)
    .await
    .unwrap();
    let mismatch = counted.len() != processed.len() || counted.iter().zip(&processed).any(|(a, b)| a != b);
    let total: i64 = counted.iter().map(|row| row.count).sum();
    results.push((
        format!("counters equal processed events ({} counters, {total} events)", counted.len()),
        !mismatch,
        format!("counters {counted:?} vs processed {processed:?}").chars().take(2000).collect(),
    ));
    // And, for users whose every write is known, they equal what was acknowledged.
    let mut acked: HashMap<(&str, &str), i64> = HashMap::new();
    for (user, event_type) in record.events.values() {
        *acked.entry((user, event_type)).or_default() += 1;
    }
    let counted_by_key: HashMap<(&str, &str), i64> =
        counted.iter().map(|row| ((row.user_id.as_str(), row.event_type.as_str()), row.count)).collect();
    let mut differing = Vec::new();
    let mut certain_users = 0;
    for (user, state) in &record.users {
        if state.uncertain || state.deleted {
            continue;
        }
        certain_users += 1;
        for event_type in ["login", "click", "view"] {
            let want = acked.get(&(user.as_str(), event_type)).copied().unwrap_or(0);
            let have = counted_by_key.get(&(user.as_str(), event_type)).copied().unwrap_or(0);
            // An event POST with an unknown outcome may have been applied: at least the acknowledged ones.
            if have < want {
                differing.push(format!("{user}/{event_type}: counted {have}, acknowledged {want}"));
            }
        }
    }
    results.push((
        format!("counters ≥ acknowledged events for every user ({certain_users} users with known state)"),
        differing.is_empty(),
        differing.join(", "),
    ));

    // Users: acknowledged state served by both replicas; deleted users gone with their events and stats.
    let mut wrong = Vec::new();
    for (user, state) in &record.users {
        if state.uncertain {
            continue;
        }
        for api in cluster.api_urls() {
            let (status, body) = get(client, &format!("{api}/api/v1/users/{user}")).await;
            let ok = if state.deleted {
                status == 404
                    && get(client, &format!("{api}/api/v1/users/{user}/stats")).await.0 == 404
                    && get(client, &format!("{api}/api/v1/events?user_id={user}")).await.1["total"] == 0
            } else {
                status == 200 && body["first_name"].as_str() == Some(state.first_name.as_str())
            };
            if !ok {
                wrong.push(format!("{api} {user}: {status} {body} (expected {state:?})"));
            }
        }
    }
    let deleted = record.users.values().filter(|user| user.deleted && !user.uncertain).count();
    results.push((
        format!("acknowledged user writes kept, deletions complete ({} users, {deleted} deleted)", record.users.len()),
        wrong.is_empty() && of_deleted.is_empty(),
        format!("{wrong:?} events of deleted users: {of_deleted:?}"),
    ));
    results.push((
        "no stale read after an acknowledged write".to_owned(),
        record.stale_reads.is_empty(),
        record.stale_reads.join("\n"),
    ));
    results.push((
        "no answer contradicting the record".to_owned(),
        record.anomalies.is_empty(),
        record.anomalies.join("\n"),
    ));
    results
}

async fn get(client: &reqwest::Client, url: &str) -> (u16, Value) {
    match client.get(url).send().await {
        Ok(response) => {
            let status = response.status().as_u16();
            (status, response.json().await.unwrap_or(Value::Null))
        }
        Err(err) => (0, Value::String(err.to_string())),
    }
}

fn print_summary(
    seed: u64,
    ran_for: Duration,
    record: &Record,
    faults: &BTreeMap<Fault, u32>,
    results: &[(String, bool, String)],
) {
    let mut out = format!("\nchaos summary: seed {seed}, workload ran {:.0} s\n\n", ran_for.as_secs_f64());
    out.push_str("| operation | acked | refused | unknown outcome |\n|---|---|---|---|\n");
    let mut by_operation: BTreeMap<&str, [u64; 3]> = BTreeMap::new();
    for ((operation, outcome), n) in &record.operations {
        let column = match *outcome {
            "acked" => 0,
            "refused" => 1,
            _ => 2,
        };
        by_operation.entry(operation).or_default()[column] += n;
    }
    for (operation, [acked, refused, unknown]) in &by_operation {
        out.push_str(&format!("| {operation} | {acked} | {refused} | {unknown} |\n"));
    }
    out.push_str("\n| fault | injected |\n|---|---|\n");
    for fault in Fault::ALL {
        out.push_str(&format!("| {} | {} |\n", fault.label(), faults.get(&fault).copied().unwrap_or(0)));
    }
    out.push_str("\n| invariant | result |\n|---|---|\n");
    for (name, ok, _) in results {
        out.push_str(&format!("| {name} | {} |\n", if *ok { "pass" } else { "FAIL" }));
    }
    println!("{out}");
}
