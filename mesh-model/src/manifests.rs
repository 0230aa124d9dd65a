//! Parsing Kubernetes manifests (multi-document YAML) into the state model, with errors that name the file,
//! the document, the object and the field.

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::api::networking::v1 as networking;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::de::DeserializeOwned;

use crate::policy::{self, MeshNetworkPolicySpec, Policy, PolicyKind};
use crate::state::{
    AddressType, ContainerPort, EndpointConditions, EndpointSlice, EndpointSlicePort, LABEL_SERVICE_NAME,
    Namespace, Node, Pod, PodRef, Protocol, Service, ServicePort, SliceEndpoint,
};
use crate::traffic::{self, StagedRollout, StagedRolloutSpec, TrafficPolicy, TrafficPolicySpec};

/// apiVersion of the Kubernetes Multi-Cluster Services API objects.
pub const MCS_API_VERSION: &str = "multicluster.x-k8s.io/v1alpha1";

/// The MCS `ServiceExport`: only its name matters (it exports the service of the same name).
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ServiceExportManifest {
    api_version: String,
    #[expect(
        dead_code,
        reason = "checked by the dispatcher, kept so the field is not refused as unknown"
    )]
    kind: String,
    metadata: ObjectMeta,
    #[serde(default)]
    #[expect(dead_code, reason = "status is written by controllers; accepted and ignored")]
    status: Option<serde_json::Value>,
}

/// A fleetmesh `TrafficPolicy` manifest.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct TrafficPolicyManifest {
    api_version: String,
    #[expect(
        dead_code,
        reason = "checked by the dispatcher, kept so the field is not refused as unknown"
    )]
    kind: String,
    metadata: ObjectMeta,
    spec: TrafficPolicySpec,
    #[serde(default)]
    #[expect(dead_code, reason = "status is written by fleetmesh; accepted and ignored")]
    status: Option<serde_json::Value>,
}

/// A fleetmesh `StagedRollout` manifest.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct StagedRolloutManifest {
    api_version: String,
    #[expect(
        dead_code,
        reason = "checked by the dispatcher, kept so the field is not refused as unknown"
    )]
    kind: String,
    metadata: ObjectMeta,
    spec: StagedRolloutSpec,
    #[serde(default)]
    #[expect(dead_code, reason = "status is written by fleetmesh; accepted and ignored")]
    status: Option<serde_json::Value>,
}

/// A fleetmesh `MeshNetworkPolicy` manifest.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct MeshNetworkPolicyManifest {
    api_version: String,
    #[expect(
        dead_code,
        reason = "checked by the dispatcher, kept so the field is not refused as unknown"
    )]
    kind: String,
    metadata: ObjectMeta,
    spec: MeshNetworkPolicySpec,
    #[serde(default)]
    #[expect(dead_code, reason = "status is written by fleetmesh; accepted and ignored")]
    status: Option<serde_json::Value>,
}

/// Namespace used when a namespaced object has none.
pub const DEFAULT_NAMESPACE: &str = "default";

/// The MCS `ServiceImport`: fleetmesh reads the ClusterSetIP of those it manages.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ServiceImportManifest {
    api_version: String,
    #[expect(
        dead_code,
        reason = "checked by the dispatcher, kept so the field is not refused as unknown"
    )]
    kind: String,
    metadata: ObjectMeta,
    #[serde(default)]
    spec: Option<serde_json::Value>,
    #[serde(default)]
    #[expect(dead_code, reason = "status is written by controllers; accepted and ignored")]
    status: Option<serde_json::Value>,
}

/// Label of the MCS objects fleetmesh writes (the clustermesh-apiserver's ServiceImports).
pub const LABEL_MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "fleetmesh");

/// One object from a manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Object {
    Node(Node),
    Namespace(Namespace),
    Pod(Pod),
    Service(Service),
    /// An MCS API `ServiceExport` (multicluster.x-k8s.io/v1alpha1): exports the same-named service.
    ServiceExport {
        namespace: String,
        name: String,
    },
    /// An MCS API `ServiceImport` (multicluster.x-k8s.io/v1alpha1); `ip` is its `spec.ips[0]` when fleetmesh
    /// manages it ([`LABEL_MANAGED_BY`]), `None` otherwise.
    ServiceImport {
        namespace: String,
        name: String,
        ip: Option<Ipv4Addr>,
    },
    /// A fleetmesh `TrafficPolicy` (fleetmesh.io/v1alpha1).
    TrafficPolicy(TrafficPolicy),
    /// A fleetmesh `StagedRollout` (fleetmesh.io/v1alpha1).
    StagedRollout(StagedRollout),
    /// A Kubernetes `NetworkPolicy` (networking.k8s.io/v1) or a fleetmesh `MeshNetworkPolicy`
    /// (fleetmesh.io/v1alpha1), told apart by [`Policy::kind`].
    NetworkPolicy(Policy),
    /// An `EndpointSlice` (discovery.k8s.io/v1): backends of the service its label names.
    EndpointSlice(EndpointSlice),
}

impl Object {
    /// `Kind namespace/name` (or `Kind name` for cluster-scoped objects).
    #[must_use]
    pub fn describe(&self) -> String {
        match self {
            Object::Node(n) => format!("Node {}", n.name),
            Object::Namespace(n) => format!("Namespace {}", n.name),
            Object::Pod(p) => format!("Pod {}/{}", p.namespace, p.name),
            Object::Service(s) => format!("Service {}/{}", s.namespace, s.name),
            Object::ServiceExport { namespace, name } => format!("ServiceExport {namespace}/{name}"),
            Object::ServiceImport { namespace, name, .. } => format!("ServiceImport {namespace}/{name}"),
            Object::TrafficPolicy(t) => format!("TrafficPolicy {}/{}", t.namespace, t.name),
            Object::StagedRollout(r) => format!("StagedRollout {}/{}", r.namespace, r.name),
            Object::NetworkPolicy(p) => p.describe(),
            Object::EndpointSlice(s) => format!("EndpointSlice {}/{}", s.namespace, s.name),
        }
    }
}

/// A manifest that could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ManifestError {
    /// The file (or other origin) of the manifest.
    pub file: String,
    /// 1-based index of the YAML document in the file; 0 for an object that did not come from a file.
    pub document: usize,
    /// `Kind namespace/name`, when known.
    pub object: Option<String>,
    /// Dotted path of the offending field, when known.
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if self.document > 0 {
            write!(f, " (document {})", self.document)?;
        }
        if let Some(o) = &self.object {
            write!(f, ", {o}")?;
        }
        if let Some(field) = &self.field {
            write!(f, ", field {field}")?;
        }
        write!(f, ": {}", self.message)
    }
}

struct Ctx<'a> {
    file: &'a str,
    /// The file's text and the line where the document starts (`None`: not from a file). Its number is found
    /// only for an error.
    document: Option<(&'a str, u64)>,
    object: Option<String>,
}

