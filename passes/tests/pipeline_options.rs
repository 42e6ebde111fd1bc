//! Pass options and the target through the pipeline: a pipeline spec with options round-trips
//! through `--print-ir-after-all` (the headers parse back to the pipeline that ran, and running
//! that pipeline again gives the same IR), the `cpu` and `cuda` cost models extract different
//! forms of one graph, and the pipeline's context target reaches `optimize`.

use std::path::Path;

use llmc_ir::{self as ir, Graph};
use llmc_passes::{PassContext, PassManager, Pipeline, PrintAfter};

const HEADER: &str = "; ---- IR after ";

fn fixture(case: &str) -> Graph {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(case);
    llmc_frontend::load(&dir, &llmc_frontend::Options::default()).unwrap().graph
}

/// Runs `spec` on `g` with `ctx`, printing after every pass; returns the printed text.
fn run_printing(g: &mut Graph, spec: &str, ctx: &PassContext) -> String {
    let mut out = Vec::new();
    PassManager::parse(spec, ctx)
        .unwrap_or_else(|e| panic!("{spec}: {e}"))
        .print_after(PrintAfter::All)
        .run(g, &mut out)
        .unwrap_or_else(|e| panic!("{spec}: {e}"));
    String::from_utf8(out).unwrap()
}

/// The entries the headers of a `--print-ir-after-all` text name, in order.
fn header_entries(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix(HEADER))
        .map(|l| l.strip_suffix(" ----").unwrap_or_else(|| panic!("malformed header `{l}`")).to_string())
        .collect()
}

#[test]
fn a_pipeline_with_options_round_trips_through_print_ir_after_all() {
    // Non-canonical spelling on purpose (blanks, quoted values that need not be, `{}`). (A value
    // that must be quoted, a pattern with a comma, matches no weight name, and a `keep-fp`
    // pattern that matches nothing is an error: see the end.)
    let spec = "dce, cse{}, constant-fold,dce, optimize{ target = cuda, iterations=12 ,node-limit=\"5000\" }, \
                dce,cse,quantize{format=int4:g64:asym,keep-fp=\"lm_head;*.down_proj*\"}";
    let want = Pipeline::parse(spec).unwrap();
    assert_eq!(
        want.to_string(),
        "dce,cse,constant-fold,dce,optimize{target=cuda,iterations=12,node-limit=5000},dce,cse,\
         quantize{format=int4:g64:asym,keep-fp=lm_head;*.down_proj*}"
    );
    let ctx = PassContext::default();
    let mut g = fixture("llama_mha");
    let text = run_printing(&mut g, spec, &ctx);
    let entries = header_entries(&text);
    assert_eq!(entries.len(), want.len(), "{entries:?}");
    assert_eq!(entries[4], "optimize{target=cuda,iterations=12,node-limit=5000}");
    assert_eq!(entries[7], "quantize{format=int4:g64:asym,keep-fp=lm_head;*.down_proj*}");
    // The headers, joined, parse back to the same pipeline ...
    let back = Pipeline::parse(&entries.join(",")).unwrap();
    assert_eq!(back, want);
    // ... and every entry on its own too.
    for (e, w) in entries.iter().zip(want.iter()) {
        assert_eq!(llmc_passes::PassSpec::parse(e).unwrap(), *w);
    }
    // Running the parsed-back pipeline prints the same text: same headers, same graphs.
    let mut again = fixture("llama_mha");
    assert_eq!(run_printing(&mut again, &back.to_string(), &ctx), text);
    assert!(again == g);
    // The options took effect: int4 layouts, lm_head kept.
    let printed = ir::print(&g);
    assert!(printed.contains("layout = int4_g64_asym"), "{printed}");
    let lm_head = printed.lines().find(|l| l.contains("\"lm_head.weight\"")).expect("an lm_head weight");
    assert!(!lm_head.contains("layout"), "{lm_head}");
    // A pattern that keeps nothing would change nothing: an error naming it.
    let e = PassManager::parse("quantize{format=int8,keep-fp=\"lm_head;never,matched\"}", &ctx)
        .unwrap()
        .run(&mut fixture("llama_mha"), &mut std::io::sink())
        .unwrap_err()
        .to_string();
    assert!(e.contains("--keep-fp `never,matched` matches no weight"), "{e}");
}

