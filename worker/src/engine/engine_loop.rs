//! The engine thread: take commands, schedule a step, run the model, sample, report, repeat.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::time::Instant;

use metrics::gauge;

use super::metrics::EngineMetrics;
use switchyard_kernels::ops::log_softmax;

use super::block_pool::BlockPool;

/// Links from a step's span to the requests it serves beyond the first (its parent).
const MAX_STEP_LINKS: usize = 16;
use super::paged_kv::{self, KvStorage};
use super::sampling::{SamplerState, sample, token_logprob};
use super::scheduler::{Scheduled, Scheduler, SchedulerLimits};
use super::sequence::Sequence;
use super::{
    Command, EngineConfig, EngineError, EngineEvent, EngineFailure, EngineStats, ErrorClass, FinishReason, PromptInfo, TokenEvent,
};
use crate::model::{BatchChunk, LogitsFor, TextModel};

pub(super) struct EngineState {
    model: Arc<dyn TextModel>,
    config: EngineConfig,
    sched: Scheduler,
    storage: KvStorage,
    stats: Arc<EngineStats>,
    /// Seeds requests without a seed: reproducible for a given `--seed` and arrival order.
    seeds: rand_chacha::ChaCha8Rng,
    reported: (u64, u64, u64),
    metrics: EngineMetrics,
}

impl EngineState {
    pub fn new(model: Arc<dyn TextModel>, config: EngineConfig, stats: Arc<EngineStats>) -> Result<EngineState, EngineError> {
        use rand_chacha::rand_core::SeedableRng;
        let c = model.config();
        let bs = config.block_size;
        if !bs.is_power_of_two() {
            return Err(EngineError::BadBlockSize(bs));
        }
        let window_blocks = c.sliding_window.div_ceil(bs) + 1;
        let sliding_cap = config.max_num_seqs * window_blocks + config.max_num_batched_tokens.div_ceil(bs) + 1;
        let sizes = paged_kv::plan_pools(&c.layers, bs, config.kv_dtype, config.kv_cache_bytes, sliding_cap);
        let need = config.max_model_len.div_ceil(bs);
        let need_sliding = need.min(window_blocks + config.max_num_batched_tokens.div_ceil(bs));
        let [sb, gb] = paged_kv::block_bytes(&c.layers, bs, config.kv_dtype);
        if (gb > 0 && sizes.global < need) || (sb > 0 && sizes.sliding < need_sliding) {
            return Err(EngineError::CacheTooSmall {
                blocks: sizes.global.min(sizes.sliding),
                block_size: bs,
                max_model_len: config.max_model_len,
            });
        }
        let limits = SchedulerLimits {
            block_size: bs,
            sliding_window: c.sliding_window,
            max_num_seqs: config.max_num_seqs,
            max_num_batched_tokens: config.max_num_batched_tokens,
            prefix_caching: config.prefix_caching,
        };
        let pools = [BlockPool::new(if sb > 0 { sizes.sliding } else { 0 }), BlockPool::new(if gb > 0 { sizes.global } else { 0 })];
        let storage = KvStorage::new(&c.layers, bs, config.kv_dtype, sizes);
        model.prepare_kv([pools[0].num_blocks(), pools[1].num_blocks()], bs, config.kv_dtype).map_err(EngineError::Device)?;
        let layout = super::CacheLayout {
            dtype: config.kv_dtype,
            block_size: bs,
            sliding_blocks: pools[0].num_blocks(),
            global_blocks: pools[1].num_blocks(),
            block_bytes: [sb, gb],
        };
        let _ = stats.cache.set(layout);
        // vLLM's info gauge: the configuration as labels, value 1.
        gauge!(
            "vllm:cache_config_info",
            "block_size" => bs.to_string(),
            "cache_dtype" => config.kv_dtype.name(),
            "num_gpu_blocks" => layout.global_blocks.to_string(),
            "num_sliding_window_blocks" => layout.sliding_blocks.to_string(),
            "enable_prefix_caching" => if config.prefix_caching { "True" } else { "False" },
            "model_name" => config.model_name.clone(),
            "engine" => "0"
        )
        .set(1.0);
        tracing::info!(
            "KV cache: {} blocks of {bs} positions (global layers) and {} (sliding layers), {}, {} bytes per token",
            layout.global_blocks,
            layout.sliding_blocks,
            config.kv_dtype.name(),
            layout.bytes_per_token()
        );
        let seeds = rand_chacha::ChaCha8Rng::seed_from_u64(config.seed);
        let metrics = EngineMetrics::new(&config.model_name);
        Ok(EngineState { model, config, sched: Scheduler::new(limits, pools), storage, stats, seeds, reported: (0, 0, 0), metrics })
    }

