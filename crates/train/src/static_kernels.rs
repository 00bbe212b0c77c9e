//! Kernel generators of the static pipeline: the weights are **baked into the program**
//! as BLOBFILE constants (fp16, as the ANE stores them), not passed in surfaces.
//!
//! A kernel with baked weights serves one layer and one version of the weights, so the
//! static pipeline compiles `5·L` of them after every optimizer step (see
//! `static_pipeline`). In exchange, each kernel can fuse more than a dynamic one, because
//! no input surface has to carry a weight matrix of the right width:
//!
//! | kernel | weights baked | fuses |
//! |---|---|---|
//! | [`attention_forward`] | RMSNorm gain, Wq/Wk/Wv (+ biases), Wo | RMSNorm, QKV, RoPE, causal attention, Wo |
//! | [`ffn_forward`] | RMSNorm gain, W1/W3, W2 | RMSNorm, SwiGLU FFN |
//! | [`ffn_backward`] | W1, W2, W3 | W2ᵀ, SiLU-gate backward, W1ᵀ + W3ᵀ |
//! | [`attention_backward_wo`] | Wo | the weight-bearing part of attention backward: Woᵀ |
//! | [`attention_backward_free`] | none (compiled once) | recomputed softmax, dV, dP, softmax backward, dQ, dK, RoPE backward |
//! | [`qkv_backward`] | Wq, Wk, Wv | Wqᵀ + Wkᵀ + Wvᵀ |
//!
//! And the "ANE extras" (`--ane-extras`), which otherwise run on the CPU:
//! [`rmsnorm`] (the final norm, gain baked), [`classifier_softmax`] (logits and their
//! softmax over the vocabulary, one kernel per vocabulary chunk of at most
//! [`mil::lint::MAX_DIMENSION`] rows) and [`rmsnorm_backward`] (weight-free: the gain
//! comes in the input surface, so one compiled kernel serves every norm).
//!
//! **RoPE runs inside the kernels.** The interleaved pairs `(2i, 2i+1)` of each head are
//! taken apart with a reshape to `[heads, hd/2, 2, T]` and two slices (views), rotated
//! elementwise, and put back together without `concat` (which the ANE is reported to
//! reject): `r = re ⊙ [1, 0] + ro ⊙ [0, 1]` broadcast over the pair axis, which is exact
//! (`x·1 + 0 = x`). The cosine and sine tables (`[hd/2, T]`) are *not* baked: they come
//! in a block of an input surface, written once per run, so on a device with fp32 I/O
//! they keep the f32 values of the CPU's `RopeTable` instead of being rounded to fp16 —
//! and the static pipeline matches the dynamic one as closely as its fp16 weights allow.
//!
//! Weight layouts are the model's (`W [out, in]`, row-major, see `llama::params`): the
//! forward multiplies `W · x`, the backward `Wᵀ · dy` (a `matmul` with `transpose_x`).
//! Activations are channel-major `[C, T]`, `T = batch · seq`, as in [`crate::kernels`].

use std::ops::Range;

use mil::{DType, TensorType, Value, Var};

use crate::kernels::{attention_grads, attention_probs, causal_mask, Gen, Heads, KernelDef, LayerDims, Target};

/// The weights one layer's attention-forward kernel bakes in (`llama::Layer` views).
#[derive(Clone, Copy, Debug)]
pub struct AttentionWeights<'a> {
    /// RMSNorm gain `[D]`.
    pub rms: &'a [f32],
    /// `[D, D]`, `[KV, D]`, `[KV, D]`, `[D, D]`.
    pub wq: &'a [f32],
    pub wk: &'a [f32],
    pub wv: &'a [f32],
    pub wo: &'a [f32],
    /// Optional QKV biases `[D]`, `[KV]`, `[KV]`.
    pub bias: Option<(&'a [f32], &'a [f32], &'a [f32])>,
}

