//! `cargo xtask bench --only dns`, on the three-clusters example (docs/clusterset-dns.md):
//! - queries/s of `dnsperf` against the clusterset DNS of north's client node vs `dnsmasq` answering the same A
//!   records from a hosts file, both servers pinned to the same CPU, `dnsperf` to the other; per round, back to
//!   back; the names are the 100 ClusterSetIP services east and west export (north has none of their Services;
//!   they select no pod, so that the backend changes below touch only the headless service);
//! - p99 latency of each query at half the top rate of the slower server (`dnsperf -v -Q`), so neither queues;
//! - a backend change in a remote cluster → the headless answer changed: west's echo-a leaves and rejoins the
//!   exported headless service (its `app` label rewritten in west's manifests, timed from the rename of the
//!   rewritten file); north's client queries its agent every ~1 ms until the answer has the new number of
//!   addresses; p50/p99 over the changes;
//! - heap bytes per DNS record of the agent's table (`mesh-agent/examples/dns_table.rs`).

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, RData, RecordType};

use crate::bench::{Plan, Row, median, percentile, row};
use crate::lab::{net, state};
use crate::util;

/// ClusterSetIP services exported by east and west.
const SERVICES: usize = 100;
/// Backend changes timed.
const CHANGES: usize = 20;
const CHANGE_TIMEOUT: Duration = Duration::from_secs(10);
/// The address the bench's dnsmasq listens on, in the client's node namespace.
const DNSMASQ_ADDR: &str = "169.254.20.11";
const SERVER_CPU: &str = "1";
const CLIENT_CPU: &str = "0";

fn exports() -> String {
    let mut s = String::new();
    for i in 0..SERVICES {
        s.push_str(&format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: demo}}\nspec:\n  selector: {{bench: dns}}\n  ports:\n    - {{name: http, port: 80, targetPort: 8080, protocol: TCP}}\n---\napiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {{name: s{i}, namespace: demo}}\n"
        ));
    }
    s.push_str("---\napiVersion: v1\nkind: Service\nmetadata: {name: db, namespace: demo}\nspec:\n  clusterIP: None\n  selector: {app: echo}\n  ports:\n    - {name: tcp, port: 8080, protocol: TCP}\n---\napiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {name: db, namespace: demo}\n");
    s
}

/// One A query from `sock` to `server`; the addresses answered (`None`: no answer in time).
fn query_a(sock: &UdpSocket, server: SocketAddr, name: &str, id: u16) -> Option<Vec<Ipv4Addr>> {
    let mut m = Message::query();
    m.metadata.id = id;
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).ok()?, RecordType::A));
    sock.send_to(&m.to_vec().ok()?, server).ok()?;
    let mut buf = [0u8; 4096];
    loop {
        let (n, _) = sock.recv_from(&mut buf).ok()?;
        let Ok(r) = Message::from_vec(&buf[..n]) else {
            continue;
        };
        if r.metadata.id != id {
            continue;
        }
        let mut v: Vec<Ipv4Addr> = r
            .answers
            .iter()
            .filter_map(|a| match &a.data {
                RData::A(a) => Some(a.0),
                _ => None,
            })
            .collect();
        v.sort();
        return Some(v);
    }
}

/// Runs `dnsperf` from `netns` (pinned to [`CLIENT_CPU`]) and returns its stdout.
fn dnsperf(netns: &str, server: &str, queries: &Path, secs: u32, extra: &[&str]) -> Result<String> {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{netns}"))
        .args([
            "--", "taskset", "-c", CLIENT_CPU, "dnsperf", "-s", server, "-c", "4", "-q", "100",
        ])
        .arg("-d")
        .arg(queries)
        .args(["-l", &secs.to_string()])
        .args(extra);
    let out = cmd
        .output()
        .with_context(|| format!("running {}", util::cmdline(&cmd)))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!("dnsperf failed: {}{text}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(text)
}

fn qps(out: &str) -> Result<f64> {
    let lost = out
        .lines()
        .find(|l| l.trim_start().starts_with("Queries lost:"))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0);
    let q = out
        .lines()
        .find(|l| l.contains("Queries per second:"))
        .and_then(|l| l.rsplit(':').next())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .with_context(|| format!("no queries per second in dnsperf's output:\n{out}"))?;
    if lost > 0 {
        println!("bench: dnsperf lost {lost} queries");
    }
    Ok(q)
}

