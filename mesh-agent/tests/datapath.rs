//! Datapath integration tests (need root with CAP_BPF / CAP_NET_ADMIN).
//!
//! - `BPF_PROG_TEST_RUN` on crafted frames for both programs: verdict, output bytes and counters.
//! - Real traffic through network namespaces created here (unique names with the pid, removed by a guard on
//!   drop, also when a test fails): same node via `bpf_redirect_peer`, and two nodes over a VXLAN overlay.
//!
//! Service load balancing has its own file (`tests/lb.rs`); both share `tests/common`.
mod common;
#[path = "common/pins.rs"]
mod pins;

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

use common::{
    FROM_OVERLAY, FROM_POD, HOST_MAC, Lab, Nodes, POD_A, POD_B, REMOTE_NODE, REMOTE_POD, TC_ACT_OK,
    TC_ACT_REDIRECT, TC_ACT_SHOT, endpoint, eventually, in_netns, ip, loaded, node_datapath, nonzero, ping,
    program_ipcache,
};
use ipnet::Ipv4Net;
use mesh_agent::datapath::{Datapath, DatapathError};
use mesh_common::{Counter, FAMILY_IPV4, IpcacheEntry, LocalEndpoint, NodeConfig, pod_mac_for_ipv4};

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
    let err = dp.attach_host_tracking("fm-missing2").unwrap_err();
    assert!(
        err.to_string()
            .contains("to_pod to tc egress of interface \"fm-missing2\""),
        "{err}"
    );
    assert!(dp.host_tracking_endpoints().is_empty());
    dp.detach_endpoint("fm-missing0").unwrap();
    dp.detach_host_tracking("fm-missing2").unwrap();
}

// ---------------------------------------------------------------------------------------------------------------
// Network namespace lab
// ---------------------------------------------------------------------------------------------------------------

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

/// A pod restarted under the same interface name: the new interface gets the program again (the link of the old
/// one died with it), both with owned links and with pinned ones adopted from an earlier agent.
#[test]
fn an_interface_re_created_under_the_same_name_is_attached_again() {
    let mut lab = Lab::new("recreate");
    let node = lab.netns("node");
    let pins = pins::Pins::new("recreate");
    let add = || {
        ip(&[
            "-n", &node, "link", "add", "fmr-x", "type", "veth", "peer", "name", "fmr-y",
        ]);
    };
    let attached = || {
        in_netns(&node, || {
            Datapath::tcx_ingress_programs("fmr-x").expect("query tcx")
        })
    };
    add();
    for pinned in [false, true] {
        let mut dp = in_netns(&node, || {
            let mut dp = if pinned {
                Datapath::load_pinned(pins.path()).expect("load pinned")
            } else {
                Datapath::load().expect("load")
            };
            dp.attach_endpoint("fmr-x").unwrap();
            dp
        });
        assert_eq!(attached(), [FROM_POD]);
        ip(&["-n", &node, "link", "del", "fmr-x"]);
        add();
        assert_eq!(attached(), Vec::<String>::new(), "a new interface has no program");
        in_netns(&node, || dp.attach_endpoint("fmr-x")).unwrap();
        assert_eq!(attached(), [FROM_POD], "attached again (pinned: {pinned})");
        if pinned {
            // An agent restart adopts the pinned link, then the interface is re-created again.
            drop(dp);
            ip(&["-n", &node, "link", "del", "fmr-x"]);
            add();
            let mut again = in_netns(&node, || Datapath::load_pinned(pins.path()).expect("adopt"));
            in_netns(&node, || again.attach_endpoint("fmr-x")).unwrap();
            assert_eq!(attached(), [FROM_POD], "adopted link checked and replaced");
            in_netns(&node, || again.detach_endpoint("fmr-x")).unwrap();
        } else {
            drop(dp);
        }
    }
}

