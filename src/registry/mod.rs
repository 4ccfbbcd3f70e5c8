//! The plugin registry: tenants' uploaded plugins, their versions and chains,
//! kept in a [`store::Store`] and put live by swapping a tenant's chain.
//!
//! - [`model`]: the stored documents (per tenant: plugins, versions, chain)
//! - [`store`]: the storage contract; [`fs`] a data directory, [`redis`] a
//!   Redis shared by replicas (with the data directory as last good copy)
//!
//! Every change is a compare-and-swap of the tenant's index. The chain it
//! implies is built (compiled, linked, each plugin describing itself under
//! its config) *before* the write, so a stored index always has a chain that
//! loads; the built chain is then swapped in whole. Replicas sharing Redis
//! poll the revisions and build the same chain.

pub mod fs;
pub mod model;
pub mod redis;
pub mod store;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use sha2::Digest;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::config::{FailurePolicy, RegistryConfig};
use crate::pipeline::Gateway;
use crate::plugins::chain::{Chain, Entry};
use crate::plugins::{LoadError, PluginEngine, builtin};
use model::{ChainEntry, PluginRecord, TenantIndex, Version};
use store::{Store, StoreError};

/// Why a registry operation was refused or failed. Mapped to HTTP in
/// `errors.rs`.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("no plugin {0:?}")]
    NoPlugin(String),
    #[error("plugin {name:?} has no version {version}")]
    NoVersion { name: String, version: u32 },
    #[error("plugin {0:?} has no version older than the active one to roll back to")]
    NoEarlierVersion(String),
    #[error("plugin {0:?} is in the tenant's chain; remove it from the chain first")]
    InChain(String),
    #[error("component refused: {0}")]
    Refused(#[source] LoadError),
    #[error("{at}: {source}")]
    ChainRefused {
        at: String,
        #[source]
        source: LoadError,
    },
    #[error("invalid chain: {0}")]
    BadChain(String),
    #[error("the chain changed since revision {expected} (now {actual}); read it again and retry")]
    Stale { expected: u64, actual: u64 },
    #[error("the checks took longer than {0:?}")]
    CheckTimeout(Duration),
    #[error("the registry is busy with other changes; retry shortly")]
    Busy,
    #[error("another change to this tenant won the race {0} times; try again")]
    Contended(u32),
    #[error("internal error: {0}")]
    Internal(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The registry's view of its store, for `/readyz` and logs.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Health {
    /// `directory` or `redis` (where exactly is logged, not shown here).
    pub store: &'static str,
    /// `ok`, or `degraded`: the shared store cannot be reached and this
    /// replica serves its last good set.
    pub status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// RFC 3339 time of the last change of `status`.
    pub since: String,
    /// Tenants whose stored chain could not be put live, with the reason;
    /// they run the chain they had.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub failing: BTreeMap<String, String>,
}

pub struct Registry {
    cfg: RegistryConfig,
    gateway: Arc<Gateway>,
    engine: Arc<PluginEngine>,
    store: Arc<dyn Store>,
    /// The local copy of a shared store, read when it cannot be reached.
    mirror: Option<Arc<fs::FsStore>>,
    /// Per tenant, the index whose chain is live here.
    live: Mutex<HashMap<usize, Arc<TenantIndex>>>,
    /// Per tenant, a stored revision that could not be put live and why; not
    /// retried until the revision changes.
    failed: Mutex<HashMap<usize, (u64, String)>>,
    health: Mutex<Health>,
    /// Compiling and building chains is CPU-heavy: one check or change at a
    /// time keeps serving responsive and bounds what uploads can take.
    checks: Arc<Semaphore>,
}

/// What an upload did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Uploaded {
    pub plugin: String,
    pub version: Version,
    /// False when the same bytes were already a version (that one is made
    /// active instead of adding a copy).
    pub created: bool,
    /// Whether the tenant's chain uses this plugin, i.e. it is live now.
    pub in_chain: bool,
}

const CAS_ATTEMPTS: u32 = 8;
/// Steps in one chain: each holds pooled instances shared by every tenant.
pub const MAX_CHAIN_STEPS: usize = 32;

