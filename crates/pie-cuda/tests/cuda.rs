//! Tests of the CUDA backend. Those that need a GPU return early (printing
//! "skipped: no CUDA") where `cuda_available()` is false.

use pie_core::{Backend, Buffer, CopyShape, Mem, PieError, Stream};
use pie_cuda::{bench_copies, bench_copies_with, cuda_available, probe, CudaBackend, HostMemKind};

macro_rules! require_cuda {
    () => {
        if !cuda_available() {
            println!("skipped: no CUDA");
            return;
        }
    };
}

/// A small deterministic generator (xorshift64*), so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

fn backend() -> CudaBackend {
    CudaBackend::new(0).expect("cuda_available() said yes, so device 0 must open")
}

const SENTINEL: u8 = 0xA5;

#[test]
fn without_gpu_new_returns_err_and_nothing_panics() {
    let available = cuda_available();
    match probe() {
        Ok(desc) => {
            assert!(available);
            println!("CUDA: {desc}");
        }
        Err(reason) => {
            assert!(!available);
            assert!(!reason.is_empty());
            println!("no CUDA: {reason}");
        }
    }
    match CudaBackend::new(0) {
        Ok(b) => {
            assert!(available, "backend opened though probe failed");
            assert_eq!(b.name(), "cuda");
            println!("{}", b.description());
        }
        Err(e) => {
            assert!(!available, "probe succeeded but new(0) failed: {e}");
            assert!(matches!(e, PieError::Backend { .. }), "{e:?}");
        }
    }
    // A device index that never exists is an error, GPU or not.
    match CudaBackend::new(1 << 20) {
        Err(PieError::Backend { call, message }) => {
            assert!(!call.is_empty() && !message.is_empty());
        }
        other => panic!("expected a backend error, got {other:?}"),
    }
}

#[test]
fn contiguous_round_trips_are_bit_exact() {
    require_cuda!();
    let b = backend();
    const N: usize = 16 << 20;
    let dev = b.alloc_device(N).unwrap();
    let mut src = b.alloc_host(N).unwrap();
    let mut dst = b.alloc_host(N).unwrap();
    let ev = b.new_event().unwrap();
    let mut rng = Rng(0x1234_5678_9abc_def1);
    for round in 0..64 {
        let len = 1 + rng.below(if round % 8 == 0 { N / 2 } else { 1 << 16 });
        let (os, od, oh) = (rng.below(N - len), rng.below(N - len), rng.below(N - len));
        // SAFETY (test): no copy is in flight; the previous round synchronized.
        unsafe {
            rng.fill(&mut src.as_mut_slice()[os..os + len]);
            dst.as_mut_slice().fill(SENTINEL);
        }
        b.copy(
            Stream::H2D,
            Mem::Host(&src, os),
            Mem::Device(&dev, od),
            CopyShape::contiguous(len),
        )
        .unwrap();
        b.record(&ev, Stream::H2D).unwrap();
        b.wait(Stream::D2H, &ev).unwrap();
        b.copy(
            Stream::D2H,
            Mem::Device(&dev, od),
            Mem::Host(&dst, oh),
            CopyShape::contiguous(len),
        )
        .unwrap();
        b.synchronize_queues().unwrap();
        // SAFETY (test): both queues are idle.
        let (s, d) = unsafe { (src.as_slice(), dst.as_slice()) };
        assert!(
            d[oh..oh + len] == s[os..os + len],
            "round {round}: data differs"
        );
        assert!(
            d[..oh].iter().all(|&x| x == SENTINEL),
            "round {round}: bytes before touched"
        );
        assert!(
            d[oh + len..].iter().all(|&x| x == SENTINEL),
            "round {round}: bytes after touched"
        );
    }
    assert_eq!(b.take_release_error(), None);
}

