//! Per-packet cost of the eBPF load balancer as the number of service frontends grows, measured with
//! `BPF_PROG_TEST_RUN` on the `from_pod` program (run by `cargo xtask bench`; needs root).
//!
//! `lb_cost --services 2,1000,10000,100000 --repeat 100000 --rounds 7` prints one JSON object per line:
//! `{"kind":"lb","services":N,"vip_ns":[..],"pod_ns":[..]}` for each N, then one
//! `{"kind":"map",...}` per map with its kernel-side size (`/proc/self/fdinfo` of the map fd: key and value size,
//! max entries, `memlock`) when empty and after the largest fill.
//!
//! Method. `BPF_PROG_TEST_RUN` with `repeat` runs the program on the SAME skb again and again, so a translated
//! packet would be seen translated on the next run. The frontends are therefore programmed in pairs that point at
//! each other: frontend `2k` (`VIP(2k):80/TCP`) has the single backend `VIP(2k+1):8080` and frontend `2k+1`
//! (`VIP(2k+1):8080/TCP`) has the backend `VIP(2k):80`. Every run of the program on the measured packet does the
//! complete established-flow work of a service packet: reverse-conntrack lookup (miss), frontend lookup (hit),
//! SERVICE conntrack lookup (hit), REPLY conntrack lookup (hit), rewrite of the destination address and port with
//! the checksum helpers, endpoint lookup and `bpf_redirect_peer` (both VIPs of the measured pair are registered
//! as local endpoints). The baseline is a packet from one local pod to another (no frontend): the same parse,
//! the two lookups that miss, the endpoint lookup and the redirect. The kernel reports the mean time per run.
//!
//! All frontends are pairs like this one (each with one slot, one backend and one rev-NAT entry), so `N` counts
//! frontends in `SERVICES_V4` including the measured pair; N=2 is the smallest possible table.
//!
//! *Spread*: the hot figure keeps one flow in the caches. The spread figure is the cache-cold case: a fixed set
//! of 16,384 established flows (the same count at every N, so the conntrack working set does not change with N),
//! each on a random frontend of the whole table, and 20,000 calls of one run each on a random flow; against a
//! packet to an address without frontend, alternated with them.
use std::{collections::BTreeMap, net::Ipv4Addr, time::Duration};

use anyhow::{Context as _, Result, bail};
use aya::{
    Ebpf,
    maps::{HashMap, MapData},
    programs::{SchedClassifier, TestRun as _, TestRunOptions},
};
use mesh_common::{
    BackendV4, CtEntryV4, CtKeyV4, EndpointKeyV4, LocalEndpoint, RevNatV4, ServiceEntry, ServiceKeyV4,
    SlotKey, maps, pod_mac_for_ipv4, programs, proto,
};

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh-ebpf"));

const TC_ACT_OK: u32 = 0;
const TC_ACT_REDIRECT: u32 = 7;
const HOST_MAC: [u8; 6] = [0xee, 0xee, 0xee, 0, 0, 6];
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 2);
const POD: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 3);
const CLIENT_PORT: u16 = 40000;
const PORT_EVEN: u16 = 80;
const PORT_ODD: u16 = 8080;
/// An address that is neither a frontend nor a local pod (the program passes it to the stack).
const NO_FRONTEND: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
/// Pair 0 ends at a local pod (redirect), the others go to the stack.
const SPREAD_VERDICTS: &[u32] = &[TC_ACT_OK, TC_ACT_REDIRECT];
/// Calls (one run each) of the spread measurement.
const SPREAD_PACKETS: u32 = 20_000;
/// Flows of the spread measurement, the same number at every N (2 conntrack entries each).
const SPREAD_FLOWS: u32 = 16_384;
/// Client source port of spread flow 0.
const SPREAD_PORT_BASE: u16 = 20_000;
/// Frontend `i` has the VIP `10.96.0.0 + i`.
const VIP_BASE: u32 = u32::from_be_bytes([10, 96, 0, 0]);

