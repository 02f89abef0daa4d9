//! Query-string parameters.

use super::error::ApiError;

/// `page` and `limit` of a list endpoint, validated (SPEC §2: never silently replaced).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pagination {
    /// From 1.
    pub page: u32,
    /// 1 to [`Pagination::MAX_LIMIT`].
    pub limit: u32,
}

impl Pagination {
    /// Largest page size.
    pub const MAX_LIMIT: u32 = 100;
    const DEFAULT_LIMIT: u32 = 10;

    /// Reads `page` and `limit` from a raw query string; other parameters are ignored.
    pub fn from_query(query: Option<&str>) -> Result<Self, ApiError> {
        let mut page = None;
        let mut limit = None;
        for (name, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
            match name.as_ref() {
                "page" => page = Some(parse_bounded("page", &value, 1, u32::MAX)?),
                "limit" => limit = Some(parse_bounded("limit", &value, 1, Self::MAX_LIMIT)?),
                _ => {}
            }
        }
        Ok(Self { page: page.unwrap_or(1), limit: limit.unwrap_or(Self::DEFAULT_LIMIT) })
    }

    /// Rows to skip.
    pub fn offset(&self) -> i64 {
        i64::from(self.page - 1) * i64::from(self.limit)
    }
}

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
        assert_eq!(Pagination::from_query(None).unwrap(), Pagination { page: 1, limit: 10 });
        let parsed = Pagination::from_query(Some("page=3&limit=100&x=y")).unwrap();
        assert_eq!(parsed, Pagination { page: 3, limit: 100 });
        assert_eq!(parsed.offset(), 200);
    }

    #[test]
    fn out_of_range_or_malformed_is_an_error() {
        for query in ["page=0", "page=-1", "page=abc", "page=", "limit=0", "limit=101", "limit=1.5", "page=99999999999"]
        {
            assert!(Pagination::from_query(Some(query)).is_err(), "{query}");
        }
    }
}
