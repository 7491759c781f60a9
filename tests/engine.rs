//! The serving engine against the plain forward pass: continuous batching, chunked prefill, paged KV
//! with sliding-window freeing, preemption and prefix caching must not change a single token.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use switchyard_worker::engine::{Engine, EngineConfig, EngineEvent, EngineHandle, EngineRequest, FinishReason, SamplingParams};
use switchyard_worker::{ForwardChunk, Gemma4Model, GenerateOptions, LogitsFor, greedy_generate};

fn model() -> Arc<Gemma4Model> {
    Arc::new(common::load("tiny-bf16"))
}

/// Deterministic prompts of mixed lengths, longer ones well past the 16-token sliding window.
fn prompts(n: usize) -> Vec<Vec<u32>> {
    (0..n).map(|i| (0..(1 + (i * 13) % 70)).map(|j| 2 + ((i * 31 + j * 17 + j * j) % 500) as u32).collect()).collect()
}

fn config(model: &Gemma4Model, blocks: usize, block_size: usize, max_num_seqs: usize, max_batched: usize) -> EngineConfig {
    common::engine_config(model, blocks, block_size, max_num_seqs, max_batched, 128)
}

/// A plain request: no images, no grammar, nothing to resume.
fn request(prompt: Vec<u32>, params: SamplingParams) -> EngineRequest {
    EngineRequest { prompt, params, resume: vec![], constraint: None, images: vec![], traceparent: None }
}

fn greedy(max_tokens: usize) -> SamplingParams {
    SamplingParams { temperature: 0.0, max_tokens, ignore_eos: true, logprobs: Some(3), ..Default::default() }
}

/// Collects every token of a request; panics on an engine error.
fn collect(mut rx: tokio::sync::mpsc::UnboundedReceiver<EngineEvent>) -> (Vec<u32>, Vec<EngineEvent>) {
    let mut events = Vec::new();
    let mut tokens = Vec::new();
    while let Some(ev) = rx.blocking_recv() {
        match &ev {
            EngineEvent::Token(t) => tokens.push(t.token),
            EngineEvent::Error(e) => panic!("engine error: {e}"),
        }
        let done = matches!(&ev, EngineEvent::Token(t) if t.finish.is_some());
        events.push(ev);
        if done {
            break;
        }
    }
    (tokens, events)
}

fn run_all(engine: &EngineHandle, prompts: &[Vec<u32>], params: &SamplingParams) -> Vec<Vec<u32>> {
    let rxs: Vec<_> = prompts.iter().map(|p| engine.submit(request(p.clone(), params.clone())).unwrap().1).collect();
    rxs.into_iter().map(|rx| collect(rx).0).collect()
}

fn expected(m: &Gemma4Model, prompts: &[Vec<u32>], max_tokens: usize) -> Vec<Vec<u32>> {
    let opts = GenerateOptions { max_tokens, top_logprobs: 1, stop_ids: Vec::new() };
    prompts.iter().map(|p| greedy_generate(m, p, &opts, |_| {}).unwrap().iter().map(|s| s.token).collect()).collect()
}

#[test]
fn batched_paged_engine_equals_plain_greedy_generation() {
    let m = model();
    let ps = prompts(24);
    let want = expected(&m, &ps, 20);
    let roomy = Engine::start(m.clone(), config(&m, 4096, 16, 64, 2048)).unwrap();
    assert_eq!(run_all(&roomy, &ps, &greedy(20)), want, "all at once, roomy cache");
    // Tiny token budget (chunked prefill mixed with decode), 4-token blocks, a few sequences at a time.
    let tight = Engine::start(m.clone(), config(&m, 34, 4, 8, 9)).unwrap();
    assert_eq!(run_all(&tight, &ps, &greedy(20)), want, "chunked prefill, preemption");
    assert!(tight.stats().preemptions.load(Ordering::Relaxed) > 0, "the tight cache should have forced preemptions");
    assert_eq!(tight.stats().kv_usage(), 0.0, "every block is free again");
    // One request at a time through the same engine.
    for (p, w) in ps.iter().zip(&want).take(6) {
        assert_eq!(&run_all(&tight, std::slice::from_ref(p), &greedy(20))[0], w);
    }
}

