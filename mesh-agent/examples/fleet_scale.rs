//! Synthetic fleet for `cargo xtask bench --only scale`: fills real etcds with generated clusters (config, nodes,
//! global services with backends, identities and pod addresses, synced markers) the way clustermesh-apiservers
//! publish them, without running their pods; and measures how fast changes in those clusters reach a running
//! agent's datapath, and what they cost the agent.
//!
//! `fleet_scale fill --etcd URL --cluster NAME --id ID --services S --backends B [--nodes N]`: one cluster. Its
//! backends are `base(ID) + k` (`base` = 10.0.0.0 + ID·2^19, so up to 512k per cluster), port 8080, service `s`
//! named `svc-<s>` in namespace `fleet` with backends `s·B .. (s+1)·B`.
//!
//! `fleet_scale fill-hub --etcd URL,... --clusters N --services S --backends B [--nodes K] [--first F]`: clusters
//! `c<F>` .. `c<F+N-1>` (ids as in their names) into one fleet hub, each below `fleetmesh/clusters/c<id>/` as a
//! clustermesh-apiserver with `--hub-config` publishes, labelled `group: g<id mod 100>`.
//!
//! `fleet_scale heartbeats --hub --etcd URL,... --clusters N [--first F] [--every-secs S] [--for-secs T]`: keeps
//! those clusters' heartbeats fresh (every S s, default 10, for at most T s), as their apiservers would.
//!
//! `fleet_scale identities --etcd URL --cluster NAME --id ID --count N`: N identities of one cluster (numbers
//! 256 .. 256+N), each with one pod address (`base(ID) + 300,000 + k`, on node `k mod 8`); identity `k`'s labels
//! are `app: w<k>`, `access: granted` for every tenth (`k mod 10 = 0`), else `access: denied`, in namespace
//! `fleet`; then the identities and ips synced markers.
//!
//! `fleet_scale converge --etcd URL,... --agent-socket PATH --changes N --backends B [--max-secs T]`: N changes,
//! cluster by cluster in turn: a new backend is added to (then, next change, removed from) `fleet/svc-0` of that
//! cluster; each change is timed from just before the etcd write until the agent's `GET /v1/summary` reports the
//! new number of programmed backends (the summary is written after the reconcile that programmed the maps). Stops
//! early after T seconds (default: no bound); then removes the backends still added (untimed). Prints one JSON
//! line `{"kind":"converge","ms":[...]}`. With `--hub --clusters N [--first F] [--spread K]` the clusters are those
//! of `fill-hub` in the hub at `--etcd`, change `j` going to the `(j·K mod N)`-th.
//!
//! `fleet_scale burst --etcd URL,... --agent-socket PATH --agent-pid PID --changes N --services S --backends B
//! [--max-secs T]`: N changes written as fast as the etcds take them (the clusters in parallel, up to 64 writes in
//! flight per cluster; a key is never written twice at once), each adding one new backend to a service (change
//! `j`: cluster `j mod C`, its services in turn); then waits (polling the summary every 10 ms) until the agent
//! reports N more programmed backends, or T seconds. The agent's CPU time (`/proc/PID/stat` utime + stime) is read
//! just before the first write and when the count is reached. Prints `{"kind":"burst",...}`.
//!
//! `fleet_scale relabel --etcd URL,... --pins DIR --endpoint-ip IP --identities N --changes M [--max-secs T]`: M
//! pod relabels, cluster by cluster in turn, of the pod of identity 257 (`access: denied` at first) of each
//! cluster, alternating grant (`access: granted`) and revoke (`access: denied`). A relabel is what the pod's
//! clustermesh-apiserver publishes when a pod's labels change to a label set without an identity: a new identity
//! record (the next free number), the pod's ip record naming it, and the deletion of the pod's old identity
//! (which no pod uses any more; the apiserver's GC grace is left out). Timed from just before the first write
//! until the datapath enforces it, read from the agent's pinned maps under `DIR`: `IPCACHE_V4` gives the pod's
//! address the new identity, and the policy table of the local endpoint `IP` (`ENDPOINTS_V4` → `POLICY`) has an
//! ingress TCP 8080 entry for the new identity (grant) or none (revoke), and none for the old one. Prints
//! `{"kind":"relabel","grant_ms":[...],"revoke_ms":[...]}`.
use std::io::{Read as _, Write as _};
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use etcd_client::Client;
use mesh_common::{
    IpcacheEntry, LocalEndpoint, PolicyEntry, PolicyKey, identity, maps, policy_dir, policy_flags, proto,
};
use mesh_kvstore::{
    BackendRecord, ClusterConfig, IdentityRecord, IpRecord, Keys, NodeRecord, PortRecord, ServiceRecord,
    Synced, encode,
};
use mesh_model::Protocol;
use mesh_model::identity::{
    LABEL_CLUSTER, LABEL_NAMESPACE, LABEL_NAMESPACE_LABELS_PREFIX, NAMESPACE_NAME_LABEL,
};

