//! The mesh's tables in the agent, kept per change: ipcache and tunnel-peer claims with their reverse indexes (pods
//! by node, the node each pod's record names), and the services' views and load-balancing maps. A change finds
//! what it touches through the indexes and programs exactly that through a [`MapWriter`], so the decisions are
//! unit-tested against plain tables ([`crate::maps::FakeMaps`]) and against the from-scratch functions
//! (`desired::ipcache`, `desired::remote_pod_entries`, `lb::services`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, PoisonError};

use ipnet::Ipv4Net;
use mesh_common::{IpcacheEntry, ipcache_flags};
use mesh_model::ClusterState;
use tracing::info;

use crate::claims::{Claims, Names, Rank};
use crate::desired::{self, LocalNode};
use crate::lb::{self, ServiceView};
use crate::lb_maps::{LbChanges, LbMaps, ServiceId};
use crate::maps::MapWriter;
use crate::remote::{RemoteCluster, Scope};

/// Tiers of ipcache and tunnel-peer claims, in precedence order (see [`crate::claims`]): a pod's /32 beats a node's
/// pod prefix, which beats a policy's CIDR, which beats what an earlier agent left.
pub mod tier {
    pub const OWN_POD: u8 = 0;
    pub const PEER_POD: u8 = 1;
    pub const LOCAL_NODE: u8 = 2;
    pub const PEER_NODE: u8 = 3;
    pub const CIDR: u8 = 4;
    pub const HELD: u8 = 5;

    /// Claims that conflict with each other: pods with pods, node prefixes with node prefixes.
    #[must_use]
    pub const fn group(t: u8) -> u8 {
        match t {
            OWN_POD | PEER_POD => 0,
            LOCAL_NODE | PEER_NODE => 1,
            other => other,
        }
    }
}

/// What the datapath is programmed with, for presentation on demand (`GET /v1/status`): the reconciler writes
/// it as it programs, readers take the lock briefly.
#[derive(Debug, Default)]
pub struct Programmed {
    /// Every service's view as last programmed, with the backend ids of its active backends.
    pub views: BTreeMap<ServiceId, Arc<ServiceView>>,
    /// The ipcache map's contents (adopted at start, then kept by every write).
    pub ipcache: BTreeMap<Ipv4Net, IpcacheEntry>,
    /// The load-balancing maps' owner.
    pub lb: LbMaps,
}

/// Shared [`Programmed`].
pub type SharedProgrammed = Arc<Mutex<Programmed>>;

/// Where a node's claims are: its pod prefixes and its underlay address.
#[derive(Debug, Clone, PartialEq, Eq)]
struct NodeClaim {
    prefixes: Vec<Ipv4Net>,
    underlay: Option<Ipv4Addr>,
}

/// What a change touches, gathered before anything is programmed.
#[derive(Debug, Default)]
pub struct Dirty {
    pub services: BTreeSet<ServiceId>,
    /// Peer nodes (cluster, node) whose records changed.
    pub nodes: BTreeSet<(String, String)>,
    /// Pod addresses whose records changed: (scope, cluster, address).
    pub ips: BTreeSet<(Scope, String, Ipv4Addr)>,
    pub ipcache: BTreeSet<Ipv4Net>,
    pub tunnels: BTreeSet<Ipv4Addr>,
    pub policy: bool,
    /// The identities and pod addresses that changed, for the policy pass's tables.
    pub policy_changes: crate::policy::PolicyChanges,
}

fn net(ip: Ipv4Addr) -> Ipv4Net {
    Ipv4Net::from(ip)
}

fn pod_entry(underlay: Ipv4Addr, cluster_id: u16, identity: u32) -> IpcacheEntry {
    IpcacheEntry {
        identity,
        ..desired::tunnel_entry(underlay, cluster_id)
    }
}

/// A node: (cluster, node).
pub type NodeKey = (String, String);
/// A pod address of a cluster: (cluster, address).
pub type PodKey = (String, Ipv4Addr);

