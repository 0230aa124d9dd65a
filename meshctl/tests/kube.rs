//! `meshctl clustermesh status|enable|connect|disconnect` against emulated clusters: two kmock processes
//! (mesh-k8s's emulator fixture, `pip install kmock`) seeded with what the fleetmesh chart installs, reached through
//! a kubeconfig with one context per emulator.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::ByteString;
use mesh_testkit::{KubeEmulator, kubeconfig};
use serde_json::{Value, json};

const NS: &str = "kube-system";
const CERTS_DIR: &str = "/var/lib/fleetmesh/clustermesh-remote-certs";

fn b64(s: &str) -> Value {
    serde_json::to_value(ByteString(s.as_bytes().to_vec())).expect("base64")
}

fn unb64(v: &Value) -> String {
    let b: ByteString = serde_json::from_value(v.clone()).expect("base64 value");
    String::from_utf8(b.0).expect("utf-8")
}

/// What one emulated cluster looks like.
struct Spec<'a> {
    name: &'a str,
    id: u16,
    /// `NodePort` (node 10.0.0.N, port 32379) or `LoadBalancer`.
    service_type: &'a str,
    /// LoadBalancer ingress IP (none: no address yet).
    lb_ip: Option<&'a str>,
    tls: bool,
    /// Seed the remote-client Secret (when `tls`).
    remote_client: bool,
    node_ip: &'a str,
    ready: i32,
}

impl Spec<'_> {
    fn new(name: &str, id: u16) -> Spec<'_> {
        Spec {
            name,
            id,
            service_type: "NodePort",
            lb_ip: None,
            tls: true,
            remote_client: true,
            node_ip: "10.0.0.1",
            ready: 3,
        }
    }
}

fn create(emu: &mut KubeEmulator, path: &str, object: Value) {
    let mut cmd = json!({"op": "create", "path": path});
    cmd["object"] = object;
    emu.command(&cmd);
}

fn meta(name: &str) -> Value {
    json!({"name": name, "namespace": NS, "labels": {"app.kubernetes.io/part-of": "fleetmesh"}})
}

/// Seeds the objects the chart (release `fleetmesh` in kube-system) and the user's Secrets make.
fn seed(emu: &mut KubeEmulator, s: &Spec<'_>) {
    let core = format!("/api/v1/namespaces/{NS}");
    let apps = format!("/apis/apps/v1/namespaces/{NS}");
    create(
        emu,
        &format!("{core}/configmaps"),
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta("fleetmesh-config"),
               "data": {"cluster-name": s.name, "cluster-id": s.id.to_string(), "log-level": "info"}}),
    );
    let mut svc = json!({"apiVersion": "v1", "kind": "Service", "metadata": meta("fleetmesh-clustermesh-apiserver"),
        "spec": {"type": s.service_type, "ports": [{"name": "etcd", "port": 2379, "nodePort": 32379, "protocol": "TCP"}]},
        "status": {"loadBalancer": {}}});
    if let Some(ip) = s.lb_ip {
        svc["status"]["loadBalancer"] = json!({"ingress": [{"ip": ip}]});
    }
    create(emu, &format!("{core}/services"), svc);
    create(
        emu,
        "/api/v1/nodes",
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1"},
               "status": {"addresses": [{"type": "InternalIP", "address": s.node_ip}, {"type": "Hostname", "address": "node-1"}]}}),
    );
    let mut volumes = vec![json!({"name": "etcd-data", "emptyDir": {}})];
    if s.tls {
        volumes.push(
            json!({"name": "etcd-server-tls", "secret": {"secretName": "fleetmesh-clustermesh-server-cert"}}),
        );
    }
    create(
        emu,
        &format!("{apps}/deployments"),
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta("fleetmesh-clustermesh-apiserver"),
               "spec": {"replicas": 1, "selector": {"matchLabels": {"a": "b"}},
                        "template": {"spec": {"containers": [{"name": "etcd"}], "volumes": volumes}}},
               "status": {"replicas": 1, "readyReplicas": 1}}),
    );
    create(
        emu,
        &format!("{apps}/daemonsets"),
        json!({"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": meta("fleetmesh-agent"),
               "spec": {"selector": {"matchLabels": {"a": "b"}}, "template": {"spec": {
                   "containers": [{"name": "mesh-agent", "volumeMounts": [
                       {"name": "clustermesh-config", "mountPath": "/var/lib/fleetmesh/clustermesh"},
                       {"name": "clustermesh-remote-certs", "mountPath": CERTS_DIR}]}],
                   "volumes": [
                       {"name": "clustermesh-config", "secret": {"secretName": "fleetmesh-clustermesh", "optional": true}},
                       {"name": "clustermesh-remote-certs", "secret": {"secretName": "fleetmesh-clustermesh-remote-certs", "optional": true}}]}}},
               "status": {"desiredNumberScheduled": 3, "currentNumberScheduled": 3, "numberMisscheduled": 0,
                          "numberReady": s.ready, "numberAvailable": s.ready}}),
    );
    // The chart renders the config Secret (empty without `clustermesh.peers`).
    create(
        emu,
        &format!("{core}/secrets"),
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": meta("fleetmesh-clustermesh"), "type": "Opaque", "data": {}}),
    );
    if s.tls {
        create(
            emu,
            &format!("{core}/secrets"),
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": meta("fleetmesh-clustermesh-server-cert"),
                   "type": "kubernetes.io/tls",
                   "data": {"ca.crt": b64("CA"), "tls.crt": b64("SERVER"), "tls.key": b64("SERVERKEY")}}),
        );
        if s.remote_client {
            create(
                emu,
                &format!("{core}/secrets"),
                json!({"apiVersion": "v1", "kind": "Secret", "metadata": meta("fleetmesh-clustermesh-remote-client"),
                       "type": "kubernetes.io/tls",
                       "data": {"ca.crt": b64(&format!("CA of {}", s.name)),
                                "tls.crt": b64(&format!("remote cert of {}", s.name)),
                                "tls.key": b64(&format!("remote key of {}", s.name))}}),
            );
        }
    }
}

