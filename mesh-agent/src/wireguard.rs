//! Transparent encryption between nodes with WireGuard (docs/encryption.md).
//!
//! The kernel of the machines fleetmesh targets may have no WireGuard (and no ESP), so the agent speaks the
//! protocol itself (`boringtun`'s Noise and transport) over a TUN device, `fmwg0`. VXLAN stays the inner framing:
//! the eBPF programs encapsulate as before, but for a node encryption applies to the VXLAN remote is the node's
//! WireGuard address (the network address of its first pod CIDR: unique in the mesh because pod CIDRs are, and
//! derived, so nothing new needs allocating), which the kernel routes into `fmwg0`; the agent encrypts what it
//! reads there and sends it over UDP to the node's underlay address. What it decrypts it writes back into `fmwg0`,
//! the kernel hands the VXLAN datagram to the VXLAN device, and `from_overlay` runs as before, with the WireGuard
//! address as outer source (a `TUNNEL_PEERS` entry flagged [`tunnel_peer_flags::VIA_WIREGUARD`] gives its cluster).
//!
//! - [`Mode`]: where encryption applies (`--encryption`), handed to the programs as [`node_flags`].
//! - [`load_or_create_key`]: the node's private key, made on the node, kept in the state directory (0600).
//! - [`KeyTable`]: the WireGuard half of the `TUNNEL_PEERS` entries the reconciler writes.
//! - [`Engine`]: the TUN device, the UDP socket, one `Tunn` per peer node, and the map entries they imply.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd as _, FromRawFd as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, Instant};

use aya::maps::{HashMap as BpfHashMap, MapData};
use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use mesh_common::{NodeConfig, TunnelPeer, node_flags, tunnel_peer_flags};
use serde::Serialize;
use tracing::{debug, info, warn};

/// Name of the private key file in the agent's state directory.
pub const KEY_FILE: &str = "wireguard.key";
/// Default name of the agent's WireGuard TUN device.
pub const DEFAULT_DEVICE: &str = "fmwg0";
/// MTU of the TUN device: a whole VXLAN datagram of a pod packet (pod MTU + 50) fits.
pub const DEVICE_MTU: u32 = mesh_common::POD_MTU + 50;
/// Largest datagram the engine reads or writes (an IPv4 packet).
const BUF: usize = 65_536;
/// Receive and send buffer of the WireGuard socket, bytes.
const SOCKET_BUFFER: libc::c_int = 4 << 20;
/// How often the timers of every session run (handshake retries, rekeying, keepalives).
const TIMER_TICK: Duration = Duration::from_millis(250);

/// Where encryption applies (`--encryption`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// No encryption: every node is reached in clear VXLAN.
    Off,
    /// Nodes of other clusters are reached through WireGuard only (the default: that traffic crosses networks
    /// the cluster does not control); nodes of this cluster in clear VXLAN.
    #[default]
    CrossCluster,
    /// Every other node is reached through WireGuard only.
    All,
}

impl Mode {
    /// The [`NodeConfig::flags`] bits of this mode.
    #[must_use]
    pub const fn node_flags(self) -> u16 {
        match self {
            Mode::Off => 0,
            Mode::CrossCluster => node_flags::ENCRYPT_CROSS_CLUSTER,
            Mode::All => node_flags::ENCRYPT_ALL,
        }
    }

    /// Whether the mode encrypts traffic of a node of `me` with a node of `peer` (the programs' rule).
    #[must_use]
    pub fn applies(self, me: u16, peer: u16) -> bool {
        let cfg = NodeConfig {
            cluster_id: me,
            flags: self.node_flags(),
            ..NodeConfig::default()
        };
        mesh_ebpf_rule(&cfg, peer)
    }
}

/// The programs' rule ([`node_flags`]), restated here (mesh-ebpf is no dependency of the agent); the unit test below
/// pins both to the same table.
const fn mesh_ebpf_rule(cfg: &NodeConfig, peer_cluster: u16) -> bool {
    cfg.flags & node_flags::ENCRYPT_ALL != 0
        || (cfg.flags & node_flags::ENCRYPT_CROSS_CLUSTER != 0 && peer_cluster != cfg.cluster_id)
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Off => "off",
            Mode::CrossCluster => "cross-cluster",
            Mode::All => "all",
        })
    }
}

/// What went wrong with the node's key or the WireGuard device.
#[derive(Debug, thiserror::Error)]
pub enum WireguardError {
    #[error("WireGuard key {path}: {message}")]
    Key { path: PathBuf, message: String },
    #[error("WireGuard key {path}: {source}")]
    KeyIo {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("WireGuard device {device}: {source}")]
    Device {
        device: String,
        #[source]
        source: std::io::Error,
    },
    #[error("WireGuard socket on UDP port {port}: {source}")]
    Socket {
        port: u16,
        #[source]
        source: std::io::Error,
    },
    #[error("WireGuard device {device}: {message}")]
    Setup { device: String, message: String },
}

