//! The datapath's encrypt/plain decision (docs/encryption.md) with `BPF_PROG_TEST_RUN` of `from_pod` (needs root):
//! a packet for a node encryption applies to is encapsulated only when the tunnel peer entry carries a WireGuard
//! key (the VXLAN remote is then the node's WireGuard address), otherwise dropped and counted
//! (`drop_no_encryption_key`); nodes it does not apply to are encapsulated as before. The reconciler's tunnel peer
//! writes keep the WireGuard half of an entry, and the WireGuard addresses' entries stay out of its view.
#[expect(dead_code, reason = "helpers shared by the datapath tests")]
mod common;

use std::net::Ipv4Addr;

use common::{FROM_POD, HOST_MAC, POD_A, REMOTE_NODE, REMOTE_POD, TC_ACT_REDIRECT, TC_ACT_SHOT, loaded};
use mesh_agent::datapath::Datapath;
use mesh_common::{
    Counter, FAMILY_IPV4, IpcacheEntry, NodeConfig, TunnelPeer, node_flags, pod_mac_for_ipv4,
    tunnel_peer_flags,
};

/// A node of this node's own cluster (1), and a pod behind it.
const SAME_CLUSTER_NODE: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 9);
const SAME_CLUSTER_POD: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 5);
/// `REMOTE_NODE`'s WireGuard address.
const REMOTE_WG: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 0);

fn udp(dst: Ipv4Addr) -> Vec<u8> {
    let mut f = vec![0u8; 14 + 20 + 8 + 8];
    f[0..6].copy_from_slice(&HOST_MAC);
    f[6..12].copy_from_slice(&pod_mac_for_ipv4(POD_A.octets()));
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    f[14] = 0x45;
    f[16..18].copy_from_slice(&36u16.to_be_bytes());
    f[22] = 64;
    f[23] = 17;
    f[26..30].copy_from_slice(&POD_A.octets());
    f[30..34].copy_from_slice(&dst.octets());
    f[34..36].copy_from_slice(&40000u16.to_be_bytes());
    f[36..38].copy_from_slice(&5000u16.to_be_bytes());
    f[38..40].copy_from_slice(&16u16.to_be_bytes());
    f
}

fn datapath() -> Datapath {
    let mut dp = loaded();
    // REMOTE_NODE is in cluster 2 (as `loaded` has its pod prefix); SAME_CLUSTER_NODE in this node's cluster 1.
    dp.upsert_tunnel_peer(REMOTE_NODE, 2).unwrap();
    dp.upsert_tunnel_peer(SAME_CLUSTER_NODE, 1).unwrap();
    dp.upsert_ipcache(
        "10.9.0.0/24".parse().unwrap(),
        IpcacheEntry {
            tunnel_endpoint: u32::from(SAME_CLUSTER_NODE),
            cluster_id: 1,
            family: FAMILY_IPV4,
            ..Default::default()
        },
    )
    .unwrap();
    dp
}

fn mode(dp: &mut Datapath, flags: u16) {
    dp.set_node_config(NodeConfig {
        vxlan_ifindex: 1,
        node_ipv4: u32::from(Ipv4Addr::new(172, 18, 0, 2)),
        cluster_id: 1,
        flags,
        ..Default::default()
    })
    .unwrap();
}

fn verdict(dp: &mut Datapath, dst: Ipv4Addr) -> u32 {
    dp.test_run(FROM_POD, &udp(dst)).unwrap().return_value
}

#[test]
fn strict_mode_drops_what_it_cannot_encrypt_and_keeps_the_rest_as_before() {
    let mut dp = datapath();
    let cross = node_flags::ENCRYPT_CROSS_CLUSTER;
    let all = node_flags::ENCRYPT_ALL;
    // (mode, destination, verdict) without any key.
    for (flags, dst, want) in [
        (0, REMOTE_POD, TC_ACT_REDIRECT),
        (0, SAME_CLUSTER_POD, TC_ACT_REDIRECT),
        (cross, REMOTE_POD, TC_ACT_SHOT),
        (cross, SAME_CLUSTER_POD, TC_ACT_REDIRECT),
        (all, REMOTE_POD, TC_ACT_SHOT),
        (all, SAME_CLUSTER_POD, TC_ACT_SHOT),
        // Policy on as well: the decision does not depend on the other flags.
        (cross | node_flags::POLICY, REMOTE_POD, TC_ACT_SHOT),
    ] {
        mode(&mut dp, flags);
        assert_eq!(verdict(&mut dp, dst), want, "flags {flags:#x} to {dst}");
    }
    assert_eq!(dp.counter(Counter::DropNoEncryptionKey).unwrap(), 4);
    assert_eq!(dp.counter(Counter::FwdTunnel).unwrap(), 3);

    // The engine's key of REMOTE_NODE: the reconciler's next write of the entry carries it.
    dp.wireguard_keys().lock().insert(REMOTE_NODE, REMOTE_WG);
    dp.upsert_tunnel_peer(REMOTE_NODE, 2).unwrap();
    let map = dp.tunnel_peer_map().unwrap();
    assert_eq!(
        map.get(&u32::from(REMOTE_NODE), 0).unwrap(),
        TunnelPeer {
            cluster_id: 2,
            flags: tunnel_peer_flags::WIREGUARD_KEY,
            wireguard_ipv4: u32::from(REMOTE_WG),
        }
    );
    mode(&mut dp, cross);
    assert_eq!(verdict(&mut dp, REMOTE_POD), TC_ACT_REDIRECT, "encrypted peer");
    mode(&mut dp, all);
    assert_eq!(verdict(&mut dp, REMOTE_POD), TC_ACT_REDIRECT, "encrypted peer");
    assert_eq!(
        verdict(&mut dp, SAME_CLUSTER_POD),
        TC_ACT_SHOT,
        "no key of the own cluster's node"
    );
    assert_eq!(dp.counter(Counter::DropNoEncryptionKey).unwrap(), 5);
    assert_eq!(dp.counter(Counter::FwdTunnel).unwrap(), 5);

    // The key is withdrawn: strict again at the next write.
    dp.wireguard_keys().lock().remove(&REMOTE_NODE);
    dp.upsert_tunnel_peer(REMOTE_NODE, 2).unwrap();
    mode(&mut dp, cross);
    assert_eq!(verdict(&mut dp, REMOTE_POD), TC_ACT_SHOT);
}

#[test]
fn wireguard_address_entries_stay_out_of_the_reconcilers_view() {
    let mut dp = datapath();
    let mut map = dp.tunnel_peer_map().unwrap();
    let via = TunnelPeer {
        cluster_id: 2,
        flags: tunnel_peer_flags::VIA_WIREGUARD,
        wireguard_ipv4: 0,
    };
    map.insert(u32::from(REMOTE_WG), via, 0).unwrap();
    let peers = dp.tunnel_peers().unwrap();
    assert_eq!(
        peers.keys().copied().collect::<Vec<_>>(),
        vec![REMOTE_NODE, SAME_CLUSTER_NODE],
        "the reconciler sees nodes only"
    );
    // A full resync of the node set leaves the WireGuard address's entry alone.
    dp.set_tunnel_peers(&peers).unwrap();
    assert_eq!(map.get(&u32::from(REMOTE_WG), 0).unwrap(), via);
}
