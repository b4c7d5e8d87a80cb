//! `Network`: a virtual network (libvirt's `virNetwork`), cluster-scoped, owned by admins.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::validation::{FieldErrors, Validate};

/// The shape of an IPv4 address in dotted-quad form.
pub const IPV4_PATTERN: &str = r"^((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])$";

/// A Linux interface name: at most 15 characters, no `/`, whitespace or `:`.
pub const IFNAME_PATTERN: &str = r"^[A-Za-z0-9_.-]{1,15}$";

/// The desired state of a virtual network on every node it selects.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "virtkube.io",
    version = "v1alpha1",
    kind = "Network",
    status = "NetworkStatus",
    shortname = "vnet",
    category = "virtkube",
    derive = "PartialEq",
    doc = "A virtual network, realized as a libvirt network on every node it selects.",
    printcolumn(name = "Mode", type_ = "string", json_path = ".spec.mode"),
    printcolumn(name = "Bridge", type_ = "string", json_path = ".spec.bridge"),
    printcolumn(name = "Address", type_ = "string", json_path = ".spec.ip.address"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.mode != 'bridge' || has(self.bridge)", "message": "mode bridge attaches to an existing host bridge: set bridge"},
    {"rule": "self.mode != 'bridge' || !has(self.ip)", "message": "mode bridge has no libvirt-managed addresses: remove ip"},
    {"rule": "self.mode == 'bridge' || self.mode == 'isolated' || has(self.ip)", "message": "modes nat, route and open need ip (the host's address on the network)"},
    {"rule": "!has(self.dns) || has(self.ip)", "message": "dns needs ip: libvirt's DNS server listens on the host's address"}
]))]
pub struct NetworkSpec {
    /// How the network reaches the outside (libvirt `<forward mode=…>`): `nat` (default),
    /// `route`, `open`, `bridge` (attach guests to an existing host bridge) or `isolated`
    /// (guests and host only). Immutable.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "self == oldSelf", "message": "mode is immutable: create a new Network"}]))]
    pub mode: NetworkMode,
    /// The host bridge: for `bridge` mode, an existing bridge to attach to; for other modes,
    /// the name libvirt gives the bridge it creates (chosen by libvirt when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(IFNAME_PATTERN))]
    pub bridge: Option<String>,
    /// The host's IPv4 address on the network, with optional DHCP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<NetworkIp>,
    /// Static DNS entries served by libvirt's dnsmasq on this network (libvirt `<dns>`);
    /// needs `ip` (not for mode `bridge`). Changed live (`virNetworkUpdate`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<NetworkDns>,
    /// The MTU of the network's bridge; libvirt's default (1500) when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 68, max = 65535))]
    pub mtu: Option<u32>,
    /// Start the network when the node's libvirt daemon starts (default true).
    #[serde(default = "yes")]
    pub autostart: bool,
    /// Labels of the nodes (their `HypervisorNode`s) that get this network; empty means every
    /// node.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
}

fn yes() -> bool {
    true
}

/// A network's forwarding mode.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// NAT to the host's uplinks.
    #[default]
    Nat,
    /// Routed, no NAT.
    Route,
    /// Routed with no firewall rules added by libvirt.
    Open,
    /// Guests attach to an existing host bridge.
    Bridge,
    /// No forwarding: guests and the host only.
    Isolated,
}

/// The host's IPv4 address on a network (libvirt `<ip>`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetworkIp {
    /// The host's address (`192.168.122.1`).
    #[schemars(pattern(IPV4_PATTERN))]
    pub address: String,
    /// The prefix length (`24`).
    #[schemars(range(min = 1, max = 30))]
    pub prefix: u8,
    /// Addresses handed out by libvirt's dnsmasq; unset means no DHCP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dhcp: Option<Dhcp>,
}

/// DHCP on a network.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "(has(self.ranges) && size(self.ranges) > 0) || (has(self.hosts) && size(self.hosts) > 0)", "message": "dhcp needs ranges or hosts"}
]))]
pub struct Dhcp {
    /// Address ranges to lease from, keyed by `start`. Changed live (`virNetworkUpdate`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["start"]))]
    pub ranges: Vec<DhcpRange>,
    /// Fixed addresses by MAC address (libvirt `<dhcp><host>`), keyed by `mac`. Changed live
    /// (`virNetworkUpdate`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["mac"]))]
    pub hosts: Vec<DhcpHost>,
}

