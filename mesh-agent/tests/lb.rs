//! Service load balancing in the datapath (need root with CAP_BPF / CAP_NET_ADMIN).
//!
//! - `BPF_PROG_TEST_RUN` on crafted TCP and UDP frames with full checksums (test runs hand the program
//!   CHECKSUM_NONE packets): translation, recomputed checksums, conntrack entries, counters.
//! - Real traffic in network namespaces: two pods on one node and one on a second node behind VXLAN, servers that
//!   answer with their name, clients that connect to the VIP; hairpin; a backend on the other node.
//! - The loader's map API for services, slots, backends and rev-NAT.
mod common;

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use common::{
    FROM_OVERLAY, FROM_POD, HOST_MAC, Lab, Nodes, POD_A, POD_B, REMOTE_POD, TC_ACT_OK, TC_ACT_REDIRECT,
    TC_ACT_SHOT, eventually, in_netns, loaded, node_datapath, nonzero, ping, program_ipcache,
};
use mesh_agent::datapath::Datapath;
use mesh_common::{
    BackendV4, Counter, CtEntryV4, CtKeyV4, HAIRPIN_IPV4, NodeConfig, RevNatV4, ServiceEntry, ServiceKeyV4,
    SlotKey, ct_dir, ct_flags, pod_mac_for_ipv4, proto,
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const HAIRPIN: Ipv4Addr = Ipv4Addr::new(HAIRPIN_IPV4[0], HAIRPIN_IPV4[1], HAIRPIN_IPV4[2], HAIRPIN_IPV4[3]);
const CLIENT_PORT: u16 = 40000;

// ---------------------------------------------------------------------------------------------------------------
// Frames and checksums
// ---------------------------------------------------------------------------------------------------------------

/// One's complement sum of `data` (16-bit big-endian words, odd tail padded), not yet complemented.
fn ones_sum(mut acc: u32, data: &[u8]) -> u32 {
    for pair in data.chunks(2) {
        let word = u16::from_be_bytes([pair[0], pair.get(1).copied().unwrap_or(0)]);
        acc += u32::from(word);
    }
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc
}

/// The transport checksum of `segment` (its checksum field included) with the IPv4 pseudo-header.
fn l4_sum(src: [u8; 4], dst: [u8; 4], protocol: u8, segment: &[u8]) -> u32 {
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&src);
    pseudo.extend_from_slice(&dst);
    pseudo.extend_from_slice(&[0, protocol]);
    pseudo.extend_from_slice(&u16::try_from(segment.len()).unwrap().to_be_bytes());
    ones_sum(ones_sum(0, &pseudo), segment)
}

/// A parsed view of a frame built by [`frame`].
struct View<'a>(&'a [u8]);

impl View<'_> {
    fn ihl_len(&self) -> usize {
        usize::from(self.0[14] & 0x0f) * 4
    }
    fn l4(&self) -> usize {
        14 + self.ihl_len()
    }
    fn src(&self) -> SocketAddrV4 {
        let l4 = self.l4();
        SocketAddrV4::new(
            Ipv4Addr::from(<[u8; 4]>::try_from(&self.0[26..30]).unwrap()),
            u16::from_be_bytes([self.0[l4], self.0[l4 + 1]]),
        )
    }
    fn dst(&self) -> SocketAddrV4 {
        let l4 = self.l4();
        SocketAddrV4::new(
            Ipv4Addr::from(<[u8; 4]>::try_from(&self.0[30..34]).unwrap()),
            u16::from_be_bytes([self.0[l4 + 2], self.0[l4 + 3]]),
        )
    }
    fn protocol(&self) -> u8 {
        self.0[23]
    }
    fn csum_offset(&self) -> usize {
        self.l4() + if self.protocol() == proto::TCP { 16 } else { 6 }
    }
    fn l4_csum(&self) -> u16 {
        let at = self.csum_offset();
        u16::from_be_bytes([self.0[at], self.0[at + 1]])
    }

    /// Panics unless the IPv4 header checksum and the transport checksum (UDP: unless it is 0) verify.
    fn assert_checksums(&self, what: &str) {
        assert_eq!(
            ones_sum(0, &self.0[14..self.l4()]),
            0xffff,
            "{what}: IPv4 header checksum"
        );
        if self.protocol() == proto::UDP && self.l4_csum() == 0 {
            return;
        }
        let ip_src = <[u8; 4]>::try_from(&self.0[26..30]).unwrap();
        let ip_dst = <[u8; 4]>::try_from(&self.0[30..34]).unwrap();
        assert_eq!(
            l4_sum(ip_src, ip_dst, self.protocol(), &self.0[self.l4()..]),
            0xffff,
            "{what}: transport checksum"
        );
    }
}

/// TCP flags used in crafted frames.
const SYN: u8 = 0x02;
const ACK: u8 = 0x10;

