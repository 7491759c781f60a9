//! Video input, as Gemma 4 takes it: frames sampled from the clip, each an image of 70 soft tokens,
//! written `mm:ss <|image><|video|>...<image|>` (the frame's timestamp, then its span), the frames joined
//! by spaces, as transformers' `Gemma4Processor` expands `<|video|>` and vLLM serves it.
//!
//! Sampling as `Gemma4VideoProcessor` samples: 32 frames at most, frame `i * total / 32`; a shorter
//! clip gives every frame (where transformers would refuse to take 32 of fewer). Timestamps are
//! `index / fps`, written `mm:ss`.
//!
//! One container and codec is read: Motion-JPEG in AVI (each frame a JPEG, decoded with libjpeg-turbo as
//! Pillow decodes it; `ffmpeg -i clip.mp4 -c:v mjpeg -q:v 2 clip.avi` makes one). Anything else is refused
//! with that advice.

use std::sync::Arc;

use serde_json::Value;

use switchyard_engine_api::{ImageInput, Patches};

use crate::error::ApiError;
use crate::media;
use crate::server::AppState;

/// Soft tokens per frame (vLLM's and `Gemma4VideoProcessor`'s default).
pub const FRAME_SOFT_TOKENS: usize = 70;
/// Frames sampled from a clip at most.
pub const MAX_FRAMES: usize = 32;
/// Frames a clip may hold (sampling reads 32 of them; more than this is refused unread).
const MAX_CLIP_FRAMES: usize = 100_000;

/// The URL of a `video_url` content part (`{"video_url": {"url": ...}}`, or the bare string form).
pub(crate) fn video_url(part: &Value) -> Option<&str> {
    super::images::media_url(part, "video_url")
}

/// A video read and preprocessed: the text that replaces its `<|video|>` and its frames' patches.
pub(crate) struct Video {
    pub expansion: String,
    pub frames: Vec<Patches>,
}

/// Fetches, demuxes, samples, decodes and preprocesses the conversation's videos.
pub(crate) async fn load(state: &AppState, messages: &[Value]) -> Result<Vec<Video>, ApiError> {
    let parts = super::images::media_parts(messages, "video_url");
    if parts.is_empty() {
        return Ok(Vec::new());
    }
    let v = state.config.vision.as_ref().ok_or_else(|| ApiError::invalid(parts[0].0.clone(), "this model does not take videos"))?;
    let Some(video_token) = v.video_token else {
        return Err(ApiError::invalid(parts[0].0.clone(), "this model's config has no video_token_id: it does not take videos"));
    };
    if parts.len() > v.max_videos {
        return Err(ApiError::invalid(
            "messages",
            format!("{} videos in one prompt; at most {} (--limit-mm-per-prompt)", parts.len(), v.max_videos),
        ));
    }
    let name = |id: u32| state.tokenizer.id_to_token(id).unwrap_or_default();
    let (boi, eoi, vid) = (name(v.boi_token), name(v.eoi_token), name(video_token));
    let mut out = Vec::with_capacity(parts.len());
    for (param, url) in parts {
        let bytes = media::fetch(&v.media, &url, &param).await?;
        let (max_pixels, side) = (v.media.max_pixels, v.max_grid_side);
        let (p, b) = (param.clone(), bytes);
        let (stamps, frames) =
            tokio::task::spawn_blocking(move || frames(&b, max_pixels, side, &p)).await.map_err(ApiError::internal)??;
        let expansion =
            stamps.iter().zip(&frames).map(|(t, f)| format!("{t} {boi}{}{eoi}", vid.repeat(f.soft_tokens()))).collect::<Vec<_>>().join(" ");
        out.push(Video { expansion, frames });
    }
    Ok(out)
}

/// The sampled frames' timestamps (`mm:ss`) and patches.
fn frames(bytes: &[u8], max_pixels: u64, side: usize, param: &str) -> Result<(Vec<String>, Vec<Patches>), ApiError> {
    let refuse = |m: String| ApiError::invalid(param, m);
    let clip = parse_avi(bytes).map_err(refuse)?;
    let mut stamps = Vec::new();
    let mut patches = Vec::new();
    for i in sample(clip.frames.len()) {
        let rgb = media::decode(clip.frames[i], max_pixels, param).map_err(|e| refuse(format!("frame {i}: {}", e.message)))?;
        let p = super::images::patches_of(&rgb, FRAME_SOFT_TOKENS, side, "frame", param)
            .map_err(|e| refuse(format!("frame {i}: {}", e.message)))?;
        stamps.push(timestamp(i, clip.fps));
        patches.push(p);
    }
    Ok((stamps, patches))
}

/// Frame indices as `Gemma4VideoProcessor` samples them: `i * total / n` for `n = min(32, total)`.
pub fn sample(total: usize) -> Vec<usize> {
    let n = total.min(MAX_FRAMES);
    (0..n).map(|i| i * total / n).collect()
}

/// `mm:ss` of frame `index` (transformers: `int(s // 60):02d`, `int(s % 60):02d`).
pub fn timestamp(index: usize, fps: f64) -> String {
    let s = index as f64 / fps;
    format!("{:02}:{:02}", (s / 60.0).floor() as u64, (s % 60.0).floor() as u64)
}

/// A demuxed Motion-JPEG AVI: its frame rate and its frames' JPEG bytes.
#[derive(Debug)]
pub struct Clip<'a> {
    pub fps: f64,
    pub frames: Vec<&'a [u8]>,
}

const CONVERT: &str = "send Motion-JPEG in AVI (e.g. `ffmpeg -i clip.mp4 -c:v mjpeg -q:v 2 clip.avi`)";

