//! Networks: `NetworkDef` → libvirt network XML, `NetworkObserved` ← libvirt XML + state.

use super::owner::Owner;
use super::xml::{self, Element, XmlError};

/// How the network reaches the outside (`<forward mode=…>`; none = isolated).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetworkMode {
    /// NAT to the host's uplinks (needs iptables and dnsmasq).
    Nat,
    /// No forwarding: guests and host only.
    Isolated,
    /// An existing host bridge (`bridge` names it); libvirt manages no IP.
    Bridge,
    /// Routed without NAT.
    Route,
    /// Forwarding left to the admin's own firewall.
    Open,
}

impl NetworkMode {
    /// virtkube's word (also libvirt's forward mode, except `isolated`).
    pub fn as_str(self) -> &'static str {
        match self {
            NetworkMode::Nat => "nat",
            NetworkMode::Isolated => "isolated",
            NetworkMode::Bridge => "bridge",
            NetworkMode::Route => "route",
            NetworkMode::Open => "open",
        }
    }
}

/// A DHCP range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpRange {
    /// First address.
    pub start: String,
    /// Last address.
    pub end: String,
}

impl DhcpRange {
    /// `<range start=… end=…/>`.
    pub fn to_element(&self) -> Element {
        Element::new("range")
            .attr("start", &self.start)
            .attr("end", &self.end)
    }
}

/// A fixed DHCP lease (`<dhcp><host mac=… ip=… name=…/>`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct DhcpHost {
    /// The guest NIC's MAC address (libvirt reports it in lower case).
    pub mac: String,
    /// The address it always gets.
    pub ip: String,
    /// A host name handed out with the lease.
    pub name: Option<String>,
}

impl DhcpHost {
    /// `<host mac=… ip=… name=…/>`.
    pub fn to_element(&self) -> Element {
        Element::new("host")
            .attr("mac", &self.mac)
            .attr_opt("name", self.name.as_ref())
            .attr("ip", &self.ip)
    }
}

/// Static DNS names of one address (`<dns><host ip=…><hostname>…</hostname></host></dns>`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct DnsHost {
    /// The address.
    pub ip: String,
    /// Its names.
    pub hostnames: Vec<String>,
}

impl DnsHost {
    /// `<host ip=…><hostname>…</hostname>…</host>`.
    pub fn to_element(&self) -> Element {
        let mut host = Element::new("host").attr("ip", &self.ip);
        for name in &self.hostnames {
            host = host.child(Element::new("hostname").text(name));
        }
        host
    }
}

/// The network's IPv4/IPv6 address on the host bridge, with optional DHCP.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IpDef {
    /// Host address on the bridge.
    pub address: String,
    /// Prefix length.
    pub prefix: u8,
    /// DHCP ranges (with `hosts`, none = no DHCP).
    pub dhcp: Vec<DhcpRange>,
    /// Fixed DHCP leases.
    pub hosts: Vec<DhcpHost>,
}

/// One live change of a network's DHCP or DNS entries (`virNetworkUpdate`): libvirt applies
/// it to the running network (dnsmasq rereads its files) and to its persistent definition,
/// without restarting the network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetworkEdit {
    /// Add a fixed DHCP lease.
    AddDhcpHost(DhcpHost),
    /// Replace the lease of this MAC address.
    ModifyDhcpHost(DhcpHost),
    /// Remove a lease (as libvirt reports it: every attribute must match).
    DeleteDhcpHost(DhcpHost),
    /// Add a DHCP range.
    AddDhcpRange(DhcpRange),
    /// Remove a DHCP range (libvirt cannot modify one).
    DeleteDhcpRange(DhcpRange),
    /// Add static DNS names for an address.
    AddDnsHost(DnsHost),
    /// Remove an address's DNS names (libvirt cannot modify them).
    DeleteDnsHost(DnsHost),
}

/// `virNetworkUpdate`'s command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdateCommand {
    /// `VIR_NETWORK_UPDATE_COMMAND_ADD_LAST`.
    AddLast,
    /// `VIR_NETWORK_UPDATE_COMMAND_MODIFY`.
    Modify,
    /// `VIR_NETWORK_UPDATE_COMMAND_DELETE`.
    Delete,
}

/// `virNetworkUpdate`'s section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdateSection {
    /// `VIR_NETWORK_SECTION_IP_DHCP_HOST`.
    IpDhcpHost,
    /// `VIR_NETWORK_SECTION_IP_DHCP_RANGE`.
    IpDhcpRange,
    /// `VIR_NETWORK_SECTION_DNS_HOST`.
    DnsHost,
}

