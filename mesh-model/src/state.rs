//! The cluster state model: what one cluster consists of, as plain data.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::policy::{Policy, PolicyKind};

/// Annotation with the name of the host side of a pod's veth, written by whatever wires the pod (the lab, a CNI
/// plugin). The agent attaches its program there and delivers the pod's traffic through it.
pub const ANNOTATION_HOST_IFNAME: &str = "fleetmesh.io/host-ifname";

/// L4 protocol of a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// Parses Kubernetes' protocol field (`TCP` when absent).
    ///
    /// # Errors
    /// For anything but TCP or UDP (SCTP is not supported yet).
    pub fn parse(s: Option<&str>) -> Result<Self, String> {
        match s {
            None | Some("TCP") => Ok(Self::Tcp),
            Some("UDP") => Ok(Self::Udp),
            Some(other) => Err(format!("protocol {other:?} is not supported (TCP or UDP)")),
        }
    }
}

/// A node of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub name: String,
    /// Address on the underlay that other nodes tunnel to.
    pub underlay_ipv4: Ipv4Addr,
    /// The slice of the cluster's pod CIDR whose pods live on this node.
    pub pod_cidr: Ipv4Net,
    /// The node's WireGuard endpoint (its Node annotations), when its agent encrypts.
    #[serde(default)]
    pub wireguard: Option<crate::wireguard::WireguardEndpoint>,
}

/// A namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Namespace {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

/// A container port of a pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerPort {
    pub name: Option<String>,
    pub port: u16,
    pub protocol: Protocol,
}

/// A pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub node_name: Option<String>,
    pub ipv4: Option<Ipv4Addr>,
    pub ports: Vec<ContainerPort>,
    /// `spec.hostname` (a DNS label): with `spec.subdomain` naming a headless service, the pod's name under it
    /// (`<hostname>.<clusterid>.<svc>.<ns>.svc.clusterset.local`).
    #[serde(default)]
    pub hostname: Option<String>,
    /// `spec.subdomain` (a DNS label): the headless service the hostname is published under.
    #[serde(default)]
    pub subdomain: Option<String>,
}

impl Pod {
    /// The host-side interface of this pod's veth, if the pod is wired.
    #[must_use]
    pub fn host_ifname(&self) -> Option<&str> {
        self.annotations.get(ANNOTATION_HOST_IFNAME).map(String::as_str)
    }
}

/// A service port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicePort {
    pub name: Option<String>,
    pub port: u16,
    pub protocol: Protocol,
    /// Target port: a number or a container port name.
    pub target_port: Option<String>,
}

/// A service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    pub cluster_ipv4: Option<Ipv4Addr>,
    pub selector: BTreeMap<String, String>,
    pub ports: Vec<ServicePort>,
    pub annotations: BTreeMap<String, String>,
}

/// Label of an EndpointSlice naming the service it belongs to (set by the EndpointSlice controller).
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";

/// The kind of addresses an EndpointSlice holds (`addressType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum AddressType {
    IPv4,
    IPv6,
    #[serde(rename = "FQDN")]
    Fqdn,
}

impl AddressType {
    /// Parses `addressType` as the API defines it.
    ///
    /// # Errors
    /// For anything but `IPv4`, `IPv6` or `FQDN`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "IPv4" => Ok(Self::IPv4),
            "IPv6" => Ok(Self::IPv6),
            "FQDN" => Ok(Self::Fqdn),
            other => Err(format!("address type {other:?} is not IPv4, IPv6 or FQDN")),
        }
    }
}

/// A port of an EndpointSlice: the service port's name (empty for an unnamed one) and the endpoints' port (the
/// service's targetPort, already resolved by whoever wrote the slice).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointSlicePort {
    pub name: String,
    /// `None`: the slice says "all ports" (possible only for a service without a selector); no backend port.
    pub port: Option<u16>,
    pub protocol: Protocol,
}

/// Conditions of an EndpointSlice endpoint, as given (`None`: absent). The API's defaults are in the methods.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointConditions {
    pub ready: Option<bool>,
    pub serving: Option<bool>,
    pub terminating: Option<bool>,
}

impl EndpointConditions {
    /// Ready to receive traffic (absent: ready, as the API says).
    #[must_use]
    pub fn is_ready(&self) -> bool {
        self.ready.unwrap_or(true)
    }