/// `to_pod` runs on tc egress of a pod veth, next to `from_pod` on ingress: attached and detached on its own, its
/// pinned link kept attached while no agent runs and adopted by the next one, both links gone with the endpoint.
#[test]
fn host_tracking_runs_on_tc_egress_and_is_adopted_across_restarts() {
    let mut lab = Lab::new("topod");
    let node = lab.netns("node");
    let pins = pins::Pins::new("topod");
    ip(&[
        "-n", &node, "link", "add", "fmt-x", "type", "veth", "peer", "name", "fmt-y",
    ]);
    let hooks = || {
        in_netns(&node, || {
            (
                Datapath::tcx_ingress_programs("fmt-x").expect("query tcx ingress"),
                Datapath::tcx_egress_programs("fmt-x").expect("query tcx egress"),
            )
        })
    };
    let both = || {
        (
            vec![FROM_POD.to_owned()],
            vec![mesh_common::programs::TO_POD.to_owned()],
        )
    };
    let dp = in_netns(&node, || {
        let mut dp = Datapath::load_pinned(pins.path()).expect("load pinned");
        dp.attach_endpoint("fmt-x").unwrap();
        dp.attach_host_tracking("fmt-x").unwrap();
        dp.attach_host_tracking("fmt-x").unwrap();
        dp
    });
    assert_eq!(hooks(), both());
    assert_eq!(dp.attached_endpoints(), ["fmt-x"]);
    assert_eq!(dp.host_tracking_endpoints(), ["fmt-x"]);
    drop(dp);
    assert_eq!(hooks(), both(), "attached while no agent runs");

    let mut dp = in_netns(&node, || Datapath::load_pinned(pins.path()).expect("adopt"));
    assert_eq!(dp.adoption().links_adopted, ["from_pod@fmt-x", "to_pod@fmt-x"]);
    in_netns(&node, || dp.attach_host_tracking("fmt-x")).unwrap();
    assert_eq!(hooks(), both(), "the adopted link is checked, not doubled");
    let settles = |want: (Vec<String>, Vec<String>)| {
        eventually(Duration::from_secs(5), || {
            let have = hooks();
            if have == want {
                Ok(())
            } else {
                Err(format!("{have:?}, want {want:?}"))
            }
        })
    };
    in_netns(&node, || dp.detach_host_tracking("fmt-x")).unwrap();
    settles((vec![FROM_POD.to_owned()], vec![])).unwrap();
    assert_eq!(dp.host_tracking_endpoints(), Vec::<String>::new());
    in_netns(&node, || dp.attach_host_tracking("fmt-x")).unwrap();
    assert_eq!(hooks(), both());
    in_netns(&node, || dp.detach_endpoint("fmt-x")).unwrap();
    settles((vec![], vec![])).unwrap();
    assert!(!pins.path().join("links/to_pod@fmt-x").exists());
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
    // The kernel may release a closed link a moment later (deferred work): poll with a deadline.
    let detached = |ifname: &'static str| {
        eventually(Duration::from_secs(5), || {
            let progs = attached(ifname);
            if progs.is_empty() {
                Ok(())
            } else {
                Err(format!("{ifname} still has {progs:?}"))
            }
        })
    };
    dp.detach_endpoint("fmh-y").unwrap();
    detached("fmh-y").unwrap();
    assert_eq!(dp.attached_endpoints(), ["fmh-x"]);
    assert_eq!(
        attached("fmh-x"),
        [FROM_POD],
        "the other endpoint keeps its program"
    );
    drop(dp);
    for ifname in ["fmh-x", "fmh-y", "fm_vxlan"] {
        detached(ifname).unwrap_or_else(|e| panic!("after drop: {e}"));
    }
}

#[test]
fn pods_on_two_nodes_reach_each_other_over_vxlan() {
    let mut lab = Lab::new("ovl");
    let Nodes { n1, n2, u1, u2 } = lab.two_nodes();
    let (a_ip, b_ip) = (Ipv4Addr::new(10, 202, 1, 2), Ipv4Addr::new(10, 202, 2, 2));
    let (pod_a, ep_a) = lab.pod(&n1, "a", "fmh-a", a_ip);
    let (pod_b, ep_b) = lab.pod(&n2, "b", "fmh-b", b_ip);

    let mut dp1 = node_datapath(&n1, u1, &["fmh-a"]);
    let mut dp2 = node_datapath(&n2, u2, &["fmh-b"]);
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
    program_ipcache(&mut dp1, "10.202.1.0/24", "10.202.2.0/24", u2);
    program_ipcache(&mut dp2, "10.202.2.0/24", "10.202.1.0/24", u1);

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
