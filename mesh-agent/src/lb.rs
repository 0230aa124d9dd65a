//! Service load balancing, desired state: for every service of this cluster, its frontends (ClusterIP, port,
//! protocol) and the backends the datapath should pick from, merged across clusters for global services and
//! filtered by affinity, or weighted by a `TrafficPolicy`. Pure functions of the state model, except for the
//! [`TrafficPolicyVersions`] that remembers the last valid version of each policy.
//!
//! A backend's `weight` is its number of slots in the frontend's slot table (new flows pick a slot by hash):
//! its capacity without a policy, its share of [`WEIGHTED_SLOTS`] slots with one.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use mesh_model::service::{self, Affinity, GlobalSpec};
use mesh_model::traffic::{TrafficPolicy, apportion};
use mesh_model::{ClusterState, Protocol};
use serde::Serialize;

use crate::desired::LocalNode;
use crate::remote::RemoteCluster;

/// A backend the datapath may pick: 12 bytes, since a million remote backends are held twice (candidates and
/// active). Its cluster is the one of `cluster_id` ([`Frontend::cluster_of`]); the status names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Backend {
    pub ipv4: Ipv4Addr,
    pub port: u16,
    pub cluster_id: u16,
    pub weight: u32,
}

/// One frontend of a service and its backends (serialized with each backend's cluster name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frontend {
    pub vip: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
    pub port_name: String,
    /// Every ready backend, by cluster.
    pub candidates: BTreeMap<String, Vec<Backend>>,
    /// The backends new flows are spread over (after affinity or policy), sorted; `weight` is the slot count.
    pub active: Vec<Backend>,
    /// With a `TrafficPolicy`: each group's clusters and share of new connections.
    pub groups: Vec<GroupShare>,
    /// With a `TrafficPolicy`: clusters with ready backends that no group selects (they get no new connections).
    pub unselected: Vec<String>,
    /// What the datapath counted for this frontend's backends, by cluster (filled in after programming; counters
    /// only grow, since the datapath was created; a backend serving several frontends counts in each).
    pub stats: BTreeMap<String, FlowStats>,
}

impl Frontend {
    /// The candidates' cluster names by cluster id (ids are unique among the clusters used): how a backend's
    /// cluster is named.
    #[must_use]
    pub fn cluster_names(&self) -> BTreeMap<u16, &str> {
        self.candidates
            .iter()
            .filter_map(|(c, bs)| bs.first().map(|b| (b.cluster_id, c.as_str())))
            .collect()
    }

    /// The name of the cluster with id `cluster_id` among the candidates.
    #[must_use]
    pub fn cluster_of(&self, cluster_id: u16) -> Option<&str> {
        self.cluster_names().get(&cluster_id).copied()
    }
}

/// A backend as the status shows it: with its cluster's name.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct NamedBackend<'a> {
    ipv4: Ipv4Addr,
    port: u16,
    cluster: &'a str,
    cluster_id: u16,
    weight: u32,
}

impl Serialize for Frontend {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Wire<'a> {
            vip: Ipv4Addr,
            port: u16,
            protocol: Protocol,
            port_name: &'a str,
            candidates: BTreeMap<&'a str, Vec<NamedBackend<'a>>>,
            active: Vec<NamedBackend<'a>>,
            #[serde(skip_serializing_if = "<[_]>::is_empty")]
            groups: &'a [GroupShare],
            #[serde(skip_serializing_if = "<[_]>::is_empty")]
            unselected: &'a [String],
            #[serde(skip_serializing_if = "BTreeMap::is_empty")]
            stats: &'a BTreeMap<String, FlowStats>,
        }
        let names = self.cluster_names();
        fn named<'a>(b: &Backend, cluster: &'a str) -> NamedBackend<'a> {
            NamedBackend {
                ipv4: b.ipv4,
                port: b.port,
                cluster,
                cluster_id: b.cluster_id,
                weight: b.weight,
            }
        }
        Wire {
            vip: self.vip,
            port: self.port,
            protocol: self.protocol,
            port_name: &self.port_name,
            candidates: self
                .candidates
                .iter()
                .map(|(c, bs)| (c.as_str(), bs.iter().map(|b| named(b, c)).collect()))
                .collect(),
            active: self
                .active
                .iter()
                .map(|b| named(b, names.get(&b.cluster_id).copied().unwrap_or_default()))
                .collect(),
            groups: &self.groups,
            unselected: &self.unselected,
            stats: &self.stats,
        }
        .serialize(serializer)
    }
}

/// Datapath statistics of a set of backends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FlowStats {
    /// New flows sent to them.
    pub new_flows: u64,
    /// TCP resets they sent to clients of load-balanced flows.
    pub resets: u64,
}

/// One group of a `TrafficPolicy` as applied to a frontend.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GroupShare {
    /// The group's weight in the policy.
    pub weight: u32,
    /// Clusters of the group that have ready backends.
    pub clusters: Vec<String>,
    pub backends: usize,
    /// Fraction of new connections the datapath gives the group (its slots over all slots).
    pub share: f64,
}

impl Eq for GroupShare {}

/// Slots of a frontend steered by a `TrafficPolicy` (at least; more with many backends): shares are met within
/// 0.1% by the slot table.
pub const WEIGHTED_SLOTS: u32 = 1000;
/// Most slots of one frontend; larger capacity sums are scaled down to it.
pub const MAX_SLOTS_PER_FRONTEND: u32 = 16_384;

