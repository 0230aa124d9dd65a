//! The lab's topology format (`DIR/lab.yaml` plus `DIR/<cluster>/*.yaml`), and its validation. Everything is
//! checked before the lab creates anything.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use serde::Deserialize;

/// Largest node count per cluster (node index goes into the underlay address's last octet).
pub const MAX_NODES: u32 = 200;
/// Largest cluster id the lab supports (its underlay addressing carries up to 12 bits).
pub const MAX_CLUSTER_ID: u16 = 4095;
/// The lab's underlay: control planes at 100.64.x.y, nodes at 100.(65+id/256).(id%256).k.
pub const UNDERLAY: (Ipv4Addr, u8) = (Ipv4Addr::new(100, 64, 0, 0), 10);

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabFile {
    pub clusters: Vec<ClusterSpec>,
    /// Optional: a fleet hub (docs/fleet-hub.md): the clusters publish into it and read their peers from it
    /// instead of from each other's etcds.
    #[serde(default)]
    pub hub: Option<HubSpec>,
}

/// `hub:` of `lab.yaml`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HubSpec {
    /// Members of the hub's etcd cluster (1-7; 3 keep quorum when one is lost).
    pub members: u32,
}

/// Largest hub the lab makes.
pub const MAX_HUB_MEMBERS: u32 = 7;

