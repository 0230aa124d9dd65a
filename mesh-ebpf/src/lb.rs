//! Service load balancing (ClusterIP frontends, TCP and UDP), as plain functions that unit-test on the host.
//!
//! - [`peek_len`] / [`parse_l4`]: the transport tuple of a packet (after the IHL-sized IPv4 header; later fragments
//!   and truncated transport headers are never translated).
//! - [`flow_hash`] / [`select_slot`]: the backend slot of a new flow (a jhash-style mix, deterministic per tuple).
//! - [`from_pod`]: the translation of a packet leaving a pod: a reply of a load-balanced flow is reverse-translated
//!   (source := frontend, and for hairpin flows destination := the client), a packet to a frontend is translated
//!   to its backend (destination := backend, and source := [`HAIRPIN_IPV4`] when the client is its own backend).
//!   New flows create a SERVICE and a REPLY conntrack entry; established flows keep their backend even when it was
//!   removed from the maps.
//! - [`reverse`]: the reply translation alone (replies of remote backends arriving from the overlay).
//!
//! The eBPF shell rewrites the packet with the kernel's checksum helpers, which handle `CHECKSUM_PARTIAL`.
use mesh_common::{
    BackendV4, CtEntryV4, CtKeyV4, HAIRPIN_IPV4, RevNatV4, ServiceEntry, ServiceKeyV4, SlotKey, ct_dir,
    ct_flags, proto,
};

use crate::{Drop, Ipv4Header, TCP_MIN_HLEN, TCP_PEEK_LEN, UDP_HLEN, UDP_PEEK_LEN};

/// Offset of the checksum in a TCP header.
pub const TCP_CSUM_OFFSET: usize = 16;
/// Offset of the checksum in a UDP header.
pub const UDP_CSUM_OFFSET: usize = 6;
/// Offset of the flags byte in a TCP header.
const TCP_FLAGS_OFFSET: usize = 13;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
const TCP_RST: u8 = 0x04;

/// A transport 5-tuple. Addresses and ports as on the wire: a port is the `u16` whose in-memory bytes are the
/// packet's bytes (network byte order), like the `port_be` fields of the map ABI.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    /// Source address.
    pub saddr: [u8; 4],
    /// Destination address.
    pub daddr: [u8; 4],
    /// Source port, network byte order.
    pub sport_be: u16,
    /// Destination port, network byte order.
    pub dport_be: u16,
    /// [`proto`] number.
    pub proto: u8,
}

impl Flow {
    /// The conntrack key of this tuple in direction `dir` ([`ct_dir`]).
    #[must_use]
    pub const fn ct_key(&self, dir: u8) -> CtKeyV4 {
        CtKeyV4 {
            saddr: self.saddr,
            daddr: self.daddr,
            sport_be: self.sport_be,
            dport_be: self.dport_be,
            proto: self.proto,
            dir,
            _pad: 0,
        }
    }

    /// The tuple of the other direction (source and destination swapped).
    #[must_use]
    pub const fn reversed(&self) -> Self {
        Self {
            saddr: self.daddr,
            daddr: self.saddr,
            sport_be: self.dport_be,
            dport_be: self.sport_be,
            proto: self.proto,
        }
    }

    /// The frontend this tuple is addressed to, if it is one.
    #[must_use]
    pub const fn service_key(&self) -> ServiceKeyV4 {
        ServiceKeyV4 {
            vip: self.daddr,
            port_be: self.dport_be,
            proto: self.proto,
            _pad: 0,
        }
    }
}

/// The transport header of a packet the load balancer may translate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct L4 {
    /// The packet's 5-tuple.
    pub flow: Flow,
    /// Offset of the transport header in the frame (source port, then destination port).
    pub offset: usize,
    /// TCP SYN without ACK: the first packet of a new connection (always false for UDP).
    pub syn: bool,
    /// TCP RST: the sender refuses or aborts the connection (always false for UDP).
    pub rst: bool,
}

impl L4 {
    /// Offset of the source port in the frame.
    #[must_use]
    pub const fn sport_offset(&self) -> usize {
        self.offset
    }

    /// Offset of the destination port in the frame.
    #[must_use]
    pub const fn dport_offset(&self) -> usize {
        self.offset + 2
    }

    /// Offset of the transport checksum in the frame.
    #[must_use]
    pub const fn csum_offset(&self) -> usize {
        self.offset
            + if self.flow.proto == proto::TCP {
                TCP_CSUM_OFFSET
            } else {
                UDP_CSUM_OFFSET
            }
    }

    /// Whether a zero checksum means "no checksum" (UDP): it must stay zero, and a computed zero is sent as
    /// `0xffff` (the kernel helpers' `BPF_F_MARK_MANGLED_0`).
    #[must_use]
    pub const fn zero_csum_means_none(&self) -> bool {
        self.flow.proto == proto::UDP
    }
}

