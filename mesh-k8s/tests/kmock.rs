//! The Kubernetes source against a Kubernetes API emulator over real HTTP: kmock's `KubernetesEmulator`
//! (`pip install kmock`; `cargo xtask setup` installs it), driven by `tests/fixtures/kube_emulator.py`.
//!
//! kmock's limits shape these tests: it assigns no resourceVersion (the fixture does), it ignores label and
//! field selectors (so the node scope is checked by what the client asked for and by what it keeps), and it
//! sends a 410 Gone only when told to (the fixture's `gone`). It keeps no `metadata.generation` (the fixture does)
//! and serves `PATCH .../NAME/status` as a merge patch of the whole object, without subresource semantics (so the
//! tests check that the status writer's patches hold nothing but `status`).

use std::time::Duration;

use mesh_k8s::{Scope, watch_kubernetes};
use mesh_model::source::Snapshot;
use mesh_testkit::KubeEmulator;
use serde_json::{Value, json};
use tokio::sync::watch;

/// How long a change may take to show up in a snapshot.
const DEADLINE: Duration = Duration::from_secs(20);

/// The emulator (`mesh_testkit::KubeEmulator`) with this test's helpers.
struct Emulator(KubeEmulator);

impl Emulator {
    fn start() -> Self {
        Self::start_with(&[])
    }

    /// With the fixture's arguments (e.g. `--without RESOURCE`).
    fn start_with(args: &[&str]) -> Self {
        Self(KubeEmulator::start(args))
    }

    fn client(&self) -> kube::Client {
        let url = format!("http://127.0.0.1:{}", self.0.port).parse().expect("url");
        kube::Client::try_from(kube::Config::new(url)).expect("client")
    }

    fn command(&mut self, cmd: &Value) -> Value {
        self.0.command(cmd)
    }

    fn create(&mut self, object: &Value) {
        let path = collection_path(object);
        self.command(&json!({"op": "create", "path": path, "object": object}));
    }

    fn patch(&mut self, object: &Value, changes: &Value) {
        let path = object_path(object);
        self.command(&json!({"op": "patch", "path": path, "object": changes}));
    }

    fn delete(&mut self, object: &Value) {
        let path = object_path(object);
        self.command(&json!({"op": "delete", "path": path}));
    }

    /// Deletes an object without a watch event (only a relist can notice).
    fn silent_delete(&mut self, resource: &str, namespace: Option<&str>, name: &str) {
        self.command(
            &json!({"op": "silent_delete", "resource": resource, "namespace": namespace, "name": name}),
        );
    }

    /// Every open watch of `resource` gets a 410 Gone.
    fn gone(&mut self, resource: &str) {
        self.command(&json!({"op": "gone", "resource": resource}));
    }

    fn requests(&mut self) -> Vec<Value> {
        let answer = self.command(&json!({"op": "requests"}));
        answer["requests"].as_array().cloned().unwrap_or_default()
    }
}

/// `/api/v1/...` or `/apis/group/version/...` of an object's resource, up to the resource name.
fn collection_path(o: &Value) -> String {
    let api_version = o["apiVersion"].as_str().expect("apiVersion");
    let base = if api_version.contains('/') {
        format!("/apis/{api_version}")
    } else {
        format!("/api/{api_version}")
    };
    let plural = match o["kind"].as_str().expect("kind") {
        "Node" => "nodes",
        "Namespace" => "namespaces",
        "Pod" => "pods",
        "Service" => "services",
        "EndpointSlice" => "endpointslices",
        "ServiceExport" => "serviceexports",
        "ServiceImport" => "serviceimports",
        "TrafficPolicy" => "trafficpolicies",
        "StagedRollout" => "stagedrollouts",
        "NetworkPolicy" => "networkpolicies",
        "MeshNetworkPolicy" => "meshnetworkpolicies",
        "MeshNode" => "meshnodes",
        other => panic!("no plural for {other}"),
    };
    match o["metadata"]["namespace"].as_str() {
        Some(ns) => format!("{base}/namespaces/{ns}/{plural}"),
        None => format!("{base}/{plural}"),
    }
}

fn object_path(o: &Value) -> String {
    format!(
        "{}/{}",
        collection_path(o),
        o["metadata"]["name"].as_str().expect("name")
    )
}

fn node(name: &str, ip: &str, cidr: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
           "spec": {"podCIDR": cidr}, "status": {"addresses": [{"type": "InternalIP", "address": ip}]}})
}

fn namespace(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": {"team": "a"}}})
}

fn pod(name: &str, node: &str, ip: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": "shop", "labels": {"app": "api"}},
           "spec": {"nodeName": node, "containers": [{"name": "c", "ports": [{"containerPort": 8080}]}]},
           "status": {"podIP": ip}})
}

fn service(name: &str, cluster_ip: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": name, "namespace": "shop", "annotations": {"service.cilium.io/global": "true"}},
           "spec": {"clusterIP": cluster_ip, "selector": {"app": "api"}, "ports": [{"port": 80, "targetPort": 8080}]}})
}

/// An EndpointSlice of service `shop/api` (port 8080, unnamed like the service's), one endpoint per
/// `(address, ready, pod)`.
fn endpoint_slice(name: &str, endpoints: &[(&str, bool, Option<&str>)]) -> Value {
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": name, "namespace": "shop", "labels": {"kubernetes.io/service-name": "api"}},
           "addressType": "IPv4",
           "ports": [{"port": 8080, "protocol": "TCP"}],
           "endpoints": slice_endpoints(endpoints)})
}

fn slice_endpoints(endpoints: &[(&str, bool, Option<&str>)]) -> Value {
    endpoints
        .iter()
        .map(|(ip, ready, pod)| {
            let mut e = json!({"addresses": [ip], "conditions": {"ready": ready, "serving": ready, "terminating": false},
                               "nodeName": "n1"});
            if let Some(pod) = pod {
                e["targetRef"] = json!({"kind": "Pod", "namespace": "shop", "name": pod});
            }
            e
        })
        .collect()
}

fn export(name: &str) -> Value {
    json!({"apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceExport",
           "metadata": {"name": name, "namespace": "shop"}})
}

fn policy(name: &str, canary: u32, rest: u32) -> Value {
    json!({"apiVersion": "fleetmesh.io/v1alpha1", "kind": "TrafficPolicy",
           "metadata": {"name": name, "namespace": "shop"},
           "spec": {"service": "api", "weights": [
               {"clusters": {"matchLabels": {"stage": "canary"}}, "weight": canary},
               {"clusters": {"names": ["west"]}, "weight": rest}]}})
}

fn rollout(name: &str) -> Value {
    json!({"apiVersion": "fleetmesh.io/v1alpha1", "kind": "StagedRollout",
           "metadata": {"name": name, "namespace": "shop"},
           "spec": {"service": "api", "from": {"matchLabels": {"stage": "prod"}}, "to": {"matchLabels": {"track": "v2"}},
                    "steps": [10, 50, 100], "holdSeconds": 30, "gate": {"maxFailureRatio": 0.02}}})
}

fn network_policy(name: &str, port: i64) -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
           "metadata": {"name": name, "namespace": "shop"},
           "spec": {"podSelector": {"matchLabels": {"app": "api"}},
                    "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}], "ports": [{"port": port}]}]}})
}

fn mesh_network_policy(name: &str, cluster: &str) -> Value {
    json!({"apiVersion": "fleetmesh.io/v1alpha1", "kind": "MeshNetworkPolicy",
           "metadata": {"name": name, "namespace": "shop"},
           "spec": {"podSelector": {},
                    "egress": [{"to": [{"podSelector": {}, "clusters": {"names": [cluster]}}]}]}})
}

fn key(name: &str) -> (String, String) {
    ("shop".to_owned(), name.to_owned())
}

