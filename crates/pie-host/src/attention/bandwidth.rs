//! This machine's memory bandwidth, measured as STREAM does: the triad
//! `a[i] = b[i] + s * c[i]` over arrays far larger than the caches, on the
//! same thread pool as the kernel, best of several passes, counting 24 bytes
//! per element (two f64 reads and one write, write-allocate traffic not
//! counted, as in STREAM). The host kernel's KV read rate is judged against
//! it, and a cost model can take it as the CPU's bandwidth.

use super::HostAttention;
use pie_core::error::{PieError, Result};
use rayon::prelude::*;
use std::time::Instant;

/// One triad measurement.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Triad {
    /// Elements per array.
    pub elements: usize,
    /// Bytes counted per pass (`24 * elements`).
    pub bytes: usize,
    /// Seconds of the fastest pass.
    pub seconds: f64,
    /// `bytes / seconds`.
    pub bytes_per_second: f64,
}

impl HostAttention {
    /// Runs the triad over three arrays of `elements` f64 on this kernel's
    /// threads, `passes` times, and reports the fastest pass.
    pub fn stream_triad(&self, elements: usize, passes: usize) -> Result<Triad> {
        if elements == 0 || passes == 0 {
            return Err(PieError::config(
                "the triad needs at least one element and one pass",
            ));
        }
        let threads = self.threads();
        let part = elements.div_ceil(threads);
        self.pool().install(|| {
            let mk = |v: f64| -> Result<Vec<f64>> {
                let mut x: Vec<f64> = Vec::new();
                x.try_reserve_exact(elements).map_err(|_| {
                    PieError::backend(
                        "triad allocation",
                        format!("cannot allocate {elements} f64; use fewer elements"),
                    )
                })?;
                x.resize(elements, 0.0);
                // First touch by the threads that will read it.
                x.par_chunks_mut(part).for_each(|c| c.fill(v));
                Ok(x)
            };
            let mut a = mk(0.0)?;
            let b = mk(1.0)?;
            let c = mk(2.0)?;
            let scalar = 3.0;
            let mut best = f64::INFINITY;
            for _ in 0..passes {
                let t = Instant::now();
                a.par_chunks_mut(part)
                    .zip(b.par_chunks(part))
                    .zip(c.par_chunks(part))
                    .for_each(|((a, b), c)| {
                        for ((a, b), c) in a.iter_mut().zip(b).zip(c) {
                            *a = b + scalar * c;
                        }
                    });
                best = best.min(t.elapsed().as_secs_f64());
            }
            if std::hint::black_box(a[elements / 2]) != 7.0 {
                return Err(PieError::internal("the triad computed a wrong value"));
            }
            let bytes = 24 * elements;
            Ok(Triad {
                elements,
                bytes,
                seconds: best,
                bytes_per_second: bytes as f64 / best,
            })
        })
    }
}