impl<'a> Ctx<'a> {
    /// Context of an object that did not come from a file.
    fn api(origin: &'a str, kind: &str, meta: &ObjectMeta, namespaced: bool) -> Self {
        let name = meta.name.as_deref().unwrap_or("<unnamed>");
        let object = if namespaced {
            format!(
                "{kind} {}/{name}",
                meta.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE)
            )
        } else {
            format!("{kind} {name}")
        };
        Self {
            file: origin,
            document: None,
            object: Some(object),
        }
    }

    fn err(&self, field: Option<&str>, message: impl Into<String>) -> ManifestError {
        ManifestError {
            file: self.file.to_owned(),
            document: self
                .document
                .map_or(0, |(text, line)| crate::yaml::document_number(text, line)),
            object: self.object.clone(),
            field: field.map(str::to_owned),
            message: message.into(),
        }
    }
}

/// Parses every document of `text`. Empty documents are skipped. The first problem fails the whole file, so a
/// caller never applies half of a broken file.
///
/// # Errors
/// Malformed YAML, unknown kinds or fields, values of the wrong type, or values the model refuses.
pub fn parse_str(file: &str, text: &str) -> Result<Vec<Object>, ManifestError> {
    let docs = crate::yaml::documents(text).map_err(|e| ManifestError {
        file: file.to_owned(),
        document: e.document,
        object: None,
        field: None,
        message: format!("malformed YAML: {e}"),
    })?;
    docs.into_iter()
        .map(|d| {
            let ctx = Ctx {
                file,
                document: Some((text, d.line)),
                object: None,
            };
            object(ctx, d.value)
        })
        .collect()
}

/// Converts one object as the API server serves it (JSON), with the same rules as a manifest. Used for the
/// kinds that are not typed in k8s-openapi (ServiceExport, TrafficPolicy, StagedRollout, MeshNetworkPolicy) and for
/// NetworkPolicy (so that unknown fields are refused); `origin` names where
/// it came from (e.g. `kubernetes`).
///
/// # Errors
/// As [`parse_str`] for one document.
pub fn from_value(origin: &str, value: &serde_json::Value) -> Result<Object, ManifestError> {
    let ctx = Ctx {
        file: origin,
        document: None,
        object: None,
    };
    object(ctx, value.clone())
}

/// Converts a Node object of the API server (or any other origin) with the manifest rules.
///
/// # Errors
/// Missing or invalid name, pod CIDR or InternalIP.
pub fn from_node(origin: &str, n: &core::Node) -> Result<Node, ManifestError> {
    node(&Ctx::api(origin, "Node", &n.metadata, false), n)
}

/// Converts a Namespace object with the manifest rules.
///
/// # Errors
/// Invalid name.
pub fn from_namespace(origin: &str, n: &core::Namespace) -> Result<Namespace, ManifestError> {
    namespace(&Ctx::api(origin, "Namespace", &n.metadata, true), n)
}

/// Converts a Pod object with the manifest rules.
///
/// # Errors
/// Invalid name, namespace, ports, pod IP or capacity annotation.
pub fn from_pod(origin: &str, p: &core::Pod) -> Result<Pod, ManifestError> {
    pod(&Ctx::api(origin, "Pod", &p.metadata, true), p)
}

/// Converts a Service object with the manifest rules.
///
/// # Errors
/// Invalid name, namespace, type, cluster IP or ports.
pub fn from_service(origin: &str, s: &core::Service) -> Result<Service, ManifestError> {
    service(&Ctx::api(origin, "Service", &s.metadata, true), s)
}

/// Converts an EndpointSlice object with the manifest rules.
///
/// # Errors
/// Invalid name, namespace, address type, addresses (for the address type), ports or protocols.
pub fn from_endpoint_slice(
    origin: &str,
    s: &discovery::EndpointSlice,
) -> Result<EndpointSlice, ManifestError> {
    endpoint_slice(&Ctx::api(origin, "EndpointSlice", &s.metadata, true), s)
}

/// Converts a typed NetworkPolicy object with the manifest rules. The typed object has lost any unknown field
/// already; to refuse those, convert the JSON with [`from_value`].
///
/// # Errors
/// Invalid name, namespace, selectors, CIDRs, ports or protocols.
pub fn from_network_policy(origin: &str, p: &networking::NetworkPolicy) -> Result<Policy, ManifestError> {
    network_policy(&Ctx::api(origin, policy::K8S_KIND, &p.metadata, true), p)
}

fn network_policy(ctx: &Ctx<'_>, p: &networking::NetworkPolicy) -> Result<Policy, ManifestError> {
    let namespace = namespace_of(ctx, &p.metadata)?;
    let name = name_of(ctx, &p.metadata)?;
    let empty = networking::NetworkPolicySpec::default();
    Policy::from_k8s(&namespace, &name, p.spec.as_ref().unwrap_or(&empty))
        .map_err(|e| ctx.err(Some(&e.field), e.message))
}