struct Args {
    services: Vec<u32>,
    repeat: u32,
    rounds: usize,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        services: vec![2, 1_000, 10_000, 100_000],
        repeat: 100_000,
        rounds: 7,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--services" => {
                args.services = value()?
                    .split(',')
                    .map(|s| s.trim().parse::<u32>().map(|n| n.max(2)))
                    .collect::<Result<_, _>>()
                    .context("--services: comma-separated counts")?;
            }
            "--repeat" => args.repeat = value()?.parse().context("--repeat")?,
            "--rounds" => args.rounds = value()?.parse().context("--rounds")?,
            "-h" | "--help" => {
                println!("lb_cost [--services 2,1000,10000,100000] [--repeat 100000] [--rounds 7]");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}"),
        }
    }
    anyhow::ensure!(
        args.services.windows(2).all(|w| w[0] <= w[1]),
        "--services must be ascending"
    );
    anyhow::ensure!(
        args.repeat > 0 && args.rounds > 0,
        "--repeat and --rounds must be positive"
    );
    Ok(args)
}

/// xorshift64: reproducible choice of frontends without a dependency.
struct XorShift(u64);

impl XorShift {
    /// A number in `0..n` (n > 0).
    fn below(&mut self, n: u32) -> u32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        u32::try_from(self.0 % u64::from(n.max(1))).unwrap_or(0)
    }
}

fn vip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(VIP_BASE + i)
}

fn port_of(i: u32) -> u16 {
    if i.is_multiple_of(2) { PORT_EVEN } else { PORT_ODD }
}

/// One's complement sum of `data` as 16-bit big-endian words, folded, not complemented.
fn ones_sum(mut acc: u32, data: &[u8]) -> u32 {
    for pair in data.chunks(2) {
        acc += u32::from(u16::from_be_bytes([pair[0], pair.get(1).copied().unwrap_or(0)]));
    }
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc
}

/// Ethernet + IPv4 + TCP (ACK, no SYN: an established flow) + 24 payload bytes, checksums correct.
fn tcp_frame(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    const PAYLOAD: usize = 24;
    let total = 20 + 20 + PAYLOAD;
    let mut f = vec![0u8; 14 + total];
    f[0..6].copy_from_slice(&HOST_MAC);
    f[6..12].copy_from_slice(&pod_mac_for_ipv4(src.octets()));
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    f[14] = 0x45;
    f[16..18].copy_from_slice(&u16::try_from(total).unwrap_or(0).to_be_bytes());
    f[22] = 64;
    f[23] = proto::TCP;
    f[26..30].copy_from_slice(&src.octets());
    f[30..34].copy_from_slice(&dst.octets());
    let ip_csum = !u16::try_from(ones_sum(0, &f[14..34])).unwrap_or(0);
    f[24..26].copy_from_slice(&ip_csum.to_be_bytes());
    f[34..36].copy_from_slice(&sport.to_be_bytes());
    f[36..38].copy_from_slice(&dport.to_be_bytes());
    f[46] = 5 << 4;
    f[47] = 0x10; // ACK
    f[48..50].copy_from_slice(&64240u16.to_be_bytes());
    for (i, b) in f[54..].iter_mut().enumerate() {
        *b = u8::try_from(i * 7 % 251).unwrap_or(0);
    }
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, proto::TCP]);
    pseudo.extend_from_slice(&u16::try_from(total - 20).unwrap_or(0).to_be_bytes());
    let sum = !u16::try_from(ones_sum(ones_sum(0, &pseudo), &f[34..])).unwrap_or(0);
    f[50..52].copy_from_slice(&sum.to_be_bytes());
    f
}

fn take<T>(ebpf: &mut Ebpf, name: &str) -> Result<T>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let m = ebpf
        .take_map(name)
        .with_context(|| format!("map {name} missing"))?;
    T::try_from(m).with_context(|| format!("map {name}: unexpected type"))
}

struct Maps {
    services: HashMap<MapData, ServiceKeyV4, ServiceEntry>,
    slots: HashMap<MapData, SlotKey, u32>,
    backends: HashMap<MapData, u32, BackendV4>,
    rev_nat: HashMap<MapData, u32, RevNatV4>,
    endpoints: HashMap<MapData, EndpointKeyV4, LocalEndpoint>,
    ct: HashMap<MapData, CtKeyV4, CtEntryV4>,
}

impl Maps {
    /// Removes every conntrack entry.
    fn clear_conntrack(&mut self) -> Result<()> {
        let keys: Vec<CtKeyV4> = self.ct.keys().collect::<Result<_, _>>()?;
        for k in &keys {
            self.ct.remove(k)?;
        }
        Ok(())
    }

