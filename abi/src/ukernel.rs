//! The microkernel table: the contract between generated CPU kernels and the runtime.
//!
//! Cranelift's x86-64 backend has 128-bit vectors only, so the compute-bound part of a product
//! with a compile-time weight runs in the runtime. Generated code reaches it through a table of
//! function addresses passed as a buffer (`BufferDecl::Microkernels { abi }`), so kernels stay
//! relocation-free and the runtime picks the implementation (AVX-512, AVX2+FMA, portable) per
//! process. This module is the table's one definition: the slot indices ([`GEMM_PANELS`], ...),
//! each slot's name and signature ([`TABLE`], the function types [`GemmPanelsFn`], [`QGemvFn`],
//! [`QGemmFn`], [`AttnBlockFn`], [`QGemmA8Fn`], [`AttnBlockI8Fn`]), the layout version [`ABI_VERSION`] that artifacts record and the loader checks,
//! and [`Table`], the typed set of functions the runtime fills it from. Codegen reads slot indices
//! and call signatures from here; the implementations live in the runtime.
//!
//! Changing the table (a slot added, moved or renamed, a signature changed, a slot made optional)
//! changes [`fingerprint`]; the test `table_changes_come_with_a_version_bump` then fails until
//! [`ABI_VERSION`] is bumped and the new `(version, fingerprint)` appended to [`HISTORY`].

/// Version of the table's layout and entry signatures; an artifact names the version it was
/// compiled for (`BufferDecl::Microkernels { abi }`), and loading fails on a mismatch.
///
/// History: 1, the panel GEMM alone; 2, the quantized GEMVs added (3 slots); 3, the tiled
/// quantized product [`QGEMM`] (4 slots; it was added under version 2 at first, so a version-2
/// runtime with 3 slots would have accepted artifacts that call slot 3); 4, the panel GEMMs over
/// bf16 and f16 panels ([`GEMM_PANELS_BF16`], [`GEMM_PANELS_F16`]; 6 slots); 5, the attention
/// block [`ATTN_BLOCK`] (7 slots); 6, the multi-row A8 product [`QGEMM_A8`] (8 slots), and W4A8
/// activations in step order ([`crate::qformat`]) for both A8 kernels; 7, the attention block over
/// an int8 KV cache [`ATTN_BLOCK_I8`] (9 slots); 8, the A8 product of f32 rows
/// [`QGEMM_A8_ROWS`] (10 slots).
pub const ABI_VERSION: u32 = 8;

/// Every released table layout, oldest first: `(ABI_VERSION, fingerprint)`. The last entry is the
/// current table. (Version 1 predates the fingerprint.)
pub const HISTORY: &[(u32, u64)] = &[
    (2, 0x1b85_aa45_4446_a995), // gemm_panels, qgemv, qgemv_a8
    (3, 0x9e79_8df7_6910_185f), // + qgemm
    (4, 0x45ed_6d87_66c3_cdc8), // + gemm_panels_bf16, gemm_panels_f16
    (5, 0xa33c_80ac_e589_6c39), // + attn_block
    (6, 0x712a_1588_f0b6_1e5a), // + qgemm_a8; W4A8 activations in step order
    (7, 0xa53c_c2d6_e403_717f), // + attn_block_i8
    (8, 0x40e1_0914_03ee_11fc), // + qgemm_a8_rows
];

/// A microkernel's signature as text (its Rust tokens), with its parameter count and whether it
/// returns a value. Every parameter and the result are 64-bit (`i64` or a pointer), System V.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Signature {
    pub text: &'static str,
    pub params: usize,
    pub returns: bool,
}

/// One slot of the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot {
    /// Position in the table (bytes `8 * index ..` of the table buffer).
    pub index: usize,
    pub name: &'static str,
    pub signature: Signature,
    /// The slot may hold 0 (no implementation on this CPU): generated code must test it and
    /// run the product itself.
    pub optional: bool,
}