/// Ethernet + IPv4 (IHL `ihl`, options zero-filled) + TCP (flags `tcp_flags`) or UDP + 24 payload bytes, with
/// correct checksums; `udp_zero_csum` sends UDP without checksum.
fn frame(
    protocol: u8,
    src: SocketAddrV4,
    dst: SocketAddrV4,
    ihl: u8,
    tcp_flags: u8,
    udp_zero_csum: bool,
) -> Vec<u8> {
    let ip_hlen = usize::from(ihl) * 4;
    let l4_hlen = if protocol == proto::TCP { 20 } else { 8 };
    let payload = 24;
    let total = ip_hlen + l4_hlen + payload;
    let mut f = vec![0u8; 14 + total];
    f[0..6].copy_from_slice(&HOST_MAC);
    f[6..12].copy_from_slice(&pod_mac_for_ipv4(src.ip().octets()));
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    f[14] = 0x40 | ihl;
    f[16..18].copy_from_slice(&u16::try_from(total).unwrap().to_be_bytes());
    f[22] = 64;
    f[23] = protocol;
    f[26..30].copy_from_slice(&src.ip().octets());
    f[30..34].copy_from_slice(&dst.ip().octets());
    let ip_csum = !u16::try_from(ones_sum(0, &f[14..14 + ip_hlen])).unwrap();
    f[24..26].copy_from_slice(&ip_csum.to_be_bytes());
    let l4 = 14 + ip_hlen;
    f[l4..l4 + 2].copy_from_slice(&src.port().to_be_bytes());
    f[l4 + 2..l4 + 4].copy_from_slice(&dst.port().to_be_bytes());
    if protocol == proto::TCP {
        f[l4 + 12] = 5 << 4;
        f[l4 + 13] = tcp_flags;
        f[l4 + 14..l4 + 16].copy_from_slice(&64240u16.to_be_bytes());
    } else {
        f[l4 + 4..l4 + 6].copy_from_slice(&u16::try_from(8 + payload).unwrap().to_be_bytes());
    }
    for (i, b) in f[l4 + l4_hlen..].iter_mut().enumerate() {
        *b = u8::try_from(i * 7 % 251).unwrap();
    }
    if !(protocol == proto::UDP && udp_zero_csum) {
        let view = View(&f);
        let at = view.csum_offset();
        let sum = !u16::try_from(l4_sum(src.ip().octets(), dst.ip().octets(), protocol, &f[l4..])).unwrap();
        // A computed UDP checksum of 0 is sent as 0xffff.
        let sum = if sum == 0 && protocol == proto::UDP {
            0xffff
        } else {
            sum
        };
        f[at..at + 2].copy_from_slice(&sum.to_be_bytes());
    }
    View(&f).assert_checksums("crafted frame");
    f
}

fn tcp(src: SocketAddrV4, dst: SocketAddrV4, flags: u8) -> Vec<u8> {
    frame(proto::TCP, src, dst, 5, flags, false)
}

fn udp(src: SocketAddrV4, dst: SocketAddrV4) -> Vec<u8> {
    frame(proto::UDP, src, dst, 5, 0, false)
}

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

// ---------------------------------------------------------------------------------------------------------------
// Services in the maps
// ---------------------------------------------------------------------------------------------------------------

/// A frontend with its backends, as the control plane would program it: service id and rev-NAT id `id`, slot
/// `i` → backend id `id * 100 + i`.
struct Service {
    id: u32,
    vip: Ipv4Addr,
    port: u16,
    protocol: u8,
    backends: Vec<SocketAddrV4>,
}

impl Service {
    fn key(&self) -> ServiceKeyV4 {
        ServiceKeyV4 {
            vip: self.vip.octets(),
            port_be: self.port.to_be(),
            proto: self.protocol,
            _pad: 0,
        }
    }

    fn backend_id(&self, slot: usize) -> u32 {
        self.id * 100 + u32::try_from(slot).unwrap()
    }

    fn backend(&self, slot: usize) -> BackendV4 {
        let b = self.backends[slot];
        BackendV4 {
            addr: b.ip().octets(),
            port_be: b.port().to_be(),
            proto: self.protocol,
            cluster_id: 1,
            ..Default::default()
        }
    }

    fn slot_key(&self, slot: usize) -> SlotKey {
        SlotKey {
            service_id: self.id,
            slot: u32::try_from(slot).unwrap(),
        }
    }

    fn program(&self, dp: &mut Datapath) {
        for slot in 0..self.backends.len() {
            dp.upsert_backend(self.backend_id(slot), self.backend(slot))
                .unwrap();
            dp.upsert_slot(self.slot_key(slot), self.backend_id(slot))
                .unwrap();
        }
        dp.upsert_revnat(
            self.id,
            RevNatV4 {
                vip: self.vip.octets(),
                port_be: self.port.to_be(),
                _pad: 0,
            },
        )
        .unwrap();
        dp.upsert_service(
            self.key(),
            ServiceEntry {
                service_id: self.id,
                slot_count: u32::try_from(self.backends.len()).unwrap(),
                rev_nat_id: self.id,
                ..Default::default()
            },
        )
        .unwrap();
    }
}

