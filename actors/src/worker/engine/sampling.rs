//! From logits to the next token: repetition penalty, OpenAI's presence and frequency
//! penalties and logit bias, temperature (0 = greedy), top-k, min-p and top-p, drawn with
//! a seeded generator so the same seed gives the same tokens.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::native::cpu;
use super::native::vmath::exp_in_place;

/// How to choose tokens. Defaults: temperature 0.8, top-p 0.95, top-k 40, min-p 0.05,
/// repetition penalty 1.1 over the last 64 tokens, random seed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// 0 picks the most likely token (greedy); higher flattens the distribution.
    pub temperature: f32,
    /// Keep the smallest set of tokens whose probabilities add up to this (1 = off).
    pub top_p: f32,
    /// Keep only this many most likely tokens (0 = off).
    pub top_k: usize,
    /// Drop tokens less likely than this fraction of the most likely one (0 = off).
    pub min_p: f32,
    /// Above 1 discourages tokens seen in the last `repeat_last_n` (1 = off).
    pub repetition_penalty: f32,
    /// How many recent tokens the repetition penalty looks at.
    pub repeat_last_n: usize,
    /// The generator's seed; drawn at random when absent (and reported back).
    pub seed: Option<u64>,
    /// Subtracted once from the logit of every token generated so far (OpenAI's
    /// `presence_penalty`, −2 to 2; 0 = off).
    pub presence_penalty: f32,
    /// Subtracted from a generated token's logit once per time it was generated (OpenAI's
    /// `frequency_penalty`, −2 to 2; 0 = off).
    pub frequency_penalty: f32,
    /// Added to these tokens' logits (OpenAI's `logit_bias`: −100 to 100, at most
    /// [`MAX_LOGIT_BIAS`] tokens; −100 bans a token, 100 all but forces it).
    pub logit_bias: Vec<(u32, f32)>,
}

/// Most tokens a request may bias.
pub const MAX_LOGIT_BIAS: usize = 1024;

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.8,
            top_p: 0.95,
            top_k: 40,
            min_p: 0.05,
            repetition_penalty: 1.1,
            repeat_last_n: 64,
            seed: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
        }
    }
}

impl SamplingParams {
    /// Greedy decoding with no penalty: the same prompt always gives the same tokens.
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            repeat_last_n: 0,
            seed: Some(0),
            ..SamplingParams::default()
        }
    }

    /// Refuses values that have no meaning (NaN, negative temperature, top-p outside (0, 1]).
    pub fn validate(&self) -> Result<(), SamplingError> {
        let bad = |param: &'static str, value: f32, expected: &'static str| {
            Err(SamplingError::InvalidParameter {
                param,
                value: value.to_string(),
                expected,
            })
        };
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return bad("temperature", self.temperature, "a finite number >= 0");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", self.top_p, "a number in (0, 1]");
        }
        if !(self.min_p >= 0.0 && self.min_p < 1.0) {
            return bad("min_p", self.min_p, "a number in [0, 1)");
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return bad(
                "repetition_penalty",
                self.repetition_penalty,
                "a finite number > 0",
            );
        }
        for (param, value) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&value) {
                return bad(param, value, "a number in [-2, 2]");
            }
        }
        if self.logit_bias.len() > MAX_LOGIT_BIAS {
            return Err(SamplingError::InvalidParameter {
                param: "logit_bias",
                value: format!("{} tokens", self.logit_bias.len()),
                expected: "at most 1024 tokens",
            });
        }
        if let Some((_, bias)) = self
            .logit_bias
            .iter()
            .find(|(_, b)| !(-100.0..=100.0).contains(b))
        {
            return bad("logit_bias", *bias, "biases in [-100, 100]");
        }
        Ok(())
    }
}

