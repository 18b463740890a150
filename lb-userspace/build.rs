//! Builds the eBPF object (crate `lb-ebpf`) with the nightly toolchain and bpf-linker, so a
//! plain `cargo build` produces an agent with its programs embedded. `cargo xtask setup`
//! installs what this needs; `AYA_BUILD_SKIP=1` skips it for quick checks and the fuzz
//! targets (`fuzz/`), leaving an empty object: such an agent cannot load its programs.
use anyhow::{Context as _, bail};

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-changed=../lb-common/src");
    let skipping = std::env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v == "true");
    if !skipping && !on_path("bpf-linker") {
        bail!(
            "bpf-linker is not installed: the eBPF programs cannot be built. \
             Run `cargo xtask setup` (it installs LLVM 22, rust-src for nightly and bpf-linker)."
        );
    }
    if skipping {
        let out_dir = std::env::var("OUT_DIR").context("OUT_DIR")?;
        let object = std::path::Path::new(&out_dir).join("lb-ebpf");
        if !object.exists() {
            std::fs::write(&object, b"").context("writing the empty eBPF object")?;
        }
    }
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let ebpf_dir = format!("{manifest_dir}/../lb-ebpf");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "lb-ebpf",
            root_dir: &ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
    .context("building the eBPF programs (crate lb-ebpf)")
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}
