//! The MCS API write-back of the real `clustermesh-apiserver` with `--source kubernetes`: ServiceExport conditions
//! (`Valid`, `Conflict`) and ServiceImports, against kmock's Kubernetes emulator over HTTP
//! (`mesh-k8s/tests/fixtures/kube_emulator.py`), with this cluster's etcd and a peer cluster's etcd (real etcd),
//! the peer read through `--mcs-peers`.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use mesh_testkit::{Etcd, KubeEmulator, eventually, log_tail, stays};
use serde_json::{Value, json};

const TIMEOUT: Duration = Duration::from_secs(20);
const MCS: &str = "/apis/multicluster.x-k8s.io/v1alpha1";

struct Apiserver {
    child: Child,
    log: std::path::PathBuf,
}

impl Drop for Apiserver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- clustermesh-apiserver log ---\n{}", log_tail(&self.log, 60));
        }
    }
}

fn start_apiserver(dir: &Path, kube_port: u16, etcd_url: &str, peers: &Path) -> Apiserver {
    let log = dir.join("apiserver.log");
    let child = Command::new(env!("CARGO_BIN_EXE_clustermesh-apiserver"))
        .args([
            "--cluster-name",
            "east",
            "--cluster-id",
            "1",
            "--source",
            "kubernetes",
        ])
        .args([
            "--etcd-endpoints",
            etcd_url,
            "--lease-ttl",
            "5s",
            "--log",
            "info,clustermesh_apiserver=debug",
        ])
        .args(["--mcs-resync", "200ms"])
        .arg("--mcs-peers")
        .arg(peers)
        .env("KUBECONFIG", mesh_testkit::kubeconfig(dir, &[("c", kube_port)]))
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("RUST_LOG")
        .env_remove("FLEETMESH_MANIFESTS")
        .env_remove("FLEETMESH_SOURCE")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("spawn clustermesh-apiserver");
    Apiserver { child, log }
}

fn create(kube: &mut KubeEmulator, path: &str, object: &Value) {
    kube.command(&json!({"op": "create", "path": path, "object": object}));
}

fn service(kube: &mut KubeEmulator, name: &str, ports: &Value, cluster_ip: &str) {
    create(
        kube,
        "/api/v1/namespaces/shop/services",
        &json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "shop"},
               "spec": {"clusterIP": cluster_ip, "ports": ports}}),
    );
}

fn export(kube: &mut KubeEmulator, name: &str, created: &str) {
    create(
        kube,
        &format!("{MCS}/namespaces/shop/serviceexports"),
        &json!({"apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceExport",
               "metadata": {"name": name, "namespace": "shop", "creationTimestamp": created}}),
    );
}

fn get(kube: &mut KubeEmulator, path: &str) -> Value {
    kube.command(&json!({"op": "get", "path": path}))["object"].clone()
}

