//! The agent's eBPF datapath: loads `mesh-ebpf`, attaches its tc programs and owns its maps.
//!
//! This is the only module of the agent that touches aya. Attaching resolves interface names in the calling
//! thread's network namespace; map operations work from any thread.
//!
//! # Two lifetimes
//!
//! - [`Datapath::load`]: nothing is pinned; the programs detach and the maps go away when the [`Datapath`] is
//!   dropped (tests, throwaway use).
//! - [`Datapath::load_pinned`] (the agent): the datapath outlives the agent, so that an agent restart (upgrade,
//!   crash, SIGKILL) never interrupts forwarding. Layout of the pin directory (on bpffs, one per node):
//!   - `maps-v<MAP_ABI>/<MAP>`: every shared map. The loader reuses a pinned map when its kernel definition (type,
//!     key and value size, max entries, flags) matches the object's; a pin that does not match (an upgrade that
//!     changed the map ABI) is removed with a logged warning and the map is created afresh: a flush is
//!     unavoidable then. Pins of another [`MAP_ABI`] are removed likewise.
//!   - `links/<program>@<ifname>`: the tcx links (`from_pod` on tc ingress and, while the node has policy, `to_pod`
//!     on tc egress of every pod veth; `from_overlay` on the VXLAN device). A tcx link lives as long as something references it; the pin
//!     keeps it, and so its program, attached while no agent runs. A new agent loads its programs (bound to the
//!     pinned maps) and replaces the program inside each pinned link with `BPF_LINK_UPDATE`, an atomic swap of
//!     the program pointer: there is no moment in which the interface has no program (unlike detach + attach),
//!     and no moment with two. A pin whose link is defunct (its interface went away while no agent ran) fails
//!     the update with `ENOLINK` and is removed; the reconcile attaches afresh where needed.
//!
//!   Dropping the [`Datapath`] (agent exit, also on SIGTERM) only closes file descriptors: the pinned links and
//!   maps stay as they are until the next agent takes over. Counters persist across restarts as well (they are a
//!   pinned map). Removing the pin directory ([`remove_pins`], `rm -r` of it) removes the datapath: the links
//!   detach once no process holds them, and the maps go with the last program that uses them.
use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{
        Array, HashMap, LpmTrie, MapData, MapError, MapInfo, PerCpuArray, PerCpuHashMap, RingBuf,
        lpm_trie::Key,
    },
    programs::{
        LinkOrder, ProgramError, SchedClassifier, TcAttachType, TestRun as _, TestRunOptions,
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, SchedClassifierLinkId, TcAttachOptions},
    },
};
use ipnet::Ipv4Net;
use mesh_common::{
    BackendStats, BackendV4, COUNTER_COUNT, Counter, CtEntryV4, CtKeyV4, EndpointKeyV4, FlowEvent,
    IpcacheEntry, LocalEndpoint, LpmKeyV4, NodeConfig, PolicyEntry, PolicyKey, RevNatV4, ServiceEntry,
    ServiceKeyV4, SlotKey, TunnelPeer, identity, maps, policy_dir, policy_flags, programs, proto,
};
use tracing::{info, warn};

/// The compiled eBPF object, built by `build.rs`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh-ebpf"));

/// Extra room in the output buffer of a test run, for programs that grow the packet.
const TEST_RUN_HEADROOM: usize = 256;

/// The maps shared by the programs and the agent: the ones pinned by [`Datapath::load_pinned`].
pub const SHARED_MAPS: [&str; 15] = [
    maps::IPCACHE_V4,
    maps::ENDPOINTS_V4,
    maps::NODE_CONFIG,
    maps::COUNTERS,
    maps::SERVICES_V4,
    maps::SERVICE_SLOTS,
    maps::BACKENDS_V4,
    maps::REVNAT_V4,
    maps::CT_V4,
    maps::LB_BACKEND_STATS,
    maps::POLICY,
    maps::TUNNEL_PEERS,
    maps::FLOW_EVENTS,
    maps::FLOW_RATE,
    maps::POLICY_CIDRS,
];

/// Version of the map ABI where sizes cannot tell: bump it when a key or value changes meaning at an equal size.
/// The maps of another version are not adopted (their pins are removed: a flush).
///
/// 2: identities and policy (`LocalEndpoint` grew its policy fields, the VNI carries the identity's per-cluster
/// number only, new maps `POLICY`, `TUNNEL_PEERS`, `FLOW_EVENTS`, `FLOW_RATE`).
pub const MAP_ABI: u32 = 2;

/// Where the agent pins the datapath of node `node` by default.
#[must_use]
pub fn default_pin_dir(node: &str) -> PathBuf {
    Path::new(BPFFS_ROOT).join("fleetmesh").join(node)
}

/// The usual mount point of bpffs.
pub const BPFFS_ROOT: &str = "/sys/fs/bpf";

/// `statfs` magic of bpffs.
const BPF_FS_MAGIC: u64 = 0xcafe_4a11;

/// What went wrong in the datapath, naming the program, map, key or interface involved.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    /// The embedded eBPF object could not be parsed or its maps created.
    #[error("loading the eBPF object mesh-ebpf")]
    Load(#[source] Box<EbpfError>),
    /// The object lacks a program the agent needs (agent and eBPF build out of step).
    #[error("eBPF object has no tc program {0:?}")]
    MissingProgram(String),
    /// The object lacks a map the agent needs, or it has another type than expected.
    #[error("eBPF map {map}: missing or of an unexpected type")]
    BadMap {
        /// Map name.
        map: &'static str,
        /// Why it could not be used.
        #[source]
        source: Option<Box<MapError>>,
    },
    /// Loading a program into the kernel failed (the source carries the verifier log).
    #[error("loading eBPF program {program} into the kernel")]
    LoadProgram {
        /// Program name.
        program: &'static str,
        /// The kernel's answer.
        #[source]
        source: Box<ProgramError>,
    },
    /// Attaching a program to an interface failed.
    #[error("attaching eBPF program {program} to tc {hook} of interface {ifname:?}")]
    Attach {
        /// Program name.
        program: &'static str,
        /// `ingress` or `egress`.
        hook: &'static str,
        /// Interface, in the calling thread's network namespace.
        ifname: String,
        /// The kernel's answer.
        #[source]
        source: Box<ProgramError>,
    },
    /// Detaching a program from an interface failed.
    #[error("detaching eBPF program {program} from interface {ifname:?}")]
    Detach {
        /// Program name.
        program: &'static str,
        /// Interface.
        ifname: String,
        /// The kernel's answer.
        #[source]
        source: Box<ProgramError>,
    },
    /// Listing the tc programs of an interface failed.
    #[error("listing the tcx programs of interface {ifname:?}")]
    Query {
        /// Interface.
        ifname: String,
        /// The kernel's answer.
        #[source]
        source: Box<ProgramError>,
    },
    /// A map operation failed.
    #[error("eBPF map {map}: {op} {key}")]
    Map {
        /// Map name.
        map: &'static str,
        /// What was being done (`insert`, `remove`, `read`).
        op: &'static str,
        /// The key involved (address, prefix, index), or `entries` for a dump.
        key: String,
        /// The kernel's answer.
        #[source]
        source: Box<MapError>,
    },
    /// The pin directory could not be prepared, read or changed.
    #[error("pin directory {}: {what}", path.display())]
    PinDir {
        /// The directory or the pin in it.
        path: PathBuf,
        /// What was being done.
        what: String,
        /// The system's answer, if any.
        #[source]
        source: Option<std::io::Error>,
    },
    /// Pinning a new tc link failed.
    #[error("pinning the link of {program} on interface {ifname:?} at {}", path.display())]
    PinLink {
        /// Program name.
        program: &'static str,
        /// Interface.
        ifname: String,
        /// The pin.
        path: PathBuf,
        /// The kernel's answer.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A policy operation named an address that is not a local endpoint (program the endpoint first).
    #[error("no local endpoint {0} in the datapath")]
    UnknownEndpoint(Ipv4Addr),
    /// A policy entry cannot be represented in the datapath.
    #[error("policy of endpoint {ip}: {reason}")]
    InvalidPolicy {
        /// The endpoint.
        ip: Ipv4Addr,
        /// What is wrong.
        reason: String,
    },
    /// `BPF_PROG_TEST_RUN` failed.
    #[error("test run of eBPF program {program:?}")]
    TestRun {
        /// Program name.
        program: String,
        /// The kernel's answer.
        #[source]
        source: Box<ProgramError>,
    },
}

/// Result of one `BPF_PROG_TEST_RUN`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestRunOutcome {
    /// The program's return value (the tc verdict).
    pub return_value: u32,
    /// The packet as the program left it.
    pub packet: Vec<u8>,
}

/// Reads the per-backend statistics (any thread); see [`Datapath::backend_stats_reader`].
pub struct BackendStatsReader(PerCpuHashMap<MapData, u32, BackendStats>);

impl BackendStatsReader {
    /// Every backend's statistics, summed over CPUs.
    ///
    /// # Errors
    ///
    /// When reading the map fails.
    pub fn read(&self) -> Result<BTreeMap<u32, BackendStats>, DatapathError> {
        read_backend_stats(&self.0)
    }
}

fn read_backend_stats(
    map: &PerCpuHashMap<MapData, u32, BackendStats>,
) -> Result<BTreeMap<u32, BackendStats>, DatapathError> {
    let mut out = BTreeMap::new();
    for entry in map.iter() {
        let (id, per_cpu) = entry.map_err(|source| DatapathError::Map {
            map: maps::LB_BACKEND_STATS,
            op: "read",
            key: "entries".to_owned(),
            source: Box::new(source),
        })?;
        let sum = per_cpu
            .iter()
            .fold(BackendStats::default(), |acc, s| BackendStats {
                new_flows: acc.new_flows + s.new_flows,
                resets: acc.resets + s.resets,
            });
        out.insert(id, sum);
    }
    Ok(out)
}

/// Reads the datapath counters; see [`Datapath::counters_reader`].
pub struct CountersReader(PerCpuArray<MapData, u64>);

impl CountersReader {
    /// Every counter, summed over CPUs, in [`Counter::ALL`] order.
    ///
    /// # Errors
    ///
    /// When reading the map fails.
    pub fn read(&self) -> Result<Vec<(Counter, u64)>, DatapathError> {
        read_counters(&self.0)
    }
}

