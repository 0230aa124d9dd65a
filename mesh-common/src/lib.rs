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
    /// `HashMap<ServiceKeyV4, ServiceEntry>`: service frontends (VIP, port, protocol).
    pub const SERVICES_V4: &str = "SERVICES_V4";
    /// `HashMap<SlotKey, u32>`: backend slots of each service → backend id.
    pub const SERVICE_SLOTS: &str = "SERVICE_SLOTS";
    /// `HashMap<u32, BackendV4>`: backends by id.
    pub const BACKENDS_V4: &str = "BACKENDS_V4";
    /// `HashMap<u32, RevNatV4>`: reverse translation of replies (rev-NAT id → the frontend the client used).
    pub const REVNAT_V4: &str = "REVNAT_V4";
    /// `LruHashMap<CtKeyV4, CtEntryV4>`: connection tracking of load-balanced flows.
    pub const CT_V4: &str = "CT_V4";
    /// `LruPerCpuHashMap<u32, BackendStats>`: per backend id, what the datapath saw of its flows.
    pub const LB_BACKEND_STATS: &str = "LB_BACKEND_STATS";
    /// `HashMap<PolicyKey, PolicyEntry>`: the compiled policy of every local endpoint, one table per
    /// [`crate::LocalEndpoint::policy_id`].
    pub const POLICY: &str = "POLICY";
    /// `HashMap<u32, TunnelPeer>`: underlay IPv4 (HOST byte order, as the tunnel key reports it) of every known
    /// node of every cluster → its cluster, so an overlay packet's source identity is complete without trusting
    /// more than the 24-bit VNI.
    pub const TUNNEL_PEERS: &str = "TUNNEL_PEERS";
    /// `RingBuf` of [`crate::FlowEvent`]s (policy verdicts, LB drops), rate-limited per CPU.
    pub const FLOW_EVENTS: &str = "FLOW_EVENTS";
    /// `PerCpuArray<FlowRate>` with one element: each CPU's token bucket for flow events.
    pub const FLOW_RATE: &str = "FLOW_RATE";
    /// `LpmTrie<LpmKeyV4, u32>`: every prefix a local policy's `ipBlock` names → its node-local CIDR identity.
    /// Unlike the ipcache, pod /32s do not shadow it: an `ipBlock` also matches pod addresses (the second look
    /// of [`crate::policy_flags::CIDR_RULES`] endpoints).
    pub const POLICY_CIDRS: &str = "POLICY_CIDRS";
}

/// Program names in the eBPF object.
pub mod programs {
    /// tc ingress on the host side of a pod veth: packets leaving a pod.
    pub const FROM_POD: &str = "from_pod";
    /// tc ingress on the node's VXLAN device (external / collect-metadata mode): packets from other nodes.
    pub const FROM_OVERLAY: &str = "from_overlay";
    /// tc egress on the host side of a pod veth: what the node's own stack sends into a pod (attached only while
    /// the node has policy). Records the node's new flows to egress-enforced pods in policy conntrack.
    pub const TO_POD: &str = "to_pod";
}

/// Capacity of the IPv4 ipcache (prefixes of every node of every cluster, later every remote pod IP).
pub const IPCACHE_V4_MAX_ENTRIES: u32 = 1 << 20;
/// Capacity of the service frontend map.
pub const SERVICES_MAX_ENTRIES: u32 = 256 * 1024;
/// Capacity of the slot map (all services' slots together).
pub const SLOTS_MAX_ENTRIES: u32 = 2 * 1024 * 1024;
/// Capacity of the backend map.
pub const BACKENDS_MAX_ENTRIES: u32 = 1 << 20;
/// Capacity of the rev-NAT map (one per frontend).
pub const REVNAT_MAX_ENTRIES: u32 = 256 * 1024;
/// Capacity of the conntrack LRU map.
pub const CT_MAX_ENTRIES: u32 = 256 * 1024;
/// Capacity of the per-backend statistics (LRU: backends without recent flows make room).
pub const BACKEND_STATS_MAX_ENTRIES: u32 = 64 * 1024;
/// Source address used for hairpin flows (a pod reaching itself through a service): the pod sees the
/// connection coming from here, and its replies come back through the datapath (Cilium uses the same idea).
pub const HAIRPIN_IPV4: [u8; 4] = [169, 254, 42, 1];

