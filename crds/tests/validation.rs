//! virtkube's own cross-field rules: the same ones as the CEL rules (which Kubernetes 1.24
//! drops) plus those CEL cannot express (quantities, cpuset meaning, addresses).

use serde_json::{Value, json};
use virtkube_crds::validation::Validate;
use virtkube_crds::{DomainSpec, NetworkSpec, StoragePoolSpec, VolumeSpec};

fn errors<T: Validate + serde::de::DeserializeOwned>(spec: Value) -> Vec<String> {
    let spec: T = serde_json::from_value(spec).unwrap();
    spec.validate()
        .0
        .into_iter()
        .map(|e| e.to_string())
        .collect()
}

fn assert_one<T: Validate + serde::de::DeserializeOwned>(spec: Value, expected: Option<&str>) {
    let found = errors::<T>(spec.clone());
    match expected {
        None => assert!(found.is_empty(), "{spec}: unexpected {found:?}"),
        Some(text) => assert!(
            found.iter().any(|e| e.contains(text)),
            "{spec}: expected `{text}` in {found:?}"
        ),
    }
}

#[test]
fn domain_rules() {
    let m = json!({"size": "1Gi"});
    let cases: Vec<(Value, Option<&str>)> = vec![
        (json!({"memory": m}), None),
        (
            json!({"memory": {"size": "0"}}),
            Some("spec.memory.size: must be more than 0"),
        ),
        (
            json!({"memory": {"size": "1000"}}),
            Some("whole number of KiB"),
        ),
        (
            json!({"memory": {"size": "2Gi", "max": "1Gi"}}),
            Some("spec.memory.max: max 1Gi is below size 2Gi"),
        ),
        (
            json!({"memory": {"size": "0.5"}}),
            Some("not a whole number of bytes"),
        ),
        (
            json!({"memory": {"size": "3Mi", "hugepages": {"pageSize": "2Mi"}}}),
            Some("multiple of the hugepage size 2Mi"),
        ),
        (
            json!({"memory": {"size": "4Mi", "hugepages": {"pageSize": "3Mi"}}}),
            Some("power of two"),
        ),
        (
            json!({"memory": m, "cpu": {"vcpus": 4, "maxVcpus": 2}}),
            Some("maxVcpus 2 is below vcpus 4"),
        ),
        (
            json!({"memory": m, "cpu": {"vcpus": 2, "pinning": [{"vcpu": 2, "cpuset": "0"}]}}),
            Some("spec.cpu.pinning[vcpu=2]: vcpu 2 does not exist: indices run from 0 to 1"),
        ),
        (
            json!({"memory": m, "cpu": {"vcpus": 2, "pinning": [{"vcpu": 0, "cpuset": "0"}, {"vcpu": 0, "cpuset": "1"}]}}),
            Some("vcpu 0 is pinned twice"),
        ),
        (
            json!({"memory": m, "cpu": {"vcpus": 1, "emulatorCpuset": "3-1"}}),
            Some("spec.cpu.emulatorCpuset: cpuset range `3-1` runs backwards"),
        ),
        (
            json!({"memory": m, "cpu": {"vcpus": 4, "topology": {"sockets": 2, "cores": 1, "threads": 1}}}),
            Some("sockets x cores x threads is 2, but maxVcpus is 4"),
        ),
        (
            json!({"memory": m, "cpu": {"vcpus": 1, "model": "Haswell"}}),
            Some("model needs mode custom"),
        ),
        (
            json!({"memory": m, "runStrategy": "Halted", "state": "Paused"}),
            Some("runStrategy Halted keeps the domain stopped"),
        ),
        (
            json!({"memory": m, "runStrategy": "RerunOnFailure", "state": "Stopped"}),
            Some("state Stopped needs runStrategy Halted or Manual"),
        ),
        (
            json!({"memory": m, "os": {"initrd": "/boot/initrd"}}),
            Some("initrd and cmdline need kernel"),
        ),
        (
            json!({"memory": m, "os": {"kernel": "/boot/../etc/passwd"}}),
            Some("spec.os.kernel: must be an absolute path without"),
        ),
        (
            json!({"memory": m, "os": {"boot": ["hd", "hd"]}}),
            Some("Hd is listed twice"),
        ),
        (
            json!({"memory": m, "os": {"boot": ["hd"]}, "disks": [{"name": "a", "volume": "v", "bootOrder": 1}]}),
            Some("spec.os.boot: os.boot and a disk's bootOrder cannot be combined"),
        ),
        (
            json!({"memory": m, "disks": [{"name": "a", "volume": "v"}, {"name": "a", "volume": "w"}]}),
            Some("duplicate name `a`"),
        ),
        (
            json!({"memory": m, "disks": [{"name": "a"}]}),
            Some("set exactly one of volume and hostPath"),
        ),
        (
            json!({"memory": m, "disks": [{"name": "a", "volume": "v", "bus": "sata", "target": "vda"}]}),
            Some("`vda` does not match bus Sata"),
        ),
        (
            json!({"memory": m, "disks": [{"name": "a", "volume": "v", "target": "vda"}, {"name": "b", "volume": "w", "target": "vda"}]}),
            Some("duplicate target `vda`"),
        ),
        (
            json!({"memory": m, "interfaces": [{"name": "a", "network": "n", "macAddress": "52:54:00:00:00:01"}, {"name": "b", "network": "n", "macAddress": "52:54:00:00:00:01"}]}),
            Some("duplicate macAddress"),
        ),
        (
            json!({"memory": m, "migration": {"bandwidth": "fast"}}),
            Some("spec.migration.bandwidth"),
        ),
        (
            json!({"memory": m, "cpu": {"shares": 512, "limit": "1500m", "period": 100000, "quota": 50000, "emulatorPeriod": 1000, "emulatorQuota": 1000}}),
            None,
        ),
        (json!({"memory": m, "cpu": {"limit": "0.25"}}), None),
        (
            json!({"memory": m, "cpu": {"shares": 1}}),
            Some("spec.cpu.shares"),
        ),
        (
            json!({"memory": m, "cpu": {"shares": 20000}}),
            Some("outside 2-10000"),
        ),
        (
            json!({"memory": m, "cpu": {"period": 999}}),
            Some("spec.cpu.period"),
        ),
        (
            json!({"memory": m, "cpu": {"quota": 10}}),
            Some("spec.cpu.quota"),
        ),
        (
            json!({"memory": m, "cpu": {"emulatorQuota": 999}}),
            Some("spec.cpu.emulatorQuota"),
        ),
        (
            json!({"memory": m, "cpu": {"limit": "5m"}}),
            Some("below 10m"),
        ),
        (
            json!({"memory": m, "cpu": {"limit": "0"}}),
            Some("below 10m"),
        ),
        (
            json!({"memory": m, "cpu": {"limit": "lots"}}),
            Some("not a CPU limit"),
        ),
        (
            json!({"memory": m, "hostDevices": [{"name": "gpu", "address": "0000:07:1f.7"}, {"name": "nic", "address": "0001:06:00.0", "managed": false}]}),
            None,
        ),
        (
            json!({"memory": m, "hostDevices": [{"name": "gpu", "address": "07:00.0"}]}),
            Some("spec.hostDevices[name=gpu].address: `07:00.0` is not a PCI address"),
        ),
        (
            json!({"memory": m, "hostDevices": [{"name": "gpu", "address": "0000:0A:00.0"}]}),
            Some("lower-case hex"),
        ),
        (
            json!({"memory": m, "hostDevices": [{"name": "gpu", "address": "0000:07:20.0"}]}),
            Some("is not a PCI address"),
        ),
        (
            json!({"memory": m, "hostDevices": [{"name": "a", "address": "0000:07:00.0"}, {"name": "b", "address": "0000:07:00.0"}]}),
            Some("spec.hostDevices[address=0000:07:00.0]: duplicate address"),
        ),
        (
            json!({"memory": m, "hostDevices": [{"name": "a", "address": "0000:07:00.0"}, {"name": "a", "address": "0000:08:00.0"}]}),
            Some("duplicate name `a`"),
        ),
    ];
    for (spec, expected) in cases {
        assert_one::<DomainSpec>(spec, expected);
    }
}

