//! `meshctl dns lookup NAME`: asks a node's clusterset DNS (its agent's `--dns-listen`) and explains the answer
//! with the agent's status: which imported service a ClusterSetIP stands for and which clusters' backends new
//! connections to it go to.

use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use anyhow::Context as _;
use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use serde_json::{Value, json};

const ZONE: &str = "clusterset.local.";

/// One query over UDP (the answer of the same id, within 2 s).
///
/// # Errors
/// A bad name, no answer, or an answer that does not parse.
pub fn query(server: SocketAddr, name: &str, rtype: RecordType) -> anyhow::Result<Message> {
    let mut qname = Name::from_str(name).with_context(|| format!("{name:?} is not a domain name"))?;
    qname.set_fqdn(true);
    let mut m = Message::query();
    let id = u16::try_from(std::process::id() % 65_536).unwrap_or(1);
    m.metadata.id = id;
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(qname, rtype));
    let sock = UdpSocket::bind(if server.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })?;
    sock.set_read_timeout(Some(Duration::from_secs(2)))?;
    sock.send_to(&m.to_vec()?, server)
        .with_context(|| format!("sending to {server}"))?;
    let mut buf = vec![0u8; 65_535];
    loop {
        let (n, _) = sock
            .recv_from(&mut buf)
            .with_context(|| format!("no answer from {server} (is the agent's --dns-listen there?)"))?;
        let r = Message::from_vec(&buf[..n]).context("the answer does not parse")?;
        if r.metadata.id == id {
            return Ok(r);
        }
    }
}

/// Why the answer is what it is, in words.
fn explain(name: &str, rtype: RecordType, r: &Message) -> String {
    let lower = name.trim_end_matches('.').to_ascii_lowercase();
    let in_zone = lower == ZONE.trim_end_matches('.') || lower.ends_with(".clusterset.local");
    let labels: Vec<&str> = lower.split('.').collect();
    let service = match labels.as_slice() {
        [svc, ns, "svc", "clusterset", "local"] => Some(format!("{ns}/{svc}")),
        _ => None,
    };
    match r.metadata.response_code {
        ResponseCode::NXDomain => match service {
            Some(s) => {
                format!("no cluster of the clusterset exports {s} (or, headless, it has no ready endpoint)")
            }
            None => "the clusterset zone has no such name".to_owned(),
        },
        ResponseCode::Refused if !in_zone => {
            "not in clusterset.local, and the agent forwards nothing (no --dns-upstream)".to_owned()
        }
        ResponseCode::Refused => "refused (a class other than IN?)".to_owned(),
        ResponseCode::NoError if r.answers.is_empty() => {
            format!("the name exists, without {rtype} records (NODATA)")
        }
        ResponseCode::NoError if !in_zone => "answered by the upstream".to_owned(),
        ResponseCode::NoError => match service {
            Some(s) => format!("{s} is imported: exported by some cluster of the clusterset"),
            None => "a record of the clusterset zone".to_owned(),
        },
        other => format!("the server answered {other}"),
    }
}

/// The agent's services whose frontend address is `ip`, with the backends new connections go to, by cluster.
fn frontends_of(status: &Value, ip: &str) -> Vec<Value> {
    let mut out = Vec::new();
    for svc in status["datapath"]["services"].as_array().into_iter().flatten() {
        for fe in svc["frontends"].as_array().into_iter().flatten() {
            if fe["vip"] != ip {
                continue;
            }
            let mut by_cluster = serde_json::Map::new();
            for b in fe["active"].as_array().into_iter().flatten() {
                let c = b["cluster"].as_str().unwrap_or_default().to_owned();
                let entry = by_cluster.entry(c).or_insert_with(|| json!([]));
                if let Some(a) = entry.as_array_mut() {
                    a.push(json!(format!(
                        "{}:{}",
                        b["ipv4"].as_str().unwrap_or_default(),
                        b["port"]
                    )));
                }
            }
            out.push(json!({
                "service": format!("{}/{}", svc["namespace"].as_str().unwrap_or_default(), svc["name"].as_str().unwrap_or_default()),
                "port": fe["port"],
                "protocol": fe["protocol"],
                "backends": by_cluster,
            }));
        }
    }
    out
}

/// `meshctl dns lookup`.
///
/// # Errors
/// When the server does not answer.
pub fn lookup(
    server: SocketAddr,
    socket: &Path,
    name: &str,
    rtype: &str,
    json_out: bool,
) -> anyhow::Result<()> {
    let rtype = RecordType::from_str(&rtype.to_ascii_uppercase())
        .map_err(|e| anyhow::anyhow!("--type {rtype:?}: {e}"))?;
    let r = query(server, name, rtype)?;
    let why = explain(name, rtype, &r);
    // The agent's view, when its socket answers: what each address stands for.
    let status = crate::agent::get(socket, "/v1/status").ok();
    let answers: Vec<Value> = r
        .answers
        .iter()
        .map(|rec| {
            let mut v = json!({"record": rec.to_string()});
            if let (RData::A(a), Some(st)) = (&rec.data, &status) {
                let fes = frontends_of(st, &a.0.to_string());
                if !fes.is_empty() {
                    v["clustersetIp"] = json!(fes);
                }
            }
            v
        })
        .collect();
    if json_out {
        let out = json!({
            "name": name,
            "type": rtype.to_string(),
            "server": server.to_string(),
            "rcode": r.metadata.response_code.to_string(),
            "authoritative": r.metadata.authoritative,
            "answers": answers,
            "authority": r.authorities.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "why": why,
            "agent": status.is_some(),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("{name} {rtype} @{server}: {}", r.metadata.response_code);
    for a in &answers {
        println!("  {}", a["record"].as_str().unwrap_or_default());
        for fe in a["clustersetIp"].as_array().into_iter().flatten() {
            println!(
                "    ClusterSetIP of {} port {}/{}: new connections go to",
                fe["service"].as_str().unwrap_or_default(),
                fe["port"],
                fe["protocol"].as_str().unwrap_or_default()
            );
            for (c, bs) in fe["backends"].as_object().into_iter().flatten() {
                let list: Vec<&str> = bs
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .collect();
                println!("      {c:<16} {}", list.join("  "));
            }
        }
    }
    println!("why: {why}");
    if status.is_none() {
        println!(
            "(agent socket {} not reachable: no load-balancing details)",
            socket.display()
        );
    }
    Ok(())
}
