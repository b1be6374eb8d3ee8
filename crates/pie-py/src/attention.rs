//! `_core.host_attention`: the host decode-attention kernel
//! (`pie_host::attention`) on CPU tensors shared zero-copy through DLPack
//! (torch tensors, numpy arrays, engine `Region`s). The GIL is released
//! while the kernel runs. See `_core.pyi` for the contract;
//! `pie_rs.host_attention` wraps it (allocates the outputs, merges partials).

use crate::errors::{config_error, to_py};
use dlpark::ffi::{DLDataTypeCode, DLDeviceType};
use dlpark::python::{from_dlpack, ImportedDlpack};
use dlpark::DlpackFlags;
use pie_core::policy::{exchange_bytes, HostAttention as HostAttentionChoice, HostModel};
use pie_core::profiles::CPU_ATTENTION_GBPS_PER_CORE;
use pie_core::LayerSpec;
use pie_host::attention::{
    bf16, f16, layer_kv, AttentionOptions, DType, Element, HostAttention, Mask, View4,
};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::sync::{Arc, Mutex, OnceLock};

/// Element types the binding reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    F32,
    F16,
    BF16,
    /// bool or uint8 (a boolean mask).
    Byte,
}

impl Kind {
    fn size(self) -> usize {
        match self {
            Kind::F32 => 4,
            Kind::F16 | Kind::BF16 => 2,
            Kind::Byte => 1,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Kind::F32 => "float32",
            Kind::F16 => "float16",
            Kind::BF16 => "bfloat16",
            Kind::Byte => "bool/uint8",
        }
    }
}

/// A CPU tensor imported through DLPack. Contract: `ptr` points at the
/// element `[0, .., 0]` of memory the producer keeps alive while `_owner`
/// exists, and every element `sum(i_d * strides[d])` for `i_d < shape[d]`
/// lies inside that allocation (the DLPack producer's guarantee).
struct Imported {
    _owner: ImportedDlpack,
    what: &'static str,
    ptr: *mut u8,
    kind: Kind,
    shape: Vec<usize>,
    strides: Vec<usize>,
    /// Elements from `ptr` to one past the last addressed.
    span: usize,
    read_only: bool,
}

