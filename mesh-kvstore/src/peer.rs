//! How to reach a peer cluster's etcd: the clustermesh config directory shared by the agents
//! (`--clustermesh-config`) and the clustermesh-apiserver's KVStoreMesh cache (`--kvstoremesh-config`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// How to reach a remote cluster's etcd: one file per cluster in the clustermesh config directory, named after the
/// cluster (as Cilium's `clustermesh-secrets`), with Cilium's etcd config keys: `endpoints: [URL, ...]` and, for
/// `https://` endpoints, `trusted-ca-file` (the peer's CA) plus `cert-file` and `key-file` (the client certificate
/// the peer's etcd maps to its read-only user). Relative paths are relative to the directory. `meshctl clustermesh
/// connect` writes these files.
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
