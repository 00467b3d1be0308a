//! An Azure Resource Manager client: bearer tokens, retries of failed (5xx,
//! connection) and conflicting (409 `Conflict`: another operation in progress)
//! requests honouring `Retry-After`, a read gate and a write gate that a 429
//! closes for its whole `Retry-After` (requests meanwhile answer UNAVAILABLE
//! unsent), conditional writes (`If-Match`), long-running
//! operations followed through `Azure-AsyncOperation` or `Location`, and ARM
//! error bodies (`{"error":{"code","message"}}`) mapped to [`Error`] in one place
//! ([`arm_error`]), their code and message kept.

use std::sync::Arc;
use std::time::{Duration, Instant};

use azure_core::credentials::TokenCredential;
use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode};
use serde_json::Value;

use super::auth;
use crate::backend::Error;
use crate::cloud::error_body::ErrorBody;
use crate::cloud::retry::{Retry, Step, clean, retry_after};

/// An ARM response body that is not an error.
pub type Json = Value;

pub struct ArmClient {
    http: reqwest::Client,
    base: String,
    credential: Arc<dyn TokenCredential>,
    scope: String,
    retry: Retry,
    poll_interval: Duration,
    operation_timeout: Duration,
    /// ARM throttles a subscription's reads and writes separately and says
    /// for how long in `Retry-After`. Until then, requests of that kind are
    /// not sent at all (they answer UNAVAILABLE at once), as the reference
    /// (cloud-provider-azure) does: retrying into a throttled subscription
    /// only extends the throttling. One client serves one subscription.
    gates: std::sync::Mutex<Gates>,
}

/// Until when reads and writes are held back.
#[derive(Default)]
struct Gates {
    read: Option<Instant>,
    write: Option<Instant>,
}

impl Gates {
    fn slot(&mut self, method: &Method) -> &mut Option<Instant> {
        if *method == Method::GET || *method == Method::HEAD {
            &mut self.read
        } else {
            &mut self.write
        }
    }
}

/// What a conditional write came to.
pub enum Conditional {
    /// Written; the resource as it is afterwards.
    Done(Json),
    /// Not written: the resource's etag is no longer the one sent.
    Stale,
}

/// What a request answered, before LRO handling.
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Value,
}

impl ArmClient {
    pub fn new(
        http: reqwest::Client,
        base: &str,
        credential: Arc<dyn TokenCredential>,
        scope: String,
        retry: Retry,
        poll_interval: Duration,
        operation_timeout: Duration,
    ) -> Self {
        ArmClient {
            http,
            base: base.trim_end_matches('/').to_string(),
            credential,
            scope,
            retry,
            poll_interval,
            operation_timeout,
            gates: Default::default(),
        }
    }

    /// How long requests of `method`'s kind are still held back.
    fn gate_closed_for(&self, method: &Method) -> Option<Duration> {
        let mut gates = self.gates.lock().unwrap_or_else(|p| p.into_inner());
        let slot = gates.slot(method);
        let left = slot.and_then(|until| until.checked_duration_since(Instant::now()));
        if left.is_none() {
            *slot = None;
        }
        left.filter(|d| !d.is_zero())
    }

    /// Holds back requests of `method`'s kind for `wait` (never shortening a
    /// longer hold).
    fn close_gate(&self, method: &Method, wait: Duration) {
        let mut gates = self.gates.lock().unwrap_or_else(|p| p.into_inner());
        let slot = gates.slot(method);
        let until = Instant::now() + wait;
        if slot.is_none_or(|u| u < until) {
            *slot = Some(until);
        }
    }

    fn url(&self, path: &str, api_version: &str) -> String {
        format!("{}{path}?api-version={api_version}", self.base)
    }

