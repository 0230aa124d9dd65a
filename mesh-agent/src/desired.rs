//! What the datapath should contain, computed from the state model by pure functions.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use mesh_common::{FAMILY_IPV4, IpcacheEntry, ipcache_flags};
use mesh_model::ClusterState;

use crate::remote::RemoteCluster;

/// The node this agent runs on: its name, cluster, cluster id and cluster labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalNode {
    pub node: String,
    pub cluster: String,
    pub cluster_id: u16,
    /// This cluster's labels (`--cluster-label`), which local `TrafficPolicy` selectors match.
    pub labels: BTreeMap<String, String>,
}

/// A pod on this node that should be reachable through the datapath.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredEndpoint {
    /// `namespace/name`.
    pub pod: String,
    pub ipv4: Ipv4Addr,
    pub ifname: String,
}

/// The ipcache entries and the conflicts met while computing them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DesiredIpcache {
    pub entries: BTreeMap<Ipv4Net, IpcacheEntry>,
    /// One line per prefix claimed by more than one node; the first claimant (local cluster first, then
    /// remote clusters by name) keeps it.
    pub conflicts: Vec<String>,
}

/// The entry of a node's pod prefix (pods whose /32 has not arrived yet answer `PENDING`).
#[must_use]
pub fn tunnel_entry(underlay: Ipv4Addr, cluster_id: u16) -> IpcacheEntry {
    IpcacheEntry {
        tunnel_endpoint: u32::from(underlay),
        // A pod prefix stands for pods whose own /32 (with their identity) has not arrived yet.
        identity: mesh_common::identity::PENDING,
        cluster_id,
        family: FAMILY_IPV4,
        flags: 0,
        _pad: 0,
    }
}

/// The ipcache: every node's pod prefix of the local cluster and of every remote cluster.
#[must_use]
pub fn ipcache(
    me: &LocalNode,
    local: &ClusterState,
    remotes: &BTreeMap<String, RemoteCluster>,
) -> DesiredIpcache {
    let mut out = DesiredIpcache::default();
    let mut owner: BTreeMap<Ipv4Net, String> = BTreeMap::new();
    let mut claim = |out: &mut DesiredIpcache, prefix: Ipv4Net, who: String, entry: IpcacheEntry| {
        if let Some(first) = owner.get(&prefix) {
            out.conflicts.push(format!(
                "pod prefix {prefix} is claimed by {first} and by {who}; {first} keeps it"
            ));
            return;
        }
        owner.insert(prefix, who);
        out.entries.insert(prefix, entry);
    };
    for n in local.nodes.values() {
        let who = format!("node {}/{}", me.cluster, n.name);
        let entry = if n.name == me.node {
            IpcacheEntry {
                flags: ipcache_flags::LOCAL_NODE,
                ..tunnel_entry(Ipv4Addr::UNSPECIFIED, me.cluster_id)
            }
        } else {
            tunnel_entry(n.underlay_ipv4, me.cluster_id)
        };
        claim(&mut out, n.pod_cidr, who, entry);
    }
    for (name, rc) in remotes {
        if name == &me.cluster || !rc.usable {
            continue;
        }
        for n in rc.nodes.values() {
            for prefix in &n.pod_cidrs {
                claim(
                    &mut out,
                    prefix.trunc(),
                    format!("node {name}/{}", n.name),
                    tunnel_entry(n.underlay_ipv4, n.cluster_id),
                );
            }
        }
    }
    out
}

/// The per-pod entries of the mesh (docs/network-policy.md, "Sync to agents"): not yet written to the maps.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DesiredPods {
    /// `IPCACHE_V4` /32 entries: every pod of another node (this cluster's or a peer's) whose ip record arrived,
    /// with its node's underlay address, its identity and its cluster id.
    pub entries: BTreeMap<Ipv4Addr, IpcacheEntry>,
    /// `TUNNEL_PEERS`: every node's underlay address (this cluster's other nodes and every usable peer's nodes) →
    /// cluster id.
    pub tunnel_peers: BTreeMap<Ipv4Addr, u16>,
    /// One line per address claimed twice; the first claimant (this cluster first, then peers by name) keeps it.
    pub conflicts: Vec<String>,
}

