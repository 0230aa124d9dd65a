//! A node's WireGuard endpoint as it travels from its Node object to the node records of the mesh
//! (docs/encryption.md): its public key and the UDP port its agent receives on (at its underlay address).

use std::collections::BTreeMap;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

/// Node annotation with the node's WireGuard public key (base64 of 32 bytes, as `wg pubkey` prints it), written
/// by the node's agent (or, in the lab, for it).
pub const ANNOTATION_PUBLIC_KEY: &str = "fleetmesh.io/wireguard-public-key";
/// Node annotation with the UDP port the node's agent receives WireGuard on; [`DEFAULT_PORT`] when absent.
pub const ANNOTATION_PORT: &str = "fleetmesh.io/wireguard-port";
/// The agent's default WireGuard port (the one Cilium uses).
pub const DEFAULT_PORT: u16 = 51871;

/// A node's WireGuard endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WireguardEndpoint {
    /// The node's public key, base64 (44 characters).
    pub public_key: String,
    /// UDP port at the node's underlay address.
    pub port: u16,
}

/// Decodes a base64 WireGuard key (public or private) into its 32 bytes.
///
/// # Errors
///
/// A message naming what is wrong (not base64, not 32 bytes).
pub fn decode_key(text: &str) -> Result<[u8; 32], String> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|e| format!("{text:?} is not base64: {e}"))?;
    <[u8; 32]>::try_from(bytes.as_slice())
        .map_err(|_| format!("{text:?} is {} bytes, a WireGuard key is 32", bytes.len()))
}

/// Encodes a WireGuard key as base64.
#[must_use]
pub fn encode_key(key: &[u8; 32]) -> String {
    base64::engine::general_purpose::STANDARD.encode(key)
}

/// The endpoint a Node's annotations describe: `None` without the public key annotation.
///
/// # Errors
///
/// A message naming the annotation and what is wrong with it.
pub fn from_annotations(annotations: &BTreeMap<String, String>) -> Result<Option<WireguardEndpoint>, String> {
    let Some(key) = annotations.get(ANNOTATION_PUBLIC_KEY) else {
        return Ok(None);
    };
    decode_key(key).map_err(|e| format!("{ANNOTATION_PUBLIC_KEY}: {e}"))?;
    let port = match annotations.get(ANNOTATION_PORT) {
        None => DEFAULT_PORT,
        Some(p) => match p.trim().parse::<u16>() {
            Ok(port) if port != 0 => port,
            _ => return Err(format!("{ANNOTATION_PORT}: {p:?} is not a UDP port (1-65535)")),
        },
    };
    Ok(Some(WireguardEndpoint {
        public_key: key.trim().to_owned(),
        port,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=";

    fn ann(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn annotations_give_the_endpoint_with_the_default_port() {
        assert_eq!(from_annotations(&ann(&[])), Ok(None));
        assert_eq!(
            from_annotations(&ann(&[(ANNOTATION_PUBLIC_KEY, KEY)])),
            Ok(Some(WireguardEndpoint {
                public_key: KEY.into(),
                port: DEFAULT_PORT
            }))
        );
        let got = from_annotations(&ann(&[(ANNOTATION_PUBLIC_KEY, KEY), (ANNOTATION_PORT, "51000")]));
        assert_eq!(got.map(|e| e.map(|e| e.port)), Ok(Some(51000)));
        let key = decode_key(KEY).expect("valid");
        assert_eq!(encode_key(&key), KEY);
    }

    #[test]
    fn bad_keys_and_ports_are_refused_with_the_annotation_named() {
        for (pairs, needle) in [
            (vec![(ANNOTATION_PUBLIC_KEY, "not base64!")], "is not base64"),
            (vec![(ANNOTATION_PUBLIC_KEY, "AAAA")], "is 3 bytes"),
            (
                vec![(ANNOTATION_PUBLIC_KEY, KEY), (ANNOTATION_PORT, "0")],
                ANNOTATION_PORT,
            ),
            (
                vec![(ANNOTATION_PUBLIC_KEY, KEY), (ANNOTATION_PORT, "70000")],
                "not a UDP port",
            ),
        ] {
            let err = from_annotations(&ann(&pairs)).expect_err("refused");
            assert!(err.contains(needle), "{err}");
        }
    }
}
