//! TLS on the API (`TLS_CERT_FILE` + `TLS_KEY_FILE`): rustls with the ring provider, HTTP/1.1 only.
//!
//! The certificate and key are read at start (a bad file stops the process with an error naming it) and then
//! re-read every `TLS_RELOAD_SECS`. When their content changed and the new pair loads and matches, new
//! connections get it; connections already open keep theirs. A pair that does not load (a file half written,
//! a certificate written before its key) leaves the old one serving, with a warning; it is tried again at the
//! next check. Comparing content rather than timestamps also covers a Kubernetes secret volume, where a
//! symlink is swapped to a new folder.

use std::{
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::Duration,
};

use anyhow::Context;
use broker::config::Settings;
use rustls::{
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

/// The TLS side of the accept loop: completes handshakes with whichever certificate is current.
pub type Acceptor = tokio_rustls::TlsAcceptor;

/// Where the certificate chain and its key are read from.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    /// `TLS_CERT_FILE` and `TLS_KEY_FILE`: both (TLS), or neither (`None`: plain HTTP).
    pub fn from_settings(settings: &Settings) -> anyhow::Result<Option<Self>> {
        match (&settings.tls_cert_file, &settings.tls_key_file) {
            (Some(cert), Some(key)) => Ok(Some(Self {
                cert: cert.clone(),
                key: key.clone(),
            })),
            (None, None) => Ok(None),
            _ => anyhow::bail!(
                "TLS_CERT_FILE and TLS_KEY_FILE must be set together (both for HTTPS, neither for plain HTTP)"
            ),
        }
    }

    /// Reads both files and builds the pair they hold, checking that the key belongs to the leaf certificate.
    pub fn load(&self) -> anyhow::Result<CertifiedKey> {
        let contents = self.read()?;
        contents.certified_key(self)
    }

    fn read(&self) -> anyhow::Result<FileContents> {
        let read = |path: &Path, setting: &str| {
            std::fs::read(path).with_context(|| format!("{setting} {}: reading", path.display()))
        };
        Ok(FileContents {
            cert: read(&self.cert, "TLS_CERT_FILE")?,
            key: read(&self.key, "TLS_KEY_FILE")?,
        })
    }
}

/// The bytes of both files as read at one check.
struct FileContents {
    cert: Vec<u8>,
    key: Vec<u8>,
}

impl FileContents {
    /// A digest of both files, to notice a change without keeping the key's bytes around.
    fn digest(&self) -> [u8; 32] {
        let mut hash = Sha256::new();
        hash.update((self.cert.len() as u64).to_be_bytes());
        hash.update(&self.cert);
        hash.update(&self.key);
        hash.finalize().into()
    }

    fn certified_key(&self, files: &TlsFiles) -> anyhow::Result<CertifiedKey> {
        let cert_file = || format!("TLS_CERT_FILE {}", files.cert.display());
        let key_file = || format!("TLS_KEY_FILE {}", files.key.display());
        let chain = CertificateDer::pem_slice_iter(&self.cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| {
                anyhow::anyhow!(
                    "{}: not a PEM certificate chain: {}",
                    cert_file(),
                    pem_error_kind(&e)
                )
            })?;
        if chain.is_empty() {
            anyhow::bail!("{}: no CERTIFICATE in it", cert_file());
        }
        // The error names only the file and the kind of failure: never part of the key.
        let key = PrivateKeyDer::from_pem_slice(&self.key).map_err(|e| {
            anyhow::anyhow!(
                "{}: no PEM private key (PKCS#8, SEC1 EC or PKCS#1 RSA): {}",
                key_file(),
                pem_error_kind(&e)
            )
        })?;
        let signing_key = provider()
            .key_provider
            .load_private_key(key)
            .map_err(|e| anyhow::anyhow!("{}: unusable private key: {e}", key_file()))?;
        let certified = CertifiedKey::new(chain, signing_key);
        certified.keys_match().map_err(|e| {
            anyhow::anyhow!(
                "{} does not belong to the first certificate of {} ({e})",
                key_file(),
                cert_file()
            )
        })?;
        Ok(certified)
    }
}

