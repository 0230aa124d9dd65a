//! `TrafficPolicy` on the lab: a global service's new connections shared between groups of clusters by weight
//! (groups by cluster labels from `lab.yaml` and by names), by capacity inside a group, with real TCP connections
//! through the ClusterIP.

use std::collections::BTreeMap;
use std::io::Read as _;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use fleetmesh_tests::{
    Lab, agent_socket, cluster_ip, eventually, example, in_netns, node_status, pods, write_manifest,
};

/// Connections per measurement.
const CONNS: usize = 1000;
/// Largest difference between a group's measured share of `CONNS` connections and its weight's share (about four
/// standard deviations of a 10% share over 1,000 connections).
const TOLERANCE: f64 = 0.04;

/// Opens `n` TCP connections to `vip:80` from inside `netns`, counting the answers (`cluster/namespace/pod`).
fn answers(netns: &str, vip: &str, n: usize) -> BTreeMap<String, usize> {
    let addr: SocketAddr = format!("{vip}:80").parse().expect("address");
    in_netns(netns, || {
        let mut out = BTreeMap::new();
        for i in 0..n {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
                .unwrap_or_else(|e| panic!("connection {i} to {addr}: {e}"));
            s.set_read_timeout(Some(Duration::from_secs(3))).expect("timeout");
            let mut line = String::new();
            s.read_to_string(&mut line)
                .unwrap_or_else(|e| panic!("answer {i} from {addr}: {e}"));
            *out.entry(line.trim_end().to_owned()).or_insert(0) += 1;
        }
        out
    })
    .expect("netns")
}

/// Shares by cluster (first path element of the answer).
fn by_cluster(answers: &BTreeMap<String, usize>) -> BTreeMap<String, f64> {
    let total: usize = answers.values().sum();
    let mut out = BTreeMap::new();
    for (a, n) in answers {
        let c = a.split('/').next().unwrap_or_default().to_owned();
        *out.entry(c).or_insert(0.0) += *n as f64 / total as f64;
    }
    out
}

fn share(shares: &BTreeMap<String, f64>, key: &str) -> f64 {
    shares.get(key).copied().unwrap_or(0.0)
}

fn assert_near(shares: &BTreeMap<String, f64>, key: &str, want: f64, what: &str) {
    let got = share(shares, key);
    assert!(
        (got - want).abs() <= TOLERANCE,
        "{what}: {key} got {got:.3} of the connections, weight says {want:.3} (±{TOLERANCE}): {shares:?}"
    );
}

/// The echo service as `node`'s agent reports it.
fn echo_view(status: &serde_json::Value, node: &str) -> serde_json::Value {
    let Some(st) = node_status(status, node) else {
        return serde_json::Value::Null;
    };
    st["datapath"]["services"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["namespace"] == "demo" && s["name"] == "echo")
        .cloned()
        .unwrap_or_default()
}

/// The TrafficPolicy states `node`'s agent reports, by name.
fn policy_states(status: &serde_json::Value, node: &str) -> BTreeMap<String, (String, String)> {
    let Some(st) = node_status(status, node) else {
        return BTreeMap::new();
    };
    st["datapath"]["trafficPolicies"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            (
                p["name"].as_str().unwrap_or_default().to_owned(),
                (
                    p["state"].as_str().unwrap_or_default().to_owned(),
                    p["message"].as_str().unwrap_or_default().to_owned(),
                ),
            )
        })
        .collect()
}

/// Group weights of the echo service's TCP frontend on `node`, as `[(weight, clusters)]`.
fn groups(status: &serde_json::Value, node: &str) -> Vec<(u64, Vec<String>)> {
    echo_view(status, node)["frontends"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|f| f["port"] == 80)
        .flat_map(|f| f["groups"].as_array().cloned().unwrap_or_default())
        .map(|g| {
            (
                g["weight"].as_u64().unwrap_or(0),
                g["clusters"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|c| c.as_str().map(str::to_owned))
                    .collect(),
            )
        })
        .collect()
}

fn policy_yaml(groups: &str) -> String {
    format!(
        "apiVersion: fleetmesh.io/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: echo-split, namespace: demo}}\nspec:\n  service: echo\n  weights:\n{groups}"
    )
}

fn echo_pod_yaml(name: &str, node: &str, capacity: Option<u32>) -> String {
    let annotations = capacity.map_or(String::new(), |c| {
        format!("\n  annotations: {{fleetmesh.io/capacity: \"{c}\"}}")
    });
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: demo\n  labels: {{app: echo}}{annotations}\nspec:\n  nodeName: {node}\n  containers:\n    - name: echo\n      image: fleetmesh/lab-echo\n      ports:\n        - {{containerPort: 8080, protocol: TCP}}\n        - {{containerPort: 5353, protocol: UDP}}\n        - {{name: stream, containerPort: 9090, protocol: TCP}}\n"
    )
}

