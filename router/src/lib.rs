//! The OpenAI-compatible HTTP front end: API, chat template, tokenizer, parsers and load balancing.
//! It lands with the `switchyard serve` issue; the model and `switchyard generate` do not need it.
