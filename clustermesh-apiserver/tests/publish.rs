//! The real `clustermesh-apiserver` binary against a real etcd (started here on loopback, killed by a guard).
//!
//! - Start-up: node records from the manifests are published with a lease, a record left by an earlier run is
//!   removed, the synced marker, heartbeat and cluster config are written.
//! - The published records follow the manifests directory (node removed, node added); malformed manifests keep
//!   the records as they are.
//! - A restart never withdraws records that are still desired (no deletes, synced marker counts every node).
//! - SIGKILL: nothing deletes the records, the lease expires them.
//! - Identities: numbers are stable across restarts, a new label set gets a new number, a pod whose labels change
//!   moves to another identity, an unused number is withdrawn after the grace period, and two clusters' identities
//!   never collide.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use etcd_client::{Client, EventType, GetOptions, WatchOptions};
use mesh_kvstore::{Keys, NodeRecord};
use mesh_testkit::{Etcd, eventually, log_tail, stays};

// ---------------------------------------------------------------------------------------------------------------
// The apiserver process
// ---------------------------------------------------------------------------------------------------------------

struct Apiserver {
    child: Option<Child>,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Apiserver {
    fn start(manifests: &Path, etcd: &Etcd) -> Self {
        Self::start_with(manifests, etcd, &[])
    }

    fn start_with(manifests: &Path, etcd: &Etcd, extra: &[&str]) -> Self {
        Self::start_as("east", 1, manifests, etcd, extra)
    }

    fn start_as(cluster: &str, id: u16, manifests: &Path, etcd: &Etcd, extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("apiserver.log");
        let child = Command::new(env!("CARGO_BIN_EXE_clustermesh-apiserver"))
            .args([
                "--cluster-name",
                cluster,
                "--cluster-id",
                &id.to_string(),
                "--manifests",
            ])
            .arg(manifests)
            .args(["--etcd-endpoints", &etcd.url(), "--lease-ttl", "5s"])
            .args(["--log", "info"])
            .args(extra)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn clustermesh-apiserver");
        Self {
            child: Some(child),
            log,
            _dir: dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL, and reaps the process.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Apiserver {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("--- clustermesh-apiserver log ---\n{}", log_tail(&self.log, 40));
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Manifests and expected records
// ---------------------------------------------------------------------------------------------------------------

/// (name, pod CIDR, InternalIP)
type NodeSpec = (&'static str, &'static str, Ipv4Addr);

const N1: NodeSpec = ("east-node-1", "10.1.1.0/24", Ipv4Addr::new(100, 65, 1, 1));
const N2: NodeSpec = ("east-node-2", "10.1.2.0/24", Ipv4Addr::new(100, 65, 1, 2));
const N3: NodeSpec = ("east-node-3", "10.1.3.0/24", Ipv4Addr::new(100, 65, 1, 3));

fn nodes_yaml(nodes: &[NodeSpec]) -> String {
    nodes
        .iter()
        .map(|(name, cidr, ip)| {
            format!(
                "apiVersion: v1\nkind: Node\nmetadata: {{name: {name}}}\nspec: {{podCIDR: {cidr}}}\n\
                 status: {{addresses: [{{type: InternalIP, address: {ip}}}]}}\n"
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

/// Replaces `dir/name` atomically (a hidden temporary file, then rename), as an operator's tooling would.
fn write_atomic(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).expect("write manifest");
    std::fs::rename(&tmp, dir.join(name)).expect("rename manifest");
}

fn record(spec: NodeSpec) -> NodeRecord {
    NodeRecord {
        name: spec.0.into(),
        cluster: "east".into(),
        cluster_id: 1,
        underlay_ipv4: spec.2,
        pod_cidrs: vec![spec.1.parse().expect("cidr")],
        wireguard: None,
    }
}

fn expected(specs: &[NodeSpec]) -> BTreeMap<String, NodeRecord> {
    specs.iter().map(|s| (s.0.to_owned(), record(*s))).collect()
}

/// The published node records of east (each must decode), with their lease ids.
async fn published(client: &mut Client) -> Result<BTreeMap<String, (NodeRecord, i64)>, String> {
    let keys = Keys::default();
    let prefix = keys.nodes_prefix("east");
    let resp = client
        .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
        .await
        .map_err(|e| e.to_string())?;
    let mut out = BTreeMap::new();
    for kv in resp.kvs() {
        let key = kv.key_str().map_err(|e| e.to_string())?;
        let name = key.strip_prefix(&prefix).ok_or("key outside the prefix")?;
        let rec = mesh_kvstore::decode_node(key, "east", name, kv.value())
            .map_err(|e| format!("published record does not decode: {e}"))?;
        out.insert(name.to_owned(), (rec, kv.lease()));
    }
    Ok(out)
}

/// `Ok` when exactly `want` is published, every record with a lease.
async fn published_exactly(client: &mut Client, want: &[NodeSpec]) -> Result<(), String> {
    let got = published(client).await?;
    let records: BTreeMap<String, NodeRecord> =
        got.iter().map(|(k, (r, _))| (k.clone(), r.clone())).collect();
    if records != expected(want) {
        return Err(format!("published {records:?}"));
    }
    if let Some((name, _)) = got.iter().find(|(_, (_, lease))| *lease == 0) {
        return Err(format!("record of {name} has no lease"));
    }
    Ok(())
}

/// The value and lease of `key`, if present.
async fn get(client: &mut Client, key: &str) -> Result<Option<(Vec<u8>, i64)>, String> {
    let resp = client.get(key, None).await.map_err(|e| e.to_string())?;
    Ok(resp.kvs().first().map(|kv| (kv.value().to_vec(), kv.lease())))
}

fn seed_record(spec: NodeSpec) -> (String, String) {
    (
        Keys::default().node("east", spec.0),
        mesh_kvstore::encode(&record(spec)),
    )
}

const TIMEOUT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn publishes_nodes_follows_the_manifests_and_keeps_them_on_bad_input() {
    let etcd = Etcd::start().await;
    let mut c = etcd.client().await;
    let keys = Keys::default();
    let ghost = keys.node("east", "ghost");
    let ghost_rec = NodeRecord {
        name: "ghost".into(),
        cluster: "east".into(),
        cluster_id: 1,
        underlay_ipv4: Ipv4Addr::new(100, 65, 1, 99),
        pod_cidrs: vec!["10.1.99.0/24".parse().expect("cidr")],
        wireguard: None,
    };
    c.put(ghost.as_str(), mesh_kvstore::encode(&ghost_rec), None)
        .await
        .expect("seed stale record");

    let manifests = tempfile::tempdir().expect("tempdir");
    let dir = manifests.path();
    write_atomic(dir, "nodes.yaml", &nodes_yaml(&[N1, N2]));
    let api = Apiserver::start(dir, &etcd);

    eventually("both nodes published with a lease", TIMEOUT, || {
        let mut c = c.clone();
        async move { published_exactly(&mut c, &[N1, N2]).await }
    })
    .await;
    assert_eq!(
        get(&mut c, &ghost).await.expect("get"),
        None,
        "stale record removed"
    );
    let (marker, marker_lease) = get(&mut c, &keys.synced("east", "nodes"))
        .await
        .expect("get")
        .expect("synced marker written after the first sync");
    let marker = mesh_kvstore::decode_synced("synced", &marker).expect("synced marker decodes");
    assert_eq!(marker.count, 2, "synced marker counts the nodes");
    assert_ne!(marker_lease, 0, "synced marker has a lease");
    let (config, config_lease) = get(&mut c, &keys.cluster_config("east"))
        .await
        .expect("get")
        .expect("cluster config written");
    let config = mesh_kvstore::decode_cluster_config("config", "east", &config).expect("config decodes");
    assert_eq!((config.name.as_str(), config.id), ("east", 1));
    assert_eq!(config_lease, 0, "the cluster config outlives the daemon");
    eventually("heartbeat with a lease", TIMEOUT, || {
        let mut c = c.clone();
        let key = keys.heartbeat("east");
        async move {
            match get(&mut c, &key).await? {
                Some((_, lease)) if lease != 0 => Ok(()),
                other => Err(format!("heartbeat {other:?}")),
            }
        }
    })
    .await;

    write_atomic(dir, "nodes.yaml", &nodes_yaml(&[N1]));
    eventually("removed node withdrawn", TIMEOUT, || {
        let mut c = c.clone();
        async move { published_exactly(&mut c, &[N1]).await }
    })
    .await;

    write_atomic(dir, "nodes.yaml", &nodes_yaml(&[N1, N3]));
    eventually("added node published", TIMEOUT, || {
        let mut c = c.clone();
        async move { published_exactly(&mut c, &[N1, N3]).await }
    })
    .await;

    // A new broken file, then the file holding the nodes broken: both refused, the records stay.
    for (file, text) in [
        (
            "broken.yaml",
            "apiVersion: v1\nkind: Node\nmetadata: {name: x}\nspec: {bogus: 1}\n",
        ),
        ("nodes.yaml", "apiVersion: v1\nkind: Node\nmetadata: {name: [\n"),
    ] {
        write_atomic(dir, file, text);
        eventually(&format!("{file} refused"), TIMEOUT, || {
            let refused = api
                .log()
                .lines()
                .any(|l| l.contains("manifest refused") && l.contains(file));
            async move {
                if refused {
                    Ok(())
                } else {
                    Err("not yet".to_owned())
                }
            }
        })
        .await;
        stays(
            &format!("records kept despite the broken {file}"),
            Duration::from_secs(1),
            || {
                let mut c = c.clone();
                async move { published_exactly(&mut c, &[N1, N3]).await }
            },
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn restart_does_not_withdraw_records_that_are_still_desired() {
    let etcd = Etcd::start().await;
    let mut c = etcd.client().await;
    let keys = Keys::default();
    // What the previous run left: the same two nodes, and one that is gone since.
    let ghost = keys.node("east", "ghost");
    for (k, v) in [seed_record(N1), seed_record(N2)] {
        c.put(k, v, None).await.expect("seed");
    }
    let ghost_val = mesh_kvstore::encode(&NodeRecord {
        name: "ghost".into(),
        ..record(N3)
    });
    let rev = c
        .put(ghost.as_str(), ghost_val, None)
        .await
        .expect("seed")
        .header()
        .map(etcd_client::ResponseHeader::revision)
        .expect("revision");

    // Enough other objects that reading the directory takes a moment.
    let manifests = tempfile::tempdir().expect("tempdir");
    let dir = manifests.path();
    let filler: Vec<String> = (0..3000)
        .map(|i| format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: ns-{i}}}\n"))
        .collect();
    write_atomic(dir, "filler.yaml", &filler.join("---\n"));
    write_atomic(dir, "nodes.yaml", &nodes_yaml(&[N1, N2]));

    let mut watch = c
        .watch(
            keys.root(),
            Some(WatchOptions::new().with_prefix().with_start_revision(rev + 1)),
        )
        .await
        .expect("watch");
    let _api = Apiserver::start(dir, &etcd);

    let synced_key = keys.synced("east", "nodes");
    let mut deleted = BTreeSet::new();
    let deadline = Instant::now() + TIMEOUT;
    let marker = 'events: loop {
        let msg = tokio::time::timeout_at(deadline.into(), watch.message())
            .await
            .expect("synced marker written within the deadline")
            .expect("watch")
            .expect("watch stream open");
        for ev in msg.events() {
            let kv = ev.kv().expect("event kv");
            let key = kv.key_str().expect("utf-8 key").to_owned();
            match ev.event_type() {
                EventType::Delete => {
                    deleted.insert(key);
                }
                EventType::Put if key == synced_key => {
                    break 'events mesh_kvstore::decode_synced(&key, kv.value()).expect("marker decodes");
                }
                EventType::Put => {}
            }
        }
    };
    assert_eq!(
        deleted,
        BTreeSet::from([ghost]),
        "only the stale record is deleted"
    );
    assert_eq!(marker.count, 2, "the synced marker counts every desired node");
    published_exactly(&mut c, &[N1, N2])
        .await
        .expect("both nodes published with a lease");
}

#[tokio::test(flavor = "multi_thread")]
async fn records_expire_with_the_lease_when_the_apiserver_is_killed() {
    let etcd = Etcd::start().await;
    let mut c = etcd.client().await;
    let keys = Keys::default();
    let manifests = tempfile::tempdir().expect("tempdir");
    write_atomic(manifests.path(), "nodes.yaml", &nodes_yaml(&[N1, N2]));
    let mut api = Apiserver::start(manifests.path(), &etcd);
    eventually("both nodes published", TIMEOUT, || {
        let mut c = c.clone();
        async move { published_exactly(&mut c, &[N1, N2]).await }
    })
    .await;
    let leased = [keys.synced("east", "nodes"), keys.heartbeat("east")];
    eventually("synced marker and heartbeat written", TIMEOUT, || {
        let mut c = c.clone();
        let leased = leased.clone();
        async move {
            for k in &leased {
                get(&mut c, k).await?.ok_or(format!("{k} missing"))?;
            }
            Ok(())
        }
    })
    .await;

    api.kill();
    let killed = Instant::now();
    published_exactly(&mut c, &[N1, N2])
        .await
        .expect("SIGKILL deletes nothing; the records live until the lease expires");
    eventually("leased records expired", TIMEOUT, || {
        let mut c = c.clone();
        let leased = leased.clone();
        async move {
            let nodes = published(&mut c).await?;
            if !nodes.is_empty() {
                return Err(format!("{} node records left", nodes.len()));
            }
            for k in &leased {
                if get(&mut c, k).await?.is_some() {
                    return Err(format!("{k} still there"));
                }
            }
            Ok(())
        }
    })
    .await;
    let after = killed.elapsed();
    assert!(
        after >= Duration::from_secs(2),
        "records vanished after {after:?}, sooner than a 5s lease refreshed every 5s/3 allows"
    );
    assert!(
        get(&mut c, &keys.cluster_config("east"))
            .await
            .expect("get")
            .is_some(),
        "the cluster config has no lease and stays"
    );
}

/// KVStoreMesh: the apiserver mirrors a peer cluster into its own etcd (`<prefix>/kvstoremesh/<peer>/`): what the
/// peer has (identities and ips too), changes as they happen, stale cache entries removed; a status key says whether it is connected, and
/// the cached data stays when the peer goes away.
#[tokio::test(flavor = "multi_thread")]
async fn kvstoremesh_mirrors_a_peer_and_reports_losing_it() {
    let mut west = Etcd::start().await;
    let local = Etcd::start().await;
    let peer_keys = Keys::default();
    let cache = Keys::new(&peer_keys.kvstoremesh_prefix("west"));
    let west_node = |i: u8| NodeRecord {
        name: format!("west-node-{i}"),
        cluster: "west".into(),
        cluster_id: 2,
        underlay_ipv4: Ipv4Addr::new(100, 65, 2, i),
        pod_cidrs: vec![format!("10.2.{i}.0/24").parse().expect("cidr")],
        wireguard: None,
    };
    let mut wc = west.client().await;
    let config = mesh_kvstore::encode(&mesh_kvstore::ClusterConfig {
        name: "west".into(),
        id: 2,
        capabilities: vec![],
        labels: BTreeMap::new(),
    });
    wc.put(peer_keys.cluster_config("west"), config.clone(), None)
        .await
        .expect("seed");
    wc.put(
        peer_keys.node("west", "west-node-1"),
        mesh_kvstore::encode(&west_node(1)),
        None,
    )
    .await
    .expect("seed");
    // West's own KVStoreMesh cache of another cluster is not west's to publish: never mirrored.
    let west_cache_of_north = Keys::new(&peer_keys.kvstoremesh_prefix("north")).node("north", "north-node-1");
    wc.put(west_cache_of_north.clone(), "{}", None)
        .await
        .expect("seed");
    let mut lc = local.client().await;
    // A stale entry from an earlier mirror: removed by the next one.
    lc.put(
        cache.node("west", "ghost"),
        mesh_kvstore::encode(&west_node(9)),
        None,
    )
    .await
    .expect("seed");

    let manifests = tempfile::tempdir().expect("tempdir");
    write_atomic(manifests.path(), "nodes.yaml", &nodes_yaml(&[N1]));
    let peers = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        peers.path().join("west"),
        format!("endpoints: [\"{}\"]\n", west.url()),
    )
    .expect("peer file");
    let peers_dir = peers.path().display().to_string();
    let _api = Apiserver::start_with(manifests.path(), &local, &["--kvstoremesh-config", &peers_dir]);

    let status = |v: Option<(Vec<u8>, i64)>| -> Option<mesh_kvstore::KvstoremeshStatus> {
        v.and_then(|(b, _)| serde_json::from_slice(&b).ok())
    };
    let node_1 = mesh_kvstore::encode(&west_node(1)).into_bytes();
    eventually("west mirrored", TIMEOUT, || {
        let mut lc = lc.clone();
        let (k1, ghost, st, cfg) = (
            cache.node("west", "west-node-1"),
            cache.node("west", "ghost"),
            cache.kvstoremesh_status(),
            cache.cluster_config("west"),
        );
        let node_1 = node_1.clone();
        let config = config.clone();
        async move {
            let n1 = get(&mut lc, &k1).await?;
            let ghost = get(&mut lc, &ghost).await?;
            let st = status(get(&mut lc, &st).await?);
            let cfg = get(&mut lc, &cfg).await?;
            if n1.map(|(v, _)| v) == Some(node_1)
                && ghost.is_none()
                && st.is_some_and(|s| s.connected)
                && cfg.map(|(v, _)| v) == Some(config.into_bytes())
            {
                Ok(())
            } else {
                Err("not mirrored yet".to_owned())
            }
        }
    })
    .await;

    let nested = cache.root() + west_cache_of_north.trim_start_matches(&peer_keys.root());
    assert_eq!(
        get(&mut lc, &nested).await.expect("get"),
        None,
        "west's cache of north was mirrored"
    );
    // Also not when it changes while the mirror follows west's watch.
    wc.put(west_cache_of_north.clone(), "{\"changed\": true}", None)
        .await
        .expect("put");
    // The status lives under the mirror's lease: a mirror that dies leaves no "connected" behind.
    let (_, lease) = get(&mut lc, &cache.kvstoremesh_status())
        .await
        .expect("get")
        .expect("status");
    assert_ne!(lease, 0, "the KVStoreMesh status has a lease");

    // Changes follow: a node added, then the first one deleted.
    wc.put(
        peer_keys.node("west", "west-node-2"),
        mesh_kvstore::encode(&west_node(2)),
        None,
    )
    .await
    .expect("put");
    wc.delete(peer_keys.node("west", "west-node-1"), None)
        .await
        .expect("delete");
    eventually("changes mirrored", TIMEOUT, || {
        let mut lc = lc.clone();
        let (k1, k2) = (
            cache.node("west", "west-node-1"),
            cache.node("west", "west-node-2"),
        );
        async move {
            match (get(&mut lc, &k1).await?, get(&mut lc, &k2).await?) {
                (None, Some(_)) => Ok(()),
                other => Err(format!(
                    "cache holds {:?}",
                    (other.0.is_some(), other.1.is_some())
                )),
            }
        }
    })
    .await;

    // Identities and ips are mirrored like every other kind.
    let ip = Ipv4Addr::new(10, 2, 1, 5);
    let identity = mesh_kvstore::encode(&mesh_kvstore::IdentityRecord {
        cluster: "west".into(),
        cluster_id: 2,
        identity: id(2, 256),
        labels: BTreeMap::from([(mesh_kvstore::LABEL_CLUSTER.to_owned(), "west".to_owned())]),
    });
    let ip_rec = mesh_kvstore::encode(&mesh_kvstore::IpRecord {
        ipv4: ip,
        cluster: "west".into(),
        identity: id(2, 256),
        namespace: "shop".into(),
        pod: "api".into(),
        node: "west-node-2".into(),
        named_ports: vec![],
    });
    for (k, v) in [
        (peer_keys.identity("west", 256), identity.clone()),
        (peer_keys.ip("west", ip), ip_rec.clone()),
        (
            peer_keys.synced("west", mesh_kvstore::kinds::IDENTITIES),
            "{\"timeMs\":1,\"count\":1}".to_owned(),
        ),
    ] {
        wc.put(k, v, None).await.expect("put");
    }
    eventually("identities and ips mirrored", TIMEOUT, || {
        let mut lc = lc.clone();
        let want = [
            (cache.identity("west", 256), identity.clone()),
            (cache.ip("west", ip), ip_rec.clone()),
            (
                cache.synced("west", mesh_kvstore::kinds::IDENTITIES),
                "{\"timeMs\":1,\"count\":1}".to_owned(),
            ),
        ];
        async move {
            for (k, v) in want {
                if get(&mut lc, &k).await?.map(|(b, _)| b) != Some(v.into_bytes()) {
                    return Err(format!("{k} not mirrored"));
                }
            }
            Ok(())
        }
    })
    .await;
    // The watch delivered the change of west's cache before these: still not mirrored.
    assert_eq!(
        get(&mut lc, &nested).await.expect("get"),
        None,
        "a change of west's cache was mirrored"
    );

    // The peer goes away: the status says so (with when it was last heard from); the cached data stays.
    let before = crate_now_ms();
    west.stop();
    eventually("loss reported", TIMEOUT, || {
        let mut lc = lc.clone();
        let st = cache.kvstoremesh_status();
        async move {
            match status(get(&mut lc, &st).await?) {
                Some(s) if !s.connected && !s.reason.is_empty() => Ok(s),
                other => Err(format!("status {other:?}")),
            }
        }
    })
    .await;
    let st = status(get(&mut lc, &cache.kvstoremesh_status()).await.expect("get")).expect("status");
    assert!(
        st.last_alive_ms <= crate_now_ms() && st.last_alive_ms + 5_000 >= before,
        "{st:?}"
    );
    assert!(
        get(&mut lc, &cache.node("west", "west-node-2"))
            .await
            .expect("get")
            .is_some(),
        "cached data stays while the peer is away"
    );
}

fn crate_now_ms() -> u64 {
    u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis(),
    )
    .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------------------------
// Identities
// ---------------------------------------------------------------------------------------------------------------

/// A pod of namespace shop on east-node-1: (name, labels as YAML flow mapping, IPv4).
fn pods_yaml(pods: &[(&str, &str, &str)]) -> String {
    let mut docs =
        vec!["apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {team: a}}\n".to_owned()];
    for (name, labels, ip) in pods {
        docs.push(format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop, labels: {labels}}}\n\
             spec:\n  nodeName: east-node-1\n  containers:\n    - name: c\n      ports: [{{containerPort: 8080, name: http}}, {{containerPort: 9090}}]\n\
             status: {{podIP: {ip}}}\n"
        ));
    }
    docs.join("---\n")
}

/// The published identities of `cluster`: number → app label (each record must decode).
async fn identities(client: &mut Client, cluster: &str) -> Result<BTreeMap<u32, String>, String> {
    let keys = Keys::default();
    let resp = client
        .get(
            keys.identities_prefix(cluster),
            Some(GetOptions::new().with_prefix()),
        )
        .await
        .map_err(|e| e.to_string())?;
    let mut out = BTreeMap::new();
    for kv in resp.kvs() {
        let key = kv.key_str().map_err(|e| e.to_string())?;
        let mesh_kvstore::KeyKind::Identity(number) = keys.classify(cluster, key) else {
            return Err(format!("unexpected key {key}"));
        };
        let rec = mesh_kvstore::decode_identity(key, cluster, number, kv.value())
            .map_err(|e| format!("published identity does not decode: {e}"))?;
        if kv.lease() == 0 {
            return Err(format!("{key} has no lease"));
        }
        if rec
            .labels
            .get("io.cilium.k8s.namespace.labels.team")
            .map(String::as_str)
            != Some("a")
        {
            return Err(format!("{key}: namespace labels missing: {:?}", rec.labels));
        }
        out.insert(rec.identity, rec.labels.get("app").cloned().unwrap_or_default());
    }
    Ok(out)
}

/// The published ip records of `cluster`: address → (identity, pod).
async fn ips(client: &mut Client, cluster: &str) -> Result<BTreeMap<Ipv4Addr, (u32, String)>, String> {
    let keys = Keys::default();
    let resp = client
        .get(keys.ips_prefix(cluster), Some(GetOptions::new().with_prefix()))
        .await
        .map_err(|e| e.to_string())?;
    let mut out = BTreeMap::new();
    for kv in resp.kvs() {
        let key = kv.key_str().map_err(|e| e.to_string())?;
        let mesh_kvstore::KeyKind::Ip(ip) = keys.classify(cluster, key) else {
            return Err(format!("unexpected key {key}"));
        };
        let rec = mesh_kvstore::decode_ip(key, cluster, ip, kv.value())
            .map_err(|e| format!("published ip record does not decode: {e}"))?;
        if rec.named_ports.len() != 1 || rec.named_ports[0].name != "http" || rec.node != "east-node-1" {
            return Err(format!("{key}: {rec:?}"));
        }
        out.insert(ip, (rec.identity, rec.pod));
    }
    Ok(out)
}

fn id(cluster_id: u16, number: u32) -> u32 {
    (u32::from(cluster_id) << 20) | number
}

/// `Ok` when `cluster` publishes exactly these identities (full identity → app) and addresses (last octet →
/// full identity) in 10.1.1.0/24.
async fn identities_are(
    mut c: Client,
    cluster: &'static str,
    want_ids: Vec<(u32, &'static str)>,
    want_ips: Vec<(u8, u32)>,
) -> Result<(), String> {
    let got = identities(&mut c, cluster).await?;
    let want: BTreeMap<u32, String> = want_ids.iter().map(|(i, a)| (*i, (*a).to_owned())).collect();
    if got != want {
        return Err(format!("identities {got:?}, want {want:?}"));
    }
    let got: BTreeMap<Ipv4Addr, u32> = ips(&mut c, cluster)
        .await?
        .into_iter()
        .map(|(ip, (identity, _))| (ip, identity))
        .collect();
    let want: BTreeMap<Ipv4Addr, u32> = want_ips
        .iter()
        .map(|(o, i)| (Ipv4Addr::new(10, 1, 1, *o), *i))
        .collect();
    if got != want {
        return Err(format!("ips {got:?}, want {want:?}"));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn identities_are_stable_across_restarts_follow_labels_and_are_collected_after_grace() {
    let etcd = Etcd::start().await;
    let c = etcd.client().await;
    let keys = Keys::default();
    let manifests = tempfile::tempdir().expect("tempdir");
    let dir = manifests.path();
    write_atomic(dir, "nodes.yaml", &nodes_yaml(&[N1]));
    write_atomic(
        dir,
        "pods.yaml",
        &pods_yaml(&[
            ("a", "{app: api, pod-template-hash: x1}", "10.1.1.5"),
            ("b", "{app: api, pod-template-hash: x2}", "10.1.1.6"),
            ("c", "{app: web}", "10.1.1.7"),
        ]),
    );
    let grace = ["--identity-gc-grace", "3s"];
    let mut api = Apiserver::start_with(dir, &etcd, &grace);
    let (api_id, web_id, db_id) = (id(1, 256), id(1, 257), id(1, 258));
    eventually("identities and ips published", TIMEOUT, || {
        identities_are(
            c.clone(),
            "east",
            vec![(api_id, "api"), (web_id, "web")],
            vec![(5, api_id), (6, api_id), (7, web_id)],
        )
    })
    .await;
    for (kind, count) in [
        (mesh_kvstore::kinds::IDENTITIES, 2),
        (mesh_kvstore::kinds::IPS, 3),
    ] {
        eventually(&format!("synced marker of {kind}"), TIMEOUT, || {
            let mut c = c.clone();
            let key = keys.synced("east", kind);
            async move {
                let (marker, _) = get(&mut c, &key).await?.ok_or("no marker")?;
                let marker = mesh_kvstore::decode_synced("synced", &marker).map_err(|e| e.to_string())?;
                if marker.count == count {
                    Ok(())
                } else {
                    Err(format!("marker counts {}", marker.count))
                }
            }
        })
        .await;
    }

    // Restart with pods in an order that a fresh allocator would number the other way round: the numbers stay.
    api.kill();
    write_atomic(
        dir,
        "pods.yaml",
        &pods_yaml(&[("c", "{app: web}", "10.1.1.7"), ("d", "{app: api}", "10.1.1.8")]),
    );
    let mut api = Apiserver::start_with(dir, &etcd, &grace);
    eventually("numbers kept across the restart", TIMEOUT, || {
        identities_are(
            c.clone(),
            "east",
            vec![(api_id, "api"), (web_id, "web")],
            vec![(7, web_id), (8, api_id)],
        )
    })
    .await;
    assert!(api.log().contains("identities read back"), "{}", api.log());

    // A new label set gets the next number; a pod whose labels change moves to that identity, and the identity it
    // left stays published for the grace period, then goes.
    write_atomic(
        dir,
        "pods.yaml",
        &pods_yaml(&[
            ("c", "{app: web}", "10.1.1.7"),
            ("d", "{app: api}", "10.1.1.8"),
            ("e", "{app: db}", "10.1.1.9"),
        ]),
    );
    eventually("new label set, new number", TIMEOUT, || {
        identities_are(
            c.clone(),
            "east",
            vec![(api_id, "api"), (web_id, "web"), (db_id, "db")],
            vec![(7, web_id), (8, api_id), (9, db_id)],
        )
    })
    .await;
    write_atomic(
        dir,
        "pods.yaml",
        &pods_yaml(&[
            ("c", "{app: db}", "10.1.1.7"),
            ("d", "{app: api}", "10.1.1.8"),
            ("e", "{app: db}", "10.1.1.9"),
        ]),
    );
    eventually("the pod moved to the db identity", TIMEOUT, || {
        identities_are(
            c.clone(),
            "east",
            vec![(api_id, "api"), (web_id, "web"), (db_id, "db")],
            vec![(7, db_id), (8, api_id), (9, db_id)],
        )
    })
    .await;
    let moved = Instant::now();
    // While it is held, the web number is not handed to a new label set.
    write_atomic(
        dir,
        "pods.yaml",
        &pods_yaml(&[
            ("c", "{app: db}", "10.1.1.7"),
            ("d", "{app: api}", "10.1.1.8"),
            ("e", "{app: db}", "10.1.1.9"),
            ("f", "{app: cache}", "10.1.1.10"),
        ]),
    );
    let cache_id = id(1, 259);
    eventually("another label set gets a fresh number", TIMEOUT, || {
        identities_are(
            c.clone(),
            "east",
            vec![
                (api_id, "api"),
                (web_id, "web"),
                (db_id, "db"),
                (cache_id, "cache"),
            ],
            vec![(7, db_id), (8, api_id), (9, db_id), (10, cache_id)],
        )
    })
    .await;
    eventually(
        "the unused web identity withdrawn after the grace period",
        TIMEOUT,
        || {
            identities_are(
                c.clone(),
                "east",
                vec![(api_id, "api"), (db_id, "db"), (cache_id, "cache")],
                vec![(7, db_id), (8, api_id), (9, db_id), (10, cache_id)],
            )
        },
    )
    .await;
    let after = moved.elapsed();
    assert!(
        after >= Duration::from_secs(2),
        "withdrawn after {after:?}, before the 3s grace period"
    );
    api.kill();
}

#[tokio::test(flavor = "multi_thread")]
async fn two_clusters_never_share_an_identity() {
    let etcd = Etcd::start().await;
    let c = etcd.client().await;
    let manifests = tempfile::tempdir().expect("tempdir");
    let dir = manifests.path();
    write_atomic(dir, "nodes.yaml", &nodes_yaml(&[N1]));
    write_atomic(
        dir,
        "pods.yaml",
        &pods_yaml(&[("a", "{app: api}", "10.1.1.5"), ("b", "{app: web}", "10.1.1.6")]),
    );
    // The edge ids: the lowest and the largest (whose identities use the top bits).
    let _east = Apiserver::start_as("east", 1, dir, &etcd, &[]);
    let _west = Apiserver::start_as("west", 4095, dir, &etcd, &[]);
    for (cluster, cid) in [("east", 1), ("west", 4095)] {
        eventually(&format!("{cluster}'s identities"), TIMEOUT, || {
            identities_are(
                c.clone(),
                cluster,
                vec![(id(cid, 256), "api"), (id(cid, 257), "web")],
                vec![(5, id(cid, 256)), (6, id(cid, 257))],
            )
        })
        .await;
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Capacities
// ---------------------------------------------------------------------------------------------------------------

/// Pods of namespace shop on east-node-1: (name, IPv4, capacity annotation).
fn capacity_pods_yaml(pods: &[(&str, &str, Option<&str>)]) -> String {
    pods.iter()
        .map(|(name, ip, capacity)| {
            let annotations = capacity.map_or(String::new(), |c| {
                format!(", annotations: {{fleetmesh.io/capacity: \"{c}\"}}")
            });
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop, labels: {{app: api}}{annotations}}}\n\
                 spec:\n  nodeName: east-node-1\n  containers:\n    - name: c\n      ports: [{{containerPort: 8080, name: http}}]\n\
                 status: {{podIP: {ip}}}\n"
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

/// `Ok` when east publishes ip records (in the ip/v1 form, which decoders refusing unknown fields accept) for
/// exactly the addresses `want_ips` (last octets) and capacity records (with the lease) for exactly `want` (last
/// octet → capacity).
async fn capacities_are(mut c: Client, want_ips: Vec<u8>, want: Vec<(u8, u32)>) -> Result<(), String> {
    let keys = Keys::default();
    let got_ips: Vec<u8> = ips(&mut c, "east")
        .await?
        .keys()
        .map(|ip| ip.octets()[3])
        .collect();
    if got_ips != want_ips {
        return Err(format!("ips {got_ips:?}, want {want_ips:?}"));
    }
    let resp = c
        .get(
            keys.capacities_prefix("east"),
            Some(GetOptions::new().with_prefix()),
        )
        .await
        .map_err(|e| e.to_string())?;
    let mut got = Vec::new();
    for kv in resp.kvs() {
        let key = kv.key_str().map_err(|e| e.to_string())?;
        let mesh_kvstore::KeyKind::Capacity(ip) = keys.classify("east", key) else {
            return Err(format!("unexpected key {key}"));
        };
        let rec = mesh_kvstore::decode_capacity(key, ip, kv.value())
            .map_err(|e| format!("published capacity record does not decode: {e}"))?;
        if kv.lease() == 0 {
            return Err(format!("{key} has no lease"));
        }
        got.push((ip.octets()[3], rec.capacity));
    }
    if got == want {
        Ok(())
    } else {
        Err(format!("capacities {got:?}, want {want:?}"))
    }
}

/// The apiserver sees every pod: a pod's capacity annotation other than 1 is published as a capacity record beside
/// its (unchanged) ip record, for the cluster's agents that see only their node's pods. Records follow the
/// annotations; an earlier run's record that is no longer desired is withdrawn.
#[tokio::test(flavor = "multi_thread")]
async fn publishes_the_capacity_of_pods_whose_capacity_is_not_one() {
    let etcd = Etcd::start().await;
    let mut c = etcd.client().await;
    let keys = Keys::default();
    let stale = keys.capacity("east", Ipv4Addr::new(10, 1, 1, 99));
    c.put(
        stale.as_str(),
        mesh_kvstore::encode(&mesh_kvstore::CapacityRecord {
            ipv4: Ipv4Addr::new(10, 1, 1, 99),
            capacity: 7,
        }),
        None,
    )
    .await
    .expect("seed");
    let manifests = tempfile::tempdir().expect("tempdir");
    let dir = manifests.path();
    write_atomic(dir, "nodes.yaml", &nodes_yaml(&[N1]));
    write_atomic(
        dir,
        "pods.yaml",
        &capacity_pods_yaml(&[
            ("a", "10.1.1.5", Some("4")),
            ("b", "10.1.1.6", None),
            ("c", "10.1.1.7", Some("1")),
        ]),
    );
    let api = Apiserver::start(dir, &etcd);
    eventually("capacity of a published, the stale one gone", TIMEOUT, || {
        capacities_are(c.clone(), vec![5, 6, 7], vec![(5, 4)])
    })
    .await;
    write_atomic(
        dir,
        "pods.yaml",
        &capacity_pods_yaml(&[
            ("a", "10.1.1.5", None),
            ("b", "10.1.1.6", Some("3")),
            ("c", "10.1.1.7", Some("1000")),
        ]),
    );
    eventually("capacities follow the annotations", TIMEOUT, || {
        capacities_are(c.clone(), vec![5, 6, 7], vec![(6, 3), (7, 1000)])
    })
    .await;
    write_atomic(
        dir,
        "pods.yaml",
        &capacity_pods_yaml(&[("a", "10.1.1.5", None), ("c", "10.1.1.7", Some("1000"))]),
    );
    eventually("a deleted pod's capacity withdrawn", TIMEOUT, || {
        capacities_are(c.clone(), vec![5, 7], vec![(7, 1000)])
    })
    .await;
    drop(api);
}

// ---------------------------------------------------------------------------------------------------------------
// Backend slices
// ---------------------------------------------------------------------------------------------------------------

/// Node east-node-1, a global service `shop/big` and pods `big-<i>` (10.1.1.<i + 2>) for each `i` of `pods`.
fn big_service_yaml(pods: impl IntoIterator<Item = u8>) -> String {
    let mut docs = vec![
        nodes_yaml(&[N1]),
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n".to_owned(),
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: big\n  namespace: shop\n  annotations: {service.cilium.io/global: \"true\"}\n\
         spec:\n  selector: {app: big}\n  ports: [{name: http, port: 80, targetPort: 8080, protocol: TCP}]\n"
            .to_owned(),
    ];
    for i in pods {
        docs.push(format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: big-{i}, namespace: shop, labels: {{app: big}}}}\n\
             spec:\n  nodeName: east-node-1\n  containers:\n    - name: c\n      ports: [{{containerPort: 8080}}]\n\
             status: {{podIP: 10.1.1.{}}}\n",
            u16::from(i) + 2
        ));
    }
    docs.join("---\n")
}

/// The service record's backends and each slice's (index → (addresses, mod revision)) of `shop/big`.
async fn big_service(
    client: &mut Client,
) -> Result<(Vec<Ipv4Addr>, i64, BTreeMap<u32, (Vec<Ipv4Addr>, i64)>), String> {
    let keys = Keys::default();
    let resp = client
        .get(keys.service("east", "shop", "big"), None)
        .await
        .map_err(|e| e.to_string())?;
    let kv = resp.kvs().first().ok_or("no service record")?;
    let record_rev = kv.mod_revision();
    let rec =
        mesh_kvstore::decode_service("k", "east", "shop", "big", kv.value()).map_err(|e| e.to_string())?;
    let resp = client
        .get(
            keys.backend_slices_prefix("east"),
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .map_err(|e| e.to_string())?;
    let mut slices = BTreeMap::new();
    for kv in resp.kvs() {
        let key = kv.key_str().map_err(|e| e.to_string())?;
        let index: u32 = key
            .rsplit('/')
            .next()
            .and_then(|n| n.parse().ok())
            .ok_or("slice index")?;
        let slice = mesh_kvstore::decode_backend_slice(key, "east", "shop", "big", index, kv.value())
            .map_err(|e| e.to_string())?;
        slices.insert(
            index,
            (slice.backends.iter().map(|b| b.ipv4).collect(), kv.mod_revision()),
        );
    }
    Ok((rec.backends.iter().map(|b| b.ipv4).collect(), record_rev, slices))
}

fn big_ips(pods: impl IntoIterator<Item = u8>) -> BTreeSet<Ipv4Addr> {
    pods.into_iter().map(|i| Ipv4Addr::new(10, 1, 1, i + 2)).collect()
}

/// A service of more than 100 backends is published as a record without backends plus slices of at most 100;
/// one backend's removal rewrites one slice and nothing else; shrunk to 100 or fewer it is one record again and
/// its slices are deleted.
#[tokio::test(flavor = "multi_thread")]
async fn large_services_are_published_in_bounded_slices() {
    let etcd = Etcd::start().await;
    let mut c = etcd.client().await;
    let manifests = tempfile::tempdir().expect("tempdir");
    let dir = manifests.path();
    write_atomic(dir, "all.yaml", &big_service_yaml(0..250));
    let _api = Apiserver::start(dir, &etcd);
    eventually("record plus three slices", TIMEOUT, || {
        let mut c = c.clone();
        async move {
            let (record, _, slices) = big_service(&mut c).await?;
            let union: BTreeSet<Ipv4Addr> =
                slices.values().flat_map(|(ips, _)| ips.iter().copied()).collect();
            if !record.is_empty() || slices.len() != 3 || union != big_ips(0..250) {
                return Err(format!(
                    "{} record backends, {} slices, {} in them",
                    record.len(),
                    slices.len(),
                    union.len()
                ));
            }
            if slices.values().any(|(ips, _)| ips.len() > 100) {
                return Err("a slice above 100".into());
            }
            Ok(())
        }
    })
    .await;
    let (_, record_rev, first) = big_service(&mut c).await.expect("read");

    // Pod 7 goes: its slice is rewritten, the record and the other slices are not.
    write_atomic(dir, "all.yaml", &big_service_yaml((0..250).filter(|i| *i != 7)));
    eventually("one slice rewritten", TIMEOUT, || {
        let mut c = c.clone();
        let first = first.clone();
        async move {
            let (record, rev, slices) = big_service(&mut c).await?;
            let union: BTreeSet<Ipv4Addr> =
                slices.values().flat_map(|(ips, _)| ips.iter().copied()).collect();
            if union != big_ips((0..250).filter(|i| *i != 7)) {
                return Err(format!("{} backends in the slices", union.len()));
            }
            let changed: Vec<u32> = slices
                .iter()
                .filter(|(i, (_, r))| first.get(*i).map(|(_, fr)| fr) != Some(r))
                .map(|(i, _)| *i)
                .collect();
            if changed.len() != 1 || rev != record_rev || !record.is_empty() || slices.len() != 3 {
                return Err(format!(
                    "changed slices {changed:?}, record rewritten: {}",
                    rev != record_rev
                ));
            }
            Ok(())
        }
    })
    .await;

    // 50 backends: one record again, no slices.
    write_atomic(dir, "all.yaml", &big_service_yaml(0..50));
    eventually("one record, slices deleted", TIMEOUT, || {
        let mut c = c.clone();
        async move {
            let (record, _, slices) = big_service(&mut c).await?;
            if record.iter().copied().collect::<BTreeSet<_>>() == big_ips(0..50) && slices.is_empty() {
                Ok(())
            } else {
                Err(format!(
                    "{} record backends, {} slices",
                    record.len(),
                    slices.len()
                ))
            }
        }
    })
    .await;
}

// ---------------------------------------------------------------------------------------------------------------
// Fleet hub
// ---------------------------------------------------------------------------------------------------------------

/// Identity number → app label of the identity records under `prefix` (a cluster's own layout below it).
async fn identity_apps(
    client: &mut Client,
    prefix: &str,
    cluster: &str,
) -> Result<BTreeMap<u32, String>, String> {
    let keys = Keys::new(prefix);
    let resp = client
        .get(
            keys.identities_prefix(cluster),
            Some(GetOptions::new().with_prefix()),
        )
        .await
        .map_err(|e| e.to_string())?;
    let mut out = BTreeMap::new();
    for kv in resp.kvs() {
        let key = kv.key_str().map_err(|e| e.to_string())?;
        let mesh_kvstore::KeyKind::Identity(number) = keys.classify(cluster, key) else {
            return Err(format!("unexpected key {key}"));
        };
        let rec =
            mesh_kvstore::decode_identity(key, cluster, number, kv.value()).map_err(|e| e.to_string())?;
        out.insert(rec.identity, rec.labels.get("app").cloned().unwrap_or_default());
    }
    Ok(out)
}

fn hub_config(dir: &Path, hub: &Etcd, prefix: &str) -> PathBuf {
    let file = dir.join("hub-config.yaml");
    std::fs::write(&file, format!("endpoints: [{}]\nprefix: {prefix}\n", hub.url()))
        .expect("write hub config");
    file
}

#[tokio::test(flavor = "multi_thread")]
async fn publishes_into_a_hub_under_its_prefix_with_the_same_identities() {
    let (own, hub) = (Etcd::start().await, Etcd::start().await);
    let (c, h) = (own.client().await, hub.client().await);
    let manifests = tempfile::tempdir().expect("tempdir");
    let dir = manifests.path();
    write_atomic(dir, "nodes.yaml", &nodes_yaml(&[N1]));
    write_atomic(
        dir,
        "pods.yaml",
        &pods_yaml(&[("a", "{app: api}", "10.1.1.5"), ("b", "{app: web}", "10.1.1.6")]),
    );
    let cfg = tempfile::tempdir().expect("tempdir");
    let file = hub_config(cfg.path(), &hub, "fleetmesh/clusters/east");
    let file = file.display().to_string();
    let _east = Apiserver::start_with(dir, &own, &["--hub-config", &file]);
    let want: BTreeMap<u32, String> = [(id(1, 256), "api".to_owned()), (id(1, 257), "web".to_owned())].into();
    for (client, prefix) in [(&c, "fleetmesh"), (&h, "fleetmesh/clusters/east")] {
        eventually(&format!("identities under {prefix}"), TIMEOUT, || {
            let (mut client, want) = (client.clone(), want.clone());
            async move {
                let got = identity_apps(&mut client, prefix, "east").await?;
                if got == want {
                    Ok(())
                } else {
                    Err(format!("{got:?}"))
                }
            }
        })
        .await;
    }
    // The hub holds the cluster's config, nodes and synced markers under the prefix, and nothing beside it.
    let hub_keys = Keys::new("fleetmesh/clusters/east");
    let mut hc = h.clone();
    for key in [
        hub_keys.cluster_config("east"),
        hub_keys.synced("east", "nodes"),
        hub_keys.node("east", "east-node-1"),
    ] {
        eventually(&format!("{key} in the hub"), TIMEOUT, || {
            let (mut hc, key) = (hc.clone(), key.clone());
            async move {
                get(&mut hc, &key)
                    .await?
                    .map(drop)
                    .ok_or_else(|| format!("{key} missing"))
            }
        })
        .await;
    }
    let all = hc
        .get(
            "fleetmesh/",
            Some(GetOptions::new().with_prefix().with_keys_only()),
        )
        .await
        .expect("list the hub");
    for kv in all.kvs() {
        let k = kv.key_str().expect("utf-8");
        assert!(k.starts_with("fleetmesh/clusters/east/"), "the hub holds {k}");
    }
}

/// A hub member that is down (here the first endpoint of the hub config: nothing listens there) costs one failed
/// session: the publisher talks to one member at a time and moves to the next, so its records and a steady
/// heartbeat (`--heartbeat-interval`) reach the hub through the others.
#[tokio::test(flavor = "multi_thread")]
async fn publishes_into_a_hub_with_a_member_down_and_keeps_its_heartbeat_fresh() {
    let (own, hub) = (Etcd::start().await, Etcd::start().await);
    let h = hub.client().await;
    let manifests = tempfile::tempdir().expect("tempdir");
    write_atomic(manifests.path(), "nodes.yaml", &nodes_yaml(&[N1]));
    let cfg = tempfile::tempdir().expect("tempdir");
    let file = cfg.path().join("hub-config.yaml");
    let dead = mesh_testkit::url(mesh_testkit::free_port());
    std::fs::write(
        &file,
        format!(
            "endpoints: [{dead}, {}]\nprefix: fleetmesh/clusters/east\n",
            hub.url()
        ),
    )
    .expect("write hub config");
    let file = file.display().to_string();
    let _east = Apiserver::start_with(
        manifests.path(),
        &own,
        &["--hub-config", &file, "--heartbeat-interval", "200ms"],
    );
    let keys = Keys::new("fleetmesh/clusters/east");
    let heartbeat_age = |h: &Client| {
        let (mut h, key) = (h.clone(), keys.heartbeat("east"));
        async move {
            let (v, _) = get(&mut h, &key).await?.ok_or("no heartbeat")?;
            let hb: mesh_kvstore::Heartbeat = serde_json::from_slice(&v).map_err(|e| e.to_string())?;
            Ok::<u64, String>(crate_now_ms().saturating_sub(hb.time_ms))
        }
    };
    eventually("east's node in the hub", TIMEOUT, || {
        let (mut h, key) = (h.clone(), keys.node("east", "east-node-1"));
        async move {
            get(&mut h, &key)
                .await?
                .map(drop)
                .ok_or_else(|| "missing".to_owned())
        }
    })
    .await;
    // Written every 200ms: never seconds old while the session lasts (sessions that keep failing would leave it so).
    stays("a fresh heartbeat in the hub", Duration::from_secs(3), || {
        let age = heartbeat_age(&h);
        async move {
            let age = age.await?;
            if age < 2_500 {
                Ok(())
            } else {
                Err(format!("the heartbeat is {age} ms old"))
            }
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hub_config_with_another_clusters_prefix_is_refused_at_start() {
    let (own, hub) = (Etcd::start().await, Etcd::start().await);
    let manifests = tempfile::tempdir().expect("tempdir");
    write_atomic(manifests.path(), "nodes.yaml", &nodes_yaml(&[N1]));
    let cfg = tempfile::tempdir().expect("tempdir");
    for (prefix, want) in [
        (
            "fleetmesh/clusters/west",
            "prefix must be \"fleetmesh/clusters/east\"",
        ),
        ("/bad", "is not a key prefix"),
    ] {
        let file = hub_config(cfg.path(), &hub, prefix).display().to_string();
        let mut east = Apiserver::start_with(manifests.path(), &own, &["--hub-config", &file]);
        let status = exit_status(&mut east, prefix).await;
        assert!(!status.success());
        let log = east.log();
        assert!(log.contains(want) && !log.contains("panicked"), "{prefix}: {log}");
    }
    let mut h = hub.client().await;
    let all = h
        .get(
            "fleetmesh/",
            Some(GetOptions::new().with_prefix().with_keys_only()),
        )
        .await
        .expect("list the hub");
    assert_eq!(all.kvs().len(), 0, "nothing was written into the hub");
}

/// Established TCP connections of process `pid` to `url`'s port on loopback (`ss`).
fn connections_to(pid: u32, url: &str) -> usize {
    let port = url.rsplit(':').next().unwrap_or_default().trim_end_matches('/');
    let out = std::process::Command::new("ss")
        .args(["-Htnp", "state", "established"])
        .output()
        .expect("ss");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&format!("pid={pid},")))
        .filter(|l| l.split_whitespace().nth(3) == Some(&format!("127.0.0.1:{port}")))
        .count()
}

/// The apiserver's exit status, waited for with a deadline (`what` names the case in the failure).
async fn exit_status(api: &mut Apiserver, what: &str) -> std::process::ExitStatus {
    let child = api.child.as_mut().expect("child");
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(s) = child.try_wait().expect("wait") {
            return s;
        }
        assert!(Instant::now() < deadline, "the apiserver did not stop on {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Seeds peer `name` (id `id`) into the hub below its own prefix, and writes its peer file into `dir` (`extra`:
/// more lines of the file).
async fn hub_peer(hc: &mut Client, hub: &Etcd, dir: &Path, (name, id): (&str, u16), extra: &str) {
    let keys = Keys::new(&Keys::default().hub_cluster_prefix(name));
    let config = mesh_kvstore::encode(&mesh_kvstore::ClusterConfig {
        name: name.into(),
        id,
        capabilities: vec![],
        labels: BTreeMap::new(),
    });
    hc.put(keys.cluster_config(name), config, None)
        .await
        .expect("seed");
    std::fs::write(
        dir.join(name),
        format!(
            "endpoints: [\"{}\"]\nprefix: {}\n{extra}",
            hub.url(),
            keys.prefix()
        ),
    )
    .expect("peer file");
}

/// Whether peer `name` is mirrored into the cluster's etcd.
async fn mirrored(lc: &mut Client, name: &str) -> Result<bool, String> {
    let cache = Keys::new(&Keys::default().kvstoremesh_prefix(name));
    Ok(get(lc, &cache.cluster_config(name)).await?.is_some())
}

/// KVStoreMesh reading its peers from a fleet hub: the mirrors of three peers, each below its own hub prefix,
/// share one client of the hub (one connection), and each peer is cached under its own name.
#[tokio::test(flavor = "multi_thread")]
async fn kvstoremesh_mirrors_many_peers_from_a_hub_over_one_connection() {
    let (hub, local) = (Etcd::start().await, Etcd::start().await);
    let mut hc = hub.client().await;
    let peers = tempfile::tempdir().expect("tempdir");
    let names = ["west", "north", "south"];
    for (i, name) in names.iter().enumerate() {
        let id = u16::try_from(i + 2).expect("id");
        hub_peer(&mut hc, &hub, peers.path(), (name, id), "").await;
    }
    let manifests = tempfile::tempdir().expect("tempdir");
    write_atomic(manifests.path(), "nodes.yaml", &nodes_yaml(&[N1]));
    let peers_dir = peers.path().display().to_string();
    let api = Apiserver::start_with(manifests.path(), &local, &["--kvstoremesh-config", &peers_dir]);
    let pid = api.child.as_ref().expect("child").id();
    let lc = local.client().await;
    eventually("every peer mirrored from the hub", TIMEOUT, || {
        let mut lc = lc.clone();
        async move {
            for name in names {
                if !mirrored(&mut lc, name).await? {
                    return Err(format!("{name} not mirrored"));
                }
            }
            Ok(())
        }
    })
    .await;
    let n = connections_to(pid, &hub.url());
    assert_eq!(n, 1, "the mirrors of 3 peers in one hub share one connection");
}

/// KVStoreMesh with a membership selector (`--kvstoremesh-peer-selector`): only the peers whose pinned labels it
/// selects are mirrored into the cluster's etcd; a selector file that does not parse stops the start, naming the
/// flag, before anything is mirrored.
#[tokio::test(flavor = "multi_thread")]
async fn kvstoremesh_mirrors_only_the_peers_its_selector_picks() {
    let (hub, local) = (Etcd::start().await, Etcd::start().await);
    let mut hc = hub.client().await;
    let peers = tempfile::tempdir().expect("tempdir");
    for (i, (name, region)) in [("west", "eu"), ("north", "eu"), ("south", "us")]
        .into_iter()
        .enumerate()
    {
        let id = u16::try_from(i + 2).expect("id");
        let labels = format!("cluster-labels: {{region: {region}}}\n");
        hub_peer(&mut hc, &hub, peers.path(), (name, id), &labels).await;
    }
    let manifests = tempfile::tempdir().expect("tempdir");
    write_atomic(manifests.path(), "nodes.yaml", &nodes_yaml(&[N1]));
    let sel_dir = tempfile::tempdir().expect("tempdir");
    let sel = sel_dir.path().join("selector.yaml");
    let (peers_dir, sel_file) = (peers.path().display().to_string(), sel.display().to_string());
    let args = [
        "--kvstoremesh-config",
        &peers_dir,
        "--kvstoremesh-peer-selector",
        &sel_file,
    ];
    let mut lc = local.client().await;
    std::fs::write(&sel, "matchLabels: [region, eu]\n").expect("selector");
    let mut bad = Apiserver::start_with(manifests.path(), &local, &args);
    assert!(!exit_status(&mut bad, "a bad selector").await.success());
    let log = bad.log();
    assert!(
        log.contains("--kvstoremesh-peer-selector") && !log.contains("panicked"),
        "{log}"
    );
    assert!(!mirrored(&mut lc, "west").await.expect("get"), "nothing mirrored");
    drop(bad);

    std::fs::write(&sel, "matchLabels: {region: eu}\n").expect("selector");
    let api = Apiserver::start_with(manifests.path(), &local, &args);
    eventually("the eu peers mirrored", TIMEOUT, || {
        let mut lc = lc.clone();
        async move {
            for name in ["west", "north"] {
                if !mirrored(&mut lc, name).await? {
                    return Err(format!("{name} not mirrored"));
                }
            }
            Ok(())
        }
    })
    .await;
    let log = api.log();
    assert!(log.contains("not mirrored") && log.contains("south"), "{log}");
    assert!(
        !mirrored(&mut lc, "south").await.expect("get"),
        "south is left out"
    );
}

/// The service record as agents before the backend slices read it (mesh-kvstore before `state/backends/v1`:
/// the same fields, unknown ones refused), kept here as that version's reader.
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[expect(dead_code, reason = "only decoding is checked")]
struct PreviousServiceRecord {
    cluster: String,
    cluster_id: u16,
    namespace: String,
    name: String,
    ports: Vec<serde_json::Value>,
    backends: Vec<PreviousBackend>,
    #[serde(default)]
    mcs: Option<serde_json::Value>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[expect(dead_code, reason = "only decoding is checked")]
struct PreviousBackend {
    ipv4: Ipv4Addr,
    ports: Vec<serde_json::Value>,
    #[serde(default)]
    weight: Option<u32>,
}

/// What an agent of the previous record format (no slices) reads of `shop/big`: its record's backends, and whether
/// any slice key exists that it would skip.
async fn as_previous_agent_reads(client: &mut Client) -> Result<(BTreeSet<Ipv4Addr>, usize), String> {
    let keys = Keys::default();
    let resp = client
        .get(keys.service("east", "shop", "big"), None)
        .await
        .map_err(|e| e.to_string())?;
    let kv = resp.kvs().first().ok_or("no service record")?;
    let rec: PreviousServiceRecord =
        serde_json::from_slice(kv.value()).map_err(|e| format!("previous reader: {e}"))?;
    let slices = client
        .get(
            keys.backend_slices_prefix("east"),
            Some(etcd_client::GetOptions::new().with_prefix().with_keys_only()),
        )
        .await
        .map_err(|e| e.to_string())?
        .kvs()
        .len();
    Ok((rec.backends.iter().map(|b| b.ipv4).collect(), slices))
}

/// An upgrade with agents of the previous record format still running (docs/kvstore-schema.md, "Upgrades"): with
/// `--service-slice-size 0` every service is one record they read whole (250 backends, no slice key); with the
/// default slicing a service of at most 100 backends is one record too. Only a larger service with slicing on is
/// one they read without backends (the docs say: upgrade agents first, or run with 0 until they are).
#[tokio::test(flavor = "multi_thread")]
async fn agents_of_the_previous_record_format_read_services_during_an_upgrade() {
    let etcd = Etcd::start().await;
    let mut c = etcd.client().await;
    let manifests = tempfile::tempdir().expect("tempdir");
    let dir = manifests.path();
    write_atomic(dir, "all.yaml", &big_service_yaml(0..250));
    let api = Apiserver::start_with(dir, &etcd, &["--service-slice-size", "0"]);
    eventually(
        "250 backends in one record the previous reader takes",
        TIMEOUT,
        || {
            let mut c = c.clone();
            async move {
                match as_previous_agent_reads(&mut c).await? {
                    (ips, 0) if ips == big_ips(0..250) => Ok(()),
                    (ips, n) => Err(format!("{} backends, {n} slice keys", ips.len())),
                }
            }
        },
    )
    .await;
    drop(api);

    // Slicing on (the default), 60 backends: one record, read whole by the previous reader.
    write_atomic(dir, "all.yaml", &big_service_yaml(0..60));
    let _api = Apiserver::start(dir, &etcd);
    eventually("60 backends in one record with slicing on", TIMEOUT, || {
        let mut c = c.clone();
        async move {
            match as_previous_agent_reads(&mut c).await? {
                (ips, 0) if ips == big_ips(0..60) => Ok(()),
                (ips, n) => Err(format!("{} backends, {n} slice keys", ips.len())),
            }
        }
    })
    .await;
    // And the current reader agrees.
    let (record, _, slices) = big_service(&mut c).await.expect("read");
    assert_eq!(record.len(), 60);
    assert!(slices.is_empty());
}
