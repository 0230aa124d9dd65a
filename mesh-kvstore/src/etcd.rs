//! Reading a cluster's records from etcd, as agents and the KVStoreMesh mirror both do: a paged list at one
//! revision (a cluster's state can be far larger than one gRPC message), and the message size limit for it.

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_is_the_first_key_after_the_prefix() {
        assert_eq!(prefix_end(b"fleetmesh/"), b"fleetmesh0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }
}