/// Computes [`DesiredPods`] from this cluster's nodes (`local`, from the source), its identities and ips (`own`,
/// from its etcd) and the peer clusters. A pod whose node is not known (yet) has no entry: its node's pod prefix
/// keeps answering with `PENDING`. Pods of this node are left out (they are local endpoints). A peer named like this
/// cluster, or unusable, is left out.
#[must_use]
pub fn remote_pod_entries(
    me: &LocalNode,
    local: &ClusterState,
    own: Option<&RemoteCluster>,
    remotes: &BTreeMap<String, RemoteCluster>,
) -> DesiredPods {
    let mut out = DesiredPods::default();
    let mut pod_owner: BTreeMap<Ipv4Addr, String> = BTreeMap::new();
    let mut claim_pod =
        |out: &mut DesiredPods, ip: &mesh_kvstore::IpRecord, underlay: Ipv4Addr, cluster_id: u16| {
            let who = format!("pod {}/{}/{}", ip.cluster, ip.namespace, ip.pod);
            if let Some(first) = pod_owner.get(&ip.ipv4) {
                out.conflicts.push(format!(
                    "address {} is claimed by {first} and by {who}; {first} keeps it",
                    ip.ipv4
                ));
                return;
            }
            pod_owner.insert(ip.ipv4, who);
            out.entries.insert(
                ip.ipv4,
                IpcacheEntry {
                    identity: ip.identity,
                    ..tunnel_entry(underlay, cluster_id)
                },
            );
        };
    let mut peer_owner: BTreeMap<Ipv4Addr, String> = BTreeMap::new();
    let mut claim_peer = |out: &mut DesiredPods, underlay: Ipv4Addr, who: String, cluster_id: u16| {
        if let Some(first) = peer_owner.get(&underlay) {
            out.conflicts.push(format!(
                "underlay address {underlay} is claimed by {first} and by {who}; {first} keeps it"
            ));
            return;
        }
        peer_owner.insert(underlay, who);
        out.tunnel_peers.insert(underlay, cluster_id);
    };
    for n in local.nodes.values().filter(|n| n.name != me.node) {
        claim_peer(
            &mut out,
            n.underlay_ipv4,
            format!("node {}/{}", me.cluster, n.name),
            me.cluster_id,
        );
    }
    if let Some(own) = own.filter(|o| o.usable) {
        for ip in own.ips.values().filter(|ip| ip.node != me.node) {
            if let Some(n) = local.nodes.get(&ip.node) {
                claim_pod(&mut out, ip, n.underlay_ipv4, me.cluster_id);
            }
        }
    }
    for (name, rc) in remotes {
        if name == &me.cluster || !rc.usable {
            continue;
        }
        for n in rc.nodes.values() {
            claim_peer(
                &mut out,
                n.underlay_ipv4,
                format!("node {name}/{}", n.name),
                n.cluster_id,
            );
        }
        for ip in rc.ips.values() {
            if let Some(n) = rc.nodes.get(&ip.node) {
                claim_pod(&mut out, ip, n.underlay_ipv4, n.cluster_id);
            }
        }
    }
    out
}

/// Pods scheduled on this node that have an address and a host interface.
#[must_use]
pub fn endpoints(me: &LocalNode, local: &ClusterState) -> Vec<DesiredEndpoint> {
    local
        .pods_on_node(&me.node)
        .filter_map(|p| {
            Some(DesiredEndpoint {
                pod: format!("{}/{}", p.namespace, p.name),
                ipv4: p.ipv4?,
                ifname: p.host_ifname()?.to_owned(),
            })
        })
        .collect()
}