#[test]
fn volume_rules() {
    assert_one::<VolumeSpec>(json!({"pool": "p", "capacity": "1Gi"}), None);
    assert_one::<VolumeSpec>(
        json!({"pool": "p"}),
        Some("spec.capacity: is required unless the volume is a clone"),
    );
    assert_one::<VolumeSpec>(json!({"pool": "p", "source": {"volume": "b"}}), None);
    assert_one::<VolumeSpec>(
        json!({"pool": "p", "capacity": "0"}),
        Some("must be more than 0"),
    );
    assert_one::<VolumeSpec>(
        json!({"pool": "p", "capacity": "1Gi", "format": "raw", "source": {"backingVolume": "b"}}),
        Some("needs format qcow2"),
    );
    assert_one::<VolumeSpec>(
        json!({"pool": "p", "capacity": "1Gi", "source": {}}),
        Some("set exactly one of volume"),
    );
}

#[test]
fn network_rules() {
    let nat = |ip: Value| json!({"mode": "nat", "ip": ip});
    assert_one::<NetworkSpec>(
        nat(
            json!({"address": "192.168.150.1", "prefix": 24, "dhcp": {"ranges": [{"start": "192.168.150.100", "end": "192.168.150.199"}]}}),
        ),
        None,
    );
    assert_one::<NetworkSpec>(
        json!({"mode": "nat"}),
        Some("modes nat, route and open need ip"),
    );
    assert_one::<NetworkSpec>(json!({"mode": "bridge"}), Some("set bridge"));
    assert_one::<NetworkSpec>(
        nat(json!({"address": "192.168.150.0", "prefix": 24})),
        Some("is the network or broadcast address"),
    );
    assert_one::<NetworkSpec>(
        nat(
            json!({"address": "192.168.150.1", "prefix": 24, "dhcp": {"ranges": [{"start": "192.168.150.200", "end": "192.168.150.100"}]}}),
        ),
        Some("is after end"),
    );
    assert_one::<NetworkSpec>(
        nat(
            json!({"address": "192.168.150.1", "prefix": 24, "dhcp": {"ranges": [{"start": "192.168.151.2", "end": "192.168.151.9"}]}}),
        ),
        Some("is outside 192.168.150.0/24"),
    );
    assert_one::<NetworkSpec>(
        nat(
            json!({"address": "192.168.150.1", "prefix": 24, "dhcp": {"ranges": [{"start": "192.168.150.1", "end": "192.168.150.9"}]}}),
        ),
        Some("includes the host's own address"),
    );
    let lease = |mac: &str, ip: &str| json!({"mac": mac, "ip": ip, "name": "db"});
    let with_hosts = |hosts: Value| {
        nat(json!({"address": "192.168.150.1", "prefix": 24, "dhcp": {"hosts": hosts}}))
    };
    assert_one::<NetworkSpec>(
        with_hosts(json!([lease("52:54:00:00:00:01", "192.168.150.5")])),
        None,
    );
    assert_one::<NetworkSpec>(
        nat(json!({"address": "192.168.150.1", "prefix": 24, "dhcp": {}})),
        Some("dhcp needs ranges or hosts"),
    );
    assert_one::<NetworkSpec>(
        with_hosts(json!([lease("52:54:00:00:00:01", "192.168.151.5")])),
        Some("is outside 192.168.150.0/24"),
    );
    assert_one::<NetworkSpec>(
        with_hosts(json!([lease("52:54:00:00:00:01", "192.168.150.1")])),
        Some("is the host's own address"),
    );
    assert_one::<NetworkSpec>(
        with_hosts(json!([
            lease("52:54:00:00:00:01", "192.168.150.5"),
            lease("52:54:00:00:00:02", "192.168.150.5")
        ])),
        Some("duplicate ip `192.168.150.5`"),
    );
    assert_one::<NetworkSpec>(
        with_hosts(json!([
            lease("52:54:00:00:00:0a", "192.168.150.5"),
            lease("52:54:00:00:00:0A", "192.168.150.6")
        ])),
        Some("duplicate mac `52:54:00:00:00:0a`"),
    );
    let dns = |hosts: Value| json!({"mode": "isolated", "ip": {"address": "10.9.0.1", "prefix": 24}, "dns": {"hosts": hosts}});
    assert_one::<NetworkSpec>(
        dns(json!([{"ip": "10.9.0.7", "hostnames": ["web", "web.lab.example"]}])),
        None,
    );
    assert_one::<NetworkSpec>(
        json!({"mode": "isolated", "dns": {"hosts": [{"ip": "10.9.0.7", "hostnames": ["web"]}]}}),
        Some("dns needs ip"),
    );
    assert_one::<NetworkSpec>(
        dns(json!([{"ip": "10.9.0.7", "hostnames": ["-bad"]}])),
        Some("-bad"),
    );
}

