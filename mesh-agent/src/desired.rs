//! What the datapath should contain, computed from the state model by pure functions.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use mesh_common::{FAMILY_IPV4, IpcacheEntry, ipcache_flags};
use mesh_model::ClusterState;

use crate::remote::RemoteCluster;

/// Who this agent is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Me {
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

fn tunnel_entry(underlay: Ipv4Addr, cluster_id: u16) -> IpcacheEntry {
    IpcacheEntry {
        tunnel_endpoint: u32::from(underlay),
        identity: 0,
        cluster_id,
        family: FAMILY_IPV4,
        flags: 0,
        _pad: 0,
    }
}

/// The ipcache: every node's pod prefix of the local cluster and of every remote cluster.
#[must_use]
pub fn ipcache(me: &Me, local: &ClusterState, remotes: &BTreeMap<String, RemoteCluster>) -> DesiredIpcache {
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

/// Pods scheduled on this node that have an address and a host interface.
#[must_use]
pub fn endpoints(me: &Me, local: &ClusterState) -> Vec<DesiredEndpoint> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_kvstore::NodeRecord;
    use mesh_model::{Node, Pod};

    fn me() -> Me {
        Me {
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
}