    /// Able to receive traffic, terminating or not (absent: serving).
    #[must_use]
    pub fn is_serving(&self) -> bool {
        self.serving.unwrap_or(true)
    }

    /// Terminating (absent: not terminating).
    #[must_use]
    pub fn is_terminating(&self) -> bool {
        self.terminating.unwrap_or(false)
    }
}

/// The pod an EndpointSlice endpoint stands for (its `targetRef` of kind Pod).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
}

/// One endpoint of an EndpointSlice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SliceEndpoint {
    /// At least one, each valid for the slice's address type. Consumers use the first, as kube-proxy does.
    pub addresses: Vec<String>,
    pub conditions: EndpointConditions,
    pub node_name: Option<String>,
    pub pod: Option<PodRef>,
    pub zone: Option<String>,
    /// `hostname` (a DNS label): set by the EndpointSlice controller for a pod with `spec.hostname` whose
    /// `spec.subdomain` is the service's name.
    #[serde(default)]
    pub hostname: Option<String>,
}

/// An EndpointSlice (discovery.k8s.io/v1): a part of a service's endpoints, with their readiness.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointSlice {
    pub namespace: String,
    pub name: String,
    /// The service it belongs to (label `kubernetes.io/service-name`); `None`: no service's.
    pub service: Option<String>,
    pub address_type: AddressType,
    pub ports: Vec<EndpointSlicePort>,
    pub endpoints: Vec<SliceEndpoint>,
}

/// Everything known about one cluster, keyed for deterministic iteration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    pub nodes: BTreeMap<String, Node>,
    pub namespaces: BTreeMap<String, Namespace>,
    /// Keyed by (namespace, name).
    pub pods: BTreeMap<(String, String), Pod>,
    /// Keyed by (namespace, name).
    pub services: BTreeMap<(String, String), Service>,
    /// Services exported with an MCS `ServiceExport`, (namespace, name).
    pub exports: std::collections::BTreeSet<(String, String)>,
    /// The ClusterSetIP (`spec.ips[0]`) of the MCS `ServiceImport`s fleetmesh manages (label
    /// `app.kubernetes.io/managed-by: fleetmesh`, written by the clustermesh-apiserver), by (namespace, name): the
    /// agents answer and load-balance that address (`--source kubernetes`).
    #[serde(default)]
    pub import_ips: BTreeMap<(String, String), Ipv4Addr>,
    /// `TrafficPolicy` objects, keyed by (namespace, name).
    pub traffic_policies: BTreeMap<(String, String), crate::traffic::TrafficPolicy>,
    /// `StagedRollout` objects, keyed by (namespace, name).
    pub rollouts: BTreeMap<(String, String), crate::traffic::StagedRollout>,
    /// `NetworkPolicy` and `MeshNetworkPolicy` objects (validated), keyed by (kind, namespace, name): the two
    /// kinds may use the same name.
    pub network_policies: BTreeMap<(PolicyKind, String, String), Policy>,
    /// EndpointSlices, keyed by (namespace, name). When a service has any, its backends come from them
    /// ([`crate::service::endpoints`]).
    #[serde(default)]
    pub endpoint_slices: BTreeMap<(String, String), EndpointSlice>,
}

impl ClusterState {
    /// Adds (or replaces) a network policy under its (kind, namespace, name).
    pub fn insert_network_policy(&mut self, p: Policy) {
        self.network_policies
            .insert((p.kind, p.namespace.clone(), p.name.clone()), p);
    }

    /// The EndpointSlices of service `namespace/service` (by their `kubernetes.io/service-name` label).
    pub fn slices_of<'a>(
        &'a self,
        namespace: &'a str,
        service: &'a str,
    ) -> impl Iterator<Item = &'a EndpointSlice> + 'a {
        self.endpoint_slices
            .range((namespace.to_owned(), String::new())..)
            .take_while(move |((ns, _), _)| ns == namespace)
            .map(|(_, s)| s)
            .filter(move |s| s.service.as_deref() == Some(service))
    }

    /// Pods scheduled on `node`.
    pub fn pods_on_node<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Pod> + 'a {
        self.pods
            .values()
            .filter(move |p| p.node_name.as_deref() == Some(node))
    }
}
