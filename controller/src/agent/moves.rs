//! Live migrations this node runs as the source, outside the reconcile slots.
//!
//! A migration takes from seconds to an hour; holding one of the agent's few reconcile slots
//! for that long would stall drift repair and every other domain. So the reconcile that
//! decides to migrate only starts a task here and returns; the task calls libvirt (on the
//! engine's blocking pool, within its migration limit), records the outcome, and asks for a
//! reconcile of the domain when it ends. Reconciles in between watch the job's progress
//! (libvirt's job statistics), publish it at a bounded rate, and abort the job when a time
//! limit passes. An agent restarted mid-migration has no task: libvirt carries on, and the
//! protocol reads the outcome from libvirt itself (the copy here gone, or running without a
//! job).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use virtkube_crds::Domain;
use virtkube_crds::domain::MigrationSpec;
use virtkube_engine::migrate::{MigrateOptions, MigrationOutcome};
use virtkube_engine::{Engine, Owner};

/// How long a migration may take before it is aborted (the guest stays on the source).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// No progress (bytes moved) for this long.
    pub progress_timeout: Duration,
    /// Per GiB of guest memory (at least one GiB counted), from the start.
    pub completion_per_gib: Duration,
}

impl Default for Limits {
    /// KubeVirt's defaults: 150 s without progress, 150 s per GiB.
    fn default() -> Self {
        Self {
            progress_timeout: Duration::from_secs(150),
            completion_per_gib: Duration::from_secs(150),
        }
    }
}

/// Why a running migration must be aborted now, if it must: `elapsed` since it started,
/// `stalled` since the bytes moved last grew, for a guest of `memory_bytes`.
pub fn overdue(
    limits: &Limits,
    elapsed: Duration,
    stalled: Duration,
    memory_bytes: u64,
) -> Option<String> {
    let gib = memory_bytes.div_ceil(1 << 30).max(1);
    let completion = limits
        .completion_per_gib
        .saturating_mul(u32::try_from(gib).unwrap_or(u32::MAX));
    if elapsed > completion {
        return Some(format!(
            "the migration ran {}s, over its completion limit of {}s ({}s per GiB of memory, {gib} GiB): aborted, the guest stays on the source",
            elapsed.as_secs(),
            completion.as_secs(),
            limits.completion_per_gib.as_secs()
        ));
    }
    if stalled > limits.progress_timeout {
        return Some(format!(
            "the migration made no progress for {}s (limit {}s): aborted, the guest stays on the source",
            stalled.as_secs(),
            limits.progress_timeout.as_secs()
        ));
    }
    None
}

/// The libvirt migration options for a domain with `spec`, to a target reached through
/// `peer_uri` (by the source libvirtd), `client_uri` (by this process) and `data_uri`,
/// encrypted when `tls`, copying the guest devices `copy_disks` (the disks of the volumes
/// the controller chose to copy: [`copied_devices`]). Disks are copied only when named: with
/// `allowCopyStorage` alone libvirt would copy every disk it does not know to be shared,
/// including an image on shared storage onto itself.
pub fn options(
    spec: Option<&MigrationSpec>,
    peer_uri: String,
    client_uri: String,
    data_uri: Option<String>,
    tls: bool,
    copy_disks: Vec<String>,
) -> MigrateOptions {
    let mut opts = MigrateOptions::live_to(peer_uri);
    opts.dest_client_uri = Some(client_uri);
    opts.migrate_uri = data_uri;
    opts.tls = tls;
    if let Some(m) = spec {
        opts.live = m.live;
        opts.auto_converge = m.auto_converge;
        opts.copy_storage = m.allow_copy_storage && !copy_disks.is_empty();
        if opts.copy_storage {
            opts.copy_disks = copy_disks;
        }
        opts.max_downtime_ms = m.max_downtime_millis.map(u64::from);
        opts.bandwidth_mib_s = m
            .bandwidth
            .as_ref()
            .and_then(|b| b.bytes().ok())
            .map(|b| b.div_ceil(1024 * 1024));
    }
    opts
}

