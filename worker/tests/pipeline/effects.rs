//! `Effects::apply` on its own, against a migrated database: a batch is committed whole or not at all,
//! alone or merged with other lanes' batches.

use common::config::Config;
use common::kafka::EventMessage;
use diesel::QueryableByName;
use diesel::sql_types::{BigInt, Text};
use diesel_async::RunQueryDsl;
use serde_json::json;
use uuid::Uuid;
use worker::effects::{Applied, EffectError, Effects};
use worker::metrics::WorkerMetrics;

#[derive(QueryableByName)]
struct Row {
    #[diesel(sql_type = Text)]
    status: String,
    #[diesel(sql_type = BigInt)]
    counted: i64,
}

fn message(id: Uuid, user_id: Uuid, event_type: &str) -> EventMessage {
    let value =
        json!({"id": id, "user_id": user_id, "type": event_type, "data": {}, "timestamp": "2026-12-01T00:00:00Z"});
    serde_json::from_value(value).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_with_a_deletion_is_committed_whole_or_not_at_all() {
    let mut vars = testkit::service_vars();
    let database = testkit::create_database().await;
    vars.insert("DB_NAME".into(), database.clone());
    let config = Config::from_lookup(|name| vars.get(name).cloned()).unwrap();
    api::db::migrate(&config.database).await.unwrap();
    let (kept, deleted, event) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let mut admin = testkit::connect(&database).await;
    for statement in [
        format!(
            "INSERT INTO users (id, email, first_name, last_name, version, created_at, updated_at) VALUES \
             ('{kept}', 'kept@example.com', 'K', 'U', 1, now(), now()), \
             ('{deleted}', 'gone@example.com', 'G', 'U', 1, now(), now())"
        ),
        format!(
            "INSERT INTO events (id, user_id, type, data, status, created_at) \
             VALUES ('{event}', '{kept}', 'login', '{{}}', 'pending', now())"
        ),
        // The deletion's statement fails (even with no row to delete: a statement trigger).
        "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN RAISE EXCEPTION 'deletion refused'; END $$"
            .to_owned(),
        "CREATE TRIGGER refuse BEFORE DELETE ON user_event_stats FOR EACH STATEMENT EXECUTE FUNCTION refuse()"
            .to_owned(),
    ] {
        diesel::sql_query(statement).execute(&mut admin).await.unwrap();
    }
    let pool = worker::pool(&config.database).unwrap();
    let effects = Effects::start(pool, WorkerMetrics::new().statement_batches);
    let batch = [message(event, kept, "login"), message(Uuid::new_v4(), deleted, "user_deleted")];
    let batch: Vec<&EventMessage> = batch.iter().collect();
    let state = async || {
        let query = format!(
            "SELECT status, (SELECT coalesce(sum(count), 0)::bigint FROM user_event_stats) AS counted \
             FROM events WHERE id = '{event}'"
        );
        let row: Row = diesel::sql_query(query).get_result(&mut testkit::connect(&database).await).await.unwrap();
        (row.status, row.counted)
    };

    let refused = effects.apply(&batch).await;
    assert!(matches!(&refused, Err(EffectError::Failed(reason)) if reason.contains("deletion refused")), "{refused:?}");
    assert_eq!(state().await, ("pending".to_owned(), 0), "the claim was rolled back with the deletion");

    diesel::sql_query("DROP TRIGGER refuse ON user_event_stats").execute(&mut admin).await.unwrap();
    assert_eq!(effects.apply(&batch).await.unwrap(), [Applied::Processed, Applied::Lifecycle]);
    assert_eq!(state().await, ("processed".to_owned(), 1));
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    count: i64,
}

async fn count(database: &str, sql: String) -> i64 {
    diesel::sql_query(sql).get_result::<Count>(&mut testkit::connect(database).await).await.unwrap().count
}

/// Lanes' batches queued together share a statement; one that fails then fails alone, as it would
/// have by itself, and every other batch of that statement is applied.
#[tokio::test(flavor = "multi_thread")]
async fn a_failing_batch_merged_with_others_fails_alone() {
    let mut vars = testkit::service_vars();
    let database = testkit::create_database().await;
    vars.insert("DB_NAME".into(), database.clone());
    // The statements wait on a lock the test holds: no timeout may cut them short on a slow machine.
    vars.insert("DB_STATEMENT_TIMEOUT_MS".into(), "60000".into());
    let config = Config::from_lookup(|name| vars.get(name).cloned()).unwrap();
    api::db::migrate(&config.database).await.unwrap();
    let mut admin = testkit::connect(&database).await;
    for statement in [
        "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN RAISE EXCEPTION 'deletion refused'; END $$",
        "CREATE TRIGGER refuse BEFORE DELETE ON user_event_stats FOR EACH STATEMENT EXECUTE FUNCTION refuse()",
    ] {
        diesel::sql_query(statement).execute(&mut admin).await.unwrap();
    }
    let slots = worker::effects::STATEMENTS_IN_FLIGHT;
    let merged = worker::effects::MAX_MERGED;
    let users: Vec<Uuid> = (0..slots + merged).map(|_| Uuid::new_v4()).collect();
    let events: Vec<Uuid> = users.iter().map(|_| Uuid::new_v4()).collect();
    for (user, event) in users.iter().zip(&events) {
        diesel::sql_query(format!(
            "WITH u AS (INSERT INTO users (id, email, first_name, last_name, version, created_at, updated_at) \
             VALUES ('{user}', '{user}@example.com', 'F', 'L', 1, now(), now())) \
             INSERT INTO events (id, user_id, type, data, status, created_at) \
             VALUES ('{event}', '{user}', 'login', '{{}}', 'pending', now())"
        ))
        .execute(&mut admin)
        .await
        .unwrap();
    }
    let metrics = WorkerMetrics::new();
    let effects = Effects::start(worker::pool(&config.database).unwrap(), metrics.statement_batches.clone());
    let apply = |n: usize, refused: bool| {
        let (effects, user, event) = (effects.clone(), users[n], events[n]);
        tokio::spawn(async move {
            let mut batch = vec![message(event, user, "login")];
            if refused {
                batch.push(message(Uuid::new_v4(), user, "user_deleted"));
            }
            effects.apply(&batch.iter().collect::<Vec<_>>()).await
        })
    };

    // Every statement slot is taken by a batch waiting on the counters' lock, one after the other.
    let mut blocker = testkit::connect(&database).await;
    diesel::sql_query("BEGIN").execute(&mut blocker).await.unwrap();
    diesel::sql_query("LOCK TABLE user_event_stats IN SHARE MODE").execute(&mut blocker).await.unwrap();
    let waiting =
        format!("SELECT count(*) FROM pg_stat_activity WHERE datname = '{database}' AND wait_event_type = 'Lock'");
    let mut blocked = Vec::new();
    for n in 0..slots {
        blocked.push(apply(n, false));
        testkit::eventually("a statement waiting on the lock", std::time::Duration::from_secs(10), || {
            let (database, waiting) = (database.clone(), waiting.clone());
            async move { (count(&database, waiting).await == n as i64 + 1).then_some(()) }
        })
        .await;
    }
    // So these queue, and the next statement takes them all; the last one's deletion is refused.
    let queued: Vec<_> = (slots..slots + merged).map(|n| apply(n, n == slots + merged - 1)).collect();
    testkit::eventually("the batches queued", std::time::Duration::from_secs(10), || {
        let queued = effects.queued();
        async move { (queued == merged).then_some(()) }
    })
    .await;
    diesel::sql_query("COMMIT").execute(&mut blocker).await.unwrap();

    for applying in blocked {
        assert_eq!(applying.await.unwrap().unwrap(), [Applied::Processed]);
    }
    for (n, applying) in queued.into_iter().enumerate() {
        let result = applying.await.unwrap();
        if n == merged - 1 {
            assert!(
                matches!(&result, Err(EffectError::Failed(reason)) if reason.contains("deletion refused")),
                "{result:?}"
            );
        } else {
            assert_eq!(result.unwrap(), [Applied::Processed], "queued batch {n}");
        }
    }
    let ids = events.iter().map(|id| format!("'{id}'")).collect::<Vec<_>>().join(",");
    let processed =
        count(&database, format!("SELECT count(*) FROM events WHERE status = 'processed' AND id IN ({ids})")).await;
    assert_eq!(processed, (slots + merged - 1) as i64, "every batch but the refused one is applied");
    // The fillers went one per statement, the queued batches in one.
    let statements = (metrics.statement_batches.get_sample_count(), metrics.statement_batches.get_sample_sum());
    assert_eq!(statements, (slots as u64 + 1, (slots + merged) as f64));
}

/// The worker's sessions plan each statement once and keep the plan: everything the worker runs finds
/// its rows by id (BENCHMARKS.md, "One plan per statement for the writers"). The server reports it.
#[tokio::test(flavor = "multi_thread")]
async fn the_workers_sessions_keep_one_plan_per_statement() {
    let mut vars = testkit::service_vars();
    vars.insert("DB_NAME".into(), testkit::create_database().await);
    let config = Config::from_lookup(|name| vars.get(name).cloned()).unwrap();
    let pool = worker::pool(&config.database).unwrap();
    let mode = pool.run(|conn| Box::pin(async { anyhow::Ok(testkit::plan_cache_mode(conn).await?) })).await.unwrap();
    assert_eq!(mode, "force_generic_plan");
}