/// Defines a microkernel function type and its [`Signature`] from the same tokens.
macro_rules! microkernel_fn {
    ($(#[$doc:meta])* $ty:ident, $sig:ident = fn($($p:ident: $pt:ty),* $(,)?) $(-> $r:ty)?) => {
        $(#[$doc])*
        pub type $ty = unsafe extern "sysv64" fn($($p: $pt),*) $(-> $r)?;
        #[doc = concat!("The [`Signature`] of [`", stringify!($ty), "`].")]
        pub const $sig: Signature = Signature {
            text: stringify!(fn($($p: $pt),*) $(-> $r)?),
            params: [$(stringify!($p)),*].len(),
            returns: microkernel_fn!(@returns $($r)?),
        };
    };
    (@returns) => { false };
    (@returns $r:ty) => { true };
}

microkernel_fn! {
    /// `t = gemm_panels(a, lda, bp, k, m, c0, ncols, up)`: the product of rows `0..m` of `a`
    /// (`f32`, row stride `lda` elements, `k` columns) with columns `c0 .. c0 + ncols` of a panel
    /// weight ([`crate::panel`]) whose group starts at `bp` (`c0` a multiple of
    /// [`crate::panel::PANEL`]). Returns a per-thread scratch tile `t[m][ldt]`, `ldt = ncols`
    /// rounded up to `PANEL`, holding `a . w^T`; when `up` is not null (the second group's
    /// start) the same product with the `up` group follows at `t + m * ldt`. The tile stays valid
    /// until this thread's next call.
    GemmPanelsFn, GEMM_PANELS_SIG = fn(
        a: *const f32,
        lda: i64,
        bp: *const f32,
        k: i64,
        m: i64,
        c0: i64,
        ncols: i64,
        up: *const f32,
    ) -> *mut f32
}

microkernel_fn! {
    /// `t = gemm_panels_bf16(a, lda, bp, k, m, c0, ncols, up)` (and `gemm_panels_f16`): as
    /// [`GemmPanelsFn`] over a panel weight stored as 16-bit values (bf16 or IEEE f16, the panel
    /// layout of [`crate::panel`] with 2-byte elements). Each weight widens exactly to f32 and
    /// the products accumulate in f32 as in [`GemmPanelsFn`], so the tile equals the f32 panel
    /// GEMM's over the widened weights up to f32 rounding order (bit for bit in the AVX-512, AVX2
    /// and portable implementations; AMX tiles, used for 16 rows or more where the CPU has them,
    /// sum exact products in another order).
    GemmPanels16Fn, GEMM_PANELS16_SIG = fn(
        a: *const f32,
        lda: i64,
        bp: *const u16,
        k: i64,
        m: i64,
        c0: i64,
        ncols: i64,
        up: *const u16,
    ) -> *mut f32
}

microkernel_fn! {
    /// `qgemv(fmt, x, aux, b, rb, k, rows, out)`: for `j < rows`, `out[j]` is the product of the
    /// activation row `x` with the packed row at `b + j * rb` (format
    /// [`QFormat::from_arg`](crate::QFormat::from_arg)`(fmt)`, `k` elements):
    /// - weight-only formats: `x` is `k` f32s; `out[j] = Σ_e w_j[e] · x[e]` with the dequantized
    ///   weights (up to f32 rounding order);
    /// - W8A8: `x` is a quantized activation row ([`crate::qformat`]: the codes stored as
    ///   `q + 128`); `out[j] = (Σ_e w_j[e] · q[e]) · scale_j` (the integer sum is exact), without
    ///   the activation scale;
    /// - W4A8: `x` is a quantized activation row (signed codes in step order) and `aux` its block
    ///   terms (`-8 · Σ` of block `b`'s codes at word `QFormat::aux_at(k, b)`); `out[j] = Σ_b scale(b) · (Σ_{e in b} c_e · q_e + aux_b)`
    ///   over the stored nibbles `c`, without the activation scale.
    QGemvFn, QGEMV_SIG = fn(
        fmt: i64,
        x: *const u8,
        aux: *const i32,
        b: *const u8,
        rb: i64,
        k: i64,
        rows: i64,
        out: *mut f32,
    )
}

microkernel_fn! {
    /// `t = qgemm(fmt, a, lda, m, b, rb, k, rows, up)`: the products of rows `0..m` of `a` (f32,
    /// row stride `lda`) with the `rows <= 64` weight-only packed rows at `b` (`rb` bytes apart),
    /// and when `up` is not null with as many rows at `up`: the rows are dequantized (exactly as
    /// the interpreter rounds them) into the panel layout and multiplied by the panel GEMM
    /// ([`GEMM_PANELS`]). Returns that GEMM's tile (see [`GemmPanelsFn`]: row stride `rows`
    /// rounded up to 16, the `up` tile `m` rows on), valid until this thread's next call.
    QGemmFn, QGEMM_SIG = fn(
        fmt: i64,
        a: *const f32,
        lda: i64,
        m: i64,
        b: *const u8,
        rb: i64,
        k: i64,
        rows: i64,
        up: *const u8,
    ) -> *mut f32
}

microkernel_fn! {
    /// `qgemm_a8(fmt, x, aux, m, b, rb, k, rows, out)`: [`QGemvFn`]'s W8A8 / W4A8 product for `m`
    /// activation rows at once, each packed row read once for all of them: row `r`'s codes at
    /// `x + r * fmt.act_bytes(k)`, its `aux` at word `r * fmt.aux_words(k)` (see
    /// [`crate::qformat`]); `out[r * rows + j]` is [`QGemvFn`]'s `out[j]` for row `r` (up to f32
    /// rounding order).
    QGemmA8Fn, QGEMM_A8_SIG = fn(
        fmt: i64,
        x: *const u8,
        aux: *const i32,
        m: i64,
        b: *const u8,
        rb: i64,
        k: i64,
        rows: i64,
        out: *mut f32,
    )
}

microkernel_fn! {
    /// `attn_block(q, k, v, kstride, n, dims, scale, state)`: online-softmax attention of `gh`
    /// query heads over `n` keys, continuing a running state. `q` holds the heads' queries (`gh`
    /// rows of `d` f32s, adjacent); key `j` is `d` f32s at `k + j * kstride` and its value at
    /// `v + j * kstride` (`kstride` in elements); `dims = d | gh << 32`; `scale` is the f32
    /// score scale's bits. `state` is `gh` rows of `d + 2` f32s: the unnormalized accumulator
    /// `acc[0..d]`, the running max `m` and the running sum `l` (start: 0, -inf, 0). For each
    /// head, with scores `s_j = scale * q . k_j`: `m' = max(m, max_j s_j)`,
    /// `l' = l e^{m - m'} + sum_j e^{s_j - m'}`, `acc' = acc e^{m - m'} + sum_j e^{s_j - m'} v_j`
    /// (`e^{m - m'}` is 0 when `m` is -inf). Nothing changes when `n = 0`.
    AttnBlockFn, ATTN_BLOCK_SIG = fn(
        q: *const f32,
        k: *const f32,
        v: *const f32,
        kstride: i64,
        n: i64,
        dims: i64,
        scale: i64,
        state: *mut f32,
    )
}

microkernel_fn! {
    /// `attn_block_i8(q, k, v, kstride, kscale, vscale, sstride, n, dims, scale, state)`:
    /// [`AttnBlockFn`] over keys and values stored as int8 codes (the `kv<int8>` KV-cache layout):
    /// key `j` is the `d` codes at `k + j * kstride` (`kstride` in bytes) times the f32 at
    /// `kscale + j * sstride` (`sstride` in f32s), its value likewise from `v` and `vscale`. The
    /// result is [`AttnBlockFn`]'s on the keys and values the codes stand for (`code as f32 *
    /// scale`, as the reference interpreter holds them).
    AttnBlockI8Fn, ATTN_BLOCK_I8_SIG = fn(
        q: *const f32,
        k: *const i8,
        v: *const i8,
        kstride: i64,
        kscale: *const f32,
        vscale: *const f32,
        sstride: i64,
        n: i64,
        dims: i64,
        scale: i64,
        state: *mut f32,
    )
}

/// Slot of the panel GEMM, a [`GemmPanelsFn`].
pub const GEMM_PANELS: usize = 0;
/// Slot of the weight-only quantized GEMV, a [`QGemvFn`]; 0 when this CPU has no
/// implementation (generated code then runs the product itself).
pub const QGEMV: usize = 1;
/// Slot of the W8A8 / W4A8 GEMV, a [`QGemvFn`]; 0 as [`QGEMV`].
pub const QGEMV_A8: usize = 2;
/// Slot of the weight-only quantized tiled product, a [`QGemmFn`].
pub const QGEMM: usize = 3;
/// Slot of the panel GEMM over bf16 panels, a [`GemmPanels16Fn`].
pub const GEMM_PANELS_BF16: usize = 4;
/// Slot of the panel GEMM over f16 panels, a [`GemmPanels16Fn`].
pub const GEMM_PANELS_F16: usize = 5;
/// Slot of the attention block, an [`AttnBlockFn`].
pub const ATTN_BLOCK: usize = 6;
/// Slot of the multi-row W8A8 / W4A8 product, a [`QGemmA8Fn`]; 0 as [`QGEMV`].
pub const QGEMM_A8: usize = 7;
/// Slot of the attention block over an int8 KV cache, an [`AttnBlockI8Fn`].
pub const ATTN_BLOCK_I8: usize = 8;
/// Slot of the W8A8 / W4A8 product of f32 activation rows, a [`QGemmFn`]; 0 where the runtime
/// has no such kernel (it is filled where the CPU has AMX). `t = qgemm_a8_rows(fmt, a, lda, m,
/// b, rb, k, rows, up)` for a W8A8 or W4A8 `fmt` is [`QGemmFn`]'s call with any `rows`, except
/// that each row `r` of `a` is first quantized as the A8 products quantize activations
/// (`ir::quant::quantize_act`: `amax = max |x|`, codes `q = nearest_even(x · (127 / amax))`, all
/// 0 when `amax` is not positive, scale `sa = amax / 127`) and the tile holds `p · sa`, `p`
/// being [`QGemvFn`]'s product of those codes with packed row `j` (up to f32 rounding order):
/// the activation scale is applied.
pub const QGEMM_A8_ROWS: usize = 9;
/// Entries in the table.
pub const SLOTS: usize = 10;

/// Every slot, in table order.
pub const TABLE: [Slot; SLOTS] = [
    Slot { index: GEMM_PANELS, name: "gemm_panels", signature: GEMM_PANELS_SIG, optional: false },
    Slot { index: QGEMV, name: "qgemv", signature: QGEMV_SIG, optional: true },
    Slot { index: QGEMV_A8, name: "qgemv_a8", signature: QGEMV_SIG, optional: true },
    Slot { index: QGEMM, name: "qgemm", signature: QGEMM_SIG, optional: false },
    Slot { index: GEMM_PANELS_BF16, name: "gemm_panels_bf16", signature: GEMM_PANELS16_SIG, optional: false },
    Slot { index: GEMM_PANELS_F16, name: "gemm_panels_f16", signature: GEMM_PANELS16_SIG, optional: false },
    Slot { index: ATTN_BLOCK, name: "attn_block", signature: ATTN_BLOCK_SIG, optional: false },
    Slot { index: QGEMM_A8, name: "qgemm_a8", signature: QGEMM_A8_SIG, optional: true },
    Slot { index: ATTN_BLOCK_I8, name: "attn_block_i8", signature: ATTN_BLOCK_I8_SIG, optional: false },
    Slot { index: QGEMM_A8_ROWS, name: "qgemm_a8_rows", signature: QGEMM_SIG, optional: true },
];

/// The functions a runtime provides, one field per slot, typed by the slot's signature
/// (`Option` for the optional slots); [`Table::addresses`] lays them out as the table buffer.
#[derive(Clone, Copy, Debug)]
pub struct Table {
    pub gemm_panels: GemmPanelsFn,
    pub qgemv: Option<QGemvFn>,
    pub qgemv_a8: Option<QGemvFn>,
    pub qgemm: QGemmFn,
    pub gemm_panels_bf16: GemmPanels16Fn,
    pub gemm_panels_f16: GemmPanels16Fn,
    pub attn_block: AttnBlockFn,
    pub qgemm_a8: Option<QGemmA8Fn>,
    pub attn_block_i8: AttnBlockI8Fn,
    pub qgemm_a8_rows: Option<QGemmFn>,
}

impl Table {
    /// The table buffer generated code reads: each function's address at its slot, 0 for an
    /// absent optional one.
    pub fn addresses(&self) -> [usize; SLOTS] {
        let mut t = [0usize; SLOTS];
        t[GEMM_PANELS] = self.gemm_panels as usize;
        t[QGEMV] = self.qgemv.map_or(0, |f| f as usize);
        t[QGEMV_A8] = self.qgemv_a8.map_or(0, |f| f as usize);
        t[QGEMM] = self.qgemm as usize;
        t[GEMM_PANELS_BF16] = self.gemm_panels_bf16 as usize;
        t[GEMM_PANELS_F16] = self.gemm_panels_f16 as usize;
        t[ATTN_BLOCK] = self.attn_block as usize;
        t[QGEMM_A8] = self.qgemm_a8.map_or(0, |f| f as usize);
        t[ATTN_BLOCK_I8] = self.attn_block_i8 as usize;
        t[QGEMM_A8_ROWS] = self.qgemm_a8_rows.map_or(0, |f| f as usize);
        t
    }
}

/// FNV-1a of `bytes` continuing from `h`, skipping ASCII whitespace when `skip_ws`.
const fn fnv1a(mut h: u64, bytes: &[u8], skip_ws: bool) -> u64 {
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        i += 1;
        if skip_ws && b.is_ascii_whitespace() {
            continue;
        }
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// A hash of every slot's index, name, signature text (whitespace ignored, so only the tokens
/// count) and optionality, in order.
pub const fn fingerprint_of(slots: &[Slot]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < slots.len() {
        let s = &slots[i];
        h = fnv1a(h, &(s.index as u64).to_le_bytes(), false);
        h = fnv1a(h, s.name.as_bytes(), false);
        h = fnv1a(h, &[0], false);
        h = fnv1a(h, s.signature.text.as_bytes(), true);
        h = fnv1a(h, &[0, s.optional as u8], false);
        i += 1;
    }
    h
}

/// The fingerprint of the current [`TABLE`].
pub const fn fingerprint() -> u64 {
    fingerprint_of(&TABLE)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ABI-version test: the current table's fingerprint is the one recorded for the current
    /// version, so no slot changes without a version change.
    #[test]
    fn table_changes_come_with_a_version_bump() {
        let recorded = HISTORY.last().copied();
        assert_eq!(
            recorded,
            Some((ABI_VERSION, fingerprint())),
            "the microkernel table changed: bump ABI_VERSION and record the new fingerprint \
             (append ({}, {:#018x}) to HISTORY)",
            ABI_VERSION + 1,
            fingerprint()
        );
        for w in HISTORY.windows(2) {
            assert!(w[0].0 < w[1].0, "HISTORY versions must increase: {:?}", HISTORY);
        }
        for (i, a) in HISTORY.iter().enumerate() {
            for b in &HISTORY[i + 1..] {
                assert_ne!(a.1, b.1, "versions {} and {} record the same table", a.0, b.0);
            }
        }
    }

    #[test]
    fn slots_are_numbered_in_order_with_distinct_names() {
        for (i, s) in TABLE.iter().enumerate() {
            assert_eq!(s.index, i, "slot `{}`", s.name);
            assert!(TABLE[..i].iter().all(|t| t.name != s.name), "slot name `{}` twice", s.name);
        }
        assert_eq!((GEMM_PANELS_SIG.params, GEMM_PANELS_SIG.returns), (8, true));
        assert_eq!((QGEMV_SIG.params, QGEMV_SIG.returns), (8, false));
        assert_eq!((QGEMM_SIG.params, QGEMM_SIG.returns), (9, true));
        assert_eq!((GEMM_PANELS16_SIG.params, GEMM_PANELS16_SIG.returns), (8, true));
        assert_eq!((QGEMM_A8_SIG.params, QGEMM_A8_SIG.returns), (9, false));
        assert_eq!((ATTN_BLOCK_I8_SIG.params, ATTN_BLOCK_I8_SIG.returns), (11, false));
    }

    /// The fingerprint sees every part of a slot, and not the text's spacing.
    #[test]
    fn fingerprint_covers_index_name_signature_and_optionality() {
        let base = fingerprint_of(&TABLE);
        let mut swapped = TABLE;
        swapped.swap(1, 2);
        let mut renamed = TABLE;
        renamed[3].name = "qgemm2";
        let mut resigned = TABLE;
        resigned[1].signature = QGEMM_SIG;
        let mut optional = TABLE;
        optional[0].optional = true;
        for (what, t) in [
            ("swapped", &swapped[..]),
            ("renamed", &renamed[..]),
            ("signature", &resigned[..]),
            ("optional", &optional[..]),
            ("shorter", &TABLE[..3]),
        ] {
            assert_ne!(fingerprint_of(t), base, "{what}");
        }
        let mut spaced = TABLE;
        spaced[0].signature.text = "fn (a : * const f32, lda: i64, bp: *const f32, k: i64, m: i64, c0: i64, \
                                    ncols: i64, up: *const f32) -> * mut f32";
        assert_eq!(fingerprint_of(&spaced), base, "{}", GEMM_PANELS_SIG.text);
    }

    unsafe extern "sysv64" fn gemm(
        _: *const f32,
        _: i64,
        _: *const f32,
        _: i64,
        _: i64,
        _: i64,
        _: i64,
        _: *const f32,
    ) -> *mut f32 {
        std::ptr::null_mut()
    }
    unsafe extern "sysv64" fn gemm16(
        _: *const f32,
        _: i64,
        _: *const u16,
        _: i64,
        _: i64,
        _: i64,
        _: i64,
        _: *const u16,
    ) -> *mut f32 {
        std::ptr::null_mut()
    }
    unsafe extern "sysv64" fn gemm16_b(
        _: *const f32,
        _: i64,
        _: *const u16,
        _: i64,
        _: i64,
        _: i64,
        _: i64,
        _: *const u16,
    ) -> *mut f32 {
        std::ptr::null_mut()
    }
    unsafe extern "sysv64" fn gemv(
        _: i64,
        _: *const u8,
        _: *const i32,
        _: *const u8,
        _: i64,
        _: i64,
        _: i64,
        _: *mut f32,
    ) {
    }
    unsafe extern "sysv64" fn gemv_a8(
        _: i64,
        _: *const u8,
        _: *const i32,
        _: *const u8,
        _: i64,
        _: i64,
        _: i64,
        _: *mut f32,
    ) {
    }
    unsafe extern "sysv64" fn qgemm(
        _: i64,
        _: *const f32,
        _: i64,
        _: i64,
        _: *const u8,
        _: i64,
        _: i64,
        _: i64,
        _: *const u8,
    ) -> *mut f32 {
        std::ptr::null_mut()
    }
    unsafe extern "sysv64" fn qgemm_rows(
        _: i64,
        _: *const f32,
        _: i64,
        _: i64,
        _: *const u8,
        _: i64,
        _: i64,
        _: i64,
        _: *const u8,
    ) -> *mut f32 {
        std::ptr::null_mut()
    }

    unsafe extern "sysv64" fn attn(_: *const f32, _: *const f32, _: *const f32, _: i64, _: i64, _: i64, _: i64, _: *mut f32) {}
    unsafe extern "sysv64" fn gemm_a8(_: i64, _: *const u8, _: *const i32, _: i64, _: *const u8, _: i64, _: i64, _: i64, _: *mut f32) {}
    #[rustfmt::skip]
    unsafe extern "sysv64" fn attn8(_: *const f32, _: *const i8, _: *const i8, _: i64, _: *const f32, _: *const f32, _: i64, _: i64, _: i64, _: i64, _: *mut f32) {}

    /// Each function lands at its slot; only optional slots may be 0.
    #[test]
    fn table_addresses_follow_the_slots() {
        let full = Table {
            gemm_panels: gemm,
            qgemv: Some(gemv),
            qgemv_a8: Some(gemv_a8),
            qgemm,
            gemm_panels_bf16: gemm16,
            gemm_panels_f16: gemm16_b,
            attn_block: attn,
            qgemm_a8: Some(gemm_a8),
            attn_block_i8: attn8,
            qgemm_a8_rows: Some(qgemm_rows),
        };
        let t = full.addresses();
        assert_eq!(t[GEMM_PANELS], gemm as GemmPanelsFn as usize);
        assert_eq!(t[QGEMV], gemv as QGemvFn as usize);
        assert_eq!(t[QGEMV_A8], gemv_a8 as QGemvFn as usize);
        assert_eq!(t[QGEMM], qgemm as QGemmFn as usize);
        assert_eq!(t[GEMM_PANELS_BF16], gemm16 as GemmPanels16Fn as usize);
        assert_eq!(t[GEMM_PANELS_F16], gemm16_b as GemmPanels16Fn as usize);
        assert_eq!(t[ATTN_BLOCK], attn as AttnBlockFn as usize);
        assert_eq!(t[QGEMM_A8], gemm_a8 as QGemmA8Fn as usize);
        assert_eq!(t[ATTN_BLOCK_I8], attn8 as AttnBlockI8Fn as usize);
        assert_eq!(t[QGEMM_A8_ROWS], qgemm_rows as QGemmFn as usize);
        let bare = Table { qgemv: None, qgemv_a8: None, qgemm_a8: None, qgemm_a8_rows: None, ..full }.addresses();
        for s in TABLE {
            assert_eq!(bare[s.index] == 0, s.optional, "slot `{}`", s.name);
        }
    }
}