/// Capacity of the policy map (all local endpoints' compiled policies together, two generations while one is
/// being replaced).
pub const POLICY_MAX_ENTRIES: u32 = 512 * 1024;
/// Capacity of the policy prefix map (prefixes named by `ipBlock`s of the node's policies).
pub const POLICY_CIDRS_MAX_ENTRIES: u32 = 16 * 1024;
/// Capacity of the tunnel peer map (nodes of all clusters).
pub const TUNNEL_PEERS_MAX_ENTRIES: u32 = 256 * 1024;
/// Size of the flow event ring buffer in bytes (a power of two, a multiple of the page size).
pub const FLOW_EVENTS_BYTES: u32 = 1 << 20;
/// Flow events each CPU may emit per second when [`NodeConfig::flow_events_per_sec`] is 0.
pub const DEFAULT_FLOW_EVENTS_PER_SEC: u32 = 2000;

/// Capacity of the local endpoint map (pods on one node).
pub const ENDPOINTS_MAX_ENTRIES: u32 = 4096;
/// UDP port of the VXLAN overlay.
pub const VXLAN_PORT: u16 = 4789;
/// MTU given to pod interfaces: 1500 minus the VXLAN overhead (50 bytes), see DATAPATH-FACTS.
pub const POD_MTU: u32 = 1450;
/// The VNI is 24 bits on the wire; larger values are silently truncated by the kernel.
pub const VNI_MASK: u32 = 0x00ff_ffff;

/// Security identity layout.
///
/// An identity is a `u32`: the owning cluster's id (12 bits, 1-4095) above a per-cluster number (20 bits), so
/// two clusters can never hand out the same identity and every cluster has over a million numbers. Only the
/// per-cluster number travels in the VXLAN VNI (24 bits, see DATAPATH-FACTS: larger values are truncated); the
/// receiver takes the cluster from the outer source address (its [`maps::TUNNEL_PEERS`] entry).
///
/// Cluster 0 holds the reserved identities and the node-local CIDR identities (policy `ipBlock`s).
pub mod identity {
    /// Bits of the per-cluster number.
    pub const LOCAL_BITS: u32 = 20;
    /// Mask of the per-cluster number.
    pub const LOCAL_MASK: u32 = (1 << LOCAL_BITS) - 1;
    /// Not an identity: "any peer" in policy keys, "not allocated yet" on endpoints.
    pub const ANY: u32 = 0;
    /// The node itself (host network).
    pub const HOST: u32 = 1;
    /// An address outside the mesh that no `ipBlock` names.
    pub const WORLD: u32 = 2;
    /// An address inside a mesh pod prefix whose identity has not been synced yet (or an overlay packet from an
    /// unknown node or without an identity). Never treated as [`WORLD`]: only policies that allow any peer
    /// admit it, and the drop has its own reason (`drop_policy_identity_pending`).
    pub const PENDING: u32 = 3;
    /// First per-cluster number handed out by a cluster's allocator (below: reserved).
    pub const FIRST_ALLOCATED: u32 = 256;
    /// First node-local CIDR identity (cluster 0, allocated by each agent for the prefixes its policies name).
    pub const FIRST_CIDR: u32 = 0x1_0000;

    /// The identity of per-cluster number `local` in cluster `cluster_id`.
    #[must_use]
    pub const fn compose(cluster_id: u16, local: u32) -> u32 {
        ((cluster_id as u32) << LOCAL_BITS) | (local & LOCAL_MASK)
    }

    /// The cluster part (0 for reserved and CIDR identities).
    #[must_use]
    pub const fn cluster(identity: u32) -> u16 {
        (identity >> LOCAL_BITS) as u16
    }

    /// The per-cluster number (what the VNI carries).
    #[must_use]
    pub const fn local(identity: u32) -> u32 {
        identity & LOCAL_MASK
    }
}

/// Policy direction, as in [`PolicyKey::dir`] and [`FlowEvent::dir`].
pub mod policy_dir {
    /// Traffic arriving at the endpoint.
    pub const INGRESS: u8 = 1;
    /// Traffic the endpoint sends.
    pub const EGRESS: u8 = 2;
}

