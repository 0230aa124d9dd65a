//! The remote-cluster watchers (`mesh_agent::remote::manage`) against a real etcd (started here on loopback, killed
//! by a guard) playing the remote cluster `west`.
//!
//! - Before the synced marker the remote is `Syncing` and listed data only adds; malformed values are skipped and
//!   counted by reason (bad JSON, key/value mismatch, unknown schema version).
//! - The marker makes it `Synced`; node puts and deletes follow; a remote claiming this cluster's id is unusable
//!   until it stops doing so.
//! - etcd killed: `Disconnected`, nodes kept; changes made while disconnected are picked up by the resync after
//!   reconnecting (a node deleted meanwhile disappears, one added appears).
//! - Identities and ips follow the same rules (partial data only adds before their synced markers, malformed
//!   values are counted); the agent's own cluster (`manage_own`, `--kvstore-config`) is watched for identities,
//!   ips and pod capacities only, and never appears among the remote clusters; a peer's capacities are not kept.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

#[path = "common/watchers.rs"]
#[expect(dead_code, reason = "these tests never change the peer files after start")]
mod watchers;

use mesh_agent::desired::LocalNode;
use mesh_agent::remote::{RemoteCluster, Remotes, SyncState};
use mesh_kvstore::{ClusterConfig, Keys, NodeRecord, Synced, encode};
use mesh_testkit::{Etcd, eventually, free_port};
use watchers::{Agent, TIMEOUT, peer_file};

// ---------------------------------------------------------------------------------------------------------------
// The agent side
// ---------------------------------------------------------------------------------------------------------------

fn node(i: u8) -> NodeRecord {
    NodeRecord {
        name: format!("west-node-{i}"),
        cluster: "west".into(),
        cluster_id: 2,
        underlay_ipv4: Ipv4Addr::new(100, 65, 2, i),
        pod_cidrs: vec![format!("10.2.{i}.0/24").parse().expect("cidr")],
        wireguard: None,
    }
}

fn config(id: u16) -> String {
    encode(&ClusterConfig {
        name: "west".into(),
        id,
        capabilities: vec!["nodes/v1".into()],
        labels: Default::default(),
    })
}

fn synced_marker() -> String {
    encode(&Synced { time_ms: 0, count: 1 })
}

fn node_names(w: &RemoteCluster) -> BTreeSet<&str> {
    w.nodes.keys().map(String::as_str).collect()
}

/// `Ok` when west holds exactly these nodes, with the records as published.
fn has_nodes(w: &RemoteCluster, want: &[u8]) -> Result<(), String> {
    let want: imbl::OrdMap<String, std::sync::Arc<NodeRecord>> = want
        .iter()
        .map(|i| (format!("west-node-{i}"), std::sync::Arc::new(node(*i))))
        .collect();
    if w.nodes == want {
        Ok(())
    } else {
        Err(format!("nodes are {:?}", node_names(w)))
    }
}