/// The guest devices of `disks` (the domain as libvirt runs it) whose source is one of the
/// pool volumes `copied` (libvirt names, `<namespace>.<name>`), or the first copied volume no
/// disk reads (a spec changed under the move: the move must not go without it).
pub fn copied_devices(
    disks: &[virtkube_engine::model::DiskObserved],
    copied: &[String],
) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for volume in copied {
        let devs: Vec<String> = disks
            .iter()
            .filter(|d| {
                matches!(&d.source, virtkube_engine::model::DiskSource::Volume { volume: v, .. } if v == volume)
            })
            .map(|d| d.target_dev.clone())
            .collect();
        if devs.is_empty() {
            return Err(volume.clone());
        }
        out.extend(devs);
    }
    Ok(out)
}

/// What a migration task migrates: libvirt domain `name` of `owner`, through `engine`, with
/// `opts`.
#[derive(Debug, Clone)]
pub struct Task {
    /// A connection of its own to this node's libvirt, closed when the task ends: libvirt
    /// answers other calls on the connection that runs a migration only when the migration
    /// ends (measured: a job-statistics call waited 4.3 s of a 6.3 s migration, 0.03-0.17 s on
    /// another connection), and the agent's reconciles must go on meanwhile.
    pub engine: Engine,
    /// The libvirt name.
    pub name: String,
    /// virtkube's mark the domain must carry.
    pub owner: Owner,
    /// How to migrate.
    pub opts: MigrateOptions,
}

/// One migration task.
#[derive(Debug)]
struct Job {
    target: String,
    started: Instant,
    /// The bytes moved when last seen, and when that figure last grew.
    progress: (u64, Instant),
    /// When progress was last written to the status.
    reported: Option<Instant>,
    /// Set when the agent aborted the job, with why.
    aborted: Option<String>,
    /// `None` while libvirt migrates.
    outcome: Option<Result<MigrationOutcome, String>>,
}

/// How a migration task ended, as the next reconcile learns it.
#[derive(Debug, Clone)]
pub enum Ended {
    /// libvirt reported the migration complete.
    Completed(MigrationOutcome),
    /// libvirt failed it (the guest stayed here), with its words.
    Failed(String),
    /// The agent aborted it, with why.
    Aborted(String),
}

/// The migrations this agent runs, by `namespace/name`.
#[derive(Debug, Default)]
pub struct Migrations {
    // Shared with the tasks, which record their outcome here.
    jobs: Arc<Mutex<HashMap<String, Job>>>,
}

/// What a reconcile should know about a domain's task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskState {
    /// No task for this domain in this process.
    None,
    /// libvirt is migrating it.
    Running,
    /// The task ended; [`Migrations::take`] tells how.
    Ended,
}

impl Migrations {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Job>> {
        lock(&self.jobs)
    }

    /// The state of the task for `key`.
    pub fn state(&self, key: &str) -> TaskState {
        match self.lock().get(key) {
            None => TaskState::None,
            Some(j) if j.outcome.is_none() => TaskState::Running,
            Some(_) => TaskState::Ended,
        }
    }

    /// The outcome of an ended task, left in place: the reconcile records it in the status
    /// first and [`Migrations::forget`]s the task only once that write succeeded, so a
    /// refused write (a stale copy: 409) does not lose it. Lost, the next reconcile would
    /// find no task and migrate again at once, with no `Failed` record, no event, and none
    /// of the controller's backoff.
    pub fn outcome(&self, key: &str) -> Option<Ended> {
        let jobs = self.lock();
        let job = jobs.get(key)?;
        Some(match (job.outcome.as_ref()?, &job.aborted) {
            (Ok(o), _) => Ended::Completed(o.clone()),
            (Err(_), Some(why)) => Ended::Aborted(why.clone()),
            (Err(e), None) => Ended::Failed(e.clone()),
        })
    }

    /// Forgets the task for `key` once it has ended and its outcome is recorded (a running
    /// task is kept).
    pub fn forget(&self, key: &str) {
        let mut jobs = self.lock();
        if jobs.get(key).is_some_and(|j| j.outcome.is_some()) {
            jobs.remove(key);
        }
    }

