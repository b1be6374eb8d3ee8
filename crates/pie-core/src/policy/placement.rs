//! Where a pooled layer's decode attention runs: [`HostAttention`], the user's
//! choice, and [`Placed`], which holds any [`Policy`] to it.
//!
//! A pooled layer is either *copied* (its KV prefetched into a device staging
//! slot before it runs) or *host-attended* (its attention computed on the CPU
//! where its KV lives; only the query and a partial result cross the link).
//! `Never` and `Always` are enforced here, over whatever the inner policy
//! chooses; under `Auto` the inner policy's own placement stands.

use std::str::FromStr;

use super::{Policy, PolicyContext};
use crate::error::{PieError, Result};
use crate::plan::Plan;
use crate::telemetry::StepSample;

/// The user's choice of placement for pooled layers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum HostAttention {
    /// Every pooled layer is copied to the device before it runs.
    #[default]
    Never,
    /// Every pooled layer is attended on the host.
    Always,
    /// The policy chooses per pooled layer from the cost model.
    Auto,
}

impl HostAttention {
    /// The choice's name, as [`FromStr`] accepts it.
    pub fn name(self) -> &'static str {
        match self {
            HostAttention::Never => "never",
            HostAttention::Always => "always",
            HostAttention::Auto => "auto",
        }
    }

    /// `plan` with its placement forced where the choice forces one: no layer
    /// host-attended (`Never`) or every pooled one (`Always`); `Auto` keeps it.
    pub fn apply(self, mut plan: Plan) -> Plan {
        match self {
            HostAttention::Never => plan.host_attended.clear(),
            HostAttention::Always => plan.host_attended = plan.pooled.clone(),
            HostAttention::Auto => {}
        }
        plan
    }
}

impl FromStr for HostAttention {
    type Err = PieError;

    /// Accepts exactly the names [`HostAttention::name`] gives.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "never" => Ok(HostAttention::Never),
            "always" => Ok(HostAttention::Always),
            "auto" => Ok(HostAttention::Auto),
            other => Err(PieError::config(format!(
                "unknown host_attention {other:?}; use \"auto\", \"never\" or \"always\""
            ))),
        }
    }
}

/// A policy whose plans are held to a [`HostAttention`] choice.
pub struct Placed {
    inner: Box<dyn Policy>,
    choice: HostAttention,
}

impl Placed {
    /// `inner`, its plans placed by `choice`.
    pub fn new(inner: Box<dyn Policy>, choice: HostAttention) -> Self {
        Placed { inner, choice }
    }
}

impl Policy for Placed {
    fn initial_plan(&mut self, ctx: &PolicyContext<'_>) -> Result<Plan> {
        Ok(self.choice.apply(self.inner.initial_plan(ctx)?))
    }

    fn observe(&mut self, sample: &StepSample, ctx: &PolicyContext<'_>) -> Result<Option<Plan>> {
        Ok(self
            .inner
            .observe(sample, ctx)?
            .map(|plan| self.choice.apply(plan)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_bad_names_say_what_to_use() {
        for c in [
            HostAttention::Never,
            HostAttention::Always,
            HostAttention::Auto,
        ] {
            assert_eq!(c.name().parse::<HostAttention>().unwrap(), c);
        }
        let e = "sometimes"
            .parse::<HostAttention>()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("\"sometimes\"") && e.contains("\"always\""),
            "{e}"
        );
    }

    #[test]
    fn apply_forces_never_and_always_and_keeps_auto() {
        let mut plan = Plan::copying(vec![1, 3, 4], 2);
        plan.host_attended = vec![3];
        assert!(HostAttention::Never
            .apply(plan.clone())
            .host_attended
            .is_empty());
        assert_eq!(
            HostAttention::Always.apply(plan.clone()).host_attended,
            vec![1, 3, 4]
        );
        assert_eq!(HostAttention::Auto.apply(plan.clone()), plan);
        for c in [
            HostAttention::Never,
            HostAttention::Always,
            HostAttention::Auto,
        ] {
            c.apply(plan.clone()).validate(8).unwrap();
        }
    }
}
