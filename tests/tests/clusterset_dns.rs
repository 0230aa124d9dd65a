//! Clusterset DNS and ClusterSetIP imports on the lab (docs/clusterset-dns.md): `dig` from pods against their
//! node's agent, through the resolver the lab gives every pod. One lab for every assertion.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::Duration;

use fleetmesh_tests::{Lab, agent_socket, bin, eventually, example, pod, pods, tcp_line, write_manifest};

const CONVERGE: Duration = Duration::from_secs(30);

/// `dig` in `netns` through the pod's resolver (`ip netns exec` mounts the lab's `/etc/netns/<ns>/resolv.conf`);
/// returns stdout.
fn dig(netns: &str, args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "dig", "+time=1", "+tries=2"])
        .args(args)
        .output()
        .expect("running dig");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The answers of `dig +short`, sorted.
fn short(netns: &str, name: &str, rtype: &str) -> Vec<String> {
    let mut v: Vec<String> = dig(netns, &["+short", name, rtype])
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with(';'))
        .map(str::to_owned)
        .collect();
    v.sort();
    v
}

/// The `status:` of a full `dig` answer (NOERROR, NXDOMAIN, ...).
fn rcode(netns: &str, args: &[&str]) -> String {
    let out = dig(netns, args);
    out.split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or("no answer")
        .to_owned()
}

const EXPORTS: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: demo}\nspec:\n  selector: {app: echo}\n  ports:\n    - {name: http, port: 80, targetPort: 8080, protocol: TCP}\n---\napiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {name: web, namespace: demo}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: db, namespace: demo}\nspec:\n  clusterIP: None\n  selector: {app: echo}\n  ports:\n    - {name: tcp, port: 8080, protocol: TCP}\n---\napiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {name: db, namespace: demo}\n";

