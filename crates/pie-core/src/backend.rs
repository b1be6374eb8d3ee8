//! The one seam to hardware.
//!
//! A backend owns two kinds of memory (a device arena and a pinned host arena),
//! two copy queues (host-to-device and device-to-host), and events that order
//! work between those queues and *foreign* streams (the compute stream of the
//! framework that runs the model, e.g. PyTorch's current CUDA stream).
//!
//! Semantics follow CUDA's, so that the engine is written once:
//! * commands on one [`Stream`] run in the order they were enqueued;
//! * [`Backend::record`] captures "everything enqueued on this stream so far";
//! * [`Backend::wait`] makes a stream wait (without blocking the host) for the
//!   most recent record of an event made *before* the wait was enqueued. Waiting
//!   on an event that was never recorded does not wait at all, so the engine
//!   must only wait on events it knows were recorded;
//! * [`Backend::synchronize`] blocks the calling host thread.

use crate::error::Result;

/// A queue of commands. Copy queues belong to the backend; foreign streams
/// belong to the framework that runs the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stream {
    /// The host-to-device copy queue (prefetches).
    H2D,
    /// The device-to-host copy queue (write-backs).
    D2H,
    /// A stream the engine does not own, as a raw handle (a `CUstream` on CUDA;
    /// `0` is the legacy default stream). On the host backend the caller's own
    /// thread is the compute stream, whatever the handle.
    Foreign(u64),
}

/// Memory owned by a backend: a contiguous range of bytes with a stable address.
pub trait Buffer: Send + Sync {
    /// Length in bytes.
    fn len(&self) -> usize;
    /// Whether the buffer has zero length.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The address of the first byte: a device pointer for device memory, a
    /// host pointer for host memory. Stable for the life of the buffer.
    fn addr(&self) -> u64;
}

/// One side of a copy: a buffer and a byte offset into it.
pub enum Mem<'a, B: Backend + ?Sized> {
    /// Device memory.
    Device(&'a B::DeviceBuffer, usize),
    /// Pinned host memory.
    Host(&'a B::HostBuffer, usize),
}

impl<B: Backend + ?Sized> Mem<'_, B> {
    /// Byte offset into the buffer.
    pub fn offset(&self) -> usize {
        match self {
            Mem::Device(_, o) | Mem::Host(_, o) => *o,
        }
    }

    /// Length of the underlying buffer.
    pub fn buffer_len(&self) -> usize {
        match self {
            Mem::Device(b, _) => b.len(),
            Mem::Host(b, _) => b.len(),
        }
    }

    /// Absolute address of the first byte of this side of the copy.
    pub fn addr(&self) -> u64 {
        match self {
            Mem::Device(b, o) => b.addr() + *o as u64,
            Mem::Host(b, o) => b.addr() + *o as u64,
        }
    }

    /// Whether this side is device memory.
    pub fn is_device(&self) -> bool {
        matches!(self, Mem::Device(..))
    }
}

/// The shape of a (possibly strided) 2D copy: `height` rows of `width` bytes,
/// rows `src_pitch` bytes apart in the source and `dst_pitch` apart in the
/// destination. A contiguous copy is one row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CopyShape {
    /// Bytes per row.
    pub width: usize,
    /// Number of rows.
    pub height: usize,
    /// Distance between row starts in the source, in bytes (`>= width`).
    pub src_pitch: usize,
    /// Distance between row starts in the destination, in bytes (`>= width`).
    pub dst_pitch: usize,
}

impl CopyShape {
    /// A contiguous copy of `bytes` bytes.
    pub fn contiguous(bytes: usize) -> Self {
        CopyShape {
            width: bytes,
            height: 1,
            src_pitch: bytes,
            dst_pitch: bytes,
        }
    }

    /// Total bytes moved.
    pub fn bytes(&self) -> usize {
        self.width * self.height
    }

    /// The same copy with rows merged into one when both sides are dense
    /// (`width == pitch`), so backends issue one large copy instead of many rows.
    pub fn normalized(self) -> Self {
        if self.height > 1 && self.width == self.src_pitch && self.width == self.dst_pitch {
            CopyShape::contiguous(self.width * self.height)
        } else {
            self
        }
    }