    /// Programs frontend `i` (one slot, one backend, one rev-NAT entry) as half of its pair.
    fn add_frontend(&mut self, i: u32) -> Result<()> {
        let partner = i ^ 1;
        let id = i + 1;
        let key = ServiceKeyV4 {
            vip: vip(i).octets(),
            port_be: port_of(i).to_be(),
            proto: proto::TCP,
            _pad: 0,
        };
        self.services.insert(
            key,
            ServiceEntry {
                service_id: id,
                slot_count: 1,
                rev_nat_id: id,
                flags: 0,
                _pad: 0,
            },
            0,
        )?;
        self.slots.insert(
            SlotKey {
                service_id: id,
                slot: 0,
            },
            id,
            0,
        )?;
        self.backends.insert(
            id,
            BackendV4 {
                addr: vip(partner).octets(),
                port_be: port_of(partner).to_be(),
                proto: proto::TCP,
                cluster_id: 1,
                ..Default::default()
            },
            0,
        )?;
        self.rev_nat.insert(
            id,
            RevNatV4 {
                vip: key.vip,
                port_be: key.port_be,
                _pad: 0,
            },
            0,
        )?;
        Ok(())
    }
}

/// Calls of each kind in the weighted-selection measurement.
const WEIGHTED_CALLS: u32 = 20_000;
/// Service ids of the weighted-selection frontends (far from the pairs' ids).
const WEIGHTED_ID: u32 = 4_000_001;
const UNWEIGHTED_ID: u32 = 4_000_002;
const WEIGHTED_LARGE_ID: u32 = 4_000_003;

/// Programs a frontend `vip:80` with `slots` slots over backends `backends` (ids `id * 10 + i`, slot counts in
/// proportion to `weights`).
fn program_weighted(m: &mut Maps, id: u32, vip: Ipv4Addr, backends: &[(Ipv4Addr, u32)]) -> Result<()> {
    let mut slot = 0u32;
    for (i, (addr, weight)) in backends.iter().enumerate() {
        let bid = id * 10 + u32::try_from(i).unwrap_or(0);
        m.backends.insert(
            bid,
            BackendV4 {
                addr: addr.octets(),
                port_be: 8080u16.to_be(),
                proto: proto::TCP,
                cluster_id: 1,
                ..Default::default()
            },
            0,
        )?;
        for _ in 0..*weight {
            m.slots.insert(SlotKey { service_id: id, slot }, bid, 0)?;
            slot += 1;
        }
    }
    m.rev_nat.insert(
        id,
        RevNatV4 {
            vip: vip.octets(),
            port_be: 80u16.to_be(),
            _pad: 0,
        },
        0,
    )?;
    m.services.insert(
        ServiceKeyV4 {
            vip: vip.octets(),
            port_be: 80u16.to_be(),
            proto: proto::TCP,
            _pad: 0,
        },
        ServiceEntry {
            service_id: id,
            slot_count: slot,
            rev_nat_id: id,
            flags: 0,
            _pad: 0,
        },
        0,
    )?;
    Ok(())
}

/// Mean ns per new flow to: a frontend weighted 10/90 as the agent programs it (1 + 9 slots), a weighted one
/// whose shares do not reduce (333 + 667 slots), and an unweighted one (1 slot).
fn weighted_cost(m: &mut Maps, prog: &SchedClassifier) -> Result<(f64, f64, f64)> {
    let vips = [
        Ipv4Addr::new(10, 97, 0, 1),
        Ipv4Addr::new(10, 97, 0, 2),
        Ipv4Addr::new(10, 97, 0, 3),
    ];
    let (a, b) = (Ipv4Addr::new(10, 1, 9, 1), Ipv4Addr::new(10, 1, 9, 2));
    program_weighted(m, WEIGHTED_ID, vips[0], &[(a, 1), (b, 9)])?;
    program_weighted(m, WEIGHTED_LARGE_ID, vips[1], &[(a, 333), (b, 667)])?;
    program_weighted(m, UNWEIGHTED_ID, vips[2], &[(a, 1)])?;
    m.clear_conntrack()?;
    let mut sums = [0.0f64; 3];
    for i in 0..WEIGHTED_CALLS {
        let sport = 1024 + u16::try_from(i % 60_000).unwrap_or(0);
        // Rotate which goes first, so that none always follows another's cache footprint.
        for k in 0..3 {
            let j = (k + i as usize) % 3;
            let mut syn = tcp_frame(CLIENT, sport, vips[j], 80);
            syn[47] = 0x02; // SYN
            sums[j] += measure_verdict(prog, &syn, 1, SPREAD_VERDICTS)?;
        }
    }
    let calls = f64::from(WEIGHTED_CALLS);
    Ok((sums[0] / calls, sums[1] / calls, sums[2] / calls))
}