/// Errors of sampling.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SamplingError {
    /// A parameter out of its range; nothing was generated.
    #[error("invalid {param} {value}: expected {expected}")]
    InvalidParameter {
        /// The parameter's name, as in the API.
        param: &'static str,
        /// The value given.
        value: String,
        /// What is accepted.
        expected: &'static str,
    },
    /// The model produced NaN or infinite logits (a broken model or numeric overflow).
    #[error("the model produced non-finite logits")]
    NonFiniteLogits,
    /// The model produced no logits at all.
    #[error("the model produced an empty vocabulary")]
    EmptyLogits,
}

/// Chooses tokens for one sequence.
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    seed: u64,
    rng: StdRng,
    /// Where the generated tokens start in the history `sample` is given (the presence
    /// and frequency penalties count only those).
    generated_from: usize,
}

impl Sampler {
    /// A sampler for `params`, validated; draws a seed if none is given.
    pub fn new(params: SamplingParams) -> Result<Self, SamplingError> {
        params.validate()?;
        let seed = params.seed.unwrap_or_else(|| rand::rng().random());
        Ok(Sampler {
            params,
            seed,
            rng: StdRng::seed_from_u64(seed),
            generated_from: 0,
        })
    }

    /// Tells the sampler that the first `prompt_tokens` of each history are the prompt,
    /// not generated (before this, the presence and frequency penalties count them all).
    pub fn generated_after(&mut self, prompt_tokens: usize) {
        self.generated_from = prompt_tokens;
    }

    /// The seed in use (reported back to the client so a run can be repeated).
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Advances past `tokens` earlier choices without making them: a generation resumed
    /// after `tokens` draws the same random numbers it would have drawn uninterrupted
    /// (`sample` draws exactly one per token when it samples at all).
    pub fn skip(&mut self, tokens: usize) {
        if self.params.temperature == 0.0 {
            return;
        }
        for _ in 0..tokens {
            let _ = self.rng.random::<f32>();
        }
    }

