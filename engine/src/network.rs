//! Network verbs: define, start, stop, undefine, autostart, observe, list.

use virt::connect::Connect;
use virt::network::Network;

use crate::engine::{CallClass, Engine, OwnedCache};
use crate::error::{EngineError, ObjectKind, Result};
use crate::model::{NetworkDef, NetworkObserved, Owner};

fn lookup(c: &Connect, call: &'static str, name: &str) -> Result<Network> {
    c.lookup_network_by_name(name)
        .map_err(|e| EngineError::lookup(call, ObjectKind::Network, name, e))
}

fn lv(call: &'static str) -> impl Fn(virt::error::Error) -> EngineError {
    move |e| EngineError::libvirt(call, e)
}

/// The owner recorded in a network's `<metadata>` (read from its persistent XML).
fn read_owner(net: &Network, call: &'static str) -> Result<Option<Owner>> {
    let xml = net.xml_desc(0).map_err(lv(call))?;
    Ok(NetworkObserved::from_xml(&xml)?.owner)
}

fn lookup_owned(
    c: &Connect,
    call: &'static str,
    name: &str,
    owner: &Owner,
    cache: &OwnedCache,
) -> Result<Network> {
    let obj = lookup(c, call, name)?;
    let uuid = obj.uuid_string().map_err(lv(call))?;
    cache.check(ObjectKind::Network, name, &uuid, owner, || {
        read_owner(&obj, call)
    })?;
    Ok(obj)
}

impl Engine {
    /// Defines (or redefines, when it is already this owner's) a persistent network. Returns
    /// its UUID.
    pub async fn network_define(&self, def: &NetworkDef) -> Result<String> {
        def.validate().map_err(EngineError::InvalidSpec)?;
        let def = def.clone();
        let cache = self.owned_cache();
        self.call(CallClass::Mutate, "network_define", move |c| {
            const CALL: &str = "network_define";
            let mut xml = def.to_xml();
            match lookup(c, CALL, &def.name) {
                Ok(existing) => {
                    let uuid = existing.uuid_string().map_err(lv(CALL))?;
                    cache.check(ObjectKind::Network, &def.name, &uuid, &def.owner, || {
                        read_owner(&existing, CALL)
                    })?;
                    // A redefinition must keep the UUID, or libvirt refuses the name clash.
                    xml = xml.replacen("<name>", &format!("<uuid>{uuid}</uuid>\n  <name>"), 1);
                }
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e),
            }
            let obj = c.define_network_xml(&xml).map_err(lv(CALL))?;
            let uuid = obj.uuid_string().map_err(lv(CALL))?;
            cache.insert(ObjectKind::Network, &uuid, &def.owner);
            Ok(uuid)
        })
        .await
    }

    /// Starts a network (creates its bridge, dnsmasq, firewall rules).
    pub async fn network_start(&self, name: &str, owner: &Owner) -> Result<()> {
        self.owned_network(CallClass::Lifecycle, "network_start", name, owner, |n| {
            n.create().map(|_| ())
        })
        .await
    }

    /// Stops a network.
    pub async fn network_stop(&self, name: &str, owner: &Owner) -> Result<()> {
        self.owned_network(CallClass::Lifecycle, "network_stop", name, owner, |n| {
            n.destroy()
        })
        .await
    }

    /// Undefines a network (an active one keeps running as transient until stopped).
    pub async fn network_undefine(&self, name: &str, owner: &Owner) -> Result<()> {
        self.owned_network(CallClass::Mutate, "network_undefine", name, owner, |n| {
            n.undefine()
        })
        .await
    }

    /// Sets the autostart flag.
    pub async fn network_set_autostart(&self, name: &str, owner: &Owner, on: bool) -> Result<()> {
        self.owned_network(
            CallClass::Mutate,
            "network_set_autostart",
            name,
            owner,
            move |n| n.set_autostart(on).map(|_| ()),
        )
        .await
    }

    /// Everything observed about a network; `None` when there is none.
    pub async fn network_observe(&self, name: &str) -> Result<Option<NetworkObserved>> {
        let name = name.to_string();
        self.call(CallClass::Query, "network_observe", move |c| {
            const CALL: &str = "network_observe";
            let net = match lookup(c, CALL, &name) {
                Ok(n) => n,
                Err(e) if e.is_not_found() => return Ok(None),
                Err(e) => return Err(e),
            };
            let mut o = NetworkObserved::from_xml(&net.xml_desc(0).map_err(lv(CALL))?)?;
            o.active = net.is_active().map_err(lv(CALL))?;
            o.persistent = net.is_persistent().map_err(lv(CALL))?;
            o.autostart = net.autostart().map_err(lv(CALL))?;
            if o.active
                && let Ok(b) = net.bridge_name()
            {
                o.bridge = Some(b);
            }
            Ok(Some(o))
        })
        .await
    }

    /// The owner recorded on a network (`None`: it carries no virtkube mark).
    pub async fn network_owner(&self, name: &str) -> Result<Option<Owner>> {
        let name = name.to_string();
        self.call(CallClass::Query, "network_owner", move |c| {
            read_owner(&lookup(c, "network_owner", &name)?, "network_owner")
        })
        .await
    }

    /// Names of all networks.
    pub async fn network_list(&self) -> Result<Vec<String>> {
        self.call(CallClass::Query, "network_list", |c| {
            c.list_all_networks(0)
                .map_err(lv("network_list"))?
                .iter()
                .map(|n| n.name().map_err(lv("network_list")))
                .collect()
        })
        .await
    }

    async fn owned_network<F>(
        &self,
        class: CallClass,
        call: &'static str,
        name: &str,
        owner: &Owner,
        f: F,
    ) -> Result<()>
    where
        F: Fn(&Network) -> std::result::Result<(), virt::error::Error> + Send + Sync + 'static,
    {
        let (name, owner) = (name.to_string(), owner.clone());
        let cache = self.owned_cache();
        self.call(class, call, move |c| {
            let net = lookup_owned(c, call, &name, &owner, &cache)?;
            f(&net).map_err(lv(call))
        })
        .await
    }
}
