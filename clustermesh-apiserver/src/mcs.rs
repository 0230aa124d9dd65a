//! MCS API write-back (KEP-1645), with `--source kubernetes` only: what users of the Multi-Cluster Services API look
//! for in their cluster.
//!
//! * Every `ServiceExport` gets `status.conditions` (merge patch on `/status`, only when something changed):
//!   `Valid` (True when a Service of that name exists in the namespace and is not `ExternalName`; False with
//!   reason `ServiceNotFound` or `ServiceTypeNotSupported`) and, for valid exports, `Conflict` (True when the
//!   exported properties — ports by name/port/protocol, headless or ClusterSetIP — differ from those of the export
//!   that wins; the oldest export, by `ServiceExport` creation time, wins; reason `PortConflict` or
//!   `TypeConflict`, False with reason `NoConflicts` otherwise). Condition types of other writers are kept.
//! * Every service exported by at least one cluster (this one or a peer) gets a `multicluster.x-k8s.io/v1alpha1`
//!   `ServiceImport` of the same namespace/name when that namespace exists here: `spec.type` `ClusterSetIP`
//!   (`Headless` when the winning export's Service has no cluster IP), `spec.ports` from the winning export,
//!   `status.clusters` the clusters exporting it, and for a ClusterSetIP import `spec.ips`: one address of
//!   `--clusterset-cidr` (kept while the import lasts, also across restarts: read back from the ServiceImport;
//!   new ones by `mesh_model::clusterset::allocate`, the agents' choice too). Those it creates carry the label
//!   `app.kubernetes.io/managed-by: fleetmesh` and are deleted when no cluster exports the service any more;
//!   ServiceImports without that label are never touched.
//! * Every headless import of ours gets the exporting peers' backends as EndpointSlices ([`crate::slices`]): for
//!   each headless export of a peer, its reader also reads the peer's service record and backend slices of that
//!   service; a refused one keeps the service's last good backends.
//!
//! Peers learn this cluster's exports from an export record that the publisher writes with the cluster's other
//! records (`<prefix>/mcs/exports/v1/<cluster>/<ns>/<name>`, JSON [`ExportRecord`]: ports, headless, creation time
//! of the `ServiceExport`). The controller reads the peers' export records from their etcd, through the peer files
//! of `--mcs-peers` (the agents' clustermesh config format; a `prefix:` pointing at a KVStoreMesh cache works too).
//! A peer that cannot be read keeps its last listing, so an unreachable peer does not remove imports.
//!
//! The controller runs a pass after every change of the cluster's state, of a peer's exports, and every
//! `--mcs-resync`, at most one per `min(--mcs-resync, 1s)`. A pass lists ServiceExports, Services, ServiceImports
//! and Namespaces (no watches). Each peer's export records are listed every `--mcs-resync` by a task of its own. Until the first pass the publisher keeps the export records an earlier run left in
//! etcd, so a restart does not withdraw this cluster's exports from the peers for a moment.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use etcd_client::{Client as EtcdClient, ConnectOptions};
use k8s_openapi::api::core::v1::{Namespace, Service};
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams,
    PostParams,
};
use mesh_k8s::crd::ServiceExport;
use mesh_k8s::lenient::Lenient;
use mesh_kvstore::Keys;
use mesh_kvstore::peer::RemoteConfig;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::{Notify, watch};
use tracing::{debug, info, instrument, warn};

use crate::publisher::{EtcdTls, now_ms};

/// Label of the ServiceImports this controller owns.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "fleetmesh");

/// Prefix of `cluster`'s export records.
#[must_use]
pub fn exports_prefix(keys: &Keys, cluster: &str) -> String {
    format!("{}mcs/exports/v1/{cluster}/", keys.root())
}

/// A port of an exported service.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExportPort {
    #[serde(default)]
    pub name: String,
    pub port: u16,
    pub protocol: String,
}

/// One cluster's `ServiceExport` of a valid service, as published for the peers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExportRecord {
    pub cluster: String,
    pub namespace: String,
    pub name: String,
    /// Sorted by (name, port, protocol).
    pub ports: Vec<ExportPort>,
    /// The Service has no cluster IP (`clusterIP: None`).
    #[serde(default)]
    pub headless: bool,
    /// Creation time of the `ServiceExport` (Unix ms): the oldest export wins a conflict.
    pub exported_ms: u64,
}

