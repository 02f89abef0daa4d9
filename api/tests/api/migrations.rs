//! Migrations: `api migrate`, the advisory lock, `RUN_MIGRATIONS`, and `schema.rs` matching the database.

use diesel::QueryableByName;
use diesel::sql_types::{Bool, Text};
use diesel_async::RunQueryDsl;

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

#[derive(QueryableByName)]
struct ForeignKey {
    #[diesel(sql_type = Text)]
    child: String,
    #[diesel(sql_type = Text)]
    parent: String,
    #[diesel(sql_type = Text)]
    column_name: String,
}

/// `type` is a Rust keyword: such columns are `event_type` in Rust, with `#[sql_name = "type"]`.
fn rust_name(column: &str) -> &str {
    if column == "type" { "event_type" } else { column }
}

/// The schema in the exact layout of `common/src/db/schema.rs` (that of `diesel print-schema`).
fn render_schema(columns: &[ColumnInfo], foreign_keys: &[ForeignKey]) -> String {
    let mut blocks = Vec::new();
    let mut tables = Vec::new();
    for column in columns {
        if tables.last() != Some(&column.table_name) {
            tables.push(column.table_name.clone());
            let key = column.primary_key.split(", ").map(rust_name).collect::<Vec<_>>().join(", ");
            blocks.push(format!("diesel::table! {{\n    {} ({key}) {{\n", column.table_name));
        }
        let block = blocks.last_mut().unwrap();
        let sql_type = diesel_type(&column.udt_name);
        let sql_type = if column.nullable { format!("Nullable<{sql_type}>") } else { sql_type.to_owned() };
        if rust_name(&column.column_name) != column.column_name {
            block.push_str(&format!("        #[sql_name = \"{}\"]\n", column.column_name));
        }
        block.push_str(&format!("        {} -> {},\n", rust_name(&column.column_name), sql_type));
    }
    let mut rendered = blocks.iter().map(|block| format!("{block}    }}\n}}\n")).collect::<Vec<_>>().join("\n");
    if !foreign_keys.is_empty() {
        rendered.push('\n');
        for fk in foreign_keys {
            rendered.push_str(&format!("diesel::joinable!({} -> {} ({}));\n", fk.child, fk.parent, fk.column_name));
        }
    }
    if tables.len() > 1 {
        // One line while it fits rustfmt's `max_width` (120), else one table per line, as rustfmt lays it out.
        let line = format!("diesel::allow_tables_to_appear_in_same_query!({});", tables.join(", "));
        if line.len() <= 120 {
            rendered.push_str(&format!("\n{line}\n"));
        } else {
            let list = tables.iter().map(|table| format!("    {table}")).collect::<Vec<_>>().join(",\n");
            rendered.push_str(&format!("\ndiesel::allow_tables_to_appear_in_same_query!(\n{list}\n);\n"));
        }
    }
    rendered
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
        "bytea" => "Bytea",
        "jsonb" => "Jsonb",
        "timestamptz" => "Timestamptz",
        other => panic!("add a mapping for PostgreSQL type {other}"),
    }
}

use testkit::connect;

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

    let foreign_keys: Vec<ForeignKey> = diesel::sql_query(
        "SELECT src.relname::text AS child, dst.relname::text AS parent, a.attname::text AS column_name
           FROM pg_constraint c
           JOIN pg_class src ON src.oid = c.conrelid
           JOIN pg_class dst ON dst.oid = c.confrelid
           JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = c.conkey[1]
          WHERE c.contype = 'f'
          ORDER BY 1, 2",
    )
    .load(&mut conn)
    .await
    .unwrap();
    let rendered = render_schema(&columns, &foreign_keys);
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

#[tokio::test(flavor = "multi_thread")]
async fn a_users_deletion_finds_its_outbox_rows_by_index_even_with_a_generic_plan() {
    let app = spawn_app().await;
    let mut conn = connect(&app.config.database.name).await;
    // A generic plan cannot see the bound values: the index serves only if the query's own text
    // implies the partial index's condition. Sequential scans are ruled out so that the tiny test
    // table does not make the planner prefer one anyway.
    for statement in [
        "SET plan_cache_mode = force_generic_plan".to_owned(),
        "SET enable_seqscan = off".to_owned(),
        format!("PREPARE forget (text, uuid) AS {}", api::outbox::FORGET_USER),
    ] {
        diesel::sql_query(statement).execute(&mut conn).await.unwrap();
    }
    #[derive(diesel::QueryableByName)]
    struct Plan {
        #[diesel(sql_type = Text, column_name = "QUERY PLAN")]
        line: String,
    }
    let plan: Vec<Plan> = diesel::sql_query(format!("EXPLAIN EXECUTE forget ('{{}}', '{}')", uuid::Uuid::nil()))
        .load(&mut conn)
        .await
        .unwrap();
    let plan: Vec<String> = plan.into_iter().map(|row| row.line).collect();
    assert!(plan.iter().any(|line| line.contains("outbox_user_lifecycle_idx")), "{plan:#?}");
    for event_type in common::kafka::lifecycle::ALL.iter().filter(|name| **name != "user_deleted") {
        assert!(api::outbox::FORGET_USER.contains(&format!("'{event_type}'")), "{event_type}");
    }
}
