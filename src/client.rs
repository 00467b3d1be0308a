//! gRPC channels to our own endpoints, unix sockets included.

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Uri};

use crate::config::Endpoint;

/// A channel to `endpoint` that connects on first use and reconnects as needed.
pub fn connect_lazy(
    endpoint: &Endpoint,
    timeout: std::time::Duration,
) -> Result<Channel, tonic::transport::Error> {
    match endpoint {
        Endpoint::Unix(path) => {
            let path = path.clone();
            Ok(tonic::transport::Endpoint::from_static("http://localhost")
                .connect_timeout(timeout)
                .connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        let stream = tokio::net::UnixStream::connect(path).await?;
                        Ok::<_, std::io::Error>(TokioIo::new(stream))
                    }
                })))
        }
        Endpoint::Tcp(addr) => Ok(tonic::transport::Endpoint::from_shared(format!(
            "http://{addr}"
        ))?
        .connect_timeout(timeout)
        .connect_lazy()),
    }
}

/// Connects to `endpoint`, waiting at most `timeout` for the server to accept.
pub async fn connect(
    endpoint: &Endpoint,
    timeout: std::time::Duration,
) -> Result<Channel, tonic::transport::Error> {
    match endpoint {
        Endpoint::Unix(path) => {
            let path = path.clone();
            // The URI is required by the API but unused: the connector ignores it.
            tonic::transport::Endpoint::from_static("http://localhost")
                .connect_timeout(timeout)
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        let stream = tokio::net::UnixStream::connect(path).await?;
                        Ok::<_, std::io::Error>(TokioIo::new(stream))
                    }
                }))
                .await
        }
        Endpoint::Tcp(addr) => {
            tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
                .connect_timeout(timeout)
                .connect()
                .await
        }
    }
}
