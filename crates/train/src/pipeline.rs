//! The dynamic-weight training pipeline: one step's loss and gradients, with every
//! projection, the attention and the FFN — forward and backward — as device kernels
//! that are compiled once per run, and the rest on the CPU.
//!
//! Per layer and step: 3 forward evaluations (QKV, attention + Wo, SwiGLU FFN) and 3
//! backward ones (FFN, attention + Woᵀ, QKV). Weights enter the kernels inside their
//! input surfaces; one set of surfaces serves every layer, so each layer writes its own
//! weights and activations into them before its evaluations (each weight is copied once
//! per step per direction, whatever the number of layers).
//!
//! On the CPU: embedding, RMSNorm (forward and backward), RoPE (forward and backward),
//! residuals, QKV biases, the classifier with the cross-entropy over the full vocabulary,
//! and every weight gradient as a GEMM.

use std::time::Instant;

use device::{Device, Kernel, Surface};
use llama::{Config, Params};

use crate::binding::{IoConvention, KernelIo, Target};
use crate::cpu_ops::{self, ClassifierLoss, RopeTable};
use crate::kernels::{self, KernelDef, LayerDims};
use crate::linalg::{matmul_acc, MatMut, MatRef};
use crate::model::write_transposed;

/// Milliseconds spent per phase, summed since the last [`PhaseTimes::take`].
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PhaseTimes {
    pub device_forward: f64,
    pub device_backward: f64,
    pub surface_io: f64,
    pub rmsnorm: f64,
    pub classifier: f64,
    pub dw: f64,
    /// Embedding, RoPE, residuals, biases.
    pub other_cpu: f64,
}

impl PhaseTimes {
    /// Returns the times so far and starts again from zero.
    pub fn take(&mut self) -> PhaseTimes {
        std::mem::take(self)
    }

    pub fn total(&self) -> f64 {
        self.device_forward
            + self.device_backward
            + self.surface_io
            + self.rmsnorm
            + self.classifier
            + self.dw
            + self.other_cpu
    }
}

/// Adds the time since `*t` to `slot` and restarts `*t`.
fn lap(t: &mut Instant, slot: &mut f64) {
    let now = Instant::now();
    *slot += (now - *t).as_secs_f64() * 1e3;
    *t = now;
}

/// A compiled kernel, its surfaces and where its blocks and outputs sit in them.
struct Compiled {
    kernel: Box<dyn Kernel>,
    io: KernelIo,
    /// Input surfaces, reused by every layer.
    surfaces: Vec<Surface>,
    /// Output surfaces `[1, C, 1, T]`.
    outputs: Vec<Surface>,
}

impl Compiled {
    fn new(device: &dyn Device, def: KernelDef) -> device::Result<Compiled> {
        let kernel = device.compile(&def.program, &def.weights)?;
        let surfaces = kernel.inputs().iter().map(|v| Surface::zeros(v.ty.dtype, &v.ty.shape)).collect();
        let outputs = kernel.outputs().iter().map(|v| Surface::zeros(v.ty.dtype, &v.ty.shape)).collect();
        Ok(Compiled { kernel, io: def.io, surfaces, outputs })
    }

    /// Writes a `[rows, width]` row-major matrix into block `block`.
    fn write(&mut self, block: &str, data: &[f32]) {
        self.io.write(&mut self.surfaces, block, data);
    }

    /// Writes `W [out, in]` transposed (as `[in, out]`) into block `block` at column `col`.
    fn write_t(&mut self, block: &str, col: usize, w: &[f32], out: usize, inp: usize) {
        let (i, b) = self.io.block(block);
        write_transposed(&mut self.surfaces[i], b.s0 + col, w, out, inp);
    }

    fn eval(&mut self) -> device::Result<()> {
        let ins: Vec<&Surface> = self.surfaces.iter().collect();
        let mut outs: Vec<&mut Surface> = self.outputs.iter_mut().collect();
        self.kernel.eval(&ins, &mut outs)
    }

