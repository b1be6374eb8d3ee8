#![deny(missing_docs)]
//! pie-host: the host backend of pie-rs. "Device" memory is ordinary memory,
//! and each copy queue is a real thread doing `memcpy`, with events that
//! behave like CUDA's. The model runs on the CPU; the caller's thread is the
//! compute stream. Tests, CI and `pie-rs demo` without a GPU run the same
//! engine code through it. It lives outside pie-core so that pie-core has no
//! `unsafe` beyond its lock-free ring: copying raw memory that PyTorch also
//! views is a backend's business.
//!
//! [`check`] holds a reference model of a layered compute loop's KV and a
//! driver that runs such a loop through the engine on this backend: the
//! property tests and the `embed` example use it.
//!
//! [`attention`] is decode attention computed where a pooled layer's KV lives:
//! a multi-threaded, vectorised kernel with the log-sum-exp merge.

pub mod attention;
pub mod check;

use parking_lot::{Condvar, Mutex};
use pie_core::backend::{check_copy_bounds, Backend, Buffer, CopyShape, Mem, Stream};
use pie_core::error::{PieError, Result};
use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How a fault-injecting host backend misbehaves (for reliability tests).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FaultConfig {
    /// The n-th copy (counting from 1, over both queues) fails.
    pub fail_copy_at: Option<u64>,
    /// The n-th copy never completes (its queue stalls forever).
    pub hang_copy_at: Option<u64>,
    /// Allocations larger than this many bytes fail, as an out-of-memory would.
    pub alloc_limit: Option<usize>,
}

/// Memory owned by the host backend: zeroed, page-aligned, stable address.
pub struct HostMem {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: `HostMem` owns its allocation exclusively; the engine orders every
// access to its bytes through events, so moving or sharing the handle between
// threads cannot by itself race.
unsafe impl Send for HostMem {}
// SAFETY: as above: `&HostMem` exposes only the address and length.
unsafe impl Sync for HostMem {}

const HOST_ALIGN: usize = 4096;

impl HostMem {
    fn new(len: usize) -> Result<Self> {
        if len == 0 {
            return Ok(HostMem {
                ptr: std::ptr::null_mut(),
                len: 0,
            });
        }
        let layout = Layout::from_size_align(len, HOST_ALIGN)
            .map_err(|e| PieError::backend("host allocation", e))?;
        // SAFETY: `layout` has a non-zero size (checked above).
        let ptr = unsafe { alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(PieError::backend(
                "host allocation",
                format!("out of memory allocating {len} bytes; lower the budget, the batch or the context"),
            ));
        }
        Ok(HostMem { ptr, len })
    }
}

impl Drop for HostMem {
    fn drop(&mut self) {
        if !self.ptr.is_null() {
            // SAFETY: `ptr` came from `alloc_zeroed` with exactly this layout.
            unsafe {
                dealloc(
                    self.ptr,
                    Layout::from_size_align_unchecked(self.len, HOST_ALIGN),
                )
            };
        }
    }
}

impl Buffer for HostMem {
    fn len(&self) -> usize {
        self.len
    }
    fn addr(&self) -> u64 {
        self.ptr as u64
    }
}

/// A host event: a record counter, a completion counter and the completion time.
#[derive(Default)]
pub struct HostEvent {
    inner: Arc<EventInner>,
}

#[derive(Default)]
struct EventInner {
    state: Mutex<EventState>,
    cv: Condvar,
}

#[derive(Default, Clone, Copy)]
struct EventState {
    recorded: u64,
    completed: u64,
    time: f64,
}

impl EventInner {
    fn complete(&self, target: u64, time: f64) {
        let mut s = self.state.lock();
        if target > s.completed {
            s.completed = target;
            s.time = time;
        }
        self.cv.notify_all();
    }

