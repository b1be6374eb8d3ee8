#![deny(missing_docs)]
#![deny(unsafe_code)]
//! pie-core: the engine of pie-rs, which pools CPU memory into the KV cache of
//! a transformer decoder.
//!
//! The paper's ideas, each in its own module:
//! * [`plan`]: which layers are pooled (spread across the depth) and the prefetch depth;
//! * [`page_table`]: where every layer's KV lives and which copies are in flight;
//! * [`slots`]: the arenas' slot bookkeeping;
//! * [`fit`]: capacity rounding and growth, and which plan fits a device budget;
//! * [`reorder`]: beam search's reorder as in-place per-sequence copies;
//! * [`fifo`]: the lock-free swap queue, in execution order, wrapping across steps;
//! * [`swapper`]: the thread that drains the FIFO and issues copies;
//! * [`policy`]: adaptive expansion (and the static policy);
//! * [`telemetry`]: per-layer timings and byte counts through a lock-free ring;
//! * [`engine`]: the per-layer API the Python side calls.
//!
//! Hardware sits behind [`backend::Backend`]: `pie_host::HostBackend` (threads
//! doing real memcpy, in the `pie-host` crate), [`sim::SimBackend`] (virtual
//! time) and `pie_cuda::CudaBackend`. pie-core knows nothing of CUDA or Python,
//! and has no `unsafe` outside its lock-free ring ([`fifo`]).

pub mod backend;
pub mod error;
pub mod layout;
pub mod plan;

pub use backend::{Backend, Buffer, CopyShape, Mem, Stream};
pub use error::{ErrorKind, PieError, Result};
pub use layout::LayerSpec;
pub use plan::Plan;
pub mod engine;
pub mod fifo;
pub mod fit;
pub mod page_table;
pub mod policy_driver;
mod primitive;
pub mod reorder;
pub mod slots;
pub mod swapper;
pub mod telemetry;

pub use engine::{Engine, EngineOptions};
pub use policy_driver::{PolicyDriver, StaticDriver};
pub mod policy;
pub mod profiles;
pub mod sim;
