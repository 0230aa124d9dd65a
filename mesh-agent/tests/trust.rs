//! What a pod can and cannot do (docs/security.md), in the datapath (need root with CAP_BPF / CAP_NET_ADMIN).
//!
//! - `BPF_PROG_TEST_RUN` of `from_pod` (test runs arrive on ifindex 1, `lo`, where `loaded()` puts pods A and B):
//!   a packet from another pod's address or from an address that is no endpoint is dropped, counted and reported
//!   as a flow event, also when that would have escaped an egress deny-all; UDP to the VXLAN port through the
//!   node's stack is dropped; of the non-IPv4 frames only ARP passes.
//! - Two nodes over VXLAN (network namespaces removed by a guard): a crafted VXLAN datagram from an underlay
//!   address that is no tunnel peer is dropped by `from_overlay`, the same datagram from a peer is delivered; a
//!   pod's VXLAN datagram to its node never reaches the overlay.
//! - The interface facts behind the `fleetmesh.io/host-ifname` check, on real interfaces of a namespace.
#[expect(
    dead_code,
    reason = "helpers shared by the datapath tests; this one uses most"
)]
mod common;

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    time::Duration,
};

use aya::maps::{MapData, RingBuf};
use common::{
    FROM_POD, HOST_MAC, Lab, Nodes, POD_A, POD_B, REMOTE_POD, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT,
    endpoint, eventually, in_netns, ip, loaded, node_datapath, nonzero, ping, program_ipcache,
};
use mesh_agent::{
    datapath::{Datapath, EndpointPolicy, parse_flow_event},
    netdev,
};
use mesh_common::{
    Counter, FlowEvent, NodeConfig, flow_verdict, identity, node_flags, pod_mac_for_ipv4, proto,
};

const NODE_IP: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 2);
/// A local endpoint whose veth is not the one test runs arrive on.
const POD_C: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 4);
/// In the node's pod prefix, but no endpoint.
const UNUSED: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 99);

/// Ethernet + IPv4 + UDP (8 payload bytes) from `src`:40000 to `dst`:`dport`.
fn udp(src: Ipv4Addr, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    l4(proto::UDP, src, dst, dport)
}

fn l4(protocol: u8, src: Ipv4Addr, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    let l4_len = if protocol == proto::TCP { 20 } else { 8 };
    let total = 20 + l4_len + 8;
    let mut f = vec![0u8; 14 + total];
    f[0..6].copy_from_slice(&HOST_MAC);
    f[6..12].copy_from_slice(&pod_mac_for_ipv4(src.octets()));
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    f[14] = 0x45;
    f[16..18].copy_from_slice(&u16::try_from(total).unwrap().to_be_bytes());
    f[22] = 64;
    f[23] = protocol;
    f[26..30].copy_from_slice(&src.octets());
    f[30..34].copy_from_slice(&dst.octets());
    f[34..36].copy_from_slice(&40000u16.to_be_bytes());
    f[36..38].copy_from_slice(&dport.to_be_bytes());
    if protocol == proto::TCP {
        f[46] = 5 << 4;
        f[47] = 0x02;
    } else {
        f[38..40].copy_from_slice(&16u16.to_be_bytes());
    }
    f
}

/// A frame of `ether_type` with `payload_len` zero bytes after the Ethernet header.
fn frame_of(ether_type: u16, payload_len: usize) -> Vec<u8> {
    let mut f = vec![0u8; 14 + payload_len];
    f[0..6].copy_from_slice(&HOST_MAC);
    f[6..12].copy_from_slice(&pod_mac_for_ipv4(POD_A.octets()));
    f[12..14].copy_from_slice(&ether_type.to_be_bytes());
    f
}

/// An IPv6 frame (version 6, next header UDP, fe80::2 → fe80::1) of a pod.
fn ipv6_frame() -> Vec<u8> {
    let mut f = frame_of(0x86dd, 40 + 8);
    f[14] = 0x60;
    f[18..20].copy_from_slice(&8u16.to_be_bytes());
    f[20] = 17;
    f[21] = 64;
    f[22] = 0xfe;
    f[23] = 0x80;
    f[37] = 2;
    f[38] = 0xfe;
    f[39] = 0x80;
    f[53] = 1;
    f
}

/// `loaded()` with a VXLAN device (ifindex 1), this node's underlay address and pod C on another veth.
fn datapath(flags: u16) -> Datapath {
    let mut dp = loaded();
    dp.set_node_config(NodeConfig {
        vxlan_ifindex: 1,
        node_ipv4: u32::from(NODE_IP),
        flags,
        ..Default::default()
    })
    .unwrap();
    dp.upsert_endpoint(POD_C, endpoint(POD_C, 2, 9)).unwrap();
    dp
}

