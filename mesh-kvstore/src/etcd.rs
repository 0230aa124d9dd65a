//! Reading a cluster's records from etcd, as agents and the KVStoreMesh mirror both do: a paged list at one
//! revision (a cluster's state can be far larger than one gRPC message), and the message size limit for it; and
//! the delays between sessions of every etcd client (agents' remote watchers, KVStoreMesh, the publisher).

use std::time::Duration;

use backon::{BackoffBuilder as _, ExponentialBackoff, ExponentialBuilder};
use etcd_client::{Client, GetOptions, WatchClient};

/// Keys per page of a list.
pub const LIST_PAGE: i64 = 500;
/// Largest gRPC message accepted from an etcd (a list page of large records, or a burst of watch events).
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// The end of the key range holding every key that starts with `prefix` (etcd's `--prefix`).
#[must_use]
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Every key (UTF-8 ones; others cannot be records) and value under `prefix`, in key order, listed in pages of
/// [`LIST_PAGE`] at the revision of the first page; and that revision (to watch from the next one).
///
/// # Errors
/// When etcd refuses a page or cannot be reached.
pub async fn list_paged(
    client: &Client,
    prefix: &str,
) -> Result<(Vec<(String, Vec<u8>)>, i64), etcd_client::Error> {
    let mut kv = client.kv_client().max_decoding_message_size(MAX_MESSAGE_BYTES);
    let end = prefix_end(prefix.as_bytes());
    let mut from = prefix.as_bytes().to_vec();
    let mut revision = 0;
    let mut out = Vec::new();
    loop {
        let mut opts = GetOptions::new().with_range(end.clone()).with_limit(LIST_PAGE);
        if revision > 0 {
            opts = opts.with_revision(revision);
        }
        let page = kv.get(from.clone(), Some(opts)).await?;
        if revision == 0 {
            revision = page
                .header()
                .map(etcd_client::ResponseHeader::revision)
                .unwrap_or_default();
        }
        for kv in page.kvs() {
            if let Ok(k) = kv.key_str() {
                out.push((k.to_owned(), kv.value().to_vec()));
            }
        }
        match page.kvs().last() {
            Some(last) if page.more() => {
                from = last.key().to_vec();
                from.push(0);
            }
            _ => break,
        }
    }
    Ok((out, revision))
}

/// A watch client that accepts messages up to [`MAX_MESSAGE_BYTES`].
#[must_use]
pub fn watch_client(client: &Client) -> WatchClient {
    client.watch_client().max_decoding_message_size(MAX_MESSAGE_BYTES)
}

/// First wait before reconnecting to an etcd; it doubles after each failed session up to [`RECONNECT_MAX`].
pub const RECONNECT_MIN: Duration = Duration::from_millis(100);
/// Longest wait between sessions.
pub const RECONNECT_MAX: Duration = Duration::from_secs(5);
/// A session that lasted longer than this was healthy: the next wait starts over from [`RECONNECT_MIN`].
pub const RECONNECT_RESET_AFTER: Duration = Duration::from_secs(10);

const RECONNECT: ExponentialBuilder = ExponentialBuilder::new()
    .with_min_delay(RECONNECT_MIN)
    .with_max_delay(RECONNECT_MAX)
    .without_max_times();

/// The waits between the sessions of one etcd client (no jitter).
#[derive(Debug)]
pub struct Reconnect(ExponentialBackoff);

impl Default for Reconnect {
    fn default() -> Self {
        Self(RECONNECT.build())
    }
}

impl Reconnect {
    /// How long to wait before the next session, now that one that ran for `session` has ended.
    pub fn after(&mut self, session: Duration) -> Duration {
        if session > RECONNECT_RESET_AFTER {
            *self = Self::default();
        }
        let wait = self.0.next().unwrap_or(RECONNECT_MAX);
        // backon doubles in f32 (200.000003ms); whole milliseconds read better in logs.
        Duration::from_millis(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnects_back_off_from_100ms_doubling_to_5s_and_start_over_after_a_healthy_session() {
        let mut r = Reconnect::default();
        let short = Duration::from_secs(1);
        let waits: Vec<u64> = (0..8)
            .map(|_| u64::try_from(r.after(short).as_millis()).unwrap_or_default())
            .collect();
        assert_eq!(waits, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        assert_eq!(r.after(RECONNECT_RESET_AFTER + short), RECONNECT_MIN);
        assert_eq!(r.after(short), RECONNECT_MIN * 2);
    }

    #[test]
    fn prefix_end_is_the_first_key_after_the_prefix() {
        assert_eq!(prefix_end(b"fleetmesh/"), b"fleetmesh0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }
}
