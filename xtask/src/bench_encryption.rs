//! `cargo xtask bench --only encryption` (docs/encryption.md): the agent's WireGuard between clusters, against
//! `wireguard-go` between the same two node namespaces, and against the clear overlay, all in one run.
//!
//! Lab (written under `target/bench/encryption-topology`): cluster `enca` (2 nodes) and `encb` (1 node) with
//! `encryption: cross-cluster`, cluster `encc` (2 nodes) with encryption off. The client pod is on `enca-node-1`.
//! - encrypted: client → pod on `encb-node-1` (VXLAN inside the agents' WireGuard);
//! - wireguard-go: `enca-node-1`'s namespace → `encb-node-1`'s over a `wireguard-go` tunnel the bench sets up
//!   between the two node namespaces (its own keys and port), no overlay;
//! - clear overlay: client → pod on `enca-node-2` (same cluster: plain VXLAN in cross-cluster mode);
//! - encryption off: `encc-node-1` pod → `encc-node-2` pod (the same path in a cluster without encryption).
//!
//! Measures: iperf3 with 1 and 4 streams, sockperf TCP ping-pong (rate = 1 / median round trip), and the CPU time
//! of the two agents per Gbit/s during the 1-stream encrypted run.
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use serde_json::Value;

use crate::bench::{Plan, Procs, Row, median, row, sockperf_rr, wait_listening};
use crate::lab::{net, state};
use crate::util;

const TOPOLOGY: &str = "clusters:
  - name: enca
    id: 78
    podCIDR: 10.78.0.0/16
    nodes: 2
    encryption: cross-cluster
  - name: encb
    id: 79
    podCIDR: 10.79.0.0/16
    nodes: 1
    encryption: cross-cluster
  - name: encc
    id: 80
    podCIDR: 10.80.0.0/16
    nodes: 2
";

fn manifests(cluster: &str, pods: &[(&str, &str)]) -> String {
    let mut docs = vec!["apiVersion: v1\nkind: Namespace\nmetadata: {name: bench}\n".to_owned()];
    for (name, node) in pods {
        docs.push(format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: bench, labels: {{app: {name}}}}}\nspec:\n  nodeName: {cluster}-{node}\n  containers:\n    - name: echo\n      ports: [{{containerPort: 8080}}]\n"
        ));
    }
    docs.join("---\n")
}

/// The wireguard-go baseline's addresses (a /30 of its own) and port.
const WG_NET: [Ipv4Addr; 2] = [Ipv4Addr::new(10, 254, 79, 1), Ipv4Addr::new(10, 254, 79, 2)];
const WG_GO_PORT: &str = "51999";

/// A wireguard-go tunnel between two namespaces, removed on drop.
struct WgGo {
    ends: Vec<(String, String)>,
    procs: Procs,
}

impl WgGo {
    fn up(a: (&str, Ipv4Addr), b: (&str, Ipv4Addr), dir: &Path) -> Result<Self> {
        let mut me = Self {
            ends: Vec::new(),
            procs: Procs::default(),
        };
        let pid = std::process::id() % 100_000;
        let keys: Vec<(PathBuf, String)> = ["a", "b"]
            .iter()
            .map(|side| -> Result<(PathBuf, String)> {
                let key = util::run(Command::new("wg").arg("genkey"))?.trim().to_owned();
                let file = dir.join(format!("wg-go-{side}.key"));
                std::fs::write(&file, format!("{key}\n"))?;
                let mut pubkey = Command::new("sh");
                pubkey.args(["-c", &format!("wg pubkey < {}", file.display())]);
                Ok((file, util::run(&mut pubkey)?.trim().to_owned()))
            })
            .collect::<Result<_>>()?;
        for (i, (ns, _)) in [a, b].iter().enumerate() {
            let dev = format!("fmbwg{pid}{i}");
            me.procs.spawn_plain(ns, "wireguard-go", &["-f", &dev])?;
            me.ends.push(((*ns).to_owned(), dev));
        }
        let underlays = [a.1, b.1];
        for i in 0..2 {
            let other = 1 - i;
            let (ns, dev) = me.ends[i].clone();
            net::wait_for(
                &format!("wireguard-go device {dev}"),
                Duration::from_secs(10),
                || {
                    net::ip_in(&ns, &["link", "show", &dev])
                        .map(drop)
                        .map_err(|e| format!("{e:#}"))
                },
            )?;
            let mut wg = Command::new("nsenter");
            wg.arg(format!("--net=/run/netns/{ns}"))
                .args(["--", "wg", "set", &dev, "private-key"])
                .arg(&keys[i].0)
                .args(["listen-port", WG_GO_PORT, "peer", &keys[other].1, "endpoint"])
                .arg(format!("{}:{WG_GO_PORT}", underlays[other]))
                .args(["allowed-ips", &format!("{}/32", WG_NET[other])]);
            util::run(&mut wg)?;
            net::ip_in(&ns, &["addr", "add", &format!("{}/30", WG_NET[i]), "dev", &dev])?;
            net::ip_in(&ns, &["link", "set", &dev, "up"])?;
        }
        Ok(me)
    }
}

