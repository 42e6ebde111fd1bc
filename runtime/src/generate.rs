//! Token generation with a [`Sampler`]: prefill the prompt, then one decode step per new token,
//! stopping at a stop token or after `max_new` tokens. [`speculative`](crate::speculative) is the
//! same loop with a draft model proposing tokens.

use std::time::Instant;

use crate::error::{Result, RuntimeError};
use crate::model::{GenerateStats, Session};
use crate::sample::Sampler;

/// When generation ends.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StopConditions {
    /// Most new tokens to produce.
    pub max_new: usize,
    /// Generation ends after producing any of these (the stop token is included in the output).
    pub stop: Vec<u32>,
}

/// Checks that `prompt` and up to `max_new` new tokens fit the session's context. The last new
/// token is never fed back, so `max_new - 1` rows past the prompt are needed.
pub(crate) fn check_room(session: &Session, prompt: &[u32], max_new: usize) -> Result<()> {
    session.check_input(prompt)?;
    let needed = session.past() + prompt.len() + max_new.saturating_sub(1);
    let max_context = session.model().max_context();
    if needed > max_context {
        return Err(RuntimeError::ContextOverflow { needed, max_context });
    }
    Ok(())
}

/// Appends `prompt` to the session's conversation and generates up to `stop.max_new` tokens,
/// calling `on_token` with each as soon as it is chosen. Returns the new tokens, the prompt's
/// logits (`[prompt, vocab]`) when `want_prompt_logits`, and timings. The sampler sees the prompt
/// (for its repetition penalty) and every new token.
pub fn generate(
    session: &mut Session,
    prompt: &[u32],
    stop: &StopConditions,
    sampler: &mut Sampler,
    want_prompt_logits: bool,
    mut on_token: impl FnMut(u32),
) -> Result<(Vec<u32>, Option<Vec<f32>>, GenerateStats)> {
    check_room(session, prompt, stop.max_new)?;
    let vocab = session.model().vocab_size();
    let mut stats = GenerateStats { prompt_tokens: prompt.len(), ..Default::default() };
    sampler.accept(prompt);
    let t0 = Instant::now();
    let logits = session.forward(prompt, want_prompt_logits)?;
    stats.prefill_seconds = t0.elapsed().as_secs_f64();
    let mut new = Vec::with_capacity(stop.max_new);
    if stop.max_new > 0 {
        let mut next = sampler.sample(&logits[logits.len() - vocab..]);
        let t1 = Instant::now();
        loop {
            new.push(next);
            on_token(next);
            if new.len() >= stop.max_new || stop.stop.contains(&next) {
                break;
            }
            let l = session.forward(&[next], false)?;
            next = sampler.sample(&l);
        }
        stats.decode_seconds = t1.elapsed().as_secs_f64();
    }
    stats.generated_tokens = new.len();
    Ok((new, want_prompt_logits.then_some(logits), stats))
}
