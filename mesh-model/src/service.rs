//! Services across clusters: which services are global (Cilium's annotations or an MCS `ServiceExport`), and
//! which pods back a service (its endpoints), computed from the state model.
//!
//! Annotations accepted, as Cilium defines them, so Cilium users move over unchanged:
//! - `service.cilium.io/global: "true"|"false"`: merge backends of same-named services in the same namespace
//!   across clusters;
//! - `service.cilium.io/shared: "true"|"false"` (default true): whether this cluster shares its backends;
//! - `service.cilium.io/affinity: local|remote|none` (default none): which backends clients prefer; the
//!   preferred set falls back to the other when it has no ready backend.
//!
//! A `ServiceExport` of the same namespace/name makes a service global and shared, as the Kubernetes MCS API
//! (KEP-1645) does: importing clusters reach it through their own same-named service (`clusterset` DNS names map
//! onto that service; DNS itself comes later).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::state::{ClusterState, Pod, Protocol, Service, ServicePort};

pub const ANNOTATION_GLOBAL: &str = "service.cilium.io/global";
pub const ANNOTATION_SHARED: &str = "service.cilium.io/shared";
pub const ANNOTATION_AFFINITY: &str = "service.cilium.io/affinity";

/// Which backends a global service's clients prefer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Affinity {
    #[default]
    None,
    Local,
    Remote,
}

/// How a service takes part in the mesh.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GlobalSpec {
    pub global: bool,
    pub shared: bool,
    pub affinity: Affinity,
    /// Set when exported through an MCS `ServiceExport`.
    pub exported: bool,
    /// Invalid annotation values; with any of them the service stays a local service.
    pub errors: Vec<String>,
}

fn parse_bool(v: &str) -> Option<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "true" => Some(true),
        "false" => Some(false),
        _ => None,
    }
}

/// Reads a service's mesh settings. Invalid values are reported and make the service local, so a typo never
/// exposes or hides more than the user asked for.
#[must_use]
pub fn global_spec(svc: &Service, exported: bool) -> GlobalSpec {
    let mut spec = GlobalSpec {
        shared: true,
        exported,
        global: exported,
        ..GlobalSpec::default()
    };
    let a = &svc.annotations;
    if let Some(v) = a.get(ANNOTATION_GLOBAL) {
        match parse_bool(v) {
            Some(b) => spec.global |= b,
            None => spec.errors.push(format!(
                "annotation {ANNOTATION_GLOBAL}: {v:?} is not \"true\" or \"false\""
            )),
        }
    }
    if let Some(v) = a.get(ANNOTATION_SHARED) {
        match parse_bool(v) {
            Some(b) => spec.shared = b,
            None => spec.errors.push(format!(
                "annotation {ANNOTATION_SHARED}: {v:?} is not \"true\" or \"false\""
            )),
        }
    }
    if let Some(v) = a.get(ANNOTATION_AFFINITY) {
        match v.trim().to_ascii_lowercase().as_str() {
            "local" => spec.affinity = Affinity::Local,
            "remote" => spec.affinity = Affinity::Remote,
            "none" | "" => spec.affinity = Affinity::None,
            _ => spec.errors.push(format!(
                "annotation {ANNOTATION_AFFINITY}: {v:?} is not local, remote or none"
            )),
        }
    }
    if !spec.errors.is_empty() {
        spec.global = false;
    }
    spec
}

/// A backend port: the service port's name (empty for an unnamed port), the pod port it maps to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BackendPort {
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
}

/// A pod backing a service, with the pod port for each service port.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    pub ipv4: Ipv4Addr,
    pub pod: String,
    pub ports: Vec<BackendPort>,
    /// The pod's capacity (annotation `fleetmesh.io/capacity`, 1 when absent or invalid).
    pub capacity: u32,
}

