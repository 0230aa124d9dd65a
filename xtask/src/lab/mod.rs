//! `cargo xtask lab`: clusters made of network namespaces on this machine, with real etcd,
//! clustermesh-apiservers, mesh-agents with their eBPF programs, and echo workloads in pods.
//!
//! Layout of the lab folder (default `target/lab`):
//! `state.json` (what the lab made: namespaces, processes, allocations; written before each step so that
//! `lab down` works after a crash), `logs/<role>.log` (every daemon), `clusters/<c>/manifests/` (what the
//! agents and the apiserver of cluster c read), `clusters/<c>/clustermesh/<peer>` and `<peer>.tls/` (how to reach
//! each peer's etcd, written by `meshctl clustermesh connect`), `clusters/<c>/etcd/` (etcd data),
//! `clusters/<c>/pki/` (the cluster's certificates from `meshctl clustermesh cluster-certs`: etcd is served with
//! TLS and client certificate auth; `admin.crt`/`admin.key` have etcd's root role), `pki/ca/` (the lab's mesh
//! CA), `run/` (agent sockets, workload ready files).

pub mod net;
pub mod state;
pub mod topology;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use clap::{Args, Subcommand};

use crate::util;

/// Arguments of `cargo xtask lab`.
#[derive(Args, Debug)]
pub struct LabArgs {
    /// The lab folder: state, logs, generated manifests. One lab per folder.
    #[arg(long, env = "FLEETMESH_LAB_DIR", global = true)]
    pub lab_dir: Option<PathBuf>,
    #[command(subcommand)]
    pub command: LabCommand,
}

