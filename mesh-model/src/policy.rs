//! Network policy: Kubernetes `NetworkPolicy` (networking.k8s.io/v1) and fleetmesh's `MeshNetworkPolicy`
//! (fleetmesh.io/v1alpha1), validated into one internal [`Policy`], and compiled per endpoint into the entries
//! of its policy table (docs/network-policy.md, "Policy").
//!
//! ```yaml
//! apiVersion: fleetmesh.io/v1alpha1
//! kind: MeshNetworkPolicy
//! metadata: {name: api, namespace: shop}
//! spec:
//!   podSelector: {matchLabels: {app: api}}
//!   ingress:
//!     - from:
//!         - podSelector: {matchLabels: {app: web}}
//!           clusters: {names: [west]}           # no `clusters`: every cluster of the mesh
//!       ports: [{port: 8080}]
//! ```
//!
//! Semantics:
//! - A `NetworkPolicy` peer selects pods of the **local cluster** only, unless its podSelector or
//!   namespaceSelector names [`LABEL_CLUSTER`] (then that key is matched like any other label). A
//!   `MeshNetworkPolicy` peer without `clusters` selects every cluster; with `clusters`, `names` (if any) must
//!   contain the identity's cluster and the label requirements must hold on that cluster's labels.
//! - A peer without namespaceSelector selects the policy's namespace; a namespaceSelector matches the namespace
//!   labels of the identity (`io.cilium.k8s.namespace.labels.*`, plus [`LABEL_CLUSTER`]). Empty selectors match
//!   everything. A podSelector matches the peer's identity labels.
//! - `policyTypes` defaults to Ingress, plus Egress when egress rules are given. A direction a policy does not
//!   cover is not enforced by it ([`Policy::ingress`]/[`Policy::egress`] `None`).
//! - A `MeshNetworkPolicy` peer with only `clusters` selects every pod of the policy's namespace in those
//!   clusters. An IPv6 `ipBlock` is valid and selects nothing (the mesh is IPv4 only).
//! - Reserved identities (world, pending, host) have no namespace or cluster label: pod and namespace
//!   selectors never select them. `ipBlock` selects CIDR identities (and [`identity::WORLD`] for `0.0.0.0/0`).
//!   It matches **pod addresses too** (Calico's semantics, Cilium's `policy-cidr-match-mode`; what upstream's
//!   NetworkPolicy e2e tests expect): the datapath looks a pod peer up again by the CIDR identity of its address
//!   when its own identity finds no entry. It never matches the node itself ([`identity::HOST`]).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use ipnet::Ipv4Net;
use k8s_openapi::api::networking::v1 as networking;
use k8s_openapi::apimachinery::pkg::apis::meta::v1 as meta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use mesh_common::{identity, policy_dir, proto};
use serde::{Deserialize, Serialize};

use crate::identity::{LABEL_CLUSTER, LABEL_NAMESPACE, namespace_labels};
use crate::state::Protocol;
use crate::traffic::{ClusterSelector, LabelOperator, LabelRequirement, valid_label_key, valid_label_value};

/// Kind name of fleetmesh's network policy.
pub const MESH_KIND: &str = "MeshNetworkPolicy";
/// Kind name of Kubernetes' network policy.
pub const K8S_KIND: &str = "NetworkPolicy";
/// apiVersion of Kubernetes' network policy.
pub const K8S_API_VERSION: &str = "networking.k8s.io/v1";

// ---------------------------------------------------------------------------------------------------------------
// Spec (the shape users write; also the CRD's schema)
// ---------------------------------------------------------------------------------------------------------------

/// A Kubernetes label selector: every `matchLabels` entry and every expression must hold. `{}` selects all.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelSelector {
    /// Every label must be present with this value.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    /// Every expression must hold (In, NotIn, Exists, DoesNotExist).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<LabelRequirement>,
}

/// A direction named in `policyTypes`.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum PolicyType {
    Ingress,
    Egress,
}

/// An IPv4 block: `cidr` without the `except` prefixes (each inside `cidr`).
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IpBlockSpec {
    /// An IPv4 CIDR, e.g. `192.168.0.0/16`.
    pub cidr: String,
    /// IPv4 CIDRs inside `cidr` that are not selected.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub except: Vec<String>,
}

/// The peers of a rule: pods (podSelector and/or namespaceSelector, optionally restricted to clusters), or an
/// ipBlock.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerSpec {
    /// Pods with these labels (in the policy's namespace unless namespaceSelector is given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
    /// Pods of the namespaces with these labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    /// Addresses outside the mesh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_block: Option<IpBlockSpec>,
    /// The clusters whose pods are selected: `names` and/or label requirements on the cluster labels. Without
    /// it, every cluster of the mesh (MeshNetworkPolicy only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clusters: Option<ClusterSelector>,
}

/// A port number or a container port name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PortValue {
    Number(i64),
    Name(String),
}

#[cfg(feature = "schema")]
impl schemars::JsonSchema for PortValue {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "PortValue".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "A port number (1-65535) or a container port name.",
            "x-kubernetes-int-or-string": true
        })
    }
}

/// Ports of a rule.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortSpec {
    /// TCP (default) or UDP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// A port number or a named container port; absent: every port of the protocol.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<PortValue>,
    /// Last port of a range starting at `port` (a number).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_port: Option<i64>,
}

/// An ingress rule: traffic from any of `from` (empty: any peer) to any of `ports` (empty: any port).
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IngressRuleSpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<PeerSpec>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortSpec>,
}

/// An egress rule: traffic to any of `to` (empty: any peer) on any of `ports` (empty: any port).
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EgressRuleSpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<PeerSpec>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortSpec>,
}

/// The spec of a `MeshNetworkPolicy`: a Kubernetes NetworkPolicy spec whose peers may name clusters.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshNetworkPolicySpec {
    /// The pods of the policy's namespace it applies to (`{}`: all).
    #[serde(default)]
    pub pod_selector: LabelSelector,
    /// The directions it enforces (default: Ingress, plus Egress when egress rules are given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_types: Option<Vec<PolicyType>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingress: Vec<IngressRuleSpec>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<EgressRuleSpec>,
}

// ---------------------------------------------------------------------------------------------------------------
// The validated policy
// ---------------------------------------------------------------------------------------------------------------

/// Which API a policy came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum PolicyKind {
    /// networking.k8s.io/v1 `NetworkPolicy`.
    Kubernetes,
    /// fleetmesh.io/v1alpha1 `MeshNetworkPolicy`.
    Mesh,
}

impl PolicyKind {
    /// The Kubernetes kind name.
    #[must_use]
    pub fn kind_name(self) -> &'static str {
        match self {
            PolicyKind::Kubernetes => K8S_KIND,
            PolicyKind::Mesh => MESH_KIND,
        }
    }
}

/// The clusters an endpoint peer selects.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Clusters {
    /// Only the cluster the policy is enforced in (a NetworkPolicy peer that does not name the cluster label).
    Local,
    /// Every cluster.
    All,
    /// `names` (when not empty) contains the cluster, and the label requirements hold on its labels.
    Selected(ClusterSelector),
}

/// A peer of a rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Peer {
    /// Pods: `pod_selector` over the identity labels (`None`: all), `namespace_selector` over the namespace
    /// labels (`None`: the policy's namespace), in `clusters`.
    Endpoints {
        pod_selector: Option<LabelSelector>,
        namespace_selector: Option<LabelSelector>,
        clusters: Clusters,
    },
    /// Addresses of `cidr` outside every `except`.
    IpBlock { cidr: Ipv4Net, except: Vec<Ipv4Net> },
    /// A valid IPv6 ipBlock: it selects nothing (the mesh is IPv4 only), so a dual-stack policy keeps its IPv4
    /// meaning instead of being refused as a whole.
    Ipv6Block { cidr: String },
}

/// The port part of a [`PortRule`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Port {
    /// `first..=last`.
    Range { first: u16, last: u16 },
    /// A container port name.
    Named(String),
}

/// One entry of a rule's `ports`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortRule {
    pub protocol: Protocol,
    /// `None`: every port of the protocol.
    pub port: Option<Port>,
}

/// A rule: any of `peers` (empty: any peer) on any of `ports` (empty: any port and protocol).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    pub peers: Vec<Peer>,
    pub ports: Vec<PortRule>,
}

/// A validated network policy of either kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    pub kind: PolicyKind,
    pub namespace: String,
    pub name: String,
    /// Pods of `namespace` the policy applies to (matched on the pod's labels).
    pub pod_selector: LabelSelector,
    /// `None`: the policy does not enforce ingress; `Some(rules)`: default deny plus these allows.
    pub ingress: Option<Vec<Rule>>,
    /// As `ingress`, for egress.
    pub egress: Option<Vec<Rule>>,
}

