//! The Kubernetes source: one watcher per kind (list, then watch, relist after a 410 Gone, backoff on errors),
//! each object converted with mesh-model's manifest rules, the whole published as a
//! [`Snapshot`](mesh_model::source::Snapshot) once every kind is listed and after every change. EndpointSlices
//! are among the kinds: they are the source of services' backends ([`mesh_model::service::endpoints`]).
//!
//! Like the manifests source, bad input never loses state: an object that does not convert is reported in the
//! snapshot's errors and skipped; if it had a good version before, that version stays in force.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::api::networking::v1 as networking;
use kube::api::Api;
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event};
use kube::{Client, Resource, ResourceExt as _};
use mesh_model::ClusterState;
use mesh_model::manifests::{self, ManifestError, Object};
use mesh_model::source::Snapshot;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{Notify, watch};
use tracing::{debug, error, info, instrument, warn};

use crate::crd::{self, ObjectStatus};
use crate::lenient::Lenient;
use crate::progress::RolloutSummaries;
use crate::status::{ObjectRef, StatusKind, StatusWriter, Verdict, Verdicts};

/// Origin named in conversion errors (where a manifest error would name the file).
pub const ORIGIN: &str = "kubernetes";
/// How long the source waits after a change for more changes before it publishes (bursts become one snapshot).
const COALESCE: Duration = Duration::from_millis(30);
/// How long [`connect`] waits for the API server's version.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// Errors of the Kubernetes source.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "no Kubernetes client configuration: not in a cluster (KUBERNETES_SERVICE_HOST unset) and no usable \
         kubeconfig (KUBECONFIG or ~/.kube/config)"
    )]
    Config(#[source] kube::config::InferConfigError),
    #[error("cannot build a Kubernetes client for {url}")]
    Client {
        url: String,
        #[source]
        source: kube::Error,
    },
    #[error(
        "the Kubernetes API server at {url} is unreachable or refuses us (check the address, the credentials and \
         that the server is up)"
    )]
    Unreachable {
        url: String,
        #[source]
        source: kube::Error,
    },
    #[error("the Kubernetes API server at {url} did not answer within {timeout:?}")]
    Timeout { url: String, timeout: Duration },
    #[error(
        "node name {0:?} cannot select pods (a node name is lower case letters, digits, '-' and '.', at most 253)"
    )]
    InvalidNodeName(String),
}

/// Which part of the cluster a daemon needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// A node's mesh-agent: every node, namespace, service, EndpointSlice and fleetmesh object, but only the pods
    /// scheduled on this node.
    Node(String),
    /// The cluster's clustermesh-apiserver: everything.
    Cluster,
}

impl Scope {
    /// The field selector of the pod watcher (`spec.nodeName=<node>` for a node, none for the cluster).
    ///
    /// # Errors
    /// A node name that is not a Kubernetes name (it could change the selector's meaning).
    pub fn pod_field_selector(&self) -> Result<Option<String>, Error> {
        match self {
            Scope::Cluster => Ok(None),
            Scope::Node(node) if is_object_name(node) => Ok(Some(format!("spec.nodeName={node}"))),
            Scope::Node(node) => Err(Error::InvalidNodeName(node.clone())),
        }
    }

    /// Whether a pod belongs to this scope. The API server applies the field selector already; this check keeps
    /// the scope even when it does not (some test servers ignore selectors).
    fn wants_pod(&self, pod: &core::Pod) -> bool {
        match self {
            Scope::Cluster => true,
            Scope::Node(node) => {
                pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node.as_str())
            }
        }
    }
}

fn is_object_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// Builds a client from the in-cluster configuration or KUBECONFIG (as [`Client::try_default`] does) and checks
/// that the API server answers, so a daemon fails at start with a message that says what is wrong.
///
/// # Errors
/// No configuration, or the API server unreachable, refusing the credentials, or not answering in time.
#[instrument]
pub async fn connect() -> Result<Client, Error> {
    connect_with(kube::Config::infer().await.map_err(Error::Config)?).await
}

