//! Secure connections between clusters, against real etcd servers served with TLS on loopback (started here,
//! killed by a guard), with the material `meshctl clustermesh` makes (its library: CA, cluster certificates,
//! `etcd-init`, `connect`).
//!
//! - Clients without a certificate, with a certificate of another CA, or with another cluster's certificate (same
//!   CA) cannot read; plain HTTP is refused.
//! - The peers' user (CN remote-<cluster>) reads the key prefix but cannot write, nor read outside the prefix; the
//!   cluster's own apiserver user writes.
//! - An agent whose clustermesh config `meshctl clustermesh connect` wrote syncs the remote cluster over TLS.
//! - A config file whose name is not the cluster the etcd holds is refused with a clear reason and none of its data;
//!   a second remote cluster with an id in use is refused (by `connect`, and by the agent), and the first one stays
//!   synced.

use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use etcd_client::{Client, ConnectOptions, GetOptions, TlsOptions};
use mesh_agent::desired::LocalNode;
use mesh_agent::remote::{RemoteCluster, Remotes, SyncState, manage};
use mesh_kvstore::{ClusterConfig, Keys, NodeRecord, Synced, encode};
use meshctl::clustermesh::{self as cm, Role};

const TIMEOUT: Duration = Duration::from_secs(20);

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
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
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A mesh CA in a temporary folder, and cluster folders made with it.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        cm::create_ca(&dir.path().join("ca"), "test", 30, false).expect("create CA");
        Self { dir }
    }

    fn ca(&self) -> PathBuf {
        self.dir.path().join("ca")
    }

    /// `cluster-certs` for `name`/`id`, etcd on 127.0.0.1:`port`.
    fn cluster(&self, name: &str, id: u16, port: u16) -> PathBuf {
        let out = self.dir.path().join(name);
        let spec = cm::ClusterSpec {
            cluster: name.to_owned(),
            id,
            server_ips: vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
            server_names: vec!["localhost".to_owned()],
            etcd_port: port,
            endpoints: vec![format!("https://127.0.0.1:{port}")],
            days: 2,
        };
        cm::cluster_certs(&self.ca(), &spec, &out, false).expect("cluster certs");
        out
    }
}

/// A single-member etcd on loopback served with TLS and client certificate auth, initialised with
/// `meshctl clustermesh etcd-init`; killed on drop.
struct TlsEtcd {
    child: Child,
    certs: PathBuf,
    url: String,
    dir: tempfile::TempDir,
}

impl TlsEtcd {
    /// Starts the etcd of cluster `name` (id `id`) with fresh material from `pki`.
    async fn start(pki: &Pki, name: &str, id: u16) -> Self {
        let port = free_port();
        let certs = pki.cluster(name, id, port);
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("https://127.0.0.1:{port}");
        let peer = format!("http://127.0.0.1:{}", free_port());
        let log = std::fs::File::create(dir.path().join("etcd.log")).expect("etcd log");
        let child = Command::new("etcd")
            .args(["--name", "t", "--data-dir"])
            .arg(dir.path().join("data"))
            .args(["--listen-client-urls", &url, "--advertise-client-urls", &url])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &format!("t={peer}")])
            .arg("--cert-file")
            .arg(Role::EtcdServer.cert(&certs))
            .arg("--key-file")
            .arg(Role::EtcdServer.key(&certs))
            .arg("--trusted-ca-file")
            .arg(certs.join(cm::CA_CERT))
            .arg("--client-cert-auth")
            .args(["--logger", "zap", "--log-level", "error"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn etcd (run `cargo xtask setup`)");
        let mut etcd = Self {
            child,
            certs,
            url,
            dir,
        };
        let eps = [etcd.url.clone()];
        let certs = etcd.certs.clone();
        eventually("etcd-init on the TLS etcd", TIMEOUT, || {
            let exited = etcd.child.try_wait().ok().flatten();
            let (certs, eps) = (certs.clone(), eps.clone());
            let log = etcd.log();
            async move {
                if let Some(status) = exited {
                    return Err(format!("etcd exited with {status}; log:\n{}", log_tail(&log, 20)));
                }
                cm::etcd_init(&certs, Some(&eps), "fleetmesh")
                    .await
                    .map_err(|e| format!("{e:#}"))
            }
        })
        .await;
        etcd
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    /// A client with one role's certificate of this cluster.
    async fn client(&self, role: Role) -> Client {
        cm::connect_etcd(&self.certs, role, std::slice::from_ref(&self.url))
            .await
            .expect("etcd client")
    }
}

impl Drop for TlsEtcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- etcd log ---\n{}", log_tail(&self.log(), 30));
        }
    }
}