#[test]
fn traffic_policy_shares_new_connections_by_cluster_group_and_capacity() {
    let lab = Lab::up(&example("three-clusters"), "traffic-weights").expect("lab up");
    let status = lab.status().expect("status");
    let all = pods(&status);
    let client = all
        .iter()
        .find(|p| p.id == "east/demo/client")
        .expect("east client");
    let vip = cluster_ip(&status, "east", "demo/echo").expect("vip");
    let files = lab.dir.join("test-manifests");
    let apply = |name: &str, text: &str| {
        let f = write_manifest(&files, name, text).expect("write");
        lab.run(&["apply", "east", &f.display().to_string()])
            .expect("apply");
    };
    let node = "east-node-1";
    let groups_are = |want: &[(u64, &[&str])]| {
        let want: Vec<(u64, Vec<String>)> = want
            .iter()
            .map(|(w, cs)| (*w, cs.iter().map(|c| (*c).to_owned()).collect()))
            .collect();
        eventually(Duration::from_secs(10), || groups(&status, node) == want)
    };

    // By label (east carries stage: canary in lab.yaml) and by name; north is in no group.
    apply(
        "policy.yaml",
        &policy_yaml(
            "    - clusters: {matchLabels: {stage: canary}}\n      weight: 10\n    - clusters: {names: [west]}\n      weight: 90\n",
        ),
    );
    assert!(
        groups_are(&[(10, &["east"]), (90, &["west"])]),
        "policy in force on {node}: {:?}",
        groups(&status, node)
    );
    let s = by_cluster(&answers(&client.netns, &vip, CONNS));
    assert_near(&s, "east", 0.10, "canary 10 / west 90");
    assert_near(&s, "west", 0.90, "canary 10 / west 90");
    assert_eq!(share(&s, "north"), 0.0, "north is in no group: {s:?}");

    // Label expressions: region in (eu) is east and north; the rest goes to the catch-all group.
    apply(
        "policy.yaml",
        &policy_yaml(
            "    - clusters: {matchExpressions: [{key: region, operator: In, values: [eu]}]}\n      weight: 3\n    - clusters: {}\n      weight: 1\n",
        ),
    );
    assert!(groups_are(&[(3, &["east", "north"]), (1, &["west"])]));
    let s = by_cluster(&answers(&client.netns, &vip, CONNS));
    assert_near(&s, "east", 0.375, "eu 3 / others 1");
    assert_near(&s, "north", 0.375, "eu 3 / others 1");
    assert_near(&s, "west", 0.25, "eu 3 / others 1");

    // Capacity inside a group: west's echo-b announces 3, echo-a 1.
    let west = write_manifest(
        &files,
        "west-echo-b.yaml",
        &echo_pod_yaml("echo-b", "west-node-2", Some(3)),
    )
    .expect("write");
    lab.run(&["apply", "west", &west.display().to_string()])
        .expect("apply west");
    apply(
        "policy.yaml",
        &policy_yaml("    - clusters: {names: [west]}\n      weight: 1\n"),
    );
    let west_weights = || {
        echo_view(&status, node)["frontends"][0]["active"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|b| b["weight"].as_u64().unwrap_or(0))
            .collect::<Vec<_>>()
    };
    assert!(
        eventually(Duration::from_secs(10), || {
            let mut w = west_weights();
            w.sort_unstable();
            w == [1, 3]
        }),
        "capacity 1:3 inside the west group: {:?}",
        west_weights()
    );
    let a = answers(&client.netns, &vip, CONNS);
    let total = CONNS as f64;
    let pod_share = |p: &str| a.get(p).copied().unwrap_or(0) as f64 / total;
    assert!(
        (pod_share("west/demo/echo-b") - 0.75).abs() <= TOLERANCE,
        "capacity 3 of 4: {a:?}"
    );
    assert!(
        (pod_share("west/demo/echo-a") - 0.25).abs() <= TOLERANCE,
        "capacity 1 of 4: {a:?}"
    );

    // A group that loses all its backends: its share goes to the others.
    apply(
        "policy.yaml",
        &policy_yaml(
            "    - clusters: {matchLabels: {stage: canary}}\n      weight: 50\n    - clusters: {names: [north]}\n      weight: 50\n",
        ),
    );
    assert!(groups_are(&[(50, &["east"]), (50, &["north"])]));
    for p in ["echo-a", "echo-b"] {
        let f = write_manifest(
            &files,
            &format!("east-{p}.yaml"),
            &echo_pod_yaml(p, "east-node-1", None),
        )
        .expect("write");
        lab.run(&["delete", "east", &f.display().to_string()])
            .expect("delete east echo");
    }
    assert!(groups_are(&[(50, &[]), (50, &["north"])]));
    let s = by_cluster(&answers(&client.netns, &vip, 200));
    assert_eq!(
        share(&s, "north"),
        1.0,
        "the canary group has no backend left: {s:?}"
    );

    // An update naming a service that does not exist is rejected; the previous version stays in force.
    let mut bad = policy_yaml("    - clusters: {names: [west]}\n      weight: 1\n");
    bad = bad.replace("service: echo", "service: ehco");
    apply("policy.yaml", &bad);
    assert!(
        eventually(Duration::from_secs(10), || {
            policy_states(&status, node)
                .get("echo-split")
                .is_some_and(|(state, msg)| state == "rejected" && msg.contains("previous version"))
        }),
        "rejected: {:?}",
        policy_states(&status, node)
    );
    assert!(groups_are(&[(50, &[]), (50, &["north"])]));
    let s = by_cluster(&answers(&client.netns, &vip, 100));
    assert_eq!(share(&s, "north"), 1.0, "old policy still steers: {s:?}");

    // A malformed policy (weights summing to 0) is refused with the field named; the previous one stays.
    let zero = write_manifest(
        &files,
        "policy.yaml",
        &policy_yaml("    - clusters: {names: [west]}\n      weight: 0\n"),
    )
    .expect("write");
    let err = lab
        .run(&["apply", "east", &zero.display().to_string()])
        .expect_err("malformed policy refused");
    assert!(
        format!("{err:#}").contains("spec.weights: the weights sum to 0"),
        "{err:#}"
    );
    let s = by_cluster(&answers(&client.netns, &vip, 100));
    assert_eq!(share(&s, "north"), 1.0, "old policy still steers: {s:?}");
}