/// (status, reason) of condition `t` of ServiceExport shop/`name`.
fn condition(kube: &mut KubeEmulator, name: &str, t: &str) -> Option<(String, String)> {
    let se = get(kube, &format!("{MCS}/namespaces/shop/serviceexports/{name}"));
    let c = se["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == t)?
        .clone();
    Some((c["status"].as_str()?.to_owned(), c["reason"].as_str()?.to_owned()))
}

fn imports(kube: &mut KubeEmulator) -> Vec<Value> {
    get(kube, &format!("{MCS}/namespaces/shop/serviceimports"))["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn import(kube: &mut KubeEmulator, name: &str) -> Option<Value> {
    imports(kube).into_iter().find(|i| i["metadata"]["name"] == name)
}

fn expect_condition(kube: &mut KubeEmulator, name: &str, t: &str, want: (&str, &str)) -> Result<(), String> {
    match condition(kube, name, t) {
        Some((s, r)) if (s.as_str(), r.as_str()) == want => Ok(()),
        other => Err(format!("{name} {t}: {other:?}")),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn export_conditions_and_imports() {
    let etcd = Etcd::start().await;
    let peer = Etcd::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let peers = dir.path().join("peers");
    std::fs::create_dir(&peers).expect("peers dir");
    std::fs::write(peers.join("west"), format!("endpoints: [\"{}\"]\n", peer.url())).expect("peer file");
    // The peer cluster west exports shop/api (older than east's, other port), shop/web (newer than east's, other
    // port) and shop/orders (only west), and elsewhere/thing (no such namespace in east).
    let mut pc = peer.client().await;
    for (ns, name, port, ms) in [
        ("shop", "api", 80, 1_700_000_000_000_u64),
        ("shop", "web", 9090, 1_900_000_000_000),
        ("shop", "orders", 7000, 1_700_000_000_000),
        ("elsewhere", "thing", 1, 1_700_000_000_000),
    ] {
        let rec = json!({"cluster": "west", "namespace": ns, "name": name, "exportedMs": ms, "headless": false,
                         "ports": [{"name": "http", "port": port, "protocol": "TCP"}]});
        pc.put(
            format!("fleetmesh/mcs/exports/v1/west/{ns}/{name}"),
            rec.to_string(),
            None,
        )
        .await
        .expect("put peer export");
    }

    let mut kube = KubeEmulator::start(&[]);
    let http = |port: u16| json!([{"name": "http", "port": port, "protocol": "TCP"}]);
    create(
        &mut kube,
        "/api/v1/namespaces",
        &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}}),
    );
    service(&mut kube, "cart", &http(80), "10.96.0.10");
    service(&mut kube, "api", &http(8080), "10.96.0.11");
    service(&mut kube, "web", &http(8000), "None");
    export(&mut kube, "cart", "2025-11-01T00:00:00Z");
    export(&mut kube, "api", "2025-11-01T00:00:00Z"); // newer than west's (2023)
    export(&mut kube, "web", "2025-11-01T00:00:00Z"); // older than west's (2030)
    export(&mut kube, "ghost", "2025-11-01T00:00:00Z"); // no Service
    create(
        &mut kube,
        "/api/v1/namespaces/shop/services",
        &json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "ext", "namespace": "shop"},
               "spec": {"type": "ExternalName", "externalName": "example.com"}}),
    );
    export(&mut kube, "ext", "2025-11-01T00:00:00Z"); // not exportable
    service(&mut kube, "legacy", &http(81), "10.96.0.12");
    export(&mut kube, "legacy", "2025-11-01T00:00:00Z"); // its ServiceImport is the user's
    create(
        &mut kube,
        &format!("{MCS}/namespaces/shop/serviceimports"),
        &json!({"apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceImport",
               "metadata": {"name": "legacy", "namespace": "shop", "labels": {"owner": "someone"}},
               "spec": {"type": "ClusterSetIP", "ports": [{"port": 2, "protocol": "UDP"}]}}),
    );
    // A ServiceImport a user made: never touched.
    create(
        &mut kube,
        &format!("{MCS}/namespaces/shop/serviceimports"),
        &json!({"apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceImport",
               "metadata": {"name": "manual", "namespace": "shop"},
               "spec": {"type": "ClusterSetIP", "ports": [{"port": 1, "protocol": "TCP"}]}}),
    );

    let _api = start_apiserver(dir.path(), kube.port, &etcd.url(), &peers);

    eventually("export conditions", TIMEOUT, || {
        let r = (|| {
            expect_condition(&mut kube, "cart", "Valid", ("True", "ServiceExported"))?;
            expect_condition(&mut kube, "cart", "Conflict", ("False", "NoConflicts"))?;
            expect_condition(&mut kube, "ghost", "Valid", ("False", "ServiceNotFound"))?;
            expect_condition(&mut kube, "ext", "Valid", ("False", "ServiceTypeNotSupported"))?;
            expect_condition(&mut kube, "legacy", "Valid", ("True", "ServiceExported"))?;
            if condition(&mut kube, "ghost", "Conflict").is_some() {
                return Err("an invalid export has a Conflict condition".into());
            }
            expect_condition(&mut kube, "api", "Conflict", ("True", "PortConflict"))?;
            expect_condition(&mut kube, "web", "Conflict", ("False", "NoConflicts"))
        })();
        async move { r }
    })
    .await;
    let se = get(&mut kube, &format!("{MCS}/namespaces/shop/serviceexports/api"));
    let c = se["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == "Conflict").cloned())
        .expect("Conflict");
    assert!(
        c["message"].as_str().is_some_and(|m| m.contains("cluster west")),
        "{c}"
    );
    assert_eq!(c["observedGeneration"], 1, "{c}");
    assert!(c["lastTransitionTime"].is_string(), "{c}");

    eventually("ServiceImports", TIMEOUT, || {
        let r = (|| {
            let want = [
                ("cart", "ClusterSetIP", 80, vec!["east"]),
                ("api", "ClusterSetIP", 80, vec!["east", "west"]),
                ("web", "Headless", 8000, vec!["east", "west"]),
                ("orders", "ClusterSetIP", 7000, vec!["west"]),
            ];
            for (name, t, port, clusters) in want {
                let si = import(&mut kube, name).ok_or(format!("no ServiceImport {name}"))?;
                let got = (
                    si["spec"]["type"].clone(),
                    si["spec"]["ports"].clone(),
                    si["status"]["clusters"].clone(),
                    si["metadata"]["labels"]["app.kubernetes.io/managed-by"].clone(),
                );
                let want = (
                    json!(t),
                    json!([{"name": "http", "port": port, "protocol": "TCP"}]),
                    json!(clusters.iter().map(|c| json!({"cluster": c})).collect::<Vec<_>>()),
                    json!("fleetmesh"),
                );
                if got != want {
                    return Err(format!("{name}: {got:?}"));
                }
            }
            if import(&mut kube, "ghost").is_some() {
                return Err("ServiceImport for an invalid export".into());
            }
            Ok(())
        })();
        async move { r }
    })
    .await;

    // ClusterSetIP imports carry one address of the clusterset range each, all different; headless ones none.
    let range: ipnet::Ipv4Net = "198.19.0.0/16".parse().unwrap();
    let ip_of = |kube: &mut KubeEmulator, name: &str| -> Option<std::net::Ipv4Addr> {
        let si = import(kube, name)?;
        let ips = si["spec"]["ips"].as_array()?;
        assert_eq!(ips.len(), 1, "{name}: {ips:?}");
        ips[0].as_str()?.parse().ok()
    };
    let mut ips = std::collections::BTreeMap::new();
    for name in ["cart", "api", "orders"] {
        let ip = ip_of(&mut kube, name).unwrap_or_else(|| panic!("{name} has no spec.ips"));
        assert!(range.contains(&ip), "{name}: {ip}");
        ips.insert(name, ip);
    }
    let distinct: std::collections::BTreeSet<_> = ips.values().collect();
    assert_eq!(distinct.len(), 3, "{ips:?}");
    assert!(
        import(&mut kube, "web").is_some_and(|w| w["spec"].get("ips").is_none()),
        "headless: no ips"
    );
    // The user's ServiceImport of an exported service gets none written either.
    assert!(import(&mut kube, "legacy").is_some_and(|w| w["spec"].get("ips").is_none()));

    // East's valid exports are published for the peers, with the ServiceExport's creation time.
    let mut c = etcd.client().await;
    eventually("east's export records", TIMEOUT, || {
        let mut c = c.clone();
        async move {
            let r = c
                .get("fleetmesh/mcs/exports/v1/east/shop/cart", None)
                .await
                .map_err(|e| e.to_string())?;
            let kv = r.kvs().first().ok_or("no record")?;
            let v: Value = serde_json::from_slice(kv.value()).map_err(|e| e.to_string())?;
            if v["exportedMs"] == 1_761_955_200_000_u64 && v["ports"][0]["port"] == 80 {
                Ok(())
            } else {
                Err(format!("{v}"))
            }
        }
    })
    .await;
    assert!(
        c.get("fleetmesh/mcs/exports/v1/east/shop/ghost", None)
            .await
            .expect("get")
            .kvs()
            .is_empty()
    );

    // The export goes: its import goes (nobody else exports cart); the user's import stays as it was.
    kube.command(&json!({"op": "delete", "path": format!("{MCS}/namespaces/shop/serviceexports/cart")}));
    eventually("cart's ServiceImport deleted", TIMEOUT, || {
        let r = match import(&mut kube, "cart") {
            None => Ok(()),
            Some(si) => Err(format!("still there: {si}")),
        };
        async move { r }
    })
    .await;
    // api stays imported from west alone; the peer withdraws orders: its import goes.
    pc.delete("fleetmesh/mcs/exports/v1/west/shop/orders", None)
        .await
        .expect("delete");
    eventually("orders' ServiceImport deleted", TIMEOUT, || {
        let r = match import(&mut kube, "orders") {
            None => Ok(()),
            Some(si) => Err(format!("still there: {si}")),
        };
        async move { r }
    })
    .await;
    let manual = import(&mut kube, "manual").expect("the user's ServiceImport");
    assert_eq!(manual["spec"]["ports"], json!([{"port": 1, "protocol": "TCP"}]));
    assert!(manual["status"].is_null(), "{manual}");
    let legacy = import(&mut kube, "legacy").expect("the user's ServiceImport of an exported service");
    assert_eq!(legacy["spec"]["ports"], json!([{"port": 2, "protocol": "UDP"}]));
    assert!(legacy["status"].is_null(), "{legacy}");
    assert!(import(&mut kube, "ext").is_none());
    assert!(import(&mut kube, "api").is_some());
    // Passes after imports came and went (each reads the addresses back from the ServiceImports): api keeps its own.
    assert_eq!(
        ip_of(&mut kube, "api"),
        Some(ips["api"]),
        "api keeps its ClusterSetIP"
    );

    // Nothing changes: no further patches of the ServiceExports' status.
    let count = |kube: &mut KubeEmulator| {
        kube.command(&json!({"op": "requests"}))["requests"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| {
                r["method"] == "PATCH" && r["path"].as_str().is_some_and(|p| p.contains("serviceexports"))
            })
            .count()
    };
    let before = count(&mut kube);
    let kube = std::sync::Mutex::new(kube);
    stays("no status patch without a change", Duration::from_secs(1), || {
        let now = count(&mut kube.lock().expect("lock"));
        async move {
            if now == before {
                Ok(())
            } else {
                Err(format!("{} more patches", now - before))
            }
        }
    })
    .await;
}

