//! Prometheus metrics of the agent (text exposition format 0.0.4, written by `prometheus-client`), served as
//! `GET /metrics` on the API socket and, with `--metrics-addr`, on a TCP address for Prometheus to scrape.
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
//!
//! A scrape reads numbers from the tables ([`Scrape::new`], under their locks, copying no records) and renders
//! them ([`Scrape::render`]).
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::TypedMetric;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::api::Status;
use crate::reconcile::Summary;
use crate::remote::{RemoteCluster, SyncState};

/// The `Content-Type` of what [`Scrape::render`] writes.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// A remote cluster (or this cluster, as its own etcd has it) in numbers.
#[derive(Debug)]
struct Cluster {
    name: String,
    /// A peer (not this cluster's own etcd).
    peer: bool,
    synced: bool,
    unreachable: bool,
    last_answer_age_seconds: Option<f64>,
    identities: usize,
    ips: usize,
    decode_errors: Vec<(String, u64)>,
}

impl Cluster {
    fn of(rc: &RemoteCluster, peer: bool, now_ms: u64) -> Self {
        Self {
            name: rc.name.clone(),
            peer,
            synced: matches!(rc.state, SyncState::Synced { .. }) && rc.usable,
            unreachable: rc.unreachable_since_ms.is_some(),
            #[expect(clippy::cast_precision_loss, reason = "milliseconds far below 2^52")]
            last_answer_age_seconds: rc.last_alive_ms.map(|t| now_ms.saturating_sub(t) as f64 / 1000.0),
            identities: rc.identities.len(),
            ips: rc.ips.len(),
            decode_errors: rc.decode_errors.iter().map(|(r, n)| (r.clone(), *n)).collect(),
        }
    }
}

/// What one scrape reports.
#[derive(Debug)]
pub struct Scrape {
    node: String,
    cluster: String,
    ready: bool,
    counters: Vec<(&'static str, u64)>,
    /// Peers, then this cluster's own etcd.
    clusters: Vec<Cluster>,
    summary: Summary,
    local_endpoints: usize,
    endpoint_refusals: u64,
    ipcache_entries: usize,
    /// The WireGuard engine's peers (set by the caller; `None` with encryption off).
    pub encryption: Option<crate::wireguard::EncryptionStatus>,
    /// The membership selector's numbers (set by the caller; `None` without `--peer-selector`).
    pub selection: Option<crate::remote::Selection>,
}

impl Scrape {
    /// The numbers of `st` (its datapath part as of the last reconcile), of the remote clusters `peers` and this
    /// cluster's `own` etcd, and of the live datapath `counters`, at `now_ms`.
    #[must_use]
    pub fn new<'a>(
        st: &Status,
        peers: impl IntoIterator<Item = &'a RemoteCluster>,
        own: Option<&RemoteCluster>,
        counters: impl IntoIterator<Item = (&'static str, u64)>,
        ipcache_entries: usize,
        now_ms: u64,
    ) -> Self {
        let mut clusters: Vec<Cluster> = peers
            .into_iter()
            .map(|rc| Cluster::of(rc, true, now_ms))
            .collect();
        clusters.extend(own.map(|rc| Cluster::of(rc, false, now_ms)));
        Self {
            node: st.node.clone(),
            cluster: st.cluster.clone(),
            ready: st.ready,
            counters: counters.into_iter().collect(),
            clusters,
            summary: st.datapath.summary,
            local_endpoints: st.datapath.endpoints.iter().filter(|e| e.programmed).count(),
            endpoint_refusals: st.datapath.endpoint_refusals,
            ipcache_entries,
            encryption: None,
            selection: None,
        }
    }

    /// The metrics in the Prometheus text format ([`CONTENT_TYPE`]).
    #[must_use]
    pub fn render(self) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(self));
        let mut out = String::new();
        // Writing into a String does not fail, and neither does `encode` below.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry);
        out
    }
}