    /// Output `output` into `dst` ([`KernelIo::take`]: without a copy where it has a
    /// surface of its own, the CPU device's fp32 outputs).
    fn read(&mut self, output: &str, dst: &mut Vec<f32>) {
        self.io.take(&mut self.outputs, output, dst);
    }

    /// `f` of output `output`, read in place where the surface allows (fp32, a channel
    /// range), else through a copy into `scratch`.
    fn with<R>(&mut self, output: &str, scratch: &mut Vec<f32>, f: impl FnOnce(&[f32]) -> R) -> R {
        if let Some(v) = self.io.view(&self.outputs, output) {
            return f(v);
        }
        self.io.read(&self.outputs, output, scratch);
        f(scratch)
    }
}

/// What the forward pass keeps of one layer for the backward pass. All `[C, T]`.
pub(crate) struct LayerActs {
    /// Residual stream entering the layer, and its RMSNorm statistic and result.
    pub(crate) x_in: Vec<f32>,
    pub(crate) inv_rms1: Vec<f32>,
    pub(crate) xn1: Vec<f32>,
    /// Rotated queries and keys, values.
    pub(crate) q: Vec<f32>,
    pub(crate) k: Vec<f32>,
    pub(crate) v: Vec<f32>,
    /// Attention output before Wo.
    pub(crate) o: Vec<f32>,
    /// Residual stream after attention, and its RMSNorm.
    pub(crate) x_mid: Vec<f32>,
    pub(crate) inv_rms2: Vec<f32>,
    pub(crate) xn2: Vec<f32>,
    pub(crate) h1: Vec<f32>,
    pub(crate) h3: Vec<f32>,
    /// With QK-norm: the queries and keys before it, and its per-head statistics
    /// (`[n_heads, T]`, `[n_kv_heads, T]`); empty without.
    pub(crate) q_pre: Vec<f32>,
    pub(crate) k_pre: Vec<f32>,
    pub(crate) q_inv_rms: Vec<f32>,
    pub(crate) k_inv_rms: Vec<f32>,
}

impl LayerActs {
    pub(crate) fn new(d: &LayerDims, t: usize) -> LayerActs {
        let (dim, q_dim, kv, hid) = (d.dim, d.q_dim(), d.kv_dim(), d.hidden);
        LayerActs {
            x_in: vec![0.0; dim * t],
            inv_rms1: vec![0.0; t],
            xn1: vec![0.0; dim * t],
            q: vec![0.0; q_dim * t],
            k: vec![0.0; kv * t],
            v: vec![0.0; kv * t],
            o: vec![0.0; q_dim * t],
            x_mid: vec![0.0; dim * t],
            inv_rms2: vec![0.0; t],
            xn2: vec![0.0; dim * t],
            h1: vec![0.0; hid * t],
            h3: vec![0.0; hid * t],
            q_pre: Vec::new(),
            k_pre: Vec::new(),
            q_inv_rms: Vec::new(),
            k_inv_rms: Vec::new(),
        }
    }

    /// [`LayerActs::new`] plus the QK-norm buffers.
    pub(crate) fn with_qk_norm(d: &LayerDims, t: usize) -> LayerActs {
        LayerActs {
            q_pre: vec![0.0; d.q_dim() * t],
            k_pre: vec![0.0; d.kv_dim() * t],
            q_inv_rms: vec![0.0; d.n_heads * t],
            k_inv_rms: vec![0.0; d.n_kv_heads * t],
            ..LayerActs::new(d, t)
        }
    }
}

/// Gradient scratch buffers for the backward pass (one set, reused per layer).
struct Scratch {
    dx: Vec<f32>,
    /// The gradient at the FFN's output, kept while its dW GEMMs overlap later work.
    dy_ffn: Vec<f32>,
    dxn: Vec<f32>,
    dh1: Vec<f32>,
    dh3: Vec<f32>,
    gate: Vec<f32>,
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
    /// With QK-norm: the gradients before it (empty without).
    dq_pre: Vec<f32>,
    dk_pre: Vec<f32>,
    row: Vec<f32>,
    x_final: Vec<f32>,
    xn_final: Vec<f32>,
    inv_rms_final: Vec<f32>,
    y: Vec<f32>,
}

