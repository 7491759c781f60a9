//! The Gemma 4 model on the CPU backend: checkpoint loading, the forward pass, the KV cache, the expert
//! interface that later issues put behind gRPC/NCCL, and greedy generation for checks.

pub mod checkpoint;
pub mod cluster;
pub mod config;
pub mod engine;
pub mod error;
pub mod generate;
pub mod kv_cache;
pub mod model;
pub mod model_dir;
pub mod vision;

pub use checkpoint::{Checkpoint, Tensor};
pub use config::{LayerKind, LayerSpec, ModelConfig};
pub use error::LoadError;
pub use generate::{GenerateOptions, StepOutput, greedy_generate};
pub use kv_cache::{KvStore, KvView, SeqCache};
pub use model::experts::{ExpertBackend, ExpertError, LocalExperts};
pub use model::{BatchChunk, ForwardChunk, ForwardError, Gemma4Model, LogitsFor};
pub use model_dir::ModelDir;