fn labels_match(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The pod port a service port targets on `pod` (numeric target, a named container port, or the port itself).
#[must_use]
pub fn target_port(sp: &ServicePort, pod: &Pod) -> Option<u16> {
    match sp.target_port.as_deref() {
        None => Some(sp.port),
        Some(t) => match t.parse::<u16>() {
            Ok(n) => Some(n),
            Err(_) => pod
                .ports
                .iter()
                .find(|p| p.name.as_deref() == Some(t) && p.protocol == sp.protocol)
                .map(|p| p.port),
        },
    }
}

/// Ready endpoints of a service: pods of its namespace matching its (non-empty) selector that have an address.
#[must_use]
pub fn endpoints(state: &ClusterState, svc: &Service) -> Vec<Endpoint> {
    if svc.selector.is_empty() {
        return Vec::new();
    }
    state
        .pods
        .values()
        .filter(|p| p.namespace == svc.namespace && labels_match(&svc.selector, &p.labels))
        .filter_map(|p| {
            let ipv4 = p.ipv4?;
            let ports = svc
                .ports
                .iter()
                .filter_map(|sp| {
                    Some(BackendPort {
                        name: sp.name.clone().unwrap_or_default(),
                        port: target_port(sp, p)?,
                        protocol: sp.protocol,
                    })
                })
                .collect();
            Some(Endpoint {
                ipv4,
                pod: format!("{}/{}", p.namespace, p.name),
                ports,
                capacity: crate::traffic::capacity(&p.annotations).unwrap_or(1),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::ContainerPort;

    fn svc(annotations: &[(&str, &str)]) -> Service {
        Service {
            namespace: "shop".into(),
            name: "api".into(),
            cluster_ipv4: Some(Ipv4Addr::new(198, 18, 1, 2)),
            selector: [("app".to_owned(), "api".to_owned())].into(),
            ports: vec![
                ServicePort {
                    name: Some("http".into()),
                    port: 80,
                    protocol: Protocol::Tcp,
                    target_port: Some("web".into()),
                },
                ServicePort {
                    name: Some("dns".into()),
                    port: 53,
                    protocol: Protocol::Udp,
                    target_port: Some("5353".into()),
                },
            ],
            annotations: annotations
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        }
    }

    #[test]
    fn annotations_and_export() {
        assert_eq!(
            global_spec(&svc(&[]), false),
            GlobalSpec {
                shared: true,
                ..GlobalSpec::default()
            }
        );
        let g = global_spec(
            &svc(&[(ANNOTATION_GLOBAL, "true"), (ANNOTATION_AFFINITY, "local")]),
            false,
        );
        assert!(g.global && g.shared && g.affinity == Affinity::Local && g.errors.is_empty());
        let g = global_spec(
            &svc(&[(ANNOTATION_GLOBAL, "True"), (ANNOTATION_SHARED, "false")]),
            false,
        );
        assert!(g.global && !g.shared);
        let g = global_spec(&svc(&[]), true);
        assert!(g.global && g.shared && g.exported);
    }

    #[test]
    fn invalid_annotations_keep_the_service_local() {
        for (k, v) in [
            (ANNOTATION_GLOBAL, "yes"),
            (ANNOTATION_SHARED, "1"),
            (ANNOTATION_AFFINITY, "nearest"),
        ] {
            let g = global_spec(&svc(&[(ANNOTATION_GLOBAL, "true"), (k, v)]), false);
            assert!(!g.global, "{k}={v}");
            assert_eq!(g.errors.len(), 1, "{k}={v}: {:?}", g.errors);
            assert!(g.errors[0].contains(k) && g.errors[0].contains(v));
        }
    }

    #[test]
    fn endpoints_follow_selector_namespace_and_named_ports() {
        let mut st = ClusterState::default();
        let mk = |ns: &str, name: &str, app: &str, ip: Option<[u8; 4]>| Pod {
            namespace: ns.into(),
            name: name.into(),
            labels: [("app".to_owned(), app.to_owned())].into(),
            annotations: BTreeMap::new(),
            node_name: None,
            ipv4: ip.map(Ipv4Addr::from),
            ports: vec![ContainerPort {
                name: Some("web".into()),
                port: 8080,
                protocol: Protocol::Tcp,
            }],
        };
        for p in [
            mk("shop", "a", "api", Some([10, 1, 0, 2])),
            mk("shop", "b", "other", Some([10, 1, 0, 3])),
            mk("prod", "c", "api", Some([10, 1, 0, 4])),
            mk("shop", "d", "api", None),
        ] {
            st.pods.insert((p.namespace.clone(), p.name.clone()), p);
        }
        let eps = endpoints(&st, &svc(&[]));
        assert_eq!(eps.len(), 1);
        assert_eq!(eps[0].pod, "shop/a");
        assert_eq!(
            eps[0].ports,
            vec![
                BackendPort {
                    name: "http".into(),
                    port: 8080,
                    protocol: Protocol::Tcp
                },
                BackendPort {
                    name: "dns".into(),
                    port: 5353,
                    protocol: Protocol::Udp
                },
            ]
        );
    }
}