fn secret(emu: &mut KubeEmulator, name: &str) -> Value {
    let a = emu.command(&json!({"op": "get", "path": format!("/api/v1/namespaces/{NS}/secrets/{name}")}));
    a["object"]["data"].clone()
}

struct Out {
    ok: bool,
    stdout: String,
    stderr: String,
}

/// `meshctl clustermesh ARGS --kubeconfig FILE`.
fn meshctl(kubeconfig: &Path, args: &[&str]) -> Out {
    let mut all = vec!["clustermesh"];
    all.extend_from_slice(args);
    meshctl_top(kubeconfig, &all)
}

/// `meshctl ARGS --kubeconfig FILE`.
fn meshctl_top(kubeconfig: &Path, args: &[&str]) -> Out {
    let out = Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .args(args)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .env_remove("KUBECONFIG")
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("run meshctl");
    let o = Out {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    assert!(
        !o.stderr.contains("panicked") && !o.stderr.contains("backtrace"),
        "meshctl panicked: {}",
        o.stderr
    );
    o
}

/// A failure: exit status 1 and one line on stderr, starting with `error:`.
fn one_line_error(o: &Out) -> &str {
    assert!(!o.ok, "expected a failure, got: {}", o.stdout);
    let e = o.stderr.trim_end();
    assert!(e.starts_with("error: "), "{e}");
    e
}

#[test]
fn status_of_a_prepared_cluster_as_table_and_json() {
    let mut emu = KubeEmulator::start(&[]);
    seed(&mut emu, &Spec::new("east", 7));
    let dir = tempfile::tempdir().expect("tempdir");
    let kc = kubeconfig(dir.path(), &[("east", emu.port)]);

    let o = meshctl(&kc, &["status", "--context", "east"]);
    assert!(o.ok, "{}", o.stderr);
    for want in [
        "Cluster:      east (id 7)",
        "Service fleetmesh-clustermesh-apiserver (NodePort), peers reach it at 10.0.0.1:32379",
        "Deployment 1/1 ready",
        "TLS:          on; server Secret fleetmesh-clustermesh-server-cert yes, remote client Secret \
         fleetmesh-clustermesh-remote-client yes",
        "DaemonSet fleetmesh-agent: 3/3 ready",
        "Peers:        none",
        "Problems:     none",
    ] {
        assert!(o.stdout.contains(want), "missing {want:?} in:\n{}", o.stdout);
    }

    let o = meshctl(&kc, &["status", "--context", "east", "--json"]);
    assert!(o.ok, "{}", o.stderr);
    let v: Value = serde_json::from_str(&o.stdout).expect("JSON");
    assert_eq!(v["cluster"], json!({"name": "east", "id": 7}));
    assert_eq!(v["apiserver"]["service_type"], "NodePort");
    assert_eq!(v["apiserver"]["addresses"], json!(["10.0.0.1:32379"]));
    assert_eq!(v["agents"]["desired"], 3);
    assert_eq!(v["agents"]["ready"], 3);
    assert_eq!(v["tls"]["enabled"], true);
    assert_eq!(v["peers"], json!([]));
    assert_eq!(v["problems"], json!([]));

    // --wait returns at once when all is ready.
    let o = meshctl(
        &kc,
        &["status", "--context", "east", "--wait", "--wait-timeout", "10s"],
    );
    assert!(o.ok, "{}", o.stderr);
}

#[test]
fn wait_times_out_with_a_clear_message_when_the_service_has_no_address() {
    let mut emu = KubeEmulator::start(&[]);
    let mut s = Spec::new("east", 1);
    s.service_type = "LoadBalancer";
    s.ready = 2;
    seed(&mut emu, &s);
    let dir = tempfile::tempdir().expect("tempdir");
    let kc = kubeconfig(dir.path(), &[("east", emu.port)]);

    let o = meshctl(&kc, &["status", "--context", "east"]);
    assert!(o.ok, "{}", o.stderr);
    assert!(o.stdout.contains("peers reach it at none yet"), "{}", o.stdout);
    assert!(
        o.stdout.contains("the LoadBalancer has no ingress address yet"),
        "{}",
        o.stdout
    );
    assert!(o.stdout.contains("2 of 3 agents ready"), "{}", o.stdout);

    let start = Instant::now();
    let o = meshctl(
        &kc,
        &["status", "--context", "east", "--wait", "--wait-timeout", "1s"],
    );
    let e = one_line_error(&o);
    assert!(
        start.elapsed() < Duration::from_secs(15),
        "took {:?}",
        start.elapsed()
    );
    assert!(
        e.contains(
            "timed out after 1s waiting for an address of Service fleetmesh-clustermesh-apiserver and the agents \
             of DaemonSet fleetmesh-agent (2/3 ready)"
        ),
        "{e}"
    );
}

#[test]
fn connect_writes_both_clusters_and_disconnect_removes_them() {
    let mut east = KubeEmulator::start(&[]);
    let mut west = KubeEmulator::start(&[]);
    seed(&mut east, &Spec::new("east", 1));
    let mut w = Spec::new("west", 2);
    w.service_type = "LoadBalancer";
    w.lb_ip = Some("203.0.113.20");
    seed(&mut west, &w);
    let dir = tempfile::tempdir().expect("tempdir");
    let kc = kubeconfig(dir.path(), &[("east", east.port), ("west", west.port)]);

    let o = meshctl(
        &kc,
        &["connect", "--context", "east", "--destination-context", "west"],
    );
    assert!(o.ok, "{}", o.stderr);
    assert!(o.stdout.contains("connected cluster east (id 1"), "{}", o.stdout);

    // east knows west: config entry in the peer format, certificates in the certs Secret.
    let cfg = secret(&mut east, "fleetmesh-clustermesh");
    let entry: meshctl::clustermesh::PeerConfig =
        mesh_model::yaml::from_str(&unb64(&cfg["west"])).expect("peer format");
    assert_eq!(entry.endpoints, ["https://203.0.113.20:2379"]);
    assert_eq!(entry.trusted_ca_file, Path::new(CERTS_DIR).join("west.ca.crt"));
    assert_eq!(entry.cert_file, Path::new(CERTS_DIR).join("west.tls.crt"));
    assert_eq!(entry.key_file, Path::new(CERTS_DIR).join("west.tls.key"));
    let certs = secret(&mut east, "fleetmesh-clustermesh-remote-certs");
    assert_eq!(unb64(&certs["west.ca.crt"]), "CA of west");
    assert_eq!(unb64(&certs["west.tls.crt"]), "remote cert of west");
    assert_eq!(unb64(&certs["west.tls.key"]), "remote key of west");
    assert!(unb64(&certs["west.cluster.yaml"]).contains("id: 2"));

    // And west knows east, through east's node port.
    let cfg = secret(&mut west, "fleetmesh-clustermesh");
    let entry: meshctl::clustermesh::PeerConfig =
        mesh_model::yaml::from_str(&unb64(&cfg["east"])).expect("peer format");
    assert_eq!(entry.endpoints, ["https://10.0.0.1:32379"]);
    let certs = secret(&mut west, "fleetmesh-clustermesh-remote-certs");
    assert_eq!(unb64(&certs["east.tls.key"]), "remote key of east");

    let o = meshctl(&kc, &["status", "--context", "west", "--json"]);
    let v: Value = serde_json::from_str(&o.stdout).expect("JSON");
    assert_eq!(
        v["peers"],
        json!([{"name": "east", "id": 1, "endpoints": ["https://10.0.0.1:32379"], "tls": true, "error": null}])
    );
    let o = meshctl(&kc, &["status", "--context", "east"]);
    assert!(
        o.stdout.contains("west  2   yes  https://203.0.113.20:2379"),
        "{}",
        o.stdout
    );

    // Connecting again is fine (same name and id).
    let o = meshctl(
        &kc,
        &["connect", "--context", "east", "--destination-context", "west"],
    );
    assert!(o.ok, "{}", o.stderr);

    let o = meshctl(
        &kc,
        &["disconnect", "--context", "west", "--destination-context", "east"],
    );
    assert!(o.ok, "{}", o.stderr);
    assert!(
        o.stdout.contains("disconnected cluster west and cluster east"),
        "{}",
        o.stdout
    );
    for (emu, peer) in [(&mut east, "west"), (&mut west, "east")] {
        let cfg = secret(emu, "fleetmesh-clustermesh");
        assert!(cfg.get(peer).is_none(), "{cfg}");
        let certs = secret(emu, "fleetmesh-clustermesh-remote-certs");
        assert!(
            certs
                .as_object()
                .is_none_or(|m| !m.keys().any(|k| k.starts_with(peer))),
            "{certs}"
        );
    }
    let o = meshctl(
        &kc,
        &["disconnect", "--context", "west", "--destination-context", "east"],
    );
    assert!(
        o.ok && o.stdout.contains("were not connected"),
        "{}{}",
        o.stdout,
        o.stderr
    );
}

#[test]
fn connect_without_tls_writes_http_endpoints_and_takes_endpoint_overrides() {
    let mut east = KubeEmulator::start(&[]);
    let mut west = KubeEmulator::start(&[]);
    let mut e = Spec::new("east", 1);
    e.tls = false;
    seed(&mut east, &e);
    let mut w = Spec::new("west", 2);
    w.tls = false;
    w.service_type = "LoadBalancer";
    seed(&mut west, &w);
    let dir = tempfile::tempdir().expect("tempdir");
    let kc = kubeconfig(dir.path(), &[("east", east.port), ("west", west.port)]);

    // west's LoadBalancer has no address yet.
    let o = meshctl(
        &kc,
        &["connect", "--context", "east", "--destination-context", "west"],
    );
    let err = one_line_error(&o);
    assert!(
        err.contains(
            "context \"west\": peers cannot reach Service fleetmesh-clustermesh-apiserver yet: the LoadBalancer has \
             no ingress address yet"
        ),
        "{err}"
    );
    let o = meshctl(
        &kc,
        &[
            "connect",
            "--context",
            "east",
            "--destination-context",
            "west",
            "--destination-endpoint",
            "https://198.51.100.7:2379",
        ],
    );
    let err = one_line_error(&o);
    assert!(
        err.contains("is not an http://HOST:PORT URL (TLS is off there)"),
        "{err}"
    );

    let o = meshctl(
        &kc,
        &[
            "connect",
            "--context",
            "east",
            "--destination-context",
            "west",
            "--destination-endpoint",
            "http://198.51.100.7:2379",
        ],
    );
    assert!(o.ok, "{}", o.stderr);
    let cfg = secret(&mut east, "fleetmesh-clustermesh");
    assert_eq!(unb64(&cfg["west"]), "endpoints:\n- http://198.51.100.7:2379\n");
    let cfg = secret(&mut west, "fleetmesh-clustermesh");
    assert_eq!(unb64(&cfg["east"]), "endpoints:\n- http://10.0.0.1:32379\n");
    // No certificates without TLS, only the peer's name and id.
    let certs = secret(&mut east, "fleetmesh-clustermesh-remote-certs");
    assert_eq!(
        certs.as_object().map(|m| m.keys().cloned().collect::<Vec<_>>()),
        Some(vec!["west.cluster.yaml".to_owned()])
    );
}

#[test]
fn connect_refuses_an_id_clash_and_changes_nothing() {
    let mut east = KubeEmulator::start(&[]);
    let mut west = KubeEmulator::start(&[]);
    seed(&mut east, &Spec::new("east", 1));
    seed(&mut west, &Spec::new("west", 1));
    let dir = tempfile::tempdir().expect("tempdir");
    let kc = kubeconfig(dir.path(), &[("east", east.port), ("west", west.port)]);

    let o = meshctl(
        &kc,
        &["connect", "--context", "east", "--destination-context", "west"],
    );
    let e = one_line_error(&o);
    assert!(
        e.contains("both have id 1: cluster ids must be unique in the mesh"),
        "{e}"
    );
    assert_eq!(secret(&mut east, "fleetmesh-clustermesh"), json!({}));
    assert_eq!(secret(&mut west, "fleetmesh-clustermesh"), json!({}));

    // west with id 2, but east is connected to north (id 2) already.
    let mut west2 = KubeEmulator::start(&[]);
    seed(&mut west2, &Spec::new("west", 2));
    east.command(
        &json!({"op": "patch", "path": format!("/api/v1/namespaces/{NS}/secrets/fleetmesh-clustermesh"),
        "object": {"data": {"north": b64("endpoints:\n- http://192.0.2.1:32379\n")}}}),
    );
    create(
        &mut east,
        &format!("/api/v1/namespaces/{NS}/secrets"),
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": meta("fleetmesh-clustermesh-remote-certs"),
               "data": {"north.cluster.yaml": b64("name: north\nid: 2\n")}}),
    );
    let kc = kubeconfig(dir.path(), &[("east", east.port), ("west", west2.port)]);
    let o = meshctl(
        &kc,
        &["connect", "--context", "east", "--destination-context", "west"],
    );
    let e = one_line_error(&o);
    assert!(
        e.contains("cluster \"west\" has id 2, which cluster \"north\" (connected to \"east\", context east) already uses"),
        "{e}"
    );
    assert_eq!(secret(&mut west2, "fleetmesh-clustermesh"), json!({}));
    assert!(secret(&mut east, "fleetmesh-clustermesh").get("west").is_none());
}

