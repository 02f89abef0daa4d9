//! Mirrors `migrations/`; the api's `schema_rs_matches_the_migrations` test fails when the two drift.

diesel::table! {
    events (id) {
        id -> Uuid,
        user_id -> Uuid,
        #[sql_name = "type"]
        event_type -> Text,
        data -> Text,
        status -> Text,
        created_at -> Timestamptz,
        processed_at -> Nullable<Timestamptz>,
    }
}

diesel::table! {
    idempotency_keys (client_id, idempotency_key) {
        client_id -> Text,
        idempotency_key -> Text,
        method -> Text,
        path -> Text,
        body_sha256 -> Text,
        status -> Int4,
        location -> Nullable<Text>,
        response_body -> Bytea,
        created_at -> Timestamptz,
        expires_at -> Timestamptz,
    }
}

diesel::table! {
    outbox (id) {
        id -> Int8,
        event_id -> Uuid,
        user_id -> Uuid,
        event_type -> Text,
        payload -> Text,
        request_id -> Nullable<Text>,
        created_at -> Timestamptz,
        traceparent -> Nullable<Text>,
        tracestate -> Nullable<Text>,
    }
}

diesel::table! {
    outbox_publisher (singleton) {
        singleton -> Bool,
        epoch -> Int8,
        expires_at -> Timestamptz,
    }
}

diesel::table! {
    row_counts (table_name, shard) {
        table_name -> Text,
        shard -> Int4,
        count -> Int8,
    }
}

diesel::table! {
    user_event_stats (user_id, event_type) {
        user_id -> Uuid,
        #[sql_name = "type"]
        event_type -> Text,
        count -> Int8,
        last_event_at -> Timestamptz,
    }
}

diesel::table! {
    users (id) {
        id -> Uuid,
        email -> Text,
        first_name -> Text,
        last_name -> Text,
        version -> Int8,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
    }
}

diesel::joinable!(events -> users (user_id));
diesel::joinable!(user_event_stats -> users (user_id));

diesel::allow_tables_to_appear_in_same_query!(
    events,
    idempotency_keys,
    outbox,
    outbox_publisher,
    row_counts,
    user_event_stats,
    users
);