/// Export records this cluster publishes (key → JSON), for the publisher.
pub type ExportRecords = BTreeMap<String, String>;

fn ar(kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("multicluster.x-k8s.io", "v1alpha1", kind),
        plural,
    )
}

/// A peer whose export records are read, every resync, by a task of its own (an unreachable peer does not hold
/// up the controller's passes).
struct Peer {
    name: String,
    cfg: RemoteConfig,
    keys: Keys,
    client: Option<EtcdClient>,
    /// Last good listing.
    exports: watch::Sender<Listing>,
    /// Woken when the listing changes.
    changed: Arc<Notify>,
}

impl Peer {
    /// Reads the peer's export records every `every`, forever.
    #[instrument(skip_all, fields(cluster = %self.name))]
    async fn poll(mut self, every: Duration) {
        let mut failing = false;
        loop {
            match self.refresh().await {
                Ok(()) if failing => {
                    info!("MCS: reading the peer's exports again");
                    failing = false;
                }
                Ok(()) => {}
                Err(e) if !failing => {
                    warn!(error = %format!("{e:#}"), "MCS: cannot read the peer's exports; keeping the last ones");
                    failing = true;
                }
                Err(e) => debug!(error = %format!("{e:#}"), "MCS: peer still unreadable"),
            }
            tokio::time::sleep(every).await;
        }
    }

    /// Reads the peer's export records and, for its headless exports, the backends it publishes for them.
    #[instrument(skip_all, fields(cluster = %self.name))]
    async fn refresh(&mut self) -> anyhow::Result<()> {
        if self.client.is_none() {
            let opts = ConnectOptions::new()
                .with_connect_timeout(Duration::from_secs(2))
                .with_timeout(Duration::from_secs(5));
            let opts = match &self.cfg.trusted_ca_file {
                Some(ca) => opts.with_tls(
                    EtcdTls {
                        ca: ca.clone(),
                        identity: self.cfg.cert_file.clone().zip(self.cfg.key_file.clone()),
                    }
                    .options()?,
                ),
                None => opts,
            };
            self.client = Some(EtcdClient::connect(&self.cfg.endpoints, Some(opts)).await?);
        }
        let client = self.client.as_ref().context("no client")?;
        let prefix = exports_prefix(&self.keys, &self.name);
        let listed = match mesh_kvstore::etcd::list_paged(client, &prefix).await {
            Ok((l, _)) => l,
            Err(e) => {
                self.client = None;
                return Err(e.into());
            }
        };
        let mut exports = Vec::new();
        for (key, value) in listed {
            match serde_json::from_slice::<ExportRecord>(&value) {
                Ok(r) if r.cluster == self.name && key == format!("{prefix}{}/{}", r.namespace, r.name) => {
                    exports.push(r);
                }
                Ok(_) => warn!(key, "export record does not match its key; ignored"),
                Err(e) => warn!(key, error = %e, "malformed export record; ignored"),
            }
        }
        let previous = self.exports.borrow().headless.clone();
        let mut headless = BTreeMap::new();
        for e in exports.iter().filter(|e| e.headless) {
            let id = (e.namespace.clone(), e.name.clone());
            match self.backends_of(client, &e.namespace, &e.name).await {
                Ok(Ok(Some(b))) => {
                    headless.insert(id, b);
                }
                Ok(Ok(None)) => {}
                Ok(Err(reason)) => {
                    let n = REFUSED_RECORDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                    // Bad input never loses what we had: the service's last good backends stay.
                    warn!(namespace = %e.namespace, name = %e.name, reason, refused_total = n,
                        "MCS: refused the peer's service record or backend slice; keeping its last backends");
                    if let Some(old) = previous.get(&id) {
                        headless.insert(id, old.clone());
                    }
                }
                Err(err) => {
                    self.client = None;
                    return Err(err);
                }
            }
        }
        let listing = Listing { exports, headless };
        if self.exports.send_if_modified(|old| {
            let changed = *old != listing;
            *old = listing;
            changed
        }) {
            self.changed.notify_one();
        }
        Ok(())
    }

