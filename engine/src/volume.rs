//! Storage volume verbs: create (empty or copy-on-write over a backing volume), clone,
//! grow-only resize, delete, observe, lookup by name, key and path, list.
//!
//! libvirt keeps no metadata on volumes, so ownership is the volume *key* the caller recorded
//! when the engine created the volume (returned in [`VolumeObserved::key`]): resize and
//! delete refuse a volume whose key differs ([`EngineError::VolumeKeyMismatch`]).

use std::time::Duration;

use virt::connect::Connect;
use virt::storage_pool::StoragePool;
use virt::storage_vol::StorageVol;

use crate::engine::{CallClass, Engine};
use crate::error::{EngineError, ObjectKind, Result, growth, lv};
use crate::model::{BackingStore, PoolObserved, PoolType, VolumeDef, VolumeFormat, VolumeObserved};

/// How far a volume copy is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyProgress {
    /// Bytes the new volume holds so far (its allocation).
    pub written: u64,
    /// Bytes to copy (the source's allocation), when known.
    pub total: Option<u64>,
    /// The new volume's capacity.
    pub capacity: u64,
}

fn lookup(
    pool: &StoragePool,
    call: &'static str,
    pool_name: &str,
    name: &str,
) -> Result<StorageVol> {
    pool.lookup_storage_vol_by_name(name).map_err(|e| {
        EngineError::lookup(call, ObjectKind::Volume, &format!("{pool_name}/{name}"), e)
    })
}

fn observe(vol: &StorageVol, call: &'static str) -> Result<VolumeObserved> {
    let mut o = VolumeObserved::from_xml(&vol.xml_desc(0).map_err(lv(call))?)?;
    if let Ok(p) = vol.lookup_storage_pool() {
        o.pool = p.name().unwrap_or_default();
    }
    if o.key.is_empty() {
        o.key = vol.key().map_err(lv(call))?;
    }
    if o.path.is_empty() {
        o.path = vol.path().map_err(lv(call))?;
    }
    Ok(o)
}

fn lookup_recorded(
    c: &Connect,
    call: &'static str,
    pool_name: &str,
    name: &str,
    recorded_key: &str,
) -> Result<StorageVol> {
    let pool = crate::pool::lookup(c, call, pool_name)?;
    let vol = lookup(&pool, call, pool_name, name)?;
    let key = vol.key().map_err(lv(call))?;
    if key != recorded_key {
        return Err(EngineError::VolumeKeyMismatch {
            pool: pool_name.to_string(),
            name: name.to_string(),
            recorded: recorded_key.to_string(),
            found: key,
        });
    }
    Ok(vol)
}

/// Whether `pool` is a `disk` pool, whose volumes are partitions (named by libvirt after
/// the disk, and asked for without a format).
fn is_disk_pool(pool: &StoragePool, call: &'static str) -> Result<bool> {
    let xml = pool.xml_desc(0).map_err(lv(call))?;
    Ok(PoolObserved::from_xml(&xml)?.pool_type == PoolType::Disk)
}

fn not_found_as_none<T>(r: Result<T>) -> Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e),
    }
}

impl Engine {
    /// Creates a volume: empty, or copy-on-write over `def.backing_volume` (a volume in the
    /// same pool). Record the returned key: it is the ownership proof for later changes.
    pub async fn volume_create(&self, pool: &str, def: &VolumeDef) -> Result<VolumeObserved> {
        def.validate().map_err(EngineError::InvalidSpec)?;
        let (pool_name, def) = (pool.to_string(), def.clone());
        self.call(CallClass::Mutate, "volume_create", move |c| {
            const CALL: &str = "volume_create";
            let pool = crate::pool::lookup(c, CALL, &pool_name)?;
            let backing = match &def.backing_volume {
                Some(b) => {
                    let parent = observe(&lookup(&pool, CALL, &pool_name, b)?, CALL)?;
                    Some(BackingStore {
                        path: parent.path,
                        format: parent.format.unwrap_or(VolumeFormat::Raw),
                    })
                }
                None => None,
            };
            let xml = if is_disk_pool(&pool, CALL)? {
                def.to_partition_xml()
            } else {
                def.to_xml(backing.as_ref())
            };
            let vol = StorageVol::create_xml(&pool, &xml, 0).map_err(lv(CALL))?;
            observe(&vol, CALL)
        })
        .await
    }