/// Reads an AVI's first video stream: it must be Motion-JPEG (`MJPG`), with a frame rate.
pub fn parse_avi(b: &[u8]) -> Result<Clip<'_>, String> {
    if b.len() < 12 || &b[0..4] != b"RIFF" || &b[8..12] != b"AVI " {
        let what = if b.get(4..8) == Some(b"ftyp") { "an MP4/MOV file" } else { "not an AVI file" };
        return Err(format!("unsupported video ({what}): {CONVERT}"));
    }
    let mut fps = None;
    let mut codec = None;
    let mut frames = Vec::new();
    walk(&b[12..], &mut |tag, kind, body| match (tag, kind) {
        (b"strh", _) if body.len() >= 32 && &body[0..4] == b"vids" && fps.is_none() => {
            let u = |o: usize| u32::from_le_bytes([body[o], body[o + 1], body[o + 2], body[o + 3]]);
            let (scale, rate) = (u(20), u(24));
            if scale > 0 && rate > 0 {
                fps = Some(rate as f64 / scale as f64);
            }
            codec.get_or_insert([body[4], body[5], body[6], body[7]]);
        }
        (b"strf", _) if body.len() >= 20 && codec.is_some_and(|c| c == [0; 4]) => {
            codec = Some([body[16], body[17], body[18], body[19]]);
        }
        // The first stream's compressed frames (`00dc`; `00db` from writers that mislabel them).
        (t, None)
            if t[0..2] == *b"00" && (t[2..4] == *b"dc" || t[2..4] == *b"db") && frames.len() < MAX_CLIP_FRAMES && !body.is_empty() =>
        {
            frames.push(body);
        }
        _ => {}
    })?;
    match codec.map(|c| c.to_ascii_uppercase()) {
        Some(c) if &c == b"MJPG" => {}
        Some(c) => return Err(format!("unsupported video codec `{}`: {CONVERT}", String::from_utf8_lossy(&c))),
        None => return Err(format!("the AVI has no video stream: {CONVERT}")),
    }
    let fps = fps.ok_or("the AVI's video stream has no frame rate")?;
    if frames.is_empty() {
        return Err("the video has no frames".into());
    }
    Ok(Clip { fps, frames })
}

/// Walks RIFF chunks, descending into `LIST`s: `f(tag, list kind, body)` for every chunk (lists too,
/// with their kind).
fn walk<'a>(mut b: &'a [u8], f: &mut impl FnMut(&[u8; 4], Option<&[u8; 4]>, &'a [u8])) -> Result<(), String> {
    while b.len() >= 8 {
        let tag: [u8; 4] = b[0..4].try_into().expect("4 bytes");
        let len = u32::from_le_bytes(b[4..8].try_into().expect("4 bytes")) as usize;
        let body = b.get(8..8 + len).ok_or("the AVI is truncated")?;
        if &tag == b"LIST" || &tag == b"RIFF" {
            let kind: [u8; 4] = body.get(0..4).ok_or("a RIFF list has no kind")?.try_into().expect("4 bytes");
            f(&tag, Some(&kind), body);
            walk(&body[4..], f)?;
        } else {
            f(&tag, None, body);
        }
        b = &b[(8 + len + (len & 1)).min(b.len())..];
    }
    Ok(())
}

/// The prompt's images and video frames together, in prompt order.
pub(crate) fn with_frames(
    state: &AppState,
    prompt: &[u32],
    mut images: Vec<ImageInput>,
    videos: Vec<Video>,
) -> Result<Vec<ImageInput>, ApiError> {
    if videos.is_empty() {
        return Ok(images);
    }
    let token = state
        .config
        .vision
        .as_ref()
        .and_then(|v| v.video_token)
        .ok_or_else(|| ApiError::invalid("messages", "this model does not take videos"))?;
    images.extend(frame_inputs(prompt, token, videos)?);
    images.sort_by_key(|i| i.start);
    Ok(images)
}

/// Each frame's span as an image input: the runs of the video token in the expanded prompt, in order.
pub(crate) fn frame_inputs(prompt: &[u32], video_token: u32, videos: Vec<Video>) -> Result<Vec<ImageInput>, ApiError> {
    let mut frames = videos.into_iter().flat_map(|v| v.frames);
    let mut out = Vec::new();
    let mut i = 0;
    while i < prompt.len() {
        if prompt[i] != video_token {
            i += 1;
            continue;
        }
        let start = i;
        while i < prompt.len() && prompt[i] == video_token {
            i += 1;
        }
        let p = frames.next().ok_or_else(|| ApiError::invalid("messages", "more video placeholders than video frames"))?;
        if p.soft_tokens() != i - start {
            return Err(ApiError::internal("a video frame's span does not match its soft tokens"));
        }
        out.push(ImageInput { start, patches: Arc::new(p) });
    }
    if frames.next().is_some() {
        return Err(ApiError::invalid("messages", "the chat template did not write every video"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_and_timestamps_are_transformers() {
        assert_eq!(sample(6), vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(sample(40).len(), 32);
        assert_eq!(&sample(40)[..5], &[0, 1, 2, 3, 5]);
        assert_eq!(timestamp(5, 2.0), "00:02");
        assert_eq!(timestamp(1, 2.0), "00:00");
        assert_eq!(timestamp(150, 2.0), "01:15");
    }

    #[test]
    fn non_avi_and_other_codecs_are_refused_with_advice() {
        assert!(parse_avi(b"\0\0\0\x18ftypmp42").unwrap_err().contains("MP4"));
        assert!(parse_avi(b"GIF89a").unwrap_err().contains("Motion-JPEG"));
        assert!(parse_avi(b"RIFF\x04\0\0\0AVI ").unwrap_err().contains("no video stream"));
    }
}