/// Why a policy is refused: the field (`spec.…`, Kubernetes style) and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("field {field}: {message}")]
pub struct PolicyError {
    pub field: String,
    pub message: String,
}

fn err(field: impl Into<String>, message: impl Into<String>) -> PolicyError {
    PolicyError {
        field: field.into(),
        message: message.into(),
    }
}

impl LabelSelector {
    /// Checks keys, values and operators; `at` is the selector's field path.
    ///
    /// # Errors
    /// The first invalid key, value or operator/values combination.
    pub fn validate(&self, at: &str) -> Result<(), PolicyError> {
        validate_requirements(&self.match_labels, &self.match_expressions, at)
    }

    /// Whether `labels` satisfy the selector.
    #[must_use]
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| r.holds(labels))
    }

    /// Whether the selector names `key`.
    #[must_use]
    pub fn mentions(&self, key: &str) -> bool {
        self.match_labels.contains_key(key) || self.match_expressions.iter().any(|r| r.key == key)
    }
}

fn validate_requirements(
    match_labels: &BTreeMap<String, String>,
    match_expressions: &[LabelRequirement],
    at: &str,
) -> Result<(), PolicyError> {
    for (k, v) in match_labels {
        if !valid_label_key(k) {
            return Err(err(
                format!("{at}.matchLabels"),
                format!("{k:?} is not a valid label key ([prefix/]name)"),
            ));
        }
        if !valid_label_value(v) {
            return Err(err(
                format!("{at}.matchLabels.{k}"),
                format!(
                    "{v:?} is not a valid label value (at most 63 of [A-Za-z0-9-_.], alphanumeric at both ends)"
                ),
            ));
        }
    }
    for (i, r) in match_expressions.iter().enumerate() {
        let at = format!("{at}.matchExpressions[{i}]");
        if !valid_label_key(&r.key) {
            return Err(err(
                format!("{at}.key"),
                format!("{:?} is not a valid label key ([prefix/]name)", r.key),
            ));
        }
        match r.operator {
            LabelOperator::In | LabelOperator::NotIn if r.values.is_empty() => {
                return Err(err(
                    format!("{at}.values"),
                    format!("{:?} needs values", r.operator),
                ));
            }
            LabelOperator::Exists | LabelOperator::DoesNotExist if !r.values.is_empty() => {
                return Err(err(
                    format!("{at}.values"),
                    format!("{:?} takes no values", r.operator),
                ));
            }
            _ => {}
        }
        if let Some(v) = r.values.iter().find(|v| !valid_label_value(v)) {
            return Err(err(
                format!("{at}.values"),
                format!("{v:?} is not a valid label value"),
            ));
        }
    }
    Ok(())
}

fn parse_cidr(field: &str, s: &str) -> Result<Ipv4Net, PolicyError> {
    let net: Ipv4Net = s
        .parse()
        .map_err(|e| err(field, format!("{s:?} is not an IPv4 CIDR: {e}")))?;
    if net.trunc() != net {
        return Err(err(
            field,
            format!("{s:?} has host bits set (the network is {})", net.trunc()),
        ));
    }
    Ok(net)
}

fn ipv6_block(cidr: ipnet::Ipv6Net, block: &IpBlockSpec, at: &str) -> Result<Peer, PolicyError> {
    let field = format!("{at}.ipBlock.cidr");
    if cidr.trunc() != cidr {
        return Err(err(
            field,
            format!("{cidr} has host bits set (the network is {})", cidr.trunc()),
        ));
    }
    for (i, e) in block.except.iter().enumerate() {
        let field = format!("{at}.ipBlock.except[{i}]");
        let net: ipnet::Ipv6Net = e
            .parse()
            .map_err(|e2| err(&field, format!("{e:?} is not an IPv6 CIDR (as cidr is): {e2}")))?;
        if !cidr.contains(&net) {
            return Err(err(field, format!("{net} is not inside cidr {cidr}")));
        }
    }
    Ok(Peer::Ipv6Block {
        cidr: cidr.to_string(),
    })
}

fn peer(kind: PolicyKind, p: &PeerSpec, at: &str) -> Result<Peer, PolicyError> {
    let has_selector = p.pod_selector.is_some() || p.namespace_selector.is_some();
    if let Some(block) = &p.ip_block {
        if has_selector || p.clusters.is_some() {
            return Err(err(
                at,
                "ipBlock cannot be combined with podSelector, namespaceSelector or clusters",
            ));
        }
        if let Ok(v6) = block.cidr.parse::<ipnet::Ipv6Net>() {
            return ipv6_block(v6, block, at);
        }
        let cidr = parse_cidr(&format!("{at}.ipBlock.cidr"), &block.cidr)?;
        let mut except = Vec::new();
        for (i, e) in block.except.iter().enumerate() {
            let field = format!("{at}.ipBlock.except[{i}]");
            let net = parse_cidr(&field, e)?;
            if !cidr.contains(&net) {
                return Err(err(field, format!("{net} is not inside cidr {cidr}")));
            }
            except.push(net);
        }
        return Ok(Peer::IpBlock { cidr, except });
    }
    if let Some(s) = &p.pod_selector {
        s.validate(&format!("{at}.podSelector"))?;
    }
    if let Some(s) = &p.namespace_selector {
        s.validate(&format!("{at}.namespaceSelector"))?;
    }
    let clusters = match (&p.clusters, kind) {
        (Some(_), PolicyKind::Kubernetes) => {
            return Err(err(
                format!("{at}.clusters"),
                "clusters is a MeshNetworkPolicy field",
            ));
        }
        (Some(c), PolicyKind::Mesh) => {
            let at = format!("{at}.clusters");
            for (i, n) in c.names.iter().enumerate() {
                crate::cluster::validate_cluster_name(n)
                    .map_err(|e| err(format!("{at}.names[{i}]"), e.to_string()))?;
            }
            validate_requirements(&c.match_labels, &c.match_expressions, &at)?;
            Clusters::Selected(c.clone())
        }
        (None, PolicyKind::Mesh) => Clusters::All,
        (None, PolicyKind::Kubernetes) => {
            let mentions = [&p.pod_selector, &p.namespace_selector]
                .into_iter()
                .flatten()
                .any(|s| s.mentions(LABEL_CLUSTER));
            if mentions { Clusters::All } else { Clusters::Local }
        }
    };
    if !has_selector && (kind == PolicyKind::Kubernetes || p.clusters.is_none()) {
        return Err(err(
            at,
            "a peer needs podSelector, namespaceSelector, ipBlock (or, in a MeshNetworkPolicy, clusters)",
        ));
    }
    Ok(Peer::Endpoints {
        pod_selector: p.pod_selector.clone(),
        namespace_selector: p.namespace_selector.clone(),
        clusters,
    })
}

fn port_rule(p: &PortSpec, at: &str) -> Result<PortRule, PolicyError> {
    let protocol = Protocol::parse(p.protocol.as_deref()).map_err(|m| err(format!("{at}.protocol"), m))?;
    let in_range = |field: &str, n: i64| {
        u16::try_from(n).ok().filter(|n| *n != 0).ok_or_else(|| {
            err(
                format!("{at}.{field}"),
                format!("port {n} is out of range (1-65535)"),
            )
        })
    };
    let port = match (&p.port, p.end_port) {
        (None, None) => None,
        (None, Some(_)) => return Err(err(format!("{at}.endPort"), "endPort needs a port number")),
        (Some(PortValue::Name(n)), end) => {
            if end.is_some() {
                return Err(err(
                    format!("{at}.endPort"),
                    format!("endPort cannot be used with the named port {n:?}"),
                ));
            }
            if !valid_port_name(n) {
                return Err(err(
                    format!("{at}.port"),
                    format!(
                        "{n:?} is not a port number or a port name (at most 15 lower case letters, digits and '-')"
                    ),
                ));
            }
            Some(Port::Named(n.clone()))
        }
        (Some(PortValue::Number(n)), end) => {
            let first = in_range("port", *n)?;
            let last = match end {
                None => first,
                Some(e) => {
                    let last = in_range("endPort", e)?;
                    if last < first {
                        return Err(err(
                            format!("{at}.endPort"),
                            format!("endPort {last} is below port {first}"),
                        ));
                    }
                    last
                }
            };
            Some(Port::Range { first, last })
        }
    };
    Ok(PortRule { protocol, port })
}

