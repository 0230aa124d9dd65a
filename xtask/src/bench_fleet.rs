//! `cargo xtask bench --only fleet`: what one backend change of a large service costs on the wire (issue #16,
//! "services of any size"). A real etcd (on loopback, data in `target/bench/fleet/`) and a real
//! clustermesh-apiserver (release build) publishing a manifests cluster with one global service of
//! [`BACKENDS`] ready pods; an `etcdctl watch` on the state prefix stands for a watcher. One pod is removed; what
//! the apiserver writes for it and what the watcher receives (keys and value bytes) is counted. Measured twice in
//! the same run: with the default backend slices, and with `--service-slice-size 0` (the service as one record,
//! as before the slices: the baseline).
//!
//! Everything it starts is stopped at the end, also on failure; nothing leaves loopback.
use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use crate::scale::{Procs, ScaleRow};
use crate::util;

/// Backends of the large service.
const BACKENDS: u32 = 10_000;
/// The pod the change removes.
const REMOVED: u32 = 4_321;
/// The longest any step may take.
const STEP: Duration = Duration::from_secs(90);

/// A free loopback TCP port (bound and released; etcd binds it right after).
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Polls `f` every 50 ms until it gives `Some`, at most [`STEP`].
fn poll<T>(what: &str, mut f: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    let deadline = Instant::now() + STEP;
    loop {
        if let Some(v) = f()? {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("{what}: not within {} s", STEP.as_secs());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The manifests: one node (pod CIDR 10.1.0.0/16), a global service `shop/big` and its pods but `skip`.
fn manifests(skip: Option<u32>) -> String {
    let mut s = String::from(
        "apiVersion: v1\nkind: Node\nmetadata: {name: east-node-1}\nspec: {podCIDR: 10.1.0.0/16}\n\
         status: {addresses: [{type: InternalIP, address: 100.65.1.1}]}\n---\n\
         apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {name: big, namespace: shop, annotations: {service.cilium.io/global: \"true\"}}\n\
         spec: {selector: {app: big}, ports: [{name: http, port: 80, targetPort: 8080, protocol: TCP}]}\n",
    );
    for i in (0..BACKENDS).filter(|i| Some(*i) != skip) {
        let _ = std::fmt::Write::write_fmt(
            &mut s,
            format_args!(
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: big-{i}, namespace: shop, labels: {{app: big}}}}\n\
                 spec: {{nodeName: east-node-1, containers: [{{name: c, ports: [{{containerPort: 8080}}]}}]}}\n\
                 status: {{podIP: 10.1.{}.{}}}\n",
                i / 200,
                i % 200 + 2
            ),
        );
    }
    s
}

fn write_atomic(dir: &Path, text: &str) -> Result<()> {
    let tmp = dir.join(".all.yaml.tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, dir.join("all.yaml"))?;
    Ok(())
}

/// What the watcher received for one change: keys and value bytes (puts), and deletes.
#[derive(Debug, Default, Clone, Copy)]
struct Received {
    puts: usize,
    deletes: usize,
    bytes: usize,
}

/// Decoded length of a base64 string.
fn base64_len(s: &str) -> usize {
    let pad = s.bytes().rev().take_while(|b| *b == b'=').count();
    (s.len() / 4 * 3).saturating_sub(pad)
}

/// Sums the events `etcdctl watch -w json` wrote to `file` from line `from` on, for keys other than `probe`.
fn received(file: &Path, from: usize, probe: &str) -> Result<(Received, usize)> {
    let mut out = Received::default();
    let mut lines = 0;
    let f = std::fs::File::open(file)?;
    for (n, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line?;
        lines = n + 1;
        if n < from || line.trim().is_empty() {
            continue;
        }
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        for e in v["Events"].as_array().into_iter().flatten() {
            let key = e["kv"]["key"].as_str().unwrap_or_default();
            if key == probe {
                continue;
            }
            if e["type"].as_i64() == Some(1) || e["type"].as_str() == Some("DELETE") {
                out.deletes += 1;
            } else {
                out.puts += 1;
                out.bytes += base64_len(e["kv"]["value"].as_str().unwrap_or_default());
            }
        }
    }
    Ok((out, lines))
}

/// One measurement: an etcd and an apiserver with `--service-slice-size slice`, the service published, then one
/// pod removed; what the watcher received for that change.
fn measure(dir: &Path, apiserver: &Path, etcd: &Path, etcdctl: &Path, slice: u32) -> Result<Received> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir.join("manifests"))?;
    let (client, peer) = (free_port()?, free_port()?);
    let url = format!("http://127.0.0.1:{client}");
    let mut procs = Procs::default();
    let log = |name: &str| -> Result<std::fs::File> { Ok(std::fs::File::create(dir.join(name))?) };
    procs.0.push(
        Command::new(etcd)
            .args(["--name", "fleet", "--data-dir"])
            .arg(dir.join("etcd"))
            .args(["--listen-client-urls", &url, "--advertise-client-urls", &url])
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
            .args([
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
            ])
            .args(["--initial-cluster", &format!("fleet=http://127.0.0.1:{peer}")])
            .args(["--log-level", "error"])
            .stdout(Stdio::null())
            .stderr(log("etcd.log")?)
            .spawn()
            .context("starting etcd")?,
    );
    let ctl = || {
        let mut c = Command::new(etcdctl);
        c.args(["--endpoints", &url]);
        c
    };
    poll("etcd to answer", || {
        Ok(util::run(ctl().args(["endpoint", "health"])).ok())
    })?;
    write_atomic(&dir.join("manifests"), &manifests(None))?;
    let api_log = dir.join("apiserver.log");
    procs.0.push(
        Command::new(apiserver)
            .args(["--cluster-name", "east", "--cluster-id", "1", "--manifests"])
            .arg(dir.join("manifests"))
            .args([
                "--etcd-endpoints",
                &url,
                "--service-slice-size",
                &slice.to_string(),
            ])
            .args(["--log", "info"])
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&api_log)?)
            .spawn()
            .context("starting clustermesh-apiserver")?,
    );
    let published = |n: usize| {
        let text = std::fs::read_to_string(&api_log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().filter(|l| l.contains("published records")).collect();
        lines.get(n.wrapping_sub(1)).map(|l| (*l).to_owned())
    };
    poll("the service to be published", || {
        Ok(
            util::run(ctl().args(["get", "fleetmesh/synced/east/services", "--keys-only"]))
                .ok()
                .filter(|o| o.contains("synced"))
                .and(published(1)),
        )
    })?;
    // The watcher, known to be watching once it has seen a probe key.
    let watch_out = dir.join("watch.jsonl");
    procs.0.push(
        ctl()
            .args(["watch", "--prefix", "fleetmesh/state/", "-w", "json"])
            .stdout(std::fs::File::create(&watch_out)?)
            .stderr(log("watch.log")?)
            .spawn()
            .context("starting etcdctl watch")?,
    );
    let probe = "fleetmesh/state/bench-probe";
    let probe_b64 = "ZmxlZXRtZXNoL3N0YXRlL2JlbmNoLXByb2Jl";
    let start = poll("the watcher to see the probe", || {
        util::run(ctl().args(["put", probe, "x"]))?;
        let text = std::fs::read_to_string(&watch_out).unwrap_or_default();
        Ok(text.contains(probe_b64).then(|| text.lines().count()))
    })?;
    write_atomic(&dir.join("manifests"), &manifests(Some(REMOVED)))?;
    let line = poll("the change to be published", || Ok(published(2)))?;
    let puts: usize = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("puts=").and_then(|n| n.parse().ok()))
        .context("puts= in the apiserver's log line")?;
    let deletes: usize = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("deletes=").and_then(|n| n.parse().ok()))
        .unwrap_or(0);
    let got = poll("the watcher to receive the change", || {
        let (r, _) = received(&watch_out, start, probe_b64)?;
        Ok((r.puts >= puts && r.deletes >= deletes).then_some(r))
    })?;
    drop(procs);
    Ok(got)
}

