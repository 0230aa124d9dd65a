//! `cargo xtask bench --only fleet`, the fleet hub part (issue #16): a synthetic fleet of [`CLUSTERS`] clusters ×
//! [`ENDPOINTS`] endpoints in one fleet hub, a real 3-member etcd cluster on the loopback of a network namespace
//! made by the bench. The clusters' records are written the way clustermesh-apiservers publish them with
//! `--hub-config` (below `fleetmesh/clusters/<c>/`) by `mesh-agent/examples/fleet_scale.rs fill-hub`; one real
//! mesh-agent (release build) with its eBPF datapath, in a cluster of the fleet, reads all of them from the hub
//! through one shared etcd client. Measured:
//!
//! 1. the agent's RSS without peers (the baseline), then a fresh agent's bootstrap: start → every cluster synced
//!    and every remote backend programmed; its RSS per remote endpoint; its TCP connections to the hub; its CPU
//!    while nothing changes;
//! 2. convergence: [`CHANGES`] backend changes spread over the fleet, each timed from the hub write to the agent
//!    reporting the new count (`fleet_scale converge --hub`); the hub members' CPU per change meanwhile, their RSS
//!    and the hub's DB size;
//! 3. membership selectors (`--peer-selector`): one picking none (what the peer files cost, reported), then
//!    `group: g7` picking 10 of the clusters: RSS share vs all (goal), the same above the picking-none agent
//!    (reported), and a selector change at run time (10 clusters out, 10 in) timed until synced.
//!
//! The first [`REAL`] clusters are published by real clustermesh-apiserver processes (release build) started at
//! once, each from manifests (one node, the same services and backends, pods with identities) into one shared
//! etcd of their own and, with `--hub-config`, into the hub.
//!
//! Everything runs inside the bench's namespace; processes, etcd data and pins are removed at the end, also on
//! failure.
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use serde_json::Value;

use crate::lab::net;
use crate::scale::{self, Procs, Sandbox, ScaleRow};
use crate::util;

/// Clusters of the synthetic fleet, and their ids (`FIRST` ..): ids above 100 keep their pod CIDRs
/// (`fleet_scale`'s `base(id)`) clear of the agent's own node CIDR (10.240.0.0/24).
const CLUSTERS: u16 = 1_000;
const FIRST: u16 = 101;
/// Services per cluster and backends per service: 1,000 endpoints per cluster.
const SERVICES: u32 = 100;
const BACKENDS: u32 = 10;
const ENDPOINTS: u64 = CLUSTERS as u64 * SERVICES as u64 * BACKENDS as u64;
/// Nodes per synthetic cluster (their /16 pod CIDRs must cover the convergence driver's extra backend,
/// `base(id) + 500,001`).
const NODES: u32 = 8;
/// Clusters (the first ids) published by real clustermesh-apiserver processes rather than by `fill-hub`.
const REAL: u16 = 100;
/// Client port of the etcd the real apiservers use as their own (one for all, each under its cluster's keys).
const OWN_ETCD_PORT: u16 = 24_610;
/// Convergence changes, and the bound on their total time (s).
const CHANGES: usize = 200;
const CHANGES_SECS: u64 = 240;
/// Client ports of the hub's members (peer port = client port + 1).
const HUB_PORTS: [u16; 3] = [24_600, 24_602, 24_604];
/// Id of the agent's own cluster.
const LOCAL_ID: u16 = 4_000;

fn hub_urls() -> Vec<String> {
    HUB_PORTS
        .iter()
        .map(|p| format!("http://127.0.0.1:{p}"))
        .collect()
}