#[test]
fn repeated_prompt_hits_the_prefix_cache_with_identical_output() {
    let m = model();
    let engine = Engine::start(m.clone(), config(&m, 256, 4, 8, 64)).unwrap();
    let prompt: Vec<u32> = (0..50).map(|i| 3 + (i * 7 % 400)).collect();
    let req = || request(prompt.clone(), greedy(12));
    let (first, ev1) = collect(engine.submit(req()).unwrap().1);
    let (second, ev2) = collect(engine.submit(req()).unwrap().1);
    assert_eq!(first, second);
    let cached = |ev: &[EngineEvent]| match &ev[0] {
        EngineEvent::Token(t) => t.prompt.as_ref().unwrap().cached_tokens,
        _ => unreachable!(),
    };
    assert_eq!(cached(&ev1), 0);
    // 49 of 50 prompt tokens may come from the cache: 12 full blocks of 4.
    assert_eq!(cached(&ev2), 48);
    assert_eq!(engine.stats().prefix_hits.load(Ordering::Relaxed), 48);
    // Logprobs are identical too.
    assert_eq!(ev1, {
        let mut e = ev2.clone();
        if let EngineEvent::Token(t) = &mut e[0] {
            t.prompt.as_mut().unwrap().cached_tokens = 0;
        }
        e
    });
}

#[test]
fn seeded_sampling_is_reproducible_at_any_concurrency() {
    let m = model();
    let engine = Engine::start(m.clone(), config(&m, 1024, 16, 32, 256)).unwrap();
    let params = SamplingParams {
        temperature: 0.9,
        top_p: 0.95,
        top_k: 50,
        seed: Some(1234),
        max_tokens: 16,
        ignore_eos: true,
        ..Default::default()
    };
    let ps = prompts(10);
    let together = run_all(&engine, &ps, &params);
    let alone: Vec<Vec<u32>> = ps.iter().map(|p| run_all(&engine, std::slice::from_ref(p), &params).remove(0)).collect();
    assert_eq!(together, alone);
    let greedy_out = run_all(&engine, &ps, &greedy(16));
    assert_ne!(together, greedy_out, "sampling at temperature 0.9 should differ from greedy somewhere");
}

#[test]
fn prompt_logprobs_match_a_full_forward() {
    let m = model();
    let engine = Engine::start(m.clone(), config(&m, 256, 4, 8, 5)).unwrap();
    let prompt: Vec<u32> = (0..23).map(|i| 2 + (i * 11 % 300)).collect();
    let params = SamplingParams { prompt_logprobs: Some(2), ..greedy(1) };
    let (_, events) = collect(engine.submit(request(prompt.clone(), params)).unwrap().1);
    let EngineEvent::Token(t) = &events[0] else { unreachable!() };
    let got = t.prompt.as_ref().unwrap().logprobs.as_ref().unwrap();
    assert_eq!(got.len(), prompt.len() - 1);
    let mut cache = m.new_cache();
    let all = m.forward(&mut [ForwardChunk { tokens: &prompt, cache: &mut cache, logits: LogitsFor::All }]).unwrap().remove(0);
    let vocab = m.config.vocab_size;
    for (p, lp) in got.iter().enumerate() {
        let want = switchyard_kernels::ops::log_softmax(&all[p * vocab..(p + 1) * vocab]);
        assert_eq!(lp.token, prompt[p + 1]);
        assert_eq!(lp.logprob, want[prompt[p + 1] as usize], "position {}", p + 1);
        assert_eq!(lp.top.len(), 2);
    }
}

#[test]
fn stops_on_eos_and_stop_ids_and_respects_min_tokens() {
    let m = model();
    let engine = Engine::start(m.clone(), config(&m, 512, 16, 8, 256)).unwrap();
    let prompt = prompts(3)[2].clone();
    let free = run_all(&engine, std::slice::from_ref(&prompt), &greedy(10)).remove(0);
    // Make the 4th greedy token a stop token id: generation ends right there, reporting it.
    let stop = free[3];
    let first = free.iter().position(|&t| t == stop).unwrap();
    let params = SamplingParams { ignore_eos: false, stop_token_ids: vec![stop], ..greedy(10) };
    let (toks, ev) = collect(engine.submit(request(prompt.clone(), params.clone())).unwrap().1);
    assert_eq!(toks, free[..=first].to_vec());
    let EngineEvent::Token(last) = ev.last().unwrap() else { unreachable!() };
    assert_eq!(last.finish, Some(FinishReason::Stop(Some(stop))));
    // min_tokens past the stop position keeps the stop id from being chosen until then.
    let params = SamplingParams { min_tokens: first + 2, ..params };
    let (toks, _) = collect(engine.submit(request(prompt, params)).unwrap().1);
    assert!(toks.len() > first + 1 && !toks[..first + 2].contains(&stop));
}

