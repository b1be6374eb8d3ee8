#![deny(missing_docs)]
//! pie-cuda: the CUDA backend of pie-rs, on cudarc's driver API with dynamic
//! loading, so it builds (and its tests skip) where no CUDA is installed.
//!
//! * [`CudaBackend`] implements [`pie_core::Backend`] on the device's **primary
//!   context**, the one the CUDA runtime and therefore PyTorch use: device
//!   pointers, streams and events are interchangeable with PyTorch's.
//! * Two non-blocking streams are the copy queues ([`Stream::H2D`], [`Stream::D2H`]);
//!   [`Stream::Foreign`] is a raw `CUstream` owned by someone else (PyTorch's
//!   current stream; `0` is the legacy default stream), never destroyed here.
//! * Every call binds the primary context to the calling thread first, so the
//!   backend can be used from any thread (the Python caller, the swapper).
//! * Nothing panics: a missing driver, a missing symbol or any driver error is a
//!   [`PieError::Backend`] naming the failing call and saying what to change.
//!
//! [`probe`] and [`cuda_available`] tell whether a usable GPU is present;
//! [`bench_copies`] measures the copy engines with CUDA events.

mod bench;
mod driver;
mod memory;

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use cudarc::driver::sys::{self, CUresult};
use pie_core::backend::check_copy_bounds;
use pie_core::{Backend, CopyShape, Mem, PieError, Result, Stream};

pub use bench::{bench_copies, bench_copies_with, CopyBenchRow};
pub use memory::{DeviceBuffer, HostBuffer, HostMemKind};

use driver::{check, driver_error, guard, Context};

/// Whether the CUDA driver library can be loaded at all. Never panics.
fn culib_present() -> bool {
    // SAFETY: `is_culib_present` only tries to dlopen the candidate names of
    // libcuda and closes them again; it touches no CUDA state.
    std::panic::catch_unwind(|| unsafe { sys::is_culib_present() }).unwrap_or(false)
}

const NO_DRIVER: &str = "the NVIDIA driver library (libcuda.so.1) was not found: install the NVIDIA driver, or add the directory holding libcuda.so.1 to LD_LIBRARY_PATH; without a GPU use the host or sim backend";

/// Describes device 0 if a CUDA driver and at least one device are usable:
/// `Ok("NVIDIA H200, 139.8 GiB, compute 9.0, 1 device(s), driver API 13.0")`,
/// or `Err(reason)` saying what is missing. Never panics.
pub fn probe() -> std::result::Result<String, String> {
    probe_device(0).map_err(|e| e.to_string())
}

/// Whether a CUDA driver and at least one device are usable (the result of the
/// first [`probe`], cached). Never panics.
pub fn cuda_available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| probe().is_ok())
}

fn probe_device(ordinal: usize) -> Result<String> {
    if !culib_present() {
        return Err(PieError::backend("dlopen(libcuda)", NO_DRIVER));
    }
    guard("cuInit", || {
        // SAFETY: cuInit(0) is idempotent and thread safe.
        check("cuInit", unsafe { sys::cuInit(0) })?;
        let mut count = 0;
        // SAFETY: `count` is a live local the driver writes to.
        check("cuDeviceGetCount", unsafe {
            sys::cuDeviceGetCount(&mut count)
        })?;
        if count <= 0 {
            return Err(driver_error(
                "cuDeviceGetCount",
                CUresult::CUDA_ERROR_NO_DEVICE,
            ));
        }
        let index = i32::try_from(ordinal)
            .ok()
            .filter(|&i| i < count)
            .ok_or_else(|| {
                PieError::backend(
                    "cuDeviceGet",
                    format!("device index {ordinal} is out of range: {count} device(s) visible"),
                )
            })?;
        let mut dev = 0;
        // SAFETY: `dev` is a live local; `index` is below the device count.
        check("cuDeviceGet", unsafe { sys::cuDeviceGet(&mut dev, index) })?;
        describe_device(dev, count)
    })
}

