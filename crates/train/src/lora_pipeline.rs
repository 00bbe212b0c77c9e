//! The LoRA pipeline: a frozen base **baked into the kernels once**, the adapters
//! through the surfaces ([`crate::lora_kernels`]).
//!
//! It sits between the two other families: like the static pipeline, each layer has its
//! own kernels with its weights as BLOBFILE constants (so no weight bytes cross the
//! surfaces and the kernels fuse RMSNorm, RoPE and attention); like the dynamic pipeline,
//! it compiles once per run — the base never changes, and what does change (`A`, `B`)
//! comes in the input surface. Kernels: `5·L` baked, the weight-free attention backward,
//! and one weight-free gradient kernel per adapted group (attention, FFN): at most
//! `5·L + 3`, all compiled by [`LoraPipeline::new`].
//!
//! Per layer and micro-batch: the static pipeline's 2 forward and 4 backward evaluations,
//! plus one gradient-kernel evaluation per adapted group (layer 0 stops below its
//! adapters' gradients: nothing needs the `dx` at its input). With dropout each
//! adapter's input mask travels in the surfaces too ([`LoraPipeline::set_dropout_seed`]).
//! On the CPU: embedding, residuals, RMSNorm backwards (for `dx`; their gain gradients
//! are dropped), the classifier's loss and `dx` — and nothing else: no `dW` of the base,
//! no `dWcls`, no embedding gradient.

use std::time::Instant;

use device::{Device, Kernel};
use llama::{Config, Params};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::binding::{IoConvention, KernelIo, Target};
use crate::cpu_ops::{self, ClassifierLoss};
use crate::kernels::{KernelDef, LayerDims};
use crate::lora::{LoraConfig, LoraParams, LoraTarget};
use crate::lora_kernels::{self as lk, a_block, b_block, m_block};
use crate::pipeline::{LayerActs, PhaseTimes};
use crate::static_kernels::{self as sk, AttentionWeights, FfnWeights};
use crate::static_pipeline::{rope_tables, Slot};

fn lap(t: &mut Instant, slot: &mut f64) {
    let now = Instant::now();
    *slot += (now - *t).as_secs_f64() * 1e3;
    *t = now;
}

/// Everything that shapes the LoRA kernels.
#[derive(Clone, Debug)]
pub struct LoraShape {
    pub config: Config,
    pub dims: LayerDims,
    pub batch: usize,
    pub seq: usize,
    pub dialect: mil::Dialect,
    pub io: IoConvention,
    pub lora: LoraConfig,
}

impl LoraShape {
    pub fn new(config: &Config, lora: &LoraConfig, batch: usize, seq: usize, target: Target) -> LoraShape {
        LoraShape {
            dims: LayerDims::of(config),
            config: config.clone(),
            batch,
            seq,
            dialect: target.dialect,
            io: target.io,
            lora: lora.clone(),
        }
    }

    pub fn target(&self) -> Target {
        Target::new(self.dialect, self.io)
    }

    pub fn tokens(&self) -> usize {
        self.batch * self.seq
    }

    fn attention_targets(&self) -> Vec<LoraTarget> {
        self.lora.targets.iter().copied().filter(|t| t.is_attention()).collect()
    }

    fn ffn_targets(&self) -> Vec<LoraTarget> {
        self.lora.targets.iter().copied().filter(|t| !t.is_attention()).collect()
    }

    /// Kernels of the whole run: `5·L` baked, the weight-free attention backward, one
    /// gradient kernel per adapted group.
    pub fn kernel_count(&self) -> usize {
        5 * self.config.n_layers
            + 1
            + usize::from(!self.attention_targets().is_empty())
            + usize::from(!self.ffn_targets().is_empty())
    }

