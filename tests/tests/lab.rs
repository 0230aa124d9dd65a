//! End-to-end tests on the lab: real etcd, real clustermesh-apiservers and agents, real eBPF programs on real
//! interfaces, real TCP/UDP/ICMP traffic between pods in network namespaces this test creates.

use std::collections::BTreeSet;
use std::path::Path;

use fleetmesh_tests::{
    Lab, PodInfo, agent_get, agent_socket, example, lab_cmd, ping, pods, tcp_line, udp_line, write_manifest,
};
use serde_json::Value;

const TCP: u16 = 8080;
const UDP: u16 = 5353;

fn path_kind(a: &PodInfo, b: &PodInfo) -> &'static str {
    if a.cluster != b.cluster {
        "other cluster"
    } else if a.node == b.node {
        "same node"
    } else {
        "other node"
    }
}

fn assert_reachable(from: &PodInfo, to: &PodInfo) {
    let kind = path_kind(from, to);
    let line = tcp_line(&from.netns, &to.ip, TCP)
        .unwrap_or_else(|e| panic!("TCP {} -> {} ({kind}): {e:#}", from.id, to.id));
    assert_eq!(
        line, to.id,
        "TCP {} -> {} ({kind}) answered by the wrong pod",
        from.id, to.id
    );
    let line = udp_line(&from.netns, &to.ip, UDP)
        .unwrap_or_else(|e| panic!("UDP {} -> {} ({kind}): {e:#}", from.id, to.id));
    assert_eq!(
        line, to.id,
        "UDP {} -> {} ({kind}) answered by the wrong pod",
        from.id, to.id
    );
}

#[test]
fn three_clusters_all_paths_then_add_node_apply_and_delete() {
    let lab = Lab::up(&example("three-clusters"), "three").expect("lab up");
    let status = lab.status().expect("status");
    let all = pods(&status);
    assert_eq!(all.len(), 9, "3 pods per cluster: {all:?}");
    // Every agent is ready (read its cluster, programmed its datapath): what the chart's readiness probe asks.
    for node in [
        "east-node-1",
        "east-node-2",
        "west-node-1",
        "west-node-2",
        "north-node-1",
        "north-node-2",
    ] {
        let sock = agent_socket(&status, node).unwrap_or_else(|| panic!("no agent socket of {node}"));
        assert_eq!(
            agent_get(&sock, "/readyz").expect("GET /readyz"),
            "ok\n",
            "{node}"
        );
    }

    // Every ordered pair over TCP and UDP, which covers all three paths in both directions.
    let mut kinds = BTreeSet::new();
    for a in &all {
        for b in all.iter().filter(|b| b.id != a.id) {
            assert_reachable(a, b);
            kinds.insert(path_kind(a, b));
        }
    }
    assert_eq!(
        kinds.len(),
        3,
        "the example covers same node, other node and other cluster: {kinds:?}"
    );
    // ICMP echo on each path.
    let by_id = |id: &str| {
        all.iter()
            .find(|p| p.id == id)
            .unwrap_or_else(|| panic!("no pod {id}"))
            .clone()
    };
    let client = by_id("east/demo/client");
    for target in [
        "east/demo/echo-a",
        "east/demo/echo-b",
        "west/demo/echo-b",
        "north/demo/echo-a",
    ] {
        assert!(
            ping(&client.netns, &by_id(target).ip).expect("ping runs"),
            "ping east/demo/client -> {target}"
        );
    }

    // The datapath really forwarded: every agent counted local deliveries, and tunnelled packets.
    for c in status["clusters"].as_array().into_iter().flatten() {
        for n in c["nodes"].as_array().into_iter().flatten() {
            let sock = n["agentSocket"].as_str().expect("socket");
            let st = agent_status(Path::new(sock));
            let counters = &st["datapath"]["counters"];
            assert!(
                counters["forward_local"].as_u64().unwrap_or(0) > 0,
                "{}: {counters}",
                n["name"]
            );
            assert!(
                counters["forward_tunnel"].as_u64().unwrap_or(0) > 0,
                "{}: {counters}",
                n["name"]
            );
            assert_eq!(st["ready"], true, "{}", n["name"]);
        }
    }

    // A node added to a running cluster becomes reachable from the other clusters without restarts.
    // The underlay bridge has an address of its own: one taken from its ports would change when the new node's
    // port joins, and every node's ARP entry for the etcd addresses on the bridge would point nowhere.
    let underlay = status["underlayNetns"]
        .as_str()
        .expect("underlayNetns")
        .to_owned();
    let assign_type = || {
        let out = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &underlay,
                "cat",
                "/sys/class/net/br0/addr_assign_type",
            ])
            .output()
            .expect("ip netns exec");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert_eq!(
        assign_type(),
        "3",
        "br0's address is set (NET_ADDR_SET), not taken from a port"
    );
    let out = lab.run(&["add-node", "west"]).expect("add-node");
    assert!(out.contains("west-node-3"), "{out}");
    let files = lab.dir.join("test-manifests");
    let late = write_manifest(
        &files,
        "late.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: late, namespace: demo}\nspec:\n  nodeName: west-node-3\n  containers:\n    - name: echo\n      ports: [{containerPort: 8080}, {containerPort: 5353, protocol: UDP}]\n",
    )
    .expect("write");
    lab.run(&["apply", "west", &late.display().to_string()])
        .expect("apply");
    let all = pods(&lab.status().expect("status"));
    let late_pod = all
        .iter()
        .find(|p| p.id == "west/demo/late")
        .expect("late pod")
        .clone();
    assert_eq!(late_pod.node, "west-node-3");
    for from in all
        .iter()
        .filter(|p| p.cluster != "west" || p.node != "west-node-3")
    {
        assert_reachable(from, &late_pod);
        assert_reachable(&late_pod, from);
    }
    // Adding the node cut no agent off its peers' etcd.
    for c in lab.status().expect("status")["clusters"]
        .as_array()
        .into_iter()
        .flatten()
    {
        for n in c["nodes"].as_array().into_iter().flatten() {
            for r in n["remoteClusters"].as_array().into_iter().flatten() {
                assert_eq!(r["state"], "synced", "{} after add-node: {r}", n["name"]);
            }
        }
    }

    // A malformed manifest is refused with the file and field named, and nothing running is disturbed.
    let bad = write_manifest(
        &files,
        "bad.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: broken, namespace: demo}\nspec:\n  containers:\n    - name: echo\n      ports: [{containerPort: 99999}]\n",
    )
    .expect("write");
    let err = lab
        .run(&["apply", "west", &bad.display().to_string()])
        .expect_err("malformed manifest refused");
    let msg = format!("{err:#}");
    assert!(msg.contains("bad.yaml") && msg.contains("containerPort"), "{msg}");
    assert_reachable(&client, &late_pod);

    // Deleting the pod removes it: its namespace is gone and its address no longer answers.
    lab.run(&["delete", "west", &late.display().to_string()])
        .expect("delete");
    let all = pods(&lab.status().expect("status"));
    assert!(all.iter().all(|p| p.id != "west/demo/late"));
    assert!(
        !Path::new("/run/netns").join(&late_pod.netns).exists(),
        "pod namespace removed"
    );
    assert!(
        tcp_line(&client.netns, &late_pod.ip, TCP).is_err(),
        "deleted pod must not answer"
    );
}

