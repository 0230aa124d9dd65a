//! `cargo xtask bench`: datapath benchmarks. Every figure is a ratio against a baseline measured in the same run
//! (absolute numbers depend on the machine and on what else runs on it). Every load loop is bounded in count and
//! in time; traffic only flows inside network namespaces the bench creates; everything is torn down on failure.
//!
//! Parts (`--only lab,lb,nft`, default all):
//! - `lab`: a 1-cluster × 2-node lab (topology written under `target/bench/`): request/response rate (sockperf
//!   ping-pong, TCP and UDP; rate = 1 / median round trip) through a ClusterIP vs directly to the backend pod, on
//!   the same node and on the other node; same-node and cross-node pod-to-pod vs a plain veth pair without any
//!   program (RR and iperf3 one-stream throughput); TCP connections per second (new flows) via VIP vs pod.
//! - `lb`: per-packet cost of the eBPF load balancer (`mesh-agent/examples/lb_cost.rs`, BPF_PROG_TEST_RUN) with
//!   2 → 1k → 10k → 100k frontends, and map memory per service, slot, backend and conntrack entry.
//! - `nft`: the kube-proxy nftables baseline: a verdict map `ip daddr . meta l4proto . th dport` → per-service
//!   chains with DNAT in a network namespace pair, TCP connections per second with 1, 10k and 100k services.
//! - `scale`: a synthetic fleet of 10 clusters (real etcds) and one real agent: convergence p50/p99 at 1k and 1M
//!   remote endpoints, bootstrap with 1M, agent RSS per remote endpoint, idle CPU, CPU per change in a burst,
//!   `/metrics` scrape time, pod relabel → enforced with 100k remote identities (see `scale.rs`).
//! - `faults`: on the three-clusters example, the time until new connections through a VIP stop failing after
//!   a cluster with backends is cut off the underlay, minus the grace period (5 cuts); and the established
//!   connections through a VIP lost across 10 restarts of the client's agent (graceful and SIGKILL alternating).
//! - `rollout`: halt time of a `StagedRollout` on the three-clusters example: north's backends reset every
//!   connection, a rollout sends 50% of east's new connections there; from the first failed connection the
//!   client sees to the last one (after which 100 connections in a row succeed on `from`), p50/p99 over runs.
//!
//! - `dns`: see `bench_dns.rs`: clusterset DNS queries/s and p99 latency vs dnsmasq, remote backend change → headless
//!   answer changed, heap per record.
//! - `encryption`: see `bench_encryption.rs`: iperf3 (1 and 4 streams) and TCP RR across clusters through the
//!   agent's WireGuard vs a wireguard-go tunnel between the same node namespaces and vs the clear overlay, agent
//!   CPU per Gbit/s, and in-cluster traffic with cross-cluster mode vs encryption off.
//! - `policy`: see `bench_policy.rs`: round trips with a 1,000-rule policy on both pods vs none, and the time
//!   from a pod label change in one cluster to enforcement in another's datapath (p50/p99 of 100 changes).
//!
//! The results table is printed and written to `target/bench/report.md`.
use std::fmt::Write as _;
use std::io::Read as _;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use clap::{Args, ValueEnum};
use serde_json::Value;

use crate::lab::{net, state};
use crate::{setup, util};

/// Arguments of `cargo xtask bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Shorter run (1 s per measurement instead of 3, nftables up to 10k services instead of 100k).
    #[arg(long)]
    pub quick: bool,
    /// Skip `cargo xtask setup`.
    #[arg(long)]
    pub no_setup: bool,
    /// Do not run cargo: use the daemons and `target/release/examples/lb_cost` as already built.
    #[arg(long)]
    pub no_build: bool,
    /// Parts to run (comma-separated; default all).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub only: Vec<Part>,
}

/// A part of the bench.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Part {
    /// Request/response, throughput and connection rate on the lab and on a plain veth pair.
    Lab,
    /// eBPF load balancer cost per packet vs number of services, and map memory.
    Lb,
    /// nftables DNAT (kube-proxy nftables mode) vs number of services.
    Nft,
    /// Halt time of a staged rollout whose target fails.
    Rollout,
    /// Synthetic fleet: convergence, bootstrap with 1M remote endpoints, agent memory and CPU, relabels.
    Scale,
    /// Fault figures: failover time after a cluster is cut, flows lost across agent restarts.
    Faults,
    /// Network policy: per-packet cost with 1,000 rules, change latency across clusters.
    Policy,
    /// Clusterset DNS: queries/s and latency vs dnsmasq, remote backend change → answer, memory per record.
    Dns,
    /// Fleet: what one backend change of a 10,000-backend service writes to etcd and sends to each watcher.
    Fleet,
    /// Encryption: the agent's WireGuard vs wireguard-go and vs the clear overlay (throughput, RR, CPU).
    Encryption,
}

/// How long and how often each measurement runs.
pub(crate) struct Plan {
    pub(crate) build: bool,
    pub(crate) rounds: usize,
    pub(crate) secs: u32,
    nft_sizes: Vec<u32>,
}

/// One line of the results table.
pub(crate) struct Row {
    pub(crate) what: String,
    pub(crate) value: String,
    pub(crate) baseline: String,
    pub(crate) ratio: Option<f64>,
    /// (`>=` or `<=`, bound)
    pub(crate) goal: Option<(&'static str, f64)>,
}

impl Row {
    fn verdict(&self) -> &'static str {
        match (self.ratio, self.goal) {
            (Some(r), Some((">=", g))) if r >= g => "ok",
            (Some(r), Some(("<=", g))) if r <= g => "ok",
            (Some(_), Some(_)) => "MISSED",
            _ => "",
        }
    }
}

pub(crate) fn row(what: impl Into<String>, value: String, baseline: String, ratio: Option<f64>) -> Row {
    Row {
        what: what.into(),
        value,
        baseline,
        ratio,
        goal: None,
    }
}

/// The `p` quantile (0-1) of a non-empty sample, nearest rank (sorts `v`).
pub(crate) fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "an index into a short list"
    )]
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len().saturating_sub(1))]
}

pub(crate) fn median(v: &[f64]) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return f64::NAN;
    }
    s.sort_by(f64::total_cmp);
    let m = s.len() / 2;
    if s.len() % 2 == 1 {
        s[m]
    } else {
        f64::midpoint(s[m - 1], s[m])
    }
}

fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

/// `median (min)` of rates, human units.
fn rates(v: &[f64], unit: &str) -> String {
    format!("{} {unit} (min {})", si(median(v)), si(min(v)))
}

fn si(x: f64) -> String {
    if !x.is_finite() {
        "n/a".to_owned()
    } else if x >= 1e9 {
        format!("{:.2}G", x / 1e9)
    } else if x >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.1}k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}

/// Per-round ratios `a[i] / b[i]`.
fn ratios(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x / y).collect()
}

// ---- processes and namespaces the bench owns --------------------------------------------------------------

/// Child processes stopped (SIGKILL, by their own pid) when dropped.
#[derive(Default)]
pub(crate) struct Procs(Vec<Child>);

impl Procs {
    pub(crate) fn spawn(&mut self, netns: &str, program: &str, args: &[&str]) -> Result<()> {
        self.spawn_in(netns, &["taskset", "-c", SERVER_CPU, program], args)
    }

    /// As [`Procs::spawn`], not pinned to a CPU (a daemon that competes like the agents do).
    pub(crate) fn spawn_plain(&mut self, netns: &str, program: &str, args: &[&str]) -> Result<()> {
        self.spawn_in(netns, &[program], args)
    }

    fn spawn_in(&mut self, netns: &str, program: &[&str], args: &[&str]) -> Result<()> {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{netns}"))
            .arg("--")
            .args(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let line = util::cmdline(&cmd);
        self.0
            .push(cmd.spawn().with_context(|| format!("starting `{line}`"))?);
        Ok(())
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Network namespaces removed when dropped.
struct Netns(Vec<String>);

impl Netns {
    /// Two namespaces `<prefix>-c` and `<prefix>-s` joined by a veth pair (MTU 1450 like lab pods), with
    /// `net.c` and `net.s` as the addresses of a /24.
    fn pair(prefix: &str, tag: char, net: [u8; 3]) -> Result<Self> {
        let c = format!("{prefix}-{tag}c");
        let s = format!("{prefix}-{tag}s");
        let mut me = Self(Vec::new());
        for n in [&c, &s] {
            net::ip(&["netns", "add", n])?;
            me.0.push(n.clone());
        }
        let pid = std::process::id();
        let (ci, si) = (format!("fmb{pid}{tag}c"), format!("fmb{pid}{tag}s"));
        net::ip(&[
            "link", "add", &ci, "netns", &c, "type", "veth", "peer", "name", &si, "netns", &s,
        ])?;
        for (ns, ifname, host) in [(&c, &ci, 1u8), (&s, &si, 2u8)] {
            let addr = format!("{}.{}.{}.{host}/24", net[0], net[1], net[2]);
            net::ip_in(ns, &["addr", "add", &addr, "dev", ifname])?;
            net::ip_in(ns, &["link", "set", ifname, "mtu", "1450", "up"])?;
            net::ip_in(ns, &["link", "set", "lo", "up"])?;
        }
        Ok(me)
    }
    fn client(&self) -> &str {
        &self.0[0]
    }
    fn server(&self) -> &str {
        &self.0[1]
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for n in self.0.iter().rev() {
            if let Err(e) = net::ip(&["netns", "del", n]) {
                eprintln!("bench: removing netns {n}: {e:#}");
            }
        }
    }
}

// ---- load generators ------------------------------------------------------------------------------------------

/// CPU of the load generators' clients, and of their servers: the same one, so that every run takes the same
/// path. Unpinned, a run's round trip changed up to 3× with where the scheduler put the two ends; pinned to two
/// CPUs, the cross-CPU wake-ups of this VM (~40 µs) hid the datapath entirely. On one CPU the round trip is
/// the packet path plus two context switches, which is what the ratios compare.
const CLIENT_CPU: &str = "1";
const SERVER_CPU: &str = "1";

/// One sockperf ping-pong run: (median round trip µs, mean round trip µs).
pub(crate) fn sockperf_rr(netns: &str, ip: Ipv4Addr, port: u16, tcp: bool, secs: u32) -> Result<(f64, f64)> {
    let mut cmd = Command::new("timeout");
    cmd.args(["-k", "2", &(secs + 20).to_string(), "nsenter"])
        .arg(format!("--net=/run/netns/{netns}"))
        .args(["--", "taskset", "-c", CLIENT_CPU, "sockperf", "ping-pong"]);
    if tcp {
        cmd.arg("--tcp");
    }
    cmd.args([
        "-i",
        &ip.to_string(),
        "-p",
        &port.to_string(),
        "-t",
        &secs.to_string(),
    ]);
    let out = util::run(&mut cmd)?;
    let num_after = |marker: &str| -> Option<f64> {
        let line = out.lines().find(|l| l.contains(marker))?;
        let rest = &line[line.find(marker)? + marker.len()..];
        let s: String = rest
            .trim_start_matches([' ', '='])
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.')
            .collect();
        s.parse().ok()
    };
    let p50 = num_after("percentile 50.000").context("sockperf printed no median")?;
    let avg = num_after("avg-latency").unwrap_or(f64::NAN);
    Ok((p50, avg))
}

/// One iperf3 run (one TCP stream), bits per second received.
fn iperf(netns: &str, ip: Ipv4Addr, secs: u32) -> Result<f64> {
    let mut cmd = Command::new("timeout");
    cmd.args(["-k", "2", &(secs + 20).to_string(), "nsenter"])
        .arg(format!("--net=/run/netns/{netns}"))
        .args([
            "--",
            "taskset",
            "-c",
            CLIENT_CPU,
            "iperf3",
            "-J",
            "-c",
            &ip.to_string(),
            "-p",
            "5201",
        ])
        .args(["-t", &secs.to_string()]);
    let out = util::run(&mut cmd)?;
    let v: Value = serde_json::from_str(&out).context("iperf3 -J output")?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3: no end.sum_received.bits_per_second")
}

/// Cuts timed for the failover figure.
const FAILOVER_RUNS: usize = 5;
/// Agent restarts for the flows-lost figure.
const AGENT_RESTARTS: usize = 10;
/// Long-lived connections kept open across the restarts.
const RESTART_FLOWS: usize = 20;

/// Runs `measure` on a fresh `examples/three-clusters` lab in `out_dir/<name>`, taken down afterwards (also when
/// `measure` fails).
fn with_example_lab(
    plan: &Plan,
    out_dir: &Path,
    name: &str,
    measure: impl FnOnce(&Path, &state::LabState) -> Result<()>,
) -> Result<()> {
    if plan.build {
        crate::lab::build_daemons()?;
    }
    let topo = util::workspace_root().join("examples").join("three-clusters");
    let dir: PathBuf = out_dir.join(name);
    std::fs::create_dir_all(&dir)?;
    state::down(&dir)?;
    let result = state::up(&dir, &topo, false, Duration::from_secs(120)).and_then(|st| measure(&dir, &st));
    let down = state::down(&dir);
    result?;
    down
}

fn faults_part(plan: &Plan, out_dir: &Path, rows: &mut Vec<Row>) -> Result<()> {
    with_example_lab(plan, out_dir, "faults-lab", |dir, st| {
        faults_measure(dir, st, rows)
    })
}

fn faults_measure(dir: &Path, st: &state::LabState, rows: &mut Vec<Row>) -> Result<()> {
    let (client, vip, _) = st.client_of("east", "demo/client", "demo/echo")?;
    let grace = Duration::from_secs(3);

    // Failover: west is cut; new connections through the VIP that land on west's backends time out until the
    // grace period has passed and west's backends are withdrawn.
    let mut failovers = Vec::new();
    for run in 0..FAILOVER_RUNS {
        let addr = SocketAddr::from((vip, 80));
        state::cut(dir, "west", true)?;
        let cut_at = Instant::now();
        let last_failure = net::in_netns(&client.netns, || -> Result<Option<Instant>> {
            let mut buf = [0u8; 256];
            let mut last = None;
            let mut clean = 0;
            while cut_at.elapsed() < Duration::from_secs(30) && clean < 100 {
                let ok = TcpStream::connect_timeout(&addr, Duration::from_millis(100))
                    .and_then(|mut s| {
                        s.set_read_timeout(Some(Duration::from_millis(500)))?;
                        s.read(&mut buf)
                    })
                    .is_ok_and(|n| n > 0);
                if ok {
                    clean += 1;
                } else {
                    last = Some(Instant::now());
                    clean = 0;
                }
            }
            anyhow::ensure!(clean >= 100, "connections kept failing 30 s after the cut");
            Ok(last)
        })??;
        state::cut(dir, "west", false)?;
        let failover = last_failure.map_or(Duration::ZERO, |t| t - cut_at);
        println!(
            "  cut {}: last failed connection {:.0} ms after the cut (grace {} ms)",
            run + 1,
            failover.as_secs_f64() * 1e3,
            grace.as_millis()
        );
        failovers.push(failover.saturating_sub(grace).as_secs_f64() * 1e3);
        // West back in every agent before the next cut.
        net::wait_for("west's backends to return", Duration::from_secs(30), || {
            let mut seen = false;
            for _ in 0..30 {
                if net::probe_tcp(&client.netns, vip, 80).is_ok_and(|l| l.starts_with("west/")) {
                    seen = true;
                    break;
                }
            }
            if seen {
                Ok(())
            } else {
                Err("no connection reached west".to_owned())
            }
        })?;
    }
    failovers.sort_by(f64::total_cmp);
    let worst = failovers.last().copied().unwrap_or(f64::NAN);
    rows.push(Row {
        goal: Some(("<=", 1.0)),
        ..row(
            format!("Failover after a cluster is cut: last failed new connection - grace period ({FAILOVER_RUNS} cuts; ratio = worst / 1 s)"),
            format!("median {:.0} ms, worst {worst:.0} ms beyond the {} s grace", median(&failovers), grace.as_secs()),
            "1000 ms".to_owned(),
            Some(worst / 1000.0),
        )
    });

    // Flows across agent restarts: long-lived connections through the VIP (stream port 90) from the client;
    // the client's agent is restarted (graceful and SIGKILL in turn); every flow must answer after each.
    let addr = SocketAddr::from((vip, 90));
    let mut flows = net::in_netns(&client.netns, || -> Result<Vec<(TcpStream, String)>> {
        (0..RESTART_FLOWS)
            .map(|_| {
                let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
                s.set_read_timeout(Some(Duration::from_secs(2)))?;
                let who = ask_stream(&mut s)?;
                Ok((s, who))
            })
            .collect()
    })??;
    let mut lost = std::collections::BTreeSet::new();
    for restart in 0..AGENT_RESTARTS {
        state::restart(dir, state::Daemon::Agent, &client.node, restart % 2 == 1)?;
        for (i, (s, who)) in flows.iter_mut().enumerate() {
            if ask_stream(s).ok().as_ref() != Some(who) {
                lost.insert(i);
            }
        }
    }
    println!(
        "  {} of {RESTART_FLOWS} flows lost across {AGENT_RESTARTS} agent restarts",
        lost.len()
    );
    #[expect(clippy::cast_precision_loss, reason = "a handful of flows")]
    let lost_count = lost.len() as f64;
    rows.push(Row {
        goal: Some(("<=", 0.0)),
        ..row(
            format!("Flows through a VIP lost across {AGENT_RESTARTS} restarts of the client's agent (graceful and SIGKILL; ratio = flows lost)"),
            format!("{} of {RESTART_FLOWS}", lost.len()),
            "0".to_owned(),
            Some(lost_count),
        )
    });
    Ok(())
}

/// One line to a stream port and its answer.
fn ask_stream(s: &mut TcpStream) -> Result<String> {
    use std::io::{BufRead as _, Write as _};
    s.write_all(b"ping\n")?;
    let mut line = String::new();
    std::io::BufReader::new(s.try_clone()?).read_line(&mut line)?;
    anyhow::ensure!(!line.is_empty(), "closed");
    Ok(line.trim_end().to_owned())
}

/// Halt-time runs (fewer with `--quick`).
const HALT_RUNS: usize = 20;
/// Successful connections in a row after the last failure that end a halt-time run.
const HALT_CLEAN_RUN: u32 = 100;

fn rollout_part(plan: &Plan, out_dir: &Path, rows: &mut Vec<Row>) -> Result<()> {
    with_example_lab(plan, out_dir, "rollout-lab", |dir, st| {
        rollout_measure(plan, dir, st, rows)
    })
}

fn rollout_measure(plan: &Plan, dir: &Path, st: &state::LabState, rows: &mut Vec<Row>) -> Result<()> {
    let (client, vip, _) = st.client_of("east", "demo/client", "demo/echo")?;
    let addr = SocketAddr::from((vip, 80));
    let files = dir.join("bench-manifests");
    std::fs::create_dir_all(&files)?;
    for (pod, node) in [("echo-a", "north-node-1"), ("echo-b", "north-node-2")] {
        let f = files.join(format!("north-{pod}.yaml"));
        std::fs::write(
            &f,
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {pod}\n  namespace: demo\n  labels: {{app: echo}}\n  annotations: {{lab.fleetmesh.io/fail: reset}}\nspec:\n  nodeName: {node}\n  containers:\n    - name: echo\n      ports:\n        - {{containerPort: 8080, protocol: TCP}}\n        - {{containerPort: 5353, protocol: UDP}}\n        - {{name: stream, containerPort: 9090, protocol: TCP}}\n"
            ),
        )?;
        state::apply(dir, "north", &f, false)?;
    }
    let runs = if plan.rounds < 5 { 5 } else { HALT_RUNS };
    let mut halts = Vec::new();
    for run in 0..runs {
        // A new spec each run starts the rollout over at its first step (50% to north).
        let f = files.join("rollout.yaml");
        std::fs::write(
            &f,
            format!(
                "apiVersion: fleetmesh.io/v1alpha1\nkind: StagedRollout\nmetadata: {{name: echo-v2, namespace: demo}}\nspec:\n  service: echo\n  from: {{names: [west]}}\n  to: {{matchLabels: {{track: v2}}}}\n  steps: [50, 100]\n  holdSeconds: {}\n  gate: {{maxFailureRatio: 0.02}}\n",
                600 + run
            ),
        )?;
        state::apply(dir, "east", &f, false)?;
        let halt = net::in_netns(&client.netns, || -> Result<Duration> {
            let started = Instant::now();
            let mut buf = [0u8; 256];
            let (mut first, mut last) = (None, None);
            let mut clean = 0u32;
            while started.elapsed() < Duration::from_secs(30) {
                match connect_once(addr, &mut buf) {
                    Err(_) => {
                        let now = Instant::now();
                        first.get_or_insert(now);
                        last = Some(now);
                        clean = 0;
                    }
                    Ok(()) if first.is_some() => {
                        clean += 1;
                        if clean >= HALT_CLEAN_RUN {
                            break;
                        }
                    }
                    Ok(()) => {}
                }
            }
            match (first, last) {
                (Some(f), Some(l)) if clean >= HALT_CLEAN_RUN => Ok(l - f),
                (None, _) => {
                    bail!("no connection failed within 30 s: the rollout did not send traffic to north")
                }
                _ => bail!("connections kept failing for 30 s: the rollout did not halt"),
            }
        })??;
        println!(
            "  run {}: halted {:.0} ms after the first failed connection",
            run + 1,
            halt.as_secs_f64() * 1e3
        );
        halts.push(halt.as_secs_f64() * 1e3);
    }
    let (p50, p99) = (percentile(&mut halts, 0.5), percentile(&mut halts, 0.99));
    rows.push(Row {
        goal: Some(("<=", 1.0)),
        ..row(
            format!("StagedRollout halt time, gate breach -> all new connections on `from` (p50 / p99 of {runs} runs; ratio = p99 / 1 s)"),
            format!("p50 {p50:.0} ms, p99 {p99:.0} ms"),
            "1000 ms".to_owned(),
            Some(p99 / 1000.0),
        )
    });
    Ok(())
}

const CONNECT_MAX: u64 = 200_000;
const CONNECT_FAILURES_MAX: u32 = 20;

/// One connection: connect, read the first bytes, close with RST.
fn connect_once(addr: SocketAddr, buf: &mut [u8]) -> Result<()> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .with_context(|| format!("connect {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let got = s.read(buf).with_context(|| format!("read {addr}"))?;
    anyhow::ensure!(got > 0, "{addr} closed without answering");
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a socket we own, with a pointer to a live `linger` and its exact size.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            u32::try_from(size_of::<libc::linger>()).unwrap_or(8),
        );
    }
    Ok(())
}

/// TCP connections per second from `netns` to `addr` (connect, read the first bytes, close with RST so that no
/// TIME_WAIT accumulates), for `secs` seconds or [`CONNECT_MAX`] connections.
fn connect_rate(netns: &str, addr: SocketAddr, secs: u32) -> Result<f64> {
    net::in_netns(netns, || -> Result<f64> {
        let limit = Duration::from_secs(u64::from(secs));
        let started = Instant::now();
        let mut n = 0u64;
        let mut buf = [0u8; 256];
        let mut failed = 0u32;
        while started.elapsed() < limit && n < CONNECT_MAX {
            match connect_once(addr, &mut buf) {
                Ok(()) => n += 1,
                // On a saturated machine a SYN or an answer is occasionally lost: count, go on, give up if many.
                Err(e) if failed < CONNECT_FAILURES_MAX => {
                    failed += 1;
                    eprintln!("bench: {addr}: {e:#} (after {n} connections; failure {failed})");
                }
                Err(e) => return Err(e.context(format!("{failed} earlier failures, {n} connections"))),
            }
        }
        Ok(n as f64 / started.elapsed().as_secs_f64())
    })?
}

/// Waits until a TCP connect to `addr` from `netns` succeeds.
pub(crate) fn wait_listening(netns: &str, addr: SocketAddr) -> Result<()> {
    net::wait_for(&format!("{addr} to listen"), Duration::from_secs(15), || {
        net::in_netns(netns, || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(500)).map(|_| ())
        })
        .map_err(|e| format!("{e:#}"))?
        .map_err(|e| e.to_string())
    })
}

