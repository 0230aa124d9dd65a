//! Identity-based network policy and flow event rate limiting, as plain functions that unit-test on the host.
//!
//! - [`policy_tuple`]: the tuple policy judges: the sender's original source, the destination after service
//!   translation (forward packets), or the packet's own tuple before reverse translation (replies).
//! - [`address_identity`] / [`overlay_source_identity`] / [`peer_identity`]: the security identity of a peer, from
//!   the local endpoint and ipcache maps, or from an overlay packet's VNI and outer source (`TUNNEL_PEERS`).
//! - [`lookup`]: one endpoint's policy table in one direction, in the order documented on [`PolicyKey`].
//! - [`check`]: the verdict on a packet: a reply of a flow a policy allowed passes (policy conntrack), otherwise
//!   the source endpoint's egress and the destination endpoint's ingress are checked where enforced.
//! - [`tracks_host_flows`] / [`host_flow_opener`] / [`record_host_flow`]: connections the node itself opens to a
//!   pod with egress policy (kubelet probes) are recorded in policy conntrack by `to_pod`, so that the pod's
//!   replies pass its egress check like the replies of any allowed flow.
//! - [`take_token`]: the per-CPU token bucket that limits flow events.
//!
//! Like the rest of the crate this never panics and has no unbounded loop.
use mesh_common::{
    Counter, CtKeyV4, DEFAULT_FLOW_EVENTS_PER_SEC, FlowRate, HAIRPIN_IPV4, LocalEndpoint, NodeConfig,
    PolicyEntry, PolicyKey, TunnelPeer, ct_dir, identity, node_flags, policy_dir, policy_flags, proto,
};

use crate::{
    Drop, Ipv4Header, Maps,
    lb::{Flow, L4, Translation},
};

/// ICMP type of an echo request.
pub const ICMP_ECHO_REQUEST: u8 = 8;

/// Largest port prefix length (an exact port).
pub const MAX_PORT_PLEN: u8 = 16;

/// The policy datapath's view of its maps (the eBPF maps in the kernel, plain tables in tests).
pub trait PolicyMaps {
    /// `POLICY` lookup.
    fn policy(&self, key: &PolicyKey) -> Option<PolicyEntry>;
    /// `POLICY_CIDRS` lookup: the CIDR identity of the longest policy prefix holding `addr`.
    fn policy_cidr(&self, addr: [u8; 4]) -> Option<u32>;
    /// `TUNNEL_PEERS` lookup by underlay address (HOST byte order).
    fn tunnel_peer(&self, underlay_ipv4: u32) -> Option<TunnelPeer>;
    /// Whether the conntrack map holds `key` (a [`ct_dir::POLICY`] key).
    fn policy_ct(&self, key: &CtKeyV4) -> bool;
    /// Records `key` (a [`ct_dir::POLICY`] key) in the conntrack map. A failure is not reported: the flow is
    /// allowed all the same, only its replies are then judged by policy like any other packet.
    fn policy_ct_insert(&self, key: &CtKeyV4);
}

/// The mask of the leading `plen` bits of a port (`plen` above 16 counts as 16).
#[must_use]
pub const fn port_mask(plen: u8) -> u16 {
    if plen == 0 {
        0
    } else if plen >= MAX_PORT_PLEN {
        u16::MAX
    } else {
        u16::MAX.wrapping_shl(MAX_PORT_PLEN.wrapping_sub(plen) as u32)
    }
}

/// The key of `ep`'s table entry for peer `peer`, protocol `proto` and the port block of `plen` bits around
/// `dport` (host order).
#[must_use]
pub const fn policy_key(policy_id: u32, dir: u8, peer: u32, proto: u8, dport: u16, plen: u8) -> PolicyKey {
    PolicyKey {
        policy_id,
        identity: peer,
        port: dport & port_mask(plen),
        proto,
        dir,
        port_plen: plen,
        _pad: [0; 3],
    }
}

/// Looks up the allow entry for a packet in `ep`'s table for direction `dir` ([`policy_dir`]), `peer_identity`
/// being the other end and `peer_addr` its address, `dport` the destination port in HOST order (0 for protocols
/// without ports).
///
/// Order (the first hit wins, as documented on [`PolicyKey`]): for the peer identity; then, when the endpoint has
/// [`policy_flags::CIDR_RULES`] and the peer is not the node, for the CIDR identity of `peer_addr`
/// (`POLICY_CIDRS`: an `ipBlock` matches pod addresses too); then for [`identity::ANY`]. For each: every port
/// prefix length set in the endpoint's bitmap for `dir`, from 16 (exact port) down to 0 (any port), with the
/// packet's protocol; then the any-protocol entry (protocol 0, plen 0). A peer identity of [`identity::ANY`] is
/// looked up once. At most 3 × 18 map lookups, in a loop with constant bounds.
#[must_use]
#[inline(always)] // seven arguments: a BPF function call takes at most five
pub fn lookup(
    maps: &impl PolicyMaps,
    ep: &LocalEndpoint,
    dir: u8,
    peer_identity: u32,
    peer_addr: [u8; 4],
    proto: u8,
    dport: u16,
) -> Option<PolicyEntry> {
    let plens = if dir == policy_dir::INGRESS {
        ep.ingress_plens
    } else {
        ep.egress_plens
    };
    let mut round = 0u32;
    while round < 3 {
        let peer = match round {
            0 => Some(peer_identity),
            1 if ep.policy_flags & policy_flags::CIDR_RULES != 0
                && peer_identity != identity::ANY
                && peer_identity != identity::HOST =>
            {
                maps.policy_cidr(peer_addr).filter(|cidr| *cidr != peer_identity)
            }
            2 if peer_identity != identity::ANY => Some(identity::ANY),
            _ => None,
        };
        if let Some(peer) = peer {
            let mut i = 0u8;
            while i <= MAX_PORT_PLEN {
                let plen = MAX_PORT_PLEN.wrapping_sub(i);
                if plens & 1u32.wrapping_shl(u32::from(plen)) != 0
                    && let Some(entry) = maps.policy(&policy_key(ep.policy_id, dir, peer, proto, dport, plen))
                {
                    return Some(entry);
                }
                i = i.wrapping_add(1);
            }
            if let Some(entry) = maps.policy(&policy_key(ep.policy_id, dir, peer, 0, 0, 0)) {
                return Some(entry);
            }
        }
        round = round.wrapping_add(1);
    }
    None
}

/// The identity of `addr` as a peer: a local endpoint's identity, else [`identity::HOST`] for this node's underlay
/// address, else the ipcache entry's, else [`identity::WORLD`]. An identity that is not known yet (0 on an
/// endpoint or an ipcache entry) is [`identity::PENDING`], never WORLD.
#[must_use]
pub fn address_identity(addr: [u8; 4], maps: &impl Maps) -> u32 {
    let known = match maps.endpoint(addr) {
        Some(ep) => ep.identity,
        None => {
            if maps.node_config().is_some_and(|cfg| is_node_address(addr, &cfg)) {
                return identity::HOST;
            }
            match maps.ipcache(addr) {
                Some(entry) => entry.identity,
                None => return identity::WORLD,
            }
        }
    };
    known_or_pending(known)
}