/// A fleet of objects of every kind.
fn seed(em: &mut Emulator) {
    em.create(&namespace("shop"));
    em.create(&node("n1", "172.30.1.1", "10.1.1.0/24"));
    em.create(&node("n2", "172.30.1.2", "10.1.2.0/24"));
    em.create(&pod("p1", "n1", "10.1.1.5"));
    em.create(&pod("p2", "n2", "10.1.2.5"));
    em.create(&service("api", "10.96.0.10"));
    em.create(&export("api"));
    em.create(&policy("api", 10, 90));
    em.create(&rollout("api-v2"));
}

/// The source running against the emulator.
struct Source {
    rx: watch::Receiver<Snapshot>,
    task: tokio::task::JoinHandle<Result<(), mesh_k8s::Error>>,
}

impl Source {
    fn start(em: &Emulator, scope: Scope) -> Self {
        let (tx, rx) = watch::channel(Snapshot::default());
        let task = tokio::spawn(watch_kubernetes(em.client(), scope, tx));
        Self { rx, task }
    }

    /// The first snapshot that satisfies `pred`, within the deadline.
    async fn until(&mut self, what: &str, pred: impl FnMut(&Snapshot) -> bool) -> Snapshot {
        let seen = match tokio::time::timeout(DEADLINE, self.rx.wait_for(pred)).await {
            Ok(Ok(s)) => Some(s.clone()),
            Ok(Err(_)) => panic!("{what}: the source stopped"),
            Err(_) => None,
        };
        seen.unwrap_or_else(|| {
            panic!(
                "{what}: not seen within {DEADLINE:?}; last snapshot: {:#?}",
                *self.rx.borrow()
            )
        })
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_list_then_add_update_delete() {
    init_tracing();
    let mut em = Emulator::start();
    seed(&mut em);
    let mut src = Source::start(&em, Scope::Cluster);

    let s = src.until("initial lists", |s| s.generation >= 1).await;
    assert_eq!(s.generation, 1, "one snapshot for the complete initial lists");
    assert!(s.errors.is_empty(), "{:?}", s.errors);
    let st = &s.state;
    assert_eq!(st.namespaces["shop"].labels["team"], "a");
    assert_eq!(st.nodes.keys().collect::<Vec<_>>(), ["n1", "n2"]);
    assert_eq!(st.nodes["n2"].underlay_ipv4.to_string(), "172.30.1.2");
    assert_eq!(st.nodes["n2"].pod_cidr.to_string(), "10.1.2.0/24");
    assert_eq!(st.pods.len(), 2);
    assert_eq!(st.pods[&key("p1")].node_name.as_deref(), Some("n1"));
    assert_eq!(
        st.pods[&key("p1")].ipv4.map(|i| i.to_string()).as_deref(),
        Some("10.1.1.5")
    );
    assert_eq!(st.pods[&key("p1")].ports[0].port, 8080);
    let api = &st.services[&key("api")];
    assert_eq!(
        api.cluster_ipv4.map(|i| i.to_string()).as_deref(),
        Some("10.96.0.10")
    );
    assert_eq!(api.ports[0].target_port.as_deref(), Some("8080"));
    assert!(st.exports.contains(&key("api")));
    assert_eq!(st.traffic_policies[&key("api")].spec.weights[1].weight, 90);
    assert_eq!(st.rollouts[&key("api-v2")].spec.steps, [10, 50, 100]);

    // Add.
    em.create(&pod("p3", "n1", "10.1.1.6"));
    let s = src
        .until("pod p3 added", |s| s.state.pods.contains_key(&key("p3")))
        .await;
    assert!(s.generation > 1);
    let generation = s.generation;

    // Update: a pod's IP, a service's port, a policy's weights.
    em.patch(&pod("p3", "n1", ""), &json!({"status": {"podIP": "10.1.1.7"}}));
    em.patch(
        &service("api", ""),
        &json!({"spec": {"ports": [{"port": 81, "targetPort": 8080}]}}),
    );
    em.patch(
        &policy("api", 0, 0),
        &json!({"spec": {"service": "api", "weights": [
        {"clusters": {"names": ["east"]}, "weight": 1}]}}),
    );
    let s = src
        .until("updates applied", |s| {
            s.state
                .pods
                .get(&key("p3"))
                .and_then(|p| p.ipv4)
                .map(|i| i.to_string())
                .as_deref()
                == Some("10.1.1.7")
                && s.state
                    .services
                    .get(&key("api"))
                    .is_some_and(|a| a.ports[0].port == 81)
                && s.state
                    .traffic_policies
                    .get(&key("api"))
                    .is_some_and(|t| t.spec.weights.len() == 1)
        })
        .await;
    assert!(s.generation > generation);
    assert!(s.errors.is_empty(), "{:?}", s.errors);

    // Delete.
    em.delete(&node("n2", "", ""));
    em.delete(&export("api"));
    em.delete(&rollout("api-v2"));
    let s = src
        .until("deletes applied", |s| {
            !s.state.nodes.contains_key("n2") && s.state.exports.is_empty() && s.state.rollouts.is_empty()
        })
        .await;
    assert_eq!(s.state.nodes.keys().collect::<Vec<_>>(), ["n1"]);
    assert_eq!(s.state.pods.len(), 3, "pods are not touched by other deletes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relist_after_410_gone_ends_consistent() {
    init_tracing();
    let mut em = Emulator::start();
    seed(&mut em);
    let mut src = Source::start(&em, Scope::Cluster);
    src.until("initial lists", |s| s.state.pods.len() == 2).await;

    // A change the watch does not see, then one it sees: only the second shows.
    em.silent_delete("v1/pods", Some("shop"), "p1");
    em.create(&pod("p9", "n1", "10.1.1.9"));
    let s = src
        .until("p9 via the watch", |s| s.state.pods.contains_key(&key("p9")))
        .await;
    assert!(
        s.state.pods.contains_key(&key("p1")),
        "the silent delete must not be visible before the relist, or this test proves nothing"
    );

    // 410 Gone: the watcher relists and the snapshot matches the server again.
    em.gone("v1/pods");
    let s = src
        .until("relist after 410", |s| !s.state.pods.contains_key(&key("p1")))
        .await;
    assert_eq!(
        s.state.pods.keys().map(|(_, n)| n.as_str()).collect::<Vec<_>>(),
        ["p2", "p9"]
    );
    assert!(
        s.errors.is_empty(),
        "a 410 is routine, not an error: {:?}",
        s.errors
    );

    // The watch goes on after the relist.
    em.create(&pod("p10", "n2", "10.1.2.10"));
    em.gone("v1/nodes");
    em.create(&node("n3", "172.30.1.3", "10.1.3.0/24"));
    let s = src
        .until("changes after the relist", |s| {
            s.state.pods.contains_key(&key("p10")) && s.state.nodes.contains_key("n3")
        })
        .await;
    assert_eq!(s.state.nodes.len(), 3);
    let relists = em
        .requests()
        .iter()
        .filter(|r| r["method"] == "GET" && r["path"] == "/api/v1/pods" && r["params"].get("watch").is_none())
        .count();
    assert!(
        relists >= 2,
        "the pods were listed again after the 410 ({relists} lists)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_objects_are_skipped_and_reported() {
    init_tracing();
    let mut em = Emulator::start();
    seed(&mut em);
    em.create(&service("bad", "1.2.3"));
    em.create(&policy("zero", 0, 0));
    let mut src = Source::start(&em, Scope::Cluster);

    let s = src.until("initial lists", |s| s.generation >= 1).await;
    assert!(!s.state.services.contains_key(&key("bad")), "bad service skipped");
    assert!(
        !s.state.traffic_policies.contains_key(&key("zero")),
        "bad policy skipped"
    );
    assert!(s.state.services.contains_key(&key("api")), "others still apply");
    assert!(s.state.traffic_policies.contains_key(&key("api")));
    assert_eq!(s.state.pods.len(), 2);
    assert_eq!(s.errors.len(), 2, "{:?}", s.errors);
    assert!(
        s.errors
            .iter()
            .any(|e| e.contains("Service shop/bad") && e.contains("spec.clusterIP")),
        "{:?}",
        s.errors
    );
    assert!(
        s.errors
            .iter()
            .any(|e| e.contains("TrafficPolicy shop/zero") && e.contains("spec.weights")),
        "{:?}",
        s.errors
    );

    // A good object turned bad keeps its previous version, reported; a bad one fixed applies, unreported.
    em.patch(
        &policy("api", 0, 0),
        &json!({"spec": {"weights": [{"clusters": {"names": ["West"]}, "weight": 1}]}}),
    );
    em.patch(&service("bad", ""), &json!({"spec": {"clusterIP": "10.96.0.11"}}));
    let s = src
        .until("bad update reported, fix applied", |s| {
            s.state.services.contains_key(&key("bad"))
                && s.errors.iter().any(|e| e.contains("TrafficPolicy shop/api"))
        })
        .await;
    assert_eq!(
        s.state.traffic_policies[&key("api")].spec.weights[1].weight,
        90,
        "the previous version of the policy stays in force"
    );
    assert_eq!(s.errors.len(), 2, "{:?}", s.errors);
    assert!(s.errors.iter().any(|e| e.contains("names[0]")), "{:?}", s.errors);
    assert!(
        !s.errors.iter().any(|e| e.contains("Service shop/bad")),
        "{:?}",
        s.errors
    );
}

/// Custom objects are watched typed (`Lenient<K>`): one that does not even have the CRD type's shape is refused
/// with its reason, and neither fails the list nor the watch of the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_objects_of_the_wrong_shape_are_refused_one_by_one() {
    init_tracing();
    let mut em = Emulator::start();
    seed(&mut em);
    let mut odd = policy("odd", 1, 1);
    odd["spec"]["service"] = json!(7);
    em.create(&odd);
    let mut src = Source::start(&em, Scope::Cluster);

    let s = src.until("initial lists", |s| s.generation >= 1).await;
    assert!(
        s.state.traffic_policies.contains_key(&key("api")),
        "the others are listed"
    );
    assert!(!s.state.traffic_policies.contains_key(&key("odd")));
    assert!(
        s.errors
            .iter()
            .any(|e| e.contains("TrafficPolicy shop/odd") && e.contains("spec.service")),
        "{:?}",
        s.errors
    );

    // A watch event of the wrong shape: refused, the previous version stays, the watch goes on.
    em.patch(&policy("api", 0, 0), &json!({"spec": {"weights": "all"}}));
    em.create(&policy("later", 5, 5));
    let s = src
        .until("bad event refused, later event applied", |s| {
            s.state.traffic_policies.contains_key(&key("later"))
                && s.errors.iter().any(|e| e.contains("TrafficPolicy shop/api"))
        })
        .await;
    assert_eq!(
        s.state.traffic_policies[&key("api")].spec.weights[1].weight,
        90,
        "the previous version of the policy stays in force"
    );
    assert!(
        s.errors
            .iter()
            .any(|e| e.contains("TrafficPolicy shop/api") && e.contains("spec.weights")),
        "{:?}",
        s.errors
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_scope_asks_for_and_keeps_its_pods() {
    init_tracing();
    let mut em = Emulator::start();
    seed(&mut em);
    em.create(&endpoint_slice("api-a", &[("10.1.2.5", true, Some("p2"))]));
    let mut src = Source::start(&em, Scope::Node("n1".into()));
    let s = src.until("initial lists", |s| s.generation >= 1).await;
    assert_eq!(
        s.state.pods.keys().map(|(_, n)| n.as_str()).collect::<Vec<_>>(),
        ["p1"],
        "only n1's pods"
    );
    assert_eq!(s.state.nodes.len(), 2, "every node");
    assert_eq!(
        api_backends(&s),
        ["10.1.2.5:8080"],
        "every EndpointSlice: a backend on another node too"
    );
    em.create(&pod("p3", "n2", "10.1.2.6"));
    em.create(&pod("p4", "n1", "10.1.1.8"));
    let s = src.until("p4", |s| s.state.pods.contains_key(&key("p4"))).await;
    assert!(!s.state.pods.contains_key(&key("p3")), "a pod of n2 is not n1's");
    // Moving a pod away from the node removes it.
    em.patch(&pod("p4", "", ""), &json!({"spec": {"nodeName": "n2"}}));
    src.until("p4 moved away", |s| !s.state.pods.contains_key(&key("p4")))
        .await;

    let pod_requests: Vec<Value> = em
        .requests()
        .into_iter()
        .filter(|r| r["path"] == "/api/v1/pods")
        .collect();
    assert!(!pod_requests.is_empty());
    for r in &pod_requests {
        assert_eq!(r["params"]["fieldSelector"], "spec.nodeName=n1", "{r}");
    }
    let node_requests = em
        .requests()
        .into_iter()
        .filter(|r| r["path"] == "/api/v1/nodes")
        .count();
    assert!(node_requests > 0);
    let slice_requests: Vec<Value> = em
        .requests()
        .into_iter()
        .filter(|r| r["path"] == "/apis/discovery.k8s.io/v1/endpointslices")
        .collect();
    assert!(!slice_requests.is_empty());
    for r in &slice_requests {
        assert!(r["params"].get("fieldSelector").is_none(), "{r}");
    }
}

#[tokio::test]
async fn unreachable_api_server_is_a_clear_error() {
    // A port nothing listens on: bind, note the port, close.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("ephemeral port")
        .port();
    let url = format!("http://127.0.0.1:{port}/");
    let config = kube::Config::new(url.parse().expect("url"));
    let Err(err) = mesh_k8s::connect_with(config).await else {
        panic!("connected to a port nothing listens on");
    };
    let text = err.to_string();
    assert!(matches!(err, mesh_k8s::Error::Unreachable { .. }), "{text}");
    assert!(
        text.contains(&format!("127.0.0.1:{port}")),
        "names the server: {text}"
    );
}

#[tokio::test]
async fn connect_reads_the_server_version() {
    let em = Emulator::start();
    let url = format!("http://127.0.0.1:{}", em.0.port);
    let client = mesh_k8s::connect_with(kube::Config::new(url.parse().expect("url")))
        .await
        .expect("the emulator answers /version");
    let version = client.apiserver_version().await.expect("version");
    assert!(!version.git_version.is_empty());
}

/// Without the MCS CRD the cluster serves no ServiceExports: the source still publishes, says so, and applies the
/// rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kind_not_served_is_reported_and_taken_as_empty() {
    init_tracing();
    let mut em = Emulator::start_with(&["--without", "multicluster.x-k8s.io/v1alpha1/serviceexports"]);
    em.create(&namespace("shop"));
    em.create(&node("n1", "172.30.1.1", "10.1.1.0/24"));
    em.create(&service("api", "10.96.0.10"));
    let mut src = Source::start(&em, Scope::Cluster);
    let s = src.until("initial lists", |s| s.generation >= 1).await;
    assert!(s.state.exports.is_empty());
    assert_eq!(s.state.services.len(), 1, "the rest applies");
    assert_eq!(s.errors.len(), 1, "{:?}", s.errors);
    assert!(
        s.errors[0].contains("ServiceExport") && s.errors[0].contains("CustomResourceDefinition installed"),
        "{:?}",
        s.errors
    );
    em.create(&node("n2", "172.30.1.2", "10.1.2.0/24"));
    let s = src.until("changes go on", |s| s.state.nodes.len() == 2).await;
    assert_eq!(s.errors.len(), 1, "reported once: {:?}", s.errors);
}

/// The status the clustermesh-apiserver wrote on a fleetmesh object, once `pred` holds, within the deadline
/// (polled through the emulator's HTTP API).
async fn status_until(em: &mut Emulator, object: &Value, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let path = object_path(object);
    let start = std::time::Instant::now();
    let mut interval = tokio::time::interval(Duration::from_millis(50));
    loop {
        interval.tick().await;
        let status = em.command(&json!({"op": "get", "path": path}))["object"]["status"].clone();
        if pred(&status) {
            return status;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "{what}: not seen within {DEADLINE:?}; status of {path}: {status}"
        );
    }
}

/// How many status patches the clients sent for an object (each a merge patch of `status` only).
fn status_patches(em: &mut Emulator, object: &Value) -> usize {
    let path = format!("{}/status", object_path(object));
    let patches: Vec<Value> = em
        .requests()
        .into_iter()
        .filter(|r| r["method"] == "PATCH" && r["path"] == path.as_str())
        .collect();
    for p in &patches {
        let keys: Vec<&String> = p["body"]
            .as_object()
            .map(|b| b.keys().collect())
            .unwrap_or_default();
        assert_eq!(keys, ["status"], "a status patch holds the status only: {p}");
    }
    patches.len()
}

/// The clustermesh-apiserver's source writes `Valid`/`Invalid` with the observed generation on every fleetmesh
/// object, only when that changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_is_written_back_once_per_change() {
    init_tracing();
    let mut em = Emulator::start();
    seed(&mut em);
    let zero = policy("zero", 0, 0);
    em.create(&zero);
    let (tx, mut rx) = watch::channel(Snapshot::default());
    let task = tokio::spawn(mesh_k8s::watch_kubernetes_writing_status(em.client(), tx));

    let api = policy("api", 0, 0);
    let s = status_until(&mut em, &api, "api valid", |s| s["phase"] == "Valid").await;
    assert_eq!(s["observedGeneration"], 1, "{s}");
    assert!(s.get("message").is_none_or(Value::is_null), "{s}");
    let s = status_until(&mut em, &rollout("api-v2"), "rollout valid", |s| {
        s["phase"] == "Valid"
    })
    .await;
    assert_eq!(s["observedGeneration"], 1, "{s}");
    let s = status_until(&mut em, &zero, "zero invalid", |s| s["phase"] == "Invalid").await;
    assert_eq!(s["observedGeneration"], 1, "{s}");
    let message = s["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("TrafficPolicy shop/zero") && message.contains("spec.weights"),
        "{s}"
    );
    let snapshot = rx.borrow_and_update().clone();
    assert!(
        snapshot.errors.iter().any(|e| e == message),
        "the same message as the snapshot's errors: {:?}",
        snapshot.errors
    );

    // Fixing it flips it to Valid, with the new generation and without the old message.
    em.patch(
        &zero,
        &json!({"spec": {"weights": [{"clusters": {"names": ["west"]}, "weight": 1}]}}),
    );
    let s = status_until(&mut em, &zero, "zero fixed", |s| s["phase"] == "Valid").await;
    assert_eq!(s["observedGeneration"], 2, "{s}");
    assert!(s.get("message").is_none_or(Value::is_null), "{s}");

    // Changes that do not change any status: a label (same generation), another kind's object. Then a new
    // policy: once its status is written, the writer has seen the changes before it.
    em.patch(&api, &json!({"metadata": {"labels": {"team": "b"}}}));
    em.create(&node("n9", "172.30.1.9", "10.1.9.0/24"));
    let late = policy("late", 1, 1);
    em.create(&late);
    status_until(&mut em, &late, "late valid", |s| s["phase"] == "Valid").await;
    assert_eq!(
        status_patches(&mut em, &api),
        1,
        "one patch for api: nothing changed since"
    );
    assert_eq!(status_patches(&mut em, &zero), 2, "Invalid, then Valid");
    assert_eq!(status_patches(&mut em, &rollout("api-v2")), 1);
    assert_eq!(status_patches(&mut em, &late), 1);
    assert!(!task.is_finished(), "the source runs on");
    task.abort();

    // A restarted apiserver reads the statuses the objects carry and writes none of them again.
    let (tx, _rx) = watch::channel(Snapshot::default());
    let task = tokio::spawn(mesh_k8s::watch_kubernetes_writing_status(em.client(), tx));
    let after = policy("after-restart", 1, 1);
    em.create(&after);
    status_until(&mut em, &after, "after-restart valid", |s| s["phase"] == "Valid").await;
    assert_eq!(
        status_patches(&mut em, &api),
        1,
        "no patch for api after a restart"
    );
    assert_eq!(
        status_patches(&mut em, &zero),
        2,
        "no patch for zero after a restart"
    );
    assert_eq!(
        status_patches(&mut em, &late),
        1,
        "no patch for late after a restart"
    );
    assert_eq!(status_patches(&mut em, &after), 1);
    task.abort();
}

/// A status that cannot be written (the object is unknown to the server's status endpoint) is an error with
/// context, and the writer retries it on the next call instead of remembering it as written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_status_patch_is_reported_and_retried() {
    use mesh_k8s::status::{ObjectRef, StatusKind, StatusWriter, Verdict, Verdicts};
    init_tracing();
    let mut em = Emulator::start();
    em.create(&namespace("shop"));
    let mut writer = StatusWriter::new(em.client());
    let ghost = ObjectRef {
        kind: StatusKind::TrafficPolicy,
        namespace: "shop".into(),
        name: "ghost".into(),
    };
    let verdicts = Verdicts::from([(
        ghost,
        Verdict {
            generation: Some(1),
            error: None,
            current: None,
        },
    )]);
    let (patched, failures) = writer.sync(&verdicts).await;
    assert_eq!((patched, failures.len()), (0, 1), "{failures:?}");
    let text = failures[0].to_string();
    assert!(text.contains("TrafficPolicy shop/ghost"), "{text}");
    // Created now: the next sync writes it.
    em.create(&policy("ghost", 1, 1));
    let (patched, failures) = writer.sync(&verdicts).await;
    assert_eq!((patched, failures.len()), (1, 0), "{failures:?}");
    let (patched, _) = writer.sync(&verdicts).await;
    assert_eq!(patched, 0, "written once");
    assert_eq!(status_patches(&mut em, &policy("ghost", 1, 1)), 2);
}

/// Both kinds of network policy are watched; a bad update (an unknown field, which the typed NetworkPolicy would
/// drop; an invalid cluster name) keeps the previous version in force and is reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_policies_are_watched_and_bad_updates_keep_the_previous_version() {
    use mesh_model::policy::{Peer, PolicyKind};
    init_tracing();
    let mut em = Emulator::start();
    seed(&mut em);
    em.create(&network_policy("api", 8080));
    em.create(&mesh_network_policy("api", "west"));
    let mut src = Source::start(&em, Scope::Cluster);
    let k8s_key = (PolicyKind::Kubernetes, "shop".to_owned(), "api".to_owned());
    let mesh_key = (PolicyKind::Mesh, "shop".to_owned(), "api".to_owned());

    let s = src.until("initial lists", |s| s.generation >= 1).await;
    assert!(s.errors.is_empty(), "{:?}", s.errors);
    assert_eq!(s.state.network_policies.len(), 2);
    let before = s.state.network_policies.clone();
    assert!(matches!(
        &before[&mesh_key].egress.as_ref().expect("egress")[0].peers[0],
        Peer::Endpoints { .. }
    ));

    em.patch(
        &network_policy("api", 0),
        &json!({"spec": {"ingress": [{"ports": [{"port": 8080, "bogus": 1}]}]}}),
    );
    em.patch(
        &mesh_network_policy("api", ""),
        &json!({"spec": {"egress": [{"to": [{"podSelector": {}, "clusters": {"names": ["West"]}}]}]}}),
    );
    let s = src
        .until("both bad updates reported", |s| s.errors.len() == 2)
        .await;
    assert_eq!(
        s.state.network_policies, before,
        "previous versions stay in force"
    );
    assert!(
        s.errors
            .iter()
            .any(|e| e.contains("NetworkPolicy shop/api") && e.contains("spec.ingress[0].ports[0].bogus")),
        "{:?}",
        s.errors
    );
    assert!(
        s.errors
            .iter()
            .any(|e| e.contains("MeshNetworkPolicy shop/api") && e.contains("clusters.names[0]")),
        "{:?}",
        s.errors
    );

    em.delete(&network_policy("api", 0));
    let s = src
        .until("delete applied", |s| {
            !s.state.network_policies.contains_key(&k8s_key)
        })
        .await;
    assert!(s.state.network_policies.contains_key(&mesh_key));
}

/// The backends of service `shop/api` in a snapshot, as `address:port`.
fn api_backends(s: &Snapshot) -> Vec<String> {
    s.state
        .services
        .get(&key("api"))
        .map(|svc| mesh_model::service::endpoints(&s.state, svc))
        .unwrap_or_default()
        .iter()
        .map(|e| {
            let port = e.ports.first().map_or(0, |p| p.port);
            format!("{}:{port}", e.ipv4)
        })
        .collect()
}

/// EndpointSlices are watched and decide the service's backends instead of its selector: the initial list, a
/// new slice, an endpoint turning not ready, deletes (with no slice left, the selector again); a malformed slice
/// is skipped and reported while the others apply, and applies once fixed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_slices_decide_service_backends() {
    init_tracing();
    let mut em = Emulator::start();
    seed(&mut em);
    // The selector would give p1 and p2 (10.1.1.5, 10.1.2.5); the slice says p1 and an address of no known pod.
    let a = endpoint_slice(
        "api-a",
        &[("10.1.1.5", true, Some("p1")), ("10.1.3.7", true, None)],
    );
    em.create(&a);
    let bad = endpoint_slice("api-bad", &[("10.1.1.300", true, None)]);
    em.create(&bad);
    let mut src = Source::start(&em, Scope::Cluster);

