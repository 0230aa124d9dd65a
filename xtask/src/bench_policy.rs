//! `cargo xtask bench --only policy`, on the three-clusters example:
//! - per-packet cost of policy: sockperf round trips (TCP and UDP) between two pods of one node without any policy
//!   and with a MeshNetworkPolicy of 1,000 rules on the server (ingress) and on the client (egress), alternating
//!   per round; ratio = median round trip with / without;
//! - policy change latency across clusters: a pod's labels in west decide whether east's policy admits it; from the
//!   manifest write in west to the first datagram east's datapath lets through (grant) or the first it drops
//!   (revoke), probing every millisecond; p50/p99 over 100 changes.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use crate::bench::{Plan, Procs, Row, median, percentile, row, sockperf_rr, wait_listening};
use crate::lab::{net, state};

/// Rules of the big policy (one port each, on both ends).
const RULES: u16 = 1000;
/// Label changes timed for the change latency.
const CHANGES: usize = 100;
/// Longest wait for one change to be enforced before the bench gives up.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one probe waits for its answer.
const PROBE_WAIT: Duration = Duration::from_millis(2);
/// Probes in a row without an answer that count as "revoked".
const REVOKED_AFTER: usize = 3;

/// A MeshNetworkPolicy with [`RULES`] port rules plus the benchmark's own ports, on `app: echo` (ingress) and
/// `app: client` (egress).
fn big_policy() -> String {
    let mut ingress = String::new();
    let mut egress = String::new();
    for i in 0..RULES {
        let port = 20_000 + i;
        ingress.push_str(&format!(
            "    - from: [{{podSelector: {{matchLabels: {{app: client}}}}}}]\n      ports: [{{protocol: TCP, port: {port}}}]\n"
        ));
        egress.push_str(&format!(
            "    - to: [{{podSelector: {{matchLabels: {{app: echo}}}}}}]\n      ports: [{{protocol: TCP, port: {port}}}]\n"
        ));
    }
    let own = "      ports: [{protocol: TCP, port: 5001}, {protocol: UDP, port: 5002}, {protocol: TCP, port: 8080}]\n";
    format!(
        "apiVersion: fleetmesh.io/v1alpha1\nkind: MeshNetworkPolicy\nmetadata: {{name: bench-ingress, namespace: demo}}\nspec:\n  podSelector: {{matchLabels: {{app: echo}}}}\n  policyTypes: [Ingress]\n  ingress:\n{ingress}    - from: [{{podSelector: {{matchLabels: {{app: client}}}}}}]\n{own}---\napiVersion: fleetmesh.io/v1alpha1\nkind: MeshNetworkPolicy\nmetadata: {{name: bench-egress, namespace: demo}}\nspec:\n  podSelector: {{matchLabels: {{app: client}}}}\n  policyTypes: [Egress]\n  egress:\n{egress}    - to: [{{podSelector: {{matchLabels: {{app: echo}}}}}}]\n{own}"
    )
}

/// East's echo pods admit UDP 5353 from `app: client` pods of any cluster.
const GRANT_POLICY: &str = "apiVersion: fleetmesh.io/v1alpha1\nkind: MeshNetworkPolicy\nmetadata: {name: bench-grant, namespace: demo}\nspec:\n  podSelector: {matchLabels: {app: echo}}\n  policyTypes: [Ingress]\n  ingress:\n    - from: [{podSelector: {matchLabels: {app: client}}}]\n      ports: [{protocol: UDP, port: 5353}]\n";

pub(crate) fn measure(plan: &Plan, dir: &Path, st: &state::LabState, rows: &mut Vec<Row>) -> Result<()> {
    cost(plan, dir, st, rows)?;
    change_latency(dir, st, rows)
}

