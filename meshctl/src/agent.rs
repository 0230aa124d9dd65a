//! Talking to a node agent over its Unix socket (HTTP/1.0).

use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use serde_json::Value;

/// GETs `path` from the agent at `socket` and returns the JSON body.
pub fn get(socket: &Path, path: &str) -> anyhow::Result<Value> {
    let (head, body) = request(socket, "GET", path)?;
    anyhow::ensure!(
        head.starts_with("HTTP/1.") && head.contains(" 200 "),
        "agent answered: {}",
        head.lines().next().unwrap_or("")
    );
    serde_json::from_str(&body).context("the agent's answer is not JSON")
}

/// POSTs to `path` (no body) and returns the agent's message; fails with it unless the agent accepted.
pub fn post(socket: &Path, path: &str) -> anyhow::Result<String> {
    let (head, body) = request(socket, "POST", path)?;
    let ok = head.starts_with("HTTP/1.") && (head.contains(" 200 ") || head.contains(" 202 "));
    anyhow::ensure!(
        ok,
        "{}",
        if body.trim().is_empty() {
            head.lines().next().unwrap_or("").to_owned()
        } else {
            body.trim().to_owned()
        }
    );
    Ok(body.trim().to_owned())
}

/// Connects to the agent's API socket, with an error that says what to check.
pub fn connect(socket: &Path) -> anyhow::Result<UnixStream> {
    UnixStream::connect(socket).with_context(|| {
        format!(
            "connecting to the agent at {} (is mesh-agent running on this node?)",
            socket.display()
        )
    })
}

/// One HTTP/1.0 exchange over the agent's socket: (status line and headers, body).
fn request(socket: &Path, method: &str, path: &str) -> anyhow::Result<(String, String)> {
    let mut s = connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: agent\r\nContent-Length: 0\r\n\r\n"
    )?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).context("reading the agent's answer")?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("the agent's answer is not HTTP")?;
    Ok((head.to_owned(), body.to_owned()))
}

pub fn status(socket: &Path, json: bool) -> anyhow::Result<()> {
    let st = get(socket, "/v1/status")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&st)?);
        return Ok(());
    }
    let s = |v: &Value| v.as_str().map_or_else(|| v.to_string(), str::to_owned);
    println!(
        "Node:      {} (cluster {}, id {})",
        s(&st["node"]),
        s(&st["cluster"]),
        st["clusterId"]
    );
    println!("Ready:     {}", st["ready"]);
    let dp = &st["datapath"];
    println!(
        "Underlay:  {}   pod CIDR: {}",
        s(&dp["nodeIpv4"]),
        s(&dp["podCidr"])
    );
    println!("Remote clusters:");
    for rc in st["remoteClusters"].as_array().into_iter().flatten() {
        let reason = rc["state"]["reason"]
            .as_str()
            .map(|r| format!(" ({r})"))
            .unwrap_or_default();
        println!(
            "  {:<20} {:<13} nodes={:<4} decode-errors={}{reason}",
            s(&rc["name"]),
            s(&rc["state"]["state"]),
            rc["nodes"].as_object().map_or(0, serde_json::Map::len),
            rc["decodeErrors"]
                .as_object()
                .map_or(0, |m| m.values().filter_map(Value::as_u64).sum::<u64>()),
        );
        // What the cluster may not claim, and where it differs from what this cluster pinned.
        if let Some(e) = rc["peerFileError"].as_str() {
            println!("    peer file: {e}");
        }
        for m in rc["grantMismatches"].as_array().into_iter().flatten() {
            println!("    mismatch: {}", s(m));
        }
        if let Some(n) = rc["pendingRecords"].as_u64().filter(|n| *n > 0) {
            println!("    held back: {n} records outside its accepted pod CIDRs");
        }
        for r in rc["recentRefusals"].as_array().into_iter().flatten() {
            println!("    refused: {}", s(r));
        }
    }
    let enc = &st["encryption"];
    if enc.is_object() {
        println!(
            "Encryption: {} (WireGuard {} on UDP {}, address {}, key {})",
            s(&enc["mode"]),
            s(&enc["device"]),
            enc["port"],
            s(&enc["wireguardIpv4"]),
            s(&enc["publicKey"])
        );
        for p in enc["peers"].as_array().into_iter().flatten() {
            let age = p["handshakeAgeSeconds"]
                .as_f64()
                .map_or_else(|| "never".to_owned(), |a| format!("{a:.0}s ago"));
            println!(
                "  {:<32} {:<22} handshake {:<10} tx {} B rx {} B errors tx={} rx={}",
                s(&p["name"]),
                s(&p["endpoint"]),
                age,
                p["txBytes"],
                p["rxBytes"],
                p["txErrors"],
                p["rxErrors"]
            );
        }
        for m in enc["peersWithoutKey"].as_array().into_iter().flatten() {
            println!("  no key (dropped): {}", s(m));
        }
    } else {
        println!("Encryption: off");
    }
    println!("Endpoints:");
    for e in dp["endpoints"].as_array().into_iter().flatten() {
        let err = e["error"]
            .as_str()
            .map(|r| format!("  error: {r}"))
            .unwrap_or_default();
        println!(
            "  {:<40} {:<16} {:<14} programmed={}{err}",
            s(&e["pod"]),
            s(&e["ipv4"]),
            s(&e["ifname"]),
            e["programmed"]
        );
    }
    println!("Ipcache:");
    for e in dp["ipcache"].as_array().into_iter().flatten() {
        let via = if e["localNode"].as_bool() == Some(true) {
            "this node".to_owned()
        } else {
            s(&e["tunnelEndpoint"])
        };
        println!(
            "  {:<20} cluster {:<5} via {via}",
            s(&e["prefix"]),
            e["clusterId"]
        );
    }
    println!("Counters:");
    for (k, v) in dp["counters"].as_object().into_iter().flatten() {
        println!("  {k:<24} {v}");
    }
    for e in dp["errors"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(st["manifestErrors"].as_array().into_iter().flatten())
    {
        println!("Error: {}", s(e));
    }
    Ok(())
}