    /// Creates a full copy of `source` (same pool) named and sized by `def`: libvirt copies
    /// the source's size whatever the XML asks, so a larger `def.capacity_bytes` grows the
    /// copy right after it is made (before any guest can hold it open). A capacity below the
    /// source's is refused ([`EngineError::ShrinkRefused`]) before anything is copied.
    pub async fn volume_clone(
        &self,
        pool: &str,
        def: &VolumeDef,
        source: &str,
    ) -> Result<VolumeObserved> {
        def.validate().map_err(EngineError::InvalidSpec)?;
        if def.backing_volume.is_some() {
            return Err(EngineError::InvalidSpec(
                "a clone has no backing volume".into(),
            ));
        }
        let (pool_name, def, source) = (pool.to_string(), def.clone(), source.to_string());
        self.call(CallClass::Mutate, "volume_clone", move |c| {
            const CALL: &str = "volume_clone";
            let pool = crate::pool::lookup(c, CALL, &pool_name)?;
            let src = lookup(&pool, CALL, &pool_name, &source)?;
            let source_capacity = src.info().map_err(lv(CALL))?.capacity;
            growth(
                || {
                    format!(
                        "the clone {pool_name}/{} of storage volume {pool_name}/{source}",
                        def.name
                    )
                },
                source_capacity,
                def.capacity_bytes,
            )?;
            let xml = if is_disk_pool(&pool, CALL)? {
                def.to_partition_xml()
            } else {
                def.to_xml(None)
            };
            let vol = StorageVol::create_xml_from(&pool, &xml, &src, 0).map_err(lv(CALL))?;
            if vol.info().map_err(lv(CALL))?.capacity < def.capacity_bytes {
                vol.resize(def.capacity_bytes, 0).map_err(lv(CALL))?;
            }
            observe(&vol, CALL)
        })
        .await
    }

    /// Clones like [`Engine::volume_clone`], and meanwhile reads how much of the copy is
    /// written (libvirt's allocation of the new volume, which `virStorageVolGetInfo` reports
    /// while `virStorageVolCreateXMLFrom` runs; libvirt has no job statistics for volume
    /// copies) every `every`, each a query on another pool slot, and sends each reading to
    /// `progress`. A preallocated raw target reports its whole size at once: callers show
    /// elapsed time then.
    pub async fn volume_clone_with_progress(
        &self,
        pool: &str,
        def: &VolumeDef,
        source: &str,
        every: Duration,
        progress: &tokio::sync::watch::Sender<Option<CopyProgress>>,
    ) -> Result<VolumeObserved> {
        let total = self
            .volume_allocation(pool, source)
            .await
            .ok()
            .map(|(_, a)| a);
        let clone = self.volume_clone(pool, def, source);
        let poll = async {
            loop {
                tokio::time::sleep(every).await;
                if let Ok((capacity, written)) = self.volume_allocation(pool, &def.name).await {
                    progress.send_replace(Some(CopyProgress {
                        written,
                        total,
                        capacity,
                    }));
                }
            }
        };
        tokio::select! {
            done = clone => done,
            never = poll => never,
        }
    }

    /// A volume's capacity and allocation in bytes (`virStorageVolGetInfo`): cheaper than
    /// [`Engine::volume_observe`], and answered for a volume still being copied.
    pub async fn volume_allocation(&self, pool: &str, name: &str) -> Result<(u64, u64)> {
        let (pool_name, name) = (pool.to_string(), name.to_string());
        self.call(CallClass::Query, "volume_allocation", move |c| {
            const CALL: &str = "volume_allocation";
            let pool = crate::pool::lookup(c, CALL, &pool_name)?;
            let info = lookup(&pool, CALL, &pool_name, &name)?
                .info()
                .map_err(lv(CALL))?;
            Ok((info.capacity, info.allocation))
        })
        .await
    }

    /// Grows a volume to `capacity_bytes` through its pool; shrinking is refused
    /// ([`EngineError::ShrinkRefused`]), equal is a no-op. A running guest's QEMU holds the
    /// image's lock: grow an attached volume with [`Engine::domain_block_resize`] instead.
    pub async fn volume_resize(
        &self,
        pool: &str,
        name: &str,
        recorded_key: &str,
        capacity_bytes: u64,
    ) -> Result<()> {
        let (pool_name, name, key) = (pool.to_string(), name.to_string(), recorded_key.to_string());
        self.call(CallClass::Mutate, "volume_resize", move |c| {
            const CALL: &str = "volume_resize";
            let vol = lookup_recorded(c, CALL, &pool_name, &name, &key)?;
            let current = vol.info().map_err(lv(CALL))?.capacity;
            if !growth(
                || format!("storage volume {pool_name}/{name}"),
                current,
                capacity_bytes,
            )? {
                return Ok(());
            }
            vol.resize(capacity_bytes, 0).map_err(lv(CALL))
        })
        .await
    }