const NAMESPACE: &str = "fleet";
const PORT: u16 = 8080;
/// Backend index of the backend the convergence changes add and remove.
const EXTRA_BACKEND: u32 = 500_000;
/// Backend index of the first backend a burst adds (above every service's own backends).
const BURST_BACKENDS: u32 = 200_000;
/// Address index of the first pod address `identities` publishes (above the burst's backends).
const POD_ADDRESSES: u32 = 300_000;
/// Most identities (and pod addresses) `identities` publishes per cluster.
const MAX_IDENTITIES: u32 = 100_000;
/// Index of the identity (and pod) each cluster's relabels start from (`access: denied`).
const RELABEL_POD: u32 = 1;
/// Nodes per cluster (`fill --nodes` default); pod `k` runs on node `k mod NODES`.
const NODES: u32 = 8;
/// Largest time one change may take before the run fails.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(30);

fn base(id: u16) -> u32 {
    u32::from(Ipv4Addr::new(10, 0, 0, 0)) + (u32::from(id) << 19)
}

fn port() -> PortRecord {
    PortRecord {
        name: "tcp".into(),
        port: PORT,
        protocol: Protocol::Tcp,
    }
}

fn service(cluster: &str, id: u16, s: u32, backends: impl Iterator<Item = u32>) -> ServiceRecord {
    ServiceRecord {
        mcs: None,
        cluster: cluster.to_owned(),
        cluster_id: id,
        namespace: NAMESPACE.into(),
        name: format!("svc-{s}"),
        ports: vec![PortRecord {
            name: "tcp".into(),
            port: 80,
            protocol: Protocol::Tcp,
        }],
        backends: backends
            .map(|k| BackendRecord {
                ipv4: Ipv4Addr::from(base(id) + k + 1),
                ports: vec![port()].into(),
                weight: 1,
            })
            .collect(),
    }
}

fn now_ms() -> u64 {
    u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis(),
    )
    .unwrap_or(0)
}

struct Args(Vec<String>);

impl Args {
    fn get(&self, flag: &str) -> Result<String> {
        let i = self
            .0
            .iter()
            .position(|a| a == flag)
            .with_context(|| format!("missing {flag}"))?;
        self.0
            .get(i + 1)
            .cloned()
            .with_context(|| format!("{flag} needs a value"))
    }

    fn num<T: std::str::FromStr>(&self, flag: &str, default: Option<T>) -> Result<T> {
        match (self.get(flag), default) {
            (Ok(v), _) => v
                .parse()
                .map_err(|_| anyhow::anyhow!("{flag}: {v:?} is not a number")),
            (Err(_), Some(d)) => Ok(d),
            (Err(e), None) => Err(e),
        }
    }
}

async fn fill(args: &Args) -> Result<()> {
    let url = args.get("--etcd")?;
    let cluster = args.get("--cluster")?;
    let id: u16 = args.num("--id", None)?;
    let services: u32 = args.num("--services", None)?;
    let backends: u32 = args.num("--backends", None)?;
    let nodes: u32 = args.num("--nodes", Some(NODES))?;
    let c = Client::connect([url.as_str()], None)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    let keys = Keys::new(mesh_kvstore::DEFAULT_PREFIX);
    let shape = Shape {
        services,
        backends,
        nodes,
    };
    fill_cluster(&c, &keys, &cluster, id, shape, &std::collections::BTreeMap::new()).await?;
    println!(
        "{}",
        serde_json::json!({"kind": "fill", "cluster": cluster, "services": services, "backends": services * backends})
    );
    Ok(())
}

/// What `fill` publishes per cluster.
#[derive(Clone, Copy)]
struct Shape {
    services: u32,
    backends: u32,
    nodes: u32,
}

/// The labels `fill-hub` gives cluster `c<id>`: `group: g<id mod 100>` (a selector on one group picks 10 of 1,000).
fn hub_labels(id: u16) -> std::collections::BTreeMap<String, String> {
    [("group".to_owned(), format!("g{}", id % 100))].into()
}

