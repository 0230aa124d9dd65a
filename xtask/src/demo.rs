//! `cargo xtask demo`: the main job of fleetmesh on the local lab. Brings up `examples/three-clusters`, shows
//! pods of three clusters talking over the eBPF overlay (TCP, UDP, ICMP on every path), adds a node to a
//! running cluster and shows it reachable from the others, steers a global service with a `TrafficPolicy` and a
//! `StagedRollout` (which completes, then halts when its target fails), then tears the lab down (unless `--keep`).
//! Then, unless `--no-hub`, a fleet hub: `examples/hub-three-clusters` (three clusters publishing into one 3-member
//! etcd and reading each other from it), pod-to-pod across every pair of clusters, and each agent's one connection
//! to the hub.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use clap::Args;

use crate::lab::{net, state};
use crate::{setup, util};

/// Arguments of `cargo xtask demo`.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Leave the lab up at the end (inspect it with `cargo xtask lab --lab-dir target/demo-lab status`).
    #[arg(long)]
    pub keep: bool,
    /// Topology to run.
    #[arg(long, default_value = "examples/three-clusters")]
    pub topology: PathBuf,
    /// Skip `cargo xtask setup`.
    #[arg(long)]
    pub no_setup: bool,
    /// Skip the fleet hub part (a second lab, `examples/hub-three-clusters`).
    #[arg(long)]
    pub no_hub: bool,
}

struct Tally {
    ok: usize,
    total: usize,
}

impl Tally {
    fn record(&mut self, ok: bool) -> &'static str {
        self.total += 1;
        if ok {
            self.ok += 1;
            "ok"
        } else {
            "FAIL"
        }
    }
}

