//! fleetmesh's CustomResourceDefinitions (`fleetmesh.io/v1alpha1`): `TrafficPolicy`, `StagedRollout` and
//! `MeshNetworkPolicy`, whose specs are mesh-model's types (so a manifest, the API server and the CRD's schema
//! describe the same shape), and `MeshNode`, each node's report written by its agent (status only).
//! The chart's `crds/` folder holds the YAML generated from these types (see [`crd_files`]).

use std::borrow::Cow;
use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use kube::CustomResource;
use kube::CustomResourceExt as _;
use mesh_model::policy::MeshNetworkPolicySpec;
use mesh_model::traffic::{StagedRolloutSpec, TrafficPolicySpec};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The share of a global service's new connections that each group of clusters receives.
// The spec of a `TrafficPolicy`: mesh-model's `TrafficPolicySpec` as it is (doc comments become the schema's
// descriptions, so they speak to users).
#[derive(CustomResource, Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(transparent)]
#[kube(
    group = "fleetmesh.io",
    version = "v1alpha1",
    kind = "TrafficPolicy",
    doc = "fleetmesh TrafficPolicy: weights of cluster groups for a global service's new connections",
    plural = "trafficpolicies",
    shortname = "tp",
    namespaced,
    status = "ObjectStatus",
    printcolumn = r#"{"name":"Service","type":"string","jsonPath":".spec.service"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
pub struct TrafficPolicyCrdSpec(pub TrafficPolicySpec);

/// Moves a global service's new connections from the `from` clusters to the `to` clusters in steps, holding
/// each step while the gate holds.
// The spec of a `StagedRollout`: mesh-model's `StagedRolloutSpec` as it is.
#[derive(CustomResource, Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(transparent)]
#[kube(
    group = "fleetmesh.io",
    version = "v1alpha1",
    kind = "StagedRollout",
    doc = "fleetmesh StagedRollout: a gated, stepwise move of a global service's traffic between clusters",
    plural = "stagedrollouts",
    shortname = "sr",
    namespaced,
    status = "StagedRolloutStatus",
    printcolumn = r#"{"name":"Service","type":"string","jsonPath":".spec.service"}"#,
    printcolumn = r#"{"name":"Valid","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.progress.phase"}"#,
    printcolumn = r#"{"name":"Step","type":"integer","jsonPath":".status.progress.step"}"#,
    printcolumn = r#"{"name":"Nodes","type":"integer","jsonPath":".status.progress.nodes"}"#,
    printcolumn = r#"{"name":"Halted","type":"integer","jsonPath":".status.progress.nodesHalted"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
pub struct StagedRolloutCrdSpec(pub StagedRolloutSpec);

/// A Kubernetes NetworkPolicy whose peers may select pods of other clusters of the mesh (`clusters`).
// The spec of a `MeshNetworkPolicy`: mesh-model's `MeshNetworkPolicySpec` as it is.
#[derive(CustomResource, Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(transparent)]
#[kube(
    group = "fleetmesh.io",
    version = "v1alpha1",
    kind = "MeshNetworkPolicy",
    doc = "fleetmesh MeshNetworkPolicy: a NetworkPolicy whose peers may select pods of other clusters of the mesh",
    plural = "meshnetworkpolicies",
    shortname = "mnp",
    namespaced,
    status = "ObjectStatus",
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
pub struct MeshNetworkPolicyCrdSpec(pub MeshNetworkPolicySpec);

/// What fleetmesh reports back on its objects (the status subresource).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ObjectStatus {
    /// `metadata.generation` of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Whether the clustermesh-apiserver accepted the object: `Valid`, or `Invalid` (skipped; a previous valid
    /// version stays in force) with the reason in `message`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// Why the object is `Invalid`, naming the field (as the clustermesh-apiserver logs it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// What fleetmesh reports on a `StagedRollout`: whether it was accepted (as on every fleetmesh object) and the