#[test]
fn pool_rules() {
    assert_one::<StoragePoolSpec>(
        json!({"type": "dir", "target": {"path": "/var/lib/x"}}),
        None,
    );
    assert_one::<StoragePoolSpec>(json!({"type": "dir"}), Some("a dir pool needs target.path"));
    assert_one::<StoragePoolSpec>(
        json!({"type": "dir", "target": {"path": "/var/../etc"}}),
        Some("without `.` or `..`"),
    );
    assert_one::<StoragePoolSpec>(
        json!({"type": "netfs", "target": {"path": "/mnt"}}),
        Some("needs source.host and source.dir"),
    );
}

#[test]
fn logical_pool_rules() {
    let vg = |source: Value| json!({"type": "logical", "source": source});
    assert_one::<StoragePoolSpec>(vg(json!({"name": "vg0"})), None);
    assert_one::<StoragePoolSpec>(
        vg(json!({"name": "vg0", "devices": ["/dev/sdb"], "build": true})),
        None,
    );
    assert_one::<StoragePoolSpec>(
        json!({"type": "logical", "source": {"name": "vg0"}, "target": {"path": "/dev/vg0"}}),
        None,
    );
    assert_one::<StoragePoolSpec>(
        json!({"type": "logical", "source": {"name": "vg0"}, "target": {"path": "/srv/vg0"}}),
        Some("a logical pool's target is always /dev/vg0"),
    );
    assert_one::<StoragePoolSpec>(
        json!({"type": "logical", "source": {"devices": ["/dev/sdb"]}}),
        Some("needs source.name (the LVM volume group)"),
    );
    assert_one::<StoragePoolSpec>(
        vg(json!({"name": "-vg"})),
        Some("not an LVM volume group name"),
    );
    assert_one::<StoragePoolSpec>(
        vg(json!({"name": "vg/0"})),
        Some("not an LVM volume group name"),
    );
    assert_one::<StoragePoolSpec>(
        vg(json!({"name": "vg0", "build": true})),
        Some("needs the devices to make physical volumes of"),
    );
    assert_one::<StoragePoolSpec>(
        vg(json!({"name": "vg0", "format": "ext4"})),
        Some("always LVM2"),
    );
    assert_one::<StoragePoolSpec>(
        vg(json!({"name": "vg0", "devices": ["/dev/../etc/passwd"]})),
        Some("spec.source.devices[0]"),
    );
}

