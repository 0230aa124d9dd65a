//! The kvstore schema: where each record lives in a cluster's etcd and what it holds.
//!
//! ```text
//! <prefix>/cluster-config/<cluster>                      ClusterConfig   (no lease)
//! <prefix>/heartbeat/<cluster>                           Heartbeat       (lease)
//! <prefix>/synced/<cluster>/<kind>                       Synced          (lease; written after a full sync)
//! <prefix>/state/nodes/v1/<cluster>/<node>               NodeRecord      (lease)
//! <prefix>/state/services/v1/<cluster>/<ns>/<name>       ServiceRecord   (lease; global, shared services)
//! ```
//! Values are JSON so operators can read them with `etcdctl`. Every record carries its schema version in the key;
//! a decoder returns a typed [`DecodeError`] for every malformed value, and never panics.

pub mod etcd;
pub mod peer;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

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
    pub ports: Vec<PortRecord>,
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
}

/// Largest number of backends a decoder accepts in one service record.
pub const MAX_BACKENDS_PER_RECORD: usize = 4096;

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
/// Too large, bad JSON, names differing from the key, port 0, or too many backends.
pub fn decode_service(
    key: &str,
    cluster: &str,
    namespace: &str,
    name: &str,
    value: &[u8],
) -> Result<ServiceRecord, DecodeError> {
    let rec: ServiceRecord = json(key, "ServiceRecord", value)?;
    expect_eq(key, "cluster", &rec.cluster, cluster)?;
    expect_eq(key, "namespace", &rec.namespace, namespace)?;
    expect_eq(key, "name", &rec.name, name)?;
    let invalid = |reason: String| DecodeError::Invalid {
        key: key.to_owned(),
        reason,
    };
    if rec.backends.len() > MAX_BACKENDS_PER_RECORD {
        return Err(invalid(format!(
            "{} backends (at most {MAX_BACKENDS_PER_RECORD})",
            rec.backends.len()
        )));
    }
    let zero_port = rec
        .ports
        .iter()
        .chain(rec.backends.iter().flat_map(|b| &b.ports))
        .any(|p| p.port == 0);
    if zero_port {
        return Err(invalid("a port is 0".into()));
    }
    Ok(rec)
}

/// Decodes a cluster config record of `cluster`.
///
/// # Errors
/// Too large, bad JSON, or a name differing from the key.
pub fn decode_cluster_config(key: &str, cluster: &str, value: &[u8]) -> Result<ClusterConfig, DecodeError> {
    let rec: ClusterConfig = json(key, "ClusterConfig", value)?;
    expect_eq(key, "name", &rec.name, cluster)?;
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
                }],
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
        zero.backends[0].ports[0].port = 0;
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
}
