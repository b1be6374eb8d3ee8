//! Named machines and model shapes for what-if simulation (`pie-rs simulate`).
//!
//! Link figures come from ../shared/notes/rust-stack.md ("Link figures to plan
//! against"): PCIe Gen4 x16 about 25 GB/s per direction measured, Gen5 x16
//! (H100/H200) 50-56 GB/s per direction, GH200 NVLink-C2C about 350 GB/s
//! host-to-device measured (900 GB/s is the bidirectional peak). HBM figures
//! are the vendors' datasheet peaks (NVIDIA H100 PCIe 80 GB: 2.0 TB/s; H200
//! NVL: 4.8 TB/s; GH200 with 96 GB HBM3: 4.0 TB/s; A100 80 GB PCIe:
//! 1.935 TB/s; GeForce RTX 4090: 1.008 TB/s). Per-copy latencies are launch
//! plus DMA set-up costs of the order measured for `cudaMemcpyAsync`
//! (about 10 us over PCIe, less over C2C).
//!
//! **Decode roofline.** A decode step reads every weight once and every valid
//! KV byte once, and at batch sizes that fit in memory it is bound by HBM
//! bandwidth, so one layer's compute is modelled as
//! `(weight bytes of the layer + valid KV bytes of the layer) / HBM bandwidth`
//! (bf16, norms and biases ignored; FLOPs, kernel launch gaps and the LM head
//! are ignored, which makes compute slightly optimistic and the estimates of
//! what can be hidden conservative). Prefill and large batches can be bound by
//! the tensor cores instead: [`MachineProfile::layer_step_seconds`] takes the
//! larger of the two times, with the dense bf16 datasheet peaks (GH200 and
//! H100 SXM 989 TFLOP/s, H100 PCIe 756, H200 NVL 835, A100 312, RTX 4090 165
//! with FP32 accumulation).
//!
//! **Host attention** (a pooled layer's decode attention run on the CPU where
//! its KV lives): the CPU reads the layer's valid KV at
//! [`MachineProfile::host_attention_gbps`], the smaller of its memory
//! bandwidth (a STREAM triad figure) and `cores x` its per-core kernel rate.
//! The per-core rate is what `cargo bench -p pie-host --bench host_attention`
//! measured for bf16 KV at GQA 4 (about 9 GB/s per busy core: the kernel is
//! compute-bound, README "Host attention kernel"); vendors publish no such figure.

use crate::error::{PieError, Result};
use crate::sim::SimConfig;

/// A machine: its host link and its HBM.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MachineProfile {
    /// Profile name, e.g. `h100-pcie-gen5`.
    pub name: &'static str,
    /// One line about the machine.
    pub description: &'static str,
    /// Host-to-device bandwidth, GB/s (1e9 bytes per second).
    pub h2d_gbps: f64,
    /// Device-to-host bandwidth, GB/s.
    pub d2h_gbps: f64,
    /// Fixed cost of one copy, microseconds (both directions).
    pub copy_latency_us: f64,
    /// Whether both directions run at full rate at once.
    pub full_duplex: bool,
    /// Copy engines available to the two copy queues.
    pub copy_engines: usize,
    /// HBM bandwidth, GB/s.
    pub hbm_gbps: f64,
    /// Device memory, GiB.
    pub gpu_memory_gib: f64,
    /// Dense bf16 tensor throughput, TFLOP/s (datasheet peak, no sparsity).
    pub bf16_tflops: f64,
    /// The host CPU's memory bandwidth, GB/s (a STREAM triad figure).
    pub cpu_memory_gbps: f64,
    /// Host CPU cores the attention kernel may use.
    pub cpu_cores: usize,
    /// KV bytes one busy core's attention kernel reads per second, GB/s.
    pub cpu_attention_gbps_per_core: f64,
}

/// Per-core host attention rate of the profiles, GB/s of bf16 KV at GQA 4:
/// what the pie-host kernel measured on this project's x86 machine (README,
/// "Host attention kernel": 9-10 GB/s per busy core), rounded down.
pub const CPU_ATTENTION_GBPS_PER_CORE: f64 = 9.0;

