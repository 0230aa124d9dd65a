//! Datapath integration tests (need root with CAP_BPF / CAP_NET_ADMIN).
//!
//! - `BPF_PROG_TEST_RUN` on crafted frames for both programs: verdict, output bytes and counters.
//! - Real traffic through network namespaces created here (unique names with the pid, removed by a guard on
//!   drop, also when a test fails): same node via `bpf_redirect_peer`, and two nodes over a VXLAN overlay.
use std::{
    fs::File,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    process::Command,
    time::{Duration, Instant},
};

use ipnet::Ipv4Net;
use mesh_agent::{
    datapath::{Datapath, DatapathError},
    netdev,
};
use mesh_common::{
    Counter, FAMILY_IPV4, IpcacheEntry, LocalEndpoint, NodeConfig, ipcache_flags, pod_mac_for_ipv4,
};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

const FROM_POD: &str = mesh_common::programs::FROM_POD;
const FROM_OVERLAY: &str = mesh_common::programs::FROM_OVERLAY;

const HOST_MAC: [u8; 6] = [0xee, 0xee, 0xee, 0, 0, 6];

// ---------------------------------------------------------------------------------------------------------------
// Crafted frames
// ---------------------------------------------------------------------------------------------------------------

/// Ethernet + IPv4 (IHL `ihl`, options zero-filled) + UDP header + `payload` bytes, from `src` to `dst`.
fn udp_frame(src: Ipv4Addr, dst: Ipv4Addr, ihl: u8, payload: usize) -> Vec<u8> {
    let ip_hlen = usize::from(ihl) * 4;
    let total = ip_hlen + 8 + payload;
    let mut f = vec![0u8; 14 + total];
    f[0..6].copy_from_slice(&HOST_MAC);
    f[6..12].copy_from_slice(&pod_mac_for_ipv4(src.octets()));
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    f[14] = 0x40 | (ihl & 0x0f);
    f[16..18].copy_from_slice(&u16::try_from(total).unwrap().to_be_bytes());
    f[22] = 64;
    f[23] = 17;
    f[26..30].copy_from_slice(&src.octets());
    f[30..34].copy_from_slice(&dst.octets());
    let l4 = 14 + ip_hlen;
    f[l4..l4 + 2].copy_from_slice(&40000u16.to_be_bytes());
    f[l4 + 2..l4 + 4].copy_from_slice(&5000u16.to_be_bytes());
    f[l4 + 4..l4 + 6].copy_from_slice(&u16::try_from(8 + payload).unwrap().to_be_bytes());
    for (i, b) in f[l4 + 8..].iter_mut().enumerate() {
        *b = u8::try_from(i % 251).unwrap();
    }
    f
}

fn arp_request() -> Vec<u8> {
    let mut f = vec![0u8; 42];
    f[0..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&pod_mac_for_ipv4([10, 1, 0, 2]));
    f[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    f
}

const POD_A: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 2);
const POD_B: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 3);
const REMOTE_POD: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 7);
const REMOTE_NODE: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 3);

fn endpoint(ip: Ipv4Addr, ifindex: u32, identity: u32) -> LocalEndpoint {
    LocalEndpoint {
        ifindex,
        identity,
        pod_mac: pod_mac_for_ipv4(ip.octets()),
        host_mac: HOST_MAC,
    }
}

/// A datapath with pods A and B local, 10.1.0.0/24 local, 10.2.0.0/16 behind `REMOTE_NODE`; nothing attached.
fn loaded() -> Datapath {
    let mut dp = Datapath::load().expect("load datapath");
    dp.upsert_endpoint(POD_A, endpoint(POD_A, 1, 0x0100_0042))
        .unwrap();
    dp.upsert_endpoint(POD_B, endpoint(POD_B, 1, 7)).unwrap();
    dp.upsert_ipcache(
        "10.1.0.0/24".parse().unwrap(),
        IpcacheEntry {
            flags: ipcache_flags::LOCAL_NODE,
            family: FAMILY_IPV4,
            ..Default::default()
        },
    )
    .unwrap();
    dp.upsert_ipcache(
        "10.2.0.0/16".parse().unwrap(),
        IpcacheEntry {
            tunnel_endpoint: u32::from(REMOTE_NODE),
            cluster_id: 2,
            family: FAMILY_IPV4,
            ..Default::default()
        },
    )
    .unwrap();
    dp
}

