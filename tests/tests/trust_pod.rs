//! Trust boundaries of a pod on the lab (docs/security.md, "What a pod can and cannot do"): a pod is root in its
//! own network namespace, so it can add addresses to its interface, bind to them and craft any UDP payload. None
//! of that may let it act as anyone else:
//!
//! - a datagram sent from a neighbour's address is dropped on the sender's veth (its reply never reaches the
//!   neighbour) and counted as `drop_source_spoofed`;
//! - a pod under egress deny-all that sends from an unused address of its node's pod range gets nothing out;
//! - a VXLAN datagram a pod sends to its node's port 4789 (chosen VNI, forged inner packet) is never decapsulated
//!   into the overlay (`drop_vxlan_from_pod`);
//! - a `fleetmesh.io/host-ifname` annotation naming the node's underlay interface, or another pod's veth, is
//!   refused with a reason in the agent's status and a counter, and a pod whose annotation turns bad keeps its
//!   working wiring.
//!
//! Every "not delivered" below is read on a socket this test binds inside the receiving pod's namespace, after a
//! positive control proved that the same socket receives what is allowed.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use fleetmesh_tests::{
    Lab, PodInfo, agent_get, agent_socket, eventually, in_netns, pods, udp_line, write_manifest,
};
use serde_json::Value;

/// How long a change may take to reach the agents (policy, manifests).
const CONVERGE: Duration = Duration::from_secs(20);
/// How long a sink socket waits for a datagram that must not come (after the positive control showed that the
/// path delivers in well under a millisecond).
const SILENCE: Duration = Duration::from_secs(2);

const POD_PORTS: &str = r"
      ports:
        - {containerPort: 8080, protocol: TCP}
        - {containerPort: 5353, protocol: UDP}";

fn pod(name: &str, node: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: shop\n  labels: {{app: {name}}}\nspec:\n  nodeName: {node}\n  containers:\n    - name: echo\n      image: fleetmesh/lab-echo{POD_PORTS}\n"
    )
}

/// west: one node with the attacker `mallory`, its neighbour `alice` and `jailed` (egress deny-all later); a second
/// node with `bob`. east: `target`.
fn topology(root: &Path) -> PathBuf {
    let dir = root.join("topology");
    let ns = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n";
    write_manifest(
        &dir,
        "lab.yaml",
        "clusters:\n  - {name: west, id: 1, podCIDR: 10.1.0.0/16, nodes: 2}\n  - {name: east, id: 2, podCIDR: 10.2.0.0/16, nodes: 1}\n",
    )
    .expect("lab.yaml");
    let west = [
        pod("mallory", "west-node-1"),
        pod("alice", "west-node-1"),
        pod("jailed", "west-node-1"),
        pod("bob", "west-node-2"),
    ]
    .concat();
    write_manifest(&dir.join("west"), "workloads.yaml", &format!("{ns}{west}")).expect("west");
    write_manifest(
        &dir.join("east"),
        "workloads.yaml",
        &format!("{ns}{}", pod("target", "east-node-1")),
    )
    .expect("east");
    dir
}

struct Mesh {
    lab: Lab,
    status: Value,
    pods: Vec<PodInfo>,
    files: PathBuf,
}

impl Mesh {
    fn up(name: &str) -> Self {
        let root = Lab::dir_for(&format!("{name}-topology"));
        let _ = std::fs::remove_dir_all(&root);
        let topo = topology(&root);
        let lab = Lab::up(&topo, name).expect("lab up");
        let status = lab.status().expect("status");
        Self {
            pods: pods(&status),
            status,
            files: root.join("files"),
            lab,
        }
    }

