//! The kvstore schema: where each record lives in a cluster's etcd and what it holds.
//!
//! ```text
//! <prefix>/cluster-config/<cluster>                      ClusterConfig   (no lease)
//! <prefix>/heartbeat/<cluster>                           Heartbeat       (lease)
//! <prefix>/synced/<cluster>/<kind>                       Synced          (lease; written after a full sync)
//! <prefix>/state/nodes/v1/<cluster>/<node>               NodeRecord      (lease)
//! <prefix>/state/services/v1/<cluster>/<ns>/<name>       ServiceRecord   (lease; global, shared services)
//! <prefix>/state/backends/v1/<cluster>/<ns>/<name>/<n>    BackendSlice    (lease; slice n of a large service)
//! <prefix>/state/identities/v1/<cluster>/<number>         IdentityRecord  (lease; security identities)
//! <prefix>/state/ip/v1/<cluster>/<ipv4>                   IpRecord        (lease; pod address → identity)
//! <prefix>/state/capacity/v1/<cluster>/<ipv4>             CapacityRecord  (lease; a pod's capacity when not 1)
//! ```
//! Values are JSON so operators can read them with `etcdctl`. Every record carries its schema version in the key;
//! a decoder returns a typed [`DecodeError`] for every malformed value, and never panics.
//!
//! Adding data: the node, service, identity and ip records refuse unknown fields, so a new field in them would make
//! the readers of earlier versions (agents of peer clusters upgraded later) skip the record. New per-pod facts get
//! their own key family instead (earlier readers classify its keys as [`KeyKind::Other`] and ignore them), as the
//! capacity records do; their records accept unknown fields, so that they can grow.

pub mod etcd;
pub mod etcd_pool;
pub mod grant;
pub mod peer;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

/// Default key prefix.
pub const DEFAULT_PREFIX: &str = "fleetmesh";
/// Largest value a decoder accepts (anything bigger is refused before parsing).
pub const MAX_VALUE_BYTES: usize = 64 * 1024;

/// Kinds of synced data, named in the synced marker key.
pub mod kinds {
    pub const NODES: &str = "nodes";
    pub const SERVICES: &str = "services";
    pub const IDENTITIES: &str = "identities";
    pub const IPS: &str = "ips";
}

/// Key builders for one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Default for Keys {
    fn default() -> Self {
        Self::new(DEFAULT_PREFIX)
    }
}

impl Keys {
    #[must_use]
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.trim_end_matches('/').to_owned(),
        }
    }

    #[must_use]
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Everything a cluster publishes about itself lives under keys naming it; this is the common root.
    #[must_use]
    pub fn root(&self) -> String {
        format!("{}/", self.prefix)
    }

    #[must_use]
    pub fn cluster_config(&self, cluster: &str) -> String {
        format!("{}/cluster-config/{cluster}", self.prefix)
    }

    /// Written by a KVStoreMesh cache under the prefix it mirrors a cluster to: whether it is connected to that
    /// cluster (`<prefix>/kvstoremesh/<cluster>/kvstoremesh-status`).
    #[must_use]
    pub fn kvstoremesh_status(&self) -> String {
        format!("{}/kvstoremesh-status", self.prefix)
    }

    /// The prefix a KVStoreMesh cache mirrors `cluster`'s records to (what agents use as `prefix:`).
    #[must_use]
    pub fn kvstoremesh_prefix(&self, cluster: &str) -> String {
        format!("{}/kvstoremesh/{cluster}", self.prefix)
    }

    /// The prefix a cluster publishes its records under in a fleet hub (`<prefix>/clusters/<cluster>`): the hub's
    /// etcd user of that cluster may write there only, and readers list and watch one peer with one range
    /// (docs/fleet-hub.md). Below it the layout is a cluster's own etcd's.
    #[must_use]
    pub fn hub_cluster_prefix(&self, cluster: &str) -> String {
        format!("{}/clusters/{cluster}", self.prefix)
    }

    #[must_use]
    pub fn heartbeat(&self, cluster: &str) -> String {
        format!("{}/heartbeat/{cluster}", self.prefix)
    }

    #[must_use]
    pub fn synced(&self, cluster: &str, kind: &str) -> String {
        format!("{}/synced/{cluster}/{kind}", self.prefix)
    }

    /// Prefix of all node records of `cluster` (ends with `/`).
    #[must_use]
    pub fn nodes_prefix(&self, cluster: &str) -> String {
        format!("{}/state/nodes/v1/{cluster}/", self.prefix)
    }

    #[must_use]
    pub fn node(&self, cluster: &str, node: &str) -> String {
        format!("{}{node}", self.nodes_prefix(cluster))
    }

    /// Prefix of all service records of `cluster` (ends with `/`).
    #[must_use]
    pub fn services_prefix(&self, cluster: &str) -> String {
        format!("{}/state/services/v1/{cluster}/", self.prefix)
    }

    #[must_use]
    pub fn service(&self, cluster: &str, namespace: &str, name: &str) -> String {
        format!("{}{namespace}/{name}", self.services_prefix(cluster))
    }

    /// Prefix of all backend slices of `cluster` (ends with `/`).
    #[must_use]
    pub fn backend_slices_prefix(&self, cluster: &str) -> String {
        format!("{}/state/backends/v1/{cluster}/", self.prefix)
    }

    /// Slice `index` of the backends of service `namespace/name` of `cluster`.
    #[must_use]
    pub fn backend_slice(&self, cluster: &str, namespace: &str, name: &str, index: u32) -> String {
        format!(
            "{}{namespace}/{name}/{index}",
            self.backend_slices_prefix(cluster)
        )
    }

    /// Prefix of all identity records of `cluster` (ends with `/`).
    #[must_use]
    pub fn identities_prefix(&self, cluster: &str) -> String {
        format!("{}/state/identities/v1/{cluster}/", self.prefix)
    }

    /// The record of per-cluster identity number `number` (the low 20 bits of the identity) of `cluster`.
    #[must_use]
    pub fn identity(&self, cluster: &str, number: u32) -> String {
        format!("{}{number}", self.identities_prefix(cluster))
    }

    /// Prefix of all pod address records of `cluster` (ends with `/`).
    #[must_use]
    pub fn ips_prefix(&self, cluster: &str) -> String {
        format!("{}/state/ip/v1/{cluster}/", self.prefix)
    }

    #[must_use]
    pub fn ip(&self, cluster: &str, ipv4: Ipv4Addr) -> String {
        format!("{}{ipv4}", self.ips_prefix(cluster))
    }

    /// Prefix of all capacity records of `cluster` (ends with `/`).
    #[must_use]
    pub fn capacities_prefix(&self, cluster: &str) -> String {
        format!("{}/state/capacity/v1/{cluster}/", self.prefix)
    }

    /// The capacity record of the pod at `ipv4` (published only when its capacity is not 1).
    #[must_use]
    pub fn capacity(&self, cluster: &str, ipv4: Ipv4Addr) -> String {
        format!("{}{ipv4}", self.capacities_prefix(cluster))
    }

    /// Classifies a key of `cluster`'s data. Keys of other clusters or unknown layouts give [`KeyKind::Other`].
    #[must_use]
    pub fn classify<'k>(&self, cluster: &str, key: &'k str) -> KeyKind<'k> {
        let Some(rest) = key
            .strip_prefix(self.prefix.as_str())
            .and_then(|r| r.strip_prefix('/'))
        else {
            return KeyKind::Other;
        };
        if let Some(r) = rest.strip_prefix("state/nodes/") {
            return match r.split_once('/') {
                Some(("v1", r)) => match r.split_once('/') {
                    Some((c, name)) if c == cluster && !name.is_empty() && !name.contains('/') => {
                        KeyKind::Node(name)
                    }
                    _ => KeyKind::Other,
                },
                Some((version, _)) => KeyKind::UnknownVersion(version),
                None => KeyKind::Other,
            };
        }
        if let Some(r) = rest.strip_prefix("state/services/") {
            return match r.split_once('/') {
                Some(("v1", r)) => match r.split_once('/') {
                    Some((c, r)) if c == cluster => match r.split_once('/') {
                        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                            KeyKind::Service(ns, name)
                        }
                        _ => KeyKind::Other,
                    },
                    _ => KeyKind::Other,
                },
                Some((version, _)) => KeyKind::UnknownVersion(version),
                None => KeyKind::Other,
            };
        }
        if let Some(r) = rest.strip_prefix("state/backends/") {
            return match r.split_once('/') {
                Some(("v1", r)) => match r.split_once('/') {
                    Some((c, r)) if c == cluster => {
                        let mut parts = r.split('/');
                        match (parts.next(), parts.next(), parts.next(), parts.next()) {
                            (Some(ns), Some(name), Some(n), None) if !ns.is_empty() && !name.is_empty() => {
                                match n.parse::<u32>() {
                                    Ok(index) if index.to_string() == n => {
                                        KeyKind::BackendSlice(ns, name, index)
                                    }
                                    _ => KeyKind::Other,
                                }
                            }
                            _ => KeyKind::Other,
                        }
                    }
                    _ => KeyKind::Other,
                },
                Some((version, _)) => KeyKind::UnknownVersion(version),
                None => KeyKind::Other,
            };
        }
        if let Some(r) = rest.strip_prefix("state/identities/") {
            return match r.split_once('/') {
                Some(("v1", r)) => match r.split_once('/') {
                    Some((c, n)) if c == cluster => match n.parse::<u32>() {
                        // Only the canonical spelling: `0256` or `+256` would be a second key for one number.
                        Ok(number) if number.to_string() == n => KeyKind::Identity(number),
                        _ => KeyKind::Other,
                    },
                    _ => KeyKind::Other,
                },
                Some((version, _)) => KeyKind::UnknownVersion(version),
                None => KeyKind::Other,
            };
        }
        if let Some(r) = rest.strip_prefix("state/ip/") {
            return match r.split_once('/') {
                Some(("v1", r)) => match r.split_once('/') {
                    Some((c, ip)) if c == cluster => ip.parse().map_or(KeyKind::Other, KeyKind::Ip),
                    _ => KeyKind::Other,
                },
                Some((version, _)) => KeyKind::UnknownVersion(version),
                None => KeyKind::Other,
            };
        }
        if let Some(r) = rest.strip_prefix("state/capacity/") {
            return match r.split_once('/') {
                Some(("v1", r)) => match r.split_once('/') {
                    Some((c, ip)) if c == cluster => ip.parse().map_or(KeyKind::Other, KeyKind::Capacity),
                    _ => KeyKind::Other,
                },
                Some((version, _)) => KeyKind::UnknownVersion(version),
                None => KeyKind::Other,
            };
        }
        if let Some(r) = rest.strip_prefix("synced/") {
            return match r.split_once('/') {
                Some((c, kind)) if c == cluster => KeyKind::Synced(kind),
                _ => KeyKind::Other,
            };
        }
        if rest.strip_prefix("cluster-config/") == Some(cluster) {
            return KeyKind::ClusterConfig;
        }
        if rest.strip_prefix("heartbeat/") == Some(cluster) {
            return KeyKind::Heartbeat;
        }
        KeyKind::Other
    }
}

