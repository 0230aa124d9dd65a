//! Trust boundaries of the remote-cluster watchers (docs/security.md): against a real etcd (on loopback, killed by
//! a guard) playing peer clusters, agent `east` (id 1) accepts only what each peer may claim.
//!
//! - A peer without its cluster config is unusable, and usable once it publishes one.
//! - Records carrying another cluster's id, weights out of range, addresses outside the peer's accepted pod CIDRs
//!   are refused (counted, the reason in the status) and the last good record stays.
//! - A pod CIDR overlapping this cluster's or another peer's is refused: the first claimant keeps it.
//! - What the peer file pins (id, pod CIDRs, labels) wins over what the peer publishes; the mismatch is reported.

use std::net::Ipv4Addr;
use std::time::Duration;

/// East's own node and the pod CIDR it claims before any peer.
const EAST_NODES: &[(&str, &str)] = &[("east-node-1", "10.1.0.0/24")];

#[path = "common/watchers.rs"]
#[expect(dead_code, reason = "these tests always start with east's own CIDR claims")]
mod watchers;

use mesh_agent::remote::{RemoteCluster, SyncState};
use mesh_kvstore::{
    BackendRecord, ClusterConfig, IdentityRecord, IpRecord, Keys, NodeRecord, PortRecord, ServiceRecord,
    Synced, encode,
};
use mesh_testkit::{Etcd, eventually};
use watchers::{Agent, TIMEOUT, peer_file};

fn config(cluster: &str, id: u16, labels: &[(&str, &str)]) -> String {
    encode(&ClusterConfig {
        name: cluster.into(),
        id,
        capabilities: vec![],
        labels: labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
    })
}

fn node(cluster: &str, id: u16, i: u8, cidr: &str) -> NodeRecord {
    NodeRecord {
        name: format!("{cluster}-node-{i}"),
        cluster: cluster.into(),
        cluster_id: id,
        underlay_ipv4: Ipv4Addr::new(100, 65, u8::try_from(id).expect("small id"), i),
        pod_cidrs: vec![cidr.parse().expect("cidr")],
        wireguard: None,
    }
}

fn service(cluster: &str, id: u16, backend: Ipv4Addr, weight: u32) -> ServiceRecord {
    let port = |p| PortRecord {
        name: "http".into(),
        port: p,
        protocol: mesh_model::Protocol::Tcp,
    };
    ServiceRecord {
        mcs: None,
        cluster: cluster.into(),
        cluster_id: id,
        namespace: "shop".into(),
        name: "api".into(),
        ports: vec![port(80)],
        backends: vec![BackendRecord {
            ipv4: backend,
            ports: vec![port(8080)].into(),
            weight,
        }],
    }
}

fn identity(cluster: &str, id: u16, number: u32) -> IdentityRecord {
    IdentityRecord {
        cluster: cluster.into(),
        cluster_id: id,
        identity: mesh_common::identity::compose(id, number),
        labels: [
            ("app".to_owned(), "client".to_owned()),
            (mesh_kvstore::LABEL_CLUSTER.to_owned(), cluster.to_owned()),
        ]
        .into(),
    }
}

fn ip(cluster: &str, id: u16, addr: Ipv4Addr, number: u32) -> IpRecord {
    IpRecord {
        ipv4: addr,
        cluster: cluster.into(),
        identity: mesh_common::identity::compose(id, number),
        namespace: "shop".into(),
        pod: format!("client-{}", addr.octets()[3]),
        node: format!("{cluster}-node-1"),
        named_ports: vec![],
    }
}

async fn put(c: &mut etcd_client::Client, k: String, v: String) {
    c.put(k, v, None).await.expect("put");
}

async fn seed_synced(c: &mut etcd_client::Client, keys: &Keys, cluster: &str) {
    for kind in [
        mesh_kvstore::kinds::NODES,
        mesh_kvstore::kinds::SERVICES,
        mesh_kvstore::kinds::IDENTITIES,
        mesh_kvstore::kinds::IPS,
    ] {
        put(
            c,
            keys.synced(cluster, kind),
            encode(&Synced { time_ms: 0, count: 1 }),
        )
        .await;
    }
}

