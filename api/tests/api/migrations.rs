//! Migrations: `api migrate`, the advisory lock, `RUN_MIGRATIONS`, and `schema.rs` matching the database.

use diesel::QueryableByName;
use diesel::sql_types::{Bool, Text};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};

use crate::helpers::{create_database, spawn_app, spawn_app_with};

const SCHEMA_RS: &str = include_str!("../../../common/src/db/schema.rs");

#[derive(QueryableByName)]
struct ColumnInfo {
    #[diesel(sql_type = Text)]
    table_name: String,
    #[diesel(sql_type = Text)]
    column_name: String,
    #[diesel(sql_type = Text)]
    udt_name: String,
    #[diesel(sql_type = Bool)]
    nullable: bool,
    #[diesel(sql_type = Text)]
    primary_key: String,
}

fn diesel_type(udt_name: &str) -> &str {
    match udt_name {
        "uuid" => "Uuid",
        "text" => "Text",
        "varchar" => "Varchar",
        "int2" => "Int2",
        "int4" => "Int4",
        "int8" => "Int8",
        "bool" => "Bool",
        "jsonb" => "Jsonb",
        "timestamptz" => "Timestamptz",
        other => panic!("add a mapping for PostgreSQL type {other}"),
    }
}

async fn connect(database: &str) -> AsyncPgConnection {
    AsyncPgConnection::establish(&format!("host=127.0.0.1 user=postgres password=postgres dbname={database}"))
        .await
        .unwrap()
}

/// Renders the migrated database the way `diesel print-schema` would, and compares it with
/// `common/src/db/schema.rs`, so that neither can change without the other.
#[tokio::test(flavor = "multi_thread")]
async fn schema_rs_matches_the_migrations() {
    let app = spawn_app().await;
    let mut conn = connect(&app.config.database.name).await;
    let columns: Vec<ColumnInfo> = diesel::sql_query(
        "SELECT c.table_name::text, c.column_name::text, c.udt_name::text, c.is_nullable = 'YES' AS nullable,
                (SELECT string_agg(k.column_name, ', ' ORDER BY k.ordinal_position)
                   FROM information_schema.table_constraints t
                   JOIN information_schema.key_column_usage k USING (constraint_schema, constraint_name)
                  WHERE t.table_name = c.table_name AND t.constraint_type = 'PRIMARY KEY')::text AS primary_key
           FROM information_schema.columns c
          WHERE c.table_schema = 'public' AND c.table_name NOT LIKE '\\_\\_diesel%'
          ORDER BY c.table_name, c.ordinal_position",
    )
    .load(&mut conn)
    .await
    .unwrap();
    assert!(!columns.is_empty());

    let mut rendered = String::new();
    let mut current_table = None;
    for column in &columns {
        if current_table != Some(&column.table_name) {
            if current_table.is_some() {
                rendered.push_str("    }\n}\n\n");
            }
            rendered.push_str(&format!("diesel::table! {{\n    {} ({}) {{\n", column.table_name, column.primary_key));
            current_table = Some(&column.table_name);
        }
        let sql_type = diesel_type(&column.udt_name);
        let sql_type = if column.nullable { format!("Nullable<{sql_type}>") } else { sql_type.to_owned() };
        rendered.push_str(&format!("        {} -> {},\n", column.column_name, sql_type));
    }
    rendered.push_str("    }\n}\n");

    let declared = &SCHEMA_RS[SCHEMA_RS.find("diesel::table!").unwrap()..];
    assert_eq!(declared.trim(), rendered.trim(), "common/src/db/schema.rs differs from the migrated database");
}

#[tokio::test(flavor = "multi_thread")]
async fn migrate_command_applies_migrations_and_is_idempotent() {
    let database = create_database().await;
    for _ in 0..2 {
        let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_api"))
            .arg("migrate")
            .env("DB_HOST", "127.0.0.1")
            .env("DB_NAME", &database)
            .env("LOG_FORMAT", "json")
            .output()
            .await
            .unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    }
    let mut conn = connect(&database).await;
    let count: i64 = diesel::dsl::select(diesel::dsl::sql::<diesel::sql_types::BigInt>(
        "(SELECT count(*) FROM __diesel_schema_migrations)",
    ))
    .get_result(&mut conn)
    .await
    .unwrap();
    assert_eq!(count as usize, std::fs::read_dir("../migrations").unwrap().count());
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_starts_take_turns_on_the_migration_lock() {
    let database = create_database().await;
    let starts = (0..4).map(|_| {
        let database = database.clone();
        tokio::spawn(async move {
            let config = common::config::Config::from_lookup(|name| match name {
                "DB_HOST" => Some("127.0.0.1".into()),
                "DB_NAME" => Some(database.clone()),
                _ => None,
            })
            .unwrap();
            api::db::migrate(&config.database).await
        })
    });
    for start in starts.collect::<Vec<_>>() {
        start.await.unwrap().expect("every concurrent migration run succeeds");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn run_migrations_false_leaves_the_schema_alone() {
    let app = spawn_app_with(&[("RUN_MIGRATIONS", "false")]).await;
    let mut conn = connect(&app.config.database.name).await;
    let exists: bool = diesel::dsl::select(diesel::dsl::sql::<Bool>("to_regclass('users') IS NOT NULL"))
        .get_result(&mut conn)
        .await
        .unwrap();
    assert!(!exists);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_variable_stops_the_binary_naming_it() {
    for (var, value) in [("SERVER_PORT", "eighty"), ("CACHE_TTL", "-5"), ("LOG_LEVEL", "[[[")] {
        let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_api")).env(var, value).output().await.unwrap();
        assert!(!output.status.success(), "{var}={value} was accepted");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(var), "{var}: {stderr}");
    }
}
