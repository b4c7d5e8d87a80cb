//! Who uses what: the one dependency view every removal is decided against.
//!
//! **On a node** ([`NodeView`], over everything observed there, whoever made it): an image
//! is used by every domain whose disk is that image or an image built on it — a qcow2
//! overlay, an overlay of an overlay, however deep — and by every other volume whose backing
//! chain includes it. Domains count running or only defined (a stopped guest starts again on
//! the same chain), virtkube's or not. Chains are read the two ways libvirt reports them:
//! each volume's `<backingStore>` (one level, followed from volume to volume by path), and
//! each running domain's nested disk `<backingStore>` (the whole chain QEMU opened, images
//! outside any pool included). A network is used by every domain with an interface on it.
//!
//! **In the cluster** ([`volume_resource_users`], over the Domain and Volume resources of a
//! namespace): a Volume is used by every Volume built on it (copy-on-write, transitively; a
//! clone only until it has been made) and by every Domain whose disks name it or one of
//! those.
//!
//! Paths are compared after lexical normalization (`.`, `..`, repeated `/`; a relative
//! backing file taken from the directory of the image that names it): libvirt reports the
//! path each image was opened with, and a symlinked or bind-mounted second name for the same
//! file is not recognised — a limit stated in the README.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use virtkube_crds::names::split_host_name;
use virtkube_crds::{Domain, Volume};

use super::observed::{DiskRef, ObservedDisk, ObservedHost, OwnerMark};

/// The longest chain followed from volume to volume (a cycle, which a corrupt image header
/// could describe, stops earlier).
const MAX_CHAIN: usize = 64;

/// Something on a node that uses an object a removal would take away.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum User {
    /// A libvirt domain (running or only defined).
    Domain {
        /// Its libvirt name.
        name: String,
        /// virtkube's mark on it, if any.
        owner: Option<OwnerMark>,
    },
    /// A libvirt volume built on the image.
    Volume {
        /// Its pool.
        pool: String,
        /// Its name in the pool.
        name: String,
        /// Whether virtkube made it.
        owned: bool,
    },
}

impl fmt::Display for User {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            User::Domain {
                owner: Some(owner), ..
            } => f.write_str(&owner.label()),
            User::Domain { name, owner: None } => {
                write!(f, "libvirt domain {name} (not virtkube's)")
            }
            User::Volume {
                name, owned: true, ..
            } if split_host_name(name).is_some() => match split_host_name(name) {
                Some((ns, short)) => write!(f, "Volume {ns}/{short}"),
                None => write!(f, "Volume {name}"),
            },
            User::Volume { pool, name, .. } => {
                write!(f, "libvirt volume {pool}/{name} (not virtkube's)")
            }
        }
    }
}

/// The users as one comma-separated phrase.
pub fn describe(users: &[&User]) -> String {
    users
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// `path` without `.`, `..` and repeated `/`; a relative path is taken from `dir` first
/// (the directory of the image that names it) when one is known.
pub fn normalize(path: &str, dir: Option<&str>) -> String {
    let joined = match dir {
        Some(dir) if !path.starts_with('/') => format!("{dir}/{path}"),
        _ => path.to_string(),
    };
    let absolute = joined.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for part in joined.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if parts.last().is_some_and(|p| *p != "..") {
                    parts.pop();
                } else if !absolute {
                    parts.push("..");
                }
            }
            other => parts.push(other),
        }
    }
    let body = parts.join("/");
    if absolute { format!("/{body}") } else { body }
}

/// The directory part of a normalized path.
fn dir_of(path: &str) -> Option<&str> {
    path.rsplit_once('/')
        .map(|(d, _)| if d.is_empty() { "/" } else { d })
}

/// One node's dependency view: every volume and domain observed there.
pub struct NodeView<'a> {
    host: &'a ObservedHost,
    /// Volumes by their normalized path.
    by_path: BTreeMap<String, (&'a str, &'a str)>,
}

impl<'a> NodeView<'a> {
    /// The view of `host`.
    pub fn new(host: &'a ObservedHost) -> Self {
        let by_path = host
            .volumes
            .iter()
            .map(|((pool, name), v)| (normalize(&v.path, None), (pool.as_str(), name.as_str())))
            .collect();
        Self { host, by_path }
    }

    /// The normalized path of a volume, when observed.
    fn path_of(&self, pool: &str, name: &str) -> Option<String> {
        self.host
            .volumes
            .get(&(pool.to_string(), name.to_string()))
            .map(|v| normalize(&v.path, None))
    }

