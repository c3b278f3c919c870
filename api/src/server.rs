//! The HTTP server: an accept loop of berth's own around hyper's HTTP/1 connection, so that no client can
//! hold the API's resources. A connection must send each request's head within the header-read timeout
//! (hyper starts that timer when a connection opens and again when it goes idle after a response, so it also
//! closes idle keep-alive connections). At most `max_connections` are open at once, a cap kept below the
//! process's open-file limit; a connection that arrives at the cap closes the oldest idle one (no request in
//! flight: a client that sent nothing, half a request head, or waits between requests), and waits in the
//! kernel's backlog only when every open connection is busy. Over TLS (tls.rs) the same holds, and the
//! handshake itself must finish within the header-read timeout.

use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{Router, body::Body, extract::ConnectInfo};
use http_body_util::BodyExt;
use hyper::{
    Request,
    body::Incoming,
    header::{HeaderName, HeaderValue},
    server::conn::http1,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tokio_util::{either::Either, sync::CancellationToken};
use tower::ServiceExt;

/// Files the process keeps for other things than client connections (besides the database pool): the
/// listener, logs, the embedded worker's pipes, catalog and key files read at start, DNS lookups.
const FILE_RESERVE: u64 = 64;

#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub header_read_timeout: Duration,
    pub max_connections: usize,
}

/// Raises the soft open-file limit to the hard one (as most servers do) and returns the connection cap that
/// fits under it: `configured`, or less when the limit leaves less room after the database pool and a reserve.
pub fn connection_cap(configured: usize, database_pool_size: u32) -> usize {
    let limit = match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => limit,
        Err(e) => {
            tracing::warn!(error = %e, "could not raise the open-file limit");
            match rlimit::getrlimit(rlimit::Resource::NOFILE) {
                Ok((soft, _)) => soft,
                Err(_) => return configured,
            }
        }
    };
    cap_under_limit(configured, limit, database_pool_size)
}

fn cap_under_limit(configured: usize, file_limit: u64, database_pool_size: u32) -> usize {
    let room = file_limit.saturating_sub(FILE_RESERVE + u64::from(database_pool_size));
    let cap = (configured as u64).min(room).max(1) as usize;
    if cap < configured {
        tracing::warn!(
            file_limit,
            configured,
            cap,
            "the open-file limit leaves room for fewer connections than HTTP_MAX_CONNECTIONS; capping"
        );
    }
    cap
}

/// One open connection, as the accept loop sees it.
struct Connection {
    opened: Instant,
    /// Requests being answered, until their response body is written out.
    in_flight: Arc<AtomicUsize>,
    /// Asks the connection to close (eviction or shutdown).
    close: CancellationToken,
}

#[derive(Default)]
struct Connections {
    next_id: u64,
    open: HashMap<u64, Connection>,
}

impl Connections {
    /// Records a new connection; returns its id.
    fn open(&mut self, in_flight: Arc<AtomicUsize>, close: CancellationToken) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.open.insert(
            id,
            Connection {
                opened: Instant::now(),
                in_flight,
                close,
            },
        );
        id
    }

    /// Asks the oldest connection with no request in flight to close, unless one is closing already.
    fn evict_oldest_idle(&self) {
        if self.open.values().any(|c| c.close.is_cancelled()) {
            return;
        }
        let oldest = self
            .open
            .values()
            .filter(|c| c.in_flight.load(Ordering::Acquire) == 0)
            .min_by_key(|c| c.opened);
        if let Some(connection) = oldest {
            connection.close.cancel();
        }
    }
}

/// Serves `router` on `listener` until `shutdown`, then lets requests in flight finish (idle connections are
/// closed at once). Each request carries `ConnectInfo<SocketAddr>` (the peer's address) in its extensions.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    serve_with_tls(listener, router, limits, None, shutdown).await
}

