//! `kv-cache{dtype=int8}`: the KV cache's storage, a compile-time choice (`llmc compile
//! --kv-dtype`). `dtype=int8` stores every KV-cache state as `kv<int8>` ([`ir::KvLayout::Int8`]:
//! each token's keys and values per KV head as int8 codes with one f32 scale, a quarter of the
//! f32 bytes, so decode at long context reads a quarter of the cache); `dtype=f32` keeps (or
//! restores) the contiguous f32 layout. Only the states' declarations change: `kv_concat`
//! quantizes what it writes and every reader sees the values it reads back, in the interpreter
//! and in the kernels alike. Like `quantize`, this pass changes the model's numbers on purpose
//! (`llmc eval --reference` measures by how much), so the soundness test's bit-equality does not
//! apply to it.

use llmc_ir as ir;

use crate::error::Result;
use crate::manager::{Pass, PassStats};
use crate::registry::{PassContext, PassOption, PassOptions, RegisteredPass};

/// Sets the layout of every KV-cache state.
pub struct KvCache {
    pub layout: ir::KvLayout,
}

impl KvCache {
    /// `dtype` as `--kv-dtype` and the pass option spell it.
    pub fn layout_of(dtype: &str) -> std::result::Result<ir::KvLayout, String> {
        match dtype {
            "f32" => Ok(ir::KvLayout::Contiguous),
            "int8" => Ok(ir::KvLayout::Int8),
            _ => Err(format!("unknown KV-cache dtype `{dtype}`")),
        }
    }
}

impl RegisteredPass for KvCache {
    const NAME: &'static str = "kv-cache";
    const SUMMARY: &'static str = "store the KV cache as f32 rows or as int8 codes with a scale per token and KV head";
    const OPTIONS: &'static [PassOption] = &[PassOption {
        name: "dtype",
        values: "f32|int8",
        default: "required",
        summary: "element type of the cached keys and values",
    }];
    fn from_options(opts: &PassOptions<'_>, _: &PassContext) -> Result<Self> {
        match opts.parse("dtype", KvCache::layout_of)? {
            Some(layout) => Ok(KvCache { layout }),
            None => Err(opts.invalid("`dtype` is required (kv-cache{dtype=int8})".into())),
        }
    }
}

impl Pass for KvCache {
    fn name(&self) -> &'static str {
        Self::NAME
    }
    fn summary(&self) -> &'static str {
        Self::SUMMARY
    }
    fn run(&self, g: &mut ir::Graph) -> Result<PassStats> {
        let mut st = PassStats::default();
        let mut changed = 0;
        for s in &mut g.states {
            let ir::StateKind::Kv { layout } = &mut s.kind else { continue };
            if *layout != self.layout {
                *layout = self.layout;
                changed += 1;
            }
        }
        st.bump("states", changed);
        Ok(st)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::PassSpec;
    use crate::testutil::{embed, weights_for};
    use ir::{Dim, Op, StateKind};

    /// A step appending `x = embed(ids)` as rows of [2, 8] to a cache of 4 rows, and returning
    /// both `x` and what the cache reads back.
    fn graph() -> ir::Graph {
        let mut g = ir::Graph::new("t");
        let ty = ir::TensorType::f32(vec![Dim::N(4), Dim::N(2), Dim::N(8)]);
        g.states.push(ir::StateDecl::new("cache.0.k", ty, StateKind::CONTIGUOUS_KV));
        let (_, x) = embed(&mut g, 5, 16);
        let x = g.add(Op::Reshape, &[x], Some(ir::TensorType::f32(vec![Dim::S, Dim::N(2), Dim::N(8)]))).unwrap();
        let all = g.add(Op::KvConcat { state: "cache.0.k".into() }, &[x], None).unwrap();
        g.outputs.extend([x, all]);
        g
    }

    #[test]
    fn int8_cache_reads_back_each_vector_quantized_and_f32_restores_it() {
        let mut g = graph();
        let ctx = PassContext::default();
        let pass = KvCache::from_spec(&PassSpec::new("kv-cache").with("dtype", "int8"), &ctx).unwrap();
        let st = pass.run(&mut g).unwrap();
        assert_eq!(st.counters, vec![("states".to_string(), 1)]);
        assert_eq!(g.states[0].kind, StateKind::Kv { layout: ir::KvLayout::Int8 });
        assert!(ir::print(&g).contains("@cache.0.k : kv<int8> f32[4,2,8]"), "{}", ir::print(&g));
        ir::verify(&g).unwrap();
        // What the cache reads back, over two steps: each 8-vector as int8 codes times its scale.
        let w = weights_for(&[&g]);
        let mut it = ir::Interpreter::new(&w);
        let a = it.run(&g, &[3, 1]).unwrap();
        let b = it.run(&g, &[4]).unwrap();
        let mut xs = a[0].data.clone();
        xs.extend(&b[0].data);
        assert_eq!(b[1].data, ir::quant::fake_quant_act(&xs, 8));
        assert_ne!(b[1].data, xs, "int8 codes lose bits");
        for (x, y) in xs.chunks(8).zip(b[1].data.chunks(8)) {
            let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!(x.iter().zip(y).all(|(x, y)| (x - y).abs() <= amax * (0.5 / 127.0 + 1e-6)), "{x:?} {y:?}");
        }

        let back = KvCache::from_spec(&PassSpec::new("kv-cache").with("dtype", "f32"), &ctx).unwrap();
        back.run(&mut g).unwrap();
        assert_eq!(g.states[0].kind, StateKind::CONTIGUOUS_KV);
        let mut it = ir::Interpreter::new(&w);
        assert_eq!(it.run(&g, &[3, 1]).unwrap()[1].data, a[0].data, "f32 rows read back as written");
    }

    #[test]
    fn dtype_is_required_and_checked() {
        let ctx = PassContext::default();
        let e = KvCache::from_spec(&PassSpec::new("kv-cache"), &ctx).err().unwrap().to_string();
        assert!(e.contains("`dtype` is required"), "{e}");
        let e = KvCache::from_spec(&PassSpec::new("kv-cache").with("dtype", "int4"), &ctx).err().unwrap().to_string();
        assert!(e.contains("int4") && e.contains("f32|int8"), "{e}");
    }
}
