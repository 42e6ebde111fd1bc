//! The runtime's C API (`runtime/include/llmc.h`), built as the static library `libllmc_capi.a`.
//!
//! `llmc compile --emit lib` copies that library, adds an object holding the compiled artifact,
//! and writes `model.h` (the header above plus `llmc_model_load_embedded`). Every function here
//! checks its pointers, catches panics (reported as `LLMC_ERR_INTERNAL`), and reports failures as
//! a status code plus a per-thread message ([`llmc_last_error`]).

#![allow(non_camel_case_types)]

use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, OnceLock};

use llmc_runtime::{Model, RuntimeError, Sampler, SamplingParams, Session, Tokenizer};

pub const LLMC_OK: c_int = 0;
pub const LLMC_ERR_IO: c_int = 1;
pub const LLMC_ERR_CORRUPT: c_int = 2;
pub const LLMC_ERR_UNSUPPORTED: c_int = 3;
pub const LLMC_ERR_INVALID_ARGUMENT: c_int = 4;
pub const LLMC_ERR_CONTEXT_OVERFLOW: c_int = 5;
pub const LLMC_ERR_TOKENIZER: c_int = 6;
pub const LLMC_ERR_INTERNAL: c_int = 7;

/// A loaded model and, parsed on first use, its tokenizer.
pub struct llmc_model {
    model: Arc<Model>,
    tokenizer: OnceLock<Result<Tokenizer, String>>,
}

pub struct llmc_session {
    session: Session,
    logits: Vec<f32>,
}

pub struct llmc_sampler {
    sampler: Sampler,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct llmc_sampling {
    pub temperature: f32,
    pub top_k: u32,
    pub top_p: f32,
    pub repetition_penalty: f32,
    pub seed: u64,
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_error(msg: &str) {
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

/// A failure: its status code and message.
struct Fail(c_int, String);

impl From<RuntimeError> for Fail {
    fn from(e: RuntimeError) -> Fail {
        let code = match &e {
            RuntimeError::Io { .. } => LLMC_ERR_IO,
            RuntimeError::Corrupt { .. } | RuntimeError::Checksum { .. } => LLMC_ERR_CORRUPT,
            RuntimeError::Version { .. } | RuntimeError::Target { .. } | RuntimeError::CpuFeature { .. } => LLMC_ERR_UNSUPPORTED,
            RuntimeError::TokenOutOfRange { .. } | RuntimeError::EmptyInput | RuntimeError::InvalidArgument(_) => LLMC_ERR_INVALID_ARGUMENT,
            RuntimeError::ContextOverflow { .. } => LLMC_ERR_CONTEXT_OVERFLOW,
            RuntimeError::Tokenizer(_) => LLMC_ERR_TOKENIZER,
            _ => LLMC_ERR_INTERNAL,
        };
        Fail(code, e.to_string())
    }
}

fn invalid(msg: &str) -> Fail {
    Fail(LLMC_ERR_INVALID_ARGUMENT, msg.to_string())
}

/// Runs `f`, turning an error or a panic into a status code and the thread's message.
fn guard(f: impl FnOnce() -> Result<(), Fail>) -> c_int {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => LLMC_OK,
        Ok(Err(Fail(code, msg))) => {
            set_error(&msg);
            code
        }
        Err(p) => {
            let what = p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned());
            set_error(&format!("internal error in llmc (please report): {}", what.unwrap_or_default()));
            LLMC_ERR_INTERNAL
        }
    }
}

/// `&*p`, or an error naming `what` when `p` is NULL.
///
/// # Safety
/// A non-null `p` must point to a live `T`.
unsafe fn nonnull<'a, T>(p: *const T, what: &str) -> Result<&'a T, Fail> {
    p.as_ref().ok_or_else(|| invalid(&format!("{what} is NULL")))
}

/// # Safety
/// A non-null `p` must point to a live `T` not used elsewhere during the call.
unsafe fn nonnull_mut<'a, T>(p: *mut T, what: &str) -> Result<&'a mut T, Fail> {
    p.as_mut().ok_or_else(|| invalid(&format!("{what} is NULL")))
}

/// # Safety
/// A non-null `p` must point to `n` readable `T`s.
unsafe fn slice<'a, T>(p: *const T, n: usize, what: &str) -> Result<&'a [T], Fail> {
    if n == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(invalid(&format!("{what} is NULL")));
    }
    Ok(std::slice::from_raw_parts(p, n))
}

fn boxed<T>(out: *mut *mut T, v: T) -> Result<(), Fail> {
    if out.is_null() {
        return Err(invalid("the output pointer is NULL"));
    }
    // SAFETY: checked non-null; the caller passes a writable pointer slot.
    unsafe { *out = Box::into_raw(Box::new(v)) };
    Ok(())
}

