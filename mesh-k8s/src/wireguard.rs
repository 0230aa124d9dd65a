//! The agent's WireGuard public key and port on its own Node (docs/encryption.md): the clustermesh-apiserver
//! publishes them with the node's record, and the cluster's other agents read them from the Node.

use k8s_openapi::api::core::v1::Node;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use tracing::instrument;

/// Merge-patches the WireGuard annotations of Node `node` (only those two keys; nothing else of the Node).
///
/// # Errors
///
/// The API server's refusal (the agent's role needs `patch` on `nodes`).
#[instrument(skip(client, public_key))]
pub async fn publish_wireguard(
    client: Client,
    node: &str,
    public_key: &str,
    port: u16,
) -> Result<(), kube::Error> {
    let api: Api<Node> = Api::all(client);
    let body = json!({"metadata": {"annotations": {
        mesh_model::wireguard::ANNOTATION_PUBLIC_KEY: public_key,
        mesh_model::wireguard::ANNOTATION_PORT: port.to_string(),
    }}});
    api.patch(node, &PatchParams::default(), &Patch::Merge(&body))
        .await
        .map(drop)
}
