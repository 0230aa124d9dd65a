//! What a pod may send and who may feed the overlay (docs/security.md, "What a pod can and cannot do"), as plain
//! functions that unit-test on the host. A pod is root in its own network namespace: it can add any address to its
//! interface, craft any frame and send UDP anywhere. The programs hold it to what the trust model grants it:
//!
//! - [`own_source`]: an IPv4 packet from a pod's veth carries the address of the endpoint of that veth. The check
//!   is the endpoint lookup of the source the programs do anyway (for policy and the VNI) plus one comparison of
//!   its `ifindex` with the packet's; an address that is no endpoint of this node, or another pod's, is dropped.
//! - [`pod_other_l3`]: a pod's frames other than IPv4 go to the node's stack only when they are ARP (the node
//!   resolves its pods' MACs). fleetmesh gives pods IPv4 addresses only, so anything else (IPv6 above all) would
//!   reach the node's stack with a source nothing checked.
//! - [`stack_bound`]: what a pod sends through the node's stack (its node, the world) is never UDP to the VXLAN
//!   port: the node would decapsulate it as overlay traffic with an outer source and a VNI the pod chose.
//! - [`overlay_peer`]: the overlay accepts a packet only when its outer source is a tunnel peer (a node of this
//!   cluster or of a peer cluster, `TUNNEL_PEERS`); a pod's address never is one.
use mesh_common::{LocalEndpoint, TunnelPeer, VXLAN_PORT, proto};

use crate::{Drop, Forward, lb::Flow, policy::PolicyMaps};

/// EtherType of ARP.
pub const ETH_P_ARP: u16 = 0x0806;

/// Whether a pod's IPv4 packet came from its own address: `src_ep` is the endpoint entry of the packet's source
/// address (`None` when the address is no endpoint of this node), `ifindex` the interface the packet arrived on
/// (the host side of the sender's veth).
///
/// # Errors
///
/// [`Drop::SourceSpoofed`] when the source is not the endpoint of that veth.
#[inline(always)]
pub fn own_source(src_ep: Option<&LocalEndpoint>, ifindex: u32) -> Result<(), Drop> {
    match src_ep {
        Some(ep) if ep.ifindex == ifindex => Ok(()),
        _ => Err(Drop::SourceSpoofed),
    }
}

/// The decision for a frame from a pod that is not IPv4: ARP goes to the node's stack as before, the rest is
/// dropped.
///
/// # Errors
///
/// [`Drop::UnsupportedL3`] for every EtherType but ARP.
#[inline(always)]
pub const fn pod_other_l3(ether_type: u16) -> Result<Forward, Drop> {
    if ether_type == ETH_P_ARP {
        Ok(Forward::Pass)
    } else {
        Err(Drop::UnsupportedL3)
    }
}

/// Whether a pod's packet with policy tuple `tuple` (destination after service translation) may go to the node's
/// stack ([`Forward::Pass`]): anything but UDP to [`VXLAN_PORT`]. Later fragments carry no port and pass; the
/// first fragment carries the header, and without it the node's stack never reassembles the datagram.
///
/// # Errors
///
/// [`Drop::VxlanFromPod`] for UDP to the VXLAN port.
#[inline(always)]
pub const fn stack_bound(tuple: &Flow) -> Result<(), Drop> {
    if tuple.proto == proto::UDP && tuple.dport_be == VXLAN_PORT.to_be() {
        Err(Drop::VxlanFromPod)
    } else {
        Ok(())
    }
}

/// The tunnel peer an overlay packet came from: `remote_ipv4` is its outer source (HOST order, as the tunnel key
/// reports it).
///
/// # Errors
///
/// [`Drop::OverlayUnknownPeer`] when the address is not in `TUNNEL_PEERS`.
#[inline(always)]
pub fn overlay_peer(remote_ipv4: u32, maps: &impl PolicyMaps) -> Result<TunnelPeer, Drop> {
    maps.tunnel_peer(remote_ipv4).ok_or(Drop::OverlayUnknownPeer)
}