#[test]
fn dump_dir_headers_carry_the_options() {
    let dir = std::env::temp_dir().join(format!("llmc-pipeline-options-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut g = fixture("llama_mha");
    PassManager::parse("dce,optimize{target=cuda},quantize{sparsity=2:4}", &PassContext::default())
        .unwrap()
        .dump_dir(Some(dir.clone()))
        .run(&mut g, &mut std::io::sink())
        .unwrap();
    let first_line = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap().lines().next().unwrap().to_string();
    assert_eq!(first_line("00-input.ir"), "; ---- input IR ----");
    assert_eq!(first_line("01-dce.ir"), "; ---- IR after dce ----");
    assert_eq!(first_line("02-optimize.ir"), "; ---- IR after optimize{target=cuda} ----");
    assert_eq!(first_line("03-quantize.ir"), "; ---- IR after quantize{sparsity=2:4} ----");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Three projections of one input (Q, K, V): 64 columns each of a 256-wide input, or 8 columns
/// each of a 1024-wide one. `tests/filetests/egraph-target.ir` explains the costs.
fn qkv(k: usize, n: usize) -> Graph {
    ir::parse(&format!(
        "graph @qkv {{
  %ids = input {{name = \"ids\"}} : i32[S]
  %emb = weight {{name = \"embed\"}} : f32[8,{k}]
  %x = gather %emb, %ids : f32[S,{k}]
  %wq = weight {{name = \"q_proj.weight\"}} : f32[{n},{k}]
  %wk = weight {{name = \"k_proj.weight\"}} : f32[{n},{k}]
  %wv = weight {{name = \"v_proj.weight\"}} : f32[{n},{k}]
  %q = matmul %x, %wq {{transpose_b}} : f32[S,{n}]
  %k = matmul %x, %wk {{transpose_b}} : f32[S,{n}]
  %v = matmul %x, %wv {{transpose_b}} : f32[S,{n}]
  return %q, %k, %v
}}
"
    ))
    .unwrap()
}

/// `g` after `spec` on `ctx`, printed.
fn optimized(g: &Graph, spec: &str, ctx: &PassContext) -> String {
    let mut g = g.clone();
    PassManager::parse(spec, ctx).unwrap().run(&mut g, &mut std::io::sink()).unwrap();
    ir::print(&g)
}

fn count(text: &str, op: &str) -> usize {
    text.lines().filter(|l| l.split_whitespace().nth(2) == Some(op)).count()
}

/// Merged: one `linear` over the three weights concatenated, sliced three ways.
fn assert_merged(text: &str, n: usize, what: &str) {
    let total = 3 * n;
    assert_eq!(
        (count(text, "concat"), count(text, "linear"), count(text, "slice"), count(text, "matmul")),
        (1, 1, 3, 0),
        "{what}:\n{text}"
    );
    assert!(text.contains(&format!("{{axis = 0, n = 3}} : f32[{total},")), "{what}:\n{text}");
    assert!(text.contains(&format!("{{transpose_b}} : f32[S,{total}]")), "{what}:\n{text}");
}

/// Separate: three products, no concat, no slice.
fn assert_separate(text: &str, what: &str) {
    assert_eq!(
        (count(text, "concat"), count(text, "slice"), count(text, "matmul") + count(text, "linear")),
        (0, 0, 3),
        "{what}:\n{text}"
    );
}

#[test]
fn cpu_and_cuda_cost_models_extract_different_forms() {
    let cpu = PassContext::for_target("cpu").unwrap();
    let cuda = PassContext::for_target("cuda").unwrap();
    // 64-column projections: cpu keeps three products, cuda merges them.
    let wide = qkv(256, 64);
    let (c, g) = (optimized(&wide, "optimize{target=cpu}", &cpu), optimized(&wide, "optimize{target=cuda}", &cpu));
    eprintln!("optimize{{target=cpu}}:\n{c}\noptimize{{target=cuda}}:\n{g}");
    assert_separate(&c, "wide, cpu");
    assert_merged(&g, 64, "wide, cuda");
    // 8-column projections of a wider input: the other way round.
    let narrow = qkv(1024, 8);
    let (c, g) = (optimized(&narrow, "optimize{target=cpu}", &cpu), optimized(&narrow, "optimize{target=cuda}", &cpu));
    eprintln!("optimize{{target=cpu}}:\n{c}\noptimize{{target=cuda}}:\n{g}");
    assert_merged(&c, 8, "narrow, cpu");
    assert_separate(&g, "narrow, cuda");

    // Without `target=`, `optimize` uses the pipeline's target; with it, the option wins.
    assert_eq!(optimized(&wide, "optimize", &cuda), optimized(&wide, "optimize{target=cuda}", &cpu));
    assert_eq!(optimized(&wide, "optimize", &cpu), optimized(&wide, "optimize{target=cpu}", &cuda));
    assert_ne!(optimized(&wide, "optimize", &cpu), optimized(&wide, "optimize", &cuda));
    // The default context is cpu, and the default pipeline on it extracts the cpu form.
    assert_eq!(optimized(&wide, "optimize", &PassContext::default()), optimized(&wide, "optimize{target=cpu}", &cuda));
}

#[test]
fn the_iteration_option_is_fuel() {
    // One round of rules fuses nothing that needs two (matmul -> linear, then the merge).
    let g = qkv(256, 64);
    let ctx = PassContext::for_target("cuda").unwrap();
    assert_separate(&optimized(&g, "optimize{iterations=1}", &ctx), "one iteration");
    assert_merged(&optimized(&g, "optimize{iterations=2}", &ctx), 64, "two iterations");
    // Deterministic: the same input and options give the same text.
    assert_eq!(
        optimized(&g, "optimize{iterations=2,node-limit=200}", &ctx),
        optimized(&g, "optimize{iterations=2,node-limit=200}", &ctx)
    );
}