impl Registry {
    /// Open the store, load every tenant's stored chain and put it live. A
    /// shared store that cannot be reached is not fatal: the local copy is
    /// served and the registry reports itself degraded.
    pub async fn open(cfg: RegistryConfig, gateway: Arc<Gateway>) -> anyhow::Result<Arc<Registry>> {
        let engine = gateway
            .plugin_engine()
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("the registry needs the plugin engine"))?;
        let local = Arc::new(fs::FsStore::open(&cfg.data_dir)?);
        let (store, mirror, kind): (Arc<dyn Store>, _, _) = match &cfg.redis_url {
            Some(url) => (
                Arc::new(redis::RedisStore::open(
                    url,
                    &cfg.redis_prefix,
                    cfg.store_timeout,
                )?),
                Some(local),
                "redis",
            ),
            None => (local, None, "directory"),
        };
        tracing::info!(store = %store.location(), "plugin registry");
        let registry = Arc::new(Registry {
            health: Mutex::new(Health {
                store: kind,
                status: "ok",
                error: None,
                since: now_rfc3339(),
                failing: BTreeMap::new(),
            }),
            cfg,
            gateway,
            engine,
            store,
            mirror,
            live: Mutex::new(HashMap::new()),
            failed: Mutex::new(HashMap::new()),
            checks: Arc::new(Semaphore::new(1)),
        });
        let r = registry.clone();
        tokio::task::spawn_blocking(move || r.load_all()).await??;
        Ok(registry)
    }

    /// Follow a shared store: poll its revisions and put changes live.
    /// Returns at once for a store only this process writes.
    pub fn spawn_sync(self: &Arc<Self>, stop: CancellationToken) {
        if self.mirror.is_none() {
            return;
        }
        let r = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(r.cfg.poll_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let r2 = r.clone();
                let _ = tokio::task::spawn_blocking(move || r2.sync_once()).await;
            }
        });
    }

    pub fn health(&self) -> Health {
        let mut h = self
            .health
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        h.failing = self
            .failed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(t, (_, why))| (self.gateway.tenant_config(*t).id.clone(), why.clone()))
            .collect();
        h
    }

    pub fn max_plugin_bytes(&self) -> usize {
        self.cfg.max_plugin_bytes
    }

    /// Only reachability moves the health; bad data is a tenant's failure.
    fn set_health(&self, result: Result<(), &StoreError>) {
        let mut h = self.health.lock().unwrap_or_else(PoisonError::into_inner);
        match result {
            Ok(()) if h.status != "ok" => {
                tracing::info!(store = %self.store.location(), "registry store reachable again; following it");
                h.status = "ok";
                h.error = None;
                h.since = now_rfc3339();
            }
            Err(e @ StoreError::Unavailable(_)) if h.status == "ok" => {
                tracing::error!(store = %self.store.location(), error = %e, "registry store unreachable; serving the last good plugin set");
                h.status = "degraded";
                h.error = Some(e.to_string());
                h.since = now_rfc3339();
            }
            Err(e @ StoreError::Unavailable(_)) => h.error = Some(e.to_string()),
            _ => {}
        }
    }

    fn load_all(&self) -> anyhow::Result<()> {
        match self.store.revisions() {
            Ok(revisions) => {
                self.set_health(Ok(()));
                for tenant in revisions.keys() {
                    self.follow(tenant, self.store.as_ref(), false);
                }
            }
            Err(e) => {
                let Some(mirror) = &self.mirror else {
                    return Err(e.into());
                };
                self.set_health(Err(&e));
                for tenant in mirror.revisions()?.keys() {
                    self.follow(tenant, mirror.as_ref(), false);
                }
            }
        }
        Ok(())
    }

    /// One poll of a shared store.
    fn sync_once(&self) {
        let revisions = match self.store.revisions() {
            Ok(r) => r,
            Err(e) => return self.set_health(Err(&e)),
        };
        self.set_health(Ok(()));
        for (tenant, rev) in revisions {
            let Some(t) = self.gateway.tenant_index(&tenant) else {
                continue;
            };
            let failed = self
                .failed
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(&t)
                .is_some_and(|(r, _)| *r == rev);
            let live = self.live_revision(t);
            if failed || live == rev {
                continue;
            }
            // Behind what is live: the store was replaced (a new or flushed
            // Redis), and a replica has since written to it from its live
            // copy; follow it.
            let replaced = live > rev;
            if replaced {
                tracing::warn!(
                    tenant,
                    live,
                    stored = rev,
                    "the registry store's revision went backwards (store replaced?); following the store"
                );
            }
            self.follow(&tenant, self.store.as_ref(), replaced);
        }
    }

    fn live_revision(&self, tenant: usize) -> u64 {
        self.live_index(tenant).map_or(0, |i| i.revision)
    }

    fn live_index(&self, tenant: usize) -> Option<Arc<TenantIndex>> {
        self.live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&tenant)
            .cloned()
    }

    /// Read a tenant's index from `from`, build its chain and put it live.
    /// On failure the tenant keeps the chain it has (or, at start, gets the
    /// local copy's), and `/readyz` names it.
    fn follow(&self, tenant: &str, from: &dyn Store, replaced: bool) {
        let Some(t) = self.gateway.tenant_index(tenant) else {
            tracing::warn!(
                tenant,
                "the registry holds plugins for a tenant the config does not have; ignored"
            );
            return;
        };
        let mut revision = 0;
        let result = (|| -> Result<(), RegistryError> {
            let Some(index) = from.read_index(tenant)? else {
                return Ok(());
            };
            revision = index.revision;
            let chain = self.build_chain(t, &index, from)?;
            self.install(t, Arc::new(index), chain, from, replaced);
            Ok(())
        })();
        match result {
            Ok(()) => {}
            Err(RegistryError::Store(e @ StoreError::Unavailable(_))) => self.set_health(Err(&e)),
            Err(e) => {
                tracing::error!(tenant, revision, error = %e, "cannot put the registry's chain live; the tenant keeps the chain it has");
                self.failed
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(t, (revision, e.to_string()));
                if let Some(mirror) = &self.mirror
                    && !std::ptr::addr_eq(from, mirror.as_ref())
                    && self.live_revision(t) == 0
                {
                    self.follow(tenant, mirror.as_ref(), false);
                }
            }
        }
    }

    /// Keep a local copy of every blob the index's chain runs, so that a
    /// restart without the shared store can still build it.
    fn mirror_blobs(
        &self,
        mirror: &fs::FsStore,
        index: &TenantIndex,
        from: &dyn Store,
    ) -> Result<(), StoreError> {
        for name in index
            .chain
            .iter()
            .flatten()
            .filter_map(|e| e.plugin.as_ref())
        {
            let Some(v) = index
                .plugins
                .get(name)
                .and_then(PluginRecord::active_version)
            else {
                continue;
            };
            if !mirror.has_blob(&v.sha256)
                && let Some(bytes) = from.get_blob(&v.sha256)?
            {
                mirror.put_blob(&v.sha256, &bytes)?;
            }
        }
        Ok(())
    }

    /// Swap in the chain of `index`, unless a newer one is already live
    /// (`replaced`: the store started over, so its revision is the truth).
    /// The local copy follows what goes live, under the same lock, so it
    /// never moves backwards.
    fn install(
        &self,
        tenant: usize,
        index: Arc<TenantIndex>,
        chain: Arc<Chain>,
        from: &dyn Store,
        replaced: bool,
    ) -> bool {
        let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        let current = live.get(&tenant).map_or(0, |i| i.revision);
        if index.revision <= current && !replaced {
            return false;
        }
        self.gateway.swap_chain(tenant, chain);
        let id = &self.gateway.tenant_config(tenant).id;
        tracing::info!(tenant = id, revision = index.revision, "chain live");
        if let Some(mirror) = &self.mirror
            && !std::ptr::addr_eq(from, mirror.as_ref())
            && let Err(e) = self
                .mirror_blobs(mirror, &index, from)
                .and_then(|()| mirror.mirror_index(id, &index))
        {
            tracing::error!(tenant = id, error = %e, "cannot update the local copy of the registry; a restart without the shared store would serve an older set");
        }
        live.insert(tenant, index);
        self.failed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&tenant);
        true
    }

    /// The chain an index implies: its own chain, or the config file's.
    fn build_chain(
        &self,
        tenant: usize,
        index: &TenantIndex,
        from: &dyn Store,
    ) -> Result<Arc<Chain>, RegistryError> {
        let Some(entries) = &index.chain else {
            return Ok(self.gateway.file_chain(tenant));
        };
        if entries.len() > MAX_CHAIN_STEPS {
            return Err(RegistryError::BadChain(format!(
                "{} steps; a chain has at most {MAX_CHAIN_STEPS}",
                entries.len()
            )));
        }
        let tenant_id = &self.gateway.tenant_config(tenant).id;
        let mut chain = Chain::default();
        for (i, e) in entries.iter().enumerate() {
            let (label, compiled) = match (&e.plugin, &e.builtin) {
                (Some(name), None) => {
                    let v = index
                        .plugins
                        .get(name)
                        .and_then(PluginRecord::active_version)
                        .ok_or_else(|| {
                            RegistryError::BadChain(format!(
                                "plugins[{i}]: no uploaded plugin {name:?}"
                            ))
                        })?;
                    let compiled = match self.engine.compiled(&v.sha256) {
                        Some(c) => c,
                        None => {
                            let bytes = from.get_blob(&v.sha256)?.ok_or_else(|| {
                                StoreError::Corrupt(format!("blob {} is missing", v.sha256))
                            })?;
                            self.engine
                                .compile(&bytes)
                                .map_err(RegistryError::Refused)?
                        }
                    };
                    (format!("{name} v{}", v.version), compiled)
                }
                (None, Some(name)) => {
                    let bytes = builtin::component(name).ok_or_else(|| {
                        RegistryError::BadChain(format!(
                            "plugins[{i}]: no built-in plugin {name:?} (there are: {})",
                            builtin_names()
                        ))
                    })?;
                    let compiled = self.engine.compile(bytes).map_err(RegistryError::Refused)?;
                    (format!("built-in {name}"), compiled)
                }
                _ => {
                    return Err(RegistryError::BadChain(format!(
                        "plugins[{i}]: set exactly one of `plugin` or `builtin`"
                    )));
                }
            };
            if !e.config.is_object() {
                return Err(RegistryError::BadChain(format!(
                    "plugins[{i}] ({label}): `config` must be a JSON object"
                )));
            }
            let entry = Entry::new(&self.engine, compiled, tenant_id, &e.config, e.failure)
                .map_err(|source| RegistryError::ChainRefused {
                    at: format!("plugins[{i}] ({label})"),
                    source,
                })?;
            chain.entries.push(entry);
        }
        Ok(Arc::new(chain))
    }

    /// Wait for the one check-or-change slot, at most `check_timeout`.
    async fn slot(&self) -> Result<tokio::sync::OwnedSemaphorePermit, RegistryError> {
        tokio::time::timeout(self.cfg.check_timeout, self.checks.clone().acquire_owned())
            .await
            .map_err(|_| RegistryError::Busy)?
            .map_err(|_| RegistryError::Busy)
    }

    /// Change a tenant's index: read, edit, build the chain it implies,
    /// compare-and-swap, put live. `edit` may run more than once (on races
    /// with other replicas).
    async fn change<T: Send + 'static>(
        self: &Arc<Self>,
        tenant: usize,
        edit: impl Fn(&mut TenantIndex) -> Result<T, RegistryError> + Send + 'static,
    ) -> Result<(T, Arc<TenantIndex>), RegistryError> {
        let permit = self.slot().await?;
        let r = self.clone();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let id = r.gateway.tenant_config(tenant).id.clone();
            for _ in 0..CAS_ATTEMPTS {
                let stored = r.store.read_index(&id)?.unwrap_or_default();
                // A store that lost what is live here (a flushed or new
                // Redis) is re-seeded from the live copy, not from nothing.
                let mut next = match r.live_index(tenant) {
                    Some(live) if live.revision > stored.revision => (*live).clone(),
                    _ => stored.clone(),
                };
                let out = edit(&mut next)?;
                next.revision = stored.revision + 1;
                let chain = r.build_chain(tenant, &next, r.store.as_ref())?;
                if r.store.write_index(&id, &next)? {
                    let replaced = r.live_revision(tenant) > next.revision
                        && r.store
                            .revisions()
                            .ok()
                            .and_then(|m| m.get(&id).copied())
                            .is_some_and(|now| now < r.live_revision(tenant));
                    let next = Arc::new(next);
                    r.install(tenant, next.clone(), chain, r.store.as_ref(), replaced);
                    return Ok((out, next));
                }
            }
            Err(RegistryError::Contended(CAS_ATTEMPTS))
        })
        .await
        .map_err(|e| RegistryError::Internal(e.to_string()))?
    }

    /// The tenant's index as stored now.
    pub async fn index(self: &Arc<Self>, tenant: usize) -> Result<TenantIndex, RegistryError> {
        let r = self.clone();
        let id = self.gateway.tenant_config(tenant).id.clone();
        tokio::task::spawn_blocking(move || r.store.read_index(&id))
            .await
            .map_err(|e| RegistryError::Internal(e.to_string()))?
            .map(Option::unwrap_or_default)
            .map_err(Into::into)
    }

    /// Check and store a component as the next version of `name`, and make
    /// it the active one (live at once when the chain uses it).
    pub async fn upload(
        self: &Arc<Self>,
        tenant: usize,
        name: &str,
        bytes: Bytes,
        actor: &str,
    ) -> Result<Uploaded, RegistryError> {
        let current = self.index(tenant).await?;
        // Describe it under the config its chain gives it, so a version that
        // refuses that config never goes live; outside the chain there is no
        // config yet, and a refusal of the empty one is not held against it.
        let chain_config = current
            .chain
            .iter()
            .flatten()
            .find(|e| e.plugin.as_deref() == Some(name))
            .map(|e| (e.config.clone(), e.failure));
        let sha256 = hex::encode(sha2::Sha256::digest(&bytes));
        let (plugin_name, plugin_version) = self.check(tenant, bytes.clone(), chain_config).await?;

        let r = self.clone();
        let blob = (sha256.clone(), bytes.clone());
        tokio::task::spawn_blocking(move || {
            r.store.put_blob(&blob.0, &blob.1)?;
            if let Some(mirror) = &r.mirror {
                // Best effort here; `install` copies what goes live.
                let _ = mirror.put_blob(&blob.0, &blob.1);
            }
            Ok::<_, StoreError>(())
        })
        .await
        .map_err(|e| RegistryError::Internal(e.to_string()))??;

        let name = name.to_owned();
        let plugin = name.clone();
        let actor = actor.to_owned();
        let max_versions = self.cfg.max_versions;
        let size = bytes.len() as u64;
        let ((version, created), index) = self
            .change(tenant, move |index| {
                let floor = index.last_version.get(&name).copied().unwrap_or(0);
                let record = index.plugins.entry(name.clone()).or_insert(PluginRecord {
                    versions: Vec::new(),
                    active: 0,
                });
                if let Some(v) = record.versions.iter().find(|v| v.sha256 == sha256) {
                    record.active = v.version;
                    return Ok((v.clone(), false));
                }
                let v = Version {
                    version: record.versions.last().map_or(0, |v| v.version).max(floor) + 1,
                    sha256: sha256.clone(),
                    size,
                    uploaded_at: now_rfc3339(),
                    uploaded_by: actor.clone(),
                    plugin_name: plugin_name.clone(),
                    plugin_version: plugin_version.clone(),
                };
                record.versions.push(v.clone());
                record.active = v.version;
                prune(record, max_versions);
                index.last_version.insert(name.clone(), v.version);
                Ok((v, true))
            })
            .await?;
        Ok(Uploaded {
            in_chain: chain_uses(&index, &plugin),
            plugin,
            version,
            created,
        })
    }

    /// Compile, link and describe a component: one check at a time (the slot
    /// is held until the work ends, also past a timeout), each answered
    /// within `check_timeout`. Returns the plugin's own name and version.
    async fn check(
        self: &Arc<Self>,
        tenant: usize,
        bytes: Bytes,
        chain_config: Option<(serde_json::Value, FailurePolicy)>,
    ) -> Result<(String, String), RegistryError> {
        let timeout = self.cfg.check_timeout;
        let permit = self.slot().await?;
        let r = self.clone();
        let job = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let compiled = r.engine.compile(&bytes).map_err(RegistryError::Refused)?;
            let sha256 = compiled.sha256.clone();
            let tenant_id = &r.gateway.tenant_config(tenant).id;
            let in_chain = chain_config.is_some();
            let (config, failure) =
                chain_config.unwrap_or((serde_json::json!({}), FailurePolicy::FailClosed));
            match Entry::new(&r.engine, compiled, tenant_id, &config, failure) {
                Ok(entry) => Ok((entry.info.name.clone(), entry.info.version.clone())),
                Err(LoadError::Config(_)) if !in_chain => {
                    Ok(("(describes itself once configured)".into(), String::new()))
                }
                Err(e) => {
                    // Refused: keep no compiled copy of it around.
                    r.engine.evict(&sha256);
                    Err(RegistryError::Refused(e))
                }
            }
        });
        tokio::time::timeout(timeout, job)
            .await
            .map_err(|_| RegistryError::CheckTimeout(timeout))?
            .map_err(|e| RegistryError::Internal(e.to_string()))?
    }

    pub async fn delete(self: &Arc<Self>, tenant: usize, name: &str) -> Result<(), RegistryError> {
        let name = name.to_owned();
        self.change(tenant, move |index| {
            if !index.plugins.contains_key(&name) {
                return Err(RegistryError::NoPlugin(name.clone()));
            }
            if chain_uses(index, &name) {
                return Err(RegistryError::InChain(name.clone()));
            }
            index.plugins.remove(&name);
            Ok(())
        })
        .await
        .map(|_| ())
    }

    /// Make an earlier version active: `to`, or the newest one older than
    /// the active version.
    pub async fn rollback(
        self: &Arc<Self>,
        tenant: usize,
        name: &str,
        to: Option<u32>,
    ) -> Result<Version, RegistryError> {
        let name = name.to_owned();
        self.change(tenant, move |index| {
            let record = index
                .plugins
                .get_mut(&name)
                .ok_or_else(|| RegistryError::NoPlugin(name.clone()))?;
            let target = match to {
                Some(version) => record
                    .versions
                    .iter()
                    .find(|v| v.version == version)
                    .ok_or_else(|| RegistryError::NoVersion {
                        name: name.clone(),
                        version,
                    })?,
                None => record
                    .versions
                    .iter()
                    .rev()
                    .find(|v| v.version < record.active)
                    .ok_or_else(|| RegistryError::NoEarlierVersion(name.clone()))?,
            }
            .clone();
            record.active = target.version;
            Ok(target)
        })
        .await
        .map(|(v, _)| v)
    }

    /// Replace the tenant's chain (`None`: back to the config file's). With
    /// `expected`, only if the index is still at that revision (a client's
    /// read-modify-write must not undo another's change).
    pub async fn set_chain(
        self: &Arc<Self>,
        tenant: usize,
        chain: Option<Vec<ChainEntry>>,
        expected: Option<u64>,
    ) -> Result<(), RegistryError> {
        self.change(tenant, move |index| {
            if let Some(expected) = expected
                && expected != index.revision
            {
                return Err(RegistryError::Stale {
                    expected,
                    actual: index.revision,
                });
            }
            index.chain = chain.clone();
            Ok(())
        })
        .await
        .map(|_| ())
    }

    /// What runs now for this tenant: the chain and the index it came from
    /// (`None`: no registry change yet, the config file's chain).
    pub fn live(&self, tenant: usize) -> (Arc<Chain>, Option<Arc<TenantIndex>>) {
        (self.gateway.chain(tenant), self.live_index(tenant))
    }

    pub fn gateway(&self) -> &Arc<Gateway> {
        &self.gateway
    }
}