    /// Bytes spanned in the source (from the first byte of row 0 to the last byte of the last row).
    pub fn src_span(&self) -> usize {
        if self.height == 0 || self.width == 0 {
            0
        } else {
            (self.height - 1) * self.src_pitch + self.width
        }
    }

    /// Bytes spanned in the destination.
    pub fn dst_span(&self) -> usize {
        if self.height == 0 || self.width == 0 {
            0
        } else {
            (self.height - 1) * self.dst_pitch + self.width
        }
    }
}

/// Checks that a copy stays inside both buffers; every backend calls this
/// before touching memory, so an engine bug becomes an [`ErrorKind::Internal`]
/// error, not corruption.
///
/// [`ErrorKind::Internal`]: crate::ErrorKind::Internal
pub fn check_copy_bounds<B: Backend + ?Sized>(
    src: &Mem<'_, B>,
    dst: &Mem<'_, B>,
    shape: &CopyShape,
) -> Result<()> {
    let fits = |m: &Mem<'_, B>, span: usize| {
        m.offset()
            .checked_add(span)
            .is_some_and(|end| end <= m.buffer_len())
    };
    if (shape.height > 1 && (shape.src_pitch < shape.width || shape.dst_pitch < shape.width))
        || !fits(src, shape.src_span())
        || !fits(dst, shape.dst_span())
    {
        return Err(crate::PieError::internal(format!(
            "copy of {} rows x {} bytes (pitches {}/{}) at offsets {}/{} does not fit buffers of {}/{} bytes",
            shape.height,
            shape.width,
            shape.src_pitch,
            shape.dst_pitch,
            src.offset(),
            dst.offset(),
            src.buffer_len(),
            dst.buffer_len()
        )));
    }
    Ok(())
}

/// The hardware seam: memory, copy queues, events and a clock.
///
/// Implementations: `pie_cuda::CudaBackend` (cudarc), `pie_host::HostBackend`
/// (threads doing real memcpy) and [`crate::sim::SimBackend`] (virtual time).
pub trait Backend: Send + Sync + 'static {
    /// Device memory.
    type DeviceBuffer: Buffer + 'static;
    /// Pinned (page-locked) host memory.
    type HostBuffer: Buffer + 'static;
    /// An ordering and timing marker.
    type Event: Send + Sync + 'static;

    /// A short name for messages and stats ("cuda", "host", "sim").
    fn name(&self) -> &'static str;

    /// Allocates `bytes` of device memory (one allocation, carved by the engine).
    fn alloc_device(&self, bytes: usize) -> Result<Self::DeviceBuffer>;

    /// Allocates `bytes` of pinned host memory usable by both copy directions.
    fn alloc_host(&self, bytes: usize) -> Result<Self::HostBuffer>;

    /// Creates an event that can time work (elapsed between two events).
    fn new_event(&self) -> Result<Self::Event>;

    /// Enqueues an asynchronous copy on `stream`. Either side may be device or
    /// host memory. Bounds are checked; the call returns once the copy is queued.
    fn copy(
        &self,
        stream: Stream,
        src: Mem<'_, Self>,
        dst: Mem<'_, Self>,
        shape: CopyShape,
    ) -> Result<()>;

    /// Records `event` on `stream`: it completes when all work enqueued on the
    /// stream before this call completes.
    fn record(&self, event: &Self::Event, stream: Stream) -> Result<()>;

    /// Makes `stream` wait for the last record of `event` without blocking the host.
    fn wait(&self, stream: Stream, event: &Self::Event) -> Result<()>;

    /// Whether the last record of `event` has completed (true if never recorded).
    fn query(&self, event: &Self::Event) -> Result<bool>;

    /// Blocks the calling thread until the last record of `event` completes.
    fn synchronize(&self, event: &Self::Event) -> Result<()>;

    /// Seconds between the completion of two recorded, completed events.
    fn elapsed(&self, start: &Self::Event, end: &Self::Event) -> Result<f64>;

    /// Blocks until everything enqueued on the backend's own copy queues completed.
    fn synchronize_queues(&self) -> Result<()>;

    /// A monotonic clock in seconds (virtual time on the sim backend).
    fn now(&self) -> f64;

    /// Waits (bounded) until no copy is running on the backend's queues and
    /// says whether that happened, even if some copy failed: the engine frees
    /// its buffers only then.
    fn wait_idle(&self) -> bool {
        self.synchronize_queues().is_ok()
    }
}
