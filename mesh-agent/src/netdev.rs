//! Network device facts (ifindex, MAC, link kind and peer) of the calling thread's current network namespace.
//!
//! Uses `if_nametoindex` and the `SIOCGIFHWADDR` ioctl on a socket rather than `/sys/class/net`: the agent runs
//! under `nsenter --net=...`, which does not remount `/sys`, so sysfs would still describe the original namespace.
use std::{ffi::CString, io, os::fd::AsRawFd as _};

fn c_name(name: &str) -> io::Result<CString> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "interface name {name:?} must have 1 to {} bytes",
                libc::IFNAMSIZ - 1
            ),
        ));
    }
    CString::new(name).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("interface name {name:?} contains a NUL byte"),
        )
    })
}

fn named(name: &str, what: &str, err: &io::Error) -> io::Error {
    // The kernel answers ENODEV for a missing interface; callers want to match on NotFound.
    let kind = if err.raw_os_error() == Some(libc::ENODEV) {
        io::ErrorKind::NotFound
    } else {
        err.kind()
    };
    io::Error::new(kind, format!("{what} of interface {name:?}: {err}"))
}

/// ifindex of interface `name` in the current network namespace.
///
/// # Errors
///
/// `NotFound` (with the interface name in the message) when there is no such interface.
pub fn ifindex(name: &str) -> io::Result<u32> {
    let c = c_name(name)?;
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if index == 0 {
        return Err(named(name, "ifindex", &io::Error::last_os_error()));
    }
    Ok(index)
}

/// Hardware (MAC) address of interface `name` in the current network namespace. Interfaces without one (such as
/// `lo`) report all zeroes.
///
/// # Errors
///
/// When the interface does not exist or the socket / ioctl fails; the message names the interface.
pub fn mac(name: &str) -> io::Result<[u8; 6]> {
    let c = c_name(name)?;
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(named(
            name,
            "socket for SIOCGIFHWADDR",
            &io::Error::last_os_error(),
        ));
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(c.as_bytes_with_nul()) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: `req` is a valid ifreq with a NUL-terminated name; the kernel writes ifr_hwaddr within it.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFHWADDR, &raw mut req) };
    if rc < 0 {
        return Err(named(
            name,
            "MAC address (SIOCGIFHWADDR)",
            &io::Error::last_os_error(),
        ));
    }
    // SAFETY: after a successful SIOCGIFHWADDR the union holds ifru_hwaddr.
    let data = unsafe { req.ifr_ifru.ifru_hwaddr.sa_data };
    let mut mac = [0u8; 6];
    for (dst, src) in mac.iter_mut().zip(data) {
        *dst = src as u8;
    }
    Ok(mac)
}

/// What the kernel says about an interface, as far as deciding whether it may be a pod's veth
/// ([`check_pod_veth`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkFacts {
    /// `IFLA_INFO_KIND` (`veth`, `vxlan`, `bridge`, ...); `None` for devices without one (physical NICs, `lo`).
    pub kind: Option<String>,
    /// `IFLA_LINK_NETNSID` is reported: the interface's peer (of a veth) lives in another network namespace.
    pub peer_netns: Option<i32>,
    /// `IFLA_MASTER`: the interface is enslaved to a bridge, bond or VRF of this ifindex.
    pub master: Option<u32>,
    /// The interface has an IPv4 address (`SIOCGIFADDR` answers).
    pub has_ipv4: bool,
}

