//! Choosing the next token from logits: greedy, or sampling with temperature, top-k, top-p
//! (nucleus) and a repetition penalty, from a seeded PCG32 generator.
//!
//! The order is Hugging Face's: repetition penalty on the raw logits, then temperature, top-k and
//! top-p, then a draw from the renormalized distribution. Temperature 0 is greedy (argmax after the
//! penalty). The generator is written out here, not taken from a crate, so that a seed gives the
//! same tokens on every build and platform.

use crate::error::{Result, RuntimeError};

/// Index of the largest logit; the first one on ties (as `torch.argmax`). NaNs are never chosen.
pub fn argmax(logits: &[f32]) -> usize {
    let mut best = 0;
    let mut bv = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > bv {
            bv = v;
            best = i;
        }
    }
    best
}

/// PCG32 (XSH-RR, 64-bit state), O'Neill 2014: small, fast, and fixed forever by its definition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pcg32 {
    state: u64,
    inc: u64,
}

impl Pcg32 {
    const MUL: u64 = 6364136223846793005;

    /// The generator for `seed` on stream `stream` (the reference `pcg32_srandom_r`).
    pub fn new(seed: u64, stream: u64) -> Pcg32 {
        let mut r = Pcg32 { state: 0, inc: (stream << 1) | 1 };
        r.next_u32();
        r.state = r.state.wrapping_add(seed);
        r.next_u32();
        r
    }

    pub fn next_u32(&mut self) -> u32 {
        let old = self.state;
        self.state = old.wrapping_mul(Self::MUL).wrapping_add(self.inc);
        let xorshifted = (((old >> 18) ^ old) >> 27) as u32;
        let rot = (old >> 59) as u32;
        xorshifted.rotate_right(rot)
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        let hi = (self.next_u32() >> 5) as u64; // 27 bits
        let lo = (self.next_u32() >> 6) as u64; // 26 bits
        ((hi << 26) | lo) as f64 / (1u64 << 53) as f64
    }
}

/// How to pick tokens. The default is greedy.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature; 0 picks the most likely token (greedy).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p`; 1 keeps all.
    pub top_p: f32,
    /// Divide positive (multiply negative) logits of tokens already in the sequence by this; 1 is off.
    pub repetition_penalty: f32,
    /// Seed of the generator; the same seed, model and prompt give the same tokens.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams { temperature: 0.0, top_k: 0, top_p: 1.0, repetition_penalty: 1.0, seed: 0 }
    }
}

impl SamplingParams {
    /// Checks every field's range; the error names the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(RuntimeError::InvalidArgument(m));
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return bad(format!("temperature must be a finite number >= 0, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top-p must be in (0, 1], got {}", self.top_p));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return bad(format!("repetition penalty must be a finite number > 0, got {}", self.repetition_penalty));
        }
        Ok(())
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }
}

/// Hugging Face's repetition penalty: for each distinct token in `seen`, a positive logit is
/// divided by `penalty` and a negative one multiplied, so `penalty > 1` makes repeats less likely.
pub fn apply_repetition_penalty(logits: &mut [f32], seen: &[u32], penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    let mut done = vec![false; logits.len()];
    for &t in seen {
        let t = t as usize;
        if t < logits.len() && !done[t] {
            done[t] = true;
            let l = &mut logits[t];
            *l = if *l > 0.0 { *l / penalty } else { *l * penalty };
        }
    }
}

/// `softmax(logits / temperature)` (temperature > 0); NaN logits get probability 0.
pub fn softmax(logits: &[f32], temperature: f32) -> Vec<f32> {
    let max = logits.iter().copied().filter(|v| !v.is_nan()).fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return vec![1.0 / logits.len() as f32; logits.len()];
    }
    let mut p: Vec<f32> = logits
        .iter()
        .map(|&v| if v.is_nan() { 0.0 } else { ((v - max) / temperature).exp() })
        .collect();
    let sum: f32 = p.iter().sum();
    for x in &mut p {
        *x /= sum;
    }
    p
}

/// Token ids sorted by probability, most likely first (ties: lower id first).
fn ranked(probs: &[f32]) -> Vec<u32> {
    let mut idx: Vec<u32> = (0..probs.len() as u32).collect();
    idx.sort_by(|&a, &b| probs[b as usize].total_cmp(&probs[a as usize]).then(a.cmp(&b)));
    idx
}

