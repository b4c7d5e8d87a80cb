//! Networks through the planner and executor (`virtkube apply`'s path) on a real private
//! libvirtd, node A of `scripts/libvirt-nodes.sh` in its own network namespace:
//!
//! * one Network of every mode the API accepts (`bridge` on a bridge the test creates in the
//!   namespace) converges in one round, each active with its bridge present;
//! * a DHCP lease and a DNS entry added to the running isolated network are planned as live
//!   `~` updates only and carried out without restarting it (same bridge device, dnsmasq's
//!   files hold them); removing them is live too;
//! * its DHCP ranges changed, all removed, and added back are live `~` updates too: libvirt
//!   restarts its dnsmasq with the new ranges, the bridge stays; then everything is deleted
//!   by plan.
//!
//! ```sh
//! scripts/libvirt-nodes.sh up DIR; set -a; . DIR/env; set +a
//! cargo nextest run -p virtkube --test network_real --run-ignored all
//! ```

use std::process::Command;

use virtkube::cli::apply::{ConvergeOptions, converge};
use virtkube::execute::{self, ExecOptions};
use virtkube::host::{HostSpec, Hosts};
use virtkube::plan::desired::DesiredState;
use virtkube::plan::{self, Op, PlanOptions, Symbol};
use virtkube_crds::manifest;
use virtkube_engine::EngineConfig;

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run `scripts/libvirt-nodes.sh up DIR` and source DIR/env")
    })
}

fn ip(args: &[&str]) -> std::process::Output {
    let ns = format!(
        "{}A",
        std::env::var("VIRTKUBE_NODES_NETNS").unwrap_or_else(|_| "vk".into())
    );
    Command::new("ip")
        .args(["-n", &ns])
        .args(args)
        .output()
        .expect("ip")
}

fn ifindex(dev: &str) -> Option<u32> {
    let out = ip(&["-o", "link", "show", "dev", dev]);
    String::from_utf8_lossy(&out.stdout)
        .split(':')
        .next()?
        .trim()
        .parse()
        .ok()
}

fn dnsmasq_file(net: &str, ext: &str) -> String {
    let dir = env("VIRTKUBE_TEST_NODES_DIR");
    std::fs::read_to_string(format!("{dir}/A/lib/dnsmasq/{net}.{ext}")).unwrap_or_default()
}

/// Deletes the host bridge and, on failure, the networks the test made.
struct Cleanup {
    tag: String,
    host_bridge: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let uri = env("VIRTKUBE_TEST_NODE_A_URI");
        for mode in ["nat", "route", "open", "iso", "br"] {
            let net = format!("vkp{mode}{}", self.tag);
            for verb in ["net-destroy", "net-undefine"] {
                let _ = Command::new("virsh")
                    .args(["-c", &uri, verb, &net])
                    .output();
            }
        }
        let _ = ip(&["link", "del", &self.host_bridge]);
    }
}

/// The Networks of the test; `iso_ranges` replaces the isolated network's DHCP ranges (a
/// YAML flow list, the `{octet}` and `{third}` of its addresses filled in; `[]`: no DHCP).
fn manifests(
    tag: &str,
    octet: u32,
    host_bridge: &str,
    entries: bool,
    iso_ranges: Option<&str>,
) -> String {
    let mut text = String::new();
    for (i, (short, mode)) in [
        ("nat", "nat"),
        ("route", "route"),
        ("open", "open"),
        ("iso", "isolated"),
    ]
    .iter()
    .enumerate()
    {
        let third = 31 + i;
        let extra = if entries && *mode == "isolated" {
            format!(
                "\n      hosts: [{{mac: \"52:54:00:bb:00:01\", ip: 10.{octet}.{third}.5, name: lease}}]\
                 \n  dns: {{hosts: [{{ip: 10.{octet}.{third}.6, hostnames: [named, named.lab]}}]}}"
            )
        } else {
            String::new()
        };
        let ranges = match iso_ranges {
            Some(r) if *mode == "isolated" => r
                .replace("{octet}", &octet.to_string())
                .replace("{third}", &third.to_string()),
            _ => format!("[{{start: 10.{octet}.{third}.100, end: 10.{octet}.{third}.150}}]"),
        };
        // No range at all: no `dhcp` (the API wants ranges or hosts in it).
        let dhcp = if ranges == "[]" {
            String::new()
        } else {
            format!("\n    dhcp:\n      ranges: {ranges}")
        };
        text.push_str(&format!(
            "apiVersion: virtkube.io/v1alpha1\nkind: Network\nmetadata: {{name: vkp{short}{tag}}}\n\
             spec:\n  mode: {mode}\n  bridge: vkp{short}{tag}b\n  autostart: false\n\
             \x20 ip:\n    address: 10.{octet}.{third}.1\n    prefix: 24{dhcp}{extra}\n---\n"
        ));
    }
    text.push_str(&format!(
        "apiVersion: virtkube.io/v1alpha1\nkind: Network\nmetadata: {{name: vkpbr{tag}}}\n\
         spec: {{mode: bridge, bridge: {host_bridge}, autostart: false}}\n"
    ));
    text
}