/// How many transport header bytes to copy out of the packet for [`parse_l4`], or `None` when the packet is never
/// translated: not TCP or UDP, a fragment other than the first, or a payload shorter than the transport header.
#[must_use]
pub const fn peek_len(ip: &Ipv4Header) -> Option<usize> {
    if ip.is_later_fragment() {
        return None;
    }
    let payload = ip.payload_len();
    match ip.proto {
        proto::TCP if payload >= TCP_MIN_HLEN => Some(TCP_PEEK_LEN),
        proto::UDP if payload >= UDP_HLEN => Some(UDP_PEEK_LEN),
        _ => None,
    }
}

/// Reads the transport tuple. `l4` holds the first [`peek_len`] bytes of the transport header (at
/// [`Ipv4Header::l4_offset`], which honours IPv4 options).
#[must_use]
pub fn parse_l4(ip: &Ipv4Header, l4: &[u8]) -> Option<L4> {
    let need = peek_len(ip)?;
    let header = l4.get(..need)?;
    let port = |at: usize| Some(u16::from_ne_bytes([*header.get(at)?, *header.get(at + 1)?]));
    let syn = ip.proto == proto::TCP
        && header
            .get(TCP_FLAGS_OFFSET)
            .is_some_and(|flags| flags & (TCP_SYN | TCP_ACK) == TCP_SYN);
    let rst = ip.proto == proto::TCP
        && header
            .get(TCP_FLAGS_OFFSET)
            .is_some_and(|flags| flags & TCP_RST != 0);
    Some(L4 {
        flow: Flow {
            saddr: ip.src,
            daddr: ip.dst,
            sport_be: port(0)?,
            dport_be: port(2)?,
            proto: ip.proto,
        },
        offset: ip.l4_offset(),
        syn,
        rst,
    })
}

/// Initial value of the flow hash (jhash's).
const HASH_INIT: u32 = 0xdead_beef;

/// Hash of a 5-tuple for backend selection: Bob Jenkins' final mix (as in the kernel's `jhash_3words`) of the
/// addresses and ports, seeded with the protocol. Deterministic, so every packet of a flow (and every node) picks
/// the same slot for the same tuple.
#[must_use]
pub const fn flow_hash(flow: &Flow) -> u32 {
    let ports = ((u16::from_be(flow.sport_be) as u32) << 16) | u16::from_be(flow.dport_be) as u32;
    let init = HASH_INIT.wrapping_add(3 << 2).wrapping_add(flow.proto as u32);
    let mut a = u32::from_be_bytes(flow.saddr).wrapping_add(init);
    let mut b = u32::from_be_bytes(flow.daddr).wrapping_add(init);
    let mut c = ports.wrapping_add(init);
    c ^= b;
    c = c.wrapping_sub(b.rotate_left(14));
    a ^= c;
    a = a.wrapping_sub(c.rotate_left(11));
    b ^= a;
    b = b.wrapping_sub(a.rotate_left(25));
    c ^= b;
    c = c.wrapping_sub(b.rotate_left(16));
    a ^= c;
    a = a.wrapping_sub(c.rotate_left(4));
    b ^= a;
    b = b.wrapping_sub(a.rotate_left(14));
    c ^= b;
    c.wrapping_sub(b.rotate_left(24))
}

/// The slot a new flow with `hash` takes among `slot_count`; `None` when there is no slot.
#[must_use]
pub const fn select_slot(hash: u32, slot_count: u32) -> Option<u32> {
    hash.checked_rem(slot_count)
}

/// The load balancer's view of its maps (the eBPF maps in the kernel, plain tables in tests).
pub trait LbMaps {
    /// `SERVICES_V4` lookup.
    fn service(&self, key: &ServiceKeyV4) -> Option<ServiceEntry>;
    /// `SERVICE_SLOTS` lookup: the backend id in a slot.
    fn slot(&self, key: &SlotKey) -> Option<u32>;
    /// `BACKENDS_V4` lookup.
    fn backend(&self, id: u32) -> Option<BackendV4>;
    /// `REVNAT_V4` lookup.
    fn rev_nat(&self, id: u32) -> Option<RevNatV4>;
    /// `CT_V4` lookup.
    fn ct(&self, key: &CtKeyV4) -> Option<CtEntryV4>;
    /// `CT_V4` insert or replace.
    ///
    /// # Errors
    ///
    /// [`Drop::Helper`] when the map refuses the update.
    fn ct_update(&self, key: &CtKeyV4, entry: &CtEntryV4) -> Result<(), Drop>;
    /// `CT_V4` removal (an absent key is fine).
    fn ct_delete(&self, key: &CtKeyV4);
}

