//! Network namespaces, links and processes of the lab. Every name the lab makes starts with its prefix, so
//! teardown never touches what it did not make.

use std::fs::File;
use std::os::fd::AsRawFd as _;
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use crate::util;

/// Runs `ip ARGS...`.
pub fn ip(args: &[&str]) -> Result<String> {
    util::run(Command::new("ip").args(args))
}

/// Runs `ip -n NETNS ARGS...`.
pub fn ip_in(netns: &str, args: &[&str]) -> Result<String> {
    util::run(Command::new("ip").arg("-n").arg(netns).args(args))
}

pub fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

/// All network namespaces whose name starts with `prefix`.
pub fn netns_with_prefix(prefix: &str) -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str().map(str::to_owned))
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default()
}

/// A command that runs `program` in network namespace `netns` (nsenter keeps the mount namespace, so bpffs and
/// the lab folder stay visible, unlike `ip netns exec`).
pub fn in_netns_cmd(netns: &str, program: &Path) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net=/run/netns/{netns}")).arg("--").arg(program);
    c
}

/// Runs `f` on a thread that has entered network namespace `netns`.
pub fn in_netns<T: Send>(netns: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
    let path = format!("/run/netns/{netns}");
    let file = File::open(&path).with_context(|| format!("opening {path}"))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on a valid namespace fd only changes this (scoped, short-lived) thread's namespace.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error()).with_context(|| format!("entering {path}"));
            }
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread in {path} panicked"))?
    })
}

/// Starts a daemon detached from our process group, with stdout and stderr appended to `log`.
pub fn spawn_daemon(mut cmd: Command, log: &Path) -> Result<u32> {
    if let Some(d) = log.parent() {
        std::fs::create_dir_all(d)?;
    }
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let err = out.try_clone()?;
    let line = util::cmdline(&cmd);
    let child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting `{line}`"))?;
    Ok(child.id())
}

/// Whether `pid` is alive and its command line mentions `marker` (guards against pid reuse).
pub fn is_ours(pid: u32, marker: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| String::from_utf8_lossy(&c).contains(marker))
        && !is_zombie(pid)
}

/// Whether `pid` has finished exiting: no such process, or a zombie. Unlike [`is_ours`] this does not read the
/// command line, which the kernel empties early in the exit, before the process has closed its files (a port it
/// listened on is only free once this is true).
pub fn has_exited(pid: u32) -> bool {
    is_zombie(pid)
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, r)| r.trim_start().starts_with(['Z', 'X']))
        })
        .unwrap_or(true)
}

fn signal(pid: u32, sig: i32) {
    if let Ok(p) = i32::try_from(pid) {
        // SAFETY: kill(2) with a positive pid that we verified belongs to the lab; no memory involved.
        unsafe {
            libc::kill(p, sig);
        }
    }
}

/// SIGKILL, nothing else (a crash rehearsal).
pub fn kill_now(pid: u32, marker: &str) {
    if is_ours(pid, marker) {
        signal(pid, libc::SIGKILL);
    }
}

/// Stops processes: SIGTERM, then SIGKILL for those still alive after `grace`.
pub fn stop_processes(pids: &[u32], marker: &str, grace: Duration) {
    let ours: Vec<u32> = pids.iter().copied().filter(|p| is_ours(*p, marker)).collect();
    for p in &ours {
        signal(*p, libc::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline && ours.iter().any(|p| is_ours(*p, marker)) {
        std::thread::sleep(Duration::from_millis(20));
    }
    for p in ours.iter().filter(|p| is_ours(**p, marker)) {
        signal(*p, libc::SIGKILL);
    }
}

/// Polls `check` until it returns Ok or `timeout` passes; the error names `what` and the last reason.
pub fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Result<T, String>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    let mut delay = Duration::from_millis(10);
    loop {
        match check() {
            Ok(v) => return Ok(v),
            Err(reason) if Instant::now() >= deadline => {
                bail!("timed out after {timeout:?} waiting for {what}: {reason}")
            }
            Err(_) => {
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_millis(50));
            }
        }
    }
}