/// [`serve`], over TLS when `tls` is given. A TLS handshake must complete within the header-read timeout
/// (a client that connects and sends nothing holds its slot no longer than over plain HTTP), and a
/// connection still in its handshake counts as idle, so a newcomer at the cap may close it.
pub async fn serve_with_tls(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    tls: Option<crate::tls::Acceptor>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let connections = Arc::new(Mutex::new(Connections::default()));
    // Tells HTTP/1.1 clients how long an idle connection stays open, so that those which read it (browsers,
    // Node's agents) stop reusing it before the server closes it under a request.
    let keep_alive = HeaderValue::from_str(&format!(
        "timeout={}",
        limits.header_read_timeout.as_secs().max(1)
    ))
    .expect("a number is a header value");
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    loop {
        let Some((stream, peer)) = accept(&listener, &shutdown).await else {
            break;
        };
        let Some(permit) = connection_slot(&permits, &connections, &shutdown).await else {
            break;
        };
        let _ = stream.set_nodelay(true);
        let in_flight = Arc::new(AtomicUsize::new(0));
        let close = shutdown.child_token();
        let id = connections
            .lock()
            .expect("connections lock")
            .open(in_flight.clone(), close.clone());
        let service = request_service(router.clone(), peer, in_flight.clone(), keep_alive.clone());
        let builder = builder.clone();
        let tls = tls.clone();
        let connections = connections.clone();
        tokio::spawn(async move {
            let stream = match tls {
                None => Some(Either::Left(stream)),
                Some(tls) => handshake(&tls, stream, limits.header_read_timeout, &close, peer)
                    .await
                    .map(|s| Either::Right(Box::new(s))),
            };
            if let Some(stream) = stream {
                let connection = builder.serve_connection(TokioIo::new(stream), service);
                let mut connection = std::pin::pin!(connection);
                let result = tokio::select! {
                    result = connection.as_mut() => result,
                    () = close.cancelled() => {
                        if in_flight.load(Ordering::Acquire) == 0 {
                            // Nothing to finish: drop it (and a half-sent request head with it).
                            Ok(())
                        } else {
                            connection.as_mut().graceful_shutdown();
                            connection.await
                        }
                    }
                };
                if let Err(e) = result {
                    tracing::debug!(%peer, error = %e, "connection closed");
                }
            }
            connections
                .lock()
                .expect("connections lock")
                .open
                .remove(&id);
            drop(permit);
        });
    }
    drop(listener);
    // Every connection's slot back means every connection is closed.
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    let _ = permits.acquire_many(all).await;
    Ok(())
}

/// The TLS side of a new connection, or `None` when the handshake fails, takes longer than `timeout`, or the
/// connection is asked to close first.
async fn handshake(
    tls: &crate::tls::Acceptor,
    stream: TcpStream,
    timeout: Duration,
    close: &CancellationToken,
    peer: SocketAddr,
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    tokio::select! {
        () = close.cancelled() => None,
        done = tokio::time::timeout(timeout, tls.accept(stream)) => match done {
            Ok(Ok(stream)) => Some(stream),
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                None
            }
            Err(_) => {
                tracing::debug!(%peer, "TLS handshake timed out");
                None
            }
        },
    }
}