// ---- entry point ----------------------------------------------------------------------------------------------

pub fn run(args: BenchArgs) -> Result<()> {
    anyhow::ensure!(
        util::is_root(),
        "the bench needs root (network namespaces, eBPF, nftables)"
    );
    let started = Instant::now();
    let parts = if args.only.is_empty() {
        vec![
            Part::Lab,
            Part::Lb,
            Part::Nft,
            Part::Rollout,
            Part::Scale,
            Part::Faults,
            Part::Policy,
            Part::Dns,
            Part::Fleet,
            Part::Encryption,
        ]
    } else {
        args.only
    };
    let plan = if args.quick {
        Plan {
            build: !args.no_build,
            rounds: 3,
            secs: 1,
            nft_sizes: vec![1, 10_000],
        }
    } else {
        Plan {
            build: !args.no_build,
            rounds: 5,
            secs: 3,
            nft_sizes: vec![1, 10_000, 100_000],
        }
    };
    if !args.no_setup {
        setup::run(&setup::SetupArgs::default())?;
    }
    if parts.contains(&Part::Nft) && util::which("nft").is_none() {
        println!("bench: nft is missing: installing the Debian package nftables (kube-proxy baseline)");
        util::run_status(Command::new("apt-get").args([
            "install",
            "-y",
            "--no-install-recommends",
            "nftables",
        ]))?;
    }
    let out_dir = util::workspace_root().join("target").join("bench");
    std::fs::create_dir_all(&out_dir)?;
    let out_dir = out_dir.canonicalize()?;

    let mut rows = Vec::new();
    let mut notes = Vec::new();
    if parts.contains(&Part::Lb) {
        println!("\n== eBPF load balancer: per-packet cost vs number of services (BPF_PROG_TEST_RUN)");
        lb_part(&plan, &mut rows)?;
    }
    if parts.contains(&Part::Nft) {
        println!("\n== nftables DNAT (kube-proxy nftables mode) vs number of services");
        nft_part(&plan, &out_dir, &mut rows, &mut notes)?;
    }
    if parts.contains(&Part::Lab) {
        println!("\n== fleetmesh lab: request/response, throughput, connections (1 cluster x 2 nodes)");
        lab_part(&plan, &out_dir, &mut rows)?;
    }
    if parts.contains(&Part::Scale) {
        println!(
            "\n== synthetic fleet: convergence, bootstrap, memory, CPU, metrics, relabels (10 clusters, real etcds, one agent)"
        );
        for (what, value, baseline, ratio, goal) in crate::scale::run(plan.build, plan.rounds < 5, &out_dir)?
        {
            rows.push(Row {
                goal,
                ..row(what, value, baseline, ratio)
            });
        }
    }
    if parts.contains(&Part::Faults) {
        println!(
            "\n== faults: failover after a cluster cut, flows across agent restarts (three-clusters example)"
        );
        faults_part(&plan, &out_dir, &mut rows)?;
    }
    if parts.contains(&Part::Rollout) {
        println!("\n== staged rollout: halt time when the target clusters fail (three-clusters example)");
        rollout_part(&plan, &out_dir, &mut rows)?;
    }

    if parts.contains(&Part::Policy) {
        println!(
            "\n== network policy: per-packet cost with 1,000 rules, change latency across clusters (three-clusters example)"
        );
        with_example_lab(&plan, &out_dir, "policy-lab", |dir, st| {
            crate::bench_policy::measure(&plan, dir, st, &mut rows)
        })?;
    }

    if parts.contains(&Part::Dns) {
        println!(
            "\n== clusterset DNS: queries/s and latency vs dnsmasq, remote change → answer, memory (three-clusters example)"
        );
        // The daemons' own speed is measured: release builds, as the scale part runs.
        crate::lab::use_release(true);
        let result = with_example_lab(&plan, &out_dir, "dns-lab", |dir, st| {
            crate::bench_dns::measure(&plan, dir, st, &mut rows)
        });
        crate::lab::use_release(false);
        result?;
    }

    if parts.contains(&Part::Fleet) {
        println!(
            "\n== fleet: one backend change of a 10,000-backend service on the wire (real etcd and apiserver)"
        );
        let mut fleet = crate::bench_fleet::run(plan.build, &out_dir)?;
        println!(
            "\n== fleet hub: 1,000 clusters × 1,000 endpoints in a 3-member hub, one real agent (bootstrap, changes, memory, connections, selector)"
        );
        fleet.extend(crate::bench_hub::run(&out_dir)?);
        for (what, value, baseline, ratio, goal) in fleet {
            rows.push(Row {
                goal,
                ..row(what, value, baseline, ratio)
            });
        }
    }

    if parts.contains(&Part::Encryption) {
        println!(
            "\n== encryption: agent WireGuard vs wireguard-go and vs the clear overlay (3 clusters, 5 nodes)"
        );
        crate::bench_encryption::part(&plan, &out_dir, &mut rows)?;
    }

    let report = render(&rows, &notes, &plan, started.elapsed());
    println!("\n{report}");
    let path = out_dir.join("report.md");
    std::fs::write(&path, &report).with_context(|| format!("writing {}", path.display()))?;
    println!("bench: report written to {}", path.display());
    Ok(())
}