/// The weights of one layer's FFN kernels.
#[derive(Clone, Copy, Debug)]
pub struct FfnWeights<'a> {
    /// RMSNorm gain `[D]` (forward only).
    pub rms: &'a [f32],
    /// `[H, D]`, `[D, H]`, `[H, D]`.
    pub w1: &'a [f32],
    pub w2: &'a [f32],
    pub w3: &'a [f32],
}

/// Bakes `data` (row-major `shape`) as a BLOBFILE constant named `name`.
pub(crate) fn bake(g: &mut Gen, name: &str, shape: &[usize], data: &[f32]) -> Var {
    let blob = g.weights.add_tensor(name, shape, data);
    g.b.constant(name, blob)
}

/// RMSNorm over the channels of `x: [C, T]` (fp16): returns `(x · r · gain, r)` with
/// `r = (mean_c x² + eps)^(-1/2)` `[1, T]`. `pow(·, -0.5)`, not `rsqrt`: the ANE is
/// reported to reject `rsqrt`/`sqrt` after a reduction (see the lint).
pub(crate) fn rmsnorm_in(g: &mut Gen, name: &str, x: &Var, gain: &Var, eps: f32) -> (Var, Var) {
    let r = inv_rms(g, name, x, eps);
    let xr = g.b.mul(&format!("{name}_xr"), x, &r);
    let y = g.b.mul(&format!("{name}_y"), &xr, gain);
    (y, r)
}

/// `(mean_c x² + eps)^(-1/2)` of `x: [C, T]`, as `[1, T]`.
fn inv_rms(g: &mut Gen, name: &str, x: &Var, eps: f32) -> Var {
    let sq = g.b.mul(&format!("{name}_sq"), x, x);
    let ms = g.b.reduce_mean(&format!("{name}_ms"), &sq, &[2], true); // [1, 1, 1, T]
    let e = g.b.scalar(DType::Fp16, eps as f64);
    let mse = g.b.add(&format!("{name}_mse"), &ms, &e);
    let p = g.b.scalar(DType::Fp16, -0.5);
    g.b.pow(&format!("{name}_r"), &mse, &p)
}

/// Rotates the interleaved pairs of `x: [heads·hd, T]` by the angles whose cosines and
/// sines are `cos`, `sin` (`[hd/2, T]`); `inverse` rotates by the opposite angles (the
/// backward of the rotation, which is orthogonal). Elementwise only, no `concat`.
#[allow(clippy::too_many_arguments)] // the value, its head split, the two tables, the direction
pub(crate) fn rope(
    g: &mut Gen,
    name: &str,
    x: &Var,
    heads: usize,
    hd: usize,
    cos: &Var,
    sin: &Var,
    inverse: bool,
) -> Var {
    let (h, p, t) = (heads as i64, (hd / 2) as i64, x.ty.shape[3] as i64);
    let x4 = g.b.reshape(&format!("{name}_4"), x, &[h, p, 2, t]); // [h, p, 2, T]
    let e = g.b.slice_by_size(&format!("{name}_e"), &x4, &[0, 0, 0, 0], &[h, p, 1, t]);
    let o = g.b.slice_by_size(&format!("{name}_o"), &x4, &[0, 0, 1, 0], &[h, p, 1, t]);
    let c = g.b.reshape(&format!("{name}_c"), cos, &[1, p, 1, t]);
    let s = g.b.reshape(&format!("{name}_s"), sin, &[1, p, 1, t]);
    let ec = g.b.mul(&format!("{name}_ec"), &e, &c);
    let es = g.b.mul(&format!("{name}_es"), &e, &s);
    let oc = g.b.mul(&format!("{name}_oc"), &o, &c);
    let os = g.b.mul(&format!("{name}_os"), &o, &s);
    // Forward: (e, o) → (e·c − o·s, e·s + o·c); inverse: (e·c + o·s, o·c − e·s).
    let (re, ro) = if inverse {
        (g.b.add(&format!("{name}_re"), &ec, &os), g.b.sub(&format!("{name}_ro"), &oc, &es))
    } else {
        (g.b.sub(&format!("{name}_re"), &ec, &os), g.b.add(&format!("{name}_ro"), &es, &oc))
    };
    // Interleave back: [h, p, 1, T] ⊙ [1, 1, 2, 1] → [h, p, 2, T].
    let pair = TensorType::new(DType::Fp16, vec![1, 1, 2, 1]);
    let first = g.b.literal(Value::floats(pair.clone(), vec![1.0, 0.0]));
    let second = g.b.literal(Value::floats(pair, vec![0.0, 1.0]));
    let re2 = g.b.mul(&format!("{name}_re2"), &re, &first);
    let ro2 = g.b.mul(&format!("{name}_ro2"), &ro, &second);
    let r4 = g.b.add(&format!("{name}_r4"), &re2, &ro2);
    g.b.reshape(name, &r4, &[1, 1, h * 2 * p, t])
}