    pub fn run(mut self, rx: Receiver<Command>) {
        loop {
            if self.sched.running.is_empty() && self.sched.waiting.is_empty() {
                self.publish();
                match rx.recv() {
                    Ok(cmd) => self.handle(cmd),
                    Err(_) => return,
                }
            }
            loop {
                match rx.try_recv() {
                    Ok(cmd) => self.handle(cmd),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) if self.sched.running.is_empty() && self.sched.waiting.is_empty() => return,
                    Err(TryRecvError::Disconnected) => break,
                }
            }
            self.drop_cancelled();
            let plan = self.sched.schedule();
            let finished = if plan.is_empty() {
                self.fail_unschedulable();
                Vec::new()
            } else {
                self.step(&plan)
            };
            // Publish before the final events go out, so a client that sees its request end also
            // sees its blocks freed.
            self.publish();
            for (seq, ev) in finished {
                let _ = seq.events.send(ev);
            }
        }
    }

    fn handle(&mut self, cmd: Command) {
        use rand_chacha::rand_core::RngCore;
        match cmd {
            Command::Add(id, req, events, images) => {
                let seed = req.params.seed.unwrap_or_else(|| self.seeds.next_u64());
                let prompt_len = req.prompt.len();
                let mut sampler = SamplerState::new(seed, &req.prompt);
                for &t in &req.resume {
                    sampler.record(t);
                }
                let mut constraint = req.constraint;
                if let Some(c) = constraint.as_mut()
                    && let Err(e) = req.resume.iter().try_for_each(|&t| c.accept(t))
                {
                    self.stats.unfinished.fetch_sub(1, Ordering::Relaxed);
                    let _ = events.send(EngineEvent::Error(
                        EngineError::Grammar(format!("the resumed output does not match the grammar: {e}")).into(),
                    ));
                    return;
                }
                let mut tokens = req.prompt;
                tokens.extend_from_slice(&req.resume);
                let eos = if req.params.ignore_eos { &[][..] } else { &self.config.eos_token_ids[..] };
                let min_tokens_held = eos.iter().chain(&req.params.stop_token_ids).copied().collect();
                self.metrics.prompt_tokens.increment(prompt_len as u64);
                let queued = tracing::info_span!("engine.queue", prompt_tokens = prompt_len);
                if let Some(t) = &req.traceparent {
                    switchyard_telemetry::adopt(&queued, t);
                }
                self.sched.waiting.push_back(Sequence {
                    id,
                    sampler,
                    tokens,
                    prompt_len,
                    computed: 0,
                    tables: [Vec::new(), Vec::new()],
                    hashes: Vec::new(),
                    cached_tokens: 0,
                    params: req.params,
                    events,
                    prompt_logprobs: Vec::new(),
                    min_tokens_held,
                    arrival: Instant::now(),
                    scheduled_at: None,
                    first_token_at: None,
                    last_token_at: None,
                    constraint,
                    images,
                    trace: req.traceparent,
                    phase: Some(queued),
                });
            }
            Command::Abort(id) => self.remove_where(|s| s.id == id),
        }
    }

    /// Drops requests whose client has gone away.
    fn drop_cancelled(&mut self) {
        self.remove_where(|s| s.events.is_closed());
    }

    fn remove_where(&mut self, pred: impl Fn(&Sequence) -> bool) {
        let mut i = 0;
        while i < self.sched.running.len() {
            if pred(&self.sched.running[i]) {
                self.sched.finish(i);
                self.stats.unfinished.fetch_sub(1, Ordering::Relaxed);
            } else {
                i += 1;
            }
        }
        // Waiting sequences hold no blocks (see `Scheduler::waiting`), so dropping one frees nothing.
        let before = self.sched.waiting.len();
        self.sched.waiting.retain(|s| !pred(s));
        self.stats.unfinished.fetch_sub(before - self.sched.waiting.len(), Ordering::Relaxed);
    }

    /// Nothing could be scheduled with nothing running: the head of the queue can never fit.
    fn fail_unschedulable(&mut self) {
        if self.sched.running.is_empty()
            && let Some(seq) = self.sched.waiting.pop_front()
        {
            let _ =
                seq.events.send(EngineEvent::Error(EngineFailure::new(ErrorClass::Internal, "the request does not fit in the KV cache")));
            self.stats.unfinished.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn logits_for(seq: &Sequence, n: usize) -> LogitsFor {
        let ends = seq.computed + n == seq.tokens.len();
        let wants_prompt = seq.params.prompt_logprobs.is_some() && seq.prompt_logprobs.len() + 1 < seq.prompt_len;
        match (wants_prompt, ends) {
            (true, _) => LogitsFor::All,
            (false, true) => LogitsFor::Last,
            (false, false) => LogitsFor::None,
        }
    }

    /// Runs one step; returns the sequences that finished, with their last event still to send.
    fn step(&mut self, plan: &[Scheduled]) -> Vec<(Sequence, EngineEvent)> {
        let step_span = self.trace_step(plan);
        let _in_step = step_span.enter();
        let mut prepared: Vec<(usize, Box<dyn switchyard_engine_api::TokenConstraint>)> = Vec::new();
        if self.config.async_scheduling {
            for p in plan {
                let s = &mut self.sched.running[p.seq];
                let samples = s.computed + p.tokens == s.tokens.len();
                if samples && s.constraint.as_ref().is_some_and(|c| !c.is_waiting()) {
                    prepared.push((p.seq, s.constraint.take().expect("checked")));
                }
            }
        }
        let running = &self.sched.running;
        let chunks: Vec<BatchChunk<'_>> = plan
            .iter()
            .map(|p| {
                let s = &running[p.seq];
                BatchChunk {
                    tokens: &s.tokens[s.computed..s.computed + p.tokens],
                    start: s.computed,
                    logits: Self::logits_for(s, p.tokens),
                    images: &s.images,
                }
            })
            .collect();
        let tables = plan.iter().map(|p| [&running[p.seq].tables[0][..], &running[p.seq].tables[1][..]]).collect();
        let kinds: Vec<LogitsFor> = chunks.iter().map(|c| c.logits).collect();
        // --async-scheduling: the grammar masks this step will apply are computed on a helper thread
        // while the forward pass runs (they depend only on the tokens accepted so far).
        let model = &self.model;
        let mut storage = self.storage.batch(tables);
        let result = if prepared.is_empty() {
            model.forward_batch(&chunks, &mut storage)
        } else {
            std::thread::scope(|s| {
                s.spawn(|| {
                    for (_, c) in prepared.iter_mut() {
                        let _ = c.prepare(); // an error resurfaces, the same, from `mask`
                    }
                });
                model.forward_batch(&chunks, &mut storage)
            })
        };
        drop(storage);
        drop(chunks);
        for (i, c) in prepared {
            self.sched.running[i].constraint = Some(c);
        }
        let logits = match result {
            Ok(l) => l,
            Err(e) => {
                self.fail_batch(plan, &e.to_string());
                return Vec::new();
            }
        };
        let mut finished = Vec::new();
        for ((p, rows), kind) in plan.iter().zip(logits).zip(kinds) {
            if kind == LogitsFor::All {
                self.collect_prompt_logprobs(p, &rows);
            }
            self.sched.advance(p.seq, p.tokens);
            let seq = &self.sched.running[p.seq];
            if seq.computed == seq.tokens.len() {
                let vocab = self.model.config().vocab_size;
                let last = &rows[rows.len() - vocab..];
                if let Some(last_event) = self.emit_token(p.seq, last) {
                    finished.push((p.seq, last_event));
                }
            }
        }
        finished.sort_unstable_by_key(|f| f.0);
        let mut done = Vec::with_capacity(finished.len());
        for (i, ev) in finished.into_iter().rev() {
            done.push((self.sched.finish(i), ev));
            self.stats.unfinished.fetch_sub(1, Ordering::Relaxed);
        }
        done
    }

    /// The step's span: a child of the first scheduled request's trace, linked to the others' (a
    /// batch serves many traces). A request that starts computing leaves its queue span for a
    /// prefill span, which ends with its first token.
    fn trace_step(&mut self, plan: &[Scheduled]) -> tracing::Span {
        let tokens: usize = plan.iter().map(|p| p.tokens).sum();
        self.metrics.iteration_tokens.record(tokens as f64);
        let span = tracing::info_span!("engine.step", seqs = plan.len(), tokens);
        let now = Instant::now();
        for (i, p) in plan.iter().enumerate() {
            let seq = &mut self.sched.running[p.seq];
            seq.scheduled_at.get_or_insert(now);
            if let Some(t) = &seq.trace {
                if i == 0 {
                    switchyard_telemetry::adopt(&span, t);
                } else if i < MAX_STEP_LINKS {
                    switchyard_telemetry::link(&span, t);
                }
            }
            if seq.last_token_at.is_none() && seq.phase.as_ref().is_some_and(|s| s.metadata().is_some_and(|m| m.name() == "engine.queue")) {
                let prefill = tracing::info_span!("engine.prefill", prompt_tokens = seq.prompt_len, cached_tokens = seq.cached_tokens);
                if let Some(t) = &seq.trace {
                    switchyard_telemetry::adopt(&prefill, t);
                }
                seq.phase = Some(prefill);
            }
        }
        span
    }

    fn collect_prompt_logprobs(&mut self, p: &Scheduled, rows: &[f32]) {
        let vocab = self.model.config().vocab_size;
        let seq = &mut self.sched.running[p.seq];
        let n = seq.params.prompt_logprobs.unwrap_or(0);
        for (r, row) in rows.chunks_exact(vocab).enumerate() {
            let pos = seq.computed + r;
            if pos == seq.prompt_logprobs.len() && pos + 1 < seq.prompt_len {
                let lp = log_softmax(row);
                seq.prompt_logprobs.push(token_logprob(&lp, seq.tokens[pos + 1], n));
            }
        }
    }

    /// Samples and appends one token and reports it, unless it finishes the sequence: then the event is
    /// returned, to be sent once the sequence's blocks are free.
    fn emit_token(&mut self, i: usize, logits: &[f32]) -> Option<EngineEvent> {
        let eos = &self.config.eos_token_ids;
        let seq = &mut self.sched.running[i];
        let generated = seq.generated();
        seq.sampler.at_output(generated);
        let masked;
        // Once a grammar is complete only EOS may follow: `min_tokens` must not hold it back.
        let complete = seq.constraint.as_mut().is_some_and(|c| c.is_complete());
        let generated_for_min = if complete { usize::MAX } else { generated };
        let logits = match seq.constraint.as_mut() {
            Some(c) if !c.is_waiting() => {
                let mut l = logits.to_vec();
                if let Err(e) = c.mask(&mut l) {
                    return Some(EngineEvent::Error(EngineError::Grammar(e.0).into()));
                }
                masked = l;
                &masked[..]
            }
            _ => logits,
        };
        let (token, logprob) = sample(logits, &seq.params, &mut seq.sampler, &seq.min_tokens_held, generated_for_min);
        if let Some(c) = seq.constraint.as_mut()
            && let Err(e) = c.accept(token)
        {
            return Some(EngineEvent::Error(EngineError::Grammar(e.0).into()));
        }
        seq.tokens.push(token);
        seq.sampler.record(token);
        let finish = if !seq.params.ignore_eos && eos.contains(&token) {
            Some(FinishReason::Stop(None))
        } else if seq.params.stop_token_ids.contains(&token) {
            Some(FinishReason::Stop(Some(token)))
        } else if seq.generated() >= seq.params.max_tokens || seq.tokens.len() >= self.config.max_model_len {
            Some(FinishReason::Length)
        } else {
            None
        };
        let now = Instant::now();
        self.metrics.token(seq, now);
        let prompt = seq.last_token_at.is_none().then(|| PromptInfo {
            cached_tokens: seq.cached_tokens,
            logprobs: seq.params.prompt_logprobs.map(|_| std::mem::take(&mut seq.prompt_logprobs)),
        });
        seq.first_token_at.get_or_insert(now);
        seq.last_token_at = Some(now);
        seq.phase = None; // the first token ends the prefill span
        if let Some(f) = finish {
            self.metrics.finished(seq, f == FinishReason::Length, now);
        }
        let event = TokenEvent { token, logprob, finish, prompt };
        if finish.is_some() {
            return Some(EngineEvent::Token(event));
        }
        // A closed receiver means the client left; the next step's sweep frees the sequence.
        let _ = seq.events.send(EngineEvent::Token(event));
        None
    }

    fn fail_batch(&mut self, plan: &[Scheduled], message: &str) {
        let mut idx: Vec<usize> = plan.iter().map(|p| p.seq).collect();
        idx.sort_unstable();
        for i in idx.into_iter().rev() {
            let seq = self.sched.finish(i);
            let _ = seq.events.send(EngineEvent::Error(EngineFailure::new(ErrorClass::Internal, message)));
            self.stats.unfinished.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn publish(&mut self) {
        let (running, waiting, usage) = (self.sched.running.len(), self.sched.waiting.len(), self.sched.usage());
        self.stats.running.store(running, Ordering::Relaxed);
        self.stats.waiting.store(waiting, Ordering::Relaxed);
        self.stats.set_kv_usage(usage);
        self.stats.preemptions.store(self.sched.preemptions, Ordering::Relaxed);
        self.stats.prefix_hits.store(self.sched.prefix_hits, Ordering::Relaxed);
        self.stats.prefix_queries.store(self.sched.prefix_queries, Ordering::Relaxed);
        self.metrics.running.set(running as f64);
        self.metrics.waiting.set(waiting as f64);
        self.metrics.kv_usage.set(usage);
        let now = (self.sched.prefix_queries, self.sched.prefix_hits, self.sched.preemptions);
        self.metrics.prefix_queries.increment(now.0 - self.reported.0);
        self.metrics.prefix_hits.increment(now.1 - self.reported.1);
        self.metrics.preemptions.increment(now.2 - self.reported.2);
        self.reported = now;
    }
}
