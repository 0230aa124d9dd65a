//! Builds the eBPF programs (`mesh-ebpf`) for `bpfel-unknown-none` on the nightly toolchain, so that a plain
//! `cargo build` produces an agent with its datapath embedded. `AYA_BUILD_SKIP=1` skips it.
use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR not set")?;
    let root = std::path::Path::new(&manifest_dir)
        .parent()
        .ok_or_else(|| anyhow!("mesh-agent has no parent directory"))?
        .join("mesh-ebpf");
    let root = root
        .to_str()
        .ok_or_else(|| anyhow!("path {} is not UTF-8", root.display()))?;
    println!("cargo:rerun-if-changed={root}/src");
    println!("cargo:rerun-if-changed={root}/Cargo.toml");
    println!("cargo:rerun-if-changed={manifest_dir}/../mesh-common/src");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "mesh-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::Nightly,
    )
}
