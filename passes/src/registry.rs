//! The pass registry: every pass the command line can name, with its options, built from a
//! pipeline entry ([`PassSpec`]) and the [`PassContext`] the whole pipeline shares.
//!
//! A pass joins the registry by implementing [`RegisteredPass`] (its kebab-case name, one-line
//! summary and declared [`PassOption`]s, and a constructor from checked options and the context)
//! and by a line in [`all_passes`]. [`PassDef::build`] rejects an option the pass does not declare
//! before the constructor runs, so a constructor reads only declared options and reports a bad
//! value with [`PassOptions::parse`] (the error names the pass, the option and the allowed values).

use crate::egraph::Target;
use crate::error::{PassError, Result};
use crate::manager::Pass;
use crate::pipeline::{PassSpec, Pipeline};

/// What every pass of one pipeline shares: the target the artifact is compiled for.
#[derive(Clone, Debug, PartialEq)]
pub struct PassContext {
    /// The compile target (`--target`); `optimize` uses its cost model unless told otherwise.
    pub target: Target,
}

impl Default for PassContext {
    /// The `cpu` target, as `llmc compile` without `--target`.
    fn default() -> Self {
        PassContext { target: Target::cpu(None) }
    }
}

impl PassContext {
    pub fn new(target: Target) -> Self {
        PassContext { target }
    }

    /// The context for the target named `name` (`cpu`, `cuda`); an unknown name is an error
    /// listing the known ones.
    pub fn for_target(name: &str) -> Result<Self> {
        Ok(PassContext::new(Target::by_name(name).ok_or_else(|| PassError::UnknownTarget { name: name.to_string() })?))
    }
}

/// One option a pass declares, for `llmc passes` and for error messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PassOption {
    /// Kebab-case key (`node-limit`).
    pub name: &'static str,
    /// The values it takes (`cpu|cuda`, `a positive integer`).
    pub values: &'static str,
    /// What it is when not given (`the pipeline's target`, `10000`).
    pub default: &'static str,
    /// One line saying what it does.
    pub summary: &'static str,
}

/// A pass the registry can build from a pipeline entry.
pub trait RegisteredPass: Pass + Sized + 'static {
    /// Kebab-case name used on the command line and in dumps (`constant-fold`).
    const NAME: &'static str;
    /// One line for `llmc passes`.
    const SUMMARY: &'static str;
    /// The options `NAME{key=value,...}` accepts; none by default.
    const OPTIONS: &'static [PassOption] = &[];

    /// Builds the pass from its options (every key already checked to be one of [`Self::OPTIONS`],
    /// given at most once) and the pipeline's context.
    fn from_options(opts: &PassOptions<'_>, ctx: &PassContext) -> Result<Self>;

    /// Builds the pass from a pipeline entry naming it: unknown options are errors.
    fn from_spec(spec: &PassSpec, ctx: &PassContext) -> Result<Self> {
        if spec.name != Self::NAME {
            return Err(PassError::UnknownPass { name: spec.name.clone(), known: Self::NAME.to_string() });
        }
        Self::from_options(&PassOptions::check(Self::NAME, Self::OPTIONS, spec)?, ctx)
    }
}

/// The options of one pipeline entry, checked against the pass's declarations.
pub struct PassOptions<'a> {
    pass: &'static str,
    decls: &'static [PassOption],
    spec: &'a PassSpec,
}

impl<'a> PassOptions<'a> {
    /// Checks that every key of `spec` is declared in `decls` and given once.
    pub fn check(pass: &'static str, decls: &'static [PassOption], spec: &'a PassSpec) -> Result<Self> {
        for (i, (k, _)) in spec.options.iter().enumerate() {
            if !decls.iter().any(|d| d.name == k) {
                return Err(PassError::UnknownOption {
                    pass: pass.to_string(),
                    option: k.clone(),
                    known: describe(decls),
                });
            }
            if spec.options[..i].iter().any(|(j, _)| j == k) {
                return Err(PassError::PassOptions {
                    pass: pass.to_string(),
                    why: format!("option `{k}` is given twice"),
                });
            }
        }
        Ok(PassOptions { pass, decls, spec })
    }

