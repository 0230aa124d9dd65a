//! How to reach a peer cluster's etcd: the clustermesh config directory shared by the agents
//! (`--clustermesh-config`) and the clustermesh-apiserver's KVStoreMesh cache (`--kvstoremesh-config`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;
use serde::Deserialize;

/// How to reach a remote cluster's etcd: one file per cluster in the clustermesh config directory, named after the
/// cluster (as Cilium's `clustermesh-secrets`), with Cilium's etcd config keys: `endpoints: [URL, ...]` and, for
/// `https://` endpoints, `trusted-ca-file` (the peer's CA) plus `cert-file` and `key-file` (the client certificate
/// the peer's etcd maps to its read-only user). Relative paths are relative to the directory. `meshctl clustermesh
/// connect` writes these files.
///
/// Pins (optional) say what this cluster accepts from the peer, whatever the peer publishes (docs/security.md,
/// "Pinning a peer's grant"): `cluster-id` (the only id its records may carry), `pod-cidrs` (every node CIDR, pod
/// address and backend of the peer must lie inside one) and `cluster-labels` (the labels selectors may match the
/// peer by, instead of those it publishes; `{}` allows none).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RemoteConfig {
    pub endpoints: Vec<String>,
    /// Key prefix of the cluster's records in that etcd (default: the reader's `--kvstore-prefix`). Through a
    /// KVStoreMesh cache in the reader's own cluster it is `<prefix>/kvstoremesh/<cluster>`.
    #[serde(default)]
    pub prefix: Option<String>,
    #[serde(default)]
    pub trusted_ca_file: Option<PathBuf>,
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// Pinned cluster id of the peer.
    #[serde(default)]
    pub cluster_id: Option<u16>,
    /// Pinned pod CIDRs of the peer.
    #[serde(default)]
    pub pod_cidrs: Option<Vec<Ipv4Net>>,
    /// Pinned cluster labels of the peer.
    #[serde(default)]
    pub cluster_labels: Option<BTreeMap<String, String>>,
}

impl RemoteConfig {
    /// Checks the combination of keys and makes the file paths absolute (relative to `dir`).
    pub fn checked(mut self, dir: &Path) -> Result<Self, String> {
        if let Some(p) = &self.prefix
            && (p.is_empty() || p.starts_with('/') || p.contains("//"))
        {
            return Err(format!(
                "prefix {p:?} is not a key prefix like fleetmesh/kvstoremesh/west"
            ));
        }
        if self.endpoints.is_empty() {
            return Err("endpoints is empty".to_owned());
        }
        if let Some(id) = self.cluster_id
            && !(1..=mesh_model::cluster::MAX_CLUSTER_ID).contains(&id)
        {
            return Err(format!(
                "cluster-id {id} is not in 1..={}",
                mesh_model::cluster::MAX_CLUSTER_ID
            ));
        }
        if let Some(cidrs) = &self.pod_cidrs {
            if cidrs.is_empty() {
                return Err(
                    "pod-cidrs is empty (leave it out to accept the node CIDRs nobody else claims)".into(),
                );
            }
            if let Some(c) = cidrs
                .iter()
                .find(|c| c.trunc() != **c || c.prefix_len() < crate::grant::MIN_POD_CIDR_LEN)
            {
                return Err(format!(
                    "pod-cidrs: {c} is not a network of /{} or longer (like {})",
                    crate::grant::MIN_POD_CIDR_LEN,
                    c.trunc()
                ));
            }
        }
        if let Some((k, v)) = self
            .cluster_labels
            .iter()
            .flatten()
            .find(|(k, v)| k.is_empty() || k.len() > 317 || v.len() > 63)
        {
            return Err(format!(
                "cluster-labels: {k:?}: {v:?} is not a label (key of 1-317 bytes, value of at most 63)"
            ));
        }
        let https = self
            .endpoints
            .iter()
            .filter(|e| e.starts_with("https://"))
            .count();
        if let Some(e) = self
            .endpoints
            .iter()
            .find(|e| !e.starts_with("https://") && !e.starts_with("http://"))
        {
            return Err(format!(
                "endpoint {e:?} is neither an http:// nor an https:// URL"
            ));
        }
        if https != 0 && https != self.endpoints.len() {
            return Err("endpoints mix http:// and https:// URLs".to_owned());
        }
        match (https > 0, &self.trusted_ca_file, &self.cert_file, &self.key_file) {
            (false, None, None, None) => {}
            (false, ..) => {
                return Err("trusted-ca-file, cert-file and key-file need https:// endpoints".to_owned());
            }
            (true, None, ..) => {
                return Err("https:// endpoints need trusted-ca-file (the peer's CA)".to_owned());
            }
            (true, Some(_), Some(_), None) | (true, Some(_), None, Some(_)) => {
                return Err("cert-file and key-file go together".to_owned());
            }
            (true, Some(_), ..) => {}
        }
        for p in [&mut self.trusted_ca_file, &mut self.cert_file, &mut self.key_file]
            .into_iter()
            .flatten()
        {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        }
        Ok(self)
    }
}

