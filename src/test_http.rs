//! The wire side of the in-process HTTP fakes that tests put in place of the
//! services the driver calls (ARM and Entra ID, Compute Engine, cloud KMS): a
//! plain HTTP/1 server on 127.0.0.1 handing each request to a handler.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;

/// A request as a fake saw it.
#[derive(Clone, Debug)]
pub struct Exchange {
    pub method: String,
    pub path: String,
    pub query: HashMap<String, String>,
    pub headers: http::HeaderMap,
    pub body: Vec<u8>,
}

impl Exchange {
    /// A header's value, empty when absent or not text.
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

/// What a fake answers.
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// The pairs of a URL query or a form body.
pub fn pairs(encoded: &str) -> HashMap<String, String> {
    reqwest::Url::parse(&format!("http://x/?{encoded}"))
        .expect("a url")
        .query_pairs()
        .into_owned()
        .collect()
}

/// Binds a port, builds the handler from the server's base URL (some answers
/// name it, such as long-running operation links), serves every request with it
/// and returns the base URL.
pub async fn serve<H>(make: impl FnOnce(&str) -> H) -> String
where
    H: Fn(Exchange) -> Answer + Send + Sync + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let handler = Arc::new(make(&base));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let handler = handler.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let handler = handler.clone();
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body.collect().await.map(|b| b.to_bytes().to_vec());
                            let answer = handler(Exchange {
                                method: parts.method.to_string(),
                                path: parts.uri.path().to_string(),
                                query: parts.uri.query().map(pairs).unwrap_or_default(),
                                headers: parts.headers,
                                body: body.unwrap_or_default(),
                            });
                            let mut resp = http::Response::builder().status(answer.status);
                            for (name, value) in answer.headers {
                                resp = resp.header(name, value);
                            }
                            Ok::<_, Infallible>(
                                resp.body(Full::new(Bytes::from(answer.body))).unwrap(),
                            )
                        }
                    });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await;
            });
        }
    });
    base
}
