//! mesh-agent: the fleetmesh node daemon. Parses its configuration and wires the parts together.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use mesh_agent::api::{self, ApiState, Status};
use mesh_agent::datapath::Datapath;
use mesh_agent::desired::LocalNode;
use mesh_agent::reconcile::Reconciler;
use mesh_agent::remote::{self, Remotes};
use mesh_model::ClusterName;
use mesh_model::source::Snapshot;
use tokio::sync::watch;
use tracing::{info, warn};

/// The fleetmesh node agent. Run it in the node's network namespace: it creates the node's VXLAN device, attaches
/// the eBPF programs to it and to every local pod's host-side veth, and programs the maps from the cluster's
/// manifests and from every peer cluster's etcd.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None, after_help = "Also: mesh-agent wireguard-key --state-dir DIR (prints this node's WireGuard public key).")]
struct Args {
    /// Name of this node (as in the cluster's Node objects).
    #[arg(long, env = "FLEETMESH_NODE_NAME")]
    node_name: String,
    /// Name of this cluster (^([a-z0-9][-a-z0-9]*)?[a-z0-9]$, at most 32 characters).
    #[arg(long, env = "FLEETMESH_CLUSTER_NAME")]
    cluster_name: ClusterName,
    /// Id of this cluster, unique in the mesh (1-4095).
    #[arg(long, env = "FLEETMESH_CLUSTER_ID", value_parser = clap::value_parser!(u16).range(1..=4095))]
    cluster_id: u16,
    /// A label of this cluster, KEY=VALUE (repeatable, or comma separated), as given to its clustermesh-apiserver;
    /// `TrafficPolicy` selectors match local backends' cluster by it.
    #[arg(long = "cluster-label", env = "FLEETMESH_CLUSTER_LABELS", value_delimiter = ',', value_parser = mesh_model::traffic::parse_label)]
    cluster_labels: Vec<(String, String)>,
    /// Where this cluster's state comes from: `manifests` (the directory of --manifests) or `kubernetes` (the
    /// cluster's API server, by in-cluster config or KUBECONFIG).
    #[arg(long, env = "FLEETMESH_SOURCE", default_value = "manifests")]
    source: mesh_k8s::SourceKind,
    /// Directory of Kubernetes manifests describing this cluster (needed with `--source manifests`).
    #[arg(long, env = "FLEETMESH_MANIFESTS")]
    manifests: Option<PathBuf>,
    /// Directory with one file per peer cluster, named after it, holding `endpoints: [URL, ...]` of its etcd.
    /// Files may be added and removed while the agent runs.
    #[arg(long, env = "FLEETMESH_CLUSTERMESH_CONFIG")]
    clustermesh_config: Option<PathBuf>,
    /// Membership selector: a file holding a Kubernetes label selector (`matchLabels: {region: eu}`,
    /// `matchExpressions: [...]`) over the peers' cluster labels as their peer files pin them (`cluster-labels`).
    /// Only the peers it selects are watched and stored; the file is read again every second, so changing it adds
    /// and drops peers without a restart. A missing file selects every peer; a file that does not parse keeps the
    /// last good selector (and, before one, selects none). See docs/fleet-scale.md.
    #[arg(long, env = "FLEETMESH_PEER_SELECTOR")]
    peer_selector: Option<PathBuf>,
    /// How to reach this cluster's own etcd (the format of a peer's file in --clustermesh-config: `endpoints`,
    /// `prefix`, `trusted-ca-file`, `cert-file`, `key-file`): the agent watches this cluster's security identities and
    /// pod addresses there (its nodes and services still come from --source). Re-read when it changes.
    #[arg(long, env = "FLEETMESH_KVSTORE_CONFIG")]
    kvstore_config: Option<PathBuf>,
    /// Unix socket of the local API (status, health).
    #[arg(
        long,
        env = "FLEETMESH_API_SOCKET",
        default_value = "/var/run/fleetmesh/agent.sock"
    )]
    api_socket: PathBuf,
    /// Name of the VXLAN device the agent creates (external mode, UDP 4789).
    #[arg(long, default_value = "fm_vxlan")]
    vxlan_device: String,
    /// How long a remote cluster may be unreachable before its backends are withdrawn from global services
    /// (clients then fail over to the clusters that are alive; the backends return when it is back).
    #[arg(long, default_value = "30s", value_parser = mesh_model::duration::parse_duration)]
    remote_grace_period: Duration,
    /// Affinity of global services without a `service.cilium.io/affinity` annotation: `none` (every cluster's
    /// backends), `local` (this cluster's while it has a ready one) or `remote` (the other clusters' while they
    /// have one). An annotation always wins.
    #[arg(long, env = "FLEETMESH_SERVICE_AFFINITY_DEFAULT", default_value = "none")]
    service_affinity_default: mesh_model::service::Affinity,
    /// A peer read through a fleet hub counts unreachable when this agent has seen no new heartbeat of it for this
    /// long while connected to the hub (its apiserver stopped publishing: the cluster is offline); after
    /// --remote-grace-period its backends are withdrawn, and a fresh heartbeat brings them back. 3× the apiservers'
    /// `--heartbeat-interval` (10s by default). 0: peers read through a hub are judged by the connection only.
    #[arg(long, default_value = "30s", value_parser = mesh_model::duration::parse_duration)]
    remote_heartbeat_timeout: Duration,
    /// How often remote etcd connections are pinged to notice a dead peer. Must not be shorter than the peers'
    /// etcd `--grpc-keepalive-min-time` (5s by default), or etcd drops the connection.
    #[arg(long, default_value = "6s", value_parser = mesh_model::duration::parse_duration)]
    remote_keepalive_interval: Duration,
    /// Most keys one peer cluster may make this agent hold (everything under its key prefix): beyond it the peer
    /// is refused (its data dropped, the status says why) and listed again 30s later; other peers are unaffected.
    #[arg(long, default_value_t = mesh_kvstore::etcd::Limits::DEFAULT.max_keys)]
    remote_max_keys: u64,
    /// Most bytes (keys and values) one peer cluster may make this agent hold; as --remote-max-keys.
    #[arg(long, default_value_t = mesh_kvstore::etcd::Limits::DEFAULT.max_bytes)]
    remote_max_bytes: u64,
    /// Key prefix in etcd.
    #[arg(long, default_value = mesh_kvstore::DEFAULT_PREFIX)]
    kvstore_prefix: String,
    /// Directory on bpffs where the datapath (maps and tc links) is pinned, so that it keeps forwarding while the
    /// agent restarts; the next agent adopts it. Default `/sys/fs/bpf/fleetmesh/<node-name>` (bpffs is mounted
    /// there when missing). Removing the directory removes the datapath (uninstall).
    #[arg(long, env = "FLEETMESH_BPF_PIN_DIR")]
    bpf_pin_dir: Option<PathBuf>,
    /// Also serve `GET /metrics` (Prometheus text format) on this TCP address, e.g. `0.0.0.0:9962`; the API
    /// socket always serves it.
    #[arg(long, env = "FLEETMESH_METRICS_ADDR")]
    metrics_addr: Option<std::net::SocketAddr>,
    /// Also serve `GET /healthz` and `GET /v1/summary` (read-only: readiness, remote clusters in numbers, errors)
    /// on this TCP address, e.g. `0.0.0.0:9968`, for `meshctl status --context` (through the API server's pod
    /// proxy). The API socket always serves them.
    #[arg(long, env = "FLEETMESH_STATUS_ADDR")]
    status_addr: Option<std::net::SocketAddr>,
    /// Directory for the agent's own state that must survive restarts (staged rollouts' progress). Default
    /// `/var/lib/fleetmesh/<node-name>`.
    #[arg(long, env = "FLEETMESH_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// The range ClusterSetIPs of MCS imports come from (docs/clusterset-dns.md).
    #[arg(long, env = "FLEETMESH_CLUSTERSET_CIDR", default_value = mesh_model::clusterset::DEFAULT_CLUSTERSET_CIDR)]
    clusterset_cidr: ipnet::Ipv4Net,
    /// Serve the clusterset DNS zone (`clusterset.local`) on this address, UDP and TCP, e.g. `169.254.20.10:53`;
    /// an address the node does not have yet is added to its `lo` (/32). Unset: no DNS server.
    #[arg(long, env = "FLEETMESH_DNS_LISTEN")]
    dns_listen: Option<std::net::SocketAddr>,
    /// Where names outside the clusterset zone are forwarded (the cluster's DNS, e.g. `10.96.0.10:53`). Unset:
    /// they are answered REFUSED.
    #[arg(long, env = "FLEETMESH_DNS_UPSTREAM")]
    dns_upstream: Option<std::net::SocketAddr>,
    /// Where pod traffic between nodes is encrypted with WireGuard (docs/encryption.md): `off`, `cross-cluster`
    /// (nodes of other clusters: traffic that leaves the cluster's network) or `all` (every other node). Where it
    /// applies, a node without a usable key gets no packets at all (strict mode), never clear VXLAN.
    #[arg(long, env = "FLEETMESH_ENCRYPTION", default_value = "cross-cluster")]
    encryption: mesh_agent::wireguard::Mode,
    /// UDP port the agent receives WireGuard on (at the node's underlay address), published with the node.
    #[arg(long, env = "FLEETMESH_WIREGUARD_PORT", default_value_t = mesh_model::wireguard::DEFAULT_PORT)]
    wireguard_port: u16,
    /// Name of the agent's WireGuard TUN device.
    #[arg(long, default_value = mesh_agent::wireguard::DEFAULT_DEVICE)]
    wireguard_device: String,
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `mesh_agent=debug`.
    #[arg(long, env = "RUST_LOG", default_value = "info,hickory_server=warn")]
    log: String,
}