    /// The value of declared option `key`, if given.
    pub fn get(&self, key: &str) -> Option<&'a str> {
        debug_assert!(self.decls.iter().any(|d| d.name == key), "{}: option `{key}` is not declared", self.pass);
        self.spec.option(key)
    }

    /// `f` applied to the value of `key` if given; `f`'s error (why the value is bad) becomes an
    /// error naming the pass, the option, the value and the allowed values.
    pub fn parse<T>(&self, key: &str, f: impl FnOnce(&str) -> std::result::Result<T, String>) -> Result<Option<T>> {
        self.get(key).map(|v| f(v).map_err(|why| self.bad(key, v, why))).transpose()
    }

    /// A bad-value error for option `key` = `value`.
    pub fn bad(&self, key: &str, value: &str, why: String) -> PassError {
        let allowed = self.decls.iter().find(|d| d.name == key).map_or("?", |d| d.values);
        PassError::BadOption {
            pass: self.pass.to_string(),
            option: key.to_string(),
            value: value.to_string(),
            why,
            allowed: allowed.to_string(),
        }
    }

    /// An error about the options as a whole (a required one missing, two that do not combine).
    pub fn invalid(&self, why: String) -> PassError {
        PassError::PassOptions { pass: self.pass.to_string(), why }
    }

    /// The entry these options came from.
    pub fn spec(&self) -> &'a PassSpec {
        self.spec
    }
}

/// `its options: a=V, b=W` or `it takes no options`.
fn describe(decls: &[PassOption]) -> String {
    if decls.is_empty() {
        return "it takes no options".into();
    }
    let list: Vec<String> = decls.iter().map(|d| format!("{}={}", d.name, d.values)).collect();
    format!("its options: {}", list.join(", "))
}

/// A registry entry: a pass's name, summary, options and constructor.
#[derive(Clone, Copy)]
pub struct PassDef {
    name: &'static str,
    summary: &'static str,
    options: &'static [PassOption],
    build: fn(&PassSpec, &PassContext) -> Result<Box<dyn Pass>>,
}

fn build_boxed<P: RegisteredPass>(spec: &PassSpec, ctx: &PassContext) -> Result<Box<dyn Pass>> {
    Ok(Box::new(P::from_spec(spec, ctx)?))
}

impl PassDef {
    /// The entry of pass type `P`.
    pub fn of<P: RegisteredPass>() -> PassDef {
        PassDef { name: P::NAME, summary: P::SUMMARY, options: P::OPTIONS, build: build_boxed::<P> }
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    pub fn summary(&self) -> &'static str {
        self.summary
    }

    pub fn options(&self) -> &'static [PassOption] {
        self.options
    }

    /// Builds the pass from `spec` (which must name it) and the pipeline's context.
    pub fn build(&self, spec: &PassSpec, ctx: &PassContext) -> Result<Box<dyn Pass>> {
        (self.build)(spec, ctx)
    }
}

impl std::fmt::Debug for PassDef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PassDef").field("name", &self.name).field("options", &self.options).finish_non_exhaustive()
    }
}

/// Every pass the command line can name, in the order `llmc passes` lists them.
pub fn all_passes() -> Vec<PassDef> {
    vec![
        PassDef::of::<crate::dce::Dce>(),
        PassDef::of::<crate::cse::Cse>(),
        PassDef::of::<crate::constant_fold::ConstantFold>(),
        PassDef::of::<crate::egraph::Optimize>(),
        PassDef::of::<crate::quantize::Quantize>(),
        PassDef::of::<crate::kv_cache::KvCache>(),
    ]
}

/// The registry entry of the pass named `name`.
pub fn lookup(name: &str) -> Option<PassDef> {
    all_passes().into_iter().find(|p| p.name() == name)
}

/// The known pass names, comma-separated (for error messages).
pub(crate) fn known_names() -> String {
    all_passes().iter().map(|p| p.name()).collect::<Vec<_>>().join(", ")
}

/// Builds the pass `spec` names; an unknown name is an error listing the known ones.
pub fn build(spec: &PassSpec, ctx: &PassContext) -> Result<Box<dyn Pass>> {
    match lookup(&spec.name) {
        Some(def) => def.build(spec, ctx),
        None => Err(PassError::UnknownPass { name: spec.name.clone(), known: known_names() }),
    }
}