/// A Kubernetes port name (IANA service name): 1-15 of [a-z0-9-], at least one letter, no leading, trailing or
/// double '-'.
fn valid_port_name(n: &str) -> bool {
    (1..=15).contains(&n.len())
        && n.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && n.chars().any(|c| c.is_ascii_lowercase())
        && !n.starts_with('-')
        && !n.ends_with('-')
        && !n.contains("--")
}

fn rule(
    kind: PolicyKind,
    peers: &[PeerSpec],
    ports: &[PortSpec],
    at: &str,
    peers_field: &str,
) -> Result<Rule, PolicyError> {
    Ok(Rule {
        peers: peers
            .iter()
            .enumerate()
            .map(|(i, p)| peer(kind, p, &format!("{at}.{peers_field}[{i}]")))
            .collect::<Result<_, _>>()?,
        ports: ports
            .iter()
            .enumerate()
            .map(|(i, p)| port_rule(p, &format!("{at}.ports[{i}]")))
            .collect::<Result<_, _>>()?,
    })
}

impl Policy {
    /// Validates `spec` into a policy of `kind` (for [`PolicyKind::Kubernetes`], `clusters` must be absent).
    ///
    /// # Errors
    /// The first invalid field: selectors, CIDRs, ports, protocols, `clusters` on a NetworkPolicy.
    pub fn from_spec(
        kind: PolicyKind,
        namespace: &str,
        name: &str,
        spec: &MeshNetworkPolicySpec,
    ) -> Result<Self, PolicyError> {
        spec.pod_selector.validate("spec.podSelector")?;
        let ingress = spec
            .ingress
            .iter()
            .enumerate()
            .map(|(i, r)| rule(kind, &r.from, &r.ports, &format!("spec.ingress[{i}]"), "from"))
            .collect::<Result<Vec<_>, _>>()?;
        let egress = spec
            .egress
            .iter()
            .enumerate()
            .map(|(i, r)| rule(kind, &r.to, &r.ports, &format!("spec.egress[{i}]"), "to"))
            .collect::<Result<Vec<_>, _>>()?;
        // An empty list is defaulted like an absent one (as the API server does).
        let (does_ingress, does_egress) = match spec.policy_types.as_ref().filter(|t| !t.is_empty()) {
            Some(types) => (
                types.contains(&PolicyType::Ingress),
                types.contains(&PolicyType::Egress),
            ),
            None => (true, !egress.is_empty()),
        };
        Ok(Self {
            kind,
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            pod_selector: spec.pod_selector.clone(),
            ingress: does_ingress.then_some(ingress),
            egress: does_egress.then_some(egress),
        })
    }

    /// Validates a Kubernetes NetworkPolicy spec. The typed object has already lost any unknown field: parse
    /// manifests and API objects with [`crate::manifests`], which refuses them.
    ///
    /// # Errors
    /// As [`Policy::from_spec`], plus unknown operators and policy types.
    pub fn from_k8s(
        namespace: &str,
        name: &str,
        spec: &networking::NetworkPolicySpec,
    ) -> Result<Self, PolicyError> {
        Self::from_spec(PolicyKind::Kubernetes, namespace, name, &spec_from_k8s(spec)?)
    }

    /// `Kind namespace/name`.
    #[must_use]
    pub fn describe(&self) -> String {
        format!("{} {}/{}", self.kind.kind_name(), self.namespace, self.name)
    }

    /// Whether the policy applies to a pod of `namespace` with `labels`.
    #[must_use]
    pub fn selects(&self, namespace: &str, labels: &BTreeMap<String, String>) -> bool {
        self.namespace == namespace && self.pod_selector.matches(labels)
    }

    fn rules(&self, dir: u8) -> Option<&[Rule]> {
        if dir == policy_dir::INGRESS {
            self.ingress.as_deref()
        } else {
            self.egress.as_deref()
        }
    }
}

/// A Kubernetes NetworkPolicy spec in fleetmesh's spec shape (no `clusters`).
///
/// # Errors
/// Unknown operators or policy types, port values of the wrong kind.
pub fn spec_from_k8s(spec: &networking::NetworkPolicySpec) -> Result<MeshNetworkPolicySpec, PolicyError> {
    fn selector(s: &meta::LabelSelector, at: &str) -> Result<LabelSelector, PolicyError> {
        let mut out = LabelSelector {
            match_labels: s.match_labels.clone().unwrap_or_default(),
            match_expressions: Vec::new(),
        };
        for (i, r) in s.match_expressions.iter().flatten().enumerate() {
            let operator = match r.operator.as_str() {
                "In" => LabelOperator::In,
                "NotIn" => LabelOperator::NotIn,
                "Exists" => LabelOperator::Exists,
                "DoesNotExist" => LabelOperator::DoesNotExist,
                other => {
                    return Err(err(
                        format!("{at}.matchExpressions[{i}].operator"),
                        format!("{other:?} is not an operator (In, NotIn, Exists, DoesNotExist)"),
                    ));
                }
            };
            out.match_expressions.push(LabelRequirement {
                key: r.key.clone(),
                operator,
                values: r.values.clone().unwrap_or_default(),
            });
        }
        Ok(out)
    }
    fn peers(
        ps: Option<&Vec<networking::NetworkPolicyPeer>>,
        at: &str,
    ) -> Result<Vec<PeerSpec>, PolicyError> {
        ps.into_iter()
            .flatten()
            .enumerate()
            .map(|(i, p)| {
                let at = format!("{at}[{i}]");
                Ok(PeerSpec {
                    pod_selector: p
                        .pod_selector
                        .as_ref()
                        .map(|s| selector(s, &format!("{at}.podSelector")))
                        .transpose()?,
                    namespace_selector: p
                        .namespace_selector
                        .as_ref()
                        .map(|s| selector(s, &format!("{at}.namespaceSelector")))
                        .transpose()?,
                    ip_block: p.ip_block.as_ref().map(|b| IpBlockSpec {
                        cidr: b.cidr.clone(),
                        except: b.except.clone().unwrap_or_default(),
                    }),
                    clusters: None,
                })
            })
            .collect()
    }
    fn ports(ps: Option<&Vec<networking::NetworkPolicyPort>>) -> Vec<PortSpec> {
        ps.into_iter()
            .flatten()
            .map(|p| PortSpec {
                protocol: p.protocol.clone(),
                port: p.port.as_ref().map(|v| match v {
                    IntOrString::Int(n) => PortValue::Number(i64::from(*n)),
                    IntOrString::String(s) => PortValue::Name(s.clone()),
                }),
                end_port: p.end_port.map(i64::from),
            })
            .collect()
    }
    let policy_types = match &spec.policy_types {
        None => None,
        Some(types) => Some(
            types
                .iter()
                .enumerate()
                .map(|(i, t)| match t.as_str() {
                    "Ingress" => Ok(PolicyType::Ingress),
                    "Egress" => Ok(PolicyType::Egress),
                    other => Err(err(
                        format!("spec.policyTypes[{i}]"),
                        format!("{other:?} is not a policy type (Ingress, Egress)"),
                    )),
                })
                .collect::<Result<_, _>>()?,
        ),
    };
    Ok(MeshNetworkPolicySpec {
        pod_selector: spec
            .pod_selector
            .as_ref()
            .map(|s| selector(s, "spec.podSelector"))
            .transpose()?
            .unwrap_or_default(),
        policy_types,
        ingress: spec
            .ingress
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, r)| {
                Ok(IngressRuleSpec {
                    from: peers(r.from.as_ref(), &format!("spec.ingress[{i}].from"))?,
                    ports: ports(r.ports.as_ref()),
                })
            })
            .collect::<Result<_, PolicyError>>()?,
        egress: spec
            .egress
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, r)| {
                Ok(EgressRuleSpec {
                    to: peers(r.to.as_ref(), &format!("spec.egress[{i}].to"))?,
                    ports: ports(r.ports.as_ref()),
                })
            })
            .collect::<Result<_, PolicyError>>()?,
    })
}

// ---------------------------------------------------------------------------------------------------------------
// Compilation
// ---------------------------------------------------------------------------------------------------------------

/// Named container ports: name → (protocol, port) of the pods that have it.
pub type NamedPorts = BTreeMap<String, Vec<(Protocol, u16)>>;

/// The endpoint a table is compiled for.
#[derive(Debug, Clone, Copy)]
pub struct EndpointView<'a> {
    pub cluster: &'a str,
    pub namespace: &'a str,
    /// The pod's labels (policies select on them).
    pub labels: &'a BTreeMap<String, String>,
    /// The pod's identity labels.
    pub identity_labels: &'a BTreeMap<String, String>,
    /// The pod's named ports (ingress named ports resolve on them).
    pub named_ports: &'a NamedPorts,
}