    /// Every kernel's program, in compile order: per layer attention forward, FFN
    /// forward, FFN backward, Woᵀ, QKV backward; then the weight-free attention backward
    /// and the gradient kernels (attention group, FFN group).
    pub fn kernel_defs(&self, base: &Params) -> mil::Result<Vec<KernelDef>> {
        let (d, t, eps, target) = (&self.dims, self.tokens(), self.config.norm_eps, self.target());
        let ad = lk::Adapters::new(&self.lora.targets, self.lora.rank).with_dropout(self.lora.dropout > 0.0);
        let mut defs = Vec::with_capacity(self.kernel_count());
        for l in 0..self.config.n_layers {
            let w = base.layer(l);
            let aw = AttentionWeights {
                rms: w.rms_att(),
                wq: w.wq(),
                wk: w.wk(),
                wv: w.wv(),
                wo: w.wo(),
                bias: w.qkv_bias(),
            };
            let fw = FfnWeights { rms: w.rms_ffn(), w1: w.w1(), w2: w.w2(), w3: w.w3() };
            defs.push(lk::attention_forward(d, self.batch, self.seq, eps, &aw, &ad, target)?);
            defs.push(lk::ffn_forward(d, t, eps, &fw, &ad, target)?);
            defs.push(lk::ffn_backward(d, t, &fw, &ad, target)?);
            defs.push(lk::attention_backward_wo(d, t, aw.wo, &ad, target)?);
            defs.push(lk::qkv_backward(d, t, &aw, &ad, target)?);
        }
        defs.push(sk::attention_backward_free(d, self.batch, self.seq, target)?);
        for group in [self.attention_targets(), self.ffn_targets()] {
            if !group.is_empty() {
                defs.push(lk::adapter_grads(d, t, &lk::Adapters { targets: &group, ..ad }, target)?);
            }
        }
        Ok(defs)
    }
}

/// Writes layer `l`'s adapters for every adapter block a kernel's slot has: `A [r, in]`
/// in the first `r` rows of its `[rp, in]` block, `s·B [out, r]` in the first `r`
/// columns of its `[out, rp]` block (the padding stays zero from allocation); and with
/// dropout each target's mask (`masks[i]` for the `i`-th target: layer `l`'s).
fn write_adapters(slot: &mut Slot, scaled: &LoraParams, l: usize, masks: &[Vec<f32>]) {
    let r = scaled.config.rank;
    for (i, &t) in scaled.config.targets.iter().enumerate() {
        if !slot.has(a_block(t)) {
            continue;
        }
        let s = scaled.slot(l, t).expect("targeted");
        let (a, b) = scaled.adapter(l, t).expect("targeted");
        slot.io.write_at(&mut slot.inputs, a_block(t), 0, r, s.inp, a);
        slot.io.write_at(&mut slot.inputs, b_block(t), 0, s.out, r, b);
        if let Some(mask) = masks.get(i) {
            slot.write(m_block(t), mask);
        }
    }
}

/// SplitMix64's finaliser: spreads a seed's bits (so nearby seeds give unrelated streams).
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The dropout seed of micro-batch `micro` of optimizer step `step` (0-based) in a run
/// seeded `run_seed`: a function of the three only, so a resumed or restarted run draws
/// the masks the uninterrupted run drew.
pub fn dropout_seed(run_seed: u64, step: u64, micro: usize) -> u64 {
    mix(mix(mix(run_seed) ^ step) ^ micro as u64)
}

/// Fills `mask` (`[in, T]`) with PEFT's inverted dropout for layer `layer`, target number
/// `target` under `seed`: each value `0` with probability `p`, else `1 / (1 − p)`.
pub fn fill_dropout_mask(mask: &mut [f32], p: f32, seed: u64, layer: usize, target: usize) {
    let mut rng = ChaCha8Rng::seed_from_u64(mix(seed ^ mix(((layer as u64) << 8) | target as u64)));
    let keep = 1.0 / (1.0 - p);
    for v in mask.iter_mut() {
        *v = if rng.gen::<f32>() < p { 0.0 } else { keep };
    }
}

struct LayerKernels {
    attn_fwd: Box<dyn Kernel>,
    ffn_fwd: Box<dyn Kernel>,
    ffn_bwd: Box<dyn Kernel>,
    attn_bwd_wo: Box<dyn Kernel>,
    qkv_bwd: Box<dyn Kernel>,
}

struct Slots {
    attn_fwd: Slot,
    ffn_fwd: Slot,
    ffn_bwd: Slot,
    attn_bwd_wo: Slot,
    attn_bwd_free: Slot,
    qkv_bwd: Slot,
    grads_attn: Option<Slot>,
    grads_ffn: Option<Slot>,
}