fn endpoint(ip: Ipv4Addr) -> LocalEndpoint {
    LocalEndpoint {
        ifindex: 1,
        identity: 7,
        pod_mac: pod_mac_for_ipv4(ip.octets()),
        host_mac: HOST_MAC,
        ..Default::default()
    }
}

/// Mean ns per run of `prog` over `repeat` runs on `packet`; fails unless the verdict is a redirect.
fn measure(prog: &SchedClassifier, packet: &[u8], repeat: u32) -> Result<f64> {
    measure_verdict(prog, packet, repeat, &[TC_ACT_REDIRECT])
}

/// Mean ns per run of `prog` over `repeat` runs on `packet`; fails unless the verdict is one of `verdicts`.
fn measure_verdict(prog: &SchedClassifier, packet: &[u8], repeat: u32, verdicts: &[u32]) -> Result<f64> {
    let mut out = vec![0u8; packet.len() + 256];
    let r = prog.test_run(TestRunOptions {
        data_in: Some(packet),
        data_out: Some(&mut out),
        repeat,
        ..TestRunOptions::default()
    })?;
    anyhow::ensure!(
        verdicts.contains(&r.return_value),
        "from_pod returned {} (expected one of {verdicts:?})",
        r.return_value
    );
    Ok(duration_ns(r.duration))
}

fn duration_ns(d: Duration) -> f64 {
    d.as_secs_f64() * 1e9
}

