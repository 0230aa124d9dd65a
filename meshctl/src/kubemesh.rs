//! `meshctl clustermesh status|enable|connect|disconnect` against clusters where the fleetmesh chart is installed,
//! reached through kubeconfig contexts (the way `cilium clustermesh` works).
//!
//! What meshctl reads and writes in a cluster (release `fleetmesh` in `kube-system`, the defaults):
//!
//! | object | name | use |
//! |---|---|---|
//! | ConfigMap | `fleetmesh-config` | `cluster-name`, `cluster-id` (the chart's values `cluster.name/id`) |
//! | Service | `fleetmesh-clustermesh-apiserver` | how peers reach this cluster's etcd: LoadBalancer ingress, or node port + node addresses |
//! | Deployment | `fleetmesh-clustermesh-apiserver` | TLS is on when it mounts the volume `etcd-server-tls` (its Secret: the etcd server certificate) |
//! | DaemonSet | `fleetmesh-agent` | agents' readiness; its volumes name the two Secrets below |
//! | Secret | `fleetmesh-clustermesh` (volume `clustermesh-config`) | the agents' clustermesh config: one key per peer in mesh-kvstore's peer format |
//! | Secret | `fleetmesh-clustermesh-remote-certs` (volume `clustermesh-remote-certs`) | per peer `<peer>.ca.crt`, `<peer>.tls.crt`, `<peer>.tls.key`, `<peer>.cluster.yaml` (name, id) |
//! | Secret | `fleetmesh-clustermesh-remote-client` | this cluster's CA and the read-only client certificate it issues to its peers (`ca.crt`, `tls.crt`, `tls.key` = `remote.crt/.key` of `cluster-certs`) |
//!
//! The peers' certificates live in a Secret of their own because the agent reads every file of its clustermesh
//! config directory as a peer and reports any other name as an error.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{ConfigMap, Node, PodSpec, Secret, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde::Serialize;

use crate::clustermesh::{CA_CERT, PeerConfig, PeerInfo};

pub const DEFAULT_NAMESPACE: &str = "kube-system";
pub const DEFAULT_RELEASE: &str = "fleetmesh";
/// Volume of the agent DaemonSet holding the clustermesh config Secret.
pub const CONFIG_VOLUME: &str = "clustermesh-config";
/// Volume of the agent DaemonSet holding the peers' TLS material.
pub const REMOTE_CERTS_VOLUME: &str = "clustermesh-remote-certs";
/// Volume of the clustermesh-apiserver Deployment with the etcd server certificate (present when TLS is on).
pub const SERVER_TLS_VOLUME: &str = "etcd-server-tls";

/// Where to find one cluster.
#[derive(Debug, Clone)]
pub struct Target {
    /// Kubeconfig file; `None`: `$KUBECONFIG` or `~/.kube/config`.
    pub kubeconfig: Option<PathBuf>,
    /// Context; `None`: the kubeconfig's current context.
    pub context: Option<String>,
    pub namespace: String,
    /// Helm release name of the chart.
    pub release: String,
}

/// The chart's object name prefix for a release (as `fleetmesh.fullname` without overrides).
#[must_use]
pub fn fullname(release: &str) -> String {
    let full = if release.contains("fleetmesh") {
        release.to_owned()
    } else {
        format!("{release}-fleetmesh")
    };
    full.chars()
        .take(40)
        .collect::<String>()
        .trim_end_matches('-')
        .to_owned()
}

/// A connection to one cluster's API server.
pub struct Cluster {
    client: kube::Client,
    /// The same, without retries: for the pod proxy.
    proxy_client: kube::Client,
    /// The context's name (for messages).
    pub context: String,
    pub url: String,
    pub namespace: String,
    pub full: String,
}

/// Opens a cluster: reads the kubeconfig and checks the context exists; does not talk to the API server yet.
///
/// # Errors
/// Unreadable kubeconfig, unknown context, invalid cluster/user entries.
pub async fn open(t: &Target) -> Result<Cluster> {
    let kc = match &t.kubeconfig {
        Some(p) => {
            Kubeconfig::read_from(p).with_context(|| format!("reading the kubeconfig {}", p.display()))?
        }
        None => Kubeconfig::read().map_err(|e| {
            anyhow!("reading the kubeconfig ($KUBECONFIG or ~/.kube/config): {e}; pass --kubeconfig FILE")
        })?,
    };
    let context = match &t.context {
        Some(c) => c.clone(),
        None => kc
            .current_context
            .clone()
            .ok_or_else(|| anyhow!("the kubeconfig has no current context: pass --context NAME"))?,
    };
    if !kc.contexts.iter().any(|c| c.name == context) {
        let known: Vec<&str> = kc.contexts.iter().map(|c| c.name.as_str()).collect();
        bail!(
            "context {context:?} is not in the kubeconfig (it has: {}); see `kubectl config get-contexts`",
            if known.is_empty() {
                "none".to_owned()
            } else {
                known.join(", ")
            }
        );
    }
    let opts = KubeConfigOptions {
        context: Some(context.clone()),
        ..KubeConfigOptions::default()
    };
    let mut cfg = kube::Config::from_custom_kubeconfig(kc, &opts)
        .await
        .map_err(|e| anyhow!("context {context:?} of the kubeconfig is not usable: {e}"))?;
    cfg.connect_timeout = Some(Duration::from_secs(5));
    cfg.read_timeout = Some(Duration::from_secs(15));
    cfg.write_timeout = Some(Duration::from_secs(15));
    let url = cfg.cluster_url.to_string();
    // The API server answers 503 for a pod it cannot reach through its proxy: that is an answer about the pod,
    // not a reason to retry (the default client retries 503 with backoff).
    let mut once = cfg.clone();
    once.default_retry = false;
    let client = kube::Client::try_from(cfg)
        .map_err(|e| anyhow!("context {context:?}: cannot make a client for {url}: {e}"))?;
    let proxy_client = kube::Client::try_from(once)
        .map_err(|e| anyhow!("context {context:?}: cannot make a client for {url}: {e}"))?;
    Ok(Cluster {
        client,
        proxy_client,
        context,
        url,
        namespace: t.namespace.clone(),
        full: fullname(&t.release),
    })
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let m = c.to_string();
        if !s.contains(&m) {
            let _ = write!(s, ": {m}");
        }
        src = c.source();
    }
    s
}