fn is_synced(w: &RemoteCluster) -> Result<(), String> {
    match w.state {
        SyncState::Synced { .. } if w.usable => Ok(()),
        _ => Err("not synced and usable".into()),
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn follows_a_remote_cluster_and_skips_malformed_values() {
    let etcd = Etcd::start().await;
    let mut c = etcd.client().await;
    let keys = Keys::default();
    let mut bad_cluster = node(7);
    bad_cluster.name = "bad2".into();
    bad_cluster.cluster = "east".into();
    for (k, v) in [
        (keys.node("west", "west-node-1"), encode(&node(1))),
        (keys.cluster_config("west"), config(2)),
        (keys.node("west", "bad1"), "{not json".to_owned()),
        (keys.node("west", "bad2"), encode(&bad_cluster)),
        ("fleetmesh/state/nodes/v9/west/x".to_owned(), encode(&node(9))),
    ] {
        c.put(k, v, None).await.expect("seed");
    }
    let agent = Agent::start(&[("west", peer_file(&etcd, ""))]);

    let west = agent
        .wait("west", "partial data before the synced marker", |w| {
            if !matches!(w.state, SyncState::Syncing { .. }) {
                return Err("not syncing".into());
            }
            has_nodes(w, &[1])?;
            for reason in ["bad_json", "key_mismatch", "unknown_version"] {
                if w.decode_errors.get(reason) != Some(&1) {
                    return Err(format!("{reason} not counted once"));
                }
            }
            Ok(())
        })
        .await;
    assert_eq!(west.config.as_ref().map(|c| c.id), Some(2), "{west:?}");
    assert!(west.usable);
    assert_eq!(west.syncs, 0, "{west:?}");

    c.put(keys.synced("west", "nodes"), synced_marker(), None)
        .await
        .expect("put marker");
    let west = agent
        .wait("west", "synced after the marker", |w| {
            is_synced(w)?;
            has_nodes(w, &[1])
        })
        .await;
    assert_eq!(west.syncs, 1);

    c.put(keys.node("west", "west-node-2"), encode(&node(2)), None)
        .await
        .expect("put");
    agent
        .wait("west", "added node seen", |w| has_nodes(w, &[1, 2]))
        .await;
    c.delete(keys.node("west", "west-node-2"), None)
        .await
        .expect("delete");
    agent
        .wait("west", "deleted node gone", |w| has_nodes(w, &[1]))
        .await;

    // A malformed update is counted and does not remove anything.
    c.put(keys.node("west", "west-node-1"), "[]", None)
        .await
        .expect("put");
    agent
        .wait("west", "malformed update counted", |w| {
            if w.decode_errors.get("bad_json") == Some(&2) {
                Ok(())
            } else {
                Err("second bad_json not counted".into())
            }
        })
        .await;
    let west = agent.remotes.snapshot().remove("west").expect("west");
    is_synced(&west).expect("still synced");
    has_nodes(&west, &[1]).expect("node kept");
    c.put(keys.node("west", "west-node-1"), encode(&node(1)), None)
        .await
        .expect("put");

    c.put(keys.cluster_config("west"), config(1), None)
        .await
        .expect("put");
    agent
        .wait(
            "west",
            "a remote with this cluster's id is unusable",
            |w| match &w.state {
                SyncState::Disconnected { reason, .. } if !w.usable && reason.contains("cluster id 1") => {
                    Ok(())
                }
                _ => Err("still usable".into()),
            },
        )
        .await;
    c.put(keys.cluster_config("west"), config(2), None)
        .await
        .expect("put");
    agent
        .wait("west", "usable again with its own id", |w| {
            is_synced(w)?;
            has_nodes(w, &[1])
        })
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn disconnect_keeps_nodes_and_reconnect_resyncs() {
    let mut etcd = Etcd::start().await;
    let keys = Keys::default();
    {
        let mut c = etcd.client().await;
        for (k, v) in [
            (keys.node("west", "west-node-1"), encode(&node(1))),
            (keys.node("west", "west-node-2"), encode(&node(2))),
            (keys.cluster_config("west"), config(2)),
            (keys.synced("west", "nodes"), synced_marker()),
        ] {
            c.put(k, v, None).await.expect("seed");
        }
    }
    let agent = Agent::start(&[("west", peer_file(&etcd, ""))]);
    let west = agent
        .wait("west", "synced", |w| {
            is_synced(w)?;
            has_nodes(w, &[1, 2])
        })
        .await;
    assert_eq!(west.syncs, 1);

    etcd.stop();
    agent
        .wait("west", "disconnected, nodes kept", |w| {
            has_nodes(w, &[1, 2]).map_err(|e| format!("nodes not kept: {e}"))?;
            match &w.state {
                SyncState::Disconnected { reason, .. } if !reason.is_empty() => Ok(()),
                _ => Err("not disconnected".into()),
            }
        })
        .await;

    // Meanwhile west changes: the same data served on a port the agent does not know.
    let side_port = free_port();
    etcd.start_on(side_port).await.expect("etcd on the side port");
    {
        let mut c = mesh_testkit::connect(&mesh_testkit::url(side_port))
            .await
            .expect("client");
        c.delete(keys.node("west", "west-node-2"), None)
            .await
            .expect("delete");
        c.put(keys.node("west", "west-node-3"), encode(&node(3)), None)
            .await
            .expect("put");
    }
    etcd.stop();
    let west = agent.remotes.snapshot().remove("west").expect("west");
    has_nodes(&west, &[1, 2]).expect("nodes kept while disconnected");
    assert!(
        is_synced(&west).is_err(),
        "not synced while etcd is away: {west:?}"
    );

    let port = etcd.client_port;
    etcd.start_on(port).await.expect("etcd back on its port");
    let west = agent
        .wait("west", "resynced after reconnecting", |w| {
            is_synced(w)?;
            has_nodes(w, &[1, 3])
        })
        .await;
    assert_eq!(west.syncs, 2, "{west:?}");
}

/// A remote cluster whose state is larger than one gRPC message (4 MiB by default) and has more keys than one
/// list page: the agent lists it in pages at one revision and ends synced with everything.
#[tokio::test(flavor = "multi_thread")]
async fn lists_a_cluster_larger_than_one_grpc_message_in_pages() {
    use mesh_kvstore::{BackendRecord, PortRecord, ServiceRecord};
    use mesh_model::Protocol;
    const NODES: u16 = 1200;
    const SERVICES: u32 = 150;
    const BACKENDS: u32 = 500;
    let etcd = Etcd::start().await;
    let c = etcd.client().await;
    let keys = Keys::default();
    let port = |p| PortRecord {
        name: "tcp".into(),
        port: p,
        protocol: Protocol::Tcp,
    };
    let mut puts = Vec::new();
    puts.push((keys.cluster_config("west"), config(2)));
    for i in 0..NODES {
        let [hi, lo] = i.to_be_bytes();
        let rec = NodeRecord {
            name: format!("west-node-{i}"),
            cluster: "west".into(),
            cluster_id: 2,
            underlay_ipv4: Ipv4Addr::new(100, 65, hi, lo),
            pod_cidrs: vec![
                format!("10.{}.{lo}.0/24", 100 + u16::from(hi))
                    .parse()
                    .expect("cidr"),
            ],
            wireguard: None,
        };
        puts.push((keys.node("west", &rec.name), encode(&rec)));
    }
    let mut total_bytes = 0;
    for s in 0..SERVICES {
        let rec = ServiceRecord {
            mcs: None,
            cluster: "west".into(),
            cluster_id: 2,
            namespace: "demo".into(),
            name: format!("svc-{s}"),
            ports: vec![port(80)],
            backends: (0..BACKENDS)
                .map(|b| BackendRecord {
                    // Inside the nodes' pod CIDRs (10.100.0.0/24 onwards): a peer's backends lie in its pods' addresses.
                    ipv4: Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 100, 0, 0)) + s * BACKENDS + b),
                    ports: vec![port(8080)].into(),
                    weight: 1,
                })
                .collect(),
        };
        let v = encode(&rec);
        total_bytes += v.len();
        puts.push((keys.service("west", "demo", &rec.name), v));
    }
    assert!(
        total_bytes > 4 << 20,
        "the services alone exceed one default gRPC message: {total_bytes} B"
    );
    puts.push((keys.synced("west", mesh_kvstore::kinds::NODES), synced_marker()));
    puts.push((
        keys.synced("west", mesh_kvstore::kinds::SERVICES),
        synced_marker(),
    ));
    let mut tasks = Vec::new();
    for chunk in puts.chunks(64) {
        let mut c = c.clone();
        let chunk = chunk.to_vec();
        tasks.push(tokio::spawn(async move {
            for (k, v) in chunk {
                c.put(k, v, None).await.expect("seed");
            }
        }));
    }
    for t in tasks {
        t.await.expect("seeding task");
    }

    let agent = Agent::start(&[("west", peer_file(&etcd, ""))]);
    let west = agent
        .wait("west", "everything listed", |w| {
            is_synced(w)?;
            if w.nodes.len() != usize::from(NODES) || w.services.len() != SERVICES as usize {
                return Err(format!("{} nodes, {} services", w.nodes.len(), w.services.len()));
            }
            Ok(())
        })
        .await;
    assert!(
        west.services
            .values()
            .all(|s| s.backends.len() == BACKENDS as usize)
    );
    assert!(west.decode_errors.is_empty(), "{:?}", west.decode_errors);
}