/// A packet's new 5-tuple.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// The tuple after translation; fields equal to the packet's are left alone.
    pub flow: Flow,
    /// The packet opened a new load-balanced flow (a backend was selected and conntrack entries created).
    pub new_flow: bool,
    /// The packet is a backend's reply (reverse translation).
    pub reply: bool,
    /// The flow's backend id (as selected when the flow began).
    pub backend_id: u32,
}

/// What a translated packet tells about its backend's health, for the per-backend statistics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A new flow was sent to the backend.
    NewFlow,
    /// The backend reset a connection (a TCP RST in its reply direction).
    Reset,
}

impl Translation {
    /// The statistic this packet adds to its backend, if any.
    #[must_use]
    pub const fn outcome(&self, l4: &L4) -> Option<Outcome> {
        if self.new_flow {
            Some(Outcome::NewFlow)
        } else if self.reply && l4.rst {
            Some(Outcome::Reset)
        } else {
            None
        }
    }
}

/// Translation of a packet leaving a pod: the reply direction of a known flow first, then service frontends.
/// `None` leaves the packet untouched.
///
/// # Errors
///
/// [`Drop::NoBackend`] for a new flow to a frontend without a usable backend; [`Drop::Helper`] when conntrack
/// refuses an entry.
pub fn from_pod(l4: &L4, maps: &impl LbMaps) -> Result<Option<Translation>, Drop> {
    if let Some(t) = reverse(&l4.flow, maps) {
        return Ok(Some(t));
    }
    let translation = to_service(l4, maps)?;
    if translation.is_none() && opens_direct_flow(l4) {
        forget_stale_reply(&l4.flow, maps);
    }
    Ok(translation)
}

/// Whether a packet that is not addressed to a frontend may open a new flow: a TCP SYN, or any UDP datagram
/// (UDP has no handshake to tell a new flow by).
const fn opens_direct_flow(l4: &L4) -> bool {
    l4.syn || l4.flow.proto == proto::UDP
}

/// A client that talked to a backend through a frontend and later opens a *direct* flow to the same backend from
/// the same source port reuses the tuple of the old flow's REPLY conntrack entry (conntrack entries do not expire;
/// the LRU only evicts under pressure). Left alone, the direct flow's replies would be reverse-translated to come
/// from the frontend and the client's socket would reject them. The new flow's first packet passes here (on the
/// client's node, where the REPLY entries live), so the stale entry is removed before any reply exists.
///
/// A frontend flow that is still open on exactly that tuple loses its reverse translation: the client would
/// have two live flows with the same wire tuple, which no tc-level translation can tell apart.
fn forget_stale_reply(flow: &Flow, maps: &impl LbMaps) {
    let reply_key = flow.reversed().ct_key(ct_dir::REPLY);
    if maps.ct(&reply_key).is_some() {
        maps.ct_delete(&reply_key);
    }
}

/// Reverse translation of a reply from a backend to its client: the source becomes the frontend the client used,
/// and for a hairpin flow the destination goes back from [`HAIRPIN_IPV4`] to the client. `None` when the tuple is
/// not the reply of a load-balanced flow (or its frontend's rev-NAT entry is gone).
#[must_use]
pub fn reverse(flow: &Flow, maps: &impl LbMaps) -> Option<Translation> {
    let entry = maps.ct(&flow.ct_key(ct_dir::REPLY))?;
    let frontend = maps.rev_nat(entry.rev_nat_id)?;
    let daddr = if entry.flags & ct_flags::HAIRPIN != 0 {
        entry.addr
    } else {
        flow.daddr
    };
    Some(Translation {
        flow: Flow {
            saddr: frontend.vip,
            sport_be: frontend.port_be,
            daddr,
            ..*flow
        },
        new_flow: false,
        reply: true,
        backend_id: entry.backend_id,
    })
}

