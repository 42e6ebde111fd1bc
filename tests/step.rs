//! The step contract on the bundled model (`models/seedlm`, compiled here with steps of at most
//! 8 tokens, so that prompts run in several chunks): a ragged batch of two sequences through one
//! step gives bit-identical logits to two separate runs; a batch with one bad sequence is refused
//! before anything runs; logit positions select rows of `All` (`Last` through the logits head
//! run for one row); caches reset and are reused.

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use common::*;
use llmc_runtime::{Executor, KvCache, Logits, Model, RuntimeError, Session, StepInput};

const CHUNK: usize = 8;
const THREADS: usize = 2;

fn artifact() -> &'static Path {
    static ART: OnceLock<PathBuf> = OnceLock::new();
    ART.get_or_init(|| {
        let d = tmpdir("step-seedlm");
        let art = d.join("seedlm.llmc");
        compile_with(&repo().join("models/seedlm"), &art, llmc_compiler::CompileConfig { max_chunk: Some(CHUNK), max_context: Some(64), ..Default::default() });
        art
    })
}

fn model() -> Arc<Model> {
    Model::load(artifact()).unwrap()
}

/// Deterministic token ids below `vocab`.
fn tokens(n: usize, seed: u32, vocab: usize) -> Vec<u32> {
    (0..n as u32).map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed.wrapping_mul(40503)) >> 7) % vocab as u32).collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn two_sequences_in_one_step_equal_two_separate_runs() {
    let m = model();
    let vocab = m.token_vocab_size();
    // A: a 19-token prefill (three chunks). B: 11 tokens cached, then a decode of one token.
    let (a, b_prompt, b_next) = (tokens(19, 1, vocab), tokens(11, 2, vocab), tokens(1, 3, vocab));

    let mut sa = Session::with_threads(m.clone(), THREADS).unwrap();
    let want_a = sa.forward(&a, true).unwrap();
    let mut sb = Session::with_threads(m.clone(), THREADS).unwrap();
    sb.forward(&b_prompt, false).unwrap();
    let want_b = sb.forward(&b_next, true).unwrap();

    let mut exec = Executor::new(m.clone(), THREADS).unwrap();
    let fwd = m.forward_entry();
    assert_eq!(m.entry("forward"), Some(fwd));
    assert_eq!(m.entry("draft"), None);
    let (mut ca, mut cb) = (KvCache::new(&m).unwrap(), KvCache::new(&m).unwrap());
    let out = exec.step(fwd, &mut [StepInput { cache: &mut cb, tokens: &b_prompt, logits: Logits::None }]).unwrap();
    assert_eq!(out.logits, vec![Vec::<f32>::new()]);
    assert_eq!(cb.len(), 11);

    let out = exec
        .step(
            fwd,
            &mut [
                StepInput { cache: &mut ca, tokens: &a, logits: Logits::All },
                StepInput { cache: &mut cb, tokens: &b_next, logits: Logits::All },
            ],
        )
        .unwrap();
    assert_eq!(out.vocab, m.vocab_size());
    assert_eq!(out.logits.len(), 2);
    assert_eq!(out.logits[0].len(), 19 * m.vocab_size());
    assert!(bits(&out.logits[0]) == bits(&want_a), "the prefill of A in a batch differs from A alone");
    assert!(bits(&out.logits[1]) == bits(&want_b), "the decode of B in a batch differs from B alone");
    assert_eq!((ca.len(), cb.len()), (19, 12));
    assert_eq!(out.row(1, 0), Some(&want_b[..]));
    assert_eq!(out.row(1, 1), None);

    // The caches go on: one more decode of both in one step equals the sessions' next step.
    let next = tokens(1, 4, vocab);
    let out = exec
        .step(
            fwd,
            &mut [
                StepInput { cache: &mut cb, tokens: &next, logits: Logits::Last },
                StepInput { cache: &mut ca, tokens: &next, logits: Logits::Last },
            ],
        )
        .unwrap();
    assert!(bits(&out.logits[0]) == bits(&sb.forward(&next, false).unwrap()));
    assert!(bits(&out.logits[1]) == bits(&sa.forward(&next, false).unwrap()));
}

