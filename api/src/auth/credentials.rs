//! Finding the bearer token: `Authorization: Bearer <token>` once, and nowhere else (RFC 6750 §2.1).
//! A token in the query string would end up in proxy and access logs, so one there is refused
//! outright rather than ignored.

use http::HeaderMap;
use http::header::AUTHORIZATION;

use super::Rejection;

/// Longest `Authorization` value looked at. Real access tokens are a few KiB at most; a bigger one is
/// refused before anything parses it.
pub const MAX_AUTHORIZATION_BYTES: usize = 8 * 1024;

/// The token of the request's one `Authorization: Bearer` header.
pub fn bearer_token<'a>(headers: &'a HeaderMap, query: Option<&str>) -> Result<&'a str, Rejection> {
    if query.is_some_and(has_access_token_parameter) {
        return Err(unauthorized("query_token", "access tokens are accepted only in the Authorization header"));
    }
    let mut values = headers.get_all(AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Err(unauthorized("missing", "this route needs a bearer token in the Authorization header"));
    };
    if values.next().is_some() {
        return Err(unauthorized("malformed", "more than one Authorization header"));
    }
    if value.len() > MAX_AUTHORIZATION_BYTES {
        return Err(unauthorized("malformed", "the Authorization header is longer than 8192 bytes"));
    }
    let malformed = || unauthorized("malformed", "the Authorization header must be `Bearer <token>`");
    let (scheme, token) = value.to_str().map_err(|_| malformed())?.split_once(' ').ok_or_else(malformed)?;
    let token = token.trim_start_matches(' ');
    if !scheme.eq_ignore_ascii_case("bearer") || !is_token68(token) {
        return Err(malformed());
    }
    Ok(token)
}

fn unauthorized(reason: &'static str, message: &'static str) -> Rejection {
    Rejection::Unauthorized { reason, message }
}

fn has_access_token_parameter(query: &str) -> bool {
    form_urlencoded::parse(query.as_bytes()).any(|(name, _)| name == "access_token")
}

/// RFC 6750's `b64token`: `1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="`.
fn is_token68(token: &str) -> bool {
    let body = token.trim_end_matches('=');
    !body.is_empty()
        && body
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~' | b'+' | b'/'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append(AUTHORIZATION, HeaderValue::from_bytes(value.as_bytes()).unwrap());
        }
        headers
    }

    fn reason(values: &[&str], query: Option<&str>) -> &'static str {
        bearer_token(&headers(values), query).unwrap_err().reason()
    }

    #[test]
    fn the_token_is_taken_from_one_bearer_header_in_any_case() {
        assert_eq!(bearer_token(&headers(&["Bearer a.b.c"]), None).unwrap(), "a.b.c");
        assert_eq!(bearer_token(&headers(&["bearer  a.b-_c"]), Some("limit=5")).unwrap(), "a.b-_c");
    }

    #[test]
    fn anything_else_is_unauthorized_with_its_reason() {
        assert_eq!(reason(&[], None), "missing");
        assert_eq!(reason(&["Bearer a.b.c", "Bearer a.b.c"], None), "malformed");
        assert_eq!(reason(&["Basic dXNlcjpwYXNz"], None), "malformed");
        assert_eq!(reason(&["Bearer"], None), "malformed");
        assert_eq!(reason(&["Bearer "], None), "malformed");
        assert_eq!(reason(&["Bearer a b"], None), "malformed");
        assert_eq!(reason(&["Bearer ä"], None), "malformed");
        assert_eq!(reason(&["Bearer a$b"], None), "malformed");
        assert_eq!(reason(&[&format!("Bearer {}", "a".repeat(MAX_AUTHORIZATION_BYTES))], None), "malformed");
        assert_eq!(reason(&[], Some("access_token=a.b.c")), "query_token");
        assert_eq!(reason(&["Bearer a.b.c"], Some("limit=1&access_token=x")), "query_token");
    }
}
