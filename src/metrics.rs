//! Prometheus metrics and the small HTTP server that exposes them.
//!
//! - `cryptdisk_rpc_requests_total{method, code}` and
//!   `cryptdisk_rpc_duration_seconds{method}`: every gRPC call, from a tower
//!   layer around the whole server, so no handler can forget it;
//! - `cryptdisk_crypt_duration_seconds{op}`: libcryptsetup work (format, open,
//!   close, resize) and integrity wipes;
//! - `cryptdisk_kms_request_duration_seconds{result}`: data-key requests;
//! - `cryptdisk_active_mappings`: open `cryptdisk-*` dm-crypt mappings, counted
//!   at each scrape;
//! - `cryptdisk_wipe_bytes_done{mapping}` / `cryptdisk_wipe_bytes_total{mapping}`:
//!   running integrity wipes.
//!
//! `GET /metrics` serves the text format and `GET /healthz` answers `ok`.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::Instant;

use http_body_util::Full;
use hyper::body::Bytes;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;
type HistogramFamily = Family<Labels, Histogram, fn() -> Histogram>;

/// Every metric of the process.
pub struct Metrics {
    registry: Registry,
    rpc_requests: Family<Labels, Counter>,
    rpc_duration: HistogramFamily,
    crypt_duration: HistogramFamily,
    kms_duration: HistogramFamily,
    active_mappings: Gauge,
    wipe_done: Family<Labels, Gauge>,
    wipe_total: Family<Labels, Gauge>,
}

/// 1 ms to about 65 s, doubling.
fn seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("cryptdisk");
        let rpc_requests = Family::<Labels, Counter>::default();
        let rpc_duration = HistogramFamily::new_with_constructor(seconds_histogram);
        let crypt_duration = HistogramFamily::new_with_constructor(seconds_histogram);
        let kms_duration = HistogramFamily::new_with_constructor(seconds_histogram);
        let active_mappings = Gauge::default();
        let wipe_done = Family::<Labels, Gauge>::default();
        let wipe_total = Family::<Labels, Gauge>::default();
        registry.register(
            "rpc_requests",
            "gRPC calls served, by method and status code",
            rpc_requests.clone(),
        );
        registry.register(
            "rpc_duration_seconds",
            "Time to answer a gRPC call, by method",
            rpc_duration.clone(),
        );
        registry.register(
            "crypt_duration_seconds",
            "Time of dm-crypt and LUKS2 operations, by operation",
            crypt_duration.clone(),
        );
        registry.register(
            "kms_request_duration_seconds",
            "Time to get a data key from the KMS, by result",
            kms_duration.clone(),
        );
        registry.register(
            "active_mappings",
            "Open dm-crypt mappings of this driver",
            active_mappings.clone(),
        );
        registry.register(
            "wipe_bytes_done",
            "Bytes written so far by a running integrity wipe",
            wipe_done.clone(),
        );
        registry.register(
            "wipe_bytes_total",
            "Bytes a running integrity wipe writes in all",
            wipe_total.clone(),
        );
        Metrics {
            registry,
            rpc_requests,
            rpc_duration,
            crypt_duration,
            kms_duration,
            active_mappings,
            wipe_done,
            wipe_total,
        }
    }

    pub fn record_rpc(&self, method: &str, code: &str, started: Instant) {
        self.rpc_requests
            .get_or_create(&vec![
                ("method", method.to_string()),
                ("code", code.to_string()),
            ])
            .inc();
        self.rpc_duration
            .get_or_create(&vec![("method", method.to_string())])
            .observe(started.elapsed().as_secs_f64());
    }

    pub fn record_crypt(&self, op: &'static str, started: Instant) {
        self.crypt_duration
            .get_or_create(&vec![("op", op.to_string())])
            .observe(started.elapsed().as_secs_f64());
    }

    pub fn record_kms(&self, ok: bool, started: Instant) {
        let result = if ok { "ok" } else { "error" };
        self.kms_duration
            .get_or_create(&vec![("result", result.to_string())])
            .observe(started.elapsed().as_secs_f64());
    }

    /// Progress of the wipe of `mapping`; `None` once it stops.
    pub fn wipe_progress(&self, mapping: &str, progress: Option<(u64, u64)>) {
        let labels = vec![("mapping", mapping.to_string())];
        match progress {
            Some((done, total)) => {
                self.wipe_done
                    .get_or_create(&labels)
                    .set(i64::try_from(done).unwrap_or(i64::MAX));
                self.wipe_total
                    .get_or_create(&labels)
                    .set(i64::try_from(total).unwrap_or(i64::MAX));
            }
            None => {
                self.wipe_done.remove(&labels);
                self.wipe_total.remove(&labels);
            }
        }
    }

    /// The text exposition, with the gauges that are read at scrape time.
    pub fn render(&self) -> String {
        self.active_mappings.set(count_mappings());
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// The process's metrics.
pub fn global() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

fn count_mappings() -> i64 {
    std::fs::read_dir("/dev/mapper")
        .map(|dir| {
            dir.filter_map(|e| e.ok())
                .filter(|e| {
                    let name = e.file_name();
                    let name = name.to_string_lossy();
                    name.starts_with("cryptdisk-") && !name.ends_with("_dif")
                })
                .count() as i64
        })
        .unwrap_or(0)
}

/// A tower layer that counts and times every gRPC call of a tonic server.
#[derive(Clone, Copy, Debug, Default)]
pub struct RpcMetricsLayer;

impl<S> tower::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RpcMetrics { inner }
    }
}