fn service(id: u32, protocol: u8, backends: &[SocketAddrV4]) -> Service {
    Service {
        id,
        vip: VIP,
        port: 80,
        protocol,
        backends: backends.to_vec(),
    }
}

fn ct_key(protocol: u8, src: SocketAddrV4, dst: SocketAddrV4, dir: u8) -> CtKeyV4 {
    CtKeyV4 {
        saddr: src.ip().octets(),
        daddr: dst.ip().octets(),
        sport_be: src.port().to_be(),
        dport_be: dst.port().to_be(),
        proto: protocol,
        dir,
        _pad: 0,
    }
}

// ---------------------------------------------------------------------------------------------------------------
// BPF_PROG_TEST_RUN
// ---------------------------------------------------------------------------------------------------------------

/// Client A connects to the VIP; the only backend is B (local): DNAT, checksums, conntrack, reply rev-NAT.
fn dnat_and_reply(protocol: u8) {
    let mut dp = loaded();
    let svc = service(1, protocol, &[sa(POD_B, 8080)]);
    svc.program(&mut dp);
    let (client, vip, backend) = (sa(POD_A, CLIENT_PORT), sa(VIP, 80), sa(POD_B, 8080));
    let first = frame(protocol, client, vip, 5, SYN, false);

    let out = dp.test_run(FROM_POD, &first).unwrap();
    assert_eq!(out.return_value, TC_ACT_REDIRECT);
    let v = View(&out.packet);
    assert_eq!((v.src(), v.dst()), (client, backend), "DNAT to the backend");
    v.assert_checksums("DNATed packet");
    assert_eq!(
        out.packet[0..6],
        pod_mac_for_ipv4(POD_B.octets()),
        "delivered to B"
    );
    assert_eq!(out.packet.len(), first.len());

    let ct = dp.conntrack().unwrap();
    let entry = |key| ct.iter().find(|(k, _)| *k == key).map(|(_, e)| *e);
    assert_eq!(ct.len(), 2, "{ct:?}");
    assert_eq!(
        entry(ct_key(protocol, client, vip, ct_dir::SERVICE)),
        Some(CtEntryV4 {
            addr: POD_B.octets(),
            port_be: 8080u16.to_be(),
            rev_nat_id: 1,
            flags: 0,
            backend_id: 100,
            ..Default::default()
        })
    );
    let reply = entry(ct_key(protocol, backend, client, ct_dir::REPLY)).expect("REPLY entry");
    assert_eq!((reply.rev_nat_id, reply.flags), (1, 0));

    // The backend answers: the client sees the VIP.
    let answer = frame(protocol, backend, client, 5, SYN | ACK, false);
    let out = dp.test_run(FROM_POD, &answer).unwrap();
    assert_eq!(out.return_value, TC_ACT_REDIRECT);
    let v = View(&out.packet);
    assert_eq!((v.src(), v.dst()), (vip, client), "rev-NAT to the VIP");
    v.assert_checksums("rev-NATed packet");
    assert_eq!(
        out.packet[0..6],
        pod_mac_for_ipv4(POD_A.octets()),
        "delivered to A"
    );

    assert_eq!(
        nonzero(&dp),
        [
            (Counter::FwdLocal, 2),
            (Counter::LbNewFlow, 1),
            (Counter::LbTranslated, 2)
        ]
    );
}

#[test]
fn tcp_to_a_vip_is_translated_to_the_backend_and_its_reply_to_the_vip() {
    dnat_and_reply(proto::TCP);
}

#[test]
fn udp_to_a_vip_is_translated_to_the_backend_and_its_reply_to_the_vip() {
    dnat_and_reply(proto::UDP);
}

#[test]
fn translation_honours_ip_options_and_keeps_checksums_valid() {
    let mut dp = loaded();
    service(1, proto::TCP, &[sa(POD_B, 8080)]).program(&mut dp);
    service(2, proto::UDP, &[sa(POD_B, 8080)]).program(&mut dp);
    for ihl in 5..=15 {
        for protocol in [proto::TCP, proto::UDP] {
            let client = sa(POD_A, 30000 + u16::from(ihl));
            let out = dp
                .test_run(FROM_POD, &frame(protocol, client, sa(VIP, 80), ihl, ACK, false))
                .unwrap();
            assert_eq!(out.return_value, TC_ACT_REDIRECT, "ihl {ihl} proto {protocol}");
            let v = View(&out.packet);
            assert_eq!(v.dst(), sa(POD_B, 8080), "ihl {ihl} proto {protocol}");
            v.assert_checksums(&format!("ihl {ihl} proto {protocol}"));
        }
    }
}

