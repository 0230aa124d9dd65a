//! MCS imports on this node: every service some cluster of the clusterset exports (this one through its
//! `ServiceExport`s, the peers through the `mcs` part of their service records), and the ClusterSetIP of each
//! non-headless one.
//!
//! A ClusterSetIP import becomes a synthetic global service of the local state ([`with_imports`]): ClusterIP the
//! ClusterSetIP, the export's ports, this cluster's selector when this cluster exports the service too (so its own
//! backends count), none otherwise. The global-service load balancing (`lb::services`) then spreads it over the
//! ready backends of every exporting cluster with the usual rules (affinity, TrafficPolicy weights, failover), and
//! no local Service is needed. docs/clusterset-dns.md.
//!
//! Addresses come from `--clusterset-cidr` by [`mesh_model::clusterset::allocate`], seeded with what this agent
//! allocated before (kept for as long as the import lasts) and with the addresses the cluster's ServiceImports carry
//! (`spec.ips`, written by the clustermesh-apiserver) when the source provides them.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use mesh_kvstore::ServiceRecord;
use mesh_model::clusterset::{self, ServiceKey};
use mesh_model::{ClusterState, Service, ServicePort};
use serde::Serialize;
use tracing::warn;

use crate::dns::DnsPort;
use crate::remote::RemoteCluster;

/// Suffix of the state key of a synthetic import service (`(namespace, name + suffix)`): not a valid Kubernetes
/// name, so it never collides with a real Service, which keeps its own key.
pub const IMPORT_KEY_SUFFIX: &str = "@clusterset";

/// A service imported into this cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Import {
    pub namespace: String,
    pub name: String,
    pub headless: bool,
    /// Those of this cluster's export when it has one, else those of the first exporting peer by name.
    pub ports: Vec<DnsPort>,
    /// The exporting clusters.
    pub clusters: BTreeSet<String>,
    /// The ClusterSetIP (`None` for a headless import, or when the range is full).
    pub ip: Option<Ipv4Addr>,
}

/// The imports of this node and their ClusterSetIPs, kept from one pass to the next.
#[derive(Debug, Clone)]
pub struct Imports {
    pub range: Ipv4Net,
    allocated: BTreeMap<ServiceKey, Ipv4Addr>,
    full_warned: bool,
}

impl Imports {
    #[must_use]
    pub fn new(range: Ipv4Net) -> Self {
        Self {
            range,
            allocated: BTreeMap::new(),
            full_warned: false,
        }
    }

    /// The imports for the local state `local` of cluster `me` and the remote clusters whose records may be used
    /// (`remotes`, e.g. `lb::reachable`'s answer).
    pub fn update(
        &mut self,
        me: &str,
        local: &ClusterState,
        remotes: &BTreeMap<String, RemoteCluster>,
    ) -> Vec<Import> {
        let mut imports = imports(me, local, remotes);
        let wanted: BTreeSet<ServiceKey> = imports
            .values()
            .filter(|i| !i.headless)
            .map(|i| (i.namespace.clone(), i.name.clone()))
            .collect();
        // The addresses of the cluster's ServiceImports (`spec.ips`, written by the clustermesh-apiserver; with
        // `--source kubernetes`) win over this agent's own choices, so that every node answers what the
        // ServiceImport says, also after a collision resolved in another order; one outside the range is ignored.
        let mut existing: BTreeMap<ServiceKey, Ipv4Addr> = local
            .import_ips
            .iter()
            .filter(|(k, ip)| wanted.contains(*k) && self.range.contains(*ip))
            .map(|(k, ip)| (k.clone(), *ip))
            .collect();
        let claimed: BTreeSet<Ipv4Addr> = existing.values().copied().collect();
        for (k, ip) in &self.allocated {
            if !existing.contains_key(k) && !claimed.contains(ip) {
                existing.insert(k.clone(), *ip);
            }
        }
        let (got, left) = clusterset::allocate_partial(self.range, &wanted, &existing);
        if !left.is_empty() && !self.full_warned {
            warn!(range = %self.range, unallocated = left.len(), "the clusterset range is full: some imports get no ClusterSetIP");
        }
        self.full_warned = !left.is_empty();
        for (k, i) in &mut imports {
            i.ip = got.get(k).copied();
        }
        self.allocated = got;
        imports.into_values().collect()
    }