fn describe_device(dev: sys::CUdevice, count: i32) -> Result<String> {
    let mut name = [0 as std::os::raw::c_char; 256];
    // SAFETY: the buffer is 256 bytes long and the driver writes at most `len`
    // bytes, NUL-terminated.
    check("cuDeviceGetName", unsafe {
        sys::cuDeviceGetName(name.as_mut_ptr(), name.len() as i32, dev)
    })?;
    name[255] = 0; // in case the driver did not NUL-terminate a long name
                   // SAFETY: the buffer holds a NUL byte (at the latest its last one), so the
                   // string read stays inside it.
    let name = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    let mut total = 0usize;
    // SAFETY: `total` is a live local; `dev` came from cuDeviceGet.
    check("cuDeviceTotalMem_v2", unsafe {
        sys::cuDeviceTotalMem_v2(&mut total, dev)
    })?;
    let attr = |a: sys::CUdevice_attribute| -> Result<i32> {
        let mut v = 0;
        // SAFETY: `v` is a live local; `dev` came from cuDeviceGet.
        check("cuDeviceGetAttribute", unsafe {
            sys::cuDeviceGetAttribute(&mut v, a, dev)
        })?;
        Ok(v)
    };
    let major = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
    let minor = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
    let engines = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_ASYNC_ENGINE_COUNT)?;
    let mut version = 0;
    // SAFETY: `version` is a live local.
    check("cuDriverGetVersion", unsafe {
        sys::cuDriverGetVersion(&mut version)
    })?;
    Ok(format!(
        "{name}, {:.1} GiB, compute {major}.{minor}, {engines} copy engine(s), {count} device(s), driver API {}.{}",
        total as f64 / (1u64 << 30) as f64,
        version / 1000,
        (version % 1000) / 10
    ))
}

/// An ordering and timing marker: a `CUevent` created with timing enabled.
pub struct CudaEvent {
    event: sys::CUevent,
    ctx: Arc<Context>,
}

// SAFETY: a CUevent is a driver handle usable from any thread; the driver
// serializes operations on it.
unsafe impl Send for CudaEvent {}
// SAFETY: see `Send`; `&CudaEvent` only allows driver calls, which are thread safe.
unsafe impl Sync for CudaEvent {}

impl CudaEvent {
    /// The raw `CUevent` (a `cudaEvent_t` for the runtime API). Owned by this
    /// value: do not destroy it.
    pub fn raw(&self) -> u64 {
        self.event as u64
    }
}

impl Drop for CudaEvent {
    fn drop(&mut self) {
        let event = self.event;
        // SAFETY: the event was created by cuEventCreate and is destroyed exactly
        // once, here; the driver defers the release if a record is pending.
        self.ctx.release("cuEventDestroy_v2", || unsafe {
            sys::cuEventDestroy_v2(event)
        });
    }
}

/// The CUDA backend: the primary context of one device, two copy streams, and
/// a host clock. See the crate documentation.
pub struct CudaBackend {
    ctx: Arc<Context>,
    h2d: sys::CUstream,
    d2h: sys::CUstream,
    epoch: Instant,
    description: String,
}

// SAFETY: the streams are driver handles; enqueuing on a stream from several
// threads is thread safe in the driver (order between threads is the caller's
// business, as with any stream). The context is Send + Sync.
unsafe impl Send for CudaBackend {}
// SAFETY: see `Send`; every method only makes thread-safe driver calls.
unsafe impl Sync for CudaBackend {}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend")
            .field("device", &self.ctx.ordinal)
            .field("description", &self.description)
            .finish()
    }
}