#[test]
fn unreachable_unknown_and_uninstalled_clusters_give_one_clear_line() {
    let empty = KubeEmulator::start(&[]);
    // A port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let dir = tempfile::tempdir().expect("tempdir");
    let kc = kubeconfig(dir.path(), &[("down", closed), ("empty", empty.port)]);

    let o = meshctl(&kc, &["status", "--context", "down"]);
    let e = one_line_error(&o);
    assert!(
        e.contains(&format!(
            "cannot reach the Kubernetes API server of context \"down\" at http://127.0.0.1:{closed}/"
        )) && e.contains("`kubectl --context down cluster-info`"),
        "{e}"
    );
    assert_eq!(e.lines().count(), 1, "{e}");

    let o = meshctl(&kc, &["status", "--context", "nope"]);
    let e = one_line_error(&o);
    assert!(
        e.contains("context \"nope\" is not in the kubeconfig (it has: down, empty)"),
        "{e}"
    );

    let o = meshctl(
        &kc,
        &["connect", "--context", "empty", "--destination-context", "down"],
    );
    let e = one_line_error(&o);
    assert!(
        e.contains("context \"empty\": no ConfigMap kube-system/fleetmesh-config: is the fleetmesh chart installed there?"),
        "{e}"
    );

    let o = meshctl(&kc, &["enable", "--context", "empty"]);
    let e = one_line_error(&o);
    assert!(e.contains("is the fleetmesh chart installed there?"), "{e}");
}

