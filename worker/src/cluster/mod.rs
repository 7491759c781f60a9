//! The worker's cluster roles (ARCHITECTURE.md): an **attention worker** runs the engine of `serve`
//! with its experts reached through [`dispatch::ExpertDispatch`]; an **expert worker** holds the
//! (layer, expert) slices the plan gives it ([`expert_store::ExpertStore`]) and serves them over
//! `ExpertService.Dispatch` ([`expert_server::ExpertServer`]); a `both` worker does the two, calling
//! its own slices in process. [`process::run_worker`] wires a process together.

pub mod attention_server;
pub mod dispatch;
pub mod expert_server;
pub mod expert_store;
pub mod process;
pub mod wire;