impl CudaBackend {
    /// Opens device `device_index`: loads the driver, retains the device's
    /// primary context and creates the two non-blocking copy streams. Any
    /// failure (no driver, no device, bad index) is a [`PieError::Backend`]
    /// naming the failing driver call; never panics.
    pub fn new(device_index: usize) -> Result<Self> {
        if !culib_present() {
            return Err(PieError::backend("dlopen(libcuda)", NO_DRIVER));
        }
        guard("CudaBackend::new", || {
            let ctx = Arc::new(Context::retain_primary(device_index)?);
            let description = describe_device(ctx.device, {
                let mut c = 0;
                // SAFETY: `c` is a live local; the driver is initialized.
                check("cuDeviceGetCount", unsafe { sys::cuDeviceGetCount(&mut c) })?;
                c
            })?;
            let _bound = ctx.bind()?;
            let h2d = create_stream()?;
            let d2h = match create_stream() {
                Ok(s) => s,
                Err(e) => {
                    // SAFETY: `h2d` was just created and is not used elsewhere.
                    let _ = unsafe { sys::cuStreamDestroy_v2(h2d) };
                    return Err(e);
                }
            };
            drop(_bound);
            Ok(CudaBackend {
                ctx,
                h2d,
                d2h,
                epoch: Instant::now(),
                description,
            })
        })
    }

    /// The device index this backend was opened on.
    pub fn device_index(&self) -> usize {
        self.ctx.ordinal
    }

    /// A one-line description of the device (name, memory, compute capability,
    /// copy engines, driver API version).
    pub fn description(&self) -> &str {
        &self.description
    }

    /// The raw `CUcontext` (the device's primary context). Compare it with
    /// PyTorch's to check that both share device pointers.
    pub fn raw_context(&self) -> u64 {
        self.ctx.ctx as u64
    }

    /// The raw `CUstream` behind a [`Stream`] (for `torch.cuda.ExternalStream`
    /// or profiling). Owned by the backend (or by its foreign owner): never
    /// destroy it.
    pub fn raw_stream(&self, stream: Stream) -> u64 {
        self.stream(stream) as u64
    }

    /// Makes the backend's context current on the calling thread and leaves it
    /// current. Not needed for the backend's own calls (each binds as needed);
    /// useful before handing raw pointers to other driver-API code.
    pub fn bind_to_thread(&self) -> Result<()> {
        guard("cuCtxSetCurrent", || {
            let bound = self.ctx.bind()?;
            // Do not restore the previous context: the caller asked for ours.
            std::mem::forget(bound);
            Ok(())
        })
    }

    /// Allocates pinned host memory of the given kind. [`Backend::alloc_host`]
    /// uses [`HostMemKind::Portable`]; write-combined memory exists for
    /// measurements (see [`bench_copies_with`]).
    pub fn alloc_host_with(&self, bytes: usize, kind: HostMemKind) -> Result<HostBuffer> {
        guard("cuMemHostAlloc", || {
            HostBuffer::alloc(&self.ctx, bytes, kind)
        })
    }

    /// Takes the last error met while freeing memory, destroying an event or
    /// releasing the context in `Drop` (which cannot return errors), if any.
    pub fn take_release_error(&self) -> Option<String> {
        self.ctx
            .release_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    fn stream(&self, stream: Stream) -> sys::CUstream {
        match stream {
            Stream::H2D => self.h2d,
            Stream::D2H => self.d2h,
            Stream::Foreign(handle) => handle as usize as sys::CUstream,
        }
    }
}

fn create_stream() -> Result<sys::CUstream> {
    let mut s: sys::CUstream = std::ptr::null_mut();
    // SAFETY: `s` is a live local; the backend's context is current (the caller
    // holds a binding). The stream is destroyed in `CudaBackend::drop`.
    check("cuStreamCreate", unsafe {
        sys::cuStreamCreate(&mut s, sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32)
    })?;
    Ok(s)
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        for stream in [self.h2d, self.d2h] {
            // SAFETY: the streams were created in `new` and are destroyed once,
            // here. The driver lets pending work finish before releasing them.
            self.ctx.release("cuStreamDestroy_v2", || unsafe {
                sys::cuStreamDestroy_v2(stream)
            });
        }
    }
}

