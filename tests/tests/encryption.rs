//! Encryption between clusters (docs/encryption.md) on the lab `tests/fixtures/encryption`: east (2 nodes) and
//! west (1 node) run `encryption: cross-cluster`, north (1 node) runs without encryption and publishes no key.
//!
//! - East and west pods reach each other over TCP, UDP and ICMP, and a capture of every frame on the underlay
//!   (AF_PACKET in the underlay namespace) taken meanwhile holds only WireGuard between east's and west's nodes:
//!   no VXLAN, and not the marker the probes carried. Between east's own nodes the same marker is seen in clear
//!   VXLAN (cross-cluster mode leaves the cluster's own traffic alone, and proves the capture would see it).
//! - Strict mode: north has no key, so east's packets for north are dropped and counted
//!   (`drop_no_encryption_key`), none reaches the underlay; north's clear VXLAN to east is refused and counted
//!   (`drop_overlay_unencrypted`).

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use fleetmesh_tests::{Lab, PodInfo, agent_get, agent_socket, eventually, in_netns, pod, pods, tcp_connect};
use serde_json::Value;

const MARKER: &[u8] = b"fleetmesh-wg-marker-7f3a";
const WG_PORT: u16 = 51871;
const VXLAN_PORT: u16 = 4789;
const EAST: [Ipv4Addr; 2] = [Ipv4Addr::new(100, 65, 1, 1), Ipv4Addr::new(100, 65, 1, 2)];
const WEST: Ipv4Addr = Ipv4Addr::new(100, 65, 2, 1);
const NORTH: Ipv4Addr = Ipv4Addr::new(100, 65, 3, 1);

fn topology() -> std::path::PathBuf {
    fleetmesh_tests::workspace_root().join("tests/fixtures/encryption")
}

/// Every frame seen on the interfaces of a namespace, while it runs.
struct Capture {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<Vec<Vec<u8>>>,
}

impl Capture {
    /// Starts capturing in `netns` (an AF_PACKET socket of all protocols on every interface there).
    fn start(netns: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let fd = in_netns(netns, || {
            // SAFETY: plain socket(2); the descriptor is owned right below.
            let fd = unsafe {
                libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                    i32::from((libc::ETH_P_ALL as u16).to_be()),
                )
            };
            assert!(fd >= 0, "AF_PACKET socket: {}", std::io::Error::last_os_error());
            // SAFETY: `fd` is a fresh descriptor nobody else owns.
            unsafe { OwnedFd::from_raw_fd(fd) }
        })
        .expect("underlay namespace");
        let timeout = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        // SAFETY: SO_RCVTIMEO takes a timeval of the given size.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const timeout).cast(),
                u32::try_from(size_of::<libc::timeval>()).expect("small"),
            )
        };
        assert_eq!(rc, 0, "SO_RCVTIMEO");
        let s = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut frames = Vec::new();
            let mut buf = vec![0u8; 65_536];
            while !s.load(Ordering::Relaxed) {
                // SAFETY: recv(2) into a buffer of the given length.
                let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                if let Ok(n) = usize::try_from(n) {
                    frames.push(buf[..n].to_vec());
                }
            }
            frames
        });
        Self { stop, handle }
    }

    fn finish(self) -> Vec<Frame> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .join()
            .expect("capture thread")
            .iter()
            .filter_map(|f| Frame::parse(f))
            .collect()
    }
}

/// An IPv4 frame of the capture.
#[derive(Debug)]
struct Frame {
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    /// UDP ports (0 for other protocols).
    sport: u16,
    dport: u16,
    bytes: Vec<u8>,
}

impl Frame {
    fn parse(f: &[u8]) -> Option<Self> {
        if f.len() < 34 || f[12..14] != [0x08, 0x00] {
            return None;
        }
        let ip = &f[14..];
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        let addr = |o: usize| Ipv4Addr::new(ip[o], ip[o + 1], ip[o + 2], ip[o + 3]);
        let proto = ip[9];
        let (sport, dport) = match ip.get(ihl..ihl + 4) {
            Some(p) if proto == 17 => (u16::from_be_bytes([p[0], p[1]]), u16::from_be_bytes([p[2], p[3]])),
            _ => (0, 0),
        };
        Some(Self {
            src: addr(12),
            dst: addr(16),
            proto,
            sport,
            dport,
            bytes: f.to_vec(),
        })
    }

    fn between(&self, a: &[Ipv4Addr], b: &[Ipv4Addr]) -> bool {
        (a.contains(&self.src) && b.contains(&self.dst)) || (b.contains(&self.src) && a.contains(&self.dst))
    }