    let s = src.until("initial lists", |s| s.generation >= 1).await;
    let slices: Vec<&str> = s.state.endpoint_slices.keys().map(|(_, n)| n.as_str()).collect();
    assert_eq!(slices, ["api-a"], "the malformed slice is skipped");
    let slice = &s.state.endpoint_slices[&key("api-a")];
    assert_eq!(slice.service.as_deref(), Some("api"));
    assert_eq!(slice.endpoints[0].node_name.as_deref(), Some("n1"));
    assert_eq!(
        slice.endpoints[0].pod.as_ref().map(|p| p.name.as_str()),
        Some("p1")
    );
    assert_eq!(s.errors.len(), 1, "{:?}", s.errors);
    assert!(
        s.errors[0].contains("EndpointSlice shop/api-bad")
            && s.errors[0].contains("endpoints[0].addresses[0]"),
        "{:?}",
        s.errors
    );
    assert_eq!(api_backends(&s), ["10.1.1.5:8080", "10.1.3.7:8080"]);

    // Add: a second slice of the same service.
    let b = endpoint_slice("api-b", &[("10.1.2.5", true, Some("p2"))]);
    em.create(&b);
    let s = src.until("api-b added", |s| api_backends(s).len() == 3).await;
    assert_eq!(
        api_backends(&s),
        ["10.1.1.5:8080", "10.1.2.5:8080", "10.1.3.7:8080"]
    );

