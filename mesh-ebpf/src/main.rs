//! fleetmesh's tc programs. Decisions come from the host-tested functions in `lib.rs`; this file only reads the
//! packet, performs the helper calls and maps each outcome to one tc verdict and one counter.
//!
//! On the host this builds as an empty binary so that `cargo test -p mesh-ebpf` works on stable.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
mod bpf {
    use aya_ebpf::{
        bindings::{TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, bpf_tunnel_key},
        helpers::{bpf_redirect, bpf_redirect_peer, bpf_skb_get_tunnel_key, bpf_skb_set_tunnel_key},
        macros::{classifier, map},
        maps::{Array, HashMap, LpmTrie, PerCpuArray, lpm_trie::Key},
        programs::TcContext,
    };
    use mesh_common::{
        COUNTER_COUNT, Counter, ENDPOINTS_MAX_ENTRIES, EndpointKeyV4, IPCACHE_V4_MAX_ENTRIES, IpcacheEntry,
        LocalEndpoint, LpmKeyV4, NodeConfig,
    };
    use mesh_ebpf::{Drop, ETH_HLEN, Forward, Frame, Malformed, Maps, PEEK_LEN, TUNNEL_TTL};

    #[map(name = "IPCACHE_V4")]
    static IPCACHE_V4: LpmTrie<LpmKeyV4, IpcacheEntry> = LpmTrie::with_max_entries(IPCACHE_V4_MAX_ENTRIES, 0);

    #[map(name = "ENDPOINTS_V4")]
    static ENDPOINTS_V4: HashMap<EndpointKeyV4, LocalEndpoint> =
        HashMap::with_max_entries(ENDPOINTS_MAX_ENTRIES, 0);

    #[map(name = "NODE_CONFIG")]
    static NODE_CONFIG: Array<NodeConfig> = Array::with_max_entries(1, 0);

    #[map(name = "COUNTERS")]
    static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_COUNT, 0);

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
        let decision = read_frame(&ctx).and_then(|frame| mesh_ebpf::from_pod(frame, &KernelMaps));
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
        let decision = read_frame(&ctx).and_then(|frame| mesh_ebpf::from_overlay(frame, &KernelMaps));
        finish(&ctx, decision)
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
