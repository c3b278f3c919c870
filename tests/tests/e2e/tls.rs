//! TLS on the API: the real `berth-api` with `TLS_CERT_FILE`/`TLS_KEY_FILE` answers a TLS client that
//! trusts only the test CA, refuses plain HTTP on that port, bounds a silent handshake, and picks up a new
//! certificate pair written the way a Kubernetes secret volume swaps it, without a restart; a broken pair
//! keeps the old certificate serving. Also prints a TLS request's time against plain HTTP's.

use std::{
    path::Path,
    process::Stdio,
    sync::Arc,
    time::{Duration, Instant},
};

use berth_tests::{OsbClient, Stack, free_port};
use rcgen::{CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// A test certificate authority.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A server certificate (for 127.0.0.1 and localhost) and its key, as PEM.
struct Leaf {
    cert: String,
    key: String,
    der: Vec<u8>,
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Self { issuer }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    fn leaf(&self, name: &str) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            // The chain, leaf first.
            cert: format!("{}{}", cert.pem(), self.pem()),
            key: key.serialize_pem(),
            der: cert.der().to_vec(),
        }
    }
}

/// Publishes a pair the way a Kubernetes secret volume does: a new folder, then the `..data` symlink swapped
/// to it in one rename (`tls.crt` and `tls.key` point through `..data`).
fn publish(dir: &Path, version: &str, cert: &str, key: &str) {
    let folder = dir.join(version);
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::write(folder.join("tls.crt"), cert).unwrap();
    std::fs::write(folder.join("tls.key"), key).unwrap();
    let staged = dir.join("..data_tmp");
    std::os::unix::fs::symlink(version, &staged).unwrap();
    std::fs::rename(&staged, dir.join("..data")).unwrap();
    for name in ["tls.crt", "tls.key"] {
        if !dir.join(name).exists() {
            std::os::unix::fs::symlink(format!("..data/{name}"), dir.join(name)).unwrap();
        }
    }
}

fn client_config(trusted: &[&str]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for pem in trusted {
        roots
            .add(CertificateDer::from_pem_slice(pem.as_bytes()).unwrap())
            .unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

type TlsStream = tokio_rustls::client::TlsStream<TcpStream>;

/// A new TLS connection to the API; the leaf certificate it presented.
async fn connect(port: u16, trusted: &[&str]) -> anyhow::Result<(TlsStream, Vec<u8>)> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    let name = ServerName::try_from("127.0.0.1")?.to_owned();
    let stream = tokio_rustls::TlsConnector::from(client_config(trusted))
        .connect(name, tcp)
        .await?;
    let session = stream.get_ref().1;
    assert_eq!(session.alpn_protocol(), Some(&b"http/1.1"[..]));
    let leaf = session.peer_certificates().expect("a server certificate")[0].to_vec();
    Ok((stream, leaf))
}

/// `GET /health` on an open connection (kept alive); the status line.
async fn health(stream: &mut TlsStream) -> String {
    stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 2048];
    let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
        .await
        .expect("an answer")
        .unwrap();
    String::from_utf8_lossy(&buf[..n])
        .lines()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// An OSB client for `base_url` trusting only `ca` (none: plain HTTP), opening a new connection per request.
fn osb_client(stack: &Stack, base_url: String, ca: Option<&str>) -> OsbClient {
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(30));
    if let Some(ca) = ca {
        builder = builder
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(ca.as_bytes()).unwrap());
    }
    OsbClient {
        base_url,
        username: stack.username.clone(),
        password: stack.password.clone(),
        http: builder.build().unwrap(),
    }
}

