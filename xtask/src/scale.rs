//! `cargo xtask bench --only scale`: a synthetic fleet on this machine. Ten clusters, each one real etcd filled
//! the way a clustermesh-apiserver publishes (config, nodes, global services with backends, synced markers) by
//! `mesh-agent/examples/fleet_scale.rs`, without running their pods; one real mesh-agent (release build) with its
//! eBPF datapath in a network namespace made by the bench, whose cluster has the same global services.
//!
//! 1. Convergence: a small fleet (10 clusters × 10 services × 10 backends); 200 changes (a backend added to or
//!    removed from a service, cluster by cluster) each timed from the etcd write to the agent reporting the new
//!    number of programmed backends (`GET /v1/summary`, written after the reconcile that programmed the maps).
//! 2. Bootstrap and memory: the fleet grows to 1,000,000 remote endpoints (10 clusters × 1,000 services × 100
//!    backends; 100,000 with `--quick`). The agent's RSS with the same local services but no remote cluster is the
//!    baseline; then a fresh agent (datapath pins removed, so nothing is adopted) starts with the ten clusters,
//!    timed until every remote cluster is synced and every backend is programmed in the maps. RSS per remote
//!    endpoint = (RSS − baseline) / endpoints.
//!
//! Everything runs inside one network namespace (etcds on its loopback); it is removed at the end, also on
//! failure, with the processes, the etcd data and the pins.
use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use crate::lab::net;
use crate::util;

/// Synthetic clusters.
const CLUSTERS: u16 = 10;
/// Cluster id of the agent's own cluster.
const LOCAL_ID: u16 = 4000;
const NODE: &str = "scale-node-1";
/// Changes timed for convergence.
const CHANGES: usize = 200;
/// Client port of the agent's own cluster's etcd (the KVStoreMesh cache).
const LOCAL_ETCD_PORT: u16 = 24_100;

/// One bench row: (what, value, baseline, ratio, goal as (op, bound)).
pub type ScaleRow = (String, String, String, Option<f64>, Option<(&'static str, f64)>);

/// Processes killed and reaped on drop.
#[derive(Default)]
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The bench's namespace and bpffs pin directory, removed on drop.
struct Sandbox {
    netns: String,
    pins: PathBuf,
}

impl Sandbox {
    fn new() -> Result<Self> {
        let netns = format!("fmscale{}", std::process::id());
        net::ip(&["netns", "add", &netns])?;
        let me = Self {
            pins: PathBuf::from(format!("/sys/fs/bpf/fmscale-{}", std::process::id())),
            netns,
        };
        net::ip_in(&me.netns, &["link", "set", "lo", "up"])?;
        Ok(me)
    }

    fn remove_pins(&self) {
        if self.pins.exists()
            && let Err(e) = std::fs::remove_dir_all(&self.pins)
        {
            eprintln!("bench: removing {}: {e}", self.pins.display());
        }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.remove_pins();
        if let Err(e) = net::ip(&["netns", "del", &self.netns]) {
            eprintln!("bench: removing netns {}: {e:#}", self.netns);
        }
    }
}

fn client_port(i: u16) -> u16 {
    24_000 + 2 * i
}

fn spawn_in(netns: &str, program: &Path, args: &[String], log: &Path) -> Result<Child> {
    let log = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    net::in_netns_cmd(netns, program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", program.display()))
}

/// `GET /v1/summary` of the agent.
fn summary(socket: &Path) -> Result<Value, String> {
    let mut s = UnixStream::connect(socket).map_err(|e| format!("agent socket: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    write!(s, "GET /v1/summary HTTP/1.0\r\nHost: agent\r\n\r\n").map_err(|e| e.to_string())?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).map_err(|e| e.to_string())?;
    let body = buf.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default();
    serde_json::from_str(body).map_err(|e| format!("summary: {e}"))
}

fn rss_bytes(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")?;
    Ok(kb * 1024)
}

/// The agent's cluster: its node, a namespace, and `services` global services named like the fleet's.
fn write_manifests(dir: &Path, services: u32) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut y = format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: {NODE}}}\nspec: {{podCIDR: 10.240.0.0/24}}\nstatus: {{addresses: [{{type: InternalIP, address: 100.100.0.1}}]}}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: fleet}}\n"
    );
    for s in 0..services {
        let ip = std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(198, 19, 0, 0)) + s + 1);
        y.push_str(&format!(
            "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: svc-{s}\n  namespace: fleet\n  annotations: {{service.cilium.io/global: \"true\"}}\nspec:\n  clusterIP: {ip}\n  ports: [{{name: tcp, port: 80, targetPort: 8080, protocol: TCP}}]\n"
        ));
    }
    let tmp = dir.join(".fleet.yaml.tmp");
    std::fs::write(&tmp, y)?;
    std::fs::rename(&tmp, dir.join("fleet.yaml"))?;
    Ok(())
}