#[no_mangle]
pub extern "C" fn llmc_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

#[no_mangle]
pub extern "C" fn llmc_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr() as *const c_char
}

fn new_model(model: Arc<Model>) -> llmc_model {
    llmc_model { model, tokenizer: OnceLock::new() }
}

/// # Safety
/// `path` is a NUL-terminated string; `out` a writable pointer slot.
#[no_mangle]
pub unsafe extern "C" fn llmc_model_load(path: *const c_char, out: *mut *mut llmc_model) -> c_int {
    guard(|| {
        if path.is_null() {
            return Err(invalid("path is NULL"));
        }
        let p = CStr::from_ptr(path).to_str().map_err(|_| invalid("path is not UTF-8"))?;
        let m = Model::load(std::path::Path::new(p))?;
        boxed(out, new_model(m))
    })
}

/// # Safety
/// `bytes` points to `len` readable bytes; `out` a writable pointer slot.
#[no_mangle]
pub unsafe extern "C" fn llmc_model_load_bytes(bytes: *const c_void, len: usize, out: *mut *mut llmc_model) -> c_int {
    guard(|| {
        let b = slice(bytes as *const u8, len, "bytes")?;
        let m = Model::load_bytes("<embedded artifact>", b)?;
        boxed(out, new_model(m))
    })
}

/// # Safety
/// `model` is NULL or a model from `llmc_model_load*`, freed once. Sessions hold their own
/// reference, so they stay usable after the model handle is freed.
#[no_mangle]
pub unsafe extern "C" fn llmc_model_free(model: *mut llmc_model) {
    if !model.is_null() {
        drop(Box::from_raw(model));
    }
}

/// # Safety
/// `model` is NULL or a live model.
#[no_mangle]
pub unsafe extern "C" fn llmc_model_vocab_size(model: *const llmc_model) -> usize {
    model.as_ref().map_or(0, |m| m.model.vocab_size())
}

/// # Safety
/// `model` is NULL or a live model.
#[no_mangle]
pub unsafe extern "C" fn llmc_model_max_context(model: *const llmc_model) -> usize {
    model.as_ref().map_or(0, |m| m.model.max_context())
}

/// # Safety
/// `model` is NULL or a live model; `ids` has room for `cap` ids (may be NULL when `cap` is 0).
#[no_mangle]
pub unsafe extern "C" fn llmc_model_eos_ids(model: *const llmc_model, ids: *mut u32, cap: usize) -> usize {
    let Some(m) = model.as_ref() else { return 0 };
    let eos = m.model.eos_ids();
    if !ids.is_null() {
        for (i, &id) in eos.iter().take(cap).enumerate() {
            *ids.add(i) = id;
        }
    }
    eos.len()
}

/// # Safety
/// `model` is a live model; `out` a writable pointer slot.
#[no_mangle]
pub unsafe extern "C" fn llmc_session_new(model: *const llmc_model, threads: usize, out: *mut *mut llmc_session) -> c_int {
    guard(|| {
        let m = nonnull(model, "model")?;
        let threads = if threads == 0 { llmc_runtime::model::default_threads() } else { threads };
        let session = Session::with_threads(m.model.clone(), threads)?;
        boxed(out, llmc_session { session, logits: Vec::new() })
    })
}

/// # Safety
/// `session` is NULL or a live session.
#[no_mangle]
pub unsafe extern "C" fn llmc_session_free(session: *mut llmc_session) {
    if !session.is_null() {
        drop(Box::from_raw(session));
    }
}

/// # Safety
/// `session` is NULL or a live session.
#[no_mangle]
pub unsafe extern "C" fn llmc_session_reset(session: *mut llmc_session) {
    if let Some(s) = session.as_mut() {
        s.session.reset();
        s.logits.clear();
    }
}

/// # Safety
/// `session` is NULL or a live session.
#[no_mangle]
pub unsafe extern "C" fn llmc_session_past(session: *const llmc_session) -> usize {
    session.as_ref().map_or(0, |s| s.session.past())
}

/// # Safety
/// `session` is a live session; `ids` points to `n` ids.
#[no_mangle]
pub unsafe extern "C" fn llmc_session_prefill(session: *mut llmc_session, ids: *const u32, n: usize) -> c_int {
    guard(|| {
        let s = nonnull_mut(session, "session")?;
        let ids = slice(ids, n, "ids")?;
        s.logits = s.session.forward(ids, false)?;
        Ok(())
    })
}

/// # Safety
/// `session` is a live session.
#[no_mangle]
pub unsafe extern "C" fn llmc_session_decode(session: *mut llmc_session, id: u32) -> c_int {
    guard(|| {
        let s = nonnull_mut(session, "session")?;
        s.logits = s.session.forward(&[id], false)?;
        Ok(())
    })
}