/// Counters that are not zero, for compact assertions.
fn nonzero(dp: &Datapath) -> Vec<(Counter, u64)> {
    dp.counters()
        .unwrap()
        .into_iter()
        .filter(|(_, n)| *n != 0)
        .collect()
}

// ---------------------------------------------------------------------------------------------------------------
// BPF_PROG_TEST_RUN
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn from_pod_local_destination_rewrites_macs_and_redirects_to_peer() {
    let mut dp = loaded();
    let frame = udp_frame(POD_A, POD_B, 5, 32);
    let out = dp.test_run(FROM_POD, &frame).unwrap();
    assert_eq!(out.return_value, TC_ACT_REDIRECT);
    assert_eq!(out.packet.len(), frame.len());
    assert_eq!(
        out.packet[0..6],
        pod_mac_for_ipv4(POD_B.octets()),
        "destination MAC = pod B"
    );
    assert_eq!(out.packet[6..12], HOST_MAC, "source MAC = host-side veth");
    assert_eq!(out.packet[12..], frame[12..], "nothing after the MACs changes");
    assert_eq!(nonzero(&dp), [(Counter::FwdLocal, 1)]);
}

#[test]
fn from_pod_honours_ip_options() {
    let mut dp = loaded();
    for ihl in 6..=15 {
        let frame = udp_frame(POD_A, POD_B, ihl, 4);
        let out = dp.test_run(FROM_POD, &frame).unwrap();
        assert_eq!(out.return_value, TC_ACT_REDIRECT, "ihl {ihl}");
        assert_eq!(out.packet[0..6], pod_mac_for_ipv4(POD_B.octets()), "ihl {ihl}");
    }
    assert_eq!(nonzero(&dp), [(Counter::FwdLocal, 10)]);
}

#[test]
fn from_pod_remote_destination_sets_tunnel_key_and_redirects_to_vxlan() {
    let mut dp = loaded();
    dp.set_node_config(NodeConfig {
        vxlan_ifindex: 1,
        node_ipv4: u32::from(Ipv4Addr::new(172, 18, 0, 2)),
        ..Default::default()
    })
    .unwrap();
    let frame = udp_frame(POD_A, REMOTE_POD, 5, 32);
    let out = dp.test_run(FROM_POD, &frame).unwrap();
    // bpf_skb_set_tunnel_key works on any skb (it attaches a metadata dst), so test_run sees the full path.
    assert_eq!(out.return_value, TC_ACT_REDIRECT);
    assert_eq!(
        out.packet, frame,
        "encapsulation is the VXLAN device's job: the frame is unchanged"
    );
    assert_eq!(nonzero(&dp), [(Counter::FwdTunnel, 1)]);
}

#[test]
fn from_pod_remote_destination_without_vxlan_device_drops() {
    let mut dp = loaded();
    let out = dp
        .test_run(FROM_POD, &udp_frame(POD_A, REMOTE_POD, 5, 32))
        .unwrap();
    assert_eq!(out.return_value, TC_ACT_SHOT);
    dp.set_node_config(NodeConfig::default()).unwrap();
    let out = dp
        .test_run(FROM_POD, &udp_frame(POD_A, REMOTE_POD, 5, 32))
        .unwrap();
    assert_eq!(out.return_value, TC_ACT_SHOT);
    assert_eq!(nonzero(&dp), [(Counter::DropNoTunnel, 2)]);
}

#[test]
fn from_pod_unknown_or_local_node_destination_passes_to_the_stack() {
    let mut dp = loaded();
    // Not in the ipcache at all.
    let frame = udp_frame(POD_A, Ipv4Addr::new(192, 0, 2, 1), 5, 32);
    let out = dp.test_run(FROM_POD, &frame).unwrap();
    assert_eq!(out.return_value, TC_ACT_OK);
    assert_eq!(out.packet, frame);
    // In the local node's prefix but not an endpoint.
    let out = dp
        .test_run(FROM_POD, &udp_frame(POD_A, Ipv4Addr::new(10, 1, 0, 99), 5, 32))
        .unwrap();
    assert_eq!(out.return_value, TC_ACT_OK);
    assert_eq!(nonzero(&dp), [(Counter::PassStack, 2)]);
}

