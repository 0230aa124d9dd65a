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
//!
//! Trust (docs/security.md): every record is decoded once, with the peer's grant (`mesh_kvstore::grant`): its own
//! name, its id (pinned in the peer file, else its cluster config's; no config: nothing is read), pod CIDRs pinned
//! or claimed first ([`Remotes::set_local_pod_cidrs`] and the peers' accepted node records share one index). What
//! is beyond the grant is refused (counted by reason, kept in `recent_refusals`) and the last good record stays;
//! addresses outside the peer's accepted node CIDRs are held back until a node record covers them. A peer beyond
//! the limits ([`Remotes::set_limits`]) is refused whole; a peer file that is briefly missing or unreadable keeps
//! the peer ([`Remotes::set_peer_file_grace`]).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use etcd_client::{ConnectOptions, EventType, GetOptions, WatchOptions};
use ipnet::Ipv4Net;
use mesh_kvstore::grant::Grant;
use mesh_kvstore::{
    ClusterConfig, DecodeError, IdentityRecord, IpRecord, KeyKind, Keys, NodeRecord, ServiceRecord,
};
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
    /// The cluster id its records must carry: pinned in its peer file, else as its config publishes it.
    pub cluster_id: Option<u16>,
    /// Records are shared (`Arc`) in persistent maps (`imbl`): a snapshot of the cluster copies no record and no
    /// map (it shares their nodes), and a change copies only its path.
    pub nodes: imbl::OrdMap<String, Arc<NodeRecord>>,
    /// Global services the cluster shares, by `namespace/name`.
    pub services: imbl::OrdMap<String, Arc<ServiceRecord>>,
    /// Security identities of the cluster, by full identity (the status reports their number).
    #[serde(rename = "identityCount", serialize_with = "count")]
    pub identities: imbl::OrdMap<u32, Arc<IdentityRecord>>,
    /// The cluster's pod addresses and their identities (the status reports their number).
    #[serde(rename = "ipCount", serialize_with = "count")]
    pub ips: imbl::OrdMap<Ipv4Addr, Arc<IpRecord>>,
    /// Capacities other than 1 of the cluster's pods, by address (this cluster only; empty for a peer).
    #[serde(skip)]
    pub capacities: imbl::OrdMap<Ipv4Addr, u32>,
    /// Whether its data may be used (false without its cluster config, or after an id conflict).
    pub usable: bool,
    /// Values skipped, by reason.
    pub decode_errors: BTreeMap<String, u64>,
    /// The last records refused (newest last, at most [`RECENT_REFUSALS`]): key and reason.
    pub recent_refusals: VecDeque<String>,
    /// Where what the cluster publishes differs from what its peer file pins (the pins win).
    pub grant_mismatches: Vec<String>,
    /// Cluster labels pinned in the peer file (`cluster-labels`): selectors match the cluster by these instead of
    /// the labels it publishes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pinned_labels: Option<BTreeMap<String, String>>,
    /// Pod address and service records held back because no accepted node CIDR of the cluster covers their
    /// addresses (yet): not used until one does.
    pub pending_records: usize,
    /// Why the cluster's peer file is missing or unreadable: its watcher and data are kept meanwhile, for the
    /// peer file grace period.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_file_error: Option<String>,
    /// Set when the connection broke (or never came up); cleared when the cluster is synced again. After the
    /// grace period its backends are withdrawn from global services.
    pub unreachable_since_ms: Option<u64>,
    /// Unix ms of the last answer from the cluster's etcd (watch event or liveness probe).
    pub last_alive_ms: Option<u64>,
    /// The time its last heartbeat record says (the cluster's clock): read through a fleet hub, a heartbeat that
    /// stops changing makes the cluster unreachable ([`Remotes::set_heartbeat_timeout`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heartbeat_ms: Option<u64>,
    /// Number of (re)connections that reached the synced state.
    pub syncs: u64,
    /// Backends of all its service records (kept as records change).
    pub backend_count: usize,
    /// Bumped whenever its identities change (consumers compare it instead of the identities).
    pub identity_generation: u64,
    /// What changed since the journal last took it (moved there by every update of [`Remotes`]).
    #[serde(skip)]
    changes: ClusterChanges,
}

/// What changed of one cluster: the keys whose records were added, replaced or removed, and whether anything else
/// of it changed (state, config, labels, usability, reachability). Consumers read the records of these keys only.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ClusterChanges {
    pub meta: bool,
    pub nodes: BTreeSet<String>,
    pub services: BTreeSet<String>,
    pub identities: BTreeSet<u32>,
    pub ips: BTreeSet<Ipv4Addr>,
    pub capacities: BTreeSet<Ipv4Addr>,
}

impl ClusterChanges {
    /// Adds what `other` changed.
    pub fn merge(&mut self, other: Self) {
        self.meta |= other.meta;
        for (a, b) in [
            (&mut self.nodes, other.nodes),
            (&mut self.services, other.services),
        ] {
            if a.is_empty() {
                *a = b;
            } else {
                a.extend(b);
            }
        }
        self.identities.extend(other.identities);
        if self.ips.is_empty() {
            self.ips = other.ips;
        } else {
            self.ips.extend(other.ips);
        }
        self.capacities.extend(other.capacities);
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        !self.meta
            && self.nodes.is_empty()
            && self.services.is_empty()
            && self.identities.is_empty()
            && self.ips.is_empty()
            && self.capacities.is_empty()
    }

    /// Every key `rc` holds, as changed (its data is going or coming whole).
    #[must_use]
    pub fn all_of(rc: &RemoteCluster) -> Self {
        Self {
            meta: true,
            nodes: rc.nodes.keys().cloned().collect(),
            services: rc.services.keys().cloned().collect(),
            identities: rc.identities.keys().copied().collect(),
            ips: rc.ips.keys().copied().collect(),
            capacities: rc.capacities.keys().copied().collect(),
        }
    }
}

/// The facts of a cluster, beside its records, that consumers act on.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Meta {
    state: SyncState,
    usable: bool,
    cluster_id: Option<u16>,
    config: Option<ClusterConfig>,
    pinned_labels: Option<BTreeMap<String, String>>,
    unreachable_since_ms: Option<u64>,
    syncs: u64,
}

impl Meta {
    fn of(rc: &RemoteCluster) -> Self {
        Self {
            state: rc.state.clone(),
            usable: rc.usable,
            cluster_id: rc.cluster_id,
            config: rc.config.clone(),
            pinned_labels: rc.pinned_labels.clone(),
            unreachable_since_ms: rc.unreachable_since_ms,
            syncs: rc.syncs,
        }
    }
}

/// Changes of every cluster since they were last taken ([`Remotes::take_changes`]), by scope and name.
pub type Journal = BTreeMap<(Scope, String), ClusterChanges>;

/// Makes `dst` hold what `src` holds for the keys `dirty` (every key when `full`), recording each key that changed
/// in `changed`. Keys absent from `src` are removed only when `src` is the `truth` (the kind's synced marker was
/// seen); before it, partial data only adds.
#[expect(
    clippy::too_many_arguments,
    reason = "one map's sync, with how its values compare and copy"
)]
fn sync_keys<K: Ord + Clone, V: Clone>(
    dst: &mut imbl::OrdMap<K, V>,
    src: &BTreeMap<K, V>,
    dirty: &BTreeSet<K>,
    full: bool,
    truth: bool,
    same: impl Fn(&V, &V) -> bool,
    clone: impl Fn(&V) -> V,
    changed: &mut BTreeSet<K>,
) {
    let put = |dst: &mut imbl::OrdMap<K, V>, changed: &mut BTreeSet<K>, k: &K, v: &V| {
        if dst.get(k).is_none_or(|old| !same(old, v)) {
            dst.insert(k.clone(), clone(v));
            changed.insert(k.clone());
        }
    };
    if full {
        for (k, v) in src {
            put(dst, changed, k, v);
        }
        if truth {
            let gone: Vec<K> = dst.keys().filter(|k| !src.contains_key(*k)).cloned().collect();
            for k in gone {
                dst.remove(&k);
                changed.insert(k);
            }
        }
        return;
    }
    for k in dirty {
        match src.get(k) {
            Some(v) => put(dst, changed, k, v),
            None if truth && dst.remove(k).is_some() => {
                changed.insert(k.clone());
            }
            None => {}
        }
    }
}

/// How many refused records a remote cluster's status keeps (their total is counted by reason).
pub const RECENT_REFUSALS: usize = 16;

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
    /// Backends of its global services' records.
    pub backends: usize,
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
            backends: r.backend_count,
            decode_errors: r.decode_errors.values().sum(),
            last_alive_ms: r.last_alive_ms,
            syncs: r.syncs,
        }
    }
}

/// Serializes a map as its size (the status stays small whatever the size of the mesh).
fn count<K, V, S: serde::Serializer>(map: &imbl::OrdMap<K, V>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(u64::try_from(map.len()).unwrap_or(u64::MAX))
}

