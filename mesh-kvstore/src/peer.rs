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
    PeerDir::default().read(dir, own_cluster)
}

/// A membership selector (`mesh-agent --peer-selector FILE`): a Kubernetes label selector (`matchLabels`,
/// `matchExpressions`) over the peers' cluster labels. A peer is used only when it is selected; the others are
/// neither watched nor stored.
///
/// A peer is matched by the labels its file pins (`cluster-labels`, what this cluster granted it), never by what
/// it publishes: a peer cannot select itself into a cluster by claiming a label. A peer file without
/// `cluster-labels` has no labels (only a selector that holds for no labels, e.g. `{}` or `DoesNotExist`, selects it).
pub type PeerSelector = mesh_model::policy::LabelSelector;

/// Reads a membership selector file. A missing file is `Ok(None)`: every peer is used.
///
/// # Errors
/// When the file cannot be read, is not a label selector, or has invalid keys, values or operators.
pub fn read_peer_selector(file: &Path) -> Result<Option<PeerSelector>, String> {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", file.display())),
    };
    let sel: PeerSelector = if text.trim().is_empty() {
        PeerSelector::default()
    } else {
        mesh_model::yaml::from_str(&text).map_err(|e| format!("{}: {e}", file.display()))?
    };
    sel.validate("selector")
        .map_err(|e| format!("{}: {e}", file.display()))?;
    Ok(Some(sel))
}

/// Whether `selector` (none: every peer) selects the peer of `cfg`, by its pinned `cluster-labels`.
#[must_use]
pub fn selects(selector: Option<&PeerSelector>, cfg: &RemoteConfig) -> bool {
    selector.is_none_or(|s| s.matches(cfg.cluster_labels.as_ref().unwrap_or(&BTreeMap::new())))
}

/// The clustermesh config directory, read again only where it changed: a file whose size, modification time and
/// inode are as at the last read keeps its parsed config (an agent with a thousand peers reads one directory
/// listing and a thousand `stat`s per pass, and parses only the files that changed).
#[derive(Debug, Default)]
pub struct PeerDir {
    seen: BTreeMap<String, (FileStamp, Result<RemoteConfig, String>)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    len: u64,
    modified: Option<std::time::SystemTime>,
    ino: u64,
}

impl FileStamp {
    fn of(meta: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt as _;
        Self {
            len: meta.len(),
            modified: meta.modified().ok(),
            ino: meta.ino(),
        }
    }
}

impl PeerDir {
    /// As [`read_config_dir`], parsing only files that changed since the last call.
    pub fn read(&mut self, dir: &Path, own_cluster: &str) -> (BTreeMap<String, RemoteConfig>, Vec<String>) {
        let mut out = BTreeMap::new();
        let mut errors = Vec::new();
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) => {
                errors.push(format!("clustermesh config directory {}: {e}", dir.display()));
                return (out, errors);
            }
        };
        let mut seen = BTreeMap::new();
        for entry in entries.flatten() {
            let path = entry.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()).map(str::to_owned) else {
                continue;
            };
            // Follows symlinks (Kubernetes mounts Secret keys as links into `..data/`).
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            if name.starts_with('.') || !meta.is_file() {
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
            let stamp = FileStamp::of(&meta);
            let parsed = match self.seen.remove(&name) {
                Some((old, parsed)) if old == stamp => parsed,
                _ => std::fs::read_to_string(&path)
                    .map_err(|e| e.to_string())
                    .and_then(|t| mesh_model::yaml::from_str::<RemoteConfig>(&t).map_err(|e| e.to_string()))
                    .and_then(|c| c.checked(dir)),
            };
            match &parsed {
                Ok(c) => {
                    out.insert(name.clone(), c.clone());
                }
                Err(e) => errors.push(format!("{}: {e}", path.display())),
            }
            seen.insert(name, (stamp, parsed));
        }
        self.seen = seen;
        (out, errors)
    }
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

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("fm-peer-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("scratch dir");
        d
    }

    #[test]
    fn a_selector_file_selects_by_pinned_labels_and_refuses_bad_content() {
        let d = scratch("sel");
        let file = d.join("selector.yaml");
        assert_eq!(read_peer_selector(&file), Ok(None), "no file: every peer");
        let eu = parse("endpoints: [http://127.0.0.1:2379]\ncluster-labels: {region: eu}\n").expect("eu");
        let bare = parse("endpoints: [http://127.0.0.1:2379]\n").expect("bare");
        assert!(selects(None, &eu) && selects(None, &bare));
        std::fs::write(&file, "matchLabels: {region: eu}\n").expect("write");
        let sel = read_peer_selector(&file).expect("valid").expect("some");
        assert!(selects(Some(&sel), &eu));
        assert!(
            !selects(Some(&sel), &bare),
            "a peer without pinned labels has none"
        );
        std::fs::write(
            &file,
            "matchExpressions: [{key: region, operator: DoesNotExist}]\n",
        )
        .expect("write");
        let sel = read_peer_selector(&file).expect("valid").expect("some");
        assert!(selects(Some(&sel), &bare) && !selects(Some(&sel), &eu));
        std::fs::write(&file, "").expect("write");
        assert_eq!(
            read_peer_selector(&file),
            Ok(Some(PeerSelector::default())),
            "empty selects all"
        );
        for (bad, why) in [
            ("matchLabels: {\"no key!\": x}\n", "not a valid label key"),
            ("matchLabels: {a: \"bad value!\"}\n", "not a valid label value"),
            ("matchLabels: [a]\n", "selector.yaml"),
            ("matchLabel: {a: b}\n", "unknown field"),
            (
                "matchExpressions: [{key: a, operator: Near, values: [b]}]\n",
                "selector.yaml",
            ),
        ] {
            std::fs::write(&file, bad).expect("write");
            let e = read_peer_selector(&file).expect_err(bad);
            assert!(e.contains(why), "{bad}: {e}");
        }
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_peer_dir_parses_only_the_files_that_changed() {
        let d = scratch("dir");
        std::fs::write(d.join("west"), "endpoints: [http://127.0.0.1:2379]\n").expect("write");
        std::fs::write(d.join("north"), "endpoints: [http://127.0.0.1:2381]\n").expect("write");
        std::fs::write(d.join("east"), "endpoints: [http://127.0.0.1:2383]\n").expect("write");
        std::fs::write(d.join("Bad_Name"), "endpoints: [http://127.0.0.1:2383]\n").expect("write");
        let mut dir = PeerDir::default();
        let (got, errors) = dir.read(&d, "east");
        assert_eq!(got.keys().collect::<Vec<_>>(), ["north", "west"]);
        assert_eq!(errors.len(), 1, "{errors:?}");
        // A changed file (a new inode, as writers that rename do) is parsed again; a broken one is reported.
        let tmp = d.join(".west.tmp");
        std::fs::write(&tmp, "endpoints: [http://127.0.0.1:2999]\n").expect("write");
        std::fs::rename(&tmp, d.join("west")).expect("rename");
        std::fs::write(&tmp, "endpoints: nope\n").expect("write");
        std::fs::rename(&tmp, d.join("north")).expect("rename");
        let (got, errors) = dir.read(&d, "east");
        assert_eq!(got["west"].endpoints, ["http://127.0.0.1:2999"]);
        assert!(!got.contains_key("north"));
        assert!(errors.iter().any(|e| e.contains("north")), "{errors:?}");
        // A removed file is gone.
        std::fs::remove_file(d.join("west")).expect("remove");
        let (got, _) = dir.read(&d, "east");
        assert!(got.is_empty(), "{got:?}");
        let _ = std::fs::remove_dir_all(&d);
    }
}
