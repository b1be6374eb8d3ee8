//! The user's choice of policy, parsed and validated once: [`PolicyConfig`]
//! (with [`PolicyKind`] and [`Objective`]), and [`PolicyConfig::build`], which
//! makes the [`Policy`] the engine consults. Bindings pass the user's strings
//! and numbers through [`PolicyConfig::parse`] untouched.

use std::str::FromStr;

use super::{
    AdaptiveConfig, AdaptivePolicy, HostAttention, HostModel, Placed, Policy, StaticPolicy,
};
use crate::error::{PieError, Result};
use crate::plan::Plan;

/// Staging slots pooled layers share when the user pins layers or picks the
/// static policy without saying how many.
pub const DEFAULT_PREFETCH_DEPTH: usize = 2;

/// The slowdown the memory objective allows by default: its plan's step may
/// take up to this multiple of the all-resident step (1.02: 2% slower).
pub const DEFAULT_MEMORY_SLOWDOWN: f64 = 1.02;

/// How much slower than all-resident the memory objective's step may be
/// ([`Objective::Memory`] pools the most layers whose predicted step stays
/// within this multiple of the all-resident step). At least 1; the default is
/// [`DEFAULT_MEMORY_SLOWDOWN`]. Compared by value (bit for bit).
#[derive(Clone, Copy, Debug)]
pub struct MemorySlowdown(f64);

impl MemorySlowdown {
    /// A slowdown of `factor` x the all-resident step; errors with a
    /// [`PieError::Config`] unless it is finite and at least 1.
    pub fn new(factor: f64) -> Result<Self> {
        if factor.is_finite() && factor >= 1.0 {
            Ok(MemorySlowdown(factor))
        } else {
            Err(PieError::config(format!(
                "the memory objective's slowdown must be a finite factor of at least 1 (1.02: 2% slower than all-resident), not {factor}"
            )))
        }
    }

    /// The factor.
    pub fn get(self) -> f64 {
        self.0
    }
}

impl Default for MemorySlowdown {
    fn default() -> Self {
        MemorySlowdown(DEFAULT_MEMORY_SLOWDOWN)
    }
}

impl PartialEq for MemorySlowdown {
    fn eq(&self, other: &Self) -> bool {
        self.0.to_bits() == other.0.to_bits()
    }
}

impl Eq for MemorySlowdown {}

impl std::hash::Hash for MemorySlowdown {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.to_bits().hash(state);
    }
}

/// What a policy optimises.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Objective {
    /// Fastest step within the budget: keep as much KV resident as the budget
    /// allows, pool only what it forces, and hide those copies as well as possible.
    #[default]
    Speed,
    /// Least device memory within a small slowdown: pool as many layers as the
    /// link can hide under compute, the step staying within
    /// [`PolicyConfig::memory_slowdown`] (default [`DEFAULT_MEMORY_SLOWDOWN`])
    /// x all-resident (falls back to the fastest plan when the budget forces more).
    Memory,
}

impl Objective {
    /// The objective's name, as [`FromStr`] accepts it ("speed" or "memory").
    pub fn name(self) -> &'static str {
        match self {
            Objective::Speed => "speed",
            Objective::Memory => "memory",
        }
    }
}

impl FromStr for Objective {
    type Err = PieError;

    /// Accepts exactly the names [`Objective::name`] gives.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "speed" => Ok(Objective::Speed),
            "memory" => Ok(Objective::Memory),
            other => Err(PieError::config(format!(
                "unknown objective {other:?}; use \"speed\" or \"memory\""
            ))),
        }
    }
}

/// Which policy chooses the plan.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum PolicyKind {
    /// Pie's adaptive expansion ([`AdaptivePolicy`]): re-plans from measurements.
    #[default]
    Adaptive,
    /// A plan that never changes ([`StaticPolicy`]): the pinned one, or the
    /// fewest pooled layers that fit the budget.
    Static,
}

impl PolicyKind {
    /// The kind's name, as [`FromStr`] accepts it ("adaptive" or "static").
    pub fn name(self) -> &'static str {
        match self {
            PolicyKind::Adaptive => "adaptive",
            PolicyKind::Static => "static",
        }
    }
}

impl FromStr for PolicyKind {
    type Err = PieError;

    /// Accepts exactly the names [`PolicyKind::name`] gives.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "adaptive" => Ok(PolicyKind::Adaptive),
            "static" => Ok(PolicyKind::Static),
            other => Err(PieError::config(format!(
                "unknown policy {other:?}; use \"adaptive\" or \"static\""
            ))),
        }
    }
}