#[derive(Clone, Debug)]
pub struct RpcMetrics<S> {
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, RB> tower::Service<http::Request<B>> for RpcMetrics<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let method = method_name(req.uri().path());
        let started = Instant::now();
        let call = self.inner.call(req);
        Box::pin(async move {
            let mut result = call.await;
            if let Ok(resp) = &mut result {
                bound_status_message(resp.headers_mut());
            }
            let code = match &result {
                Ok(resp) => status_name(resp.headers()),
                Err(_) => "TransportError".to_string(),
            };
            global().record_rpc(&method, &code, started);
            result
        })
    }
}

/// Longest `grpc-message` (percent-encoded) a response carries. Error messages
/// quote what the request said, and a huge value quoted back would exceed the
/// client's header limit and turn a clear error into a protocol error.
pub const MAX_STATUS_MESSAGE: usize = 2048;

fn bound_status_message(headers: &mut http::HeaderMap) {
    let Some(value) = headers.get("grpc-message") else {
        return;
    };
    let bytes = value.as_bytes();
    if bytes.len() <= MAX_STATUS_MESSAGE {
        return;
    }
    let mut cut = MAX_STATUS_MESSAGE;
    // Never split a %XX escape.
    if let Some(pct) = bytes[cut - 2..cut].iter().position(|&b| b == b'%') {
        cut = cut - 2 + pct;
    }
    let mut short = bytes[..cut].to_vec();
    short.extend_from_slice(b"%E2%80%A6 (message cut)");
    if let Ok(v) = http::HeaderValue::from_bytes(&short) {
        headers.insert("grpc-message", v);
    }
}

/// `/csi.v1.Node/NodeStageVolume` → `NodeStageVolume`.
fn method_name(path: &str) -> String {
    path.rsplit('/').next().unwrap_or(path).to_string()
}

/// A failed unary call is a trailers-only response, with `grpc-status` among the
/// headers; a successful one carries it in the trailers, so no header means OK.
fn status_name(headers: &http::HeaderMap) -> String {
    let code = headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .unwrap_or(0);
    format!("{:?}", tonic::Code::from_i32(code))
}

/// Connections the metrics server keeps open at once: a scraper or two and
/// kubelet's probes.
const METRICS_MAX_CONNECTIONS: usize = 64;
/// Time a client has to send its request's headers.
const METRICS_HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Time one connection may stay open, keep-alive included.
const METRICS_CONNECTION_LIFETIME: std::time::Duration = std::time::Duration::from_secs(120);