/// Writes one metric family: its descriptor (also when it has no samples), then one sample per label set. A
/// counter's name gets its `_total` here.
fn family<L: EncodeLabelSet, M: EncodeMetric + TypedMetric>(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, M)>,
) -> std::fmt::Result {
    let mut family = enc.encode_descriptor(name, help, None, M::TYPE)?;
    for (labels, metric) in samples {
        metric.encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

fn gauge(v: usize) -> ConstGauge<i64> {
    ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX))
}

impl Collector for Scrape {
    fn encode<'s>(&'s self, mut enc: DescriptorEncoder<'_>) -> std::fmt::Result {
        let (node, cluster) = (self.node.as_str(), self.cluster.as_str());
        let common = [("node", node), ("cluster", cluster)];
        let peers = || self.clusters.iter().filter(|c| c.peer);
        let of = |c: &'s Cluster| [("node", node), ("cluster", cluster), ("remote", c.name.as_str())];
        family(
            &mut enc,
            "fleetmesh_datapath_packets",
            "Packets the eBPF datapath counted, by counter (forwards by path, drops by reason, load balancer).",
            self.counters.iter().map(|&(c, v)| {
                (
                    [("node", node), ("cluster", cluster), ("counter", c)],
                    ConstCounter::new(v),
                )
            }),
        )?;
        if let Some(wg) = &self.encryption {
            let of_peer = |p: &'s crate::wireguard::PeerStatus| {
                [("node", node), ("cluster", cluster), ("peer", p.name.as_str())]
            };
            family(
                &mut enc,
                "fleetmesh_wireguard_handshake_age_seconds",
                "Seconds since the last completed WireGuard handshake with the peer node (absent before the first).",
                wg.peers
                    .iter()
                    .filter_map(|p| Some((of_peer(p), ConstGauge::<f64>::new(p.handshake_age_seconds?)))),
            )?;
            family(
                &mut enc,
                "fleetmesh_wireguard_tx_bytes",
                "Bytes of packets encrypted to the peer node (before encryption).",
                wg.peers
                    .iter()
                    .map(|p| (of_peer(p), ConstCounter::new(p.tx_bytes))),
            )?;
            family(
                &mut enc,
                "fleetmesh_wireguard_rx_bytes",
                "Bytes of packets decrypted from the peer node.",
                wg.peers
                    .iter()
                    .map(|p| (of_peer(p), ConstCounter::new(p.rx_bytes))),
            )?;
            family(
                &mut enc,
                "fleetmesh_wireguard_rx_errors",
                "Datagrams from the peer node that failed to decrypt or carried another source than its WireGuard address.",
                wg.peers
                    .iter()
                    .map(|p| (of_peer(p), ConstCounter::new(p.rx_errors))),
            )?;
            family(
                &mut enc,
                "fleetmesh_wireguard_tx_errors",
                "Packets for the peer node that could not be encrypted or sent.",
                wg.peers
                    .iter()
                    .map(|p| (of_peer(p), ConstCounter::new(p.tx_errors))),
            )?;
            family(
                &mut enc,
                "fleetmesh_wireguard_peers_without_key",
                "Nodes encryption applies to that published no usable key (their packets are dropped).",
                [(common, gauge(wg.peers_without_key.len()))],
            )?;
        }
        if let Some(sel) = &self.selection {
            family(
                &mut enc,
                "fleetmesh_remote_clusters_unselected",
                "Peer clusters with a peer file that the membership selector (--peer-selector) leaves out.",
                [(common, gauge(sel.unselected))],
            )?;
            family(
                &mut enc,
                "fleetmesh_peer_selector_refusals",
                "Reads of the membership selector file that were refused (the last good selector stayed in force).",
                [(common, ConstCounter::new(sel.refusals))],
            )?;
        }
        family(
            &mut enc,
            "fleetmesh_ready",
            "1 when the agent is ready.",
            [(common, ConstGauge::new(i64::from(self.ready)))],
        )?;
        family(
            &mut enc,
            "fleetmesh_remote_cluster_synced",
            "1 while the remote cluster is synced and usable.",
            peers().map(|c| (of(c), ConstGauge::new(i64::from(c.synced)))),
        )?;
        family(
            &mut enc,
            "fleetmesh_remote_cluster_unreachable",
            "1 while the remote cluster is unreachable (its backends go after the grace period).",
            peers().map(|c| (of(c), ConstGauge::new(i64::from(c.unreachable)))),
        )?;
        family(
            &mut enc,
            "fleetmesh_remote_cluster_last_answer_age_seconds",
            "Seconds since the remote cluster's etcd last answered (bounds how stale its data can be).",
            peers().filter_map(|c| Some((of(c), ConstGauge::new(c.last_answer_age_seconds?)))),
        )?;
        family(
            &mut enc,
            "fleetmesh_cluster_identities",
            "Security identities known of the cluster.",
            self.clusters.iter().map(|c| (of(c), gauge(c.identities))),
        )?;
        family(
            &mut enc,
            "fleetmesh_cluster_ips",
            "Pod addresses known of the cluster.",
            self.clusters.iter().map(|c| (of(c), gauge(c.ips))),
        )?;
        family(
            &mut enc,
            "fleetmesh_remote_decode_errors",
            "Values in a remote cluster's etcd that were skipped, by reason.",
            peers().flat_map(|c| {
                c.decode_errors.iter().map(move |(reason, n)| {
                    (
                        [
                            ("node", node),
                            ("cluster", cluster),
                            ("remote", c.name.as_str()),
                            ("reason", reason.as_str()),
                        ],
                        ConstCounter::new(*n),
                    )
                })
            }),
        )?;
        let s = &self.summary;
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
                self.local_endpoints,
            ),
            (
                "fleetmesh_ipcache_entries",
                "ipcache entries (pod prefixes, pods of other nodes, policy CIDRs).",
                self.ipcache_entries,
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
            family(&mut enc, name, help, [(common, gauge(v))])?;
        }
        #[expect(clippy::cast_precision_loss, reason = "microseconds far below 2^52")]
        let secs = s.reconcile_us as f64 / 1e6;
        family(
            &mut enc,
            "fleetmesh_endpoint_refusals",
            "Pods refused because their host interface annotation names no pod veth, or another pod's.",
            [(common, ConstCounter::new(self.endpoint_refusals))],
        )?;
        family(
            &mut enc,
            "fleetmesh_reconcile_duration_seconds",
            "Wall time of the last reconcile pass.",
            [(common, ConstGauge::new(secs))],
        )
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn status() -> Status {
        let mut st = Status {
            node: "east-node-1".into(),
            cluster: "east".into(),
            cluster_id: 1,
            started_ms: 0,
            ready: true,
            manifest_generation: 1,
            manifest_errors: vec![],
            remote_clusters: vec![],
            own_cluster: None,
            encryption: None,
            datapath: crate::reconcile::DatapathStatus::default(),
        };
        st.datapath.summary.backends = 6;
        st.datapath.summary.reconcile_us = 1500;
        st.datapath.endpoint_refusals = 2;
        st
    }

    fn peers() -> Vec<RemoteCluster> {
        let mut west = RemoteCluster::new("west");
        west.state = SyncState::Synced { since_ms: 1 };
        west.last_alive_ms = Some(9_000);
        west.decode_errors = BTreeMap::from([("bad_json".to_owned(), 2)]);
        let mut north = RemoteCluster::new("no\"rth");
        north.unreachable_since_ms = Some(5);
        vec![west, north]
    }

    #[test]
    fn renders_prometheus_text_with_escaped_labels() {
        let mut own = RemoteCluster::new("east");
        own.identities.insert(
            7,
            std::sync::Arc::new(mesh_kvstore::IdentityRecord {
                cluster: "east".into(),
                cluster_id: 1,
                identity: 7,
                labels: BTreeMap::new(),
            }),
        );
        let counters = [("forward_local", 7), ("drop_no_backend", 1)];
        let text = Scrape::new(&status(), &peers(), Some(&own), counters, 0, 10_000).render();
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
            r#"fleetmesh_remote_cluster_last_answer_age_seconds{node="east-node-1",cluster="east",remote="west"} 1.0"#,
        );
        has(
            r#"fleetmesh_remote_decode_errors_total{node="east-node-1",cluster="east",remote="west",reason="bad_json"} 2"#,
        );
        has(r#"fleetmesh_lb_backends{node="east-node-1",cluster="east"} 6"#);
        has(r#"fleetmesh_cluster_identities{node="east-node-1",cluster="east",remote="west"} 0"#);
        // This cluster's own etcd counts in the cluster gauges, not in the peer ones.
        has(r#"fleetmesh_cluster_identities{node="east-node-1",cluster="east",remote="east"} 1"#);
        assert!(
            !text.contains(
                r#"fleetmesh_remote_cluster_synced{node="east-node-1",cluster="east",remote="east"}"#
            )
        );
        has(r#"fleetmesh_reconcile_duration_seconds{node="east-node-1",cluster="east"} 0.0015"#);
        has(r#"fleetmesh_endpoint_refusals_total{node="east-node-1",cluster="east"} 2"#);
        has(
            "# HELP fleetmesh_datapath_packets_total Packets the eBPF datapath counted, by counter (forwards by path, drops by reason, load balancer).",
        );
        has("# TYPE fleetmesh_datapath_packets_total counter");
        has("# HELP fleetmesh_ready 1 when the agent is ready.");
        has("# TYPE fleetmesh_ready gauge");
        // Every sample line is `name{labels} value` with a numeric value, after the TYPE line of its name.
        let mut typed = None;
        for l in text.lines() {
            if let Some(t) = l.strip_prefix("# TYPE ") {
                typed = t.split(' ').next();
                continue;
            }
            if l.starts_with('#') {
                continue;
            }
            let (name, _) = l.split_once('{').expect("labels");
            assert_eq!(Some(name), typed, "{l}");
            let v = l.rsplit(' ').next().unwrap_or_default();
            assert!(v.parse::<f64>().is_ok(), "{l}");
        }
    }

    #[test]
    fn wireguard_peers_are_series_of_their_own() {
        let counters = [("drop_no_encryption_key", 3)];
        let mut scrape = Scrape::new(&status(), &peers(), None, counters, 0, 10_000);
        scrape.encryption = Some(crate::wireguard::EncryptionStatus {
            peers: vec![crate::wireguard::PeerStatus {
                name: "west/west-node-1".into(),
                endpoint: "100.65.2.1:51871".into(),
                public_key: String::new(),
                wireguard_ipv4: std::net::Ipv4Addr::new(10, 2, 0, 0),
                handshake_age_seconds: Some(1.5),
                tx_bytes: 10,
                rx_bytes: 20,
                tx_packets: 1,
                rx_packets: 2,
                rx_errors: 0,
                tx_errors: 4,
            }],
            peers_without_key: vec!["north/north-node-1: no WireGuard key published".into()],
            ..Default::default()
        });
        let text = scrape.render();
        let has = |line: &str| assert!(text.lines().any(|l| l == line), "missing {line:?} in:\n{text}");
        let peer = r#"{node="east-node-1",cluster="east",peer="west/west-node-1"}"#;
        has(&format!("fleetmesh_wireguard_handshake_age_seconds{peer} 1.5"));
        has(&format!("fleetmesh_wireguard_tx_bytes_total{peer} 10"));
        has(&format!("fleetmesh_wireguard_rx_bytes_total{peer} 20"));
        has(&format!("fleetmesh_wireguard_tx_errors_total{peer} 4"));
        has(r#"fleetmesh_wireguard_peers_without_key{node="east-node-1",cluster="east"} 1"#);
        has(
            r#"fleetmesh_datapath_packets_total{node="east-node-1",cluster="east",counter="drop_no_encryption_key"} 3"#,
        );
        // Without the engine: no WireGuard series at all.
        let plain = Scrape::new(&status(), &peers(), None, [], 0, 10_000).render();
        assert!(!plain.contains("fleetmesh_wireguard"), "{plain}");
    }
}