fn render(rows: &[Row], notes: &[String], plan: &Plan, took: Duration) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| measurement | value | baseline | ratio | goal | |\n|---|---|---|---|---|---|"
    );
    for r in rows {
        let ratio = r.ratio.map_or_else(String::new, |x| format!("{x:.2}x"));
        let goal = r.goal.map_or_else(String::new, |(op, g)| {
            format!("{} {g:.2}", if op == ">=" { "≥" } else { "≤" })
        });
        let _ = writeln!(
            s,
            "| {} | {} | {} | {ratio} | {goal} | {} |",
            r.what,
            r.value,
            r.baseline,
            r.verdict()
        );
    }
    let _ = writeln!(
        s,
        "\n{} rounds of {} s per load measurement; values are median (min) over rounds, ratios the median of \
         per-round ratios (each round measures value and baseline back to back). Run took {:.0} s.",
        plan.rounds,
        plan.secs,
        took.as_secs_f64()
    );
    for n in notes {
        let _ = writeln!(s, "- {n}");
    }
    s
}

// ---- lb: eBPF per-packet cost and map memory ------------------------------------------------------------------

fn lb_part(plan: &Plan, rows: &mut Vec<Row>) -> Result<()> {
    if plan.build {
        println!("bench: building mesh-agent's lb_cost example (release)");
        util::run_status(util::cargo().args([
            "build",
            "--release",
            "-p",
            "mesh-agent",
            "--example",
            "lb_cost",
        ]))?;
    }
    let bin = util::workspace_root().join("target/release/examples/lb_cost");
    let rounds = plan.rounds.max(5).to_string();
    let mut cmd = Command::new("timeout");
    cmd.args(["-k", "2", "300"]).arg(&bin).args([
        "--services",
        "2,1000,10000,100000",
        "--repeat",
        "100000",
        "--rounds",
        &rounds,
    ]);
    let out = util::run(&mut cmd)?;
    let lines: Vec<Value> = out.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let floats = |v: &Value| -> Vec<f64> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_f64)
            .collect()
    };
    let lb: Vec<&Value> = lines.iter().filter(|v| v["kind"] == "lb").collect();
    let (Some(first), Some(last)) = (lb.first(), lb.last()) else {
        bail!("lb_cost printed no measurement:\n{out}");
    };
    for v in &lb {
        let (vip, pod) = (floats(&v["vip_ns"]), floats(&v["pod_ns"]));
        println!(
            "  {:>6} frontends: VIP packet {:.0} ns, pod packet {:.0} ns, LB {:+.0} ns; spread over all frontends {:.0} ns vs {:.0} ns",
            v["services"],
            median(&vip),
            median(&pod),
            median(&vip) - median(&pod),
            v["spread_vip_ns"].as_f64().unwrap_or(f64::NAN),
            v["spread_none_ns"].as_f64().unwrap_or(f64::NAN),
        );
        rows.push(row(
            format!("eBPF from_pod ns/packet, {} frontends", v["services"]),
            format!("VIP {:.0} ns", median(&vip)),
            format!("pod IP {:.0} ns", median(&pod)),
            Some(median(&vip) / median(&pod)),
        ));
    }
    let (v1, vn) = (
        median(&floats(&first["vip_ns"])),
        median(&floats(&last["vip_ns"])),
    );
    rows.push(Row {
        goal: Some(("<=", 1.1)),
        ..row(
            format!(
                "eBPF LB cost {} vs {} frontends (same flow, hot)",
                last["services"], first["services"]
            ),
            format!("{vn:.0} ns"),
            format!("{v1:.0} ns"),
            Some(vn / v1),
        )
    });
    let (s1, sn) = (
        first["spread_vip_ns"].as_f64().unwrap_or(f64::NAN),
        last["spread_vip_ns"].as_f64().unwrap_or(f64::NAN),
    );
    rows.push(Row {
        goal: Some(("<=", 1.1)),
        ..row(
            format!(
                "eBPF LB cost {} vs {} frontends (cache-cold: 16k flows on random frontends, 1 run per call)",
                last["services"], first["services"]
            ),
            format!("{sn:.0} ns"),
            format!("{s1:.0} ns"),
            Some(sn / s1),
        )
    });

    for v in lines.iter().filter(|v| v["kind"] == "weighted") {
        let ns = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
        let (w, large, u) = (ns("weighted_ns"), ns("weighted_large_ns"), ns("unweighted_ns"));
        println!("  new flow: weighted 1:9 {w:.0} ns, weighted 333:667 {large:.0} ns, unweighted {u:.0} ns");
        rows.push(Row {
            goal: Some(("<=", 1.05)),
            ..row(
                "eBPF new-flow cost, weighted 10/90 as programmed (1 + 9 slots) vs unweighted (1 slot)",
                format!("{w:.0} ns"),
                format!("{u:.0} ns"),
                Some(w / u),
            )
        });
        rows.push(row(
            "eBPF new-flow cost, weighted with irreducible shares (333 + 667 slots) vs unweighted (1 slot)",
            format!("{large:.0} ns"),
            format!("{u:.0} ns"),
            Some(large / u),
        ));
    }

    for v in lines.iter().filter(|v| v["kind"] == "map") {
        let get = |k: &str| v[k].as_f64().unwrap_or(0.0);
        let name = v["name"].as_str().unwrap_or("?");
        let prealloc = get("memlock_filled") == get("memlock_empty");
        let (per_entry, how) = if prealloc {
            (
                get("memlock_filled") / get("max_entries"),
                "preallocated: memlock / max_entries",
            )
        } else {
            (
                (get("memlock_filled") - get("memlock_empty")) / get("filled_entries"),
                "allocated on insert: memlock growth / entries",
            )
        };
        rows.push(row(
            format!(
                "map {name}: bytes per entry (key {} + value {})",
                get("key_size"),
                get("value_size")
            ),
            format!("{per_entry:.0} B ({how})"),
            format!(
                "{:.1} MiB when empty, max_entries {}",
                get("memlock_empty") / 1_048_576.0,
                get("max_entries")
            ),
            None,
        ));
    }
    Ok(())
}