/// Peers connected and disconnected while the apiserver runs (`meshctl clustermesh connect` writes a peer file into
/// the mounted Secret): their exports start and stop counting without a restart.
#[tokio::test(flavor = "multi_thread")]
async fn peers_added_and_removed_at_run_time_are_followed() {
    let etcd = Etcd::start().await;
    let peer = Etcd::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let peers = dir.path().join("peers");
    std::fs::create_dir(&peers).expect("peers dir");
    let mut pc = peer.client().await;
    let rec = json!({"cluster": "west", "namespace": "shop", "name": "orders", "exportedMs": 1_700_000_000_000_u64,
                     "headless": false, "ports": [{"name": "http", "port": 7000, "protocol": "TCP"}]});
    pc.put("fleetmesh/mcs/exports/v1/west/shop/orders", rec.to_string(), None)
        .await
        .expect("put peer export");
    let mut kube = KubeEmulator::start(&[]);
    create(
        &mut kube,
        "/api/v1/namespaces",
        &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}}),
    );
    service(
        &mut kube,
        "cart",
        &json!([{"name": "http", "port": 80, "protocol": "TCP"}]),
        "10.96.0.10",
    );
    export(&mut kube, "cart", "2025-11-01T00:00:00Z");
    let _api = start_apiserver(dir.path(), kube.port, &etcd.url(), &peers);
    eventually("cart imported (east alone)", TIMEOUT, || {
        let r = import(&mut kube, "cart")
            .map(|_| ())
            .ok_or_else(|| "no ServiceImport cart".to_owned());
        async move { r }
    })
    .await;
    assert!(import(&mut kube, "orders").is_none(), "no peer yet");

    // Connected: west's export is imported.
    std::fs::write(peers.join("west"), format!("endpoints: [\"{}\"]\n", peer.url())).expect("peer file");
    eventually("orders imported from the new peer", TIMEOUT, || {
        let r = import(&mut kube, "orders")
            .filter(|si| si["status"]["clusters"] == json!([{"cluster": "west"}]))
            .map(|_| ())
            .ok_or_else(|| "no ServiceImport orders from west".to_owned());
        async move { r }
    })
    .await;

    // A broken file for a while: the peer keeps its reader and its last exports.
    std::fs::write(peers.join("west"), "endpoints: [oops\n").expect("broken peer file");
    stays(
        "orders stays imported while west's file is broken",
        Duration::from_secs(1),
        || {
            let r = import(&mut kube, "orders")
                .map(|_| ())
                .ok_or_else(|| "orders' import went away".to_owned());
            async move { r }
        },
    )
    .await;

    // Disconnected: its exports stop counting, its import goes; east's own stays.
    std::fs::remove_file(peers.join("west")).expect("remove peer file");
    eventually("orders' import removed with its peer", TIMEOUT, || {
        let r = match import(&mut kube, "orders") {
            None => Ok(()),
            Some(si) => Err(format!("still there: {si}")),
        };
        async move { r }
    })
    .await;
    assert!(import(&mut kube, "cart").is_some());
}

