//! Kernel generators: the MIL programs a Llama layer runs on a device.
//!
//! Every kernel here takes its weights **inside its input surfaces** (the dynamic-weight
//! trick of DESIGN.md): an input surface `[1, IC, 1, W]` holds an activation in
//! positions `0..T` and one or more weight matrices, each stored `[IC, OC]`, after it.
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
/// back on exit when the surfaces are fp32.
struct Gen {
    b: FunctionBuilder,
    io: Io,
    dialect: Dialect,
    inputs: Vec<SurfaceLayout>,
    outputs: Vec<(String, usize, usize)>,
    weights: Weights,
}

impl Gen {
    fn new(dialect: Dialect) -> Gen {
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
    /// and returns it as an fp16 `[1, C, 1, W]` value.
    fn surface(&mut self, name: &str, channels: usize, blocks: &[(&'static str, usize, usize)]) -> Var {
        let mut s0 = 0;
        let mut layout = SurfaceLayout { name: name.to_string(), channels, width: 0, blocks: Vec::new() };
        for &(bname, rows, width) in blocks {
            layout.blocks.push(Block { name: bname, rows, s0, width });
            s0 += width;
        }
        layout.width = s0;
        let ty = TensorType::surface(self.io.surface_dtype(), channels, s0);
        let x = self.b.input(name, ty);
        self.inputs.push(layout);
        match self.io {
            Io::Fp32Cast => self.b.cast(&format!("{name}_h"), &x, DType::Fp16),
            Io::Fp16 => x,
        }
    }

    /// A block of an input surface as a `[rows, width]` matrix (slice + reshape: views on
    /// the CPU device, no copy).
    fn block(&mut self, surf: &Var, input: usize, block: &str) -> Var {
        let bl = self.inputs[input].block(block).clone();
        let name = format!("{}_{}", self.inputs[input].name, bl.name);
        let s = self.b.slice_by_size(&format!("{name}_s"), surf, &[0, 0, 0, bl.s0 as i64], &[1, bl.rows as i64, 1, bl.width as i64]);
        self.b.reshape(&name, &s, &[bl.rows as i64, bl.width as i64])
    }

    /// `W^T · x` for `w: [IC, OC]`, `x: [IC, T]` → `[OC, T]`.
    fn linear_t(&mut self, name: &str, w: &Var, x: &Var) -> Var {
        self.b.matmul(name, w, x, true, false)
    }

    /// Marks a `[C, T]` value as an output surface `[1, C, 1, T]` named `name`.
    fn output(&mut self, name: &str, v: &Var) {
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

    fn finish(self, name: &'static str) -> mil::Result<KernelDef> {
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
    let (dim, kv, hd, nkv, grp) = (d.dim, d.kv_dim(), d.head_dim(), d.n_kv_heads, d.group());
    let t = batch * seq;
    let (b_, s_, hd_, nkv_, g_) = (batch as i64, seq as i64, hd as i64, nkv as i64, grp as i64);
    let mut g = Gen::new(dialect);
    let qs = g.surface("q", dim, &[("q", dim, t), ("wo", dim, dim)]);
    let kvs = g.surface("kv", kv, &[("k", kv, t), ("v", kv, t)]);
    let q = g.block(&qs, 0, "q");
    let k = g.block(&kvs, 1, "k");
    let v = g.block(&kvs, 1, "v");
    let mask = causal_mask(&mut g, seq);

    // q: [D, T] = [nkv, g, hd, B, S] → [B, nkv, g, S, hd]
    let q5 = g.b.reshape("q5", &q, &[nkv_, g_, hd_, b_, s_]);
    let qt = g.b.transpose("qt", &q5, &[3, 0, 1, 4, 2]);
    // k: [KV, T] = [nkv, hd, B, S] → [B, nkv, 1, hd, S]
    let k4 = g.b.reshape("k4", &k, &[nkv_, hd_, b_, s_]);
    let kt = g.b.transpose("kt", &k4, &[2, 0, 1, 3]);
    let k5 = g.b.reshape("k5", &kt, &[b_, nkv_, 1, hd_, s_]);
    // v: [KV, T] → [B, nkv, 1, S, hd]
    let v4 = g.b.reshape("v4", &v, &[nkv_, hd_, b_, s_]);
    let vt = g.b.transpose("vt", &v4, &[2, 0, 3, 1]);
    let v5 = g.b.reshape("v5", &vt, &[b_, nkv_, 1, s_, hd_]);

    let scores = g.b.matmul("scores", &qt, &k5, false, false); // [B, nkv, g, S, S]
    let scaled = g.b.scale("scaled", &scores, 1.0 / (hd as f64).sqrt());
    let masked = g.b.add("masked", &scaled, &mask);
    let probs = g.b.softmax("probs", &masked, -1);
    let o5 = g.b.matmul("o5", &probs, &v5, false, false); // [B, nkv, g, S, hd]
    let ot = g.b.transpose("ot", &o5, &[1, 2, 4, 0, 3]); // [nkv, g, hd, B, S]
    let o = g.b.reshape("o2", &ot, &[dim as i64, t as i64]);
    let wo = g.block(&qs, 0, "wo");
    let y = g.linear_t("y2", &wo, &o);
    g.output("o", &o);
    g.output("y", &y);
    g.finish("attention_forward")
}

/// The additive causal mask `[S, S]` (0 on and below the diagonal, [`MASK_NEG`] above),
/// as a constant weight file.
fn causal_mask(g: &mut Gen, seq: usize) -> Var {
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
/// Inputs: `q: [D, t + D]` = rotated queries then `Woᵀ`; `kv: [KV, 2·cache]` = the key
/// cache then the value cache (new keys/values already written in); `mask: [t, cache]`
/// additive (0 where query i may see cache position j, [`MASK_NEG`] elsewhere).
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

#[cfg(test)]
mod tests {
    use super::*;

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
            ];
            for k in &ks {
                mil::validate(&k.program).unwrap_or_else(|e| panic!("{}: {e}", k.name));
            }
        }
    }
}
