//! Network device facts (ifindex, MAC) of the calling thread's current network namespace.
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

#[cfg(test)]
mod tests {
    use super::*;

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
