//! The map ABI shared by the eBPF programs (`mesh-ebpf`) and userspace (`mesh-agent`).
//!
//! Every key and value is `#[repr(C)]` with explicit padding fields, so both sides agree byte for byte and no
//! uninitialised padding ever reaches the kernel. Addresses are stored as they appear on the wire (network byte
//! order, as `[u8; N]`) unless a field says otherwise. IPv4 is handled first; IPv6 gets its own keys (`[u8; 16]`)
//! and maps later, and the values below already carry an address family where one is needed.
#![no_std]

/// Map names, as the eBPF object defines them and userspace looks them up.
pub mod maps {
    /// `LpmTrie<LpmKeyV4, IpcacheEntry>`: pod prefix (local and remote clusters) → where it lives.
    pub const IPCACHE_V4: &str = "IPCACHE_V4";
    /// `HashMap<EndpointKeyV4, LocalEndpoint>`: pods on this node.
    pub const ENDPOINTS_V4: &str = "ENDPOINTS_V4";
    /// `Array<NodeConfig>` with one element: this node's datapath settings.
    pub const NODE_CONFIG: &str = "NODE_CONFIG";
    /// `PerCpuArray<u64>` indexed by [`crate::Counter`].
    pub const COUNTERS: &str = "COUNTERS";
}

/// Program names in the eBPF object.
pub mod programs {
    /// tc ingress on the host side of a pod veth: packets leaving a pod.
    pub const FROM_POD: &str = "from_pod";
    /// tc ingress on the node's VXLAN device (external / collect-metadata mode): packets from other nodes.
    pub const FROM_OVERLAY: &str = "from_overlay";
}

/// Capacity of the IPv4 ipcache (prefixes of every node of every cluster, later every remote pod IP).
pub const IPCACHE_V4_MAX_ENTRIES: u32 = 1 << 20;
/// Capacity of the local endpoint map (pods on one node).
pub const ENDPOINTS_MAX_ENTRIES: u32 = 4096;
/// UDP port of the VXLAN overlay.
pub const VXLAN_PORT: u16 = 4789;
/// MTU given to pod interfaces: 1500 minus the VXLAN overhead (50 bytes), see DATAPATH-FACTS.
pub const POD_MTU: u32 = 1450;
/// The VNI is 24 bits on the wire; larger values are silently truncated by the kernel.
pub const VNI_MASK: u32 = 0x00ff_ffff;

/// Key of an IPv4 LPM map: the address bytes in network order. aya wraps it with the prefix length.
pub type LpmKeyV4 = [u8; 4];
/// Key of the IPv4 endpoint map: the pod address in network order.
pub type EndpointKeyV4 = [u8; 4];

/// Address family of a tunnel endpoint.
pub const FAMILY_IPV4: u8 = 4;

/// Flag bits of [`IpcacheEntry::flags`].
pub mod ipcache_flags {
    /// The prefix lives on this node: deliver through the endpoint map, never encapsulate.
    pub const LOCAL_NODE: u8 = 1 << 0;
}

/// ipcache value: where a prefix lives.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IpcacheEntry {
    /// Underlay IPv4 address of the node that hosts the prefix, in HOST byte order (what
    /// `bpf_skb_set_tunnel_key` takes in `remote_ipv4`). 0 when the prefix is not behind a tunnel.
    pub tunnel_endpoint: u32,
    /// Security identity of the prefix (0 = not known yet; identities arrive with the policy work).
    pub identity: u32,
    /// Cluster id of the cluster that owns the prefix.
    pub cluster_id: u16,
    /// Address family of `tunnel_endpoint` ([`FAMILY_IPV4`]).
    pub family: u8,
    /// [`ipcache_flags`] bits.
    pub flags: u8,
    pub _pad: u32,
}

/// A pod on this node.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LocalEndpoint {
    /// ifindex of the host side of the pod's veth (what `bpf_redirect_peer` takes).
    pub ifindex: u32,
    /// Security identity of the pod (0 = not allocated yet).
    pub identity: u32,
    /// MAC of the pod's own interface (destination MAC on delivery).
    pub pod_mac: [u8; 6],
    /// MAC of the host side of the veth (source MAC on delivery; the pod's gateway MAC).
    pub host_mac: [u8; 6],
}

