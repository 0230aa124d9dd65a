//! Packet logic of fleetmesh's datapath, in plain functions that unit-test on the host.
//!
//! The eBPF programs in `main.rs` only read bytes out of the `skb`, ask the functions here what to do, and turn the
//! answer into helper calls, one tc verdict and one counter. Everything that decides (header validation, the
//! endpoint / ipcache lookups and their precedence) lives here, works on byte slices and a [`Maps`] trait, and never
//! panics: every packet access goes through `get`, so the eBPF build has no panic paths either.
#![cfg_attr(target_arch = "bpf", no_std)]

use mesh_common::{Counter, IpcacheEntry, LocalEndpoint, NodeConfig, TunnelPeer, ipcache_flags, node_flags};

pub mod encryption;
pub mod lb;
pub mod policy;
pub mod trust;

/// Length of an Ethernet header without VLAN tags.
pub const ETH_HLEN: usize = 14;
/// EtherType of IPv4.
pub const ETH_P_IP: u16 = 0x0800;
/// Length of an IPv4 header without options (IHL 5).
pub const IPV4_MIN_HLEN: usize = 20;
/// Bytes the programs copy out of a packet to decide: Ethernet plus the fixed part of the IPv4 header. Options are
/// validated through IHL and the total length but never read.
pub const PEEK_LEN: usize = ETH_HLEN + IPV4_MIN_HLEN;
/// TTL of the outer header of encapsulated packets.
pub const TUNNEL_TTL: u8 = 64;
/// Fragment offset bits of the IPv4 flags/fragment field.
pub const IPV4_FRAG_OFFSET_MASK: u16 = 0x1fff;
/// Offset of the IPv4 header checksum in the frame.
pub const IPV4_CSUM_OFFSET: usize = ETH_HLEN + 10;
/// Offset of the IPv4 source address in the frame (the destination follows).
pub const IPV4_SRC_OFFSET: usize = ETH_HLEN + 12;
/// Offset of the IPv4 destination address in the frame.
pub const IPV4_DST_OFFSET: usize = ETH_HLEN + 16;
/// Length of a TCP header without options.
pub const TCP_MIN_HLEN: usize = 20;
/// Length of a UDP header.
pub const UDP_HLEN: usize = 8;
/// Bytes of a TCP header the programs copy out: ports, sequence and acknowledgement numbers, offset and flags.
pub const TCP_PEEK_LEN: usize = 14;
/// Bytes of a UDP header the programs copy out: the whole header.
pub const UDP_PEEK_LEN: usize = UDP_HLEN;

/// Why a packet was judged malformed (all count as [`Counter::DropMalformed`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Malformed {
    /// Shorter than an Ethernet header.
    TruncatedEthernet,
    /// EtherType IPv4, but shorter than the IPv4 header or its total length says.
    TruncatedIpv4,
    /// EtherType IPv4 but the version nibble is not 4.
    BadVersion,
    /// IHL below 5 (a header shorter than 20 bytes).
    BadHeaderLength,
    /// The IPv4 total length is smaller than the header length.
    BadTotalLength,
}

/// Why a packet is dropped. Each reason maps to exactly one counter (and, later, a flow event reason).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Drop {
    /// The frame or its IPv4 header is invalid.
    Malformed(Malformed),
    /// Overlay packet for an address that is not a pod on this node.
    NoEndpoint,
    /// Overlay packet without tunnel metadata.
    NoTunnelKey,
    /// A helper (store, tunnel key, redirect) failed.
    Helper,
    /// The destination is behind a tunnel, but this node has no VXLAN device configured.
    NoTunnel,
    /// A new flow to a service frontend that has no backend (or whose slot table is inconsistent).
    NoBackend,
    /// The destination's ingress policy denies the packet.
    PolicyIngress,
    /// The source's egress policy denies the packet.
    PolicyEgress,
    /// Policy denies the packet and the peer's identity was not known yet ([`mesh_common::identity::PENDING`]):
    /// the sync was late (no variant carries data that only some paths set: the verifier refuses to read
    /// registers LLVM leaves uninitialised on the other paths).
    PolicyPending,
    /// A pod sent an IPv4 packet from an address that is not its own ([`trust::own_source`]).
    SourceSpoofed,
    /// A pod sent UDP to the VXLAN port through the node's stack ([`trust::stack_bound`]).
    VxlanFromPod,
    /// An overlay packet's outer source is not a tunnel peer ([`trust::overlay_peer`]).
    OverlayUnknownPeer,
    /// A pod sent a frame that is neither IPv4 nor ARP ([`trust::pod_other_l3`]).
    UnsupportedL3,
    /// Encryption applies to the destination node but there is no usable key ([`encryption::tunnel_remote`]).
    NoEncryptionKey,
    /// A clear overlay packet from a node whose traffic must be encrypted ([`encryption::overlay_accepts`]).
    OverlayUnencrypted,
}