#[test]
fn clusterset_names_resolve_and_balance_from_a_cluster_without_the_service() {
    let lab = Lab::up(&example("three-clusters"), "clusterset-dns").expect("lab up");
    let files = lab.dir.join("test-manifests");
    let exports = write_manifest(&files, "exports.yaml", EXPORTS).expect("manifest");
    // East and west export `web` (ClusterSetIP) and `db` (headless); north has neither Service.
    for c in ["east", "west"] {
        lab.run(&["apply", c, &exports.display().to_string()])
            .expect("apply exports");
    }
    let status = lab.status().expect("status");
    let all = pods(&status);
    let client = pod(&all, "north/demo/client");
    let echo_ips = |clusters: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = all
            .iter()
            .filter(|p| clusters.contains(&p.cluster.as_str()) && p.id.contains("/demo/echo"))
            .map(|p| p.ip.clone())
            .collect();
        v.sort();
        v
    };

    // ClusterSetIP: an address of the clusterset range, from a cluster without the Service.
    let mut vip = Vec::new();
    assert!(
        eventually(CONVERGE, || {
            vip = short(&client.netns, "web.demo.svc.clusterset.local", "A");
            vip.len() == 1 && vip[0].starts_with("198.19.")
        }),
        "web.demo.svc.clusterset.local from north: {vip:?}"
    );
    let vip = vip[0].clone();
    // The search path of the lab's resolver: the short name works too.
    assert_eq!(
        dig(&client.netns, &["+short", "+search", "web.demo", "A"]).trim(),
        vip
    );
    // Every node answers the same address.
    let other = pod(&all, "east/demo/client");
    assert!(
        eventually(CONVERGE, || short(
            &other.netns,
            "web.demo.svc.clusterset.local",
            "A"
        ) == vec![vip.clone()]),
        "east resolves web to the same ClusterSetIP"
    );

    // Connections to it spread over the exporting clusters (and never reach north, which does not export it).
    let mut by_cluster: BTreeMap<String, usize> = BTreeMap::new();
    assert!(
        eventually(CONVERGE, || tcp_line(&client.netns, &vip, 80).is_ok()),
        "north reaches {vip}:80"
    );
    for i in 0..60 {
        let line = tcp_line(&client.netns, &vip, 80).unwrap_or_else(|e| panic!("{vip}:80 try {i}: {e:#}"));
        *by_cluster
            .entry(line.split('/').next().unwrap_or_default().to_owned())
            .or_default() += 1;
    }
    let clusters: BTreeSet<&str> = by_cluster.keys().map(String::as_str).collect();
    assert_eq!(
        clusters,
        ["east", "west"].into(),
        "connections spread: {by_cluster:?}"
    );

    // `meshctl dns lookup` from the pod: the answer, and which clusters new connections to it go to.
    let socket = agent_socket(&status, &client.node).expect("north client's agent socket");
    let out = Command::new("ip")
        .args(["netns", "exec", &client.netns])
        .arg(bin("meshctl"))
        .args([
            "dns",
            "lookup",
            "web.demo.svc.clusterset.local",
            "--json",
            "--socket",
        ])
        .arg(&socket)
        .output()
        .expect("meshctl dns lookup");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["rcode"], "No Error", "{v}");
    let fe = &v["answers"][0]["clustersetIp"][0];
    assert_eq!(fe["service"], "demo/web", "{v}");
    let clusters: BTreeSet<&str> = fe["backends"]
        .as_object()
        .expect("backends")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(clusters, ["east", "west"].into(), "{v}");
    let out = Command::new("ip")
        .args(["netns", "exec", &client.netns])
        .arg(bin("meshctl"))
        .args(["dns", "lookup", "nope.demo.svc.clusterset.local", "--socket"])
        .arg(&socket)
        .output()
        .expect("meshctl dns lookup");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("no cluster of the clusterset exports demo/nope"),
        "{text}"
    );

    // SRV of the named port.
    assert_eq!(
        short(&client.netns, "_http._tcp.web.demo.svc.clusterset.local", "SRV"),
        vec!["0 100 80 web.demo.svc.clusterset.local.".to_owned()]
    );

    // Headless: every exporting cluster's ready pods.
    let want = echo_ips(&["east", "west"]);
    assert_eq!(want.len(), 4);
    let mut got = Vec::new();
    assert!(
        eventually(CONVERGE, || {
            got = short(&client.netns, "db.demo.svc.clusterset.local", "A");
            got == want
        }),
        "db.demo.svc.clusterset.local: {got:?}, want {want:?}"
    );

    // A pod with `spec.hostname` under `spec.subdomain: db` (west's echo-b, applied again with both): its name
    // under its cluster, `<hostname>.<clusterid>.<svc>.<ns>.svc.clusterset.local`, from north.
    let named = write_manifest(
        &files,
        "west-echo-b-hostname.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: echo-b\n  namespace: demo\n  labels: {app: echo}\nspec:\n  nodeName: west-node-2\n  hostname: echo-b\n  subdomain: db\n  containers:\n    - name: echo\n      image: fleetmesh/lab-echo\n      ports:\n        - {containerPort: 8080, protocol: TCP}\n        - {containerPort: 5353, protocol: UDP}\n        - {name: stream, containerPort: 9090, protocol: TCP}\n",
    )
    .expect("manifest");
    lab.run(&["apply", "west", &named.display().to_string()])
        .expect("apply west's echo-b with a hostname");
    let echo_b = pod(&all, "west/demo/echo-b").ip.clone();
    let mut got_b = Vec::new();
    assert!(
        eventually(CONVERGE, || {
            got_b = short(&client.netns, "echo-b.west.db.demo.svc.clusterset.local", "A");
            got_b == vec![echo_b.clone()]
        }),
        "echo-b.west.db.demo.svc.clusterset.local: {got_b:?}, want {echo_b}"
    );
    // Only under its cluster and its service.
    assert_eq!(
        rcode(&client.netns, &["echo-b.east.db.demo.svc.clusterset.local", "A"]),
        "NXDOMAIN"
    );

    // NXDOMAIN vs NODATA, foreign zones, odd types.
    for (args, want) in [
        (vec!["nope.demo.svc.clusterset.local", "A"], "NXDOMAIN"),
        // Global through an annotation, not exported: not in the zone.
        (vec!["echo.demo.svc.clusterset.local", "A"], "NXDOMAIN"),
        (vec!["web.demo.svc.clusterset.local", "AAAA"], "NOERROR"),
        (vec!["web.demo.svc.clusterset.local", "TYPE65280"], "NOERROR"),
        (vec!["demo.svc.clusterset.local", "A"], "NOERROR"),
        (vec!["east.web.demo.svc.clusterset.local", "A"], "NXDOMAIN"),
        (vec!["dns-version.clusterset.local", "TXT"], "NOERROR"),
        // Not ours, and no upstream in the lab.
        (vec!["example.com", "A"], "REFUSED"),
        (vec!["web.demo.svc.cluster.local", "A"], "REFUSED"),
        (vec!["+opcode=status", "web.demo.svc.clusterset.local"], "NOTIMP"),
        (vec!["-c", "CH", "web.demo.svc.clusterset.local", "A"], "REFUSED"),
    ] {
        assert_eq!(rcode(&client.netns, &args), want, "dig {args:?}");
    }
    assert!(
        dig(&client.netns, &["nope.demo.svc.clusterset.local", "A"]).contains("SOA"),
        "a negative answer carries the SOA"
    );
    let v = dig(&client.netns, &["dns-version.clusterset.local", "TXT", "+short"]);
    assert_eq!(v.trim(), "\"1.0.0\"");
    // Labels that are not DNS labels, and the longest name: NXDOMAIN, not an error or a crash.
    let long = format!(
        "{}.{}.{}.demo.svc.clusterset.local",
        "a".repeat(63),
        "b".repeat(63),
        "c".repeat(40)
    );
    for name in [
        "we_b.demo.svc.clusterset.local",
        "*.demo.svc.clusterset.local",
        long.as_str(),
    ] {
        assert_eq!(rcode(&client.netns, &[name, "A"]), "NXDOMAIN", "{name}");
    }
    // Garbage datagrams get no answer that breaks the server: it keeps answering.
    let garbage = Command::new("ip")
        .args(["netns", "exec", &client.netns, "bash", "-c"])
        .arg("printf '\\x00\\x01garbage' > /dev/udp/169.254.20.10/53; head -c 3000 /dev/zero > /dev/udp/169.254.20.10/53")
        .status()
        .expect("garbage");
    assert!(garbage.success());
    // Over TCP too, and a large query with padding (EDNS).
    assert_eq!(
        short(&client.netns, "web.demo.svc.clusterset.local", "A"),
        vec![vip.clone()]
    );
    assert_eq!(
        rcode(
            &client.netns,
            &["+tcp", "+padding=400", "web.demo.svc.clusterset.local", "A"]
        ),
        "NOERROR"
    );

    // A backend removed in one cluster leaves the headless answers.
    let gone = pod(&all, "west/demo/echo-a").ip.clone();
    let pod_file = write_manifest(
        &files,
        "west-echo-a.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: echo-a, namespace: demo}\n",
    )
    .expect("manifest");
    lab.run(&["delete", "west", &pod_file.display().to_string()])
        .expect("delete west's echo-a");
    let want: Vec<String> = want.into_iter().filter(|ip| *ip != gone).collect();
    assert!(
        eventually(CONVERGE, || {
            got = short(&client.netns, "db.demo.svc.clusterset.local", "A");
            got == want
        }),
        "after removing {gone}: {got:?}, want {want:?}"
    );

    // The exports withdrawn: the names go (NXDOMAIN), and so does the ClusterSetIP.
    for c in ["east", "west"] {
        lab.run(&["delete", c, &exports.display().to_string()])
            .expect("delete exports");
    }
    assert!(
        eventually(CONVERGE, || rcode(
            &client.netns,
            &["web.demo.svc.clusterset.local", "A"]
        ) == "NXDOMAIN"),
        "web is gone from the zone"
    );
    assert!(
        eventually(CONVERGE, || tcp_line(&client.netns, &vip, 80).is_err()),
        "the ClusterSetIP {vip} no longer answers"
    );
}