impl NetworkEdit {
    /// The command, section and XML fragment libvirt expects (every value escaped).
    pub fn to_update(&self) -> (UpdateCommand, UpdateSection, String) {
        use UpdateCommand::*;
        use UpdateSection::*;
        match self {
            NetworkEdit::AddDhcpHost(h) => (AddLast, IpDhcpHost, h.to_element().to_xml()),
            NetworkEdit::ModifyDhcpHost(h) => (Modify, IpDhcpHost, h.to_element().to_xml()),
            NetworkEdit::DeleteDhcpHost(h) => (Delete, IpDhcpHost, h.to_element().to_xml()),
            NetworkEdit::AddDhcpRange(r) => (AddLast, IpDhcpRange, r.to_element().to_xml()),
            NetworkEdit::DeleteDhcpRange(r) => (Delete, IpDhcpRange, r.to_element().to_xml()),
            NetworkEdit::AddDnsHost(h) => (AddLast, DnsHost, h.to_element().to_xml()),
            NetworkEdit::DeleteDnsHost(h) => (Delete, DnsHost, h.to_element().to_xml()),
        }
    }
}

/// The desired definition of a libvirt network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkDef {
    /// libvirt name.
    pub name: String,
    /// Mode.
    pub mode: NetworkMode,
    /// Bridge name: the host bridge to create (nat/isolated/route/open; libvirt picks
    /// `virbrN` when `None`) or the existing one to use (bridge mode, required).
    pub bridge: Option<String>,
    /// Address and DHCP (not for bridge mode).
    pub ip: Option<IpDef>,
    /// Static DNS entries (needs `ip`).
    pub dns_hosts: Vec<DnsHost>,
    /// Ownership mark.
    pub owner: Owner,
}

impl NetworkDef {
    /// Checks the definition before any call.
    pub fn validate(&self) -> Result<(), String> {
        if self.name.is_empty() || self.name.contains('/') {
            return Err(format!(
                "network name `{}` is empty or contains `/`",
                self.name
            ));
        }
        if self.mode == NetworkMode::Bridge {
            if self.bridge.is_none() {
                return Err("bridge mode needs the name of an existing host bridge".into());
            }
            if self.ip.is_some() {
                return Err("bridge mode networks carry no IP: libvirt does not manage it".into());
            }
        }
        if self.ip.is_none() && !self.dns_hosts.is_empty() {
            return Err("DNS entries need an IP: libvirt's DNS server listens on it".into());
        }
        Ok(())
    }

    /// libvirt network XML with virtkube's `<metadata>` mark.
    pub fn to_xml(&self) -> String {
        let mut root = Element::new("network")
            .child(Element::new("name").text(&self.name))
            .child(Element::new("metadata").child(self.owner.to_element()));
        if self.mode != NetworkMode::Isolated {
            root = root.child(Element::new("forward").attr("mode", self.mode.as_str()));
        }
        if let Some(b) = &self.bridge {
            let mut br = Element::new("bridge").attr("name", b);
            if self.mode != NetworkMode::Bridge {
                br = br.attr("stp", "on").attr("delay", 0);
            }
            root = root.child(br);
        }
        if !self.dns_hosts.is_empty() {
            let mut dns = Element::new("dns");
            for h in &self.dns_hosts {
                dns = dns.child(h.to_element());
            }
            root = root.child(dns);
        }
        if let Some(ip) = &self.ip {
            let mut ipel = Element::new("ip")
                .attr("address", &ip.address)
                .attr("prefix", ip.prefix);
            if !ip.dhcp.is_empty() || !ip.hosts.is_empty() {
                let mut dhcp = Element::new("dhcp");
                for r in &ip.dhcp {
                    dhcp = dhcp.child(r.to_element());
                }
                for h in &ip.hosts {
                    dhcp = dhcp.child(h.to_element());
                }
                ipel = ipel.child(dhcp);
            }
            root = root.child(ipel);
        }
        root.to_xml()
    }
}

/// A network as libvirt reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkObserved {
    /// Name.
    pub name: String,
    /// UUID.
    pub uuid: String,
    /// Mode.
    pub mode: NetworkMode,
    /// Bridge name.
    pub bridge: Option<String>,
    /// First IP definition.
    pub ip: Option<IpDef>,
    /// Static DNS entries.
    pub dns_hosts: Vec<DnsHost>,
    /// virtkube's mark.
    pub owner: Option<Owner>,
    /// Active now (filled by the engine).
    pub active: bool,
    /// Autostart flag (filled by the engine).
    pub autostart: bool,
    /// Persistent (filled by the engine).
    pub persistent: bool,
}

