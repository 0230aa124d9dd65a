//! Prometheus metrics of the agent (text exposition format 0.0.4), served as `GET /metrics` on the API socket and,
//! with `--metrics-addr`, on a TCP address for Prometheus to scrape.
//!
//! - `fleetmesh_datapath_packets_total{counter}`: the datapath's per-CPU counters summed (forwards by path, drops
//!   by reason, load-balancer events), live.
//! - `fleetmesh_remote_cluster_synced{cluster}`, `fleetmesh_remote_cluster_last_answer_age_seconds{cluster}` (the
//!   sync lag bound: how long ago the cluster's etcd last answered), `fleetmesh_remote_cluster_unreachable{cluster}`,
//!   `fleetmesh_remote_decode_errors_total{cluster,reason}`.
//! - `fleetmesh_cluster_identities{remote}`, `fleetmesh_cluster_ips{remote}`: identities and pod addresses known of
//!   each remote cluster and of this one (`remote` is then this cluster's name; with `--kvstore-config`).
//! - `fleetmesh_lb_frontends`, `fleetmesh_lb_backends`, `fleetmesh_remote_endpoints`, `fleetmesh_local_endpoints`,
//!   `fleetmesh_ipcache_entries`, `fleetmesh_policy_entries`, `fleetmesh_identities`
//!   (map fill levels as entries), `fleetmesh_reconcile_duration_seconds` (last pass), `fleetmesh_ready`,
//!   `fleetmesh_endpoint_refusals_total` (pods whose host interface annotation was refused).
use std::fmt::Write as _;

use crate::api::Status;
use crate::remote::SyncState;

