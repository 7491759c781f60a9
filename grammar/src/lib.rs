//! Constrained decoding: JSON schemas, regular expressions, choices and Lark grammars, compiled by
//! llguidance (the engine behind vLLM's `guidance` backend) against the checkpoint's vocabulary.
//!
//! A request carries a [`GrammarRequest`] (plain data from `switchyard-engine-api`, so it crosses the
//! wire to attention workers); [`GrammarEnv::compile`] turns it into a [`Constraint`], the engine's
//! [`TokenConstraint`], which masks each step's logits to the tokens the grammar allows and advances
//! with every sampled token. Once the grammar is complete only the
//! end-of-sequence tokens are allowed, so a constrained request ends as soon as its output is whole.
//!
//! Compilation is bounded: llguidance's own fuel limits cap the work a schema or regex may cost, and
//! callers compile off the engine thread (the server refuses what fails with a 400).

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use serde_json::Value;
use switchyard_engine_api::{ConstraintError, GrammarRequest, GrammarSpec, TokenConstraint};
use toktrie::{SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};

fn top_level(req: &GrammarRequest) -> TopLevelGrammar {
    match &req.spec {
        GrammarSpec::JsonSchema { schema } => TopLevelGrammar::from_json_schema(schema.clone()),
        GrammarSpec::JsonObject => TopLevelGrammar::from_json_schema(serde_json::json!({"type": "object"})),
        GrammarSpec::Regex { regex } => TopLevelGrammar::from_regex(regex),
        GrammarSpec::Choice { choices } => {
            let alts: Vec<String> = choices.iter().map(|c| regex_escape(c)).collect();
            TopLevelGrammar::from_regex(&format!("({})", alts.join("|")))
        }
        GrammarSpec::Lark { grammar } => TopLevelGrammar::from_lark(grammar.clone()),
    }
}

fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$#&-~\"/".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The vocabulary as llguidance sees it.
struct Vocab {
    trie: TokTrie,
}

impl TokenizerEnv for Vocab {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.greedy_tokenize(s)
    }
}

/// Compiles constraints for one checkpoint. Cheap to share.
#[derive(Clone)]
pub struct GrammarEnv {
    factory: Arc<ParserFactory>,
    /// Compiles running at once (one per core): a flood of grammars waits here, not on the CPU.
    permits: Arc<tokio::sync::Semaphore>,
    /// Recently compiled grammars (agents resend the same tools and schemas every turn).
    cache: Arc<std::sync::Mutex<std::collections::VecDeque<(GrammarRequest, Constraint)>>>,
}

/// Why a grammar was not compiled.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CompileError {
    /// The grammar is invalid, too large, too complex or too slow: the client's to fix.
    #[error("{0}")]
    Refused(String),
    /// Every compile slot stayed busy until the deadline: retry later.
    #[error("the grammar compiler is busy")]
    Busy,
}

/// The checkpoint's vocabulary could not be read for the grammar compiler.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("tokenizer.json: {0}")]
pub struct VocabError(String);

const CACHED_GRAMMARS: usize = 32;

impl GrammarEnv {
    /// Reads the token bytes from `tokenizer.json`; `vocab_size` is the model's (the logits' width);
    /// `eos` are the tokens that end generation (allowed once the grammar is complete).
    pub fn from_tokenizer_json(text: &str, vocab_size: usize, eos: &[u32]) -> Result<GrammarEnv, VocabError> {
        let json: Value = serde_json::from_str(text).map_err(|e| VocabError(e.to_string()))?;
        let mut words = llguidance::token_bytes_from_tokenizer_json(&json).map_err(|e| VocabError(e.to_string()))?;
        if words.len() < vocab_size {
            words.resize(vocab_size, Vec::new());
        }
        let first_eos = eos.first().copied().ok_or_else(|| VocabError("no end-of-sequence token".into()))?;
        let trie = TokTrie::from(&TokRxInfo::new(words.len() as u32, first_eos), &words).with_eos_tokens(eos);
        let env: TokEnv = Arc::new(Vocab { trie });
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| VocabError(e.to_string()))?;
        factory.quiet();
        // Errors name the problem, not the whole grammar and state (a client's grammar could fill logs).
        factory.limits_mut().verbose_errors = false;
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Ok(GrammarEnv {
            factory: Arc::new(factory),
            permits: Arc::new(tokio::sync::Semaphore::new(cores)),
            cache: Arc::new(std::sync::Mutex::new(std::collections::VecDeque::new())),
        })
    }

    /// Compiles a constraint, or says why it cannot be. Inputs past [`MAX_GRAMMAR_BYTES`] are
    /// refused first: compilation recurses over the grammar's structure, so its size bounds the stack.
    pub fn compile(&self, req: &GrammarRequest) -> Result<Constraint, CompileError> {
        let size = match &req.spec {
            GrammarSpec::JsonSchema { schema } => schema.to_string().len(),
            GrammarSpec::JsonObject => 0,
            GrammarSpec::Regex { regex } => regex.len(),
            GrammarSpec::Choice { choices } if choices.is_empty() => {
                return Err(CompileError::Refused("`choice` needs at least one string".into()));
            }
            GrammarSpec::Choice { choices } => choices.iter().map(|c| c.len() + 1).sum(),
            GrammarSpec::Lark { grammar } => grammar.len(),
        };
        if size > MAX_GRAMMAR_BYTES {
            return Err(CompileError::Refused(format!("the grammar is {size} bytes; at most {MAX_GRAMMAR_BYTES} are accepted")));
        }
        let parser = self.factory.create_parser(top_level(req)).map_err(|e| brief(&e.to_string()))?;
        let mut matcher = Matcher::new(Ok(parser));
        // The first mask is computed here, off the engine thread: a grammar too complex to step is
        // refused now rather than failing its request later.
        if let Err(e) = matcher.compute_mask() {
            return Err(brief(&e.to_string()));
        }
        if let Some(e) = matcher.get_error() {
            return Err(brief(&e));
        }
        Ok(Constraint {
            matcher,
            waiting_for: req.after_token,
            also_after: req.also_after.clone(),
            start_tokens: req.start_tokens.clone(),
            prepared: None,
        })
    }
}

