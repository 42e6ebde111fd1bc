//! The kernel builder: a thin layer over Cranelift's `FunctionBuilder` with what every CPU kernel
//! needs — the buffer table, symbolic dims as runtime values, the `part`/`nparts` work split,
//! counted loops, odometer iteration over collapsed shapes, and arithmetic that is generic over
//! `f32` (scalar tails) and `f32x4` (vector bodies).
//!
//! All sizes and offsets are `i64` element counts until [`Kb::addr`] turns them into byte
//! addresses. Loops are rotated (`brif` at the bottom) and carry state in frontend `Variable`s;
//! every block is sealed at the end by [`Kb::finish`].

use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::types::{F32, F32X4, I32, I32X4, I64};
use cranelift_codegen::ir::{AbiParam, InstBuilder, MemFlagsData, SigRef, Signature, Type, Value};
use cranelift_codegen::isa::{CallConv, TargetFrontendConfig};
use cranelift_frontend::{FunctionBuilder, Variable};
use llmc_ir::Dim;

/// The vector type of every vectorised loop (Cranelift's x64 backend has 128-bit vectors).
pub(crate) const V4: Type = F32X4;

/// A symbolic product of dims: a constant factor times a sorted list of symbolic dims (`T` is a
/// symbol of its own, not `S + P`). Equal monomials are equal for every binding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Mono {
    pub c: usize,
    pub syms: Vec<Dim>,
}

impl Mono {
    pub fn one() -> Mono {
        Mono { c: 1, syms: vec![] }
    }
    pub fn zero() -> Mono {
        Mono { c: 0, syms: vec![] }
    }
    pub fn of(d: Dim) -> Mono {
        match d {
            Dim::N(n) => Mono { c: n, syms: vec![] },
            s => Mono { c: 1, syms: vec![s] },
        }
    }
    pub fn prod(ds: &[Dim]) -> Mono {
        ds.iter().fold(Mono::one(), |m, &d| m.mul(&Mono::of(d)))
    }
    pub fn mul(&self, o: &Mono) -> Mono {
        if self.c == 0 || o.c == 0 {
            return Mono::zero();
        }
        let mut syms = self.syms.clone();
        syms.extend_from_slice(&o.syms);
        syms.sort();
        Mono { c: self.c * o.c, syms }
    }
}

/// Memory flags for tensor data: never traps, alignment unknown (vector accesses are unaligned).
fn data_flags() -> MemFlagsData {
    MemFlagsData::new().with_notrap()
}

/// Memory flags for data the kernel only reads and nothing writes while it runs.
fn ro_flags() -> MemFlagsData {
    MemFlagsData::new().with_notrap().with_readonly().with_can_move()
}

/// The integer type with the lane shape of `ty` (`f32` -> `i32`, `f32x4` -> `i32x4`).
pub(crate) fn int_ty(ty: Type) -> Type {
    if ty == V4 {
        I32X4
    } else {
        I32
    }
}