fn secret_data(s: &Secret) -> BTreeMap<String, Vec<u8>> {
    s.data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.0.clone()))
        .chain(
            s.string_data
                .iter()
                .flatten()
                .map(|(k, v)| (k.clone(), v.clone().into_bytes())),
        )
        .collect()
}

impl Cluster {
    pub(crate) fn err(&self, e: &kube::Error, what: &str) -> anyhow::Error {
        match e {
            kube::Error::Api(s) if s.code == 401 || s.code == 403 => anyhow!(
                "context {:?}: not allowed to {what} (HTTP {}: {}); check the context's credentials and RBAC",
                self.context,
                s.code,
                s.message
            ),
            kube::Error::Api(s) => anyhow!(
                "context {:?}: {what} failed (HTTP {}): {}",
                self.context,
                s.code,
                s.message
            ),
            _ => anyhow!(
                "cannot reach the Kubernetes API server of context {:?} at {} ({}); check that the cluster is up \
                 and the context is right (`kubectl --context {} cluster-info`)",
                self.context,
                self.url,
                chain(e),
                self.context
            ),
        }
    }

    pub(crate) fn client(&self) -> &kube::Client {
        &self.client
    }

    /// A client that does not retry (for the API server's pod proxy, whose 503 means "pod not reachable").
    pub(crate) fn proxy_client(&self) -> &kube::Client {
        &self.proxy_client
    }

    pub(crate) fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// Gets an object; `None` on 404 (by code: test servers word it differently).
    async fn get<K>(&self, name: &str, kind: &str) -> Result<Option<K>>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
    {
        match self.api::<K>().get(name).await {
            Ok(o) => Ok(Some(o)),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(None),
            Err(e) => Err(self.err(&e, &format!("get {kind} {}/{name}", self.namespace))),
        }
    }

    fn install_hint(&self) -> String {
        format!(
            "is the fleetmesh chart installed there? `helm install fleetmesh charts/fleetmesh --kube-context {} \
             --namespace {}` (or pass --namespace/--release)",
            self.context, self.namespace
        )
    }

    /// The cluster's name and id from the chart's ConfigMap.
    ///
    /// # Errors
    /// Unreachable cluster, chart not installed, bad values.
    pub async fn identity(&self) -> Result<PeerInfo> {
        let name = format!("{}-config", self.full);
        let cm: ConfigMap = self.get(&name, "ConfigMap").await?.ok_or_else(|| {
            anyhow!(
                "context {:?}: no ConfigMap {}/{name}: {}",
                self.context,
                self.namespace,
                self.install_hint()
            )
        })?;
        let data = cm.data.unwrap_or_default();
        let get = |k: &str| {
            data.get(k).cloned().ok_or_else(|| {
                anyhow!(
                    "context {:?}: ConfigMap {}/{name} has no key {k}; reinstall the chart",
                    self.context,
                    self.namespace
                )
            })
        };
        let cluster = get("cluster-name")?;
        let id: u16 = get("cluster-id")?.trim().parse().map_err(|_| {
            anyhow!(
                "context {:?}: ConfigMap {}/{name}: cluster-id is not a number 1-4095",
                self.context,
                self.namespace
            )
        })?;
        Ok(PeerInfo {
            name: cluster,
            id,
            labels: std::collections::BTreeMap::new(),
        })
    }

    fn apiserver_name(&self) -> String {
        format!("{}-clustermesh-apiserver", self.full)
    }

    pub(crate) fn agent_name(&self) -> String {
        format!("{}-agent", self.full)
    }

    /// The remote-client Secret: this cluster's CA and the client certificate it issues to peers.
    #[must_use]
    pub fn remote_client_secret(&self) -> String {
        format!("{}-clustermesh-remote-client", self.full)
    }

    pub(crate) async fn agent_daemonset(&self) -> Result<DaemonSet> {
        let name = self.agent_name();
        self.get(&name, "DaemonSet").await?.ok_or_else(|| {
            anyhow!(
                "context {:?}: no DaemonSet {}/{name}: {}",
                self.context,
                self.namespace,
                self.install_hint()
            )
        })
    }

    async fn apiserver_service(&self) -> Result<Service> {
        let name = self.apiserver_name();
        self.get(&name, "Service").await?.ok_or_else(|| {
            anyhow!(
                "context {:?}: no Service {}/{name} (the clustermesh-apiserver's): {}",
                self.context,
                self.namespace,
                self.install_hint()
            )
        })
    }

    /// The server TLS Secret's name when the clustermesh-apiserver's etcd serves https.
    async fn server_tls_secret(&self) -> Result<(Option<Deployment>, Option<String>)> {
        let dep: Option<Deployment> = self.get(&self.apiserver_name(), "Deployment").await?;
        let secret = dep
            .as_ref()
            .and_then(|d| d.spec.template.spec.as_ref())
            .and_then(|p| secret_volume(p, SERVER_TLS_VOLUME));
        Ok((dep, secret))
    }