impl RemoteCluster {
    #[must_use]
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            state: SyncState::Connecting { since_ms: now_ms() },
            config: None,
            cluster_id: None,
            nodes: imbl::OrdMap::new(),
            services: imbl::OrdMap::new(),
            identities: imbl::OrdMap::new(),
            ips: imbl::OrdMap::new(),
            capacities: imbl::OrdMap::new(),
            unreachable_since_ms: None,
            last_alive_ms: None,
            heartbeat_ms: None,
            usable: true,
            decode_errors: BTreeMap::new(),
            recent_refusals: VecDeque::new(),
            grant_mismatches: Vec::new(),
            pinned_labels: None,
            pending_records: 0,
            peer_file_error: None,
            syncs: 0,
            backend_count: 0,
            identity_generation: 0,
            changes: ClusterChanges::default(),
        }
    }

    /// The labels selectors may match the cluster by: pinned in its peer file, else as its config publishes them.
    #[must_use]
    pub fn labels(&self) -> Option<&BTreeMap<String, String>> {
        self.pinned_labels
            .as_ref()
            .or_else(|| self.config.as_ref().map(|c| &c.labels))
    }

    /// Refuses the cluster's data: none of it is used (every record dropped, `usable` false) and the state says why.
    fn refuse(&mut self, reason: String) {
        self.usable = false;
        let gone = ClusterChanges::all_of(self);
        self.changes.merge(gone);
        self.backend_count = 0;
        self.identity_generation += 1;
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

/// TLS options from a peer config's files (read at each connection, so renewed certificates are picked up), and
/// the PEM contents read (CA, certificate, key) that tell shared clients apart.
fn tls_options(cfg: &RemoteConfig) -> anyhow::Result<Option<(etcd_client::TlsOptions, Vec<Vec<u8>>)>> {
    use anyhow::Context as _;
    let Some(ca) = &cfg.trusted_ca_file else {
        return Ok(None);
    };
    let read = |p: &Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
    let ca = read(ca)?;
    let mut pem = vec![ca.clone()];
    let mut tls = etcd_client::TlsOptions::new().ca_certificate(etcd_client::Certificate::from_pem(ca));
    if let (Some(cert), Some(key)) = (&cfg.cert_file, &cfg.key_file) {
        let (cert, key) = (read(cert)?, read(key)?);
        pem.extend([cert.clone(), key.clone()]);
        tls = tls.identity(etcd_client::Identity::from_pem(cert, key));
    }
    Ok(Some((tls, pem)))
}

/// Pod CIDR claims of every cluster: this cluster's nodes (from its source) and every peer's accepted node records.
/// A prefix that overlaps another cluster's claim (equal, inside or around it) is refused: the first claimant keeps
/// it. Claims of a cluster whose data is not used (refused) do not count.
#[derive(Debug, Default)]
struct Claims {
    /// Prefix → cluster → nodes naming it.
    by_prefix: BTreeMap<Ipv4Net, BTreeMap<String, BTreeSet<String>>>,
    inactive: BTreeSet<String>,
    /// This cluster's claims as last set (to replace them only when they change).
    local: Vec<(String, Ipv4Net)>,
}

impl Claims {
    /// A claim of another (active) cluster that overlaps `prefix`: (its prefix, its cluster).
    fn conflict(&self, cluster: &str, prefix: Ipv4Net) -> Option<(Ipv4Net, String)> {
        let other = |m: &BTreeMap<String, BTreeSet<String>>| {
            m.keys()
                .find(|c| c.as_str() != cluster && !self.inactive.contains(c.as_str()))
                .cloned()
        };
        // Prefixes around it (and itself): at most 33 lookups.
        for len in 0..=prefix.prefix_len() {
            let Ok(around) = Ipv4Net::new(prefix.network(), len).map(|n| n.trunc()) else {
                continue;
            };
            if let Some(c) = self.by_prefix.get(&around).and_then(other) {
                return Some((around, c));
            }
        }
        // Prefixes inside it: they sort from (network, len) to (broadcast, 32).
        let hi = Ipv4Net::new(prefix.broadcast(), 32).ok()?;
        self.by_prefix
            .range(prefix..=hi)
            .filter(|(p, _)| prefix.contains(*p))
            .find_map(|(p, m)| other(m).map(|c| (*p, c)))
    }

    fn add(&mut self, cluster: &str, node: &str, prefix: Ipv4Net) {
        self.by_prefix
            .entry(prefix)
            .or_default()
            .entry(cluster.to_owned())
            .or_default()
            .insert(node.to_owned());
    }

    fn remove(&mut self, cluster: &str, node: &str, prefix: Ipv4Net) {
        if let Some(m) = self.by_prefix.get_mut(&prefix) {
            if let Some(nodes) = m.get_mut(cluster) {
                nodes.remove(node);
                if nodes.is_empty() {
                    m.remove(cluster);
                }
            }
            if m.is_empty() {
                self.by_prefix.remove(&prefix);
            }
        }
    }

    fn remove_cluster(&mut self, cluster: &str) {
        self.by_prefix.retain(|_, m| {
            m.remove(cluster);
            !m.is_empty()
        });
        self.inactive.remove(cluster);
    }
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
    /// Pod CIDR claims of this cluster and the peers (lock order: after `inner`/`own`, never before).
    claims: Arc<Mutex<Claims>>,
    /// How much of one peer's records a watcher holds at most.
    limits: Arc<Mutex<mesh_kvstore::etcd::Limits>>,
    /// How long a peer whose file is missing or unreadable keeps its watcher and data.
    peer_file_grace: Arc<Mutex<Duration>>,
    /// How old a hub peer's heartbeat may get before the peer counts unreachable (zero: never).
    heartbeat_timeout: Arc<Mutex<Duration>>,
    /// What changed since the reconciler last looked (lock order: after `inner`/`own`).
    journal: Arc<Mutex<Journal>>,
    /// The membership selector in force and the peers it leaves out.
    selection: Arc<Mutex<Selection>>,
    wake: std::sync::mpsc::Sender<()>,
}

/// The membership selector (`--peer-selector`) in force, for the status.
#[derive(Debug, Clone, Default, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Selection {
    /// The selector file, when one is configured.
    pub file: Option<PathBuf>,
    /// The selector in force (the last good one read); none: every peer.
    pub selector: Option<mesh_kvstore::peer::PeerSelector>,
    /// Why the file's current content is not in force (the last good selector stays; before any, no peer).
    pub error: Option<String>,
    /// Peers with a file that the selector leaves out (neither watched nor stored).
    pub unselected: usize,
    /// Reads of the file that were refused (a new content that does not parse or validate counts once).
    pub refusals: u64,
}

impl Remotes {
    #[must_use]
    pub fn new(wake: std::sync::mpsc::Sender<()>) -> Self {
        Self {
            inner: Arc::default(),
            own: Arc::default(),
            configured: Arc::default(),
            claims: Arc::default(),
            limits: Arc::default(),
            peer_file_grace: Arc::new(Mutex::new(DEFAULT_PEER_FILE_GRACE)),
            heartbeat_timeout: Arc::new(Mutex::new(DEFAULT_HEARTBEAT_TIMEOUT)),
            journal: Arc::default(),
            selection: Arc::default(),
            wake,
        }
    }

