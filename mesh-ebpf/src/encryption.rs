//! Where encryption applies and where an encrypted packet goes (docs/encryption.md), as plain functions that
//! unit-test on the host.
//!
//! The agent's `--encryption` mode reaches the programs as [`node_flags`] bits of `NODE_CONFIG`; the agent's
//! WireGuard state as [`tunnel_peer_flags`] of each node's `TUNNEL_PEERS` entry. Strict mode: while encryption
//! applies to a node, a packet for it goes to the node's WireGuard address (the agent's TUN device encrypts it) or
//! is dropped ([`Drop::NoEncryptionKey`]); it never leaves as clear VXLAN. On receive, a clear VXLAN packet from a
//! node encryption applies to is refused ([`Drop::OverlayUnencrypted`]): only what the agent decrypted (outer
//! source: the node's WireGuard address) is accepted from it.
use mesh_common::{NodeConfig, TunnelPeer, node_flags, tunnel_peer_flags};

use crate::Drop;

/// Whether this node's mode encrypts traffic with a node of cluster `peer_cluster`.
#[inline(always)]
#[must_use]
pub const fn applies(cfg: &NodeConfig, peer_cluster: u16) -> bool {
    cfg.flags & node_flags::ENCRYPT_ALL != 0
        || (cfg.flags & node_flags::ENCRYPT_CROSS_CLUSTER != 0 && peer_cluster != cfg.cluster_id)
}

/// The VXLAN remote (HOST order) of a packet for the node at `underlay` (HOST order) that the ipcache places in
/// cluster `entry_cluster`; `peer` is that node's `TUNNEL_PEERS` entry. Encryption applies when the mode says so
/// for the ipcache's cluster or the peer entry's (either is enough: a disagreement never sends in clear).
///
/// # Errors
///
/// [`Drop::NoEncryptionKey`] when encryption applies and the agent has no usable key of the node.
#[inline(always)]
pub fn tunnel_remote(
    cfg: &NodeConfig,
    entry_cluster: u16,
    underlay: u32,
    peer: Option<TunnelPeer>,
) -> Result<u32, Drop> {
    let required = applies(cfg, entry_cluster) || peer.is_some_and(|p| applies(cfg, p.cluster_id));
    if !required {
        return Ok(underlay);
    }
    match peer {
        Some(p) if p.flags & tunnel_peer_flags::WIREGUARD_KEY != 0 && p.wireguard_ipv4 != 0 => {
            Ok(p.wireguard_ipv4)
        }
        _ => Err(Drop::NoEncryptionKey),
    }
}

/// Whether the overlay accepts a packet whose outer source is the tunnel peer `peer`: what the agent decrypted
/// always, a clear VXLAN packet only from a node encryption does not apply to.
///
/// # Errors
///
/// [`Drop::OverlayUnencrypted`] for a clear packet from a node whose traffic must be encrypted.
#[inline(always)]
pub const fn overlay_accepts(cfg: &NodeConfig, peer: &TunnelPeer) -> Result<(), Drop> {
    if peer.flags & tunnel_peer_flags::VIA_WIREGUARD != 0 || !applies(cfg, peer.cluster_id) {
        Ok(())
    } else {
        Err(Drop::OverlayUnencrypted)
    }
}

#[cfg(test)]
mod tests {
    use mesh_common::Counter;

    use super::*;

    const ME: u16 = 1;
    const PEER_CLUSTER: u16 = 2;
    const UNDERLAY: u32 = 0x6441_0201;
    const WG: u32 = 0x0a02_0000;

    fn cfg(flags: u16) -> NodeConfig {
        NodeConfig {
            cluster_id: ME,
            flags,
            ..Default::default()
        }
    }

    fn peer(cluster_id: u16, flags: u16, wireguard_ipv4: u32) -> TunnelPeer {
        TunnelPeer {
            cluster_id,
            flags,
            wireguard_ipv4,
        }
    }

    #[test]
    fn modes_select_the_nodes_encryption_applies_to() {
        assert!(!applies(&cfg(0), PEER_CLUSTER));
        assert!(!applies(&cfg(node_flags::POLICY), PEER_CLUSTER));
        assert!(applies(&cfg(node_flags::ENCRYPT_CROSS_CLUSTER), PEER_CLUSTER));
        assert!(!applies(&cfg(node_flags::ENCRYPT_CROSS_CLUSTER), ME));
        assert!(applies(&cfg(node_flags::ENCRYPT_ALL), ME));
        assert!(applies(&cfg(node_flags::ENCRYPT_ALL), PEER_CLUSTER));
    }

