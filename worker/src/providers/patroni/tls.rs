//! A certificate authority per cluster and a server certificate it signs (EC P-256, openssl CLI), once. Members
//! verify each other with it (replication and pg_rewind connect with `sslmode=verify-ca`), and apps may too:
//! bindings carry the CA certificate.

use std::path::Path;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use tokio::process::Command;

/// Makes `dir/{ca.crt,ca.key,server.crt,server.key}` unless they exist. `dir` must exist.
pub async fn ensure(dir: &Path, common_name: &str) -> anyhow::Result<()> {
    if ["ca.crt", "server.crt", "server.key"]
        .iter()
        .all(|f| dir.join(f).exists())
    {
        return Ok(());
    }
    make_ca(dir, common_name).await?;
    sign(
        dir,
        "127.0.0.1",
        &["IP:127.0.0.1".into(), "DNS:localhost".into()],
        "server",
    )
    .await
}

const EC: [&str; 5] = [
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:prime256v1",
    "-nodes",
];

/// `dir/ca.crt` and `dir/ca.key`: a CA for one cluster.
async fn make_ca(dir: &Path, common_name: &str) -> anyhow::Result<()> {
    openssl(
        dir,
        &[
            &["req", "-x509"][..],
            &EC,
            &["-keyout", "ca.key", "-out", "ca.crt", "-days", "3650"],
            &["-subj", &format!("/CN=berth cluster CA {common_name}")],
            &[
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        ]
        .concat(),
    )
    .await?;
    set_private(&dir.join("ca.key"))
}

/// `dir/<stem>.crt` and `dir/<stem>.key`, signed by the CA in `dir`, for `sans` (`IP:10.0.0.5`, `DNS:name`).
async fn sign(dir: &Path, common_name: &str, sans: &[String], stem: &str) -> anyhow::Result<()> {
    let (key_tmp, crt_tmp) = (format!("{stem}.key.tmp"), format!("{stem}.crt.tmp"));
    let (csr, ext) = (format!("{stem}.csr"), format!("{stem}.ext"));
    openssl(
        dir,
        &[
            &["req"][..],
            &EC,
            &[
                "-keyout",
                &key_tmp,
                "-out",
                &csr,
                "-subj",
                &format!("/CN={common_name}"),
            ],
        ]
        .concat(),
    )
    .await?;
    std::fs::write(
        dir.join(&ext),
        format!("subjectAltName={}\n", sans.join(",")),
    )?;
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "3650",
            "-out",
            &crt_tmp,
            "-extfile",
            &ext,
        ],
    )
    .await?;
    for f in [csr.as_str(), ext.as_str(), "ca.srl"] {
        let _ = std::fs::remove_file(dir.join(f));
    }
    set_private(&dir.join(&key_tmp))?;
    std::fs::rename(dir.join(&key_tmp), dir.join(format!("{stem}.key")))?;
    std::fs::rename(dir.join(&crt_tmp), dir.join(format!("{stem}.crt")))?;
    Ok(())
}

/// A certificate and its private key, PEM.
#[derive(Clone, Serialize, Deserialize)]
pub struct Pem {
    pub cert: String,
    pub key: String,
}

impl std::fmt::Debug for Pem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pem(<certificate and private key>)")
    }
}

/// A folder of its own under the temporary folder, removed when dropped.
struct Scratch(std::path::PathBuf);

impl Scratch {
    fn new() -> anyhow::Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        let dir = std::env::temp_dir().join(format!("berth-tls-{}", uuid::Uuid::new_v4().simple()));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A new CA for a cluster whose files live nowhere but in the returned PEM (kept sealed by the caller).
pub async fn new_ca(common_name: &str) -> anyhow::Result<Pem> {
    let dir = Scratch::new()?;
    make_ca(&dir.0, common_name).await?;
    Ok(Pem {
        cert: std::fs::read_to_string(dir.0.join("ca.crt"))?,
        key: std::fs::read_to_string(dir.0.join("ca.key"))?,
    })
}

/// A server certificate signed by `ca` for `sans` (`IP:10.0.0.5`).
pub async fn server_cert(ca: &Pem, common_name: &str, sans: &[String]) -> anyhow::Result<Pem> {
    let dir = Scratch::new()?;
    std::fs::write(dir.0.join("ca.crt"), &ca.cert)?;
    std::fs::write(dir.0.join("ca.key"), &ca.key)?;
    set_private(&dir.0.join("ca.key"))?;
    sign(&dir.0, common_name, sans, "server").await?;
    Ok(Pem {
        cert: std::fs::read_to_string(dir.0.join("server.crt"))?,
        key: std::fs::read_to_string(dir.0.join("server.key"))?,
    })
}

async fn openssl(dir: &Path, args: &[&str]) -> anyhow::Result<()> {
    let output = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .await
        .context("running openssl to make the cluster's certificates (is openssl installed?)")?;
    anyhow::ensure!(
        output.status.success(),
        "openssl {} failed: {}",
        args.first().unwrap_or(&""),
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(())
}

fn set_private(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {}", path.display()))
}