    /// Peers' addresses of the clustermesh-apiserver: `(type, endpoints without scheme, problem)`.
    async fn reach(&self, svc: &Service) -> Result<Reach> {
        let spec = svc.spec.clone().unwrap_or_default();
        let kind = spec.type_.clone().unwrap_or_else(|| "ClusterIP".to_owned());
        let port = spec
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some("etcd"))
            .or_else(|| spec.ports.iter().flatten().next())
            .cloned();
        let Some(port) = port else {
            return Ok(Reach {
                kind,
                addresses: vec![],
                problem: Some("the Service has no port".to_owned()),
            });
        };
        match kind.as_str() {
            "LoadBalancer" => {
                let addrs: Vec<String> = svc
                    .status
                    .as_ref()
                    .and_then(|s| s.load_balancer.as_ref())
                    .and_then(|lb| lb.ingress.as_ref())
                    .into_iter()
                    .flatten()
                    .filter_map(|i| i.ip.clone().or_else(|| i.hostname.clone()))
                    .map(|h| host_port(&h, port.port))
                    .collect();
                let problem = addrs
                    .is_empty()
                    .then(|| "the LoadBalancer has no ingress address yet".to_owned());
                Ok(Reach {
                    kind,
                    addresses: addrs,
                    problem,
                })
            }
            "NodePort" => {
                let Some(node_port) = port.node_port.filter(|p| *p > 0) else {
                    return Ok(Reach {
                        kind,
                        addresses: vec![],
                        problem: Some("the Service has no node port yet".to_owned()),
                    });
                };
                let nodes = Api::<Node>::all(self.client.clone())
                    .list(&ListParams::default())
                    .await
                    .map_err(|e| self.err(&e, "list nodes"))?;
                let mut hosts: Vec<String> = nodes
                    .items
                    .iter()
                    .filter_map(|n| {
                        let addrs = n.status.as_ref()?.addresses.as_ref()?;
                        addrs
                            .iter()
                            .find(|a| a.type_ == "ExternalIP")
                            .or_else(|| addrs.iter().find(|a| a.type_ == "InternalIP"))
                            .map(|a| a.address.clone())
                    })
                    .collect();
                hosts.sort();
                hosts.dedup();
                hosts.truncate(3);
                let problem = hosts
                    .is_empty()
                    .then(|| "no node has an ExternalIP or InternalIP address".to_owned());
                Ok(Reach {
                    kind,
                    addresses: hosts.iter().map(|h| host_port(h, node_port)).collect(),
                    problem,
                })
            }
            other => Ok(Reach {
                kind: other.to_owned(),
                addresses: vec![],
                problem: Some(format!(
                    "type {other} is not reachable from other clusters: run `meshctl clustermesh enable \
                     --context {} --service-type NodePort` (or LoadBalancer)",
                    self.context
                )),
            }),
        }
    }

    async fn patch_secret(&self, name: &str, data: &BTreeMap<String, Option<Vec<u8>>>) -> Result<()> {
        let exists = self.get::<Secret>(name, "Secret").await?.is_some();
        let api = self.api::<Secret>();
        if exists {
            let map: serde_json::Map<String, serde_json::Value> = data
                .iter()
                .map(|(k, v)| {
                    let v = v.as_ref().map_or(serde_json::Value::Null, |b| {
                        serde_json::to_value(ByteString(b.clone())).unwrap_or_default()
                    });
                    (k.clone(), v)
                })
                .collect();
            api.patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({ "data": map })),
            )
            .await
            .map_err(|e| self.err(&e, &format!("update Secret {}/{name}", self.namespace)))?;
        } else {
            let present: BTreeMap<String, ByteString> = data
                .iter()
                .filter_map(|(k, v)| Some((k.clone(), ByteString(v.clone()?))))
                .collect();
            if present.is_empty() {
                return Ok(());
            }
            let s = Secret {
                metadata: ObjectMeta {
                    name: Some(name.to_owned()),
                    namespace: Some(self.namespace.clone()),
                    labels: Some(BTreeMap::from([
                        ("app.kubernetes.io/part-of".to_owned(), "fleetmesh".to_owned()),
                        ("app.kubernetes.io/managed-by".to_owned(), "meshctl".to_owned()),
                    ])),
                    ..ObjectMeta::default()
                },
                type_: Some("Opaque".to_owned()),
                data: Some(present),
                ..Secret::default()
            };
            api.create(&PostParams::default(), &s)
                .await
                .map_err(|e| self.err(&e, &format!("create Secret {}/{name}", self.namespace)))?;
        }
        Ok(())
    }
}

fn host_port(host: &str, port: i32) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

fn secret_volume(p: &PodSpec, volume: &str) -> Option<String> {
    p.volumes
        .iter()
        .flatten()
        .find(|v| v.name == volume)?
        .secret
        .as_ref()?
        .secret_name
        .clone()
}

fn mount_path(p: &PodSpec, volume: &str) -> Option<String> {
    p.containers
        .iter()
        .flat_map(|c| c.volume_mounts.iter().flatten())
        .find(|m| m.name == volume)
        .map(|m| m.mount_path.clone())
}

struct Reach {
    kind: String,
    addresses: Vec<String>,
    problem: Option<String>,
}

