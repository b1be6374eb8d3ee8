//! The thin layer over the CUDA driver API: error mapping, panic containment,
//! the retained primary context and its binding to the calling thread.

use std::ffi::CStr;
use std::os::raw::c_char;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Mutex;

use cudarc::driver::sys::{self, CUresult};
use pie_core::{PieError, Result};

/// What to change, for the driver errors a user can do something about.
fn hint(code: CUresult) -> &'static str {
    use CUresult::*;
    match code {
        CUDA_ERROR_NO_DEVICE => {
            "no CUDA device is visible: check `nvidia-smi` and CUDA_VISIBLE_DEVICES"
        }
        CUDA_ERROR_INVALID_DEVICE => {
            "the device index is out of range: use an index below the device count (see `nvidia-smi`)"
        }
        CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE | CUDA_ERROR_NOT_SUPPORTED => {
            "the driver or device does not support this: update the NVIDIA driver"
        }
        CUDA_ERROR_INVALID_CONTEXT | CUDA_ERROR_CONTEXT_IS_DESTROYED => {
            "the device's primary context was reset or destroyed (e.g. by torch.cuda or cudaDeviceReset): create a new backend"
        }
        CUDA_ERROR_STUB_LIBRARY => {
            "the CUDA toolkit's stub libcuda was loaded instead of the driver's: put the directory of the driver's libcuda.so.1 first in LD_LIBRARY_PATH"
        }
        CUDA_ERROR_NOT_INITIALIZED | CUDA_ERROR_DEINITIALIZED => {
            "the CUDA driver is not initialized or is shutting down: create the backend before use and keep it alive while copies run"
        }
        CUDA_ERROR_OUT_OF_MEMORY => {
            "not enough memory: lower the GPU budget or the host pool size (pinned host memory is also limited by `ulimit -l` and by the RAM free)"
        }
        CUDA_ERROR_INVALID_HANDLE => {
            "a stream or event handle is invalid: an event must be recorded before timing it, and a foreign stream must be alive and belong to this device"
        }
        CUDA_ERROR_NOT_READY => "the work is not complete yet: synchronize on the event first",
        CUDA_ERROR_INVALID_VALUE => {
            "an argument is invalid: e.g. a row pitch above the device's maximum pitch, or a foreign stream of another device"
        }
        CUDA_ERROR_ILLEGAL_ADDRESS | CUDA_ERROR_LAUNCH_FAILED | CUDA_ERROR_ECC_UNCORRECTABLE
        | CUDA_ERROR_HARDWARE_STACK_ERROR | CUDA_ERROR_ILLEGAL_INSTRUCTION => {
            "the CUDA context is corrupted by an earlier fault: restart the process"
        }
        CUDA_ERROR_SYSTEM_DRIVER_MISMATCH => {
            "the kernel module and the user-mode driver versions differ: reboot or reinstall the driver"
        }
        _ => "see the CUDA driver API documentation for this error",
    }
}

/// The symbolic name and description of a driver error.
fn describe(code: CUresult) -> String {
    let mut name: *const c_char = std::ptr::null();
    let mut text: *const c_char = std::ptr::null();
    // SAFETY: both out-pointers point to live locals; the driver writes a pointer
    // to a static NUL-terminated string or leaves them untouched on failure.
    let (rn, rs) = unsafe {
        (
            sys::cuGetErrorName(code, &mut name),
            sys::cuGetErrorString(code, &mut text),
        )
    };
    let read = |ok: CUresult, p: *const c_char| {
        if ok == CUresult::CUDA_SUCCESS && !p.is_null() {
            // SAFETY: on success the driver returned a pointer to a static,
            // NUL-terminated string that lives as long as the loaded library.
            Some(unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
        } else {
            None
        }
    };
    let name = read(rn, name).unwrap_or_else(|| format!("{code:?}"));
    match read(rs, text) {
        Some(text) => format!("{name} ({text})"),
        None => name,
    }
}

/// The [`PieError::Backend`] for a failed driver call.
pub(crate) fn driver_error(call: &str, code: CUresult) -> PieError {
    // Describing an error calls into the driver again: contain a panic there too.
    let what = catch_unwind(|| describe(code)).unwrap_or_else(|_| format!("{code:?}"));
    PieError::backend(call, format!("{what}: {}", hint(code)))
}

/// Turns a driver status into a `Result`, naming the call on failure.
pub(crate) fn check(call: &str, code: CUresult) -> Result<()> {
    if code == CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(driver_error(call, code))
    }
}

/// Runs `f`, turning a panic (cudarc's lazy loader panics when libcuda or one of
/// its symbols is missing) into a [`PieError::Backend`] naming `call`.
pub(crate) fn guard<T>(call: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied())
                .unwrap_or("unknown panic");
            Err(PieError::backend(
                call,
                format!(
                    "the CUDA driver library failed while loading ({msg}): install an NVIDIA driver that provides libcuda.so.1 for this GPU"
                ),
            ))
        }
    }
}

