//! A generation request, and the checks every backend makes before taking one.

use crate::image::{PATCH, POOL};
use crate::{EngineError, ImageInput, SamplingParams, TokenConstraint};

#[derive(Clone, Debug)]
pub struct EngineRequest {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    /// Output tokens already produced for this request elsewhere (a replay after a worker died): they
    /// are prefilled after the prompt and count as output for `max_tokens`, `min_tokens`, penalties
    /// and the sampler's position; generation continues after them.
    pub resume: Vec<u32>,
    /// The compiled form of `params.grammar`, when there is one (compiled off the engine thread).
    pub constraint: Option<Box<dyn TokenConstraint>>,
    /// Images, in prompt order: each one's soft tokens are prompt placeholders that take the vision
    /// tower's embeddings (encoded off the engine thread before the request is queued).
    pub images: Vec<ImageInput>,
    /// The W3C `traceparent` of the span this request runs under (the front end's request span), so
    /// the engine's spans join the request's trace. `None` when traces are not exported.
    pub traceparent: Option<String>,
}

/// A request's checks against the model's limits (the engine's, and a router's without an engine).
pub fn validate_request(prompt: &[u32], params: &SamplingParams, vocab_size: usize, max_model_len: usize) -> Result<(), EngineError> {
    if prompt.is_empty() {
        return Err(EngineError::EmptyPrompt);
    }
    if let Some(&id) = prompt.iter().find(|&&t| t as usize >= vocab_size) {
        return Err(EngineError::TokenOutOfVocab { id, vocab: vocab_size });
    }
    let requested = prompt.len() + params.max_tokens;
    if requested > max_model_len {
        return Err(EngineError::ContextTooLong { max: max_model_len, requested, prompt: prompt.len() });
    }
    Ok(())
}

/// Images must be in prompt order, apart, each over exactly its soft-token count of image
/// placeholders.
pub fn check_images(prompt: &[u32], images: &[ImageInput], placeholders: &[u32]) -> Result<(), EngineError> {
    let mut at = 0;
    for (i, im) in images.iter().enumerate() {
        let n = im.patches.soft_tokens();
        let (r, c) = (im.patches.rows, im.patches.cols);
        if r == 0 || c == 0 || r % POOL != 0 || c % POOL != 0 {
            return Err(EngineError::BadImage(format!("image {i}: a {r}x{c} patch grid is not made of 3x3 blocks")));
        }
        let bytes = r.checked_mul(c).and_then(|x| x.checked_mul(3 * PATCH * PATCH));
        if bytes != Some(im.patches.pixels.len()) {
            return Err(EngineError::BadImage(format!("image {i}: pixel data does not match its {r}x{c} patch grid")));
        }
        if n == 0 || im.start < at || im.start + n > prompt.len() {
            return Err(EngineError::BadImage(format!("image {i} does not fit the prompt at {}", im.start)));
        }
        // An image's (or a video frame's) positions are all one placeholder: the image or the video token.
        let t = prompt[im.start];
        if !placeholders.contains(&t) || prompt[im.start..im.start + n].iter().any(|&p| p != t) {
            return Err(EngineError::BadImage(format!("image {i}: its {n} positions are not all image placeholders")));
        }
        at = im.start + n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::Patches;

    #[test]
    fn limits_are_checked_in_order() {
        let p = SamplingParams { max_tokens: 10, ..Default::default() };
        assert_eq!(validate_request(&[], &p, 100, 64), Err(EngineError::EmptyPrompt));
        assert_eq!(validate_request(&[1, 100], &p, 100, 64), Err(EngineError::TokenOutOfVocab { id: 100, vocab: 100 }));
        assert_eq!(validate_request(&[1; 60], &p, 100, 64), Err(EngineError::ContextTooLong { max: 64, requested: 70, prompt: 60 }));
        assert_eq!(validate_request(&[1; 54], &p, 100, 64), Ok(()));
    }

    #[test]
    fn images_must_sit_on_their_placeholders() {
        let patches = Arc::new(Patches { rows: 3, cols: 3, pixels: vec![0; 9 * 3 * PATCH * PATCH] });
        let prompt = [1, 7, 2];
        let at = |start| vec![ImageInput { start, patches: patches.clone() }];
        assert_eq!(check_images(&prompt, &at(1), &[7]), Ok(()));
        assert_eq!(check_images(&prompt, &at(1), &[9, 7]), Ok(()), "a video frame's placeholder");
        assert!(check_images(&prompt, &at(0), &[7]).is_err());
        assert!(check_images(&prompt, &at(3), &[7]).is_err());
        assert!(check_images(&prompt, &at(1), &[]).is_err());
        let torn = ImageInput { start: 1, patches: Arc::new(Patches { rows: 3, cols: 3, pixels: vec![0; 5] }) };
        assert!(check_images(&prompt, &[torn], &[7]).is_err());
    }
}
