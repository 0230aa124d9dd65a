//! Desired state → the datapath. Changes only the difference, so the same reconcile serves start, resync and
//! every change.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::{Arc, PoisonError};

use ipnet::Ipv4Net;
use mesh_common::{
    BackendStats, Counter, IpcacheEntry, LocalEndpoint, NodeConfig, ipcache_flags, pod_mac_for_ipv4,
};
use mesh_model::ClusterState;
use mesh_model::traffic::StagedRollout;
use serde::Serialize;
use tracing::{info, warn};

use crate::datapath::Datapath;
use crate::desired::{self, LocalNode};
use crate::lb::{self, FlowStats, ServiceView};
use crate::lb_maps::{LbAdopted, LbMaps, ServiceId};
use crate::netdev;
use crate::remote::{ClusterChanges, Journal, RemoteCluster, Scope};
use crate::rollout::{RolloutState, Rollouts};
use crate::tables::{Dirty, MeshTables};
pub use crate::tables::{Programmed, SharedProgrammed, tier};

/// One local endpoint as the status reports it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointStatus {
    pub pod: String,
    pub ipv4: Ipv4Addr,
    pub ifname: String,
    pub programmed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One ipcache entry as the status reports it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct IpcacheStatus {
    pub prefix: Ipv4Net,
    pub tunnel_endpoint: Option<Ipv4Addr>,
    pub cluster_id: u16,
    pub local_node: bool,
}

impl IpcacheStatus {
    #[must_use]
    pub fn of(prefix: Ipv4Net, e: &IpcacheEntry) -> Self {
        Self {
            prefix,
            tunnel_endpoint: (e.tunnel_endpoint != 0).then(|| Ipv4Addr::from(e.tunnel_endpoint)),
            cluster_id: e.cluster_id,
            local_node: e.flags & ipcache_flags::LOCAL_NODE != 0,
        }
    }
}

/// The outcome of the last reconcile: what was programmed, what failed, and the datapath counters.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DatapathStatus {
    pub node_ipv4: Option<Ipv4Addr>,
    /// The programs check policy on this node (`node_flags::POLICY`: some policy exists or an endpoint is still
    /// enforced).
    pub policy_checks: bool,
    pub pod_cidr: Option<Ipv4Net>,
    pub endpoints: Vec<EndpointStatus>,
    pub ipcache: Vec<IpcacheStatus>,
    pub counters: BTreeMap<&'static str, u64>,
    pub conflicts: Vec<String>,
    pub errors: Vec<String>,
    pub reconciles: u64,
    /// Pods refused since the agent started because their `fleetmesh.io/host-ifname` annotation names an
    /// interface that is no pod veth, or another pod's (each refusal counted once, until its reason changes).
    pub endpoint_refusals: u64,
    /// Services as this node balances them (frontends, candidate and active backends).
    pub services: Vec<ServiceView>,
    /// Every `TrafficPolicy` of the cluster and whether it is in force.
    pub traffic_policies: Vec<lb::TrafficPolicyStatus>,
    /// Every `StagedRollout` of the cluster, as this node runs it.
    pub rollouts: Vec<RolloutState>,
    /// Sizes, for `GET /v1/summary`.
    pub summary: Summary,
}

/// What the datapath holds, in numbers (cheap to serve, whatever the size of the mesh).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    /// Service frontends programmed.
    pub frontends: usize,
    /// Distinct backends programmed.
    pub backends: usize,
    /// Backends known from remote clusters' records (before matching them to local services).
    pub remote_endpoints: usize,
    /// Wall time of the last reconcile, µs.
    pub reconcile_us: u64,
    /// Compiled policy entries of the local endpoints.
    pub policy_entries: usize,
    /// Security identities known.
    pub identities: usize,
}

/// Adds the datapath's per-backend statistics to each frontend of `view`, by cluster.
pub fn attach_stats(view: &mut ServiceView, stats: &BTreeMap<u32, BackendStats>, lb: &LbMaps) {
    for fe in &mut view.frontends {
        fe.stats.clear();
        let protocol = fe.protocol;
        for (cluster, backends) in &fe.candidates {
            for b in backends {
                let Some(s) = lb
                    .backend_id(b.ipv4, b.port, protocol)
                    .and_then(|id| stats.get(&id))
                else {
                    continue;
                };
                let sum = fe.stats.entry(cluster.clone()).or_default();
                sum.new_flows += s.new_flows;
                sum.resets += s.resets;
            }
        }
    }
}

