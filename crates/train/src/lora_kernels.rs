//! Kernel generators of the LoRA pipeline: the frozen base weights **baked in** as
//! BLOBFILE constants (as [`crate::static_kernels`]), the adapters `A`, `B` **in the
//! input surface** (as [`crate::kernels`] carries weights). The base never changes, so
//! every kernel is compiled once for the whole run; only the small adapters travel.
//!
//! | kernel | baked | adapters in the surface | computes |
//! |---|---|---|---|
//! | [`attention_forward`] | RMSNorm gain, Wq/Wk/Wv (+ biases), Wo | q, k, v, o | RMSNorm, QKV + `B(Ax)`, RoPE, causal attention, Wo + `B(Ax)` |
//! | [`ffn_forward`] | RMSNorm gain, W1/W3, W2 | gate, up, down | RMSNorm, SwiGLU with the adapters' terms |
//! | [`ffn_backward`] | W1, W2, W3 | gate, up, down | dx through the frozen base and the adapters: `Wᵀdy + Aᵀ(Bᵀdy)` |
//! | [`attention_backward_wo`] | Wo | o | `do = Woᵀdy + Aᵀ(Bᵀdy)` |
//! | `static_kernels::attention_backward_free` | none | none | softmax backward, dQ, dK, dV, RoPE backward (reused) |
//! | [`qkv_backward`] | Wq, Wk, Wv | q, k, v | `dx = Σ Wᵀd + Aᵀ(Bᵀd)` |
//! | [`adapter_grads`] | none (one kernel for every layer) | every target of a group | `dA = (Bᵀdy)·xᵀ`, `dBᵀ = (Ax)·dyᵀ` |
//!
//! No kernel computes a gradient of the base: the backward kernels give only `dx`.
//!
//! Conventions, chosen so the kernels need no scalar besides the model's:
//! - **The scale is folded into B by the host**: the `B` block holds `s·B`, so the forward
//!   adds `(sB)(Ax)`, `dx` gets `Aᵀ((sB)ᵀdy)` and `dA = (sB)ᵀ·dy·xᵀ` exactly; only `dB`
//!   needs `s`, which the host applies (in f32) when it reads `dBᵀ = (Ax)·dyᵀ`.
//! - **The rank is padded to a multiple of 32** ([`padded_rank`]) with zero rows of `A`
//!   and zero columns of `B`: the ANE reportedly returns silent zeros for a matmul inner
//!   dimension that is not a multiple of 32 (the lint's `matmul-inner-dim`); the padding
//!   is exact (it adds zeros) and its gradients are zero, which the host ignores.
//! - Adapter blocks: `A` as `[rp, in]`, `B` as `[out, rp]` (PEFT's `lora_A.weight`,
//!   `lora_B.weight` layouts), side by side with the activations on the spatial axis.
//! - **Dropout** (PEFT's `lora_dropout`, on the adapter branch's input only): with
//!   [`Adapters::dropout`] every target gets a mask block `m_{t} [in, T]` holding `0` or
//!   `1/(1−p)`, drawn by the host (seeded per step, so a resumed run draws the same); the
//!   branch computes `(sB)·A·(m⊙x)`, its `dx` term is `m⊙(Aᵀ·(sB)ᵀ·dy)`, and the gradients
//!   use `m⊙x`. Without dropout no mask block exists and the programs are as before.

use mil::Var;

use crate::kernels::{attention_probs, causal_mask, Gen, Heads, KernelDef, LayerDims, Target};
use crate::lora::LoraTarget;
use crate::static_kernels::{bake, rmsnorm_in, rope, AttentionWeights, FfnWeights};

/// The ANE's reported matmul inner-dimension multiple (`mil::lint`).
const RANK_MULTIPLE: usize = 32;

/// The rank as the kernels carry it: `rank` rounded up to a multiple of 32.
pub fn padded_rank(rank: usize) -> usize {
    rank.div_ceil(RANK_MULTIPLE) * RANK_MULTIPLE
}