/// Whether `addr` is this node's own address: the peer identity [`identity::HOST`].
#[must_use]
pub fn is_node_address(addr: [u8; 4], cfg: &NodeConfig) -> bool {
    cfg.node_ipv4 != 0 && cfg.node_ipv4 == u32::from_be_bytes(addr)
}

/// First gate of `to_pod` (what the node's stack sends into a pod): whether a packet from `src` may open a flow
/// that policy conntrack must know, that is whether some endpoint may have a policy ([`node_flags::POLICY`]) and
/// the packet comes from this node ([`identity::HOST`]). Forwarded traffic (replies from outside to a pod's own
/// flows, which conntrack knows already) is left alone.
#[must_use]
pub fn tracks_host_flows(cfg: &NodeConfig, src: [u8; 4]) -> bool {
    cfg.flags & node_flags::POLICY != 0 && is_node_address(src, cfg)
}

/// Second gate of `to_pod`: whether the receiving endpoint enforces egress (only its replies to the node would be
/// judged as new flows to [`identity::HOST`]; without egress policy they pass anyway).
#[must_use]
pub fn egress_enforced(ep: Option<&LocalEndpoint>) -> bool {
    ep.is_some_and(|ep| ep.policy_flags & policy_flags::EGRESS_ENFORCED != 0)
}

/// The tuple of a packet from the node that opens a connection to a pod: a TCP SYN (without ACK), any UDP
/// datagram (UDP has no opening packet), an ICMP echo request (`icmp_type` read from the packet, `None` when
/// unreadable). Anything else (TCP segments of established connections, ICMP errors, later fragments, other
/// protocols) opens nothing: a pod's own connection to the node that its egress policy no longer allows does not
/// come back to life because the node answers it. `l4` is the packet's transport tuple ([`crate::lb::parse_l4`]).
#[must_use]
pub fn host_flow_opener(ip: &Ipv4Header, l4: Option<&L4>, icmp_type: Option<u8>) -> Option<Flow> {
    match (ip.proto, l4) {
        (proto::TCP, Some(l4)) if l4.syn => Some(l4.flow),
        (proto::UDP, Some(l4)) => Some(l4.flow),
        (proto::ICMP, _) if !ip.is_later_fragment() && icmp_type == Some(ICMP_ECHO_REQUEST) => {
            Some(portless_tuple(ip))
        }
        _ => None,
    }
}

/// Records a flow the node opens to a pod (`tuple`, from [`host_flow_opener`]) in policy conntrack, as
/// [`check`] records the flows a policy allowed: the pod's replies then pass as replies. Not for a packet that is
/// itself the reply of a flow the pod opened (its reverse tuple is tracked): that flow stays the pod's, judged by
/// its egress policy on every packet. Returns whether an entry was written.
pub fn record_host_flow(maps: &impl PolicyMaps, tuple: &Flow) -> bool {
    if maps.policy_ct(&tuple.reversed().ct_key(ct_dir::POLICY)) {
        return false;
    }
    let key = tuple.ct_key(ct_dir::POLICY);
    if maps.policy_ct(&key) {
        return false;
    }
    maps.policy_ct_insert(&key);
    true
}

/// The identity of `addr` when its endpoint lookup (`ep`) is already done: the endpoint's, else as
/// [`address_identity`].
#[must_use]
pub fn identity_of(ep: Option<&LocalEndpoint>, addr: [u8; 4], maps: &impl Maps) -> u32 {
    match ep {
        Some(ep) => known_or_pending(ep.identity),
        None => address_identity(addr, maps),
    }
}

/// `id`, or [`identity::PENDING`] when it is 0 (not allocated / not synced yet).
#[must_use]
pub const fn known_or_pending(id: u32) -> u32 {
    if id == identity::ANY {
        identity::PENDING
    } else {
        id
    }
}

/// The source identity of an overlay packet: the per-cluster number from the VNI, completed with the cluster of
/// the sending node (`remote_ipv4`, host order, as the tunnel key reports it). [`identity::PENDING`] when the VNI
/// carries no number (the sender's pod had no identity yet) or the node is not a known tunnel peer.
#[must_use]
pub fn overlay_source_identity(remote_ipv4: u32, vni: u32, maps: &impl PolicyMaps) -> u32 {
    match maps.tunnel_peer(remote_ipv4) {
        Some(peer) => peer_identity(&peer, vni),
        None => identity::PENDING,
    }
}

/// [`overlay_source_identity`] once the sending node's `TUNNEL_PEERS` entry is known (the overlay program looks
/// it up first: only tunnel peers feed the overlay, see [`crate::trust::overlay_peer`]).
#[must_use]
pub const fn peer_identity(peer: &TunnelPeer, vni: u32) -> u32 {
    let local = identity::local(vni);
    if local == 0 || peer.cluster_id == 0 {
        identity::PENDING
    } else {
        identity::compose(peer.cluster_id, local)
    }
}

/// The VNI a packet of `src` carries: the per-cluster number of its identity (0 when it has none yet).
#[must_use]
pub const fn vni_for(src: Option<&LocalEndpoint>) -> u32 {
    match src {
        Some(ep) => identity::local(ep.identity),
        None => 0,
    }
}

/// The tuple policy judges for a packet whose transport tuple is `original` (ports 0 for packets without a
/// transport header): a forward packet the load balancer translated keeps its source and takes the translated
/// destination; a reply keeps its own tuple (policy sees pod addresses, before reverse translation).
#[must_use]
pub const fn policy_tuple(original: &Flow, translation: Option<&Translation>) -> Flow {
    match translation {
        Some(t) if !t.reply => Flow {
            daddr: t.flow.daddr,
            dport_be: t.flow.dport_be,
            ..*original
        },
        _ => *original,
    }
}

/// The tuple of a packet without a transport header policy can read (not TCP or UDP, a later fragment, or too
/// short): addresses and protocol, ports 0.
#[must_use]
pub const fn portless_tuple(ip: &Ipv4Header) -> Flow {
    Flow {
        saddr: ip.src,
        daddr: ip.dst,
        sport_be: 0,
        dport_be: 0,
        proto: ip.proto,
    }
}

/// Whether policy leaves a tuple alone: a hairpin flow (a pod reaching itself through a service, forward tuple
/// from the pod to itself, replies to [`HAIRPIN_IPV4`]).
#[must_use]
pub fn exempt(tuple: &Flow) -> bool {
    tuple.saddr == tuple.daddr || tuple.daddr == HAIRPIN_IPV4 || tuple.saddr == HAIRPIN_IPV4
}

/// Whether policy concerns a packet between these endpoints at all: some policy selects one of them (in either
/// direction). Only then are identities needed and flows tracked; otherwise [`check`] can only find a reply.
#[must_use]
pub fn involved(src_ep: Option<&LocalEndpoint>, dst_ep: Option<&LocalEndpoint>) -> bool {
    src_ep.is_some_and(|ep| ep.policy_flags != 0) || dst_ep.is_some_and(|ep| ep.policy_flags != 0)
}

