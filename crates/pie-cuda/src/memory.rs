//! Device memory (one `cuMemAlloc` allocation) and pinned host memory
//! (`cuMemHostAlloc`).

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::sys;
use pie_core::{Buffer, Result};

use crate::driver::{check, Context};

/// Device memory: one `cuMemAlloc` allocation in the primary context, freed
/// on drop. A zero-length buffer allocates nothing and has address 0.
pub struct DeviceBuffer {
    ptr: sys::CUdeviceptr,
    len: usize,
    ctx: Arc<Context>,
}

impl DeviceBuffer {
    pub(crate) fn alloc(ctx: &Arc<Context>, bytes: usize) -> Result<Self> {
        let mut ptr: sys::CUdeviceptr = 0;
        if bytes > 0 {
            let _bound = ctx.bind()?;
            // SAFETY: `ptr` is a live local; our context is current. Freed once in `Drop`.
            check("cuMemAlloc_v2", unsafe {
                sys::cuMemAlloc_v2(&mut ptr, bytes)
            })?;
        }
        Ok(DeviceBuffer {
            ptr,
            len: bytes,
            ctx: ctx.clone(),
        })
    }
}

impl Buffer for DeviceBuffer {
    fn len(&self) -> usize {
        self.len
    }

    /// The `CUdeviceptr` of the first byte.
    fn addr(&self) -> u64 {
        self.ptr
    }
}

impl std::fmt::Debug for DeviceBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceBuffer({:#x}, {} bytes)", self.ptr, self.len)
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        if self.ptr != 0 {
            let ptr = self.ptr;
            // SAFETY: `ptr` came from cuMemAlloc_v2 and is freed exactly once, here.
            // No copy may still use it: the engine drops arenas only after
            // synchronizing its queues (and the driver's free also waits for the
            // device to be idle in practice).
            self.ctx
                .release("cuMemFree_v2", || unsafe { sys::cuMemFree_v2(ptr) });
        }
    }
}

/// How pinned host memory is allocated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HostMemKind {
    /// `CU_MEMHOSTALLOC_PORTABLE`: cached, page-locked, usable from every
    /// context. Fast for both DMA directions and for the CPU to read. The
    /// default, and what [`pie_core::Backend::alloc_host`] uses, because the
    /// pool is both written back to (D2H) and read from (H2D), and the engine or
    /// Python may read it on the CPU. Measured on an H200 (PCIe Gen5, driver
    /// 580) with `bench_copies_with`, 64 MiB copies: portable 55.2 GB/s H2D,
    /// 55.1 GB/s D2H, 100 GB/s both at once; write-combined 55.1 / 55.0 / 100:
    /// no DMA gain, so write-combining's slow CPU reads buy nothing.
    Portable,
    /// `CU_MEMHOSTALLOC_PORTABLE | CU_MEMHOSTALLOC_WRITECOMBINED`: uncached for
    /// the CPU; CPU reads are very slow and it brings nothing to D2H. Only for
    /// measuring (see [`crate::bench_copies_with`]).
    WriteCombined,
}

impl HostMemKind {
    fn flags(self) -> u32 {
        match self {
            HostMemKind::Portable => sys::CU_MEMHOSTALLOC_PORTABLE,
            HostMemKind::WriteCombined => {
                sys::CU_MEMHOSTALLOC_PORTABLE | sys::CU_MEMHOSTALLOC_WRITECOMBINED
            }
        }
    }
}

/// Pinned (page-locked) host memory from `cuMemHostAlloc`, freed on drop. A
/// zero-length buffer allocates nothing and has address 0.
pub struct HostBuffer {
    ptr: *mut c_void,
    len: usize,
    kind: HostMemKind,
    ctx: Arc<Context>,
}

// SAFETY: the buffer owns its allocation; the raw pointer is only an address.
// Access to the bytes goes through `unsafe` accessors whose callers must rule out
// races (with each other and with DMA in flight).
unsafe impl Send for HostBuffer {}
// SAFETY: see `Send`: `&HostBuffer` exposes no safe access to the bytes.
unsafe impl Sync for HostBuffer {}

impl HostBuffer {
    pub(crate) fn alloc(ctx: &Arc<Context>, bytes: usize, kind: HostMemKind) -> Result<Self> {
        let mut ptr: *mut c_void = std::ptr::null_mut();
        if bytes > 0 {
            let _bound = ctx.bind()?;
            // SAFETY: `ptr` is a live local; our context is current. Freed once
            // in `Drop` with cuMemFreeHost.
            check("cuMemHostAlloc", unsafe {
                sys::cuMemHostAlloc(&mut ptr, bytes, kind.flags())
            })?;
        }
        Ok(HostBuffer {
            ptr,
            len: bytes,
            kind,
            ctx: ctx.clone(),
        })
    }

    /// How the memory was allocated.
    pub fn kind(&self) -> HostMemKind {
        self.kind
    }

    /// A raw pointer to the first byte (null for a zero-length buffer).
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.cast()
    }

    /// The bytes, for reading on the CPU.
    ///
    /// # Safety
    /// No copy writing into this buffer may be in flight (synchronize on its
    /// event first), and no one may write it through a raw pointer meanwhile.
    pub unsafe fn as_slice(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: `ptr` points to `len` bytes we own for the life of `self`;
        // the caller rules out concurrent writes.
        unsafe { std::slice::from_raw_parts(self.ptr.cast::<u8>(), self.len) }
    }

    /// The bytes, for writing on the CPU.
    ///
    /// # Safety
    /// No copy reading or writing this buffer may be in flight (synchronize
    /// on its event first).
    pub unsafe fn as_mut_slice(&mut self) -> &mut [u8] {
        if self.len == 0 {
            return &mut [];
        }
        // SAFETY: `ptr` points to `len` bytes we own; `&mut self` excludes other
        // CPU access, the caller rules out DMA in flight.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.cast::<u8>(), self.len) }
    }
}

impl Buffer for HostBuffer {
    fn len(&self) -> usize {
        self.len
    }

    /// The host address of the first byte.
    fn addr(&self) -> u64 {
        self.ptr as u64
    }
}

impl std::fmt::Debug for HostBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "HostBuffer({:p}, {} bytes, {:?})",
            self.ptr, self.len, self.kind
        )
    }
}

impl Drop for HostBuffer {
    fn drop(&mut self) {
        if !self.ptr.is_null() {
            let ptr = self.ptr;
            // SAFETY: `ptr` came from cuMemHostAlloc and is freed exactly once, here;
            // as for device memory, no copy may still use it.
            self.ctx
                .release("cuMemFreeHost", || unsafe { sys::cuMemFreeHost(ptr) });
        }
    }
}