/// An llguidance error without its appendices (backtraces, grammar dumps), at most 1000 bytes.
fn brief(e: &str) -> CompileError {
    let e = e.split("\n<").next().unwrap_or(e).trim();
    let mut end = e.len().min(1000);
    while !e.is_char_boundary(end) {
        end -= 1;
    }
    CompileError::Refused(e[..end].to_string())
}

/// The longest a request's grammar may take to compile (front end and attention workers alike).
pub const GRAMMAR_COMPILE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The largest schema, regex, choice list or grammar accepted, in bytes.
pub const MAX_GRAMMAR_BYTES: usize = 1 << 20;

/// Stack for compiling: deep grammars recurse deeply.
const COMPILE_STACK: usize = 1 << 30;

impl GrammarEnv {
    /// [`GrammarEnv::compile`] on its own thread (with a stack sized for the deepest grammar
    /// [`MAX_GRAMMAR_BYTES`] allows), at most one per core at a time, giving up after `timeout`.
    /// The engine never waits on it. A compile that outlives its deadline keeps its slot until it
    /// ends, so abandoned compiles cannot pile up. Recent grammars come from a cache.
    pub async fn compile_off_thread(&self, req: GrammarRequest, timeout: std::time::Duration) -> Result<Constraint, CompileError> {
        if let Some(c) = self.cached(&req) {
            return Ok(c);
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let permit = match tokio::time::timeout_at(deadline, self.permits.clone().acquire_owned()).await {
            Ok(Ok(p)) => p,
            _ => return Err(CompileError::Busy),
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        let env = self.clone();
        let job = req.clone();
        std::thread::Builder::new()
            .name("grammar-compile".into())
            .stack_size(COMPILE_STACK)
            .spawn(move || {
                let _permit = permit;
                let _ = tx.send(env.compile(&job));
            })
            .map_err(|_| CompileError::Busy)?;
        let c = match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(r)) => r?,
            Ok(Err(_)) => return Err(CompileError::Refused("the grammar compiler failed".into())),
            Err(_) => return Err(CompileError::Refused(format!("the grammar took longer than {}s to compile", timeout.as_secs()))),
        };
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() == CACHED_GRAMMARS {
            cache.pop_front();
        }
        cache.push_back((req, c.clone()));
        Ok(c)
    }

    fn cached(&self, req: &GrammarRequest) -> Option<Constraint> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.iter().find(|(r, _)| r == req).map(|(_, c)| c.clone())
    }
}

/// One request's grammar state.
pub struct Constraint {
    matcher: Matcher,
    waiting_for: Option<u32>,
    also_after: Vec<u32>,
    start_tokens: Vec<u32>,
    /// The allowed set for the current state, computed ahead by [`TokenConstraint::prepare`].
    prepared: Option<Result<SimpleVob, String>>,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint").field("waiting_for", &self.waiting_for).finish_non_exhaustive()
    }
}

/// An independent copy in the same state (one per choice of an `n > 1` request).
impl Clone for Constraint {
    fn clone(&self) -> Constraint {
        Constraint {
            matcher: self.matcher.deep_clone(),
            waiting_for: self.waiting_for,
            also_after: self.also_after.clone(),
            start_tokens: self.start_tokens.clone(),
            prepared: self.prepared.clone(),
        }
    }
}

impl TokenConstraint for Constraint {
    fn prepare(&mut self) -> Result<(), ConstraintError> {
        if self.waiting_for.is_none() && self.prepared.is_none() {
            self.prepared = Some(self.matcher.compute_mask_or_eos().map_err(|e| e.to_string()));
        }
        Ok(())
    }

    fn mask(&mut self, logits: &mut [f32]) -> Result<(), ConstraintError> {
        if self.waiting_for.is_some() {
            return Ok(());
        }
        let allowed = match self.prepared.take() {
            Some(r) => r.map_err(ConstraintError)?,
            None => self.matcher.compute_mask_or_eos().map_err(|e| ConstraintError(e.to_string()))?,
        };
        for (i, v) in logits.iter_mut().enumerate() {
            if !allowed.is_allowed(i as TokenId) {
                *v = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }

    fn accept(&mut self, token: u32) -> Result<(), ConstraintError> {
        self.prepared = None;
        if let Some(t) = self.waiting_for {
            if t == token || self.also_after.contains(&token) {
                self.waiting_for = None;
                return Ok(());
            }
            if !self.start_tokens.contains(&token) {
                return Ok(());
            }
            self.waiting_for = None; // and the token is the grammar's first
        }
        if self.matcher.is_stopped() {
            return Ok(()); // the end-of-sequence token that closes the output
        }
        self.matcher.consume_token(token).map_err(|e| ConstraintError(e.to_string()))
    }

    fn is_waiting(&self) -> bool {
        self.waiting_for.is_some()
    }

    fn is_complete(&mut self) -> bool {
        self.waiting_for.is_none() && (self.matcher.is_stopped() || self.matcher.is_accepting().unwrap_or(false))
    }

    fn boxed_clone(&self) -> Box<dyn TokenConstraint> {
        Box::new(self.clone())
    }
}
