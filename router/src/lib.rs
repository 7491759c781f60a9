//! The OpenAI-compatible HTTP front end: API, chat template, tokenizer, parsers and load balancing.

pub mod attention_pool;
pub mod chat;
pub mod chat_template;
pub mod choice;
pub mod completions;
pub mod detokenize;
pub mod error;
pub mod gemma4;
pub mod jpeg;
pub mod media;
pub mod metrics;
pub mod params;
pub mod preprocess;
pub mod protocol;
pub mod response;
pub mod responses;
pub mod server;
pub mod special_text;
pub mod structured;
pub mod tokenize;