fn read_counters(map: &PerCpuArray<MapData, u64>) -> Result<Vec<(Counter, u64)>, DatapathError> {
    debug_assert_eq!(Counter::ALL.len(), COUNTER_COUNT as usize);
    Counter::ALL
        .iter()
        .map(|&c| {
            let per_cpu = map.get(&(c as u32), 0).map_err(|source| DatapathError::Map {
                map: maps::COUNTERS,
                op: "read",
                key: c.name().to_owned(),
                source: Box::new(source),
            })?;
            Ok((c, per_cpu.iter().copied().fold(0u64, u64::wrapping_add)))
        })
        .collect()
}

/// A map key: how it reads in errors and how dumps are sorted.
trait TableKey: aya::Pod + Copy {
    /// Sort order of dumps.
    type Order: Ord;
    /// The sort key.
    fn order(&self) -> Self::Order;
    /// The key as a user reads it (address, port, protocol).
    fn describe(&self) -> String;
}

fn proto_name(p: u8) -> String {
    match p {
        proto::TCP => "tcp".to_owned(),
        proto::UDP => "udp".to_owned(),
        other => format!("proto {other}"),
    }
}

fn endpoint_string(addr: [u8; 4], port_be: u16) -> String {
    format!("{}:{}", Ipv4Addr::from(addr), u16::from_be(port_be))
}

impl TableKey for EndpointKeyV4 {
    type Order = Self;
    fn order(&self) -> Self {
        *self
    }
    fn describe(&self) -> String {
        Ipv4Addr::from(*self).to_string()
    }
}

impl TableKey for u32 {
    type Order = Self;
    fn order(&self) -> Self {
        *self
    }
    fn describe(&self) -> String {
        self.to_string()
    }
}

impl TableKey for ServiceKeyV4 {
    type Order = ([u8; 4], u16, u8);
    fn order(&self) -> Self::Order {
        (self.vip, u16::from_be(self.port_be), self.proto)
    }
    fn describe(&self) -> String {
        format!(
            "{}/{}",
            endpoint_string(self.vip, self.port_be),
            proto_name(self.proto)
        )
    }
}

impl TableKey for SlotKey {
    type Order = (u32, u32);
    fn order(&self) -> Self::Order {
        (self.service_id, self.slot)
    }
    fn describe(&self) -> String {
        format!("service {} slot {}", self.service_id, self.slot)
    }
}

impl TableKey for PolicyKey {
    type Order = (u32, u8, u32, u8, u16, u8);
    fn order(&self) -> Self::Order {
        (
            self.policy_id,
            self.dir,
            self.identity,
            self.proto,
            self.port,
            self.port_plen,
        )
    }
    fn describe(&self) -> String {
        let dir = match self.dir {
            policy_dir::INGRESS => "ingress",
            policy_dir::EGRESS => "egress",
            _ => "dir?",
        };
        format!(
            "table {} {dir} identity {} {} {}/{}",
            self.policy_id,
            self.identity,
            proto_name(self.proto),
            self.port,
            self.port_plen
        )
    }
}

impl TableKey for CtKeyV4 {
    type Order = (u8, [u8; 4], u16, [u8; 4], u16, u8);
    fn order(&self) -> Self::Order {
        (
            self.dir,
            self.saddr,
            u16::from_be(self.sport_be),
            self.daddr,
            u16::from_be(self.dport_be),
            self.proto,
        )
    }
    fn describe(&self) -> String {
        format!(
            "{} {} -> {} dir {}",
            proto_name(self.proto),
            endpoint_string(self.saddr, self.sport_be),
            endpoint_string(self.daddr, self.dport_be),
            self.dir
        )
    }
}

/// A hash map of the datapath with its name: insert, remove (absent is fine) and sorted dumps, with errors that
/// name the map and the key.
struct Table<K, V> {
    name: &'static str,
    map: HashMap<MapData, K, V>,
}

impl<K: TableKey, V: aya::Pod> Table<K, V> {
    fn take(ebpf: &mut Ebpf, name: &'static str) -> Result<Self, DatapathError> {
        Ok(Self {
            name,
            map: take_map(ebpf, name)?,
        })
    }

    fn error(&self, op: &'static str, key: String, source: MapError) -> DatapathError {
        DatapathError::Map {
            map: self.name,
            op,
            key,
            source: Box::new(source),
        }
    }

    fn upsert(&mut self, key: K, value: V) -> Result<(), DatapathError> {
        self.map
            .insert(key, value, 0)
            .map_err(|source| self.error("insert", key.describe(), source))
    }

    fn remove(&mut self, key: K) -> Result<(), DatapathError> {
        match self.map.remove(&key) {
            Err(source) if !is_absent(&source) => Err(self.error("remove", key.describe(), source)),
            _ => Ok(()),
        }
    }

    /// Inserts many entries with few system calls (`BPF_MAP_UPDATE_BATCH`); where the kernel refuses a batch,
    /// the rest of it is written one by one (so an error names its key).
    fn upsert_batch(&mut self, entries: &[(K, V)]) -> Result<(), DatapathError> {
        for chunk in entries.chunks(BATCH) {
            let keys: Vec<K> = chunk.iter().map(|(k, _)| *k).collect();
            let values: Vec<V> = chunk.iter().map(|(_, v)| *v).collect();
            let (done, _) = map_batch(&self.map, BPF_MAP_UPDATE_BATCH, &keys, Some(&values));
            for (k, v) in &chunk[done..] {
                self.upsert(*k, *v)?;
            }
        }
        Ok(())
    }

    /// Removes many keys with few system calls (`BPF_MAP_DELETE_BATCH`); absent keys are fine (a batch stops at
    /// one; the rest of it is removed one by one).
    fn remove_batch(&mut self, keys: &[K]) -> Result<(), DatapathError> {
        for chunk in keys.chunks(BATCH) {
            let mut rest = chunk;
            while !rest.is_empty() {
                let (done, errno) = map_batch::<K, V>(&self.map, BPF_MAP_DELETE_BATCH, rest, None);
                match errno {
                    None => break,
                    // An absent key stopped it: skip that one, go on batching.
                    Some(libc::ENOENT) => rest = &rest[(done + 1).min(rest.len())..],
                    // No batches here, or another error: one by one (an error names its key).
                    Some(_) => {
                        for k in &rest[done..] {
                            self.remove(*k)?;
                        }
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    fn get(&self, key: K) -> Result<Option<V>, DatapathError> {
        match self.map.get(&key, 0) {
            Ok(v) => Ok(Some(v)),
            Err(source) if is_absent(&source) => Ok(None),
            Err(source) => Err(self.error("read", key.describe(), source)),
        }
    }

    fn entries(&self) -> Result<Vec<(K, V)>, DatapathError> {
        let mut all = self
            .map
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| self.error("read", "entries".to_owned(), source))?;
        all.sort_by_key(|(k, _)| k.order());
        Ok(all)
    }
}

/// Entries per batch system call.
const BATCH: usize = 4096;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// The `batch` member of `union bpf_attr` (linux/bpf.h).
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Runs batch command `cmd` of hash map `map` over `keys` (and `values`, as many): how many entries the kernel
/// processed (all of them, or those before the one that stopped it; 0 where the kernel has no batch commands),
/// and the error number that stopped it.
fn map_batch<K: aya::Pod, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
    cmd: libc::c_long,
    keys: &[K],
    values: Option<&[V]>,
) -> (usize, Option<i32>) {
    use aya::maps::IterableMap as _;
    use std::os::fd::{AsFd as _, AsRawFd as _};
    if keys.is_empty() {
        return (0, None);
    }
    if values.is_some_and(|v| v.len() != keys.len()) {
        return (0, Some(libc::EINVAL));
    }
    let fd = map.map().fd().as_fd().as_raw_fd();
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.map_or(0, |v| v.as_ptr() as u64),
        count: u32::try_from(keys.len()).unwrap_or(u32::MAX),
        map_fd: u32::try_from(fd).unwrap_or(u32::MAX),
        ..BatchAttr::default()
    };
    #[expect(clippy::cast_possible_truncation, reason = "the attribute is 56 bytes")]
    let size = std::mem::size_of::<BatchAttr>() as libc::c_uint;
    // SAFETY: `attr` is a valid `bpf_attr` batch member for the duration of the call; `keys` and `values` hold
    // `count` entries of the map's key and value types (K and V are what the map was made with), which the kernel
    // only reads; the kernel writes only `attr.count`.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, &raw mut attr, size) };
    if rc == 0 {
        (keys.len(), None)
    } else {
        let errno = std::io::Error::last_os_error().raw_os_error();
        ((attr.count as usize).min(keys.len()), errno.or(Some(libc::EIO)))
    }
}

/// What [`Datapath::load_pinned`] found in the pin directory and took over.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Adoption {
    /// Maps whose pins were reused, contents and all.
    pub maps_reused: Vec<&'static str>,
    /// Maps created afresh, with the reason when a pin was there but could not be reused.
    pub maps_created: Vec<(&'static str, Option<String>)>,
    /// Links whose program was replaced in place (`<program>@<ifname>`).
    pub links_adopted: Vec<String>,
    /// Link pins removed (defunct or unusable), with the reason.
    pub links_removed: Vec<(String, String)>,
}

/// How a program is attached to one interface.
enum Attachment {
    /// A link owned by the program: detached when the [`Datapath`] is dropped.
    Owned(SchedClassifierLinkId),
    /// A pinned tcx link: stays attached after the [`Datapath`] is dropped.
    Pinned {
        /// Our handle on it (closing it does not detach, the pin holds the link).
        _link: FdLink,
        /// The pin.
        pin: PathBuf,
    },
}

/// The loaded datapath: programs, their tc links, and the maps.
pub struct Datapath {
    ebpf: Ebpf,
    ipcache: LpmTrie<MapData, LpmKeyV4, IpcacheEntry>,
    endpoints: Table<EndpointKeyV4, LocalEndpoint>,
    services: Table<ServiceKeyV4, ServiceEntry>,
    slots: Table<SlotKey, u32>,
    backends: Table<u32, BackendV4>,
    rev_nat: Table<u32, RevNatV4>,
    conntrack: Table<CtKeyV4, CtEntryV4>,
    backend_stats: PerCpuHashMap<MapData, u32, BackendStats>,
    policy: Table<PolicyKey, PolicyEntry>,
    tunnel_peers: Table<u32, TunnelPeer>,
    /// The WireGuard half of `TUNNEL_PEERS` entries (docs/encryption.md), shared with the agent's WireGuard
    /// engine: what a (re)written entry carries besides its cluster.
    wireguard_keys: std::sync::Arc<crate::wireguard::KeyTable>,
    policy_cidrs: LpmTrie<MapData, LpmKeyV4, u32>,
    /// What `policy_cidrs` holds (read from the map at load; [`Datapath::set_policy_cidrs`] writes differences).
    programmed_policy_cidrs: BTreeMap<Ipv4Net, u32>,
    /// The flow event ring, until [`Datapath::take_flow_events`] hands it out.
    flow_events: Option<RingBuf<MapData>>,
    /// The policy tables in the map, by id (a userspace copy, read from the map at load): ids in use, and what
    /// to delete when a table is replaced. Ids that endpoints name without entries (deny-all) are here too.
    policy_tables: BTreeMap<u32, Vec<(PolicyKey, PolicyEntry)>>,
    /// Each endpoint's previous table, kept to become its next one: bringing it up to date writes only what
    /// differs (see [`Datapath::replace_endpoint_policy`]).
    standby_tables: BTreeMap<Ipv4Addr, u32>,
    /// Where the search for a free policy id starts.
    next_policy_id: u32,
    node_config: Array<MapData, NodeConfig>,
    counters: PerCpuArray<MapData, u64>,
    counters_id: u32,
    backend_stats_id: u32,
    overlay: Option<(String, Attachment)>,
    /// The links on pod veths, by program ([`programs::FROM_POD`], [`programs::TO_POD`]) and interface name.
    endpoint_links: BTreeMap<(&'static str, String), Attachment>,
    /// Interface index each endpoint link was made for: an interface re-created under the same name (a pod
    /// restarted) has a new index and needs the program attached again. Links adopted from an earlier agent are
    /// checked once with a tcx query instead.
    endpoint_ifindex: BTreeMap<(&'static str, String), u32>,
    /// The pin directory, when the datapath is pinned.
    pins: Option<PathBuf>,
    adoption: Adoption,
}

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath")
            .field("overlay", &self.overlay.as_ref().map(|(ifname, _)| ifname))
            .field("endpoint_links", &self.endpoint_links.keys().collect::<Vec<_>>())
            .field("pins", &self.pins)
            .finish_non_exhaustive()
    }
}

fn take_map<T>(ebpf: &mut Ebpf, map: &'static str) -> Result<T, DatapathError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let raw = ebpf
        .take_map(map)
        .ok_or(DatapathError::BadMap { map, source: None })?;
    T::try_from(raw).map_err(|source| DatapathError::BadMap {
        map,
        source: Some(Box::new(source)),
    })
}

fn classifier<'a>(ebpf: &'a mut Ebpf, program: &str) -> Result<&'a mut SchedClassifier, DatapathError> {
    ebpf.program_mut(program)
        .and_then(|p| <&mut SchedClassifier>::try_from(p).ok())
        .ok_or_else(|| DatapathError::MissingProgram(program.to_owned()))
}