/// The node's private key from `state_dir`/[`KEY_FILE`], made (from the kernel's random numbers, written 0600,
/// never published) when the file does not exist. Returns the key and its public half.
///
/// # Errors
///
/// A key file readable by others than its owner (refused: the key would no longer be private), one that is not a
/// base64 key, or an I/O error, each naming the file.
pub fn load_or_create_key(state_dir: &Path) -> Result<(StaticSecret, PublicKey), WireguardError> {
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let path = state_dir.join(KEY_FILE);
    let io = |source| WireguardError::KeyIo {
        path: path.clone(),
        source,
    };
    let bytes = match std::fs::metadata(&path) {
        Ok(meta) => {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(WireguardError::Key {
                    path,
                    message: format!(
                        "mode {mode:04o} lets others read the private key; make it 0600 (chmod 600) or remove the \
                         file to make a new key"
                    ),
                });
            }
            let text = std::fs::read_to_string(&path).map_err(io)?;
            mesh_model::wireguard::decode_key(&text).map_err(|message| WireguardError::Key {
                path: path.clone(),
                message,
            })?
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(state_dir).map_err(io)?;
            let mut key = [0u8; 32];
            File::open("/dev/urandom")
                .and_then(|mut f| f.read_exact(&mut key))
                .map_err(io)?;
            // Clamped as `wg genkey` does (x25519 clamps again on use).
            key[0] &= 248;
            key[31] = (key[31] & 127) | 64;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(io)?;
            f.write_all(format!("{}\n", mesh_model::wireguard::encode_key(&key)).as_bytes())
                .and_then(|()| f.sync_all())
                .map_err(io)?;
            info!(path = %path.display(), "made this node's WireGuard key");
            key
        }
        Err(e) => return Err(io(e)),
    };
    let secret = StaticSecret::from(bytes);
    let public = PublicKey::from(&secret);
    Ok((secret, public))
}

/// The WireGuard address of a node: the network address of its (first) pod CIDR.
#[must_use]
pub fn wireguard_address(pod_cidr: ipnet::Ipv4Net) -> Ipv4Addr {
    pod_cidr.network()
}

/// Underlay address → WireGuard address of every node whose `TUNNEL_PEERS` entry says "encrypt to it"
/// ([`tunnel_peer_flags::WIREGUARD_KEY`]). The reconciler writes entries with it ([`KeyTable::bits`]) and the
/// engine changes it, each under the lock, so neither undoes the other's half of an entry.
#[derive(Debug, Default)]
pub struct KeyTable {
    inner: Mutex<HashMap<Ipv4Addr, Ipv4Addr>>,
}

impl KeyTable {
    /// Takes the lock.
    pub fn lock(&self) -> MutexGuard<'_, HashMap<Ipv4Addr, Ipv4Addr>> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The flags and WireGuard address (HOST order) of the entry of `underlay`.
    #[must_use]
    pub fn bits(held: &HashMap<Ipv4Addr, Ipv4Addr>, underlay: Ipv4Addr) -> (u16, u32) {
        held.get(&underlay)
            .map_or((0, 0), |wg| (tunnel_peer_flags::WIREGUARD_KEY, u32::from(*wg)))
    }
}

/// A node the engine should have a session with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSpec {
    /// `cluster/node`.
    pub name: String,
    pub cluster_id: u16,
    pub underlay: Ipv4Addr,
    pub port: u16,
    pub public_key: [u8; 32],
    pub wireguard_ipv4: Ipv4Addr,
}

/// The nodes encryption applies to under `mode`, from this cluster's nodes (`local`, for `all`) and the usable peer
/// clusters' node records; nodes without a (valid) key are left out (the programs then drop their packets) and
/// listed in the second value with the reason.
#[must_use]
pub fn desired_peers(
    mode: Mode,
    me: &crate::desired::LocalNode,
    local: &mesh_model::ClusterState,
    remotes: &BTreeMap<String, crate::remote::RemoteCluster>,
) -> (Vec<PeerSpec>, Vec<String>) {
    let mut out = Vec::new();
    let mut missing = Vec::new();
    let mut add = |name: String,
                   cluster_id: u16,
                   underlay: Ipv4Addr,
                   pod_cidr: Option<ipnet::Ipv4Net>,
                   wg: Option<&mesh_model::wireguard::WireguardEndpoint>| {
        if !mode.applies(me.cluster_id, cluster_id) {
            return;
        }
        let Some(wg) = wg else {
            missing.push(format!("{name}: no WireGuard key published"));
            return;
        };
        let Some(pod_cidr) = pod_cidr else {
            missing.push(format!("{name}: no pod CIDR (no WireGuard address)"));
            return;
        };
        match mesh_model::wireguard::decode_key(&wg.public_key) {
            Ok(public_key) => out.push(PeerSpec {
                name,
                cluster_id,
                underlay,
                port: wg.port,
                public_key,
                wireguard_ipv4: wireguard_address(pod_cidr),
            }),
            Err(e) => missing.push(format!("{name}: {e}")),
        }
    };
    for n in local.nodes.values().filter(|n| n.name != me.node) {
        add(
            format!("{}/{}", me.cluster, n.name),
            me.cluster_id,
            n.underlay_ipv4,
            Some(n.pod_cidr),
            n.wireguard.as_ref(),
        );
    }
    for (cluster, rc) in remotes {
        if cluster == &me.cluster || !rc.usable {
            continue;
        }
        let Some(cluster_id) = rc.cluster_id else { continue };
        for rec in rc.nodes.values() {
            add(
                format!("{cluster}/{}", rec.name),
                cluster_id,
                rec.underlay_ipv4,
                rec.pod_cidrs.first().copied(),
                rec.wireguard.as_ref(),
            );
        }
    }
    (out, missing)
}