/// Flag bits of [`LocalEndpoint::policy_flags`].
pub mod policy_flags {
    /// A policy selects the endpoint for ingress: what its table does not allow is dropped.
    pub const INGRESS_ENFORCED: u32 = 1 << 0;
    /// A policy selects the endpoint for egress.
    pub const EGRESS_ENFORCED: u32 = 1 << 1;
    /// The endpoint's table names CIDR identities (`ipBlock` rules): a peer whose own identity finds no entry is
    /// looked up again as the CIDR identity of its address ([`crate::maps::POLICY_CIDRS`]), so that an `ipBlock`
    /// matches pods too.
    pub const CIDR_RULES: u32 = 1 << 2;
}

/// Key of [`maps::POLICY`]. Lookup order (most specific first; the first hit allows, a miss everywhere drops):
/// peer identity, then [`identity::ANY`]; within each, the port prefix lengths present in the endpoint's bitmap
/// from 16 (exact port) down to 0 (any port) with the packet's protocol; last the any-protocol entry (plen 0,
/// proto 0). Port ranges are stored as aligned power-of-two blocks (`port_plen` leading bits of `port`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyKey {
    /// [`LocalEndpoint::policy_id`] of the endpoint whose table this is.
    pub policy_id: u32,
    /// Peer identity; [`identity::ANY`] matches every peer.
    pub identity: u32,
    /// Destination port, HOST byte order, with the bits below `port_plen` cleared.
    pub port: u16,
    /// [`proto`] number; 0 = any protocol (then `port_plen` is 0).
    pub proto: u8,
    /// [`policy_dir`] value.
    pub dir: u8,
    /// How many leading bits of `port` are significant (0-16).
    pub port_plen: u8,
    pub _pad: [u8; 3],
}

/// Value of [`maps::POLICY`]: an allow entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyEntry {
    /// Which rule allowed it (an index the agent can explain; reported in flow events).
    pub rule: u32,
    pub _pad: u32,
}

/// Value of [`maps::TUNNEL_PEERS`].
///
/// A node reached through WireGuard (docs/encryption.md) has two entries: its underlay address (the key the
/// ipcache names) with [`tunnel_peer_flags::WIREGUARD_KEY`] and its WireGuard address in `wireguard_ipv4`, and that
/// WireGuard address with [`tunnel_peer_flags::VIA_WIREGUARD`] (the outer source of what the agent decrypted from
/// it). Both carry the node's cluster.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TunnelPeer {
    pub cluster_id: u16,
    /// [`tunnel_peer_flags`] bits.
    pub flags: u16,
    /// The node's address inside the WireGuard network, HOST byte order (the VXLAN remote of encrypted packets);
    /// 0 when it has no usable key.
    pub wireguard_ipv4: u32,
}

/// Flag bits of [`TunnelPeer::flags`].
pub mod tunnel_peer_flags {
    /// The agent holds a usable WireGuard key of this node: encrypted packets for it go to `wireguard_ipv4`.
    pub const WIREGUARD_KEY: u16 = 1 << 0;
    /// The key is a node's WireGuard address: packets from it were decrypted by the agent.
    pub const VIA_WIREGUARD: u16 = 1 << 1;
}

/// Verdict of a [`FlowEvent`].
pub mod flow_verdict {
    pub const FORWARDED: u8 = 1;
    pub const DROPPED: u8 = 2;
}

/// A flow event (ring buffer record). Emitted for the first packet of every flow a policy allowed, for every
/// packet a policy or the load balancer dropped, as far as the per-CPU rate limit lets them through.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEvent {
    /// `bpf_ktime_get_ns` (monotonic since boot).
    pub timestamp_ns: u64,
    /// Source and destination as policy saw them (pod addresses: after service translation, before reply
    /// translation), network order.
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    /// NETWORK byte order; 0 for protocols without ports.
    pub sport_be: u16,
    pub dport_be: u16,
    pub src_identity: u32,
    pub dst_identity: u32,
    /// [`PolicyEntry::rule`] that allowed the flow, 0 otherwise.
    pub rule: u32,
    /// Interface the packet arrived on.
    pub ifindex: u32,
    /// [`proto`] number.
    pub proto: u8,
    /// [`flow_verdict`] value.
    pub verdict: u8,
    /// The [`Counter`] index of a drop's reason (or of the forwarding decision).
    pub reason: u8,
    /// [`policy_dir`] value of the policy that decided, 0 for load-balancer drops.
    pub dir: u8,
}

