//! `xtask echo`: the lab's built-in workload, run inside a pod's network namespace.
//!
//! Every TCP connection receives the line `<cluster>/<namespace>/<pod>\n` and is then closed; every UDP
//! datagram is answered with that line. One process serves any number of TCP and UDP ports. For rehearsals of
//! failures, `--fail reset` resets every TCP connection of the `--tcp` ports instead (the lab sets it from the pod
//! annotation `lab.fleetmesh.io/fail: reset`).
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use clap::Args;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

/// How long a connection is drained after the line was sent, waiting for the client to close.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// Arguments of `xtask echo`.
#[derive(Args, Debug, Clone)]
pub struct EchoArgs {
    /// Identity to answer with, `<cluster>/<namespace>/<pod>`.
    #[arg(long, value_name = "CLUSTER/NAMESPACE/POD")]
    pub name: String,
    /// TCP port to serve (repeatable).
    #[arg(long = "tcp", value_name = "PORT")]
    pub tcp: Vec<u16>,
    /// TCP port whose connections stay open: every line the client sends is answered with the identity line,
    /// until the client closes or is idle for two minutes (repeatable). For tests of long-lived flows.
    #[arg(long = "tcp-stream", value_name = "PORT")]
    pub tcp_stream: Vec<u16>,
    /// UDP port to serve (repeatable).
    #[arg(long = "udp", value_name = "PORT")]
    pub udp: Vec<u16>,
    /// Create this file once every port is bound (it lists the bound addresses); removed on clean exit.
    #[arg(long, value_name = "PATH")]
    pub ready_file: Option<PathBuf>,
    /// Address to bind.
    #[arg(long, value_name = "ADDR", default_value_t = IpAddr::V4(Ipv4Addr::UNSPECIFIED))]
    pub bind: IpAddr,
    /// Failure mode: `reset` answers every connection of the `--tcp` ports with a TCP reset.
    #[arg(long, value_enum)]
    pub fail: Option<FailMode>,
}

/// How the echo workload fails on purpose.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailMode {
    /// Reset every TCP connection right after accepting it.
    Reset,
}

pub fn run(args: EchoArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("creating the tokio runtime")?;
    rt.block_on(async move {
        let server = Server::bind(&args).await?;
        for addr in server.addrs() {
            eprintln!("echo {}: listening on {addr}", args.name);
        }
        if let Some(path) = &args.ready_file {
            write_ready_file(path, &server.addrs())?;
        }
        let result = server.serve(shutdown_signal()?).await;
        if let Some(path) = &args.ready_file {
            let _ = std::fs::remove_file(path);
        }
        eprintln!("echo {}: shutting down", args.name);
        result
    })
}

/// Resolves on SIGTERM or SIGINT.
fn shutdown_signal() -> Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

/// Writes the ready file atomically (temporary file, then rename).
fn write_ready_file(path: &Path, addrs: &[String]) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp.{}", std::process::id()));
    let contents: String = addrs.iter().map(|a| format!("{a}\n")).collect();
    std::fs::write(&tmp, contents).with_context(|| format!("writing ready file {}", path.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("creating ready file {}", path.display()))
}

/// All sockets bound, not yet serving.
pub struct Server {
    fail: Option<FailMode>,
    line: Arc<[u8]>,
    name: Arc<str>,
    tcp: Vec<TcpListener>,
    tcp_stream: Vec<TcpListener>,
    udp: Vec<UdpSocket>,
}

impl Server {
    /// Validates the arguments and binds every port; fails naming the port that could not be bound.
    pub async fn bind(args: &EchoArgs) -> Result<Self> {
        let parts: Vec<&str> = args.name.split('/').collect();
        if parts.len() != 3
            || parts
                .iter()
                .any(|p| p.is_empty() || p.chars().any(char::is_whitespace))
        {
            bail!("--name must be <cluster>/<namespace>/<pod>, got {:?}", args.name);
        }
        if args.tcp.is_empty() && args.udp.is_empty() && args.tcp_stream.is_empty() {
            bail!("nothing to serve: give at least one --tcp PORT, --tcp-stream PORT or --udp PORT");
        }
        let mut tcp = Vec::new();
        let mut tcp_stream = Vec::new();
        for (&port, stream) in args
            .tcp
            .iter()
            .map(|p| (p, false))
            .chain(args.tcp_stream.iter().map(|p| (p, true)))
        {
            let addr = SocketAddr::new(args.bind, port);
            let listener = TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot bind TCP port {port} ({addr})"))?;
            if stream {
                tcp_stream.push(listener);
            } else {
                tcp.push(listener);
            }
        }
        let mut udp = Vec::new();
        for &port in &args.udp {
            let addr = SocketAddr::new(args.bind, port);
            let socket = UdpSocket::bind(addr)
                .await
                .with_context(|| format!("cannot bind UDP port {port} ({addr})"))?;
            udp.push(socket);
        }
        Ok(Self {
            fail: args.fail,
            line: format!("{}\n", args.name).into_bytes().into(),
            name: args.name.as_str().into(),
            tcp,
            tcp_stream,
            udp,
        })
    }