impl Drop {
    /// The counter that records this drop.
    #[must_use]
    pub const fn counter(self) -> Counter {
        match self {
            Drop::Malformed(_) => Counter::DropMalformed,
            Drop::NoEndpoint => Counter::DropNoEndpoint,
            Drop::NoTunnelKey => Counter::DropNoTunnelKey,
            Drop::Helper => Counter::DropHelper,
            Drop::NoTunnel => Counter::DropNoTunnel,
            Drop::NoBackend => Counter::DropNoBackend,
            Drop::PolicyIngress => Counter::DropPolicyIngress,
            Drop::PolicyEgress => Counter::DropPolicyEgress,
            Drop::PolicyPending => Counter::DropPolicyPending,
            Drop::SourceSpoofed => Counter::DropSourceSpoofed,
            Drop::VxlanFromPod => Counter::DropVxlanFromPod,
            Drop::OverlayUnknownPeer => Counter::DropOverlayUnknownPeer,
            Drop::UnsupportedL3 => Counter::DropUnsupportedL3,
            Drop::NoEncryptionKey => Counter::DropNoEncryptionKey,
            Drop::OverlayUnencrypted => Counter::DropOverlayUnencrypted,
        }
    }
}

impl From<Malformed> for Drop {
    fn from(m: Malformed) -> Self {
        Drop::Malformed(m)
    }
}

/// The fields of a validated IPv4 header that the datapath uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Header {
    /// Source address, network order.
    pub src: [u8; 4],
    /// Destination address, network order.
    pub dst: [u8; 4],
    /// Header length in bytes (IHL × 4, 20..=60).
    pub header_len: u8,
    /// Total length of the IPv4 packet (header and payload).
    pub total_len: u16,
    /// Transport protocol ([`proto`] number).
    pub proto: u8,
    /// The flags and fragment offset field as on the wire (host order after reading).
    pub frag_off: u16,
}

impl Ipv4Header {
    /// Offset of the transport header from the start of the frame.
    #[must_use]
    pub const fn l4_offset(&self) -> usize {
        ETH_HLEN + self.header_len as usize
    }

    /// Whether this is a fragment other than the first (it carries no transport header).
    #[must_use]
    pub const fn is_later_fragment(&self) -> bool {
        self.frag_off & IPV4_FRAG_OFFSET_MASK != 0
    }

    /// Length of the IPv4 payload (transport header and data).
    #[must_use]
    pub const fn payload_len(&self) -> usize {
        (self.total_len as usize).saturating_sub(self.header_len as usize)
    }
}

/// What a frame carries, as far as the datapath cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frame {
    /// A valid IPv4 packet.
    Ipv4(Ipv4Header),
    /// Anything else (ARP, IPv6, ...): from a pod only ARP goes on, to the stack ([`trust::pod_other_l3`]).
    Other {
        /// The frame's EtherType.
        ether_type: u16,
    },
}

fn byte(peek: &[u8], at: usize) -> Result<u8, Malformed> {
    peek.get(at).copied().ok_or(Malformed::TruncatedIpv4)
}

fn be16(peek: &[u8], at: usize, err: Malformed) -> Result<u16, Malformed> {
    match (peek.get(at), peek.get(at + 1)) {
        (Some(&hi), Some(&lo)) => Ok(u16::from_be_bytes([hi, lo])),
        _ => Err(err),
    }
}

