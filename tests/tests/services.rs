//! Global services on the lab: eBPF load balancing at the client's veth with backends from every cluster, real
//! TCP and UDP through the ClusterIP.

use std::collections::BTreeMap;
use std::time::Duration;

use fleetmesh_tests::{
    Lab, PodInfo, agent_socket, agent_status, cluster_ip, eventually, example, pod, pods, stream_ask,
    tcp_connect, tcp_line, udp_line, write_manifest,
};

const ROUNDS: usize = 90;

/// Connects `n` times over TCP to `vip:80` from `from` and counts the answering clusters.
fn tcp_shares(from: &PodInfo, vip: &str, n: usize) -> BTreeMap<String, usize> {
    let mut by_cluster = BTreeMap::new();
    for i in 0..n {
        let line = tcp_line(&from.netns, vip, 80)
            .unwrap_or_else(|e| panic!("{} -> {vip}:80 (try {i}): {e:#}", from.id));
        let cluster = line.split('/').next().unwrap_or_default().to_owned();
        *by_cluster.entry(cluster).or_insert(0) += 1;
    }
    by_cluster
}

fn service_yaml(annotations: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: echo\n  namespace: demo\n  annotations: {{{annotations}}}\nspec:\n  selector: {{app: echo}}\n  ports:\n    - {{name: tcp, port: 80, targetPort: 8080, protocol: TCP}}\n    - {{name: udp, port: 53, targetPort: 5353, protocol: UDP}}\n    - {{name: stream, port: 90, targetPort: stream, protocol: TCP}}\n"
    )
}

/// The active backend addresses of the echo service's TCP frontend on `node`.
fn active_backends(status: &serde_json::Value, node: &str) -> Vec<String> {
    let Some(sock) = agent_socket(status, node) else {
        return Vec::new();
    };
    let Ok(st) = agent_status(&sock) else {
        return Vec::new();
    };
    st["datapath"]["services"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["namespace"] == "demo" && s["name"] == "echo")
        .flat_map(|s| s["frontends"].as_array().into_iter().flatten())
        .filter(|f| f["port"] == 80)
        .flat_map(|f| f["active"].as_array().into_iter().flatten())
        .filter_map(|b| b["ipv4"].as_str().map(str::to_owned))
        .collect()
}