/// What a key holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind<'k> {
    Node(&'k str),
    /// (namespace, name)
    Service(&'k str, &'k str),
    /// (namespace, name, slice index) of a large service's backends.
    BackendSlice(&'k str, &'k str, u32),
    /// The per-cluster number of an identity (the key's last segment, decimal; other segments give `Other`).
    Identity(u32),
    /// A pod address.
    Ip(Ipv4Addr),
    /// The capacity of the pod at an address.
    Capacity(Ipv4Addr),
    Synced(&'k str),
    ClusterConfig,
    Heartbeat,
    /// A record of a schema version this build does not know.
    UnknownVersion(&'k str),
    Other,
}

/// A cluster's identity, capabilities and labels.
///
/// Unknown fields are accepted here (unlike the other records): fleets upgrade cluster by cluster, and a newer
/// publisher's additions must not make older agents refuse the whole cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterConfig {
    pub name: String,
    pub id: u16,
    #[serde(default)]
    pub capabilities: Vec<String>,
    /// Cluster labels (e.g. `stage: canary`), which `TrafficPolicy` selectors match.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// A KVStoreMesh cache's connection to the cluster it mirrors.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KvstoremeshStatus {
    pub connected: bool,
    /// Unix ms of the cache's last answer from the cluster.
    pub last_alive_ms: u64,
    /// Why it is not connected (empty when connected).
    #[serde(default)]
    pub reason: String,
}

/// Liveness of a cluster's publisher.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Heartbeat {
    /// Unix time in milliseconds.
    pub time_ms: u64,
}

/// Written after a full sync of one kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Synced {
    /// Unix time in milliseconds.
    pub time_ms: u64,
    /// Number of records of the kind at that time.
    pub count: u64,
}

/// A node, as other clusters need it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeRecord {
    pub name: String,
    pub cluster: String,
    pub cluster_id: u16,
    pub underlay_ipv4: Ipv4Addr,
    pub pod_cidrs: Vec<Ipv4Net>,
    /// The node's WireGuard public key and port (docs/encryption.md); absent (and not written) while its agent
    /// does not encrypt, so records of such nodes read as before by agents that predate encryption.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wireguard: Option<mesh_model::wireguard::WireguardEndpoint>,
}

/// A port of a service or backend, matched across clusters by name (as Cilium does).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortRecord {
    #[serde(default)]
    pub name: String,
    pub port: u16,
    pub protocol: mesh_model::Protocol,
}

/// A ready backend of a service.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendRecord {
    pub ipv4: Ipv4Addr,
    /// Shared: the backends of one record that have the same ports hold one list once decoded
    /// ([`decode_service`], [`decode_backend_slice`]), so that a backend costs its address, weight and a pointer.
    pub ports: Arc<[PortRecord]>,
    /// Relative capacity (pod annotation `fleetmesh.io/capacity`); 1 by default.
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

/// A global service as its cluster shares it: the cluster's ready backends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceRecord {
    pub cluster: String,
    pub cluster_id: u16,
    pub namespace: String,
    pub name: String,
    /// The service's ports (names match backend ports).
    pub ports: Vec<PortRecord>,
    pub backends: Vec<BackendRecord>,
    /// Set when the service is exported with an MCS `ServiceExport` (absent otherwise, so that the records of
    /// services that are not exported stay what older readers accept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mcs: Option<McsRecord>,
}

/// What the clusterset DNS and ClusterSetIP imports need of an exported service (docs/clusterset-dns.md).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct McsRecord {
    /// The Service has no cluster IP (`clusterIP: None`): its name resolves to its backends' addresses.
    #[serde(default)]
    pub headless: bool,
    /// The hostname of backends that have one (pod `spec.hostname`, EndpointSlice `hostname`), by address.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub hostnames: BTreeMap<Ipv4Addr, String>,
}

/// Whether `s` is a DNS label as RFC 1123 has it, lower case: 1-63 of `a-z0-9-`, not starting or ending with `-`.
#[must_use]
pub fn is_dns_label(s: &str) -> bool {
    mesh_model::clusterset::is_dns_label(s)
}

/// Largest number of backends a decoder accepts in one service record.
pub const MAX_BACKENDS_PER_RECORD: usize = 4096;

/// Backends per slice a publisher writes by default: a service with more backends is published as a
/// [`ServiceRecord`] without backends plus [`BackendSlice`]s of at most this many, so that one backend's change
/// writes (and sends to every reader) one slice, not the whole service.
pub const DEFAULT_SLICE_SIZE: usize = 100;

/// Largest slice index a decoder accepts (so at most 65,536 slices per service).
pub const MAX_SLICE_INDEX: u32 = 65_535;

/// Some of a large service's ready backends (docs/kvstore-schema.md): the service's backends are the union of its
/// record's and of all its slices'. A slice without a service record is kept until the record comes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BackendSlice {
    pub cluster: String,
    pub cluster_id: u16,
    pub namespace: String,
    pub name: String,
    pub backends: Vec<BackendRecord>,
}