/// The adapters a kernel carries: which projections, their rank, and whether each has a
/// dropout mask block.
#[derive(Clone, Copy, Debug)]
pub struct Adapters<'a> {
    pub targets: &'a [LoraTarget],
    pub rank: usize,
    /// A mask block `m_{t} [in, T]` per target (dropout probability above zero).
    pub dropout: bool,
}

impl<'a> Adapters<'a> {
    /// `targets` of rank `rank`, without dropout.
    pub fn new(targets: &'a [LoraTarget], rank: usize) -> Adapters<'a> {
        Adapters { targets, rank, dropout: false }
    }

    pub fn with_dropout(self, dropout: bool) -> Adapters<'a> {
        Adapters { dropout, ..self }
    }

    fn has(&self, target: LoraTarget) -> bool {
        self.targets.contains(&target)
    }
}

/// Name of the input block holding the dropout mask of `target`'s input.
pub fn m_block(target: LoraTarget) -> &'static str {
    match target {
        LoraTarget::Q => "m_q",
        LoraTarget::K => "m_k",
        LoraTarget::V => "m_v",
        LoraTarget::O => "m_o",
        LoraTarget::Gate => "m_gate",
        LoraTarget::Up => "m_up",
        LoraTarget::Down => "m_down",
    }
}

/// Name of the input block holding `A` of `target`.
pub fn a_block(target: LoraTarget) -> &'static str {
    match target {
        LoraTarget::Q => "a_q",
        LoraTarget::K => "a_k",
        LoraTarget::V => "a_v",
        LoraTarget::O => "a_o",
        LoraTarget::Gate => "a_gate",
        LoraTarget::Up => "a_up",
        LoraTarget::Down => "a_down",
    }
}

/// Name of the input block holding `s·B` of `target`.
pub fn b_block(target: LoraTarget) -> &'static str {
    match target {
        LoraTarget::Q => "b_q",
        LoraTarget::K => "b_k",
        LoraTarget::V => "b_v",
        LoraTarget::O => "b_o",
        LoraTarget::Gate => "b_gate",
        LoraTarget::Up => "b_up",
        LoraTarget::Down => "b_down",
    }
}

/// The input activation `x` of `target`'s projection, as the gradient kernel's block name.
pub fn x_block(target: LoraTarget) -> &'static str {
    match target {
        LoraTarget::Q | LoraTarget::K | LoraTarget::V => "xn1",
        LoraTarget::O => "o",
        LoraTarget::Gate | LoraTarget::Up => "xn2",
        LoraTarget::Down => "gate",
    }
}

/// The gradient `dy` at `target`'s projection output, as the gradient kernel's block name.
pub fn dy_block(target: LoraTarget) -> &'static str {
    match target {
        LoraTarget::Q => "dq",
        LoraTarget::K => "dk",
        LoraTarget::V => "dv",
        LoraTarget::O => "dy_attn",
        LoraTarget::Gate => "dh1",
        LoraTarget::Up => "dh3",
        LoraTarget::Down => "dy_ffn",
    }
}

/// Rows of `x_block(target)` and of `dy_block(target)`.
pub fn io_rows(d: &LayerDims, target: LoraTarget) -> (usize, usize) {
    let (dim, kv, hid) = (d.dim, d.kv_dim(), d.hidden);
    match target {
        LoraTarget::Q | LoraTarget::O => (dim, dim),
        LoraTarget::K | LoraTarget::V => (dim, kv),
        LoraTarget::Gate | LoraTarget::Up => (dim, hid),
        LoraTarget::Down => (hid, dim),
    }
}

/// The adapter blocks of `ad`'s targets (those `keep` selects): `A [rp, in]`,
/// `B [out, rp]`, and with dropout the mask `[in, T]`.
fn adapter_blocks(
    d: &LayerDims,
    t_len: usize,
    ad: &Adapters<'_>,
    keep: impl Fn(LoraTarget) -> bool,
) -> Vec<(&'static str, usize, usize)> {
    let rp = padded_rank(ad.rank);
    let mut blocks = Vec::new();
    for &t in ad.targets.iter().filter(|&&t| keep(t)) {
        let (inp, out) = io_rows(d, t);
        blocks.push((a_block(t), rp, inp));
        blocks.push((b_block(t), out, rp));
        if ad.dropout {
            blocks.push((m_block(t), inp, t_len));
        }
    }
    blocks
}

