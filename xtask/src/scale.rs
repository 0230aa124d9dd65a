//! `cargo xtask bench --only scale`: a synthetic fleet on this machine. Ten clusters, each one real etcd filled
//! the way a clustermesh-apiserver publishes (config, nodes, global services with backends, identities and pod
//! addresses, synced markers) by `mesh-agent/examples/fleet_scale.rs`, without running their pods; one real
//! mesh-agent (release build) with its eBPF datapath in a network namespace made by the bench, whose cluster has
//! the same global services and one real local pod (a network namespace with a veth, as the lab makes them)
//! selected by a MeshNetworkPolicy that admits remote pods labelled `access: granted` on TCP 8080.
//!
//! 1. Small fleet (10 clusters × 10 services × 10 backends = 1,000 remote endpoints): convergence, 200 changes (a
//!    backend added to or removed from a service, cluster by cluster) each timed from the etcd write to the agent
//!    reporting the new number of programmed backends (`GET /v1/summary`, written after the reconcile that
//!    programmed the maps); then a burst of [`Sizes::burst`] changes (each adds a backend) written as fast as the
//!    etcds take them, the agent's CPU time (`/proc/PID/stat`) from the first write until it reports the final
//!    count, per change. The same convergence through KVStoreMesh.
//! 2. Large fleet (10 clusters × 1,000 services × 100 backends = 1,000,000 remote endpoints; 100,000 with
//!    `--quick`): the agent's RSS with the same local services but no remote cluster is the baseline; then a fresh
//!    agent (datapath pins removed, so nothing is adopted) starts with the ten clusters, timed until every remote
//!    cluster is synced and every backend is programmed. RSS per remote endpoint = (RSS − baseline) / endpoints.
//!    Then, on that agent: its CPU over [`Sizes::idle_secs`] with nothing changing (nothing polls it meanwhile);
//!    `GET /metrics` scrapes on the API socket; convergence (the same method as the small fleet, bounded in count
//!    and time); the same burst as on the small fleet (bounded in time); then 100,000 remote identities with one
//!    pod address each (10,000 per cluster, every tenth `access: granted`) and pod relabels, each timed from the
//!    first etcd write until the pinned `IPCACHE_V4` and the local endpoint's `POLICY` table say the new identity
//!    (see `fleet_scale relabel`).
//!
//! Everything runs inside network namespaces made by the bench (etcds on the agent namespace's loopback); they
//! are removed at the end, also on failure, with the processes, the etcd data and the pins.
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
pub(crate) const NODE: &str = "scale-node-1";
/// Changes timed for convergence on the small fleet.
const CHANGES: usize = 200;
/// The local pod the policy selects: its address (inside the node's pod CIDR) and labels.
const POD_IP: &str = "10.240.0.10";
/// Client port of the agent's own cluster's etcd (the KVStoreMesh cache).
const LOCAL_ETCD_PORT: u16 = 24_100;

