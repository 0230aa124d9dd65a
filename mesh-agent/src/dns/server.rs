//! The DNS server: answers the clusterset zone from the published [`Zone`] snapshot, and forwards every other name
//! to `--dns-upstream` (the cluster's DNS), or refuses it when there is none.
//!
//! - UDP: one socket per thread on the same address (`SO_REUSEPORT`; the kernel spreads the clients over them), each
//!   thread answering in a loop: first the zone's response cache ([`Zone::fast_answer`]: no decoding, no
//!   allocation), else [`answer_datagram`], which decodes and encodes with hickory-proto; forwarding runs on the
//!   tokio runtime.
//! - TCP: `hickory-server` with the request [`Handler`] below.
//!
//! Malformed messages: FORMERR when the id can be read (hickory-server does the same on TCP), else no answer. Both
//! paths answer: a message that is not a single query FORMERR; an opcode other than QUERY NOTIMP; a class
//! other than IN in the zone REFUSED; names of the zone from the table (authoritative, NXDOMAIN or NODATA with
//! the SOA); other names by forwarding, SERVFAIL when the upstream does not answer in time, REFUSED without an
//! upstream. It never answers for zones it does not own.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::{DNSClass, LowerName, Record};
use hickory_server::net::runtime::Time;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use tracing::{debug, warn};

use super::Lookup;
use super::zone::{EDNS_PAYLOAD, PLAIN_UDP_LIMIT, SharedZone, Zone};

/// How long a forwarded query waits for the upstream.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// UDP sockets (and threads) at most; fewer when the agent may use fewer CPUs.
pub const MAX_UDP_THREADS: usize = 4;
/// Datagrams longer than this are cut (and then answered FORMERR).
const MAX_DATAGRAM: usize = 4096;

/// Answers the clusterset zone, forwards the rest (the TCP side).
pub struct Handler {
    pub zone: SharedZone,
    pub upstream: Option<SocketAddr>,
}

/// What the handler decided, before it is sent.
enum Reply {
    Error(ResponseCode),
    Zone(Lookup),
    Forward,
}

impl Handler {
    fn decide(&self, request: &Request) -> Reply {
        if request.metadata.message_type != MessageType::Query {
            return Reply::Error(ResponseCode::FormErr);
        }
        if request.metadata.op_code != OpCode::Query {
            return Reply::Error(ResponseCode::NotImp);
        }
        let Ok(info) = request.request_info() else {
            return Reply::Error(ResponseCode::FormErr);
        };
        let q = info.query;
        let lookup = self.zone.load().lookup(q.name(), q.query_type());
        match lookup {
            Lookup::NotOurs => Reply::Forward,
            _ if q.query_class() != DNSClass::IN => Reply::Error(ResponseCode::Refused),
            l => Reply::Zone(l),
        }
    }

    async fn forward(&self, request: &Request) -> Result<Message, ResponseCode> {
        let Some(up) = self.upstream else {
            return Err(ResponseCode::Refused);
        };
        let bind: SocketAddr = if up.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            ([0u16; 8], 0).into()
        };
        let exchange = async {
            let sock = tokio::net::UdpSocket::bind(bind).await?;
            sock.connect(up).await?;
            sock.send(request.as_slice()).await?;
            let mut buf = vec![0u8; 65535];
            loop {
                let n = sock.recv(&mut buf).await?;
                if let Ok(m) = Message::from_vec(&buf[..n])
                    && m.metadata.id == request.metadata.id
                {
                    return Ok::<_, std::io::Error>(m);
                }
            }
        };
        match tokio::time::timeout(UPSTREAM_TIMEOUT, exchange).await {
            Ok(Ok(m)) => Ok(m),
            Ok(Err(e)) => {
                debug!(upstream = %up, error = %e, "forwarding failed");
                Err(ResponseCode::ServFail)
            }
            Err(_) => {
                debug!(upstream = %up, "upstream did not answer in time");
                Err(ResponseCode::ServFail)
            }
        }
    }
}

