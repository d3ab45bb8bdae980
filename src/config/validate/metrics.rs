//! `[metrics]`: the histograms' granularity. It must not touch the
//! exporter; the node applies what this returns.

use super::Ctx;
use crate::config::raw::RawMetrics;
use crate::config::{Histograms, MetricsSettings};

/// The validated `[metrics]` section; a bad value falls back to the default.
pub(super) fn check(cx: &mut Ctx, raw: &RawMetrics) -> MetricsSettings {
    let histograms = match &raw.histograms {
        None => Histograms::Route,
        Some(s) => {
            match s.get_ref().as_str() {
                "route" => Histograms::Route,
                "node" => Histograms::Node,
                other => {
                    cx.err(
                    0,
                    s.span(),
                    format!("metrics.histograms {other:?}: expected \"route\" (one pair per route) or \"node\""),
                );
                    Histograms::Route
                }
            }
        }
    };
    MetricsSettings { histograms }
}