/// Whether a map error means "no such key" (removing an absent entry is not an error for us).
fn is_absent(err: &MapError) -> bool {
    match err {
        MapError::KeyNotFound | MapError::ElementNotFound => true,
        MapError::SyscallError(e) => e.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

fn lpm_key(prefix: Ipv4Net) -> Key<LpmKeyV4> {
    let prefix = prefix.trunc();
    Key::new(u32::from(prefix.prefix_len()), prefix.network().octets())
}

fn pin_dir_error(path: &Path, what: impl Into<String>, source: Option<std::io::Error>) -> DatapathError {
    DatapathError::PinDir {
        path: path.to_owned(),
        what: what.into(),
        source,
    }
}

fn is_bpffs(path: &Path) -> Result<bool, std::io::Error> {
    use std::os::unix::ffi::OsStrExt as _;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: statfs is plain old data; all-zero is a valid value for the kernel to fill in.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a live, writable statfs.
    let rc = unsafe { libc::statfs(c.as_ptr(), &raw mut st) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // f_type is a signed word on this libc; the magic is compared by its low 32 bits.
    let magic = u64::from_ne_bytes(st.f_type.to_ne_bytes()) & 0xffff_ffff;
    Ok(magic == BPF_FS_MAGIC)
}

/// An exclusive `flock` on a file in `/run`, held while bpffs is checked and mounted.
struct MountLock {
    _file: std::fs::File,
}

impl MountLock {
    const PATH: &str = "/run/fleetmesh-bpffs.lock";

    fn take() -> Result<Self, DatapathError> {
        use std::os::fd::AsRawFd as _;
        let path = Path::new(Self::PATH);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|e| pin_dir_error(path, "opening the bpffs mount lock", Some(e)))?;
        // SAFETY: flock on a descriptor we own; it blocks until the lock is ours (released when the file closes).
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if rc != 0 {
            return Err(pin_dir_error(
                path,
                "locking the bpffs mount lock",
                Some(std::io::Error::last_os_error()),
            ));
        }
        Ok(Self { _file: file })
    }
}

/// Makes sure `dir` exists on a bpffs: mounts bpffs at [`BPFFS_ROOT`] first when `dir` lies below it and nothing is
/// mounted there (a bare host or container), then creates `dir`.
///
/// # Errors
///
/// When mounting or creating fails, or `dir` ends up on another file system (pins need bpffs).
pub fn prepare_pin_dir(dir: &Path) -> Result<(), DatapathError> {
    let root = Path::new(BPFFS_ROOT);
    // Agents of one host (the lab runs several) may start at once: one mounts, the others see it mounted. Two
    // mounts stacked on each other would hide the first one's pins.
    let _lock = if dir.starts_with(root) {
        Some(MountLock::take()?)
    } else {
        None
    };
    if dir.starts_with(root) && !is_bpffs(root).unwrap_or(false) {
        std::fs::create_dir_all(root)
            .map_err(|e| pin_dir_error(root, "creating the bpffs mount point", Some(e)))?;
        let (src, target, fstype) = (c"bpf", c"/sys/fs/bpf", c"bpf");
        // SAFETY: NUL-terminated constant strings; no mount data.
        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                target.as_ptr(),
                fstype.as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            return Err(pin_dir_error(
                root,
                "mounting bpffs",
                Some(std::io::Error::last_os_error()),
            ));
        }
        info!(path = BPFFS_ROOT, "mounted bpffs");
    }
    std::fs::create_dir_all(dir).map_err(|e| pin_dir_error(dir, "creating", Some(e)))?;
    match is_bpffs(dir) {
        Ok(true) => Ok(()),
        Ok(false) => Err(pin_dir_error(dir, "not on a bpffs (mount -t bpf bpf DIR)", None)),
        Err(e) => Err(pin_dir_error(dir, "statfs", Some(e))),
    }
}

/// Removes a pin directory made by [`Datapath::load_pinned`]: its links detach once no process holds them and its
/// maps go once no program uses them. Absent is fine.
///
/// # Errors
///
/// When the kernel refuses a removal.
pub fn remove_pins(dir: &Path) -> Result<(), DatapathError> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(pin_dir_error(dir, "removing", Some(e))),
        _ => Ok(()),
    }
}

/// Whether a pinned map's kernel definition is the one the object declares; the difference otherwise.
fn map_mismatch(have: &MapInfo, want: &aya_obj::Map) -> Option<String> {
    let have_type = have.map_type().map_or(u32::MAX, |t| t as u32);
    let pairs = [
        ("type", have_type, want.map_type()),
        ("key size", have.key_size(), want.key_size()),
        ("value size", have.value_size(), want.value_size()),
        ("max entries", have.max_entries(), want.max_entries()),
        ("flags", have.map_flags(), want.map_flags()),
    ];
    let diffs: Vec<String> = pairs
        .iter()
        .filter(|(_, h, w)| h != w)
        .map(|(what, h, w)| format!("{what} {h} (pinned) != {w} (this build)"))
        .collect();
    (!diffs.is_empty()).then(|| diffs.join(", "))
}

/// Removes the pins in `maps_dir` that this build cannot reuse; reports which maps are reused or created.
fn check_pinned_maps(maps_dir: &Path, adoption: &mut Adoption) -> Result<(), DatapathError> {
    let obj = aya_obj::Object::parse(OBJECT).map_err(|e| DatapathError::Load(Box::new(e.into())))?;
    for name in SHARED_MAPS {
        let path = maps_dir.join(name);
        if std::fs::symlink_metadata(&path).is_err() {
            adoption.maps_created.push((name, None));
            continue;
        }
        let want = obj.maps.get(name).ok_or(DatapathError::BadMap {
            map: name,
            source: None,
        })?;
        let mismatch = match MapInfo::from_pin(&path) {
            Ok(have) => map_mismatch(&have, want),
            Err(e) => Some(format!("unreadable pin: {e}")),
        };
        match mismatch {
            None => adoption.maps_reused.push(name),
            Some(why) => {
                warn!(map = name, pin = %path.display(), reason = %why,
                    "pinned map does not match this build: removing it, the map starts empty");
                std::fs::remove_file(&path)
                    .map_err(|e| pin_dir_error(&path, "removing a stale map pin", Some(e)))?;
                adoption.maps_created.push((name, Some(why)));
            }
        }
    }
    Ok(())
}

/// Removes the map pins of other ABI versions under `dir`.
fn remove_other_abis(dir: &Path, keep: &str) -> Result<(), DatapathError> {
    let entries = std::fs::read_dir(dir).map_err(|e| pin_dir_error(dir, "reading", Some(e)))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("maps-v") && name != keep {
            warn!(pins = %entry.path().display(), "maps of another map ABI version: removing them (a flush)");
            std::fs::remove_dir_all(entry.path())
                .map_err(|e| pin_dir_error(&entry.path(), "removing", Some(e)))?;
        }
    }
    Ok(())
}