/// The dynamic-weight pipeline for one model shape and batch shape.
pub struct DynamicPipeline {
    config: Config,
    dims: LayerDims,
    batch: usize,
    seq: usize,
    qkv_fwd: Compiled,
    attn_fwd: Compiled,
    ffn_fwd: Compiled,
    ffn_bwd: Compiled,
    attn_bwd: Compiled,
    qkv_bwd: Compiled,
    acts: Vec<LayerActs>,
    scratch: Scratch,
    rope: RopeTable,
    classifier: ClassifierLoss,
    /// Time per phase since the last `times.take()`.
    pub times: PhaseTimes,
    /// Seconds spent compiling the kernels.
    pub compile_seconds: f64,
    /// Run weight-gradient GEMMs concurrently with the next device kernel (FFN dW with
    /// the attention backward, Wo's dW with the QKV backward). `bench train` measures
    /// whether it pays on this machine.
    pub overlap_dw: bool,
}

impl DynamicPipeline {
    /// Generates and compiles the six kernels for `batch` sequences of `seq` tokens, with
    /// the packed I/O convention.
    pub fn new(device: &dyn Device, config: &Config, batch: usize, seq: usize) -> device::Result<DynamicPipeline> {
        DynamicPipeline::with_io(device, config, batch, seq, IoConvention::Packed)
    }

    /// [`DynamicPipeline::new`] with the kernels' surfaces bound by `io`.
    pub fn with_io(
        device: &dyn Device,
        config: &Config,
        batch: usize,
        seq: usize,
        io: IoConvention,
    ) -> device::Result<DynamicPipeline> {
        let dims = LayerDims::of(config);
        let t = batch * seq;
        let dialect = Target::new(device.dialect(), io);
        let start = Instant::now();
        let qkv_fwd = Compiled::new(device, kernels::qkv_forward(&dims, t, dialect)?)?;
        let attn_fwd = Compiled::new(device, kernels::attention_forward(&dims, batch, seq, dialect)?)?;
        let ffn_fwd = Compiled::new(device, kernels::ffn_forward(&dims, t, dialect)?)?;
        let ffn_bwd = Compiled::new(device, kernels::ffn_backward(&dims, t, dialect)?)?;
        let attn_bwd = Compiled::new(device, kernels::attention_backward(&dims, batch, seq, dialect)?)?;
        let qkv_bwd = Compiled::new(device, kernels::qkv_backward(&dims, t, dialect)?)?;
        let compile_seconds = start.elapsed().as_secs_f64();
        let (dim, q_dim, kv, hid) = (dims.dim, dims.q_dim(), dims.kv_dim(), dims.hidden);
        let qk = config.qk_norm;
        Ok(DynamicPipeline {
            config: config.clone(),
            dims,
            batch,
            seq,
            qkv_fwd,
            attn_fwd,
            ffn_fwd,
            ffn_bwd,
            attn_bwd,
            qkv_bwd,
            acts: (0..config.n_layers)
                .map(|_| if qk { LayerActs::with_qk_norm(&dims, t) } else { LayerActs::new(&dims, t) })
                .collect(),
            scratch: Scratch {
                dx: vec![0.0; dim * t],
                dy_ffn: vec![0.0; dim * t],
                dxn: vec![0.0; dim * t],
                dh1: vec![0.0; hid * t],
                dh3: vec![0.0; hid * t],
                gate: vec![0.0; hid * t],
                dq: vec![0.0; q_dim * t],
                dk: vec![0.0; kv * t],
                dv: vec![0.0; kv * t],
                dq_pre: if qk { vec![0.0; q_dim * t] } else { Vec::new() },
                dk_pre: if qk { vec![0.0; kv * t] } else { Vec::new() },
                row: vec![0.0; t],
                x_final: vec![0.0; dim * t],
                xn_final: vec![0.0; dim * t],
                inv_rms_final: vec![0.0; t],
                y: vec![0.0; dim * t],
            },
            rope: RopeTable::for_config(config, seq),
            classifier: ClassifierLoss::new(config.vocab_size, dim, cpu_ops::DEFAULT_CLASSIFIER_CHUNK.min(t)),
            times: PhaseTimes::default(),
            compile_seconds,
            overlap_dw: false,
        })
    }

