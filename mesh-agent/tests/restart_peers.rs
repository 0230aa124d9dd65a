//! A restarted agent keeps what its pinned maps hold for a peer until that peer has synced again (needs root with
//! CAP_BPF / CAP_SYS_ADMIN for bpffs): an agent restarted while a peer's etcd is away must not cut the traffic
//! that flowed to it before the restart.
#[path = "common/pins.rs"]
mod pins;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;

use ipnet::Ipv4Net;
use mesh_agent::datapath::Datapath;
use mesh_agent::desired::LocalNode;
use mesh_agent::reconcile::Reconciler;
use mesh_agent::remote::{RemoteCluster, SyncState};
use mesh_kvstore::{IpRecord, NodeRecord};
use mesh_model::{ClusterState, Node};
use pins::Pins;

fn me() -> LocalNode {
    LocalNode {
        node: "east-node-1".into(),
        cluster: "east".into(),
        cluster_id: 1,
        labels: BTreeMap::new(),
    }
}

fn local() -> ClusterState {
    let mut s = ClusterState::default();
    s.nodes.insert(
        "east-node-1".into(),
        Node {
            name: "east-node-1".into(),
            underlay_ipv4: Ipv4Addr::new(100, 65, 1, 1),
            pod_cidr: "10.1.0.0/24".parse().expect("cidr"),
            wireguard: None,
        },
    );
    s
}

const WEST_NODE: Ipv4Addr = Ipv4Addr::new(100, 65, 2, 1);
const WEST_POD: Ipv4Addr = Ipv4Addr::new(10, 2, 1, 5);

/// West as a synced agent knows it: one node and one pod.
fn west_synced(with_pod: bool) -> BTreeMap<String, RemoteCluster> {
    let mut w = RemoteCluster::new("west");
    w.state = SyncState::Synced { since_ms: 1 };
    w.cluster_id = Some(2);
    w.syncs = 1;
    w.nodes.insert(
        "west-node-1".into(),
        Arc::new(NodeRecord {
            name: "west-node-1".into(),
            cluster: "west".into(),
            cluster_id: 2,
            underlay_ipv4: WEST_NODE,
            pod_cidrs: vec!["10.2.1.0/24".parse().expect("cidr")],
            wireguard: None,
        }),
    );
    if with_pod {
        w.ips.insert(
            WEST_POD,
            Arc::new(IpRecord {
                ipv4: WEST_POD,
                cluster: "west".into(),
                identity: mesh_common::identity::compose(2, 300),
                namespace: "shop".into(),
                pod: "api-0".into(),
                node: "west-node-1".into(),
                named_ports: vec![],
            }),
        );
    }
    [("west".to_owned(), w)].into()
}

/// West's entries in the pinned maps: (its ipcache prefixes, whether its node is a tunnel peer).
fn west_entries(dp: &Datapath) -> (Vec<Ipv4Net>, bool) {
    let prefixes = dp
        .ipcache()
        .expect("ipcache")
        .into_iter()
        .filter(|(_, e)| e.cluster_id == 2)
        .map(|(p, _)| p)
        .collect();
    let peer = dp.tunnel_peers().expect("tunnel peers").get(&WEST_NODE) == Some(&2);
    (prefixes, peer)
}

#[test]
fn a_restarted_agent_keeps_a_peers_entries_until_the_peer_has_synced() {
    let pins = Pins::new("heldpeers");
    let prefix: Ipv4Net = "10.2.1.0/24".parse().expect("cidr");
    let pod = Ipv4Net::from(WEST_POD);
    {
        let dp = Datapath::load_pinned(pins.path()).expect("load pinned");
        let mut r = Reconciler::new(dp, me(), "fm-no-vxlan".into());
        r.peers_configured = true;
        r.reconcile(&local(), None, &west_synced(true));
        assert_eq!(west_entries(&r.dp), (vec![prefix, pod], true), "west programmed");
        // Dropped: the agent exits; the pinned maps stay.
    }

    // Restarted while west's etcd is away: this process has not heard from west (its watcher is connecting).
    let dp = Datapath::load_pinned(pins.path()).expect("load pinned again");
    let mut r = Reconciler::new(dp, me(), "fm-no-vxlan".into());
    r.peers_configured = true;
    let unheard: BTreeMap<String, RemoteCluster> = [("west".to_owned(), RemoteCluster::new("west"))].into();
    for pass in 0..3 {
        r.reconcile(&local(), None, &unheard);
        assert_eq!(
            west_entries(&r.dp),
            (vec![prefix, pod], true),
            "pass {pass}: west's entries kept while it has not synced"
        );
    }

    // West syncs again, without its pod: now its records are the truth.
    r.reconcile(&local(), None, &west_synced(false));
    assert_eq!(
        west_entries(&r.dp),
        (vec![prefix], true),
        "the pod that went is removed"
    );
    assert!(r.held.is_empty(), "{:?}", r.held);
    // Without peers at all (west's file removed), its entries go.
    r.reconcile(&local(), None, &BTreeMap::new());
    assert_eq!(west_entries(&r.dp), (vec![], false));
}