impl Imported {
    fn new(obj: &Bound<'_, PyAny>, what: &'static str) -> PyResult<Self> {
        let owner = from_dlpack(obj.as_borrowed(), None, None).map_err(|e| {
            config_error(format!(
                "{what}: cannot read it through DLPack ({e}); pass a CPU torch tensor"
            ))
        })?;
        let read_only = owner.flags().contains(DlpackFlags::READ_ONLY);
        let t = owner
            .validate()
            .map_err(|e| config_error(format!("{what}: invalid DLPack tensor: {e}")))?;
        let dev = t.device().device_type;
        if dev != DLDeviceType::CPU && dev != DLDeviceType::CUDAHOST {
            return Err(config_error(format!(
                "{what} is not in host memory (DLPack device type {}); host attention reads CPU tensors",
                dev.0
            )));
        }
        let dt = t.dtype();
        let kind = match (dt.code, dt.bits, dt.lanes) {
            (DLDataTypeCode::FLOAT, 32, 1) => Kind::F32,
            (DLDataTypeCode::FLOAT, 16, 1) => Kind::F16,
            (DLDataTypeCode::BFLOAT, 16, 1) => Kind::BF16,
            (DLDataTypeCode::BOOL, 8, 1) | (DLDataTypeCode::UINT, 8, 1) => Kind::Byte,
            _ => {
                return Err(config_error(format!(
                    "{what} has an unsupported dtype (DLPack code {}, {} bits); use float32, float16 or bfloat16 \
                     (bool for masks)",
                    dt.code.0, dt.bits
                )))
            }
        };
        let shape: Vec<usize> = t.shape().iter().map(|&d| d as usize).collect();
        let strides = t
            .strides_or_compact()
            .map_err(|e| config_error(format!("{what}: {e}")))?
            .iter()
            .map(|&s| usize::try_from(s))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| {
                config_error(format!("{what} has negative strides; pass .contiguous()"))
            })?;
        let span = Self::compute_span(&shape, &strides)
            .filter(|&n| n.checked_mul(kind.size()).is_some())
            .ok_or_else(|| config_error(format!("{what}: shape {shape:?} and strides overflow")))?;
        // SAFETY: only pointer arithmetic on the descriptor (data + byte
        // offset), which the producer guarantees lies in its allocation.
        let ptr = unsafe { t.offset_bytes_ptr() }
            .map_err(|e| config_error(format!("{what}: {e}")))? as *mut u8;
        Ok(Imported {
            _owner: owner,
            what,
            ptr,
            kind,
            shape,
            strides,
            span,
            read_only,
        })
    }

    fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Elements from the first to one past the last addressed (0 if empty),
    /// computed when the tensor is imported; `None` if it overflows.
    fn compute_span(shape: &[usize], strides: &[usize]) -> Option<usize> {
        if shape.contains(&0) {
            return Some(0);
        }
        shape.iter().zip(strides).try_fold(1usize, |acc, (d, s)| {
            (d - 1).checked_mul(*s).and_then(|x| acc.checked_add(x))
        })
    }

    fn span(&self) -> usize {
        self.span
    }

    /// The byte range the tensor addresses.
    fn bytes(&self) -> (usize, usize) {
        let start = self.ptr as usize;
        (start, start + self.span() * self.kind.size())
    }

    fn expect_kind(&self, kind: Kind) -> PyResult<()> {
        if self.kind != kind {
            return Err(config_error(format!(
                "{} is {}, expected {}",
                self.what,
                self.kind.name(),
                kind.name()
            )));
        }
        Ok(())
    }

    /// The addressed elements as a slice of `T` (`T` must match `kind`).
    fn slice<T>(&self) -> PyResult<&[T]> {
        let span = self.span();
        if span == 0 {
            return Ok(&[]);
        }
        if !(self.ptr as usize).is_multiple_of(std::mem::align_of::<T>()) {
            return Err(config_error(format!(
                "{} is not aligned to its element size; pass a freshly allocated tensor",
                self.what
            )));
        }
        // SAFETY: by the struct's contract the `span` elements from `ptr` lie
        // in the producer's allocation, kept alive by `_owner` for as long as
        // `&self` (the slice's lifetime); `ptr` is non-null and aligned
        // (checked above); the caller (see `_core.pyi`) does not write these
        // tensors while the call runs, and outputs are checked not to overlap.
        Ok(unsafe { std::slice::from_raw_parts(self.ptr as *const T, span) })
    }

    fn view<T>(&self, kind: Kind) -> PyResult<View4<'_, T>> {
        self.expect_kind(kind)?;
        let (shape, strides) = self.dims4()?;
        View4::new(self.slice::<T>()?, shape, strides)
            .map_err(|e| config_error(format!("{}: {e}", self.what)))
    }

    fn dims4(&self) -> PyResult<([usize; 4], [usize; 4])> {
        let shape: [usize; 4] = self.shape.as_slice().try_into().map_err(|_| {
            config_error(format!(
                "{} must be 4-D, got shape {:?}",
                self.what, self.shape
            ))
        })?;
        let strides: [usize; 4] = self
            .strides
            .as_slice()
            .try_into()
            .expect("same rank as shape");
        Ok((shape, strides))
    }

    /// A dense, writable f32 tensor of exactly `shape`, as a mutable slice.
    fn out_f32(&mut self, shape: &[usize]) -> PyResult<&mut [f32]> {
        self.expect_kind(Kind::F32)?;
        if self.shape != shape {
            return Err(config_error(format!(
                "{} must have shape {shape:?}, got {:?}",
                self.what, self.shape
            )));
        }
        let mut want = 1;
        for (d, (&n, &s)) in self.shape.iter().zip(&self.strides).enumerate().rev() {
            if n > 1 && s != want {
                return Err(config_error(format!(
                    "{} must be contiguous (dimension {d} has stride {s}, expected {want})",
                    self.what
                )));
            }
            want *= n;
        }
        if self.read_only {
            return Err(config_error(format!("{} is read-only", self.what)));
        }
        let n = self.numel();
        if n == 0 {
            return Ok(&mut []);
        }
        if !(self.ptr as usize).is_multiple_of(4) {
            return Err(config_error(format!("{} is not 4-byte aligned", self.what)));
        }
        // SAFETY: the tensor is dense (checked above), so its `n` f32 lie in
        // the producer's allocation from `ptr` (aligned, checked), kept alive
        // by `_owner` for the borrow of `self`; it is writable (not flagged
        // read-only) and `host_attention` checks it overlaps no other tensor
        // of the call, so this is the only reference to these bytes.
        Ok(unsafe { std::slice::from_raw_parts_mut(self.ptr as *mut f32, n) })
    }
}