    fn wait_for(&self, target: u64, timeout: Duration) -> bool {
        let mut s = self.state.lock();
        let deadline = Instant::now() + timeout;
        while s.completed < target {
            if self.cv.wait_until(&mut s, deadline).timed_out() {
                return s.completed >= target;
            }
        }
        true
    }
}

enum Command {
    Copy {
        src: u64,
        dst: u64,
        shape: CopyShape,
        index: u64,
    },
    Signal(Arc<EventInner>, u64),
    Wait(Arc<EventInner>, u64),
}

struct Queue {
    tx: Mutex<Option<Sender<Command>>>,
    worker: Mutex<Option<JoinHandle<()>>>,
    /// Signalled after each command, to synchronize the whole queue.
    drained: Arc<EventInner>,
    submitted: AtomicU64,
}

/// The host backend. See the module docs.
pub struct HostBackend {
    h2d: Queue,
    d2h: Queue,
    start: Instant,
    faults: FaultConfig,
    copies: Arc<AtomicU64>,
    failure: Arc<Mutex<Option<String>>>,
    timeout: Duration,
    /// The same timeout, shared with the copy threads.
    timeout_ns: Arc<AtomicU64>,
}

/// Copies `shape` from `src` to `dst`, row by row.
///
/// # Safety
/// Both ranges must lie inside live allocations (checked by
/// [`check_copy_bounds`] when the copy was enqueued, and kept alive by the
/// engine until the queue is synchronized), and no other thread may access the
/// destination range until the copy's completion is observed through an event.
unsafe fn do_copy(src: u64, dst: u64, shape: CopyShape) {
    for r in 0..shape.height {
        let s = (src as usize + r * shape.src_pitch) as *const u8;
        let d = (dst as usize + r * shape.dst_pitch) as *mut u8;
        // SAFETY: the caller's contract covers each row (see above); `copy` is
        // used rather than `copy_nonoverlapping` because relayouts inside one
        // buffer may overlap.
        unsafe { std::ptr::copy(s, d, shape.width) };
    }
}

impl Queue {
    fn spawn(
        name: &str,
        start: Instant,
        faults: FaultConfig,
        failure: Arc<Mutex<Option<String>>>,
        timeout_ns: Arc<AtomicU64>,
    ) -> Result<Queue> {
        let (tx, rx) = channel::<Command>();
        let drained = Arc::new(EventInner::default());
        let d = drained.clone();
        let worker = std::thread::Builder::new()
            .name(format!("pie-host-{name}"))
            .spawn(move || {
                let mut done = 0u64;
                for cmd in rx {
                    match cmd {
                        Command::Copy {
                            src,
                            dst,
                            shape,
                            index,
                        } => {
                            if faults.hang_copy_at == Some(index) {
                                // A copy that never completes: this queue stalls until
                                // the backend is dropped (the channel closes).
                                *failure.lock() =
                                    Some(format!("injected fault: copy #{index} never completes"));
                                return;
                            }
                            if faults.fail_copy_at == Some(index) {
                                *failure.lock() = Some(format!("injected fault: copy #{index} failed"));
                            } else {
                                // SAFETY: bounds were checked at enqueue, and the engine keeps
                                // both buffers alive and untouched until the queue is drained
                                // (the contract of `do_copy`).
                                unsafe { do_copy(src, dst, shape) };
                            }
                        }
                        Command::Signal(ev, target) => {
                            ev.complete(target, start.elapsed().as_secs_f64())
                        }
                        Command::Wait(ev, target) => {
                            let timeout = Duration::from_nanos(timeout_ns.load(Ordering::Relaxed));
                            if !ev.wait_for(target, timeout) {
                                *failure.lock() = Some(format!(
                                    "a copy queue waited {timeout:?} for an event that never completed"
                                ));
                            }
                        }
                    }
                    done += 1;
                    d.complete(done, start.elapsed().as_secs_f64());
                }
            })
            .map_err(|e| PieError::backend("spawn copy thread", e))?;
        Ok(Queue {
            tx: Mutex::new(Some(tx)),
            worker: Mutex::new(Some(worker)),
            drained,
            submitted: AtomicU64::new(0),
        })
    }

    fn send(&self, cmd: Command) -> Result<()> {
        let guard = self.tx.lock();
        let tx = guard
            .as_ref()
            .ok_or_else(|| PieError::state("the host backend was shut down"))?;
        tx.send(cmd)
            .map_err(|_| PieError::backend("host copy queue", "the copy thread stopped"))?;
        self.submitted.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn synchronize(&self, timeout: Duration) -> Result<()> {
        let target = self.submitted.load(Ordering::Relaxed);
        if self.drained.wait_for(target, timeout) {
            Ok(())
        } else {
            Err(PieError::backend(
                "synchronize copy queue",
                format!("copies did not complete within {timeout:?}; the copy engine is stuck"),
            ))
        }
    }

    fn shutdown(&self) {
        self.tx.lock().take();
        if let Some(w) = self.worker.lock().take() {
            let _ = w.join();
        }
    }
}

impl HostBackend {
    /// A host backend with two copy threads.
    pub fn new() -> Result<Self> {
        Self::with_faults(FaultConfig::default())
    }