/// Reads the clustermesh config directory. Files that fail to parse are reported and skipped.
pub fn read_config_dir(dir: &Path, own_cluster: &str) -> (BTreeMap<String, RemoteConfig>, Vec<String>) {
    let mut out = BTreeMap::new();
    let mut errors = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            errors.push(format!("clustermesh config directory {}: {e}", dir.display()));
            return (out, errors);
        }
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()).map(str::to_owned) else {
            continue;
        };
        if name.starts_with('.') || !path.is_file() {
            continue;
        }
        if let Err(e) = mesh_model::ClusterName::new(&name) {
            errors.push(format!(
                "{}: file name is not a cluster name: {e}",
                path.display()
            ));
            continue;
        }
        if name == own_cluster {
            continue;
        }
        let parsed = std::fs::read_to_string(&path)
            .map_err(|e| e.to_string())
            .and_then(|t| mesh_model::yaml::from_str::<RemoteConfig>(&t).map_err(|e| e.to_string()));
        match parsed.and_then(|c| c.checked(dir)) {
            Ok(c) => {
                out.insert(name, c);
            }
            Err(e) => errors.push(format!("{}: {e}", path.display())),
        }
    }
    (out, errors)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<RemoteConfig, String> {
        mesh_model::yaml::from_str::<RemoteConfig>(text)
            .map_err(|e| e.to_string())
            .and_then(|c| c.checked(Path::new("/cfg")))
    }

    #[test]
    fn pins_parse_and_are_checked() {
        let c = parse(
            "endpoints: [http://127.0.0.1:2379]\ncluster-id: 2\npod-cidrs: [10.2.0.0/16]\ncluster-labels: {stage: prod}\n",
        )
        .expect("pins");
        assert_eq!(c.cluster_id, Some(2));
        assert_eq!(c.pod_cidrs, Some(vec!["10.2.0.0/16".parse().expect("cidr")]));
        assert_eq!(
            c.cluster_labels,
            Some([("stage".to_owned(), "prod".to_owned())].into())
        );
        let bare = parse("endpoints: [http://127.0.0.1:2379]\n").expect("no pins");
        assert_eq!(
            (bare.cluster_id, bare.pod_cidrs, bare.cluster_labels),
            (None, None, None)
        );
        for (text, want) in [
            ("cluster-id: 0", "cluster-id 0"),
            ("cluster-id: 4096", "cluster-id 4096"),
            ("pod-cidrs: []", "pod-cidrs is empty"),
            ("pod-cidrs: [10.2.0.1/16]", "10.2.0.1/16"),
            ("pod-cidrs: [0.0.0.0/0]", "0.0.0.0/0"),
            ("cluster-labels: {\"\": x}", "cluster-labels"),
        ] {
            let e = parse(&format!("endpoints: [http://127.0.0.1:2379]\n{text}\n")).expect_err(text);
            assert!(e.contains(want), "{text}: {e}");
        }
        assert!(parse("endpoints: [http://127.0.0.1:2379]\npod-cidrs: [10.2.0.0]\n").is_err());
    }
}