    /// Chooses the next token from `logits` (modified in place), given the tokens so far.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> Result<u32, SamplingError> {
        if logits.is_empty() {
            return Err(SamplingError::EmptyLogits);
        }
        if !all_finite(logits) {
            return Err(SamplingError::NonFiniteLogits);
        }
        self.apply_repetition_penalty(logits, history);
        self.apply_openai_penalties(logits, history.get(self.generated_from..).unwrap_or(&[]));
        for &(token, bias) in &self.params.logit_bias {
            let Some(l) = logits.get_mut(token as usize) else {
                return Err(SamplingError::InvalidParameter {
                    param: "logit_bias",
                    value: format!("token {token}"),
                    expected: "token ids inside the model's vocabulary",
                });
            };
            *l += bias;
        }
        if self.params.temperature == 0.0 {
            return Ok(argmax(logits));
        }
        let candidates = self.candidates(logits);
        let total: f32 = candidates.iter().map(|(_, p)| p).sum();
        let mut target = self.rng.random::<f32>() * total;
        for &(token, p) in &candidates {
            if target < p {
                return Ok(token);
            }
            target -= p;
        }
        // Rounding left a sliver at the end: it belongs to the last candidate.
        Ok(candidates.last().map_or(0, |(t, _)| *t))
    }

    fn apply_repetition_penalty(&self, logits: &mut [f32], history: &[u32]) {
        let penalty = self.params.repetition_penalty;
        if penalty == 1.0 || self.params.repeat_last_n == 0 {
            return;
        }
        let recent = &history[history.len().saturating_sub(self.params.repeat_last_n)..];
        let mut seen = std::collections::HashSet::new();
        for &token in recent {
            if !seen.insert(token) {
                continue;
            }
            if let Some(l) = logits.get_mut(token as usize) {
                *l = if *l > 0.0 { *l / penalty } else { *l * penalty };
            }
        }
    }

    /// `l ← l − count·frequency − (count > 0)·presence` for each token generated so far.
    fn apply_openai_penalties(&self, logits: &mut [f32], generated: &[u32]) {
        let (presence, frequency) = (self.params.presence_penalty, self.params.frequency_penalty);
        if (presence == 0.0 && frequency == 0.0) || generated.is_empty() {
            return;
        }
        let mut counts = std::collections::HashMap::<u32, u32>::new();
        for &token in generated {
            *counts.entry(token).or_default() += 1;
        }
        for (token, count) in counts {
            if let Some(l) = logits.get_mut(token as usize) {
                *l -= count as f32 * frequency + presence;
            }
        }
    }

    /// The tokens that survive top-k, min-p and top-p with unnormalised probabilities: most
    /// likely first when any of them cuts, in vocabulary order when none does.
    fn candidates(&self, logits: &[f32]) -> Vec<(u32, f32)> {
        let inv_t = 1.0 / self.params.temperature;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut scaled: Vec<f32> = logits.iter().map(|&l| (l - max) * inv_t).collect();
        // The vocabulary's worth of exp per token, sixteen lanes at a time (the same bits).
        exp_in_place(cpu::level(), &mut scaled);
        let mut probs: Vec<(u32, f32)> = scaled
            .into_iter()
            .enumerate()
            .map(|(i, p)| (i as u32, p))
            .collect();
        // A total order (probability, then token id), so equal seeds replay exactly.
        let order = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        let k = self.params.top_k;
        if (k == 0 || k >= probs.len()) && self.params.min_p <= 0.0 && self.params.top_p >= 1.0 {
            // Nothing is cut: every token is a candidate, in vocabulary order (also a total
            // order), without sorting the vocabulary for each token.
            return probs;
        }
        if k > 0 && k < probs.len() {
            // Runs once per token over the whole vocabulary: partition out the top k in
            // linear time and sort only those.
            probs.select_nth_unstable_by(k - 1, order);
            probs.truncate(k);
        }
        probs.sort_unstable_by(order);
        if self.params.min_p > 0.0 {
            // The best token has probability 1 after the shift by `max`.
            let floor = probs[0].1 * self.params.min_p;
            probs.retain(|&(_, p)| p >= floor);
        }
        if self.params.top_p < 1.0 {
            let total: f32 = probs.iter().map(|(_, p)| p).sum();
            let mut cumulative = 0.0;
            let keep = probs
                .iter()
                .position(|&(_, p)| {
                    cumulative += p / total;
                    cumulative >= self.params.top_p
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
        }
        probs
    }
}

/// The index of the largest logit; the lowest index wins a tie.
fn argmax(logits: &[f32]) -> u32 {
    let max = lanes(logits, f32::NEG_INFINITY, f32::max)
        .into_iter()
        .fold(f32::NEG_INFINITY, f32::max);
    logits.iter().position(|&l| l == max).unwrap_or(0) as u32
}

/// Whether every logit is finite (the sampler's guard against a broken step).
fn all_finite(logits: &[f32]) -> bool {
    lanes(logits, true, |ok, l| ok & l.is_finite())
        .into_iter()
        .all(|ok| ok)
}

/// Lanes of a fold over `values`, lane `j` taking every sixteenth value from `j`: a shape
/// the compiler turns into vector instructions (a plain fold over 49,152 logits, twice
/// per token of each sequence, was a tenth of a batched step's time outside the engine).
/// Exact for folds like `max` and `and`, whose result does not depend on the grouping.
fn lanes<T: Copy>(values: &[f32], init: T, fold: impl Fn(T, f32) -> T) -> [T; 16] {
    let mut acc = [init; 16];
    let mut chunks = values.chunks_exact(16);
    for chunk in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            *a = fold(*a, v);
        }
    }
    for (a, &v) in acc.iter_mut().zip(chunks.remainder()) {
        *a = fold(*a, v);
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lane_folds_agree_with_plain_ones_on_ties_and_odd_lengths() {
        let mut rng = StdRng::seed_from_u64(7);
        for len in [1, 15, 16, 17, 100, 49_152] {
            for _ in 0..20 {
                // Few distinct values: ties for the maximum are common.
                let logits: Vec<f32> = (0..len)
                    .map(|_| rng.random_range(0..8) as f32 * 0.5 - 2.0)
                    .collect();
                let mut first = 0;
                for (i, &l) in logits.iter().enumerate() {
                    if l > logits[first] {
                        first = i;
                    }
                }
                assert_eq!(argmax(&logits), first as u32, "length {len}");
                assert!(all_finite(&logits));
                let mut broken = logits.clone();
                broken[rng.random_range(0..len)] = f32::NAN;
                assert!(!all_finite(&broken));
                broken.fill(0.0);
                broken[len - 1] = f32::NEG_INFINITY;
                assert!(!all_finite(&broken));
            }
        }
    }

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            repeat_last_n: 0,
            seed: Some(7),
            ..SamplingParams::default()
        }
    }

    #[test]
    fn temperature_zero_is_argmax() {
        let mut s = Sampler::new(params(0.0)).unwrap();
        assert_eq!(s.sample(&mut [0.1, 3.0, 2.9, 3.0], &[]).unwrap(), 1);
    }

    #[test]
    fn the_same_seed_gives_the_same_tokens() {
        let logits: Vec<f32> = (0..100).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let run = |seed| {
            let mut s = Sampler::new(SamplingParams {
                seed: Some(seed),
                ..params(1.0)
            })
            .unwrap();
            (0..50)
                .map(|_| s.sample(&mut logits.clone(), &[]).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
    }

    #[test]
    fn a_drawn_seed_is_reported() {
        let a = Sampler::new(SamplingParams::default()).unwrap();
        let b = Sampler::new(SamplingParams::default()).unwrap();
        assert_ne!(a.seed(), b.seed());
    }

    #[test]
    fn top_k_one_and_tiny_top_p_are_greedy() {
        let logits = [1.0, 5.0, 4.9, 0.0];
        for p in [
            SamplingParams {
                top_k: 1,
                ..params(1.0)
            },
            SamplingParams {
                top_p: 0.01,
                ..params(1.0)
            },
            SamplingParams {
                min_p: 0.99,
                ..params(1.0)
            },
        ] {
            let mut s = Sampler::new(p).unwrap();
            for _ in 0..20 {
                assert_eq!(s.sample(&mut logits.clone(), &[]).unwrap(), 1);
            }
        }
    }

    #[test]
    fn sampling_follows_the_distribution() {
        // Token 1 is e^1 ≈ 2.7 times as likely as token 0.
        let mut s = Sampler::new(params(1.0)).unwrap();
        let n = 20_000;
        let ones = (0..n)
            .filter(|_| s.sample(&mut [0.0, 1.0], &[]).unwrap() == 1)
            .count();
        let share = ones as f64 / n as f64;
        let expected = std::f64::consts::E / (1.0 + std::f64::consts::E);
        assert!((share - expected).abs() < 0.02, "{share} vs {expected}");
    }

    #[test]
    fn openai_penalties_count_only_generated_tokens() {
        let mut s = Sampler::new(SamplingParams {
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            ..params(0.0)
        })
        .unwrap();
        s.generated_after(2);
        // Prompt [1, 1], then token 0 generated twice: 3.0 − 2·0.25 − 0.5 = 2.0 < 2.1.
        let mut logits = [3.0, 2.9, 2.1];
        assert_eq!(s.sample(&mut logits, &[1, 1, 0, 0]).unwrap(), 1);
        assert_eq!(logits, [2.0, 2.9, 2.1]);
        // The prompt's tokens are not penalised: token 1 keeps 2.9.
        let mut logits = [0.0, 2.9, 2.1];
        s.sample(&mut logits, &[1, 1]).unwrap();
        assert_eq!(logits[1], 2.9);
        // A negative presence penalty encourages.
        let mut s = Sampler::new(SamplingParams {
            presence_penalty: -2.0,
            ..params(0.0)
        })
        .unwrap();
        assert_eq!(s.sample(&mut [3.0, 1.5], &[1]).unwrap(), 1);
    }

    #[test]
    fn logit_bias_bans_or_forces_tokens_even_when_greedy() {
        let biased = |bias: Vec<(u32, f32)>| {
            Sampler::new(SamplingParams {
                logit_bias: bias,
                ..params(0.0)
            })
        };
        let mut s = biased(vec![(0, -100.0)]).unwrap();
        assert_eq!(s.sample(&mut [50.0, 1.0, 0.5], &[]).unwrap(), 1);
        let mut s = biased(vec![(2, 100.0)]).unwrap();
        assert_eq!(s.sample(&mut [50.0, 1.0, 0.5], &[]).unwrap(), 2);
        // A token outside the vocabulary is a typed error, not ignored.
        let mut s = biased(vec![(3, 1.0)]).unwrap();
        assert!(matches!(
            s.sample(&mut [0.0, 1.0, 2.0], &[]),
            Err(SamplingError::InvalidParameter {
                param: "logit_bias",
                ..
            })
        ));
        for bad in [vec![(0, 101.0)], vec![(0, f32::NAN)], vec![(0, 1.0); 1025]] {
            assert!(matches!(
                biased(bad),
                Err(SamplingError::InvalidParameter {
                    param: "logit_bias",
                    ..
                })
            ));
        }
        for (presence, frequency) in [(2.5, 0.0), (0.0, -3.0), (f32::NAN, 0.0)] {
            let error = Sampler::new(SamplingParams {
                presence_penalty: presence,
                frequency_penalty: frequency,
                ..params(0.0)
            })
            .unwrap_err();
            assert!(matches!(error, SamplingError::InvalidParameter { .. }));
        }
    }

    #[test]
    fn repetition_penalty_discourages_recent_tokens() {
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 2.0,
            repeat_last_n: 4,
            ..params(0.0)
        })
        .unwrap();
        // Token 0 leads, but was just generated: 3.0 / 2 < 2.0.
        assert_eq!(s.sample(&mut [3.0, 2.0], &[0]).unwrap(), 1);
        // Outside the window it is not penalised.
        assert_eq!(s.sample(&mut [3.0, 2.0], &[0, 5, 5, 5, 5]).unwrap(), 0);
        // A negative logit is pushed further down, not up.
        let mut logits = [-1.0, -1.5];
        assert_eq!(s.sample(&mut logits, &[0]).unwrap(), 1);
        assert_eq!(logits[0], -2.0);
    }

    #[test]
    fn meaningless_parameters_and_logits_are_refused() {
        for (p, name) in [
            (
                SamplingParams {
                    temperature: f32::NAN,
                    ..params(1.0)
                },
                "temperature",
            ),
            (
                SamplingParams {
                    temperature: -1.0,
                    ..params(1.0)
                },
                "temperature",
            ),
            (
                SamplingParams {
                    top_p: 0.0,
                    ..params(1.0)
                },
                "top_p",
            ),
            (
                SamplingParams {
                    top_p: 1.5,
                    ..params(1.0)
                },
                "top_p",
            ),
            (
                SamplingParams {
                    min_p: 1.0,
                    ..params(1.0)
                },
                "min_p",
            ),
            (
                SamplingParams {
                    repetition_penalty: 0.0,
                    ..params(1.0)
                },
                "repetition_penalty",
            ),
        ] {
            match Sampler::new(p) {
                Err(SamplingError::InvalidParameter { param, .. }) => assert_eq!(param, name),
                other => panic!("{name}: {other:?}"),
            }
        }
        let mut s = Sampler::new(params(1.0)).unwrap();
        assert_eq!(
            s.sample(&mut [1.0, f32::NAN], &[]),
            Err(SamplingError::NonFiniteLogits)
        );
        assert_eq!(s.sample(&mut [], &[]), Err(SamplingError::EmptyLogits));
        // A token id beyond the vocabulary in the history is ignored, not a panic.
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 1.3,
            repeat_last_n: 8,
            ..params(0.0)
        })
        .unwrap();
        assert_eq!(s.sample(&mut [0.0, 1.0], &[u32::MAX]).unwrap(), 1);
    }
}
