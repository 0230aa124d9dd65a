//! Network policy on the lab: security identities synced across clusters, NetworkPolicy and MeshNetworkPolicy
//! enforced by the eBPF programs on both ends, with real TCP connections between pods of two clusters, flow
//! events and the compiled policy from the agents' API.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fleetmesh_tests::{
    Lab, PodInfo, agent_get, agent_socket, eventually, in_netns, ping, pods, tcp_connect, tcp_line, udp_line,
    write_manifest,
};

/// How long a policy change may take to be enforced on the lab (the bench measures the real figure).
const CONVERGE: Duration = Duration::from_secs(20);

const POD_PORTS: &str = r"
      ports:
        - {containerPort: 8080, protocol: TCP}
        - {containerPort: 5353, protocol: UDP}
        - {name: stream, containerPort: 9090, protocol: TCP}";

fn pod(name: &str, app: &str, node: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: shop\n  labels: {{app: {app}}}\nspec:\n  nodeName: {node}\n  containers:\n    - name: echo\n      image: fleetmesh/lab-echo{POD_PORTS}\n"
    )
}

/// Two clusters: west (two nodes) and east (one node), namespace `shop` in both.
fn topology(root: &Path) -> PathBuf {
    let dir = root.join("topology");
    let ns = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n  labels: {team: shop}\n";
    write_manifest(
        &dir,
        "lab.yaml",
        "clusters:\n  - {name: west, id: 1, podCIDR: 10.1.0.0/16, nodes: 2, labels: {stage: prod}}\n  - {name: east, id: 2, podCIDR: 10.2.0.0/16, nodes: 1, labels: {stage: canary}}\n",
    )
    .expect("lab.yaml");
    let west = [
        pod("frontend", "frontend", "west-node-1"),
        pod("other", "other", "west-node-2"),
        pod("api-west", "api", "west-node-2"),
    ]
    .concat();
    write_manifest(&dir.join("west"), "workloads.yaml", &format!("{ns}{west}")).expect("west");
    let east = [
        pod("api", "api", "east-node-1"),
        pod("frontend-east", "frontend", "east-node-1"),
    ]
    .concat();
    write_manifest(&dir.join("east"), "workloads.yaml", &format!("{ns}{east}")).expect("east");
    dir
}

struct Mesh {
    lab: Lab,
    pods: Vec<PodInfo>,
    files: PathBuf,
}

impl Mesh {
    fn up(name: &str) -> Self {
        let root = Lab::dir_for(&format!("{name}-topology"));
        let _ = std::fs::remove_dir_all(&root);
        let topo = topology(&root);
        let lab = Lab::up(&topo, name).expect("lab up");
        let status = lab.status().expect("status");
        Self {
            pods: pods(&status),
            files: root.join("files"),
            lab,
        }
    }

    fn pod(&self, id: &str) -> &PodInfo {
        self.pods
            .iter()
            .find(|p| p.id == id)
            .unwrap_or_else(|| panic!("no pod {id}"))
    }

    /// Whether a TCP request from `from` to `to`:8080 gets the echo answer.
    fn reaches(&self, from: &str, to: &str) -> bool {
        let (from, to) = (self.pod(from), self.pod(to));
        tcp_line(&from.netns, &to.ip, 8080).is_ok_and(|answer| answer == to.id)
    }

    fn apply(&self, cluster: &str, name: &str, text: &str) {
        let f = write_manifest(&self.files, name, text).expect("write");
        self.lab
            .run(&["apply", cluster, &f.display().to_string()])
            .unwrap_or_else(|e| panic!("apply {name} to {cluster}: {e:#}"));
    }

    fn delete(&self, cluster: &str, name: &str) {
        let f = self.files.join(name);
        self.lab
            .run(&["delete", cluster, &f.display().to_string()])
            .unwrap_or_else(|e| panic!("delete {name} from {cluster}: {e:#}"));
    }

    fn socket(&self, node: &str) -> PathBuf {
        agent_socket(&self.lab.status().expect("status"), node).expect("agent socket")
    }

    /// A datapath counter of `node`'s agent.
    fn counter(&self, node: &str, name: &str) -> u64 {
        let st: serde_json::Value =
            serde_json::from_str(&agent_get(&self.socket(node), "/v1/status").expect("status"))
                .expect("json");
        st["datapath"]["counters"][name].as_u64().unwrap_or(0)
    }