/// The kind of a PEM error, without the bytes some variants carry.
fn pem_error_kind(error: &rustls::pki_types::pem::Error) -> &'static str {
    use rustls::pki_types::pem::Error;
    match error {
        Error::NoItemsFound => "none found",
        Error::MissingSectionEnd { .. } => "a section has no END line (file cut short?)",
        Error::IllegalSectionStart { .. } => "a BEGIN line is malformed (file cut short?)",
        Error::Base64Decode(_) => "bad base64",
        _ => "unreadable",
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Hands every handshake the current pair; the reload task swaps it.
pub struct ReloadingCert {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ReloadingCert {
    fn new(first: CertifiedKey) -> Self {
        Self {
            current: RwLock::new(Arc::new(first)),
        }
    }

    fn replace(&self, next: CertifiedKey) {
        *self.current.write().expect("certificate lock") = Arc::new(next);
    }

    fn current(&self) -> Arc<CertifiedKey> {
        self.current.read().expect("certificate lock").clone()
    }
}

impl fmt::Debug for ReloadingCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ReloadingCert")
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// Loads the TLS files once, as [`start`] will, to fail early on a bad pair.
pub fn check(settings: &Settings) -> anyhow::Result<()> {
    if let Some(files) = TlsFiles::from_settings(settings)? {
        if settings.tls_reload_secs == 0 {
            anyhow::bail!("TLS_RELOAD_SECS must be at least 1");
        }
        files.read()?.certified_key(&files)?;
    }
    Ok(())
}

/// TLS from the settings: `None` (plain HTTP) when neither file is set. Loads the pair (an error names the
/// bad file), starts the reload task (it ends with `shutdown`), and logs which mode the API serves on `local`.
pub fn start(
    settings: &Settings,
    local: SocketAddr,
    shutdown: CancellationToken,
) -> anyhow::Result<Option<Acceptor>> {
    let Some(files) = TlsFiles::from_settings(settings)? else {
        tracing::info!(%local, "plain http on {local} (no TLS_CERT_FILE/TLS_KEY_FILE)");
        return Ok(None);
    };
    if settings.tls_reload_secs == 0 {
        anyhow::bail!("TLS_RELOAD_SECS must be at least 1");
    }
    let contents = files.read()?;
    let cert = Arc::new(ReloadingCert::new(contents.certified_key(&files)?));
    let acceptor = acceptor(cert.clone())?;
    tokio::spawn(reload_loop(
        files.clone(),
        cert,
        contents.digest(),
        Duration::from_secs(settings.tls_reload_secs),
        shutdown,
    ));
    tracing::info!(%local, cert = %files.cert.display(), reload_secs = settings.tls_reload_secs, "https on {local}");
    Ok(Some(acceptor))
}

/// A server configuration answering with `cert`'s current pair, speaking HTTP/1.1 only.
pub fn acceptor(cert: Arc<ReloadingCert>) -> anyhow::Result<Acceptor> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Acceptor::from(Arc::new(config)))
}

/// Every `every`, reads both files; when they changed since the pair in use, loads the new pair and swaps it
/// in. A failure keeps the old pair and is warned about once per distinct content (it is retried each check,
/// so a pair completed later is picked up).
async fn reload_loop(
    files: TlsFiles,
    cert: Arc<ReloadingCert>,
    mut in_use: [u8; 32],
    every: Duration,
    shutdown: CancellationToken,
) {
    let mut warned: Option<[u8; 32]> = None;
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let files = files.clone();
        let checked = tokio::task::spawn_blocking(move || {
            let contents = files.read()?;
            let digest = contents.digest();
            Ok::<_, anyhow::Error>((digest, contents, files))
        })
        .await;
        let (digest, contents, files) = match checked {
            Ok(Ok(read)) => read,
            Ok(Err(e)) => {
                tracing::warn!(error = %format!("{e:#}"), "TLS files unreadable; still serving the previous certificate");
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "TLS reload check failed");
                continue;
            }
        };
        if digest == in_use {
            continue;
        }
        match contents.certified_key(&files) {
            Ok(next) => {
                cert.replace(next);
                in_use = digest;
                warned = None;
                tracing::info!(cert = %files.cert.display(), "TLS certificate reloaded; new connections use it");
            }
            Err(e) if warned != Some(digest) => {
                warned = Some(digest);
                tracing::warn!(error = %format!("{e:#}"), "new TLS files do not load; still serving the previous certificate (retrying every check)");
            }
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests;