/// The tables (see the module's documentation).
pub struct MeshTables {
    pub me: LocalNode,
    /// What is programmed, shared with the API.
    pub programmed: SharedProgrammed,
    ipcache_claims: Claims<Ipv4Net, IpcacheEntry>,
    tunnel_claims: Claims<Ipv4Addr, u16>,
    /// The tunnel-peer map's contents.
    tunnels: BTreeMap<Ipv4Addr, u16>,
    /// Claims made for each node (this cluster's and the peers'), by (cluster, node).
    node_claims: BTreeMap<(Arc<str>, Arc<str>), NodeClaim>,
    /// Pod addresses whose record names each node, by (cluster, node): they move with their node.
    pods_by_node: BTreeMap<(Arc<str>, Arc<str>), BTreeSet<Ipv4Addr>>,
    /// The node each indexed pod address's record names, by (cluster, address).
    pod_nodes: BTreeMap<(Arc<str>, Ipv4Addr), Arc<str>>,
    names: Names,
    /// Policy prefixes claimed in the ipcache.
    cidr_claims: BTreeMap<Ipv4Net, IpcacheEntry>,
    /// Contested keys and why (status).
    pub conflicts: BTreeMap<String, String>,
    /// Per peer: whether its backends serve (reachable or in its grace period) and its labels, as last applied.
    facts: BTreeMap<String, (bool, Option<BTreeMap<String, String>>)>,
}

/// What services' views are computed from.
pub struct Sources<'a> {
    pub local: &'a ClusterState,
    pub own: Option<&'a RemoteCluster>,
    pub remotes: &'a BTreeMap<String, RemoteCluster>,
    pub policies: &'a lb::TrafficPolicyVersions,
    pub affinity_default: mesh_model::service::Affinity,
}

impl MeshTables {
    /// Tables that start from what the maps hold: `ipcache` and `tunnels` as dumped, `lb` as adopted, `held` the
    /// peers' entries kept until each peer is settled. Every dumped key is to be compared by the first pass
    /// (returned as dirty).
    pub fn adopt(
        me: LocalNode,
        ipcache: BTreeMap<Ipv4Net, IpcacheEntry>,
        tunnels: BTreeMap<Ipv4Addr, u16>,
        lb: LbMaps,
        held: &crate::reconcile::HeldPeers,
    ) -> (Self, Dirty) {
        let mut names = Names::default();
        let mut ipcache_claims = Claims::default();
        let mut tunnel_claims = Claims::default();
        let held_rank = Rank {
            tier: tier::HELD,
            cluster: names.get(""),
            node: names.get(""),
        };
        for (prefix, e) in &held.ipcache {
            ipcache_claims.set(*prefix, held_rank.clone(), Some(*e));
        }
        for (addr, id) in &held.tunnel_peers {
            tunnel_claims.set(*addr, held_rank.clone(), Some(*id));
        }
        let mut dirty = Dirty::default();
        dirty.ipcache.extend(ipcache.keys().copied());
        dirty.tunnels.extend(tunnels.keys().copied());
        let t = Self {
            me,
            programmed: Arc::new(Mutex::new(Programmed {
                views: BTreeMap::new(),
                ipcache,
                lb,
            })),
            ipcache_claims,
            tunnel_claims,
            tunnels,
            node_claims: BTreeMap::new(),
            pods_by_node: BTreeMap::new(),
            pod_nodes: BTreeMap::new(),
            names,
            cidr_claims: BTreeMap::new(),
            conflicts: BTreeMap::new(),
            facts: BTreeMap::new(),
        };
        (t, dirty)
    }

    /// The nodes (cluster, node) and pod addresses (cluster, address) something was claimed for: what a full pass
    /// must compare besides what the clusters hold now.
    #[must_use]
    pub fn claimed(&self) -> (Vec<NodeKey>, Vec<PodKey>) {
        (
            self.node_claims
                .keys()
                .map(|(c, n)| (c.to_string(), n.to_string()))
                .collect(),
            self.pod_nodes
                .keys()
                .map(|(c, ip)| (c.to_string(), *ip))
                .collect(),
        )
    }

    /// Lets go of the held entries that `before` had and `after` has not.
    pub fn release_held(
        &mut self,
        before: &crate::reconcile::HeldPeers,
        after: &crate::reconcile::HeldPeers,
        dirty: &mut Dirty,
    ) {
        let held_rank = Rank {
            tier: tier::HELD,
            cluster: self.names.get(""),
            node: self.names.get(""),
        };
        for prefix in before.ipcache.keys().filter(|p| !after.ipcache.contains_key(*p)) {
            self.ipcache_claims.set(*prefix, held_rank.clone(), None);
            dirty.ipcache.insert(*prefix);
        }
        for addr in before
            .tunnel_peers
            .keys()
            .filter(|a| !after.tunnel_peers.contains_key(*a))
        {
            self.tunnel_claims.set(*addr, held_rank.clone(), None);
            dirty.tunnels.insert(*addr);
        }
    }

