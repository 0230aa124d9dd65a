//! `meshctl observe` and `meshctl policy get`: flows and compiled policies from a node's agent.

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde_json::Value;

/// What `meshctl observe` asks for.
#[derive(Debug, Clone, Default)]
pub struct Observe {
    pub pod: Option<String>,
    pub namespace: Option<String>,
    pub cluster: Option<String>,
    pub verdict: Option<String>,
    /// Buffered flows to show first.
    pub last: usize,
    pub follow: bool,
    /// Stop after this many flows.
    pub count: Option<usize>,
    /// Stop after this long.
    pub timeout: Option<Duration>,
    pub json: bool,
}

/// Percent-encodes a query value.
fn encode(v: &str) -> String {
    let mut out = String::new();
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Observe {
    fn query(&self) -> String {
        let mut q = vec![format!("last={}", self.last), format!("follow={}", self.follow)];
        for (k, v) in [
            ("pod", &self.pod),
            ("namespace", &self.namespace),
            ("cluster", &self.cluster),
            ("verdict", &self.verdict),
        ] {
            if let Some(v) = v {
                q.push(format!("{k}={}", encode(v)));
            }
        }
        q.join("&")
    }
}

/// `HH:MM:SS.mmm` (UTC) of a Unix time in milliseconds.
fn clock(ms: u64) -> String {
    let s = ms / 1000;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        (s / 3600) % 24,
        (s / 60) % 60,
        s % 60,
        ms % 1000
    )
}

fn peer(p: &Value) -> String {
    let ip = p["ip"].as_str().unwrap_or("?");
    let port = p["port"].as_u64().map(|p| format!(":{p}")).unwrap_or_default();
    let who = match (p["namespace"].as_str(), p["pod"].as_str()) {
        (Some(ns), Some(pod)) => format!("{ns}/{pod}"),
        (Some(ns), None) => format!("{ns}/{ip}"),
        _ => ip.to_owned(),
    };
    let cluster = p["cluster"]
        .as_str()
        .map(|c| format!("[{c}]"))
        .unwrap_or_default();
    let labels = p["labels"]
        .as_object()
        .filter(|m| !m.is_empty())
        .map(|m| {
            let l: Vec<String> = m
                .iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                .collect();
            format!(" {{{}}}", l.join(","))
        })
        .unwrap_or_default();
    format!(
        "{cluster}{who}{port} (id {}){labels}",
        p["identity"].as_u64().unwrap_or(0)
    )
}

/// One flow as a human line.
#[must_use]
pub fn human(f: &Value) -> String {
    if let Some(n) = f["lost"].as_u64() {
        return format!("... {n} flows lost (this reader fell behind)");
    }
    let dir = f["direction"]
        .as_str()
        .map(|d| format!(" {d}"))
        .unwrap_or_default();
    let rule = f["rule"].as_str().map(|r| format!(" by {r}")).unwrap_or_default();
    format!(
        "{} {} {} -> {} {}{dir} {} ({}){rule}",
        clock(f["timeMs"].as_u64().unwrap_or(0)),
        f["node"].as_str().unwrap_or("?"),
        peer(&f["source"]),
        peer(&f["destination"]),
        f["protocol"].as_str().unwrap_or("?"),
        f["verdict"].as_str().unwrap_or("?").to_uppercase(),
        f["reason"].as_str().unwrap_or("?"),
    )
}

/// Streams flows from the agent at `socket` to stdout until the count, the timeout or the stream ends.
///
/// # Errors
/// When the agent cannot be reached or refuses the filter.
pub fn observe(socket: &Path, o: &Observe) -> anyhow::Result<()> {
    let mut s = crate::agent::connect(socket)?;
    let deadline = o.timeout.map(|t| Instant::now() + t);
    write!(s, "GET /v1/flows?{} HTTP/1.0\r\nHost: agent\r\n\r\n", o.query())?;
    let mut r = BufReader::new(s.try_clone()?);
    let mut status = String::new();
    r.read_line(&mut status).context("reading the agent's answer")?;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
            break;
        }
    }
    if !status.contains(" 200 ") {
        let mut body = String::new();
        let _ = std::io::Read::read_to_string(&mut r, &mut body);
        anyhow::bail!(
            "agent refused: {}",
            if body.trim().is_empty() {
                status.trim()
            } else {
                body.trim()
            }
        );
    }
    let mut out = std::io::stdout().lock();
    let mut shown = 0usize;
    loop {
        if o.count.is_some_and(|c| shown >= c) {
            return Ok(());
        }
        match deadline {
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Ok(());
                }
                s.set_read_timeout(Some(left))?;
            }
            None => s.set_read_timeout(None)?,
        }
        let mut line = String::new();
        match r.read_line(&mut line) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(());
            }
            Err(e) => return Err(e).context("reading flows"),
        }
        let line = line.trim_end();
        if line.is_empty() {
            continue;
        }
        if o.json {
            writeln!(out, "{line}")?;
        } else {
            let v: Value = serde_json::from_str(line).context("the agent sent a flow that is not JSON")?;
            writeln!(out, "{}", human(&v))?;
        }
        out.flush()?;
        shown += 1;
    }
}