/// Reads the `hub:` of `dir/lab.yaml` (after [`load`] checked the file).
pub fn load_hub(dir: &Path) -> anyhow::Result<Option<HubSpec>> {
    let file = dir.join("lab.yaml");
    let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    let lab: LabFile =
        mesh_model::yaml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    if let Some(h) = lab.hub {
        if h.members == 0 || h.members > MAX_HUB_MEMBERS {
            bail!(
                "{}: hub: field members: {} is out of range 1-{MAX_HUB_MEMBERS}",
                file.display(),
                h.members
            );
        }
        if let Some(c) = lab.clusters.iter().find(|c| c.name.starts_with("hub-")) {
            bail!(
                "{}: clusters: the name {:?} is taken by the hub's members (hub-1, hub-2, ...) in a lab with a hub",
                file.display(),
                c.name
            );
        }
    }
    Ok(lab.hub)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ClusterSpec {
    pub name: String,
    pub id: u16,
    #[serde(rename = "podCIDR")]
    pub pod_cidr: String,
    pub nodes: u32,
    /// Optional: where ClusterIPs are allocated (default 198.18.<id % 256>.0/24).
    #[serde(default, rename = "serviceCIDR")]
    pub service_cidr: Option<String>,
    /// Optional: cluster labels (e.g. `stage: canary`), given to the cluster's apiserver and agents; fleetmesh
    /// `TrafficPolicy` selectors match them.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Optional: the agents' `--encryption` (`off`, `cross-cluster`, `all`; default `off` in the lab, so that
    /// other tests measure the plain overlay). With encryption, each node makes its WireGuard key and the lab
    /// publishes the public key on its Node object (as the agent does on Kubernetes).
    #[serde(default)]
    pub encryption: Option<String>,
}

/// Values of a cluster's `encryption` field.
pub const ENCRYPTION_MODES: [&str; 3] = ["off", "cross-cluster", "all"];

/// An IPv4 prefix (the lab keeps its own tiny type: xtask may not depend on the product crates).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub len: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        let (a, l) = s
            .split_once('/')
            .with_context(|| format!("{s:?} is not a CIDR like 10.1.0.0/16"))?;
        let addr: Ipv4Addr = a
            .parse()
            .with_context(|| format!("{s:?}: {a:?} is not an IPv4 address"))?;
        let len: u8 = l
            .parse()
            .ok()
            .filter(|l| *l <= 32)
            .with_context(|| format!("{s:?}: bad prefix length"))?;
        let c = Self { addr, len };
        if c.network() != addr {
            bail!("{s:?} has host bits set (did you mean {}/{len}?)", c.network());
        }
        Ok(c)
    }

    pub fn mask(self) -> u32 {
        if self.len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.len))
        }
    }

    pub fn network(self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) & self.mask())
    }

    pub fn overlaps(self, other: Self) -> bool {
        let m = self.mask() & other.mask();
        u32::from(self.addr) & m == u32::from(other.addr) & m
    }

    /// The `i`-th subnet of length `len` (None when out of range).
    pub fn subnet(self, len: u8, i: u32) -> Option<Self> {
        if len < self.len || len > 32 {
            return None;
        }
        let count = 1u64 << (len - self.len);
        if u64::from(i) >= count {
            return None;
        }
        let size = 1u64 << (32 - len);
        let base = u64::from(u32::from(self.network())) + u64::from(i) * size;
        Some(Self {
            addr: Ipv4Addr::from(u32::try_from(base).ok()?),
            len,
        })
    }

    /// The `i`-th address of the prefix.
    pub fn host(self, i: u32) -> Option<Ipv4Addr> {
        let size = 1u64 << (32 - u32::from(self.len));
        (u64::from(i) < size).then(|| Ipv4Addr::from(u32::from(self.network()) + i))
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// Prefix length of each node's slice of the cluster pod CIDR.
pub const NODE_SLICE_LEN: u8 = 24;

/// A validated cluster.
#[derive(Debug, Clone)]
pub struct Cluster {
    pub name: String,
    pub id: u16,
    pub pod_cidr: Cidr,
    pub service_cidr: Cidr,
    pub nodes: u32,
    pub labels: BTreeMap<String, String>,
    /// The agents' `--encryption` mode.
    pub encryption: String,
    /// The cluster's manifest files (`DIR/<name>/*.yaml`, sorted).
    pub files: Vec<PathBuf>,
}

/// Cilium's rule for cluster names.
pub fn check_cluster_name(name: &str) -> Result<(), String> {
    let edge = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    if name.is_empty() || name.len() > 32 {
        return Err(format!("cluster name {name:?} must have 1 to 32 characters"));
    }
    if !(name.starts_with(edge) && name.ends_with(edge) && name.chars().all(|c| edge(c) || c == '-')) {
        return Err(format!(
            "cluster name {name:?} must match ^([a-z0-9][-a-z0-9]*)?[a-z0-9]$"
        ));
    }
    Ok(())
}

/// Reads and validates `dir/lab.yaml` and finds each cluster's manifest files.
pub fn load(dir: &Path) -> anyhow::Result<Vec<Cluster>> {
    let file = dir.join("lab.yaml");
    let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    let f = file.display();
    let lab: LabFile = mesh_model::yaml::from_str(&text).map_err(|e| anyhow::anyhow!("{f}: {e}"))?;
    if lab.clusters.is_empty() {
        bail!("{f}: clusters: at least one cluster is needed");
    }
    let underlay = Cidr {
        addr: UNDERLAY.0,
        len: UNDERLAY.1,
    };
    let mut out: Vec<Cluster> = Vec::new();
    for (i, c) in lab.clusters.iter().enumerate() {
        let at = format!("{f}: clusters[{i}] ({})", c.name);
        check_cluster_name(&c.name).map_err(|e| anyhow::anyhow!("{at}: field name: {e}"))?;
        if c.id == 0 || c.id > MAX_CLUSTER_ID {
            bail!("{at}: field id: {} is out of range 1-{MAX_CLUSTER_ID}", c.id);
        }
        if c.nodes == 0 || c.nodes > MAX_NODES {
            bail!("{at}: field nodes: {} is out of range 1-{MAX_NODES}", c.nodes);
        }
        let pod_cidr = Cidr::parse(&c.pod_cidr).map_err(|e| anyhow::anyhow!("{at}: field podCIDR: {e:#}"))?;
        if pod_cidr.len > 20 {
            bail!(
                "{at}: field podCIDR: {pod_cidr} is too small; the lab gives each node a /{NODE_SLICE_LEN} and needs room for 16 (use /20 or larger)"
            );
        }
        let service_cidr = match &c.service_cidr {
            Some(s) => Cidr::parse(s).map_err(|e| anyhow::anyhow!("{at}: field serviceCIDR: {e:#}"))?,
            None => Cidr {
                addr: Ipv4Addr::new(198, 18, u8::try_from(c.id % 256).unwrap_or(0), 0),
                len: 24,
            },
        };
        for (field, cidr) in [("podCIDR", pod_cidr), ("serviceCIDR", service_cidr)] {
            if cidr.overlaps(underlay) {
                bail!("{at}: field {field}: {cidr} overlaps the lab underlay {underlay}");
            }
        }
        for (k, v) in &c.labels {
            let ok = |s: &str, max: usize| {
                s.len() <= max
                    && s.chars()
                        .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '-' | '_' | '.' | '/'))
            };
            if k.is_empty() || !ok(k, 253) || !ok(v, 63) || v.contains('/') {
                bail!(
                    "{at}: field labels: {k:?}: {v:?} is not a valid label (keys and values of letters, digits, \
                     '-', '_', '.'; a key may have a prefix/)"
                );
            }
        }
        if pod_cidr.overlaps(service_cidr) {
            bail!("{at}: field serviceCIDR: {service_cidr} overlaps podCIDR {pod_cidr}");
        }
        let encryption = c.encryption.clone().unwrap_or_else(|| "off".to_owned());
        if !ENCRYPTION_MODES.contains(&encryption.as_str()) {
            bail!(
                "{at}: field encryption: {encryption:?} is not one of {}",
                ENCRYPTION_MODES.join(", ")
            );
        }
        for other in &out {
            if other.name == c.name {
                bail!("{at}: field name: duplicate cluster name {:?}", c.name);
            }
            if other.id == c.id {
                bail!(
                    "{at}: field id: duplicate cluster id {} (also used by {})",
                    c.id,
                    other.name
                );
            }
            if other.pod_cidr.overlaps(pod_cidr) {
                bail!(
                    "{at}: field podCIDR: {pod_cidr} overlaps {}'s podCIDR {}",
                    other.name,
                    other.pod_cidr
                );
            }
        }
        let cdir = dir.join(&c.name);
        let mut files = Vec::new();
        if cdir.is_dir() {
            for e in std::fs::read_dir(&cdir).with_context(|| format!("reading {}", cdir.display()))? {
                let p = e?.path();
                if p.extension().is_some_and(|x| x == "yaml" || x == "yml") {
                    files.push(p);
                }
            }
        }
        files.sort();
        out.push(Cluster {
            name: c.name.clone(),
            id: c.id,
            pod_cidr,
            service_cidr,
            nodes: c.nodes,
            labels: c.labels.clone(),
            encryption,
            files,
        });
    }
    let known: Vec<&str> = out.iter().map(|c| c.name.as_str()).collect();
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let p = e?.path();
        if p.is_dir() {
            let n = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if !known.contains(&n) {
                bail!(
                    "{}: directory {n:?} is not a cluster of lab.yaml (clusters: {})",
                    dir.display(),
                    known.join(", ")
                );
            }
        }
    }
    Ok(out)
}