// ---- nft: kube-proxy nftables baseline ------------------------------------------------------------------------

const NFT_TABLE: &str = "fmbench";
const NFT_SERVER: Ipv4Addr = Ipv4Addr::new(10, 250, 1, 2);
const NFT_VIP_BASE: u32 = u32::from_be_bytes([10, 96, 0, 1]);

/// The kube-proxy nftables layout, reduced to what a packet to a ClusterIP meets: a verdict map keyed by
/// `ip daddr . meta l4proto . th dport` in a nat prerouting chain, jumping to one chain per service with its DNAT.
fn nft_ruleset(n: u32) -> String {
    let mut s = format!("table ip {NFT_TABLE} {{\n");
    for i in 0..n {
        let _ = writeln!(
            s,
            " chain svc-{i} {{\n  meta l4proto tcp dnat to {NFT_SERVER}:8080\n }}"
        );
    }
    s.push_str(
        " map service-ips {\n  type ipv4_addr . inet_proto . inet_service : verdict\n  elements = {\n",
    );
    for i in 0..n {
        let sep = if i + 1 == n { "" } else { "," };
        let _ = writeln!(
            s,
            "   {} . tcp . 80 : goto svc-{i}{sep}",
            Ipv4Addr::from(NFT_VIP_BASE + i)
        );
    }
    s.push_str("  }\n }\n chain prerouting {\n  type nat hook prerouting priority dstnat; policy accept;\n  ip daddr . meta l4proto . th dport vmap @service-ips\n }\n}\n");
    s
}