/// # Safety
/// `session` is NULL or a live session.
#[no_mangle]
pub unsafe extern "C" fn llmc_session_logits(session: *const llmc_session) -> *const f32 {
    match session.as_ref() {
        Some(s) if !s.logits.is_empty() => s.logits.as_ptr(),
        _ => std::ptr::null(),
    }
}

#[no_mangle]
pub extern "C" fn llmc_sampling_default() -> llmc_sampling {
    let d = SamplingParams::default();
    llmc_sampling { temperature: d.temperature, top_k: d.top_k as u32, top_p: d.top_p, repetition_penalty: d.repetition_penalty, seed: d.seed }
}

/// # Safety
/// `params` points to an `llmc_sampling`; `out` a writable pointer slot.
#[no_mangle]
pub unsafe extern "C" fn llmc_sampler_new(params: *const llmc_sampling, out: *mut *mut llmc_sampler) -> c_int {
    guard(|| {
        let p = nonnull(params, "params")?;
        let sampler = Sampler::new(SamplingParams {
            temperature: p.temperature,
            top_k: p.top_k as usize,
            top_p: p.top_p,
            repetition_penalty: p.repetition_penalty,
            seed: p.seed,
        })?;
        boxed(out, llmc_sampler { sampler })
    })
}

/// # Safety
/// `sampler` is NULL or a live sampler.
#[no_mangle]
pub unsafe extern "C" fn llmc_sampler_free(sampler: *mut llmc_sampler) {
    if !sampler.is_null() {
        drop(Box::from_raw(sampler));
    }
}

/// # Safety
/// `sampler` is NULL or a live sampler; `ids` points to `n` ids.
#[no_mangle]
pub unsafe extern "C" fn llmc_sampler_accept(sampler: *mut llmc_sampler, ids: *const u32, n: usize) {
    if let (Some(s), Ok(ids)) = (sampler.as_mut(), slice(ids, n, "ids")) {
        s.sampler.accept(ids);
    }
}

/// # Safety
/// `sampler` is a live sampler; `logits` points to `vocab` floats; `out` is writable.
#[no_mangle]
pub unsafe extern "C" fn llmc_sampler_sample(sampler: *mut llmc_sampler, logits: *const f32, vocab: usize, out: *mut u32) -> c_int {
    guard(|| {
        let s = nonnull_mut(sampler, "sampler")?;
        let l = slice(logits, vocab, "logits")?;
        if l.is_empty() {
            return Err(invalid("vocab is 0"));
        }
        let out = nonnull_mut(out, "out")?;
        *out = s.sampler.sample(l);
        Ok(())
    })
}

fn tokenizer(m: &llmc_model) -> Result<&Tokenizer, Fail> {
    m.tokenizer
        .get_or_init(|| Tokenizer::from_model(&m.model).map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| Fail(LLMC_ERR_TOKENIZER, e.clone()))
}

/// # Safety
/// `model` is a live model; `text` NUL-terminated; `ids` has room for `cap` ids; `n` is writable.
#[no_mangle]
pub unsafe extern "C" fn llmc_tokenize(model: *const llmc_model, text: *const c_char, ids: *mut u32, cap: usize, n: *mut usize) -> c_int {
    guard(|| {
        let m = nonnull(model, "model")?;
        if text.is_null() {
            return Err(invalid("text is NULL"));
        }
        let text = CStr::from_ptr(text).to_str().map_err(|_| Fail(LLMC_ERR_TOKENIZER, "text is not UTF-8".into()))?;
        let toks = tokenizer(m)?.encode(text, true)?;
        let n = nonnull_mut(n, "n")?;
        *n = toks.len();
        if cap > 0 {
            if ids.is_null() {
                return Err(invalid("ids is NULL"));
            }
            for (i, &t) in toks.iter().take(cap).enumerate() {
                *ids.add(i) = t;
            }
        }
        Ok(())
    })
}

/// # Safety
/// `model` is a live model; `ids` points to `n` ids; `buf` has room for `cap` bytes; `len` is writable.
#[no_mangle]
pub unsafe extern "C" fn llmc_detokenize(model: *const llmc_model, ids: *const u32, n: usize, buf: *mut c_char, cap: usize, len: *mut usize) -> c_int {
    guard(|| {
        let m = nonnull(model, "model")?;
        let ids = slice(ids, n, "ids")?;
        let text = tokenizer(m)?.decode(ids, true)?;
        *nonnull_mut(len, "len")? = text.len();
        if cap > 0 {
            if buf.is_null() {
                return Err(invalid("buf is NULL"));
            }
            let k = text.len().min(cap - 1);
            std::ptr::copy_nonoverlapping(text.as_ptr(), buf as *mut u8, k);
            *buf.add(k) = 0;
        }
        Ok(())
    })
}