#[test]
fn udp_without_checksum_keeps_it_zero() {
    let mut dp = loaded();
    service(1, proto::UDP, &[sa(POD_B, 8080)]).program(&mut dp);
    let client = sa(POD_A, CLIENT_PORT);
    let out = dp
        .test_run(FROM_POD, &frame(proto::UDP, client, sa(VIP, 80), 5, 0, true))
        .unwrap();
    assert_eq!(out.return_value, TC_ACT_REDIRECT);
    let v = View(&out.packet);
    assert_eq!(v.dst(), sa(POD_B, 8080));
    assert_eq!(v.l4_csum(), 0, "no checksum stays no checksum");
    v.assert_checksums("DNATed UDP without checksum");
    let out = dp
        .test_run(FROM_POD, &frame(proto::UDP, sa(POD_B, 8080), client, 5, 0, true))
        .unwrap();
    let v = View(&out.packet);
    assert_eq!((v.src(), v.l4_csum()), (sa(VIP, 80), 0));
    v.assert_checksums("rev-NATed UDP without checksum");
}

#[test]
fn established_flow_keeps_its_backend_after_its_slot_and_backend_are_gone() {
    let mut dp = loaded();
    dp.set_node_config(NodeConfig {
        vxlan_ifindex: 1,
        ..Default::default()
    })
    .unwrap();
    let svc = service(1, proto::TCP, &[sa(POD_B, 8080)]);
    svc.program(&mut dp);
    let (client, vip) = (sa(POD_A, CLIENT_PORT), sa(VIP, 80));
    let out = dp.test_run(FROM_POD, &tcp(client, vip, SYN)).unwrap();
    assert_eq!(View(&out.packet).dst(), sa(POD_B, 8080));

    // The slot now names a backend on another node, and B is gone from the backends.
    let remote = BackendV4 {
        addr: REMOTE_POD.octets(),
        port_be: 9090u16.to_be(),
        proto: proto::TCP,
        ..Default::default()
    };
    dp.upsert_backend(7, remote).unwrap();
    dp.upsert_slot(svc.slot_key(0), 7).unwrap();
    dp.remove_backend(svc.backend_id(0)).unwrap();
    let out = dp.test_run(FROM_POD, &tcp(client, vip, ACK)).unwrap();
    assert_eq!(out.return_value, TC_ACT_REDIRECT);
    assert_eq!(
        View(&out.packet).dst(),
        sa(POD_B, 8080),
        "established flow stays on B"
    );
    assert_eq!(out.packet[0..6], pod_mac_for_ipv4(POD_B.octets()));
    // The same with the frontend's slot table emptied: established flows go on, new ones are dropped.
    dp.remove_slot(svc.slot_key(0)).unwrap();
    let out = dp.test_run(FROM_POD, &tcp(client, vip, ACK)).unwrap();
    assert_eq!(View(&out.packet).dst(), sa(POD_B, 8080));
    let out = dp.test_run(FROM_POD, &tcp(sa(POD_A, 40001), vip, SYN)).unwrap();
    assert_eq!(
        out.return_value, TC_ACT_SHOT,
        "new flow, slot 0 without backend id"
    );

    // A new connection (SYN) that reuses the tuple of the flow whose backend is gone selects anew: the remote
    // backend, through the tunnel.
    dp.upsert_slot(svc.slot_key(0), 7).unwrap();
    let out = dp.test_run(FROM_POD, &tcp(client, vip, SYN)).unwrap();
    assert_eq!(out.return_value, TC_ACT_REDIRECT);
    let v = View(&out.packet);
    assert_eq!(v.dst(), sa(REMOTE_POD, 9090));
    v.assert_checksums("re-selected SYN");
    assert_eq!(
        nonzero(&dp),
        [
            (Counter::FwdLocal, 3),
            (Counter::FwdTunnel, 1),
            (Counter::LbNewFlow, 2),
            (Counter::LbTranslated, 4),
            (Counter::DropNoBackend, 1),
        ]
    );
}

/// The tuple reuse the bench ran into: a client reached B through the VIP from port P; later it connects to B
/// directly from the same port P. B's SYN-ACK must reach the client untranslated (from B, not from the VIP).
#[test]
fn direct_connection_reusing_a_vip_flows_tuple_gets_untranslated_replies() {
    let mut dp = loaded();
    service(1, proto::TCP, &[sa(POD_B, 8080)]).program(&mut dp);
    let (client, vip, backend) = (sa(POD_A, CLIENT_PORT), sa(VIP, 80), sa(POD_B, 8080));
    dp.test_run(FROM_POD, &tcp(client, vip, SYN)).unwrap();
    let out = dp.test_run(FROM_POD, &tcp(backend, client, SYN | ACK)).unwrap();
    assert_eq!(
        View(&out.packet).src(),
        vip,
        "reply of the VIP flow comes from the VIP"
    );

    let direct = tcp(client, backend, SYN);
    let out = dp.test_run(FROM_POD, &direct).unwrap();
    assert_eq!(
        (out.return_value, &out.packet[12..]),
        (TC_ACT_REDIRECT, &direct[12..])
    );
    let answer = tcp(backend, client, SYN | ACK);
    let out = dp.test_run(FROM_POD, &answer).unwrap();
    assert_eq!(out.return_value, TC_ACT_REDIRECT);
    assert_eq!(
        &out.packet[12..],
        &answer[12..],
        "direct flow's reply left untranslated"
    );
    assert!(
        dp.conntrack()
            .unwrap()
            .iter()
            .all(|(k, _)| *k != ct_key(proto::TCP, backend, client, ct_dir::REPLY)),
        "stale REPLY entry removed"
    );
}