/// One bench row: (what, value, baseline, ratio, goal as (op, bound)).
pub type ScaleRow = (String, String, String, Option<f64>, Option<(&'static str, f64)>);

/// Processes killed and reaped on drop.
#[derive(Default)]
pub(crate) struct Procs(pub(crate) Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The bench's namespaces (the agent's, and the local pod's) and bpffs pin directory, removed on drop.
pub(crate) struct Sandbox {
    pub(crate) netns: String,
    /// The local pod's namespace, once made.
    pod_netns: Option<String>,
    pub(crate) pins: PathBuf,
}

impl Sandbox {
    pub(crate) fn new() -> Result<Self> {
        let netns = format!("fmscale{}", std::process::id());
        net::ip(&["netns", "add", &netns])?;
        let me = Self {
            pins: PathBuf::from(format!("/sys/fs/bpf/fmscale-{}", std::process::id())),
            netns,
            pod_netns: None,
        };
        net::ip_in(&me.netns, &["link", "set", "lo", "up"])?;
        Ok(me)
    }

    /// Makes the local pod as the lab does: its own namespace with `eth0` (address [`POD_IP`]), the host side of
    /// its veth in the agent's namespace (no address, up). Returns the host side's name.
    pub(crate) fn add_pod(&mut self) -> Result<String> {
        let netns = format!("{}-pod", self.netns);
        net::ip(&["netns", "add", &netns])?;
        self.pod_netns = Some(netns.clone());
        let host = format!("fmsp{}", std::process::id());
        net::ip_in(
            &self.netns,
            &[
                "link", "add", &host, "type", "veth", "peer", "name", "eth0", "netns", &netns,
            ],
        )?;
        net::ip_in(&self.netns, &["link", "set", &host, "up"])?;
        net::ip_in(&netns, &["addr", "add", &format!("{POD_IP}/32"), "dev", "eth0"])?;
        net::ip_in(&netns, &["link", "set", "eth0", "up"])?;
        Ok(host)
    }

    pub(crate) fn remove_pins(&self) {
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
        if let Some(pod) = &self.pod_netns
            && let Err(e) = net::ip(&["netns", "del", pod])
        {
            eprintln!("bench: removing netns {pod}: {e:#}");
        }
        if let Err(e) = net::ip(&["netns", "del", &self.netns]) {
            eprintln!("bench: removing netns {}: {e:#}", self.netns);
        }
    }
}

fn client_port(i: u16) -> u16 {
    24_000 + 2 * i
}

/// Starts `program ARGS` in `netns`, output to `log`. With `FLEETMESH_BENCH_AGENT_WRAPPER` set (e.g. `heaptrack -o
/// /tmp/agent`), agents run under that command (for profiling; their figures are then not comparable).
pub(crate) fn spawn_in(netns: &str, program: &Path, args: &[String], log: &Path) -> Result<Child> {
    let log = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let wrapper: Vec<String> = std::env::var("FLEETMESH_BENCH_AGENT_WRAPPER")
        .ok()
        .filter(|_| program.file_name().is_some_and(|n| n == "mesh-agent"))
        .map(|w| w.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default();
    let mut cmd = match wrapper.split_first() {
        Some((first, rest)) => {
            let mut c = net::in_netns_cmd(netns, Path::new(first));
            c.args(rest).arg(program);
            c
        }
        None => net::in_netns_cmd(netns, program),
    };
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", program.display()))
}

/// `GET /v1/summary` of the agent.
pub(crate) fn summary(socket: &Path) -> Result<Value, String> {
    let mut s = UnixStream::connect(socket).map_err(|e| format!("agent socket: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    write!(s, "GET /v1/summary HTTP/1.0\r\nHost: agent\r\n\r\n").map_err(|e| e.to_string())?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).map_err(|e| e.to_string())?;
    let body = buf.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default();
    serde_json::from_str(body).map_err(|e| format!("summary: {e}"))
}

pub(crate) fn rss_bytes(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")?;
    Ok(kb * 1024)
}

/// The agent's cluster: its node, a namespace, `services` global services named like the fleet's, the local pod
/// (host interface `host_ifname`) and the policy that admits remote pods labelled `access: granted` to it.
pub(crate) fn write_manifests(dir: &Path, services: u32, host_ifname: &str) -> Result<()> {
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
    y.push_str(&format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: scale-server\n  namespace: fleet\n  labels: {{app: scale-server}}\n  annotations: {{fleetmesh.io/host-ifname: {host_ifname}}}\nspec:\n  nodeName: {NODE}\n  containers: [{{name: server, image: none, ports: [{{containerPort: 8080, protocol: TCP}}]}}]\nstatus: {{podIP: {POD_IP}, phase: Running}}\n"
    ));
    y.push_str(
        "---\napiVersion: fleetmesh.io/v1alpha1\nkind: MeshNetworkPolicy\nmetadata: {name: scale-server-from-granted, namespace: fleet}\nspec:\n  podSelector: {matchLabels: {app: scale-server}}\n  policyTypes: [Ingress]\n  ingress:\n    - from: [{podSelector: {matchLabels: {access: granted}}}]\n      ports: [{protocol: TCP, port: 8080}]\n",
    );
    let tmp = dir.join(".fleet.yaml.tmp");
    std::fs::write(&tmp, y)?;
    std::fs::rename(&tmp, dir.join("fleet.yaml"))?;
    Ok(())
}

/// Starts a single-member etcd `name` in `netns`, serving clients on loopback `port` (peers on `port + 1`), its
/// data and log under `root`.
pub(crate) fn start_etcd(netns: &str, etcd: &Path, name: &str, port: u16, root: &Path) -> Result<Child> {
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

/// Established TCP connections of process `pid` in `netns` to any of `peers` (`ADDR:PORT`), as `ss` lists them.
pub(crate) fn connections_to(netns: &str, pid: u32, peers: &[String]) -> Result<usize> {
    let ss = util::run(std::process::Command::new("ip").args([
        "netns",
        "exec",
        netns,
        "ss",
        "-Htnp",
        "state",
        "established",
    ]))?;
    Ok(ss
        .lines()
        .filter(|l| l.contains(&format!("pid={pid},")))
        .filter(|l| {
            let peer = l.split_whitespace().nth(3).unwrap_or_default();
            peers.iter().any(|p| p == peer)
        })
        .count())
}

/// Waits until loopback `port` accepts connections in `netns`.
pub(crate) fn wait_listening(netns: &str, port: u16) -> Result<()> {
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

    /// Runs `fleet_scale` in the agent's namespace with `args`; the JSON line it printed.
    fn driver(&self, args: &[String]) -> Result<Value> {
        let out = util::run(net::in_netns_cmd(&self.sandbox.netns, &self.fleet_bin).args(args))?;
        out.lines()
            .find_map(|l| serde_json::from_str::<Value>(l).ok())
            .with_context(|| {
                format!(
                    "fleet_scale {} printed nothing",
                    args.first().map_or("", String::as_str)
                )
            })
    }

    /// Runs the convergence driver against the agent at `socket` (`changes` changes, at most `max_secs`); the
    /// change times in ms, sorted.
    fn converge(&self, socket: &Path, backends: u32, changes: usize, max_secs: u64) -> Result<Vec<f64>> {
        let v = self.driver(&[
            "converge".into(),
            "--etcd".into(),
            self.urls().join(","),
            "--agent-socket".into(),
            socket.display().to_string(),
            "--changes".into(),
            changes.to_string(),
            "--backends".into(),
            backends.to_string(),
            "--max-secs".into(),
            max_secs.to_string(),
        ])?;
        Ok(sorted(&v["ms"]))
    }

    /// A burst of `changes` backend additions against the agent `pid` at `socket`, waiting at most `max_secs`.
    fn burst(
        &self,
        socket: &Path,
        pid: u32,
        shape: (u32, u32),
        changes: usize,
        max_secs: u64,
    ) -> Result<Burst> {
        let v = self.driver(&[
            "burst".into(),
            "--etcd".into(),
            self.urls().join(","),
            "--agent-socket".into(),
            socket.display().to_string(),
            "--agent-pid".into(),
            pid.to_string(),
            "--changes".into(),
            changes.to_string(),
            "--services".into(),
            shape.0.to_string(),
            "--backends".into(),
            shape.1.to_string(),
            "--max-secs".into(),
            max_secs.to_string(),
        ])?;
        Ok(Burst {
            changes,
            programmed: v["programmed"].as_u64().unwrap_or(0),
            complete: v["complete"].as_bool().unwrap_or(false),
            written_s: v["written_s"].as_f64().unwrap_or(f64::NAN),
            programmed_s: v["programmed_s"].as_f64().unwrap_or(f64::NAN),
            cpu_s: v["cpu_s"].as_f64().unwrap_or(f64::NAN),
        })
    }

    /// Publishes `per_cluster` identities with one pod address each in every cluster.
    fn identities(&self, per_cluster: u32) -> Result<Duration> {
        let started = Instant::now();
        self.each_cluster("identities", |i, url| {
            vec![
                "identities".into(),
                "--etcd".into(),
                url.to_owned(),
                "--cluster".into(),
                format!("c{i}"),
                "--id".into(),
                i.to_string(),
                "--count".into(),
                per_cluster.to_string(),
            ]
        })?;
        Ok(started.elapsed())
    }

    /// Relabels (see `fleet_scale relabel`): grant and revoke times in ms, each sorted.
    fn relabel(&self, per_cluster: u32, changes: usize, max_secs: u64) -> Result<(Vec<f64>, Vec<f64>)> {
        let v = self.driver(&[
            "relabel".into(),
            "--etcd".into(),
            self.urls().join(","),
            "--pins".into(),
            self.sandbox.pins.display().to_string(),
            "--endpoint-ip".into(),
            POD_IP.into(),
            "--identities".into(),
            per_cluster.to_string(),
            "--changes".into(),
            changes.to_string(),
            "--max-secs".into(),
            max_secs.to_string(),
        ])?;
        Ok((sorted(&v["grant_ms"]), sorted(&v["revoke_ms"])))
    }

    /// Runs `fleet_scale` once per cluster, all at once, with the arguments `args(cluster index, etcd url)`.
    fn each_cluster(&self, what: &str, args: impl Fn(u16, &str) -> Vec<String>) -> Result<()> {
        let mut children = Vec::new();
        for (i, url) in (1..=CLUSTERS).zip(self.urls()) {
            let log = self.root.join(format!("{what}-c{i}.log"));
            children.push((
                i,
                spawn_in(&self.sandbox.netns, &self.fleet_bin, &args(i, &url), &log)?,
            ));
        }
        let mut failed = None;
        for (i, mut c) in children {
            let st = c.wait()?;
            if !st.success() && failed.is_none() {
                let log =
                    std::fs::read_to_string(self.root.join(format!("{what}-c{i}.log"))).unwrap_or_default();
                failed = Some(format!("fleet_scale {what} of cluster c{i} failed: {log}"));
            }
        }
        match failed {
            Some(f) => bail!(f),
            None => Ok(()),
        }
    }

    fn fill(&self, services: u32, backends: u32) -> Result<Duration> {
        let started = Instant::now();
        self.each_cluster("fill", |i, url| {
            vec![
                "fill".into(),
                "--etcd".into(),
                url.to_owned(),
                "--cluster".into(),
                format!("c{i}"),
                "--id".into(),
                i.to_string(),
                "--services".into(),
                services.to_string(),
                "--backends".into(),
                backends.to_string(),
            ]
        })?;
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
pub(crate) fn wait_programmed(
    socket: &Path,
    remotes: u64,
    backends: u64,
    timeout: Duration,
) -> Result<Value> {
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

pub(crate) fn pct(sorted: &[f64], p: f64) -> f64 {
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

/// The numbers of a JSON array, sorted.
pub(crate) fn sorted(v: &Value) -> Vec<f64> {
    let mut ms: Vec<f64> = v
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_f64)
        .collect();
    ms.sort_by(f64::total_cmp);
    ms
}

/// What `fleet_scale burst` reported.
struct Burst {
    changes: usize,
    /// Backends the agent reported programmed beyond the count before the burst.
    programmed: u64,
    complete: bool,
    written_s: f64,
    programmed_s: f64,
    cpu_s: f64,
}

impl Burst {
    /// Agent CPU time per programmed change, µs.
    fn us_per_change(&self) -> f64 {
        #[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
        let n = self.programmed.max(1) as f64;
        self.cpu_s * 1e6 / n
    }

    fn describe(&self) -> String {
        format!(
            "{:.0} µs per change ({:.2} s CPU; {} of {} programmed after {:.1} s, written in {:.1} s)",
            self.us_per_change(),
            self.cpu_s,
            self.programmed,
            self.changes,
            self.programmed_s,
            self.written_s
        )
    }
}

/// How much each large-fleet measurement does (smaller with `--quick`).
struct Sizes {
    /// Services per cluster and backends per service of the large fleet.
    services: u32,
    backends: u32,
    /// Convergence changes on the large fleet, and the bound on their total time (s).
    converge: usize,
    converge_secs: u64,
    /// Changes of a burst (on both fleets), and the bound on the wait for the last one (s).
    burst: usize,
    burst_secs: u64,
    /// Seconds of the idle CPU measurement.
    idle_secs: u64,
    /// `/metrics` scrapes.
    scrapes: usize,
    /// Identities (with one pod address each) per cluster, relabels, and the bound on their total time (s).
    identities: u32,
    relabels: usize,
    relabel_secs: u64,
}

impl Sizes {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                services: 100,
                backends: 100,
                converge: 30,
                converge_secs: 30,
                burst: 1_000,
                burst_secs: 60,
                idle_secs: 10,
                scrapes: 10,
                identities: 1_000,
                relabels: 20,
                relabel_secs: 30,
            }
        } else {
            Self {
                services: 1_000,
                backends: 100,
                converge: 100,
                converge_secs: 180,
                burst: 10_000,
                burst_secs: 150,
                idle_secs: 30,
                scrapes: 20,
                identities: 10_000,
                relabels: 100,
                relabel_secs: 300,
            }
        }
    }
}

/// CPU time (user + system, all threads) of process `pid`, in seconds.
pub(crate) fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat.rsplit_once(')').map(|(_, r)| r).context("malformed stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime); `rest` starts at field 3.
    let ticks = |i: usize| -> Result<u64> { f.get(i).and_then(|v| v.parse().ok()).context("malformed stat") };
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    #[expect(clippy::cast_precision_loss, reason = "clock ticks far below 2^52")]
    Ok((ticks(11)? + ticks(12)?) as f64 / hz.max(1) as f64)
}

/// One `GET /metrics` on the agent's API socket: how long from connecting to the end of the answer, and its size.
fn scrape_metrics(socket: &Path) -> Result<(Duration, usize)> {
    let started = Instant::now();
    let mut s = UnixStream::connect(socket).context("agent socket")?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(s, "GET /metrics HTTP/1.0\r\nHost: agent\r\n\r\n")?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let took = started.elapsed();
    let text = String::from_utf8_lossy(&buf);
    anyhow::ensure!(
        text.starts_with("HTTP/1.0 200") || text.starts_with("HTTP/1.1 200"),
        "GET /metrics: {}",
        text.lines().next().unwrap_or_default()
    );
    anyhow::ensure!(
        text.contains("fleetmesh_lb_backends"),
        "GET /metrics has no fleetmesh_lb_backends"
    );
    Ok((took, buf.len()))
}

/// Builds mesh-agent, its fleet_scale example and clustermesh-apiserver (release), in one invocation so that both
/// packages' shared dependencies are built with the same features (two invocations rebuild them for each other
/// every time).
pub(crate) fn build_release() -> Result<()> {
    println!("bench: building mesh-agent, its fleet_scale example and clustermesh-apiserver (release)");
    util::run_status(util::cargo().args([
        "build",
        "--release",
        "-p",
        "mesh-agent",
        "-p",
        "clustermesh-apiserver",
        "--bin",
        "mesh-agent",
        "--bin",
        "clustermesh-apiserver",
        "--example",
        "fleet_scale",
    ]))
}

pub fn run(build: bool, quick: bool, out_dir: &Path) -> Result<Vec<ScaleRow>> {
    if build {
        build_release()?;
    }
    let size = Sizes::new(quick);
    let release = util::workspace_root().join("target").join("release");
    let root = out_dir.join("scale");
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root)?;
    let mut sandbox = Sandbox::new()?;
    let host_ifname = sandbox.add_pod()?;
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

    // 1. Convergence and a burst on a small fleet.
    let (small_services, small_backends) = (10u32, 10u32);
    fleet.fill(small_services, small_backends)?;
    write_manifests(&root.join("manifests"), small_services, &host_ifname)?;
    let (agent, socket) = fleet.start_agent(true, "converge")?;
    let small_pid = agent.id();
    let mut agent = Procs(vec![agent]);
    let expected = u64::from(CLUSTERS) * u64::from(small_services) * u64::from(small_backends);
    wait_programmed(&socket, u64::from(CLUSTERS), expected, Duration::from_secs(60))?;
    let ms = fleet.converge(&socket, small_backends, CHANGES, 300)?;
    let (p50, p99) = (pct(&ms, 0.5), pct(&ms, 0.99));
    println!(
        "  convergence over {} changes: p50 {p50:.1} ms, p99 {p99:.1} ms",
        ms.len()
    );
    rows.push((
        format!("Convergence, backend added/removed in a remote cluster -> programmed in the agent's maps ({} changes, 10 clusters, {expected} remote endpoints; ratio = p99 / 100 ms)", ms.len()),
        format!("p50 {p50:.1} ms, p99 {p99:.1} ms"),
        "100 ms".to_owned(),
        Some(p99 / 100.0),
        Some(("<=", 1.0)),
    ));
    let small_burst = fleet.burst(
        &socket,
        small_pid,
        (small_services, small_backends),
        size.burst,
        size.burst_secs,
    )?;
    println!("  burst of {} changes: {}", size.burst, small_burst.describe());
    drop(agent);

    // 1b. The same convergence through KVStoreMesh: the agent's cluster's clustermesh-apiserver mirrors the ten
    // clusters into the cluster's own etcd, and the agent reads them all from there. The burst's backends go first.
    fleet.fill(small_services, small_backends)?;
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
    let via = fleet.converge(&socket, small_backends, CHANGES, 300)?;
    let (v50, v99) = (pct(&via, 0.5), pct(&via, 0.99));
    // Who holds connections to the ten clusters' etcds now: the agent should hold none, the mirror one each.
    let peer_ports: Vec<String> = (1..=CLUSTERS)
        .map(|i| format!("127.0.0.1:{}", client_port(i)))
        .collect();
    let agent_to_peers = connections_to(&sandbox.netns, agent_pid, &peer_ports)?;
    let mirror_pid = cache.0.last().map_or(0, Child::id);
    let mirror_to_peers = connections_to(&sandbox.netns, mirror_pid, &peer_ports)?;
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
    let (services, backends) = (size.services, size.backends);
    let endpoints = u64::from(CLUSTERS) * u64::from(services) * u64::from(backends);
    println!("bench: filling {CLUSTERS} clusters with {endpoints} endpoints");
    let fill_time = fleet.fill(services, backends)?;
    println!("  filled in {:.1} s", fill_time.as_secs_f64());
    write_manifests(&root.join("manifests"), services, &host_ifname)?;
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
        format!("Bootstrap, agent start -> {endpoints} remote endpoints of 10 clusters synced and programmed (ratio = time / 5 s)"),
        format!("{:.2} s", bootstrap.as_secs_f64()),
        "5 s".to_owned(),
        Some(bootstrap.as_secs_f64() / 5.0),
        Some(("<=", 1.0)),
    ));
    rows.push((
        format!("Agent RSS per remote endpoint ({endpoints} endpoints; ratio = bytes / 512 B)"),
        format!("{per_endpoint:.0} B (RSS {} MiB)", rss >> 20),
        format!("baseline RSS {} MiB", base_rss >> 20),
        Some(per_endpoint / 512.0),
        Some(("<=", 1.0)),
    ));
    rows.push((
        format!(
            "Agent reconcile time with {endpoints} remote endpoints (last pass, as the agent reports it)"
        ),
        format!("{reconcile_ms:.0} ms"),
        String::new(),
        None,
        None,
    ));

    // Idle: nothing changes and nothing polls the agent.
    std::thread::sleep(Duration::from_secs(2));
    let cpu0 = cpu_seconds(full_pid)?;
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(size.idle_secs));
    let idle_pct = (cpu_seconds(full_pid)? - cpu0) / t0.elapsed().as_secs_f64() * 100.0;
    println!("  idle CPU over {} s: {idle_pct:.1}% of one core", size.idle_secs);
    rows.push((
        format!("Agent CPU while nothing changes, {endpoints} remote endpoints ({} s, /proc utime+stime; ratio = % of one core / 1%)", size.idle_secs),
        format!("{idle_pct:.1}% of one core"),
        "1%".to_owned(),
        Some(idle_pct / 1.0),
        Some(("<=", 1.0)),
    ));

    // /metrics scrapes on the API socket.
    let mut scrapes = Vec::new();
    let mut bytes = 0;
    for _ in 0..size.scrapes {
        let (took, n) = scrape_metrics(&full_socket)?;
        scrapes.push(took.as_secs_f64() * 1e3);
        bytes = n;
    }
    scrapes.sort_by(f64::total_cmp);
    let (m50, mmax) = (pct(&scrapes, 0.5), pct(&scrapes, 1.0));
    println!(
        "  /metrics over {} scrapes: median {m50:.1} ms, max {mmax:.1} ms ({bytes} bytes)",
        scrapes.len()
    );
    rows.push((
        format!("GET /metrics on the API socket, {endpoints} remote endpoints ({} scrapes, connect to last byte; ratio = max / 50 ms)", scrapes.len()),
        format!("median {m50:.1} ms, max {mmax:.1} ms ({} KiB)", bytes >> 10),
        "50 ms".to_owned(),
        Some(mmax / 50.0),
        Some(("<=", 1.0)),
    ));

    // Convergence on the large fleet, the same method as on the small one.
    let big = fleet.converge(&full_socket, backends, size.converge, size.converge_secs)?;
    let (b50, b99) = (pct(&big, 0.5), pct(&big, 0.99));
    println!(
        "  convergence at {endpoints} endpoints over {} changes: p50 {b50:.1} ms, p99 {b99:.1} ms",
        big.len()
    );
    let bounded = if big.len() < size.converge {
        format!(
            "; {} of {} changes within the {} s bound",
            big.len(),
            size.converge,
            size.converge_secs
        )
    } else {
        String::new()
    };
    rows.push((
        format!("Convergence with {endpoints} remote endpoints, backend added/removed in a remote cluster -> programmed ({} changes{bounded}; ratio = p99 / 50 ms)", big.len()),
        format!("p50 {b50:.1} ms, p99 {b99:.1} ms"),
        "50 ms".to_owned(),
        Some(b99 / 50.0),
        Some(("<=", 1.0)),
    ));
    rows.push((
        format!(
            "Convergence p99, {endpoints} vs {expected} remote endpoints (same method; ratio = large / small)"
        ),
        format!("p99 {b99:.1} ms"),
        format!("p99 {p99:.1} ms"),
        Some(b99 / p99),
        Some(("<=", 1.5)),
    ));

    // The same burst as on the small fleet.
    let big_burst = fleet.burst(
        &full_socket,
        full_pid,
        (services, backends),
        size.burst,
        size.burst_secs,
    )?;
    println!("  burst of {} changes: {}", size.burst, big_burst.describe());
    let bound = if big_burst.complete {
        String::new()
    } else {
        format!(
            "; bounded: {} of {} programmed within {} s",
            big_burst.programmed, size.burst, size.burst_secs
        )
    };
    rows.push((
        format!(
            "Agent CPU per change, burst of {} backend additions written as fast as etcd takes them, {expected} remote endpoints (CPU time from the first write to the final count / changes)",
            size.burst
        ),
        small_burst.describe(),
        String::new(),
        None,
        None,
    ));
    rows.push((
        format!(
            "Agent CPU per change, the same burst with {endpoints} remote endpoints{bound} (ratio = µs per change at {endpoints} / at {expected}; flat is 1)"
        ),
        big_burst.describe(),
        format!("{:.0} µs per change", small_burst.us_per_change()),
        Some(big_burst.us_per_change() / small_burst.us_per_change()),
        None,
    ));

    // Identities and pod relabels.
    let ids = u64::from(CLUSTERS) * u64::from(size.identities);
    let took = fleet.identities(size.identities)?;
    println!(
        "  {ids} identities with a pod address each published in {:.1} s",
        took.as_secs_f64()
    );
    net::wait_for(
        &format!("the agent to know {ids} identities"),
        Duration::from_secs(300),
        || {
            let s = summary(&full_socket)?;
            let known = s["datapath"]["identities"].as_u64().unwrap_or(0);
            if known >= ids {
                Ok(())
            } else {
                Err(format!("{known} identities known"))
            }
        },
    )?;
    let (grants, revokes) = fleet.relabel(size.identities, size.relabels, size.relabel_secs)?;
    let mut all: Vec<f64> = grants.iter().chain(&revokes).copied().collect();
    all.sort_by(f64::total_cmp);
    let (r50, r99) = (pct(&all, 0.5), pct(&all, 0.99));
    println!(
        "  relabels: {} grants p50 {:.1} / p99 {:.1} ms, {} revokes p50 {:.1} / p99 {:.1} ms",
        grants.len(),
        pct(&grants, 0.5),
        pct(&grants, 0.99),
        revokes.len(),
        pct(&revokes, 0.5),
        pct(&revokes, 0.99)
    );
    let bound = if all.len() < size.relabels {
        format!(
            "; {} of {} relabels within the {} s bound",
            all.len(),
            size.relabels,
            size.relabel_secs
        )
    } else {
        String::new()
    };
    rows.push((
        format!(
            "Pod relabel in a remote cluster -> enforced in this cluster's datapath (pinned IPCACHE_V4 and the local endpoint's POLICY table), {ids} remote identities, {endpoints} remote endpoints ({} relabels{bound}: grants p50 {:.0} / p99 {:.0} ms, revokes {:.0} / {:.0} ms; ratio = p99 / 100 ms)",
            all.len(),
            pct(&grants, 0.5),
            pct(&grants, 0.99),
            pct(&revokes, 0.5),
            pct(&revokes, 0.99)
        ),
        format!("p50 {r50:.1} ms, p99 {r99:.1} ms"),
        "100 ms".to_owned(),
        Some(r99 / 100.0),
        Some(("<=", 1.0)),
    ));
    drop(procs);
    Ok(rows)
}