    /// Number of kernels this pipeline compiled.
    pub const KERNELS: usize = 6;

    /// Tokens per step.
    pub fn tokens(&self) -> usize {
        self.batch * self.seq
    }

    /// Mean cross-entropy of `params` on `inputs → targets` (`[B·S]` each, sequence `b`
    /// at `b·S..(b+1)·S`), without gradients.
    pub fn loss(&mut self, params: &Params, inputs: &[u32], targets: &[u32]) -> device::Result<f32> {
        self.forward(params, inputs)?;
        let mut t = Instant::now();
        let loss = self.classifier.forward(&self.scratch.xn_final, params.classifier(), targets);
        lap(&mut t, &mut self.times.classifier);
        Ok(loss)
    }

    /// Mean cross-entropy and its gradients, times `grad_scale`, accumulated into
    /// `grads` (which the caller zeroes once per optimizer step). Returns the loss.
    pub fn forward_backward(
        &mut self,
        params: &Params,
        grads: &mut Params,
        inputs: &[u32],
        targets: &[u32],
        grad_scale: f32,
    ) -> device::Result<f32> {
        self.forward(params, inputs)?;
        let loss = self.backward(params, grads, inputs, targets, grad_scale)?;
        Ok(loss)
    }

    fn forward(&mut self, params: &Params, inputs: &[u32]) -> device::Result<()> {
        let t_len = self.tokens();
        assert_eq!(inputs.len(), t_len, "inputs must be [B·S = {t_len}]");
        let cfg = &self.config;
        let (dim, q_dim, kv, hid) = (self.dims.dim, self.dims.q_dim(), self.dims.kv_dim(), self.dims.hidden);
        let eps = cfg.norm_eps;
        let times = &mut self.times;
        let mut t = Instant::now();

        let mut x = std::mem::take(&mut self.scratch.x_final);
        cpu_ops::embedding_forward(&mut x, params.token_embedding(), inputs, dim);
        lap(&mut t, &mut times.other_cpu);
        for l in 0..cfg.n_layers {
            let w = params.layer(l);
            let a = &mut self.acts[l];
            a.x_in.copy_from_slice(&x);
            cpu_ops::rmsnorm_forward(&mut a.xn1, &mut a.inv_rms1, &a.x_in, w.rms_att(), eps);
            lap(&mut t, &mut times.rmsnorm);

            // QKV projection.
            let k = &mut self.qkv_fwd;
            k.write("xn", &a.xn1);
            k.write_t("wqkv", 0, w.wq(), q_dim, dim);
            k.write_t("wqkv", q_dim, w.wk(), kv, dim);
            k.write_t("wqkv", q_dim + kv, w.wv(), kv, dim);
            lap(&mut t, &mut times.surface_io);
            k.eval()?;
            lap(&mut t, &mut times.device_forward);
            k.read("q", &mut a.q);
            k.read("k", &mut a.k);
            k.read("v", &mut a.v);
            lap(&mut t, &mut times.surface_io);
            if let Some((bq, bk, bv)) = w.qkv_bias() {
                add_bias(&mut a.q, bq, t_len);
                add_bias(&mut a.k, bk, t_len);
                add_bias(&mut a.v, bv, t_len);
            }
            if let Some((q_norm, k_norm)) = w.qk_norm() {
                head_norm_forward(&mut a.q, &mut a.q_pre, &mut a.q_inv_rms, q_norm, t_len, eps);
                head_norm_forward(&mut a.k, &mut a.k_pre, &mut a.k_inv_rms, k_norm, t_len, eps);
            }
            cpu_ops::rope_forward(&mut a.q, t_len, &self.rope);
            cpu_ops::rope_forward(&mut a.k, t_len, &self.rope);
            lap(&mut t, &mut times.other_cpu);

            // Attention and Wo.
            let k = &mut self.attn_fwd;
            k.write("q", &a.q);
            k.write_t("wo", 0, w.wo(), dim, q_dim);
            k.write("k", &a.k);
            k.write("v", &a.v);
            lap(&mut t, &mut times.surface_io);
            k.eval()?;
            lap(&mut t, &mut times.device_forward);
            k.read("o", &mut a.o);
            k.with("y", &mut self.scratch.y, |y| {
                for ((xm, xi), y) in a.x_mid.iter_mut().zip(&a.x_in).zip(y) {
                    *xm = xi + y;
                }
            });
            lap(&mut t, &mut times.other_cpu);
            cpu_ops::rmsnorm_forward(&mut a.xn2, &mut a.inv_rms2, &a.x_mid, w.rms_ffn(), eps);
            lap(&mut t, &mut times.rmsnorm);

            // SwiGLU FFN.
            let k = &mut self.ffn_fwd;
            k.write("xn", &a.xn2);
            k.write_t("w13", 0, w.w1(), hid, dim);
            k.write_t("w13", hid, w.w3(), hid, dim);
            k.write("w2", w.w2());
            lap(&mut t, &mut times.surface_io);
            k.eval()?;
            lap(&mut t, &mut times.device_forward);
            k.read("h1", &mut a.h1);
            k.read("h3", &mut a.h3);
            k.with("y", &mut self.scratch.y, |y| {
                for ((xo, xm), y) in x.iter_mut().zip(&a.x_mid).zip(y) {
                    *xo = xm + y;
                }
            });
            lap(&mut t, &mut times.other_cpu);
        }
        cpu_ops::rmsnorm_forward(
            &mut self.scratch.xn_final,
            &mut self.scratch.inv_rms_final,
            &x,
            params.rms_final(),
            eps,
        );
        self.scratch.x_final = x;
        lap(&mut t, &mut times.rmsnorm);
        Ok(())
    }

