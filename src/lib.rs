//! The `switchyard` binary's commands. `main.rs` only parses the command line and calls [`cli::run`].

pub mod bench;
pub mod cli;
pub mod cluster;
pub mod serve;
