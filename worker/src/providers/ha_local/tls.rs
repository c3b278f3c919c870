//! A certificate authority per cluster and a server certificate it signs (EC P-256, openssl CLI), once. Members
//! verify each other with it (replication and pg_rewind connect with `sslmode=verify-ca`), and apps may too:
//! bindings carry the CA certificate.

use std::path::Path;

use anyhow::Context as _;
use tokio::process::Command;

/// Makes `dir/{ca.crt,ca.key,server.crt,server.key}` unless they exist. `dir` must exist.
pub async fn ensure(dir: &Path, common_name: &str) -> anyhow::Result<()> {
    if ["ca.crt", "server.crt", "server.key"]
        .iter()
        .all(|f| dir.join(f).exists())
    {
        return Ok(());
    }
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    openssl(
        dir,
        &[
            &["req", "-x509"][..],
            &ec,
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
    openssl(
        dir,
        &[
            &["req"][..],
            &ec,
            &[
                "-keyout",
                "server.key.tmp",
                "-out",
                "server.csr",
                "-subj",
                "/CN=127.0.0.1",
            ],
        ]
        .concat(),
    )
    .await?;
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )?;
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "3650",
            "-out",
            "server.crt.tmp",
            "-extfile",
            "server.ext",
        ],
    )
    .await?;
    for f in ["server.csr", "server.ext", "ca.srl"] {
        let _ = std::fs::remove_file(dir.join(f));
    }
    set_private(&dir.join("ca.key"))?;
    set_private(&dir.join("server.key.tmp"))?;
    std::fs::rename(dir.join("server.key.tmp"), dir.join("server.key"))?;
    std::fs::rename(dir.join("server.crt.tmp"), dir.join("server.crt"))?;
    Ok(())
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