/// Memory type and pointers of one side of a 2D copy.
fn side(m: &Mem<'_, CudaBackend>) -> (sys::CUmemorytype, u64) {
    let ty = if m.is_device() {
        sys::CUmemorytype::CU_MEMORYTYPE_DEVICE
    } else {
        sys::CUmemorytype::CU_MEMORYTYPE_HOST
    };
    (ty, m.addr())
}

impl Backend for CudaBackend {
    type DeviceBuffer = DeviceBuffer;
    type HostBuffer = HostBuffer;
    type Event = CudaEvent;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn alloc_device(&self, bytes: usize) -> Result<DeviceBuffer> {
        guard("cuMemAlloc_v2", || DeviceBuffer::alloc(&self.ctx, bytes))
    }

    fn alloc_host(&self, bytes: usize) -> Result<HostBuffer> {
        self.alloc_host_with(bytes, HostMemKind::Portable)
    }

    fn new_event(&self) -> Result<CudaEvent> {
        guard("cuEventCreate", || {
            let _bound = self.ctx.bind()?;
            let mut event: sys::CUevent = std::ptr::null_mut();
            // SAFETY: `event` is a live local; our context is current. CU_EVENT_DEFAULT
            // keeps timing enabled. Destroyed in `CudaEvent::drop`.
            check("cuEventCreate", unsafe {
                sys::cuEventCreate(&mut event, sys::CUevent_flags::CU_EVENT_DEFAULT as u32)
            })?;
            Ok(CudaEvent {
                event,
                ctx: self.ctx.clone(),
            })
        })
    }

    fn copy(
        &self,
        stream: Stream,
        src: Mem<'_, Self>,
        dst: Mem<'_, Self>,
        shape: CopyShape,
    ) -> Result<()> {
        check_copy_bounds(&src, &dst, &shape)?;
        let shape = shape.normalized();
        if shape.bytes() == 0 {
            return Ok(());
        }
        let s = self.stream(stream);
        if shape.height == 1 {
            guard("cuMemcpyAsync", || {
                let _bound = self.ctx.bind()?;
                // SAFETY: check_copy_bounds proved [addr, addr + width) lies inside
                // both live buffers (device memory from cuMemAlloc or pinned host
                // memory from cuMemHostAlloc, both addressable under unified
                // addressing). The buffers are borrowed for this call only: keeping
                // them alive until the copy completes is the engine's contract
                // (it synchronizes on an event before freeing or reusing).
                check("cuMemcpyAsync", unsafe {
                    sys::cuMemcpyAsync(dst.addr(), src.addr(), shape.width, s)
                })
            })
        } else {
            let (src_ty, src_addr) = side(&src);
            let (dst_ty, dst_addr) = side(&dst);
            let host = sys::CUmemorytype::CU_MEMORYTYPE_HOST;
            let p = sys::CUDA_MEMCPY2D {
                srcXInBytes: 0,
                srcY: 0,
                srcMemoryType: src_ty,
                srcHost: if src_ty == host {
                    src_addr as usize as *const _
                } else {
                    std::ptr::null()
                },
                srcDevice: if src_ty == host { 0 } else { src_addr },
                srcArray: std::ptr::null_mut(),
                srcPitch: shape.src_pitch,
                dstXInBytes: 0,
                dstY: 0,
                dstMemoryType: dst_ty,
                dstHost: if dst_ty == host {
                    dst_addr as usize as *mut _
                } else {
                    std::ptr::null_mut()
                },
                dstDevice: if dst_ty == host { 0 } else { dst_addr },
                dstArray: std::ptr::null_mut(),
                dstPitch: shape.dst_pitch,
                WidthInBytes: shape.width,
                Height: shape.height,
            };
            guard("cuMemcpy2DAsync_v2", || {
                let _bound = self.ctx.bind()?;
                // SAFETY: `p` is a fully initialized descriptor read during the
                // call; check_copy_bounds proved every row of both sides lies in its
                // live buffer, whose memory type matches the descriptor. Lifetime
                // of the buffers until completion: as for the contiguous copy.
                check("cuMemcpy2DAsync_v2", unsafe {
                    sys::cuMemcpy2DAsync_v2(&p, s)
                })
            })
        }
    }

