//! meshctl: the fleetmesh command line.

mod agent;

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

/// fleetmesh's command line: inspect a node's agent, check manifests before applying them.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Show a node agent's status: remote clusters and their sync state, local endpoints, ipcache, counters.
    Status {
        /// The agent's API socket.
        #[arg(
            long,
            env = "FLEETMESH_API_SOCKET",
            default_value = "/var/run/fleetmesh/agent.sock"
        )]
        socket: PathBuf,
        /// Print the full status as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Services as a node's agent balances them.
    #[command(subcommand)]
    Service(ServiceCommand),
    /// Work with manifests (the manifests source of edge nodes and the lab).
    #[command(subcommand)]
    Manifests(ManifestsCommand),
}

#[derive(Debug, Subcommand)]
enum ServiceCommand {
    /// Every service with its frontends, its backends per cluster, its affinity, and which backends the
    /// datapath spreads new connections over (marked `*`).
    List {
        /// The agent's API socket.
        #[arg(
            long,
            env = "FLEETMESH_API_SOCKET",
            default_value = "/var/run/fleetmesh/agent.sock"
        )]
        socket: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum ManifestsCommand {
    /// Parse and check manifest files the way the agent does; prints each object, or the first error naming
    /// the file, document, object and field. Exit status 1 on any error.
    Validate {
        /// YAML files (multi-document).
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Status { socket, json } => agent::status(&socket, json),
        Command::Service(ServiceCommand::List { socket, json }) => agent::services(&socket, json),
        Command::Manifests(ManifestsCommand::Validate { files }) => validate(&files),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn validate(files: &[PathBuf]) -> anyhow::Result<()> {
    let mut parsed = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        let name = f.display().to_string();
        let objects = mesh_model::manifests::parse_str(&name, &text)?;
        parsed.push((name, objects));
    }
    mesh_model::manifests::merge(parsed.iter().map(|(n, o)| (n.as_str(), o.as_slice())))
        .map_err(anyhow::Error::msg)?;
    for (name, objects) in &parsed {
        for o in objects {
            println!("{name}: {}", o.describe());
        }
    }
    Ok(())
}
