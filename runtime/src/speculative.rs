//! Speculative decoding: a small draft model proposes `k` tokens greedily, the target model scores
//! all of them in one multi-token forward, and the longest prefix the target agrees with is kept,
//! followed by the target's own next token.
//!
//! Each round, with `last` the newest token (not yet in either KV cache):
//! ```text
//! draft:  feed pending tokens, then propose d1 .. dk (argmax, one token per step)
//! target: forward [last, d1 .. dk] -> k+1 rows of logits
//!         x_i = sampler(row i) for i = 0, 1, ...; emit x_i; continue while x_i == d_{i+1}
//! both:   truncate the KV caches to the accepted prefix (rows past it are overwritten later)
//! ```
//! Every emitted token is the target sampler's choice from the target's logits for exactly the
//! sequence emitted before it, drawn in order with one draw per token, so the output equals plain
//! decoding of the target with the same sampler and seed (greedy: token for token), whatever the
//! draft proposes; the draft only decides how many tokens one target forward yields.

use std::time::Instant;

use crate::error::{Result, RuntimeError};
use crate::generate::{check_room, StopConditions};
use crate::model::{GenerateStats, Session};
use crate::sample::{argmax, Sampler};

/// What speculation achieved.
#[derive(Clone, Debug, Default)]
pub struct SpeculativeStats {
    pub generate: GenerateStats,
    /// Verification rounds (target forwards after the prefill).
    pub rounds: usize,
    /// Draft tokens proposed and those the target agreed with.
    pub proposed: usize,
    pub accepted: usize,
}

impl SpeculativeStats {
    /// Fraction of proposed draft tokens the target accepted.
    pub fn acceptance_rate(&self) -> f64 {
        if self.proposed == 0 {
            0.0
        } else {
            self.accepted as f64 / self.proposed as f64
        }
    }
    /// New tokens per target forward after the prefill (1 without speculation).
    pub fn tokens_per_round(&self) -> f64 {
        if self.rounds == 0 {
            0.0
        } else {
            self.generate.generated_tokens.saturating_sub(1) as f64 / self.rounds as f64
        }
    }
}

/// Generates with `target`, `draft` proposing up to `k` tokens per round. Both sessions are reset
/// first; the models must share a vocabulary. Returns the new tokens and statistics; see the
/// module documentation for why the tokens equal plain decoding's.
pub fn generate_speculative(
    target: &mut Session,
    draft: &mut Session,
    prompt: &[u32],
    k: usize,
    stop: &StopConditions,
    sampler: &mut Sampler,
    mut on_token: impl FnMut(u32),
) -> Result<(Vec<u32>, SpeculativeStats)> {
    let (tv, dv) = (target.model().vocab_size(), draft.model().vocab_size());
    if tv != dv {
        return Err(RuntimeError::InvalidArgument(format!(
            "the draft model's vocabulary has {dv} tokens and the target's {tv}: speculative decoding needs the same vocabulary"
        )));
    }
    if k == 0 {
        return Err(RuntimeError::InvalidArgument("the speculation length must be at least 1".into()));
    }
    target.reset();
    draft.reset();
    check_room(target, prompt, stop.max_new)?;
    let draft_max = draft.model().max_context();
    let mut st = SpeculativeStats { generate: GenerateStats { prompt_tokens: prompt.len(), ..Default::default() }, ..Default::default() };
    sampler.accept(prompt);

    let t0 = Instant::now();
    let logits = target.forward(prompt, false)?;
    // The draft keeps up with as much of the sequence as its context holds.
    let mut use_draft = prompt.len() <= draft_max;
    if use_draft {
        draft.forward(prompt, false)?;
    }
    st.generate.prefill_seconds = t0.elapsed().as_secs_f64();
    let mut new = Vec::with_capacity(stop.max_new);
    if stop.max_new == 0 {
        return Ok((new, st));
    }
    let t1 = Instant::now();
    let first = sampler.sample(&logits);
    new.push(first);
    on_token(first);
    let mut seq: Vec<u32> = prompt.iter().copied().chain([first]).collect();
    let mut done = new.len() >= stop.max_new || stop.stop.contains(&first);
    let mut proposals = Vec::with_capacity(k);
    while !done {
        // Invariant: the target caches seq[..len-1]; the draft caches seq[..draft.past()].
        let remaining = stop.max_new - new.len();
        // k + 1 tokens at most come out of a round; the draft must hold seq + d1..d(k-1).
        let room = (draft_max + 1).saturating_sub(seq.len());
        let kr = if use_draft { k.min(remaining - 1).min(room) } else { 0 };
        use_draft &= room > 0;
        proposals.clear();
        if kr > 0 {
            let l = draft.forward(&seq[draft.past()..], false)?;
            proposals.push(argmax(&l) as u32);
            while proposals.len() < kr {
                let l = draft.forward(&[proposals[proposals.len() - 1]], false)?;
                proposals.push(argmax(&l) as u32);
            }
        }
        let base = seq.len();
        let mut input = Vec::with_capacity(kr + 1);
        input.push(seq[base - 1]);
        input.extend_from_slice(&proposals);
        let rows = target.forward(&input, true)?;
        st.rounds += 1;
        st.proposed += kr;
        let mut accepted = 0;
        for (i, row) in rows.chunks_exact(tv).enumerate() {
            let x = sampler.sample(row);
            new.push(x);
            seq.push(x);
            on_token(x);
            let agrees = i < kr && x == proposals[i];
            accepted += agrees as usize;
            done = new.len() >= stop.max_new || stop.stop.contains(&x);
            if done || !agrees {
                break;
            }
        }
        st.accepted += accepted;
        // Keep the cache rows of tokens that are now part of the sequence.
        target.truncate(base + accepted.min(kr));
        draft.truncate(base + accepted.min(kr.saturating_sub(1)));
    }
    st.generate.decode_seconds = t1.elapsed().as_secs_f64();
    st.generate.generated_tokens = new.len();
    Ok((new, st))
}
