//! The incremental tables against the from-scratch functions (the oracle): random sequences of changes (backends
//! added and removed, services deleted, pods and nodes that come, go, move and collide, clusters that become
//! unreachable beyond their grace period, are refused, vanish and come back, local pods and nodes that change)
//! are fed to [`MeshTables`] one change at a time, the way the agent's journal feeds them; after every change the
//! maps it programmed ([`FakeMaps`]) must equal what `desired::ipcache`, `desired::remote_pod_entries` and
//! `lb::services` compute from scratch, and no backend may be left behind.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::{Arc, PoisonError};

use ipnet::Ipv4Net;
use mesh_agent::desired::{self, LocalNode};
use mesh_agent::lb::{self, TrafficPolicyVersions};
use mesh_agent::lb_maps::{LbMaps, ServiceId};
use mesh_agent::maps::FakeMaps;
use mesh_agent::reconcile::HeldPeers;
use mesh_agent::remote::{ClusterChanges, Journal, RemoteCluster, Scope};
use mesh_agent::tables::{Dirty, MeshTables, Sources};
use mesh_kvstore::{BackendRecord, IpRecord, NodeRecord, PortRecord, ServiceRecord};
use mesh_model::service::Affinity;
use mesh_model::{ClusterState, ContainerPort, Node, Pod, Protocol, Service, ServicePort};
use proptest::prelude::*;

const NOW: u64 = 1_000_000;
const GRACE_MS: u64 = 30_000;
const PEERS: [(&str, u16); 3] = [("north", 3), ("west", 2), ("south", 4)];
const SERVICES: [&str; 2] = ["echo", "web"];

fn me() -> LocalNode {
    LocalNode {
        node: "east-node-1".into(),
        cluster: "east".into(),
        cluster_id: 1,
        labels: BTreeMap::new(),
    }
}

fn port() -> Vec<PortRecord> {
    vec![PortRecord {
        name: String::new(),
        port: 8080,
        protocol: Protocol::Tcp,
    }]
}