    fn has_marker(&self) -> bool {
        self.bytes.windows(MARKER.len()).any(|w| w == MARKER)
    }

    fn describe(&self) -> String {
        format!(
            "{} -> {} proto {} ports {}->{} ({} bytes)",
            self.src,
            self.dst,
            self.proto,
            self.sport,
            self.dport,
            self.bytes.len()
        )
    }
}

/// Sends the marker over UDP (to the echo's UDP port) and waits for the answer.
fn udp_marker(from: &PodInfo, to: &PodInfo) -> anyhow::Result<String> {
    let addr: SocketAddr = format!("{}:5353", to.ip).parse()?;
    in_netns(&from.netns, || -> anyhow::Result<String> {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.set_read_timeout(Some(Duration::from_millis(500)))?;
        let mut buf = [0u8; 512];
        for _ in 0..4 {
            s.send_to(MARKER, addr)?;
            if let Ok((n, _)) = s.recv_from(&mut buf) {
                return Ok(String::from_utf8_lossy(&buf[..n]).trim_end().to_owned());
            }
        }
        anyhow::bail!("no UDP answer from {addr}")
    })?
}

/// Sends the marker as a line on the echo's stream port and reads the answer line.
fn tcp_marker(from: &PodInfo, to: &PodInfo) -> anyhow::Result<String> {
    use std::io::{Read as _, Write as _};
    let mut s = tcp_connect(&from.netns, &to.ip, 9090)?;
    s.write_all(MARKER)?;
    s.write_all(b"\n")?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 512 && s.read(&mut byte)? == 1 && byte[0] != b'\n' {
        line.push(byte[0]);
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

/// ICMP echo whose payload is padded with the marker (`ping -p`); true when answered.
fn ping_marker(from: &PodInfo, to: &PodInfo, count: &str) -> bool {
    let pattern: String = MARKER[..16].iter().map(|b| format!("{b:02x}")).collect();
    std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &from.netns,
            "ping",
            "-c",
            count,
            "-i",
            "0.2",
            "-W1",
            "-n",
            "-q",
        ])
        .args(["-p", &pattern, &to.ip])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A datapath counter of `node`'s agent, from its metrics.
fn counter(status: &Value, node: &str, name: &str) -> u64 {
    let socket = agent_socket(status, node).expect("agent socket");
    let text = agent_get(&socket, "/metrics").unwrap_or_default();
    let needle = format!("counter=\"{name}\"}} ");
    text.lines()
        .filter(|l| {
            l.starts_with("fleetmesh_datapath_packets_total{") && l.contains(&format!("node=\"{node}\""))
        })
        .find_map(|l| l.split_once(&needle).and_then(|(_, v)| v.trim().parse().ok()))
        .unwrap_or(0)
}

fn encryption_status(status: &Value, node: &str) -> Value {
    let socket = agent_socket(status, node).expect("agent socket");
    serde_json::from_str(&agent_get(&socket, "/v1/encryption").unwrap_or_default()).unwrap_or(Value::Null)
}

#[test]
fn cross_cluster_traffic_is_wireguard_only_and_keyless_peers_get_nothing() {
    let lab = Lab::up(&topology(), "encryption").expect("lab up");
    let status = lab.status().expect("status");
    let all = pods(&status);
    let east1 = pod(&all, "east/demo/echo-1");
    let east2 = pod(&all, "east/demo/echo-2");
    let west = pod(&all, "west/demo/echo-1");
    let north = pod(&all, "north/demo/echo-1");
    let ul = format!("{}-ul", lab.prefix().expect("prefix"));

    // The sessions come up (a handshake each way is all it takes).
    assert!(
        eventually(Duration::from_secs(15), || {
            ping_marker(east1, west, "1") && ping_marker(west, east2, "1")
        }),
        "east and west reach each other through WireGuard"
    );

    let capture = Capture::start(&ul);
    for (from, to) in [(east1, west), (east2, west), (west, east1), (west, east2)] {
        assert_eq!(
            tcp_marker(from, to).expect("tcp"),
            to.id,
            "TCP {} -> {}",
            from.id,
            to.id
        );
        assert_eq!(
            udp_marker(from, to).expect("udp"),
            to.id,
            "UDP {} -> {}",
            from.id,
            to.id
        );
        assert!(ping_marker(from, to, "2"), "ICMP {} -> {}", from.id, to.id);
    }
    // Inside east: clear VXLAN, as without encryption.
    assert_eq!(tcp_marker(east1, east2).expect("tcp"), east2.id);
    assert!(ping_marker(east1, east2, "2"));
    // Strict mode, both ways: nothing arrives.
    let (no_key, unencrypted) = (
        counter(&status, "east-node-1", "drop_no_encryption_key"),
        counter(&status, "east-node-1", "drop_overlay_unencrypted"),
    );
    assert!(
        !ping_marker(east1, north, "3"),
        "north has no key: east sends it nothing"
    );
    assert!(udp_marker(east1, north).is_err());
    assert!(
        !ping_marker(north, east1, "3"),
        "east refuses north's clear VXLAN"
    );
    let frames = capture.finish();

    let east_west: Vec<&Frame> = frames.iter().filter(|f| f.between(&EAST, &[WEST])).collect();
    assert!(
        east_west.len() >= 24,
        "the capture saw the traffic: {} frames",
        east_west.len()
    );
    let not_wg: Vec<String> = east_west
        .iter()
        .filter(|f| !(f.proto == 17 && (f.sport == WG_PORT || f.dport == WG_PORT)))
        .map(|f| f.describe())
        .collect();
    assert!(
        not_wg.is_empty(),
        "only WireGuard between east and west: {not_wg:?}"
    );
    assert!(
        !east_west
            .iter()
            .any(|f| f.dport == VXLAN_PORT || f.sport == VXLAN_PORT),
        "no VXLAN between east and west"
    );
    let clear: Vec<String> = east_west
        .iter()
        .filter(|f| f.has_marker())
        .map(|f| f.describe())
        .collect();
    assert!(clear.is_empty(), "the marker never crosses in clear: {clear:?}");
    // Positive control: the same capture sees the marker in east's own VXLAN.
    assert!(
        frames
            .iter()
            .any(|f| f.between(&EAST[..1], &EAST[1..]) && f.dport == VXLAN_PORT && f.has_marker()),
        "east's own traffic is clear VXLAN with the marker (the capture would have caught it)"
    );
    // Nothing of east's went to north.
    let to_north: Vec<String> = frames
        .iter()
        .filter(|f| EAST.contains(&f.src) && f.dst == NORTH && f.dport == VXLAN_PORT)
        .map(|f| f.describe())
        .collect();
    assert!(
        to_north.is_empty(),
        "strict mode: no clear packets for north: {to_north:?}"
    );
    assert!(
        frames
            .iter()
            .any(|f| f.src == NORTH && EAST.contains(&f.dst) && f.dport == VXLAN_PORT),
        "north (unencrypted) did send clear VXLAN to east"
    );
    assert!(
        eventually(Duration::from_secs(5), || {
            counter(&status, "east-node-1", "drop_no_encryption_key") >= no_key + 3
                && counter(&status, "east-node-1", "drop_overlay_unencrypted") > unencrypted
        }),
        "east counted the drops"
    );

    // The status names the sessions and the keyless peer.
    let wg = encryption_status(&status, "east-node-1");
    assert_eq!(wg["mode"], "cross-cluster", "{wg}");
    let peer = &wg["peers"][0];
    assert_eq!(peer["name"], "west/west-node-1", "{wg}");
    assert!(
        peer["handshakeAgeSeconds"].as_f64().is_some_and(|a| a < 180.0),
        "{wg}"
    );
    assert!(
        peer["txBytes"].as_u64().unwrap_or(0) > 0 && peer["rxBytes"].as_u64().unwrap_or(0) > 0,
        "{wg}"
    );
    assert!(
        wg["peersWithoutKey"].as_array().is_some_and(|m| m
            .iter()
            .any(|m| m.as_str().is_some_and(|m| m.contains("north-node-1")))),
        "{wg}"
    );
    // East's own nodes are no WireGuard peers in cross-cluster mode.
    assert_eq!(wg["peers"].as_array().map(Vec::len), Some(1), "{wg}");
    // `meshctl status` shows the same.
    let socket = agent_socket(&status, "east-node-1").expect("agent socket");
    let out = std::process::Command::new(fleetmesh_tests::bin("meshctl"))
        .arg("status")
        .arg("--socket")
        .arg(&socket)
        .output()
        .expect("meshctl status");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Encryption: cross-cluster")
            && text
                .lines()
                .any(|l| l.contains("west/west-node-1") && l.contains("handshake") && l.contains("s ago"))
            && text.contains("no key (dropped): north/north-node-1"),
        "{text}"
    );
}

