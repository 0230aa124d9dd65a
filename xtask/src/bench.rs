//! `cargo xtask bench` (stub, to be replaced).
use clap::Args;

/// Arguments of `cargo xtask bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {}

#[expect(
    clippy::needless_pass_by_value,
    reason = "stub; the real implementation consumes its arguments"
)]
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let _ = args;
    anyhow::bail!("not implemented yet")
}
