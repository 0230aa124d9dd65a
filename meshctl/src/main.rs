//! meshctl: the fleetmesh command line.

mod agent;
mod dns;
mod observe;

use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

/// fleetmesh's command line: inspect a node's agent, check manifests before applying them, secure and connect
/// clusters.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Show a node agent's status: remote clusters and their sync state, local endpoints, ipcache, counters.
    ///
    /// With --context (or --kubeconfig) it summarises a whole cluster instead: every agent of the fleetmesh
    /// DaemonSet, asked through the API server's pod proxy on its status port (chart value agent.statusPort):
    /// agents ready and answering, each remote cluster as the agents see it (synced on how many, state, time
    /// since its etcd last answered, entry counts, skipped values) and the agents' errors.
    Status {
        #[command(flatten)]
        agent: AgentSocket,
        // With --context or --kubeconfig: the cluster whose agents to summarise instead of one node's agent.
        #[command(flatten)]
        kube: KubeArgs,
        /// With --context: wait until every agent is ready and answers, and every remote cluster is synced on
        /// every agent.
        #[arg(long)]
        wait: bool,
        /// How long --wait waits (e.g. 5m, 30s).
        #[arg(long, default_value = "5m", value_parser = mesh_model::duration::parse_duration)]
        wait_timeout: std::time::Duration,
        /// Print the full status as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Services as a node's agent balances them.
    #[command(subcommand)]
    Service(ServiceCommand),
    /// The clusterset DNS zone (`clusterset.local`) as a node's agent answers it.
    #[command(subcommand)]
    Dns(DnsCommand),
    /// How a service's new connections are shared between clusters on a node: the `TrafficPolicy` in force, each
    /// group's weight, clusters and share, and the share of every cluster in the datapath's slot table.
    Traffic {
        /// The service (`NAME` or `NAMESPACE/NAME`).
        service: String,
        /// Namespace of the service when SERVICE has none.
        #[arg(long, short = 'n', default_value = "default")]
        namespace: String,
        #[command(flatten)]
        agent: AgentSocket,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Staged rollouts (`StagedRollout` objects) as a node's agent runs them.
    #[command(subcommand)]
    Rollout(RolloutCommand),
    /// Stream flow events from a node: policy verdicts (the first packet of every allowed flow, every denied
    /// packet) and load-balancer drops, with pod, namespace, cluster and identity of both ends. The datapath
    /// rate-limits events per CPU; `meshctl status` shows how many were suppressed.
    Observe {
        /// Only flows from or to this pod (`NAME` or `NAMESPACE/NAME`).
        #[arg(long)]
        pod: Option<String>,
        /// Only flows from or to this namespace.
        #[arg(long, short = 'n')]
        namespace: Option<String>,
        /// Only flows from or to this cluster (`world`, `pending` and `cidr` name non-pod peers).
        #[arg(long)]
        cluster: Option<String>,
        /// Only `forwarded` or `dropped` flows.
        #[arg(long, value_parser = ["forwarded", "dropped"])]
        verdict: Option<String>,
        /// Show this many recent flows first.
        #[arg(long, default_value_t = 20)]
        last: usize,
        /// Print the recent flows and exit instead of following new ones.
        #[arg(long)]
        no_follow: bool,
        /// Exit after this many flows.
        #[arg(long)]
        count: Option<usize>,
        /// Exit after this long (e.g. `30s`).
        #[arg(long, value_parser = mesh_model::duration::parse_duration)]
        timeout: Option<std::time::Duration>,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        agent: AgentSocket,
    },
    /// Network policy as a node's agent enforces it.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Work with manifests (the manifests source of edge nodes and the lab).
    #[command(subcommand)]
    Manifests(ManifestsCommand),
    /// Certificates, etcd users and connections between clusters.
    ///
    /// Steps for a mesh: `ca create` once; per cluster `cluster-certs` (its etcd then runs with
    /// `--cert-file etcd-server.crt --key-file etcd-server.key --trusted-ca-file ca.crt --client-cert-auth` and
    /// https URLs) and `etcd-init` once its etcd is up; its clustermesh-apiserver uses `--etcd-ca ca.crt
    /// --etcd-cert apiserver.crt --etcd-key apiserver.key`; then `connect --from A --to B` for every pair.
    ///
    /// With the Helm chart on Kubernetes: `enable --context A`, `status --context A [--wait]`, `connect --context A
    /// --destination-context B` and `disconnect` work on kubeconfig contexts, like `cilium clustermesh`.
    #[command(subcommand)]
    Clustermesh(ClustermeshCommand),
}

#[derive(Debug, Subcommand)]
enum HubCommand {
    /// Make a hub folder: the hub's own CA, a server certificate per member (member-I.crt; SANs every member address,
    /// 127.0.0.1 and --server-name), admin.crt (CN admin-hub, etcd's root role) and hub.yaml (the members' client
    /// and peer URLs, https://IP:2379 and https://IP:2380).
    Create {
        /// Address of a member (repeat: 3 members keep quorum when one is lost).
        #[arg(long = "member-ip")]
        member_ips: Vec<IpAddr>,
        /// DNS name every member certificate also carries (repeat).
        #[arg(long = "server-name")]
        server_names: Vec<String>,
        /// Validity of the certificates in days.
        #[arg(long, default_value_t = 365)]
        days: u32,
        /// Output folder (the hub folder; keep it with the CA key private).
        #[arg(long)]
        out: PathBuf,
        /// Replace existing material in the output folder.
        #[arg(long)]
        force: bool,
    },
    /// Set up the hub's etcd once it serves (idempotent): role hub-reader (read on PREFIX/), users root and
    /// admin-hub (role root), auth enabled.
    Init {
        /// The hub folder (made by `hub create`).
        #[arg(long)]
        hub: PathBuf,
        /// Key prefix the clusters publish under.
        #[arg(long, default_value = "fleetmesh")]
        prefix: String,
    },
    /// Join a cluster to the hub: certificates hub-apiserver-CLUSTER (its etcd user may write only below
    /// PREFIX/clusters/CLUSTER/ and read the rest) and hub-reader-CLUSTER (read only, for its agents), the users
    /// and role in the hub, OUT/hub-config.yaml (the apiserver's --hub-config) and the cluster's entry in
    /// HUB/clusters/. Refuses a name or id another joined cluster has.
    Join {
        #[arg(long)]
        hub: PathBuf,
        #[arg(long)]
        cluster: String,
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..=4095))]
        cluster_id: u16,
        #[arg(long, default_value = "fleetmesh")]
        prefix: String,
        #[arg(long, default_value_t = 365)]
        days: u32,
        /// Output folder: the cluster's hub material.
        #[arg(long)]
        out: PathBuf,
        /// Replace a cluster of the same name (another id) that joined already.
        #[arg(long)]
        replace: bool,
        /// A cluster label, KEY=VALUE (repeatable, or comma separated): pinned in the other clusters' peer files
        /// by `hub connect`, so that their agents' membership selectors (`mesh-agent --peer-selector`) and
        /// TrafficPolicy selectors match it. Give the cluster's clustermesh-apiserver the same `--cluster-label`s.
        #[arg(long = "label", value_delimiter = ',', value_parser = mesh_model::traffic::parse_label)]
        labels: Vec<(String, String)>,
    },
    /// Write a cluster's peer files for every other cluster that joined the hub: endpoints the hub's members,
    /// prefix PREFIX/clusters/PEER, the cluster's hub-reader certificate. Run again after clusters join; agents
    /// pick new files up at run time.
    Connect {
        #[arg(long)]
        hub: PathBuf,
        /// The cluster's hub material (made by `hub join`).
        #[arg(long)]
        certs: PathBuf,
        /// The cluster's clustermesh config directory (its agents' --clustermesh-config).
        #[arg(long)]
        config_dir: PathBuf,
        #[arg(long, default_value = "fleetmesh")]
        prefix: String,
        /// Pin each peer's id (from the hub folder) in its file.
        #[arg(long)]
        pin_id: bool,
    },
}