/// Per-CPU token bucket for flow events (element 0 of [`maps::FLOW_RATE`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowRate {
    /// Tokens left (one per event), refilled at the configured rate up to one second's worth.
    pub tokens: u64,
    /// When the bucket was last refilled (`bpf_ktime_get_ns`).
    pub last_ns: u64,
}

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
    /// Security identity of the prefix ([`identity::PENDING`] or 0 while not synced).
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
    /// The endpoint's policy table in [`maps::POLICY`]. A policy change writes a new table under a new id, then
    /// switches this field with one map update (no half-written policy is ever in force), then deletes the old.
    pub policy_id: u32,
    /// [`policy_flags`] bits; a direction without its flag allows everything.
    pub policy_flags: u32,
    /// Bit n set: the ingress table has entries with `port_plen` n (lookups skip the others).
    pub ingress_plens: u32,
    /// Bit n set: the egress table has entries with `port_plen` n.
    pub egress_plens: u32,
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
    /// [`node_flags`] bits.
    pub flags: u16,
    /// Flow events per second and CPU; 0 = [`DEFAULT_FLOW_EVENTS_PER_SEC`].
    pub flow_events_per_sec: u32,
}

/// Flag bits of [`NodeConfig::flags`].
pub mod node_flags {
    /// Some local endpoint may have a policy: the programs look up the sender's endpoint and check policy. Off,
    /// pod-to-pod traffic costs exactly what it did before policy existed. The agent sets it before it enforces
    /// any endpoint's policy and clears it only after a pass that left no endpoint enforced.
    pub const POLICY: u16 = 1 << 0;
    /// Encryption applies to nodes of other clusters (`--encryption cross-cluster`): their packets go through
    /// WireGuard or are dropped, never in clear VXLAN.
    pub const ENCRYPT_CROSS_CLUSTER: u16 = 1 << 1;
    /// Encryption applies to every other node (`--encryption all`).
    pub const ENCRYPT_ALL: u16 = 1 << 2;
}

/// Per-CPU counters: index into [`maps::COUNTERS`]. New counters are appended (a flow event carries the index).
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
    /// A new flow to a service frontend was translated to a backend.
    LbNewFlow = 9,
    /// A packet of a known load-balanced flow was translated (forward or reply direction).
    LbTranslated = 10,
    /// Dropped: the service has no backend (or its slot table is inconsistent).
    DropNoBackend = 11,
    /// Allowed by a policy entry (a packet of an endpoint with an enforced policy).
    PolicyAllowed = 12,
    /// Allowed as the reply of a flow a policy allowed (connection tracking).
    PolicyReply = 13,
    /// Dropped by ingress policy.
    DropPolicyIngress = 14,
    /// Dropped by egress policy.
    DropPolicyEgress = 15,
    /// Dropped by policy, and the peer's identity was [`identity::PENDING`] (not synced yet).
    DropPolicyPending = 16,
    /// A flow event was not emitted: the CPU's rate limit was used up.
    FlowEventsSuppressed = 17,
    /// A flow event was not emitted: the ring buffer was full (the agent is not reading fast enough).
    FlowEventsLost = 18,
    /// Dropped: a pod sent an IPv4 packet whose source is not its own address (not the endpoint of the veth it
    /// came from).
    DropSourceSpoofed = 19,
    /// Dropped: a pod sent UDP to the VXLAN port through the node's stack (only tunnel peers feed the overlay).
    DropVxlanFromPod = 20,
    /// Dropped: an overlay packet whose outer source is not a known tunnel peer (a node of this or a peer
    /// cluster).
    DropOverlayUnknownPeer = 21,
    /// Dropped: a pod sent a frame that is neither IPv4 nor ARP (fleetmesh gives pods IPv4 addresses only).
    DropUnsupportedL3 = 22,
    /// Dropped: encryption applies to the destination node, but the agent has no usable WireGuard key of it
    /// (strict mode: never sent in clear).
    DropNoEncryptionKey = 23,
    /// Dropped: a clear VXLAN packet from a node whose traffic must arrive through WireGuard.
    DropOverlayUnencrypted = 24,
}