const SLICES: &str = "/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices";

/// A peer's service record of headless shop/db with backends `ips` (10.x.0.`last`, port 5432) and `hostnames`.
fn db_record(cluster: &str, id: u16, ips: &[[u8; 4]], hostnames: &[([u8; 4], &str)]) -> String {
    let ip = |a: &[u8; 4]| std::net::Ipv4Addr::from(*a).to_string();
    json!({
        "cluster": cluster, "clusterId": id, "namespace": "shop", "name": "db",
        "ports": [{"name": "sql", "port": 5432, "protocol": "TCP"}],
        "backends": ips.iter().map(|a| json!({"ipv4": ip(a), "ports": [{"name": "sql", "port": 5432, "protocol": "TCP"}], "weight": 1})).collect::<Vec<_>>(),
        "mcs": {"headless": true, "hostnames": hostnames.iter().map(|(a, h)| (ip(a), json!(h))).collect::<serde_json::Map<_, _>>()},
    })
    .to_string()
}

fn db_export(cluster: &str) -> String {
    json!({"cluster": cluster, "namespace": "shop", "name": "db", "exportedMs": 1_700_000_000_000_u64,
           "headless": true, "ports": [{"name": "sql", "port": 5432, "protocol": "TCP"}]})
    .to_string()
}