fn addr(peek: &[u8], at: usize) -> Result<[u8; 4], Malformed> {
    Ok([
        byte(peek, at)?,
        byte(peek, at + 1)?,
        byte(peek, at + 2)?,
        byte(peek, at + 3)?,
    ])
}

/// Parses and validates the start of a frame.
///
/// `peek` holds the first bytes of the frame (up to [`PEEK_LEN`]; fewer when the frame is shorter), `frame_len` is
/// the length of the whole frame (`skb->len` at tc, which includes the Ethernet header). The IPv4 header is
/// validated against both: version 4, IHL ≥ 5, header length ≤ total length, and the total length fits the frame
/// (Ethernet padding after it is allowed).
///
/// # Errors
///
/// [`Malformed`] names what is wrong with the frame.
pub fn parse_frame(peek: &[u8], frame_len: usize) -> Result<Frame, Malformed> {
    if frame_len < ETH_HLEN {
        return Err(Malformed::TruncatedEthernet);
    }
    let ether_type = be16(peek, 12, Malformed::TruncatedEthernet)?;
    if ether_type != ETH_P_IP {
        return Ok(Frame::Other { ether_type });
    }
    if frame_len < PEEK_LEN {
        return Err(Malformed::TruncatedIpv4);
    }
    let version_ihl = byte(peek, ETH_HLEN)?;
    if version_ihl >> 4 != 4 {
        return Err(Malformed::BadVersion);
    }
    let header_len = (version_ihl & 0x0f) * 4;
    if usize::from(header_len) < IPV4_MIN_HLEN {
        return Err(Malformed::BadHeaderLength);
    }
    let total_len = be16(peek, ETH_HLEN + 2, Malformed::TruncatedIpv4)?;
    if total_len < u16::from(header_len) {
        return Err(Malformed::BadTotalLength);
    }
    if usize::from(total_len) > frame_len - ETH_HLEN {
        return Err(Malformed::TruncatedIpv4);
    }
    Ok(Frame::Ipv4(Ipv4Header {
        src: addr(peek, ETH_HLEN + 12)?,
        dst: addr(peek, ETH_HLEN + 16)?,
        header_len,
        total_len,
        proto: byte(peek, ETH_HLEN + 9)?,
        frag_off: be16(peek, ETH_HLEN + 6, Malformed::TruncatedIpv4)?,
    }))
}

/// What to do with a packet that is not dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Forward {
    /// Hand the packet to the node's stack unchanged.
    Pass,
    /// Deliver to a pod on this node: write `macs` (destination then source MAC) at the start of the frame and
    /// `bpf_redirect_peer(ifindex)`.
    Local {
        /// Host-side veth of the pod.
        ifindex: u32,
        /// New Ethernet addresses: pod MAC, then the host-side veth MAC.
        macs: [u8; 12],
    },
    /// Encapsulate towards another node: `bpf_skb_set_tunnel_key` then `bpf_redirect(vxlan_ifindex)`.
    Tunnel {
        /// This node's VXLAN device.
        vxlan_ifindex: u32,
        /// Underlay address of the destination node, host byte order.
        remote_ipv4: u32,
        /// VNI (24 bits): the per-cluster number of the source endpoint's identity (the receiver takes the
        /// cluster from the outer source address).
        vni: u32,
    },
}

impl Forward {
    /// The counter that records this forwarding decision.
    #[must_use]
    pub const fn counter(&self) -> Counter {
        match self {
            Forward::Pass => Counter::PassStack,
            Forward::Local { .. } => Counter::FwdLocal,
            Forward::Tunnel { .. } => Counter::FwdTunnel,
        }
    }

    fn local(ep: &LocalEndpoint) -> Self {
        let [d0, d1, d2, d3, d4, d5] = ep.pod_mac;
        let [s0, s1, s2, s3, s4, s5] = ep.host_mac;
        Forward::Local {
            ifindex: ep.ifindex,
            macs: [d0, d1, d2, d3, d4, d5, s0, s1, s2, s3, s4, s5],
        }
    }
}