#[test]
fn a_dropped_receiver_frees_its_blocks() {
    let m = model();
    let engine = Engine::start(m.clone(), config(&m, 256, 4, 8, 64)).unwrap();
    let (_, mut rx) = engine.submit(request(prompts(5)[4].clone(), greedy(60))).unwrap();
    assert!(matches!(rx.blocking_recv(), Some(EngineEvent::Token(_))));
    drop(rx);
    // The engine sweeps closed requests before every step. A second, short request is the sync
    // point: once it has finished, the dropped one must be gone too.
    let (toks, _) = collect(engine.submit(request(vec![2, 3], greedy(2))).unwrap().1);
    assert_eq!(toks.len(), 2);
    assert_eq!(engine.stats().unfinished.load(Ordering::Relaxed), 0);
    assert_eq!(engine.stats().kv_usage(), 0.0);
}

#[test]
fn requests_beyond_the_limits_are_refused() {
    let m = model();
    let engine = Engine::start(m.clone(), config(&m, 256, 4, 8, 64)).unwrap();
    let long = request(vec![5; 100], greedy(40));
    assert!(matches!(
        engine.submit(long),
        Err(switchyard_worker::engine::EngineError::ContextTooLong { max: 128, requested: 140, prompt: 100 })
    ));
    assert!(engine.submit(request(vec![600], greedy(1))).is_err());
    assert!(engine.submit(request(vec![], greedy(1))).is_err());
    assert!(Engine::start(m.clone(), config(&m, 8, 4, 8, 64)).is_err(), "8 blocks of 4 cannot hold 128 positions");
}

/// A request replayed from its prompt plus the first tokens it produced (what the router does after
/// an attention worker dies) continues with exactly the tokens the uninterrupted run produced,
/// greedy and seeded-sampled alike, and reports only the new ones.
#[test]
fn a_resumed_request_continues_exactly_where_it_left_off() {
    let m = model();
    let engine = Engine::start(m.clone(), config(&m, 1024, 16, 8, 256)).unwrap();
    let prompt = prompts(4)[3].clone();
    let sampled = SamplingParams { temperature: 0.9, top_p: 0.95, seed: Some(11), presence_penalty: 0.5, ..greedy(16) };
    for params in [greedy(16), sampled] {
        let (full, _) = collect(engine.submit(request(prompt.clone(), params.clone())).unwrap().1);
        assert_eq!(full.len(), 16);
        for cut in [1, 7, 15] {
            let req = EngineRequest { resume: full[..cut].to_vec(), ..request(prompt.clone(), params.clone()) };
            let (rest, _) = collect(engine.submit(req).unwrap().1);
            assert_eq!(rest, full[cut..].to_vec(), "resumed after {cut} tokens (temperature {})", params.temperature);
        }
    }
    let done = EngineRequest { resume: vec![1; 16], ..request(prompt, greedy(16)) };
    assert!(engine.submit(done).is_err(), "nothing left to generate");
}