#[test]
fn strided_round_trips_are_bit_exact_and_leave_gaps_alone() {
    require_cuda!();
    let b = backend();
    const N: usize = 8 << 20;
    let dev = b.alloc_device(N).unwrap();
    let mut src = b.alloc_host(N).unwrap();
    let mut dst = b.alloc_host(N).unwrap();
    let mut dev_image = b.alloc_host(N).unwrap();
    let ev = b.new_event().unwrap();
    let mut rng = Rng(0xdead_beef_cafe_f00d);
    for round in 0..48 {
        let width = 1 + rng.below(4096);
        let height = 2 + rng.below(256);
        let sp = width + rng.below(512);
        let dp = width + rng.below(512) + usize::from(round % 3 == 0); // pitches differ
        let hp = width + rng.below(512);
        let shape = |src_pitch, dst_pitch| CopyShape {
            width,
            height,
            src_pitch,
            dst_pitch,
        };
        let span = |p: usize| (height - 1) * p + width;
        let os = rng.below(N - span(sp));
        let od = rng.below(N - span(dp));
        let oh = rng.below(N - span(hp));
        // Device starts as a known image so its gaps can be checked too.
        // SAFETY (test): nothing in flight.
        unsafe {
            rng.fill(dev_image.as_mut_slice());
            rng.fill(src.as_mut_slice());
            dst.as_mut_slice().fill(SENTINEL);
        }
        b.copy(
            Stream::H2D,
            Mem::Host(&dev_image, 0),
            Mem::Device(&dev, 0),
            CopyShape::contiguous(N),
        )
        .unwrap();
        b.copy(
            Stream::H2D,
            Mem::Host(&src, os),
            Mem::Device(&dev, od),
            shape(sp, dp),
        )
        .unwrap();
        b.record(&ev, Stream::H2D).unwrap();
        b.wait(Stream::D2H, &ev).unwrap();
        b.copy(
            Stream::D2H,
            Mem::Device(&dev, od),
            Mem::Host(&dst, oh),
            shape(dp, hp),
        )
        .unwrap();
        b.synchronize_queues().unwrap();
        // SAFETY (test): queues idle.
        let (s, d) = unsafe { (src.as_slice(), dst.as_slice()) };
        let mut expect = vec![SENTINEL; N];
        for r in 0..height {
            expect[oh + r * hp..oh + r * hp + width]
                .copy_from_slice(&s[os + r * sp..os + r * sp + width]);
        }
        assert!(d == &expect[..], "round {round}: host result differs");

        // The device's bytes outside the rows are untouched.
        // SAFETY: no copy is in flight on this buffer: the queues were synchronized
        // (or nothing was enqueued yet), and this thread is its only user.
        let mut expect_dev = unsafe { dev_image.as_slice() }.to_vec();
        for r in 0..height {
            expect_dev[od + r * dp..od + r * dp + width]
                .copy_from_slice(&s[os + r * sp..os + r * sp + width]);
        }
        b.copy(
            Stream::D2H,
            Mem::Device(&dev, 0),
            Mem::Host(&dst, 0),
            CopyShape::contiguous(N),
        )
        .unwrap();
        b.synchronize_queues().unwrap();
        assert!(
            // SAFETY: no copy is in flight on this buffer: the queues were synchronized
            // (or nothing was enqueued yet), and this thread is its only user.
            unsafe { dst.as_slice() } == &expect_dev[..],
            "round {round}: device gaps changed"
        );
    }
}

#[test]
fn device_to_device_and_foreign_stream() {
    require_cuda!();
    let b = backend();
    const N: usize = 1 << 20;
    let a = b.alloc_device(N).unwrap();
    let c = b.alloc_device(N).unwrap();
    let mut h = b.alloc_host(N).unwrap();
    let mut out = b.alloc_host(N).unwrap();
    // SAFETY: no copy is in flight on this buffer: the queues were synchronized
    // (or nothing was enqueued yet), and this thread is its only user.
    unsafe {
        Rng(7).fill(h.as_mut_slice());
        out.as_mut_slice().fill(0);
    }
    let ev = b.new_event().unwrap();
    // Everything on the legacy default stream (Foreign(0)): in order.
    let s = Stream::Foreign(0);
    b.copy(
        s,
        Mem::Host(&h, 0),
        Mem::Device(&a, 0),
        CopyShape::contiguous(N),
    )
    .unwrap();
    b.copy(
        s,
        Mem::Device(&a, 0),
        Mem::Device(&c, 0),
        CopyShape::contiguous(N),
    )
    .unwrap();
    // 2D device-to-device and host-to-host as well.
    let shape = CopyShape {
        width: 100,
        height: 10,
        src_pitch: 200,
        dst_pitch: 300,
    };
    b.copy(s, Mem::Device(&c, 0), Mem::Device(&a, 0), shape)
        .unwrap();
    b.copy(
        s,
        Mem::Device(&c, 0),
        Mem::Host(&out, 0),
        CopyShape::contiguous(N),
    )
    .unwrap();
    b.record(&ev, s).unwrap();
    b.synchronize(&ev).unwrap();
    assert!(b.query(&ev).unwrap());
    // SAFETY: no copy is in flight on this buffer: the queues were synchronized
    // (or nothing was enqueued yet), and this thread is its only user.
    assert!(unsafe { out.as_slice() == h.as_slice() });

    // The 2D device-to-device copy moved exactly its rows.
    // SAFETY: no copy is in flight on this buffer: the queues were synchronized
    // (or nothing was enqueued yet), and this thread is its only user.
    let mut expect = unsafe { h.as_slice() }.to_vec();
    // SAFETY: no copy is in flight on this buffer: the queues were synchronized
    // (or nothing was enqueued yet), and this thread is its only user.
    let hs = unsafe { h.as_slice() };
    for r in 0..shape.height {
        expect[r * 300..r * 300 + 100].copy_from_slice(&hs[r * 200..r * 200 + 100]);
    }
    b.copy(
        s,
        Mem::Device(&a, 0),
        Mem::Host(&out, 0),
        CopyShape::contiguous(N),
    )
    .unwrap();
    // Host-to-host, strided, through the same queue.
    let mut hh = b.alloc_host(N).unwrap();
    // SAFETY: no copy is in flight on this buffer: the queues were synchronized
    // (or nothing was enqueued yet), and this thread is its only user.
    unsafe { hh.as_mut_slice().fill(0) };
    b.copy(s, Mem::Host(&h, 0), Mem::Host(&hh, 0), shape)
        .unwrap();
    b.record(&ev, s).unwrap();
    b.synchronize(&ev).unwrap();
    // SAFETY: no copy is in flight on this buffer: the queues were synchronized
    // (or nothing was enqueued yet), and this thread is its only user.
    assert!(unsafe { out.as_slice() } == &expect[..]);
    // SAFETY: no copy is in flight on this buffer: the queues were synchronized
    // (or nothing was enqueued yet), and this thread is its only user.
    let hhs = unsafe { hh.as_slice() };
    for r in 0..shape.height {
        assert_eq!(hhs[r * 300..r * 300 + 100], hs[r * 200..r * 200 + 100]);
        assert!(hhs[r * 300 + 100..r * 300 + 300].iter().all(|&x| x == 0));
    }
}

