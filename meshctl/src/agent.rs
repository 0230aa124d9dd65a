//! Talking to a node agent over its Unix socket (HTTP/1.0).

use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use serde_json::Value;

/// GETs `path` from the agent at `socket` and returns the JSON body.
pub fn get(socket: &Path, path: &str) -> anyhow::Result<Value> {
    let mut s = UnixStream::connect(socket).with_context(|| {
        format!(
            "connecting to the agent at {} (is mesh-agent running on this node?)",
            socket.display()
        )
    })?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: agent\r\n\r\n")?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).context("reading the agent's answer")?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("the agent's answer is not HTTP")?;
    anyhow::ensure!(
        head.starts_with("HTTP/1.") && head.contains(" 200 "),
        "agent answered: {}",
        head.lines().next().unwrap_or("")
    );
    serde_json::from_str(body).context("the agent's answer is not JSON")
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
            let active: Vec<&Value> = fe["active"].as_array().into_iter().flatten().collect();
            for (cluster, backends) in fe["candidates"].as_object().into_iter().flatten() {
                let list: Vec<String> = backends
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|b| {
                        let mark = if active.contains(&b) { "*" } else { "" };
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
