//! Kernel generators: the MIL programs a Llama layer runs on a device.
//!
//! Every kernel here takes its weights **inside its input surfaces** (the dynamic-weight
//! trick of DESIGN.md): an input surface `[1, IC, 1, W]` holds an activation in
//! positions `0..T` and one or more weight matrices, each stored `[IC, OC]`, after it;
//! `W` is padded past the last block to an odd multiple of 32 ([`device::padded_width`]).
//! The program slices them apart and multiplies. All layers share one compiled kernel,
//! whatever their weights, so a run compiles a handful of programs once.
//!
//! Layout of every activation: channel-major `[C, T]` with `T = batch · seq` tokens; a
//! batch of sequences sits side by side along T (sequence `b` at `b*S..(b+1)*S`).
//!
//! Two I/O variants, chosen by the dialect ([`Io`]): ios18 kernels take and give fp32
//! and cast to fp16 inside (M3+); ios16 kernels take and give fp16 (M1/M2 reject `cast`).
//! Inside, everything is fp16, as the ANE computes.
//!
//! What runs where (measured, see docs/ARCHITECTURE.md): RMSNorm, RoPE, residuals and
//! the classifier stay on the CPU; projections, attention and the FFN are kernels.

use mil::blob::Weights;
use mil::builder::FunctionBuilder;
use mil::{DType, Dialect, Program, TensorType, Var};

/// Additive mask value for masked-out attention scores. Large enough that `exp` of it
/// underflows to zero in fp16 (exp(-30000) ≪ 2⁻²⁴), small enough to stay finite in fp16
/// (max 65504), so no inf − inf = NaN can appear.
pub const MASK_NEG: f32 = -30000.0;

/// The shapes of one transformer layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerDims {
    pub dim: usize,
    pub hidden: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
}

impl LayerDims {
    pub fn head_dim(&self) -> usize {
        self.dim / self.n_heads
    }
    pub fn kv_dim(&self) -> usize {
        self.head_dim() * self.n_kv_heads
    }
    /// Query heads per KV head (grouped-query attention).
    pub fn group(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }
}

/// How a kernel's surfaces are typed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Io {
    /// fp32 surfaces, cast to fp16 inside (ios18 dialect).
    Fp32Cast,
    /// fp16 surfaces (ios16 dialect, M1/M2).
    Fp16,
}

impl Io {
    pub fn for_dialect(d: Dialect) -> Io {
        match d {
            Dialect::Ios18 => Io::Fp32Cast,
            Dialect::Ios16 => Io::Fp16,
        }
    }
    pub fn surface_dtype(self) -> DType {
        match self {
            Io::Fp32Cast => DType::Fp32,
            Io::Fp16 => DType::Fp16,
        }
    }
}

/// One named block of an input surface: `rows` channels × `width` positions at position
/// `s0`. The pipeline writes activations and weights into surfaces through these.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Block {
    pub name: &'static str,
    pub rows: usize,
    pub s0: usize,
    pub width: usize,
}

/// One input surface of a kernel and what it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SurfaceLayout {
    pub name: String,
    pub channels: usize,
    pub width: usize,
    pub blocks: Vec<Block>,
}

impl SurfaceLayout {
    /// The block with this name. Panics on an unknown name: layouts are fixed by the
    /// generator, so a miss is a bug in the caller, not a user error.
    pub fn block(&self, name: &str) -> &Block {
        self.blocks
            .iter()
            .find(|b| b.name == name)
            .unwrap_or_else(|| panic!("surface `{}` has no block `{name}`", self.name))
    }
}

/// A generated kernel: its program, its constant weight files (masks), and the layout
/// of its input surfaces (in binding order) and outputs (`[1, C, 1, T]` each).
#[derive(Clone, Debug)]
pub struct KernelDef {
    pub name: &'static str,
    pub program: Program,
    pub weights: Weights,
    pub inputs: Vec<SurfaceLayout>,
    pub outputs: Vec<(String, usize, usize)>,
}

/// A builder that knows the I/O variant: inputs are cast to fp16 on entry and outputs
/// back on exit when the surfaces are fp32. (Also used by `static_kernels`.)
pub(crate) struct Gen {
    pub(crate) b: FunctionBuilder,
    io: Io,
    dialect: Dialect,
    inputs: Vec<SurfaceLayout>,
    outputs: Vec<(String, usize, usize)>,
    pub(crate) weights: Weights,
}