/// `meshctl clustermesh status` as JSON.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub context: String,
    pub namespace: String,
    pub cluster: PeerInfo,
    pub apiserver: ApiserverStatus,
    pub tls: TlsStatus,
    pub agents: AgentsStatus,
    pub peers: Vec<PeerStatus>,
    /// What keeps the cluster from being reachable or ready; empty when all is well.
    pub problems: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ApiserverStatus {
    pub service: String,
    pub service_type: String,
    /// `host:port` peers use.
    pub addresses: Vec<String>,
    /// Ready replicas / desired of the Deployment (`None` when it is missing).
    pub ready: Option<i32>,
    pub replicas: Option<i32>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TlsStatus {
    pub enabled: bool,
    /// The etcd server certificate's Secret and whether it exists.
    pub server_secret: Option<String>,
    pub server_secret_present: bool,
    /// The Secret with the CA and client certificate handed to peers, and whether it exists.
    pub remote_client_secret: String,
    pub remote_client_secret_present: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct AgentsStatus {
    pub daemonset: String,
    pub desired: i32,
    pub ready: i32,
    pub available: i32,
}

#[derive(Debug, Clone, Serialize)]
pub struct PeerStatus {
    pub name: String,
    /// Known for peers connected by `meshctl clustermesh connect`.
    pub id: Option<u16>,
    pub endpoints: Vec<String>,
    pub tls: bool,
    /// Parse problem of the entry, if any.
    pub error: Option<String>,
}

/// Names of the Secrets the agents mount.
struct AgentSecrets {
    config: String,
    certs: Option<(String, String)>,
}

fn agent_secrets(c: &Cluster, ds: &DaemonSet) -> AgentSecrets {
    let pod = ds.spec.template.spec.clone().unwrap_or_default();
    let config = secret_volume(&pod, CONFIG_VOLUME).unwrap_or_else(|| format!("{}-clustermesh", c.full));
    let certs = secret_volume(&pod, REMOTE_CERTS_VOLUME).zip(mount_path(&pod, REMOTE_CERTS_VOLUME));
    AgentSecrets { config, certs }
}

/// Peers in the config Secret, with their ids from the certs Secret.
async fn peers(c: &Cluster, secrets: &AgentSecrets) -> Result<Vec<PeerStatus>> {
    let config = c.get::<Secret>(&secrets.config, "Secret").await?;
    let certs = match &secrets.certs {
        Some((name, _)) => c.get::<Secret>(name, "Secret").await?,
        None => None,
    };
    let certs = certs.as_ref().map(secret_data).unwrap_or_default();
    let mut out = Vec::new();
    for (name, value) in config.as_ref().map(secret_data).unwrap_or_default() {
        let id = certs
            .get(&format!("{name}.cluster.yaml"))
            .and_then(|b| mesh_model::yaml::from_slice::<PeerInfo>(b).ok())
            .map(|p| p.id);
        let parsed = mesh_model::yaml::from_slice::<serde_json::Value>(&value);
        let (endpoints, tls, error) = match parsed {
            Ok(v) => {
                let eps: Vec<String> = v
                    .get("endpoints")
                    .and_then(|e| e.as_array())
                    .into_iter()
                    .flatten()
                    .filter_map(|e| e.as_str().map(str::to_owned))
                    .collect();
                let tls = v.get("trusted-ca-file").is_some();
                let err = eps.is_empty().then(|| "no endpoints".to_owned());
                (eps, tls, err)
            }
            Err(e) => (vec![], false, Some(format!("not YAML: {e}"))),
        };
        out.push(PeerStatus {
            name,
            id,
            endpoints,
            tls,
            error,
        });
    }
    Ok(out)
}

/// Reads the cluster mesh state of one cluster.
///
/// # Errors
/// Unreachable cluster, chart not installed.
pub async fn status(c: &Cluster) -> Result<Status> {
    let cluster = c.identity().await?;
    let svc = c.apiserver_service().await?;
    let reach = c.reach(&svc).await?;
    let ds = c.agent_daemonset().await?;
    let (dep, server_secret) = c.server_tls_secret().await?;
    let server_secret_present = match &server_secret {
        Some(s) => c.get::<Secret>(s, "Secret").await?.is_some(),
        None => false,
    };
    let remote_client_secret = c.remote_client_secret();
    let remote_client_secret_present = c.get::<Secret>(&remote_client_secret, "Secret").await?.is_some();
    let secrets = agent_secrets(c, &ds);
    let peers = peers(c, &secrets).await?;
    let st = ds.status.clone().unwrap_or_default();
    let agents = AgentsStatus {
        daemonset: c.agent_name(),
        desired: st.desired_number_scheduled,
        ready: st.number_ready,
        available: st.number_available.unwrap_or(0),
    };
    let mut problems = Vec::new();
    if let Some(p) = &reach.problem {
        problems.push(format!("Service {}: {p}", c.apiserver_name()));
    }
    if agents.desired == 0 {
        problems.push(format!("DaemonSet {}: no agent scheduled yet", agents.daemonset));
    } else if agents.ready < agents.desired {
        problems.push(format!(
            "DaemonSet {}: {} of {} agents ready",
            agents.daemonset, agents.ready, agents.desired
        ));
    }
    if dep.is_none() {
        problems.push(format!("Deployment {} is missing", c.apiserver_name()));
    }
    if let Some(s) = &server_secret
        && !server_secret_present
    {
        problems.push(format!("TLS is on but the etcd server Secret {s} is missing"));
    }
    if server_secret.is_some() && !remote_client_secret_present {
        problems.push(format!(
            "TLS is on but Secret {remote_client_secret} (what peers get to read this cluster) is missing; \
             `meshctl clustermesh enable --context {}` prints how to make it",
            c.context
        ));
    }
    if secrets.certs.is_none() {
        problems.push(format!(
            "DaemonSet {} has no volume {REMOTE_CERTS_VOLUME}: upgrade the chart before `meshctl clustermesh connect`",
            agents.daemonset
        ));
    }
    for p in &peers {
        if let Some(e) = &p.error {
            problems.push(format!("peer {}: {e}", p.name));
        }
    }
    let (ready, replicas) = dep.as_ref().map_or((None, None), |d| {
        (
            Some(d.status.as_ref().and_then(|s| s.ready_replicas).unwrap_or(0)),
            Some(d.spec.replicas.unwrap_or(1)),
        )
    });
    Ok(Status {
        context: c.context.clone(),
        namespace: c.namespace.clone(),
        cluster,
        apiserver: ApiserverStatus {
            service: c.apiserver_name(),
            service_type: reach.kind,
            addresses: reach.addresses,
            ready,
            replicas,
        },
        tls: TlsStatus {
            enabled: server_secret.is_some(),
            server_secret,
            server_secret_present,
            remote_client_secret,
            remote_client_secret_present,
        },
        agents,
        peers,
        problems,
    })
}

impl Status {
    /// What `--wait` waits for: an address for peers and every agent ready.
    #[must_use]
    pub fn waiting_for(&self) -> Vec<String> {
        let mut w = Vec::new();
        if self.apiserver.addresses.is_empty() {
            w.push(format!("an address of Service {}", self.apiserver.service));
        }
        if self.agents.desired == 0 || self.agents.ready < self.agents.desired {
            w.push(format!(
                "the agents of DaemonSet {} ({}/{} ready)",
                self.agents.daemonset, self.agents.ready, self.agents.desired
            ));
        }
        w
    }

    /// The human table.
    #[must_use]
    pub fn table(&self) -> String {
        let mut s = String::new();
        let yes = |b: bool| if b { "yes" } else { "MISSING" };
        let _ = writeln!(
            s,
            "Cluster:      {} (id {})   context {}, namespace {}",
            self.cluster.name, self.cluster.id, self.context, self.namespace
        );
        let addrs = if self.apiserver.addresses.is_empty() {
            "none yet".to_owned()
        } else {
            self.apiserver.addresses.join(", ")
        };
        let _ = writeln!(
            s,
            "Apiserver:    Service {} ({}), peers reach it at {addrs}",
            self.apiserver.service, self.apiserver.service_type
        );
        match (self.apiserver.ready, self.apiserver.replicas) {
            (Some(r), Some(d)) => {
                let _ = writeln!(s, "              Deployment {r}/{d} ready");
            }
            _ => {
                let _ = writeln!(s, "              Deployment MISSING");
            }
        }
        if self.tls.enabled {
            let _ = writeln!(
                s,
                "TLS:          on; server Secret {} {}, remote client Secret {} {}",
                self.tls.server_secret.as_deref().unwrap_or("-"),
                yes(self.tls.server_secret_present),
                self.tls.remote_client_secret,
                yes(self.tls.remote_client_secret_present)
            );
        } else {
            let _ = writeln!(s, "TLS:          off (peers connect over plain http)");
        }
        let _ = writeln!(
            s,
            "Agents:       DaemonSet {}: {}/{} ready, {} available",
            self.agents.daemonset, self.agents.ready, self.agents.desired, self.agents.available
        );
        if self.peers.is_empty() {
            let _ = writeln!(s, "Peers:        none");
        } else {
            let _ = writeln!(s, "Peers:");
            let rows: Vec<Vec<String>> = self
                .peers
                .iter()
                .map(|p| {
                    vec![
                        p.name.clone(),
                        p.id.map_or_else(|| "-".to_owned(), |i| i.to_string()),
                        if p.tls { "yes" } else { "no" }.to_owned(),
                        p.error.clone().unwrap_or_else(|| p.endpoints.join(",")),
                    ]
                })
                .collect();
            table(&mut s, "  ", &["NAME", "ID", "TLS", "ENDPOINTS"], &rows);
        }
        if self.problems.is_empty() {
            let _ = writeln!(s, "Problems:     none");
        } else {
            let _ = writeln!(s, "Problems:");
            for p in &self.problems {
                let _ = writeln!(s, "  - {p}");
            }
        }
        s
    }
}

/// Appends a table of `rows` under `head`, columns aligned and two spaces apart, every line after `indent`.
pub(crate) fn table(s: &mut String, indent: &str, head: &[&str], rows: &[Vec<String>]) {
    let mut w: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let line = |s: &mut String, cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::from(indent);
        for (i, c) in cells.enumerate() {
            let sep = if i == 0 { "" } else { "  " };
            let _ = write!(l, "{sep}{c:<w$}", w = w[i]);
        }
        let _ = writeln!(s, "{}", l.trim_end());
    };
    line(s, &mut head.iter().copied());
    for r in rows {
        line(s, &mut r.iter().map(String::as_str));
    }
}

/// Polls [`status`] until nothing is waited for, or fails after `timeout`.
///
/// # Errors
/// Timeout (naming what is missing), unreachable cluster.
pub async fn wait(c: &Cluster, timeout: Duration, interval: Duration) -> Result<Status> {
    let hint = format!(
        "check `kubectl --context {} -n {} get service,daemonset`",
        c.context, c.namespace
    );
    poll_until(c, timeout, interval, &hint, || status(c), Status::waiting_for).await
}

/// Fetches with `fetch` every `interval` until `missing` says nothing is missing, or fails after `timeout` with
/// one line naming what was still missing, then `hint`.
///
/// # Errors
/// Timeout; whatever `fetch` fails with.
pub(crate) async fn poll_until<T, F, Fut>(
    c: &Cluster,
    timeout: Duration,
    interval: Duration,
    hint: &str,
    mut fetch: F,
    missing: impl Fn(&T) -> Vec<String>,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let start = Instant::now();
    loop {
        let st = fetch().await?;
        let m = missing(&st);
        if m.is_empty() {
            return Ok(st);
        }
        if start.elapsed() >= timeout {
            bail!(
                "context {:?}: timed out after {}s waiting for {}; {hint}",
                c.context,
                timeout.as_secs(),
                m.join(" and "),
            );
        }
        tokio::time::sleep(
            interval
                .min(timeout.saturating_sub(start.elapsed()))
                .max(Duration::from_millis(50)),
        )
        .await;
    }
}

/// What `enable` found and did.
#[derive(Debug, Clone, Serialize)]
pub struct Enabled {
    pub cluster: PeerInfo,
    pub service_type: String,
    /// The Service's type was patched from this one.
    pub patched_from: Option<String>,
    pub tls: bool,
    /// Hints printed for the user (TLS off, helm values to keep the type).
    pub notes: Vec<String>,
}

/// Checks the chart, the Service (patching its type when asked) and the TLS Secrets.
///
/// # Errors
/// Missing chart/Service; TLS on with missing Secrets (the message lists the commands that make them).
pub async fn enable(c: &Cluster, service_type: Option<&str>) -> Result<Enabled> {
    let cluster = c.identity().await?;
    let svc = c.apiserver_service().await?;
    let current = svc
        .spec
        .as_ref()
        .and_then(|s| s.type_.clone())
        .unwrap_or_else(|| "ClusterIP".to_owned());
    let mut notes = Vec::new();
    let mut patched_from = None;
    let mut kind = current.clone();
    if let Some(want) = service_type
        && want != current
    {
        c.api::<Service>()
            .patch(
                &c.apiserver_name(),
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({ "spec": { "type": want } })),
            )
            .await
            .map_err(|e| c.err(&e, &format!("change the type of Service {}", c.apiserver_name())))?;
        patched_from = Some(current.clone());
        kind = want.to_owned();
        notes.push(format!(
            "Service {} changed from {current} to {want}; make it stick across upgrades with `helm upgrade ... \
             --reuse-values --set clustermesh.apiserver.service.type={want}`",
            c.apiserver_name()
        ));
    } else if !matches!(current.as_str(), "NodePort" | "LoadBalancer") {
        bail!(
            "context {:?}: Service {} has type {current}, which peers cannot reach: pass --service-type NodePort \
             or LoadBalancer",
            c.context,
            c.apiserver_name()
        );
    }
    let ds = c.agent_daemonset().await?;
    if agent_secrets(c, &ds).certs.is_none() {
        bail!(
            "context {:?}: DaemonSet {} has no volume {REMOTE_CERTS_VOLUME} (an older chart): upgrade the chart \
             (`helm upgrade fleetmesh charts/fleetmesh --kube-context {} -n {} --reuse-values`)",
            c.context,
            c.agent_name(),
            c.context,
            c.namespace
        );
    }
    let (_, server_secret) = c.server_tls_secret().await?;
    let certs_cmd = format!(
        "meshctl clustermesh ca create --out mesh-ca   # once for the whole mesh\n  meshctl clustermesh cluster-certs \
         --ca mesh-ca --cluster {n} --cluster-id {id} --server-ip PEER-REACHABLE-IP --server-name {svc}.{ns}.svc \
         --out {n}   # the .svc name is how this cluster's own agents reach it",
        n = cluster.name,
        id = cluster.id,
        svc = c.apiserver_name(),
        ns = c.namespace
    );
    let client_cmd = format!(
        "kubectl --context {ctx} -n {ns} create secret generic {s} --type kubernetes.io/tls \
         --from-file=ca.crt={n}/ca.crt --from-file=tls.crt={n}/remote.crt --from-file=tls.key={n}/remote.key",
        ctx = c.context,
        ns = c.namespace,
        s = c.remote_client_secret(),
        n = cluster.name
    );
    let tls = if let Some(server) = &server_secret {
        let mut missing = Vec::new();
        if c.get::<Secret>(server, "Secret").await?.is_none() {
            missing.push(format!(
                "kubectl --context {ctx} -n {ns} create secret generic {server} --type kubernetes.io/tls \
                 --from-file=tls.crt={n}/etcd-server.crt --from-file=tls.key={n}/etcd-server.key \
                 --from-file=ca.crt={n}/ca.crt",
                ctx = c.context,
                ns = c.namespace,
                n = cluster.name
            ));
        }
        if c.get::<Secret>(&c.remote_client_secret(), "Secret")
            .await?
            .is_none()
        {
            missing.push(client_cmd.clone());
        }
        if !missing.is_empty() {
            bail!(
                "context {:?}: TLS is on but Secrets are missing; make them with (from the folder with the mesh \
                 CA):\n  {certs_cmd}\n  {}",
                c.context,
                missing.join("\n  ")
            );
        }
        true
    } else {
        notes.push(format!(
            "TLS is off: peers read this cluster's etcd over plain http. To turn it on:\n  {certs_cmd}\n  \
             kubectl --context {ctx} -n {ns} create secret generic {full}-etcd-server --type kubernetes.io/tls \
             --from-file=tls.crt={n}/etcd-server.crt --from-file=tls.key={n}/etcd-server.key \
             --from-file=ca.crt={n}/ca.crt\n  {client_cmd}\n  helm upgrade fleetmesh charts/fleetmesh \
             --kube-context {ctx} -n {ns} --reuse-values --set clustermesh.tls.enabled=true \
             --set clustermesh.tls.existingSecret={full}-etcd-server",
            ctx = c.context,
            ns = c.namespace,
            full = c.full,
            n = cluster.name
        ));
        false
    };
    Ok(Enabled {
        cluster,
        service_type: kind,
        patched_from,
        tls,
        notes,
    })
}