/// A packet policy lets through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Allowed {
    /// The rule that allowed it ([`PolicyEntry::rule`] of the last direction checked: ingress when both were),
    /// 0 when no rule was needed.
    pub rule: u32,
    /// [`policy_dir`] of the direction that reported `rule`, 0 when no direction was enforced.
    pub dir: u8,
    /// Some direction was enforced for this packet (a table said yes).
    pub enforced: bool,
    /// The packet opened a flow that policy now tracks (its first packet: a flow event is due).
    pub new_flow: bool,
    /// The packet is a reply of a flow a policy allowed (passed without table lookups).
    pub reply: bool,
}

impl Allowed {
    /// The counter this verdict adds to: none for traffic no policy looked at.
    #[must_use]
    pub const fn counter(&self) -> Option<Counter> {
        if self.reply {
            Some(Counter::PolicyReply)
        } else if self.enforced {
            Some(Counter::PolicyAllowed)
        } else {
            None
        }
    }
}

/// A packet policy drops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Denied {
    /// [`policy_dir`] of the direction that denied it.
    pub dir: u8,
    /// The peer's identity was [`identity::PENDING`] (the sync was late, rather than the policy denying it).
    pub pending: bool,
}

impl Denied {
    /// The counter of this drop.
    #[must_use]
    pub const fn counter(&self) -> Counter {
        if self.pending {
            Counter::DropPolicyPending
        } else if self.dir == policy_dir::EGRESS {
            Counter::DropPolicyEgress
        } else {
            Counter::DropPolicyIngress
        }
    }
}

impl From<Denied> for Drop {
    fn from(d: Denied) -> Self {
        if d.pending {
            Drop::PolicyPending
        } else if d.dir == policy_dir::EGRESS {
            Drop::PolicyEgress
        } else {
            Drop::PolicyIngress
        }
    }
}

/// The two ends of a packet as policy sees them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ends<'a> {
    /// The sending endpoint, when it is a pod on this node (its egress is checked here).
    pub src_ep: Option<&'a LocalEndpoint>,
    /// The receiving endpoint, when the packet is delivered to a pod on this node (its ingress is checked here).
    pub dst_ep: Option<&'a LocalEndpoint>,
    /// Identity of the source (the peer of an ingress check).
    pub src_identity: u32,
    /// Identity of the destination (the peer of an egress check).
    pub dst_identity: u32,
}

/// The policy verdict on a packet with policy tuple `tuple` (see [`policy_tuple`]).
///
/// Nothing is looked up when neither endpoint has a policy ([`involved`]). A packet whose reverse tuple is in the
/// policy conntrack is a reply and passes without table lookups. Otherwise the
/// source endpoint's egress (when it has [`policy_flags::EGRESS_ENFORCED`]) and then the destination endpoint's
/// ingress (with [`policy_flags::INGRESS_ENFORCED`]) must each find an allow entry ([`lookup`]); a direction
/// without its flag allows. When an endpoint involved has any policy ([`involved`]) the allowed forward tuple is
/// recorded in conntrack if it is not there yet (`new_flow`), so that the replies pass the other end's checks.
///
/// # Errors
///
/// [`Denied`] with the direction that found no entry and whether its peer was [`identity::PENDING`].
#[inline(always)]
pub fn check(maps: &impl PolicyMaps, tuple: &Flow, ends: &Ends<'_>) -> Result<Allowed, Denied> {
    let unpoliced = Allowed {
        rule: 0,
        dir: 0,
        enforced: false,
        new_flow: false,
        reply: false,
    };
    // Conntrack entries are only written for flows of endpoints with a policy, and the reply of such a flow
    // involves the same endpoint on this node (its delivery or its sending): traffic between endpoints without
    // policy costs no lookup at all.
    if !involved(ends.src_ep, ends.dst_ep) {
        return Ok(unpoliced);
    }
    if maps.policy_ct(&tuple.reversed().ct_key(ct_dir::POLICY)) {
        return Ok(Allowed {
            reply: true,
            ..unpoliced
        });
    }
    let dport = u16::from_be(tuple.dport_be);
    let mut verdict = unpoliced;
    if let Some(ep) = ends.src_ep
        && ep.policy_flags & policy_flags::EGRESS_ENFORCED != 0
    {
        let peer = ends.dst_identity;
        let Some(entry) = lookup(
            maps,
            ep,
            policy_dir::EGRESS,
            peer,
            tuple.daddr,
            tuple.proto,
            dport,
        ) else {
            return Err(Denied {
                dir: policy_dir::EGRESS,
                pending: peer == identity::PENDING,
            });
        };
        verdict.rule = entry.rule;
        verdict.dir = policy_dir::EGRESS;
        verdict.enforced = true;
    }
    if let Some(ep) = ends.dst_ep
        && ep.policy_flags & policy_flags::INGRESS_ENFORCED != 0
    {
        let peer = ends.src_identity;
        let Some(entry) = lookup(
            maps,
            ep,
            policy_dir::INGRESS,
            peer,
            tuple.saddr,
            tuple.proto,
            dport,
        ) else {
            return Err(Denied {
                dir: policy_dir::INGRESS,
                pending: peer == identity::PENDING,
            });
        };
        verdict.rule = entry.rule;
        verdict.dir = policy_dir::INGRESS;
        verdict.enforced = true;
    }
    let key = tuple.ct_key(ct_dir::POLICY);
    if !maps.policy_ct(&key) {
        maps.policy_ct_insert(&key);
        verdict.new_flow = true;
    }
    Ok(verdict)
}

/// Nanoseconds per second.
const NS_PER_SEC: u64 = 1_000_000_000;

/// The flow event rate per CPU and second for [`mesh_common::NodeConfig::flow_events_per_sec`] `configured`.
#[must_use]
pub const fn flow_event_rate(configured: u32) -> u64 {
    if configured == 0 {
        DEFAULT_FLOW_EVENTS_PER_SEC as u64
    } else {
        configured as u64
    }
}

/// Takes one token from a flow event bucket at time `now_ns` (`bpf_ktime_get_ns`) for a rate of `per_sec`
/// events per second ([`flow_event_rate`]); `false` when the bucket is empty (the event is suppressed).
///
/// The bucket holds up to one second's worth of tokens (`per_sec`) and refills continuously: the time a refill
/// accounts for is subtracted exactly, so no fraction of a token is lost between frequent calls. A bucket that was
/// idle for a second or more (or never used) is full. Time going backwards refills nothing.
pub fn take_token(bucket: &mut FlowRate, now_ns: u64, per_sec: u64) -> bool {
    let rate = if per_sec == 0 { 1 } else { per_sec };
    let elapsed = now_ns.saturating_sub(bucket.last_ns);
    if bucket.last_ns == 0 || elapsed >= NS_PER_SEC {
        bucket.tokens = rate;
        bucket.last_ns = now_ns;
    } else {
        // elapsed < 1e9 and rate < 2^32: the product fits u64.
        let refill = elapsed.saturating_mul(rate) / NS_PER_SEC;
        if refill > 0 {
            bucket.tokens = bucket.tokens.saturating_add(refill).min(rate);
            bucket.last_ns = bucket
                .last_ns
                .saturating_add(refill.saturating_mul(NS_PER_SEC) / rate);
        }
    }
    if bucket.tokens == 0 {
        return false;
    }
    bucket.tokens -= 1;
    true
}

#[cfg(test)]
mod tests {
    use std::{
        cell::RefCell,
        collections::{HashMap, HashSet},
    };

