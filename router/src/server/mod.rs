//! The axum application: shared state, routes, API-key guard, overload shedding, health and metrics.
//!
//! `POST /v1/completions`, `POST /v1/chat/completions`, `GET /v1/models`, `POST /tokenize`,
//! `POST /detokenize`, `GET /metrics` and `GET /health`. With an API key configured, every request
//! except the probes (`/health`, `/ping`), `/metrics`, `/version` and `/load` must carry
//! `Authorization: Bearer <key>`;
//! the check runs on the raw path before routing, so `//v1/...`, `/v1/../`, `%2F` or case tricks reach
//! a 401, never a handler.
//!
//! `state`: what is fixed at start-up; `routes`: the router, its middleware and the small endpoints;
//! `request`: what every API request starts with (id, span, body); `submit`: choices to the backend.

pub mod http;
mod request;
mod routes;
mod state;
mod submit;

pub use request::{RawBody, is_json_type, now_secs, offload, parse_body, parse_generation, request_id, request_span};
pub use routes::app;
pub use state::{AppState, Cors, Parsers, ServerConfig, SharedState, VisionFront};
pub use submit::{ChoiceJob, submit_all};
