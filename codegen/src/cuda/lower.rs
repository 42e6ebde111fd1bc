//! MLIR text -> PTX, in process, through melior (the MLIR C API of LLVM 22).
//!
//! The kernel module is parsed, then lowered by
//! `nvvm-attach-target{chip=sm_XX features=+ptx80 O=3}`, `gpu.module(convert-scf-to-cf,
//! convert-gpu-to-nvvm, canonicalize, cse, reconcile-unrealized-casts)` and
//! `gpu-module-to-binary{format=isa}`; the PTX is the assembly string of the resulting
//! `#gpu.object`. Diagnostics MLIR reports on the way are collected into the error.

use std::cell::RefCell;
use std::rc::Rc;

use melior::dialect::DialectRegistry;
use melior::ir::operation::OperationLike;
use melior::ir::Module;
use melior::pass::PassManager;
use melior::utility::{parse_pass_pipeline, register_all_dialects, register_all_llvm_translations, register_all_passes};
use melior::Context;

use crate::error::{CodegenError, Result};

/// The GPU architectures every kernel is compiled for (`sm_80`: A100; `sm_90`: H100/H200).
pub const ARCHS: &[&str] = &["sm_80", "sm_90"];

/// An MLIR context with every dialect, pass and LLVM translation registered.
pub struct Lowerer {
    ctx: Context,
    diags: Rc<RefCell<Vec<String>>>,
}

impl Lowerer {
    pub fn new() -> Lowerer {
        let registry = DialectRegistry::new();
        register_all_dialects(&registry);
        register_all_passes();
        let ctx = Context::new();
        ctx.append_dialect_registry(&registry);
        ctx.load_all_available_dialects();
        register_all_llvm_translations(&ctx);
        // Compile kernels one after another: MLIR's own thread pool would compete with the
        // rest of the compiler for the cores.
        ctx.enable_multi_threading(false);
        let diags = Rc::new(RefCell::new(Vec::new()));
        let d = diags.clone();
        ctx.attach_diagnostic_handler(move |diag| {
            d.borrow_mut().push(format!("{}: {diag}", diag.location()));
            true
        });
        Lowerer { ctx, diags }
    }

    fn fail(&self, kernel: &str, what: &str) -> CodegenError {
        let d = std::mem::take(&mut *self.diags.borrow_mut());
        CodegenError::Mlir { kernel: kernel.to_string(), msg: format!("{what}: {}", d.join("; ")) }
    }

    /// Parses and verifies `text` (without lowering it).
    pub fn parse(&self, kernel: &str, text: &str) -> Result<()> {
        self.diags.borrow_mut().clear();
        let m = Module::parse(&self.ctx, text).ok_or_else(|| self.fail(kernel, "cannot parse the kernel's MLIR"))?;
        if !m.as_operation().verify() {
            return Err(self.fail(kernel, "the kernel's MLIR does not verify"));
        }
        Ok(())
    }

    /// The PTX of the kernel module `text` for `chip` (`sm_80`, `sm_90`).
    pub fn ptx(&self, kernel: &str, text: &str, chip: &str) -> Result<String> {
        self.diags.borrow_mut().clear();
        let mut m = Module::parse(&self.ctx, text).ok_or_else(|| self.fail(kernel, "cannot parse the kernel's MLIR"))?;
        let pm = PassManager::new(&self.ctx);
        let pipeline = format!(
            "builtin.module(nvvm-attach-target{{chip={chip} features=+ptx80 O=3}},\
             gpu.module(convert-scf-to-cf,convert-gpu-to-nvvm,canonicalize,cse,reconcile-unrealized-casts),\
             gpu-module-to-binary{{format=isa}})"
        );
        parse_pass_pipeline(pm.as_operation_pass_manager(), &pipeline)
            .map_err(|e| CodegenError::Mlir { kernel: kernel.into(), msg: format!("pass pipeline: {e}") })?;
        pm.run(&mut m).map_err(|_| self.fail(kernel, &format!("lowering to PTX for {chip} failed")))?;
        let printed = m.as_operation().to_string();
        extract_ptx(&printed).ok_or_else(|| CodegenError::Mlir {
            kernel: kernel.into(),
            msg: format!("no PTX in the lowered module for {chip}"),
        })
    }
}

impl Default for Lowerer {
    fn default() -> Self {
        Lowerer::new()
    }
}

/// The PTX text in a printed module holding a `gpu.binary`: the string literal containing
/// `.version`, with MLIR's escapes (`\XX` hex, `\\`, `\"`, `\n`, `\t`) undone.
pub fn extract_ptx(printed: &str) -> Option<String> {
    let bytes = printed.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'"' {
            i += 1;
            continue;
        }
        let mut out = Vec::new();
        let mut j = i + 1;
        while j < bytes.len() && bytes[j] != b'"' {
            if bytes[j] == b'\\' && j + 1 < bytes.len() {
                let c = bytes[j + 1];
                match c {
                    b'\\' | b'"' => {
                        out.push(c);
                        j += 2;
                    }
                    b'n' => {
                        out.push(b'\n');
                        j += 2;
                    }
                    b't' => {
                        out.push(b'\t');
                        j += 2;
                    }
                    _ => {
                        let hex = std::str::from_utf8(bytes.get(j + 1..j + 3)?).ok()?;
                        out.push(u8::from_str_radix(hex, 16).ok()?);
                        j += 3;
                    }
                }
            } else {
                out.push(bytes[j]);
                j += 1;
            }
        }
        let s = String::from_utf8(out).ok()?;
        if s.contains(".version") && s.contains(".entry") {
            return Some(s.trim_end_matches('\0').to_string());
        }
        i = j + 1;
    }
    None
}