#[test]
fn from_pod_non_ipv4_passes_to_the_stack() {
    let mut dp = loaded();
    let arp = arp_request();
    let out = dp.test_run(FROM_POD, &arp).unwrap();
    assert_eq!(out.return_value, TC_ACT_OK);
    assert_eq!(out.packet, arp);
    assert_eq!(nonzero(&dp), [(Counter::PassStack, 1)]);
}

#[test]
fn from_pod_drops_malformed_ipv4() {
    let mut dp = loaded();
    let good = udp_frame(POD_A, POD_B, 5, 32);
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("truncated IPv4 payload", good[..34].to_vec()),
        ("total length beyond the frame", good[..good.len() - 1].to_vec()),
    ];
    for ihl in 0..5 {
        let mut f = good.clone();
        f[14] = 0x40 | ihl;
        cases.push(("ihl below 5", f));
    }
    let mut v6 = good.clone();
    v6[14] = 0x65;
    cases.push(("version 6 under the IPv4 EtherType", v6));
    let mut short_total = good;
    short_total[16..18].copy_from_slice(&19u16.to_be_bytes());
    cases.push(("total length below header length", short_total));
    let mut options_past_end = udp_frame(POD_A, POD_B, 5, 0);
    options_past_end[14] = 0x4f;
    cases.push(("IHL 15 in a 28-byte packet", options_past_end));

    for (what, frame) in &cases {
        let out = dp
            .test_run(FROM_POD, frame)
            .unwrap_or_else(|e| panic!("{what}: {e:?}"));
        assert_eq!(out.return_value, TC_ACT_SHOT, "{what}");
    }
    let n = u64::try_from(cases.len()).unwrap();
    assert_eq!(nonzero(&dp), [(Counter::DropMalformed, n)]);
}

#[test]
fn frames_the_kernel_refuses_to_test_run_never_reach_the_program() {
    // BPF_PROG_TEST_RUN refuses (EINVAL) skb frames shorter than Ethernet, and IPv4 frames shorter than Ethernet
    // plus a minimal IPv4 header. The program's own handling of both is covered by mesh-ebpf's host tests.
    let mut dp = loaded();
    let ipv4 = udp_frame(POD_A, POD_B, 5, 32);
    for frame in [&[0u8; 10][..], &ipv4[..30]] {
        let err = dp.test_run(FROM_POD, frame).unwrap_err();
        assert!(matches!(err, DatapathError::TestRun { .. }), "{err:?}");
        assert!(err.to_string().contains(FROM_POD), "{err}");
    }
    assert_eq!(nonzero(&dp), []);
}

#[test]
fn from_overlay_without_tunnel_metadata_drops() {
    let mut dp = loaded();
    let frame = udp_frame(REMOTE_POD, POD_A, 5, 32);
    let out = dp.test_run(FROM_OVERLAY, &frame).unwrap();
    assert_eq!(out.return_value, TC_ACT_SHOT);
    assert_eq!(out.packet, frame);
    assert_eq!(nonzero(&dp), [(Counter::DropNoTunnelKey, 1)]);
}

#[test]
fn unknown_program_is_named_in_the_error() {
    let mut dp = loaded();
    let err = dp.test_run("no_such_prog", &arp_request()).unwrap_err();
    assert!(err.to_string().contains("no_such_prog"), "{err}");
}

// ---------------------------------------------------------------------------------------------------------------
// Map API
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn endpoint_map_round_trip_and_absent_removal() {
    let mut dp = Datapath::load().unwrap();
    assert_eq!(dp.endpoints().unwrap(), []);
    dp.upsert_endpoint(POD_B, endpoint(POD_B, 4, 1)).unwrap();
    dp.upsert_endpoint(POD_A, endpoint(POD_A, 3, 2)).unwrap();
    dp.upsert_endpoint(POD_A, endpoint(POD_A, 5, 2)).unwrap();
    assert_eq!(
        dp.endpoints().unwrap(),
        [(POD_A, endpoint(POD_A, 5, 2)), (POD_B, endpoint(POD_B, 4, 1))]
    );
    dp.remove_endpoint(POD_A).unwrap();
    dp.remove_endpoint(POD_A).unwrap();
    assert_eq!(dp.endpoints().unwrap(), [(POD_B, endpoint(POD_B, 4, 1))]);
}