/// Opens `n` TCP connections to `vip:80` from `netns`; returns the answers by cluster and the number of
/// connections that failed (reset or timed out).
fn drive(netns: &str, vip: &str, n: usize) -> (BTreeMap<String, usize>, usize) {
    let addr: SocketAddr = format!("{vip}:80").parse().expect("address");
    in_netns(netns, || {
        let mut ok = BTreeMap::new();
        let mut failed = 0;
        for _ in 0..n {
            let answer = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).and_then(|mut s| {
                s.set_read_timeout(Some(Duration::from_secs(2)))?;
                let mut line = String::new();
                s.read_to_string(&mut line)?;
                Ok(line)
            });
            match answer {
                Ok(line) if !line.is_empty() => {
                    let c = line.split('/').next().unwrap_or_default().to_owned();
                    *ok.entry(c).or_insert(0) += 1;
                }
                _ => failed += 1,
            }
        }
        (ok, failed)
    })
    .expect("netns")
}

/// The state of rollout `name` as `node`'s agent reports it.
fn rollout_state(status: &serde_json::Value, node: &str, name: &str) -> serde_json::Value {
    node_status(status, node)
        .and_then(|st| {
            st["datapath"]["rollouts"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|r| r["name"] == name)
                .cloned()
        })
        .unwrap_or_default()
}

fn rollout_yaml(name: &str, steps: &str, hold: u32, max_failure: f64) -> String {
    format!(
        "apiVersion: fleetmesh.io/v1alpha1\nkind: StagedRollout\nmetadata: {{name: {name}, namespace: demo}}\nspec:\n  service: echo\n  from: {{names: [west]}}\n  to: {{matchLabels: {{track: v2}}}}\n  steps: {steps}\n  holdSeconds: {hold}\n  gate: {{maxFailureRatio: {max_failure}}}\n"
    )
}