impl Counter {
    /// Every counter, in index order.
    pub const ALL: [Counter; 25] = [
        Counter::FwdLocal,
        Counter::FwdTunnel,
        Counter::PassStack,
        Counter::RecvOverlay,
        Counter::DropMalformed,
        Counter::DropNoEndpoint,
        Counter::DropNoTunnelKey,
        Counter::DropHelper,
        Counter::DropNoTunnel,
        Counter::LbNewFlow,
        Counter::LbTranslated,
        Counter::DropNoBackend,
        Counter::PolicyAllowed,
        Counter::PolicyReply,
        Counter::DropPolicyIngress,
        Counter::DropPolicyEgress,
        Counter::DropPolicyPending,
        Counter::FlowEventsSuppressed,
        Counter::FlowEventsLost,
        Counter::DropSourceSpoofed,
        Counter::DropVxlanFromPod,
        Counter::DropOverlayUnknownPeer,
        Counter::DropUnsupportedL3,
        Counter::DropNoEncryptionKey,
        Counter::DropOverlayUnencrypted,
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
            Counter::LbNewFlow => "lb_new_flow",
            Counter::LbTranslated => "lb_translated",
            Counter::DropNoBackend => "drop_no_backend",
            Counter::PolicyAllowed => "policy_allowed",
            Counter::PolicyReply => "policy_reply",
            Counter::DropPolicyIngress => "drop_policy_ingress",
            Counter::DropPolicyEgress => "drop_policy_egress",
            Counter::DropPolicyPending => "drop_policy_identity_pending",
            Counter::FlowEventsSuppressed => "flow_events_suppressed",
            Counter::FlowEventsLost => "flow_events_lost",
            Counter::DropSourceSpoofed => "drop_source_spoofed",
            Counter::DropVxlanFromPod => "drop_vxlan_from_pod",
            Counter::DropOverlayUnknownPeer => "drop_overlay_unknown_peer",
            Counter::DropUnsupportedL3 => "drop_unsupported_l3",
            Counter::DropNoEncryptionKey => "drop_no_encryption_key",
            Counter::DropOverlayUnencrypted => "drop_overlay_unencrypted",
        }
    }

    /// The counter with index `i` (as carried in [`FlowEvent::reason`]).
    #[must_use]
    pub fn from_index(i: u32) -> Option<Counter> {
        Counter::ALL.get(i as usize).copied()
    }

    /// Whether this counter records a drop.
    #[must_use]
    pub const fn is_drop(self) -> bool {
        matches!(
            self,
            Counter::DropMalformed
                | Counter::DropNoEndpoint
                | Counter::DropNoTunnelKey
                | Counter::DropHelper
                | Counter::DropNoTunnel
                | Counter::DropNoBackend
                | Counter::DropPolicyIngress
                | Counter::DropPolicyEgress
                | Counter::DropPolicyPending
                | Counter::DropSourceSpoofed
                | Counter::DropVxlanFromPod
                | Counter::DropOverlayUnknownPeer
                | Counter::DropUnsupportedL3
                | Counter::DropNoEncryptionKey
                | Counter::DropOverlayUnencrypted
        )
    }
}

/// Number of counters (size of [`maps::COUNTERS`]).
pub const COUNTER_COUNT: u32 = Counter::ALL.len() as u32;

/// IP protocol numbers used in keys.
pub mod proto {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
}

/// A service frontend: VIP, port and protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKeyV4 {
    /// The VIP (ClusterIP), network order.
    pub vip: [u8; 4],
    /// Destination port, NETWORK byte order (as in the packet).
    pub port_be: u16,
    /// [`proto`] number.
    pub proto: u8,
    pub _pad: u8,
}

/// Flag bits of [`ServiceEntry::flags`].
pub mod service_flags {
    /// The service is global (it may have backends in other clusters).
    pub const GLOBAL: u16 = 1 << 0;
}