/// Translation of a packet addressed to a service frontend. `None` when the destination is not a frontend.
///
/// An established TCP flow is translated from its SERVICE conntrack entry alone, without touching the frontend,
/// slot or backend tables: its per-packet cost does not depend on how many services exist, and it keeps its
/// backend whatever happens to the frontend's tables (a deleted frontend's flows end when its rev-NAT entry goes,
/// since replies are then no longer translated). UDP has no handshake to end a flow, so a UDP packet is only
/// translated while its frontend exists (as kube-proxy flushes UDP conntrack of deleted services).
///
/// # Errors
///
/// As [`from_pod`].
pub fn to_service(l4: &L4, maps: &impl LbMaps) -> Result<Option<Translation>, Drop> {
    let flow = &l4.flow;
    let service_key = flow.ct_key(ct_dir::SERVICE);
    let mut service = None;
    if flow.proto == proto::UDP {
        service = maps.service(&flow.service_key());
        if service.is_none() {
            return Ok(None);
        }
    }
    // An established flow keeps its backend, also one that was removed since. A TCP SYN is a new connection
    // though: when it reuses the tuple of an old flow whose backend is gone, it selects anew.
    let established = maps
        .ct(&service_key)
        .filter(|entry| !l4.syn || backend_is_current(entry, maps));
    let (entry, new_flow) = match established {
        Some(entry) => (entry, false),
        None => {
            let Some(service) = service.or_else(|| maps.service(&flow.service_key())) else {
                return Ok(None);
            };
            let entry = select_backend(flow, &service, maps)?;
            maps.ct_update(&service_key, &entry)?;
            (entry, true)
        }
    };
    let saddr = if entry.flags & ct_flags::HAIRPIN != 0 {
        HAIRPIN_IPV4
    } else {
        flow.saddr
    };
    let to_backend = Flow {
        saddr,
        daddr: entry.addr,
        dport_be: entry.port_be,
        ..*flow
    };
    // The reply entry; re-created when the LRU evicted it while the flow went on.
    let reply_key = to_backend.reversed().ct_key(ct_dir::REPLY);
    if new_flow || maps.ct(&reply_key).is_none() {
        let reply = CtEntryV4 {
            addr: flow.saddr,
            port_be: flow.sport_be,
            ..entry
        };
        maps.ct_update(&reply_key, &reply)?;
    }
    Ok(Some(Translation {
        flow: to_backend,
        new_flow,
        reply: false,
        backend_id: entry.backend_id,
    }))
}

/// Whether the backend a conntrack entry names still exists as recorded.
fn backend_is_current(entry: &CtEntryV4, maps: &impl LbMaps) -> bool {
    maps.backend(entry.backend_id)
        .is_some_and(|b| b.addr == entry.addr && b.port_be == entry.port_be)
}

/// Picks the backend of a new flow: slot `hash % slot_count`, its backend id, the backend. The result is the
/// flow's SERVICE conntrack entry.
fn select_backend(flow: &Flow, service: &ServiceEntry, maps: &impl LbMaps) -> Result<CtEntryV4, Drop> {
    let slot = select_slot(flow_hash(flow), service.slot_count).ok_or(Drop::NoBackend)?;
    let backend_id = maps
        .slot(&SlotKey {
            service_id: service.service_id,
            slot,
        })
        .ok_or(Drop::NoBackend)?;
    let backend = maps.backend(backend_id).ok_or(Drop::NoBackend)?;
    let flags = if backend.addr == flow.saddr {
        ct_flags::HAIRPIN
    } else {
        0
    };
    Ok(CtEntryV4 {
        addr: backend.addr,
        port_be: backend.port_be,
        _pad0: 0,
        rev_nat_id: service.rev_nat_id,
        flags,
        backend_id,
    })
}

#[cfg(test)]
mod tests {
    use std::{cell::RefCell, collections::HashMap};

    use mesh_common::Counter;

    use super::*;
    use crate::{ETH_HLEN, ETH_P_IP, Frame, PEEK_LEN, parse_frame};

    const CLIENT: [u8; 4] = [10, 1, 0, 2];
    const BACKEND_A: [u8; 4] = [10, 1, 0, 3];
    const BACKEND_B: [u8; 4] = [10, 2, 0, 7];
    const VIP: [u8; 4] = [10, 96, 0, 10];
    const SERVICE_ID: u32 = 3;
    const REV_NAT_ID: u32 = 30;

    const fn be(port: u16) -> u16 {
        port.to_be()
    }

    #[derive(Default)]
    struct TestMaps {
        services: HashMap<ServiceKeyV4, ServiceEntry>,
        slots: HashMap<SlotKey, u32>,
        backends: HashMap<u32, BackendV4>,
        rev_nat: HashMap<u32, RevNatV4>,
        ct: RefCell<HashMap<CtKeyV4, CtEntryV4>>,
        ct_full: bool,
    }

    impl LbMaps for TestMaps {
        fn service(&self, key: &ServiceKeyV4) -> Option<ServiceEntry> {
            self.services.get(key).copied()
        }
        fn slot(&self, key: &SlotKey) -> Option<u32> {
            self.slots.get(key).copied()
        }
        fn backend(&self, id: u32) -> Option<BackendV4> {
            self.backends.get(&id).copied()
        }
        fn rev_nat(&self, id: u32) -> Option<RevNatV4> {
            self.rev_nat.get(&id).copied()
        }
        fn ct(&self, key: &CtKeyV4) -> Option<CtEntryV4> {
            self.ct.borrow().get(key).copied()
        }
        fn ct_update(&self, key: &CtKeyV4, entry: &CtEntryV4) -> Result<(), Drop> {
            if self.ct_full {
                return Err(Drop::Helper);
            }
            self.ct.borrow_mut().insert(*key, *entry);
            Ok(())
        }
        fn ct_delete(&self, key: &CtKeyV4) {
            self.ct.borrow_mut().remove(key);
        }
    }