struct Scratch {
    x: Vec<f32>,
    dx: Vec<f32>,
    dxn: Vec<f32>,
    d_o: Vec<f32>,
    dh1: Vec<f32>,
    dh3: Vec<f32>,
    gate: Vec<f32>,
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
    y: Vec<f32>,
    row: Vec<f32>,
    dgain: Vec<f32>,
    xn_final: Vec<f32>,
    r_final: Vec<f32>,
    x_final: Vec<f32>,
    grad_out: Vec<f32>,
}

/// The LoRA pipeline for one base model, adapter shape and batch shape. It owns the
/// frozen base (the weights its kernels bake).
pub struct LoraPipeline {
    shape: LoraShape,
    base: Params,
    layers: Vec<LayerKernels>,
    attn_bwd_free: Box<dyn Kernel>,
    grads_attn: Option<Box<dyn Kernel>>,
    grads_ffn: Option<Box<dyn Kernel>>,
    slots: Slots,
    acts: Vec<LayerActs>,
    scratch: Scratch,
    classifier: ClassifierLoss,
    /// The adapters as the kernels take them (`B` times the scale), refreshed per pass.
    scaled: LoraParams,
    /// With dropout: one layer's mask per target (`[in, T]`, in target order), drawn
    /// from `dropout_seed` (all ones without a seed: evaluation); empty without dropout.
    masks: Vec<Vec<f32>>,
    dropout_seed: Option<u64>,
    pub times: PhaseTimes,
    /// Seconds of the one compile.
    pub compile_seconds: f64,
}

impl LoraPipeline {
    /// Generates and compiles every kernel of the run for the frozen `base`.
    pub fn new(
        device: &dyn Device,
        base: Params,
        lora: &LoraConfig,
        batch: usize,
        seq: usize,
        io: IoConvention,
    ) -> device::Result<LoraPipeline> {
        let model = base.config();
        if model.qk_norm || model.q_dim() != model.dim {
            // Its kernels are the static pipeline's with adapters: the same layout limits.
            return Err(device::Error::new(
                device::ErrorKind::Program,
                "--lora: models with QK-norm or a head width apart from dim / n_heads (Qwen3) are not supported \
                 by the LoRA pipeline yet (its kernels are the static pipeline's); full fine-tuning with \
                 --pipeline dynamic trains them",
            ));
        }
        let start = Instant::now();
        let shape = LoraShape::new(base.config(), lora, batch, seq, Target::new(device.dialect(), io));
        let defs = shape.kernel_defs(&base)?;
        let ios: Vec<KernelIo> = defs.iter().map(|d| d.io.clone()).collect();
        let mut kernels = Vec::with_capacity(defs.len());
        for def in &defs {
            kernels.push(device.compile(&def.program, &def.weights)?);
        }
        drop(defs);
        let n_layers = shape.config.n_layers;
        let mut it = kernels.into_iter();
        let mut layers = Vec::with_capacity(n_layers);
        for _ in 0..n_layers {
            let mut next = || it.next().expect("five kernels per layer");
            layers.push(LayerKernels {
                attn_fwd: next(),
                ffn_fwd: next(),
                ffn_bwd: next(),
                attn_bwd_wo: next(),
                qkv_bwd: next(),
            });
        }
        let attn_bwd_free = it.next().expect("the weight-free attention backward");
        let mut io_at = 5 * n_layers + 1;
        let mut grads_slot = |has: bool, it: &mut dyn Iterator<Item = Box<dyn Kernel>>| {
            if !has {
                return None;
            }
            let k = it.next().expect("a gradient kernel per adapted group");
            let slot = Slot::new(&ios[io_at], k.as_ref());
            io_at += 1;
            Some((k, slot))
        };
        let ga = grads_slot(!shape.attention_targets().is_empty(), &mut it);
        let gf = grads_slot(!shape.ffn_targets().is_empty(), &mut it);
        let l0 = &layers[0];
        let mut slots = Slots {
            attn_fwd: Slot::new(&ios[0], l0.attn_fwd.as_ref()),
            ffn_fwd: Slot::new(&ios[1], l0.ffn_fwd.as_ref()),
            ffn_bwd: Slot::new(&ios[2], l0.ffn_bwd.as_ref()),
            attn_bwd_wo: Slot::new(&ios[3], l0.attn_bwd_wo.as_ref()),
            qkv_bwd: Slot::new(&ios[4], l0.qkv_bwd.as_ref()),
            attn_bwd_free: Slot::new(&ios[5 * n_layers], attn_bwd_free.as_ref()),
            grads_attn: None,
            grads_ffn: None,
        };
        let (grads_attn, grads_ffn) = {
            let (ka, sa) = ga.map_or((None, None), |(k, s)| (Some(k), Some(s)));
            let (kf, sf) = gf.map_or((None, None), |(k, s)| (Some(k), Some(s)));
            slots.grads_attn = sa;
            slots.grads_ffn = sf;
            (ka, kf)
        };
        // The RoPE tables never change: written once.
        let (cos, sin) =
            rope_tables(shape.dims.head_dim(), batch, seq, shape.config.rope_theta, shape.config.rope_scaling);
        for slot in [&mut slots.attn_fwd, &mut slots.attn_bwd_free] {
            slot.write("cos", &cos);
            slot.write("sin", &sin);
        }
        let (d, t) = (shape.dims, shape.tokens());
        let (dim, kv, hid, vocab) = (d.dim, d.kv_dim(), d.hidden, shape.config.vocab_size);
        let z = |n: usize| vec![0.0f32; n];
        Ok(LoraPipeline {
            acts: (0..n_layers).map(|_| LayerActs::new(&d, t)).collect(),
            scratch: Scratch {
                x: z(dim * t),
                dx: z(dim * t),
                dxn: z(dim * t),
                d_o: z(dim * t),
                dh1: z(hid * t),
                dh3: z(hid * t),
                gate: z(hid * t),
                dq: z(dim * t),
                dk: z(kv * t),
                dv: z(kv * t),
                y: z(dim * t),
                row: z(t),
                dgain: z(dim),
                xn_final: z(dim * t),
                r_final: z(t),
                x_final: z(dim * t),
                grad_out: Vec::new(),
            },
            classifier: ClassifierLoss::new(vocab, dim, cpu_ops::DEFAULT_CLASSIFIER_CHUNK.min(t)),
            scaled: LoraParams::zeros(&shape.config, lora),
            masks: if lora.dropout > 0.0 {
                lora.targets.iter().map(|&tg| vec![1.0; lk::io_rows(&d, tg).0 * t]).collect()
            } else {
                Vec::new()
            },
            dropout_seed: None,
            shape,
            base,
            layers,
            attn_bwd_free,
            grads_attn,
            grads_ffn,
            slots,
            times: PhaseTimes::default(),
            compile_seconds: start.elapsed().as_secs_f64(),
        })
    }