/// What one side of a connection needs about the other.
struct Side {
    info: PeerInfo,
    /// Full URLs.
    endpoints: Vec<String>,
    /// CA, client cert, client key (TLS on).
    tls: Option<[Vec<u8>; 3]>,
    secrets: AgentSecrets,
    /// Peers `(name -> id)` connected already, from the certs Secret.
    peers: BTreeMap<String, Option<u16>>,
}

/// `endpoints`: URLs peers use instead of the Service's addresses (when not empty).
async fn side(c: &Cluster, endpoints: &[String]) -> Result<Side> {
    let info = c.identity().await?;
    let svc = c.apiserver_service().await?;
    let reach = c.reach(&svc).await?;
    if endpoints.is_empty()
        && let Some(p) = reach.problem
    {
        bail!(
            "context {:?}: peers cannot reach Service {} yet: {p} (see `meshctl clustermesh status --context {} \
             --wait`)",
            c.context,
            c.apiserver_name(),
            c.context
        );
    }
    let ds = c.agent_daemonset().await?;
    let secrets = agent_secrets(c, &ds);
    if secrets.certs.is_none() {
        bail!(
            "context {:?}: DaemonSet {} has no volume {REMOTE_CERTS_VOLUME} (an older chart): upgrade the chart \
             there first",
            c.context,
            c.agent_name()
        );
    }
    let (_, server) = c.server_tls_secret().await?;
    let scheme = if server.is_some() { "https" } else { "http" };
    if let Some(e) = endpoints.iter().find(|e| {
        let rest = e.strip_prefix(&format!("{scheme}://")).unwrap_or("");
        rest.is_empty() || rest.contains('/')
    }) {
        bail!(
            "endpoint {e:?} for context {:?} is not an {scheme}://HOST:PORT URL (TLS is {} there)",
            c.context,
            if server.is_some() { "on" } else { "off" }
        );
    }
    let tls = if server.is_some() {
        let name = c.remote_client_secret();
        let s = c.get::<Secret>(&name, "Secret").await?.ok_or_else(|| {
            anyhow!(
                "context {:?}: TLS is on but Secret {}/{name} (the CA and client certificate for peers) is \
                 missing; `meshctl clustermesh enable --context {}` prints how to make it",
                c.context,
                c.namespace,
                c.context
            )
        })?;
        let data = secret_data(&s);
        let key = |k: &str| {
            data.get(k).cloned().ok_or_else(|| {
                anyhow!(
                    "context {:?}: Secret {}/{name} has no key {k} (it needs ca.crt, tls.crt, tls.key)",
                    c.context,
                    c.namespace
                )
            })
        };
        Some([key(CA_CERT)?, key("tls.crt")?, key("tls.key")?])
    } else {
        None
    };
    let peers = peers(c, &secrets)
        .await?
        .into_iter()
        .map(|p| (p.name, p.id))
        .collect();
    Ok(Side {
        info,
        endpoints: if !endpoints.is_empty() {
            endpoints.to_vec()
        } else {
            reach
                .addresses
                .iter()
                .map(|a| format!("{scheme}://{a}"))
                .collect()
        },
        tls,
        secrets,
        peers,
    })
}