/// A change, as the generator draws it (indexes pick among few names so that changes collide often).
#[derive(Debug, Clone)]
enum Op {
    AddBackend {
        peer: usize,
        svc: usize,
        host: u8,
    },
    RemoveBackend {
        peer: usize,
        svc: usize,
        nth: usize,
    },
    DeleteService {
        peer: usize,
        svc: usize,
    },
    PutNode {
        peer: usize,
        node: u8,
        underlay: u8,
        prefix: u8,
    },
    DeleteNode {
        peer: usize,
        node: u8,
    },
    PutIp {
        peer: usize,
        host: u8,
        node: u8,
        identity: u32,
    },
    DeleteIp {
        peer: usize,
        host: u8,
    },
    /// Unreachable since long before the grace period (`long`) or just now, or reachable again.
    Reach {
        peer: usize,
        state: u8,
    },
    /// Refused: its data dropped, as `RemoteCluster::refuse` does; then usable again (empty until it publishes).
    Refuse {
        peer: usize,
    },
    Restore {
        peer: usize,
    },
    RemoveCluster {
        peer: usize,
    },
    LocalPod {
        host: u8,
        present: bool,
    },
    LocalNode {
        node: u8,
        underlay: u8,
    },
    OwnIp {
        host: u8,
        node: u8,
        present: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let peer = 0..PEERS.len();
    let svc = 0..SERVICES.len();
    prop_oneof![
        4 => (peer.clone(), svc.clone(), 1..6u8).prop_map(|(peer, svc, host)| Op::AddBackend { peer, svc, host }),
        2 => (peer.clone(), svc.clone(), 0..4usize).prop_map(|(peer, svc, nth)| Op::RemoveBackend { peer, svc, nth }),
        1 => (peer.clone(), svc).prop_map(|(peer, svc)| Op::DeleteService { peer, svc }),
        3 => (peer.clone(), 1..3u8, 1..3u8, 0..3u8)
            .prop_map(|(peer, node, underlay, prefix)| Op::PutNode { peer, node, underlay, prefix }),
        1 => (peer.clone(), 1..3u8).prop_map(|(peer, node)| Op::DeleteNode { peer, node }),
        3 => (peer.clone(), 1..6u8, 1..4u8, 1..3u32)
            .prop_map(|(peer, host, node, identity)| Op::PutIp { peer, host, node, identity }),
        1 => (peer.clone(), 1..6u8).prop_map(|(peer, host)| Op::DeleteIp { peer, host }),
        1 => (peer.clone(), 0..3u8).prop_map(|(peer, state)| Op::Reach { peer, state }),
        1 => peer.clone().prop_map(|peer| Op::Refuse { peer }),
        1 => peer.clone().prop_map(|peer| Op::Restore { peer }),
        1 => peer.prop_map(|peer| Op::RemoveCluster { peer }),
        1 => (1..4u8, any::<bool>()).prop_map(|(host, present)| Op::LocalPod { host, present }),
        1 => (2..4u8, 0..3u8).prop_map(|(node, underlay)| Op::LocalNode { node, underlay }),
        1 => (1..4u8, 1..3u8, any::<bool>()).prop_map(|(host, node, present)| Op::OwnIp { host, node, present }),
    ]
}

/// The mesh as the generator changed it, and the journal of what changed since the tables last looked.
struct World {
    local: Arc<ClusterState>,
    own: RemoteCluster,
    remotes: BTreeMap<String, RemoteCluster>,
    journal: Journal,
    local_changed: bool,
}

fn local_state() -> ClusterState {
    let mut st = ClusterState::default();
    for (i, name) in SERVICES.iter().enumerate() {
        let svc = Service {
            namespace: "demo".into(),
            name: (*name).into(),
            cluster_ipv4: Some(Ipv4Addr::new(198, 18, 0, 10 + u8::try_from(i).unwrap_or(0))),
            selector: [("app".to_owned(), (*name).to_owned())].into(),
            ports: vec![ServicePort {
                name: None,
                port: 80,
                protocol: Protocol::Tcp,
                target_port: Some("8080".into()),
            }],
            annotations: [("service.cilium.io/global".to_owned(), "true".to_owned())].into(),
        };
        st.services.insert(("demo".into(), (*name).into()), svc);
    }
    for (n, underlay) in [(1u8, 1u8), (2, 2)] {
        let node = Node {
            name: format!("east-node-{n}"),
            underlay_ipv4: Ipv4Addr::new(192, 168, 1, underlay),
            pod_cidr: Ipv4Net::new(Ipv4Addr::new(10, 1, n, 0), 24).unwrap_or_default(),
            wireguard: None,
        };
        st.nodes.insert(node.name.clone(), node);
    }
    st
}

impl World {
    fn new() -> Self {
        let mut own = RemoteCluster::new("east");
        own.cluster_id = Some(1);
        Self {
            local: Arc::new(local_state()),
            own,
            remotes: BTreeMap::new(),
            journal: Journal::new(),
            local_changed: true,
        }
    }

    fn peer(&mut self, i: usize) -> (&'static str, u16, &mut RemoteCluster) {
        let (name, id) = PEERS[i];
        let rc = self.remotes.entry(name.to_owned()).or_insert_with(|| {
            let mut rc = RemoteCluster::new(name);
            rc.cluster_id = Some(id);
            rc
        });
        (name, id, rc)
    }

    fn changes(&mut self, scope: Scope, name: &str) -> &mut ClusterChanges {
        self.journal.entry((scope, name.to_owned())).or_default()
    }