/// One peer node's session.
struct Peer {
    spec: PeerSpec,
    tunn: Mutex<Tunn>,
    /// Where its datagrams come from and go to (its underlay address and port; follows an authenticated sender's
    /// port, as WireGuard endpoints roam).
    endpoint: Mutex<SocketAddrV4>,
    tx_bytes: AtomicU64,
    rx_bytes: AtomicU64,
    tx_packets: AtomicU64,
    rx_packets: AtomicU64,
    /// Decrypted packets whose source was not the peer's WireGuard address (cryptokey routing), or datagrams that
    /// failed to decrypt.
    rx_errors: AtomicU64,
    /// Packets for the peer the engine could not send (socket errors, no session and its queue full).
    tx_errors: AtomicU64,
}

/// What the status shows of one peer.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PeerStatus {
    pub name: String,
    pub endpoint: String,
    pub public_key: String,
    pub wireguard_ipv4: Ipv4Addr,
    /// Seconds since the last completed handshake; `None` before the first.
    pub handshake_age_seconds: Option<f64>,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub rx_packets: u64,
    pub rx_errors: u64,
    pub tx_errors: u64,
}

/// What the status shows of the engine.
#[derive(Debug, Clone, Serialize, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct EncryptionStatus {
    pub mode: String,
    pub device: String,
    pub port: u16,
    pub public_key: String,
    pub wireguard_ipv4: Option<Ipv4Addr>,
    pub peers: Vec<PeerStatus>,
    /// Nodes encryption applies to that have no usable key (their packets are dropped).
    pub peers_without_key: Vec<String>,
    /// Datagrams from addresses that are no peer, packets in the device for no peer.
    pub unknown_source: u64,
    pub unroutable: u64,
    pub errors: Vec<String>,
}

#[derive(Default)]
struct Peers {
    by_wg: HashMap<Ipv4Addr, Arc<Peer>>,
    by_underlay: HashMap<Ipv4Addr, Arc<Peer>>,
}

/// Settings of the engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub mode: Mode,
    pub device: String,
    pub port: u16,
}

/// The agent's WireGuard: device, socket, sessions, and the map entries of its peers.
pub struct Engine {
    config: EngineConfig,
    secret: StaticSecret,
    public: PublicKey,
    peers: RwLock<Peers>,
    tun: File,
    socket: UdpSocket,
    keys: Arc<KeyTable>,
    map: Mutex<BpfHashMap<MapData, u32, TunnelPeer>>,
    my_address: Mutex<Option<Ipv4Addr>>,
    next_index: AtomicU64,
    unknown_source: AtomicU64,
    unroutable: AtomicU64,
    state: Mutex<(Vec<String>, Vec<String>)>,
    /// The map was scanned for stale WireGuard address entries (first pass).
    scanned: std::sync::atomic::AtomicBool,
}

/// `struct ifreq` as TUNSETIFF takes it.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;

/// Opens (or makes) the persistent TUN device `name`. Persistent: while no agent runs, the device and its routes
/// stay and what the kernel routes into it is dropped, never sent in clear another way.
fn open_tun(name: &str) -> Result<File, WireguardError> {
    let err = |source| WireguardError::Device {
        device: name.to_owned(),
        source,
    };
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "a device name has 1 to 15 characters",
        )));
    }
    // SAFETY: a plain open(2) of a NUL-terminated path; the descriptor is owned by the File below.
    let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes a `struct ifreq`, which `req` is (repr(C), 40 bytes).
    if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &raw mut req) } < 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    // SAFETY: TUNSETPERSIST takes an integer argument.
    if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETPERSIST, 1 as libc::c_ulong) } < 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    Ok(file)
}