#[test]
fn global_service_spreads_over_clusters_and_follows_affinity() {
    let lab = Lab::up(&example("three-clusters"), "svc-affinity").expect("lab up");
    let status = lab.status().expect("status");
    let all = pods(&status);
    let files = lab.dir.join("test-manifests");

    // From every cluster, TCP and UDP through the cluster's own ClusterIP reach all three clusters.
    for cluster in ["east", "west", "north"] {
        let client = pod(&all, &format!("{cluster}/demo/client"));
        let vip = cluster_ip(&status, cluster, "demo/echo").expect("echo has a ClusterIP");
        let shares = tcp_shares(client, &vip, ROUNDS);
        assert_eq!(
            shares.len(),
            3,
            "{cluster}: connections reach every cluster: {shares:?}"
        );
        for (c, n) in &shares {
            // Each cluster has 2 of 6 backends: a third of the connections, within a generous tolerance.
            let share = *n as f64 / ROUNDS as f64;
            assert!(
                (0.15..=0.55).contains(&share),
                "{cluster} -> {c}: share {share:.2} ({shares:?})"
            );
        }
        let mut udp_clusters = BTreeMap::new();
        for _ in 0..30 {
            let line = udp_line(&client.netns, &vip, 53).expect("udp through the VIP");
            *udp_clusters
                .entry(line.split('/').next().unwrap_or_default().to_owned())
                .or_insert(0) += 1;
        }
        assert_eq!(
            udp_clusters.len(),
            3,
            "{cluster}: UDP reaches every cluster: {udp_clusters:?}"
        );
    }

    // affinity: local keeps east's clients in east...
    let east_client = pod(&all, "east/demo/client");
    let east_vip = cluster_ip(&status, "east", "demo/echo").expect("vip");
    let local = write_manifest(
        &files,
        "svc-local.yaml",
        &service_yaml("service.cilium.io/global: 'true', service.cilium.io/affinity: local"),
    )
    .expect("write");
    lab.run(&["apply", "east", &local.display().to_string()])
        .expect("apply affinity local");
    assert!(
        eventually(Duration::from_secs(10), || active_backends(
            &status,
            "east-node-1"
        )
        .len()
            == 2),
        "east-node-1 switches to its 2 local backends"
    );
    let shares = tcp_shares(east_client, &east_vip, 40);
    assert_eq!(
        shares.keys().collect::<Vec<_>>(),
        vec!["east"],
        "affinity local: {shares:?}"
    );

    // ...until east has no backend left: then traffic moves to the remote clusters.
    let backends = write_manifest(
        &files,
        "east-backends.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: echo-a, namespace: demo}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: echo-b, namespace: demo}\n",
    )
    .expect("write");
    lab.run(&["delete", "east", &backends.display().to_string()])
        .expect("delete east backends");
    assert!(
        eventually(Duration::from_secs(10), || active_backends(
            &status,
            "east-node-1"
        )
        .len()
            == 4),
        "east-node-1 falls back to the 4 remote backends"
    );
    let shares = tcp_shares(east_client, &east_vip, 40);
    assert!(
        !shares.contains_key("east") && shares.len() == 2,
        "fallback to remote: {shares:?}"
    );

    // affinity: remote in north sends north's clients to the other clusters.
    let north_client = pod(&all, "north/demo/client");
    let north_vip = cluster_ip(&status, "north", "demo/echo").expect("vip");
    let remote = write_manifest(
        &files,
        "svc-remote.yaml",
        &service_yaml("service.cilium.io/global: 'true', service.cilium.io/affinity: remote"),
    )
    .expect("write");
    lab.run(&["apply", "north", &remote.display().to_string()])
        .expect("apply affinity remote");
    assert!(
        eventually(Duration::from_secs(10), || {
            let a = active_backends(&status, "north-node-1");
            a.len() == 2 && a.iter().all(|ip| ip.starts_with("10.2."))
        }),
        "north-node-1 uses west's two backends (east has none left)"
    );
    let shares = tcp_shares(north_client, &north_vip, 30);
    assert_eq!(
        shares.keys().collect::<Vec<_>>(),
        vec!["west"],
        "affinity remote: {shares:?}"
    );

    // An invalid annotation value is reported and the service keeps working as a local service.
    let bad = write_manifest(
        &files,
        "svc-bad.yaml",
        &service_yaml("service.cilium.io/global: 'true', service.cilium.io/affinity: closest"),
    )
    .expect("write");
    lab.run(&["apply", "west", &bad.display().to_string()])
        .expect("apply invalid affinity");
    let west_client = pod(&all, "west/demo/client");
    let west_vip = cluster_ip(&status, "west", "demo/echo").expect("vip");
    assert!(
        eventually(Duration::from_secs(10), || active_backends(
            &status,
            "west-node-1"
        )
        .len()
            == 2),
        "west is local only"
    );
    let sock = agent_socket(&status, "west-node-1").expect("socket");
    let st = agent_status(&sock).expect("status");
    let errors = st["datapath"]["services"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["name"] == "echo")
        .flat_map(|s| s["spec"]["errors"].as_array().into_iter().flatten())
        .filter_map(|e| e.as_str().map(str::to_owned))
        .collect::<Vec<_>>();
    assert!(
        errors.iter().any(|e| e.contains("closest")),
        "error reported: {errors:?}"
    );
    let shares = tcp_shares(west_client, &west_vip, 20);
    assert_eq!(
        shares.keys().collect::<Vec<_>>(),
        vec!["west"],
        "invalid annotation: local service: {shares:?}"
    );
}

