//! Wire types for everything that crosses a process boundary (router <-> attention worker <-> expert
//! worker <-> coordinator). The gRPC services land with the cluster issue; until then nothing crosses a
//! process boundary and this crate is intentionally empty.