    /// Dropout for the passes that follow: `Some(seed)` draws the masks from `seed` (a
    /// training micro-batch: see [`dropout_seed`]), `None` applies no dropout
    /// (evaluation). Without dropout (`p = 0`) this changes nothing.
    pub fn set_dropout_seed(&mut self, seed: Option<u64>) {
        self.dropout_seed = seed;
    }

    /// Layer `l`'s dropout masks into `masks` (nothing without dropout).
    fn draw_masks(masks: &mut [Vec<f32>], p: f32, seed: Option<u64>, l: usize) {
        for (i, mask) in masks.iter_mut().enumerate() {
            match seed {
                Some(seed) => fill_dropout_mask(mask, p, seed, l, i),
                None => mask.fill(1.0),
            }
        }
    }

    pub fn shape(&self) -> &LoraShape {
        &self.shape
    }

    /// The frozen base the kernels bake.
    pub fn base(&self) -> &Params {
        &self.base
    }

    /// Kernels compiled for the run (all by [`LoraPipeline::new`]; none afterwards).
    pub fn kernels(&self) -> usize {
        self.shape.kernel_count()
    }

    pub fn tokens(&self) -> usize {
        self.shape.tokens()
    }

    /// Mean cross-entropy of the base with `lora` on `inputs → targets` (`[B·S]` each).
    pub fn loss(&mut self, lora: &LoraParams, inputs: &[u32], targets: &[u32]) -> device::Result<f32> {
        self.forward(lora, inputs)?;
        let mut t = Instant::now();
        let loss = self.classifier.forward(&self.scratch.xn_final, self.base.classifier(), targets);
        lap(&mut t, &mut self.times.classifier);
        Ok(loss)
    }