fn nft_part(plan: &Plan, out_dir: &Path, rows: &mut Vec<Row>, notes: &mut Vec<String>) -> Result<()> {
    let prefix = format!("fmbench{}", std::process::id());
    let ns = Netns::pair(&prefix, 'n', [10, 250, 1])?;
    net::ip_in(
        ns.client(),
        &["route", "add", "10.96.0.0/12", "via", &NFT_SERVER.to_string()],
    )?;
    let mut procs = Procs::default();
    let me = std::env::current_exe()?;
    procs.spawn(
        ns.server(),
        &me.display().to_string(),
        &[
            "echo",
            "--name",
            "bench/nft/server",
            "--tcp",
            "8080",
            "--tcp",
            "8081",
        ],
    )?;
    // Direct connections use another port than the DNAT target, so that their tuples never meet the reply
    // tuples of DNATed connections in conntrack.
    let direct = SocketAddr::from((NFT_SERVER, 8081));
    let vip = SocketAddr::from((Ipv4Addr::from(NFT_VIP_BASE), 80));
    wait_listening(ns.client(), direct)?;

    let mut results: Vec<(u32, Vec<f64>, Vec<f64>)> = Vec::new();
    for &n in &plan.nft_sizes {
        let file = out_dir.join(format!("nft-{n}.nft"));
        std::fs::write(&file, nft_ruleset(n))?;
        let _ = util::run(Command::new("nsenter").args([
            &format!("--net=/run/netns/{}", ns.server()),
            "nft",
            "delete",
            "table",
            "ip",
            NFT_TABLE,
        ]));
        let t = Instant::now();
        print!("bench: loading {n} nftables services ... ");
        let _ = std::io::Write::flush(&mut std::io::stdout());
        util::run(Command::new("timeout").args([
            "-k",
            "2",
            "600",
            "nsenter",
            &format!("--net=/run/netns/{}", ns.server()),
            "nft",
            "-f",
            &file.display().to_string(),
        ]))?;
        println!("{:.1}s", t.elapsed().as_secs_f64());
        notes.push(format!(
            "nftables: loading {n} services (chains + verdict map) took {:.1} s",
            t.elapsed().as_secs_f64()
        ));
        let (mut via_vip, mut via_direct) = (Vec::new(), Vec::new());
        for _ in 0..plan.rounds {
            via_vip.push(connect_rate(ns.client(), vip, plan.secs)?);
            via_direct.push(connect_rate(ns.client(), direct, plan.secs)?);
        }
        println!(
            "  {n:>6} services: {} conn/s via VIP (DNAT), {} conn/s to the server IP (same table, map miss)",
            si(median(&via_vip)),
            si(median(&via_direct))
        );
        rows.push(row(
            format!("nftables TCP conn/s via VIP, {n} services"),
            rates(&via_vip, "/s"),
            format!("server IP {}", rates(&via_direct, "/s")),
            Some(median(&ratios(&via_vip, &via_direct))),
        ));
        results.push((n, via_vip, via_direct));
    }
    if let (Some(a), Some(b)) = (results.first(), results.last())
        && a.0 != b.0
    {
        // Cost per connection grows as the rate falls: ratio of times = inverse ratio of rates, each normalised
        // to the same round's direct connections (which share everything but the DNAT).
        let norm_a = median(&ratios(&a.2, &a.1));
        let norm_b = median(&ratios(&b.2, &b.1));
        rows.push(Row {
            goal: Some(("<=", 1.1)),
            ..row(
                format!(
                    "nftables time per VIP connection {} vs {} services (normalised to direct)",
                    b.0, a.0
                ),
                format!("{norm_b:.3}x direct"),
                format!("{norm_a:.3}x direct"),
                Some(norm_b / norm_a),
            )
        });
    }
    drop(procs);
    drop(ns);
    Ok(())
}