    use mesh_common::{IpcacheEntry, NodeConfig, proto};

    use super::*;

    const POD_A: [u8; 4] = [10, 1, 0, 2];
    const POD_B: [u8; 4] = [10, 1, 0, 3];
    const REMOTE_POD: [u8; 4] = [10, 2, 0, 7];
    const UNSYNCED_POD: [u8; 4] = [10, 2, 0, 8];
    const OUTSIDE: [u8; 4] = [192, 0, 2, 1];
    const ID_A: u32 = identity::compose(1, 300);
    const ID_B: u32 = identity::compose(1, 301);
    const ID_REMOTE: u32 = identity::compose(2, 500);
    const PEER_NODE: u32 = 0xac12_0003;

    #[derive(Default)]
    struct TestMaps {
        endpoints: HashMap<[u8; 4], LocalEndpoint>,
        ipcache: Vec<([u8; 4], u32, IpcacheEntry)>,
        policy: HashMap<PolicyKey, PolicyEntry>,
        peers: HashMap<u32, TunnelPeer>,
        cidrs: Vec<([u8; 4], u32, u32)>,
        ct: RefCell<HashSet<CtKeyV4>>,
        lookups: RefCell<Vec<PolicyKey>>,
        node: Option<NodeConfig>,
    }

    impl Maps for TestMaps {
        fn endpoint(&self, ip: [u8; 4]) -> Option<LocalEndpoint> {
            self.endpoints.get(&ip).copied()
        }
        fn ipcache(&self, ip: [u8; 4]) -> Option<IpcacheEntry> {
            crate::test_lpm_lookup(&self.ipcache, ip)
        }
        fn node_config(&self) -> Option<NodeConfig> {
            self.node
        }
    }

    impl PolicyMaps for TestMaps {
        fn policy(&self, key: &PolicyKey) -> Option<PolicyEntry> {
            self.lookups.borrow_mut().push(*key);
            self.policy.get(key).copied()
        }
        fn policy_cidr(&self, addr: [u8; 4]) -> Option<u32> {
            crate::test_lpm_lookup(&self.cidrs, addr)
        }
        fn tunnel_peer(&self, underlay_ipv4: u32) -> Option<TunnelPeer> {
            self.peers.get(&underlay_ipv4).copied()
        }
        fn policy_ct(&self, key: &CtKeyV4) -> bool {
            self.ct.borrow().contains(key)
        }
        fn policy_ct_insert(&self, key: &CtKeyV4) {
            self.ct.borrow_mut().insert(*key);
        }
    }

    /// An entry of `ep`'s table: peer, proto, port block (port, plen), rule.
    type Rule = (u32, u8, u16, u8, u32);

    impl TestMaps {
        /// Writes `rules` as the table of `ep` for `dir` and sets the bitmap and flag.
        fn table(&mut self, ep: &mut LocalEndpoint, dir: u8, rules: &[Rule]) {
            for &(peer, proto, port, plen, rule) in rules {
                let key = policy_key(ep.policy_id, dir, peer, proto, port, plen);
                assert_eq!(key.port, port, "test rule with host bits");
                self.policy.insert(key, PolicyEntry { rule, _pad: 0 });
                let bit = 1u32 << plen;
                if dir == policy_dir::INGRESS {
                    ep.ingress_plens |= bit;
                    ep.policy_flags |= policy_flags::INGRESS_ENFORCED;
                } else {
                    ep.egress_plens |= bit;
                    ep.policy_flags |= policy_flags::EGRESS_ENFORCED;
                }
            }
            if rules.is_empty() {
                ep.policy_flags |= if dir == policy_dir::INGRESS {
                    policy_flags::INGRESS_ENFORCED
                } else {
                    policy_flags::EGRESS_ENFORCED
                };
            }
        }
    }

    fn ep(identity: u32, policy_id: u32) -> LocalEndpoint {
        LocalEndpoint {
            ifindex: 5,
            identity,
            policy_id,
            ..Default::default()
        }
    }

    fn tcp(saddr: [u8; 4], sport: u16, daddr: [u8; 4], dport: u16) -> Flow {
        Flow {
            saddr,
            daddr,
            sport_be: sport.to_be(),
            dport_be: dport.to_be(),
            proto: proto::TCP,
        }
    }

    #[test]
    fn port_masks_cover_aligned_blocks() {
        assert_eq!(port_mask(0), 0);
        assert_eq!(port_mask(16), 0xffff);
        assert_eq!(port_mask(17), 0xffff);
        assert_eq!(port_mask(1), 0x8000);
        assert_eq!(port_mask(6), 0xfc00);
        // 8080-8087 is the block 8080/13.
        let key = policy_key(1, policy_dir::INGRESS, ID_A, proto::TCP, 8085, 13);
        assert_eq!(key.port, 8080);
        assert_eq!(
            policy_key(1, policy_dir::INGRESS, ID_A, proto::TCP, 8088, 13).port,
            8088
        );
    }

    #[test]
    fn lookup_order_prefers_the_peer_and_longer_port_blocks() {
        let mut m = TestMaps::default();
        let mut b = ep(ID_B, 7);
        m.table(
            &mut b,
            policy_dir::INGRESS,
            &[
                (ID_A, proto::TCP, 80, 16, 1),
                (ID_A, proto::TCP, 0, 0, 2),
                (ID_A, 0, 0, 0, 3),
                (identity::ANY, proto::TCP, 80, 16, 4),
                (identity::ANY, proto::TCP, 64, 10, 5),
                (identity::ANY, 0, 0, 0, 6),
            ],
        );
        let rule = |peer, proto, port| {
            lookup(&m, &b, policy_dir::INGRESS, peer, OUTSIDE, proto, port).map(|e| e.rule)
        };
        assert_eq!(rule(ID_A, proto::TCP, 80), Some(1), "peer, exact port");
        assert_eq!(rule(ID_A, proto::TCP, 81), Some(2), "peer, any port");
        assert_eq!(rule(ID_A, proto::UDP, 80), Some(3), "peer, any protocol");
        assert_eq!(rule(ID_REMOTE, proto::TCP, 80), Some(4), "any peer, exact port");
        assert_eq!(
            rule(ID_REMOTE, proto::TCP, 127),
            Some(5),
            "any peer, block 64-127"
        );
        assert_eq!(
            rule(ID_REMOTE, proto::TCP, 128),
            Some(6),
            "any peer, any protocol"
        );
        assert_eq!(
            rule(identity::PENDING, proto::UDP, 53),
            Some(6),
            "pending matches any-peer rules"
        );
        // Other direction and other tables see nothing.
        assert_eq!(
            lookup(&m, &b, policy_dir::EGRESS, ID_A, OUTSIDE, proto::TCP, 80),
            None
        );
        let other = LocalEndpoint { policy_id: 8, ..b };
        assert_eq!(
            lookup(&m, &other, policy_dir::INGRESS, ID_A, OUTSIDE, proto::TCP, 80),
            None
        );
    }

