//! What host attention costs, as the cost model sees it.
//!
//! A *host-attended* pooled layer keeps its KV in host memory: each decode
//! step its query goes to the host (one device-to-host copy), the CPU reads the
//! layer's valid KV once and computes attention with the log-sum-exp of each
//! row, and the partial result comes back (one host-to-device copy) to be
//! merged with the device's attention over the tokens it holds. The device
//! waits for that merge before the rest of the layer, so the whole round trip
//! is on the step's critical path, serial with the layer's device compute:
//!
//! `host_seconds = copy(query, d2h) + valid_bytes / attention_bandwidth + copy(result, h2d)`
//!
//! where `attention_bandwidth = min(memory bandwidth, cores x per-core rate)`
//! (the kernel is compute-bound per core at GQA 4, README "Host attention
//! kernel"). The two small copies are timed as lone copies (latency plus bytes
//! over bandwidth), not queued behind prefetches: they are a few KiB against
//! MiB-sized layer copies, and a DMA engine interleaves them. Such a layer takes
//! no staging slot and moves no KV over the link except its new tokens'
//! write-back, which is queued as a copied layer's is.

use super::cost_model::{copy_seconds, LinkModel};
use super::HostAttention;
use crate::error::{PieError, Result};

/// The host's attention path and the user's placement choice.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HostModel {
    /// KV bytes per second the host attention kernel reads (see the module docs).
    pub attention_bandwidth: f64,
    /// Bytes of one layer's query sent to the host each step.
    pub query_bytes: u64,
    /// Bytes of one layer's partial result and log-sum-exp sent back each step.
    pub result_bytes: u64,
    /// Which placements the search may choose: copy only (`Never`), host only
    /// (`Always`) or either per pooled layer (`Auto`).
    pub choice: HostAttention,
}

impl HostModel {
    /// The model of a CPU with `memory_bandwidth` bytes/s (a STREAM triad) and
    /// `cores` cores each reading `per_core_rate` bytes/s of KV in the kernel.
    pub fn from_cpu(
        memory_bandwidth: f64,
        cores: usize,
        per_core_rate: f64,
        query_bytes: u64,
        result_bytes: u64,
        choice: HostAttention,
    ) -> Self {
        HostModel {
            attention_bandwidth: memory_bandwidth.min(cores as f64 * per_core_rate),
            query_bytes,
            result_bytes,
            choice,
        }
    }

    /// Seconds the CPU spends reading `valid_bytes` of KV.
    pub fn attention_seconds(&self, valid_bytes: u64) -> f64 {
        valid_bytes as f64 / self.attention_bandwidth
    }

    /// Seconds one host-attended layer with `valid_bytes` of KV adds to the
    /// critical path: query down, host attention, result back.
    pub fn layer_seconds(&self, link: &LinkModel, valid_bytes: u64) -> f64 {
        copy_seconds(self.query_bytes, link.d2h_bandwidth, link.d2h_latency)
            + self.attention_seconds(valid_bytes)
            + copy_seconds(self.result_bytes, link.h2d_bandwidth, link.h2d_latency)
    }

    /// Checks the bandwidth is positive and finite.
    pub fn validate(&self) -> Result<()> {
        if !(self.attention_bandwidth.is_finite() && self.attention_bandwidth > 0.0) {
            return Err(PieError::config(format!(
                "the host attention bandwidth must be positive and finite (got {} B/s); \
                 give the CPU's memory bandwidth and a core count of at least 1",
                self.attention_bandwidth
            )));
        }
        Ok(())
    }
}

/// Query and result bytes of one layer's host attention for `batch`
/// sequences of one new token each, `q_heads` query heads of `head_dim`:
/// the query in the KV's element size, the result in f32 plus one f32
/// log-sum-exp per row (what the pie-host kernel returns).
pub fn exchange_bytes(
    batch: usize,
    q_heads: usize,
    head_dim: usize,
    elem_size: usize,
) -> (u64, u64) {
    let rows = (batch * q_heads) as u64;
    (
        rows * (head_dim * elem_size) as u64,
        rows * (head_dim as u64 * 4 + 4),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bandwidth_is_the_smaller_of_memory_and_cores() {
        let m = HostModel::from_cpu(300e9, 64, 9e9, 0, 0, HostAttention::Auto);
        assert_eq!(m.attention_bandwidth, 300e9);
        let m = HostModel::from_cpu(300e9, 8, 9e9, 0, 0, HostAttention::Auto);
        assert_eq!(m.attention_bandwidth, 72e9);
        let bad = HostModel::from_cpu(300e9, 0, 9e9, 0, 0, HostAttention::Auto);
        assert!(bad.validate().is_err());
    }

    #[test]
    fn layer_seconds_is_the_round_trip() {
        // 1 GB/s link, 1 us latency: the 1000-byte query takes 2 us, the
        // 2000-byte result 3 us; 100 MB of KV at 100 GB/s takes 1 ms.
        let link = LinkModel::symmetric(1e9, 1e-6);
        let m = HostModel {
            attention_bandwidth: 100e9,
            query_bytes: 1000,
            result_bytes: 2000,
            choice: HostAttention::Auto,
        };
        let t = m.layer_seconds(&link, 100_000_000);
        assert!((t - 1.005e-3).abs() < 1e-12, "{t}");
        assert_eq!(exchange_bytes(2, 4, 8, 2), (128, 288));
    }
}