/// One document (already known not to be empty) into an object.
fn object(mut ctx: Ctx<'_>, value: serde_json::Value) -> Result<Object, ManifestError> {
    let map = value
        .as_object()
        .ok_or_else(|| ctx.err(None, "a manifest must be a mapping"))?;
    let kind = map
        .get("kind")
        .and_then(serde_json::Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let name = map
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(serde_json::Value::as_str)
        .unwrap_or("<unnamed>");
    let ns = map
        .get("metadata")
        .and_then(|m| m.get("namespace"))
        .and_then(serde_json::Value::as_str);
    let cluster_scoped = matches!(kind.as_str(), "Node" | "Namespace");
    ctx.object = Some(if cluster_scoped {
        format!("{kind} {name}")
    } else {
        format!("{kind} {}/{name}", ns.unwrap_or(DEFAULT_NAMESPACE))
    });
    let obj = match kind.as_str() {
        "Node" => Object::Node(node(&ctx, &typed::<core::Node>(&ctx, value)?)?),
        "Namespace" => Object::Namespace(namespace(&ctx, &typed::<core::Namespace>(&ctx, value)?)?),
        "Pod" => Object::Pod(pod(&ctx, &typed::<core::Pod>(&ctx, value)?)?),
        "Service" => Object::Service(service(&ctx, &typed::<core::Service>(&ctx, value)?)?),
        "ServiceExport" => {
            let e = typed::<ServiceExportManifest>(&ctx, value)?;
            if e.api_version != MCS_API_VERSION {
                return Err(ctx.err(
                    Some("apiVersion"),
                    format!(
                        "{:?}: ServiceExport is served as {MCS_API_VERSION}",
                        e.api_version
                    ),
                ));
            }
            Object::ServiceExport {
                namespace: namespace_of(&ctx, &e.metadata)?,
                name: name_of(&ctx, &e.metadata)?,
            }
        }
        "ServiceImport" => {
            let i = typed::<ServiceImportManifest>(&ctx, value)?;
            if i.api_version != MCS_API_VERSION {
                return Err(ctx.err(
                    Some("apiVersion"),
                    format!(
                        "{:?}: ServiceImport is served as {MCS_API_VERSION}",
                        i.api_version
                    ),
                ));
            }
            let ours = i
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(LABEL_MANAGED_BY.0))
                .is_some_and(|v| v == LABEL_MANAGED_BY.1);
            let ip = match i.spec.as_ref().map(|s| &s["ips"][0]) {
                Some(v) if ours && !v.is_null() => Some(
                    v.as_str()
                        .and_then(|s| s.parse::<Ipv4Addr>().ok())
                        .ok_or_else(|| ctx.err(Some("spec.ips[0]"), format!("{v} is not an IPv4 address")))?,
                ),
                _ => None,
            };
            Object::ServiceImport {
                namespace: namespace_of(&ctx, &i.metadata)?,
                name: name_of(&ctx, &i.metadata)?,
                ip,
            }
        }
        "TrafficPolicy" => {
            let t = typed::<TrafficPolicyManifest>(&ctx, value)?;
            if t.api_version != traffic::API_VERSION {
                return Err(ctx.err(
                    Some("apiVersion"),
                    format!(
                        "{:?}: TrafficPolicy is served as {}",
                        t.api_version,
                        traffic::API_VERSION
                    ),
                ));
            }
            t.spec.validate().map_err(|(field, m)| ctx.err(Some(&field), m))?;
            Object::TrafficPolicy(TrafficPolicy {
                namespace: namespace_of(&ctx, &t.metadata)?,
                name: name_of(&ctx, &t.metadata)?,
                spec: t.spec,
            })
        }
        "StagedRollout" => {
            let r = typed::<StagedRolloutManifest>(&ctx, value)?;
            if r.api_version != traffic::API_VERSION {
                return Err(ctx.err(
                    Some("apiVersion"),
                    format!(
                        "{:?}: StagedRollout is served as {}",
                        r.api_version,
                        traffic::API_VERSION
                    ),
                ));
            }
            r.spec.validate().map_err(|(field, m)| ctx.err(Some(&field), m))?;
            Object::StagedRollout(StagedRollout {
                namespace: namespace_of(&ctx, &r.metadata)?,
                name: name_of(&ctx, &r.metadata)?,
                spec: r.spec,
            })
        }
        "EndpointSlice" => Object::EndpointSlice(endpoint_slice(
            &ctx,
            &typed::<discovery::EndpointSlice>(&ctx, value)?,
        )?),
        "NetworkPolicy" => Object::NetworkPolicy(network_policy(
            &ctx,
            &typed::<networking::NetworkPolicy>(&ctx, value)?,
        )?),
        "MeshNetworkPolicy" => {
            let m = typed::<MeshNetworkPolicyManifest>(&ctx, value)?;
            if m.api_version != traffic::API_VERSION {
                return Err(ctx.err(
                    Some("apiVersion"),
                    format!(
                        "{:?}: MeshNetworkPolicy is served as {}",
                        m.api_version,
                        traffic::API_VERSION
                    ),
                ));
            }
            let namespace = namespace_of(&ctx, &m.metadata)?;
            let name = name_of(&ctx, &m.metadata)?;
            Object::NetworkPolicy(
                Policy::from_spec(PolicyKind::Mesh, &namespace, &name, &m.spec)
                    .map_err(|e| ctx.err(Some(&e.field), e.message))?,
            )
        }
        "" => return Err(ctx.err(Some("kind"), "missing kind")),
        other => {
            return Err(ctx.err(
                Some("kind"),
                format!(
                    "kind {other:?} is not supported here (Node, Namespace, Pod, Service, EndpointSlice, \
                     ServiceExport, TrafficPolicy, StagedRollout, NetworkPolicy, MeshNetworkPolicy)"
                ),
            ));
        }
    };
    Ok(obj)
}

/// Deserializes into a k8s-openapi type, refusing unknown fields and naming the path of a bad value.
fn typed<T: DeserializeOwned>(ctx: &Ctx<'_>, value: serde_json::Value) -> Result<T, ManifestError> {
    let mut unknown = Vec::new();
    let mut on_unknown = |path: serde_ignored::Path<'_>| unknown.push(path.to_string());
    let de = serde_ignored::Deserializer::new(value, &mut on_unknown);
    let parsed: Result<T, _> = serde_path_to_error::deserialize(de);
    match parsed {
        Err(e) => {
            let path = field_path(&e.path().to_string());
            let field = (!path.is_empty()).then_some(path);
            Err(ctx.err(field.as_deref(), e.into_inner().to_string()))
        }
        Ok(_) if !unknown.is_empty() => Err(ctx.err(Some(&field_path(&unknown[0])), "unknown field")),
        Ok(v) => Ok(v),
    }
}