/// A fixed DHCP lease.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DhcpHost {
    /// The guest NIC's MAC address (a Domain's `interfaces[].macAddress`); compared without
    /// regard to case, as libvirt does.
    #[schemars(length(max = 17), pattern(crate::names::MAC_PATTERN))]
    pub mac: String,
    /// The address it always gets, inside the network and not the host's own.
    #[schemars(length(max = 15), pattern(IPV4_PATTERN))]
    pub ip: String,
    /// A host name handed out with the lease (and resolved by libvirt's DNS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), pattern(crate::names::DNS_LABEL_PATTERN))]
    pub name: Option<String>,
}

/// Static DNS entries (libvirt `<dns><host>`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetworkDns {
    /// Host names for addresses, keyed by `ip`. Changed live (`virNetworkUpdate`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["ip"]))]
    pub hosts: Vec<DnsHost>,
}

/// The names of one address.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DnsHost {
    /// The address (IPv4).
    #[schemars(length(max = 15), pattern(IPV4_PATTERN))]
    pub ip: String,
    /// Its names (`db`, `db.lab.example`).
    #[schemars(length(min = 1, max = 8))]
    pub hostnames: Vec<DnsName>,
}

/// A DNS name: labels of letters, digits and `-`, joined by dots.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(transparent)]
pub struct DnsName(#[schemars(length(min = 1, max = 253), pattern(DNS_NAME_PATTERN))] pub String);

/// A DNS name (RFC 1123 labels, lower or upper case, joined by dots).
pub const DNS_NAME_PATTERN: &str = r"^[A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?)*$";

/// An inclusive DHCP address range.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DhcpRange {
    /// The first address leased.
    #[schemars(pattern(IPV4_PATTERN))]
    pub start: String,
    /// The last address leased.
    #[schemars(pattern(IPV4_PATTERN))]
    pub end: String,
}

