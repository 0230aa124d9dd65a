//! Watchers of remote clusters' etcd.
//!
//! Per remote cluster one task: connect, list everything the cluster publishes, then watch from the listed
//! revision. Its state is explicit (connecting, syncing, synced, disconnected with since/why). A full list is the
//! truth only once the remote's "synced" marker is seen; before that, listed data only adds. On any error the
//! watcher keeps what it had (established traffic keeps flowing), backs off, and lists again on reconnect, which
//! removes exactly what disappeared meanwhile. Malformed values are skipped with a logged reason and a counter.
//!
//! Besides nodes and services, a watcher follows the cluster's security identities and pod addresses (ips). The
//! agent also watches its own cluster's etcd (`--kvstore-config`, [`manage_own`]), for identities, ips and pod
//! capacities only: its own nodes and services come from its source, so that watcher ignores them. Capacities are
//! kept for this cluster only (the source shows the agent the pods of its node; the records give the capacity of
//! the other nodes' backends); a peer cluster's backends come with their weights in its service records.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use etcd_client::{Client, ConnectOptions, EventType, GetOptions, WatchOptions};
use mesh_kvstore::{ClusterConfig, IdentityRecord, IpRecord, KeyKind, Keys, NodeRecord, ServiceRecord};
use serde::Serialize;
use tokio::task::JoinHandle;
use tracing::{debug, info, instrument, warn};

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

static KEEPALIVE_INTERVAL: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();

/// Sets how often watchers ping remote etcd servers (process-wide, before any watcher starts). A dead peer is
/// noticed after about one interval plus the timeout. etcd refuses clients that ping more often than its
/// `--grpc-keepalive-min-time` (5 s by default).
pub fn set_keepalive_interval(d: Duration) {
    let _ = KEEPALIVE_INTERVAL.set(d);
}

fn keepalive_interval() -> Duration {
    KEEPALIVE_INTERVAL
        .get()
        .copied()
        .unwrap_or(Duration::from_secs(6))
}

/// Connection state of a remote cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase", tag = "state")]
pub enum SyncState {
    Connecting { since_ms: u64 },
    Syncing { since_ms: u64 },
    Synced { since_ms: u64 },
    Disconnected { since_ms: u64, reason: String },
}

/// What this agent knows about one remote cluster.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RemoteCluster {
    pub name: String,
    pub state: SyncState,
    pub config: Option<ClusterConfig>,
    /// Records are shared (`Arc`): publishing a session's view and taking snapshots copy pointers, not records.
    pub nodes: BTreeMap<String, Arc<NodeRecord>>,
    /// Global services the cluster shares, by `namespace/name`.
    pub services: BTreeMap<String, Arc<ServiceRecord>>,
    /// Security identities of the cluster, by full identity (the status reports their number).
    #[serde(rename = "identityCount", serialize_with = "count")]
    pub identities: BTreeMap<u32, Arc<IdentityRecord>>,
    /// The cluster's pod addresses and their identities (the status reports their number).
    #[serde(rename = "ipCount", serialize_with = "count")]
    pub ips: BTreeMap<Ipv4Addr, Arc<IpRecord>>,
    /// Capacities other than 1 of the cluster's pods, by address (this cluster only; empty for a peer).
    #[serde(skip)]
    pub capacities: BTreeMap<Ipv4Addr, u32>,
    /// Whether its data may be used (false after an identity conflict).
    pub usable: bool,
    /// Values skipped, by reason.
    pub decode_errors: BTreeMap<String, u64>,
    /// Set when the connection broke (or never came up); cleared when the cluster is synced again. After the
    /// grace period its backends are withdrawn from global services.
    pub unreachable_since_ms: Option<u64>,
    /// Unix ms of the last answer from the cluster's etcd (watch event or liveness probe).
    pub last_alive_ms: Option<u64>,
    /// Number of (re)connections that reached the synced state.
    pub syncs: u64,
}

/// One remote cluster in numbers (see [`Remotes::briefs`]).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RemoteBrief {
    pub name: String,
    /// This cluster's own etcd (`--kvstore-config`), not a peer.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub own: bool,
    pub state: SyncState,
    pub usable: bool,
    pub nodes: usize,
    pub services: usize,
    pub identities: usize,
    pub ips: usize,
    /// Values skipped as malformed, all reasons together.
    pub decode_errors: u64,
    pub last_alive_ms: Option<u64>,
    pub syncs: u64,
}