fn chain_uses(index: &TenantIndex, name: &str) -> bool {
    index
        .chain
        .iter()
        .flatten()
        .any(|e| e.plugin.as_deref() == Some(name))
}

/// Keep the newest `max` versions, and the active one whatever its age.
fn prune(record: &mut PluginRecord, max: usize) {
    while record.versions.len() > max {
        let Some(pos) = record
            .versions
            .iter()
            .position(|v| v.version != record.active)
        else {
            break;
        };
        record.versions.remove(pos);
    }
}

fn builtin_names() -> String {
    builtin::BUILTIN
        .iter()
        .map(|(n, _)| *n)
        .collect::<Vec<_>>()
        .join(", ")
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(n: u32) -> Version {
        Version {
            version: n,
            sha256: format!("{n:064}"),
            size: 1,
            uploaded_at: String::new(),
            uploaded_by: String::new(),
            plugin_name: String::new(),
            plugin_version: String::new(),
        }
    }

    #[test]
    fn prune_keeps_newest_and_active() {
        let mut r = PluginRecord {
            versions: (1..=5).map(v).collect(),
            active: 1,
        };
        prune(&mut r, 3);
        let kept: Vec<u32> = r.versions.iter().map(|v| v.version).collect();
        assert_eq!(kept, vec![1, 4, 5]);
    }
}
