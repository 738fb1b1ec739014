//! Shared by the test crates that run the real server (`client/tests`, `bench/tests`), included
//! with `#[path]`: building `target/<profile>/starling` on demand.

use std::path::{Path, PathBuf};
use std::process::Command;

/// `starling` beside `sibling` (a binary of the same build, e.g. `CARGO_BIN_EXE_starling-cli`),
/// built first if needed, with the same profile.
pub(crate) fn server_binary_beside(sibling: &Path) -> PathBuf {
    let dir = sibling.parent().unwrap().to_owned();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut build = Command::new(cargo);
    build.args(["build", "-p", "starling-gateway", "--bin", "starling"]);
    // Without the variables cargo set for this test, so that build scripts (ring's reads
    // CARGO_PKG_*) see the same environment as a plain build and nothing is rebuilt.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy().into_owned();
        if [
            "CARGO_PKG_",
            "CARGO_MANIFEST_",
            "CARGO_CRATE_",
            "CARGO_BIN_",
            "CARGO_PRIMARY_",
        ]
        .iter()
        .any(|p| key.starts_with(p))
        {
            build.env_remove(key);
        }
    }
    if dir.ends_with("release") {
        build.arg("--release");
    }
    let status = build.status().unwrap();
    assert!(status.success(), "building the starling server failed");
    dir.join("starling")
}