impl RemoteBrief {
    fn of(r: &RemoteCluster, own: bool) -> Self {
        Self {
            name: r.name.clone(),
            own,
            state: r.state.clone(),
            usable: r.usable,
            nodes: r.nodes.len(),
            services: r.services.len(),
            identities: r.identities.len(),
            ips: r.ips.len(),
            decode_errors: r.decode_errors.values().sum(),
            last_alive_ms: r.last_alive_ms,
            syncs: r.syncs,
        }
    }
}

/// Serializes a map as its size (the status stays small whatever the size of the mesh).
fn count<K, V, S: serde::Serializer>(map: &BTreeMap<K, V>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(u64::try_from(map.len()).unwrap_or(u64::MAX))
}

impl RemoteCluster {
    #[must_use]
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            state: SyncState::Connecting { since_ms: now_ms() },
            config: None,
            nodes: BTreeMap::new(),
            services: BTreeMap::new(),
            identities: BTreeMap::new(),
            ips: BTreeMap::new(),
            capacities: BTreeMap::new(),
            unreachable_since_ms: None,
            last_alive_ms: None,
            usable: true,
            decode_errors: BTreeMap::new(),
            syncs: 0,
        }
    }

    /// Refuses the cluster's data: none of it is used (every record dropped, `usable` false) and the state says why.
    fn refuse(&mut self, reason: String) {
        self.usable = false;
        self.nodes.clear();
        self.services.clear();
        self.identities.clear();
        self.ips.clear();
        self.capacities.clear();
        self.state = SyncState::Disconnected {
            since_ms: now_ms(),
            reason,
        };
    }
}

pub use mesh_kvstore::peer::{RemoteConfig, read_config_dir};

/// TLS options from a peer config's files (read at each connection, so renewed certificates are picked up).
fn tls_options(cfg: &RemoteConfig) -> anyhow::Result<Option<etcd_client::TlsOptions>> {
    use anyhow::Context as _;
    let Some(ca) = &cfg.trusted_ca_file else {
        return Ok(None);
    };
    let read = |p: &Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
    let mut tls =
        etcd_client::TlsOptions::new().ca_certificate(etcd_client::Certificate::from_pem(read(ca)?));
    if let (Some(cert), Some(key)) = (&cfg.cert_file, &cfg.key_file) {
        tls = tls.identity(etcd_client::Identity::from_pem(read(cert)?, read(key)?));
    }
    Ok(Some(tls))
}

/// Shared view of all remote clusters, plus a wake-up for the reconciler.
#[derive(Clone)]
pub struct Remotes {
    inner: Arc<Mutex<BTreeMap<String, RemoteCluster>>>,
    /// This cluster, as its own etcd has it (`--kvstore-config`): identities and ips only. At most one entry; kept
    /// apart so that nothing that iterates remote clusters (ipcache prefixes, global services) ever sees it.
    own: Arc<Mutex<BTreeMap<String, RemoteCluster>>>,
    /// Set once the clustermesh config has been read: until then "no remote clusters" means "not known yet".
    configured: Arc<std::sync::atomic::AtomicBool>,
    wake: std::sync::mpsc::Sender<()>,
}

impl Remotes {
    #[must_use]
    pub fn new(wake: std::sync::mpsc::Sender<()>) -> Self {
        Self {
            inner: Arc::default(),
            own: Arc::default(),
            configured: Arc::default(),
            wake,
        }
    }

    fn map(&self, slot: Slot) -> &Mutex<BTreeMap<String, RemoteCluster>> {
        match slot {
            Slot::Remote => &self.inner,
            Slot::Own => &self.own,
        }
    }

    /// A compact view of every remote cluster (and of this cluster's own etcd as the entry with `own: true`),
    /// made under the lock without copying any record: what `GET /v1/summary` and `meshctl status` show.
    #[must_use]
    pub fn briefs(&self) -> Vec<RemoteBrief> {
        let mut out: Vec<RemoteBrief> = self
            .inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .map(|r| RemoteBrief::of(r, false))
            .collect();
        out.extend(
            self.own
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .values()
                .map(|r| RemoteBrief::of(r, true)),
        );
        out
    }

