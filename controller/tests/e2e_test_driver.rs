//! End to end against libvirt's test driver (`test:///default`), in one process: its state
//! lives as long as the process, and every test in this file shares it, so the scenario is
//! one test, step by step.

use std::path::PathBuf;

use virtkube::cli::apply::{ConvergeOptions, converge};
use virtkube::execute::{self, ExecOptions};
use virtkube::host::{HostSpec, Hosts};
use virtkube::plan::desired::DesiredState;
use virtkube::plan::observed::PowerObserved;
use virtkube::plan::{self, NoticeKind, Op, PlanOptions};
use virtkube_crds::manifest::{self, Manifest, Object};
use virtkube_engine::EngineConfig;

fn examples() -> Vec<Manifest> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples");
    manifest::load(&[dir]).expect("examples load")
}

fn domain_mut<'a>(manifests: &'a mut [Manifest], name: &str) -> &'a mut virtkube_crds::Domain {
    manifests
        .iter_mut()
        .find_map(|m| match &mut m.object {
            Object::Domain(d) if d.metadata.name.as_deref() == Some(name) => Some(&mut **d),
            _ => None,
        })
        .expect("domain in examples")
}

fn network_mut<'a>(manifests: &'a mut [Manifest], name: &str) -> &'a mut virtkube_crds::Network {
    manifests
        .iter_mut()
        .find_map(|m| match &mut m.object {
            Object::Network(n) if n.metadata.name.as_deref() == Some(name) => Some(&mut **n),
            _ => None,
        })
        .expect("network in examples")
}