/// Turns serde's paths (`spec.?.containers.?.0.colour`, `.`) into Kubernetes style (`spec.containers[0].colour`).
fn field_path(raw: &str) -> String {
    let mut out = String::new();
    for seg in raw.split('.').filter(|s| !s.is_empty() && *s != "?") {
        if let Some(index) = seg
            .strip_prefix('[')
            .and_then(|s| s.strip_suffix(']'))
            .or(seg.parse::<usize>().ok().map(|_| seg))
        {
            out.push_str(&format!("[{index}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(seg);
        }
    }
    out
}

fn name_of(ctx: &Ctx<'_>, meta: &ObjectMeta) -> Result<String, ManifestError> {
    match meta.name.as_deref() {
        Some(n) if is_dns_label_like(n) => Ok(n.to_owned()),
        Some(n) => Err(ctx.err(
            Some("metadata.name"),
            format!("{n:?} is not a valid name (lower case letters, digits, '-', '.'; at most 253)"),
        )),
        None => Err(ctx.err(Some("metadata.name"), "missing name")),
    }
}

fn namespace_of(ctx: &Ctx<'_>, meta: &ObjectMeta) -> Result<String, ManifestError> {
    match meta.namespace.as_deref() {
        None => Ok(DEFAULT_NAMESPACE.to_owned()),
        Some(n) if is_dns_label_like(n) && !n.contains('.') && n.len() <= 63 => Ok(n.to_owned()),
        Some(n) => Err(ctx.err(
            Some("metadata.namespace"),
            format!("{n:?} is not a valid namespace name"),
        )),
    }
}

fn is_dns_label_like(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
}

fn node(ctx: &Ctx<'_>, n: &core::Node) -> Result<Node, ManifestError> {
    let name = name_of(ctx, &n.metadata)?;
    let cidr = n
        .spec
        .as_ref()
        .and_then(|s| s.pod_cidr.as_deref())
        .ok_or_else(|| ctx.err(Some("spec.podCIDR"), "missing pod CIDR"))?;
    let pod_cidr: Ipv4Net = cidr
        .parse()
        .map_err(|e| ctx.err(Some("spec.podCIDR"), format!("{cidr:?} is not an IPv4 CIDR: {e}")))?;
    let addr = n
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .and_then(|a| a.iter().find(|a| a.type_ == "InternalIP"))
        .ok_or_else(|| ctx.err(Some("status.addresses"), "missing an InternalIP address"))?;
    let underlay_ipv4: Ipv4Addr = addr.address.parse().map_err(|e| {
        ctx.err(
            Some("status.addresses"),
            format!("InternalIP {:?} is not an IPv4 address: {e}", addr.address),
        )
    })?;
    let annotations = n.metadata.annotations.clone().unwrap_or_default();
    let wireguard = crate::wireguard::from_annotations(&annotations)
        .map_err(|m| ctx.err(Some("metadata.annotations"), m))?;
    Ok(Node {
        name,
        underlay_ipv4,
        pod_cidr: pod_cidr.trunc(),
        wireguard,
    })
}

fn namespace(ctx: &Ctx<'_>, n: &core::Namespace) -> Result<Namespace, ManifestError> {
    Ok(Namespace {
        name: name_of(ctx, &n.metadata)?,
        labels: n.metadata.labels.clone().unwrap_or_default(),
    })
}

fn port_number(ctx: &Ctx<'_>, field: &str, p: i32) -> Result<u16, ManifestError> {
    u16::try_from(p)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| ctx.err(Some(field), format!("port {p} is out of range (1-65535)")))
}

fn pod(ctx: &Ctx<'_>, p: &core::Pod) -> Result<Pod, ManifestError> {
    let name = name_of(ctx, &p.metadata)?;
    let namespace = namespace_of(ctx, &p.metadata)?;
    let empty = core::PodSpec::default();
    let spec = p.spec.as_ref().unwrap_or(&empty);
    let mut ports = Vec::new();
    for (ci, c) in spec.containers.iter().enumerate() {
        for (pi, port) in c.ports.iter().flatten().enumerate() {
            let field = format!("spec.containers[{ci}].ports[{pi}]");
            let number = port_number(ctx, &format!("{field}.containerPort"), port.container_port)?;
            let protocol = Protocol::parse(port.protocol.as_deref())
                .map_err(|m| ctx.err(Some(&format!("{field}.protocol")), m))?;
            if ports
                .iter()
                .any(|p: &ContainerPort| p.port == number && p.protocol == protocol)
            {
                return Err(ctx.err(
                    Some(&field),
                    format!("port {number}/{protocol:?} is declared twice"),
                ));
            }
            ports.push(ContainerPort {
                name: port.name.clone(),
                port: number,
                protocol,
            });
        }
    }
    let ipv4 = match p.status.as_ref().and_then(|s| s.pod_ip.as_deref()) {
        None => None,
        Some(ip) => Some(ip.parse::<Ipv4Addr>().map_err(|e| {
            ctx.err(
                Some("status.podIP"),
                format!("{ip:?} is not an IPv4 address: {e}"),
            )
        })?),
    };
    let annotations = p.metadata.annotations.clone().unwrap_or_default();
    traffic::capacity(&annotations).map_err(|m| {
        ctx.err(
            Some(&format!("metadata.annotations.{}", traffic::ANNOTATION_CAPACITY)),
            m,
        )
    })?;
    let label = |field: &str, v: &Option<String>| match v.as_deref() {
        None | Some("") => Ok(None),
        Some(h) if crate::clusterset::is_dns_label(h) => Ok(Some(h.to_owned())),
        Some(h) => Err(ctx.err(
            Some(field),
            format!("{h:?} is not a DNS label (1-63 of a-z, 0-9 and '-', not starting or ending with '-')"),
        )),
    };
    let hostname = label("spec.hostname", &spec.hostname)?;
    let subdomain = label("spec.subdomain", &spec.subdomain)?;
    Ok(Pod {
        namespace,
        name,
        labels: p.metadata.labels.clone().unwrap_or_default(),
        annotations,
        node_name: spec.node_name.clone(),
        ipv4,
        ports,
        hostname,
        subdomain,
    })
}

fn service(ctx: &Ctx<'_>, s: &core::Service) -> Result<Service, ManifestError> {
    let name = name_of(ctx, &s.metadata)?;
    let namespace = namespace_of(ctx, &s.metadata)?;
    let empty = core::ServiceSpec::default();
    let spec = s.spec.as_ref().unwrap_or(&empty);
    if let Some(t) = spec.type_.as_deref()
        && t != "ClusterIP"
    {
        return Err(ctx.err(
            Some("spec.type"),
            format!("service type {t:?} is not supported yet (ClusterIP)"),
        ));
    }
    let cluster_ipv4 = match spec.cluster_ip.as_deref() {
        None | Some("None" | "") => None,
        Some(ip) => Some(ip.parse::<Ipv4Addr>().map_err(|e| {
            ctx.err(
                Some("spec.clusterIP"),
                format!("{ip:?} is not an IPv4 address: {e}"),
            )
        })?),
    };
    let mut ports = Vec::new();
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        let field = format!("spec.ports[{i}]");
        let port = port_number(ctx, &format!("{field}.port"), p.port)?;
        let protocol = Protocol::parse(p.protocol.as_deref())
            .map_err(|m| ctx.err(Some(&format!("{field}.protocol")), m))?;
        let target_port = match &p.target_port {
            None => None,
            Some(IntOrString::Int(n)) => {
                Some(port_number(ctx, &format!("{field}.targetPort"), *n)?.to_string())
            }
            Some(IntOrString::String(s)) => Some(s.clone()),
        };
        ports.push(ServicePort {
            name: p.name.clone(),
            port,
            protocol,
            target_port,
        });
    }
    Ok(Service {
        namespace,
        name,
        cluster_ipv4,
        selector: spec.selector.clone().unwrap_or_default(),
        ports,
        annotations: s.metadata.annotations.clone().unwrap_or_default(),
    })
}