    /// The ClusterSetIP the last [`Imports::update`] gave `key`.
    #[must_use]
    pub fn ip_of(&self, key: &ServiceKey) -> Option<Ipv4Addr> {
        self.allocated.get(key).copied()
    }
}

fn dns_ports(ports: impl Iterator<Item = (String, u16, mesh_model::Protocol)>) -> Vec<DnsPort> {
    let mut v: Vec<DnsPort> = ports
        .map(|(name, port, protocol)| DnsPort { name, port, protocol })
        .collect();
    v.sort();
    v
}

fn record_ports(rec: &ServiceRecord) -> Vec<DnsPort> {
    dns_ports(rec.ports.iter().map(|p| (p.name.clone(), p.port, p.protocol)))
}

/// Every imported service, without addresses.
fn imports(
    me: &str,
    local: &ClusterState,
    remotes: &BTreeMap<String, RemoteCluster>,
) -> BTreeMap<ServiceKey, Import> {
    let mut keys: BTreeSet<ServiceKey> = local
        .exports
        .iter()
        .filter(|k| local.services.contains_key(*k))
        .cloned()
        .collect();
    for (_, rc) in remotes.iter().filter(|(n, rc)| n.as_str() != me && rc.usable) {
        keys.extend(
            rc.services
                .values()
                .filter(|r| r.mcs.is_some())
                .map(|r| (r.namespace.clone(), r.name.clone())),
        );
    }
    keys.into_iter()
        .filter_map(|k| import_of(me, local, remotes, &k).map(|i| (k, i)))
        .collect()
}

/// The import of one service (without its address): `None` when no cluster exports it.
#[must_use]
pub fn import_of(
    me: &str,
    local: &ClusterState,
    remotes: &BTreeMap<String, RemoteCluster>,
    key: &ServiceKey,
) -> Option<Import> {
    let mut out = local
        .services
        .get(key)
        .filter(|_| local.exports.contains(key))
        .map(|svc| Import {
            namespace: key.0.clone(),
            name: key.1.clone(),
            headless: svc.cluster_ipv4.is_none(),
            ports: dns_ports(
                svc.ports
                    .iter()
                    .map(|p| (p.name.clone().unwrap_or_default(), p.port, p.protocol)),
            ),
            clusters: [me.to_owned()].into(),
            ip: None,
        });
    let id = format!("{}/{}", key.0, key.1);
    for (cname, rc) in remotes.iter().filter(|(n, rc)| n.as_str() != me && rc.usable) {
        let Some(rec) = rc.services.get(&id) else { continue };
        let Some(mcs) = &rec.mcs else { continue };
        out.get_or_insert_with(|| Import {
            namespace: rec.namespace.clone(),
            name: rec.name.clone(),
            headless: mcs.headless,
            ports: record_ports(rec),
            clusters: BTreeSet::new(),
            ip: None,
        })
        .clusters
        .insert(cname.clone());
    }
    out
}

