//! Services across clusters: which services are global (Cilium's annotations or an MCS `ServiceExport`), and
//! which pods back a service (its endpoints), computed from the state model: from the service's EndpointSlices
//! when the cluster has any for it, else from the pods its selector matches.
//!
//! Annotations accepted, as Cilium defines them, so Cilium users move over unchanged:
//! - `service.cilium.io/global: "true"|"false"`: merge backends of same-named services in the same namespace
//!   across clusters;
//! - `service.cilium.io/shared: "true"|"false"` (default true): whether this cluster shares its backends;
//! - `service.cilium.io/affinity: local|remote|none`: which backends clients prefer; the preferred set falls back
//!   to the other when it has no ready backend. Without the annotation the reader's default applies (the agent's
//!   `--service-affinity-default`, none unless set); an annotation always wins over it.
//!
//! A `ServiceExport` of the same namespace/name makes a service global and shared, as the Kubernetes MCS API
//! (KEP-1645) does: importing clusters reach it through its ClusterSetIP and `clusterset.local` name (the agent's
//! `clusterset` and `dns` modules, docs/clusterset-dns.md), or through their own same-named service.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::state::{
    AddressType, ClusterState, EndpointSlice, Pod, Protocol, Service, ServicePort, SliceEndpoint,
};

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

/// An affinity that is not `local`, `remote` or `none`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not local, remote or none")]
pub struct InvalidAffinity(pub String);

impl FromStr for Affinity {
    type Err = InvalidAffinity;

    /// `local`, `remote` or `none` (any case, surrounding blanks ignored); empty means `none`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "local" => Ok(Self::Local),
            "remote" => Ok(Self::Remote),
            "none" | "" => Ok(Self::None),
            _ => Err(InvalidAffinity(s.to_owned())),
        }
    }
}

impl std::fmt::Display for Affinity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::None => "none",
            Self::Local => "local",
            Self::Remote => "remote",
        })
    }
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
/// exposes or hides more than the user asked for. A service without the affinity annotation gets
/// `default_affinity`.
#[must_use]
pub fn global_spec(svc: &Service, exported: bool, default_affinity: Affinity) -> GlobalSpec {
    let mut spec = GlobalSpec {
        shared: true,
        exported,
        global: exported,
        affinity: default_affinity,
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
        match v.parse() {
            Ok(affinity) => spec.affinity = affinity,
            Err(e) => spec.errors.push(format!("annotation {ANNOTATION_AFFINITY}: {e}")),
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
    /// `namespace/name` of the pod; empty for an EndpointSlice endpoint that names no pod.
    pub pod: String,
    pub ports: Vec<BackendPort>,
    /// The pod's capacity (annotation `fleetmesh.io/capacity`, 1 when absent or invalid). For a pod the state does
    /// not know, what the caller's capacity lookup says ([`endpoints_with`]), else 1.
    pub capacity: u32,
    /// The endpoint's hostname (a DNS label): the EndpointSlice endpoint's `hostname`, or for a pod matched by
    /// the selector its `spec.hostname` when its `spec.subdomain` is the service's name, as Kubernetes has it.
    pub hostname: Option<String>,
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

/// Ready endpoints of a service. When the cluster has at least one EndpointSlice for the service (label
/// `kubernetes.io/service-name`), they come from its slices ([`slice_endpoints`]); else they are the pods of its
/// namespace matching its (non-empty) selector that have an address.
#[must_use]
pub fn endpoints(state: &ClusterState, svc: &Service) -> Vec<Endpoint> {
    endpoints_with(state, svc, &|_| None)
}

/// As [`endpoints`], with `capacity_of` giving the capacity of an EndpointSlice backend whose pod the state does not
/// know, by address (`None`: unknown, 1). An agent's state holds only the pods of its node; its cluster publishes
/// the capacity of the others (`mesh_kvstore::CapacityRecord`).
#[must_use]
pub fn endpoints_with(
    state: &ClusterState,
    svc: &Service,
    capacity_of: &dyn Fn(Ipv4Addr) -> Option<u32>,
) -> Vec<Endpoint> {
    let mut slices = state.slices_of(&svc.namespace, &svc.name).peekable();
    if slices.peek().is_some() {
        return slice_endpoints(state, svc, slices, capacity_of);
    }
    selector_endpoints(state, svc)
}

/// Endpoints from the pods matching the service's selector (the path without EndpointSlices: the manifests
/// directories of the lab and of edge nodes).
fn selector_endpoints(state: &ClusterState, svc: &Service) -> Vec<Endpoint> {
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
                hostname: p
                    .hostname
                    .clone()
                    .filter(|_| p.subdomain.as_deref() == Some(svc.name.as_str())),
            })
        })
        .collect()
}

