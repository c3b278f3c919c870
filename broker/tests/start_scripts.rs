//! The start scripts a newcomer runs first: they parse (a quote in an error message once broke
//! start-background.sh for every run), and start.sh says what its first, long build is before it starts it.

use std::{path::Path, process::Command};

fn script(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(name)
}

#[test]
fn the_start_scripts_parse() {
    for name in ["start.sh", "start-background.sh"] {
        let out = Command::new("bash")
            .arg("-n")
            .arg(script(name))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn start_sh_tells_how_long_the_first_build_takes_before_building() {
    let text = std::fs::read_to_string(script("start.sh")).unwrap();
    let said = text
        .find("about 15 minutes")
        .expect("start.sh names the cold build's time");
    let build = text.find("cargo build").expect("start.sh builds");
    assert!(said < build, "the message comes before the first build");
}
