//! A fleet hub on the lab (examples/hub-three-clusters): three clusters publish into one 3-member etcd and read
//! each other from it, with cluster ids at the edges of the range (east 1, west 4,095, north 2,048). Pod-to-pod
//! traffic and a global service work through it, policies match the edge clusters' identities, a cluster's
//! apiserver certificate may write only its own keys in the hub, an agent holds one connection to the hub for all
//! its peers, a cluster whose apiserver stops publishing is withdrawn from global services (judged by its
//! heartbeat's age) and comes back with it, losing the member an agent talks to keeps the mesh working (raft keeps
//! quorum; the agent moves to another member), and the whole hub stopped keeps the datapath on its last good state
//! until the restarted hub's resync removes exactly what vanished meanwhile.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use fleetmesh_tests::{
    Lab, Traffic, agent_socket, agent_status, cluster_ip, eventually, example, pod, pods, tcp_line,
    write_manifest,
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

/// The answers of `n` connections from `netns` to `vip:80`: the answering clusters, `None` for a failed one.
fn answers(netns: &str, vip: &str, n: usize) -> Vec<Option<String>> {
    (0..n)
        .map(|_| {
            tcp_line(netns, vip, 80)
                .ok()
                .map(|l| l.split('/').next().unwrap_or_default().to_owned())
        })
        .collect()
}

/// Whether every one of `answers` came, from exactly the clusters `want`.
fn all_from(answers: &[Option<String>], want: &[&str]) -> bool {
    let seen: Option<BTreeSet<&str>> = answers.iter().map(Option::as_deref).collect();
    seen.is_some_and(|s| s == want.iter().copied().collect())
}

/// The remote cluster `name` as the agent at `socket` reports it.
fn remote(socket: &std::path::Path, name: &str) -> serde_json::Value {
    agent_status(socket)
        .ok()
        .and_then(|st| {
            st["remoteClusters"]
                .as_array()?
                .iter()
                .find(|r| r["name"] == name)
                .cloned()
        })
        .unwrap_or_default()
}