pub fn services(socket: &Path, json: bool) -> anyhow::Result<()> {
    let st = get(socket, "/v1/status")?;
    let services = &st["datapath"]["services"];
    if json {
        println!("{}", serde_json::to_string_pretty(services)?);
        return Ok(());
    }
    let s = |v: &Value| v.as_str().map_or_else(|| v.to_string(), str::to_owned);
    for svc in services.as_array().into_iter().flatten() {
        let spec = &svc["spec"];
        let kind = if spec["global"] == true {
            format!(
                "global{}, affinity {}",
                if spec["shared"] == true {
                    ""
                } else {
                    " (not shared)"
                },
                s(&spec["affinity"])
            )
        } else {
            "local".to_owned()
        };
        println!("{}/{}  ({kind})", s(&svc["namespace"]), s(&svc["name"]));
        for e in spec["errors"].as_array().into_iter().flatten() {
            println!("  error: {}", s(e));
        }
        for fe in svc["frontends"].as_array().into_iter().flatten() {
            println!("  {}:{}/{}", s(&fe["vip"]), fe["port"], s(&fe["protocol"]));
            let same = |a: &Value, b: &Value| {
                a["ipv4"] == b["ipv4"] && a["port"] == b["port"] && a["cluster"] == b["cluster"]
            };
            let active: Vec<&Value> = fe["active"].as_array().into_iter().flatten().collect();
            for (cluster, backends) in fe["candidates"].as_object().into_iter().flatten() {
                let list: Vec<String> = backends
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|b| {
                        let mark = if active.iter().any(|a| same(a, b)) {
                            "*"
                        } else {
                            ""
                        };
                        format!("{}:{}{mark}", s(&b["ipv4"]), b["port"])
                    })
                    .collect();
                println!("    {cluster:<16} {}", list.join("  "));
            }
            if active.is_empty() {
                println!("    (no backend: connections are dropped)");
            }
        }
    }
    Ok(())
}

