//! `cargo xtask test`: setup, then fmt, clippy and the tests of the whole workspace, stopping at the first
//! failure.
use std::process::Command;
use std::time::Instant;

use anyhow::{Context as _, Result, bail};
use clap::Args;

use crate::setup::{self, SetupArgs};
use crate::util;

/// Arguments of `cargo xtask test`.
#[derive(Args, Debug)]
pub struct TestArgs {
    /// Skip `cargo fmt --check` and `cargo clippy`.
    #[arg(long)]
    pub no_lint: bool,
    /// Skip `cargo xtask setup` (assume the machine is ready).
    #[arg(long)]
    pub no_setup: bool,
    /// Arguments passed to the test binaries (`cargo test ... -- <ARGS>`), e.g. `--nocapture` or a filter.
    #[arg(last = true, value_name = "ARGS")]
    pub test_args: Vec<String>,
}

struct Step {
    name: &'static str,
    cmd: Command,
}

impl Step {
    fn cargo(name: &'static str, args: &[&str]) -> Self {
        let mut cmd = util::cargo();
        cmd.args(args);
        Self { name, cmd }
    }
}

pub fn run(args: TestArgs) -> Result<()> {
    let TestArgs {
        no_lint,
        no_setup,
        test_args,
    } = args;
    if !util::is_root() {
        bail!(
            "`cargo xtask test` needs root: the tests create network namespaces, veth pairs and load eBPF \
             programs (run it as root, e.g. `sudo -E cargo xtask test`)"
        );
    }
    let start = Instant::now();
    if !no_setup {
        let step_start = Instant::now();
        println!("==> test: setup");
        setup::run(&SetupArgs::default()).context("test step `setup` failed")?;
        println!("==> test: setup ok ({})", secs(step_start));
    }

    let mut steps = Vec::new();
    if !no_lint {
        steps.push(Step::cargo("fmt", &["fmt", "--all", "--check"]));
        steps.push(Step::cargo(
            "clippy",
            &["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"],
        ));
    }
    // The lab tests run the daemons and the xtask binary as processes: build every binary first.
    steps.push(Step::cargo(
        "build (binaries for the lab tests)",
        &["build", "--workspace", "--bins"],
    ));
    // `--workspace` includes mesh-ebpf (not a default member: it builds for bpfel on nightly through
    // mesh-agent's build.rs), whose packet logic is plain Rust that tests on the host.
    let mut workspace = Step::cargo("test (workspace)", &["test", "--workspace"]);
    if !test_args.is_empty() {
        workspace.cmd.arg("--").args(&test_args);
    }
    steps.push(workspace);

    for mut step in steps {
        let step_start = Instant::now();
        let line = util::cmdline(&step.cmd);
        println!("==> test: {} ({line})", step.name);
        let status = step
            .cmd
            .status()
            .with_context(|| format!("test step `{}`: failed to start `{line}`", step.name))?;
        if !status.success() {
            bail!(
                "test step `{}` failed after {} ({status}): `{line}`",
                step.name,
                secs(step_start)
            );
        }
        println!("==> test: {} ok ({})", step.name, secs(step_start));
    }
    println!("==> test: all steps passed ({})", secs(start));
    Ok(())
}

fn secs(since: Instant) -> String {
    format!("{:.1}s", since.elapsed().as_secs_f64())
}
