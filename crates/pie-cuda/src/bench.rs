//! Copy-engine throughput measured with CUDA events: host-to-device alone,
//! device-to-host alone, and both at once on the backend's two streams.

use pie_core::{Backend, Buffer, CopyShape, Mem, PieError, Result, Stream};

use crate::{CudaBackend, HostMemKind};

/// Throughput for one copy size, in GB/s (1e9 bytes per second).
#[derive(Clone, Debug, PartialEq)]
pub struct CopyBenchRow {
    /// Bytes per copy.
    pub bytes: usize,
    /// Copies timed per direction.
    pub iters: usize,
    /// How the pinned host memory was allocated.
    pub host_kind: HostMemKind,
    /// Host-to-device alone.
    pub h2d_gbps: f64,
    /// Device-to-host alone.
    pub d2h_gbps: f64,
    /// Host-to-device while device-to-host runs on the other stream.
    pub both_h2d_gbps: f64,
    /// Device-to-host while host-to-device runs on the other stream.
    pub both_d2h_gbps: f64,
    /// Bytes moved in both directions over the span of the concurrent run.
    pub both_total_gbps: f64,
}

/// Measures copies of each size in `sizes`, `iters` copies per direction,
/// with portable pinned host memory (what [`Backend::alloc_host`] gives).
pub fn bench_copies(
    backend: &CudaBackend,
    sizes: &[usize],
    iters: usize,
) -> Result<Vec<CopyBenchRow>> {
    bench_copies_with(backend, sizes, iters, HostMemKind::Portable)
}

/// As [`bench_copies`], with host memory of the given kind.
///
/// Every copy is timed by events recorded on the copy streams; one untimed
/// copy per direction warms up each size. For the concurrent run, the D2H
/// stream waits on the H2D stream's start event, so both start together, and
/// the span is from that start to the later of the two ends.
pub fn bench_copies_with(
    backend: &CudaBackend,
    sizes: &[usize],
    iters: usize,
    host_kind: HostMemKind,
) -> Result<Vec<CopyBenchRow>> {
    if iters == 0 || sizes.is_empty() || sizes.contains(&0) {
        return Err(PieError::config(
            "bench_copies needs at least one size, all sizes > 0, and iters >= 1",
        ));
    }
    let max = sizes.iter().copied().max().unwrap_or(0);
    let host_src = backend.alloc_host_with(max, host_kind)?;
    let host_dst = backend.alloc_host_with(max, host_kind)?;
    let dev_a = backend.alloc_device(max)?;
    let dev_b = backend.alloc_device(max)?;
    let ev = |_: usize| backend.new_event();
    let (h_start, h_end, d_start, d_end) = (ev(0)?, ev(1)?, ev(2)?, ev(3)?);

    let h2d = |n: usize, dev: &crate::DeviceBuffer| -> Result<()> {
        backend.copy(
            Stream::H2D,
            Mem::Host(&host_src, 0),
            Mem::Device(dev, 0),
            CopyShape::contiguous(n),
        )
    };
    let d2h = |n: usize, dev: &crate::DeviceBuffer| -> Result<()> {
        backend.copy(
            Stream::D2H,
            Mem::Device(dev, 0),
            Mem::Host(&host_dst, 0),
            CopyShape::contiguous(n),
        )
    };
    let gbps = |bytes: usize, seconds: f64| {
        if seconds > 0.0 {
            bytes as f64 / seconds / 1e9
        } else {
            f64::INFINITY
        }
    };

    let mut rows = Vec::with_capacity(sizes.len());
    for &n in sizes {
        let moved = n * iters;
        // Warm-up.
        h2d(n, &dev_a)?;
        d2h(n, &dev_b)?;
        backend.synchronize_queues()?;

        // H2D alone.
        backend.record(&h_start, Stream::H2D)?;
        for _ in 0..iters {
            h2d(n, &dev_a)?;
        }
        backend.record(&h_end, Stream::H2D)?;
        backend.synchronize(&h_end)?;
        let h2d_s = backend.elapsed(&h_start, &h_end)?;

        // D2H alone.
        backend.record(&d_start, Stream::D2H)?;
        for _ in 0..iters {
            d2h(n, &dev_b)?;
        }
        backend.record(&d_end, Stream::D2H)?;
        backend.synchronize(&d_end)?;
        let d2h_s = backend.elapsed(&d_start, &d_end)?;

        // Both at once, on separate buffers so neither orders the other.
        backend.record(&h_start, Stream::H2D)?;
        backend.wait(Stream::D2H, &h_start)?;
        backend.record(&d_start, Stream::D2H)?;
        for _ in 0..iters {
            h2d(n, &dev_a)?;
            d2h(n, &dev_b)?;
        }
        backend.record(&h_end, Stream::H2D)?;
        backend.record(&d_end, Stream::D2H)?;
        backend.synchronize(&h_end)?;
        backend.synchronize(&d_end)?;
        let both_h = backend.elapsed(&h_start, &h_end)?;
        let both_d = backend.elapsed(&d_start, &d_end)?;
        let span = both_h.max(backend.elapsed(&h_start, &d_end)?);

        rows.push(CopyBenchRow {
            bytes: n,
            iters,
            host_kind,
            h2d_gbps: gbps(moved, h2d_s),
            d2h_gbps: gbps(moved, d2h_s),
            both_h2d_gbps: gbps(moved, both_h),
            both_d2h_gbps: gbps(moved, both_d),
            both_total_gbps: gbps(2 * moved, span),
        });
    }
    debug_assert!(dev_a.len() >= max && dev_b.len() >= max);
    Ok(rows)
}