fn synced_usable(rc: &RemoteCluster) -> Result<(), String> {
    match rc.state {
        SyncState::Synced { .. } if rc.usable => Ok(()),
        _ => Err("not synced and usable".into()),
    }
}

fn counted(rc: &RemoteCluster, reason: &str, n: u64) -> Result<(), String> {
    match rc.decode_errors.get(reason) {
        Some(got) if *got == n => Ok(()),
        got => Err(format!("{reason} counted {got:?}, want {n}")),
    }
}

fn refusal_names(rc: &RemoteCluster, needle: &str) -> Result<(), String> {
    if rc.recent_refusals.iter().any(|r| r.contains(needle)) {
        Ok(())
    } else {
        Err(format!("no refusal naming {needle:?}"))
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_peer_without_its_cluster_config_is_unusable() {
    let etcd = Etcd::start().await;
    let mut c = etcd.client().await;
    let keys = Keys::default();
    put(
        &mut c,
        keys.node("west", "west-node-1"),
        encode(&node("west", 2, 1, "10.2.1.0/24")),
    )
    .await;
    put(
        &mut c,
        keys.identity("west", 300),
        encode(&identity("west", 2, 300)),
    )
    .await;
    // Identities in this cluster's id space, consistent in themselves: without a config nothing checked them.
    put(
        &mut c,
        keys.identity("west", 301),
        encode(&identity("west", 1, 301)),
    )
    .await;
    seed_synced(&mut c, &keys, "west").await;
    let agent = Agent::start_claiming(&[("west", peer_file(&etcd, ""))], EAST_NODES);
    let west = agent
        .wait("west", "unusable without its config", |w| match &w.state {
            SyncState::Disconnected { reason, .. }
                if !w.usable && reason.contains("no valid cluster config") =>
            {
                Ok(())
            }
            _ => Err("not refused".into()),
        })
        .await;
    assert!(west.nodes.is_empty() && west.identities.is_empty(), "{west:?}");

    // Once it says who it is, its records are read (listed again) and checked against its id.
    put(&mut c, keys.cluster_config("west"), config("west", 2, &[])).await;
    let west = agent
        .wait("west", "usable with its config", |w| {
            synced_usable(w)?;
            if w.nodes.len() == 1 && w.identities.len() == 1 {
                Ok(())
            } else {
                Err("records not listed".into())
            }
        })
        .await;
    assert!(
        west.identities
            .contains_key(&mesh_common::identity::compose(2, 300)),
        "{west:?}"
    );
    counted(&west, "wrong_cluster_id", 1).expect("east's identity refused");
}

#[tokio::test(flavor = "multi_thread")]
async fn records_beyond_a_peers_grant_are_refused_and_the_last_good_ones_kept() {
    let etcd = Etcd::start().await;
    let mut c = etcd.client().await;
    let keys = Keys::default();
    let west_pod = Ipv4Addr::new(10, 2, 1, 5);
    let east_pod = Ipv4Addr::new(10, 1, 0, 5);
    put(&mut c, keys.cluster_config("west"), config("west", 2, &[])).await;
    put(
        &mut c,
        keys.node("west", "west-node-1"),
        encode(&node("west", 2, 1, "10.2.1.0/24")),
    )
    .await;
    put(
        &mut c,
        keys.identity("west", 300),
        encode(&identity("west", 2, 300)),
    )
    .await;
    put(
        &mut c,
        keys.ip("west", west_pod),
        encode(&ip("west", 2, west_pod, 300)),
    )
    .await;
    put(
        &mut c,
        keys.service("west", "shop", "api"),
        encode(&service("west", 2, west_pod, 1)),
    )
    .await;
    seed_synced(&mut c, &keys, "west").await;
    let agent = Agent::start_claiming(&[("west", peer_file(&etcd, ""))], EAST_NODES);
    agent
        .wait("west", "synced", |w| {
            synced_usable(w)?;
            if w.ips.len() == 1 && w.services.len() == 1 {
                Ok(())
            } else {
                Err("records missing".into())
            }
        })
        .await;

    // West passes itself off as east: its node with east's id, an identity and an ip in east's id space.
    put(
        &mut c,
        keys.node("west", "west-node-1"),
        encode(&node("west", 1, 1, "10.2.1.0/24")),
    )
    .await;
    put(
        &mut c,
        keys.identity("west", 301),
        encode(&identity("west", 1, 301)),
    )
    .await;
    put(
        &mut c,
        keys.ip("west", Ipv4Addr::new(10, 2, 1, 6)),
        encode(&ip("west", 1, Ipv4Addr::new(10, 2, 1, 6), 301)),
    )
    .await;
    // West takes every connection of the global service.
    put(
        &mut c,
        keys.service("west", "shop", "api"),
        encode(&service("west", 2, west_pod, u32::MAX)),
    )
    .await;
    // West claims an address of east's pods.
    put(
        &mut c,
        keys.ip("west", east_pod),
        encode(&ip("west", 2, east_pod, 300)),
    )
    .await;
    let west = agent
        .wait("west", "refusals counted", |w| {
            counted(w, "wrong_cluster_id", 3)?;
            counted(w, "invalid", 1)?;
            refusal_names(w, "clusterId 1 is not the peer's granted cluster id 2")?;
            refusal_names(w, "weight 4294967295")?;
            if w.pending_records == 1 {
                Ok(())
            } else {
                Err("east's address not held back".into())
            }
        })
        .await;
    synced_usable(&west).expect("still usable");
    assert_eq!(
        west.nodes["west-node-1"].cluster_id, 2,
        "last good node record kept"
    );
    assert_eq!(
        west.services["shop/api"].backends[0].weight, 1,
        "last good service record kept"
    );
    assert_eq!(
        west.identities.keys().copied().collect::<Vec<_>>(),
        vec![mesh_common::identity::compose(2, 300)]
    );
    assert_eq!(
        west.ips.keys().copied().collect::<Vec<_>>(),
        vec![west_pod],
        "east's address not used"
    );
    let status = serde_json::to_value(&west).expect("serializes");
    assert_eq!(status["pendingRecords"], 1, "{status}");
    assert!(
        status["recentRefusals"].as_array().is_some_and(|a| a.len() == 4),
        "{status}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pod_cidr_stays_with_its_first_claimant() {
    // West and north both published in one etcd (each peer file names its cluster).
    let etcd = Etcd::start().await;
    let mut c = etcd.client().await;
    let keys = Keys::default();
    put(&mut c, keys.cluster_config("west"), config("west", 2, &[])).await;
    put(
        &mut c,
        keys.node("west", "west-node-1"),
        encode(&node("west", 2, 1, "10.2.1.0/24")),
    )
    .await;
    seed_synced(&mut c, &keys, "west").await;
    let agent = Agent::start_claiming(&[("west", peer_file(&etcd, ""))], EAST_NODES);
    agent
        .wait("west", "west synced", |w| {
            synced_usable(w)?;
            if w.nodes.len() == 1 {
                Ok(())
            } else {
                Err("no node".into())
            }
        })
        .await;

    put(&mut c, keys.cluster_config("north"), config("north", 3, &[])).await;
    // Inside west's prefix (a more specific prefix would win the lookup), around east's, and its own.
    put(
        &mut c,
        keys.node("north", "north-node-1"),
        encode(&node("north", 3, 1, "10.2.1.128/25")),
    )
    .await;
    put(
        &mut c,
        keys.node("north", "north-node-2"),
        encode(&node("north", 3, 2, "10.1.0.0/16")),
    )
    .await;
    put(
        &mut c,
        keys.node("north", "north-node-3"),
        encode(&node("north", 3, 3, "10.3.3.0/24")),
    )
    .await;
    seed_synced(&mut c, &keys, "north").await;
    std::fs::write(agent.config.path().join("north"), peer_file(&etcd, "")).expect("north's file");
    let north = agent
        .wait("north", "north's overlapping nodes refused", |n| {
            synced_usable(n)?;
            counted(n, "overlapping_pod_cidr", 2)?;
            refusal_names(n, "claimed first by cluster \"west\"")?;
            refusal_names(n, "claimed first by cluster \"east\"")
        })
        .await;
    assert_eq!(north.nodes.keys().collect::<Vec<_>>(), vec!["north-node-3"]);
    let west = agent.remotes.snapshot().remove("west").expect("west");
    assert_eq!(west.nodes.len(), 1, "the first claimant keeps its prefix");

    // West's node goes (its lease ended, say): its prefix is free, and north's refused record takes it without
    // being written again, as it would in an agent that never saw west's claim.
    c.delete(keys.node("west", "west-node-1"), None)
        .await
        .expect("delete");
    agent
        .wait("west", "west's node gone", |w| {
            if w.nodes.is_empty() {
                Ok(())
            } else {
                Err("still there".into())
            }
        })
        .await;
    let north = agent
        .wait("north", "north takes the freed prefix", |n| {
            if n.nodes.contains_key("north-node-1") {
                Ok(())
            } else {
                Err("not taken".into())
            }
        })
        .await;
    counted(&north, "overlapping_pod_cidr", 2).expect("retries are not counted again");
}

#[tokio::test(flavor = "multi_thread")]
async fn what_the_peer_file_pins_wins_over_what_the_peer_publishes() {
    let etcd = Etcd::start().await;
    let mut c = etcd.client().await;
    let keys = Keys::default();
    put(
        &mut c,
        keys.cluster_config("west"),
        config("west", 2, &[("stage", "canary")]),
    )
    .await;
    put(
        &mut c,
        keys.node("west", "west-node-1"),
        encode(&node("west", 2, 1, "10.2.1.0/24")),
    )
    .await;
    // Outside the pinned pod CIDRs.
    put(
        &mut c,
        keys.node("west", "west-node-2"),
        encode(&node("west", 2, 2, "10.9.0.0/24")),
    )
    .await;
    let b = Ipv4Addr::new(10, 2, 7, 7);
    put(&mut c, keys.ip("west", b), encode(&ip("west", 2, b, 300))).await;
    put(
        &mut c,
        keys.service("west", "shop", "api"),
        encode(&service("west", 2, Ipv4Addr::new(10, 9, 0, 5), 1)),
    )
    .await;
    seed_synced(&mut c, &keys, "west").await;
    let pins = "cluster-id: 2\npod-cidrs: [10.2.0.0/16]\ncluster-labels: {stage: prod}\n";
    let agent = Agent::start_claiming(&[("west", peer_file(&etcd, pins))], EAST_NODES);
    let west = agent
        .wait("west", "pins applied", |w| {
            synced_usable(w)?;
            counted(w, "outside_pod_cidrs", 2)?;
            if w.grant_mismatches.len() == 1 && w.grant_mismatches[0].contains("labels") {
                Ok(())
            } else {
                Err(format!("mismatches {:?}", w.grant_mismatches))
            }
        })
        .await;
    assert_eq!(west.nodes.keys().collect::<Vec<_>>(), vec!["west-node-1"]);
    // A pinned CIDR covers the address even without a node record naming it.
    assert_eq!(west.ips.keys().copied().collect::<Vec<_>>(), vec![b]);
    assert!(west.services.is_empty(), "{west:?}");
    assert_eq!(
        west.labels().and_then(|l| l.get("stage")).map(String::as_str),
        Some("prod"),
        "selectors match the pinned labels"
    );

    // West changes its id: the pinned one stays the only one accepted, and the mismatch is reported.
    put(
        &mut c,
        keys.cluster_config("west"),
        config("west", 7, &[("stage", "prod")]),
    )
    .await;
    put(
        &mut c,
        keys.node("west", "west-node-3"),
        encode(&node("west", 7, 3, "10.2.3.0/24")),
    )
    .await;
    let west = agent
        .wait("west", "id mismatch reported", |w| {
            synced_usable(w)?;
            counted(w, "wrong_cluster_id", 1)?;
            if w.grant_mismatches.iter().any(|m| m.contains("pins 2")) {
                Ok(())
            } else {
                Err(format!("mismatches {:?}", w.grant_mismatches))
            }
        })
        .await;
    assert_eq!(west.cluster_id, Some(2));
    assert_eq!(west.nodes.keys().collect::<Vec<_>>(), vec!["west-node-1"]);
}

fn over_limit(rc: &RemoteCluster) -> Result<(), String> {
    match &rc.state {
        SyncState::Disconnected { reason, .. }
            if !rc.usable && reason.contains("beyond the limits of 100 keys") && rc.nodes.is_empty() =>
        {
            Ok(())
        }
        _ => Err("not refused for its size".into()),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_peer_beyond_the_limits_is_refused_and_the_others_are_not() {
    let keys = Keys::default();
    let mut etcds = Vec::new();
    for cluster in ["west", "north", "south"] {
        let etcd = Etcd::start().await;
        let mut c = etcd.client().await;
        let id = match cluster {
            "west" => 2,
            "north" => 3,
            _ => 4,
        };
        put(&mut c, keys.cluster_config(cluster), config(cluster, id, &[])).await;
        let cidr = format!("10.{id}.1.0/24");
        put(
            &mut c,
            keys.node(cluster, &format!("{cluster}-node-1")),
            encode(&node(cluster, id, 1, &cidr)),
        )
        .await;
        seed_synced(&mut c, &keys, cluster).await;
        etcds.push((etcd, c));
    }
    // West holds more keys than allowed before the agent starts.
    for i in 0..150 {
        put(&mut etcds[0].1, format!("fleetmesh/junk/{i}"), "x".into()).await;
    }
    let files: Vec<(&str, String)> = ["west", "north", "south"]
        .iter()
        .zip(&etcds)
        .map(|(n, (e, _))| (*n, peer_file(e, "")))
        .collect();
    let agent = Agent::start_claiming(&[], EAST_NODES);
    agent.remotes.set_limits(mesh_kvstore::etcd::Limits {
        max_keys: 100,
        max_bytes: 1 << 20,
    });
    for (name, text) in &files {
        std::fs::write(agent.config.path().join(name), text).expect("peer file");
    }
    let west = agent.wait("west", "west refused at its list", over_limit).await;
    counted(&west, "over_limit", 1).expect("counted");
    for n in ["north", "south"] {
        agent
            .wait(n, "the others synced", |rc| {
                synced_usable(rc)?;
                if rc.nodes.len() == 1 {
                    Ok(())
                } else {
                    Err("no node".into())
                }
            })
            .await;
    }
    // North grows beyond the limits while watched (values count too: 2 MiB over a few keys).
    for i in 0..3 {
        put(
            &mut etcds[1].1,
            format!("fleetmesh/junk/{i}"),
            "x".repeat(700 * 1024),
        )
        .await;
    }
    agent
        .wait("north", "north refused once it grew", |rc| match &rc.state {
            SyncState::Disconnected { reason, .. } if !rc.usable && reason.contains("bytes") => Ok(()),
            _ => Err("not refused".into()),
        })
        .await;
    let south = agent.remotes.snapshot().remove("south").expect("south");
    synced_usable(&south).expect("south unaffected");
    assert_eq!(south.nodes.len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_peer_file_that_is_briefly_unreadable_keeps_the_peer_for_the_grace_period() {
    let etcd = Etcd::start().await;
    let mut c = etcd.client().await;
    let keys = Keys::default();
    put(&mut c, keys.cluster_config("west"), config("west", 2, &[])).await;
    put(
        &mut c,
        keys.node("west", "west-node-1"),
        encode(&node("west", 2, 1, "10.2.1.0/24")),
    )
    .await;
    seed_synced(&mut c, &keys, "west").await;
    let good = peer_file(&etcd, "");
    let agent = Agent::start_claiming(&[("west", good.clone())], EAST_NODES);
    agent.remotes.set_peer_file_grace(Duration::from_secs(4));
    let keeps = |w: &RemoteCluster| -> Result<(), String> {
        synced_usable(w)?;
        if w.nodes.len() == 1 && w.syncs == 1 {
            Ok(())
        } else {
            Err("data or watcher lost".into())
        }
    };
    agent.wait("west", "synced", keeps).await;

    // Half-written (not YAML): the peer and its data stay, the status says why.
    let file = agent.config.path().join("west");
    std::fs::write(&file, "endpoints: [\n").expect("garble");
    let west = agent
        .wait("west", "unreadable file reported", |w| {
            keeps(w)?;
            match &w.peer_file_error {
                Some(e) if e.contains("kept for") => Ok(()),
                other => Err(format!("peer file error {other:?}")),
            }
        })
        .await;
    assert!(west.peer_file_error.is_some_and(|e| e.contains("west")));
    mesh_testkit::stays(
        "west kept while its file is unreadable",
        Duration::from_secs(1),
        || {
            let r = agent
                .remotes
                .snapshot()
                .remove("west")
                .ok_or("west gone".to_owned())
                .and_then(|w| keeps(&w));
            async move { r }
        },
    )
    .await;
    // Back as it was: nothing restarts.
    std::fs::write(&file, &good).expect("restore");
    agent
        .wait("west", "file error cleared", |w| {
            keeps(w)?;
            if w.peer_file_error.is_none() {
                Ok(())
            } else {
                Err("still reported".into())
            }
        })
        .await;

    // Gone for longer than the grace period: the peer is removed.
    std::fs::remove_file(&file).expect("remove");
    agent
        .wait("west", "missing file reported", |w| {
            keeps(w)?;
            if w.peer_file_error.as_deref().is_some_and(|e| e.contains("gone")) {
                Ok(())
            } else {
                Err("not reported".into())
            }
        })
        .await;
    eventually("west removed after the grace period", TIMEOUT, || {
        let r = if agent.remotes.snapshot().contains_key("west") {
            Err("still there".to_owned())
        } else {
            Ok(())
        };
        async move { r }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_silent_kvstoremesh_cache_makes_the_cluster_unreachable() {
    let etcd = Etcd::start().await;
    let mut c = etcd.client().await;
    let cache = Keys::new(&Keys::default().kvstoremesh_prefix("west"));
    put(&mut c, cache.cluster_config("west"), config("west", 2, &[])).await;
    put(
        &mut c,
        cache.node("west", "west-node-1"),
        encode(&node("west", 2, 1, "10.2.1.0/24")),
    )
    .await;
    seed_synced(&mut c, &cache, "west").await;
    // The mirror's status, under the mirror's lease.
    let lease = c.lease_grant(30, None).await.expect("lease").id();
    let status = encode(&mesh_kvstore::KvstoremeshStatus {
        connected: true,
        last_alive_ms: 1_000,
        reason: String::new(),
    });
    c.put(
        cache.kvstoremesh_status(),
        status,
        Some(etcd_client::PutOptions::new().with_lease(lease)),
    )
    .await
    .expect("status");
    let agent = Agent::start_claiming(
        &[("west", peer_file(&etcd, &format!("prefix: {}\n", cache.prefix())))],
        EAST_NODES,
    );
    agent
        .wait("west", "synced through the cache", |w| {
            synced_usable(w)?;
            if w.unreachable_since_ms.is_none() {
                Ok(())
            } else {
                Err("unreachable".into())
            }
        })
        .await;
    // The mirror dies: its lease ends (revoked here rather than waited for) and the status goes with it.
    c.lease_revoke(lease).await.expect("revoke");
    let west = agent
        .wait("west", "the silent cache makes west unreachable", |w| {
            match &w.state {
                SyncState::Disconnected { reason, .. } if reason.contains("silent") => Ok(()),
                _ => Err("not disconnected".into()),
            }
        })
        .await;
    assert_eq!(
        west.unreachable_since_ms,
        Some(1_000),
        "since the cache last heard from west"
    );
    assert_eq!(
        west.nodes.len(),
        1,
        "the cached data stays (the grace period decides on backends)"
    );
}