#[test]
fn a_bad_sequence_refuses_the_whole_batch_before_anything_runs() {
    let m = model();
    let vocab = m.token_vocab_size();
    let (a, b_prompt, b_next) = (tokens(10, 5, vocab), tokens(9, 6, vocab), tokens(1, 7, vocab));
    let mut exec = Executor::new(m.clone(), THREADS).unwrap();
    let fwd = m.forward_entry();
    let (mut ca, mut cb) = (KvCache::new(&m).unwrap(), KvCache::new(&m).unwrap());
    exec.step(fwd, &mut [StepInput { cache: &mut cb, tokens: &b_prompt, logits: Logits::None }]).unwrap();

    let bad = [b_next[0], vocab as u32 + 5];
    let e = exec
        .step(
            fwd,
            &mut [
                StepInput { cache: &mut ca, tokens: &a, logits: Logits::All },
                StepInput { cache: &mut cb, tokens: &bad, logits: Logits::Last },
            ],
        )
        .unwrap_err();
    match &e {
        RuntimeError::Sequence { index: 1, source } => {
            assert!(matches!(**source, RuntimeError::TokenOutOfRange { index: 1, .. }), "{source:?}")
        }
        other => panic!("expected sequence 1's token error, got {other:?}"),
    }
    let msg = e.to_string();
    assert!(msg.contains("sequence 1 of the batch") && msg.contains(&format!("token id {}", vocab + 5)), "{msg}");
    // Nothing ran: neither cache moved, and both give what fresh runs give.
    assert_eq!((ca.len(), cb.len()), (0, 9));
    let got = exec
        .step(
            fwd,
            &mut [
                StepInput { cache: &mut ca, tokens: &a, logits: Logits::All },
                StepInput { cache: &mut cb, tokens: &b_next, logits: Logits::Last },
            ],
        )
        .unwrap();
    let mut sa = Session::with_threads(m.clone(), THREADS).unwrap();
    let mut sb = Session::with_threads(m.clone(), THREADS).unwrap();
    sb.forward(&b_prompt, false).unwrap();
    assert!(bits(&got.logits[0]) == bits(&sa.forward(&a, true).unwrap()));
    assert!(bits(&got.logits[1]) == bits(&sb.forward(&b_next, false).unwrap()));

    // The other checks, each naming its sequence; a batch of one keeps the plain error.
    let (mut c0, mut c1) = (KvCache::new(&m).unwrap(), KvCache::new(&m).unwrap());
    let long = tokens(65, 8, vocab);
    let cases: Vec<(Vec<u32>, Logits, &str)> = vec![
        (vec![], Logits::Last, "empty input"),
        (long, Logits::Last, "65 tokens do not fit the compiled context of 64"),
        (tokens(4, 9, vocab), Logits::Positions(vec![0, 4]), "logits position 4 is past the 4 tokens"),
    ];
    for (toks, logits, needle) in cases {
        let e = exec
            .step(
                fwd,
                &mut [
                    StepInput { cache: &mut c0, tokens: &a, logits: Logits::Last },
                    StepInput { cache: &mut c1, tokens: &toks, logits: logits.clone() },
                ],
            )
            .unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, RuntimeError::Sequence { index: 1, .. }) && msg.contains(needle), "{msg}");
        let e = exec.step(fwd, &mut [StepInput { cache: &mut c1, tokens: &toks, logits }]).unwrap_err();
        assert!(!matches!(e, RuntimeError::Sequence { .. }) && e.to_string().contains(needle), "{e}");
        assert_eq!((c0.len(), c1.len()), (0, 0));
    }
    let e = exec.step(fwd, &mut [StepInput { cache: &mut c0, tokens: &bad, logits: Logits::Last }]).unwrap_err();
    assert!(matches!(e, RuntimeError::TokenOutOfRange { index: 1, .. }), "{e:?}");

    // A cache of another loaded model (even of the same file) is refused.
    let other = model();
    let mut foreign = KvCache::new(&other).unwrap();
    let e = exec.step(fwd, &mut [StepInput { cache: &mut foreign, tokens: &a, logits: Logits::Last }]).unwrap_err();
    assert!(e.to_string().contains("the KV cache was made for another loaded model"), "{e}");
    assert_eq!(foreign.len(), 0);
}

#[test]
fn logit_positions_are_rows_of_all() {
    let m = model();
    let vocab = m.token_vocab_size();
    let width = m.vocab_size();
    let prompt = tokens(21, 10, vocab);
    let mut exec = Executor::new(m.clone(), THREADS).unwrap();
    let fwd = m.forward_entry();
    let mut run = |logits: Logits| {
        let mut c = KvCache::new(&m).unwrap();
        exec.step(fwd, &mut [StepInput { cache: &mut c, tokens: &prompt, logits }]).unwrap().into_logits().remove(0)
    };
    let all = run(Logits::All);
    assert_eq!(all.len(), 21 * width);
    let row = |p: usize| bits(&all[p * width..(p + 1) * width]);
    // Rows from the first, a middle and the last chunk, out of order and repeated.
    let pos = vec![0, 3, 20, 9, 3];
    let got = run(Logits::Positions(pos.clone()));
    assert_eq!(got.len(), pos.len() * width);
    for (k, &p) in pos.iter().enumerate() {
        assert!(bits(&got[k * width..(k + 1) * width]) == row(p), "position {p}");
    }
    // `Last` runs the logits head (final norm, LM head) for the last row alone, and `None` skips
    // it: the same bits as that row of `All`.
    let head = m.header().entries[0].head.expect("a logits head");
    let labels: Vec<&str> = m.header().entries[0].step_indices().skip(head.first as usize).map(|i| m.header().steps[i].label.as_str()).collect();
    assert!(labels.iter().any(|l| l.ends_with("rms_norm")) && labels.last().is_some_and(|l| l.ends_with("matmul") || l.ends_with("linear")), "{labels:?}");
    assert!(bits(&run(Logits::Last)) == row(20));
    assert!(run(Logits::None).is_empty());
    assert!(run(Logits::Positions(vec![])).is_empty());
}

#[test]
fn a_cache_resets_and_is_reused() {
    let m = model();
    let vocab = m.token_vocab_size();
    let (a, b) = (tokens(13, 11, vocab), tokens(6, 12, vocab));
    let mut exec = Executor::new(m.clone(), THREADS).unwrap();
    let fwd = m.forward_entry();
    let mut c = KvCache::new(&m).unwrap();
    let mut step = |c: &mut KvCache, t: &[u32]| exec.step(fwd, &mut [StepInput { cache: c, tokens: t, logits: Logits::All }]).unwrap().into_logits().remove(0);
    let first = step(&mut c, &a);
    let then = step(&mut c, &b);
    assert_eq!(c.len(), 19);
    c.reset();
    assert!(c.is_empty());
    assert!(bits(&step(&mut c, &a)) == bits(&first), "a reset cache runs like a new one");
    // Truncating to a prefix and running the same tokens again gives the same rows.
    c.truncate(13);
    assert_eq!(c.len(), 13);
    assert!(bits(&step(&mut c, &b)) == bits(&then));
    // Another sequence in the reset cache is unaffected by what it held.
    c.reset();
    let fresh = step(&mut KvCache::new(&m).unwrap(), &b);
    assert!(bits(&step(&mut c, &b)) == bits(&fresh));
}