    fn backward(
        &mut self,
        params: &Params,
        grads: &mut Params,
        inputs: &[u32],
        targets: &[u32],
        grad_scale: f32,
    ) -> device::Result<f32> {
        let t_len = self.tokens();
        assert_eq!(targets.len(), t_len, "targets must be [B·S = {t_len}]");
        let (dim, q_dim, kv, hid) = (self.dims.dim, self.dims.q_dim(), self.dims.kv_dim(), self.dims.hidden);
        let times = &mut self.times;
        let s = &mut self.scratch;
        let mut t = Instant::now();

        // Classifier and loss: dxn_final into s.dxn, dWcls into its gradient.
        s.dxn.fill(0.0);
        let loss = {
            let dwcls = if grads.wcls().is_some() {
                grads.wcls_mut().expect("checked just above")
            } else {
                grads.token_embedding_mut()
            };
            self.classifier.forward_backward(&s.xn_final, params.classifier(), targets, grad_scale, &mut s.dxn, dwcls)
        };
        lap(&mut t, &mut times.classifier);
        s.dx.fill(0.0);
        cpu_ops::rmsnorm_backward(
            &mut s.dx,
            grads.rms_final_mut(),
            &s.dxn,
            &s.x_final,
            params.rms_final(),
            &s.inv_rms_final,
            &mut s.row,
        );
        lap(&mut t, &mut times.rmsnorm);

        for l in (0..self.config.n_layers).rev() {
            let w = params.layer(l);
            let a = &self.acts[l];
            let mut g = grads.layer_mut(l);

            // FFN backward: s.dx is the gradient at the layer's output (= at the FFN's
            // output, through the residual).
            let k = &mut self.ffn_bwd;
            k.write("dy", &s.dx);
            k.write("w2", w.w2());
            k.write("h1", &a.h1);
            k.write("h3", &a.h3);
            k.write("w1", w.w1());
            k.write("w3", w.w3());
            lap(&mut t, &mut times.surface_io);
            k.eval()?;
            lap(&mut t, &mut times.device_backward);
            k.read("dx", &mut s.dxn);
            k.read("dh1", &mut s.dh1);
            k.read("dh3", &mut s.dh3);
            k.read("gate", &mut s.gate);
            lap(&mut t, &mut times.surface_io);
            s.dy_ffn.copy_from_slice(&s.dx);
            let ffn_dw = |g: &mut llama::LayerMut<'_>, dy: &[f32], gate: &[f32], dh1: &[f32], dh3: &[f32]| {
                // dW2 [D, H] += dy [D, T] · gateᵀ ; dW1, dW3 [H, D] += dh [H, T] · xn2ᵀ
                let gate_t = MatRef::new(gate, hid, t_len).t();
                matmul_acc(MatMut::new(g.w2_mut(), dim, hid), MatRef::new(dy, dim, t_len), gate_t);
                let xn2 = MatRef::new(&a.xn2, dim, t_len).t();
                matmul_acc(MatMut::new(g.w1_mut(), hid, dim), MatRef::new(dh1, hid, t_len), xn2);
                matmul_acc(MatMut::new(g.w3_mut(), hid, dim), MatRef::new(dh3, hid, t_len), xn2);
            };
            if !self.overlap_dw {
                ffn_dw(&mut g, &s.dy_ffn, &s.gate, &s.dh1, &s.dh3);
                lap(&mut t, &mut times.dw);
            }
            // The residual carries s.dx through; the FFN branch adds its part.
            cpu_ops::rmsnorm_backward(
                &mut s.dx,
                g.rms_ffn_mut(),
                &s.dxn,
                &a.x_mid,
                w.rms_ffn(),
                &a.inv_rms2,
                &mut s.row,
            );
            lap(&mut t, &mut times.rmsnorm);

            // Attention backward (with Woᵀ): s.dx is now the gradient at x_mid.
            let k = &mut self.attn_bwd;
            k.write("dy", &s.dx);
            k.write("q", &a.q);
            k.write("o", &a.o);
            k.write("wo", w.wo());
            k.write("k", &a.k);
            k.write("v", &a.v);
            lap(&mut t, &mut times.surface_io);
            if self.overlap_dw {
                let (dy, gate, dh1, dh3) = (&s.dy_ffn, &s.gate, &s.dh1, &s.dh3);
                let (done, ()) = rayon::join(|| k.eval(), || ffn_dw(&mut g, dy, gate, dh1, dh3));
                done?;
            } else {
                k.eval()?;
            }
            lap(&mut t, &mut times.device_backward);
            k.read("dq", &mut s.dq);
            k.read("dk", &mut s.dk);
            k.read("dv", &mut s.dv);
            lap(&mut t, &mut times.surface_io);
            // dWo [D, Q] += dy [D, T] · oᵀ (s.dx stays the gradient at x_mid until the
            // attention branch's RMSNorm backward below).
            let wo_dw = |g: &mut llama::LayerMut<'_>, dy: &[f32]| {
                let o_t = MatRef::new(&a.o, q_dim, t_len).t();
                matmul_acc(MatMut::new(g.wo_mut(), dim, q_dim), MatRef::new(dy, dim, t_len), o_t);
            };
            if !self.overlap_dw {
                wo_dw(&mut g, &s.dx);
                lap(&mut t, &mut times.dw);
            }
            cpu_ops::rope_backward(&mut s.dq, t_len, &self.rope);
            cpu_ops::rope_backward(&mut s.dk, t_len, &self.rope);
            if let Some((q_norm, k_norm)) = w.qk_norm() {
                let (dq_norm, dk_norm) = g.qk_norm_grads();
                head_norm_backward(&mut s.dq, &mut s.dq_pre, dq_norm, &a.q_pre, q_norm, &a.q_inv_rms, &mut s.row);
                head_norm_backward(&mut s.dk, &mut s.dk_pre, dk_norm, &a.k_pre, k_norm, &a.k_inv_rms, &mut s.row);
            }
            bias_grads(&mut g, &s.dq, &s.dk, &s.dv, t_len);
            lap(&mut t, &mut times.other_cpu);