#[test]
fn ipcache_round_trip_truncates_host_bits_and_removal_is_exact() {
    let mut dp = Datapath::load().unwrap();
    let remote = IpcacheEntry {
        tunnel_endpoint: u32::from(REMOTE_NODE),
        family: FAMILY_IPV4,
        ..Default::default()
    };
    dp.upsert_ipcache("10.2.3.4/16".parse().unwrap(), remote).unwrap();
    dp.upsert_ipcache("10.2.3.0/24".parse().unwrap(), IpcacheEntry::default())
        .unwrap();
    let net = |s: &str| s.parse::<Ipv4Net>().unwrap();
    assert_eq!(
        dp.ipcache().unwrap(),
        [
            (net("10.2.0.0/16"), remote),
            (net("10.2.3.0/24"), IpcacheEntry::default())
        ]
    );
    dp.remove_ipcache(net("10.2.0.0/24")).unwrap(); // not present: no error, nothing removed
    assert_eq!(dp.ipcache().unwrap().len(), 2);
    dp.remove_ipcache(net("10.2.3.0/24")).unwrap();
    assert_eq!(dp.ipcache().unwrap(), [(net("10.2.0.0/16"), remote)]);
}

#[test]
fn node_config_round_trip_and_counters_start_at_zero() {
    let mut dp = Datapath::load().unwrap();
    assert_eq!(dp.node_config().unwrap(), NodeConfig::default());
    let cfg = NodeConfig {
        vxlan_ifindex: 12,
        node_ipv4: 0xac12_0002,
        cluster_id: 3,
        ..Default::default()
    };
    dp.set_node_config(cfg).unwrap();
    assert_eq!(dp.node_config().unwrap(), cfg);
    let counters = dp.counters().unwrap();
    assert_eq!(counters.iter().map(|(c, _)| *c).collect::<Vec<_>>(), Counter::ALL);
    assert!(counters.iter().all(|(_, n)| *n == 0));
}

#[test]
fn attaching_to_a_missing_interface_names_it() {
    let mut dp = Datapath::load().unwrap();
    let err = dp.attach_endpoint("fm-missing0").unwrap_err();
    assert!(err.to_string().contains("fm-missing0"), "{err}");
    assert!(dp.attached_endpoints().is_empty());
    let err = dp.attach_overlay("fm-missing1").unwrap_err();
    assert!(err.to_string().contains("fm-missing1"), "{err}");
    assert_eq!(dp.attached_overlay(), None);
    dp.detach_endpoint("fm-missing0").unwrap();
}

// ---------------------------------------------------------------------------------------------------------------
// Network namespace lab
// ---------------------------------------------------------------------------------------------------------------

/// Runs `ip` with `args`; panics with its stderr when it fails.
fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `f` on a fresh thread that has entered network namespace `ns` (the calling thread is not affected).
fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            // SAFETY: setns on a valid namespace fd; it only changes this (fresh, scoped) thread's namespace.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("netns thread panicked")
    })
}

/// Network namespaces created by one test; all are deleted on drop (their interfaces go with them).
struct Lab {
    prefix: String,
    namespaces: Vec<String>,
}

impl Lab {
    fn new(test: &str) -> Self {
        Self {
            prefix: format!("fmt{}-{test}", std::process::id()),
            namespaces: Vec::new(),
        }
    }

    /// Creates namespace `<prefix>-<name>` with `lo` up and returns its name.
    fn netns(&mut self, name: &str) -> String {
        let ns = format!("{}-{name}", self.prefix);
        ip(&["netns", "add", &ns]);
        self.namespaces.push(ns.clone());
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        ns
    }