#[test]
fn frontend_without_backends_drops_and_counts() {
    let mut dp = loaded();
    service(1, proto::TCP, &[]).program(&mut dp);
    let out = dp
        .test_run(FROM_POD, &tcp(sa(POD_A, CLIENT_PORT), sa(VIP, 80), SYN))
        .unwrap();
    assert_eq!(out.return_value, TC_ACT_SHOT);
    assert_eq!(nonzero(&dp), [(Counter::DropNoBackend, 1)]);
    assert_eq!(dp.conntrack().unwrap(), []);
}

#[test]
fn hairpin_snats_the_client_and_rev_nats_its_own_reply() {
    let mut dp = loaded();
    service(1, proto::TCP, &[sa(POD_A, 8080)]).program(&mut dp);
    let (client, vip, backend) = (sa(POD_A, CLIENT_PORT), sa(VIP, 80), sa(POD_A, 8080));
    let out = dp.test_run(FROM_POD, &tcp(client, vip, SYN)).unwrap();
    assert_eq!(out.return_value, TC_ACT_REDIRECT);
    let v = View(&out.packet);
    let hairpin_client = sa(HAIRPIN, CLIENT_PORT);
    assert_eq!((v.src(), v.dst()), (hairpin_client, backend));
    v.assert_checksums("hairpin SNAT + DNAT");
    assert_eq!(out.packet[0..6], pod_mac_for_ipv4(POD_A.octets()), "back to A");
    let ct = dp.conntrack().unwrap();
    let reply = ct
        .iter()
        .find(|(k, _)| *k == ct_key(proto::TCP, backend, hairpin_client, ct_dir::REPLY))
        .map(|(_, e)| *e)
        .expect("hairpin REPLY entry");
    assert_eq!((reply.flags, reply.addr), (ct_flags::HAIRPIN, POD_A.octets()));

    // The pod's answer to 169.254.42.1 comes back from the VIP, to itself.
    let out = dp
        .test_run(FROM_POD, &tcp(backend, hairpin_client, SYN | ACK))
        .unwrap();
    assert_eq!(out.return_value, TC_ACT_REDIRECT);
    let v = View(&out.packet);
    assert_eq!((v.src(), v.dst()), (vip, client));
    v.assert_checksums("hairpin reply");
}

#[test]
fn non_service_traffic_and_later_fragments_are_not_translated() {
    let mut dp = loaded();
    service(1, proto::TCP, &[sa(POD_B, 8080)]).program(&mut dp);
    // Another port of the VIP, another protocol: no frontend, and no route either (the stack decides).
    for f in [
        tcp(sa(POD_A, CLIENT_PORT), sa(VIP, 81), SYN),
        udp(sa(POD_A, CLIENT_PORT), sa(VIP, 80)),
    ] {
        let out = dp.test_run(FROM_POD, &f).unwrap();
        assert_eq!((out.return_value, &out.packet), (TC_ACT_OK, &f));
    }
    // Pod to pod directly.
    let f = tcp(sa(POD_A, CLIENT_PORT), sa(POD_B, 8080), SYN);
    let out = dp.test_run(FROM_POD, &f).unwrap();
    assert_eq!((out.return_value, &out.packet[12..]), (TC_ACT_REDIRECT, &f[12..]));
    // A later fragment carries no ports: never translated.
    let mut f = tcp(sa(POD_A, CLIENT_PORT), sa(VIP, 80), SYN);
    f[20..22].copy_from_slice(&100u16.to_be_bytes());
    let out = dp.test_run(FROM_POD, &f).unwrap();
    assert_eq!((out.return_value, &out.packet), (TC_ACT_OK, &f));
    assert_eq!(dp.conntrack().unwrap(), []);
    assert_eq!(nonzero(&dp), [(Counter::FwdLocal, 1), (Counter::PassStack, 3)]);
}

#[test]
fn overlay_packets_without_tunnel_metadata_drop_before_load_balancing() {
    let mut dp = loaded();
    service(1, proto::TCP, &[sa(REMOTE_POD, 8080)]).program(&mut dp);
    let out = dp
        .test_run(
            FROM_OVERLAY,
            &tcp(sa(REMOTE_POD, 8080), sa(POD_A, CLIENT_PORT), ACK),
        )
        .unwrap();
    assert_eq!(out.return_value, TC_ACT_SHOT);
    assert_eq!(nonzero(&dp), [(Counter::DropNoTunnelKey, 1)]);
}