/// The adapter branch's input: `m⊙x` with dropout, else `x`.
fn dropped(g: &mut Gen, ad: &Adapters<'_>, target: LoraTarget, x: &Var) -> Var {
    if !ad.dropout {
        return x.clone();
    }
    let m = g.block(m_block(target));
    g.b.mul(&format!("lora_{}_xdrop", target.name()), x, &m)
}

/// `(sB)·(A·x)` for `x: [in, T]` → `[out, T]` (`x` after dropout).
fn adapter_forward(g: &mut Gen, ad: &Adapters<'_>, target: LoraTarget, x: &Var) -> Var {
    let x = dropped(g, ad, target, x);
    let a = g.block(a_block(target));
    let b = g.block(b_block(target));
    let n = target.name();
    let u = g.b.matmul(&format!("lora_{n}_ax"), &a, &x, false, false); // [rp, T]
    g.b.matmul(&format!("lora_{n}_bax"), &b, &u, false, false) // [out, T]
}

/// `Aᵀ·((sB)ᵀ·dy)` for `dy: [out, T]` → `[in, T]`: the adapter's part of `dx` (times the
/// dropout mask, the derivative of `m⊙x`).
fn adapter_backward(g: &mut Gen, ad: &Adapters<'_>, target: LoraTarget, dy: &Var) -> Var {
    let a = g.block(a_block(target));
    let b = g.block(b_block(target));
    let n = target.name();
    let v = g.b.matmul(&format!("lora_{n}_bdy"), &b, dy, true, false); // [rp, T]
    let dx = g.b.matmul(&format!("lora_{n}_dx"), &a, &v, true, false); // [in, T]
    if !ad.dropout {
        return dx;
    }
    let m = g.block(m_block(target));
    g.b.mul(&format!("lora_{n}_dxdrop"), &dx, &m)
}

/// `base + adapter` when `target` is adapted, else `base`.
fn plus_adapter_forward(g: &mut Gen, ad: &Adapters<'_>, target: LoraTarget, base: Var, x: &Var) -> Var {
    if !ad.has(target) {
        return base;
    }
    let delta = adapter_forward(g, ad, target, x);
    g.b.add(&format!("lora_{}_y", target.name()), &base, &delta)
}

/// Adds the adapter's `dx` term of `target` (from `dy`) to `acc`, when adapted.
fn plus_adapter_backward(g: &mut Gen, ad: &Adapters<'_>, target: LoraTarget, acc: Var, dy: &Var) -> Var {
    if !ad.has(target) {
        return acc;
    }
    let delta = adapter_backward(g, ad, target, dy);
    g.b.add(&format!("lora_{}_dxsum", target.name()), &acc, &delta)
}

