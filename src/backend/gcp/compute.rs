//! The Compute Engine clients (google-cloud-compute-v1), with the retries and
//! operation waits every call goes through, and the one mapping of Compute
//! errors to [`Error`].
//!
//! - Retries are ours, not gax's (the clients are built with `NeverRetry`):
//!   429, 5xx, 403 rate-limit and quota answers and failed connections are
//!   retried under the crate's one policy ([`crate::cloud::retry::Retry`]:
//!   exponential backoff with full jitter; a `Retry-After` is honoured),
//!   then reported (throttling as `RESOURCE_EXHAUSTED`, the rest as
//!   `UNAVAILABLE`). Mutating calls carry one `requestId` across their retries,
//!   so Compute runs them once.
//! - A mutating call answers with an Operation; [`Compute::wait`] waits on it
//!   through `zoneOperations.wait`, `regionOperations.wait` or
//!   `globalOperations.wait` (chosen by the operation's own `zone`/`region`)
//!   until it is `DONE`, and turns a `DONE` operation's `error` into an [`Error`].
//!
//! One limit of the crate: gax parses an error body as `google.rpc.Status` and
//! drops Compute's `errors[].reason` (only `code`, `message`, `status` and
//! `details` are kept). Errors are therefore classified by HTTP status, the
//! `details` (an `ErrorInfo` reason), and for the reasons that share a status
//! (403 rate limit vs. quota vs. permission; 400 resource-in-use) by the
//! message Compute writes, which the fake mirrors.

use std::future::Future;
use std::time::{Duration, Instant};

use google_cloud_auth::credentials::Credentials;
use google_cloud_compute_v1::client;
use google_cloud_compute_v1::model::Operation;
use google_cloud_compute_v1::model::operation::Status as OpStatus;
use google_cloud_gax::error::Error as GaxError;
use google_cloud_gax::error::rpc::StatusDetails;
use google_cloud_gax::retry_policy::NeverRetry;

use super::super::{Error, Result};
use super::config::{GcpConfig, Retry};
use super::metadata::last_segment;
use crate::cloud::retry::Step;

/// What kind of failure a Compute answer is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    NotFound,
    AlreadyExists,
    /// `resourceInUseByAnotherResource`: attached, or a source in use.
    InUse,
    /// Throttled: 429 or 403 `rateLimitExceeded`.
    RateLimited,
    /// A quota is used up (403 `quotaExceeded`, `QUOTA_EXCEEDED`) or the zone has
    /// no capacity (`ZONE_RESOURCE_POOL_EXHAUSTED`).
    Exhausted,
    /// 5xx, a timeout or a failed connection.
    Transient,
    Invalid,
    Denied,
    Other,
}