/// The datapath's view of its maps (the eBPF maps in the kernel, plain tables in tests).
pub trait Maps {
    /// `ENDPOINTS_V4` lookup by address (network order).
    fn endpoint(&self, ip: [u8; 4]) -> Option<LocalEndpoint>;
    /// `IPCACHE_V4` longest-prefix lookup of a single address (network order).
    fn ipcache(&self, ip: [u8; 4]) -> Option<IpcacheEntry>;
    /// `NODE_CONFIG` element 0.
    fn node_config(&self) -> Option<NodeConfig>;
    /// `TUNNEL_PEERS` lookup by underlay address (HOST byte order), for the encryption decision; only asked while
    /// the node's config has an encryption mode.
    fn encryption_peer(&self, _underlay_ipv4: u32) -> Option<TunnelPeer> {
        None
    }
}

/// Decision for a packet leaving a pod (tc ingress on the host side of its veth, interface `ifindex`).
///
/// Only ARP of the non-IPv4 frames goes on (to the stack). An IPv4 packet must come from the endpoint of the veth
/// ([`trust::own_source`]). Then a local destination wins over the ipcache; an ipcache entry behind a tunnel (and
/// not flagged as this node) encapsulates; everything else goes to the stack.
///
/// # Errors
///
/// [`Drop::UnsupportedL3`] for non-IPv4 frames other than ARP, [`Drop::SourceSpoofed`] for a source that is not
/// the veth's endpoint, [`Drop::NoTunnel`] when the destination is behind a tunnel but no VXLAN device is
/// configured.
pub fn from_pod(frame: Frame, ifindex: u32, maps: &impl Maps) -> Result<Forward, Drop> {
    match frame {
        Frame::Ipv4(ip) => from_pod_ipv4(&ip, ifindex, maps),
        Frame::Other { ether_type } => trust::pod_other_l3(ether_type),
    }
}

/// [`from_pod`] for an IPv4 packet (after load balancing, `ip.dst` is the translated destination).
///
/// # Errors
///
/// As [`from_pod`].
pub fn from_pod_ipv4(ip: &Ipv4Header, ifindex: u32, maps: &impl Maps) -> Result<Forward, Drop> {
    let src_ep = maps.endpoint(ip.src);
    trust::own_source(src_ep.as_ref(), ifindex)?;
    from_pod_endpoints(ip, src_ep.as_ref(), maps.endpoint(ip.dst).as_ref(), maps)
}

/// [`from_pod_ipv4`] after the source check, with the endpoint lookups of the source and destination already done
/// (the programs need them for the source check and policy as well).
///
/// # Errors
///
/// [`Drop::NoTunnel`] as [`from_pod`].
pub fn from_pod_endpoints(
    ip: &Ipv4Header,
    src_ep: Option<&LocalEndpoint>,
    dst_ep: Option<&LocalEndpoint>,
    maps: &impl Maps,
) -> Result<Forward, Drop> {
    if let Some(ep) = dst_ep {
        return Ok(Forward::local(ep));
    }
    let Some(entry) = maps.ipcache(ip.dst) else {
        return Ok(Forward::Pass);
    };
    if entry.tunnel_endpoint == 0 || entry.flags & ipcache_flags::LOCAL_NODE != 0 {
        return Ok(Forward::Pass);
    }
    let cfg = match maps.node_config() {
        Some(cfg) if cfg.vxlan_ifindex != 0 => cfg,
        _ => return Err(Drop::NoTunnel),
    };
    // Without an encryption mode, no further lookup: the underlay address is the remote.
    let remote_ipv4 = if cfg.flags & (node_flags::ENCRYPT_CROSS_CLUSTER | node_flags::ENCRYPT_ALL) == 0 {
        entry.tunnel_endpoint
    } else {
        let peer = maps.encryption_peer(entry.tunnel_endpoint);
        encryption::tunnel_remote(&cfg, entry.cluster_id, entry.tunnel_endpoint, peer)?
    };
    // The sender's identity number is the VNI.
    Ok(Forward::Tunnel {
        vxlan_ifindex: cfg.vxlan_ifindex,
        remote_ipv4,
        vni: policy::vni_for(src_ep),
    })
}

