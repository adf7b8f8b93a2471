//! The decoding loop: greedy or sampled next tokens, stop tokens, a token budget, the
//! no-repeat n-gram guard (DeepSeek's and vLLM's recipes), and a callback per token for
//! streaming.
//!
//! Owns: choosing tokens from logits. Does not own running the model: anything that turns
//! "append this token" into the next logits implements [`Step`] (the decoder with its cache,
//! or a scripted fake in tests). The prompt (with its images) is prefilled by the caller, who
//! passes the last position's logits in.

use std::collections::HashSet;
use std::ops::ControlFlow;

use rand::{Rng, SeedableRng};

/// One decoding step: append `token`, return the logits for the position after it.
pub trait Step {
    type Error;
    fn step(&mut self, token: u32) -> Result<Vec<f32>, Self::Error>;
}

/// Bans any token that would complete an n-gram already seen in the recent window.
/// DeepSeek's vLLM logits processor (`NoRepeatNGramLogitsProcessor`): look at the last
/// `window` tokens of the output, find n-grams whose first `n - 1` tokens equal the last
/// `n - 1` generated tokens, ban their last token unless whitelisted.
#[derive(Debug, Clone, PartialEq)]
pub struct NoRepeatNgram {
    pub n: usize,
    /// `None`: the whole history (transformers' `no_repeat_ngram_size`).
    pub window: Option<usize>,
    pub whitelist: HashSet<u32>,
}

impl NoRepeatNgram {
    /// DeepSeek-OCR's own script: n=20, window 50, `<td>`/`</td>` (128821, 128822) allowed.
    pub fn deepseek() -> Self {
        Self {
            n: 20,
            window: Some(50),
            whitelist: [128821, 128822].into(),
        }
    }

    /// The vLLM recipe: n=30, window 90, same whitelist.
    pub fn vllm() -> Self {
        Self {
            n: 30,
            window: Some(90),
            whitelist: [128821, 128822].into(),
        }
    }

    /// transformers' `no_repeat_ngram_size=n`: whole history, no whitelist.
    pub fn hf(n: usize) -> Self {
        Self {
            n,
            window: None,
            whitelist: HashSet::new(),
        }
    }