/// Peer entries an earlier agent left in the pinned maps: kept until their cluster has synced in this process, so
/// that a restart during a peer's outage does not cut the traffic that flowed to it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeldPeers {
    /// ipcache entries of other clusters (pod prefixes and pods), by prefix.
    pub ipcache: BTreeMap<Ipv4Net, IpcacheEntry>,
    /// `TUNNEL_PEERS` of other clusters: underlay address → cluster id.
    pub tunnel_peers: BTreeMap<Ipv4Addr, u16>,
}

impl HeldPeers {
    /// The other clusters' entries of the pinned maps of `dp` (this cluster's own come from its source).
    fn adopt(dp: &Datapath, my_id: u16) -> Self {
        let foreign = |id: u16| id != 0 && id != my_id;
        let ipcache = dp
            .ipcache()
            .map(|v| {
                v.into_iter()
                    .filter(|(_, e)| {
                        foreign(e.cluster_id) && e.flags & mesh_common::ipcache_flags::LOCAL_NODE == 0
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut tunnel_peers = dp.tunnel_peers().unwrap_or_default();
        tunnel_peers.retain(|_, id| foreign(*id));
        Self {
            ipcache,
            tunnel_peers,
        }
    }

    /// Lets go of the entries of every cluster id that is settled (see [`settled`]).
    fn release(&mut self, remotes: &BTreeMap<String, RemoteCluster>, configured: bool) {
        self.ipcache
            .retain(|_, e| !settled(e.cluster_id, remotes, configured));
        self.tunnel_peers
            .retain(|_, id| !settled(*id, remotes, configured));
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.ipcache.is_empty() && self.tunnel_peers.is_empty()
    }
}

/// Whether the entries of cluster id `id` that an earlier agent programmed may go: a peer with that id has synced
/// in this process (its records are the truth now) or was refused, or the peers are configured, every one's id is
/// known and none has it (a peer removed meanwhile). Until then they stay, whatever this process has (not) heard.
#[must_use]
pub fn settled(id: u16, remotes: &BTreeMap<String, RemoteCluster>, configured: bool) -> bool {
    if let Some(rc) = remotes.values().find(|rc| rc.cluster_id == Some(id)) {
        // Heard from and refused, or synced: either way this process decided what of it is used.
        return !rc.usable || rc.syncs > 0;
    }
    configured && remotes.values().all(|rc| rc.cluster_id.is_some())
}

pub struct Reconciler {
    pub dp: Datapath,
    pub me: LocalNode,
    pub vxlan_ifname: String,
    reconciles: u64,
    policies: lb::TrafficPolicyVersions,
    /// Staged rollouts of this node (set `rollouts` to a [`Rollouts::load`]ed book to persist them).
    pub rollouts: Rollouts,
    /// How long an unreachable remote cluster keeps its backends in global services.
    pub remote_grace: std::time::Duration,
    /// Affinity of global services without a `service.cilium.io/affinity` annotation.
    pub service_affinity_default: mesh_model::service::Affinity,
    /// [`mesh_common::node_flags`] of the encryption mode (`--encryption`, docs/encryption.md).
    pub encryption_flags: u16,
    /// Identities and network policy of the local endpoints.
    policy: crate::policy::PolicyReconciler,
    /// Some local endpoint had an enforced direction after the last pass (true until a pass proves otherwise,
    /// e.g. tables adopted from an earlier agent).
    policy_enforced: bool,
    /// Where flow events learn what addresses and identities are called.
    pub flows: Option<std::sync::Arc<crate::flows::Hub>>,
    /// The compiled policies `GET /v1/policy` serves.
    pub policy_views: crate::policy::SharedPolicyViews,
    /// Host interfaces found to be pod veths, with the ifindex they had then ([`netdev::check_pod_veth`] runs
    /// again when an interface is re-created).
    pod_veths: BTreeMap<String, u32>,
    /// The refused endpoints of the last pass (pod → reason) and how many refusals were counted in all.
    refused: BTreeMap<String, String>,
    endpoint_refusals: u64,
    /// Peer entries adopted from the pinned maps, held until their cluster is settled.
    pub held: HeldPeers,
    /// Whether the set of peers is known (the clustermesh config was read): until then adopted entries stay.
    pub peers_configured: bool,
    /// Peers' identities as last synced (set to an [`crate::held::IdentityStore::load`]ed store to persist them).
    pub identity_store: crate::held::IdentityStore,
    /// The mesh's tables and what is programmed of them (shared with the API).
    pub tables: MeshTables,
    /// What the datapath is steered by, as last applied (TrafficPolicies and rollouts).
    steered: BTreeMap<ServiceId, mesh_model::traffic::TrafficPolicy>,
    /// The local state of the last pass.
    last_local: Option<Arc<ClusterState>>,
    /// Writes that failed, tried again by the next pass.
    retry: Dirty,
    retry_local: bool,
    /// Results kept between passes (status).
    last_policy: (usize, usize),
    traffic_policies: Vec<lb::TrafficPolicyStatus>,
    endpoints: Vec<EndpointStatus>,
    local_errors: Vec<String>,
    policy_errors: Vec<String>,
    /// The last policy pass read held identities (see [`crate::held`]).
    patched_last: bool,
    /// When the agent started: the peers' initial sync is waited for at most [`INITIAL_SYNC_WAIT`].
    started: std::time::Instant,
    /// Services whose reprogramming, caused by a peer's records, waits for the peers' initial sync.
    deferred: BTreeSet<ServiceId>,
}

/// How long the services that peers' records change wait for every peer's first sync before they are programmed
/// with what is known. While the peers list for the first time, each peer's arrival would otherwise reprogram
/// every service it shares (a service of ten clusters ten times). Changes of this cluster never wait, and the
/// first pass programs every service at once.
pub const INITIAL_SYNC_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Why an endpoint is not wired.
enum Unwired {
    /// Its annotation names an interface the agent may not manage: nothing of it is touched.
    Refused(String),
    /// The interface cannot be used right now (missing, a failed attach): retried by the next pass.
    Failed(String),
}

impl Reconciler {
    /// Takes over `dp`, adopting the maps' contents (an earlier agent's, after a restart with pinned maps), so that
    /// the first reconcile changes only what differs.
    #[must_use]
    pub fn new(dp: Datapath, me: LocalNode, vxlan_ifname: String) -> Self {
        let lb = match LbMaps::adopt(&dp) {
            Ok((lb, adopted)) => {
                if adopted != LbAdopted::default() {
                    info!(?adopted, "adopted the service maps");
                }
                lb
            }
            Err(e) => {
                // Only when the maps cannot be read at all; programming from scratch then overwrites by id.
                warn!(error = %format!("{e:#}"), "could not read the service maps; starting from empty state");
                LbMaps::default()
            }
        };
        let held = HeldPeers::adopt(&dp, me.cluster_id);
        if !held.is_empty() {
            info!(
                ipcache = held.ipcache.len(),
                tunnel_peers = held.tunnel_peers.len(),
                "adopted peer entries; kept until each peer has synced"
            );
        }
        let ipcache: BTreeMap<Ipv4Net, IpcacheEntry> =
            dp.ipcache().map(|v| v.into_iter().collect()).unwrap_or_else(|e| {
                warn!(error = %e, "could not read the ipcache; starting from empty state");
                BTreeMap::new()
            });
        let tunnels = dp.tunnel_peers().unwrap_or_default();
        // Whatever else the maps hold is compared (and removed unless claimed) by the first pass.
        let (tables, retry) = MeshTables::adopt(me.clone(), ipcache, tunnels, lb, &held);
        Self {
            held,
            peers_configured: false,
            identity_store: crate::held::IdentityStore::default(),
            dp,
            me,
            vxlan_ifname,
            reconciles: 0,
            policies: lb::TrafficPolicyVersions::default(),
            rollouts: Rollouts::default(),
            remote_grace: std::time::Duration::from_secs(30),
            service_affinity_default: mesh_model::service::Affinity::None,
            encryption_flags: 0,
            policy: crate::policy::PolicyReconciler::default(),
            policy_enforced: true,
            flows: None,
            policy_views: std::sync::Arc::default(),
            pod_veths: BTreeMap::new(),
            refused: BTreeMap::new(),
            endpoint_refusals: 0,
            tables,
            steered: BTreeMap::new(),
            last_local: None,
            retry,
            retry_local: true,
            last_policy: (0, 0),
            traffic_policies: Vec::new(),
            endpoints: Vec::new(),
            local_errors: Vec::new(),
            policy_errors: Vec::new(),
            patched_last: false,
            started: std::time::Instant::now(),
            deferred: BTreeSet::new(),
        }
    }

    /// The ifindex of `ifname` once it is known to be a pod veth ([`netdev::check_pod_veth`]; checked again only
    /// when the interface was re-created).
    fn pod_veth(&mut self, ifname: &str) -> Result<u32, Unwired> {
        let ifindex =
            netdev::ifindex(ifname).map_err(|e| Unwired::Failed(format!("interface {ifname}: {e}")))?;
        if self.pod_veths.get(ifname) == Some(&ifindex) {
            return Ok(ifindex);
        }
        let facts = netdev::link_facts(ifname, ifindex).map_err(|e| Unwired::Failed(e.to_string()))?;
        netdev::check_pod_veth(ifname, &facts).map_err(Unwired::Refused)?;
        self.pod_veths.insert(ifname.to_owned(), ifindex);
        Ok(ifindex)
    }

    /// Whether the next [`Self::step`] has something to retry (a failed write, an interface that was missing).
    #[must_use]
    pub fn retry_due(&self) -> bool {
        self.retry_local
            || !self.deferred.is_empty()
            || self.retry.policy
            || !self.retry.services.is_empty()
            || !self.retry.ipcache.is_empty()
            || !self.retry.tunnels.is_empty()
    }

    /// Brings the datapath to the desired state from scratch: every key of `local`, `own` and `remotes`, and
    /// every key programmed before, is compared (the reference the incremental [`Self::step`] must agree with).
    pub fn reconcile(
        &mut self,
        local: &ClusterState,
        own: Option<&RemoteCluster>,
        remotes: &BTreeMap<String, RemoteCluster>,
    ) -> DatapathStatus {
        let mut journal = Journal::new();
        for (name, rc) in remotes {
            journal.insert((Scope::Peer, name.clone()), ClusterChanges::all_of(rc));
        }
        if let Some(o) = own {
            journal.insert((Scope::Own, o.name.clone()), ClusterChanges::all_of(o));
        }
        // What was claimed by clusters that are gone.
        let (nodes, pods) = self.tables.claimed();
        for (cluster, node) in nodes {
            if cluster != self.me.cluster {
                journal
                    .entry((Scope::Peer, cluster))
                    .or_default()
                    .nodes
                    .insert(node);
            }
        }
        for (cluster, ip) in pods {
            let scope = if cluster == self.me.cluster {
                Scope::Own
            } else {
                Scope::Peer
            };
            journal.entry((scope, cluster)).or_default().ips.insert(ip);
        }
        let local = Arc::new(local.clone());
        self.last_local = None;
        self.apply(&local, own, remotes, journal, true)
    }

    /// Programs what changed: `journal` (the remote clusters' changed keys since the last step, from
    /// [`crate::remote::Remotes::take_changes`]) and `local` when it is not the state of the last step; what failed
    /// before is tried again. The work is that of the changes, not of the size of the mesh.
    pub fn step(
        &mut self,
        local: &Arc<ClusterState>,
        own: Option<&RemoteCluster>,
        remotes: &BTreeMap<String, RemoteCluster>,
        journal: Journal,
    ) -> DatapathStatus {
        self.apply(local, own, remotes, journal, false)
    }

    /// Programs the local endpoints: their entries, `from_pod` on every pod veth, and `to_pod` on every pod veth
    /// while `policy_on` (the node's own connections to pods with egress policy get their replies back; nodes
    /// without policy do not run it at all). A pod whose annotation names an interface that is no pod veth, or
    /// another pod's, is refused (status, log, counter) and keeps what was programmed for it.
    fn reconcile_endpoints(&mut self, local: &ClusterState, policy_on: bool, st: &mut DatapathStatus) {
        let desired = desired::endpoints(&self.me, local);
        let mut keep_ips = BTreeSet::new();
        let mut keep_ifs = BTreeSet::new();
        let current: BTreeMap<Ipv4Addr, LocalEndpoint> = match self.dp.endpoints() {
            Ok(v) => v.into_iter().collect(),
            Err(e) => {
                st.errors.push(format!("reading endpoints: {e}"));
                return;
            }
        };
        let conflicts = desired::interface_conflicts(&desired, |d| {
            current
                .get(&d.ipv4)
                .is_some_and(|c| netdev::ifindex(&d.ifname).is_ok_and(|i| i == c.ifindex))
        });
        let mut refused = BTreeMap::new();
        let names: BTreeSet<&str> = desired.iter().map(|d| d.ifname.as_str()).collect();
        self.pod_veths.retain(|name, _| names.contains(name.as_str()));
        for d in desired {
            let checked = match conflicts.get(&d.pod) {
                Some(reason) => Err(Unwired::Refused(reason.clone())),
                None => self.pod_veth(&d.ifname),
            };
            if let Err(Unwired::Refused(reason)) = &checked {
                // What was programmed stays: the entry and the interface it points at.
                if let Some(c) = current.get(&d.ipv4) {
                    keep_ips.insert(d.ipv4);
                    if let Ok(name) = netdev::ifname(c.ifindex) {
                        keep_ifs.insert(name);
                    }
                }
                st.endpoints.push(EndpointStatus {
                    pod: d.pod.clone(),
                    ipv4: d.ipv4,
                    ifname: d.ifname,
                    programmed: false,
                    error: Some(format!("refused: {reason}")),
                });
                refused.insert(d.pod, reason.clone());
                continue;
            }
            let result = (|| -> Result<LocalEndpoint, String> {
                let ifindex = checked.map_err(|e| match e {
                    Unwired::Refused(m) | Unwired::Failed(m) => m,
                })?;
                let host_mac = netdev::mac(&d.ifname).map_err(|e| format!("interface {}: {e}", d.ifname))?;
                let ep = LocalEndpoint {
                    ifindex,
                    // The policy pass sets the identity (0 keeps the one programmed).
                    identity: 0,
                    pod_mac: pod_mac_for_ipv4(d.ipv4.octets()),
                    host_mac,
                    ..LocalEndpoint::default()
                };
                // Only the wiring decides here; identity and policy fields belong to the policy pass.
                let same_wiring = current.get(&d.ipv4).is_some_and(|c| {
                    c.ifindex == ep.ifindex && c.pod_mac == ep.pod_mac && c.host_mac == ep.host_mac
                });
                // The entry before the program: from its first packet on, the pod's source check finds it.
                if !same_wiring {
                    self.dp
                        .upsert_endpoint(d.ipv4, ep)
                        .map_err(|e| format!("{e:#}"))?;
                    info!(pod = %d.pod, ip = %d.ipv4, ifname = %d.ifname, ifindex, "endpoint programmed");
                }
                self.dp.attach_endpoint(&d.ifname).map_err(|e| format!("{e:#}"))?;
                Ok(ep)
            })();
            keep_ifs.insert(d.ifname.clone());
            // Without it only the endpoint's replies to the node suffer: reported, the endpoint stays programmed.
            let host_tracking = if policy_on {
                self.dp.attach_host_tracking(&d.ifname)
            } else {
                self.dp.detach_host_tracking(&d.ifname)
            };
            if let (Ok(_), Err(e)) = (&result, host_tracking) {
                st.errors.push(format!("{e:#}"));
            }
            match result {
                Ok(_) => {
                    keep_ips.insert(d.ipv4);
                    st.endpoints.push(EndpointStatus {
                        pod: d.pod,
                        ipv4: d.ipv4,
                        ifname: d.ifname,
                        programmed: true,
                        error: None,
                    });
                }
                Err(e) => {
                    // Keep an entry that was programmed before (the interface may only be flapping).
                    if current.contains_key(&d.ipv4) {
                        keep_ips.insert(d.ipv4);
                    }
                    st.endpoints.push(EndpointStatus {
                        pod: d.pod,
                        ipv4: d.ipv4,
                        ifname: d.ifname,
                        programmed: false,
                        error: Some(e),
                    });
                }
            }
        }
        for (pod, reason) in &refused {
            if self.refused.get(pod) != Some(reason) {
                self.endpoint_refusals += 1;
                warn!(pod = %pod, reason = %reason,
                    "endpoint refused: its host interface annotation names an interface the agent may not manage");
            }
        }
        self.refused = refused;
        st.endpoint_refusals = self.endpoint_refusals;
        for ip in current.keys().filter(|ip| !keep_ips.contains(*ip)) {
            match self.dp.remove_endpoint(*ip) {
                Ok(()) => info!(ip = %ip, "endpoint removed"),
                Err(e) => st.errors.push(format!("{e:#}")),
            }
        }
        let mut attached = self.dp.attached_endpoints();
        attached.extend(self.dp.host_tracking_endpoints());
        attached.sort();
        attached.dedup();
        for ifname in attached {
            if !keep_ifs.contains(&ifname)
                && let Err(e) = self.dp.detach_endpoint(&ifname)
            {
                // The interface is usually gone with its pod, which detaches the program anyway.
                warn!(ifname = %ifname, error = %format!("{e:#}"), "detaching endpoint program");
            }
        }
    }

    #[expect(
        clippy::too_many_lines,
        reason = "one pass in order: local, remote changes, claims, policy, services, maps"
    )]
    fn apply(
        &mut self,
        local: &Arc<ClusterState>,
        own: Option<&RemoteCluster>,
        remotes: &BTreeMap<String, RemoteCluster>,
        journal: Journal,
        full: bool,
    ) -> DatapathStatus {
        self.reconciles += 1;
        let started = std::time::Instant::now();
        let now = crate::remote::now_ms();
        let mut st = DatapathStatus {
            reconciles: self.reconciles,
            ..DatapathStatus::default()
        };
        let prev = self.last_local.take();
        let first = prev.is_none();
        let local_changed = full || !prev.as_ref().is_some_and(|p| Arc::ptr_eq(p, local));
        let mut dirty = std::mem::take(&mut self.retry);
        let mut errors: Vec<String> = Vec::new();
        let my_node = local.nodes.get(&self.me.node);
        st.node_ipv4 = my_node.map(|n| n.underlay_ipv4);
        st.pod_cidr = my_node.map(|n| n.pod_cidr);

        // 1. This node: its config and endpoints, when the local state changed or something failed.
        // Policy checks are switched on before any endpoint is enforced, and off only after a pass that left none
        // enforced (see `node_flags::POLICY`); the same goes for `to_pod` on the pod veths (reconcile_endpoints).
        let policy_on = !local.network_policies.is_empty() || self.policy_enforced;
        if local_changed || self.retry_local {
            self.retry_local = false;
            self.local_errors.clear();
            if my_node.is_none() {
                self.local_errors.push(format!(
                    "node {} is not in the cluster's manifests yet",
                    self.me.node
                ));
            }
            match netdev::ifindex(&self.vxlan_ifname) {
                Ok(vx) => {
                    let cfg = NodeConfig {
                        vxlan_ifindex: vx,
                        node_ipv4: my_node.map_or(0, |n| u32::from(n.underlay_ipv4)),
                        cluster_id: self.me.cluster_id,
                        flags: self.encryption_flags
                            | if policy_on {
                                mesh_common::node_flags::POLICY
                            } else {
                                0
                            },
                        ..NodeConfig::default()
                    };
                    if self.dp.node_config().ok() != Some(cfg)
                        && let Err(e) = self.dp.set_node_config(cfg)
                    {
                        self.local_errors.push(format!("{e:#}"));
                    }
                }
                Err(e) => self
                    .local_errors
                    .push(format!("VXLAN device {}: {e}", self.vxlan_ifname)),
            }
            let mut est = DatapathStatus::default();
            self.reconcile_endpoints(local, policy_on, &mut est);
            self.local_errors.append(&mut est.errors);
            let programmed_before: BTreeSet<Ipv4Addr> = self
                .endpoints
                .iter()
                .filter(|e| e.programmed)
                .map(|e| e.ipv4)
                .collect();
            self.endpoints = est.endpoints;
            let programmed_now: BTreeSet<Ipv4Addr> = self
                .endpoints
                .iter()
                .filter(|e| e.programmed)
                .map(|e| e.ipv4)
                .collect();
            // The policy pass programs each endpoint's identity and policy once it is wired.
            dirty.policy |= programmed_before != programmed_now;
            // Interfaces that are missing or failed are tried again; refused ones wait for their pod to change.
            self.retry_local = !self.local_errors.is_empty()
                || self
                    .endpoints
                    .iter()
                    .any(|e| !e.programmed && !e.error.as_deref().is_some_and(|m| m.starts_with("refused")));
        }
        st.policy_checks = policy_on && netdev::ifindex(&self.vxlan_ifname).is_ok();

        // 2. Local changes: the services, nodes and pods they touch.
        if local_changed {
            dirty.policy = true;
            dirty.policy_changes.local = true;
            self.traffic_policies = self.policies.update(local);
            for p in self
                .traffic_policies
                .iter()
                .filter(|p| p.state != lb::TrafficPolicyState::Active)
            {
                warn!(policy = %format!("{}/{}", p.namespace, p.name), state = p.state.as_str(), message = ?p.message, "TrafficPolicy not applied");
            }
        }
        self.tables
            .local_changed(prev.as_deref(), local, full, &mut dirty);

        // 3. Remote changes: the keys that changed, and what they touch.
        let local_services = dirty.services.clone();
        self.tables.take_journal(journal, local, &mut dirty);

        // 4. Peer facts: reachability (grace periods end without any change) and labels.
        let steered_ids: BTreeSet<ServiceId> = self.steered.keys().cloned().collect();
        let grace_ms = u64::try_from(self.remote_grace.as_millis()).unwrap_or(u64::MAX);
        self.tables
            .update_facts(remotes, now, grace_ms, &steered_ids, &mut dirty);

        // 5. Adopted entries whose cluster is settled now.
        if !self.held.is_empty() {
            let before = self.held.clone();
            self.held.release(remotes, self.peers_configured);
            self.tables.release_held(&before, &self.held, &mut dirty);
        }

        // While a configured peer still lists for the first time, what peers changed waits (INITIAL_SYNC_WAIT).
        if !first && !full {
            let pending = self.started.elapsed() < INITIAL_SYNC_WAIT
                && self.peers_configured
                && remotes.iter().any(|(name, rc)| {
                    *name != self.me.cluster
                        && rc.usable
                        && rc.syncs == 0
                        && matches!(
                            rc.state,
                            crate::remote::SyncState::Connecting { .. }
                                | crate::remote::SyncState::Syncing { .. }
                        )
                });
            if pending {
                let remote_caused: Vec<ServiceId> = dirty
                    .services
                    .iter()
                    .filter(|s| !local_services.contains(*s))
                    .cloned()
                    .collect();
                for s in remote_caused {
                    dirty.services.remove(&s);
                    self.deferred.insert(s);
                }
            } else {
                dirty.services.append(&mut self.deferred);
            }
        } else {
            // A full pass programs every service.
            self.deferred.clear();
        }

        // 6. Claims of the peers' nodes, then of every pod address that changed or moved with its node.
        self.tables.claim_changed(local, own, remotes, &mut dirty);

        // 7. Identities and policy of the local endpoints, when identities, pods or policies changed.
        // Identities and addresses before services (docs/network-policy.md): a new backend's identity is known by
        // the time traffic can be balanced to it.
        if dirty.policy {
            dirty.policy_changes.full |= first || full;
            self.policy_pass(local, own, remotes, &mut dirty);
        }
        errors.extend(self.policy_errors.iter().cloned());

        // 8. Staged rollouts (their gates judge live statistics), then what steers each service.
        if !local.rollouts.is_empty() || self.rollouts.active() || local_changed {
            self.tick_rollouts(local, remotes, now, &mut errors);
        }
        let steered = self.policies.steered();
        for k in steered.keys().chain(self.steered.keys()) {
            if steered.get(k) != self.steered.get(k) {
                dirty.services.insert(k.clone());
            }
        }
        self.steered = steered;
        st.rollouts = self.rollouts.states();

        // 9. The services, ipcache and tunnel-peer keys that changed.
        let sources = crate::tables::Sources {
            local,
            own,
            remotes,
            policies: &self.policies,
            affinity_default: self.service_affinity_default,
        };
        self.tables.program(
            &mut self.dp,
            &sources,
            &mut dirty,
            first || full,
            &mut self.retry,
            &mut errors,
        );

        errors.splice(0..0, self.local_errors.iter().cloned());
        st.errors = errors;
        st.endpoints = self.endpoints.clone();
        st.endpoint_refusals = self.endpoint_refusals;
        st.conflicts = self.tables.conflicts.values().cloned().collect();
        st.traffic_policies = self.traffic_policies.clone();
        let (frontends, backends) = self
            .tables
            .programmed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .lb
            .counts();
        st.summary = Summary {
            frontends,
            backends,
            remote_endpoints: remotes
                .iter()
                .filter(|(n, _)| **n != self.me.cluster)
                .map(|(_, rc)| rc.backend_count)
                .sum(),
            reconcile_us: 0,
            policy_entries: self.last_policy.0,
            identities: self.last_policy.1,
        };
        st.counters = match self.dp.counters() {
            Ok(c) => c
                .into_iter()
                .map(|(c, v): (Counter, u64)| (c.name(), v))
                .collect(),
            Err(e) => {
                st.errors.push(format!("reading counters: {e}"));
                BTreeMap::new()
            }
        };
        self.last_local = Some(local.clone());
        st.summary.reconcile_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        st
    }

    /// Runs the policy pass: every local endpoint's identity and policy, the CIDR identities' prefixes.
    fn policy_pass(
        &mut self,
        local: &ClusterState,
        own: Option<&RemoteCluster>,
        remotes: &BTreeMap<String, RemoteCluster>,
        dirty: &mut Dirty,
    ) {
        let programmed: BTreeMap<Ipv4Addr, String> = self
            .endpoints
            .iter()
            .filter(|e| e.programmed)
            .map(|e| (e.ipv4, e.pod.clone()))
            .collect();
        // A peer not heard from since a restart counts with the identities it had (see crate::held).
        let patched = self.identity_store.patch(remotes, self.peers_configured);
        let mut changes = std::mem::take(&mut dirty.policy_changes);
        // Held identities come and go with the patch: the tables are rebuilt while it applies and once after.
        changes.full |= patched.is_some() || self.patched_last;
        self.patched_last = patched.is_some();
        let pass = self.policy.reconcile(
            &mut self.dp,
            &self.me,
            local,
            own,
            patched.as_ref().unwrap_or(remotes),
            &programmed,
            &changes,
        );
        drop(patched);
        self.identity_store.save(remotes);
        self.retry.policy = !pass.errors.is_empty();
        self.policy_errors = pass.errors;
        self.last_policy = (pass.entries, pass.names.identities.len());
        if self.policy_enforced != pass.enforced {
            // `to_pod` on the pod veths and the node's policy flag follow.
            self.retry_local = true;
        }
        self.policy_enforced = pass.enforced;
        // ipBlock prefixes also go to the policy prefix map, where pod /32s do not shadow them (an ipBlock matches
        // pod addresses too).
        if self.tables.set_cidrs(&pass.cidr_entries, dirty) {
            let policy_cidrs: BTreeMap<Ipv4Net, u32> =
                pass.cidr_entries.iter().map(|(p, e)| (*p, e.identity)).collect();
            if let Err(e) = self.dp.set_policy_cidrs(&policy_cidrs) {
                self.policy_errors
                    .push(format!("programming policy prefixes: {e:#}"));
                self.retry.policy = true;
            }
        }
        if let Some(hub) = &self.flows {
            hub.set_names(pass.names);
        }
        *self.policy_views.lock().unwrap_or_else(PoisonError::into_inner) = pass.views;
    }

    /// Judges the staged rollouts' gates on the live statistics of their services' backends; their weights then
    /// steer the services ([`lb::TrafficPolicyVersions::set_overrides`]).
    fn tick_rollouts(
        &mut self,
        local: &ClusterState,
        remotes: &BTreeMap<String, RemoteCluster>,
        now: u64,
        errors: &mut Vec<String>,
    ) {
        let stats = if local.rollouts.is_empty() {
            BTreeMap::new()
        } else {
            self.dp.backend_stats().unwrap_or_else(|e| {
                errors.push(format!("reading backend statistics: {e}"));
                BTreeMap::new()
            })
        };
        let programmed = self
            .tables
            .programmed
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let views: BTreeMap<ServiceId, Arc<ServiceView>> = local
            .rollouts
            .values()
            .filter_map(|r| {
                let id = (r.namespace.clone(), r.spec.service.clone());
                programmed.views.get(&id).map(|v| (id, v.clone()))
            })
            .collect();
        let (me, lb) = (&self.me, &programmed.lb);
        let to_stats = |r: &StagedRollout| -> Option<FlowStats> {
            let view = views.get(&(r.namespace.clone(), r.spec.service.clone()))?;
            let mut sum = FlowStats::default();
            for fe in &view.frontends {
                for (cluster, backends) in &fe.candidates {
                    if !r
                        .spec
                        .to
                        .matches(cluster, &lb::cluster_labels(me, remotes, cluster))
                    {
                        continue;
                    }
                    for b in backends {
                        if let Some(s) = lb
                            .backend_id(b.ipv4, b.port, fe.protocol)
                            .and_then(|id| stats.get(&id))
                        {
                            sum.new_flows += s.new_flows;
                            sum.resets += s.resets;
                        }
                    }
                }
            }
            Some(sum)
        };
        self.rollouts.tick(local, now, &to_stats);
        drop(programmed);
        let overrides = local
            .rollouts
            .values()
            .filter_map(|r| {
                self.rollouts
                    .policy_for(local, &r.namespace, &r.spec.service)
                    .map(|p| ((r.namespace.clone(), r.spec.service.clone()), p))
            })
            .collect();
        self.policies.set_overrides(overrides);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(id: Option<u16>, usable: bool, syncs: u64) -> RemoteCluster {
        let mut rc = RemoteCluster::new("p");
        rc.cluster_id = id;
        rc.usable = usable;
        rc.syncs = syncs;
        rc
    }

    #[test]
    fn adopted_entries_of_a_cluster_go_once_it_is_settled() {
        let with = |peers: Vec<(&str, RemoteCluster)>| -> BTreeMap<String, RemoteCluster> {
            peers.into_iter().map(|(n, p)| (n.to_owned(), p)).collect()
        };
        // Nothing known yet: held.
        assert!(!settled(2, &BTreeMap::new(), false));
        assert!(!settled(2, &with(vec![("west", peer(None, true, 0))]), true));
        assert!(!settled(2, &with(vec![("west", peer(Some(2), true, 0))]), true));
        // Synced or refused in this process: its records decide.
        assert!(settled(2, &with(vec![("west", peer(Some(2), true, 1))]), true));
        assert!(settled(2, &with(vec![("west", peer(Some(2), false, 0))]), true));
        // Every peer's id is known and none has it: a peer that was removed.
        assert!(settled(2, &with(vec![("north", peer(Some(3), true, 0))]), true));
        assert!(settled(2, &BTreeMap::new(), true));
        // One peer's id is not known yet: it may be the one.
        assert!(!settled(
            2,
            &with(vec![
                ("north", peer(Some(3), true, 1)),
                ("west", peer(None, true, 0))
            ]),
            true
        ));
    }
}