/// `mesh-agent wireguard-key`: prints this node's WireGuard public key (base64), making the key pair in the state
/// directory first when it has none. The private key never leaves its file (0600).
#[derive(Debug, Parser)]
#[command(name = "mesh-agent wireguard-key")]
struct KeyArgs {
    /// The agent's state directory (as --state-dir).
    #[arg(long, env = "FLEETMESH_STATE_DIR")]
    state_dir: PathBuf,
}

fn ensure_vxlan(name: &str) -> anyhow::Result<()> {
    if mesh_agent::netdev::ifindex(name).is_err() {
        let port = mesh_common::VXLAN_PORT.to_string();
        mesh_agent::netdev::run_ip(&["link", "add", name, "type", "vxlan", "external", "dstport", &port])?;
        info!(device = name, "created VXLAN device");
    }
    mesh_agent::netdev::run_ip(&["link", "set", name, "up"])
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if std::env::args_os().nth(1).is_some_and(|a| a == "wireguard-key") {
        let key_args = KeyArgs::parse_from(std::env::args_os().skip(1));
        let (_, public) = mesh_agent::wireguard::load_or_create_key(&key_args.state_dir)?;
        println!("{}", mesh_model::wireguard::encode_key(public.as_bytes()));
        return Ok(());
    }
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&args.log).context("--log")?)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let me = LocalNode {
        node: args.node_name.clone(),
        cluster: args.cluster_name.to_string(),
        cluster_id: args.cluster_id,
        labels: args.cluster_labels.iter().cloned().collect(),
    };
    info!(node = %me.node, cluster = %me.cluster, id = me.cluster_id, service_affinity_default = %args.service_affinity_default, "starting");

    let (wake_tx, wake_rx) = std::sync::mpsc::channel::<()>();
    let remotes = Remotes::new(wake_tx.clone());

    let (snap_tx, snap_rx) = watch::channel(Snapshot::default());
    let scope = mesh_k8s::Scope::Node(args.node_name.clone());
    let source = mesh_k8s::start_source(args.source, args.manifests.clone(), scope, snap_tx).await?;
    let source = tokio::spawn(source);
    // Staged rollouts' progress on this node, reported in its MeshNode by its own task (kubernetes source only).
    let (progress_tx, progress_rx) = watch::channel(mesh_k8s::progress::NodeRollouts::new());
    if args.source == mesh_k8s::SourceKind::Kubernetes {
        let client = mesh_k8s::connect().await?;
        let writer = mesh_k8s::progress::NodeProgressWriter::new(client, args.node_name.clone());
        tokio::spawn(writer.run(progress_rx));
    }
    {
        let wake = wake_tx.clone();
        let mut rx = snap_rx.clone();
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let _ = wake.send(());
            }
        });
    }
    remote::set_keepalive_interval(args.remote_keepalive_interval);
    // A peer file that is briefly missing or unreadable does not cut the peer before its backends would go.
    remotes.set_peer_file_grace(args.remote_grace_period);
    remotes.set_heartbeat_timeout(args.remote_heartbeat_timeout);
    remotes.set_limits(mesh_kvstore::etcd::Limits {
        max_keys: args.remote_max_keys,
        max_bytes: args.remote_max_bytes,
    });
    if let Some(dir) = args.clustermesh_config.clone() {
        let keys = mesh_kvstore::Keys::new(&args.kvstore_prefix);
        tokio::spawn(remote::manage(
            dir,
            args.peer_selector.clone(),
            me.clone(),
            keys,
            remotes.clone(),
        ));
    } else {
        remotes.set_configured();
    }
    if let Some(file) = args.kvstore_config.clone() {
        let keys = mesh_kvstore::Keys::new(&args.kvstore_prefix);
        tokio::spawn(remote::manage_own(file, me.clone(), keys, remotes.clone()));
    }

    // Sources and remote watchers start first, so that remote clusters sync while the programs load.
    ensure_vxlan(&args.vxlan_device).context("setting up the VXLAN device")?;
    let vxlan = args.vxlan_device.clone();
    let pin_dir = args
        .bpf_pin_dir
        .clone()
        .unwrap_or_else(|| mesh_agent::datapath::default_pin_dir(&me.node));
    // Adopts what an earlier agent pinned: maps with their contents, links (programs replaced in place). Nothing
    // is detached on exit either (SIGTERM included): the datapath stays until the next agent takes over.
    let dp = tokio::task::spawn_blocking(move || -> anyhow::Result<Datapath> {
        let mut dp = Datapath::load_pinned(&pin_dir)
            .with_context(|| format!("loading the eBPF datapath pinned at {}", pin_dir.display()))?;
        dp.attach_overlay(&vxlan)
            .context("attaching to the VXLAN device")?;
        Ok(dp)
    })
    .await
    .context("datapath loader")??;
    info!("datapath loaded and attached");

    let state_dir = args
        .state_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("/var/lib/fleetmesh").join(&me.node));
    let mut dp = dp;
    let wireguard = mesh_agent::wireguard::start(
        &mut dp,
        &mesh_agent::wireguard::EngineConfig {
            mode: args.encryption,
            device: args.wireguard_device.clone(),
            port: args.wireguard_port,
        },
        &state_dir,
        &me,
        snap_rx.clone(),
        remotes.clone(),
    )
    .context("setting up encryption (--encryption)")?;
    // On Kubernetes the agent publishes its key on its own Node (with manifests, whoever writes them does).
    if let Some(engine) = &wireguard
        && args.source == mesh_k8s::SourceKind::Kubernetes
    {
        let (key, port, node) = (engine.status().public_key, args.wireguard_port, me.node.clone());
        let client = mesh_k8s::connect().await?;
        tokio::spawn(async move {
            let mut wait = Duration::from_secs(1);
            while let Err(e) = mesh_k8s::wireguard::publish_wireguard(client.clone(), &node, &key, port).await
            {
                warn!(error = %e, retry_in = ?wait, "publishing the WireGuard key on the Node");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(60));
            }
            info!(node, "WireGuard key published on the Node");
        });
    }

    let status = Arc::new(Mutex::new(Status {
        node: me.node.clone(),
        cluster: me.cluster.clone(),
        cluster_id: me.cluster_id,
        started_ms: remote::now_ms(),
        ready: false,
        manifest_generation: 0,
        manifest_errors: Vec::new(),
        remote_clusters: Vec::new(),
        own_cluster: None,
        encryption: None,
        datapath: Default::default(),
    }));

    let counters = Arc::new(dp.counters_reader().context("opening the counters map")?);
    let flow_hub = mesh_agent::flows::Hub::new(&me.node);
    match dp.take_flow_events() {
        Some(ring) => {
            let hub = flow_hub.clone();
            tokio::spawn(async move {
                if let Err(e) = mesh_agent::flows::run_reader(ring, hub).await {
                    warn!(error = %e, "flow event reader stopped");
                }
            });
        }
        None => warn!("the flow event ring buffer is not available: no flow events"),
    }
    let policies: mesh_agent::policy::SharedPolicyViews = Arc::default();
    let mut reconciler = Reconciler::new(dp, me.clone(), args.vxlan_device.clone());
    reconciler.remote_grace = args.remote_grace_period;
    reconciler.service_affinity_default = args.service_affinity_default;
    reconciler.encryption_flags = args.encryption.node_flags();
    reconciler.flows = Some(flow_hub.clone());
    reconciler.policy_views = policies.clone();
    reconciler.rollouts = mesh_agent::rollout::Rollouts::load(state_dir.join("rollouts.json"));
    reconciler.identity_store = mesh_agent::held::IdentityStore::load(state_dir.join("peer-identities.json"));
    // Clusterset DNS and ClusterSetIP imports: recomputed after each pass's inputs are read (hook below).
    let clusterset = mesh_agent::dns::Clusterset::new(args.clusterset_cidr);
    if let Some(listen) = args.dns_listen {
        mesh_agent::dns::server::ensure_listen_address(listen).context("--dns-listen")?;
        mesh_agent::dns::server::serve(listen, clusterset.zone.clone(), args.dns_upstream)
            .await
            .with_context(|| format!("serving DNS on {listen} (--dns-listen)"))?;
        info!(%listen, upstream = ?args.dns_upstream, "serving the clusterset DNS zone");
    }
    let commands: mesh_agent::api::CommandQueue = Arc::default();
    let programmed = reconciler.tables.programmed.clone();
    let backend_stats = match reconciler.dp.backend_stats_reader() {
        Ok(r) => Some(Arc::new(r)),
        Err(e) => {
            warn!(error = %format!("{e:#}"), "the backend statistics map cannot be read from the API: no statistics in the status");
            None
        }
    };
    // The control loop owns the datapath on its own thread: woken by changes, it programs what they touch.
    let mut control = mesh_agent::control::ControlLoop::new(
        reconciler,
        remotes.clone(),
        snap_rx.clone(),
        status.clone(),
        commands.clone(),
        progress_tx,
        wake_rx,
        mesh_agent::control::LoopConfig::default(),
    );
    std::thread::Builder::new()
        .name("reconciler".into())
        .spawn(move || {
            control.clusterset = Some(clusterset);
            control.run();
        })?;

    let api_state = ApiState {
        status,
        remotes,
        counters,
        commands,
        wake: wake_tx.clone(),
        flows: flow_hub.clone(),
        policies: policies.clone(),
        programmed,
        backend_stats,
        wireguard,
    };
    let socket = args.api_socket.clone();
    if let Some(addr) = args.metrics_addr {
        let st = api_state.clone();
        tokio::spawn(async move {
            if let Err(e) = api::serve_metrics(addr, st).await {
                warn!(%addr, error = %e, "serving metrics");
            }
        });
        info!(%addr, "serving metrics");
    }
    if let Some(addr) = args.status_addr {
        // Bound here, so that a taken port stops the agent at start with the reason, not a log line later.
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the status address {addr} (--status-addr)"))?;
        let st = api_state.clone();
        tokio::spawn(async move {
            if let Err(e) = api::serve_status(listener, st).await {
                warn!(%addr, error = %e, "serving status");
            }
        });
        info!(%addr, "serving status");
    }
    tokio::select! {
        r = api::serve(&socket, api_state) => r.with_context(|| format!("serving the API on {}", socket.display()))?,
        r = source => {
            r.context("cluster state source task")??;
        }
        r = shutdown_signal() => {
            r?;
            info!("shutting down");
        }
    }
    if let Err(e) = std::fs::remove_file(&socket) {
        warn!(socket = %socket.display(), error = %e, "removing the API socket");
    }
    Ok(())
}

async fn shutdown_signal() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    Ok(())
}