    /// Claims the policies' CIDR prefixes (replacing the previous set); returns whether it changed.
    pub fn set_cidrs(&mut self, entries: &BTreeMap<Ipv4Net, IpcacheEntry>, dirty: &mut Dirty) -> bool {
        if *entries == self.cidr_claims {
            return false;
        }
        let rank = Rank {
            tier: tier::CIDR,
            cluster: self.names.get(""),
            node: self.names.get(""),
        };
        for p in self.cidr_claims.keys().filter(|p| !entries.contains_key(*p)) {
            self.ipcache_claims.set(*p, rank.clone(), None);
            dirty.ipcache.insert(*p);
        }
        for (p, e) in entries {
            self.ipcache_claims.set(*p, rank.clone(), Some(*e));
            dirty.ipcache.insert(*p);
        }
        self.cidr_claims.clone_from(entries);
        true
    }

    /// What a new local state touches (`prev`: the last one applied; `None` at the first pass, when everything
    /// is compared): changed services, every service of a namespace whose pods changed, this cluster's nodes
    /// (their prefixes, tunnel peers and pods). `full`: also whatever was claimed for this cluster before.
    pub fn local_changed(
        &mut self,
        prev: Option<&ClusterState>,
        local: &ClusterState,
        full: bool,
        dirty: &mut Dirty,
    ) {
        local_service_changes(prev, local, &mut dirty.services);
        let mut nodes: BTreeSet<String> = local.nodes.keys().cloned().collect();
        if let Some(p) = prev {
            nodes = nodes
                .into_iter()
                .chain(p.nodes.keys().cloned())
                .filter(|n| p.nodes.get(n) != local.nodes.get(n))
                .collect();
        }
        if full {
            let (claimed, _) = self.claimed();
            nodes.extend(
                claimed
                    .into_iter()
                    .filter(|(c, _)| *c == self.me.cluster)
                    .map(|(_, n)| n),
            );
        }
        for node in nodes {
            self.claim_local_node(&node, local, dirty);
        }
        if prev.is_none() || full {
            let programmed = self.programmed.lock().unwrap_or_else(PoisonError::into_inner);
            dirty.services.extend(local.services.keys().cloned());
            dirty.services.extend(programmed.views.keys().cloned());
        }
    }

    /// What the remote clusters' changed keys touch.
    pub fn take_journal(&mut self, journal: crate::remote::Journal, local: &ClusterState, dirty: &mut Dirty) {
        for ((scope, cluster), c) in journal {
            if c.meta || !c.identities.is_empty() || !c.ips.is_empty() {
                dirty.policy = true;
            }
            match scope {
                Scope::Peer => {
                    dirty
                        .services
                        .extend(c.services.iter().flat_map(|k| services_fed_by(k)));
                    dirty
                        .nodes
                        .extend(c.nodes.into_iter().map(|n| (cluster.clone(), n)));
                }
                Scope::Own => {
                    // A capacity weighs this cluster's backends: the services of its pod's namespace.
                    for ip in &c.capacities {
                        for p in local.pods.values().filter(|p| p.ipv4 == Some(*ip)) {
                            dirty.services.extend(services_in(local, &p.namespace));
                        }
                    }
                }
            }
            let pc = &mut dirty.policy_changes;
            pc.identities
                .extend(c.identities.iter().map(|id| (scope, cluster.clone(), *id)));
            pc.ips
                .extend(c.ips.iter().map(|ip| (scope, cluster.clone(), *ip)));
            dirty
                .ips
                .extend(c.ips.into_iter().map(|ip| (scope, cluster.clone(), ip)));
        }
    }

