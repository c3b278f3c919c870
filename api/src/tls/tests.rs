use super::*;

use std::process::Command;

/// A fresh folder under the system's temp dir.
fn temp_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("berth-tls-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A self-signed certificate for `localhost` and its key (PKCS#8 EC P-256), as PEM.
fn ec_pair(name: &str) -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("the openssl command (package openssl) makes the RSA and SEC1 test keys");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn files(dir: &Path, cert: &str, key: &str) -> TlsFiles {
    let files = TlsFiles {
        cert: dir.join("tls.crt"),
        key: dir.join("tls.key"),
    };
    std::fs::write(&files.cert, cert).unwrap();
    std::fs::write(&files.key, key).unwrap();
    files
}

fn leaf(certified: &CertifiedKey) -> Vec<u8> {
    certified.cert[0].to_vec()
}

fn first_der(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

#[test]
fn ec_keys_in_pkcs8_and_sec1_and_rsa_keys_in_pkcs8_and_pkcs1_load() {
    let dir = temp_dir();
    let (cert, key) = ec_pair("ec");
    assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"));
    let loaded = files(&dir, &cert, &key).load().unwrap();
    assert_eq!(leaf(&loaded), first_der(&cert));

    std::fs::write(dir.join("pkcs8.key"), &key).unwrap();
    openssl(&dir, &["ec", "-in", "pkcs8.key", "-out", "sec1.key"]);
    let sec1 = std::fs::read_to_string(dir.join("sec1.key")).unwrap();
    assert!(
        sec1.starts_with("-----BEGIN EC PRIVATE KEY-----"),
        "{sec1:.40}"
    );
    files(&dir, &cert, &sec1).load().unwrap();

    openssl(
        &dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "rsa8.key",
            "-out",
            "rsa.crt",
            "-subj",
            "/CN=localhost",
            "-days",
            "2",
        ],
    );
    openssl(
        &dir,
        &["rsa", "-in", "rsa8.key", "-traditional", "-out", "rsa1.key"],
    );
    let rsa_cert = std::fs::read_to_string(dir.join("rsa.crt")).unwrap();
    for (name, header) in [
        ("rsa8.key", "-----BEGIN PRIVATE KEY-----"),
        ("rsa1.key", "-----BEGIN RSA PRIVATE KEY-----"),
    ] {
        let rsa_key = std::fs::read_to_string(dir.join(name)).unwrap();
        assert!(rsa_key.starts_with(header), "{name}: {rsa_key:.40}");
        let loaded = files(&dir, &rsa_cert, &rsa_key).load().unwrap();
        assert_eq!(leaf(&loaded), first_der(&rsa_cert), "{name}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// A CA and a certificate for `localhost` it signed: (CA PEM, chain PEM leaf first, leaf key PEM, leaf DER).
fn ca_and_leaf() -> (String, String, String, Vec<u8>) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf_cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &ca)
        .unwrap();
    let chain = format!("{}{}", leaf_cert.pem(), ca.pem());
    (
        ca.pem(),
        chain,
        leaf_key.serialize_pem(),
        leaf_cert.der().to_vec(),
    )
}

#[test]
fn a_chain_loads_leaf_first() {
    let dir = temp_dir();
    let (_, chain, key, leaf_der) = ca_and_leaf();
    let loaded = files(&dir, &chain, &key).load().unwrap();
    assert_eq!(loaded.cert.len(), 2);
    assert_eq!(leaf(&loaded), leaf_der);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_key_of_another_certificate_is_refused_naming_both_files() {
    let dir = temp_dir();
    let (cert, _) = ec_pair("one");
    let (_, other_key) = ec_pair("two");
    let error = format!("{:#}", files(&dir, &cert, &other_key).load().unwrap_err());
    assert!(
        error.contains("TLS_KEY_FILE")
            && error.contains("does not belong")
            && error.contains("TLS_CERT_FILE"),
        "{error}"
    );
    assert!(
        error.contains(&dir.join("tls.key").display().to_string()),
        "{error}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn unreadable_cut_short_or_wrong_files_are_errors_naming_the_file_and_never_the_key() {
    let dir = temp_dir();
    let (cert, key) = ec_pair("one");
    let key_body = key.lines().nth(1).unwrap().to_string();
    let cert_path = dir.join("tls.crt").display().to_string();
    let key_path = dir.join("tls.key").display().to_string();

    let missing = TlsFiles {
        cert: dir.join("absent.crt"),
        key: dir.join("tls.key"),
    };
    let error = format!("{:#}", missing.load().unwrap_err());
    assert!(
        error.contains("TLS_CERT_FILE") && error.contains("absent.crt"),
        "{error}"
    );

    let cases = [
        // Half written: cut inside the leaf, or inside the second certificate's BEGIN line.
        (
            &cert[..cert.len() / 2],
            key.as_str(),
            "TLS_CERT_FILE",
            &cert_path,
            "cut short?",
        ),
        (
            &format!("{cert}{}", &cert[..15]),
            key.as_str(),
            "TLS_CERT_FILE",
            &cert_path,
            "cut short?",
        ),
        (
            "not a certificate\n",
            key.as_str(),
            "TLS_CERT_FILE",
            &cert_path,
            "no CERTIFICATE",
        ),
        (
            cert.as_str(),
            &key[..key.len() / 2],
            "TLS_KEY_FILE",
            &key_path,
            "cut short?",
        ),
        // A certificate where the key should be.
        (
            cert.as_str(),
            cert.as_str(),
            "TLS_KEY_FILE",
            &key_path,
            "none found",
        ),
    ];
    for (cert_pem, key_pem, setting, path, why) in cases {
        let error = format!("{:#}", files(&dir, cert_pem, key_pem).load().unwrap_err());
        assert!(
            error.contains(setting) && error.contains(path.as_str()) && error.contains(why),
            "{error}"
        );
        assert!(
            !error.contains(&key_body),
            "the error shows key material: {error}"
        );
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn the_cert_and_key_settings_go_together() {
    let settings =
        |value: serde_json::Value| -> Settings { serde_json::from_value(value).unwrap() };
    let neither = settings(serde_json::json!({}));
    assert!(TlsFiles::from_settings(&neither).unwrap().is_none());
    assert_eq!(neither.tls_reload_secs, 10);
    for alone in [
        serde_json::json!({ "tls_cert_file": "/etc/berth/tls.crt" }),
        serde_json::json!({ "tls_key_file": "/etc/berth/tls.key" }),
    ] {
        let error = TlsFiles::from_settings(&settings(alone))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("TLS_CERT_FILE") && error.contains("TLS_KEY_FILE"),
            "{error}"
        );
    }
    let both = settings(serde_json::json!({ "tls_cert_file": "/a.crt", "tls_key_file": "/a.key" }));
    let files = TlsFiles::from_settings(&both).unwrap().unwrap();
    assert_eq!(
        (files.cert, files.key),
        (PathBuf::from("/a.crt"), PathBuf::from("/a.key"))
    );
}

/// Waits up to 5 s for `cert` to serve `expected` as its leaf.
async fn serves(cert: &ReloadingCert, expected: &[u8]) -> bool {
    for _ in 0..100 {
        if leaf(&cert.current()) == expected {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test]
async fn a_changed_pair_is_swapped_in_and_a_broken_one_keeps_the_old_one() {
    let dir = temp_dir();
    let (cert_one, key_one) = ec_pair("one");
    let files = files(&dir, &cert_one, &key_one);
    let contents = files.read().unwrap();
    let cert = Arc::new(ReloadingCert::new(contents.certified_key(&files).unwrap()));
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(reload_loop(
        files.clone(),
        cert.clone(),
        contents.digest(),
        Duration::from_millis(50),
        shutdown.clone(),
    ));

    // The new certificate is written before its key: the old pair stays until the key follows.
    let (cert_two, key_two) = ec_pair("two");
    std::fs::write(&files.cert, &cert_two).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(leaf(&cert.current()), first_der(&cert_one));
    std::fs::write(&files.key, &key_two).unwrap();
    assert!(serves(&cert, &first_der(&cert_two)).await);

    // A file cut short keeps the pair in use; completing it swaps.
    let (cert_three, key_three) = ec_pair("three");
    std::fs::write(&files.key, &key_three).unwrap();
    std::fs::write(&files.cert, &cert_three[..cert_three.len() / 2]).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(leaf(&cert.current()), first_der(&cert_two));
    std::fs::write(&files.cert, &cert_three).unwrap();
    assert!(serves(&cert, &first_der(&cert_three)).await);

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the reload task ends on shutdown")
        .unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}

/// Serves `/health` over TLS with `limits`; the port and the CA to trust.
async fn tls_server(
    limits: crate::server::ConnectionLimits,
    shutdown: CancellationToken,
) -> (SocketAddr, String) {
    let dir = temp_dir();
    let (ca, chain, key, _) = ca_and_leaf();
    let cert = ReloadingCert::new(files(&dir, &chain, &key).load().unwrap());
    std::fs::remove_dir_all(dir).unwrap();
    let router = axum::Router::new().route("/health", axum::routing::get(|| async { "ok" }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let tls = acceptor(Arc::new(cert)).unwrap();
    tokio::spawn(crate::server::serve_with_tls(
        listener,
        router,
        limits,
        Some(tls),
        shutdown,
    ));
    (addr, ca)
}

/// A TLS connection trusting `ca`, then `GET /health`; the answer's first line.
async fn get_health(addr: SocketAddr, ca: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.as_bytes()).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut stream = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap();
    stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 1024];
    let n = stream.read(&mut buf).await.unwrap();
    String::from_utf8_lossy(&buf[..n])
        .lines()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Whether the server closes `stream` within `within`.
async fn closed_within(stream: &mut tokio::net::TcpStream, within: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut byte = [0u8; 1];
    matches!(
        tokio::time::timeout(within, stream.read(&mut byte)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

#[tokio::test]
async fn a_silent_handshake_is_closed_after_the_header_timeout_and_at_the_cap_by_a_newcomer() {
    let shutdown = CancellationToken::new();
    let limits = crate::server::ConnectionLimits {
        header_read_timeout: Duration::from_secs(1),
        max_connections: 8,
    };
    let (addr, ca) = tls_server(limits, shutdown.clone()).await;
    assert_eq!(get_health(addr, &ca).await, "HTTP/1.1 200 OK");
    let started = std::time::Instant::now();
    let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    assert!(closed_within(&mut silent, Duration::from_secs(5)).await);
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );

    // One slot and a timeout far beyond the test: only the newcomer can close the silent one.
    let limits = crate::server::ConnectionLimits {
        header_read_timeout: Duration::from_secs(60),
        max_connections: 1,
    };
    let (addr, ca) = tls_server(limits, shutdown.clone()).await;
    let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let answer = tokio::time::timeout(Duration::from_secs(5), get_health(addr, &ca))
        .await
        .expect("the newcomer is served");
    assert_eq!(answer, "HTTP/1.1 200 OK");
    assert!(closed_within(&mut silent, Duration::from_secs(1)).await);
    shutdown.cancel();
}