/// An exclusive lock on the lab folder, held until dropped.
pub struct LabLock {
    _file: File,
}

impl LabLock {
    pub fn acquire(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join("lock");
        let f = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        // SAFETY: flock on a file descriptor we own; blocks until another lab command finishes.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("locking {}", path.display()));
        }
        Ok(Self { _file: f })
    }
}

/// The last `n` lines of a log file, for error messages.
pub fn log_tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Simple HTTP/1.0 GET over a Unix socket, returning the body of a 200 answer.
pub fn http_get_unix(socket: &Path, path: &str) -> Result<String, String> {
    use std::io::{Read as _, Write as _};
    let mut s =
        std::os::unix::net::UnixStream::connect(socket).map_err(|e| format!("{}: {e}", socket.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))
        .map_err(|e| e.to_string())?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: agent\r\n\r\n").map_err(|e| e.to_string())?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).map_err(|e| e.to_string())?;
    let (head, body) = buf.split_once("\r\n\r\n").ok_or("answer is not HTTP")?;
    if !head.contains(" 200 ") {
        return Err(format!("answer: {}", head.lines().next().unwrap_or_default()));
    }
    Ok(body.to_owned())
}

const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// TCP connect from inside `netns`; returns the line the echo workload sends.
pub fn probe_tcp(netns: &str, ip: std::net::Ipv4Addr, port: u16) -> Result<String> {
    use std::io::Read as _;
    let addr = std::net::SocketAddr::from((ip, port));
    in_netns(netns, || -> Result<String> {
        let mut s = std::net::TcpStream::connect_timeout(&addr, PROBE_TIMEOUT)
            .with_context(|| format!("tcp {addr}"))?;
        s.set_read_timeout(Some(PROBE_TIMEOUT))?;
        let mut line = String::new();
        s.read_to_string(&mut line)
            .with_context(|| format!("tcp read {addr}"))?;
        Ok(line.trim_end().to_owned())
    })?
}

/// One UDP datagram from inside `netns` (one retry); returns the answer.
pub fn probe_udp(netns: &str, ip: std::net::Ipv4Addr, port: u16) -> Result<String> {
    let addr = std::net::SocketAddr::from((ip, port));
    in_netns(netns, || -> Result<String> {
        let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
        s.set_read_timeout(Some(Duration::from_secs(1)))?;
        let mut buf = [0u8; 512];
        for _ in 0..2 {
            s.send_to(b"ping\n", addr)?;
            if let Ok((n, _)) = s.recv_from(&mut buf) {
                return Ok(String::from_utf8_lossy(&buf[..n]).trim_end().to_owned());
            }
        }
        bail!("no UDP answer from {addr}")
    })?
}

/// One ICMP echo from inside `netns`.
pub fn probe_ping(netns: &str, ip: std::net::Ipv4Addr) -> bool {
    Command::new("ip")
        .args([
            "netns",
            "exec",
            netns,
            "ping",
            "-c1",
            "-W2",
            "-n",
            "-q",
            &ip.to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The node-local address each lab agent serves the clusterset DNS zone on (as node-local DNS caches do).
pub const LAB_DNS: &str = "169.254.20.10";

/// Gives namespace `netns` a resolver for `ip netns exec` (which bind-mounts `/etc/netns/<netns>/resolv.conf`
/// over `/etc/resolv.conf`): the node's agent at [`LAB_DNS`].
pub fn write_resolv_conf(netns: &str) -> Result<()> {
    let dir = Path::new("/etc/netns").join(netns);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let file = dir.join("resolv.conf");
    std::fs::write(
        &file,
        format!("nameserver {LAB_DNS}\nsearch svc.clusterset.local\noptions ndots:5 timeout:1 attempts:2\n"),
    )
    .with_context(|| format!("writing {}", file.display()))
}

/// Removes what [`write_resolv_conf`] wrote (nothing when it is not there).
pub fn remove_resolv_conf(netns: &str) {
    let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(netns));
}