/// A failed Compute call: its kind, HTTP status if any, and Compute's message.
#[derive(Clone, Debug)]
pub struct ApiError {
    pub kind: Kind,
    pub status: Option<u16>,
    pub message: String,
    retry_after: Option<Duration>,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.status {
            Some(s) => write!(f, "HTTP {s}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl ApiError {
    fn retryable(&self) -> bool {
        matches!(
            self.kind,
            Kind::RateLimited | Kind::Transient | Kind::Exhausted
        ) && self
            .status
            .is_some_and(|s| s == 429 || s == 403 || s >= 500)
            || (self.kind == Kind::Transient && self.status.is_none())
    }

    /// The backend error for a failure of `what` (e.g. `creating disk x`).
    pub fn into_error(self, what: &str) -> Error {
        let http = self
            .status
            .map(|s| format!(" (HTTP {s})"))
            .unwrap_or_default();
        let msg = format!("{what}: Compute Engine{http}: {}", self.message);
        match self.kind {
            Kind::NotFound => Error::NotFound(msg),
            Kind::AlreadyExists => Error::AlreadyExists(msg),
            Kind::InUse => Error::FailedPrecondition(msg),
            Kind::RateLimited | Kind::Exhausted => Error::ResourceExhausted(msg),
            Kind::Transient => Error::Unavailable(msg),
            Kind::Invalid => Error::InvalidArgument(msg),
            Kind::Denied => Error::FailedPrecondition(format!(
                "{msg}; the controller's service account needs roles/compute.storageAdmin \
                 and roles/compute.instanceAdmin.v1 on the project"
            )),
            Kind::Other => Error::Internal(msg),
        }
    }
}

/// The outcome of a removal (delete, detach) of `what`: a resource that is
/// already gone counts as removed, so that retries converge.
pub fn gone_is_done(result: Result<(), ApiError>, what: &str) -> Result<()> {
    match result {
        Err(e) if e.kind != Kind::NotFound => Err(e.into_error(what)),
        _ => Ok(()),
    }
}

fn contains_any(text: &str, needles: &[&str]) -> bool {
    let lower = text.to_ascii_lowercase();
    needles.iter().any(|n| lower.contains(n))
}

const IN_USE: &[&str] = &[
    "resourceinusebyanotherresource",
    "resource_in_use_by_another_resource",
    "already being used by",
    "is already attached",
];
const RATE_LIMIT: &[&str] = &[
    "ratelimitexceeded",
    "rate_limit_exceeded",
    "rate limit exceeded",
];
const QUOTA: &[&str] = &[
    "quotaexceeded",
    "quota_exceeded",
    "quota exceeded",
    "quota '",
];

/// Classifies an error answer of status `status` with `text` (the message and
/// any detail reasons).
fn classify_http(status: u16, text: &str) -> Kind {
    match status {
        404 => Kind::NotFound,
        409 if contains_any(text, IN_USE) => Kind::InUse,
        409 => Kind::AlreadyExists,
        429 => Kind::RateLimited,
        403 if contains_any(text, RATE_LIMIT) => Kind::RateLimited,
        403 if contains_any(text, QUOTA) => Kind::Exhausted,
        403 | 401 => Kind::Denied,
        400 if contains_any(text, IN_USE) => Kind::InUse,
        400 | 412 | 422 => Kind::Invalid,
        s if s >= 500 => Kind::Transient,
        _ => Kind::Other,
    }
}

/// One line, at most 500 characters, of what Compute said.
fn clean(text: &str) -> String {
    let line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if line.chars().count() <= 500 {
        line
    } else {
        let mut short: String = line.chars().take(500).collect();
        short.push('…');
        short
    }
}

impl From<GaxError> for ApiError {
    fn from(e: GaxError) -> Self {
        let status = e.http_status_code();
        let retry_after = e
            .http_headers()
            .and_then(|h| h.get(http::header::RETRY_AFTER))
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let (message, reasons) = match e.status() {
            Some(s) => {
                let reasons = s
                    .details
                    .iter()
                    .filter_map(|d| match d {
                        StatusDetails::ErrorInfo(info) => Some(info.reason.clone()),
                        _ => None,
                    })
                    .collect::<Vec<_>>()
                    .join(" ");
                (s.message.clone(), reasons)
            }
            None => match (status, e.http_payload()) {
                (Some(_), Some(body)) => {
                    (String::from_utf8_lossy(body).into_owned(), String::new())
                }
                _ => (e.to_string(), String::new()),
            },
        };
        let kind = match status {
            Some(s) => classify_http(s, &format!("{message} {reasons}")),
            None if e.is_timeout() || e.is_io() || e.is_connect() || e.is_transport() => {
                Kind::Transient
            }
            None if e.is_authentication() => Kind::Transient,
            None => Kind::Other,
        };
        let message = if message.is_empty() {
            e.to_string()
        } else {
            message
        };
        ApiError {
            kind,
            status,
            message: clean(&message),
            retry_after,
        }
    }
}

/// The kind of an operation error code, which decides over the operation's
/// HTTP status (the PD CSI driver maps these codes alone, in
/// `codeForGCEOpError` of its `gce-compute.go`): a per-resource operation
/// rate (`RESOURCE_OPERATION_RATE_EXCEEDED`: too many changes of one disk or
/// VM at once) is throttling, Compute's own `INTERNAL_ERROR` passes, and
/// `UNSUPPORTED_OPERATION` (a disk type the machine type cannot take, an
/// operation the resource does not allow) will not succeed on a retry.
fn operation_error_kind(code: &str) -> Option<Kind> {
    Some(match code {
        "RESOURCE_NOT_FOUND" | "NOT_FOUND" => Kind::NotFound,
        "RESOURCE_ALREADY_EXISTS" | "ALREADY_EXISTS" => Kind::AlreadyExists,
        "RESOURCE_IN_USE_BY_ANOTHER_RESOURCE" | "RESOURCE_IN_USE" => Kind::InUse,
        "QUOTA_EXCEEDED"
        | "REGION_QUOTA_EXCEEDED"
        | "ZONE_RESOURCE_POOL_EXHAUSTED"
        | "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS" => Kind::Exhausted,
        "RATE_LIMIT_EXCEEDED" | "RESOURCE_OPERATION_RATE_EXCEEDED" => Kind::RateLimited,
        "INTERNAL_ERROR" => Kind::Transient,
        "INVALID_USAGE" | "INVALID_FIELD_VALUE" | "BAD_REQUEST" | "UNSUPPORTED_OPERATION" => {
            Kind::Invalid
        }
        _ => return None,
    })
}

/// The error of an operation that finished `DONE` with one.
fn operation_error(op: &Operation) -> Option<ApiError> {
    let errors = op
        .error
        .as_ref()
        .map(|e| e.errors.as_slice())
        .unwrap_or(&[]);
    if errors.is_empty() && op.http_error_status_code.is_none() {
        return None;
    }
    let first = errors.first();
    let code = first.and_then(|e| e.code.clone()).unwrap_or_default();
    let message = errors
        .iter()
        .filter_map(|e| e.message.clone())
        .collect::<Vec<_>>()
        .join("; ");
    let message = if message.is_empty() {
        op.http_error_message
            .clone()
            .unwrap_or_else(|| code.clone())
    } else {
        message
    };
    let status = op
        .http_error_status_code
        .and_then(|s| u16::try_from(s).ok());
    let kind = operation_error_kind(&code).unwrap_or_else(|| match status {
        Some(s) => classify_http(s, &message),
        None => Kind::Other,
    });
    Some(ApiError {
        kind,
        status,
        message: clean(&format!("{code}: {message}")),
        retry_after: None,
    })
}

/// The Compute services the backend uses, built once and shared.
pub struct Compute {
    pub project: String,
    pub disks: client::Disks,
    pub region_disks: client::RegionDisks,
    pub snapshots: client::Snapshots,
    pub instances: client::Instances,
    zone_operations: client::ZoneOperations,
    region_operations: client::RegionOperations,
    global_operations: client::GlobalOperations,
    retry: Retry,
    poll_interval: Duration,
    operation_timeout: Duration,
}

macro_rules! build_client {
    ($ty:ty, $config:expr, $credentials:expr) => {{
        let mut builder = <$ty>::builder()
            .with_credentials($credentials.clone())
            .with_retry_policy(NeverRetry)
            .with_attempt_timeout($config.attempt_timeout);
        if let Some(endpoint) = &$config.endpoint {
            builder = builder.with_endpoint(endpoint.clone());
        }
        builder.build().await.map_err(|e| {
            Error::FailedPrecondition(format!(
                "building the Compute Engine client {}: {e}",
                stringify!($ty)
            ))
        })?
    }};
}

impl Compute {
    pub async fn connect(config: &GcpConfig, credentials: Credentials) -> Result<Self> {
        super::config::install_crypto_provider();
        Ok(Compute {
            project: config.project.clone(),
            disks: build_client!(client::Disks, config, credentials),
            region_disks: build_client!(client::RegionDisks, config, credentials),
            snapshots: build_client!(client::Snapshots, config, credentials),
            instances: build_client!(client::Instances, config, credentials),
            zone_operations: build_client!(client::ZoneOperations, config, credentials),
            region_operations: build_client!(client::RegionOperations, config, credentials),
            global_operations: build_client!(client::GlobalOperations, config, credentials),
            retry: config.retry.clone(),
            poll_interval: config.poll_interval,
            operation_timeout: config.operation_timeout,
        })
    }

    /// Runs `call` until it succeeds, fails for good, or the retries are used up.
    pub async fn call<T, F, Fut>(&self, what: &str, mut call: F) -> Result<T, ApiError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, GaxError>>,
    {
        self.retry
            .run(&format!("{what}: Compute Engine call"), |_| {
                let fut = call();
                async move {
                    match fut.await {
                        Ok(v) => Step::Done(v),
                        Err(e) => {
                            let err = ApiError::from(e);
                            if err.retryable() {
                                let after = err.retry_after;
                                Step::Retry { error: err, after }
                            } else {
                                Step::Fail(err)
                            }
                        }
                    }
                }
            })
            .await
    }

    /// Runs a mutating call (retried with one request id) and waits for its
    /// operation to finish. Errors carry `what`.
    pub async fn mutate<F, Fut>(&self, what: &str, call: F) -> Result<(), ApiError>
    where
        F: Fn(String) -> Fut,
        Fut: Future<Output = Result<Operation, GaxError>>,
    {
        let request_id = uuid::Uuid::new_v4().to_string();
        let op = self.call(what, || call(request_id.clone())).await?;
        self.wait(what, op).await
    }

    /// Waits until `op` is DONE; its error, if any, is the result.
    pub async fn wait(&self, what: &str, mut op: Operation) -> Result<(), ApiError> {
        let started = Instant::now();
        loop {
            if op.status == Some(OpStatus::Done) {
                return match operation_error(&op) {
                    Some(e) => Err(e),
                    None => Ok(()),
                };
            }
            if started.elapsed() >= self.operation_timeout {
                return Err(ApiError {
                    kind: Kind::Transient,
                    status: None,
                    message: format!(
                        "operation {} is still {:?} after {} s",
                        op.name.as_deref().unwrap_or("?"),
                        op.status,
                        self.operation_timeout.as_secs()
                    ),
                    retry_after: None,
                });
            }
            let Some(name) = op.name.clone() else {
                return Err(ApiError {
                    kind: Kind::Other,
                    status: None,
                    message: "an unfinished operation without a name".into(),
                    retry_after: None,
                });
            };
            let project = self.project.clone();
            op = if let Some(zone) = op.zone.as_deref().map(last_segment).map(str::to_string) {
                self.call(what, || {
                    self.zone_operations
                        .wait()
                        .set_project(project.clone())
                        .set_zone(zone.clone())
                        .set_operation(name.clone())
                        .send()
                })
                .await?
            } else if let Some(region) = op.region.as_deref().map(last_segment).map(str::to_string)
            {
                self.call(what, || {
                    self.region_operations
                        .wait()
                        .set_project(project.clone())
                        .set_region(region.clone())
                        .set_operation(name.clone())
                        .send()
                })
                .await?
            } else {
                self.call(what, || {
                    self.global_operations
                        .wait()
                        .set_project(project.clone())
                        .set_operation(name.clone())
                        .send()
                })
                .await?
            };
            if op.status != Some(OpStatus::Done) {
                // `wait` returns unfinished after its own deadline (about two
                // minutes); a pause keeps a misbehaving server from a busy loop.
                tokio::time::sleep(self.poll_interval).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_compute_answers() {
        assert_eq!(
            classify_http(404, "The resource 'x' was not found"),
            Kind::NotFound
        );
        assert_eq!(
            classify_http(409, "The resource 'x' already exists"),
            Kind::AlreadyExists
        );
        assert_eq!(
            classify_http(400, "The disk resource 'd' is already being used by 'i'"),
            Kind::InUse
        );
        assert_eq!(classify_http(429, "Too many requests"), Kind::RateLimited);
        assert_eq!(classify_http(403, "Rate Limit Exceeded"), Kind::RateLimited);
        assert_eq!(
            classify_http(403, "Quota 'SSD_TOTAL_GB' exceeded. Limit: 500.0"),
            Kind::Exhausted
        );
        assert_eq!(
            classify_http(403, "Required 'compute.disks.create' permission"),
            Kind::Denied
        );
        assert_eq!(classify_http(503, "backend error"), Kind::Transient);
        assert_eq!(classify_http(400, "Invalid value for field"), Kind::Invalid);
    }

    #[test]
    fn maps_kinds_to_codes() {
        let e = |kind| ApiError {
            kind,
            status: Some(400),
            message: "m".into(),
            retry_after: None,
        };
        assert!(matches!(
            e(Kind::NotFound).into_error("x"),
            Error::NotFound(_)
        ));
        assert!(matches!(
            e(Kind::InUse).into_error("x"),
            Error::FailedPrecondition(_)
        ));
        assert!(matches!(
            e(Kind::RateLimited).into_error("x"),
            Error::ResourceExhausted(_)
        ));
        assert!(matches!(
            e(Kind::Transient).into_error("x"),
            Error::Unavailable(_)
        ));
        let msg = e(Kind::Invalid).into_error("creating disk d");
        assert_eq!(
            msg.message(),
            "creating disk d: Compute Engine (HTTP 400): m"
        );
    }
}