/// Kernel-side facts of every BPF map fd this process holds, from `/proc/self/fdinfo`, by map name.
fn map_fdinfo() -> BTreeMap<String, BTreeMap<String, u64>> {
    let mut all = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir("/proc/self/fdinfo") else {
        return all;
    };
    for e in dir.flatten() {
        let Ok(text) = std::fs::read_to_string(e.path()) else {
            continue;
        };
        let fields: BTreeMap<String, u64> = text
            .lines()
            .filter_map(|l| l.split_once(':'))
            .filter_map(|(k, v)| {
                let v = v.trim();
                let n = match v.strip_prefix("0x") {
                    Some(hex) => u64::from_str_radix(hex, 16).ok()?,
                    None => v.parse::<u64>().ok()?,
                };
                Some((k.trim().to_owned(), n))
            })
            .collect();
        let Some(&id) = fields.get("map_id") else {
            continue;
        };
        let Ok(id) = u32::try_from(id) else { continue };
        let name = aya::maps::MapInfo::from_id(id)
            .ok()
            .and_then(|i| i.name_as_str().map(str::to_owned))
            .unwrap_or_else(|| format!("map-{id}"));
        all.insert(name, fields);
    }
    all
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let mut ebpf = Ebpf::load(OBJECT).context("loading the eBPF object")?;
    let mut m = Maps {
        services: take(&mut ebpf, maps::SERVICES_V4)?,
        slots: take(&mut ebpf, maps::SERVICE_SLOTS)?,
        backends: take(&mut ebpf, maps::BACKENDS_V4)?,
        rev_nat: take(&mut ebpf, maps::REVNAT_V4)?,
        endpoints: take(&mut ebpf, maps::ENDPOINTS_V4)?,
        ct: take(&mut ebpf, maps::CT_V4)?,
    };
    let prog: &mut SchedClassifier = ebpf
        .program_mut(programs::FROM_POD)
        .context("no from_pod program")?
        .try_into()?;
    prog.load().context("loading from_pod")?;
    let prog: &SchedClassifier = prog;

    for ip in [CLIENT, POD, vip(0), vip(1)] {
        m.endpoints.insert(ip.octets(), endpoint(ip), 0)?;
    }
    let empty = map_fdinfo();

    let vip_packet = tcp_frame(CLIENT, CLIENT_PORT, vip(0), PORT_EVEN);
    let pod_packet = tcp_frame(CLIENT, CLIENT_PORT, POD, PORT_EVEN);
    let none_packet = tcp_frame(CLIENT, CLIENT_PORT, NO_FRONTEND, PORT_EVEN);
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let mut programmed = 0u32;
    for &n in &args.services {
        let n = n.next_multiple_of(2);
        while programmed < n {
            m.add_frontend(programmed)
                .with_context(|| format!("programming frontend {programmed}"))?;
            programmed += 1;
        }
        // Warm up: creates the conntrack entries of the measured flow and faults in what the runs touch.
        measure(prog, &vip_packet, 1000)?;
        measure(prog, &pod_packet, 1000)?;
        let (mut vip_ns, mut pod_ns) = (Vec::new(), Vec::new());
        for _ in 0..args.rounds {
            vip_ns.push(measure(prog, &vip_packet, args.repeat)?);
            pod_ns.push(measure(prog, &pod_packet, args.repeat)?);
        }
        // Spread: the same number of flows (`SPREAD_FLOWS`) at every N, each flow on a random frontend of the
        // whole table, one run per call on a random flow. Holding the flows (and so the conntrack working set)
        // constant makes the figure depend on the number of frontends only. The flows of the previous N are
        // removed from conntrack first; every flow is warmed once so that its entries exist.
        m.clear_conntrack()?;
        let flows: Vec<Vec<u8>> = (0..SPREAD_FLOWS)
            .map(|j| {
                let i = rng.below(programmed);
                let sport = SPREAD_PORT_BASE + u16::try_from(j).unwrap_or(0);
                tcp_frame(CLIENT, sport, vip(i), port_of(i))
            })
            .collect();
        for f in &flows {
            measure_verdict(prog, f, 1, SPREAD_VERDICTS)?;
        }
        let (mut spread_vip, mut spread_none) = (0.0, 0.0);
        for _ in 0..SPREAD_PACKETS {
            let f = &flows[rng.below(SPREAD_FLOWS) as usize];
            spread_vip += measure_verdict(prog, f, 1, SPREAD_VERDICTS)?;
            spread_none += measure_verdict(prog, &none_packet, 1, SPREAD_VERDICTS)?;
        }
        let calls = f64::from(SPREAD_PACKETS);
        println!(
            "{}",
            serde_json::json!({
                "kind": "lb", "services": n, "repeat": args.repeat, "vip_ns": vip_ns, "pod_ns": pod_ns,
                "spread_calls": SPREAD_PACKETS, "spread_flows": SPREAD_FLOWS, "spread_vip_ns": spread_vip / calls,
                "spread_none_ns": spread_none / calls,
            })
        );
    }

    // Weighted vs unweighted selection: a new flow (SYN) to weighted frontends vs one with a single slot. One run
    // per call, each with a new source port (so every call selects a backend and creates its conntrack entries).
    let (weighted_ns, weighted_large_ns, unweighted_ns) = weighted_cost(&mut m, prog)?;
    println!(
        "{}",
        serde_json::json!({
            "kind": "weighted", "calls": WEIGHTED_CALLS, "weighted_ns": weighted_ns,
            "weighted_large_ns": weighted_large_ns, "unweighted_ns": unweighted_ns,
        })
    );

    let full = map_fdinfo();
    for name in [
        maps::SERVICES_V4,
        maps::SERVICE_SLOTS,
        maps::BACKENDS_V4,
        maps::REVNAT_V4,
        maps::CT_V4,
        maps::ENDPOINTS_V4,
    ] {
        let (Some(e), Some(f)) = (empty.get(name), full.get(name)) else {
            continue;
        };
        let get = |m: &BTreeMap<String, u64>, k: &str| m.get(k).copied().unwrap_or(0);
        println!(
            "{}",
            serde_json::json!({
                "kind": "map", "name": name, "map_type": get(f, "map_type"), "key_size": get(f, "key_size"),
                "value_size": get(f, "value_size"), "max_entries": get(f, "max_entries"),
                "map_flags": get(f, "map_flags"), "memlock_empty": get(e, "memlock"),
                "memlock_filled": get(f, "memlock"), "filled_entries": programmed,
            })
        );
    }
    drop(m);
    Ok(())
}