/// As [`connect`], with a given configuration.
///
/// # Errors
/// The API server unreachable, refusing the credentials, or not answering in time.
#[instrument(skip(config), fields(url = %config.cluster_url))]
pub async fn connect_with(config: kube::Config) -> Result<Client, Error> {
    let url = config.cluster_url.to_string();
    let client = Client::try_from(config).map_err(|source| Error::Client {
        url: url.clone(),
        source,
    })?;
    match tokio::time::timeout(CONNECT_TIMEOUT, client.apiserver_version()).await {
        Ok(Ok(v)) => {
            info!(%url, version = %v.git_version, "connected to the Kubernetes API server");
            Ok(client)
        }
        Ok(Err(source)) => Err(Error::Unreachable { url, source }),
        Err(_) => Err(Error::Timeout {
            url,
            timeout: CONNECT_TIMEOUT,
        }),
    }
}

/// The kinds the source watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Node,
    Namespace,
    Pod,
    Service,
    EndpointSlice,
    ServiceExport,
    ServiceImport,
    TrafficPolicy,
    StagedRollout,
    NetworkPolicy,
    MeshNetworkPolicy,
}

impl Kind {
    const ALL: [Kind; 11] = [
        Kind::Node,
        Kind::Namespace,
        Kind::Pod,
        Kind::Service,
        Kind::EndpointSlice,
        Kind::ServiceExport,
        Kind::ServiceImport,
        Kind::TrafficPolicy,
        Kind::StagedRollout,
        Kind::NetworkPolicy,
        Kind::MeshNetworkPolicy,
    ];

    /// The kinds served by CRDs (a cluster may not serve them), watched as [`Lenient`] objects so that one bad
    /// object cannot fail the decoding of a whole list: their JSON goes through the manifest rules, which refuse
    /// it with a reason. NetworkPolicy is built in, but is watched the same way: the manifest rules refuse unknown
    /// fields (the typed object drops them).
    fn custom(self) -> bool {
        match self {
            Kind::ServiceExport
            | Kind::ServiceImport
            | Kind::TrafficPolicy
            | Kind::StagedRollout
            | Kind::NetworkPolicy
            | Kind::MeshNetworkPolicy => true,
            Kind::Node | Kind::Namespace | Kind::Pod | Kind::Service | Kind::EndpointSlice => false,
        }
    }

    /// The fleetmesh kinds, whose status the clustermesh-apiserver writes.
    fn status_kind(self) -> Option<StatusKind> {
        match self {
            Kind::TrafficPolicy => Some(StatusKind::TrafficPolicy),
            Kind::StagedRollout => Some(StatusKind::StagedRollout),
            Kind::MeshNetworkPolicy => Some(StatusKind::MeshNetworkPolicy),
            Kind::Node
            | Kind::Namespace
            | Kind::Pod
            | Kind::Service
            | Kind::EndpointSlice
            | Kind::ServiceExport
            | Kind::ServiceImport
            | Kind::NetworkPolicy => None,
        }
    }
}

/// One object as the source holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    /// The last version that converted.
    good: Option<Object>,
    /// Why the current version does not convert.
    error: Option<String>,
    /// Generation and status of the current version (kept for the kinds whose status fleetmesh writes).
    meta: Option<Meta>,
}

/// What the status writer needs of an object besides its conversion.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Meta {
    /// `metadata.generation`.
    generation: Option<i64>,
    /// The `status` it carries (`None`: none, or not fleetmesh's shape).
    status: Option<ObjectStatus>,
}

impl Meta {
    fn of<K: Resource + Serialize>(o: &K) -> Self {
        let status = serde_json::to_value(o)
            .ok()
            .and_then(|mut v| v.get_mut("status").map(serde_json::Value::take))
            .and_then(|v| serde_json::from_value(v).ok());
        Self {
            generation: o.meta().generation,
            status,
        }
    }
}

