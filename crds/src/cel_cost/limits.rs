//! The Kubernetes API server's CEL cost limits and its refusal message, as its sources define
//! them (checked against kubernetes/kubernetes, 2026-11):
//!
//! - `staging/src/k8s.io/apiserver/pkg/apis/cel/config.go`: `PerCallLimit`,
//!   `RuntimeCELCostBudget`, `MaxRequestSizeBytes`;
//! - `staging/src/k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/validation/validation.go`:
//!   `StaticEstimatedCostLimit`, `StaticEstimatedCRDCostLimit`, `getCostErrorMessage`.

/// The most one evaluation of one rule may cost at run time before the API server stops it
/// (`PerCallLimit`, "roughly 0.1 second").
pub const PER_CALL_LIMIT: u64 = 1_000_000;

/// The most all rules together may cost at run time for one object (`RuntimeCELCostBudget`,
/// "roughly 1 second").
pub const RUNTIME_CEL_COST_BUDGET: u64 = 10_000_000;

/// The most a rule's estimated cost times the number of times it can run in one object may
/// be when the CRD is created or updated (`StaticEstimatedCostLimit`); above it the CRD is
/// refused.
pub const STATIC_ESTIMATED_COST_LIMIT: u64 = 10_000_000;

/// The most the estimated costs of all rules of one schema may add up to
/// (`StaticEstimatedCRDCostLimit`); above it the CRD is refused.
pub const STATIC_ESTIMATED_CRD_COST_LIMIT: u64 = 100_000_000;

/// The largest request the API server accepts (`MaxRequestSizeBytes`): the size the
/// estimator assumes for a string, list or map that declares no maximum.
pub const MAX_REQUEST_SIZE_BYTES: u64 = 3 * 1024 * 1024;

/// The API server's own words when a cost is over its limit (`getCostErrorMessage`), e.g.
/// "estimated rule cost exceeds budget by factor of more than 100x (try simplifying the rule,
/// or adding maxItems, maxProperties, and maxLength where arrays, maps, and strings are
/// declared)".
pub fn cost_error_message(cost_name: &str, cost: u64, limit: u64) -> String {
    let factor = cost as f64 / limit as f64;
    let factor = if factor > 100.0 {
        "more than 100x".to_string()
    } else if factor < 1.5 {
        // Go's `%f`: six decimals.
        format!("{factor:.6}x")
    } else {
        format!("{factor:.1}x")
    };
    format!(
        "{cost_name} exceeds budget by factor of {factor} (try simplifying the rule, or adding maxItems, maxProperties, and maxLength where arrays, maps, and strings are declared)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_reads_like_the_api_server() {
        assert!(
            cost_error_message("estimated rule cost", u64::MAX, STATIC_ESTIMATED_COST_LIMIT)
                .starts_with("estimated rule cost exceeds budget by factor of more than 100x (try simplifying the rule")
        );
        assert!(
            cost_error_message(
                "estimated rule cost",
                25_000_000,
                STATIC_ESTIMATED_COST_LIMIT
            )
            .contains("by factor of 2.5x")
        );
        assert!(
            cost_error_message(
                "estimated rule cost",
                12_000_000,
                STATIC_ESTIMATED_COST_LIMIT
            )
            .contains("by factor of 1.200000x")
        );
    }
}
