//! Kernel generators: the MIL programs a Llama layer runs on a device.
//!
//! Every kernel here takes its weights **inside its input surface** (the dynamic-weight
//! trick of DESIGN.md): one surface `[1, C, 1, W]` holds the activations in positions
//! `0..T` and the weight matrices (and any other activation) after them, side by side;
//! `W` is padded past the last block to an odd multiple of 32 ([`device::padded_width`]).
//! The program slices them apart and multiplies, on rank-4 values throughout, and
//! returns its results stacked in one output surface — the way the seed's working
//! pipeline runs on the ANE ([`crate::binding`] has the conventions and the layouts). All
//! layers share one compiled kernel, whatever their weights, so a run compiles a handful
//! of programs once.
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
    /// Width of one attention head (`dim / n_heads` unless the model sets it apart,
    /// as Qwen3 does).
    pub head_dim: usize,
}

impl LayerDims {
    /// A layer whose heads are `dim / n_heads` wide (Llama 2, Qwen2).
    pub fn new(dim: usize, hidden: usize, n_heads: usize, n_kv_heads: usize) -> LayerDims {
        LayerDims { dim, hidden, n_heads, n_kv_heads, head_dim: dim / n_heads }
    }
    /// The layer shape of `config`.
    pub fn of(config: &llama::Config) -> LayerDims {
        LayerDims {
            dim: config.dim,
            hidden: config.hidden_dim,
            n_heads: config.n_heads,
            n_kv_heads: config.n_kv_heads,
            head_dim: config.head_dim(),
        }
    }
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }
    /// Width of the queries and of the attention output: `n_heads · head_dim`.
    pub fn q_dim(&self) -> usize {
        self.head_dim * self.n_heads
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

pub use crate::binding::{Block, IoConvention, KernelIo, OutputSlot, SurfaceLayout, Target};

/// A generated kernel: its program, its constant weight files (masks), and where its
/// blocks and outputs sit in its surfaces ([`KernelIo`]).
#[derive(Clone, Debug)]
pub struct KernelDef {
    pub name: &'static str,
    pub program: Program,
    pub weights: Weights,
    pub io: KernelIo,
}

impl KernelDef {
    /// The input surface layouts, in binding order.
    pub fn inputs(&self) -> &[SurfaceLayout] {
        &self.io.inputs
    }
}

/// A declared group of blocks (one surface under [`IoConvention::Multi`]).
struct Group {
    name: String,
    channels: usize,
    blocks: Vec<(&'static str, usize, usize)>,
}

/// A builder that knows the target: it lays the declared blocks out in surfaces by the
/// I/O convention, casts inputs to fp16 on entry and outputs back on exit when the
/// surfaces are fp32, and keeps every value rank 4 (`[1, 1, C, T]` for a channel-major
/// matrix), as every program of the seed's working pipeline is. (Also used by
/// `static_kernels`.)
pub(crate) struct Gen {
    pub(crate) b: FunctionBuilder,
    io: Io,
    target: Target,
    groups: Vec<Group>,
    /// The input surfaces, once the first block is read (the layout is then frozen).
    surfaces: Option<Vec<(SurfaceLayout, Var)>>,
    /// Each output value and the named row groups it holds.
    outputs: Vec<(Vec<(String, usize)>, Var)>,
    pub(crate) weights: Weights,
}

impl Gen {
    pub(crate) fn new(target: impl Into<Target>) -> Gen {
        let target = target.into();
        Gen {
            b: FunctionBuilder::new("main", target.dialect),
            io: Io::for_dialect(target.dialect),
            target,
            groups: Vec::new(),
            surfaces: None,
            outputs: Vec::new(),
            weights: Weights::new(),
        }
    }

    /// Declares a group of blocks laid side by side (each `(name, rows, width)`,
    /// `rows ≤ channels`). Under [`IoConvention::Multi`] the group is one surface named
    /// `name`; under [`IoConvention::Packed`] every group's blocks share one surface.
    /// Declare every group before reading any block.
    pub(crate) fn surface(&mut self, name: &str, channels: usize, blocks: &[(&'static str, usize, usize)]) {
        assert!(self.surfaces.is_none(), "surface `{name}` declared after a block was read");
        self.groups.push(Group { name: name.to_string(), channels, blocks: blocks.to_vec() });
    }

    /// Lays the groups out in surfaces and declares the program's inputs.
    fn layout(&mut self) {
        if self.surfaces.is_some() {
            return;
        }
        let lay = |name: &str, channels: usize, blocks: &mut dyn Iterator<Item = &(&'static str, usize, usize)>| {
            let mut layout = SurfaceLayout { name: name.to_string(), channels, width: 0, blocks: Vec::new() };
            let mut s0 = 0;
            for &(bname, rows, width) in blocks {
                assert!(rows <= channels, "block `{bname}` has {rows} rows, its surface {channels}");
                layout.blocks.push(Block { name: bname, rows, s0, width });
                s0 += width;
            }
            layout.width = device::padded_width(s0);
            layout
        };
        let layouts = match self.target.io {
            IoConvention::Packed => {
                let channels = self.groups.iter().map(|g| g.channels).max().unwrap_or(1);
                let mut all = self.groups.iter().flat_map(|g| g.blocks.iter());
                vec![lay("x", channels, &mut all)]
            }
            IoConvention::Multi => self.groups.iter().map(|g| lay(&g.name, g.channels, &mut g.blocks.iter())).collect(),
        };
        let mut surfaces = Vec::new();
        for layout in layouts {
            let ty = TensorType::surface(self.io.surface_dtype(), layout.channels, layout.width);
            let x = self.b.input(&layout.name, ty);
            let x = match self.io {
                Io::Fp32Cast => self.b.cast(&format!("{}_h", layout.name), &x, DType::Fp16),
                Io::Fp16 => x,
            };
            surfaces.push((layout, x));
        }
        self.surfaces = Some(surfaces);
    }

    /// Block `name` of the input as a `[1, 1, rows, width]` matrix (slice + reshape:
    /// views on the CPU device, no copy).
    pub(crate) fn block(&mut self, name: &str) -> Var {
        self.layout();
        let surfaces = self.surfaces.as_ref().expect("laid out");
        let (layout, surf) = surfaces
            .iter()
            .find(|(l, _)| l.find(name).is_some())
            .unwrap_or_else(|| panic!("no block `{name}` declared"));
        let bl = layout.block(name).clone();
        let surf = surf.clone();
        let s = self.b.slice_by_size(
            &format!("{name}_s"),
            &surf,
            &[0, 0, 0, bl.s0 as i64],
            &[1, bl.rows as i64, 1, bl.width as i64],
        );
        self.b.reshape(&format!("{name}_m"), &s, &[1, 1, bl.rows as i64, bl.width as i64])
    }

    /// `W^T · x` for `w: [1, 1, IC, OC]`, `x: [1, 1, IC, T]` → `[1, 1, OC, T]`.
    pub(crate) fn linear_t(&mut self, name: &str, w: &Var, x: &Var) -> Var {
        self.b.matmul(name, w, x, true, false)
    }

    /// Splits a `[1, 1, C, T]` matrix into row groups of the given sizes.
    pub(crate) fn split_rows(&mut self, name: &str, x: &Var, sizes: &[usize]) -> Vec<Var> {
        let sizes: Vec<i64> = sizes.iter().map(|&s| s as i64).collect();
        self.b.split(name, x, &sizes, 2)
    }

    /// Marks a `[1, 1, C, T]` value as output `name`.
    pub(crate) fn output(&mut self, name: &str, v: &Var) {
        self.output_rows(v, &[(name, v.ty.shape[2])]);
    }

    /// Marks the row groups of a `[1, 1, C, T]` value as outputs, `(name, rows)` each
    /// (rows summing to `C`): with the packed convention the value goes out whole, with
    /// no split and no copy; with several surfaces it is split.
    pub(crate) fn output_rows(&mut self, v: &Var, parts: &[(&str, usize)]) {
        assert_eq!(v.ty.rank(), 4, "output `{}` is {}", parts[0].0, v.ty);
        assert_eq!(parts.iter().map(|p| p.1).sum::<usize>(), v.ty.shape[2], "row groups of `{}`", v.name);
        let parts = parts.iter().map(|&(n, r)| (n.to_string(), r)).collect();
        self.outputs.push((parts, v.clone()));
    }

    /// The name of the fp16 value that becomes surface `name`: the surface itself with
    /// fp16 I/O, else the value cast to it.
    fn fp16_name(&self, name: &str) -> String {
        match self.io {
            Io::Fp32Cast => format!("{name}_h"),
            Io::Fp16 => name.to_string(),
        }
    }

    /// `v` (fp16, `[1, C, 1, W]`, named by [`Gen::fp16_name`]) as surface `name`.
    fn emit_output(&mut self, name: &str, v: &Var) {
        let out = match self.io {
            Io::Fp32Cast => self.b.cast(name, v, DType::Fp32),
            Io::Fp16 => v.clone(),
        };
        self.b.output(&out);
    }

    pub(crate) fn finish(mut self, name: &'static str) -> mil::Result<KernelDef> {
        self.layout();
        let mut slots = Vec::new();
        let mut output_surfaces = Vec::new();
        let outputs = std::mem::take(&mut self.outputs);
        let surface = |b: &mut FunctionBuilder, n: &str, v: &Var| {
            let (c, w) = (v.ty.shape[2] as i64, v.ty.shape[3] as i64);
            b.reshape(n, v, &[1, c, 1, w])
        };
        match self.target.io {
            IoConvention::Multi => {
                for (parts, v) in &outputs {
                    let values = if parts.len() == 1 {
                        vec![v.clone()]
                    } else {
                        let sizes: Vec<usize> = parts.iter().map(|p| p.1).collect();
                        self.split_rows(&format!("{}_out_parts", v.name), v, &sizes)
                    };
                    for ((oname, c), v) in parts.iter().zip(values) {
                        let w = v.ty.shape[3];
                        let hname = self.fp16_name(oname);
                        let s = surface(&mut self.b, &hname, &v);
                        self.emit_output(oname, &s);
                        let j = output_surfaces.len();
                        slots.push(OutputSlot {
                            name: oname.clone(),
                            surface: j,
                            c0: 0,
                            channels: *c,
                            s0: 0,
                            width: w,
                        });
                        output_surfaces.push(crate::binding::OutputSurface { channels: *c, width: w });
                    }
                }
            }
            IoConvention::Packed => {
                let shape = |i: usize, axis: usize| outputs[i].1.ty.shape[axis];
                let widths_agree = (0..outputs.len()).all(|i| shape(i, 3) == shape(0, 3));
                let channels_agree = (0..outputs.len()).all(|i| shape(i, 2) == shape(0, 2));
                assert!(
                    widths_agree || channels_agree,
                    "kernel `{name}`: outputs agree neither in width nor in channels"
                );
                // Outputs of one width stack on the channel axis: each is then a
                // contiguous run of the surface. Else, with one channel count, side by
                // side on the spatial axis.
                let axis = if widths_agree { 1 } else { 3 };
                let (mut c0, mut s0) = (0, 0);
                let mut values = Vec::new();
                for (parts, v) in &outputs {
                    let w = v.ty.shape[3];
                    let mut row = 0;
                    for (oname, c) in parts {
                        slots.push(OutputSlot {
                            name: oname.clone(),
                            surface: 0,
                            c0: c0 + row,
                            channels: *c,
                            s0,
                            width: w,
                        });
                        row += c;
                    }
                    if axis == 1 {
                        c0 += row;
                    } else {
                        s0 += w;
                    }
                    let pname = if outputs.len() == 1 { self.fp16_name("out") } else { format!("{}_out", parts[0].0) };
                    values.push(surface(&mut self.b, &pname, v));
                }
                let (channels, width) = if axis == 1 { (c0, shape(0, 3)) } else { (shape(0, 2), s0) };
                let whole = if values.len() == 1 {
                    values.pop().expect("one value")
                } else {
                    let refs: Vec<&Var> = values.iter().collect();
                    let hname = self.fp16_name("out");
                    self.b.concat(&hname, &refs, axis as i64)
                };
                self.emit_output("out", &whole);
                output_surfaces.push(crate::binding::OutputSurface { channels, width });
            }
        }
        let f = self.b.finish()?;
        let inputs = self.surfaces.take().expect("laid out").into_iter().map(|(l, _)| l).collect();
        Ok(KernelDef {
            name,
            program: Program::new(self.target.dialect, f),
            weights: self.weights,
            io: KernelIo { convention: self.target.io, inputs, outputs: slots, output_surfaces },
        })
    }
}

/// QKV projection. Input `x: [D, T + Q + 2·KV]` = normed activation `xn [D, T]`, then
/// `Wqᵀ [D, Q]`, `Wkᵀ [D, KV]`, `Wvᵀ [D, KV]` (each weight `W [out, in]` stored
/// transposed, `[in, out]`; `Q = n_heads·head_dim`, which is `D` unless the head width
/// is set apart). Outputs `q [Q, T]`, `k [KV, T]`, `v [KV, T]`, before RoPE.
pub fn qkv_forward(d: &LayerDims, t: usize, target: impl Into<Target>) -> mil::Result<KernelDef> {
    let (dim, q_dim, kv) = (d.dim, d.q_dim(), d.kv_dim());
    let mut g = Gen::new(target);
    g.surface("x", dim, &[("xn", dim, t), ("wqkv", dim, q_dim + 2 * kv)]);
    let xn = g.block("xn");
    let w = g.block("wqkv");
    // One GEMM for all three projections: the weights sit side by side.
    let qkv = g.linear_t("qkv", &w, &xn); // [Q + 2KV, T]
                                          // The three outputs are the three row groups of one result: one output, split by
                                          // the host.
    g.output_rows(&qkv, &[("q", q_dim), ("k", kv), ("v", kv)]);
    g.finish("qkv_forward")
}

/// Causal attention plus the output projection, for `batch` sequences of `seq` tokens.
/// Blocks: rotated queries `q [Q, T]`, `Woᵀ [Q, D]`, rotated keys `k [KV, T]` and values
/// `v [KV, T]`. Outputs: `o [Q, T]` (attention output, kept for the Wo gradient) and
/// `y [D, T] = Wo · o`.
///
/// Written out explicitly — matmul, scale, additive causal mask, softmax, matmul —
/// because the ANE's `scaled_dot_product_attention` ignores `attn_mask` (DESIGN.md).
pub fn attention_forward(d: &LayerDims, batch: usize, seq: usize, target: impl Into<Target>) -> mil::Result<KernelDef> {
    let (dim, q_dim, kv, hd) = (d.dim, d.q_dim(), d.kv_dim(), d.head_dim());
    let t = batch * seq;
    let mut g = Gen::new(target);
    g.surface("q", q_dim, &[("q", q_dim, t), ("wo", q_dim, dim)]);
    g.surface("kv", kv, &[("k", kv, t), ("v", kv, t)]);
    let q = g.block("q");
    let k = g.block("k");
    let v = g.block("v");
    let mask = causal_mask(&mut g, seq, d.group());

    let h = Heads::new(d, batch, seq);
    let qh = h.queries(&mut g, "qh", &q); // [B, nkv, g·S, hd]
    let kh = h.kv_rows(&mut g, "kh", &k); // [B, nkv, S, hd]
    let vh = h.kv_rows(&mut g, "vh", &v);
    let (_, probs) = attention_probs(&mut g, &qh, &kh, &mask, hd);
    let oh = g.b.matmul("oh", &probs, &vh, false, false); // [B, nkv, g·S, hd]
    let o = h.merge_queries(&mut g, "o2", &oh); // [1, 1, Q, T]
    let wo = g.block("wo");
    let y = g.linear_t("y2", &wo, &o);
    g.output("o", &o);
    g.output("y", &y);
    g.finish("attention_forward")
}

/// Causal attention probabilities `P = softmax(q·kᵀ·scale + mask)` for queries
/// `qh: [B, nkv, g·S, hd]` (the `g` query heads of a KV head stacked on the row axis)
/// and keys `kh: [B, nkv, S, hd]`. The scale `1/√hd` is applied to the queries
/// (`[…, hd]`) rather than to the scores (`[…, S]`): the same product, with one pass
/// over `hd` columns instead of `S`. Returns the scaled queries (the backward's
/// `dK = dSᵀ·Q` wants them) and `P` (`[B, nkv, g·S, S]`).
pub(crate) fn attention_probs(g: &mut Gen, qh: &Var, kh: &Var, mask: &Var, head_dim: usize) -> (Var, Var) {
    let qs = attention_scale(g, "qs", qh, head_dim);
    let scores = g.b.matmul("scores", &qs, kh, false, true); // [B, nkv, g·S, S]
    let masked = g.b.add("masked", &scores, mask);
    let probs = g.b.softmax("probs", &masked, -1);
    (qs, probs)
}

/// `x · 1/√head_dim`. The constant is an fp16 literal; when `1/√head_dim` has no exact
/// fp16 value (head widths 32, 128, 48: every one but the even powers of two) it is
/// split into two fp16 factors whose product is within ~2⁻²² of it, because one rounded
/// factor (2⁻¹² off at worst) shifts every attention score by that much: on the CPU
/// device in fp32 Qwen3's logits then drift 1e-4 relative from transformers'. On the
/// ANE, which rounds every product to fp16 anyway, it costs one elementwise multiply.
pub(crate) fn attention_scale(g: &mut Gen, name: &str, x: &Var, head_dim: usize) -> Var {
    match fp16_factors(1.0 / (head_dim as f64).sqrt()) {
        (a, None) => g.b.scale(name, x, a),
        (a, Some(b)) => {
            let first = g.b.scale(&format!("{name}_a"), x, a);
            g.b.scale(name, &first, b)
        }
    }
}

/// `k` as one fp16 value when it is exact, else as the pair of fp16 values (the first in
/// [1, 2)) whose product is closest to `k`.
pub(crate) fn fp16_factors(k: f64) -> (f64, Option<f64>) {
    let round = |v: f64| f64::from(half::f16::from_f64(v).to_f32());
    if round(k) == k {
        return (k, None);
    }
    let mut best = (round(k), 1.0, (round(k) - k).abs());
    // Every fp16 value in [1, 2): 1 + m/1024.
    for m in 0..1024 {
        let a = 1.0 + f64::from(m) / 1024.0;
        let b = round(k / a);
        let err = (a * b - k).abs();
        if err < best.2 {
            best = (a, b, err);
        }
    }
    (best.0, Some(best.1))
}

/// The additive causal mask `[1, 1, group·S, S]` (0 on and below the diagonal,
/// [`MASK_NEG`] above), repeated for each of the `group` query heads stacked on the row
/// axis, as a constant weight file.
pub(crate) fn causal_mask(g: &mut Gen, seq: usize, group: usize) -> Var {
    let mut m = vec![0.0f32; group * seq * seq];
    for (r, row) in m.chunks_mut(seq).enumerate() {
        row[r % seq + 1..].fill(MASK_NEG);
    }
    let blob = g.weights.add_tensor("causal_mask", &[1, 1, group * seq, seq], &m);
    g.b.constant("causal_mask", blob)
}

/// Attention for decoding: `t` new tokens against a KV cache of `cache` positions.
/// Blocks: rotated queries `q [Q, t]`, `Woᵀ [Q, D]`, the key cache `k [KV, cache]` and
/// value cache `v [KV, cache]` (new keys/values already written in), and the additive
/// mask `[t, cache]` (0 where query i may see cache position j, [`MASK_NEG`] elsewhere).
/// Outputs `o [D, t]`, `y [D, t]` as [`attention_forward`].
pub fn attention_decode(d: &LayerDims, t: usize, cache: usize, target: impl Into<Target>) -> mil::Result<KernelDef> {
    let (dim, q_dim, kv, hd, nkv, grp) = (d.dim, d.q_dim(), d.kv_dim(), d.head_dim(), d.n_kv_heads, d.group());
    let (t_, c_, hd_, nkv_, g_) = (t as i64, cache as i64, hd as i64, nkv as i64, grp as i64);
    let mut g = Gen::new(target);
    g.surface("q", q_dim, &[("q", q_dim, t), ("wo", q_dim, dim)]);
    g.surface("kv", kv, &[("k", kv, cache), ("v", kv, cache)]);
    g.surface("mask", t, &[("mask", t, cache)]);
    let q = g.block("q");
    let k = g.block("k");
    let v = g.block("v");
    let mask = g.block("mask"); // [1, 1, t, cache]

    let q4 = g.b.reshape("q4", &q, &[nkv_, g_, hd_, t_]);
    let qt = g.b.transpose("qt", &q4, &[0, 1, 3, 2]); // [nkv, g, t, hd]
    let k3 = g.b.reshape("k3", &k, &[nkv_, 1, hd_, c_]); // [nkv, 1, hd, cache]
    let v3 = g.b.reshape("v3", &v, &[nkv_, 1, hd_, c_]);
    let vt = g.b.transpose("vt", &v3, &[0, 1, 3, 2]); // [nkv, 1, cache, hd]
    let scores = g.b.matmul("scores", &qt, &k3, false, false); // [nkv, g, t, cache]
    let scaled = attention_scale(&mut g, "scaled", &scores, hd);
    let masked = g.b.add("masked", &scaled, &mask);
    let probs = g.b.softmax("probs", &masked, -1);
    let o4 = g.b.matmul("o4", &probs, &vt, false, false); // [nkv, g, t, hd]
    let ot = g.b.transpose("ot", &o4, &[0, 1, 3, 2]); // [nkv, g, hd, t]
    let o = g.b.reshape("o2", &ot, &[1, 1, q_dim as i64, t_]);
    let wo = g.block("wo");
    let y = g.linear_t("y2", &wo, &o);
    g.output("o", &o);
    g.output("y", &y);
    g.finish("attention_decode")
}

/// SwiGLU FFN: `y = W2 · (silu(W1 x) ⊙ W3 x)`.
/// Blocks: normed activation `xn [D, T]`, `W1ᵀ [D, H]`, `W3ᵀ [D, H]` side by side, and
/// `W2 [D, H]` as stored (so every block has `D` rows). Outputs `h1 = W1 x`, `h3 = W3 x`
/// (`[H, T]`, kept for backward) and `y [D, T]`.
pub fn ffn_forward(d: &LayerDims, t: usize, target: impl Into<Target>) -> mil::Result<KernelDef> {
    let (dim, hid) = (d.dim, d.hidden);
    let mut g = Gen::new(target);
    g.surface("x", dim, &[("xn", dim, t), ("w13", dim, 2 * hid)]);
    g.surface("w2", dim, &[("w2", dim, hid)]);
    let xn = g.block("xn");
    let w13 = g.block("w13");
    let h13 = g.linear_t("h13", &w13, &xn); // [2H, T]
    let parts = g.split_rows("h13_parts", &h13, &[hid, hid]);
    let (h1, h3) = (&parts[0], &parts[1]);
    let act = g.b.silu("act", h1);
    let gate = g.b.mul("gate", &act, h3);
    let w2 = g.block("w2");
    let y = g.b.matmul("y2", &w2, &gate, false, false);
    g.output_rows(&h13, &[("h1", hid), ("h3", hid)]);
    g.output("y", &y);
    g.finish("ffn_forward")
}

/// Reshapes a channel-major `[1, 1, heads·hd, B·S]` value to the rank-4 head layouts
/// of attention and back: the attention kernels' bookkeeping, in one place. Queries go
/// to `[B, nkv, g·S, hd]`, the `g` query heads sharing a KV head stacked on the row
/// axis, so that one batched matmul against that KV head's `[B, nkv, S, hd]` serves the
/// group, and the products over the group (`dK`, `dV`) sum it in the contraction.
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

    /// Queries `[1, 1, Q, T]` → `[B, nkv, g·S, hd]` (head h = kv_head·g + i, as llama2.c).
    pub(crate) fn queries(&self, g: &mut Gen, name: &str, q: &Var) -> Var {
        let heads = self.nkv * self.g;
        let q4 = g.b.reshape(&format!("{name}_4"), q, &[heads, self.hd, self.b, self.s]);
        let qt = g.b.transpose(&format!("{name}_t"), &q4, &[2, 0, 3, 1]); // [B, H, S, hd]
        g.b.reshape(name, &qt, &[self.b, self.nkv, self.g * self.s, self.hd])
    }

    /// Keys or values `[1, 1, KV, T]` → `[B, nkv, S, hd]`.
    pub(crate) fn kv_rows(&self, g: &mut Gen, name: &str, k: &Var) -> Var {
        let k4 = g.b.reshape(&format!("{name}_4"), k, &[self.nkv, self.hd, self.b, self.s]);
        g.b.transpose(name, &k4, &[2, 0, 3, 1])
    }

    /// `[B, nkv, g·S, hd]` → channel-major `[1, 1, Q, T]`.
    pub(crate) fn merge_queries(&self, g: &mut Gen, name: &str, x: &Var) -> Var {
        let heads = self.nkv * self.g;
        let x4 = g.b.reshape(&format!("{name}_4"), x, &[self.b, heads, self.s, self.hd]);
        let t = g.b.transpose(&format!("{name}_t"), &x4, &[1, 3, 0, 2]); // [H, hd, B, S]
        g.b.reshape(name, &t, &[1, 1, heads * self.hd, self.b * self.s])
    }

    /// `[B, nkv, S, hd]` → channel-major `[1, 1, KV, T]`.
    pub(crate) fn merge_kv(&self, g: &mut Gen, name: &str, x: &Var) -> Var {
        let t = g.b.transpose(&format!("{name}_t"), x, &[1, 3, 0, 2]);
        g.b.reshape(name, &t, &[1, 1, self.nkv * self.hd, self.b * self.s])
    }
}

/// Backward of the SwiGLU FFN. Blocks: `dy [D, T]` (the gradient at the FFN's output),
/// `W2 [D, H]` (as stored, untransposed), `h1`, `h3` (`[H, T]`, from the forward pass),
/// `W1 [H, D]`, `W3 [H, D]`. Outputs: `dx [D, T]` (at the FFN's normed input), `dh1`,
/// `dh3` and `gate = silu(h1)·h3` (`[H, T]`, for the weight gradients on the CPU).
pub fn ffn_backward(d: &LayerDims, t: usize, target: impl Into<Target>) -> mil::Result<KernelDef> {
    let (dim, hid) = (d.dim, d.hidden);
    let mut g = Gen::new(target);
    g.surface("dy", dim, &[("dy", dim, t), ("w2", dim, hid)]);
    g.surface("h", hid, &[("h1", hid, t), ("h3", hid, t), ("w1", hid, dim), ("w3", hid, dim)]);
    let dy = g.block("dy");
    let w2 = g.block("w2");
    let h1 = g.block("h1");
    let h3 = g.block("h3");
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
    let w1 = g.block("w1");
    let w3 = g.block("w3");
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
/// Blocks: `dy [D, T]` (the gradient at the projection's output), the rotated queries
/// `q [Q, T]`, the forward's attention output `o [Q, T]` (before Wo), `Wo [D, Q]`
/// (untransposed), rotated keys `k [KV, T]` and values `v [KV, T]`. Outputs
/// `dq [Q, T]`, `dk [KV, T]`, `dv [KV, T]` (at the rotated values; the CPU applies
/// RoPE's backward). With grouped-query attention the gradients of the query heads
/// sharing a KV head are summed ("folded") into it.
pub fn attention_backward(
    d: &LayerDims,
    batch: usize,
    seq: usize,
    target: impl Into<Target>,
) -> mil::Result<KernelDef> {
    let (dim, q_dim, kv, hd) = (d.dim, d.q_dim(), d.kv_dim(), d.head_dim());
    let t = batch * seq;
    let h = Heads::new(d, batch, seq);
    let mut g = Gen::new(target);
    g.surface("dy", dim.max(q_dim), &[("dy", dim, t), ("q", q_dim, t), ("o", q_dim, t), ("wo", dim, q_dim)]);
    g.surface("kv", kv, &[("k", kv, t), ("v", kv, t)]);
    let dy = g.block("dy");
    let wo = g.block("wo");
    let q = g.block("q");
    let o = g.block("o");
    let k = g.block("k");
    let v = g.block("v");
    let d_o = g.linear_t("do", &wo, &dy); // [Q, T] gradient at the attention output
    let (dqh, dkh, dvh) = attention_grads(&mut g, &h, d.group(), hd, seq, [&q, &k, &v, &o, &d_o]);
    let dq = h.merge_queries(&mut g, "dq2", &dqh);
    let dk = h.merge_kv(&mut g, "dk2", &dkh);
    let dv = h.merge_kv(&mut g, "dv2", &dvh);
    g.output("dq", &dq);
    g.output("dk", &dk);
    g.output("dv", &dv);
    g.finish("attention_backward")
}

/// The core of every attention backward: recompute `P = softmax(q·kᵀ·scale + mask)`,
/// then `dV = Pᵀ·dO`, `dP = dO·Vᵀ`, the softmax backward `dS = P ⊙ (dP − Σ_j dP⊙P)`,
/// `dQ = dS·K·scale` and `dK = dSᵀ·(Q·scale)`. With the query heads of a KV head stacked
/// on the row axis, `Pᵀ·dO` and `dSᵀ·Q` sum over the group in their contraction. The
/// row sums `Σ_j dP_ij·P_ij` are taken as `dO_i · O_i` (FlashAttention's identity:
/// `Σ_j (dO_i·V_j) P_ij = dO_i·O_i`), over `hd` columns instead of `S`. Takes
/// channel-major `[1, 1, C, T]` values `[q, k, v, o, d_o]`: rotated `q [Q, T]`, `k`,
/// `v [KV, T]`, the forward's attention output `o [Q, T]` and its gradient `d_o`;
/// returns `(dQ, dK, dV)` in head layout (`[B, nkv, g·S, hd]`, `[B, nkv, S, hd]`,
/// `[B, nkv, S, hd]`).
pub(crate) fn attention_grads(
    g: &mut Gen,
    h: &Heads,
    group: usize,
    head_dim: usize,
    seq: usize,
    [q, k, v, o, d_o]: [&Var; 5],
) -> (Var, Var, Var) {
    let mask = causal_mask(g, seq, group);
    let qh = h.queries(g, "qh", q); // [B, nkv, g·S, hd]
    let kh = h.kv_rows(g, "kh", k); // [B, nkv, S, hd]
    let vh = h.kv_rows(g, "vh", v);
    let doh = h.queries(g, "doh", d_o);
    let (qs, p) = attention_probs(g, &qh, &kh, &mask, head_dim);
    let dvh = g.b.matmul("dvh", &p, &doh, true, false); // [B, nkv, S, hd]
    let dp = g.b.matmul("dp", &doh, &vh, false, true); // [B, nkv, g·S, S]
    let oh = h.queries(g, "oh", o);
    let doo = g.b.mul("doo", &doh, &oh); // [B, nkv, g·S, hd]
    let rowsum = g.b.reduce_sum("rowsum", &doo, &[-1], true); // [B, nkv, g·S, 1]
    let centered = g.b.sub("centered", &dp, &rowsum);
    // dS without the scale: the scale goes on dQ (an [S, hd] pass, not [S, S]), and dK
    // takes it from the scaled queries.
    let ds = g.b.mul("ds", &p, &centered);
    let dq0 = g.b.matmul("dq0", &ds, &kh, false, false); // [B, nkv, g·S, hd]
    let dqh = attention_scale(g, "dqh", &dq0, head_dim);
    let dkh = g.b.matmul("dkh", &ds, &qs, true, false); // [B, nkv, S, hd]
    (dqh, dkh, dvh)
}

/// One part of the classifier: `logits [V_p, T] = W_p · xn` for `V_p` rows of the
/// `[vocab, D]` classifier. Blocks: normed activation `xn [D, T]`, then
/// `W_pᵀ [D, V_p]`. The decoder splits the vocabulary into parts so that no dimension
/// passes the ANE's limit ([`mil::lint::MAX_DIMENSION`]; Qwen2.5's head has 151936 rows):
/// see [`classifier_parts`].
pub fn classifier_part(dim: usize, part: usize, t: usize, target: impl Into<Target>) -> mil::Result<KernelDef> {
    let mut g = Gen::new(target);
    g.surface("x", dim, &[("xn", dim, t), ("wcls", dim, part)]);
    let xn = g.block("xn");
    let w = g.block("wcls");
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
/// Blocks: `dq [Q, T]`, `Wq [Q, D]`, `dk`, `dv` (`[KV, T]`), `Wk [KV, D]`, `Wv [KV, D]`
/// (all untransposed). Output `dx [D, T]`.
pub fn qkv_backward(d: &LayerDims, t: usize, target: impl Into<Target>) -> mil::Result<KernelDef> {
    let (dim, q_dim, kv) = (d.dim, d.q_dim(), d.kv_dim());
    let mut g = Gen::new(target);
    g.surface("dq", q_dim, &[("dq", q_dim, t), ("wq", q_dim, dim)]);
    g.surface("dkv", kv, &[("dk", kv, t), ("dv", kv, t), ("wk", kv, dim), ("wv", kv, dim)]);
    let dq = g.block("dq");
    let wq = g.block("wq");
    let dk = g.block("dk");
    let dv = g.block("dv");
    let wk = g.block("wk");
    let wv = g.block("wv");
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
            (LayerDims::new(288, 768, 6, 6), 2, 256),
            (LayerDims::new(768, 2048, 12, 12), 1, 256),
            (LayerDims::new(64, 192, 4, 2), 2, 128),
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
        LayerDims::new(64, 172, 8, 4)
    }

    #[test]
    fn the_attention_scale_splits_into_fp16_factors_only_when_it_must() {
        for head_dim in [16usize, 64, 256] {
            assert_eq!(fp16_factors(1.0 / (head_dim as f64).sqrt()), (1.0 / (head_dim as f64).sqrt(), None));
        }
        for head_dim in [32usize, 48, 128, 96] {
            let k = 1.0 / (head_dim as f64).sqrt();
            let (a, b) = fp16_factors(k);
            let b = b.expect("not exact in fp16");
            let exact = |v: f64| f64::from(half::f16::from_f64(v).to_f32()) == v;
            assert!(exact(a) && exact(b), "head_dim {head_dim}: {a} · {b}");
            let single = (f64::from(half::f16::from_f64(k).to_f32()) - k).abs() / k;
            let pair = (a * b - k).abs() / k;
            assert!(pair < 2e-6 && pair < single / 100.0, "head_dim {head_dim}: pair {pair:e}, one factor {single:e}");
        }
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