    /// Creates pod namespace `name` with `eth0` (/32 `addr`, pod MAC, MTU 1450) whose peer `host_if` lives in
    /// `node`, wired like the agent's CNI does it. Returns the endpoint to program, as seen from `node`.
    fn pod(&mut self, node: &str, name: &str, host_if: &str, addr: Ipv4Addr) -> (String, LocalEndpoint) {
        let pod = self.netns(name);
        ip(&[
            "-n", node, "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", &pod,
        ]);
        let pod_mac = pod_mac_for_ipv4(addr.octets());
        let mac_str = mac_string(pod_mac);
        let mtu = mesh_common::POD_MTU.to_string();
        ip(&[
            "-n", &pod, "link", "set", "eth0", "address", &mac_str, "mtu", &mtu, "up",
        ]);
        ip(&["-n", &pod, "addr", "add", &format!("{addr}/32"), "dev", "eth0"]);
        ip(&["-n", node, "link", "set", host_if, "up"]);
        ip(&[
            "-n",
            &pod,
            "route",
            "add",
            "169.254.1.1",
            "dev",
            "eth0",
            "scope",
            "link",
        ]);
        ip(&["-n", &pod, "route", "add", "default", "via", "169.254.1.1"]);
        let (ifindex, host_mac) = in_netns(node, || {
            (
                netdev::ifindex(host_if).expect("host veth ifindex"),
                netdev::mac(host_if).expect("host veth MAC"),
            )
        });
        let gw_mac = mac_string(host_mac);
        ip(&[
            "-n",
            &pod,
            "neigh",
            "add",
            "169.254.1.1",
            "lladdr",
            &gw_mac,
            "dev",
            "eth0",
            "nud",
            "permanent",
        ]);
        (
            pod,
            LocalEndpoint {
                ifindex,
                identity: 0,
                pod_mac,
                host_mac,
            },
        )
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in self.namespaces.iter().rev() {
            let out = Command::new("ip").args(["netns", "del", ns]).output();
            if !matches!(&out, Ok(o) if o.status.success()) {
                eprintln!("warning: could not delete netns {ns}: {out:?}");
            }
        }
    }
}

fn mac_string(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn ping(from_ns: &str, to: Ipv4Addr) -> Result<(), String> {
    let out = Command::new("ip")
        .args(["netns", "exec", from_ns, "ping", "-c1", "-W2", &to.to_string()])
        .output()
        .map_err(|e| format!("run ping: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ping {to} from {from_ns}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Opens a TCP connection from namespace `client_ns` to a listener in `server_ns` and echoes a message through it.
fn tcp_round_trip(client_ns: &str, server_ns: &str, server: Ipv4Addr) {
    let listener = in_netns(server_ns, || {
        TcpListener::bind((server, 0)).expect("bind listener in server pod")
    });
    let addr: SocketAddr = listener.local_addr().unwrap();
    let mut client = in_netns(client_ns, || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("connect {addr} from {client_ns}: {e}"))
    });
    // The handshake is done: accept returns the queued connection right away.
    let (mut conn, peer) = listener.accept().expect("accept");
    assert_eq!(peer, client.local_addr().unwrap());
    let timeout = Some(Duration::from_secs(5));
    client.set_read_timeout(timeout).unwrap();
    conn.set_read_timeout(timeout).unwrap();
    // Bigger than one segment at MTU 1450, so both directions carry full-size packets.
    let message: Vec<u8> = (0..20_000u32).map(|i| u8::try_from(i % 253).unwrap()).collect();
    client.write_all(&message).unwrap();
    let mut got = vec![0u8; message.len()];
    conn.read_exact(&mut got).expect("server reads the message");
    assert_eq!(got, message);
    conn.write_all(&got).unwrap();
    let mut back = vec![0u8; message.len()];
    client.read_exact(&mut back).expect("client reads the echo");
    assert_eq!(back, message);
}

/// Polls `f` until it succeeds or `timeout` passes; returns the last error.
fn eventually(timeout: Duration, mut f: impl FnMut() -> Result<(), String>) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => {}
        }
    }
}