/// Endpoints of a service from its EndpointSlices, as kube-proxy picks them:
/// - IPv4 slices only, and the first address of each endpoint;
/// - an endpoint is a backend when ready (an absent condition is ready); when no (IPv4) endpoint of the service
///   is ready, the endpoints that are serving and terminating are (graceful termination);
/// - each service port maps to the slice port of the same name (empty for an unnamed port) and protocol, whose
///   number is the target port already resolved; a service port without one has no backend port there;
/// - the capacity is that of the pod the endpoint's `targetRef` names, when the state knows the pod; else what
///   `capacity_of` says for the address; else 1;
/// - an address in several slices counts once (the first slice by name).
#[must_use]
pub fn slice_endpoints<'a>(
    state: &ClusterState,
    svc: &Service,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    capacity_of: &dyn Fn(Ipv4Addr) -> Option<u32>,
) -> Vec<Endpoint> {
    let candidates: Vec<(&EndpointSlice, &SliceEndpoint, Ipv4Addr)> = slices
        .into_iter()
        .filter(|s| s.address_type == AddressType::IPv4)
        .flat_map(|s| {
            s.endpoints
                .iter()
                .filter_map(move |e| Some((s, e, e.addresses.first()?.parse().ok()?)))
        })
        .collect();
    let any_ready = candidates.iter().any(|(_, e, _)| e.conditions.is_ready());
    let mut out: BTreeMap<Ipv4Addr, Endpoint> = BTreeMap::new();
    for (slice, e, ipv4) in candidates {
        let c = &e.conditions;
        let usable = if any_ready {
            c.is_ready()
        } else {
            c.is_serving() && c.is_terminating()
        };
        if !usable || out.contains_key(&ipv4) {
            continue;
        }
        let ports = svc
            .ports
            .iter()
            .filter_map(|sp| {
                let name = sp.name.as_deref().unwrap_or_default();
                let p = slice
                    .ports
                    .iter()
                    .find(|p| p.name == name && p.protocol == sp.protocol)?;
                Some(BackendPort {
                    name: name.to_owned(),
                    port: p.port?,
                    protocol: sp.protocol,
                })
            })
            .collect();
        let pod = e
            .pod
            .as_ref()
            .and_then(|r| state.pods.get(&(r.namespace.clone(), r.name.clone())));
        out.insert(
            ipv4,
            Endpoint {
                ipv4,
                pod: e
                    .pod
                    .as_ref()
                    .map(|r| format!("{}/{}", r.namespace, r.name))
                    .unwrap_or_default(),
                ports,
                capacity: match pod {
                    Some(p) => crate::traffic::capacity(&p.annotations).unwrap_or(1),
                    None => capacity_of(ipv4).unwrap_or(1),
                },
                hostname: e.hostname.clone(),
            },
        );
    }
    out.into_values().collect()
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
            global_spec(&svc(&[]), false, Affinity::None),
            GlobalSpec {
                shared: true,
                ..GlobalSpec::default()
            }
        );
        let g = global_spec(
            &svc(&[(ANNOTATION_GLOBAL, "true"), (ANNOTATION_AFFINITY, "local")]),
            false,
            Affinity::None,
        );
        assert!(g.global && g.shared && g.affinity == Affinity::Local && g.errors.is_empty());
        let g = global_spec(
            &svc(&[(ANNOTATION_GLOBAL, "True"), (ANNOTATION_SHARED, "false")]),
            false,
            Affinity::None,
        );
        assert!(g.global && !g.shared);
        let g = global_spec(&svc(&[]), true, Affinity::None);
        assert!(g.global && g.shared && g.exported);
    }

    #[test]
    fn the_default_affinity_applies_only_without_the_annotation() {
        let global = (ANNOTATION_GLOBAL, "true");
        for default in [Affinity::None, Affinity::Local, Affinity::Remote] {
            assert_eq!(
                global_spec(&svc(&[global]), false, default).affinity,
                default,
                "no annotation"
            );
            for (v, explicit) in [
                ("none", Affinity::None),
                ("local", Affinity::Local),
                ("Remote", Affinity::Remote),
            ] {
                let g = global_spec(&svc(&[global, (ANNOTATION_AFFINITY, v)]), false, default);
                assert_eq!(g.affinity, explicit, "annotation {v} with default {default}");
                assert!(g.global && g.errors.is_empty());
            }
            let g = global_spec(&svc(&[global, (ANNOTATION_AFFINITY, "nearest")]), false, default);
            assert!(!g.global, "an invalid annotation keeps the service local");
            assert_eq!(
                g.errors,
                [format!(
                    "annotation {ANNOTATION_AFFINITY}: \"nearest\" is not local, remote or none"
                )]
            );
        }
    }

    #[test]
    fn affinity_parses_its_three_values_and_names_a_bad_one() {
        assert_eq!(" LOCAL ".parse(), Ok(Affinity::Local));
        assert_eq!("remote".parse(), Ok(Affinity::Remote));
        assert_eq!("none".parse(), Ok(Affinity::None));
        assert_eq!("".parse(), Ok(Affinity::None));
        let e = "closest".parse::<Affinity>().expect_err("closest");
        assert_eq!(e.to_string(), "\"closest\" is not local, remote or none");
        for a in [Affinity::None, Affinity::Local, Affinity::Remote] {
            assert_eq!(a.to_string().parse(), Ok(a));
        }
    }

    #[test]
    fn invalid_annotations_keep_the_service_local() {
        for (k, v) in [
            (ANNOTATION_GLOBAL, "yes"),
            (ANNOTATION_SHARED, "1"),
            (ANNOTATION_AFFINITY, "nearest"),
        ] {
            let g = global_spec(
                &svc(&[(ANNOTATION_GLOBAL, "true"), (k, v)]),
                false,
                Affinity::None,
            );
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
            hostname: None,
            subdomain: None,
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
    use crate::state::{EndpointConditions, EndpointSlicePort, PodRef};

    fn cond(ready: Option<bool>, serving: Option<bool>, terminating: Option<bool>) -> EndpointConditions {
        EndpointConditions {
            ready,
            serving,
            terminating,
        }
    }

    fn ep(ip: &str, conditions: EndpointConditions, pod: Option<&str>) -> SliceEndpoint {
        SliceEndpoint {
            addresses: vec![ip.to_owned()],
            conditions,
            node_name: None,
            pod: pod.map(|name| PodRef {
                namespace: "shop".into(),
                name: name.into(),
            }),
            zone: None,
            hostname: None,
        }
    }

    fn slice_port(name: &str, port: Option<u16>, protocol: Protocol) -> EndpointSlicePort {
        EndpointSlicePort {
            name: name.into(),
            port,
            protocol,
        }
    }

    /// A slice of service `shop/<service>` with the ports of [`svc`] (http -> 8080/TCP, dns -> 5353/UDP).
    fn slice(name: &str, service: &str, endpoints: Vec<SliceEndpoint>) -> EndpointSlice {
        EndpointSlice {
            namespace: "shop".into(),
            name: name.into(),
            service: Some(service.into()),
            address_type: AddressType::IPv4,
            ports: vec![
                slice_port("http", Some(8080), Protocol::Tcp),
                slice_port("dns", Some(5353), Protocol::Udp),
            ],
            endpoints,
        }
    }

    fn with_slices(slices: Vec<EndpointSlice>) -> ClusterState {
        let mut st = ClusterState::default();
        for s in slices {
            st.endpoint_slices
                .insert((s.namespace.clone(), s.name.clone()), s);
        }
        st
    }

    fn ips(eps: &[Endpoint]) -> Vec<String> {
        eps.iter().map(|e| e.ipv4.to_string()).collect()
    }

    fn api_pod(name: &str, ip: [u8; 4], annotations: &[(&str, &str)]) -> Pod {
        Pod {
            namespace: "shop".into(),
            name: name.into(),
            labels: [("app".to_owned(), "api".to_owned())].into(),
            annotations: annotations
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            node_name: None,
            ipv4: Some(Ipv4Addr::from(ip)),
            ports: vec![ContainerPort {
                name: Some("web".into()),
                port: 8080,
                protocol: Protocol::Tcp,
            }],
            hostname: None,
            subdomain: None,
        }
    }

    const OPTIONS: [Option<bool>; 3] = [None, Some(true), Some(false)];

    /// Every combination of the three conditions, alone and beside a ready endpoint: ready (absent = ready) is a
    /// backend; not ready is one only when nothing is ready and it is serving (absent = serving) and terminating
    /// (absent = not terminating).
    #[test]
    fn slice_conditions_every_combination() {
        for ready in OPTIONS {
            for serving in OPTIONS {
                for terminating in OPTIONS {
                    let c = cond(ready, serving, terminating);
                    let is_ready = ready != Some(false);
                    let fallback = serving != Some(false) && terminating == Some(true);
                    let alone = with_slices(vec![slice("api-1", "api", vec![ep("10.1.0.2", c, None)])]);
                    assert_eq!(
                        endpoints(&alone, &svc(&[])).len(),
                        usize::from(is_ready || fallback),
                        "alone: {c:?}"
                    );
                    let beside_ready = with_slices(vec![slice(
                        "api-1",
                        "api",
                        vec![
                            ep("10.1.0.2", c, None),
                            ep("10.1.0.9", cond(Some(true), None, None), None),
                        ],
                    )]);
                    let got = ips(&endpoints(&beside_ready, &svc(&[])));
                    let want: Vec<&str> = if is_ready {
                        vec!["10.1.0.2", "10.1.0.9"]
                    } else {
                        vec!["10.1.0.9"]
                    };
                    assert_eq!(got, want, "beside a ready endpoint: {c:?}");
                }
            }
        }
    }

    /// While any endpoint of the service is ready (in any of its slices), terminating ones are not used; when
    /// none is, the serving terminating ones are, and not the ones that stopped serving.
    #[test]
    fn terminating_endpoints_are_a_fallback_across_slices() {
        let terminating = cond(Some(false), Some(true), Some(true));
        let stopped = cond(Some(false), Some(false), Some(true));
        let not_ready = cond(Some(false), Some(false), Some(false));
        let mut st = with_slices(vec![
            slice(
                "api-1",
                "api",
                vec![ep("10.1.0.2", terminating, None), ep("10.1.0.3", stopped, None)],
            ),
            slice(
                "api-2",
                "api",
                vec![ep("10.1.0.4", not_ready, None), ep("10.1.0.5", terminating, None)],
            ),
        ]);
        assert_eq!(ips(&endpoints(&st, &svc(&[]))), ["10.1.0.2", "10.1.0.5"]);
        st.endpoint_slices
            .get_mut(&("shop".to_owned(), "api-2".to_owned()))
            .expect("slice")
            .endpoints[0]
            .conditions = cond(Some(true), Some(true), Some(false));
        assert_eq!(ips(&endpoints(&st, &svc(&[]))), ["10.1.0.4"]);
    }

    /// Slices replace the selector for their service only (by the service-name label, in the service's
    /// namespace); without one the selector still decides.
    #[test]
    fn slices_replace_the_selector_of_their_service_only() {
        let mut st = ClusterState::default();
        for p in [api_pod("a", [10, 1, 0, 2], &[]), api_pod("b", [10, 1, 0, 3], &[])] {
            st.pods.insert((p.namespace.clone(), p.name.clone()), p);
        }
        assert_eq!(ips(&endpoints(&st, &svc(&[]))), ["10.1.0.2", "10.1.0.3"]);
        let mut other_ns = slice("api-x", "api", vec![ep("10.9.0.1", cond(None, None, None), None)]);
        other_ns.namespace = "prod".into();
        let mut unlabelled = slice("api-y", "api", vec![ep("10.9.0.2", cond(None, None, None), None)]);
        unlabelled.service = None;
        for s in [
            other_ns,
            unlabelled,
            slice("web-1", "web", vec![ep("10.9.0.3", cond(None, None, None), None)]),
        ] {
            st.endpoint_slices
                .insert((s.namespace.clone(), s.name.clone()), s);
        }
        assert_eq!(
            ips(&endpoints(&st, &svc(&[]))),
            ["10.1.0.2", "10.1.0.3"],
            "no slice of shop/api: the selector"
        );
        let s = slice(
            "api-1",
            "api",
            vec![ep("10.1.0.3", cond(Some(false), None, None), Some("b"))],
        );
        st.endpoint_slices.insert(("shop".into(), "api-1".into()), s);
        assert!(
            endpoints(&st, &svc(&[])).is_empty(),
            "a slice exists: its (not ready) endpoint decides, not the selector"
        );
        // Also for a service without a selector (endpoints managed by hand).
        let mut no_selector = svc(&[]);
        no_selector.selector.clear();
        st.endpoint_slices
            .get_mut(&("shop".to_owned(), "api-1".to_owned()))
            .expect("slice")
            .endpoints[0]
            .conditions = cond(None, None, None);
        assert_eq!(ips(&endpoints(&st, &no_selector)), ["10.1.0.3"]);
    }

    /// Service ports map to slice ports by name and protocol; unnamed to unnamed; a port the slice lacks, or
    /// gives no number, is missing from the backend.
    #[test]
    fn slice_ports_match_service_ports_by_name() {
        let mut s = slice("api-1", "api", vec![ep("10.1.0.2", cond(None, None, None), None)]);
        s.ports = vec![
            slice_port("metrics", Some(9090), Protocol::Tcp),
            slice_port("http", Some(8081), Protocol::Tcp),
            slice_port("dns", Some(5353), Protocol::Tcp),
        ];
        let st = with_slices(vec![s.clone()]);
        let eps = endpoints(&st, &svc(&[]));
        assert_eq!(
            eps[0].ports,
            [BackendPort {
                name: "http".into(),
                port: 8081,
                protocol: Protocol::Tcp
            }],
            "dns is UDP in the service: the TCP slice port of that name is not it"
        );
        s.ports = vec![
            slice_port("http", None, Protocol::Tcp),
            slice_port("dns", Some(5353), Protocol::Udp),
        ];
        let eps = endpoints(&with_slices(vec![s.clone()]), &svc(&[]));
        assert_eq!(
            eps[0].ports,
            [BackendPort {
                name: "dns".into(),
                port: 5353,
                protocol: Protocol::Udp
            }],
            "a slice port without a number gives no backend port"
        );
        let mut unnamed = svc(&[]);
        unnamed.ports = vec![ServicePort {
            name: None,
            port: 80,
            protocol: Protocol::Tcp,
            target_port: Some("web".into()),
        }];
        s.ports = vec![slice_port("", Some(8080), Protocol::Tcp)];
        let eps = endpoints(&with_slices(vec![s]), &unnamed);
        assert_eq!(
            eps[0].ports,
            [BackendPort {
                name: String::new(),
                port: 8080,
                protocol: Protocol::Tcp
            }]
        );
    }

    /// Only IPv4 slices count; an address in two slices is one backend, with the ports of the first slice.
    #[test]
    fn slices_ipv4_only_and_addresses_once() {
        let mut v6 = slice("api-v6", "api", vec![ep("fd00::2", cond(None, None, None), None)]);
        v6.address_type = AddressType::IPv6;
        let mut fqdn = slice(
            "api-dns",
            "api",
            vec![ep("api.example", cond(None, None, None), None)],
        );
        fqdn.address_type = AddressType::Fqdn;
        let mut second = slice("api-2", "api", vec![ep("10.1.0.2", cond(None, None, None), None)]);
        second.ports = vec![slice_port("http", Some(9999), Protocol::Tcp)];
        let st = with_slices(vec![
            v6,
            fqdn,
            slice("api-1", "api", vec![ep("10.1.0.2", cond(None, None, None), None)]),
            second,
        ]);
        let eps = endpoints(&st, &svc(&[]));
        assert_eq!(ips(&eps), ["10.1.0.2"]);
        assert_eq!(eps[0].ports[0].port, 8080, "from api-1, the first by name");
        assert_eq!(eps[0].ports.len(), 2);
        let only_v6 = with_slices(vec![{
            let mut s = slice("api-v6", "api", vec![ep("fd00::2", cond(None, None, None), None)]);
            s.address_type = AddressType::IPv6;
            s
        }]);
        assert!(endpoints(&only_v6, &svc(&[])).is_empty());
    }

    /// The capacity comes from the pod a slice endpoint names, when known; else 1.
    #[test]
    fn slice_endpoints_take_the_capacity_of_their_pod() {
        let mut st = with_slices(vec![slice(
            "api-1",
            "api",
            vec![
                ep("10.1.0.2", cond(None, None, None), Some("a")),
                ep("10.1.0.3", cond(None, None, None), Some("gone")),
                ep("10.1.0.4", cond(None, None, None), None),
            ],
        )]);
        let a = api_pod("a", [10, 1, 0, 2], &[(crate::traffic::ANNOTATION_CAPACITY, "4")]);
        st.pods.insert(("shop".into(), "a".into()), a);
        let eps = endpoints(&st, &svc(&[]));
        let got: Vec<(&str, u32)> = eps.iter().map(|e| (e.pod.as_str(), e.capacity)).collect();
        assert_eq!(got, [("shop/a", 4), ("shop/gone", 1), ("", 1)]);
    }

    /// A slice endpoint whose pod the state does not know (an agent sees the pods of its node only) takes the
    /// capacity the caller knows for its address; a known pod's own annotation wins; unknown everywhere is 1.
    #[test]
    fn slice_endpoints_of_unknown_pods_take_the_capacity_looked_up_by_address() {
        let mut st = with_slices(vec![slice(
            "api-1",
            "api",
            vec![
                ep("10.1.0.2", cond(None, None, None), Some("a")),
                ep("10.1.0.3", cond(None, None, None), Some("elsewhere")),
                ep("10.1.0.4", cond(None, None, None), None),
                ep("10.1.0.5", cond(None, None, None), Some("plain")),
            ],
        )]);
        let a = api_pod("a", [10, 1, 0, 2], &[(crate::traffic::ANNOTATION_CAPACITY, "4")]);
        st.pods.insert(("shop".into(), "a".into()), a);
        let published: BTreeMap<Ipv4Addr, u32> = [
            (Ipv4Addr::new(10, 1, 0, 2), 9),
            (Ipv4Addr::new(10, 1, 0, 3), 7),
            (Ipv4Addr::new(10, 1, 0, 4), 3),
        ]
        .into();
        let eps = endpoints_with(&st, &svc(&[]), &|ip| published.get(&ip).copied());
        let got: Vec<(&str, u32)> = eps.iter().map(|e| (e.pod.as_str(), e.capacity)).collect();
        assert_eq!(
            got,
            [("shop/a", 4), ("shop/elsewhere", 7), ("", 3), ("shop/plain", 1)]
        );
    }
}
