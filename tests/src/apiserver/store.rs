//! The object store behind the fake API server: current objects, one global resourceVersion
//! counter, the change history that watches replay, label/field selectors and JSON merge
//! patch. Everything here is synchronous and runs under the server's mutex.

use std::collections::{BTreeMap, HashMap};

use serde_json::{Map, Value};

use super::Kind;

/// What went wrong with a store or server operation; the HTTP layer maps each to the status
/// code a real API server answers with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{kind} \"{name}\" not found")]
    NotFound { kind: &'static str, name: String },
    #[error("{kind} \"{name}\" already exists")]
    AlreadyExists { kind: &'static str, name: String },
    #[error(
        "Operation cannot be fulfilled on {kind} \"{name}\": the object has been modified; \
         please apply your changes to the latest version and try again"
    )]
    Conflict { kind: &'static str, name: String },
    #[error("invalid object: {0}")]
    Invalid(String),
    #[error("unable to parse requirement: {0}")]
    BadSelector(String),
    #[error("the provided continue parameter is too old to display a consistent list result")]
    ContinueExpired,
    #[error("(de)serializing an object: {0}")]
    Json(#[from] serde_json::Error),
    #[error("binding the API server's listener on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("writing the kubeconfig {path}: {source}")]
    Kubeconfig {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// The type of a recorded change, as it appears in a watch event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeType {
    Added,
    Modified,
    Deleted,
}

/// One bump of the global resourceVersion.
#[derive(Clone, Debug)]
pub struct Change {
    pub rv: u64,
    pub kind: Kind,
    pub change: ChangeType,
    pub object: Value,
    /// The object before a modification; a watch with a selector needs it to turn a change
    /// that moves an object out of (or into) the selection into DELETED (or ADDED).
    pub previous: Option<Value>,
}

/// A paginated list's remaining items, consistent at the resourceVersion of its first page.
struct Page {
    rv: u64,
    rest: Vec<Value>,
}

type Key = (Kind, String, String);

#[derive(Default)]
pub struct Store {
    rv: u64,
    next_uid: u64,
    objects: BTreeMap<Key, Value>,
    history: Vec<Change>,
    /// History before this resourceVersion is forgotten: a watch from an older one is 410.
    compacted_at: u64,
    pages: HashMap<String, Page>,
    next_page: u64,
}

/// A watch from a resourceVersion whose history was compacted away.
#[derive(Debug)]
pub struct Gone {
    pub requested: u64,
    pub oldest: u64,
}

pub fn name_of(obj: &Value) -> &str {
    obj.pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("")
}

pub fn namespace_of(obj: &Value) -> &str {
    obj.pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or("")
}

fn metadata_mut(obj: &mut Value) -> Result<&mut Map<String, Value>, Error> {
    let root = obj
        .as_object_mut()
        .ok_or_else(|| Error::Invalid("not a JSON object".into()))?;
    root.entry("metadata")
        .or_insert_with(|| Value::Object(Map::new()))
        .as_object_mut()
        .ok_or_else(|| Error::Invalid("metadata is not an object".into()))
}

fn set_rv(obj: &mut Value, rv: u64) -> Result<(), Error> {
    metadata_mut(obj)?.insert("resourceVersion".into(), Value::String(rv.to_string()));
    Ok(())
}

impl Store {
    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    fn key(kind: Kind, obj: &Value) -> Result<Key, Error> {
        let name = name_of(obj);
        if name.is_empty() {
            return Err(Error::Invalid(format!(
                "{}: metadata.name is required",
                kind.info().kind
            )));
        }
        let ns = namespace_of(obj);
        match (kind.info().namespaced, ns.is_empty()) {
            (true, true) => Err(Error::Invalid(format!(
                "{} {name}: metadata.namespace is required",
                kind.info().kind
            ))),
            (false, false) => Err(Error::Invalid(format!(
                "{} {name} is cluster-scoped but has metadata.namespace {ns}",
                kind.info().kind
            ))),
            _ => Ok((kind, ns.to_string(), name.to_string())),
        }
    }

    fn record(&mut self, kind: Kind, change: ChangeType, object: Value, previous: Option<Value>) {
        self.history.push(Change {
            rv: self.rv,
            kind,
            change,
            object,
            previous,
        });
    }

    pub fn create(&mut self, kind: Kind, mut obj: Value) -> Result<Value, Error> {
        let key = Self::key(kind, &obj)?;
        if self.objects.contains_key(&key) {
            return Err(Error::AlreadyExists {
                kind: kind.info().plural,
                name: key.2,
            });
        }
        let info = kind.info();
        let root = obj
            .as_object_mut()
            .ok_or_else(|| Error::Invalid("not a JSON object".into()))?;
        root.entry("apiVersion")
            .or_insert_with(|| Value::String(info.api_version(info.versions[0])));
        root.insert("kind".into(), Value::String(info.kind.into()));
        self.next_uid += 1;
        let uid = format!("00000000-0000-4000-8000-{:012x}", self.next_uid);
        let meta = metadata_mut(&mut obj)?;
        if meta
            .get("uid")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            meta.insert("uid".into(), Value::String(uid));
        }
        meta.entry("creationTimestamp")
            .or_insert_with(|| Value::String("2026-01-01T00:00:00Z".into()));
        self.rv += 1;
        set_rv(&mut obj, self.rv)?;
        self.objects.insert(key, obj.clone());
        self.record(kind, ChangeType::Added, obj.clone(), None);
        Ok(obj)
    }

    /// Replaces an object. A non-empty metadata.resourceVersion must match the stored one
    /// (optimistic concurrency); uid and creationTimestamp are kept. An update that changes
    /// nothing returns the stored object without bumping the resourceVersion, as a real API
    /// server does.
    pub fn update(&mut self, kind: Kind, mut obj: Value) -> Result<Value, Error> {
        let key = Self::key(kind, &obj)?;
        let Some(old) = self.objects.get(&key) else {
            return Err(Error::NotFound {
                kind: kind.info().plural,
                name: key.2,
            });
        };
        let old_rv = old.pointer("/metadata/resourceVersion").cloned();
        match obj
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
        {
            Some(rv) if !rv.is_empty() && Some(rv) != old_rv.as_ref().and_then(Value::as_str) => {
                return Err(Error::Conflict {
                    kind: kind.info().plural,
                    name: key.2,
                });
            }
            _ => {}
        }
        let info = kind.info();
        let root = obj
            .as_object_mut()
            .ok_or_else(|| Error::Invalid("not a JSON object".into()))?;
        root.entry("apiVersion")
            .or_insert_with(|| Value::String(info.api_version(info.versions[0])));
        root.insert("kind".into(), Value::String(info.kind.into()));
        let meta = metadata_mut(&mut obj)?;
        for kept in ["uid", "creationTimestamp"] {
            if let Some(v) = old.pointer(&format!("/metadata/{kept}")) {
                meta.insert(kept.into(), v.clone());
            }
        }
        if let Some(rv) = old_rv {
            meta.insert("resourceVersion".into(), rv);
        }
        if &obj == old {
            return Ok(obj);
        }
        let previous = old.clone();
        self.rv += 1;
        set_rv(&mut obj, self.rv)?;
        self.objects.insert(key, obj.clone());
        self.record(kind, ChangeType::Modified, obj.clone(), Some(previous));
        Ok(obj)
    }

    pub fn delete(&mut self, kind: Kind, namespace: &str, name: &str) -> Result<Value, Error> {
        let key = (kind, namespace.to_string(), name.to_string());
        let Some(mut obj) = self.objects.remove(&key) else {
            return Err(Error::NotFound {
                kind: kind.info().plural,
                name: name.to_string(),
            });
        };
        self.rv += 1;
        set_rv(&mut obj, self.rv)?;
        self.record(kind, ChangeType::Deleted, obj.clone(), None);
        Ok(obj)
    }

    pub fn get(&self, kind: Kind, namespace: &str, name: &str) -> Option<&Value> {
        self.objects
            .get(&(kind, namespace.to_string(), name.to_string()))
    }

    /// The objects of `kind` that pass `filter`, ordered by namespace and name.
    pub fn list(&self, kind: Kind, filter: &Filter) -> Vec<Value> {
        self.objects
            .iter()
            .filter(|((k, _, _), obj)| *k == kind && filter.matches(obj))
            .map(|(_, obj)| obj.clone())
            .collect()
    }

    /// Keeps the items after the first page so that `continue` serves them at the same
    /// resourceVersion; returns the token.
    pub fn save_page(&mut self, rv: u64, rest: Vec<Value>) -> String {
        self.next_page += 1;
        let token = format!("page-{}-{rv}", self.next_page);
        self.pages.insert(token.clone(), Page { rv, rest });
        token
    }

    /// The remaining items of a paginated list and its resourceVersion.
    pub fn take_page(&mut self, token: &str) -> Result<(u64, Vec<Value>), Error> {
        self.pages
            .remove(token)
            .map(|p| (p.rv, p.rest))
            .ok_or(Error::ContinueExpired)
    }

    /// The changes of `kind` after `since`, or Gone when that history was compacted.
    pub fn changes_since(&self, kind: Kind, since: u64) -> Result<Vec<Change>, Gone> {
        if since < self.compacted_at {
            return Err(Gone {
                requested: since,
                oldest: self.compacted_at,
            });
        }
        let start = self.history.partition_point(|c| c.rv <= since);
        Ok(self.history[start..]
            .iter()
            .filter(|c| c.kind == kind)
            .cloned()
            .collect())
    }

    /// Forgets all history and every pending continue token.
    pub fn compact(&mut self) {
        self.history.clear();
        self.pages.clear();
        self.compacted_at = self.rv;
    }
}

/// RFC 7386 JSON merge patch. Written by hand because it is a dozen lines and no crate in
/// the workspace provides it; the strategic merge patch of labels/annotations is the same.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(target) = target {
        for (key, value) in patch {
            if value.is_null() {
                target.remove(key);
            } else {
                merge_patch(target.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
    }
}

/// One requirement of a label selector.
#[derive(Debug, Clone)]
enum LabelReq {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// Which objects a list or watch sees: namespace from the path, label and field selectors
/// from the query.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub namespace: Option<String>,
    labels: Vec<LabelReq>,
    /// (dotted field path, value, must equal)
    fields: Vec<(String, String, bool)>,
}

fn split_top_level_commas(s: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
        .into_iter()
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect()
}

fn parse_set(key: &str, rest: &str, req: &str) -> Result<(String, Vec<String>), Error> {
    let inner = rest
        .trim()
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(|| Error::BadSelector(format!("{req}: expected a (value, ...) set")))?;
    let values = inner.split(',').map(|v| v.trim().to_string()).collect();
    Ok((key.trim().to_string(), values))
}

impl Filter {
    pub fn new(
        namespace: Option<String>,
        label_selector: Option<&str>,
        field_selector: Option<&str>,
    ) -> Result<Self, Error> {
        let mut filter = Filter {
            namespace,
            ..Default::default()
        };
        for req in split_top_level_commas(label_selector.unwrap_or("")) {
            let parsed = if let Some((k, v)) = req.split_once("!=") {
                LabelReq::NotEquals(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = req.split_once("==").or_else(|| req.split_once('=')) {
                LabelReq::Equals(k.trim().into(), v.trim().into())
            } else if let Some((k, rest)) = req.split_once(" notin ") {
                let (k, vs) = parse_set(k, rest, req)?;
                LabelReq::NotIn(k, vs)
            } else if let Some((k, rest)) = req.split_once(" in ") {
                let (k, vs) = parse_set(k, rest, req)?;
                LabelReq::In(k, vs)
            } else if let Some(k) = req.strip_prefix('!') {
                LabelReq::NotExists(k.trim().into())
            } else if req.contains(|c: char| c.is_whitespace() || "()".contains(c)) {
                return Err(Error::BadSelector(req.to_string()));
            } else {
                LabelReq::Exists(req.into())
            };
            filter.labels.push(parsed);
        }
        for req in split_top_level_commas(field_selector.unwrap_or("")) {
            let parsed = if let Some((k, v)) = req.split_once("!=") {
                (k.trim().to_string(), v.trim().to_string(), false)
            } else if let Some((k, v)) = req.split_once("==").or_else(|| req.split_once('=')) {
                (k.trim().to_string(), v.trim().to_string(), true)
            } else {
                return Err(Error::BadSelector(format!("field selector {req}")));
            };
            filter.fields.push(parsed);
        }
        Ok(filter)
    }

    pub fn matches(&self, obj: &Value) -> bool {
        if let Some(ns) = &self.namespace
            && namespace_of(obj) != ns
        {
            return false;
        }
        let label = |k: &str| {
            obj.pointer("/metadata/labels")
                .and_then(|l| l.get(k))
                .and_then(Value::as_str)
        };
        let labels_ok = self.labels.iter().all(|req| match req {
            LabelReq::Equals(k, v) => label(k) == Some(v),
            LabelReq::NotEquals(k, v) => label(k) != Some(v),
            LabelReq::In(k, vs) => label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            LabelReq::NotIn(k, vs) => label(k).is_none_or(|l| vs.iter().all(|v| v != l)),
            LabelReq::Exists(k) => label(k).is_some(),
            LabelReq::NotExists(k) => label(k).is_none(),
        });
        labels_ok
            && self.fields.iter().all(|(path, want, equal)| {
                let pointer = format!("/{}", path.replace('.', "/"));
                let have = match obj.pointer(&pointer) {
                    None | Some(Value::Null) => String::new(),
                    Some(Value::String(s)) => s.clone(),
                    Some(other) => other.to_string(),
                };
                (have == *want) == *equal
            })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn labelled(labels: Value) -> Value {
        json!({"metadata": {"name": "a", "namespace": "ns", "labels": labels},
               "spec": {"nodeName": "n1"}})
    }

    #[test]
    fn label_selector_forms() {
        let obj = labelled(json!({"app": "web", "tier": "front"}));
        let sel = |s: &str| Filter::new(None, Some(s), None).unwrap().matches(&obj);
        assert!(sel("app=web,tier in (front, back)"));
        assert!(sel("app==web,!missing,tier"));
        assert!(!sel("app!=web"));
        assert!(!sel("tier notin (front)"));
        assert!(sel("tier notin (back),other notin (x)"));
        assert!(matches!(
            Filter::new(None, Some("app in front"), None),
            Err(Error::BadSelector(_))
        ));
    }

    #[test]
    fn field_selector_and_namespace() {
        let obj = labelled(json!({}));
        let f = |ns: Option<&str>, s: &str| {
            Filter::new(ns.map(Into::into), None, Some(s))
                .unwrap()
                .matches(&obj)
        };
        assert!(f(None, "spec.nodeName=n1,metadata.name=a"));
        assert!(!f(None, "spec.nodeName=n2"));
        assert!(f(None, "spec.nodeName!=n2"));
        assert!(!f(Some("other"), "metadata.name=a"));
        assert!(f(None, "spec.hostNetwork="));
    }

    #[test]
    fn merge_patch_removes_nulls_and_merges_maps() {
        let mut target = json!({"metadata": {"annotations": {"a": "1", "b": "2"}}});
        merge_patch(
            &mut target,
            &json!({"metadata": {"annotations": {"a": null, "c": "3"}}}),
        );
        assert_eq!(
            target,
            json!({"metadata": {"annotations": {"b": "2", "c": "3"}}})
        );
    }
}