/// Attention forward of one layer with the frozen base baked in and the adapters of
/// q, k, v, o (those in `targets`) from the input. Input `x: [D, …]` = the residual
/// stream `x [D, T]`, the RoPE tables `cos`, `sin` (`[hd/2, T]`), then the adapters.
/// Outputs as `static_kernels::attention_forward`: `xn`, `r`, `q`, `k` (rotated), `v`,
/// `o`, `y`.
#[allow(clippy::too_many_arguments)] // shapes, the baked weights, the adapters, the target
pub fn attention_forward(
    d: &LayerDims,
    batch: usize,
    seq: usize,
    eps: f32,
    w: &AttentionWeights<'_>,
    ad: &Adapters<'_>,
    target: impl Into<Target>,
) -> mil::Result<KernelDef> {
    let (dim, kv, hd) = (d.dim, d.kv_dim(), d.head_dim());
    let (t, rp) = (batch * seq, padded_rank(ad.rank));
    let mut g = Gen::new(target);
    let mut blocks = vec![("x", dim, t), ("cos", hd / 2, t), ("sin", hd / 2, t)];
    blocks.extend(adapter_blocks(d, t, ad, LoraTarget::is_attention));
    g.surface("x", dim.max(rp), &blocks);
    let x = g.block("x");
    let cos = g.block("cos");
    let sin = g.block("sin");
    let gain = bake(&mut g, "rms_att", &[1, 1, dim, 1], w.rms);
    let (xn, r) = rmsnorm_in(&mut g, "norm", &x, &gain, eps);
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
    let q = plus_adapter_forward(&mut g, ad, LoraTarget::Q, q, &xn);
    let k = plus_adapter_forward(&mut g, ad, LoraTarget::K, k, &xn);
    let v = plus_adapter_forward(&mut g, ad, LoraTarget::V, v, &xn);
    let q = rope(&mut g, "q_rot", &q, d.n_heads, hd, &cos, &sin, false);
    let k = rope(&mut g, "k_rot", &k, d.n_kv_heads, hd, &cos, &sin, false);
    let mask = causal_mask(&mut g, seq, d.group());
    let h = Heads::new(d, batch, seq);
    let qh = h.queries(&mut g, "qh", &q);
    let kh = h.kv_rows(&mut g, "kh", &k);
    let vh = h.kv_rows(&mut g, "vh", &v);
    let (_, probs) = attention_probs(&mut g, &qh, &kh, &mask, hd);
    let oh = g.b.matmul("oh", &probs, &vh, false, false);
    let o = h.merge_queries(&mut g, "o2", &oh); // [D, T]
    let wo = bake(&mut g, "wo", &[1, 1, dim, dim], w.wo);
    let y = g.b.matmul("y_base", &wo, &o, false, false);
    let y = plus_adapter_forward(&mut g, ad, LoraTarget::O, y, &o);
    g.output("xn", &xn);
    g.output("r", &r);
    g.output("q", &q);
    g.output("k", &k);
    g.output("v", &v);
    g.output("o", &o);
    g.output("y", &y);
    g.finish("lora_attention_forward")
}

/// SwiGLU FFN forward of one layer, base baked, adapters of gate, up, down from the
/// input. Input `x: [D, T]` then the adapters. Outputs `xn`, `r`, `h1`, `h3` (`[H, T]`,
/// with the adapters' terms), `y`.
#[allow(clippy::too_many_arguments)] // shapes, the baked weights, the adapters, the target
pub fn ffn_forward(
    d: &LayerDims,
    t: usize,
    eps: f32,
    w: &FfnWeights<'_>,
    ad: &Adapters<'_>,
    target: impl Into<Target>,
) -> mil::Result<KernelDef> {
    let (dim, hid, rp) = (d.dim, d.hidden, padded_rank(ad.rank));
    let mut g = Gen::new(target);
    let mut blocks = vec![("x", dim, t)];
    let ffn = |t: LoraTarget| !t.is_attention();
    blocks.extend(adapter_blocks(d, t, ad, ffn));
    let channels = if ad.targets.iter().any(|&t| ffn(t)) { dim.max(hid).max(rp) } else { dim };
    g.surface("x", channels, &blocks);
    let x = g.block("x");
    let gain = bake(&mut g, "rms_ffn", &[1, 1, dim, 1], w.rms);
    let (xn, r) = rmsnorm_in(&mut g, "norm", &x, &gain, eps);
    let w13: Vec<f32> = [w.w1, w.w3].concat();
    let w13 = bake(&mut g, "w13", &[1, 1, 2 * hid, dim], &w13);
    let h13 = g.b.matmul("h13", &w13, &xn, false, false); // [2H, T]
    let parts = g.split_rows("h13_parts", &h13, &[hid, hid]);
    let h1 = plus_adapter_forward(&mut g, ad, LoraTarget::Gate, parts[0].clone(), &xn);
    let h3 = plus_adapter_forward(&mut g, ad, LoraTarget::Up, parts[1].clone(), &xn);
    let act = g.b.silu("act", &h1);
    let gate = g.b.mul("gate", &act, &h3);
    let w2 = bake(&mut g, "w2", &[1, 1, dim, hid], w.w2);
    let y = g.b.matmul("y_base", &w2, &gate, false, false);
    let y = plus_adapter_forward(&mut g, ad, LoraTarget::Down, y, &gate);
    g.output("xn", &xn);
    g.output("r", &r);
    g.output("h1", &h1);
    g.output("h3", &h3);
    g.output("y", &y);
    g.finish("lora_ffn_forward")
}

