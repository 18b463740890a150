//! Where the binaries of this package (`lb-probe`, `lb-bench`) are, for tests of other
//! packages: Cargo's `CARGO_BIN_EXE_<name>` only names binaries of the test's own package.

use std::path::{Path, PathBuf};

/// The path of binary `name` of the workspace (e.g. `lb-probe`), in the same target profile
/// directory as the running executable: a test runs as `target/<profile>/deps/<test>-<hash>`,
/// the binaries are `target/<profile>/<name>`.
///
/// Panics, saying how to build it, when it is not there: `cargo test -p <other package>` does
/// not build this package's binaries (`cargo build -p lb-testkit --bins` does, and
/// `cargo xtask test` builds every target first).
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe()
        .unwrap_or_else(|e| panic!("cannot find the running executable to locate {name}: {e}"));
    let path = profile_dir(&exe).join(name);
    if !path.is_file() {
        panic!(
            "{name} is not built: no {} (build it with `cargo build -p lb-testkit --bins`, with \
             the same profile and CARGO_TARGET_DIR as the tests, or run `cargo xtask test`)",
            path.display()
        );
    }
    path
}

/// The target profile directory of `exe`: its directory, or the parent of that when it is
/// `deps` (test executables).
fn profile_dir(exe: &Path) -> &Path {
    let dir = exe.parent().unwrap_or(Path::new("."));
    match dir.file_name() {
        Some(last) if last == "deps" => dir.parent().unwrap_or(dir),
        _ => dir,
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::{bin_path, profile_dir};

    #[test]
    fn test_executables_find_binaries_one_level_up() {
        assert_eq!(
            profile_dir(Path::new("/w/target/debug/deps/socket_lb-0123abcd")),
            Path::new("/w/target/debug")
        );
        assert_eq!(
            profile_dir(Path::new("/w/target/release/xtask")),
            Path::new("/w/target/release")
        );
    }

    #[test]
    fn a_missing_binary_says_how_to_build_it() {
        let panic = std::panic::catch_unwind(|| bin_path("lb-no-such-binary")).unwrap_err();
        let message = panic.downcast_ref::<String>().unwrap();
        assert!(
            message.contains("cargo build -p lb-testkit --bins"),
            "{message}"
        );
    }
}
