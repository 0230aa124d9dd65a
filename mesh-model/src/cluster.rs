//! Cluster names and ids.

use std::fmt;

/// Largest cluster id. Ids are carried in 16-bit map fields; the lab and the first releases use 1..=4095.
pub const MAX_CLUSTER_ID: u16 = 4095;
// Every id fits the cluster part of an identity (the bits above the per-cluster number), and no larger one does.
const _: () = assert!(
    MAX_CLUSTER_ID as u32 == u32::MAX >> mesh_common::identity::LOCAL_BITS,
    "MAX_CLUSTER_ID must match the identity layout"
);
/// Longest cluster name (Cilium's limit).
pub const MAX_CLUSTER_NAME_LEN: usize = 32;

/// A cluster id, unique in a mesh. 0 is reserved for "unknown".
pub type ClusterId = u16;

/// Why a cluster name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClusterNameError {
    #[error("cluster name is empty")]
    Empty,
    #[error("cluster name {0:?} is longer than {MAX_CLUSTER_NAME_LEN} characters")]
    TooLong(String),
    #[error(
        "cluster name {0:?} must consist of lower case letters, digits and '-', and start and end with a letter \
         or digit (^([a-z0-9][-a-z0-9]*)?[a-z0-9]$)"
    )]
    BadCharacters(String),
}

/// A validated cluster name: `^([a-z0-9][-a-z0-9]*)?[a-z0-9]$`, at most 32 characters.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClusterName(String);

impl ClusterName {
    /// Validates `name`.
    ///
    /// # Errors
    /// When the name is empty, too long, or breaks the character rule.
    pub fn new(name: &str) -> Result<Self, ClusterNameError> {
        validate_cluster_name(name)?;
        Ok(Self(name.to_owned()))
    }

    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ClusterName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for ClusterName {
    type Err = ClusterNameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// Checks a cluster name against Cilium's rule.
///
/// # Errors
/// When the name is empty, too long, or breaks the character rule.
pub fn validate_cluster_name(name: &str) -> Result<(), ClusterNameError> {
    if name.is_empty() {
        return Err(ClusterNameError::Empty);
    }
    if name.len() > MAX_CLUSTER_NAME_LEN {
        return Err(ClusterNameError::TooLong(name.to_owned()));
    }
    let ok_inner = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
    let ok_edge = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    let first = name.chars().next().is_some_and(ok_edge);
    let last = name.chars().last().is_some_and(ok_edge);
    if !(first && last && name.chars().all(ok_inner)) {
        return Err(ClusterNameError::BadCharacters(name.to_owned()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_cilium_style_names() {
        for n in ["east", "a", "eu-west-1", "0", "c1"] {
            assert!(ClusterName::new(n).is_ok(), "{n}");
        }
    }

    #[test]
    fn the_largest_cluster_id_owns_the_top_identities() {
        use mesh_common::identity;
        let top = identity::compose(MAX_CLUSTER_ID, identity::LOCAL_MASK);
        assert_eq!(top, u32::MAX);
        assert_eq!(identity::cluster(top), MAX_CLUSTER_ID);
        assert_eq!(
            identity::cluster(identity::compose(1, identity::FIRST_ALLOCATED)),
            1
        );
    }

    #[test]
    fn refuses_bad_names() {
        assert_eq!(ClusterName::new(""), Err(ClusterNameError::Empty));
        assert!(matches!(
            ClusterName::new("East"),
            Err(ClusterNameError::BadCharacters(_))
        ));
        assert!(matches!(
            ClusterName::new("-east"),
            Err(ClusterNameError::BadCharacters(_))
        ));
        assert!(matches!(
            ClusterName::new("east-"),
            Err(ClusterNameError::BadCharacters(_))
        ));
        assert!(matches!(
            ClusterName::new("ea_st"),
            Err(ClusterNameError::BadCharacters(_))
        ));
        assert!(matches!(
            ClusterName::new(&"a".repeat(33)),
            Err(ClusterNameError::TooLong(_))
        ));
        assert!(ClusterName::new(&"a".repeat(32)).is_ok());
    }
}