#[derive(Debug, Default)]
struct KindStore {
    /// Listed completely at least once.
    synced: bool,
    /// By `namespace/name` (or `name`).
    objects: BTreeMap<String, Entry>,
    /// Objects of a relist in progress; replaces `objects` when the list is complete.
    relist: Option<BTreeMap<String, Entry>>,
    /// Why the watch does not work right now.
    failure: Option<String>,
}

impl KindStore {
    /// An entry for the new version of `key`: converted, or the previous good version with the error.
    fn entry(&self, key: &str, converted: Result<Object, String>, meta: Option<Meta>) -> Entry {
        match converted {
            Ok(o) => Entry {
                good: Some(o),
                error: None,
                meta,
            },
            Err(e) => Entry {
                good: self.objects.get(key).and_then(|p| p.good.clone()),
                error: Some(e),
                meta,
            },
        }
    }
}

/// The stores of every kind, and the signal that one changed.
#[derive(Debug, Default)]
struct Shared {
    stores: Mutex<BTreeMap<Kind, KindStore>>,
    changed: Notify,
}

/// An object converted (or `None`: skipped, when out of scope), with its [`Meta`] when its status is written.
type Converted = Option<(Result<Object, String>, Option<Meta>)>;

/// A watch event with its object converted.
enum Change {
    Apply(String, Converted),
    Delete(String),
    Init,
    InitApply(String, Converted),
    InitDone,
}

impl Shared {
    fn update(&self, kind: Kind, f: impl FnOnce(&mut KindStore) -> bool) {
        let changed = {
            let mut stores = self.stores.lock().unwrap_or_else(PoisonError::into_inner);
            f(stores.entry(kind).or_default())
        };
        if changed {
            self.changed.notify_one();
        }
    }

    fn apply(&self, kind: Kind, change: Change) {
        self.update(kind, |s| {
            let was_failing = s.failure.take().is_some();
            let changed = match change {
                Change::Apply(key, Some((converted, meta))) => {
                    log_conversion(kind, &key, &converted);
                    let e = s.entry(&key, converted, meta);
                    s.objects.insert(key, e.clone()) != Some(e)
                }
                Change::Apply(key, None) | Change::Delete(key) => s.objects.remove(&key).is_some(),
                Change::Init => {
                    s.relist = Some(BTreeMap::new());
                    false
                }
                Change::InitApply(key, converted) => {
                    if let Some((converted, meta)) = converted {
                        log_conversion(kind, &key, &converted);
                        let e = s.entry(&key, converted, meta);
                        s.relist.get_or_insert_default().insert(key, e);
                    }
                    false
                }
                Change::InitDone => {
                    let listed = s.relist.take().unwrap_or_default();
                    let changed = !s.synced || s.objects != listed;
                    debug!(?kind, objects = listed.len(), "listed");
                    s.objects = listed;
                    s.synced = true;
                    changed
                }
            };
            changed || was_failing
        });
    }

    fn failed(&self, kind: Kind, err: &watcher::Error) {
        let not_served = kind.custom() && is_not_found(err);
        let message = if not_served {
            format!(
                "watching {kind:?}s: {err} (is its CustomResourceDefinition installed?); taken as having no objects"
            )
        } else {
            format!("watching {kind:?}s: {err}")
        };
        self.update(kind, |s| {
            if s.failure.as_deref() == Some(message.as_str()) {
                return false;
            }
            if !s.synced {
                error!(?kind, error = %err, "cannot list; the source publishes once every kind is listed");
            } else {
                warn!(?kind, error = %err, "watch failed; retrying with backoff");
            }
            s.failure = Some(message);
            if not_served && !s.synced {
                // A kind the cluster does not serve has no objects; the watcher keeps retrying.
                s.synced = true;
                s.objects.clear();
            }
            s.synced
        });
    }