fn run(dp: &mut Datapath, frame: &[u8]) -> u32 {
    dp.test_run(FROM_POD, frame).unwrap().return_value
}

fn drain(ring: &mut RingBuf<MapData>) -> Vec<FlowEvent> {
    let mut events = Vec::new();
    while let Some(record) = ring.next() {
        events.push(parse_flow_event(&record).expect("a FlowEvent record"));
    }
    events
}

#[test]
fn a_pod_sends_from_its_own_address_only() {
    for flags in [0, node_flags::POLICY] {
        let mut dp = datapath(flags);
        let mut ring = dp.take_flow_events().unwrap();
        // Own source: delivered to B, tunnelled to the remote pod.
        assert_eq!(
            run(&mut dp, &udp(POD_A, POD_B, 5000)),
            TC_ACT_REDIRECT,
            "flags {flags}"
        );
        assert_eq!(
            run(&mut dp, &udp(POD_A, REMOTE_POD, 5000)),
            TC_ACT_REDIRECT,
            "flags {flags}"
        );
        // C's address on A's veth, an unused address of the node's prefix, an address from outside.
        for src in [POD_C, UNUSED, Ipv4Addr::new(192, 0, 2, 1)] {
            for dst in [POD_B, REMOTE_POD, NODE_IP] {
                assert_eq!(
                    run(&mut dp, &udp(src, dst, 5000)),
                    TC_ACT_SHOT,
                    "{src} -> {dst}, flags {flags}"
                );
            }
        }
        assert_eq!(
            nonzero(&dp),
            [
                (Counter::FwdLocal, 1),
                (Counter::FwdTunnel, 1),
                (Counter::DropSourceSpoofed, 9)
            ],
            "flags {flags}"
        );
        let events = drain(&mut ring);
        assert_eq!(events.len(), 9, "one flow event per spoofed packet: {events:?}");
        assert!(
            events.iter().all(|e| e.verdict == flow_verdict::DROPPED
                && e.reason == Counter::DropSourceSpoofed as u8
                && e.src_identity == 0
                && e.ifindex == 1
                && e.dport_be == 5000u16.to_be()),
            "{events:?}"
        );
        assert_eq!(
            Ipv4Addr::from(events[0].saddr),
            POD_C,
            "the event names the claimed source"
        );
    }
}

#[test]
fn an_egress_deny_all_holds_for_every_source_address() {
    let mut dp = datapath(node_flags::POLICY);
    dp.replace_endpoint_policy(
        POD_A,
        identity::compose(1, 300),
        &EndpointPolicy {
            ingress: None,
            egress: Some(vec![]),
        },
    )
    .unwrap();
    assert_eq!(run(&mut dp, &udp(POD_A, POD_B, 5000)), TC_ACT_SHOT);
    // An unused address of the node's prefix has no endpoint, so no policy: before the source check this left.
    assert_eq!(run(&mut dp, &udp(UNUSED, POD_B, 5000)), TC_ACT_SHOT);
    assert_eq!(run(&mut dp, &udp(UNUSED, REMOTE_POD, 5000)), TC_ACT_SHOT);
    assert_eq!(
        nonzero(&dp),
        [(Counter::DropPolicyEgress, 1), (Counter::DropSourceSpoofed, 2)]
    );
}

#[test]
fn vxlan_from_a_pod_never_reaches_the_nodes_stack() {
    let mut dp = datapath(0);
    // To the node's VXLAN port, and to any address's: everything the stack would take.
    for dst in [NODE_IP, Ipv4Addr::new(172, 18, 0, 3), Ipv4Addr::new(192, 0, 2, 1)] {
        assert_eq!(run(&mut dp, &udp(POD_A, dst, 4789)), TC_ACT_SHOT, "{dst}");
    }
    assert_eq!(nonzero(&dp), [(Counter::DropVxlanFromPod, 3)]);
    // Other ports and protocols to the node pass; UDP 4789 to a pod is delivered to the pod, never decapsulated.
    assert_eq!(run(&mut dp, &udp(POD_A, NODE_IP, 4790)), TC_ACT_OK);
    assert_eq!(run(&mut dp, &l4(proto::TCP, POD_A, NODE_IP, 4789)), TC_ACT_OK);
    assert_eq!(run(&mut dp, &udp(POD_A, POD_B, 4789)), TC_ACT_REDIRECT);
    assert_eq!(
        nonzero(&dp),
        [
            (Counter::FwdLocal, 1),
            (Counter::PassStack, 2),
            (Counter::DropVxlanFromPod, 3)
        ]
    );
}

