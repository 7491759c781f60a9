//! Errors at the crate boundary. Messages name the file, key or tensor that was wrong.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} is not valid JSON for this model: {source}")]
    Json { path: PathBuf, source: serde_json::Error },
    #[error("config.json: {0}")]
    Config(String),
    #[error("{path}: bad safetensors file: {reason}")]
    Safetensors { path: PathBuf, reason: String },
    #[error("missing tensor `{name}` (expected shape {expected:?})")]
    MissingTensor { name: String, expected: Vec<usize> },
    #[error("tensor `{name}` has shape {actual:?}, expected {expected:?}")]
    TensorShape { name: String, expected: Vec<usize>, actual: Vec<usize> },
    #[error("tensor `{name}` has dtype {actual}, expected one of float32, bfloat16, float16")]
    TensorDtype { name: String, actual: String },
    #[error("tokenizer {path}: {reason}")]
    Tokenizer { path: PathBuf, reason: String },
    #[error("model `{id}` is not a local directory and could not be downloaded from the Hugging Face hub: {reason}")]
    Download { id: String, reason: String },
}