/// Identity → its identity labels, as a persistent map: a copy costs nothing and a change to one identity copies
/// only its path, so a consumer that keeps it up to date per change can hand it out on every pass.
pub type Identities = imbl::OrdMap<u32, std::sync::Arc<BTreeMap<String, String>>>;

/// Everything the compiler selects peers from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Universe {
    /// The cluster the policies are enforced in (NetworkPolicy peers default to it).
    pub local_cluster: String,
    /// Every known identity → its identity labels.
    pub identities: Identities,
    /// Named ports of the pods of an identity (egress named ports resolve on them).
    pub named_ports: BTreeMap<u32, NamedPorts>,
    /// Node-local CIDR identities → their prefix.
    pub cidrs: BTreeMap<u32, Ipv4Net>,
    /// Cluster name → cluster labels (for `clusters` label requirements).
    pub cluster_labels: BTreeMap<String, BTreeMap<String, String>>,
}

/// One allowed (peer, protocol, port block) of a direction's table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CompiledEntry {
    /// Peer identity, or [`identity::ANY`].
    pub identity: u32,
    /// IP protocol number; 0 = any (then `port` and `plen` are 0).
    pub proto: u8,
    /// Port, host byte order, bits below `plen` cleared.
    pub port: u16,
    /// Leading port bits that must match (16: exact port, 0: any port).
    pub plen: u8,
    /// 1-based index into [`Compiled::rules`] of the first rule that allowed it.
    pub rule: u32,
}

/// Which rule a [`CompiledEntry`] comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleRef {
    pub kind: PolicyKind,
    pub namespace: String,
    pub name: String,
    /// [`policy_dir`] value.
    pub direction: u8,
    /// Index of the rule in the policy's ingress or egress rules.
    pub index: usize,
}

/// An endpoint's compiled policy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Compiled {
    /// `None`: no policy selects the endpoint for ingress (not enforced); `Some(empty)`: default deny.
    pub ingress: Option<Vec<CompiledEntry>>,
    /// As `ingress`, for egress.
    pub egress: Option<Vec<CompiledEntry>>,
    /// The rules of every selecting policy, in (kind, namespace, name, direction, index) order.
    pub rules: Vec<RuleRef>,
    /// The [`SelectorCache`] keys of the endpoint selectors the table was compiled from: it must be compiled
    /// again when one of their selections changes.
    pub selectors: BTreeSet<String>,
}

/// `first..=last` as the fewest aligned power-of-two blocks: (start, prefix length over 16 bits).
#[must_use]
pub fn port_blocks(first: u16, last: u16) -> Vec<(u16, u8)> {
    let mut out = Vec::new();
    let (mut start, end) = (u32::from(first), u32::from(last));
    while start <= end {
        let mut size: u32 = if start == 0 {
            1 << 16
        } else {
            1 << start.trailing_zeros().min(16)
        };
        while start + size - 1 > end {
            size >>= 1;
        }
        #[expect(clippy::cast_possible_truncation, reason = "start < 65536, plen <= 16")]
        out.push((start as u16, (16 - size.trailing_zeros()) as u8));
        start += size;
    }
    out
}

/// Every prefix the policies name (`cidr` and `except`): the agent allocates a CIDR identity for each.
#[must_use]
pub fn cidr_prefixes<'a>(policies: impl IntoIterator<Item = &'a Policy>) -> BTreeSet<Ipv4Net> {
    let mut out = BTreeSet::new();
    for p in policies {
        for r in p.ingress.iter().chain(&p.egress).flatten() {
            for peer in &r.peers {
                if let Peer::IpBlock { cidr, except } = peer {
                    out.insert(*cidr);
                    out.extend(except.iter().copied());
                }
            }
        }
    }
    out
}

fn proto_number(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => proto::TCP,
        Protocol::Udp => proto::UDP,
    }
}

/// Whether an identity with `labels` is one of the pods `peer` (of a policy in `namespace`) selects.
fn endpoint_matches(
    pod_selector: Option<&LabelSelector>,
    namespace_selector: Option<&LabelSelector>,
    clusters: &Clusters,
    policy_namespace: &str,
    labels: &BTreeMap<String, String>,
    universe: &Universe,
) -> bool {
    let (Some(cluster), Some(namespace)) = (labels.get(LABEL_CLUSTER), labels.get(LABEL_NAMESPACE)) else {
        return false; // reserved identities: not pods
    };
    let in_cluster = match clusters {
        Clusters::Local => *cluster == universe.local_cluster,
        Clusters::All => true,
        Clusters::Selected(sel) => {
            let empty = BTreeMap::new();
            let cl = universe.cluster_labels.get(cluster).unwrap_or(&empty);
            (sel.names.is_empty() || sel.names.contains(cluster))
                && sel.match_labels.iter().all(|(k, v)| cl.get(k) == Some(v))
                && sel.match_expressions.iter().all(|r| r.holds(cl))
        }
    };
    let in_namespace = match namespace_selector {
        None => namespace == policy_namespace,
        Some(sel) => {
            let mut ns_labels = namespace_labels(labels);
            ns_labels.insert(LABEL_CLUSTER.to_owned(), cluster.clone());
            sel.matches(&ns_labels)
        }
    };
    in_cluster && in_namespace && pod_selector.is_none_or(|s| s.matches(labels))
}

/// The [`SelectorCache`] key of an endpoint peer of a policy of `namespace`.
fn selector_key(
    namespace: &str,
    pod_selector: Option<&LabelSelector>,
    namespace_selector: Option<&LabelSelector>,
    clusters: &Clusters,
) -> String {
    serde_json::to_string(&(namespace, pod_selector, namespace_selector, clusters)).unwrap_or_default()
}

/// The identities a rule's peers select; `None`: any peer. Endpoint selectors are read from `cache` when it has
/// them (else every identity is judged); their keys are added to `used`.
fn peer_identities(
    rule: &Rule,
    policy: &Policy,
    universe: &Universe,
    cache: Option<&SelectorCache>,
    used: &mut BTreeSet<String>,
) -> Option<BTreeSet<u32>> {
    if rule.peers.is_empty() {
        return None;
    }
    let mut out = BTreeSet::new();
    for peer in &rule.peers {
        match peer {
            Peer::Endpoints {
                pod_selector,
                namespace_selector,
                clusters,
            } => {
                let key = selector_key(
                    &policy.namespace,
                    pod_selector.as_ref(),
                    namespace_selector.as_ref(),
                    clusters,
                );
                match cache.and_then(|c| c.selections.get(&key)) {
                    Some(sel) => out.extend(sel.ids.iter().copied()),
                    None => out.extend(
                        universe
                            .identities
                            .iter()
                            .filter(|(_, labels)| {
                                endpoint_matches(
                                    pod_selector.as_ref(),
                                    namespace_selector.as_ref(),
                                    clusters,
                                    &policy.namespace,
                                    labels,
                                    universe,
                                )
                            })
                            .map(|(id, _)| *id),
                    ),
                }
                used.insert(key);
            }
            Peer::IpBlock { cidr, except } => {
                out.extend(
                    universe
                        .cidrs
                        .iter()
                        .filter(|(_, net)| cidr.contains(*net) && !except.iter().any(|e| e.contains(*net)))
                        .map(|(id, _)| *id),
                );
                if cidr.prefix_len() == 0 {
                    out.insert(identity::WORLD);
                }
            }
            Peer::Ipv6Block { .. } => {}
        }
    }
    Some(out)
}

/// One endpoint selector of a policy and the identities it selects.
#[derive(Debug, Clone)]
struct Selection {
    namespace: String,
    pod_selector: Option<LabelSelector>,
    namespace_selector: Option<LabelSelector>,
    clusters: Clusters,
    ids: imbl::OrdSet<u32>,
}

impl Selection {
    fn matches(&self, labels: &BTreeMap<String, String>, universe: &Universe) -> bool {
        endpoint_matches(
            self.pod_selector.as_ref(),
            self.namespace_selector.as_ref(),
            &self.clusters,
            &self.namespace,
            labels,
            universe,
        )
    }

    fn compute(&self, universe: &Universe) -> imbl::OrdSet<u32> {
        universe
            .identities
            .iter()
            .filter(|(_, labels)| self.matches(labels, universe))
            .map(|(id, _)| *id)
            .collect()
    }
}

/// Every endpoint selector of the policies with the identities it selects, kept per change (Cilium's selector
/// cache): a new selector is judged over every identity once; a new, changed or deleted identity is judged once
/// per selector ([`SelectorCache::update_identity`]), so a change costs O(selectors), not O(identities); and the
/// selectors whose selection changed are reported ([`SelectorCache::take_changed`]), so that only the endpoints
/// compiled from them are compiled again. [`compile_with`] reads the selections from it.
#[derive(Debug, Clone, Default)]
pub struct SelectorCache {
    selections: std::collections::HashMap<String, Selection>,
    changed: BTreeSet<String>,
}