    /// Adds to `out` every image under the image at `path` that pool volumes describe
    /// (its backing file, that one's backing file, …), nearest first.
    fn follow(&self, path: &str, out: &mut Vec<String>) {
        let mut current = path.to_string();
        for _ in 0..MAX_CHAIN {
            let Some(&(pool, name)) = self.by_path.get(&current) else {
                return;
            };
            let volume = &self.host.volumes[&(pool.to_string(), name.to_string())];
            let Some(backing) = &volume.backing_path else {
                return;
            };
            let next = normalize(backing, dir_of(&current));
            if next == path || out.contains(&next) {
                return;
            }
            out.push(next.clone());
            current = next;
        }
    }

    /// The images the volume `pool/name` is built on, nearest first (empty for a volume
    /// without a backing store).
    pub fn volume_chain(&self, pool: &str, name: &str) -> Vec<String> {
        let mut chain = Vec::new();
        if let Some(path) = self.path_of(pool, name) {
            self.follow(&path, &mut chain);
        }
        chain
    }

    /// Every image a disk reads: its own and every one under it, from the domain's chain and
    /// from the pool volumes' chains.
    pub fn disk_images(&self, disk: &ObservedDisk) -> BTreeSet<String> {
        let top = match &disk.source {
            DiskRef::Volume { pool, volume } => self.path_of(pool, volume),
            DiskRef::Path(p) => Some(normalize(p, None)),
            DiskRef::Other => None,
        };
        let mut images: Vec<String> = top.iter().cloned().collect();
        let mut previous = top;
        for entry in &disk.chain {
            let path = normalize(entry, previous.as_deref().and_then(dir_of));
            images.push(path.clone());
            previous = Some(path);
        }
        let mut all: Vec<String> = Vec::new();
        for image in images {
            all.push(image.clone());
            self.follow(&image, &mut all);
        }
        all.into_iter().collect()
    }

    /// Everything on the node that uses the volume `pool/name`: domains whose disks read it
    /// (directly or through images built on it) and volumes built on it, in name order.
    pub fn volume_users(&self, pool: &str, name: &str) -> Vec<User> {
        let path = self.path_of(pool, name);
        let mut users = Vec::new();
        for (domain, d) in &self.host.domains {
            let uses = d.disks.iter().any(|disk| {
                let direct = matches!(&disk.source, DiskRef::Volume { pool: p, volume: v } if p == pool && v == name);
                direct
                    || path
                        .as_ref()
                        .is_some_and(|path| self.disk_images(disk).contains(path))
            });
            if uses {
                users.push(User::Domain {
                    name: domain.clone(),
                    owner: d.owner.clone(),
                });
            }
        }
        if let Some(path) = &path {
            for ((p, n), v) in &self.host.volumes {
                if (p.as_str(), n.as_str()) != (pool, name)
                    && self.volume_chain(p, n).contains(path)
                {
                    users.push(User::Volume {
                        pool: p.clone(),
                        name: n.clone(),
                        owned: v.owned,
                    });
                }
            }
        }
        users
    }

    /// The domains on the node with an interface on `network`, running or only defined.
    pub fn network_users(&self, network: &str) -> Vec<User> {
        self.host
            .domains
            .iter()
            .filter(|(_, d)| {
                d.interfaces
                    .iter()
                    .any(|i| i.network.as_deref() == Some(network))
            })
            .map(|(name, d)| User::Domain {
                name: name.clone(),
                owner: d.owner.clone(),
            })
            .collect()
    }

    /// The domains on the node whose disks are volumes of `pool` (libvirt needs the pool to
    /// start them).
    pub fn pool_users(&self, pool: &str) -> Vec<User> {
        self.host
            .domains
            .iter()
            .filter(|(_, d)| {
                d.disks.iter().any(
                    |disk| matches!(&disk.source, DiskRef::Volume { pool: p, .. } if p == pool),
                )
            })
            .map(|(name, d)| User::Domain {
                name: name.clone(),
                owner: d.owner.clone(),
            })
            .collect()
    }
}

/// What the cluster view needs of a Volume resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeRefs {
    /// Its name.
    pub name: String,
    /// `spec.source.backingVolume`.
    pub backing: Option<String>,
    /// `spec.source.volume` (a full copy).
    pub clone_of: Option<String>,
    /// Whether its image has been made (a clone no longer needs its source then).
    pub created: bool,
}