    /// Follows the peers' facts that change without a record changing: a grace period that ends (at `now`,
    /// `grace_ms` after the peer became unreachable) withdraws its backends; new labels re-steer the `steered`
    /// services and re-judge policies' cluster selectors. Costs the number of clusters, plus the services of a
    /// cluster whose facts changed.
    pub fn update_facts(
        &mut self,
        remotes: &BTreeMap<String, RemoteCluster>,
        now: u64,
        grace_ms: u64,
        steered: &BTreeSet<ServiceId>,
        dirty: &mut Dirty,
    ) {
        let facts: BTreeMap<String, (bool, Option<BTreeMap<String, String>>)> = remotes
            .iter()
            .map(|(name, rc)| {
                let serves = rc
                    .unreachable_since_ms
                    .is_none_or(|since| now.saturating_sub(since) < grace_ms);
                (name.clone(), (serves, rc.labels().cloned()))
            })
            .collect();
        for (name, f) in &facts {
            let old = self.facts.get(name);
            if old == Some(f) {
                continue;
            }
            if let Some(rc) = remotes.get(name) {
                dirty
                    .services
                    .extend(rc.services.keys().flat_map(|k| services_fed_by(k)));
            }
            if old.is_none_or(|o| o.1 != f.1) {
                // Labels: policies' cluster selectors and TrafficPolicy groups.
                dirty.policy = true;
                dirty.services.extend(steered.iter().cloned());
            }
        }
        self.facts = facts;
    }

    /// Claims of the changed peers' nodes, then of every pod address that changed or moved with its node.
    pub fn claim_changed(
        &mut self,
        local: &ClusterState,
        own: Option<&RemoteCluster>,
        remotes: &BTreeMap<String, RemoteCluster>,
        dirty: &mut Dirty,
    ) {
        for (cluster, node) in std::mem::take(&mut dirty.nodes) {
            self.claim_peer_node(&cluster, &node, remotes, dirty);
        }
        for (scope, cluster, ip) in std::mem::take(&mut dirty.ips) {
            self.claim_pod(scope, &cluster, ip, local, own, remotes, dirty);
        }
    }

    /// Programs the dirty services (views computed from `src`; `all`: every service, and what no service
    /// claims goes), then the dirty ipcache and tunnel-peer keys. What failed goes to `retry`.
    pub fn program(
        &mut self,
        dp: &mut impl MapWriter,
        src: &Sources<'_>,
        dirty: &mut Dirty,
        all: bool,
        retry: &mut Dirty,
        errors: &mut Vec<String>,
    ) {
        let facts = &self.facts;
        let serves = |n: &str| facts.get(n).is_some_and(|f| f.0);
        let ctx = lb::ViewContext {
            me: &self.me.clone(),
            local: src.local,
            own: src.own,
            remotes: src.remotes,
            serves: &serves,
            policies: src.policies,
            affinity_default: src.affinity_default,
        };
        let ids = std::mem::take(&mut dirty.services);
        let views: Vec<(ServiceId, Option<ServiceView>)> = ids
            .into_iter()
            .map(|id| {
                let v = ctx.view_of(&id.0, &id.1);
                (id, v)
            })
            .collect();
        self.program_views(dp, views, all, retry, errors);
        self.program_claims(dp, dirty, retry, errors);
    }

    /// The tunnel-peer map's contents as programmed.
    #[must_use]
    pub const fn tunnels(&self) -> &BTreeMap<Ipv4Addr, u16> {
        &self.tunnels
    }

    /// Claims (or withdraws) the pod prefix and tunnel peer of this cluster's node `node`; its pods' addresses
    /// are claimed again (their underlay may have moved).
    pub fn claim_local_node(&mut self, node: &str, local: &ClusterState, dirty: &mut Dirty) {
        let c = self.names.get(&self.me.cluster);
        let n = self.names.get(node);
        let rank = Rank {
            tier: tier::LOCAL_NODE,
            cluster: c.clone(),
            node: n.clone(),
        };
        let claim = local.nodes.get(node).map(|rec| {
            let (entry, underlay) = if rec.name == self.me.node {
                (
                    IpcacheEntry {
                        flags: ipcache_flags::LOCAL_NODE,
                        ..desired::tunnel_entry(Ipv4Addr::UNSPECIFIED, self.me.cluster_id)
                    },
                    None,
                )
            } else {
                (
                    desired::tunnel_entry(rec.underlay_ipv4, self.me.cluster_id),
                    Some(rec.underlay_ipv4),
                )
            };
            (
                vec![(rec.pod_cidr, entry)],
                underlay.map(|u| (u, self.me.cluster_id)),
            )
        });
        self.set_node_claim((c.clone(), n.clone()), &rank, claim, dirty);
        for ip in self.pods_by_node.get(&(c, n)).into_iter().flatten() {
            dirty.ips.insert((Scope::Own, self.me.cluster.clone(), *ip));
        }
    }

