//! What the verbs of every marked libvirt object kind share (libvirt gives them the same
//! shape): lookup by name with a typed not-found, the ownership check through the engine's
//! cache, a (re)definition that keeps the UUID, and the wrapper that runs one verb on an
//! object only once its mark is verified.

use virt::connect::Connect;
use virt::domain::Domain;
use virt::network::Network;
use virt::storage_pool::StoragePool;

use crate::engine::{CallClass, Engine, OwnedCache};
use crate::error::{EngineError, ObjectKind, Result, lv};
use crate::model::Owner;

/// A libvirt object kind that carries virtkube's ownership mark.
pub(crate) trait Marked: Sized {
    /// The kind, in errors and in the ownership cache.
    const KIND: ObjectKind;
    /// libvirt's lookup by name.
    fn lookup_by_name(c: &Connect, name: &str) -> std::result::Result<Self, virt::error::Error>;
    /// libvirt's UUID string.
    fn uuid(&self) -> std::result::Result<String, virt::error::Error>;
    /// The mark the object carries (`None`: no virtkube mark).
    fn read_owner(&self, call: &'static str) -> Result<Option<Owner>>;
}

/// `Marked` for a `virt` object type: the kind, libvirt's lookup by name, the module's
/// owner reader (the one thing that differs: where the mark lives).
macro_rules! marked {
    ($ty:ty, $kind:expr, $lookup:ident, $read_owner:path) => {
        impl Marked for $ty {
            const KIND: ObjectKind = $kind;
            fn lookup_by_name(
                c: &Connect,
                name: &str,
            ) -> std::result::Result<Self, virt::error::Error> {
                c.$lookup(name)
            }
            fn uuid(&self) -> std::result::Result<String, virt::error::Error> {
                self.uuid_string()
            }
            fn read_owner(&self, call: &'static str) -> Result<Option<Owner>> {
                $read_owner(self, call)
            }
        }
    };
}

marked!(
    Domain,
    ObjectKind::Domain,
    lookup_domain_by_name,
    crate::domain::read_owner
);
marked!(
    Network,
    ObjectKind::Network,
    lookup_network_by_name,
    crate::network::read_owner
);
marked!(
    StoragePool,
    ObjectKind::Pool,
    lookup_storage_pool_by_name,
    crate::pool::read_owner
);

/// Looks an object up by name; a missing one is [`EngineError::NotFound`].
pub(crate) fn lookup<T: Marked>(c: &Connect, call: &'static str, name: &str) -> Result<T> {
    T::lookup_by_name(c, name).map_err(|e| EngineError::lookup(call, T::KIND, name, e))
}

/// Looks an object up and checks it carries `owner`'s mark (cached by UUID after the first
/// read, so a converged resync does not read every mark again).
pub(crate) fn lookup_owned<T: Marked>(
    c: &Connect,
    call: &'static str,
    name: &str,
    owner: &Owner,
    cache: &OwnedCache,
) -> Result<T> {
    let obj: T = lookup(c, call, name)?;
    let uuid = obj.uuid().map_err(lv(call))?;
    cache.check(T::KIND, name, &uuid, owner, || obj.read_owner(call))?;
    Ok(obj)
}

/// The UUID of the object a definition named `name` would replace, once its mark is checked
/// (`None`: there is none, so the definition creates it). A redefinition must carry this
/// UUID, or libvirt refuses the name clash; one by another owner is refused here.
pub(crate) fn existing_uuid<T: Marked>(
    c: &Connect,
    call: &'static str,
    name: &str,
    owner: &Owner,
    cache: &OwnedCache,
) -> Result<Option<String>> {
    match lookup_owned::<T>(c, call, name, owner, cache) {
        Ok(existing) => existing.uuid().map(Some).map_err(lv(call)),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e),
    }
}

/// A definition XML carrying `uuid` (for a redefinition of an object whose XML has none).
pub(crate) fn with_uuid(xml: String, uuid: Option<&str>) -> String {
    match uuid {
        Some(uuid) => xml.replacen("<name>", &format!("<uuid>{uuid}</uuid>\n  <name>"), 1),
        None => xml,
    }
}

impl Engine {
    /// Runs `f` on the object `name` once it is found to carry `owner`'s mark.
    pub(crate) async fn owned<T, R, F>(
        &self,
        class: CallClass,
        call: &'static str,
        name: &str,
        owner: &Owner,
        f: F,
    ) -> Result<R>
    where
        T: Marked,
        R: Send + 'static,
        F: Fn(&T) -> Result<R> + Send + Sync + 'static,
    {
        let (name, owner) = (name.to_string(), owner.clone());
        let cache = self.owned_cache();
        self.call(class, call, move |c| {
            f(&lookup_owned::<T>(c, call, &name, &owner, &cache)?)
        })
        .await
    }

    /// [`Engine::owned`] for a verb that is one libvirt call.
    pub(crate) async fn owned_call<T, F>(
        &self,
        class: CallClass,
        call: &'static str,
        name: &str,
        owner: &Owner,
        f: F,
    ) -> Result<()>
    where
        T: Marked,
        F: Fn(&T) -> std::result::Result<(), virt::error::Error> + Send + Sync + 'static,
    {
        self.owned(class, call, name, owner, move |obj: &T| {
            f(obj).map_err(lv(call))
        })
        .await
    }
}