    // Update: p1's endpoint is no longer ready; it stops being a backend.
    em.patch(
        &a,
        &json!({"endpoints": slice_endpoints(&[("10.1.1.5", false, Some("p1")), ("10.1.3.7", true, None)])}),
    );
    let s = src
        .until("10.1.1.5 not ready", |s| {
            !api_backends(s).contains(&"10.1.1.5:8080".to_owned())
        })
        .await;
    assert_eq!(api_backends(&s), ["10.1.2.5:8080", "10.1.3.7:8080"]);
    assert_eq!(
        s.state.endpoint_slices[&key("api-a")].endpoints[0]
            .conditions
            .ready,
        Some(false)
    );

    // The malformed slice fixed: it applies and its error goes.
    em.patch(
        &bad,
        &json!({"endpoints": slice_endpoints(&[("10.1.1.30", true, None)])}),
    );
    let s = src.until("api-bad fixed", |s| s.errors.is_empty()).await;
    assert_eq!(
        api_backends(&s),
        ["10.1.1.30:8080", "10.1.2.5:8080", "10.1.3.7:8080"]
    );

    // Delete: a slice's endpoints go with it; with no slice left, the selector decides again.
    em.delete(&b);
    let s = src
        .until("api-b deleted", |s| {
            !s.state.endpoint_slices.contains_key(&key("api-b"))
        })
        .await;
    assert_eq!(api_backends(&s), ["10.1.1.30:8080", "10.1.3.7:8080"]);
    em.delete(&a);
    em.delete(&bad);
    let s = src
        .until("every slice deleted", |s| s.state.endpoint_slices.is_empty())
        .await;
    assert_eq!(
        api_backends(&s),
        ["10.1.1.5:8080", "10.1.2.5:8080"],
        "the pods matching the selector"
    );
    assert!(s.errors.is_empty(), "{:?}", s.errors);
}

