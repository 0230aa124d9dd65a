//! `cargo xtask demo` (stub, to be replaced).
use clap::Args;

/// Arguments of `cargo xtask demo`.
#[derive(Args, Debug)]
pub struct DemoArgs {}

#[expect(
    clippy::needless_pass_by_value,
    reason = "stub; the real implementation consumes its arguments"
)]
pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    let _ = args;
    anyhow::bail!("not implemented yet")
}
