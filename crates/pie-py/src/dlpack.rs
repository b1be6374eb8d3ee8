//! Zero-copy export of engine memory through DLPack (`__dlpack__`,
//! `__dlpack_device__`), with versioned capsules and the legacy fallback, on
//! top of dlpark's producer helpers. A [`Region`] is a byte range exported as
//! a 1-D `uint8` tensor; Python views it as K/V tensors with `.view(dtype)`.

use dlpark::ffi::{DLDataType, DLDevice, DLManagedTensor, DLManagedTensorVersioned};
use dlpark::metadata::Fixed;
use dlpark::python::{export_dlpack, CudaStreamRequest, DlpackExporter, ExportRequest};
use dlpark::{DlpackFlags, Managed, ManagedTensorBase};
use pyo3::exceptions::PyBufferError;
use pyo3::prelude::*;
use std::any::Any;
use std::sync::Arc;

/// Makes a consumer stream (a raw `CUstream`) wait for the engine's pending copies.
pub type StreamSync = Arc<dyn Fn(u64) -> pie_core::Result<()> + Send + Sync>;

/// A byte range of engine memory, exported zero-copy through DLPack.
#[pyclass(frozen, module = "pie_rs._core")]
pub struct Region {
    addr: u64,
    nbytes: usize,
    device: DLDevice,
    /// Keeps the arena alive while any exported tensor exists.
    keepalive: Arc<dyn Any + Send + Sync>,
    sync: Option<StreamSync>,
}

impl Region {
    /// A region over `nbytes` at `addr`, kept alive by `keepalive`. `cuda`
    /// gives the device index for device memory (None: host memory).
    pub fn new(
        addr: u64,
        nbytes: usize,
        cuda: Option<i32>,
        keepalive: Arc<dyn Any + Send + Sync>,
        sync: Option<StreamSync>,
    ) -> Self {
        Region {
            addr,
            nbytes,
            device: cuda.map_or(DLDevice::CPU, DLDevice::cuda),
            keepalive,
            sync,
        }
    }

    fn managed<M: ManagedTensorBase>(&self) -> PyResult<Managed<M>> {
        let prepared = Fixed::new([self.nbytes as i64], [1i64])
            .prepare_as::<M>()
            .map_err(|e| PyBufferError::new_err(format!("DLPack export failed: {e}")))?;
        let mut init = prepared.initialize(Box::new(self.keepalive.clone()));
        init.set_data(self.addr as *mut std::ffi::c_void);
        init.set_dtype(DLDataType::of::<u8>());
        init.set_device(self.device);
        // SAFETY: data points at `nbytes` bytes of engine memory that the
        // keepalive (the arena's Arc, the capsule's context) keeps allocated
        // for as long as the consumer holds the tensor; shape and strides
        // describe exactly that range.
        Ok(unsafe { init.finish() })
    }
}

impl DlpackExporter for Region {
    fn device(&self) -> DLDevice {
        self.device
    }

    fn flags(&self) -> DlpackFlags {
        DlpackFlags::empty()
    }

    fn prepare_export(&self, _py: Python<'_>, request: &ExportRequest<'_>) -> PyResult<()> {
        if self.device == DLDevice::CPU {
            return Ok(());
        }
        // The protocol: the producer makes the consumer's stream wait for its
        // pending work; it does not block the host.
        let handle = match request.cuda_stream()? {
            CudaStreamRequest::NoSync => return Ok(()),
            CudaStreamRequest::Omitted | CudaStreamRequest::LegacyDefault => 1,
            CudaStreamRequest::PerThreadDefault => 2,
            CudaStreamRequest::Pointer(p) => p as u64,
        };
        if let Some(sync) = &self.sync {
            sync(handle).map_err(crate::errors::to_py)?;
        }
        Ok(())
    }

    fn export_legacy(&self, _py: Python<'_>) -> PyResult<Managed<DLManagedTensor>> {
        self.managed()
    }

    fn export_versioned(&self, _py: Python<'_>) -> PyResult<Managed<DLManagedTensorVersioned>> {
        self.managed()
    }
}

#[pymethods]
impl Region {
    /// Address of the first byte.
    #[getter]
    fn addr(&self) -> u64 {
        self.addr
    }

    /// Length in bytes.
    #[getter]
    fn nbytes(&self) -> usize {
        self.nbytes
    }

    #[pyo3(signature = (*, stream=None, max_version=None, dl_device=None, copy=None))]
    fn __dlpack__<'py>(
        &self,
        py: Python<'py>,
        stream: Option<&Bound<'py, PyAny>>,
        max_version: Option<(u32, u32)>,
        dl_device: Option<(u32, i32)>,
        copy: Option<bool>,
    ) -> PyResult<Py<PyAny>> {
        let request = ExportRequest::parse(stream, max_version, dl_device, copy)?;
        export_dlpack(self, py, request)
    }

    fn __dlpack_device__(&self) -> (u32, i32) {
        (self.device.device_type.0, self.device.device_id)
    }

    fn __repr__(&self) -> String {
        format!(
            "Region(addr=0x{:x}, nbytes={}, device={:?})",
            self.addr, self.nbytes, self.device.device_type
        )
    }
}