#[test]
fn enable_patches_the_service_type_and_names_missing_tls_secrets() {
    let mut emu = KubeEmulator::start(&[]);
    let mut s = Spec::new("east", 1);
    s.remote_client = false;
    seed(&mut emu, &s);
    let dir = tempfile::tempdir().expect("tempdir");
    let kc = kubeconfig(dir.path(), &[("east", emu.port)]);

    let o = meshctl(
        &kc,
        &["enable", "--context", "east", "--service-type", "LoadBalancer"],
    );
    assert!(!o.ok);
    assert!(
        o.stderr.contains(
            "kubectl --context east -n kube-system create secret generic fleetmesh-clustermesh-remote-client \
             --type kubernetes.io/tls --from-file=ca.crt=east/ca.crt --from-file=tls.crt=east/remote.crt \
             --from-file=tls.key=east/remote.key"
        ) && o
            .stderr
            .contains("meshctl clustermesh cluster-certs --ca mesh-ca --cluster east --cluster-id 1"),
        "{}",
        o.stderr
    );
    let svc = emu.command(&json!({"op": "get", "path": format!("/api/v1/namespaces/{NS}/services/fleetmesh-clustermesh-apiserver")}));
    assert_eq!(svc["object"]["spec"]["type"], "LoadBalancer");

    create(
        &mut emu,
        &format!("/api/v1/namespaces/{NS}/secrets"),
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": meta("fleetmesh-clustermesh-remote-client"),
               "data": {"ca.crt": b64("CA"), "tls.crt": b64("C"), "tls.key": b64("K")}}),
    );
    let o = meshctl(
        &kc,
        &["enable", "--context", "east", "--service-type", "LoadBalancer"],
    );
    assert!(o.ok, "{}", o.stderr);
    assert!(
        o.stdout.contains(
            "cluster east (id 1, context east) is ready for the mesh: Service type LoadBalancer, TLS on"
        ),
        "{}",
        o.stdout
    );
}

