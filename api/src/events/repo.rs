//! SQL for events and stats.

use chrono::{SubsecRound, Utc};
use common::db::models::{EventRow, NewOutboxRow, UserEventStatsRow};
use common::db::prepared::{Bind, Prepared};
use common::db::schema::{events, user_event_stats, users};
use diesel::prelude::*;
use diesel::result::Error as DieselError;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::validate::ValidEvent;
use crate::http::query::Pagination;
use crate::pages;

/// Filters of the events list.
#[derive(Debug, Default, Clone)]
pub struct EventFilter {
    pub user_id: Option<Uuid>,
    pub event_type: Option<String>,
}

/// Events and the outbox rows announcing them, any number in one statement: atomic without BEGIN
/// and COMMIT, and one statement, trigger run and commit for a whole batch (see [`super::writer`]).
/// Events of users that do not exist are left out (the caller answers 404 for them) rather than
/// failing the others' foreign key; the ids of those written come back. The outbox rows are
/// inserted in the batch's order, so that their ids (the relay's publishing order) follow it.
const INSERT_WITH_MESSAGES: &str = "
WITH input AS (
    SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::timestamptz[],
                         $6::text[], $7::text[], $8::text[], $9::text[])
        WITH ORDINALITY AS input (id, user_id, type, data, created_at,
                                  payload, request_id, traceparent, tracestate, position)
), event AS (
    INSERT INTO events (id, user_id, type, data, created_at)
    SELECT id, user_id, type, data, created_at FROM input
    WHERE EXISTS (SELECT FROM users WHERE users.id = input.user_id)
    RETURNING id
)
INSERT INTO outbox (event_id, user_id, event_type, payload, request_id, traceparent, tracestate)
SELECT input.id, input.user_id, input.type, input.payload, input.request_id, input.traceparent, input.tracestate
FROM input JOIN event USING (id) ORDER BY input.position
RETURNING event_id";

/// An event to insert with its outbox message (whose `event_id` is the event's id).
#[derive(Debug, Clone)]
pub struct NewEvent {
    /// The row.
    pub row: EventRow,
    /// The message announcing it.
    pub message: NewOutboxRow,
}

/// A new pending event as it will be stored. Its `created_at` is taken here (at the precision
/// PostgreSQL keeps), so that the outbox message can be built before the insert.
pub fn new_row(event: ValidEvent) -> EventRow {
    EventRow {
        id: Uuid::now_v7(),
        user_id: event.user_id,
        event_type: event.event_type,
        data: event.data.get().to_owned(),
        status: "pending".to_owned(),
        created_at: Utc::now().trunc_subsecs(6),
        processed_at: None,
    }
}

#[derive(QueryableByName)]
struct Written {
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    event_id: Uuid,
}

/// Inserts `batch` (see [`INSERT_WITH_MESSAGES`]); returns the ids of the events written, which are
/// all but those of users that do not exist.
pub async fn insert_with_messages(conn: &mut AsyncPgConnection, batch: &[NewEvent]) -> Result<Vec<Uuid>, DieselError> {
    let ids: Vec<Uuid> = batch.iter().map(|new| new.row.id).collect();
    let user_ids: Vec<Uuid> = batch.iter().map(|new| new.row.user_id).collect();
    let types: Vec<&str> = batch.iter().map(|new| new.row.event_type.as_str()).collect();
    let data: Vec<&str> = batch.iter().map(|new| new.row.data.as_str()).collect();
    let created_at: Vec<_> = batch.iter().map(|new| new.row.created_at).collect();
    let payloads: Vec<&str> = batch.iter().map(|new| new.message.message.payload.as_str()).collect();
    let optional = |field: fn(&NewEvent) -> &Option<String>| -> Vec<Option<&str>> {
        batch.iter().map(|new| field(new).as_deref()).collect()
    };
    let request_ids = optional(|new| &new.message.message.request_id);
    let traceparents = optional(|new| &new.message.message.traceparent);
    let tracestates = optional(|new| &new.message.message.tracestate);
    let binds = vec![
        Bind::Uuids(&ids),
        Bind::Uuids(&user_ids),
        Bind::Texts(&types),
        Bind::Texts(&data),
        Bind::Timestamps(&created_at),
        Bind::Texts(&payloads),
        Bind::OptionalTexts(&request_ids),
        Bind::OptionalTexts(&traceparents),
        Bind::OptionalTexts(&tracestates),
    ];
    let written = Prepared::new(INSERT_WITH_MESSAGES, binds).load::<Written>(conn).await?;
    Ok(written.into_iter().map(|row| row.event_id).collect())
}

/// The event with this id, if any.
pub async fn find(conn: &mut AsyncPgConnection, id: Uuid) -> Result<Option<EventRow>, DieselError> {
    events::table.find(id).select(EventRow::as_select()).first(conn).await.optional()
}

/// One page, newest first, with one extra row when another page follows (see [`pages::split`]), and
/// the number of matching events.
pub async fn list(
    conn: &mut AsyncPgConnection,
    filter: &EventFilter,
    page: Pagination,
) -> Result<(Vec<EventRow>, i64), DieselError> {
    let filtered = || {
        let mut query = events::table.into_boxed();
        if let Some(user_id) = filter.user_id {
            query = query.filter(events::user_id.eq(user_id));
        }
        if let Some(event_type) = &filter.event_type {
            query = query.filter(events::event_type.eq(event_type.clone()));
        }
        query
    };
    let mut query = filtered().select(EventRow::as_select()).order((events::created_at.desc(), events::id.desc()));
    if let Some(cursor) = page.after {
        query = query.filter(pages::after_cursor(events::created_at, events::id, cursor));
    }
    let rows = pages::paged(query, page).load(conn).await?;
    let total = if filter.user_id.is_none() && filter.event_type.is_none() {
        pages::total(conn, "events").await?
    } else {
        filtered().count().get_result(conn).await?
    };
    Ok((rows, total))
}

/// Whether the user exists.
pub async fn user_exists(conn: &mut AsyncPgConnection, id: Uuid) -> Result<bool, DieselError> {
    diesel::select(diesel::dsl::exists(users::table.find(id))).get_result(conn).await
}

/// The worker's counters for a user, one row per event type.
pub async fn stats(conn: &mut AsyncPgConnection, user_id: Uuid) -> Result<Vec<UserEventStatsRow>, DieselError> {
    user_event_stats::table
        .filter(user_event_stats::user_id.eq(user_id))
        .select(UserEventStatsRow::as_select())
        .load(conn)
        .await
}