#[cfg(test)]
mod tests {
    use mesh_common::{Counter, CtKeyV4, PolicyEntry, PolicyKey};

    use super::*;

    fn ep(ifindex: u32) -> LocalEndpoint {
        LocalEndpoint {
            ifindex,
            ..Default::default()
        }
    }

    #[test]
    fn only_the_endpoint_of_the_veth_may_be_the_source() {
        assert_eq!(own_source(Some(&ep(5)), 5), Ok(()));
        // Another pod's address (its endpoint is on another veth), or an address that is no endpoint.
        assert_eq!(own_source(Some(&ep(6)), 5), Err(Drop::SourceSpoofed));
        assert_eq!(own_source(None, 5), Err(Drop::SourceSpoofed));
        assert_eq!(Drop::SourceSpoofed.counter(), Counter::DropSourceSpoofed);
        assert!(Counter::DropSourceSpoofed.is_drop());
    }

    #[test]
    fn arp_passes_everything_else_but_ipv4_is_dropped() {
        assert_eq!(pod_other_l3(ETH_P_ARP), Ok(Forward::Pass));
        for ether_type in [0x86dd, 0x8100, 0x88a8, 0x8847, 0x88cc, 0x0000, 0xffff] {
            assert_eq!(
                pod_other_l3(ether_type),
                Err(Drop::UnsupportedL3),
                "{ether_type:#06x}"
            );
        }
        assert_eq!(Drop::UnsupportedL3.counter(), Counter::DropUnsupportedL3);
    }

    fn tuple(protocol: u8, dport: u16) -> Flow {
        Flow {
            saddr: [10, 1, 0, 2],
            daddr: [172, 18, 0, 2],
            sport_be: 40000u16.to_be(),
            dport_be: dport.to_be(),
            proto: protocol,
        }
    }

    #[test]
    fn udp_to_the_vxlan_port_never_reaches_the_stack() {
        assert_eq!(stack_bound(&tuple(proto::UDP, 4789)), Err(Drop::VxlanFromPod));
        assert_eq!(Drop::VxlanFromPod.counter(), Counter::DropVxlanFromPod);
        for (protocol, port) in [
            (proto::UDP, 4788),
            (proto::UDP, 53),
            (proto::TCP, 4789),
            (proto::ICMP, 0),
        ] {
            assert_eq!(stack_bound(&tuple(protocol, port)), Ok(()), "{protocol}/{port}");
        }
        // The port is read in network order: 4789 in host order on the wire is another port.
        let swapped = Flow {
            dport_be: 4789,
            ..tuple(proto::UDP, 0)
        };
        assert_eq!(stack_bound(&swapped), Ok(()));
    }

    struct Peers(Vec<(u32, TunnelPeer)>);

    impl PolicyMaps for Peers {
        fn policy(&self, _: &PolicyKey) -> Option<PolicyEntry> {
            None
        }
        fn tunnel_peer(&self, underlay_ipv4: u32) -> Option<TunnelPeer> {
            self.0.iter().find(|(k, _)| *k == underlay_ipv4).map(|(_, v)| *v)
        }
        fn policy_ct(&self, _: &CtKeyV4) -> bool {
            false
        }
        fn policy_ct_insert(&self, _: &CtKeyV4) {}
    }

    #[test]
    fn the_overlay_accepts_tunnel_peers_only() {
        let node = u32::from_be_bytes([172, 18, 0, 3]);
        let peer = TunnelPeer {
            cluster_id: 2,
            ..Default::default()
        };
        let maps = Peers(vec![(node, peer)]);
        assert_eq!(overlay_peer(node, &maps), Ok(peer));
        // A pod's address (what a pod's VXLAN datagram to its node carries as outer source), or the node
        // address in the wrong byte order.
        for other in [u32::from_be_bytes([10, 1, 0, 2]), node.swap_bytes()] {
            assert_eq!(overlay_peer(other, &maps), Err(Drop::OverlayUnknownPeer));
        }
        assert_eq!(
            Drop::OverlayUnknownPeer.counter(),
            Counter::DropOverlayUnknownPeer
        );
    }
}