    /// Mean cross-entropy and the adapters' gradients times `grad_scale`, accumulated
    /// into `grads` (laid out as `lora`).
    pub fn forward_backward(
        &mut self,
        lora: &LoraParams,
        grads: &mut [f32],
        inputs: &[u32],
        targets: &[u32],
        grad_scale: f32,
    ) -> device::Result<f32> {
        assert_eq!(grads.len(), lora.len(), "the gradient buffer must be laid out as the adapters");
        self.forward(lora, inputs)?;
        self.backward(lora, grads, inputs, targets, grad_scale)
    }

    /// `scaled` = `lora` with every `B` times `s`: what the kernels take.
    fn refresh_scaled(&mut self, lora: &LoraParams) {
        assert_eq!(lora.config, self.shape.lora, "adapters of another shape than the pipeline's");
        let scale = lora.config.scale();
        self.scaled.as_mut_slice().copy_from_slice(lora.as_slice());
        for s in lora.slots() {
            self.scaled.as_mut_slice()[s.b.clone()].iter_mut().for_each(|v| *v *= scale);
        }
    }

    fn forward(&mut self, lora: &LoraParams, inputs: &[u32]) -> device::Result<()> {
        let t_len = self.tokens();
        assert_eq!(inputs.len(), t_len, "inputs must be [B·S = {t_len}]");
        self.refresh_scaled(lora);
        let dim = self.shape.dims.dim;
        let (times, slots, sc) = (&mut self.times, &mut self.slots, &mut self.scratch);
        let mut t = Instant::now();
        cpu_ops::embedding_forward(&mut sc.x, self.base.token_embedding(), inputs, dim);
        lap(&mut t, &mut times.other_cpu);
        let p = self.shape.lora.dropout;
        for (l, kernels) in self.layers.iter_mut().enumerate() {
            Self::draw_masks(&mut self.masks, p, self.dropout_seed, l);
            lap(&mut t, &mut times.other_cpu);
            let a = &mut self.acts[l];
            a.x_in.copy_from_slice(&sc.x);
            let s = &mut slots.attn_fwd;
            s.write("x", &a.x_in);
            write_adapters(s, &self.scaled, l, &self.masks);
            lap(&mut t, &mut times.surface_io);
            s.eval(kernels.attn_fwd.as_mut())?;
            lap(&mut t, &mut times.device_forward);
            s.take("xn", &mut a.xn1);
            s.take("r", &mut a.inv_rms1);
            s.take("q", &mut a.q);
            s.take("k", &mut a.k);
            s.take("v", &mut a.v);
            s.take("o", &mut a.o);
            s.take("y", &mut sc.y);
            lap(&mut t, &mut times.surface_io);
            for ((xm, xi), y) in a.x_mid.iter_mut().zip(&a.x_in).zip(&sc.y) {
                *xm = xi + y;
            }
            lap(&mut t, &mut times.other_cpu);
            let s = &mut slots.ffn_fwd;
            s.write("x", &a.x_mid);
            write_adapters(s, &self.scaled, l, &self.masks);
            lap(&mut t, &mut times.surface_io);
            s.eval(kernels.ffn_fwd.as_mut())?;
            lap(&mut t, &mut times.device_forward);
            s.take("xn", &mut a.xn2);
            s.take("r", &mut a.inv_rms2);
            s.take("h1", &mut a.h1);
            s.take("h3", &mut a.h3);
            s.take("y", &mut sc.y);
            lap(&mut t, &mut times.surface_io);
            for ((xo, xm), y) in sc.x.iter_mut().zip(&a.x_mid).zip(&sc.y) {
                *xo = xm + y;
            }
            lap(&mut t, &mut times.other_cpu);
        }
        let eps = self.shape.config.norm_eps;
        cpu_ops::rmsnorm_forward(&mut sc.xn_final, &mut sc.r_final, &sc.x, self.base.rms_final(), eps);
        sc.x_final.copy_from_slice(&sc.x);
        lap(&mut t, &mut times.rmsnorm);
        Ok(())
    }

