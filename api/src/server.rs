//! The HTTP server: an accept loop of berth's own around hyper's HTTP/1 connection, so that no client can
//! hold the API's resources. A connection must send each request's head within the header-read timeout
//! (hyper starts that timer when a connection opens and again when it goes idle after a response, so it also
//! closes idle keep-alive connections); at most `max_connections` are open at once (the rest wait in the
//! kernel's backlog), and that cap is kept below the process's open-file limit.

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use axum::{Router, extract::ConnectInfo};
use hyper::{Request, body::Incoming, server::conn::http1};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::GracefulShutdown,
};
use tokio::{net::TcpListener, sync::Semaphore};
use tokio_util::sync::CancellationToken;
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

/// Serves `router` on `listener` until `shutdown`, then lets requests in flight finish (idle connections are
/// closed at once). Each request carries `ConnectInfo<SocketAddr>` (the peer's address) in its extensions.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let mut builder = http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
    loop {
        // A slot first, then accept: at the cap, new connections wait in the kernel's backlog.
        let permit = tokio::select! {
            () = shutdown.cancelled() => break,
            permit = permits.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
        };
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of files or a connection reset before accept: wait a little rather than spin.
                    tracing::warn!(error = %e, "accepting a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
            request.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
            let router = router.clone();
            async move { Ok::<_, Infallible>(router.oneshot(request).await.unwrap_or_else(|e| match e {})) }
        });
        let connection = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%peer, error = %e, "connection closed");
            }
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn send(stream: &mut tokio::net::TcpStream, path: &str) -> String {
        stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: berth\r\n\r\n").as_bytes()).await.unwrap();
        let mut buf = vec![0u8; 1024];
        let n = stream.read(&mut buf).await.unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[tokio::test]
    async fn shutdown_lets_a_request_in_flight_finish_and_requests_carry_the_peer_address() {
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
                axum::routing::get(|ConnectInfo(peer): ConnectInfo<SocketAddr>| async move { peer.to_string() }),
            );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let limits = ConnectionLimits { header_read_timeout: Duration::from_secs(5), max_connections: 8 };
        let server = tokio::spawn(serve(listener, router, limits, shutdown.clone()));

        let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let answer = send(&mut client, "/peer").await;
        assert!(answer.ends_with(&client.local_addr().unwrap().to_string()), "{answer}");

        let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut busy = tokio::net::TcpStream::connect(addr).await.unwrap();
        let slow = tokio::spawn(async move { send(&mut busy, "/slow").await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        shutdown.cancel();
        let answer = slow.await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("done"), "{answer}");
        tokio::time::timeout(Duration::from_secs(5), server).await.expect("serve returns").unwrap().unwrap();
        // The idle connection was closed, not left waiting for its header-read timeout.
        let mut buf = [0u8; 16];
        assert!(matches!(idle.read(&mut buf).await, Ok(0) | Err(_)));
        assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "the listener is closed");
    }

    #[test]
    fn the_cap_stays_under_the_file_limit() {
        assert_eq!(cap_under_limit(1024, 1_048_576, 16), 1024);
        assert_eq!(cap_under_limit(1024, 256, 16), 256 - 64 - 16);
        assert_eq!(cap_under_limit(1024, 10, 16), 1);
    }
}