/// A node's entry of a rollout, as an agent reports it.
fn node_progress(
    phase: mesh_k8s::crd::RolloutPhase,
    step: u32,
    held_seconds: u64,
    new_flows: u64,
) -> mesh_k8s::crd::NodeProgress {
    mesh_k8s::crd::NodeProgress {
        phase,
        step,
        steps: 3,
        percent: [10, 50, 100][usize::try_from(step.clamp(1, 3) - 1).unwrap_or(0)],
        held_seconds,
        failure_ratio: 0.0,
        new_flows,
        resets: 0,
        message: None,
        updated_at: None,
    }
}

/// The bodies of the status patches the daemons' writers sent for an object (the test's own, through the
/// fixture, carry the `metadata.resourceVersion` it stamps, and are left out); each holds `status` only.
fn writer_patches(em: &mut Emulator, object: &Value) -> Vec<Value> {
    let path = format!("{}/status", object_path(object));
    let bodies: Vec<Value> = em
        .requests()
        .into_iter()
        .filter(|r| r["method"] == "PATCH" && r["path"] == path.as_str())
        .map(|r| r["body"].clone())
        .filter(|b| b.get("metadata").is_none())
        .collect();
    for b in &bodies {
        let keys: Vec<&String> = b.as_object().map(|b| b.keys().collect()).unwrap_or_default();
        assert_eq!(keys, ["status"], "a status patch holds the status only: {b}");
    }
    bodies
}

/// The writers' status patches of an object that touch `status.<key>`.
fn status_patches_of(em: &mut Emulator, object: &Value, key: &str) -> usize {
    writer_patches(em, object)
        .iter()
        .filter(|b| b["status"].get(key).is_some())
        .count()
}

/// Asserts that the number of the writers' status patches of `object` stays `n` for `period` (polled).
async fn patches_stay(em: &mut Emulator, object: &Value, n: usize, period: Duration, what: &str) {
    let end = std::time::Instant::now() + period;
    let mut interval = tokio::time::interval(Duration::from_millis(50));
    while std::time::Instant::now() < end {
        interval.tick().await;
        assert_eq!(writer_patches(em, object).len(), n, "{what}");
    }
}

/// A Node with the uid the API server would give it (kmock gives none).
fn node_with_uid(name: &str, uid: &str) -> Value {
    let mut n = node(name, "172.30.1.1", "10.1.1.0/24");
    n["metadata"]["uid"] = json!(uid);
    n
}

/// A `MeshNode` as its agent keeps it: `status.rollouts` by `<namespace>/<name>`.
fn mesh_node(name: &str, rollouts: &Value) -> Value {
    json!({"apiVersion": "fleetmesh.io/v1alpha1", "kind": "MeshNode", "metadata": {"name": name},
           "spec": {}, "status": {"rollouts": rollouts}})
}

/// A node's entry as JSON, as an agent writes it.
fn entry_json(phase: &str, step: u32, held: u64) -> Value {
    json!({"phase": phase, "step": step, "steps": 3, "percent": 10, "heldSeconds": held, "failureRatio": 0.0,
           "newFlows": 5, "resets": 0, "updatedAt": "2026-01-01T00:00:00Z"})
}

/// Writes a `MeshNode`'s entries as its agent would (a merge patch of `status.rollouts`), through the fixture.
fn write_mesh_node(em: &mut Emulator, name: &str, rollouts: &Value) {
    let path = format!("{}/status", object_path(&mesh_node(name, &json!({}))));
    em.command(&json!({"op": "patch", "path": path, "object": {"status": {"rollouts": rollouts}}}));
}