fn endpoint_slice(ctx: &Ctx<'_>, s: &discovery::EndpointSlice) -> Result<EndpointSlice, ManifestError> {
    let name = name_of(ctx, &s.metadata)?;
    let namespace = namespace_of(ctx, &s.metadata)?;
    let service = s
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(LABEL_SERVICE_NAME))
        .cloned();
    if let Some(svc) = &service
        && !is_dns_label_like(svc)
    {
        return Err(ctx.err(
            Some(&format!("metadata.labels.{LABEL_SERVICE_NAME}")),
            format!("{svc:?} is not a valid service name"),
        ));
    }
    let address_type = AddressType::parse(&s.address_type).map_err(|m| ctx.err(Some("addressType"), m))?;
    let mut ports: Vec<EndpointSlicePort> = Vec::new();
    for (i, p) in s.ports.iter().flatten().enumerate() {
        let field = format!("ports[{i}]");
        let port = match p.port {
            None => None,
            Some(n) => Some(port_number(ctx, &format!("{field}.port"), n)?),
        };
        let protocol = Protocol::parse(p.protocol.as_deref())
            .map_err(|m| ctx.err(Some(&format!("{field}.protocol")), m))?;
        let name = p.name.clone().unwrap_or_default();
        if ports.iter().any(|q| q.name == name) {
            return Err(ctx.err(
                Some(&format!("{field}.name")),
                format!("port name {name:?} is used twice"),
            ));
        }
        ports.push(EndpointSlicePort { name, port, protocol });
    }
    let mut endpoints = Vec::new();
    for (i, e) in s.endpoints.iter().flatten().enumerate() {
        let field = format!("endpoints[{i}]");
        if e.addresses.is_empty() {
            return Err(ctx.err(
                Some(&format!("{field}.addresses")),
                "an endpoint needs at least one address",
            ));
        }
        for (j, a) in e.addresses.iter().enumerate() {
            let ok = match address_type {
                AddressType::IPv4 => a.parse::<Ipv4Addr>().is_ok(),
                AddressType::IPv6 => a.parse::<std::net::Ipv6Addr>().is_ok(),
                AddressType::Fqdn => is_dns_label_like(a),
            };
            if !ok {
                return Err(ctx.err(
                    Some(&format!("{field}.addresses[{j}]")),
                    format!("{a:?} is not an address of type {}", s.address_type),
                ));
            }
        }
        let conditions = e
            .conditions
            .as_ref()
            .map_or_else(EndpointConditions::default, |c| EndpointConditions {
                ready: c.ready,
                serving: c.serving,
                terminating: c.terminating,
            });
        let pod = e
            .target_ref
            .as_ref()
            .filter(|r| r.kind.as_deref() == Some("Pod"))
            .and_then(|r| {
                Some(PodRef {
                    namespace: r.namespace.clone().unwrap_or_else(|| namespace.clone()),
                    name: r.name.clone()?,
                })
            });
        let hostname = match e.hostname.as_deref() {
            None | Some("") => None,
            Some(h) if crate::clusterset::is_dns_label(h) => Some(h.to_owned()),
            Some(h) => {
                return Err(ctx.err(
                    Some(&format!("{field}.hostname")),
                    format!(
                        "{h:?} is not a DNS label (1-63 of a-z, 0-9 and '-', not starting or ending with '-')"
                    ),
                ));
            }
        };
        endpoints.push(SliceEndpoint {
            addresses: e.addresses.clone(),
            conditions,
            node_name: e.node_name.clone(),
            pod,
            zone: e.zone.clone(),
            hostname,
        });
    }
    Ok(EndpointSlice {
        namespace,
        name,
        service,
        address_type,
        ports,
        endpoints,
    })
}

/// Objects of several files merged into one state; a second object with the same identity is an error.
///
/// # Errors
/// Names both places of a duplicate object.
pub fn merge<'a>(
    files: impl IntoIterator<Item = (&'a str, &'a [Object])>,
) -> Result<crate::ClusterState, String> {
    let mut state = crate::ClusterState::default();
    let mut seen: BTreeMap<String, &str> = BTreeMap::new();
    for (file, objects) in files {
        for o in objects {
            let id = o.describe();
            if let Some(first) = seen.insert(id.clone(), file) {
                return Err(format!("{id} is defined twice: in {first} and in {file}"));
            }
            match o {
                Object::Node(n) => {
                    state.nodes.insert(n.name.clone(), n.clone());
                }
                Object::Namespace(n) => {
                    state.namespaces.insert(n.name.clone(), n.clone());
                }
                Object::Pod(p) => {
                    state
                        .pods
                        .insert((p.namespace.clone(), p.name.clone()), p.clone());
                }
                Object::Service(s) => {
                    state
                        .services
                        .insert((s.namespace.clone(), s.name.clone()), s.clone());
                }
                Object::ServiceExport { namespace, name } => {
                    state.exports.insert((namespace.clone(), name.clone()));
                }
                Object::ServiceImport { namespace, name, ip } => {
                    if let Some(ip) = ip {
                        state.import_ips.insert((namespace.clone(), name.clone()), *ip);
                    }
                }
                Object::TrafficPolicy(t) => {
                    state
                        .traffic_policies
                        .insert((t.namespace.clone(), t.name.clone()), t.clone());
                }
                Object::StagedRollout(r) => {
                    state
                        .rollouts
                        .insert((r.namespace.clone(), r.name.clone()), r.clone());
                }
                Object::NetworkPolicy(p) => {
                    state.insert_network_policy(p.clone());
                }
                Object::EndpointSlice(e) => {
                    state
                        .endpoint_slices
                        .insert((e.namespace.clone(), e.name.clone()), e.clone());
                }
            }
        }
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {team: a}}
---
apiVersion: v1
kind: Pod
metadata:
  name: api
  namespace: shop
  labels: {app: api}
spec:
  nodeName: east-node-1
  containers:
    - name: echo
      ports:
        - {containerPort: 8080}
        - {containerPort: 5353, protocol: UDP, name: dns}
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: shop, annotations: {service.cilium.io/global: 'true'}}
spec:
  selector: {app: api}
  ports: [{port: 80, targetPort: 8080}]