/// `meshctl traffic SERVICE`: how a service's new connections are shared between clusters on this node.
pub fn traffic(socket: &Path, namespace: &str, service: &str, json: bool) -> anyhow::Result<()> {
    let st = get(socket, "/v1/status")?;
    let svc = st["datapath"]["services"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["namespace"] == namespace && s["name"] == service)
        .cloned()
        .with_context(|| {
            format!("the agent balances no service {namespace}/{service} (see `meshctl service list`)")
        })?;
    let policies: Vec<Value> = st["datapath"]["trafficPolicies"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["namespace"] == namespace && p["service"] == service)
        .cloned()
        .collect();
    if json {
        let out = serde_json::json!({"service": svc, "trafficPolicies": policies});
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    let s = |v: &Value| v.as_str().map_or_else(|| v.to_string(), str::to_owned);
    match svc.get("policy").and_then(Value::as_str) {
        Some(p) => println!("{namespace}/{service}: TrafficPolicy {p} in force"),
        None => {
            println!("{namespace}/{service}: no TrafficPolicy (shares follow backend capacity and affinity)")
        }
    }
    for p in &policies {
        let msg = p["message"]
            .as_str()
            .map(|m| format!(": {m}"))
            .unwrap_or_default();
        println!("  policy {}: {}{msg}", s(&p["name"]), s(&p["state"]));
    }
    for fe in svc["frontends"].as_array().into_iter().flatten() {
        println!("  {}:{}/{}", s(&fe["vip"]), fe["port"], s(&fe["protocol"]));
        let active: Vec<&Value> = fe["active"].as_array().into_iter().flatten().collect();
        let slots: u64 = active.iter().map(|b| b["weight"].as_u64().unwrap_or(0)).sum();
        if let Some(groups) = fe["groups"].as_array() {
            println!("    {:<8} {:<7} {:<8} clusters", "weight", "share", "backends");
            for g in groups {
                let clusters: Vec<String> = g["clusters"].as_array().into_iter().flatten().map(s).collect();
                println!(
                    "    {:<8} {:<7} {:<8} {}",
                    g["weight"].to_string(),
                    format!("{:.1}%", g["share"].as_f64().unwrap_or(0.0) * 100.0),
                    g["backends"].to_string(),
                    if clusters.is_empty() {
                        "(no ready backend)".to_owned()
                    } else {
                        clusters.join(", ")
                    }
                );
            }
            let unselected: Vec<String> = fe["unselected"].as_array().into_iter().flatten().map(s).collect();
            if !unselected.is_empty() {
                println!("    no group (no new connections): {}", unselected.join(", "));
            }
        }
        let mut by_cluster: std::collections::BTreeMap<String, u64> = std::collections::BTreeMap::new();
        for b in &active {
            *by_cluster.entry(s(&b["cluster"])).or_default() += b["weight"].as_u64().unwrap_or(0);
        }
        for (c, w) in &by_cluster {
            #[expect(clippy::cast_precision_loss, reason = "slot counts are far below 2^52")]
            let pct = *w as f64 * 100.0 / slots.max(1) as f64;
            println!("    {c:<16} {pct:5.1}% of new connections ({w} of {slots} slots)");
        }
        // What the datapath counted (since it was created): new flows per cluster and their live share.
        if let Some(stats) = fe["stats"].as_object() {
            let total: u64 = stats.values().map(|v| v["newFlows"].as_u64().unwrap_or(0)).sum();
            for (c, v) in stats {
                let n = v["newFlows"].as_u64().unwrap_or(0);
                #[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
                let pct = n as f64 * 100.0 / total.max(1) as f64;
                println!(
                    "    {c:<16} counted: {n} new flows ({pct:.1}%), {} reset by the backend",
                    v["resets"].as_u64().unwrap_or(0)
                );
            }
        }
        if active.is_empty() {
            println!("    (no backend: connections are dropped)");
        }
    }
    Ok(())
}

/// `meshctl rollout status [NAME]`: the staged rollouts this node runs.
pub fn rollout_status(socket: &Path, namespace: &str, name: Option<&str>, json: bool) -> anyhow::Result<()> {
    let st = get(socket, "/v1/status")?;
    let all: Vec<Value> = st["datapath"]["rollouts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| name.is_none_or(|n| r["namespace"] == namespace && r["name"] == n))
        .cloned()
        .collect();
    if let Some(n) = name {
        anyhow::ensure!(!all.is_empty(), "no StagedRollout {namespace}/{n} on this node");
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(());
    }
    let s = |v: &Value| v.as_str().map_or_else(|| v.to_string(), str::to_owned);
    if all.is_empty() {
        println!("no staged rollouts on this node");
    }
    for r in &all {
        let step = r["step"].as_u64().unwrap_or(0) + 1;
        println!(
            "{}/{}  service {}  {}  step {step} ({}% to `to`)",
            s(&r["namespace"]),
            s(&r["name"]),
            s(&r["service"]),
            s(&r["phase"]),
            r["percent"]
        );
        println!(
            "  this step: {} new connections to `to`, {} failed; hold served {:.1} s",
            r["observed"]["newFlows"],
            r["observed"]["resets"],
            r["heldMs"].as_f64().unwrap_or(0.0) / 1000.0
        );
        if let Some(m) = r["message"].as_str() {
            println!("  {m}");
        }
    }
    Ok(())
}

/// `meshctl rollout pause|resume|abort NAME`.
pub fn rollout_command(socket: &Path, namespace: &str, name: &str, command: &str) -> anyhow::Result<()> {
    let msg = post(socket, &format!("/v1/rollouts/{namespace}/{name}/{command}"))?;
    println!("{msg}");
    Ok(())
}