    #[test]
    fn lookup_visits_only_the_bitmap_plens_in_order() {
        let mut m = TestMaps::default();
        let mut b = ep(ID_B, 7);
        m.table(
            &mut b,
            policy_dir::EGRESS,
            &[
                (ID_REMOTE, proto::TCP, 443, 16, 1),
                (ID_REMOTE, proto::TCP, 0, 4, 2),
            ],
        );
        assert_eq!(
            lookup(&m, &b, policy_dir::EGRESS, ID_A, OUTSIDE, proto::UDP, 53),
            None
        );
        let seen: Vec<(u32, u8, u8, u16)> = m
            .lookups
            .borrow()
            .iter()
            .map(|k| (k.identity, k.proto, k.port_plen, k.port))
            .collect();
        assert_eq!(
            seen,
            [
                (ID_A, proto::UDP, 16, 53),
                (ID_A, proto::UDP, 4, 0),
                (ID_A, 0, 0, 0),
                (identity::ANY, proto::UDP, 16, 53),
                (identity::ANY, proto::UDP, 4, 0),
                (identity::ANY, 0, 0, 0),
            ]
        );
        // A peer of ANY is looked up once.
        m.lookups.borrow_mut().clear();
        assert_eq!(
            lookup(&m, &b, policy_dir::EGRESS, identity::ANY, OUTSIDE, proto::UDP, 53),
            None
        );
        assert_eq!(m.lookups.borrow().len(), 3);
        assert!(
            m.lookups
                .borrow()
                .iter()
                .all(|k| k.policy_id == 7 && k.dir == policy_dir::EGRESS)
        );
    }

    #[test]
    fn port_blocks_match_their_range_only() {
        let mut m = TestMaps::default();
        let mut b = ep(ID_B, 7);
        // 8080-8087 (/13) and 9000 (/16).
        m.table(
            &mut b,
            policy_dir::INGRESS,
            &[(ID_A, proto::TCP, 8080, 13, 1), (ID_A, proto::TCP, 9000, 16, 2)],
        );
        let allowed =
            |port| lookup(&m, &b, policy_dir::INGRESS, ID_A, OUTSIDE, proto::TCP, port).map(|e| e.rule);
        assert_eq!(allowed(8079), None);
        for port in 8080..=8087 {
            assert_eq!(allowed(port), Some(1), "port {port}");
        }
        assert_eq!(allowed(8088), None);
        assert_eq!(allowed(9000), Some(2));
        assert_eq!(allowed(9001), None);
        assert_eq!(
            lookup(&m, &b, policy_dir::INGRESS, ID_A, OUTSIDE, proto::UDP, 8080),
            None,
            "protocol matters"
        );
    }

    #[test]
    fn identities_of_addresses() {
        let mut m = TestMaps::default();
        m.endpoints.insert(POD_A, ep(ID_A, 0));
        m.endpoints.insert(POD_B, ep(0, 0));
        m.ipcache.push((
            [10, 2, 0, 0],
            16,
            IpcacheEntry {
                identity: identity::PENDING,
                ..Default::default()
            },
        ));
        m.ipcache.push((
            REMOTE_POD,
            32,
            IpcacheEntry {
                identity: ID_REMOTE,
                ..Default::default()
            },
        ));
        m.ipcache.push(([10, 3, 0, 0], 16, IpcacheEntry::default()));
        assert_eq!(address_identity(POD_A, &m), ID_A);
        assert_eq!(
            address_identity(POD_B, &m),
            identity::PENDING,
            "endpoint without identity"
        );
        assert_eq!(address_identity(REMOTE_POD, &m), ID_REMOTE);
        assert_eq!(
            address_identity(UNSYNCED_POD, &m),
            identity::PENDING,
            "pod prefix, /32 not synced"
        );
        assert_eq!(
            address_identity([10, 3, 0, 1], &m),
            identity::PENDING,
            "identity 0 in the ipcache"
        );
        assert_eq!(address_identity(OUTSIDE, &m), identity::WORLD);
        m.node = Some(NodeConfig {
            node_ipv4: u32::from_be_bytes(OUTSIDE),
            ..Default::default()
        });
        assert_eq!(address_identity(OUTSIDE, &m), identity::HOST, "this node");
        assert_eq!(address_identity(POD_A, &m), ID_A);
        let a = ep(ID_B, 0);
        assert_eq!(identity_of(Some(&a), POD_A, &m), ID_B, "the endpoint given wins");
        assert_eq!(identity_of(None, REMOTE_POD, &m), ID_REMOTE);
    }

    #[test]
    fn overlay_source_identity_takes_the_cluster_from_the_outer_source() {
        let mut m = TestMaps::default();
        m.peers.insert(
            PEER_NODE,
            TunnelPeer {
                cluster_id: 2,
                ..Default::default()
            },
        );
        assert_eq!(overlay_source_identity(PEER_NODE, 500, &m), ID_REMOTE);
        // Bits above the 20-bit number are not trusted.
        assert_eq!(
            overlay_source_identity(PEER_NODE, 0x0f0_0000 | 500, &m),
            ID_REMOTE
        );
        assert_eq!(
            overlay_source_identity(PEER_NODE, 0, &m),
            identity::PENDING,
            "VNI 0"
        );
        assert_eq!(
            overlay_source_identity(PEER_NODE, 0x10_0000, &m),
            identity::PENDING
        );
        assert_eq!(
            overlay_source_identity(PEER_NODE + 1, 500, &m),
            identity::PENDING,
            "unknown node"
        );
        m.peers.insert(PEER_NODE + 1, TunnelPeer::default());
        assert_eq!(
            overlay_source_identity(PEER_NODE + 1, 500, &m),
            identity::PENDING,
            "cluster 0"
        );
        // With the peer already looked up.
        let peer = TunnelPeer {
            cluster_id: 2,
            ..Default::default()
        };
        assert_eq!(peer_identity(&peer, 500), ID_REMOTE);
        assert_eq!(peer_identity(&peer, 0), identity::PENDING);
        assert_eq!(peer_identity(&TunnelPeer::default(), 500), identity::PENDING);
        // The sender's side: the per-cluster number of the pod's identity.
        let a = ep(ID_REMOTE, 0);
        assert_eq!(vni_for(Some(&a)), 500);
        assert_eq!(vni_for(None), 0);
    }

    #[test]
    fn identities_of_the_edge_cluster_ids_cross_the_overlay_whole() {
        // A pod of cluster 1 or 4095 sends the per-cluster number only; the receiver puts the sender's cluster back
        // from its tunnel peer entry, whatever the number (the lowest allocated one up to the largest).
        let mut m = TestMaps::default();
        for (i, cluster) in [1u16, 2048, 4095].into_iter().enumerate() {
            let node = PEER_NODE + 10 + u32::try_from(i).unwrap_or(0);
            m.peers.insert(
                node,
                TunnelPeer {
                    cluster_id: cluster,
                    ..Default::default()
                },
            );
            for number in [identity::FIRST_ALLOCATED, identity::LOCAL_MASK] {
                let sent = identity::compose(cluster, number);
                let vni = vni_for(Some(&ep(sent, 0)));
                assert_eq!(vni, number, "cluster {cluster}: only the number travels");
                assert!(vni <= mesh_common::VNI_MASK);
                assert_eq!(
                    overlay_source_identity(node, vni, &m),
                    sent,
                    "cluster {cluster}, number {number}"
                );
            }
        }
        // The same number from the two edge clusters stays two identities.
        assert_ne!(
            overlay_source_identity(PEER_NODE + 10, 300, &m),
            overlay_source_identity(PEER_NODE + 12, 300, &m)
        );
    }

