//! Trust boundaries on the lab (docs/security.md): an operator of peer cluster west writes into west's own etcd
//! with west's admin certificate (etcd root role), as an attacker holding it could. East's agents refuse what west
//! may not claim and keep the last good state; an east agent restarted while west's etcd is away keeps the traffic
//! to west flowing.

use std::time::Duration;

use fleetmesh_tests::{
    Lab, PodInfo, Traffic, agent_socket, agent_status, cluster_ip, eventually, example, node_status, pod,
    pods, tcp_line, write_manifest,
};
use serde_json::Value;

/// `etcdctl` against west's etcd from the lab's underlay, with west's admin certificate.
fn west_etcdctl(lab: &Lab, args: &[&str]) -> String {
    let pki = lab.dir.join("clusters").join("west").join("pki");
    let ul = format!("/run/netns/{}-ul", lab.prefix().expect("prefix"));
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net={ul}"))
        .args([
            "etcdctl",
            "--endpoints",
            "https://100.64.0.2:2379",
            "--dial-timeout",
            "2s",
            "--command-timeout",
            "3s",
            "--cacert",
        ])
        .arg(pki.join("ca.crt"))
        .arg("--cert")
        .arg(pki.join("admin.crt"))
        .arg("--key")
        .arg(pki.join("admin.key"))
        .args(args)
        .output()
        .expect("etcdctl runs");
    assert!(
        out.status.success(),
        "etcdctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Rewrites west's record at `key` with `change` applied to its JSON.
fn tamper(lab: &Lab, key: &str, change: impl FnOnce(&mut Value)) {
    let text = west_etcdctl(lab, &["get", key, "--print-value-only"]);
    let mut v: Value = serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{key}: {e}: {text}"));
    change(&mut v);
    west_etcdctl(lab, &["put", key, &v.to_string()]);
}

/// West as `node`'s agent sees it.
fn west_on(status: &Value, node: &str) -> Value {
    node_status(status, node)
        .and_then(|st| {
            st["remoteClusters"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|r| r["name"] == "west")
                .cloned()
        })
        .unwrap_or(Value::Null)
}

fn refused(status: &Value, node: &str, reason: &str) -> u64 {
    west_on(status, node)["decodeErrors"][reason]
        .as_u64()
        .unwrap_or(0)
}

const EAST_NODES: [&str; 2] = ["east-node-1", "east-node-2"];

/// East's echo pods admit only east's own clients (a Kubernetes NetworkPolicy selects this cluster's pods).
const EAST_POLICY: &str = r"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: echo-from-local-clients, namespace: demo}
spec:
  podSelector: {matchLabels: {app: echo}}
  ingress:
    - from:
        - podSelector: {matchLabels: {app: client}}
      ports:
        - {protocol: TCP, port: 8080}
";

#[test]
fn a_peer_cannot_pass_as_this_cluster_nor_take_a_global_service() {
    let lab = Lab::up(&example("three-clusters"), "trust-peer").expect("lab up");
    let status = lab.status().expect("status");
    let all = pods(&status);
    let east_client = pod(&all, "east/demo/client");
    let west_client = pod(&all, "west/demo/client");
    let target = pod(&all, "east/demo/echo-a");
    let f = write_manifest(&lab.dir.join("test-manifests"), "east-policy.yaml", EAST_POLICY).expect("write");
    lab.run(&["apply", "east", &f.display().to_string()])
        .expect("apply east's policy");
    let reaches = |from: &PodInfo| tcp_line(&from.netns, &target.ip, 8080).is_ok_and(|a| a == target.id);
    assert!(
        eventually(Duration::from_secs(20), || reaches(east_client)
            && !reaches(west_client)),
        "east's policy admits east's client only"
    );

    // West republishes its node with east's cluster id: refused by every east agent, the last good record stays.
    tamper(&lab, "fleetmesh/state/nodes/v1/west/west-node-1", |v| {
        v["clusterId"] = 1.into()
    });
    assert!(
        eventually(Duration::from_secs(20), || EAST_NODES.iter().all(|n| refused(
            &status,
            n,
            "wrong_cluster_id"
        ) >= 1)),
        "east's agents refuse the record: {:?}",
        EAST_NODES.map(|n| west_on(&status, n)["recentRefusals"].clone())
    );
    let west = west_on(&status, "east-node-1");
    assert!(
        west["recentRefusals"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|r| r.as_str().is_some_and(|r| r.contains("granted cluster id 2"))),
        "the reason is in the status: {west}"
    );
    assert_eq!(west["nodes"]["west-node-1"]["clusterId"], 2, "{west}");
    for i in 0..5 {
        assert!(reaches(east_client), "probe {i}: east's client still admitted");
        assert!(!reaches(west_client), "probe {i}: west's client still refused");
    }

    // West gives its backends the largest weight: refused, the split stays as it was.
    let vip = cluster_ip(&status, "east", "demo/echo").expect("vip");
    let answers = |n: usize| -> Vec<String> {
        (0..n)
            .map(|i| {
                tcp_line(&east_client.netns, &vip, 80).unwrap_or_else(|e| panic!("connection {i}: {e:#}"))
            })
            .collect()
    };
    let weights = |node: &str| -> Vec<u64> {
        node_status(&status, node)
            .map(|st| {
                st["datapath"]["services"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|s| s["name"] == "echo")
                    .flat_map(|s| s["frontends"].as_array().cloned().unwrap_or_default())
                    .flat_map(|f| f["active"].as_array().cloned().unwrap_or_default())
                    .filter_map(|b| b["weight"].as_u64())
                    .collect()
            })
            .unwrap_or_default()
    };
    let before = weights("east-node-1");
    tamper(&lab, "fleetmesh/state/services/v1/west/demo/echo", |v| {
        for b in v["backends"].as_array_mut().into_iter().flatten() {
            b["weight"] = u32::MAX.into();
        }
    });
    assert!(
        eventually(Duration::from_secs(20), || EAST_NODES
            .iter()
            .all(|n| refused(&status, n, "invalid") >= 1)),
        "east's agents refuse the weights"
    );
    assert_eq!(
        weights("east-node-1"),
        before,
        "the programmed weights are unchanged"
    );
    let got = answers(40);
    let from_west = got.iter().filter(|a| a.starts_with("west/")).count();
    eprintln!("after the weight attack {from_west} of 40 connections through the VIP went to west");
    assert!(from_west < 40, "west did not take every connection: {got:?}");
    assert!(
        got.iter().any(|a| !a.starts_with("west/")),
        "other clusters' backends still answer: {got:?}"
    );
}

/// East's echo pods admit the clients of every cluster of the mesh (and nothing else).
const EAST_MESH_POLICY: &str = r"apiVersion: fleetmesh.io/v1alpha1
kind: MeshNetworkPolicy
metadata: {name: echo-from-clients, namespace: demo}
spec:
  podSelector: {matchLabels: {app: echo}}
  policyTypes: [Ingress]
  ingress:
    - from:
        - podSelector: {matchLabels: {app: client}}
      ports:
        - {protocol: TCP, port: 8080}
";

#[test]
fn an_agent_restarted_during_a_peer_outage_keeps_the_traffic_to_it_flowing() {
    let lab = Lab::up(&example("three-clusters"), "trust-restart").expect("lab up");
    let status = lab.status().expect("status");
    let all = pods(&status);
    let client = pod(&all, "east/demo/client");
    let node = "east-node-1";
    // West's client reaches east's echo-a (on the restarted node) through a policy that names west's pods by
    // their labels: the restarted agent must still know west's identities.
    let f = write_manifest(
        &lab.dir.join("test-manifests"),
        "east-mesh-policy.yaml",
        EAST_MESH_POLICY,
    )
    .expect("write");
    lab.run(&["apply", "east", &f.display().to_string()])
        .expect("apply east's policy");
    let (west_client, west_echo, east_echo) = (
        pod(&all, "west/demo/client"),
        pod(&all, "west/demo/echo-a"),
        pod(&all, "east/demo/echo-a"),
    );
    assert!(
        eventually(Duration::from_secs(20), || {
            tcp_line(&west_client.netns, &east_echo.ip, 8080).is_ok_and(|a| a == east_echo.id)
                && tcp_line(&west_echo.netns, &east_echo.ip, 8080).is_err()
        }),
        "east's policy admits west's client and refuses west's echo"
    );
    let mut targets: Vec<(String, String, String)> = ["west/demo/echo-a", "west/demo/echo-b"]
        .iter()
        .map(|id| {
            let p = pod(&all, id);
            (client.netns.clone(), p.ip.clone(), p.id.clone())
        })
        .collect();
    targets.push((
        west_client.netns.clone(),
        east_echo.ip.clone(),
        east_echo.id.clone(),
    ));
    for (netns, ip, want) in &targets {
        assert_eq!(&tcp_line(netns, ip, 8080).expect("east <-> west"), want);
    }

    lab.run(&["stop", "etcd", "west", "--kill"])
        .expect("stop west's etcd");
    let traffic = Traffic::start(targets);
    lab.run(&["restart", "agent", node])
        .expect("restart east-node-1's agent");
    let socket = agent_socket(&status, node).expect("socket");
    // The new agent runs its passes (the first one removed west's entries before) while west is unreachable.
    assert!(
        eventually(Duration::from_secs(20), || agent_status(&socket)
            .is_ok_and(|st| st["datapath"]["reconciles"].as_u64().unwrap_or(0) >= 5)),
        "the restarted agent reconciles"
    );
    let west = west_on(&status, node);
    assert_ne!(west["state"]["state"], "synced", "west is still away: {west}");
    // At least 100 more probes after the passes (fewer when probes time out: the failures then say why).
    let seen = traffic.probes();
    eventually(Duration::from_secs(30), || traffic.probes() >= seen + 100);
    let (probes, failures) = traffic.finish();
    eprintln!(
        "{probes} probes to west while its etcd was away, {} failed",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {probes} probes to west failed after the restart: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(probes >= seen + 100, "{probes} probes");

    lab.run(&["start", "etcd", "west"]).expect("start west's etcd");
    assert!(
        eventually(
            Duration::from_secs(30),
            || west_on(&status, node)["state"]["state"] == "synced"
        ),
        "west syncs again"
    );
    for p in ["west/demo/echo-a", "west/demo/echo-b"] {
        let p = pod(&all, p);
        assert_eq!(tcp_line(&client.netns, &p.ip, 8080).expect("after"), p.id);
    }
}