/// Which policy the engine consults, and how it starts.
///
/// [`PolicyConfig::parse`] makes one from the user's raw choices; the default
/// is the adaptive policy optimising for speed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyConfig {
    /// The policy. [`PolicyConfig::parse`] sets [`PolicyKind::Static`] when
    /// a plan is pinned.
    pub kind: PolicyKind,
    /// What the adaptive policy optimises (the static policy ignores it).
    pub objective: Objective,
    /// Staging slots: where the adaptive policy starts (it may change them),
    /// what the static policy keeps. `None`: the adaptive policy picks its own,
    /// the static one uses [`DEFAULT_PREFETCH_DEPTH`].
    pub prefetch_depth: Option<usize>,
    /// A plan the user pinned; when set, [`PolicyConfig::build`] gives a static
    /// policy holding it, whatever `kind` says.
    pub pinned: Option<Plan>,
    /// Where pooled layers' attention runs; [`PolicyConfig::build`] holds the
    /// policy to it (see [`Placed`]).
    pub host_attention: HostAttention,
    /// How much slower than all-resident the memory objective's step may be
    /// (the adaptive policy's [`AdaptiveConfig::memory_slowdown`]).
    pub memory_slowdown: MemorySlowdown,
}

impl PolicyConfig {
    /// Parses the user's choices for a model with `num_layers` engine-managed
    /// layers: `policy` ("adaptive" or "static"), `objective` ("speed" or
    /// "memory"), the layers to pin in host memory (any order; each once, each
    /// below `num_layers`; pinning makes the policy static) and the prefetch
    /// depth (at least 1). Errors with a [`PieError::Config`] that says what to change.
    pub fn parse(
        policy: &str,
        objective: &str,
        pooled_layers: Option<Vec<usize>>,
        prefetch_depth: Option<usize>,
        num_layers: usize,
    ) -> Result<Self> {
        let mut kind: PolicyKind = policy.parse()?;
        let objective: Objective = objective.parse()?;
        if prefetch_depth == Some(0) {
            return Err(PieError::config(
                "prefetch_depth must be at least 1 (the device staging slots pooled layers share), not 0",
            ));
        }
        let pinned = match pooled_layers {
            Some(layers) => {
                kind = PolicyKind::Static;
                let depth = prefetch_depth.unwrap_or(DEFAULT_PREFETCH_DEPTH);
                Some(Plan::from_layers(layers, depth, num_layers)?)
            }
            None => None,
        };
        Ok(PolicyConfig {
            kind,
            objective,
            prefetch_depth,
            pinned,
            host_attention: HostAttention::Never,
            memory_slowdown: MemorySlowdown::default(),
        })
    }

    /// A config holding `plan` (static).
    pub fn pinned(plan: Plan) -> Self {
        PolicyConfig {
            kind: PolicyKind::Static,
            prefetch_depth: Some(plan.prefetch_depth),
            pinned: Some(plan),
            ..PolicyConfig::default()
        }
    }

    /// This config with pooled layers placed by `choice` ("auto", "never" or
    /// "always"); errors with a [`PieError::Config`] naming the three.
    pub fn with_host_attention(mut self, choice: &str) -> Result<Self> {
        self.host_attention = choice.parse()?;
        Ok(self)
    }

    /// This config with the memory objective's slowdown set to `factor` (see
    /// [`MemorySlowdown::new`] for what it accepts).
    pub fn with_memory_slowdown(mut self, factor: f64) -> Result<Self> {
        self.memory_slowdown = MemorySlowdown::new(factor)?;
        Ok(self)
    }

    /// The policy this config describes, for [`crate::Engine::new`], its plans
    /// held to [`PolicyConfig::host_attention`]. Without the host's figures
    /// (see [`PolicyConfig::build_with_host`]) `Auto` keeps pooled layers copied.
    pub fn build(&self) -> Box<dyn Policy> {
        self.build_with_host(None)
    }

    /// [`PolicyConfig::build`] with the host attention path's figures (the
    /// CPU's measured memory bandwidth and cores, the model's query and result
    /// sizes): under `Auto` the adaptive policy then chooses per pooled layer
    /// between copying it and attending it on the host. `host.choice` is
    /// replaced by [`PolicyConfig::host_attention`].
    pub fn build_with_host(&self, host: Option<HostModel>) -> Box<dyn Policy> {
        let host = host.map(|h| HostModel {
            choice: self.host_attention,
            ..h
        });
        Box::new(Placed::new(self.build_inner(host), self.host_attention))
    }