    /// This cluster's identities and ips, from its own etcd (`None` without `--kvstore-config`). Its nodes and
    /// services are always empty: they come from the agent's source.
    #[must_use]
    pub fn own(&self) -> Option<RemoteCluster> {
        self.own
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .next()
            .cloned()
    }

    /// Whether the configured set of remote clusters is known (the config was read at least once).
    #[must_use]
    pub fn configured(&self) -> bool {
        self.configured.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Marks the set of remote clusters as known (an agent without a clustermesh config has none).
    pub fn set_configured(&self) {
        self.configured.store(true, std::sync::atomic::Ordering::Release);
        let _ = self.wake.send(());
    }

    pub fn snapshot(&self) -> BTreeMap<String, RemoteCluster> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    fn update(&self, name: &str, f: impl FnOnce(&mut RemoteCluster)) {
        self.update_in(Slot::Remote, name, f);
    }

    fn update_in(&self, slot: Slot, name: &str, f: impl FnOnce(&mut RemoteCluster)) {
        {
            let mut g = self.map(slot).lock().unwrap_or_else(PoisonError::into_inner);
            let rc = g
                .entry(name.to_owned())
                .or_insert_with(|| RemoteCluster::new(name));
            f(rc);
        }
        let _ = self.wake.send(());
    }

    /// As `update`, without waking the reconciler (for bookkeeping that changes no desired state).
    fn note(&self, slot: Slot, name: &str, f: impl FnOnce(&mut RemoteCluster)) {
        let mut g = self.map(slot).lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(rc) = g.get_mut(name) {
            f(rc);
        }
    }

    /// As `update`, with a view of the other clusters of the same slot (under the same lock).
    fn update_with_others(
        &self,
        slot: Slot,
        name: &str,
        f: impl FnOnce(&mut RemoteCluster, &BTreeMap<String, RemoteCluster>),
    ) {
        {
            let mut g = self.map(slot).lock().unwrap_or_else(PoisonError::into_inner);
            let mut rc = g.remove(name).unwrap_or_else(|| RemoteCluster::new(name));
            f(&mut rc, &g);
            g.insert(name.to_owned(), rc);
        }
        let _ = self.wake.send(());
    }

    fn remove(&self, slot: Slot, name: &str) {
        self.map(slot)
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(name);
        let _ = self.wake.send(());
    }
}

/// Starts and stops watchers as the clustermesh config directory changes.
pub async fn manage(dir: PathBuf, me: crate::desired::Me, keys: Keys, remotes: Remotes) {
    let mut running: BTreeMap<String, (RemoteConfig, JoinHandle<()>)> = BTreeMap::new();
    let mut last_errors = Vec::new();
    loop {
        let (configs, errors) = read_config_dir(&dir, &me.cluster);
        if errors != last_errors {
            for e in &errors {
                warn!(error = %e, "clustermesh config");
            }
            last_errors = errors;
        }
        let stale: Vec<String> = running
            .iter()
            .filter(|(n, (c, _))| configs.get(*n) != Some(c))
            .map(|(n, _)| n.clone())
            .collect();
        for name in stale {
            if let Some((_, h)) = running.remove(&name) {
                info!(cluster = %name, "remote cluster removed or changed; stopping its watcher");
                h.abort();
                remotes.remove(Slot::Remote, &name);
            }
        }
        for (name, cfg) in configs {
            if running.contains_key(&name) {
                continue;
            }
            info!(cluster = %name, endpoints = ?cfg.endpoints, "watching remote cluster");
            remotes.update(&name, |_| {});
            let w = Watcher {
                name: name.clone(),
                cfg: cfg.clone(),
                me: me.clone(),
                keys: cfg.prefix.as_deref().map_or_else(|| keys.clone(), Keys::new),
                remotes: remotes.clone(),
                slot: Slot::Remote,
            };
            running.insert(name, (cfg, tokio::spawn(w.run())));
        }
        if !remotes.configured() {
            remotes.set_configured();
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Reads the own cluster's kvstore config file (the format of a peer's file in the clustermesh config directory;
/// relative paths are relative to the file's directory).
///
/// # Errors
/// When the file cannot be read or parsed, or its keys do not go together.
pub fn read_own_config(file: &Path) -> Result<RemoteConfig, String> {
    let text = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let cfg: RemoteConfig =
        mesh_model::yaml::from_str(&text).map_err(|e| format!("{}: {e}", file.display()))?;
    cfg.checked(file.parent().unwrap_or_else(|| Path::new(".")))
        .map_err(|e| format!("{}: {e}", file.display()))
}

/// Watches this cluster's own etcd (`--kvstore-config FILE`) for its identities and ips, restarting the watcher
/// when the file changes. A file that cannot be read keeps the running watcher (and its data).
#[instrument(skip_all, fields(file = %file.display()))]
pub async fn manage_own(file: PathBuf, me: crate::desired::Me, keys: Keys, remotes: Remotes) {
    let mut running: Option<(RemoteConfig, JoinHandle<()>)> = None;
    let mut last_error = None;
    loop {
        match read_own_config(&file) {
            Ok(cfg) => {
                last_error = None;
                if running.as_ref().is_none_or(|(c, _)| *c != cfg) {
                    if let Some((_, h)) = running.take() {
                        info!(file = %file.display(), "own cluster's kvstore config changed; restarting its watcher");
                        h.abort();
                    }
                    info!(cluster = %me.cluster, endpoints = ?cfg.endpoints, "watching this cluster's identities");
                    remotes.update_in(Slot::Own, &me.cluster, |_| {});
                    let w = Watcher {
                        name: me.cluster.clone(),
                        cfg: cfg.clone(),
                        me: me.clone(),
                        keys: cfg.prefix.as_deref().map_or_else(|| keys.clone(), Keys::new),
                        remotes: remotes.clone(),
                        slot: Slot::Own,
                    };
                    running = Some((cfg, tokio::spawn(w.run())));
                }
            }
            Err(e) => {
                if last_error.as_ref() != Some(&e) {
                    warn!(error = %e, "own cluster's kvstore config");
                    last_error = Some(e);
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Where a watcher keeps what it sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// A peer cluster: everything it publishes.
    Remote,
    /// This cluster: identities and ips only.
    Own,
}

struct Watcher {
    name: String,
    cfg: RemoteConfig,
    me: crate::desired::Me,
    keys: Keys,
    remotes: Remotes,
    slot: Slot,
}

/// The authoritative view of a remote etcd during one session: the list plus the events after it.
#[derive(Default)]
struct Session {
    nodes: BTreeMap<String, Arc<NodeRecord>>,
    services: BTreeMap<String, Arc<ServiceRecord>>,
    identities: BTreeMap<u32, Arc<IdentityRecord>>,
    ips: BTreeMap<Ipv4Addr, Arc<IpRecord>>,
    capacities: BTreeMap<Ipv4Addr, u32>,
    config: Option<ClusterConfig>,
    synced: bool,
    services_synced: bool,
    identities_synced: bool,
    ips_synced: bool,
    /// Clusters other than the expected one whose cluster config this etcd holds.
    other_clusters: std::collections::BTreeSet<String>,
    /// Read through a KVStoreMesh cache: the cache's connection to the cluster (`None` when not a cache).
    upstream: Option<mesh_kvstore::KvstoremeshStatus>,
}

impl Watcher {
    async fn run(self) {
        let mut backoff = mesh_kvstore::etcd::Reconnect::default();
        loop {
            let started = std::time::Instant::now();
            let reason = match self.session().await {
                Ok(()) => "watch stream ended".to_owned(),
                Err(e) => format!("{e:#}"),
            };
            warn!(cluster = %self.name, reason = %reason, "remote cluster disconnected");
            self.remotes.update_in(self.slot, &self.name, |rc| {
                let now = now_ms();
                rc.state = SyncState::Disconnected {
                    since_ms: now,
                    reason: reason.clone(),
                };
                // Retries do not move this: it is when the cluster was last known to be reachable (its last answer,
                // or now when it never answered).
                rc.unreachable_since_ms
                    .get_or_insert(rc.last_alive_ms.unwrap_or(now).min(now));
            });
            tokio::time::sleep(backoff.after(started.elapsed())).await;
        }
    }

    fn publish(&self, s: &Session) {
        let my_id = self.me.cluster_id;
        let name = self.name.clone();
        let own = self.slot == Slot::Own;
        self.remotes.update_with_others(self.slot, &self.name, |rc, others| {
            rc.config.clone_from(&s.config);
            // The file name says which cluster this is; an etcd that holds only other clusters' configs is not it.
            // Nothing of its data is kept.
            if s.config.is_none() && !s.other_clusters.is_empty() {
                let held: Vec<&str> = s.other_clusters.iter().map(String::as_str).collect();
                if rc.usable {
                    warn!(cluster = %name, holds = ?held, "remote etcd holds another cluster; ignoring its data");
                }
                rc.refuse(format!(
                    "cluster name mismatch: the etcd at {} holds cluster {}, not {name:?} (the clustermesh config \
                     file {name:?} points at another cluster's etcd); none of its data is used",
                    self.cfg.endpoints.join(","),
                    held.join(", ")
                ));
                return;
            }
            // A cluster id belongs to one cluster: a second remote cluster with an id in use is refused, and the
            // one that has it keeps its state.
            if let Some(c) = &s.config
                && let Some((other, _)) = others.iter().find(|(n, o)| {
                    **n != name && o.usable && o.config.as_ref().is_some_and(|oc| oc.id == c.id)
                })
            {
                if rc.usable {
                    warn!(cluster = %name, id = c.id, other = %other, "remote cluster uses another remote cluster's id; ignoring its data");
                }
                rc.refuse(format!(
                    "cluster id {} is already used by remote cluster {other:?}; none of this cluster's data is used",
                    c.id
                ));
                return;
            }
            // This cluster's own etcd must hold this cluster's id.
            if own
                && let Some(c) = s.config.as_ref().filter(|c| c.id != my_id)
            {
                if rc.usable {
                    warn!(cluster = %name, id = c.id, my_id, "this cluster's etcd holds another cluster id; ignoring its data");
                }
                // (Its nodes and services are never read: clearing them too changes nothing.)
                rc.refuse(format!(
                    "the etcd of --kvstore-config holds cluster id {}, not this cluster's id {my_id}",
                    c.id
                ));
                return;
            }
            if !own
                && let Some(c) = &s.config
                && c.id == my_id
            {
                if rc.usable {
                    warn!(cluster = %name, id = c.id, "remote cluster uses this cluster's id; ignoring its data");
                }
                rc.usable = false;
                rc.state = SyncState::Disconnected {
                    since_ms: now_ms(),
                    reason: format!("cluster id {} is also this cluster's id", c.id),
                };
                return;
            }
            rc.usable = true;
            // Through a KVStoreMesh cache whose own connection to the cluster is down: the cached data stays (as
            // with a direct connection that broke), and the cluster counts as unreachable since the cache last
            // heard from it.
            if let Some(up) = s.upstream.as_ref().filter(|u| !u.connected) {
                if !matches!(rc.state, SyncState::Disconnected { .. }) {
                    rc.state = SyncState::Disconnected {
                        since_ms: now_ms(),
                        reason: format!("the KVStoreMesh cache lost the cluster: {}", up.reason),
                    };
                }
                rc.unreachable_since_ms
                    .get_or_insert(up.last_alive_ms.min(now_ms()));
                return;
            }
            // This cluster's own etcd is complete once its identities are (its nodes come from the source).
            let complete = if own { s.identities_synced } else { s.synced };
            if complete {
                rc.nodes.clone_from(&s.nodes);
                if !matches!(rc.state, SyncState::Synced { .. }) {
                    rc.state = SyncState::Synced { since_ms: now_ms() };
                    rc.syncs += 1;
                }
                rc.unreachable_since_ms = None;
            } else {
                // Before the synced marker, partial data only adds; nothing is removed on its account.
                for (k, v) in &s.nodes {
                    rc.nodes.insert(k.clone(), v.clone());
                }
            }
            if s.services_synced {
                rc.services.clone_from(&s.services);
            } else {
                for (k, v) in &s.services {
                    rc.services.insert(k.clone(), v.clone());
                }
            }
            // Identities are the cluster's only when their cluster part is its id: another cluster's id space is not
            // its to use (before its config is known, nothing is left out).
            let mine =
                |identity: u32| s.config.as_ref().is_none_or(|c| mesh_common::identity::cluster(identity) == c.id);
            if s.identities_synced {
                rc.identities.clear();
            }
            for (k, v) in s.identities.iter().filter(|(k, _)| mine(**k)) {
                rc.identities.insert(*k, v.clone());
            }
            if s.ips_synced {
                rc.ips.clear();
            }
            for (k, v) in s.ips.iter().filter(|(_, v)| mine(v.identity)) {
                rc.ips.insert(*k, v.clone());
            }
            // Capacities are part of the ips: the same marker makes the session's set the truth.
            if s.ips_synced {
                rc.capacities.clone_from(&s.capacities);
            } else {
                rc.capacities.extend(&s.capacities);
            }
        });
    }

    fn count_error(&self, reason: &str) {
        self.remotes.update_in(self.slot, &self.name, |rc| {
            *rc.decode_errors.entry(reason.to_owned()).or_default() += 1
        });
    }

    /// Applies one key/value (None = deleted) to the session.
    fn apply(&self, s: &mut Session, key: &str, value: Option<&[u8]>) {
        match self.keys.classify(&self.name, key) {
            // This cluster's nodes and services come from the agent's source, never from its etcd.
            KeyKind::Node(_) | KeyKind::Service(..) if self.slot == Slot::Own => {}
            // A peer's backends come with their weights in its service records.
            KeyKind::Capacity(_) if self.slot == Slot::Remote => {}
            KeyKind::Capacity(ip) => match value {
                None => {
                    s.capacities.remove(&ip);
                }
                Some(v) => match mesh_kvstore::decode_capacity(key, ip, v) {
                    Ok(rec) => {
                        s.capacities.insert(ip, rec.capacity);
                    }
                    Err(e) => {
                        warn!(cluster = %self.name, error = %e, "skipping malformed capacity record");
                        self.count_error(e.reason());
                    }
                },
            },
            KeyKind::Identity(number) => match value {
                None => {
                    s.identities
                        .retain(|id, _| mesh_common::identity::local(*id) != number);
                }
                Some(v) => match mesh_kvstore::decode_identity(key, &self.name, number, v) {
                    Ok(rec) => {
                        // One record per number: a record under the same number with another cluster id goes.
                        s.identities
                            .retain(|id, _| mesh_common::identity::local(*id) != number);
                        s.identities.insert(rec.identity, Arc::new(rec));
                    }
                    Err(e) => {
                        warn!(cluster = %self.name, error = %e, "skipping malformed identity record");
                        self.count_error(e.reason());
                    }
                },
            },
            KeyKind::Ip(ip) => match value {
                None => {
                    s.ips.remove(&ip);
                }
                Some(v) => match mesh_kvstore::decode_ip(key, &self.name, ip, v) {
                    Ok(rec) => {
                        s.ips.insert(ip, Arc::new(rec));
                    }
                    Err(e) => {
                        warn!(cluster = %self.name, error = %e, "skipping malformed ip record");
                        self.count_error(e.reason());
                    }
                },
            },
            KeyKind::Node(node) => match value {
                None => {
                    s.nodes.remove(node);
                }
                Some(v) => match mesh_kvstore::decode_node(key, &self.name, node, v) {
                    Ok(rec) => {
                        s.nodes.insert(node.to_owned(), Arc::new(rec));
                    }
                    Err(e) => {
                        warn!(cluster = %self.name, error = %e, "skipping malformed node record");
                        self.count_error(e.reason());
                    }
                },
            },
            KeyKind::Service(ns, name) => {
                let id = format!("{ns}/{name}");
                match value {
                    None => {
                        s.services.remove(&id);
                    }
                    Some(v) => match mesh_kvstore::decode_service(key, &self.name, ns, name, v) {
                        Ok(rec) => {
                            s.services.insert(id, Arc::new(rec));
                        }
                        Err(e) => {
                            warn!(cluster = %self.name, error = %e, "skipping malformed service record");
                            self.count_error(e.reason());
                        }
                    },
                }
            }
            KeyKind::Synced(mesh_kvstore::kinds::NODES) => s.synced = value.is_some(),
            KeyKind::Synced(mesh_kvstore::kinds::SERVICES) => s.services_synced = value.is_some(),
            KeyKind::Synced(mesh_kvstore::kinds::IDENTITIES) => s.identities_synced = value.is_some(),
            KeyKind::Synced(mesh_kvstore::kinds::IPS) => s.ips_synced = value.is_some(),
            KeyKind::ClusterConfig => match value {
                None => s.config = None,
                Some(v) => match mesh_kvstore::decode_cluster_config(key, &self.name, v) {
                    Ok(c) => s.config = Some(c),
                    Err(e) => {
                        warn!(cluster = %self.name, error = %e, "skipping malformed cluster config");
                        self.count_error(e.reason());
                    }
                },
            },
            KeyKind::UnknownVersion(v) => {
                debug!(cluster = %self.name, key, version = v, "skipping record of unknown schema version");
                self.count_error("unknown_version");
            }
            KeyKind::Other if key == self.keys.kvstoremesh_status() => {
                s.upstream = match value {
                    None => None,
                    Some(v) => match serde_json::from_slice::<mesh_kvstore::KvstoremeshStatus>(v) {
                        Ok(st) => Some(st),
                        Err(e) => {
                            warn!(cluster = %self.name, error = %e, "skipping malformed KVStoreMesh status");
                            self.count_error("bad_json");
                            s.upstream.clone()
                        }
                    },
                };
            }
            KeyKind::Other => {
                let configs = self.keys.cluster_config("");
                if let Some(other) = key.strip_prefix(configs.as_str())
                    && !other.is_empty()
                    && !other.contains('/')
                {
                    if value.is_some() {
                        s.other_clusters.insert(other.to_owned());
                    } else {
                        s.other_clusters.remove(other);
                    }
                }
            }
            KeyKind::Synced(_) | KeyKind::Heartbeat => {}
        }
    }

    #[instrument(skip_all, fields(cluster = %self.name))]
    async fn session(&self) -> anyhow::Result<()> {
        self.remotes.update_in(self.slot, &self.name, |rc| {
            rc.state = SyncState::Connecting { since_ms: now_ms() }
        });
        let opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(5))
            .with_keep_alive(
                keepalive_interval(),
                keepalive_interval().min(Duration::from_secs(3)),
            );
        let opts = match tls_options(&self.cfg)? {
            Some(tls) => opts.with_tls(tls),
            None => opts,
        };
        let client = Client::connect(&self.cfg.endpoints, Some(opts)).await?;
        self.remotes.update_in(self.slot, &self.name, |rc| {
            rc.state = SyncState::Syncing { since_ms: now_ms() }
        });
        let root = self.keys.root();
        // The list comes in pages (one consistent revision): a cluster's state can be far larger than one gRPC
        // message (4 MiB by default; the limit is raised too, for pages of large records).
        let (records, revision) = mesh_kvstore::etcd::list_paged(&client, &root).await?;
        let mut s = Session::default();
        for (k, v) in &records {
            self.apply(&mut s, k, Some(v));
        }
        drop(records);
        info!(
            nodes = s.nodes.len(),
            identities = s.identities.len(),
            ips = s.ips.len(),
            synced = s.synced,
            revision,
            "listed remote cluster"
        );
        self.publish(&s);
        let mut stream = mesh_kvstore::etcd::watch_client(&client)
            .watch(
                root.as_str(),
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(revision + 1),
                ),
            )
            .await?;
        self.alive();
        // A probe every keepalive interval proves the peer alive (and notices a dead one sooner than the
        // transport would): when the connection breaks, the grace period counts from the last proof, not from
        // when the breakage was noticed.
        let probe_every = keepalive_interval();
        let probe_timeout = probe_every.min(Duration::from_secs(3));
        let mut probe = tokio::time::interval(probe_every);
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let heartbeat = self.keys.heartbeat(&self.name);
        let mut kv = client.kv_client();
        loop {
            let resp = tokio::select! {
                msg = stream.message() => match msg? {
                    Some(resp) => resp,
                    None => break,
                },
                _ = probe.tick() => {
                    let get = kv.get(heartbeat.as_str(), Some(GetOptions::new().with_keys_only()));
                    match tokio::time::timeout(probe_timeout, get).await {
                        Ok(Ok(_)) => self.alive(),
                        Ok(Err(e)) => anyhow::bail!("liveness probe failed: {e}"),
                        Err(_) => anyhow::bail!("liveness probe got no answer within {probe_timeout:?}"),
                    }
                    continue;
                }
            };
            if resp.canceled() {
                anyhow::bail!("watch canceled by etcd: {}", resp.cancel_reason());
            }
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                let Ok(k) = kv.key_str() else { continue };
                match ev.event_type() {
                    EventType::Put => self.apply(&mut s, k, Some(kv.value())),
                    EventType::Delete => self.apply(&mut s, k, None),
                }
            }
            self.publish(&s);
            self.alive();
        }
        Ok(())
    }

    /// Records that the remote cluster answered just now.
    fn alive(&self) {
        let now = now_ms();
        self.remotes
            .note(self.slot, &self.name, |rc| rc.last_alive_ms = Some(now));
    }
}