/// Identity of a manifest object: (kind, namespace or "", name).
pub type ObjectKey = (String, String, String);

const CLUSTER_SCOPED: [&str; 2] = ["Namespace", "Node"];

/// Splits a multi-document YAML file into JSON values (empty documents dropped).
pub fn read_docs(file: &Path) -> anyhow::Result<Vec<serde_json::Value>> {
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let docs = mesh_model::yaml::documents(&text).map_err(|e| {
        anyhow::anyhow!(
            "{} (document {}): malformed YAML: {e}",
            file.display(),
            e.document
        )
    })?;
    Ok(docs.into_iter().map(|d| d.value).collect())
}

pub fn object_key(doc: &serde_json::Value) -> ObjectKey {
    let kind = doc["kind"].as_str().unwrap_or_default().to_owned();
    let name = doc["metadata"]["name"].as_str().unwrap_or_default().to_owned();
    let ns = if CLUSTER_SCOPED.contains(&kind.as_str()) {
        String::new()
    } else {
        doc["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_owned()
    };
    (kind, ns, name)
}

/// A pod as the lab wires it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSpec {
    pub namespace: String,
    pub name: String,
    pub node: Option<String>,
    /// (port, protocol): protocol is `TCP`, `UDP`, or `TCP-STREAM` for TCP ports whose name starts with
    /// `stream` (their connections stay open and every line is answered).
    pub ports: Vec<(u16, String)>,
    /// The echo workload's failure mode (pod annotation [`ANNOTATION_FAIL`]), e.g. `reset`.
    pub fail: Option<String>,
}

/// Pod annotation that makes the lab's echo workload fail on purpose: `reset` resets every connection of its
/// plain TCP ports (for rehearsing rollout gates with real traffic).
pub const ANNOTATION_FAIL: &str = "lab.fleetmesh.io/fail";

pub fn pod_spec(doc: &serde_json::Value) -> PodSpec {
    let (_, namespace, name) = object_key(doc);
    let mut ports = Vec::new();
    for c in doc["spec"]["containers"].as_array().into_iter().flatten() {
        for p in c["ports"].as_array().into_iter().flatten() {
            if let Some(n) = p["containerPort"].as_u64().and_then(|n| u16::try_from(n).ok()) {
                let proto = p["protocol"].as_str().unwrap_or("TCP");
                let stream = proto == "TCP" && p["name"].as_str().is_some_and(|n| n.starts_with("stream"));
                ports.push((
                    n,
                    if stream {
                        "TCP-STREAM".to_owned()
                    } else {
                        proto.to_owned()
                    },
                ));
            }
        }
    }
    PodSpec {
        namespace,
        name,
        node: doc["spec"]["nodeName"].as_str().map(str::to_owned),
        ports,
        fail: doc["metadata"]["annotations"][ANNOTATION_FAIL]
            .as_str()
            .map(str::to_owned),
    }
}