/// The next connection, or `None` on shutdown.
async fn accept(
    listener: &TcpListener,
    shutdown: &CancellationToken,
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return None,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => return Some(accepted),
                Err(e) => {
                    // Out of files or a connection reset before accept: wait a little rather than spin.
                    tracing::warn!(error = %e, "accepting a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

/// A slot for one more connection, or `None` on shutdown. At the cap, the oldest idle connection makes room;
/// while every one is busy, this one waits (and the next ones in the kernel's backlog), trying again as
/// connections finish requests.
async fn connection_slot(
    permits: &Arc<Semaphore>,
    connections: &Mutex<Connections>,
    shutdown: &CancellationToken,
) -> Option<OwnedSemaphorePermit> {
    loop {
        if let Ok(permit) = permits.clone().try_acquire_owned() {
            return Some(permit);
        }
        connections
            .lock()
            .expect("connections lock")
            .evict_oldest_idle();
        tokio::select! {
            () = shutdown.cancelled() => return None,
            permit = permits.clone().acquire_owned() => {
                return Some(permit.expect("the semaphore is never closed"));
            }
            () = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
}

/// The connection's service: `router`, with the peer's address on each request and each request counted in
/// flight until its response body is written out.
fn request_service(
    router: Router,
    peer: SocketAddr,
    in_flight: Arc<AtomicUsize>,
    keep_alive: HeaderValue,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = axum::response::Response,
    Error = Infallible,
    Future = impl Future<Output = Result<axum::response::Response, Infallible>> + Send,
> + Send {
    hyper::service::service_fn(move |mut request: Request<Incoming>| {
        request
            .extensions_mut()
            .insert(ConnectInfo::<SocketAddr>(peer));
        let router = router.clone();
        let busy = InFlight::new(&in_flight);
        let keep_alive = keep_alive.clone();
        async move {
            let mut response = router.oneshot(request).await.unwrap_or_else(|e| match e {});
            response
                .headers_mut()
                .insert(HeaderName::from_static("keep-alive"), keep_alive);
            // Busy until hyper has written the body out (and drops it).
            Ok::<_, Infallible>(response.map(|body| {
                Body::new(body.map_frame(move |frame| {
                    let _ = &busy;
                    frame
                }))
            }))
        }
    })
}

/// Counts one request in flight for as long as it lives.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        Self(count.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn send(stream: &mut tokio::net::TcpStream, path: &str) -> String {
        stream
            .write_all(format!("GET {path} HTTP/1.1\r\nHost: berth\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut buf = vec![0u8; 1024];
        let n = stream.read(&mut buf).await.unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[tokio::test]
    async fn shutdown_lets_a_request_in_flight_finish_and_responses_carry_the_peer_address_and_keep_alive()
     {
        let router = Router::new()
            .route(
                "/slow",
                axum::routing::get(|| async {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    "done"
                }),
            )
            .route(
                "/peer",
                axum::routing::get(|ConnectInfo(peer): ConnectInfo<SocketAddr>| async move {
                    peer.to_string()
                }),
            );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let limits = ConnectionLimits {
            header_read_timeout: Duration::from_secs(5),
            max_connections: 8,
        };
        let server = tokio::spawn(serve(listener, router, limits, shutdown.clone()));

        let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let answer = send(&mut client, "/peer").await;
        assert!(
            answer.ends_with(&client.local_addr().unwrap().to_string()),
            "{answer}"
        );
        // Clients learn how long the idle connection stays open (the header-read timeout).
        assert!(
            answer
                .to_ascii_lowercase()
                .contains("\r\nkeep-alive: timeout=5\r\n"),
            "{answer}"
        );

        let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut busy = tokio::net::TcpStream::connect(addr).await.unwrap();
        let slow = tokio::spawn(async move { send(&mut busy, "/slow").await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        shutdown.cancel();
        let answer = slow.await.unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.ends_with("done"),
            "{answer}"
        );
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("serve returns")
            .unwrap()
            .unwrap();
        // The idle connection was closed, not left waiting for its header-read timeout.
        let mut buf = [0u8; 16];
        assert!(matches!(idle.read(&mut buf).await, Ok(0) | Err(_)));
        assert!(
            tokio::net::TcpStream::connect(addr).await.is_err(),
            "the listener is closed"
        );
    }

    #[tokio::test]
    async fn at_the_cap_a_new_connection_closes_the_oldest_idle_one_and_waits_while_all_are_busy() {
        let router = Router::new()
            .route("/health", axum::routing::get(|| async { "ok" }))
            .route(
                "/slow",
                axum::routing::get(|| async {
                    tokio::time::sleep(Duration::from_millis(700)).await;
                    "done"
                }),
            );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        // A header-read timeout far beyond the test: only eviction can close the idle ones.
        let limits = ConnectionLimits {
            header_read_timeout: Duration::from_secs(60),
            max_connections: 2,
        };
        let server = tokio::spawn(serve(listener, router, limits, shutdown.clone()));

        let mut oldest = tokio::net::TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut half = tokio::net::TcpStream::connect(addr).await.unwrap();
        half.write_all(b"GET /hea").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut third = tokio::net::TcpStream::connect(addr).await.unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(5), send(&mut third, "/health"))
            .await
            .unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        let mut buf = [0u8; 16];
        let closed = tokio::time::timeout(Duration::from_secs(1), oldest.read(&mut buf))
            .await
            .unwrap();
        assert!(
            matches!(closed, Ok(0) | Err(_)),
            "the oldest idle connection was closed"
        );

        // Both slots busy: a newcomer waits for a request to finish instead of closing one in flight.
        drop((third, half));
        tokio::time::sleep(Duration::from_millis(100)).await;
        let slow = |_| {
            tokio::spawn(async move {
                let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
                send(&mut stream, "/slow").await
            })
        };
        let busy: Vec<_> = (0..2).map(slow).collect();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let started = Instant::now();
        let mut newcomer = tokio::net::TcpStream::connect(addr).await.unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(5), send(&mut newcomer, "/health"))
            .await
            .unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(
            started.elapsed() >= Duration::from_millis(400),
            "it waited for a slot: {:?}",
            started.elapsed()
        );
        for slow in busy {
            let slow = slow.await.unwrap();
            assert!(
                slow.starts_with("HTTP/1.1 200") && slow.ends_with("done"),
                "{slow}"
            );
        }
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }

    #[test]
    fn the_cap_stays_under_the_file_limit() {
        assert_eq!(cap_under_limit(1024, 1_048_576, 16), 1024);
        assert_eq!(cap_under_limit(1024, 256, 16), 256 - 64 - 16);
        assert_eq!(cap_under_limit(1024, 10, 16), 1);
    }
}