/// The endpoints that name an interface another endpoint of the node names too, each with its refusal: one
/// interface is one pod's veth. The owner is the claimant for which `programmed` is true (its entry already
/// points at the interface: a second pod's claim never takes a working pod's veth away), else the first in
/// `endpoints`' order (pods by namespace and name).
#[must_use]
pub fn interface_conflicts(
    endpoints: &[DesiredEndpoint],
    programmed: impl Fn(&DesiredEndpoint) -> bool,
) -> BTreeMap<String, String> {
    let mut by_interface: BTreeMap<&str, Vec<&DesiredEndpoint>> = BTreeMap::new();
    for e in endpoints {
        by_interface.entry(e.ifname.as_str()).or_default().push(e);
    }
    let mut out = BTreeMap::new();
    for (ifname, claimants) in by_interface.into_iter().filter(|(_, c)| c.len() > 1) {
        let owner = claimants
            .iter()
            .find(|e| programmed(e))
            .or(claimants.first())
            .map_or("", |e| e.pod.as_str());
        for e in claimants.iter().filter(|e| e.pod != owner) {
            out.insert(
                e.pod.clone(),
                format!("interface {ifname:?} is already the veth of pod {owner}"),
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_kvstore::NodeRecord;
    use mesh_model::{Node, Pod};

    fn me() -> LocalNode {
        LocalNode {
            node: "east-node-1".into(),
            cluster: "east".into(),
            cluster_id: 1,
            labels: BTreeMap::new(),
        }
    }

    fn node(name: &str, ip: [u8; 4], cidr: &str) -> Node {
        Node {
            name: name.into(),
            underlay_ipv4: Ipv4Addr::from(ip),
            pod_cidr: cidr.parse().expect("cidr"),
            wireguard: None,
        }
    }

    fn local() -> ClusterState {
        let mut s = ClusterState::default();
        for n in [
            node("east-node-1", [172, 30, 1, 1], "10.1.0.0/24"),
            node("east-node-2", [172, 30, 1, 2], "10.1.1.0/24"),
        ] {
            s.nodes.insert(n.name.clone(), n);
        }
        s
    }

    fn remote(name: &str, id: u16, nodes: &[(&str, [u8; 4], &str)], usable: bool) -> RemoteCluster {
        let mut rc = RemoteCluster::new(name);
        rc.usable = usable;
        for (n, ip, cidr) in nodes {
            rc.nodes.insert(
                (*n).to_owned(),
                std::sync::Arc::new(NodeRecord {
                    name: (*n).into(),
                    cluster: name.into(),
                    cluster_id: id,
                    underlay_ipv4: Ipv4Addr::from(*ip),
                    pod_cidrs: vec![cidr.parse().expect("cidr")],
                    wireguard: None,
                }),
            );
        }
        rc
    }

    #[test]
    fn local_and_remote_prefixes() {
        let mut remotes = BTreeMap::new();
        remotes.insert(
            "west".into(),
            remote(
                "west",
                2,
                &[("west-node-1", [172, 30, 2, 1], "10.2.0.0/24")],
                true,
            ),
        );
        let d = ipcache(&me(), &local(), &remotes);
        assert!(d.conflicts.is_empty());
        assert_eq!(d.entries.len(), 3);
        let own = d.entries[&"10.1.0.0/24".parse::<Ipv4Net>().expect("cidr")];
        assert_eq!(own.flags, ipcache_flags::LOCAL_NODE);
        assert_eq!(own.tunnel_endpoint, 0);
        let peer = d.entries[&"10.1.1.0/24".parse::<Ipv4Net>().expect("cidr")];
        assert_eq!(peer.tunnel_endpoint, u32::from(Ipv4Addr::new(172, 30, 1, 2)));
        assert_eq!(peer.cluster_id, 1);
        let w = d.entries[&"10.2.0.0/24".parse::<Ipv4Net>().expect("cidr")];
        assert_eq!(w.tunnel_endpoint, u32::from(Ipv4Addr::new(172, 30, 2, 1)));
        assert_eq!(w.cluster_id, 2);
    }

    #[test]
    fn conflicting_prefix_keeps_first_and_reports() {
        let mut remotes = BTreeMap::new();
        remotes.insert(
            "west".into(),
            remote(
                "west",
                2,
                &[("west-node-1", [172, 30, 2, 1], "10.1.1.0/24")],
                true,
            ),
        );
        let d = ipcache(&me(), &local(), &remotes);
        assert_eq!(d.conflicts.len(), 1, "{:?}", d.conflicts);
        assert_eq!(
            d.entries[&"10.1.1.0/24".parse::<Ipv4Net>().expect("cidr")].cluster_id,
            1
        );
    }

    #[test]
    fn unusable_remote_is_left_out() {
        let mut remotes = BTreeMap::new();
        remotes.insert(
            "west".into(),
            remote(
                "west",
                2,
                &[("west-node-1", [172, 30, 2, 1], "10.2.0.0/24")],
                false,
            ),
        );
        assert_eq!(ipcache(&me(), &local(), &remotes).entries.len(), 2);
    }

    #[test]
    fn endpoints_are_wired_pods_on_this_node() {
        let mut s = local();
        let mk = |name: &str, node: &str, ip: Option<[u8; 4]>, ifname: Option<&str>| Pod {
            namespace: "default".into(),
            name: name.into(),
            labels: BTreeMap::new(),
            annotations: ifname
                .map(|i| [(mesh_model::state::ANNOTATION_HOST_IFNAME.to_owned(), i.to_owned())].into())
                .unwrap_or_default(),
            node_name: Some(node.into()),
            ipv4: ip.map(Ipv4Addr::from),
            ports: vec![],
            hostname: None,
            subdomain: None,
        };
        for p in [
            mk("a", "east-node-1", Some([10, 1, 0, 2]), Some("fmabc")),
            mk("b", "east-node-2", Some([10, 1, 1, 2]), Some("fmdef")),
            mk("c", "east-node-1", None, Some("fmghi")),
            mk("d", "east-node-1", Some([10, 1, 0, 3]), None),
        ] {
            s.pods.insert((p.namespace.clone(), p.name.clone()), p);
        }
        let eps = endpoints(&me(), &s);
        assert_eq!(
            eps,
            vec![DesiredEndpoint {
                pod: "default/a".into(),
                ipv4: Ipv4Addr::new(10, 1, 0, 2),
                ifname: "fmabc".into()
            }]
        );
    }

    #[test]
    fn one_interface_is_one_pods_veth() {
        let ep = |pod: &str, last: u8, ifname: &str| DesiredEndpoint {
            pod: pod.into(),
            ipv4: Ipv4Addr::new(10, 1, 0, last),
            ifname: ifname.into(),
        };
        let eps = vec![
            ep("shop/alice", 2, "fm1"),
            ep("shop/bob", 3, "fm2"),
            ep("shop/mallory", 4, "fm1"),
            ep("shop/trent", 5, "fm1"),
        ];
        // Nobody programmed yet: the first by name keeps it.
        let c = interface_conflicts(&eps, |_| false);
        assert_eq!(c.keys().collect::<Vec<_>>(), ["shop/mallory", "shop/trent"]);
        assert!(c["shop/mallory"].contains("\"fm1\"") && c["shop/mallory"].contains("shop/alice"));
        // The pod whose entry already uses the interface keeps it, whatever its name.
        let c = interface_conflicts(&eps, |e| e.pod == "shop/trent");
        assert_eq!(c.keys().collect::<Vec<_>>(), ["shop/alice", "shop/mallory"]);
        assert!(c["shop/alice"].contains("shop/trent"), "{c:?}");
        assert!(interface_conflicts(&eps[..2], |_| false).is_empty());
    }

    fn ip(cluster: &str, cluster_id: u16, ip: [u8; 4], node: &str, number: u32) -> mesh_kvstore::IpRecord {
        mesh_kvstore::IpRecord {
            ipv4: Ipv4Addr::from(ip),
            cluster: cluster.into(),
            identity: mesh_common::identity::compose(cluster_id, number),
            namespace: "shop".into(),
            pod: format!("p-{}", ip[3]),
            node: node.into(),
            named_ports: vec![],
        }
    }

    fn with_ips(mut rc: RemoteCluster, ips: Vec<mesh_kvstore::IpRecord>) -> RemoteCluster {
        for i in ips {
            rc.ips.insert(i.ipv4, std::sync::Arc::new(i));
        }
        rc
    }

    #[test]
    fn pod_entries_and_tunnel_peers_of_every_cluster() {
        use mesh_common::identity::compose;
        let own = with_ips(
            RemoteCluster::new("east"),
            vec![
                ip("east", 1, [10, 1, 0, 5], "east-node-1", 256),
                ip("east", 1, [10, 1, 1, 5], "east-node-2", 257),
                ip("east", 1, [10, 1, 9, 5], "east-node-9", 257),
            ],
        );
        let west = with_ips(
            remote(
                "west",
                2,
                &[("west-node-1", [172, 30, 2, 1], "10.2.0.0/24")],
                true,
            ),
            vec![
                ip("west", 2, [10, 2, 0, 5], "west-node-1", 256),
                ip("west", 2, [10, 2, 7, 5], "west-node-7", 256),
                // Claims east's address: east keeps it.
                ip("west", 2, [10, 1, 1, 5], "west-node-1", 300),
            ],
        );
        let north = with_ips(
            remote(
                "north",
                3,
                &[("north-node-1", [172, 30, 3, 1], "10.3.0.0/24")],
                false,
            ),
            vec![ip("north", 3, [10, 3, 0, 5], "north-node-1", 256)],
        );
        // A peer named like this cluster is never used.
        let shadow = with_ips(
            remote(
                "east",
                9,
                &[("east-node-5", [172, 30, 9, 5], "10.9.0.0/24")],
                true,
            ),
            vec![ip("east", 9, [10, 9, 0, 5], "east-node-5", 256)],
        );
        let remotes: BTreeMap<String, RemoteCluster> = [
            ("west".to_owned(), west),
            ("north".to_owned(), north),
            ("east".to_owned(), shadow),
        ]
        .into();
        let d = remote_pod_entries(&me(), &local(), Some(&own), &remotes);
        let want_entries: BTreeMap<Ipv4Addr, IpcacheEntry> = [
            (
                Ipv4Addr::new(10, 1, 1, 5),
                IpcacheEntry {
                    identity: compose(1, 257),
                    ..tunnel_entry(Ipv4Addr::new(172, 30, 1, 2), 1)
                },
            ),
            (
                Ipv4Addr::new(10, 2, 0, 5),
                IpcacheEntry {
                    identity: compose(2, 256),
                    ..tunnel_entry(Ipv4Addr::new(172, 30, 2, 1), 2)
                },
            ),
        ]
        .into();
        assert_eq!(
            d.entries, want_entries,
            "own node's pods, unknown nodes, unusable peers left out"
        );
        assert_eq!(d.conflicts.len(), 1, "{:?}", d.conflicts);
        assert!(d.conflicts[0].contains("10.1.1.5"), "{:?}", d.conflicts);
        let want_peers: BTreeMap<Ipv4Addr, u16> = [
            (Ipv4Addr::new(172, 30, 1, 2), 1),
            (Ipv4Addr::new(172, 30, 2, 1), 2),
        ]
        .into();
        assert_eq!(d.tunnel_peers, want_peers);

        // Without the own cluster's etcd: peers only; an unusable own view is ignored too.
        let d = remote_pod_entries(&me(), &local(), None, &remotes);
        assert_eq!(d.entries.len(), 2, "{:?}", d.entries);
        let mut bad = own;
        bad.usable = false;
        assert_eq!(
            remote_pod_entries(&me(), &local(), Some(&bad), &remotes)
                .entries
                .len(),
            2
        );
    }
}
