//! Identity-based policy in the datapath (need root with CAP_BPF / CAP_NET_ADMIN).
//!
//! - `BPF_PROG_TEST_RUN` of `from_pod` on crafted frames: the lookup order (the winning rule is read back from
//!   the flow event ring), drops by direction and for pending identities with their counters and events, replies
//!   passing through policy conntrack, the atomic replacement of a table, the flow event rate limit.
//! - `BPF_PROG_TEST_RUN` of `to_pod` then `from_pod`: connections the node opens to a pod with egress policy get
//!   their replies back, while the pod still cannot open connections to the node.
//! - Two nodes over VXLAN (network namespaces removed by a guard): the source identity of overlay packets comes
//!   from the VNI and the sending node's `TUNNEL_PEERS` entry.
mod common;
#[path = "common/pins.rs"]
mod pins;

use std::{collections::BTreeMap, net::Ipv4Addr, time::Duration};

use aya::maps::{MapData, RingBuf};
use common::{
    FROM_OVERLAY, FROM_POD, Lab, Nodes, POD_A, POD_B, REMOTE_POD, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT,
    endpoint, eventually, loaded, node_datapath, nonzero, ping, program_ipcache,
};
use mesh_agent::datapath::{
    Datapath, DatapathError, EndpointPolicy, InstalledPolicy, PolicyRule, parse_flow_event,
};
use mesh_common::{
    BackendV4, Counter, CtKeyV4, FlowEvent, HAIRPIN_IPV4, LocalEndpoint, NodeConfig, PolicyEntry, PolicyKey,
    RevNatV4, ServiceEntry, ServiceKeyV4, SlotKey, ct_dir, flow_verdict, identity, policy_dir, policy_flags,
    proto,
};

const ID_A: u32 = identity::compose(1, 300);
const ID_B: u32 = identity::compose(1, 301);
const ID_OTHER: u32 = identity::compose(2, 999);
/// A remote pod's address inside 10.2.0.0/16 (which `loaded` puts behind a tunnel with identity 0: pending).
const REMOTE: Ipv4Addr = REMOTE_POD;

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;

/// Ethernet + IPv4 + a transport header of protocol `protocol` (TCP with `flags`, UDP, or 8 bytes of ICMP) and
/// 16 payload bytes. Checksums are left 0: `from_pod` only rewrites packets it load-balances.
fn frame(protocol: u8, src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, flags: u8) -> Vec<u8> {
    let l4_len = if protocol == proto::TCP { 20 } else { 8 };
    let total = 20 + l4_len + 16;
    let mut f = vec![0u8; 14 + total];
    f[0..6].copy_from_slice(&common::HOST_MAC);
    f[6..12].copy_from_slice(&mesh_common::pod_mac_for_ipv4(src.octets()));
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    f[14] = 0x45;
    f[16..18].copy_from_slice(&u16::try_from(total).unwrap().to_be_bytes());
    f[22] = 64;
    f[23] = protocol;
    f[26..30].copy_from_slice(&src.octets());
    f[30..34].copy_from_slice(&dst.octets());
    if protocol == proto::TCP || protocol == proto::UDP {
        f[34..36].copy_from_slice(&sport.to_be_bytes());
        f[36..38].copy_from_slice(&dport.to_be_bytes());
    }
    if protocol == proto::TCP {
        f[34 + 12] = 5 << 4;
        f[34 + 13] = flags;
    } else if protocol == proto::UDP {
        f[38..40].copy_from_slice(&u16::try_from(8 + 16).unwrap().to_be_bytes());
    } else {
        f[34] = 8; // ICMP echo request
    }
    f
}

fn tcp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, flags: u8) -> Vec<u8> {
    frame(proto::TCP, src, sport, dst, dport, flags)
}

fn udp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    frame(proto::UDP, src, sport, dst, dport, 0)
}

fn rule(peer: u32, protocol: u8, port: u16, port_plen: u8, id: u32) -> PolicyRule {
    PolicyRule {
        peer,
        proto: protocol,
        port,
        port_plen,
        rule: id,
    }
}

/// This node's underlay address in `datapath()`.
const NODE_IP: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 2);

/// `loaded()` with identities ID_A and ID_B on pods A and B, a VXLAN device (ifindex 1) and underlay address
/// `NODE_IP`.
fn datapath() -> Datapath {
    let mut dp = loaded();
    dp.set_node_config(NodeConfig {
        vxlan_ifindex: 1,
        node_ipv4: u32::from(NODE_IP),
        flags: mesh_common::node_flags::POLICY,
        ..Default::default()
    })
    .unwrap();
    dp.upsert_endpoint(POD_A, endpoint(POD_A, 1, ID_A)).unwrap();
    dp.upsert_endpoint(POD_B, endpoint(POD_B, 1, ID_B)).unwrap();
    dp
}

/// Everything in the ring right now.
fn drain(ring: &mut RingBuf<MapData>) -> Vec<FlowEvent> {
    let mut events = Vec::new();
    while let Some(record) = ring.next() {
        events.push(parse_flow_event(&record).expect("a FlowEvent record"));
    }
    events
}

fn run(dp: &mut Datapath, frame: &[u8]) -> u32 {
    dp.test_run(FROM_POD, frame).unwrap().return_value
}

fn counter(dp: &Datapath, c: Counter) -> u64 {
    dp.counter(c).unwrap()
}

const TO_POD: &str = mesh_common::programs::TO_POD;

/// A packet the node's stack sends into a pod (`to_pod`, tc egress of the pod's veth): its verdict.
fn into_pod(dp: &mut Datapath, frame: &[u8]) -> u32 {
    dp.test_run(TO_POD, frame).unwrap().return_value
}

/// The POLICY conntrack entries.
fn policy_ct(dp: &Datapath) -> Vec<CtKeyV4> {
    dp.conntrack()
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .filter(|k| k.dir == ct_dir::POLICY)
        .collect()
}