/// Makes decoded backends compact: the list holds no spare room, and backends with equal ports share one list.
fn compact_backends(backends: &mut Vec<BackendRecord>) {
    backends.shrink_to_fit();
    // Distinct port lists seen so far (a record has few: usually one).
    let mut seen: Vec<Arc<[PortRecord]>> = Vec::new();
    for b in backends.iter_mut() {
        match seen.iter().find(|p| **p == b.ports) {
            Some(p) => b.ports = Arc::clone(p),
            None if seen.len() < 8 => seen.push(Arc::clone(&b.ports)),
            None => {}
        }
    }
}

/// The checks of a service record's or a slice's backends: at most [`MAX_BACKENDS_PER_RECORD`], no port 0, weights
/// from 1 to [`mesh_model::traffic::MAX_CAPACITY`].
fn check_backends(key: &str, backends: &[BackendRecord]) -> Result<(), DecodeError> {
    let invalid = |reason: String| DecodeError::Invalid {
        key: key.to_owned(),
        reason,
    };
    if backends.len() > MAX_BACKENDS_PER_RECORD {
        return Err(invalid(format!(
            "{} backends (at most {MAX_BACKENDS_PER_RECORD})",
            backends.len()
        )));
    }
    if backends.iter().flat_map(|b| b.ports.iter()).any(|p| p.port == 0) {
        return Err(invalid("a port is 0".into()));
    }
    let max = mesh_model::traffic::MAX_CAPACITY;
    if let Some(b) = backends.iter().find(|b| !(1..=max).contains(&b.weight)) {
        return Err(invalid(format!(
            "backend {} has weight {}, not from 1 to {max}",
            b.ipv4, b.weight
        )));
    }
    Ok(())
}

/// Decodes slice `index` of `namespace/name` of `cluster`.
///
/// # Errors
/// Too large, bad JSON, names differing from the key, an index above [`MAX_SLICE_INDEX`], a port 0, a backend
/// weight outside 1 to [`mesh_model::traffic::MAX_CAPACITY`], or more than [`MAX_BACKENDS_PER_RECORD`] backends.
pub fn decode_backend_slice(
    key: &str,
    cluster: &str,
    namespace: &str,
    name: &str,
    index: u32,
    value: &[u8],
) -> Result<BackendSlice, DecodeError> {
    let mut rec: BackendSlice = json(key, "BackendSlice", value)?;
    expect_eq(key, "cluster", &rec.cluster, cluster)?;
    expect_eq(key, "namespace", &rec.namespace, namespace)?;
    expect_eq(key, "name", &rec.name, name)?;
    let invalid = |reason: String| DecodeError::Invalid {
        key: key.to_owned(),
        reason,
    };
    if index > MAX_SLICE_INDEX {
        return Err(invalid(format!(
            "slice index {index} (at most {MAX_SLICE_INDEX})"
        )));
    }
    check_backends(key, &rec.backends)?;
    compact_backends(&mut rec.backends);
    Ok(rec)
}

/// Splits a service's backends into slices of at most `size`, keeping every backend in the slice it had in
/// `previous` (so that a change rewrites only the slices it touches): gone backends leave their slice, new ones go
/// to the lowest slice with room (a new slice when none has). When the slices hold less than a quarter of their
/// room (many removals), they are made again from scratch. Empty slices are left out (their keys go).
#[must_use]
pub fn slice_backends(
    previous: &BTreeMap<u32, Vec<Ipv4Addr>>,
    backends: &[BackendRecord],
    size: usize,
) -> BTreeMap<u32, Vec<BackendRecord>> {
    let size = size.max(1);
    let by_ip: BTreeMap<Ipv4Addr, &BackendRecord> = backends.iter().map(|b| (b.ipv4, b)).collect();
    let mut out: BTreeMap<u32, Vec<BackendRecord>> = BTreeMap::new();
    let mut placed = std::collections::BTreeSet::new();
    let room = previous.len().saturating_mul(size);
    if room / 4 <= by_ip.len() {
        for (index, ips) in previous {
            let kept: Vec<BackendRecord> = ips
                .iter()
                .filter_map(|ip| by_ip.get(ip))
                .filter(|b| placed.insert(b.ipv4))
                .map(|b| (*b).clone())
                .take(size)
                .collect();
            if !kept.is_empty() {
                out.insert(*index, kept);
            }
        }
    }
    let mut index = 0u32;
    for (ip, b) in &by_ip {
        if placed.contains(ip) {
            continue;
        }
        while out.get(&index).is_some_and(|s| s.len() >= size) {
            index += 1;
        }
        out.entry(index).or_default().push((*b).clone());
    }
    out
}

/// A security identity of a cluster: the set of identity labels it stands for (docs/network-policy.md, "Identities").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IdentityRecord {
    pub cluster: String,
    pub cluster_id: u16,
    /// The full identity: `cluster_id << 20 | number` (`mesh_common::identity::compose`).
    pub identity: u32,
    pub labels: BTreeMap<String, String>,
}

/// A pod address of a cluster and the identity of its pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IpRecord {
    pub ipv4: Ipv4Addr,
    pub cluster: String,
    /// The full identity of the pod (its cluster's part is the pod's cluster id).
    pub identity: u32,
    pub namespace: String,
    pub pod: String,
    /// The node the pod runs on (its tunnel endpoint is that node's underlay address).
    pub node: String,
    /// The pod's named container ports (what named ports in policies resolve to).
    #[serde(default)]
    pub named_ports: Vec<PortRecord>,
}

/// The capacity of a pod (pod annotation `fleetmesh.io/capacity`), published only when it is not 1: the cluster's
/// agents weight the EndpointSlice backends whose pods they do not see (those of other nodes) with it.
///
/// Unknown fields are accepted (unlike the older records), so that later versions can add to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CapacityRecord {
    pub ipv4: Ipv4Addr,
    /// 1 to [`mesh_model::traffic::MAX_CAPACITY`].
    pub capacity: u32,
}

/// Most labels an identity record may hold.
pub const MAX_IDENTITY_LABELS: usize = 512;
/// Longest label key accepted in an identity record (a Kubernetes key is at most 317 bytes; namespace labels get
/// the 31-byte `io.cilium.k8s.namespace.labels.` prefix).
pub const MAX_LABEL_KEY_BYTES: usize = 512;
/// Longest label value accepted in an identity record (Kubernetes allows 63).
pub const MAX_LABEL_VALUE_BYTES: usize = 256;
/// Most named ports an ip record may hold.
pub const MAX_NAMED_PORTS: usize = 256;
/// The identity label naming the identity's cluster (docs/network-policy.md): every identity record has it.
pub const LABEL_CLUSTER: &str = "io.cilium.k8s.policy.cluster";

/// Why a value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("key {key}: value of {size} bytes is larger than the {MAX_VALUE_BYTES} bytes allowed")]
    TooLarge { key: String, size: usize },
    #[error("key {key}: not valid JSON for {record}: {reason}")]
    Json {
        key: String,
        record: &'static str,
        reason: String,
    },
    #[error("key {key}: {field} is {found:?}, but the key says {expected:?}")]
    Mismatch {
        key: String,
        field: &'static str,
        found: String,
        expected: String,
    },
    #[error("key {key}: {reason}")]
    Invalid { key: String, reason: String },
    /// The record speaks for another cluster: its cluster id is not the one granted to the peer.
    #[error("key {key}: clusterId {found} is not the peer's granted cluster id {granted}")]
    WrongClusterId { key: String, found: u16, granted: u16 },
    /// An address or CIDR outside the pod CIDRs accepted for the peer.
    #[error("key {key}: {what} is outside the pod CIDRs accepted for the peer ({accepted})")]
    OutsidePodCidrs {
        key: String,
        what: String,
        accepted: String,
    },
    /// A node's pod CIDR overlaps one that another cluster claimed first.
    #[error("key {key}: pod CIDR {cidr} overlaps {other}, claimed first by cluster {owner:?}")]
    OverlappingPodCidr {
        key: String,
        cidr: String,
        other: String,
        owner: String,
    },
}