    /// The membership selector in force and how many peers it leaves out.
    #[must_use]
    pub fn selection(&self) -> Selection {
        self.selection
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Takes what changed since the last call: per cluster, the keys whose records changed (see
    /// [`ClusterChanges`]). The records themselves are read with [`Self::read`].
    #[must_use]
    pub fn take_changes(&self) -> Journal {
        std::mem::take(&mut *self.journal.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Runs `f` on the clusters of `scope` under their lock (keep it short: watchers wait meanwhile).
    pub fn read<R>(&self, scope: Scope, f: impl FnOnce(&BTreeMap<String, RemoteCluster>) -> R) -> R {
        f(&self.map(scope).lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Moves what `rc` recorded as changed into the journal; `meta` when its cluster-level facts differ from
    /// `before`. Returns whether anything was journaled (only then is the reconciler woken: a watch event that
    /// changes nothing it programs, such as a peer's heartbeat, costs the reconciler nothing).
    fn journal(&self, scope: Scope, rc: &mut RemoteCluster, before: Option<&Meta>) -> bool {
        let mut c = std::mem::take(&mut rc.changes);
        c.meta |= before.is_none_or(|b| *b != Meta::of(rc));
        if c.is_empty() {
            return false;
        }
        self.journal
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry((scope, rc.name.clone()))
            .or_default()
            .merge(c);
        true
    }

    /// Sets how much of one peer's records a watcher holds at most (from the next session of each watcher): a peer
    /// beyond them is refused, its data dropped, and listed again later.
    pub fn set_limits(&self, limits: mesh_kvstore::etcd::Limits) {
        *self.limits.lock().unwrap_or_else(PoisonError::into_inner) = limits;
    }

    /// Sets how long a peer whose file disappears or fails to parse keeps its watcher and data (a file being
    /// rewritten, a config volume being remounted): after it the peer is removed.
    pub fn set_peer_file_grace(&self, grace: Duration) {
        *self
            .peer_file_grace
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = grace;
    }

    /// Sets how long a peer read through a fleet hub may go without a new heartbeat (while this agent is connected
    /// to the hub) before it counts unreachable, as a peer whose etcd is unreachable pairwise: after the grace
    /// period its backends are withdrawn, and a new heartbeat brings it back. Zero: such peers are judged by the
    /// connection only. Read at every check, so it applies to running watchers.
    pub fn set_heartbeat_timeout(&self, timeout: Duration) {
        *self
            .heartbeat_timeout
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = timeout;
    }

    fn heartbeat_timeout(&self) -> Duration {
        *self
            .heartbeat_timeout
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn peer_file_grace(&self) -> Duration {
        *self
            .peer_file_grace
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn limits(&self) -> mesh_kvstore::etcd::Limits {
        *self.limits.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn claims(&self) -> std::sync::MutexGuard<'_, Claims> {
        self.claims.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sets this cluster's pod CIDR claims (its nodes' pod CIDRs, from its source): peers' node records that
    /// overlap them are refused.
    pub fn set_local_pod_cidrs(&self, cluster: &str, nodes: Vec<(String, Ipv4Net)>) {
        let mut c = self.claims();
        if c.local == nodes {
            return;
        }
        for (node, prefix) in std::mem::take(&mut c.local) {
            c.remove(cluster, &node, prefix);
        }
        for (node, prefix) in &nodes {
            c.add(cluster, node, *prefix);
        }
        c.local = nodes;
    }

    /// Claims `prefixes` for `cluster`'s node `node`, unless one overlaps another cluster's claim: then nothing is
    /// claimed and the error says which.
    fn claim(&self, key: &str, cluster: &str, node: &str, prefixes: &[Ipv4Net]) -> Result<(), DecodeError> {
        let mut c = self.claims();
        for p in prefixes {
            if let Some((other, owner)) = c.conflict(cluster, *p) {
                return Err(DecodeError::OverlappingPodCidr {
                    key: key.to_owned(),
                    cidr: p.to_string(),
                    other: other.to_string(),
                    owner,
                });
            }
        }
        for p in prefixes {
            c.add(cluster, node, *p);
        }
        Ok(())
    }

    fn release(&self, cluster: &str, node: &str, prefixes: &[Ipv4Net]) {
        let mut c = self.claims();
        for p in prefixes {
            c.remove(cluster, node, *p);
        }
    }

    /// Whether `cluster`'s claims count (false while its data is refused).
    fn activate_claims(&self, cluster: &str, active: bool) {
        let mut c = self.claims();
        if active {
            c.inactive.remove(cluster);
        } else {
            c.inactive.insert(cluster.to_owned());
        }
    }

    fn map(&self, scope: Scope) -> &Mutex<BTreeMap<String, RemoteCluster>> {
        match scope {
            Scope::Peer => &self.inner,
            Scope::Own => &self.own,
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
        self.update_in(Scope::Peer, name, f);
    }

    fn update_in(&self, scope: Scope, name: &str, f: impl FnOnce(&mut RemoteCluster)) {
        let changed = {
            let mut g = self.map(scope).lock().unwrap_or_else(PoisonError::into_inner);
            let rc = g
                .entry(name.to_owned())
                .or_insert_with(|| RemoteCluster::new(name));
            let before = Meta::of(rc);
            f(rc);
            self.journal(scope, rc, Some(&before))
        };
        if changed {
            let _ = self.wake.send(());
        }
    }

    /// As `update`, without waking the reconciler (for bookkeeping that changes no desired state).
    fn note(&self, scope: Scope, name: &str, f: impl FnOnce(&mut RemoteCluster)) {
        let mut g = self.map(scope).lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(rc) = g.get_mut(name) {
            f(rc);
        }
    }

    /// As `update`, with a view of the other clusters of the same scope (under the same lock).
    fn update_with_others(
        &self,
        scope: Scope,
        name: &str,
        f: impl FnOnce(&mut RemoteCluster, &BTreeMap<String, RemoteCluster>),
    ) {
        let changed = {
            let mut g = self.map(scope).lock().unwrap_or_else(PoisonError::into_inner);
            let existed = g.contains_key(name);
            let mut rc = g.remove(name).unwrap_or_else(|| RemoteCluster::new(name));
            let before = existed.then(|| Meta::of(&rc));
            f(&mut rc, &g);
            let changed = self.journal(scope, &mut rc, before.as_ref());
            g.insert(name.to_owned(), rc);
            changed
        };
        if changed {
            let _ = self.wake.send(());
        }
    }

    fn remove(&self, scope: Scope, name: &str) {
        {
            let mut g = self.map(scope).lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(mut rc) = g.remove(name) {
                let gone = ClusterChanges::all_of(&rc);
                rc.changes.merge(gone);
                let _ = self.journal(scope, &mut rc, None);
            }
        }
        if scope == Scope::Peer {
            self.claims().remove_cluster(name);
        }
        let _ = self.wake.send(());
    }
}

/// How long a peer whose file is missing or unreadable keeps its watcher and data, by default.
pub const DEFAULT_PEER_FILE_GRACE: Duration = Duration::from_secs(30);

/// Reads the membership selector file each pass and keeps the last good selector: `Ok(None)` is every peer; before
/// a first good read of a broken file, no peer.
struct SelectorFile {
    file: Option<PathBuf>,
    good: Option<Option<mesh_kvstore::peer::PeerSelector>>,
    error: Option<String>,
    refusals: u64,
}

impl SelectorFile {
    /// The selector in force after reading the file again (`None` inside: every peer; `Err`: no good one yet).
    fn read(&mut self) -> Result<Option<&mesh_kvstore::peer::PeerSelector>, ()> {
        let Some(file) = &self.file else {
            return Ok(None);
        };
        match mesh_kvstore::peer::read_peer_selector(file) {
            Ok(sel) => {
                if self.good.as_ref() != Some(&sel) {
                    info!(file = %file.display(), selector = ?sel, "membership selector in force");
                }
                self.error = None;
                self.good = Some(sel);
            }
            Err(e) => {
                if self.error.as_ref() != Some(&e) {
                    warn!(error = %e, "membership selector: keeping the last good one");
                    self.refusals += 1;
                }
                self.error = Some(e);
            }
        }
        self.good.as_ref().map(Option::as_ref).ok_or(())
    }
}

/// How long a peer read through a fleet hub may go without a new heartbeat, by default: 3× the apiservers' default
/// `--heartbeat-interval` (10 s).
pub const DEFAULT_HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(30);

/// Starts and stops watchers as the clustermesh config directory changes. A peer whose file disappears or fails to
/// parse keeps its watcher (with the last good config) and its data for the peer file grace period; a peer whose
/// file changes is watched anew at once. With a membership selector (`selector`, a file read every pass), only the
/// peers it selects are watched: a peer it stops selecting is dropped at once (watcher and data), one it starts
/// selecting is watched at once.
pub async fn manage(
    dir: PathBuf,
    selector: Option<PathBuf>,
    me: crate::desired::LocalNode,
    keys: Keys,
    remotes: Remotes,
) {
    let mut running: BTreeMap<String, (RemoteConfig, JoinHandle<()>)> = BTreeMap::new();
    let mut missing: BTreeMap<String, std::time::Instant> = BTreeMap::new();
    let mut last_errors = Vec::new();
    let mut peer_dir = mesh_kvstore::peer::PeerDir::default();
    let mut sel = SelectorFile {
        file: selector,
        good: None,
        error: None,
        refusals: 0,
    };
    loop {
        let (mut configs, errors) = peer_dir.read(&dir, &me.cluster);
        if errors != last_errors {
            for e in &errors {
                warn!(error = %e, "clustermesh config");
            }
            last_errors.clone_from(&errors);
        }
        // Unselected peers are as if they had no file, without the grace a missing file gets.
        let mut unselected = Vec::new();
        match sel.read() {
            Ok(s) => configs.retain(|name, cfg| {
                let keep = mesh_kvstore::peer::selects(s, cfg);
                if !keep {
                    unselected.push(name.clone());
                }
                keep
            }),
            Err(()) => unselected.extend(std::mem::take(&mut configs).into_keys()),
        }
        for name in &unselected {
            if let Some((_, h)) = running.remove(name) {
                info!(cluster = %name, "remote cluster no longer selected; stopping its watcher");
                h.abort();
                remotes.remove(Scope::Peer, name);
            }
            missing.remove(name);
        }
        *remotes.selection.lock().unwrap_or_else(PoisonError::into_inner) = Selection {
            file: sel.file.clone(),
            selector: sel.good.clone().flatten(),
            error: sel.error.clone(),
            unselected: unselected.len(),
            refusals: sel.refusals,
        };
        let grace = remotes.peer_file_grace();
        for name in running.keys().filter(|n| !configs.contains_key(*n)) {
            let since = *missing
                .entry(name.clone())
                .or_insert_with(std::time::Instant::now);
            let file = dir.join(name);
            let why = errors
                .iter()
                .find(|e| {
                    e.starts_with(&format!("{}:", file.display()))
                        || e.starts_with("clustermesh config directory")
                })
                .cloned()
                .unwrap_or_else(|| format!("{}: the peer file is gone", file.display()));
            let left = grace.saturating_sub(since.elapsed());
            remotes.note(Scope::Peer, name, |rc| {
                rc.peer_file_error = Some(format!("{why}; its data is kept for {}s more", left.as_secs()));
            });
        }
        missing.retain(|n, _| {
            let back = configs.contains_key(n);
            if back {
                remotes.note(Scope::Peer, n, |rc| rc.peer_file_error = None);
            }
            !back && running.contains_key(n)
        });
        let stale: Vec<String> = running
            .iter()
            .filter(|(n, (c, _))| match configs.get(*n) {
                Some(new) => new != c,
                None => missing.get(*n).is_none_or(|since| since.elapsed() >= grace),
            })
            .map(|(n, _)| n.clone())
            .collect();
        for name in stale {
            if let Some((_, h)) = running.remove(&name) {
                info!(cluster = %name, "remote cluster removed or changed; stopping its watcher");
                h.abort();
                remotes.remove(Scope::Peer, &name);
                missing.remove(&name);
            }
        }
        for (name, cfg) in configs {
            if running.contains_key(&name) {
                continue;
            }
            info!(cluster = %name, endpoints = ?cfg.endpoints, "watching remote cluster");
            // A pinned id is known before the cluster answers.
            remotes.update(&name, |rc| rc.cluster_id = rc.cluster_id.or(cfg.cluster_id));
            let w = Watcher {
                name: name.clone(),
                cfg: cfg.clone(),
                me: me.clone(),
                keys: cfg.prefix.as_deref().map_or_else(|| keys.clone(), Keys::new),
                remotes: remotes.clone(),
                scope: Scope::Peer,
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
pub async fn manage_own(file: PathBuf, me: crate::desired::LocalNode, keys: Keys, remotes: Remotes) {
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
                    remotes.update_in(Scope::Own, &me.cluster, |_| {});
                    let w = Watcher {
                        name: me.cluster.clone(),
                        cfg: cfg.clone(),
                        me: me.clone(),
                        keys: cfg.prefix.as_deref().map_or_else(|| keys.clone(), Keys::new),
                        remotes: remotes.clone(),
                        scope: Scope::Own,
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

/// Which clusters a watcher's cluster is kept with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    /// A peer cluster: everything it publishes.
    Peer,
    /// This cluster: identities and ips only.
    Own,
}

struct Watcher {
    name: String,
    cfg: RemoteConfig,
    me: crate::desired::LocalNode,
    keys: Keys,
    remotes: Remotes,
    scope: Scope,
}

/// A large service as read: its record (without backends) and its backend slices.
#[derive(Default)]
struct SlicedService {
    record: Option<ServiceRecord>,
    slices: BTreeMap<u32, Vec<mesh_kvstore::BackendRecord>>,
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
    /// What the cluster may claim: its name, its id (pinned, else its config's) and pinned pod CIDRs. `None` (a
    /// peer whose config is not known): none of its records is read.
    grant: Option<Grant>,
    /// Whether addresses must lie inside the accepted node CIDRs (`cidrs`): a peer without pinned pod CIDRs.
    check_cidrs: bool,
    /// Pod CIDRs of the accepted node records, with how many nodes name each.
    cidrs: BTreeMap<Ipv4Net, usize>,
    /// Node records refused because a pod CIDR overlaps another cluster's claim: (key, record), tried again on every
    /// liveness probe.
    overlapping: BTreeMap<String, (String, NodeRecord)>,
    /// Records whose addresses no accepted node CIDR covers (yet): held, not used, until a node record does.
    pending_ips: BTreeMap<Ipv4Addr, Arc<IpRecord>>,
    pending_services: BTreeMap<String, Arc<ServiceRecord>>,
    /// Services with backend slices (large services): their record as read and their slices, assembled into
    /// `services` (the union of the record's backends and the slices'); a slice without its record waits for it.
    sliced: BTreeMap<String, SlicedService>,
    /// The list is done: what follows are watch events.
    listed: bool,
    /// Complete once (synced): claims of nodes gone meanwhile were released.
    settled: bool,
    /// Why the session must list the cluster again (its grant changed, so what was accepted may change).
    relist: Option<String>,
    synced: bool,
    services_synced: bool,
    identities_synced: bool,
    ips_synced: bool,
    /// Clusters other than the expected one whose cluster config this etcd holds.
    other_clusters: std::collections::BTreeSet<String>,
    /// Read through a KVStoreMesh cache: the cache's connection to the cluster (`None` when not a cache, or when
    /// the cache's status is gone).
    upstream: Option<mesh_kvstore::KvstoremeshStatus>,
    /// The peer file's prefix is a KVStoreMesh cache's (`<prefix>/kvstoremesh/<cluster>`): its status must be there.
    via_cache: bool,
    /// When the cache last heard from the cluster, as its last status said.
    upstream_alive_ms: Option<u64>,
    /// The peer file's prefix is a fleet hub's (`<prefix>/clusters/<cluster>`): the cluster's liveness is its
    /// heartbeat's, not the hub connection's.
    via_hub: bool,
    /// Through a hub: when (this agent's clock) a new heartbeat of the cluster was last seen, or the session
    /// started (a hub that was away for a while does not make its peers silent).
    heartbeat_seen_ms: u64,
    /// Through a hub: the last publish found the heartbeat too old.
    silent: bool,
    /// Keys changed since the last publish that applied them.
    dirty: ClusterChanges,
    /// The next publish compares every key (after a list, or after the cluster's data was refused).
    full_publish: bool,
    /// Whether the last publish applied each kind as the truth (nodes, services, identities, ips).
    truth_published: [bool; 4],
}

impl Session {
    /// Removes the identity with local number `number` (one record per number), noting what went.
    fn remove_identity_number(&mut self, number: u32) {
        let gone: Vec<u32> = self
            .identities
            .keys()
            .filter(|id| mesh_common::identity::local(**id) == number)
            .copied()
            .collect();
        for id in gone {
            self.identities.remove(&id);
            self.dirty.identities.insert(id);
        }
    }

    /// Whether `ip` lies inside the pod CIDRs accepted for the cluster (pinned ones were checked when decoding).
    fn covered(&self, ip: Ipv4Addr) -> bool {
        !self.check_cidrs
            || (0..=32u8).any(|len| Ipv4Net::new(ip, len).is_ok_and(|n| self.cidrs.contains_key(&n.trunc())))
    }

    fn add_cidrs(&mut self, cidrs: &[Ipv4Net]) {
        for c in cidrs {
            *self.cidrs.entry(*c).or_default() += 1;
        }
        if !self.check_cidrs {
            return;
        }
        // Held records that are covered now are used.
        for c in cidrs {
            let now: Vec<Ipv4Addr> = self
                .pending_ips
                .range(c.network()..=c.broadcast())
                .map(|(a, _)| *a)
                .collect();
            for a in now {
                if let Some(r) = self.pending_ips.remove(&a) {
                    self.ips.insert(a, r);
                    self.dirty.ips.insert(a);
                }
            }
        }
        let ready: Vec<String> = self
            .pending_services
            .iter()
            .filter(|(_, r)| r.backends.iter().all(|b| self.covered(b.ipv4)))
            .map(|(k, _)| k.clone())
            .collect();
        for k in ready {
            if let Some(r) = self.pending_services.remove(&k) {
                self.dirty.services.insert(k.clone());
                self.services.insert(k, r);
            }
        }
    }

    fn remove_cidrs(&mut self, cidrs: &[Ipv4Net]) {
        for c in cidrs {
            if let Some(n) = self.cidrs.get_mut(c) {
                *n -= 1;
                if *n == 0 {
                    self.cidrs.remove(c);
                }
            }
        }
        if !self.check_cidrs {
            return;
        }
        // Addresses no accepted CIDR covers any more are held again.
        for c in cidrs {
            let gone: Vec<Ipv4Addr> = self
                .ips
                .range(c.network()..=c.broadcast())
                .map(|(a, _)| *a)
                .filter(|a| !self.covered(*a))
                .collect();
            for a in gone {
                if let Some(r) = self.ips.remove(&a) {
                    self.pending_ips.insert(a, r);
                    self.dirty.ips.insert(a);
                }
            }
        }
    }
}

/// What a watcher does after a session.
enum Ended {
    /// The connection broke or the watch ended.
    Lost(String),
    /// The cluster's grant changed: list it again at once (the data is kept meanwhile).
    Relist(String),
    /// The cluster holds more than the limits: refused (its data dropped), listed again after [`OVER_LIMIT_RETRY`].
    OverLimit(String),
}

/// How long a watcher waits before listing a cluster that was beyond the limits again.
pub const OVER_LIMIT_RETRY: Duration = Duration::from_secs(30);

impl Watcher {
    async fn run(self) {
        let mut backoff = mesh_kvstore::etcd::Reconnect::default();
        loop {
            let started = std::time::Instant::now();
            let reason = match self.session().await {
                Ok(Ended::Relist(why)) => {
                    info!(cluster = %self.name, reason = %why, "listing the remote cluster again");
                    tokio::time::sleep(backoff.after(started.elapsed())).await;
                    continue;
                }
                Ok(Ended::OverLimit(why)) => {
                    warn!(cluster = %self.name, reason = %why, retry_in = ?OVER_LIMIT_RETRY, "remote cluster refused");
                    tokio::time::sleep(OVER_LIMIT_RETRY).await;
                    continue;
                }
                Ok(Ended::Lost(why)) => why,
                Err(e) => format!("{e:#}"),
            };
            warn!(cluster = %self.name, reason = %reason, "remote cluster disconnected");
            self.remotes.update_in(self.scope, &self.name, |rc| {
                let now = now_ms();
                rc.state = SyncState::Disconnected {
                    since_ms: now,
                    reason: reason.clone(),
                };
                // Retries do not move this: it is when the cluster was last known to be reachable (its last answer,
                // or now when it never answered). Through a fleet hub the lost connection is the hub's, not the
                // cluster's: its data stays in use (the hub's loss is not every peer's), and its heartbeat judges it
                // again once the hub is back.
                if !self.via_hub() {
                    rc.unreachable_since_ms
                        .get_or_insert(rc.last_alive_ms.unwrap_or(now).min(now));
                }
            });
            tokio::time::sleep(backoff.after(started.elapsed())).await;
        }
    }

    /// The grant of a cluster whose config is `config`: a peer's pins win over what it publishes; this cluster's
    /// own etcd is held to this cluster's name and id.
    fn grant_for(&self, config: Option<&ClusterConfig>) -> Option<Grant> {
        match self.scope {
            Scope::Own => Some(Grant {
                cluster: self.me.cluster.clone(),
                cluster_id: self.me.cluster_id,
                pod_cidrs: None,
            }),
            Scope::Peer => config.map(|c| Grant {
                cluster: self.name.clone(),
                cluster_id: self.cfg.cluster_id.unwrap_or(c.id),
                pod_cidrs: self.cfg.pod_cidrs.clone(),
            }),
        }
    }

    /// Whether the peer is read through a fleet hub: its peer file's prefix is `<prefix>/clusters/<cluster>`
    /// ([`Keys::hub_cluster_prefix`], as `meshctl clustermesh hub connect` writes it).
    fn via_hub(&self) -> bool {
        let suffix = format!("/clusters/{}", self.name);
        self.scope == Scope::Peer
            && self
                .cfg
                .prefix
                .as_deref()
                .is_some_and(|p| p.trim_end_matches('/').ends_with(&suffix))
    }

    /// Through a fleet hub: why the cluster counts unreachable, and since when (its last heartbeat seen), when no
    /// new heartbeat came for longer than the heartbeat timeout.
    fn silent(&self, s: &Session) -> Option<(String, u64)> {
        let timeout = self.remotes.heartbeat_timeout();
        if !s.via_hub || timeout.is_zero() {
            return None;
        }
        let age = now_ms().saturating_sub(s.heartbeat_seen_ms);
        (u128::from(age) > timeout.as_millis()).then(|| {
            (
                format!(
                    "no new heartbeat of the cluster in the hub for {:.1}s (--remote-heartbeat-timeout {:?}): its \
                     apiserver stopped publishing",
                    Duration::from_millis(age).as_secs_f64(),
                    timeout
                ),
                s.heartbeat_seen_ms,
            )
        })
    }

    /// Through a fleet hub: how long until the heartbeat gets too old (`None`: not judged, or already silent).
    fn silent_in(&self, s: &Session) -> Option<Duration> {
        let timeout = self.remotes.heartbeat_timeout();
        if !s.via_hub || s.silent || timeout.is_zero() {
            return None;
        }
        let age = Duration::from_millis(now_ms().saturating_sub(s.heartbeat_seen_ms));
        Some(timeout.saturating_sub(age) + Duration::from_millis(1))
    }

    fn new_session(&self) -> Session {
        let cache_suffix = format!("/kvstoremesh/{}", self.name);
        // Through a hub the heartbeat's age counts from the session's start: time without the hub is not the
        // peer's silence. A peer found silent before stays so until a new heartbeat comes.
        let silent_since = self.remotes.read(self.scope, |m| {
            m.get(&self.name).and_then(|rc| rc.unreachable_since_ms)
        });
        Session {
            via_hub: self.via_hub(),
            heartbeat_seen_ms: silent_since.unwrap_or_else(now_ms),
            via_cache: self
                .cfg
                .prefix
                .as_deref()
                .is_some_and(|p| p.trim_end_matches('/').ends_with(&cache_suffix)),
            grant: self.grant_for(None),
            check_cidrs: self.scope == Scope::Peer && self.cfg.pod_cidrs.is_none(),
            full_publish: true,
            ..Session::default()
        }
    }

    /// Where the cluster's config differs from its peer file's pins.
    fn mismatches(&self, config: &ClusterConfig) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(id) = self.cfg.cluster_id.filter(|id| *id != config.id) {
            out.push(format!(
                "publishes cluster id {}, the peer file pins {id}: only records with id {id} are accepted",
                config.id
            ));
        }
        if let Some(l) = self.cfg.cluster_labels.as_ref().filter(|l| **l != config.labels) {
            out.push(format!(
                "publishes cluster labels {:?}, the peer file pins {l:?}: selectors match the pinned ones",
                config.labels
            ));
        }
        out
    }

    fn publish(&self, s: &mut Session) {
        let my_id = self.me.cluster_id;
        let name = self.name.clone();
        let own = self.scope == Scope::Own;
        let mut usable = false;
        self.remotes.update_with_others(self.scope, &self.name, |rc, others| {
            // A refusal cleared the cluster's data: the next accepted state is compared key by key.
            let was_refused = !rc.usable;
            rc.config.clone_from(&s.config);
            rc.pending_records = s.pending_ips.len() + s.pending_services.len();
            if !own {
                rc.pinned_labels.clone_from(&self.cfg.cluster_labels);
                rc.grant_mismatches = s.config.as_ref().map(|c| self.mismatches(c)).unwrap_or_default();
            }
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
            // A peer says who it is in its cluster config: without it nothing it publishes can be checked.
            rc.cluster_id = s.grant.as_ref().map(|g| g.cluster_id);
            let Some(grant) = s.grant.as_ref() else {
                if rc.usable {
                    warn!(cluster = %name, "remote etcd has no cluster config for the cluster; ignoring its data");
                }
                rc.refuse(format!(
                    "no valid cluster config at {}: a peer must publish its name and id there; none of its data is \
                     used",
                    self.keys.cluster_config(&name)
                ));
                return;
            };
            // A cluster id belongs to one cluster: a second remote cluster with an id in use is refused, and the
            // one that has it keeps its state.
            if !own
                && let Some((other, _)) = others.iter().find(|(n, o)| {
                    **n != name
                        && o.usable
                        && o.cluster_id == Some(grant.cluster_id)
                })
            {
                if rc.usable {
                    warn!(cluster = %name, id = grant.cluster_id, other = %other, "remote cluster uses another remote cluster's id; ignoring its data");
                }
                rc.refuse(format!(
                    "cluster id {} is already used by remote cluster {other:?}; none of this cluster's data is used",
                    grant.cluster_id
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
            if !own && grant.cluster_id == my_id {
                if rc.usable {
                    warn!(cluster = %name, id = grant.cluster_id, "remote cluster uses this cluster's id; ignoring its data");
                }
                rc.refuse(format!(
                    "cluster id {} is also this cluster's id; none of its data is used",
                    grant.cluster_id
                ));
                return;
            }
            rc.usable = true;
            usable = true;
            // Through a KVStoreMesh cache whose own connection to the cluster is down: the cached data stays (as
            // with a direct connection that broke), and the cluster counts as unreachable since the cache last
            // heard from it.
            // A cache whose status is gone (its lease expired: the mirror stopped or hangs) is silent: the same.
            let lost = match &s.upstream {
                Some(up) if !up.connected => Some((
                    format!("the KVStoreMesh cache lost the cluster: {}", up.reason),
                    up.last_alive_ms,
                )),
                None if s.via_cache => Some((
                    "the KVStoreMesh cache is silent: its status key is missing (the mirror is not running, or its \
                     lease expired)"
                        .to_owned(),
                    s.upstream_alive_ms.unwrap_or_else(now_ms),
                )),
                _ => None,
            };
            if let Some((reason, last_alive_ms)) = lost {
                if !matches!(rc.state, SyncState::Disconnected { .. }) {
                    rc.state = SyncState::Disconnected {
                        since_ms: now_ms(),
                        reason,
                    };
                }
                rc.unreachable_since_ms
                    .get_or_insert(last_alive_ms.min(now_ms()));
                return;
            }
            // Through a fleet hub, a cluster whose heartbeat stopped changing is offline (its apiserver cannot
            // reach the hub, or is gone): unreachable since its last heartbeat, as a peer whose etcd is lost. Its
            // records keep following the hub meanwhile (they change no more, or vanish with their lease).
            let silent = self.silent(s);
            s.silent = silent.is_some();
            if let Some((reason, since)) = silent {
                if !matches!(rc.state, SyncState::Disconnected { .. }) {
                    warn!(cluster = %name, reason = %reason, "remote cluster silent in the hub");
                    rc.state = SyncState::Disconnected {
                        since_ms: now_ms(),
                        reason,
                    };
                }
                rc.unreachable_since_ms.get_or_insert(since.min(now_ms()));
            }
            // This cluster's own etcd is complete once its identities are (its nodes come from the source).
            let complete = if own { s.identities_synced } else { s.synced };
            if complete {
                if !s.settled {
                    // The nodes that went while the cluster was not listened to free their pod CIDRs.
                    s.settled = true;
                    for (node, old) in rc.nodes.iter().filter(|(n, _)| !s.nodes.contains_key(*n)) {
                        self.remotes.release(&name, node, &old.pod_cidrs);
                    }
                }
                if !s.silent {
                    if !matches!(rc.state, SyncState::Synced { .. }) {
                        rc.state = SyncState::Synced { since_ms: now_ms() };
                        rc.syncs += 1;
                    }
                    rc.unreachable_since_ms = None;
                }
            }
            // Only the keys that changed since the last publish are compared, except after a list or a refusal
            // (every key) and when a kind becomes the truth (its synced marker: what is absent goes).
            // Every record was checked against the cluster's grant when it was decoded.
            let full = s.full_publish || was_refused;
            let truth = [complete, s.services_synced, s.identities_synced, s.ips_synced];
            let whole = |i: usize| full || (truth[i] && !s.truth_published[i]);
            let dirty = std::mem::take(&mut s.dirty);
            let mut changed = ClusterChanges::default();
            sync_keys(&mut rc.nodes, &s.nodes, &dirty.nodes, whole(0), truth[0], Arc::ptr_eq, Arc::clone, &mut changed.nodes);
            let mut backends = rc.backend_count;
            let before: Vec<(String, usize)> = if whole(1) {
                Vec::new()
            } else {
                dirty
                    .services
                    .iter()
                    .map(|k| (k.clone(), rc.services.get(k).map_or(0, |r| r.backends.len())))
                    .collect()
            };
            sync_keys(&mut rc.services, &s.services, &dirty.services, whole(1), truth[1], Arc::ptr_eq, Arc::clone, &mut changed.services);
            if whole(1) {
                backends = rc.services.values().map(|r| r.backends.len()).sum();
            } else {
                for (k, was) in before {
                    backends = backends.saturating_sub(was) + rc.services.get(&k).map_or(0, |r| r.backends.len());
                }
            }
            rc.backend_count = backends;
            sync_keys(&mut rc.identities, &s.identities, &dirty.identities, whole(2), truth[2], Arc::ptr_eq, Arc::clone, &mut changed.identities);
            sync_keys(&mut rc.ips, &s.ips, &dirty.ips, whole(3), truth[3], Arc::ptr_eq, Arc::clone, &mut changed.ips);
            // Capacities are part of the ips: the same marker makes the session's set the truth.
            sync_keys(&mut rc.capacities, &s.capacities, &dirty.capacities, whole(3), truth[3], |a, b| a == b, |v| *v, &mut changed.capacities);
            if !changed.identities.is_empty() {
                rc.identity_generation += 1;
            }
            s.full_publish = false;
            s.truth_published = truth;
            rc.changes.merge(changed);
        });
        if !own {
            self.remotes.activate_claims(&self.name, usable);
        }
    }

    /// Skips a value: logged, counted by reason, and kept among the cluster's recent refusals.
    fn refuse_record(&self, what: &str, e: &DecodeError) {
        warn!(cluster = %self.name, error = %e, "skipping {what}");
        let line = e.to_string();
        self.remotes.update_in(self.scope, &self.name, |rc| {
            *rc.decode_errors.entry(e.reason().to_owned()).or_default() += 1;
            if rc.recent_refusals.len() == RECENT_REFUSALS {
                rc.recent_refusals.pop_front();
            }
            rc.recent_refusals.push_back(line);
        });
    }

    fn count_error(&self, reason: &str) {
        self.remotes.update_in(self.scope, &self.name, |rc| {
            *rc.decode_errors.entry(reason.to_owned()).or_default() += 1
        });
    }

    /// Takes an accepted node record: its pod CIDRs are claimed (refused when they overlap another cluster's),
    /// and held records they cover are used.
    /// A node refused for an overlap is retried now and then (see [`Self::retry_overlapping`]): once the first
    /// claimant lets go, every agent comes to accept it. Returns whether it was accepted.
    fn accept_node(&self, s: &mut Session, key: &str, node: &str, rec: NodeRecord, retry: bool) -> bool {
        if self.scope == Scope::Peer
            && let Err(e) = self.remotes.claim(key, &self.name, node, &rec.pod_cidrs)
        {
            if !retry {
                self.refuse_record("node record", &e);
            }
            s.overlapping.insert(node.to_owned(), (key.to_owned(), rec));
            return false;
        }
        s.overlapping.remove(node);
        let rec = Arc::new(rec);
        s.dirty.nodes.insert(node.to_owned());
        if let Some(old) = s.nodes.insert(node.to_owned(), rec.clone()) {
            let gone: Vec<Ipv4Net> = old
                .pod_cidrs
                .iter()
                .filter(|c| !rec.pod_cidrs.contains(c))
                .copied()
                .collect();
            self.remotes.release(&self.name, node, &gone);
            s.add_cidrs(&rec.pod_cidrs);
            s.remove_cidrs(&old.pod_cidrs);
        } else {
            s.add_cidrs(&rec.pod_cidrs);
        }
        true
    }

    /// Tries the nodes refused for overlapping another cluster's claim again (their claimant may be gone); returns
    /// whether one was accepted.
    fn retry_overlapping(&self, s: &mut Session) -> bool {
        let mut accepted = false;
        for (node, (key, rec)) in std::mem::take(&mut s.overlapping) {
            accepted |= self.accept_node(s, &key, &node, rec, true);
        }
        accepted
    }

    /// Applies one key/value (None = deleted) to the session.
    fn apply(&self, s: &mut Session, key: &str, value: Option<&[u8]>) {
        let kind = self.keys.classify(&self.name, key);
        if matches!(
            kind,
            KeyKind::ClusterConfig | KeyKind::Other | KeyKind::Synced(_) | KeyKind::Heartbeat
        ) {
            return self.apply_meta(s, kind, key, value);
        }
        // Without a grant (a peer whose config is not known) no record of the cluster is read.
        let Some(grant) = s.grant.take() else { return };
        self.apply_record(s, &grant, kind, key, value);
        s.grant = Some(grant);
    }

    /// Applies one record of the cluster's state, decoded with its grant.
    fn apply_record(
        &self,
        s: &mut Session,
        grant: &Grant,
        kind: KeyKind<'_>,
        key: &str,
        value: Option<&[u8]>,
    ) {
        match kind {
            // This cluster's nodes and services come from the agent's source, never from its etcd.
            KeyKind::Node(_) | KeyKind::Service(..) | KeyKind::BackendSlice(..)
                if self.scope == Scope::Own => {}
            // A peer's backends come with their weights in its service records.
            KeyKind::Capacity(_) if self.scope == Scope::Peer => {}
            KeyKind::Capacity(ip) => match value {
                None => {
                    s.capacities.remove(&ip);
                    s.dirty.capacities.insert(ip);
                }
                Some(v) => match mesh_kvstore::decode_capacity(key, ip, v) {
                    Ok(rec) => {
                        s.capacities.insert(ip, rec.capacity);
                        s.dirty.capacities.insert(ip);
                    }
                    Err(e) => self.refuse_record("capacity record", &e),
                },
            },
            KeyKind::Identity(number) => match value {
                None => s.remove_identity_number(number),
                Some(v) => match grant.decode_identity(key, number, v) {
                    Ok(rec) => {
                        // One record per number (the id is the granted one: one identity per number).
                        s.remove_identity_number(number);
                        s.dirty.identities.insert(rec.identity);
                        s.identities.insert(rec.identity, Arc::new(rec));
                    }
                    Err(e) => self.refuse_record("identity record", &e),
                },
            },
            KeyKind::Ip(ip) => match value {
                None => {
                    s.ips.remove(&ip);
                    s.pending_ips.remove(&ip);
                    s.dirty.ips.insert(ip);
                }
                Some(v) => match grant.decode_ip(key, ip, v) {
                    Ok(rec) if s.covered(ip) => {
                        s.pending_ips.remove(&ip);
                        s.ips.insert(ip, Arc::new(rec));
                        s.dirty.ips.insert(ip);
                    }
                    Ok(rec) => {
                        // No accepted node CIDR covers it (yet): held until one does.
                        debug!(cluster = %self.name, key, "pod address outside the accepted node CIDRs; held");
                        s.pending_ips.insert(ip, Arc::new(rec));
                    }
                    Err(e) => self.refuse_record("ip record", &e),
                },
            },
            KeyKind::Node(node) => match value {
                None => {
                    s.overlapping.remove(node);
                    s.dirty.nodes.insert(node.to_owned());
                    if let Some(old) = s.nodes.remove(node) {
                        self.remotes.release(&self.name, node, &old.pod_cidrs);
                        s.remove_cidrs(&old.pod_cidrs);
                    }
                }
                Some(v) => match grant.decode_node(key, node, v) {
                    Ok(rec) => {
                        self.accept_node(s, key, node, rec, false);
                    }
                    Err(e) => self.refuse_record("node record", &e),
                },
            },
            KeyKind::Service(ns, name) => {
                let id = format!("{ns}/{name}");
                match value {
                    None => {
                        s.services.remove(&id);
                        s.pending_services.remove(&id);
                        s.dirty.services.insert(id.clone());
                        if let Some(parts) = s.sliced.get_mut(&id) {
                            parts.record = None;
                        }
                    }
                    Some(v) => match grant.decode_service(key, ns, name, v) {
                        Ok(rec) => match s.sliced.get_mut(&id) {
                            Some(parts) => {
                                parts.record = Some(rec);
                                self.assemble(s, key, &id);
                            }
                            None => self.accept_service(s, key, id, rec),
                        },
                        Err(e) => self.refuse_record("service record", &e),
                    },
                }
            }
            KeyKind::BackendSlice(ns, name, index) => {
                let id = format!("{ns}/{name}");
                match value {
                    None => {
                        let Some(parts) = s.sliced.get_mut(&id) else {
                            return;
                        };
                        if parts.slices.remove(&index).is_none() {
                            return;
                        }
                        if parts.slices.is_empty() && parts.record.is_none() {
                            s.sliced.remove(&id);
                            return;
                        }
                        self.assemble(s, key, &id);
                    }
                    Some(v) => match grant.decode_backend_slice(key, ns, name, index, v) {
                        Ok(slice) => {
                            if !s.sliced.contains_key(&id) {
                                // The service's record, read before its first slice, is its base.
                                let record = s
                                    .pending_services
                                    .get(&id)
                                    .or_else(|| s.services.get(&id))
                                    .map(|r| (**r).clone());
                                s.sliced.insert(
                                    id.clone(),
                                    SlicedService {
                                        record,
                                        slices: BTreeMap::new(),
                                    },
                                );
                            }
                            if let Some(parts) = s.sliced.get_mut(&id) {
                                parts.slices.insert(index, slice.backends);
                            }
                            self.assemble(s, key, &id);
                        }
                        Err(e) => self.refuse_record("backend slice", &e),
                    },
                }
            }
            KeyKind::UnknownVersion(v) => {
                debug!(cluster = %self.name, key, version = v, "skipping record of unknown schema version");
                self.count_error("unknown_version");
            }
            KeyKind::ClusterConfig | KeyKind::Other | KeyKind::Synced(_) | KeyKind::Heartbeat => {}
        }
    }

    /// Uses a service record whose backends accepted node CIDRs cover; else holds it (the service's last good
    /// record stays) until a node record does.
    fn accept_service(&self, s: &mut Session, key: &str, id: String, rec: ServiceRecord) {
        if rec.backends.iter().all(|b| s.covered(b.ipv4)) {
            s.pending_services.remove(&id);
            s.dirty.services.insert(id.clone());
            s.services.insert(id, Arc::new(rec));
        } else {
            debug!(cluster = %self.name, key, "backends outside the accepted node CIDRs; held");
            s.pending_services.insert(id, Arc::new(rec));
        }
    }

    /// A sliced service's record with the backends of every slice (an address in several: the first), once its
    /// record is there.
    fn assemble(&self, s: &mut Session, key: &str, id: &str) {
        let Some(parts) = s.sliced.get(id) else { return };
        let Some(base) = &parts.record else { return };
        let mut rec = base.clone();
        let mut seen: std::collections::HashSet<Ipv4Addr> = rec.backends.iter().map(|b| b.ipv4).collect();
        for b in parts.slices.values().flatten() {
            if seen.insert(b.ipv4) {
                rec.backends.push(b.clone());
            }
        }
        self.accept_service(s, key, id.to_owned(), rec);
    }

    /// Applies a key that is not a record of the cluster's state: its config, synced markers, a KVStoreMesh status,
    /// other clusters' configs.
    fn apply_meta(&self, s: &mut Session, kind: KeyKind<'_>, key: &str, value: Option<&[u8]>) {
        match kind {
            KeyKind::Synced(mesh_kvstore::kinds::NODES) => s.synced = value.is_some(),
            KeyKind::Synced(mesh_kvstore::kinds::SERVICES) => s.services_synced = value.is_some(),
            KeyKind::Synced(mesh_kvstore::kinds::IDENTITIES) => s.identities_synced = value.is_some(),
            KeyKind::Synced(mesh_kvstore::kinds::IPS) => s.ips_synced = value.is_some(),
            KeyKind::ClusterConfig => {
                let config = match value {
                    None => None,
                    Some(v) => match mesh_kvstore::decode_cluster_config(key, &self.name, v) {
                        Ok(c) => Some(c),
                        Err(e) => {
                            // The last good config stays.
                            self.refuse_record("cluster config", &e);
                            return;
                        }
                    },
                };
                let grant = self.grant_for(config.as_ref());
                if s.listed && grant != s.grant {
                    // What was accepted (or skipped) under the old grant may change: list everything again.
                    s.relist = Some(format!(
                        "the cluster's grant changed (cluster id {:?} → {:?})",
                        s.grant.as_ref().map(|g| g.cluster_id),
                        grant.as_ref().map(|g| g.cluster_id)
                    ));
                }
                s.config = config;
                s.grant = grant;
            }
            // Through a hub, a heartbeat that differs from the last one seen (also in an earlier session) is news
            // from the cluster.
            KeyKind::Heartbeat if s.via_hub => {
                let Some(v) = value else { return };
                match serde_json::from_slice::<mesh_kvstore::Heartbeat>(v) {
                    Ok(hb) => {
                        let mut new = false;
                        self.remotes.note(self.scope, &self.name, |rc| {
                            new = rc.heartbeat_ms != Some(hb.time_ms);
                            rc.heartbeat_ms = Some(hb.time_ms);
                        });
                        if new {
                            s.heartbeat_seen_ms = now_ms();
                        }
                    }
                    Err(e) => {
                        // The last good heartbeat stays what the cluster is judged by.
                        warn!(cluster = %self.name, error = %e, "skipping malformed heartbeat");
                        self.count_error("bad_json");
                    }
                }
            }
            KeyKind::Other if key == self.keys.kvstoremesh_status() => {
                s.upstream = match value {
                    None => None,
                    Some(v) => match serde_json::from_slice::<mesh_kvstore::KvstoremeshStatus>(v) {
                        Ok(st) => {
                            s.upstream_alive_ms = Some(st.last_alive_ms);
                            Some(st)
                        }
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
            _ => {}
        }
    }

    #[instrument(skip_all, fields(cluster = %self.name))]
    async fn session(&self) -> anyhow::Result<Ended> {
        self.remotes.update_in(self.scope, &self.name, |rc| {
            rc.state = SyncState::Connecting { since_ms: now_ms() }
        });
        let opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(5))
            .with_keep_alive(
                keepalive_interval(),
                keepalive_interval().min(Duration::from_secs(3)),
            );
        let (opts, tls) = match tls_options(&self.cfg)? {
            Some((tls, pem)) => (opts.with_tls(tls), pem),
            None => (opts, Vec::new()),
        };
        // One client per distinct etcd, shared with the other watchers (a hub's peers, KVStoreMesh caches).
        let target = crate::etcd_pool::Target {
            endpoints: self.cfg.endpoints.clone(),
            tls,
        };
        let conn = crate::etcd_pool::pool().get(target, opts).await?;
        let result = self.session_on(&conn).await;
        if let Err(e) = &result {
            crate::etcd_pool::pool().ended(&conn, e.as_ref()).await;
        }
        result
    }

    /// A session on a (shared) client.
    async fn session_on(&self, conn: &crate::etcd_pool::Conn) -> anyhow::Result<Ended> {
        let client = &conn.client;
        self.remotes.update_in(self.scope, &self.name, |rc| {
            rc.state = SyncState::Syncing { since_ms: now_ms() }
        });
        let root = self.keys.root();
        // The list comes in pages (one consistent revision): a cluster's state can be far larger than one gRPC
        // message (4 MiB by default; the limit is raised too, for pages of large records).
        let limits = self.remotes.limits();
        let (records, revision) = match mesh_kvstore::etcd::list_paged_within(client, &root, limits).await {
            Ok(listed) => listed,
            Err(mesh_kvstore::etcd::ListError::OverLimit(o)) => return Ok(self.over_limit(&o)),
            Err(mesh_kvstore::etcd::ListError::Etcd(e)) => return Err(e.into()),
        };
        // What the cluster makes this watcher hold, kept up to date by the watch (its events carry the previous
        // value).
        let mut held_keys = u64::try_from(records.len()).unwrap_or(u64::MAX);
        let mut held_bytes: u64 = records
            .iter()
            .map(|(k, v)| mesh_kvstore::etcd::entry_bytes(k.as_bytes(), v))
            .sum();
        // Keys come in order: the cluster config (and so the grant) before any record.
        let mut s = self.new_session();
        for (k, v) in &records {
            self.apply(&mut s, k, Some(v));
        }
        drop(records);
        s.listed = true;
        info!(
            nodes = s.nodes.len(),
            identities = s.identities.len(),
            ips = s.ips.len(),
            synced = s.synced,
            revision,
            "listed remote cluster"
        );
        self.publish(&mut s);
        let mut stream = mesh_kvstore::etcd::watch_client(client)
            .watch(
                root.as_str(),
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_prev_key()
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
            // Through a hub: wakes when the peer's heartbeat gets too old (a new one moves the deadline).
            let silent_in = self.silent_in(&s);
            let resp = tokio::select! {
                () = async {
                    match silent_in {
                        Some(d) => tokio::time::sleep(d).await,
                        None => std::future::pending().await,
                    }
                } => {
                    self.publish(&mut s);
                    continue;
                }
                msg = stream.message() => match msg? {
                    Some(resp) => {
                        conn.answered();
                        resp
                    }
                    None => return Ok(Ended::Lost("watch stream ended".to_owned())),
                },
                _ = probe.tick() => {
                    // The sessions sharing the client prove it alive for each other: a probe only when nobody's
                    // answer is younger than half an interval.
                    if conn.answered_within(probe_every / 2) {
                        self.alive();
                    } else {
                        let get = kv.get(heartbeat.as_str(), Some(GetOptions::new().with_keys_only()));
                        match tokio::time::timeout(probe_timeout, get).await {
                            Ok(Ok(_)) => {
                                conn.answered();
                                self.alive();
                            }
                            Ok(Err(e)) => {
                                anyhow::bail!(anyhow::Error::new(e).context("liveness probe failed"))
                            }
                            Err(_) => anyhow::bail!(crate::etcd_pool::Unreachable(format!(
                                "liveness probe got no answer within {probe_timeout:?}"
                            ))),
                        }
                    }
                    if !s.overlapping.is_empty() && self.retry_overlapping(&mut s) {
                        self.publish(&mut s);
                    }
                    // Another session found this client's endpoint unreachable and retired it: move to the
                    // current client (one connection per distinct etcd), keeping the data meanwhile.
                    if !crate::etcd_pool::pool().is_current(conn).await {
                        return Ok(Ended::Relist(format!(
                            "the shared client of {} was retired; moving to the current one",
                            conn.endpoint
                        )));
                    }
                    continue;
                }
            };
            if resp.canceled() {
                anyhow::bail!("watch canceled by etcd: {}", resp.cancel_reason());
            }
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                let prev = ev
                    .prev_kv()
                    .map(|p| mesh_kvstore::etcd::entry_bytes(p.key(), p.value()));
                match (ev.event_type(), prev) {
                    (EventType::Put, Some(p)) => held_bytes = held_bytes.saturating_sub(p),
                    (EventType::Put, None) => held_keys = held_keys.saturating_add(1),
                    (EventType::Delete, p) => {
                        held_keys = held_keys.saturating_sub(1);
                        held_bytes = held_bytes.saturating_sub(p.unwrap_or(0));
                    }
                }
                if ev.event_type() == EventType::Put {
                    held_bytes =
                        held_bytes.saturating_add(mesh_kvstore::etcd::entry_bytes(kv.key(), kv.value()));
                }
                let Ok(k) = kv.key_str() else { continue };
                match ev.event_type() {
                    EventType::Put => self.apply(&mut s, k, Some(kv.value())),
                    EventType::Delete => self.apply(&mut s, k, None),
                }
            }
            if let Err(o) = limits.check(held_keys, held_bytes) {
                return Ok(self.over_limit(&o));
            }
            if let Some(why) = s.relist.take() {
                return Ok(Ended::Relist(why));
            }
            self.publish(&mut s);
            self.alive();
        }
    }

    /// Refuses the cluster for holding more than the limits: none of its data is used (nor held) until a later list
    /// fits.
    fn over_limit(&self, o: &mesh_kvstore::etcd::OverLimit) -> Ended {
        let reason = format!(
            "the cluster {o} (--remote-max-keys, --remote-max-bytes); none of its data is used; listed again in {}s",
            OVER_LIMIT_RETRY.as_secs()
        );
        self.remotes.update_in(self.scope, &self.name, |rc| {
            *rc.decode_errors.entry("over_limit".to_owned()).or_default() += 1;
            rc.refuse(reason.clone());
        });
        if self.scope == Scope::Peer {
            self.remotes.activate_claims(&self.name, false);
        }
        Ended::OverLimit(reason)
    }

    /// Records that the remote cluster answered just now.
    fn alive(&self) {
        let now = now_ms();
        self.remotes
            .note(self.scope, &self.name, |rc| rc.last_alive_ms = Some(now));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn a_claim_conflicts_with_overlapping_prefixes_of_other_active_clusters_only() {
        let mut c = Claims::default();
        c.add("east", "east-node-1", net("10.1.0.0/24"));
        c.add("west", "west-node-1", net("10.2.1.0/24"));
        let conflict = |c: &Claims, cluster: &str, p: &str| c.conflict(cluster, net(p));
        // Equal, inside (more specific: it would win the lookup), around.
        assert_eq!(
            conflict(&c, "north", "10.1.0.0/24"),
            Some((net("10.1.0.0/24"), "east".into()))
        );
        assert_eq!(
            conflict(&c, "north", "10.1.0.128/25"),
            Some((net("10.1.0.0/24"), "east".into()))
        );
        assert_eq!(
            conflict(&c, "north", "10.0.0.0/8"),
            Some((net("10.1.0.0/24"), "east".into()))
        );
        assert_eq!(conflict(&c, "north", "10.3.0.0/16"), None);
        assert_eq!(conflict(&c, "north", "10.1.1.0/24"), None, "a neighbour");
        // A cluster's own claims never conflict with its records.
        assert_eq!(conflict(&c, "west", "10.2.1.0/25"), None);
        // A refused cluster's claims do not count; removed ones neither.
        c.inactive.insert("west".into());
        assert_eq!(conflict(&c, "north", "10.2.1.0/24"), None);
        c.inactive.clear();
        c.remove("west", "west-node-1", net("10.2.1.0/24"));
        assert_eq!(conflict(&c, "north", "10.2.1.0/24"), None);
        assert!(!c.by_prefix.contains_key(&net("10.2.1.0/24")));
        // Two nodes of one cluster naming one prefix: it stays claimed until both are gone.
        c.add("west", "a", net("10.2.2.0/24"));
        c.add("west", "b", net("10.2.2.0/24"));
        c.remove("west", "a", net("10.2.2.0/24"));
        assert!(conflict(&c, "north", "10.2.2.0/24").is_some());
        c.remove_cluster("west");
        assert_eq!(conflict(&c, "north", "10.2.2.0/24"), None);
    }

    #[test]
    fn held_records_are_used_once_a_node_cidr_covers_them_and_held_again_when_it_goes() {
        let mut s = Session {
            check_cidrs: true,
            ..Session::default()
        };
        let a = Ipv4Addr::new(10, 2, 1, 5);
        let rec = Arc::new(IpRecord {
            ipv4: a,
            cluster: "west".into(),
            identity: mesh_common::identity::compose(2, 300),
            namespace: "shop".into(),
            pod: "p".into(),
            node: "west-node-1".into(),
            named_ports: vec![],
        });
        assert!(!s.covered(a));
        s.pending_ips.insert(a, rec);
        s.add_cidrs(&[net("10.2.1.0/24")]);
        assert!(s.covered(a) && s.ips.contains_key(&a) && s.pending_ips.is_empty());
        // A second node naming a prefix around it: removing the first keeps it covered.
        s.add_cidrs(&[net("10.2.0.0/16")]);
        s.remove_cidrs(&[net("10.2.1.0/24")]);
        assert!(s.ips.contains_key(&a));
        s.remove_cidrs(&[net("10.2.0.0/16")]);
        assert!(!s.ips.contains_key(&a) && s.pending_ips.contains_key(&a));
        // Pinned CIDRs were checked when decoding: nothing is held.
        let pinned = Session::default();
        assert!(pinned.covered(a));
    }
}