    /// The backends the peer publishes for its service `ns/name` (service record and backend slices): `Ok(Ok(None))`
    /// when it has no record, `Ok(Err(reason))` when a record or slice is refused, `Err` when etcd fails.
    async fn backends_of(
        &self,
        client: &EtcdClient,
        ns: &str,
        name: &str,
    ) -> anyhow::Result<Result<Option<crate::slices::PeerBackends>, String>> {
        let key = self.keys.service(&self.name, ns, name);
        let got = client
            .kv_client()
            .get(key.as_str(), None)
            .await
            .with_context(|| format!("reading {key}"))?;
        let Some(kv) = got.kvs().first() else {
            return Ok(Ok(None));
        };
        let rec = match mesh_kvstore::decode_service(&key, &self.name, ns, name, kv.value()) {
            Ok(r) => r,
            Err(e) => return Ok(Err(e.to_string())),
        };
        let prefix = format!("{}{ns}/{name}/", self.keys.backend_slices_prefix(&self.name));
        let (listed, _) = mesh_kvstore::etcd::list_paged(client, &prefix)
            .await
            .with_context(|| format!("listing {prefix}"))?;
        let mut backends = rec.backends;
        for (k, v) in listed {
            let Some(index) = k.strip_prefix(&prefix).and_then(|i| i.parse::<u32>().ok()) else {
                return Ok(Err(format!("{k}: not a backend slice key")));
            };
            match mesh_kvstore::decode_backend_slice(&k, &self.name, ns, name, index, &v) {
                Ok(slice) => backends.extend(slice.backends),
                Err(e) => return Ok(Err(e.to_string())),
            }
        }
        let hostnames = rec.mcs.map(|m| m.hostnames).unwrap_or_default();
        Ok(Ok(Some(crate::slices::PeerBackends::new(backends, hostnames))))
    }
}

/// Peers' service records and backend slices refused so far (bad input; the last good backends were kept).
pub static REFUSED_RECORDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// What a peer's reader last listed: its export records and, for its headless exports, its backends.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listing {
    pub exports: Vec<ExportRecord>,
    /// (namespace, name) → the backends of the peer's service record of a headless export.
    pub headless: BTreeMap<(String, String), crate::slices::PeerBackends>,
}

/// Aborts its task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A peer whose exports are being read.
struct RunningPeer {
    cfg: RemoteConfig,
    /// Its last good listing.
    exports: watch::Receiver<Listing>,
    /// The reader; stopped when the peer is dropped.
    _task: AbortOnDrop,
}

/// The MCS controller.
pub struct Controller {
    pub client: kube::Client,
    pub cluster: String,
    pub keys: Keys,
    pub resync: Duration,
    /// `--mcs-peers`: read again at every resync, so peers connected or disconnected later (`meshctl clustermesh
    /// connect`, `helm upgrade`) are followed without a restart.
    peers_dir: Option<PathBuf>,
    /// The running reader of every peer, by cluster name.
    peers: BTreeMap<String, RunningPeer>,
    peers_changed: Arc<Notify>,
    /// First time a `ServiceExport` without a creation timestamp was seen.
    first_seen: HashMap<(String, String), u64>,
    records: watch::Sender<Option<ExportRecords>>,
    /// Where the ClusterSetIPs of the ServiceImports (`spec.ips`) come from (`--clusterset-cidr`).
    pub clusterset_cidr: ipnet::Ipv4Net,
}

/// A `ServiceExport` and what it carries now.
struct LocalExport {
    namespace: String,
    name: String,
    generation: Option<i64>,
    conditions: Vec<Value>,
    /// `Err((reason, message))` when invalid.
    export: Result<ExportRecord, (&'static str, String)>,
}

impl Controller {
    /// A controller reading the peers of `peers_dir` (if any); the publisher gets the export records through
    /// `records`.
    pub fn new(
        client: kube::Client,
        cluster: String,
        keys: Keys,
        resync: Duration,
        peers_dir: Option<&Path>,
        records: watch::Sender<Option<ExportRecords>>,
    ) -> Self {
        Self {
            client,
            cluster,
            keys,
            resync,
            peers_dir: peers_dir.map(Path::to_path_buf),
            peers: BTreeMap::new(),
            peers_changed: Arc::new(Notify::new()),
            first_seen: HashMap::new(),
            records,
            clusterset_cidr: mesh_model::clusterset::DEFAULT_CLUSTERSET_CIDR
                .parse()
                .unwrap_or_else(|_| ipnet::Ipv4Net::default()),
        }
    }