impl MachineProfile {
    /// KV bytes per second host attention reads on this machine, GB/s: the
    /// smaller of the memory bandwidth and `cores x` the per-core rate.
    pub fn host_attention_gbps(&self) -> f64 {
        self.cpu_memory_gbps
            .min(self.cpu_cores as f64 * self.cpu_attention_gbps_per_core)
    }

    /// The simulated link of this machine.
    pub fn sim_config(&self) -> SimConfig {
        SimConfig {
            h2d_bandwidth: self.h2d_gbps * 1e9,
            h2d_latency: self.copy_latency_us * 1e-6,
            d2h_bandwidth: self.d2h_gbps * 1e9,
            d2h_latency: self.copy_latency_us * 1e-6,
            full_duplex: self.full_duplex,
            copy_engines: self.copy_engines,
            local_bandwidth: self.hbm_gbps * 1e9 / 2.0,
            copy_compute_cost: 0.0,
        }
    }

    /// Decode compute of one layer of `model` that reads `kv_bytes` of valid KV
    /// (the roofline of the module docs), seconds.
    pub fn layer_compute_seconds(&self, model: &ModelShape, kv_bytes: u64) -> f64 {
        (model.weight_bytes_per_layer() + kv_bytes) as f64 / (self.hbm_gbps * 1e9)
    }

    /// One layer's share of a batched forward step (serving: prefills and
    /// decodes in one batch), seconds: the larger of the HBM time (weights once,
    /// plus `kv_bytes` of KV read and written) and the tensor time (`tokens`
    /// through the layer's matrices, plus `attention_flops`), at datasheet peaks.
    pub fn layer_step_seconds(
        &self,
        model: &ModelShape,
        tokens: u64,
        kv_bytes: u64,
        attention_flops: f64,
    ) -> f64 {
        let memory = self.layer_compute_seconds(model, kv_bytes);
        let params = (model.weight_bytes_per_layer() / model.elem_size as u64) as f64;
        let flops = 2.0 * params * tokens as f64 + attention_flops;
        memory.max(flops / (self.bf16_tflops * 1e12))
    }
}

/// The shape of a decoder-only transformer, enough for KV sizes and the roofline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelShape {
    /// Shape name, e.g. `llama-3-8b`.
    pub name: &'static str,
    /// Decoder layers.
    pub layers: usize,
    /// Hidden size.
    pub hidden: usize,
    /// MLP intermediate size (gated MLP: three matrices).
    pub intermediate: usize,
    /// Attention (query) heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// Bytes per element of weights and KV (2 for bf16).
    pub elem_size: usize,
}

/// A decode workload: sequences and their context length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Workload {
    /// Sequences per batch.
    pub batch: usize,
    /// Valid tokens per sequence.
    pub context: usize,
}

impl Workload {
    /// Cache capacity in tokens: the context rounded up to a multiple of 256
    /// (the cache grows in chunks).
    pub fn capacity(&self) -> usize {
        self.context.div_ceil(256) * 256
    }
}

impl ModelShape {
    /// Weight bytes of one decoder layer: Q, K, V, O projections and a gated MLP.
    pub fn weight_bytes_per_layer(&self) -> u64 {
        let q = self.hidden * self.heads * self.head_dim;
        let kv = 2 * self.hidden * self.kv_heads * self.head_dim;
        let o = self.heads * self.head_dim * self.hidden;
        let mlp = 3 * self.hidden * self.intermediate;
        ((q + kv + o + mlp) * self.elem_size) as u64
    }

    /// KV bytes of one token of one sequence in one layer (K and V).
    pub fn kv_bytes_per_token(&self) -> u64 {
        (2 * self.kv_heads * self.head_dim * self.elem_size) as u64
    }

    /// Bytes of one layer's KV at the workload's capacity (its device slot).
    pub fn layer_kv_bytes(&self, w: &Workload) -> u64 {
        self.kv_bytes_per_token() * (w.batch * w.capacity()) as u64
    }

