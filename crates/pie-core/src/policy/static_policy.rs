//! A pinned plan: the user chose which layers to pool and how deep to prefetch.

use super::cost_model::device_bytes;
use super::{KvShape, Policy, StepSample};
use crate::error::{PieError, Result};
use crate::plan::Plan;

/// Returns its pinned plan once, then never changes it. It checks the plan
/// against the KV's shape and the budget it is told about, and errors (rather
/// than silently exceeding the budget) when the plan no longer fits.
#[derive(Clone, Debug)]
pub struct StaticPolicy {
    plan: Plan,
    issued: bool,
    kv: Option<KvShape>,
    budget_bytes: Option<u64>,
}

impl StaticPolicy {
    /// A policy pinned to `plan`.
    pub fn new(plan: Plan) -> Self {
        StaticPolicy {
            plan,
            issued: false,
            kv: None,
            budget_bytes: None,
        }
    }

    fn check(&self) -> Result<()> {
        let Some(kv) = &self.kv else {
            return Ok(());
        };
        self.plan.validate(kv.num_layers())?;
        if let Some(budget) = self.budget_bytes {
            let need = device_bytes(&kv.layer_bytes, &self.plan);
            if need > budget {
                return Err(PieError::budget(format!(
                    "the pinned plan ({} pooled layers, prefetch depth {}) needs {need} device bytes but the budget is {budget}; pool more layers or raise the budget",
                    self.plan.pooled.len(),
                    self.plan.prefetch_depth
                )));
            }
        }
        Ok(())
    }
}

impl Policy for StaticPolicy {
    fn observe(&mut self, _sample: &StepSample) {}

    fn set_kv(&mut self, kv: &KvShape) {
        self.kv = Some(kv.clone());
    }

    fn set_budget(&mut self, budget_bytes: Option<u64>) {
        self.budget_bytes = budget_bytes;
    }

    fn decide(&mut self) -> Result<Option<Plan>> {
        self.check()?;
        if self.issued {
            return Ok(None);
        }
        self.issued = true;
        Ok(Some(self.plan.clone()))
    }

    fn current(&self) -> &Plan {
        &self.plan
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_plan_once_and_checks_budget() {
        let plan = Plan {
            pooled: vec![1, 3],
            prefetch_depth: 1,
        };
        let mut p = StaticPolicy::new(plan.clone());
        p.set_kv(&KvShape::uniform(4, 1024, 512, 8));
        p.set_budget(Some(3 * 1024));
        assert_eq!(p.decide().unwrap(), Some(plan));
        assert_eq!(p.decide().unwrap(), None);
        p.set_budget(Some(2 * 1024));
        assert!(p.decide().is_err());
    }
}