impl Drop for WgGo {
    fn drop(&mut self) {
        for (ns, dev) in &self.ends {
            let _ = net::ip_in(ns, &["link", "del", dev]);
        }
    }
}

/// One iperf3 run with `streams` parallel TCP streams, bits per second received.
fn iperf(netns: &str, ip: Ipv4Addr, streams: u32, secs: u32) -> Result<f64> {
    let mut cmd = Command::new("timeout");
    cmd.args(["-k", "2", &(secs + 20).to_string(), "nsenter"])
        .arg(format!("--net=/run/netns/{netns}"))
        .args([
            "--",
            "taskset",
            "-c",
            "1",
            "iperf3",
            "-J",
            "-c",
            &ip.to_string(),
            "-p",
            "5201",
        ])
        .args(["-P", &streams.to_string(), "-t", &secs.to_string()]);
    let out = util::run(&mut cmd)?;
    let v: Value = serde_json::from_str(&out).context("iperf3 -J output")?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3: no end.sum_received.bits_per_second")
}

/// User + system CPU seconds of process `pid` so far.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat.rsplit_once(") ").context("/proc/pid/stat")?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields
        .get(11..13)
        .context("/proc/pid/stat fields")?
        .iter()
        .filter_map(|f| f.parse::<f64>().ok())
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    #[expect(
        clippy::cast_precision_loss,
        reason = "clock ticks per second, a small number"
    )]
    Ok(ticks / hz as f64)
}

fn rate(v: &[f64], unit: &str) -> String {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let s = |x: f64| {
        if x >= 1e9 {
            format!("{:.2}G", x / 1e9)
        } else if x >= 1e6 {
            format!("{:.1}M", x / 1e6)
        } else if x >= 1e3 {
            format!("{:.1}k", x / 1e3)
        } else {
            format!("{x:.2}")
        }
    };
    format!("{} {unit} (min {})", s(median(v)), s(min))
}

fn ratio(a: &[f64], b: &[f64]) -> f64 {
    median(&a.iter().zip(b).map(|(x, y)| x / y).collect::<Vec<_>>())
}

/// The encryption part: lab up, measurements, lab down (also when measuring fails).
pub(crate) fn part(plan: &Plan, out_dir: &Path, rows: &mut Vec<Row>) -> Result<()> {
    if plan.build {
        crate::lab::build_daemons()?;
    }
    let topo = out_dir.join("encryption-topology");
    for (c, pods) in [
        ("enca", &[("client", "node-1"), ("near", "node-2")][..]),
        ("encb", &[("far", "node-1")][..]),
        ("encc", &[("client", "node-1"), ("near", "node-2")][..]),
    ] {
        std::fs::create_dir_all(topo.join(c))?;
        std::fs::write(topo.join(c).join("bench.yaml"), manifests(c, pods))?;
    }
    std::fs::write(topo.join("lab.yaml"), TOPOLOGY)?;
    let dir: PathBuf = out_dir.join("encryption-lab");
    std::fs::create_dir_all(&dir)?;
    state::down(&dir)?;
    let result =
        state::up(&dir, &topo, false, Duration::from_secs(120)).and_then(|st| measure(plan, &dir, &st, rows));
    let down = state::down(&dir);
    result?;
    down
}

struct Path2 {
    name: &'static str,
    netns: String,
    ip: Ipv4Addr,
}

