//! Network verbs: define, start, stop, undefine, autostart, observe, list.

use virt::connect::Connect;
use virt::network::Network;

use crate::engine::{CallClass, Engine};
use crate::error::{EngineError, ObjectKind, Result, gone_is_none, lv};
use crate::model::{NetworkDef, NetworkEdit, NetworkObserved, Owner, UpdateCommand, UpdateSection};
use crate::object;

fn lookup(c: &Connect, call: &'static str, name: &str) -> Result<Network> {
    object::lookup(c, call, name)
}

/// The owner recorded in a network's `<metadata>` (read from its persistent XML).
pub(crate) fn read_owner(net: &Network, call: &'static str) -> Result<Option<Owner>> {
    let xml = net.xml_desc(0).map_err(lv(call))?;
    Ok(NetworkObserved::from_xml(&xml)?.owner)
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
            let uuid = object::existing_uuid::<Network>(c, CALL, &def.name, &def.owner, &cache)?;
            let xml = object::with_uuid(def.to_xml(), uuid.as_deref());
            let obj = c.define_network_xml(&xml).map_err(lv(CALL))?;
            let uuid = obj.uuid_string().map_err(lv(CALL))?;
            cache.insert(ObjectKind::Network, &uuid, &def.owner);
            Ok(uuid)
        })
        .await
    }

    /// Starts a network (creates its bridge, dnsmasq, firewall rules).
    pub async fn network_start(&self, name: &str, owner: &Owner) -> Result<()> {
        self.owned_call::<Network, _>(CallClass::Lifecycle, "network_start", name, owner, |n| {
            n.create().map(|_| ())
        })
        .await
    }

    /// Stops a network.
    pub async fn network_stop(&self, name: &str, owner: &Owner) -> Result<()> {
        self.owned_call::<Network, _>(CallClass::Lifecycle, "network_stop", name, owner, |n| {
            n.destroy()
        })
        .await
    }

    /// Undefines a network (an active one keeps running as transient until stopped).
    pub async fn network_undefine(&self, name: &str, owner: &Owner) -> Result<()> {
        self.owned_call::<Network, _>(CallClass::Mutate, "network_undefine", name, owner, |n| {
            n.undefine()
        })
        .await
    }

    /// Changes one DHCP or DNS entry with `virNetworkUpdate`: on an active network live and
    /// in its persistent definition (`LIVE|CONFIG`; libvirt rewrites dnsmasq's files and
    /// signals it, the bridge and its guests stay), on an inactive one in the definition only.
    pub async fn network_update(
        &self,
        name: &str,
        owner: &Owner,
        edit: &NetworkEdit,
    ) -> Result<()> {
        let (command, section, xml) = edit.to_update();
        let command = match command {
            UpdateCommand::AddLast => virt::sys::VIR_NETWORK_UPDATE_COMMAND_ADD_LAST,
            UpdateCommand::Modify => virt::sys::VIR_NETWORK_UPDATE_COMMAND_MODIFY,
            UpdateCommand::Delete => virt::sys::VIR_NETWORK_UPDATE_COMMAND_DELETE,
        };
        let section = match section {
            UpdateSection::IpDhcpHost => virt::sys::VIR_NETWORK_SECTION_IP_DHCP_HOST,
            UpdateSection::IpDhcpRange => virt::sys::VIR_NETWORK_SECTION_IP_DHCP_RANGE,
            UpdateSection::DnsHost => virt::sys::VIR_NETWORK_SECTION_DNS_HOST,
        };
        self.owned_call::<Network, _>(CallClass::Mutate, "network_update", name, owner, move |n| {
            let flags = if n.is_active()? {
                virt::sys::VIR_NETWORK_UPDATE_AFFECT_LIVE
                    | virt::sys::VIR_NETWORK_UPDATE_AFFECT_CONFIG
            } else {
                virt::sys::VIR_NETWORK_UPDATE_AFFECT_CONFIG
            };
            // index -1: the first `<ip>` with DHCP (virtkube defines one).
            n.update(command, section, -1, &xml, flags)
        })
        .await
    }

    /// Sets the autostart flag.
    pub async fn network_set_autostart(&self, name: &str, owner: &Owner, on: bool) -> Result<()> {
        self.owned_call::<Network, _>(
            CallClass::Mutate,
            "network_set_autostart",
            name,
            owner,
            move |n| n.set_autostart(on).map(|_| ()),
        )
        .await
    }

    /// Everything observed about a network; `None` when there is none (or it was undefined
    /// while being read).
    pub async fn network_observe(&self, name: &str) -> Result<Option<NetworkObserved>> {
        let name = name.to_string();
        self.call(CallClass::Query, "network_observe", move |c| {
            const CALL: &str = "network_observe";
            let net = match lookup(c, CALL, &name) {
                Ok(n) => n,
                Err(e) if e.is_not_found() => return Ok(None),
                Err(e) => return Err(e),
            };
            gone_is_none(read_network(&net))
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
}

/// What libvirt says about network `net`.
fn read_network(net: &Network) -> Result<NetworkObserved> {
    const CALL: &str = "network_observe";
    let mut o = NetworkObserved::from_xml(&net.xml_desc(0).map_err(lv(CALL))?)?;
    o.active = net.is_active().map_err(lv(CALL))?;
    o.persistent = net.is_persistent().map_err(lv(CALL))?;
    o.autostart = net.autostart().map_err(lv(CALL))?;
    if o.active
        && let Ok(b) = net.bridge_name()
    {
        o.bridge = Some(b);
    }
    Ok(o)
}