fn ct_key(protocol: u8, src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> CtKeyV4 {
    CtKeyV4 {
        saddr: src.octets(),
        daddr: dst.octets(),
        sport_be: sport.to_be(),
        dport_be: dport.to_be(),
        proto: protocol,
        dir: ct_dir::POLICY,
        _pad: 0,
    }
}

/// Puts `ip` (identity `id`) under these policies (`None`: that direction is not enforced).
fn enforce(
    dp: &mut Datapath,
    ip: Ipv4Addr,
    id: u32,
    ingress: Option<Vec<PolicyRule>>,
    egress: Option<Vec<PolicyRule>>,
) {
    dp.replace_endpoint_policy(ip, id, &EndpointPolicy { ingress, egress })
        .unwrap();
}

fn deny_all_egress(dp: &mut Datapath, ip: Ipv4Addr, id: u32) {
    enforce(dp, ip, id, None, Some(vec![]));
}

#[test]
fn the_node_s_connections_to_a_pod_with_egress_deny_all_get_their_replies() {
    let mut dp = datapath();
    deny_all_egress(&mut dp, POD_A, ID_A);
    // What the fix is about: a SYN-ACK to the node whose SYN no program saw is a new egress flow, and denied.
    assert_eq!(
        run(&mut dp, &tcp(POD_A, 8080, NODE_IP, 51000, SYN | ACK)),
        TC_ACT_SHOT
    );
    assert_eq!(counter(&dp, Counter::DropPolicyEgress), 1);

    // The node's SYN (a kubelet probe) passes to_pod, which never drops, and is recorded.
    assert_eq!(
        into_pod(&mut dp, &tcp(NODE_IP, 51000, POD_A, 8080, SYN)),
        TC_ACT_OK
    );
    assert_eq!(policy_ct(&dp), [ct_key(proto::TCP, NODE_IP, 51000, POD_A, 8080)]);
    // Now the pod's answers pass as replies (to the node's stack).
    assert_eq!(
        run(&mut dp, &tcp(POD_A, 8080, NODE_IP, 51000, SYN | ACK)),
        TC_ACT_OK
    );
    assert_eq!(
        into_pod(&mut dp, &tcp(NODE_IP, 51000, POD_A, 8080, ACK)),
        TC_ACT_OK
    );
    assert_eq!(run(&mut dp, &tcp(POD_A, 8080, NODE_IP, 51000, ACK)), TC_ACT_OK);
    assert_eq!(counter(&dp, Counter::PolicyReply), 2);
    // The pod still cannot open a connection to the node, not even to the port the probe came from.
    assert_eq!(run(&mut dp, &tcp(POD_A, 40000, NODE_IP, 22, SYN)), TC_ACT_SHOT);
    assert_eq!(run(&mut dp, &tcp(POD_A, 8081, NODE_IP, 51000, SYN)), TC_ACT_SHOT);
    assert_eq!(counter(&dp, Counter::DropPolicyEgress), 3);

    // Only a SYN opens a TCP connection: a stray segment from the node opens nothing.
    assert_eq!(
        into_pod(&mut dp, &tcp(NODE_IP, 51001, POD_A, 8080, ACK)),
        TC_ACT_OK
    );
    assert_eq!(run(&mut dp, &tcp(POD_A, 8080, NODE_IP, 51001, ACK)), TC_ACT_SHOT);
    // Packets the node forwards from elsewhere are not the node's.
    let outside = Ipv4Addr::new(192, 0, 2, 1);
    assert_eq!(
        into_pod(&mut dp, &tcp(outside, 51002, POD_A, 8080, SYN)),
        TC_ACT_OK
    );
    assert_eq!(
        run(&mut dp, &tcp(POD_A, 8080, outside, 51002, SYN | ACK)),
        TC_ACT_SHOT
    );

    // UDP: the node's datagram is recorded, the pod's answer passes, the pod's own datagrams do not.
    assert_eq!(into_pod(&mut dp, &udp(NODE_IP, 51003, POD_A, 5353)), TC_ACT_OK);
    assert_eq!(run(&mut dp, &udp(POD_A, 5353, NODE_IP, 51003)), TC_ACT_OK);
    assert_eq!(run(&mut dp, &udp(POD_A, 5353, NODE_IP, 53)), TC_ACT_SHOT);
    // ICMP: the node's echo request lets the echo reply out.
    let icmp = |src, dst| frame(proto::ICMP, src, 0, dst, 0, 0);
    assert_eq!(run(&mut dp, &icmp(POD_A, NODE_IP)), TC_ACT_SHOT);
    assert_eq!(into_pod(&mut dp, &icmp(NODE_IP, POD_A)), TC_ACT_OK);
    assert_eq!(run(&mut dp, &icmp(POD_A, NODE_IP)), TC_ACT_OK);
    assert_eq!(
        policy_ct(&dp),
        [
            ct_key(proto::ICMP, NODE_IP, 0, POD_A, 0),
            ct_key(proto::TCP, NODE_IP, 51000, POD_A, 8080),
            ct_key(proto::UDP, NODE_IP, 51003, POD_A, 5353),
        ]
    );
    assert_eq!(counter(&dp, Counter::PolicyReply), 4);
    assert_eq!(counter(&dp, Counter::DropPolicyEgress), 7);
}

#[test]
fn the_node_s_answers_do_not_revive_a_pod_s_revoked_connection_to_the_node() {
    let mut dp = datapath();
    // A may query the node on UDP 53.
    enforce(
        &mut dp,
        POD_A,
        ID_A,
        None,
        Some(vec![rule(identity::HOST, proto::UDP, 53, 16, 1)]),
    );
    assert_eq!(run(&mut dp, &udp(POD_A, 40000, NODE_IP, 53)), TC_ACT_OK);
    // The node's answer is the reply of A's flow, not a flow of the node's.
    assert_eq!(into_pod(&mut dp, &udp(NODE_IP, 53, POD_A, 40000)), TC_ACT_OK);
    assert_eq!(policy_ct(&dp), [ct_key(proto::UDP, POD_A, 40000, NODE_IP, 53)]);
    // Revoked: A's next query is dropped although the node keeps answering.
    deny_all_egress(&mut dp, POD_A, ID_A);
    assert_eq!(into_pod(&mut dp, &udp(NODE_IP, 53, POD_A, 40000)), TC_ACT_OK);
    assert_eq!(run(&mut dp, &udp(POD_A, 40000, NODE_IP, 53)), TC_ACT_SHOT);
}

#[test]
fn to_pod_leaves_pods_without_egress_policy_and_nodes_without_policy_alone() {
    let mut dp = datapath();
    // B has only ingress policy: its replies pass egress anyway, nothing to record for the node's flows.
    enforce(&mut dp, POD_B, ID_B, Some(vec![]), None);
    assert_eq!(
        into_pod(&mut dp, &tcp(NODE_IP, 51000, POD_B, 8080, SYN)),
        TC_ACT_OK
    );
    // A has no policy at all.
    assert_eq!(
        into_pod(&mut dp, &tcp(NODE_IP, 51001, POD_A, 8080, SYN)),
        TC_ACT_OK
    );
    assert_eq!(into_pod(&mut dp, &udp(NODE_IP, 51002, POD_A, 5353)), TC_ACT_OK);
    assert_eq!(policy_ct(&dp), [], "nothing recorded");
    assert_eq!(nonzero(&dp), [], "to_pod counts nothing");
    // A's answer to the node: unpoliced, forwarded as before, not tracked.
    assert_eq!(
        run(&mut dp, &tcp(POD_A, 8080, NODE_IP, 51001, SYN | ACK)),
        TC_ACT_OK
    );
    assert_eq!(nonzero(&dp), [(Counter::PassStack, 1)]);
    assert_eq!(policy_ct(&dp), []);

    // A node without policy (flag off) records nothing, even for a pod whose egress table is still there.
    deny_all_egress(&mut dp, POD_A, ID_A);
    let cfg = dp.node_config().unwrap();
    dp.set_node_config(NodeConfig { flags: 0, ..cfg }).unwrap();
    assert_eq!(
        into_pod(&mut dp, &tcp(NODE_IP, 51003, POD_A, 8080, SYN)),
        TC_ACT_OK
    );
    assert_eq!(policy_ct(&dp), []);
    // Non-IPv4 and malformed frames pass untouched.
    dp.set_node_config(cfg).unwrap();
    let mut arp = tcp(NODE_IP, 51004, POD_A, 8080, SYN);
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    assert_eq!(into_pod(&mut dp, &arp), TC_ACT_OK);
    let mut bad = tcp(NODE_IP, 51005, POD_A, 8080, SYN);
    bad[14] = 0x65;
    assert_eq!(into_pod(&mut dp, &bad), TC_ACT_OK);
    assert_eq!(policy_ct(&dp), []);
}

#[test]
fn lookup_order_decides_which_rule_is_reported() {
    let mut dp = datapath();
    let mut ring = dp.take_flow_events().expect("the ring");
    assert!(dp.take_flow_events().is_none(), "one reader only");
    let egress = vec![
        rule(ID_B, proto::TCP, 80, 16, 1),
        rule(ID_B, proto::TCP, 0, 0, 2),
        rule(ID_B, 0, 0, 0, 3),
        rule(identity::ANY, proto::TCP, 80, 16, 4),
        // 8080-8087.
        rule(identity::ANY, proto::TCP, 8080, 13, 5),
        rule(identity::ANY, 0, 0, 0, 6),
    ];
    enforce(&mut dp, POD_A, ID_A, None, Some(egress));
    let cases = [
        (tcp(POD_A, 40001, POD_B, 80, SYN), 1, ID_B),
        (tcp(POD_A, 40002, POD_B, 81, SYN), 2, ID_B),
        (udp(POD_A, 40003, POD_B, 80), 3, ID_B),
        // REMOTE is pending (its /16 has identity 0): only any-peer rules apply.
        (tcp(POD_A, 40004, REMOTE, 80, SYN), 4, identity::PENDING),
        (tcp(POD_A, 40005, REMOTE, 8085, SYN), 5, identity::PENDING),
        (udp(POD_A, 40006, REMOTE, 53), 6, identity::PENDING),
        // Outside every prefix: WORLD.
        (
            udp(POD_A, 40007, Ipv4Addr::new(192, 0, 2, 1), 53),
            6,
            identity::WORLD,
        ),
        // This node.
        (udp(POD_A, 40008, NODE_IP, 53), 6, identity::HOST),
    ];
    for (frame, want_rule, want_peer) in &cases {
        assert_eq!(run(&mut dp, frame), expected_verdict(frame));
        let events = drain(&mut ring);
        assert_eq!(events.len(), 1, "one event for the new flow: {events:?}");
        let e = events[0];
        assert_eq!((e.rule, e.dir), (*want_rule, policy_dir::EGRESS), "{e:?}");
        assert_eq!((e.src_identity, e.dst_identity), (ID_A, *want_peer), "{e:?}");
        assert_eq!(e.verdict, flow_verdict::FORWARDED);
        assert_eq!(
            Counter::from_index(u32::from(e.reason)),
            Some(Counter::PolicyAllowed)
        );
        assert_eq!(e.saddr, POD_A.octets());
        assert_eq!(
            u16::from_be(e.dport_be),
            u16::from_be_bytes([frame[36], frame[37]])
        );
        assert!(e.timestamp_ns > 0);
    }
    // The second packet of a flow is checked but is not new: no event.
    assert_eq!(run(&mut dp, &tcp(POD_A, 40001, POD_B, 80, ACK)), TC_ACT_REDIRECT);
    assert_eq!(drain(&mut ring), []);
    assert_eq!(counter(&dp, Counter::PolicyAllowed), 9, "{:?}", nonzero(&dp));
}

/// The tc verdict a forwarded frame gets from `loaded()`: redirect to a local pod or to the VXLAN device, the
/// stack for addresses fleetmesh does not route.
fn expected_verdict(frame: &[u8]) -> u32 {
    let dst = Ipv4Addr::new(frame[30], frame[31], frame[32], frame[33]);
    if dst.octets()[0] == 10 {
        TC_ACT_REDIRECT
    } else {
        common::TC_ACT_OK
    }
}

#[test]
fn denied_packets_are_dropped_counted_and_reported() {
    let mut dp = datapath();
    let mut ring = dp.take_flow_events().unwrap();
    // A may reach B on TCP 80 and ID_OTHER on anything; B admits only ID_OTHER.
    dp.replace_endpoint_policy(
        POD_A,
        ID_A,
        &EndpointPolicy {
            ingress: None,
            egress: Some(vec![
                rule(ID_B, proto::TCP, 80, 16, 1),
                rule(ID_OTHER, 0, 0, 0, 2),
            ]),
        },
    )
    .unwrap();
    enforce(
        &mut dp,
        POD_B,
        ID_B,
        Some(vec![rule(ID_OTHER, proto::TCP, 80, 16, 7)]),
        None,
    );

    // Egress denies port 22.
    assert_eq!(run(&mut dp, &tcp(POD_A, 40000, POD_B, 22, SYN)), TC_ACT_SHOT);
    // Egress allows port 80, B's ingress denies.
    assert_eq!(run(&mut dp, &tcp(POD_A, 40001, POD_B, 80, SYN)), TC_ACT_SHOT);
    // A pending destination is not ID_OTHER: a pending drop.
    assert_eq!(run(&mut dp, &tcp(POD_A, 40002, REMOTE, 80, SYN)), TC_ACT_SHOT);
    assert_eq!(
        nonzero(&dp),
        [
            (Counter::DropPolicyIngress, 1),
            (Counter::DropPolicyEgress, 1),
            (Counter::DropPolicyPending, 1),
        ]
    );
    let events = drain(&mut ring);
    let summary: Vec<_> = events
        .iter()
        .map(|e| {
            (
                e.verdict,
                Counter::from_index(u32::from(e.reason)).unwrap(),
                e.dir,
                e.dst_identity,
                e.rule,
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (
                flow_verdict::DROPPED,
                Counter::DropPolicyEgress,
                policy_dir::EGRESS,
                ID_B,
                0
            ),
            (
                flow_verdict::DROPPED,
                Counter::DropPolicyIngress,
                policy_dir::INGRESS,
                ID_B,
                0
            ),
            (
                flow_verdict::DROPPED,
                Counter::DropPolicyPending,
                policy_dir::EGRESS,
                identity::PENDING,
                0
            ),
        ]
    );
    assert!(events.iter().all(|e| e.src_identity == ID_A && e.ifindex != 0));

    // Once REMOTE's identity is synced as ID_OTHER, the same packet passes.
    dp.upsert_ipcache(
        "10.2.0.7/32".parse().unwrap(),
        mesh_common::IpcacheEntry {
            tunnel_endpoint: u32::from(common::REMOTE_NODE),
            identity: ID_OTHER,
            cluster_id: 2,
            family: mesh_common::FAMILY_IPV4,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(run(&mut dp, &tcp(POD_A, 40002, REMOTE, 80, SYN)), TC_ACT_REDIRECT);
    let events = drain(&mut ring);
    assert_eq!(events.len(), 1);
    assert_eq!((events[0].rule, events[0].dst_identity), (2, ID_OTHER));
}

#[test]
fn replies_pass_through_policy_conntrack() {
    let mut dp = datapath();
    // B admits A on TCP 80; A admits nothing (deny all ingress).
    enforce(
        &mut dp,
        POD_B,
        ID_B,
        Some(vec![rule(ID_A, proto::TCP, 80, 16, 3)]),
        None,
    );
    enforce(&mut dp, POD_A, ID_A, Some(vec![]), None);
    assert_eq!(run(&mut dp, &tcp(POD_A, 40000, POD_B, 80, SYN)), TC_ACT_REDIRECT);
    // B's answer reaches A although A's ingress denies everything: it is a reply.
    assert_eq!(
        run(&mut dp, &tcp(POD_B, 80, POD_A, 40000, SYN | ACK)),
        TC_ACT_REDIRECT
    );
    assert_eq!(run(&mut dp, &tcp(POD_B, 80, POD_A, 40000, ACK)), TC_ACT_REDIRECT);
    // A new connection from B to A is not.
    assert_eq!(run(&mut dp, &tcp(POD_B, 40000, POD_A, 80, SYN)), TC_ACT_SHOT);
    assert_eq!(
        nonzero(&dp),
        [
            (Counter::FwdLocal, 3),
            (Counter::PolicyAllowed, 1),
            (Counter::PolicyReply, 2),
            (Counter::DropPolicyIngress, 1),
        ]
    );
}

#[test]
fn unpoliced_traffic_keeps_todays_counters_and_emits_nothing() {
    let mut dp = datapath();
    let mut ring = dp.take_flow_events().unwrap();
    assert_eq!(run(&mut dp, &tcp(POD_A, 40000, POD_B, 80, SYN)), TC_ACT_REDIRECT);
    assert_eq!(run(&mut dp, &tcp(POD_B, 80, POD_A, 40000, ACK)), TC_ACT_REDIRECT);
    assert_eq!(nonzero(&dp), [(Counter::FwdLocal, 2)]);
    assert_eq!(drain(&mut ring), []);
    assert_eq!(dp.conntrack().unwrap(), [], "unpoliced flows are not tracked");
}

#[test]
fn replacing_a_policy_switches_tables_atomically() {
    let mut dp = datapath();
    let v1 = EndpointPolicy {
        ingress: Some(vec![rule(ID_A, proto::TCP, 80, 16, 1)]),
        egress: None,
    };
    let id1 = dp.replace_endpoint_policy(POD_B, ID_B, &v1).unwrap();
    assert_ne!(id1, 0);
    assert_eq!(
        dp.replace_endpoint_policy(POD_B, ID_B, &v1).unwrap(),
        id1,
        "an unchanged policy is left alone"
    );
    assert_eq!(run(&mut dp, &tcp(POD_A, 40000, POD_B, 80, SYN)), TC_ACT_REDIRECT);
    assert_eq!(run(&mut dp, &tcp(POD_A, 40001, POD_B, 443, SYN)), TC_ACT_SHOT);

    // v2: 443 instead of 80, port host bits given are cleared (443/16 stays 443).
    let v2 = EndpointPolicy {
        ingress: Some(vec![
            rule(ID_A, proto::TCP, 443, 16, 2),
            rule(ID_OTHER, proto::UDP, 1000, 8, 3),
        ]),
        egress: Some(vec![]),
    };
    let id2 = dp.replace_endpoint_policy(POD_B, ID_B, &v2).unwrap();
    assert_ne!(id2, id1);
    let entries = dp.policy_entries().unwrap();
    let of = |entries: &[(PolicyKey, PolicyEntry)], id: u32| {
        entries.iter().filter(|(k, _)| k.policy_id == id).count()
    };
    assert_eq!(
        (of(&entries, id2), of(&entries, id1), entries.len()),
        (2, 1, 3),
        "the old table stays as the standby: {entries:?}"
    );
    let ep = dp.endpoint(POD_B).unwrap().unwrap();
    assert_eq!(
        (
            ep.identity,
            ep.policy_id,
            ep.policy_flags,
            ep.ingress_plens,
            ep.egress_plens
        ),
        (
            ID_B,
            id2,
            policy_flags::INGRESS_ENFORCED | policy_flags::EGRESS_ENFORCED,
            1 << 16 | 1 << 8,
            0
        )
    );
    assert_eq!(
        dp.endpoint_policy(POD_B).unwrap(),
        Some(InstalledPolicy {
            identity: ID_B,
            policy_id: id2,
            policy: EndpointPolicy {
                ingress: Some(vec![
                    rule(ID_A, proto::TCP, 443, 16, 2),
                    rule(ID_OTHER, proto::UDP, 768, 8, 3),
                ]),
                egress: Some(vec![]),
            },
        })
    );
    // The new table is in force, the old one is not.
    assert_eq!(run(&mut dp, &tcp(POD_A, 40002, POD_B, 80, SYN)), TC_ACT_SHOT);
    assert_eq!(run(&mut dp, &tcp(POD_A, 40003, POD_B, 443, SYN)), TC_ACT_REDIRECT);

    // v3 (v2 and TCP 80 from A): the standby table (v1's) is brought up to date and switched to; v2's becomes
    // the standby. v1's entry is v3's too, so it stays as it was.
    let v3 = EndpointPolicy {
        ingress: Some(vec![
            rule(ID_A, proto::TCP, 80, 16, 1),
            rule(ID_A, proto::TCP, 443, 16, 2),
            rule(ID_OTHER, proto::UDP, 1000, 8, 3),
        ]),
        egress: Some(vec![]),
    };
    let id3 = dp.replace_endpoint_policy(POD_B, ID_B, &v3).unwrap();
    assert_eq!(id3, id1, "the standby table is reused");
    let entries = dp.policy_entries().unwrap();
    assert_eq!((of(&entries, id1), of(&entries, id2)), (3, 2), "{entries:?}");
    assert_eq!(run(&mut dp, &tcp(POD_A, 40010, POD_B, 80, SYN)), TC_ACT_REDIRECT);
    assert_eq!(run(&mut dp, &tcp(POD_A, 40011, POD_B, 443, SYN)), TC_ACT_REDIRECT);
    // Back to v2: the standby (v2's own table) needs no write at all.
    assert_eq!(dp.replace_endpoint_policy(POD_B, ID_B, &v2).unwrap(), id2);
    assert_eq!(run(&mut dp, &tcp(POD_A, 40012, POD_B, 80, SYN)), TC_ACT_SHOT);
    assert_eq!(
        dp.endpoint_policy(POD_B).unwrap().map(|p| p.policy.ingress),
        Some(Some(vec![
            rule(ID_A, proto::TCP, 443, 16, 2),
            rule(ID_OTHER, proto::UDP, 768, 8, 3),
        ]))
    );

    // The endpoint reconcile re-programming B (new ifindex, identity not known to it) keeps its identity and
    // policy; policy fields it passes are ignored.
    let stale = LocalEndpoint {
        policy_id: 77,
        policy_flags: 0,
        ..endpoint(POD_B, 9, 0)
    };
    dp.upsert_endpoint(POD_B, stale).unwrap();
    let ep = dp.endpoint(POD_B).unwrap().unwrap();
    assert_eq!(
        (ep.ifindex, ep.identity, ep.policy_id, ep.policy_flags),
        (
            9,
            ID_B,
            id2,
            policy_flags::INGRESS_ENFORCED | policy_flags::EGRESS_ENFORCED
        )
    );
    assert_eq!(run(&mut dp, &tcp(POD_A, 40004, POD_B, 80, SYN)), TC_ACT_SHOT);

    // No policy at all: id 0 and no table.
    assert_eq!(
        dp.replace_endpoint_policy(POD_B, ID_B, &EndpointPolicy::default())
            .unwrap(),
        0
    );
    assert_eq!(dp.policy_entries().unwrap(), []);
    assert_eq!(run(&mut dp, &tcp(POD_A, 40005, POD_B, 80, SYN)), TC_ACT_REDIRECT);

    // Removing an endpoint removes its table.
    dp.replace_endpoint_policy(POD_B, ID_B, &v1).unwrap();
    assert_eq!(dp.policy_entries().unwrap().len(), 1);
    dp.remove_endpoint(POD_B).unwrap();
    assert_eq!(dp.policy_entries().unwrap(), []);
    assert_eq!(dp.endpoint_policy(POD_B).unwrap(), None);
    // Policy needs the endpoint; bad port prefixes are refused.
    assert!(matches!(
        dp.replace_endpoint_policy(POD_B, ID_B, &v1),
        Err(DatapathError::UnknownEndpoint(ip)) if ip == POD_B
    ));
    let bad = EndpointPolicy {
        ingress: Some(vec![rule(ID_A, proto::TCP, 80, 17, 1)]),
        egress: None,
    };
    assert!(matches!(
        dp.replace_endpoint_policy(POD_A, ID_A, &bad),
        Err(DatapathError::InvalidPolicy { .. })
    ));
    assert_eq!(
        dp.policy_entries().unwrap(),
        [],
        "nothing left of a refused policy"
    );
}

#[test]
fn flow_events_are_rate_limited_per_cpu() {
    let mut dp = datapath();
    let cfg = dp.node_config().unwrap();
    dp.set_node_config(NodeConfig {
        flow_events_per_sec: 3,
        ..cfg
    })
    .unwrap();
    let mut ring = dp.take_flow_events().unwrap();
    enforce(&mut dp, POD_A, ID_A, None, Some(vec![]));
    // Test runs of one process may land on either CPU: at most 3 events per CPU within the second.
    for port in 0..10 {
        assert_eq!(
            run(&mut dp, &tcp(POD_A, 40000 + port, POD_B, 80, SYN)),
            TC_ACT_SHOT
        );
    }
    let events = drain(&mut ring).len() as u64;
    let suppressed = counter(&dp, Counter::FlowEventsSuppressed);
    assert_eq!(events + suppressed, 10);
    assert!(suppressed >= 1, "{events} events, {suppressed} suppressed");
    assert!(events >= 3, "{events} events");
    assert_eq!(counter(&dp, Counter::FlowEventsLost), 0);
}

#[test]
fn a_full_ring_loses_events_and_counts_them() {
    let mut dp = datapath();
    let cfg = dp.node_config().unwrap();
    dp.set_node_config(NodeConfig {
        flow_events_per_sec: u32::MAX,
        ..cfg
    })
    .unwrap();
    let mut ring = dp.take_flow_events().unwrap();
    enforce(&mut dp, POD_A, ID_A, None, Some(vec![]));
    // 1 MiB holds 21,845 records (a 40-byte event and an 8-byte header); nobody reads meanwhile.
    let packets = 25_000u64;
    let frame = tcp(POD_A, 40000, POD_B, 80, SYN);
    for _ in 0..packets {
        assert_eq!(run(&mut dp, &frame), TC_ACT_SHOT);
    }
    let read = drain(&mut ring).len() as u64;
    let lost = counter(&dp, Counter::FlowEventsLost);
    assert_eq!(read + lost, packets, "{read} read, {lost} lost");
    assert_eq!((read, lost), (21_845, packets - 21_845));
    assert_eq!(counter(&dp, Counter::FlowEventsSuppressed), 0);
    // Once read, the ring takes events again.
    assert_eq!(run(&mut dp, &frame), TC_ACT_SHOT);
    assert_eq!(drain(&mut ring).len(), 1);
}

#[test]
fn tunnel_peers_round_trip() {
    let mut dp = Datapath::load().unwrap();
    let peers = BTreeMap::from([
        (Ipv4Addr::new(172, 18, 0, 3), 2u16),
        (Ipv4Addr::new(172, 18, 0, 4), 3),
    ]);
    dp.set_tunnel_peers(&peers).unwrap();
    assert_eq!(dp.tunnel_peers().unwrap(), peers);
    let fewer = BTreeMap::from([(Ipv4Addr::new(172, 18, 0, 4), 5u16)]);
    dp.set_tunnel_peers(&fewer).unwrap();
    assert_eq!(dp.tunnel_peers().unwrap(), fewer);
    dp.remove_tunnel_peer(Ipv4Addr::new(172, 18, 0, 4)).unwrap();
    dp.remove_tunnel_peer(Ipv4Addr::new(172, 18, 0, 4)).unwrap();
    assert_eq!(dp.tunnel_peers().unwrap(), BTreeMap::new());
}

#[test]
fn overlay_packets_without_tunnel_metadata_drop_before_policy() {
    let mut dp = datapath();
    let mut ring = dp.take_flow_events().unwrap();
    enforce(&mut dp, POD_B, ID_B, Some(vec![]), None);
    let out = dp
        .test_run(FROM_OVERLAY, &tcp(REMOTE, 40000, POD_B, 80, SYN))
        .unwrap();
    assert_eq!(out.return_value, TC_ACT_SHOT);
    assert_eq!(nonzero(&dp), [(Counter::DropNoTunnelKey, 1)]);
    assert_eq!(drain(&mut ring), []);
}

#[test]
fn overlay_source_identity_comes_from_the_vni_and_the_sending_node() {
    let mut lab = Lab::new("polovl");
    let Nodes { n1, n2, u1, u2 } = lab.two_nodes();
    let (a_ip, b_ip) = (Ipv4Addr::new(10, 203, 1, 2), Ipv4Addr::new(10, 203, 2, 2));
    let (pod_a, ep_a) = lab.pod(&n1, "a", "fmp-a", a_ip);
    let (_pod_b, ep_b) = lab.pod(&n2, "b", "fmp-b", b_ip);
    let mut dp1 = node_datapath(&n1, u1, &["fmp-a"]);
    let mut dp2 = node_datapath(&n2, u2, &["fmp-b"]);
    // A is identity 300 of cluster 1 (whose node n1 is); only 300 travels in the VNI.
    let a_identity = identity::compose(1, 300);
    dp1.upsert_endpoint(
        a_ip,
        LocalEndpoint {
            identity: a_identity,
            ..ep_a
        },
    )
    .unwrap();
    dp2.upsert_endpoint(
        b_ip,
        LocalEndpoint {
            identity: identity::compose(1, 301),
            ..ep_b
        },
    )
    .unwrap();
    program_ipcache(&mut dp1, "10.203.1.0/24", "10.203.2.0/24", u2);
    program_ipcache(&mut dp2, "10.203.2.0/24", "10.203.1.0/24", u1);
    // B admits only A's identity (any protocol).
    dp2.replace_endpoint_policy(
        b_ip,
        identity::compose(1, 301),
        &EndpointPolicy {
            ingress: Some(vec![rule(a_identity, 0, 0, 0, 42)]),
            egress: None,
        },
    )
    .unwrap();
    let mut ring = dp2.take_flow_events().unwrap();

    // n2 does not know n1 yet: A's packets are not taken from the overlay at all (policy never sees them).
    dp2.set_tunnel_peers(&BTreeMap::new()).unwrap();
    assert!(
        ping(&pod_a, b_ip).is_err(),
        "ping must fail while the sender's node is unknown"
    );
    assert!(counter(&dp2, Counter::DropOverlayUnknownPeer) >= 1);
    assert_eq!(counter(&dp2, Counter::DropPolicyPending), 0);
    let events = drain(&mut ring);
    assert!(!events.is_empty());
    assert!(
        events.iter().all(|e| e.src_identity == identity::PENDING
            && e.verdict == flow_verdict::DROPPED
            && e.reason == Counter::DropOverlayUnknownPeer as u8),
        "{events:?}"
    );

    // From a known node, but A has no identity yet (VNI 0): an incomplete identity, dropped as pending.
    dp2.set_tunnel_peers(&BTreeMap::from([(u1, 1)])).unwrap();
    // (An upsert with identity 0 keeps the identity programmed: the entry is made anew.)
    dp1.remove_endpoint(a_ip).unwrap();
    dp1.upsert_endpoint(a_ip, ep_a).unwrap();
    assert!(
        ping(&pod_a, b_ip).is_err(),
        "ping must fail while the sender has no identity"
    );
    assert!(counter(&dp2, Counter::DropPolicyPending) >= 1);
    let events = drain(&mut ring);
    assert!(!events.is_empty());
    assert!(
        events.iter().all(|e| e.src_identity == identity::PENDING
            && e.verdict == flow_verdict::DROPPED
            && e.dir == policy_dir::INGRESS),
        "{events:?}"
    );
    dp1.upsert_endpoint(
        a_ip,
        LocalEndpoint {
            identity: a_identity,
            ..ep_a
        },
    )
    .unwrap();

    // A peer of the wrong cluster gives the wrong identity: a plain policy drop.
    dp2.set_tunnel_peers(&BTreeMap::from([(u1, 7)])).unwrap();
    assert!(
        ping(&pod_a, b_ip).is_err(),
        "ping must fail with the wrong cluster"
    );
    assert!(counter(&dp2, Counter::DropPolicyIngress) >= 1);
    let events = drain(&mut ring);
    assert!(
        events.iter().all(|e| e.src_identity == identity::compose(7, 300)),
        "{events:?}"
    );

    dp2.set_tunnel_peers(&BTreeMap::from([(u1, 1)])).unwrap();
    eventually(Duration::from_secs(10), || ping(&pod_a, b_ip)).expect("ping a → b once n1 is a peer");
    let events = drain(&mut ring);
    let allowed: Vec<_> = events
        .iter()
        .filter(|e| e.verdict == flow_verdict::FORWARDED)
        .collect();
    assert_eq!(allowed.len(), 1, "one new flow: {events:?}");
    assert_eq!((allowed[0].src_identity, allowed[0].rule), (a_identity, 42));
    assert!(counter(&dp2, Counter::PolicyAllowed) >= 1);
    // The echo replies left B through policy conntrack on n2.
    assert!(counter(&dp2, Counter::PolicyReply) >= 1);
}

/// Frontend `VIP`:80/TCP (service and rev-NAT id 1) with the given backends (ids 101..).
fn program_service(dp: &mut Datapath, backends: &[(Ipv4Addr, u16)]) {
    for (i, (addr, port)) in backends.iter().enumerate() {
        let id = 101 + u32::try_from(i).unwrap();
        dp.upsert_backend(
            id,
            BackendV4 {
                addr: addr.octets(),
                port_be: port.to_be(),
                proto: proto::TCP,
                cluster_id: 1,
                ..Default::default()
            },
        )
        .unwrap();
        dp.upsert_slot(
            SlotKey {
                service_id: 1,
                slot: u32::try_from(i).unwrap(),
            },
            id,
        )
        .unwrap();
    }
    dp.upsert_revnat(
        1,
        RevNatV4 {
            vip: VIP.octets(),
            port_be: 80u16.to_be(),
            _pad: 0,
        },
    )
    .unwrap();
    dp.upsert_service(
        ServiceKeyV4 {
            vip: VIP.octets(),
            port_be: 80u16.to_be(),
            proto: proto::TCP,
            _pad: 0,
        },
        ServiceEntry {
            service_id: 1,
            slot_count: u32::try_from(backends.len()).unwrap(),
            rev_nat_id: 1,
            ..Default::default()
        },
    )
    .unwrap();
}

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

fn dst_of(packet: &[u8]) -> (Ipv4Addr, u16) {
    (
        Ipv4Addr::new(packet[30], packet[31], packet[32], packet[33]),
        u16::from_be_bytes([packet[36], packet[37]]),
    )
}

#[test]
fn policy_judges_the_backend_not_the_frontend() {
    let mut dp = datapath();
    let mut ring = dp.take_flow_events().unwrap();
    program_service(&mut dp, &[(POD_B, 8080)]);
    // A may reach B on 8080 only (not the frontend port 80); A admits nothing.
    enforce(
        &mut dp,
        POD_A,
        ID_A,
        Some(vec![]),
        Some(vec![rule(ID_B, proto::TCP, 8080, 16, 5)]),
    );
    let out = dp.test_run(FROM_POD, &tcp(POD_A, 40000, VIP, 80, SYN)).unwrap();
    assert_eq!(out.return_value, TC_ACT_REDIRECT);
    assert_eq!(dst_of(&out.packet), (POD_B, 8080), "translated to the backend");
    let events = drain(&mut ring);
    assert_eq!(events.len(), 1, "{events:?}");
    let e = events[0];
    assert_eq!(
        (
            Ipv4Addr::from(e.daddr),
            u16::from_be(e.dport_be),
            e.rule,
            e.dst_identity
        ),
        (POD_B, 8080, 5, ID_B),
        "the event names the backend"
    );
    // B's reply is a policy reply (A's ingress denies everything else) and is translated back to the frontend.
    let out = dp
        .test_run(FROM_POD, &tcp(POD_B, 8080, POD_A, 40000, SYN | ACK))
        .unwrap();
    assert_eq!(out.return_value, TC_ACT_REDIRECT);
    let src = Ipv4Addr::new(out.packet[26], out.packet[27], out.packet[28], out.packet[29]);
    assert_eq!(src, VIP);
    assert_eq!(counter(&dp, Counter::PolicyReply), 1);
    // A frontend whose backend port A may not reach is denied.
    program_service(&mut dp, &[(POD_B, 9090)]);
    assert_eq!(run(&mut dp, &tcp(POD_A, 40001, VIP, 80, SYN)), TC_ACT_SHOT);
    assert_eq!(counter(&dp, Counter::DropPolicyEgress), 1);
}

#[test]
fn hairpin_flows_are_not_subject_to_policy() {
    let mut dp = datapath();
    program_service(&mut dp, &[(POD_A, 8080)]);
    enforce(&mut dp, POD_A, ID_A, Some(vec![]), Some(vec![]));
    // A reaches itself through the frontend (source rewritten to the hairpin address) and answers.
    let out = dp.test_run(FROM_POD, &tcp(POD_A, 40000, VIP, 80, SYN)).unwrap();
    assert_eq!(out.return_value, TC_ACT_REDIRECT);
    assert_eq!(dst_of(&out.packet), (POD_A, 8080));
    let hairpin = Ipv4Addr::new(HAIRPIN_IPV4[0], HAIRPIN_IPV4[1], HAIRPIN_IPV4[2], HAIRPIN_IPV4[3]);
    let out = dp
        .test_run(FROM_POD, &tcp(POD_A, 8080, hairpin, 40000, SYN | ACK))
        .unwrap();
    assert_eq!(out.return_value, TC_ACT_REDIRECT);
    // Anything else A sends is denied.
    assert_eq!(run(&mut dp, &tcp(POD_A, 40001, POD_B, 8080, SYN)), TC_ACT_SHOT);
    let counters = nonzero(&dp);
    assert!(
        !counters.iter().any(|(c, _)| matches!(
            c,
            Counter::PolicyAllowed | Counter::PolicyReply | Counter::DropPolicyIngress
        )),
        "{counters:?}"
    );
    assert_eq!(counter(&dp, Counter::DropPolicyEgress), 1);
}

#[test]
fn a_frontend_without_backends_emits_a_flow_event() {
    let mut dp = datapath();
    let mut ring = dp.take_flow_events().unwrap();
    program_service(&mut dp, &[]);
    assert_eq!(run(&mut dp, &tcp(POD_A, 40000, VIP, 80, SYN)), TC_ACT_SHOT);
    assert_eq!(nonzero(&dp), [(Counter::DropNoBackend, 1)]);
    let events = drain(&mut ring);
    assert_eq!(events.len(), 1, "{events:?}");
    let e = events[0];
    assert_eq!(
        (
            e.verdict,
            Counter::from_index(u32::from(e.reason)),
            e.dir,
            e.src_identity,
            Ipv4Addr::from(e.daddr),
            u16::from_be(e.dport_be),
            e.proto,
        ),
        (
            flow_verdict::DROPPED,
            Some(Counter::DropNoBackend),
            0,
            ID_A,
            VIP,
            80,
            proto::TCP
        )
    );
}

#[test]
fn a_restarted_agent_adopts_policy_tables_and_drops_orphans() {
    let pins = pins::Pins::new("policy");
    let v1 = EndpointPolicy {
        ingress: Some(vec![rule(ID_A, proto::TCP, 80, 16, 1)]),
        egress: None,
    };
    let id1 = {
        let mut dp = Datapath::load_pinned(pins.path()).unwrap();
        dp.upsert_endpoint(POD_B, endpoint(POD_B, 1, ID_B)).unwrap();
        dp.upsert_tunnel_peer(common::REMOTE_NODE, 2).unwrap();
        dp.replace_endpoint_policy(POD_B, ID_B, &v1).unwrap()
    };
    // A table no endpoint names, as an agent that died between writing a table and switching to it leaves it.
    let orphan_id = id1 + 1000;
    {
        let pin = pins
            .path()
            .join(format!("maps-v{}", mesh_agent::datapath::MAP_ABI))
            .join(mesh_common::maps::POLICY);
        let data = MapData::from_pin(&pin).unwrap();
        let mut raw: aya::maps::HashMap<MapData, PolicyKey, PolicyEntry> =
            aya::maps::Map::HashMap(data).try_into().unwrap();
        let key = PolicyKey {
            policy_id: orphan_id,
            identity: ID_A,
            port: 22,
            proto: proto::TCP,
            dir: policy_dir::INGRESS,
            port_plen: 16,
            _pad: [0; 3],
        };
        raw.insert(key, PolicyEntry { rule: 9, _pad: 0 }, 0).unwrap();
    }
    let mut dp = Datapath::load_pinned(pins.path()).unwrap();
    assert!(dp.adoption().maps_reused.contains(&mesh_common::maps::POLICY));
    assert_eq!(
        dp.tunnel_peers().unwrap(),
        BTreeMap::from([(common::REMOTE_NODE, 2)])
    );
    // B's table was adopted with its contents; the orphan is gone.
    let ids: Vec<u32> = dp
        .policy_entries()
        .unwrap()
        .iter()
        .map(|(k, _)| k.policy_id)
        .collect();
    assert_eq!(ids, [id1]);
    assert_eq!(
        dp.endpoint_policy(POD_B).unwrap().unwrap().policy.ingress,
        v1.ingress
    );
    // The adopted index knows the old table (it becomes the standby), and a new id avoids the one in use.
    let id2 = dp
        .replace_endpoint_policy(
            POD_B,
            ID_B,
            &EndpointPolicy {
                ingress: Some(vec![rule(ID_A, proto::TCP, 443, 16, 2)]),
                egress: None,
            },
        )
        .unwrap();
    assert_ne!(id2, id1);
    let keys: Vec<(u32, u16)> = dp
        .policy_entries()
        .unwrap()
        .iter()
        .map(|(k, _)| (k.policy_id, k.port))
        .collect();
    assert_eq!(keys, [(id1, 80), (id2, 443)]);
    // A restart keeps the table in force and deletes the standby (no endpoint names it).
    drop(dp);
    let dp = Datapath::load_pinned(pins.path()).unwrap();
    let keys: Vec<(u32, u16)> = dp
        .policy_entries()
        .unwrap()
        .iter()
        .map(|(k, _)| (k.policy_id, k.port))
        .collect();
    assert_eq!(keys, [(id2, 443)]);
}

/// The node flag `node_flags::POLICY` decides whether the programs look at policy at all: the agent sets it
/// before any endpoint is enforced; off, a node pays nothing for policy (and enforces none).
#[test]
fn policy_is_consulted_only_while_the_node_flag_is_set() {
    let mut dp = datapath();
    enforce(&mut dp, POD_B, ID_B, Some(vec![]), None);
    assert_eq!(
        run(&mut dp, &tcp(POD_A, 41000, POD_B, 80, SYN)),
        TC_ACT_SHOT,
        "default deny in force"
    );
    let cfg = dp.node_config().unwrap();
    dp.set_node_config(NodeConfig { flags: 0, ..cfg }).unwrap();
    assert_ne!(
        run(&mut dp, &tcp(POD_A, 41001, POD_B, 80, SYN)),
        TC_ACT_SHOT,
        "flag off: no policy path"
    );
    dp.set_node_config(cfg).unwrap();
    assert_eq!(
        run(&mut dp, &tcp(POD_A, 41002, POD_B, 80, SYN)),
        TC_ACT_SHOT,
        "flag on again: enforced"
    );
}

/// An `ipBlock` matches pod addresses too (Calico's semantics; upstream's NetworkPolicy e2e "egress to a server in
/// a CIDR block"): the remote pod 10.2.0.7 has its own pod identity in the ipcache, yet A's egress rule for the
/// CIDR identity of 10.2.0.0/16 admits it, and the `except` prefix 10.2.0.0/29 (its own CIDR identity) does not.
#[test]
fn ip_blocks_match_pod_addresses_through_the_policy_prefix_map() {
    const CIDR_BLOCK: u32 = identity::FIRST_CIDR;
    const CIDR_EXCEPT: u32 = identity::FIRST_CIDR + 1;
    let mut dp = datapath();
    dp.upsert_ipcache(
        "10.2.0.7/32".parse().unwrap(),
        mesh_common::IpcacheEntry {
            tunnel_endpoint: u32::from(common::REMOTE_NODE),
            identity: ID_OTHER,
            cluster_id: 2,
            family: mesh_common::FAMILY_IPV4,
            ..Default::default()
        },
    )
    .unwrap();
    enforce(
        &mut dp,
        POD_A,
        ID_A,
        None,
        Some(vec![rule(CIDR_BLOCK, proto::TCP, 80, 16, 1)]),
    );
    let installed = dp.endpoint_policy(POD_A).unwrap().unwrap();
    assert_eq!(installed.identity, ID_A);
    // The prefix map is empty: the pod's own identity finds nothing.
    assert_eq!(run(&mut dp, &tcp(POD_A, 41000, REMOTE, 80, SYN)), TC_ACT_SHOT);
    let block: ipnet::Ipv4Net = "10.2.0.0/16".parse().unwrap();
    let except: ipnet::Ipv4Net = "10.2.0.0/29".parse().unwrap();
    dp.set_policy_cidrs(&BTreeMap::from([(block, CIDR_BLOCK)]))
        .unwrap();
    assert_eq!(
        dp.read_policy_cidrs().unwrap(),
        BTreeMap::from([(block, CIDR_BLOCK)])
    );
    assert_eq!(run(&mut dp, &tcp(POD_A, 41001, REMOTE, 80, SYN)), TC_ACT_REDIRECT);
    assert_eq!(
        run(&mut dp, &tcp(POD_A, 41002, REMOTE, 81, SYN)),
        TC_ACT_SHOT,
        "port 81 is not allowed"
    );
    // 10.2.0.7 falls into the except prefix once it is programmed: denied again.
    dp.set_policy_cidrs(&BTreeMap::from([(block, CIDR_BLOCK), (except, CIDR_EXCEPT)]))
        .unwrap();
    assert_eq!(run(&mut dp, &tcp(POD_A, 41003, REMOTE, 80, SYN)), TC_ACT_SHOT);
    // Removing the block removes the map entry; the pod is then judged by its identity only.
    dp.set_policy_cidrs(&BTreeMap::new()).unwrap();
    assert!(dp.read_policy_cidrs().unwrap().is_empty());
    assert_eq!(run(&mut dp, &tcp(POD_A, 41004, REMOTE, 80, SYN)), TC_ACT_SHOT);
}
