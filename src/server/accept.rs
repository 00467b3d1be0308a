//! Accepting connections so that neither a flood of idle ones nor a full file
//! descriptor table takes a server down: at most a fixed number of connections
//! are open at once (the rest wait in the kernel's backlog), and a failing
//! `accept` (EMFILE, ENFILE, ENOBUFS, ENOMEM) backs off instead of spinning, as
//! tonic's and our metrics server's loops did.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

/// File descriptors kept free for what is not a connection: the listening
/// sockets, log and state files, libcryptsetup's devices, the KMS client.
const RESERVED_FDS: u64 = 128;

/// The first pause after `accept` fails, doubled on each failure up to the last.
const BACKOFF_FIRST: Duration = Duration::from_millis(5);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Default cap on a server's open connections (and never more than the file
/// descriptors allow).
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;

/// Raises this process's soft limit on open files to its hard limit (many
/// container runtimes start processes at a soft 1024) and returns the soft limit
/// now in force.
pub fn raise_fd_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    limit.rlim_cur
}

/// At most `wanted` connections, and never so many that they leave fewer than
/// [`RESERVED_FDS`] descriptors under the limit; at least 16.
pub fn connection_cap(wanted: usize) -> usize {
    let fds = raise_fd_limit();
    let room = usize::try_from(fds.saturating_sub(RESERVED_FDS)).unwrap_or(usize::MAX);
    wanted.min(room).max(16)
}

/// A listening socket that yields connections of type `Io`.
pub trait Acceptor: Send + 'static {
    type Io: Send + 'static;
    fn accept(&mut self) -> impl Future<Output = io::Result<Self::Io>> + Send;
}

impl Acceptor for TcpListener {
    type Io = TcpStream;
    async fn accept(&mut self) -> io::Result<TcpStream> {
        TcpListener::accept(self).await.map(|(stream, _)| stream)
    }
}

impl Acceptor for UnixListener {
    type Io = tokio::net::UnixStream;
    async fn accept(&mut self) -> io::Result<tokio::net::UnixStream> {
        UnixListener::accept(self).await.map(|(stream, _)| stream)
    }
}

/// A connection that holds one of its server's connection slots until dropped.
pub struct Limited<Io> {
    io: Io,
    _slot: OwnedSemaphorePermit,
}

impl<Io> Limited<Io> {
    pub fn map<T>(self, f: impl FnOnce(Io) -> T) -> Limited<T> {
        Limited {
            io: f(self.io),
            _slot: self._slot,
        }
    }
}

/// Whether a failed `accept` concerns only the connection being accepted (the
/// peer gave up), so that accepting the next one at once is right.
fn only_this_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    ) || e.raw_os_error() == Some(libc::EPROTO)
}

/// Accepts on `acceptor` in a task of its own, at most `max_connections` open at
/// once, and hands the connections on; the task ends, closing the listening
/// socket, when the returned stream is dropped.
pub fn incoming<A: Acceptor>(
    mut acceptor: A,
    max_connections: usize,
    what: &'static str,
) -> ReceiverStream<io::Result<Limited<A::Io>>> {
    let (tx, rx) = mpsc::channel(16);
    let slots = Arc::new(Semaphore::new(max_connections));
    tokio::spawn(async move {
        let mut backoff = BACKOFF_FIRST;
        loop {
            let slot = match slots.clone().try_acquire_owned() {
                Ok(slot) => slot,
                Err(_) => {
                    tracing::warn!(
                        server = what,
                        max_connections,
                        "connection limit reached; new connections wait"
                    );
                    tokio::select! {
                        _ = tx.closed() => return,
                        slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
                    }
                }
            };
            let io = loop {
                let accepted = tokio::select! {
                    _ = tx.closed() => return,
                    accepted = acceptor.accept() => accepted,
                };
                match accepted {
                    Ok(io) => {
                        backoff = BACKOFF_FIRST;
                        break io;
                    }
                    Err(e) if only_this_connection(&e) => continue,
                    Err(e) => {
                        if backoff == BACKOFF_FIRST {
                            tracing::warn!(server = what, error = %e, "accept failed; backing off");
                        }
                        tokio::select! {
                            _ = tx.closed() => return,
                            () = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                    }
                }
            };
            let conn = Limited { io, _slot: slot };
            if tx.send(Ok(conn)).await.is_err() {
                return;
            }
        }
    });
    ReceiverStream::new(rx)
}

impl<Io: Connected> Connected for Limited<Io> {
    type ConnectInfo = Io::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl<Io: AsyncRead + Unpin> AsyncRead for Limited<Io> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<Io: AsyncWrite + Unpin> AsyncWrite for Limited<Io> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_stream::StreamExt;

    #[tokio::test]
    async fn connections_beyond_the_cap_wait_for_a_free_slot() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut conns = incoming(listener, 2, "test");
        let _a = TcpStream::connect(addr).await.unwrap();
        let _b = TcpStream::connect(addr).await.unwrap();
        let _c = TcpStream::connect(addr).await.unwrap();
        let first = conns.next().await.unwrap().unwrap();
        let _second = conns.next().await.unwrap().unwrap();
        let third = tokio::time::timeout(Duration::from_millis(300), conns.next()).await;
        assert!(third.is_err(), "a third connection was handed out");
        drop(first);
        let third = tokio::time::timeout(Duration::from_secs(5), conns.next()).await;
        assert!(matches!(third, Ok(Some(Ok(_)))));
    }

    /// An acceptor that fails like a process out of descriptors.
    struct Exhausted(Arc<std::sync::atomic::AtomicUsize>);

    impl Acceptor for Exhausted {
        type Io = ();
        async fn accept(&mut self) -> io::Result<()> {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Err(io::Error::from_raw_os_error(libc::EMFILE))
        }
    }

    #[tokio::test]
    async fn a_failing_accept_backs_off_instead_of_spinning() {
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let conns = incoming(Exhausted(calls.clone()), 4, "test");
        tokio::time::sleep(Duration::from_millis(500)).await;
        drop(conns);
        // 5 + 10 + 20 + 40 + 80 + 160 ms: about seven tries in half a second,
        // where a loop without pauses makes millions.
        let n = calls.load(std::sync::atomic::Ordering::Relaxed);
        assert!((3..=12).contains(&n), "{n} accept calls");
    }

    #[test]
    fn the_cap_leaves_descriptors_free() {
        let fds = raise_fd_limit();
        let cap = connection_cap(usize::MAX);
        assert!(cap as u64 <= fds.saturating_sub(RESERVED_FDS).max(16));
        assert_eq!(connection_cap(20), 20.min(cap));
    }
}
