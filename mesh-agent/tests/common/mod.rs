//! Helpers shared by the datapath integration tests: crafted-frame constants, a loaded datapath with a few pods,
//! and the network namespace lab (namespaces removed by a guard on drop, also when a test fails).
use std::{
    fs::File,
    net::Ipv4Addr,
    os::fd::AsRawFd as _,
    process::Command,
    time::{Duration, Instant},
};

use mesh_agent::{datapath::Datapath, netdev};
use mesh_common::{
    Counter, FAMILY_IPV4, IpcacheEntry, LocalEndpoint, NodeConfig, ipcache_flags, pod_mac_for_ipv4,
};

pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;

pub const FROM_POD: &str = mesh_common::programs::FROM_POD;
pub const FROM_OVERLAY: &str = mesh_common::programs::FROM_OVERLAY;

pub const HOST_MAC: [u8; 6] = [0xee, 0xee, 0xee, 0, 0, 6];
pub const POD_A: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 2);
pub const POD_B: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 3);
pub const REMOTE_POD: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 7);
pub const REMOTE_NODE: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 3);

pub fn endpoint(ip: Ipv4Addr, ifindex: u32, identity: u32) -> LocalEndpoint {
    LocalEndpoint {
        ifindex,
        identity,
        pod_mac: pod_mac_for_ipv4(ip.octets()),
        host_mac: HOST_MAC,
        ..Default::default()
    }
}

/// A datapath with pods A and B local, 10.1.0.0/24 local, 10.2.0.0/16 behind `REMOTE_NODE`; nothing attached.
pub fn loaded() -> Datapath {
    let mut dp = Datapath::load().expect("load datapath");
    dp.upsert_endpoint(POD_A, endpoint(POD_A, 1, 0x0100_0042))
        .unwrap();
    dp.upsert_endpoint(POD_B, endpoint(POD_B, 1, 7)).unwrap();
    dp.upsert_ipcache(
        "10.1.0.0/24".parse().unwrap(),
        IpcacheEntry {
            flags: ipcache_flags::LOCAL_NODE,
            family: FAMILY_IPV4,
            ..Default::default()
        },
    )
    .unwrap();
    dp.upsert_ipcache(
        "10.2.0.0/16".parse().unwrap(),
        IpcacheEntry {
            tunnel_endpoint: u32::from(REMOTE_NODE),
            cluster_id: 2,
            family: FAMILY_IPV4,
            ..Default::default()
        },
    )
    .unwrap();
    dp
}

/// Counters that are not zero, for compact assertions.
pub fn nonzero(dp: &Datapath) -> Vec<(Counter, u64)> {
    dp.counters()
        .unwrap()
        .into_iter()
        .filter(|(_, n)| *n != 0)
        .collect()
}

/// Runs `ip` with `args`; panics with its stderr when it fails.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `f` on a fresh thread that has entered network namespace `ns` (the calling thread is not affected).
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            // SAFETY: setns on a valid namespace fd; it only changes this (fresh, scoped) thread's namespace.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("netns thread panicked")
    })
}

/// Network namespaces created by one test; all are deleted on drop (their interfaces go with them).
pub struct Lab {
    prefix: String,
    namespaces: Vec<String>,
}

impl Lab {
    pub fn new(test: &str) -> Self {
        Self {
            prefix: format!("fmt{}-{test}", std::process::id()),
            namespaces: Vec::new(),
        }
    }

    /// Creates namespace `<prefix>-<name>` with `lo` up and returns its name.
    pub fn netns(&mut self, name: &str) -> String {
        let ns = format!("{}-{name}", self.prefix);
        ip(&["netns", "add", &ns]);
        self.namespaces.push(ns.clone());
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        ns
    }

    /// Creates pod namespace `name` with `eth0` (/32 `addr`, pod MAC, MTU 1450) whose peer `host_if` lives in
    /// `node`, wired like the agent's CNI does it. Returns the endpoint to program, as seen from `node`.
    pub fn pod(&mut self, node: &str, name: &str, host_if: &str, addr: Ipv4Addr) -> (String, LocalEndpoint) {
        let pod = self.netns(name);
        ip(&[
            "-n", node, "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", &pod,
        ]);
        let pod_mac = pod_mac_for_ipv4(addr.octets());
        let mac_str = mac_string(pod_mac);
        let mtu = mesh_common::POD_MTU.to_string();
        ip(&[
            "-n", &pod, "link", "set", "eth0", "address", &mac_str, "mtu", &mtu, "up",
        ]);
        ip(&["-n", &pod, "addr", "add", &format!("{addr}/32"), "dev", "eth0"]);
        ip(&["-n", node, "link", "set", host_if, "up"]);
        ip(&[
            "-n",
            &pod,
            "route",
            "add",
            "169.254.1.1",
            "dev",
            "eth0",
            "scope",
            "link",
        ]);
        ip(&["-n", &pod, "route", "add", "default", "via", "169.254.1.1"]);
        let (ifindex, host_mac) = in_netns(node, || {
            (
                netdev::ifindex(host_if).expect("host veth ifindex"),
                netdev::mac(host_if).expect("host veth MAC"),
            )
        });
        let gw_mac = mac_string(host_mac);
        ip(&[
            "-n",
            &pod,
            "neigh",
            "add",
            "169.254.1.1",
            "lladdr",
            &gw_mac,
            "dev",
            "eth0",
            "nud",
            "permanent",
        ]);
        (
            pod,
            LocalEndpoint {
                ifindex,
                identity: 0,
                pod_mac,
                host_mac,
                ..Default::default()
            },
        )
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in self.namespaces.iter().rev() {
            let out = Command::new("ip").args(["netns", "del", ns]).output();
            if !matches!(&out, Ok(o) if o.status.success()) {
                eprintln!("warning: could not delete netns {ns}: {out:?}");
            }
        }
    }
}

