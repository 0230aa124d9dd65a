//! `meshctl clustermesh` as users run it (the built binary): the material it writes, and clear errors (exit
//! status 1, a message naming the problem, never a panic) for everything that can be wrong.

use std::path::Path;
use std::process::{Command, Output};

fn meshctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .args(args)
        .output()
        .expect("run meshctl")
}

fn ok(args: &[&str]) -> String {
    let out = meshctl(args);
    assert!(
        out.status.success(),
        "meshctl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command that must fail; returns its stderr.
fn fails(args: &[&str]) -> String {
    let out = meshctl(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "meshctl {args:?}: {out:?}");
    assert!(
        !stderr.contains("panicked"),
        "meshctl {args:?} panicked: {stderr}"
    );
    stderr
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn cluster(ca: &Path, out: &Path, name: &str, id: &str, ip: &str) {
    ok(&[
        "clustermesh",
        "cluster-certs",
        "--ca",
        s(ca),
        "--cluster",
        name,
        "--cluster-id",
        id,
        "--server-ip",
        ip,
        "--out",
        s(out),
    ]);
}

#[test]
fn help_explains_the_steps() {
    let help = ok(&["clustermesh", "--help"]);
    for word in [
        "ca",
        "cluster-certs",
        "etcd-init",
        "connect",
        "--client-cert-auth",
    ] {
        assert!(help.contains(word), "{word} missing in:\n{help}");
    }
    let connect = ok(&["clustermesh", "connect", "--help"]);
    for word in ["trusted-ca-file", "cert-file", "key-file", "--config-dir"] {
        assert!(connect.contains(word), "{word} missing in:\n{connect}");
    }
}

#[test]
fn makes_a_mesh_and_connects_clusters() {
    let t = tempfile::tempdir().expect("tempdir");
    let (ca, east, west) = (t.path().join("ca"), t.path().join("east"), t.path().join("west"));
    ok(&["clustermesh", "ca", "create", "--out", s(&ca)]);
    cluster(&ca, &east, "east", "1", "100.64.0.1");
    cluster(&ca, &west, "west", "2", "100.64.0.2");
    for f in [
        "ca.crt",
        "etcd-server.crt",
        "etcd-server.key",
        "apiserver.crt",
        "remote.crt",
        "admin.key",
        "cluster.yaml",
    ] {
        assert!(east.join(f).is_file(), "{f} missing");
    }
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(east.join("remote.key"))
            .expect("key")
            .permissions(),
    );
    assert_eq!(mode & 0o077, 0, "private keys are readable by others: {mode:o}");

    let cm = t.path().join("east-clustermesh");
    ok(&[
        "clustermesh",
        "connect",
        "--from",
        s(&east),
        "--to",
        s(&west),
        "--config-dir",
        s(&cm),
    ]);
    let text = std::fs::read_to_string(cm.join("west")).expect("config for west");
    assert!(text.contains("https://100.64.0.2:2379"), "{text}");
    for key in ["trusted-ca-file:", "cert-file:", "key-file:"] {
        assert!(text.contains(key), "{key} missing:\n{text}");
    }
    assert_eq!(
        std::fs::read(cm.join("west.tls/client.crt")).expect("copied cert"),
        std::fs::read(west.join("remote.crt")).expect("west's remote cert"),
        "A gets B's read-only certificate"
    );

    // Refusals, each naming the problem; nothing is written.
    let err = fails(&[
        "clustermesh",
        "connect",
        "--from",
        s(&east),
        "--to",
        s(&east),
        "--config-dir",
        s(&cm),
    ]);
    assert!(err.contains("to itself"), "{err}");
    let other = t.path().join("other");
    cluster(&ca, &other, "south", "2", "100.64.0.9");
    let err = fails(&[
        "clustermesh",
        "connect",
        "--from",
        s(&east),
        "--to",
        s(&other),
        "--config-dir",
        s(&cm),
    ]);
    assert!(err.contains("id 2") && err.contains("\"west\""), "{err}");
    assert!(!cm.join("south").exists(), "a refused cluster got a config file");
    let same_id = t.path().join("same-id");
    cluster(&ca, &same_id, "north", "1", "100.64.0.3");
    let err = fails(&[
        "clustermesh",
        "connect",
        "--from",
        s(&east),
        "--to",
        s(&same_id),
        "--config-dir",
        s(&cm),
    ]);
    assert!(err.contains("own id"), "{err}");
    let renamed = t.path().join("west2");
    cluster(&ca, &renamed, "west", "7", "100.64.0.7");
    let err = fails(&[
        "clustermesh",
        "connect",
        "--from",
        s(&east),
        "--to",
        s(&renamed),
        "--config-dir",
        s(&cm),
    ]);
    assert!(err.contains("already") && err.contains("--replace"), "{err}");
}

/// `connect --pin-id --pod-cidr --peer-label` writes the pins into the peer file, in the format the agents read.
#[test]
fn connect_pins_what_the_peer_may_claim() {
    let t = tempfile::tempdir().expect("tempdir");
    let (ca, east, west) = (t.path().join("ca"), t.path().join("east"), t.path().join("west"));
    ok(&["clustermesh", "ca", "create", "--out", s(&ca)]);
    cluster(&ca, &east, "east", "1", "100.64.0.1");
    cluster(&ca, &west, "west", "2", "100.64.0.2");
    let cm = t.path().join("east-clustermesh");
    let connect = |extra: &[&str]| {
        let mut args = vec![
            "clustermesh",
            "connect",
            "--from",
            s(&east),
            "--to",
            s(&west),
            "--config-dir",
            s(&cm),
        ];
        args.extend_from_slice(extra);
        args.into_iter().map(str::to_owned).collect::<Vec<_>>()
    };
    let run = |extra: &[&str], good: bool| {
        let args = connect(extra);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        if good {
            return ok(&refs);
        }
        // Refused by meshctl (1) or by its argument parser (2): either way nothing is written.
        let out = meshctl(&refs);
        assert!(!out.status.success(), "{refs:?} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    run(
        &[
            "--pin-id",
            "--pod-cidr",
            "west=10.2.0.0/16",
            "--pod-cidr",
            "west=10.12.0.0/16",
            "--peer-label",
            "west=stage=prod",
        ],
        true,
    );
    let text = std::fs::read_to_string(cm.join("west")).expect("peer file");
    let cfg: mesh_kvstore::peer::RemoteConfig =
        mesh_model::yaml::from_str(&text).expect("the agents' format");
    let cfg = cfg.checked(&cm).expect("checked");
    assert_eq!(cfg.cluster_id, Some(2), "{text}");
    assert_eq!(
        cfg.pod_cidrs,
        Some(vec![
            "10.2.0.0/16".parse().expect("cidr"),
            "10.12.0.0/16".parse().expect("cidr")
        ]),
        "{text}"
    );
    assert_eq!(
        cfg.cluster_labels,
        Some([("stage".to_owned(), "prod".to_owned())].into()),
        "{text}"
    );
    // Without pins, none is written.
    run(&[], true);
    let text = std::fs::read_to_string(cm.join("west")).expect("peer file");
    assert!(
        !text.contains("cluster-id") && !text.contains("pod-cidrs"),
        "{text}"
    );
    // Bad pins are refused, naming the problem.
    let err = run(&["--pod-cidr", "north=10.3.0.0/16"], false);
    assert!(err.contains("\"north\"") && err.contains("not among"), "{err}");
    let err = run(&["--pod-cidr", "west=10.2.0.1/16"], false);
    assert!(err.contains("10.2.0.1/16"), "{err}");
    let err = run(&["--pod-cidr", "west"], false);
    assert!(err.contains("PEER=CIDR"), "{err}");
    let err = run(&["--peer-label", "west=stage"], false);
    assert!(err.contains("KEY=VALUE"), "{err}");
}

#[test]
fn bad_input_gives_clear_errors() {
    let t = tempfile::tempdir().expect("tempdir");
    let ca = t.path().join("ca");
    let out = t.path().join("x");
    let err = fails(&[
        "clustermesh",
        "cluster-certs",
        "--ca",
        s(&ca),
        "--cluster",
        "x",
        "--cluster-id",
        "3",
        "--server-ip",
        "10.0.0.1",
        "--out",
        s(&out),
    ]);
    assert!(err.contains("ca create"), "missing CA: {err}");
    ok(&["clustermesh", "ca", "create", "--out", s(&ca)]);
    let err = fails(&["clustermesh", "ca", "create", "--out", s(&ca)]);
    assert!(err.contains("--force"), "overwriting the CA: {err}");
    let err = fails(&[
        "clustermesh",
        "cluster-certs",
        "--ca",
        s(&ca),
        "--cluster",
        "Bad_Name",
        "--cluster-id",
        "3",
        "--server-ip",
        "10.0.0.1",
        "--out",
        s(&out),
    ]);
    assert!(err.contains("Bad_Name"), "{err}");
    let err = fails(&[
        "clustermesh",
        "cluster-certs",
        "--ca",
        s(&ca),
        "--cluster",
        "x",
        "--cluster-id",
        "3",
        "--out",
        s(&out),
    ]);
    assert!(err.contains("--server-ip"), "no address: {err}");
    let err = fails(&[
        "clustermesh",
        "connect",
        "--from",
        s(&t.path().join("nope")),
        "--to",
        s(&out),
    ]);
    assert!(err.contains("cluster.yaml"), "{err}");
    std::fs::write(ca.join("ca.key"), "not a key").expect("corrupt key");
    let err = fails(&[
        "clustermesh",
        "cluster-certs",
        "--ca",
        s(&ca),
        "--cluster",
        "x",
        "--cluster-id",
        "3",
        "--server-ip",
        "10.0.0.1",
        "--out",
        s(&out),
    ]);
    assert!(err.contains("ca.key"), "{err}");
}

#[test]
fn hub_create_and_connect_write_the_hub_material_and_peer_files() {
    let t = tempfile::tempdir().expect("tempdir");
    let hub = t.path().join("hub");
    let out = ok(&[
        "clustermesh",
        "hub",
        "create",
        "--member-ip",
        "10.9.0.1",
        "--member-ip",
        "10.9.0.2",
        "--member-ip",
        "10.9.0.3",
        "--out",
        s(&hub),
    ]);
    assert!(out.contains("3 members"), "{out}");
    for f in [
        "ca.crt",
        "ca.key",
        "member-1.crt",
        "member-3.key",
        "admin.crt",
        "hub.yaml",
    ] {
        assert!(hub.join(f).is_file(), "{f} missing");
    }
    let info = meshctl::hub::HubInfo::read(&hub).expect("hub.yaml");
    assert_eq!(
        info.endpoints(),
        [
            "https://10.9.0.1:2379",
            "https://10.9.0.2:2379",
            "https://10.9.0.3:2379"
        ]
    );
    // The member certificates carry the etcd server's and a client's purposes.
    let pem = std::fs::read(hub.join("member-2.crt")).expect("member cert");
    let (_, p) = x509_parser::pem::parse_x509_pem(&pem).expect("pem");
    let cert = p.parse_x509().expect("x509");
    let eku = cert.extended_key_usage().expect("eku").expect("present").value;
    assert!(eku.server_auth && eku.client_auth);

    // `hub connect` from what `hub join` leaves (written here by hand: join needs the hub's etcd).
    let east = t.path().join("east-hub");
    std::fs::create_dir_all(&east).expect("mkdir");
    for f in ["ca.crt", "reader.crt", "reader.key"] {
        std::fs::copy(hub.join("admin.crt"), east.join(f)).expect("copy");
    }
    std::fs::write(east.join("cluster.yaml"), "name: east\nid: 1\n").expect("write");
    std::fs::create_dir_all(hub.join("clusters")).expect("mkdir");
    for (name, id, labels) in [
        ("east", 1, ""),
        ("west", 2, "labels: {region: eu}\n"),
        ("north", 3, ""),
    ] {
        std::fs::write(
            hub.join("clusters").join(format!("{name}.yaml")),
            format!("name: {name}\nid: {id}\n{labels}"),
        )
        .expect("write");
    }
    let cfg = t.path().join("cfg");
    let out = ok(&[
        "clustermesh",
        "hub",
        "connect",
        "--hub",
        s(&hub),
        "--certs",
        s(&east),
        "--config-dir",
        s(&cfg),
        "--pin-id",
    ]);
    assert!(
        out.contains("north") && out.contains("west") && !out.contains("/east\n"),
        "{out}"
    );
    let west = mesh_kvstore::peer::read_config_dir(&cfg, "east");
    assert!(west.1.is_empty(), "{:?}", west.1);
    let w = &west.0["west"];
    assert_eq!(w.prefix.as_deref(), Some("fleetmesh/clusters/west"));
    assert_eq!(w.endpoints, info.endpoints());
    assert_eq!(w.cluster_id, Some(2));
    assert_eq!(
        w.cluster_labels,
        Some([("region".to_owned(), "eu".to_owned())].into()),
        "the labels west joined with are pinned"
    );
    assert_eq!(west.0["north"].cluster_labels, None, "no labels, no pin");
    assert_eq!(west.0.len(), 2, "a file per other cluster of the hub");
}

#[test]
fn hub_verbs_refuse_bad_input_clearly() {
    let t = tempfile::tempdir().expect("tempdir");
    let hub = t.path().join("hub");
    let err = fails(&["clustermesh", "hub", "create", "--out", s(&hub)]);
    assert!(err.contains("--member-ip"), "no members: {err}");
    let err = fails(&[
        "clustermesh",
        "hub",
        "create",
        "--member-ip",
        "10.9.0.1",
        "--member-ip",
        "10.9.0.1",
        "--out",
        s(&hub),
    ]);
    assert!(err.contains("given twice"), "{err}");
    ok(&[
        "clustermesh",
        "hub",
        "create",
        "--member-ip",
        "10.9.0.1",
        "--out",
        s(&hub),
    ]);
    let err = fails(&[
        "clustermesh",
        "hub",
        "create",
        "--member-ip",
        "10.9.0.1",
        "--out",
        s(&hub),
    ]);
    assert!(err.contains("--force"), "overwriting a hub: {err}");
    let err = fails(&[
        "clustermesh",
        "hub",
        "init",
        "--hub",
        s(&t.path().join("nothing")),
    ]);
    assert!(err.contains("hub create"), "not a hub folder: {err}");
    // Names and ids are unique in the hub: refused before the hub is contacted (nothing listens here).
    std::fs::write(hub.join("clusters").join("west.yaml"), "name: west\nid: 2\n").expect("write");
    let out = t.path().join("x");
    let err = fails(&[
        "clustermesh",
        "hub",
        "join",
        "--hub",
        s(&hub),
        "--cluster",
        "east",
        "--cluster-id",
        "2",
        "--out",
        s(&out),
    ]);
    assert!(
        err.contains("\"west\" has id 2") && err.contains("nothing was changed"),
        "{err}"
    );
    let err = fails(&[
        "clustermesh",
        "hub",
        "join",
        "--hub",
        s(&hub),
        "--cluster",
        "west",
        "--cluster-id",
        "7",
        "--out",
        s(&out),
    ]);
    assert!(err.contains("--replace"), "{err}");
    let err = fails(&[
        "clustermesh",
        "hub",
        "join",
        "--hub",
        s(&hub),
        "--cluster",
        "Bad_Name",
        "--cluster-id",
        "7",
        "--out",
        s(&out),
    ]);
    assert!(err.contains("Bad_Name"), "{err}");
    assert!(!out.exists(), "nothing written for a refused join");
    let err = fails(&[
        "clustermesh",
        "hub",
        "connect",
        "--hub",
        s(&hub),
        "--certs",
        s(&out),
        "--config-dir",
        s(&t.path().join("c")),
    ]);
    assert!(err.contains("hub join"), "not a joined cluster's folder: {err}");
}

#[test]
fn cluster_ids_are_1_to_4095_for_cluster_certs_and_hub_join() {
    let t = tempfile::tempdir().expect("tempdir");
    let (ca, out) = (t.path().join("ca"), t.path().join("out"));
    ok(&["clustermesh", "ca", "create", "--out", s(&ca)]);
    for id in ["1", "4095"] {
        cluster(&ca, &out.join(id), "west", id, "100.64.15.255");
        let yaml = std::fs::read_to_string(out.join(id).join("cluster.yaml")).expect("cluster.yaml");
        assert!(yaml.contains(&format!("id: {id}")), "{yaml}");
    }
    // Beyond the edges: a usage error naming the flag and the range, before anything is written.
    for id in ["0", "4096"] {
        for args in [
            vec![
                "clustermesh",
                "cluster-certs",
                "--ca",
                s(&ca),
                "--cluster",
                "west",
                "--cluster-id",
                id,
                "--server-ip",
                "100.64.0.2",
                "--out",
                s(&out),
            ],
            vec![
                "clustermesh",
                "hub",
                "join",
                "--hub",
                s(&ca),
                "--cluster",
                "west",
                "--cluster-id",
                id,
                "--out",
                s(&out),
            ],
        ] {
            let o = meshctl(&args);
            let stderr = String::from_utf8_lossy(&o.stderr);
            assert_eq!(o.status.code(), Some(2), "{args:?}: {stderr}");
            assert!(
                stderr.contains("--cluster-id") && stderr.contains(&format!("{id} is not in 1..=4095")),
                "{args:?}: {stderr}"
            );
        }
    }
    assert!(!out.join("cluster.yaml").exists(), "a refused id wrote material");
}
