//! Image input: a conversation's `image_url` parts fetched under the media policy, decoded and
//! preprocessed into patches off the async threads, and each `<|image|>` the template wrote expanded
//! into the image's span of soft-token placeholders.

use std::sync::Arc;

use serde_json::Value;

use switchyard_engine_api::{ImageInput, Patches};

use crate::error::ApiError;
use crate::server::AppState;
use crate::{media, preprocess};

/// The URL of an `image_url` content part (`{"image_url": {"url": ...}}`, or the bare string form).
pub(super) fn image_url(part: &Value) -> Option<&str> {
    media_url(part, "image_url")
}

/// The URL of a media content part of type `kind` (`image_url`, `video_url`): `{kind: {"url": ...}}`
/// or the bare string form.
pub(super) fn media_url<'a>(part: &'a Value, kind: &str) -> Option<&'a str> {
    match part.get(kind) {
        Some(Value::String(s)) => Some(s),
        Some(v) => v.get("url").and_then(Value::as_str),
        None => None,
    }
}

/// Every part of type `kind` in a conversation, in the order the template writes its placeholder, with
/// the field that names it.
pub(super) fn media_parts(messages: &[Value], kind: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        if let Some(Value::Array(parts)) = m.get("content") {
            for (j, p) in parts.iter().enumerate() {
                if p.get("type").and_then(Value::as_str) == Some(kind)
                    && let Some(u) = media_url(p, kind)
                {
                    out.push((format!("messages[{i}].content[{j}].{kind}"), u.to_string()));
                }
            }
        }
    }
    out
}

/// A decoded picture (an image, or a video frame: `what` names it in errors) preprocessed at `budget`
/// soft tokens, refused when its patch grid is past the `side` the position table allows (checked from
/// the target size before resizing, and again on the result).
pub(super) fn patches_of(rgb: &image::RgbImage, budget: usize, side: usize, what: &str, param: &str) -> Result<Patches, ApiError> {
    let (w, h) = rgb.dimensions();
    let too_big = |gr: usize, gc: usize| {
        ApiError::invalid(
            param,
            format!("a {w}x{h} {what} needs a {gr}x{gc} patch grid at {budget} soft tokens; the model allows {side} per side"),
        )
    };
    let (th, tw) = preprocess::target_size(h as usize, w as usize, budget).map_err(|e| ApiError::invalid(param, e))?;
    if th / preprocess::PATCH > side || tw / preprocess::PATCH > side {
        return Err(too_big(th / preprocess::PATCH, tw / preprocess::PATCH));
    }
    let p = preprocess::preprocess(rgb.as_raw(), h as usize, w as usize, budget).map_err(|e| ApiError::invalid(param, e))?;
    if p.rows > side || p.cols > side {
        return Err(too_big(p.rows, p.cols));
    }
    Ok(p)
}

/// Fetches, decodes and preprocesses the conversation's images, and expands each `<|image|>` the
/// template wrote into `<|image>`, one placeholder per soft token, `<image|>` (as transformers'
/// processor does). Returns the new prompt and the images at their positions.
pub(crate) async fn attach(
    state: &AppState,
    messages: &[Value],
    mm_processor_kwargs: Option<&Value>,
    prompt: Vec<u32>,
) -> Result<(Vec<u32>, Vec<ImageInput>), ApiError> {
    let parts = media_parts(messages, "image_url");
    if parts.is_empty() {
        return Ok((prompt, Vec::new()));
    }
    let v = state.config.vision.as_ref().ok_or_else(|| ApiError::invalid(parts[0].0.clone(), "this model does not take images"))?;
    if parts.len() > v.max_images {
        return Err(ApiError::invalid(
            "messages",
            format!("{} images in one prompt; at most {} (--limit-mm-per-prompt)", parts.len(), v.max_images),
        ));
    }
    let kw = mm_processor_kwargs;
    let budget = match kw.and_then(|k| k.get("max_soft_tokens").or_else(|| k.pointer("/images_kwargs/max_soft_tokens"))) {
        None => v.default_budget,
        Some(n) => match n.as_u64().map(|n| n as usize) {
            Some(n) if preprocess::SOFT_TOKEN_BUDGETS.contains(&n) => n,
            _ => {
                return Err(ApiError::invalid(
                    "mm_processor_kwargs.max_soft_tokens",
                    "Unsupported max_soft_tokens value: use 70, 140, 280, 560 or 1120",
                ));
            }
        },
    };
    let mut patches = Vec::with_capacity(parts.len());
    for (param, url) in &parts {
        let bytes = media::fetch(&v.media, url, param).await?;
        let (max_pixels, param, side) = (v.media.max_pixels, param.clone(), v.max_grid_side);
        let p = tokio::task::spawn_blocking(move || {
            let rgb = media::decode(&bytes, max_pixels, &param)?;
            patches_of(&rgb, budget, side, "image", &param)
        })
        .await
        .map_err(ApiError::internal)??;
        patches.push(p);
    }
    let found = prompt.iter().filter(|&&t| t == v.image_token).count();
    if found != patches.len() {
        return Err(ApiError::invalid(
            "messages",
            format!("the chat template wrote {found} image placeholders for {} images", patches.len()),
        ));
    }
    let soft: usize = patches.iter().map(|p| p.soft_tokens() + 2).sum();
    let mut out = Vec::with_capacity(prompt.len() + soft);
    let mut images = Vec::with_capacity(patches.len());
    let mut next = patches.into_iter();
    for t in prompt {
        if t != v.image_token {
            out.push(t);
            continue;
        }
        let Some(p) = next.next() else { return Err(ApiError::internal("more image placeholders than images after counting")) };
        out.push(v.boi_token);
        let start = out.len();
        out.extend(std::iter::repeat_n(v.image_token, p.soft_tokens()));
        out.push(v.eoi_token);
        images.push(ImageInput { start, patches: Arc::new(p) });
    }
    Ok((out, images))
}