/// Zeroes all but the `k` most likely tokens (ties broken towards lower ids); `k == 0` keeps all.
pub fn top_k_filter(probs: &mut [f32], k: usize) {
    if k == 0 || k >= probs.len() {
        return;
    }
    for &t in &ranked(probs)[k..] {
        probs[t as usize] = 0.0;
    }
}

/// Nucleus filter: keeps the most likely tokens until their total reaches `p` of the remaining
/// mass (at least one token), zeroes the rest.
pub fn top_p_filter(probs: &mut [f32], p: f32) {
    if p >= 1.0 {
        return;
    }
    let total: f32 = probs.iter().sum();
    let mut acc = 0.0;
    let mut keep = true;
    for t in ranked(probs) {
        let t = t as usize;
        if keep {
            acc += probs[t];
            if acc >= p * total {
                keep = false;
            }
        } else {
            probs[t] = 0.0;
        }
    }
}

/// The index where `u * sum(probs)` falls in the running sum of `probs` (never a zero entry).
pub fn draw(probs: &[f32], u: f64) -> usize {
    let total: f64 = probs.iter().map(|&p| p as f64).sum();
    let target = u * total;
    let mut acc = 0.0;
    let mut last = 0;
    for (i, &p) in probs.iter().enumerate() {
        if p > 0.0 {
            acc += p as f64;
            last = i;
            if target < acc {
                return i;
            }
        }
    }
    last
}

/// Picks tokens under [`SamplingParams`], remembering the sequence for the repetition penalty.
#[derive(Clone, Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: Pcg32,
    seen: Vec<u32>,
}

impl Sampler {
    /// A sampler for `params` (checked with [`SamplingParams::validate`]).
    pub fn new(params: SamplingParams) -> Result<Sampler> {
        params.validate()?;
        let rng = Pcg32::new(params.seed, 0x6c6c6d63); // stream "llmc"
        Ok(Sampler { params, rng, seen: Vec::new() })
    }