// ---- lab: RR, throughput, connections --------------------------------------------------------------------------

const TOPOLOGY: &str = "clusters:\n  - name: bench\n    id: 77\n    podCIDR: 10.77.0.0/16\n    nodes: 2\n";

fn manifests() -> String {
    let pod = |name: &str, node: &str, app: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: bench, labels: {{app: {app}}}}}\nspec:\n  nodeName: {node}\n  containers:\n    - name: echo\n      ports: [{{containerPort: 8080}}]\n"
        )
    };
    let svc = |name: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: bench}}\nspec:\n  selector: {{app: {name}}}\n  ports:\n    - {{name: probe, port: 8080, targetPort: 8080, protocol: TCP}}\n    - {{name: rr-tcp, port: 5001, targetPort: 5001, protocol: TCP}}\n    - {{name: rr-udp, port: 5002, targetPort: 5002, protocol: UDP}}\n"
        )
    };
    [
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: bench}\n".to_owned(),
        pod("client", "bench-node-1", "client"),
        pod("local", "bench-node-1", "local"),
        pod("remote", "bench-node-2", "remote"),
        svc("local"),
        svc("remote"),
    ]
    .join("---\n")
}

/// A path the lab measures: client namespace and destination address.
struct Target {
    name: &'static str,
    netns: String,
    ip: Ipv4Addr,
}

fn lab_part(plan: &Plan, out_dir: &Path, rows: &mut Vec<Row>) -> Result<()> {
    if plan.build {
        crate::lab::build_daemons()?;
    }
    let topo = out_dir.join("topology");
    std::fs::create_dir_all(topo.join("bench"))?;
    std::fs::write(topo.join("lab.yaml"), TOPOLOGY)?;
    std::fs::write(topo.join("bench").join("bench.yaml"), manifests())?;
    let dir: PathBuf = out_dir.join("lab");
    std::fs::create_dir_all(&dir)?;
    state::down(&dir)?;
    let result = (|| -> Result<()> {
        let st = state::up(&dir, &topo, false, Duration::from_secs(120))?;
        lab_measure(plan, &st, rows)
    })();
    let down = state::down(&dir);
    result?;
    down
}

