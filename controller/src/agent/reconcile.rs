//! What every per-kind reconciler shares: kube-runtime's finalizer helper around the kind's
//! own apply and cleanup, run in the reconcile's span, with a failure counted under the
//! kind's metric label; and the events that report changes and failures. What to do, and
//! what status to write, stays in each kind's module.

use std::fmt::Debug;
use std::future::Future;
use std::sync::Arc;

use kube::Resource;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::{Instrument, Span};

use super::context::Context;
use super::converge::Change;
use super::error::{Error, Result};

/// Counts `result` as a failed reconcile of `kind` when it is an error, and passes it on.
pub fn counted<T>(ctx: &Context, kind: &str, result: Result<T>) -> Result<T> {
    if let Err(e) = &result {
        ctx.metrics.reconcile_failed(kind, &e.metric_label());
    }
    result
}

/// Runs `reconcile` (the kind's apply or cleanup) under the finalizer `finalizer_name`,
/// in `span`, and counts a failure under `kind`.
pub async fn finalized<K, Fut>(
    ctx: &Context,
    kind: &str,
    api: &Api<K>,
    finalizer_name: &str,
    obj: Arc<K>,
    span: Span,
    reconcile: impl FnOnce(Finalizer<K>) -> Fut,
) -> Result<Action>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Serialize + Debug,
    Fut: Future<Output = Result<Action>>,
{
    let result = finalizer(api, finalizer_name, obj, reconcile)
        .instrument(span)
        .await
        .map_err(Error::from);
    counted(ctx, kind, result)
}

/// One event per change made, under the change's own action.
pub async fn report_changes<K>(ctx: &Context, obj: &K, changes: &[Change])
where
    K: Resource<DynamicType = ()>,
{
    for change in changes {
        ctx.event(
            obj,
            false,
            change.reason,
            &change.action,
            change.note.clone(),
        )
        .await;
    }
}

/// The `Failed` warning for a failure whose status was just written.
pub async fn report_failure<K>(ctx: &Context, obj: &K, reason: &str, message: &str)
where
    K: Resource<DynamicType = ()>,
{
    ctx.event(
        obj,
        true,
        "Failed",
        // The failure reason as the action: the recorder folds same-action events
        // into a series that keeps the first note, so each kind of failure keeps its own.
        reason,
        format!("{reason}: {message}"),
    )
    .await;
}