impl SelectorCache {
    /// Holds exactly the endpoint selectors of `policies`: new ones are judged over `universe`, dropped ones are
    /// forgotten (both count as changed).
    pub fn sync<'a>(&mut self, policies: impl IntoIterator<Item = &'a Policy>, universe: &Universe) {
        let mut wanted = BTreeSet::new();
        for p in policies {
            for r in p.ingress.iter().chain(&p.egress).flatten() {
                for peer in &r.peers {
                    let Peer::Endpoints {
                        pod_selector,
                        namespace_selector,
                        clusters,
                    } = peer
                    else {
                        continue;
                    };
                    let key = selector_key(
                        &p.namespace,
                        pod_selector.as_ref(),
                        namespace_selector.as_ref(),
                        clusters,
                    );
                    if !self.selections.contains_key(&key) {
                        let mut sel = Selection {
                            namespace: p.namespace.clone(),
                            pod_selector: pod_selector.clone(),
                            namespace_selector: namespace_selector.clone(),
                            clusters: clusters.clone(),
                            ids: imbl::OrdSet::new(),
                        };
                        sel.ids = sel.compute(universe);
                        self.selections.insert(key.clone(), sel);
                        self.changed.insert(key.clone());
                    }
                    wanted.insert(key);
                }
            }
        }
        let changed = &mut self.changed;
        self.selections.retain(|k, _| {
            let keep = wanted.contains(k);
            if !keep {
                changed.insert(k.clone());
            }
            keep
        });
    }

    /// Judges identity `id` (with `labels` now; `None`: it is gone) against every selector.
    pub fn update_identity(
        &mut self,
        id: u32,
        labels: Option<&BTreeMap<String, String>>,
        universe: &Universe,
    ) {
        for (key, sel) in &mut self.selections {
            let now = labels.is_some_and(|l| sel.matches(l, universe));
            if now != sel.ids.contains(&id) {
                if now {
                    sel.ids.insert(id);
                } else {
                    sel.ids.remove(&id);
                }
                self.changed.insert(key.clone());
            }
        }
    }

    /// Judges every selector over every identity again (the cluster labels or the local cluster changed, or the
    /// identities were replaced as a whole).
    pub fn refresh(&mut self, universe: &Universe) {
        for (key, sel) in &mut self.selections {
            let ids = sel.compute(universe);
            if ids != sel.ids {
                sel.ids = ids;
                self.changed.insert(key.clone());
            }
        }
    }

    /// The selectors whose selection changed since the last call.
    pub fn take_changed(&mut self) -> BTreeSet<String> {
        std::mem::take(&mut self.changed)
    }

    /// How many selectors are cached.
    #[must_use]
    pub fn len(&self) -> usize {
        self.selections.len()
    }

    /// Whether no selector is cached.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.selections.is_empty()
    }

    /// The identities the selector `key` selects, if cached.
    #[must_use]
    pub fn selected(&self, key: &str) -> Option<&imbl::OrdSet<u32>> {
        self.selections.get(key).map(|s| &s.ids)
    }
}

/// (protocol number, port, plen) entries of a named port in `ports`.
fn named(ports: Option<&NamedPorts>, name: &str, protocol: Protocol) -> impl Iterator<Item = (u8, u16, u8)> {
    ports
        .and_then(|p| p.get(name))
        .into_iter()
        .flatten()
        .filter(move |(p, _)| *p == protocol)
        .map(|(p, port)| (proto_number(*p), *port, 16))
}

/// The (identity, proto, port, plen) keys of one rule.
fn rule_keys(
    rule: &Rule,
    policy: &Policy,
    dir: u8,
    endpoint: &EndpointView<'_>,
    universe: &Universe,
    cache: Option<&SelectorCache>,
    used: &mut BTreeSet<String>,
) -> BTreeSet<(u32, u8, u16, u8)> {
    let ids: Vec<u32> = match peer_identities(rule, policy, universe, cache, used) {
        None => vec![identity::ANY],
        Some(ids) => ids.into_iter().collect(),
    };
    let mut keys = BTreeSet::new();
    if rule.ports.is_empty() {
        keys.extend(ids.iter().map(|id| (*id, 0, 0, 0)));
        return keys;
    }
    for pr in &rule.ports {
        let proto = proto_number(pr.protocol);
        match &pr.port {
            None => keys.extend(ids.iter().map(|id| (*id, proto, 0, 0))),
            Some(Port::Range { first, last }) => {
                for (port, plen) in port_blocks(*first, *last) {
                    keys.extend(ids.iter().map(|id| (*id, proto, port, plen)));
                }
            }
            Some(Port::Named(name)) if dir == policy_dir::INGRESS => {
                for (proto, port, plen) in named(Some(endpoint.named_ports), name, pr.protocol) {
                    keys.extend(ids.iter().map(|id| (*id, proto, port, plen)));
                }
            }
            Some(Port::Named(name)) => {
                for id in &ids {
                    if *id == identity::ANY {
                        // Any peer: the port of that name on any known identity.
                        for ports in universe.named_ports.values() {
                            keys.extend(
                                named(Some(ports), name, pr.protocol).map(|(pr, p, l)| (*id, pr, p, l)),
                            );
                        }
                    } else {
                        keys.extend(
                            named(universe.named_ports.get(id), name, pr.protocol)
                                .map(|(pr, p, l)| (*id, pr, p, l)),
                        );
                    }
                }
            }
        }
    }
    keys
}

/// The policy table of `endpoint`: for each direction, the union of the allows of every policy that selects it.
/// Entries are deduplicated (the first rule that allows a key names it) and sorted.
#[must_use]
pub fn compile<'a>(
    endpoint: &EndpointView<'_>,
    policies: impl IntoIterator<Item = &'a Policy>,
    universe: &Universe,
) -> Compiled {
    compile_with(endpoint, policies, universe, None)
}

/// [`compile`], reading endpoint selections from `cache` where it has them (the same result, without judging
/// every identity).
#[must_use]
pub fn compile_with<'a>(
    endpoint: &EndpointView<'_>,
    policies: impl IntoIterator<Item = &'a Policy>,
    universe: &Universe,
    cache: Option<&SelectorCache>,
) -> Compiled {
    let mut selecting: Vec<&Policy> = policies
        .into_iter()
        .filter(|p| p.selects(endpoint.namespace, endpoint.labels))
        .collect();
    selecting.sort_by(|a, b| (a.kind, &a.namespace, &a.name).cmp(&(b.kind, &b.namespace, &b.name)));
    selecting.dedup_by(|a, b| (a.kind, &a.namespace, &a.name) == (b.kind, &b.namespace, &b.name));
    let mut out = Compiled::default();
    for dir in [policy_dir::INGRESS, policy_dir::EGRESS] {
        let mut table: Option<BTreeMap<(u32, u8, u16, u8), u32>> = None;
        for p in &selecting {
            let Some(rules) = p.rules(dir) else {
                continue;
            };
            let table = table.get_or_insert_default();
            for (index, r) in rules.iter().enumerate() {
                out.rules.push(RuleRef {
                    kind: p.kind,
                    namespace: p.namespace.clone(),
                    name: p.name.clone(),
                    direction: dir,
                    index,
                });
                #[expect(clippy::cast_possible_truncation, reason = "far fewer than 2^32 rules")]
                let id = out.rules.len() as u32;
                for key in rule_keys(r, p, dir, endpoint, universe, cache, &mut out.selectors) {
                    table.entry(key).or_insert(id);
                }
            }
        }
        let entries = table.map(|t| {
            t.into_iter()
                .map(|((identity, proto, port, plen), rule)| CompiledEntry {
                    identity,
                    proto,
                    port,
                    plen,
                    rule,
                })
                .collect()
        });
        if dir == policy_dir::INGRESS {
            out.ingress = entries;
        } else {
            out.egress = entries;
        }
    }
    out
}