    pub fn tcp_addrs(&self) -> Vec<SocketAddr> {
        self.tcp
            .iter()
            .chain(&self.tcp_stream)
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    pub fn udp_addrs(&self) -> Vec<SocketAddr> {
        self.udp.iter().filter_map(|s| s.local_addr().ok()).collect()
    }

    fn addrs(&self) -> Vec<String> {
        let tcp = self.tcp_addrs().into_iter().map(|a| format!("tcp {a}"));
        tcp.chain(self.udp_addrs().into_iter().map(|a| format!("udp {a}")))
            .collect()
    }

    /// Serves until `shutdown` resolves. Errors of single connections or datagrams are logged to stderr.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) -> Result<()> {
        let mut tasks = tokio::task::JoinSet::new();
        for listener in self.tcp {
            let mode = if self.fail == Some(FailMode::Reset) {
                TcpMode::Reset
            } else {
                TcpMode::Line
            };
            tasks.spawn(serve_tcp(listener, self.line.clone(), self.name.clone(), mode));
        }
        for listener in self.tcp_stream {
            tasks.spawn(serve_tcp(
                listener,
                self.line.clone(),
                self.name.clone(),
                TcpMode::Stream,
            ));
        }
        for socket in self.udp {
            tasks.spawn(serve_udp(socket, self.line.clone(), self.name.clone()));
        }
        shutdown.await;
        tasks.abort_all();
        Ok(())
    }
}

/// What a TCP port does with a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TcpMode {
    /// Send the line and close.
    Line,
    /// Answer every line until the client closes.
    Stream,
    /// Reset the connection.
    Reset,
}

