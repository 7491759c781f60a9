//! Errors that stop a benchmark before or after its run. A request that fails during the run is not one
//! of these: it is counted and reported in the results (see `RequestRecord::error`).

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A flag, or a combination of flags, that cannot describe a benchmark.
    #[error("invalid --{flag}: {reason}")]
    InvalidArg { flag: &'static str, reason: String },
    /// The dataset file could not be read.
    #[error("reading dataset {}: {source}", path.display())]
    DatasetIo { path: PathBuf, source: std::io::Error },
    /// A line of the dataset file is not a prompt this client can send.
    #[error("dataset {} line {line}: {reason}", path.display())]
    DatasetLine { path: PathBuf, line: usize, reason: String },
    /// `--model` was not given and the server's `GET /v1/models` did not name one.
    #[error("finding the model name at {url} (pass --model to skip this): {reason}")]
    ModelDiscovery { url: String, reason: String },
    /// The HTTP client could not be built.
    #[error("building the HTTP client: {0}")]
    Client(String),
    /// The results could not be written.
    #[error("writing results to {}: {source}", path.display())]
    ResultIo { path: PathBuf, source: std::io::Error },
}