    /// Tokens banned as the next one after `history`. (For `n == 1` this bans every token in
    /// the window, as transformers does; DeepSeek's processor would ban nothing there because
    /// `input_ids[-0:]` is the whole list. Nobody runs n=1.)
    pub fn banned(&self, history: &[u32]) -> Vec<u32> {
        let n = self.n;
        if n == 0 || history.len() < n {
            return vec![];
        }
        let prefix = &history[history.len() - (n - 1)..];
        // search_start = max(0, len - window_size); search_end = len - ngram_size + 1
        let start = self.window.map_or(0, |w| history.len().saturating_sub(w));
        let end = history.len() + 1 - n;
        let mut banned: Vec<u32> = (start..end)
            .filter(|&i| &history[i..i + n - 1] == prefix)
            .map(|i| history[i + n - 1])
            .filter(|t| !self.whitelist.contains(t))
            .collect();
        banned.sort_unstable();
        banned.dedup();
        banned
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Sampling {
    /// argmax (`temperature=0`); ties go to the lowest id, as `torch.argmax`.
    Greedy,
    /// softmax(logits / temperature), optionally cut to the `top_k` best and the smallest set
    /// whose mass reaches `top_p`, drawn from a seeded generator.
    Sample {
        temperature: f32,
        top_k: Option<usize>,
        top_p: Option<f32>,
        seed: u64,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct GenerationConfig {
    pub max_new_tokens: usize,
    /// Generation stops after emitting one of these (it is included in the output).
    pub stop_tokens: Vec<u32>,
    pub sampling: Sampling,
    pub no_repeat: Option<NoRepeatNgram>,
    /// Whether the n-gram guard also sees the prompt (transformers: yes; vLLM: output only).
    pub ngram_sees_prompt: bool,
}

impl GenerationConfig {
    /// How DeepSeek runs the model: greedy, eos 1, 8192 tokens, DeepSeek's n-gram guard.
    pub fn deepseek_ocr() -> Self {
        Self {
            max_new_tokens: 8192,
            stop_tokens: vec![1],
            sampling: Sampling::Greedy,
            no_repeat: Some(NoRepeatNgram::deepseek()),
            ngram_sees_prompt: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    StopToken,
    MaxTokens,
    /// The callback said stop.
    Callback,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    pub tokens: Vec<u32>,
    pub stop: StopReason,
}

fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

fn sample(
    logits: &[f32],
    temperature: f32,
    top_k: Option<usize>,
    top_p: Option<f32>,
    rng: &mut rand::rngs::StdRng,
) -> u32 {
    if temperature <= 0.0 {
        return argmax(logits);
    }
    let mut cand: Vec<(usize, f32)> = logits
        .iter()
        .enumerate()
        .filter(|(_, v)| v.is_finite())
        .map(|(i, &v)| (i, v / temperature))
        .collect();
    if cand.is_empty() {
        return argmax(logits);
    }
    cand.sort_by(|a, b| {
        b.1.partial_cmp(&a.1)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.0.cmp(&b.0))
    });
    if let Some(k) = top_k {
        cand.truncate(k.max(1));
    }
    let max = cand[0].1;
    let mut probs: Vec<f32> = cand.iter().map(|(_, v)| (v - max).exp()).collect();
    let sum: f32 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= sum);
    if let Some(p) = top_p {
        let mut acc = 0.0;
        let mut keep = probs.len();
        for (i, q) in probs.iter().enumerate() {
            acc += q;
            if acc >= p {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
        cand.truncate(keep);
        let s: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= s);
    }
    let r: f32 = rng.random();
    let mut acc = 0.0;
    for (i, q) in probs.iter().enumerate() {
        acc += q;
        if r < acc {
            return cand[i].0 as u32;
        }
    }
    cand[cand.len() - 1].0 as u32
}

/// Decodes from `first_logits` (the prompt's last position) until a stop token, the budget or
/// the callback ends it. `on_token` sees each token as it is chosen.
pub fn generate<S: Step>(
    model: &mut S,
    prompt: &[u32],
    first_logits: Vec<f32>,
    cfg: &GenerationConfig,
    mut on_token: impl FnMut(u32) -> ControlFlow<()>,
) -> Result<Generated, S::Error> {
    let mut rng = match cfg.sampling {
        Sampling::Sample { seed, .. } => rand::rngs::StdRng::seed_from_u64(seed),
        Sampling::Greedy => rand::rngs::StdRng::seed_from_u64(0),
    };
    let mut history: Vec<u32> = if cfg.ngram_sees_prompt {
        prompt.to_vec()
    } else {
        vec![]
    };
    let mut out = Vec::new();
    let mut logits = first_logits;
    loop {
        if out.len() >= cfg.max_new_tokens {
            return Ok(Generated {
                tokens: out,
                stop: StopReason::MaxTokens,
            });
        }
        if let Some(g) = &cfg.no_repeat {
            for t in g.banned(&history) {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        let tok = match &cfg.sampling {
            Sampling::Greedy => argmax(&logits),
            Sampling::Sample {
                temperature,
                top_k,
                top_p,
                ..
            } => sample(&logits, *temperature, *top_k, *top_p, &mut rng),
        };
        out.push(tok);
        history.push(tok);
        let flow = on_token(tok);
        if cfg.stop_tokens.contains(&tok) {
            return Ok(Generated {
                tokens: out,
                stop: StopReason::StopToken,
            });
        }
        if flow.is_break() {
            return Ok(Generated {
                tokens: out,
                stop: StopReason::Callback,
            });
        }
        if out.len() >= cfg.max_new_tokens {
            return Ok(Generated {
                tokens: out,
                stop: StopReason::MaxTokens,
            });
        }
        logits = model.step(tok)?;
    }
}

/// [`generate`] one token at a time, for a caller that interleaves many sequences (the
/// server's continuous batching): the same choices, stops and order as `generate`, with the
/// model step left to the caller. Feed it the prompt's last logits, then after each chosen
/// token (while [`Decoding::stop`] is `None`) the logits of the step that appended it.
#[derive(Debug, Clone)]
pub struct Decoding {
    cfg: GenerationConfig,
    rng: rand::rngs::StdRng,
    history: Vec<u32>,
    out: Vec<u32>,
    stop: Option<StopReason>,
}

impl Decoding {
    pub fn new(cfg: GenerationConfig, prompt: &[u32]) -> Self {
        let seed = match cfg.sampling {
            Sampling::Sample { seed, .. } => seed,
            Sampling::Greedy => 0,
        };
        let history = if cfg.ngram_sees_prompt {
            prompt.to_vec()
        } else {
            vec![]
        };
        Self {
            rng: rand::rngs::StdRng::seed_from_u64(seed),
            history,
            out: vec![],
            stop: if cfg.max_new_tokens == 0 {
                Some(StopReason::MaxTokens)
            } else {
                None
            },
            cfg,
        }
    }

    /// Chooses the next token from `logits`; `None` once the sequence has ended. After it
    /// returns a token, [`Self::stop`] says whether that token ended the sequence.
    pub fn choose(&mut self, mut logits: Vec<f32>) -> Option<u32> {
        if self.stop.is_some() {
            return None;
        }
        if let Some(g) = &self.cfg.no_repeat {
            for t in g.banned(&self.history) {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        let tok = match &self.cfg.sampling {
            Sampling::Greedy => argmax(&logits),
            Sampling::Sample {
                temperature,
                top_k,
                top_p,
                ..
            } => sample(&logits, *temperature, *top_k, *top_p, &mut self.rng),
        };
        self.out.push(tok);
        self.history.push(tok);
        if self.cfg.stop_tokens.contains(&tok) {
            self.stop = Some(StopReason::StopToken);
        } else if self.out.len() >= self.cfg.max_new_tokens {
            self.stop = Some(StopReason::MaxTokens);
        }
        Some(tok)
    }

    /// Ends the sequence now (the caller's "stop", as a callback's `Break` in `generate`).
    pub fn cancel(&mut self) {
        self.stop.get_or_insert(StopReason::Callback);
    }

    pub fn stop(&self) -> Option<StopReason> {
        self.stop
    }

    /// The tokens chosen so far.
    pub fn tokens(&self) -> &[u32] {
        &self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake model whose next-token preference is scripted: always wants `cycle[i % len]`.
    struct Scripted {
        cycle: Vec<u32>,
        i: usize,
        vocab: usize,
    }

    impl Scripted {
        fn logits(&self) -> Vec<f32> {
            let mut l = vec![0.0; self.vocab];
            l[self.cycle[self.i % self.cycle.len()] as usize] = 5.0;
            // A clear second choice so banning has somewhere to go.
            l[self.vocab - 1] = 1.0;
            l
        }
    }

    impl Step for Scripted {
        type Error = std::convert::Infallible;
        fn step(&mut self, _token: u32) -> Result<Vec<f32>, Self::Error> {
            self.i += 1;
            Ok(self.logits())
        }
    }

    fn cfg(max: usize) -> GenerationConfig {
        GenerationConfig {
            max_new_tokens: max,
            stop_tokens: vec![1],
            sampling: Sampling::Greedy,
            no_repeat: None,
            ngram_sees_prompt: false,
        }
    }

    #[test]
    fn greedy_stops_on_stop_token_and_streams() {
        let mut m = Scripted {
            cycle: vec![5, 6, 1, 7],
            i: 0,
            vocab: 10,
        };
        let first = m.logits();
        let mut seen = vec![];
        let g = generate(&mut m, &[], first, &cfg(100), |t| {
            seen.push(t);
            ControlFlow::Continue(())
        })
        .unwrap();
        assert_eq!(g.tokens, vec![5, 6, 1]);
        assert_eq!(g.stop, StopReason::StopToken);
        assert_eq!(seen, g.tokens);
    }

    #[test]
    fn max_tokens_and_callback_stop() {
        let mut m = Scripted {
            cycle: vec![4],
            i: 0,
            vocab: 10,
        };
        let first = m.logits();
        let g = generate(&mut m, &[], first, &cfg(3), |_| ControlFlow::Continue(())).unwrap();
        assert_eq!((g.tokens.len(), g.stop), (3, StopReason::MaxTokens));
        let mut m = Scripted {
            cycle: vec![4],
            i: 0,
            vocab: 10,
        };
        let first = m.logits();
        let g = generate(&mut m, &[], first, &cfg(9), |_| ControlFlow::Break(())).unwrap();
        assert_eq!((g.tokens, g.stop), (vec![4], StopReason::Callback));
    }

    #[test]
    fn ngram_guard_breaks_a_loop() {
        // The model loops 2,3,2,3,...; with n=3 the trigram (2,3,2) may appear once, then
        // after "2 3" the token 2 is banned and the second choice (9) comes instead; the
        // scripted model then wants 3.
        let mut m = Scripted {
            cycle: vec![2, 3],
            i: 0,
            vocab: 10,
        };
        let mut c = cfg(6);
        c.no_repeat = Some(NoRepeatNgram {
            n: 3,
            window: None,
            whitelist: HashSet::new(),
        });
        let first = m.logits();
        let g = generate(&mut m, &[], first, &c, |_| ControlFlow::Continue(())).unwrap();
        assert_eq!(g.tokens, vec![2, 3, 2, 3, 9, 3]);
    }

    #[test]
    fn ngram_window_and_whitelist() {
        let g = NoRepeatNgram {
            n: 2,
            window: None,
            whitelist: HashSet::new(),
        };
        assert_eq!(g.banned(&[7, 8, 7]), vec![8]);
        let g = NoRepeatNgram {
            n: 2,
            window: None,
            whitelist: [8].into(),
        };
        assert!(g.banned(&[7, 8, 7]).is_empty());
        // window 2 only sees the last two tokens [8, 7]: no earlier "7 x" bigram
        let g = NoRepeatNgram {
            n: 2,
            window: Some(2),
            whitelist: HashSet::new(),
        };
        assert!(g.banned(&[7, 8, 7]).is_empty());
        assert_eq!(NoRepeatNgram::deepseek().n, 20);
        assert_eq!(NoRepeatNgram::vllm().window, Some(90));
    }

    #[test]
    fn sampling_is_seeded_and_respects_top_k() {
        let logits = vec![1.0, 1.1, 0.9, -5.0];
        let draw = |seed| {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            (0..50)
                .map(|_| sample(&logits, 1.0, Some(2), None, &mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(3), draw(3));
        assert!(draw(3).iter().all(|&t| t == 0 || t == 1));
    }
    #[test]
    fn decoding_step_by_step_chooses_what_generate_chooses() {
        let configs = [
            cfg(0),
            cfg(1),
            cfg(7),
            GenerationConfig {
                no_repeat: Some(NoRepeatNgram::hf(3)),
                ngram_sees_prompt: true,
                ..cfg(12)
            },
            GenerationConfig {
                sampling: Sampling::Sample {
                    temperature: 2.0,
                    top_k: Some(4),
                    top_p: Some(0.9),
                    seed: 11,
                },
                ..cfg(20)
            },
        ];
        for c in configs {
            for cycle in [vec![2, 3], vec![5, 6, 1, 7], vec![4]] {
                let prompt = [2, 3, 2];
                let mut m = Scripted {
                    cycle: cycle.clone(),
                    i: 0,
                    vocab: 10,
                };
                let first = m.logits();
                let want =
                    generate(&mut m, &prompt, first, &c, |_| ControlFlow::Continue(())).unwrap();
                let mut m = Scripted {
                    cycle,
                    i: 0,
                    vocab: 10,
                };
                let mut d = Decoding::new(c.clone(), &prompt);
                let mut logits = m.logits();
                while let Some(t) = d.choose(logits) {
                    if d.stop().is_some() {
                        break;
                    }
                    logits = m.step(t).unwrap();
                }
                assert_eq!(d.tokens(), want.tokens.as_slice(), "{c:?}");
                assert_eq!(d.stop(), Some(want.stop), "{c:?}");
                assert_eq!(d.choose(vec![0.0; 10]), None);
            }
        }
        let mut d = Decoding::new(cfg(5), &[]);
        assert_eq!((d.choose(vec![0.0, 0.0, 1.0]), d.stop()), (Some(2), None));
        d.cancel();
        assert_eq!(
            (d.choose(vec![0.0, 0.0, 1.0]), d.stop()),
            (None, Some(StopReason::Callback))
        );
    }
}
