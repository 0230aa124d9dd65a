//! clustermesh-apiserver: publishes one cluster's state (nodes, global services, security identities and pod
//! addresses) into that cluster's etcd, where every peer cluster's agents (and its own, for identities) watch it.

mod identities;
mod kvstoremesh;
mod mcs;
mod publisher;
mod slices;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use mesh_model::ClusterName;

/// Publishes this cluster's nodes into its etcd (with a lease, a synced marker and a heartbeat) so that agents of
/// peer clusters can reach its pods.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Args {
    /// Name of this cluster (^([a-z0-9][-a-z0-9]*)?[a-z0-9]$, at most 32 characters).
    #[arg(long, env = "FLEETMESH_CLUSTER_NAME")]
    cluster_name: ClusterName,
    /// Id of this cluster, unique in the mesh (1-4095).
    #[arg(long, env = "FLEETMESH_CLUSTER_ID", value_parser = clap::value_parser!(u16).range(1..=4095))]
    cluster_id: u16,
    /// Where this cluster's state comes from: `manifests` (the directory of --manifests) or `kubernetes` (the
    /// cluster's API server, by in-cluster config or KUBECONFIG).
    #[arg(long, env = "FLEETMESH_SOURCE", default_value = "manifests")]
    source: mesh_k8s::SourceKind,
    /// Directory of Kubernetes manifests describing this cluster (needed with `--source manifests`).
    #[arg(long, env = "FLEETMESH_MANIFESTS")]
    manifests: Option<PathBuf>,
    /// A label of this cluster, KEY=VALUE (repeatable, or comma separated): published with the cluster's config
    /// so that `TrafficPolicy` selectors in every cluster can match it, e.g. `--cluster-label stage=canary`.
    #[arg(long = "cluster-label", env = "FLEETMESH_CLUSTER_LABELS", value_delimiter = ',', value_parser = mesh_model::traffic::parse_label)]
    cluster_labels: Vec<(String, String)>,
    /// etcd client URLs of this cluster's etcd (comma separated).
    #[arg(
        long,
        env = "FLEETMESH_ETCD_ENDPOINTS",
        value_delimiter = ',',
        required = true
    )]
    etcd_endpoints: Vec<String>,
    /// CA certificate (PEM) that signed the etcd server's certificate; needed for https:// endpoints.
    #[arg(long, env = "FLEETMESH_ETCD_CA")]
    etcd_ca: Option<PathBuf>,
    /// Client certificate (PEM) for etcd; its CN is the etcd user (`meshctl clustermesh cluster-certs` makes
    /// apiserver.crt with CN clustermesh-apiserver-CLUSTER, which `etcd-init` gives read/write on the prefix).
    #[arg(long, env = "FLEETMESH_ETCD_CERT", requires = "etcd_key")]
    etcd_cert: Option<PathBuf>,
    /// Private key (PEM) of --etcd-cert.
    #[arg(long, env = "FLEETMESH_ETCD_KEY", requires = "etcd_cert")]
    etcd_key: Option<PathBuf>,
    /// KVStoreMesh: a clustermesh config directory (one file per peer cluster, as the agents' `--clustermesh-config`)
    /// whose clusters this apiserver mirrors into its own etcd under `<prefix>/kvstoremesh/<cluster>/`. Agents
    /// then read a peer from their local etcd (`prefix: <prefix>/kvstoremesh/<cluster>` in their peer file)
    /// instead of every agent connecting to every peer. Read at start.
    #[arg(long, env = "FLEETMESH_KVSTOREMESH_CONFIG")]
    kvstoremesh_config: Option<PathBuf>,
    /// KVStoreMesh membership selector: a file holding a label selector (`matchLabels`, `matchExpressions`, as the
    /// agents' `--peer-selector`) over the cluster labels the peer files pin (`cluster-labels`); only the peers it
    /// selects are mirrored, so the cluster's etcd neither receives nor stores the others. Read at start; a missing
    /// file selects every peer, one that does not parse stops the start.
    #[arg(
        long,
        env = "FLEETMESH_KVSTOREMESH_PEER_SELECTOR",
        requires = "kvstoremesh_config"
    )]
    kvstoremesh_peer_selector: Option<PathBuf>,
    /// Fleet hub (docs/fleet-hub.md): a file in the peer file format (`endpoints`, `trusted-ca-file`, `cert-file`,
    /// `key-file`, `prefix`) naming the hub's etcd; the cluster's records are published there too, under `prefix`
    /// (`<kvstore-prefix>/clusters/<cluster>` as `meshctl clustermesh hub join` writes it), besides its own etcd.
    /// Read at start.
    #[arg(long, env = "FLEETMESH_HUB_CONFIG")]
    hub_config: Option<PathBuf>,
    /// MCS API (`--source kubernetes` only): a clustermesh config directory (one file per peer cluster, as the
    /// agents' `--clustermesh-config`) whose clusters' ServiceExports are compared with this cluster's (KEP-1645
    /// `Conflict` condition) and imported as ServiceImports. Read at start. Without it, only this cluster's exports
    /// are considered.
    #[arg(long, env = "FLEETMESH_MCS_PEERS")]
    mcs_peers: Option<PathBuf>,
    /// MCS API (`--source kubernetes` only): how often ServiceExport conditions and ServiceImports are reconciled
    /// (and the peers' exports read) besides after every change of the cluster's state.
    #[arg(long, env = "FLEETMESH_MCS_RESYNC", default_value = "10s", value_parser = mesh_model::duration::parse_duration)]
    mcs_resync: Duration,
    /// MCS API (`--source kubernetes` only): the range the ClusterSetIPs of ServiceImports (`spec.ips`) come
    /// from; the agents' `--clusterset-cidr` must be the same (docs/clusterset-dns.md).
    #[arg(long, env = "FLEETMESH_CLUSTERSET_CIDR", default_value = mesh_model::clusterset::DEFAULT_CLUSTERSET_CIDR)]
    clusterset_cidr: ipnet::Ipv4Net,
    /// Key prefix in etcd.
    #[arg(long, default_value = mesh_kvstore::DEFAULT_PREFIX)]
    kvstore_prefix: String,
    /// Lifetime of the lease that holds published records: if this daemon dies (its etcd still up), its records
    /// vanish after this. Long by default (as Cilium's 15m), so that a crash-looping apiserver freezes what peers
    /// see of this cluster instead of withdrawing every backend and identity after a few seconds; a restarted
    /// apiserver rewrites every record under its own lease at once.
    #[arg(long, env = "FLEETMESH_LEASE_TTL", default_value = "15m", value_parser = mesh_model::duration::parse_duration)]
    lease_ttl: Duration,
    /// How often the heartbeat record is written (and the lease kept alive; at most a third of --lease-ttl). Agents
    /// that read this cluster through a fleet hub count it unreachable when its heartbeat is older than their
    /// `--remote-heartbeat-timeout` (30s by default: keep this a third of it or less).
    #[arg(long, env = "FLEETMESH_HEARTBEAT_INTERVAL", default_value = "10s", value_parser = mesh_model::duration::parse_duration)]
    heartbeat_interval: Duration,
    /// A service with more backends than this is published as a record without backends plus slices of at most
    /// this many (`state/backends/v1/...`): one backend's change then writes and sends one slice, whatever the
    /// service's size. Agents older than the slices read such a service without backends: upgrade agents before
    /// apiservers, or set 0 (every service as one record, at most 4,096 backends) until they are
    /// (docs/kvstore-schema.md).
    #[arg(long, env = "FLEETMESH_SERVICE_SLICE_SIZE", default_value_t = 100, value_parser = clap::value_parser!(u32).range(0..=4096))]
    service_slice_size: u32,
    /// How long a security identity no pod uses any more stays published before it is withdrawn (its number is not
    /// handed to another label set meanwhile, and comes back if its label set does).
    #[arg(long, env = "FLEETMESH_IDENTITY_GC_GRACE", default_value = "5m", value_parser = mesh_model::duration::parse_duration)]
    identity_gc_grace: Duration,
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `clustermesh_apiserver=debug`.
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    log: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&args.log).context("--log")?)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    anyhow::ensure!(
        args.lease_ttl >= Duration::from_secs(2),
        "--lease-ttl must be at least 2s (etcd leases have second granularity)"
    );
    anyhow::ensure!(
        args.heartbeat_interval >= Duration::from_millis(100),
        "--heartbeat-interval must be at least 100ms, not {:?}",
        args.heartbeat_interval
    );
    let https = args.etcd_endpoints.iter().any(|e| e.starts_with("https://"));
    anyhow::ensure!(
        !https || args.etcd_ca.is_some(),
        "https:// etcd endpoints need --etcd-ca (the CA that signed the etcd server's certificate)"
    );
    anyhow::ensure!(
        https || (args.etcd_ca.is_none() && args.etcd_cert.is_none()),
        "--etcd-ca/--etcd-cert/--etcd-key need https:// etcd endpoints"
    );
    let tls = args.etcd_ca.clone().map(|ca| publisher::EtcdTls {
        ca,
        identity: args.etcd_cert.clone().zip(args.etcd_key.clone()),
    });
    tracing::info!(cluster = %args.cluster_name, id = args.cluster_id, etcd = ?args.etcd_endpoints, tls = tls.is_some(), "starting");

    let (tx, rx) = tokio::sync::watch::channel(mesh_model::source::Snapshot::default());
    // With `--source kubernetes`, also writes the status of TrafficPolicies and StagedRollouts.
    let mcs_changes = rx.clone();
    let source = tokio::spawn(mesh_k8s::start_cluster_source(args.source, args.manifests.clone(), tx).await?);
    // With `--source kubernetes`, the MCS API write-back: ServiceExport conditions and ServiceImports.
    let (exports, _mcs) = if matches!(args.source, mesh_k8s::SourceKind::Kubernetes) {
        anyhow::ensure!(!args.mcs_resync.is_zero(), "--mcs-resync must not be 0");
        let client = mesh_k8s::connect()
            .await
            .context("connecting to the Kubernetes API server (MCS)")?;
        let (etx, erx) = tokio::sync::watch::channel(None::<mcs::ExportRecords>);
        let mut controller = mcs::Controller::new(
            client,
            args.cluster_name.to_string(),
            mesh_kvstore::Keys::new(&args.kvstore_prefix),
            args.mcs_resync,
            args.mcs_peers.as_deref(),
            etx,
        );
        controller.clusterset_cidr = args.clusterset_cidr;
        (Some(erx), Some(tokio::spawn(controller.run(mcs_changes))))
    } else {
        anyhow::ensure!(args.mcs_peers.is_none(), "--mcs-peers needs --source kubernetes");
        (None, None)
    };
    let mirror_selector = args
        .kvstoremesh_peer_selector
        .as_deref()
        .map(mesh_kvstore::peer::read_peer_selector)
        .transpose()
        .map_err(|e| anyhow::anyhow!("--kvstoremesh-peer-selector: {e}"))?
        .flatten();
    let _mirrors = args.kvstoremesh_config.as_ref().map(|dir| {
        kvstoremesh::start(
            dir,
            mirror_selector.as_ref(),
            &kvstoremesh::Local {
                endpoints: args.etcd_endpoints.clone(),
                tls: tls.clone(),
                keys: mesh_kvstore::Keys::new(&args.kvstore_prefix),
                cluster: args.cluster_name.to_string(),
            },
        )
    });
    let hub = args
        .hub_config
        .as_deref()
        .map(|f| read_hub_config(f, &args.kvstore_prefix, &args.cluster_name.to_string()))
        .transpose()?;
    let allocator = publisher::shared_allocator(
        &args.cluster_name.to_string(),
        args.cluster_id,
        args.identity_gc_grace,
    );
    let hub_publisher = hub.map(|h| publisher::Publisher {
        sink: "hub",
        cluster: args.cluster_name.to_string(),
        cluster_id: args.cluster_id,
        labels: args.cluster_labels.iter().cloned().collect(),
        keys: mesh_kvstore::Keys::new(h.prefix.as_deref().unwrap_or_default()),
        endpoints: h.endpoints.clone(),
        lease_ttl: args.lease_ttl,
        heartbeat_interval: args.heartbeat_interval,
        tls: h.trusted_ca_file.clone().map(|ca| publisher::EtcdTls {
            ca,
            identity: h.cert_file.clone().zip(h.key_file.clone()),
        }),
        exports: exports.clone(),
        slice_size: usize::try_from(args.service_slice_size).unwrap_or(mesh_kvstore::DEFAULT_SLICE_SIZE),
        slices: std::sync::Mutex::default(),
    });
    if let Some(h) = &hub_publisher {
        tracing::info!(hub = ?h.endpoints, prefix = h.keys.prefix(), "publishing into the fleet hub too");
    }
    let publisher = publisher::Publisher {
        sink: "etcd",
        cluster: args.cluster_name.to_string(),
        cluster_id: args.cluster_id,
        labels: args.cluster_labels.iter().cloned().collect(),
        keys: mesh_kvstore::Keys::new(&args.kvstore_prefix),
        endpoints: args.etcd_endpoints,
        lease_ttl: args.lease_ttl,
        heartbeat_interval: args.heartbeat_interval,
        tls,
        exports,
        slice_size: usize::try_from(args.service_slice_size).unwrap_or(mesh_kvstore::DEFAULT_SLICE_SIZE),
        slices: std::sync::Mutex::default(),
    };
    tokio::select! {
        r = source => {
            r.context("cluster state source task")??;
            anyhow::bail!("cluster state source stopped");
        }
        () = publisher.run(rx.clone(), allocator.clone()) => anyhow::bail!("publisher stopped"),
        () = run_optional(hub_publisher.as_ref(), rx, allocator) => anyhow::bail!("hub publisher stopped"),
        r = shutdown_signal() => {
            r?;
            tracing::info!("shutting down");
            Ok(())
        }
    }
}