---
";

    #[test]
    fn parses_namespace_pod_service() {
        let objs = parse_str("a.yaml", GOOD).expect("valid manifests");
        assert_eq!(objs.len(), 3);
        let Object::Pod(p) = &objs[1] else {
            panic!("expected a pod, got {:?}", objs[1])
        };
        assert_eq!(p.namespace, "shop");
        assert_eq!(p.node_name.as_deref(), Some("east-node-1"));
        assert_eq!(p.ports.len(), 2);
        assert_eq!(p.ports[1].protocol, Protocol::Udp);
        let Object::Service(s) = &objs[2] else {
            panic!("expected a service")
        };
        assert_eq!(s.ports[0].target_port.as_deref(), Some("8080"));
        assert_eq!(
            s.annotations.get("service.cilium.io/global").map(String::as_str),
            Some("true")
        );
    }

    #[test]
    fn pod_hostname_and_subdomain_are_dns_labels() {
        let pod = |extra: &str| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: db-0, namespace: demo}}\nspec:\n  containers: [{{name: c}}]\n{extra}"
            )
        };
        let objs = parse_str("p.yaml", &pod("  hostname: db-0\n  subdomain: db\n")).expect("valid pod");
        let Object::Pod(p) = &objs[0] else {
            panic!("expected a pod")
        };
        assert_eq!(
            (p.hostname.as_deref(), p.subdomain.as_deref()),
            (Some("db-0"), Some("db"))
        );
        for (extra, field) in [
            ("  hostname: Db_0\n", "spec.hostname"),
            ("  hostname: db-0\n  subdomain: -db\n", "spec.subdomain"),
            (&*format!("  hostname: {}\n", "a".repeat(64)), "spec.hostname"),
        ] {
            let e = parse_str("p.yaml", &pod(extra)).expect_err(extra);
            assert_eq!(e.field.as_deref(), Some(field), "{e}");
            assert!(e.to_string().contains("not a DNS label"), "{e}");
        }
        let slice = |h: &str| {
            format!(
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: db-1, namespace: demo, labels: {{kubernetes.io/service-name: db}}}}\naddressType: IPv4\nendpoints: [{{addresses: [10.1.0.9], hostname: {h}}}]\n"
            )
        };
        let objs = parse_str("s.yaml", &slice("db-0")).expect("valid slice");
        let Object::EndpointSlice(s) = &objs[0] else {
            panic!("expected a slice")
        };
        assert_eq!(s.endpoints[0].hostname.as_deref(), Some("db-0"));
        let e = parse_str("s.yaml", &slice("DB.0")).expect_err("not a label");
        assert_eq!(e.field.as_deref(), Some("endpoints[0].hostname"), "{e}");
    }

    #[test]
    fn parses_node() {
        let text = r"
apiVersion: v1
kind: Node
metadata: {name: east-node-1}
spec: {podCIDR: 10.1.0.0/24}
status: {addresses: [{type: InternalIP, address: 172.30.1.1}]}
";
        let objs = parse_str("n.yaml", text).expect("valid node");
        assert_eq!(
            objs,
            vec![Object::Node(Node {
                name: "east-node-1".into(),
                underlay_ipv4: Ipv4Addr::new(172, 30, 1, 1),
                pod_cidr: "10.1.0.0/24".parse().expect("cidr"),
                wireguard: None,
            })]
        );
    }

    #[test]
    fn unknown_field_is_named() {
        let text =
            "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec:\n  containers: [{name: c, portz: []}]\n";
        let e = parse_str("f.yaml", text).expect_err("unknown field");
        assert_eq!(e.file, "f.yaml");
        assert_eq!(e.object.as_deref(), Some("Pod default/a"));
        assert_eq!(e.field.as_deref(), Some("spec.containers[0].portz"), "{e}");
        assert!(e.to_string().contains("unknown field"), "{e}");
    }

    #[test]
    fn wrong_type_is_named() {
        let text = "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec:\n  containers: [{name: c, ports: [{containerPort: http}]}]\n";
        let e = parse_str("f.yaml", text).expect_err("bad type");
        assert!(
            e.field.as_deref().is_some_and(|f| f.contains("containerPort")),
            "{e}"
        );
    }

    #[test]
    fn bad_values_are_refused() {
        for (text, field) in [
            (
                "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec:\n  containers: [{name: c, ports: [{containerPort: 70000}]}]\n",
                "containerPort",
            ),
            (
                "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec:\n  containers: [{name: c, ports: [{containerPort: 1, protocol: SCTP}]}]\n",
                "protocol",
            ),
            (
                "apiVersion: v1\nkind: Pod\nmetadata: {name: Bad_Name}\nspec: {containers: []}\n",
                "metadata.name",
            ),
            (
                "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {clusterIP: 1.2.3}\n",
                "spec.clusterIP",
            ),
            ("apiVersion: v1\nkind: Widget\nmetadata: {name: s}\n", "kind"),
            (
                "apiVersion: v1\nkind: Node\nmetadata: {name: n}\nspec: {podCIDR: 10.0.0.0/99}\n",
                "spec.podCIDR",
            ),
        ] {
            let e = parse_str("f.yaml", text).expect_err(text);
            assert!(
                e.field.as_deref().is_some_and(|f| f.contains(field)),
                "{field}: {e}"
            );
        }
    }

    #[test]
    fn malformed_yaml_is_refused_with_file_and_document() {
        let e = parse_str("m.yaml", "apiVersion: v1\nkind: Pod\n---\n: : :\n  - [").expect_err("malformed");
        assert_eq!((e.file.as_str(), e.document), ("m.yaml", 2), "{e}");
        assert!(
            e.to_string().starts_with("m.yaml (document 2): malformed YAML: "),
            "{e}"
        );
        assert!(e.message.contains("at line 4, column 1"), "{e}");
        // Empty documents count: the broken one is the fourth in the file.
        let text =
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\n# nothing\n---\n---\nkind: [Pod\n";
        let e = parse_str("m.yaml", text).expect_err("unclosed");
        assert_eq!(e.document, 4, "{e}");
        assert!(e.message.contains("at line 8, column 7"), "{e}");
        // An object the model refuses is named with its document's number too (found only for the error).
        let text = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\n---\nkind: Gadget\n";
        let e = parse_str("m.yaml", text).expect_err("unknown kind");
        assert_eq!((e.document, e.field.as_deref()), (3, Some("kind")), "{e}");
    }

    #[test]
    fn service_export_is_parsed_and_checked() {
        let ok = "apiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {name: api, namespace: shop}\n";
        assert_eq!(
            parse_str("e.yaml", ok).expect("valid"),
            vec![Object::ServiceExport {
                namespace: "shop".into(),
                name: "api".into()
            }]
        );
        let bad = "apiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {name: api}\nspec: {x: 1}\n";
        let e = parse_str("e.yaml", bad).expect_err("unknown field");
        assert_eq!(e.field.as_deref(), Some("spec"), "{e}");
        let wrong = "apiVersion: v1\nkind: ServiceExport\nmetadata: {name: api}\n";
        assert_eq!(
            parse_str("e.yaml", wrong)
                .expect_err("bad version")
                .field
                .as_deref(),
            Some("apiVersion")
        );
    }

    #[test]
    fn traffic_policy_is_parsed_and_checked() {
        let ok = "apiVersion: fleetmesh.io/v1alpha1
kind: TrafficPolicy
metadata: {name: api, namespace: shop}
spec:
  service: api
  weights:
    - clusters: {matchLabels: {stage: canary}}
      weight: 10
    - clusters: {names: [west]}
      weight: 90
";
        let objs = parse_str("t.yaml", ok).expect("valid");
        let Object::TrafficPolicy(t) = &objs[0] else {
            panic!("{objs:?}")
        };
        assert_eq!((t.namespace.as_str(), t.name.as_str()), ("shop", "api"));
        assert_eq!(t.spec.weights[1].clusters.names, vec!["west".to_owned()]);
        let state = merge([("t.yaml", objs.as_slice())]).expect("merge");
        assert_eq!(state.traffic_policies.len(), 1);
        for (text, field) in [
            (
                ok.replace("weight: 10", "weight: 0")
                    .replace("weight: 90", "weight: 0"),
                "spec.weights",
            ),
            (
                ok.replace("[west]", "[West]"),
                "spec.weights[1].clusters.names[0]",
            ),
            (ok.replace("weight: 10", "weight: -1"), "spec.weights[0].weight"),
            (ok.replace("weight: 10", "wieght: 10"), "spec.weights[0]"),
            (ok.replace("v1alpha1", "v1"), "apiVersion"),
            (ok.replace("  service: api\n", ""), "spec"),
        ] {
            let e = parse_str("t.yaml", &text).expect_err(&text);
            assert!(
                e.field.as_deref().is_some_and(|f| f.starts_with(field)),
                "{field}: {e}"
            );
        }
    }

    #[test]
    fn staged_rollout_is_parsed_and_checked() {
        let ok = "apiVersion: fleetmesh.io/v1alpha1
kind: StagedRollout
metadata: {name: api-v2, namespace: shop}
spec:
  service: api
  from: {matchLabels: {stage: prod}}
  to:   {matchLabels: {track: v2}}
  steps: [10, 50, 100]
  holdSeconds: 30
  gate: {maxFailureRatio: 0.02}
";
        let objs = parse_str("r.yaml", ok).expect("valid");
        let Object::StagedRollout(r) = &objs[0] else {
            panic!("{objs:?}")
        };
        assert_eq!(
            (r.name.as_str(), r.spec.steps.clone()),
            ("api-v2", vec![10, 50, 100])
        );
        assert_eq!(
            merge([("r.yaml", objs.as_slice())])
                .expect("merge")
                .rollouts
                .len(),
            1
        );
        for (text, field) in [
            (ok.replace("[10, 50, 100]", "[50, 10]"), "spec.steps[1]"),
            (
                ok.replace("holdSeconds: 30", "holdSeconds: 0"),
                "spec.holdSeconds",
            ),
            (ok.replace("0.02", "2"), "spec.gate.maxFailureRatio"),
            (ok.replace("gate:", "gates:"), "spec"),
        ] {
            let e = parse_str("r.yaml", &text).expect_err(&text);
            assert!(
                e.field.as_deref().is_some_and(|f| f.starts_with(field)),
                "{field}: {e}"
            );
        }
    }

    #[test]
    fn capacity_annotation_is_checked() {
        let pod = |v: &str| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: a, annotations: {{fleetmesh.io/capacity: {v:?}}}}}\nspec: {{containers: []}}\n"
            )
        };
        assert!(parse_str("p.yaml", &pod("4")).is_ok());
        let e = parse_str("p.yaml", &pod("lots")).expect_err("bad capacity");
        assert_eq!(
            e.field.as_deref(),
            Some("metadata.annotations.fleetmesh.io/capacity"),
            "{e}"
        );
    }

    /// Objects from an API server go through the same rules; errors name the origin, the object and the field.
    #[test]
    fn api_objects_use_the_manifest_rules() {
        let doc = |text: &str| -> serde_json::Value { crate::yaml::from_str(text).expect("yaml") };
        let svc: core::Service = serde_json::from_value(doc(
            "metadata: {name: bad, namespace: shop}\nspec: {clusterIP: 1.2.3, ports: [{port: 80}]}",
        ))
        .expect("service");
        let e = from_service("kubernetes", &svc).expect_err("bad clusterIP");
        assert_eq!(e.document, 0);
        assert_eq!(
            e.to_string().split(": ").next(),
            Some("kubernetes, Service shop/bad, field spec.clusterIP"),
            "{e}"
        );
        let node: core::Node = serde_json::from_value(doc(
            "metadata: {name: n1}\nspec: {podCIDR: 10.1.0.0/24}\nstatus: {addresses: [{type: InternalIP, address: 172.30.1.1}]}",
        ))
        .expect("node");
        assert_eq!(
            from_node("kubernetes", &node).expect("valid").underlay_ipv4,
            Ipv4Addr::new(172, 30, 1, 1)
        );
        let pod: core::Pod = serde_json::from_value(doc(
            "metadata: {name: p, namespace: x, annotations: {fleetmesh.io/capacity: lots}}\nspec: {containers: []}",
        ))
        .expect("pod");
        let e = from_pod("kubernetes", &pod).expect_err("bad capacity");
        assert_eq!(e.object.as_deref(), Some("Pod x/p"));
        let ns: core::Namespace = serde_json::from_value(doc("metadata: {name: Shop}")).expect("namespace");
        assert_eq!(
            from_namespace("kubernetes", &ns)
                .expect_err("bad name")
                .field
                .as_deref(),
            Some("metadata.name")
        );
        let tp = doc(
            "apiVersion: fleetmesh.io/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: t, namespace: shop}\n\
             spec: {service: api, weights: [{clusters: {names: [west]}, weight: 0}]}",
        );
        let e = from_value("kubernetes", &tp).expect_err("weights sum to 0");
        assert!(
            e.field.as_deref().is_some_and(|f| f.starts_with("spec.weights")),
            "{e}"
        );
    }

    const NETPOL: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: api, namespace: shop}