fn measure(plan: &Plan, dir: &Path, st: &state::LabState, rows: &mut Vec<Row>) -> Result<()> {
    let cluster = |n: &str| {
        st.clusters
            .iter()
            .find(|c| c.name == n)
            .with_context(|| format!("cluster {n}"))
    };
    let (a, b, c) = (cluster("enca")?, cluster("encb")?, cluster("encc")?);
    let pod = |c: &state::ClusterRt, k: &str| c.pods.get(k).cloned().with_context(|| format!("pod {k}"));
    let (client, near, far) = (
        pod(a, "bench/client")?,
        pod(a, "bench/near")?,
        pod(b, "bench/far")?,
    );
    let (off_client, off_near) = (pod(c, "bench/client")?, pod(c, "bench/near")?);
    let (node_a, node_b) = (&a.nodes[0], &b.nodes[0]);
    let agent_pid = |node: &str| {
        st.procs
            .iter()
            .find(|p| p.role == format!("agent-{node}"))
            .map(|p| p.pid)
            .with_context(|| format!("agent of {node}"))
    };
    let agents = [agent_pid(&node_a.name)?, agent_pid(&node_b.name)?];

    let wg = WgGo::up(
        (&node_a.netns, node_a.underlay_ip),
        (&node_b.netns, node_b.underlay_ip),
        dir,
    )?;
    let mut procs = Procs::default();
    for ns in [&near.netns, &far.netns, &node_b.netns, &off_near.netns] {
        procs.spawn(
            ns,
            "sockperf",
            &["server", "--tcp", "-i", "0.0.0.0", "-p", "5001"],
        )?;
        procs.spawn(ns, "iperf3", &["-s", "-p", "5201"])?;
    }
    let paths = [
        Path2 {
            name: "encrypted",
            netns: client.netns.clone(),
            ip: far.ip,
        },
        Path2 {
            name: "wireguard-go",
            netns: node_a.netns.clone(),
            ip: WG_NET[1],
        },
        Path2 {
            name: "clear overlay",
            netns: client.netns,
            ip: near.ip,
        },
        Path2 {
            name: "encryption off",
            netns: off_client.netns,
            ip: off_near.ip,
        },
    ];
    for p in &paths {
        net::wait_for(
            &format!("{} ({}) to answer", p.ip, p.name),
            Duration::from_secs(30),
            || wait_listening(&p.netns, SocketAddr::from((p.ip, 5201))).map_err(|e| format!("{e:#}")),
        )?;
    }
    // tput[streams][path], rr[path], cpu: agent CPU seconds per second per Gbit/s (encrypted, 1 stream).
    let mut tput = [vec![Vec::new(); paths.len()], vec![Vec::new(); paths.len()]];
    let mut rr = vec![Vec::new(); paths.len()];
    let mut cpu = Vec::new();
    for round in 1..=plan.rounds {
        println!("bench: encryption round {round}/{}", plan.rounds);
        for (pi, p) in paths.iter().enumerate() {
            for (si, streams) in [1u32, 4].into_iter().enumerate() {
                let before: Vec<f64> = agents.iter().filter_map(|pid| cpu_seconds(*pid).ok()).collect();
                let t0 = Instant::now();
                let bps = iperf(&p.netns, p.ip, streams, plan.secs)
                    .with_context(|| format!("iperf3 {}", p.name))?;
                let took = t0.elapsed().as_secs_f64();
                if pi == 0 && si == 0 {
                    let after: Vec<f64> = agents.iter().filter_map(|pid| cpu_seconds(*pid).ok()).collect();
                    let used: f64 = after.iter().zip(&before).map(|(x, y)| x - y).sum();
                    cpu.push(used / took / (bps / 1e9));
                }
                println!("  {:<15} iperf3 -P{streams}: {:.2} Gbit/s", p.name, bps / 1e9);
                tput[si][pi].push(bps);
            }
            let (p50, _) = sockperf_rr(&p.netns, p.ip, 5001, true, plan.secs)
                .with_context(|| format!("sockperf {}", p.name))?;
            println!("  {:<15} TCP RR median {p50:.1} µs", p.name);
            rr[pi].push(1e6 / p50);
        }
    }
    let (enc, wgo, clear, off) = (0, 1, 2, 3);
    for (si, streams) in [1, 4].into_iter().enumerate() {
        rows.push(Row {
            goal: Some((">=", 1.5)),
            ..row(
                format!("encryption: iperf3 -P{streams} cross-cluster, agent WireGuard/wireguard-go (same 2 node namespaces)"),
                rate(&tput[si][enc], "bit/s"),
                rate(&tput[si][wgo], "bit/s"),
                Some(ratio(&tput[si][enc], &tput[si][wgo])),
            )
        });
    }
    rows.push(Row {
        goal: Some((">=", 1.2)),
        ..row(
            "encryption: TCP RR cross-cluster, agent WireGuard/wireguard-go",
            rate(&rr[enc], "RR/s"),
            rate(&rr[wgo], "RR/s"),
            Some(ratio(&rr[enc], &rr[wgo])),
        )
    });
    for (si, streams) in [1, 4].into_iter().enumerate() {
        rows.push(row(
            format!("encryption: iperf3 -P{streams}, encrypted/clear overlay (the price of encryption)"),
            rate(&tput[si][enc], "bit/s"),
            rate(&tput[si][clear], "bit/s"),
            Some(ratio(&tput[si][enc], &tput[si][clear])),
        ));
    }
    rows.push(row(
        "encryption: TCP RR, encrypted/clear overlay",
        rate(&rr[enc], "RR/s"),
        rate(&rr[clear], "RR/s"),
        Some(ratio(&rr[enc], &rr[clear])),
    ));
    rows.push(row(
        "encryption: agent CPU (both ends) per Gbit/s encrypted, iperf3 -P1",
        format!("{:.2} CPU-s/s per Gbit/s", median(&cpu)),
        String::new(),
        None,
    ));
    rows.push(Row {
        goal: Some((">=", 0.9)),
        ..row(
            "encryption: iperf3 -P1 pod-to-pod inside a cluster, cross-cluster mode/encryption off",
            rate(&tput[0][clear], "bit/s"),
            rate(&tput[0][off], "bit/s"),
            Some(ratio(&tput[0][clear], &tput[0][off])),
        )
    });
    rows.push(Row {
        goal: Some((">=", 0.9)),
        ..row(
            "encryption: TCP RR inside a cluster, cross-cluster mode/encryption off",
            rate(&rr[clear], "RR/s"),
            rate(&rr[off], "RR/s"),
            Some(ratio(&rr[clear], &rr[off])),
        )
    });
    drop(procs);
    drop(wg);
    Ok(())
}