/// Latencies (s) of every `> NOERROR name A 0.000123` line of `dnsperf -v`.
fn latencies(out: &str) -> Vec<f64> {
    out.lines()
        .filter(|l| l.starts_with('>'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .collect()
}

pub(crate) fn measure(plan: &Plan, dir: &Path, st: &state::LabState, rows: &mut Vec<Row>) -> Result<()> {
    let file = dir.join("bench-dns-exports.yaml");
    std::fs::write(&file, exports())?;
    for c in ["east", "west"] {
        state::apply(dir, c, &file, false)?;
    }
    let north = st
        .clusters
        .iter()
        .find(|c| c.name == "north")
        .context("no cluster north")?;
    let client = north.pods.get("demo/client").context("no north/demo/client")?;
    let node = north
        .nodes
        .iter()
        .find(|n| n.name == client.node)
        .context("client's node")?;
    let agent_pid = st
        .procs
        .iter()
        .find(|p| p.role == format!("agent-{}", node.name))
        .map(|p| p.pid)
        .context("client's agent")?;
    let agent: SocketAddr = format!("{}:53", net::LAB_DNS).parse()?;
    let names: Vec<String> = (0..SERVICES)
        .map(|i| format!("s{i}.demo.svc.clusterset.local"))
        .collect();

    // Every name resolves (and the headless one has every exporting cluster's 4 pods).
    let answers: Vec<(String, Ipv4Addr)> =
        net::in_netns(&client.netns, || -> Result<Vec<(String, Ipv4Addr)>> {
            let sock = UdpSocket::bind("0.0.0.0:0")?;
            sock.set_read_timeout(Some(Duration::from_millis(200)))?;
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut out = Vec::new();
            for (i, n) in names.iter().enumerate() {
                loop {
                    let id = u16::try_from(i % 60_000).unwrap_or(0);
                    if let Some(ips) = query_a(&sock, agent, n, id)
                        && ips.len() == 1
                    {
                        out.push((n.clone(), ips[0]));
                        break;
                    }
                    if Instant::now() > deadline {
                        bail!("{n} does not resolve from north");
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            loop {
                if query_a(&sock, agent, "db.demo.svc.clusterset.local", 1).is_some_and(|v| v.len() == 4) {
                    return Ok(out);
                }
                if Instant::now() > deadline {
                    bail!("db.demo.svc.clusterset.local does not list 4 pods from north");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })??;

    // The baseline: dnsmasq with the same A records, in the same node namespace, on the same CPU.
    let hosts = dir.join("bench-dns.hosts");
    let queries = dir.join("bench-dns.queries");
    std::fs::write(
        &hosts,
        answers
            .iter()
            .map(|(n, ip)| format!("{ip} {n}\n"))
            .collect::<String>(),
    )?;
    std::fs::write(
        &queries,
        names.iter().map(|n| format!("{n} A\n")).collect::<String>(),
    )?;
    let cidr = format!("{DNSMASQ_ADDR}/32");
    net::ip_in(
        &node.netns,
        &["addr", "replace", &cidr, "dev", "lo", "scope", "host"],
    )?;
    let mut dnsmasq = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", node.netns))
        .args([
            "--",
            "taskset",
            "-c",
            SERVER_CPU,
            "dnsmasq",
            "-k",
            "--no-resolv",
            "--no-hosts",
            "-u",
            "root",
            "--pid-file=",
        ])
        .arg(format!("--addn-hosts={}", hosts.display()))
        .args([
            &format!("--listen-address={DNSMASQ_ADDR}"),
            "--bind-interfaces",
            "--port=53",
            "--local-ttl=5",
            "--cache-size=10000",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting dnsmasq")?;
    let result = (|| -> Result<()> {
        // The agent on the same CPU as dnsmasq (all its threads).
        util::run(Command::new("taskset").args(["-a", "-cp", SERVER_CPU, &agent_pid.to_string()]))?;
        let baseline_addr: SocketAddr = format!("{DNSMASQ_ADDR}:53").parse()?;
        net::in_netns(&client.netns, || -> Result<()> {
            let sock = UdpSocket::bind("0.0.0.0:0")?;
            sock.set_read_timeout(Some(Duration::from_millis(200)))?;
            let deadline = Instant::now() + Duration::from_secs(10);
            while query_a(&sock, baseline_addr, &names[0], 7).is_none_or(|v| v != vec![answers[0].1]) {
                if Instant::now() > deadline {
                    bail!("dnsmasq does not answer {}", names[0]);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Ok(())
        })??;
        let (mut ours, mut theirs, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..plan.rounds {
            let a = qps(&dnsperf(&client.netns, net::LAB_DNS, &queries, plan.secs, &[])?)?;
            let b = qps(&dnsperf(&client.netns, DNSMASQ_ADDR, &queries, plan.secs, &[])?)?;
            println!("bench: dns round: clusterset DNS {a:.0} q/s, dnsmasq {b:.0} q/s");
            ours.push(a);
            theirs.push(b);
            ratios.push(a / b);
        }
        let (a, b) = (median(&ours), median(&theirs));
        rows.push(Row {
            goal: Some((">=", 1.0)),
            ..row(
                format!("DNS queries/s, {SERVICES} ClusterSetIP names, one CPU: clusterset DNS (agent) vs dnsmasq from a hosts file"),
                format!("{a:.0} q/s"),
                format!("dnsmasq {b:.0} q/s"),
                Some(median(&ratios)),
            )
        });
        // Latency at half the top rate of the slower of the two, so that neither queues.
        let rate = format!("{:.0}", a.min(b) / 2.0);
        let mut ours = latencies(&dnsperf(
            &client.netns,
            net::LAB_DNS,
            &queries,
            plan.secs,
            &["-v", "-Q", &rate],
        )?);
        let mut theirs = latencies(&dnsperf(
            &client.netns,
            DNSMASQ_ADDR,
            &queries,
            plan.secs,
            &["-v", "-Q", &rate],
        )?);
        if ours.is_empty() || theirs.is_empty() {
            bail!("dnsperf -v reported no latencies");
        }
        let (p99, base99) = (
            percentile(&mut ours, 0.99) * 1e3,
            percentile(&mut theirs, 0.99) * 1e3,
        );
        rows.push(Row {
            goal: Some(("<=", 1.0)),
            ..row(
                format!("DNS query latency p99 at {rate} q/s (half the slower server's top rate; ratio = p99 / 1 ms)"),
                format!("{p99:.3} ms"),
                format!("dnsmasq {base99:.3} ms"),
                Some(p99),
            )
        });
        Ok(())
    })();
    let _ = dnsmasq.kill();
    let _ = dnsmasq.wait();
    let _ = net::ip_in(&node.netns, &["addr", "del", &cidr, "dev", "lo"]);
    result?;

    change_latency(dir, client, agent, rows)?;
    memory(plan, rows)
}

/// West's echo-a leaves and rejoins the headless `db` (its `app` label), timed until north's answer changes.
fn change_latency(dir: &Path, client: &state::PodRt, agent: SocketAddr, rows: &mut Vec<Row>) -> Result<()> {
    let mut times = Vec::new();
    let result = (|| -> Result<()> {
        for i in 0..CHANGES {
            let (app, want) = if i % 2 == 0 { ("echo-off", 3) } else { ("echo", 4) };
            let t = net::in_netns(&client.netns, || -> Result<Duration> {
                let sock = UdpSocket::bind("0.0.0.0:0")?;
                sock.set_read_timeout(Some(Duration::from_millis(5)))?;
                // Timed from the rename that makes the change (the YAML rewrite before it is the bench's own work).
                let (staged, path) =
                    crate::bench_policy::stage_app_label(dir, "west", "demo", "echo-a", app)?;
                let started = Instant::now();
                std::fs::rename(&staged, &path)?;
                let mut id: u16 = 0;
                loop {
                    id = id.wrapping_add(1);
                    if query_a(&sock, agent, "db.demo.svc.clusterset.local", id)
                        .is_some_and(|v| v.len() == want)
                    {
                        return Ok(started.elapsed());
                    }
                    if started.elapsed() > CHANGE_TIMEOUT {
                        bail!("change {i}: the headless answer did not reach {want} addresses");
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            })??;
            times.push(t.as_secs_f64() * 1e3);
        }
        Ok(())
    })();
    if times.len() % 2 == 1 {
        let _ = crate::bench_policy::set_app_label(dir, "west", "demo", "echo-a", "echo");
    }
    result?;
    let p50 = percentile(&mut times, 0.5);
    let p99 = percentile(&mut times, 0.99);
    rows.push(Row {
        goal: Some(("<=", 1.0)),
        ..row(
            format!(
                "Backend change in a remote cluster → headless DNS answer changed (west's pod label written → north's agent answers; {CHANGES} changes; ratio = p99 / 100 ms)"
            ),
            format!("p50 {p50:.1} ms, p99 {p99:.1} ms"),
            "100 ms".to_owned(),
            Some(p99 / 100.0),
        )
    });
    Ok(())
}

fn memory(plan: &Plan, rows: &mut Vec<Row>) -> Result<()> {
    // Heap bytes do not depend on the optimisation level: the debug build will do.
    if plan.build {
        util::run_status(util::cargo().args(["build", "-p", "mesh-agent", "--example", "dns_table"]))?;
    }
    let bin = util::workspace_root().join("target/debug/examples/dns_table");
    let out = util::run(Command::new(&bin).arg("2000"))?;
    let field = |k: &str| {
        out.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{k}=")))
            .map(str::to_owned)
    };
    let (Some(records), Some(per)) = (field("records"), field("bytes_per_record")) else {
        bail!("dns_table printed no measurement:\n{out}");
    };
    rows.push(row(
        format!("DNS table heap per record ({records} records: 1,000 ClusterSetIP services, 1,000 headless × 10 endpoints)"),
        format!("{per} B"),
        String::new(),
        None,
    ));
    Ok(())
}