pub fn run(args: &DemoArgs) -> Result<()> {
    anyhow::ensure!(
        util::is_root(),
        "the demo needs root (it creates network namespaces and loads eBPF programs)"
    );
    let started = Instant::now();
    if !args.no_setup {
        setup::run(&setup::SetupArgs::default())?;
    }
    crate::lab::build_daemons()?;
    let dir = util::workspace_root().join("target").join("demo-lab");
    std::fs::create_dir_all(&dir)?;
    let dir = dir.canonicalize()?;
    // A previous demo that crashed may have left its lab: remove it first.
    state::down(&dir)?;
    let topology = util::workspace_root().join(&args.topology);
    let result = demo(&dir, &topology);
    if args.keep {
        println!(
            "\ndemo: lab left up; `cargo xtask lab --lab-dir {} status` shows it, `... down` removes it",
            dir.display()
        );
    } else {
        state::down(&dir)?;
    }
    let mut summary = result?;
    if !args.no_hub {
        let hub_dir = util::workspace_root().join("target").join("demo-hub-lab");
        std::fs::create_dir_all(&hub_dir)?;
        let hub_dir = hub_dir.canonicalize()?;
        state::down(&hub_dir)?;
        let result = hub(
            &hub_dir,
            &util::workspace_root().join("examples/hub-three-clusters"),
        );
        if args.keep {
            println!(
                "demo: hub lab left up; `cargo xtask lab --lab-dir {} status` shows it",
                hub_dir.display()
            );
        } else {
            state::down(&hub_dir)?;
        }
        if !summary.ends_with('\n') {
            summary.push('\n');
        }
        summary.push_str(&result?);
    }
    println!(
        "\n{summary}\ndemo: done in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The fleet hub part: every cluster's client calls every cluster's `echo-a` through peers read from the hub, and
/// each node's agent holds one connection to the hub whatever its number of peers.
fn hub(dir: &std::path::Path, topology: &std::path::Path) -> Result<String> {
    println!(
        "\n== 7. A fleet hub: {} (3 clusters, one 3-member etcd hub)",
        topology.display()
    );
    let t = Instant::now();
    let st = state::up(dir, topology, false, Duration::from_secs(90))?;
    println!("demo: hub lab up in {:.1}s", t.elapsed().as_secs_f64());
    let hub = st.hub.as_ref().context("the topology has no hub")?;
    let mut tcp = Tally { ok: 0, total: 0 };
    for from in &st.clusters {
        let client = from.pods.get("demo/client").context("client pod missing")?;
        for to in &st.clusters {
            let echo = to.pods.get("demo/echo-a").context("echo-a pod missing")?;
            let want = format!("{}/demo/echo-a", to.name);
            let answer = net::probe_tcp(&client.netns, echo.ip, TCP);
            let ok = tcp.record(answer.as_ref().is_ok_and(|l| *l == want));
            println!("  {}/demo/client -> {want}: {ok}", from.name);
        }
    }
    let members: Vec<String> = hub.members.iter().map(|m| format!("{m}:2379")).collect();
    let mut conns = Vec::new();
    for c in &st.clusters {
        for n in &c.nodes {
            let ss = util::run(std::process::Command::new("ip").args([
                "netns",
                "exec",
                &n.netns,
                "ss",
                "-Htn",
                "state",
                "established",
            ]))?;
            let to_hub = ss
                .lines()
                .filter(|l| {
                    l.split_whitespace()
                        .nth(3)
                        .is_some_and(|p| members.iter().any(|m| m == p))
                })
                .count();
            println!(
                "  {}: {to_hub} connection(s) to the hub for its {} peers",
                n.name,
                st.clusters.len() - 1
            );
            conns.push(to_hub);
        }
    }
    let summary = format!(
        "  fleet hub: pod to pod through the hub {}/{} ok; connections to the hub per agent: {:?}\n",
        tcp.ok, tcp.total, conns
    );
    if tcp.ok != tcp.total {
        bail!(
            "{summary}some calls through the hub failed (logs in {})",
            dir.join("logs").display()
        );
    }
    Ok(summary)
}

fn demo(dir: &std::path::Path, topology: &std::path::Path) -> Result<String> {
    println!("\n== 1. Bring up the lab: {}", topology.display());
    let t = Instant::now();
    let st = state::up(dir, topology, false, Duration::from_secs(90))?;
    let up_secs = t.elapsed().as_secs_f64();
    println!("demo: lab up in {up_secs:.1}s");
    state::status(dir, false)?;

    println!("\n== 2. Every pod calls every other pod: TCP {TCP}, UDP {UDP}, ICMP");
    let pods: Vec<(String, &state::PodRt)> = st
        .clusters
        .iter()
        .flat_map(|c| {
            c.pods
                .values()
                .map(move |p| (format!("{}/{}/{}", c.name, p.namespace, p.name), p))
        })
        .collect();
    let node_of = |id: &str| {
        pods.iter()
            .find(|(i, _)| i == id)
            .map(|(_, p)| p.node.clone())
            .unwrap_or_default()
    };
    let (mut tcp, mut udp, mut icmp) = (
        Tally { ok: 0, total: 0 },
        Tally { ok: 0, total: 0 },
        Tally { ok: 0, total: 0 },
    );
    println!(
        "  {:<22} {:<22} {:<14} {:<5} {:<5} ICMP",
        "FROM", "TO", "PATH", "TCP", "UDP"
    );
    for (from_id, from) in &pods {
        for (to_id, to) in pods.iter().filter(|(i, _)| i != from_id) {
            let path = if from_id.split('/').next() != to_id.split('/').next() {
                "other cluster"
            } else if node_of(from_id) == node_of(to_id) {
                "same node"
            } else {
                "other node"
            };
            let t = tcp.record(net::probe_tcp(&from.netns, to.ip, TCP).is_ok_and(|l| &l == to_id));
            let u = udp.record(net::probe_udp(&from.netns, to.ip, UDP).is_ok_and(|l| &l == to_id));
            // ICMP from the clients only, to keep the table short.
            let i = if from.name == "client" {
                icmp.record(net::probe_ping(&from.netns, to.ip))
            } else {
                "-"
            };
            println!("  {from_id:<22} {to_id:<22} {path:<14} {t:<5} {u:<5} {i}");
        }
    }

    println!("\n== 3. A global service: balanced in eBPF at the client's veth over every cluster's backends");
    let services = global_service(dir, &st, &mut tcp)?;

    println!("\n== 4. Add a node to a running cluster and reach a pod on it from the other clusters");
    let t = Instant::now();
    state::add_node(dir, "west")?;
    let manifest = dir.join("demo-late-pod.yaml");
    std::fs::write(
        &manifest,
        "apiVersion: v1\nkind: Pod\nmetadata: {name: late, namespace: demo}\nspec:\n  nodeName: west-node-3\n  containers:\n    - name: echo\n      ports: [{containerPort: 8080}, {containerPort: 5353, protocol: UDP}]\n",
    )?;
    state::apply(dir, "west", &manifest, false)?;
    let add_ms = t.elapsed().as_millis();
    let st = state::LabState::load(dir)?.context("lab state disappeared")?;
    let west = st
        .clusters
        .iter()
        .find(|c| c.name == "west")
        .context("no cluster west")?;
    let late = west.pods.get("demo/late").context("pod west/demo/late missing")?;
    for c in st.clusters.iter().filter(|c| c.name != "west") {
        let client = c.pods.get("demo/client").context("client pod missing")?;
        let answer = net::probe_tcp(&client.netns, late.ip, TCP);
        let ok = tcp.record(answer.as_ref().is_ok_and(|l| l == "west/demo/late"));
        println!(
            "  {}/demo/client -> west/demo/late ({} on west-node-3): {ok} {}",
            c.name,
            late.ip,
            answer.unwrap_or_else(|e| format!("{e:#}"))
        );
    }

    println!("\n== 5. Fleet stages: a TrafficPolicy, then a StagedRollout from west to north (track: v2)");
    let stages = fleet_stages(dir, &st, &mut tcp)?;

    println!("\n== 6. Network policy across clusters: only clients may call west's echo pods");
    let policy = network_policy(dir, topology, &st, &mut tcp)?;

    let summary = format!(
        "demo summary:\n  lab up (3 clusters x 2 nodes, real etcd, apiservers, agents, eBPF): {up_secs:.1}s\n  TCP  {}/{} ok\n  UDP  {}/{} ok\n  ICMP {}/{} ok\n{services}\n  node added + pod on it reachable from every cluster: {add_ms} ms\n{stages}\n{policy}",
        tcp.ok, tcp.total, udp.ok, udp.total, icmp.ok, icmp.total
    );
    if tcp.ok != tcp.total || udp.ok != udp.total || icmp.ok != icmp.total {
        bail!(
            "{summary}\nsome calls failed (logs in {})",
            dir.join("logs").display()
        );
    }
    Ok(summary)
}

/// Connects `n` times to `vip:80` from `from` and returns the answering clusters with their counts.
fn shares(
    from: &state::PodRt,
    vip: std::net::Ipv4Addr,
    n: usize,
    tally: &mut Tally,
) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for _ in 0..n {
        let answer = net::probe_tcp(&from.netns, vip, 80);
        tally.record(answer.is_ok());
        let cluster = answer.map_or_else(
            |_| "(failed)".to_owned(),
            |l| l.split('/').next().unwrap_or_default().to_owned(),
        );
        *out.entry(cluster).or_insert(0) += 1;
    }
    out
}

fn show(label: &str, s: &BTreeMap<String, usize>) -> String {
    let total: usize = s.values().sum();
    let parts: Vec<String> = s.iter().map(|(c, n)| format!("{c} {n}/{total}")).collect();
    let line = format!("  {label:<44} {}", parts.join(", "));
    println!("{line}");
    line
}

/// Runs `meshctl ARGS --socket SOCKET` for the audience (its output goes to the terminal; a failure is shown, not
/// fatal).
fn meshctl_on(socket: &std::path::Path, args: &[&str]) {
    let _ = util::run_status(
        std::process::Command::new(crate::lab::bin("meshctl"))
            .args(args)
            .arg("--socket")
            .arg(socket),
    );
}

/// Part 3: spreading, affinity local, fallback to remote clusters when the local backends go.
fn global_service(dir: &std::path::Path, st: &state::LabState, tally: &mut Tally) -> Result<String> {
    let (client, vip, socket) = st.client_of("east", "demo/client", "demo/echo")?;
    let meshctl = |args: &[&str]| meshctl_on(&socket, args);
    println!(
        "  service demo/echo (annotation service.cilium.io/global: \"true\"), ClusterIP in east {vip}:80"
    );
    meshctl(&["service", "list"]);
    let mut lines = Vec::new();
    lines.push(show(
        "east/demo/client -> VIP, affinity none:",
        &shares(client, vip, 60, tally),
    ));

    let svc = |annotations: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: echo\n  namespace: demo\n  annotations: {{{annotations}}}\nspec:\n  selector: {{app: echo}}\n  ports:\n    - {{name: tcp, port: 80, targetPort: 8080, protocol: TCP}}\n    - {{name: udp, port: 53, targetPort: 5353, protocol: UDP}}\n    - {{name: stream, port: 90, targetPort: stream, protocol: TCP}}\n"
        )
    };
    let file = dir.join("demo-affinity-local.yaml");
    std::fs::write(
        &file,
        svc("service.cilium.io/global: 'true', service.cilium.io/affinity: local"),
    )?;
    state::apply(dir, "east", &file, false)?;
    let local = wait_for_shares(client, vip, tally, |s| s.keys().all(|c| c == "east"))?;
    lines.push(show("after affinity: local:", &local));

    let file = dir.join("demo-east-backends.yaml");
    std::fs::write(
        &file,
        "apiVersion: v1\nkind: Pod\nmetadata: {name: echo-a, namespace: demo}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: echo-b, namespace: demo}\n",
    )?;
    state::apply(dir, "east", &file, true)?;
    let fallback = wait_for_shares(client, vip, tally, |s| !s.contains_key("east") && !s.is_empty())?;
    lines.push(show("east's backends deleted (falls back):", &fallback));
    meshctl(&["service", "list"]);
    Ok(lines.join("\n"))
}