impl NetworkObserved {
    /// Reads libvirt's network XML.
    pub fn from_xml(text: &str) -> Result<Self, XmlError> {
        let root = xml::parse(text)?;
        if root.name != "network" {
            return Err(XmlError(format!(
                "expected <network>, found <{}>",
                root.name
            )));
        }
        let mode = match root
            .find("forward")
            .and_then(|f| f.get("mode").or(Some("nat")))
        {
            None => NetworkMode::Isolated,
            Some("nat") => NetworkMode::Nat,
            Some("route") => NetworkMode::Route,
            Some("open") => NetworkMode::Open,
            Some(_) => NetworkMode::Bridge,
        };
        let ip = root.find("ip").map(|ip| IpDef {
            address: ip.get("address").unwrap_or_default().to_string(),
            prefix: ip
                .get_parsed("prefix")
                .unwrap_or_else(|| ip.get("netmask").map(netmask_prefix).unwrap_or(0)),
            dhcp: ip
                .find("dhcp")
                .map(|d| {
                    d.find_all("range")
                        .map(|r| DhcpRange {
                            start: r.get("start").unwrap_or_default().to_string(),
                            end: r.get("end").unwrap_or_default().to_string(),
                        })
                        .collect()
                })
                .unwrap_or_default(),
            hosts: ip
                .find("dhcp")
                .map(|d| {
                    d.find_all("host")
                        .map(|h| DhcpHost {
                            mac: h.get("mac").unwrap_or_default().to_ascii_lowercase(),
                            ip: h.get("ip").unwrap_or_default().to_string(),
                            name: h.get("name").map(str::to_string),
                        })
                        .collect()
                })
                .unwrap_or_default(),
        });
        let dns_hosts = root
            .find("dns")
            .map(|d| {
                d.find_all("host")
                    .map(|h| DnsHost {
                        ip: h.get("ip").unwrap_or_default().to_string(),
                        hostnames: h
                            .find_all("hostname")
                            .map(|n| n.text.trim().to_string())
                            .collect(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(NetworkObserved {
            name: root
                .path_text("name")
                .ok_or_else(|| XmlError("network XML without <name>".into()))?,
            uuid: root.path_text("uuid").unwrap_or_default(),
            mode,
            bridge: root
                .find("bridge")
                .and_then(|b| b.get("name"))
                .map(str::to_string),
            ip,
            dns_hosts,
            owner: root.find("metadata").and_then(Owner::from_metadata),
            active: false,
            autostart: false,
            persistent: false,
        })
    }
}

fn netmask_prefix(mask: &str) -> u8 {
    mask.split('.')
        .filter_map(|o| o.parse::<u8>().ok())
        .map(|o| o.count_ones() as u8)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn isolated_round_trip() {
        let def = NetworkDef {
            name: "iso&1".into(),
            mode: NetworkMode::Isolated,
            bridge: Some("vkbr1".into()),
            ip: Some(IpDef {
                address: "10.98.0.1".into(),
                prefix: 24,
                dhcp: vec![DhcpRange {
                    start: "10.98.0.10".into(),
                    end: "10.98.0.99".into(),
                }],
                hosts: vec![DhcpHost {
                    mac: "52:54:00:aa:bb:cc".into(),
                    ip: "10.98.0.5".into(),
                    name: Some("db".into()),
                }],
            }),
            dns_hosts: vec![DnsHost {
                ip: "10.98.0.6".into(),
                hostnames: vec!["web".into(), "web.lab.example".into()],
            }],
            owner: Owner::new("Network", "u", None, "iso&1"),
        };
        def.validate().unwrap();
        let o = NetworkObserved::from_xml(&def.to_xml()).unwrap();
        assert_eq!(o.name, "iso&1");
        assert_eq!(o.mode, NetworkMode::Isolated);
        assert_eq!(o.ip, def.ip);
        assert_eq!(o.dns_hosts, def.dns_hosts);
        assert_eq!(o.owner, Some(def.owner));
        assert_eq!(netmask_prefix("255.255.255.0"), 24);
    }

    #[test]
    fn update_fragments_escape_every_value() {
        let (cmd, section, xml) = NetworkEdit::AddDnsHost(DnsHost {
            ip: "10.0.0.1\"/><x a='".into(),
            hostnames: vec!["a<b>&".into()],
        })
        .to_update();
        assert_eq!(
            (cmd, section),
            (UpdateCommand::AddLast, UpdateSection::DnsHost)
        );
        let back = xml::parse(&xml).unwrap();
        assert_eq!(back.get("ip"), Some("10.0.0.1\"/><x a='"));
        assert_eq!(back.find("hostname").unwrap().text, "a<b>&");
        assert!(back.find("x").is_none());
        let (cmd, section, xml) = NetworkEdit::DeleteDhcpHost(DhcpHost {
            mac: "52:54:00:00:00:01".into(),
            ip: "10.0.0.2".into(),
            name: None,
        })
        .to_update();
        assert_eq!(
            (cmd, section),
            (UpdateCommand::Delete, UpdateSection::IpDhcpHost)
        );
        assert_eq!(
            xml.trim(),
            r#"<host mac="52:54:00:00:00:01" ip="10.0.0.2"/>"#
        );
    }
}
