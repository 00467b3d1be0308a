//! The error bodies of the cloud APIs, read in one place: Azure's (ARM, Key
//! Vault) `{"error":{"code","message"}}`, Google's
//! `{"error":{"code","message","status"}}` and OAuth's
//! `{"error","error_description"}` (Entra ID, IMDS).

use serde_json::Value;

use super::retry::clean;

/// The longest error code kept, in characters.
const CODE_MAX: usize = 100;
/// The longest error message kept, in characters.
const MESSAGE_MAX: usize = 400;

/// A cloud's error code and message, each one cleaned line.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ErrorBody {
    /// Azure's `code`; Google's readable `status` (e.g. `PERMISSION_DENIED`)
    /// in preference to its numeric `code`; OAuth's `error`.
    pub code: Option<String>,
    pub message: Option<String>,
}

impl ErrorBody {
    /// The error of a JSON answer with an `error` member; `None` without one.
    pub fn of(body: &Value) -> Option<Self> {
        match body.get("error")? {
            Value::Object(_) => {
                let error = &body["error"];
                let mut parsed = Self::fields(error);
                if let Some(status) = error.get("status").and_then(Value::as_str) {
                    parsed.code = Some(clean(status, CODE_MAX));
                }
                Some(parsed)
            }
            Value::String(code) => Some(ErrorBody {
                code: Some(clean(code, CODE_MAX)),
                message: body
                    .get("error_description")
                    .and_then(Value::as_str)
                    .map(|m| clean(m, MESSAGE_MAX)),
            }),
            _ => None,
        }
    }

    /// [`of`](Self::of) on raw bytes: `None` when they are not such JSON.
    pub fn parse(body: &[u8]) -> Option<Self> {
        Self::of(&serde_json::from_slice(body).ok()?)
    }

    /// `code` (a string or a number) and `message` of an error object itself,
    /// as an ARM operation status nests it.
    pub fn fields(error: &Value) -> Self {
        let code = match error.get("code") {
            Some(Value::String(s)) => Some(clean(s, CODE_MAX)),
            Some(Value::Number(n)) => Some(n.to_string()),
            _ => None,
        };
        let message = error
            .get("message")
            .and_then(Value::as_str)
            .map(|m| clean(m, MESSAGE_MAX));
        ErrorBody { code, message }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn body(code: Option<&str>, message: Option<&str>) -> ErrorBody {
        ErrorBody {
            code: code.map(str::to_string),
            message: message.map(str::to_string),
        }
    }

    #[test]
    fn reads_azure_errors() {
        let arm = json!({"error": {"code": "DiskInUse", "message": "Disk d is\n attached"}});
        assert_eq!(
            ErrorBody::of(&arm),
            Some(body(Some("DiskInUse"), Some("Disk d is attached")))
        );
        let keyvault =
            br#"{"error":{"code":"Forbidden","message":"no unwrapKey","innererror":{}}}"#;
        assert_eq!(
            ErrorBody::parse(keyvault),
            Some(body(Some("Forbidden"), Some("no unwrapKey")))
        );
    }

    #[test]
    fn prefers_googles_readable_status() {
        let google =
            json!({"error": {"code": 403, "message": "denied", "status": "PERMISSION_DENIED"}});
        assert_eq!(
            ErrorBody::of(&google),
            Some(body(Some("PERMISSION_DENIED"), Some("denied")))
        );
        let numeric = json!({"error": {"code": 503, "message": "later"}});
        assert_eq!(
            ErrorBody::of(&numeric),
            Some(body(Some("503"), Some("later")))
        );
    }

    #[test]
    fn reads_oauth_errors() {
        let entra =
            json!({"error": "invalid_client", "error_description": "AADSTS70021: no match"});
        assert_eq!(
            ErrorBody::of(&entra),
            Some(body(Some("invalid_client"), Some("AADSTS70021: no match")))
        );
    }

    #[test]
    fn other_bodies_are_not_errors_but_an_error_object_reads_alone() {
        assert_eq!(ErrorBody::parse(b"Service Unavailable"), None);
        assert_eq!(ErrorBody::of(&json!({"status": "Failed"})), None);
        assert_eq!(ErrorBody::of(&json!({"error": 7})), None);
        let op_error = json!({"code": "ZonalAllocationFailed", "message": "no room"});
        assert_eq!(
            ErrorBody::fields(&op_error),
            body(Some("ZonalAllocationFailed"), Some("no room"))
        );
        let long = "x".repeat(500);
        let cut = ErrorBody::fields(&json!({ "message": long }))
            .message
            .unwrap();
        assert_eq!(cut.chars().count(), MESSAGE_MAX + 1);
    }
}
