#![deny(missing_docs)]
#![deny(unsafe_code)]
//! pie-core: the engine of pie-rs, which pools CPU memory into the KV cache of
//! a transformer decoder.
//!
//! The paper's ideas, each in its own module:
//! * [`plan`]: which layers are pooled (spread across the depth) and the prefetch depth;
//! * [`schedule`]: the prefetch schedule, pure: layer events in, swap operations out;
//! * [`slots`]: the arenas' layout, the one answer to where a layer's KV lives;
//! * [`page_table`]: every layer's valid length and prefetch hits;
//! * [`fit`]: capacity rounding and growth, and which plan fits a device budget;
//! * [`reorder`]: beam search's reorder as in-place per-sequence copies;
//! * [`fifo`]: the lock-free swap queue, in execution order, wrapping across steps;
//! * [`wake`]: the ring's wake-up handshake, so its consumer thread can sleep;
//! * [`swapper`]: the thread that drains the FIFO and issues copies;
//! * [`policy`]: the one [`Policy`] trait the engine consults, its
//!   configuration ([`PolicyConfig`]), adaptive expansion and the static policy;
//! * [`telemetry`]: per-layer timings and byte counts through a lock-free ring;
//! * [`engine`]: the per-layer API the Python side calls (its shared thread
//!   state and arena transitions live in modules of their own);
//! * [`paged`]: sizing a paged cache (transformers' continuous batching) under a budget;
//! * [`simulate`]: the engine on the virtual-time [`sim`] backend, for what-if questions;
//! * [`serving`]: continuous batching in virtual time over the engine on the sim backend.
//!
//! Hardware sits behind [`backend::Backend`]: `pie_host::HostBackend` (threads
//! doing real memcpy, in the `pie-host` crate), [`sim::SimBackend`] (virtual
//! time) and `pie_cuda::CudaBackend`. pie-core knows nothing of CUDA or Python,
//! and has no `unsafe` outside its lock-free ring ([`fifo`]).

// The engine and its parts.
pub mod engine;
pub mod fit;
pub mod layout;
pub mod page_table;
pub mod paged;
pub mod plan;
pub mod reorder;
pub mod schedule;
mod shared;
pub mod slots;
// Its threads and the queues that feed them.
pub mod fifo;
mod policy_thread;
mod primitive;
pub mod swapper;
pub mod telemetry;
pub mod wake;
// Deciding plans and answering what-if questions.
pub mod policy;
pub mod profiles;
pub mod serving;
pub mod simulate;
// The seam to hardware, and the virtual-time backend.
pub mod backend;
pub mod sim;
// Errors.
pub mod error;

pub use backend::{Backend, Buffer, CopyShape, Mem, Stream};
pub use engine::{Engine, EngineOptions, LayerKv};
pub use error::{ErrorKind, PieError, Result};
pub use layout::LayerSpec;
pub use plan::Plan;
pub use policy::{Policy, PolicyConfig, StaticPolicy};