/// The retained primary context of one device. Everything allocated or created
/// by the backend holds an `Arc` of it, so it outlives them all.
pub(crate) struct Context {
    pub(crate) device: sys::CUdevice,
    pub(crate) ctx: sys::CUcontext,
    pub(crate) ordinal: usize,
    /// The last error met while releasing a resource in `Drop` (which cannot return it).
    pub(crate) release_error: Mutex<Option<String>>,
}

// SAFETY: a CUcontext and a CUdevice are plain handles that the CUDA driver lets
// any thread use (a context may be current on several threads at once); the only
// interior mutability is behind a Mutex.
unsafe impl Send for Context {}
// SAFETY: see `Send`: driver calls on a context are thread safe.
unsafe impl Sync for Context {}

impl Context {
    /// Initializes the driver and retains `ordinal`'s primary context (the one
    /// the CUDA runtime, hence PyTorch, uses), so device pointers are shared with
    /// PyTorch. Must be called inside [`guard`] after libcuda was found.
    pub(crate) fn retain_primary(ordinal: usize) -> Result<Context> {
        // SAFETY: cuInit takes flags (must be 0) and is idempotent and thread safe.
        check("cuInit", unsafe { sys::cuInit(0) })?;
        let mut count = 0;
        // SAFETY: `count` is a live local the driver writes the device count to.
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
                    format!(
                        "device index {ordinal} is out of range: {count} CUDA device(s) visible; use an index below {count} or change CUDA_VISIBLE_DEVICES"
                    ),
                )
            })?;
        let mut device: sys::CUdevice = 0;
        // SAFETY: `device` is a live local; `index` was checked against the count.
        check("cuDeviceGet", unsafe {
            sys::cuDeviceGet(&mut device, index)
        })?;
        let mut ctx: sys::CUcontext = std::ptr::null_mut();
        // SAFETY: `device` came from cuDeviceGet; `ctx` is a live local. The retain
        // is balanced by cuDevicePrimaryCtxRelease_v2 in `Drop`.
        check("cuDevicePrimaryCtxRetain", unsafe {
            sys::cuDevicePrimaryCtxRetain(&mut ctx, device)
        })?;
        Ok(Context {
            device,
            ctx,
            ordinal,
            release_error: Mutex::new(None),
        })
    }

    /// Makes this context current on the calling thread for the life of the
    /// returned guard. If another context was current (say PyTorch's on another
    /// device), it is restored when the guard drops; if none was, ours stays
    /// current, so a dedicated thread (the swapper) pays for binding only once.
    pub(crate) fn bind(&self) -> Result<Bound<'_>> {
        let mut current: sys::CUcontext = std::ptr::null_mut();
        // SAFETY: `current` is a live local the driver writes the current context to.
        check("cuCtxGetCurrent", unsafe {
            sys::cuCtxGetCurrent(&mut current)
        })?;
        if current == self.ctx {
            return Ok(Bound {
                restore: None,
                _thread: std::marker::PhantomData,
            });
        }
        // SAFETY: `self.ctx` is a primary context retained by `self`, alive until
        // `self` drops, and the guard borrows `self`.
        check("cuCtxSetCurrent", unsafe { sys::cuCtxSetCurrent(self.ctx) })?;
        Ok(Bound {
            restore: (!current.is_null()).then_some(current),
            _thread: std::marker::PhantomData,
        })
    }

    /// Remembers an error met in `Drop` for [`crate::CudaBackend::take_release_error`].
    pub(crate) fn record_release_error(&self, err: PieError) {
        let mut slot = self.release_error.lock().unwrap_or_else(|p| p.into_inner());
        *slot = Some(err.to_string());
    }

    /// Runs a release call from a `Drop` impl: binds, calls, records any failure.
    pub(crate) fn release(&self, call: &str, f: impl FnOnce() -> CUresult) {
        let r = guard(call, || {
            let _bound = self.bind()?;
            check(call, f())
        });
        if let Err(e) = r {
            self.record_release_error(e);
        }
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        let device = self.device;
        let r = guard("cuDevicePrimaryCtxRelease_v2", || {
            // SAFETY: balances the retain in `retain_primary`; every resource made
            // in this context holds an Arc of `self`, so none is left.
            check("cuDevicePrimaryCtxRelease_v2", unsafe {
                sys::cuDevicePrimaryCtxRelease_v2(device)
            })
        });
        // Nothing can observe the error any more; it is deliberately ignored.
        let _ = r;
    }
}

/// A binding of a context to the calling thread (see [`Context::bind`]).
pub(crate) struct Bound<'a> {
    restore: Option<sys::CUcontext>,
    // Not Send: the binding is per thread.
    _thread: std::marker::PhantomData<(&'a (), *const ())>,
}

impl Drop for Bound<'_> {
    fn drop(&mut self) {
        if let Some(prev) = self.restore {
            // SAFETY: `prev` was current on this thread when the guard was made,
            // so its owner (e.g. PyTorch) keeps it alive; errors cannot be
            // reported from Drop and a failure leaves our (valid) context current.
            let _ = catch_unwind(|| unsafe { sys::cuCtxSetCurrent(prev) });
        }
    }
}