    /// Starts `task` for `key` towards `target`, unless a task for `key` runs (then the
    /// task comes back, unstarted); `done` is called when libvirt returns.
    pub fn start(
        &self,
        key: &str,
        target: &str,
        task: Task,
        done: impl FnOnce() + Send + 'static,
    ) -> Option<Task> {
        {
            let mut jobs = self.lock();
            if jobs.get(key).is_some_and(|j| j.outcome.is_none()) {
                return Some(task);
            }
            let now = Instant::now();
            jobs.insert(
                key.to_string(),
                Job {
                    target: target.to_string(),
                    started: now,
                    progress: (0, now),
                    reported: None,
                    aborted: None,
                    outcome: None,
                },
            );
        }
        let (key, jobs) = (key.to_string(), self.jobs.clone());
        tokio::spawn(async move {
            let result = task
                .engine
                .domain_migrate(&task.name, &task.owner, &task.opts)
                .await
                .map_err(|e| e.to_string());
            // The task's own connection (see `Task::engine`).
            if let Err(e) = task.engine.close().await {
                tracing::debug!(error = %e, "closing the migration's connection failed");
            }
            if let Some(job) = lock(&jobs).get_mut(&key) {
                job.outcome = Some(result);
            }
            done();
        });
        None
    }

    /// Notes the bytes moved so far; returns how long since they last grew and since the
    /// start, and whether progress is due to be written to the status (at most every
    /// `every`).
    pub fn observe(&self, key: &str, processed: u64, every: Duration) -> Option<Observed> {
        let mut jobs = self.lock();
        let job = jobs.get_mut(key)?;
        let now = Instant::now();
        if processed > job.progress.0 {
            job.progress = (processed, now);
        }
        let due = job.reported.is_none_or(|t| now.duration_since(t) >= every);
        if due {
            job.reported = Some(now);
        }
        Some(Observed {
            elapsed: now.duration_since(job.started),
            stalled: now.duration_since(job.progress.1),
            report: due,
            target: job.target.clone(),
        })
    }

    /// Records that the agent aborts the task for `key`, and why.
    pub fn aborting(&self, key: &str, why: String) {
        if let Some(job) = self.lock().get_mut(key) {
            job.aborted.get_or_insert(why);
        }
    }
}

/// What [`Migrations::observe`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    /// Since the task started.
    pub elapsed: Duration,
    /// Since the bytes moved last grew.
    pub stalled: Duration,
    /// Whether to write the progress to the status now.
    pub report: bool,
    /// The target node.
    pub target: String,
}

/// Locks the job table. A panic while holding the lock cannot leave it inconsistent (every
/// update is one insert, removal or field write), so a poisoned lock is still usable.
fn lock(jobs: &Mutex<HashMap<String, Job>>) -> std::sync::MutexGuard<'_, HashMap<String, Job>> {
    jobs.lock().unwrap_or_else(|p| p.into_inner())
}