/// Fused attention forward of one layer: RMSNorm → QKV (+ biases) → RoPE → causal
/// attention (explicit matmul, scale, additive mask, softmax, matmul: the ANE's
/// `scaled_dot_product_attention` ignores masks) → Wo.
///
/// Input `x: [D, T + 2T]` = the residual stream `x [D, T]`, then the RoPE tables
/// `cos`, `sin` (`[hd/2, T]`, column `t` at position `t % seq`). Outputs, all `[C, T]`:
/// `xn` (the normed input, for dW on the CPU), `r` (`[1, T]`, its inverse RMS), `q`,
/// `k` (rotated), `v`, `o` (attention output before Wo) and `y = Wo · o`.
pub fn attention_forward(
    d: &LayerDims,
    batch: usize,
    seq: usize,
    eps: f32,
    w: &AttentionWeights<'_>,
    target: impl Into<Target>,
) -> mil::Result<KernelDef> {
    let (dim, kv, hd) = (d.dim, d.kv_dim(), d.head_dim());
    let t = batch * seq;
    let mut g = Gen::new(target);
    g.surface("x", dim, &[("x", dim, t), ("cos", hd / 2, t), ("sin", hd / 2, t)]);
    let x = g.block("x");
    let cos = g.block("cos");
    let sin = g.block("sin");
    let gain = bake(&mut g, "rms_att", &[1, 1, dim, 1], w.rms);
    let (xn, r) = rmsnorm_in(&mut g, "norm", &x, &gain, eps);

    // One GEMM for the three projections: Wq, Wk, Wv stacked as [D + 2KV, D].
    let wqkv: Vec<f32> = [w.wq, w.wk, w.wv].concat();
    let wqkv = bake(&mut g, "wqkv", &[1, 1, dim + 2 * kv, dim], &wqkv);
    let qkv = g.b.matmul("qkv", &wqkv, &xn, false, false); // [D + 2KV, T]
    let parts = g.split_rows("qkv_parts", &qkv, &[dim, kv, kv]);
    let (mut q, mut k, mut v) = (parts[0].clone(), parts[1].clone(), parts[2].clone());
    if let Some((bq, bk, bv)) = w.bias {
        let bq = bake(&mut g, "bq", &[1, 1, dim, 1], bq);
        let bk = bake(&mut g, "bk", &[1, 1, kv, 1], bk);
        let bv = bake(&mut g, "bv", &[1, 1, kv, 1], bv);
        q = g.b.add("q_b", &q, &bq);
        k = g.b.add("k_b", &k, &bk);
        v = g.b.add("v_b", &v, &bv);
    }
    let q = rope(&mut g, "q_rot", &q, d.n_heads, hd, &cos, &sin, false);
    let k = rope(&mut g, "k_rot", &k, d.n_kv_heads, hd, &cos, &sin, false);

    let mask = causal_mask(&mut g, seq, d.group());
    let h = Heads::new(d, batch, seq);
    let qh = h.queries(&mut g, "qh", &q); // [B, nkv, g·S, hd]
    let kh = h.kv_rows(&mut g, "kh", &k); // [B, nkv, S, hd]
    let vh = h.kv_rows(&mut g, "vh", &v);
    let (_, probs) = attention_probs(&mut g, &qh, &kh, &mask, hd);
    let oh = g.b.matmul("oh", &probs, &vh, false, false); // [B, nkv, g·S, hd]
    let o = h.merge_queries(&mut g, "o2", &oh); // [D, T]
    let wo = bake(&mut g, "wo", &[1, 1, dim, dim], w.wo);
    let y = g.b.matmul("y2", &wo, &o, false, false);
    g.output("xn", &xn);
    g.output("r", &r);
    g.output("q", &q);
    g.output("k", &k);
    g.output("v", &v);
    g.output("o", &o);
    g.output("y", &y);
    g.finish("static_attention_forward")
}