/// Kernels by thread count (0: all cores), built once each.
static KERNELS: Mutex<Vec<(usize, Arc<HostAttention>)>> = Mutex::new(Vec::new());

fn kernel(threads: usize) -> PyResult<Arc<HostAttention>> {
    let mut k = KERNELS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, a)) = k.iter().find(|(t, _)| *t == threads) {
        return Ok(a.clone());
    }
    let a = Arc::new(HostAttention::new(threads).map_err(to_py)?);
    k.push((threads, a.clone()));
    Ok(a)
}

/// Elements per array of the triad `host_model` runs: 3 x 24 MiB, past the L3
/// of most desktop and many server CPUs (a larger L3 inflates the figure, which
/// matters only where the cores' kernel rate is not the smaller bound), a few
/// ms a pass; allocation and first touch cost more (about 50 ms in all here).
const TRIAD_ELEMENTS: usize = 3 << 20;
/// Passes of that triad; the fastest counts.
const TRIAD_PASSES: usize = 2;

/// This process's CPU as host attention sees it: `(memory bandwidth in bytes/s,
/// kernel threads)`, measured once (a short STREAM triad on the kernel the
/// host attention calls use) and kept; `None` if the measurement failed.
fn cpu_figures() -> Option<(f64, usize)> {
    static CPU: OnceLock<Option<(f64, usize)>> = OnceLock::new();
    *CPU.get_or_init(|| {
        let attn = kernel(0).ok()?;
        let t = attn.stream_triad(TRIAD_ELEMENTS, TRIAD_PASSES).ok()?;
        Some((t.bytes_per_second, attn.threads()))
    })
}

/// The host attention path of this machine for an engine over `specs` whose
/// model has `query_group` query heads per KV head: the CPU's measured
/// bandwidth and kernel threads, the profiles' per-core kernel rate and the
/// largest layer's query and result sizes ([`exchange_bytes`]). `None` (the
/// policy then copies under "auto") when the CPU could not be measured.
pub(crate) fn host_model(specs: &[LayerSpec], query_group: usize) -> Option<HostModel> {
    let (bandwidth, cores) = cpu_figures()?;
    let (query_bytes, result_bytes) = specs
        .iter()
        .map(|s| {
            exchange_bytes(
                s.batch,
                s.kv_heads * query_group,
                s.k_dim.max(s.v_dim),
                s.elem_size,
            )
        })
        .max()
        .unwrap_or((0, 0));
    let model = HostModel::from_cpu(
        bandwidth,
        cores,
        CPU_ATTENTION_GBPS_PER_CORE * 1e9,
        query_bytes,
        result_bytes,
        // PolicyConfig::build_with_host replaces it with the user's choice.
        HostAttentionChoice::Auto,
    );
    model.validate().ok().map(|()| model)
}