impl DecodeError {
    /// A short, stable reason for counters.
    #[must_use]
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::TooLarge { .. } => "too_large",
            DecodeError::Json { .. } => "bad_json",
            DecodeError::Mismatch { .. } => "key_mismatch",
            DecodeError::Invalid { .. } => "invalid",
            DecodeError::WrongClusterId { .. } => "wrong_cluster_id",
            DecodeError::OutsidePodCidrs { .. } => "outside_pod_cidrs",
            DecodeError::OverlappingPodCidr { .. } => "overlapping_pod_cidr",
        }
    }
}

fn json<T: for<'de> Deserialize<'de>>(
    key: &str,
    record: &'static str,
    value: &[u8],
) -> Result<T, DecodeError> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(DecodeError::TooLarge {
            key: key.to_owned(),
            size: value.len(),
        });
    }
    serde_json::from_slice(value).map_err(|e| DecodeError::Json {
        key: key.to_owned(),
        record,
        reason: e.to_string(),
    })
}

fn expect_eq(key: &str, field: &'static str, found: &str, expected: &str) -> Result<(), DecodeError> {
    if found == expected {
        Ok(())
    } else {
        Err(DecodeError::Mismatch {
            key: key.to_owned(),
            field,
            found: found.to_owned(),
            expected: expected.to_owned(),
        })
    }
}

/// Decodes a node record found at `key` (of cluster `cluster`, node `node`).
///
/// # Errors
/// Too large, bad JSON, a name or cluster differing from the key, or no pod CIDR.
pub fn decode_node(key: &str, cluster: &str, node: &str, value: &[u8]) -> Result<NodeRecord, DecodeError> {
    let rec: NodeRecord = json(key, "NodeRecord", value)?;
    expect_eq(key, "cluster", &rec.cluster, cluster)?;
    expect_eq(key, "name", &rec.name, node)?;
    if rec.cluster_id == 0 || rec.cluster_id > mesh_model::cluster::MAX_CLUSTER_ID {
        return Err(DecodeError::Invalid {
            key: key.to_owned(),
            reason: format!(
                "clusterId {} is out of range 1-{}",
                rec.cluster_id,
                mesh_model::cluster::MAX_CLUSTER_ID
            ),
        });
    }
    if rec.pod_cidrs.is_empty() {
        return Err(DecodeError::Invalid {
            key: key.to_owned(),
            reason: "node has no podCidrs".into(),
        });
    }
    Ok(rec)
}

/// Decodes a service record found at `key` (of cluster `cluster`, service `namespace/name`).
///
/// # Errors
/// Too large, bad JSON, names differing from the key, port 0, a backend weight outside 1 to
/// [`mesh_model::traffic::MAX_CAPACITY`], or too many backends.
pub fn decode_service(
    key: &str,
    cluster: &str,
    namespace: &str,
    name: &str,
    value: &[u8],
) -> Result<ServiceRecord, DecodeError> {
    let mut rec: ServiceRecord = json(key, "ServiceRecord", value)?;
    expect_eq(key, "cluster", &rec.cluster, cluster)?;
    expect_eq(key, "namespace", &rec.namespace, namespace)?;
    expect_eq(key, "name", &rec.name, name)?;
    let invalid = |reason: String| DecodeError::Invalid {
        key: key.to_owned(),
        reason,
    };
    if rec.ports.iter().any(|p| p.port == 0) {
        return Err(invalid("a port is 0".into()));
    }
    check_backends(key, &rec.backends)?;
    if let Some(mcs) = &rec.mcs {
        if mcs.hostnames.len() > MAX_BACKENDS_PER_RECORD {
            return Err(invalid(format!(
                "{} hostnames (at most {MAX_BACKENDS_PER_RECORD})",
                mcs.hostnames.len()
            )));
        }
        if let Some((ip, h)) = mcs.hostnames.iter().find(|(_, h)| !is_dns_label(h)) {
            return Err(invalid(format!("hostname {h:?} of {ip} is not a DNS label")));
        }
    }
    compact_backends(&mut rec.backends);
    Ok(rec)
}

/// Checks that `identity` is an allocated identity of cluster `cluster_id` (cluster part equal, per-cluster number
/// at least `FIRST_ALLOCATED`).
fn check_identity(key: &str, identity: u32, cluster_id: u16) -> Result<u32, DecodeError> {
    use mesh_common::identity as id;
    let invalid = |reason: String| DecodeError::Invalid {
        key: key.to_owned(),
        reason,
    };
    if id::cluster(identity) != cluster_id {
        return Err(invalid(format!(
            "identity {identity:#x} belongs to cluster id {}, not {cluster_id}",
            id::cluster(identity)
        )));
    }
    let number = id::local(identity);
    if number < id::FIRST_ALLOCATED {
        return Err(invalid(format!(
            "identity {identity:#x}: number {number} is reserved (allocated numbers start at {})",
            id::FIRST_ALLOCATED
        )));
    }
    Ok(number)
}

fn check_cluster_id(key: &str, cluster_id: u16) -> Result<(), DecodeError> {
    if cluster_id == 0 || cluster_id > mesh_model::cluster::MAX_CLUSTER_ID {
        return Err(DecodeError::Invalid {
            key: key.to_owned(),
            reason: format!(
                "clusterId {cluster_id} is out of range 1-{}",
                mesh_model::cluster::MAX_CLUSTER_ID
            ),
        });
    }
    Ok(())
}

/// Decodes an identity record found at `key` (of cluster `cluster`, per-cluster number `number`).
///
/// # Errors
/// Too large, bad JSON, a cluster differing from the key, a cluster id out of range, an identity whose cluster part
/// is not the record's cluster id or whose number is not the key's (or is reserved, below 256), no labels, too
/// many labels, an empty or too long key, a too long value, or a cluster label missing or naming another cluster.
pub fn decode_identity(
    key: &str,
    cluster: &str,
    number: u32,
    value: &[u8],
) -> Result<IdentityRecord, DecodeError> {
    let rec: IdentityRecord = json(key, "IdentityRecord", value)?;
    expect_eq(key, "cluster", &rec.cluster, cluster)?;
    check_cluster_id(key, rec.cluster_id)?;
    let found = check_identity(key, rec.identity, rec.cluster_id)?;
    if found != number {
        return Err(DecodeError::Mismatch {
            key: key.to_owned(),
            field: "identity",
            found: found.to_string(),
            expected: number.to_string(),
        });
    }
    let invalid = |reason: String| DecodeError::Invalid {
        key: key.to_owned(),
        reason,
    };
    if rec.labels.len() > MAX_IDENTITY_LABELS {
        return Err(invalid(format!(
            "{} labels (at most {MAX_IDENTITY_LABELS})",
            rec.labels.len()
        )));
    }
    for (k, v) in &rec.labels {
        if k.is_empty() || k.len() > MAX_LABEL_KEY_BYTES {
            return Err(invalid(format!(
                "label key {k:?} is empty or longer than {MAX_LABEL_KEY_BYTES} bytes"
            )));
        }
        if v.len() > MAX_LABEL_VALUE_BYTES {
            return Err(invalid(format!(
                "value of label {k:?} is longer than {MAX_LABEL_VALUE_BYTES} bytes"
            )));
        }
    }
    match rec.labels.get(LABEL_CLUSTER) {
        Some(c) if c == cluster => {}
        other => {
            return Err(invalid(format!(
                "label {LABEL_CLUSTER} is {other:?}, not the record's cluster {cluster:?}"
            )));
        }
    }
    Ok(rec)
}