/// Starts a single-member etcd `name` in `netns`, serving clients on loopback `port` (peers on `port + 1`), its
/// data and log under `root`.
fn start_etcd(netns: &str, etcd: &Path, name: &str, port: u16, root: &Path) -> Result<Child> {
    let (client, peer) = (
        format!("http://127.0.0.1:{port}"),
        format!("http://127.0.0.1:{}", port + 1),
    );
    let args: Vec<String> = vec![
        "--name".into(),
        name.into(),
        "--data-dir".into(),
        root.join(format!("etcd-{name}")).display().to_string(),
        "--listen-client-urls".into(),
        client.clone(),
        "--advertise-client-urls".into(),
        client,
        "--listen-peer-urls".into(),
        peer.clone(),
        "--initial-advertise-peer-urls".into(),
        peer.clone(),
        "--initial-cluster".into(),
        format!("{name}={peer}"),
        "--log-level".into(),
        "error".into(),
    ];
    spawn_in(netns, etcd, &args, &root.join(format!("etcd-{name}.log")))
}

/// Waits until loopback `port` accepts connections in `netns`.
fn wait_listening(netns: &str, port: u16) -> Result<()> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    net::wait_for(
        &format!("127.0.0.1:{port} to listen"),
        Duration::from_secs(20),
        || {
            net::in_netns(netns, || {
                std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).map(drop)
            })
            .map_err(|e| format!("{e:#}"))?
            .map_err(|e| e.to_string())
        },
    )
}

struct Fleet<'a> {
    sandbox: &'a Sandbox,
    root: PathBuf,
    agent_bin: PathBuf,
    fleet_bin: PathBuf,
}