fn agent_status(socket: &Path) -> Value {
    use std::io::{Read as _, Write as _};
    let mut s = std::os::unix::net::UnixStream::connect(socket).expect("agent socket");
    write!(s, "GET /v1/status HTTP/1.0\r\n\r\n").expect("write");
    let mut buf = String::new();
    s.read_to_string(&mut buf).expect("read");
    let body = buf.split_once("\r\n\r\n").expect("http").1;
    serde_json::from_str(body).expect("json")
}

/// The network namespaces `lab namespaces` reports for the lab in `dir`.
fn lab_namespaces(dir: &Path) -> Vec<String> {
    let out = lab_cmd(dir, &["namespaces"]).expect("lab namespaces");
    assert!(
        out.status.success(),
        "lab namespaces: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

fn assert_nothing_created(dir: &Path) {
    assert!(!dir.join("state.json").exists(), "no state written");
    assert_eq!(lab_namespaces(dir), Vec::<String>::new(), "no namespace created");
}

fn bad_topology(name: &str, lab_yaml: &str, files: &[(&str, &str)]) -> String {
    let root = Lab::dir_for(&format!("topo-{name}"));
    let _ = std::fs::remove_dir_all(&root);
    let topo = root.join("topology");
    std::fs::create_dir_all(&topo).expect("mkdir");
    std::fs::write(topo.join("lab.yaml"), lab_yaml).expect("write");
    for (path, text) in files {
        let p = topo.join(path);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(p, text).expect("write");
    }
    let dir = root.join("lab");
    let out = lab_cmd(
        &dir,
        &["up", "--no-build", "--topology", &topo.display().to_string()],
    )
    .expect("run");
    assert!(!out.status.success(), "{name}: bad topology accepted");
    assert_nothing_created(&dir);
    let _ = std::fs::remove_dir_all(&root);
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// (name, lab.yaml, manifest files, words the error must contain)
type BadCase = (
    &'static str,
    String,
    Vec<(&'static str, String)>,
    Vec<&'static str>,
);

#[test]
fn bad_topologies_are_refused_before_anything_is_created() {
    let two = "clusters:\n  - {name: east, id: 1, podCIDR: 10.1.0.0/16, nodes: 1}\n";
    let pod = |extra: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: p}}\nspec:\n  nodeName: east-node-1\n  containers: [{{name: c{extra}}}]\n"
        )
    };
    let cases: Vec<BadCase> = vec![
        ("unknown-field", "clusters:\n  - {name: east, id: 1, podCIDR: 10.1.0.0/16, nodes: 1, zone: a}\n".into(), vec![], vec!["lab.yaml", "zone"]),
        ("dup-id", "clusters:\n  - {name: east, id: 1, podCIDR: 10.1.0.0/16, nodes: 1}\n  - {name: west, id: 1, podCIDR: 10.2.0.0/16, nodes: 1}\n".into(), vec![], vec!["lab.yaml", "west", "field id"]),
        ("overlap", "clusters:\n  - {name: east, id: 1, podCIDR: 10.1.0.0/16, nodes: 1}\n  - {name: west, id: 2, podCIDR: 10.1.128.0/17, nodes: 1}\n".into(), vec![], vec!["podCIDR", "overlaps"]),
        ("bad-name", "clusters:\n  - {name: East_1, id: 1, podCIDR: 10.1.0.0/16, nodes: 1}\n".into(), vec![], vec!["East_1", "field name"]),
        ("no-node", two.into(), vec![("east/a.yaml", pod("").replace("east-node-1", "east-node-7"))], vec!["a.yaml", "spec.nodeName", "east-node-7"]),
        ("pod-unknown-field", two.into(), vec![("east/b.yaml", pod(", colour: red"))], vec!["b.yaml", "Pod default/p", "colour"]),
        ("malformed-yaml", two.into(), vec![("east/c.yaml", "kind: Pod\nmetadata: [\n".into())], vec!["c.yaml", "YAML"]),
    ];
    for (name, lab_yaml, files, wants) in cases {
        let files: Vec<(&str, &str)> = files.iter().map(|(p, t)| (*p, t.as_str())).collect();
        let err = bad_topology(name, &lab_yaml, &files);
        for w in wants {
            assert!(err.contains(w), "{name}: {w:?} not in error: {err}");
        }
    }
}