    /// Bytes of one layer's valid KV (what a prefetch moves).
    pub fn valid_kv_bytes(&self, w: &Workload) -> u64 {
        self.kv_bytes_per_token() * (w.batch * w.context) as u64
    }

    /// Bytes one pooled layer writes back per decode step (one token per sequence).
    pub fn writeback_bytes(&self, w: &Workload) -> u64 {
        self.kv_bytes_per_token() * w.batch as u64
    }
}

const MACHINES: &[MachineProfile] = &[
    MachineProfile {
        name: "gh200",
        description: "GH200 Grace Hopper, NVLink-C2C (~350 GB/s H2D measured), 96 GB HBM3 4.0 TB/s",
        h2d_gbps: 350.0,
        d2h_gbps: 350.0,
        copy_latency_us: 5.0,
        full_duplex: true,
        copy_engines: 2,
        hbm_gbps: 4000.0,
        gpu_memory_gib: 96.0,
        bf16_tflops: 989.0,
        // Grace: 72 Neoverse V2 cores, LPDDR5X 480 GB GPU-to-CPU coherent
        // memory at up to 512 GB/s (NVIDIA Grace CPU datasheet); ~500 GB/s.
        cpu_memory_gbps: 500.0,
        cpu_cores: 72,
        cpu_attention_gbps_per_core: CPU_ATTENTION_GBPS_PER_CORE,
    },
    MachineProfile {
        name: "h100-pcie-gen5",
        description: "H100 PCIe 80 GB on PCIe Gen5 x16 (~50 GB/s per direction), HBM2e 2.0 TB/s",
        h2d_gbps: 50.0,
        d2h_gbps: 50.0,
        copy_latency_us: 10.0,
        full_duplex: true,
        copy_engines: 2,
        hbm_gbps: 2000.0,
        gpu_memory_gib: 80.0,
        bf16_tflops: 756.0,
        // A dual-socket Sapphire Rapids host: 8 channels DDR5-4800 per socket
        // (307 GB/s peak each); ~300 GB/s sustained for the pair, 2 x 32 cores.
        cpu_memory_gbps: 300.0,
        cpu_cores: 64,
        cpu_attention_gbps_per_core: CPU_ATTENTION_GBPS_PER_CORE,
    },
    MachineProfile {
        name: "h200-pcie-gen5",
        description: "H200 NVL 141 GB on PCIe Gen5 x16 (~50 GB/s per direction), HBM3e 4.8 TB/s",
        h2d_gbps: 50.0,
        d2h_gbps: 50.0,
        copy_latency_us: 10.0,
        full_duplex: true,
        copy_engines: 2,
        hbm_gbps: 4800.0,
        gpu_memory_gib: 141.0,
        bf16_tflops: 835.0,
        // As the H100 PCIe host: dual-socket DDR5-4800, ~300 GB/s, 64 cores.
        cpu_memory_gbps: 300.0,
        cpu_cores: 64,
        cpu_attention_gbps_per_core: CPU_ATTENTION_GBPS_PER_CORE,
    },
    MachineProfile {
        name: "a100-pcie-gen4",
        description: "A100 80 GB PCIe on PCIe Gen4 x16 (~25 GB/s per direction), HBM2e 1.935 TB/s",
        h2d_gbps: 25.0,
        d2h_gbps: 25.0,
        copy_latency_us: 10.0,
        full_duplex: true,
        copy_engines: 2,
        hbm_gbps: 1935.0,
        gpu_memory_gib: 80.0,
        bf16_tflops: 312.0,
        // A dual-socket Ice Lake / Milan host: 8 channels DDR4-3200 per
        // socket (205 GB/s peak each); ~200 GB/s sustained for the pair, 2 x 32 cores.
        cpu_memory_gbps: 200.0,
        cpu_cores: 64,
        cpu_attention_gbps_per_core: CPU_ATTENTION_GBPS_PER_CORE,
    },
    MachineProfile {
        name: "rtx4090-pcie-gen4",
        description:
            "GeForce RTX 4090 24 GB on PCIe Gen4 x16 (~20 GB/s, one shared link), GDDR6X 1.008 TB/s",
        h2d_gbps: 20.0,
        d2h_gbps: 20.0,
        copy_latency_us: 10.0,
        // GeForce boards often do not sustain both directions at full rate;
        // modelled conservatively as one link shared by both directions.
        full_duplex: false,
        copy_engines: 2,
        hbm_gbps: 1008.0,
        gpu_memory_gib: 24.0,
        bf16_tflops: 165.0,
        // A desktop: dual-channel DDR5-5600 (90 GB/s peak), ~60 GB/s
        // sustained, 16 cores.
        cpu_memory_gbps: 60.0,
        cpu_cores: 16,
        cpu_attention_gbps_per_core: CPU_ATTENTION_GBPS_PER_CORE,
    },
];

