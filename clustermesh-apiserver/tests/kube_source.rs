//! The real `clustermesh-apiserver` binary with `--source kubernetes`: the cluster's nodes come from a Kubernetes
//! API server (kmock's emulator, `mesh-k8s/tests/fixtures/kube_emulator.py`, over HTTP through a kubeconfig) and
//! land in a real etcd; the daemon fails at start, saying why, when the API server is unreachable.

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

use etcd_client::{Client, GetOptions};
use mesh_kvstore::{Keys, NodeRecord};
use support::{Etcd, eventually, log_tail};

// ---------------------------------------------------------------------------------------------------------------
// Support (the same module is in tests/publish.rs)
// ---------------------------------------------------------------------------------------------------------------

#[expect(dead_code, reason = "shared support module; this test uses part of it")]
mod support {
    use std::future::Future;
    use std::net::TcpListener;
    use std::path::Path;
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    use etcd_client::{Client, ConnectOptions};

    pub fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("bind 127.0.0.1:0")
            .port()
    }

    pub fn log_tail(path: &Path, lines: usize) -> String {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Polls `check` until it gives `Ok`; panics with its last error after `timeout`.
    pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, String>>,
    {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match check().await {
                Ok(v) => return v,
                Err(e) => e,
            };
            assert!(
                Instant::now() < deadline,
                "{what}: not reached within {timeout:?}; last: {last}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Asserts that `check` gives `Ok` on every poll during `period`.
    pub async fn stays<F, Fut>(what: &str, period: Duration, mut check: F)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<(), String>>,
    {
        let end = Instant::now() + period;
        while Instant::now() < end {
            if let Err(e) = check().await {
                panic!("{what}: no longer true: {e}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn connect(url: &str) -> Result<Client, String> {
        let opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(1))
            .with_timeout(Duration::from_secs(2));
        Client::connect([url], Some(opts))
            .await
            .map_err(|e| e.to_string())
    }

    /// A single-member etcd on loopback; its data directory survives `stop`/`start_on` and goes with the guard.
    pub struct Etcd {
        child: Option<Child>,
        pub client_port: u16,
        peer_port: u16,
        dir: tempfile::TempDir,
    }

    impl Etcd {
        /// Starts a fresh etcd on free ports (once more on new ports if the first start fails).
        pub async fn start() -> Self {
            let mut first_error = String::new();
            for _ in 0..2 {
                let mut e = Etcd {
                    child: None,
                    client_port: free_port(),
                    peer_port: free_port(),
                    dir: tempfile::tempdir().expect("tempdir"),
                };
                match e.start_on(e.client_port).await {
                    Ok(()) => return e,
                    Err(err) => first_error = err,
                }
            }
            panic!("etcd did not start twice; last: {first_error}");
        }

        pub fn url(&self) -> String {
            url(self.client_port)
        }

        fn log(&self) -> std::path::PathBuf {
            self.dir.path().join("etcd.log")
        }

        /// Starts the (stopped) etcd on its data directory, serving clients on `client_port`; ready on return.
        pub async fn start_on(&mut self, client_port: u16) -> Result<(), String> {
            assert!(self.child.is_none(), "etcd already running");
            let client = url(client_port);
            let peer = url(self.peer_port);
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.log())
                .map_err(|e| e.to_string())?;
            let child = Command::new("etcd")
                .args(["--name", "t", "--data-dir"])
                .arg(self.dir.path().join("data"))
                .args([
                    "--listen-client-urls",
                    &client,
                    "--advertise-client-urls",
                    &client,
                ])
                .args([
                    "--listen-peer-urls",
                    &peer,
                    "--initial-advertise-peer-urls",
                    &peer,
                ])
                .args(["--initial-cluster", &format!("t={peer}")])
                .args(["--logger", "zap", "--log-level", "error"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .map_err(|e| format!("spawn etcd: {e}"))?;
            self.child = Some(child);
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                    self.child = None;
                    return Err(format!(
                        "etcd exited with {status}; log:\n{}",
                        log_tail(&self.log(), 20)
                    ));
                }
                let probe = match connect(&client).await {
                    Ok(mut c) => c.get("probe", None).await.map_err(|e| e.to_string()),
                    Err(e) => Err(e),
                };
                match probe {
                    Ok(_) => return Ok(()),
                    Err(e) if Instant::now() > deadline => {
                        self.stop();
                        return Err(format!(
                            "etcd not ready: {e}; log:\n{}",
                            log_tail(&self.log(), 20)
                        ));
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        }

        /// SIGKILL, and reaps the process.
        pub fn stop(&mut self) {
            if let Some(mut c) = self.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }

        pub async fn client(&self) -> Client {
            connect(&self.url()).await.expect("etcd client")
        }
    }

    impl Drop for Etcd {
        fn drop(&mut self) {
            self.stop();
            if std::thread::panicking() {
                eprintln!("--- etcd log ---\n{}", log_tail(&self.log(), 30));
            }
        }
    }

    pub fn url(port: u16) -> String {
        format!("http://127.0.0.1:{port}")
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The Kubernetes API emulator
// ---------------------------------------------------------------------------------------------------------------

/// kmock's emulator as a child process (killed on drop); commands go over its stdin, one JSON line each.
struct KubeApi {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    port: u16,
}

impl KubeApi {
    fn start() -> Self {
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../mesh-k8s/tests/fixtures/kube_emulator.py"
        );
        let mut child = Command::new("python3")
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run python3 {script}: {e}"));
        let stdin = child.stdin.take().expect("piped stdin");
        let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("read the emulator's port");
        let port = line
            .trim()
            .strip_prefix("PORT ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| {
                panic!("the emulator did not start (said {line:?}); `cargo xtask setup` installs kmock")
            });
        Self {
            child,
            stdin,
            stdout,
            port,
        }
    }

    fn command(&mut self, cmd: &str) {
        writeln!(self.stdin, "{cmd}").expect("send a command to the emulator");
        self.stdin.flush().expect("flush");
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .expect("read the emulator's answer");
        assert!(line.contains(r#""ok": true"#), "{cmd} failed: {line}");
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

impl Drop for KubeApi {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A kubeconfig for the API server at `url`, without credentials.
fn kubeconfig(dir: &Path, url: &str) -> std::path::PathBuf {
    let path = dir.join("kubeconfig");
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: c, cluster: {{server: \"{url}\"}}}}]\n\
             contexts: [{{name: c, context: {{cluster: c, user: u}}}}]\nusers: [{{name: u, user: {{}}}}]\n\
             current-context: c\n"
        ),
    )
    .expect("write kubeconfig");
    path
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
    let config = kubeconfig(dir.path(), &format!("http://127.0.0.1:{}", kube.port));
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
    let port = support::free_port();
    let config = kubeconfig(dir.path(), &format!("http://127.0.0.1:{port}"));
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