    #[test]
    fn policy_tuple_is_translated_destination_and_original_source() {
        let original = tcp(POD_A, 40000, [10, 96, 0, 10], 80);
        assert_eq!(policy_tuple(&original, None), original);
        let forward = Translation {
            flow: Flow {
                saddr: HAIRPIN_IPV4,
                daddr: POD_B,
                dport_be: 8080u16.to_be(),
                ..original
            },
            new_flow: true,
            reply: false,
            backend_id: 1,
        };
        assert_eq!(
            policy_tuple(&original, Some(&forward)),
            tcp(POD_A, 40000, POD_B, 8080)
        );
        let reply_packet = tcp(POD_B, 8080, POD_A, 40000);
        let reply = Translation {
            flow: tcp([10, 96, 0, 10], 80, POD_A, 40000),
            new_flow: false,
            reply: true,
            backend_id: 1,
        };
        assert_eq!(
            policy_tuple(&reply_packet, Some(&reply)),
            reply_packet,
            "before reverse translation"
        );
        let ip = Ipv4Header {
            src: POD_A,
            dst: POD_B,
            header_len: 20,
            total_len: 84,
            proto: proto::ICMP,
            frag_off: 0,
        };
        assert_eq!(
            portless_tuple(&ip),
            Flow {
                saddr: POD_A,
                daddr: POD_B,
                sport_be: 0,
                dport_be: 0,
                proto: proto::ICMP
            }
        );
        assert!(exempt(&tcp(POD_A, 40000, POD_A, 8080)), "hairpin forward");
        assert!(exempt(&tcp(POD_A, 8080, HAIRPIN_IPV4, 40000)), "hairpin reply");
        assert!(!exempt(&original));
    }

    /// B (ingress: A may reach TCP 80, rule 11) and A (egress: to B on TCP 80, rule 21; to anyone on UDP 53,
    /// rule 22).
    fn policed() -> (TestMaps, LocalEndpoint, LocalEndpoint) {
        let mut m = TestMaps::default();
        let mut a = ep(ID_A, 1);
        let mut b = ep(ID_B, 2);
        m.table(&mut b, policy_dir::INGRESS, &[(ID_A, proto::TCP, 80, 16, 11)]);
        m.table(
            &mut a,
            policy_dir::EGRESS,
            &[
                (ID_B, proto::TCP, 80, 16, 21),
                (identity::ANY, proto::UDP, 53, 16, 22),
            ],
        );
        (m, a, b)
    }

    #[test]
    fn both_directions_must_allow_and_the_ingress_rule_is_reported() {
        let (m, a, b) = policed();
        let ends = Ends {
            src_ep: Some(&a),
            dst_ep: Some(&b),
            src_identity: ID_A,
            dst_identity: ID_B,
        };
        let v = check(&m, &tcp(POD_A, 40000, POD_B, 80), &ends).unwrap();
        assert_eq!(
            v,
            Allowed {
                rule: 11,
                dir: policy_dir::INGRESS,
                enforced: true,
                new_flow: true,
                reply: false
            }
        );
        assert_eq!(v.counter(), Some(Counter::PolicyAllowed));
        assert!(
            m.ct.borrow()
                .contains(&tcp(POD_A, 40000, POD_B, 80).ct_key(ct_dir::POLICY))
        );
        // The next packet of the flow is checked again but is not new.
        let again = check(&m, &tcp(POD_A, 40000, POD_B, 80), &ends).unwrap();
        assert!(!again.new_flow && again.enforced);
        // Egress allows port 81? No: egress denies first.
        let denied = check(&m, &tcp(POD_A, 40000, POD_B, 81), &ends).unwrap_err();
        assert_eq!(
            denied,
            Denied {
                dir: policy_dir::EGRESS,
                pending: false
            }
        );
        assert_eq!(denied.counter(), Counter::DropPolicyEgress);
        assert_eq!(Drop::from(denied).counter(), Counter::DropPolicyEgress);
        // UDP 53 to B: egress allows (any peer), B's ingress denies.
        let flow = Flow {
            proto: proto::UDP,
            ..tcp(POD_A, 40000, POD_B, 53)
        };
        let denied = check(&m, &flow, &ends).unwrap_err();
        assert_eq!(denied.counter(), Counter::DropPolicyIngress);
        assert_eq!(Drop::from(denied).counter(), Counter::DropPolicyIngress);
        assert!(
            !m.ct.borrow().contains(&flow.ct_key(ct_dir::POLICY)),
            "denied flows are not tracked"
        );
    }

    /// A's egress allows the ipBlock 10.2.0.0/16 except 10.2.0.8/29 on TCP 80 (CIDR identities 0x10000 and 0x10001,
    /// rule 31): pod addresses inside the block match even though their own identity is a pod identity.
    #[test]
    fn ip_blocks_match_pod_addresses_by_their_cidr_identity() {
        const CIDR_16: u32 = identity::FIRST_CIDR;
        const CIDR_EXCEPT: u32 = identity::FIRST_CIDR + 1;
        let mut m = TestMaps::default();
        let mut a = ep(ID_A, 1);
        m.table(&mut a, policy_dir::EGRESS, &[(CIDR_16, proto::TCP, 80, 16, 31)]);
        m.cidrs = vec![([10, 2, 0, 0], 16, CIDR_16), ([10, 2, 0, 8], 29, CIDR_EXCEPT)];
        let to = |a: &LocalEndpoint, addr, identity| {
            let ends = Ends {
                src_ep: Some(a),
                dst_ep: None,
                src_identity: ID_A,
                dst_identity: identity,
            };
            check(&m, &tcp(POD_A, 40000, addr, 80), &ends)
        };
        // Without the flag the block is never looked up (tables without ipBlocks pay nothing).
        assert!(to(&a, REMOTE_POD, ID_REMOTE).is_err());
        a.policy_flags |= policy_flags::CIDR_RULES;
        let to = |addr, identity| to(&a, addr, identity);
        assert_eq!(
            to(REMOTE_POD, ID_REMOTE).map(|v| v.rule),
            Ok(31),
            "a pod in the block"
        );
        assert_eq!(
            to(UNSYNCED_POD, identity::PENDING).map(|v| v.rule),
            Err(Denied {
                dir: policy_dir::EGRESS,
                pending: true
            }),
            "10.2.0.8 is in the except prefix"
        );
        assert!(
            to([10, 2, 1, 1], identity::PENDING).is_ok(),
            "an address without an identity yet"
        );
        assert!(to([10, 3, 0, 1], ID_REMOTE).is_err(), "outside the block");
        assert!(
            to([10, 2, 0, 1], identity::HOST).is_err(),
            "the node is never an ipBlock peer"
        );
    }

    #[test]
    fn egress_only_reports_the_egress_rule() {
        let (m, a, _) = policed();
        let ends = Ends {
            src_ep: Some(&a),
            dst_ep: None,
            src_identity: ID_A,
            dst_identity: ID_REMOTE,
        };
        let flow = Flow {
            proto: proto::UDP,
            ..tcp(POD_A, 40000, REMOTE_POD, 53)
        };
        let v = check(&m, &flow, &ends).unwrap();
        assert_eq!((v.rule, v.dir, v.new_flow), (22, policy_dir::EGRESS, true));
    }