/// Whether an interface with `facts` may be the host side of a pod's veth, the only kind of interface a pod's
/// `fleetmesh.io/host-ifname` annotation may name: a veth whose peer is in another network namespace (the pod's),
/// not enslaved to a bridge (fleetmesh routes pods, it never bridges them) and without an IPv4 address (node
/// interfaces have one; the host side of a pod veth has none).
///
/// # Errors
///
/// The reason, naming `name`, when it may not.
pub fn check_pod_veth(name: &str, facts: &LinkFacts) -> Result<(), String> {
    match facts.kind.as_deref() {
        Some("veth") => {}
        Some(kind) => return Err(format!("interface {name:?} is a {kind} device, not a pod's veth")),
        None => {
            return Err(format!(
                "interface {name:?} is not a veth (a device without a link kind: loopback or hardware)"
            ));
        }
    }
    if facts.peer_netns.is_none() {
        return Err(format!(
            "veth {name:?} has its peer in the node's own network namespace, not in a pod's"
        ));
    }
    if let Some(master) = facts.master {
        return Err(format!(
            "veth {name:?} is enslaved to interface {master} (a bridge port, not a routed pod veth)"
        ));
    }
    if facts.has_ipv4 {
        return Err(format!(
            "interface {name:?} has an IPv4 address (a node interface, not the host side of a pod veth)"
        ));
    }
    Ok(())
}

const NLMSG_HDRLEN: usize = 16;
const IFINFOMSG_LEN: usize = 16;
const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const IFLA_MASTER: u16 = 10;
const IFLA_LINKINFO: u16 = 18;
const IFLA_LINK_NETNSID: u16 = 37;
const IFLA_INFO_KIND: u16 = 1;
/// `NLA_F_NESTED | NLA_F_NET_BYTEORDER`.
const NLA_FLAGS: u16 = 0xc000;

/// The `(type, payload)` of each netlink attribute in `buf` (stops at the first malformed one).
fn attributes(buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut rest = buf;
    std::iter::from_fn(move || {
        let len = usize::from(u16::from_ne_bytes([*rest.first()?, *rest.get(1)?]));
        let kind = u16::from_ne_bytes([*rest.get(2)?, *rest.get(3)?]) & !NLA_FLAGS;
        let payload = rest.get(4..len)?;
        rest = rest.get(len.next_multiple_of(4)..).unwrap_or(&[]);
        Some((kind, payload))
    })
}

/// Parses the answer to an `RTM_GETLINK` request (one `RTM_NEWLINK` message, or an error).
fn parse_link(answer: &[u8]) -> io::Result<LinkFacts> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("netlink answer: {what}"));
    let header = answer
        .get(..NLMSG_HDRLEN)
        .ok_or_else(|| bad("shorter than a header"))?;
    let len = u32::from_ne_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let kind = u16::from_ne_bytes([header[4], header[5]]);
    let message = answer.get(NLMSG_HDRLEN..len).ok_or_else(|| bad("truncated"))?;
    if kind == NLMSG_ERROR {
        let code = message.get(..4).ok_or_else(|| bad("truncated error"))?;
        let code = i32::from_ne_bytes([code[0], code[1], code[2], code[3]]);
        return Err(io::Error::from_raw_os_error(-code));
    }
    if kind != RTM_NEWLINK {
        return Err(bad(&format!("message type {kind}, expected RTM_NEWLINK")));
    }
    let attrs = message
        .get(IFINFOMSG_LEN..)
        .ok_or_else(|| bad("truncated ifinfomsg"))?;
    let mut facts = LinkFacts::default();
    let u32_of = |p: &[u8]| Some(u32::from_ne_bytes(p.get(..4)?.try_into().ok()?));
    for (kind, payload) in attributes(attrs) {
        match kind {
            IFLA_MASTER => facts.master = u32_of(payload).filter(|m| *m != 0),
            IFLA_LINK_NETNSID => facts.peer_netns = u32_of(payload).map(|id| id.cast_signed()),
            IFLA_LINKINFO => {
                for (info, value) in attributes(payload) {
                    if info == IFLA_INFO_KIND {
                        let name = value.split(|b| *b == 0).next().unwrap_or_default();
                        facts.kind = Some(String::from_utf8_lossy(name).into_owned());
                    }
                }
            }
            _ => {}
        }
    }
    Ok(facts)
}