#[test]
fn disk_pool_rules() {
    let disk = |source: Value| json!({"type": "disk", "source": source});
    assert_one::<StoragePoolSpec>(disk(json!({"devices": ["/dev/sdb"]})), None);
    assert_one::<StoragePoolSpec>(
        disk(json!({"devices": ["/dev/sdb"], "format": "dos", "build": true})),
        None,
    );
    assert_one::<StoragePoolSpec>(
        json!({"type": "disk", "target": {"path": "/dev/disk/by-id"}, "source": {"devices": ["/dev/sdb"], "format": "gpt"}}),
        None,
    );
    assert_one::<StoragePoolSpec>(disk(json!({})), Some("exactly one device"));
    assert_one::<StoragePoolSpec>(
        disk(json!({"devices": ["/dev/sdb", "/dev/sdc"]})),
        Some("exactly one device"),
    );
    assert_one::<StoragePoolSpec>(
        disk(json!({"devices": ["/dev/sdb"], "format": "ext4"})),
        Some("gpt (the default) or dos, not ext4"),
    );
    assert_one::<StoragePoolSpec>(
        disk(json!({"devices": ["/dev/disk/by-id/wwn-0x5000.c500"]})),
        Some("must not contain `.`"),
    );
    assert_one::<StoragePoolSpec>(
        json!({"type": "fs", "target": {"path": "/srv/fs"}, "source": {"devices": ["/dev/sdb"], "format": "gpt"}}),
        Some("only a disk pool has one"),
    );
    let spec: StoragePoolSpec =
        serde_json::from_value(disk(json!({"devices": ["/dev/sdb"]}))).unwrap();
    assert_eq!(spec.effective_target_path().as_deref(), Some("/dev"));
}