pub fn mac_string(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

pub fn ping(from_ns: &str, to: Ipv4Addr) -> Result<(), String> {
    let out = Command::new("ip")
        .args(["netns", "exec", from_ns, "ping", "-c1", "-W2", &to.to_string()])
        .output()
        .map_err(|e| format!("run ping: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ping {to} from {from_ns}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Opens a TCP connection from namespace `client_ns` to a listener in `server_ns` and echoes a message through it.
/// Polls `f` until it succeeds or `timeout` passes; returns the last error.
pub fn eventually(timeout: Duration, mut f: impl FnMut() -> Result<(), String>) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => {}
        }
    }
}
/// Two node namespaces joined by an underlay veth (`ul0`, 192.168.251.0/24), each with an external-mode VXLAN
/// device `fm_vxlan`.
pub struct Nodes {
    /// First node's namespace.
    pub n1: String,
    /// Second node's namespace.
    pub n2: String,
    /// First node's underlay address.
    pub u1: Ipv4Addr,
    /// Second node's underlay address.
    pub u2: Ipv4Addr,
}

impl Lab {
    /// Creates namespaces `n1` and `n2` wired as [`Nodes`].
    pub fn two_nodes(&mut self) -> Nodes {
        let n1 = self.netns("n1");
        let n2 = self.netns("n2");
        let (u1, u2) = (Ipv4Addr::new(192, 168, 251, 1), Ipv4Addr::new(192, 168, 251, 2));
        ip(&[
            "-n", &n1, "link", "add", "ul0", "type", "veth", "peer", "name", "ul0", "netns", &n2,
        ]);
        for (ns, addr) in [(&n1, u1), (&n2, u2)] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", "ul0"]);
            ip(&["-n", ns, "link", "set", "ul0", "up"]);
            ip(&[
                "-n", ns, "link", "add", "fm_vxlan", "type", "vxlan", "external", "dstport", "4789",
            ]);
            ip(&["-n", ns, "link", "set", "fm_vxlan", "up"]);
        }
        Nodes { n1, n2, u1, u2 }
    }
}

/// Loads a datapath in node namespace `ns`: node config (its `fm_vxlan`, `underlay`), `from_overlay` on
/// `fm_vxlan` (attached twice: the second time is a no-op) and `from_pod` on each of `host_ifs`.
pub fn node_datapath(ns: &str, underlay: Ipv4Addr, host_ifs: &[&str]) -> Datapath {
    in_netns(ns, || {
        let mut dp = Datapath::load().expect("load");
        let vxlan_ifindex = netdev::ifindex("fm_vxlan").expect("fm_vxlan ifindex");
        dp.set_node_config(NodeConfig {
            vxlan_ifindex,
            node_ipv4: u32::from(underlay),
            flags: mesh_common::node_flags::POLICY,
            ..Default::default()
        })
        .unwrap();
        dp.attach_overlay("fm_vxlan").expect("attach overlay");
        dp.attach_overlay("fm_vxlan")
            .expect("attach overlay again is a no-op");
        for host_if in host_ifs {
            dp.attach_endpoint(host_if).expect("attach pod veth");
        }
        dp
    })
}

/// Programs a node's ipcache: `local` (its own pod prefix) on this node, `remote` behind `remote_underlay`, which
/// becomes a tunnel peer of cluster 1 (only tunnel peers feed the overlay).
pub fn program_ipcache(dp: &mut Datapath, local: &str, remote: &str, remote_underlay: Ipv4Addr) {
    dp.upsert_tunnel_peer(remote_underlay, 1).unwrap();
    let remote_entry = IpcacheEntry {
        tunnel_endpoint: u32::from(remote_underlay),
        family: FAMILY_IPV4,
        cluster_id: 1,
        ..Default::default()
    };
    let local_entry = IpcacheEntry {
        flags: ipcache_flags::LOCAL_NODE,
        family: FAMILY_IPV4,
        cluster_id: 1,
        ..Default::default()
    };
    dp.upsert_ipcache(local.parse().unwrap(), local_entry).unwrap();
    dp.upsert_ipcache(remote.parse().unwrap(), remote_entry).unwrap();
}