/// Every EndpointSlice of namespace shop, by name.
fn slices(kube: &mut KubeEmulator) -> std::collections::BTreeMap<String, Value> {
    get(kube, SLICES)["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| Some((s["metadata"]["name"].as_str()?.to_owned(), s.clone())))
        .collect()
}

/// (address, hostname) of every endpoint of a slice.
fn endpoints_of(slice: &Value) -> Vec<(String, Option<String>)> {
    slice["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            (
                e["addresses"][0].as_str().unwrap_or_default().to_owned(),
                e["hostname"].as_str().map(str::to_owned),
            )
        })
        .collect()
}

fn slice_writes(kube: &mut KubeEmulator) -> usize {
    kube.command(&json!({"op": "requests"}))["requests"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["method"] != "GET" && r["path"].as_str().is_some_and(|p| p.contains("endpointslices")))
        .count()
}

/// Headless imports with `--source kubernetes`: each exporting peer's ready backends become EndpointSlices of the
/// importing cluster, labelled per the MCS API, rewritten only on change, bounded, deleted with the export; slices
/// fleetmesh does not manage are left alone and refused peer records keep the slices as they were.
#[tokio::test(flavor = "multi_thread")]
async fn headless_imports_become_endpoint_slices() {
    let etcd = Etcd::start().await;
    let west = Etcd::start().await;
    let south = Etcd::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let peers = dir.path().join("peers");
    std::fs::create_dir(&peers).expect("peers dir");
    std::fs::write(peers.join("west"), format!("endpoints: [\"{}\"]\n", west.url())).expect("peer file");
    std::fs::write(peers.join("south"), format!("endpoints: [\"{}\"]\n", south.url())).expect("peer file");
    let mut wc = west.client().await;
    let mut sc = south.client().await;
    let west_key = "fleetmesh/state/services/v1/west/shop/db";
    wc.put("fleetmesh/mcs/exports/v1/west/shop/db", db_export("west"), None)
        .await
        .expect("put");
    wc.put(
        west_key,
        db_record(
            "west",
            2,
            &[[10, 2, 0, 4], [10, 2, 0, 5]],
            &[([10, 2, 0, 4], "db-0")],
        ),
        None,
    )
    .await
    .expect("put");
    sc.put("fleetmesh/mcs/exports/v1/south/shop/db", db_export("south"), None)
        .await
        .expect("put");
    sc.put(
        "fleetmesh/state/services/v1/south/shop/db",
        db_record("south", 3, &[[10, 3, 0, 7]], &[]),
        None,
    )
    .await
    .expect("put");

    let mut kube = KubeEmulator::start(&[]);
    create(
        &mut kube,
        "/api/v1/namespaces",
        &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}}),
    );
    // Someone else's slice for the same service: never touched.
    let user_slice = json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "db-mine", "namespace": "shop",
                     "labels": {"multicluster.kubernetes.io/service-name": "db",
                                "multicluster.kubernetes.io/source-cluster": "west",
                                "endpointslice.kubernetes.io/managed-by": "someone-else"}},
        "addressType": "IPv4", "endpoints": [{"addresses": ["10.9.9.9"]}], "ports": []});
    create(&mut kube, SLICES, &user_slice);
    let _api = start_apiserver(dir.path(), kube.port, &etcd.url(), &peers);

    let labels = |cluster: &str| {
        json!({"multicluster.kubernetes.io/service-name": "db",
               "multicluster.kubernetes.io/source-cluster": cluster,
               "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.fleetmesh.io"})
    };
    let want_west = |kube: &mut KubeEmulator, eps: Vec<(String, Option<String>)>| -> Result<(), String> {
        let s = slices(kube);
        let w = s.get("db.west.0").ok_or("no db.west.0")?;
        if w["metadata"]["labels"] != labels("west") {
            return Err(format!("labels: {}", w["metadata"]["labels"]));
        }
        if w["addressType"] != "IPv4"
            || w["ports"] != json!([{"name": "sql", "port": 5432, "protocol": "TCP"}])
        {
            return Err(format!("{w}"));
        }
        let got = endpoints_of(w);
        if got == eps {
            Ok(())
        } else {
            Err(format!("west endpoints {got:?}"))
        }
    };
    let ep = |ip: &str, h: Option<&str>| (ip.to_owned(), h.map(str::to_owned));
    eventually("a slice per exporting cluster", TIMEOUT, || {
        let r = (|| {
            want_west(
                &mut kube,
                vec![ep("10.2.0.4", Some("db-0")), ep("10.2.0.5", None)],
            )?;
            let s = slices(&mut kube);
            let so = s.get("db.south.0").ok_or("no db.south.0")?;
            if so["metadata"]["labels"] != labels("south") || endpoints_of(so) != vec![ep("10.3.0.7", None)] {
                return Err(format!("south: {so}"));
            }
            if import(&mut kube, "db").is_none_or(|i| i["spec"]["type"] != "Headless") {
                return Err("no headless ServiceImport db".into());
            }
            Ok(())
        })();
        async move { r }
    })
    .await;
    assert!(
        slices(&mut kube)["db.west.0"]["metadata"]["labels"]
            .get("kubernetes.io/service-name")
            .is_none(),
        "no derived Service to name"
    );

    // Nothing changes: nothing written.
    let before = slice_writes(&mut kube);
    let shared = std::sync::Mutex::new(kube);
    stays("no slice writes without a change", Duration::from_secs(1), || {
        let now = slice_writes(&mut shared.lock().expect("lock"));
        async move {
            if now == before {
                Ok(())
            } else {
                Err(format!("{} more writes", now - before))
            }
        }
    })
    .await;
    let mut kube = shared.into_inner().expect("lock");

    // A backend changes in west: its slice follows.
    wc.put(
        west_key,
        db_record(
            "west",
            2,
            &[[10, 2, 0, 4], [10, 2, 0, 6]],
            &[([10, 2, 0, 4], "db-0")],
        ),
        None,
    )
    .await
    .expect("put");
    eventually("west's slice updated", TIMEOUT, || {
        let r = want_west(
            &mut kube,
            vec![ep("10.2.0.4", Some("db-0")), ep("10.2.0.6", None)],
        );
        async move { r }
    })
    .await;

    // 150 backends: two slices of at most 100; back to one backend: the second goes.
    let many: Vec<[u8; 4]> = (1..=150).map(|i| [10, 2, 1, i]).collect();
    wc.put(west_key, db_record("west", 2, &many, &[]), None)
        .await
        .expect("put");
    eventually("west's backends in two slices", TIMEOUT, || {
        let s = slices(&mut kube);
        let sizes = (
            s.get("db.west.0").map(|s| endpoints_of(s).len()),
            s.get("db.west.1").map(|s| endpoints_of(s).len()),
        );
        let r = if sizes == (Some(100), Some(50)) {
            Ok(())
        } else {
            Err(format!("{sizes:?}"))
        };
        async move { r }
    })
    .await;
    wc.put(west_key, db_record("west", 2, &[[10, 2, 0, 4]], &[]), None)
        .await
        .expect("put");
    eventually("west's second slice deleted", TIMEOUT, || {
        let r = (|| {
            want_west(&mut kube, vec![ep("10.2.0.4", None)])?;
            match slices(&mut kube).get("db.west.1") {
                None => Ok(()),
                Some(s) => Err(format!("still there: {s}")),
            }
        })();
        async move { r }
    })
    .await;

    // Bad input from west (a hostname that is not a DNS label; then not JSON): refused, its slice stays as it was.
    for bad in [
        db_record("west", 2, &[[10, 2, 0, 8]], &[([10, 2, 0, 8], "Not_A_Label")]),
        "{not json".to_owned(),
    ] {
        wc.put(west_key, bad, None).await.expect("put");
        let shared = std::sync::Mutex::new(kube);
        stays(
            "west's slice kept after a refused record",
            Duration::from_secs(1),
            || {
                let r = want_west(&mut shared.lock().expect("lock"), vec![ep("10.2.0.4", None)]);
                async move { r }
            },
        )
        .await;
        kube = shared.into_inner().expect("lock");
    }
    let log = std::fs::read_to_string(&_api.log).unwrap_or_default();
    assert!(
        log.contains("refused the peer's service record") && log.contains("not a DNS label"),
        "the refusal is logged with its reason"
    );

    // South withdraws its export: its slice goes; west's and the user's stay.
    sc.delete("fleetmesh/mcs/exports/v1/south/shop/db", None)
        .await
        .expect("delete");
    eventually("south's slice deleted", TIMEOUT, || {
        let r = match slices(&mut kube).get("db.south.0") {
            None => Ok(()),
            Some(s) => Err(format!("still there: {s}")),
        };
        async move { r }
    })
    .await;
    let s = slices(&mut kube);
    assert!(s.contains_key("db.west.0"));
    let mine = s.get("db-mine").expect("the user's slice stays");
    assert_eq!(mine["endpoints"], user_slice["endpoints"]);
    assert_eq!(mine["metadata"]["labels"], user_slice["metadata"]["labels"]);

    // West withdraws too: no cluster exports db, every slice of ours goes, the user's stays.
    wc.delete("fleetmesh/mcs/exports/v1/west/shop/db", None)
        .await
        .expect("delete");
    eventually("every slice of ours deleted", TIMEOUT, || {
        let names: Vec<String> = slices(&mut kube).into_keys().collect();
        let r = if names == ["db-mine"] {
            Ok(())
        } else {
            Err(format!("{names:?}"))
        };
        async move { r }
    })
    .await;
    let writes = kube.command(&json!({"op": "requests"}))["requests"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["method"] != "GET" && r["path"].as_str().is_some_and(|p| p.ends_with("/db-mine")))
        .count();
    assert_eq!(writes, 0, "the user's slice was never written");
}