    /// A host backend that injects the given faults (reliability tests).
    pub fn with_faults(faults: FaultConfig) -> Result<Self> {
        let start = Instant::now();
        let failure = Arc::new(Mutex::new(None));
        let timeout = Duration::from_secs(30);
        let timeout_ns = Arc::new(AtomicU64::new(timeout.as_nanos() as u64));
        Ok(HostBackend {
            h2d: Queue::spawn(
                "h2d",
                start,
                faults.clone(),
                failure.clone(),
                timeout_ns.clone(),
            )?,
            d2h: Queue::spawn(
                "d2h",
                start,
                faults.clone(),
                failure.clone(),
                timeout_ns.clone(),
            )?,
            timeout_ns,
            start,
            faults,
            copies: Arc::new(AtomicU64::new(0)),
            failure,
            timeout,
        })
    }

    /// Sets how long a host-side wait may last before it is reported as a hang.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
        self.timeout_ns.store(
            timeout.as_nanos().min(u64::MAX as u128) as u64,
            Ordering::Relaxed,
        );
    }

    fn check_failure(&self) -> Result<()> {
        match self.failure.lock().as_ref() {
            Some(msg) => Err(PieError::backend("host copy engine", msg)),
            None => Ok(()),
        }
    }

    fn queue(&self, stream: Stream) -> Option<&Queue> {
        match stream {
            Stream::H2D => Some(&self.h2d),
            Stream::D2H => Some(&self.d2h),
            Stream::Foreign(_) => None,
        }
    }

    fn check_alloc(&self, bytes: usize) -> Result<()> {
        match self.faults.alloc_limit {
            Some(limit) if bytes > limit => Err(PieError::backend(
                "host allocation",
                format!("injected fault: cannot allocate {bytes} bytes (limit {limit})"),
            )),
            _ => Ok(()),
        }
    }
}

impl Drop for HostBackend {
    fn drop(&mut self) {
        self.h2d.shutdown();
        self.d2h.shutdown();
    }
}

impl Backend for HostBackend {
    type DeviceBuffer = HostMem;
    type HostBuffer = HostMem;
    type Event = HostEvent;

    fn name(&self) -> &'static str {
        "host"
    }

    fn alloc_device(&self, bytes: usize) -> Result<HostMem> {
        self.check_alloc(bytes)?;
        HostMem::new(bytes)
    }

    fn alloc_host(&self, bytes: usize) -> Result<HostMem> {
        self.check_alloc(bytes)?;
        HostMem::new(bytes)
    }

    fn new_event(&self) -> Result<HostEvent> {
        Ok(HostEvent::default())
    }

    fn copy(
        &self,
        stream: Stream,
        src: Mem<'_, Self>,
        dst: Mem<'_, Self>,
        shape: CopyShape,
    ) -> Result<()> {
        self.check_failure()?;
        check_copy_bounds(&src, &dst, &shape)?;
        let index = self.copies.fetch_add(1, Ordering::Relaxed) + 1;
        let (s, d) = (src.addr(), dst.addr());
        match self.queue(stream) {
            Some(q) => q.send(Command::Copy {
                src: s,
                dst: d,
                shape,
                index,
            }),
            None => {
                if self.faults.fail_copy_at == Some(index) {
                    return Err(PieError::backend(
                        "host copy",
                        format!("injected fault: copy #{index} failed"),
                    ));
                }
                // SAFETY: bounds checked above; on the compute stream the copy runs
                // synchronously on the caller's thread, which owns the compute order.
                unsafe { do_copy(s, d, shape) };
                Ok(())
            }
        }
    }

    fn record(&self, event: &HostEvent, stream: Stream) -> Result<()> {
        let target = {
            let mut s = event.inner.state.lock();
            s.recorded += 1;
            s.recorded
        };
        match self.queue(stream) {
            Some(q) => q.send(Command::Signal(event.inner.clone(), target)),
            None => {
                // The caller's thread is the compute stream and CPU work is
                // synchronous: everything before this call is already done.
                event.inner.complete(target, self.now());
                Ok(())
            }
        }
    }