/// Read through a KVStoreMesh cache (`prefix:` in the peer file): the agent follows the cached records, and when
/// the cache reports it lost the cluster, the cluster is disconnected and unreachable since the cache last heard
/// from it, with its data kept.
#[tokio::test(flavor = "multi_thread")]
async fn follows_a_cluster_through_a_kvstoremesh_cache_and_its_status() {
    let etcd = Etcd::start().await;
    let mut c = etcd.client().await;
    let cache = Keys::new(&Keys::default().kvstoremesh_prefix("west"));
    let status = |connected: bool, last_alive_ms: u64| {
        encode(&mesh_kvstore::KvstoremeshStatus {
            connected,
            last_alive_ms,
            reason: if connected {
                String::new()
            } else {
                "peer etcd unreachable".into()
            },
        })
    };
    for (k, v) in [
        (cache.cluster_config("west"), config(2)),
        (cache.node("west", "west-node-1"), encode(&node(1))),
        (cache.synced("west", mesh_kvstore::kinds::NODES), synced_marker()),
        (cache.kvstoremesh_status(), status(true, 1)),
    ] {
        c.put(k, v, None).await.expect("seed");
    }
    let agent = Agent::start(&[("west", peer_file(&etcd, &format!("prefix: {}\n", cache.prefix())))]);
    agent
        .wait("west", "synced through the cache", |w| {
            is_synced(w)?;
            has_nodes(w, &[1])
        })
        .await;
    c.put(cache.kvstoremesh_status(), status(false, 1_000), None)
        .await
        .expect("status");
    let west = agent
        .wait("west", "the cache's loss seen", |w| {
            if !matches!(w.state, SyncState::Disconnected { .. }) {
                return Err("not disconnected".into());
            }
            has_nodes(w, &[1])
        })
        .await;
    assert_eq!(
        west.unreachable_since_ms,
        Some(1_000),
        "unreachable since the cache last heard from it"
    );
    c.put(cache.kvstoremesh_status(), status(true, 2_000), None)
        .await
        .expect("status");
    agent.wait("west", "back", is_synced).await;
}

fn heartbeat(time_ms: u64) -> String {
    encode(&mesh_kvstore::Heartbeat { time_ms })
}

fn is_silent(w: &RemoteCluster) -> Result<(), String> {
    match &w.state {
        SyncState::Disconnected { reason, .. }
            if reason.contains("no new heartbeat") && w.unreachable_since_ms.is_some() =>
        {
            Ok(())
        }
        _ => Err("not silent".into()),
    }
}

/// Whether the agent's global services would use west's backends now with a grace period of `grace_ms`.
fn serves(agent: &Agent, grace_ms: u64) -> bool {
    mesh_agent::lb::reachable(&agent.remotes.snapshot(), mesh_agent::remote::now_ms(), grace_ms)
        .contains_key("west")
}