    /// Greedy decoding.
    pub fn greedy() -> Sampler {
        Sampler { params: SamplingParams::default(), rng: Pcg32::new(0, 0x6c6c6d63), seen: Vec::new() }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Records tokens already in the sequence (the prompt) for the repetition penalty.
    pub fn accept(&mut self, ids: &[u32]) {
        self.seen.extend_from_slice(ids);
    }

    /// Picks the next token from one position's `logits` and records it. Greedy decoding uses no
    /// randomness; sampling draws exactly one number from the generator per call.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        let t = if p.repetition_penalty == 1.0 && p.is_greedy() {
            argmax(logits)
        } else {
            let mut l = logits.to_vec();
            apply_repetition_penalty(&mut l, &self.seen, p.repetition_penalty);
            if p.is_greedy() {
                argmax(&l)
            } else {
                let mut probs = softmax(&l, p.temperature);
                top_k_filter(&mut probs, p.top_k);
                top_p_filter(&mut probs, p.top_p);
                draw(&probs, self.rng.next_f64())
            }
        } as u32;
        self.seen.push(t);
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_first_max() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, -1.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 0.5]), 1);
    }

    #[test]
    fn pcg32_matches_the_reference_sequence() {
        // pcg32-global demo output for `pcg32_srandom(42, 54)` (O'Neill's pcg-c-basic).
        let mut r = Pcg32::new(42, 54);
        let got: Vec<u32> = (0..6).map(|_| r.next_u32()).collect();
        assert_eq!(got, [0xa15c02b7, 0x7b47f409, 0xba1d3330, 0x83d2f293, 0xbfa4784b, 0xcbed606e]);
        let mut r = Pcg32::new(7, 1);
        for _ in 0..1000 {
            let u = r.next_f64();
            assert!((0.0..1.0).contains(&u));
        }
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative_logits() {
        let mut l = vec![2.0, -2.0, 1.0, 4.0];
        apply_repetition_penalty(&mut l, &[0, 1, 0, 9], 2.0); // 9: outside the vocabulary, ignored
        assert_eq!(l, vec![1.0, -4.0, 1.0, 4.0], "each seen token penalized once");
    }

    #[test]
    fn softmax_with_temperature() {
        let p = softmax(&[0.0, (2.0f32).ln()], 1.0);
        assert!((p[0] - 1.0 / 3.0).abs() < 1e-6 && (p[1] - 2.0 / 3.0).abs() < 1e-6);
        // Temperature 0.5 squares the odds: 1:4.
        let p = softmax(&[0.0, (2.0f32).ln()], 0.5);
        assert!((p[0] - 0.2).abs() < 1e-6 && (p[1] - 0.8).abs() < 1e-6);
        let p = softmax(&[f32::NAN, 1.0], 1.0);
        assert_eq!(p, vec![0.0, 1.0]);
    }

    #[test]
    fn top_k_keeps_the_k_most_likely() {
        let mut p = vec![0.1, 0.4, 0.2, 0.3];
        top_k_filter(&mut p, 2);
        assert_eq!(p, vec![0.0, 0.4, 0.0, 0.3]);
        let mut p = vec![0.25; 4];
        top_k_filter(&mut p, 1);
        assert_eq!(p, vec![0.25, 0.0, 0.0, 0.0], "ties go to the lower id");
        let mut p = vec![0.5, 0.5];
        top_k_filter(&mut p, 0);
        assert_eq!(p, vec![0.5, 0.5], "0 keeps all");
    }

    #[test]
    fn top_p_keeps_the_smallest_set_reaching_p() {
        // Sorted: 0.4, 0.3, 0.2, 0.1. p=0.6: 0.4 < 0.6, 0.7 >= 0.6 -> keep two.
        let mut p = vec![0.1, 0.4, 0.2, 0.3];
        top_p_filter(&mut p, 0.6);
        assert_eq!(p, vec![0.0, 0.4, 0.0, 0.3]);
        // p=0.75 reached exactly by two tokens (binary fractions: no rounding).
        let mut p = vec![0.125, 0.5, 0.125, 0.25];
        top_p_filter(&mut p, 0.75);
        assert_eq!(p, vec![0.0, 0.5, 0.0, 0.25]);
        // A tiny p keeps the single most likely token.
        let mut p = vec![0.1, 0.4, 0.2, 0.3];
        top_p_filter(&mut p, 0.01);
        assert_eq!(p, vec![0.0, 0.4, 0.0, 0.0]);
        // Relative to the mass left by top-k.
        let mut p = vec![0.0, 0.4, 0.0, 0.3];
        top_p_filter(&mut p, 0.5);
        assert_eq!(p, vec![0.0, 0.4, 0.0, 0.0]);
    }

    #[test]
    fn draw_follows_the_cumulative_distribution() {
        let p = [0.0, 0.25, 0.0, 0.75];
        assert_eq!(draw(&p, 0.0), 1);
        assert_eq!(draw(&p, 0.2499), 1);
        assert_eq!(draw(&p, 0.25), 3);
        assert_eq!(draw(&p, 0.999999), 3);
    }

    #[test]
    fn sampling_frequencies_follow_the_probabilities() {
        let logits = [0.0, (3.0f32).ln()]; // p = 1/4, 3/4
        let mut s = Sampler::new(SamplingParams { temperature: 1.0, seed: 1, ..Default::default() }).unwrap();
        let n = 20000;
        let ones = (0..n).filter(|_| s.sample(&logits) == 1).count();
        let f = ones as f64 / n as f64;
        assert!((f - 0.75).abs() < 0.02, "frequency {f}");
    }

    #[test]
    fn same_seed_same_tokens_other_seed_other_tokens() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let run = |seed| {
            let mut s = Sampler::new(SamplingParams { temperature: 1.5, top_k: 20, top_p: 0.9, seed, ..Default::default() }).unwrap();
            (0..40).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(run(3), run(3));
        assert_ne!(run(3), run(4));
    }

    #[test]
    fn greedy_with_penalty_avoids_the_repeat() {
        let mut s = Sampler::new(SamplingParams { repetition_penalty: 3.0, ..Default::default() }).unwrap();
        s.accept(&[0]);
        assert_eq!(s.sample(&[3.0, 2.0, 1.5]), 1, "3/3 = 1 < 2");
        assert_eq!(s.sample(&[3.0, 2.0, 1.5]), 2, "both 0 and 1 penalized now: 1, 2/3 < 1.5");
        let mut g = Sampler::greedy();
        assert_eq!(g.sample(&[3.0, 2.0, 0.5]), 0);
    }

    #[test]
    fn bad_parameters_are_named() {
        let e = Sampler::new(SamplingParams { temperature: -1.0, ..Default::default() }).unwrap_err();
        assert!(e.to_string().contains("temperature"));
        let e = Sampler::new(SamplingParams { top_p: 0.0, ..Default::default() }).unwrap_err();
        assert!(e.to_string().contains("top-p"));
        let e = Sampler::new(SamplingParams { repetition_penalty: 0.0, ..Default::default() }).unwrap_err();
        assert!(e.to_string().contains("repetition penalty"));
    }
}