/// A service frontend's data.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceEntry {
    /// Id of the slot table in [`maps::SERVICE_SLOTS`] (unique per frontend, never 0).
    pub service_id: u32,
    /// Number of slots; 0 = no backend (packets are dropped and counted). A new flow picks slot
    /// `hash(flow) % slot_count`; weights are realised by giving a backend proportionally many slots.
    pub slot_count: u32,
    /// Key into [`maps::REVNAT_V4`] for replies.
    pub rev_nat_id: u32,
    /// [`service_flags`] bits.
    pub flags: u16,
    pub _pad: u16,
}

/// Key of [`maps::SERVICE_SLOTS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SlotKey {
    pub service_id: u32,
    /// 0-based slot index, below [`ServiceEntry::slot_count`].
    pub slot: u32,
}

/// A backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendV4 {
    /// Backend pod address, network order.
    pub addr: [u8; 4],
    /// Backend port, NETWORK byte order.
    pub port_be: u16,
    /// [`proto`] number.
    pub proto: u8,
    pub _pad0: u8,
    /// Cluster of the backend.
    pub cluster_id: u16,
    pub _pad1: u16,
}

/// Reverse translation: the frontend a client used.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RevNatV4 {
    pub vip: [u8; 4],
    /// NETWORK byte order.
    pub port_be: u16,
    pub _pad: u16,
}

/// Direction of a conntrack entry.
pub mod ct_dir {
    /// Key is the original tuple of a flow a policy allowed (pod addresses, after service translation): packets
    /// of the reverse tuple are replies and pass policy.
    pub const POLICY: u8 = 3;
    /// Key is the client's original tuple (client → VIP:port): the entry says which backend serves the flow.
    pub const SERVICE: u8 = 1;
    /// Key is the reply tuple (backend → client): the entry says how to translate the reply back.
    pub const REPLY: u8 = 2;
}

/// Conntrack key: a 5-tuple plus direction. Ports in NETWORK byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKeyV4 {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    /// [`ct_dir`] value.
    pub dir: u8,
    pub _pad: u16,
}

/// Flag bits of [`CtEntryV4::flags`].
pub mod ct_flags {
    /// The client was SNATed to [`crate::HAIRPIN_IPV4`] because it is its own backend.
    pub const HAIRPIN: u32 = 1 << 0;
}

/// Conntrack value. A SERVICE entry carries the backend itself (not only its id), so removing a backend from
/// the maps never breaks its established flows; new flows never pick it because it has no slot any more.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtEntryV4 {
    /// Backend address (SERVICE) or the client's original address (REPLY of a hairpin flow), network order.
    pub addr: [u8; 4],
    /// Backend port (SERVICE), network order.
    pub port_be: u16,
    pub _pad0: u16,
    /// rev-NAT id of the frontend.
    pub rev_nat_id: u32,
    /// [`ct_flags`] bits.
    pub flags: u32,
    /// Backend id at the time the flow was created (for observability).
    pub backend_id: u32,
}

