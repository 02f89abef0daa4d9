//! Validation of event input (SPEC §2 "Events").

use common::kafka::lifecycle;
use common::wire::{CreateEventRequest, FieldError};
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::http::error::ApiError;

const MAX_TYPE_CHARS: usize = 100;

/// A create request after validation.
#[derive(Debug)]
pub struct ValidEvent {
    pub user_id: Uuid,
    pub event_type: String,
    pub data: Box<RawValue>,
}

/// Validates a create body; `data` over `max_data_bytes` is 413.
pub fn new_event(request: CreateEventRequest, max_data_bytes: usize) -> Result<ValidEvent, ApiError> {
    let mut errors = Vec::new();
    let user_id = match request.user_id.as_deref().map(Uuid::try_parse) {
        Some(Ok(id)) => Some(id),
        Some(Err(_)) => push(&mut errors, "user_id", "must be a UUID"),
        None => push(&mut errors, "user_id", "is required"),
    };
    let event_type = match request.event_type {
        Some(event_type) => match event_type_error(&event_type) {
            None => Some(event_type),
            Some(message) => push(&mut errors, "type", message),
        },
        None => push(&mut errors, "type", "is required"),
    };
    let data = match request.data {
        Some(data) => Some(data),
        None => push(&mut errors, "data", "is required"),
    };
    match (user_id, event_type, data) {
        (Some(user_id), Some(event_type), Some(data)) if errors.is_empty() => {
            if data.get().len() > max_data_bytes {
                return Err(ApiError::PayloadTooLarge(max_data_bytes));
            }
            Ok(ValidEvent { user_id, event_type, data })
        }
        _ => Err(ApiError::Validation(errors)),
    }
}

/// Why a type is invalid, if it is: 1–100 of `[A-Za-z0-9_.:-]`, not a lifecycle type.
pub fn event_type_error(event_type: &str) -> Option<&'static str> {
    if event_type.is_empty() || event_type.len() > MAX_TYPE_CHARS {
        return Some("must be 1 to 100 characters");
    }
    if !event_type.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-')) {
        return Some("may only contain letters, digits and _ . : -");
    }
    if lifecycle::ALL.contains(&event_type) {
        return Some("is reserved for events the service emits itself");
    }
    None
}

fn push<T>(errors: &mut Vec<FieldError>, field: &str, message: &str) -> Option<T> {
    errors.push(FieldError { field: field.into(), message: message.into() });
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_types() {
        assert_eq!(event_type_error("login"), None);
        assert_eq!(event_type_error("a.b:c-d_9"), None);
        assert_eq!(event_type_error(&"x".repeat(100)), None);
        for bad in ["", "has space", "é", "user_created", &"x".repeat(101)] {
            assert!(event_type_error(bad).is_some(), "{bad:?}");
        }
    }

    #[test]
    fn oversized_data_is_413_and_missing_fields_are_listed() {
        let request = |data: &str| CreateEventRequest {
            user_id: Some(Uuid::nil().to_string()),
            event_type: Some("t".into()),
            data: Some(RawValue::from_string(data.into()).unwrap()),
        };
        assert!(new_event(request("\"12345\""), 7).is_ok());
        assert!(matches!(new_event(request("\"123456\""), 7), Err(ApiError::PayloadTooLarge(7))));
        let Err(ApiError::Validation(errors)) =
            new_event(CreateEventRequest { user_id: Some("x".into()), event_type: None, data: None }, 10)
        else {
            panic!("expected validation errors")
        };
        assert_eq!(errors.iter().map(|e| e.field.as_str()).collect::<Vec<_>>(), ["user_id", "type", "data"]);
    }
}