    fn backend(addr: [u8; 4]) -> BackendV4 {
        BackendV4 {
            addr,
            port_be: be(8080),
            proto: proto::TCP,
            ..Default::default()
        }
    }

    /// VIP:80/TCP with backends 1 (A) and 2 (B) in slots 0 and 1.
    fn maps() -> TestMaps {
        let mut m = TestMaps::default();
        m.services.insert(
            ServiceKeyV4 {
                vip: VIP,
                port_be: be(80),
                proto: proto::TCP,
                _pad: 0,
            },
            ServiceEntry {
                service_id: SERVICE_ID,
                slot_count: 2,
                rev_nat_id: REV_NAT_ID,
                ..Default::default()
            },
        );
        m.slots.insert(
            SlotKey {
                service_id: SERVICE_ID,
                slot: 0,
            },
            1,
        );
        m.slots.insert(
            SlotKey {
                service_id: SERVICE_ID,
                slot: 1,
            },
            2,
        );
        m.backends.insert(1, backend(BACKEND_A));
        m.backends.insert(2, backend(BACKEND_B));
        m.rev_nat.insert(
            REV_NAT_ID,
            RevNatV4 {
                vip: VIP,
                port_be: be(80),
                _pad: 0,
            },
        );
        m
    }

    fn tcp(saddr: [u8; 4], sport: u16, daddr: [u8; 4], dport: u16) -> L4 {
        L4 {
            flow: Flow {
                saddr,
                daddr,
                sport_be: be(sport),
                dport_be: be(dport),
                proto: proto::TCP,
            },
            offset: 34,
            syn: false,
            rst: false,
        }
    }

    /// An Ethernet + IPv4 (`ihl`) frame of protocol `proto` with `l4` as the transport bytes.
    fn frame(proto: u8, ihl: u8, l4: &[u8]) -> Vec<u8> {
        let header_len = usize::from(ihl) * 4;
        let mut f = vec![0u8; ETH_HLEN + header_len];
        f[12..14].copy_from_slice(&ETH_P_IP.to_be_bytes());
        f[14] = 0x40 | ihl;
        let total = u16::try_from(header_len + l4.len()).unwrap();
        f[16..18].copy_from_slice(&total.to_be_bytes());
        f[22] = 64;
        f[23] = proto;
        f[26..30].copy_from_slice(&CLIENT);
        f[30..34].copy_from_slice(&VIP);
        f.extend_from_slice(l4);
        f
    }

    fn tcp_header(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
        let mut h = vec![0u8; 20];
        h[0..2].copy_from_slice(&sport.to_be_bytes());
        h[2..4].copy_from_slice(&dport.to_be_bytes());
        h[12] = 5 << 4;
        h[13] = flags;
        h
    }

    /// Parses like the eBPF program: the IPv4 peek, then [`peek_len`] bytes at the transport offset.
    fn parse(f: &[u8]) -> Option<L4> {
        let Ok(Frame::Ipv4(ip)) = parse_frame(&f[..PEEK_LEN.min(f.len())], f.len()) else {
            panic!("not IPv4")
        };
        let len = peek_len(&ip)?;
        parse_l4(&ip, f.get(ip.l4_offset()..ip.l4_offset() + len)?)
    }

    #[test]
    fn parses_tcp_and_udp_ports_after_ip_options() {
        for ihl in 5..=15 {
            let l4 = parse(&frame(proto::TCP, ihl, &tcp_header(40000, 80, TCP_SYN))).unwrap();
            let offset = ETH_HLEN + usize::from(ihl) * 4;
            assert_eq!(l4.offset, offset, "ihl {ihl}");
            assert_eq!(
                (u16::from_be(l4.flow.sport_be), u16::from_be(l4.flow.dport_be)),
                (40000, 80)
            );
            assert_eq!(l4.flow.proto, proto::TCP);
            assert!(l4.syn);
            assert_eq!((l4.sport_offset(), l4.dport_offset()), (offset, offset + 2));
            assert_eq!(l4.csum_offset(), offset + 16);
            assert!(!l4.zero_csum_means_none());

            let udp = [0x9c, 0x40, 0x00, 0x35, 0, 8, 0, 0];
            let l4 = parse(&frame(proto::UDP, ihl, &udp)).unwrap();
            assert_eq!(
                (u16::from_be(l4.flow.sport_be), u16::from_be(l4.flow.dport_be)),
                (40000, 53)
            );
            assert!(!l4.syn);
            assert_eq!(l4.csum_offset(), offset + 6);
            assert!(l4.zero_csum_means_none());
        }
    }