/// `fill-hub --etcd URL,... --clusters N --services S --backends B [--nodes K] [--first I]`: clusters `c<I>` ..
/// `c<I+N-1>` (ids as in their names) into a fleet hub, each below `fleetmesh/clusters/c<id>/` as its
/// clustermesh-apiserver publishes with `--hub-config`, labelled as [`hub_labels`]; up to 16 clusters at once.
async fn fill_hub(args: &Args) -> Result<()> {
    let urls: Vec<String> = args.get("--etcd")?.split(',').map(str::to_owned).collect();
    let clusters: u16 = args.num("--clusters", None)?;
    let first: u16 = args.num("--first", Some(1))?;
    let shape = Shape {
        services: args.num("--services", None)?,
        backends: args.num("--backends", None)?,
        nodes: args.num("--nodes", Some(NODES))?,
    };
    let c = Client::connect(urls.clone(), None)
        .await
        .with_context(|| format!("connecting to {urls:?}"))?;
    let hub = Keys::new(mesh_kvstore::DEFAULT_PREFIX);
    let mut pending = Vec::new();
    for id in first..first.saturating_add(clusters) {
        let (c, keys) = (c.clone(), Keys::new(&hub.hub_cluster_prefix(&format!("c{id}"))));
        pending.push(tokio::spawn(async move {
            fill_cluster(&c, &keys, &format!("c{id}"), id, shape, &hub_labels(id)).await
        }));
        if pending.len() >= 16 {
            for p in pending.drain(..) {
                p.await??;
            }
        }
    }
    for p in pending.drain(..) {
        p.await??;
    }
    println!(
        "{}",
        serde_json::json!({"kind": "fill-hub", "clusters": clusters, "backends": u64::from(clusters) * u64::from(shape.services * shape.backends)})
    );
    Ok(())
}

/// Publishes one cluster (config, nodes, services, synced markers) under `keys`.
async fn fill_cluster(
    c: &Client,
    keys: &Keys,
    cluster: &str,
    id: u16,
    shape: Shape,
    labels: &std::collections::BTreeMap<String, String>,
) -> Result<()> {
    let Shape {
        services,
        backends,
        nodes,
    } = shape;
    anyhow::ensure!(
        u64::from(services) * u64::from(backends) < (1 << 19) - 1,
        "at most 512k backends per cluster"
    );
    let mut c = c.clone();
    c.put(
        keys.cluster_config(cluster),
        encode(&ClusterConfig {
            name: cluster.to_owned(),
            id,
            capabilities: vec![
                "nodes/v1".into(),
                "services/v1".into(),
                "identities/v1".into(),
                "ip/v1".into(),
            ],
            labels: labels.clone(),
        }),
        None,
    )
    .await?;
    for k in 0..nodes {
        let name = format!("{cluster}-node-{k}");
        let rec = NodeRecord {
            name: name.clone(),
            cluster: cluster.to_owned(),
            cluster_id: id,
            underlay_ipv4: Ipv4Addr::new(
                100,
                66 + u8::try_from(id / 256).unwrap_or(0),
                u8::try_from(id % 256).unwrap_or(0),
                u8::try_from(k + 1).unwrap_or(1),
            ),
            pod_cidrs: vec![format!("{}/16", Ipv4Addr::from(base(id) + (k << 16))).parse()?],
            wireguard: None,
        };
        c.put(keys.node(cluster, &name), encode(&rec), None).await?;
    }
    c.put(
        keys.synced(cluster, mesh_kvstore::kinds::NODES),
        encode(&Synced {
            time_ms: now_ms(),
            count: u64::from(nodes),
        }),
        None,
    )
    .await?;
    // Services in parallel batches (one connection; etcd pipelines the requests).
    let mut pending = Vec::new();
    for s in 0..services {
        let rec = service(cluster, id, s, s * backends..(s + 1) * backends);
        let key = keys.service(cluster, NAMESPACE, &rec.name);
        let mut client = c.clone();
        pending.push(tokio::spawn(
            async move { client.put(key, encode(&rec), None).await },
        ));
        if pending.len() >= 64 {
            for p in pending.drain(..) {
                p.await??;
            }
        }
    }
    for p in pending.drain(..) {
        p.await??;
    }
    c.put(
        keys.synced(cluster, mesh_kvstore::kinds::SERVICES),
        encode(&Synced {
            time_ms: now_ms(),
            count: u64::from(services),
        }),
        None,
    )
    .await?;
    Ok(())
}