    fn apply(&mut self, op: &Op) {
        match op {
            Op::AddBackend { peer, svc, host } => {
                let (name, id, rc) = self.peer(*peer);
                if !rc.usable {
                    return;
                }
                let key = format!("demo/{}", SERVICES[*svc]);
                let mut rec = rc.services.get(&key).map_or_else(
                    || ServiceRecord {
                        cluster: name.into(),
                        cluster_id: id,
                        namespace: "demo".into(),
                        name: SERVICES[*svc].into(),
                        ports: port(),
                        backends: Vec::new(),
                        mcs: None,
                    },
                    |r| (**r).clone(),
                );
                let ip = Ipv4Addr::new(10, u8::try_from(id).unwrap_or(0), 1, *host);
                if rec.backends.iter().any(|b| b.ipv4 == ip) {
                    return;
                }
                rec.backends.push(BackendRecord {
                    ipv4: ip,
                    ports: port().into(),
                    weight: u32::from(*host % 3) + 1,
                });
                rc.services.insert(key.clone(), Arc::new(rec));
                self.changes(Scope::Peer, name).services.insert(key);
            }
            Op::RemoveBackend { peer, svc, nth } => {
                let (name, _, rc) = self.peer(*peer);
                let key = format!("demo/{}", SERVICES[*svc]);
                let Some(r) = rc.services.get(&key) else { return };
                let mut rec = (**r).clone();
                if *nth >= rec.backends.len() {
                    return;
                }
                rec.backends.remove(*nth);
                rc.services.insert(key.clone(), Arc::new(rec));
                self.changes(Scope::Peer, name).services.insert(key);
            }
            Op::DeleteService { peer, svc } => {
                let (name, _, rc) = self.peer(*peer);
                let key = format!("demo/{}", SERVICES[*svc]);
                if rc.services.remove(&key).is_some() {
                    self.changes(Scope::Peer, name).services.insert(key);
                }
            }
            Op::PutNode {
                peer,
                node,
                underlay,
                prefix,
            } => {
                let (name, id, rc) = self.peer(*peer);
                if !rc.usable {
                    return;
                }
                let octet = u8::try_from(id).unwrap_or(0);
                // Prefix 0 is the same in every cluster: a conflict the first claimant wins.
                let cidr = match prefix {
                    0 => Ipv4Net::new(Ipv4Addr::new(10, 99, 0, 0), 24),
                    _ => Ipv4Net::new(Ipv4Addr::new(10, octet, *node, 0), 24),
                }
                .unwrap_or_default();
                let n = format!("{name}-node-{node}");
                rc.nodes.insert(
                    n.clone(),
                    Arc::new(NodeRecord {
                        name: n.clone(),
                        cluster: name.into(),
                        cluster_id: id,
                        // Underlay 1 of node 1 in one cluster is node 2's in another: collisions too.
                        underlay_ipv4: Ipv4Addr::new(192, 168, 2, octet * 10 + underlay + node),
                        pod_cidrs: vec![cidr],
                        wireguard: None,
                    }),
                );
                self.changes(Scope::Peer, name).nodes.insert(n);
            }
            Op::DeleteNode { peer, node } => {
                let (name, _, rc) = self.peer(*peer);
                let n = format!("{name}-node-{node}");
                if rc.nodes.remove(&n).is_some() {
                    self.changes(Scope::Peer, name).nodes.insert(n);
                }
            }
            Op::PutIp {
                peer,
                host,
                node,
                identity,
            } => {
                let (name, id, rc) = self.peer(*peer);
                if !rc.usable {
                    return;
                }
                let ip = Ipv4Addr::new(10, u8::try_from(id).unwrap_or(0), 1, *host);
                rc.ips.insert(
                    ip,
                    Arc::new(IpRecord {
                        ipv4: ip,
                        cluster: name.into(),
                        identity: mesh_common::identity::compose(id, 256 + identity),
                        namespace: "demo".into(),
                        pod: format!("p{host}"),
                        node: format!("{name}-node-{node}"),
                        named_ports: vec![],
                    }),
                );
                self.changes(Scope::Peer, name).ips.insert(ip);
            }
            Op::DeleteIp { peer, host } => {
                let (name, id, rc) = self.peer(*peer);
                let ip = Ipv4Addr::new(10, u8::try_from(id).unwrap_or(0), 1, *host);
                if rc.ips.remove(&ip).is_some() {
                    self.changes(Scope::Peer, name).ips.insert(ip);
                }
            }
            Op::Reach { peer, state } => {
                let (name, _, rc) = self.peer(*peer);
                rc.unreachable_since_ms = match state {
                    0 => None,
                    1 => Some(NOW - GRACE_MS * 2),
                    _ => Some(NOW - 1),
                };
                self.changes(Scope::Peer, name).meta = true;
            }
            Op::Refuse { peer } => {
                let (name, _, rc) = self.peer(*peer);
                let gone = ClusterChanges::all_of(rc);
                rc.usable = false;
                rc.nodes.clear();
                rc.services.clear();
                rc.ips.clear();
                rc.identities.clear();
                self.changes(Scope::Peer, name).merge(gone);
            }
            Op::Restore { peer } => {
                let (name, _, rc) = self.peer(*peer);
                rc.usable = true;
                self.changes(Scope::Peer, name).meta = true;
            }
            Op::RemoveCluster { peer } => {
                let name = PEERS[*peer].0;
                if let Some(rc) = self.remotes.remove(name) {
                    let gone = ClusterChanges::all_of(&rc);
                    self.changes(Scope::Peer, name).merge(gone);
                }
            }
            Op::LocalPod { host, present } => {
                let mut st = (*self.local).clone();
                let pod = Pod {
                    namespace: "demo".into(),
                    name: format!("echo-{host}"),
                    labels: [("app".to_owned(), "echo".to_owned())].into(),
                    annotations: BTreeMap::new(),
                    node_name: Some("east-node-2".into()),
                    ipv4: Some(Ipv4Addr::new(10, 1, 2, *host)),
                    ports: vec![ContainerPort {
                        name: None,
                        port: 8080,
                        protocol: Protocol::Tcp,
                    }],
                    hostname: None,
                    subdomain: None,
                };
                if *present {
                    st.pods.insert(("demo".into(), pod.name.clone()), pod);
                } else {
                    st.pods.remove(&("demo".to_owned(), pod.name));
                }
                self.local = Arc::new(st);
                self.local_changed = true;
            }
            Op::LocalNode { node, underlay } => {
                let mut st = (*self.local).clone();
                let name = format!("east-node-{node}");
                if *underlay == 0 {
                    st.nodes.remove(&name);
                } else {
                    st.nodes.insert(
                        name.clone(),
                        Node {
                            name,
                            underlay_ipv4: Ipv4Addr::new(192, 168, 1, 10 * underlay + node),
                            pod_cidr: Ipv4Net::new(Ipv4Addr::new(10, 1, *node, 0), 24).unwrap_or_default(),
                            wireguard: None,
                        },
                    );
                }
                self.local = Arc::new(st);
                self.local_changed = true;
            }
            Op::OwnIp { host, node, present } => {
                let ip = Ipv4Addr::new(10, 1, *node, 100 + host);
                if *present {
                    self.own.ips.insert(
                        ip,
                        Arc::new(IpRecord {
                            ipv4: ip,
                            cluster: "east".into(),
                            identity: mesh_common::identity::compose(1, 300),
                            namespace: "demo".into(),
                            pod: format!("own{host}"),
                            node: format!("east-node-{node}"),
                            named_ports: vec![],
                        }),
                    );
                } else {
                    self.own.ips.remove(&ip);
                }
                self.changes(Scope::Own, "east").ips.insert(ip);
            }
        }
    }
}

/// The incremental side: tables and the maps they wrote.
struct Incremental {
    tables: MeshTables,
    maps: FakeMaps,
    last_local: Option<Arc<ClusterState>>,
    policies: TrafficPolicyVersions,
}

impl Incremental {
    fn new() -> Self {
        let (tables, _) = MeshTables::adopt(
            me(),
            BTreeMap::new(),
            BTreeMap::new(),
            LbMaps::default(),
            &HeldPeers::default(),
        );
        Self {
            tables,
            maps: FakeMaps::default(),
            last_local: None,
            policies: TrafficPolicyVersions::default(),
        }
    }