impl fmt::Display for CompiledEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "identity {} proto {} port {}/{} (rule {})",
            self.identity, self.proto, self.port, self.plen, self.rule
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{LABEL_NAMESPACE_LABELS_PREFIX, NAMESPACE_NAME_LABEL};

    use crate::test_util::labels;

    /// Identity labels of a pod with `app` in `ns` of `cluster` (namespace labelled `team=<ns>`).
    fn id_labels(cluster: &str, ns: &str, app: &str) -> BTreeMap<String, String> {
        labels(&[
            ("app", app),
            (LABEL_NAMESPACE, ns),
            (&format!("{LABEL_NAMESPACE_LABELS_PREFIX}team"), ns),
            (
                &format!("{LABEL_NAMESPACE_LABELS_PREFIX}{NAMESPACE_NAME_LABEL}"),
                ns,
            ),
            (LABEL_CLUSTER, cluster),
        ])
    }

    const EAST_WEB: u32 = identity::compose(1, 300);
    const EAST_DB: u32 = identity::compose(1, 301);
    const EAST_OTHER_NS_WEB: u32 = identity::compose(1, 302);
    const WEST_WEB: u32 = identity::compose(2, 300);
    const NORTH_WEB: u32 = identity::compose(3, 300);
    const CIDR_10_8: u32 = identity::FIRST_CIDR;
    const CIDR_10_1_16: u32 = identity::FIRST_CIDR + 1;
    const CIDR_10_1_2_24: u32 = identity::FIRST_CIDR + 2;
    const CIDR_192: u32 = identity::FIRST_CIDR + 3;

    fn universe() -> Universe {
        let mut u = Universe {
            local_cluster: "east".into(),
            ..Default::default()
        };
        let arc = std::sync::Arc::new;
        u.identities
            .insert(EAST_WEB, arc(id_labels("east", "shop", "web")));
        u.identities.insert(EAST_DB, arc(id_labels("east", "shop", "db")));
        u.identities
            .insert(EAST_OTHER_NS_WEB, arc(id_labels("east", "blog", "web")));
        u.identities
            .insert(WEST_WEB, arc(id_labels("west", "shop", "web")));
        u.identities
            .insert(NORTH_WEB, arc(id_labels("north", "shop", "web")));
        // Reserved identities as an agent might list them: no pod labels.
        u.identities
            .insert(identity::WORLD, arc(labels(&[("reserved", "world")])));
        u.identities.insert(identity::PENDING, arc(BTreeMap::new()));
        u.named_ports
            .insert(EAST_DB, [("sql".to_owned(), vec![(Protocol::Tcp, 5432)])].into());
        u.named_ports.insert(
            WEST_WEB,
            [("http".to_owned(), vec![(Protocol::Tcp, 8080)])].into(),
        );
        u.cidrs.insert(CIDR_10_8, "10.0.0.0/8".parse().expect("cidr"));
        u.cidrs.insert(CIDR_10_1_16, "10.1.0.0/16".parse().expect("cidr"));
        u.cidrs
            .insert(CIDR_10_1_2_24, "10.1.2.0/24".parse().expect("cidr"));
        u.cidrs.insert(CIDR_192, "192.168.0.0/16".parse().expect("cidr"));
        u.cluster_labels
            .insert("west".into(), labels(&[("stage", "prod")]));
        u.cluster_labels
            .insert("north".into(), labels(&[("stage", "canary")]));
        u
    }

    struct Ep {
        labels: BTreeMap<String, String>,
        id: BTreeMap<String, String>,
        ports: NamedPorts,
    }

    /// The local endpoint `app=api` in east/shop, with named port `http` = 8080/TCP and `dns` = 53/UDP.
    fn api() -> Ep {
        Ep {
            labels: labels(&[("app", "api")]),
            id: id_labels("east", "shop", "api"),
            ports: [
                ("http".to_owned(), vec![(Protocol::Tcp, 8080)]),
                ("dns".to_owned(), vec![(Protocol::Udp, 53)]),
            ]
            .into(),
        }
    }

    fn view(e: &Ep) -> EndpointView<'_> {
        EndpointView {
            cluster: "east",
            namespace: "shop",
            labels: &e.labels,
            identity_labels: &e.id,
            named_ports: &e.ports,
        }
    }

    fn k8s(text: &str) -> Policy {
        policy_yaml(PolicyKind::Kubernetes, text).expect("valid policy")
    }

    fn mesh(text: &str) -> Policy {
        policy_yaml(PolicyKind::Mesh, text).expect("valid policy")
    }

    fn policy_yaml(kind: PolicyKind, spec: &str) -> Result<Policy, PolicyError> {
        match kind {
            PolicyKind::Mesh => {
                let spec: MeshNetworkPolicySpec = crate::yaml::from_str(spec).expect("spec yaml");
                Policy::from_spec(kind, "shop", "p", &spec)
            }
            PolicyKind::Kubernetes => {
                let spec: networking::NetworkPolicySpec = crate::yaml::from_str(spec).expect("spec yaml");
                Policy::from_k8s("shop", "p", &spec)
            }
        }
    }

    fn ids(entries: &[CompiledEntry]) -> Vec<u32> {
        let mut v: Vec<u32> = entries.iter().map(|e| e.identity).collect();
        v.dedup();
        v
    }

    fn ingress(p: &[Policy]) -> Vec<CompiledEntry> {
        let e = api();
        compile(&view(&e), p, &universe())
            .ingress
            .expect("ingress enforced")
    }

    #[test]
    fn port_ranges_become_aligned_blocks() {
        assert_eq!(port_blocks(80, 80), vec![(80, 16)]);
        assert_eq!(port_blocks(1024, 2047), vec![(1024, 6)]);
        let all = port_blocks(1, 65535);
        assert_eq!(all.len(), 16);
        assert_eq!(all[0], (1, 16));
        assert_eq!(all[15], (32768, 1));
        assert_eq!(port_blocks(0, 65535), vec![(0, 0)]);
        assert_eq!(port_blocks(8080, 8083), vec![(8080, 14)]);
        assert_eq!(port_blocks(79, 81), vec![(79, 16), (80, 15)]);
        // Every port of the range is covered exactly once, and nothing else.
        for (first, last) in [(1u16, 65535u16), (3, 1000), (65535, 65535), (1000, 1030)] {
            let blocks = port_blocks(first, last);
            let mut covered = 0u32;
            for (start, plen) in &blocks {
                let size = 1u32 << (16 - u32::from(*plen));
                assert_eq!(u32::from(*start) % size, 0, "aligned {start}/{plen}");
                assert!(u32::from(*start) >= u32::from(first));
                assert!(u32::from(*start) + size - 1 <= u32::from(last));
                covered += size;
            }
            assert_eq!(covered, u32::from(last) - u32::from(first) + 1);
        }
    }

    #[test]
    fn unselected_endpoint_is_not_enforced_and_ingress_only_leaves_egress_alone() {
        let other = k8s("podSelector: {matchLabels: {app: db}}\ningress: [{}]\n");
        let e = api();
        let c = compile(&view(&e), [&other], &universe());
        assert_eq!((c.ingress, c.egress), (None, None));

        let deny = k8s("podSelector: {}\n");
        let c = compile(&view(&e), [&deny], &universe());
        assert_eq!(c.ingress, Some(vec![]), "selected, no rules: default deny");
        assert_eq!(c.egress, None, "ingress-only policy does not enforce egress");
        assert!(c.rules.is_empty());

        let defaulted = k8s("podSelector: {}\npolicyTypes: []\n");
        assert!(
            defaulted.ingress.is_some() && defaulted.egress.is_none(),
            "[] is defaulted"
        );
        let both = k8s("podSelector: {}\npolicyTypes: [Egress]\n");
        let c = compile(&view(&e), [&both], &universe());
        assert_eq!((c.ingress, c.egress), (None, Some(vec![])));

        let egress_rules = k8s("podSelector: {}\negress: [{ports: [{port: 53, protocol: UDP}]}]\n");
        assert!(egress_rules.ingress.is_some() && egress_rules.egress.is_some());
        let c = compile(&view(&e), [&egress_rules], &universe());
        assert_eq!(
            c.egress,
            Some(vec![CompiledEntry {
                identity: identity::ANY,
                proto: proto::UDP,
                port: 53,
                plen: 16,
                rule: 1
            }])
        );
    }

    #[test]
    fn network_policy_peers_default_to_the_local_cluster() {
        let p = k8s(
            "podSelector: {matchLabels: {app: api}}\ningress: [{from: [{podSelector: {matchLabels: {app: web}}}]}]\n",
        );
        assert_eq!(
            ids(&ingress(&[p])),
            [EAST_WEB],
            "same namespace, local cluster only"
        );
        // Naming the cluster label opens the selector to other clusters (matched like any label).
        let p = k8s(
            "podSelector: {}\ningress: [{from: [{podSelector: {matchLabels: {app: web, io.cilium.k8s.policy.cluster: west}}}]}]\n",
        );
        assert_eq!(ids(&ingress(&[p])), [WEST_WEB]);
        let p = k8s(
            "podSelector: {}\ningress: [{from: [{podSelector: {matchLabels: {app: web}, matchExpressions: [{key: io.cilium.k8s.policy.cluster, operator: Exists}]}}]}]\n",
        );
        assert_eq!(ids(&ingress(&[p])), [EAST_WEB, WEST_WEB, NORTH_WEB]);
        let p = k8s(
            "podSelector: {}\ningress: [{from: [{namespaceSelector: {matchLabels: {io.cilium.k8s.policy.cluster: north}}}]}]\n",
        );
        assert_eq!(ids(&ingress(&[p])), [NORTH_WEB], "in a namespaceSelector too");
    }

    #[test]
    fn mesh_policy_peers_select_clusters() {
        let p = mesh("podSelector: {}\ningress: [{from: [{podSelector: {matchLabels: {app: web}}}]}]\n");
        assert_eq!(
            ids(&ingress(&[p])),
            [EAST_WEB, WEST_WEB, NORTH_WEB],
            "no clusters: every cluster"
        );
        let p = mesh(
            "podSelector: {}\ningress: [{from: [{podSelector: {matchLabels: {app: web}}, clusters: {names: [west, north]}}]}]\n",
        );
        assert_eq!(ids(&ingress(&[p])), [WEST_WEB, NORTH_WEB]);
        let p = mesh(
            "podSelector: {}\ningress: [{from: [{podSelector: {}, clusters: {matchLabels: {stage: canary}}}]}]\n",
        );
        assert_eq!(ids(&ingress(&[p])), [NORTH_WEB]);
        let p = mesh(
            "podSelector: {}\ningress: [{from: [{clusters: {names: [west, north], matchExpressions: [{key: stage, operator: NotIn, values: [canary]}]}}]}]\n",
        );
        assert_eq!(
            ids(&ingress(&[p])),
            [WEST_WEB],
            "names and labels both hold; clusters alone: the policy's namespace"
        );
    }

    #[test]
    fn the_selector_cache_follows_identity_changes_and_compiles_the_same() {
        let policies = [
            mesh("podSelector: {}\ningress: [{from: [{podSelector: {matchLabels: {app: web}}}]}]\n"),
            k8s("podSelector: {}\negress: [{to: [{namespaceSelector: {matchLabels: {team: blog}}}]}]\n"),
            mesh(
                "podSelector: {}\ningress: [{from: [{podSelector: {}, clusters: {matchLabels: {stage: canary}}}]}]\n",
            ),
        ];
        let mut policies = policies;
        policies[2].name = "canary".into();
        let e = api();
        let mut u = universe();
        let mut cache = SelectorCache::default();
        cache.sync(&policies, &u);
        assert_eq!(cache.len(), 3);
        assert_eq!(cache.take_changed().len(), 3, "new selectors count as changed");
        let same = |u: &Universe, cache: &SelectorCache| {
            let with = compile_with(&view(&e), &policies, u, Some(cache));
            assert_eq!(with, compile(&view(&e), &policies, u));
            with
        };
        let before = same(&u, &cache);
        assert_eq!(before.selectors.len(), 3, "{:?}", before.selectors);

        // A new web pod identity in west: only the `app: web` selector changes.
        let new = identity::compose(2, 999);
        let web = std::sync::Arc::new(id_labels("west", "shop", "web"));
        u.identities.insert(new, web.clone());
        cache.update_identity(new, Some(&web), &u);
        assert_eq!(cache.take_changed().len(), 1);
        let after = same(&u, &cache);
        assert!(ids(after.ingress.as_ref().expect("ingress")).contains(&new));

        // Relabelled into blog: the web selector loses it, the blog namespace selector does not take it (another
        // cluster than the NetworkPolicy's).
        let relabelled = std::sync::Arc::new(id_labels("west", "blog", "db"));
        u.identities.insert(new, relabelled.clone());
        cache.update_identity(new, Some(&relabelled), &u);
        assert_eq!(cache.take_changed().len(), 1);
        same(&u, &cache);

        // Deleted; an identity no selector selects changes nothing.
        u.identities.remove(&new);
        cache.update_identity(new, None, &u);
        assert!(
            cache.take_changed().is_empty(),
            "it was selected by none any more"
        );
        let reserved = std::sync::Arc::new(labels(&[("reserved", "x")]));
        cache.update_identity(identity::WORLD, Some(&reserved), &u);
        assert!(cache.take_changed().is_empty());
        assert_eq!(same(&u, &cache), before);

        // Cluster labels change: a refresh re-judges; a dropped policy drops its selector.
        u.cluster_labels
            .insert("west".into(), labels(&[("stage", "canary")]));
        cache.refresh(&u);
        assert_eq!(cache.take_changed().len(), 1);
        same(&u, &cache);
        cache.sync(&policies[..2], &u);
        assert_eq!((cache.len(), cache.take_changed().len()), (2, 1));
    }

    #[test]
    fn namespace_selectors_match_namespace_labels() {
        let p =
            k8s("podSelector: {}\ningress: [{from: [{namespaceSelector: {matchLabels: {team: blog}}}]}]\n");
        assert_eq!(ids(&ingress(&[p])), [EAST_OTHER_NS_WEB]);
        let p = k8s(
            "podSelector: {}\ningress: [{from: [{namespaceSelector: {}, podSelector: {matchLabels: {app: web}}}]}]\n",
        );
        assert_eq!(
            ids(&ingress(&[p])),
            [EAST_WEB, EAST_OTHER_NS_WEB],
            "{{}}: every namespace"
        );
        let p = k8s(
            "podSelector: {}\ningress: [{from: [{namespaceSelector: {matchExpressions: [{key: kubernetes.io/metadata.name, operator: In, values: [shop]}]}}]}]\n",
        );
        assert_eq!(ids(&ingress(&[p])), [EAST_WEB, EAST_DB]);
    }

    #[test]
    fn reserved_identities_are_never_selected_by_pod_selectors() {
        let p = mesh("podSelector: {}\ningress: [{from: [{namespaceSelector: {}, podSelector: {}}]}]\n");
        let got = ids(&ingress(&[p]));
        assert!(
            !got.contains(&identity::WORLD) && !got.contains(&identity::PENDING),
            "{got:?}"
        );
        assert_eq!(got.len(), 5);
    }

    #[test]
    fn policies_are_a_union_and_entries_deduplicated() {
        let a = k8s(
            "podSelector: {}\ningress: [{from: [{podSelector: {matchLabels: {app: web}}}], ports: [{port: 80}]}]\n",
        );
        let mut b = k8s(
            "podSelector: {matchLabels: {app: api}}\ningress: [{from: [{podSelector: {matchLabels: {app: db}}}]}, {from: [{podSelector: {matchLabels: {app: web}}}], ports: [{port: 80}]}]\n",
        );
        b.name = "q".into();
        let e = api();
        let c = compile(&view(&e), [&b, &a], &universe());
        assert_eq!(
            c.ingress,
            Some(vec![
                CompiledEntry {
                    identity: EAST_WEB,
                    proto: proto::TCP,
                    port: 80,
                    plen: 16,
                    rule: 1
                },
                CompiledEntry {
                    identity: EAST_DB,
                    proto: 0,
                    port: 0,
                    plen: 0,
                    rule: 2
                },
            ])
            .map(|mut v: Vec<CompiledEntry>| {
                v.sort();
                v
            })
        );
        assert_eq!(
            c.rules
                .iter()
                .map(|r| (r.name.as_str(), r.index))
                .collect::<Vec<_>>(),
            [("p", 0), ("q", 0), ("q", 1)],
            "rules in policy name order; the duplicate keeps the first rule"
        );
        assert_eq!(
            c,
            compile(&view(&e), [&a, &b], &universe()),
            "order of policies does not matter"
        );
    }

    #[test]
    fn ports_protocols_and_ranges() {
        let p = k8s(
            "podSelector: {}\ningress: [{ports: [{protocol: UDP}, {port: 1024, endPort: 2047}, {port: 443}]}]\n",
        );
        let got: Vec<(u32, u8, u16, u8)> = ingress(&[p])
            .iter()
            .map(|e| (e.identity, e.proto, e.port, e.plen))
            .collect();
        assert_eq!(
            got,
            [
                (identity::ANY, proto::TCP, 443, 16),
                (identity::ANY, proto::TCP, 1024, 6),
                (identity::ANY, proto::UDP, 0, 0)
            ]
        );
        let p = k8s("podSelector: {}\ningress: [{}]\n");
        assert_eq!(
            ingress(&[p]),
            [CompiledEntry {
                identity: identity::ANY,
                proto: 0,
                port: 0,
                plen: 0,
                rule: 1
            }],
            "a rule without peers or ports allows everything"
        );
    }

    #[test]
    fn named_ports_resolve_on_the_endpoint_for_ingress_and_on_peers_for_egress() {
        let p = k8s(
            "podSelector: {}\ningress: [{ports: [{port: http}, {port: dns, protocol: UDP}, {port: dns}, {port: nope}]}]\n",
        );
        let got: Vec<(u8, u16)> = ingress(&[p]).iter().map(|e| (e.proto, e.port)).collect();
        assert_eq!(
            got,
            [(proto::TCP, 8080), (proto::UDP, 53)],
            "dns is UDP only; unknown names allow nothing"
        );

        let p = mesh(
            "podSelector: {}\negress: [{to: [{podSelector: {}}], ports: [{port: sql}, {port: http}]}]\n",
        );
        let e = api();
        let c = compile(&view(&e), [&p], &universe());
        let got: Vec<(u32, u16)> = c
            .egress
            .expect("egress")
            .iter()
            .map(|e| (e.identity, e.port))
            .collect();
        assert_eq!(
            got,
            [(EAST_DB, 5432), (WEST_WEB, 8080)],
            "each peer identity its own port"
        );
    }

    #[test]
    fn ip_blocks_select_cidr_identities_and_world() {
        let p =
            k8s("podSelector: {}\negress: [{to: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16]}}]}]\n");
        assert_eq!(
            cidr_prefixes([&p])
                .into_iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>(),
            ["10.0.0.0/8", "10.1.0.0/16"]
        );
        let e = api();
        let c = compile(&view(&e), [&p], &universe());
        assert_eq!(
            ids(&c.egress.expect("egress")),
            [CIDR_10_8],
            "10.1.2.0/24 is inside the except"
        );
        let p = k8s(
            "podSelector: {}\negress: [{to: [{ipBlock: {cidr: 0.0.0.0/0, except: [192.168.0.0/16]}}]}]\n",
        );
        let c = compile(&view(&e), [&p], &universe());
        assert_eq!(
            ids(&c.egress.expect("egress")),
            [identity::WORLD, CIDR_10_8, CIDR_10_1_16, CIDR_10_1_2_24],
            "0.0.0.0/0 selects world too, never pending"
        );
    }

    #[test]
    fn ipv6_blocks_are_valid_and_select_nothing() {
        let p = k8s(
            "podSelector: {}\negress: [{to: [{ipBlock: {cidr: 'fd00::/8', except: ['fd00:1::/32']}}]}, {to: [{ipBlock: {cidr: 10.0.0.0/8}}]}]\n",
        );
        let e = api();
        let c = compile(&view(&e), [&p], &universe());
        assert_eq!(
            ids(&c.egress.expect("egress")),
            [CIDR_10_8, CIDR_10_1_16, CIDR_10_1_2_24]
        );
        assert_eq!(cidr_prefixes([&p]).len(), 1);
        for (text, want) in [
            (
                "egress: [{to: [{ipBlock: {cidr: 'fd00::1/8'}}]}]",
                "spec.egress[0].to[0].ipBlock.cidr",
            ),
            (
                "egress: [{to: [{ipBlock: {cidr: 'fd00::/8', except: [10.0.0.0/8]}}]}]",
                "spec.egress[0].to[0].ipBlock.except[0]",
            ),
            (
                "egress: [{to: [{ipBlock: {cidr: 'fd00::/8', except: ['fe00::/16']}}]}]",
                "spec.egress[0].to[0].ipBlock.except[0]",
            ),
        ] {
            let e = policy_yaml(PolicyKind::Kubernetes, text).expect_err(text);
            assert_eq!(e.field, want, "{text}: {e}");
        }
    }

    #[test]
    fn invalid_policies_name_the_field() {
        let field = |kind, text: &str| policy_yaml(kind, text).expect_err(text).field;
        let k = PolicyKind::Kubernetes;
        let m = PolicyKind::Mesh;
        for (kind, text, want) in [
            (
                k,
                "ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/33}}]}]",
                "spec.ingress[0].from[0].ipBlock.cidr",
            ),
            (
                k,
                "ingress: [{from: [{ipBlock: {cidr: 10.0.0.1/8}}]}]",
                "spec.ingress[0].from[0].ipBlock.cidr",
            ),
            (
                k,
                "egress: [{to: [{ipBlock: {cidr: 10.0.0.0/8, except: [11.0.0.0/16]}}]}]",
                "spec.egress[0].to[0].ipBlock.except[0]",
            ),
            (
                k,
                "egress: [{to: [{ipBlock: {cidr: 10.0.0.0/8}, podSelector: {}}]}]",
                "spec.egress[0].to[0]",
            ),
            (
                k,
                "ingress: [{ports: [{port: 0}]}]",
                "spec.ingress[0].ports[0].port",
            ),
            (
                k,
                "ingress: [{ports: [{port: 65536}]}]",
                "spec.ingress[0].ports[0].port",
            ),
            (
                k,
                "ingress: [{ports: [{port: 80, endPort: 79}]}]",
                "spec.ingress[0].ports[0].endPort",
            ),
            (
                k,
                "ingress: [{ports: [{port: 80, endPort: 70000}]}]",
                "spec.ingress[0].ports[0].endPort",
            ),
            (
                k,
                "ingress: [{ports: [{port: http, endPort: 90}]}]",
                "spec.ingress[0].ports[0].endPort",
            ),
            (
                k,
                "ingress: [{ports: [{endPort: 90}]}]",
                "spec.ingress[0].ports[0].endPort",
            ),
            (
                k,
                "ingress: [{ports: [{port: 80, protocol: SCTP}]}]",
                "spec.ingress[0].ports[0].protocol",
            ),
            (
                k,
                "ingress: [{ports: [{port: Http_1}]}]",
                "spec.ingress[0].ports[0].port",
            ),
            (
                k,
                "podSelector: {matchExpressions: [{key: app, operator: Like, values: [a]}]}",
                "spec.podSelector.matchExpressions[0].operator",
            ),
            (
                k,
                "podSelector: {matchExpressions: [{key: app, operator: In}]}",
                "spec.podSelector.matchExpressions[0].values",
            ),
            (
                k,
                "podSelector: {matchExpressions: [{key: app, operator: Exists, values: [a]}]}",
                "spec.podSelector.matchExpressions[0].values",
            ),
            (
                k,
                "podSelector: {matchLabels: {'bad key!': a}}",
                "spec.podSelector.matchLabels",
            ),
            (
                k,
                "ingress: [{from: [{namespaceSelector: {matchLabels: {team: -a}}}]}]",
                "spec.ingress[0].from[0].namespaceSelector.matchLabels.team",
            ),
            (k, "policyTypes: [Sideways]", "spec.policyTypes[0]"),
            (k, "ingress: [{from: [{}]}]", "spec.ingress[0].from[0]"),
            (m, "ingress: [{from: [{}]}]", "spec.ingress[0].from[0]"),
            (
                m,
                "ingress: [{from: [{clusters: {names: [West]}}]}]",
                "spec.ingress[0].from[0].clusters.names[0]",
            ),
            (
                m,
                "ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8}, clusters: {names: [west]}}]}]",
                "spec.ingress[0].from[0]",
            ),
            (
                m,
                "egress: [{to: [{podSelector: {}, clusters: {matchExpressions: [{key: stage, operator: In}]}}]}]",
                "spec.egress[0].to[0].clusters.matchExpressions[0].values",
            ),
        ] {
            assert_eq!(field(kind, text), want, "{text}");
        }
        let e = policy_yaml(k, "ingress: [{ports: [{port: 80, protocol: SCTP}]}]").expect_err("sctp");
        assert!(
            e.to_string().contains("SCTP") && e.to_string().contains("TCP or UDP"),
            "{e}"
        );
        let e = Policy::from_spec(
            PolicyKind::Kubernetes,
            "shop",
            "p",
            &MeshNetworkPolicySpec {
                ingress: vec![IngressRuleSpec {
                    from: vec![PeerSpec {
                        pod_selector: Some(LabelSelector::default()),
                        clusters: Some(ClusterSelector::default()),
                        ..Default::default()
                    }],
                    ports: vec![],
                }],
                ..Default::default()
            },
        )
        .expect_err("clusters in a NetworkPolicy");
        assert_eq!(e.field, "spec.ingress[0].from[0].clusters");
    }

    #[test]
    fn mesh_spec_refuses_unknown_fields() {
        let e = crate::yaml::from_str::<MeshNetworkPolicySpec>(
            "podSelector: {}\ningress: [{from: [{podSelector: {}, clusterz: {names: [west]}}]}]\n",
        )
        .expect_err("unknown field");
        assert!(e.to_string().contains("clusterz"), "{e}");
    }
}