#[test]
fn of_a_pods_non_ipv4_frames_only_arp_passes() {
    for flags in [0, node_flags::POLICY] {
        let mut dp = datapath(flags);
        if flags != 0 {
            // A's ingress and egress are enforced.
            dp.replace_endpoint_policy(
                POD_A,
                identity::compose(1, 300),
                &EndpointPolicy {
                    ingress: Some(vec![]),
                    egress: Some(vec![]),
                },
            )
            .unwrap();
        }
        let arp = frame_of(0x0806, 28);
        let out = dp.test_run(FROM_POD, &arp).unwrap();
        assert_eq!((out.return_value, out.packet), (TC_ACT_OK, arp), "flags {flags}");
        assert_eq!(run(&mut dp, &ipv6_frame()), TC_ACT_SHOT, "flags {flags}");
        for ether_type in [0x8100, 0x88cc, 0x8847] {
            assert_eq!(
                run(&mut dp, &frame_of(ether_type, 46)),
                TC_ACT_SHOT,
                "{ether_type:#x}"
            );
        }
        assert_eq!(
            nonzero(&dp),
            [(Counter::PassStack, 1), (Counter::DropUnsupportedL3, 4)],
            "flags {flags}"
        );
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The overlay over real VXLAN devices
// ---------------------------------------------------------------------------------------------------------------

/// The one's complement checksum of an IPv4 header.
fn ipv4_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !u16::try_from(sum).unwrap()
}

/// A VXLAN payload: header with `vni`, an Ethernet frame to `dst`'s pod MAC carrying IPv4/UDP `src` → `dst`.
fn vxlan_payload(vni: u32, src: SocketAddr, dst: SocketAddr, data: &[u8]) -> Vec<u8> {
    let (SocketAddr::V4(src), SocketAddr::V4(dst)) = (src, dst) else {
        panic!("IPv4 only")
    };
    let mut p = vec![0x08, 0, 0, 0];
    p.extend_from_slice(&(vni << 8).to_be_bytes());
    p.extend_from_slice(&pod_mac_for_ipv4(dst.ip().octets()));
    p.extend_from_slice(&[0x02, 0, 0, 0, 0xbe, 0xef]);
    p.extend_from_slice(&0x0800u16.to_be_bytes());
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&u16::try_from(28 + data.len()).unwrap().to_be_bytes());
    ip.extend_from_slice(&[0, 1, 0, 0, 64, 17, 0, 0]);
    ip.extend_from_slice(&src.ip().octets());
    ip.extend_from_slice(&dst.ip().octets());
    let csum = ipv4_checksum(&ip);
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
    p.extend_from_slice(&ip);
    p.extend_from_slice(&src.port().to_be_bytes());
    p.extend_from_slice(&dst.port().to_be_bytes());
    p.extend_from_slice(&u16::try_from(8 + data.len()).unwrap().to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(data);
    p
}

/// Sends `payload` from `from` inside `netns` to `to`.
fn send_in(netns: &str, from: SocketAddr, to: SocketAddr, payload: &[u8]) {
    in_netns(netns, || {
        let s = UdpSocket::bind(from).unwrap_or_else(|e| panic!("bind {from}: {e}"));
        s.send_to(payload, to)
            .unwrap_or_else(|e| panic!("send to {to}: {e}"));
    });
}

/// The next datagram on `sink` (its read timeout bounds the wait).
fn received(sink: &UdpSocket) -> Option<Vec<u8>> {
    let mut buf = [0u8; 512];
    sink.recv_from(&mut buf).ok().map(|(n, _)| buf[..n].to_vec())
}

#[test]
fn the_overlay_takes_packets_from_tunnel_peers_only() {
    let mut lab = Lab::new("trustovl");
    let Nodes { n1, n2, u1, u2 } = lab.two_nodes();
    let (a_ip, b_ip) = (Ipv4Addr::new(10, 204, 1, 2), Ipv4Addr::new(10, 204, 2, 2));
    let (pod_a, ep_a) = lab.pod(&n1, "a", "fmt-a", a_ip);
    let (pod_b, ep_b) = lab.pod(&n2, "b", "fmt-b", b_ip);
    let mut dp1 = node_datapath(&n1, u1, &["fmt-a"]);
    let mut dp2 = node_datapath(&n2, u2, &["fmt-b"]);
    dp1.upsert_endpoint(a_ip, ep_a).unwrap();
    dp2.upsert_endpoint(b_ip, ep_b).unwrap();
    program_ipcache(&mut dp1, "10.204.1.0/24", "10.204.2.0/24", u2);
    program_ipcache(&mut dp2, "10.204.2.0/24", "10.204.1.0/24", u1);
    eventually(Duration::from_secs(10), || ping(&pod_a, b_ip)).expect("ping a → b across nodes");

    // A second address on node 1's underlay that no node has: not a tunnel peer of node 2.
    let stranger = Ipv4Addr::new(192, 168, 251, 9);
    ip(&["-n", &n1, "addr", "add", &format!("{stranger}/24"), "dev", "ul0"]);
    let sink = in_netns(&pod_b, || UdpSocket::bind((b_ip, 40400))).expect("bind in pod b");
    sink.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let forged = vxlan_payload(
        300,
        SocketAddr::from((REMOTE_POD, 5353)),
        SocketAddr::from((b_ip, 40400)),
        b"forged",
    );
    let vxlan = SocketAddr::from((u2, 4789));
    let before = dp2.counter(Counter::DropOverlayUnknownPeer).unwrap();
    send_in(&n1, SocketAddr::from((stranger, 0)), vxlan, &forged);
    assert_eq!(
        received(&sink),
        None,
        "VXLAN from a non-peer address was delivered"
    );
    assert!(dp2.counter(Counter::DropOverlayUnknownPeer).unwrap() > before);
    // The same datagram from a peer's address is decapsulated and delivered (the check is what stopped it).
    send_in(&n1, SocketAddr::from((u1, 0)), vxlan, &forged);
    assert_eq!(received(&sink).as_deref(), Some(&b"forged"[..]));

    // A pod's VXLAN to its own node, and through it to the other node, never reaches an overlay.
    let before = dp1.counter(Counter::DropVxlanFromPod).unwrap();
    for node in [u1, u2] {
        send_in(
            &pod_a,
            SocketAddr::from((a_ip, 0)),
            SocketAddr::from((node, 4789)),
            &forged,
        );
    }
    assert_eq!(received(&sink), None, "a pod's VXLAN was delivered");
    assert_eq!(dp1.counter(Counter::DropVxlanFromPod).unwrap(), before + 2);
    drop(lab);
}

// ---------------------------------------------------------------------------------------------------------------
// Interfaces a host-ifname annotation may name
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn only_routed_pod_veths_pass_the_interface_check() {
    let mut lab = Lab::new("trustif");
    let node = lab.netns("node");
    let pod = lab.netns("pod");
    let run = |args: &[&str]| {
        let mut full = vec!["-n", node.as_str()];
        full.extend_from_slice(args);
        ip(&full);
    };
    run(&[
        "link", "add", "podveth", "type", "veth", "peer", "name", "eth0", "netns", &pod,
    ]);
    run(&[
        "link", "add", "samens", "type", "veth", "peer", "name", "samens-p",
    ]);
    run(&[
        "link",
        "add",
        "addressed",
        "type",
        "veth",
        "peer",
        "name",
        "eth1",
        "netns",
        &pod,
    ]);
    run(&["addr", "add", "192.168.250.1/24", "dev", "addressed"]);
    run(&["link", "add", "br0", "type", "bridge"]);
    run(&[
        "link", "add", "ported", "type", "veth", "peer", "name", "eth2", "netns", &pod,
    ]);
    run(&["link", "set", "ported", "master", "br0"]);
    run(&[
        "link", "add", "fm_vxlan", "type", "vxlan", "external", "dstport", "4789",
    ]);
    let verdicts: BTreeMap<&str, Result<(), String>> = in_netns(&node, || {
        [
            "podveth",
            "samens",
            "addressed",
            "ported",
            "br0",
            "fm_vxlan",
            "lo",
        ]
        .into_iter()
        .map(|name| {
            let ifindex = netdev::ifindex(name).unwrap();
            let facts = netdev::link_facts(name, ifindex).unwrap();
            (name, netdev::check_pod_veth(name, &facts))
        })
        .collect()
    });
    assert_eq!(verdicts["podveth"], Ok(()));
    for (name, why) in [
        ("samens", "own network namespace"),
        ("addressed", "IPv4 address"),
        ("ported", "bridge port"),
        ("br0", "bridge device"),
        ("fm_vxlan", "vxlan device"),
        ("lo", "not a veth"),
    ] {
        let err = verdicts[name].clone().unwrap_err();
        assert!(err.contains(why) && err.contains(name), "{name}: {err}");
    }
    let missing = in_netns(&node, || netdev::link_facts("gone0", 999_999)).unwrap_err();
    assert!(missing.to_string().contains("gone0"), "{missing}");
}