            // QKV backward.
            let k = &mut self.qkv_bwd;
            k.write("dq", &s.dq);
            k.write("wq", w.wq());
            k.write("dk", &s.dk);
            k.write("dv", &s.dv);
            k.write("wk", w.wk());
            k.write("wv", w.wv());
            lap(&mut t, &mut times.surface_io);
            if self.overlap_dw {
                let dy = &s.dx;
                let (done, ()) = rayon::join(|| k.eval(), || wo_dw(&mut g, dy));
                done?;
            } else {
                k.eval()?;
            }
            lap(&mut t, &mut times.device_backward);
            k.read("dx", &mut s.dxn);
            lap(&mut t, &mut times.surface_io);
            // dWq [Q, D] += dq · xn1ᵀ ; dWk, dWv [KV, D] += dk/dv · xn1ᵀ
            let xn1 = MatRef::new(&a.xn1, dim, t_len).t();
            matmul_acc(MatMut::new(g.wq_mut(), q_dim, dim), MatRef::new(&s.dq, q_dim, t_len), xn1);
            matmul_acc(MatMut::new(g.wk_mut(), kv, dim), MatRef::new(&s.dk, kv, t_len), xn1);
            matmul_acc(MatMut::new(g.wv_mut(), kv, dim), MatRef::new(&s.dv, kv, t_len), xn1);
            lap(&mut t, &mut times.dw);
            cpu_ops::rmsnorm_backward(
                &mut s.dx,
                g.rms_att_mut(),
                &s.dxn,
                &a.x_in,
                w.rms_att(),
                &a.inv_rms1,
                &mut s.row,
            );
            lap(&mut t, &mut times.rmsnorm);
        }
        cpu_ops::embedding_backward(grads.token_embedding_mut(), &s.dx, inputs, dim);
        lap(&mut t, &mut times.other_cpu);
        Ok(loss)
    }
}