/// Fused SwiGLU FFN of one layer: RMSNorm → `h1 = W1·xn`, `h3 = W3·xn` (one GEMM) →
/// `y = W2 · (silu(h1) ⊙ h3)`. Input `x: [D, T]`, the residual stream after attention.
/// Outputs `xn [D, T]`, `r [1, T]`, `h1`, `h3` (`[H, T]`, for the backward), `y [D, T]`.
pub fn ffn_forward(
    d: &LayerDims,
    t: usize,
    eps: f32,
    w: &FfnWeights<'_>,
    target: impl Into<Target>,
) -> mil::Result<KernelDef> {
    let (dim, hid) = (d.dim, d.hidden);
    let mut g = Gen::new(target);
    g.surface("x", dim, &[("x", dim, t)]);
    let x = g.block("x");
    let gain = bake(&mut g, "rms_ffn", &[1, 1, dim, 1], w.rms);
    let (xn, r) = rmsnorm_in(&mut g, "norm", &x, &gain, eps);
    let w13: Vec<f32> = [w.w1, w.w3].concat();
    let w13 = bake(&mut g, "w13", &[1, 1, 2 * hid, dim], &w13);
    let h13 = g.b.matmul("h13", &w13, &xn, false, false); // [2H, T]
    let parts = g.split_rows("h13_parts", &h13, &[hid, hid]);
    let (h1, h3) = (&parts[0], &parts[1]);
    let act = g.b.silu("act", h1);
    let gate = g.b.mul("gate", &act, h3);
    let w2 = bake(&mut g, "w2", &[1, 1, dim, hid], w.w2);
    let y = g.b.matmul("y2", &w2, &gate, false, false);
    g.output("xn", &xn);
    g.output("r", &r);
    g.output_rows(&h13, &[("h1", hid), ("h3", hid)]);
    g.output("y", &y);
    g.finish("static_ffn_forward")
}

/// Backward of the SwiGLU FFN with baked weights. Inputs `dy: [D, T]` (the gradient at
/// the FFN's output) and `h: [H, 2T]` = `h1`, `h3` from the forward. Outputs `dx [D, T]`
/// (at the normed input), `dh1`, `dh3`, `gate` (`[H, T]`, for dW on the CPU).
pub fn ffn_backward(d: &LayerDims, t: usize, w: &FfnWeights<'_>, target: impl Into<Target>) -> mil::Result<KernelDef> {
    let (dim, hid) = (d.dim, d.hidden);
    let mut g = Gen::new(target);
    g.surface("dy", dim, &[("dy", dim, t)]);
    g.surface("h", hid, &[("h1", hid, t), ("h3", hid, t)]);
    let dy = g.block("dy");
    let h1 = g.block("h1");
    let h3 = g.block("h3");
    let w2 = bake(&mut g, "w2", &[1, 1, dim, hid], w.w2);
    let dgate = g.b.matmul("dgate", &w2, &dy, true, false); // [H, T]
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
    let w1 = bake(&mut g, "w1", &[1, 1, hid, dim], w.w1);
    let w3 = bake(&mut g, "w3", &[1, 1, hid, dim], w.w3);
    let dx1 = g.b.matmul("dx1", &w1, &dh1, true, false);
    let dx3 = g.b.matmul("dx3", &w3, &dh3, true, false);
    let dx = g.b.add("dx2", &dx1, &dx3);
    g.output("dx", &dx);
    g.output("dh1", &dh1);
    g.output("dh3", &dh3);
    g.output("gate", &gate);
    g.finish("static_ffn_backward")
}

