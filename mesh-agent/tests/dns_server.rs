//! The clusterset DNS server on loopback: answers from the table, negative answers, forwarding to an upstream
//! (a stub answering on loopback), refusal without one, and garbage that must not stop it.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use mesh_agent::dns::{DnsPort, ServiceDns, Table, server};
use mesh_model::Protocol;
use tokio::net::UdpSocket;

async fn ask(server: SocketAddr, name: &str, rtype: RecordType) -> Message {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut m = Message::query();
    m.metadata.id = 4242;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
    sock.send_to(&m.to_vec().unwrap(), server).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), sock.recv(&mut buf))
        .await
        .expect("an answer in time")
        .unwrap();
    Message::from_vec(&buf[..n]).unwrap()
}

fn free_port() -> SocketAddr {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let a = s.local_addr().unwrap();
    drop(s);
    a
}

/// An upstream that answers every A query with 192.0.2.1.
async fn stub_upstream() -> SocketAddr {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        while let Ok((n, from)) = sock.recv_from(&mut buf).await {
            let Ok(q) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            let mut r = Message::response(q.metadata.id, q.metadata.op_code);
            r.metadata.recursion_available = true;
            let qname = q.queries[0].name().clone();
            r.add_query(q.queries[0].clone());
            r.add_answer(Record::from_rdata(
                qname,
                60,
                RData::A(A(Ipv4Addr::new(192, 0, 2, 1))),
            ));
            let _ = sock.send_to(&r.to_vec().unwrap(), from).await;
        }
    });
    addr
}

async fn start(upstream: Option<SocketAddr>) -> SocketAddr {
    let mut t = Table::new();
    t.upsert(ServiceDns {
        namespace: "demo".into(),
        name: "web".into(),
        clusterset_ip: Some(Ipv4Addr::new(198, 19, 0, 7)),
        ports: vec![DnsPort {
            name: "http".into(),
            port: 80,
            protocol: Protocol::Tcp,
        }],
        endpoints: Vec::new(),
        clusters: vec!["east".into()],
    })
    .unwrap();
    let zone = Arc::new(arc_swap::ArcSwap::from_pointee(t.snapshot()));
    // A free UDP port whose TCP twin is taken is possible: try a few.
    for _ in 0..5 {
        let listen = free_port();
        if server::serve(listen, zone.clone(), upstream).await.is_ok() {
            return listen;
        }
    }
    panic!("no free port pair for the DNS server");
}

#[tokio::test]
async fn answers_refuses_and_forwards() {
    let listen = start(None).await;
    let r = ask(listen, "web.demo.svc.clusterset.local.", RecordType::A).await;
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert!(r.metadata.authoritative);
    assert!(matches!(&r.answers[0].data, RData::A(a) if a.0 == Ipv4Addr::new(198, 19, 0, 7)));
    let r = ask(listen, "nope.demo.svc.clusterset.local.", RecordType::A).await;
    assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(r.authorities[0].record_type(), RecordType::SOA);
    let r = ask(listen, "web.demo.svc.clusterset.local.", RecordType::AAAA).await;
    assert_eq!(
        (r.metadata.response_code, r.answers.len()),
        (ResponseCode::NoError, 0)
    );
    // Not ours, no upstream: refused.
    let r = ask(listen, "example.com.", RecordType::A).await;
    assert_eq!(r.metadata.response_code, ResponseCode::Refused);

    // Garbage does not stop the server.
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for junk in [&b"\x00"[..], b"\x12\x34garbage", &[0xffu8; 600]] {
        sock.send_to(junk, listen).await.unwrap();
    }
    let r = ask(listen, "web.demo.svc.clusterset.local.", RecordType::A).await;
    assert_eq!(r.answers.len(), 1);

    // With an upstream, other zones are forwarded; the zone is still answered here.
    let up = stub_upstream().await;
    let listen = start(Some(up)).await;
    let r = ask(listen, "example.com.", RecordType::A).await;
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert!(matches!(&r.answers[0].data, RData::A(a) if a.0 == Ipv4Addr::new(192, 0, 2, 1)));
    let r = ask(listen, "nope.demo.svc.clusterset.local.", RecordType::A).await;
    assert_eq!(
        r.metadata.response_code,
        ResponseCode::NXDomain,
        "the zone is never forwarded"
    );
}
