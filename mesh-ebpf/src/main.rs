//! fleetmesh's tc programs. Decisions come from the host-tested functions in `lib.rs` and `lb.rs`; this file only
//! reads the packet, performs the helper calls (service translation with the kernel's checksum helpers, then
//! delivery) and maps each outcome to one tc verdict and one counter (plus the load balancer's own counters).
//!
//! On the host this builds as an empty binary so that `cargo test -p mesh-ebpf` works on stable.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
mod bpf {
    use aya_ebpf::{
        bindings::{
            BPF_ANY, BPF_F_MARK_MANGLED_0, BPF_F_NO_PREALLOC, BPF_F_PSEUDO_HDR, TC_ACT_OK, TC_ACT_REDIRECT,
            TC_ACT_SHOT, bpf_tunnel_key,
        },
        helpers::{
            bpf_ktime_get_ns, bpf_redirect, bpf_redirect_peer, bpf_skb_get_tunnel_key, bpf_skb_set_tunnel_key,
        },
        macros::{classifier, map},
        maps::{Array, HashMap, LpmTrie, LruHashMap, LruPerCpuHashMap, PerCpuArray, RingBuf, lpm_trie::Key},
        programs::TcContext,
    };
    use mesh_common::{
        BACKEND_STATS_MAX_ENTRIES, BACKENDS_MAX_ENTRIES, BackendStats, BackendV4, COUNTER_COUNT,
        CT_MAX_ENTRIES, Counter, CtEntryV4, CtKeyV4, ENDPOINTS_MAX_ENTRIES, EndpointKeyV4, FLOW_EVENTS_BYTES,
        FlowEvent, FlowRate, IPCACHE_V4_MAX_ENTRIES, IpcacheEntry, LocalEndpoint, LpmKeyV4, NodeConfig,
        POLICY_CIDRS_MAX_ENTRIES, POLICY_MAX_ENTRIES, PolicyEntry, PolicyKey, REVNAT_MAX_ENTRIES, RevNatV4,
        SERVICES_MAX_ENTRIES, SLOTS_MAX_ENTRIES, ServiceEntry, ServiceKeyV4, SlotKey,
        TUNNEL_PEERS_MAX_ENTRIES, TunnelPeer, flow_verdict, identity, node_flags, proto,
    };
    use mesh_ebpf::{
        Drop, ETH_HLEN, Forward, Frame, IPV4_CSUM_OFFSET, IPV4_DST_OFFSET, IPV4_SRC_OFFSET, Ipv4Header,
        Malformed, Maps, PEEK_LEN, TCP_PEEK_LEN, TUNNEL_TTL, UDP_PEEK_LEN,
        lb::{self, Flow, L4, LbMaps, Outcome, Translation},
        policy::{self, Ends, PolicyMaps},
        trust,
    };

    #[map(name = "IPCACHE_V4")]
    static IPCACHE_V4: LpmTrie<LpmKeyV4, IpcacheEntry> = LpmTrie::with_max_entries(IPCACHE_V4_MAX_ENTRIES, 0);

    #[map(name = "ENDPOINTS_V4")]
    static ENDPOINTS_V4: HashMap<EndpointKeyV4, LocalEndpoint> =
        HashMap::with_max_entries(ENDPOINTS_MAX_ENTRIES, 0);

    #[map(name = "NODE_CONFIG")]
    static NODE_CONFIG: Array<NodeConfig> = Array::with_max_entries(1, 0);