/// A `wireguard-go` device in a lab namespace, killed and removed on drop.
struct WireguardGo {
    netns: String,
    device: String,
    child: std::process::Child,
}

impl Drop for WireguardGo {
    fn drop(&mut self) {
        // Without its device wireguard-go exits by itself and removes its UAPI socket; a kill would leave the
        // socket file behind.
        let _ = std::process::Command::new("ip")
            .args(["-n", &self.netns, "link", "del", &self.device])
            .output();
        let exited = eventually(Duration::from_secs(3), || {
            matches!(self.child.try_wait(), Ok(Some(_)))
        });
        if !exited {
            let _ = self.child.kill();
            let _ = self.child.wait();
            let _ = std::fs::remove_file(format!("/var/run/wireguard/{}.sock", self.device));
        }
    }
}

fn ip_netns(netns: &str, args: &[&str]) {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", netns])
        .args(args)
        .output()
        .expect("ip netns exec");
    assert!(
        out.status.success(),
        "{args:?} in {netns}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Interop: west-node-1's agent is stopped and `wireguard-go` + `wg` take its place in its namespace, with its key
/// (the test plays the node's operator), its port and its WireGuard address, configured with east-node-1's public
/// key and endpoint. The handshake completes and pings cross it both ways: the agent speaks the real protocol.
#[test]
fn a_wireguard_go_peer_handshakes_and_exchanges_packets_with_a_node() {
    let lab = Lab::up(&topology(), "encryption-interop").expect("lab up");
    let status = lab.status().expect("status");
    let east = encryption_status(&status, "east-node-1");
    let east_key = east["publicKey"].as_str().expect("east's public key").to_owned();
    let west_netns = status["clusters"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|c| c["nodes"].as_array().into_iter().flatten())
        .find(|n| n["name"] == "west-node-1")
        .and_then(|n| n["netns"].as_str())
        .expect("west-node-1's namespace")
        .to_owned();
    lab.run(&["stop", "agent", "west-node-1"])
        .expect("stop west's agent");
    // The agent's persistent device holds the node's WireGuard address: wireguard-go's device takes it over.
    ip_netns(&west_netns, &["ip", "link", "del", "fmwg0"]);
    let key_file = lab.dir.join("run/state/west-node-1/wireguard.key");
    let device = format!("wgfm{}", std::process::id() % 100_000);
    let child = std::process::Command::new("ip")
        .args(["netns", "exec", &west_netns, "wireguard-go", "-f", &device])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("wireguard-go runs (cargo xtask setup installs it)");
    let wg = WireguardGo {
        netns: west_netns.clone(),
        device: device.clone(),
        child,
    };
    assert!(
        eventually(Duration::from_secs(10), || {
            std::process::Command::new("ip")
                .args(["netns", "exec", &wg.netns, "wg", "show", &wg.device])
                .output()
                .is_ok_and(|o| o.status.success())
        }),
        "wireguard-go's device is up"
    );
    ip_netns(
        &west_netns,
        &[
            "wg",
            "set",
            &device,
            "private-key",
            &key_file.display().to_string(),
            "listen-port",
            "51871",
            "peer",
            &east_key,
            "endpoint",
            "100.65.1.1:51871",
            "allowed-ips",
            "10.1.0.0/32",
        ],
    );
    ip_netns(&west_netns, &["ip", "addr", "add", "10.2.0.0/32", "dev", &device]);
    ip_netns(&west_netns, &["ip", "link", "set", &device, "up"]);
    ip_netns(
        &west_netns,
        &["ip", "route", "replace", "10.1.0.0/32", "dev", &device],
    );

    // wireguard-go → agent → east's stack (its WireGuard address answers) → agent → wireguard-go.
    let ping = || {
        std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &west_netns,
                "ping",
                "-c1",
                "-W1",
                "-n",
                "-q",
                "-I",
                "10.2.0.0",
                "10.1.0.0",
            ])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    assert!(
        eventually(Duration::from_secs(15), ping),
        "pings cross the wireguard-go session"
    );
    let handshakes = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &west_netns,
            "wg",
            "show",
            &device,
            "latest-handshakes",
        ])
        .output()
        .expect("wg show");
    let text = String::from_utf8_lossy(&handshakes.stdout);
    let when: u64 = text
        .split_whitespace()
        .nth(1)
        .and_then(|t| t.parse().ok())
        .unwrap_or(0);
    assert!(
        when > 0,
        "wireguard-go completed a handshake with east-node-1: {text}"
    );
    let east = encryption_status(&status, "east-node-1");
    let peer = east["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == "west/west-node-1")
        .cloned()
        .unwrap_or(Value::Null);
    assert!(peer["rxPackets"].as_u64().unwrap_or(0) > 0, "{east}");
    drop(wg);
}