/// Escapes a label value (backslash, double quote, newline).
fn label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// The metrics of `st` (whose counters and remote clusters are current) at `now_ms`.
#[must_use]
pub fn render(st: &Status, now_ms: u64) -> String {
    let mut out = String::new();
    let node = label(&st.node);
    let cluster = label(&st.cluster);
    let common = format!("node=\"{node}\",cluster=\"{cluster}\"");

    header(
        &mut out,
        "fleetmesh_datapath_packets_total",
        "counter",
        "Packets the eBPF datapath counted, by counter (forwards by path, drops by reason, load balancer).",
    );
    for (name, v) in &st.datapath.counters {
        let _ = writeln!(
            out,
            "fleetmesh_datapath_packets_total{{{common},counter=\"{}\"}} {v}",
            label(name)
        );
    }

    header(&mut out, "fleetmesh_ready", "gauge", "1 when the agent is ready.");
    let _ = writeln!(out, "fleetmesh_ready{{{common}}} {}", u8::from(st.ready));

    header(
        &mut out,
        "fleetmesh_remote_cluster_synced",
        "gauge",
        "1 while the remote cluster is synced and usable.",
    );
    for rc in &st.remote_clusters {
        let synced = matches!(rc.state, SyncState::Synced { .. }) && rc.usable;
        let _ = writeln!(
            out,
            "fleetmesh_remote_cluster_synced{{{common},remote=\"{}\"}} {}",
            label(&rc.name),
            u8::from(synced)
        );
    }
    header(
        &mut out,
        "fleetmesh_remote_cluster_unreachable",
        "gauge",
        "1 while the remote cluster is unreachable (its backends go after the grace period).",
    );
    for rc in &st.remote_clusters {
        let _ = writeln!(
            out,
            "fleetmesh_remote_cluster_unreachable{{{common},remote=\"{}\"}} {}",
            label(&rc.name),
            u8::from(rc.unreachable_since_ms.is_some())
        );
    }
    header(
        &mut out,
        "fleetmesh_remote_cluster_last_answer_age_seconds",
        "gauge",
        "Seconds since the remote cluster's etcd last answered (bounds how stale its data can be).",
    );
    for rc in st.remote_clusters.iter().filter(|rc| rc.last_alive_ms.is_some()) {
        let age = now_ms.saturating_sub(rc.last_alive_ms.unwrap_or(now_ms));
        #[expect(clippy::cast_precision_loss, reason = "milliseconds far below 2^52")]
        let secs = age as f64 / 1000.0;
        let _ = writeln!(
            out,
            "fleetmesh_remote_cluster_last_answer_age_seconds{{{common},remote=\"{}\"}} {secs:.3}",
            label(&rc.name)
        );
    }
    for (name, help, n) in [
        (
            "fleetmesh_cluster_identities",
            "Security identities known of the cluster.",
            (|rc: &crate::remote::RemoteCluster| rc.identities.len())
                as fn(&crate::remote::RemoteCluster) -> usize,
        ),
        (
            "fleetmesh_cluster_ips",
            "Pod addresses known of the cluster.",
            |rc| rc.ips.len(),
        ),
    ] {
        header(&mut out, name, "gauge", help);
        for rc in st.remote_clusters.iter().chain(&st.own_cluster) {
            let _ = writeln!(out, "{name}{{{common},remote=\"{}\"}} {}", label(&rc.name), n(rc));
        }
    }
    header(
        &mut out,
        "fleetmesh_remote_decode_errors_total",
        "counter",
        "Values in a remote cluster's etcd that were skipped, by reason.",
    );
    for rc in &st.remote_clusters {
        for (reason, n) in &rc.decode_errors {
            let _ = writeln!(
                out,
                "fleetmesh_remote_decode_errors_total{{{common},remote=\"{}\",reason=\"{}\"}} {n}",
                label(&rc.name),
                label(reason)
            );
        }
    }

    let s = &st.datapath.summary;
    for (name, help, v) in [
        (
            "fleetmesh_lb_frontends",
            "Service frontends programmed.",
            s.frontends,
        ),
        (
            "fleetmesh_lb_backends",
            "Distinct service backends programmed.",
            s.backends,
        ),
        (
            "fleetmesh_remote_endpoints",
            "Backends known from remote clusters' records.",
            s.remote_endpoints,
        ),
        (
            "fleetmesh_local_endpoints",
            "Pods of this node in the datapath.",
            st.datapath.endpoints.iter().filter(|e| e.programmed).count(),
        ),
        (
            "fleetmesh_ipcache_entries",
            "ipcache entries (pod prefixes, pods of other nodes, policy CIDRs).",
            st.datapath.ipcache.len(),
        ),
        (
            "fleetmesh_policy_entries",
            "Compiled policy entries of this node's pods (both directions).",
            s.policy_entries,
        ),
        (
            "fleetmesh_identities",
            "Security identities known (this cluster's and every usable peer's).",
            s.identities,
        ),
    ] {
        header(&mut out, name, "gauge", help);
        let _ = writeln!(out, "{name}{{{common}}} {v}");
    }
    header(
        &mut out,
        "fleetmesh_endpoint_refusals_total",
        "counter",
        "Pods refused because their host interface annotation names no pod veth, or another pod's.",
    );
    let _ = writeln!(
        out,
        "fleetmesh_endpoint_refusals_total{{{common}}} {}",
        st.datapath.endpoint_refusals
    );
    header(
        &mut out,
        "fleetmesh_reconcile_duration_seconds",
        "gauge",
        "Wall time of the last reconcile pass.",
    );
    #[expect(clippy::cast_precision_loss, reason = "microseconds far below 2^52")]
    let secs = s.reconcile_us as f64 / 1e6;
    let _ = writeln!(out, "fleetmesh_reconcile_duration_seconds{{{common}}} {secs:.6}");
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::remote::RemoteCluster;

    fn status() -> Status {
        let mut west = RemoteCluster::new("west");
        west.state = SyncState::Synced { since_ms: 1 };
        west.last_alive_ms = Some(9_000);
        west.decode_errors = BTreeMap::from([("bad_json".to_owned(), 2)]);
        let mut north = RemoteCluster::new("no\"rth");
        north.unreachable_since_ms = Some(5);
        let mut st = Status {
            node: "east-node-1".into(),
            cluster: "east".into(),
            cluster_id: 1,
            started_ms: 0,
            ready: true,
            manifest_generation: 1,
            manifest_errors: vec![],
            remote_clusters: vec![west, north],
            own_cluster: None,
            datapath: crate::reconcile::DatapathStatus::default(),
        };
        st.datapath.counters = BTreeMap::from([("forward_local", 7), ("drop_no_backend", 1)]);
        st.datapath.summary.backends = 6;
        st.datapath.summary.reconcile_us = 1500;
        st.datapath.endpoint_refusals = 2;
        st
    }

    #[test]
    fn renders_prometheus_text_with_escaped_labels() {
        let text = render(&status(), 10_000);
        let has = |line: &str| assert!(text.lines().any(|l| l == line), "missing {line:?} in:\n{text}");
        has(
            r#"fleetmesh_datapath_packets_total{node="east-node-1",cluster="east",counter="forward_local"} 7"#,
        );
        has(
            r#"fleetmesh_datapath_packets_total{node="east-node-1",cluster="east",counter="drop_no_backend"} 1"#,
        );
        has(r#"fleetmesh_remote_cluster_synced{node="east-node-1",cluster="east",remote="west"} 1"#);
        has(r#"fleetmesh_remote_cluster_synced{node="east-node-1",cluster="east",remote="no\"rth"} 0"#);
        has(r#"fleetmesh_remote_cluster_unreachable{node="east-node-1",cluster="east",remote="no\"rth"} 1"#);
        has(
            r#"fleetmesh_remote_cluster_last_answer_age_seconds{node="east-node-1",cluster="east",remote="west"} 1.000"#,
        );
        has(
            r#"fleetmesh_remote_decode_errors_total{node="east-node-1",cluster="east",remote="west",reason="bad_json"} 2"#,
        );
        has(r#"fleetmesh_lb_backends{node="east-node-1",cluster="east"} 6"#);
        has(r#"fleetmesh_cluster_identities{node="east-node-1",cluster="east",remote="west"} 0"#);
        has(r#"fleetmesh_reconcile_duration_seconds{node="east-node-1",cluster="east"} 0.001500"#);
        has(r#"fleetmesh_endpoint_refusals_total{node="east-node-1",cluster="east"} 2"#);
        has("# TYPE fleetmesh_datapath_packets_total counter");
        // Every sample line is `name{labels} value` with a numeric value.
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            let v = l.rsplit(' ').next().unwrap_or_default();
            assert!(v.parse::<f64>().is_ok(), "{l}");
        }
    }
}