    /// As [`Self::claim_local_node`] for node `node` of peer `cluster`.
    pub fn claim_peer_node(
        &mut self,
        cluster: &str,
        node: &str,
        remotes: &BTreeMap<String, RemoteCluster>,
        dirty: &mut Dirty,
    ) {
        let c = self.names.get(cluster);
        let n = self.names.get(node);
        let rank = Rank {
            tier: tier::PEER_NODE,
            cluster: c.clone(),
            node: n.clone(),
        };
        let claim = remotes
            .get(cluster)
            .filter(|rc| rc.usable && cluster != self.me.cluster)
            .and_then(|rc| rc.nodes.get(node))
            .map(|rec| {
                let entry = desired::tunnel_entry(rec.underlay_ipv4, rec.cluster_id);
                (
                    rec.pod_cidrs.iter().map(|p| (p.trunc(), entry)).collect(),
                    Some((rec.underlay_ipv4, rec.cluster_id)),
                )
            });
        self.set_node_claim((c.clone(), n.clone()), &rank, claim, dirty);
        for ip in self.pods_by_node.get(&(c, n)).into_iter().flatten() {
            dirty.ips.insert((Scope::Peer, cluster.to_owned(), *ip));
        }
    }

    /// Replaces the claims of one node: its prefixes with their entries and its tunnel peer (`None`: it has none).
    #[expect(
        clippy::type_complexity,
        reason = "prefix entries and a tunnel peer, as computed by the callers"
    )]
    fn set_node_claim(
        &mut self,
        key: (Arc<str>, Arc<str>),
        rank: &Rank,
        claim: Option<(Vec<(Ipv4Net, IpcacheEntry)>, Option<(Ipv4Addr, u16)>)>,
        dirty: &mut Dirty,
    ) {
        if let Some(old) = self.node_claims.remove(&key) {
            for p in old.prefixes {
                self.ipcache_claims.set(p, rank.clone(), None);
                dirty.ipcache.insert(p);
            }
            if let Some(u) = old.underlay {
                self.tunnel_claims.set(u, rank.clone(), None);
                dirty.tunnels.insert(u);
            }
        }
        let Some((prefixes, peer)) = claim else { return };
        for (p, e) in &prefixes {
            self.ipcache_claims.set(*p, rank.clone(), Some(*e));
            dirty.ipcache.insert(*p);
        }
        if let Some((u, id)) = peer {
            self.tunnel_claims.set(u, rank.clone(), Some(id));
            dirty.tunnels.insert(u);
        }
        self.node_claims.insert(
            key,
            NodeClaim {
                prefixes: prefixes.into_iter().map(|(p, _)| p).collect(),
                underlay: peer.map(|(u, _)| u),
            },
        );
    }

    /// Claims (or withdraws) the /32 of pod address `ip` of `cluster` as its record has it now. A pod whose node
    /// is not known (yet) has no entry: its node's pod prefix answers with `PENDING` meanwhile. This cluster's pods
    /// of this node are left out (they are local endpoints).
    #[expect(clippy::too_many_arguments, reason = "the state one claim is computed from")]
    pub fn claim_pod(
        &mut self,
        scope: Scope,
        cluster: &str,
        ip: Ipv4Addr,
        local: &ClusterState,
        own: Option<&RemoteCluster>,
        remotes: &BTreeMap<String, RemoteCluster>,
        dirty: &mut Dirty,
    ) {
        let (tier, cname) = match scope {
            Scope::Own => (tier::OWN_POD, self.me.cluster.as_str()),
            Scope::Peer => (tier::PEER_POD, cluster),
        };
        let c = self.names.get(cname);
        if let Some(old) = self.pod_nodes.remove(&(c.clone(), ip)) {
            let k = (c.clone(), old);
            if let Some(set) = self.pods_by_node.get_mut(&k) {
                set.remove(&ip);
                if set.is_empty() {
                    self.pods_by_node.remove(&k);
                }
            }
        }
        let (rec, entry) = match scope {
            Scope::Own => {
                let rec = own.filter(|o| o.usable).and_then(|o| o.ips.get(&ip));
                let entry = rec.filter(|r| r.node != self.me.node).and_then(|r| {
                    local
                        .nodes
                        .get(&r.node)
                        .map(|n| pod_entry(n.underlay_ipv4, self.me.cluster_id, r.identity))
                });
                (rec, entry)
            }
            Scope::Peer => {
                let rc = remotes
                    .get(cluster)
                    .filter(|rc| rc.usable && cluster != self.me.cluster);
                let rec = rc.and_then(|rc| rc.ips.get(&ip));
                let entry = rc.zip(rec).and_then(|(rc, r)| {
                    rc.nodes
                        .get(&r.node)
                        .map(|n| pod_entry(n.underlay_ipv4, n.cluster_id, r.identity))
                });
                (rec, entry)
            }
        };
        if let Some(r) = rec {
            let n = self.names.get(&r.node);
            self.pods_by_node
                .entry((c.clone(), n.clone()))
                .or_default()
                .insert(ip);
            self.pod_nodes.insert((c.clone(), ip), n);
        }
        let rank = Rank {
            tier,
            cluster: c,
            node: self.names.get(""),
        };
        self.ipcache_claims.set(net(ip), rank, entry);
        dirty.ipcache.insert(net(ip));
    }

    /// Programs `views` (`all`: they are every service's, and what none claims goes).
    fn program_views(
        &mut self,
        dp: &mut impl MapWriter,
        views: Vec<(ServiceId, Option<ServiceView>)>,
        all: bool,
        retry: &mut Dirty,
        errors: &mut Vec<String>,
    ) {
        if views.is_empty() {
            return;
        }
        let mut changes = LbChanges::default();
        let mut failed = Vec::new();
        let mut programmed = self.programmed.lock().unwrap_or_else(PoisonError::into_inner);
        if all {
            let present: Vec<(ServiceId, &ServiceView)> = views
                .iter()
                .filter_map(|(id, v)| v.as_ref().map(|v| (id.clone(), v)))
                .collect();
            match programmed.lb.reconcile_keyed(dp, &present) {
                Ok(c) => changes = c,
                Err(e) => {
                    errors.push(format!("programming services: {e:#}"));
                    failed.extend(views.iter().map(|(id, _)| id.clone()));
                }
            }
        } else {
            for (id, v) in &views {
                match programmed.lb.program_service(dp, id, v.as_ref()) {
                    Ok(c) => changes.add(c),
                    Err(e) => {
                        errors.push(format!("programming service {}/{}: {e:#}", id.0, id.1));
                        failed.push(id.clone());
                    }
                }
            }
        }
        if changes != LbChanges::default() {
            info!(?changes, "service maps updated");
        }
        retry.services.extend(failed);
        for (id, v) in views {
            match v {
                Some(v) => {
                    programmed.views.insert(id, Arc::new(v));
                }
                None => {
                    programmed.views.remove(&id);
                }
            }
        }
    }

    /// Writes the winning claim of every dirty ipcache and tunnel-peer key where the map differs.
    fn program_claims(
        &mut self,
        dp: &mut impl MapWriter,
        dirty: &mut Dirty,
        retry: &mut Dirty,
        errors: &mut Vec<String>,
    ) {
        let (mut upserted, mut removed) = (0usize, 0usize);
        let mut programmed = self.programmed.lock().unwrap_or_else(PoisonError::into_inner);
        for key in std::mem::take(&mut dirty.ipcache) {
            note_conflict(
                &mut self.conflicts,
                "prefix",
                &key,
                &self.ipcache_claims.ranks(&key),
            );
            let want = self.ipcache_claims.winner(&key).copied();
            let have = programmed.ipcache.get(&key).copied();
            if want == have {
                continue;
            }
            let result = match want {
                Some(e) => dp.upsert_ipcache(key, e).map(|()| {
                    programmed.ipcache.insert(key, e);
                    upserted += 1;
                }),
                None => dp.remove_ipcache(key).map(|()| {
                    programmed.ipcache.remove(&key);
                    removed += 1;
                }),
            };
            if let Err(e) = result {
                errors.push(format!("{e:#}"));
                retry.ipcache.insert(key);
            }
        }
        let entries = programmed.ipcache.len();
        drop(programmed);
        if upserted + removed > 0 {
            info!(upserted, removed, entries, "ipcache updated");
        }
        for addr in std::mem::take(&mut dirty.tunnels) {
            note_conflict(
                &mut self.conflicts,
                "underlay address",
                &addr,
                &self.tunnel_claims.ranks(&addr),
            );
            let want = self.tunnel_claims.winner(&addr).copied();
            if want == self.tunnels.get(&addr).copied() {
                continue;
            }
            let result = match want {
                Some(id) => dp.upsert_tunnel_peer(addr, id).map(|()| {
                    self.tunnels.insert(addr, id);
                }),
                None => dp.remove_tunnel_peer(addr).map(|()| {
                    self.tunnels.remove(&addr);
                }),
            };
            if let Err(e) = result {
                errors.push(format!("programming tunnel peers: {e:#}"));
                retry.tunnels.insert(addr);
            }
        }
    }
}