#[test]
fn lab_down_cleans_up_after_a_crash() {
    let root = Lab::dir_for("crash-topology");
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(root.join("solo")).expect("mkdir");
    std::fs::write(
        root.join("lab.yaml"),
        "clusters:\n  - {name: solo, id: 7, podCIDR: 10.7.0.0/16, nodes: 1}\n",
    )
    .expect("write");
    std::fs::write(
        root.join("solo/p.yaml"),
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers: [{name: c, ports: [{containerPort: 8080}]}]\n",
    )
    .expect("write");
    let lab = Lab::up(&root, "crash").expect("lab up");
    let prefix = lab.prefix().expect("prefix");
    assert!(lab_namespaces(&lab.dir).iter().all(|n| n.starts_with(&prefix)));
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(lab.dir.join("state.json")).expect("state"))
            .expect("json");
    let pids: Vec<i32> = state["procs"]
        .as_array()
        .expect("procs")
        .iter()
        .filter_map(|p| p["pid"].as_i64())
        .filter_map(|p| i32::try_from(p).ok())
        .collect();
    assert!(pids.len() >= 4, "etcd, apiserver, agent, pod: {pids:?}");
    // Simulate a crash: every lab process dies at once and the state file is lost.
    for p in &pids {
        // SAFETY: SIGKILL to processes this test's lab started (pids read from its own state file).
        unsafe {
            libc::kill(*p, libc::SIGKILL);
        }
    }
    std::fs::remove_file(lab.dir.join("state.json")).expect("rm state");
    let ours = || lab_namespaces(&lab.dir);
    assert!(!ours().is_empty(), "namespaces are still there before lab down");
    lab.run(&["down"]).expect("down");
    assert!(
        ours().is_empty(),
        "lab down removed every namespace of the lab: {:?}",
        ours()
    );
    // A later `lab up` in the same folder works again.
    lab.run(&["up", "--no-build", "--topology", &root.display().to_string()])
        .expect("up again");
    assert!(!ours().is_empty());
    let dir = lab.dir.clone();
    drop(lab);
    assert!(
        lab_namespaces(&dir).is_empty(),
        "the guard's lab down removed everything"
    );
    let _ = std::fs::remove_dir_all(&root);
}
