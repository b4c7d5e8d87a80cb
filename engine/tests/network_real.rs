//! Networks on a real libvirtd (node A of `scripts/libvirt-nodes.sh`, in its own network
//! namespace): DHCP leases and DNS entries changed live with `virNetworkUpdate` (what
//! dnsmasq's files hold, whether the bridge, a guest's link and dnsmasq survive), and every
//! mode the API accepts started for real (the bridge, the firewall rules libvirt adds).
//!
//! Ignored by default; run with `cargo nextest run -p virtkube-engine --test network_real
//! --run-ignored all` after `scripts/libvirt-nodes.sh up` and sourcing its `env`.

use std::process::Command;
use std::time::{Duration, Instant};

use virtkube_engine::model::{
    DhcpHost, DhcpRange, DnsHost, DomainDef, InterfaceDef, IpDef, NetworkDef, NetworkEdit,
    NetworkMode,
};
use virtkube_engine::{Engine, EngineConfig, Owner};

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run `scripts/libvirt-nodes.sh up DIR` and source DIR/env")
    })
}

async fn node_a() -> Engine {
    let uri = env("VIRTKUBE_TEST_NODE_A_URI");
    Engine::connect(&uri, EngineConfig::default())
        .await
        .unwrap_or_else(|e| panic!("cannot connect to node A at {uri}: {e}"))
}

/// Node A's network namespace (`vkA`, or `${VIRTKUBE_NODES_NETNS}A`).
fn netns() -> String {
    format!(
        "{}A",
        std::env::var("VIRTKUBE_NODES_NETNS").unwrap_or_else(|_| "vk".into())
    )
}

/// Node A's directory (its `/var/lib/libvirt` is `lib/`, its `/run/libvirt` is `run/`).
fn node_dir() -> String {
    format!("{}/A", env("VIRTKUBE_TEST_NODES_DIR"))
}