    fn record(&self, event: &CudaEvent, stream: Stream) -> Result<()> {
        let s = self.stream(stream);
        guard("cuEventRecord", || {
            let _bound = self.ctx.bind()?;
            // SAFETY: the event is alive (borrowed) and was created in our context;
            // the stream is ours or a live foreign stream of this device (caller's
            // contract for Stream::Foreign).
            check("cuEventRecord", unsafe {
                sys::cuEventRecord(event.event, s)
            })
        })
    }

    fn wait(&self, stream: Stream, event: &CudaEvent) -> Result<()> {
        let s = self.stream(stream);
        guard("cuStreamWaitEvent", || {
            let _bound = self.ctx.bind()?;
            // SAFETY: as for `record`; flags must be 0.
            check("cuStreamWaitEvent", unsafe {
                sys::cuStreamWaitEvent(s, event.event, 0)
            })
        })
    }

    fn query(&self, event: &CudaEvent) -> Result<bool> {
        guard("cuEventQuery", || {
            let _bound = self.ctx.bind()?;
            // SAFETY: the event is alive (borrowed) and belongs to our context.
            match unsafe { sys::cuEventQuery(event.event) } {
                CUresult::CUDA_SUCCESS => Ok(true),
                CUresult::CUDA_ERROR_NOT_READY => Ok(false),
                e => Err(driver_error("cuEventQuery", e)),
            }
        })
    }

    fn synchronize(&self, event: &CudaEvent) -> Result<()> {
        guard("cuEventSynchronize", || {
            let _bound = self.ctx.bind()?;
            // SAFETY: the event is alive (borrowed) and belongs to our context.
            check("cuEventSynchronize", unsafe {
                sys::cuEventSynchronize(event.event)
            })
        })
    }

    fn elapsed(&self, start: &CudaEvent, end: &CudaEvent) -> Result<f64> {
        guard("cuEventElapsedTime", || {
            let _bound = self.ctx.bind()?;
            let mut ms = 0f32;
            // SAFETY: `ms` is a live local; both events are alive and were created
            // with timing enabled. (cuEventElapsedTime rather than _v2: it exists in
            // every driver, including those older than CUDA 12.8.)
            check("cuEventElapsedTime", unsafe {
                sys::cuEventElapsedTime(&mut ms, start.event, end.event)
            })?;
            Ok(f64::from(ms) / 1e3)
        })
    }

    fn synchronize_queues(&self) -> Result<()> {
        guard("cuStreamSynchronize", || {
            let _bound = self.ctx.bind()?;
            for s in [self.h2d, self.d2h] {
                // SAFETY: both streams are owned by `self` and alive.
                check("cuStreamSynchronize", unsafe {
                    sys::cuStreamSynchronize(s)
                })?;
            }
            Ok(())
        })
    }

    fn now(&self) -> f64 {
        self.epoch.elapsed().as_secs_f64()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_call_and_say_what_to_change() {
        let e = PieError::backend("x", "y");
        assert!(matches!(e, PieError::Backend { .. }));
        if !culib_present() {
            let err = CudaBackend::new(0).unwrap_err();
            match err {
                PieError::Backend { call, message } => {
                    assert_eq!(call, "dlopen(libcuda)");
                    assert!(message.contains("LD_LIBRARY_PATH"));
                }
                other => panic!("unexpected error {other:?}"),
            }
        }
    }

    #[test]
    fn guard_turns_panics_into_errors() {
        let r: Result<()> = guard("cuFoo", || panic!("Missing symbol cuFoo"));
        match r {
            Err(PieError::Backend { call, message }) => {
                assert_eq!(call, "cuFoo");
                assert!(message.contains("Missing symbol cuFoo"));
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
