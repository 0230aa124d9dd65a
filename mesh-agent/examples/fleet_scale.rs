//! Synthetic fleet for `cargo xtask bench --only scale`: fills real etcds with generated clusters (config, nodes,
//! global services with backends, synced markers) the way clustermesh-apiservers publish them, without running
//! their pods; and measures how fast a change in one cluster reaches a running agent's datapath.
//!
//! `fleet_scale fill --etcd URL --cluster NAME --id ID --services S --backends B [--nodes N]`: one cluster. Its
//! backends are `base(ID) + k` (`base` = 10.0.0.0 + ID·2^19, so up to 512k per cluster), port 8080, service `s`
//! named `svc-<s>` in namespace `fleet` with backends `s·B .. (s+1)·B`.
//!
//! `fleet_scale converge --etcd URL,... --agent-socket PATH --changes N --backends B`: N changes, cluster by
//! cluster in turn: a new backend is added to (then, next change, removed from) `fleet/svc-0` of that cluster;
//! each change is timed from just before the etcd write until the agent's `GET /v1/summary` reports the new
//! number of programmed backends (the summary is written after the reconcile that programmed the maps). Prints
//! one JSON line `{"kind":"converge","ms":[...]}`.
use std::io::{Read as _, Write as _};
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use etcd_client::Client;
use mesh_kvstore::{
    BackendRecord, ClusterConfig, Keys, NodeRecord, PortRecord, ServiceRecord, Synced, encode,
};
use mesh_model::Protocol;

const NAMESPACE: &str = "fleet";
const PORT: u16 = 8080;
/// Backend index of the backend the convergence changes add and remove.
const EXTRA_BACKEND: u32 = 500_000;
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
                ports: vec![port()],
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
    let nodes: u32 = args.num("--nodes", Some(8))?;
    anyhow::ensure!(
        u64::from(services) * u64::from(backends) < (1 << 19) - 1,
        "at most 512k backends per cluster"
    );
    let mut c = Client::connect([url.as_str()], None)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    let keys = Keys::new(mesh_kvstore::DEFAULT_PREFIX);
    c.put(
        keys.cluster_config(&cluster),
        encode(&ClusterConfig {
            name: cluster.clone(),
            id,
            capabilities: vec!["nodes/v1".into(), "services/v1".into()],
            labels: Default::default(),
        }),
        None,
    )
    .await?;
    for k in 0..nodes {
        let name = format!("{cluster}-node-{k}");
        let rec = NodeRecord {
            name: name.clone(),
            cluster: cluster.clone(),
            cluster_id: id,
            underlay_ipv4: Ipv4Addr::new(
                100,
                66,
                u8::try_from(id % 256).unwrap_or(0),
                u8::try_from(k + 1).unwrap_or(1),
            ),
            pod_cidrs: vec![format!("{}/16", Ipv4Addr::from(base(id) + (k << 16))).parse()?],
        };
        c.put(keys.node(&cluster, &name), encode(&rec), None).await?;
    }
    c.put(
        keys.synced(&cluster, mesh_kvstore::kinds::NODES),
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
        let rec = service(&cluster, id, s, s * backends..(s + 1) * backends);
        let key = keys.service(&cluster, NAMESPACE, &rec.name);
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
        keys.synced(&cluster, mesh_kvstore::kinds::SERVICES),
        encode(&Synced {
            time_ms: now_ms(),
            count: u64::from(services),
        }),
        None,
    )
    .await?;
    println!(
        "{}",
        serde_json::json!({"kind": "fill", "cluster": cluster, "services": services, "backends": services * backends})
    );
    Ok(())
}

/// `GET /v1/summary` of the agent: its number of programmed backends.
fn programmed_backends(socket: &Path) -> Result<u64> {
    let mut s = UnixStream::connect(socket).with_context(|| format!("connecting to {}", socket.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET /v1/summary HTTP/1.0\r\nHost: agent\r\n\r\n")?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let body = buf.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(body).context("summary is not JSON")?;
    v["datapath"]["backends"]
        .as_u64()
        .context("summary without datapath.backends")
}

async fn converge(args: &Args) -> Result<()> {
    let urls: Vec<String> = args.get("--etcd")?.split(',').map(str::to_owned).collect();
    let socket = PathBuf::from(args.get("--agent-socket")?);
    let changes: usize = args.num("--changes", Some(200))?;
    let backends: u32 = args.num("--backends", None)?;
    let keys = Keys::new(mesh_kvstore::DEFAULT_PREFIX);
    let mut clients = Vec::new();
    for u in &urls {
        clients.push(
            Client::connect([u.as_str()], None)
                .await
                .with_context(|| format!("connecting to {u}"))?,
        );
    }
    let mut ms = Vec::with_capacity(changes);
    let mut added = vec![false; urls.len()];
    for change in 0..changes {
        let i = change % urls.len();
        let id = u16::try_from(i + 1).unwrap_or(1);
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
        clients[i]
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
    println!("{}", serde_json::json!({"kind": "converge", "ms": ms}));
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let all: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = all.first().cloned() else {
        bail!("usage: fleet_scale fill|converge ... (see the file's documentation)");
    };
    let args = Args(all);
    match cmd.as_str() {
        "fill" => fill(&args).await,
        "converge" => converge(&args).await,
        other => bail!("unknown command {other:?} (fill, converge)"),
    }
}