/// Replaces the program of the pinned tcx link at `path` with `prog` (`BPF_LINK_UPDATE`, atomic) and returns the
/// link.
fn adopt_link(prog: &mut SchedClassifier, path: &Path) -> Result<FdLink, String> {
    let pinned = PinnedLink::from_pin(path).map_err(|e| format!("opening: {e}"))?;
    let link =
        SchedClassifierLink::try_from(FdLink::from(pinned)).map_err(|e| format!("not a tcx link: {e}"))?;
    let id = prog
        .attach_to_link(link)
        .map_err(|e| format!("replacing its program: {}", error_chain(&e)))?;
    let link = prog.take_link(id).map_err(|e| format!("{e}"))?;
    FdLink::try_from(link).map_err(|e| format!("{e}"))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn link_pin_name(program: &str, ifname: &str) -> String {
    format!("{program}@{ifname}")
}

/// The tc hook a program of ours runs on: `to_pod` on egress (into the pod), the others on ingress.
fn attach_type(program: &str) -> TcAttachType {
    if program == programs::TO_POD {
        TcAttachType::Egress
    } else {
        TcAttachType::Ingress
    }
}

/// The programs the agent loads and attaches.
const PROGRAMS: [&str; 3] = [programs::FROM_POD, programs::FROM_OVERLAY, programs::TO_POD];

impl Datapath {
    /// Loads the eBPF object and both programs into the kernel. Nothing is attached and the maps are empty; nothing
    /// outlives the returned value.
    ///
    /// # Errors
    ///
    /// When the object does not parse, a map cannot be created, or the verifier rejects a program.
    pub fn load() -> Result<Self, DatapathError> {
        Self::load_with(None)
    }

    /// Loads the datapath pinned under `dir` (see the module docs), adopting what an earlier agent left there: the
    /// maps with their contents, and the tc links, whose programs are replaced in place by this build's. `dir`
    /// is created (and bpffs mounted, see [`prepare_pin_dir`]) when needed. What was adopted is in
    /// [`Datapath::adoption`].
    ///
    /// # Errors
    ///
    /// As [`Datapath::load`], and when the pin directory cannot be prepared or a pin cannot be removed.
    pub fn load_pinned(dir: &Path) -> Result<Self, DatapathError> {
        prepare_pin_dir(dir)?;
        let mut dp = Self::load_with(Some(dir))?;
        dp.adopt_links()?;
        let a = &dp.adoption;
        info!(
            pins = %dir.display(),
            maps_reused = a.maps_reused.len(),
            maps_created = a.maps_created.len(),
            links_adopted = a.links_adopted.len(),
            links_removed = a.links_removed.len(),
            "datapath loaded pinned"
        );
        Ok(dp)
    }

    fn load_with(pins: Option<&Path>) -> Result<Self, DatapathError> {
        let mut adoption = Adoption::default();
        let mut loader = EbpfLoader::new();
        if let Some(dir) = pins {
            let version = format!("maps-v{MAP_ABI}");
            remove_other_abis(dir, &version)?;
            let maps_dir = dir.join(version);
            std::fs::create_dir_all(&maps_dir).map_err(|e| pin_dir_error(&maps_dir, "creating", Some(e)))?;
            check_pinned_maps(&maps_dir, &mut adoption)?;
            for name in SHARED_MAPS {
                loader.map_pin_path(name, maps_dir.join(name));
            }
        }
        let mut ebpf = loader
            .load(OBJECT)
            .map_err(|e| DatapathError::Load(Box::new(e)))?;
        for program in PROGRAMS {
            classifier(&mut ebpf, program)?
                .load()
                .map_err(|source| DatapathError::LoadProgram {
                    program,
                    source: Box::new(source),
                })?;
        }
        let mut dp = Self {
            ipcache: take_map(&mut ebpf, maps::IPCACHE_V4)?,
            endpoints: Table::take(&mut ebpf, maps::ENDPOINTS_V4)?,
            services: Table::take(&mut ebpf, maps::SERVICES_V4)?,
            slots: Table::take(&mut ebpf, maps::SERVICE_SLOTS)?,
            backends: Table::take(&mut ebpf, maps::BACKENDS_V4)?,
            rev_nat: Table::take(&mut ebpf, maps::REVNAT_V4)?,
            conntrack: Table::take(&mut ebpf, maps::CT_V4)?,
            backend_stats_id: match ebpf.map(maps::LB_BACKEND_STATS) {
                Some(aya::maps::Map::PerCpuLruHashMap(data)) => data
                    .info()
                    .map_err(|source| DatapathError::BadMap {
                        map: maps::LB_BACKEND_STATS,
                        source: Some(Box::new(source)),
                    })?
                    .id(),
                _ => {
                    return Err(DatapathError::BadMap {
                        map: maps::LB_BACKEND_STATS,
                        source: None,
                    });
                }
            },
            backend_stats: take_map(&mut ebpf, maps::LB_BACKEND_STATS)?,
            policy: Table::take(&mut ebpf, maps::POLICY)?,
            tunnel_peers: Table::take(&mut ebpf, maps::TUNNEL_PEERS)?,
            wireguard_keys: std::sync::Arc::default(),
            policy_cidrs: take_map(&mut ebpf, maps::POLICY_CIDRS)?,
            programmed_policy_cidrs: BTreeMap::new(),
            flow_events: Some(take_map(&mut ebpf, maps::FLOW_EVENTS)?),
            policy_tables: BTreeMap::new(),
            standby_tables: BTreeMap::new(),
            next_policy_id: 1,
            node_config: take_map(&mut ebpf, maps::NODE_CONFIG)?,
            counters_id: match ebpf.map(maps::COUNTERS) {
                Some(aya::maps::Map::PerCpuArray(data)) => data
                    .info()
                    .map_err(|source| DatapathError::BadMap {
                        map: maps::COUNTERS,
                        source: Some(Box::new(source)),
                    })?
                    .id(),
                _ => {
                    return Err(DatapathError::BadMap {
                        map: maps::COUNTERS,
                        source: None,
                    });
                }
            },
            counters: take_map(&mut ebpf, maps::COUNTERS)?,
            ebpf,
            overlay: None,
            endpoint_links: BTreeMap::new(),
            endpoint_ifindex: BTreeMap::new(),
            pins: pins.map(Path::to_owned),
            adoption,
        };
        dp.index_policy_tables()?;
        dp.programmed_policy_cidrs = dp.read_policy_cidrs()?;
        Ok(dp)
    }

    /// The pin directory, when the datapath is pinned.
    #[must_use]
    pub fn pin_dir(&self) -> Option<&Path> {
        self.pins.as_deref()
    }

    /// What loading took over from an earlier agent (empty for [`Datapath::load`]).
    #[must_use]
    pub const fn adoption(&self) -> &Adoption {
        &self.adoption
    }

    fn links_dir(&self) -> Option<PathBuf> {
        self.pins.as_ref().map(|d| d.join("links"))
    }

    /// Takes over the pinned links: each gets this build's program in place (no gap); defunct ones are removed.
    fn adopt_links(&mut self) -> Result<(), DatapathError> {
        let Some(dir) = self.links_dir() else {
            return Ok(());
        };
        std::fs::create_dir_all(&dir).map_err(|e| pin_dir_error(&dir, "creating", Some(e)))?;
        let mut pins: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map_err(|e| pin_dir_error(&dir, "reading", Some(e)))?
            .flatten()
            .map(|e| e.path())
            .collect();
        pins.sort();
        for path in pins {
            let file = path
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default();
            let parsed = file.split_once('@').and_then(|(p, ifname)| {
                PROGRAMS
                    .into_iter()
                    .find(|known| *known == p)
                    .map(|p| (p, ifname.to_owned()))
            });
            let result = match &parsed {
                None => Err("not a link pin of this agent".to_owned()),
                Some((programs::FROM_OVERLAY, _)) if self.overlay.is_some() => {
                    Err("a second overlay link".to_owned())
                }
                Some((program, _)) => adopt_link(classifier(&mut self.ebpf, program)?, &path),
            };
            match (result, parsed) {
                (Ok(link), Some((program, ifname))) => {
                    let att = Attachment::Pinned {
                        _link: link,
                        pin: path.clone(),
                    };
                    if program == programs::FROM_OVERLAY {
                        self.overlay = Some((ifname, att));
                    } else {
                        self.endpoint_links.insert((program, ifname), att);
                    }
                    self.adoption.links_adopted.push(file);
                }
                (result, _) => {
                    let why = result.err().unwrap_or_default();
                    warn!(pin = %path.display(), reason = %why, "removing a link pin that cannot be adopted");
                    if let Err(e) = std::fs::remove_file(&path)
                        && e.kind() != std::io::ErrorKind::NotFound
                    {
                        return Err(pin_dir_error(&path, "removing a stale link pin", Some(e)));
                    }
                    self.adoption.links_removed.push((file, why));
                }
            }
        }
        Ok(())
    }

    /// Attaches `program` to its tc hook ([`attach_type`]) of `ifname`: owned by the program, or pinned (tcx) when
    /// the datapath is.
    fn attach_new(&mut self, program: &'static str, ifname: &str) -> Result<Attachment, DatapathError> {
        let links_dir = self.links_dir();
        let prog = classifier(&mut self.ebpf, program)?;
        let attach_error = |source| DatapathError::Attach {
            program,
            hook: if attach_type(program) == TcAttachType::Egress {
                "egress"
            } else {
                "ingress"
            },
            ifname: ifname.to_owned(),
            source: Box::new(source),
        };
        let Some(links_dir) = links_dir else {
            return prog
                .attach(ifname, attach_type(program))
                .map(Attachment::Owned)
                .map_err(attach_error);
        };
        let id = prog
            .attach_with_options(
                ifname,
                attach_type(program),
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
            .map_err(attach_error)?;
        let path = links_dir.join(link_pin_name(program, ifname));
        let pin_error = |source: Box<dyn std::error::Error + Send + Sync>| DatapathError::PinLink {
            program,
            ifname: ifname.to_owned(),
            path: path.clone(),
            source,
        };
        // A pin left by a defunct link of an earlier interface of this name.
        if let Err(e) = std::fs::remove_file(&path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            return Err(pin_error(Box::new(e)));
        }
        let link = prog.take_link(id).map_err(attach_error)?;
        let link = FdLink::try_from(link).map_err(|e| pin_error(Box::new(e)))?;
        let pinned = link.pin(&path).map_err(|e| pin_error(Box::new(e)))?;
        Ok(Attachment::Pinned {
            _link: FdLink::from(pinned),
            pin: path,
        })
    }

    /// Detaches one attachment of `program`.
    fn detach_attachment(
        &mut self,
        program: &'static str,
        ifname: String,
        att: Attachment,
    ) -> Result<(), DatapathError> {
        match att {
            Attachment::Owned(id) => {
                classifier(&mut self.ebpf, program)?
                    .detach(id)
                    .map_err(|source| DatapathError::Detach {
                        program,
                        ifname,
                        source: Box::new(source),
                    })
            }
            Attachment::Pinned { _link: link, pin } => {
                // Without its pin, closing our descriptor releases the link, which detaches it.
                let removed = std::fs::remove_file(&pin);
                drop(link);
                match removed {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        Err(pin_dir_error(&pin, "removing a link pin", Some(e)))
                    }
                    _ => Ok(()),
                }
            }
        }
    }

    /// Writes this node's settings (VXLAN ifindex, underlay address, cluster id).
    ///
    /// # Errors
    ///
    /// When the map update fails.
    pub fn set_node_config(&mut self, cfg: NodeConfig) -> Result<(), DatapathError> {
        self.node_config
            .set(0, cfg, 0)
            .map_err(|source| DatapathError::Map {
                map: maps::NODE_CONFIG,
                op: "insert",
                key: "0".to_owned(),
                source: Box::new(source),
            })
    }

    /// This node's settings as the datapath sees them.
    ///
    /// # Errors
    ///
    /// When the map read fails.
    pub fn node_config(&self) -> Result<NodeConfig, DatapathError> {
        self.node_config.get(&0, 0).map_err(|source| DatapathError::Map {
            map: maps::NODE_CONFIG,
            op: "read",
            key: "0".to_owned(),
            source: Box::new(source),
        })
    }

    /// Attaches `from_overlay` to tc ingress (tcx) of the node's VXLAN device. Attaching to the same interface
    /// again is a no-op; attaching to another one moves the program there.
    ///
    /// # Errors
    ///
    /// When the interface does not exist in the calling thread's network namespace or the kernel refuses.
    pub fn attach_overlay(&mut self, ifname: &str) -> Result<(), DatapathError> {
        let program = programs::FROM_OVERLAY;
        if self
            .overlay
            .as_ref()
            .is_some_and(|(attached, _)| attached == ifname)
        {
            return Ok(());
        }
        let link = self.attach_new(program, ifname)?;
        if let Some((old, old_link)) = self.overlay.replace((ifname.to_owned(), link)) {
            self.detach_attachment(program, old, old_link)?;
        }
        Ok(())
    }

    /// Attaches `from_pod` to tc ingress (tcx) of a pod's host-side veth. Idempotent per interface name.
    ///
    /// # Errors
    ///
    /// When the interface does not exist in the calling thread's network namespace or the kernel refuses.
    pub fn attach_endpoint(&mut self, ifname: &str) -> Result<(), DatapathError> {
        self.attach_to_endpoint(programs::FROM_POD, ifname)
    }

    /// Attaches `to_pod` to tc egress (tcx) of a pod's host-side veth: the node's own connections to the pod are
    /// tracked so that its replies pass its egress policy (kubelet probes). The agent attaches it to every pod veth
    /// while the node has policy ([`mesh_common::node_flags::POLICY`]), before any endpoint is enforced.
    /// Idempotent per interface name.
    ///
    /// # Errors
    ///
    /// When the interface does not exist in the calling thread's network namespace or the kernel refuses.
    pub fn attach_host_tracking(&mut self, ifname: &str) -> Result<(), DatapathError> {
        self.attach_to_endpoint(programs::TO_POD, ifname)
    }

    /// Detaches `to_pod` from a pod's veth (the node has no policy any more). Not attached is not an error.
    ///
    /// # Errors
    ///
    /// When the kernel refuses to detach.
    pub fn detach_host_tracking(&mut self, ifname: &str) -> Result<(), DatapathError> {
        self.detach_from_endpoint(programs::TO_POD, ifname)
    }

    fn attach_to_endpoint(&mut self, program: &'static str, ifname: &str) -> Result<(), DatapathError> {
        let key = (program, ifname.to_owned());
        let current = crate::netdev::ifindex(ifname).ok();
        if self.endpoint_links.contains_key(&key) {
            let still_attached = match self.endpoint_ifindex.get(&key) {
                Some(idx) => current == Some(*idx),
                // Adopted: attached to this interface if tcx lists the program on it.
                None => Self::tcx_programs(ifname, attach_type(program))
                    .is_ok_and(|p| p.iter().any(|n| n == program)),
            };
            if still_attached {
                if let Some(idx) = current {
                    self.endpoint_ifindex.insert(key, idx);
                }
                return Ok(());
            }
            // The interface was re-created under the same name: the old link died with the old interface.
            info!(ifname, program, "interface re-created: attaching again");
            if let Some(old) = self.endpoint_links.remove(&key)
                && let Err(e) = self.detach_attachment(program, ifname.to_owned(), old)
            {
                warn!(ifname, program, error = %e, "releasing the link of the old interface");
            }
            self.endpoint_ifindex.remove(&key);
        }
        let link = self.attach_new(program, ifname)?;
        self.endpoint_links.insert(key.clone(), link);
        if let Some(idx) = current {
            self.endpoint_ifindex.insert(key, idx);
        }
        Ok(())
    }

    fn detach_from_endpoint(&mut self, program: &'static str, ifname: &str) -> Result<(), DatapathError> {
        let key = (program, ifname.to_owned());
        self.endpoint_ifindex.remove(&key);
        let Some(link) = self.endpoint_links.remove(&key) else {
            return Ok(());
        };
        self.detach_attachment(program, ifname.to_owned(), link)
    }

    /// Detaches `from_pod` (and `to_pod`, if attached) from a pod's veth. Not attached (or already gone with its
    /// pod) is not an error.
    ///
    /// # Errors
    ///
    /// When the kernel refuses to detach.
    pub fn detach_endpoint(&mut self, ifname: &str) -> Result<(), DatapathError> {
        let host = self.detach_from_endpoint(programs::TO_POD, ifname);
        self.detach_from_endpoint(programs::FROM_POD, ifname)?;
        host
    }

    /// Interfaces `from_pod` is attached to, sorted.
    #[must_use]
    pub fn attached_endpoints(&self) -> Vec<String> {
        self.links_of(programs::FROM_POD)
    }

    /// Interfaces `to_pod` is attached to, sorted.
    #[must_use]
    pub fn host_tracking_endpoints(&self) -> Vec<String> {
        self.links_of(programs::TO_POD)
    }

    fn links_of(&self, program: &str) -> Vec<String> {
        self.endpoint_links
            .keys()
            .filter(|(p, _)| *p == program)
            .map(|(_, ifname)| ifname.clone())
            .collect()
    }

    /// Interface `from_overlay` is attached to, if any.
    #[must_use]
    pub fn attached_overlay(&self) -> Option<&str> {
        self.overlay.as_ref().map(|(ifname, _)| ifname.as_str())
    }

    /// Names of the programs attached (through tcx) to tc ingress of `ifname` in the calling thread's network
    /// namespace, by any process, in run order. Useful to check what is really attached.
    ///
    /// # Errors
    ///
    /// When the interface does not exist or the kernel refuses the query.
    pub fn tcx_ingress_programs(ifname: &str) -> Result<Vec<String>, DatapathError> {
        Self::tcx_programs(ifname, TcAttachType::Ingress)
    }

    /// Names of the programs attached (through tcx) to tc egress of `ifname`, as
    /// [`Datapath::tcx_ingress_programs`].
    ///
    /// # Errors
    ///
    /// When the interface does not exist or the kernel refuses the query.
    pub fn tcx_egress_programs(ifname: &str) -> Result<Vec<String>, DatapathError> {
        Self::tcx_programs(ifname, TcAttachType::Egress)
    }

    fn tcx_programs(ifname: &str, hook: TcAttachType) -> Result<Vec<String>, DatapathError> {
        let (_revision, infos) =
            SchedClassifier::query_tcx(ifname, hook).map_err(|source| DatapathError::Query {
                ifname: ifname.to_owned(),
                source: Box::new(source),
            })?;
        Ok(infos
            .iter()
            .map(|info| info.name_as_str().unwrap_or("<unnamed>").to_owned())
            .collect())
    }

    /// Adds or replaces a local pod: its interface and MACs as given, and its identity unless `ep.identity` is 0
    /// (not known to the caller: a pod already in the map keeps the identity it has). The policy fields of `ep`
    /// (`policy_id`, `policy_flags`, `ingress_plens`, `egress_plens`) are ignored: a pod already in the map keeps
    /// the policy [`Datapath::replace_endpoint_policy`] last gave it, a new pod starts without policy. So the
    /// endpoint reconcile never wipes identity or policy, whatever order it and the policy updates run in. (To
    /// tell whether an entry needs writing, compare `ifindex`, `pod_mac`, `host_mac` and a known identity only.)
    ///
    /// # Errors
    ///
    /// When the map update fails (for example because the map is full).
    pub fn upsert_endpoint(&mut self, ip: Ipv4Addr, ep: LocalEndpoint) -> Result<(), DatapathError> {
        let current = self.endpoints.get(ip.octets())?.unwrap_or_default();
        let ep = LocalEndpoint {
            identity: if ep.identity == 0 {
                current.identity
            } else {
                ep.identity
            },
            policy_id: current.policy_id,
            policy_flags: current.policy_flags,
            ingress_plens: current.ingress_plens,
            egress_plens: current.egress_plens,
            ..ep
        };
        self.endpoints.upsert(ip.octets(), ep)
    }

    /// Removes a local pod, and its policy table; an absent one is not an error.
    ///
    /// # Errors
    ///
    /// When the kernel refuses the removal for another reason.
    pub fn remove_endpoint(&mut self, ip: Ipv4Addr) -> Result<(), DatapathError> {
        let current = self.endpoints.get(ip.octets())?;
        self.endpoints.remove(ip.octets())?;
        if let Some(standby) = self.standby_tables.remove(&ip) {
            self.delete_policy_table(standby)?;
        }
        match current {
            Some(ep) if ep.policy_id != 0 => self.delete_policy_table(ep.policy_id),
            _ => Ok(()),
        }
    }

    /// One local pod's entry.
    ///
    /// # Errors
    ///
    /// When reading the map fails.
    pub fn endpoint(&self, ip: Ipv4Addr) -> Result<Option<LocalEndpoint>, DatapathError> {
        self.endpoints.get(ip.octets())
    }

    /// All local pods, sorted by address.
    ///
    /// # Errors
    ///
    /// When reading the map fails.
    pub fn endpoints(&self) -> Result<Vec<(Ipv4Addr, LocalEndpoint)>, DatapathError> {
        Ok(self
            .endpoints
            .entries()?
            .into_iter()
            .map(|(k, v)| (Ipv4Addr::from(k), v))
            .collect())
    }

    /// Adds or replaces a service frontend (VIP, port, protocol).
    ///
    /// # Errors
    ///
    /// When the map update fails (for example because the map is full).
    pub fn upsert_service(&mut self, key: ServiceKeyV4, e: ServiceEntry) -> Result<(), DatapathError> {
        self.services.upsert(key, e)
    }

    /// Removes a service frontend; an absent one is not an error. Established flows keep their backends.
    ///
    /// # Errors
    ///
    /// When the kernel refuses the removal for another reason.
    pub fn remove_service(&mut self, key: ServiceKeyV4) -> Result<(), DatapathError> {
        self.services.remove(key)
    }

    /// All service frontends, sorted by VIP, port and protocol.
    ///
    /// # Errors
    ///
    /// When reading the map fails.
    pub fn services(&self) -> Result<Vec<(ServiceKeyV4, ServiceEntry)>, DatapathError> {
        self.services.entries()
    }

    /// Points a backend slot of a service at a backend id.
    ///
    /// # Errors
    ///
    /// When the map update fails (for example because the map is full).
    pub fn upsert_slot(&mut self, key: SlotKey, backend_id: u32) -> Result<(), DatapathError> {
        self.slots.upsert(key, backend_id)
    }

    /// Inserts or replaces many backend slots with few system calls.
    ///
    /// # Errors
    ///
    /// When the kernel refuses an update (the slots before it are written).
    pub fn upsert_slots(&mut self, entries: &[(SlotKey, u32)]) -> Result<(), DatapathError> {
        self.slots.upsert_batch(entries)
    }

    /// Removes many backend slots with few system calls; absent ones are not an error.
    ///
    /// # Errors
    ///
    /// When the kernel refuses a removal for another reason.
    pub fn remove_slots(&mut self, keys: &[SlotKey]) -> Result<(), DatapathError> {
        self.slots.remove_batch(keys)
    }

    /// Removes a backend slot; an absent one is not an error.
    ///
    /// # Errors
    ///
    /// When the kernel refuses the removal for another reason.
    pub fn remove_slot(&mut self, key: SlotKey) -> Result<(), DatapathError> {
        self.slots.remove(key)
    }

    /// All backend slots, sorted by service id and slot.
    ///
    /// # Errors
    ///
    /// When reading the map fails.
    pub fn slots(&self) -> Result<Vec<(SlotKey, u32)>, DatapathError> {
        self.slots.entries()
    }

    /// Adds or replaces a backend.
    ///
    /// # Errors
    ///
    /// When the map update fails (for example because the map is full).
    pub fn upsert_backend(&mut self, id: u32, b: BackendV4) -> Result<(), DatapathError> {
        self.backends.upsert(id, b)
    }

    /// Inserts or replaces many backends with few system calls.
    ///
    /// # Errors
    ///
    /// When the kernel refuses an update (the backends before it are written).
    pub fn upsert_backends(&mut self, entries: &[(u32, BackendV4)]) -> Result<(), DatapathError> {
        self.backends.upsert_batch(entries)
    }

    /// Removes a backend; an absent one is not an error. Its established flows go on (conntrack holds the
    /// backend's address); new flows only pick it while a slot still names it, and then are dropped.
    ///
    /// # Errors
    ///
    /// When the kernel refuses the removal for another reason.
    pub fn remove_backend(&mut self, id: u32) -> Result<(), DatapathError> {
        self.backends.remove(id)
    }

    /// All backends, sorted by id.
    ///
    /// # Errors
    ///
    /// When reading the map fails.
    pub fn backends(&self) -> Result<Vec<(u32, BackendV4)>, DatapathError> {
        self.backends.entries()
    }

    /// Adds or replaces the reverse translation of a frontend.
    ///
    /// # Errors
    ///
    /// When the map update fails (for example because the map is full).
    pub fn upsert_revnat(&mut self, id: u32, r: RevNatV4) -> Result<(), DatapathError> {
        self.rev_nat.upsert(id, r)
    }

    /// Removes a reverse translation; an absent one is not an error. Replies of the frontend's flows are no
    /// longer translated afterwards.
    ///
    /// # Errors
    ///
    /// When the kernel refuses the removal for another reason.
    pub fn remove_revnat(&mut self, id: u32) -> Result<(), DatapathError> {
        self.rev_nat.remove(id)
    }

    /// All reverse translations, sorted by id.
    ///
    /// # Errors
    ///
    /// When reading the map fails.
    pub fn revnats(&self) -> Result<Vec<(u32, RevNatV4)>, DatapathError> {
        self.rev_nat.entries()
    }

    /// The conntrack entries: of load-balanced flows (SERVICE entries first, then REPLY entries) and of flows a
    /// policy allowed (POLICY entries, value unused), each sorted by tuple. The map changes under the dump: a busy
    /// node may return a slightly inconsistent snapshot.
    ///
    /// # Errors
    ///
    /// When reading the map fails.
    pub fn conntrack(&self) -> Result<Vec<(CtKeyV4, CtEntryV4)>, DatapathError> {
        self.conntrack.entries()
    }

    /// Adds or replaces an ipcache prefix (host bits are cleared first).
    ///
    /// # Errors
    ///
    /// When the map update fails (for example because the map is full).
    pub fn upsert_ipcache(&mut self, prefix: Ipv4Net, e: IpcacheEntry) -> Result<(), DatapathError> {
        self.ipcache
            .insert(&lpm_key(prefix), e, 0)
            .map_err(|source| DatapathError::Map {
                map: maps::IPCACHE_V4,
                op: "insert",
                key: prefix.trunc().to_string(),
                source: Box::new(source),
            })
    }

    /// Removes an ipcache prefix (exact match, host bits cleared); an absent one is not an error.
    ///
    /// # Errors
    ///
    /// When the kernel refuses the removal for another reason.
    pub fn remove_ipcache(&mut self, prefix: Ipv4Net) -> Result<(), DatapathError> {
        match self.ipcache.remove(&lpm_key(prefix)) {
            Err(source) if !is_absent(&source) => Err(DatapathError::Map {
                map: maps::IPCACHE_V4,
                op: "remove",
                key: prefix.trunc().to_string(),
                source: Box::new(source),
            }),
            _ => Ok(()),
        }
    }

    /// All ipcache prefixes, sorted.
    ///
    /// # Errors
    ///
    /// When reading the map fails or it holds an impossible prefix length.
    pub fn ipcache(&self) -> Result<Vec<(Ipv4Net, IpcacheEntry)>, DatapathError> {
        let read_error = |source| DatapathError::Map {
            map: maps::IPCACHE_V4,
            op: "read",
            key: "entries".to_owned(),
            source: Box::new(source),
        };
        let mut all = Vec::new();
        for entry in self.ipcache.iter() {
            let (key, value) = entry.map_err(read_error)?;
            let len = u8::try_from(key.prefix_len()).unwrap_or(u8::MAX);
            let net = Ipv4Net::new(Ipv4Addr::from(key.data()), len).map_err(|_| {
                read_error(MapError::InvalidKeySize {
                    size: key.prefix_len() as usize,
                    expected: 32,
                })
            })?;
            all.push((net, value));
        }
        all.sort_by_key(|(net, _)| *net);
        Ok(all)
    }

    /// Per-backend flow statistics, summed over CPUs, by backend id.
    ///
    /// # Errors
    ///
    /// When reading the map fails.
    pub fn backend_stats(&self) -> Result<BTreeMap<u32, BackendStats>, DatapathError> {
        read_backend_stats(&self.backend_stats)
    }

    /// A reader of the per-backend statistics that other threads may use (the map opened again by its id).
    ///
    /// # Errors
    ///
    /// When the map cannot be opened again by its id.
    pub fn backend_stats_reader(&self) -> Result<BackendStatsReader, DatapathError> {
        let bad = |source: MapError| DatapathError::BadMap {
            map: maps::LB_BACKEND_STATS,
            source: Some(Box::new(source)),
        };
        let data = MapData::from_id(self.backend_stats_id).map_err(bad)?;
        let map = PerCpuHashMap::try_from(aya::maps::Map::PerCpuLruHashMap(data)).map_err(bad)?;
        Ok(BackendStatsReader(map))
    }

    /// Every counter, summed over CPUs, in [`Counter::ALL`] order.
    ///
    /// # Errors
    ///
    /// When reading the map fails.
    pub fn counters(&self) -> Result<Vec<(Counter, u64)>, DatapathError> {
        read_counters(&self.counters)
    }

    /// A second handle on the counters map, for reading them live from another thread (the status API) while
    /// this `Datapath` stays with the reconciler.
    ///
    /// # Errors
    ///
    /// When the map cannot be opened again by its id.
    pub fn counters_reader(&self) -> Result<CountersReader, DatapathError> {
        let bad = |source: MapError| DatapathError::BadMap {
            map: maps::COUNTERS,
            source: Some(Box::new(source)),
        };
        let data = MapData::from_id(self.counters_id).map_err(bad)?;
        let map = PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data)).map_err(bad)?;
        Ok(CountersReader(map))
    }

    /// One counter, summed over CPUs.
    ///
    /// # Errors
    ///
    /// When reading the map fails.
    pub fn counter(&self, counter: Counter) -> Result<u64, DatapathError> {
        Ok(self
            .counters()?
            .into_iter()
            .find(|(c, _)| *c == counter)
            .map_or(0, |(_, n)| n))
    }

    /// Runs `program` once on `packet` with `BPF_PROG_TEST_RUN` (nothing is sent anywhere; helpers such as
    /// redirects only record their target). Maps and counters are the live ones.
    ///
    /// # Errors
    ///
    /// When the program does not exist or the kernel refuses the run (e.g. a packet shorter than Ethernet).
    pub fn test_run(&mut self, program: &str, packet: &[u8]) -> Result<TestRunOutcome, DatapathError> {
        let prog = classifier(&mut self.ebpf, program)?;
        let mut out = vec![0u8; packet.len() + TEST_RUN_HEADROOM];
        let result = prog
            .test_run(TestRunOptions {
                data_in: Some(packet),
                data_out: Some(&mut out),
                repeat: 1,
                ..TestRunOptions::default()
            })
            .map_err(|source| DatapathError::TestRun {
                program: program.to_owned(),
                source: Box::new(source),
            })?;
        out.truncate(usize::try_from(result.data_size_out).unwrap_or(usize::MAX));
        Ok(TestRunOutcome {
            return_value: result.return_value,
            packet: out,
        })
    }
}