/// Serves `/metrics` and `/healthz` on `addr` until the process ends, with the
/// accept loop's connection cap and backoff, and deadlines on slow clients.
pub async fn serve(addr: SocketAddr) -> std::io::Result<()> {
    use tokio_stream::StreamExt;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving /metrics and /healthz");
    let max = crate::server::accept::connection_cap(METRICS_MAX_CONNECTIONS);
    let mut incoming = crate::server::accept::incoming(listener, max, "metrics");
    tokio::spawn(async move {
        while let Some(Ok(conn)) = incoming.next().await {
            tokio::spawn(async move {
                let io = hyper_util::rt::TokioIo::new(conn);
                let service = hyper::service::service_fn(handle);
                let serving = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(METRICS_HEADER_TIMEOUT)
                    .serve_connection(io, service);
                let _ = tokio::time::timeout(METRICS_CONNECTION_LIFETIME, serving).await;
            });
        }
    });
    Ok(())
}

async fn handle(
    req: http::Request<hyper::body::Incoming>,
) -> Result<http::Response<Full<Bytes>>, Infallible> {
    let reply = |status: u16, content_type: &str, body: String| {
        http::Response::builder()
            .status(status)
            .header("content-type", content_type)
            .body(Full::new(Bytes::from(body)))
            .expect("a valid response")
    };
    Ok(match (req.method(), req.uri().path()) {
        (&http::Method::GET, "/metrics") => reply(
            200,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            global().render(),
        ),
        (&http::Method::GET, "/healthz") => reply(200, "text/plain", "ok\n".into()),
        _ => reply(
            404,
            "text/plain",
            "not found: try /metrics or /healthz\n".into(),
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_and_status_names() {
        assert_eq!(
            method_name("/csi.v1.Node/NodeStageVolume"),
            "NodeStageVolume"
        );
        let mut h = http::HeaderMap::new();
        assert_eq!(status_name(&h), "Ok");
        h.insert("grpc-status", "5".parse().unwrap());
        assert_eq!(status_name(&h), "NotFound");
    }

    #[test]
    fn long_status_messages_are_cut_between_escapes() {
        let mut h = http::HeaderMap::new();
        let long = "%20".repeat(1000) + &"x".repeat(5000);
        h.insert("grpc-message", long.parse().unwrap());
        bound_status_message(&mut h);
        let v = h["grpc-message"].to_str().unwrap();
        assert!(v.len() < MAX_STATUS_MESSAGE + 40, "{}", v.len());
        assert!(v.ends_with("(message cut)"));
        let kept = v.trim_end_matches("%E2%80%A6 (message cut)");
        assert!(kept.len().is_multiple_of(3) && kept.chars().all(|c| "%20".contains(c)));
        let mut short = http::HeaderMap::new();
        short.insert("grpc-message", "fine".parse().unwrap());
        bound_status_message(&mut short);
        assert_eq!(short["grpc-message"], "fine");
    }

    #[test]
    fn rendering_shows_recorded_values() {
        let m = Metrics::new();
        m.record_rpc("CreateVolume", "Ok", Instant::now());
        m.record_crypt("open", Instant::now());
        m.record_kms(false, Instant::now());
        m.wipe_progress("cryptdisk-x", Some((5, 10)));
        let text = m.render();
        for want in [
            r#"cryptdisk_rpc_requests_total{method="CreateVolume",code="Ok"} 1"#,
            r#"cryptdisk_crypt_duration_seconds_count{op="open"} 1"#,
            r#"cryptdisk_kms_request_duration_seconds_count{result="error"} 1"#,
            r#"cryptdisk_wipe_bytes_done{mapping="cryptdisk-x"} 5"#,
            "cryptdisk_active_mappings ",
        ] {
            assert!(text.contains(want), "{want} missing from\n{text}");
        }
        m.wipe_progress("cryptdisk-x", None);
        assert!(!m.render().contains("cryptdisk-x"));
    }
}