/// A service as this node balances it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceView {
    pub namespace: String,
    pub name: String,
    pub spec: GlobalSpec,
    /// The `TrafficPolicy` (`namespace/name`) in force for this service.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    pub frontends: Vec<Frontend>,
}

/// How a `TrafficPolicy` object fares.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TrafficPolicyStatus {
    pub namespace: String,
    pub name: String,
    pub service: String,
    pub state: TrafficPolicyState,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Whether a `TrafficPolicy` is in force (serialized in lowercase, as the status API shows it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TrafficPolicyState {
    /// In force.
    Active,
    /// This version is invalid; an earlier valid version stays in force when there is one.
    Rejected,
    /// Another policy already steers the service.
    Conflict,
}

impl TrafficPolicyState {
    /// The name the status API uses.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Rejected => "rejected",
            Self::Conflict => "conflict",
        }
    }
}

/// The versions of the `TrafficPolicy` objects in force: an invalid update is refused and the last valid version
/// stays; a deleted object is forgotten.
#[derive(Debug, Default)]
pub struct TrafficPolicyVersions {
    accepted: BTreeMap<(String, String), TrafficPolicy>,
    /// Weights set by staged rollouts, by (namespace, service): they take precedence over `TrafficPolicy`.
    overrides: BTreeMap<(String, String), TrafficPolicy>,
}

/// What makes a policy unusable in this cluster's state (its fields were checked when it was parsed).
fn policy_problem(local: &ClusterState, p: &TrafficPolicy) -> Option<String> {
    let key = (p.namespace.clone(), p.spec.service.clone());
    match local.services.get(&key) {
        None => Some(format!(
            "service {}/{} does not exist",
            p.namespace, p.spec.service
        )),
        Some(s) if s.cluster_ipv4.is_none() => Some(format!(
            "service {}/{} has no ClusterIP",
            p.namespace, p.spec.service
        )),
        Some(_) => None,
    }
}

impl TrafficPolicyVersions {
    /// Takes the policies of `local`: valid ones replace their earlier version, invalid ones keep it.
    pub fn update(&mut self, local: &ClusterState) -> Vec<TrafficPolicyStatus> {
        self.accepted
            .retain(|k, _| local.traffic_policies.contains_key(k));
        let mut out = Vec::new();
        for (key, p) in &local.traffic_policies {
            let (state, message) = match policy_problem(local, p) {
                None => {
                    self.accepted.insert(key.clone(), p.clone());
                    (TrafficPolicyState::Active, None)
                }
                Some(problem) => {
                    let kept = self.accepted.get(key).map(|old| {
                        format!(
                            "; the previous version (service {}) stays in force",
                            old.spec.service
                        )
                    });
                    (
                        TrafficPolicyState::Rejected,
                        Some(format!("{problem}{}", kept.unwrap_or_default())),
                    )
                }
            };
            out.push(TrafficPolicyStatus {
                namespace: p.namespace.clone(),
                name: p.name.clone(),
                service: p.spec.service.clone(),
                state,
                message,
            });
        }
        // One policy per service: the first by name steers it.
        for st in &mut out {
            if let Some(winner) = self
                .accepted
                .values()
                .find(|p| p.namespace == st.namespace && p.spec.service == st.service)
                && winner.name != st.name
                && st.state == TrafficPolicyState::Active
            {
                st.state = TrafficPolicyState::Conflict;
                st.message = Some(format!(
                    "TrafficPolicy {}/{} already steers service {}",
                    winner.namespace, winner.name, st.service
                ));
            }
        }
        out
    }

    /// The policy in force for a service: a staged rollout's weights, else its `TrafficPolicy`.
    #[must_use]
    pub fn for_service(&self, namespace: &str, service: &str) -> Option<&TrafficPolicy> {
        self.overrides
            .get(&(namespace.to_owned(), service.to_owned()))
            .or_else(|| {
                self.accepted
                    .values()
                    .find(|p| p.namespace == namespace && p.spec.service == service)
            })
    }

    /// The services some policy or rollout steers, as (namespace, service), with what steers each.
    #[must_use]
    pub fn steered(&self) -> BTreeMap<(String, String), TrafficPolicy> {
        let mut out: BTreeMap<(String, String), TrafficPolicy> = BTreeMap::new();
        for p in self.accepted.values() {
            out.entry((p.namespace.clone(), p.spec.service.clone()))
                .or_insert_with(|| p.clone());
        }
        for (k, p) in &self.overrides {
            out.insert(k.clone(), p.clone());
        }
        out
    }

    /// Sets the weights of staged rollouts (replacing the previous set).
    pub fn set_overrides(&mut self, overrides: BTreeMap<(String, String), TrafficPolicy>) {
        self.overrides = overrides;
    }
}