/// Ingress to `app: echo` of the cluster it is applied to from its own clients and from the clients of `peer` only
/// (a Kubernetes NetworkPolicy selects another cluster's pods by their cluster label).
fn echo_from(peer: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: echo-from-{peer}, namespace: demo}}\n\
         spec:\n  podSelector: {{matchLabels: {{app: echo}}}}\n  policyTypes: [Ingress]\n  ingress:\n    - from:\n\
         \x20       - podSelector: {{matchLabels: {{app: client}}}}\n\
         \x20       - podSelector: {{matchLabels: {{app: client, io.cilium.k8s.policy.cluster: {peer}}}}}\n"
    )
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

    // The edge ids end to end: every agent runs with its cluster's id, and east holds its peers under theirs.
    let socket = agent_socket(&status, "east-node-1").expect("east-node-1's socket");
    for (node, id) in [("east-node-1", 1), ("west-node-1", 4095), ("north-node-1", 2048)] {
        let s = agent_socket(&status, node).expect("socket");
        let st = agent_status(&s).expect("agent status");
        assert_eq!(st["clusterId"], id, "{node}");
    }
    // `meshctl status` of west's node names its id and each cluster's pod prefixes with theirs.
    let west_socket = agent_socket(&status, "west-node-1").expect("west-node-1's socket");
    let out = Command::new(fleetmesh_tests::bin("meshctl"))
        .arg("status")
        .arg("--socket")
        .arg(&west_socket)
        .output()
        .expect("meshctl status");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("(cluster west, id 4095)"), "{text}");
    for (prefix, id) in [("10.1.0.0/24", 1), ("10.3.0.0/24", 2048), ("10.2.0.0/24", 4095)] {
        assert!(
            text.lines()
                .any(|l| l.trim_start().starts_with(prefix) && l.contains(&format!("cluster {id} "))),
            "{prefix} of cluster {id} in: {text}"
        );
    }
    for (peer, id) in [("west", 4095), ("north", 2048)] {
        let r = remote(&socket, peer);
        assert_eq!(r["clusterId"], id, "east's view of {peer}: {r}");
        assert!(r["identityCount"].as_u64() > Some(0), "{peer}'s identities: {r}");
    }
    // Identities of the edge clusters cross the overlay whole: east (1) admits west's (4,095) clients and not
    // north's (2,048), west admits east's and not north's; own clients stay admitted.
    let files = lab.dir.join("test-manifests");
    for (cluster, peer) in [("east", "west"), ("west", "east")] {
        let f =
            write_manifest(&files, &format!("{cluster}-policy.yaml"), &echo_from(peer)).expect("manifest");
        lab.run(&["apply", cluster, &f.display().to_string()])
            .expect("apply a policy");
    }
    let reaches = |from: &str, to: &str| {
        let (c, echo) = (
            pod(&all, &format!("{from}/demo/client")),
            pod(&all, &format!("{to}/demo/echo-a")),
        );
        tcp_line(&c.netns, &echo.ip, 8080).is_ok_and(|l| l == format!("{to}/demo/echo-a"))
    };
    for to in ["east", "west"] {
        assert!(
            eventually(Duration::from_secs(20), || !reaches("north", to)),
            "north's client still reaches {to}'s echo"
        );
    }
    for (from, to) in [
        ("west", "east"),
        ("east", "west"),
        ("east", "east"),
        ("west", "west"),
    ] {
        assert!(
            eventually(Duration::from_secs(10), || reaches(from, to)),
            "{from}'s client no longer reaches {to}'s echo"
        );
    }
    assert!(reaches("north", "north"), "north's own echo has no policy");

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

    // A cluster offline as a whole (its apiserver stops publishing; the hub and its records stay): east counts it
    // unreachable once its heartbeat is older than the agents' --remote-heartbeat-timeout, and after the grace
    // period its backends leave east's global service (pod-to-pod keeps flowing on the last good state). It comes
    // back with its apiserver's first heartbeat.
    lab.run(&["stop", "apiserver", "west", "--kill"])
        .expect("stop west's apiserver");
    let stopped = std::time::Instant::now();
    let mut last = Vec::new();
    assert!(
        eventually(Duration::from_secs(30), || {
            last = answers(&client.netns, &vip, 30);
            all_from(&last, &["east", "north"])
        }),
        "west's backends withdrawn from east's global service: {last:?}"
    );
    eprintln!(
        "west withdrawn {:?} after its apiserver stopped",
        stopped.elapsed()
    );
    let r = remote(&socket, "west");
    assert!(
        r["state"]["reason"]
            .as_str()
            .is_some_and(|w| w.contains("no new heartbeat")),
        "east's view of west: {r}"
    );
    assert!(
        reaches("west", "east") && reaches("east", "west"),
        "pod to pod with west offline"
    );
    lab.run(&["start", "apiserver", "west"])
        .expect("start west's apiserver");
    let started = std::time::Instant::now();
    assert!(
        eventually(Duration::from_secs(30), || {
            last = answers(&client.netns, &vip, 30);
            all_from(&last, &["east", "west", "north"])
        }),
        "west back in east's global service: {last:?}"
    );
    eprintln!("west back {:?} after its apiserver started", started.elapsed());

    // Losing the member the agent talks to: raft keeps quorum with two, the agent moves to another member, and
    // a change in west still reaches east through the hub.
    let member = conns[0].trim_end_matches(":2379").to_owned();
    let index = HUB.iter().position(|h| *h == member).expect("a hub member") + 1;
    lab.run(&["stop", "etcd", &format!("hub-{index}"), "--kill"])
        .expect("stop a hub member");
    let mut now = Vec::new();
    assert!(
        eventually(Duration::from_secs(20), || {
            now = hub_connections(&node_ns);
            now.len() == 1 && now[0] != conns[0] && synced_peers(&socket) == 2
        }),
        "after losing {member}: connections {now:?}, synced peers {}",
        synced_peers(&socket)
    );
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

    // The whole hub stopped (the two members left): the agents lose it, and the datapath keeps its last good
    // state beyond the grace period (the hub's loss is not the peers'): pod-to-pod flows and the global service
    // answers from every cluster.
    let status = lab.status().expect("status");
    let all = pods(&status);
    let west_echo = pod(&all, "west/demo/echo-a").clone();
    let north_echo = pod(&all, "north/demo/echo-a").clone();
    // West's state as east holds it once the late pod's records are in (three pods, three identities).
    let mut before_west = serde_json::Value::Null;
    assert!(
        eventually(Duration::from_secs(20), || {
            before_west = remote(&socket, "west");
            before_west["ipCount"] == 3 && before_west["identityCount"] == 3
        }),
        "east's view of west before the hub stops: {before_west}"
    );
    let before_north = remote(&socket, "north");
    let traffic = Traffic::start(vec![
        (client.netns.clone(), late_pod.ip, "west/demo/echo-late".into()),
        (client.netns.clone(), north_echo.ip, "north/demo/echo-a".into()),
    ]);
    let others: Vec<usize> = (1..=HUB.len()).filter(|i| *i != index).collect();
    for i in &others {
        lab.run(&["stop", "etcd", &format!("hub-{i}")])
            .expect("stop a hub member");
    }
    let grace_ms = 3_000 + 1_000;
    assert!(
        eventually(Duration::from_secs(30), || {
            ["west", "north"].iter().all(|p| {
                let r = remote(&socket, p);
                // From the last answer it had from the hub to its latest retry (the state's time).
                let last = r["lastAliveMs"].as_u64().unwrap_or(u64::MAX);
                let retried = r["state"]["since_ms"].as_u64().unwrap_or(0);
                r["state"]["state"] == "disconnected" && retried.saturating_sub(last) > grace_ms
            })
        }),
        "east's peers without the hub for longer than the grace period: {} {}",
        remote(&socket, "west"),
        remote(&socket, "north")
    );
    let seen = answering(&client.netns, &vip, 40);
    assert_eq!(seen.len(), 3, "the global service without the hub: {seen:?}");
    // Meanwhile west's echo backend goes.
    let gone = write_manifest(
        &files,
        "west-echo-a.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: echo-a, namespace: demo}\n",
    )
    .expect("manifest");
    lab.run(&["delete", "west", &gone.display().to_string()])
        .expect("delete west's echo-a");
    // The hub back: the resync removes west's backend from east's global service, and nothing else.
    for i in (1..=HUB.len()).rev() {
        lab.run(&["start", "etcd", &format!("hub-{i}")])
            .expect("start a hub member");
    }
    let restarted = std::time::Instant::now();
    assert!(
        eventually(Duration::from_secs(60), || {
            last = answers(&client.netns, &vip, 30);
            synced_peers(&socket) == 2 && all_from(&last, &["east", "north"])
        }),
        "after the hub's restart: answers {last:?}, synced peers {}",
        synced_peers(&socket)
    );
    eprintln!(
        "resynced {:?} after the hub's members started",
        restarted.elapsed()
    );
    // West lost exactly its echo-a's address (its identity stays for the identity grace period); north nothing.
    let want_ips = before_west["ipCount"].as_u64().map(|n| n - 1);
    let mut after_west = serde_json::Value::Null;
    assert!(
        eventually(Duration::from_secs(20), || {
            after_west = remote(&socket, "west");
            after_west["ipCount"].as_u64() == want_ips
        }),
        "west's addresses: {before_west} -> {after_west}"
    );
    assert_eq!(after_west["identityCount"], before_west["identityCount"]);
    assert_eq!(after_west["nodes"], before_west["nodes"], "{after_west}");
    let after_north = remote(&socket, "north");
    for field in ["ipCount", "identityCount", "nodes", "services"] {
        assert_eq!(
            after_north[field], before_north[field],
            "north's {field}: {after_north}"
        );
    }
    assert!(
        tcp_line(&client.netns, &west_echo.ip, 8080).is_err(),
        "west's deleted echo-a answers"
    );
    traffic.assert_flowed(20);
}