    #[map(name = "COUNTERS")]
    static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_COUNT, 0);

    // The service maps are written by the agent only: allocated on update rather than preallocated in full.
    #[map(name = "SERVICES_V4")]
    static SERVICES_V4: HashMap<ServiceKeyV4, ServiceEntry> =
        HashMap::with_max_entries(SERVICES_MAX_ENTRIES, BPF_F_NO_PREALLOC);

    #[map(name = "SERVICE_SLOTS")]
    static SERVICE_SLOTS: HashMap<SlotKey, u32> =
        HashMap::with_max_entries(SLOTS_MAX_ENTRIES, BPF_F_NO_PREALLOC);

    #[map(name = "BACKENDS_V4")]
    static BACKENDS_V4: HashMap<u32, BackendV4> =
        HashMap::with_max_entries(BACKENDS_MAX_ENTRIES, BPF_F_NO_PREALLOC);

    #[map(name = "REVNAT_V4")]
    static REVNAT_V4: HashMap<u32, RevNatV4> =
        HashMap::with_max_entries(REVNAT_MAX_ENTRIES, BPF_F_NO_PREALLOC);

    /// Written by the programs on every new flow; LRU so that it never fills up.
    #[map(name = "CT_V4")]
    static CT_V4: LruHashMap<CtKeyV4, CtEntryV4> = LruHashMap::with_max_entries(CT_MAX_ENTRIES, 0);

    /// Per-backend flow statistics, per CPU (no locking on the packet path).
    #[map(name = "LB_BACKEND_STATS")]
    static LB_BACKEND_STATS: LruPerCpuHashMap<u32, BackendStats> =
        LruPerCpuHashMap::with_max_entries(BACKEND_STATS_MAX_ENTRIES, 0);

    /// Compiled policies of the local endpoints (see `mesh_common::PolicyKey` for the lookup order).
    #[map(name = "POLICY")]
    static POLICY: HashMap<PolicyKey, PolicyEntry> =
        HashMap::with_max_entries(POLICY_MAX_ENTRIES, BPF_F_NO_PREALLOC);

    /// Underlay address of every known node → its cluster (completes the identity carried in the VNI).
    #[map(name = "TUNNEL_PEERS")]
    static TUNNEL_PEERS: HashMap<u32, TunnelPeer> =
        HashMap::with_max_entries(TUNNEL_PEERS_MAX_ENTRIES, BPF_F_NO_PREALLOC);

    /// Prefixes named by the node's policies' `ipBlock`s → their CIDR identity (pod /32s do not shadow them).
    #[map(name = "POLICY_CIDRS")]
    static POLICY_CIDRS: LpmTrie<LpmKeyV4, u32> = LpmTrie::with_max_entries(POLICY_CIDRS_MAX_ENTRIES, 0);

    /// Flow events for the agent (`meshctl observe`).
    #[map(name = "FLOW_EVENTS")]
    static FLOW_EVENTS: RingBuf = RingBuf::with_byte_size(FLOW_EVENTS_BYTES, 0);

    /// Per-CPU token bucket that limits flow events.
    #[map(name = "FLOW_RATE")]
    static FLOW_RATE: PerCpuArray<FlowRate> = PerCpuArray::with_max_entries(1, 0);

    /// Adds `outcome` to the statistics of `backend_id` (this CPU's copy).
    #[inline(always)]
    fn record(backend_id: u32, outcome: Outcome) {
        if let Some(stats) = LB_BACKEND_STATS.get_ptr_mut(backend_id) {
            // SAFETY: this CPU's copy of the entry; tc programs do not nest on one CPU.
            unsafe {
                match outcome {
                    Outcome::NewFlow => (*stats).new_flows += 1,
                    Outcome::Reset => (*stats).resets += 1,
                }
            }
        } else {
            let first = match outcome {
                Outcome::NewFlow => BackendStats {
                    new_flows: 1,
                    resets: 0,
                },
                Outcome::Reset => BackendStats {
                    new_flows: 0,
                    resets: 1,
                },
            };
            // A lost race with another CPU creating the entry costs one count; nothing else to do.
            let _ = LB_BACKEND_STATS.insert(backend_id, first, u64::from(BPF_ANY));
        }
    }

    /// The kernel maps behind the [`Maps`] trait.
    struct KernelMaps;

    impl Maps for KernelMaps {
        #[inline(always)]
        fn endpoint(&self, ip: [u8; 4]) -> Option<LocalEndpoint> {
            // SAFETY: the value is copied out right away; a concurrent update can at worst hand us a mix of the old
            // and new entry of the same pod, which the next packet corrects.
            unsafe { ENDPOINTS_V4.get(ip).copied() }
        }

        #[inline(always)]
        fn ipcache(&self, ip: [u8; 4]) -> Option<IpcacheEntry> {
            IPCACHE_V4.get(Key::new(32, ip)).copied()
        }

        #[inline(always)]
        fn node_config(&self) -> Option<NodeConfig> {
            NODE_CONFIG.get(0).copied()
        }

        #[inline(always)]
        fn encryption_peer(&self, underlay_ipv4: u32) -> Option<TunnelPeer> {
            // SAFETY: as `endpoint`.
            unsafe { TUNNEL_PEERS.get(underlay_ipv4).copied() }
        }
    }

    // SAFETY (all lookups below): the value is copied out right away; a concurrent update from the agent can at
    // worst hand us a mix of an entry's old and new version, which only the packets of that moment see.
    impl LbMaps for KernelMaps {
        #[inline(always)]
        fn service(&self, key: &ServiceKeyV4) -> Option<ServiceEntry> {
            // SAFETY: see the impl.
            unsafe { SERVICES_V4.get(key).copied() }
        }

        #[inline(always)]
        fn slot(&self, key: &SlotKey) -> Option<u32> {
            // SAFETY: see the impl.
            unsafe { SERVICE_SLOTS.get(key).copied() }
        }

        #[inline(always)]
        fn backend(&self, id: u32) -> Option<BackendV4> {
            // SAFETY: see the impl.
            unsafe { BACKENDS_V4.get(id).copied() }
        }

        #[inline(always)]
        fn rev_nat(&self, id: u32) -> Option<RevNatV4> {
            // SAFETY: see the impl.
            unsafe { REVNAT_V4.get(id).copied() }
        }

        #[inline(always)]
        fn ct(&self, key: &CtKeyV4) -> Option<CtEntryV4> {
            // SAFETY: see the impl; entries of one flow are written with identical values by every CPU.
            unsafe { CT_V4.get(key).copied() }
        }

        #[inline(always)]
        fn ct_update(&self, key: &CtKeyV4, entry: &CtEntryV4) -> Result<(), Drop> {
            CT_V4
                .insert(key, entry, u64::from(BPF_ANY))
                .map_err(|_| Drop::Helper)
        }

        #[inline(always)]
        fn ct_delete(&self, key: &CtKeyV4) {
            // A failure means the entry is already gone.
            let _ = CT_V4.remove(key);
        }
    }

    impl PolicyMaps for KernelMaps {
        #[inline(always)]
        fn policy(&self, key: &PolicyKey) -> Option<PolicyEntry> {
            // SAFETY: copied out right away; a table is never changed in place (a new one replaces it).
            unsafe { POLICY.get(key).copied() }
        }

        #[inline(always)]
        fn policy_cidr(&self, addr: [u8; 4]) -> Option<u32> {
            POLICY_CIDRS.get(Key::new(32, addr)).copied()
        }

        #[inline(always)]
        fn tunnel_peer(&self, underlay_ipv4: u32) -> Option<TunnelPeer> {
            // SAFETY: copied out right away.
            unsafe { TUNNEL_PEERS.get(underlay_ipv4).copied() }
        }

        #[inline(always)]
        fn policy_ct(&self, key: &CtKeyV4) -> bool {
            // SAFETY: only the presence of the key is used.
            unsafe { CT_V4.get(key).is_some() }
        }

        #[inline(always)]
        fn policy_ct_insert(&self, key: &CtKeyV4) {
            // A failure only means the flow's replies are judged by policy (see `PolicyMaps`).
            let _ = CT_V4.insert(key, &CtEntryV4::default(), u64::from(BPF_ANY));
        }
    }

    /// The endpoint entry of `ip`, in the map (not copied: an `Option<LocalEndpoint>` by value leaves its payload
    /// uninitialised when `None`, and the verifier refuses the register copies LLVM then makes of it).
    #[inline(always)]
    fn endpoint_ref(ip: [u8; 4]) -> Option<&'static LocalEndpoint> {
        // SAFETY: map values stay valid for the whole program run (RCU); a concurrent update can at worst show a mix
        // of the old and new entry of the same pod, as with the copying lookups.
        unsafe { ENDPOINTS_V4.get(ip) }
    }

    /// Whether some local endpoint may have a policy ([`node_flags::POLICY`]; an array lookup, no hashing).
    #[inline(always)]
    fn policy_on() -> bool {
        NODE_CONFIG
            .get(0)
            .is_some_and(|cfg| cfg.flags & node_flags::POLICY != 0)
    }

    #[inline(always)]
    fn count(counter: Counter) {
        if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
            // SAFETY: per-CPU slot of an array element that always exists; tc programs do not nest on one CPU.
            unsafe { *slot += 1 };
        }
    }

    /// Copies the headers out of the skb and parses them. Fixed-size loads only (the verifier wants constant
    /// sizes); a frame shorter than [`PEEK_LEN`] is handed over with what it has.
    #[inline(always)]
    fn read_frame(ctx: &TcContext) -> Result<Frame, Drop> {
        let len = ctx.len() as usize;
        let loaded = if len >= PEEK_LEN {
            ctx.load::<[u8; PEEK_LEN]>(0)
                .map(|b| mesh_ebpf::parse_frame(&b, len))
        } else if len >= ETH_HLEN {
            ctx.load::<[u8; ETH_HLEN]>(0)
                .map(|b| mesh_ebpf::parse_frame(&b, len))
        } else {
            Ok(mesh_ebpf::parse_frame(&[], len))
        };
        match loaded {
            Ok(parsed) => parsed.map_err(Drop::from),
            Err(_) => Err(Drop::Malformed(Malformed::TruncatedEthernet)),
        }
    }

    /// Carries out a forwarding decision; returns the tc verdict.
    #[inline(always)]
    fn apply(ctx: &TcContext, forward: Forward) -> Result<i32, Drop> {
        match forward {
            Forward::Pass => Ok(TC_ACT_OK),
            Forward::Local { ifindex, macs } => {
                ctx.store(0, &macs, 0).map_err(|_| Drop::Helper)?;
                // SAFETY: plain helper call; it only records the redirect target for after the program returns.
                let ret = unsafe { bpf_redirect_peer(ifindex, 0) };
                redirected(ret)
            }
            Forward::Tunnel {
                vxlan_ifindex,
                remote_ipv4,
                vni,
            } => {
                // SAFETY: bpf_tunnel_key is plain old data; all-zero is its "nothing set" value.
                let mut key: bpf_tunnel_key = unsafe { core::mem::zeroed() };
                key.tunnel_id = vni;
                key.__bindgen_anon_1.remote_ipv4 = remote_ipv4;
                key.tunnel_ttl = TUNNEL_TTL;
                // SAFETY: `key` is a live, correctly sized bpf_tunnel_key on our stack; skb is the program's context.
                let ret = unsafe {
                    bpf_skb_set_tunnel_key(ctx.skb.skb, &raw mut key, size_of::<bpf_tunnel_key>() as u32, 0)
                };
                if ret != 0 {
                    return Err(Drop::Helper);
                }
                // SAFETY: plain helper call; it only records the redirect target for after the program returns.
                let ret = unsafe { bpf_redirect(vxlan_ifindex, 0) };
                redirected(ret)
            }
        }
    }

    /// Copies the transport header out of the packet (at the IHL-sized offset) and parses its tuple; `None` for
    /// packets the load balancer never touches.
    #[inline(always)]
    fn read_l4(ctx: &TcContext, ip: &Ipv4Header) -> Option<L4> {
        let offset = ip.l4_offset();
        match lb::peek_len(ip)? {
            TCP_PEEK_LEN => lb::parse_l4(ip, &ctx.load::<[u8; TCP_PEEK_LEN]>(offset).ok()?),
            UDP_PEEK_LEN => lb::parse_l4(ip, &ctx.load::<[u8; UDP_PEEK_LEN]>(offset).ok()?),
            _ => None,
        }
    }

    /// Load balancing of an IPv4 packet before the forwarding decision: `reply_only` for packets from the overlay
    /// (replies of remote backends), service frontends too for packets leaving a pod. Returns the header to forward
    /// by (its destination is the translated one; the source stays the sender's, for its identity) and the tuple
    /// policy judges ([`policy::policy_tuple`]). A new flow to a frontend without backends emits a flow event.
    #[inline(always)]
    fn load_balance(ctx: &TcContext, ip: Ipv4Header, reply_only: bool) -> Result<(Ipv4Header, Flow), Drop> {
        let Some(l4) = read_l4(ctx, &ip) else {
            return Ok((ip, policy::portless_tuple(&ip)));
        };
        let translation = if reply_only {
            lb::reverse(&l4.flow, &KernelMaps)
        } else {
            match lb::from_pod(&l4, &KernelMaps) {
                Ok(t) => t,
                Err(drop) => {
                    if drop == Drop::NoBackend {
                        let src_identity = policy::address_identity(l4.flow.saddr, &KernelMaps);
                        emit(&flow_event(
                            ctx,
                            &l4.flow,
                            src_identity,
                            0,
                            0,
                            flow_verdict::DROPPED,
                            Counter::DropNoBackend,
                            0,
                        ));
                    }
                    return Err(drop);
                }
            }
        };
        let tuple = policy::policy_tuple(&l4.flow, translation.as_ref());
        let Some(t) = translation else {
            return Ok((ip, tuple));
        };
        if t.new_flow {
            count(Counter::LbNewFlow);
        }
        if let Some(outcome) = t.outcome(&l4) {
            record(t.backend_id, outcome);
        }
        rewrite(ctx, &l4, &t)?;
        count(Counter::LbTranslated);
        Ok((
            Ipv4Header {
                dst: t.flow.daddr,
                ..ip
            },
            tuple,
        ))
    }

    /// A flow event about `tuple` (its timestamp is set by [`emit`]).
    #[inline(always)]
    #[expect(clippy::too_many_arguments, reason = "one argument per event field")]
    fn flow_event(
        ctx: &TcContext,
        tuple: &Flow,
        src_identity: u32,
        dst_identity: u32,
        rule: u32,
        verdict: u8,
        reason: Counter,
        dir: u8,
    ) -> FlowEvent {
        // SAFETY: the program's own context; ifindex is a plain field of __sk_buff.
        let ifindex = unsafe { (*ctx.skb.skb).ifindex };
        FlowEvent {
            timestamp_ns: 0,
            saddr: tuple.saddr,
            daddr: tuple.daddr,
            sport_be: tuple.sport_be,
            dport_be: tuple.dport_be,
            src_identity,
            dst_identity,
            rule,
            ifindex,
            proto: tuple.proto,
            verdict,
            reason: reason as u8,
            dir,
        }
    }

    /// Hands a flow event to the agent, as far as this CPU's token bucket allows; what is suppressed or finds the
    /// ring full is counted.
    #[inline(always)]
    fn emit(event: &FlowEvent) {
        let Some(bucket) = FLOW_RATE.get_ptr_mut(0) else {
            return;
        };
        let rate = policy::flow_event_rate(NODE_CONFIG.get(0).map_or(0, |c| c.flow_events_per_sec));
        // SAFETY: helper without arguments.
        let now = unsafe { bpf_ktime_get_ns() };
        // SAFETY: this CPU's copy of element 0, which always exists; tc programs do not nest on one CPU.
        if !policy::take_token(unsafe { &mut *bucket }, now, rate) {
            count(Counter::FlowEventsSuppressed);
            return;
        }
        match FLOW_EVENTS.reserve::<FlowEvent>(0) {
            Some(mut entry) => {
                entry.write(FlowEvent {
                    timestamp_ns: now,
                    ..*event
                });
                entry.submit(0);
            }
            None => count(Counter::FlowEventsLost),
        }
    }

    /// Policy for a packet with policy tuple `tuple`: counts the verdict, emits the flow events (drops, a flow's
    /// first packet) and fails with the drop when policy denies it. The identities are only computed when a policy
    /// concerns one of the endpoints.
    #[inline(always)]
    fn enforce(
        ctx: &TcContext,
        tuple: &Flow,
        src_ep: Option<&LocalEndpoint>,
        dst_ep: Option<&LocalEndpoint>,
        src_identity: impl FnOnce() -> u32,
        dst_identity: impl FnOnce() -> u32,
    ) -> Result<(), Drop> {
        if policy::exempt(tuple) {
            return Ok(());
        }
        let (src_identity, dst_identity) = if policy::involved(src_ep, dst_ep) {
            (src_identity(), dst_identity())
        } else {
            (0, 0)
        };
        let ends = Ends {
            src_ep,
            dst_ep,
            src_identity,
            dst_identity,
        };
        match policy::check(&KernelMaps, tuple, &ends) {
            Ok(allowed) => {
                if let Some(counter) = allowed.counter() {
                    count(counter);
                }
                if allowed.new_flow {
                    emit(&flow_event(
                        ctx,
                        tuple,
                        src_identity,
                        dst_identity,
                        allowed.rule,
                        flow_verdict::FORWARDED,
                        Counter::PolicyAllowed,
                        allowed.dir,
                    ));
                }
                Ok(())
            }
            Err(denied) => {
                emit(&flow_event(
                    ctx,
                    tuple,
                    src_identity,
                    dst_identity,
                    0,
                    flow_verdict::DROPPED,
                    denied.counter(),
                    denied.dir,
                ));
                Err(denied.into())
            }
        }
    }

    /// A drop of a pod's packet before policy judged it (a spoofed source, VXLAN to the node): counted by
    /// [`finish`], reported as a flow event with the tuple the pod sent (no identities: the source is a claim).
    #[inline(always)]
    fn pod_drop(ctx: &TcContext, tuple: &Flow, drop: Drop) -> Drop {
        emit(&flow_event(
            ctx,
            tuple,
            0,
            0,
            0,
            flow_verdict::DROPPED,
            drop.counter(),
            0,
        ));
        drop
    }

    /// A packet leaving a pod: the source check (the sender's endpoint entry, needed for policy and the VNI
    /// anyway, must be the one of this veth), load balancing, policy (the sender's egress, and the receiver's
    /// ingress when it is on this node), then delivery; nothing the pod sends to the node's stack is VXLAN.
    #[inline(always)]
    fn pod_ipv4(ctx: &TcContext, ip: Ipv4Header) -> Result<Forward, Drop> {
        let src_ep = endpoint_ref(ip.src);
        // SAFETY: the program's own context; ifindex is a plain field of __sk_buff.
        let ifindex = unsafe { (*ctx.skb.skb).ifindex };
        if let Err(drop) = trust::own_source(src_ep, ifindex) {
            let tuple = read_l4(ctx, &ip).map_or_else(|| policy::portless_tuple(&ip), |l4| l4.flow);
            return Err(pod_drop(ctx, &tuple, drop));
        }
        let (ip, tuple) = load_balance(ctx, ip, false)?;
        let dst_ep = endpoint_ref(ip.dst);
        // Without any policy on the node, pod-to-pod delivery costs the two endpoint lookups.
        if policy_on() {
            enforce(
                ctx,
                &tuple,
                src_ep,
                dst_ep,
                || policy::identity_of(src_ep, tuple.saddr, &KernelMaps),
                || policy::identity_of(dst_ep, tuple.daddr, &KernelMaps),
            )?;
        }
        let forward = mesh_ebpf::from_pod_endpoints(&ip, src_ep, dst_ep, &KernelMaps)?;
        if let Forward::Pass = forward
            && let Err(drop) = trust::stack_bound(&tuple)
        {
            return Err(pod_drop(ctx, &tuple, drop));
        }
        Ok(forward)
    }

    /// The tunnel peer an overlay packet came from, if it may feed the overlay: a known peer, and through WireGuard
    /// when encryption applies to it.
    #[inline(always)]
    fn overlay_source(remote_ipv4: u32) -> Result<TunnelPeer, Drop> {
        let peer = trust::overlay_peer(remote_ipv4, &KernelMaps)?;
        match NODE_CONFIG.get(0) {
            Some(cfg) => mesh_ebpf::encryption::overlay_accepts(cfg, &peer).map(|()| peer),
            None => Ok(peer),
        }
    }

    /// A packet from the overlay: the sending node must be a tunnel peer, then reverse translation of replies, the
    /// receiver's ingress policy (the source identity comes from the VNI and the sending node), then delivery.
    #[inline(always)]
    fn overlay_ipv4(ctx: &TcContext, ip: Ipv4Header, remote_ipv4: u32, vni: u32) -> Result<Forward, Drop> {
        let peer = match overlay_source(remote_ipv4) {
            Ok(peer) => peer,
            Err(drop) => {
                emit(&flow_event(
                    ctx,
                    &policy::portless_tuple(&ip),
                    identity::PENDING,
                    0,
                    0,
                    flow_verdict::DROPPED,
                    drop.counter(),
                    0,
                ));
                return Err(drop);
            }
        };
        let (ip, tuple) = load_balance(ctx, ip, true)?;
        let dst_ep = endpoint_ref(ip.dst);
        if !policy_on() {
            return mesh_ebpf::from_overlay_endpoint(dst_ep);
        }
        enforce(
            ctx,
            &tuple,
            None,
            dst_ep,
            || policy::peer_identity(&peer, vni),
            || policy::identity_of(dst_ep, tuple.daddr, &KernelMaps),
        )?;
        mesh_ebpf::from_overlay_endpoint(dst_ep)
    }

    /// Writes the translated addresses and ports into the packet, fixing the IPv4 and transport checksums with
    /// the kernel helpers (which handle CHECKSUM_PARTIAL packets and UDP's "no checksum" zero).
    #[inline(always)]
    fn rewrite(ctx: &TcContext, l4: &L4, t: &Translation) -> Result<(), Drop> {
        let old = &l4.flow;
        let new = &t.flow;
        let csum = l4.csum_offset();
        let l4_flags = if l4.zero_csum_means_none() {
            u64::from(BPF_F_MARK_MANGLED_0)
        } else {
            0
        };
        if old.saddr != new.saddr {
            rewrite_addr(ctx, IPV4_SRC_OFFSET, old.saddr, new.saddr, csum, l4_flags)?;
        }
        if old.daddr != new.daddr {
            rewrite_addr(ctx, IPV4_DST_OFFSET, old.daddr, new.daddr, csum, l4_flags)?;
        }
        if old.sport_be != new.sport_be {
            rewrite_port(ctx, l4.sport_offset(), old.sport_be, new.sport_be, csum, l4_flags)?;
        }
        if old.dport_be != new.dport_be {
            rewrite_port(ctx, l4.dport_offset(), old.dport_be, new.dport_be, csum, l4_flags)?;
        }
        Ok(())
    }

    #[inline(always)]
    fn rewrite_addr(
        ctx: &TcContext,
        offset: usize,
        from: [u8; 4],
        to: [u8; 4],
        l4_csum: usize,
        l4_flags: u64,
    ) -> Result<(), Drop> {
        // The helpers take the values as they are in memory (network order).
        let (old, new) = (
            u64::from(u32::from_ne_bytes(from)),
            u64::from(u32::from_ne_bytes(to)),
        );
        let size = size_of::<u32>() as u64;
        ctx.l4_csum_replace(l4_csum, old, new, l4_flags | u64::from(BPF_F_PSEUDO_HDR) | size)
            .map_err(|_| Drop::Helper)?;
        ctx.l3_csum_replace(IPV4_CSUM_OFFSET, old, new, size)
            .map_err(|_| Drop::Helper)?;
        ctx.store(offset, &to, 0).map_err(|_| Drop::Helper)
    }

    #[inline(always)]
    fn rewrite_port(
        ctx: &TcContext,
        offset: usize,
        from_be: u16,
        to_be: u16,
        l4_csum: usize,
        l4_flags: u64,
    ) -> Result<(), Drop> {
        let size = size_of::<u16>() as u64;
        ctx.l4_csum_replace(l4_csum, u64::from(from_be), u64::from(to_be), l4_flags | size)
            .map_err(|_| Drop::Helper)?;
        ctx.store(offset, &to_be, 0).map_err(|_| Drop::Helper)
    }

    #[inline(always)]
    fn redirected(ret: i64) -> Result<i32, Drop> {
        if ret == i64::from(TC_ACT_REDIRECT) {
            Ok(TC_ACT_REDIRECT)
        } else {
            Err(Drop::Helper)
        }
    }

    /// One verdict, one counter.
    #[inline(always)]
    fn finish(ctx: &TcContext, decision: Result<Forward, Drop>) -> i32 {
        let outcome = decision.and_then(|fwd| apply(ctx, fwd).map(|verdict| (verdict, fwd.counter())));
        match outcome {
            Ok((verdict, counter)) => {
                count(counter);
                verdict
            }
            Err(drop) => {
                count(drop.counter());
                TC_ACT_SHOT
            }
        }
    }

    /// tc ingress on the host side of a pod's veth: packets leaving the pod.
    #[classifier]
    #[expect(
        clippy::needless_pass_by_value,
        reason = "#[classifier] hands the context over by value"
    )]
    pub fn from_pod(ctx: TcContext) -> i32 {
        // Of the non-IPv4 frames only ARP goes on, to the stack (as `mesh_ebpf::from_pod` decides); matching here
        // keeps the IPv4 path apart, so no half-initialised `Frame` is ever copied between registers (the verifier
        // refuses that).
        let decision = read_frame(&ctx).and_then(|frame| match frame {
            Frame::Ipv4(ip) => pod_ipv4(&ctx, ip),
            Frame::Other { ether_type } => trust::pod_other_l3(ether_type),
        });
        finish(&ctx, decision)
    }

    /// tc ingress on the node's VXLAN device (collect-metadata mode): packets from other nodes.
    #[classifier]
    #[expect(
        clippy::needless_pass_by_value,
        reason = "#[classifier] hands the context over by value"
    )]
    pub fn from_overlay(ctx: TcContext) -> i32 {
        // SAFETY: bpf_tunnel_key is plain old data; the helper fills it in.
        let mut key: bpf_tunnel_key = unsafe { core::mem::zeroed() };
        // SAFETY: `key` is a live, correctly sized bpf_tunnel_key on our stack; skb is the program's context.
        let ret = unsafe {
            bpf_skb_get_tunnel_key(ctx.skb.skb, &raw mut key, size_of::<bpf_tunnel_key>() as u32, 0)
        };
        if ret < 0 {
            count(Drop::NoTunnelKey.counter());
            return TC_ACT_SHOT;
        }
        count(Counter::RecvOverlay);
        let vni = key.tunnel_id;
        // SAFETY: the helper filled in the IPv4 member of the address union (no BPF_F_TUNINFO_IPV6 flag).
        let remote_ipv4 = unsafe { key.__bindgen_anon_1.remote_ipv4 };
        let decision = read_frame(&ctx).and_then(|frame| match frame {
            Frame::Ipv4(ip) => overlay_ipv4(&ctx, ip, remote_ipv4, vni),
            Frame::Other { .. } => overlay_source(remote_ipv4).map(|_| Forward::Pass),
        });
        finish(&ctx, decision)
    }

    /// tc egress on the host side of a pod's veth: what the node's own stack sends into the pod (local delivery
    /// from other pods and the overlay uses `bpf_redirect_peer` and never passes here). The agent attaches it only
    /// while the node has policy. A connection the node opens to a pod whose egress is enforced (a kubelet probe)
    /// is recorded in policy conntrack, so the pod's replies pass `from_pod` as replies. Never drops.
    #[classifier]
    #[expect(
        clippy::needless_pass_by_value,
        reason = "#[classifier] hands the context over by value"
    )]
    pub fn to_pod(ctx: TcContext) -> i32 {
        let Some(cfg) = NODE_CONFIG.get(0) else {
            return TC_ACT_OK;
        };
        if cfg.flags & node_flags::POLICY == 0 {
            return TC_ACT_OK;
        }
        if let Ok(Frame::Ipv4(ip)) = read_frame(&ctx) {
            track_host_flow(&ctx, cfg, &ip);
        }
        TC_ACT_OK
    }

    /// [`to_pod`] for an IPv4 packet: the gates cheapest first (source address, then the endpoint's flags), then
    /// the transport header.
    #[inline(always)]
    fn track_host_flow(ctx: &TcContext, cfg: &NodeConfig, ip: &Ipv4Header) {
        if !policy::tracks_host_flows(cfg, ip.src) || !policy::egress_enforced(endpoint_ref(ip.dst)) {
            return;
        }
        let icmp_type = if ip.proto == proto::ICMP && !ip.is_later_fragment() {
            ctx.load::<u8>(ip.l4_offset()).ok()
        } else {
            None
        };
        let l4 = read_l4(ctx, ip);
        if let Some(tuple) = policy::host_flow_opener(ip, l4.as_ref(), icmp_type) {
            policy::record_host_flow(&KernelMaps, &tuple);
        }
    }

    /// Licence of the programs, read by the loader (GPL-compatible, so GPL-only helpers stay available).
    #[unsafe(link_section = "license")]
    #[unsafe(no_mangle)]
    static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
        loop {}
    }
}
