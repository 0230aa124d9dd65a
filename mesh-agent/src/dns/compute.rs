//! One imported service's DNS records, from the local state and the remote clusters' service records.

use std::collections::BTreeMap;

use mesh_model::{ClusterState, service};

use super::{DnsEndpoint, ServiceDns};
use crate::clusterset::Import;
use crate::remote::RemoteCluster;

/// The zone entry of `import`: its ClusterSetIP, or (headless) the ready endpoints of every exporting cluster: this
/// one's (`me`) from `local`, the peers' from their service records in `remotes` (only those that may be used:
/// pass `lb::reachable`'s answer so that a cluster past its grace period drops out of the answers too).
///
/// `None` for a ClusterSetIP import without an address (range full): it stays out of the zone.
#[must_use]
pub fn compute(
    me: &str,
    import: &Import,
    local: &ClusterState,
    remotes: &BTreeMap<String, RemoteCluster>,
) -> Option<ServiceDns> {
    let clusters: Vec<String> = import.clusters.iter().cloned().collect();
    if !import.headless {
        return Some(ServiceDns {
            namespace: import.namespace.clone(),
            name: import.name.clone(),
            clusterset_ip: Some(import.ip?),
            ports: import.ports.clone(),
            endpoints: Vec::new(),
            clusters,
        });
    }
    let key = (import.namespace.clone(), import.name.clone());
    let mut endpoints = Vec::new();
    if import.clusters.contains(me)
        && let Some(svc) = local.services.get(&key)
    {
        for e in service::endpoints(local, svc) {
            // Pod `spec.hostname` under `spec.subdomain` == the service, or the EndpointSlice endpoint's `hostname`.
            endpoints.push(DnsEndpoint {
                cluster: me.to_owned(),
                ipv4: e.ipv4,
                hostname: e.hostname,
            });
        }
    }
    let id = format!("{}/{}", import.namespace, import.name);
    for (cname, rc) in remotes.iter().filter(|(n, rc)| n.as_str() != me && rc.usable) {
        let Some(rec) = rc.services.get(&id) else { continue };
        let Some(mcs) = &rec.mcs else { continue };
        for b in &rec.backends {
            endpoints.push(DnsEndpoint {
                cluster: cname.clone(),
                ipv4: b.ipv4,
                hostname: mcs.hostnames.get(&b.ipv4).cloned(),
            });
        }
    }
    endpoints.sort();
    endpoints.dedup();
    Some(ServiceDns {
        namespace: import.namespace.clone(),
        name: import.name.clone(),
        clusterset_ip: None,
        ports: import.ports.clone(),
        endpoints,
        clusters,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clusterset::Imports;
    use crate::dns::{Lookup, Table};
    use hickory_proto::rr::{RData, RecordType};
    use mesh_kvstore::{BackendRecord, McsRecord, PortRecord, ServiceRecord};
    use mesh_model::{ContainerPort, Pod, Protocol, Service, ServicePort};
    use std::net::Ipv4Addr;
    use std::sync::Arc;

    fn remote(name: &str, rec: ServiceRecord) -> RemoteCluster {
        let mut rc = RemoteCluster::new(name);
        rc.usable = true;
        rc.services
            .insert(format!("{}/{}", rec.namespace, rec.name), Arc::new(rec));
        rc
    }

    #[test]
    fn headless_answers_list_every_clusters_endpoints() {
        let mut local = ClusterState::default();
        local.services.insert(
            ("demo".into(), "db".into()),
            Service {
                namespace: "demo".into(),
                name: "db".into(),
                cluster_ipv4: None,
                selector: [("app".to_owned(), "db".to_owned())].into(),
                ports: vec![ServicePort {
                    name: Some("sql".into()),
                    port: 5432,
                    protocol: Protocol::Tcp,
                    target_port: None,
                }],
                annotations: BTreeMap::new(),
            },
        );
        local.exports.insert(("demo".into(), "db".into()));
        local.pods.insert(
            ("demo".into(), "db-0".into()),
            Pod {
                namespace: "demo".into(),
                name: "db-0".into(),
                labels: [("app".to_owned(), "db".to_owned())].into(),
                annotations: BTreeMap::new(),
                node_name: None,
                ipv4: Some(Ipv4Addr::new(10, 1, 0, 9)),
                ports: vec![ContainerPort {
                    name: None,
                    port: 5432,
                    protocol: Protocol::Tcp,
                }],
                hostname: Some("db-0".into()),
                subdomain: Some("db".into()),
            },
        );
        // A hostname under another subdomain is not this service's (Kubernetes' rule): no per-pod name.
        local.pods.insert(
            ("demo".into(), "db-9".into()),
            Pod {
                namespace: "demo".into(),
                name: "db-9".into(),
                labels: [("app".to_owned(), "db".to_owned())].into(),
                annotations: BTreeMap::new(),
                node_name: None,
                ipv4: Some(Ipv4Addr::new(10, 1, 0, 10)),
                ports: Vec::new(),
                hostname: Some("db-9".into()),
                subdomain: Some("other".into()),
            },
        );
        let port = PortRecord {
            name: "sql".into(),
            port: 5432,
            protocol: Protocol::Tcp,
        };
        let rec = ServiceRecord {
            cluster: "west".into(),
            cluster_id: 2,
            namespace: "demo".into(),
            name: "db".into(),
            ports: vec![port.clone()],
            backends: vec![BackendRecord {
                ipv4: Ipv4Addr::new(10, 2, 0, 4),
                ports: vec![port].into(),
                weight: 1,
            }],
            mcs: Some(McsRecord {
                headless: true,
                hostnames: [(Ipv4Addr::new(10, 2, 0, 4), "db-1".to_owned())].into(),
            }),
        };
        let remotes: BTreeMap<String, RemoteCluster> = [("west".to_owned(), remote("west", rec))].into();
        let mut imports = Imports::new("198.19.0.0/16".parse().unwrap());
        let got = imports.update("east", &local, &remotes);
        assert_eq!(got.len(), 1);
        let dns = compute("east", &got[0], &local, &remotes).unwrap();
        assert_eq!(dns.clusters, vec!["east".to_owned(), "west".to_owned()]);
        let mut t = Table::new();
        t.upsert(dns).unwrap();
        let Lookup::Records(rs) = t
            .lookup_str("db.demo.svc.clusterset.local", RecordType::A)
            .unwrap()
        else {
            panic!("no records");
        };
        let ips: Vec<_> = rs
            .iter()
            .filter_map(|r| {
                if let RData::A(a) = &r.data {
                    Some(a.0)
                } else {
                    None
                }
            })
            .collect();
        assert_eq!(
            ips,
            vec![
                Ipv4Addr::new(10, 1, 0, 9),
                Ipv4Addr::new(10, 1, 0, 10),
                Ipv4Addr::new(10, 2, 0, 4)
            ]
        );
        // The local pod's spec.hostname (its spec.subdomain is the service) gives its name under this cluster.
        let l = t
            .lookup_str("db-0.east.db.demo.svc.clusterset.local", RecordType::A)
            .unwrap();
        let Lookup::Records(rs) = l else {
            panic!("db-0.east: {l:?}")
        };
        assert!(matches!(&rs[0].data, RData::A(a) if a.0 == Ipv4Addr::new(10, 1, 0, 9)));
        assert!(
            !matches!(
                t.lookup_str("db-9.east.db.demo.svc.clusterset.local", RecordType::A)
                    .unwrap(),
                Lookup::Records(_)
            ),
            "a hostname under another subdomain has no name here"
        );
        // The peer's hostname gives the per-pod name under its cluster.
        let l = t
            .lookup_str("db-1.west.db.demo.svc.clusterset.local", RecordType::A)
            .unwrap();
        let Lookup::Records(rs) = l else {
            panic!("db-1.west: {l:?}")
        };
        assert!(matches!(&rs[0].data, RData::A(a) if a.0 == Ipv4Addr::new(10, 2, 0, 4)));
        // West unusable (past its grace period, say): its endpoints leave the answers.
        let none = BTreeMap::new();
        let dns = compute("east", &got[0], &local, &none).unwrap();
        assert_eq!(dns.endpoints.len(), 2);
    }
}

#[cfg(test)]
mod pass_tests {
    use crate::clusterset::tests::{record, remote};
    use crate::dns::{Clusterset, Lookup};
    use mesh_kvstore::McsRecord;
    use mesh_model::ClusterState;
    use std::collections::BTreeMap;

    fn headless() -> Option<McsRecord> {
        Some(McsRecord {
            headless: true,
            ..McsRecord::default()
        })
    }

    fn answers(cs: &Clusterset, name: &str) -> usize {
        match cs.zone.load().lookup_str(name) {
            Lookup::Records(rs) => rs.len(),
            _ => 0,
        }
    }

    /// A backend change reaches the published zone through the per-service pass; an import that comes needs the
    /// full pass.
    #[test]
    fn per_service_pass_publishes_backend_changes_and_defers_new_imports() {
        let local = ClusterState::default();
        let mut cs = Clusterset::new("198.19.0.0/16".parse().unwrap());
        let db = |b: &[[u8; 4]]| record("west", "db", headless(), b);
        let mut remotes: BTreeMap<_, _> =
            [("west".to_owned(), remote("west", 2, vec![db(&[[10, 2, 0, 1]])]))].into();
        cs.pass("east", &local, &remotes);
        assert_eq!(answers(&cs, "db.demo.svc.clusterset.local."), 1);
        remotes.insert(
            "west".to_owned(),
            remote("west", 2, vec![db(&[[10, 2, 0, 1], [10, 2, 0, 2]])]),
        );
        let changed = ["demo/db".to_owned()];
        assert!(cs.pass_services("east", &local, &remotes, changed.iter()));
        assert_eq!(answers(&cs, "db.demo.svc.clusterset.local."), 2, "published");
        // A new export: not a backend change.
        remotes.insert(
            "west".to_owned(),
            remote(
                "west",
                2,
                vec![
                    db(&[[10, 2, 0, 1]]),
                    record("west", "api", Some(McsRecord::default()), &[[10, 2, 0, 3]]),
                ],
            ),
        );
        let changed = ["demo/db".to_owned(), "demo/api".to_owned()];
        assert!(!cs.pass_services("east", &local, &remotes, changed.iter()));
        assert_eq!(
            answers(&cs, "db.demo.svc.clusterset.local."),
            2,
            "nothing changed"
        );
        cs.pass("east", &local, &remotes);
        assert_eq!(answers(&cs, "db.demo.svc.clusterset.local."), 1);
        assert_eq!(answers(&cs, "api.demo.svc.clusterset.local."), 1);
    }
}
