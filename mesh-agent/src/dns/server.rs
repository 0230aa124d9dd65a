//! The DNS server: a `hickory-server` request handler answering the clusterset zone from a shared [`Table`], and
//! forwarding every other name to `--dns-upstream` (the cluster's DNS), or refusing it when there is none.
//!
//! Malformed messages never reach the handler: hickory answers them FORMERR (or drops what it cannot read at all).
//! The handler answers: a message that is not a single query FORMERR; an opcode other than QUERY NOTIMP; a class
//! other than IN in the zone REFUSED; names of the zone from the table (authoritative, NXDOMAIN or NODATA with
//! the SOA); other names by forwarding, SERVFAIL when the upstream does not answer in time, REFUSED without an
//! upstream. It never answers for zones it does not own.

use std::net::SocketAddr;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::{DNSClass, Record};
use hickory_server::net::runtime::Time;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use tracing::{debug, warn};

use super::{Lookup, Table};

/// How long a forwarded query waits for the upstream.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);

/// The table every agent thread shares: the reconciler writes it, the server reads it.
pub type SharedTable = Arc<RwLock<Table>>;

/// Answers the clusterset zone, forwards the rest.
pub struct Handler {
    pub table: SharedTable,
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
        let lookup = self
            .table
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .lookup(q.name(), q.query_type());
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
                let soa = vec![
                    self.table
                        .read()
                        .unwrap_or_else(PoisonError::into_inner)
                        .soa()
                        .clone(),
                ];
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

/// Serves `table` on UDP and TCP at `listen` until the process ends.
///
/// # Errors
/// When the address cannot be bound.
pub async fn serve(
    listen: SocketAddr,
    table: SharedTable,
    upstream: Option<SocketAddr>,
) -> std::io::Result<()> {
    let udp = tokio::net::UdpSocket::bind(listen).await?;
    let tcp = tokio::net::TcpListener::bind(listen).await?;
    let mut server = hickory_server::Server::new(Handler { table, upstream });
    server.register_socket(udp);
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