/// A read through a client with these TLS options (None: plain HTTP to the https port's address).
async fn try_read(url: &str, tls: Option<TlsOptions>) -> Result<usize, String> {
    let mut opts = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(Duration::from_secs(3));
    let url = match tls {
        Some(t) => {
            opts = opts.with_tls(t);
            url.to_owned()
        }
        None => url.replace("https://", "http://"),
    };
    let mut c = Client::connect([url], Some(opts))
        .await
        .map_err(|e| e.to_string())?;
    c.get("fleetmesh/", Some(GetOptions::new().with_prefix()))
        .await
        .map(|r| r.kvs().len())
        .map_err(|e| e.to_string())
}

fn read_pem(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn node(cluster: &str, id: u16, i: u8) -> NodeRecord {
    NodeRecord {
        name: format!("{cluster}-node-{i}"),
        cluster: cluster.into(),
        cluster_id: id,
        underlay_ipv4: Ipv4Addr::new(100, 65, u8::try_from(id).unwrap_or(0), i),
        pod_cidrs: vec![format!("10.{id}.{i}.0/24").parse().expect("cidr")],
        wireguard: None,
    }
}

/// What a cluster's apiserver publishes: config, nodes 1..=n, synced marker (written with the apiserver's cert).
async fn publish(etcd: &TlsEtcd, cluster: &str, id: u16, n: u8) {
    let mut c = etcd.client(Role::Apiserver).await;
    let keys = Keys::default();
    let config = ClusterConfig {
        name: cluster.into(),
        id,
        capabilities: vec!["nodes/v1".into()],
        labels: Default::default(),
    };
    c.put(keys.cluster_config(cluster), encode(&config), None)
        .await
        .expect("apiserver writes its cluster config");
    for i in 1..=n {
        c.put(
            keys.node(cluster, &format!("{cluster}-node-{i}")),
            encode(&node(cluster, id, i)),
            None,
        )
        .await
        .expect("apiserver writes a node");
    }
    c.put(
        keys.synced(cluster, mesh_kvstore::kinds::NODES),
        encode(&Synced {
            time_ms: 0,
            count: u64::from(n),
        }),
        None,
    )
    .await
    .expect("apiserver writes the synced marker");
}

/// `manage` for cluster east (id 1) on `config_dir`; aborted on drop.
struct Agent {
    remotes: Remotes,
    _wake: std::sync::mpsc::Receiver<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Agent {
    fn start(config_dir: &Path) -> Self {
        let (wake, wake_rx) = std::sync::mpsc::channel();
        let remotes = Remotes::new(wake);
        let me = LocalNode {
            node: "east-node-1".into(),
            cluster: "east".into(),
            cluster_id: 1,
            labels: Default::default(),
        };
        let task = tokio::spawn(manage(
            config_dir.to_owned(),
            None,
            me,
            Keys::default(),
            remotes.clone(),
        ));
        Self {
            remotes,
            _wake: wake_rx,
            task,
        }
    }

    async fn wait(&self, name: &str, check: impl Fn(&RemoteCluster) -> Result<(), String>) -> RemoteCluster {
        eventually(&format!("remote cluster {name}"), TIMEOUT, || {
            let r = match self.remotes.snapshot().remove(name) {
                Some(rc) => check(&rc)
                    .map(|()| rc.clone())
                    .map_err(|e| format!("{e}; {rc:?}")),
                None => Err(format!("{name} not known")),
            };
            async move { r }
        })
        .await
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn synced_with(rc: &RemoteCluster, nodes: usize) -> Result<(), String> {
    match rc.state {
        SyncState::Synced { .. } if rc.usable && rc.nodes.len() == nodes => Ok(()),
        _ => Err(format!("not synced and usable with {nodes} nodes")),
    }
}

fn refused_with(rc: &RemoteCluster, reason_part: &str) -> Result<(), String> {
    match &rc.state {
        SyncState::Disconnected { reason, .. } if reason.contains(reason_part) => {
            if rc.usable || !rc.nodes.is_empty() || !rc.services.is_empty() {
                Err("refused but its data is kept or used".to_owned())
            } else {
                Ok(())
            }
        }
        _ => Err(format!(
            "not disconnected with a reason containing {reason_part:?}"
        )),
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn clients_without_a_valid_certificate_are_refused() {
    let pki = Pki::new();
    let west = TlsEtcd::start(&pki, "west", 2).await;
    publish(&west, "west", 2, 1).await;
    let ca = read_pem(&west.certs.join(cm::CA_CERT));
    let trust = || TlsOptions::new().ca_certificate(etcd_client::Certificate::from_pem(ca.clone()));

    // The peers' certificate reads (so the refusals below are about the certificates).
    let ok = try_read(
        &west.url,
        Some(trust().identity(etcd_client::Identity::from_pem(
            read_pem(&Role::Remote.cert(&west.certs)),
            read_pem(&Role::Remote.key(&west.certs)),
        ))),
    )
    .await;
    assert_eq!(ok, Ok(3), "the peers' certificate reads config, node and marker");

    let no_cert = try_read(&west.url, Some(trust())).await;
    assert!(
        no_cert.is_err(),
        "a client without a certificate read: {no_cert:?}"
    );

    let plain = try_read(&west.url, None).await;
    assert!(plain.is_err(), "a plain-HTTP client read: {plain:?}");

    let other_pki = Pki::new();
    let foreign = other_pki.cluster("west", 2, 1);
    let other_ca = try_read(
        &west.url,
        Some(trust().identity(etcd_client::Identity::from_pem(
            read_pem(&Role::Remote.cert(&foreign)),
            read_pem(&Role::Remote.key(&foreign)),
        ))),
    )
    .await;
    assert!(
        other_ca.is_err(),
        "a certificate of another CA (same CN) read: {other_ca:?}"
    );

    // Same CA, but another cluster's certificates: no such user in west's etcd.
    let east = pki.cluster("east", 1, 1);
    for role in [Role::Remote, Role::Apiserver, Role::Admin] {
        let r = try_read(
            &west.url,
            Some(trust().identity(etcd_client::Identity::from_pem(
                read_pem(&role.cert(&east)),
                read_pem(&role.key(&east)),
            ))),
        )
        .await;
        assert!(
            r.as_ref()
                .is_err_and(|e| e.to_lowercase().contains("permission denied")
                    || e.to_lowercase().contains("user name not found")),
            "east's {} certificate on west's etcd: {r:?}",
            role.file_stem()
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_peers_user_is_read_only_and_limited_to_the_prefix() {
    let pki = Pki::new();
    let west = TlsEtcd::start(&pki, "west", 2).await;
    publish(&west, "west", 2, 2).await;

    let mut peer = west.client(Role::Remote).await;
    let listed = peer
        .get("fleetmesh/", Some(GetOptions::new().with_prefix()))
        .await
        .expect("the peers' user reads the prefix");
    assert_eq!(listed.kvs().len(), 4, "config, 2 nodes, marker");
    let put = peer.put("fleetmesh/state/nodes/v1/west/evil", "{}", None).await;
    let err = put.expect_err("the peers' user wrote").to_string();
    assert!(
        err.contains("permission denied"),
        "put refused for another reason: {err}"
    );
    let del = peer.delete("fleetmesh/cluster-config/west", None).await;
    let err = del.expect_err("the peers' user deleted").to_string();
    assert!(
        err.contains("permission denied"),
        "delete refused for another reason: {err}"
    );
    let outside = peer.get("other/", Some(GetOptions::new().with_prefix())).await;
    let err = outside
        .expect_err("the peers' user read outside the prefix")
        .to_string();
    assert!(err.contains("permission denied"), "{err}");

    // The cluster's own apiserver writes and deletes; nothing the peer tried happened.
    let mut own = west.client(Role::Apiserver).await;
    own.put("fleetmesh/state/nodes/v1/west/tmp", "{}", None)
        .await
        .expect("the apiserver's user writes");
    own.delete("fleetmesh/state/nodes/v1/west/tmp", None)
        .await
        .expect("the apiserver's user deletes");
    let evil = own
        .get("fleetmesh/state/nodes/v1/west/evil", None)
        .await
        .expect("get");
    assert!(evil.kvs().is_empty(), "the peer's put landed");
    let config = own.get("fleetmesh/cluster-config/west", None).await.expect("get");
    assert_eq!(config.kvs().len(), 1, "the peer's delete landed");

    // etcd-init again (auth on now) is fine.
    cm::etcd_init(&west.certs, Some(std::slice::from_ref(&west.url)), "fleetmesh")
        .await
        .expect("etcd-init is idempotent");
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_syncs_over_tls_and_refuses_a_misnamed_or_duplicate_remote() {
    let pki = Pki::new();
    let east = pki.cluster("east", 1, 1);
    let west = TlsEtcd::start(&pki, "west", 2).await;
    publish(&west, "west", 2, 2).await;
    let config = tempfile::tempdir().expect("tempdir");
    let written = cm::connect(&east, &west.certs, config.path(), false, &cm::Pins::default())
        .expect("connect east to west");
    assert_eq!(written, config.path().join("west"));
    let text = std::fs::read_to_string(&written).expect("config file");
    for key in ["endpoints:", "trusted-ca-file:", "cert-file:", "key-file:"] {
        assert!(text.contains(key), "{key} missing in:\n{text}");
    }

    let agent = Agent::start(config.path());
    agent.wait("west", |rc| synced_with(rc, 2)).await;

    // A file named north pointing at west's etcd: refused, nothing of it kept; west undisturbed.
    std::fs::copy(&written, config.path().join("north")).expect("copy config");
    agent
        .wait("north", |rc| refused_with(rc, "cluster name mismatch"))
        .await;

    // A second cluster with west's id: `connect` refuses it and changes nothing ...
    let dup = TlsEtcd::start(&pki, "south", 2).await;
    publish(&dup, "south", 2, 1).await;
    let err = cm::connect(&east, &dup.certs, config.path(), false, &cm::Pins::default())
        .expect_err("connect accepted a duplicate id")
        .to_string();
    assert!(
        err.contains("id 2") && err.contains("\"west\""),
        "unclear error: {err}"
    );
    assert!(
        !config.path().join("south").exists(),
        "connect wrote a config for the duplicate"
    );
    // ... and an agent given such a config by hand refuses it too.
    let cfg = format!(
        "endpoints: [{}]\ntrusted-ca-file: {}\ncert-file: {}\nkey-file: {}\n",
        dup.url,
        dup.certs.join(cm::CA_CERT).display(),
        Role::Remote.cert(&dup.certs).display(),
        Role::Remote.key(&dup.certs).display()
    );
    std::fs::write(config.path().join("south"), cfg).expect("write config");
    agent
        .wait("south", |rc| {
            refused_with(rc, "already used by remote cluster \"west\"")
        })
        .await;
    let w = agent.remotes.snapshot().remove("west").expect("west");
    synced_with(&w, 2).expect("west stays synced with its nodes");
    assert_eq!(w.syncs, 1, "west was not resynced: {w:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_without_a_client_certificate_is_refused() {
    let pki = Pki::new();
    let west = TlsEtcd::start(&pki, "west", 2).await;
    publish(&west, "west", 2, 1).await;
    let config = tempfile::tempdir().expect("tempdir");
    // Only the CA: the agent can verify the server, but has nothing to show.
    std::fs::write(
        config.path().join("west"),
        format!(
            "endpoints: [{}]\ntrusted-ca-file: {}\n",
            west.url,
            west.certs.join(cm::CA_CERT).display()
        ),
    )
    .expect("write config");
    let agent = Agent::start(config.path());
    let rc = agent
        .wait("west", |rc| match rc.state {
            SyncState::Disconnected { .. } => Ok(()),
            _ => Err("not disconnected".to_owned()),
        })
        .await;
    assert!(rc.nodes.is_empty(), "data read without a certificate: {rc:?}");
}
