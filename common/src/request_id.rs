//! The request id both binaries answer with: the client's `X-Request-Id` when it is short and
//! printable, else a new UUID. Echoed on every response and named in every error body, so a client's
//! report can be matched with the logs.

use http::{HeaderValue, Request};
use uuid::Uuid;

/// The header that carries it, both ways.
pub const HEADER: &str = "x-request-id";

/// Longer ids are replaced, so that a client cannot make every log line of its requests huge.
const MAX_LEN: usize = 128;

/// The id of `request`, as a header value (the client's is shared, not copied).
pub fn of<B>(request: &Request<B>) -> HeaderValue {
    request
        .headers()
        .get(HEADER)
        .filter(|id| !id.is_empty() && id.len() <= MAX_LEN && id.as_bytes().iter().all(u8::is_ascii_graphic))
        .cloned()
        .unwrap_or_else(|| {
            let mut text = [0; uuid::fmt::Hyphenated::LENGTH];
            HeaderValue::from_str(Uuid::new_v4().hyphenated().encode_lower(&mut text))
                .expect("a UUID is a valid header value")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_kept_when_sane_and_replaced_otherwise() {
        let with = |value: &str| Request::builder().header(HEADER, value).body(()).unwrap();
        assert_eq!(of(&with("abc-123")), "abc-123");
        assert_ne!(of(&with("has space")), "has space");
        assert_ne!(of(&with(&"x".repeat(129))), "x".repeat(129).as_str());
        let generated = of(&Request::builder().body(()).unwrap());
        assert!(Uuid::try_parse(generated.to_str().unwrap()).is_ok());
    }
}