#[test]
fn same_node_pods_reach_each_other_through_redirect_peer() {
    let mut lab = Lab::new("local");
    let node = lab.netns("node");
    let (a_ip, b_ip) = (Ipv4Addr::new(10, 201, 0, 2), Ipv4Addr::new(10, 201, 0, 3));
    let (pod_a, ep_a) = lab.pod(&node, "a", "fmh-a", a_ip);
    let (pod_b, ep_b) = lab.pod(&node, "b", "fmh-b", b_ip);

    let mut dp = in_netns(&node, || {
        let mut dp = Datapath::load().expect("load");
        dp.attach_endpoint("fmh-a").expect("attach a");
        dp.attach_endpoint("fmh-b").expect("attach b");
        dp.attach_endpoint("fmh-b").expect("attach b again is a no-op");
        dp
    });
    assert_eq!(dp.attached_endpoints(), ["fmh-a", "fmh-b"]);
    dp.upsert_endpoint(a_ip, ep_a).unwrap();
    dp.upsert_endpoint(b_ip, ep_b).unwrap();

    // Link state settles asynchronously after `ip link set up`: allow a few attempts within a deadline.
    eventually(Duration::from_secs(10), || ping(&pod_a, b_ip)).expect("ping a → b");
    ping(&pod_b, a_ip).expect("ping b → a");
    tcp_round_trip(&pod_a, &pod_b, b_ip);

    let counters = dp.counters().unwrap();
    let get = |c| counters.iter().find(|(k, _)| *k == c).unwrap().1;
    assert!(get(Counter::FwdLocal) >= 4, "{counters:?}");
    assert_eq!(get(Counter::FwdTunnel), 0, "{counters:?}");
    assert_eq!(get(Counter::DropMalformed), 0, "{counters:?}");

    // Without the endpoint entry nothing routes the pod prefix: the packet goes to the node's stack and dies.
    dp.remove_endpoint(b_ip).unwrap();
    assert!(
        ping(&pod_a, b_ip).is_err(),
        "ping must fail without the endpoint entry"
    );
    dp.detach_endpoint("fmh-a").unwrap();
    dp.detach_endpoint("fmh-a").unwrap();
    assert_eq!(dp.attached_endpoints(), ["fmh-b"]);
}

#[test]
fn attach_is_idempotent_and_programs_detach_on_drop() {
    let mut lab = Lab::new("life");
    let node = lab.netns("node");
    ip(&[
        "-n", &node, "link", "add", "fmh-x", "type", "veth", "peer", "name", "fmh-y",
    ]);
    ip(&[
        "-n", &node, "link", "add", "fm_vxlan", "type", "vxlan", "external", "dstport", "4789",
    ]);
    let attached = |ifname: &'static str| {
        in_netns(&node, move || {
            Datapath::tcx_ingress_programs(ifname).expect("query tcx")
        })
    };
    let dp = in_netns(&node, || {
        let mut dp = Datapath::load().expect("load");
        dp.attach_endpoint("fmh-x").unwrap();
        dp.attach_endpoint("fmh-x").unwrap();
        dp.attach_endpoint("fmh-y").unwrap();
        dp.attach_overlay("fm_vxlan").unwrap();
        dp
    });
    assert_eq!(attached("fmh-x"), [FROM_POD]);
    assert_eq!(attached("fmh-y"), [FROM_POD]);
    assert_eq!(attached("fm_vxlan"), [FROM_OVERLAY]);
    let mut dp = dp;
    dp.detach_endpoint("fmh-y").unwrap();
    assert_eq!(attached("fmh-y"), Vec::<String>::new());
    assert_eq!(dp.attached_endpoints(), ["fmh-x"]);
    drop(dp);
    for ifname in ["fmh-x", "fmh-y", "fm_vxlan"] {
        assert_eq!(attached(ifname), Vec::<String>::new(), "{ifname} after drop");
    }
}