/// An agent pod of the seeded DaemonSet (selector `a=b`).
fn agent_pod(name: &str, node: &str, phase: &str, labels: &Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": NS, "labels": labels},
           "spec": {"nodeName": node, "containers": [{"name": "mesh-agent", "image": "fleetmesh"}]},
           "status": {"phase": phase}})
}

#[test]
fn cluster_status_names_agents_that_do_not_answer_and_a_chart_without_status_port() {
    let mut emu = KubeEmulator::start(&[]);
    seed(&mut emu, &Spec::new("east", 4));
    let pods = format!("/api/v1/namespaces/{NS}/pods");
    create(
        &mut emu,
        &pods,
        agent_pod("agent-1", "node-1", "Running", &json!({"a": "b"})),
    );
    create(
        &mut emu,
        &pods,
        agent_pod("agent-2", "node-2", "Pending", &json!({"a": "b"})),
    );
    // Not an agent: other labels (kmock ignores label selectors; meshctl must not count it).
    create(
        &mut emu,
        &pods,
        agent_pod("web", "node-1", "Running", &json!({"app": "web"})),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let kc = kubeconfig(dir.path(), &[("east", emu.port)]);

    // A chart from before the status port: said so, not fatal.
    let o = meshctl_top(&kc, &["status", "--context", "east"]);
    assert!(o.ok, "{}", o.stderr);
    assert!(o.stdout.contains("Cluster:  east (id 4)"), "{}", o.stdout);
    assert!(
        o.stdout
            .contains("has no container port named \"status\": upgrade the chart"),
        "{}",
        o.stdout
    );

    // The chart's status port: agent-1 is asked through the pod proxy, whose answer is the API server's 503 (the
    // agent does not listen); agent-2 is not asked while Pending.
    emu.command(
        &json!({"op": "patch", "path": format!("/apis/apps/v1/namespaces/{NS}/daemonsets/fleetmesh-agent"),
        "object": {"spec": {"template": {"spec": {"containers": [{"name": "mesh-agent",
            "ports": [{"name": "status", "containerPort": 9968, "protocol": "TCP"}]}]}}}}}),
    );
    let missing = dir.path().join("nobody.sock");
    emu.command(&json!({"op": "proxy",
        "path": format!("/api/v1/namespaces/{NS}/pods/agent-1:9968/proxy/v1/summary"),
        "unix": missing.display().to_string()}));
    let o = meshctl_top(&kc, &["status", "--context", "east", "--json"]);
    assert!(o.ok, "{}", o.stderr);
    let v: Value = serde_json::from_str(&o.stdout).expect("JSON");
    assert_eq!(v["statusPort"], 9968);
    let agents = v["agents"].as_array().expect("agents");
    assert_eq!(agents.len(), 2, "only the DaemonSet's pods: {agents:?}");
    assert_eq!(agents[0]["pod"], "agent-1");
    let why = agents[0]["unreachable"].as_str().expect("agent-1 did not answer");
    assert!(
        why.contains("HTTP 503") && why.contains("error trying to reach service"),
        "{why}"
    );
    assert_eq!(agents[1]["unreachable"], "pod is Pending");
    let problems: Vec<&str> = v["problems"]
        .as_array()
        .expect("problems")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("agent agent-1 on node-1: pod proxy: HTTP 503")),
        "{problems:?}"
    );
    assert!(
        problems.contains(&"agent agent-2 on node-2: pod is Pending"),
        "{problems:?}"
    );

    let o = meshctl_top(&kc, &["status", "--context", "east"]);
    assert!(o.ok, "{}", o.stderr);
    for want in [
        "0 of 2 pods answered (status port 9968)",
        "Agents not answering:",
        "  - agent-2 on node-2: pod is Pending",
    ] {
        assert!(o.stdout.contains(want), "missing {want:?} in:\n{}", o.stdout);
    }

    // --wait gives up with one line naming what it waited for.
    let o = meshctl_top(
        &kc,
        &["status", "--context", "east", "--wait", "--wait-timeout", "1s"],
    );
    let e = one_line_error(&o);
    assert!(
        e.contains("timed out after 1s waiting for agents to answer and be ready (0 of 2 are)"),
        "{e}"
    );
    // --wait is for a cluster, not for one node's agent.
    let out = Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .args(["status", "--wait"])
        .env_remove("KUBECONFIG")
        .output()
        .expect("run meshctl");
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("--wait needs --context"), "{e}");
}