fn meshctl(socket: &std::path::Path, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(fleetmesh_tests::bin("meshctl"))
        .args(args)
        .arg("--socket")
        .arg(socket)
        .output()
        .expect("meshctl runs");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn staged_rollout_completes_survives_restarts_halts_on_failures_and_obeys_commands() {
    let lab = Lab::up(&example("three-clusters"), "traffic-rollout").expect("lab up");
    let status = lab.status().expect("status");
    let all = pods(&status);
    let client = all
        .iter()
        .find(|p| p.id == "east/demo/client")
        .expect("east client");
    let vip = cluster_ip(&status, "east", "demo/echo").expect("vip");
    let files = lab.dir.join("test-manifests");
    let apply = |cluster: &str, name: &str, text: &str| {
        let f = write_manifest(&files, name, text).expect("write");
        lab.run(&["apply", cluster, &f.display().to_string()])
            .expect("apply");
    };
    let node = "east-node-1";
    let socket = agent_socket(&status, node).expect("socket");
    let phase = |name: &str| {
        rollout_state(&status, node, name)["phase"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };

    // A rollout from west to north (track: v2) that completes: steps of 2 s while connections flow.
    apply(
        "east",
        "rollout.yaml",
        &rollout_yaml("echo-v2", "[10, 50, 100]", 2, 0.2),
    );
    let mut seen_percents = Vec::new();
    assert!(
        eventually(Duration::from_secs(30), || {
            let _ = drive(&client.netns, &vip, 20);
            let r = rollout_state(&status, node, "echo-v2");
            if let Some(p) = r["percent"].as_u64()
                && seen_percents.last() != Some(&p)
            {
                seen_percents.push(p);
            }
            r["phase"] == "Completed"
        }),
        "rollout completes: {:?}",
        rollout_state(&status, node, "echo-v2")
    );
    assert_eq!(seen_percents, [10, 50, 100], "every step in order, none skipped");
    let (ok, failed) = drive(&client.netns, &vip, 200);
    assert_eq!(
        (ok.get("north").copied(), failed),
        (Some(200), 0),
        "all on `to`: {ok:?}"
    );
    let (done, text) = meshctl(&socket, &["rollout", "status", "echo-v2", "-n", "demo"]);
    assert!(done && text.contains("Completed"), "{text}");

    // A new spec starts over; an agent restart in the middle resumes at the same step (never jumps one).
    apply(
        "east",
        "rollout.yaml",
        &rollout_yaml("echo-v2", "[20, 60, 100]", 6, 0.2),
    );
    assert!(eventually(Duration::from_secs(20), || {
        rollout_state(&status, node, "echo-v2")["percent"] == 60
    }));
    let before = rollout_state(&status, node, "echo-v2");
    lab.run(&["restart", "agent", node]).expect("restart agent");
    let mut after = serde_json::Value::Null;
    assert!(eventually(Duration::from_secs(10), || {
        after = rollout_state(&status, node, "echo-v2");
        !after.is_null()
    }));
    assert!(
        after["step"] == before["step"] || (after["step"] == 2 && before["heldMs"].as_u64().is_some()),
        "resumed where it was: before {before:?}, after {after:?}"
    );
    assert_ne!(after["percent"], 20, "never back to the first step: {after:?}");

    // meshctl pause / resume / abort through the agent API.
    let (ok_pause, text) = meshctl(&socket, &["rollout", "pause", "echo-v2", "-n", "demo"]);
    assert!(ok_pause, "{text}");
    assert!(eventually(Duration::from_secs(5), || phase("echo-v2")
        == "Paused"
        || phase("echo-v2") == "Completed"));
    let (unknown, text) = meshctl(&socket, &["rollout", "pause", "nope", "-n", "demo"]);
    assert!(!unknown && text.contains("no StagedRollout demo/nope"), "{text}");
    let (ok_abort, text) = meshctl(&socket, &["rollout", "abort", "echo-v2", "-n", "demo"]);
    assert!(ok_abort, "{text}");
    assert!(eventually(Duration::from_secs(5), || phase("echo-v2") == "Aborted"));
    let (ok, failed) = drive(&client.netns, &vip, 100);
    assert_eq!(
        (ok.get("west").copied(), failed),
        (Some(100), 0),
        "aborted: all on `from`: {ok:?}"
    );

    // The `to` backends reset every connection: the gate fails and every new connection goes back to west.
    for (p, n) in [("echo-a", "north-node-1"), ("echo-b", "north-node-2")] {
        let pod = echo_pod_yaml(p, n, None).replace(
            "  labels: {app: echo}",
            "  labels: {app: echo}\n  annotations: {lab.fleetmesh.io/fail: reset}",
        );
        apply("north", &format!("north-{p}.yaml"), &pod);
    }
    apply(
        "east",
        "rollout.yaml",
        &rollout_yaml("echo-v2", "[50, 100]", 60, 0.05),
    );
    assert!(
        eventually(Duration::from_secs(20), || {
            let _ = drive(&client.netns, &vip, 20);
            phase("echo-v2") == "Halted"
        }),
        "halted: {:?}",
        rollout_state(&status, node, "echo-v2")
    );
    let halted = rollout_state(&status, node, "echo-v2");
    assert!(
        halted["message"]
            .as_str()
            .unwrap_or_default()
            .contains("gate failed at step 1"),
        "{halted:?}"
    );
    let (ok, failed) = drive(&client.netns, &vip, 100);
    assert_eq!(
        (ok.get("west").copied(), failed),
        (Some(100), 0),
        "halted: all back on `from`: {ok:?}"
    );

    // A malformed rollout is refused with the field named; the running one is untouched.
    let bad = write_manifest(
        &files,
        "rollout.yaml",
        &rollout_yaml("echo-v2", "[50, 10]", 60, 0.05),
    )
    .expect("write");
    let err = lab
        .run(&["apply", "east", &bad.display().to_string()])
        .expect_err("malformed rollout refused");
    assert!(
        format!("{err:#}").contains("spec.steps[1]: steps must increase"),
        "{err:#}"
    );
    assert_eq!(phase("echo-v2"), "Halted");
}