    /// The state and errors when every kind is listed.
    fn snapshot(&self) -> Option<(ClusterState, Vec<String>)> {
        let stores = self.stores.lock().unwrap_or_else(PoisonError::into_inner);
        if Kind::ALL.iter().any(|k| !stores.get(k).is_some_and(|s| s.synced)) {
            return None;
        }
        let mut state = ClusterState::default();
        let mut errors = Vec::new();
        for store in stores.values() {
            errors.extend(store.failure.clone());
            for entry in store.objects.values() {
                errors.extend(entry.error.clone());
                if let Some(o) = &entry.good {
                    insert(&mut state, o.clone());
                }
            }
        }
        Some((state, errors))
    }

    /// What the source concluded about each fleetmesh object, once their kinds are listed.
    fn verdicts(&self) -> Option<Verdicts> {
        let stores = self.stores.lock().unwrap_or_else(PoisonError::into_inner);
        let mut verdicts = Verdicts::new();
        for kind in Kind::ALL {
            let Some(status_kind) = kind.status_kind() else {
                continue;
            };
            let store = stores.get(&kind).filter(|s| s.synced)?;
            for (key, entry) in &store.objects {
                let Some((namespace, name)) = key.split_once('/') else {
                    continue;
                };
                verdicts.insert(
                    ObjectRef {
                        kind: status_kind,
                        namespace: namespace.to_owned(),
                        name: name.to_owned(),
                    },
                    Verdict {
                        generation: entry.meta.as_ref().and_then(|m| m.generation),
                        current: entry.meta.as_ref().and_then(|m| m.status.clone()),
                        error: entry.error.clone(),
                    },
                );
            }
        }
        Some(verdicts)
    }
}

fn is_not_found(err: &watcher::Error) -> bool {
    match err {
        watcher::Error::InitialListFailed(e) | watcher::Error::WatchStartFailed(e) => {
            matches!(e, kube::Error::Api(s) if s.code == 404)
        }
        _ => false,
    }
}

fn log_conversion(kind: Kind, key: &str, converted: &Result<Object, String>) {
    if let Err(e) = converted {
        error!(?kind, object = key, error = %e, "object refused; skipped (a previous good version stays in force)");
    }
}

fn insert(state: &mut ClusterState, o: Object) {
    match o {
        Object::Node(n) => {
            state.nodes.insert(n.name.clone(), n);
        }
        Object::Namespace(n) => {
            state.namespaces.insert(n.name.clone(), n);
        }
        Object::Pod(p) => {
            state.pods.insert((p.namespace.clone(), p.name.clone()), p);
        }
        Object::Service(s) => {
            state.services.insert((s.namespace.clone(), s.name.clone()), s);
        }
        Object::ServiceExport { namespace, name } => {
            state.exports.insert((namespace, name));
        }
        Object::ServiceImport { namespace, name, ip } => {
            if let Some(ip) = ip {
                state.import_ips.insert((namespace, name), ip);
            }
        }
        Object::TrafficPolicy(t) => {
            state
                .traffic_policies
                .insert((t.namespace.clone(), t.name.clone()), t);
        }
        Object::StagedRollout(r) => {
            state.rollouts.insert((r.namespace.clone(), r.name.clone()), r);
        }
        Object::NetworkPolicy(p) => state.insert_network_policy(p),
        Object::EndpointSlice(e) => {
            state
                .endpoint_slices
                .insert((e.namespace.clone(), e.name.clone()), e);
        }
    }
}

fn key_of<K: Resource>(o: &K) -> String {
    match o.meta().namespace.as_deref() {
        Some(ns) => format!("{ns}/{}", o.name_any()),
        None => o.name_any(),
    }
}