/// Backward of the SwiGLU FFN through the frozen base and the adapters. Inputs `dy
/// [D, T]`, `h1`, `h3` (`[H, T]`, from the forward), then the adapters. Outputs `dx [D, T]`
/// (at the normed input), `dh1`, `dh3`, `gate` (`[H, T]`: the down projection's input,
/// for its adapter's gradient).
pub fn ffn_backward(
    d: &LayerDims,
    t: usize,
    w: &FfnWeights<'_>,
    ad: &Adapters<'_>,
    target: impl Into<Target>,
) -> mil::Result<KernelDef> {
    let (dim, hid, rp) = (d.dim, d.hidden, padded_rank(ad.rank));
    let mut g = Gen::new(target);
    let mut blocks = vec![("dy", dim, t), ("h1", hid, t), ("h3", hid, t)];
    blocks.extend(adapter_blocks(d, t, ad, |t| !t.is_attention()));
    g.surface("dy", dim.max(hid).max(rp), &blocks);
    let dy = g.block("dy");
    let h1 = g.block("h1");
    let h3 = g.block("h3");
    let w2 = bake(&mut g, "w2", &[1, 1, dim, hid], w.w2);
    let dgate = g.b.matmul("dgate_base", &w2, &dy, true, false); // [H, T]
    let dgate = plus_adapter_backward(&mut g, ad, LoraTarget::Down, dgate, &dy);
    // silu(h1) = h1·σ(h1); silu'(h1) = σ(h1)·(1 + h1·(1 − σ(h1))).
    let sig = g.b.sigmoid("sig", &h1);
    let act = g.b.mul("act", &h1, &sig);
    let gate = g.b.mul("gate2", &act, &h3);
    let dh3 = g.b.mul("dh3_2", &dgate, &act);
    let one = g.b.scalar(mil::DType::Fp16, 1.0);
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
    let dx = g.b.add("dx_base", &dx1, &dx3);
    let dx = plus_adapter_backward(&mut g, ad, LoraTarget::Gate, dx, &dh1);
    let dx = plus_adapter_backward(&mut g, ad, LoraTarget::Up, dx, &dh3);
    g.output("dx", &dx);
    g.output("dh1", &dh1);
    g.output("dh3", &dh3);
    g.output("gate", &gate);
    g.finish("lora_ffn_backward")
}

/// `do = Woᵀ·dy` (+ the o adapter's term). Input `dy [D, T]`, then the adapter; output
/// `do [D, T]`.
pub fn attention_backward_wo(
    d: &LayerDims,
    t: usize,
    wo: &[f32],
    ad: &Adapters<'_>,
    target: impl Into<Target>,
) -> mil::Result<KernelDef> {
    let (dim, rp) = (d.dim, padded_rank(ad.rank));
    let mut g = Gen::new(target);
    let mut blocks = vec![("dy", dim, t)];
    blocks.extend(adapter_blocks(d, t, ad, |t| t == LoraTarget::O));
    g.surface("dy", dim.max(rp), &blocks);
    let dy = g.block("dy");
    let wo = bake(&mut g, "wo", &[1, 1, dim, dim], wo);
    let d_o = g.b.matmul("do_base", &wo, &dy, true, false);
    let d_o = plus_adapter_backward(&mut g, ad, LoraTarget::O, d_o, &dy);
    g.output("do", &d_o);
    g.finish("lora_attention_backward_wo")
}

