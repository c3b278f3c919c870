//! Slow clients cannot take the API down: under a 256-file limit, hundreds of connections that send nothing
//! or stall halfway through a request are closed (the oldest idle ones as new clients arrive at the connection
//! cap, the rest after the header-read timeout), and `/health` and `/v2/catalog` keep answering meanwhile,
//! without waiting for that timeout.

use std::{
    process::Stdio,
    time::{Duration, Instant},
};

use berth_tests::{Stack, free_port};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Reads until the server closes `stream` (EOF or reset), or fails at `deadline`.
async fn closed_by_server(stream: &mut TcpStream, deadline: Instant) -> bool {
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout_at(deadline.into(), stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

/// `text` without ANSI color sequences (ESC `[` … `m`).
fn without_colors(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_escape = false;
    for c in text.chars() {
        match (in_escape, c) {
            (false, '\u{1b}') => in_escape = true,
            (false, c) => out.push(c),
            (true, 'm') => in_escape = false,
            (true, _) => {}
        }
    }
    out
}

#[tokio::test]
async fn idle_and_half_sent_connections_are_closed_and_the_api_keeps_answering_under_a_low_file_limit()
 {
    let stack = Stack::start().await.unwrap();
    let port = free_port().unwrap();
    let log = stack.dir.join("api-limited.log");
    let mut cmd = stack.command_under(
        &["prlimit", "--nofile=256:256", "--"],
        "berth-api",
        &[
            ("PORT", port.to_string()),
            (
                "HTTP_HEADER_READ_TIMEOUT_SECS",
                HEADER_READ_TIMEOUT.as_secs().to_string(),
            ),
        ],
    );
    cmd.stdout(Stdio::from(std::fs::File::create(&log).unwrap()))
        .stderr(Stdio::from(
            std::fs::OpenOptions::new().append(true).open(&log).unwrap(),
        ));
    let mut api = tokio::process::Command::from(cmd)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    // A new connection for every request, as a platform's first call would make.
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !http
        .get(format!("{base}/health"))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
    {
        assert!(
            Instant::now() < deadline,
            "the limited API did not start:\n{}",
            std::fs::read_to_string(&log).unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let addr = format!("127.0.0.1:{port}");
    let opened = Instant::now();
    let mut slow = Vec::new();
    // 300 that never send a byte.
    for _ in 0..300 {
        slow.push(TcpStream::connect(&addr).await.unwrap());
    }
    // 30 with half a request line, 30 stalled in their headers.
    for _ in 0..30 {
        let mut stream = TcpStream::connect(&addr).await.unwrap();
        stream.write_all(b"GET /v2/cata").await.unwrap();
        slow.push(stream);
    }
    for _ in 0..30 {
        let mut stream = TcpStream::connect(&addr).await.unwrap();
        stream
            .write_all(b"GET /health HTTP/1.1\r\nHost: berth\r\nX-Slow: ")
            .await
            .unwrap();
        slow.push(stream);
    }
    // One keep-alive connection, idle after a complete request and its answer.
    let mut kept = TcpStream::connect(&addr).await.unwrap();
    kept.write_all(b"GET /health HTTP/1.1\r\nHost: berth\r\n\r\n")
        .await
        .unwrap();
    let mut answer = [0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(30), kept.read(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&answer[..n]).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer[..n])
    );
    slow.push(kept);
    eprintln!(
        "a keep-alive request behind {} slow connections answered after {:?}",
        slow.len() - 1,
        opened.elapsed()
    );

    // The API keeps answering at once: at the cap (256 files less the pool and a reserve: 176 connections) a
    // new client closes the oldest idle connection instead of queueing behind it.
    let bound = Duration::from_secs(2);
    assert!(
        opened.elapsed() < HEADER_READ_TIMEOUT,
        "the keep-alive request took {:?}",
        opened.elapsed()
    );
    for round in 0..3 {
        let started = Instant::now();
        let health = http.get(format!("{base}/health")).send().await.unwrap();
        assert_eq!(health.status(), 200, "round {round}");
        let catalog = http
            .get(format!("{base}/v2/catalog"))
            .basic_auth(&stack.username, Some(&stack.password))
            .header("X-Broker-API-Version", "2.17")
            .send()
            .await
            .unwrap();
        assert_eq!(catalog.status(), 200, "round {round}");
        let took = started.elapsed();
        assert!(
            took < bound,
            "round {round}: /health and /v2/catalog took {took:?} (bound {bound:?})"
        );
        eprintln!("round {round}: /health and /v2/catalog answered in {took:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Every slow connection is closed by the server.
    let close_deadline = opened + HEADER_READ_TIMEOUT + Duration::from_secs(5);
    let mut open_left = 0;
    for stream in &mut slow {
        if !closed_by_server(stream, close_deadline).await {
            open_left += 1;
        }
    }
    assert_eq!(
        open_left,
        0,
        "{open_left} of {} slow connections still open after {:?}",
        slow.len(),
        opened.elapsed()
    );
    let closed_after = opened.elapsed();

    // And the API still answers at once.
    let started = Instant::now();
    assert_eq!(
        http.get(format!("{base}/health"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    eprintln!(
        "{} slow connections closed {closed_after:?} after they opened",
        slow.len()
    );
    let said = without_colors(&std::fs::read_to_string(&log).unwrap());
    assert!(
        said.contains("max_connections=176"),
        "the cap under 256 files: {said}"
    );
    api.kill().await.unwrap();
    stack.stop().await;
}