#[derive(Debug, Subcommand)]
enum ClustermeshCommand {
    /// The mesh's certificate authority.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Make one cluster's material, signed by the mesh CA: etcd server certificate, client certificates for the
    /// cluster's clustermesh-apiserver (CN clustermesh-apiserver-CLUSTER, read/write), for peers
    /// (CN remote-CLUSTER, read only) and for `etcd-init` (CN admin-CLUSTER), the CA certificate, and
    /// cluster.yaml (name, id, etcd endpoints).
    ClusterCerts {
        /// Folder of the CA (ca.crt, ca.key; key in PKCS#8 PEM).
        #[arg(long)]
        ca: PathBuf,
        /// Cluster name.
        #[arg(long)]
        cluster: String,
        /// Cluster id, unique in the mesh (1-4095).
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..=4095))]
        cluster_id: u16,
        /// IP address of the cluster's etcd (repeat for several); goes into the server certificate.
        #[arg(long = "server-ip")]
        server_ips: Vec<IpAddr>,
        /// DNS name of the cluster's etcd (repeat for several); goes into the server certificate.
        #[arg(long = "server-name")]
        server_names: Vec<String>,
        /// etcd client port, for the endpoints in cluster.yaml.
        #[arg(long, default_value_t = meshctl::clustermesh::DEFAULT_ETCD_PORT)]
        etcd_port: u16,
        /// Endpoints peers use (repeat); default https://SERVER:PORT for every --server-ip and --server-name.
        #[arg(long = "endpoint")]
        endpoints: Vec<String>,
        /// Validity of the certificates in days.
        #[arg(long, default_value_t = 365)]
        days: u32,
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
        /// Replace existing material in the output folder.
        #[arg(long)]
        force: bool,
    },
    /// A fleet hub: one etcd cluster (3 members) every cluster publishes into and reads its peers from, instead of
    /// every cluster reading every other (docs/fleet-hub.md). `hub create`, `hub init`, then per cluster `hub join`
    /// and `hub connect`.
    #[command(subcommand)]
    Hub(HubCommand),
    /// Create users and roles in a cluster's own etcd and enable auth (idempotent), using the cluster folder's
    /// admin certificate: role clustermesh-apiserver (read/write on PREFIX/) for user
    /// clustermesh-apiserver-CLUSTER, role remote (read only on PREFIX/) for user remote-CLUSTER, role root for
    /// users root (no password) and admin-CLUSTER. etcd maps a client certificate's CN to the user.
    EtcdInit {
        /// Folder made by `cluster-certs`.
        #[arg(long)]
        certs: PathBuf,
        /// etcd endpoints (repeat); default: those in the folder's cluster.yaml.
        #[arg(long = "endpoint")]
        endpoints: Vec<String>,
        /// Key prefix the clusters publish under.
        #[arg(long, default_value = "fleetmesh")]
        prefix: String,
    },
    /// Connect two clusters. On Kubernetes (`--context A --destination-context B`, like `cilium clustermesh
    /// connect`): reads each cluster's name, id, clustermesh-apiserver address and, with TLS, the CA and read-only
    /// client certificate it hands to peers (Secret `<release>-clustermesh-remote-client`), and writes the other
    /// cluster's entry into the agents' clustermesh config Secret and its certificates into
    /// `<release>-clustermesh-remote-certs`, in both clusters. Offline (`--from A --to B`): gives cluster A what
    /// it needs to read cluster B's etcd: writes B's CA and read-only client certificate into A's clustermesh
    /// config directory (`B.tls/`) and the file `B` with `endpoints`, `trusted-ca-file`, `cert-file`, `key-file`.
    /// Either way refuses B if it has A's name or id, or the id of another connected cluster.
    Connect {
        /// Cluster A's folder (made by `cluster-certs`).
        #[arg(
            long,
            required_unless_present = "destination_context",
            conflicts_with = "destination_context"
        )]
        from: Option<PathBuf>,
        /// Cluster B's folder (repeat to connect A to several clusters).
        #[arg(long, required_unless_present = "destination_context")]
        to: Vec<PathBuf>,
        /// Cluster A's clustermesh config directory (what its agents get as --clustermesh-config); default
        /// FROM/clustermesh.
        #[arg(long, conflicts_with = "destination_context")]
        config_dir: Option<PathBuf>,
        /// The kubeconfig context of cluster B (Kubernetes mode; cluster A is --context).
        #[arg(long, conflicts_with = "to")]
        destination_context: Option<String>,
        /// URL peers use for cluster A's clustermesh-apiserver instead of its Service's addresses (repeat;
        /// `https://HOST:PORT` with TLS, else `http://`).
        #[arg(long = "source-endpoint", requires = "destination_context")]
        source_endpoints: Vec<String>,
        /// URL for cluster B's clustermesh-apiserver instead of its Service's addresses (repeat).
        #[arg(long = "destination-endpoint", requires = "destination_context")]
        destination_endpoints: Vec<String>,
        #[command(flatten)]
        kube: KubeArgs,
        /// Replace a different cluster of the same name that is connected already.
        #[arg(long)]
        replace: bool,
        /// Offline: pin each cluster B's id (from its cluster.yaml) in its config file: A's agents then accept only
        /// records carrying that id, whatever B publishes.
        #[arg(long, conflicts_with = "destination_context")]
        pin_id: bool,
        /// Offline: pin a cluster B's pod CIDRs, PEER=CIDR (repeat): A's agents accept only node CIDRs, pod
        /// addresses and backends of B inside them.
        #[arg(long = "pod-cidr", value_parser = meshctl::clustermesh::parse_pod_cidr_pin, conflicts_with = "destination_context")]
        pod_cidrs: Vec<(String, ipnet::Ipv4Net)>,
        /// Offline: pin a cluster B's labels, PEER=KEY=VALUE (repeat): A's selectors (TrafficPolicy, StagedRollout,
        /// MeshNetworkPolicy) match B by these instead of the labels B publishes.
        #[arg(long = "peer-label", value_parser = meshctl::clustermesh::parse_label_pin, conflicts_with = "destination_context")]
        peer_labels: Vec<(String, (String, String))>,
    },
    /// Remove the entries two connected clusters have of each other (Kubernetes; both directions).
    Disconnect {
        /// The kubeconfig context of the other cluster.
        #[arg(long)]
        destination_context: String,
        #[command(flatten)]
        kube: KubeArgs,
    },
    /// Cluster mesh state of a cluster with the fleetmesh chart: name and id, how peers reach its
    /// clustermesh-apiserver (LoadBalancer ingress, or node port and node addresses), TLS Secrets, connected
    /// peers and the agents' readiness.
    Status {
        #[command(flatten)]
        kube: KubeArgs,
        /// Wait until the clustermesh-apiserver's Service has an address and every agent is ready.
        #[arg(long)]
        wait: bool,
        /// How long --wait waits (e.g. 5m, 30s).
        #[arg(long, default_value = "5m", value_parser = mesh_model::duration::parse_duration)]
        wait_timeout: std::time::Duration,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Check that a cluster is ready for the mesh: chart installed, the clustermesh-apiserver's Service of a
    /// type peers can reach (changed to --service-type when given), TLS Secrets present (or the commands that
    /// make them).
    Enable {
        #[command(flatten)]
        kube: KubeArgs,
        /// Type of the clustermesh-apiserver's Service.
        #[arg(long, value_parser = ["LoadBalancer", "NodePort"])]
        service_type: Option<String>,
    },
}