/// Decision for a packet decapsulated by the node's VXLAN device (after its tunnel key was read).
///
/// # Errors
///
/// [`Drop::NoEndpoint`] when the inner destination is not a pod on this node.
pub fn from_overlay(frame: Frame, maps: &impl Maps) -> Result<Forward, Drop> {
    match frame {
        Frame::Ipv4(ip) => from_overlay_ipv4(&ip, maps),
        Frame::Other { .. } => Ok(Forward::Pass),
    }
}

/// [`from_overlay`] for an IPv4 packet (after reverse translation of replies, `ip.dst` is the client).
///
/// # Errors
///
/// As [`from_overlay`].
pub fn from_overlay_ipv4(ip: &Ipv4Header, maps: &impl Maps) -> Result<Forward, Drop> {
    from_overlay_endpoint(maps.endpoint(ip.dst).as_ref())
}

/// [`from_overlay_ipv4`] with the destination's endpoint lookup already done.
///
/// # Errors
///
/// As [`from_overlay`].
pub fn from_overlay_endpoint(dst_ep: Option<&LocalEndpoint>) -> Result<Forward, Drop> {
    dst_ep.map(Forward::local).ok_or(Drop::NoEndpoint)
}

/// Longest-prefix match over (prefix, length, entry) rows, as `IPCACHE_V4` does it (for the unit tests).
#[cfg(test)]
pub(crate) fn test_lpm_lookup<T: Copy>(table: &[([u8; 4], u32, T)], ip: [u8; 4]) -> Option<T> {
    let ip = u32::from_be_bytes(ip);
    table
        .iter()
        .filter(|(p, len, _)| {
            let mask = if *len == 0 { 0 } else { u32::MAX << (32 - len) };
            ip & mask == u32::from_be_bytes(*p) & mask
        })
        .max_by_key(|(_, len, _)| *len)
        .map(|(_, _, e)| *e)
}

#[cfg(test)]
mod tests {
    use super::*;

    const POD_A: [u8; 4] = [10, 1, 0, 2];
    const POD_B: [u8; 4] = [10, 1, 0, 3];
    const REMOTE_POD: [u8; 4] = [10, 2, 0, 7];
    const UNKNOWN: [u8; 4] = [192, 0, 2, 1];

    struct TestMaps {
        endpoints: Vec<([u8; 4], LocalEndpoint)>,
        /// (prefix, prefix length, entry); longest match wins.
        ipcache: Vec<([u8; 4], u32, IpcacheEntry)>,
        node: Option<NodeConfig>,
    }

    impl Maps for TestMaps {
        fn endpoint(&self, ip: [u8; 4]) -> Option<LocalEndpoint> {
            self.endpoints.iter().find(|(k, _)| *k == ip).map(|(_, v)| *v)
        }
        fn ipcache(&self, ip: [u8; 4]) -> Option<IpcacheEntry> {
            crate::test_lpm_lookup(&self.ipcache, ip)
        }
        fn node_config(&self) -> Option<NodeConfig> {
            self.node
        }
    }

    fn endpoint(ip: [u8; 4], ifindex: u32, identity: u32) -> LocalEndpoint {
        LocalEndpoint {
            ifindex,
            identity,
            pod_mac: mesh_common::pod_mac_for_ipv4(ip),
            host_mac: [0xee, 0xee, 0, 0, 0, u8::try_from(ifindex).unwrap()],
            ..Default::default()
        }
    }

    fn maps() -> TestMaps {
        TestMaps {
            endpoints: vec![
                (POD_A, endpoint(POD_A, 5, 0x0170_0042)),
                (POD_B, endpoint(POD_B, 6, 7)),
            ],
            ipcache: vec![
                (
                    [10, 1, 0, 0],
                    24,
                    IpcacheEntry {
                        flags: ipcache_flags::LOCAL_NODE,
                        ..Default::default()
                    },
                ),
                (
                    [10, 2, 0, 0],
                    24,
                    IpcacheEntry {
                        tunnel_endpoint: u32::from_be_bytes([172, 18, 0, 3]),
                        cluster_id: 1,
                        family: mesh_common::FAMILY_IPV4,
                        ..Default::default()
                    },
                ),
            ],
            node: Some(NodeConfig {
                vxlan_ifindex: 9,
                ..Default::default()
            }),
        }
    }