/// Structured output inside the engine: a grammar-constrained request produces exactly what the
/// grammar allows, ends on EOS once it is complete even under `min_tokens`, resumes with its grammar
/// state replayed, runs beside unconstrained requests without changing them, and a replay that breaks
/// the grammar is an error that leaves nothing behind.
#[test]
fn grammar_constrained_requests_in_the_engine() {
    use switchyard_engine_api::{ErrorClass, GrammarRequest, GrammarSpec, TokenConstraint};
    use switchyard_grammar::GrammarEnv;
    let m = model();
    let text = std::fs::read_to_string(common::fixtures().join("tiny-bf16").join("tokenizer.json")).unwrap();
    let env = GrammarEnv::from_tokenizer_json(&text, m.config.vocab_size, &[1]).unwrap();
    let tok = tokenizers::Tokenizer::from_file(common::fixtures().join("tiny-bf16").join("tokenizer.json")).unwrap();
    let engine = Engine::start(m.clone(), config(&m, 1024, 16, 8, 256)).unwrap();
    let g = GrammarRequest {
        spec: GrammarSpec::Regex { regex: "[a-e]{3,6}!".into() },
        after_token: None,
        also_after: vec![],
        start_tokens: vec![],
    };
    let prompt = prompts(3)[2].clone();
    let params =
        SamplingParams { temperature: 1.0, seed: Some(4), max_tokens: 40, min_tokens: 30, grammar: Some(g.clone()), ..Default::default() };
    let submit = |resume: Vec<u32>, params: SamplingParams, constraint: switchyard_grammar::Constraint| {
        let constraint = Some(Box::new(constraint) as Box<dyn TokenConstraint>);
        engine.submit(EngineRequest { constraint, resume, ..request(prompt.clone(), params) }).unwrap().1
    };
    // Unconstrained neighbours, before and alongside.
    let alone = run_all(&engine, &prompts(4), &greedy(12));
    let rx = submit(vec![], params.clone(), env.compile(&g).unwrap());
    let beside = run_all(&engine, &prompts(4), &greedy(12));
    assert_eq!(alone, beside);
    let (full, events) = collect(rx);
    let body = &full[..full.len() - 1];
    let s = tok.decode(body, false).unwrap();
    assert!(s.len() >= 4 && s.len() <= 7 && s.ends_with('!') && s[..s.len() - 1].chars().all(|c| ('a'..='e').contains(&c)), "{s:?}");
    match events.last() {
        Some(EngineEvent::Token(t)) => {
            assert_eq!((t.token, t.finish), (1, Some(FinishReason::Stop(None))), "ends on EOS despite min_tokens")
        }
        other => panic!("{other:?}"),
    }
    // Replayed from the middle: the grammar consumes the replayed tokens and the rest is identical.
    let (rest, _) = collect(submit(body[..2].to_vec(), params.clone(), env.compile(&g).unwrap()));
    assert_eq!(rest, full[2..].to_vec());
    // A replay the grammar cannot accept is refused, and the engine is left clean.
    let bad = tok.encode("zzz", false).unwrap().get_ids().to_vec();
    let mut rx = submit(bad, params, env.compile(&g).unwrap());
    match rx.blocking_recv() {
        Some(EngineEvent::Error(f)) => assert_eq!(f.class, ErrorClass::Grammar, "a grammar failure is the client's: {f:?}"),
        other => panic!("a broken replay was not refused: {other:?}"),
    }
    assert_eq!(engine.stats().unfinished.load(Ordering::Relaxed), 0);
}

/// `--async-scheduling`: grammar masks computed on a helper thread during the forward pass give the
/// same tokens, log-probs and events as masks computed after it, for constrained requests batched with
/// unconstrained ones and with a grammar that starts after a token (a waiting constraint).
#[test]
fn async_scheduling_changes_no_output() {
    use switchyard_engine_api::{GrammarRequest, GrammarSpec, TokenConstraint};
    use switchyard_grammar::GrammarEnv;
    let m = model();
    let text = std::fs::read_to_string(common::fixtures().join("tiny-bf16").join("tokenizer.json")).unwrap();
    let env = GrammarEnv::from_tokenizer_json(&text, m.config.vocab_size, &[1]).unwrap();
    let grammars = [
        GrammarRequest {
            spec: GrammarSpec::Regex { regex: "[a-e]{3,6}!".into() },
            after_token: None,
            also_after: vec![],
            start_tokens: vec![],
        },
        GrammarRequest {
            spec: GrammarSpec::Choice { choices: vec!["yes".into(), "no".into()] },
            after_token: Some(prompts(1)[0][0]),
            also_after: vec![],
            start_tokens: vec![],
        },
    ];
    let run = |async_scheduling: bool| {
        let mut c = config(&m, 1024, 16, 8, 256);
        c.async_scheduling = async_scheduling;
        let engine = Engine::start(m.clone(), c).unwrap();
        let rxs: Vec<_> = prompts(6)
            .into_iter()
            .enumerate()
            .map(|(i, p)| {
                let g = (i % 3 < 2).then(|| grammars[i % 2].clone());
                let params = SamplingParams {
                    temperature: 0.8,
                    seed: Some(i as u64),
                    max_tokens: 24,
                    logprobs: Some(2),
                    grammar: g.clone(),
                    ..Default::default()
                };
                let constraint = g.map(|g| Box::new(env.compile(&g).unwrap()) as Box<dyn TokenConstraint>);
                engine.submit(EngineRequest { constraint, ..request(p, params) }).unwrap().1
            })
            .collect();
        rxs.into_iter().map(|rx| collect(rx).1).collect::<Vec<_>>()
    };
    assert_eq!(run(true), run(false));
}