#[tokio::test]
async fn the_api_serves_tls_and_reloads_a_rotated_certificate_without_a_restart() {
    let stack = Stack::start().await.unwrap();
    let tls_dir = stack.dir.join("tls");
    std::fs::create_dir_all(&tls_dir).unwrap();
    let (ca_one, ca_two) = (Ca::new("berth test CA one"), Ca::new("berth test CA two"));
    let (first, second) = (ca_one.leaf("berth one"), ca_two.leaf("berth two"));
    publish(&tls_dir, "..v1", &first.cert, &first.key);

    let port = free_port().unwrap();
    let log = stack.dir.join("api-tls.log");
    let mut cmd = stack.command(
        "berth-api",
        &[
            ("PORT", port.to_string()),
            (
                "TLS_CERT_FILE",
                tls_dir.join("tls.crt").display().to_string(),
            ),
            (
                "TLS_KEY_FILE",
                tls_dir.join("tls.key").display().to_string(),
            ),
            ("TLS_RELOAD_SECS", "1".into()),
            ("HTTP_HEADER_READ_TIMEOUT_SECS", "2".into()),
            ("RUST_LOG", "info".into()),
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
    let pid = api.id();
    let read_log = || std::fs::read_to_string(&log).unwrap();

    let (ca_one_pem, ca_two_pem) = (ca_one.pem(), ca_two.pem());
    let https = osb_client(
        &stack,
        format!("https://127.0.0.1:{port}"),
        Some(&ca_one_pem),
    );
    https
        .wait_healthy(Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", read_log()));
    assert!(
        read_log().contains(&format!("https on 127.0.0.1:{port}")),
        "{}",
        read_log()
    );
    let (status, catalog) = https
        .send(https.request(reqwest::Method::GET, "/v2/catalog"))
        .await
        .unwrap();
    assert_eq!(status, 200, "{catalog}");
    assert!(
        catalog["services"]
            .as_array()
            .is_some_and(|s| !s.is_empty()),
        "{catalog}"
    );

    // Plain HTTP on the TLS port gets no answer.
    let plain = osb_client(&stack, format!("http://127.0.0.1:{port}"), None);
    let refused = plain
        .send(plain.request(reqwest::Method::GET, "/v2/catalog"))
        .await;
    assert!(refused.is_err(), "plain HTTP was answered: {refused:?}");

    // A client that connects and never starts its handshake is closed after the header-read timeout.
    let mut silent = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut byte = [0u8; 1];
    let closed = tokio::time::timeout(Duration::from_secs(6), silent.read(&mut byte)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "a silent connection stayed open: {closed:?}"
    );

    measure(&stack, &https).await;

    let both = [ca_one_pem.as_str(), ca_two_pem.as_str()];
    assert_eq!(connect(port, &both).await.unwrap().1, first.der);

    // Broken replacements keep the first certificate: a certificate with the old key, then a cut-short one.
    publish(&tls_dir, "..v2", &second.cert, &first.key);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(connect(port, &both).await.unwrap().1, first.der);
    assert!(read_log().contains("does not belong"), "{}", read_log());
    publish(
        &tls_dir,
        "..v3",
        &second.cert[..second.cert.len() / 2],
        &second.key,
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(connect(port, &both).await.unwrap().1, first.der);
    assert!(read_log().contains("cut short?"), "{}", read_log());

    // The whole new pair: new connections get it, from the same process, while a connection opened before
    // goes on answering (a request at least every 2 s, the header-read timeout that closes idle ones).
    let (mut kept, _) = connect(port, &both).await.unwrap();
    publish(&tls_dir, "..v4", &second.cert, &second.key);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert_eq!(health(&mut kept).await, "HTTP/1.1 200 OK");
        if connect(port, &both).await.unwrap().1 == second.der {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new certificate was not served:\n{}",
            read_log()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(health(&mut kept).await, "HTTP/1.1 200 OK");
    let kept_leaf = kept.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    assert_eq!(
        kept_leaf, first.der,
        "the open connection keeps its certificate"
    );
    assert!(
        api.try_wait().unwrap().is_none(),
        "the API exited:\n{}",
        read_log()
    );
    assert_eq!(api.id(), pid);
    assert_eq!(read_log().matches("https on").count(), 1, "started once");
    let new_only = osb_client(
        &stack,
        format!("https://127.0.0.1:{port}"),
        Some(&ca_two_pem),
    );
    let (status, _) = new_only
        .send(new_only.request(reqwest::Method::GET, "/v2/catalog"))
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert!(
        connect(port, &[&ca_one_pem]).await.is_err(),
        "the old certificate is still served"
    );
    assert!(
        !read_log().contains("PRIVATE KEY"),
        "key material in the log"
    );
}

/// Median and 90th percentile of 200 requests each on a new connection, TLS against plain HTTP (the
/// stack's own API): figures for the docs, not an assertion on time.
async fn measure(stack: &Stack, https: &OsbClient) {
    let plain = osb_client(stack, stack.base_url.clone(), None);
    let mut figures = Vec::new();
    for (label, client) in [("https", https), ("http", &plain)] {
        let mut times = Vec::with_capacity(200);
        for _ in 0..200 {
            let started = Instant::now();
            let (status, _) = client
                .send(client.request(reqwest::Method::GET, "/v2/catalog"))
                .await
                .unwrap();
            times.push(started.elapsed());
            assert_eq!(status, 200);
        }
        times.sort();
        figures.push(format!(
            "{label}: median {:?}, p90 {:?}",
            times[100], times[180]
        ));
    }
    eprintln!(
        "GET /v2/catalog on a new connection, 200 each: {}",
        figures.join("; ")
    );
}

type Settings = Vec<(&'static str, String)>;

#[tokio::test]
async fn tls_settings_that_do_not_work_stop_the_api_with_an_error_naming_them() {
    let stack = Stack::start().await.unwrap();
    let dir = stack.dir.join("tls");
    std::fs::create_dir_all(&dir).unwrap();
    let ca = Ca::new("berth test CA");
    let (one, two) = (ca.leaf("one"), ca.leaf("two"));
    std::fs::write(dir.join("one.crt"), &one.cert).unwrap();
    std::fs::write(dir.join("two.key"), &two.key).unwrap();
    let path = |name: &str| dir.join(name).display().to_string();
    // The settings given, and what the error must say.
    let cases: [(Settings, &[&str]); 4] = [
        (
            vec![("TLS_CERT_FILE", path("one.crt"))],
            &["TLS_CERT_FILE", "TLS_KEY_FILE"],
        ),
        (
            vec![
                ("TLS_CERT_FILE", path("one.crt")),
                ("TLS_KEY_FILE", path("two.key")),
            ],
            &["does not belong", "two.key"],
        ),
        (
            vec![
                ("TLS_CERT_FILE", path("absent.crt")),
                ("TLS_KEY_FILE", path("two.key")),
            ],
            &["TLS_CERT_FILE", "absent.crt"],
        ),
        // Checked before the database: a bad pair is named even where no database answers.
        (
            vec![
                ("TLS_CERT_FILE", path("one.crt")),
                ("TLS_KEY_FILE", path("two.key")),
                (
                    "DATABASE_URL",
                    format!(
                        "postgres://postgres@127.0.0.1:{}/none",
                        free_port().unwrap()
                    ),
                ),
            ],
            &["does not belong", "two.key"],
        ),
    ];
    for (mut env, expected) in cases {
        env.push(("PORT", free_port().unwrap().to_string()));
        let mut cmd = tokio::process::Command::from(stack.command("berth-api", &env));
        let out = tokio::time::timeout(Duration::from_secs(60), cmd.kill_on_drop(true).output())
            .await
            .expect("berth-api exits")
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{env:?} started");
        for text in expected {
            assert!(stderr.contains(text), "{env:?}: {stderr}");
        }
    }
}