/// The weight-bearing part of attention backward: `do = Woᵀ · dy`. Input `dy: [D, T]`,
/// output `do [D, T]` (the gradient at the attention output).
pub fn attention_backward_wo(d: &LayerDims, t: usize, wo: &[f32], target: impl Into<Target>) -> mil::Result<KernelDef> {
    let dim = d.dim;
    let mut g = Gen::new(target);
    g.surface("dy", dim, &[("dy", dim, t)]);
    let dy = g.block("dy");
    let wo = bake(&mut g, "wo", &[1, 1, dim, dim], wo);
    let d_o = g.b.matmul("do2", &wo, &dy, true, false);
    g.output("do", &d_o);
    g.finish("static_attention_backward_wo")
}

/// The weight-free part of attention backward, compiled once for every layer and step:
/// recomputes `P = softmax(q·kᵀ/√hd + mask)`, then `dV = Pᵀ·dO`, `dP = dO·Vᵀ`, the
/// softmax backward `dS = P ⊙ (dP − Σ dP⊙P)`, `dQ = dS·K`, `dK = dSᵀ·Q`, and RoPE's
/// backward, so `dq`, `dk` come out at the *unrotated* projections.
///
/// Inputs `do: [D, 3T + 2T]` = `do`, the rotated queries `q`, the forward's attention
/// output `o`, then the RoPE tables
/// `cos`, `sin` (`[hd/2, T]`); `kv: [KV, 2T]` = rotated keys, values. Outputs `dq [D, T]`,
/// `dk [KV, T]`, `dv [KV, T]`; with grouped-query attention the query heads sharing a KV
/// head sum their gradients into it.
pub fn attention_backward_free(
    d: &LayerDims,
    batch: usize,
    seq: usize,
    target: impl Into<Target>,
) -> mil::Result<KernelDef> {
    let (dim, kv, hd) = (d.dim, d.kv_dim(), d.head_dim());
    let t = batch * seq;
    let h = Heads::new(d, batch, seq);
    let mut g = Gen::new(target);
    g.surface("do", dim, &[("do", dim, t), ("q", dim, t), ("o", dim, t), ("cos", hd / 2, t), ("sin", hd / 2, t)]);
    g.surface("kv", kv, &[("k", kv, t), ("v", kv, t)]);
    let d_o = g.block("do");
    let q = g.block("q");
    let o = g.block("o");
    let cos = g.block("cos");
    let sin = g.block("sin");
    let k = g.block("k");
    let v = g.block("v");
    let (dqh, dkh, dvh) = attention_grads(&mut g, &h, d.group(), hd, seq, [&q, &k, &v, &o, &d_o]);
    let dq_rot = h.merge_queries(&mut g, "dq_rot", &dqh); // [D, T]
    let dk_rot = h.merge_kv(&mut g, "dk_rot", &dkh); // [KV, T]
    let dv = h.merge_kv(&mut g, "dv2", &dvh);
    let dq = rope(&mut g, "dq2", &dq_rot, d.n_heads, hd, &cos, &sin, true);
    let dk = rope(&mut g, "dk2", &dk_rot, d.n_kv_heads, hd, &cos, &sin, true);
    g.output("dq", &dq);
    g.output("dk", &dk);
    g.output("dv", &dv);
    g.finish("static_attention_backward_free")
}