#[test]
fn load_balancer_hostnames_and_rbac_denials() {
    let mut emu = KubeEmulator::start(&[]);
    let mut s = Spec::new("east", 5);
    s.service_type = "LoadBalancer";
    seed(&mut emu, &s);
    // Cloud load balancers (e.g. AWS) publish a hostname, not an IP.
    emu.command(&json!({"op": "patch",
        "path": format!("/api/v1/namespaces/{NS}/services/fleetmesh-clustermesh-apiserver"),
        "object": {"status": {"loadBalancer": {"ingress": [{"hostname": "east-mesh.elb.example.com"}]}}}}));
    let dir = tempfile::tempdir().expect("tempdir");
    let kc = kubeconfig(dir.path(), &[("east", emu.port)]);
    let o = meshctl(&kc, &["status", "--context", "east", "--json"]);
    assert!(o.ok, "{}", o.stderr);
    let v: Value = serde_json::from_str(&o.stdout).expect("JSON");
    assert_eq!(
        v["apiserver"]["addresses"],
        json!(["east-mesh.elb.example.com:2379"])
    );

    // A context whose user may not read the Secrets: one line naming the object and what to check.
    emu.command(&json!({"op": "respond", "method": "get", "code": 403,
        "path": format!("/api/v1/namespaces/{NS}/secrets/fleetmesh-clustermesh-remote-client"),
        "message": "secrets \"fleetmesh-clustermesh-remote-client\" is forbidden: User \"dev\" cannot get resource \"secrets\""}));
    let o = meshctl(&kc, &["status", "--context", "east"]);
    let e = one_line_error(&o);
    assert!(
        e.contains("context \"east\": not allowed to get Secret kube-system/fleetmesh-clustermesh-remote-client (HTTP 403")
            && e.contains("check the context's credentials and RBAC"),
        "{e}"
    );
}

