//! Fault rehearsals on the lab: peers' etcd and apiservers restarted or killed, a cluster cut off the underlay and
//! restored, an agent killed under traffic while a backend is deleted. Each checks the end state and that
//! unrelated traffic kept flowing.

use std::time::{Duration, Instant};

use std::net::TcpStream;

use fleetmesh_tests::{
    Lab, PodInfo, Traffic, agent_socket, agent_status, bin, cluster_ip, eventually, example, in_netns,
    node_status, pod, pods, stream_ask, tcp_connect, tcp_line, write_manifest,
};
use mesh_testkit::KubeEmulator;
use serde_json::{Value, json};

fn remote_state(status: &Value, node: &str, remote: &str) -> String {
    node_status(status, node)
        .and_then(|st| {
            st["remoteClusters"]
                .as_array()?
                .iter()
                .find(|r| r["name"] == remote)
                .and_then(|r| r["state"]["state"].as_str().map(str::to_owned))
        })
        .unwrap_or_default()
}

fn all_nodes(status: &Value) -> Vec<String> {
    status["clusters"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|c| c["nodes"].as_array().into_iter().flatten())
        .filter_map(|n| n["name"].as_str().map(str::to_owned))
        .collect()
}

fn every_agent_synced_with(status: &Value, remote: &str) -> bool {
    all_nodes(status)
        .iter()
        .filter(|n| !n.starts_with(&format!("{remote}-")))
        .all(|n| remote_state(status, n, remote) == "synced")
}

/// Unrelated traffic: east and north talk to each other, pod to pod, while west suffers.
fn unrelated(all: &[PodInfo]) -> Vec<(String, String, String)> {
    let e = pod(all, "east/demo/client");
    let n = pod(all, "north/demo/client");
    let (ea, nb) = (pod(all, "east/demo/echo-b"), pod(all, "north/demo/echo-b"));
    vec![
        (e.netns.clone(), nb.ip.clone(), nb.id.clone()),
        (n.netns.clone(), ea.ip.clone(), ea.id.clone()),
    ]
}

#[test]
fn peer_etcd_and_apiserver_restarts_keep_unrelated_traffic_flowing() {
    let lab = Lab::up(&example("three-clusters"), "faults-etcd").expect("lab up");
    let status = lab.status().expect("status");
    let all = pods(&status);
    let traffic = Traffic::start(unrelated(&all));

    // etcd of west: graceful restart, then SIGKILL and start.
    for kill in [false, true] {
        let mut args = vec!["restart", "etcd", "west"];
        if kill {
            args.push("--kill");
        }
        lab.run(&args).expect("restart etcd");
        assert!(
            eventually(Duration::from_secs(20), || every_agent_synced_with(
                &status, "west"
            )),
            "every agent syncs with west again after its etcd restarted (kill={kill})"
        );
    }
    // west's apiserver killed: its records stay (lease), the restarted apiserver takes over without a flush.
    lab.run(&["restart", "apiserver", "west", "--kill"])
        .expect("restart apiserver");
    assert!(eventually(Duration::from_secs(20), || every_agent_synced_with(
        &status, "west"
    )));
    let west_pod = pod(&all, "west/demo/echo-a");
    assert_eq!(
        tcp_line(&pod(&all, "east/demo/client").netns, &west_pod.ip, 8080).expect("east -> west"),
        west_pod.id
    );

    // (Malformed values in a peer's etcd are covered against real etcd in mesh-agent/tests/remote.rs.)

    traffic.assert_flowed(20);
}

/// One lab cluster as `meshctl status --context` sees it: a kmock API server with the chart's ConfigMap and agent
/// DaemonSet (status port 9968), one agent pod per node, and the pod proxy of each pod reaching that node's real
/// agent (its API socket).
struct KubeView {
    _emu: KubeEmulator,
    dir: tempfile::TempDir,
    context: String,
}

