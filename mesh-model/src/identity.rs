//! Identity labels: the label set a pod's security identity stands for (docs/network-policy.md, "Identities").
//!
//! The pod's labels without the per-pod/per-revision ones, plus its namespace, its namespace's labels and its
//! cluster. Labels that only fleetmesh may set (the namespace, the namespace labels, the cluster) replace pod
//! labels of the same name: they are not the pod's to choose.

use std::collections::BTreeMap;

use crate::state::{Namespace, Pod};

/// The pod's namespace.
pub const LABEL_NAMESPACE: &str = "io.kubernetes.pod.namespace";
/// Prefix of the labels that carry the pod's namespace's labels (`<prefix><key>=<value>`).
pub const LABEL_NAMESPACE_LABELS_PREFIX: &str = "io.cilium.k8s.namespace.labels.";
/// The pod's cluster (Cilium's name, so that Cilium-style selectors keep working).
pub const LABEL_CLUSTER: &str = "io.cilium.k8s.policy.cluster";
/// The namespace label Kubernetes puts on every namespace: its name.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";
/// Pod labels that change per pod or per revision, left out of identities (else every rollout or every pod
/// would get its own identity).
pub const EXCLUDED_POD_LABELS: [&str; 7] = [
    "pod-template-hash",
    "controller-revision-hash",
    "pod-template-generation",
    "statefulset.kubernetes.io/pod-name",
    "apps.kubernetes.io/pod-index",
    "batch.kubernetes.io/controller-uid",
    "controller-uid",
];

/// The identity labels of `pod` in `cluster`; `namespace` is the pod's namespace object when known (without it
/// only `kubernetes.io/metadata.name` stands for the namespace's labels).
#[must_use]
pub fn identity_labels(cluster: &str, pod: &Pod, namespace: Option<&Namespace>) -> BTreeMap<String, String> {
    let mut out: BTreeMap<String, String> = pod
        .labels
        .iter()
        .filter(|(k, _)| {
            !EXCLUDED_POD_LABELS.contains(&k.as_str())
                && k.as_str() != LABEL_NAMESPACE
                && k.as_str() != LABEL_CLUSTER
                && !k.starts_with(LABEL_NAMESPACE_LABELS_PREFIX)
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    out.insert(LABEL_NAMESPACE.to_owned(), pod.namespace.clone());
    for (k, v) in namespace.map(|n| &n.labels).into_iter().flatten() {
        out.insert(format!("{LABEL_NAMESPACE_LABELS_PREFIX}{k}"), v.clone());
    }
    out.insert(
        format!("{LABEL_NAMESPACE_LABELS_PREFIX}{NAMESPACE_NAME_LABEL}"),
        pod.namespace.clone(),
    );
    out.insert(LABEL_CLUSTER.to_owned(), cluster.to_owned());
    out
}

/// The labels of the namespace an identity's pods live in (from its `io.cilium.k8s.namespace.labels.*`
/// labels); empty for identities without a namespace.
#[must_use]
pub fn namespace_labels(identity_labels: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    identity_labels
        .iter()
        .filter_map(|(k, v)| {
            k.strip_prefix(LABEL_NAMESPACE_LABELS_PREFIX)
                .map(|k| (k.to_owned(), v.clone()))
        })
        .collect()
}

/// The pod's own labels of an identity: its labels without the namespace, namespace-label and cluster labels that
/// [`identity_labels`] adds.
#[must_use]
pub fn pod_labels(identity_labels: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    identity_labels
        .iter()
        .filter(|(k, _)| {
            k.as_str() != LABEL_NAMESPACE
                && k.as_str() != LABEL_CLUSTER
                && !k.starts_with(LABEL_NAMESPACE_LABELS_PREFIX)
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_util::labels;

    fn pod(l: &[(&str, &str)]) -> Pod {
        Pod {
            namespace: "shop".into(),
            name: "api-1".into(),
            labels: labels(l),
            annotations: BTreeMap::new(),
            node_name: None,
            ipv4: None,
            ports: Vec::new(),
            hostname: None,
            subdomain: None,
        }
    }

    #[test]
    fn pod_labels_undo_what_identity_labels_add() {
        let l = labels(&[
            ("app", "api"),
            (LABEL_NAMESPACE, "shop"),
            (LABEL_CLUSTER, "east"),
            ("io.cilium.k8s.namespace.labels.team", "shop"),
        ]);
        assert_eq!(pod_labels(&l), labels(&[("app", "api")]));
        assert_eq!(namespace_labels(&l), labels(&[("team", "shop")]));
    }

    #[test]
    fn identity_labels_follow_the_contract() {
        let ns = Namespace {
            name: "shop".into(),
            labels: labels(&[("team", "a"), (NAMESPACE_NAME_LABEL, "shop")]),
        };
        let p = pod(&[
            ("app", "api"),
            ("pod-template-hash", "abc"),
            ("controller-revision-hash", "x"),
            ("statefulset.kubernetes.io/pod-name", "api-1"),
            ("apps.kubernetes.io/pod-index", "1"),
            ("batch.kubernetes.io/controller-uid", "u"),
            ("controller-uid", "u"),
            ("pod-template-generation", "3"),
        ]);
        assert_eq!(
            identity_labels("east", &p, Some(&ns)),
            labels(&[
                ("app", "api"),
                (LABEL_NAMESPACE, "shop"),
                ("io.cilium.k8s.namespace.labels.team", "a"),
                (
                    "io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name",
                    "shop"
                ),
                (LABEL_CLUSTER, "east"),
            ])
        );
    }

    #[test]
    fn fleetmesh_labels_override_pod_labels() {
        let p = pod(&[
            (LABEL_CLUSTER, "west"),
            (LABEL_NAMESPACE, "kube-system"),
            ("io.cilium.k8s.namespace.labels.team", "admin"),
            ("app", "api"),
        ]);
        let l = identity_labels("east", &p, None);
        assert_eq!(l.get(LABEL_CLUSTER).map(String::as_str), Some("east"));
        assert_eq!(l.get(LABEL_NAMESPACE).map(String::as_str), Some("shop"));
        assert!(!l.contains_key("io.cilium.k8s.namespace.labels.team"), "{l:?}");
        assert_eq!(
            namespace_labels(&l),
            labels(&[(NAMESPACE_NAME_LABEL, "shop")]),
            "without the namespace object only its name label"
        );
    }
}
