//! Helpers for fleetmesh's end-to-end tests: a lab guard that tears its lab down also when a test fails, and
//! real TCP/UDP/ICMP probes run from inside lab pods.

use std::fs::File;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

/// The workspace root.
#[must_use]
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// A built binary of the workspace (`cargo xtask test` builds them before the tests run).
///
/// # Panics
/// When the binary is missing, with the command that builds it.
#[must_use]
pub fn bin(name: &str) -> PathBuf {
    let p = workspace_root().join("target").join("debug").join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace --bins` (cargo xtask test does)",
        p.display()
    );
    p
}

/// A topology of the repository's `examples/`.
#[must_use]
pub fn example(name: &str) -> PathBuf {
    workspace_root().join("examples").join(name)
}

/// Runs `xtask lab --lab-dir DIR ARGS...`.
///
/// # Errors
/// When the command cannot start.
pub fn lab_cmd(dir: &Path, args: &[&str]) -> Result<Output> {
    let mut c = Command::new(bin("xtask"));
    c.arg("lab").arg("--lab-dir").arg(dir).args(args);
    c.output().with_context(|| format!("running xtask lab {args:?}"))
}

/// A running lab, torn down on drop.
pub struct Lab {
    pub dir: PathBuf,
    pub up_output: String,
}

impl Lab {
    /// A fresh lab folder for `name` (unique per test process).
    #[must_use]
    pub fn dir_for(name: &str) -> PathBuf {
        workspace_root()
            .join("target")
            .join("test-labs")
            .join(format!("{name}-{}", std::process::id()))
    }

    /// `lab up` of `topology` in a folder of its own.
    ///
    /// # Errors
    /// When `lab up` fails (its output is in the error).
    pub fn up(topology: &Path, name: &str) -> Result<Self> {
        let dir = Self::dir_for(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        // From here on the guard exists, so a failed `up` is torn down too.
        let mut lab = Self {
            dir,
            up_output: String::new(),
        };
        let out = lab.run(&["up", "--no-build", "--topology", &topology.display().to_string()])?;
        lab.up_output = out;
        Ok(lab)
    }

    /// Runs a lab subcommand and returns its stdout, or an error with its stderr.
    ///
    /// # Errors
    /// When the command fails.
    pub fn run(&self, args: &[&str]) -> Result<String> {
        let out = lab_cmd(&self.dir, args)?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            bail!(
                "xtask lab {args:?} failed: {}\n{stdout}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(stdout)
    }

    /// `lab status --json`.
    ///
    /// # Errors
    /// When the status cannot be read.
    pub fn status(&self) -> Result<Value> {
        Ok(serde_json::from_str(&self.run(&["status", "--json"])?)?)
    }

    /// The namespace prefix of this lab (from its state file).
    ///
    /// # Errors
    /// When there is no state file.
    pub fn prefix(&self) -> Result<String> {
        let st: Value = serde_json::from_str(&std::fs::read_to_string(self.dir.join("state.json"))?)?;
        st["prefix"]
            .as_str()
            .map(str::to_owned)
            .context("no prefix in state.json")
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        match lab_cmd(&self.dir, &["down"]) {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!("lab down failed: {}", String::from_utf8_lossy(&o.stderr)),
            Err(e) => eprintln!("lab down failed: {e:#}"),
        }
    }
}

/// A pod of `lab status --json`.
#[derive(Debug, Clone)]
pub struct PodInfo {
    /// `cluster/namespace/name`, which is also what its echo workload answers.
    pub id: String,
    pub cluster: String,
    pub node: String,
    pub ip: String,
    pub netns: String,
}

/// The pod `cluster/namespace/name` of `all`; panics when there is none.
#[must_use]
pub fn pod<'a>(all: &'a [PodInfo], id: &str) -> &'a PodInfo {
    all.iter()
        .find(|p| p.id == id)
        .unwrap_or_else(|| panic!("no pod {id}"))
}

/// All pods of a lab status.
#[must_use]
pub fn pods(status: &Value) -> Vec<PodInfo> {
    let mut out = Vec::new();
    for c in status["clusters"].as_array().into_iter().flatten() {
        let cluster = c["name"].as_str().unwrap_or_default().to_owned();
        for p in c["pods"].as_array().into_iter().flatten() {
            let s = |k: &str| p[k].as_str().unwrap_or_default().to_owned();
            out.push(PodInfo {
                id: format!("{cluster}/{}/{}", s("namespace"), s("name")),
                cluster: cluster.clone(),
                node: s("node"),
                ip: s("ip"),
                netns: s("netns"),
            });
        }
    }
    out
}

/// Runs `f` on a thread inside network namespace `netns` (a lab namespace under /run/netns).
///
/// # Errors
/// When the namespace cannot be entered.
pub fn in_netns<T: Send>(netns: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
    let path = format!("/run/netns/{netns}");
    let file = File::open(&path).with_context(|| format!("opening {path}"))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on a valid namespace fd changes only this short-lived scoped thread.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error()).with_context(|| format!("entering {path}"));
            }
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("probe thread panicked"))?
    })
}

const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Connects over TCP from inside `netns` and returns the line the echo workload sends.
///
/// # Errors
/// When the connection or the read fails or times out.
pub fn tcp_line(netns: &str, ip: &str, port: u16) -> Result<String> {
    let addr: SocketAddr = format!("{ip}:{port}").parse()?;
    in_netns(netns, || -> Result<String> {
        let mut s = TcpStream::connect_timeout(&addr, PROBE_TIMEOUT)
            .with_context(|| format!("tcp connect {addr}"))?;
        s.set_read_timeout(Some(PROBE_TIMEOUT))?;
        let mut line = String::new();
        s.read_to_string(&mut line)
            .with_context(|| format!("tcp read from {addr}"))?;
        Ok(line.trim_end().to_owned())
    })?
}

/// Sends a UDP datagram from inside `netns` and returns the echo workload's answer (one retry on loss).
///
/// # Errors
/// When no answer arrives in time.
pub fn udp_line(netns: &str, ip: &str, port: u16) -> Result<String> {
    let addr: SocketAddr = format!("{ip}:{port}").parse()?;
    in_netns(netns, || -> Result<String> {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.set_read_timeout(Some(Duration::from_secs(1)))?;
        let mut buf = [0u8; 512];
        let mut last = None;
        for _ in 0..2 {
            s.send_to(b"ping\n", addr)?;
            match s.recv_from(&mut buf) {
                Ok((n, from)) => {
                    anyhow::ensure!(from == addr, "answer from {from}, expected {addr}");
                    return Ok(String::from_utf8_lossy(&buf[..n]).trim_end().to_owned());
                }
                Err(e) => last = Some(e),
            }
        }
        Err(anyhow::anyhow!("no UDP answer from {addr}: {last:?}"))
    })?
}

/// Sends one ICMP echo from inside `netns` (with `ping`); true when answered.
///
/// # Errors
/// When ping cannot run.
pub fn ping(netns: &str, ip: &str) -> Result<bool> {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "ping", "-c1", "-W2", "-n", "-q", ip])
        .output()
        .context("running ping")?;
    Ok(out.status.success())
}

/// Writes a temporary manifest file for `lab apply`.
///
/// # Errors
/// When the file cannot be written.
pub fn write_manifest(dir: &Path, name: &str, text: &str) -> Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let p = dir.join(name);
    let mut f = File::create(&p)?;
    f.write_all(text.as_bytes())?;
    Ok(p)
}

/// A TCP connection opened from inside `netns` (the socket stays in that namespace; use it from any thread).
///
/// # Errors
/// When the connection fails.
pub fn tcp_connect(netns: &str, ip: &str, port: u16) -> Result<TcpStream> {
    let addr: SocketAddr = format!("{ip}:{port}").parse()?;
    in_netns(netns, || -> Result<TcpStream> {
        let s = TcpStream::connect_timeout(&addr, PROBE_TIMEOUT)
            .with_context(|| format!("tcp connect {addr}"))?;
        s.set_read_timeout(Some(PROBE_TIMEOUT))?;
        Ok(s)
    })?
}

/// Sends one line on a stream connection (an echo `stream` port) and returns the answer line.
///
/// # Errors
/// When writing or reading fails.
pub fn stream_ask(s: &mut TcpStream) -> Result<String> {
    s.write_all(b"who\n").context("write")?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 512 {
        let n = s.read(&mut byte).context("read")?;
        if n == 0 {
            bail!("connection closed");
        }
        if byte[0] == b'\n' {
            break;
        }
        line.push(byte[0]);
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

/// ClusterIP of `namespace/name` in `cluster`, from a lab status.
#[must_use]
pub fn cluster_ip(status: &Value, cluster: &str, service: &str) -> Option<String> {
    status["clusters"]
        .as_array()?
        .iter()
        .find(|c| c["name"] == cluster)?["services"]
        .as_array()?
        .iter()
        .find(|s| s["name"] == service)?["clusterIP"]
        .as_str()
        .map(str::to_owned)
}

/// `GET /v1/status` of an agent.
///
/// # Errors
/// When the agent does not answer.
pub fn agent_status(socket: &Path) -> Result<Value> {
    Ok(serde_json::from_str(&agent_get(socket, "/v1/status")?)?)
}

/// `GET path` on an agent's API socket; the body.
///
/// # Errors
/// When the agent does not answer.
pub fn agent_get(socket: &Path, path: &str) -> Result<String> {
    let mut s =
        std::os::unix::net::UnixStream::connect(socket).with_context(|| format!("{}", socket.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\n\r\n")?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    Ok(buf.split_once("\r\n\r\n").context("not HTTP")?.1.to_owned())
}

/// The status of `node`'s agent (`None` when the node or its agent does not answer), from a lab status.
#[must_use]
pub fn node_status(status: &Value, node: &str) -> Option<Value> {
    agent_socket(status, node).and_then(|s| agent_status(&s).ok())
}

/// The agent socket of `node`, from a lab status.
#[must_use]
pub fn agent_socket(status: &Value, node: &str) -> Option<PathBuf> {
    status["clusters"]
        .as_array()?
        .iter()
        .flat_map(|c| c["nodes"].as_array().into_iter().flatten())
        .find(|n| n["name"] == node)?["agentSocket"]
        .as_str()
        .map(PathBuf::from)
}

/// Polls `f` until it returns true or `timeout` passes.
pub fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    let mut delay = Duration::from_millis(10);
    loop {
        if f() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(delay);
        delay = (delay * 2).min(Duration::from_millis(100));
    }
}

/// Probes `targets` (from netns, ip, expected answer) over TCP port 8080 in a loop until stopped (bounded by 2
/// minutes), counting probes and failures.
pub struct Traffic {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    log: std::sync::Arc<std::sync::Mutex<(u64, Vec<String>)>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Traffic {
    /// Starts probing in a thread of its own.
    #[must_use]
    pub fn start(targets: Vec<(String, String, String)>) -> Self {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let log = std::sync::Arc::new(std::sync::Mutex::new((0u64, Vec::new())));
        let (s, l) = (stop.clone(), log.clone());
        let handle = std::thread::spawn(move || {
            let deadline = std::time::Instant::now() + Duration::from_secs(120);
            while !s.load(Ordering::Relaxed) && std::time::Instant::now() < deadline {
                for (netns, ip, want) in &targets {
                    let r = tcp_line(netns, ip, 8080);
                    let mut g = l.lock().expect("lock");
                    g.0 += 1;
                    match r {
                        Ok(line) if &line == want => {}
                        Ok(line) => g.1.push(format!("{ip}: answered by {line}, expected {want}")),
                        Err(e) => g.1.push(format!("{ip}: {e:#}")),
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Self {
            stop,
            log,
            handle: Some(handle),
        }
    }

    /// Probes so far.
    #[must_use]
    pub fn probes(&self) -> u64 {
        self.log.lock().expect("lock").0
    }

    /// Stops, and asserts that more than `min_probes` probes ran and none failed.
    pub fn assert_flowed(self, min_probes: u64) {
        let (probes, failures) = self.finish();
        assert!(probes > min_probes, "traffic ran ({probes} probes)");
        assert!(
            failures.is_empty(),
            "unrelated traffic failed {} of {probes} times: {:?}",
            failures.len(),
            &failures[..failures.len().min(5)]
        );
    }

    /// Stops and returns (probes, failures).
    #[must_use]
    pub fn finish(mut self) -> (u64, Vec<String>) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            h.join().expect("traffic thread");
        }
        std::mem::take(&mut *self.log.lock().expect("lock"))
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
