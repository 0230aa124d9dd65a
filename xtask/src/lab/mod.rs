//! `cargo xtask lab` (stub, to be replaced).
use clap::Args;

/// Arguments of `cargo xtask lab`.
#[derive(Args, Debug)]
pub struct LabArgs {}

#[expect(
    clippy::needless_pass_by_value,
    reason = "stub; the real implementation consumes its arguments"
)]
pub fn run(args: LabArgs) -> anyhow::Result<()> {
    let _ = args;
    anyhow::bail!("not implemented yet")
}
