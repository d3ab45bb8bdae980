//! `[metrics]`: how the exported series scale with the route count (SPEC
//! "Metrics at scale").

use serde::Serialize;

/// Where the two histograms (`portgate_upstream_connect_duration_seconds`,
/// `portgate_session_duration_seconds`) are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Histograms {
    /// One pair per route (as in v1).
    #[default]
    Route,
    /// One pair for the node, with `route=""`: at 50,000 routes, 35 series
    /// instead of 1.75 million.
    Node,
}

/// `[metrics]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct MetricsSettings {
    /// Not hashed at its default, so adding the key changed no hash.
    #[serde(skip_serializing_if = "is_route")]
    pub histograms: Histograms,
}

fn is_route(h: &Histograms) -> bool {
    *h == Histograms::Route
}