/// The pipeline `llmc compile` runs when none is given.
pub fn default_pipeline() -> Pipeline {
    ["dce", "cse", "constant-fold", "dce", "optimize", "dce", "cse"].into_iter().map(PassSpec::new).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(s: &str) -> PassSpec {
        PassSpec::parse(s).unwrap()
    }

    fn build_err(s: &str) -> String {
        match build(&spec(s), &PassContext::default()) {
            Ok(p) => panic!("`{s}` built pass {}", p.name()),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn registry_names_are_unique_kebab_case_and_match_the_built_pass() {
        let mut seen = std::collections::HashSet::new();
        for def in all_passes() {
            assert!(def.name().chars().all(|c| c.is_ascii_lowercase() || c == '-'), "{}", def.name());
            assert!(seen.insert(def.name()), "duplicate pass {}", def.name());
            assert!(!def.summary().is_empty());
            for o in def.options() {
                assert!(o.name.chars().all(|c| c.is_ascii_lowercase() || c == '-'), "{}", o.name);
                assert!(!o.values.is_empty() && !o.default.is_empty() && !o.summary.is_empty(), "{o:?}");
            }
            if def.name() == "quantize" || def.name() == "kv-cache" {
                continue; // needs a format or sparsity; a dtype
            }
            let p = def.build(&PassSpec::new(def.name()), &PassContext::default()).unwrap();
            assert_eq!((p.name(), p.summary()), (def.name(), def.summary()));
        }
        let q = build(&spec("quantize{format=int8}"), &PassContext::default()).unwrap();
        assert_eq!(q.name(), "quantize");
        for p in &default_pipeline() {
            assert!(lookup(&p.name).is_some() && p.options.is_empty(), "{p}");
        }
    }

    #[test]
    fn option_errors_name_the_pass_the_option_and_the_allowed_values() {
        let e = build_err("fuse-everything{x=1}");
        assert!(
            e.contains("unknown pass `fuse-everything`") && e.contains("dce, cse, constant-fold, optimize, quantize"),
            "{e}"
        );
        for p in ["dce", "cse", "constant-fold"] {
            let e = build_err(&format!("{p}{{level=3}}"));
            assert_eq!(e, format!("pass `{p}` has no option `level`; it takes no options"));
        }
        let e = build_err("optimize{targte=cuda}");
        assert_eq!(
            e,
            "pass `optimize` has no option `targte`; its options: target=cpu|cuda, node-limit=a positive integer, \
             iterations=a positive integer, extract-moves=a positive integer, time-limit=seconds (a positive number)"
        );
        let e = build_err("optimize{target=tpu}");
        assert!(
            e.starts_with("pass `optimize`, option `target=tpu`: no cost model for target `tpu`")
                && e.ends_with("(allowed: cpu|cuda)"),
            "{e}"
        );
        for bad in ["0", "-1", "x", "1e3", ""] {
            let e = build_err(&format!("optimize{{node-limit=\"{bad}\"}}"));
            assert!(
                e.starts_with(&format!("pass `optimize`, option `node-limit={bad}`:"))
                    && e.contains("allowed: a positive integer"),
                "{e}"
            );
        }
        let dup = PassSpec::new("dce").with("x", "1").with("x", "2");
        assert!(build(&dup, &PassContext::default()).err().unwrap().to_string().contains("no option `x`"));
        let dup = PassSpec::new("optimize").with("target", "cpu").with("target", "cuda");
        let e = build(&dup, &PassContext::default()).err().unwrap().to_string();
        assert_eq!(e, "pass `optimize`: option `target` is given twice");
    }

    #[test]
    fn context_targets() {
        assert_eq!(PassContext::default().target.name, "cpu");
        assert_eq!(PassContext::for_target("cuda").unwrap().target, Target::cuda());
        let e = PassContext::for_target("tpu").unwrap_err().to_string();
        assert_eq!(e, "no cost model for target `tpu` (known: cpu, cuda)");
    }
}