async fn serve_tcp(listener: TcpListener, line: Arc<[u8]>, name: Arc<str>, mode: TcpMode) {
    let local = listener
        .local_addr()
        .map_or_else(|_| "?".to_string(), |a| a.to_string());
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let line = line.clone();
                let name = name.clone();
                tokio::spawn(async move {
                    let result = match mode {
                        TcpMode::Stream => answer_tcp_stream(stream, &line).await,
                        TcpMode::Line => answer_tcp(stream, &line).await,
                        // Zero linger: closing sends a RST instead of a FIN.
                        TcpMode::Reset => stream.set_zero_linger(),
                    };
                    if let Err(err) = result {
                        eprintln!("echo {name}: tcp {peer}: {err}");
                    }
                });
            }
            Err(err) => {
                // E.g. EMFILE: log, back off a little, keep serving.
                eprintln!("echo {name}: tcp {local}: accept: {err}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Sends the line, half-closes, then drains what the client sent until it closes (or a timeout), so that
/// closing with unread data does not turn into a reset that could destroy the line on the client side.
async fn answer_tcp(mut stream: TcpStream, line: &[u8]) -> std::io::Result<()> {
    stream.write_all(line).await?;
    stream.shutdown().await?;
    let mut buf = [0u8; 4096];
    let drain = async {
        while stream.read(&mut buf).await? > 0 {}
        Ok::<_, std::io::Error>(())
    };
    match tokio::time::timeout(DRAIN_TIMEOUT, drain).await {
        Ok(result) => result,
        Err(_elapsed) => Ok(()),
    }
}

/// Idle time after which a stream connection is closed.
const STREAM_IDLE: Duration = Duration::from_secs(120);

/// Answers every line the client sends with the identity line, until the client closes or stays idle.
async fn answer_tcp_stream(stream: TcpStream, line: &[u8]) -> std::io::Result<()> {
    use tokio::io::AsyncBufReadExt as _;
    let (read, mut write) = stream.into_split();
    let mut lines = tokio::io::BufReader::new(read).lines();
    loop {
        match tokio::time::timeout(STREAM_IDLE, lines.next_line()).await {
            Ok(Ok(Some(_))) => write.write_all(line).await?,
            Ok(Ok(None)) | Err(_) => return Ok(()),
            Ok(Err(e)) => return Err(e),
        }
    }
}

async fn serve_udp(socket: UdpSocket, line: Arc<[u8]>, name: Arc<str>) {
    let local = socket
        .local_addr()
        .map_or_else(|_| "?".to_string(), |a| a.to_string());
    let mut buf = vec![0u8; 65536];
    loop {
        match socket.recv_from(&mut buf).await {
            Ok((_, peer)) => {
                if let Err(err) = socket.send_to(&line, peer).await {
                    eprintln!("echo {name}: udp {local} -> {peer}: {err}");
                }
            }
            Err(err) => {
                eprintln!("echo {name}: udp {local}: recv: {err}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};
    use std::net::Ipv4Addr;

    use super::*;

    fn args(tcp: Vec<u16>, udp: Vec<u16>) -> EchoArgs {
        EchoArgs {
            name: "c1/default/pod-a".into(),
            tcp,
            tcp_stream: vec![],
            udp,
            ready_file: None,
            bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
            fail: None,
        }
    }

    #[test]
    fn fail_reset_resets_every_connection() {
        let mut a = args(vec![0], vec![]);
        a.fail = Some(FailMode::Reset);
        let (tcp, _, stop, handle) = start(&a);
        for _ in 0..3 {
            let mut stream = std::net::TcpStream::connect(tcp[0]).unwrap();
            stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut got = Vec::new();
            let err = stream.read_to_end(&mut got).expect_err("reset");
            assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
            assert!(got.is_empty());
        }
        stop.send(()).unwrap();
        handle.join().unwrap().unwrap();
    }

    #[test]
    fn stream_port_answers_every_line_until_the_client_closes() {
        let mut a = args(vec![], vec![]);
        a.tcp_stream = vec![0];
        let (tcp, _, stop, handle) = start(&a);
        let mut stream = std::net::TcpStream::connect(tcp[0]).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
        for i in 0..3 {
            stream.write_all(format!("line {i}\n").as_bytes()).unwrap();
            let mut got = String::new();
            std::io::BufRead::read_line(&mut reader, &mut got).unwrap();
            assert_eq!(got, "c1/default/pod-a\n");
        }
        stream.shutdown(std::net::Shutdown::Write).unwrap();
        let mut rest = String::new();
        reader.read_to_string(&mut rest).unwrap();
        assert_eq!(rest, "", "server closes after the client does");
        stop.send(()).unwrap();
        handle.join().unwrap().unwrap();
    }

    /// Starts a server on ephemeral loopback ports in a background runtime; returns its addresses and a
    /// shutdown sender plus the join handle of the serving thread.
    fn start(
        a: &EchoArgs,
    ) -> (
        Vec<SocketAddr>,
        Vec<SocketAddr>,
        tokio::sync::oneshot::Sender<()>,
        std::thread::JoinHandle<Result<()>>,
    ) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let server = rt.block_on(Server::bind(a)).unwrap();
        let (tcp, udp) = (server.tcp_addrs(), server.udp_addrs());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let handle = std::thread::spawn(move || {
            rt.block_on(server.serve(async {
                let _ = rx.await;
            }))
        });
        (tcp, udp, tx, handle)
    }

    #[test]
    fn tcp_and_udp_answer_with_the_name() {
        let (tcp, udp, stop, handle) = start(&args(vec![0, 0], vec![0]));
        assert_eq!(tcp.len(), 2);
        for addr in &tcp {
            for send_first in [false, true] {
                let mut stream = std::net::TcpStream::connect(addr).unwrap();
                stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                if send_first {
                    stream.write_all(b"hello\n").unwrap();
                }
                let mut got = String::new();
                stream.read_to_string(&mut got).unwrap();
                assert_eq!(got, "c1/default/pod-a\n");
            }
        }
        let client = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        for _ in 0..3 {
            client.send_to(b"ping", udp[0]).unwrap();
            let mut buf = [0u8; 256];
            let (n, from) = client.recv_from(&mut buf).unwrap();
            assert_eq!(from, udp[0]);
            assert_eq!(&buf[..n], b"c1/default/pod-a\n");
        }
        stop.send(()).unwrap();
        handle.join().unwrap().unwrap();
    }

    #[test]
    fn bind_failure_names_the_port() {
        let taken = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = taken.local_addr().unwrap().port();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let err = rt
            .block_on(Server::bind(&args(vec![port], vec![])))
            .err()
            .unwrap();
        assert!(
            format!("{err:#}").contains(&format!("TCP port {port}")),
            "{err:#}"
        );
    }

    #[test]
    fn rejects_bad_arguments() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut bad = args(vec![0], vec![]);
        bad.name = "just-a-pod".into();
        assert!(rt.block_on(Server::bind(&bad)).is_err());
        assert!(rt.block_on(Server::bind(&args(vec![], vec![]))).is_err());
    }

    #[test]
    fn ready_file_lists_addresses() {
        let path = std::env::temp_dir().join(format!("xtask-echo-ready-{}", std::process::id()));
        write_ready_file(&path, &["tcp 127.0.0.1:1".into(), "udp 127.0.0.1:2".into()]).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "tcp 127.0.0.1:1\nudp 127.0.0.1:2\n"
        );
        std::fs::remove_file(&path).unwrap();
    }
}
