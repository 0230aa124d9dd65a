//! The agent's eBPF datapath: loads `mesh-ebpf`, attaches its tc programs and owns its maps.
//!
//! This is the only module of the agent that touches aya. Nothing is pinned: the programs detach and the maps go
//! away when the [`Datapath`] is dropped. Attaching resolves interface names in the calling thread's network
//! namespace; map operations work from any thread.
use std::{collections::BTreeMap, net::Ipv4Addr};

use aya::{
    Ebpf, EbpfError,
    maps::{Array, HashMap, LpmTrie, MapData, MapError, PerCpuArray, lpm_trie::Key},
    programs::{
        ProgramError, SchedClassifier, TcAttachType, TestRun as _, TestRunOptions, tc::SchedClassifierLinkId,
    },
};
use ipnet::Ipv4Net;
use mesh_common::{
    BackendV4, COUNTER_COUNT, Counter, CtEntryV4, CtKeyV4, EndpointKeyV4, IpcacheEntry, LocalEndpoint,
    LpmKeyV4, NodeConfig, RevNatV4, ServiceEntry, ServiceKeyV4, SlotKey, maps, programs, proto,
};

/// The compiled eBPF object, built by `build.rs`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh-ebpf"));

/// Extra room in the output buffer of a test run, for programs that grow the packet.
const TEST_RUN_HEADROOM: usize = 256;

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
    #[error("attaching eBPF program {program} to tc ingress of interface {ifname:?}")]
    Attach {
        /// Program name.
        program: &'static str,
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
    #[error("listing tcx ingress programs of interface {ifname:?}")]
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
    node_config: Array<MapData, NodeConfig>,
    counters: PerCpuArray<MapData, u64>,
    counters_id: u32,
    overlay: Option<(String, SchedClassifierLinkId)>,
    endpoint_links: BTreeMap<String, SchedClassifierLinkId>,
}

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath")
            .field("overlay", &self.overlay.as_ref().map(|(ifname, _)| ifname))
            .field(
                "endpoints_attached",
                &self.endpoint_links.keys().collect::<Vec<_>>(),
            )
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

impl Datapath {
    /// Loads the eBPF object and both programs into the kernel. Nothing is attached and the maps are empty.
    ///
    /// # Errors
    ///
    /// When the object does not parse, a map cannot be created, or the verifier rejects a program.
    pub fn load() -> Result<Self, DatapathError> {
        let mut ebpf = Ebpf::load(OBJECT).map_err(|e| DatapathError::Load(Box::new(e)))?;
        for program in [programs::FROM_POD, programs::FROM_OVERLAY] {
            classifier(&mut ebpf, program)?
                .load()
                .map_err(|source| DatapathError::LoadProgram {
                    program,
                    source: Box::new(source),
                })?;
        }
        Ok(Self {
            ipcache: take_map(&mut ebpf, maps::IPCACHE_V4)?,
            endpoints: Table::take(&mut ebpf, maps::ENDPOINTS_V4)?,
            services: Table::take(&mut ebpf, maps::SERVICES_V4)?,
            slots: Table::take(&mut ebpf, maps::SERVICE_SLOTS)?,
            backends: Table::take(&mut ebpf, maps::BACKENDS_V4)?,
            rev_nat: Table::take(&mut ebpf, maps::REVNAT_V4)?,
            conntrack: Table::take(&mut ebpf, maps::CT_V4)?,
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
        })
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
        let prog = classifier(&mut self.ebpf, program)?;
        let link = prog
            .attach(ifname, TcAttachType::Ingress)
            .map_err(|source| DatapathError::Attach {
                program,
                ifname: ifname.to_owned(),
                source: Box::new(source),
            })?;
        if let Some((old, old_link)) = self.overlay.replace((ifname.to_owned(), link)) {
            prog.detach(old_link).map_err(|source| DatapathError::Detach {
                program,
                ifname: old,
                source: Box::new(source),
            })?;
        }
        Ok(())
    }

    /// Attaches `from_pod` to tc ingress (tcx) of a pod's host-side veth. Idempotent per interface name.
    ///
    /// # Errors
    ///
    /// When the interface does not exist in the calling thread's network namespace or the kernel refuses.
    pub fn attach_endpoint(&mut self, ifname: &str) -> Result<(), DatapathError> {
        let program = programs::FROM_POD;
        if self.endpoint_links.contains_key(ifname) {
            return Ok(());
        }
        let link = classifier(&mut self.ebpf, program)?
            .attach(ifname, TcAttachType::Ingress)
            .map_err(|source| DatapathError::Attach {
                program,
                ifname: ifname.to_owned(),
                source: Box::new(source),
            })?;
        self.endpoint_links.insert(ifname.to_owned(), link);
        Ok(())
    }

    /// Detaches `from_pod` from a pod's veth. Not attached (or already gone with its pod) is not an error.
    ///
    /// # Errors
    ///
    /// When the kernel refuses to detach.
    pub fn detach_endpoint(&mut self, ifname: &str) -> Result<(), DatapathError> {
        let program = programs::FROM_POD;
        let Some(link) = self.endpoint_links.remove(ifname) else {
            return Ok(());
        };
        classifier(&mut self.ebpf, program)?
            .detach(link)
            .map_err(|source| DatapathError::Detach {
                program,
                ifname: ifname.to_owned(),
                source: Box::new(source),
            })
    }

    /// Interfaces `from_pod` is attached to, sorted.
    #[must_use]
    pub fn attached_endpoints(&self) -> Vec<String> {
        self.endpoint_links.keys().cloned().collect()
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
        let (_revision, infos) =
            SchedClassifier::query_tcx(ifname, TcAttachType::Ingress).map_err(|source| {
                DatapathError::Query {
                    ifname: ifname.to_owned(),
                    source: Box::new(source),
                }
            })?;
        Ok(infos
            .iter()
            .map(|info| info.name_as_str().unwrap_or("<unnamed>").to_owned())
            .collect())
    }

    /// Adds or replaces a local pod.
    ///
    /// # Errors
    ///
    /// When the map update fails (for example because the map is full).
    pub fn upsert_endpoint(&mut self, ip: Ipv4Addr, ep: LocalEndpoint) -> Result<(), DatapathError> {
        self.endpoints.upsert(ip.octets(), ep)
    }

    /// Removes a local pod; an absent one is not an error.
    ///
    /// # Errors
    ///
    /// When the kernel refuses the removal for another reason.
    pub fn remove_endpoint(&mut self, ip: Ipv4Addr) -> Result<(), DatapathError> {
        self.endpoints.remove(ip.octets())
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

    /// The conntrack entries of load-balanced flows (SERVICE entries first, then REPLY entries, each sorted by
    /// tuple). The map changes under the dump: a busy node may return a slightly inconsistent snapshot.
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