fn check_pair(a: &Side, a_ctx: &str, b: &Side, replace: bool) -> Result<()> {
    if let Some((other, _)) = a
        .peers
        .iter()
        .find(|(n, id)| **n != b.info.name && **id == Some(b.info.id))
    {
        bail!(
            "cluster {:?} has id {}, which cluster {other:?} (connected to {:?}, context {a_ctx}) already uses: \
             cluster ids must be unique in the mesh; nothing was changed",
            b.info.name,
            b.info.id,
            a.info.name
        );
    }
    if let Some(Some(id)) = a.peers.get(&b.info.name)
        && *id != b.info.id
        && !replace
    {
        bail!(
            "a cluster named {:?} with id {id} is connected to {:?} already; refusing another cluster of that \
             name (id {}); nothing was changed (pass --replace to replace it)",
            b.info.name,
            a.info.name,
            b.info.id
        );
    }
    Ok(())
}

/// Writes into `a` what it needs to read `b`.
async fn write_peer(a: &Cluster, sa: &Side, b: &Side) -> Result<()> {
    let (certs_secret, dir) = sa.secrets.certs.clone().expect("checked by side()");
    let n = &b.info.name;
    let mut certs: BTreeMap<String, Option<Vec<u8>>> = BTreeMap::new();
    let cfg = if let Some([ca, crt, key]) = &b.tls {
        certs.insert(format!("{n}.ca.crt"), Some(ca.clone()));
        certs.insert(format!("{n}.tls.crt"), Some(crt.clone()));
        certs.insert(format!("{n}.tls.key"), Some(key.clone()));
        let p = |s: &str| PathBuf::from(format!("{}/{n}.{s}", dir.trim_end_matches('/')));
        mesh_model::yaml::to_string(&PeerConfig {
            endpoints: b.endpoints.clone(),
            trusted_ca_file: p("ca.crt"),
            cert_file: p("tls.crt"),
            key_file: p("tls.key"),
            prefix: None,
            cluster_id: None,
            pod_cidrs: None,
            cluster_labels: None,
        })?
    } else {
        for s in ["ca.crt", "tls.crt", "tls.key"] {
            certs.insert(format!("{n}.{s}"), None);
        }
        #[derive(Serialize)]
        struct Plain<'a> {
            endpoints: &'a [String],
        }
        mesh_model::yaml::to_string(&Plain {
            endpoints: &b.endpoints,
        })?
    };
    certs.insert(
        format!("{n}.cluster.yaml"),
        Some(mesh_model::yaml::to_string(&b.info)?.into_bytes()),
    );
    a.patch_secret(&certs_secret, &certs).await?;
    // The config entry last: an agent that sees it finds the files it names.
    a.patch_secret(
        &sa.secrets.config,
        &BTreeMap::from([(n.clone(), Some(cfg.into_bytes()))]),
    )
    .await
}