// ---------------------------------------------------------------------------------------------------------------
// Map API
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn service_maps_round_trip_sorted_and_absent_removal_is_fine() {
    let mut dp = Datapath::load().unwrap();
    assert_eq!(dp.services().unwrap(), []);
    let udp_svc = service(2, proto::UDP, &[sa(POD_B, 53), sa(POD_A, 53)]);
    let tcp_svc = service(1, proto::TCP, &[sa(POD_B, 8080)]);
    udp_svc.program(&mut dp);
    tcp_svc.program(&mut dp);
    let services = dp.services().unwrap();
    assert_eq!(
        services
            .iter()
            .map(|(k, e)| (*k, e.service_id))
            .collect::<Vec<_>>(),
        [(tcp_svc.key(), 1), (udp_svc.key(), 2)],
        "sorted by VIP, port, protocol"
    );
    assert_eq!(
        dp.slots().unwrap(),
        [
            (tcp_svc.slot_key(0), 100),
            (udp_svc.slot_key(0), 200),
            (udp_svc.slot_key(1), 201)
        ]
    );
    assert_eq!(
        dp.backends().unwrap(),
        [
            (100, tcp_svc.backend(0)),
            (200, udp_svc.backend(0)),
            (201, udp_svc.backend(1))
        ]
    );
    assert_eq!(
        dp.revnats()
            .unwrap()
            .iter()
            .map(|(id, _)| *id)
            .collect::<Vec<_>>(),
        [1, 2]
    );

    dp.remove_service(udp_svc.key()).unwrap();
    dp.remove_service(udp_svc.key()).unwrap();
    dp.remove_slot(udp_svc.slot_key(1)).unwrap();
    dp.remove_slot(udp_svc.slot_key(1)).unwrap();
    dp.remove_backend(201).unwrap();
    dp.remove_backend(201).unwrap();
    dp.remove_revnat(2).unwrap();
    dp.remove_revnat(2).unwrap();
    assert_eq!(dp.services().unwrap().len(), 1);
    assert_eq!(dp.slots().unwrap().len(), 2);
    assert_eq!(dp.backends().unwrap().len(), 2);
    assert_eq!(dp.revnats().unwrap().len(), 1);
    assert_eq!(dp.conntrack().unwrap(), []);
}

// ---------------------------------------------------------------------------------------------------------------
// Real traffic
// ---------------------------------------------------------------------------------------------------------------

/// A pod's servers on :8080 (TCP and UDP): each answers with `<name> <client address>`. Stopped on drop.
struct Servers {
    tcp: TcpListener,
    udp: UdpSocket,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Servers {
    fn start(pod_ns: &str, addr: Ipv4Addr, name: &str) -> Self {
        let (tcp, udp) = in_netns(pod_ns, || {
            (
                TcpListener::bind((addr, 8080)).expect("bind TCP server"),
                UdpSocket::bind((addr, 8080)).expect("bind UDP server"),
            )
        });
        let stop = Arc::new(AtomicBool::new(false));
        let tcp_thread = {
            let (listener, stop, name) = (tcp.try_clone().unwrap(), stop.clone(), name.to_owned());
            std::thread::spawn(move || {
                // Woken by shutdown() on drop (accept then fails).
                while let Ok((mut conn, peer)) = listener.accept() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let _ = conn.write_all(format!("{name} {}", peer.ip()).as_bytes());
                }
            })
        };
        let udp_thread = {
            let (socket, stop, name) = (udp.try_clone().unwrap(), stop.clone(), name.to_owned());
            std::thread::spawn(move || {
                let mut buf = [0u8; 64];
                // Woken by shutdown() on drop (recv then returns 0 bytes from nobody).
                while let Ok((_, peer)) = socket.recv_from(&mut buf) {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let _ = socket.send_to(format!("{name} {}", peer.ip()).as_bytes(), peer);
                }
            })
        };
        Self {
            tcp,
            udp,
            stop,
            threads: vec![tcp_thread, udp_thread],
        }
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // SAFETY: shutdown on sockets we own; on Linux it wakes a thread blocked in accept()/recvfrom().
        unsafe {
            libc::shutdown(self.tcp.as_raw_fd(), libc::SHUT_RDWR);
            libc::shutdown(self.udp.as_raw_fd(), libc::SHUT_RDWR);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One TCP request to `to` from pod namespace `ns`: the server's answer, checked to come from `to`.
fn tcp_ask(ns: &str, to: SocketAddr) -> Result<String, String> {
    in_netns(ns, || {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(3))
            .map_err(|e| format!("connect {to}: {e}"))?;
        let peer = s.peer_addr().map_err(|e| e.to_string())?;
        if peer != to {
            return Err(format!("connected to {peer}, not {to}"));
        }
        s.set_read_timeout(Some(Duration::from_secs(3)))
            .map_err(|e| e.to_string())?;
        let mut answer = String::new();
        s.read_to_string(&mut answer)
            .map_err(|e| format!("read from {to}: {e}"))?;
        let _ = s.shutdown(Shutdown::Both);
        Ok(answer)
    })
}

/// One UDP request to `to` from pod namespace `ns`: the answer, checked to come from `to` (a few tries: UDP).
fn udp_ask(ns: &str, to: SocketAddr) -> Result<String, String> {
    in_netns(ns, || {
        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(1)))
            .map_err(|e| e.to_string())?;
        let mut last = String::new();
        for _ in 0..3 {
            s.send_to(b"who", to).map_err(|e| format!("send to {to}: {e}"))?;
            let mut buf = [0u8; 128];
            match s.recv_from(&mut buf) {
                Ok((n, from)) if from == to => return Ok(String::from_utf8_lossy(&buf[..n]).into_owned()),
                Ok((_, from)) => return Err(format!("answer from {from}, not {to}")),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    last = e.to_string()
                }
                Err(e) => return Err(format!("recv from {to}: {e}")),
            }
        }
        Err(format!("no answer from {to}: {last}"))
    })
}