impl Fleet<'_> {
    fn urls(&self) -> Vec<String> {
        (1..=CLUSTERS)
            .map(|i| format!("http://127.0.0.1:{}", client_port(i)))
            .collect()
    }

    /// Runs the convergence driver against the agent at `socket`; the change times in ms, sorted.
    fn converge(&self, socket: &Path, backends: u32) -> Result<Vec<f64>> {
        let args: Vec<String> = vec![
            "converge".into(),
            "--etcd".into(),
            self.urls().join(","),
            "--agent-socket".into(),
            socket.display().to_string(),
            "--changes".into(),
            CHANGES.to_string(),
            "--backends".into(),
            backends.to_string(),
        ];
        let out = util::run(net::in_netns_cmd(&self.sandbox.netns, &self.fleet_bin).args(&args))?;
        let v: Value = out
            .lines()
            .find_map(|l| serde_json::from_str::<Value>(l).ok())
            .context("fleet_scale converge printed nothing")?;
        let mut ms: Vec<f64> = v["ms"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_f64)
            .collect();
        ms.sort_by(f64::total_cmp);
        Ok(ms)
    }

    fn fill(&self, services: u32, backends: u32) -> Result<Duration> {
        let started = Instant::now();
        let mut children = Vec::new();
        for (i, url) in (1..=CLUSTERS).zip(self.urls()) {
            let args: Vec<String> = [
                "fill",
                "--etcd",
                &url,
                "--cluster",
                &format!("c{i}"),
                "--id",
                &i.to_string(),
                "--services",
                &services.to_string(),
                "--backends",
                &backends.to_string(),
            ]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
            let log = self.root.join(format!("fill-c{i}.log"));
            children.push((i, spawn_in(&self.sandbox.netns, &self.fleet_bin, &args, &log)?));
        }
        for (i, mut c) in children {
            let st = c.wait()?;
            if !st.success() {
                let log =
                    std::fs::read_to_string(self.root.join(format!("fill-c{i}.log"))).unwrap_or_default();
                bail!("filling cluster c{i} failed: {log}");
            }
        }
        Ok(started.elapsed())
    }

    /// A clustermesh config directory: every synthetic cluster, directly or through the local KVStoreMesh cache.
    fn peer_dir(&self, tag: &str, via_cache: bool) -> Result<PathBuf> {
        let mesh = self.root.join(format!("clustermesh-{tag}"));
        let _ = std::fs::remove_dir_all(&mesh);
        std::fs::create_dir_all(&mesh)?;
        for (i, url) in (1..=CLUSTERS).zip(self.urls()) {
            let text = if via_cache {
                format!(
                    "endpoints: [\"http://127.0.0.1:{LOCAL_ETCD_PORT}\"]\nprefix: fleetmesh/kvstoremesh/c{i}\n"
                )
            } else {
                format!("endpoints: [\"{url}\"]\n")
            };
            std::fs::write(mesh.join(format!("c{i}")), text)?;
        }
        Ok(mesh)
    }

    /// Starts an agent with (or without) the remote clusters; its pins are removed first (a cold start).
    fn start_agent(&self, with_remotes: bool, tag: &str) -> Result<(Child, PathBuf)> {
        self.start_agent_via(with_remotes, false, tag)
    }

    fn start_agent_via(&self, with_remotes: bool, via_cache: bool, tag: &str) -> Result<(Child, PathBuf)> {
        self.sandbox.remove_pins();
        let mesh = if with_remotes {
            self.peer_dir(tag, via_cache)?
        } else {
            let empty = self.root.join(format!("clustermesh-{tag}"));
            let _ = std::fs::remove_dir_all(&empty);
            std::fs::create_dir_all(&empty)?;
            empty
        };
        let socket = self.root.join(format!("agent-{tag}.sock"));
        let args: Vec<String> = [
            "--node-name",
            NODE,
            "--cluster-name",
            "local",
            "--cluster-id",
            &LOCAL_ID.to_string(),
            "--manifests",
            &self.root.join("manifests").display().to_string(),
            "--clustermesh-config",
            &mesh.display().to_string(),
            "--api-socket",
            &socket.display().to_string(),
            "--bpf-pin-dir",
            &self.sandbox.pins.display().to_string(),
            "--state-dir",
            &self.root.join("state").display().to_string(),
            "--log",
            "warn",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        let log = self.root.join(format!("agent-{tag}.log"));
        let child = spawn_in(&self.sandbox.netns, &self.agent_bin, &args, &log)?;
        Ok((child, socket))
    }
}

/// Waits until the agent at `socket` has `remotes` synced remote clusters and `backends` programmed backends.
fn wait_programmed(socket: &Path, remotes: u64, backends: u64, timeout: Duration) -> Result<Value> {
    net::wait_for(
        &format!("the agent to sync {remotes} clusters and program {backends} backends"),
        timeout,
        || {
            let s = summary(socket)?;
            let synced = s["remoteClustersSynced"].as_u64().unwrap_or(0);
            let programmed = s["datapath"]["backends"].as_u64().unwrap_or(0);
            if synced == remotes && programmed == backends && s["reconciles"].as_u64().unwrap_or(0) > 0 {
                Ok(s)
            } else {
                Err(format!("{synced} synced, {programmed} backends programmed"))
            }
        },
    )
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "an index into the list"
    )]
    let i = ((sorted.len().max(1) as f64 - 1.0) * p).round() as usize;
    sorted
        .get(i.min(sorted.len().saturating_sub(1)))
        .copied()
        .unwrap_or(f64::NAN)
}