#[test]
fn d2h_waits_for_h2d_on_the_other_stream() {
    require_cuda!();
    let b = backend();
    const N: usize = 256 << 20;
    let dev = b.alloc_device(N).unwrap();
    let mut new = b.alloc_host(N).unwrap();
    let mut old = b.alloc_host(N).unwrap();
    let mut out = b.alloc_host(N).unwrap();
    // SAFETY: no copy is in flight on this buffer: the queues were synchronized
    // (or nothing was enqueued yet), and this thread is its only user.
    unsafe {
        new.as_mut_slice().fill(0x11);
        old.as_mut_slice().fill(0x22);
        out.as_mut_slice().fill(0);
    }
    let ready = b.new_event().unwrap();
    for round in 0..4 {
        // Device holds `old`.
        b.copy(
            Stream::H2D,
            Mem::Host(&old, 0),
            Mem::Device(&dev, 0),
            CopyShape::contiguous(N),
        )
        .unwrap();
        b.synchronize_queues().unwrap();
        // Overwrite with `new` on H2D; D2H reads it back only after `ready`.
        b.copy(
            Stream::H2D,
            Mem::Host(&new, 0),
            Mem::Device(&dev, 0),
            CopyShape::contiguous(N),
        )
        .unwrap();
        b.record(&ready, Stream::H2D).unwrap();
        b.wait(Stream::D2H, &ready).unwrap();
        b.copy(
            Stream::D2H,
            Mem::Device(&dev, 0),
            Mem::Host(&out, 0),
            CopyShape::contiguous(N),
        )
        .unwrap();
        b.synchronize_queues().unwrap();
        // SAFETY: no copy is in flight on this buffer: the queues were synchronized
        // (or nothing was enqueued yet), and this thread is its only user.
        let o = unsafe { out.as_slice() };
        let bad = o.iter().position(|&x| x != 0x11);
        assert_eq!(
            bad, None,
            "round {round}: D2H read stale bytes (wait not honoured)"
        );
    }
}

#[test]
fn events_query_time_and_report_misuse() {
    require_cuda!();
    let b = backend();
    let (start, end, never) = (
        b.new_event().unwrap(),
        b.new_event().unwrap(),
        b.new_event().unwrap(),
    );
    // Never recorded: complete, and synchronize returns at once.
    assert!(b.query(&never).unwrap());
    b.synchronize(&never).unwrap();
    // Timing a never-recorded event is an error, not a panic.
    assert!(matches!(
        b.elapsed(&never, &never),
        Err(PieError::Backend { .. })
    ));

    const N: usize = 64 << 20;
    let dev = b.alloc_device(N).unwrap();
    let h = b.alloc_host(N).unwrap();
    b.record(&start, Stream::H2D).unwrap();
    b.copy(
        Stream::H2D,
        Mem::Host(&h, 0),
        Mem::Device(&dev, 0),
        CopyShape::contiguous(N),
    )
    .unwrap();
    b.record(&end, Stream::H2D).unwrap();
    let _ = b.query(&end).unwrap(); // either answer is fine; it must not error
    b.synchronize(&end).unwrap();
    assert!(b.query(&end).unwrap());
    let secs = b.elapsed(&start, &end).unwrap();
    assert!(secs > 0.0 && secs < 10.0, "elapsed {secs}");
    let t0 = b.now();
    let t1 = b.now();
    assert!(t1 >= t0 && t0 >= 0.0);
}