fn lab_measure(plan: &Plan, st: &state::LabState, rows: &mut Vec<Row>) -> Result<()> {
    let c = st.clusters.first().context("no cluster")?;
    let pod = |k: &str| c.pods.get(k).with_context(|| format!("pod {k} missing"));
    let vip = |k: &str| {
        c.service_ips
            .get(k)
            .copied()
            .with_context(|| format!("service {k} has no ClusterIP"))
    };
    let (client, local, remote) = (pod("bench/client")?, pod("bench/local")?, pod("bench/remote")?);
    let (vip_local, vip_remote) = (vip("bench/local")?, vip("bench/remote")?);

    let veth = Netns::pair(&format!("fmbench{}", std::process::id()), 'v', [10, 250, 0])?;
    let veth_server = Ipv4Addr::new(10, 250, 0, 2);
    let mut procs = Procs::default();
    for ns in [local.netns.as_str(), remote.netns.as_str(), veth.server()] {
        procs.spawn(
            ns,
            "sockperf",
            &["server", "--tcp", "-i", "0.0.0.0", "-p", "5001"],
        )?;
        procs.spawn(ns, "sockperf", &["server", "-i", "0.0.0.0", "-p", "5002"])?;
        procs.spawn(ns, "iperf3", &["-s", "-p", "5201"])?;
    }
    wait_listening(veth.client(), SocketAddr::from((veth_server, 5001)))?;
    wait_listening(&client.netns, SocketAddr::from((local.ip, 5001)))?;
    wait_listening(&client.netns, SocketAddr::from((remote.ip, 5001)))?;
    wait_listening(&client.netns, SocketAddr::from((remote.ip, 5201)))?;
    // The services are programmed asynchronously: wait until each VIP answers as its one backend.
    for (v, who) in [
        (vip_local, "bench/bench/local"),
        (vip_remote, "bench/bench/remote"),
    ] {
        net::wait_for(
            &format!("{v} to reach {who}"),
            Duration::from_secs(30),
            || match net::probe_tcp(&client.netns, v, 8080) {
                Ok(line) if line == who => Ok(()),
                Ok(line) => Err(format!("answered {line}")),
                Err(e) => Err(format!("{e:#}")),
            },
        )?;
        wait_listening(&client.netns, SocketAddr::from((v, 5001)))?;
    }

    let targets = [
        Target {
            name: "veth",
            netns: veth.client().to_owned(),
            ip: veth_server,
        },
        Target {
            name: "same-pod",
            netns: client.netns.clone(),
            ip: local.ip,
        },
        Target {
            name: "same-vip",
            netns: client.netns.clone(),
            ip: vip_local,
        },
        Target {
            name: "other-pod",
            netns: client.netns.clone(),
            ip: remote.ip,
        },
        Target {
            name: "other-vip",
            netns: client.netns.clone(),
            ip: vip_remote,
        },
    ];
    let idx = |name: &str| targets.iter().position(|t| t.name == name).unwrap_or(0);
    // rr[proto][target] = RR/s per round; tput[target] bits/s; conns[target] conn/s.
    let mut rr = [vec![Vec::new(); targets.len()], vec![Vec::new(); targets.len()]];
    let mut tput = vec![Vec::new(); targets.len()];
    let mut conns = vec![Vec::new(); targets.len()];
    for round in 1..=plan.rounds {
        println!("bench: round {round}/{}", plan.rounds);
        for (ti, t) in targets.iter().enumerate() {
            for (pi, tcp) in [true, false].into_iter().enumerate() {
                let port = if tcp { 5001 } else { 5002 };
                let (p50, avg) = sockperf_rr(&t.netns, t.ip, port, tcp, plan.secs)
                    .with_context(|| format!("sockperf to {} ({})", t.ip, t.name))?;
                println!(
                    "  {:<10} {} RR: median RTT {p50:.2} µs (mean {avg:.2} µs)",
                    t.name,
                    if tcp { "TCP" } else { "UDP" }
                );
                rr[pi][ti].push(1e6 / p50);
            }
            if !t.name.ends_with("vip") {
                let bps = iperf(&t.netns, t.ip, plan.secs)
                    .with_context(|| format!("iperf3 to {} ({})", t.ip, t.name))?;
                println!("  {:<10} iperf3 1 stream: {:.2} Gbit/s", t.name, bps / 1e9);
                tput[ti].push(bps);
            }
            if t.name != "veth" {
                let r = connect_rate(&t.netns, SocketAddr::from((t.ip, 8080)), plan.secs)?;
                println!("  {:<10} TCP connections: {}/s", t.name, si(r));
                conns[ti].push(r);
            }
        }
    }

    for (pi, proto) in ["TCP", "UDP"].into_iter().enumerate() {
        let r = &rr[pi];
        for (where_, vip_t, pod_t) in [
            ("same node", "same-vip", "same-pod"),
            ("other node", "other-vip", "other-pod"),
        ] {
            rows.push(Row {
                goal: Some((">=", 0.95)),
                ..row(
                    format!("RR {proto} VIP/pod IP, {where_}"),
                    rates(&r[idx(vip_t)], "RR/s"),
                    rates(&r[idx(pod_t)], "RR/s"),
                    Some(median(&ratios(&r[idx(vip_t)], &r[idx(pod_t)]))),
                )
            });
        }
        rows.push(Row {
            goal: Some((">=", 0.90)),
            ..row(
                format!("RR {proto} same-node pod/plain veth"),
                rates(&r[idx("same-pod")], "RR/s"),
                rates(&r[idx("veth")], "RR/s"),
                Some(median(&ratios(&r[idx("same-pod")], &r[idx("veth")]))),
            )
        });
        rows.push(row(
            format!("RR {proto} other-node pod (VXLAN)/plain veth"),
            rates(&r[idx("other-pod")], "RR/s"),
            rates(&r[idx("veth")], "RR/s"),
            Some(median(&ratios(&r[idx("other-pod")], &r[idx("veth")]))),
        ));
    }
    rows.push(Row {
        goal: Some((">=", 0.90)),
        ..row(
            "iperf3 1 stream same-node pod/plain veth",
            rates(&tput[idx("same-pod")], "bit/s"),
            rates(&tput[idx("veth")], "bit/s"),
            Some(median(&ratios(&tput[idx("same-pod")], &tput[idx("veth")]))),
        )
    });
    rows.push(row(
        "iperf3 1 stream other-node pod (VXLAN)/plain veth",
        rates(&tput[idx("other-pod")], "bit/s"),
        rates(&tput[idx("veth")], "bit/s"),
        Some(median(&ratios(&tput[idx("other-pod")], &tput[idx("veth")]))),
    ));
    for (where_, vip_t, pod_t) in [
        ("same node", "same-vip", "same-pod"),
        ("other node", "other-vip", "other-pod"),
    ] {
        rows.push(row(
            format!("TCP conn/s (new flows) VIP/pod IP, {where_}"),
            rates(&conns[idx(vip_t)], "/s"),
            rates(&conns[idx(pod_t)], "/s"),
            Some(median(&ratios(&conns[idx(vip_t)], &conns[idx(pod_t)]))),
        ));
    }
    drop(procs);
    drop(veth);
    Ok(())
}