/// `MeshNode` n1 once it exists and `pred` holds, within the deadline (polled with a client of the emulator).
async fn mesh_node_until(em: &Emulator, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    use kube::api::{Api, ApiResource, DynamicObject};
    let ar = ApiResource::erase::<mesh_k8s::crd::MeshNode>(&());
    let api = Api::<DynamicObject>::all_with(em.client(), &ar);
    let start = std::time::Instant::now();
    let mut interval = tokio::time::interval(Duration::from_millis(50));
    loop {
        interval.tick().await;
        // kmock's 404 has another reason than the API server's `NotFound`, which `get_opt` looks for.
        let seen = match api.get("n1").await {
            Ok(o) => Some(serde_json::to_value(o).expect("json")),
            Err(kube::Error::Api(s)) if s.code == 404 => None,
            Err(e) => panic!("get MeshNode n1: {e}"),
        };
        if let Some(o) = &seen
            && pred(o)
        {
            return o.clone();
        }
        assert!(
            start.elapsed() < DEADLINE,
            "{what}: not seen within {DEADLINE:?}; MeshNode n1: {seen:?}"
        );
    }
}

const MESH_NODE_N1: &str = "/apis/fleetmesh.io/v1alpha1/meshnodes/n1";

/// The requests the agent's writer sent (the fixture's own carry the `metadata.resourceVersion` it stamps):
/// (method, path, body).
fn agent_requests(em: &mut Emulator) -> Vec<(String, String, Value)> {
    em.requests()
        .into_iter()
        .filter(|r| {
            r["body"]
                .get("metadata")
                .and_then(|m| m.get("resourceVersion"))
                .is_none()
        })
        .filter(|r| {
            r["path"]
                .as_str()
                .is_some_and(|p| p.contains("meshnodes") || p.contains("stagedrollouts"))
        })
        .map(|r| {
            (
                r["method"].as_str().unwrap_or_default().to_owned(),
                r["path"].as_str().unwrap_or_default().to_owned(),
                r["body"].clone(),
            )
        })
        .collect()
}

/// The bodies of the agent's patches of its `MeshNode`'s status; each holds `status.rollouts` only.
fn mesh_node_patches(em: &mut Emulator) -> Vec<Value> {
    let status = format!("{MESH_NODE_N1}/status");
    let all = agent_requests(em);
    for (method, path, body) in &all {
        assert!(
            path.contains("meshnodes"),
            "the agent writes no StagedRollout: {method} {path} {body}"
        );
    }
    let bodies: Vec<Value> = all
        .into_iter()
        .filter(|(m, p, _)| m == "PATCH" && *p == status)
        .map(|(_, _, b)| b)
        .collect();
    for b in &bodies {
        let keys: Vec<&String> = b["status"]
            .as_object()
            .map(|s| s.keys().collect())
            .unwrap_or_default();
        assert!(
            b.as_object().is_some_and(|o| o.len() == 1) && keys == ["rollouts"],
            "a patch of status.rollouts only: {b}"
        );
    }
    bodies
}

/// Asserts that the number of the agent's `MeshNode` patches stays `n` for `period` (polled).
async fn mesh_node_patches_stay(em: &mut Emulator, n: usize, period: Duration, what: &str) {
    let end = std::time::Instant::now() + period;
    let mut interval = tokio::time::interval(Duration::from_millis(50));
    while std::time::Instant::now() < end {
        interval.tick().await;
        assert_eq!(mesh_node_patches(em).len(), n, "{what}");
    }
}

/// An agent creates its node's `MeshNode` (owned by its Node, so that Kubernetes deletes it with the node) and
/// patches its entries there: at once when a rollout appears or its phase or step changes, never for hold time
/// and counters alone within the refresh bound, `null` when the node stops running it. It never writes the
/// `StagedRollout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_creates_its_mesh_node_and_writes_its_entry_on_phase_and_step_changes_only() {
    use mesh_k8s::crd::RolloutPhase::{Paused, Progressing};
    use mesh_k8s::progress::{NodeProgressWriter, NodeRollouts};
    init_tracing();
    let mut em = Emulator::start();
    em.create(&namespace("shop"));
    em.create(&node_with_uid("n1", "uid-of-n1"));
    let r = rollout("api-v2");
    em.create(&r);
    let (tx, rx) = watch::channel(NodeRollouts::new());
    // A refresh bound far beyond the test: only new rollouts, phase and step changes are written.
    let writer = NodeProgressWriter::new(em.client(), "n1").with_refresh(Duration::from_secs(3600));
    let task = tokio::spawn(writer.run(rx));

    // Created at start, before any rollout, owned by the Node.
    let m = mesh_node_until(&em, "MeshNode n1 created", |_| true).await;
    assert_eq!(
        m["metadata"]["ownerReferences"],
        json!([{"apiVersion": "v1", "kind": "Node", "name": "n1", "uid": "uid-of-n1"}]),
        "{m}"
    );
    assert_eq!(mesh_node_patches(&mut em).len(), 0, "nothing to report yet");

    let key = ("shop".to_owned(), "api-v2".to_owned());
    let send = |p| tx.send_replace(NodeRollouts::from([(key.clone(), p)]));
    send(node_progress(Progressing, 1, 0, 0));
    let m = mesh_node_until(&em, "n1's entry", |o| {
        o["status"]["rollouts"]["shop/api-v2"]["step"] == 1
    })
    .await;
    let e = &m["status"]["rollouts"]["shop/api-v2"];
    assert_eq!(
        (&e["phase"], &e["percent"]),
        (&json!("Progressing"), &json!(10)),
        "{m}"
    );
    assert!(e["updatedAt"].is_string(), "{m}");
    assert_eq!(mesh_node_patches(&mut em).len(), 1);

    // Hold time and counters move, phase and step do not: nothing within the bound.
    for held in 1..=5 {
        send(node_progress(Progressing, 1, held, held * 10));
    }
    mesh_node_patches_stay(&mut em, 1, Duration::from_secs(1), "no patch for counters alone").await;

    send(node_progress(Progressing, 2, 0, 50));
    let m = mesh_node_until(&em, "step 2", |o| {
        o["status"]["rollouts"]["shop/api-v2"]["step"] == 2
    })
    .await;
    let e = &m["status"]["rollouts"]["shop/api-v2"];
    assert_eq!((&e["percent"], &e["newFlows"]), (&json!(50), &json!(50)), "{m}");
    assert_eq!(mesh_node_patches(&mut em).len(), 2, "one patch for the step");
    send(node_progress(Paused, 2, 3, 60));
    mesh_node_until(&em, "paused", |o| {
        o["status"]["rollouts"]["shop/api-v2"]["phase"] == "Paused"
    })
    .await;
    assert_eq!(mesh_node_patches(&mut em).len(), 3, "one patch for the phase");
    // The same state again: nothing to write.
    send(node_progress(Paused, 2, 3, 60));
    mesh_node_patches_stay(
        &mut em,
        3,
        Duration::from_millis(500),
        "no patch without a change",
    )
    .await;

    // The node stops running it: its entry goes.
    tx.send_replace(NodeRollouts::new());
    mesh_node_until(&em, "n1's entry removed", |o| {
        o["status"]["rollouts"].get("shop/api-v2").is_none()
    })
    .await;
    assert_eq!(mesh_node_patches(&mut em).len(), 4);
    let posts = agent_requests(&mut em)
        .into_iter()
        .filter(|(m, ..)| m == "POST")
        .count();
    assert_eq!(posts, 1, "created once");
    let s = em.command(&json!({"op": "get", "path": object_path(&r)}))["object"].clone();
    assert!(s.get("status").is_none_or(|s| s.get("nodes").is_none()), "{s}");
    assert!(!task.is_finished());
    task.abort();
}