    /// Reads `--mcs-peers` and starts, restarts (config changed) or stops the readers to match. An unreadable
    /// directory or file is logged and changes nothing: the readers running keep their last exports.
    fn sync_peers(&mut self) {
        let Some(dir) = &self.peers_dir else { return };
        let (configs, errors) = mesh_kvstore::peer::read_config_dir(dir, &self.cluster);
        for e in &errors {
            warn!(error = %e, "--mcs-peers config");
        }
        if configs.is_empty() && !errors.is_empty() {
            return;
        }
        let before = self.peers.len();
        // A peer whose file does not read right now keeps its reader (and last exports) until the file is fixed.
        let unreadable = |name: &str| {
            let file = dir.join(name).display().to_string();
            errors.iter().any(|e| e.starts_with(&file))
        };
        self.peers.retain(|name, p| {
            let keep = configs.get(name) == Some(&p.cfg) || (!configs.contains_key(name) && unreadable(name));
            if !keep {
                info!(cluster = %name, "MCS: no longer reading the exports of cluster (removed or changed)");
            }
            keep
        });
        let mut changed = self.peers.len() != before;
        for (name, cfg) in configs {
            if self.peers.contains_key(&name) {
                continue;
            }
            info!(cluster = %name, endpoints = ?cfg.endpoints, "MCS: reading the exports of cluster");
            let keys = cfg.prefix.as_deref().map_or_else(|| self.keys.clone(), Keys::new);
            let (tx, rx) = watch::channel(Listing::default());
            let reader = Peer {
                name: name.clone(),
                cfg: cfg.clone(),
                keys,
                client: None,
                exports: tx,
                changed: self.peers_changed.clone(),
            };
            let task = AbortOnDrop(tokio::spawn(reader.poll(self.resync)));
            self.peers.insert(
                name,
                RunningPeer {
                    cfg,
                    exports: rx,
                    _task: task,
                },
            );
            changed = true;
        }
        if changed {
            // Exports of a removed peer stop counting at once; a new peer's once it answered.
            self.peers_changed.notify_one();
        }
    }

    /// Runs a pass after every change of `changes` and every resync, forever.
    /// Passes are at least `min(resync, 1s)` apart, so that a busy cluster (pod churn changes its state often)
    /// does not turn into a stream of lists.
    #[instrument(skip_all, fields(cluster = %self.cluster))]
    pub async fn run<T>(mut self, mut changes: watch::Receiver<T>) {
        let mut tick = tokio::time::interval(self.resync);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let gap = self.resync.min(Duration::from_secs(1));
        let peers_changed = self.peers_changed.clone();
        let mut open = true;
        loop {
            let resync = if open {
                tokio::select! {
                    _ = tick.tick() => true,
                    () = peers_changed.notified() => false,
                    r = changes.changed() => { open = r.is_ok(); false }
                }
            } else {
                tokio::select! {
                    _ = tick.tick() => true,
                    () = peers_changed.notified() => false,
                }
            };
            if resync {
                self.sync_peers();
            }
            let next = tokio::time::Instant::now() + gap;
            if let Err(e) = self.pass().await {
                warn!(error = %format!("{e:#}"), "MCS pass failed; retrying on the next change or resync");
            }
            tokio::time::sleep_until(next).await;
        }
    }