#[test]
fn pods_on_two_nodes_reach_each_other_over_vxlan() {
    let mut lab = Lab::new("ovl");
    let n1 = lab.netns("n1");
    let n2 = lab.netns("n2");
    let (u1, u2) = (Ipv4Addr::new(192, 168, 251, 1), Ipv4Addr::new(192, 168, 251, 2));
    ip(&[
        "-n", &n1, "link", "add", "ul0", "type", "veth", "peer", "name", "ul0", "netns", &n2,
    ]);
    for (ns, addr) in [(&n1, u1), (&n2, u2)] {
        ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", "ul0"]);
        ip(&["-n", ns, "link", "set", "ul0", "up"]);
        ip(&[
            "-n", ns, "link", "add", "fm_vxlan", "type", "vxlan", "external", "dstport", "4789",
        ]);
        ip(&["-n", ns, "link", "set", "fm_vxlan", "up"]);
    }
    let (a_ip, b_ip) = (Ipv4Addr::new(10, 202, 1, 2), Ipv4Addr::new(10, 202, 2, 2));
    let (pod_a, ep_a) = lab.pod(&n1, "a", "fmh-a", a_ip);
    let (pod_b, ep_b) = lab.pod(&n2, "b", "fmh-b", b_ip);

    let node = |ns: &str, underlay: Ipv4Addr, host_if: &str| {
        in_netns(ns, || {
            let mut dp = Datapath::load().expect("load");
            let vxlan_ifindex = netdev::ifindex("fm_vxlan").expect("fm_vxlan ifindex");
            dp.set_node_config(NodeConfig {
                vxlan_ifindex,
                node_ipv4: u32::from(underlay),
                ..Default::default()
            })
            .unwrap();
            dp.attach_overlay("fm_vxlan").expect("attach overlay");
            dp.attach_overlay("fm_vxlan")
                .expect("attach overlay again is a no-op");
            dp.attach_endpoint(host_if).expect("attach pod veth");
            dp
        })
    };
    let mut dp1 = node(&n1, u1, "fmh-a");
    let mut dp2 = node(&n2, u2, "fmh-b");
    assert_eq!(dp1.attached_overlay(), Some("fm_vxlan"));
    dp1.upsert_endpoint(
        a_ip,
        LocalEndpoint {
            identity: 1001,
            ..ep_a
        },
    )
    .unwrap();
    dp2.upsert_endpoint(
        b_ip,
        LocalEndpoint {
            identity: 1002,
            ..ep_b
        },
    )
    .unwrap();
    let remote = |tunnel: Ipv4Addr| IpcacheEntry {
        tunnel_endpoint: u32::from(tunnel),
        family: FAMILY_IPV4,
        cluster_id: 1,
        ..Default::default()
    };
    let local = IpcacheEntry {
        flags: ipcache_flags::LOCAL_NODE,
        family: FAMILY_IPV4,
        cluster_id: 1,
        ..Default::default()
    };
    dp1.upsert_ipcache("10.202.1.0/24".parse().unwrap(), local)
        .unwrap();
    dp1.upsert_ipcache("10.202.2.0/24".parse().unwrap(), remote(u2))
        .unwrap();
    dp2.upsert_ipcache("10.202.2.0/24".parse().unwrap(), local)
        .unwrap();
    dp2.upsert_ipcache("10.202.1.0/24".parse().unwrap(), remote(u1))
        .unwrap();

    // The underlay resolves neighbours on first use and links settle asynchronously: poll within a deadline.
    eventually(Duration::from_secs(10), || ping(&pod_a, b_ip)).expect("ping a → b across nodes");
    ping(&pod_b, a_ip).expect("ping b → a across nodes");
    tcp_round_trip(&pod_a, &pod_b, b_ip);
    tcp_round_trip(&pod_b, &pod_a, a_ip);

    for (name, dp) in [("n1", &dp1), ("n2", &dp2)] {
        let counters = dp.counters().unwrap();
        let get = |c| counters.iter().find(|(k, _)| *k == c).unwrap().1;
        assert!(get(Counter::FwdTunnel) >= 3, "{name}: {counters:?}");
        assert!(get(Counter::RecvOverlay) >= 3, "{name}: {counters:?}");
        assert!(get(Counter::FwdLocal) >= 3, "{name}: {counters:?}");
        assert_eq!(get(Counter::DropNoTunnelKey), 0, "{name}: {counters:?}");
        assert_eq!(get(Counter::DropMalformed), 0, "{name}: {counters:?}");
    }

    // Without its endpoint entry, node 2 drops what arrives for the pod.
    dp2.remove_endpoint(b_ip).unwrap();
    assert!(
        ping(&pod_a, b_ip).is_err(),
        "ping must fail without the endpoint entry"
    );
    assert!(dp2.counter(Counter::DropNoEndpoint).unwrap() >= 1);
}
