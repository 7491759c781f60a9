//! `POST /tokenize` and `POST /detokenize`, as vLLM has them: a `prompt`, or chat `messages` rendered
//! with the template (`add_generation_prompt`, `tools`, `chat_template_kwargs`), to token ids; and ids
//! back to text.

use axum::Json;
use axum::extract::State;
use serde::Serialize;

use crate::error::ApiError;
use crate::params;
use crate::protocol::{DetokenizeRequest, TokenizeRequest};
use crate::server::{RawBody, SharedState, offload, parse_body};

/// `POST /tokenize`'s answer.
#[derive(Serialize)]
pub struct Tokenized {
    pub count: usize,
    pub max_model_len: usize,
    pub tokens: Vec<u32>,
    /// Each token's text, with `return_token_strs`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_strs: Option<Vec<String>>,
}

/// `POST /detokenize`'s answer.
#[derive(Serialize)]
pub struct Detokenized {
    pub prompt: String,
}

pub async fn tokenize(State(state): State<SharedState>, RawBody(body): RawBody) -> Result<Json<Tokenized>, ApiError> {
    let s = state.clone();
    let req: TokenizeRequest = offload(move || parse_body(&s, &body)).await?;
    let (model, tokens, strs) = match req {
        TokenizeRequest::Chat {
            model,
            messages,
            add_generation_prompt,
            continue_final_message,
            add_special_tokens,
            tools,
            chat_template_kwargs,
            mm_processor_kwargs,
            return_token_strs,
        } => {
            state.check_model(model.as_deref())?;
            let videos = crate::chat::videos::load(&state, &messages).await?;
            let expansions: Vec<String> = videos.into_iter().map(|v| v.expansion).collect();
            let s = state.clone();
            let (ids, messages) = offload(move || {
                let ids = crate::chat::render_and_tokenize(
                    &s,
                    &messages,
                    tools.as_deref(),
                    add_generation_prompt,
                    continue_final_message,
                    chat_template_kwargs.as_ref(),
                    add_special_tokens,
                    &expansions,
                )?;
                Ok((ids, messages))
            })
            .await?;
            // Each image expands as the chat endpoint expands it, so the count is the prompt the
            // model would see.
            let (ids, _) = crate::chat::images::attach(&state, &messages, mm_processor_kwargs.as_ref(), ids).await?;
            (model, ids, return_token_strs)
        }
        TokenizeRequest::Completion { model, prompt, add_special_tokens, return_token_strs } => {
            let s = state.clone();
            (model, offload(move || s.encode(&prompt, add_special_tokens)).await?, return_token_strs)
        }
    };
    state.check_model(model.as_deref())?;
    let token_strs = strs.then(|| tokens.iter().map(|&i| state.token_str(i, false)).collect());
    Ok(Json(Tokenized { count: tokens.len(), max_model_len: state.config.max_model_len, tokens, token_strs }))
}

pub async fn detokenize(State(state): State<SharedState>, RawBody(body): RawBody) -> Result<Json<Detokenized>, ApiError> {
    let req: DetokenizeRequest = parse_body(&state, &body)?;
    state.check_model(req.model.as_deref())?;
    let ids = params::prompt_ids(&req.tokens, state.config.vocab_size).map_err(|e| ApiError { param: Some("tokens".into()), ..e })?;
    Ok(Json(Detokenized { prompt: state.decode(&ids, false) }))
}

/// Text → ids as transformers' tokenizer gives them: with `add_special_tokens`, a BOS first (Gemma's
/// `add_bos_token`), added here if `tokenizer.json`'s post-processor does not.
pub fn encode_text(
    tok: &tokenizers::Tokenizer,
    text: &str,
    add_special_tokens: bool,
    bos: Option<u32>,
) -> Result<Vec<u32>, tokenizers::Error> {
    let mut ids = tok.encode(text, add_special_tokens)?.get_ids().to_vec();
    if add_special_tokens
        && let Some(bos) = bos
        && ids.first() != Some(&bos)
    {
        ids.insert(0, bos);
    }
    Ok(ids)
}

/// The longest vocabulary entry, in bytes: no token decodes to more bytes than its entry spells
/// (`▁` for a space and `<0xNN>` byte tokens only shrink when decoded), so a text of `b` bytes is at
/// least `b / max_token_bytes` tokens, given a normalizer that never shortens text (Gemma's maps a
/// space to `▁`).
pub fn max_token_bytes(tok: &tokenizers::Tokenizer) -> usize {
    tok.get_vocab(true).keys().map(String::len).max().unwrap_or(1).max(1)
}