/// One allow entry of an endpoint's policy in one direction: what a [`PolicyKey`] says apart from the table and
/// the direction, with the rule id it reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyRule {
    /// Peer identity; [`mesh_common::identity::ANY`] allows every peer (also pending ones).
    pub peer: u32,
    /// [`proto`] number; 0 = any protocol (the port block is then ignored: any port).
    pub proto: u8,
    /// Destination port block, HOST order: the leading `port_plen` bits of `port` are significant (the others are
    /// cleared when the entry is written).
    pub port: u16,
    /// 0 (any port) to 16 (exactly `port`).
    pub port_plen: u8,
    /// Reported in flow events ([`PolicyEntry::rule`]).
    pub rule: u32,
}

impl PolicyRule {
    /// The rule as stored: host bits of the port cleared, any-protocol entries with port block 0/0.
    fn normalized(self) -> Self {
        if self.proto == 0 {
            return Self {
                port: 0,
                port_plen: 0,
                ..self
            };
        }
        let mask = match self.port_plen {
            0 => 0,
            plen => u16::MAX << (16 - u32::from(plen.min(16))),
        };
        Self {
            port: self.port & mask,
            ..self
        }
    }

    fn key(&self, policy_id: u32, dir: u8) -> PolicyKey {
        PolicyKey {
            policy_id,
            identity: self.peer,
            port: self.port,
            proto: self.proto,
            dir,
            port_plen: self.port_plen,
            _pad: [0; 3],
        }
    }