/// `--kv-cache-dtype`: the model's dtype (bf16 here) takes half the bytes of f32 and changes nothing;
/// fp8 takes half again and costs accuracy, which this measures (prints) and bounds.
#[test]
fn kv_cache_dtypes_halve_memory_and_bf16_is_lossless() {
    use switchyard_worker::kv_cache::KvDtype;
    let m = model();
    let start = |dtype: KvDtype| {
        let mut c = common::engine_config(&m, 0, 16, 8, 256, 512);
        c.kv_cache_bytes = 4 << 20;
        c.kv_dtype = dtype;
        Engine::start(m.clone(), c).unwrap()
    };
    let (wide, bf16, fp8) = (start(KvDtype::F32), start(KvDtype::Bf16), start(KvDtype::Fp8E4m3));
    let layout = |e: &EngineHandle| e.stats().cache_layout().unwrap();
    assert_eq!(KvDtype::of_model(m.dtype), KvDtype::Bf16, "auto is the model's dtype");
    assert_eq!(layout(&wide).bytes_per_token(), 2 * layout(&bf16).bytes_per_token());
    assert_eq!(layout(&bf16).bytes_per_token(), 2 * layout(&fp8).bytes_per_token());
    assert!(layout(&bf16).global_blocks >= 2 * layout(&wide).global_blocks, "{:?} vs {:?}", layout(&bf16), layout(&wide));
    assert!(layout(&fp8).global_blocks >= 2 * layout(&bf16).global_blocks);

    // Lossless: every token and log-prob of a bf16 cache equals an f32 cache's.
    let ps = prompts(8);
    let events = |e: &EngineHandle| -> Vec<Vec<EngineEvent>> {
        let rxs: Vec<_> = ps.iter().map(|p| e.submit(request(p.clone(), greedy(12))).unwrap().1).collect();
        rxs.into_iter().map(|rx| collect(rx).1).collect()
    };
    assert_eq!(events(&bf16), events(&wide));

    // fp8's cost, teacher-forced over a prompt well past the sliding window: the log-prob of each
    // next prompt token and of the bf16 cache's top-5 tokens, fp8 against bf16.
    let prompt: Vec<u32> = (0..160).map(|i| 2 + (i * 37 % 480)).collect();
    let prompt_lps = |e: &EngineHandle| {
        let params = SamplingParams { prompt_logprobs: Some(5), ..greedy(1) };
        let (_, ev) = collect(e.submit(request(prompt.clone(), params)).unwrap().1);
        let EngineEvent::Token(t) = &ev[0] else { unreachable!() };
        t.prompt.as_ref().unwrap().logprobs.clone().unwrap()
    };
    let (exact, lossy) = (prompt_lps(&bf16), prompt_lps(&fp8));
    let (mut max_d, mut sum_d, mut n, mut top1_same) = (0f32, 0f32, 0usize, 0usize);
    for (a, b) in exact.iter().zip(&lossy) {
        for &(tok, lp) in a.top.iter().chain(std::iter::once(&(a.token, a.logprob))) {
            if let Some(&(_, lq)) = b.top.iter().chain(std::iter::once(&(b.token, b.logprob))).find(|(t, _)| *t == tok) {
                max_d = max_d.max((lp - lq).abs());
                sum_d += (lp - lq).abs();
                n += 1;
            }
        }
        top1_same += usize::from(a.top[0].0 == b.top[0].0);
    }
    let positions = exact.len();
    eprintln!(
        "fp8 KV vs bf16 KV over {positions} positions: |d logprob| mean {:.4}, max {:.4} ({n} pairs); top-1 equal at {top1_same}/{positions}",
        sum_d / n as f32,
        max_d
    );
    assert!(n >= positions, "the prompt tokens' log-probs are always compared");
    assert!(max_d > 0.0, "fp8 rounds keys and values: some log-prob must move");
    // Random-weight fixtures have no learned structure to absorb the rounding (2.3% relative per
    // element), so the cost here is large (docs/serving.md has the figures); the bound catches a
    // broken fp8 path (garbage keys move every log-prob by nats), not a regression of a few percent.
    assert!(sum_d / (n as f32) < 1.0 && top1_same * 2 >= positions, "fp8 drifted further from bf16 than measured");
}