/// Runs the hub publisher if there is one; pends forever otherwise.
async fn run_optional(
    p: Option<&publisher::Publisher>,
    rx: tokio::sync::watch::Receiver<mesh_model::source::Snapshot>,
    allocator: publisher::SharedAllocator,
) {
    match p {
        Some(p) => p.run(rx, allocator).await,
        None => std::future::pending().await,
    }
}

/// Reads `--hub-config`: a peer file whose `prefix` is where this cluster publishes in the hub. A prefix that
/// is not `<kvstore-prefix>/clusters/<cluster>` is refused: peers would not find the records there.
fn read_hub_config(
    file: &std::path::Path,
    kvstore_prefix: &str,
    cluster: &str,
) -> anyhow::Result<mesh_kvstore::peer::RemoteConfig> {
    let text = std::fs::read_to_string(file).with_context(|| format!("--hub-config {}", file.display()))?;
    let cfg: mesh_kvstore::peer::RemoteConfig = mesh_model::yaml::from_str(&text)
        .map_err(|e| anyhow::anyhow!("--hub-config {}: {e}", file.display()))?;
    let cfg = cfg
        .checked(file.parent().unwrap_or_else(|| std::path::Path::new(".")))
        .map_err(|e| anyhow::anyhow!("--hub-config {}: {e}", file.display()))?;
    let want = mesh_kvstore::Keys::new(kvstore_prefix).hub_cluster_prefix(cluster);
    anyhow::ensure!(
        cfg.prefix.as_deref().map(|p| p.trim_end_matches('/')) == Some(want.as_str()),
        "--hub-config {}: prefix must be {want:?} (where peers read cluster {cluster} in the hub), not {:?}",
        file.display(),
        cfg.prefix.as_deref().unwrap_or("(none)")
    );
    Ok(cfg)
}

async fn shutdown_signal() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    Ok(())
}