    fn from_entry(key: &PolicyKey, entry: &PolicyEntry) -> Self {
        Self {
            peer: key.identity,
            proto: key.proto,
            port: key.port,
            port_plen: key.port_plen,
            rule: entry.rule,
        }
    }
}

/// An endpoint's compiled policy. A direction that is `None` is not enforced (everything passes); `Some` of an
/// empty list denies everything but replies of allowed flows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointPolicy {
    /// What may reach the endpoint.
    pub ingress: Option<Vec<PolicyRule>>,
    /// What the endpoint may reach.
    pub egress: Option<Vec<PolicyRule>>,
}

/// An endpoint's policy as the datapath holds it (see [`Datapath::endpoint_policy`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstalledPolicy {
    /// The endpoint's identity.
    pub identity: u32,
    /// Its table id in the policy map (0: no table).
    pub policy_id: u32,
    /// The rules, sorted by peer, protocol and port block.
    pub policy: EndpointPolicy,
}

/// Decodes a record of the flow event ring ([`Datapath::take_flow_events`]); `None` when it has another size.
#[must_use]
pub fn parse_flow_event(record: &[u8]) -> Option<FlowEvent> {
    if record.len() != std::mem::size_of::<FlowEvent>() {
        return None;
    }
    // SAFETY: the length is checked; FlowEvent is plain old data (every bit pattern valid); read_unaligned copes
    // with any alignment of the record.
    Some(unsafe { std::ptr::read_unaligned(record.as_ptr().cast::<FlowEvent>()) })
}