#[derive(Subcommand, Debug)]
pub enum LabCommand {
    /// Create the lab from a topology folder and wait until the mesh has converged.
    ///
    /// DIR/lab.yaml lists the clusters (name, id, podCIDR, nodes); DIR/<cluster>/*.yaml holds Kubernetes
    /// manifests (Namespace, Pod, Service) for that cluster. Everything is validated before anything is created.
    Up {
        /// Topology folder.
        #[arg(long)]
        topology: PathBuf,
        /// Do not run `cargo build` for the daemons first (they must be built already).
        #[arg(long)]
        no_build: bool,
        /// How long to wait for convergence.
        #[arg(long, default_value_t = 90)]
        timeout_secs: u64,
    },
    /// Show clusters, nodes (underlay IPs, agent state), pods and services.
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Run a command inside a pod's network namespace: `lab exec east/default/client -- ping -c1 10.2.0.2`.
    Exec {
        /// CLUSTER/NAMESPACE/POD
        pod: String,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Add or update the objects of a manifest file in a running cluster, like `kubectl apply`: objects that
    /// exist are updated wherever they were defined, new ones are added; pods are wired and started. A pod whose
    /// node or ports change is recreated; other changes (labels, annotations) keep it running.
    Apply { cluster: String, file: PathBuf },
    /// Delete the objects named in a manifest file from a running cluster.
    Delete { cluster: String, file: PathBuf },
    /// Add one node to a running cluster and wait until every agent of the mesh can reach it.
    AddNode { cluster: String },
    /// Remove everything the lab made (also after a crash of an earlier run). Logs are kept.
    Down,
    /// Restart a daemon: `lab restart agent east-node-1`, `lab restart etcd west --kill`.
    Restart {
        daemon: state::Daemon,
        /// Node (agent) or cluster (apiserver, etcd).
        name: String,
        /// SIGKILL instead of a graceful SIGTERM.
        #[arg(long)]
        kill: bool,
    },
    /// Stop a daemon and keep it stopped (to change things while it is away): `lab stop agent east-node-1 --kill`.
    Stop {
        daemon: state::Daemon,
        /// Node (agent) or cluster (apiserver, etcd).
        name: String,
        /// SIGKILL instead of a graceful SIGTERM.
        #[arg(long)]
        kill: bool,
    },
    /// Start a daemon stopped by `lab stop`.
    Start {
        daemon: state::Daemon,
        /// Node (agent) or cluster (apiserver, etcd).
        name: String,
    },
    /// Take a cluster off the underlay: its nodes and its etcd become unreachable for the other clusters.
    Cut { cluster: String },
    /// Put a cut cluster back on the underlay.
    Restore { cluster: String },
    /// List this lab's network namespaces, one per line (also those an earlier crash left behind).
    Namespaces,
}

pub fn default_lab_dir() -> PathBuf {
    util::workspace_root().join("target").join("lab")
}

pub fn run(args: LabArgs) -> Result<()> {
    anyhow::ensure!(
        util::is_root(),
        "the lab needs root (it creates network namespaces and loads eBPF programs)"
    );
    let dir = args.lab_dir.unwrap_or_else(default_lab_dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    match args.command {
        LabCommand::Up {
            topology,
            no_build,
            timeout_secs,
        } => {
            let started = Instant::now();
            let st = state::up(&dir, &topology, !no_build, Duration::from_secs(timeout_secs))?;
            println!(
                "lab: up in {:.1}s: {} clusters, {} nodes, {} pods (lab folder {})",
                started.elapsed().as_secs_f64(),
                st.clusters.len(),
                st.clusters.iter().map(|c| c.nodes.len()).sum::<usize>(),
                st.clusters.iter().map(|c| c.pods.len()).sum::<usize>(),
                dir.display()
            );
            Ok(())
        }
        LabCommand::Status { json } => state::status(&dir, json),
        LabCommand::Exec { pod, command } => {
            let code = state::exec(&dir, &pod, &command)?;
            std::process::exit(code);
        }
        LabCommand::Apply { cluster, file } => state::apply(&dir, &cluster, &file, false),
        LabCommand::Delete { cluster, file } => state::apply(&dir, &cluster, &file, true),
        LabCommand::AddNode { cluster } => state::add_node(&dir, &cluster),
        LabCommand::Down => state::down(&dir),
        LabCommand::Restart { daemon, name, kill } => state::restart(&dir, daemon, &name, kill).map(drop),
        LabCommand::Stop { daemon, name, kill } => state::stop(&dir, daemon, &name, kill),
        LabCommand::Start { daemon, name } => state::start(&dir, daemon, &name),
        LabCommand::Cut { cluster } => state::cut(&dir, &cluster, true),
        LabCommand::Restore { cluster } => state::cut(&dir, &cluster, false),
        LabCommand::Namespaces => {
            for n in state::namespaces(&dir) {
                println!("{n}");
            }
            Ok(())
        }
    }
}

/// Whether labs started by this process run the release-built daemons (`target/release`) instead of the debug
/// ones: the benches that time the daemons themselves (`bench --only dns`) set it; tests and `lab up` do not.
static RELEASE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Makes [`bin`] and [`build_daemons`] use the release profile (`true`) or the debug one.
pub fn use_release(release: bool) {
    RELEASE.store(release, std::sync::atomic::Ordering::Relaxed);
}

fn profile() -> &'static str {
    if RELEASE.load(std::sync::atomic::Ordering::Relaxed) {
        "release"
    } else {
        "debug"
    }
}

/// Path of a built daemon binary.
pub fn bin(name: &str) -> PathBuf {
    util::workspace_root().join("target").join(profile()).join(name)
}

/// Builds the daemons the lab runs (in the profile [`use_release`] chose).
pub fn build_daemons() -> Result<()> {
    let release = profile() == "release";
    println!(
        "lab: building mesh-agent, clustermesh-apiserver, meshctl{}",
        if release { " (release)" } else { "" }
    );
    let mut cmd = util::cargo();
    cmd.arg("build");
    if release {
        cmd.arg("--release");
    }
    util::run_status(cmd.args(["-p", "mesh-agent", "-p", "clustermesh-apiserver", "-p", "meshctl"]))
}