/// Part 5: weights by cluster group, a staged rollout that completes, one that halts on failures.
fn fleet_stages(dir: &std::path::Path, st: &state::LabState, tally: &mut Tally) -> Result<String> {
    let (client, vip, socket) = st.client_of("east", "demo/client", "demo/echo")?;
    let meshctl = |args: &[&str]| meshctl_on(&socket, args);
    let mut lines = Vec::new();
    let file = dir.join("demo-traffic-policy.yaml");
    std::fs::write(
        &file,
        "apiVersion: fleetmesh.io/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: echo-split, namespace: demo}\nspec:\n  service: echo\n  weights:\n    - clusters: {matchLabels: {stage: prod, region: us}}\n      weight: 80\n    - clusters: {names: [north]}\n      weight: 20\n",
    )?;
    state::apply(dir, "east", &file, false)?;
    println!("  TrafficPolicy demo/echo-split: clusters with stage=prod,region=us (west) 80, north 20");
    let split = wait_for_shares(client, vip, tally, |s| s.len() == 2)?;
    let s = shares(client, vip, 200, tally);
    let _ = split;
    lines.push(show("TrafficPolicy west 80 / north 20 (200 conns):", &s));
    meshctl(&["traffic", "demo/echo"]);

    let rollout = |hold: u32, steps: &str| -> Result<()> {
        let file = dir.join("demo-rollout.yaml");
        std::fs::write(
            &file,
            format!(
                "apiVersion: fleetmesh.io/v1alpha1\nkind: StagedRollout\nmetadata: {{name: echo-v2, namespace: demo}}\nspec:\n  service: echo\n  from: {{names: [west]}}\n  to: {{matchLabels: {{track: v2}}}}\n  steps: {steps}\n  holdSeconds: {hold}\n  gate: {{maxFailureRatio: 0.02}}\n"
            ),
        )?;
        state::apply(dir, "east", &file, false)
    };
    println!(
        "  StagedRollout demo/echo-v2: west -> north in steps of 25%, 50%, 100%, 3 s each, gate 2% failures"
    );
    rollout(3, "[25, 50, 100]")?;
    let status_of = || -> Result<serde_json::Value> {
        let out = util::run(
            std::process::Command::new(crate::lab::bin("meshctl"))
                .args(["rollout", "status", "echo-v2", "-n", "demo", "--json", "--socket"])
                .arg(&socket),
        )?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        Ok(v[0].clone())
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last_percent = None;
    loop {
        let r = status_of()?;
        let percent = r["percent"].as_u64();
        if percent != last_percent {
            last_percent = percent;
            // The status says what the agent decided; wait until the datapath shows it: some traffic to
            // north once a step sends it any, none to west at 100% (both hold for every later step too).
            let p = percent.unwrap_or(0);
            wait_for_shares(client, vip, &mut Tally { ok: 0, total: 0 }, |s| {
                (p == 0 || s.contains_key("north")) && (p < 100 || !s.contains_key("west"))
            })
            .with_context(|| format!("rollout step at {p}% to north"))?;
            let s = shares(client, vip, 40, tally);
            lines.push(show(
                &format!(
                    "rollout step {} ({}% to north):",
                    r["step"].as_u64().unwrap_or(0) + 1,
                    percent.unwrap_or(0)
                ),
                &s,
            ));
        }
        if r["phase"] == "Completed" {
            break;
        }
        if Instant::now() > deadline {
            bail!("the rollout did not complete within 30 s: {r}");
        }
        // Traffic while the steps hold (the gate judges it).
        let _ = shares(client, vip, 10, &mut Tally { ok: 0, total: 0 });
    }
    meshctl(&["rollout", "status", "echo-v2", "-n", "demo"]);

    println!("  north's echo pods now reset every connection; a new rollout sends 50% there and must halt");
    for (pod, node) in [("echo-a", "north-node-1"), ("echo-b", "north-node-2")] {
        let file = dir.join(format!("demo-north-{pod}.yaml"));
        std::fs::write(
            &file,
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {pod}\n  namespace: demo\n  labels: {{app: echo}}\n  annotations: {{lab.fleetmesh.io/fail: reset}}\nspec:\n  nodeName: {node}\n  containers:\n    - name: echo\n      ports:\n        - {{containerPort: 8080, protocol: TCP}}\n        - {{containerPort: 5353, protocol: UDP}}\n        - {{name: stream, containerPort: 9090, protocol: TCP}}\n"
            ),
        )?;
        state::apply(dir, "north", &file, false)?;
    }
    rollout(60, "[50, 100]")?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut scratch = Tally { ok: 0, total: 0 };
    loop {
        let _ = shares(client, vip, 10, &mut scratch);
        let r = status_of()?;
        if r["phase"] == "Halted" {
            println!("  halted: {}", r["message"].as_str().unwrap_or_default());
            break;
        }
        if Instant::now() > deadline {
            bail!("the rollout did not halt within 20 s: {r}");
        }
    }
    lines.push(show(
        "rollout halted (all back on west):",
        &shares(client, vip, 40, tally),
    ));
    meshctl(&["rollout", "status", "echo-v2", "-n", "demo"]);
    Ok(lines.join("\n"))
}