/// cluster's summary of its progress on the nodes (both written by the clustermesh-apiserver, each merge-patching
/// only its own keys). Each node's own progress is in its `MeshNode` (`kubectl get meshnodes`), not here.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StagedRolloutStatus {
    /// Validity, as on every fleetmesh object.
    #[serde(flatten)]
    pub validity: ObjectStatus,
    /// The cluster's summary of the rollout on the nodes that exist, from their `MeshNode`s (written by the
    /// clustermesh-apiserver when it changes, at most once per 5 s; a change to `Halted` at once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<RolloutProgress>,
}

/// A node as fleetmesh sees it, named after the Kubernetes node and owned by it (garbage-collected with it).
/// Written only by that node's agent; read only by the clustermesh-apiserver. It has nothing to configure: the
/// spec is empty, the report is the status.
// Cluster-scoped, like the Node it reports on (as Cilium's CiliumNode).
#[derive(CustomResource, Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "fleetmesh.io",
    version = "v1alpha1",
    kind = "MeshNode",
    doc = "fleetmesh MeshNode: what a node's agent reports (the staged rollouts it runs); written by that agent only",
    plural = "meshnodes",
    shortname = "mn",
    status = "MeshNodeStatus",
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
pub struct MeshNodeSpec {}

/// What a node's agent reports.
// `E`: readers that take the entries one by one read them as JSON values (see `progress::stored_entries`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", bound(deserialize = "E: Deserialize<'de>"))]
pub struct MeshNodeStatus<E = NodeProgress> {
    /// The staged rollouts this node runs, by `<namespace>/<name>`, as it runs them for its clients (written on a
    /// phase or step change at once, otherwise at most every 30 s while the rollout progresses).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rollouts: BTreeMap<String, E>,
}

impl<E> Default for MeshNodeStatus<E> {
    fn default() -> Self {
        Self {
            rollouts: BTreeMap::new(),
        }
    }
}

/// Where a staged rollout is, on a node or (summarized) in the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum RolloutPhase {
    /// Holding a step; it advances when the hold time is served with the gate held.
    Progressing,
    /// Held by `meshctl rollout pause`: the step's weights stay, its hold time stops.
    Paused,
    /// The gate failed: every new connection goes to `from`.
    Halted,
    /// Every step held: the last step's weights stay.
    Completed,
    /// Stopped by `meshctl rollout abort`: every new connection goes to `from`.
    Aborted,
}

/// A staged rollout as one node runs it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeProgress {
    pub phase: RolloutPhase,
    /// The current step, from 1.
    pub step: u32,
    /// How many steps the rollout has.
    pub steps: u32,
    /// Percent of this node's new connections sent to `to` now (0 when halted or aborted).
    pub percent: u32,
    /// Hold time served in the current step, seconds.
    pub held_seconds: u64,
    /// Failed / new connections to the `to` backends during the current step (the gate's measure).
    pub failure_ratio: f64,
    /// New connections to the `to` backends during the current step.
    pub new_flows: u64,
    /// Of those, how many the backends reset.
    pub resets: u64,
    /// Why the rollout halted, or other news.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// When the agent wrote this entry (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<String>,
}

/// The cluster's summary of a staged rollout's entries in the `MeshNode`s (see `crate::progress::summarize` for the rule).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutProgress {
    /// `Halted` if any node halted, else `Aborted` if any node aborted, else `Paused` if any node is paused, else
    /// `Progressing` if any node progresses, else (every node completed) `Completed`.
    pub phase: RolloutPhase,
    /// The lowest step of any node, from 1.
    pub step: u32,
    /// How many steps the rollout has.
    pub steps: u32,
    /// How many nodes report the rollout.
    pub nodes: u32,
    /// How many of them halted.
    pub nodes_halted: u32,
    /// The first halted nodes by name (at most 10; `nodesHalted` counts them all).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub halted_nodes: Vec<String>,
}

/// The Multi-Cluster Services API's `ServiceExport` (`multicluster.x-k8s.io/v1alpha1`): not fleetmesh's (the chart
/// does not install its CRD), typed here for its API path. fleetmesh reads only its name (the manifest rules check
/// the rest of it).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServiceExport {
    pub metadata: ObjectMeta,
}

