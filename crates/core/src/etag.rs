//! Etags and `If-Match`: one rule for every resource that has an etag (enrollments, device
//! identities, twins), so a client's optimistic concurrency works the same everywhere.

use crate::error::{AzureError, ErrorCode};

/// A new opaque etag in the quoted form Azure uses (`"\"…\""`).
pub fn new_etag() -> String {
    format!("\"{}\"", uuid::Uuid::new_v4())
}

/// `If-Match` semantics: absent or `*` always match an existing resource; otherwise the etags
/// must be equal, ignoring surrounding quotes (clients differ in whether they keep them).
pub fn check_if_match(if_match: Option<&str>, current: Option<&str>) -> Result<(), AzureError> {
    let Some(wanted) = if_match.map(str::trim).filter(|s| !s.is_empty()) else {
        return Ok(());
    };
    let unquote = |s: &str| s.trim().trim_matches('"').to_owned();
    let ok = match current {
        Some(cur) => wanted == "*" || unquote(wanted) == unquote(cur),
        None => false,
    };
    if ok {
        Ok(())
    } else {
        Err(AzureError::new(
            ErrorCode::PreconditionFailed,
            "The ETag in the request does not match the current resource (precondition failed).",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn if_match_rules() {
        assert!(check_if_match(None, None).is_ok());
        assert!(check_if_match(Some("*"), Some("\"a\"")).is_ok());
        assert!(check_if_match(Some("\"a\""), Some("\"a\"")).is_ok());
        assert!(check_if_match(Some("a"), Some("\"a\"")).is_ok());
        assert_eq!(check_if_match(Some("\"b\""), Some("\"a\"")).unwrap_err().status(), 412);
        assert_eq!(check_if_match(Some("\"b\""), None).unwrap_err().status(), 412);
    }
}
