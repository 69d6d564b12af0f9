//! Publishing the mesh root: the CA writes the roots it hands out into the ConfigMap
//! `ambit-root` of its namespace (key `root.pem`), which the agents mount as their
//! `--ca-trust-file`. No manual step between install and the first certificate.
//!
//! Race-safe with several replicas: create; if it exists, read it, compare, and replace it
//! only when it differs, with the resourceVersion read (optimistic concurrency, so a
//! concurrent writer makes the replace fail with 409 and the loop reads again). Replicas
//! with the same roots never write after the first create. The CA reads its key at start,
//! so the roots it hands out change only when a replica starts (after each step of a root
//! rotation, docs/CERTIFICATES.md): it publishes then, and the newest replica's roots win.

use std::collections::BTreeMap;

use futures::future::BoxFuture;

use super::CaError;

/// The ConfigMap key the agents' volume projects to `root.pem`.
pub const ROOT_KEY: &str = "root.pem";
/// How many create/get/replace rounds one publication tries before giving up (each lost
/// round means another replica wrote in between; the caller retries later).
const MAX_ROUNDS: usize = 5;

pub type ConfigMapData = BTreeMap<String, String>;

/// A stored ConfigMap: its data and the resourceVersion it was read at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredConfigMap {
    pub data: ConfigMapData,
    pub resource_version: String,
}

/// What a write to the API server did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Write {
    Done,
    /// 409: it already exists (create) or changed since it was read (replace).
    Conflict,
}

/// The ConfigMaps of the CA's namespace: over kube-rs in production
/// ([`super::kube::KubeConfigMaps`]), in memory in tests.
pub trait ConfigMapStore: Send + Sync {
    fn get<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<StoredConfigMap>, CaError>>;
    fn create<'a>(
        &'a self,
        name: &'a str,
        data: ConfigMapData,
    ) -> BoxFuture<'a, Result<Write, CaError>>;
    /// Replaces the data, only if the object is still at `resource_version`.
    fn replace<'a>(
        &'a self,
        name: &'a str,
        data: ConfigMapData,
        resource_version: &'a str,
    ) -> BoxFuture<'a, Result<Write, CaError>>;
}

/// What [`publish_roots`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Published {
    Created,
    Updated,
    /// It already held exactly these roots: nothing written.
    Unchanged,
}

impl Published {
    pub fn as_str(self) -> &'static str {
        match self {
            Published::Created => "created",
            Published::Updated => "updated",
            Published::Unchanged => "unchanged",
        }
    }
}

/// Makes ConfigMap `name` hold `roots_pem` under [`ROOT_KEY`] (other keys are kept).
pub async fn publish_roots(
    store: &dyn ConfigMapStore,
    name: &str,
    roots_pem: &str,
) -> Result<Published, CaError> {
    let wanted = ConfigMapData::from([(ROOT_KEY.to_owned(), roots_pem.to_owned())]);
    for _ in 0..MAX_ROUNDS {
        if store.create(name, wanted.clone()).await? == Write::Done {
            return Ok(Published::Created);
        }
        let Some(current) = store.get(name).await? else {
            // Deleted between our create and get: create again.
            continue;
        };
        if current.data.get(ROOT_KEY).map(String::as_str) == Some(roots_pem) {
            return Ok(Published::Unchanged);
        }
        let mut data = current.data;
        data.insert(ROOT_KEY.to_owned(), roots_pem.to_owned());
        match store.replace(name, data, &current.resource_version).await? {
            Write::Done => return Ok(Published::Updated),
            Write::Conflict => continue,
        }
    }
    Err(CaError::Publish(format!(
        "ConfigMap {name} kept changing under {MAX_ROUNDS} attempts to write it"
    )))
}

#[cfg(test)]
pub(crate) mod memory {
    use std::sync::Mutex;

    use futures::FutureExt;

    use super::*;

    /// ConfigMaps in a map with resourceVersions; counts the writes that changed something.
    #[derive(Default)]
    pub struct MemoryConfigMaps {
        pub maps: Mutex<BTreeMap<String, StoredConfigMap>>,
        pub writes: Mutex<u32>,
        next_rv: Mutex<u64>,
    }

    impl MemoryConfigMaps {
        fn bump(&self) -> String {
            let mut rv = self.next_rv.lock().unwrap();
            *rv += 1;
            rv.to_string()
        }

        pub fn root(&self, name: &str) -> Option<String> {
            self.maps
                .lock()
                .unwrap()
                .get(name)
                .and_then(|m| m.data.get(ROOT_KEY).cloned())
        }
    }