    fn wait(&self, stream: Stream, event: &HostEvent) -> Result<()> {
        let target = event.inner.state.lock().recorded;
        match self.queue(stream) {
            Some(q) => q.send(Command::Wait(event.inner.clone(), target)),
            None => {
                if event.inner.wait_for(target, self.timeout) {
                    self.check_failure()
                } else {
                    self.check_failure()?;
                    Err(PieError::backend(
                        "wait for copy",
                        format!(
                            "a copy did not complete within {:?}; the copy engine is stuck",
                            self.timeout
                        ),
                    ))
                }
            }
        }
    }

    fn query(&self, event: &HostEvent) -> Result<bool> {
        let s = event.inner.state.lock();
        Ok(s.completed >= s.recorded)
    }

    fn synchronize(&self, event: &HostEvent) -> Result<()> {
        let target = event.inner.state.lock().recorded;
        if event.inner.wait_for(target, self.timeout) {
            self.check_failure()
        } else {
            self.check_failure()?;
            Err(PieError::backend(
                "event synchronize",
                format!("timed out after {:?}", self.timeout),
            ))
        }
    }

    fn elapsed(&self, start: &HostEvent, end: &HostEvent) -> Result<f64> {
        let a = *start.inner.state.lock();
        let b = *end.inner.state.lock();
        if a.completed < a.recorded
            || b.completed < b.recorded
            || a.recorded == 0
            || b.recorded == 0
        {
            return Err(PieError::state(
                "elapsed() needs two recorded, completed events",
            ));
        }
        Ok(b.time - a.time)
    }

    fn synchronize_queues(&self) -> Result<()> {
        self.h2d.synchronize(self.timeout)?;
        self.d2h.synchronize(self.timeout)?;
        self.check_failure()
    }

    fn now(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    fn wait_idle(&self) -> bool {
        self.h2d.synchronize(self.timeout).is_ok() && self.d2h.synchronize(self.timeout).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_and_events_order_work_across_queues() {
        let b = HostBackend::new().unwrap();
        let host = b.alloc_host(1 << 20).unwrap();
        let dev = b.alloc_device(1 << 20).unwrap();
        let back = b.alloc_host(1 << 20).unwrap();
        // SAFETY: `host` is a live 1 MiB allocation no queue touches yet.
        unsafe {
            for i in 0..(1 << 20) {
                *(host.addr() as *mut u8).add(i) = (i % 251) as u8;
            }
        }
        let ev = b.new_event().unwrap();
        b.copy(
            Stream::H2D,
            Mem::Host(&host, 0),
            Mem::Device(&dev, 0),
            CopyShape::contiguous(1 << 20),
        )
        .unwrap();
        b.record(&ev, Stream::H2D).unwrap();
        b.wait(Stream::D2H, &ev).unwrap();
        b.copy(
            Stream::D2H,
            Mem::Device(&dev, 0),
            Mem::Host(&back, 0),
            CopyShape::contiguous(1 << 20),
        )
        .unwrap();
        b.synchronize_queues().unwrap();
        // SAFETY: both queues are drained; the buffers are live and 1 MiB long.
        let (a, c) = unsafe {
            (
                std::slice::from_raw_parts(host.addr() as *const u8, 1 << 20),
                std::slice::from_raw_parts(back.addr() as *const u8, 1 << 20),
            )
        };
        assert_eq!(a, c);
    }

    #[test]
    fn out_of_bounds_copy_is_an_error() {
        let b = HostBackend::new().unwrap();
        let h = b.alloc_host(100).unwrap();
        let d = b.alloc_device(100).unwrap();
        assert!(b
            .copy(
                Stream::H2D,
                Mem::Host(&h, 50),
                Mem::Device(&d, 0),
                CopyShape::contiguous(60)
            )
            .is_err());
    }

    #[test]
    fn injected_failures_surface() {
        let b = HostBackend::with_faults(FaultConfig {
            fail_copy_at: Some(1),
            ..Default::default()
        })
        .unwrap();
        let h = b.alloc_host(64).unwrap();
        let d = b.alloc_device(64).unwrap();
        b.copy(
            Stream::H2D,
            Mem::Host(&h, 0),
            Mem::Device(&d, 0),
            CopyShape::contiguous(64),
        )
        .unwrap();
        assert!(b.synchronize_queues().is_err());
    }
}