/// The entries, flags and plen bitmaps of one direction of a policy, with keys of table `policy_id`.
struct CompiledDirection {
    entries: Vec<(PolicyKey, PolicyEntry)>,
    plens: u32,
}

/// Whether `id` is a node-local CIDR identity (an `ipBlock` peer).
const fn is_cidr_identity(id: u32) -> bool {
    identity::cluster(id) == 0 && id >= identity::FIRST_CIDR
}

fn compile_direction(
    ip: Ipv4Addr,
    policy_id: u32,
    dir: u8,
    rules: &[PolicyRule],
) -> Result<CompiledDirection, DatapathError> {
    let mut seen = std::collections::BTreeSet::new();
    let mut out = CompiledDirection {
        entries: Vec::with_capacity(rules.len()),
        plens: 0,
    };
    for rule in rules {
        if rule.port_plen > 16 {
            return Err(DatapathError::InvalidPolicy {
                ip,
                reason: format!(
                    "port prefix length {} above 16 (rule {})",
                    rule.port_plen, rule.rule
                ),
            });
        }
        let rule = rule.normalized();
        let key = rule.key(policy_id, dir);
        // The first of several rules with the same key is the one reported.
        if seen.insert(key) {
            out.plens |= 1 << rule.port_plen;
            out.entries.push((
                key,
                PolicyEntry {
                    rule: rule.rule,
                    _pad: 0,
                },
            ));
        }
    }
    Ok(out)
}

fn describe_rules(entries: &[(PolicyKey, PolicyEntry)], dir: u8) -> Vec<PolicyRule> {
    let mut rules: Vec<PolicyRule> = entries
        .iter()
        .filter(|(k, _)| k.dir == dir)
        .map(|(k, e)| PolicyRule::from_entry(k, e))
        .collect();
    rules.sort();
    rules
}

/// Tunnel peers, identity policy and flow events.
impl Datapath {
    /// Reads the policy map once (at load): which tables exist, so that new ids never collide with them and old
    /// tables can be deleted without scanning the map. Tables no endpoint names (an agent died between writing a
    /// table and switching to it, or before deleting the old one) are deleted.
    fn index_policy_tables(&mut self) -> Result<(), DatapathError> {
        let mut tables: BTreeMap<u32, Vec<(PolicyKey, PolicyEntry)>> = BTreeMap::new();
        for (key, entry) in self.policy.entries()? {
            tables.entry(key.policy_id).or_default().push((key, entry));
        }
        let named: std::collections::BTreeSet<u32> = self
            .endpoints
            .entries()?
            .into_iter()
            .map(|(_, ep)| ep.policy_id)
            .filter(|id| *id != 0)
            .collect();
        for (id, entries) in tables {
            if named.contains(&id) {
                self.policy_tables.insert(id, entries);
            } else {
                warn!(
                    policy_id = id,
                    entries = entries.len(),
                    "deleting a policy table no endpoint uses"
                );
                for (key, _) in entries {
                    self.policy.remove(key)?;
                }
            }
        }
        for id in named {
            self.policy_tables.entry(id).or_default();
        }
        Ok(())
    }

    /// A policy id no table and no endpoint uses (never 0).
    fn allocate_policy_id(&mut self) -> u32 {
        loop {
            let id = self.next_policy_id;
            self.next_policy_id = match self.next_policy_id.wrapping_add(1) {
                0 => 1,
                next => next,
            };
            if id != 0 && !self.policy_tables.contains_key(&id) {
                return id;
            }
        }
    }