    /// One step of the agent's pass, as `Reconciler::step` orders it.
    fn step(&mut self, w: &mut World) -> u64 {
        let writes = self.maps.writes;
        let mut dirty = Dirty::default();
        let first = self.last_local.is_none();
        if w.local_changed {
            self.tables
                .local_changed(self.last_local.as_deref(), &w.local, false, &mut dirty);
            w.local_changed = false;
        }
        self.tables
            .take_journal(std::mem::take(&mut w.journal), &w.local, &mut dirty);
        self.tables.update_facts(
            &w.remotes,
            NOW,
            GRACE_MS,
            &BTreeSet::<ServiceId>::new(),
            &mut dirty,
        );
        self.tables
            .claim_changed(&w.local, Some(&w.own), &w.remotes, &mut dirty);
        let src = Sources {
            local: &w.local,
            own: Some(&w.own),
            remotes: &w.remotes,
            policies: &self.policies,
            affinity_default: Affinity::None,
        };
        let (mut retry, mut errors) = (Dirty::default(), Vec::new());
        self.tables
            .program(&mut self.maps, &src, &mut dirty, first, &mut retry, &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        self.last_local = Some(w.local.clone());
        self.maps.writes - writes
    }
}

/// What the from-scratch functions say the maps hold.
fn oracle(w: &World) -> FakeMaps {
    let me = me();
    let mut maps = FakeMaps::default();
    let mut ipcache = desired::ipcache(&me, &w.local, &w.remotes).entries;
    let pods = desired::remote_pod_entries(&me, &w.local, Some(&w.own), &w.remotes);
    for (ip, e) in pods.entries {
        ipcache.insert(Ipv4Net::from(ip), e);
    }
    maps.ipcache = ipcache;
    maps.tunnel_peers = pods.tunnel_peers;
    let reachable = lb::reachable(&w.remotes, NOW, GRACE_MS);
    let views = lb::services(
        &me,
        &w.local,
        Some(&w.own),
        &reachable,
        &TrafficPolicyVersions::default(),
        Affinity::None,
    );
    let mut lbm = LbMaps::default();
    lbm.reconcile(&mut maps, &views).unwrap_or_else(|e| panic!("{e}"));
    maps
}

/// Backends the maps hold that no slot names (a leak).
fn unreferenced(m: &FakeMaps) -> BTreeSet<u32> {
    let used: BTreeSet<u32> = m.slots.values().copied().collect();
    m.backends
        .keys()
        .filter(|id| !used.contains(id))
        .copied()
        .collect()
}

fn check(inc: &Incremental, w: &World, after: &str) {
    let want = oracle(w);
    assert_eq!(inc.maps.ipcache, want.ipcache, "ipcache after {after}");
    assert_eq!(
        inc.maps.tunnel_peers, want.tunnel_peers,
        "tunnel peers after {after}"
    );
    assert_eq!(inc.maps.resolved(), want.resolved(), "services after {after}");
    assert_eq!(
        unreferenced(&inc.maps),
        BTreeSet::new(),
        "backends left after {after}"
    );
    assert_eq!(
        inc.maps.revnats.len(),
        inc.maps.services.len(),
        "rev-NATs after {after}"
    );
    let views = inc
        .tables
        .programmed
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .views
        .len();
    assert_eq!(views, w.local.services.len(), "views after {after}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn incremental_tables_equal_the_from_scratch_computation(ops in prop::collection::vec(op(), 1..60)) {
        let mut w = World::new();
        let mut inc = Incremental::new();
        inc.step(&mut w);
        check(&inc, &w, "the first pass");
        for (i, op) in ops.iter().enumerate() {
            w.apply(op);
            inc.step(&mut w);
            check(&inc, &w, &format!("change {i}: {op:?}"));
        }
    }
}

#[test]
fn a_change_costs_its_own_writes_whatever_the_size_of_the_mesh() {
    // 2,000 backends in each of two clusters' services; one more backend is a handful of writes (one backend,
    // the new slot table, the service entry, the old slots' removal), not a pass over the mesh.
    let mut w = World::new();
    let mut inc = Incremental::new();
    for (peer, (name, id)) in PEERS.iter().enumerate().take(2) {
        let (_, _, rc) = w.peer(peer);
        let backends = (0..2000u32)
            .map(|i| BackendRecord {
                ipv4: Ipv4Addr::from(0x0a00_0000 | (u32::from(*id) << 16) | (i + 1)),
                ports: port().into(),
                weight: 1,
            })
            .collect();
        rc.services.insert(
            "demo/echo".into(),
            Arc::new(ServiceRecord {
                cluster: (*name).into(),
                cluster_id: *id,
                namespace: "demo".into(),
                name: "echo".into(),
                ports: port(),
                backends,
                mcs: None,
            }),
        );
    }
    inc.step(&mut w);
    check(&inc, &w, "the bootstrap");
    // Another service's backend: nothing of echo is rewritten.
    w.apply(&Op::AddBackend {
        peer: 2,
        svc: 1,
        host: 1,
    });
    let writes = inc.step(&mut w);
    check(&inc, &w, "a backend of web");
    assert!(
        writes <= 5,
        "{writes} writes for one backend of a one-backend service"
    );
    // An unrelated pod's address: one ipcache write at most, no service write.
    w.apply(&Op::PutNode {
        peer: 2,
        node: 1,
        underlay: 1,
        prefix: 1,
    });
    w.apply(&Op::PutIp {
        peer: 2,
        host: 1,
        node: 1,
        identity: 1,
    });
    let writes = inc.step(&mut w);
    check(&inc, &w, "a node and a pod");
    assert!(
        writes <= 3,
        "{writes} writes for a node prefix, its tunnel peer and one pod"
    );
    // Nothing changed: nothing is written.
    assert_eq!(inc.step(&mut w), 0);
}