/// Where the KV comes from.
enum Kv {
    Tensors(Imported, Imported),
    /// A layer in the engine's layout at `offset` bytes into `region`.
    Layer {
        region: Imported,
        spec: LayerSpec,
        capacity: usize,
        offset: usize,
    },
}

impl Kv {
    fn kind(&self, kv_dtype: Option<DType>) -> PyResult<Kind> {
        match self {
            Kv::Tensors(k, v) => {
                if k.kind != v.kind {
                    return Err(config_error(format!(
                        "key is {} but value is {}",
                        k.kind.name(),
                        v.kind.name()
                    )));
                }
                Ok(k.kind)
            }
            Kv::Layer { .. } => {
                Ok(match kv_dtype {
                    Some(DType::F32) => Kind::F32,
                    Some(DType::F16) => Kind::F16,
                    Some(DType::BF16) => Kind::BF16,
                    None => return Err(config_error(
                        "a layer region needs kv_dtype (\"bfloat16\", \"float16\" or \"float32\")",
                    )),
                })
            }
        }
    }

    fn bytes(&self) -> Vec<(usize, usize)> {
        match self {
            Kv::Tensors(k, v) => vec![k.bytes(), v.bytes()],
            Kv::Layer { region, .. } => vec![region.bytes()],
        }
    }

    fn views<T: Element>(&self, kind: Kind) -> PyResult<(View4<'_, T>, View4<'_, T>)> {
        match self {
            Kv::Tensors(k, v) => Ok((k.view::<T>(kind)?, v.view::<T>(kind)?)),
            Kv::Layer {
                region,
                spec,
                capacity,
                offset,
            } => {
                region.expect_kind(Kind::Byte)?;
                if region.shape.len() != 1 || region.strides.first().is_some_and(|&s| s != 1) {
                    return Err(config_error(
                        "a layer region must be a dense 1-D byte tensor (an engine Region)",
                    ));
                }
                let bytes = region.slice::<u8>()?;
                let need = spec
                    .checked_bytes(*capacity)
                    .and_then(|n| n.checked_add(*offset))
                    .ok_or_else(|| config_error("layer offset and size overflow"))?;
                if need > bytes.len() {
                    return Err(config_error(format!(
                        "the layer ends at byte {need}, past the region's {}",
                        bytes.len()
                    )));
                }
                let layer = &bytes[*offset..need];
                if !(layer.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>()) {
                    return Err(config_error(format!(
                        "layer offset {offset} is not aligned to the {}-byte elements",
                        std::mem::size_of::<T>()
                    )));
                }
                // SAFETY: `layer` is a live, aligned (checked) byte range of
                // whole elements (its length is `spec.bytes`, a multiple of the
                // element size, checked by `layer_kv`'s spec check below); T is
                // f32, f16 or bf16, for which every bit pattern is valid.
                let typed = unsafe {
                    std::slice::from_raw_parts(
                        layer.as_ptr() as *const T,
                        layer.len() / std::mem::size_of::<T>(),
                    )
                };
                layer_kv(typed, spec, *capacity).map_err(to_py)
            }
        }
    }
}

fn overlaps(a: (usize, usize), b: (usize, usize)) -> bool {
    a.0 < a.1 && b.0 < b.1 && a.0 < b.1 && b.0 < a.1
}

#[allow(clippy::too_many_arguments)]
fn run<Q: Element, K: Element>(
    py: Python<'_>,
    attn: &HostAttention,
    q: &Imported,
    q_kind: Kind,
    kv: &Kv,
    kv_kind: Kind,
    mask: Option<&Imported>,
    opts: AttentionOptions<'_>,
    out: &mut Imported,
    lse: &mut Imported,
) -> PyResult<()> {
    let qv = q.view::<Q>(q_kind)?;
    let (kview, vview) = kv.views::<K>(kv_kind)?;
    let mask = match mask {
        None => Mask::None,
        Some(m) if m.kind == Kind::Byte => Mask::Bool(m.view::<u8>(Kind::Byte)?),
        Some(m) => Mask::Additive(m.view::<f32>(Kind::F32)?),
    };
    let opts = AttentionOptions { mask, ..opts };
    let [b, qh, ql, _] = qv.shape();
    let dv = vview.shape()[3];
    let out = out.out_f32(&[b, qh, ql, dv])?;
    let lse = lse.out_f32(&[b, qh, ql])?;
    py.detach(|| attn.forward(qv, kview, vview, &opts, out, lse))
        .map_err(to_py)
}