    #[test]
    fn syn_is_only_a_syn_without_ack() {
        for (flags, syn) in [
            (TCP_SYN, true),
            (TCP_SYN | TCP_ACK, false),
            (TCP_ACK, false),
            (0x18, false),
        ] {
            let l4 = parse(&frame(proto::TCP, 5, &tcp_header(1, 2, flags))).unwrap();
            assert_eq!(l4.syn, syn, "flags {flags:#x}");
        }
    }

    #[test]
    fn truncated_transport_headers_later_fragments_and_other_protocols_are_not_translated() {
        assert_eq!(parse(&frame(proto::TCP, 5, &tcp_header(1, 2, 0)[..19])), None);
        assert_eq!(parse(&frame(proto::UDP, 6, &[0; 7])), None);
        assert_eq!(parse(&frame(proto::ICMP, 5, &[8, 0, 0, 0, 0, 0, 0, 0])), None);
        let mut f = frame(proto::UDP, 5, &[0; 8]);
        // More fragments, offset 0: the first fragment carries the ports and is translated.
        f[20] = 0x20;
        assert!(parse(&f).is_some());
        // Offset 185 (× 8 bytes): no transport header.
        f[20..22].copy_from_slice(&185u16.to_be_bytes());
        assert_eq!(parse(&f), None);
        // A peek shorter than needed is no translation either, not a panic.
        let Ok(Frame::Ipv4(ip)) = parse_frame(&frame(proto::UDP, 5, &[0; 8]), 42) else {
            panic!()
        };
        assert_eq!(parse_l4(&ip, &[0; 4]), None);
    }

    #[test]
    fn flow_hash_is_deterministic_and_depends_on_every_field() {
        let base = tcp(CLIENT, 40000, VIP, 80).flow;
        assert_eq!(flow_hash(&base), flow_hash(&base));
        let variants = [
            Flow {
                saddr: [10, 1, 0, 9],
                ..base
            },
            Flow {
                daddr: [10, 96, 0, 11],
                ..base
            },
            Flow {
                sport_be: be(40001),
                ..base
            },
            Flow {
                dport_be: be(81),
                ..base
            },
            Flow {
                proto: proto::UDP,
                ..base
            },
        ];
        for v in variants {
            assert_ne!(flow_hash(&v), flow_hash(&base), "{v:?}");
        }
    }

    #[test]
    fn flow_hash_spreads_flows_evenly_over_slots() {
        for slot_count in 2..=7u32 {
            let mut hits = vec![0u32; slot_count as usize];
            let flows = 7000u32;
            for i in 0..flows {
                let l4 = tcp(
                    [10, 1, u8::try_from(i % 4).unwrap(), 2],
                    u16::try_from(32768 + i).unwrap(),
                    VIP,
                    80,
                );
                let slot = select_slot(flow_hash(&l4.flow), slot_count).unwrap();
                hits[slot as usize] += 1;
            }
            let mean = flows / slot_count;
            for (slot, n) in hits.iter().enumerate() {
                assert!(
                    n.abs_diff(mean) * 10 < mean,
                    "{slot_count} slots: slot {slot} got {n}, mean {mean}: {hits:?}"
                );
            }
        }
    }

    #[test]
    fn slot_selection_stays_in_range_and_zero_slots_select_nothing() {
        assert_eq!(select_slot(12345, 0), None);
        assert_eq!(select_slot(u32::MAX, 1), Some(0));
        assert_eq!(select_slot(10, 4), Some(2));
    }

    #[test]
    fn new_flow_is_translated_to_its_slots_backend_and_conntracked_both_ways() {
        let m = maps();
        let l4 = tcp(CLIENT, 40000, VIP, 80);
        let slot = select_slot(flow_hash(&l4.flow), 2).unwrap();
        let (id, addr) = if slot == 0 { (1, BACKEND_A) } else { (2, BACKEND_B) };
        let t = from_pod(&l4, &m).unwrap().unwrap();
        assert!(t.new_flow);
        assert_eq!(
            t.flow,
            Flow {
                daddr: addr,
                dport_be: be(8080),
                ..l4.flow
            }
        );
        let ct = m.ct.borrow().clone();
        assert_eq!(ct.len(), 2);
        assert_eq!(
            ct[&l4.flow.ct_key(ct_dir::SERVICE)],
            CtEntryV4 {
                addr,
                port_be: be(8080),
                rev_nat_id: REV_NAT_ID,
                backend_id: id,
                ..Default::default()
            }
        );
        let reply = ct[&t.flow.reversed().ct_key(ct_dir::REPLY)];
        assert_eq!(
            (reply.rev_nat_id, reply.flags, reply.addr),
            (REV_NAT_ID, 0, CLIENT)
        );

        // The backend's reply is reverse-translated to come from the frontend.
        let back = L4 {
            flow: t.flow.reversed(),
            ..l4
        };
        let r = from_pod(&back, &m).unwrap().unwrap();
        assert!(!r.new_flow);
        assert_eq!(r.flow, l4.flow.reversed());
        assert_eq!(reverse(&back.flow, &m), Some(r));
    }

