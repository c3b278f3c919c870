//! Build script of `berth-api` and `berth-worker` (their Cargo.toml names it): sets `BERTH_VERSION`, the line
//! `--version` prints. Release builds add the git commit (`git rev-parse`, else `BERTH_GIT_COMMIT` for a build
//! without a checkout, such as a container build); debug builds leave it out, so a commit rebuilds nothing.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=../broker/version_build.rs");
    println!("cargo:rerun-if-env-changed=BERTH_GIT_COMMIT");
    let version = std::env::var("CARGO_PKG_VERSION").expect("cargo sets CARGO_PKG_VERSION");
    let release = std::env::var("PROFILE").is_ok_and(|p| p == "release");
    let line = match release.then(commit).flatten() {
        Some(commit) => format!("{version} (commit {commit})"),
        None => version,
    };
    println!("cargo:rustc-env=BERTH_VERSION={line}");
}

fn commit() -> Option<String> {
    if let Ok(commit) = std::env::var("BERTH_GIT_COMMIT")
        && !commit.trim().is_empty()
    {
        return Some(commit.trim().to_string());
    }
    let head = git(&["rev-parse", "--short=12", "HEAD"])?;
    // Build again when HEAD moves: HEAD itself, the branch it points at, and packed refs.
    let mut watched = vec![git(&["rev-parse", "--git-path", "HEAD"])];
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watched.push(git(&["rev-parse", "--git-path", &branch]));
    }
    watched.push(git(&["rev-parse", "--git-path", "packed-refs"]));
    for path in watched.into_iter().flatten() {
        if std::path::Path::new(&path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    Some(head)
}

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && !text.is_empty()).then_some(text)
}
