//! Service load balancing, desired state: for every service of this cluster, its frontends (ClusterIP, port,
//! protocol) and the backends the datapath should pick from, merged across clusters for global services and
//! filtered by affinity. Pure functions of the state model.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use mesh_model::service::{self, Affinity, GlobalSpec};
use mesh_model::{ClusterState, Protocol};
use serde::Serialize;

use crate::desired::Me;
use crate::remote::RemoteCluster;

/// A backend the datapath may pick.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Backend {
    pub ipv4: Ipv4Addr,
    pub port: u16,
    pub cluster: String,
    pub cluster_id: u16,
    pub weight: u32,
}

/// One frontend of a service and its backends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Frontend {
    pub vip: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
    pub port_name: String,
    /// Every ready backend, by cluster.
    pub candidates: BTreeMap<String, Vec<Backend>>,
    /// The backends new flows are spread over (after affinity), sorted.
    pub active: Vec<Backend>,
}

/// A service as this node balances it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceView {
    pub namespace: String,
    pub name: String,
    pub spec: GlobalSpec,
    pub frontends: Vec<Frontend>,
}

/// Picks the active backends of a frontend by affinity: the preferred set when it has a backend, else all.
fn select(
    affinity: Affinity,
    local_cluster: &str,
    candidates: &BTreeMap<String, Vec<Backend>>,
) -> Vec<Backend> {
    let (local, remote): (Vec<&Backend>, Vec<&Backend>) = candidates
        .values()
        .flatten()
        .partition(|b| b.cluster == local_cluster);
    let chosen: Vec<&Backend> = match affinity {
        Affinity::Local if !local.is_empty() => local,
        Affinity::Remote if !remote.is_empty() => remote,
        _ => candidates.values().flatten().collect(),
    };
    let mut out: Vec<Backend> = chosen.into_iter().cloned().collect();
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

/// Every service with a ClusterIP, with its frontends and backends.
#[must_use]
pub fn services(
    me: &Me,
    local: &ClusterState,
    remotes: &BTreeMap<String, RemoteCluster>,
) -> Vec<ServiceView> {
    let mut out = Vec::new();
    for svc in local.services.values() {
        let Some(vip) = svc.cluster_ipv4 else { continue };
        let exported = local.exports.contains(&(svc.namespace.clone(), svc.name.clone()));
        let spec = service::global_spec(svc, exported);
        let endpoints = service::endpoints(local, svc);
        let id = format!("{}/{}", svc.namespace, svc.name);
        let frontends = svc
            .ports
            .iter()
            .map(|sp| {
                let port_name = sp.name.clone().unwrap_or_default();
                let mut candidates: BTreeMap<String, Vec<Backend>> = BTreeMap::new();
                let locals: Vec<Backend> = endpoints
                    .iter()
                    .filter_map(|e| {
                        let p = e
                            .ports
                            .iter()
                            .find(|p| p.name == port_name && p.protocol == sp.protocol)?;
                        Some(Backend {
                            ipv4: e.ipv4,
                            port: p.port,
                            cluster: me.cluster.clone(),
                            cluster_id: me.cluster_id,
                            weight: 1,
                        })
                    })
                    .collect();
                if !locals.is_empty() {
                    candidates.insert(me.cluster.clone(), locals);
                }
                if spec.global {
                    for (cname, rc) in remotes.iter().filter(|(n, rc)| **n != me.cluster && rc.usable) {
                        let Some(rec) = rc.services.get(&id) else { continue };
                        let bs: Vec<Backend> = rec
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
                                    cluster: cname.clone(),
                                    cluster_id: rec.cluster_id,
                                    weight: b.weight.max(1),
                                })
                            })
                            .collect();
                        if !bs.is_empty() {
                            candidates.insert(cname.clone(), bs);
                        }
                    }
                }
                let active = select(spec.affinity, &me.cluster, &candidates);
                Frontend {
                    vip,
                    port: sp.port,
                    protocol: sp.protocol,
                    port_name,
                    candidates,
                    active,
                }
            })
            .collect();
        out.push(ServiceView {
            namespace: svc.namespace.clone(),
            name: svc.name.clone(),
            spec,
            frontends,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_kvstore::{BackendRecord, PortRecord, ServiceRecord};
    use mesh_model::{ContainerPort, Pod, Service, ServicePort};

    fn me() -> Me {
        Me {
            node: "east-node-1".into(),
            cluster: "east".into(),
            cluster_id: 1,
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
            ServiceRecord {
                cluster: name.into(),
                cluster_id: id,
                namespace: "demo".into(),
                name: "echo".into(),
                ports: vec![port(80)],
                backends: ips
                    .iter()
                    .map(|ip| BackendRecord {
                        ipv4: Ipv4Addr::from(*ip),
                        ports: vec![port(8080)],
                        weight: 1,
                    })
                    .collect(),
            },
        );
        (name.into(), rc)
    }

    fn active_clusters(v: &[ServiceView]) -> Vec<String> {
        let mut c: Vec<String> = v[0].frontends[0]
            .active
            .iter()
            .map(|b| b.cluster.clone())
            .collect();
        c.dedup();
        c
    }

    #[test]
    fn local_service_uses_only_local_backends() {
        let remotes: BTreeMap<_, _> = [remote("west", 2, &[[10, 2, 0, 2]])].into();
        let v = services(&me(), &local(&[], &[[10, 1, 0, 2]]), &remotes);
        assert_eq!(v[0].frontends[0].active.len(), 1);
        assert_eq!(active_clusters(&v), vec!["east"]);
    }

    #[test]
    fn global_service_merges_clusters_and_affinity_prefers_then_falls_back() {
        let remotes: BTreeMap<_, _> = [
            remote("west", 2, &[[10, 2, 0, 2], [10, 2, 1, 2]]),
            remote("north", 3, &[[10, 3, 0, 2]]),
        ]
        .into();
        let g = [("service.cilium.io/global", "true")];
        let v = services(&me(), &local(&g, &[[10, 1, 0, 2]]), &remotes);
        assert_eq!(v[0].frontends[0].active.len(), 4);
        assert_eq!(v[0].frontends[0].active[0].port, 8080);
        let l = [
            ("service.cilium.io/global", "true"),
            ("service.cilium.io/affinity", "local"),
        ];
        assert_eq!(
            active_clusters(&services(&me(), &local(&l, &[[10, 1, 0, 2]]), &remotes)),
            vec!["east"]
        );
        // No local backend: fall back to the remote ones.
        let v = services(&me(), &local(&l, &[]), &remotes);
        assert_eq!(v[0].frontends[0].active.len(), 3);
        let r = [
            ("service.cilium.io/global", "true"),
            ("service.cilium.io/affinity", "remote"),
        ];
        let v = services(&me(), &local(&r, &[[10, 1, 0, 2]]), &remotes);
        assert!(v[0].frontends[0].active.iter().all(|b| b.cluster != "east"));
        let v = services(&me(), &local(&r, &[[10, 1, 0, 2]]), &BTreeMap::new());
        assert_eq!(
            active_clusters(&v),
            vec!["east"],
            "remote affinity falls back to local"
        );
    }

    #[test]
    fn invalid_annotation_keeps_service_local_and_reports() {
        let remotes: BTreeMap<_, _> = [remote("west", 2, &[[10, 2, 0, 2]])].into();
        let bad = [
            ("service.cilium.io/global", "true"),
            ("service.cilium.io/affinity", "closest"),
        ];
        let v = services(&me(), &local(&bad, &[[10, 1, 0, 2]]), &remotes);
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
        let v = services(
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
        let v = services(
            &me(),
            &local(&[("service.cilium.io/global", "true")], &[]),
            &remotes,
        );
        assert!(v[0].frontends[0].active.is_empty());
    }
}
