//! fleetmesh's CustomResourceDefinitions (`fleetmesh.io/v1alpha1`): `TrafficPolicy`, `StagedRollout` and
//! `MeshNetworkPolicy`. Their
//! specs are mesh-model's types, so a manifest, the API server and the CRD's schema describe the same shape.
//! The chart's `crds/` folder holds the YAML generated from these types (see [`crd_files`]).

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
    status = "ObjectStatus",
    printcolumn = r#"{"name":"Service","type":"string","jsonPath":".spec.service"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
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

/// The chart's CRD files: (file name, YAML), in a stable order.
///
/// # Errors
/// When a CRD cannot be serialized (a bug in the types).
pub fn crd_files() -> Result<Vec<(String, String)>, serde_yaml::Error> {
    [TrafficPolicy::crd(), StagedRollout::crd(), MeshNetworkPolicy::crd()]
        .into_iter()
        .map(|crd| {
            let name = crd.metadata.name.clone().unwrap_or_default();
            let yaml = serde_yaml::to_string(&crd)?;
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
                "meshnetworkpolicies.fleetmesh.io.yaml"
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
        let p: MeshNetworkPolicy = serde_yaml::from_str(text).expect("reads");
        assert_eq!(
            p.spec.0.ingress[0].from[0]
                .clusters
                .as_ref()
                .map(|c| c.names.len()),
            Some(1)
        );
    }

    /// A manifest of the docs reads as the CRD type, and its spec is mesh-model's.
    #[test]
    fn manifest_reads_as_crd_object() {
        let text = "apiVersion: fleetmesh.io/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: api, namespace: shop}\n\
                    spec:\n  service: api\n  weights: [{clusters: {names: [west]}, weight: 90}]\n";
        let tp: TrafficPolicy = serde_yaml::from_str(text).expect("reads");
        assert_eq!(tp.spec.0.service, "api");
        assert_eq!(tp.spec.0.weights[0].weight, 90);
    }
}