/// Asks `to` `n` times over `protocol` and returns the distinct answers with their counts, sorted.
fn ask_many(ns: &str, to: SocketAddr, protocol: u8, n: usize) -> Vec<(String, usize)> {
    let mut answers: Vec<(String, usize)> = Vec::new();
    for i in 0..n {
        let answer = if protocol == proto::TCP {
            tcp_ask(ns, to)
        } else {
            udp_ask(ns, to)
        }
        .unwrap_or_else(|e| panic!("request {i} to {to}: {e}"));
        match answers.iter_mut().find(|(a, _)| *a == answer) {
            Some((_, count)) => *count += 1,
            None => answers.push((answer, 1)),
        }
    }
    answers.sort();
    answers
}

/// Pods A (client) and B on node 1, C on node 2; servers in all three; VIP 10.96.0.10:80 → B and C on :8080 over
/// TCP and UDP; VIP 10.96.0.11:80 → A only (hairpin); VIP 10.96.0.12:80 → C only (other node).
#[test]
fn clients_reach_services_on_this_node_the_other_node_and_themselves() {
    let mut lab = Lab::new("lb");
    let Nodes { n1, n2, u1, u2 } = lab.two_nodes();
    let (a_ip, b_ip, c_ip) = (
        Ipv4Addr::new(10, 203, 1, 2),
        Ipv4Addr::new(10, 203, 1, 3),
        Ipv4Addr::new(10, 203, 2, 2),
    );
    let (pod_a, ep_a) = lab.pod(&n1, "a", "fmh-a", a_ip);
    let (pod_b, ep_b) = lab.pod(&n1, "b", "fmh-b", b_ip);
    let (pod_c, ep_c) = lab.pod(&n2, "c", "fmh-c", c_ip);
    let mut dp1 = node_datapath(&n1, u1, &["fmh-a", "fmh-b"]);
    let mut dp2 = node_datapath(&n2, u2, &["fmh-c"]);
    dp1.upsert_endpoint(a_ip, ep_a).unwrap();
    dp1.upsert_endpoint(b_ip, ep_b).unwrap();
    dp2.upsert_endpoint(c_ip, ep_c).unwrap();
    program_ipcache(&mut dp1, "10.203.1.0/24", "10.203.2.0/24", u2);
    program_ipcache(&mut dp2, "10.203.2.0/24", "10.203.1.0/24", u1);
    eventually(Duration::from_secs(10), || ping(&pod_a, c_ip)).expect("ping a → c");
    ping(&pod_a, b_ip).expect("ping a → b");

    let _servers = [
        Servers::start(&pod_a, a_ip, "a"),
        Servers::start(&pod_b, b_ip, "b"),
        Servers::start(&pod_c, c_ip, "c"),
    ];
    let both = [sa(b_ip, 8080), sa(c_ip, 8080)];
    service(1, proto::TCP, &both).program(&mut dp1);
    service(2, proto::UDP, &both).program(&mut dp1);
    let hairpin = |id, protocol| Service {
        vip: Ipv4Addr::new(10, 96, 0, 11),
        ..service(id, protocol, &[sa(a_ip, 8080)])
    };
    let remote_only = |id, protocol| Service {
        vip: Ipv4Addr::new(10, 96, 0, 12),
        ..service(id, protocol, &[sa(c_ip, 8080)])
    };
    hairpin(3, proto::TCP).program(&mut dp1);
    hairpin(4, proto::UDP).program(&mut dp1);
    remote_only(5, proto::TCP).program(&mut dp1);
    remote_only(6, proto::UDP).program(&mut dp1);

    let vip = SocketAddr::from((VIP, 80));
    for protocol in [proto::TCP, proto::UDP] {
        // Backends see the client's own address (no SNAT), and both answer.
        let answers = ask_many(&pod_a, vip, protocol, 40);
        let names: Vec<_> = answers.iter().map(|(a, _)| a.as_str()).collect();
        assert_eq!(
            names,
            ["b 10.203.1.2", "c 10.203.1.2"],
            "proto {protocol}: {answers:?}"
        );
        // A pod that is its own backend reaches itself, seeing the hairpin address as its client.
        let answers = ask_many(&pod_a, SocketAddr::from(([10, 96, 0, 11], 80)), protocol, 5);
        assert_eq!(answers, [("a 169.254.42.1".to_owned(), 5)], "proto {protocol}");
        // A backend on the other node only.
        let answers = ask_many(&pod_b, SocketAddr::from(([10, 96, 0, 12], 80)), protocol, 5);
        assert_eq!(answers, [("c 10.203.1.3".to_owned(), 5)], "proto {protocol}");
    }

    let counters = dp1.counters().unwrap();
    let get = |c| counters.iter().find(|(k, _)| *k == c).unwrap().1;
    // 40 + 5 + 5 flows per protocol, each with at least one request and one answer translated.
    assert_eq!(get(Counter::LbNewFlow), 2 * 50, "{counters:?}");
    assert!(get(Counter::LbTranslated) >= 2 * 2 * 50, "{counters:?}");
    assert_eq!(get(Counter::DropNoBackend), 0, "{counters:?}");
    assert_eq!(get(Counter::DropMalformed), 0, "{counters:?}");
    assert!(
        dp2.counters()
            .unwrap()
            .iter()
            .all(|(c, n)| *c != Counter::LbNewFlow || *n == 0),
        "node 2 translates nothing: replies are rev-NATed on the client's node"
    );
    let hairpin_entries = dp1
        .conntrack()
        .unwrap()
        .into_iter()
        .filter(|(k, e)| k.dir == ct_dir::REPLY && e.flags & ct_flags::HAIRPIN != 0)
        .count();
    assert_eq!(hairpin_entries, 10);

    // Without backends, new connections to the VIP are refused by the datapath (dropped and counted).
    dp1.upsert_service(
        service(1, proto::TCP, &both).key(),
        ServiceEntry {
            service_id: 1,
            slot_count: 0,
            rev_nat_id: 1,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(tcp_ask(&pod_a, vip).is_err());
    assert!(dp1.counter(Counter::DropNoBackend).unwrap() >= 1);
}

/// Batched writes (`BPF_MAP_UPDATE_BATCH` / `BPF_MAP_DELETE_BATCH`) hold what one-by-one writes would, across
/// several batch calls, and a batch removal of keys of which some are absent removes the present ones.
#[test]
fn batched_slot_and_backend_writes_match_single_ones() {
    let mut dp = loaded();
    let n = 10_000u32;
    let slots: Vec<(SlotKey, u32)> = (0..n)
        .map(|i| {
            (
                SlotKey {
                    service_id: 7,
                    slot: i,
                },
                1_000 + i,
            )
        })
        .collect();
    dp.upsert_slots(&slots).unwrap();
    let backends: Vec<(u32, BackendV4)> = (0..n)
        .map(|i| {
            (
                1_000 + i,
                BackendV4 {
                    addr: Ipv4Addr::from(0x0a00_0000 + i).octets(),
                    port_be: 8080u16.to_be(),
                    proto: proto::TCP,
                    cluster_id: 3,
                    ..Default::default()
                },
            )
        })
        .collect();
    dp.upsert_backends(&backends).unwrap();
    let mut have = dp.slots().unwrap();
    have.sort_by_key(|(k, _)| (k.service_id, k.slot));
    assert_eq!(have, slots);
    let mut have = dp.backends().unwrap();
    have.sort_by_key(|(id, _)| *id);
    assert_eq!(have, backends);
    // Rewriting changes values in place.
    let moved: Vec<(SlotKey, u32)> = slots.iter().map(|(k, v)| (*k, v + 1)).collect();
    dp.upsert_slots(&moved).unwrap();
    assert_eq!(dp.slots().unwrap().len(), n as usize);
    assert!(dp.slots().unwrap().iter().all(|(k, v)| *v == 1_001 + k.slot));
    // Remove the even half, then everything (half of it absent by then).
    let even: Vec<SlotKey> = slots
        .iter()
        .map(|(k, _)| *k)
        .filter(|k| k.slot % 2 == 0)
        .collect();
    dp.remove_slots(&even).unwrap();
    assert!(dp.slots().unwrap().iter().all(|(k, _)| k.slot % 2 == 1));
    assert_eq!(dp.slots().unwrap().len(), n as usize / 2);
    let all: Vec<SlotKey> = slots.iter().map(|(k, _)| *k).collect();
    dp.remove_slots(&all).unwrap();
    assert_eq!(dp.slots().unwrap(), []);
}
