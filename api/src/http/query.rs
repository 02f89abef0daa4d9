//! Query-string parameters of the list endpoints: `page`/`limit`, or `cursor`/`limit`.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::error::ApiError;

/// Where a list page starts and how long it is, validated (SPEC §2: never silently replaced).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pagination {
    /// From 1; `None` when the page starts at a [`Cursor`].
    pub page: Option<u32>,
    /// Continue after this row (keyset pagination: as fast on page 1000 as on page 1).
    pub after: Option<Cursor>,
    /// 1 to [`Pagination::MAX_LIMIT`].
    pub limit: u32,
}

impl Pagination {
    /// Largest page size.
    pub const MAX_LIMIT: u32 = 100;
    /// Deepest row `page` reaches (page × limit); beyond, `cursor`.
    pub const MAX_PAGED_ROWS: u64 = 10_000;
    const DEFAULT_LIMIT: u32 = 10;

    /// Reads `page`, `cursor` and `limit` from a raw query string; other parameters are ignored.
    pub fn from_query(query: Option<&str>) -> Result<Self, ApiError> {
        let mut page = None;
        let mut after = None;
        let mut limit = None;
        for (name, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
            match name.as_ref() {
                "page" => page = Some(parse_bounded("page", &value, 1, u32::MAX)?),
                "cursor" => after = Some(Cursor::decode(&value)?),
                "limit" => limit = Some(parse_bounded("limit", &value, 1, Self::MAX_LIMIT)?),
                _ => {}
            }
        }
        if page.is_some() && after.is_some() {
            return Err(ApiError::invalid_field("cursor", "give either page or cursor, not both"));
        }
        let page = if after.is_some() { None } else { Some(page.unwrap_or(1)) };
        let limit = limit.unwrap_or(Self::DEFAULT_LIMIT);
        // An OFFSET makes PostgreSQL read and drop every skipped row: deep pages are the cursor's job.
        if page.is_some_and(|page| u64::from(page) * u64::from(limit) > Self::MAX_PAGED_ROWS) {
            return Err(ApiError::invalid_field(
                "page",
                format!("page × limit reaches at most {} rows; go further with cursor", Self::MAX_PAGED_ROWS),
            ));
        }
        Ok(Self { page, after, limit })
    }

    /// Rows to skip before the page (zero when it starts at a cursor).
    pub fn offset(&self) -> i64 {
        i64::from(self.page.unwrap_or(1) - 1) * i64::from(self.limit)
    }
}

/// A position in a list ordered `created_at DESC, id DESC`: the last row a page returned. Clients
/// see it as an opaque string (`next_cursor`) and hand it back as `cursor`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    /// The row's `created_at`.
    pub created_at: DateTime<Utc>,
    /// The row's id.
    pub id: Uuid,
}

impl Cursor {
    /// The opaque text form.
    pub fn encode(&self) -> String {
        URL_SAFE_NO_PAD.encode(format!("{}|{}", self.created_at.timestamp_micros(), self.id.simple()))
    }

    fn decode(text: &str) -> Result<Self, ApiError> {
        let invalid = || ApiError::invalid_field("cursor", "is not a cursor this API returned");
        let bytes = URL_SAFE_NO_PAD.decode(text).map_err(|_| invalid())?;
        let text = std::str::from_utf8(&bytes).map_err(|_| invalid())?;
        let (micros, id) = text.split_once('|').ok_or_else(invalid)?;
        // Only times a row can have: others do not fit PostgreSQL's timestamp (a forged cursor).
        let created_at = micros
            .parse::<i64>()
            .ok()
            .filter(|micros| (0..=MAX_CURSOR_MICROS).contains(micros))
            .and_then(DateTime::from_timestamp_micros)
            .ok_or_else(invalid)?;
        let id = Uuid::try_parse(id).map_err(|_| invalid())?;
        Ok(Self { created_at, id })
    }
}

/// 9999-12-31T23:59:59.999999Z.
const MAX_CURSOR_MICROS: i64 = 253_402_300_799_999_999;

fn parse_bounded(name: &str, value: &str, min: u32, max: u32) -> Result<u32, ApiError> {
    match value.parse::<u32>() {
        Ok(number) if (min..=max).contains(&number) => Ok(number),
        _ => Err(ApiError::invalid_field(name, format!("must be a whole number from {min} to {max}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_values() {
        assert_eq!(Pagination::from_query(None).unwrap(), Pagination { page: Some(1), after: None, limit: 10 });
        let parsed = Pagination::from_query(Some("page=3&limit=100&x=y")).unwrap();
        assert_eq!(parsed, Pagination { page: Some(3), after: None, limit: 100 });
        assert_eq!(parsed.offset(), 200);
    }

    #[test]
    fn out_of_range_or_malformed_is_an_error() {
        for query in [
            "page=0",
            "page=-1",
            "page=abc",
            "page=",
            "limit=0",
            "limit=101",
            "limit=1.5",
            "page=99999999999",
            "page=1001",
            "page=101&limit=100",
            "page=4294967295&limit=100",
        ] {
            assert!(Pagination::from_query(Some(query)).is_err(), "{query}");
        }
        // The deepest pages `page` reaches.
        for query in ["page=1000", "page=100&limit=100", "page=10000&limit=1"] {
            assert!(Pagination::from_query(Some(query)).is_ok(), "{query}");
        }
    }

    #[test]
    fn a_cursor_round_trips_and_replaces_the_page() {
        let cursor =
            Cursor { created_at: DateTime::from_timestamp_micros(1_764_000_000_123_456).unwrap(), id: Uuid::new_v4() };
        let parsed = Pagination::from_query(Some(&format!("cursor={}&limit=5", cursor.encode()))).unwrap();
        assert_eq!(parsed, Pagination { page: None, after: Some(cursor), limit: 5 });
        assert_eq!(parsed.offset(), 0);
    }

    #[test]
    fn bad_cursors_and_a_cursor_with_a_page_are_errors() {
        let valid = Cursor { created_at: Utc::now(), id: Uuid::nil() }.encode();
        let not_a_uuid = URL_SAFE_NO_PAD.encode("1|xyz");
        let not_a_time = URL_SAFE_NO_PAD.encode(format!("x|{}", Uuid::nil()));
        // Valid for chrono, not for PostgreSQL (a forged cursor once made a 500).
        let year_200000 = URL_SAFE_NO_PAD.encode(format!("6249223305600000000|{}", Uuid::nil()));
        let before_1970 = URL_SAFE_NO_PAD.encode(format!("-1|{}", Uuid::nil()));
        for query in [
            "cursor=",
            "cursor=%%%",
            "cursor=abc",
            &format!("cursor={not_a_uuid}"),
            &format!("cursor={not_a_time}"),
            &format!("cursor={year_200000}"),
            &format!("cursor={before_1970}"),
            &format!("cursor={valid}&page=2"),
        ] {
            assert!(Pagination::from_query(Some(query)).is_err(), "{query}");
        }
    }
}
