//! `effects::apply` on its own, against a migrated database: a batch is committed whole or not at all.

use common::config::Config;
use common::kafka::EventMessage;
use diesel::QueryableByName;
use diesel::sql_types::{BigInt, Text};
use diesel_async::RunQueryDsl;
use serde_json::json;
use uuid::Uuid;
use worker::effects::{self, Applied, EffectError};

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
    let pool = common::pool::build(&config.database, "test").unwrap();
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

    let refused = effects::apply(&pool, &batch).await;
    assert!(matches!(&refused, Err(EffectError::Failed(reason)) if reason.contains("deletion refused")), "{refused:?}");
    assert_eq!(state().await, ("pending".to_owned(), 0), "the claim was rolled back with the deletion");

    diesel::sql_query("DROP TRIGGER refuse ON user_event_stats").execute(&mut admin).await.unwrap();
    assert_eq!(effects::apply(&pool, &batch).await.unwrap(), [Applied::Processed, Applied::Lifecycle]);
    assert_eq!(state().await, ("processed".to_owned(), 1));
}
