//! Gemma 4's vision tower. Image preprocessing (decode, resize, patchify) is the front end's; the
//! engine takes patches (`switchyard_engine_api::Patches`).

pub mod tower;