/// The local state with a synthetic global service for every ClusterSetIP import that has an address (see the
/// module's documentation). `imports` without one change nothing.
#[must_use]
pub fn with_imports(local: &ClusterState, imports: &[Import]) -> ClusterState {
    let mut st = local.clone();
    for i in imports {
        let Some(ip) = i.ip else { continue };
        let key = (i.namespace.clone(), i.name.clone());
        let own = local.services.get(&key).filter(|_| local.exports.contains(&key));
        let svc = Service {
            namespace: i.namespace.clone(),
            name: i.name.clone(),
            cluster_ipv4: Some(ip),
            selector: own.map(|s| s.selector.clone()).unwrap_or_default(),
            ports: i
                .ports
                .iter()
                .map(|p| ServicePort {
                    name: (!p.name.is_empty()).then(|| p.name.clone()),
                    port: p.port,
                    protocol: p.protocol,
                    // This cluster's target port for the same port name, when it exports the service too.
                    target_port: own.and_then(|s| {
                        s.ports
                            .iter()
                            .find(|sp| {
                                sp.name.as_deref().unwrap_or_default() == p.name && sp.protocol == p.protocol
                            })
                            .and_then(|sp| sp.target_port.clone())
                    }),
                })
                .collect(),
            annotations: own.map(|s| s.annotations.clone()).unwrap_or_default(),
        };
        st.services.insert(
            (i.namespace.clone(), format!("{}{IMPORT_KEY_SUFFIX}", i.name)),
            svc,
        );
        st.exports.insert(key);
    }
    st
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::remote::SyncState;
    use mesh_kvstore::{BackendRecord, McsRecord, PortRecord};
    use mesh_model::Protocol;
    use std::sync::Arc;

    pub(crate) fn remote(name: &str, id: u16, recs: Vec<ServiceRecord>) -> RemoteCluster {
        let mut rc = RemoteCluster::new(name);
        rc.usable = true;
        rc.cluster_id = Some(id);
        rc.state = SyncState::Synced { since_ms: 0 };
        rc.services = recs
            .into_iter()
            .map(|r| (format!("{}/{}", r.namespace, r.name), Arc::new(r)))
            .collect();
        rc
    }

    pub(crate) fn record(
        cluster: &str,
        name: &str,
        mcs: Option<McsRecord>,
        backends: &[[u8; 4]],
    ) -> ServiceRecord {
        let port = PortRecord {
            name: "http".into(),
            port: 80,
            protocol: Protocol::Tcp,
        };
        ServiceRecord {
            cluster: cluster.into(),
            cluster_id: 2,
            namespace: "demo".into(),
            name: name.into(),
            ports: vec![port.clone()],
            backends: backends
                .iter()
                .map(|b| BackendRecord {
                    ipv4: Ipv4Addr::from(*b),
                    ports: vec![PortRecord {
                        port: 8080,
                        ..port.clone()
                    }]
                    .into(),
                    weight: 1,
                })
                .collect(),
            mcs,
        }
    }

    /// With `--source kubernetes` the ServiceImports' `spec.ips` win over the agent's own choices (also one that
    /// another import holds here); an address outside the range is ignored.
    #[test]
    fn service_import_addresses_win() {
        let remotes: BTreeMap<String, RemoteCluster> = [(
            "west".to_owned(),
            remote(
                "west",
                2,
                vec![
                    record("west", "api", Some(McsRecord::default()), &[[10, 2, 0, 5]]),
                    record("west", "web", Some(McsRecord::default()), &[[10, 2, 0, 6]]),
                ],
            ),
        )]
        .into();
        let mut local = ClusterState::default();
        let mut imports = Imports::new("198.19.0.0/16".parse().unwrap());
        let ip = |got: &[Import], name: &str| got.iter().find(|i| i.name == name).and_then(|i| i.ip);
        let got = imports.update("east", &local, &remotes);
        let api0 = ip(&got, "api").unwrap();
        assert!(ip(&got, "web").is_some());
        // The ServiceImport of web says api's address; api's says another one.
        let other = Ipv4Addr::new(198, 19, 200, 1);
        local.import_ips.insert(("demo".into(), "web".into()), api0);
        local.import_ips.insert(("demo".into(), "api".into()), other);
        let got = imports.update("east", &local, &remotes);
        assert_eq!((ip(&got, "api"), ip(&got, "web")), (Some(other), Some(api0)));
        // Out of the range: ignored, the agent's choice stays.
        local
            .import_ips
            .insert(("demo".into(), "api".into()), Ipv4Addr::new(10, 0, 0, 1));
        let got = imports.update("east", &local, &remotes);
        assert_eq!(ip(&got, "web"), Some(api0));
        let api = ip(&got, "api").unwrap();
        assert!(imports.range.contains(&api) && api != api0, "{api}");
        // No ServiceImports: the agent keeps what it has.
        local.import_ips.clear();
        assert_eq!(imports.update("east", &local, &remotes), got);
    }

    #[test]
    fn remote_exports_become_synthetic_global_services() {
        let remotes: BTreeMap<String, RemoteCluster> = [(
            "west".to_owned(),
            remote(
                "west",
                2,
                vec![
                    record("west", "api", Some(McsRecord::default()), &[[10, 2, 0, 5]]),
                    // Global through an annotation, not exported: not an import.
                    record("west", "annotated", None, &[[10, 2, 0, 6]]),
                    record(
                        "west",
                        "db",
                        Some(McsRecord {
                            headless: true,
                            ..McsRecord::default()
                        }),
                        &[[10, 2, 0, 7]],
                    ),
                ],
            ),
        )]
        .into();
        let local = ClusterState::default();
        let mut imports = Imports::new("198.19.0.0/16".parse().unwrap());
        let got = imports.update("east", &local, &remotes);
        assert_eq!(got.len(), 2);
        let api = got.iter().find(|i| i.name == "api").unwrap();
        let db = got.iter().find(|i| i.name == "db").unwrap();
        assert!(api.ip.is_some_and(|ip| imports.range.contains(&ip)));
        assert_eq!(db.ip, None);
        assert_eq!(api.clusters, ["west".to_owned()].into());
        // Stable from one pass to the next.
        assert_eq!(imports.update("east", &local, &remotes), got);

        let st = with_imports(&local, &got);
        let svc = &st.services[&("demo".to_owned(), format!("api{IMPORT_KEY_SUFFIX}"))];
        assert_eq!(svc.name, "api");
        assert_eq!(svc.cluster_ipv4, api.ip);
        assert!(svc.selector.is_empty());
        assert!(st.exports.contains(&("demo".to_owned(), "api".to_owned())));
        assert_eq!(st.services.len(), 1, "headless imports need no service");

        // The global-service rules merge the remote backends under the ClusterSetIP.
        let me = crate::desired::LocalNode {
            node: "east-node-1".into(),
            cluster: "east".into(),
            cluster_id: 1,
            labels: BTreeMap::new(),
        };
        let views = crate::lb::services(
            &me,
            &st,
            None,
            &remotes,
            &crate::lb::TrafficPolicyVersions::default(),
            mesh_model::service::Affinity::None,
        );
        assert_eq!(views.len(), 1);
        let fe = &views[0].frontends[0];
        assert_eq!(Some(fe.vip), api.ip);
        assert_eq!(
            fe.active.iter().map(|b| b.ipv4).collect::<Vec<_>>(),
            vec![Ipv4Addr::new(10, 2, 0, 5)]
        );

        // The import goes when its cluster stops exporting: its address is released.
        let none: BTreeMap<String, RemoteCluster> = BTreeMap::new();
        assert!(imports.update("east", &local, &none).is_empty());
        assert!(imports.allocated.is_empty());
    }

    #[test]
    fn local_export_keeps_its_selector_and_target_ports() {
        let mut local = ClusterState::default();
        local.services.insert(
            ("demo".into(), "api".into()),
            Service {
                namespace: "demo".into(),
                name: "api".into(),
                cluster_ipv4: Some(Ipv4Addr::new(198, 18, 1, 9)),
                selector: [("app".to_owned(), "api".to_owned())].into(),
                ports: vec![ServicePort {
                    name: Some("http".into()),
                    port: 80,
                    protocol: Protocol::Tcp,
                    target_port: Some("8080".into()),
                }],
                annotations: BTreeMap::new(),
            },
        );
        local.exports.insert(("demo".into(), "api".into()));
        let mut imports = Imports::new("198.19.0.0/16".parse().unwrap());
        let got = imports.update("east", &local, &BTreeMap::new());
        assert_eq!(got.len(), 1);
        let st = with_imports(&local, &got);
        let svc = &st.services[&("demo".to_owned(), format!("api{IMPORT_KEY_SUFFIX}"))];
        assert_eq!(
            svc.selector,
            local.services[&("demo".to_owned(), "api".to_owned())].selector
        );
        assert_eq!(svc.ports[0].target_port.as_deref(), Some("8080"));
        // The local Service keeps its own ClusterIP.
        assert_eq!(
            st.services[&("demo".to_owned(), "api".to_owned())].cluster_ipv4,
            Some(Ipv4Addr::new(198, 18, 1, 9))
        );
    }
}