impl Gen {
    pub(crate) fn new(dialect: Dialect) -> Gen {
        Gen {
            b: FunctionBuilder::new("main", dialect),
            io: Io::for_dialect(dialect),
            dialect,
            inputs: Vec::new(),
            outputs: Vec::new(),
            weights: Weights::new(),
        }
    }

    /// Declares a surface made of `blocks` laid side by side (each `rows` ≤ channels),
    /// padded to [`device::padded_width`] positions, and returns it as an fp16
    /// `[1, C, 1, W]` value.
    pub(crate) fn surface(&mut self, name: &str, channels: usize, blocks: &[(&'static str, usize, usize)]) -> Var {
        let mut s0 = 0;
        let mut layout = SurfaceLayout { name: name.to_string(), channels, width: 0, blocks: Vec::new() };
        for &(bname, rows, width) in blocks {
            layout.blocks.push(Block { name: bname, rows, s0, width });
            s0 += width;
        }
        layout.width = device::padded_width(s0);
        let ty = TensorType::surface(self.io.surface_dtype(), channels, layout.width);
        let x = self.b.input(name, ty);
        self.inputs.push(layout);
        match self.io {
            Io::Fp32Cast => self.b.cast(&format!("{name}_h"), &x, DType::Fp16),
            Io::Fp16 => x,
        }
    }

    /// A block of an input surface as a `[rows, width]` matrix (slice + reshape: views on
    /// the CPU device, no copy).
    pub(crate) fn block(&mut self, surf: &Var, input: usize, block: &str) -> Var {
        let bl = self.inputs[input].block(block).clone();
        let name = format!("{}_{}", self.inputs[input].name, bl.name);
        let s = self.b.slice_by_size(
            &format!("{name}_s"),
            surf,
            &[0, 0, 0, bl.s0 as i64],
            &[1, bl.rows as i64, 1, bl.width as i64],
        );
        self.b.reshape(&name, &s, &[bl.rows as i64, bl.width as i64])
    }

    /// `W^T · x` for `w: [IC, OC]`, `x: [IC, T]` → `[OC, T]`.
    pub(crate) fn linear_t(&mut self, name: &str, w: &Var, x: &Var) -> Var {
        self.b.matmul(name, w, x, true, false)
    }

    /// Marks a `[C, T]` value as an output surface `[1, C, 1, T]` named `name`.
    pub(crate) fn output(&mut self, name: &str, v: &Var) {
        let (c, t) = (v.ty.shape[0], v.ty.shape[1]);
        let out = match self.io {
            Io::Fp32Cast => {
                let r = self.b.reshape(&format!("{name}_h"), v, &[1, c as i64, 1, t as i64]);
                self.b.cast(name, &r, DType::Fp32)
            }
            Io::Fp16 => self.b.reshape(name, v, &[1, c as i64, 1, t as i64]),
        };
        self.b.output(&out);
        self.outputs.push((name.to_string(), c, t));
    }

    pub(crate) fn finish(self, name: &'static str) -> mil::Result<KernelDef> {
        let f = self.b.finish()?;
        Ok(KernelDef {
            name,
            program: Program::new(self.dialect, f),
            weights: self.weights,
            inputs: self.inputs,
            outputs: self.outputs,
        })
    }
}

/// QKV projection. Input `x: [D, T + D + 2·KV]` = normed activation `xn [D, T]`, then
/// `Wqᵀ [D, D]`, `Wkᵀ [D, KV]`, `Wvᵀ [D, KV]` (each weight `W [out, in]` stored
/// transposed, `[in, out]`). Outputs `q [D, T]`, `k [KV, T]`, `v [KV, T]`, before RoPE.
pub fn qkv_forward(d: &LayerDims, t: usize, dialect: Dialect) -> mil::Result<KernelDef> {
    let (dim, kv) = (d.dim, d.kv_dim());
    let mut g = Gen::new(dialect);
    let x = g.surface("x", dim, &[("xn", dim, t), ("wqkv", dim, dim + 2 * kv)]);
    let xn = g.block(&x, 0, "xn");
    let w = g.block(&x, 0, "wqkv");
    // One GEMM for all three projections: the weights sit side by side.
    let qkv = g.linear_t("qkv", &w, &xn); // [D + 2KV, T]
    let parts = g.b.split("qkv_parts", &qkv, &[dim as i64, kv as i64, kv as i64], 0);
    g.output("q", &parts[0]);
    g.output("k", &parts[1]);
    g.output("v", &parts[2]);
    g.finish("qkv_forward")
}

/// Causal attention plus the output projection, for `batch` sequences of `seq` tokens.
/// Inputs: `q: [D, T + D]` = rotated queries `[D, T]` then `Woᵀ [D, D]`;
/// `kv: [KV, 2T]` = rotated keys then values. Outputs: `o [D, T]` (attention output,
/// kept for the Wo gradient) and `y [D, T] = Wo · o`.
///
/// Written out explicitly — matmul, scale, additive causal mask, softmax, matmul —
/// because the ANE's `scaled_dot_product_attention` ignores `attn_mask` (DESIGN.md).
pub fn attention_forward(d: &LayerDims, batch: usize, seq: usize, dialect: Dialect) -> mil::Result<KernelDef> {
    let (dim, kv, hd) = (d.dim, d.kv_dim(), d.head_dim());
    let t = batch * seq;
    let mut g = Gen::new(dialect);
    let qs = g.surface("q", dim, &[("q", dim, t), ("wo", dim, dim)]);
    let kvs = g.surface("kv", kv, &[("k", kv, t), ("v", kv, t)]);
    let q = g.block(&qs, 0, "q");
    let k = g.block(&kvs, 1, "k");
    let v = g.block(&kvs, 1, "v");
    let mask = causal_mask(&mut g, seq);

    let h = Heads::new(d, batch, seq);
    let qh = h.queries(&mut g, "qh", &q); // [B, nkv, g, S, hd]
    let kh = h.kv_rows(&mut g, "kh", &k); // [B, nkv, 1, S, hd]
    let vh = h.kv_rows(&mut g, "vh", &v);
    let (_, probs) = attention_probs(&mut g, &qh, &kh, &mask, hd);
    let oh = g.b.matmul("oh", &probs, &vh, false, false); // [B, nkv, g, S, hd]
    let o = h.merge_queries(&mut g, "o2", &oh); // [D, T]
    let wo = g.block(&qs, 0, "wo");
    let y = g.linear_t("y2", &wo, &o);
    g.output("o", &o);
    g.output("y", &y);
    g.finish("attention_forward")
}

/// Causal attention probabilities `P = softmax(q·kᵀ·scale + mask)` for queries
/// `qh: [B, nkv, g, S, hd]` and keys `kh: [B, nkv, 1, S, hd]`. The scale `1/√hd` is applied
/// to the queries (`[…, S, hd]`) rather than to the scores (`[…, S, S]`): the same
/// product, with one pass over `hd` columns instead of `S`. Returns the scaled queries
/// (the backward's `dK = dSᵀ·Q` wants them) and `P`.
pub(crate) fn attention_probs(g: &mut Gen, qh: &Var, kh: &Var, mask: &Var, head_dim: usize) -> (Var, Var) {
    let qs = g.b.scale("qs", qh, 1.0 / (head_dim as f64).sqrt());
    let scores = g.b.matmul("scores", &qs, kh, false, true); // [B, nkv, g, S, S]
    let masked = g.b.add("masked", &scores, mask);
    let probs = g.b.softmax("probs", &masked, -1);
    (qs, probs)
}

/// The additive causal mask `[S, S]` (0 on and below the diagonal, [`MASK_NEG`] above),
/// as a constant weight file.
pub(crate) fn causal_mask(g: &mut Gen, seq: usize) -> Var {
    let mut m = vec![0.0f32; seq * seq];
    for i in 0..seq {
        for j in i + 1..seq {
            m[i * seq + j] = MASK_NEG;
        }
    }
    let blob = g.weights.add_tensor("causal_mask", &[seq, seq], &m);
    g.b.constant("causal_mask", blob)
}

/// Attention for decoding: `t` new tokens against a KV cache of `cache` positions.
/// Inputs (widths padded as every surface's): `q: [D, t + D]` = rotated queries then
/// `Woᵀ`; `kv: [KV, 2·cache]` = the key cache then the value cache (new keys/values
/// already written in); `mask: [t, cache]` additive (0 where query i may see cache
/// position j, [`MASK_NEG`] elsewhere).
/// Outputs `o [D, t]`, `y [D, t]` as [`attention_forward`].
pub fn attention_decode(d: &LayerDims, t: usize, cache: usize, dialect: Dialect) -> mil::Result<KernelDef> {
    let (dim, kv, hd, nkv, grp) = (d.dim, d.kv_dim(), d.head_dim(), d.n_kv_heads, d.group());
    let (t_, c_, hd_, nkv_, g_) = (t as i64, cache as i64, hd as i64, nkv as i64, grp as i64);
    let mut g = Gen::new(dialect);
    let qs = g.surface("q", dim, &[("q", dim, t), ("wo", dim, dim)]);
    let kvs = g.surface("kv", kv, &[("k", kv, cache), ("v", kv, cache)]);
    let ms = g.surface("mask", t, &[("mask", t, cache)]);
    let q = g.block(&qs, 0, "q");
    let k = g.block(&kvs, 1, "k");
    let v = g.block(&kvs, 1, "v");
    let mask = g.block(&ms, 2, "mask"); // [t, cache]

    let q4 = g.b.reshape("q4", &q, &[nkv_, g_, hd_, t_]);
    let qt = g.b.transpose("qt", &q4, &[0, 1, 3, 2]); // [nkv, g, t, hd]
    let k3 = g.b.reshape("k3", &k, &[nkv_, 1, hd_, c_]); // [nkv, 1, hd, cache]
    let v3 = g.b.reshape("v3", &v, &[nkv_, 1, hd_, c_]);
    let vt = g.b.transpose("vt", &v3, &[0, 1, 3, 2]); // [nkv, 1, cache, hd]
    let scores = g.b.matmul("scores", &qt, &k3, false, false); // [nkv, g, t, cache]
    let scaled = g.b.scale("scaled", &scores, 1.0 / (hd as f64).sqrt());
    let masked = g.b.add("masked", &scaled, &mask);
    let probs = g.b.softmax("probs", &masked, -1);
    let o4 = g.b.matmul("o4", &probs, &vt, false, false); // [nkv, g, t, hd]
    let ot = g.b.transpose("ot", &o4, &[0, 1, 3, 2]); // [nkv, g, hd, t]
    let o = g.b.reshape("o2", &ot, &[dim as i64, t_]);
    let wo = g.block(&qs, 0, "wo");
    let y = g.linear_t("y2", &wo, &o);
    g.output("o", &o);
    g.output("y", &y);
    g.finish("attention_decode")
}

/// SwiGLU FFN: `y = W2 · (silu(W1 x) ⊙ W3 x)`.
/// Inputs: `x: [D, T + 2H]` = normed activation, `W1ᵀ [D, H]`, `W3ᵀ [D, H]`;
/// `w2: [H, D]` = `W2ᵀ`. Outputs `h1 = W1 x`, `h3 = W3 x` (`[H, T]`, kept for backward)
/// and `y [D, T]`.
pub fn ffn_forward(d: &LayerDims, t: usize, dialect: Dialect) -> mil::Result<KernelDef> {
    let (dim, hid) = (d.dim, d.hidden);
    let mut g = Gen::new(dialect);
    let xs = g.surface("x", dim, &[("xn", dim, t), ("w13", dim, 2 * hid)]);
    let w2s = g.surface("w2", hid, &[("w2", hid, dim)]);
    let xn = g.block(&xs, 0, "xn");
    let w13 = g.block(&xs, 0, "w13");
    let h13 = g.linear_t("h13", &w13, &xn); // [2H, T]
    let parts = g.b.split("h13_parts", &h13, &[hid as i64, hid as i64], 0);
    let (h1, h3) = (&parts[0], &parts[1]);
    let act = g.b.silu("act", h1);
    let gate = g.b.mul("gate", &act, h3);
    let w2 = g.block(&w2s, 1, "w2");
    let y = g.linear_t("y2", &w2, &gate);
    g.output("h1", h1);
    g.output("h3", h3);
    g.output("y", &y);
    g.finish("ffn_forward")
}

/// Reshapes a channel-major `[heads·hd, B·S]` value to `[B, heads, S, hd]`-like 5-D
/// layouts and back: the attention kernels' bookkeeping, in one place.
pub(crate) struct Heads {
    b: i64,
    s: i64,
    hd: i64,
    nkv: i64,
    g: i64,
}

impl Heads {
    pub(crate) fn new(d: &LayerDims, batch: usize, seq: usize) -> Heads {
        Heads { b: batch as i64, s: seq as i64, hd: d.head_dim() as i64, nkv: d.n_kv_heads as i64, g: d.group() as i64 }
    }

    /// Queries `[D, T]` → `[B, nkv, g, S, hd]` (head h = kv_head·g + i, as llama2.c).
    pub(crate) fn queries(&self, g: &mut Gen, name: &str, q: &Var) -> Var {
        let q5 = g.b.reshape(&format!("{name}_5"), q, &[self.nkv, self.g, self.hd, self.b, self.s]);
        g.b.transpose(name, &q5, &[3, 0, 1, 4, 2])
    }

    /// Keys or values `[KV, T]` → `[B, nkv, 1, S, hd]`.
    pub(crate) fn kv_rows(&self, g: &mut Gen, name: &str, k: &Var) -> Var {
        let k4 = g.b.reshape(&format!("{name}_4"), k, &[self.nkv, self.hd, self.b, self.s]);
        let kt = g.b.transpose(&format!("{name}_t"), &k4, &[2, 0, 3, 1]);
        g.b.reshape(name, &kt, &[self.b, self.nkv, 1, self.s, self.hd])
    }

    /// `[B, nkv, g, S, hd]` → channel-major `[D, T]`.
    pub(crate) fn merge_queries(&self, g: &mut Gen, name: &str, x: &Var) -> Var {
        let t = g.b.transpose(&format!("{name}_t"), x, &[1, 2, 4, 0, 3]);
        g.b.reshape(name, &t, &[self.nkv * self.g * self.hd, self.b * self.s])
    }

    /// `[B, nkv, S, hd]` → channel-major `[KV, T]`.
    pub(crate) fn merge_kv(&self, g: &mut Gen, name: &str, x: &Var) -> Var {
        let t = g.b.transpose(&format!("{name}_t"), x, &[1, 3, 0, 2]);
        g.b.reshape(name, &t, &[self.nkv * self.hd, self.b * self.s])
    }
}

/// Backward of the SwiGLU FFN. Inputs: `dy: [D, T + H]` = the gradient at the FFN's
/// output, then `W2 [D, H]` (as stored, untransposed); `h: [H, 2T + 2D]` = `h1`, `h3`
/// from the forward pass, then `W1 [H, D]`, `W3 [H, D]`. Outputs: `dx [D, T]` (at the
/// FFN's normed input), `dh1`, `dh3` and `gate = silu(h1)·h3` (`[H, T]`, for the weight
/// gradients on the CPU).
pub fn ffn_backward(d: &LayerDims, t: usize, dialect: Dialect) -> mil::Result<KernelDef> {
    let (dim, hid) = (d.dim, d.hidden);
    let mut g = Gen::new(dialect);
    let dys = g.surface("dy", dim, &[("dy", dim, t), ("w2", dim, hid)]);
    let hs = g.surface("h", hid, &[("h1", hid, t), ("h3", hid, t), ("w1", hid, dim), ("w3", hid, dim)]);
    let dy = g.block(&dys, 0, "dy");
    let w2 = g.block(&dys, 0, "w2");
    let h1 = g.block(&hs, 1, "h1");
    let h3 = g.block(&hs, 1, "h3");
    let dgate = g.linear_t("dgate", &w2, &dy); // [H, T]
                                               // silu(h1) = h1·σ(h1); silu'(h1) = σ(h1)·(1 + h1·(1 − σ(h1))).
    let sig = g.b.sigmoid("sig", &h1);
    let act = g.b.mul("act", &h1, &sig);
    let gate = g.b.mul("gate2", &act, &h3);
    let dh3 = g.b.mul("dh3_2", &dgate, &act);
    let one = g.b.scalar(DType::Fp16, 1.0);
    let one_minus = g.b.sub("one_minus_sig", &one, &sig);
    let h1_oms = g.b.mul("h1_oms", &h1, &one_minus);
    let inner = g.b.add("inner", &h1_oms, &one);
    let dsilu = g.b.mul("dsilu", &sig, &inner);
    let dact = g.b.mul("dact", &dgate, &h3);
    let dh1 = g.b.mul("dh1_2", &dact, &dsilu);
    let w1 = g.block(&hs, 1, "w1");
    let w3 = g.block(&hs, 1, "w3");
    let dx1 = g.linear_t("dx1", &w1, &dh1);
    let dx3 = g.linear_t("dx3", &w3, &dh3);
    let dx = g.b.add("dx2", &dx1, &dx3);
    g.output("dx", &dx);
    g.output("dh1", &dh1);
    g.output("dh3", &dh3);
    g.output("gate", &gate);
    g.finish("ffn_backward")
}

/// Backward of attention and its output projection, recomputing the probabilities.
/// Inputs: `dy: [D, 3T + D]` = the gradient at the projection's output, the rotated
/// queries `q [D, T]`, the forward's attention output `o [D, T]` (before Wo), then
/// `Wo [D, D]` (untransposed); `kv: [KV, 2T]` = rotated keys then values. Outputs `dq [D, T]`, `dk [KV, T]`, `dv [KV, T]` (at the rotated values;
/// the CPU applies RoPE's backward). With grouped-query attention the gradients of the
/// query heads sharing a KV head are summed ("folded") into it.
pub fn attention_backward(d: &LayerDims, batch: usize, seq: usize, dialect: Dialect) -> mil::Result<KernelDef> {
    let (dim, kv, hd) = (d.dim, d.kv_dim(), d.head_dim());
    let t = batch * seq;
    let h = Heads::new(d, batch, seq);
    let mut g = Gen::new(dialect);
    let dys = g.surface("dy", dim, &[("dy", dim, t), ("q", dim, t), ("o", dim, t), ("wo", dim, dim)]);
    let kvs = g.surface("kv", kv, &[("k", kv, t), ("v", kv, t)]);
    let dy = g.block(&dys, 0, "dy");
    let wo = g.block(&dys, 0, "wo");
    let q = g.block(&dys, 0, "q");
    let o = g.block(&dys, 0, "o");
    let k = g.block(&kvs, 1, "k");
    let v = g.block(&kvs, 1, "v");
    let d_o = g.linear_t("do", &wo, &dy); // [D, T] gradient at the attention output
    let (dqh, dkh, dvh) = attention_grads(&mut g, &h, hd, seq, [&q, &k, &v, &o, &d_o]);
    let dq = h.merge_queries(&mut g, "dq2", &dqh);
    let dk = h.merge_kv(&mut g, "dk2", &dkh);
    let dv = h.merge_kv(&mut g, "dv2", &dvh);
    g.output("dq", &dq);
    g.output("dk", &dk);
    g.output("dv", &dv);
    g.finish("attention_backward")
}

/// The core of every attention backward: recompute `P = softmax(q·kᵀ·scale + mask)`,
/// then `dV = Σ_g Pᵀ·dO`, `dP = dO·Vᵀ`, the softmax backward `dS = P ⊙ (dP − Σ_j dP⊙P)`,
/// `dQ = dS·K·scale` and `dK = Σ_g dSᵀ·(Q·scale)`. The row sums `Σ_j dP_ij·P_ij` are
/// taken as `dO_i · O_i` (FlashAttention's identity: `Σ_j (dO_i·V_j) P_ij = dO_i·O_i`),
/// over `hd` columns instead of `S`. Takes channel-major `[q, k, v, o, d_o]`: rotated
/// `q [D, T]`, `k`, `v [KV, T]`, the forward's attention output `o [D, T]` and its
/// gradient `d_o [D, T]`; returns `(dQ, dK, dV)` in head layout
/// (`[B, nkv, g, S, hd]`, `[B, nkv, S, hd]`, `[B, nkv, S, hd]`), the query heads of a KV
/// head folded (summed) into it.
pub(crate) fn attention_grads(
    g: &mut Gen,
    h: &Heads,
    head_dim: usize,
    seq: usize,
    [q, k, v, o, d_o]: [&Var; 5],
) -> (Var, Var, Var) {
    let mask = causal_mask(g, seq);
    let qh = h.queries(g, "qh", q); // [B, nkv, g, S, hd]
    let kh = h.kv_rows(g, "kh", k); // [B, nkv, 1, S, hd]
    let vh = h.kv_rows(g, "vh", v);
    let doh = h.queries(g, "doh", d_o);
    let (qs, p) = attention_probs(g, &qh, &kh, &mask, head_dim);
    let dv_g = g.b.matmul("dv_g", &p, &doh, true, false); // [B, nkv, g, S, hd]
    let dvh = g.b.reduce_sum("dvh", &dv_g, &[2], false); // [B, nkv, S, hd]
    let dp = g.b.matmul("dp", &doh, &vh, false, true); // [B, nkv, g, S, S]
    let oh = h.queries(g, "oh", o);
    let doo = g.b.mul("doo", &doh, &oh); // [B, nkv, g, S, hd]
    let rowsum = g.b.reduce_sum("rowsum", &doo, &[-1], true); // [B, nkv, g, S, 1]
    let centered = g.b.sub("centered", &dp, &rowsum);
    // dS without the scale: the scale goes on dQ (an [S, hd] pass, not [S, S]), and dK
    // takes it from the scaled queries.
    let ds = g.b.mul("ds", &p, &centered);
    let dq0 = g.b.matmul("dq0", &ds, &kh, false, false); // [B, nkv, g, S, hd]
    let dqh = g.b.scale("dqh", &dq0, 1.0 / (head_dim as f64).sqrt());
    let dk_g = g.b.matmul("dk_g", &ds, &qs, true, false); // [B, nkv, g, S, hd]
    let dkh = g.b.reduce_sum("dkh", &dk_g, &[2], false);
    (dqh, dkh, dvh)
}

/// One part of the classifier: `logits [V_p, T] = W_p · xn` for `V_p` rows of the
/// `[vocab, D]` classifier. Input `x: [D, T + V_p]` = normed activation `xn [D, T]`, then
/// `W_pᵀ [D, V_p]`. The decoder splits the vocabulary into parts so that no dimension
/// passes the ANE's limit ([`mil::lint::MAX_DIMENSION`]; Qwen2.5's head has 151936 rows):
/// see [`classifier_parts`].
pub fn classifier_part(dim: usize, part: usize, t: usize, dialect: Dialect) -> mil::Result<KernelDef> {
    let mut g = Gen::new(dialect);
    let xs = g.surface("x", dim, &[("xn", dim, t), ("wcls", dim, part)]);
    let xn = g.block(&xs, 0, "xn");
    let w = g.block(&xs, 0, "wcls");
    let y = g.linear_t("logits2", &w, &xn);
    g.output("logits", &y);
    g.finish("classifier_part")
}

/// The vocabulary rows `lo..hi` of each classifier part: consecutive, each at most
/// `max_part` rows.
pub fn classifier_parts(vocab: usize, max_part: usize) -> Vec<(usize, usize)> {
    assert!(max_part > 0, "a classifier part holds at least one row");
    (0..vocab).step_by(max_part).map(|lo| (lo, (lo + max_part).min(vocab))).collect()
}

/// Backward of the QKV projection: `dx = Wqᵀ·dq + Wkᵀ·dk + Wvᵀ·dv`.
/// Inputs: `dq: [D, T + D]` = `dq`, then `Wq [D, D]`; `dkv: [KV, 2T + 2D]` = `dk`,
/// `dv`, then `Wk [KV, D]`, `Wv [KV, D]` (all untransposed). Output `dx [D, T]`.
pub fn qkv_backward(d: &LayerDims, t: usize, dialect: Dialect) -> mil::Result<KernelDef> {
    let (dim, kv) = (d.dim, d.kv_dim());
    let mut g = Gen::new(dialect);
    let dqs = g.surface("dq", dim, &[("dq", dim, t), ("wq", dim, dim)]);
    let dkvs = g.surface("dkv", kv, &[("dk", kv, t), ("dv", kv, t), ("wk", kv, dim), ("wv", kv, dim)]);
    let dq = g.block(&dqs, 0, "dq");
    let wq = g.block(&dqs, 0, "wq");
    let dk = g.block(&dkvs, 1, "dk");
    let dv = g.block(&dkvs, 1, "dv");
    let wk = g.block(&dkvs, 1, "wk");
    let wv = g.block(&dkvs, 1, "wv");
    let a = g.linear_t("dxq", &wq, &dq);
    let b = g.linear_t("dxk", &wk, &dk);
    let c = g.linear_t("dxv", &wv, &dv);
    let ab = g.b.add("dxqk", &a, &b);
    let dx = g.b.add("dx2", &ab, &c);
    g.output("dx", &dx);
    g.finish("qkv_backward")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kernel a Stories-shaped layer needs, at the shapes the pipelines use.
    fn all_kernels(d: &LayerDims, batch: usize, seq: usize, dialect: Dialect) -> Vec<KernelDef> {
        let t = batch * seq;
        vec![
            qkv_forward(d, t, dialect).unwrap(),
            attention_forward(d, batch, seq, dialect).unwrap(),
            attention_decode(d, 16, seq, dialect).unwrap(),
            ffn_forward(d, t, dialect).unwrap(),
            ffn_backward(d, t, dialect).unwrap(),
            attention_backward(d, batch, seq, dialect).unwrap(),
            qkv_backward(d, t, dialect).unwrap(),
        ]
    }

    #[test]
    fn the_ane_lint_finds_no_error_in_any_kernel() {
        // Stories15M and Stories110M layers at the training shapes (seq 256), and
        // Stories260K (grouped-query attention).
        let shapes = [
            (LayerDims { dim: 288, hidden: 768, n_heads: 6, n_kv_heads: 6 }, 2, 256),
            (LayerDims { dim: 768, hidden: 2048, n_heads: 12, n_kv_heads: 12 }, 1, 256),
            (LayerDims { dim: 64, hidden: 192, n_heads: 4, n_kv_heads: 2 }, 2, 128),
        ];
        for (d, batch, seq) in shapes {
            for dialect in [Dialect::Ios18, Dialect::Ios16] {
                for k in all_kernels(&d, batch, seq, dialect) {
                    let findings = mil::lint::lint(&k.program);
                    let errors: Vec<String> = findings
                        .iter()
                        .filter(|f| f.severity == mil::lint::Severity::Error)
                        .map(|f| f.to_string())
                        .collect();
                    assert!(errors.is_empty(), "{} ({dialect}, dim {}): {errors:#?}", k.name, d.dim);
                }
            }
        }
    }

    /// Qwen2.5-0.5B's 151936-row classifier as the decoder splits it: each part lints
    /// clean, and the whole head in one kernel is exactly what the lint refuses.
    #[test]
    fn the_split_classifier_stays_within_the_ane_dimension_limit() {
        let (dim, vocab, t) = (896, 151936, 16);
        let errors = |k: &KernelDef| -> Vec<String> {
            let findings = mil::lint::lint(&k.program);
            findings.iter().filter(|f| f.severity == mil::lint::Severity::Error).map(|f| f.to_string()).collect()
        };
        let parts = classifier_parts(vocab, crate::model::HEAD_PART_ROWS);
        assert_eq!(parts.len(), 3);
        for dialect in [Dialect::Ios18, Dialect::Ios16] {
            for &(lo, hi) in &parts {
                let k = classifier_part(dim, hi - lo, t, dialect).unwrap();
                assert!(errors(&k).is_empty(), "rows {lo}..{hi} ({dialect}): {:#?}", errors(&k));
            }
            let whole = classifier_part(dim, vocab, t, dialect).unwrap();
            let e = errors(&whole);
            assert!(e.iter().any(|m| m.contains("65536")), "the unsplit head must pass the limit: {e:#?}");
        }
    }

    fn dims() -> LayerDims {
        LayerDims { dim: 64, hidden: 172, n_heads: 8, n_kv_heads: 4 }
    }

    #[test]
    fn every_kernel_validates_in_both_dialects() {
        for dialect in [Dialect::Ios18, Dialect::Ios16] {
            let d = dims();
            let ks = [
                qkv_forward(&d, 32, dialect).unwrap(),
                attention_forward(&d, 2, 16, dialect).unwrap(),
                attention_decode(&d, 1, 64, dialect).unwrap(),
                ffn_forward(&d, 32, dialect).unwrap(),
                ffn_backward(&d, 32, dialect).unwrap(),
                attention_backward(&d, 2, 16, dialect).unwrap(),
                qkv_backward(&d, 32, dialect).unwrap(),
            ];
            for k in &ks {
                mil::validate(&k.program).unwrap_or_else(|e| panic!("{}: {e}", k.name));
                let text = mil::text::print(&k.program);
                assert_eq!(mil::text::parse(&text).unwrap(), k.program, "{} does not print and parse back", k.name);
            }
        }
    }
}
