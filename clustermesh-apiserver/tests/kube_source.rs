//! The real `clustermesh-apiserver` binary with `--source kubernetes`: the cluster's nodes come from a Kubernetes
//! API server (kmock's emulator, `mesh-k8s/tests/fixtures/kube_emulator.py`, over HTTP through a kubeconfig) and
//! land in a real etcd; the daemon fails at start, saying why, when the API server is unreachable.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use etcd_client::{Client, GetOptions};
use mesh_kvstore::{Keys, NodeRecord};
use mesh_testkit::{Etcd, KubeEmulator, eventually, log_tail};

// ---------------------------------------------------------------------------------------------------------------
// The Kubernetes API emulator
// ---------------------------------------------------------------------------------------------------------------

/// kmock's emulator as a child process (killed on drop); commands go over its stdin, one JSON line each.
struct KubeApi(KubeEmulator);

impl KubeApi {
    fn start() -> Self {
        Self(KubeEmulator::start(&[]))
    }

    fn command(&mut self, cmd: &str) {
        let cmd: serde_json::Value = serde_json::from_str(cmd).expect("a JSON command");
        self.0.command(&cmd);
    }

    fn add_node(&mut self, (name, cidr, ip): NodeSpec) {
        self.command(&format!(
            r#"{{"op": "create", "path": "/api/v1/nodes", "object": {{"apiVersion": "v1", "kind": "Node", "metadata": {{"name": "{name}"}}, "spec": {{"podCIDR": "{cidr}"}}, "status": {{"addresses": [{{"type": "InternalIP", "address": "{ip}"}}]}}}}}}"#
        ));
    }

    fn delete_node(&mut self, name: &str) {
        self.command(&format!(r#"{{"op": "delete", "path": "/api/v1/nodes/{name}"}}"#));
    }
}

/// The apiserver on the Kubernetes source; killed on drop (its log printed if the test failed).
struct Apiserver {
    child: Child,
    log: std::path::PathBuf,
}

impl Apiserver {
    fn command(kubeconfig: &Path, etcd_url: &str, log: &Path) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_clustermesh-apiserver"));
        cmd.args([
            "--cluster-name",
            "east",
            "--cluster-id",
            "1",
            "--source",
            "kubernetes",
        ])
        .args(["--etcd-endpoints", etcd_url, "--lease-ttl", "5s", "--log", "info"])
        .env("KUBECONFIG", kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("RUST_LOG")
        .env_remove("FLEETMESH_MANIFESTS")
        .env_remove("FLEETMESH_SOURCE")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("log file"));
        cmd
    }
}

impl Drop for Apiserver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- clustermesh-apiserver log ---\n{}", log_tail(&self.log, 40));
        }
    }
}

/// (name, pod CIDR, InternalIP)
type NodeSpec = (&'static str, &'static str, Ipv4Addr);

const N1: NodeSpec = ("east-node-1", "10.1.1.0/24", Ipv4Addr::new(100, 65, 1, 1));
const N2: NodeSpec = ("east-node-2", "10.1.2.0/24", Ipv4Addr::new(100, 65, 1, 2));
const N3: NodeSpec = ("east-node-3", "10.1.3.0/24", Ipv4Addr::new(100, 65, 1, 3));

/// `Ok` when exactly the nodes `want` are published for east.
async fn published_exactly(client: &mut Client, want: &[NodeSpec]) -> Result<(), String> {
    let prefix = Keys::default().nodes_prefix("east");
    let resp = client
        .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
        .await
        .map_err(|e| e.to_string())?;
    let mut got = Vec::new();
    for kv in resp.kvs() {
        let key = kv.key_str().map_err(|e| e.to_string())?;
        let name = key.strip_prefix(&prefix).ok_or("key outside the prefix")?;
        let rec = mesh_kvstore::decode_node(key, "east", name, kv.value()).map_err(|e| e.to_string())?;
        got.push(rec);
    }
    let expected: Vec<NodeRecord> = want
        .iter()
        .map(|(name, cidr, ip)| NodeRecord {
            name: (*name).into(),
            cluster: "east".into(),
            cluster_id: 1,
            underlay_ipv4: *ip,
            pod_cidrs: vec![cidr.parse().expect("cidr")],
            wireguard: None,
        })
        .collect();
    if got == expected {
        Ok(())
    } else {
        Err(format!("published {got:?}"))
    }
}

const TIMEOUT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread")]
async fn publishes_the_nodes_of_the_kubernetes_api() {
    let etcd = Etcd::start().await;
    let c = etcd.client().await;
    let mut kube = KubeApi::start();
    kube.add_node(N1);
    kube.add_node(N2);
    let dir = tempfile::tempdir().expect("tempdir");
    let config = mesh_testkit::kubeconfig(dir.path(), &[("c", kube.0.port)]);
    let log = dir.path().join("apiserver.log");
    let _api = Apiserver {
        child: Apiserver::command(&config, &etcd.url(), &log)
            .spawn()
            .expect("spawn clustermesh-apiserver"),
        log: log.clone(),
    };
    eventually("the API's nodes published", TIMEOUT, || {
        let mut c = c.clone();
        async move { published_exactly(&mut c, &[N1, N2]).await }
    })
    .await;
    kube.delete_node(N2.0);
    kube.add_node(N3);
    eventually("deleted node withdrawn, added node published", TIMEOUT, || {
        let mut c = c.clone();
        async move { published_exactly(&mut c, &[N1, N3]).await }
    })
    .await;
    assert!(
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("cluster state from the Kubernetes API server"),
        "{}",
        log_tail(&log, 20)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn fails_at_start_when_the_api_server_is_unreachable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = mesh_testkit::free_port();
    let config = mesh_testkit::kubeconfig(dir.path(), &[("c", port)]);
    let log = dir.path().join("apiserver.log");
    let status = Apiserver::command(&config, "http://127.0.0.1:1", &log)
        .status()
        .expect("run clustermesh-apiserver");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!status.success(), "{text}");
    assert!(
        text.contains(&format!(
            "Kubernetes API server at http://127.0.0.1:{port}/ is unreachable"
        )),
        "{text}"
    );
}