/// Options of [`connect`].
#[derive(Debug, Clone, Default)]
pub struct ConnectOptions {
    /// Replace a different cluster of the same name.
    pub replace: bool,
    /// URLs the destination uses to reach the source (default: from the source's Service).
    pub source_endpoints: Vec<String>,
    /// URLs the source uses to reach the destination (default: from the destination's Service).
    pub destination_endpoints: Vec<String>,
}

/// Connects two clusters both ways.
///
/// # Errors
/// Same name or id, an id clash with another peer, unreachable clusters, missing Secrets.
pub async fn connect(a: &Cluster, b: &Cluster, opts: &ConnectOptions) -> Result<(PeerInfo, PeerInfo)> {
    let replace = opts.replace;
    let sa = side(a, &opts.source_endpoints).await?;
    let sb = side(b, &opts.destination_endpoints).await?;
    if sa.info.name == sb.info.name {
        bail!(
            "contexts {:?} and {:?} are both cluster {:?}: cannot connect a cluster to itself (give each cluster \
             its own cluster.name)",
            a.context,
            b.context,
            sa.info.name
        );
    }
    if sa.info.id == sb.info.id {
        bail!(
            "clusters {:?} (context {}) and {:?} (context {}) both have id {}: cluster ids must be unique in the \
             mesh (change cluster.id with helm upgrade); nothing was changed",
            sa.info.name,
            a.context,
            sb.info.name,
            b.context,
            sa.info.id
        );
    }
    check_pair(&sa, &a.context, &sb, replace)?;
    check_pair(&sb, &b.context, &sa, replace)?;
    write_peer(a, &sa, &sb).await?;
    if let Err(e) = write_peer(b, &sb, &sa).await {
        // Leave no half connection behind (unless `a` had the entry before).
        if sa.peers.contains_key(&sb.info.name) {
            return Err(e);
        }
        return Err(match remove_peer(a, &sa.secrets, &sb.info.name).await {
            Ok(_) => e.context(format!(
                "connecting {:?} to {:?} failed; {:?} was left unchanged",
                sb.info.name, sa.info.name, sa.info.name
            )),
            Err(undo) => e.context(format!(
                "connecting {:?} to {:?} failed, and removing {:?}'s new entry of {:?} failed too ({undo:#}): run                  `meshctl clustermesh disconnect --context {} --destination-context {}`",
                sb.info.name, sa.info.name, sa.info.name, sb.info.name, a.context, b.context
            )),
        });
    }
    Ok((sa.info, sb.info))
}