/// Part 6: a MeshNetworkPolicy in west admits clients of every cluster and nothing else; an allowed and a denied
/// cross-cluster call, their flow events and the compiled policy.
fn network_policy(
    dir: &std::path::Path,
    topology: &std::path::Path,
    st: &state::LabState,
    tally: &mut Tally,
) -> Result<String> {
    let pod = |cluster: &str, key: &str| {
        st.clusters
            .iter()
            .find(|c| c.name == cluster)
            .and_then(|c| c.pods.get(key))
            .with_context(|| format!("pod {cluster}/{key} missing"))
    };
    let (echo, client, intruder) = (
        pod("west", "demo/echo-a")?,
        pod("east", "demo/client")?,
        pod("north", "demo/echo-b")?,
    );
    let socket = st
        .clusters
        .iter()
        .flat_map(|c| c.nodes.iter())
        .find(|n| n.name == echo.node)
        .map(|n| n.socket.clone())
        .context("no agent for west/demo/echo-a")?;
    let file = topology.join("policy-west-echo.yaml");
    println!("  applying {} to west", file.display());
    state::apply(dir, "west", &file, false)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let denied = loop {
        match net::probe_tcp(&intruder.netns, echo.ip, TCP) {
            Err(e) => break format!("{e:#}"),
            Ok(_) if Instant::now() > deadline => {
                bail!("north/demo/echo-b still reaches west/demo/echo-a after 10 s")
            }
            Ok(_) => {}
        }
    };
    let allowed = net::probe_tcp(&client.netns, echo.ip, TCP);
    let ok = tally.record(allowed.as_ref().is_ok_and(|l| l == "west/demo/echo-a"));
    println!(
        "  east/demo/client  -> west/demo/echo-a:{TCP}  {ok} ({})",
        allowed.as_ref().map_or_else(|e| format!("{e:#}"), Clone::clone)
    );
    println!("  north/demo/echo-b -> west/demo/echo-a:{TCP}  refused as expected ({denied})");
    println!(
        "  flow events on {} (meshctl observe --no-follow --pod demo/echo-a):",
        echo.node
    );
    meshctl_on(
        &socket,
        &["observe", "--no-follow", "--last", "6", "--pod", "demo/echo-a"],
    );
    println!("  the compiled policy (meshctl policy get demo/echo-a):");
    meshctl_on(&socket, &["policy", "get", "demo/echo-a"]);
    state::apply(dir, "west", &file, true)?;
    Ok(format!(
        "  policy: east client allowed: {ok}; north echo-b refused; policy removed again"
    ))
}

/// Samples 30 connections until `done` holds for a sample in which none failed (the change has reached the
/// datapath), at most 10 s.
fn wait_for_shares(
    client: &state::PodRt,
    vip: std::net::Ipv4Addr,
    tally: &mut Tally,
    done: impl Fn(&BTreeMap<String, usize>) -> bool,
) -> Result<BTreeMap<String, usize>> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut scratch = Tally { ok: 0, total: 0 };
        let s = shares(client, vip, 30, &mut scratch);
        // Connections may fail while a deleted backend is withdrawn; the sample that counts has none failed.
        if done(&s) && !s.contains_key("(failed)") {
            tally.ok += scratch.ok;
            tally.total += scratch.total;
            return Ok(s);
        }
        if Instant::now() > deadline {
            bail!("the change did not reach the datapath within 10s (last sample {s:?})");
        }
    }
}

const TCP: u16 = 8080;
const UDP: u16 = 5353;