#[test]
fn shared_false_removed_backends_and_deleted_services() {
    let lab = Lab::up(&example("three-clusters"), "svc-shared").expect("lab up");
    let status = lab.status().expect("status");
    let all = pods(&status);
    let files = lab.dir.join("test-manifests");
    let north_client = pod(&all, "north/demo/client");
    let north_vip = cluster_ip(&status, "north", "demo/echo").expect("vip");

    // shared: "false" in west: west still consumes remote backends, but north no longer sees west's.
    let unshared = write_manifest(
        &files,
        "svc-unshared.yaml",
        &service_yaml("service.cilium.io/global: 'true', service.cilium.io/shared: 'false'"),
    )
    .expect("write");
    lab.run(&["apply", "west", &unshared.display().to_string()])
        .expect("apply shared false");
    assert!(
        eventually(Duration::from_secs(10), || {
            let a = active_backends(&status, "north-node-1");
            a.len() == 4 && a.iter().all(|ip| !ip.starts_with("10.2."))
        }),
        "north drops west's backends"
    );
    let shares = tcp_shares(north_client, &north_vip, 40);
    assert!(
        !shares.contains_key("west") && shares.len() == 2,
        "shared false: {shares:?}"
    );
    let west_client = pod(&all, "west/demo/client");
    let west_vip = cluster_ip(&status, "west", "demo/echo").expect("vip");
    assert_eq!(
        tcp_shares(west_client, &west_vip, ROUNDS).len(),
        3,
        "west still uses every cluster's backends"
    );

    // A backend removed from the service while connections run keeps them; new ones never pick it.
    let mut conns = Vec::new();
    for _ in 0..18 {
        let mut s = tcp_connect(&north_client.netns, &north_vip, 90).expect("stream connect");
        let who = stream_ask(&mut s).expect("first answer");
        conns.push((s, who));
    }
    let retired = "east/demo/echo-a";
    assert!(
        conns.iter().any(|(_, who)| who == retired),
        "some stream landed on {retired}: {:?}",
        conns.iter().map(|c| &c.1).collect::<Vec<_>>()
    );
    let relabel = write_manifest(
        &files,
        "retire.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: echo-a, namespace: demo, labels: {app: retired}}\nspec:\n  nodeName: east-node-1\n  containers:\n    - name: echo\n      ports:\n        - {containerPort: 8080, protocol: TCP}\n        - {containerPort: 5353, protocol: UDP}\n        - {name: stream, containerPort: 9090, protocol: TCP}\n",
    )
    .expect("write");
    lab.run(&["apply", "east", &relabel.display().to_string()])
        .expect("relabel echo-a");
    let retired_ip = pod(&all, retired).ip.clone();
    assert!(
        eventually(Duration::from_secs(10), || !active_backends(
            &status,
            "north-node-1"
        )
        .contains(&retired_ip)),
        "north stops picking {retired}"
    );
    for (s, who) in &mut conns {
        let again = stream_ask(s).unwrap_or_else(|e| panic!("established flow to {who} broke: {e:#}"));
        assert_eq!(&again, who, "established flow stays on its backend");
    }
    let shares = tcp_shares(north_client, &north_vip, 40);
    for _ in 0..20 {
        let line = tcp_line(&north_client.netns, &north_vip, 80).expect("new connection");
        assert_ne!(line, retired, "a new connection picked the removed backend");
    }
    assert!(
        shares.contains_key("east"),
        "east's other backend still serves: {shares:?}"
    );

    // Added back while the streams still run: new connections reach it again, the streams are unaffected.
    let restore = write_manifest(
        &files,
        "restore.yaml",
        &std::fs::read_to_string(&relabel)
            .expect("read")
            .replace("app: retired", "app: echo"),
    )
    .expect("write");
    lab.run(&["apply", "east", &restore.display().to_string()])
        .expect("relabel echo-a back");
    assert!(
        eventually(Duration::from_secs(10), || active_backends(
            &status,
            "north-node-1"
        )
        .contains(&retired_ip)),
        "north picks {retired} again"
    );
    assert!(
        eventually(Duration::from_secs(20), || tcp_line(
            &north_client.netns,
            &north_vip,
            80
        )
        .is_ok_and(|l| l == retired)),
        "a new connection reaches the re-added backend"
    );
    for (s, who) in &mut conns {
        assert_eq!(&stream_ask(s).expect("stream still up"), who);
    }

    // A service whose selector matches nothing drops its traffic, counted as drop_no_backend.
    let empty = write_manifest(
        &files,
        "empty.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: empty, namespace: demo}\nspec:\n  selector: {app: nobody}\n  ports: [{name: tcp, port: 80, targetPort: 8080}]\n",
    )
    .expect("write");
    lab.run(&["apply", "north", &empty.display().to_string()])
        .expect("apply empty service");
    let status = lab.status().expect("status");
    let empty_vip = cluster_ip(&status, "north", "demo/empty").expect("empty has a ClusterIP");
    let sock = agent_socket(&status, "north-node-1").expect("socket");
    let drops = |st: &serde_json::Value| {
        st["datapath"]["counters"]["drop_no_backend"]
            .as_u64()
            .unwrap_or(0)
    };
    let before = drops(&agent_status(&sock).expect("status"));
    assert!(
        tcp_line(&north_client.netns, &empty_vip, 80).is_err(),
        "no backend: no answer"
    );
    assert!(
        drops(&agent_status(&sock).expect("status")) > before,
        "the drop is counted"
    );

    // Deleting the service removes its frontend: the VIP no longer answers.
    lab.run(&["delete", "north", &empty.display().to_string()])
        .expect("delete service");
    let svc = write_manifest(&files, "svc-delete.yaml", &service_yaml("")).expect("write");
    lab.run(&["delete", "north", &svc.display().to_string()])
        .expect("delete echo in north");
    assert!(
        eventually(Duration::from_secs(10), || active_backends(
            &status,
            "north-node-1"
        )
        .is_empty()),
        "north's echo frontend is gone"
    );
    assert!(
        tcp_line(&north_client.netns, &north_vip, 80).is_err(),
        "deleted service does not answer"
    );
}

