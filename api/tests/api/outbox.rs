//! The outbox relay's session (SPEC §3). Delivery itself is tested end to end in `worker/tests`.

use common::postgres::Connector;
use diesel::QueryableByName;
use diesel::sql_types::Text;
use diesel_async::RunQueryDsl;

use crate::helpers::spawn_app;

#[derive(QueryableByName)]
struct Setting {
    #[diesel(sql_type = Text)]
    plan_cache_mode: String,
}

/// The relay's session plans every statement for the outbox as it is at that moment: a generic plan
/// cached while the outbox was empty scans the whole table for every batch of a later backlog
/// (api::outbox::relay::connector; BENCHMARKS.md, "The relay's plans"). The server itself reports the setting.
#[tokio::test(flavor = "multi_thread")]
async fn the_relays_session_plans_each_statement_for_the_outbox_as_it_is() {
    let app = spawn_app().await;
    let mut conn = api::outbox::relay::connector(&app.config.database).unwrap().connect().await.unwrap();
    let setting: Setting = diesel::sql_query("SHOW plan_cache_mode").get_result(&mut conn).await.unwrap();
    assert_eq!(setting.plan_cache_mode, "force_custom_plan");
    let default: Setting = diesel::sql_query("SHOW plan_cache_mode")
        .get_result(&mut Connector::new(&app.config.database, "test").unwrap().connect().await.unwrap())
        .await
        .unwrap();
    assert_eq!(default.plan_cache_mode, "auto", "other sessions keep PostgreSQL's default");
}