    /// Deletes a volume (its data is gone).
    pub async fn volume_delete(&self, pool: &str, name: &str, recorded_key: &str) -> Result<()> {
        let (pool_name, name, key) = (pool.to_string(), name.to_string(), recorded_key.to_string());
        self.call(CallClass::Mutate, "volume_delete", move |c| {
            lookup_recorded(c, "volume_delete", &pool_name, &name, &key)?
                .delete(0)
                .map_err(lv("volume_delete"))
        })
        .await
    }

    /// Everything observed about a volume; `None` when there is none.
    pub async fn volume_observe(&self, pool: &str, name: &str) -> Result<Option<VolumeObserved>> {
        let (pool_name, name) = (pool.to_string(), name.to_string());
        self.call(CallClass::Query, "volume_observe", move |c| {
            const CALL: &str = "volume_observe";
            let pool = crate::pool::lookup(c, CALL, &pool_name)?;
            not_found_as_none(
                lookup(&pool, CALL, &pool_name, &name).and_then(|v| observe(&v, CALL)),
            )
        })
        .await
    }

    /// Every volume of a pool, observed in one call (one slot of the engine's pool instead of
    /// one per volume): what a whole-node view of the storage needs. A volume that disappears
    /// while the pool is read is left out.
    pub async fn volume_observe_all(&self, pool: &str) -> Result<Vec<VolumeObserved>> {
        let pool_name = pool.to_string();
        self.call(CallClass::Query, "volume_observe_all", move |c| {
            const CALL: &str = "volume_observe_all";
            let pool = crate::pool::lookup(c, CALL, &pool_name)?;
            let mut out = Vec::new();
            for vol in pool.list_all_volumes(0).map_err(lv(CALL))? {
                match observe(&vol, CALL) {
                    Ok(o) => out.push(o),
                    Err(e) if e.is_not_found() => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(out)
        })
        .await
    }

    /// Looks a volume up by its key.
    pub async fn volume_lookup_key(&self, key: &str) -> Result<Option<VolumeObserved>> {
        let key = key.to_string();
        self.call(CallClass::Query, "volume_lookup_key", move |c| {
            const CALL: &str = "volume_lookup_key";
            not_found_as_none(
                c.lookup_storage_vol_by_key(&key)
                    .map_err(|e| EngineError::lookup(CALL, ObjectKind::Volume, &key, e))
                    .and_then(|v| observe(&v, CALL)),
            )
        })
        .await
    }

    /// Looks a volume up by its path on the host.
    pub async fn volume_lookup_path(&self, path: &str) -> Result<Option<VolumeObserved>> {
        let path = path.to_string();
        self.call(CallClass::Query, "volume_lookup_path", move |c| {
            const CALL: &str = "volume_lookup_path";
            not_found_as_none(
                c.lookup_storage_vol_by_path(&path)
                    .map_err(|e| EngineError::lookup(CALL, ObjectKind::Volume, &path, e))
                    .and_then(|v| observe(&v, CALL)),
            )
        })
        .await
    }

    /// The path of a volume on the host.
    pub async fn volume_path(&self, pool: &str, name: &str) -> Result<String> {
        self.volume_observe(pool, name)
            .await?
            .map(|v| v.path)
            .ok_or_else(|| EngineError::NotFound {
                call: "volume_path",
                kind: ObjectKind::Volume,
                name: format!("{pool}/{name}"),
            })
    }

    /// Names of the volumes in a pool.
    pub async fn volume_list(&self, pool: &str) -> Result<Vec<String>> {
        let pool_name = pool.to_string();
        self.call(CallClass::Query, "volume_list", move |c| {
            // list_all_volumes, not virt's list_volumes (a fixed 1024-name buffer).
            crate::pool::lookup(c, "volume_list", &pool_name)?
                .list_all_volumes(0)
                .map_err(lv("volume_list"))?
                .iter()
                .map(|v| v.name().map_err(lv("volume_list")))
                .collect()
        })
        .await
    }
}