/// `GET /v1/summary` of the agent.
fn summary(socket: &Path) -> Result<serde_json::Value> {
    let mut s = UnixStream::connect(socket).with_context(|| format!("connecting to {}", socket.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    // Without the per-cluster list: its size grows with the fleet, and the drivers poll often.
    write!(s, "GET /v1/summary?clusters=none HTTP/1.0\r\nHost: agent\r\n\r\n")?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let body = buf.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default();
    serde_json::from_str(body).context("summary is not JSON")
}

/// The agent's number of programmed backends (`GET /v1/summary`).
fn programmed_backends(socket: &Path) -> Result<u64> {
    summary(socket)?["datapath"]["backends"]
        .as_u64()
        .context("summary without datapath.backends")
}

/// The clusters a driver writes to: each with its client and key layout. Either one etcd per cluster (`--etcd
/// URL,...`, cluster `c<i>` in the i-th, default layout) or a fleet hub (`--hub --etcd URL,... --clusters N`:
/// clusters `c<F>` .. `c<F+N-1>` with `--first F` (default 1), each below `fleetmesh/clusters/c<id>/`, one client). With `--spread K` a driver's
/// change `j` goes to cluster `1 + (j * K) mod N` (K coprime to N spreads changes over the fleet).
struct Targets {
    clients: Vec<Client>,
    keys: Vec<Keys>,
    spread: usize,
    /// Id of the first cluster (`--first`, hub mode; else 1).
    first: u16,
}

impl Targets {
    async fn of(args: &Args) -> Result<Self> {
        let urls: Vec<String> = args.get("--etcd")?.split(',').map(str::to_owned).collect();
        let spread = args.num("--spread", Some(1))?;
        if args.0.iter().any(|a| a == "--hub") {
            let n: u16 = args.num("--clusters", None)?;
            let first: u16 = args.num("--first", Some(1))?;
            let c = Client::connect(urls.clone(), None)
                .await
                .with_context(|| format!("connecting to {urls:?}"))?;
            let hub = Keys::new(mesh_kvstore::DEFAULT_PREFIX);
            return Ok(Self {
                clients: vec![c],
                keys: (first..first.saturating_add(n))
                    .map(|i| Keys::new(&hub.hub_cluster_prefix(&format!("c{i}"))))
                    .collect(),
                spread,
                first,
            });
        }
        Ok(Self {
            keys: vec![Keys::new(mesh_kvstore::DEFAULT_PREFIX); urls.len()],
            clients: connect_all(&urls).await?,
            spread,
            first: 1,
        })
    }

    fn len(&self) -> usize {
        self.keys.len()
    }

    /// The cluster index change `j` goes to.
    fn pick(&self, j: usize) -> usize {
        (j * self.spread) % self.len()
    }

    /// Cluster `i`'s client, keys and id (`first + i`).
    fn get(&self, i: usize) -> (&Client, &Keys, u16) {
        let client = self.clients.get(i).unwrap_or(&self.clients[0]);
        let id = u16::try_from(i)
            .ok()
            .and_then(|i| self.first.checked_add(i))
            .unwrap_or(u16::MAX);
        (client, &self.keys[i], id)
    }
}

/// `heartbeats --hub --etcd URL,... --clusters N [--first F] [--every-secs S] [--for-secs T]`: writes every
/// cluster's heartbeat every S seconds (default 10, as a clustermesh-apiserver does) for T seconds (default 3600),
/// so that agents judging hub peers by their heartbeat's age see the synthetic clusters alive.
async fn heartbeats(args: &Args) -> Result<()> {
    let targets = Targets::of(args).await?;
    let every = Duration::from_secs(args.num("--every-secs", Some(10))?);
    let until = Instant::now() + Duration::from_secs(args.num("--for-secs", Some(3600))?);
    let mut tick = tokio::time::interval(every);
    while Instant::now() < until {
        tick.tick().await;
        let mut pending = Vec::new();
        for i in 0..targets.len() {
            let (client, keys, id) = targets.get(i);
            let (mut c, key) = (client.clone(), keys.heartbeat(&format!("c{id}")));
            let hb = encode(&mesh_kvstore::Heartbeat { time_ms: now_ms() });
            pending.push(tokio::spawn(async move { c.put(key, hb, None).await }));
            if pending.len() >= 64 {
                for p in pending.drain(..) {
                    p.await??;
                }
            }
        }
        for p in pending.drain(..) {
            p.await??;
        }
    }
    Ok(())
}

async fn connect_all(urls: &[String]) -> Result<Vec<Client>> {
    let mut clients = Vec::new();
    for u in urls {
        clients.push(
            Client::connect([u.as_str()], None)
                .await
                .with_context(|| format!("connecting to {u}"))?,
        );
    }
    Ok(clients)
}

/// CPU time (user + system, all threads) process `pid` has used, in seconds (`/proc/PID/stat`).
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the command name (which may contain spaces) start at field 3 (state); utime and stime are
    // fields 14 and 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).context("malformed stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<u64> { f.get(i).and_then(|v| v.parse().ok()).context("malformed stat") };
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    #[expect(clippy::cast_precision_loss, reason = "clock ticks far below 2^52")]
    Ok((ticks(11)? + ticks(12)?) as f64 / hz.max(1) as f64)
}

/// Address of pod `k` of cluster `id` (as `identities` publishes it).
fn pod_ip(id: u16, k: u32) -> Ipv4Addr {
    Ipv4Addr::from(base(id) + POD_ADDRESSES + k)
}

/// The identity labels of pod `k` of `cluster` with `access` granted or not.
fn pod_labels(cluster: &str, k: u32, granted: bool) -> std::collections::BTreeMap<String, String> {
    [
        ("app".to_owned(), format!("w{k}")),
        (
            "access".to_owned(),
            if granted { "granted" } else { "denied" }.to_owned(),
        ),
        (LABEL_NAMESPACE.to_owned(), NAMESPACE.to_owned()),
        (
            format!("{LABEL_NAMESPACE_LABELS_PREFIX}{NAMESPACE_NAME_LABEL}"),
            NAMESPACE.to_owned(),
        ),
        (LABEL_CLUSTER.to_owned(), cluster.to_owned()),
    ]
    .into_iter()
    .collect()
}

fn identity_record(cluster: &str, id: u16, number: u32, k: u32, granted: bool) -> IdentityRecord {
    IdentityRecord {
        cluster: cluster.to_owned(),
        cluster_id: id,
        identity: identity::compose(id, number),
        labels: pod_labels(cluster, k, granted),
    }
}

fn ip_record(cluster: &str, id: u16, k: u32, number: u32) -> IpRecord {
    IpRecord {
        ipv4: pod_ip(id, k),
        cluster: cluster.to_owned(),
        identity: identity::compose(id, number),
        namespace: NAMESPACE.into(),
        pod: format!("w{k}"),
        node: format!("{cluster}-node-{}", k % NODES),
        named_ports: vec![],
    }
}

async fn identities(args: &Args) -> Result<()> {
    let url = args.get("--etcd")?;
    let cluster = args.get("--cluster")?;
    let id: u16 = args.num("--id", None)?;
    let count: u32 = args.num("--count", None)?;
    anyhow::ensure!(
        count <= MAX_IDENTITIES,
        "at most {MAX_IDENTITIES} identities per cluster"
    );
    let c = Client::connect([url.as_str()], None)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    let keys = Keys::new(mesh_kvstore::DEFAULT_PREFIX);
    // Identities before the addresses that name them (the apiserver's key order), 64 writes in flight.
    for kind in [0, 1] {
        let mut pending = Vec::new();
        for k in 0..count {
            let number = identity::FIRST_ALLOCATED + k;
            let (key, value) = if kind == 0 {
                (
                    keys.identity(&cluster, number),
                    encode(&identity_record(&cluster, id, number, k, k.is_multiple_of(10))),
                )
            } else {
                (
                    keys.ip(&cluster, pod_ip(id, k)),
                    encode(&ip_record(&cluster, id, k, number)),
                )
            };
            let mut client = c.clone();
            pending.push(tokio::spawn(async move { client.put(key, value, None).await }));
            if pending.len() >= 64 {
                for p in pending.drain(..) {
                    p.await??;
                }
            }
        }
        for p in pending.drain(..) {
            p.await??;
        }
    }
    for kind in [mesh_kvstore::kinds::IDENTITIES, mesh_kvstore::kinds::IPS] {
        c.clone()
            .put(
                keys.synced(&cluster, kind),
                encode(&Synced {
                    time_ms: now_ms(),
                    count: u64::from(count),
                }),
                None,
            )
            .await?;
    }
    println!(
        "{}",
        serde_json::json!({"kind": "identities", "cluster": cluster, "identities": count})
    );
    Ok(())
}

async fn converge(args: &Args) -> Result<()> {
    let socket = PathBuf::from(args.get("--agent-socket")?);
    let changes: usize = args.num("--changes", Some(200))?;
    let backends: u32 = args.num("--backends", None)?;
    let bound = Duration::from_secs(args.num("--max-secs", Some(u64::MAX / 4))?);
    let targets = Targets::of(args).await?;
    let mut ms = Vec::with_capacity(changes);
    let mut added = vec![false; targets.len()];
    let run = Instant::now();
    for change in 0..changes {
        if run.elapsed() > bound {
            break;
        }
        let i = targets.pick(change);
        let (client, keys, id) = targets.get(i);
        let cluster = format!("c{id}");
        let before = programmed_backends(&socket)?;
        // svc-0 with its backends, plus one extra backend on every other change of this cluster.
        let extra = !added[i];
        // The extra backend's address is outside every service's range (a new backend, not a shared one).
        let rec = service(
            &cluster,
            id,
            0,
            (0..backends).chain(extra.then_some(EXTRA_BACKEND)),
        );
        let started = Instant::now();
        client
            .clone()
            .put(keys.service(&cluster, NAMESPACE, "svc-0"), encode(&rec), None)
            .await?;
        let want = if extra { before + 1 } else { before - 1 };
        loop {
            if programmed_backends(&socket)? == want {
                break;
            }
            if started.elapsed() > CHANGE_TIMEOUT {
                bail!("change {change} in {cluster} not programmed within {CHANGE_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        ms.push(started.elapsed().as_secs_f64() * 1e3);
        added[i] = extra;
    }
    // Untimed: the backends still added go again, so that the fleet is as it was (later measurements count on it).
    let mut want = programmed_backends(&socket)?;
    for (i, _) in added.iter().enumerate().filter(|(_, a)| **a) {
        let (client, keys, id) = targets.get(i);
        let cluster = format!("c{id}");
        let rec = service(&cluster, id, 0, 0..backends);
        client
            .clone()
            .put(keys.service(&cluster, NAMESPACE, "svc-0"), encode(&rec), None)
            .await?;
        want -= 1;
    }
    let started = Instant::now();
    while programmed_backends(&socket)? != want {
        if started.elapsed() > CHANGE_TIMEOUT {
            bail!("the added backends' removal not programmed within {CHANGE_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    println!("{}", serde_json::json!({"kind": "converge", "ms": ms}));
    Ok(())
}

/// Writes cluster `id`'s part of a burst: `n` changes, its services in turn, each adding one backend; one round
/// writes each service at most once (up to 64 writes in flight), so that no key is written twice at once.
async fn burst_cluster(client: Client, id: u16, n: usize, services: u32, backends: u32) -> Result<()> {
    let cluster = format!("c{id}");
    let keys = Keys::new(mesh_kvstore::DEFAULT_PREFIX);
    let per_round = usize::try_from(services)?;
    // Room per service for its added backends.
    let room = u32::try_from(n.div_ceil(per_round))?;
    let mut round = 0u32;
    let mut left = n;
    while left > 0 {
        let this = left.min(per_round);
        let mut pending = Vec::new();
        for s in 0..u32::try_from(this)? {
            let added = (0..=round).map(|e| BURST_BACKENDS + s * room + e);
            let rec = service(&cluster, id, s, (s * backends..(s + 1) * backends).chain(added));
            let key = keys.service(&cluster, NAMESPACE, &rec.name);
            let mut c = client.clone();
            pending.push(tokio::spawn(async move { c.put(key, encode(&rec), None).await }));
            if pending.len() >= 64 {
                for p in pending.drain(..) {
                    p.await??;
                }
            }
        }
        for p in pending.drain(..) {
            p.await??;
        }
        left -= this;
        round += 1;
    }
    Ok(())
}

async fn burst(args: &Args) -> Result<()> {
    let urls: Vec<String> = args.get("--etcd")?.split(',').map(str::to_owned).collect();
    let socket = PathBuf::from(args.get("--agent-socket")?);
    let pid: u32 = args.num("--agent-pid", None)?;
    let changes: usize = args.num("--changes", None)?;
    let services: u32 = args.num("--services", None)?;
    let backends: u32 = args.num("--backends", None)?;
    let bound = Duration::from_secs(args.num("--max-secs", Some(600))?);
    anyhow::ensure!(
        services > 0 && services * backends < BURST_BACKENDS,
        "the services' own backends must stay below {BURST_BACKENDS}"
    );
    anyhow::ensure!(
        changes.div_ceil(urls.len()) + usize::try_from(services)?
            < usize::try_from(POD_ADDRESSES - BURST_BACKENDS)?,
        "too many changes for the burst's address range"
    );
    let clients = connect_all(&urls).await?;
    let before = programmed_backends(&socket)?;
    let want = before + u64::try_from(changes)?;
    let cpu0 = cpu_seconds(pid)?;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (i, c) in clients.into_iter().enumerate() {
        let id = u16::try_from(i + 1)?;
        // Changes j with j mod C = i.
        let n = changes / urls.len() + usize::from(i < changes % urls.len());
        tasks.push(tokio::spawn(burst_cluster(c, id, n, services, backends)));
    }
    for t in tasks {
        t.await??;
    }
    let written = started.elapsed();
    let mut now = before;
    while now != want && started.elapsed() < bound {
        tokio::time::sleep(Duration::from_millis(10)).await;
        now = programmed_backends(&socket)?;
    }
    let took = started.elapsed();
    let cpu = cpu_seconds(pid)? - cpu0;
    println!(
        "{}",
        serde_json::json!({
            "kind": "burst",
            "changes": changes,
            "programmed": now.saturating_sub(before),
            "complete": now == want,
            "written_s": written.as_secs_f64(),
            "programmed_s": took.as_secs_f64(),
            "cpu_s": cpu,
        })
    );
    Ok(())
}

/// The agent's pinned maps the relabel driver reads.
struct Pinned {
    endpoints: aya::maps::HashMap<aya::maps::MapData, [u8; 4], LocalEndpoint>,
    policy: aya::maps::HashMap<aya::maps::MapData, PolicyKey, PolicyEntry>,
    ipcache: aya::maps::LpmTrie<aya::maps::MapData, [u8; 4], IpcacheEntry>,
}

impl Pinned {
    fn open(pins: &Path) -> Result<Self> {
        let dir = pins.join(format!("maps-v{}", mesh_agent::datapath::MAP_ABI));
        let data = |name: &str| {
            let path = dir.join(name);
            aya::maps::MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))
        };
        Ok(Self {
            endpoints: aya::maps::Map::HashMap(data(maps::ENDPOINTS_V4)?).try_into()?,
            policy: aya::maps::Map::HashMap(data(maps::POLICY)?).try_into()?,
            ipcache: aya::maps::Map::LpmTrie(data(maps::IPCACHE_V4)?).try_into()?,
        })
    }

    fn endpoint(&self, ip: Ipv4Addr) -> Result<Option<LocalEndpoint>> {
        match self.endpoints.get(&ip.octets(), 0) {
            Ok(e) => Ok(Some(e)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Whether table `policy_id` admits `peer` on ingress TCP [`PORT`].
    fn admits(&self, policy_id: u32, peer: u32) -> Result<bool> {
        let key = PolicyKey {
            policy_id,
            identity: peer,
            port: PORT,
            proto: proto::TCP,
            dir: policy_dir::INGRESS,
            port_plen: 16,
            _pad: [0; 3],
        };
        match self.policy.get(&key, 0) {
            Ok(_) => Ok(true),
            Err(aya::maps::MapError::KeyNotFound) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// The identity the ipcache gives `ip` (longest prefix), 0 when nothing covers it.
    fn identity_of(&self, ip: Ipv4Addr) -> Result<u32> {
        match self
            .ipcache
            .get(&aya::maps::lpm_trie::Key::new(32, ip.octets()), 0)
        {
            Ok(e) => Ok(e.identity),
            Err(aya::maps::MapError::KeyNotFound) => Ok(0),
            Err(e) => Err(e.into()),
        }
    }

    /// Whether the datapath enforces pod `pod` having identity `new` (admitted on ingress of local endpoint
    /// `local` iff `granted`) and no longer `old`. The endpoint's table id is read before and after the policy
    /// lookups, so that a table switched (and the old one deleted) in between does not count.
    fn enforced(&self, local: Ipv4Addr, pod: Ipv4Addr, new: u32, old: u32, granted: bool) -> Result<bool> {
        let Some(ep) = self.endpoint(local)? else {
            return Ok(false);
        };
        if ep.policy_flags & policy_flags::INGRESS_ENFORCED == 0 || self.identity_of(pod)? != new {
            return Ok(false);
        }
        let ok = self.admits(ep.policy_id, new)? == granted && !self.admits(ep.policy_id, old)?;
        Ok(ok && self.endpoint(local)?.is_some_and(|e| e.policy_id == ep.policy_id))
    }
}

async fn relabel(args: &Args) -> Result<()> {
    let urls: Vec<String> = args.get("--etcd")?.split(',').map(str::to_owned).collect();
    let pins = PathBuf::from(args.get("--pins")?);
    let local: Ipv4Addr = args
        .get("--endpoint-ip")?
        .parse()
        .context("--endpoint-ip is not an IPv4 address")?;
    let count: u32 = args.num("--identities", None)?;
    let changes: usize = args.num("--changes", None)?;
    let bound = Duration::from_secs(args.num("--max-secs", Some(u64::MAX / 4))?);
    anyhow::ensure!(count > RELABEL_POD, "--identities must be above {RELABEL_POD}");
    let keys = Keys::new(mesh_kvstore::DEFAULT_PREFIX);
    let clients = connect_all(&urls).await?;
    let maps = Pinned::open(&pins)?;
    // Per cluster: the pod's current identity number, whether it is admitted, the next free number.
    let mut state: Vec<(u32, bool, u32)> = (0..urls.len())
        .map(|_| {
            (
                identity::FIRST_ALLOCATED + RELABEL_POD,
                RELABEL_POD.is_multiple_of(10),
                identity::FIRST_ALLOCATED + count,
            )
        })
        .collect();
    // The starting point: every relabeled pod's address known with its identity, the local endpoint enforced.
    let ready = Instant::now();
    for (i, &(number, granted, _)) in state.iter().enumerate() {
        let id = u16::try_from(i + 1)?;
        let (want, pod) = (identity::compose(id, number), pod_ip(id, RELABEL_POD));
        loop {
            let ep = maps.endpoint(local)?;
            if maps.identity_of(pod)? == want
                && let Some(ep) = ep
                && ep.policy_flags & policy_flags::INGRESS_ENFORCED != 0
                && maps.admits(ep.policy_id, want)? == granted
            {
                break;
            }
            if ready.elapsed() > Duration::from_secs(120) {
                bail!(
                    "the datapath never had pod {pod} with identity {want} and local endpoint {local} enforced (endpoint: {ep:?})"
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let (mut grant_ms, mut revoke_ms) = (Vec::new(), Vec::new());
    let run = Instant::now();
    for change in 0..changes {
        if run.elapsed() > bound {
            break;
        }
        let i = change % urls.len();
        let id = u16::try_from(i + 1)?;
        let cluster = format!("c{id}");
        let (old, granted, next) = state[i];
        let grant = !granted;
        let rec = identity_record(&cluster, id, next, RELABEL_POD, grant);
        let ip = ip_record(&cluster, id, RELABEL_POD, next);
        let (new_id, old_id, pod) = (rec.identity, identity::compose(id, old), ip.ipv4);
        let mut c = clients[i].clone();
        let started = Instant::now();
        c.put(keys.identity(&cluster, next), encode(&rec), None).await?;
        c.put(keys.ip(&cluster, pod), encode(&ip), None).await?;
        c.delete(keys.identity(&cluster, old), None).await?;
        while !maps.enforced(local, pod, new_id, old_id, grant)? {
            if started.elapsed() > CHANGE_TIMEOUT {
                bail!(
                    "relabel {change} of {cluster}'s pod {pod} (identity {old_id} -> {new_id}, granted: {grant}) not enforced within {CHANGE_TIMEOUT:?}"
                );
            }
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        let ms = started.elapsed().as_secs_f64() * 1e3;
        if grant {
            grant_ms.push(ms);
        } else {
            revoke_ms.push(ms);
        }
        state[i] = (next, grant, next + 1);
    }
    println!(
        "{}",
        serde_json::json!({"kind": "relabel", "grant_ms": grant_ms, "revoke_ms": revoke_ms})
    );
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let all: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = all.first().cloned() else {
        bail!(
            "usage: fleet_scale fill|fill-hub|identities|converge|burst|relabel ... (see the file's documentation)"
        );
    };
    let args = Args(all);
    match cmd.as_str() {
        "fill" => fill(&args).await,
        "identities" => identities(&args).await,
        "converge" => converge(&args).await,
        "fill-hub" => fill_hub(&args).await,
        "heartbeats" => heartbeats(&args).await,
        "burst" => burst(&args).await,
        "relabel" => relabel(&args).await,
        other => bail!("unknown command {other:?} (fill, fill-hub, identities, converge, burst, relabel)"),
    }
}