    #[test]
    fn established_flows_keep_their_backend_when_slots_and_backends_change() {
        let mut m = maps();
        let l4 = tcp(CLIENT, 40000, VIP, 80);
        let first = from_pod(&l4, &m).unwrap().unwrap();
        // Every slot now points at a third backend, and the first two are gone.
        m.backends.clear();
        m.backends.insert(9, backend([10, 1, 0, 99]));
        for slot in m.slots.values_mut() {
            *slot = 9;
        }
        let again = from_pod(&l4, &m).unwrap().unwrap();
        assert_eq!(again.flow, first.flow);
        assert!(!again.new_flow);
        // A new connection (SYN) on the same tuple whose backend is gone selects anew.
        let syn = L4 { syn: true, ..l4 };
        let fresh = from_pod(&syn, &m).unwrap().unwrap();
        assert!(fresh.new_flow);
        assert_eq!(fresh.flow.daddr, [10, 1, 0, 99]);
        // A retransmitted SYN whose backend still exists keeps it.
        let retry = from_pod(&syn, &m).unwrap().unwrap();
        assert!(!retry.new_flow);
        assert_eq!(retry.flow, fresh.flow);
    }

    #[test]
    fn established_tcp_flows_need_no_frontend_lookup_udp_flows_end_with_their_frontend() {
        let mut m = maps();
        let tcp_flow = tcp(CLIENT, 40000, VIP, 80);
        let first = from_pod(&tcp_flow, &m).unwrap().unwrap();
        let mut udp_flow = tcp(CLIENT, 40001, VIP, 80);
        udp_flow.flow.proto = proto::UDP;
        let udp_key = ServiceKeyV4 {
            proto: proto::UDP,
            ..udp_flow.flow.service_key()
        };
        let tcp_entry = m.services[&tcp_flow.flow.service_key()];
        m.services.insert(udp_key, tcp_entry);
        assert!(from_pod(&udp_flow, &m).unwrap().is_some());
        // The frontends go: the TCP flow is still translated from conntrack, the UDP one is not.
        m.services.clear();
        let again = from_pod(&tcp_flow, &m).unwrap().unwrap();
        assert_eq!((again.flow, again.new_flow), (first.flow, false));
        assert_eq!(from_pod(&udp_flow, &m), Ok(None));
        // A new TCP connection to the gone frontend is not translated.
        let syn = L4 {
            syn: true,
            ..tcp(CLIENT, 40002, VIP, 80)
        };
        assert_eq!(from_pod(&syn, &m), Ok(None));
    }

    #[test]
    fn evicted_reply_entry_is_recreated_by_the_next_packet() {
        let m = maps();
        let l4 = tcp(CLIENT, 40000, VIP, 80);
        let t = from_pod(&l4, &m).unwrap().unwrap();
        let reply_key = t.flow.reversed().ct_key(ct_dir::REPLY);
        m.ct.borrow_mut().remove(&reply_key);
        from_pod(&l4, &m).unwrap().unwrap();
        assert!(m.ct.borrow().contains_key(&reply_key));
    }

    #[test]
    fn a_direct_flow_reusing_an_old_frontend_flows_tuple_gets_untranslated_replies() {
        let m = maps();
        let via_vip = L4 {
            syn: true,
            ..tcp(CLIENT, 40000, VIP, 80)
        };
        let t = from_pod(&via_vip, &m).unwrap().unwrap();
        let backend_reply = t.flow.reversed();
        assert!(reverse(&backend_reply, &m).is_some());
        // Later the client connects straight to that backend from the same port: its SYN removes the stale
        // REPLY entry, so the backend's answer is left as it is.
        let direct = L4 {
            syn: true,
            ..tcp(CLIENT, 40000, t.flow.daddr, u16::from_be(t.flow.dport_be))
        };
        assert_eq!(from_pod(&direct, &m), Ok(None));
        assert_eq!(reverse(&backend_reply, &m), None);
        assert_eq!(
            from_pod(
                &L4 {
                    flow: backend_reply,
                    offset: 34,
                    syn: false,
                    rst: false,
                },
                &m
            ),
            Ok(None)
        );
        // The frontend flow's own SERVICE entry is untouched; its next packet re-creates the REPLY entry.
        let again = from_pod(&tcp(CLIENT, 40000, VIP, 80), &m).unwrap().unwrap();
        assert!(!again.new_flow);
        assert!(reverse(&backend_reply, &m).is_some());
    }