    #[test]
    fn encrypted_peers_go_to_their_wireguard_address() {
        let keyed = peer(PEER_CLUSTER, tunnel_peer_flags::WIREGUARD_KEY, WG);
        let cross = cfg(node_flags::ENCRYPT_CROSS_CLUSTER);
        assert_eq!(tunnel_remote(&cross, PEER_CLUSTER, UNDERLAY, Some(keyed)), Ok(WG));
        // Off: the underlay, key or not.
        assert_eq!(
            tunnel_remote(&cfg(0), PEER_CLUSTER, UNDERLAY, Some(keyed)),
            Ok(UNDERLAY)
        );
        // Same cluster in cross-cluster mode: clear VXLAN as before, even with a key.
        let same = peer(ME, tunnel_peer_flags::WIREGUARD_KEY, WG);
        assert_eq!(tunnel_remote(&cross, ME, UNDERLAY, Some(same)), Ok(UNDERLAY));
        assert_eq!(tunnel_remote(&cross, ME, UNDERLAY, None), Ok(UNDERLAY));
        // All: the same cluster's node is encrypted too.
        assert_eq!(
            tunnel_remote(&cfg(node_flags::ENCRYPT_ALL), ME, UNDERLAY, Some(same)),
            Ok(WG)
        );
    }

    #[test]
    fn strict_mode_never_sends_in_clear_without_a_key() {
        let cross = cfg(node_flags::ENCRYPT_CROSS_CLUSTER);
        for p in [
            None,
            Some(peer(PEER_CLUSTER, 0, 0)),
            // A flag without an address, an address without the flag.
            Some(peer(PEER_CLUSTER, tunnel_peer_flags::WIREGUARD_KEY, 0)),
            Some(peer(PEER_CLUSTER, 0, WG)),
        ] {
            assert_eq!(
                tunnel_remote(&cross, PEER_CLUSTER, UNDERLAY, p),
                Err(Drop::NoEncryptionKey),
                "{p:?}"
            );
        }
        // The ipcache and the peer entry disagree on the cluster: either one asking for encryption is enough.
        assert_eq!(
            tunnel_remote(&cross, ME, UNDERLAY, Some(peer(PEER_CLUSTER, 0, 0))),
            Err(Drop::NoEncryptionKey)
        );
        assert_eq!(
            tunnel_remote(&cross, PEER_CLUSTER, UNDERLAY, Some(peer(ME, 0, 0))),
            Err(Drop::NoEncryptionKey)
        );
        assert_eq!(Drop::NoEncryptionKey.counter(), Counter::DropNoEncryptionKey);
        assert!(Counter::DropNoEncryptionKey.is_drop());
        assert_eq!(Counter::DropNoEncryptionKey.name(), "drop_no_encryption_key");
    }

    #[test]
    fn clear_overlay_packets_from_encrypted_nodes_are_refused() {
        let cross = cfg(node_flags::ENCRYPT_CROSS_CLUSTER);
        assert_eq!(
            overlay_accepts(&cross, &peer(PEER_CLUSTER, tunnel_peer_flags::WIREGUARD_KEY, WG)),
            Err(Drop::OverlayUnencrypted)
        );
        assert_eq!(
            overlay_accepts(&cross, &peer(PEER_CLUSTER, tunnel_peer_flags::VIA_WIREGUARD, 0)),
            Ok(())
        );
        assert_eq!(overlay_accepts(&cross, &peer(ME, 0, 0)), Ok(()));
        assert_eq!(overlay_accepts(&cfg(0), &peer(PEER_CLUSTER, 0, 0)), Ok(()));
        assert_eq!(
            overlay_accepts(&cfg(node_flags::ENCRYPT_ALL), &peer(ME, 0, 0)),
            Err(Drop::OverlayUnencrypted)
        );
        assert_eq!(
            Drop::OverlayUnencrypted.counter(),
            Counter::DropOverlayUnencrypted
        );
    }
}