impl Engine {
    /// Opens the device and the socket. Nothing is sent before [`Engine::sync`] names peers.
    ///
    /// # Errors
    ///
    /// When the device cannot be opened or set up, or the port is taken.
    pub fn new(
        config: EngineConfig,
        secret: StaticSecret,
        keys: Arc<KeyTable>,
        map: BpfHashMap<MapData, u32, TunnelPeer>,
    ) -> Result<Arc<Self>, WireguardError> {
        let tun = open_tun(&config.device)?;
        let setup = |args: &[&str]| {
            crate::netdev::run_ip(args).map_err(|e| WireguardError::Setup {
                device: config.device.clone(),
                message: format!("{e:#}"),
            })
        };
        // IPv4 only: no IPv6 link-local chatter into the device (it would count as unroutable).
        let _ = std::fs::write(
            format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", config.device),
            "1",
        );
        setup(&[
            "link",
            "set",
            &config.device,
            "mtu",
            &DEVICE_MTU.to_string(),
            "up",
        ])?;
        let socket =
            UdpSocket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, config.port))).map_err(|source| {
                WireguardError::Socket {
                    port: config.port,
                    source,
                }
            })?;
        // Room for a burst (a segmented 64 KiB TCP send is ~45 datagrams): drops here cost TCP far more.
        for opt in [libc::SO_RCVBUFFORCE, libc::SO_SNDBUFFORCE] {
            let size: libc::c_int = SOCKET_BUFFER;
            // SAFETY: setsockopt with an int option value of the size given; failure only leaves the default.
            let _ = unsafe {
                libc::setsockopt(
                    socket.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    (&raw const size).cast(),
                    u32::try_from(size_of::<libc::c_int>()).unwrap_or(4),
                )
            };
        }
        let public = PublicKey::from(&secret);
        info!(device = %config.device, port = config.port, mode = %config.mode,
            public_key = %mesh_model::wireguard::encode_key(public.as_bytes()), "WireGuard engine up");
        Ok(Arc::new(Self {
            config,
            secret,
            public,
            peers: RwLock::default(),
            tun,
            socket,
            keys,
            map: Mutex::new(map),
            my_address: Mutex::new(None),
            next_index: AtomicU64::new(1),
            unknown_source: AtomicU64::new(0),
            unroutable: AtomicU64::new(0),
            state: Mutex::default(),
            scanned: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    /// Starts the threads: device → network, network → device, timers.
    ///
    /// # Errors
    ///
    /// When a thread cannot be started.
    pub fn start(self: &Arc<Self>) -> std::io::Result<()> {
        let e = self.clone();
        std::thread::Builder::new()
            .name("wg-tx".into())
            .spawn(move || e.run_tx())?;
        let e = self.clone();
        std::thread::Builder::new()
            .name("wg-rx".into())
            .spawn(move || e.run_rx())?;
        let e = self.clone();
        std::thread::Builder::new()
            .name("wg-timers".into())
            .spawn(move || e.run_timers())?;
        Ok(())
    }

    fn peers(&self) -> std::sync::RwLockReadGuard<'_, Peers> {
        self.peers.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn send(&self, peer: &Peer, datagram: &[u8]) {
        let to = *peer.endpoint.lock().unwrap_or_else(PoisonError::into_inner);
        if let Err(e) = self.socket.send_to(datagram, to) {
            peer.tx_errors.fetch_add(1, Ordering::Relaxed);
            debug!(peer = %peer.spec.name, error = %e, "sending a WireGuard datagram");
        }
    }

    /// Device → network: each IPv4 packet the kernel routed into the device goes to the peer whose WireGuard
    /// address is its destination.
    fn run_tx(&self) {
        let mut tun = &self.tun;
        let mut packet = vec![0u8; BUF];
        let mut out = vec![0u8; BUF + 32];
        loop {
            let n = match tun.read(&mut packet) {
                Ok(n) => n,
                Err(e) => {
                    warn!(error = %e, "reading the WireGuard device");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            let Some(dst) = ipv4_dst(&packet[..n]) else {
                self.unroutable.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let Some(peer) = self.peers().by_wg.get(&dst).cloned() else {
                self.unroutable.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let result = peer
                .tunn
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .encapsulate(&packet[..n], &mut out);
            match result {
                TunnResult::WriteToNetwork(datagram) => {
                    peer.tx_packets.fetch_add(1, Ordering::Relaxed);
                    peer.tx_bytes.fetch_add(n as u64, Ordering::Relaxed);
                    self.send(&peer, datagram);
                }
                TunnResult::Err(e) => {
                    peer.tx_errors.fetch_add(1, Ordering::Relaxed);
                    debug!(peer = %peer.spec.name, error = ?e, "encapsulating");
                }
                _ => {}
            }
        }
    }

    /// Network → device: datagrams from peers' underlay addresses; what decrypts to a packet from the peer's own
    /// WireGuard address goes into the device.
    fn run_rx(&self) {
        let mut batch = RecvBatch::new(RX_BATCH, BUF);
        let mut out = vec![0u8; BUF];
        loop {
            let n = match batch.recv(&self.socket) {
                Ok(n) => n,
                Err(e) => {
                    warn!(error = %e, "receiving WireGuard datagrams");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            for i in 0..n {
                let (datagram, from) = batch.get(i);
                let Some(peer) = self.peers().by_underlay.get(from.ip()).cloned() else {
                    self.unknown_source.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                self.receive(&peer, from, datagram, &mut out);
            }
        }
    }

    fn receive(&self, peer: &Peer, from: SocketAddrV4, datagram: &[u8], out: &mut [u8]) {
        let mut tunn = peer.tunn.lock().unwrap_or_else(PoisonError::into_inner);
        let mut input: &[u8] = datagram;
        loop {
            match tunn.decapsulate(Some((*from.ip()).into()), input, out) {
                TunnResult::WriteToNetwork(reply) => {
                    *peer.endpoint.lock().unwrap_or_else(PoisonError::into_inner) = from;
                    self.send(peer, reply);
                    // Queued packets follow a completed handshake: ask again with no input until done.
                    input = &[];
                }
                TunnResult::WriteToTunnelV4(packet, src) => {
                    if src == peer.spec.wireguard_ipv4 {
                        *peer.endpoint.lock().unwrap_or_else(PoisonError::into_inner) = from;
                        peer.rx_packets.fetch_add(1, Ordering::Relaxed);
                        peer.rx_bytes.fetch_add(packet.len() as u64, Ordering::Relaxed);
                        if let Err(e) = (&self.tun).write_all(packet) {
                            debug!(error = %e, "writing into the WireGuard device");
                        }
                    } else {
                        peer.rx_errors.fetch_add(1, Ordering::Relaxed);
                    }
                    return;
                }
                TunnResult::WriteToTunnelV6(..) => {
                    peer.rx_errors.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                TunnResult::Done => return,
                TunnResult::Err(e) => {
                    peer.rx_errors.fetch_add(1, Ordering::Relaxed);
                    debug!(peer = %peer.spec.name, error = ?e, "decapsulating");
                    return;
                }
            }
        }
    }

    fn run_timers(&self) {
        let mut out = vec![0u8; BUF];
        loop {
            std::thread::sleep(TIMER_TICK);
            let peers: Vec<Arc<Peer>> = self.peers().by_wg.values().cloned().collect();
            for peer in peers {
                let result = peer
                    .tunn
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .update_timers(&mut out);
                if let TunnResult::WriteToNetwork(datagram) = result {
                    self.send(&peer, datagram);
                }
            }
        }
    }

    /// Makes the sessions, routes and map entries match `want` (from [`desired_peers`]), with this node's own
    /// WireGuard address `me` (its pod CIDR's; `None` while not known: nothing is programmed). A peer's entries
    /// are programmed only while the reconciler has its node as a tunnel peer of the same cluster (the trust rules
    /// decided it may feed the overlay); the route goes in before the map names the address, and out after.
    pub fn sync(&self, me: Option<Ipv4Addr>, want: Vec<PeerSpec>, missing: Vec<String>) {
        let mut errors = Vec::new();
        let Some(me) = me else {
            self.set_state(missing, vec!["this node's pod CIDR is not known yet".into()]);
            return;
        };
        let dev = self.config.device.clone();
        {
            let mut mine = self.my_address.lock().unwrap_or_else(PoisonError::into_inner);
            if *mine != Some(me) {
                let cidr = format!("{me}/32");
                match crate::netdev::run_ip(&["addr", "replace", &cidr, "dev", &dev]) {
                    Ok(()) => *mine = Some(me),
                    Err(e) => errors.push(format!("{e:#}")),
                }
            }
        }
        let map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        let mut map = map;
        let mut next: BTreeMap<Ipv4Addr, PeerSpec> = BTreeMap::new();
        for spec in want {
            // Accepted by the reconciler (its entry exists, flagged as no WireGuard address, same cluster)?
            let trusted = map.get(&u32::from(spec.underlay), 0).ok().is_some_and(|e| {
                e.cluster_id == spec.cluster_id && e.flags & tunnel_peer_flags::VIA_WIREGUARD == 0
            });
            if !trusted {
                continue;
            }
            if next.contains_key(&spec.wireguard_ipv4) || spec.wireguard_ipv4 == me {
                errors.push(format!(
                    "{}: WireGuard address {} is taken; left out",
                    spec.name, spec.wireguard_ipv4
                ));
                continue;
            }
            next.insert(spec.wireguard_ipv4, spec);
        }
        // Remove what is no longer wanted (or changed key/address): map first, then the route.
        let old: Vec<Arc<Peer>> = self.peers().by_wg.values().cloned().collect();
        for peer in &old {
            let keep = next
                .get(&peer.spec.wireguard_ipv4)
                .is_some_and(|s| s.public_key == peer.spec.public_key && s.underlay == peer.spec.underlay);
            if keep {
                if let Some(s) = next.get(&peer.spec.wireguard_ipv4)
                    && s.port != peer.spec.port
                {
                    *peer.endpoint.lock().unwrap_or_else(PoisonError::into_inner) =
                        SocketAddrV4::new(s.underlay, s.port);
                }
                continue;
            }
            let mut keys = self.keys.lock();
            keys.remove(&peer.spec.underlay);
            if let Ok(mut e) = map.get(&u32::from(peer.spec.underlay), 0) {
                e.flags &= !tunnel_peer_flags::WIREGUARD_KEY;
                e.wireguard_ipv4 = 0;
                let _ = map.insert(u32::from(peer.spec.underlay), e, 0);
            }
            drop(keys);
            let _ = map.remove(&u32::from(peer.spec.wireguard_ipv4));
            let cidr = format!("{}/32", peer.spec.wireguard_ipv4);
            let _ = crate::netdev::run_ip(&["route", "del", &cidr, "dev", &dev]);
            let mut peers = self.peers.write().unwrap_or_else(PoisonError::into_inner);
            peers.by_wg.remove(&peer.spec.wireguard_ipv4);
            peers.by_underlay.remove(&peer.spec.underlay);
            info!(peer = %peer.spec.name, "WireGuard peer removed");
        }
        // Add what is new: route, session, then the map.
        for (wg, spec) in next {
            let have = self.peers().by_wg.contains_key(&wg);
            if !have {
                let cidr = format!("{wg}/32");
                let src = me.to_string();
                if let Err(e) = crate::netdev::run_ip(&["route", "replace", &cidr, "dev", &dev, "src", &src])
                {
                    errors.push(format!("{}: {e:#}", spec.name));
                    continue;
                }
                // If the device route is ever gone, the address is unreachable rather than routed elsewhere in
                // clear.
                let _ = crate::netdev::run_ip(&[
                    "route",
                    "replace",
                    "unreachable",
                    &cidr,
                    "metric",
                    "4000000000",
                ]);
                let index =
                    u32::try_from(self.next_index.fetch_add(1, Ordering::Relaxed) & 0x00ff_ffff).unwrap_or(1);
                let mut tunn = Tunn::new(
                    self.secret.clone(),
                    PublicKey::from(spec.public_key),
                    None,
                    None,
                    index,
                    None,
                );
                // Start the handshake now, so the first packets do not wait for it.
                let mut out = vec![0u8; 256];
                let init = match tunn.format_handshake_initiation(&mut out, false) {
                    TunnResult::WriteToNetwork(d) => Some(d.to_vec()),
                    _ => None,
                };
                let peer = Arc::new(Peer {
                    endpoint: Mutex::new(SocketAddrV4::new(spec.underlay, spec.port)),
                    spec: spec.clone(),
                    tunn: Mutex::new(tunn),
                    tx_bytes: AtomicU64::new(0),
                    rx_bytes: AtomicU64::new(0),
                    tx_packets: AtomicU64::new(0),
                    rx_packets: AtomicU64::new(0),
                    rx_errors: AtomicU64::new(0),
                    tx_errors: AtomicU64::new(0),
                });
                {
                    let mut peers = self.peers.write().unwrap_or_else(PoisonError::into_inner);
                    peers.by_wg.insert(wg, peer.clone());
                    peers.by_underlay.insert(spec.underlay, peer.clone());
                }
                if let Some(init) = init {
                    self.send(&peer, &init);
                }
                info!(peer = %spec.name, endpoint = %SocketAddrV4::new(spec.underlay, spec.port), wireguard = %wg, "WireGuard peer added");
            }
            // The address's own entry (what the agent decrypted from the peer), then the peer's entry says "encrypt".
            let via = TunnelPeer {
                cluster_id: spec.cluster_id,
                flags: tunnel_peer_flags::VIA_WIREGUARD,
                wireguard_ipv4: 0,
            };
            if map.get(&u32::from(wg), 0).ok() != Some(via)
                && let Err(e) = map.insert(u32::from(wg), via, 0)
            {
                errors.push(format!("{}: TUNNEL_PEERS {wg}: {e}", spec.name));
                continue;
            }
            let mut keys = self.keys.lock();
            keys.insert(spec.underlay, wg);
            if let Ok(mut e) = map.get(&u32::from(spec.underlay), 0) {
                let want = (tunnel_peer_flags::WIREGUARD_KEY, u32::from(wg));
                if (e.flags & tunnel_peer_flags::WIREGUARD_KEY, e.wireguard_ipv4) != want {
                    e.flags |= tunnel_peer_flags::WIREGUARD_KEY;
                    e.wireguard_ipv4 = u32::from(wg);
                    if let Err(err) = map.insert(u32::from(spec.underlay), e, 0) {
                        errors.push(format!("{}: TUNNEL_PEERS {}: {err}", spec.name, spec.underlay));
                    }
                }
            }
        }
        // Entries of WireGuard addresses no peer has (a previous agent's): one scan of the map at the first pass;
        // later removals are done above.
        if self.scanned.swap(true, Ordering::Relaxed) {
            self.set_state(missing, errors);
            return;
        }
        let wanted: std::collections::HashSet<u32> =
            self.peers().by_wg.keys().map(|a| u32::from(*a)).collect();
        let stale: Vec<u32> = map
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, v)| v.flags & tunnel_peer_flags::VIA_WIREGUARD != 0 && !wanted.contains(k))
            .map(|(k, _)| k)
            .collect();
        for k in stale {
            let _ = map.remove(&k);
        }
        self.set_state(missing, errors);
    }

    fn set_state(&self, missing: Vec<String>, errors: Vec<String>) {
        *self.state.lock().unwrap_or_else(PoisonError::into_inner) = (missing, errors);
    }

    /// What the engine does, per peer.
    #[must_use]
    pub fn status(&self) -> EncryptionStatus {
        let mut peers: Vec<PeerStatus> = self
            .peers()
            .by_wg
            .values()
            .map(|p| {
                let (age, ..) = p.tunn.lock().unwrap_or_else(PoisonError::into_inner).stats();
                PeerStatus {
                    name: p.spec.name.clone(),
                    endpoint: p
                        .endpoint
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .to_string(),
                    public_key: mesh_model::wireguard::encode_key(&p.spec.public_key),
                    wireguard_ipv4: p.spec.wireguard_ipv4,
                    handshake_age_seconds: age.map(|d| d.as_secs_f64()),
                    tx_bytes: p.tx_bytes.load(Ordering::Relaxed),
                    rx_bytes: p.rx_bytes.load(Ordering::Relaxed),
                    tx_packets: p.tx_packets.load(Ordering::Relaxed),
                    rx_packets: p.rx_packets.load(Ordering::Relaxed),
                    rx_errors: p.rx_errors.load(Ordering::Relaxed),
                    tx_errors: p.tx_errors.load(Ordering::Relaxed),
                }
            })
            .collect();
        peers.sort_by(|a, b| a.name.cmp(&b.name));
        let (missing, errors) = self.state.lock().unwrap_or_else(PoisonError::into_inner).clone();
        EncryptionStatus {
            mode: self.config.mode.to_string(),
            device: self.config.device.clone(),
            port: self.config.port,
            public_key: mesh_model::wireguard::encode_key(self.public.as_bytes()),
            wireguard_ipv4: *self.my_address.lock().unwrap_or_else(PoisonError::into_inner),
            peers,
            peers_without_key: missing,
            unknown_source: self.unknown_source.load(Ordering::Relaxed),
            unroutable: self.unroutable.load(Ordering::Relaxed),
            errors,
        }
    }
}

/// Datagrams one `recvmmsg` takes at most (one wake-up of the receive thread).
const RX_BATCH: usize = 16;

/// Buffers for `recvmmsg(2)`: up to `len` datagrams per system call, waiting for the first only. The headers point
/// into the heap buffers of the vectors, which never grow after `new`.
struct RecvBatch {
    bufs: Vec<Vec<u8>>,
    addrs: Vec<libc::sockaddr_in>,
    iovs: Vec<libc::iovec>,
    msgs: Vec<libc::mmsghdr>,
}

impl RecvBatch {
    fn new(len: usize, size: usize) -> Self {
        // SAFETY: sockaddr_in, iovec and mmsghdr are plain C structs for which all-zero is valid.
        let zeroed = || unsafe { std::mem::zeroed::<libc::sockaddr_in>() };
        let mut me = Self {
            bufs: vec![vec![0u8; size]; len],
            addrs: (0..len).map(|_| zeroed()).collect(),
            iovs: Vec::with_capacity(len),
            msgs: Vec::with_capacity(len),
        };
        for b in &mut me.bufs {
            me.iovs.push(libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            });
        }
        for i in 0..len {
            // SAFETY: as above.
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_name = (&raw mut me.addrs[i]).cast();
            m.msg_hdr.msg_namelen = u32::try_from(size_of::<libc::sockaddr_in>()).unwrap_or(16);
            m.msg_hdr.msg_iov = &raw mut me.iovs[i];
            m.msg_hdr.msg_iovlen = 1;
            me.msgs.push(m);
        }
        me
    }

    /// Waits for at least one datagram and takes what else is queued, up to the batch size.
    fn recv(&mut self, socket: &UdpSocket) -> std::io::Result<usize> {
        for m in &mut self.msgs {
            m.msg_hdr.msg_namelen = u32::try_from(size_of::<libc::sockaddr_in>()).unwrap_or(16);
            m.msg_len = 0;
        }
        let len = u32::try_from(self.msgs.len()).unwrap_or(1);
        // SAFETY: every header points at live buffers of this value with their true lengths.
        let n = unsafe {
            libc::recvmmsg(
                socket.as_raw_fd(),
                self.msgs.as_mut_ptr(),
                len,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        usize::try_from(n).map_err(|_| std::io::Error::last_os_error())
    }

    /// Datagram `i` of the last [`RecvBatch::recv`] and its sender.
    fn get(&self, i: usize) -> (&[u8], SocketAddrV4) {
        let len = usize::try_from(self.msgs[i].msg_len)
            .unwrap_or(0)
            .min(self.bufs[i].len());
        let a = &self.addrs[i];
        let from = SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
            u16::from_be(a.sin_port),
        );
        (&self.bufs[i][..len], from)
    }
}

/// The destination of an IPv4 packet.
fn ipv4_dst(packet: &[u8]) -> Option<Ipv4Addr> {
    let header: &[u8; 20] = packet.get(..20)?.try_into().ok()?;
    (header[0] >> 4 == 4).then(|| Ipv4Addr::new(header[16], header[17], header[18], header[19]))
}

/// Runs [`Engine::sync`] every `period` from the agent's inputs (its cluster's snapshot and the peer clusters).
pub fn run_sync(
    engine: &Engine,
    me: &crate::desired::LocalNode,
    snapshots: &tokio::sync::watch::Receiver<mesh_model::source::Snapshot>,
    remotes: &crate::remote::Remotes,
    period: Duration,
) {
    let mut last = Instant::now();
    loop {
        // Read in place (no copy of the cluster state or the peers' records): a pass looks at node records only.
        let (mine, (want, missing)) = {
            let snap = snapshots.borrow();
            let mine = snap
                .state
                .nodes
                .get(&me.node)
                .map(|n| wireguard_address(n.pod_cidr));
            let peers = remotes.read(crate::remote::Scope::Peer, |peers| {
                desired_peers(engine.config.mode, me, &snap.state, peers)
            });
            (mine, peers)
        };
        engine.sync(mine, want, missing);
        let elapsed = last.elapsed();
        std::thread::sleep(period.saturating_sub(elapsed));
        last = Instant::now();
    }
}

/// How often the engine follows the node records and the reconciler's tunnel peers.
pub const SYNC_PERIOD: Duration = Duration::from_millis(500);

/// Puts the mode into the datapath's node config at once (strict mode holds from the agent's first moment, not
/// from its first pass) and, unless the mode is `off`, loads the node's key and starts the engine and its sync.
///
/// # Errors
///
/// A bad key file, a device or port that cannot be set up, or a map error.
pub fn start(
    dp: &mut crate::datapath::Datapath,
    config: &EngineConfig,
    state_dir: &Path,
    me: &crate::desired::LocalNode,
    snapshots: tokio::sync::watch::Receiver<mesh_model::source::Snapshot>,
    remotes: crate::remote::Remotes,
) -> anyhow::Result<Option<Arc<Engine>>> {
    let all = node_flags::ENCRYPT_CROSS_CLUSTER | node_flags::ENCRYPT_ALL;
    let mut cfg = dp.node_config()?;
    if cfg.flags & all != config.mode.node_flags() {
        cfg.flags = (cfg.flags & !all) | config.mode.node_flags();
        dp.set_node_config(cfg)?;
    }
    if config.mode == Mode::Off {
        return Ok(None);
    }
    let (secret, _) = load_or_create_key(state_dir)?;
    let engine = Engine::new(config.clone(), secret, dp.wireguard_keys(), dp.tunnel_peer_map()?)?;
    engine.start()?;
    let (e, me) = (engine.clone(), me.clone());
    std::thread::Builder::new()
        .name("wg-sync".into())
        .spawn(move || run_sync(&e, &me, &snapshots, &remotes, SYNC_PERIOD))?;
    Ok(Some(engine))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_apply_as_the_programs_decide() {
        for (mode, me, peer, want) in [
            (Mode::Off, 1, 2, false),
            (Mode::Off, 1, 1, false),
            (Mode::CrossCluster, 1, 2, true),
            (Mode::CrossCluster, 1, 1, false),
            (Mode::All, 1, 1, true),
            (Mode::All, 1, 2, true),
        ] {
            assert_eq!(mode.applies(me, peer), want, "{mode} {me}->{peer}");
        }
        assert_eq!(Mode::default(), Mode::CrossCluster);
    }

    #[test]
    fn a_key_is_made_once_private_and_read_back() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        let (_, public) = load_or_create_key(&state).expect("made");
        let path = state.join(KEY_FILE);
        let mode = std::fs::metadata(&path).expect("file").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (_, again) = load_or_create_key(&state).expect("read back");
        assert_eq!(public.as_bytes(), again.as_bytes());
    }

    #[test]
    fn a_readable_or_garbled_key_file_is_refused_and_kept() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        load_or_create_key(dir.path()).expect("made");
        let path = dir.path().join(KEY_FILE);
        let before = std::fs::read(&path).expect("read");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = load_or_create_key(dir.path()).err().expect("refused").to_string();
        assert!(err.contains("0644") && err.contains("chmod 600"), "{err}");
        assert_eq!(
            std::fs::read(&path).expect("read"),
            before,
            "the key is never replaced"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        std::fs::write(&path, "garbage").expect("write");
        let err = load_or_create_key(dir.path()).err().expect("refused").to_string();
        assert!(err.contains(KEY_FILE) && err.contains("not base64"), "{err}");
    }

    #[test]
    fn the_wireguard_address_is_the_pod_cidr_network() {
        assert_eq!(
            wireguard_address("10.2.3.0/24".parse().expect("cidr")),
            Ipv4Addr::new(10, 2, 3, 0)
        );
    }

    #[test]
    fn only_packets_with_an_ipv4_header_have_a_destination() {
        let mut p = [0u8; 20];
        p[0] = 0x45;
        p[16..20].copy_from_slice(&[10, 2, 0, 0]);
        assert_eq!(ipv4_dst(&p), Some(Ipv4Addr::new(10, 2, 0, 0)));
        assert_eq!(ipv4_dst(&p[..19]), None);
        p[0] = 0x60;
        assert_eq!(ipv4_dst(&p), None);
    }

    fn record(name: &str, cidr: &str, key: Option<&str>) -> mesh_kvstore::NodeRecord {
        mesh_kvstore::NodeRecord {
            name: name.into(),
            cluster: "west".into(),
            cluster_id: 2,
            underlay_ipv4: Ipv4Addr::new(100, 65, 2, 1),
            pod_cidrs: vec![cidr.parse().expect("cidr")],
            wireguard: key.map(|k| mesh_model::wireguard::WireguardEndpoint {
                public_key: k.into(),
                port: 51871,
            }),
        }
    }

    #[test]
    fn desired_peers_follow_the_mode_and_report_nodes_without_keys() {
        let me = crate::desired::LocalNode {
            node: "east-node-1".into(),
            cluster: "east".into(),
            cluster_id: 1,
            labels: BTreeMap::new(),
        };
        let key = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=";
        let mut rc = crate::remote::RemoteCluster::new("west");
        rc.usable = true;
        rc.cluster_id = Some(2);
        rc.nodes.insert(
            "west-node-1".into(),
            Arc::new(record("west-node-1", "10.2.0.0/24", Some(key))),
        );
        rc.nodes.insert(
            "west-node-2".into(),
            Arc::new(record("west-node-2", "10.2.1.0/24", None)),
        );
        rc.nodes.insert(
            "west-node-3".into(),
            Arc::new(record("west-node-3", "10.2.2.0/24", Some("AAAA"))),
        );
        let remotes = BTreeMap::from([("west".to_owned(), rc)]);
        let local = mesh_model::ClusterState::default();
        let (want, missing) = desired_peers(Mode::CrossCluster, &me, &local, &remotes);
        assert_eq!(want.len(), 1);
        assert_eq!(want[0].name, "west/west-node-1");
        assert_eq!(want[0].wireguard_ipv4, Ipv4Addr::new(10, 2, 0, 0));
        assert_eq!(missing.len(), 2, "{missing:?}");
        assert!(
            missing
                .iter()
                .any(|m| m.contains("west-node-2") && m.contains("no WireGuard key"))
        );
        assert!(
            missing
                .iter()
                .any(|m| m.contains("west-node-3") && m.contains("32"))
        );
        let (want, missing) = desired_peers(Mode::Off, &me, &local, &remotes);
        assert!(want.is_empty() && missing.is_empty());
    }
}