/// Per-CPU statistics of one backend (summed over CPUs by userspace). Counters only grow; readers take
/// differences.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendStats {
    /// New flows sent to the backend.
    pub new_flows: u64,
    /// TCP resets the backend sent to clients of load-balanced flows.
    pub resets: u64,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are `#[repr(C)]`, `Copy`, contain only integers and byte arrays, and have no implicit
    // padding (checked by the size assertions below), so every bit pattern is valid and none is uninitialised.
    unsafe impl aya::Pod for super::IpcacheEntry {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::LocalEndpoint {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::NodeConfig {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::ServiceKeyV4 {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::ServiceEntry {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::SlotKey {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::BackendV4 {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::RevNatV4 {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::CtKeyV4 {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::CtEntryV4 {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::BackendStats {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::PolicyKey {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::PolicyEntry {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::TunnelPeer {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::FlowEvent {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::FlowRate {}
}

// The structs must have no implicit padding: their sizes equal the sum of their fields.
const _: () = assert!(core::mem::size_of::<IpcacheEntry>() == 4 + 4 + 2 + 1 + 1 + 4);
const _: () = assert!(core::mem::size_of::<LocalEndpoint>() == 4 + 4 + 6 + 6 + 4 * 4);
const _: () = assert!(core::mem::size_of::<NodeConfig>() == 4 + 4 + 2 + 2 + 4);
const _: () = assert!(core::mem::size_of::<ServiceKeyV4>() == 4 + 2 + 1 + 1);
const _: () = assert!(core::mem::size_of::<ServiceEntry>() == 4 + 4 + 4 + 2 + 2);
const _: () = assert!(core::mem::size_of::<SlotKey>() == 4 + 4);
const _: () = assert!(core::mem::size_of::<BackendV4>() == 4 + 2 + 1 + 1 + 2 + 2);
const _: () = assert!(core::mem::size_of::<RevNatV4>() == 4 + 2 + 2);
const _: () = assert!(core::mem::size_of::<CtKeyV4>() == 4 + 4 + 2 + 2 + 1 + 1 + 2);
const _: () = assert!(core::mem::size_of::<CtEntryV4>() == 4 + 2 + 2 + 4 + 4 + 4);
const _: () = assert!(core::mem::size_of::<BackendStats>() == 8 + 8);
const _: () = assert!(core::mem::size_of::<PolicyKey>() == 4 + 4 + 2 + 1 + 1 + 1 + 3);
const _: () = assert!(core::mem::size_of::<PolicyEntry>() == 4 + 4);
const _: () = assert!(core::mem::size_of::<TunnelPeer>() == 2 + 2 + 4);
const _: () = assert!(core::mem::size_of::<FlowEvent>() == 8 + 4 + 4 + 2 + 2 + 4 + 4 + 4 + 4 + 1 + 1 + 1 + 1);
const _: () = assert!(core::mem::size_of::<FlowRate>() == 8 + 8);
// Every identity of the largest cluster id fits in the key, and its per-cluster number in the VNI.
const _: () = assert!(identity::cluster(identity::compose(4095, identity::LOCAL_MASK)) == 4095);
const _: () = assert!(identity::LOCAL_MASK <= VNI_MASK);

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
    fn identity_layout_round_trips_and_keeps_clusters_apart() {
        let a = identity::compose(1, 300);
        let b = identity::compose(2, 300);
        assert_ne!(a, b);
        assert_eq!((identity::cluster(a), identity::local(a)), (1, 300));
        assert_eq!(identity::cluster(identity::WORLD), 0);
        assert!(identity::compose(1, identity::FIRST_ALLOCATED) > identity::FIRST_CIDR);
    }

    #[test]
    fn identity_layout_holds_at_the_cluster_id_edges() {
        let max = mesh_model_max();
        for cluster in [1, 2, 2048, max - 1, max] {
            for local in [
                identity::FIRST_ALLOCATED,
                identity::FIRST_CIDR,
                identity::LOCAL_MASK,
            ] {
                let id = identity::compose(cluster, local);
                assert_eq!(identity::cluster(id), cluster, "{cluster}/{local}");
                assert_eq!(identity::local(id), local, "{cluster}/{local}");
                // Only the per-cluster number travels in the VNI, and it fits the 24 bits the kernel keeps.
                assert_eq!(identity::local(id) & VNI_MASK, local, "{cluster}/{local}");
            }
        }
        // The largest identity of the largest cluster uses every bit; no two edge clusters share an identity.
        assert_eq!(identity::compose(max, identity::LOCAL_MASK), u32::MAX);
        assert_eq!(identity::compose(1, identity::FIRST_ALLOCATED), 0x0010_0100);
        assert_ne!(
            identity::compose(1, identity::LOCAL_MASK),
            identity::compose(max, identity::LOCAL_MASK)
        );
        assert!(identity::compose(1, 0) > identity::compose(0, identity::LOCAL_MASK));
        // A per-cluster number wider than 20 bits never spills into the cluster part.
        assert_eq!(identity::cluster(identity::compose(1, u32::MAX)), 1);
    }

    /// The largest cluster id (mesh-model's `MAX_CLUSTER_ID`; this crate depends on nothing): 12 bits.
    const fn mesh_model_max() -> u16 {
        (1 << (32 - identity::LOCAL_BITS)) - 1
    }

    #[test]
    fn pod_mac_is_locally_administered_unicast() {
        let mac = pod_mac_for_ipv4([10, 1, 0, 2]);
        assert_eq!(mac, [0x0a, 0x58, 10, 1, 0, 2]);
        assert_eq!(mac[0] & 0x01, 0, "unicast");
        assert_eq!(mac[0] & 0x02, 0x02, "locally administered");
    }
}