/// Asks the kernel (`RTM_GETLINK`) about interface `ifindex` of the current network namespace.
fn get_link(ifindex: u32) -> io::Result<LinkFacts> {
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let mut request = [0u8; NLMSG_HDRLEN + IFINFOMSG_LEN];
    let len = u32::try_from(request.len()).unwrap_or(u32::MAX);
    request[0..4].copy_from_slice(&len.to_ne_bytes());
    request[4..6].copy_from_slice(&RTM_GETLINK.to_ne_bytes());
    request[6..8].copy_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    request[8..12].copy_from_slice(&1u32.to_ne_bytes());
    // ifinfomsg: family AF_UNSPEC, type 0, then the index.
    request[NLMSG_HDRLEN + 4..NLMSG_HDRLEN + 8].copy_from_slice(&ifindex.cast_signed().to_ne_bytes());
    // SAFETY: the buffer is valid for its length for the duration of the call.
    let sent = unsafe { libc::send(sock.as_raw_fd(), request.as_ptr().cast(), request.len(), 0) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut answer = vec![0u8; 32 * 1024];
    // SAFETY: the buffer is valid and writable for its length for the duration of the call.
    let got = unsafe { libc::recv(sock.as_raw_fd(), answer.as_mut_ptr().cast(), answer.len(), 0) };
    let got = usize::try_from(got).map_err(|_| io::Error::last_os_error())?;
    answer.truncate(got);
    parse_link(&answer)
}

/// Whether interface `name` has an IPv4 address (`SIOCGIFADDR`; `EADDRNOTAVAIL` means none).
fn has_ipv4(name: &str) -> io::Result<bool> {
    let c = c_name(name)?;
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(c.as_bytes_with_nul()) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: `req` is a valid ifreq with a NUL-terminated name; the kernel writes ifr_addr within it.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFADDR, &raw mut req) };
    if rc == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EADDRNOTAVAIL) {
        Ok(false)
    } else {
        Err(err)
    }
}

/// [`LinkFacts`] of interface `name` (index `ifindex`) in the current network namespace.
///
/// # Errors
///
/// When the kernel cannot be asked or does not know the interface; the message names it.
pub fn link_facts(name: &str, ifindex: u32) -> io::Result<LinkFacts> {
    let mut facts = get_link(ifindex).map_err(|e| named(name, "link details (RTM_GETLINK)", &e))?;
    facts.has_ipv4 = has_ipv4(name).map_err(|e| named(name, "IPv4 address (SIOCGIFADDR)", &e))?;
    Ok(facts)
}