async fn hosts() -> Hosts {
    Hosts::connect(
        &[HostSpec {
            node: "local".into(),
            uri: "test:///default".into(),
            p2p_uri: None,
            migration_uri: None,
        }],
        EngineConfig::default(),
    )
    .await
    .expect("test driver connects")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn examples_converge_reapply_is_a_no_op_changes_apply_live_prune_and_delete_clean_up() {
    let hosts = hosts().await;
    let mut manifests = examples();
    let quiet = ConvergeOptions {
        verbose: false,
        ..ConvergeOptions::default()
    };
    let mut out = Vec::new();

    // 1. Everything in examples/ converges in one round.
    let (desired, notices) = DesiredState::from_manifests(&manifests, &hosts.nodes());
    assert!(notices.is_empty(), "{notices:?}");
    let done = converge(&hosts, &desired, &[], &ConvergeOptions::default(), &mut out)
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out).to_string();
    assert!(
        done.is_clean(),
        "not converged: {text}\n{:?}",
        done.failures
    );
    assert_eq!(done.rounds, 1, "{text}");
    let host = &done.observed.hosts["local"];
    let web = &host.domains["default.web"];
    assert_eq!(web.power, PowerObserved::Running);
    assert_eq!(web.pinning.get(&0).map(String::as_str), Some("0"));
    assert_eq!(web.pinning.get(&1).map(String::as_str), Some("1"));
    assert_eq!(web.emulator_cpuset.as_deref(), Some("0-1"));
    assert!(web.autostart);
    assert_eq!((web.vcpus, web.max_vcpus), (2, 4));
    assert_eq!(host.domains["default.worker"].power, PowerObserved::Paused);
    assert_eq!(host.domains["default.spare"].power, PowerObserved::Shutoff);
    for v in ["default.base", "default.web-root", "default.scratch"] {
        assert!(
            host.volumes
                .contains_key(&("images".to_string(), v.to_string())),
            "{v}"
        );
    }
    assert!(host.networks["vk-nat"].active && host.networks["vk-isolated"].active);
    assert!(host.pools["images"].active && host.pools["images"].autostart);
    // The test driver's own objects are untouched.
    assert!(host.domains["test"].owner.is_none());

    // 2. A second apply is a no-op: empty plan, zero mutating libvirt calls.
    hosts.reset_stats();
    let again = converge(&hosts, &desired, &[], &quiet, &mut out)
        .await
        .unwrap();
    assert!(
        again.first_plan.is_empty(),
        "{}",
        again.first_plan.render(false)
    );
    assert_eq!(again.actions_run, 0);
    assert_eq!(hosts.stats().mutating_calls(), 0, "{:?}", hosts.stats());

    // 3. Live changes: vCPUs within max, memory within max, a new pin, autostart off.
    {
        let web = domain_mut(&mut manifests, "web");
        web.spec.cpu.vcpus = 3;
        web.spec.memory.size = "768Mi".into();
        web.spec.cpu.pinning[1].cpuset = "2-3".into();
        web.spec.autostart = false;
    }
    let (desired, _) = DesiredState::from_manifests(&manifests, &hosts.nodes());
    let observed = hosts.observe().await.unwrap();
    let p = plan::plan(&desired, &observed, &PlanOptions::default());
    let ops: Vec<&Op> = p.actions.iter().map(|a| &a.op).collect();
    assert!(ops.contains(&&Op::SetVcpus(3)), "{}", p.render(false));
    assert!(
        ops.contains(&&Op::SetMemory(768 * 1024)),
        "{}",
        p.render(false)
    );
    assert!(ops.contains(&&Op::PinVcpu {
        vcpu: 1,
        cpuset: "2-3".into()
    }));
    assert!(ops.contains(&&Op::SetDomainAutostart(false)));
    assert!(p.actions.iter().all(|a| a.symbol == plan::Symbol::Live));
    let done = converge(&hosts, &desired, &[], &quiet, &mut out)
        .await
        .unwrap();
    assert!(
        done.is_clean(),
        "{:?} {}",
        done.failures,
        done.last_plan.render(false)
    );
    let web = &done.observed.hosts["local"].domains["default.web"];
    assert_eq!(web.vcpus, 3);
    assert_eq!(web.memory_kib, 768 * 1024);
    assert_eq!(web.pinning.get(&1).map(String::as_str), Some("2-3"));

    // 3b. A pin removed from the manifest floats again: pinned to every online CPU (the test
    //     driver's host has 0, 2 and 4 online), and the next plan is empty.
    {
        let web = domain_mut(&mut manifests, "web");
        web.spec.cpu.pinning.retain(|p| p.vcpu != 1);
        web.spec.cpu.emulator_cpuset = None;
    }
    let (desired, _) = DesiredState::from_manifests(&manifests, &hosts.nodes());
    let observed = hosts.observe().await.unwrap();
    assert_eq!(
        observed.hosts["local"].online_cpus.as_deref(),
        Some("0,2,4")
    );
    let p = plan::plan(&desired, &observed, &PlanOptions::default());
    assert_eq!(
        p.actions.iter().map(|a| &a.op).collect::<Vec<_>>(),
        vec![
            &Op::PinVcpu {
                vcpu: 1,
                cpuset: "0,2,4".into()
            },
            &Op::PinEmulator("0,2,4".into())
        ],
        "{}",
        p.render(false)
    );
    let done = converge(&hosts, &desired, &[], &quiet, &mut out)
        .await
        .unwrap();
    assert!(
        done.is_clean() && done.last_plan.is_empty(),
        "{:?}",
        done.failures
    );
    let web = &done.observed.hosts["local"].domains["default.web"];
    assert_eq!(web.pinning.get(&1).map(String::as_str), Some("0,2,4"));
    assert_eq!(web.pinning.get(&0).map(String::as_str), Some("0"));

    // 3c. A DHCP lease and a DNS entry on the network the running web uses: changed live
    //     (`virNetworkUpdate`), never a recreation; then changed and removed the same way.
    let set_entries = |manifests: &mut [Manifest], lease: Option<(&str, &str)>, names: &[&str]| {
        let net = network_mut(manifests, "vk-nat");
        let dhcp = net.spec.ip.as_mut().unwrap().dhcp.as_mut().unwrap();
        dhcp.hosts = lease
            .map(|(mac, ip)| virtkube_crds::network::DhcpHost {
                mac: mac.into(),
                ip: ip.into(),
                name: Some("web".into()),
            })
            .into_iter()
            .collect();
        net.spec.dns = (!names.is_empty()).then(|| virtkube_crds::network::NetworkDns {
            hosts: vec![virtkube_crds::network::DnsHost {
                ip: "192.168.150.10".into(),
                hostnames: names
                    .iter()
                    .map(|n| virtkube_crds::network::DnsName(n.to_string()))
                    .collect(),
            }],
        });
    };
    for (lease, names, expected) in [
        (
            Some(("52:54:00:00:15:01", "192.168.150.11")),
            &["files"][..],
            &["add DHCP host", "add DNS host"][..],
        ),
        (
            Some(("52:54:00:00:15:01", "192.168.150.12")),
            &["files", "files.lab"][..],
            &["remove DNS host", "change DHCP host", "add DNS host"][..],
        ),
        (None, &[][..], &["remove DHCP host", "remove DNS host"][..]),
    ] {
        set_entries(&mut manifests, lease, names);
        let (desired, _) = DesiredState::from_manifests(&manifests, &hosts.nodes());
        let observed = hosts.observe().await.unwrap();
        let p = plan::plan(&desired, &observed, &PlanOptions::default());
        let verbs: Vec<String> = p.actions.iter().map(|a| a.op.verb()).collect();
        assert_eq!(verbs.len(), expected.len(), "{}", p.render(false));
        for (verb, want) in verbs.iter().zip(expected) {
            assert!(
                verb.starts_with(want),
                "{verb} / {want}\n{}",
                p.render(false)
            );
        }
        assert!(p.notices.is_empty(), "{}", p.render(false));
        assert!(
            p.actions
                .iter()
                .all(|a| a.symbol == plan::Symbol::Live && matches!(a.op, Op::UpdateNetwork(_)))
        );
        let done = converge(&hosts, &desired, &[], &quiet, &mut out)
            .await
            .unwrap();
        assert!(
            done.is_clean() && done.last_plan.is_empty(),
            "{:?} {}",
            done.failures,
            done.last_plan.render(false)
        );
        let host = &done.observed.hosts["local"];
        let net = &host.networks["vk-nat"];
        assert!(net.active);
        assert_eq!(net.dhcp_hosts.len(), usize::from(lease.is_some()));
        assert_eq!(
            net.dns_hosts
                .iter()
                .map(|h| h.hostnames.len())
                .sum::<usize>(),
            names.len()
        );
        assert_eq!(host.domains["default.web"].power, PowerObserved::Running);
    }

    // 4. A restart-required change on a running domain waits (Deferred): reported, no action.
    domain_mut(&mut manifests, "web").spec.cpu.max_vcpus = Some(8);
    let (desired, _) = DesiredState::from_manifests(&manifests, &hosts.nodes());
    let observed = hosts.observe().await.unwrap();
    let p = plan::plan(&desired, &observed, &PlanOptions::default());
    assert!(p.is_empty(), "{}", p.render(false));
    let pending = p
        .notices
        .iter()
        .find(|n| n.kind == NoticeKind::RestartPending)
        .expect("restart pending");
    assert_eq!(pending.changes[0].field, "cpu.maxVcpus");
    // On a stopped domain the same kind of change is applied now, by redefinition.
    {
        let spare = domain_mut(&mut manifests, "spare");
        spare.spec.cpu.vcpus = 2;
        spare.spec.memory.size = "512Mi".into();
    }
    let (desired, _) = DesiredState::from_manifests(&manifests, &hosts.nodes());
    let done = converge(&hosts, &desired, &[], &quiet, &mut out)
        .await
        .unwrap();
    assert!(
        done.last_plan.is_empty(),
        "{}",
        done.last_plan.render(false)
    );
    let spare = &done.observed.hosts["local"].domains["default.spare"];
    assert_eq!(
        (spare.vcpus, spare.memory_kib, spare.power),
        (2, 512 * 1024, PowerObserved::Shutoff)
    );

    // 5. A name clash with a libvirt object virtkube does not own is an error naming both.
    let clash_dir = tempfile::tempdir().unwrap();
    std::fs::write(
        clash_dir.path().join("net.yaml"),
        "apiVersion: virtkube.io/v1alpha1\nkind: Network\nmetadata:\n  name: default\nspec:\n  mode: isolated\n",
    )
    .unwrap();
    let clash = manifest::load(&[clash_dir.path().to_path_buf()]).unwrap();
    let (clash_desired, _) = DesiredState::from_manifests(&clash, &hosts.nodes());
    let p = plan::plan(
        &clash_desired,
        &hosts.observe().await.unwrap(),
        &PlanOptions::default(),
    );
    assert!(p.is_empty() && p.has_errors());
    let n = &p.notices[0];
    assert_eq!(n.kind, NoticeKind::Conflict);
    assert!(
        n.message.contains("Network default")
            && n.message.contains("net.yaml")
            && n.message.contains("no virtkube ownership mark"),
        "{}",
        n.message
    );

    // 6. Prune: drop `worker` and `scratch` from the manifests. The domain goes; the volume
    //    stays (its reclaim policy is unknown once it left the manifests).
    manifests.retain(
        |m| !matches!(&m.object, Object::Domain(d) if d.metadata.name.as_deref() == Some("worker")),
    );
    manifests.retain(|m| !matches!(&m.object, Object::Volume(v) if v.metadata.name.as_deref() == Some("scratch")));
    // web still uses scratch: take the disk off web too (a restart-required change, so
    // web restarts with updatePolicy Restart).
    {
        let web = domain_mut(&mut manifests, "web");
        web.spec.disks.retain(|d| d.name != "scratch");
        web.spec.update_policy = virtkube_crds::domain::UpdatePolicy::Restart;
    }
    let (desired, _) = DesiredState::from_manifests(&manifests, &hosts.nodes());
    let prune = ConvergeOptions {
        prune: true,
        verbose: false,
        ..ConvergeOptions::default()
    };
    let done = converge(&hosts, &desired, &[], &prune, &mut out)
        .await
        .unwrap();
    assert!(
        done.is_clean(),
        "{:?} {}",
        done.failures,
        done.last_plan.render(false)
    );
    let host = &done.observed.hosts["local"];
    assert!(!host.domains.contains_key("default.worker"));
    assert!(
        host.volumes
            .contains_key(&("images".to_string(), "default.scratch".to_string()))
    );
    assert!(
        done.first_plan
            .notices
            .iter()
            .any(|n| n.kind == NoticeKind::Retained && n.object.name == "default.scratch")
    );
    let web = &host.domains["default.web"];
    assert_eq!(web.max_vcpus, 8);
    assert_eq!(web.disks.len(), 1);
    assert_eq!(web.power, PowerObserved::Running);
    assert!(
        host.domains.contains_key("test"),
        "the test driver's own domain is never pruned"
    );

    // 7. Delete: domains go (gracefully, then destroyed), web-root (Delete) goes, base
    //    (Retain) stays on disk, the pool is undefined, the networks go.
    let (desired, _) = DesiredState::from_manifests(&manifests, &hosts.nodes());
    let observed = hosts.observe().await.unwrap();
    let p = plan::plan_delete(&desired, &observed);
    assert!(
        p.notices
            .iter()
            .any(|n| n.kind == NoticeKind::Retained && n.object.name == "default.base")
    );
    assert!(!p.actions.iter().any(|a| a.object.name == "default.base"));
    let report = execute::execute(&p, &hosts, ExecOptions::default(), |_, _| {}).await;
    assert!(report.is_success(), "{report:?}");
    let host = &hosts.observe().await.unwrap().hosts["local"];
    assert!(host.domains.values().all(|d| d.owner.is_none()));
    assert!(host.networks.values().all(|n| n.owner.is_none()));
    assert!(host.pools.values().all(|p| p.owner.is_none()));
    assert!(host.domains.contains_key("test") && host.networks.contains_key("default"));
    hosts.close().await.unwrap();
}