/// How to reach a cluster with the fleetmesh chart.
#[derive(Debug, Clone, clap::Args)]
struct KubeArgs {
    /// Kubeconfig file (default: $KUBECONFIG, else ~/.kube/config).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Kubeconfig context of the cluster (default: the current context).
    #[arg(long)]
    context: Option<String>,
    /// Namespace of the fleetmesh release.
    #[arg(long, short = 'n', default_value = meshctl::kubemesh::DEFAULT_NAMESPACE)]
    namespace: String,
    /// Helm release name of the fleetmesh chart (object names derive from it).
    #[arg(long, default_value = meshctl::kubemesh::DEFAULT_RELEASE)]
    release: String,
}

impl KubeArgs {
    fn target(&self, context: Option<String>) -> meshctl::kubemesh::Target {
        meshctl::kubemesh::Target {
            kubeconfig: self.kubeconfig.clone(),
            context,
            namespace: self.namespace.clone(),
            release: self.release.clone(),
        }
    }
}

#[derive(Debug, Subcommand)]
enum CaCommand {
    /// Create a CA (ca.crt, and ca.key readable only by its owner) in OUT.
    Create {
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
        /// Name of the mesh (goes into the CA's subject).
        #[arg(long, default_value = "fleetmesh")]
        name: String,
        /// Validity in days.
        #[arg(long, default_value_t = 3650)]
        days: u32,
        /// Replace an existing CA in OUT (every certificate it signed stops being trusted).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Subcommand)]
enum DnsCommand {
    /// What NAME resolves to and why: the answer of the node's clusterset DNS (its agent's `--dns-listen`), and
    /// for a ClusterSetIP the imported service it stands for and the clusters new connections go to (from the
    /// agent's status).
    Lookup {
        name: String,
        /// Record type (A, SRV, TXT, AAAA, ...).
        #[arg(long = "type", short = 't', default_value = "A")]
        rtype: String,
        /// The agent's DNS address.
        #[arg(long, env = "FLEETMESH_DNS_SERVER", default_value = "169.254.20.10:53")]
        server: std::net::SocketAddr,
        #[command(flatten)]
        agent: AgentSocket,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum ServiceCommand {
    /// Every service with its frontends, its backends per cluster, its affinity, and which backends the
    /// datapath spreads new connections over (marked `*`).
    List {
        #[command(flatten)]
        agent: AgentSocket,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

/// The agent socket and namespace every rollout command takes.
#[derive(Debug, clap::Args)]
struct RolloutTarget {
    /// Namespace of the rollout.
    #[arg(long, short = 'n', default_value = "default")]
    namespace: String,
    #[command(flatten)]
    agent: AgentSocket,
}

/// The node agent a command talks to.
#[derive(Debug, clap::Args)]
struct AgentSocket {
    /// The agent's API socket.
    #[arg(
        long,
        env = "FLEETMESH_API_SOCKET",
        default_value = "/var/run/fleetmesh/agent.sock"
    )]
    socket: PathBuf,
}

/// `NAME` or `NAMESPACE/NAME` → (namespace, name), with `namespace` when the argument has none.
fn namespaced<'a>(arg: &'a str, namespace: &'a str) -> (&'a str, &'a str) {
    arg.split_once('/').unwrap_or((namespace, arg))
}

#[derive(Debug, Subcommand)]
enum RolloutCommand {
    /// Phase, step, share sent to `to`, the gate's figures for the current step, and why it halted, as one node's
    /// agent runs it.
    ///
    /// With --context (or --kubeconfig) it reads the cluster's StagedRollouts instead: whether each is valid and
    /// the clustermesh-apiserver's summary of every node's progress (`status.progress`: phase, lowest step, nodes,
    /// halted nodes).
    Status {
        /// The rollout (all when absent).
        name: Option<String>,
        #[command(flatten)]
        target: RolloutTarget,
        /// Read the StagedRollouts of the cluster of this kubeconfig context instead of one node's agent.
        #[arg(long)]
        context: Option<String>,
        /// Kubeconfig file for --context (default: $KUBECONFIG, else ~/.kube/config); alone it means the current
        /// context.
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
        /// With --context: the rollouts of every namespace.
        #[arg(long, short = 'A', conflicts_with = "name")]
        all_namespaces: bool,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Hold the current step: its weights stay, its hold time stops.
    Pause {
        name: String,
        #[command(flatten)]
        target: RolloutTarget,
    },
    /// Continue a paused rollout, or repeat the step of a halted one with a fresh gate.
    Resume {
        name: String,
        #[command(flatten)]
        target: RolloutTarget,
    },
    /// Stop the rollout: every new connection goes to `from`.
    Abort {
        name: String,
        #[command(flatten)]
        target: RolloutTarget,
    },
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// The compiled policy of a pod on this node: its identity and labels, whether ingress/egress are enforced,
    /// and every allowed (peer identity, protocol, ports) with the peer's labels and the rule that allows it.
    Get {
        /// The pod (`NAME` or `NAMESPACE/NAME`).
        pod: String,
        /// Namespace of the pod when POD has none.
        #[arg(long, short = 'n', default_value = "default")]
        namespace: String,
        #[command(flatten)]
        agent: AgentSocket,
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
        Command::Status {
            agent,
            kube,
            wait,
            wait_timeout,
            json,
        } => {
            let target = (kube.context.is_some() || kube.kubeconfig.is_some())
                .then(|| kube.target(kube.context.clone()));
            status(&agent.socket, target, wait.then_some(wait_timeout), json)
        }
        Command::Service(ServiceCommand::List { agent, json }) => agent::services(&agent.socket, json),
        Command::Dns(DnsCommand::Lookup {
            name,
            rtype,
            server,
            agent,
            json,
        }) => dns::lookup(server, &agent.socket, &name, &rtype, json),
        Command::Traffic {
            service,
            namespace,
            agent,
            json,
        } => {
            let (ns, name) = namespaced(&service, &namespace);
            agent::traffic(&agent.socket, ns, name, json)
        }
        Command::Rollout(r) => match r {
            RolloutCommand::Status {
                name,
                target,
                context,
                kubeconfig,
                all_namespaces,
                json,
            } => {
                if context.is_none() && kubeconfig.is_none() {
                    agent::rollout_status(&target.agent.socket, &target.namespace, name.as_deref(), json)
                } else {
                    let kube = meshctl::kubemesh::Target {
                        kubeconfig,
                        context,
                        namespace: meshctl::kubemesh::DEFAULT_NAMESPACE.to_owned(),
                        release: meshctl::kubemesh::DEFAULT_RELEASE.to_owned(),
                    };
                    let ns = (!all_namespaces).then_some(target.namespace);
                    kube_command(async move {
                        let c = meshctl::kubemesh::open(&kube).await?;
                        let rows = meshctl::kubestatus::rollouts(&c, ns.as_deref(), name.as_deref()).await?;
                        if json {
                            println!("{}", serde_json::to_string_pretty(&rows)?);
                        } else {
                            print!("{}", meshctl::kubestatus::rollouts_table(&rows));
                        }
                        Ok(())
                    })
                }
            }
            RolloutCommand::Pause { name, target } => {
                agent::rollout_command(&target.agent.socket, &target.namespace, &name, "pause")
            }
            RolloutCommand::Resume { name, target } => {
                agent::rollout_command(&target.agent.socket, &target.namespace, &name, "resume")
            }
            RolloutCommand::Abort { name, target } => {
                agent::rollout_command(&target.agent.socket, &target.namespace, &name, "abort")
            }
        },
        Command::Manifests(ManifestsCommand::Validate { files }) => validate(&files),
        Command::Observe {
            pod,
            namespace,
            cluster,
            verdict,
            last,
            no_follow,
            count,
            timeout,
            json,
            agent,
        } => observe::observe(
            &agent.socket,
            &observe::Observe {
                pod,
                namespace,
                cluster,
                verdict,
                last,
                follow: !no_follow,
                count,
                timeout,
                json,
            },
        ),
        Command::Policy(PolicyCommand::Get {
            pod,
            namespace,
            agent,
            json,
        }) => {
            let (ns, name) = namespaced(&pod, &namespace);
            observe::policy_get(&agent.socket, ns, name, json)
        }
        Command::Clustermesh(c) => clustermesh(c),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Runs a Kubernetes command on a single-threaded runtime.
/// `meshctl status`: one node's agent, or with a kubeconfig target every agent of that cluster.
fn status(
    socket: &std::path::Path,
    target: Option<meshctl::kubemesh::Target>,
    wait: Option<std::time::Duration>,
    json: bool,
) -> anyhow::Result<()> {
    let Some(target) = target else {
        if wait.is_some() {
            anyhow::bail!("--wait needs --context: it waits for a whole cluster's agents");
        }
        return agent::status(socket, json);
    };
    kube_command(async move {
        use meshctl::kubestatus as ks;
        let c = meshctl::kubemesh::open(&target).await?;
        let st = match wait {
            Some(timeout) => ks::wait(&c, timeout, std::time::Duration::from_secs(2)).await?,
            None => ks::status(&c).await?,
        };
        if json {
            println!("{}", serde_json::to_string_pretty(&st)?);
        } else {
            print!("{}", st.table());
        }
        Ok(())
    })
}

fn kube_command(f: impl std::future::Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(f)
}

fn hub(cmd: HubCommand) -> anyhow::Result<()> {
    use meshctl::hub;
    let rt = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")
    };
    match cmd {
        HubCommand::Create {
            member_ips,
            server_names,
            days,
            out,
            force,
        } => {
            let info = hub::create(&out, &member_ips, &server_names, days, force)?;
            println!(
                "hub of {} members in {}: endpoints {}",
                info.members.len(),
                out.display(),
                info.endpoints().join(",")
            );
        }
        HubCommand::Init { hub: dir, prefix } => {
            rt()?.block_on(hub::init(&dir, &prefix))?;
            println!("hub {}: roles and users set, auth enabled", dir.display());
        }
        HubCommand::Join {
            hub: dir,
            cluster,
            cluster_id,
            prefix,
            days,
            out,
            replace,
            labels,
        } => {
            let spec = hub::JoinSpec {
                cluster,
                id: cluster_id,
                prefix,
                days,
                replace,
                labels: labels.into_iter().collect(),
            };
            let path = rt()?.block_on(hub::join(&dir, &spec, &out))?;
            println!(
                "cluster {} (id {}) joined the hub; its apiserver's --hub-config is {}",
                spec.cluster,
                spec.id,
                path.display()
            );
        }
        HubCommand::Connect {
            hub: dir,
            certs,
            config_dir,
            prefix,
            pin_id,
        } => {
            for p in hub::connect(&dir, &certs, &config_dir, &prefix, pin_id)? {
                println!("wrote {}", p.display());
            }
        }
    }
    Ok(())
}

fn clustermesh(cmd: ClustermeshCommand) -> anyhow::Result<()> {
    use meshctl::clustermesh as cm;
    use meshctl::kubemesh as km;
    match cmd {
        ClustermeshCommand::Ca(CaCommand::Create {
            out,
            name,
            days,
            force,
        }) => {
            cm::create_ca(&out, &name, days, force)?;
            println!(
                "CA created: {} and {} (keep the key private)",
                out.join(cm::CA_CERT).display(),
                out.join(cm::CA_KEY).display()
            );
        }
        ClustermeshCommand::ClusterCerts {
            ca,
            cluster,
            cluster_id,
            server_ips,
            server_names,
            etcd_port,
            endpoints,
            days,
            out,
            force,
        } => {
            let spec = cm::ClusterSpec {
                cluster,
                id: cluster_id,
                server_ips,
                server_names,
                etcd_port,
                endpoints,
                days,
            };
            let info = cm::cluster_certs(&ca, &spec, &out, force)?;
            println!(
                "cluster {} (id {}): certificates in {}; etcd endpoints {}",
                info.name,
                info.id,
                out.display(),
                info.endpoints.join(",")
            );
        }
        ClustermeshCommand::Hub(h) => hub(h)?,
        ClustermeshCommand::EtcdInit {
            certs,
            endpoints,
            prefix,
        } => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let eps = (!endpoints.is_empty()).then_some(endpoints.as_slice());
            rt.block_on(cm::etcd_init(&certs, eps, &prefix))?;
            println!("etcd of {}: users and roles set, auth enabled", certs.display());
        }
        ClustermeshCommand::Connect {
            from,
            to,
            config_dir,
            destination_context,
            source_endpoints,
            destination_endpoints,
            kube,
            replace,
            pin_id,
            pod_cidrs,
            peer_labels,
        } => {
            if let Some(dest) = destination_context {
                return kube_command(async move {
                    let a = km::open(&kube.target(kube.context.clone())).await?;
                    let b = km::open(&kube.target(Some(dest))).await?;
                    let opts = km::ConnectOptions {
                        replace,
                        source_endpoints,
                        destination_endpoints,
                    };
                    let (ia, ib) = km::connect(&a, &b, &opts).await?;
                    println!(
                        "connected cluster {} (id {}, context {}) and cluster {} (id {}, context {}) both ways; \
                         agents pick the change up at run time",
                        ia.name, ia.id, a.context, ib.name, ib.id, b.context
                    );
                    Ok(())
                });
            }
            let from = from.context("--from is required (or --destination-context)")?;
            let dir = config_dir.unwrap_or_else(|| from.join("clustermesh"));
            let mut pins = cm::Pins {
                id: pin_id,
                ..cm::Pins::default()
            };
            for (peer, cidr) in pod_cidrs {
                pins.pod_cidrs.entry(peer).or_default().push(cidr);
            }
            for (peer, (k, v)) in peer_labels {
                pins.labels.entry(peer).or_default().insert(k, v);
            }
            let names = to
                .iter()
                .map(|b| cm::ClusterInfo::read(b).map(|i| i.name))
                .collect::<anyhow::Result<Vec<_>>>()?;
            pins.check(&names)?;
            for b in &to {
                let path = cm::connect(&from, b, &dir, replace, &pins)?;
                println!("wrote {}", path.display());
            }
        }
        ClustermeshCommand::Disconnect {
            destination_context,
            kube,
        } => {
            return kube_command(async move {
                let a = km::open(&kube.target(kube.context.clone())).await?;
                let b = km::open(&kube.target(Some(destination_context))).await?;
                let (ia, ib, removed) = km::disconnect(&a, &b).await?;
                if removed {
                    println!(
                        "disconnected cluster {} and cluster {} (both ways)",
                        ia.name, ib.name
                    );
                } else {
                    println!(
                        "cluster {} and cluster {} were not connected; nothing changed",
                        ia.name, ib.name
                    );
                }
                Ok(())
            });
        }
        ClustermeshCommand::Status {
            kube,
            wait,
            wait_timeout,
            json,
        } => {
            return kube_command(async move {
                let c = km::open(&kube.target(kube.context.clone())).await?;
                let st = if wait {
                    km::wait(&c, wait_timeout, std::time::Duration::from_secs(2)).await?
                } else {
                    km::status(&c).await?
                };
                if json {
                    println!("{}", serde_json::to_string_pretty(&st)?);
                } else {
                    print!("{}", st.table());
                }
                Ok(())
            });
        }
        ClustermeshCommand::Enable { kube, service_type } => {
            return kube_command(async move {
                let c = km::open(&kube.target(kube.context.clone())).await?;
                let e = km::enable(&c, service_type.as_deref()).await?;
                for n in &e.notes {
                    println!("note: {n}");
                }
                println!(
                    "cluster {} (id {}, context {}) is ready for the mesh: Service type {}, TLS {}",
                    e.cluster.name,
                    e.cluster.id,
                    c.context,
                    e.service_type,
                    if e.tls { "on" } else { "off" }
                );
                Ok(())
            });
        }
    }
    Ok(())
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