fn desired(text: &str, hosts: &Hosts) -> DesiredState {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("networks.yaml");
    std::fs::write(&path, text).unwrap();
    let (d, notices) =
        DesiredState::from_manifests(&manifest::load(&[path]).unwrap(), &hosts.nodes());
    assert!(notices.is_empty(), "{notices:?}");
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs private libvirtd"]
async fn every_mode_converges_and_leases_change_live_through_the_planner() {
    let specs = [HostSpec {
        node: "node-a".into(),
        uri: env("VIRTKUBE_TEST_NODE_A_URI"),
        p2p_uri: None,
        migration_uri: None,
    }];
    let hosts = Hosts::connect(&specs, EngineConfig::default())
        .await
        .unwrap();
    let tag = format!("{}", std::process::id() % 10_000);
    let octet = 100 + std::process::id() % 100;
    let host_bridge = format!("vkphb{tag}");
    let _cleanup = Cleanup {
        tag: tag.clone(),
        host_bridge: host_bridge.clone(),
    };
    assert!(
        ip(&["link", "add", &host_bridge, "type", "bridge"])
            .status
            .success()
    );
    assert!(ip(&["link", "set", &host_bridge, "up"]).status.success());
    let options = ConvergeOptions::default();
    let mut out = Vec::new();

    // 1. Every mode, in one round.
    let first = desired(&manifests(&tag, octet, &host_bridge, false, None), &hosts);
    let done = converge(&hosts, &first, &[], &options, &mut out)
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    assert!(done.is_clean(), "{text}\n{:?}", done.failures);
    assert_eq!(done.rounds, 1, "{text}");
    let host = &done.observed.hosts["node-a"];
    for short in ["nat", "route", "open", "iso", "br"] {
        let net = &host.networks[&format!("vkp{short}{tag}")];
        assert!(net.active, "{short}");
        let bridge = net.bridge.clone().unwrap();
        assert!(ifindex(&bridge).is_some(), "{short}: {bridge}");
    }
    let iso = format!("vkpiso{tag}");
    let iso_bridge = format!("vkpiso{tag}b");
    let index = ifindex(&iso_bridge).unwrap();

    // 2. A lease and a DNS entry on the running isolated network: live updates only.
    let second = desired(&manifests(&tag, octet, &host_bridge, true, None), &hosts);
    let p = plan::plan(
        &second,
        &hosts.observe().await.unwrap(),
        &PlanOptions::default(),
    );
    println!("{}", p.render(false));
    assert_eq!(p.actions.len(), 2, "{}", p.render(false));
    assert!(p.actions.iter().all(|a| a.symbol == Symbol::Live
        && a.object.name == iso
        && matches!(a.op, Op::UpdateNetwork(_))));
    let done = converge(&hosts, &second, &[], &options, &mut out)
        .await
        .unwrap();
    assert!(
        done.is_clean() && done.last_plan.is_empty(),
        "{:?}",
        done.failures
    );
    assert!(
        dnsmasq_file(&iso, "hostsfile")
            .contains(&format!("52:54:00:bb:00:01,10.{octet}.34.5,lease"))
    );
    assert!(dnsmasq_file(&iso, "addnhosts").contains("named"));
    assert_eq!(ifindex(&iso_bridge), Some(index), "not restarted");

    // 3. Removed, live again.
    let done = converge(&hosts, &first, &[], &options, &mut out)
        .await
        .unwrap();
    assert!(
        done.is_clean() && done.last_plan.is_empty(),
        "{:?}",
        done.failures
    );
    assert!(!dnsmasq_file(&iso, "hostsfile").contains("52:54:00:bb:00:01"));
    assert!(!dnsmasq_file(&iso, "addnhosts").contains("named"));
    assert_eq!(ifindex(&iso_bridge), Some(index), "not restarted");

    // 4. DHCP ranges changed on the running network: live updates only (libvirt restarts
    //    dnsmasq with a new configuration; the bridge stays), then every range removed
    //    (DHCP off) and the first one back (DHCP on), live as well.
    let dnsmasq_pid = || {
        let dir = env("VIRTKUBE_TEST_NODES_DIR");
        std::fs::read_to_string(format!("{dir}/A/run/network/{iso}.pid")).unwrap_or_default()
    };
    let steps: [(&str, &[&str], &[&str]); 3] = [
        (
            "[{start: 10.{octet}.{third}.160, end: 10.{octet}.{third}.200}, {start: 10.{octet}.{third}.100, end: 10.{octet}.{third}.120}]",
            &[".160,", ".100,10."],
            &[".150,"],
        ),
        // No range line left at all (every range line names the 10.x network).
        ("[]", &[], &["10."]),
        (
            "[{start: 10.{octet}.{third}.100, end: 10.{octet}.{third}.150}]",
            &[".100,10."],
            &[".160,"],
        ),
    ];
    for (ranges, present, absent) in steps {
        let want = desired(
            &manifests(&tag, octet, &host_bridge, false, Some(ranges)),
            &hosts,
        );
        let p = plan::plan(
            &want,
            &hosts.observe().await.unwrap(),
            &PlanOptions::default(),
        );
        println!("{}", p.render(false));
        assert!(
            !p.actions.is_empty() && p.notices.is_empty(),
            "{ranges}: {}",
            p.render(false)
        );
        assert!(
            p.actions.iter().all(|a| a.symbol == Symbol::Live
                && a.object.name == iso
                && matches!(a.op, Op::UpdateNetwork(_))),
            "{ranges}: {}",
            p.render(false)
        );
        let pid_before = dnsmasq_pid();
        let done = converge(&hosts, &want, &[], &options, &mut out)
            .await
            .unwrap();
        assert!(
            done.is_clean() && done.last_plan.is_empty(),
            "{ranges}: {:?}",
            done.failures
        );
        let conf = dnsmasq_file(&iso, "conf");
        for text in present {
            assert!(
                conf.lines()
                    .any(|l| l.starts_with("dhcp-range=") && l.contains(text)),
                "{ranges}: `{text}` not in\n{conf}"
            );
        }
        for text in absent {
            assert!(
                !conf
                    .lines()
                    .any(|l| l.starts_with("dhcp-range=") && l.contains(text)),
                "{ranges}: `{text}` still in\n{conf}"
            );
        }
        assert_ne!(
            dnsmasq_pid(),
            pid_before,
            "{ranges}: dnsmasq was not restarted"
        );
        assert_eq!(ifindex(&iso_bridge), Some(index), "{ranges}: not restarted");
    }

    // 5. Deleted by plan; libvirt's bridges go, the host's bridge stays.
    let gone = plan::plan_delete(&first, &hosts.observe().await.unwrap());
    let report = execute::execute(&gone, &hosts, ExecOptions::default(), |_, _| {}).await;
    assert!(report.is_success(), "{:?}", report.results);
    assert!(ifindex(&iso_bridge).is_none());
    assert!(ifindex(&host_bridge).is_some());
}