fn cost(plan: &Plan, dir: &Path, st: &state::LabState, rows: &mut Vec<Row>) -> Result<()> {
    let east = st
        .clusters
        .iter()
        .find(|c| c.name == "east")
        .context("no cluster east")?;
    let pod = |k: &str| east.pods.get(k).with_context(|| format!("pod east/{k} missing"));
    let (client, server, other) = (pod("demo/client")?, pod("demo/echo-a")?, pod("demo/echo-b")?);
    anyhow::ensure!(client.node == server.node, "client and echo-a must share a node");
    let mut procs = Procs::default();
    procs.spawn(
        &server.netns,
        "sockperf",
        &["server", "--tcp", "-i", "0.0.0.0", "-p", "5001"],
    )?;
    procs.spawn(
        &server.netns,
        "sockperf",
        &["server", "-i", "0.0.0.0", "-p", "5002"],
    )?;
    wait_listening(&client.netns, SocketAddr::from((server.ip, 5001)))?;
    let file = dir.join("bench-policy-1k.yaml");
    std::fs::write(&file, big_policy())?;
    let (mut tcp_without, mut tcp_with, mut udp_without, mut udp_with) = (vec![], vec![], vec![], vec![]);
    for round in 0..plan.rounds {
        tcp_without.push(sockperf_rr(&client.netns, server.ip, 5001, true, plan.secs)?.0);
        udp_without.push(sockperf_rr(&client.netns, server.ip, 5002, false, plan.secs)?.0);
        state::apply(dir, "east", &file, false)?;
        // In force once a pod the policy does not name is refused.
        net::wait_for(
            "the 1k-rule policy to be enforced",
            Duration::from_secs(30),
            || match net::probe_tcp(&other.netns, server.ip, 8080) {
                Ok(l) => Err(format!("echo-b still reaches echo-a ({l})")),
                Err(_) => Ok(()),
            },
        )?;
        wait_listening(&client.netns, SocketAddr::from((server.ip, 5001)))?;
        tcp_with.push(sockperf_rr(&client.netns, server.ip, 5001, true, plan.secs)?.0);
        udp_with.push(sockperf_rr(&client.netns, server.ip, 5002, false, plan.secs)?.0);
        state::apply(dir, "east", &file, true)?;
        net::wait_for("the policy to be removed", Duration::from_secs(30), || {
            net::probe_tcp(&other.netns, server.ip, 8080)
                .map(drop)
                .map_err(|e| format!("{e:#}"))
        })?;
        println!(
            "  round {}: TCP RR {:.1} -> {:.1} µs, UDP RR {:.1} -> {:.1} µs (without -> with policy)",
            round + 1,
            tcp_without[round],
            tcp_with[round],
            udp_without[round],
            udp_with[round]
        );
    }
    for (proto, with, without) in [("TCP", &tcp_with, &tcp_without), ("UDP", &udp_with, &udp_without)] {
        let (w, wo) = (median(with), median(without));
        rows.push(Row {
            goal: Some(("<=", 1.10)),
            ..row(
                format!(
                    "{proto} RR same node with policy ({RULES} rules on each end) vs without (median round trip; ratio = with / without)"
                ),
                format!("{w:.1} µs"),
                format!("{wo:.1} µs"),
                Some(w / wo),
            )
        });
    }
    Ok(())
}

/// Sends one datagram and waits [`PROBE_WAIT`] for the answer.
fn probe(s: &UdpSocket, to: SocketAddr, buf: &mut [u8]) -> bool {
    if s.send_to(b"ping\n", to).is_err() {
        return false;
    }
    s.recv_from(buf).is_ok()
}

/// Rewrites the labels of pod `name` in the cluster's manifests directory (as an operator editing the file would),
/// atomically.
pub(crate) fn set_app_label(dir: &Path, cluster: &str, namespace: &str, name: &str, app: &str) -> Result<()> {
    let (tmp, path) = stage_app_label(dir, cluster, namespace, name, app)?;
    std::fs::rename(&tmp, &path)?;
    Ok(())
}

/// Writes the manifests file of [`set_app_label`] beside the original (a name the sources ignore) and returns
/// (staged, original): renaming the one onto the other is the change, at one instant, so that a bench can time
/// from there rather than from the rewrite of the YAML.
pub(crate) fn stage_app_label(
    dir: &Path,
    cluster: &str,
    namespace: &str,
    name: &str,
    app: &str,
) -> Result<(std::path::PathBuf, std::path::PathBuf)> {
    let manifests = dir.join("clusters").join(cluster).join("manifests");
    for entry in std::fs::read_dir(&manifests)? {
        let path = entry?.path();
        let text = std::fs::read_to_string(&path)?;
        let mut docs = Vec::new();
        let mut found = false;
        for doc in mesh_model::yaml::documents(&text)? {
            let mut v = doc.value;
            if v["kind"] == "Pod" && v["metadata"]["name"] == name && v["metadata"]["namespace"] == namespace
            {
                v["metadata"]["labels"]["app"] = serde_json::json!(app);
                found = true;
            }
            docs.push(v);
        }
        if found {
            let mut out = String::new();
            for d in docs.iter().filter(|d| !d.is_null()) {
                out.push_str("---\n");
                out.push_str(&mesh_model::yaml::to_string(d)?);
            }
            let tmp = path.with_extension("bench-tmp");
            std::fs::write(&tmp, out)?;
            return Ok((tmp, path));
        }
    }
    bail!("pod {namespace}/{name} not found in {}", manifests.display())
}

