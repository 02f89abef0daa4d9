//! Validation of user fields (SPEC §2): trimmed values, email syntax and length, name length.

use common::wire::{CreateUserRequest, FieldError, UpdateUserRequest};

use crate::http::error::ApiError;

const MAX_EMAIL_CHARS: usize = 254;
const MAX_NAME_CHARS: usize = 100;

/// A user's fields after validation: trimmed and within bounds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidUser {
    pub email: String,
    pub first_name: String,
    pub last_name: String,
}

/// The fields a PUT changes; at least one is set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidChanges {
    pub email: Option<String>,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
}

/// Validates a create body, reporting every bad or missing field at once.
pub fn new_user(request: CreateUserRequest) -> Result<ValidUser, ApiError> {
    let mut errors = Vec::new();
    let email = required(&mut errors, "email", request.email, email);
    let first_name = required(&mut errors, "first_name", request.first_name, name);
    let last_name = required(&mut errors, "last_name", request.last_name, name);
    match (email, first_name, last_name) {
        (Some(email), Some(first_name), Some(last_name)) if errors.is_empty() => {
            Ok(ValidUser { email, first_name, last_name })
        }
        _ => Err(ApiError::Validation(errors)),
    }
}

/// Validates an update body: any non-empty subset of the fields.
pub fn changes(request: UpdateUserRequest) -> Result<ValidChanges, ApiError> {
    if request.email.is_none() && request.first_name.is_none() && request.last_name.is_none() {
        return Err(ApiError::Validation(vec![FieldError {
            field: "body".into(),
            message: "at least one of email, first_name, last_name is required".into(),
        }]));
    }
    let mut errors = Vec::new();
    let changes = ValidChanges {
        email: optional(&mut errors, "email", request.email, email),
        first_name: optional(&mut errors, "first_name", request.first_name, name),
        last_name: optional(&mut errors, "last_name", request.last_name, name),
    };
    if errors.is_empty() { Ok(changes) } else { Err(ApiError::Validation(errors)) }
}

type Check = fn(&str) -> Result<(), String>;

fn required(errors: &mut Vec<FieldError>, field: &str, value: Option<String>, check: Check) -> Option<String> {
    match value {
        Some(value) => optional(errors, field, Some(value), check),
        None => {
            errors.push(FieldError { field: field.into(), message: "is required".into() });
            None
        }
    }
}

fn optional(errors: &mut Vec<FieldError>, field: &str, value: Option<String>, check: Check) -> Option<String> {
    let value = value?.trim().to_owned();
    match check(&value) {
        Ok(()) => Some(value),
        Err(message) => {
            errors.push(FieldError { field: field.into(), message });
            None
        }
    }
}

fn email(value: &str) -> Result<(), String> {
    if value.chars().count() > MAX_EMAIL_CHARS {
        return Err(format!("must be at most {MAX_EMAIL_CHARS} characters"));
    }
    let invalid = || Err("must be a valid email address".to_owned());
    // RFC 5322 allows quoted spaces and dotless domains; an address people can receive mail at has
    // neither, so those are refused on top of the library's syntax check.
    if value.chars().any(|c| c.is_whitespace() || c.is_control()) || !email_address::EmailAddress::is_valid(value) {
        return invalid();
    }
    let domain = value.rsplit_once('@').map(|(_, domain)| domain).unwrap_or_default();
    let labels_ok = domain.split('.').count() >= 2 && domain.split('.').all(|label| !label.is_empty());
    if !labels_ok || domain.starts_with('[') {
        return invalid();
    }
    Ok(())
}

fn name(value: &str) -> Result<(), String> {
    let length = value.chars().count();
    if length == 0 {
        return Err("must not be empty".into());
    }
    if length > MAX_NAME_CHARS {
        return Err(format!("must be at most {MAX_NAME_CHARS} characters"));
    }
    if value.chars().any(char::is_control) {
        return Err("must not contain control characters".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails() {
        for ok in ["a@b.c", "first.last+tag@example.co.uk", "X@Y.ORG"] {
            assert_eq!(email(ok), Ok(()), "{ok}");
        }
        let long = format!("{}@example.com", "a".repeat(250));
        for bad in ["a@b", "a b@c.d", "@b.c", "a@", "a@.c", "a@b..c", "a@[1.2.3.4]", "plain", "a@b.c\n", long.as_str()]
        {
            assert!(email(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn names() {
        assert_eq!(name("Zoë"), Ok(()));
        assert_eq!(name(&"é".repeat(100)), Ok(()));
        assert!(name(&"é".repeat(101)).is_err());
        assert!(name("").is_err());
        assert!(name("a\u{7}b").is_err());
    }

    #[test]
    fn create_trims_and_reports_every_field() {
        let valid = new_user(CreateUserRequest {
            email: Some("  a@b.c ".into()),
            first_name: Some(" A ".into()),
            last_name: Some("B".into()),
        })
        .unwrap();
        assert_eq!(valid.email, "a@b.c");
        assert_eq!(valid.first_name, "A");

        let Err(ApiError::Validation(errors)) =
            new_user(CreateUserRequest { email: Some("nope".into()), first_name: Some("   ".into()), last_name: None })
        else {
            panic!("expected validation errors");
        };
        let fields: Vec<_> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["email", "first_name", "last_name"]);
    }

    #[test]
    fn update_needs_at_least_one_field() {
        assert!(changes(UpdateUserRequest::default()).is_err());
        let only_name = changes(UpdateUserRequest { first_name: Some("N".into()), ..Default::default() }).unwrap();
        assert_eq!(only_name.email, None);
        assert_eq!(only_name.first_name.as_deref(), Some("N"));
    }
}