/// Backward of the QKV projection with baked weights: `dx = Wqᵀ·dq + Wkᵀ·dk + Wvᵀ·dv`.
/// Inputs `dq: [D, T]`, `dkv: [KV, 2T]` = `dk`, `dv` (at the unrotated projections).
/// Output `dx [D, T]` (at the normed input).
pub fn qkv_backward(
    d: &LayerDims,
    t: usize,
    w: &AttentionWeights<'_>,
    target: impl Into<Target>,
) -> mil::Result<KernelDef> {
    let (dim, kv) = (d.dim, d.kv_dim());
    let mut g = Gen::new(target);
    g.surface("dq", dim, &[("dq", dim, t)]);
    g.surface("dkv", kv, &[("dk", kv, t), ("dv", kv, t)]);
    let dq = g.block("dq");
    let dk = g.block("dk");
    let dv = g.block("dv");
    let wq = bake(&mut g, "wq", &[1, 1, dim, dim], w.wq);
    let wk = bake(&mut g, "wk", &[1, 1, kv, dim], w.wk);
    let wv = bake(&mut g, "wv", &[1, 1, kv, dim], w.wv);
    let a = g.b.matmul("dxq", &wq, &dq, true, false);
    let b = g.b.matmul("dxk", &wk, &dk, true, false);
    let c = g.b.matmul("dxv", &wv, &dv, true, false);
    let ab = g.b.add("dxqk", &a, &b);
    let dx = g.b.add("dx2", &ab, &c);
    g.output("dx", &dx);
    g.finish("static_qkv_backward")
}

/// ANE extra: RMSNorm with a baked gain (the final norm). Input `x: [C, T]`; outputs
/// `xn [C, T]` and `r [1, T]` (the inverse RMS).
pub fn rmsnorm(channels: usize, t: usize, eps: f32, gain: &[f32], target: impl Into<Target>) -> mil::Result<KernelDef> {
    let mut g = Gen::new(target);
    g.surface("x", channels, &[("x", channels, t)]);
    let x = g.block("x");
    let gain = bake(&mut g, "rms", &[1, 1, channels, 1], gain);
    let (xn, r) = rmsnorm_in(&mut g, "norm", &x, &gain, eps);
    g.output("xn", &xn);
    g.output("r", &r);
    g.finish("extra_rmsnorm")
}

/// ANE extra: the backward of RMSNorm, weight-free (one kernel for every norm of the
/// model: the gain comes in the input). With `r = (mean x² + eps)^(-1/2)` recomputed and
/// `gy = gain ⊙ dy`: `dx = r·gy − x·r³/C·Σ_c gy⊙x` and `dgain = Σ_t dy⊙x·r`.
///
/// Input `dy: [C, 2T + 1]` = `dy`, `x` (the norm's input), then the gain as one column.
/// Outputs `dx [C, T]` (the norm's contribution, which the caller adds to the residual
/// gradient) and `dgain [C, 1]`.
pub fn rmsnorm_backward(channels: usize, t: usize, eps: f32, target: impl Into<Target>) -> mil::Result<KernelDef> {
    let mut g = Gen::new(target);
    g.surface("dy", channels, &[("dy", channels, t), ("x", channels, t), ("gain", channels, 1)]);
    let dy = g.block("dy");
    let x = g.block("x");
    let gain = g.block("gain"); // [C, 1]
    let r = inv_rms(&mut g, "norm", &x, eps); // [1, T]
    let gy = g.b.mul("gy", &dy, &gain);
    let gyx = g.b.mul("gyx", &gy, &x);
    let dot = g.b.reduce_sum("dot", &gyx, &[2], true); // [1, 1, 1, T]
    let r2 = g.b.mul("r2", &r, &r);
    let r3 = g.b.mul("r3", &r2, &r);
    let coef0 = g.b.mul("coef0", &dot, &r3);
    let coef = g.b.scale("coef", &coef0, 1.0 / channels as f64);
    let a = g.b.mul("dx_a", &gy, &r);
    let bb = g.b.mul("dx_b", &x, &coef);
    let dx = g.b.sub("dx2", &a, &bb);
    let dyx = g.b.mul("dyx", &dy, &x);
    let dyxr = g.b.mul("dyxr", &dyx, &r);
    let dgain = g.b.reduce_sum("dgain2", &dyxr, &[3], true); // [1, 1, C, 1]
    g.output("dx", &dx);
    g.output("dgain", &dgain);
    g.finish("extra_rmsnorm_backward")
}