fn change_latency(dir: &Path, st: &state::LabState, rows: &mut Vec<Row>) -> Result<()> {
    let find = |c: &str, k: &str| {
        st.clusters
            .iter()
            .find(|x| x.name == c)
            .and_then(|x| x.pods.get(k))
            .with_context(|| format!("pod {c}/{k} missing"))
    };
    let (client, server) = (find("west", "demo/client")?, find("east", "demo/echo-a")?);
    let file = dir.join("bench-grant.yaml");
    std::fs::write(&file, GRANT_POLICY)?;
    state::apply(dir, "east", &file, false)?;
    let to = SocketAddr::from((server.ip, 5353));
    let socket = net::in_netns(&client.netns, || -> Result<UdpSocket> {
        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        s.set_read_timeout(Some(PROBE_WAIT))?;
        Ok(s)
    })??;
    let mut buf = [0u8; 256];
    net::wait_for("west/demo/client to be admitted", Duration::from_secs(30), || {
        if probe(&socket, to, &mut buf) {
            Ok(())
        } else {
            Err("no answer".into())
        }
    })?;
    let (mut grants, mut revokes) = (Vec::new(), Vec::new());
    let result = (|| -> Result<()> {
        for i in 0..CHANGES {
            let grant = i % 2 == 1;
            let started = Instant::now();
            set_app_label(
                dir,
                "west",
                "demo",
                "client",
                if grant { "client" } else { "client-blocked" },
            )?;
            let mut misses = 0usize;
            let mut first_miss = None;
            let took = loop {
                let sent = Instant::now();
                let answered = probe(&socket, to, &mut buf);
                if grant && answered {
                    break sent.duration_since(started);
                }
                if !grant {
                    if answered {
                        misses = 0;
                        first_miss = None;
                    } else {
                        misses += 1;
                        first_miss.get_or_insert(sent);
                        if misses >= REVOKED_AFTER {
                            break first_miss.unwrap_or(sent).duration_since(started);
                        }
                    }
                }
                if started.elapsed() > CHANGE_TIMEOUT {
                    bail!(
                        "change {i} ({}) not enforced after {CHANGE_TIMEOUT:?}",
                        if grant { "grant" } else { "revoke" }
                    );
                }
                // Answers that arrive late belong to earlier probes: drain them.
                while socket.recv_from(&mut buf).is_ok() {}
            };
            let ms = took.as_secs_f64() * 1e3;
            if grant { grants.push(ms) } else { revokes.push(ms) }
        }
        Ok(())
    })();
    // Leave the pod as it was.
    let restore = set_app_label(dir, "west", "demo", "client", "client");
    result?;
    restore?;
    let mut all: Vec<f64> = grants.iter().chain(&revokes).copied().collect();
    let (p50, p99) = (percentile(&mut all, 0.5), percentile(&mut all, 0.99));
    let (g50, g99) = (percentile(&mut grants, 0.5), percentile(&mut grants, 0.99));
    let (r50, r99) = (percentile(&mut revokes, 0.5), percentile(&mut revokes, 0.99));
    println!(
        "  label change in west -> enforced in east: grant p50 {g50:.1} / p99 {g99:.1} ms, revoke p50 {r50:.1} / p99 {r99:.1} ms"
    );
    rows.push(Row {
        goal: Some(("<=", 1.0)),
        ..row(
            format!(
                "Policy change in a remote cluster's datapath: pod labels written in west -> east enforces (p50 / p99 of {CHANGES}: grants {g50:.0}/{g99:.0} ms, revokes {r50:.0}/{r99:.0} ms; ratio = p99 / 100 ms)"
            ),
            format!("p50 {p50:.1} ms, p99 {p99:.1} ms"),
            "100 ms".to_owned(),
            Some(p99 / 100.0),
        )
    });
    Ok(())
}