/// Read through a fleet hub (`prefix: fleetmesh/clusters/west`), a peer is judged by its heartbeat: no new one for
/// longer than the heartbeat timeout makes it unreachable since the last one (its backends go after the grace
/// period, its data stays), a malformed one is counted and changes nothing, a new one brings it back, and fresh
/// ones keep it. Losing the hub is not the peer's silence: its data stays in use, and once the hub is back the
/// heartbeat's age counts from the reconnection. A pairwise peer without any heartbeat is never judged by one, and
/// counts unreachable when its etcd goes.
#[tokio::test(flavor = "multi_thread")]
async fn a_peer_read_through_a_hub_is_judged_by_its_heartbeat() {
    let mut hub = Etcd::start().await;
    let mut c = hub.client().await;
    let via_hub = Keys::new(&Keys::default().hub_cluster_prefix("west"));
    let pairwise = Keys::default();
    for keys in [&via_hub, &pairwise] {
        for (k, v) in [
            (keys.cluster_config("west"), config(2)),
            (keys.node("west", "west-node-1"), encode(&node(1))),
            (keys.synced("west", mesh_kvstore::kinds::NODES), synced_marker()),
        ] {
            c.put(k, v, None).await.expect("seed");
        }
    }
    c.put(via_hub.heartbeat("west"), heartbeat(1), None)
        .await
        .expect("heartbeat");
    let started = mesh_agent::remote::now_ms();
    let agent = Agent::start(&[(
        "west",
        peer_file(&hub, &format!("prefix: {}\n", via_hub.prefix())),
    )]);
    agent
        .remotes
        .set_heartbeat_timeout(std::time::Duration::from_secs(1));
    let control = Agent::start(&[("west", peer_file(&hub, ""))]);
    control
        .remotes
        .set_heartbeat_timeout(std::time::Duration::from_secs(1));
    agent
        .wait("west", "synced through the hub", |w| {
            is_synced(w)?;
            has_nodes(w, &[1])
        })
        .await;

    // No new heartbeat: silent, unreachable since the list (when the last one was seen), data kept.
    let west = agent
        .wait("west", "silent without a new heartbeat", |w| {
            is_silent(w)?;
            has_nodes(w, &[1])
        })
        .await;
    let since = west.unreachable_since_ms.expect("unreachable");
    assert!(since >= started, "since {since}, started {started}");
    assert_eq!(west.heartbeat_ms, Some(1), "{west:?}");
    assert!(!serves(&agent, 0), "withdrawn once the grace period is over");
    assert!(serves(&agent, 3_600_000), "kept within the grace period");
    // The pairwise peer has no heartbeat at all and is not judged by one.
    let w = control.wait("west", "pairwise synced", is_synced).await;
    assert_eq!(w.unreachable_since_ms, None, "{w:?}");

    // A malformed heartbeat is counted and is no news.
    c.put(via_hub.heartbeat("west"), "{not json", None)
        .await
        .expect("bad heartbeat");
    let west = agent
        .wait("west", "malformed heartbeat counted", |w| {
            if w.decode_errors.get("bad_json") == Some(&1) {
                is_silent(w)
            } else {
                Err("not counted".into())
            }
        })
        .await;
    assert_eq!(west.unreachable_since_ms, Some(since));

    // A new heartbeat: back, and in use again.
    c.put(via_hub.heartbeat("west"), heartbeat(2), None)
        .await
        .expect("heartbeat");
    let west = agent
        .wait("west", "back with a new heartbeat", |w| {
            is_synced(w)?;
            if w.unreachable_since_ms.is_some() {
                return Err("still unreachable".into());
            }
            has_nodes(w, &[1])
        })
        .await;
    assert_eq!(west.syncs, 2, "{west:?}");
    assert!(serves(&agent, 0));

    // Fresh heartbeats (5 per timeout) keep it.
    let writer = {
        let mut c = c.clone();
        let key = via_hub.heartbeat("west");
        tokio::spawn(async move {
            for t in 3.. {
                let _ = c.put(key.as_str(), heartbeat(t), None).await;
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        })
    };
    mesh_testkit::stays(
        "synced while heartbeats come",
        std::time::Duration::from_millis(2500),
        || {
            let r = match agent.remotes.snapshot().remove("west") {
                Some(w) if w.unreachable_since_ms.is_none() => is_synced(&w),
                other => Err(format!("{other:?}")),
            };
            async move { r }
        },
    )
    .await;
    writer.abort();

    // The hub goes away: disconnected, its data kept and in use (the pairwise peer counts unreachable).
    let port = hub.client_port;
    agent
        .remotes
        .set_heartbeat_timeout(std::time::Duration::from_secs(3));
    hub.stop();
    agent
        .wait("west", "disconnected from the hub", |w| {
            has_nodes(w, &[1])?;
            match &w.state {
                SyncState::Disconnected { reason, .. } if !reason.contains("heartbeat") => Ok(()),
                _ => Err("not disconnected".into()),
            }
        })
        .await;
    control
        .wait("west", "the pairwise peer unreachable", |w| {
            w.unreachable_since_ms
                .map(drop)
                .ok_or_else(|| "reachable".to_owned())
        })
        .await;
    mesh_testkit::stays(
        "the hub's peer stays in use without the hub",
        std::time::Duration::from_secs(4),
        || {
            let r = if serves(&agent, 0) {
                Ok(())
            } else {
                Err(format!("{:?}", agent.remotes.snapshot().get("west")))
            };
            async move { r }
        },
    )
    .await;

    // The hub is back with the heartbeat it had: synced at once (the time without the hub was not the peer's
    // silence), then silent again once no new heartbeat comes for the timeout.
    hub.start_on(port).await.expect("hub back");
    let west = agent
        .wait("west", "synced after the hub came back", |w| {
            is_synced(w)?;
            has_nodes(w, &[1])
        })
        .await;
    assert_eq!(west.unreachable_since_ms, None, "{west:?}");
    agent
        .wait("west", "silent again without a new heartbeat", is_silent)
        .await;
}

// ---------------------------------------------------------------------------------------------------------------
// Identities and ips
// ---------------------------------------------------------------------------------------------------------------

fn identity(cluster: &str, cluster_id: u16, number: u32, app: &str) -> mesh_kvstore::IdentityRecord {
    mesh_kvstore::IdentityRecord {
        cluster: cluster.into(),
        cluster_id,
        identity: mesh_common::identity::compose(cluster_id, number),
        labels: [
            ("app".to_owned(), app.to_owned()),
            (mesh_kvstore::LABEL_CLUSTER.to_owned(), cluster.to_owned()),
        ]
        .into(),
    }
}

fn ip_record(cluster: &str, cluster_id: u16, last: u8, number: u32) -> mesh_kvstore::IpRecord {
    mesh_kvstore::IpRecord {
        ipv4: Ipv4Addr::new(10, cluster_id as u8, 1, last),
        cluster: cluster.into(),
        identity: mesh_common::identity::compose(cluster_id, number),
        namespace: "shop".into(),
        pod: format!("pod-{last}"),
        node: format!("{cluster}-node-1"),
        named_ports: vec![],
    }
}

/// `Ok` when `rc` holds exactly these identity numbers and these addresses (last octet → number).
fn has_identities(rc: &RemoteCluster, cluster_id: u16, ids: &[u32], ips: &[(u8, u32)]) -> Result<(), String> {
    use mesh_common::identity::compose;
    let got: Vec<u32> = rc.identities.keys().copied().collect();
    let want: Vec<u32> = ids.iter().map(|n| compose(cluster_id, *n)).collect();
    if got != want {
        return Err(format!("identities {got:x?}, want {want:x?}"));
    }
    let got: Vec<(Ipv4Addr, u32)> = rc.ips.iter().map(|(a, r)| (*a, r.identity)).collect();
    let want: Vec<(Ipv4Addr, u32)> = ips
        .iter()
        .map(|(o, n)| {
            (
                Ipv4Addr::new(10, cluster_id as u8, 1, *o),
                compose(cluster_id, *n),
            )
        })
        .collect();
    if got != want {
        return Err(format!("ips {got:?}, want {want:?}"));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn follows_a_remote_clusters_identities_and_ips() {
    let etcd = Etcd::start().await;
    let mut c = etcd.client().await;
    let keys = Keys::default();
    let mut wrong_cluster_id = identity("west", 2, 258, "bad");
    wrong_cluster_id.identity = mesh_common::identity::compose(3, 258);
    let mut wrong_ip = ip_record("west", 2, 9, 256);
    wrong_ip.ipv4 = Ipv4Addr::new(10, 2, 1, 99);
    for (k, v) in [
        (keys.cluster_config("west"), config(2)),
        (keys.node("west", "west-node-1"), encode(&node(1))),
        (keys.synced("west", mesh_kvstore::kinds::NODES), synced_marker()),
        (
            keys.identity("west", 256),
            encode(&identity("west", 2, 256, "api")),
        ),
        (
            keys.identity("west", 257),
            encode(&identity("west", 2, 257, "web")),
        ),
        (keys.identity("west", 258), encode(&wrong_cluster_id)),
        (
            keys.ip("west", Ipv4Addr::new(10, 2, 1, 5)),
            encode(&ip_record("west", 2, 5, 256)),
        ),
        (keys.ip("west", Ipv4Addr::new(10, 2, 1, 9)), encode(&wrong_ip)),
        (
            "fleetmesh/state/identities/v2/west/300".to_owned(),
            "{}".to_owned(),
        ),
    ] {
        c.put(k, v, None).await.expect("seed");
    }
    let agent = Agent::start(&[("west", peer_file(&etcd, ""))]);
    agent
        .wait("west", "identities and ips listed, malformed ones counted", |w| {
            has_identities(w, 2, &[256, 257], &[(5, 256)])?;
            for (reason, n) in [("invalid", 1), ("key_mismatch", 1), ("unknown_version", 1)] {
                if w.decode_errors.get(reason) != Some(&n) {
                    return Err(format!("{reason} not counted {n} times: {:?}", w.decode_errors));
                }
            }
            Ok(())
        })
        .await;

    // The synced markers; then additions, changes and deletes follow.
    c.put(
        keys.synced("west", mesh_kvstore::kinds::IDENTITIES),
        synced_marker(),
        None,
    )
    .await
    .expect("marker");
    c.put(
        keys.synced("west", mesh_kvstore::kinds::IPS),
        synced_marker(),
        None,
    )
    .await
    .expect("marker");
    c.put(
        keys.ip("west", Ipv4Addr::new(10, 2, 1, 6)),
        encode(&ip_record("west", 2, 6, 257)),
        None,
    )
    .await
    .expect("put");
    agent
        .wait("west", "new ip seen", |w| {
            has_identities(w, 2, &[256, 257], &[(5, 256), (6, 257)])
        })
        .await;
    // Records in another cluster's id space are not west's.
    c.put(
        keys.identity("west", 300),
        encode(&identity("west", 5, 300, "x")),
        None,
    )
    .await
    .expect("put");
    c.put(
        keys.ip("west", Ipv4Addr::new(10, 2, 1, 7)),
        encode(&mesh_kvstore::IpRecord {
            identity: mesh_common::identity::compose(5, 300),
            ..ip_record("west", 2, 7, 300)
        }),
        None,
    )
    .await
    .expect("put");
    // The pod at .5 changes labels: its ip record moves to another identity, and the old one goes later.
    c.put(
        keys.ip("west", Ipv4Addr::new(10, 2, 1, 5)),
        encode(&ip_record("west", 2, 5, 257)),
        None,
    )
    .await
    .expect("put");
    c.delete(keys.identity("west", 256), None).await.expect("delete");
    let west = agent
        .wait("west", "moved ip and deleted identity", |w| {
            is_synced(w)?;
            has_identities(w, 2, &[257], &[(5, 257), (6, 257)])
        })
        .await;
    let status = serde_json::to_value(&west).expect("serializes");
    assert_eq!(status["identityCount"], 1, "{status}");
    assert_eq!(status["ipCount"], 2, "{status}");
    // A malformed update keeps what was there.
    c.put(keys.identity("west", 257), "{", None).await.expect("put");
    agent
        .wait("west", "malformed update counted", |w| {
            if w.decode_errors.get("bad_json") == Some(&1) {
                Ok(())
            } else {
                Err("bad_json not counted".into())
            }
        })
        .await;
    let west = agent.remotes.snapshot().remove("west").expect("west");
    has_identities(&west, 2, &[257], &[(5, 257), (6, 257)]).expect("kept");
}

/// Writes the synced markers of every kind of `cluster`.
async fn seed_synced(c: &mut etcd_client::Client, keys: &Keys, cluster: &str) {
    for kind in [
        mesh_kvstore::kinds::NODES,
        mesh_kvstore::kinds::SERVICES,
        mesh_kvstore::kinds::IDENTITIES,
        mesh_kvstore::kinds::IPS,
    ] {
        c.put(keys.synced(cluster, kind), synced_marker(), None)
            .await
            .expect("seed");
    }
}

/// east-node-1's watcher of its own cluster's etcd at `url` (`--kvstore-config`): the config's folder (keep it),
/// the shared view and the task.
fn watch_own(url: &str, keys: &Keys) -> (tempfile::TempDir, Remotes, tokio::task::JoinHandle<()>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("kvstore.yaml");
    std::fs::write(&file, format!("endpoints: [\"{url}\"]\n")).expect("write");
    let (wake, _wake_rx) = std::sync::mpsc::channel();
    let remotes = Remotes::new(wake);
    let me = LocalNode {
        node: "east-node-1".into(),
        cluster: "east".into(),
        cluster_id: 1,
        labels: Default::default(),
    };
    let task = tokio::spawn(mesh_agent::remote::manage_own(
        file,
        me,
        keys.clone(),
        remotes.clone(),
    ));
    (dir, remotes, task)
}

#[tokio::test(flavor = "multi_thread")]
async fn watches_its_own_cluster_for_identities_and_ips_only() {
    use mesh_kvstore::{BackendRecord, PortRecord, ServiceRecord};
    let etcd = Etcd::start().await;
    let mut c = etcd.client().await;
    let keys = Keys::default();
    let own_config = |id: u16| {
        encode(&ClusterConfig {
            name: "east".into(),
            id,
            capabilities: vec![],
            labels: Default::default(),
        })
    };
    let east_node = NodeRecord {
        name: "east-node-2".into(),
        cluster: "east".into(),
        cluster_id: 1,
        underlay_ipv4: Ipv4Addr::new(100, 65, 1, 2),
        pod_cidrs: vec!["10.1.2.0/24".parse().expect("cidr")],
        wireguard: None,
    };
    let service = ServiceRecord {
        mcs: None,
        cluster: "east".into(),
        cluster_id: 1,
        namespace: "shop".into(),
        name: "api".into(),
        ports: vec![],
        backends: vec![BackendRecord {
            ipv4: Ipv4Addr::new(10, 1, 1, 5),
            ports: vec![PortRecord {
                name: String::new(),
                port: 80,
                protocol: mesh_model::Protocol::Tcp,
            }]
            .into(),
            weight: 1,
        }],
    };
    for (k, v) in [
        (keys.cluster_config("east"), own_config(1)),
        (keys.node("east", "east-node-2"), encode(&east_node)),
        (keys.service("east", "shop", "api"), encode(&service)),
        (
            keys.identity("east", 256),
            encode(&identity("east", 1, 256, "api")),
        ),
        (
            keys.ip("east", Ipv4Addr::new(10, 1, 1, 5)),
            encode(&ip_record("east", 1, 5, 256)),
        ),
    ] {
        c.put(k, v, None).await.expect("seed");
    }
    seed_synced(&mut c, &keys, "east").await;
    let (_dir, remotes, task) = watch_own(&etcd.url(), &keys);
    let own = |check: fn(&RemoteCluster) -> Result<(), String>| {
        let remotes = remotes.clone();
        move || {
            let r = match remotes.own() {
                Some(o) => check(&o).map_err(|e| format!("{e}; own: {o:?}")),
                None => Err("own cluster not known".into()),
            };
            async move { r }
        }
    };
    eventually(
        "own identities and ips, without nodes or services",
        TIMEOUT,
        own(|o| {
            is_synced(o)?;
            has_identities(o, 1, &[256], &[(5, 256)])?;
            if !o.nodes.is_empty() || !o.services.is_empty() {
                return Err("own nodes or services imported".into());
            }
            Ok(())
        }),
    )
    .await;
    assert!(
        remotes.snapshot().is_empty(),
        "the own cluster is not a remote cluster"
    );

    // Its own etcd holding another cluster id: unusable, nothing of it used.
    c.put(keys.cluster_config("east"), own_config(7), None)
        .await
        .expect("put");
    eventually(
        "unusable with another id",
        TIMEOUT,
        own(|o| {
            if !o.usable && o.identities.is_empty() && o.ips.is_empty() {
                Ok(())
            } else {
                Err("still usable".into())
            }
        }),
    )
    .await;
    c.put(keys.cluster_config("east"), own_config(1), None)
        .await
        .expect("put");
    eventually(
        "usable again",
        TIMEOUT,
        own(|o| {
            is_synced(o)?;
            has_identities(o, 1, &[256], &[(5, 256)])
        }),
    )
    .await;
    task.abort();
}

// ---------------------------------------------------------------------------------------------------------------
// Capacities
// ---------------------------------------------------------------------------------------------------------------

/// The agent's own cluster: capacity records (the pods of other nodes; the agent weights their EndpointSlice
/// backends with them) are followed (puts, deletes), malformed ones counted and never taking what was there. A peer's
/// capacity records are not kept (its backends' weights come with its service records), nor counted.
#[tokio::test(flavor = "multi_thread")]
async fn follows_its_own_clusters_capacities_and_not_a_peers() {
    use mesh_kvstore::CapacityRecord;
    let etcd = Etcd::start().await;
    let mut c = etcd.client().await;
    let keys = Keys::default();
    let east = |last: u8| Ipv4Addr::new(10, 1, 1, last);
    let west = |last: u8| Ipv4Addr::new(10, 2, 1, last);
    let capacity = |ipv4: Ipv4Addr, capacity: u32| encode(&CapacityRecord { ipv4, capacity });
    let east_config = encode(&ClusterConfig {
        name: "east".into(),
        id: 1,
        capabilities: vec![],
        labels: Default::default(),
    });
    for (k, v) in [
        (keys.cluster_config("east"), east_config),
        (
            keys.identity("east", 256),
            encode(&identity("east", 1, 256, "api")),
        ),
        (keys.ip("east", east(5)), encode(&ip_record("east", 1, 5, 256))),
        (keys.capacity("east", east(5)), capacity(east(5), 4)),
        (keys.capacity("east", east(6)), capacity(east(6), 0)),
        (keys.capacity("east", east(7)), capacity(east(8), 2)),
        (keys.cluster_config("west"), config(2)),
        (keys.node("west", "west-node-1"), encode(&node(1))),
        (keys.ip("west", west(5)), encode(&ip_record("west", 2, 5, 256))),
        (keys.capacity("west", west(5)), capacity(west(5), 3)),
        (keys.capacity("west", west(6)), "{".to_owned()),
    ] {
        c.put(k, v, None).await.expect("seed");
    }
    for cluster in ["east", "west"] {
        seed_synced(&mut c, &keys, cluster).await;
    }
    let (_dir, remotes, task) = watch_own(&etcd.url(), &keys);
    let own_has = |what: &'static str, want: Vec<(Ipv4Addr, u32)>, errors: Vec<(&'static str, u64)>| {
        let remotes = remotes.clone();
        eventually(what, TIMEOUT, move || {
            let r = match remotes.own() {
                Some(o) => {
                    let got: Vec<(Ipv4Addr, u32)> = o.capacities.iter().map(|(a, c)| (*a, *c)).collect();
                    let errs: Vec<(&str, u64)> =
                        o.decode_errors.iter().map(|(r, n)| (r.as_str(), *n)).collect();
                    if is_synced(&o).is_ok() && got == want && errs == errors {
                        Ok(())
                    } else {
                        Err(format!(
                            "capacities {got:?} want {want:?}; errors {errs:?} want {errors:?}; own: {o:?}"
                        ))
                    }
                }
                None => Err("own cluster not known".into()),
            };
            async move { r }
        })
    };
    own_has(
        "listed capacities, malformed ones counted",
        vec![(east(5), 4)],
        vec![("invalid", 1), ("key_mismatch", 1)],
    )
    .await;

    c.put(keys.capacity("east", east(6)), capacity(east(6), 2), None)
        .await
        .expect("put");
    c.delete(keys.capacity("east", east(5)), None)
        .await
        .expect("delete");
    own_has(
        "a put and a delete followed",
        vec![(east(6), 2)],
        vec![("invalid", 1), ("key_mismatch", 1)],
    )
    .await;
    // A malformed update keeps what was there.
    c.put(keys.capacity("east", east(6)), "{", None)
        .await
        .expect("put");
    own_has(
        "a malformed update counted",
        vec![(east(6), 2)],
        vec![("bad_json", 1), ("invalid", 1), ("key_mismatch", 1)],
    )
    .await;
    task.abort();

    // The same etcd as peer west: its ips are followed, its capacity records neither kept nor counted.
    let agent = Agent::start(&[("west", peer_file(&etcd, ""))]);
    let west = agent
        .wait("west", "west synced with its ip", |w| {
            is_synced(w)?;
            if w.ips.contains_key(&west(5)) {
                Ok(())
            } else {
                Err("no ip".into())
            }
        })
        .await;
    assert!(west.capacities.is_empty(), "{:?}", west.capacities);
    assert!(west.decode_errors.is_empty(), "{:?}", west.decode_errors);
}

fn backend(i: u32) -> mesh_kvstore::BackendRecord {
    mesh_kvstore::BackendRecord {
        // Inside west-node-1's pod CIDR 10.2.1.0/24 for i < 250.
        ipv4: Ipv4Addr::new(10, 2, 1, u8::try_from(i + 2).expect("small")),
        ports: vec![mesh_kvstore::PortRecord {
            name: "http".into(),
            port: 8080,
            protocol: mesh_model::Protocol::Tcp,
        }]
        .into(),
        weight: 1,
    }
}

fn slice(backends: impl IntoIterator<Item = u32>) -> String {
    encode(&mesh_kvstore::BackendSlice {
        cluster: "west".into(),
        cluster_id: 2,
        namespace: "shop".into(),
        name: "api".into(),
        backends: backends.into_iter().map(backend).collect(),
    })
}

/// Whether west's `shop/api` has exactly backends `want` (by index).
fn has_backends(w: &RemoteCluster, want: impl IntoIterator<Item = u32>) -> Result<(), String> {
    let mut want: Vec<Ipv4Addr> = want.into_iter().map(|i| backend(i).ipv4).collect();
    want.sort();
    let mut have: Vec<Ipv4Addr> = w
        .services
        .get("shop/api")
        .ok_or("no shop/api")?
        .backends
        .iter()
        .map(|b| b.ipv4)
        .collect();
    have.sort();
    if have == want {
        Ok(())
    } else {
        Err(format!("{} backends, want {}", have.len(), want.len()))
    }
}

/// A large service in backend slices: its backends are the union of its record's and its slices', whichever comes
/// first; a slice's change, a slice's deletion and the record's deletion follow; a bad slice is refused and
/// counted, and changes nothing.
#[tokio::test(flavor = "multi_thread")]
async fn assembles_a_sliced_service_from_its_record_and_slices() {
    let etcd = Etcd::start().await;
    let mut c = etcd.client().await;
    let keys = Keys::default();
    let record = |backends: Vec<mesh_kvstore::BackendRecord>| {
        encode(&mesh_kvstore::ServiceRecord {
            cluster: "west".into(),
            cluster_id: 2,
            namespace: "shop".into(),
            name: "api".into(),
            ports: vec![mesh_kvstore::PortRecord {
                name: "http".into(),
                port: 80,
                protocol: mesh_model::Protocol::Tcp,
            }],
            backends,
            mcs: None,
        })
    };
    // A slice before the record: nothing of the service yet.
    for (k, v) in [
        (keys.cluster_config("west"), config(2)),
        (keys.node("west", "west-node-1"), encode(&node(1))),
        (keys.backend_slice("west", "shop", "api", 0), slice(0..100)),
        (keys.synced("west", "nodes"), synced_marker()),
        // Deletions of services count once the services are synced.
        (keys.synced("west", "services"), synced_marker()),
    ] {
        c.put(k, v, None).await.expect("seed");
    }
    let agent = Agent::start(&[("west", peer_file(&etcd, ""))]);
    agent
        .wait("west", "synced, no service without its record", |w| {
            is_synced(w)?;
            if w.services.is_empty() {
                Ok(())
            } else {
                Err("a service without a record".into())
            }
        })
        .await;
    // The record (with two backends of its own) and a second slice.
    c.put(
        keys.service("west", "shop", "api"),
        record(vec![backend(200), backend(201)]),
        None,
    )
    .await
    .expect("put");
    c.put(
        keys.backend_slice("west", "shop", "api", 1),
        slice(100..150),
        None,
    )
    .await
    .expect("put");
    agent
        .wait("west", "record and both slices", |w| {
            has_backends(w, (0..150).chain([200, 201]))
        })
        .await;
    // One slice changes: one backend leaves it.
    c.put(
        keys.backend_slice("west", "shop", "api", 1),
        slice(100..149),
        None,
    )
    .await
    .expect("put");
    agent
        .wait("west", "the slice's change", |w| {
            has_backends(w, (0..149).chain([200, 201]))
        })
        .await;
    // A slice naming another service: refused and counted. One with a backend outside west's node CIDRs: the
    // service is held (its last good backends stay) until the slice goes.
    let mut other = mesh_kvstore::BackendSlice {
        cluster: "west".into(),
        cluster_id: 2,
        namespace: "shop".into(),
        name: "web".into(),
        backends: vec![backend(1)],
    };
    c.put(keys.backend_slice("west", "shop", "api", 2), encode(&other), None)
        .await
        .expect("put");
    other.name = "api".into();
    other.backends[0].ipv4 = Ipv4Addr::new(10, 9, 9, 9);
    c.put(keys.backend_slice("west", "shop", "api", 3), encode(&other), None)
        .await
        .expect("put");
    agent
        .wait("west", "bad slice counted, uncovered one held", |w| {
            if w.decode_errors.get("key_mismatch") != Some(&1) {
                return Err("key_mismatch not counted".into());
            }
            if w.pending_records != 1 {
                return Err(format!("{} pending", w.pending_records));
            }
            has_backends(w, (0..149).chain([200, 201]))
        })
        .await;
    c.delete(keys.backend_slice("west", "shop", "api", 3), None)
        .await
        .expect("delete");
    agent
        .wait("west", "nothing held", |w| {
            if w.pending_records == 0 {
                has_backends(w, (0..149).chain([200, 201]))
            } else {
                Err("still held".into())
            }
        })
        .await;
    // Slice 0 deleted; then the record: the service goes, its remaining slice waits for a record again.
    c.delete(keys.backend_slice("west", "shop", "api", 0), None)
        .await
        .expect("delete");
    agent
        .wait("west", "slice 0 gone", |w| {
            has_backends(w, (100..149).chain([200, 201]))
        })
        .await;
    c.delete(keys.service("west", "shop", "api"), None)
        .await
        .expect("delete");
    agent
        .wait("west", "service gone with its record", |w| {
            if w.services.contains_key("shop/api") {
                Err("still there".into())
            } else {
                Ok(())
            }
        })
        .await;
    c.put(keys.service("west", "shop", "api"), record(Vec::new()), None)
        .await
        .expect("put");
    agent
        .wait("west", "back with the slice it kept", |w| {
            has_backends(w, 100..149)
        })
        .await;
}
