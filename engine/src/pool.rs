//! Storage pool verbs: define, build, start, refresh, stop, delete, undefine, autostart,
//! observe, list.

use virt::connect::Connect;
use virt::storage_pool::StoragePool;

use crate::engine::{CallClass, Engine};
use crate::error::{EngineError, ObjectKind, Result, gone_is_none, lv};
use crate::model::{BuildMode, Owner, PoolDef, PoolObserved, PoolState};
use crate::object;

pub(crate) fn lookup(c: &Connect, call: &'static str, name: &str) -> Result<StoragePool> {
    object::lookup(c, call, name)
}

/// The owner recorded in the pool's `<source>` vendor/product mark.
pub(crate) fn read_owner(pool: &StoragePool, call: &'static str) -> Result<Option<Owner>> {
    let xml = pool
        .xml_desc(virt::sys::VIR_STORAGE_XML_INACTIVE)
        .or_else(|_| pool.xml_desc(0))
        .map_err(lv(call))?;
    Ok(PoolObserved::from_xml(&xml)?.owner)
}

impl Engine {
    /// Defines (or redefines, when it is this owner's) a persistent pool. Returns its UUID.
    pub async fn pool_define(&self, def: &PoolDef) -> Result<String> {
        def.validate().map_err(EngineError::InvalidSpec)?;
        let def = def.clone();
        let cache = self.owned_cache();
        self.call(CallClass::Mutate, "pool_define", move |c| {
            const CALL: &str = "pool_define";
            let uuid =
                object::existing_uuid::<StoragePool>(c, CALL, &def.name, &def.owner, &cache)?;
            let xml = object::with_uuid(def.to_xml(), uuid.as_deref());
            let obj = c.define_storage_pool_xml(&xml, 0).map_err(lv(CALL))?;
            let uuid = obj.uuid_string().map_err(lv(CALL))?;
            cache.insert(ObjectKind::Pool, &uuid, &def.owner);
            Ok(uuid)
        })
        .await
    }

    /// Builds the pool: [`BuildMode::TargetOnly`] creates the target directory (a `dir`
    /// pool's storage, an `fs` or `netfs` pool's mount point); [`BuildMode::MakeStorage`]
    /// also makes a `logical` pool's volume group or an `fs` pool's filesystem on its
    /// devices, never over a device that holds data (libvirt checks, `NO_OVERWRITE`).
    pub async fn pool_build(&self, name: &str, owner: &Owner, mode: BuildMode) -> Result<()> {
        let flags = match mode {
            BuildMode::TargetOnly => 0,
            BuildMode::MakeStorage => virt::sys::VIR_STORAGE_POOL_BUILD_NO_OVERWRITE,
        };
        self.owned_call::<StoragePool, _>(CallClass::Mutate, "pool_build", name, owner, move |p| {
            p.build(flags)
        })
        .await
    }

    /// Starts (activates) the pool.
    pub async fn pool_start(&self, name: &str, owner: &Owner) -> Result<()> {
        self.owned_call::<StoragePool, _>(CallClass::Lifecycle, "pool_start", name, owner, |p| {
            p.create(0).map(|_| ())
        })
        .await
    }

    /// Rescans the pool's volumes.
    pub async fn pool_refresh(&self, name: &str, owner: &Owner) -> Result<()> {
        self.owned_call::<StoragePool, _>(CallClass::Mutate, "pool_refresh", name, owner, |p| {
            p.refresh(0)
        })
        .await
    }

    /// Stops (deactivates) the pool; its storage stays.
    pub async fn pool_stop(&self, name: &str, owner: &Owner) -> Result<()> {
        self.owned_call::<StoragePool, _>(CallClass::Lifecycle, "pool_stop", name, owner, |p| {
            p.destroy()
        })
        .await
    }

    /// Deletes the pool's underlying storage (for `dir`: removes the empty directory; for
    /// `logical`: vgremove and pvremove; for `fs`: nothing on the device). The pool must be
    /// inactive. virtkube's planner never asks for it (a pool's storage outlives the
    /// StoragePool); tests clean up with it.
    pub async fn pool_delete(&self, name: &str, owner: &Owner) -> Result<()> {
        self.owned_call::<StoragePool, _>(CallClass::Mutate, "pool_delete", name, owner, |p| {
            p.delete(0)
        })
        .await
    }

    /// Undefines the pool (storage untouched).
    pub async fn pool_undefine(&self, name: &str, owner: &Owner) -> Result<()> {
        self.owned_call::<StoragePool, _>(CallClass::Mutate, "pool_undefine", name, owner, |p| {
            p.undefine()
        })
        .await
    }

    /// Sets the autostart flag.
    pub async fn pool_set_autostart(&self, name: &str, owner: &Owner, on: bool) -> Result<()> {
        self.owned_call::<StoragePool, _>(
            CallClass::Mutate,
            "pool_set_autostart",
            name,
            owner,
            move |p| p.set_autostart(on).map(|_| ()),
        )
        .await
    }

    /// Everything observed about a pool (state, capacity, allocation, available,
    /// autostart); `None` when there is none.
    pub async fn pool_observe(&self, name: &str) -> Result<Option<PoolObserved>> {
        let name = name.to_string();
        self.call(CallClass::Query, "pool_observe", move |c| {
            const CALL: &str = "pool_observe";
            let pool = match lookup(c, CALL, &name) {
                Ok(p) => p,
                Err(e) if e.is_not_found() => return Ok(None),
                Err(e) => return Err(e),
            };
            gone_is_none(read_pool(&pool))
        })
        .await
    }

    /// The owner recorded on a pool (`None`: it carries no virtkube mark).
    pub async fn pool_owner(&self, name: &str) -> Result<Option<Owner>> {
        let name = name.to_string();
        self.call(CallClass::Query, "pool_owner", move |c| {
            read_owner(&lookup(c, "pool_owner", &name)?, "pool_owner")
        })
        .await
    }

    /// Names of all pools.
    pub async fn pool_list(&self) -> Result<Vec<String>> {
        self.call(CallClass::Query, "pool_list", |c| {
            c.list_all_storage_pools(0)
                .map_err(lv("pool_list"))?
                .iter()
                .map(|p| p.name().map_err(lv("pool_list")))
                .collect()
        })
        .await
    }
}

/// What libvirt says about pool `pool`.
fn read_pool(pool: &StoragePool) -> Result<PoolObserved> {
    const CALL: &str = "pool_observe";
    let mut o = PoolObserved::from_xml(&pool.xml_desc(0).map_err(lv(CALL))?)?;
    let info = pool.info().map_err(lv(CALL))?;
    o.state = PoolState::from_raw(info.state);
    o.capacity = info.capacity;
    o.allocation = info.allocation;
    o.available = info.available;
    o.persistent = pool.is_persistent().map_err(lv(CALL))?;
    o.autostart = pool.autostart().map_err(lv(CALL))?;
    Ok(o)
}