impl KubeView {
    fn of(status: &Value, cluster: &str) -> Self {
        const NS: &str = "kube-system";
        let c = status["clusters"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["name"] == cluster)
            .unwrap_or_else(|| panic!("no cluster {cluster}"));
        let nodes: Vec<&Value> = c["nodes"].as_array().expect("nodes").iter().collect();
        let n = i32::try_from(nodes.len()).expect("node count");
        let mut emu = KubeEmulator::start(&[]);
        let create = |emu: &mut KubeEmulator, path: String, object: Value| {
            emu.command(&json!({"op": "create", "path": path, "object": object}));
        };
        create(
            &mut emu,
            format!("/api/v1/namespaces/{NS}/configmaps"),
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "fleetmesh-config", "namespace": NS},
                   "data": {"cluster-name": cluster, "cluster-id": c["id"].to_string()}}),
        );
        let labels = json!({"app.kubernetes.io/name": "fleetmesh-agent"});
        create(
            &mut emu,
            format!("/apis/apps/v1/namespaces/{NS}/daemonsets"),
            json!({"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "fleetmesh-agent", "namespace": NS},
                   "spec": {"selector": {"matchLabels": labels}, "template": {"metadata": {"labels": labels}, "spec": {
                       "containers": [{"name": "mesh-agent", "ports": [{"name": "status", "containerPort": 9968}]}]}}},
                   "status": {"desiredNumberScheduled": n, "currentNumberScheduled": n, "numberMisscheduled": 0,
                              "numberReady": n, "numberAvailable": n}}),
        );
        for node in &nodes {
            let name = format!("fleetmesh-agent-{}", node["name"].as_str().expect("node name"));
            create(
                &mut emu,
                format!("/api/v1/namespaces/{NS}/pods"),
                json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NS, "labels": labels},
                       "spec": {"nodeName": node["name"], "containers": [{"name": "mesh-agent"}]},
                       "status": {"phase": "Running"}}),
            );
            emu.command(&json!({"op": "proxy",
                "path": format!("/api/v1/namespaces/{NS}/pods/{name}:9968/proxy/v1/summary"),
                "unix": node["agentSocket"]}));
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let _ = mesh_testkit::kubeconfig(dir.path(), &[(cluster, emu.port)]);
        Self {
            _emu: emu,
            dir,
            context: cluster.to_owned(),
        }
    }

    /// `meshctl status --context C ARGS`: (success, stdout, stderr).
    fn meshctl(&self, args: &[&str]) -> (bool, String, String) {
        let out = std::process::Command::new(bin("meshctl"))
            .args(["status", "--context", &self.context, "--kubeconfig"])
            .arg(self.dir.path().join("kubeconfig"))
            .args(args)
            .output()
            .expect("run meshctl");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn json(&self) -> Value {
        let (ok, out, err) = self.meshctl(&["--json"]);
        assert!(ok, "meshctl status --json: {err}");
        serde_json::from_str(&out).expect("JSON")
    }
}

/// `(synced, agents)` of a remote cluster in `meshctl status --context --json`.
fn synced_on(v: &Value, remote: &str) -> (u64, u64) {
    v["remoteClusters"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["name"] == remote && r["own"] == false)
        .map_or((0, 0), |r| {
            (
                r["synced"].as_u64().unwrap_or(0),
                r["agents"].as_u64().unwrap_or(0),
            )
        })
}