    /// Flows `node`'s agent has buffered that pass `query`.
    fn flows(&self, node: &str, query: &str) -> Vec<serde_json::Value> {
        agent_get(&self.socket(node), &format!("/v1/flows?{query}"))
            .expect("flows")
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

/// Asserts that `cond` becomes true within [`CONVERGE`].
fn converges(what: &str, cond: impl FnMut() -> bool) {
    assert!(eventually(CONVERGE, cond), "{what} (waited {CONVERGE:?})");
}

const MESH_POLICY: &str = r"apiVersion: fleetmesh.io/v1alpha1
kind: MeshNetworkPolicy
metadata: {name: api-from-frontends, namespace: shop}
spec:
  podSelector: {matchLabels: {app: api}}
  policyTypes: [Ingress]
  ingress:
    - from:
        - podSelector: {matchLabels: {app: frontend}}
          clusters: {names: [west, east]}
      ports:
        - {protocol: TCP, port: 8080}
";

const K8S_POLICY: &str = r"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: api-local, namespace: shop}
spec:
  podSelector: {matchLabels: {app: api}}
  ingress:
    - from:
        - podSelector: {matchLabels: {app: frontend}}
      ports:
        - {protocol: TCP, port: 8080}
";

#[test]
fn ingress_policies_across_clusters() {
    let m = Mesh::up("policy-ingress");
    // Before any policy everything reaches the api in east, across clusters.
    converges("west/other reaches east/api without policy", || {
        m.reaches("west/shop/other", "east/shop/api")
    });

    // Kubernetes NetworkPolicy: selectors match the local cluster only (policy-default-local-cluster).
    m.apply("east", "api-policy.yaml", K8S_POLICY);
    converges("west/frontend is refused by a NetworkPolicy of east", || {
        !m.reaches("west/shop/frontend", "east/shop/api")
    });
    assert!(
        m.reaches("east/shop/frontend-east", "east/shop/api"),
        "local frontend allowed"
    );
    assert!(!m.reaches("west/shop/other", "east/shop/api"), "other denied");
    assert!(
        m.counter("east-node-1", "drop_policy_ingress") > 0,
        "ingress drops counted"
    );
    let drops = m.flows("east-node-1", "verdict=dropped&pod=shop%2Fapi");
    assert!(
        drops.iter().any(|f| f["reason"] == "drop_policy_ingress"
            && f["source"]["cluster"] == "west"
            && f["destination"]["pod"] == "api"),
        "a flow event names the denied cross-cluster call: {drops:?}"
    );

    // MeshNetworkPolicy: the same rule for frontends of both clusters (policies add up).
    m.apply("east", "mesh-policy.yaml", MESH_POLICY);
    converges("west/frontend allowed by the MeshNetworkPolicy", || {
        m.reaches("west/shop/frontend", "east/shop/api")
    });
    assert!(
        !m.reaches("west/shop/other", "east/shop/api"),
        "other still denied"
    );
    let allowed = m.flows("east-node-1", "verdict=forwarded&cluster=west");
    assert!(
        allowed.iter().any(|f| f["reason"] == "policy_allowed"
            && f["rule"]
                .as_str()
                .is_some_and(|r| r.contains("api-from-frontends"))),
        "the allowed flow names its rule: {allowed:?}"
    );

    // Identity follows labels: `other` becomes a frontend (no restart) and gets access; losing the label
    // revokes it.
    m.apply("west", "relabel.yaml", &pod("other", "frontend", "west-node-2"));
    converges("relabelled pod gains access", || {
        m.reaches("west/shop/other", "east/shop/api")
    });
    m.apply("west", "relabel.yaml", &pod("other", "other", "west-node-2"));
    converges("relabelled pod loses access", || {
        !m.reaches("west/shop/other", "east/shop/api")
    });

    // A malformed edit of a policy is rejected and the previous version stays in force.
    let manifests = m.lab.dir.join("clusters").join("east").join("manifests");
    let broken = MESH_POLICY.replace("port: 8080", "port: 70000");
    // Written aside and renamed into place: the agent never reads a half-written (or empty) file, which would be a
    // valid edit that removes the policy.
    let tmp = manifests.join(".mesh-policy.yaml.tmp");
    std::fs::write(&tmp, broken).expect("write broken policy");
    std::fs::rename(&tmp, manifests.join("mesh-policy.yaml")).expect("rename broken policy");
    let socket = m.socket("east-node-1");
    converges("the agent reports the malformed policy", || {
        agent_get(&socket, "/v1/status")
            .is_ok_and(|s| s.contains("api-from-frontends") && s.contains("70000"))
    });
    for _ in 0..5 {
        assert!(
            m.reaches("west/shop/frontend", "east/shop/api"),
            "old policy still allows"
        );
        assert!(
            !m.reaches("west/shop/other", "east/shop/api"),
            "old policy still denies"
        );
    }

    // Removing the policies restores open access.
    m.apply("east", "mesh-policy.yaml", MESH_POLICY);
    m.delete("east", "mesh-policy.yaml");
    m.delete("east", "api-policy.yaml");
    converges("access is open again", || {
        m.reaches("west/shop/other", "east/shop/api")
    });
}

const EGRESS_POLICY: &str = r"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: frontend-egress, namespace: shop}
spec:
  podSelector: {matchLabels: {app: frontend}}
  policyTypes: [Egress]
  egress:
    - to:
        - podSelector: {matchLabels: {app: api, io.cilium.k8s.policy.cluster: east}}
      ports:
        - {protocol: TCP, port: 8000, endPort: 8100}
";

#[test]
fn egress_policy_with_cluster_selector_and_policy_view() {
    let m = Mesh::up("policy-egress");
    converges("frontend reaches both apis", || {
        m.reaches("west/shop/frontend", "west/shop/api-west")
            && m.reaches("west/shop/frontend", "east/shop/api")
    });
    // The frontend's node: its own namespace is the host, with a listener on its address.
    let status = m.lab.status().expect("status");
    let node = status["clusters"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|c| c["nodes"].as_array().into_iter().flatten())
        .find(|n| n["name"] == "west-node-1")
        .cloned()
        .expect("west-node-1 in the lab status");
    let (node_ns, node_ip) = (
        node["netns"].as_str().expect("netns").to_owned(),
        node["underlayIP"].as_str().expect("underlayIP").to_owned(),
    );
    let listener = in_netns(&node_ns, || TcpListener::bind((node_ip.as_str(), 0)))
        .expect("enter the node namespace")
        .expect("listen on the node address");
    let node_port = listener.local_addr().expect("listener address").port();
    let frontend = m.pod("west/shop/frontend").clone();
    let host_reaches_frontend =
        || tcp_line(&node_ns, &frontend.ip, 8080).is_ok_and(|answer| answer == frontend.id);
    let frontend_reaches_host = || tcp_connect(&frontend.netns, &node_ip, node_port).is_ok();
    assert!(host_reaches_frontend(), "the node reaches its pod");
    assert!(
        frontend_reaches_host(),
        "the pod reaches its node before any policy"
    );

    m.apply("west", "egress.yaml", EGRESS_POLICY);
    converges("frontend may no longer reach the api of its own cluster", || {
        !m.reaches("west/shop/frontend", "west/shop/api-west")
    });
    // The egress policy allows nothing towards the node, yet the node's connections to the pod (kubelet probes)
    // work: the pod's replies pass as replies. The pod still cannot open a connection to the node.
    for i in 0..5 {
        assert!(
            host_reaches_frontend(),
            "connection {i} from the node to the egress-restricted pod failed"
        );
    }
    assert!(
        !frontend_reaches_host(),
        "the egress policy lets the pod connect to its node"
    );
    // UDP and ICMP echo from the node are answered too.
    assert_eq!(
        udp_line(&node_ns, &frontend.ip, 5353).expect("UDP from the node to the egress-restricted pod"),
        frontend.id
    );
    assert!(
        ping(&node_ns, &frontend.ip).expect("ping"),
        "the node pings its egress-restricted pod"
    );
    // The cluster label in the selector names east explicitly; the port range covers 8080.
    assert!(
        m.reaches("west/shop/frontend", "east/shop/api"),
        "east api allowed"
    );
    assert!(
        m.reaches("west/shop/other", "west/shop/api-west"),
        "unselected pods unaffected"
    );
    assert!(
        m.counter("west-node-1", "drop_policy_egress") > 0,
        "egress drops counted"
    );

    // The compiled policy, in identities and labels.
    let view: serde_json::Value = serde_json::from_str(
        &agent_get(&m.socket("west-node-1"), "/v1/policy/shop/frontend").expect("policy view"),
    )
    .expect("json");
    assert_eq!(view["egress"]["enforced"], true, "{view}");
    assert_eq!(view["ingress"]["enforced"], false, "{view}");
    let entries = view["egress"]["entries"].as_array().cloned().unwrap_or_default();
    assert!(!entries.is_empty(), "{view}");
    assert!(
        entries
            .iter()
            .all(|e| e["peer"].as_str().is_some_and(|p| p.contains("east"))),
        "every allowed peer is in east: {view}"
    );

    // Policy updates under running traffic: requests that the old and the new policy both allow never fail.
    let changes = [
        EGRESS_POLICY.replace("endPort: 8100", "endPort: 8081"),
        EGRESS_POLICY.to_owned(),
        EGRESS_POLICY.replace("port: 8000, endPort: 8100", "port: 8080"),
        EGRESS_POLICY.to_owned(),
    ];
    for (i, text) in changes.iter().enumerate() {
        m.apply("west", "egress.yaml", text);
        for j in 0..10 {
            assert!(
                m.reaches("west/shop/frontend", "east/shop/api"),
                "request {j} after change {i} was refused"
            );
        }
    }
    m.delete("west", "egress.yaml");
    converges("egress open again", || {
        m.reaches("west/shop/frontend", "west/shop/api-west")
    });
}