/// Starts hub member `i` (0-based) of the 3-member hub.
fn start_member(netns: &str, etcd: &Path, i: usize, root: &Path) -> Result<Child> {
    let name = format!("hub-{}", i + 1);
    let cluster: Vec<String> = HUB_PORTS
        .iter()
        .enumerate()
        .map(|(j, p)| format!("hub-{}=http://127.0.0.1:{}", j + 1, p + 1))
        .collect();
    let (client, peer) = (
        format!("http://127.0.0.1:{}", HUB_PORTS[i]),
        format!("http://127.0.0.1:{}", HUB_PORTS[i] + 1),
    );
    let args: Vec<String> = [
        "--name",
        &name,
        "--data-dir",
        &root.join(format!("etcd-{name}")).display().to_string(),
        "--listen-client-urls",
        &client,
        "--advertise-client-urls",
        &client,
        "--listen-peer-urls",
        &peer,
        "--initial-advertise-peer-urls",
        &peer,
        "--initial-cluster",
        &cluster.join(","),
        "--initial-cluster-state",
        "new",
        "--initial-cluster-token",
        "fleet-hub-bench",
        "--quota-backend-bytes",
        "8589934592",
        "--log-level",
        "error",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    scale::spawn_in(netns, etcd, &args, &root.join(format!("etcd-{name}.log")))
}

/// The bench's peer files: one per cluster, the hub's members as endpoints, the cluster's hub prefix, its id and
/// labels pinned (as `meshctl clustermesh hub connect --pin-id` writes them after `hub join --label`).
fn peer_dir(root: &Path) -> Result<PathBuf> {
    let dir = root.join("clustermesh");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let eps = hub_urls()
        .iter()
        .map(|u| format!("\"{u}\""))
        .collect::<Vec<_>>()
        .join(", ");
    for id in FIRST..FIRST + CLUSTERS {
        std::fs::write(
            dir.join(format!("c{id}")),
            format!(
                "endpoints: [{eps}]\nprefix: fleetmesh/clusters/c{id}\ncluster-id: {id}\ncluster-labels: {{group: g{}}}\n",
                id % 100
            ),
        )?;
    }
    Ok(dir)
}

/// The address `fleet_scale` gives backend `k` of cluster `id` (`base(id) + k + 1`, base = 10.0.0.0 + id·2^19).
fn backend_ip(id: u16, k: u32) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(10, 0, 0, 0)) + (u32::from(id) << 19) + k + 1)
}

/// A real cluster's manifests: one node, the fleet's [`SERVICES`] global services and their [`BACKENDS`] pods
/// each, at the addresses `fill-hub` would have given them.
fn real_manifests(id: u16) -> String {
    use std::fmt::Write as _;
    let node = format!("c{id}-node-0");
    let mut y = format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: {node}}}\nspec: {{podCIDR: {}/16}}\nstatus: {{addresses: [{{type: InternalIP, address: 100.{}.{}.1}}]}}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: fleet}}\n",
        backend_ip(id, 0)
            .to_string()
            .rsplit_once('.')
            .map_or(String::new(), |(a, _)| format!("{a}.0")),
        66 + id / 256,
        id % 256
    );
    for s in 0..SERVICES {
        let _ = write!(
            y,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{s}, namespace: fleet, annotations: {{service.cilium.io/global: \"true\"}}}}\nspec: {{selector: {{app: svc-{s}}}, ports: [{{name: tcp, port: 80, targetPort: 8080, protocol: TCP}}]}}\n"
        );
        for b in 0..BACKENDS {
            let k = s * BACKENDS + b;
            let _ = write!(
                y,
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: p-{k}, namespace: fleet, labels: {{app: svc-{s}}}}}\nspec: {{nodeName: {node}, containers: [{{name: c, ports: [{{containerPort: 8080, protocol: TCP}}]}}]}}\nstatus: {{podIP: {}, phase: Running}}\n",
                backend_ip(id, k)
            );
        }
    }
    y
}