async fn remove_peer(c: &Cluster, secrets: &AgentSecrets, peer: &str) -> Result<bool> {
    let mut removed = false;
    if let Some(s) = c.get::<Secret>(&secrets.config, "Secret").await?
        && secret_data(&s).contains_key(peer)
    {
        c.patch_secret(&secrets.config, &BTreeMap::from([(peer.to_owned(), None)]))
            .await?;
        removed = true;
    }
    if let Some((name, _)) = &secrets.certs
        && let Some(s) = c.get::<Secret>(name, "Secret").await?
    {
        let prefix = format!("{peer}.");
        let keys: BTreeMap<String, Option<Vec<u8>>> = secret_data(&s)
            .into_keys()
            .filter(|k| k.starts_with(&prefix))
            .map(|k| (k, None))
            .collect();
        if !keys.is_empty() {
            c.patch_secret(name, &keys).await?;
            removed = true;
        }
    }
    Ok(removed)
}

/// Removes the entries of two clusters from each other. Returns the names and whether anything was removed.
///
/// # Errors
/// Unreachable clusters, chart missing.
pub async fn disconnect(a: &Cluster, b: &Cluster) -> Result<(PeerInfo, PeerInfo, bool)> {
    let ia = a.identity().await?;
    let ib = b.identity().await?;
    let da = a.agent_daemonset().await?;
    let db = b.agent_daemonset().await?;
    let r1 = remove_peer(a, &agent_secrets(a, &da), &ib.name).await?;
    let r2 = remove_peer(b, &agent_secrets(b, &db), &ia.name).await?;
    Ok((ia, ib, r1 || r2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_names_follow_the_charts_fullname() {
        assert_eq!(fullname("fleetmesh"), "fleetmesh");
        assert_eq!(fullname("prod-fleetmesh"), "prod-fleetmesh");
        assert_eq!(fullname("mesh"), "mesh-fleetmesh");
        assert_eq!(fullname(&"a".repeat(45)).len(), 40);
        assert_eq!(fullname(&"a".repeat(39)), "a".repeat(39));
    }

    #[test]
    fn ipv6_hosts_get_brackets() {
        assert_eq!(host_port("192.0.2.1", 2379), "192.0.2.1:2379");
        assert_eq!(host_port("2001:db8::1", 32379), "[2001:db8::1]:32379");
        assert_eq!(host_port("lb.example.com", 2379), "lb.example.com:2379");
    }
}