/// Runs the watcher of one kind until the source stops.
#[instrument(skip_all, fields(kind = ?kind))]
async fn watch_kind<K, F>(api: Api<K>, config: watcher::Config, kind: Kind, shared: Arc<Shared>, convert: F)
where
    K: Resource + Clone + DeserializeOwned + Serialize + Debug + Send + Sync + 'static,
    F: Fn(&K) -> Option<Result<Object, ManifestError>> + Send,
{
    let meta = |o: &K| kind.status_kind().map(|_| Meta::of(o));
    let conv = |o: &K| {
        let converted = convert(o).map(|r| (r.map_err(|e| e.to_string()), meta(o)));
        (key_of(o), converted)
    };
    let mut events = std::pin::pin!(watcher(api, config).default_backoff());
    while let Some(event) = events.next().await {
        match event {
            Ok(Event::Apply(o)) => {
                let (key, c) = conv(&o);
                shared.apply(kind, Change::Apply(key, c));
            }
            Ok(Event::Delete(o)) => shared.apply(kind, Change::Delete(key_of(&o))),
            Ok(Event::Init) => shared.apply(kind, Change::Init),
            Ok(Event::InitApply(o)) => {
                let (key, c) = conv(&o);
                shared.apply(kind, Change::InitApply(key, c));
            }
            Ok(Event::InitDone) => shared.apply(kind, Change::InitDone),
            Err(watcher::Error::WatchError(status)) if status.code == 410 => {
                // Expected: the watch fell behind; the watcher relists.
                debug!(?kind, "watch expired (410 Gone); relisting");
            }
            Err(e) => shared.failed(kind, &e),
        }
    }
}

fn watcher<K>(api: Api<K>, config: watcher::Config) -> impl futures::Stream<Item = watcher::Result<Event<K>>>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    watcher::watcher(api, config)
}

/// Converts an object of a [`Kind::custom`] kind with the manifest rules, from its JSON.
fn custom<K: Resource<DynamicType = ()>>(o: &Lenient<K>) -> Option<Result<Object, ManifestError>> {
    Some(manifests::from_value(ORIGIN, &o.raw))
}

/// The watcher configuration of every kind: list then watch (the default; not streaming lists).
fn config() -> watcher::Config {
    watcher::Config::default()
}

/// Watches the cluster's API server and publishes a [`Snapshot`] once every kind has been listed and after every
/// change (changes within a few milliseconds become one snapshot). Returns when every receiver is gone.
///
/// # Errors
/// A scope that cannot be expressed as a selector.
#[instrument(skip(client, tx))]
pub async fn watch_kubernetes(
    client: Client,
    scope: Scope,
    tx: watch::Sender<Snapshot>,
) -> Result<(), Error> {
    run(client, scope, tx, None).await
}

/// As [`watch_kubernetes`] for the whole cluster, and writes the status of every `TrafficPolicy`,
/// `StagedRollout` and `MeshNetworkPolicy` (see [`crate::status`]) and the summary of every `StagedRollout`'s
/// progress on the nodes, from the agents' `MeshNode`s (see [`crate::progress`]): the clustermesh-apiserver's
/// source, one status writer per cluster.
/// Errors writing a status are logged and retried; they never stop the source.
///
/// # Errors
/// None so far (the cluster scope has no selector to check); the signature matches [`watch_kubernetes`].
#[instrument(skip(client, tx))]
pub async fn watch_kubernetes_writing_status(
    client: Client,
    tx: watch::Sender<Snapshot>,
) -> Result<(), Error> {
    let (verdicts_tx, verdicts_rx) = watch::channel(Verdicts::new());
    let (nodes_tx, nodes_rx) = watch::channel(None);
    let writer = StatusWriter::new(client.clone()).run(verdicts_rx);
    let summaries = RolloutSummaries::new(client.clone()).run(nodes_rx);
    let feeds = StatusFeeds {
        verdicts: verdicts_tx,
        nodes: nodes_tx,
    };
    tokio::select! {
        r = run(client, Scope::Cluster, tx, Some(feeds)) => r,
        () = writer => Ok(()),
        () = summaries => Ok(()),
    }
}

/// What the status writers of the clustermesh-apiserver learn from the source: the verdicts on fleetmesh objects
/// ([`StatusWriter`]), and the names of the cluster's nodes ([`RolloutSummaries`], `None` until listed).
struct StatusFeeds {
    verdicts: watch::Sender<Verdicts>,
    nodes: watch::Sender<Option<BTreeSet<String>>>,
}