/// What virtkube observed of a network, per node.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetworkStatus {
    /// One entry per selected node, keyed by `nodeName`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["nodeName"]))]
    pub nodes: Vec<NetworkNodeStatus>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready` (every selected node has the network active).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// A network on one node.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetworkNodeStatus {
    /// The node.
    pub node_name: String,
    /// Whether the network is active there.
    pub active: bool,
    /// The bridge it uses there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<String>,
    /// libvirt's autostart flag there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autostart: Option<bool>,
    /// Why it is not active, in libvirt's words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl Validate for NetworkSpec {
    fn validate(&self) -> FieldErrors {
        let mut errors = FieldErrors::default();
        match self.mode {
            NetworkMode::Bridge => {
                if self.bridge.is_none() {
                    errors.push(
                        "spec.bridge",
                        "mode bridge attaches to an existing host bridge: set bridge",
                    );
                }
                if self.ip.is_some() {
                    errors.push(
                        "spec.ip",
                        "mode bridge has no libvirt-managed addresses: remove ip",
                    );
                }
            }
            NetworkMode::Nat | NetworkMode::Route | NetworkMode::Open if self.ip.is_none() => {
                errors.push(
                    "spec.ip",
                    "modes nat, route and open need ip (the host's address on the network)",
                )
            }
            _ => {}
        }
        if let Some(ip) = &self.ip {
            validate_ip(ip, &mut errors);
        }
        if let Some(dns) = &self.dns {
            validate_dns(dns, self.ip.is_some(), &mut errors);
        }
        errors
    }
}

fn validate_dns(dns: &NetworkDns, has_ip: bool, errors: &mut FieldErrors) {
    if !has_ip {
        errors.push(
            "spec.dns",
            "dns needs ip: libvirt's DNS server listens on the host's address",
        );
    }
    crate::validation::check_unique(
        errors,
        "spec.dns.hosts",
        "ip",
        dns.hosts.iter().map(|h| h.ip.as_str()),
    );
    for host in &dns.hosts {
        let path = format!("spec.dns.hosts[ip={}]", host.ip);
        if host.ip.parse::<Ipv4Addr>().is_err() {
            errors.push(&path, format!("`{}` is not an IPv4 address", host.ip));
        }
        if host.hostnames.is_empty() {
            errors.push(
                format!("{path}.hostnames"),
                "name the address at least once",
            );
        }
        for name in &host.hostnames {
            if !is_dns_name(&name.0) {
                errors.push(
                    format!("{path}.hostnames"),
                    format!("`{}` is not a DNS name", name.0),
                );
            }
        }
    }
}

/// Whether `text` is a DNS name ([`DNS_NAME_PATTERN`]).
pub fn is_dns_name(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 253
        && text.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

fn validate_ip(ip: &NetworkIp, errors: &mut FieldErrors) {
    let Ok(address) = ip.address.parse::<Ipv4Addr>() else {
        errors.push(
            "spec.ip.address",
            format!("`{}` is not an IPv4 address", ip.address),
        );
        return;
    };
    if !(1..=30).contains(&ip.prefix) {
        errors.push("spec.ip.prefix", "must be between 1 and 30");
        return;
    }
    let mask = u32::MAX << (32 - u32::from(ip.prefix));
    let network = u32::from(address) & mask;
    let broadcast = network | !mask;
    if u32::from(address) == network || u32::from(address) == broadcast {
        errors.push(
            "spec.ip.address",
            format!(
                "{address} is the network or broadcast address of /{}",
                ip.prefix
            ),
        );
    }
    let Some(dhcp) = &ip.dhcp else { return };
    if dhcp.ranges.is_empty() && dhcp.hosts.is_empty() {
        errors.push("spec.ip.dhcp", "dhcp needs ranges or hosts");
    }
    let macs: Vec<String> = dhcp
        .hosts
        .iter()
        .map(|h| h.mac.to_ascii_lowercase())
        .collect();
    crate::validation::check_unique(
        errors,
        "spec.ip.dhcp.hosts",
        "mac",
        macs.iter().map(String::as_str),
    );
    crate::validation::check_unique(
        errors,
        "spec.ip.dhcp.hosts",
        "ip",
        dhcp.hosts.iter().map(|h| h.ip.as_str()),
    );
    for host in &dhcp.hosts {
        let path = format!("spec.ip.dhcp.hosts[mac={}]", host.mac);
        match host.ip.parse::<Ipv4Addr>() {
            Ok(a) if u32::from(a) == u32::from(address) => errors.push(
                format!("{path}.ip"),
                format!("{a} is the host's own address"),
            ),
            Ok(a)
                if u32::from(a) & mask != network
                    || u32::from(a) == network
                    || u32::from(a) == broadcast =>
            {
                errors.push(
                    format!("{path}.ip"),
                    format!(
                        "{a} is outside {}/{}'s host addresses",
                        Ipv4Addr::from(network),
                        ip.prefix
                    ),
                )
            }
            Ok(_) => {}
            Err(_) => errors.push(
                format!("{path}.ip"),
                format!("`{}` is not an IPv4 address", host.ip),
            ),
        }
    }
    for range in &dhcp.ranges {
        let path = format!("spec.ip.dhcp.ranges[start={}]", range.start);
        let (Ok(start), Ok(end)) = (
            range.start.parse::<Ipv4Addr>(),
            range.end.parse::<Ipv4Addr>(),
        ) else {
            errors.push(&path, "start and end must be IPv4 addresses");
            continue;
        };
        if u32::from(start) > u32::from(end) {
            errors.push(&path, format!("start {start} is after end {end}"));
        }
        for (field, a) in [("start", start), ("end", end)] {
            if u32::from(a) & mask != network
                || u32::from(a) == network
                || u32::from(a) == broadcast
            {
                errors.push(
                    format!("{path}.{field}"),
                    format!(
                        "{a} is outside {network_addr}/{prefix}'s host addresses",
                        network_addr = Ipv4Addr::from(network),
                        prefix = ip.prefix
                    ),
                );
            }
        }
        if (u32::from(start)..=u32::from(end)).contains(&u32::from(address)) {
            errors.push(
                &path,
                format!("the range includes the host's own address {address}"),
            );
        }
    }
}
