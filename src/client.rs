//! gRPC channels to our own endpoints, unix sockets included.

use std::time::Duration;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Uri};

use crate::config::Endpoint;

/// The tonic endpoint for `endpoint`, and for a unix socket the path to dial:
/// tonic wants a URI, which the unix connector then ignores.
fn target(
    endpoint: &Endpoint,
    timeout: Duration,
) -> Result<(tonic::transport::Endpoint, Option<std::path::PathBuf>), tonic::transport::Error> {
    let (uri, path) = match endpoint {
        Endpoint::Unix(path) => ("http://localhost".to_string(), Some(path.clone())),
        Endpoint::Tcp(addr) => (format!("http://{addr}"), None),
    };
    Ok((
        tonic::transport::Endpoint::from_shared(uri)?.connect_timeout(timeout),
        path,
    ))
}

/// Dials a unix socket, whatever URI tonic hands it.
#[derive(Clone)]
struct UnixConnector(std::path::PathBuf);

impl tower::Service<Uri> for UnixConnector {
    type Response = TokioIo<tokio::net::UnixStream>;
    type Error = std::io::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = std::io::Result<Self::Response>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let path = self.0.clone();
        Box::pin(async move { Ok(TokioIo::new(tokio::net::UnixStream::connect(path).await?)) })
    }
}

/// A channel to `endpoint` that connects on first use and reconnects as needed.
pub fn connect_lazy(
    endpoint: &Endpoint,
    timeout: Duration,
) -> Result<Channel, tonic::transport::Error> {
    let (ep, path) = target(endpoint, timeout)?;
    Ok(match path {
        Some(path) => ep.connect_with_connector_lazy(UnixConnector(path)),
        None => ep.connect_lazy(),
    })
}

/// Connects to `endpoint`, waiting at most `timeout` for the server to accept.
pub async fn connect(
    endpoint: &Endpoint,
    timeout: Duration,
) -> Result<Channel, tonic::transport::Error> {
    let (ep, path) = target(endpoint, timeout)?;
    match path {
        Some(path) => ep.connect_with_connector(UnixConnector(path)).await,
        None => ep.connect().await,
    }
}
