//! What this node's libvirt has of one Domain, as the placement protocol counts it: absent,
//! stopped, running, or held by a migration job (outbound or inbound). Only a libvirt domain
//! carrying virtkube's mark for this very resource (kind and UID) counts; a libvirt domain
//! of the same name without it is somebody else's and counts as absent here (the planner
//! reports the clash when this node converges the domain).

use virtkube_crds::Domain;
use virtkube_engine::Engine;
use virtkube_engine::migrate::JobProgress;
use virtkube_engine::model::DomainObserved;

use super::converge::{domain_host_name, owner_of};
use super::error::Result;
use crate::placement::Local;

/// One look at a node's copy of a domain.
#[derive(Debug, Clone)]
pub struct Copy {
    /// The copy as the protocol counts it.
    pub local: Local,
    /// What libvirt reported (`None`: no libvirt domain of this resource).
    pub observed: Option<DomainObserved>,
    /// The migration job holding it, if any.
    pub job: Option<JobProgress>,
}

impl Copy {
    /// libvirt's runtime id of a running copy (a new one whenever it starts or arrives).
    pub fn runtime_id(&self) -> Option<u32> {
        self.observed.as_ref().and_then(|o| o.id)
    }
}

/// Looks at `engine`'s copy of `dom`.
pub async fn look(engine: &Engine, dom: &Domain) -> Result<Copy> {
    let me = owner_of(dom)?;
    let observed = engine
        .domain_observe(&domain_host_name(dom))
        .await?
        .filter(|o| o.owner.as_ref().is_some_and(|m| m.same_resource(&me)));
    let Some(o) = observed else {
        return Ok(Copy {
            local: Local::Absent,
            observed: None,
            job: None,
        });
    };
    let job = if o.state.is_active() {
        // The test driver has no jobs; an error here means "no job", never "unknown".
        engine
            .domain_job_progress(&o.name)
            .await
            .ok()
            .flatten()
            .filter(|j| j.is_migration_in() || j.is_migration_out())
    } else {
        None
    };
    Ok(Copy {
        local: classify(&o, job.as_ref()),
        observed: Some(o),
        job,
    })
}

/// The protocol's view of an observed copy.
pub fn classify(o: &DomainObserved, job: Option<&JobProgress>) -> Local {
    match job {
        Some(j) if j.is_migration_out() => return Local::Outgoing,
        Some(j) if j.is_migration_in() => return Local::Incoming,
        _ => {}
    }
    // A guest paused by the user, or one migrated while paused (reason `migration` on the
    // destination once the job is over), holds its memory: it counts as running.
    if o.state.is_active() {
        Local::Running
    } else {
        Local::Stopped
    }
}