async fn send<'a, R: ResponseHandler>(
    request: &Request,
    mut handle: R,
    metadata: Metadata,
    answers: &'a [Record],
    authorities: &'a [Record],
    additionals: &'a [Record],
) -> ResponseInfo {
    let edns = request.edns.as_ref().map(|req| {
        let mut e = hickory_proto::op::Edns::new();
        e.set_max_payload(req.max_payload().max(512));
        e
    });
    let mut b = MessageResponseBuilder::new(&request.queries, None);
    if let Some(e) = &edns {
        b.edns(e);
    }
    let response = b.build(
        metadata,
        answers.iter(),
        authorities.iter(),
        [].iter(),
        additionals.iter(),
    );
    match handle.send_response(response).await {
        Ok(info) => info,
        Err(e) => {
            warn!(error = %e, "sending a DNS response");
            let mut metadata = Metadata::response_from_request(&request.metadata);
            metadata.response_code = ResponseCode::ServFail;
            ResponseInfo::from(hickory_proto::op::Header {
                metadata,
                counts: hickory_proto::op::HeaderCounts::default(),
            })
        }
    }
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        handle: R,
    ) -> ResponseInfo {
        let mut meta = Metadata::response_from_request(&request.metadata);
        meta.recursion_available = self.upstream.is_some();
        match self.decide(request) {
            Reply::Error(code) => {
                meta.response_code = code;
                send(request, handle, meta, &[], &[], &[]).await
            }
            Reply::Zone(l) => {
                meta.authoritative = true;
                let soa = vec![self.zone.load().soa().clone()];
                match l {
                    Lookup::Records(rs) => send(request, handle, meta, &rs, &[], &[]).await,
                    Lookup::NoData => send(request, handle, meta, &[], &soa, &[]).await,
                    Lookup::NxDomain => {
                        meta.response_code = ResponseCode::NXDomain;
                        send(request, handle, meta, &[], &soa, &[]).await
                    }
                    Lookup::NotOurs => {
                        meta.response_code = ResponseCode::Refused;
                        send(request, handle, meta, &[], &[], &[]).await
                    }
                }
            }
            Reply::Forward => match self.forward(request).await {
                Ok(m) => {
                    meta.response_code = m.metadata.response_code;
                    meta.authoritative = m.metadata.authoritative;
                    meta.truncation = m.metadata.truncation;
                    let additionals: Vec<Record> = m.additionals;
                    send(request, handle, meta, &m.answers, &m.authorities, &additionals).await
                }
                Err(code) => {
                    meta.response_code = code;
                    send(request, handle, meta, &[], &[], &[]).await
                }
            },
        }
    }
}

/// What the UDP side does with a datagram the response cache did not answer.
#[derive(Debug, PartialEq, Eq)]
pub enum Datagram {
    /// Send this response.
    Reply(Vec<u8>),
    /// Not in the zone, and there is an upstream: forward the query as it came.
    Forward,
    /// Not even an id to answer to.
    Drop,
}

fn encode_or_servfail(m: &Message) -> Datagram {
    match m.to_vec() {
        Ok(v) => Datagram::Reply(v),
        Err(e) => {
            warn!(error = %e, "encoding a DNS response");
            let mut r = Message::response(m.metadata.id, m.metadata.op_code);
            r.metadata.response_code = ResponseCode::ServFail;
            r.to_vec().map_or(Datagram::Drop, Datagram::Reply)
        }
    }
}

/// The answer to one UDP datagram, decoded and encoded by hickory-proto, with the same decisions as [`Handler`]
/// (`upstream`: whether one is configured). A response larger than the client accepts (512 bytes, or its EDNS
/// payload size) is truncated (TC, no records) for the client to retry over TCP.
#[must_use]
pub fn answer_datagram(zone: &Zone, q: &[u8], upstream: bool) -> Datagram {
    let req = match Message::from_vec(q) {
        Ok(m) => m,
        Err(_) if q.len() >= 12 => {
            let id = u16::from_be_bytes([q[0], q[1]]);
            let mut r = Message::response(id, OpCode::from_u8((q[2] >> 3) & 0x0F));
            r.metadata.response_code = ResponseCode::FormErr;
            return encode_or_servfail(&r);
        }
        Err(_) => return Datagram::Drop,
    };
    let mut r = Message::response(req.metadata.id, req.metadata.op_code);
    r.metadata = Metadata::response_from_request(&req.metadata);
    r.metadata.recursion_available = upstream;
    let limit = match &req.edns {
        Some(e) => {
            let mut edns = Edns::new();
            edns.set_max_payload(EDNS_PAYLOAD);
            r.set_edns(edns);
            usize::from(e.max_payload()).max(PLAIN_UDP_LIMIT)
        }
        None => PLAIN_UDP_LIMIT,
    };
    if req.metadata.message_type != MessageType::Query || req.queries.len() != 1 {
        r.metadata.response_code = ResponseCode::FormErr;
        return encode_or_servfail(&r);
    }
    if req.metadata.op_code != OpCode::Query {
        r.metadata.response_code = ResponseCode::NotImp;
        return encode_or_servfail(&r);
    }
    let query = &req.queries[0];
    r.add_query(query.clone());
    match zone.lookup(&LowerName::from(query.name()), query.query_type()) {
        Lookup::NotOurs if upstream => return Datagram::Forward,
        Lookup::NotOurs => r.metadata.response_code = ResponseCode::Refused,
        _ if query.query_class() != DNSClass::IN => r.metadata.response_code = ResponseCode::Refused,
        Lookup::Records(rs) => {
            r.metadata.authoritative = true;
            r.answers = rs;
        }
        Lookup::NoData => {
            r.metadata.authoritative = true;
            r.add_authority(zone.soa().clone());
        }
        Lookup::NxDomain => {
            r.metadata.authoritative = true;
            r.metadata.response_code = ResponseCode::NXDomain;
            r.add_authority(zone.soa().clone());
        }
    }
    match encode_or_servfail(&r) {
        Datagram::Reply(v) if v.len() > limit => encode_or_servfail(&r.truncate()),
        d => d,
    }
}