/// Decode attention on the host; see `_core.pyi`.
#[pyfunction]
#[pyo3(signature = (query, key, value, out, lse, *, layer=None, capacity=None, offset=0, kv_dtype=None,
    lengths=None, query_positions=None, mask=None, causal=false, window=None, scale=None, softcap=None,
    threads=None))]
#[allow(clippy::too_many_arguments)]
fn host_attention(
    py: Python<'_>,
    query: &Bound<'_, PyAny>,
    key: &Bound<'_, PyAny>,
    value: Option<&Bound<'_, PyAny>>,
    out: &Bound<'_, PyAny>,
    lse: &Bound<'_, PyAny>,
    layer: Option<(usize, usize, usize, usize)>,
    capacity: Option<usize>,
    offset: usize,
    kv_dtype: Option<&str>,
    lengths: Option<Vec<usize>>,
    query_positions: Option<Vec<usize>>,
    mask: Option<&Bound<'_, PyAny>>,
    causal: bool,
    window: Option<usize>,
    scale: Option<f64>,
    softcap: Option<f64>,
    threads: Option<usize>,
) -> PyResult<()> {
    let kv_dtype = kv_dtype.map(DType::parse).transpose().map_err(to_py)?;
    let q = Imported::new(query, "query")?;
    let kv = match (value, layer) {
        (Some(v), None) => Kv::Tensors(Imported::new(key, "key")?, Imported::new(v, "value")?),
        (None, Some((batch, kv_heads, k_dim, v_dim))) => {
            let elem_size = kv_dtype.map_or(0, DType::size);
            let capacity = capacity
                .ok_or_else(|| config_error("a layer region needs capacity (tokens per row)"))?;
            Kv::Layer {
                region: Imported::new(key, "layer region")?,
                spec: LayerSpec {
                    batch,
                    kv_heads,
                    k_dim,
                    v_dim,
                    elem_size,
                },
                capacity,
                offset,
            }
        }
        _ => {
            return Err(config_error(
                "pass either key and value tensors, or a layer region as key with value=None and layer=(batch, kv_heads, k_dim, v_dim)",
            ))
        }
    };
    let kv_kind = kv.kind(kv_dtype)?;
    let mask = mask.map(|m| Imported::new(m, "mask")).transpose()?;
    let mut out = Imported::new(out, "out")?;
    let mut lse = Imported::new(lse, "lse")?;
    let mut inputs = kv.bytes();
    inputs.push(q.bytes());
    if let Some(m) = &mask {
        inputs.push(m.bytes());
    }
    for o in [&out, &lse] {
        if inputs.iter().any(|&i| overlaps(i, o.bytes())) {
            return Err(config_error(format!(
                "{} shares memory with an input; pass a separate tensor",
                o.what
            )));
        }
    }
    if overlaps(out.bytes(), lse.bytes()) {
        return Err(config_error("out and lse share memory"));
    }
    let attn = kernel(threads.unwrap_or(0))?;
    let opts = AttentionOptions {
        scale: scale.map(|s| s as f32),
        causal,
        window,
        softcap: softcap.map(|s| s as f32),
        lengths: lengths.as_deref(),
        query_positions: query_positions.as_deref(),
        mask: Mask::None,
    };
    let (qk, m) = (q.kind, mask.as_ref());
    macro_rules! go {
        ($q:ty, $k:ty) => {
            run::<$q, $k>(py, &attn, &q, qk, &kv, kv_kind, m, opts, &mut out, &mut lse)
        };
    }
    match (qk, kv_kind) {
        (Kind::F32, Kind::F32) => go!(f32, f32),
        (Kind::F32, Kind::F16) => go!(f32, f16),
        (Kind::F32, Kind::BF16) => go!(f32, bf16),
        (Kind::F16, Kind::F32) => go!(f16, f32),
        (Kind::F16, Kind::F16) => go!(f16, f16),
        (Kind::F16, Kind::BF16) => go!(f16, bf16),
        (Kind::BF16, Kind::F32) => go!(bf16, f32),
        (Kind::BF16, Kind::F16) => go!(bf16, f16),
        (Kind::BF16, Kind::BF16) => go!(bf16, bf16),
        (a, b) => Err(config_error(format!(
            "query is {} and the KV {}; both must be float32, float16 or bfloat16",
            a.name(),
            b.name()
        ))),
    }
}