/// Runs a command in node A's network namespace; its stdout (empty when it failed).
fn in_netns(args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", &netns()])
        .args(args)
        .output()
        .expect("ip netns exec");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ip(args: &[&str]) -> std::process::Output {
    Command::new("ip")
        .args(["-n", &netns()])
        .args(args)
        .output()
        .expect("ip")
}

/// The interface index of `dev` in node A's namespace (`None`: no such device).
fn ifindex(dev: &str) -> Option<u32> {
    let out = ip(&["-o", "link", "show", "dev", dev]);
    let text = String::from_utf8_lossy(&out.stdout);
    text.split(':').next()?.trim().parse().ok()
}

/// The bridge `dev` is enslaved to.
fn master_of(dev: &str) -> Option<String> {
    let out = ip(&["-o", "link", "show", "dev", dev]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut words = text.split_whitespace();
    words.find(|w| *w == "master")?;
    words.next().map(str::to_string)
}

fn dnsmasq_pid(net: &str) -> Option<u32> {
    std::fs::read_to_string(format!("{}/run/network/{net}.pid", node_dir()))
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn dnsmasq_file(net: &str, ext: &str) -> String {
    std::fs::read_to_string(format!("{}/lib/dnsmasq/{net}.{ext}", node_dir())).unwrap_or_default()
}

/// Asks the DNS server at `server` (in node A's namespace) for `name`'s A record; the first
/// address answered, `None` when there is none.
fn resolve(server: &str, name: &str) -> Option<String> {
    const QUERY: &str = r#"
import socket, struct, sys
server, name = sys.argv[1], sys.argv[2]
q = struct.pack(">HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
q += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0" + struct.pack(">HH", 1, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(2)
s.sendto(q, (server, 53))
r = s.recv(512)
if struct.unpack(">H", r[6:8])[0] > 0 and r[-6:-4] == b"\0\4":
    print(socket.inet_ntoa(r[-4:]))
"#;
    let answer = in_netns(&["python3", "-c", QUERY, server, name]);
    let answer = answer.trim();
    (!answer.is_empty()).then(|| answer.to_string())
}

/// Waits until `check` holds (libvirt writes dnsmasq's files before the call returns; the
/// wait only absorbs a slow disk).
fn eventually(what: &str, check: impl Fn() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "timed out: {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Destroys and undefines the networks (and deletes the host bridges) it names when the test
/// ends, failed or not.
struct Cleanup {
    networks: Vec<String>,
    domains: Vec<String>,
    bridges: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let uri = env("VIRTKUBE_TEST_NODE_A_URI");
        let virsh = |args: &[&str]| {
            let _ = Command::new("virsh")
                .arg("-c")
                .arg(&uri)
                .args(args)
                .output();
        };
        for d in &self.domains {
            virsh(&["destroy", d]);
            virsh(&["undefine", d]);
        }
        for n in &self.networks {
            virsh(&["net-destroy", n]);
            virsh(&["net-undefine", n]);
        }
        for b in &self.bridges {
            let _ = ip(&["link", "del", b]);
        }
    }
}

fn unique(prefix: &str) -> String {
    format!("{prefix}{}", std::process::id() % 100_000)
}

fn lease(mac: &str, ip: &str, name: Option<&str>) -> DhcpHost {
    DhcpHost {
        mac: mac.into(),
        ip: ip.into(),
        name: name.map(str::to_string),
    }
}

fn dns(ip: &str, names: &[&str]) -> DnsHost {
    DnsHost {
        ip: ip.into(),
        hostnames: names.iter().map(|n| n.to_string()).collect(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs private libvirtd: scripts/libvirt-nodes.sh up, then --run-ignored"]
async fn dhcp_and_dns_hosts_change_live_on_a_running_network() {
    let e = node_a().await;
    let net = unique("vkdh");
    let bridge = unique("vkdhb");
    let guest = unique("vkdhg");
    let _cleanup = Cleanup {
        networks: vec![net.clone()],
        domains: vec![guest.clone()],
        bridges: vec![],
    };
    let no = Owner::new("Network", format!("uid-{net}"), None, &net);
    let octet = 100 + std::process::id() % 100;
    let a = |host: u8| format!("10.{octet}.11.{host}");
    let def = NetworkDef {
        name: net.clone(),
        mode: NetworkMode::Isolated,
        bridge: Some(bridge.clone()),
        ip: Some(IpDef {
            address: a(1),
            prefix: 24,
            dhcp: vec![DhcpRange {
                start: a(100),
                end: a(150),
            }],
            hosts: vec![lease("52:54:00:aa:00:01", &a(5), Some("first"))],
        }),
        dns_hosts: vec![],
        owner: no.clone(),
    };
    e.network_define(&def).await.unwrap();
    e.network_start(&net, &no).await.unwrap();
    let uuid = e.network_observe(&net).await.unwrap().unwrap().uuid;
    let index = ifindex(&bridge).expect("the bridge exists in node A's namespace");
    let pid = dnsmasq_pid(&net).expect("dnsmasq runs for the network");
    assert!(dnsmasq_file(&net, "hostsfile").contains(&format!("52:54:00:aa:00:01,{},first", a(5))));

    // A running guest on the network: its tap must stay on the bridge throughout.
    let go = Owner::new("Domain", format!("uid-{guest}"), Some("it"), &guest);
    let mut d = DomainDef::new(&guest, go.clone());
    d.virt_type = "qemu".into();
    d.os.machine = Some("pc".into());
    d.emulator = Some("/usr/bin/qemu-system-x86_64".into());
    d.interfaces.push(InterfaceDef {
        name: None,
        network: net.clone(),
        model: Some("virtio".into()),
        mac: Some("52:54:00:aa:00:02".into()),
    });
    e.domain_define(&d).await.unwrap();
    e.domain_start(&guest, &go).await.unwrap();
    let tap = e.domain_observe(&guest).await.unwrap().unwrap().interfaces[0]
        .target_dev
        .clone()
        .expect("the guest's tap");
    assert_eq!(master_of(&tap).as_deref(), Some(bridge.as_str()));

    // Added live: a lease for the guest's MAC and the network's first DNS entry.
    for edit in [
        NetworkEdit::AddDhcpHost(lease("52:54:00:aa:00:02", &a(6), Some("guest"))),
        NetworkEdit::AddDnsHost(dns(&a(8), &["files", "files.lab.example"])),
    ] {
        e.network_update(&net, &no, &edit).await.unwrap();
    }
    eventually("the lease in dnsmasq's hostsfile", || {
        dnsmasq_file(&net, "hostsfile").contains(&format!("52:54:00:aa:00:02,{},guest", a(6)))
    });
    eventually("the DNS entry in dnsmasq's addnhosts", || {
        dnsmasq_file(&net, "addnhosts").contains(&format!("{}\tfiles\tfiles.lab.example", a(8)))
            || dnsmasq_file(&net, "addnhosts")
                .contains(&format!("{} files files.lab.example", a(8)))
    });
    assert_eq!(
        resolve(&a(1), "files.lab.example"),
        Some(a(8)),
        "dnsmasq answers the new name without restarting"
    );
    let after_add = dnsmasq_pid(&net);
    println!(
        "dnsmasq pid {pid} before, {after_add:?} after the live adds ({}); addnhosts: {:?}",
        if after_add == Some(pid) {
            "signalled, not restarted"
        } else {
            "restarted by libvirt"
        },
        dnsmasq_file(&net, "addnhosts")
    );

    // Modified live, then removed live.
    e.network_update(
        &net,
        &no,
        &NetworkEdit::ModifyDhcpHost(lease("52:54:00:aa:00:02", &a(7), Some("guest"))),
    )
    .await
    .unwrap();
    eventually("the modified lease", || {
        let hosts = dnsmasq_file(&net, "hostsfile");
        hosts.contains(&format!("52:54:00:aa:00:02,{},guest", a(7))) && !hosts.contains(&a(6))
    });
    for edit in [
        NetworkEdit::DeleteDhcpHost(lease("52:54:00:aa:00:02", &a(7), Some("guest"))),
        NetworkEdit::DeleteDnsHost(dns(&a(8), &["files", "files.lab.example"])),
    ] {
        e.network_update(&net, &no, &edit).await.unwrap();
    }
    eventually("the lease and the DNS entry gone", || {
        !dnsmasq_file(&net, "hostsfile").contains("52:54:00:aa:00:02")
            && !dnsmasq_file(&net, "addnhosts").contains(&a(8))
    });
    assert_eq!(resolve(&a(1), "files.lab.example"), None);
    // libvirt refuses to delete an entry that is not there, and says so.
    let missing = e
        .network_update(
            &net,
            &no,
            &NetworkEdit::DeleteDnsHost(dns(&a(8), &["files"])),
        )
        .await
        .unwrap_err();
    println!("deleting a missing DNS entry: {missing}");

    // The network never restarted: same UUID, same bridge device, the guest still on it,
    // and the persistent definition has what the live one has.
    let obs = e.network_observe(&net).await.unwrap().unwrap();
    assert!(obs.active);
    assert_eq!(obs.uuid, uuid);
    assert_eq!(
        ifindex(&bridge),
        Some(index),
        "the bridge was not recreated"
    );
    assert_eq!(master_of(&tap).as_deref(), Some(bridge.as_str()));
    assert_eq!(
        obs.ip.as_ref().unwrap().hosts,
        [lease("52:54:00:aa:00:01", &a(5), Some("first"))]
    );
    assert!(obs.dns_hosts.is_empty());
    assert!(dnsmasq_pid(&net).is_some(), "dnsmasq still runs");

    // Stopped: an edit changes the definition only, and the next start applies it.
    e.domain_destroy(&guest, &go).await.unwrap();
    e.domain_undefine(&guest, &go).await.unwrap();
    e.network_stop(&net, &no).await.unwrap();
    e.network_update(
        &net,
        &no,
        &NetworkEdit::DeleteDhcpHost(lease("52:54:00:aa:00:01", &a(5), Some("first"))),
    )
    .await
    .unwrap();
    e.network_update(&net, &no, &NetworkEdit::AddDnsHost(dns(&a(9), &["later"])))
        .await
        .unwrap();
    let obs = e.network_observe(&net).await.unwrap().unwrap();
    assert!(!obs.active);
    assert!(obs.ip.as_ref().unwrap().hosts.is_empty());
    assert_eq!(obs.dns_hosts, [dns(&a(9), &["later"])]);
    e.network_start(&net, &no).await.unwrap();
    eventually("the stopped edits applied at start", || {
        !dnsmasq_file(&net, "hostsfile").contains("52:54:00:aa:00:01")
            && dnsmasq_file(&net, "addnhosts").contains("later")
    });
    e.network_stop(&net, &no).await.unwrap();
    e.network_undefine(&net, &no).await.unwrap();
    e.close().await.unwrap();
}

/// Every mode the API accepts, defined and started on node A: the bridge exists in its
/// namespace and libvirt's firewall rules are the mode's (NAT masquerades the subnet, route
/// forwards it without masquerading, open adds no rule for it, isolated rejects forwarding);
/// `bridge` attaches to a host bridge the test creates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs private libvirtd: scripts/libvirt-nodes.sh up, then --run-ignored"]
async fn every_network_mode_starts_on_a_real_daemon() {
    let e = node_a().await;
    let host_bridge = unique("vkhb");
    let modes = [
        (NetworkMode::Nat, 21),
        (NetworkMode::Route, 22),
        (NetworkMode::Open, 23),
        (NetworkMode::Isolated, 24),
        (NetworkMode::Bridge, 0),
    ];
    let names: Vec<String> = modes
        .iter()
        .map(|(m, _)| unique(&format!("vkm{}", &m.as_str()[..3])))
        .collect();
    let _cleanup = Cleanup {
        networks: names.clone(),
        domains: vec![],
        bridges: vec![host_bridge.clone()],
    };
    let octet = 100 + std::process::id() % 100;
    for ((mode, third), net) in modes.iter().zip(&names) {
        let no = Owner::new("Network", format!("uid-{net}"), None, net);
        let subnet = format!("10.{octet}.{third}.0/24");
        let bridge = if *mode == NetworkMode::Bridge {
            let out = ip(&["link", "add", &host_bridge, "type", "bridge"]);
            assert!(out.status.success(), "{out:?}");
            assert!(ip(&["link", "set", &host_bridge, "up"]).status.success());
            host_bridge.clone()
        } else {
            format!("{net}b")
        };
        let def = NetworkDef {
            name: net.clone(),
            mode: *mode,
            bridge: Some(bridge.clone()),
            ip: (*mode != NetworkMode::Bridge).then(|| IpDef {
                address: format!("10.{octet}.{third}.1"),
                prefix: 24,
                dhcp: vec![DhcpRange {
                    start: format!("10.{octet}.{third}.100"),
                    end: format!("10.{octet}.{third}.150"),
                }],
                hosts: vec![],
            }),
            dns_hosts: vec![],
            owner: no.clone(),
        };
        e.network_define(&def).await.unwrap();
        if let Err(err) = e.network_start(net, &no).await {
            panic!("mode {}: libvirt refused to start it: {err}", mode.as_str());
        }
        let obs = e.network_observe(net).await.unwrap().unwrap();
        assert!(obs.active, "mode {}", mode.as_str());
        assert_eq!(obs.mode, *mode);
        assert_eq!(obs.bridge.as_deref(), Some(bridge.as_str()));
        assert!(ifindex(&bridge).is_some(), "{bridge} exists in {}", netns());
        let nat = in_netns(&["iptables", "-t", "nat", "-S"]);
        let filter = in_netns(&["iptables", "-S"]);
        let masquerades = nat
            .lines()
            .any(|l| l.contains(&subnet) && l.contains("MASQUERADE"));
        let forwards = filter
            .lines()
            .any(|l| l.contains(&subnet) && l.contains("-j ACCEPT") && l.contains("LIBVIRT_FW"));
        let rejects = filter
            .lines()
            .any(|l| l.contains(&format!("-o {bridge}")) && l.contains("-j REJECT"));
        println!(
            "mode {:8} bridge {bridge:12} masquerade {masquerades:5} forward-accept \
             {forwards:5} reject-out {rejects}",
            mode.as_str()
        );
        match mode {
            NetworkMode::Nat => assert!(masquerades && forwards, "nat:\n{nat}\n{filter}"),
            NetworkMode::Route => assert!(!masquerades && forwards, "route:\n{nat}\n{filter}"),
            NetworkMode::Open => {
                assert!(!masquerades && !forwards, "open:\n{nat}\n{filter}")
            }
            NetworkMode::Isolated => {
                assert!(!masquerades && !forwards && rejects, "isolated:\n{filter}")
            }
            NetworkMode::Bridge => {
                assert!(!masquerades && !forwards && !rejects, "bridge:\n{filter}")
            }
        }
        e.network_stop(net, &no).await.unwrap();
        e.network_undefine(net, &no).await.unwrap();
        assert!(e.network_observe(net).await.unwrap().is_none());
        if *mode == NetworkMode::Bridge {
            assert!(
                ifindex(&bridge).is_some(),
                "libvirt leaves the host's bridge alone"
            );
        } else {
            assert!(
                ifindex(&bridge).is_none(),
                "libvirt removed its bridge {bridge}"
            );
        }
    }
    e.close().await.unwrap();
}
