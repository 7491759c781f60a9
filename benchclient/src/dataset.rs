//! The requests a benchmark sends: random token-id prompts, or prompts read from a JSON-lines file.
//!
//! Random prompts are lists of token ids drawn uniformly from a range, sent as the `prompt` array of
//! `/v1/completions` (vLLM, llama.cpp's server and Switchyard all accept token-id prompts). Sending ids rather
//! than text keeps the prompt length exact on every server, with no tokenizer on the client side.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::args::RandomSpec;
use crate::error::BenchError;
use crate::rng::SplitMix64;

/// A prompt as the `prompt` field carries it.
#[derive(Clone, Debug, PartialEq)]
pub enum Prompt {
    Text(String),
    TokenIds(Vec<u32>),
}

impl Prompt {
    pub fn to_json(&self) -> Value {
        match self {
            Prompt::Text(text) => Value::from(text.as_str()),
            Prompt::TokenIds(ids) => Value::from(ids.clone()),
        }
    }
}

/// One request of the benchmark.
#[derive(Clone, Debug, PartialEq)]
pub struct SampleRequest {
    pub prompt: Prompt,
    /// Prompt length in tokens as far as the client knows it (0 for text without a `prompt_len`); the
    /// server's `usage.prompt_tokens` replaces it when the stream reports usage.
    pub prompt_len: usize,
    /// `max_tokens` of the request.
    pub output_len: usize,
}

/// `n` random prompts; the same seed gives the same prompts.
pub fn random_requests(spec: &RandomSpec, n: usize, seed: u64) -> Vec<SampleRequest> {
    let mut rng = SplitMix64::new(seed);
    let (lo, hi) = spec.token_range;
    (0..n)
        .map(|_| {
            let input_len = sample_len(&mut rng, spec.input_len, spec.range_ratio);
            let output_len = sample_len(&mut rng, spec.output_len, spec.range_ratio);
            let ids: Vec<u32> = (0..input_len).map(|_| rng.range_u64(lo.into(), hi.into()) as u32).collect();
            SampleRequest { prompt: Prompt::TokenIds(ids), prompt_len: input_len, output_len }
        })
        .collect()
}

/// A length drawn uniformly from `[len * (1 - ratio), len * (1 + ratio)]`, never below 1.
fn sample_len(rng: &mut SplitMix64, len: usize, ratio: f64) -> usize {
    if ratio == 0.0 {
        return len;
    }
    let lo = ((len as f64) * (1.0 - ratio)).floor().max(1.0) as u64;
    let hi = ((len as f64) * (1.0 + ratio)).ceil() as u64;
    rng.range_u64(lo, hi + 1) as usize
}

/// One line of a dataset file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLine {
    prompt: FilePrompt,
    output_len: Option<usize>,
    prompt_len: Option<usize>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum FilePrompt {
    Text(String),
    TokenIds(Vec<u32>),
}

/// `n` requests from a JSON-lines file (blank lines skipped), cycling through the file when it is shorter.
pub fn file_requests(path: &Path, n: usize, default_output_len: usize) -> Result<Vec<SampleRequest>, BenchError> {
    let text = std::fs::read_to_string(path).map_err(|source| BenchError::DatasetIo { path: path.to_owned(), source })?;
    let mut lines = Vec::new();
    for (index, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let bad = |reason: String| BenchError::DatasetLine { path: path.to_owned(), line: index + 1, reason };
        let parsed: FileLine = serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
        let (prompt, known_len) = match parsed.prompt {
            FilePrompt::Text(text) => (Prompt::Text(text), 0),
            FilePrompt::TokenIds(ids) => {
                let len = ids.len();
                (Prompt::TokenIds(ids), len)
            }
        };
        let output_len = parsed.output_len.unwrap_or(default_output_len);
        if output_len == 0 {
            return Err(bad("output_len must be at least 1".to_owned()));
        }
        lines.push(SampleRequest { prompt, prompt_len: parsed.prompt_len.unwrap_or(known_len), output_len });
    }
    if lines.is_empty() {
        return Err(BenchError::DatasetLine { path: path.to_owned(), line: 0, reason: "no prompts in the file".to_owned() });
    }
    Ok(lines.iter().cycle().take(n).cloned().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(ratio: f64) -> RandomSpec {
        RandomSpec { input_len: 32, output_len: 8, range_ratio: ratio, token_range: (100, 200) }
    }

    #[test]
    fn random_prompts_are_reproducible_and_in_range() {
        let a = random_requests(&spec(0.0), 5, 42);
        assert_eq!(a, random_requests(&spec(0.0), 5, 42));
        assert_ne!(a, random_requests(&spec(0.0), 5, 43));
        for r in &a {
            let Prompt::TokenIds(ids) = &r.prompt else { panic!("random prompts are token ids") };
            assert_eq!((ids.len(), r.prompt_len, r.output_len), (32, 32, 8));
            assert!(ids.iter().all(|id| (100..200).contains(id)));
        }
        assert_ne!(a[0].prompt, a[1].prompt);
    }

    #[test]
    fn range_ratio_varies_lengths_within_bounds() {
        let reqs = random_requests(&spec(0.5), 200, 1);
        assert!(reqs.iter().all(|r| (16..=48).contains(&r.prompt_len) && (4..=12).contains(&r.output_len)));
        assert!(reqs.iter().any(|r| r.prompt_len != 32));
    }

    #[test]
    fn file_lines_parse_and_cycle() {
        let path = std::env::temp_dir().join(format!("switchyard-bench-dataset-{}.jsonl", std::process::id()));
        std::fs::write(&path, "{\"prompt\": \"hello\", \"output_len\": 3}\n\n{\"prompt\": [5, 6, 7]}\n").unwrap();
        let reqs = file_requests(&path, 3, 9).unwrap();
        assert_eq!(reqs[0], SampleRequest { prompt: Prompt::Text("hello".into()), prompt_len: 0, output_len: 3 });
        assert_eq!(reqs[1], SampleRequest { prompt: Prompt::TokenIds(vec![5, 6, 7]), prompt_len: 3, output_len: 9 });
        assert_eq!(reqs[2], reqs[0]);

        std::fs::write(&path, "{\"prompt\": \"a\"}\n{\"prompt\": 5}\n").unwrap();
        let err = file_requests(&path, 1, 1).unwrap_err().to_string();
        assert!(err.contains("line 2"), "{err}");
        std::fs::remove_file(&path).unwrap();
    }
}
