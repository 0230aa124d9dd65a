//! `cargo xtask`: fleetmesh's developer tasks.
//!
//! This crate must not depend on any product crate of the workspace: `cargo xtask setup` has to build and
//! run on a fresh machine before their system dependencies (protoc, bpf-linker, etcd, ...) are installed.
use clap::{Parser, Subcommand};

mod bench;
mod bench_dns;
mod bench_encryption;
mod bench_fleet;
mod bench_hub;
mod bench_policy;
mod demo;
mod echo;
mod lab;
mod scale;
mod setup;
mod test;
mod util;

/// fleetmesh developer tasks. Run as `cargo xtask <command>`.
#[derive(Parser, Debug)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    version,
    propagate_version = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Install what this machine lacks to build and test fleetmesh (idempotent).
    ///
    /// Nightly rust-src, bpf-linker linked against nightly rustc's own libLLVM, and the Debian packages
    /// etcd-server, etcd-client, protobuf-compiler, iproute2, util-linux, iputils-ping, procps, iperf3 and
    /// sockperf; then checks the kernel features the datapath needs (bpffs, vxlan external, veth, netns).
    /// Takes seconds when everything is already present.
    Setup(setup::SetupArgs),
    /// Run setup, then fmt, clippy and the workspace tests (needs root: tests create network namespaces).
    ///
    /// Steps: `cargo fmt --all --check`, `cargo clippy --workspace --all-targets -- -D warnings`,
    /// `cargo build --workspace --bins` (the lab tests run the daemons), `cargo test --workspace` (including
    /// mesh-ebpf's host-testable packet logic). Stops at the first failing step. Arguments after `--` go to the test binaries, e.g. `cargo xtask test -- --nocapture`.
    Test(test::TestArgs),
    /// The lab's echo workload, run inside a pod's network namespace.
    ///
    /// Listens on 0.0.0.0 on each --tcp and --udp port; every TCP connection receives the line
    /// `<cluster>/<namespace>/<pod>` and is closed, every UDP datagram is answered with that line.
    /// Exits cleanly on SIGTERM/SIGINT.
    Echo(echo::EchoArgs),
    /// Local multi-cluster lab built from network namespaces.
    Lab(lab::LabArgs),
    /// Scripted end-to-end demonstration on the lab.
    Demo(demo::DemoArgs),
    /// Datapath benchmarks on the lab.
    Bench(bench::BenchArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Setup(args) => setup::run(&args),
        Command::Test(args) => test::run(args),
        Command::Echo(args) => echo::run(args),
        Command::Lab(args) => lab::run(args),
        Command::Demo(args) => demo::run(&args),
        Command::Bench(args) => bench::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    #[test]
    fn cli_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