pub fn run(build: bool, out_dir: &Path) -> Result<Vec<ScaleRow>> {
    if build {
        crate::scale::build_release()?;
    }
    let apiserver: PathBuf = util::workspace_root()
        .join("target")
        .join("release")
        .join("clustermesh-apiserver");
    let etcd = util::which("etcd").context("etcd is missing (cargo xtask setup installs etcd-server)")?;
    let etcdctl =
        util::which("etcdctl").context("etcdctl is missing (cargo xtask setup installs etcd-client)")?;
    let root = out_dir.join("fleet");
    let sliced = measure(&root.join("sliced"), &apiserver, &etcd, &etcdctl, 100)?;
    println!(
        "  one backend of {BACKENDS} removed, backend slices: {} keys written ({} bytes), {} deleted",
        sliced.puts, sliced.bytes, sliced.deletes
    );
    let whole = measure(&root.join("whole"), &apiserver, &etcd, &etcdctl, 0)?;
    println!(
        "  the same as one record (--service-slice-size 0): {} keys written ({} bytes), {} deleted",
        whole.puts, whole.bytes, whole.deletes
    );
    #[expect(clippy::cast_precision_loss, reason = "byte counts far below 2^52")]
    let ratio = sliced.bytes as f64 / whole.bytes.max(1) as f64;
    Ok(vec![(
        format!(
            "One backend change in a {BACKENDS}-backend service: bytes written to etcd = bytes received by each watcher (etcdctl watch), backend slices of 100 vs the service as one record (ratio = sliced / whole)"
        ),
        format!("{} B in {} key(s)", sliced.bytes, sliced.puts),
        format!("{} B in {} key(s)", whole.bytes, whole.puts),
        Some(ratio),
        Some(("<=", 0.02)),
    )])
}
