//! A fleet hub on the lab (examples/hub-three-clusters): three clusters publish into one 3-member etcd and read
//! each other from it. Pod-to-pod traffic and a global service work through it, a cluster's apiserver
//! certificate may write only its own keys in the hub, an agent holds one connection to the hub for all its peers,
//! and losing the member it talks to keeps the mesh working (raft keeps quorum; the agent moves to another member).

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use fleetmesh_tests::{
    Lab, agent_socket, agent_status, cluster_ip, eventually, example, pod, pods, tcp_line, write_manifest,
};

const HUB: [&str; 3] = ["100.127.255.1", "100.127.255.2", "100.127.255.3"];

/// The hub members `netns` has established TCP connections to (one entry per connection).
fn hub_connections(netns: &str) -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "ss", "-tnH", "state", "established"])
        .output()
        .expect("ss");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3).map(str::to_owned))
        .filter(|peer| HUB.iter().any(|h| *peer == format!("{h}:2379")))
        .collect()
}

/// `etcdctl put KEY VALUE` on the hub from the underlay namespace with a certificate of `dir` (`stem.crt/.key`).
fn hub_put(prefix: &str, dir: &std::path::Path, stem: &str, key: &str) -> (bool, String) {
    let file = |ext: &str| dir.join(format!("{stem}.{ext}")).display().to_string();
    let out = Command::new("ip")
        .args(["netns", "exec", &format!("{prefix}-ul"), "etcdctl"])
        .arg(format!("--endpoints=https://{}:2379", HUB[0]))
        .arg(format!("--cacert={}", dir.join("ca.crt").display()))
        .arg(format!("--cert={}", file("crt")))
        .arg(format!("--key={}", file("key")))
        .args(["--command-timeout=5s", "put", key, "x"])
        .output()
        .expect("etcdctl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The clusters answering `n` connections from `netns` to `vip:80`.
fn answering(netns: &str, vip: &str, n: usize) -> BTreeSet<String> {
    (0..n)
        .filter_map(|_| tcp_line(netns, vip, 80).ok())
        .map(|l| l.split('/').next().unwrap_or_default().to_owned())
        .collect()
}

fn synced_peers(socket: &std::path::Path) -> usize {
    agent_status(socket).map_or(0, |st| {
        st["remoteClusters"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| r["state"]["state"] == "synced")
            .count()
    })
}

#[test]
fn a_mesh_through_a_hub() {
    let lab = Lab::up(&example("hub-three-clusters"), "hub").expect("lab up");
    let status = lab.status().expect("status");
    let prefix = lab.prefix().expect("prefix");
    let all = pods(&status);
    let client = pod(&all, "east/demo/client");

    // Pod to pod across clusters, every pair of clusters, with the peers read from the hub only.
    for from in ["east", "west", "north"] {
        let c = pod(&all, &format!("{from}/demo/client"));
        for to in ["east", "west", "north"] {
            let echo = pod(&all, &format!("{to}/demo/echo-a"));
            let line = tcp_line(&c.netns, &echo.ip, 8080).unwrap_or_else(|e| panic!("{from} -> {to}: {e:#}"));
            assert_eq!(line, format!("{to}/demo/echo-a"), "{from} -> {to}");
        }
    }
    // A global service balanced over the three clusters' backends.
    let vip = cluster_ip(&status, "east", "demo/echo").expect("east's ClusterIP of demo/echo");
    let seen = answering(&client.netns, &vip, 40);
    assert_eq!(
        seen.len(),
        3,
        "the global service reaches every cluster: {seen:?}"
    );

    // One connection to the hub per agent, whatever the number of peers it reads there (2 here).
    let node_ns = format!("{prefix}-east-node-1");
    let mut conns = Vec::new();
    assert!(
        eventually(Duration::from_secs(10), || {
            conns = hub_connections(&node_ns);
            conns.len() == 1
        }),
        "east-node-1's connections to the hub: {conns:?}"
    );

    // Hub security: east's apiserver certificate writes east's keys only; its readers' certificate nothing.
    let east = lab.dir.join("clusters").join("east").join("hub");
    let (ok, err) = hub_put(&prefix, &east, "apiserver", "fleetmesh/clusters/east/probe");
    assert!(ok, "east writes its own prefix: {err}");
    for key in [
        "fleetmesh/clusters/west/heartbeat/west",
        "fleetmesh/clusters/west/state/nodes/v1/west/west-node-9",
        "fleetmesh/cluster-config/west",
    ] {
        let (ok, err) = hub_put(&prefix, &east, "apiserver", key);
        assert!(
            !ok && err.contains("permission denied"),
            "east writes {key}: {err}"
        );
    }
    let (ok, err) = hub_put(&prefix, &east, "reader", "fleetmesh/clusters/east/probe");
    assert!(
        !ok && err.contains("permission denied"),
        "the reader certificate writes: {err}"
    );

    // Losing the member the agent talks to: raft keeps quorum with two, the agent moves to another member, and
    // a change in west still reaches east through the hub.
    let member = conns[0].trim_end_matches(":2379").to_owned();
    let index = HUB.iter().position(|h| *h == member).expect("a hub member") + 1;
    lab.run(&["stop", "etcd", &format!("hub-{index}"), "--kill"])
        .expect("stop a hub member");
    let socket = agent_socket(&status, "east-node-1").expect("east-node-1's socket");
    let mut now = Vec::new();
    assert!(
        eventually(Duration::from_secs(20), || {
            now = hub_connections(&node_ns);
            now.len() == 1 && now[0] != conns[0] && synced_peers(&socket) == 2
        }),
        "after losing {member}: connections {now:?}, synced peers {}",
        synced_peers(&socket)
    );
    let files = lab.dir.join("test-manifests");
    let late = write_manifest(
        &files,
        "late.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: echo-late\n  namespace: demo\n  labels: {app: late}\nspec:\n  containers:\n    - name: echo\n      image: fleetmesh/lab-echo\n      ports:\n        - {containerPort: 8080, protocol: TCP}\n",
    )
    .expect("manifest");
    lab.run(&["apply", "west", &late.display().to_string()])
        .expect("apply in west");
    let status = lab.status().expect("status");
    let late_pod = pod(&pods(&status), "west/demo/echo-late").clone();
    assert!(
        eventually(Duration::from_secs(20), || {
            tcp_line(&client.netns, &late_pod.ip, 8080).is_ok_and(|l| l == "west/demo/echo-late")
        }),
        "a pod added in west while a hub member is down is reached from east"
    );
    let seen = answering(&client.netns, &vip, 40);
    assert_eq!(
        seen.len(),
        3,
        "the global service with a hub member down: {seen:?}"
    );
}