/// Starts the real clustermesh-apiservers of clusters `FIRST .. FIRST + REAL`, each publishing its manifests
/// into the shared own etcd and, with `--hub-config`, into the hub under its prefix.
fn start_apiservers(bench: &Bench<'_>, apiserver: &Path) -> Result<Vec<Child>> {
    let hub_eps = hub_urls()
        .iter()
        .map(|u| format!("\"{u}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let mut out = Vec::new();
    for id in FIRST..FIRST + REAL {
        let dir = bench.root.join(format!("apiserver-c{id}"));
        std::fs::create_dir_all(dir.join("manifests"))?;
        std::fs::write(dir.join("manifests").join("all.yaml"), real_manifests(id))?;
        let hub_config = dir.join("hub-config.yaml");
        std::fs::write(
            &hub_config,
            format!("endpoints: [{hub_eps}]\nprefix: fleetmesh/clusters/c{id}\n"),
        )?;
        let args: Vec<String> = vec![
            "--cluster-name".into(),
            format!("c{id}"),
            "--cluster-id".into(),
            id.to_string(),
            "--cluster-label".into(),
            format!("group=g{}", id % 100),
            "--manifests".into(),
            dir.join("manifests").display().to_string(),
            "--etcd-endpoints".into(),
            format!("http://127.0.0.1:{OWN_ETCD_PORT}"),
            "--hub-config".into(),
            hub_config.display().to_string(),
            "--log".into(),
            "warn".into(),
        ];
        out.push(scale::spawn_in(
            &bench.sandbox.netns,
            apiserver,
            &args,
            &dir.join("apiserver.log"),
        )?);
    }
    Ok(out)
}

/// How many of the real clusters have published their services into the hub (their synced marker).
fn real_published(netns: &str, etcdctl: &Path) -> Result<usize, String> {
    let out = util::run(net::in_netns_cmd(netns, etcdctl).args([
        "--endpoints",
        &hub_urls()[0],
        "get",
        "--prefix",
        "fleetmesh/clusters/",
        "--keys-only",
    ]))
    .map_err(|e| format!("{e:#}"))?;
    Ok((FIRST..FIRST + REAL)
        .filter(|id| {
            let key = format!("fleetmesh/clusters/c{id}/synced/c{id}/services");
            out.lines().any(|l| l == key)
        })
        .count())
}

struct Bench<'a> {
    sandbox: &'a Sandbox,
    root: PathBuf,
    agent_bin: PathBuf,
    fleet_bin: PathBuf,
}

impl Bench<'_> {
    /// Starts an agent reading the peers of `peers` (none: an empty directory), with the membership selector file
    /// `selector`; a cold start (its pins removed first).
    fn start_agent(
        &self,
        tag: &str,
        peers: Option<&Path>,
        selector: Option<&Path>,
    ) -> Result<(Child, PathBuf)> {
        self.sandbox.remove_pins();
        let empty = self.root.join("clustermesh-empty");
        std::fs::create_dir_all(&empty)?;
        let socket = self.root.join(format!("agent-{tag}.sock"));
        let mut args: Vec<String> = [
            "--node-name",
            scale::NODE,
            "--cluster-name",
            "local",
            "--cluster-id",
            &LOCAL_ID.to_string(),
            "--manifests",
            &self.root.join("manifests").display().to_string(),
            "--clustermesh-config",
            &peers.unwrap_or(&empty).display().to_string(),
            "--api-socket",
            &socket.display().to_string(),
            "--bpf-pin-dir",
            &self.sandbox.pins.display().to_string(),
            "--state-dir",
            &self.root.join("state").display().to_string(),
            "--encryption",
            "off",
            "--log",
            "warn",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        if let Some(sel) = selector {
            args.extend(["--peer-selector".to_owned(), sel.display().to_string()]);
        }
        let log = self.root.join(format!("agent-{tag}.log"));
        let child = scale::spawn_in(&self.sandbox.netns, &self.agent_bin, &args, &log)?;
        Ok((child, socket))
    }

    /// The RSS of an agent that holds no peer's records (`tag`, `peers`, `selector` as [`Self::start_agent`]): once
    /// its first reconcile programmed this cluster's frontends and its selector leaves `left_out` peers out; the
    /// agent is stopped after.
    fn settled_rss(
        &self,
        tag: &str,
        peers: Option<&Path>,
        selector: Option<&Path>,
        left_out: u64,
    ) -> Result<u64> {
        let (child, socket) = self.start_agent(tag, peers, selector)?;
        let pid = child.id();
        let _agent = Procs(vec![child]);
        net::wait_for(
            &format!("the {tag} agent's first reconcile"),
            Duration::from_secs(60),
            || {
                let s = scale::summary(&socket)?;
                let out = s["peerSelection"]["unselected"].as_u64().unwrap_or(0);
                let frontends = s["datapath"]["frontends"].as_u64().unwrap_or(0);
                if out == left_out && frontends >= u64::from(SERVICES) {
                    Ok(())
                } else {
                    Err(format!("{out} peers left out, {frontends} frontends"))
                }
            },
        )?;
        scale::rss_bytes(pid)
    }

    /// `fleet_scale ARGS` in the bench's namespace; the JSON line it printed.
    fn driver(&self, args: &[String]) -> Result<Value> {
        let out = util::run(net::in_netns_cmd(&self.sandbox.netns, &self.fleet_bin).args(args))?;
        out.lines()
            .find_map(|l| serde_json::from_str::<Value>(l).ok())
            .with_context(|| format!("fleet_scale {} printed nothing", args.join(" ")))
    }

    /// The remote clusters the agent at `socket` has synced, by name.
    fn synced(socket: &Path) -> Result<Vec<String>, String> {
        let s = scale::summary(socket)?;
        Ok(s["clusters"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| c["own"] != true && c["state"]["state"] == "synced")
            .filter_map(|c| c["name"].as_str().map(str::to_owned))
            .collect())
    }
}

/// Established TCP connections of process `pid` in `netns` to the hub's client ports.
fn hub_connections(netns: &str, pid: u32) -> Result<usize> {
    let ports: Vec<String> = HUB_PORTS.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    scale::connections_to(netns, pid, &ports)
}

/// `fleet_scale CMD` on the synthetic clusters in the hub (those after the real ones: the real clusters' records
/// are their apiservers' to write), with the further arguments `rest`.
fn on_synthetic(cmd: &str, rest: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = vec![
        cmd.into(),
        "--hub".into(),
        "--etcd".into(),
        hub_urls().join(","),
        "--clusters".into(),
        (CLUSTERS - REAL).to_string(),
        "--first".into(),
        (FIRST + REAL).to_string(),
    ];
    args.extend(rest.iter().map(|a| (*a).to_owned()));
    args
}

/// The hub's DB size (bytes) as its first member reports it.
fn hub_db_size(netns: &str, etcdctl: &Path) -> Result<u64> {
    let out = util::run(net::in_netns_cmd(netns, etcdctl).args([
        "--endpoints",
        &hub_urls()[0],
        "endpoint",
        "status",
        "-w",
        "json",
    ]))?;
    let v: Value = serde_json::from_str(&out).context("etcdctl endpoint status")?;
    v[0]["Status"]["dbSize"]
        .as_u64()
        .context("endpoint status without dbSize")
}

#[expect(clippy::cast_precision_loss, reason = "counts and byte sizes far below 2^52")]
fn per(n: u64, d: u64) -> f64 {
    n as f64 / d.max(1) as f64
}

#[expect(clippy::too_many_lines, reason = "one measurement after the other, in order")]
pub fn run(out_dir: &Path) -> Result<Vec<ScaleRow>> {
    let release = util::workspace_root().join("target").join("release");
    let root = out_dir.join("hub");
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root)?;
    let mut sandbox = Sandbox::new()?;
    let host_ifname = sandbox.add_pod()?;
    let bench = Bench {
        sandbox: &sandbox,
        root: root.clone(),
        agent_bin: release.join("mesh-agent"),
        fleet_bin: release.join("examples").join("fleet_scale"),
    };
    let etcd = util::which("etcd").context("etcd is missing (cargo xtask setup installs etcd-server)")?;
    let etcdctl =
        util::which("etcdctl").context("etcdctl is missing (cargo xtask setup installs etcd-client)")?;
    let mut hub = Procs::default();
    for i in 0..HUB_PORTS.len() {
        hub.0.push(start_member(&sandbox.netns, &etcd, i, &root)?);
    }
    for p in HUB_PORTS {
        scale::wait_listening(&sandbox.netns, p)?;
    }
    // The hub's three members (the own etcd of the real apiservers, started later, is not the hub).
    let hub_pids: Vec<u32> = hub.0.iter().map(Child::id).collect();
    let mut rows = Vec::new();

    println!(
        "bench: filling the hub with {} synthetic clusters × {} endpoints",
        CLUSTERS - REAL,
        SERVICES * BACKENDS
    );
    let started = Instant::now();
    bench.driver(&on_synthetic(
        "fill-hub",
        &[
            "--services",
            &SERVICES.to_string(),
            "--backends",
            &BACKENDS.to_string(),
            "--nodes",
            &NODES.to_string(),
        ],
    ))?;
    println!("  filled in {:.1} s", started.elapsed().as_secs_f64());
    // Their heartbeats, kept fresh as their apiservers would (agents judge hub peers by them).
    let _heartbeats = Procs(vec![scale::spawn_in(
        &sandbox.netns,
        &bench.fleet_bin,
        &on_synthetic("heartbeats", &["--for-secs", "1800"]),
        &root.join("heartbeats.log"),
    )?]);
    // The first REAL clusters: real clustermesh-apiservers publishing concurrently.
    hub.0.push(scale::start_etcd(
        &sandbox.netns,
        &etcd,
        "own",
        OWN_ETCD_PORT,
        &root,
    )?);
    scale::wait_listening(&sandbox.netns, OWN_ETCD_PORT)?;
    let started = Instant::now();
    let apiservers = Procs(start_apiservers(&bench, &release.join("clustermesh-apiserver"))?);
    net::wait_for(
        &format!("{REAL} clustermesh-apiservers to publish into the hub"),
        Duration::from_secs(300),
        || {
            let n = real_published(&sandbox.netns, &etcdctl)?;
            if n == usize::from(REAL) {
                Ok(())
            } else {
                Err(format!("{n} published"))
            }
        },
    )?;
    let published = started.elapsed();
    let api_pid = apiservers.0.first().map_or(0, Child::id);
    let api_conns = hub_connections(&sandbox.netns, api_pid)?;
    println!(
        "  {REAL} real apiservers published {} endpoints each in {:.1} s; one of them holds {api_conns} connection(s) to the hub",
        SERVICES * BACKENDS,
        published.as_secs_f64()
    );
    rows.push((
        format!("Hub: {REAL} real clustermesh-apiservers started at once, each publishing 1 node, {SERVICES} global services and {} pods (with identities and pod addresses) into the hub -> all published", SERVICES * BACKENDS),
        format!("{:.1} s", published.as_secs_f64()),
        String::new(),
        None,
        None,
    ));
    scale::write_manifests(&root.join("manifests"), SERVICES, &host_ifname)?;
    let peers = peer_dir(&root)?;

    // 1. Baseline, bootstrap, memory, connections, idle CPU.
    let base_rss = bench.settled_rss("baseline", None, None, 0)?;

    let started = Instant::now();
    let (full, socket) = bench.start_agent("bootstrap", Some(&peers), None)?;
    let pid = full.id();
    let agent = Procs(vec![full]);
    let s = scale::wait_programmed(&socket, u64::from(CLUSTERS), ENDPOINTS, Duration::from_secs(300))?;
    let bootstrap = started.elapsed();
    let rss = scale::rss_bytes(pid)?;
    let per_endpoint = per(rss.saturating_sub(base_rss), ENDPOINTS);
    let reconcile_ms = s["datapath"]["reconcileUs"].as_f64().unwrap_or(f64::NAN) / 1e3;
    let conns = hub_connections(&sandbox.netns, pid)?;
    println!(
        "  bootstrap {:.2} s; RSS {} MiB (baseline {} MiB): {per_endpoint:.0} B per remote endpoint; {conns} connection(s) to the hub",
        bootstrap.as_secs_f64(),
        rss >> 20,
        base_rss >> 20
    );
    rows.push((
        format!("Hub: agent bootstrap, start -> {CLUSTERS} clusters synced from a 3-member hub and {ENDPOINTS} remote endpoints programmed (ratio = time / 10 s)"),
        format!("{:.2} s (last reconcile {reconcile_ms:.0} ms)", bootstrap.as_secs_f64()),
        "10 s".to_owned(),
        Some(bootstrap.as_secs_f64() / 10.0),
        Some(("<=", 1.0)),
    ));
    rows.push((
        format!("Hub: agent RSS per remote endpoint ({CLUSTERS} clusters, {ENDPOINTS} endpoints; ratio = bytes / 512 B)"),
        format!("{per_endpoint:.0} B (RSS {} MiB)", rss >> 20),
        format!("baseline RSS {} MiB", base_rss >> 20),
        Some(per_endpoint / 512.0),
        Some(("<=", 1.0)),
    ));
    let pairwise = u64::from(CLUSTERS) * u64::from(CLUSTERS - 1);
    rows.push((
        format!("Hub: connections for {CLUSTERS} clusters: per agent (measured, ss) / per cluster to the hub / fleet-wide, vs pairwise KVStoreMesh (mirrors to every peer)"),
        format!("{conns} per agent / {api_conns} per apiserver (measured) + 1 per agent / {CLUSTERS} × (1 + agents) = O(N)"),
        format!("KVStoreMesh: {} per cluster, {pairwise} fleet-wide = O(N²)", CLUSTERS - 1),
        Some(per(u64::try_from(conns)?, 1)),
        Some(("<=", 1.0)),
    ));
    std::thread::sleep(Duration::from_secs(2));
    let cpu0 = scale::cpu_seconds(pid)?;
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(20));
    let idle_pct = (scale::cpu_seconds(pid)? - cpu0) / t0.elapsed().as_secs_f64() * 100.0;
    println!("  idle CPU over 20 s: {idle_pct:.1}% of one core");
    rows.push((
        format!("Hub: agent CPU while nothing changes, {CLUSTERS} peers over one hub connection (20 s; ratio = % of one core / 1%)"),
        format!("{idle_pct:.1}% of one core"),
        "1%".to_owned(),
        Some(idle_pct),
        Some(("<=", 1.0)),
    ));

    // 2. Convergence over the fleet, and what the hub spends on it.
    let hub_cpu0: f64 = hub_pids
        .iter()
        .map(|p| scale::cpu_seconds(*p).unwrap_or(0.0))
        .sum();
    let v = bench.driver(&on_synthetic(
        "converge",
        &[
            "--spread",
            "7",
            "--agent-socket",
            &socket.display().to_string(),
            "--changes",
            &CHANGES.to_string(),
            "--backends",
            &BACKENDS.to_string(),
            "--max-secs",
            &CHANGES_SECS.to_string(),
        ],
    ))?;
    let hub_cpu: f64 = hub_pids
        .iter()
        .map(|p| scale::cpu_seconds(*p).unwrap_or(0.0))
        .sum::<f64>()
        - hub_cpu0;
    let ms = scale::sorted(&v["ms"]);
    let (p50, p99) = (scale::pct(&ms, 0.5), scale::pct(&ms, 0.99));
    println!(
        "  convergence over {} changes: p50 {p50:.1} ms, p99 {p99:.1} ms",
        ms.len()
    );
    let bounded = if ms.len() < CHANGES {
        format!("; {} of {CHANGES} within the {CHANGES_SECS} s bound", ms.len())
    } else {
        String::new()
    };
    rows.push((
        format!("Hub: backend change in any of {CLUSTERS} clusters -> programmed in the agent ({} changes spread over the fleet{bounded}, {ENDPOINTS} remote endpoints; ratio = p99 / 100 ms)", ms.len()),
        format!("p50 {p50:.1} ms, p99 {p99:.1} ms"),
        "100 ms".to_owned(),
        Some(p99 / 100.0),
        Some(("<=", 1.0)),
    ));
    let hub_rss: u64 = hub_pids.iter().map(|p| scale::rss_bytes(*p).unwrap_or(0)).sum();
    let db = hub_db_size(&sandbox.netns, &etcdctl)?;
    // A change is written twice (the timed one, and the untimed one that undoes it).
    let writes = u64::try_from(ms.len() * 2)?;
    let cpu_ms = hub_cpu * 1e3 / per(writes, 1);
    println!(
        "  hub: RSS {} MiB over 3 members, DB {} MiB, CPU {cpu_ms:.2} ms per change (3 members)",
        hub_rss >> 20,
        db >> 20
    );
    rows.push((
        format!("Hub etcd for {CLUSTERS} clusters × 1,000 endpoints: RSS (3 members), DB size, CPU per change (all members, during the changes above)"),
        format!("RSS {} MiB, DB {} MiB, {cpu_ms:.2} ms CPU per change", hub_rss >> 20, db >> 20),
        String::new(),
        None,
        None,
    ));
    drop(agent);

    // 3. Membership selectors. First one that picks no cluster: what the 1,000 peer files and the selector cost
    // without any peer's records (reported, to split the 10 clusters' figure into fixed cost and endpoints).
    let selector = root.join("peer-selector.yaml");
    std::fs::write(&selector, "matchLabels: {group: none}\n")?;
    let none_rss = bench.settled_rss(
        "selector-none",
        Some(&peers),
        Some(&selector),
        u64::from(CLUSTERS),
    )?;
    // Then 10 of the 1,000 clusters, then 10 others at run time.
    std::fs::write(&selector, "matchLabels: {group: g7}\n")?;
    let (sel_agent, sel_socket) = bench.start_agent("selector", Some(&peers), Some(&selector))?;
    let sel_pid = sel_agent.id();
    let agent = Procs(vec![sel_agent]);
    let picked = u64::from(CLUSTERS / 100);
    let picked_endpoints = picked * u64::from(SERVICES * BACKENDS);
    scale::wait_programmed(&sel_socket, picked, picked_endpoints, Duration::from_secs(120))?;
    let sel_rss = scale::rss_bytes(sel_pid)?;
    let share = per(sel_rss.saturating_sub(base_rss), rss.saturating_sub(base_rss));
    let held = scale::summary(&sel_socket).map_err(anyhow::Error::msg)?["remoteClusters"]
        .as_u64()
        .unwrap_or(0);
    println!(
        "  selector group=g7: {held} clusters held, RSS {} MiB: {share:.4} of the all-peers share",
        sel_rss >> 20
    );
    rows.push((
        format!("Hub: agent RSS above the baseline with a membership selector picking {picked} of {CLUSTERS} clusters vs all (ratio = selected / all; the endpoints' share is 0.01)"),
        format!("{} MiB above baseline, {held} clusters held", sel_rss.saturating_sub(base_rss) >> 20),
        format!("all: {} MiB above baseline", rss.saturating_sub(base_rss) >> 20),
        Some(share),
        Some(("<=", 0.02)),
    ));
    let fixed = none_rss.saturating_sub(base_rss);
    let endpoints_share = per(sel_rss.saturating_sub(none_rss), rss.saturating_sub(none_rss));
    println!(
        "  selector picking none: {} MiB above baseline; the 10 clusters' share above that: {endpoints_share:.4}",
        fixed >> 20
    );
    rows.push((
        format!("Hub: agent RSS with a selector picking none of {CLUSTERS} clusters (peer files, selector; no connection, no records) -> the 10 clusters' share above it (ratio = (selected - none) / (all - none))"),
        format!("{} MiB above baseline; selected: {} MiB above it", fixed >> 20, sel_rss.saturating_sub(none_rss) >> 20),
        format!("all: {} MiB above it", rss.saturating_sub(none_rss) >> 20),
        Some(endpoints_share),
        None,
    ));
    let started = Instant::now();
    let tmp = root.join(".peer-selector.tmp");
    std::fs::write(&tmp, "matchLabels: {group: g8}\n")?;
    std::fs::rename(&tmp, &selector)?;
    net::wait_for("the selector change", Duration::from_secs(60), || {
        let names = Bench::synced(&sel_socket)?;
        let now = scale::summary(&sel_socket)?;
        let ok = names.len() == usize::try_from(picked).unwrap_or(0)
            && names.iter().all(|n| n.ends_with('8'))
            && now["datapath"]["backends"].as_u64() == Some(picked_endpoints);
        if ok {
            Ok(())
        } else {
            Err(format!("synced {names:?}"))
        }
    })?;
    let swap = started.elapsed();
    println!(
        "  selector changed to group=g8: 10 out, 10 in, programmed in {:.2} s",
        swap.as_secs_f64()
    );
    rows.push((
        format!("Hub: membership selector changed at run time ({picked} clusters out, {picked} in, {picked_endpoints} endpoints programmed; file re-read every second)"),
        format!("{:.2} s", swap.as_secs_f64()),
        String::new(),
        None,
        None,
    ));
    drop(agent);
    drop(apiservers);
    drop(hub);
    Ok(rows)
}