    #[test]
    fn replies_pass_without_lookups() {
        let (m, a, b) = policed();
        let forward = tcp(POD_A, 40000, POD_B, 80);
        let ends = Ends {
            src_ep: Some(&a),
            dst_ep: Some(&b),
            src_identity: ID_A,
            dst_identity: ID_B,
        };
        check(&m, &forward, &ends).unwrap();
        // B answers: B has no egress policy, A has no ingress policy, but the reply is recognised.
        m.lookups.borrow_mut().clear();
        let back = Ends {
            src_ep: Some(&b),
            dst_ep: Some(&a),
            src_identity: ID_B,
            dst_identity: ID_A,
        };
        let v = check(&m, &forward.reversed(), &back).unwrap();
        assert!(v.reply && !v.new_flow);
        assert_eq!(v.counter(), Some(Counter::PolicyReply));
        assert!(m.lookups.borrow().is_empty());
        // A reply to an endpoint whose ingress would deny it passes as well.
        let strict_a = LocalEndpoint {
            policy_flags: a.policy_flags | policy_flags::INGRESS_ENFORCED,
            ..a
        };
        let back = Ends {
            dst_ep: Some(&strict_a),
            ..back
        };
        assert!(check(&m, &forward.reversed(), &back).unwrap().reply);
        // The same packet without the conntrack entry is denied by A's ingress.
        m.ct.borrow_mut().clear();
        let denied = check(&m, &forward.reversed(), &back).unwrap_err();
        assert_eq!(denied.dir, policy_dir::INGRESS);
    }

    #[test]
    fn an_endpoint_with_ingress_policy_tracks_its_outgoing_flows() {
        // A only has ingress policy (deny all); what it opens must get its replies back.
        let mut m = TestMaps::default();
        let mut a = ep(ID_A, 1);
        m.table(&mut a, policy_dir::INGRESS, &[]);
        let out = Ends {
            src_ep: Some(&a),
            dst_ep: None,
            src_identity: ID_A,
            dst_identity: ID_REMOTE,
        };
        let forward = tcp(POD_A, 40000, REMOTE_POD, 443);
        let v = check(&m, &forward, &out).unwrap();
        assert!(v.new_flow && !v.enforced);
        assert_eq!(v.counter(), None, "no direction was enforced");
        let back = Ends {
            src_ep: None,
            dst_ep: Some(&a),
            src_identity: ID_REMOTE,
            dst_identity: ID_A,
        };
        assert!(check(&m, &forward.reversed(), &back).unwrap().reply);
        // A new connection from the remote pod is denied.
        let denied = check(&m, &tcp(REMOTE_POD, 5000, POD_A, 22), &back).unwrap_err();
        assert_eq!(denied.counter(), Counter::DropPolicyIngress);
    }