/// Forwards the datagram `q` to `upstream` and relays the answer to `client` (nothing when the upstream does not
/// answer in time: the client retries).
async fn forward_datagram(
    sock: Arc<std::net::UdpSocket>,
    q: Vec<u8>,
    client: SocketAddr,
    upstream: SocketAddr,
) {
    let bind: SocketAddr = if upstream.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        ([0u16; 8], 0).into()
    };
    let id = [q[0], q[1]];
    let exchange = async {
        let up = tokio::net::UdpSocket::bind(bind).await?;
        up.connect(upstream).await?;
        up.send(&q).await?;
        let mut buf = vec![0u8; 65535];
        loop {
            let n = up.recv(&mut buf).await?;
            if n >= 12 && buf[..2] == id {
                buf.truncate(n);
                return Ok::<_, std::io::Error>(buf);
            }
        }
    };
    match tokio::time::timeout(UPSTREAM_TIMEOUT, exchange).await {
        Ok(Ok(answer)) => {
            if let Err(e) = sock.send_to(&answer, client) {
                debug!(%client, error = %e, "relaying a forwarded answer");
            }
        }
        Ok(Err(e)) => debug!(%upstream, error = %e, "forwarding failed"),
        Err(_) => debug!(%upstream, "upstream did not answer in time"),
    }
}

fn udp_socket(listen: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(listen), Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_port(true)?;
    s.bind(&listen.into())?;
    Ok(s.into())
}

/// One UDP socket's loop: answers until the socket fails.
fn udp_loop(
    sock: &Arc<std::net::UdpSocket>,
    zone: &SharedZone,
    upstream: Option<SocketAddr>,
    rt: &tokio::runtime::Handle,
) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut out = Vec::with_capacity(PLAIN_UDP_LIMIT);
    loop {
        let (n, client) = match sock.recv_from(&mut buf) {
            Ok(x) => x,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                warn!(error = %e, "DNS UDP socket failed");
                return;
            }
        };
        let q = &buf[..n];
        let z = zone.load();
        let reply = if z.fast_answer(q, &mut out, upstream.is_some()) {
            Some(&out[..])
        } else {
            match answer_datagram(&z, q, upstream.is_some()) {
                Datagram::Reply(v) => {
                    out = v;
                    Some(&out[..])
                }
                Datagram::Forward => {
                    if let Some(up) = upstream {
                        rt.spawn(forward_datagram(sock.clone(), q.to_vec(), client, up));
                    }
                    None
                }
                Datagram::Drop => None,
            }
        };
        if let Some(r) = reply
            && let Err(e) = sock.send_to(r, client)
        {
            debug!(%client, error = %e, "sending a DNS response");
        }
    }
}

/// Serves the published zone on UDP and TCP at `listen` until the process ends (call it on the tokio runtime:
/// forwarding and TCP run there).
///
/// # Errors
/// When the address cannot be bound.
pub async fn serve(
    listen: SocketAddr,
    zone: SharedZone,
    upstream: Option<SocketAddr>,
) -> std::io::Result<()> {
    let threads = std::thread::available_parallelism()
        .map_or(1, std::num::NonZeroUsize::get)
        .min(MAX_UDP_THREADS);
    let first = udp_socket(listen)?;
    // Port 0 picks one: the other sockets join the first's.
    let listen = first.local_addr()?;
    let mut sockets = vec![first];
    for _ in 1..threads {
        sockets.push(udp_socket(listen)?);
    }
    let tcp = tokio::net::TcpListener::bind(listen).await?;
    let rt = tokio::runtime::Handle::current();
    for (i, s) in sockets.into_iter().enumerate() {
        let (sock, zone, rt) = (Arc::new(s), zone.clone(), rt.clone());
        std::thread::Builder::new()
            .name(format!("dns-udp-{i}"))
            .spawn(move || udp_loop(&sock, &zone, upstream, &rt))?;
    }
    let mut server = hickory_server::Server::new(Handler { zone, upstream });
    server.register_listener(tcp, Duration::from_secs(5), 64);
    tokio::spawn(async move {
        if let Err(e) = server.block_until_done().await {
            warn!(error = %e, "DNS server stopped");
        }
    });
    Ok(())
}

/// Makes sure the node has `listen`'s address: an unspecified or loopback address, or one already bindable, needs
/// nothing; another one is added to the node's `lo` as a /32 (a node-local address, as node-local DNS caches use;
/// pods reach it through their gateway, the node's stack delivers it locally).
///
/// # Errors
/// When `ip` fails.
pub fn ensure_listen_address(listen: SocketAddr) -> anyhow::Result<()> {
    let ip = listen.ip();
    if ip.is_unspecified() || ip.is_loopback() || std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok() {
        return Ok(());
    }
    let cidr = format!("{ip}/32");
    // Scope host: never chosen as the source of the node's own connections (pods reach it all the same).
    crate::netdev::run_ip(&["addr", "replace", cidr.as_str(), "dev", "lo", "scope", "host"])
}