    fn pod(&self, name: &str) -> &PodInfo {
        self.pods
            .iter()
            .find(|p| p.id.ends_with(&format!("/shop/{name}")))
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    fn ip(&self, name: &str) -> Ipv4Addr {
        self.pod(name).ip.parse().expect("pod ip")
    }

    /// A node of the lab status.
    fn node(&self, name: &str) -> &Value {
        self.status["clusters"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|c| c["nodes"].as_array().into_iter().flatten())
            .find(|n| n["name"] == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    fn agent_status(&self, node: &str) -> Value {
        let socket = agent_socket(&self.status, node).expect("agent socket");
        serde_json::from_str(&agent_get(&socket, "/v1/status").expect("status")).expect("json")
    }

    /// A datapath counter of `node`'s agent (0 when the agent does not report it).
    fn counter(&self, node: &str, name: &str) -> u64 {
        self.agent_status(node)["datapath"]["counters"][name]
            .as_u64()
            .unwrap_or(0)
    }

    fn apply(&self, cluster: &str, name: &str, text: &str) {
        let f = write_manifest(&self.files, name, text).expect("write");
        self.lab
            .run(&["apply", cluster, &f.display().to_string()])
            .unwrap_or_else(|e| panic!("apply {name} to {cluster}: {e:#}"));
    }

    /// The agents' manifests folder of `cluster` (what they watch).
    fn manifests(&self, cluster: &str) -> PathBuf {
        self.lab.dir.join("clusters").join(cluster).join("manifests")
    }
}

/// Runs `ip ARGS` inside a pod's namespace, as the pod's root would (`ip netns exec`).
fn ip_in_pod(p: &PodInfo, args: &[&str]) {
    let out = Command::new("ip")
        .args(["netns", "exec", &p.netns, "ip"])
        .args(args)
        .output()
        .expect("run ip netns exec");
    assert!(
        out.status.success(),
        "ip {args:?} in {}: {}",
        p.id,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A UDP socket bound to `addr` inside `netns`.
fn bind_in(netns: &str, addr: SocketAddr) -> UdpSocket {
    let s = in_netns(netns, || UdpSocket::bind(addr))
        .expect("enter netns")
        .unwrap_or_else(|e| panic!("bind {addr} in {netns}: {e}"));
    s.set_read_timeout(Some(SILENCE)).expect("read timeout");
    s
}

/// The next datagram on `sink`, or `None` when none arrives within [`SILENCE`].
fn next_datagram(sink: &UdpSocket) -> Option<(Vec<u8>, SocketAddr)> {
    let mut buf = [0u8; 2048];
    sink.recv_from(&mut buf)
        .ok()
        .map(|(n, from)| (buf[..n].to_vec(), from))
}

/// Waits until `node`'s counter `name` is above `before`.
fn counter_rises(m: &Mesh, node: &str, name: &str, before: u64) {
    assert!(
        eventually(CONVERGE, || m.counter(node, name) > before),
        "{node}: counter {name} stayed at {before}"
    );
}

/// Sends `payload` from `from` (an address of `netns`) to `to`.
fn send_from(netns: &str, from: SocketAddr, to: SocketAddr, payload: &[u8]) {
    in_netns(netns, || -> std::io::Result<()> {
        let s = UdpSocket::bind(from)?;
        s.send_to(payload, to)?;
        Ok(())
    })
    .expect("enter netns")
    .unwrap_or_else(|e| panic!("send {from} -> {to} in {netns}: {e}"));
}

#[test]
fn a_pod_cannot_send_from_its_neighbours_address() {
    let m = Mesh::up("trust-spoof");
    let (mallory, alice, target) = (m.pod("mallory"), m.pod("alice"), m.pod("target"));
    let (alice_ip, target_ip) = (m.ip("alice"), m.ip("target"));
    // Positive control: the echo in the other cluster answers mallory, and answers alice on the socket the test
    // listens on (so the spoofed request's reply, if any, would land there).
    assert!(
        eventually(CONVERGE, || udp_line(&mallory.netns, &target.ip, 5353).is_ok()),
        "mallory reaches target"
    );
    let alice_sink = bind_in(&alice.netns, SocketAddr::from((alice_ip, 40123)));
    alice_sink
        .send_to(b"ping\n", SocketAddr::from((target_ip, 5353)))
        .expect("alice asks the echo");
    let (answer, _) = next_datagram(&alice_sink).expect("the echo answers alice's own request");
    assert_eq!(String::from_utf8_lossy(&answer).trim_end(), target.id);

    let before = m.counter("west-node-1", "drop_source_spoofed");
    // Mallory takes alice's address and asks the echo from it.
    ip_in_pod(
        mallory,
        &["addr", "add", &format!("{alice_ip}/32"), "dev", "eth0"],
    );
    for _ in 0..3 {
        send_from(
            &mallory.netns,
            SocketAddr::from((alice_ip, 40123)),
            SocketAddr::from((target_ip, 5353)),
            b"ping\n",
        );
    }
    if let Some((data, from)) = next_datagram(&alice_sink) {
        panic!(
            "the reply to mallory's datagram from alice's address reached alice: {from} sent {:?}",
            String::from_utf8_lossy(&data)
        );
    }
    counter_rises(&m, "west-node-1", "drop_source_spoofed", before);
    let socket = agent_socket(&m.status, "west-node-1").expect("agent socket");
    let flows = agent_get(&socket, "/v1/flows?verdict=dropped").expect("flows");
    assert!(
        flows
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .any(|f| {
                f["reason"] == "drop_source_spoofed"
                    && f["source"]["pod"] == "alice"
                    && f["destination"]["pod"] == "target"
            }),
        "a flow event reports the spoofed datagram with the address it claimed: {flows}"
    );
    // Mallory's own address still works.
    ip_in_pod(
        mallory,
        &["addr", "del", &format!("{alice_ip}/32"), "dev", "eth0"],
    );
    assert_eq!(
        udp_line(&mallory.netns, &target.ip, 5353).expect("mallory from its own address"),
        target.id
    );
}

const DENY_ALL_EGRESS: &str = r"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: jailed-deny-all, namespace: shop}
spec:
  podSelector: {matchLabels: {app: jailed}}
  policyTypes: [Egress]
";

/// The last-but-five host of `cidr` (`a.b.c.d/len`): free in a lab node's slice, which fills from the bottom.
fn unused_host(cidr: &str) -> Ipv4Addr {
    let (base, len) = cidr.split_once('/').expect("a CIDR");
    let base = u32::from(base.parse::<Ipv4Addr>().expect("CIDR address"));
    let len: u32 = len.parse().expect("CIDR length");
    Ipv4Addr::from(base + (1u32 << (32 - len)) - 6)
}

#[test]
fn egress_deny_all_holds_for_every_source_address() {
    let m = Mesh::up("trust-unused");
    let (jailed, target) = (m.pod("jailed"), m.pod("target"));
    let target_ip = m.ip("target");
    let target_sink = bind_in(&target.netns, SocketAddr::from((target_ip, 40200)));
    // Positive control: before any policy, jailed's datagram reaches the test's socket in the other cluster.
    assert!(
        eventually(CONVERGE, || udp_line(&jailed.netns, &target.ip, 5353).is_ok()),
        "jailed reaches target before the policy"
    );
    send_from(
        &jailed.netns,
        SocketAddr::from((m.ip("jailed"), 0)),
        SocketAddr::from((target_ip, 40200)),
        b"control",
    );
    let (data, _) = next_datagram(&target_sink).expect("the control datagram arrives");
    assert_eq!(data, b"control");

    m.apply("west", "deny-all.yaml", DENY_ALL_EGRESS);
    assert!(
        eventually(CONVERGE, || udp_line(&jailed.netns, &target.ip, 5353).is_err()),
        "the egress deny-all is enforced"
    );
    let unused = unused_host(m.node("west-node-1")["podCIDR"].as_str().expect("podCIDR"));
    assert!(
        m.pods.iter().all(|p| p.ip != unused.to_string()),
        "{unused} is some pod's address"
    );
    let before = m.counter("west-node-1", "drop_source_spoofed");
    ip_in_pod(jailed, &["addr", "add", &format!("{unused}/32"), "dev", "eth0"]);
    for _ in 0..3 {
        send_from(
            &jailed.netns,
            SocketAddr::from((unused, 0)),
            SocketAddr::from((target_ip, 40200)),
            b"escaped",
        );
    }
    if let Some((data, from)) = next_datagram(&target_sink) {
        panic!(
            "a datagram of the egress-denied pod from {unused} arrived: {from} sent {:?}",
            String::from_utf8_lossy(&data)
        );
    }
    counter_rises(&m, "west-node-1", "drop_source_spoofed", before);
}

/// The one's complement sum of `data` folded to 16 bits (the IPv4 header checksum when inverted).
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !u16::try_from(sum).expect("folded")
}

/// A VXLAN payload (header with `vni`, then an Ethernet frame to `dst_mac` carrying IPv4/UDP `src` → `dst`).
fn vxlan_payload(vni: u32, dst_mac: [u8; 6], src: SocketAddr, dst: SocketAddr, data: &[u8]) -> Vec<u8> {
    let (SocketAddr::V4(src), SocketAddr::V4(dst)) = (src, dst) else {
        panic!("IPv4 only")
    };
    let mut p = vec![0x08, 0, 0, 0];
    p.extend_from_slice(&(vni << 8).to_be_bytes());
    p.extend_from_slice(&dst_mac);
    p.extend_from_slice(&[0x02, 0, 0, 0, 0xbe, 0xef]);
    p.extend_from_slice(&0x0800u16.to_be_bytes());
    let total = u16::try_from(20 + 8 + data.len()).expect("small");
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0, 1, 0, 0, 64, 17, 0, 0]);
    ip.extend_from_slice(&src.ip().octets());
    ip.extend_from_slice(&dst.ip().octets());
    let csum = checksum(&ip);
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
    p.extend_from_slice(&ip);
    p.extend_from_slice(&src.port().to_be_bytes());
    p.extend_from_slice(&dst.port().to_be_bytes());
    p.extend_from_slice(&u16::try_from(8 + data.len()).expect("small").to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(data);
    p
}

#[test]
fn a_pod_cannot_feed_vxlan_to_its_node() {
    let m = Mesh::up("trust-vxlan");
    let (mallory, alice, bob) = (m.pod("mallory"), m.pod("alice"), m.pod("bob"));
    let alice_ip = m.ip("alice");
    let node_ip: Ipv4Addr = m.node("west-node-1")["underlayIP"]
        .as_str()
        .expect("underlayIP")
        .parse()
        .expect("underlay address");
    let sink = bind_in(&alice.netns, SocketAddr::from((alice_ip, 40300)));
    // Positive control: a datagram of bob (the other node, through the overlay) reaches the socket.
    assert!(
        eventually(CONVERGE, || udp_line(&bob.netns, &alice.ip, 5353).is_ok()),
        "bob reaches alice"
    );
    send_from(
        &bob.netns,
        SocketAddr::from((m.ip("bob"), 0)),
        SocketAddr::from((alice_ip, 40300)),
        b"control",
    );
    let (data, _) = next_datagram(&sink).expect("the control datagram arrives");
    assert_eq!(data, b"control");

    // Mallory wraps a datagram "from target in east" to alice in VXLAN with a VNI of its choice and sends it to
    // its node's VXLAN port, from its own address.
    let forged = vxlan_payload(
        256,
        [
            0x0a,
            0x58,
            alice_ip.octets()[0],
            alice_ip.octets()[1],
            alice_ip.octets()[2],
            alice_ip.octets()[3],
        ],
        SocketAddr::from((m.ip("target"), 5353)),
        SocketAddr::from((alice_ip, 40300)),
        b"forged",
    );
    let before = m.counter("west-node-1", "drop_vxlan_from_pod");
    for _ in 0..3 {
        send_from(
            &mallory.netns,
            SocketAddr::from((m.ip("mallory"), 0)),
            SocketAddr::from((node_ip, 4789)),
            &forged,
        );
    }
    if let Some((data, from)) = next_datagram(&sink) {
        panic!(
            "mallory's VXLAN datagram was decapsulated and delivered to alice: {from} sent {:?}",
            String::from_utf8_lossy(&data)
        );
    }
    counter_rises(&m, "west-node-1", "drop_vxlan_from_pod", before);
}

/// The endpoint `shop/<name>` in `node`'s agent status.
fn endpoint(m: &Mesh, node: &str, name: &str) -> Option<Value> {
    m.agent_status(node)["datapath"]["endpoints"]
        .as_array()?
        .iter()
        .find(|e| e["pod"] == format!("shop/{name}"))
        .cloned()
}

fn refused_with(m: &Mesh, node: &str, name: &str, reason: &str) -> bool {
    endpoint(m, node, name).is_some_and(|e| {
        e["programmed"] == false && e["error"].as_str().is_some_and(|err| err.contains(reason))
    })
}

#[test]
fn host_ifname_annotations_may_name_only_pod_veths() {
    let m = Mesh::up("trust-ifname");
    let (alice, bob) = (m.pod("alice"), m.pod("bob"));
    assert!(
        eventually(CONVERGE, || udp_line(&bob.netns, &alice.ip, 5353).is_ok()),
        "bob reaches alice"
    );
    let alice_if = endpoint(&m, "west-node-1", "alice").expect("alice's endpoint")["ifname"]
        .as_str()
        .expect("ifname")
        .to_owned();
    let refusals = |m: &Mesh| {
        m.agent_status("west-node-1")["datapath"]["endpointRefusals"]
            .as_u64()
            .unwrap_or(0)
    };
    let before = refusals(&m);

    // Two pods the lab did not wire, written straight into the agents' manifests: one names the node's underlay
    // interface, one names alice's veth.
    let slice = m.node("west-node-1")["podCIDR"]
        .as_str()
        .expect("podCIDR")
        .to_owned();
    let (a, b) = (
        unused_host(&slice),
        Ipv4Addr::from(u32::from(unused_host(&slice)) + 1),
    );
    let hijack = |name: &str, ifname: &str, ip: Ipv4Addr| {
        format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: shop\n  annotations: {{fleetmesh.io/host-ifname: {ifname}}}\nspec:\n  nodeName: west-node-1\n  containers: [{{name: c, image: x}}]\nstatus: {{podIP: {ip}, phase: Running}}\n"
        )
    };
    let text = [hijack("underlay", "eth0", a), hijack("thief", &alice_if, b)].concat();
    write_manifest(&m.manifests("west"), "hijack.yaml", &text).expect("write hijack.yaml");
    assert!(
        eventually(CONVERGE, || refused_with(&m, "west-node-1", "underlay", "eth0")),
        "the pod naming eth0 is refused: {:?}",
        endpoint(&m, "west-node-1", "underlay")
    );
    assert!(
        eventually(CONVERGE, || refused_with(
            &m,
            "west-node-1",
            "thief",
            "shop/alice"
        )),
        "the pod naming alice's veth is refused: {:?}",
        endpoint(&m, "west-node-1", "thief")
    );
    assert!(refusals(&m) >= before + 2, "refusals counted");
    // The node's underlay still carries the overlay, alice is still alice.
    assert_eq!(
        udp_line(&bob.netns, &alice.ip, 5353).expect("bob -> alice across nodes"),
        alice.id
    );
    assert!(
        endpoint(&m, "west-node-1", "alice").is_some_and(|e| e["programmed"] == true),
        "alice stays programmed"
    );

    // Alice's own annotation turns bad: refused, and her working wiring stays.
    let workloads = m.manifests("west").join("workloads.yaml");
    let original = std::fs::read_to_string(&workloads).expect("read workloads.yaml");
    assert!(original.contains(&alice_if), "alice's interface in her manifest");
    let tmp = m.manifests("west").join(".workloads.yaml.tmp");
    std::fs::write(&tmp, original.replace(&alice_if, "lo")).expect("write");
    std::fs::rename(&tmp, &workloads).expect("rename");
    assert!(
        eventually(CONVERGE, || refused_with(&m, "west-node-1", "alice", "lo")),
        "alice's new annotation is refused: {:?}",
        endpoint(&m, "west-node-1", "alice")
    );
    for i in 0..5 {
        assert_eq!(
            udp_line(&bob.netns, &alice.ip, 5353).unwrap_or_else(|e| panic!("probe {i}: {e:#}")),
            alice.id,
            "alice keeps working while her annotation is refused"
        );
    }
}