#[instrument(skip(client, tx, feeds))]
async fn run(
    client: Client,
    scope: Scope,
    tx: watch::Sender<Snapshot>,
    feeds: Option<StatusFeeds>,
) -> Result<(), Error> {
    let pod_selector = scope.pod_field_selector()?;
    let shared = Arc::new(Shared::default());
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(watch_kind(
        Api::<core::Node>::all(client.clone()),
        config(),
        Kind::Node,
        shared.clone(),
        |n| Some(manifests::from_node(ORIGIN, n).map(Object::Node)),
    ));
    tasks.spawn(watch_kind(
        Api::<core::Namespace>::all(client.clone()),
        config(),
        Kind::Namespace,
        shared.clone(),
        |n| Some(manifests::from_namespace(ORIGIN, n).map(Object::Namespace)),
    ));
    let pod_config = match &pod_selector {
        Some(s) => config().fields(s),
        None => config(),
    };
    let pod_scope = scope.clone();
    tasks.spawn(watch_kind(
        Api::<core::Pod>::all(client.clone()),
        pod_config,
        Kind::Pod,
        shared.clone(),
        move |p| {
            pod_scope
                .wants_pod(p)
                .then(|| manifests::from_pod(ORIGIN, p).map(Object::Pod))
        },
    ));
    tasks.spawn(watch_kind(
        Api::<core::Service>::all(client.clone()),
        config(),
        Kind::Service,
        shared.clone(),
        |s| Some(manifests::from_service(ORIGIN, s).map(Object::Service)),
    ));
    // Every slice of the cluster, also for a node's agent: a service's backends live on every node.
    tasks.spawn(watch_kind(
        Api::<discovery::EndpointSlice>::all(client.clone()),
        config(),
        Kind::EndpointSlice,
        shared.clone(),
        |s| Some(manifests::from_endpoint_slice(ORIGIN, s).map(Object::EndpointSlice)),
    ));
    tasks.spawn(watch_kind(
        Api::<Lenient<crd::ServiceExport>>::all(client.clone()),
        config(),
        Kind::ServiceExport,
        shared.clone(),
        custom,
    ));
    // The ClusterSetIPs the clustermesh-apiserver wrote (`spec.ips` of its ServiceImports).
    tasks.spawn(watch_kind(
        Api::<Lenient<crd::ServiceImport>>::all(client.clone()),
        config(),
        Kind::ServiceImport,
        shared.clone(),
        custom,
    ));
    tasks.spawn(watch_kind(
        Api::<Lenient<crd::TrafficPolicy>>::all(client.clone()),
        config(),
        Kind::TrafficPolicy,
        shared.clone(),
        custom,
    ));
    tasks.spawn(watch_kind(
        Api::<Lenient<crd::StagedRollout>>::all(client.clone()),
        config(),
        Kind::StagedRollout,
        shared.clone(),
        custom,
    ));
    tasks.spawn(watch_kind(
        Api::<Lenient<networking::NetworkPolicy>>::all(client.clone()),
        config(),
        Kind::NetworkPolicy,
        shared.clone(),
        custom,
    ));
    tasks.spawn(watch_kind(
        Api::<Lenient<crd::MeshNetworkPolicy>>::all(client.clone()),
        config(),
        Kind::MeshNetworkPolicy,
        shared.clone(),
        custom,
    ));
    publish(&shared, &tx, feeds.as_ref()).await;
    tasks.abort_all();
    Ok(())
}