/// This node's datapath settings (element 0 of [`maps::NODE_CONFIG`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeConfig {
    /// ifindex of the node's VXLAN device; 0 until the agent has set it up (then nothing is encapsulated).
    pub vxlan_ifindex: u32,
    /// This node's underlay IPv4 address, host byte order.
    pub node_ipv4: u32,
    /// This node's cluster id.
    pub cluster_id: u16,
    pub _pad0: u16,
    pub _pad1: u32,
}

/// Per-CPU counters: index into [`maps::COUNTERS`]. Forward verdicts first, then drop reasons.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Delivered to a pod on this node (from a pod or from the overlay).
    FwdLocal = 0,
    /// Encapsulated towards another node.
    FwdTunnel = 1,
    /// Handed to the node's stack unchanged (non-IPv4, or a destination fleetmesh does not route).
    PassStack = 2,
    /// Received from the overlay.
    RecvOverlay = 3,
    /// Dropped: the packet is too short or its IPv4 header is invalid.
    DropMalformed = 4,
    /// Dropped: overlay packet for an address that is not a pod on this node.
    DropNoEndpoint = 5,
    /// Dropped: no tunnel metadata on an overlay packet.
    DropNoTunnelKey = 6,
    /// Dropped: a helper failed (tunnel key, redirect).
    DropHelper = 7,
    /// Dropped: the destination is on a remote node, but the node has no VXLAN device configured.
    DropNoTunnel = 8,
}

impl Counter {
    /// Every counter, in index order.
    pub const ALL: [Counter; 9] = [
        Counter::FwdLocal,
        Counter::FwdTunnel,
        Counter::PassStack,
        Counter::RecvOverlay,
        Counter::DropMalformed,
        Counter::DropNoEndpoint,
        Counter::DropNoTunnelKey,
        Counter::DropHelper,
        Counter::DropNoTunnel,
    ];

    /// Stable name used in status output and metrics.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Counter::FwdLocal => "forward_local",
            Counter::FwdTunnel => "forward_tunnel",
            Counter::PassStack => "pass_stack",
            Counter::RecvOverlay => "receive_overlay",
            Counter::DropMalformed => "drop_malformed",
            Counter::DropNoEndpoint => "drop_no_endpoint",
            Counter::DropNoTunnelKey => "drop_no_tunnel_key",
            Counter::DropHelper => "drop_helper_failed",
            Counter::DropNoTunnel => "drop_no_tunnel_device",
        }
    }
}

/// Number of counters (size of [`maps::COUNTERS`]).
pub const COUNTER_COUNT: u32 = Counter::ALL.len() as u32;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are `#[repr(C)]`, `Copy`, contain only integers and byte arrays, and have no implicit
    // padding (checked by the size assertions below), so every bit pattern is valid and none is uninitialised.
    unsafe impl aya::Pod for super::IpcacheEntry {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::LocalEndpoint {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::NodeConfig {}
}

// The structs must have no implicit padding: their sizes equal the sum of their fields.
const _: () = assert!(core::mem::size_of::<IpcacheEntry>() == 4 + 4 + 2 + 1 + 1 + 4);
const _: () = assert!(core::mem::size_of::<LocalEndpoint>() == 4 + 4 + 6 + 6);
const _: () = assert!(core::mem::size_of::<NodeConfig>() == 4 + 4 + 2 + 2 + 4);

/// Pod MAC convention shared by the lab and the agent: `0a:58:` followed by the pod's IPv4 address (the same
/// convention OVN-Kubernetes uses), so the agent knows a pod's MAC without entering its namespace.
#[must_use]
pub const fn pod_mac_for_ipv4(ip: [u8; 4]) -> [u8; 6] {
    [0x0a, 0x58, ip[0], ip[1], ip[2], ip[3]]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_dense_and_named_uniquely() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i, "counter {c:?} out of order");
            for other in &Counter::ALL[i + 1..] {
                assert_ne!(c.name(), other.name());
            }
        }
    }

    #[test]
    fn pod_mac_is_locally_administered_unicast() {
        let mac = pod_mac_for_ipv4([10, 1, 0, 2]);
        assert_eq!(mac, [0x0a, 0x58, 10, 1, 0, 2]);
        assert_eq!(mac[0] & 0x01, 0, "unicast");
        assert_eq!(mac[0] & 0x02, 0x02, "locally administered");
    }
}
