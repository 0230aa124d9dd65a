//! Typed watches that survive malformed objects.
//!
//! kube-runtime's watcher decodes a whole list page (and each watch event) into its `K`. With a plain typed `K`,
//! one custom object that does not read as `K` fails the whole list (`InitialListFailed`: the kind is never
//! listed, and the watcher retries forever) or the event, and the other objects are lost with it. A
//! [`Lenient<K>`] is `K`'s resource (its group, version, kind and plural come from `K`, so the API path is typed)
//! whose decoding only needs the metadata: it keeps the object's JSON, and reads it as `K` on demand
//! ([`Lenient::parse`]). Each consumer refuses a malformed object with its reason; the others are unaffected.

use std::borrow::Cow;
use std::marker::PhantomData;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer, Serialize};

/// An object of kind `K` as the API server sent it, which may not read as a `K`.
#[derive(Debug)]
pub struct Lenient<K> {
    pub metadata: ObjectMeta,
    /// The whole object, with `apiVersion` and `kind` filled in (list items may come without them).
    pub raw: serde_json::Value,
    kind: PhantomData<fn() -> K>,
}

impl<K> Clone for Lenient<K> {
    fn clone(&self) -> Self {
        Self {
            metadata: self.metadata.clone(),
            raw: self.raw.clone(),
            kind: PhantomData,
        }
    }
}

impl<K: Resource<DynamicType = ()>> Lenient<K> {
    /// The object as a `K`.
    ///
    /// # Errors
    /// When it does not read as one (the error names the field).
    pub fn parse(&self) -> Result<K, serde_json::Error>
    where
        K: DeserializeOwned,
    {
        K::deserialize(&self.raw)
    }

    /// The object's `status` (the status subresource), as `S`; `None` when it has none or it does not read as one.
    #[must_use]
    pub fn status<S: DeserializeOwned>(&self) -> Option<S> {
        S::deserialize(self.raw.get("status")?).ok()
    }
}

impl<K: Resource<DynamicType = ()>> Resource for Lenient<K> {
    type DynamicType = ();
    type Scope = K::Scope;

    fn kind(dt: &()) -> Cow<'_, str> {
        K::kind(dt)
    }

    fn group(dt: &()) -> Cow<'_, str> {
        K::group(dt)
    }

    fn version(dt: &()) -> Cow<'_, str> {
        K::version(dt)
    }

    fn plural(dt: &()) -> Cow<'_, str> {
        K::plural(dt)
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl<'de, K: Resource<DynamicType = ()>> Deserialize<'de> for Lenient<K> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut raw = serde_json::Value::deserialize(d)?;
        let Some(map) = raw.as_object_mut() else {
            return Err(D::Error::custom(format!("a {} is an object", K::kind(&()))));
        };
        map.entry("apiVersion")
            .or_insert_with(|| K::api_version(&()).into_owned().into());
        map.entry("kind")
            .or_insert_with(|| K::kind(&()).into_owned().into());
        // The API server checks metadata itself: it always reads.
        let metadata = match raw.get("metadata") {
            Some(m) => ObjectMeta::deserialize(m).map_err(D::Error::custom)?,
            None => ObjectMeta::default(),
        };
        Ok(Self {
            metadata,
            raw,
            kind: PhantomData,
        })
    }
}

impl<K> Serialize for Lenient<K> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.raw.serialize(s)
    }
}

#[cfg(test)]
mod tests {
    use kube::core::ObjectList;
    use serde_json::json;

    use super::*;
    use crate::crd::{MeshNetworkPolicy, TrafficPolicy};

    #[test]
    fn a_malformed_object_does_not_fail_its_list_and_says_why() {
        let list = json!({
            "apiVersion": "fleetmesh.io/v1alpha1", "kind": "TrafficPolicyList", "metadata": {},
            "items": [
                {"metadata": {"name": "good", "namespace": "shop"},
                 "spec": {"service": "api", "weights": []}},
                {"metadata": {"name": "bad", "namespace": "shop"}, "spec": {"service": 7}},
            ]
        });
        // Typed, the list does not read at all.
        assert!(serde_json::from_value::<ObjectList<TrafficPolicy>>(list.clone()).is_err());
        let list: ObjectList<Lenient<TrafficPolicy>> = serde_json::from_value(list).expect("lenient list");
        let [good, bad] = &list.items[..] else {
            panic!("two items: {:?}", list.items)
        };
        assert_eq!(good.metadata.name.as_deref(), Some("good"));
        assert_eq!(good.raw["apiVersion"], "fleetmesh.io/v1alpha1");
        assert_eq!(good.raw["kind"], "TrafficPolicy");
        assert_eq!(good.parse().expect("reads").spec.0.service, "api");
        assert_eq!(bad.metadata.name.as_deref(), Some("bad"));
        let e = bad.parse().expect_err("service is a string");
        assert!(e.to_string().contains("invalid type"), "{e}");
    }

    #[test]
    fn the_resource_is_the_typed_kinds() {
        assert_eq!(Lenient::<MeshNetworkPolicy>::plural(&()), "meshnetworkpolicies");
        assert_eq!(
            Lenient::<MeshNetworkPolicy>::api_version(&()),
            "fleetmesh.io/v1alpha1"
        );
        assert_eq!(Lenient::<MeshNetworkPolicy>::kind(&()), "MeshNetworkPolicy");
    }
}
