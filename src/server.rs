//! Serving gRPC on an endpoint: the unix socket's life (stale file removed, a
//! live one refused, mode 0660, removed again at exit), graceful shutdown on
//! SIGTERM or SIGINT with in-flight RPCs allowed to finish, a cap on open
//! connections, HTTP/2 keepalives, and (on unix sockets) the relay that lets
//! every official gRPC client in.

use std::future::Future;
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio_stream::StreamExt;

use tonic::transport::server::Router as TonicRouter;

/// A tonic router with the layers every server of ours carries: RPC metrics.
pub type Router = TonicRouter<
    tower::layer::util::Stack<crate::metrics::RpcMetricsLayer, tower::layer::util::Identity>,
>;

/// How often an idle HTTP/2 connection is pinged, and how long the answer may
/// take before the connection is closed: a peer that vanished (a node that died,
/// a cut network) stops holding a connection slot.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// A server builder with those layers and the keepalives, to add services to.
pub fn builder() -> tonic::transport::server::Server<
    tower::layer::util::Stack<crate::metrics::RpcMetricsLayer, tower::layer::util::Identity>,
> {
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .layer(crate::metrics::RpcMetricsLayer)
}

use crate::config::Endpoint;

pub mod accept;
mod authority;

/// What bounds one server's connections.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections open at once; more wait in the kernel's backlog. Lowered to
    /// what the file descriptor limit allows.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: accept::DEFAULT_MAX_CONNECTIONS,
        }
    }
}

/// Why a server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(
        "{0}: another server is listening on this socket; stop it or choose another --endpoint"
    )]
    InUse(PathBuf),
    #[error("{0}: exists and is not a socket; refusing to remove it")]
    NotASocket(PathBuf),
    #[error("{what} {target}: {source}")]
    Io {
        what: &'static str,
        target: String,
        source: io::Error,
    },
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Mode of the socket: the driver's user and group (kubelet, the sidecars).
pub const SOCKET_MODE: u32 = 0o660;

/// Makes `path` free for a new socket: a stale socket file (no one accepts on it)
/// is removed; a live one or a file of another kind is refused.
pub fn prepare_socket_path(path: &Path) -> Result<(), ServeError> {
    let io_err = |what| {
        let target = path.display().to_string();
        move |source| ServeError::Io {
            what,
            target,
            source,
        }
    };
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("inspect")(e)),
        Ok(meta) if meta.file_type().is_socket() => {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => return Err(ServeError::InUse(path.to_path_buf())),
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    tracing::info!(socket = %path.display(), "removing stale socket");
                    std::fs::remove_file(path).map_err(io_err("remove stale socket"))?;
                }
                Err(e) => return Err(io_err("probe existing socket")(e)),
            }
        }
        Ok(_) => return Err(ServeError::NotASocket(path.to_path_buf())),
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io_err("create socket directory"))?;
    }
    Ok(())
}

/// Binds a unix socket at `path` with mode [`SOCKET_MODE`].
pub fn bind_unix(path: &Path) -> Result<UnixListener, ServeError> {
    prepare_socket_path(path)?;
    let io_err = |what| {
        let target = path.display().to_string();
        move |source| ServeError::Io {
            what,
            target,
            source,
        }
    };
    let listener = UnixListener::bind(path).map_err(io_err("bind"))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))
        .map_err(io_err("set mode of"))?;
    Ok(listener)
}

/// Resolves when the process receives SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
    let which = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!(signal = which, "shutting down; waiting for in-flight RPCs");
}

/// How long in-flight RPCs may run on after a shutdown signal.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Serves `router` on `endpoint` until `shutdown` resolves, then lets in-flight
/// RPCs finish (for at most [`SHUTDOWN_GRACE`]) and removes the socket file.
pub async fn serve(
    router: Router,
    endpoint: &Endpoint,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let (signalled_tx, signalled_rx) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        shutdown.await;
        let _ = signalled_tx.send(());
    };
    let grace_expired = async move {
        if signalled_rx.await.is_ok() {
            tokio::time::sleep(SHUTDOWN_GRACE).await;
            tracing::warn!(grace = ?SHUTDOWN_GRACE, "in-flight RPCs did not finish in time; stopping anyway");
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        result = serve_until(router, endpoint, limits, shutdown) => result?,
        () = grace_expired => {
            if let Endpoint::Unix(path) = endpoint {
                let _ = std::fs::remove_file(path);
            }
        }
    }
    tracing::info!("stopped");
    Ok(())
}

async fn serve_until(
    router: Router,
    endpoint: &Endpoint,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let max_connections = accept::connection_cap(limits.max_connections);
    match endpoint {
        Endpoint::Unix(path) => {
            let listener = bind_unix(path)?;
            tracing::info!(%endpoint, "serving");
            // Every connection through the relay that lets non-Go gRPC clients in.
            let incoming = accept::incoming(listener, max_connections, "grpc")
                .map(|r| r.map(|conn| conn.map(authority::relay)));
            let result = router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await;
            // Best effort: a later start removes a leftover stale socket anyway.
            let _ = std::fs::remove_file(path);
            result?;
        }
        Endpoint::Tcp(addr) => {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| ServeError::Io {
                    what: "bind",
                    target: addr.to_string(),
                    source,
                })?;
            tracing::info!(endpoint = %format!("tcp://{}", listener.local_addr().map_err(|source| ServeError::Io { what: "read address of", target: addr.to_string(), source })?), "serving");
            router
                .serve_with_incoming_shutdown(
                    accept::incoming(listener, max_connections, "grpc"),
                    shutdown,
                )
                .await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stale_socket_is_replaced_and_live_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("csi.sock");
        // A socket file nobody listens on: stale.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let live = bind_unix(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, SOCKET_MODE);
        // Now someone listens: refused, and the socket is left alone.
        let err = bind_unix(&path).unwrap_err();
        assert!(matches!(err, ServeError::InUse(_)), "{err}");
        assert!(path.exists());
        drop(live);
    }

    #[test]
    fn other_files_are_never_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        std::fs::write(&path, b"keep me").unwrap();
        let err = prepare_socket_path(&path).unwrap_err();
        assert!(matches!(err, ServeError::NotASocket(_)), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"keep me");
    }

    #[test]
    fn missing_parent_directory_is_created() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b/csi.sock");
        prepare_socket_path(&path).unwrap();
        assert!(path.parent().unwrap().is_dir());
    }
}