    /// An Ethernet + IPv4 frame with `ihl` (options zero-filled) and a payload of `payload` bytes.
    fn ipv4_frame(src: [u8; 4], dst: [u8; 4], ihl: u8, payload: usize) -> Vec<u8> {
        let header_len = usize::from(ihl) * 4;
        let mut f = vec![0u8; ETH_HLEN + header_len + payload];
        f[0..6].copy_from_slice(&[0xee; 6]);
        f[6..12].copy_from_slice(&mesh_common::pod_mac_for_ipv4(src));
        f[12..14].copy_from_slice(&ETH_P_IP.to_be_bytes());
        f[14] = 0x40 | ihl;
        let total = u16::try_from(header_len + payload).unwrap();
        f[16..18].copy_from_slice(&total.to_be_bytes());
        f[22] = 64;
        f[23] = 1;
        f[26..30].copy_from_slice(&src);
        f[30..34].copy_from_slice(&dst);
        f
    }

    /// Parses like the eBPF program does: only the first [`PEEK_LEN`] bytes are handed over.
    fn parse(frame: &[u8]) -> Result<Frame, Malformed> {
        parse_frame(&frame[..frame.len().min(PEEK_LEN)], frame.len())
    }

    /// The verdict on a frame from the veth of its source's endpoint (ifindex 5 for POD_A, 6 for POD_B; frames of
    /// other sources arrive on POD_A's veth).
    fn pod_verdict(frame: &[u8]) -> Result<Forward, Drop> {
        let m = maps();
        let frame = parse(frame)?;
        let ifindex = match frame {
            Frame::Ipv4(ip) => m.endpoint(ip.src).map_or(5, |ep| ep.ifindex),
            Frame::Other { .. } => 5,
        };
        from_pod(frame, ifindex, &m)
    }

    #[test]
    fn parses_a_minimal_ipv4_frame() {
        let f = ipv4_frame(POD_A, POD_B, 5, 8);
        let Ok(Frame::Ipv4(ip)) = parse(&f) else {
            panic!("not parsed: {:?}", parse(&f))
        };
        assert_eq!(
            (ip.src, ip.dst, ip.header_len, ip.total_len),
            (POD_A, POD_B, 20, 28)
        );
        assert_eq!(ip.l4_offset(), 34);
    }

    #[test]
    fn honours_ip_options_for_every_ihl() {
        for ihl in 6..=15 {
            let f = ipv4_frame(POD_A, POD_B, ihl, 8);
            let Ok(Frame::Ipv4(ip)) = parse(&f) else {
                panic!("ihl {ihl}: {:?}", parse(&f))
            };
            assert_eq!(ip.header_len, ihl * 4);
            assert_eq!(ip.dst, POD_B, "ihl {ihl}");
            assert_eq!(ip.l4_offset(), ETH_HLEN + usize::from(ihl) * 4);
            assert!(
                matches!(pod_verdict(&f), Ok(Forward::Local { ifindex: 6, .. })),
                "ihl {ihl}"
            );
        }
    }

    #[test]
    fn options_longer_than_the_packet_are_truncated() {
        // IHL 15 says 60 header bytes, but the frame ends after 24.
        let mut f = ipv4_frame(POD_A, POD_B, 6, 0);
        f[14] = 0x4f;
        assert_eq!(parse(&f), Err(Malformed::BadTotalLength));
        f[16..18].copy_from_slice(&60u16.to_be_bytes());
        assert_eq!(parse(&f), Err(Malformed::TruncatedIpv4));
    }