/// QK-norm: RMSNorm of every head of `x: [heads·hd, T]` (each head's `[hd, T]` rows
/// are contiguous), in place, with the gain `gain: [hd]` shared by the heads. `pre`
/// receives the input and `inv_rms: [heads, T]` the statistics, for the backward.
pub(crate) fn head_norm_forward(
    x: &mut [f32],
    pre: &mut [f32],
    inv_rms: &mut [f32],
    gain: &[f32],
    t_len: usize,
    eps: f32,
) {
    pre.copy_from_slice(x);
    let head = gain.len() * t_len;
    for ((y, x), inv) in x.chunks_mut(head).zip(pre.chunks(head)).zip(inv_rms.chunks_mut(t_len)) {
        cpu_ops::rmsnorm_forward(y, inv, x, gain, eps);
    }
}

/// Backward of [`head_norm_forward`], in place: `d` holds the gradient at the normed
/// values and becomes the gradient at `pre`; `dgain` accumulates. `d_pre` and `row`
/// (`[T]`) are scratch.
pub(crate) fn head_norm_backward(
    d: &mut [f32],
    d_pre: &mut [f32],
    dgain: &mut [f32],
    pre: &[f32],
    gain: &[f32],
    inv_rms: &[f32],
    row: &mut [f32],
) {
    let t_len = row.len();
    let head = gain.len() * t_len;
    d_pre.fill(0.0);
    for (((dx, dy), x), inv) in
        d_pre.chunks_mut(head).zip(d.chunks(head)).zip(pre.chunks(head)).zip(inv_rms.chunks(t_len))
    {
        cpu_ops::rmsnorm_backward(dx, dgain, dy, x, gain, inv, row);
    }
    d.copy_from_slice(d_pre);
}

fn add_bias(x: &mut [f32], bias: &[f32], t_len: usize) {
    for (row, &b) in x.chunks_mut(t_len).zip(bias) {
        row.iter_mut().for_each(|v| *v += b);
    }
}

/// Bias gradients (when the model has QKV biases): the sum of each row's gradient.
fn bias_grads(g: &mut llama::LayerMut<'_>, dq: &[f32], dk: &[f32], dv: &[f32], t_len: usize) {
    for (which, d) in [dq, dk, dv].into_iter().enumerate() {
        if let Some(db) = g.qkv_bias_mut(which) {
            for (b, row) in db.iter_mut().zip(d.chunks(t_len)) {
                *b += row.iter().sum::<f32>();
            }
        }
    }
}