    fn build_inner(&self, host: Option<HostModel>) -> Box<dyn Policy> {
        if let Some(plan) = &self.pinned {
            return Box::new(StaticPolicy::pinned(plan.clone()));
        }
        match self.kind {
            PolicyKind::Static => Box::new(StaticPolicy::budget_fit_placed(
                self.prefetch_depth.unwrap_or(DEFAULT_PREFETCH_DEPTH),
                self.host_attention,
            )),
            PolicyKind::Adaptive => Box::new(AdaptivePolicy::new(AdaptiveConfig {
                objective: self.objective,
                initial_prefetch_depth: self.prefetch_depth,
                memory_slowdown: self.memory_slowdown.get(),
                host: host.filter(|h| h.choice != HostAttention::Never),
                ..AdaptiveConfig::default()
            })),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    fn parse(
        policy: &str,
        objective: &str,
        layers: Option<Vec<usize>>,
        depth: Option<usize>,
    ) -> Result<PolicyConfig> {
        PolicyConfig::parse(policy, objective, layers, depth, 4)
    }

    fn config_error(r: Result<PolicyConfig>) -> String {
        let e = r.expect_err("a config error");
        assert_eq!(e.kind(), ErrorKind::Config, "{e}");
        e.to_string()
    }

    #[test]
    fn names_round_trip() {
        for o in [Objective::Speed, Objective::Memory] {
            assert_eq!(o.name().parse::<Objective>().unwrap(), o);
        }
        for k in [PolicyKind::Adaptive, PolicyKind::Static] {
            assert_eq!(k.name().parse::<PolicyKind>().unwrap(), k);
        }
    }

    #[test]
    fn parses_the_defaults_and_each_choice() {
        assert_eq!(
            parse("adaptive", "speed", None, None).unwrap(),
            PolicyConfig::default()
        );
        let c = parse("adaptive", "memory", None, Some(3)).unwrap();
        assert_eq!(
            (c.kind, c.objective, c.prefetch_depth, c.pinned),
            (PolicyKind::Adaptive, Objective::Memory, Some(3), None)
        );
        let c = parse("static", "speed", None, None).unwrap();
        assert_eq!((c.kind, c.prefetch_depth), (PolicyKind::Static, None));
    }

    #[test]
    fn pinned_layers_are_sorted_get_the_default_depth_and_make_the_policy_static() {
        let c = parse("adaptive", "speed", Some(vec![3, 0, 2]), None).unwrap();
        assert_eq!(c.kind, PolicyKind::Static);
        assert_eq!(
            c.pinned,
            Some(Plan::copying(vec![0, 2, 3], DEFAULT_PREFETCH_DEPTH))
        );
        let c = parse("static", "speed", Some(vec![1]), Some(1)).unwrap();
        assert_eq!(c.pinned.unwrap().prefetch_depth, 1);
        let c = parse("static", "speed", Some(vec![]), None).unwrap();
        assert_eq!(c.pinned.unwrap().pooled, Vec::<usize>::new());
    }

    #[test]
    fn bad_inputs_say_what_to_change() {
        let e = config_error(parse("adaptive", "beauty", None, None));
        assert!(e.contains("unknown objective \"beauty\""), "{e}");
        assert!(e.contains("use \"speed\" or \"memory\""), "{e}");
        // One rule: names are matched exactly, as they are reported.
        let e = config_error(parse("adaptive", "Speed", None, None));
        assert!(e.contains("\"Speed\""), "{e}");
        let e = config_error(parse("random", "speed", None, None));
        assert!(e.contains("unknown policy \"random\""), "{e}");
        assert!(e.contains("use \"adaptive\" or \"static\""), "{e}");
        let e = config_error(parse("adaptive", "speed", None, Some(0)));
        assert!(e.contains("prefetch_depth must be at least 1"), "{e}");
        let e = config_error(parse("static", "speed", Some(vec![1]), Some(0)));
        assert!(e.contains("prefetch_depth must be at least 1"), "{e}");
        let e = config_error(parse("static", "speed", Some(vec![2, 1, 2]), None));
        assert!(e.contains("pooled layer 2 is listed twice"), "{e}");
        let e = config_error(parse("static", "speed", Some(vec![1, 4]), None));
        assert!(e.contains("pooled layer 4 does not exist"), "{e}");
        assert!(e.contains("4 cache layers (0..3)"), "{e}");
    }

    #[test]
    fn memory_slowdown_defaults_to_1_02_and_must_be_at_least_1() {
        let c = parse("adaptive", "memory", None, None).unwrap();
        assert_eq!(c.memory_slowdown.get(), DEFAULT_MEMORY_SLOWDOWN);
        assert_eq!(DEFAULT_MEMORY_SLOWDOWN, 1.02);
        let c = c.with_memory_slowdown(1.1).unwrap();
        assert_eq!(c.memory_slowdown, MemorySlowdown::new(1.1).unwrap());
        assert_ne!(c, parse("adaptive", "memory", None, None).unwrap());
        assert_eq!(MemorySlowdown::new(1.0).unwrap().get(), 1.0);
        for bad in [0.99, 0.0, -1.0, f64::NAN, f64::INFINITY] {
            let e = config_error(PolicyConfig::default().with_memory_slowdown(bad));
            assert!(e.contains("at least 1"), "{e}");
        }
    }

    #[test]
    fn build_gives_the_configured_policy() {
        use super::super::PolicyContext;
        use crate::layout::LayerSpec;
        let specs = vec![
            LayerSpec {
                batch: 1,
                kv_heads: 1,
                k_dim: 256,
                v_dim: 256,
                elem_size: 2,
            };
            4
        ];
        let ctx = PolicyContext {
            specs: &specs,
            capacity: 16,
            seq_lens: &[0; 4],
            device_budget: None,
        };
        let pinned = Plan::copying(vec![1, 3], 1);
        let mut p = PolicyConfig::pinned(pinned.clone()).build();
        assert_eq!(p.initial_plan(&ctx).unwrap(), pinned);
        // No budget: the static and the adaptive policy start all resident.
        for c in [
            parse("static", "speed", None, None).unwrap(),
            parse("adaptive", "speed", None, Some(1)).unwrap(),
            PolicyConfig::default(),
        ] {
            let mut p = c.build();
            assert_eq!(p.initial_plan(&ctx).unwrap(), Plan::all_resident(), "{c:?}");
        }
    }

    #[test]
    fn auto_places_layers_on_the_host_only_with_the_host_figures() {
        use super::super::PolicyContext;
        use crate::layout::LayerSpec;
        use crate::slots::ArenaLayout;
        // 4 layers of 64 MiB (all valid) under a budget of 3: a copy takes
        // 2.7 ms at the 25 GB/s link prior against 1 ms of compute a layer,
        // host attention at 1 TB/s 67 us.
        let spec = LayerSpec {
            batch: 1,
            kv_heads: 1,
            k_dim: 256,
            v_dim: 256,
            elem_size: 2,
        };
        let specs = vec![spec; 4];
        let capacity = 1 << 16;
        let layer = ArenaLayout::device_bytes_for(&specs[..1], capacity, &Plan::all_resident());
        let ctx = PolicyContext {
            specs: &specs,
            capacity,
            seq_lens: &[capacity; 4],
            device_budget: Some(3 * layer),
        };
        let host = HostModel {
            attention_bandwidth: 1e12,
            query_bytes: 1024,
            result_bytes: 2048,
            choice: HostAttention::Never,
        };
        let auto = PolicyConfig::default().with_host_attention("auto").unwrap();
        let plan = auto.build_with_host(Some(host)).initial_plan(&ctx).unwrap();
        assert_eq!(
            (plan.pooled.len(), plan.host_attended.len()),
            (1, 1),
            "{plan:?}"
        );
        // Without the CPU's figures, auto copies.
        let plan = auto.build().initial_plan(&ctx).unwrap();
        assert!(
            plan.host_attended.is_empty() && !plan.pooled.is_empty(),
            "{plan:?}"
        );
        // never copies even with them; always attends every pooled layer.
        let never = PolicyConfig::default()
            .with_host_attention("never")
            .unwrap();
        let plan = never
            .build_with_host(Some(host))
            .initial_plan(&ctx)
            .unwrap();
        assert!(plan.host_attended.is_empty(), "{plan:?}");
        let always = PolicyConfig::default()
            .with_host_attention("always")
            .unwrap();
        let plan = always
            .build_with_host(Some(host))
            .initial_plan(&ctx)
            .unwrap();
        assert_eq!(plan.host_attended, plan.pooled);
        assert!(!plan.pooled.is_empty());
    }
}