    #[test]
    fn rejects_ihl_below_five() {
        for ihl in 0..5 {
            let mut f = ipv4_frame(POD_A, POD_B, 5, 8);
            f[14] = 0x40 | ihl;
            assert_eq!(parse(&f), Err(Malformed::BadHeaderLength), "ihl {ihl}");
            assert_eq!(pod_verdict(&f), Err(Drop::Malformed(Malformed::BadHeaderLength)));
        }
    }

    #[test]
    fn rejects_version_six_under_ipv4_ethertype() {
        let mut f = ipv4_frame(POD_A, POD_B, 5, 8);
        f[14] = 0x65;
        assert_eq!(parse(&f), Err(Malformed::BadVersion));
        assert_eq!(
            Drop::from(Malformed::BadVersion).counter(),
            Counter::DropMalformed
        );
    }

    #[test]
    fn rejects_truncated_ethernet() {
        for len in 0..ETH_HLEN {
            let f = ipv4_frame(POD_A, POD_B, 5, 8);
            assert_eq!(parse(&f[..len]), Err(Malformed::TruncatedEthernet), "len {len}");
        }
    }

    #[test]
    fn rejects_truncated_ipv4() {
        let f = ipv4_frame(POD_A, POD_B, 5, 8);
        for len in ETH_HLEN..f.len() {
            assert_eq!(parse(&f[..len]), Err(Malformed::TruncatedIpv4), "len {len}");
        }
    }

    #[test]
    fn rejects_total_length_below_header_length() {
        let mut f = ipv4_frame(POD_A, POD_B, 5, 8);
        f[16..18].copy_from_slice(&19u16.to_be_bytes());
        assert_eq!(parse(&f), Err(Malformed::BadTotalLength));
    }

    #[test]
    fn accepts_ethernet_padding_after_the_ip_packet() {
        let mut f = ipv4_frame(POD_A, POD_B, 5, 0);
        f.resize(60, 0);
        assert!(matches!(
            parse(&f),
            Ok(Frame::Ipv4(Ipv4Header { total_len: 20, .. }))
        ));
    }

    #[test]
    fn short_peek_of_a_long_frame_is_truncated_not_a_panic() {
        let f = ipv4_frame(POD_A, POD_B, 5, 8);
        assert_eq!(parse_frame(&f[..20], f.len()), Err(Malformed::TruncatedIpv4));
        assert_eq!(parse_frame(&[], f.len()), Err(Malformed::TruncatedEthernet));
    }

