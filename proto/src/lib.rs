//! The wire contract between Switchyard processes: generated from `proto/switchyard/v1/switchyard.proto`.
//!
//! Wire rules (they live here, next to the .proto): add fields, never renumber or reuse a number;
//! readers tolerate unknown fields; a breaking change is a new package (`switchyard.v2`), served side
//! by side. Activations travel as raw little-endian rows in the compute dtype, never as an object
//! graph, and every frame is checked against the model shape and the plan before use.

pub mod convert;

pub mod v1 {
    tonic::include_proto!("switchyard.v1");
}

/// The largest `Generate` request: image patches travel in it (one image at 1120 soft tokens is
/// 7.7 MB), so tonic's 4 MiB default would refuse ordinary image requests.
pub const MAX_GENERATE_REQUEST: usize = 256 << 20;
