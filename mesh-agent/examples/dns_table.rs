//! Memory of the clusterset DNS table per record (`cargo xtask bench --only dns`): fills a [`Table`] with
//! ClusterSetIP and headless services and prints the heap bytes it holds per record, counted by a global allocator
//! that tracks live bytes.
//!
//! Output: one line `dns_table records=N bytes=B bytes_per_record=X`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicIsize, Ordering};

use mesh_agent::dns::{DnsEndpoint, DnsPort, ServiceDns, Table};
use mesh_model::Protocol;

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator, only counting sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size().cast_signed(), Ordering::Relaxed);
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size().cast_signed(), Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn main() -> anyhow::Result<()> {
    let services: u32 = std::env::args()
        .nth(1)
        .map_or(Ok(2000), |s| s.parse())
        .map_err(|e| anyhow::anyhow!("services: {e}"))?;
    let ports = vec![DnsPort {
        name: "http".into(),
        port: 80,
        protocol: Protocol::Tcp,
    }];
    let mut wanted = Vec::new();
    for i in 0..services {
        let clusterset = i % 2 == 0;
        wanted.push(ServiceDns {
            namespace: format!("ns{}", i % 50),
            name: format!("svc-{i}"),
            clusterset_ip: clusterset.then(|| Ipv4Addr::from(0xC613_0000 + i)),
            ports: ports.clone(),
            endpoints: if clusterset {
                Vec::new()
            } else {
                (0..10u32)
                    .map(|e| DnsEndpoint {
                        cluster: format!("cluster-{}", e % 3),
                        ipv4: Ipv4Addr::from(0x0A00_0000 + i * 16 + e),
                        hostname: (e % 2 == 0).then(|| format!("pod-{e}")),
                    })
                    .collect()
            },
            clusters: vec!["cluster-0".into(), "cluster-1".into(), "cluster-2".into()],
        });
    }
    let before = LIVE.load(Ordering::Relaxed);
    let mut table = Table::new();
    let (_, errors) = table.sync(wanted);
    anyhow::ensure!(errors.is_empty(), "refused: {errors:?}");
    let bytes = LIVE.load(Ordering::Relaxed) - before;
    let records = table.records();
    #[expect(clippy::cast_precision_loss, reason = "a report figure")]
    let per = bytes as f64 / records as f64;
    println!("dns_table records={records} bytes={bytes} bytes_per_record={per:.0}");
    Ok(())
}