/// `spec.ips` of the ServiceImports: an address a ServiceImport of ours already holds is kept (what a restarted
/// apiserver reads back), also when the allocator would choose another one; the import gone, the address is
/// released, and the service exported again gets the allocator's choice.
#[tokio::test(flavor = "multi_thread")]
async fn cluster_set_ips_are_read_back_kept_and_released() {
    let etcd = Etcd::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let peers = dir.path().join("peers");
    std::fs::create_dir(&peers).expect("peers dir");
    let mut kube = KubeEmulator::start(&[]);
    create(
        &mut kube,
        "/api/v1/namespaces",
        &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}}),
    );
    let http = json!([{"name": "http", "port": 80, "protocol": "TCP"}]);
    service(&mut kube, "cart", &http, "10.96.0.10");
    service(&mut kube, "pay", &http, "10.96.0.11");
    export(&mut kube, "cart", "2025-11-01T00:00:00Z");
    export(&mut kube, "pay", "2025-11-01T00:00:00Z");
    // An earlier run's ServiceImport of cart, holding an address the allocator would not choose first.
    let held = "198.19.77.77";
    create(
        &mut kube,
        &format!("{MCS}/namespaces/shop/serviceimports"),
        &json!({"apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceImport",
               "metadata": {"name": "cart", "namespace": "shop", "labels": {"app.kubernetes.io/managed-by": "fleetmesh"}},
               "spec": {"type": "ClusterSetIP", "ips": [held],
                        "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}}),
    );
    let ips = |kube: &mut KubeEmulator, name: &str| import(kube, name).map(|i| i["spec"]["ips"].clone());
    let fresh = {
        let _api = start_apiserver(dir.path(), kube.port, &etcd.url(), &peers);
        eventually("pay gets an address, cart keeps its own", TIMEOUT, || {
            let r = match (ips(&mut kube, "cart"), ips(&mut kube, "pay")) {
                (Some(c), Some(p)) if c == json!([held]) && p.as_array().is_some_and(|a| a.len() == 1) => {
                    Ok(p)
                }
                other => Err(format!("{other:?}")),
            };
            async move { r }
        })
        .await
    };
    // A restart: both keep theirs.
    let _api = start_apiserver(dir.path(), kube.port, &etcd.url(), &peers);
    let shared = std::sync::Mutex::new(kube);
    stays("addresses kept across a restart", Duration::from_secs(1), || {
        let mut k = shared.lock().expect("lock");
        let r = match (ips(&mut k, "cart"), ips(&mut k, "pay")) {
            (Some(c), Some(p)) if c == json!([held]) && p == fresh => Ok(()),
            other => Err(format!("{other:?}")),
        };
        async move { r }
    })
    .await;
    let mut kube = shared.into_inner().expect("lock");
    // cart's export goes: its ServiceImport and address go.
    kube.command(&json!({"op": "delete", "path": format!("{MCS}/namespaces/shop/serviceexports/cart")}));
    eventually("cart's ServiceImport deleted", TIMEOUT, || {
        let r = match import(&mut kube, "cart") {
            None => Ok(()),
            Some(si) => Err(format!("still there: {si}")),
        };
        async move { r }
    })
    .await;
    // Exported again: the allocator's choice (the hash of shop/cart), not the released address.
    export(&mut kube, "cart", "2025-11-02T00:00:00Z");
    let want = mesh_model::clusterset::allocate(
        "198.19.0.0/16".parse().expect("range"),
        &[
            ("shop".to_owned(), "cart".to_owned()),
            ("shop".to_owned(), "pay".to_owned()),
        ]
        .into_iter()
        .collect(),
        &[(
            ("shop".to_owned(), "pay".to_owned()),
            fresh[0]
                .as_str()
                .and_then(|s| s.parse().ok())
                .expect("pay's address"),
        )]
        .into_iter()
        .collect(),
    )
    .expect("the range has room");
    let want_cart = want
        .get(&("shop".to_owned(), "cart".to_owned()))
        .expect("an address")
        .to_string();
    assert_ne!(want_cart, held);
    eventually(
        "cart imported again with the allocator's address",
        TIMEOUT,
        || {
            let r = match ips(&mut kube, "cart") {
                Some(c) if c == json!([want_cart]) => Ok(()),
                other => Err(format!("{other:?}")),
            };
            async move { r }
        },
    )
    .await;
    assert_eq!(ips(&mut kube, "pay"), Some(fresh), "pay keeps its address");
}