/// `dx = Wqᵀ·dq + Wkᵀ·dk + Wvᵀ·dv` (+ the q, k, v adapters' terms). Inputs `dq [D, T]`,
/// `dk`, `dv` (`[KV, T]`, at the unrotated projections), then the adapters. Output `dx
/// [D, T]` at the normed input.
pub fn qkv_backward(
    d: &LayerDims,
    t: usize,
    w: &AttentionWeights<'_>,
    ad: &Adapters<'_>,
    target: impl Into<Target>,
) -> mil::Result<KernelDef> {
    let (dim, kv, rp) = (d.dim, d.kv_dim(), padded_rank(ad.rank));
    let mut g = Gen::new(target);
    let mut blocks = vec![("dq", dim, t), ("dk", kv, t), ("dv", kv, t)];
    blocks.extend(adapter_blocks(d, t, ad, |t| matches!(t, LoraTarget::Q | LoraTarget::K | LoraTarget::V)));
    g.surface("dq", dim.max(rp), &blocks);
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
    let dx = g.b.add("dx_base", &ab, &c);
    let dx = plus_adapter_backward(&mut g, ad, LoraTarget::Q, dx, &dq);
    let dx = plus_adapter_backward(&mut g, ad, LoraTarget::K, dx, &dk);
    let dx = plus_adapter_backward(&mut g, ad, LoraTarget::V, dx, &dv);
    g.output("dx", &dx);
    g.finish("lora_qkv_backward")
}

/// The adapters' gradients for the `targets` of one group (all attention targets, or all
/// FFN targets), weight-free: one compiled kernel serves every layer and step.
///
/// Input: each target's projection input `x` and output gradient `dy` (blocks named by
/// [`x_block`], [`dy_block`], each once), then the adapters. Outputs, all with `rp`
/// channels and side by side on the spatial axis: `da_{t} [rp, in] = (sB)ᵀ·dy·xᵀ` (the
/// gradient of `A`, exactly) and `dbt_{t} [rp, out] = (A·x)·dyᵀ` (`dBᵀ / s`).
pub fn adapter_grads(d: &LayerDims, t: usize, ad: &Adapters<'_>, target: impl Into<Target>) -> mil::Result<KernelDef> {
    let targets = ad.targets;
    assert!(!targets.is_empty(), "a gradient kernel needs a target");
    let mut g = Gen::new(target);
    let mut blocks: Vec<(&'static str, usize, usize)> = Vec::new();
    for &tg in targets {
        let (x_rows, dy_rows) = io_rows(d, tg);
        for (name, rows) in [(x_block(tg), x_rows), (dy_block(tg), dy_rows)] {
            if !blocks.iter().any(|b| b.0 == name) {
                blocks.push((name, rows, t));
            }
        }
    }
    blocks.extend(adapter_blocks(d, t, ad, |_| true));
    let channels = blocks.iter().map(|b| b.1).max().expect("blocks");
    g.surface("x", channels, &blocks);
    // Each block read once (a block read twice would declare its slice twice).
    let vars: Vec<(&str, Var)> = blocks.iter().map(|b| (b.0, g.block(b.0))).collect();
    let get = |name: &str| vars.iter().find(|v| v.0 == name).expect("declared").1.clone();
    for &tg in targets {
        let n = tg.name();
        let (x, dy, a, b) = (get(x_block(tg)), get(dy_block(tg)), get(a_block(tg)), get(b_block(tg)));
        // With dropout, `x` as the branch saw it: `m⊙x`.
        let x = if ad.dropout { g.b.mul(&format!("g_{n}_xdrop"), &x, &get(m_block(tg))) } else { x };
        let u = g.b.matmul(&format!("g_{n}_ax"), &a, &x, false, false); // [rp, T]
        let v = g.b.matmul(&format!("g_{n}_bdy"), &b, &dy, true, false); // [rp, T]
        let da = g.b.matmul(&format!("g_{n}_da"), &v, &x, false, true); // [rp, in]
        let dbt = g.b.matmul(&format!("g_{n}_dbt"), &u, &dy, false, true); // [rp, out]
        g.output(&format!("da_{n}"), &da);
        g.output(&format!("dbt_{n}"), &dbt);
    }
    g.finish("lora_adapter_grads")
}