/// Name of interface `ifindex` in the current network namespace.
///
/// # Errors
///
/// When there is no such interface.
pub fn ifname(ifindex: u32) -> io::Result<String> {
    let mut buf = [0 as libc::c_char; libc::IFNAMSIZ];
    // SAFETY: `buf` has room for IFNAMSIZ bytes, as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return Err(io::Error::last_os_error());
    }
    let bytes: Vec<u8> = buf.iter().take_while(|c| **c != 0).map(|c| *c as u8).collect();
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// Runs `ip ARGS`; the error says which command failed and what `ip` printed.
///
/// # Errors
/// When `ip` cannot be run or fails.
pub fn run_ip(args: &[&str]) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .with_context(|| format!("running ip {}", args.join(" ")))?;
    anyhow::ensure!(
        out.status.success(),
        "ip {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn veth() -> LinkFacts {
        LinkFacts {
            kind: Some("veth".into()),
            peer_netns: Some(3),
            master: None,
            has_ipv4: false,
        }
    }

    #[test]
    fn only_routed_pod_veths_pass() {
        assert_eq!(check_pod_veth("fm1", &veth()), Ok(()));
        let refused = [
            ("lo", LinkFacts::default(), "not a veth"),
            (
                "fm_vxlan",
                LinkFacts {
                    kind: Some("vxlan".into()),
                    ..LinkFacts::default()
                },
                "vxlan device",
            ),
            (
                "v0",
                LinkFacts {
                    peer_netns: None,
                    ..veth()
                },
                "node's own network namespace",
            ),
            (
                "v1",
                LinkFacts {
                    master: Some(4),
                    ..veth()
                },
                "bridge port",
            ),
            (
                "eth0",
                LinkFacts {
                    has_ipv4: true,
                    ..veth()
                },
                "IPv4 address",
            ),
        ];
        for (name, facts, why) in refused {
            let err = check_pod_veth(name, &facts).unwrap_err();
            assert!(err.contains(why) && err.contains(name), "{name}: {err}");
        }
    }

    /// An `RTM_NEWLINK` message with the given attributes after an ifinfomsg.
    fn newlink(attrs: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut body = vec![0u8; IFINFOMSG_LEN];
        for (kind, payload) in attrs {
            let len = u16::try_from(4 + payload.len()).unwrap();
            body.extend_from_slice(&len.to_ne_bytes());
            body.extend_from_slice(&kind.to_ne_bytes());
            body.extend_from_slice(payload);
            body.resize(body.len().next_multiple_of(4), 0);
        }
        let mut m = Vec::new();
        m.extend_from_slice(&u32::try_from(NLMSG_HDRLEN + body.len()).unwrap().to_ne_bytes());
        m.extend_from_slice(&RTM_NEWLINK.to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend_from_slice(&body);
        m
    }

    fn nested(kind: u16, inner: &[(u16, Vec<u8>)]) -> (u16, Vec<u8>) {
        let mut p = Vec::new();
        for (k, v) in inner {
            p.extend_from_slice(&u16::try_from(4 + v.len()).unwrap().to_ne_bytes());
            p.extend_from_slice(&k.to_ne_bytes());
            p.extend_from_slice(v);
            p.resize(p.len().next_multiple_of(4), 0);
        }
        (kind | 0x8000, p)
    }

    #[test]
    fn parses_kind_peer_namespace_and_master() {
        let m = newlink(&[
            (3, b"fm1\0".to_vec()),
            (IFLA_MASTER, 7u32.to_ne_bytes().to_vec()),
            nested(IFLA_LINKINFO, &[(IFLA_INFO_KIND, b"veth\0".to_vec())]),
            (IFLA_LINK_NETNSID, 2i32.to_ne_bytes().to_vec()),
        ]);
        let facts = parse_link(&m).unwrap();
        assert_eq!(facts.kind.as_deref(), Some("veth"));
        assert_eq!((facts.peer_netns, facts.master), (Some(2), Some(7)));
        assert_eq!(parse_link(&newlink(&[])).unwrap(), LinkFacts::default());
        // Truncated messages and attributes are errors or ignored, never a panic.
        for cut in 0..m.len() {
            let _ = parse_link(&m[..cut]);
        }
        let mut err = vec![0u8; NLMSG_HDRLEN + 4];
        err[0..4].copy_from_slice(&20u32.to_ne_bytes());
        err[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        err[16..20].copy_from_slice(&(-libc::ENODEV).to_ne_bytes());
        assert_eq!(parse_link(&err).unwrap_err().raw_os_error(), Some(libc::ENODEV));
    }

    #[test]
    fn loopback_is_no_pod_veth() {
        let facts = link_facts("lo", 1).unwrap();
        assert_eq!(
            (facts.kind.as_deref(), facts.peer_netns, facts.master),
            (None, None, None)
        );
        assert!(
            check_pod_veth(
                "lo",
                &LinkFacts {
                    has_ipv4: false,
                    ..facts
                }
            )
            .is_err()
        );
        assert_eq!(ifname(1).unwrap(), "lo");
    }

    #[test]
    fn loopback_has_ifindex_one_and_a_zero_mac() {
        assert_eq!(ifindex("lo").unwrap(), 1);
        assert_eq!(mac("lo").unwrap(), [0; 6]);
    }

    #[test]
    fn missing_interface_is_not_found_and_named() {
        let err = ifindex("fm-nonexist0").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(err.to_string().contains("fm-nonexist0"), "{err}");
        let err = mac("fm-nonexist0").unwrap_err();
        assert!(err.to_string().contains("fm-nonexist0"), "{err}");
    }

    #[test]
    fn bad_names_are_rejected_before_any_syscall() {
        assert_eq!(ifindex("").unwrap_err().kind(), io::ErrorKind::InvalidInput);
        assert_eq!(
            ifindex("a-name-much-too-long-for-linux").unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        assert_eq!(mac("bad\0name").unwrap_err().kind(), io::ErrorKind::InvalidInput);
    }
}