#[test]
fn rollout_status_of_a_cluster_reads_the_summaries_the_apiserver_writes() {
    let mut emu = KubeEmulator::start(&[]);
    let dir = tempfile::tempdir().expect("tempdir");
    let kc = kubeconfig(dir.path(), &[("east", emu.port)]);
    let rollout = |ns: &str, name: &str, status: Value| {
        json!({"apiVersion": "fleetmesh.io/v1alpha1", "kind": "StagedRollout",
               "metadata": {"name": name, "namespace": ns},
               "spec": {"service": "api", "from": {"names": ["west"]}, "to": {"names": ["east"]},
                        "steps": [{"percent": 50, "holdSeconds": 60}]},
               "status": status})
    };
    create(
        &mut emu,
        "/apis/fleetmesh.io/v1alpha1/namespaces/shop/stagedrollouts",
        rollout(
            "shop",
            "api-to-east",
            json!({"phase": "Valid", "observedGeneration": 1,
            "progress": {"phase": "Halted", "step": 1, "steps": 2, "nodes": 3, "nodesHalted": 1,
                         "haltedNodes": ["east-node-2"]}}),
        ),
    );
    create(
        &mut emu,
        "/apis/fleetmesh.io/v1alpha1/namespaces/shop/stagedrollouts",
        rollout(
            "shop",
            "broken",
            json!({"phase": "Invalid", "message": "spec.steps[0].percent: 150 is above 100"}),
        ),
    );
    create(
        &mut emu,
        "/apis/fleetmesh.io/v1alpha1/namespaces/ops/stagedrollouts",
        rollout("ops", "fresh", json!({})),
    );

    let o = meshctl_top(&kc, &["rollout", "status", "--context", "east", "-n", "shop"]);
    assert!(o.ok, "{}", o.stderr);
    for want in [
        "NAMESPACE  NAME         SERVICE  VALID    PHASE          STEP  NODES  HALTED",
        "shop       api-to-east  api      Valid    Halted         1/2   3      1",
        "shop       broken       api      Invalid  no report yet  -     -      -",
        "shop/broken is invalid: spec.steps[0].percent: 150 is above 100",
        "shop/api-to-east halted on: east-node-2",
    ] {
        assert!(o.stdout.contains(want), "missing {want:?} in:\n{}", o.stdout);
    }
    assert!(!o.stdout.contains("fresh"), "another namespace: {}", o.stdout);

    let o = meshctl_top(&kc, &["rollout", "status", "--context", "east", "-A", "--json"]);
    assert!(o.ok, "{}", o.stderr);
    let v: Value = serde_json::from_str(&o.stdout).expect("JSON");
    let names: Vec<&str> = v
        .as_array()
        .expect("rows")
        .iter()
        .filter_map(|r| r["name"].as_str())
        .collect();
    assert_eq!(
        names,
        ["fresh", "api-to-east", "broken"],
        "sorted by namespace, name"
    );
    assert_eq!(v[1]["progress"]["nodesHalted"], 1);
    assert!(v[0]["progress"].is_null() && v[0]["valid"].is_null());

    let o = meshctl_top(
        &kc,
        &["rollout", "status", "nope", "--context", "east", "-n", "shop"],
    );
    assert!(one_line_error(&o).contains("context \"east\": no StagedRollout nope in namespace shop"));
    // A cluster without the CRDs.
    let bare = KubeEmulator::start(&["--without", "fleetmesh.io/v1alpha1/stagedrollouts"]);
    let bare_dir = dir.path().join("bare");
    std::fs::create_dir(&bare_dir).expect("mkdir");
    let kc2 = kubeconfig(&bare_dir, &[("bare", bare.port)]);
    let o = meshctl_top(&kc2, &["rollout", "status", "x", "--context", "bare"]);
    assert!(
        one_line_error(&o)
            .contains("does not serve StagedRollouts (fleetmesh.io/v1alpha1): install the chart"),
        "{}",
        o.stderr
    );
}