    #[test]
    fn only_flow_opening_packets_look_for_stale_reply_entries() {
        let m = maps();
        let t = from_pod(&tcp(CLIENT, 40000, VIP, 80), &m).unwrap().unwrap();
        // A non-SYN TCP segment to the backend does not touch the entry (it cannot open a flow) ...
        let ack = tcp(CLIENT, 40000, t.flow.daddr, u16::from_be(t.flow.dport_be));
        assert_eq!(from_pod(&ack, &m), Ok(None));
        assert!(reverse(&t.flow.reversed(), &m).is_some());
        // ... and a SYN between unrelated tuples leaves every entry alone.
        let before = m.ct.borrow().len();
        let other = L4 {
            syn: true,
            ..tcp(CLIENT, 40001, t.flow.daddr, u16::from_be(t.flow.dport_be))
        };
        assert_eq!(from_pod(&other, &m), Ok(None));
        assert_eq!(m.ct.borrow().len(), before);
    }

    #[test]
    fn frontend_without_backends_drops() {
        let mut m = maps();
        let l4 = tcp(CLIENT, 40000, VIP, 80);
        m.services.values_mut().for_each(|s| s.slot_count = 0);
        assert_eq!(from_pod(&l4, &m), Err(Drop::NoBackend));
        // Inconsistent tables: a slot without backend id, a backend id without backend.
        m.services.values_mut().for_each(|s| s.slot_count = 5);
        for port in 0..50 {
            let l4 = tcp(CLIENT, 40000 + port, VIP, 80);
            match from_pod(&l4, &m) {
                Ok(Some(_)) | Err(Drop::NoBackend) => {}
                other => panic!("{other:?}"),
            }
        }
        m.backends.clear();
        assert_eq!(from_pod(&l4, &m), Err(Drop::NoBackend));
        assert!(m.ct.borrow().values().all(|e| e.backend_id != 0));
        assert_eq!(Drop::NoBackend.counter(), Counter::DropNoBackend);
    }

    #[test]
    fn conntrack_failure_is_a_helper_drop() {
        let m = TestMaps {
            ct_full: true,
            ..maps()
        };
        assert_eq!(from_pod(&tcp(CLIENT, 1, VIP, 80), &m), Err(Drop::Helper));
    }

    #[test]
    fn other_destinations_and_ports_are_not_translated() {
        let m = maps();
        assert_eq!(from_pod(&tcp(CLIENT, 40000, BACKEND_A, 8080), &m), Ok(None));
        assert_eq!(from_pod(&tcp(CLIENT, 40000, VIP, 81), &m), Ok(None));
        let udp = L4 {
            flow: Flow {
                proto: proto::UDP,
                ..tcp(CLIENT, 40000, VIP, 80).flow
            },
            ..tcp(CLIENT, 40000, VIP, 80)
        };
        assert_eq!(from_pod(&udp, &m), Ok(None));
        assert!(m.ct.borrow().is_empty());
    }

    #[test]
    fn hairpin_snats_the_client_and_its_reply_goes_back_to_it() {
        let mut m = maps();
        // Only backend A, which is also the client.
        m.services.values_mut().for_each(|s| s.slot_count = 1);
        let l4 = tcp(BACKEND_A, 40000, VIP, 80);
        let t = from_pod(&l4, &m).unwrap().unwrap();
        assert_eq!(
            t.flow,
            Flow {
                saddr: HAIRPIN_IPV4,
                daddr: BACKEND_A,
                dport_be: be(8080),
                ..l4.flow
            }
        );
        let ct = m.ct.borrow().clone();
        assert_eq!(ct[&l4.flow.ct_key(ct_dir::SERVICE)].flags, ct_flags::HAIRPIN);
        let reply_key = CtKeyV4 {
            saddr: BACKEND_A,
            daddr: HAIRPIN_IPV4,
            sport_be: be(8080),
            dport_be: be(40000),
            proto: proto::TCP,
            dir: ct_dir::REPLY,
            _pad: 0,
        };
        assert_eq!(t.flow.reversed().ct_key(ct_dir::REPLY), reply_key);
        let reply = ct[&reply_key];
        assert_eq!((reply.flags, reply.addr), (ct_flags::HAIRPIN, BACKEND_A));

        // The pod answers 169.254.42.1: the answer comes from the frontend, to the pod itself.
        let back = L4 {
            flow: t.flow.reversed(),
            ..l4
        };
        let r = from_pod(&back, &m).unwrap().unwrap();
        assert_eq!(r.flow, l4.flow.reversed());
        // The next packet of the flow is SNATed again.
        assert_eq!(from_pod(&l4, &m).unwrap().unwrap().flow, t.flow);
    }

    #[test]
    fn reply_without_rev_nat_entry_is_left_alone() {
        let mut m = maps();
        let l4 = tcp(CLIENT, 40000, VIP, 80);
        let t = from_pod(&l4, &m).unwrap().unwrap();
        m.rev_nat.clear();
        assert_eq!(reverse(&t.flow.reversed(), &m), None);
    }
}