/// Publishes snapshots until every receiver is gone.
#[instrument(skip_all)]
async fn publish(shared: &Shared, tx: &watch::Sender<Snapshot>, feeds: Option<&StatusFeeds>) {
    let mut generation = tx.borrow().generation;
    let mut last: Option<(ClusterState, Vec<String>)> = None;
    loop {
        tokio::select! {
            () = tx.closed() => return,
            () = shared.changed.notified() => {}
        }
        // Let a burst of events land before publishing.
        tokio::time::sleep(COALESCE).await;
        let Some(current) = shared.snapshot() else {
            continue;
        };
        if let Some(feeds) = feeds {
            if let Some(new) = shared.verdicts() {
                // Also when the snapshot stays the same: a bad object's new generation is news to its status.
                feeds.verdicts.send_if_modified(|v| {
                    let changed = *v != new;
                    *v = new;
                    changed
                });
            }
            let names: BTreeSet<String> = current.0.nodes.keys().cloned().collect();
            feeds.nodes.send_if_modified(|n| {
                let changed = n.as_ref() != Some(&names);
                *n = Some(names);
                changed
            });
        }
        if last.as_ref() == Some(&current) {
            continue;
        }
        generation += 1;
        let (state, errors) = current.clone();
        debug!(
            generation,
            nodes = state.nodes.len(),
            pods = state.pods.len(),
            services = state.services.len(),
            errors = errors.len(),
            "publishing"
        );
        tx.send_replace(Snapshot {
            generation,
            state: Arc::new(state),
            errors,
        });
        last = Some(current);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_selector_per_scope() {
        assert_eq!(Scope::Cluster.pod_field_selector().expect("cluster"), None);
        assert_eq!(
            Scope::Node("east-node-1".into())
                .pod_field_selector()
                .expect("node"),
            Some("spec.nodeName=east-node-1".to_owned())
        );
        for bad in ["", "a,spec.nodeName=b", "a=b", "Node1", "-a", "a b"] {
            assert!(
                matches!(Scope::Node(bad.into()).pod_field_selector(), Err(Error::InvalidNodeName(n)) if n == bad),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn node_scope_keeps_only_its_pods() {
        let pod = |node: Option<&str>| core::Pod {
            spec: Some(core::PodSpec {
                node_name: node.map(str::to_owned),
                ..Default::default()
            }),
            ..Default::default()
        };
        let scope = Scope::Node("n1".into());
        assert!(scope.wants_pod(&pod(Some("n1"))));
        assert!(!scope.wants_pod(&pod(Some("n2"))));
        assert!(!scope.wants_pod(&pod(None)));
        assert!(Scope::Cluster.wants_pod(&pod(None)));
    }

    fn node(name: &str, ip: &str) -> Object {
        Object::Node(mesh_model::Node {
            name: name.into(),
            underlay_ipv4: ip.parse().expect("ip"),
            pod_cidr: "10.1.0.0/24".parse().expect("cidr"),
            wireguard: None,
        })
    }

    /// Publishes nothing before every kind is listed; a bad update keeps the good version and reports; a relist
    /// replaces the objects.
    #[test]
    fn store_semantics() {
        let shared = Shared::default();
        for kind in Kind::ALL.into_iter().filter(|k| *k != Kind::Node) {
            shared.apply(kind, Change::Init);
            shared.apply(kind, Change::InitDone);
        }
        assert!(shared.snapshot().is_none(), "nodes not listed yet");
        shared.apply(Kind::Node, Change::Init);
        shared.apply(
            Kind::Node,
            Change::InitApply("n1".into(), Some((Ok(node("n1", "172.30.1.1")), None))),
        );
        assert!(shared.snapshot().is_none(), "list not complete");
        shared.apply(Kind::Node, Change::InitDone);
        let (state, errors) = shared.snapshot().expect("all listed");
        assert_eq!(state.nodes.len(), 1);
        assert!(errors.is_empty());

        shared.apply(
            Kind::Node,
            Change::Apply("n1".into(), Some((Err("bad podCIDR".into()), None))),
        );
        shared.apply(
            Kind::Node,
            Change::Apply("n2".into(), Some((Err("bad InternalIP".into()), None))),
        );
        let (state, errors) = shared.snapshot().expect("listed");
        assert_eq!(
            state.nodes.keys().collect::<Vec<_>>(),
            ["n1"],
            "previous good n1 stays, n2 skipped"
        );
        assert_eq!(errors, ["bad podCIDR", "bad InternalIP"]);

        shared.apply(Kind::Node, Change::Init);
        shared.apply(
            Kind::Node,
            Change::InitApply("n3".into(), Some((Ok(node("n3", "172.30.1.3")), None))),
        );
        assert_eq!(
            shared.snapshot().expect("listed").0.nodes.len(),
            1,
            "old objects until the relist completes"
        );
        shared.apply(Kind::Node, Change::InitDone);
        let (state, errors) = shared.snapshot().expect("listed");
        assert_eq!(state.nodes.keys().collect::<Vec<_>>(), ["n3"]);
        assert!(errors.is_empty(), "{errors:?}");
        shared.apply(Kind::Node, Change::Delete("n3".into()));
        assert!(shared.snapshot().expect("listed").0.nodes.is_empty());
    }

    /// A burst of changes becomes one snapshot; nothing is published before every kind is listed.
    #[tokio::test(flavor = "current_thread")]
    async fn bursts_coalesce_into_one_snapshot() {
        tokio::time::pause();
        let shared = Arc::new(Shared::default());
        let (tx, mut rx) = watch::channel(Snapshot::default());
        let publisher = {
            let shared = shared.clone();
            tokio::spawn(async move { publish(&shared, &tx, None).await })
        };
        for kind in Kind::ALL {
            shared.apply(kind, Change::Init);
            shared.apply(kind, Change::InitDone);
        }
        for i in 0..50 {
            let name = format!("n{i}");
            shared.apply(
                Kind::Node,
                Change::Apply(name.clone(), Some((Ok(node(&name, "172.30.1.1")), None))),
            );
        }
        let s = rx
            .wait_for(|s| s.generation >= 1)
            .await
            .expect("published")
            .clone();
        assert_eq!(
            (s.generation, s.state.nodes.len()),
            (1, 50),
            "lists and burst in one snapshot"
        );
        for i in 0..50 {
            shared.apply(Kind::Node, Change::Delete(format!("n{i}")));
        }
        let s = rx
            .wait_for(|s| s.generation >= 2)
            .await
            .expect("published")
            .clone();
        assert_eq!(
            (s.generation, s.state.nodes.len()),
            (2, 0),
            "50 deletes in one snapshot"
        );
        // The same object again changes nothing and publishes nothing (the clock is paused: waiting is instant).
        shared.apply(
            Kind::Node,
            Change::Apply("x".into(), Some((Ok(node("x", "172.30.1.9")), None))),
        );
        rx.wait_for(|s| s.generation >= 3).await.expect("published");
        shared.apply(
            Kind::Node,
            Change::Apply("x".into(), Some((Ok(node("x", "172.30.1.9")), None))),
        );
        let quiet = tokio::time::timeout(Duration::from_secs(1), rx.changed()).await;
        assert!(quiet.is_err(), "no snapshot for a no-op: {:?}", *rx.borrow());
        publisher.abort();
    }

    #[test]
    fn custom_objects_get_their_type() {
        // A list item, without apiVersion and kind.
        let mut item = serde_json::json!({
            "metadata": {"name": "api", "namespace": "shop"},
            "spec": {"service": "api", "weights": [{"clusters": {"names": ["west"]}, "weight": 0}]},
        });
        let o: Lenient<crd::TrafficPolicy> = serde_json::from_value(item.clone()).expect("lenient");
        let e = custom(&o).expect("converted").expect_err("weights sum to 0");
        let text = e.to_string();
        assert!(
            text.starts_with("kubernetes, TrafficPolicy shop/api, field spec.weights"),
            "{text}"
        );
        item["spec"]["weights"][0]["weight"] = 5.into();
        let o: Lenient<crd::TrafficPolicy> = serde_json::from_value(item).expect("lenient");
        let ok = custom(&o).expect("converted").expect("valid");
        assert!(matches!(ok, Object::TrafficPolicy(t) if t.spec.weights[0].weight == 5));
    }
}