    /// Reads a gradient kernel's `da_{t}`, `dbt_{t}` for every target it has and adds
    /// them to `grads` (`dB = s·(dBᵀ/s)ᵀ`, the scale applied here in f32).
    fn add_adapter_grads(slot: &Slot, lora: &LoraParams, l: usize, grads: &mut [f32], tmp: &mut Vec<f32>) {
        let (r, scale) = (lora.config.rank, lora.config.scale());
        for &t in &lora.config.targets {
            if !slot.has(a_block(t)) {
                continue;
            }
            let s = lora.slot(l, t).expect("targeted");
            slot.io.read(&slot.outputs, &format!("da_{}", t.name()), tmp); // [rp, in]
            for (g, v) in grads[s.a.clone()].iter_mut().zip(&tmp[..r * s.inp]) {
                *g += v;
            }
            slot.io.read(&slot.outputs, &format!("dbt_{}", t.name()), tmp); // [rp, out]
            let gb = &mut grads[s.b.clone()];
            for j in 0..r {
                for o in 0..s.out {
                    gb[o * r + j] += scale * tmp[j * s.out + o];
                }
            }
        }
    }

    /// The attention group's adapter gradients of layer `l` (if any is adapted), added to
    /// `grads`: from the forward's `xn1`, `o`, and `dq`, `dk`, `dv`, `dy_attn` (= `s.dx`).
    #[allow(clippy::too_many_arguments)] // the pipeline's parts the borrow checker keeps apart
    fn attention_grads(
        slots: &mut Slots,
        kernel: &mut Option<Box<dyn Kernel>>,
        scaled: &LoraParams,
        masks: &[Vec<f32>],
        lora: &LoraParams,
        l: usize,
        a: &LayerActs,
        s: &mut Scratch,
        grads: &mut [f32],
        times: &mut PhaseTimes,
        t: &mut Instant,
    ) -> device::Result<()> {
        let (Some(k), Some(kernel)) = (&mut slots.grads_attn, kernel) else { return Ok(()) };
        let blocks = [("xn1", &a.xn1), ("o", &a.o), ("dq", &s.dq), ("dk", &s.dk), ("dv", &s.dv), ("dy_attn", &s.dx)];
        for (name, data) in blocks {
            if k.has(name) {
                k.write(name, data);
            }
        }
        write_adapters(k, scaled, l, masks);
        lap(t, &mut times.surface_io);
        k.eval(kernel.as_mut())?;
        lap(t, &mut times.device_backward);
        Self::add_adapter_grads(k, lora, l, grads, &mut s.grad_out);
        lap(t, &mut times.surface_io);
        Ok(())
    }

