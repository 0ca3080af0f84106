//! Builds the eBPF programs (ebpf/programs) with nightly and bpf-linker, and
//! leaves the object in OUT_DIR for `include_bytes_aligned!`. Set
//! `AYA_BUILD_SKIP=1` for lint-only runs that need no eBPF object.
use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let meta = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let root = std::path::Path::new(&meta)
        .parent()
        .ok_or_else(|| anyhow!("agent/ has no parent"))?
        .join("ebpf/programs");
    let root = root.to_str().ok_or_else(|| anyhow!("non-UTF-8 path"))?;
    // The common crate is read by the eBPF build too: rebuild on its edits.
    println!("cargo:rerun-if-changed={}/../common/src", root);
    // With AYA_BUILD_SKIP, aya-build writes nothing; leave an empty object so
    // the crate still compiles (the agent refuses to run with it).
    if std::env::var_os("AYA_BUILD_SKIP").is_some() {
        let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("smtpgate-ebpf");
        if !out.exists() {
            std::fs::write(out, b"")?;
        }
    }
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "smtpgate-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