#[test]
fn out_of_bounds_and_absurd_sizes_are_errors() {
    require_cuda!();
    let b = backend();
    let dev = b.alloc_device(4096).unwrap();
    let h = b.alloc_host(4096).unwrap();
    let oob = b.copy(
        Stream::H2D,
        Mem::Host(&h, 1),
        Mem::Device(&dev, 0),
        CopyShape::contiguous(4096),
    );
    assert!(matches!(oob, Err(PieError::Config(_))), "{oob:?}");
    let oob2d = b.copy(
        Stream::D2H,
        Mem::Device(&dev, 0),
        Mem::Host(&h, 0),
        CopyShape {
            width: 64,
            height: 65,
            src_pitch: 64,
            dst_pitch: 64,
        },
    );
    assert!(oob2d.is_err());
    let bad_pitch = b.copy(
        Stream::D2H,
        Mem::Device(&dev, 0),
        Mem::Host(&h, 0),
        CopyShape {
            width: 64,
            height: 2,
            src_pitch: 32,
            dst_pitch: 64,
        },
    );
    assert!(bad_pitch.is_err());
    let huge = b.alloc_device(1 << 60);
    assert!(matches!(huge, Err(PieError::Backend { .. })), "{huge:?}");
    let huge_host = b.alloc_host(1 << 60);
    assert!(
        matches!(huge_host, Err(PieError::Backend { .. })),
        "{huge_host:?}"
    );
    // Zero-sized buffers and copies are fine.
    let empty = b.alloc_device(0).unwrap();
    assert_eq!(empty.len(), 0);
    b.copy(
        Stream::H2D,
        Mem::Host(&h, 4096),
        Mem::Device(&empty, 0),
        CopyShape::contiguous(0),
    )
    .unwrap();
    // The backend still works after the errors.
    b.copy(
        Stream::H2D,
        Mem::Host(&h, 0),
        Mem::Device(&dev, 0),
        CopyShape::contiguous(4096),
    )
    .unwrap();
    b.synchronize_queues().unwrap();
}

#[test]
fn works_from_other_threads() {
    require_cuda!();
    let b = std::sync::Arc::new(backend());
    const N: usize = 4 << 20;
    let dev = std::sync::Arc::new(b.alloc_device(N).unwrap());
    let mut h = b.alloc_host(N).unwrap();
    // SAFETY: no copy is in flight on this buffer: the queues were synchronized
    // (or nothing was enqueued yet), and this thread is its only user.
    unsafe { Rng(99).fill(h.as_mut_slice()) };
    let h = std::sync::Arc::new(h);
    // A fresh thread has no current context: the backend must bind it.
    let (b2, d2, h2) = (b.clone(), dev.clone(), h.clone());
    std::thread::spawn(move || {
        b2.copy(
            Stream::H2D,
            Mem::Host(&*h2, 0),
            Mem::Device(&*d2, 0),
            CopyShape::contiguous(N),
        )
        .unwrap();
        b2.synchronize_queues().unwrap();
    })
    .join()
    .unwrap();
    let out = b.alloc_host(N).unwrap();
    let b3 = b.clone();
    let out = std::thread::spawn(move || {
        b3.copy(
            Stream::D2H,
            Mem::Device(&*dev, 0),
            Mem::Host(&out, 0),
            CopyShape::contiguous(N),
        )
        .unwrap();
        b3.synchronize_queues().unwrap();
        out // dropped on this thread later: frees must work from any thread
    })
    .join()
    .unwrap();
    // SAFETY: no copy is in flight on this buffer: the queues were synchronized
    // (or nothing was enqueued yet), and this thread is its only user.
    assert!(unsafe { out.as_slice() == h.as_slice() });
    std::thread::spawn(move || drop(out)).join().unwrap();
    assert_eq!(b.take_release_error(), None);
}

#[test]
fn bench_reports_positive_throughput() {
    require_cuda!();
    let b = backend();
    let rows = bench_copies(&b, &[1 << 20, 64 << 20], 4).unwrap();
    assert_eq!(rows.len(), 2);
    for r in &rows {
        println!("{r:?}");
        for v in [
            r.h2d_gbps,
            r.d2h_gbps,
            r.both_h2d_gbps,
            r.both_d2h_gbps,
            r.both_total_gbps,
        ] {
            assert!(v.is_finite() && v > 0.0, "{r:?}");
        }
    }
    let wc = bench_copies_with(&b, &[64 << 20], 4, HostMemKind::WriteCombined).unwrap();
    println!("{:?}", wc[0]);
    assert!(bench_copies(&b, &[], 4).is_err());
    assert!(bench_copies(&b, &[1024], 0).is_err());
}