/// Between phase and step changes an agent rewrites its entry at most once per refresh bound while the rollout
/// progresses, and the last values arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_refreshes_its_entry_at_most_once_per_bound() {
    use mesh_k8s::crd::RolloutPhase::Progressing;
    use mesh_k8s::progress::{NodeProgressWriter, NodeRollouts};
    init_tracing();
    let mut em = Emulator::start();
    em.create(&node_with_uid("n1", "uid-of-n1"));
    let refresh = Duration::from_secs(1);
    let key = ("shop".to_owned(), "api-v2".to_owned());
    let (tx, rx) = watch::channel(NodeRollouts::from([(
        key.clone(),
        node_progress(Progressing, 1, 0, 0),
    )]));
    let task = tokio::spawn(
        NodeProgressWriter::new(em.client(), "n1")
            .with_refresh(refresh)
            .run(rx),
    );
    mesh_node_until(&em, "n1's entry", |o| {
        o["status"]["rollouts"]["shop/api-v2"]["step"] == 1
    })
    .await;
    let first = mesh_node_patches(&mut em).len();
    assert_eq!(first, 1);

    // An agent ticking every 50 ms for 3.5 s, its counters moving each time.
    let start = std::time::Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    let mut flows = 0;
    while start.elapsed() < Duration::from_millis(3500) {
        tick.tick().await;
        flows += 1;
        let held = start.elapsed().as_secs();
        tx.send_replace(NodeRollouts::from([(
            key.clone(),
            node_progress(Progressing, 1, held, flows),
        )]));
    }
    let elapsed = start.elapsed();
    let refreshes = mesh_node_patches(&mut em).len() - first;
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "a few seconds"
    )]
    let bound = (elapsed.as_secs_f64() / refresh.as_secs_f64()).floor() as usize + 1;
    assert!(
        (2..=bound).contains(&refreshes),
        "{refreshes} refreshes in {elapsed:?} with a bound of one per {refresh:?}"
    );
    // The last values are written once the bound allows.
    let m = mesh_node_until(&em, "last counters", |o| {
        o["status"]["rollouts"]["shop/api-v2"]["newFlows"] == flows
    })
    .await;
    assert_eq!(
        m["status"]["rollouts"]["shop/api-v2"]["phase"], "Progressing",
        "{m}"
    );
    task.abort();
}

/// A restarted agent finds its `MeshNode`: it rewrites nothing that is there already and removes the entries of
/// rollouts it no longer runs; a `MeshNode` deleted under it is created again with every entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_takes_over_its_mesh_node_and_creates_it_again_when_gone() {
    use mesh_k8s::crd::RolloutPhase::Progressing;
    use mesh_k8s::progress::{NodeProgressWriter, NodeRollouts};
    init_tracing();
    let mut em = Emulator::start();
    em.create(&node_with_uid("n1", "uid-of-n1"));
    let kept = node_progress(Progressing, 2, 7, 40);
    let mut stored = serde_json::to_value(&kept).expect("json");
    stored["updatedAt"] = json!("2026-01-01T00:00:00Z");
    em.create(&mesh_node(
        "n1",
        &json!({"shop/api-v2": stored, "shop/old": entry_json("Completed", 3, 30)}),
    ));
    let key = ("shop".to_owned(), "api-v2".to_owned());
    let (tx, rx) = watch::channel(NodeRollouts::from([(key.clone(), kept.clone())]));
    let task = tokio::spawn(NodeProgressWriter::new(em.client(), "n1").run(rx));
    mesh_node_until(&em, "the old entry removed", |o| {
        o["status"]["rollouts"].get("shop/old").is_none()
    })
    .await;
    let patches = mesh_node_patches(&mut em);
    assert_eq!(
        patches,
        [json!({"status": {"rollouts": {"shop/old": null}}})],
        "only the removal: the other entry is there already"
    );
    let posts = agent_requests(&mut em)
        .into_iter()
        .filter(|(m, ..)| m == "POST")
        .count();
    assert_eq!(posts, 0, "found, not created");

    // Deleted (as the garbage collector would after its Node went): created again on the next write.
    em.delete(&mesh_node("n1", &json!({})));
    tx.send_replace(NodeRollouts::from([(
        key.clone(),
        node_progress(Progressing, 3, 0, 0),
    )]));
    let m = mesh_node_until(&em, "created again", |o| {
        o["status"]["rollouts"]["shop/api-v2"]["step"] == 3
    })
    .await;
    assert_eq!(m["metadata"]["ownerReferences"][0]["uid"], "uid-of-n1", "{m}");
    assert!(!task.is_finished());
    task.abort();
}

/// The clustermesh-apiserver (its source as it runs) summarizes the `MeshNode`s into `status.progress`: one
/// halted node halts the rollout, is named, and is written at once; a node whose Node is gone does not count;
/// the validity fields stay, and the rollout carries no per-node entries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apiserver_summarizes_mesh_nodes_and_leaves_out_deleted_nodes() {
    init_tracing();
    let mut em = Emulator::start();
    seed(&mut em);
    let r = rollout("api-v2");
    em.create(&mesh_node(
        "n1",
        &json!({"shop/api-v2": entry_json("Progressing", 2, 4)}),
    ));
    let mut halted = entry_json("Halted", 1, 9);
    halted["message"] = json!("gate failed at step 1");
    em.create(&mesh_node(
        "n2",
        &json!({"shop/api-v2": halted, "shop/gone": entry_json("Halted", 1, 1)}),
    ));
    let (tx, _rx) = watch::channel(Snapshot::default());
    let task = tokio::spawn(mesh_k8s::watch_kubernetes_writing_status(em.client(), tx));
    let started = std::time::Instant::now();

    let s = status_until(&mut em, &r, "halted", |s| {
        s["progress"]["phase"] == "Halted" && s["phase"] == "Valid"
    })
    .await;
    assert!(
        started.elapsed() < mesh_k8s::progress::SUMMARY_INTERVAL,
        "a rollout turning Halted is written at once: {:?}",
        started.elapsed()
    );
    let p = &s["progress"];
    assert_eq!(
        (
            &p["step"],
            &p["steps"],
            &p["nodes"],
            &p["nodesHalted"],
            &p["haltedNodes"]
        ),
        (&json!(1), &json!(3), &json!(2), &json!(1), &json!(["n2"])),
        "{s}"
    );
    assert_eq!(s["observedGeneration"], 1, "{s}");
    assert!(
        s.get("nodes").is_none(),
        "no per-node entries on the rollout: {s}"
    );

    // n2's Node deleted: its MeshNode no longer counts.
    em.delete(&node("n2", "", ""));
    let s = status_until(&mut em, &r, "n2 left out", |s| s["progress"]["nodes"] == 1).await;
    let p = &s["progress"];
    assert_eq!(
        (&p["phase"], &p["step"], &p["nodesHalted"]),
        (&json!("Progressing"), &json!(2), &json!(0)),
        "{s}"
    );
    assert!(p.get("haltedNodes").is_none(), "no halted node left: {s}");
    assert_eq!(
        (&s["phase"], &s["observedGeneration"]),
        (&json!("Valid"), &json!(1)),
        "validity untouched: {s}"
    );
    // Every patch holds `status` only, each writer its own keys.
    let validity = status_patches_of(&mut em, &r, "phase");
    assert_eq!(validity, 1, "the validity was written once");
    assert_eq!(
        status_patches_of(&mut em, &r, "progress"),
        2,
        "the halt, then n2 left out"
    );
    assert_eq!(
        writer_patches(&mut em, &r).len(),
        3,
        "the validity and the summaries, no other"
    );
    assert!(!task.is_finished());
    task.abort();
}

