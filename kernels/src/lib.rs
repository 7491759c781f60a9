//! CPU kernels for Switchyard. These are the numerical specification of the model: every later backend
//! (CUDA) is checked against them kernel by kernel.
//!
//! Two properties hold for every kernel here:
//! - **Exact dtype emulation.** Activations travel as `f32` values that are exactly representable in the
//!   model's compute dtype ([`DType`]); kernels round their outputs where HF transformers rounds, so a bf16
//!   checkpoint reproduces transformers' bf16 arithmetic rather than an f32 approximation of it.
//! - **Batch invariance.** A row's result never depends on which other rows share the call: every output
//!   element is computed by the same instruction sequence (same reduction order) whatever the batch size,
//!   the tiling or the thread that runs it. Cluster layouts can therefore be compared for bit equality.

#![allow(unsafe_code)] // SIMD intrinsics and the fork-join pool; every block says why it is sound.

pub mod attention;
pub mod cuda;
pub mod dtype;
pub mod isa;
pub mod kv;
pub mod linear;
pub mod ops;
pub mod pool;
pub mod simd;
pub mod topk;

pub use dtype::DType;
pub use isa::{Isa, isa};
pub use linear::{LinearJob, Product, Weight, linear, linear_many, linear_many_new, linear_new};
