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

/// The network's IPv4/IPv6 address on the host bridge, with optional DHCP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpDef {
    /// Host address on the bridge.
    pub address: String,
    /// Prefix length.
    pub prefix: u8,
    /// DHCP ranges (none = no DHCP).
    pub dhcp: Vec<DhcpRange>,
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
        if let Some(ip) = &self.ip {
            let mut ipel = Element::new("ip")
                .attr("address", &ip.address)
                .attr("prefix", ip.prefix);
            if !ip.dhcp.is_empty() {
                let mut dhcp = Element::new("dhcp");
                for r in &ip.dhcp {
                    dhcp = dhcp.child(
                        Element::new("range")
                            .attr("start", &r.start)
                            .attr("end", &r.end),
                    );
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
        });
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
            }),
            owner: Owner::new("Network", "u", None, "iso&1"),
        };
        def.validate().unwrap();
        let o = NetworkObserved::from_xml(&def.to_xml()).unwrap();
        assert_eq!(o.name, "iso&1");
        assert_eq!(o.mode, NetworkMode::Isolated);
        assert_eq!(o.ip, def.ip);
        assert_eq!(o.owner, Some(def.owner));
        assert_eq!(netmask_prefix("255.255.255.0"), 24);
    }
}
