//! Example: text generation in a Rust application through `llmc-runtime` alone (no compiler
//! crate is linked). `src/main.rs` is the command line; this library is what it and the tests call.
//!
//! ```no_run
//! use llmc_runtime::SamplingParams;
//! let out = llmc_example_rust::generate(
//!     std::path::Path::new("seedlm.llmc"), "Speculative decoding", 32, SamplingParams::default(),
//!     |piece| print!("{piece}"),
//! ).unwrap();
//! println!("\n{:?}", out.ids);
//! ```

use std::path::Path;

use llmc_runtime::{Model, Result, Sampler, SamplingParams, Session, StopConditions, Tokenizer};

/// What [`generate`] produced.
pub struct Generated {
    pub prompt_ids: Vec<u32>,
    pub ids: Vec<u32>,
    pub text: String,
}

/// Loads the artifact, tokenizes `prompt` with the tokenizer it carries, and generates up to
/// `max_new` tokens (stopping at end-of-sequence), handing each completed piece of text to
/// `on_text` as soon as it is decoded.
pub fn generate(artifact: &Path, prompt: &str, max_new: usize, params: SamplingParams, mut on_text: impl FnMut(&str)) -> Result<Generated> {
    let model = Model::load(artifact)?;
    let tokenizer = Tokenizer::from_model(&model)?;
    let prompt_ids = tokenizer.encode(prompt, true)?;
    let mut session = Session::new(model.clone())?;
    let mut sampler = Sampler::new(params)?;
    let stop = StopConditions { max_new, stop: model.eos_ids() };

    let mut stream = tokenizer.stream(true);
    let mut text = String::new();
    let mut failed = None;
    let (ids, _, _stats) = llmc_runtime::generate(&mut session, &prompt_ids, &stop, &mut sampler, false, |id| match stream.push(id) {
        Ok(piece) => {
            on_text(&piece);
            text.push_str(&piece);
        }
        Err(e) => failed = Some(e),
    })?;
    if let Some(e) = failed {
        return Err(e);
    }
    let rest = stream.finish()?;
    on_text(&rest);
    text.push_str(&rest);
    Ok(Generated { prompt_ids, ids, text })
}