/// Backends of a frontend steered by `policy`: every cluster of `candidates` joins the first group that selects
/// it; groups without backends (or with weight 0) are left out and the others share in proportion to their
/// weights; inside a group backends share by capacity (their `weight` on entry). Returns the active backends
/// with their slot counts, the groups, and the clusters no group selects.
fn weighted(
    policy: &TrafficPolicy,
    labels_of: &dyn Fn(&str) -> BTreeMap<String, String>,
    candidates: &BTreeMap<String, Vec<Backend>>,
) -> (Vec<Backend>, Vec<GroupShare>, Vec<String>) {
    let n = policy.spec.weights.len();
    let mut members: Vec<Vec<&Backend>> = vec![Vec::new(); n];
    let mut clusters: Vec<Vec<String>> = vec![Vec::new(); n];
    let mut unselected = Vec::new();
    for (cluster, backends) in candidates {
        match policy.spec.group_of(cluster, &labels_of(cluster)) {
            Some(g) => {
                members[g].extend(backends.iter());
                clusters[g].push(cluster.clone());
            }
            None => unselected.push(cluster.clone()),
        }
    }
    let live_weight: f64 = policy
        .spec
        .weights
        .iter()
        .zip(&members)
        .filter(|(_, m)| !m.is_empty())
        .map(|(g, _)| f64::from(g.weight))
        .sum();
    let mut flat: Vec<(usize, &Backend)> = Vec::new();
    let mut shares = Vec::new();
    for (g, m) in members.iter().enumerate() {
        let capacity: f64 = m.iter().map(|b| f64::from(b.weight.max(1))).sum();
        for b in m {
            let share = if live_weight > 0.0 {
                f64::from(policy.spec.weights[g].weight) / live_weight * f64::from(b.weight.max(1)) / capacity
            } else {
                0.0
            };
            flat.push((g, b));
            shares.push(share);
        }
    }
    let backend_count = u32::try_from(flat.len()).unwrap_or(u32::MAX);
    let total = WEIGHTED_SLOTS
        .max(backend_count.saturating_mul(16))
        .min(MAX_SLOTS_PER_FRONTEND);
    let slots = apportion(total, &shares);
    let mut group_slots = vec![0u32; n];
    let mut active = Vec::new();
    for ((g, b), s) in flat.iter().zip(&slots) {
        group_slots[*g] += s;
        if *s > 0 {
            active.push(Backend { weight: *s, ..**b });
        }
    }
    active.sort();
    reduce_slots(&mut active);
    let all: u32 = group_slots.iter().sum();
    let groups = policy
        .spec
        .weights
        .iter()
        .enumerate()
        .map(|(g, w)| GroupShare {
            weight: w.weight,
            clusters: clusters[g].clone(),
            backends: members[g].len(),
            share: if all == 0 {
                0.0
            } else {
                f64::from(group_slots[g]) / f64::from(all)
            },
        })
        .collect();
    (active, groups, unselected)
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// Divides every slot count by their greatest common divisor: the same shares with the smallest table (10/90
/// becomes 1/9), so fewer map entries and a smaller cache footprint for new flows.
fn reduce_slots(active: &mut [Backend]) {
    let g = active.iter().fold(0, |g, b| gcd(g, b.weight));
    if g > 1 {
        for b in active.iter_mut() {
            b.weight /= g;
        }
    }
}

/// Scales capacity weights down so that a frontend's slot table stays within [`MAX_SLOTS_PER_FRONTEND`].
fn fit_slots(mut active: Vec<Backend>) -> Vec<Backend> {
    reduce_slots(&mut active);
    let sum: u64 = active.iter().map(|b| u64::from(b.weight)).sum();
    if sum > u64::from(MAX_SLOTS_PER_FRONTEND) {
        let shares: Vec<f64> = active.iter().map(|b| f64::from(b.weight)).collect();
        let slots = apportion(MAX_SLOTS_PER_FRONTEND, &shares);
        for (b, s) in active.iter_mut().zip(slots) {
            b.weight = s;
        }
        active.retain(|b| b.weight > 0);
    }
    reduce_slots(&mut active);
    active
}

/// Picks the active backends of a frontend by affinity: the preferred set when it has a backend, else all.
fn select(
    affinity: Affinity,
    local_cluster: &str,
    candidates: &BTreeMap<String, Vec<Backend>>,
) -> Vec<Backend> {
    let (mut local, mut remote): (Vec<&Backend>, Vec<&Backend>) = (Vec::new(), Vec::new());
    for (c, bs) in candidates {
        if c == local_cluster {
            local.extend(bs);
        } else {
            remote.extend(bs);
        }
    }
    let chosen: Vec<&Backend> = match affinity {
        Affinity::Local if !local.is_empty() => local,
        Affinity::Remote if !remote.is_empty() => remote,
        _ => candidates.values().flatten().collect(),
    };
    let mut out: Vec<Backend> = chosen.into_iter().copied().collect();
    out.sort();
    out.dedup();
    out
}

/// The remote clusters whose backends may serve: those that are reachable, or unreachable for less than
/// `grace_ms` (a short outage does not move traffic; a long one fails clients over to live clusters).
#[must_use]
pub fn reachable(
    remotes: &BTreeMap<String, RemoteCluster>,
    now_ms: u64,
    grace_ms: u64,
) -> BTreeMap<String, RemoteCluster> {
    remotes
        .iter()
        .filter(|(_, rc)| {
            rc.unreachable_since_ms
                .is_none_or(|since| now_ms.saturating_sub(since) < grace_ms)
        })
        .map(|(n, rc)| (n.clone(), rc.clone()))
        .collect()
}

/// The labels of a cluster: this one's from `me`, a remote one's as its peer file pins them, else as its config
/// publishes them.
#[must_use]
pub fn cluster_labels(
    me: &LocalNode,
    remotes: &BTreeMap<String, RemoteCluster>,
    cluster: &str,
) -> BTreeMap<String, String> {
    if cluster == me.cluster {
        me.labels.clone()
    } else {
        remotes
            .get(cluster)
            .and_then(RemoteCluster::labels)
            .cloned()
            .unwrap_or_default()
    }
}

/// Every service with a ClusterIP, with its frontends and backends.
///
/// A local backend's weight is its pod's capacity: from the pod when the source shows it (the pods of this node),
/// else from this cluster's capacity records in `own` (its etcd, `--kvstore-config`), else 1.
///
/// Global services without a `service.cilium.io/affinity` annotation prefer the backends of `affinity_default`.
#[must_use]
pub fn services(
    me: &LocalNode,
    local: &ClusterState,
    own: Option<&RemoteCluster>,
    remotes: &BTreeMap<String, RemoteCluster>,
    policies: &TrafficPolicyVersions,
    affinity_default: Affinity,
) -> Vec<ServiceView> {
    let ctx = ViewContext {
        me,
        local,
        own,
        remotes,
        serves: &|_| true,
        policies,
        affinity_default,
    };
    local.services.values().filter_map(|svc| ctx.view(svc)).collect()
}

/// What one service's view is computed from: [`services`] computes every view from it, the reconciler only the
/// views of the services a change touched.
pub struct ViewContext<'a> {
    pub me: &'a LocalNode,
    pub local: &'a ClusterState,
    pub own: Option<&'a RemoteCluster>,
    /// Remote clusters (this cluster's name and unusable ones are skipped).
    pub remotes: &'a BTreeMap<String, RemoteCluster>,
    /// Whether a remote cluster's backends may serve (see [`reachable`]).
    pub serves: &'a dyn Fn(&str) -> bool,
    pub policies: &'a TrafficPolicyVersions,
    pub affinity_default: Affinity,
}