    #[test]
    fn pending_peers_only_match_any_peer_rules_and_have_their_own_drop() {
        let mut m = TestMaps::default();
        let mut b = ep(ID_B, 2);
        m.table(
            &mut b,
            policy_dir::INGRESS,
            &[
                (ID_A, proto::TCP, 80, 16, 1),
                (identity::WORLD, proto::TCP, 0, 0, 2),
            ],
        );
        fn ends(b: &LocalEndpoint, src_identity: u32) -> Ends<'_> {
            Ends {
                src_ep: None,
                dst_ep: Some(b),
                src_identity,
                dst_identity: ID_B,
            }
        }
        let pending = check(&m, &tcp(UNSYNCED_POD, 1, POD_B, 80), &ends(&b, identity::PENDING)).unwrap_err();
        assert_eq!(
            pending,
            Denied {
                dir: policy_dir::INGRESS,
                pending: true
            }
        );
        assert_eq!(pending.counter(), Counter::DropPolicyPending);
        assert_eq!(Drop::from(pending).counter(), Counter::DropPolicyPending);
        // WORLD is allowed by the world rule; PENDING never is.
        let v = check(&m, &tcp(OUTSIDE, 1, POD_B, 80), &ends(&b, identity::WORLD)).unwrap();
        assert_eq!(v.rule, 2);
        // A known but unlisted peer is a plain policy drop.
        let denied = check(&m, &tcp(REMOTE_POD, 1, POD_B, 80), &ends(&b, ID_REMOTE)).unwrap_err();
        assert_eq!(denied.counter(), Counter::DropPolicyIngress);
        // An any-peer rule admits pending peers.
        m.table(
            &mut b,
            policy_dir::INGRESS,
            &[(identity::ANY, proto::TCP, 80, 16, 3)],
        );
        let v = check(&m, &tcp(UNSYNCED_POD, 1, POD_B, 80), &ends(&b, identity::PENDING));
        assert_eq!(v.map(|a| a.rule), Ok(3));
        // Egress to a pending destination.
        let mut a = ep(ID_A, 1);
        m.table(&mut a, policy_dir::EGRESS, &[(ID_B, proto::TCP, 80, 16, 4)]);
        let out = Ends {
            src_ep: Some(&a),
            dst_ep: None,
            src_identity: ID_A,
            dst_identity: identity::PENDING,
        };
        let denied = check(&m, &tcp(POD_A, 1, UNSYNCED_POD, 80), &out).unwrap_err();
        assert_eq!(
            denied,
            Denied {
                dir: policy_dir::EGRESS,
                pending: true
            }
        );
    }

    #[test]
    fn unpoliced_traffic_is_neither_counted_nor_tracked() {
        let m = TestMaps::default();
        let (a, b) = (ep(ID_A, 0), ep(ID_B, 0));
        let ends = Ends {
            src_ep: Some(&a),
            dst_ep: Some(&b),
            src_identity: 0,
            dst_identity: 0,
        };
        assert!(!involved(Some(&a), Some(&b)));
        let v = check(&m, &tcp(POD_A, 1, POD_B, 80), &ends).unwrap();
        assert_eq!(v.counter(), None);
        assert!(!v.new_flow && !v.reply);
        assert!(m.ct.borrow().is_empty());
        assert!(m.lookups.borrow().is_empty());
        // A conntrack entry left from when one of them had a policy is not even looked at.
        m.ct.borrow_mut()
            .insert(tcp(POD_B, 80, POD_A, 1).ct_key(ct_dir::POLICY));
        assert_eq!(check(&m, &tcp(POD_A, 1, POD_B, 80), &ends), Ok(v));
    }

    #[test]
    fn empty_enforced_table_denies_everything() {
        let mut m = TestMaps::default();
        let mut b = ep(ID_B, 2);
        m.table(&mut b, policy_dir::INGRESS, &[]);
        let ends = Ends {
            src_ep: None,
            dst_ep: Some(&b),
            src_identity: ID_A,
            dst_identity: ID_B,
        };
        assert!(check(&m, &tcp(POD_A, 1, POD_B, 80), &ends).is_err());
        // Its egress is not enforced: B's own flows pass (and are tracked, B has a policy).
        let out = Ends {
            src_ep: Some(&b),
            dst_ep: None,
            src_identity: ID_B,
            dst_identity: ID_A,
        };
        assert!(check(&m, &tcp(POD_B, 1, POD_A, 80), &out).unwrap().new_flow);
    }

    #[test]
    fn token_bucket_allows_a_burst_then_the_rate() {
        let mut bucket = FlowRate::default();
        let t0 = 5 * NS_PER_SEC;
        let rate = flow_event_rate(10);
        assert_eq!(flow_event_rate(0), u64::from(DEFAULT_FLOW_EVENTS_PER_SEC));
        // A fresh bucket is full: one second's worth.
        let burst = (0..20).filter(|_| take_token(&mut bucket, t0, rate)).count();
        assert_eq!(burst, 10);
        // 99 ms later: not a whole token yet; 100 ms: one.
        assert!(!take_token(&mut bucket, t0 + 99_000_000, rate));
        assert!(take_token(&mut bucket, t0 + 100_000_000, rate));
        assert!(!take_token(&mut bucket, t0 + 100_000_001, rate));
        // Frequent calls do not lose fractions: 10 calls 50 ms apart yield 5 tokens.
        let mut got = 0;
        for i in 1..=10u64 {
            if take_token(&mut bucket, t0 + 100_000_000 + i * 50_000_000, rate) {
                got += 1;
            }
        }
        assert_eq!(got, 5);
        // Idle for a second: full again, never more.
        let later = t0 + 10 * NS_PER_SEC;
        let burst = (0..20).filter(|_| take_token(&mut bucket, later, rate)).count();
        assert_eq!(burst, 10);
        // Time going backwards refills nothing.
        assert!(!take_token(&mut bucket, later - 1, rate));
    }

    #[test]
    fn token_bucket_over_a_long_run_keeps_the_rate() {
        let mut bucket = FlowRate::default();
        let rate = flow_event_rate(2000);
        let start = 100 * NS_PER_SEC;
        // One attempt every 37 µs for 3 s: the first second's burst plus 2000/s.
        let mut got = 0u64;
        let mut t = start;
        while t < start + 3 * NS_PER_SEC {
            if take_token(&mut bucket, t, rate) {
                got += 1;
            }
            t += 37_000;
        }
        assert!((7990..=8001).contains(&got), "{got}");
        // Huge timestamps do not overflow.
        let mut b = FlowRate {
            tokens: 0,
            last_ns: u64::MAX - 10,
        };
        // 5 ns at 2^32-1 per second: 21 tokens, one taken.
        assert!(take_token(&mut b, u64::MAX - 5, u64::from(u32::MAX)));
        assert_eq!(b.tokens, 20);
        assert!(take_token(
            &mut FlowRate::default(),
            u64::MAX,
            u64::from(u32::MAX)
        ));
    }

    #[test]
    fn the_node_s_flows_to_an_egress_enforced_pod_get_their_replies_back() {
        const NODE: [u8; 4] = [172, 18, 0, 2];
        let cfg = NodeConfig {
            node_ipv4: u32::from_be_bytes(NODE),
            flags: node_flags::POLICY,
            ..Default::default()
        };
        assert!(tracks_host_flows(&cfg, NODE));
        assert!(
            !tracks_host_flows(&cfg, OUTSIDE),
            "forwarded traffic is not the node's"
        );
        let off = NodeConfig { flags: 0, ..cfg };
        assert!(
            !tracks_host_flows(&off, NODE),
            "no policy on the node: nothing to do"
        );
        assert!(
            !tracks_host_flows(&NodeConfig::default(), [0; 4]),
            "no node address yet"
        );

        // A denies all egress.
        let mut m = TestMaps::default();
        let mut a = ep(ID_A, 1);
        assert!(!egress_enforced(Some(&a)) && !egress_enforced(None));
        m.table(&mut a, policy_dir::EGRESS, &[]);
        assert!(egress_enforced(Some(&a)));
        let ip = |p: u8, frag_off: u16| Ipv4Header {
            src: NODE,
            dst: POD_A,
            header_len: 20,
            total_len: 60,
            proto: p,
            frag_off,
        };
        let l4 = |flow: Flow, syn: bool| L4 {
            flow,
            offset: 34,
            syn,
            rst: false,
        };
        let probe = tcp(NODE, 51000, POD_A, 8080);
        assert_eq!(
            host_flow_opener(&ip(proto::TCP, 0), Some(&l4(probe, true)), None),
            Some(probe)
        );
        assert_eq!(
            host_flow_opener(&ip(proto::TCP, 0), Some(&l4(probe, false)), None),
            None,
            "only a SYN opens a TCP connection"
        );
        let dgram = Flow {
            proto: proto::UDP,
            ..tcp(NODE, 51001, POD_A, 5353)
        };
        assert_eq!(
            host_flow_opener(&ip(proto::UDP, 0), Some(&l4(dgram, false)), None),
            Some(dgram)
        );
        let echo = portless_tuple(&ip(proto::ICMP, 0));
        assert_eq!(
            host_flow_opener(&ip(proto::ICMP, 0), None, Some(ICMP_ECHO_REQUEST)),
            Some(echo)
        );
        assert_eq!(
            host_flow_opener(&ip(proto::ICMP, 0), None, Some(3)),
            None,
            "ICMP errors"
        );
        assert_eq!(
            host_flow_opener(&ip(proto::ICMP, 0x10), None, Some(8)),
            None,
            "later fragment"
        );
        assert_eq!(host_flow_opener(&ip(47, 0), None, None), None, "GRE");

        // The probe is recorded once; the pod's SYN-ACK is a reply; the pod cannot open its own connection.
        assert!(record_host_flow(&m, &probe));
        assert!(!record_host_flow(&m, &probe), "known already");
        let out = Ends {
            src_ep: Some(&a),
            dst_ep: None,
            src_identity: ID_A,
            dst_identity: identity::HOST,
        };
        let v = check(&m, &probe.reversed(), &out).unwrap();
        assert!(v.reply && !v.new_flow);
        let denied = check(&m, &tcp(POD_A, 40000, NODE, 22), &out).unwrap_err();
        assert_eq!(denied.counter(), Counter::DropPolicyEgress);
        assert!(record_host_flow(&m, &dgram));
        assert!(check(&m, &dgram.reversed(), &out).unwrap().reply);

        // The node's answer to a flow the pod opened (while allowed) is not a flow of the node's.
        let mut m = TestMaps::default();
        let mut a = ep(ID_A, 1);
        m.table(
            &mut a,
            policy_dir::EGRESS,
            &[(identity::HOST, proto::UDP, 53, 16, 7)],
        );
        let query = Flow {
            proto: proto::UDP,
            ..tcp(POD_A, 40001, NODE, 53)
        };
        let out = Ends {
            dst_identity: identity::HOST,
            src_ep: Some(&a),
            dst_ep: None,
            src_identity: ID_A,
        };
        assert!(check(&m, &query, &out).unwrap().new_flow);
        assert!(!record_host_flow(&m, &query.reversed()));
        assert!(!m.ct.borrow().contains(&query.reversed().ct_key(ct_dir::POLICY)));
        // Revoking the rule stops the pod's flow although the node keeps answering.
        m.policy.clear();
        assert!(check(&m, &query, &out).is_err());
    }
}