/// `body(offsets, indices)` of [`Kb::odometer`].
pub(crate) type OdometerBody<'c, 'a> = dyn FnMut(&mut Kb<'a>, &[Value], &[Value]) + 'c;
/// `body(offsets, outer_indices, len)` of [`Kb::rows`].
pub(crate) type RowBody<'c, 'a> = dyn FnMut(&mut Kb<'a>, &[Value], &[Value], Value) + 'c;

/// Builds one kernel `fn(bufs, s, p, part, nparts)`.
pub(crate) struct Kb<'a> {
    pub b: FunctionBuilder<'a>,
    /// The ISA has FMA: `fma` is one instruction (otherwise it is a multiply and an add).
    pub has_fma: bool,
    pub bufs: Value,
    pub s: Value,
    pub p: Value,
    pub part: Value,
    pub nparts: Value,
}

impl<'a> Kb<'a> {
    /// Seals every block and finalizes the function.
    pub fn finish(mut self, cfg: TargetFrontendConfig) {
        self.b.ins().return_(&[]);
        self.b.seal_all_blocks();
        self.b.finalize(cfg);
    }

    // ---- integers, dims, addresses ----

    /// The signature of a runtime microkernel called through the table: `params` i64 arguments
    /// (pointers and sizes), one i64 result when `returns`, System V.
    pub fn microkernel_sig(&mut self, params: usize, returns: bool) -> SigRef {
        let mut sig = Signature::new(CallConv::SystemV);
        sig.params.extend((0..params).map(|_| AbiParam::new(I64)));
        if returns {
            sig.returns.push(AbiParam::new(I64));
        }
        self.b.import_signature(sig)
    }
    pub fn ic(&mut self, v: i64) -> Value {
        self.b.ins().iconst(I64, v)
    }
    pub fn add(&mut self, a: Value, b: Value) -> Value {
        self.b.ins().iadd(a, b)
    }
    pub fn addi(&mut self, a: Value, b: i64) -> Value {
        self.b.ins().iadd_imm_s(a, b)
    }
    pub fn sub(&mut self, a: Value, b: Value) -> Value {
        self.b.ins().isub(a, b)
    }
    pub fn mul(&mut self, a: Value, b: Value) -> Value {
        self.b.ins().imul(a, b)
    }
    pub fn muli(&mut self, a: Value, b: i64) -> Value {
        self.b.ins().imul_imm_s(a, b)
    }
    pub fn min(&mut self, a: Value, b: Value) -> Value {
        self.b.ins().smin(a, b)
    }
    pub fn max(&mut self, a: Value, b: Value) -> Value {
        self.b.ins().smax(a, b)
    }
    pub fn lt(&mut self, a: Value, b: Value) -> Value {
        self.b.ins().icmp(IntCC::SignedLessThan, a, b)
    }
    /// `ceil(a / c)` for `a >= 0`.
    pub fn div_ceil(&mut self, a: Value, c: i64) -> Value {
        let t = self.addi(a, c - 1);
        let c = self.ic(c);
        self.b.ins().udiv(t, c)
    }

    /// `bufs[i]`: the address of operand `i` (then the output, then the tables).
    pub fn buf(&mut self, i: usize) -> Value {
        let f = MemFlagsData::trusted().with_readonly();
        self.b.ins().load(I64, f, self.bufs, (8 * i) as i32)
    }

    /// A dim's value in this step.
    pub fn dim(&mut self, d: Dim) -> Value {
        match d {
            Dim::N(n) => self.ic(n as i64),
            Dim::S => self.s,
            Dim::P => self.p,
            Dim::T => self.b.ins().iadd(self.s, self.p),
        }
    }
    pub fn mono(&mut self, m: &Mono) -> Value {
        let mut v = self.ic(m.c as i64);
        for &d in &m.syms {
            let x = self.dim(d);
            v = self.mul(v, x);
        }
        v
    }
    /// The product of `ds` (the element count of a shape).
    pub fn dims(&mut self, ds: &[Dim]) -> Value {
        self.mono(&Mono::prod(ds))
    }

    /// `ptr + 4 * idx`: the address of element `idx` of an f32/i32 tensor.
    pub fn addr(&mut self, ptr: Value, idx: Value) -> Value {
        let o = self.b.ins().ishl_imm_s(idx, 2);
        self.b.ins().iadd(ptr, o)
    }

    /// This call's share `[lo, hi)` of `w` work items: `[w*part/nparts, w*(part+1)/nparts)`.
    pub fn part_range(&mut self, w: Value) -> (Value, Value) {
        let lo = self.b.ins().imul(w, self.part);
        let lo = self.b.ins().udiv(lo, self.nparts);
        let p1 = self.b.ins().iadd_imm_s(self.part, 1);
        let hi = self.b.ins().imul(w, p1);
        let hi = self.b.ins().udiv(hi, self.nparts);
        (lo, hi)
    }

    // ---- variables and control flow ----

    pub fn var(&mut self, ty: Type, init: Value) -> Variable {
        let v = self.b.declare_var(ty);
        self.b.def_var(v, init);
        v
    }
    pub fn get(&mut self, v: Variable) -> Value {
        self.b.use_var(v)
    }
    pub fn set(&mut self, v: Variable, x: Value) {
        self.b.def_var(v, x)
    }

    /// Runs `body(i)` for `i = lo, lo+step, ...` while `i + step <= hi`; returns the first `i`
    /// not run (where a tail loop starts).
    pub fn for_steps(&mut self, lo: Value, hi: Value, step: i64, body: &mut dyn FnMut(&mut Self, Value)) -> Value {
        let body_blk = self.b.create_block();
        let exit = self.b.create_block();
        let i = self.b.append_block_param(body_blk, I64);
        let end = self.b.append_block_param(exit, I64);
        let first = self.b.ins().iadd_imm_s(lo, step);
        let c = self.b.ins().icmp(IntCC::SignedLessThanOrEqual, first, hi);
        self.b.ins().brif(c, body_blk, &[lo.into()], exit, &[lo.into()]);
        self.b.switch_to_block(body_blk);
        body(self, i);
        let n = self.b.ins().iadd_imm_s(i, step);
        let nn = self.b.ins().iadd_imm_s(n, step);
        let c = self.b.ins().icmp(IntCC::SignedLessThanOrEqual, nn, hi);
        self.b.ins().brif(c, body_blk, &[n.into()], exit, &[n.into()]);
        self.b.switch_to_block(exit);
        end
    }

    /// `if cond { then } else { els }`.
    pub fn if_else(&mut self, cond: Value, then: &mut dyn FnMut(&mut Self), els: &mut dyn FnMut(&mut Self)) {
        let t = self.b.create_block();
        let e = self.b.create_block();
        let j = self.b.create_block();
        self.b.ins().brif(cond, t, &[], e, &[]);
        self.b.switch_to_block(t);
        then(self);
        self.b.ins().jump(j, &[]);
        self.b.switch_to_block(e);
        els(self);
        self.b.ins().jump(j, &[]);
        self.b.switch_to_block(j);
    }

    /// Iterates the flat item indices `[lo, hi)` of the row-major index space `sizes`, keeping one
    /// running element offset per operand (`strides[j][d]` is operand `j`'s stride along dim `d`).
    /// `body(offsets, indices)` runs once per item. Only the start index is decomposed with
    /// divisions; after that the indices advance like an odometer.
    pub fn odometer(
        &mut self,
        lo: Value,
        hi: Value,
        sizes: &[Value],
        strides: &[Vec<Value>],
        body: &mut OdometerBody<'_, 'a>,
    ) {
        let nd = sizes.len();
        let init = self.b.create_block();
        let exit = self.b.create_block();
        let c = self.lt(lo, hi);
        self.b.ins().brif(c, init, &[], exit, &[]);
        self.b.switch_to_block(init);
        let mut idx = vec![lo; nd];
        let mut rem = lo;
        for d in (0..nd).rev() {
            if d == 0 {
                idx[d] = rem;
            } else {
                idx[d] = self.b.ins().urem(rem, sizes[d]);
                rem = self.b.ins().udiv(rem, sizes[d]);
            }
        }
        let zero = self.ic(0);
        let mut offs = Vec::with_capacity(strides.len());
        let mut wraps = Vec::with_capacity(strides.len());
        for st in strides {
            let mut o = zero;
            let mut w = Vec::with_capacity(nd);
            for d in 0..nd {
                let t = self.mul(idx[d], st[d]);
                o = self.add(o, t);
                w.push(self.mul(st[d], sizes[d]));
            }
            offs.push(o);
            wraps.push(w);
        }
        let vi = self.var(I64, lo);
        let vidx: Vec<Variable> = idx.iter().map(|&x| self.var(I64, x)).collect();
        let voffs: Vec<Variable> = offs.iter().map(|&x| self.var(I64, x)).collect();
        let body_blk = self.b.create_block();
        self.b.ins().jump(body_blk, &[]);
        self.b.switch_to_block(body_blk);
        let cur_offs: Vec<Value> = voffs.iter().map(|&v| self.get(v)).collect();
        let cur_idx: Vec<Value> = vidx.iter().map(|&v| self.get(v)).collect();
        body(self, &cur_offs, &cur_idx);
        let i = self.get(vi);
        let i1 = self.addi(i, 1);
        self.set(vi, i1);
        let c = self.lt(i1, hi);
        if nd == 0 {
            self.b.ins().brif(c, body_blk, &[], exit, &[]);
        } else {
            let carry: Vec<_> = (0..nd).map(|_| self.b.create_block()).collect();
            self.b.ins().brif(c, carry[nd - 1], &[], exit, &[]);
            for d in (0..nd).rev() {
                self.b.switch_to_block(carry[d]);
                let x = self.get(vidx[d]);
                let x1 = self.addi(x, 1);
                self.set(vidx[d], x1);
                for (j, &vo) in voffs.iter().enumerate() {
                    let o = self.get(vo);
                    let o = self.add(o, strides[j][d]);
                    self.set(vo, o);
                }
                if d == 0 {
                    self.b.ins().jump(body_blk, &[]);
                } else {
                    let reset = self.b.create_block();
                    let c = self.lt(x1, sizes[d]);
                    self.b.ins().brif(c, body_blk, &[], reset, &[]);
                    self.b.switch_to_block(reset);
                    let z = self.ic(0);
                    self.set(vidx[d], z);
                    for (j, &vo) in voffs.iter().enumerate() {
                        let o = self.get(vo);
                        let o = self.sub(o, wraps[j][d]);
                        self.set(vo, o);
                    }
                    self.b.ins().jump(carry[d - 1], &[]);
                }
            }
        }
        self.b.switch_to_block(exit);
    }

    /// The common work split: `outer` rows (operand `j` advances `strides[j][d]` along outer dim
    /// `d`), each row `inner` elements long (operand `j` advancing `inner_strides[j]` per element).
    /// With `chunk`, rows are further cut into pieces of at most `chunk` elements so that even a
    /// single row splits across parts. This call runs `body(offsets, outer_indices, len)` for its
    /// share of the items.
    pub fn rows(
        &mut self,
        outer: &[Value],
        strides: &[Vec<Value>],
        inner: Value,
        inner_strides: &[Value],
        chunk: Option<i64>,
        body: &mut RowBody<'_, 'a>,
    ) {
        let mut sizes = outer.to_vec();
        let mut st = strides.to_vec();
        let nouter = outer.len();
        if let Some(ch) = chunk {
            let nch = self.div_ceil(inner, ch);
            sizes.push(nch);
            for (j, s) in st.iter_mut().enumerate() {
                let cs = self.muli(inner_strides[j], ch);
                s.push(cs);
            }
        }
        let mut total = self.ic(1);
        for &s in &sizes {
            total = self.mul(total, s);
        }
        let (lo, hi) = self.part_range(total);
        self.odometer(lo, hi, &sizes, &st, &mut |kb, offs, idx| {
            let len = match chunk {
                Some(ch) => {
                    let start = kb.muli(idx[nouter], ch);
                    let left = kb.sub(inner, start);
                    let chv = kb.ic(ch);
                    kb.min(left, chv)
                }
                None => inner,
            };
            body(kb, offs, &idx[..nouter], len)
        });
    }

    /// Runs `body(ty, i, slot)` over `i in 0..len`: `f32x4` steps (the main loop unrolled `unroll`
    /// times, `slot` numbering the copies), then single `f32x4` steps (slot 0), then an `f32` tail
    /// (slot 0).
    pub fn vloop(&mut self, len: Value, unroll: usize, body: &mut dyn FnMut(&mut Self, Type, Value, usize)) {
        let zero = self.ic(0);
        let mut e = zero;
        if unroll > 1 {
            e = self.for_steps(zero, len, 4 * unroll as i64, &mut |kb, i| {
                for u in 0..unroll {
                    let iu = kb.addi(i, 4 * u as i64);
                    body(kb, V4, iu, u);
                }
            });
        }
        let e = self.for_steps(e, len, 4, &mut |kb, i| body(kb, V4, i, 0));
        self.for_steps(e, len, 1, &mut |kb, i| body(kb, F32, i, 0));
    }

    // ---- f32 / f32x4 arithmetic ----

    /// The f32 value of the IEEE half in the low 16 bits of the `i32` `w`, exactly: the magnitude's
    /// bits moved into an f32 (exponent rebased by a multiply by 2^112, which also scales a
    /// subnormal half exactly), infinities and NaNs by their bits, then the sign.
    pub fn f16_to_f32(&mut self, w: Value) -> Value {
        let mag = self.b.ins().band_imm_s(w, 0x7fff);
        let sign = self.b.ins().band_imm_s(w, 0x8000);
        let sign = self.b.ins().ishl_imm_s(sign, 16);
        let shifted = self.b.ins().ishl_imm_s(mag, 13);
        let f = self.b.ins().bitcast(F32, MemFlagsData::new(), shifted);
        let scale = self.b.ins().f32const(f32::from_bits(0x7780_0000)); // 2^112
        let finite = self.b.ins().fmul(f, scale);
        let finite = self.b.ins().bitcast(I32, MemFlagsData::new(), finite);
        let special = self.b.ins().bor_imm_s(shifted, 0x7f80_0000);
        let is_special = self.b.ins().icmp_imm_u(IntCC::UnsignedGreaterThanOrEqual, mag, 0x7c00);
        let bits = self.b.ins().select(is_special, special, finite);
        let bits = self.b.ins().bor(bits, sign);
        self.b.ins().bitcast(F32, MemFlagsData::new(), bits)
    }

    /// The IEEE half at element `idx` (an `i64`) of `ptr`, widened exactly to f32 (int4 group
    /// scales and zero points).
    pub fn ld_f16(&mut self, ptr: Value, idx: Value) -> Value {
        let o = self.b.ins().ishl_imm_s(idx, 1);
        let a = self.b.ins().iadd(ptr, o);
        let w = self.b.ins().uload16(I32, MemFlagsData::new().with_notrap(), a, 0);
        self.f16_to_f32(w)
    }

    pub fn ld(&mut self, ty: Type, ptr: Value, idx: Value) -> Value {
        let a = self.addr(ptr, idx);
        self.b.ins().load(ty, data_flags(), a, 0)
    }
    pub fn st(&mut self, x: Value, ptr: Value, idx: Value) {
        let a = self.addr(ptr, idx);
        self.b.ins().store(data_flags(), x, a, 0);
    }
    /// Load from memory this kernel never writes (matmul operands): the load is pure for
    /// Cranelift, so it can be hoisted, deduplicated and folded (`vbroadcastss` from memory).
    pub fn ld_ro(&mut self, ty: Type, ptr: Value, idx: Value) -> Value {
        let a = self.addr(ptr, idx);
        self.b.ins().load(ty, ro_flags(), a, 0)
    }
    /// Load at a byte offset from `ptr`.
    pub fn ld_at(&mut self, ty: Type, ptr: Value, off: i32) -> Value {
        self.b.ins().load(ty, data_flags(), ptr, off)
    }
    pub fn st_at(&mut self, x: Value, ptr: Value, off: i32) {
        self.b.ins().store(data_flags(), x, ptr, off);
    }

    /// `x` broadcast to `ty` (no-op for scalars).
    pub fn splat(&mut self, ty: Type, x: Value) -> Value {
        if ty == V4 {
            self.b.ins().splat(V4, x)
        } else {
            x
        }
    }
    /// The constant `x` as `ty`.
    pub fn fc(&mut self, ty: Type, x: f32) -> Value {
        let c = self.b.ins().f32const(x);
        self.splat(ty, c)
    }
    /// The integer constant `x` with the lane shape of float type `ty`.
    pub fn ic32(&mut self, ty: Type, x: i32) -> Value {
        let c = self.b.ins().iconst(I32, x as i64);
        if ty == V4 {
            self.b.ins().splat(I32X4, c)
        } else {
            c
        }
    }
    pub fn fadd(&mut self, a: Value, b: Value) -> Value {
        self.b.ins().fadd(a, b)
    }
    pub fn fsub(&mut self, a: Value, b: Value) -> Value {
        self.b.ins().fsub(a, b)
    }
    pub fn fmul(&mut self, a: Value, b: Value) -> Value {
        self.b.ins().fmul(a, b)
    }
    pub fn fdiv(&mut self, a: Value, b: Value) -> Value {
        self.b.ins().fdiv(a, b)
    }
    /// `a * b + c`, fused where the ISA has FMA.
    pub fn fma(&mut self, a: Value, b: Value, c: Value) -> Value {
        if self.has_fma {
            self.b.ins().fma(a, b, c)
        } else {
            let m = self.b.ins().fmul(a, b);
            self.b.ins().fadd(m, c)
        }
    }
    /// Lane-wise `(x cc y) ? a : b`.
    pub fn fsel(&mut self, ty: Type, cc: FloatCC, x: Value, y: Value, a: Value, b: Value) -> Value {
        let c = self.b.ins().fcmp(cc, x, y);
        if ty == V4 {
            let m = self.b.ins().bitcast(V4, MemFlagsData::new(), c);
            self.b.ins().bitselect(m, a, b)
        } else {
            self.b.ins().select(c, a, b)
        }
    }
    /// `max(a, b)` as x86 `maxps`/`maxss` (returns `b` if either is NaN).
    pub fn fmax(&mut self, ty: Type, a: Value, b: Value) -> Value {
        self.fsel(ty, FloatCC::LessThan, b, a, a, b)
    }
    /// Reinterprets float lanes as i32 lanes.
    pub fn as_int(&mut self, ty: Type, x: Value) -> Value {
        self.b.ins().bitcast(int_ty(ty), MemFlagsData::new(), x)
    }
    /// Reinterprets i32 lanes as float lanes.
    pub fn as_float(&mut self, ty: Type, x: Value) -> Value {
        self.b.ins().bitcast(ty, MemFlagsData::new(), x)
    }
    /// `|mag|` with the sign of `sgn` (bitwise; `fcopysign` has no f32x4 lowering on x64).
    pub fn copysign(&mut self, ty: Type, mag: Value, sgn: Value) -> Value {
        let mb = self.as_int(ty, mag);
        let sb = self.as_int(ty, sgn);
        let abs_mask = self.ic32(ty, 0x7FFF_FFFF);
        let sign_mask = self.ic32(ty, i32::MIN);
        let m = self.b.ins().band(mb, abs_mask);
        let s = self.b.ins().band(sb, sign_mask);
        let r = self.b.ins().bor(m, s);
        self.as_float(ty, r)
    }
    /// Sum of the four lanes.
    pub fn hsum(&mut self, v: Value) -> Value {
        let l: Vec<Value> = (0..4u8).map(|i| self.b.ins().extractlane(v, i)).collect();
        let a = self.fadd(l[0], l[1]);
        let b = self.fadd(l[2], l[3]);
        self.fadd(a, b)
    }

    /// A sum over `0..len` f32s with two vector accumulators and a scalar tail, lanes added at the
    /// end: `step(kb, ty, i, acc)` returns `acc` updated with the element(s) at `i` (`ty` is `V4`
    /// or `F32`).
    pub fn vsum(&mut self, len: Value, step: &mut dyn FnMut(&mut Kb, Type, Value, Value) -> Value) -> Value {
        let zv = self.fc(V4, 0.0);
        let zs = self.fc(F32, 0.0);
        let acc = [self.var(V4, zv), self.var(V4, zv)];
        let accs = self.var(F32, zs);
        self.vloop(len, 2, &mut |kb, ty, i, u| {
            let a = if ty == V4 { acc[u] } else { accs };
            let s = kb.get(a);
            let s = step(kb, ty, i, s);
            kb.set(a, s);
        });
        let a = self.get(acc[0]);
        let b = self.get(acc[1]);
        let t = self.fadd(a, b);
        let t = self.hsum(t);
        let s = self.get(accs);
        self.fadd(t, s)
    }

    /// `sum_i ro[i] * any[i]` over `0..len` f32s: `ro` is read-only for the kernel's whole run
    /// (weights), `any` may be written elsewhere.
    pub fn dot(&mut self, ro: Value, any: Value, len: Value) -> Value {
        self.vsum(len, &mut |kb, ty, i, s| {
            let rv = kb.ld_ro(ty, ro, i);
            let av = kb.ld(ty, any, i);
            kb.fma(rv, av, s)
        })
    }
    /// Max of the four lanes.
    pub fn hmax(&mut self, v: Value) -> Value {
        let l: Vec<Value> = (0..4u8).map(|i| self.b.ins().extractlane(v, i)).collect();
        let a = self.fmax(F32, l[0], l[1]);
        let b = self.fmax(F32, l[2], l[3]);
        self.fmax(F32, a, b)
    }
    /// `i64 -> f32`.
    pub fn int_to_f32(&mut self, x: Value) -> Value {
        self.b.ins().fcvt_from_sint(F32, x)
    }
}