impl kube::Resource for ServiceExport {
    type DynamicType = ();
    type Scope = k8s_openapi::NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        "ServiceExport".into()
    }

    fn group(_: &()) -> Cow<'_, str> {
        "multicluster.x-k8s.io".into()
    }

    fn version(_: &()) -> Cow<'_, str> {
        "v1alpha1".into()
    }

    fn plural(_: &()) -> Cow<'_, str> {
        "serviceexports".into()
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// The MCS API's `ServiceImport` (`multicluster.x-k8s.io/v1alpha1`): not fleetmesh's CRD either, typed here for its
/// API path. The agents read the `spec.ips` of those the clustermesh-apiserver manages (the manifest rules).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServiceImport {
    pub metadata: ObjectMeta,
}

impl kube::Resource for ServiceImport {
    type DynamicType = ();
    type Scope = k8s_openapi::NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        "ServiceImport".into()
    }

    fn group(_: &()) -> Cow<'_, str> {
        "multicluster.x-k8s.io".into()
    }

    fn version(_: &()) -> Cow<'_, str> {
        "v1alpha1".into()
    }

    fn plural(_: &()) -> Cow<'_, str> {
        "serviceimports".into()
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// The chart's CRD files: (file name, YAML), in a stable order.
///
/// # Errors
/// When a CRD cannot be serialized (a bug in the types).
pub fn crd_files() -> Result<Vec<(String, String)>, mesh_model::yaml::SerializeError> {
    [
        TrafficPolicy::crd(),
        StagedRollout::crd(),
        MeshNetworkPolicy::crd(),
        MeshNode::crd(),
    ]
        .into_iter()
        .map(|crd| {
            let name = crd.metadata.name.clone().unwrap_or_default();
            let yaml = mesh_model::yaml::to_string(&crd)?;
            Ok((
                format!("{name}.yaml"),
                format!("# Generated from mesh-k8s/src/crd.rs; regenerate with: UPDATE_CRDS=1 cargo test -p mesh-k8s --lib crd\n{yaml}"),
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn crds_dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../charts/fleetmesh/crds")
    }

    /// The checked-in CRDs are the generated ones; `UPDATE_CRDS=1` rewrites them.
    #[test]
    fn crd_yaml_in_chart_is_current() {
        let files = crd_files().expect("CRDs serialize");
        assert_eq!(
            files.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
            [
                "trafficpolicies.fleetmesh.io.yaml",
                "stagedrollouts.fleetmesh.io.yaml",
                "meshnetworkpolicies.fleetmesh.io.yaml",
                "meshnodes.fleetmesh.io.yaml"
            ]
        );
        let update = std::env::var_os("UPDATE_CRDS").is_some_and(|v| v == "1");
        let mut stale = Vec::new();
        for (name, yaml) in &files {
            let path = crds_dir().join(name);
            if update {
                std::fs::write(&path, yaml).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
                continue;
            }
            let current = std::fs::read_to_string(&path).unwrap_or_default();
            if &current != yaml {
                stale.push(path.display().to_string());
            }
        }
        assert!(
            stale.is_empty(),
            "{stale:?} differ from the CRDs generated from mesh-k8s/src/crd.rs; regenerate with: \
             UPDATE_CRDS=1 cargo test -p mesh-k8s --lib crd"
        );
    }

    #[test]
    fn crds_are_namespaced_with_status_and_spec_schema() {
        for crd in [
            TrafficPolicy::crd(),
            StagedRollout::crd(),
            MeshNetworkPolicy::crd(),
        ] {
            assert_eq!(crd.spec.group, "fleetmesh.io");
            assert_eq!(crd.spec.scope, "Namespaced");
            let v = &crd.spec.versions[0];
            assert_eq!(v.name, "v1alpha1");
            assert!(
                v.subresources.as_ref().is_some_and(|s| s.status.is_some()),
                "status subresource"
            );
            let schema = serde_json::to_value(v.schema.as_ref().expect("schema")).expect("json");
            let spec = &schema["openAPIV3Schema"]["properties"]["spec"];
            assert!(
                spec["properties"]["service"].is_object() || spec["properties"]["podSelector"].is_object(),
                "{spec}"
            );
        }
        let tp = serde_json::to_value(TrafficPolicy::crd()).expect("json");
        let weight = &tp["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
            ["weights"]["items"]["properties"]["weight"];
        assert_eq!(weight["minimum"], 0.0, "u32 weight has a lower bound: {weight}");
    }

    /// The MeshNetworkPolicy schema: ports are int-or-string, peers have `clusters`.
    #[test]
    fn mesh_network_policy_schema() {
        let crd = serde_json::to_value(MeshNetworkPolicy::crd()).expect("json");
        let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
        let rule = &spec["properties"]["ingress"]["items"]["properties"];
        let port = &rule["ports"]["items"]["properties"]["port"];
        assert_eq!(port["x-kubernetes-int-or-string"], true, "{port}");
        let peer = &rule["from"]["items"]["properties"];
        assert!(peer["clusters"]["properties"]["names"].is_object(), "{peer}");
        let text = "apiVersion: fleetmesh.io/v1alpha1\nkind: MeshNetworkPolicy\nmetadata: {name: api, namespace: shop}\n\
                    spec:\n  podSelector: {matchLabels: {app: api}}\n  ingress: [{from: [{podSelector: {}, clusters: {names: [west]}}], ports: [{port: 80}, {port: http}]}]\n";
        let p: MeshNetworkPolicy = mesh_model::yaml::from_str(text).expect("reads");
        assert_eq!(
            p.spec.0.ingress[0].from[0]
                .clusters
                .as_ref()
                .map(|c| c.names.len()),
            Some(1)
        );
    }

    /// `MeshNode`: cluster-scoped like the Node it is named after, a status subresource whose `rollouts` map the
    /// `<namespace>/<name>` of each rollout to its node entry; the `StagedRollout` status has no per-node map.
    #[test]
    fn mesh_node_is_cluster_scoped_with_rollouts_in_its_status() {
        let crd = serde_json::to_value(MeshNode::crd()).expect("json");
        assert_eq!(crd["spec"]["scope"], "Cluster", "{crd}");
        assert_eq!(crd["spec"]["names"]["plural"], "meshnodes");
        let v = &crd["spec"]["versions"][0];
        assert!(v["subresources"]["status"].is_object(), "{v}");
        let status = &v["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"];
        let entry = &status["rollouts"]["additionalProperties"]["properties"];
        assert!(
            entry["phase"].is_object() && entry["heldSeconds"].is_object(),
            "{status}"
        );
        let sr = serde_json::to_value(StagedRollout::crd()).expect("json");
        let sr_status =
            &sr["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"];
        assert!(sr_status["progress"].is_object(), "{sr_status}");
        assert!(
            sr_status.get("nodes").is_none(),
            "no per-node map on the rollout: {sr_status}"
        );
        let text = "apiVersion: fleetmesh.io/v1alpha1\nkind: MeshNode\nmetadata: {name: n1}\nspec: {}\nstatus:\n  \
                    rollouts:\n    shop/api-v2: {phase: Halted, step: 2, steps: 3, percent: 0, heldSeconds: 4, \
                    failureRatio: 0.5, newFlows: 10, resets: 5}\n";
        let n: MeshNode = mesh_model::yaml::from_str(text).expect("reads");
        let rollouts = n.status.map(|s| s.rollouts).unwrap_or_default();
        assert_eq!(rollouts["shop/api-v2"].phase, RolloutPhase::Halted);
    }

    /// A manifest of the docs reads as the CRD type, and its spec is mesh-model's.
    #[test]
    fn manifest_reads_as_crd_object() {
        let text = "apiVersion: fleetmesh.io/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: api, namespace: shop}\n\
                    spec:\n  service: api\n  weights: [{clusters: {names: [west]}, weight: 90}]\n";
        let tp: TrafficPolicy = mesh_model::yaml::from_str(text).expect("reads");
        assert_eq!(tp.spec.0.service, "api");
        assert_eq!(tp.spec.0.weights[0].weight, 90);
    }
}