spec:
  podSelector: {matchLabels: {app: api}}
  policyTypes: [Ingress, Egress]
  ingress:
    - from:
        - podSelector: {matchLabels: {app: web}}
        - ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16]}
      ports: [{port: 8080}, {port: 9000, endPort: 9100, protocol: UDP}]
  egress: [{}]
";

    const MESHPOL: &str = "apiVersion: fleetmesh.io/v1alpha1
kind: MeshNetworkPolicy
metadata: {name: api, namespace: shop}
spec:
  podSelector: {matchLabels: {app: api}}
  ingress:
    - from:
        - podSelector: {matchLabels: {app: web}}
          clusters: {names: [west]}
      ports: [{port: http}]
";

    #[test]
    fn network_policies_are_parsed_and_checked() {
        let objs = parse_str("np.yaml", &format!("{NETPOL}---\n{MESHPOL}")).expect("valid");
        let [Object::NetworkPolicy(k), Object::NetworkPolicy(m)] = objs.as_slice() else {
            panic!("{objs:?}")
        };
        assert_eq!(k.describe(), "NetworkPolicy shop/api");
        assert_eq!(m.describe(), "MeshNetworkPolicy shop/api");
        assert_eq!(k.ingress.as_ref().map(Vec::len), Some(1));
        assert_eq!(k.egress.as_ref().map(Vec::len), Some(1));
        assert_eq!(m.egress, None);
        let state = merge([("np.yaml", objs.as_slice())]).expect("same name, different kinds");
        assert_eq!(
            state.network_policies.keys().cloned().collect::<Vec<_>>(),
            [
                (PolicyKind::Kubernetes, "shop".to_owned(), "api".to_owned()),
                (PolicyKind::Mesh, "shop".to_owned(), "api".to_owned())
            ]
        );
        for (text, field) in [
            (
                NETPOL.replace("except: [", "exept: ["),
                "spec.ingress[0].from[1].ipBlock.exept",
            ),
            (NETPOL.replace("  egress: [{}]", "  egres: [{}]"), "spec.egres"),
            (
                NETPOL.replace("10.1.0.0/16", "11.1.0.0/16"),
                "spec.ingress[0].from[1].ipBlock.except[0]",
            ),
            (
                NETPOL.replace("endPort: 9100", "endPort: 80"),
                "spec.ingress[0].ports[1].endPort",
            ),
            (
                NETPOL.replace("protocol: UDP", "protocol: SCTP"),
                "spec.ingress[0].ports[1].protocol",
            ),
            (
                NETPOL.replace("port: 8080", "port: 0"),
                "spec.ingress[0].ports[0].port",
            ),
            (
                NETPOL.replace("{app: web}", "{app: -web}"),
                "spec.ingress[0].from[0].podSelector.matchLabels",
            ),
            (
                MESHPOL.replace("clusters:", "cluster:"),
                "spec.ingress[0].from[0]",
            ),
            (
                MESHPOL.replace("[west]", "[West]"),
                "spec.ingress[0].from[0].clusters.names[0]",
            ),
            (MESHPOL.replace("v1alpha1", "v1"), "apiVersion"),
        ] {
            let e = parse_str("np.yaml", &text).expect_err(&text);
            assert!(
                e.field.as_deref().is_some_and(|f| f.starts_with(field)),
                "{field}: {e}"
            );
        }
        let e = parse_str("np.yaml", &NETPOL.replace("protocol: UDP", "protocol: SCTP")).expect_err("sctp");
        assert!(
            e.to_string().contains("NetworkPolicy shop/api") && e.message.contains("SCTP"),
            "{e}"
        );
        // From the API server: the same rules, unknown fields included.
        let mut v: serde_json::Value = crate::yaml::from_str(NETPOL).expect("yaml");
        v["spec"]["ingress"][0]["bogus"] = true.into();
        let e = from_value("kubernetes", &v).expect_err("unknown field");
        assert_eq!(e.field.as_deref(), Some("spec.ingress[0].bogus"), "{e}");
        let typed: networking::NetworkPolicy = crate::yaml::from_str(NETPOL).expect("typed");
        assert_eq!(&from_network_policy("kubernetes", &typed).expect("valid"), k);
    }

    const SLICE: &str = "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: api-abc12
  namespace: shop
  labels: {kubernetes.io/service-name: api}