    impl ConfigMapStore for MemoryConfigMaps {
        fn get<'a>(
            &'a self,
            name: &'a str,
        ) -> BoxFuture<'a, Result<Option<StoredConfigMap>, CaError>> {
            let found = self.maps.lock().unwrap().get(name).cloned();
            // Yield so that concurrent publishers interleave between read and write.
            async move {
                tokio::task::yield_now().await;
                Ok(found)
            }
            .boxed()
        }

        fn create<'a>(
            &'a self,
            name: &'a str,
            data: ConfigMapData,
        ) -> BoxFuture<'a, Result<Write, CaError>> {
            let rv = self.bump();
            let mut maps = self.maps.lock().unwrap();
            let result = if maps.contains_key(name) {
                Write::Conflict
            } else {
                maps.insert(
                    name.to_owned(),
                    StoredConfigMap {
                        data,
                        resource_version: rv,
                    },
                );
                *self.writes.lock().unwrap() += 1;
                Write::Done
            };
            futures::future::ready(Ok(result)).boxed()
        }

        fn replace<'a>(
            &'a self,
            name: &'a str,
            data: ConfigMapData,
            resource_version: &'a str,
        ) -> BoxFuture<'a, Result<Write, CaError>> {
            let rv = self.bump();
            let mut maps = self.maps.lock().unwrap();
            let result = match maps.get_mut(name) {
                Some(stored) if stored.resource_version == resource_version => {
                    *stored = StoredConfigMap {
                        data,
                        resource_version: rv,
                    };
                    *self.writes.lock().unwrap() += 1;
                    Write::Done
                }
                _ => Write::Conflict,
            };
            futures::future::ready(Ok(result)).boxed()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::memory::MemoryConfigMaps;
    use super::*;

    #[tokio::test]
    async fn creates_then_leaves_equal_roots_alone_then_updates_changed_ones() {
        let store = MemoryConfigMaps::default();
        let published = publish_roots(&store, "ambit-root", "OLD").await.unwrap();
        assert_eq!(published, Published::Created);
        assert_eq!(store.root("ambit-root").as_deref(), Some("OLD"));

        let published = publish_roots(&store, "ambit-root", "OLD").await.unwrap();
        assert_eq!(published, Published::Unchanged);
        assert_eq!(*store.writes.lock().unwrap(), 1, "no write for equal roots");

        // A key someone else added survives the update.
        store
            .maps
            .lock()
            .unwrap()
            .get_mut("ambit-root")
            .unwrap()
            .data
            .insert("note".into(), "kept".into());
        let published = publish_roots(&store, "ambit-root", "OLDNEW").await.unwrap();
        assert_eq!(published, Published::Updated);
        let maps = store.maps.lock().unwrap();
        assert_eq!(
            maps["ambit-root"].data,
            ConfigMapData::from([
                ("note".into(), "kept".into()),
                (ROOT_KEY.into(), "OLDNEW".into())
            ])
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_replicas_with_the_same_roots_write_once() {
        let store = Arc::new(MemoryConfigMaps::default());
        let publish = |store: Arc<MemoryConfigMaps>| {
            tokio::spawn(async move { publish_roots(store.as_ref(), "ambit-root", "R").await })
        };
        let (a, b) = (publish(store.clone()), publish(store.clone()));
        let mut outcomes = [a.await.unwrap().unwrap(), b.await.unwrap().unwrap()];
        outcomes.sort_by_key(|o| *o as u8);
        assert_eq!(outcomes, [Published::Created, Published::Unchanged]);
        assert_eq!(*store.writes.lock().unwrap(), 1);
    }

    /// A replace that lost the race (stale resourceVersion) reads again and decides again.
    #[tokio::test]
    async fn a_stale_replace_reads_again() {
        struct Racing {
            inner: MemoryConfigMaps,
            raced: std::sync::Mutex<bool>,
        }
        impl ConfigMapStore for Racing {
            fn get<'a>(
                &'a self,
                name: &'a str,
            ) -> BoxFuture<'a, Result<Option<StoredConfigMap>, CaError>> {
                self.inner.get(name)
            }
            fn create<'a>(
                &'a self,
                name: &'a str,
                data: ConfigMapData,
            ) -> BoxFuture<'a, Result<Write, CaError>> {
                self.inner.create(name, data)
            }
            fn replace<'a>(
                &'a self,
                name: &'a str,
                data: ConfigMapData,
                resource_version: &'a str,
            ) -> BoxFuture<'a, Result<Write, CaError>> {
                // The first replace finds that another replica wrote "OTHER" just before.
                let mut raced = self.raced.lock().unwrap();
                if !*raced {
                    *raced = true;
                    drop(raced);
                    let rv = self.inner.maps.lock().unwrap()[name]
                        .resource_version
                        .clone();
                    let other = ConfigMapData::from([(ROOT_KEY.into(), "OTHER".into())]);
                    // The memory store writes when called; its future only carries the result.
                    drop(self.inner.replace(name, other, &rv));
                }
                self.inner.replace(name, data, resource_version)
            }
        }
        let store = Racing {
            inner: MemoryConfigMaps::default(),
            raced: std::sync::Mutex::new(false),
        };
        publish_roots(&store, "ambit-root", "OLD").await.unwrap();
        let published = publish_roots(&store, "ambit-root", "NEW").await.unwrap();
        assert_eq!(published, Published::Updated);
        assert_eq!(store.inner.root("ambit-root").as_deref(), Some("NEW"));
        // create, the racing write, our successful replace.
        assert_eq!(*store.inner.writes.lock().unwrap(), 3);
    }
}