/// Decodes a pod address record found at `key` (of cluster `cluster`, address `ipv4`).
///
/// # Errors
/// Too large, bad JSON, a cluster or address differing from the key, an identity that is reserved (number below
/// 256) or of cluster id 0 or out of range, an empty namespace, pod or node, or a named port without a name, with
/// port 0, or too many of them.
pub fn decode_ip(key: &str, cluster: &str, ipv4: Ipv4Addr, value: &[u8]) -> Result<IpRecord, DecodeError> {
    let rec: IpRecord = json(key, "IpRecord", value)?;
    expect_eq(key, "cluster", &rec.cluster, cluster)?;
    expect_eq(key, "ipv4", &rec.ipv4.to_string(), &ipv4.to_string())?;
    let cluster_id = mesh_common::identity::cluster(rec.identity);
    check_cluster_id(key, cluster_id)?;
    check_identity(key, rec.identity, cluster_id)?;
    let invalid = |reason: String| DecodeError::Invalid {
        key: key.to_owned(),
        reason,
    };
    for (field, v) in [
        ("namespace", &rec.namespace),
        ("pod", &rec.pod),
        ("node", &rec.node),
    ] {
        if v.is_empty() {
            return Err(invalid(format!("{field} is empty")));
        }
    }
    if rec.named_ports.len() > MAX_NAMED_PORTS {
        return Err(invalid(format!(
            "{} named ports (at most {MAX_NAMED_PORTS})",
            rec.named_ports.len()
        )));
    }
    if let Some(p) = rec.named_ports.iter().find(|p| p.name.is_empty() || p.port == 0) {
        return Err(invalid(format!(
            "named port {:?} ({}) has no name or port 0",
            p.name, p.port
        )));
    }
    Ok(rec)
}

/// Decodes a capacity record found at `key` (of address `ipv4`).
///
/// # Errors
/// Too large, bad JSON, an address differing from the key, or a capacity outside 1 to
/// [`mesh_model::traffic::MAX_CAPACITY`].
pub fn decode_capacity(key: &str, ipv4: Ipv4Addr, value: &[u8]) -> Result<CapacityRecord, DecodeError> {
    let rec: CapacityRecord = json(key, "CapacityRecord", value)?;
    expect_eq(key, "ipv4", &rec.ipv4.to_string(), &ipv4.to_string())?;
    let max = mesh_model::traffic::MAX_CAPACITY;
    if !(1..=max).contains(&rec.capacity) {
        return Err(DecodeError::Invalid {
            key: key.to_owned(),
            reason: format!("capacity {} is not from 1 to {max}", rec.capacity),
        });
    }
    Ok(rec)
}

/// Decodes a cluster config record of `cluster`.
///
/// # Errors
/// Too large, bad JSON, a name differing from the key, or an id out of range.
pub fn decode_cluster_config(key: &str, cluster: &str, value: &[u8]) -> Result<ClusterConfig, DecodeError> {
    let rec: ClusterConfig = json(key, "ClusterConfig", value)?;
    expect_eq(key, "name", &rec.name, cluster)?;
    check_cluster_id(key, rec.id)?;
    Ok(rec)
}

/// Decodes a synced marker.
///
/// # Errors
/// Too large or bad JSON.
pub fn decode_synced(key: &str, value: &[u8]) -> Result<Synced, DecodeError> {
    json(key, "Synced", value)
}