const MODELS: &[ModelShape] = &[
    // meta-llama/Meta-Llama-3-8B config.json
    ModelShape {
        name: "llama-3-8b",
        layers: 32,
        hidden: 4096,
        intermediate: 14336,
        heads: 32,
        kv_heads: 8,
        head_dim: 128,
        elem_size: 2,
    },
    // meta-llama/Meta-Llama-3-70B config.json
    ModelShape {
        name: "llama-3-70b",
        layers: 80,
        hidden: 8192,
        intermediate: 28672,
        heads: 64,
        kv_heads: 8,
        head_dim: 128,
        elem_size: 2,
    },
    // Qwen/Qwen2-7B config.json
    ModelShape {
        name: "qwen2-7b",
        layers: 28,
        hidden: 3584,
        intermediate: 18944,
        heads: 28,
        kv_heads: 4,
        head_dim: 128,
        elem_size: 2,
    },
    // meta-llama/Llama-2-7b-hf config.json (multi-head attention: a large KV per token)
    ModelShape {
        name: "llama-2-7b",
        layers: 32,
        hidden: 4096,
        intermediate: 11008,
        heads: 32,
        kv_heads: 32,
        head_dim: 128,
        elem_size: 2,
    },
    // Qwen/Qwen2.5-0.5B config.json (small enough for CPU demos)
    ModelShape {
        name: "qwen2.5-0.5b",
        layers: 24,
        hidden: 896,
        intermediate: 4864,
        heads: 14,
        kv_heads: 2,
        head_dim: 64,
        elem_size: 2,
    },
];

/// Every machine profile.
pub fn machines() -> &'static [MachineProfile] {
    MACHINES
}

/// Every model shape.
pub fn models() -> &'static [ModelShape] {
    MODELS
}

/// The machine profile called `name` (case-insensitive).
pub fn machine(name: &str) -> Result<MachineProfile> {
    MACHINES
        .iter()
        .find(|m| m.name.eq_ignore_ascii_case(name))
        .copied()
        .ok_or_else(|| {
            let names: Vec<&str> = MACHINES.iter().map(|m| m.name).collect();
            PieError::config(format!(
                "unknown machine {name:?}; choose one of {}",
                names.join(", ")
            ))
        })
}

/// The model shape called `name` (case-insensitive).
pub fn model(name: &str) -> Result<ModelShape> {
    MODELS
        .iter()
        .find(|m| m.name.eq_ignore_ascii_case(name))
        .copied()
        .ok_or_else(|| {
            let names: Vec<&str> = MODELS.iter().map(|m| m.name).collect();
            PieError::config(format!(
                "unknown model {name:?}; choose one of {}",
                names.join(", ")
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_3_8b_sizes() {
        let m = model("llama-3-8b").unwrap();
        // 4096*4096*2 + 2*4096*1024 + 3*4096*14336 = 218,103,808 parameters.
        assert_eq!(m.weight_bytes_per_layer(), 218_103_808 * 2);
        assert_eq!(m.kv_bytes_per_token(), 4096);
        let w = Workload {
            batch: 2,
            context: 1000,
        };
        assert_eq!(w.capacity(), 1024);
        assert_eq!(m.layer_kv_bytes(&w), 4096 * 2 * 1024);
        assert!(machine("nope").is_err());
        assert!(model("LLAMA-3-70B").is_ok());
    }
}