    #[test]
    fn arp_from_a_pod_passes_to_the_stack_ipv6_is_dropped() {
        // A 42-byte ARP request and a short frame with the IPv6 EtherType.
        let mut arp = vec![0u8; 42];
        arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        assert_eq!(parse(&arp), Ok(Frame::Other { ether_type: 0x0806 }));
        assert_eq!(pod_verdict(&arp), Ok(Forward::Pass));
        assert_eq!(from_overlay(parse(&arp).unwrap(), &maps()), Ok(Forward::Pass));
        let mut v6 = vec![0u8; ETH_HLEN];
        v6[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
        assert_eq!(pod_verdict(&v6), Err(Drop::UnsupportedL3));
        assert_eq!(Forward::Pass.counter(), Counter::PassStack);
    }

    #[test]
    fn a_pod_sends_from_its_own_address_only() {
        let m = maps();
        let to_b = ipv4_frame(POD_A, POD_B, 5, 8);
        assert!(matches!(
            from_pod(parse(&to_b).unwrap(), 5, &m),
            Ok(Forward::Local { ifindex: 6, .. })
        ));
        // POD_A's address on POD_B's veth, or on a veth without endpoint; an address that is no endpoint.
        for ifindex in [6, 99] {
            assert_eq!(
                from_pod(parse(&to_b).unwrap(), ifindex, &m),
                Err(Drop::SourceSpoofed),
                "ifindex {ifindex}"
            );
        }
        for src in [UNKNOWN, [10, 1, 0, 99], [0, 0, 0, 0], mesh_common::HAIRPIN_IPV4] {
            let f = ipv4_frame(src, REMOTE_POD, 5, 8);
            assert_eq!(pod_verdict(&f), Err(Drop::SourceSpoofed), "{src:?}");
        }
        assert_eq!(Drop::SourceSpoofed.counter(), Counter::DropSourceSpoofed);
    }

    #[test]
    fn local_destination_rewrites_macs() {
        let verdict = pod_verdict(&ipv4_frame(POD_A, POD_B, 5, 8)).unwrap();
        let Forward::Local { ifindex, macs } = verdict else {
            panic!("{verdict:?}")
        };
        assert_eq!(ifindex, 6);
        assert_eq!(macs[..6], mesh_common::pod_mac_for_ipv4(POD_B));
        assert_eq!(macs[6..], [0xee, 0xee, 0, 0, 0, 6]);
        assert_eq!(verdict.counter(), Counter::FwdLocal);
    }

    #[test]
    fn remote_destination_is_tunnelled_with_the_source_identity_number_as_vni() {
        let verdict = pod_verdict(&ipv4_frame(POD_A, REMOTE_POD, 5, 8)).unwrap();
        assert_eq!(
            verdict,
            Forward::Tunnel {
                vxlan_ifindex: 9,
                remote_ipv4: u32::from_be_bytes([172, 18, 0, 3]),
                // Identity 0x0170_0042 is cluster 0x17, number 0x42: only the number travels.
                vni: 0x42,
            }
        );
        assert_eq!(verdict.counter(), Counter::FwdTunnel);
    }

    #[test]
    fn a_source_without_identity_yet_gets_vni_zero() {
        let mut m = maps();
        m.endpoints.push((UNKNOWN, endpoint(UNKNOWN, 7, 0)));
        let f = ipv4_frame(UNKNOWN, REMOTE_POD, 5, 8);
        let verdict = from_pod(parse(&f).unwrap(), 7, &m).unwrap();
        assert!(matches!(verdict, Forward::Tunnel { vni: 0, .. }), "{verdict:?}");
    }

    #[test]
    fn tunnel_without_vxlan_device_drops() {
        let f = ipv4_frame(POD_A, REMOTE_POD, 5, 8);
        for node in [None, Some(NodeConfig::default())] {
            let m = TestMaps { node, ..maps() };
            assert_eq!(from_pod(parse(&f).unwrap(), 5, &m), Err(Drop::NoTunnel));
        }
        assert_eq!(Drop::NoTunnel.counter(), Counter::DropNoTunnel);
    }

    #[test]
    fn local_node_prefix_and_misses_pass_to_the_stack() {
        // In the local /24 but not an endpoint (e.g. a pod that just went away): the stack decides.
        assert_eq!(
            pod_verdict(&ipv4_frame(POD_A, [10, 1, 0, 99], 5, 8)),
            Ok(Forward::Pass)
        );
        assert_eq!(pod_verdict(&ipv4_frame(POD_A, UNKNOWN, 5, 8)), Ok(Forward::Pass));
    }

    #[test]
    fn overlay_delivers_to_local_endpoints_only() {
        let m = maps();
        let f = ipv4_frame(REMOTE_POD, POD_A, 7, 8);
        assert!(matches!(
            from_overlay(parse(&f).unwrap(), &m),
            Ok(Forward::Local { ifindex: 5, .. })
        ));
        let f = ipv4_frame(REMOTE_POD, [10, 1, 0, 99], 5, 8);
        assert_eq!(from_overlay(parse(&f).unwrap(), &m), Err(Drop::NoEndpoint));
        assert_eq!(Drop::NoEndpoint.counter(), Counter::DropNoEndpoint);
        assert_eq!(Drop::NoTunnelKey.counter(), Counter::DropNoTunnelKey);
        assert_eq!(Drop::Helper.counter(), Counter::DropHelper);
    }

    #[test]
    fn policy_drops_have_their_counters() {
        for (drop, counter) in [
            (Drop::PolicyIngress, Counter::DropPolicyIngress),
            (Drop::PolicyEgress, Counter::DropPolicyEgress),
            (Drop::PolicyPending, Counter::DropPolicyPending),
        ] {
            assert_eq!(drop.counter(), counter);
            assert!(counter.is_drop());
        }
    }
}