    /// GET of one resource; `None` when ARM says it does not exist.
    pub async fn get(&self, path: &str, api_version: &str) -> Result<Option<Json>, Error> {
        let url = self.url(path, api_version);
        match self.send(Method::GET, &url, None).await {
            Ok(a) => Ok(Some(a.body)),
            Err(Error::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Every item of a list, following `nextLink` across pages.
    pub async fn list(&self, path: &str, api_version: &str) -> Result<Vec<Json>, Error> {
        let mut url = self.url(path, api_version);
        let mut items = Vec::new();
        loop {
            let a = self.send(Method::GET, &url, None).await?;
            if let Some(Value::Array(page)) = a.body.get("value") {
                items.extend(page.iter().cloned());
            }
            match a.body.get("nextLink").and_then(Value::as_str) {
                Some(next) if !next.is_empty() => url = self.same_origin(next)?,
                _ => return Ok(items),
            }
        }
    }

    /// PUT or PATCH of a resource, waiting for its long-running operation; the
    /// resource as it is afterwards.
    pub async fn write(
        &self,
        method: Method,
        path: &str,
        api_version: &str,
        body: &Value,
    ) -> Result<Json, Error> {
        let url = self.url(path, api_version);
        let a = self.send(method, &url, Some(body)).await?;
        let waited = self.wait(&a).await?.is_some();
        if waited || a.status != StatusCode::OK {
            // As ARM's guidelines say, the final state of a PUT/PATCH is read from
            // the resource itself.
            let done = self.send(Method::GET, &url, None).await?;
            return Ok(done.body);
        }
        Ok(a.body)
    }

    /// [`write`](Self::write) on condition that the resource still has
    /// `etag` (`If-Match`, as Compute 2024-07-01 documents for VMs and
    /// scale-set VMs): [`Conditional::Stale`] when ARM answers 412 because
    /// someone else changed it since it was read. Without an etag (a resource
    /// that has none) the write is unconditional.
    pub async fn write_if_match(
        &self,
        method: Method,
        path: &str,
        api_version: &str,
        body: &Value,
        etag: Option<&str>,
    ) -> Result<Conditional, Error> {
        let url = self.url(path, api_version);
        let a = self.send_if(method, &url, Some(body), etag).await?;
        if a.status == StatusCode::PRECONDITION_FAILED {
            return Ok(Conditional::Stale);
        }
        let waited = self.wait(&a).await?.is_some();
        if waited || a.status != StatusCode::OK {
            let done = self.send(Method::GET, &url, None).await?;
            return Ok(Conditional::Done(done.body));
        }
        Ok(Conditional::Done(a.body))
    }

    /// DELETE of a resource, waiting for its operation; a resource that does not
    /// exist is deleted already.
    pub async fn delete(&self, path: &str, api_version: &str) -> Result<(), Error> {
        let url = self.url(path, api_version);
        match self.send(Method::DELETE, &url, None).await {
            Ok(a) => {
                self.wait(&a).await?;
                Ok(())
            }
            Err(Error::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Follows a long-running operation when `a` started one: `Some` of the
    /// final body (an operation status or the `Location` result), `None` when
    /// there was nothing to wait for.
    async fn wait(&self, a: &Answer) -> Result<Option<Json>, Error> {
        let header = |name: &str| {
            a.headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let deadline = Instant::now() + self.operation_timeout;
        let mut delay = self.poll_delay(&a.headers);
        if let Some(status_url) = header("azure-asyncoperation") {
            let status_url = self.same_origin(&status_url)?;
            loop {
                let held = self.gate_closed_for(&Method::GET).unwrap_or_default();
                self.sleep_until(delay.max(held), deadline, &status_url)
                    .await?;
                let poll = self.send(Method::GET, &status_url, None).await?;
                let state = poll
                    .body
                    .get("status")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                match state.to_ascii_lowercase().as_str() {
                    "succeeded" => return Ok(Some(poll.body)),
                    "failed" | "canceled" | "cancelled" => {
                        return Err(operation_failed(&poll.body, state));
                    }
                    _ => delay = self.poll_delay(&poll.headers),
                }
            }
        }
        if a.status == StatusCode::ACCEPTED
            && let Some(location) = header("location")
        {
            let location = self.same_origin(&location)?;
            loop {
                let held = self.gate_closed_for(&Method::GET).unwrap_or_default();
                self.sleep_until(delay.max(held), deadline, &location)
                    .await?;
                let poll = self.send(Method::GET, &location, None).await?;
                if poll.status != StatusCode::ACCEPTED {
                    return Ok(Some(poll.body));
                }
                delay = self.poll_delay(&poll.headers);
            }
        }
        Ok(None)
    }

    /// The wait before the next poll: ARM's `Retry-After` (bounded by the
    /// retry cap), or the configured interval when it gives none.
    fn poll_delay(&self, headers: &HeaderMap) -> Duration {
        retry_after(headers)
            .map(|d| d.min(self.retry.max_delay))
            .unwrap_or(self.poll_interval)
    }

    async fn sleep_until(
        &self,
        delay: Duration,
        deadline: Instant,
        what: &str,
    ) -> Result<(), Error> {
        if Instant::now() + delay > deadline {
            return Err(Error::Unavailable(format!(
                "an Azure operation did not finish within {}s ({}); it goes on, and a retry \
                 picks up its result",
                self.operation_timeout.as_secs(),
                strip_query(what)
            )));
        }
        tokio::time::sleep(delay).await;
        Ok(())
    }

    /// A URL ARM handed back (nextLink, operation status): it must point at the
    /// ARM endpoint we use, so that our token never goes anywhere else.
    fn same_origin(&self, url: &str) -> Result<String, Error> {
        let origin = |u: &str| {
            reqwest::Url::parse(u).ok().map(|u| {
                (
                    u.scheme().to_string(),
                    u.host_str().map(str::to_string),
                    u.port_or_known_default(),
                )
            })
        };
        match (origin(url), origin(&self.base)) {
            (Some(a), Some(b)) if a == b => Ok(url.to_string()),
            _ => Err(Error::Internal(format!(
                "ARM answered with a link to another host ({}); not following it",
                strip_query(url)
            ))),
        }
    }

    /// One request, retried as `self.retry` says; an error answer becomes [`Error`].
    async fn send(&self, method: Method, url: &str, body: Option<&Value>) -> Result<Answer, Error> {
        self.send_if(method, url, body, None).await
    }

    /// [`send`](Self::send) with `If-Match: etag` when given; its 412 is then
    /// an answer (the caller reads the resource again), not an error.
    async fn send_if(
        &self,
        method: Method,
        url: &str,
        body: Option<&Value>,
        etag: Option<&str>,
    ) -> Result<Answer, Error> {
        self.retry
            .run("an ARM request", |_| {
                let method = method.clone();
                async move { self.try_send(method, url, body, etag).await }
            })
            .await
    }

    /// One try of [`send_if`](Self::send_if): the answer, or how its failure
    /// counts for the retry policy.
    async fn try_send(
        &self,
        method: Method,
        url: &str,
        body: Option<&Value>,
        etag: Option<&str>,
    ) -> Step<Answer, Error> {
        if let Some(left) = self.gate_closed_for(&method) {
            return Step::Fail(Error::Unavailable(format!(
                "ARM throttled this subscription's {}; not sending {method} {} for another {}s \
                 (its Retry-After); retry later",
                if method == Method::GET {
                    "reads"
                } else {
                    "writes"
                },
                strip_query(url),
                left.as_secs_f64().ceil() as u64
            )));
        }
        let token = match auth::token(self.credential.as_ref(), &self.scope).await {
            Ok(token) => token,
            Err(e) => return Step::Fail(e),
        };
        let mut req = self
            .http
            .request(method.clone(), url)
            .bearer_auth(token.as_str())
            .header("accept", "application/json");
        if let Some(body) = body {
            req = req.json(body);
        }
        if let Some(etag) = etag {
            req = req.header("if-match", etag);
        }
        let resp = match req.send().await {
            Ok(resp) => resp,
            Err(e) => {
                return Step::retry(Error::Unavailable(format!(
                    "{method} {}: {}",
                    strip_query(url),
                    if e.is_timeout() {
                        "timed out".to_string()
                    } else {
                        e.without_url().to_string()
                    }
                )));
            }
        };
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.bytes().await.unwrap_or_default();
        let json: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or(Value::Null)
        };
        if status.is_success() || (status == StatusCode::PRECONDITION_FAILED && etag.is_some()) {
            return Step::Done(Answer {
                status,
                headers,
                body: json,
            });
        }
        let err = arm_error(&method, url, status.as_u16(), &json, &bytes);
        // A 409 for another operation in progress on the resource (a VM being
        // updated by someone else) clears by itself.
        let busy = status == StatusCode::CONFLICT
            && matches!(
                code_and_message(&json).0.as_deref(),
                Some("Conflict" | "AnotherOperationInProgress" | "OperationPreempted")
            );
        if status == StatusCode::TOO_MANY_REQUESTS {
            // The whole Retry-After, however long: the gate stays closed for
            // every request of this kind meanwhile, and this one is not retried.
            let wait = retry_after(&headers).unwrap_or(self.retry.max_delay);
            self.close_gate(&method, wait);
            tracing::warn!(
                %method,
                retry_after_s = wait.as_secs(),
                "ARM throttled the subscription; holding back requests of this kind"
            );
            return Step::Fail(err);
        }
        if status.is_server_error() || busy {
            Step::Retry {
                error: err,
                after: retry_after(&headers),
            }
        } else {
            Step::Fail(err)
        }
    }
}

/// The URL without its query, for messages.
fn strip_query(url: &str) -> &str {
    url.split('?').next().unwrap_or(url)
}

/// `{"error":{"code","message"}}` of an ARM answer, or of an operation status
/// (whose `error` member, or the body itself, is the error object).
fn code_and_message(body: &Value) -> (Option<String>, Option<String>) {
    let error = ErrorBody::of(body).unwrap_or_else(|| ErrorBody::fields(body));
    (error.code, error.message)
}

fn operation_failed(body: &Value, state: &str) -> Error {
    let (code, message) = code_and_message(body);
    let code = code.unwrap_or_else(|| format!("Operation{state}"));
    let message = message.unwrap_or_default();
    map_code(
        0,
        &code,
        format!("Azure operation {state}: {code}: {message}"),
    )
}

/// An ARM error answer as an [`Error`], keeping ARM's code and message.
pub fn arm_error(method: &Method, url: &str, status: u16, json: &Value, raw: &[u8]) -> Error {
    let (code, message) = code_and_message(json);
    let message = message.unwrap_or_else(|| clean(&String::from_utf8_lossy(raw), 200));
    let code = code.unwrap_or_default();
    let text = format!(
        "{method} {} answered HTTP {status} {code}: {message}",
        strip_query(url)
    );
    map_code(status, &code, text)
}

/// The one mapping from ARM's HTTP status and error code to a gRPC code.
pub fn map_code(status: u16, code: &str, text: String) -> Error {
    let lower = text.to_ascii_lowercase();
    match code {
        "ResourceNotFound" | "NotFound" | "ParentResourceNotFound" => Error::NotFound(text),
        "ResourceGroupNotFound" | "SubscriptionNotFound" => Error::FailedPrecondition(format!(
            "{text} (check the resource group and subscription in the Azure configuration)"
        )),
        "AuthorizationFailed"
        | "LinkedAuthorizationFailed"
        | "AuthenticationFailed"
        | "InvalidAuthenticationToken"
        | "InvalidAuthenticationTokenTenant" => Error::FailedPrecondition(format!(
            "permission denied: {text} (grant the controller's identity a role that allows it)"
        )),
        "QuotaExceeded"
        | "OperationNotAllowedQuota"
        | "ZonalAllocationFailed"
        | "AllocationFailed"
        | "SkuNotAvailable"
        | "MaxDataDisksExceeded" => Error::ResourceExhausted(text),
        "OperationNotAllowed"
            if lower.contains("quota")
                || lower.contains("maximum number")
                || lower.contains("limit") =>
        {
            Error::ResourceExhausted(text)
        }
        "OperationNotAllowed" | "OperationNotAllowedOnDisk" | "DiskInUse" => {
            Error::FailedPrecondition(text)
        }
        "Conflict"
        | "AnotherOperationInProgress"
        | "OperationPreempted"
        | "AttachDiskWhileBeingDetached"
        | "RetryableError" => Error::Aborted(text),
        "InvalidParameter"
        | "InvalidRequestContent"
        | "InvalidRequestFormat"
        | "BadRequest"
        | "InvalidResourceName"
        | "PropertyChangeNotAllowed" => Error::InvalidArgument(text),
        _ => match status {
            400 => Error::InvalidArgument(text),
            401 | 403 => Error::FailedPrecondition(format!("permission denied: {text}")),
            404 => Error::NotFound(text),
            409 => Error::Aborted(text),
            429 => Error::Unavailable(format!("throttled by ARM: {text}")),
            s if s >= 500 => Error::Unavailable(text),
            _ => Error::Internal(text),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn mapped(status: u16, code: &str, message: &str) -> Error {
        let body = json!({"error": {"code": code, "message": message}});
        arm_error(
            &Method::PUT,
            "http://x/disks/d?api-version=1",
            status,
            &body,
            b"",
        )
    }

    #[test]
    fn arm_errors_map_to_csi_codes_keeping_their_text() {
        use tonic::Code;
        let cases = [
            (
                404,
                "ResourceNotFound",
                "The Resource 'd' was not found.",
                Code::NotFound,
            ),
            (
                400,
                "InvalidParameter",
                "diskSizeGB is bad",
                Code::InvalidArgument,
            ),
            (409, "Conflict", "another op", Code::Aborted),
            (
                409,
                "AttachDiskWhileBeingDetached",
                "being detached",
                Code::Aborted,
            ),
            (
                409,
                "OperationNotAllowed",
                "Operation results in exceeding quota limits of Core",
                Code::ResourceExhausted,
            ),
            (
                409,
                "OperationNotAllowed",
                "The maximum number of data disks allowed to be attached to a VM of this size is 4.",
                Code::ResourceExhausted,
            ),
            (
                409,
                "OperationNotAllowed",
                "Disk d is attached to VM v.",
                Code::FailedPrecondition,
            ),
            (
                403,
                "AuthorizationFailed",
                "client x does not have authorization",
                Code::FailedPrecondition,
            ),
            (
                401,
                "InvalidAuthenticationToken",
                "expired",
                Code::FailedPrecondition,
            ),
            (
                404,
                "ResourceGroupNotFound",
                "Resource group 'rg' could not be found.",
                Code::FailedPrecondition,
            ),
            (503, "ServiceUnavailable", "try later", Code::Unavailable),
            (429, "SomethingNew", "slow down", Code::Unavailable),
            (418, "Teapot", "short and stout", Code::Internal),
        ];
        for (status, code, message, want) in cases {
            let e = mapped(status, code, message);
            assert_eq!(e.code(), want, "{status} {code}");
            assert!(e.message().contains(code), "{}", e.message());
            assert!(e.message().contains(message), "{}", e.message());
            assert!(!e.message().contains("api-version"), "{}", e.message());
        }
    }

    #[test]
    fn failed_operations_keep_the_inner_error() {
        let body = json!({"status": "Failed", "error": {"code": "ZonalAllocationFailed", "message": "no room in zone 2"}});
        let e = operation_failed(&body, "Failed");
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(e.message().contains("no room in zone 2"));
    }
}