/// Encodes any record as JSON.
///
/// # Panics
/// Never: the records are plain data whose serialization cannot fail.
#[must_use]
pub fn encode<T: Serialize>(record: &T) -> String {
    #[expect(
        clippy::expect_used,
        reason = "serializing plain structs with string keys cannot fail"
    )]
    serde_json::to_string(record).expect("records serialize")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> NodeRecord {
        NodeRecord {
            name: "east-node-1".into(),
            cluster: "east".into(),
            cluster_id: 1,
            underlay_ipv4: Ipv4Addr::new(172, 30, 1, 1),
            pod_cidrs: vec!["10.1.0.0/24".parse().expect("cidr")],
            wireguard: None,
        }
    }

    #[test]
    fn keys_round_trip_through_classify() {
        let k = Keys::default();
        assert_eq!(k.node("east", "n1"), "fleetmesh/state/nodes/v1/east/n1");
        assert_eq!(k.classify("east", &k.node("east", "n1")), KeyKind::Node("n1"));
        assert_eq!(k.classify("west", &k.node("east", "n1")), KeyKind::Other);
        assert_eq!(
            k.classify("east", &k.synced("east", kinds::NODES)),
            KeyKind::Synced("nodes")
        );
        assert_eq!(
            k.classify("east", &k.cluster_config("east")),
            KeyKind::ClusterConfig
        );
        assert_eq!(k.classify("east", &k.heartbeat("east")), KeyKind::Heartbeat);
        assert_eq!(
            k.classify("east", "fleetmesh/state/nodes/v9/east/n1"),
            KeyKind::UnknownVersion("v9")
        );
        assert_eq!(
            k.classify("east", "fleetmesh/state/nodes/v1/east/a/b"),
            KeyKind::Other
        );
        assert_eq!(k.classify("east", "other/thing"), KeyKind::Other);
    }

    #[test]
    fn node_round_trips() {
        let k = Keys::default();
        let key = k.node("east", "east-node-1");
        let v = encode(&node());
        assert_eq!(decode_node(&key, "east", "east-node-1", v.as_bytes()), Ok(node()));
    }

    #[test]
    fn node_wireguard_is_optional_and_only_written_when_present() {
        let k = Keys::default();
        let key = k.node("east", "east-node-1");
        // A record without the field (as agents before encryption wrote and read it) stays byte for byte the same.
        assert!(!encode(&node()).contains("wireguard"));
        let with = NodeRecord {
            wireguard: Some(mesh_model::wireguard::WireguardEndpoint {
                public_key: "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=".into(),
                port: 51871,
            }),
            ..node()
        };
        let v = encode(&with);
        assert!(v.contains(r#""wireguard":{"publicKey":"#), "{v}");
        assert_eq!(decode_node(&key, "east", "east-node-1", v.as_bytes()), Ok(with));
        // Unknown fields inside stay refused, like everywhere in the schema.
        let bad = v.replace(r#""port":51871"#, r#""port":51871,"mtu":1400"#);
        assert!(decode_node(&key, "east", "east-node-1", bad.as_bytes()).is_err());
    }

    #[test]
    fn mcs_part_of_service_records() {
        let k = Keys::default();
        let key = k.service("east", "shop", "db");
        let rec = |mcs: Option<McsRecord>| ServiceRecord {
            cluster: "east".into(),
            cluster_id: 1,
            namespace: "shop".into(),
            name: "db".into(),
            ports: Vec::new(),
            backends: Vec::new(),
            mcs,
        };
        // Not exported: no `mcs` key at all, what older readers accept.
        assert!(!encode(&rec(None)).contains("mcs"));
        let good = rec(Some(McsRecord {
            headless: true,
            hostnames: [(Ipv4Addr::new(10, 1, 0, 2), "db-0".to_owned())].into(),
        }));
        let v = encode(&good);
        assert_eq!(decode_service(&key, "east", "shop", "db", v.as_bytes()), Ok(good));
        // A record without `mcs` from an older publisher reads as not exported.
        let old =
            r#"{"cluster":"east","clusterId":1,"namespace":"shop","name":"db","ports":[],"backends":[]}"#;
        assert_eq!(
            decode_service(&key, "east", "shop", "db", old.as_bytes())
                .unwrap()
                .mcs,
            None
        );
        for bad in ["Db_0", "-db", &"a".repeat(64), ""] {
            let r = rec(Some(McsRecord {
                headless: true,
                hostnames: [(Ipv4Addr::new(10, 1, 0, 2), bad.to_owned())].into(),
            }));
            let err = decode_service(&key, "east", "shop", "db", encode(&r).as_bytes()).unwrap_err();
            assert!(err.to_string().contains("not a DNS label"), "{bad:?}: {err}");
        }
        let many = rec(Some(McsRecord {
            headless: true,
            hostnames: (0..=u32::try_from(MAX_BACKENDS_PER_RECORD).unwrap())
                .map(|i| (Ipv4Addr::from(0x0A00_0000 + i), "h".to_owned()))
                .collect(),
        }));
        let err = decode_service(&key, "east", "shop", "db", encode(&many).as_bytes()).unwrap_err();
        assert!(
            matches!(err, DecodeError::Invalid { .. } | DecodeError::TooLarge { .. }),
            "{err}"
        );
    }

    fn backend(i: u32) -> BackendRecord {
        BackendRecord {
            ipv4: Ipv4Addr::from(0x0a01_0000 + i),
            ports: vec![PortRecord {
                name: "http".into(),
                port: 8080,
                protocol: mesh_model::Protocol::Tcp,
            }]
            .into(),
            weight: 1,
        }
    }

    #[test]
    fn decoded_backends_with_equal_ports_share_one_list() {
        let other = |i: u32| BackendRecord {
            ports: vec![PortRecord {
                name: "grpc".into(),
                port: 9090,
                protocol: mesh_model::Protocol::Tcp,
            }]
            .into(),
            ..backend(i)
        };
        let rec = ServiceRecord {
            cluster: "east".into(),
            cluster_id: 1,
            namespace: "shop".into(),
            name: "db".into(),
            ports: Vec::new(),
            backends: vec![backend(1), other(2), backend(3), other(4), backend(5)],
            mcs: None,
        };
        let k = Keys::default();
        let key = k.service("east", "shop", "db");
        let got = decode_service(&key, "east", "shop", "db", encode(&rec).as_bytes()).unwrap();
        assert_eq!(got, rec, "the same record");
        let b = &got.backends;
        assert!(Arc::ptr_eq(&b[0].ports, &b[2].ports) && Arc::ptr_eq(&b[0].ports, &b[4].ports));
        assert!(Arc::ptr_eq(&b[1].ports, &b[3].ports));
        assert!(
            !Arc::ptr_eq(&b[0].ports, &b[1].ports),
            "different ports stay apart"
        );
        assert_eq!(b.capacity(), b.len(), "no spare room");
        let slice = BackendSlice {
            cluster: "east".into(),
            cluster_id: 1,
            namespace: "shop".into(),
            name: "db".into(),
            backends: (0..100).map(backend).collect(),
        };
        let key = k.backend_slice("east", "shop", "db", 2);
        let got = decode_backend_slice(&key, "east", "shop", "db", 2, encode(&slice).as_bytes()).unwrap();
        assert!(
            got.backends
                .iter()
                .all(|x| Arc::ptr_eq(&x.ports, &got.backends[0].ports))
        );
    }

    fn assignment(slices: &BTreeMap<u32, Vec<BackendRecord>>) -> BTreeMap<u32, Vec<Ipv4Addr>> {
        slices
            .iter()
            .map(|(i, bs)| (*i, bs.iter().map(|b| b.ipv4).collect()))
            .collect()
    }

    #[test]
    fn backend_slices_are_bounded_and_a_change_touches_one() {
        let all: Vec<BackendRecord> = (0..1_000).map(backend).collect();
        let first = slice_backends(&BTreeMap::new(), &all, 100);
        assert_eq!(first.len(), 10);
        assert!(first.values().all(|s| s.len() == 100));
        let prev = assignment(&first);
        // One backend gone, one new: at most two slices differ, every other is the same.
        let mut next: Vec<BackendRecord> = all
            .iter()
            .filter(|b| b.ipv4 != backend(500).ipv4)
            .cloned()
            .collect();
        next.push(backend(5_000));
        let second = slice_backends(&prev, &next, 100);
        let differ = (0..12u32).filter(|i| first.get(i) != second.get(i)).count();
        assert_eq!(differ, 1, "the freed place takes the new backend");
        assert!(second.values().all(|s| s.len() <= 100));
        let mut union: Vec<Ipv4Addr> = second.values().flatten().map(|b| b.ipv4).collect();
        union.sort();
        let mut want: Vec<Ipv4Addr> = next.iter().map(|b| b.ipv4).collect();
        want.sort();
        assert_eq!(union, want, "every backend in exactly one slice");
        // A changed weight rewrites only its slice.
        let mut heavier = next.clone();
        heavier[3].weight = 7;
        let third = slice_backends(&assignment(&second), &heavier, 100);
        assert_eq!((0..12u32).filter(|i| second.get(i) != third.get(i)).count(), 1);
        // Most backends gone: made again, compactly.
        let few: Vec<BackendRecord> = (0..150).map(backend).collect();
        let fourth = slice_backends(&assignment(&third), &few, 100);
        assert_eq!(fourth.len(), 2, "{:?}", fourth.keys());
    }

    #[test]
    fn backend_slice_keys_and_records() {
        let k = Keys::default();
        let key = k.backend_slice("east", "shop", "api", 3);
        assert_eq!(key, "fleetmesh/state/backends/v1/east/shop/api/3");
        assert_eq!(k.classify("east", &key), KeyKind::BackendSlice("shop", "api", 3));
        assert_eq!(k.classify("west", &key), KeyKind::Other);
        for bad in [
            "fleetmesh/state/backends/v1/east/shop/api/03",
            "fleetmesh/state/backends/v1/east/shop/api/x",
            "fleetmesh/state/backends/v1/east/shop/api",
            "fleetmesh/state/backends/v1/east/shop/api/1/2",
        ] {
            assert_eq!(k.classify("east", bad), KeyKind::Other, "{bad}");
        }
        assert_eq!(
            k.classify("east", "fleetmesh/state/backends/v2/east/shop/api/1"),
            KeyKind::UnknownVersion("v2")
        );
        // Slices sort before the records that name their addresses (identities, ips) and before services.
        assert!(k.backend_slices_prefix("east") < k.services_prefix("east"));
        let rec = BackendSlice {
            cluster: "east".into(),
            cluster_id: 1,
            namespace: "shop".into(),
            name: "api".into(),
            backends: vec![backend(1)],
        };
        let v = encode(&rec);
        assert_eq!(
            decode_backend_slice(&key, "east", "shop", "api", 3, v.as_bytes()),
            Ok(rec.clone())
        );
        let reason = |r: Result<BackendSlice, DecodeError>| r.expect_err("refused").reason();
        assert_eq!(
            reason(decode_backend_slice(&key, "east", "shop", "web", 3, v.as_bytes())),
            "key_mismatch"
        );
        assert_eq!(
            reason(decode_backend_slice(
                &key,
                "east",
                "shop",
                "api",
                MAX_SLICE_INDEX + 1,
                v.as_bytes()
            )),
            "invalid"
        );
        let mut zero = rec.clone();
        zero.backends[0].weight = 0;
        assert_eq!(
            reason(decode_backend_slice(
                &key,
                "east",
                "shop",
                "api",
                3,
                encode(&zero).as_bytes()
            )),
            "invalid"
        );
        let mut many = rec;
        many.backends = (0..=u32::try_from(MAX_BACKENDS_PER_RECORD).expect("fits"))
            .map(backend)
            .collect();
        // (The value's size limit refuses it first.)
        assert_eq!(
            reason(decode_backend_slice(
                &key,
                "east",
                "shop",
                "api",
                3,
                encode(&many).as_bytes()
            )),
            "too_large"
        );
        assert_eq!(
            reason(decode_backend_slice(&key, "east", "shop", "api", 3, b"{not json")),
            "bad_json"
        );
    }

    #[test]
    fn service_keys_and_records() {
        let k = Keys::default();
        let key = k.service("east", "shop", "api");
        assert_eq!(key, "fleetmesh/state/services/v1/east/shop/api");
        assert_eq!(k.classify("east", &key), KeyKind::Service("shop", "api"));
        assert_eq!(k.classify("west", &key), KeyKind::Other);
        assert_eq!(
            k.classify("east", "fleetmesh/state/services/v2/east/shop/api"),
            KeyKind::UnknownVersion("v2")
        );
        let rec = ServiceRecord {
            mcs: None,
            cluster: "east".into(),
            cluster_id: 1,
            namespace: "shop".into(),
            name: "api".into(),
            ports: vec![PortRecord {
                name: "http".into(),
                port: 80,
                protocol: mesh_model::Protocol::Tcp,
            }],
            backends: vec![BackendRecord {
                ipv4: Ipv4Addr::new(10, 1, 0, 2),
                ports: vec![PortRecord {
                    name: "http".into(),
                    port: 8080,
                    protocol: mesh_model::Protocol::Tcp,
                }]
                .into(),
                weight: 1,
            }],
        };
        let v = encode(&rec);
        assert_eq!(
            decode_service(&key, "east", "shop", "api", v.as_bytes()),
            Ok(rec.clone())
        );
        assert_eq!(
            decode_service(&key, "east", "shop", "web", v.as_bytes())
                .expect_err("name")
                .reason(),
            "key_mismatch"
        );
        let mut zero = rec;
        Arc::make_mut(&mut zero.backends[0].ports)[0].port = 0;
        assert_eq!(
            decode_service(&key, "east", "shop", "api", encode(&zero).as_bytes())
                .expect_err("port")
                .reason(),
            "invalid"
        );
        assert_eq!(
            decode_service(&key, "east", "shop", "api", b"[]")
                .expect_err("json")
                .reason(),
            "bad_json"
        );
    }

    #[test]
    fn cluster_config_ids_are_in_range() {
        let cfg = |id: u16| {
            encode(&ClusterConfig {
                name: "west".into(),
                id,
                capabilities: vec![],
                labels: BTreeMap::new(),
            })
        };
        assert!(decode_cluster_config("k", "west", cfg(4095).as_bytes()).is_ok());
        for id in [0, 4096, u16::MAX] {
            assert_eq!(
                decode_cluster_config("k", "west", cfg(id).as_bytes())
                    .expect_err("out of range")
                    .reason(),
                "invalid",
                "{id}"
            );
        }
    }

    #[test]
    fn malformed_node_values_are_typed_errors() {
        let key = "fleetmesh/state/nodes/v1/east/east-node-1";
        let d = |v: &str| {
            decode_node(key, "east", "east-node-1", v.as_bytes())
                .expect_err(v)
                .reason()
        };
        assert_eq!(d("{not json"), "bad_json");
        assert_eq!(d(r#"{"name":"east-node-1"}"#), "bad_json");
        assert_eq!(
            d(r#"{"name":1,"cluster":"east","clusterId":1,"underlayIpv4":"1.2.3.4","podCidrs":[]}"#),
            "bad_json"
        );
        let mut wrong = node();
        wrong.cluster = "west".into();
        assert_eq!(d(&encode(&wrong)), "key_mismatch");
        let mut empty = node();
        empty.pod_cidrs.clear();
        assert_eq!(d(&encode(&empty)), "invalid");
        let mut zero = node();
        zero.cluster_id = 0;
        assert_eq!(d(&encode(&zero)), "invalid");
        let huge = "x".repeat(MAX_VALUE_BYTES + 1);
        assert_eq!(d(&huge), "too_large");
    }

    fn identity_rec() -> IdentityRecord {
        IdentityRecord {
            cluster: "east".into(),
            cluster_id: 1,
            identity: mesh_common::identity::compose(1, 300),
            labels: [
                ("app".to_owned(), "api".to_owned()),
                ("io.kubernetes.pod.namespace".to_owned(), "shop".to_owned()),
                (LABEL_CLUSTER.to_owned(), "east".to_owned()),
            ]
            .into(),
        }
    }

    fn ip_rec() -> IpRecord {
        IpRecord {
            ipv4: Ipv4Addr::new(10, 1, 0, 7),
            cluster: "east".into(),
            identity: mesh_common::identity::compose(1, 300),
            namespace: "shop".into(),
            pod: "api-0".into(),
            node: "east-node-1".into(),
            named_ports: vec![PortRecord {
                name: "http".into(),
                port: 8080,
                protocol: mesh_model::Protocol::Tcp,
            }],
        }
    }

    #[test]
    fn identity_and_ip_keys_classify() {
        let k = Keys::default();
        assert_eq!(k.identity("east", 300), "fleetmesh/state/identities/v1/east/300");
        assert_eq!(
            k.classify("east", &k.identity("east", 300)),
            KeyKind::Identity(300)
        );
        assert_eq!(k.classify("west", &k.identity("east", 300)), KeyKind::Other);
        let ip = Ipv4Addr::new(10, 1, 0, 7);
        assert_eq!(k.ip("east", ip), "fleetmesh/state/ip/v1/east/10.1.0.7");
        assert_eq!(k.classify("east", &k.ip("east", ip)), KeyKind::Ip(ip));
        assert_eq!(k.classify("west", &k.ip("east", ip)), KeyKind::Other);
        for other in [
            "fleetmesh/state/identities/v1/east/0300",
            "fleetmesh/state/identities/v1/east/+300",
            "fleetmesh/state/identities/v1/east/x",
            "fleetmesh/state/identities/v1/east/",
            "fleetmesh/state/identities/v1/east/300/x",
            "fleetmesh/state/ip/v1/east/10.1.0",
            "fleetmesh/state/ip/v1/east/010.1.0.7",
            "fleetmesh/state/ip/v1/east/10.1.0.7/x",
        ] {
            assert_eq!(k.classify("east", other), KeyKind::Other, "{other}");
        }
        assert_eq!(
            k.classify("east", "fleetmesh/state/identities/v2/east/300"),
            KeyKind::UnknownVersion("v2")
        );
        assert_eq!(
            k.classify("east", "fleetmesh/state/ip/v2/east/10.1.0.7"),
            KeyKind::UnknownVersion("v2")
        );
        assert_eq!(
            k.classify("east", &k.synced("east", kinds::IDENTITIES)),
            KeyKind::Synced("identities")
        );
        assert_eq!(
            k.classify("east", &k.synced("east", kinds::IPS)),
            KeyKind::Synced("ips")
        );
        // Identities and ips sort before nodes and services: a publisher putting in key order writes them first.
        assert!(k.identities_prefix("east") < k.ips_prefix("east"));
        assert!(k.ips_prefix("east") < k.nodes_prefix("east"));
        assert!(k.nodes_prefix("east") < k.services_prefix("east"));
    }

    #[test]
    fn identity_and_ip_records_round_trip() {
        let k = Keys::default();
        let v = encode(&identity_rec());
        assert!(v.contains("\"clusterId\":1"), "{v}");
        assert_eq!(
            decode_identity(&k.identity("east", 300), "east", 300, v.as_bytes()),
            Ok(identity_rec())
        );
        let ip = ip_rec();
        let v = encode(&ip);
        assert!(v.contains("\"namedPorts\""), "{v}");
        assert_eq!(
            decode_ip(&k.ip("east", ip.ipv4), "east", ip.ipv4, v.as_bytes()),
            Ok(ip.clone())
        );
        // namedPorts may be absent.
        let mut bare = ip;
        bare.named_ports.clear();
        let v = encode(&bare).replace(",\"namedPorts\":[]", "");
        assert!(!v.contains("namedPorts"), "{v}");
        assert_eq!(decode_ip("k", "east", bare.ipv4, v.as_bytes()), Ok(bare));
    }

    #[test]
    fn capacity_keys_classify() {
        let k = Keys::default();
        let ip = Ipv4Addr::new(10, 1, 0, 7);
        assert_eq!(
            k.capacity("east", ip),
            "fleetmesh/state/capacity/v1/east/10.1.0.7"
        );
        assert_eq!(k.classify("east", &k.capacity("east", ip)), KeyKind::Capacity(ip));
        assert_eq!(k.classify("west", &k.capacity("east", ip)), KeyKind::Other);
        for other in [
            "fleetmesh/state/capacity/v1/east/10.1.0",
            "fleetmesh/state/capacity/v1/east/10.1.0.7/x",
            "fleetmesh/state/capacity/v1/east",
            "fleetmesh/state/capacity",
        ] {
            assert_eq!(k.classify("east", other), KeyKind::Other, "{other}");
        }
        assert_eq!(
            k.classify("east", "fleetmesh/state/capacity/v2/east/10.1.0.7"),
            KeyKind::UnknownVersion("v2")
        );
        // Not an ip record: a reader that knows only ip records leaves capacity records alone.
        assert!(!k.capacity("east", ip).starts_with(&k.ips_prefix("east")));
    }

    #[test]
    fn capacity_records_round_trip_and_accept_later_fields() {
        let ip = Ipv4Addr::new(10, 1, 0, 7);
        let key = Keys::default().capacity("east", ip);
        let rec = CapacityRecord {
            ipv4: ip,
            capacity: 4,
        };
        let v = encode(&rec);
        assert_eq!(v, r#"{"ipv4":"10.1.0.7","capacity":4}"#);
        assert_eq!(decode_capacity(&key, ip, v.as_bytes()), Ok(rec.clone()));
        // A later publisher's additions are ignored.
        let later = r#"{"ipv4":"10.1.0.7","capacity":4,"zone":"a","extra":{"x":[1]}}"#;
        assert_eq!(decode_capacity(&key, ip, later.as_bytes()), Ok(rec));
        let max = mesh_model::traffic::MAX_CAPACITY;
        let at = |c: u32| {
            encode(&CapacityRecord {
                ipv4: ip,
                capacity: c,
            })
        };
        assert_eq!(
            decode_capacity(&key, ip, at(1).as_bytes()).map(|r| r.capacity),
            Ok(1)
        );
        assert_eq!(
            decode_capacity(&key, ip, at(max).as_bytes()).map(|r| r.capacity),
            Ok(max)
        );
    }

    #[test]
    fn malformed_capacity_values_are_typed_errors() {
        let ip = Ipv4Addr::new(10, 1, 0, 7);
        let d = |v: &str| decode_capacity("k", ip, v.as_bytes()).expect_err(v).reason();
        assert_eq!(d("{not json"), "bad_json");
        assert_eq!(d("[]"), "bad_json");
        assert_eq!(d(r#"{"ipv4":"10.1.0.7"}"#), "bad_json");
        assert_eq!(d(r#"{"capacity":4}"#), "bad_json");
        assert_eq!(d(r#"{"ipv4":"10.1.0.7","capacity":-1}"#), "bad_json");
        assert_eq!(d(r#"{"ipv4":"10.1.0.7","capacity":"4"}"#), "bad_json");
        assert_eq!(d(r#"{"ipv4":"10.1.0","capacity":4}"#), "bad_json");
        assert_eq!(d(r#"{"ipv4":"10.1.0.8","capacity":4}"#), "key_mismatch");
        assert_eq!(d(r#"{"ipv4":"10.1.0.7","capacity":0}"#), "invalid");
        assert_eq!(d(r#"{"ipv4":"10.1.0.7","capacity":1001}"#), "invalid");
        assert_eq!(d(&"x".repeat(MAX_VALUE_BYTES + 1)), "too_large");
    }

    #[test]
    fn malformed_identity_values_are_typed_errors() {
        use mesh_common::identity::{LOCAL_MASK, compose};
        let d = |rec: &IdentityRecord| {
            decode_identity("k", "east", 300, encode(rec).as_bytes())
                .expect_err("refused")
                .reason()
        };
        let raw = |v: &str| {
            decode_identity("k", "east", 300, v.as_bytes())
                .expect_err(v)
                .reason()
        };
        assert_eq!(raw("{not json"), "bad_json");
        assert_eq!(raw(r#"{"cluster":"east"}"#), "bad_json");
        assert_eq!(
            raw(&encode(&identity_rec()).replace("\"labels\"", "\"extra\":1,\"labels\"")),
            "bad_json"
        );
        assert_eq!(raw(&"x".repeat(MAX_VALUE_BYTES + 1)), "too_large");
        let with = |f: &dyn Fn(&mut IdentityRecord)| {
            let mut r = identity_rec();
            f(&mut r);
            r
        };
        assert_eq!(d(&with(&|r| r.cluster = "west".into())), "key_mismatch");
        assert_eq!(d(&with(&|r| r.identity = compose(1, 301))), "key_mismatch");
        // The identity's cluster part is not the record's cluster id.
        assert_eq!(d(&with(&|r| r.identity = compose(2, 300))), "invalid");
        assert_eq!(
            d(&with(&|r| {
                r.cluster_id = 0;
                r.identity = 300;
            })),
            "invalid"
        );
        assert_eq!(
            d(&with(&|r| {
                r.cluster_id = 4096;
                r.identity = 300;
            })),
            "invalid"
        );
        // Reserved numbers are not allocated identities.
        assert_eq!(
            decode_identity(
                "k",
                "east",
                3,
                encode(&with(&|r| r.identity = compose(1, 3))).as_bytes()
            )
            .expect_err("reserved")
            .reason(),
            "invalid"
        );
        // The largest number is fine; the key's number must match.
        let max = with(&|r| r.identity = compose(1, LOCAL_MASK));
        assert_eq!(
            decode_identity("k", "east", LOCAL_MASK, encode(&max).as_bytes()),
            Ok(max.clone())
        );
        assert_eq!(
            decode_identity("k", "east", LOCAL_MASK + 1, encode(&max).as_bytes())
                .expect_err("number beyond the mask")
                .reason(),
            "key_mismatch"
        );
        assert_eq!(d(&with(&|r| r.labels.clear())), "invalid");
        assert_eq!(
            d(&with(&|r| {
                r.labels.remove(LABEL_CLUSTER);
            })),
            "invalid"
        );
        assert_eq!(
            d(&with(&|r| {
                r.labels.insert(LABEL_CLUSTER.into(), "west".into());
            })),
            "invalid"
        );
        assert_eq!(
            d(&with(&|r| {
                r.labels.insert(String::new(), "x".into());
            })),
            "invalid"
        );
        assert_eq!(
            d(&with(&|r| {
                r.labels.insert("k".repeat(MAX_LABEL_KEY_BYTES + 1), "x".into());
            })),
            "invalid"
        );
        assert_eq!(
            d(&with(&|r| {
                r.labels.insert("k".into(), "v".repeat(MAX_LABEL_VALUE_BYTES + 1));
            })),
            "invalid"
        );
        assert_eq!(
            d(&with(&|r| {
                for i in 0..MAX_IDENTITY_LABELS {
                    r.labels.insert(format!("l{i}"), String::new());
                }
            })),
            "invalid"
        );
    }

    #[test]
    fn malformed_ip_values_are_typed_errors() {
        use mesh_common::identity::compose;
        let ip = Ipv4Addr::new(10, 1, 0, 7);
        let d = |rec: &IpRecord| {
            decode_ip("k", "east", ip, encode(rec).as_bytes())
                .expect_err("refused")
                .reason()
        };
        let raw = |v: &str| decode_ip("k", "east", ip, v.as_bytes()).expect_err(v).reason();
        assert_eq!(raw("[]"), "bad_json");
        assert_eq!(raw(r#"{"ipv4":"10.1.0.7"}"#), "bad_json");
        assert_eq!(
            raw(&encode(&ip_rec()).replace("\"10.1.0.7\"", "\"10.1.0\"")),
            "bad_json"
        );
        assert_eq!(
            raw(&encode(&ip_rec()).replace("\"node\"", "\"extra\":1,\"node\"")),
            "bad_json"
        );
        assert_eq!(raw(&"x".repeat(MAX_VALUE_BYTES + 1)), "too_large");
        let with = |f: &dyn Fn(&mut IpRecord)| {
            let mut r = ip_rec();
            f(&mut r);
            r
        };
        assert_eq!(d(&with(&|r| r.ipv4 = Ipv4Addr::new(10, 1, 0, 8))), "key_mismatch");
        assert_eq!(d(&with(&|r| r.cluster = "west".into())), "key_mismatch");
        assert_eq!(d(&with(&|r| r.identity = 300)), "invalid");
        assert_eq!(d(&with(&|r| r.identity = compose(1, 2))), "invalid");
        assert_eq!(d(&with(&|r| r.namespace.clear())), "invalid");
        assert_eq!(d(&with(&|r| r.pod.clear())), "invalid");
        assert_eq!(d(&with(&|r| r.node.clear())), "invalid");
        assert_eq!(d(&with(&|r| r.named_ports[0].port = 0)), "invalid");
        assert_eq!(d(&with(&|r| r.named_ports[0].name.clear())), "invalid");
        assert_eq!(
            d(&with(&|r| {
                let p = r.named_ports[0].clone();
                r.named_ports = vec![p; MAX_NAMED_PORTS + 1];
            })),
            "invalid"
        );
    }
}