impl ViewContext<'_> {
    /// The view of service `namespace/name`: `None` when the cluster has no such service with a ClusterIP.
    #[must_use]
    pub fn view_of(&self, namespace: &str, name: &str) -> Option<ServiceView> {
        self.local
            .services
            .get(&(namespace.to_owned(), name.to_owned()))
            .and_then(|svc| self.view(svc))
    }

    /// The view of `svc` (`None` without a ClusterIP).
    #[must_use]
    pub fn view(&self, svc: &mesh_model::Service) -> Option<ServiceView> {
        let (me, local, remotes) = (self.me, self.local, self.remotes);
        let labels_of = |cluster: &str| cluster_labels(me, remotes, cluster);
        let capacity_of = |ip: Ipv4Addr| self.own.and_then(|o| o.capacities.get(&ip).copied());
        let vip = svc.cluster_ipv4?;
        let exported = local.exports.contains(&(svc.namespace.clone(), svc.name.clone()));
        let spec = service::global_spec(svc, exported, self.affinity_default);
        let endpoints = service::endpoints_with(local, svc, &capacity_of);
        let id = format!("{}/{}", svc.namespace, svc.name);
        let policy = self.policies.for_service(&svc.namespace, &svc.name);
        let frontends = svc
            .ports
            .iter()
            .map(|sp| {
                let port_name = sp.name.clone().unwrap_or_default();
                let mut candidates: BTreeMap<String, Vec<Backend>> = BTreeMap::new();
                // Lists are made to measure (`shrink_to_fit`): filtered, they would keep up to twice their room,
                // and a million remote backends live in them.
                let mut locals: Vec<Backend> = endpoints
                    .iter()
                    .filter_map(|e| {
                        let p = e
                            .ports
                            .iter()
                            .find(|p| p.name == port_name && p.protocol == sp.protocol)?;
                        Some(Backend {
                            ipv4: e.ipv4,
                            port: p.port,
                            cluster_id: me.cluster_id,
                            weight: e.capacity.max(1),
                        })
                    })
                    .collect();
                locals.shrink_to_fit();
                if !locals.is_empty() {
                    candidates.insert(me.cluster.clone(), locals);
                }
                if spec.global {
                    for (cname, rc) in remotes
                        .iter()
                        .filter(|(n, rc)| **n != me.cluster && rc.usable && (self.serves)(n))
                    {
                        let Some(rec) = rc.services.get(&id) else { continue };
                        let mut bs: Vec<Backend> = rec
                            .backends
                            .iter()
                            .filter_map(|b| {
                                let p = b
                                    .ports
                                    .iter()
                                    .find(|p| p.name == port_name && p.protocol == sp.protocol)?;
                                Some(Backend {
                                    ipv4: b.ipv4,
                                    port: p.port,
                                    cluster_id: rec.cluster_id,
                                    weight: b.weight.max(1),
                                })
                            })
                            .collect();
                        bs.shrink_to_fit();
                        if !bs.is_empty() {
                            candidates.insert(cname.clone(), bs);
                        }
                    }
                }
                let (active, groups, unselected) = match policy {
                    Some(p) => weighted(p, &labels_of, &candidates),
                    None => (
                        fit_slots(select(spec.affinity, &me.cluster, &candidates)),
                        Vec::new(),
                        Vec::new(),
                    ),
                };
                Frontend {
                    vip,
                    port: sp.port,
                    protocol: sp.protocol,
                    port_name,
                    candidates,
                    active,
                    groups,
                    unselected,
                    stats: BTreeMap::new(),
                }
            })
            .collect();
        Some(ServiceView {
            namespace: svc.namespace.clone(),
            name: svc.name.clone(),
            spec,
            policy: policy.map(|p| format!("{}/{}", p.namespace, p.name)),
            frontends,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_kvstore::{BackendRecord, PortRecord, ServiceRecord};
    use mesh_model::traffic::{ClusterSelector, TrafficPolicySpec, WeightGroup};
    use mesh_model::{ContainerPort, Pod, Service, ServicePort};

    fn me() -> LocalNode {
        LocalNode {
            node: "east-node-1".into(),
            cluster: "east".into(),
            cluster_id: 1,
            labels: BTreeMap::new(),
        }
    }

    fn local(annotations: &[(&str, &str)], pods: &[[u8; 4]]) -> ClusterState {
        let mut st = ClusterState::default();
        let svc = Service {
            namespace: "demo".into(),
            name: "echo".into(),
            cluster_ipv4: Some(Ipv4Addr::new(198, 18, 1, 2)),
            selector: [("app".to_owned(), "echo".to_owned())].into(),
            ports: vec![ServicePort {
                name: Some("tcp".into()),
                port: 80,
                protocol: Protocol::Tcp,
                target_port: Some("8080".into()),
            }],
            annotations: annotations
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        };
        st.services.insert(("demo".into(), "echo".into()), svc);
        for (i, ip) in pods.iter().enumerate() {
            let p = Pod {
                namespace: "demo".into(),
                name: format!("p{i}"),
                labels: [("app".to_owned(), "echo".to_owned())].into(),
                annotations: BTreeMap::new(),
                node_name: None,
                ipv4: Some(Ipv4Addr::from(*ip)),
                ports: vec![ContainerPort {
                    name: None,
                    port: 8080,
                    protocol: Protocol::Tcp,
                }],
                hostname: None,
                subdomain: None,
            };
            st.pods.insert(("demo".into(), p.name.clone()), p);
        }
        st
    }

    fn remote(name: &str, id: u16, ips: &[[u8; 4]]) -> (String, RemoteCluster) {
        let mut rc = RemoteCluster::new(name);
        let port = |p| PortRecord {
            name: "tcp".into(),
            port: p,
            protocol: Protocol::Tcp,
        };
        rc.services.insert(
            "demo/echo".into(),
            std::sync::Arc::new(ServiceRecord {
                mcs: None,
                cluster: name.into(),
                cluster_id: id,
                namespace: "demo".into(),
                name: "echo".into(),
                ports: vec![port(80)],
                backends: ips
                    .iter()
                    .map(|ip| BackendRecord {
                        ipv4: Ipv4Addr::from(*ip),
                        ports: vec![port(8080)].into(),
                        weight: 1,
                    })
                    .collect(),
            }),
        );
        (name.into(), rc)
    }

    fn active_clusters(v: &[ServiceView]) -> Vec<String> {
        let mut c: Vec<String> = v[0].frontends[0]
            .active
            .iter()
            .map(|b| {
                v[0].frontends[0]
                    .cluster_of(b.cluster_id)
                    .unwrap_or_default()
                    .to_owned()
            })
            .collect();
        c.dedup();
        c
    }

    #[test]
    fn local_service_uses_only_local_backends() {
        let remotes: BTreeMap<_, _> = [remote("west", 2, &[[10, 2, 0, 2]])].into();
        let v = services_np(&me(), &local(&[], &[[10, 1, 0, 2]]), &remotes);
        assert_eq!(v[0].frontends[0].active.len(), 1);
        assert_eq!(active_clusters(&v), vec!["east"]);
    }

    /// West (two backends) and north (one) as peers of east (one), and a global service.
    fn three_clusters() -> BTreeMap<String, RemoteCluster> {
        [
            remote("west", 2, &[[10, 2, 0, 2], [10, 2, 1, 2]]),
            remote("north", 3, &[[10, 3, 0, 2]]),
        ]
        .into()
    }

    const GLOBAL: [(&str, &str); 1] = [("service.cilium.io/global", "true")];

    #[test]
    fn the_status_names_each_backends_cluster() {
        let v = services_np(&me(), &local(&GLOBAL, &[[10, 1, 0, 2]]), &three_clusters());
        let json = serde_json::to_value(&v[0].frontends[0]).unwrap();
        let mut active: Vec<(String, String)> = json["active"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| {
                (
                    b["cluster"].as_str().unwrap().to_owned(),
                    b["ipv4"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        active.sort();
        assert_eq!(
            active,
            [
                ("east", "10.1.0.2"),
                ("north", "10.3.0.2"),
                ("west", "10.2.0.2"),
                ("west", "10.2.1.2")
            ]
            .map(|(c, ip)| (c.to_owned(), ip.to_owned()))
        );
        let west = &json["candidates"]["west"];
        assert_eq!(west.as_array().unwrap().len(), 2);
        assert!(
            west.as_array()
                .unwrap()
                .iter()
                .all(|b| b["cluster"] == "west" && b["clusterId"] == 2)
        );
        assert!(
            json.get("groups").is_none(),
            "empty parts are left out, as before"
        );
    }

    #[test]
    fn global_service_merges_clusters_and_affinity_prefers_then_falls_back() {
        let remotes = three_clusters();
        let g = GLOBAL;
        let v = services_np(&me(), &local(&g, &[[10, 1, 0, 2]]), &remotes);
        assert_eq!(v[0].frontends[0].active.len(), 4);
        assert_eq!(v[0].frontends[0].active[0].port, 8080);
        let l = [
            ("service.cilium.io/global", "true"),
            ("service.cilium.io/affinity", "local"),
        ];
        assert_eq!(
            active_clusters(&services_np(&me(), &local(&l, &[[10, 1, 0, 2]]), &remotes)),
            vec!["east"]
        );
        // No local backend: fall back to the remote ones.
        let v = services_np(&me(), &local(&l, &[]), &remotes);
        assert_eq!(v[0].frontends[0].active.len(), 3);
        let r = [
            ("service.cilium.io/global", "true"),
            ("service.cilium.io/affinity", "remote"),
        ];
        let v = services_np(&me(), &local(&r, &[[10, 1, 0, 2]]), &remotes);
        assert!(
            v[0].frontends[0].active.iter().all(|b| b.cluster_id != 1),
            "none of east"
        );
        let v = services_np(&me(), &local(&r, &[[10, 1, 0, 2]]), &BTreeMap::new());
        assert_eq!(
            active_clusters(&v),
            vec!["east"],
            "remote affinity falls back to local"
        );
    }

    #[test]
    fn the_default_affinity_steers_services_without_the_annotation() {
        let remotes: BTreeMap<_, _> = [
            remote("west", 2, &[[10, 2, 0, 2], [10, 2, 1, 2]]),
            remote("north", 3, &[[10, 3, 0, 2]]),
        ]
        .into();
        let with_default = |st: &ClusterState, remotes: &BTreeMap<String, RemoteCluster>, d| {
            services(&me(), st, None, remotes, &TrafficPolicyVersions::default(), d)
        };
        // Clusters of the active backends, by name.
        let clusters = |v: &[ServiceView]| {
            let mut c = active_clusters(v);
            c.sort();
            c.dedup();
            c
        };
        let g = [("service.cilium.io/global", "true")];
        // Default local: only the local backend while it is live, the remote ones without it.
        let v = with_default(&local(&g, &[[10, 1, 0, 2]]), &remotes, Affinity::Local);
        assert_eq!(v[0].spec.affinity, Affinity::Local);
        assert_eq!(clusters(&v), vec!["east"]);
        let v = with_default(&local(&g, &[]), &remotes, Affinity::Local);
        assert_eq!(clusters(&v), vec!["north", "west"], "falls back to remote");
        // Default remote: only remote backends while any is live, the local one without them.
        let v = with_default(&local(&g, &[[10, 1, 0, 2]]), &remotes, Affinity::Remote);
        assert_eq!(clusters(&v), vec!["north", "west"]);
        let v = with_default(&local(&g, &[[10, 1, 0, 2]]), &BTreeMap::new(), Affinity::Remote);
        assert_eq!(clusters(&v), vec!["east"], "falls back to local");
        // An explicit annotation wins over the default, `none` included.
        for (value, want) in [
            ("none", vec!["east", "north", "west"]),
            ("remote", vec!["north", "west"]),
        ] {
            let a = [
                ("service.cilium.io/global", "true"),
                ("service.cilium.io/affinity", value),
            ];
            let v = with_default(&local(&a, &[[10, 1, 0, 2]]), &remotes, Affinity::Local);
            assert_eq!(clusters(&v), want, "annotation {value}");
        }
        // An invalid annotation still keeps the service local and reports, whatever the default.
        let bad = [
            ("service.cilium.io/global", "true"),
            ("service.cilium.io/affinity", "closest"),
        ];
        let v = with_default(&local(&bad, &[]), &remotes, Affinity::Remote);
        assert!(v[0].frontends[0].active.is_empty(), "no remote backends");
        assert_eq!(v[0].spec.errors.len(), 1);
        // A local service has only local backends whatever the default.
        let v = with_default(&local(&[], &[[10, 1, 0, 2]]), &remotes, Affinity::Remote);
        assert_eq!(clusters(&v), vec!["east"]);
    }

    #[test]
    fn invalid_annotation_keeps_service_local_and_reports() {
        let remotes: BTreeMap<_, _> = [remote("west", 2, &[[10, 2, 0, 2]])].into();
        let bad = [
            ("service.cilium.io/global", "true"),
            ("service.cilium.io/affinity", "closest"),
        ];
        let v = services_np(&me(), &local(&bad, &[[10, 1, 0, 2]]), &remotes);
        assert_eq!(active_clusters(&v), vec!["east"]);
        assert_eq!(v[0].spec.errors.len(), 1);
    }

    #[test]
    fn unreachable_remote_is_withdrawn_after_the_grace_period() {
        let (n, mut rc) = remote("west", 2, &[[10, 2, 0, 2]]);
        rc.unreachable_since_ms = Some(10_000);
        let remotes: BTreeMap<_, _> = [(n, rc)].into();
        assert_eq!(
            reachable(&remotes, 12_000, 5_000).len(),
            1,
            "within the grace period"
        );
        assert!(reachable(&remotes, 15_000, 5_000).is_empty(), "after it");
        let g = [("service.cilium.io/global", "true")];
        let v = services_np(
            &me(),
            &local(&g, &[[10, 1, 0, 2]]),
            &reachable(&remotes, 15_000, 5_000),
        );
        assert_eq!(active_clusters(&v), vec!["east"]);
    }

    #[test]
    fn unusable_remote_contributes_nothing() {
        let (n, mut rc) = remote("west", 2, &[[10, 2, 0, 2]]);
        rc.usable = false;
        let remotes: BTreeMap<_, _> = [(n, rc)].into();
        let v = services_np(
            &me(),
            &local(&[("service.cilium.io/global", "true")], &[]),
            &remotes,
        );
        assert!(v[0].frontends[0].active.is_empty());
    }

    fn services_np(
        me: &LocalNode,
        local: &ClusterState,
        remotes: &BTreeMap<String, RemoteCluster>,
    ) -> Vec<ServiceView> {
        services(
            me,
            local,
            None,
            remotes,
            &TrafficPolicyVersions::default(),
            Affinity::None,
        )
    }

    fn policy(name: &str, service: &str, groups: Vec<(ClusterSelector, u32)>) -> TrafficPolicy {
        TrafficPolicy {
            namespace: "demo".into(),
            name: name.into(),
            spec: TrafficPolicySpec {
                service: service.into(),
                weights: groups
                    .into_iter()
                    .map(|(clusters, weight)| WeightGroup { clusters, weight })
                    .collect(),
            },
        }
    }

    fn by_labels(kv: &[(&str, &str)]) -> ClusterSelector {
        ClusterSelector {
            match_labels: kv
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ..Default::default()
        }
    }

    fn by_names(names: &[&str]) -> ClusterSelector {
        ClusterSelector {
            names: names.iter().map(|n| (*n).to_owned()).collect(),
            ..Default::default()
        }
    }

    fn labelled(mut rc: (String, RemoteCluster), kv: &[(&str, &str)]) -> (String, RemoteCluster) {
        rc.1.config = Some(mesh_kvstore::ClusterConfig {
            name: rc.0.clone(),
            id: 9,
            capabilities: vec![],
            labels: kv
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        });
        rc
    }

    /// Slots per cluster of the first frontend.
    fn slots_by_cluster(v: &[ServiceView]) -> BTreeMap<String, u32> {
        let mut out = BTreeMap::new();
        let fe = &v[0].frontends[0];
        for b in &fe.active {
            *out.entry(fe.cluster_of(b.cluster_id).unwrap_or_default().to_owned())
                .or_default() += b.weight;
        }
        out
    }

    fn with_policy(local: &mut ClusterState, p: TrafficPolicy) -> TrafficPolicyVersions {
        local
            .traffic_policies
            .insert((p.namespace.clone(), p.name.clone()), p);
        let mut book = TrafficPolicyVersions::default();
        let st = book.update(local);
        assert!(st.iter().all(|s| s.state == TrafficPolicyState::Active), "{st:?}");
        book
    }

    #[test]
    fn policy_weights_groups_by_labels_and_names_and_leaves_unselected_clusters_out() {
        let mut me = me();
        me.labels = [("stage".to_owned(), "canary".to_owned())].into();
        let remotes: BTreeMap<_, _> = [
            remote("west", 2, &[[10, 2, 0, 2], [10, 2, 1, 2]]),
            labelled(remote("north", 3, &[[10, 3, 0, 2]]), &[("stage", "prod")]),
        ]
        .into();
        let mut st = local(&[("service.cilium.io/global", "true")], &[[10, 1, 0, 2]]);
        let book = with_policy(
            &mut st,
            policy(
                "p",
                "echo",
                vec![(by_labels(&[("stage", "canary")]), 10), (by_names(&["west"]), 90)],
            ),
        );
        let v = services(&me, &st, None, &remotes, &book, Affinity::None);
        assert_eq!(v[0].policy.as_deref(), Some("demo/p"));
        assert_eq!(
            slots_by_cluster(&v),
            [("east".to_owned(), 2), ("west".to_owned(), 18)].into(),
            "100 / 450 / 450 slots, divided by their gcd"
        );
        let f = &v[0].frontends[0];
        assert_eq!(f.unselected, vec!["north".to_owned()]);
        assert_eq!(f.groups[0].clusters, vec!["east".to_owned()]);
        assert!((f.groups[1].share - 0.9).abs() < 1e-9);
        // The canary group loses its backends: the west group takes all new connections.
        let mut none_local = local(&[("service.cilium.io/global", "true")], &[]);
        none_local.traffic_policies = st.traffic_policies.clone();
        let v = services(&me, &none_local, None, &remotes, &book, Affinity::None);
        assert_eq!(slots_by_cluster(&v), [("west".to_owned(), 2)].into());
        // No group has a backend: nothing is active (new flows are dropped and counted).
        let v = services(&me, &none_local, None, &BTreeMap::new(), &book, Affinity::None);
        assert!(v[0].frontends[0].active.is_empty());
    }

    #[test]
    fn shares_inside_a_group_follow_capacity() {
        let (n, mut rc) = remote("west", 2, &[[10, 2, 0, 2], [10, 2, 1, 2]]);
        if let Some(rec) = rc.services.get_mut("demo/echo") {
            std::sync::Arc::make_mut(rec).backends[1].weight = 3;
        }
        let remotes: BTreeMap<_, _> = [(n, rc)].into();
        let mut st = local(&[("service.cilium.io/global", "true")], &[]);
        let book = with_policy(&mut st, policy("p", "echo", vec![(by_names(&["west"]), 1)]));
        let v = services(&me(), &st, None, &remotes, &book, Affinity::None);
        let w: Vec<u32> = v[0].frontends[0].active.iter().map(|b| b.weight).collect();
        assert_eq!(w, vec![1, 3], "250 / 750 slots, divided by their gcd");
        // Without a policy the capacity is the slot count.
        let v = services_np(&me(), &st, &remotes);
        let w: Vec<u32> = v[0].frontends[0].active.iter().map(|b| b.weight).collect();
        assert_eq!(w, vec![1, 3]);
    }

    /// A local service's backends on other nodes (EndpointSlice endpoints whose pods this agent does not watch)
    /// take their capacity from this cluster's capacity records; a pod the agent sees keeps its own annotation; with
    /// no record (or without `--kvstore-config`) the capacity is 1.
    #[test]
    fn backends_on_other_nodes_take_their_capacity_from_this_clusters_records() {
        use mesh_model::{
            AddressType, EndpointConditions, EndpointSlice, EndpointSlicePort, PodRef, SliceEndpoint,
        };
        let mut st = local(&[], &[[10, 1, 0, 2]]);
        if let Some(p) = st.pods.get_mut(&("demo".to_owned(), "p0".to_owned())) {
            p.annotations
                .insert(mesh_model::traffic::ANNOTATION_CAPACITY.into(), "2".into());
        }
        let ep = |ip: &str, pod: &str, node: &str| SliceEndpoint {
            addresses: vec![ip.into()],
            conditions: EndpointConditions::default(),
            node_name: Some(node.into()),
            pod: Some(PodRef {
                namespace: "demo".into(),
                name: pod.into(),
            }),
            zone: None,
            hostname: None,
        };
        st.endpoint_slices.insert(
            ("demo".into(), "echo-1".into()),
            EndpointSlice {
                namespace: "demo".into(),
                name: "echo-1".into(),
                service: Some("echo".into()),
                address_type: AddressType::IPv4,
                ports: vec![EndpointSlicePort {
                    name: "tcp".into(),
                    port: Some(8080),
                    protocol: Protocol::Tcp,
                }],
                endpoints: vec![
                    ep("10.1.0.2", "p0", "east-node-1"),
                    ep("10.1.1.2", "far-a", "east-node-2"),
                    ep("10.1.1.3", "far-b", "east-node-2"),
                ],
            },
        );
        let mut own = RemoteCluster::new("east");
        own.capacities.insert(Ipv4Addr::new(10, 1, 1, 2), 3);
        own.capacities.insert(Ipv4Addr::new(10, 1, 0, 2), 9);
        let weights = |own: Option<&RemoteCluster>| -> Vec<(Ipv4Addr, u32)> {
            services(
                &me(),
                &st,
                own,
                &BTreeMap::new(),
                &TrafficPolicyVersions::default(),
                Affinity::None,
            )[0]
            .frontends[0]
                .active
                .iter()
                .map(|b| (b.ipv4, b.weight))
                .collect()
        };
        let ip = |d: u8, e: u8| Ipv4Addr::new(10, 1, d, e);
        assert_eq!(weights(Some(&own)), [(ip(0, 2), 2), (ip(1, 2), 3), (ip(1, 3), 1)]);
        assert_eq!(weights(None), [(ip(0, 2), 2), (ip(1, 2), 1), (ip(1, 3), 1)]);
    }

    #[test]
    fn invalid_policy_update_keeps_the_previous_version_and_conflicts_are_reported() {
        let mut st = local(&[], &[[10, 1, 0, 2]]);
        let good = policy("p", "echo", vec![(by_names(&["east"]), 1)]);
        let mut book = with_policy(&mut st, good.clone());
        let key = ("demo".to_owned(), "p".to_owned());
        st.traffic_policies
            .insert(key.clone(), policy("p", "ehco", vec![(by_names(&["east"]), 1)]));
        let status = book.update(&st);
        assert_eq!(status[0].state, TrafficPolicyState::Rejected);
        let msg = status[0].message.clone().unwrap_or_default();
        assert!(
            msg.contains("demo/ehco does not exist") && msg.contains("previous version"),
            "{msg}"
        );
        assert_eq!(book.for_service("demo", "echo"), Some(&good));
        // A second policy for the same service loses to the first by name.
        st.traffic_policies.insert(key, good);
        st.traffic_policies.insert(
            ("demo".to_owned(), "q".to_owned()),
            policy("q", "echo", vec![(by_names(&["west"]), 1)]),
        );
        let status = book.update(&st);
        assert_eq!(
            status.iter().map(|s| s.state.as_str()).collect::<Vec<_>>(),
            vec!["active", "conflict"]
        );
        // Deleted: forgotten.
        st.traffic_policies.clear();
        assert!(book.update(&st).is_empty());
        assert_eq!(book.for_service("demo", "echo"), None);
    }

    #[test]
    fn large_capacities_are_scaled_into_the_slot_table() {
        let ips: Vec<[u8; 4]> = (0..40u8).map(|i| [10, 2, 0, i + 2]).collect();
        let (n, mut rc) = remote("west", 2, &ips);
        if let Some(rec) = rc.services.get_mut("demo/echo") {
            for (i, b) in std::sync::Arc::make_mut(rec).backends.iter_mut().enumerate() {
                b.weight = if i % 2 == 0 { 1000 } else { 999 };
            }
        }
        let remotes: BTreeMap<_, _> = [(n, rc)].into();
        let st = local(&[("service.cilium.io/global", "true")], &[]);
        let v = services_np(&me(), &st, &remotes);
        let w: Vec<u32> = v[0].frontends[0].active.iter().map(|b| b.weight).collect();
        assert_eq!(w.len(), 40);
        assert_eq!(w.iter().sum::<u32>(), MAX_SLOTS_PER_FRONTEND);
        assert!(w.iter().all(|s| (409..=410).contains(s)), "{w:?}");
        // Equal capacities need one slot each.
        let (n, mut rc) = remote("west", 2, &ips);
        if let Some(rec) = rc.services.get_mut("demo/echo") {
            for b in &mut std::sync::Arc::make_mut(rec).backends {
                b.weight = 1000;
            }
        }
        let v = services_np(&me(), &st, &[(n, rc)].into());
        assert!(v[0].frontends[0].active.iter().all(|b| b.weight == 1));
    }
}