/// `namespace/name` → (namespace, name).
pub fn service_id(key: &str) -> Option<ServiceId> {
    key.split_once('/').map(|(a, b)| (a.to_owned(), b.to_owned()))
}

/// The local services a peer's service record `key` (`namespace/name`) feeds: the same-named Service, and the
/// ClusterSetIP import's synthetic service when there is one (`crate::clusterset`).
pub fn services_fed_by(key: &str) -> impl Iterator<Item = ServiceId> {
    service_id(key).into_iter().flat_map(|(ns, name)| {
        let import = format!("{name}{}", crate::clusterset::IMPORT_KEY_SUFFIX);
        [(ns.clone(), name), (ns, import)]
    })
}

/// The services of namespace `ns`.
pub fn services_in<'a>(local: &'a ClusterState, ns: &'a str) -> impl Iterator<Item = ServiceId> + 'a {
    local
        .services
        .range((ns.to_owned(), String::new())..)
        .take_while(move |((n, _), _)| n == ns)
        .map(|(k, _)| k.clone())
}

/// The services whose view may differ between `prev` and `cur`: changed services, every service of a namespace
/// whose pods or EndpointSlices changed, services whose export changed.
pub fn local_service_changes(prev: Option<&ClusterState>, cur: &ClusterState, out: &mut BTreeSet<ServiceId>) {
    let Some(prev) = prev else {
        out.extend(cur.services.keys().cloned());
        return;
    };
    fn changed<'a, K: Ord, V: PartialEq>(
        a: &'a BTreeMap<K, V>,
        b: &'a BTreeMap<K, V>,
    ) -> impl Iterator<Item = &'a K> + 'a {
        a.iter()
            .filter(|(k, v)| b.get(*k) != Some(*v))
            .map(|(k, _)| k)
            .chain(b.keys().filter(|k| !a.contains_key(*k)))
    }
    out.extend(changed(&cur.services, &prev.services).cloned());
    let mut namespaces: BTreeSet<&str> = BTreeSet::new();
    namespaces.extend(changed(&cur.pods, &prev.pods).map(|(ns, _)| ns.as_str()));
    namespaces.extend(changed(&cur.endpoint_slices, &prev.endpoint_slices).map(|(ns, _)| ns.as_str()));
    for ns in namespaces {
        out.extend(services_in(cur, ns));
        out.extend(services_in(prev, ns));
    }
    out.extend(cur.exports.symmetric_difference(&prev.exports).cloned());
}

/// Keeps `conflicts[key]` saying who contests `key` (or removes it when nobody does).
fn note_conflict<K: std::fmt::Display>(
    conflicts: &mut BTreeMap<String, String>,
    what: &str,
    key: &K,
    ranks: &[&Rank],
) {
    let id = format!("{what} {key}");
    let contested = ranks.iter().enumerate().find(|(i, r)| {
        ranks[..*i]
            .iter()
            .any(|o| tier::group(o.tier) == tier::group(r.tier))
    });
    let Some((i, second)) = contested else {
        conflicts.remove(&id);
        return;
    };
    let first = ranks[..i]
        .iter()
        .find(|o| tier::group(o.tier) == tier::group(second.tier))
        .copied()
        .unwrap_or(second);
    let who = |r: &Rank| {
        if r.node.is_empty() {
            format!("cluster {}", r.cluster)
        } else {
            format!("node {}/{}", r.cluster, r.node)
        }
    };
    conflicts.insert(
        id.clone(),
        format!(
            "{id} is claimed by {} and by {}; {} keeps it",
            who(first),
            who(second),
            who(first)
        ),
    );
}
