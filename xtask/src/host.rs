//! Facts about this machine and workspace that several commands need.

use std::path::{Path, PathBuf};

/// Whether we run as root (installing packages, loading BPF programs and making network
/// namespaces need it).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The workspace root (the parent of this crate).
pub fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().unwrap_or(manifest_dir).to_path_buf()
}

/// The cargo that runs us (`cargo xtask` sets `CARGO`), so children use the same toolchain.
pub fn cargo() -> PathBuf {
    std::env::var_os("CARGO").map_or_else(|| "cargo".into(), PathBuf::from)
}

/// Where `cargo install` puts binaries: `$CARGO_HOME/bin`, by default `~/.cargo/bin`.
pub fn cargo_bin_dir() -> Option<PathBuf> {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))?;
    Some(home.join("bin"))
}

/// The first `program` on `PATH`.
pub fn find_on_path(program: &str) -> Option<PathBuf> {
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// `PATH` with `dir` in front, unless it is already on it.
pub fn path_with(dir: &Path) -> std::ffi::OsString {
    let current = std::env::var_os("PATH").unwrap_or_default();
    if std::env::split_paths(&current).any(|p| p == dir) {
        return current;
    }
    let mut paths = vec![dir.to_path_buf()];
    paths.extend(std::env::split_paths(&current));
    std::env::join_paths(paths).unwrap_or(current)
}

/// cargo run from the workspace root for the workspace's own builds: without the package
/// variables `cargo run` gave xtask (build scripts that watch them, like ring's watching
/// CARGO_MANIFEST_DIR, would rebuild after every plain `cargo build` and back), and with
/// bpf-linker on PATH (lb-userspace's build script looks for it there) when `cargo install`
/// put it in a folder that is not.
pub fn workspace_cargo() -> std::process::Command {
    let mut cargo = std::process::Command::new(cargo());
    cargo.current_dir(workspace_root());
    for (key, _) in std::env::vars_os() {
        if is_package_variable(&key.to_string_lossy()) {
            cargo.env_remove(&key);
        }
    }
    if find_on_path("bpf-linker").is_none()
        && let Some(bin) = cargo_bin_dir().filter(|d| d.join("bpf-linker").is_file())
    {
        cargo.env("PATH", path_with(&bin));
    }
    cargo
}

/// The variables cargo sets for the package it runs (not the user's own `CARGO_*` settings).
fn is_package_variable(name: &str) -> bool {
    name.starts_with("CARGO_PKG_")
        || name.starts_with("CARGO_MANIFEST_")
        || matches!(
            name,
            "CARGO_CRATE_NAME" | "CARGO_BIN_NAME" | "CARGO_PRIMARY_PACKAGE"
        )
}