/// Merges two partial results in place (`out`, `lse` take the merged values).
#[pyfunction]
fn merge_attention(
    py: Python<'_>,
    out: &Bound<'_, PyAny>,
    lse: &Bound<'_, PyAny>,
    other_out: &Bound<'_, PyAny>,
    other_lse: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let mut o = Imported::new(out, "out")?;
    let mut l = Imported::new(lse, "lse")?;
    let oo = Imported::new(other_out, "other_out")?;
    let ol = Imported::new(other_lse, "other_lse")?;
    for x in [&oo, &ol] {
        if overlaps(x.bytes(), o.bytes()) || overlaps(x.bytes(), l.bytes()) {
            return Err(config_error("the partial results share memory"));
        }
    }
    if overlaps(o.bytes(), l.bytes()) {
        return Err(config_error("out and lse share memory"));
    }
    if oo.shape != o.shape || ol.shape != l.shape {
        return Err(config_error(format!(
            "partial results differ in shape: {:?}/{:?} vs {:?}/{:?}",
            o.shape, l.shape, oo.shape, ol.shape
        )));
    }
    let (os, ls) = (o.shape.clone(), l.shape.clone());
    let (oo_s, ol_s) = (dense_f32(&oo)?, dense_f32(&ol)?);
    let o = o.out_f32(&os)?;
    let l = l.out_f32(&ls)?;
    py.detach(|| pie_host::attention::merge_into(o, l, oo_s, ol_s))
        .map_err(to_py)
}

fn dense_f32(t: &Imported) -> PyResult<&[f32]> {
    t.expect_kind(Kind::F32)?;
    if t.span() != t.numel() {
        return Err(config_error(format!("{} must be contiguous", t.what)));
    }
    t.slice::<f32>()
}

/// This machine's memory bandwidth by a STREAM triad on the kernel's threads.
#[pyfunction]
#[pyo3(signature = (threads=None, elements=1 << 24, passes=5))]
fn stream_triad<'py>(
    py: Python<'py>,
    threads: Option<usize>,
    elements: usize,
    passes: usize,
) -> PyResult<Bound<'py, PyDict>> {
    let attn = kernel(threads.unwrap_or(0))?;
    let t = py
        .detach(|| attn.stream_triad(elements, passes))
        .map_err(to_py)?;
    let d = PyDict::new(py);
    d.set_item("threads", attn.threads())?;
    d.set_item("elements", t.elements)?;
    d.set_item("bytes", t.bytes)?;
    d.set_item("seconds", t.seconds)?;
    d.set_item("bytes_per_second", t.bytes_per_second)?;
    Ok(d)
}

/// Adds the host attention functions to the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(host_attention, m)?)?;
    m.add_function(wrap_pyfunction!(merge_attention, m)?)?;
    m.add_function(wrap_pyfunction!(stream_triad, m)?)?;
    Ok(())
}