#[test]
fn service_in_a_namespace_of_one_cluster_works_as_a_local_service() {
    let root = Lab::dir_for("svc-solo-topology");
    let _ = std::fs::remove_dir_all(&root);
    for c in ["east", "west"] {
        std::fs::create_dir_all(root.join(c)).expect("mkdir");
    }
    std::fs::write(root.join("lab.yaml"), "clusters:\n  - {name: east, id: 1, podCIDR: 10.1.0.0/16, nodes: 1}\n  - {name: west, id: 2, podCIDR: 10.2.0.0/16, nodes: 1}\n").expect("write");
    std::fs::write(
        root.join("east/solo.yaml"),
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: only-east}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: backend, namespace: only-east, labels: {app: solo}}\nspec:\n  containers: [{name: c, ports: [{containerPort: 8080}]}]\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: client, namespace: only-east}\nspec:\n  containers: [{name: c, ports: [{containerPort: 8080}]}]\n---\napiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {name: solo, namespace: only-east}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: solo, namespace: only-east}\nspec:\n  selector: {app: solo}\n  ports: [{name: tcp, port: 80, targetPort: 8080}]\n",
    )
    .expect("write");
    std::fs::write(
        root.join("west/client.yaml"),
        "apiVersion: v1\nkind: Pod\nmetadata: {name: client, namespace: default}\nspec:\n  containers: [{name: c, ports: [{containerPort: 8080}]}]\n",
    )
    .expect("write");
    let lab = Lab::up(&root, "svc-solo").expect("lab up");
    let status = lab.status().expect("status");
    let all = pods(&status);
    let vip = cluster_ip(&status, "east", "only-east/solo").expect("vip");
    let client = pod(&all, "east/only-east/client");
    for _ in 0..10 {
        assert_eq!(
            tcp_line(&client.netns, &vip, 80).expect("solo via VIP"),
            "east/only-east/backend"
        );
    }
    // The exported service is published; west has no such Service, and imports it (MCS): its only service is the
    // ClusterSetIP import (docs/clusterset-dns.md).
    let west = agent_status(&agent_socket(&status, "west-node-1").expect("socket")).expect("status");
    let east_remote = west["remoteClusters"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["name"] == "east")
        .expect("east");
    assert!(
        east_remote["services"]["only-east/solo"].is_object(),
        "exported service published: {east_remote}"
    );
    let west_services: Vec<&serde_json::Value> = west["datapath"]["services"]
        .as_array()
        .into_iter()
        .flatten()
        .collect();
    assert!(
        west_services.iter().all(|s| s["namespace"] == "only-east"
            && s["name"] == "solo"
            && s["frontends"]
                .as_array()
                .into_iter()
                .flatten()
                .all(|f| f["vip"].as_str().is_some_and(|v| v.starts_with("198.19.")))),
        "west's only services are the import of only-east/solo: {west_services:?}"
    );
    drop(lab);
    let _ = std::fs::remove_dir_all(&root);
}