addressType: IPv4
ports:
  - {name: http, port: 8080, protocol: TCP}
  - {name: dns, port: 5353, protocol: UDP}
endpoints:
  - addresses: [10.1.0.2]
    conditions: {ready: true, serving: true, terminating: false}
    nodeName: east-node-1
    zone: a
    targetRef: {kind: Pod, name: api-1, namespace: shop, uid: u1}
  - addresses: [10.1.0.3]
";

    #[test]
    fn endpoint_slices_are_parsed_and_checked() {
        let objs = parse_str("eps.yaml", SLICE).expect("valid");
        let [Object::EndpointSlice(s)] = objs.as_slice() else {
            panic!("{objs:?}")
        };
        assert_eq!(
            s,
            &EndpointSlice {
                namespace: "shop".into(),
                name: "api-abc12".into(),
                service: Some("api".into()),
                address_type: AddressType::IPv4,
                ports: vec![
                    EndpointSlicePort {
                        name: "http".into(),
                        port: Some(8080),
                        protocol: Protocol::Tcp
                    },
                    EndpointSlicePort {
                        name: "dns".into(),
                        port: Some(5353),
                        protocol: Protocol::Udp
                    },
                ],
                endpoints: vec![
                    SliceEndpoint {
                        addresses: vec!["10.1.0.2".into()],
                        conditions: EndpointConditions {
                            ready: Some(true),
                            serving: Some(true),
                            terminating: Some(false)
                        },
                        node_name: Some("east-node-1".into()),
                        pod: Some(PodRef {
                            namespace: "shop".into(),
                            name: "api-1".into()
                        }),
                        zone: Some("a".into()),
                        hostname: None,
                    },
                    SliceEndpoint {
                        addresses: vec!["10.1.0.3".into()],
                        conditions: EndpointConditions::default(),
                        node_name: None,
                        pod: None,
                        zone: None,
                        hostname: None,
                    },
                ],
            }
        );
        let state = merge([("eps.yaml", objs.as_slice())]).expect("merge");
        assert_eq!(state.slices_of("shop", "api").count(), 1);
        // Other address types are kept (and ignored for backends), with their own address rules.
        let v6 = SLICE
            .replace("IPv4", "IPv6")
            .replace("10.1.0.2", "'fd00::2'")
            .replace("10.1.0.3", "'fd00::3'");
        assert!(parse_str("eps.yaml", &v6).is_ok(), "{v6}");
        for (text, field) in [
            (SLICE.replace("IPv4", "IPv5"), "addressType"),
            (
                SLICE.replace("10.1.0.3", "10.1.0.300"),
                "endpoints[1].addresses[0]",
            ),
            (SLICE.replace("IPv4", "IPv6"), "endpoints[0].addresses[0]"),
            (SLICE.replace("[10.1.0.3]", "[]"), "endpoints[1].addresses"),
            (SLICE.replace("port: 8080", "port: 0"), "ports[0].port"),
            (
                SLICE.replace("protocol: UDP", "protocol: SCTP"),
                "ports[1].protocol",
            ),
            (SLICE.replace("name: dns", "name: http"), "ports[1].name"),
            (SLICE.replace("zone: a", "zones: a"), "endpoints[0].zones"),
            (
                SLICE.replace("service-name: api", "service-name: Api"),
                "metadata.labels.kubernetes.io/service-name",
            ),
            (SLICE.replace("addressType: IPv4\n", ""), "addressType"),
        ] {
            let e = parse_str("eps.yaml", &text).expect_err(&text);
            assert!(
                e.field.as_deref().is_some_and(|f| f.starts_with(field)) || e.message.contains(field),
                "{field}: {e}"
            );
            assert_eq!(e.object.as_deref(), Some("EndpointSlice shop/api-abc12"), "{e}");
        }
        let e = parse_str(
            "eps.yaml",
            &SLICE.replace("discovery.k8s.io/v1", "discovery.k8s.io/v1beta1"),
        )
        .expect_err("old version");
        assert!(e.to_string().contains("EndpointSlice shop/api-abc12"), "{e}");
        // From the API server: the same rules.
        let typed: discovery::EndpointSlice = crate::yaml::from_str(SLICE).expect("typed");
        assert_eq!(&from_endpoint_slice("kubernetes", &typed).expect("valid"), s);
        let bad: discovery::EndpointSlice =
            crate::yaml::from_str(&SLICE.replace("10.1.0.3", "not-an-ip")).expect("typed");
        let e = from_endpoint_slice("kubernetes", &bad).expect_err("bad address");
        assert!(
            e.to_string()
                .starts_with("kubernetes, EndpointSlice shop/api-abc12, field endpoints[1].addresses[0]"),
            "{e}"
        );
    }

    #[test]
    fn merge_refuses_duplicates() {
        let a = parse_str("a.yaml", GOOD).expect("valid");
        let b = parse_str("b.yaml", GOOD).expect("valid");
        let e = merge([("a.yaml", a.as_slice()), ("b.yaml", b.as_slice())]).expect_err("duplicate");
        assert!(e.contains("a.yaml") && e.contains("b.yaml"), "{e}");
        let s = merge([("a.yaml", a.as_slice())]).expect("merge");
        assert_eq!(s.pods.len(), 1);
        assert_eq!(s.services.len(), 1);
    }
}