    fn backward(
        &mut self,
        lora: &LoraParams,
        grads: &mut [f32],
        _inputs: &[u32],
        targets: &[u32],
        grad_scale: f32,
    ) -> device::Result<f32> {
        let t_len = self.tokens();
        assert_eq!(targets.len(), t_len, "targets must be [B·S = {t_len}]");
        let mut t = Instant::now();
        let base = &self.base;
        let s = &mut self.scratch;
        // The classifier is frozen: its loss and dx only.
        s.dxn.fill(0.0);
        let loss =
            self.classifier.forward_backward_input(&s.xn_final, base.classifier(), targets, grad_scale, &mut s.dxn);
        lap(&mut t, &mut self.times.classifier);
        let (times, slots) = (&mut self.times, &mut self.slots);
        s.dx.fill(0.0);
        // The norms' gain gradients are not needed (frozen); their buffer is scratch.
        s.dgain.fill(0.0);
        cpu_ops::rmsnorm_backward(
            &mut s.dx,
            &mut s.dgain,
            &s.dxn,
            &s.x_final,
            base.rms_final(),
            &s.r_final,
            &mut s.row,
        );
        lap(&mut t, &mut times.rmsnorm);
        // Layer 0's input gradient feeds nothing (the embedding is frozen): below its
        // adapters' gradients, layer 0 stops. With no q, k, v adapter it needs no
        // attention backward at all (the o adapter's `dy` is the attention output's).
        let qkv_adapted =
            self.shape.lora.targets.iter().any(|t| matches!(t, LoraTarget::Q | LoraTarget::K | LoraTarget::V));
        let attention_adapted = !self.shape.attention_targets().is_empty();
        let p = self.shape.lora.dropout;
        for l in (0..self.shape.config.n_layers).rev() {
            // The masks the forward drew for this layer (the same seed draws them again).
            Self::draw_masks(&mut self.masks, p, self.dropout_seed, l);
            lap(&mut t, &mut times.other_cpu);
            let w = base.layer(l);
            let a = &self.acts[l];
            let kernels = &mut self.layers[l];

            // FFN backward: s.dx is the gradient at the layer's output.
            let k = &mut slots.ffn_bwd;
            k.write("dy", &s.dx);
            k.write("h1", &a.h1);
            k.write("h3", &a.h3);
            write_adapters(k, &self.scaled, l, &self.masks);
            lap(&mut t, &mut times.surface_io);
            k.eval(kernels.ffn_bwd.as_mut())?;
            lap(&mut t, &mut times.device_backward);
            k.take("dx", &mut s.dxn);
            k.take("dh1", &mut s.dh1);
            k.take("dh3", &mut s.dh3);
            k.take("gate", &mut s.gate);
            lap(&mut t, &mut times.surface_io);
            if let (Some(k), Some(kernel)) = (&mut slots.grads_ffn, &mut self.grads_ffn) {
                for (name, data) in
                    [("xn2", &a.xn2), ("gate", &s.gate), ("dh1", &s.dh1), ("dh3", &s.dh3), ("dy_ffn", &s.dx)]
                {
                    if k.has(name) {
                        k.write(name, data);
                    }
                }
                write_adapters(k, &self.scaled, l, &self.masks);
                lap(&mut t, &mut times.surface_io);
                k.eval(kernel.as_mut())?;
                lap(&mut t, &mut times.device_backward);
                Self::add_adapter_grads(k, lora, l, grads, &mut s.grad_out);
                lap(&mut t, &mut times.surface_io);
            }
            if l == 0 && !attention_adapted {
                break;
            }
            cpu_ops::rmsnorm_backward(&mut s.dx, &mut s.dgain, &s.dxn, &a.x_mid, w.rms_ffn(), &a.inv_rms2, &mut s.row);
            lap(&mut t, &mut times.rmsnorm);

            // Attention backward: Woᵀ (+ the o adapter), then the weight-free part; layer 0
            // needs it only for its q/k/v adapters.
            if l > 0 || qkv_adapted {
                let k = &mut slots.attn_bwd_wo;
                k.write("dy", &s.dx);
                write_adapters(k, &self.scaled, l, &self.masks);
                lap(&mut t, &mut times.surface_io);
                k.eval(kernels.attn_bwd_wo.as_mut())?;
                lap(&mut t, &mut times.device_backward);
                k.take("do", &mut s.d_o);
                let k = &mut slots.attn_bwd_free;
                k.write("do", &s.d_o);
                k.write("q", &a.q);
                k.write("o", &a.o);
                k.write("k", &a.k);
                k.write("v", &a.v);
                lap(&mut t, &mut times.surface_io);
                k.eval(self.attn_bwd_free.as_mut())?;
                lap(&mut t, &mut times.device_backward);
                k.take("dq", &mut s.dq);
                k.take("dk", &mut s.dk);
                k.take("dv", &mut s.dv);
                lap(&mut t, &mut times.surface_io);
            }
            if l == 0 {
                // Layer 0 ends with its adapters' gradients: the o adapter's needs
                // `dy_attn` (= s.dx) and `o`, the q/k/v adapters' the dq, dk, dv above.
                Self::attention_grads(
                    slots,
                    &mut self.grads_attn,
                    &self.scaled,
                    &self.masks,
                    lora,
                    l,
                    a,
                    s,
                    grads,
                    times,
                    &mut t,
                )?;
                break;
            }
            let k = &mut slots.qkv_bwd;
            k.write("dq", &s.dq);
            k.write("dk", &s.dk);
            k.write("dv", &s.dv);
            write_adapters(k, &self.scaled, l, &self.masks);
            lap(&mut t, &mut times.surface_io);
            k.eval(kernels.qkv_bwd.as_mut())?;
            lap(&mut t, &mut times.device_backward);
            k.take("dx", &mut s.dxn);
            lap(&mut t, &mut times.surface_io);
            Self::attention_grads(
                slots,
                &mut self.grads_attn,
                &self.scaled,
                &self.masks,
                lora,
                l,
                a,
                s,
                grads,
                times,
                &mut t,
            )?;
            cpu_ops::rmsnorm_backward(&mut s.dx, &mut s.dgain, &s.dxn, &a.x_in, w.rms_att(), &a.inv_rms1, &mut s.row);
            lap(&mut t, &mut times.rmsnorm);
        }
        Ok(loss)
    }
}