#[test]
fn cut_cluster_fails_over_and_comes_back() {
    let lab = Lab::up(&example("three-clusters"), "faults-cut").expect("lab up");
    let status = lab.status().expect("status");
    let all = pods(&status);
    let client = pod(&all, "east/demo/client");
    let vip = cluster_ip(&status, "east", "demo/echo").expect("vip");

    // The cluster-wide status, through the pod proxy, before anything breaks: both agents of east answer and are
    // synced with both peers.
    let kube = KubeView::of(&status, "east");
    let (ok, out, err) = kube.meshctl(&["--wait", "--wait-timeout", "20s"]);
    assert!(ok, "meshctl status --wait: {err}");
    assert!(out.contains("2 of 2 pods answered"), "{out}");
    let v = kube.json();
    assert_eq!(synced_on(&v, "west"), (2, 2), "{v}");
    assert_eq!(synced_on(&v, "north"), (2, 2), "{v}");
    let west = v["remoteClusters"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["name"] == "west")
        .expect("west");
    assert_eq!(west["nodes"], json!({"min": 2, "max": 2}), "{west}");
    assert_eq!(v["problems"], json!([]), "{v}");
    // The agents' TCP status address serves the same summary, inside the node's namespace.
    let netns = all_nodes_netns(&status, "east-node-1");
    let body = in_netns(&netns, || -> anyhow::Result<String> {
        use std::io::{Read as _, Write as _};
        let mut s = TcpStream::connect("127.0.0.1:9968")?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(s, "GET /v1/summary HTTP/1.0\r\n\r\n")?;
        let mut buf = String::new();
        s.read_to_string(&mut buf)?;
        Ok(buf)
    })
    .expect("enter east-node-1")
    .expect("GET /v1/summary on the status address");
    let summary: Value = serde_json::from_str(body.split_once("\r\n\r\n").expect("HTTP").1).expect("JSON");
    assert_eq!(summary["node"], "east-node-1");

    let traffic = Traffic::start(unrelated(&all));

    let cut_at = Instant::now();
    lab.run(&["cut", "west"]).expect("cut");
    // After the grace period, east's clients only reach the clusters that are alive.
    let sock = agent_socket(&status, "east-node-1").expect("socket");
    let west_withdrawn = || {
        agent_status(&sock).ok().is_some_and(|st| {
            st["datapath"]["services"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|s| s["name"] == "echo")
                .all(|s| {
                    s["frontends"].as_array().into_iter().flatten().all(|f| {
                        f["active"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .all(|b| b["cluster"] != "west")
                    })
                })
        })
    };
    assert!(
        eventually(Duration::from_secs(20), west_withdrawn),
        "west's backends are withdrawn"
    );
    let failover = cut_at.elapsed();
    for _ in 0..30 {
        let line = tcp_line(&client.netns, &vip, 80).expect("VIP still answers from live clusters");
        assert!(!line.starts_with("west/"), "{line}");
    }
    eprintln!("failover after cut: {} ms (grace 3 s)", failover.as_millis());
    // Every agent of east says so, and the table names it as a problem.
    let v = kube.json();
    assert_eq!(synced_on(&v, "west"), (0, 2), "{v}");
    assert_eq!(synced_on(&v, "north"), (2, 2), "{v}");
    let (ok, out, _) = kube.meshctl(&[]);
    assert!(ok);
    assert!(
        out.contains("remote cluster west: synced on 0 of 2 agents"),
        "{out}"
    );

    lab.run(&["restore", "west"]).expect("restore");
    assert!(
        eventually(Duration::from_secs(20), || every_agent_synced_with(
            &status, "west"
        )),
        "west syncs again"
    );
    assert!(
        eventually(Duration::from_secs(10), || tcp_line(&client.netns, &vip, 80)
            .is_ok_and(|l| l.starts_with("west/"))),
        "west's backends return"
    );
    let (ok, _, err) = kube.meshctl(&["--wait", "--wait-timeout", "20s"]);
    assert!(ok, "after restore: {err}");
    traffic.assert_flowed(20);
}

/// The network namespace of `node`, from a lab status.
fn all_nodes_netns(status: &Value, node: &str) -> String {
    status["clusters"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|c| c["nodes"].as_array().into_iter().flatten())
        .find(|n| n["name"] == node)
        .and_then(|n| n["netns"].as_str())
        .unwrap_or_else(|| panic!("no node {node}"))
        .to_owned()
}

/// The echo service's active backend addresses on `node` (its TCP frontend).
fn active_backends(status: &Value, node: &str) -> Vec<String> {
    let Some(st) = node_status(status, node) else {
        return Vec::new();
    };
    let mut out: Vec<String> = st["datapath"]["services"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["namespace"] == "demo" && s["name"] == "echo")
        .flat_map(|s| s["frontends"].as_array().into_iter().flatten())
        .filter(|f| f["port"] == 80)
        .flat_map(|f| f["active"].as_array().into_iter().flatten())
        .filter_map(|b| b["ipv4"].as_str().map(str::to_owned))
        .collect();
    out.sort();
    out
}

/// The client's agent is killed with SIGKILL while long-lived connections run through a VIP; while it is away a
/// backend in another cluster is deleted. Established flows keep working with no agent (the datapath stays
/// pinned); the restarted agent adopts the datapath, removes exactly the deleted backend (no stale entry, no
/// flush of the others), and new connections never reach the deleted backend.
#[test]
fn agent_killed_under_traffic_keeps_flows_and_removes_what_was_deleted_while_it_was_down() {
    let lab = Lab::up(&example("three-clusters"), "faults-agent").expect("lab up");
    let status = lab.status().expect("status");
    let all = pods(&status);
    let client = pod(&all, "east/demo/client");
    let node = "east-node-1";
    let vip = cluster_ip(&status, "east", "demo/echo").expect("vip");
    let gone = pod(&all, "west/demo/echo-b").clone();
    let before = active_backends(&status, node);
    assert_eq!(before.len(), 6, "every cluster's echo pods: {before:?}");

    // Long-lived flows through the VIP (stream port 90), spread over the clusters.
    let mut flows: Vec<(TcpStream, String)> = (0..18)
        .map(|_| {
            let mut s = tcp_connect(&client.netns, &vip, 90).expect("connect through the VIP");
            let who = stream_ask(&mut s).expect("first answer");
            (s, who)
        })
        .collect();
    let traffic = Traffic::start(unrelated(&all));

    lab.run(&["stop", "agent", node, "--kill"])
        .expect("kill the agent");
    for (s, who) in &mut flows {
        assert_eq!(&stream_ask(s).expect("flow without an agent"), who);
    }
    let files = lab.dir.join("test-manifests");
    let del = write_manifest(
        &files,
        "west-echo-b.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: echo-b, namespace: demo}\n",
    )
    .expect("write");
    lab.run(&["delete", "west", &del.display().to_string()])
        .expect("delete west's echo-b while the agent is down");
    lab.run(&["start", "agent", node]).expect("start the agent");

    let want: Vec<String> = before.iter().filter(|ip| **ip != gone.ip).cloned().collect();
    assert!(
        eventually(Duration::from_secs(20), || active_backends(&status, node) == want),
        "after the resync exactly the deleted backend is gone: {:?}, want {want:?}",
        active_backends(&status, node)
    );
    // Flows to the backends that still exist kept working through the kill and the resync.
    let mut kept = 0;
    for (s, who) in &mut flows {
        if *who == gone.id {
            continue;
        }
        assert_eq!(&stream_ask(s).expect("flow after the resync"), who);
        kept += 1;
    }
    assert!(kept > 0, "some flows went to live backends");
    for i in 0..60 {
        let line = tcp_line(&client.netns, &vip, 80).unwrap_or_else(|e| panic!("connection {i}: {e:#}"));
        assert_ne!(line, gone.id, "a new connection reached the deleted backend");
    }
    traffic.assert_flowed(10);
}

/// `etcdctl` against west's etcd from the lab's underlay, with west's material `cert` (`admin`, `remote`) or none.
fn etcdctl(lab: &Lab, cert: Option<&str>, args: &[&str]) -> (bool, String) {
    let pki = lab.dir.join("clusters").join("west").join("pki");
    let ul = format!("/run/netns/{}-ul", lab.prefix().expect("prefix"));
    let mut cmd = std::process::Command::new("nsenter");
    cmd.arg(format!("--net={ul}"))
        .args([
            "etcdctl",
            "--endpoints",
            "https://100.64.0.2:2379",
            "--dial-timeout",
            "2s",
        ])
        .args(["--command-timeout", "3s", "--cacert"])
        .arg(pki.join("ca.crt"));
    if let Some(c) = cert {
        cmd.arg("--cert")
            .arg(pki.join(format!("{c}.crt")))
            .arg("--key")
            .arg(pki.join(format!("{c}.key")));
    }
    let out = cmd.args(args).output().expect("etcdctl runs");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// A peer's etcd on the lab: a client without a certificate is refused and the read-only peer certificate cannot
/// write; malformed values written into it are skipped and counted by every agent, which stay synced; a cluster
/// with an id in use is refused by `meshctl clustermesh connect` without touching the config. Unrelated traffic
/// keeps flowing throughout.
#[test]
fn peer_etcd_refuses_strangers_and_malformed_values_or_duplicate_ids_disturb_nothing() {
    let lab = Lab::up(&example("three-clusters"), "faults-input").expect("lab up");
    let status = lab.status().expect("status");
    let all = pods(&status);
    let traffic = Traffic::start(unrelated(&all));

    let (ok, out) = etcdctl(&lab, None, &["get", "--prefix", "fleetmesh/", "--keys-only"]);
    assert!(!ok, "a client without a certificate is refused: {out}");
    let (ok, out) = etcdctl(&lab, Some("remote"), &["put", "fleetmesh/x", "y"]);
    assert!(!ok && out.contains("permission denied"), "peers read only: {out}");
    let (ok, out) = etcdctl(
        &lab,
        Some("remote"),
        &["get", "--prefix", "fleetmesh/cluster-config/", "--keys-only"],
    );
    assert!(
        ok && out.contains("fleetmesh/cluster-config/west"),
        "peers can read: {out}"
    );

    // Malformed values in west's etcd: bad JSON, a record of another cluster, an unknown schema version.
    for (key, value) in [
        ("fleetmesh/state/nodes/v1/west/bogus", "{not json"),
        (
            "fleetmesh/state/services/v1/west/demo/bogus",
            r#"{"cluster":"west","clusterId":2,"namespace":"demo","name":"bogus","ports":7,"backends":[]}"#,
        ),
        ("fleetmesh/state/nodes/v9/west/future", "{}"),
    ] {
        let (ok, out) = etcdctl(&lab, Some("admin"), &["put", key, value]);
        assert!(ok, "{out}");
    }
    let decode_errors = |node: &str| -> u64 {
        node_status(&status, node)
            .and_then(|st| {
                st["remoteClusters"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|r| r["name"] == "west")
                    .map(|r| {
                        r["decodeErrors"]
                            .as_object()
                            .map_or(0, |m| m.values().filter_map(Value::as_u64).sum())
                    })
            })
            .unwrap_or(0)
    };
    let others: Vec<String> = all_nodes(&status)
        .into_iter()
        .filter(|n| !n.starts_with("west-"))
        .collect();
    assert!(
        eventually(Duration::from_secs(10), || others
            .iter()
            .all(|n| decode_errors(n) >= 3)),
        "every agent counts the malformed values: {:?}",
        others.iter().map(|n| (n, decode_errors(n))).collect::<Vec<_>>()
    );
    assert!(every_agent_synced_with(&status, "west"), "west stays synced");
    // The same in the agent's Prometheus metrics.
    let metrics =
        fleetmesh_tests::agent_get(&agent_socket(&status, "east-node-1").expect("socket"), "/metrics")
            .expect("metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l
                == r#"fleetmesh_remote_cluster_synced{node="east-node-1",cluster="east",remote="west"} 1"#),
        "{metrics}"
    );
    let skipped: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("fleetmesh_remote_decode_errors_total{") && l.contains(r#"remote="west""#))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(skipped >= 3.0, "decode errors in the metrics: {metrics}");
    let west_pod = pod(&all, "west/demo/echo-a");
    assert_eq!(
        tcp_line(&pod(&all, "east/demo/client").netns, &west_pod.ip, 8080).expect("east -> west"),
        west_pod.id
    );

    // A cluster with west's id is refused by connect; east's config is left as it was.
    let config_dir = lab.dir.join("clusters").join("east").join("clustermesh");
    let before: Vec<_> = std::fs::read_dir(&config_dir)
        .expect("config dir")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    let dup = tempfile::tempdir().expect("tempdir");
    let meshctl = |args: &[&std::ffi::OsStr]| {
        std::process::Command::new(fleetmesh_tests::bin("meshctl"))
            .args(args)
            .output()
            .expect("meshctl runs")
    };
    let ca = lab.dir.join("pki").join("ca");
    let out = meshctl(&[
        "clustermesh".as_ref(),
        "cluster-certs".as_ref(),
        "--ca".as_ref(),
        ca.as_os_str(),
        "--cluster".as_ref(),
        "dup".as_ref(),
        "--cluster-id".as_ref(),
        "2".as_ref(),
        "--server-ip".as_ref(),
        "127.0.0.1".as_ref(),
        "--out".as_ref(),
        dup.path().as_os_str(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let east_pki = lab.dir.join("clusters").join("east").join("pki");
    let out = meshctl(&[
        "clustermesh".as_ref(),
        "connect".as_ref(),
        "--from".as_ref(),
        east_pki.as_os_str(),
        "--to".as_ref(),
        dup.path().as_os_str(),
        "--config-dir".as_ref(),
        config_dir.as_os_str(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("already uses"),
        "duplicate id refused: {err}"
    );
    let after: Vec<_> = std::fs::read_dir(&config_dir)
        .expect("config dir")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(before, after, "nothing was changed");
    assert!(every_agent_synced_with(&status, "west"));

    traffic.assert_flowed(10);
}
