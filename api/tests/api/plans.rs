//! How the api's sessions plan their statements: each kind of session as its statements need
//! (BENCHMARKS.md, "The relay's plans" and "Where PostgreSQL's work per event goes, with group commit").

use common::postgres::Connector;
use diesel::QueryableByName;
use diesel::sql_types::Text;
use diesel_async::RunQueryDsl;
use serde_json::json;
use testkit::plan_cache_mode;

use crate::helpers::{spawn_app, unique_email};

async fn pooled_plan_cache_mode(pool: &api::db::DbPool) -> String {
    pool.run(|conn| Box::pin(async { anyhow::Ok(plan_cache_mode(conn).await?) })).await.unwrap()
}

/// The relay's session plans every statement for the outbox as it is at that moment: a generic plan
/// cached while the outbox was empty scans the whole table for every batch of a later backlog
/// (api::outbox::relay::connector). The server itself reports the setting.
#[tokio::test(flavor = "multi_thread")]
async fn the_relays_session_plans_each_statement_for_the_outbox_as_it_is() {
    let app = spawn_app().await;
    let mut conn = api::outbox::relay::connector(&app.config.database).unwrap().connect().await.unwrap();
    assert_eq!(plan_cache_mode(&mut conn).await.unwrap(), "force_custom_plan");
    let mut default = Connector::new(&app.config.database, "test").unwrap().connect().await.unwrap();
    assert_eq!(plan_cache_mode(&mut default).await.unwrap(), "auto", "other sessions keep PostgreSQL's default");
}

/// The events insert (a batch of arrays, found by key) runs on the event writer's own sessions, which
/// keep one plan per statement; the pool serving lists and filters keeps PostgreSQL's default, which
/// plans a filter for the value asked.
#[tokio::test(flavor = "multi_thread")]
async fn posted_events_are_inserted_by_sessions_that_keep_one_plan_and_lists_by_sessions_that_plan_per_value() {
    let app = spawn_app().await;
    let user = app.create_user(&unique_email("plans")).await;
    let event = json!({"user_id": user["id"], "type": "login", "data": {}});
    let response = app.client.post(app.url("/api/v1/events")).json(&event).send().await.unwrap();
    assert_eq!(response.status(), 201);

    #[derive(QueryableByName)]
    struct Session {
        #[diesel(sql_type = Text)]
        application_name: String,
    }
    // Whose sessions last ran the insert (every session of the test's database; a superuser sees all).
    let mut admin = testkit::connect(&app.config.database.name).await;
    let inserters: Vec<Session> = diesel::sql_query(
        "SELECT application_name FROM pg_stat_activity
          WHERE datname = current_database() AND query LIKE '%INSERT INTO events%' AND pid <> pg_backend_pid()",
    )
    .load(&mut admin)
    .await
    .unwrap();
    let names: Vec<&str> = inserters.iter().map(|session| session.application_name.as_str()).collect();
    assert_eq!(names, [api::db::EVENTS_APPLICATION_NAME], "sessions that ran the events insert");

    let events = api::db::events_pool(&app.config.database).unwrap();
    assert_eq!(pooled_plan_cache_mode(&events).await, "force_generic_plan");
    let lists = api::db::pool(&app.config.database).unwrap();
    assert_eq!(pooled_plan_cache_mode(&lists).await, "auto");
}