/// ANE extra: one vocabulary chunk of the classifier and its softmax. `wcls` holds the
/// chunk's `rows` rows of the classifier (`[rows, D]`). Input `x: [D, T]` (the final
/// normed stream). Outputs `p [rows, T]`, the softmax over this chunk's logits, and,
/// when `with_lse` (the vocabulary spans several chunks), `lse [1, T]`, the log-sum-exp
/// of the chunk's logits, with which the caller rescales every chunk to the softmax over
/// the whole vocabulary: `p_full = p · exp(lse − logsumexp_chunks(lse))`.
pub fn classifier_softmax(
    dim: usize,
    t: usize,
    rows: usize,
    wcls: &[f32],
    with_lse: bool,
    target: impl Into<Target>,
) -> mil::Result<KernelDef> {
    let mut g = Gen::new(target);
    g.surface("x", dim, &[("x", dim, t)]);
    let x = g.block("x");
    let w = bake(&mut g, "wcls", &[1, 1, rows, dim], wcls);
    let logits = g.b.matmul("logits", &w, &x, false, false); // [rows, T]
    let p = g.b.softmax("p2", &logits, 2);
    g.output("p", &p);
    if with_lse {
        let m = g.b.reduce_max("m", &logits, &[2], true); // [1, 1, 1, T]
        let shifted = g.b.sub("shifted", &logits, &m);
        let e = g.b.exp("e", &shifted);
        let s = g.b.reduce_sum("s", &e, &[2], true);
        let ls = g.b.op1("log", "ls", vec![("x", (&s).into())]);
        let lse = g.b.add("lse2", &ls, &m);
        g.output("lse", &lse);
    }
    g.finish("extra_classifier_softmax")
}

/// Rows of the vocabulary per classifier kernel: as few chunks as keep every dimension
/// at most `limit` ([`mil::lint::MAX_DIMENSION`] for the ANE), of near-equal size.
pub fn vocab_chunks(vocab: usize, limit: usize) -> Vec<Range<usize>> {
    assert!(limit > 0, "the chunk limit must be positive");
    let n = vocab.div_ceil(limit).max(1);
    let size = vocab.div_ceil(n);
    (0..n).map(|i| i * size..((i + 1) * size).min(vocab)).filter(|r| !r.is_empty()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vocab_chunks_cover_the_vocabulary_within_the_limit() {
        assert_eq!(vocab_chunks(32000, 65536), vec![0..32000]);
        assert_eq!(vocab_chunks(150_000, 65536), vec![0..50000, 50000..100000, 100000..150000]);
        assert_eq!(vocab_chunks(512, 200), vec![0..171, 171..342, 342..512]);
        for (v, limit) in [(1, 1), (7, 3), (65537, 65536), (100, 100)] {
            let c = vocab_chunks(v, limit);
            assert_eq!(c.first().unwrap().start, 0);
            assert_eq!(c.last().unwrap().end, v);
            assert!(c.windows(2).all(|w| w[0].end == w[1].start));
            assert!(c.iter().all(|r| r.len() <= limit), "{v} {limit}: {c:?}");
        }
    }
}
