//! Test support shared by the crates whose tests run a real etcd: an etcd guard on loopback (killed, with its data,
//! on drop; its log printed when a test panics), polling with deadlines, free ports. Dev-only (`publish = false`).

use std::future::Future;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use etcd_client::{Client, ConnectOptions};

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Polls `check` until it gives `Ok`; panics with its last error after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let last = match check().await {
            Ok(v) => return v,
            Err(e) => e,
        };
        assert!(
            Instant::now() < deadline,
            "{what}: not reached within {timeout:?}; last: {last}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Asserts that `check` gives `Ok` on every poll during `period`.
pub async fn stays<F, Fut>(what: &str, period: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let end = Instant::now() + period;
    while Instant::now() < end {
        if let Err(e) = check().await {
            panic!("{what}: no longer true: {e}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn connect(url: &str) -> Result<Client, String> {
    let opts = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(1))
        .with_timeout(Duration::from_secs(2));
    Client::connect([url], Some(opts))
        .await
        .map_err(|e| e.to_string())
}

/// A single-member etcd on loopback; its data directory survives `stop`/`start_on` and goes with the guard.
pub struct Etcd {
    child: Option<Child>,
    pub client_port: u16,
    peer_port: u16,
    dir: tempfile::TempDir,
}

impl Etcd {
    /// Starts a fresh etcd on free ports (once more on new ports if the first start fails).
    pub async fn start() -> Self {
        let mut first_error = String::new();
        for _ in 0..2 {
            let mut e = Etcd {
                child: None,
                client_port: free_port(),
                peer_port: free_port(),
                dir: tempfile::tempdir().expect("tempdir"),
            };
            match e.start_on(e.client_port).await {
                Ok(()) => return e,
                Err(err) => first_error = err,
            }
        }
        panic!("etcd did not start twice; last: {first_error}");
    }

    pub fn url(&self) -> String {
        url(self.client_port)
    }

    fn log(&self) -> std::path::PathBuf {
        self.dir.path().join("etcd.log")
    }

    /// Starts the (stopped) etcd on its data directory, serving clients on `client_port`; ready on return.
    pub async fn start_on(&mut self, client_port: u16) -> Result<(), String> {
        assert!(self.child.is_none(), "etcd already running");
        let client = url(client_port);
        let peer = url(self.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log())
            .map_err(|e| e.to_string())?;
        let child = Command::new("etcd")
            .args(["--name", "t", "--data-dir"])
            .arg(self.dir.path().join("data"))
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &format!("t={peer}")])
            .args(["--logger", "zap", "--log-level", "error"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("spawn etcd: {e}"))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.child = None;
                return Err(format!(
                    "etcd exited with {status}; log:\n{}",
                    log_tail(&self.log(), 20)
                ));
            }
            let probe = match connect(&client).await {
                Ok(mut c) => c.get("probe", None).await.map_err(|e| e.to_string()),
                Err(e) => Err(e),
            };
            match probe {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    self.stop();
                    return Err(format!(
                        "etcd not ready: {e}; log:\n{}",
                        log_tail(&self.log(), 20)
                    ));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    /// SIGKILL, and reaps the process.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub async fn client(&self) -> Client {
        connect(&self.url()).await.expect("etcd client")
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!("--- etcd log ---\n{}", log_tail(&self.log(), 30));
        }
    }
}

pub fn url(port: u16) -> String {
    format!("http://127.0.0.1:{port}")
}

/// The kmock Kubernetes API emulator (`mesh-k8s/tests/fixtures/kube_emulator.py`, PyPI `kmock`, which
/// `cargo xtask setup` installs) as a child process on a loopback port; killed on drop. Commands are JSON lines on
/// its stdin (see the fixture), answered by one JSON line.
pub struct KubeEmulator {
    child: Child,
    stdin: std::process::ChildStdin,
    stdout: std::io::BufReader<std::process::ChildStdout>,
    /// Its HTTP port on 127.0.0.1.
    pub port: u16,
}

impl KubeEmulator {
    /// Starts the emulator with the fixture's arguments (e.g. `--without RESOURCE`); `$PYTHON` or `python3` runs it.
    pub fn start(args: &[&str]) -> Self {
        use std::io::BufRead as _;
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../mesh-k8s/tests/fixtures/kube_emulator.py"
        );
        let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_owned());
        let mut child = Command::new(&python)
            .arg(script)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {python} {script}: {e}"));
        let stdin = child.stdin.take().expect("piped stdin");
        let mut stdout = std::io::BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("read the emulator's port");
        let port = line
            .trim()
            .strip_prefix("PORT ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| {
                panic!(
                    "the emulator did not start (said {line:?}); is kmock installed? `cargo xtask setup` or \
                     `pip install kmock`"
                )
            });
        Self {
            child,
            stdin,
            stdout,
            port,
        }
    }

    /// Sends one command and returns the answer; panics unless the emulator answers `"ok": true`.
    pub fn command(&mut self, cmd: &serde_json::Value) -> serde_json::Value {
        use std::io::{BufRead as _, Write as _};
        writeln!(self.stdin, "{cmd}").expect("send a command to the emulator");
        self.stdin.flush().expect("flush");
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .expect("read the emulator's answer");
        let answer: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("answer {line:?}: {e}"));
        assert_eq!(answer["ok"], true, "{cmd} failed: {answer}");
        answer
    }
}

impl Drop for KubeEmulator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes `dir/kubeconfig` with one context per `(name, port)` of emulators on 127.0.0.1 (plain http, no user
/// credentials); the first is the current context.
///
/// # Panics
/// When the file cannot be written.
#[must_use]
pub fn kubeconfig(dir: &Path, contexts: &[(&str, u16)]) -> std::path::PathBuf {
    use std::fmt::Write as _;
    let mut y = String::from("apiVersion: v1\nkind: Config\nclusters:\n");
    for (n, p) in contexts {
        let _ = write!(y, "- name: {n}\n  cluster:\n    server: http://127.0.0.1:{p}\n");
    }
    y += "users:\n- name: u\n  user: {}\ncontexts:\n";
    for (n, _) in contexts {
        let _ = write!(y, "- name: {n}\n  context:\n    cluster: {n}\n    user: u\n");
    }
    let _ = writeln!(y, "current-context: {}", contexts.first().map_or("", |c| c.0));
    let p = dir.join("kubeconfig");
    std::fs::write(&p, y).expect("write kubeconfig");
    p
}