#[test]
fn fs_and_netfs_pool_rules() {
    let fs = |source: Value| json!({"type": "fs", "target": {"path": "/srv/fs"}, "source": source});
    assert_one::<StoragePoolSpec>(fs(json!({"devices": ["/dev/loop3"]})), None);
    assert_one::<StoragePoolSpec>(
        fs(json!({"devices": ["/dev/loop3"], "format": "ext4", "build": true})),
        None,
    );
    assert_one::<StoragePoolSpec>(
        fs(json!({"devices": ["/dev/loop3"], "build": true})),
        Some("needs the filesystem to make"),
    );
    assert_one::<StoragePoolSpec>(
        fs(json!({"devices": ["/dev/loop3"], "format": "auto", "build": true})),
        Some("needs the filesystem to make"),
    );
    assert_one::<StoragePoolSpec>(
        fs(json!({"devices": ["/dev/a", "/dev/b"]})),
        Some("exactly one device"),
    );
    assert_one::<StoragePoolSpec>(fs(json!({})), Some("exactly one device"));
    assert_one::<StoragePoolSpec>(
        fs(json!({"devices": ["/dev/a"], "format": "nfs"})),
        Some("use type netfs"),
    );
    assert_one::<StoragePoolSpec>(
        json!({"type": "fs", "source": {"devices": ["/dev/a"]}}),
        Some("an fs pool needs target.path"),
    );
    let nfs =
        |source: Value| json!({"type": "netfs", "target": {"path": "/mnt/n"}, "source": source});
    assert_one::<StoragePoolSpec>(nfs(json!({"host": "nas", "dir": "/export"})), None);
    assert_one::<StoragePoolSpec>(
        nfs(json!({"host": "nas", "dir": "/export", "format": "nfs"})),
        None,
    );
    assert_one::<StoragePoolSpec>(
        nfs(json!({"host": "nas", "dir": "/export", "format": "ext4"})),
        Some("format is nfs"),
    );
    assert_one::<StoragePoolSpec>(
        nfs(json!({"host": "nas", "dir": "/export", "build": true})),
        Some("logical, fs and disk pools only, not netfs"),
    );
    assert_one::<StoragePoolSpec>(
        json!({"type": "dir", "target": {"path": "/x"}, "source": {"build": true}}),
        Some("logical, fs and disk pools only, not dir"),
    );
}

#[test]
fn cpu_limits_read_as_kubernetes_writes_them() {
    use virtkube_crds::domain::{format_cpu_limit, parse_cpu_limit};
    for (text, millis) in [
        ("1500m", 1500),
        ("2", 2000),
        ("0.5", 500),
        ("0.25", 250),
        ("1.125", 1125),
    ] {
        assert_eq!(parse_cpu_limit(text), Ok(millis), "{text}");
    }
    for bad in ["", "1.", ".5", "1.2345", "2c", "-1"] {
        assert!(parse_cpu_limit(bad).is_err(), "{bad}");
    }
    assert_eq!(format_cpu_limit(1500), "1500m");
    assert_eq!(format_cpu_limit(2000), "2");
}
