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