fn entries_table(dir: &Value) -> String {
    let mut out = String::new();
    if !dir["enforced"].as_bool().unwrap_or(false) {
        out.push_str("  not enforced (no policy selects this pod): everything allowed\n");
        return out;
    }
    let entries = dir["entries"].as_array().cloned().unwrap_or_default();
    if entries.is_empty() {
        out.push_str("  default deny: nothing allowed\n");
        return out;
    }
    out.push_str(&format!(
        "  {:<12} {:<44} {:<6} {:<13} {}\n",
        "IDENTITY", "PEER", "PROTO", "PORTS", "RULE"
    ));
    for e in entries {
        out.push_str(&format!(
            "  {:<12} {:<44} {:<6} {:<13} {}\n",
            e["identity"].as_u64().map_or_else(
                || "?".into(),
                |i| if i == 0 { "any".into() } else { i.to_string() }
            ),
            e["peer"].as_str().unwrap_or(""),
            e["protocol"].as_str().unwrap_or("any"),
            e["ports"].as_str().unwrap_or("any"),
            e["rule"].as_str().unwrap_or(""),
        ));
    }
    out
}

/// `meshctl policy get`: the compiled policy of pod `namespace/pod` on the node of `socket`.
///
/// # Errors
/// When the agent cannot be reached or does not have the pod.
pub fn policy_get(socket: &Path, namespace: &str, pod: &str, json: bool) -> anyhow::Result<()> {
    let v = crate::agent::get(
        socket,
        &format!("/v1/policy/{}/{}", encode(namespace), encode(pod)),
    )
    .with_context(|| format!("pod {namespace}/{pod}"))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let labels: Vec<String> = v["identityLabels"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                .collect()
        })
        .unwrap_or_default();
    println!(
        "Pod:       {namespace}/{pod} ({})",
        v["ip"].as_str().unwrap_or("?")
    );
    println!("Identity:  {}", v["identity"].as_u64().unwrap_or(0));
    println!("Labels:    {}", labels.join(", "));
    if let Some(ps) = v["policies"].as_array().filter(|p| !p.is_empty()) {
        let names: Vec<&str> = ps.iter().filter_map(Value::as_str).collect();
        println!("Policies:  {}", names.join(", "));
    }
    println!("Ingress:\n{}", entries_table(&v["ingress"]));
    print!("Egress:\n{}", entries_table(&v["egress"]));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_encodes_values() {
        let o = Observe {
            pod: Some("shop/api 1".into()),
            last: 3,
            ..Observe::default()
        };
        assert_eq!(o.query(), "last=3&follow=false&pod=shop%2Fapi%201");
    }

    #[test]
    fn human_line_names_both_ends() {
        let f = serde_json::json!({
            "timeMs": 3_723_004u64, "node": "west-1", "verdict": "dropped", "reason": "drop_policy_ingress",
            "direction": "ingress", "protocol": "TCP",
            "source": {"ip": "10.1.0.2", "port": 40000, "identity": 1048832, "cluster": "west",
                       "namespace": "shop", "pod": "frontend-1", "labels": {"app": "frontend"}},
            "destination": {"ip": "10.2.0.9", "port": 8080, "identity": 2097452, "cluster": "east",
                            "namespace": "shop", "pod": "api-1"},
            "ifindex": 3
        });
        let l = human(&f);
        assert!(
            l.starts_with("01:02:03.004 west-1 [west]shop/frontend-1:40000"),
            "{l}"
        );
        assert!(l.contains("-> [east]shop/api-1:8080"), "{l}");
        assert!(l.contains("DROPPED (drop_policy_ingress)"), "{l}");
        assert_eq!(
            human(&serde_json::json!({"lost": 7})),
            "... 7 flows lost (this reader fell behind)"
        );
    }
}