/// The key of a domain in the registry.
pub fn key(dom: &Domain) -> String {
    super::key_of(dom)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(outcome: Option<Result<MigrationOutcome, String>>) -> Job {
        let now = Instant::now();
        Job {
            target: "node-b".into(),
            started: now,
            progress: (0, now),
            reported: None,
            aborted: None,
            outcome,
        }
    }

    #[test]
    fn an_ended_migrations_outcome_stays_until_it_is_recorded_and_forgotten() {
        let m = Migrations::default();
        m.lock()
            .insert("ns/vm".into(), job(Some(Err("libvirtd went away".into()))));
        m.lock().insert("ns/running".into(), job(None));
        // Read twice: a status write refused in between must not lose it.
        for _ in 0..2 {
            assert!(
                matches!(m.outcome("ns/vm"), Some(Ended::Failed(w)) if w == "libvirtd went away")
            );
            assert_eq!(m.state("ns/vm"), TaskState::Ended);
        }
        m.forget("ns/vm");
        assert_eq!(m.state("ns/vm"), TaskState::None);
        assert!(m.outcome("ns/vm").is_none());
        // A running task has no outcome and is not forgotten.
        assert!(m.outcome("ns/running").is_none());
        m.forget("ns/running");
        assert_eq!(m.state("ns/running"), TaskState::Running);
        // An aborted one says why the agent aborted it.
        m.aborting("ns/running", "no longer wanted".into());
        if let Some(j) = m.lock().get_mut("ns/running") {
            j.outcome = Some(Err("operation aborted".into()));
        }
        assert!(
            matches!(m.outcome("ns/running"), Some(Ended::Aborted(w)) if w == "no longer wanted")
        );
    }

    #[test]
    fn time_limits_abort_with_the_reason() {
        let limits = Limits::default();
        let gib = 1 << 30;
        assert_eq!(
            overdue(
                &limits,
                Duration::from_secs(100),
                Duration::from_secs(10),
                gib
            ),
            None
        );
        // 2 GiB of memory: 300 s to complete.
        let late = overdue(
            &limits,
            Duration::from_secs(301),
            Duration::from_secs(1),
            2 * gib,
        );
        assert!(late.is_some_and(|m| m.contains("completion limit of 300s")));
        // A small guest still gets one GiB's worth.
        assert_eq!(
            overdue(&limits, Duration::from_secs(149), Duration::ZERO, 1),
            None
        );
        let stuck = overdue(
            &limits,
            Duration::from_secs(200),
            Duration::from_secs(151),
            4 * gib,
        );
        assert!(stuck.is_some_and(|m| m.contains("no progress for 151s")));
    }

    #[test]
    fn options_follow_the_domain_migration_settings() {
        let spec = MigrationSpec {
            live: false,
            max_downtime_millis: Some(300),
            bandwidth: Some(virtkube_crds::quantity::ByteQuantity::new("100Mi")),
            auto_converge: true,
            allow_copy_storage: false,
        };
        let o = options(
            Some(&spec),
            "qemu+tcp://b/system".into(),
            "qemu+tls://b/system".into(),
            Some("tcp://10.0.0.2".into()),
            true,
            Vec::new(),
        );
        assert!(!o.live && o.auto_converge && !o.copy_storage && o.tls);
        assert_eq!(o.max_downtime_ms, Some(300));
        assert_eq!(o.bandwidth_mib_s, Some(100));
        assert_eq!(o.dest_uri, "qemu+tcp://b/system");
        assert_eq!(o.dest_client_uri.as_deref(), Some("qemu+tls://b/system"));
        assert_eq!(o.migrate_uri.as_deref(), Some("tcp://10.0.0.2"));
        assert!(o.persistent && o.undefine_source);
    }

    #[test]
    fn disks_are_copied_only_when_named_and_allowed() {
        let mut spec = MigrationSpec {
            allow_copy_storage: true,
            ..MigrationSpec::default()
        };
        let opts = |spec: &MigrationSpec, disks: Vec<String>| {
            options(Some(spec), "p".into(), "c".into(), None, false, disks)
        };
        // Allowed, but nothing chosen to copy (shared storage): nothing copied.
        let o = opts(&spec, Vec::new());
        assert!(!o.copy_storage && o.copy_disks.is_empty());
        let o = opts(&spec, vec!["vda".into()]);
        assert!(o.copy_storage);
        assert_eq!(o.copy_disks, vec!["vda".to_string()]);
        spec.allow_copy_storage = false;
        assert!(!opts(&spec, vec!["vda".into()]).copy_storage);
    }

    #[test]
    fn copied_devices_are_the_disks_reading_the_copied_volumes() {
        use virtkube_engine::model::{DiskObserved, DiskSource};
        let disk = |dev: &str, source: DiskSource| DiskObserved {
            alias: None,
            target_dev: dev.into(),
            bus: None,
            device: "disk".into(),
            source,
            read_only: false,
            boot_order: None,
            format: None,
            backing_chain: Vec::new(),
        };
        let disks = vec![
            disk(
                "vda",
                DiskSource::Volume {
                    pool: "local".into(),
                    volume: "ns.root".into(),
                },
            ),
            disk(
                "vdb",
                DiskSource::File {
                    path: "/shared/data.img".into(),
                },
            ),
            disk(
                "vdc",
                DiskSource::Volume {
                    pool: "nfs".into(),
                    volume: "ns.shared".into(),
                },
            ),
        ];
        assert_eq!(
            copied_devices(&disks, &["ns.root".into()]),
            Ok(vec!["vda".to_string()])
        );
        assert_eq!(
            copied_devices(&disks, &["ns.gone".into()]),
            Err("ns.gone".to_string())
        );
    }
}