/// Node names of a cluster: `<cluster>-node-<i>`.
pub fn node_name(cluster: &str, index: u32) -> String {
    format!("{cluster}-node-{index}")
}

/// Checks what only the lab knows: pods on nodes that exist, objects defined once across files.
pub fn check_docs(
    cluster: &Cluster,
    files: &BTreeMap<String, Vec<serde_json::Value>>,
    nodes: &[String],
) -> anyhow::Result<()> {
    let mut seen: BTreeMap<ObjectKey, &str> = BTreeMap::new();
    for (file, docs) in files {
        for (i, d) in docs.iter().enumerate() {
            let key = object_key(d);
            if key.0 == "Node" {
                bail!(
                    "{}/{file} (document {}): Node objects are made by the lab from lab.yaml (nodes: N); remove it",
                    cluster.name,
                    i + 1
                );
            }
            if let Some(first) = seen.insert(key.clone(), file) {
                bail!(
                    "{}/{file}: {} {}/{} is also defined in {first}",
                    cluster.name,
                    key.0,
                    key.1,
                    key.2
                );
            }
            if key.0 == "Pod" {
                let p = pod_spec(d);
                if let Some(n) = &p.node
                    && !nodes.contains(n)
                {
                    bail!(
                        "{}/{file} (document {}), Pod {}/{}, field spec.nodeName: node {n:?} does not exist (nodes: {})",
                        cluster.name,
                        i + 1,
                        p.namespace,
                        p.name,
                        nodes.join(", ")
                    );
                }
                if let Some(f) = p.fail.as_deref().filter(|f| *f != "reset") {
                    bail!(
                        "{}/{file} (document {}), Pod {}/{}, annotation {ANNOTATION_FAIL}: {f:?} is not a failure mode \
                         of the lab's echo workload (reset)",
                        cluster.name,
                        i + 1,
                        p.namespace,
                        p.name
                    );
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_lab(yaml: &str) -> tempfile_dir::Dir {
        let d = tempfile_dir::Dir::new();
        std::fs::write(d.path().join("lab.yaml"), yaml).expect("write");
        d
    }

    mod tempfile_dir {
        pub struct Dir(std::path::PathBuf);
        impl Dir {
            pub fn new() -> Self {
                static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let p = std::env::temp_dir().join(format!("xtask-topo-{}-{n}", std::process::id()));
                std::fs::create_dir_all(&p).expect("mkdir");
                Self(p)
            }
            pub fn path(&self) -> &std::path::Path {
                &self.0
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    const OK: &str = "clusters:\n  - {name: east, id: 1, podCIDR: 10.1.0.0/16, nodes: 2}\n  - {name: west, id: 2, podCIDR: 10.2.0.0/16, nodes: 1}\n";

    #[test]
    fn valid_topology_loads() {
        let d = write_lab(OK);
        let c = load(d.path()).expect("valid");
        assert_eq!(c.len(), 2);
        assert_eq!(
            c[0].pod_cidr.subnet(24, 1).expect("slice").to_string(),
            "10.1.1.0/24"
        );
        assert_eq!(c[1].service_cidr.to_string(), "198.18.2.0/24");
    }

    #[test]
    fn encryption_defaults_to_off_and_takes_the_agents_modes() {
        let d = write_lab(OK);
        assert!(
            load(d.path())
                .expect("valid")
                .iter()
                .all(|c| c.encryption == "off")
        );
        for mode in ENCRYPTION_MODES {
            let d = write_lab(&format!(
                "clusters:\n  - {{name: east, id: 1, podCIDR: 10.1.0.0/16, nodes: 1, encryption: {mode}}}\n"
            ));
            assert_eq!(load(d.path()).expect("valid")[0].encryption, mode);
        }
    }

    #[test]
    fn a_hub_is_optional_and_checked() {
        let d = write_lab(OK);
        assert_eq!(load_hub(d.path()).expect("no hub"), None);
        let d = write_lab(&format!("{OK}hub: {{members: 3}}\n"));
        load(d.path()).expect("valid with a hub");
        assert_eq!(load_hub(d.path()).expect("hub"), Some(HubSpec { members: 3 }));
        for (hub, want) in [
            ("hub: {members: 0}\n", "field members: 0"),
            ("hub: {members: 8}\n", "field members: 8"),
            ("hub: {members: 3, size: 1}\n", "size"),
        ] {
            let d = write_lab(&format!("{OK}{hub}"));
            let e = load(d.path()).and_then(|_| load_hub(d.path())).expect_err(hub);
            assert!(format!("{e:#}").contains(want), "{hub}: {e:#}");
        }
        let d = write_lab(
            "clusters:\n  - {name: hub-1, id: 1, podCIDR: 10.1.0.0/16, nodes: 1}\nhub: {members: 3}\n",
        );
        let e = load_hub(d.path()).expect_err("hub-1");
        assert!(format!("{e:#}").contains("taken by the hub"), "{e:#}");
    }

    #[test]
    fn the_edge_cluster_ids_load() {
        let d = write_lab(
            "clusters:\n  - {name: a, id: 1, podCIDR: 10.1.0.0/16, nodes: 1}\n  - {name: b, id: 4095, podCIDR: 10.2.0.0/16, nodes: 1}\n  - {name: c, id: 2048, podCIDR: 10.3.0.0/16, nodes: 1}\n",
        );
        let c = load(d.path()).expect("edge ids");
        assert_eq!(c.iter().map(|c| c.id).collect::<Vec<_>>(), [1, 4095, 2048]);
        let services: Vec<String> = c.iter().map(|c| c.service_cidr.to_string()).collect();
        assert_eq!(services, ["198.18.1.0/24", "198.18.255.0/24", "198.18.0.0/24"]);
    }

    #[test]
    fn bad_topologies_are_refused_naming_the_field() {
        for (yaml, want) in [
            (
                "clusters:\n  - {name: east, id: 1, podCIDR: 10.1.0.0/16, nodes: 2, colour: red}\n",
                "colour",
            ),
            (
                "clusters:\n  - {name: east, id: 1, podCIDR: 10.1.0.0/16, nodes: 2, encryption: ipsec}\n",
                "field encryption: \"ipsec\" is not one of off, cross-cluster, all",
            ),
            (
                "clusters:\n  - {name: East, id: 1, podCIDR: 10.1.0.0/16, nodes: 2}\n",
                "field name",
            ),
            (
                "clusters:\n  - {name: a, id: 1, podCIDR: 10.1.0.0/16, nodes: 2}\n  - {name: a, id: 2, podCIDR: 10.2.0.0/16, nodes: 1}\n",
                "duplicate cluster name",
            ),
            (
                "clusters:\n  - {name: a, id: 1, podCIDR: 10.1.0.0/16, nodes: 2}\n  - {name: b, id: 1, podCIDR: 10.2.0.0/16, nodes: 1}\n",
                "duplicate cluster id",
            ),
            (
                "clusters:\n  - {name: a, id: 1, podCIDR: 10.0.0.0/8, nodes: 2}\n  - {name: b, id: 2, podCIDR: 10.2.0.0/16, nodes: 1}\n",
                "overlaps",
            ),
            (
                "clusters:\n  - {name: a, id: 0, podCIDR: 10.1.0.0/16, nodes: 2}\n",
                "clusters[0] (a): field id: 0 is out of range 1-4095",
            ),
            (
                "clusters:\n  - {name: a, id: 4096, podCIDR: 10.1.0.0/16, nodes: 2}\n",
                "clusters[0] (a): field id: 4096 is out of range 1-4095",
            ),
            (
                "clusters:\n  - {name: a, id: 1, podCIDR: 10.1.0.1/16, nodes: 2}\n",
                "host bits",
            ),
            (
                "clusters:\n  - {name: a, id: 1, podCIDR: 100.64.0.0/16, nodes: 2}\n",
                "underlay",
            ),
            ("clusters: [\n", "lab.yaml"),
        ] {
            let d = write_lab(yaml);
            let e = format!("{:#}", load(d.path()).expect_err(yaml));
            assert!(e.contains(want), "{want:?} not in {e:?}");
        }
    }

    #[test]
    fn pod_on_unknown_node_is_refused() {
        let d = write_lab(OK);
        let c = &load(d.path()).expect("valid")[0];
        let doc: serde_json::Value = serde_json::json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"nodeName": "east-node-9", "containers": []}});
        let files = BTreeMap::from([("a.yaml".to_owned(), vec![doc])]);
        let e = check_docs(c, &files, &["east-node-1".into()]).expect_err("unknown node");
        assert!(e.to_string().contains("spec.nodeName"), "{e}");
    }
}