pub fn run(build: bool, quick: bool, out_dir: &Path) -> Result<Vec<ScaleRow>> {
    if build {
        println!("bench: building mesh-agent (release) and its fleet_scale example");
        util::run_status(util::cargo().args([
            "build",
            "--release",
            "-p",
            "mesh-agent",
            "--bin",
            "mesh-agent",
            "--example",
            "fleet_scale",
        ]))?;
        util::run_status(util::cargo().args(["build", "--release", "-p", "clustermesh-apiserver"]))?;
    }
    let release = util::workspace_root().join("target").join("release");
    let root = out_dir.join("scale");
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root)?;
    let sandbox = Sandbox::new()?;
    let fleet = Fleet {
        sandbox: &sandbox,
        root: root.clone(),
        agent_bin: release.join("mesh-agent"),
        fleet_bin: release.join("examples").join("fleet_scale"),
    };
    let mut procs = Procs::default();
    let etcd = util::which("etcd").context("etcd is missing (cargo xtask setup installs etcd-server)")?;
    for i in 1..=CLUSTERS {
        procs.0.push(start_etcd(
            &sandbox.netns,
            &etcd,
            &format!("c{i}"),
            client_port(i),
            &root,
        )?);
    }
    for i in 1..=CLUSTERS {
        wait_listening(&sandbox.netns, client_port(i))?;
    }
    let mut rows = Vec::new();

    // 1. Convergence on a small fleet.
    let (small_services, small_backends) = (10u32, 10u32);
    fleet.fill(small_services, small_backends)?;
    write_manifests(&root.join("manifests"), small_services)?;
    let (agent, socket) = fleet.start_agent(true, "converge")?;
    let mut agent = Procs(vec![agent]);
    let expected = u64::from(CLUSTERS) * u64::from(small_services) * u64::from(small_backends);
    wait_programmed(&socket, u64::from(CLUSTERS), expected, Duration::from_secs(60))?;
    let ms = fleet.converge(&socket, small_backends)?;
    let (p50, p99) = (pct(&ms, 0.5), pct(&ms, 0.99));
    println!(
        "  convergence over {} changes: p50 {p50:.1} ms, p99 {p99:.1} ms",
        ms.len()
    );
    rows.push((
        format!("Convergence, backend added/removed in a remote cluster -> programmed in the agent's maps ({} changes, 10 clusters; ratio = p99 / 100 ms)", ms.len()),
        format!("p50 {p50:.1} ms, p99 {p99:.1} ms"),
        "100 ms".to_owned(),
        Some(p99 / 100.0),
        Some(("<=", 1.0)),
    ));
    drop(agent);

    // 1b. The same through KVStoreMesh: the agent's cluster's clustermesh-apiserver mirrors the ten clusters into
    // the cluster's own etcd, and the agent reads them all from there.
    let mut cache = Procs(vec![start_etcd(
        &sandbox.netns,
        &etcd,
        "local",
        LOCAL_ETCD_PORT,
        &root,
    )?]);
    wait_listening(&sandbox.netns, LOCAL_ETCD_PORT)?;
    let mirror_dir = fleet.peer_dir("kvstoremesh-apiserver", false)?;
    let apiserver_args: Vec<String> = vec![
        "--cluster-name".into(),
        "local".into(),
        "--cluster-id".into(),
        LOCAL_ID.to_string(),
        "--manifests".into(),
        root.join("manifests").display().to_string(),
        "--etcd-endpoints".into(),
        format!("http://127.0.0.1:{LOCAL_ETCD_PORT}"),
        "--kvstoremesh-config".into(),
        mirror_dir.display().to_string(),
        "--log".into(),
        "warn".into(),
    ];
    cache.0.push(spawn_in(
        &sandbox.netns,
        &release.join("clustermesh-apiserver"),
        &apiserver_args,
        &root.join("apiserver.log"),
    )?);
    let (agent_child, socket) = fleet.start_agent_via(true, true, "kvstoremesh")?;
    let agent_pid = agent_child.id();
    agent = Procs(vec![agent_child]);
    wait_programmed(&socket, u64::from(CLUSTERS), expected, Duration::from_secs(60))?;
    let via = fleet.converge(&socket, small_backends)?;
    let (v50, v99) = (pct(&via, 0.5), pct(&via, 0.99));
    // Who holds connections to the ten clusters' etcds now: the agent should hold none, the mirror one each.
    let ss = util::run(std::process::Command::new("ip").args([
        "netns",
        "exec",
        &sandbox.netns,
        "ss",
        "-Htnp",
        "state",
        "established",
    ]))?;
    let peer_ports: Vec<String> = (1..=CLUSTERS)
        .map(|i| format!("127.0.0.1:{}", client_port(i)))
        .collect();
    let to_peers = |pid: u32| {
        ss.lines()
            .filter(|l| l.contains(&format!("pid={pid},")))
            .filter(|l| {
                let peer = l.split_whitespace().nth(3).unwrap_or_default();
                peer_ports.iter().any(|p| p == peer)
            })
            .count()
    };
    let agent_to_peers = to_peers(agent_pid);
    let mirror_pid = cache.0.last().map_or(0, Child::id);
    let mirror_to_peers = to_peers(mirror_pid);
    println!(
        "  through KVStoreMesh: p50 {v50:.1} ms, p99 {v99:.1} ms; connections to the 10 peers' etcds: agent {agent_to_peers}, cache {mirror_to_peers}"
    );
    rows.push((
        format!(
            "Convergence through KVStoreMesh (remote etcd -> mirror -> local etcd -> agent; {} changes; ratio = p99 / 100 ms)",
            via.len()
        ),
        format!("p50 {v50:.1} ms, p99 {v99:.1} ms"),
        format!("direct p50 {p50:.1} ms, p99 {p99:.1} ms"),
        Some(v99 / 100.0),
        Some(("<=", 1.0)),
    ));
    rows.push((
        "Connections to the 10 peers' etcds: per agent, direct vs through KVStoreMesh".to_owned(),
        format!("KVStoreMesh: agent {agent_to_peers}, the cluster's mirror {mirror_to_peers}"),
        format!("direct: {CLUSTERS} per agent"),
        None,
        None,
    ));
    drop(agent);
    drop(cache);

    // 2. Bootstrap and memory at scale.
    let (services, backends) = if quick {
        (100u32, 100u32)
    } else {
        (1000u32, 100u32)
    };
    let endpoints = u64::from(CLUSTERS) * u64::from(services) * u64::from(backends);
    println!("bench: filling {CLUSTERS} clusters with {endpoints} endpoints");
    let fill_time = fleet.fill(services, backends)?;
    println!("  filled in {:.1} s", fill_time.as_secs_f64());
    write_manifests(&root.join("manifests"), services)?;
    let (base_agent, base_socket) = fleet.start_agent(false, "baseline")?;
    let base_pid = base_agent.id();
    agent = Procs(vec![base_agent]);
    net::wait_for(
        "the baseline agent's first reconcile",
        Duration::from_secs(60),
        || {
            let s = summary(&base_socket)?;
            if s["datapath"]["frontends"].as_u64().unwrap_or(0) >= u64::from(services) {
                Ok(())
            } else {
                Err("frontends not programmed yet".to_owned())
            }
        },
    )?;
    let base_rss = rss_bytes(base_pid)?;
    drop(agent);

    let started = Instant::now();
    let (full_agent, full_socket) = fleet.start_agent(true, "bootstrap")?;
    let full_pid = full_agent.id();
    let _agent = Procs(vec![full_agent]);
    let s = wait_programmed(
        &full_socket,
        u64::from(CLUSTERS),
        endpoints,
        Duration::from_secs(300),
    )?;
    let bootstrap = started.elapsed();
    let rss = rss_bytes(full_pid)?;
    #[expect(clippy::cast_precision_loss, reason = "byte counts far below 2^52")]
    let per_endpoint = rss.saturating_sub(base_rss) as f64 / endpoints as f64;
    let reconcile_ms = s["datapath"]["reconcileUs"].as_f64().unwrap_or(f64::NAN) / 1e3;
    println!(
        "  bootstrap {:.2} s; RSS {} MiB (baseline {} MiB): {per_endpoint:.0} B per remote endpoint; last reconcile {reconcile_ms:.0} ms",
        bootstrap.as_secs_f64(),
        rss >> 20,
        base_rss >> 20
    );
    rows.push((
        format!("Bootstrap, agent start -> {endpoints} remote endpoints of 10 clusters synced and programmed (ratio = time / 10 s)"),
        format!("{:.2} s", bootstrap.as_secs_f64()),
        "10 s".to_owned(),
        Some(bootstrap.as_secs_f64() / 10.0),
        Some(("<=", 1.0)),
    ));
    rows.push((
        format!("Agent RSS per remote endpoint ({endpoints} endpoints; ratio = bytes / 1 KiB)"),
        format!("{per_endpoint:.0} B (RSS {} MiB)", rss >> 20),
        format!("baseline RSS {} MiB", base_rss >> 20),
        Some(per_endpoint / 1024.0),
        Some(("<=", 1.0)),
    ));
    rows.push((
        format!("Agent reconcile time with {endpoints} remote endpoints (one pass over every service)"),
        format!("{reconcile_ms:.0} ms"),
        String::new(),
        None,
        None,
    ));
    drop(procs);
    Ok(rows)
}