/// Changes of several nodes within the interval become one `StagedRollout` patch, written when the interval
/// after the first of them ends; nothing is written while the summary stays the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apiserver_coalesces_node_changes_into_one_summary_patch() {
    use mesh_k8s::progress::RolloutSummaries;
    init_tracing();
    let mut em = Emulator::start();
    em.create(&namespace("shop"));
    let r = rollout("api-v2");
    em.create(&r);
    for n in ["n1", "n2", "n3"] {
        em.create(&mesh_node(
            n,
            &json!({"shop/api-v2": entry_json("Progressing", 1, 0)}),
        ));
    }
    let interval = Duration::from_secs(2);
    let nodes = ["n1", "n2", "n3"].map(str::to_owned).into_iter().collect();
    let (_nodes_tx, nodes_rx) = watch::channel(Some(nodes));
    let task = tokio::spawn(
        RolloutSummaries::new(em.client())
            .with_interval(interval)
            .run(nodes_rx),
    );
    let s = status_until(&mut em, &r, "step 1 on 3 nodes", |s| s["progress"]["nodes"] == 3).await;
    assert_eq!(s["progress"]["step"], 1, "{s}");
    assert_eq!(status_patches_of(&mut em, &r, "progress"), 1);

    // The nodes step one after another: one patch, an interval after the first.
    let stepped = std::time::Instant::now();
    for n in ["n1", "n2", "n3"] {
        write_mesh_node(
            &mut em,
            n,
            &json!({"shop/api-v2": entry_json("Progressing", 2, 0)}),
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let s = status_until(&mut em, &r, "step 2", |s| s["progress"]["step"] == 2).await;
    assert!(
        stepped.elapsed() >= interval - Duration::from_millis(200),
        "gathered for the interval: {:?}",
        stepped.elapsed()
    );
    assert_eq!(s["progress"]["nodes"], 3, "{s}");
    assert_eq!(
        status_patches_of(&mut em, &r, "progress"),
        2,
        "one patch for the three changes"
    );
    // Hold time alone changes no summary: nothing more.
    write_mesh_node(
        &mut em,
        "n1",
        &json!({"shop/api-v2": entry_json("Progressing", 2, 9)}),
    );
    patches_stay(
        &mut em,
        &r,
        2,
        interval + Duration::from_millis(500),
        "no patch for hold time",
    )
    .await;
    assert!(!task.is_finished());
    task.abort();
}

/// Pod hostnames (clusterset DNS, `<hostname>.<clusterid>.<svc>.<ns>.svc.clusterset.local`): a pod's
/// `spec.hostname`/`spec.subdomain` and an EndpointSlice endpoint's `hostname` reach the model and the service's
/// endpoints; a hostname that is not a DNS label is refused with its field, and a good pod turned bad keeps its
/// previous version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostnames_of_pods_and_endpoint_slices_reach_the_model() {
    init_tracing();
    let mut em = Emulator::start();
    seed(&mut em);
    let mut named = pod("db-0", "n1", "10.1.1.9");
    named["spec"]["hostname"] = json!("db-0");
    named["spec"]["subdomain"] = json!("api");
    em.create(&named);
    let mut bad = pod("db-1", "n1", "10.1.1.10");
    bad["spec"]["hostname"] = json!("DB_1");
    em.create(&bad);
    let mut slice = endpoint_slice("api-h", &[("10.1.1.5", true, Some("p1"))]);
    slice["endpoints"][0]["hostname"] = json!("p1");
    em.create(&slice);
    let mut src = Source::start(&em, Scope::Cluster);

    let s = src.until("initial lists", |s| s.generation >= 1).await;
    let p = &s.state.pods[&key("db-0")];
    assert_eq!(
        (p.hostname.as_deref(), p.subdomain.as_deref()),
        (Some("db-0"), Some("api"))
    );
    assert!(
        !s.state.pods.contains_key(&key("db-1")),
        "a pod with a bad hostname is refused"
    );
    assert!(
        s.errors.iter().any(|e| e.contains("Pod shop/db-1")
            && e.contains("spec.hostname")
            && e.contains("not a DNS label")),
        "{:?}",
        s.errors
    );
    assert_eq!(
        s.state.endpoint_slices[&key("api-h")].endpoints[0]
            .hostname
            .as_deref(),
        Some("p1")
    );
    let svc = &s.state.services[&key("api")];
    let hosts: Vec<(String, Option<String>)> = mesh_model::service::endpoints(&s.state, svc)
        .into_iter()
        .map(|e| (e.ipv4.to_string(), e.hostname))
        .collect();
    assert_eq!(hosts, [("10.1.1.5".to_owned(), Some("p1".to_owned()))]);

    // Without slices the selector decides, and a pod's hostname counts under its subdomain (the service).
    em.delete(&slice);
    let s = src
        .until("slice deleted", |s| s.state.endpoint_slices.is_empty())
        .await;
    let svc = &s.state.services[&key("api")];
    let named_eps: Vec<(String, String)> = mesh_model::service::endpoints(&s.state, svc)
        .into_iter()
        .filter_map(|e| Some((e.ipv4.to_string(), e.hostname?)))
        .collect();
    assert_eq!(named_eps, [("10.1.1.9".to_owned(), "db-0".to_owned())]);

    // db-0's hostname turned bad: refused, the previous version stays.
    em.patch(
        &named,
        &json!({"metadata": {"labels": {"app": "api", "v": "2"}}, "spec": {"hostname": "-db"}}),
    );
    let s = src
        .until("bad update reported", |s| {
            s.errors.iter().any(|e| e.contains("Pod shop/db-0"))
        })
        .await;
    assert_eq!(s.state.pods[&key("db-0")].hostname.as_deref(), Some("db-0"));
}

fn service_import(name: &str, managed: bool, ips: &Value) -> Value {
    let mut o = json!({"apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceImport",
           "metadata": {"name": name, "namespace": "shop"},
           "spec": {"type": "ClusterSetIP", "ips": ips, "ports": [{"port": 80, "protocol": "TCP"}]}});
    if managed {
        o["metadata"]["labels"] = json!({"app.kubernetes.io/managed-by": "fleetmesh"});
    }
    o
}

/// The ClusterSetIPs of the ServiceImports the clustermesh-apiserver manages (`spec.ips`) reach the model, for the
/// agents to answer and load-balance them; other ServiceImports do not count; a bad address is refused with its
/// field, the previous one staying.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_import_addresses_of_fleetmesh_reach_the_model() {
    init_tracing();
    let mut em = Emulator::start();
    seed(&mut em);
    let api = service_import("api", true, &json!(["198.19.3.4"]));
    em.create(&api);
    em.create(&service_import("users", false, &json!(["198.19.9.9"])));
    em.create(&service_import("bad", true, &json!(["not-an-ip"])));
    let mut src = Source::start(&em, Scope::Cluster);
    let s = src.until("initial lists", |s| s.generation >= 1).await;
    let ips: Vec<(String, String)> = s
        .state
        .import_ips
        .iter()
        .map(|((_, n), ip)| (n.clone(), ip.to_string()))
        .collect();
    assert_eq!(ips, [("api".to_owned(), "198.19.3.4".to_owned())]);
    assert!(
        s.errors
            .iter()
            .any(|e| e.contains("ServiceImport shop/bad") && e.contains("spec.ips[0]")),
        "{:?}",
        s.errors
    );
    // Changed by the apiserver: followed; turned bad: the previous address stays.
    em.patch(&api, &json!({"spec": {"ips": ["198.19.3.5"]}}));
    let s = src
        .until("new address", |s| {
            s.state
                .import_ips
                .get(&key("api"))
                .map(ToString::to_string)
                .as_deref()
                == Some("198.19.3.5")
        })
        .await;
    assert_eq!(s.state.import_ips.len(), 1);
    em.patch(&api, &json!({"spec": {"ips": [7]}}));
    let s = src
        .until("bad update reported", |s| {
            s.errors.iter().any(|e| e.contains("ServiceImport shop/api"))
        })
        .await;
    assert_eq!(
        s.state
            .import_ips
            .get(&key("api"))
            .map(ToString::to_string)
            .as_deref(),
        Some("198.19.3.5")
    );
    // Deleted: gone from the model.
    em.delete(&api);
    let s = src.until("deleted", |s| s.state.import_ips.is_empty()).await;
    assert!(s.state.import_ips.is_empty());
}