    /// Deletes table `id` from the map and the index. Entries that cannot be deleted stay indexed (the id is not
    /// reused) and the first error is returned.
    fn delete_policy_table(&mut self, id: u32) -> Result<(), DatapathError> {
        let Some(entries) = self.policy_tables.remove(&id) else {
            return Ok(());
        };
        let mut first_error = None;
        let mut left = Vec::new();
        for (key, entry) in entries {
            if let Err(e) = self.policy.remove(key) {
                left.push((key, entry));
                first_error.get_or_insert(e);
            }
        }
        if !left.is_empty() {
            self.policy_tables.insert(id, left);
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Sets a local endpoint's identity and replaces its policy, without a moment in which a mix of old and new
    /// rules (or none) is in force: the new table is written under a policy id not in force, then the endpoint
    /// entry is switched to it (identity, id, enforcement flags and port-prefix bitmaps) with one map update. The
    /// old table is kept as the endpoint's standby: the next change brings it up to date by writing only the
    /// entries that differ from it (a change to a table of 10,000 entries writes a few, not 20,000), then
    /// switches back. Each enforced endpoint thus holds two tables. Nothing is written when the endpoint already
    /// has exactly this identity and policy; without a policy both tables are deleted.
    /// Returns the endpoint's policy id (0 when no direction is enforced).
    ///
    /// Rules: see [`PolicyRule`]; ports are normalised to their block, and of several rules with the same key the
    /// first one is kept (it is the rule flow events report).
    ///
    /// # Errors
    ///
    /// [`DatapathError::UnknownEndpoint`] when `ip` is not in the endpoint map (the endpoint reconcile programs it
    /// first), [`DatapathError::InvalidPolicy`] for a port prefix length above 16, a map error when writing fails
    /// (the old policy then stays in force and nothing of the new one is left behind) or when deleting the old
    /// table fails (the new policy is in force; the leftovers are retried when the endpoint changes again).
    pub fn replace_endpoint_policy(
        &mut self,
        ip: Ipv4Addr,
        identity: u32,
        policy: &EndpointPolicy,
    ) -> Result<u32, DatapathError> {
        let current = self
            .endpoints
            .get(ip.octets())?
            .ok_or(DatapathError::UnknownEndpoint(ip))?;
        let enforced = policy.ingress.is_some() || policy.egress.is_some();
        // Compile under a placeholder id first, to compare with what is installed.
        let compile = |id: u32| -> Result<(Vec<(PolicyKey, PolicyEntry)>, LocalEndpoint), DatapathError> {
            let mut ep = LocalEndpoint {
                identity,
                policy_id: id,
                policy_flags: 0,
                ingress_plens: 0,
                egress_plens: 0,
                ..current
            };
            let mut entries = Vec::new();
            if let Some(rules) = &policy.ingress {
                let c = compile_direction(ip, id, policy_dir::INGRESS, rules)?;
                ep.policy_flags |= policy_flags::INGRESS_ENFORCED;
                ep.ingress_plens = c.plens;
                entries.extend(c.entries);
            }
            if let Some(rules) = &policy.egress {
                let c = compile_direction(ip, id, policy_dir::EGRESS, rules)?;
                ep.policy_flags |= policy_flags::EGRESS_ENFORCED;
                ep.egress_plens = c.plens;
                entries.extend(c.entries);
            }
            if entries.iter().any(|(k, _)| is_cidr_identity(k.identity)) {
                ep.policy_flags |= policy_flags::CIDR_RULES;
            }
            Ok((entries, ep))
        };
        let old_id = current.policy_id;
        let (same_entries, same_ep) = compile(old_id)?;
        let installed = self.policy_tables.get(&old_id);
        let unchanged = same_ep == current
            && (old_id == 0 && !enforced
                || installed.is_some_and(|t| {
                    let mut have = t.clone();
                    let mut want = same_entries.clone();
                    have.sort_by_key(|(k, _)| k.order());
                    want.sort_by_key(|(k, _)| k.order());
                    have == want
                }));
        if unchanged {
            return Ok(old_id);
        }
        if !enforced {
            let ep = compile(0)?.1;
            self.endpoints.upsert(ip.octets(), ep)?;
            if let Some(standby) = self.standby_tables.remove(&ip) {
                self.delete_policy_table(standby)?;
            }
            if old_id != 0 {
                self.delete_policy_table(old_id)?;
            }
            return Ok(0);
        }
        // The new table: the endpoint's standby table brought up to date (only what differs is written), else a
        // fresh one written in full.
        let standby = self
            .standby_tables
            .remove(&ip)
            .filter(|id| *id != old_id && self.policy_tables.contains_key(id));
        let (new_id, ep) = match standby {
            Some(id) => {
                let (entries, ep) = compile(id)?;
                self.update_policy_table(id, entries)?;
                (id, ep)
            }
            None => {
                let id = self.allocate_policy_id();
                let (entries, ep) = compile(id)?;
                // Indexed before writing, so that a failure below can delete what was written.
                self.policy_tables.insert(id, entries.clone());
                for (key, entry) in &entries {
                    if let Err(e) = self.policy.upsert(*key, *entry) {
                        if let Err(cleanup) = self.delete_policy_table(id) {
                            warn!(policy_id = id, error = %cleanup, "removing a half-written policy table");
                        }
                        return Err(e);
                    }
                }
                (id, ep)
            }
        };
        if let Err(e) = self.endpoints.upsert(ip.octets(), ep) {
            // Not in force: it stays the standby (its content is indexed).
            self.standby_tables.insert(ip, new_id);
            return Err(e);
        }
        if old_id != 0 && old_id != new_id {
            self.standby_tables.insert(ip, old_id);
        }
        Ok(new_id)
    }

    /// Makes table `id` (not in force) hold exactly `entries`, writing only the entries that differ. On a failure
    /// the table is deleted.
    fn update_policy_table(
        &mut self,
        id: u32,
        entries: Vec<(PolicyKey, PolicyEntry)>,
    ) -> Result<(), DatapathError> {
        let have: std::collections::HashMap<PolicyKey, PolicyEntry> = self
            .policy_tables
            .get(&id)
            .map(|t| t.iter().copied().collect())
            .unwrap_or_default();
        let want: std::collections::HashMap<PolicyKey, PolicyEntry> = entries.iter().copied().collect();
        // Indexed as the union while it is written, so that a failure can delete everything of it.
        let mut union = entries.clone();
        union.extend(
            have.iter()
                .filter(|(k, _)| !want.contains_key(k))
                .map(|(k, e)| (*k, *e)),
        );
        self.policy_tables.insert(id, union);
        let mut write = || -> Result<(), DatapathError> {
            for (key, entry) in &entries {
                if have.get(key) != Some(entry) {
                    self.policy.upsert(*key, *entry)?;
                }
            }
            for key in have.keys().filter(|k| !want.contains_key(k)) {
                self.policy.remove(*key)?;
            }
            Ok(())
        };
        match write() {
            Ok(()) => {
                self.policy_tables.insert(id, entries);
                Ok(())
            }
            Err(e) => {
                if let Err(cleanup) = self.delete_policy_table(id) {
                    warn!(policy_id = id, error = %cleanup, "removing a half-written policy table");
                }
                Err(e)
            }
        }
    }

    /// A local endpoint's identity and policy as the datapath holds them; `None` when `ip` is not a local endpoint.
    ///
    /// # Errors
    ///
    /// When reading a map fails.
    pub fn endpoint_policy(&self, ip: Ipv4Addr) -> Result<Option<InstalledPolicy>, DatapathError> {
        let Some(ep) = self.endpoints.get(ip.octets())? else {
            return Ok(None);
        };
        // The entries are read back from the kernel, through the keys of the index.
        let mut entries = Vec::new();
        for (key, _) in self
            .policy_tables
            .get(&ep.policy_id)
            .map_or(&[][..], Vec::as_slice)
        {
            if let Some(entry) = self.policy.get(*key)? {
                entries.push((*key, entry));
            }
        }
        let direction = |flag: u32, dir: u8| {
            (ep.policy_id != 0 && ep.policy_flags & flag != 0).then(|| describe_rules(&entries, dir))
        };
        Ok(Some(InstalledPolicy {
            identity: ep.identity,
            policy_id: ep.policy_id,
            policy: EndpointPolicy {
                ingress: direction(policy_flags::INGRESS_ENFORCED, policy_dir::INGRESS),
                egress: direction(policy_flags::EGRESS_ENFORCED, policy_dir::EGRESS),
            },
        }))
    }

    /// Every entry of the policy map, sorted by table, direction, peer, protocol and port block.
    ///
    /// # Errors
    ///
    /// When reading the map fails.
    pub fn policy_entries(&self) -> Result<Vec<(PolicyKey, PolicyEntry)>, DatapathError> {
        self.policy.entries()
    }

    /// Adds or replaces a tunnel peer: the node with underlay address `underlay` belongs to cluster `cluster_id`.
    ///
    /// # Errors
    ///
    /// When the map update fails (for example because the map is full).
    pub fn upsert_tunnel_peer(&mut self, underlay: Ipv4Addr, cluster_id: u16) -> Result<(), DatapathError> {
        // Under the key table's lock: the WireGuard engine changes the same entries' other half.
        let keys = self.wireguard_keys.clone();
        let held = keys.lock();
        let (flags, wireguard_ipv4) = crate::wireguard::KeyTable::bits(&held, underlay);
        self.tunnel_peers.upsert(
            u32::from(underlay),
            TunnelPeer {
                cluster_id,
                flags,
                wireguard_ipv4,
            },
        )
    }

    /// The table of WireGuard keys this datapath's tunnel peer entries carry (for the WireGuard engine).
    #[must_use]
    pub fn wireguard_keys(&self) -> std::sync::Arc<crate::wireguard::KeyTable> {
        self.wireguard_keys.clone()
    }

    /// A second handle of the tunnel peer map, for the WireGuard engine (which writes the WireGuard half of the
    /// entries and the entries of WireGuard addresses, [`mesh_common::tunnel_peer_flags`]).
    ///
    /// # Errors
    ///
    /// When the map's file descriptor cannot be duplicated.
    pub fn tunnel_peer_map(&self) -> Result<HashMap<MapData, u32, TunnelPeer>, DatapathError> {
        use aya::maps::IterableMap as _;
        use std::os::fd::AsFd as _;
        let bad = |source: MapError| DatapathError::BadMap {
            map: maps::TUNNEL_PEERS,
            source: Some(Box::new(source)),
        };
        let fd = self
            .tunnel_peers
            .map
            .map()
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|io_error| {
                bad(MapError::SyscallError(aya::sys::SyscallError {
                    call: "dup",
                    io_error,
                }))
            })?;
        let data = MapData::from_fd(fd).map_err(bad)?;
        HashMap::try_from(aya::maps::Map::HashMap(data)).map_err(bad)
    }

    /// Removes a tunnel peer; an absent one is not an error.
    ///
    /// # Errors
    ///
    /// When the kernel refuses the removal for another reason.
    pub fn remove_tunnel_peer(&mut self, underlay: Ipv4Addr) -> Result<(), DatapathError> {
        self.tunnel_peers.remove(u32::from(underlay))
    }

    /// All tunnel peers (underlay address → cluster id).
    ///
    /// # Errors
    ///
    /// When reading the map fails.
    pub fn tunnel_peers(&self) -> Result<BTreeMap<Ipv4Addr, u16>, DatapathError> {
        // The entries of WireGuard addresses belong to the WireGuard engine, not to the node tables.
        Ok(self
            .tunnel_peers
            .entries()?
            .into_iter()
            .filter(|(_, v)| v.flags & mesh_common::tunnel_peer_flags::VIA_WIREGUARD == 0)
            .map(|(k, v)| (Ipv4Addr::from(k), v.cluster_id))
            .collect())
    }

    /// Makes the policy prefix map (`POLICY_CIDRS`: `ipBlock` prefix → CIDR identity) equal to `want`, writing
    /// only the differences against what it holds.
    ///
    /// # Errors
    ///
    /// The first map error (what came before it is applied and remembered).
    pub fn set_policy_cidrs(&mut self, want: &BTreeMap<Ipv4Net, u32>) -> Result<(), DatapathError> {
        let map_error = |op, prefix: Ipv4Net, source| DatapathError::Map {
            map: maps::POLICY_CIDRS,
            op,
            key: prefix.to_string(),
            source: Box::new(source),
        };
        for (prefix, id) in want {
            let prefix = prefix.trunc();
            if self.programmed_policy_cidrs.get(&prefix) != Some(id) {
                self.policy_cidrs
                    .insert(&lpm_key(prefix), *id, 0)
                    .map_err(|e| map_error("insert", prefix, e))?;
                self.programmed_policy_cidrs.insert(prefix, *id);
            }
        }
        let gone: Vec<Ipv4Net> = self
            .programmed_policy_cidrs
            .keys()
            .filter(|p| !want.contains_key(*p))
            .copied()
            .collect();
        for prefix in gone {
            match self.policy_cidrs.remove(&lpm_key(prefix)) {
                Err(e) if !is_absent(&e) => return Err(map_error("remove", prefix, e)),
                _ => {
                    self.programmed_policy_cidrs.remove(&prefix);
                }
            }
        }
        Ok(())
    }

    /// The policy prefix map as the kernel holds it.
    ///
    /// # Errors
    ///
    /// When reading the map fails.
    pub fn read_policy_cidrs(&self) -> Result<BTreeMap<Ipv4Net, u32>, DatapathError> {
        let mut out = BTreeMap::new();
        for entry in self.policy_cidrs.iter() {
            let (key, id) = entry.map_err(|source| DatapathError::Map {
                map: maps::POLICY_CIDRS,
                op: "read",
                key: "entries".to_owned(),
                source: Box::new(source),
            })?;
            let len = u8::try_from(key.prefix_len()).unwrap_or(u8::MAX);
            if let Ok(net) = Ipv4Net::new(Ipv4Addr::from(key.data()), len) {
                out.insert(net, id);
            }
        }
        Ok(out)
    }

    /// Makes the tunnel peer map equal to `peers`: writes what is new or changed, removes what is not listed.
    ///
    /// # Errors
    ///
    /// The first map error (what came before it is applied).
    pub fn set_tunnel_peers(&mut self, peers: &BTreeMap<Ipv4Addr, u16>) -> Result<(), DatapathError> {
        let current = self.tunnel_peers()?;
        for (addr, cluster_id) in peers {
            if current.get(addr) != Some(cluster_id) {
                self.upsert_tunnel_peer(*addr, *cluster_id)?;
            }
        }
        for addr in current.keys().filter(|a| !peers.contains_key(a)) {
            self.remove_tunnel_peer(*addr)?;
        }
        Ok(())
    }

    /// The flow event ring buffer, for the one reader of this datapath (the first call takes it; later calls
    /// return `None`). Records decode with [`parse_flow_event`]. The ring is pinned with the other maps: events
    /// written while no agent ran are read by the next one.
    pub fn take_flow_events(&mut self) -> Option<RingBuf<MapData>> {
        self.flow_events.take()
    }
}