impl VolumeRefs {
    /// The references of `vol`.
    pub fn of(vol: &Volume) -> Self {
        let source = vol.spec.source.as_ref();
        Self {
            name: vol.metadata.name.clone().unwrap_or_default(),
            backing: source.and_then(|s| s.backing_volume.clone()),
            clone_of: source.and_then(|s| s.volume.clone()),
            created: vol.status.as_ref().is_some_and(|s| s.key.is_some()),
        }
    }
}

/// What the cluster view needs of a Domain resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainRefs {
    /// Its name.
    pub name: String,
    /// The Volumes its disks name.
    pub volumes: Vec<String>,
}

impl DomainRefs {
    /// The references of `dom`.
    pub fn of(dom: &Domain) -> Self {
        Self {
            name: dom.metadata.name.clone().unwrap_or_default(),
            volumes: dom
                .spec
                .disks
                .iter()
                .filter_map(|d| d.volume.clone())
                .collect(),
        }
    }
}

/// A resource that uses a Volume.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum ResourceUser {
    /// A Domain of the namespace (by name).
    Domain(String),
    /// A Volume of the namespace (by name).
    Volume(String),
}

/// The resources of one namespace that use the Volume `name`: Volumes built on it (through
/// any chain of copy-on-write overlays, and clones not yet made) and Domains whose disks name
/// it or one of those. Domains come first, each group in name order.
pub fn volume_resource_users(
    domains: &[DomainRefs],
    volumes: &[VolumeRefs],
    name: &str,
) -> Vec<ResourceUser> {
    let mut needed: BTreeSet<&str> = BTreeSet::from([name]);
    loop {
        let more: Vec<&str> = volumes
            .iter()
            .filter(|v| !needed.contains(v.name.as_str()))
            .filter(|v| {
                v.backing.as_deref().is_some_and(|b| needed.contains(b))
                    || (!v.created && v.clone_of.as_deref().is_some_and(|c| needed.contains(c)))
            })
            .map(|v| v.name.as_str())
            .collect();
        if more.is_empty() {
            break;
        }
        needed.extend(more);
    }
    let mut users: Vec<ResourceUser> = domains
        .iter()
        .filter(|d| d.volumes.iter().any(|v| needed.contains(v.as_str())))
        .map(|d| ResourceUser::Domain(d.name.clone()))
        .collect();
    users.sort();
    users.extend(
        needed
            .into_iter()
            .filter(|v| *v != name)
            .map(|v| ResourceUser::Volume(v.to_string())),
    );
    users
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_normalize_lexically() {
        assert_eq!(normalize("/a//b/./c", None), "/a/b/c");
        assert_eq!(normalize("../base", Some("/p/sub")), "/p/base");
        assert_eq!(normalize("base", Some("/p")), "/p/base");
        assert_eq!(normalize("/../x", None), "/x");
        assert_eq!(normalize("a/../../b", None), "../b");
        assert_eq!(dir_of("/base"), Some("/"));
    }

    fn vol(name: &str, backing: Option<&str>, clone_of: Option<&str>, created: bool) -> VolumeRefs {
        VolumeRefs {
            name: name.into(),
            backing: backing.map(Into::into),
            clone_of: clone_of.map(Into::into),
            created,
        }
    }

    #[test]
    fn cluster_users_follow_overlays_and_pending_clones() {
        let volumes = [
            vol("base", None, None, true),
            vol("mid", Some("base"), None, false),
            vol("top", Some("mid"), None, true),
            vol("copy", None, Some("base"), true),
            vol("copying", None, Some("top"), false),
            vol("other", None, None, true),
        ];
        let domains = [
            DomainRefs {
                name: "web".into(),
                volumes: vec!["copying".into()],
            },
            DomainRefs {
                name: "db".into(),
                volumes: vec!["copy".into(), "other".into()],
            },
        ];
        assert_eq!(
            volume_resource_users(&domains, &volumes, "base"),
            [
                ResourceUser::Domain("web".into()),
                ResourceUser::Volume("copying".into()),
                ResourceUser::Volume("mid".into()),
                ResourceUser::Volume("top".into()),
            ]
        );
        assert_eq!(
            volume_resource_users(&domains, &volumes, "other"),
            [ResourceUser::Domain("db".into())]
        );
        // A cycle (impossible through the API, harmless here) ends.
        let cycle = [
            vol("x", Some("y"), None, true),
            vol("y", Some("x"), None, true),
        ];
        assert_eq!(
            volume_resource_users(&[], &cycle, "x"),
            [ResourceUser::Volume("y".into())]
        );
    }
}