    #[instrument(skip_all)]
    async fn pass(&mut self) -> anyhow::Result<()> {
        let lp = ListParams::default();
        let ses = match Api::<Lenient<ServiceExport>>::all(self.client.clone())
            .list(&lp)
            .await
        {
            Ok(l) => l.items,
            Err(kube::Error::Api(e)) if e.code == 404 => {
                debug!("ServiceExport not served (MCS CRDs not installed)");
                Vec::new()
            }
            Err(e) => return Err(e).context("listing ServiceExports"),
        };
        let services: BTreeMap<(String, String), Service> = Api::<Service>::all(self.client.clone())
            .list(&lp)
            .await
            .context("listing Services")?
            .items
            .into_iter()
            .filter_map(|s| Some(((s.metadata.namespace.clone()?, s.metadata.name.clone()?), s)))
            .collect();
        let mut locals = Vec::new();
        let mut records = ExportRecords::new();
        for se in &ses {
            let (Some(ns), Some(name)) = (se.metadata.namespace.clone(), se.metadata.name.clone()) else {
                continue;
            };
            let exported_ms = se
                .metadata
                .creation_timestamp
                .as_ref()
                .and_then(|t| u64::try_from(t.0.as_millisecond()).ok())
                .unwrap_or_else(|| {
                    *self
                        .first_seen
                        .entry((ns.clone(), name.clone()))
                        .or_insert_with(now_ms)
                });
            let export = match services.get(&(ns.clone(), name.clone())) {
                None => Err(("ServiceNotFound", format!("Service {ns}/{name} does not exist"))),
                Some(svc) => export_of(&self.cluster, svc, exported_ms),
            };
            if let Ok(r) = &export {
                records.insert(
                    format!("{}{ns}/{name}", exports_prefix(&self.keys, &self.cluster)),
                    serde_json::to_string(r)?,
                );
            }
            locals.push(LocalExport {
                namespace: ns,
                name,
                generation: se.metadata.generation,
                conditions: se.raw["status"]["conditions"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default(),
                export,
            });
        }
        self.first_seen.retain(|k, _| {
            locals
                .iter()
                .any(|l| (l.namespace.as_str(), l.name.as_str()) == (k.0.as_str(), k.1.as_str()))
        });
        self.records.send_if_modified(|r| {
            let changed = r.as_ref() != Some(&records);
            *r = Some(records);
            changed
        });

        // Every valid export of every cluster, by service.
        let peers: Vec<ExportRecord> = self
            .peers
            .values()
            .flat_map(|p| p.exports.borrow().exports.clone())
            .collect();
        let peer_backends: BTreeMap<(String, String, String), crate::slices::PeerBackends> = self
            .peers
            .iter()
            .flat_map(|(c, p)| {
                p.exports
                    .borrow()
                    .headless
                    .iter()
                    .map(|((ns, n), b)| ((c.clone(), ns.clone(), n.clone()), b.clone()))
                    .collect::<Vec<_>>()
            })
            .collect();
        let mut by_service: BTreeMap<(String, String), Vec<ExportRecord>> = BTreeMap::new();
        for e in locals
            .iter()
            .filter_map(|l| l.export.as_ref().ok())
            .chain(peers.iter())
        {
            by_service
                .entry((e.namespace.clone(), e.name.clone()))
                .or_default()
                .push(e.clone());
        }
        for v in by_service.values_mut() {
            v.sort_by(|a, b| (a.exported_ms, &a.cluster).cmp(&(b.exported_ms, &b.cluster)));
        }

        for l in &locals {
            let wanted = conditions(l, by_service.get(&(l.namespace.clone(), l.name.clone())));
            if let Some(body) = status_patch(&l.conditions, &wanted, l.generation) {
                let api = Api::<Lenient<ServiceExport>>::namespaced(self.client.clone(), &l.namespace);
                match api
                    .patch_status(&l.name, &PatchParams::default(), &Patch::Merge(&body))
                    .await
                {
                    Ok(_) => debug!(namespace = %l.namespace, name = %l.name, "ServiceExport status written"),
                    Err(e) => warn!(namespace = %l.namespace, name = %l.name, error = %e,
                        "cannot patch the ServiceExport's status (does the role grant patch on serviceexports/status?)"),
                }
            }
        }
        self.sync_imports(&by_service, &peer_backends).await
    }

    #[instrument(skip_all, fields(services = by_service.len()))]
    async fn sync_imports(
        &self,
        by_service: &BTreeMap<(String, String), Vec<ExportRecord>>,
        peer_backends: &BTreeMap<(String, String, String), crate::slices::PeerBackends>,
    ) -> anyhow::Result<()> {
        let si_ar = ar("ServiceImport", "serviceimports");
        let lp = ListParams::default();
        let imports = match Api::<DynamicObject>::all_with(self.client.clone(), &si_ar)
            .list(&lp)
            .await
        {
            Ok(l) => l.items,
            Err(kube::Error::Api(e)) if e.code == 404 => {
                if !by_service.is_empty() {
                    warn!("ServiceImport not served (MCS CRDs not installed): no imports written");
                }
                return Ok(());
            }
            Err(e) => return Err(e).context("listing ServiceImports"),
        };
        let namespaces: BTreeSet<String> = Api::<Namespace>::all(self.client.clone())
            .list(&lp)
            .await
            .context("listing Namespaces")?
            .items
            .into_iter()
            .filter_map(|n| n.metadata.name)
            .collect();
        let existing: BTreeMap<(String, String), &DynamicObject> = imports
            .iter()
            .filter_map(|i| Some(((i.metadata.namespace.clone()?, i.metadata.name.clone()?), i)))
            .collect();
        let ours = |o: &DynamicObject| {
            o.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(MANAGED_BY.0))
                .is_some_and(|v| v == MANAGED_BY.1)
        };
        // ClusterSetIPs: what our ServiceImports carry stays (stable across restarts), new imports get one by
        // `mesh_model::clusterset::allocate` (the same choice the agents make), gone ones release theirs.
        let held: BTreeMap<(String, String), std::net::Ipv4Addr> = existing
            .iter()
            .filter(|(_, o)| ours(o))
            .filter_map(|(k, o)| Some((k.clone(), o.data["spec"]["ips"][0].as_str()?.parse().ok()?)))
            .collect();
        let wanted: BTreeSet<(String, String)> = by_service
            .iter()
            .filter(|((ns, _), exports)| {
                namespaces.contains(ns) && exports.first().is_some_and(|w| !w.headless)
            })
            .filter(|(k, _)| existing.get(*k).is_none_or(|o| ours(o)))
            .map(|(k, _)| k.clone())
            .collect();
        let (ips, left) = mesh_model::clusterset::allocate_partial(self.clusterset_cidr, &wanted, &held);
        if !left.is_empty() {
            warn!(range = %self.clusterset_cidr, unallocated = left.len(), "the clusterset range is full: ServiceImports without spec.ips");
        }
        for ((ns, name), exports) in by_service {
            if !namespaces.contains(ns) {
                continue;
            }
            let Some(winner) = exports.first() else { continue };
            let mut spec = json!({
                "type": if winner.headless { "Headless" } else { "ClusterSetIP" },
                "ports": winner.ports.iter().map(|p| {
                    let mut port = json!({"port": p.port, "protocol": p.protocol});
                    if !p.name.is_empty() {
                        port["name"] = json!(p.name);
                    }
                    port
                }).collect::<Vec<_>>(),
            });
            if let Some(ip) = ips.get(&(ns.clone(), name.clone())) {
                spec["ips"] = json!([ip.to_string()]);
            }
            let clusters: BTreeSet<&str> = exports.iter().map(|e| e.cluster.as_str()).collect();
            let status =
                json!({"clusters": clusters.iter().map(|c| json!({"cluster": c})).collect::<Vec<_>>()});
            let api = Api::<DynamicObject>::namespaced_with(self.client.clone(), ns, &si_ar);
            match existing.get(&(ns.clone(), name.clone())) {
                Some(o) if !ours(o) => {
                    debug!(namespace = %ns, name = %name, "ServiceImport not created by fleetmesh; left alone");
                }
                Some(o) => {
                    if o.data.get("spec") != Some(&spec) {
                        api.patch(
                            name,
                            &PatchParams::default(),
                            &Patch::Merge(&json!({"spec": spec})),
                        )
                        .await
                        .with_context(|| format!("patching ServiceImport {ns}/{name}"))?;
                        info!(namespace = %ns, name = %name, "ServiceImport updated");
                    }
                    if o.data.get("status") != Some(&status) {
                        api.patch_status(
                            name,
                            &PatchParams::default(),
                            &Patch::Merge(&json!({"status": status})),
                        )
                        .await
                        .with_context(|| format!("patching the status of ServiceImport {ns}/{name}"))?;
                    }
                }
                None => {
                    let mut obj = DynamicObject::new(name, &si_ar).within(ns);
                    obj.metadata.labels = Some([(MANAGED_BY.0.to_owned(), MANAGED_BY.1.to_owned())].into());
                    obj.data = json!({"spec": spec});
                    api.create(&PostParams::default(), &obj)
                        .await
                        .with_context(|| format!("creating ServiceImport {ns}/{name}"))?;
                    api.patch_status(
                        name,
                        &PatchParams::default(),
                        &Patch::Merge(&json!({"status": status})),
                    )
                    .await
                    .with_context(|| format!("writing the status of ServiceImport {ns}/{name}"))?;
                    info!(namespace = %ns, name = %name, clusters = ?clusters, "ServiceImport created");
                }
            }
        }
        // Headless imports of ours: the exporting peers' backends as EndpointSlices (crate::slices).
        let headless: BTreeMap<(String, String), BTreeSet<String>> = by_service
            .iter()
            .filter(|((ns, _), exports)| {
                namespaces.contains(ns) && exports.first().is_some_and(|w| w.headless)
            })
            .filter(|(k, _)| existing.get(*k).is_none_or(|o| ours(o)))
            .map(|(k, exports)| (k.clone(), exports.iter().map(|e| e.cluster.clone()).collect()))
            .collect();
        let slices = crate::slices::wanted(&self.cluster, &headless, peer_backends);
        let slices_result = crate::slices::sync(&self.client, &slices).await;
        for ((ns, name), o) in &existing {
            if ours(o) && !by_service.contains_key(&(ns.clone(), name.clone())) {
                let api = Api::<DynamicObject>::namespaced_with(self.client.clone(), ns, &si_ar);
                match api.delete(name, &DeleteParams::default()).await {
                    Ok(_) => {
                        info!(namespace = %ns, name = %name, "ServiceImport deleted: no cluster exports it")
                    }
                    Err(kube::Error::Api(e)) if e.code == 404 => {}
                    Err(e) => return Err(e).with_context(|| format!("deleting ServiceImport {ns}/{name}")),
                }
            }
        }
        slices_result
    }
}

/// The export of `svc`, or why it cannot be exported.
fn export_of(cluster: &str, svc: &Service, exported_ms: u64) -> Result<ExportRecord, (&'static str, String)> {
    let spec = svc.spec.clone().unwrap_or_default();
    let ns = svc.metadata.namespace.clone().unwrap_or_default();
    let name = svc.metadata.name.clone().unwrap_or_default();
    if spec.type_.as_deref() == Some("ExternalName") {
        return Err((
            "ServiceTypeNotSupported",
            format!("Service {ns}/{name} is of type ExternalName, which cannot be exported"),
        ));
    }
    let mut ports: Vec<ExportPort> = spec
        .ports
        .unwrap_or_default()
        .into_iter()
        .filter_map(|p| {
            Some(ExportPort {
                name: p.name.unwrap_or_default(),
                port: u16::try_from(p.port).ok()?,
                protocol: p.protocol.unwrap_or_else(|| "TCP".to_owned()),
            })
        })
        .collect();
    ports.sort();
    Ok(ExportRecord {
        cluster: cluster.to_owned(),
        namespace: ns,
        name,
        ports,
        headless: spec.cluster_ip.as_deref() == Some("None"),
        exported_ms,
    })
}

/// A condition without its transition time: (type, status, reason, message).
type Cond = (&'static str, &'static str, &'static str, String);

/// The conditions of a local export, given every valid export of its service (oldest first).
fn conditions(l: &LocalExport, exports: Option<&Vec<ExportRecord>>) -> Vec<Cond> {
    let mine = match &l.export {
        Err((reason, message)) => return vec![("Valid", "False", reason, message.clone())],
        Ok(r) => r,
    };
    let valid = (
        "Valid",
        "True",
        "ServiceExported",
        format!("Service {}/{} is exported", l.namespace, l.name),
    );
    let conflict = match exports.and_then(|e| e.first()) {
        Some(w) if w.cluster != mine.cluster && w.ports != mine.ports => (
            "Conflict",
            "True",
            "PortConflict",
            format!(
                "ports differ from those of the oldest export (cluster {}), which are used: {}",
                w.cluster,
                describe(&w.ports)
            ),
        ),
        Some(w) if w.cluster != mine.cluster && w.headless != mine.headless => (
            "Conflict",
            "True",
            "TypeConflict",
            format!(
                "service type differs from that of the oldest export (cluster {}), which is used: {}",
                w.cluster,
                if w.headless { "Headless" } else { "ClusterSetIP" }
            ),
        ),
        _ => (
            "Conflict",
            "False",
            "NoConflicts",
            "no conflicting exports".to_owned(),
        ),
    };
    vec![valid, conflict]
}

fn describe(ports: &[ExportPort]) -> String {
    ports
        .iter()
        .map(|p| {
            if p.name.is_empty() {
                format!("{}/{}", p.port, p.protocol)
            } else {
                format!("{}:{}/{}", p.name, p.port, p.protocol)
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

const OUR_TYPES: [&str; 2] = ["Valid", "Conflict"];

/// The merge patch that gives an export the `wanted` conditions, or `None` when it carries them already. A
/// condition keeps its `lastTransitionTime` while its status stays; conditions of other types are kept.
fn status_patch(current: &[Value], wanted: &[Cond], generation: Option<i64>) -> Option<Value> {
    let find = |t: &str| current.iter().find(|c| c["type"] == t);
    let mut same = current
        .iter()
        .filter(|c| c["type"].as_str().is_some_and(|t| OUR_TYPES.contains(&t)))
        .count()
        == wanted.len();
    let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now());
    let now = serde_json::to_value(now).unwrap_or(Value::Null);
    let mut out: Vec<Value> = current
        .iter()
        .filter(|c| !c["type"].as_str().is_some_and(|t| OUR_TYPES.contains(&t)))
        .cloned()
        .collect();
    for (t, status, reason, message) in wanted {
        let cur = find(t);
        let unchanged = cur.is_some_and(|c| {
            c["status"] == *status
                && c["reason"] == *reason
                && c["message"] == *message.as_str()
                && c["observedGeneration"].as_i64() == generation
        });
        same &= unchanged;
        let ltt = match cur {
            Some(c) if c["status"] == *status && !c["lastTransitionTime"].is_null() => {
                c["lastTransitionTime"].clone()
            }
            _ => now.clone(),
        };
        out.push(json!({
            "type": t,
            "status": status,
            "reason": reason,
            "message": message,
            "lastTransitionTime": ltt,
            "observedGeneration": generation,
        }));
    }
    (!same).then(|| json!({"status": {"conditions": out}}))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(cluster: &str, port: u16, headless: bool, exported_ms: u64) -> ExportRecord {
        ExportRecord {
            cluster: cluster.into(),
            namespace: "shop".into(),
            name: "api".into(),
            ports: vec![ExportPort {
                name: "http".into(),
                port,
                protocol: "TCP".into(),
            }],
            headless,
            exported_ms,
        }
    }

    fn local(r: &ExportRecord) -> LocalExport {
        LocalExport {
            namespace: "shop".into(),
            name: "api".into(),
            generation: Some(1),
            conditions: Vec::new(),
            export: Ok(r.clone()),
        }
    }

    #[test]
    fn the_oldest_export_wins_and_the_others_conflict() {
        let mine = rec("east", 80, false, 20);
        // Same ports, other type, older: a type conflict.
        let peers = vec![rec("west", 80, true, 10), mine.clone()];
        let c = conditions(&local(&mine), Some(&peers));
        assert_eq!((c[1].0, c[1].1, c[1].2), ("Conflict", "True", "TypeConflict"));
        // Other ports, newer: this export wins, no conflict here.
        let peers = vec![mine.clone(), rec("west", 81, false, 30)];
        let c = conditions(&local(&mine), Some(&peers));
        assert_eq!((c[1].0, c[1].1, c[1].2), ("Conflict", "False", "NoConflicts"));
        // Invalid: only Valid.
        let mut bad = local(&mine);
        bad.export = Err(("ServiceNotFound", "gone".into()));
        let c = conditions(&bad, Some(&peers));
        assert_eq!(c.len(), 1);
        assert_eq!((c[0].0, c[0].1, c[0].2), ("Valid", "False", "ServiceNotFound"));
    }

    #[test]
    fn status_patch_only_on_change() {
        let wanted: Vec<Cond> = vec![
            ("Valid", "True", "ServiceExported", "ok".into()),
            ("Conflict", "False", "NoConflicts", "none".into()),
        ];
        let first = status_patch(&[], &wanted, Some(1)).expect("a patch");
        let written = first["status"]["conditions"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert_eq!(written.len(), 2);
        assert!(status_patch(&written, &wanted, Some(1)).is_none());
        // A new generation is a change; the transition time stays.
        let again = status_patch(&written, &wanted, Some(2)).expect("a patch");
        assert_eq!(
            again["status"]["conditions"][0]["lastTransitionTime"],
            written[0]["lastTransitionTime"]
        );
        // Other writers' conditions are kept.
        let mut foreign = written;
        foreign.push(json!({"type": "Ready", "status": "True"}));
        assert!(status_patch(&foreign, &wanted, Some(1)).is_none());
        let invalid: Vec<Cond> = vec![("Valid", "False", "ServiceNotFound", "gone".into())];
        let p = status_patch(&foreign, &invalid, Some(1)).expect("a patch");
        let types: Vec<&str> = p["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c["type"].as_str())
            .collect();
        assert_eq!(types, ["Ready", "Valid"]);
    }
}
