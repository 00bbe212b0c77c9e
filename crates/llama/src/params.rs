//! A model's fp32 parameters: one contiguous allocation with named views.
//!
//! Following llm.c, every parameter lives in a single `Vec<f32>` so that optimizers,
//! gradient buffers and checkpoints can treat the model as one flat array, while code
//! that computes reads named tensors through a [`Layout`]. Matrices are row-major
//! `(out, in)` as in PyTorch's `nn.Linear` and llama2.c's files: row `o` of `wq` holds
//! the weights that produce output channel `o`.
//!
//! Memory order (the order of [`Params::tensors`]):
//!
//! ```text
//! token_embedding                       [vocab, dim]
//! for each layer l:
//!   layers.l.rms_att                    [dim]
//!   layers.l.wq                         [q_dim, dim]                   (q_dim = n_heads·head_dim, = dim
//!   layers.l.wk, layers.l.wv            [kv_dim, dim]                   unless head_dim is set apart)
//!   layers.l.bq | bk | bv               [q_dim] | [kv_dim] | [kv_dim] (only with qkv_bias)
//!   layers.l.q_norm | k_norm            [head_dim] | [head_dim]        (only with qk_norm)
//!   layers.l.wo                         [dim, q_dim]
//!   layers.l.rms_ffn                    [dim]
//!   layers.l.w1                         [hidden, dim]
//!   layers.l.w2                         [dim, hidden]
//!   layers.l.w3                         [hidden, dim]
//! rms_final                             [dim]
//! wcls                                  [vocab, dim]                   (only when not shared)
//! ```

use std::ops::Range;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use crate::config::Config;
use crate::error::{err, Result};

/// Standard deviation of every weight matrix and the embedding at initialization
/// (llama2.c `model.py` `_init_weights`, after GPT-2).
pub const INIT_STD: f32 = 0.02;

/// What a tensor is. Together with a layer index it identifies a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TensorKind {
    TokenEmbedding,
    RmsAtt,
    Wq,
    Wk,
    Wv,
    Bq,
    Bk,
    Bv,
    QNorm,
    KNorm,
    Wo,
    RmsFfn,
    W1,
    W2,
    W3,
    RmsFinal,
    Wcls,
}

impl TensorKind {
    /// The short name used in tensor names (`layers.3.wq`).
    pub fn name(self) -> &'static str {
        match self {
            TensorKind::TokenEmbedding => "token_embedding",
            TensorKind::RmsAtt => "rms_att",
            TensorKind::Wq => "wq",
            TensorKind::Wk => "wk",
            TensorKind::Wv => "wv",
            TensorKind::Bq => "bq",
            TensorKind::Bk => "bk",
            TensorKind::Bv => "bv",
            TensorKind::QNorm => "q_norm",
            TensorKind::KNorm => "k_norm",
            TensorKind::Wo => "wo",
            TensorKind::RmsFfn => "rms_ffn",
            TensorKind::W1 => "w1",
            TensorKind::W2 => "w2",
            TensorKind::W3 => "w3",
            TensorKind::RmsFinal => "rms_final",
            TensorKind::Wcls => "wcls",
        }
    }

    /// Whether the tensor is a matrix (2-D). Matrices get weight decay, norms and biases
    /// don't: llama2.c `configure_optimizers` decays exactly the parameters with
    /// `dim() >= 2`, which includes the token embedding and the classifier.
    pub fn is_matrix(self) -> bool {
        !matches!(
            self,
            TensorKind::RmsAtt
                | TensorKind::RmsFfn
                | TensorKind::RmsFinal
                | TensorKind::Bq
                | TensorKind::Bk
                | TensorKind::Bv
                | TensorKind::QNorm
                | TensorKind::KNorm
        )
    }

    /// Whether the tensor is one of the per-layer ones.
    pub fn is_per_layer(self) -> bool {
        !matches!(self, TensorKind::TokenEmbedding | TensorKind::RmsFinal | TensorKind::Wcls)
    }
}

/// One tensor's place in the flat parameter array.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    /// `token_embedding`, `layers.{l}.{kind}`, `rms_final` or `wcls`.
    pub name: String,
    pub kind: TensorKind,
    /// The layer, for per-layer tensors.
    pub layer: Option<usize>,
    /// Row-major shape: `[out, in]` for matrices, `[n]` for vectors.
    pub shape: Vec<usize>,
    /// First element in the flat array.
    pub offset: usize,
}

impl TensorSpec {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Element range in the flat array.
    pub fn range(&self) -> Range<usize> {
        self.offset..self.offset + self.len()
    }

    /// See [`TensorKind::is_matrix`].
    pub fn is_matrix(&self) -> bool {
        self.kind.is_matrix()
    }
}

/// Indices into [`Layout::specs`] of one layer's tensors.
#[derive(Clone, Debug, PartialEq, Eq)]
struct LayerSlots {
    rms_att: usize,
    wq: usize,
    wk: usize,
    wv: usize,
    /// `[bq, bk, bv]` when the config has QKV biases.
    bias: Option<[usize; 3]>,
    /// `[q_norm, k_norm]` when the config has QK-norm.
    qk_norm: Option<[usize; 2]>,
    wo: usize,
    rms_ffn: usize,
    w1: usize,
    w2: usize,
    w3: usize,
}

/// Where every tensor of a config lives in the flat array. Computed once per config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    specs: Vec<TensorSpec>,
    layers: Vec<LayerSlots>,
    token_embedding: usize,
    rms_final: usize,
    wcls: Option<usize>,
    len: usize,
}

impl Layout {
    /// The layout of `config` (which should be valid; see [`Config::validate`]).
    pub fn new(config: &Config) -> Layout {
        let (dim, q_dim, kv_dim, hidden, vocab) =
            (config.dim, config.q_dim(), config.kv_dim(), config.hidden_dim, config.vocab_size);
        let head_dim = config.head_dim();
        let mut specs = Vec::new();
        let mut offset = 0;
        let mut push = |kind: TensorKind, layer: Option<usize>, shape: Vec<usize>| {
            let name = match layer {
                Some(l) => format!("layers.{l}.{}", kind.name()),
                None => kind.name().to_string(),
            };
            let spec = TensorSpec { name, kind, layer, shape, offset };
            offset += spec.len();
            specs.push(spec);
            specs.len() - 1
        };
        let token_embedding = push(TensorKind::TokenEmbedding, None, vec![vocab, dim]);
        let mut layers = Vec::with_capacity(config.n_layers);
        for l in 0..config.n_layers {
            let l_ = Some(l);
            let rms_att = push(TensorKind::RmsAtt, l_, vec![dim]);
            let wq = push(TensorKind::Wq, l_, vec![q_dim, dim]);
            let wk = push(TensorKind::Wk, l_, vec![kv_dim, dim]);
            let wv = push(TensorKind::Wv, l_, vec![kv_dim, dim]);
            let bias = config.qkv_bias.then(|| {
                [
                    push(TensorKind::Bq, l_, vec![q_dim]),
                    push(TensorKind::Bk, l_, vec![kv_dim]),
                    push(TensorKind::Bv, l_, vec![kv_dim]),
                ]
            });
            let qk_norm = config
                .qk_norm
                .then(|| [push(TensorKind::QNorm, l_, vec![head_dim]), push(TensorKind::KNorm, l_, vec![head_dim])]);
            let wo = push(TensorKind::Wo, l_, vec![dim, q_dim]);
            let rms_ffn = push(TensorKind::RmsFfn, l_, vec![dim]);
            let w1 = push(TensorKind::W1, l_, vec![hidden, dim]);
            let w2 = push(TensorKind::W2, l_, vec![dim, hidden]);
            let w3 = push(TensorKind::W3, l_, vec![hidden, dim]);
            layers.push(LayerSlots { rms_att, wq, wk, wv, bias, qk_norm, wo, rms_ffn, w1, w2, w3 });
        }
        let rms_final = push(TensorKind::RmsFinal, None, vec![dim]);
        let wcls = (!config.shared_classifier).then(|| push(TensorKind::Wcls, None, vec![vocab, dim]));
        Layout { specs, layers, token_embedding, rms_final, wcls, len: offset }
    }

    /// Every tensor, in memory order; consecutive specs are adjacent (no gaps).
    pub fn specs(&self) -> &[TensorSpec] {
        &self.specs
    }

    /// Total number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }

    /// The spec of a tensor by kind (and layer, for per-layer kinds); `None` if the model
    /// has no such tensor (a bias without `qkv_bias`, `wcls` when shared, a bad layer).
    pub fn find(&self, kind: TensorKind, layer: Option<usize>) -> Option<&TensorSpec> {
        self.index_of(kind, layer).map(|i| &self.specs[i])
    }

    /// Position in [`specs`](Layout::specs) of the tensor [`find`](Layout::find) returns.
    pub fn index_of(&self, kind: TensorKind, layer: Option<usize>) -> Option<usize> {
        match (kind, layer) {
            (TensorKind::TokenEmbedding, None) => Some(self.token_embedding),
            (TensorKind::RmsFinal, None) => Some(self.rms_final),
            (TensorKind::Wcls, None) => self.wcls,
            (kind, Some(l)) if kind.is_per_layer() => {
                let s = self.layers.get(l)?;
                match kind {
                    TensorKind::RmsAtt => Some(s.rms_att),
                    TensorKind::Wq => Some(s.wq),
                    TensorKind::Wk => Some(s.wk),
                    TensorKind::Wv => Some(s.wv),
                    TensorKind::Bq => s.bias.map(|b| b[0]),
                    TensorKind::Bk => s.bias.map(|b| b[1]),
                    TensorKind::Bv => s.bias.map(|b| b[2]),
                    TensorKind::QNorm => s.qk_norm.map(|n| n[0]),
                    TensorKind::KNorm => s.qk_norm.map(|n| n[1]),
                    TensorKind::Wo => Some(s.wo),
                    TensorKind::RmsFfn => Some(s.rms_ffn),
                    TensorKind::W1 => Some(s.w1),
                    TensorKind::W2 => Some(s.w2),
                    TensorKind::W3 => Some(s.w3),
                    _ => None,
                }
            }
            _ => None,
        }
    }

    /// The spec of a tensor by name (`"layers.2.w1"`).
    pub fn by_name(&self, name: &str) -> Option<&TensorSpec> {
        self.specs.iter().find(|s| s.name == name)
    }
}

/// A model's parameters (or anything shaped like them: gradients, Adam moments).
///
/// ```
/// use llama::{Config, Params};
///
/// let config = Config::preset("tiny").unwrap();
/// let params = Params::init(&config, 42).unwrap();
/// let wq: &[f32] = params.layer(1).wq(); // [dim, dim], row-major (out, in)
/// assert_eq!(wq.len(), 64 * 64);
/// for (name, shape, values) in params.tensors() {
///     assert_eq!(shape.iter().product::<usize>(), values.len(), "{name}");
/// }
/// assert_eq!(params.as_slice().len(), config.n_params());
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Params {
    config: Config,
    layout: Layout,
    data: Vec<f32>,
}

impl Params {
    /// All zeros (a gradient or optimizer-moment buffer). Errors if `config` is invalid.
    pub fn zeros(config: &Config) -> Result<Params> {
        config.validate()?;
        let layout = Layout::new(config);
        let data = vec![0.0; layout.len()];
        Ok(Params { config: config.clone(), layout, data })
    }

    /// Wraps an existing flat array; its length must be `config.n_params()`.
    pub fn from_vec(config: &Config, data: Vec<f32>) -> Result<Params> {
        config.validate()?;
        let layout = Layout::new(config);
        if data.len() != layout.len() {
            return Err(err!(Mismatch, "parameter array has {} values, the config needs {}", data.len(), layout.len()));
        }
        Ok(Params { config: config.clone(), layout, data })
    }

    /// Fresh parameters as llama2.c's `train.py` makes them: every matrix and the
    /// embedding ~ N(0, 0.02²), the residual projections `wo` and `w2` ~ N(0, (0.02/√(2L))²)
    /// (GPT-2's scaled init), norms 1, biases 0. Deterministic in `seed` (ChaCha8).
    ///
    /// llama2.c's `model.py` applies the scaled init to names ending in `wo.weight` and
    /// `w3.weight`; `w3` is the gate's partner, not a residual projection, so we follow
    /// the GPT-2 paper's intent and scale `w2`, which writes into the residual stream.
    pub fn init(config: &Config, seed: u64) -> Result<Params> {
        let mut params = Params::zeros(config)?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let residual_std = INIT_STD / (2.0 * config.n_layers as f32).sqrt();
        let normal = Normal::new(0.0f32, INIT_STD).expect("INIT_STD is positive");
        let residual = Normal::new(0.0f32, residual_std).expect("n_layers > 0 after validate");
        for (spec, values) in params.layout.specs.iter().zip(split_by_specs(&mut params.data, &params.layout.specs)) {
            match spec.kind {
                TensorKind::RmsAtt
                | TensorKind::RmsFfn
                | TensorKind::RmsFinal
                | TensorKind::QNorm
                | TensorKind::KNorm => values.fill(1.0),
                TensorKind::Bq | TensorKind::Bk | TensorKind::Bv => values.fill(0.0),
                TensorKind::Wo | TensorKind::W2 => values.iter_mut().for_each(|v| *v = residual.sample(&mut rng)),
                _ => values.iter_mut().for_each(|v| *v = normal.sample(&mut rng)),
            }
        }
        Ok(params)
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Checks that every weight is finite (one pass over the array; NaN or infinite
    /// weights make a model print garbage, so they are refused at load). The error
    /// names the tensor and the element.
    pub fn check_finite(&self) -> Result<()> {
        let Some(i) = self.data.iter().position(|v| !v.is_finite()) else { return Ok(()) };
        let spec = self.layout.specs.iter().find(|s| s.range().contains(&i));
        let (name, at) = spec.map_or(("?", i), |s| (s.name.as_str(), i - s.offset));
        Err(err!(Format, "tensor {name} holds {} at element {at}: weights must be finite", self.data[i]))
    }

    /// The whole flat array, in [`Layout`] order.
    pub fn as_slice(&self) -> &[f32] {
        &self.data
    }

    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        &mut self.data
    }

    pub fn into_vec(self) -> Vec<f32> {
        self.data
    }

    /// Number of scalars (`config().n_params()`).
    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// A tensor by spec (from this layout).
    pub fn get(&self, spec: &TensorSpec) -> &[f32] {
        &self.data[spec.range()]
    }

    pub fn get_mut(&mut self, spec: &TensorSpec) -> &mut [f32] {
        &mut self.data[spec.range()]
    }

    /// A tensor by name (`"layers.0.wq"`), `None` if the model has no such tensor.
    pub fn by_name(&self, name: &str) -> Option<&[f32]> {
        self.layout.by_name(name).map(|s| &self.data[s.range()])
    }

    pub fn by_name_mut(&mut self, name: &str) -> Option<&mut [f32]> {
        let range = self.layout.by_name(name)?.range();
        Some(&mut self.data[range])
    }

    fn slot(&self, index: usize) -> &[f32] {
        &self.data[self.layout.specs[index].range()]
    }

    fn slot_mut(&mut self, index: usize) -> &mut [f32] {
        let range = self.layout.specs[index].range();
        &mut self.data[range]
    }

    /// `[vocab, dim]`: row `t` is token `t`'s embedding.
    pub fn token_embedding(&self) -> &[f32] {
        self.slot(self.layout.token_embedding)
    }

    pub fn token_embedding_mut(&mut self) -> &mut [f32] {
        self.slot_mut(self.layout.token_embedding)
    }

    /// `[dim]`: the final RMSNorm's gain.
    pub fn rms_final(&self) -> &[f32] {
        self.slot(self.layout.rms_final)
    }

    pub fn rms_final_mut(&mut self) -> &mut [f32] {
        self.slot_mut(self.layout.rms_final)
    }

    /// `[vocab, dim]`: the separate classifier, `None` when shared with the embedding.
    pub fn wcls(&self) -> Option<&[f32]> {
        self.layout.wcls.map(|i| self.slot(i))
    }

    pub fn wcls_mut(&mut self) -> Option<&mut [f32]> {
        let index = self.layout.wcls?;
        Some(self.slot_mut(index))
    }

    /// `[vocab, dim]`: the matrix that produces logits — `wcls`, or the token embedding
    /// when the classifier is shared.
    pub fn classifier(&self) -> &[f32] {
        self.wcls().unwrap_or_else(|| self.token_embedding())
    }

    /// Layer `l`'s tensors. Panics if `l >= n_layers` (a programming error).
    pub fn layer(&self, l: usize) -> Layer<'_> {
        assert!(l < self.layout.layers.len(), "layer {l} of a {}-layer model", self.layout.layers.len());
        Layer { params: self, slots: &self.layout.layers[l] }
    }

    /// Layer `l`'s tensors, writable one at a time. Panics if `l >= n_layers`.
    pub fn layer_mut(&mut self, l: usize) -> LayerMut<'_> {
        assert!(l < self.layout.layers.len(), "layer {l} of a {}-layer model", self.layout.layers.len());
        let slots = self.layout.layers[l].clone();
        LayerMut { params: self, slots }
    }

    /// Every tensor as `(name, shape, values)`, in memory order.
    pub fn tensors(&self) -> impl Iterator<Item = (&str, &[usize], &[f32])> + '_ {
        self.layout.specs.iter().map(|s| (s.name.as_str(), s.shape.as_slice(), &self.data[s.range()]))
    }

    /// Every tensor as `(spec, values)` with writable values, in memory order.
    pub fn tensors_mut(&mut self) -> impl Iterator<Item = (&TensorSpec, &mut [f32])> + '_ {
        let specs = &self.layout.specs;
        specs.iter().zip(split_by_specs(&mut self.data, specs))
    }
}

/// Splits the flat array into one mutable slice per spec (specs are adjacent, in order).
fn split_by_specs<'a>(mut data: &'a mut [f32], specs: &[TensorSpec]) -> Vec<&'a mut [f32]> {
    let mut out = Vec::with_capacity(specs.len());
    for spec in specs {
        let (head, rest) = std::mem::take(&mut data).split_at_mut(spec.len());
        out.push(head);
        data = rest;
    }
    out
}

macro_rules! layer_accessors {
    ($( $(#[$doc:meta])* $field:ident, $field_mut:ident; )*) => {
        impl<'a> Layer<'a> {
            $( $(#[$doc])* pub fn $field(&self) -> &'a [f32] { self.params.slot(self.slots.$field) } )*
        }
        impl LayerMut<'_> {
            $( $(#[$doc])* pub fn $field(&self) -> &[f32] { self.params.slot(self.slots.$field) } )*
            $( $(#[$doc])* pub fn $field_mut(&mut self) -> &mut [f32] { self.params.slot_mut(self.slots.$field) } )*
        }
    };
}

/// Read-only view of one layer's tensors (see [`Params::layer`]).
#[derive(Clone, Copy)]
pub struct Layer<'a> {
    params: &'a Params,
    slots: &'a LayerSlots,
}

/// Writable view of one layer's tensors (see [`Params::layer_mut`]).
pub struct LayerMut<'a> {
    params: &'a mut Params,
    slots: LayerSlots,
}

layer_accessors! {
    /// `[dim]`: attention RMSNorm gain.
    rms_att, rms_att_mut;
    /// `[q_dim, dim]`: query projection (out = q_dim = n_heads·head_dim, in = dim).
    wq, wq_mut;
    /// `[kv_dim, dim]`: key projection.
    wk, wk_mut;
    /// `[kv_dim, dim]`: value projection.
    wv, wv_mut;
    /// `[dim, q_dim]`: attention output projection.
    wo, wo_mut;
    /// `[dim]`: feed-forward RMSNorm gain.
    rms_ffn, rms_ffn_mut;
    /// `[hidden, dim]`: gate projection (SiLU side).
    w1, w1_mut;
    /// `[dim, hidden]`: down projection.
    w2, w2_mut;
    /// `[hidden, dim]`: up projection.
    w3, w3_mut;
}

impl<'a> Layer<'a> {
    /// `(bq [q_dim], bk [kv_dim], bv [kv_dim])` when the config has QKV biases.
    pub fn qkv_bias(&self) -> Option<(&'a [f32], &'a [f32], &'a [f32])> {
        let [q, k, v] = self.slots.bias?;
        Some((self.params.slot(q), self.params.slot(k), self.params.slot(v)))
    }

    /// `(q_norm [head_dim], k_norm [head_dim])`, the per-head RMSNorm gains, when the
    /// config has QK-norm.
    pub fn qk_norm(&self) -> Option<(&'a [f32], &'a [f32])> {
        let [q, k] = self.slots.qk_norm?;
        Some((self.params.slot(q), self.params.slot(k)))
    }
}

impl LayerMut<'_> {
    /// `bq`, `bk` or `bv` (pick with `which` = 0, 1, 2), writable; `None` without biases.
    pub fn qkv_bias_mut(&mut self, which: usize) -> Option<&mut [f32]> {
        let index = *self.slots.bias?.get(which)?;
        Some(self.params.slot_mut(index))
    }

    /// The gradients of `q_norm` and `k_norm` together (both writable at once).
    ///
    /// # Panics
    /// If the config has no QK-norm (a programming error: check [`Layer::qk_norm`]).
    pub fn qk_norm_grads(&mut self) -> (&mut [f32], &mut [f32]) {
        let [q, k] = self.slots.qk_norm.expect("qk_norm_grads on a model without QK-norm");
        let (rq, rk) = (self.params.layout.specs[q].range(), self.params.layout.specs[k].range());
        assert!(rq.end <= rk.start, "q_norm precedes k_norm in the layout");
        let (head, tail) = self.params.data.split_at_mut(rk.start);
        (&mut head[rq], &mut tail[..rk.len()])
    }

    /// `q_norm` or `k_norm` (pick with `which` = 0, 1), writable; `None` without QK-norm.
    pub fn qk_norm_mut(&mut self, which: usize) -> Option<&mut [f32]> {
        let index = *self.slots.qk_norm?.get(which)?;
        Some(self.params.slot_mut(index))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn biased_unshared() -> Config {
        Config { qkv_bias: true, shared_classifier: false, ..Config::preset("tiny").unwrap() }
    }

    #[test]
    fn layout_is_contiguous_and_complete() {
        for config in [Config::preset("stories260k").unwrap(), biased_unshared()] {
            let layout = Layout::new(&config);
            let mut next = 0;
            for spec in layout.specs() {
                assert_eq!(spec.offset, next, "{}", spec.name);
                next += spec.len();
            }
            assert_eq!(next, config.n_params());
            assert_eq!(layout.len(), config.n_params());
        }
    }

    #[test]
    fn names_shapes_and_lookup_agree() {
        let config = biased_unshared();
        let layout = Layout::new(&config);
        let wk = layout.find(TensorKind::Wk, Some(3)).unwrap();
        assert_eq!(wk.name, "layers.3.wk");
        assert_eq!(wk.shape, vec![32, 64]);
        assert_eq!(layout.by_name("layers.3.wk"), Some(wk));
        assert_eq!(layout.find(TensorKind::Bk, Some(0)).unwrap().shape, vec![32]);
        assert_eq!(layout.find(TensorKind::W2, Some(1)).unwrap().shape, vec![64, 192]);
        assert_eq!(layout.find(TensorKind::Wcls, None).unwrap().shape, vec![512, 64]);
        assert!(layout.find(TensorKind::Wq, Some(4)).is_none());
        assert!(layout.find(TensorKind::Wq, None).is_none());
        let plain = Layout::new(&Config::preset("tiny").unwrap());
        assert!(plain.find(TensorKind::Bq, Some(0)).is_none());
        assert!(plain.find(TensorKind::Wcls, None).is_none());
    }

    #[test]
    fn matrices_are_the_two_dimensional_tensors() {
        let layout = Layout::new(&biased_unshared());
        for spec in layout.specs() {
            assert_eq!(spec.is_matrix(), spec.shape.len() == 2, "{}", spec.name);
        }
    }

    #[test]
    fn views_read_and_write_the_right_elements() {
        let config = biased_unshared();
        let mut params = Params::zeros(&config).unwrap();
        params.layer_mut(2).w3_mut().fill(3.0);
        params.layer_mut(2).qkv_bias_mut(1).unwrap().fill(7.0);
        params.wcls_mut().unwrap()[5] = 9.0;
        let w3 = Layout::new(&config).find(TensorKind::W3, Some(2)).unwrap().clone();
        for (i, v) in params.as_slice().iter().enumerate() {
            let expected = if w3.range().contains(&i) {
                3.0
            } else if params.layout().find(TensorKind::Bk, Some(2)).unwrap().range().contains(&i) {
                7.0
            } else if i == params.layout().find(TensorKind::Wcls, None).unwrap().offset + 5 {
                9.0
            } else {
                0.0
            };
            assert_eq!(*v, expected, "element {i}");
        }
        assert_eq!(params.layer(2).qkv_bias().unwrap().1, &[7.0; 32][..]);
        assert_eq!(params.classifier()[5], 9.0);
        assert_eq!(params.by_name("layers.2.w3").unwrap(), params.layer(2).w3());
    }

    #[test]
    fn init_is_deterministic_with_the_documented_statistics() {
        let config = Config { n_layers: 8, ..biased_unshared() };
        let a = Params::init(&config, 7).unwrap();
        assert_eq!(a, Params::init(&config, 7).unwrap());
        assert_ne!(a, Params::init(&config, 8).unwrap());
        let residual_std = 0.02 / (16.0f64).sqrt();
        for (spec, values) in a.layout().specs().iter().map(|s| (s, a.get(s))) {
            match spec.kind {
                TensorKind::RmsAtt | TensorKind::RmsFfn | TensorKind::RmsFinal => {
                    assert!(values.iter().all(|&v| v == 1.0), "{}", spec.name)
                }
                TensorKind::Bq | TensorKind::Bk | TensorKind::Bv => {
                    assert!(values.iter().all(|&v| v == 0.0), "{}", spec.name)
                }
                kind => {
                    let n = values.len() as f64;
                    let mean = values.iter().map(|&v| v as f64).sum::<f64>() / n;
                    let std = (values.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
                    let want = if matches!(kind, TensorKind::Wo | TensorKind::W2) { residual_std } else { 0.02 };
                    // 4096+ samples: the sample std is within a few percent of the truth.
                    assert!((std / want - 1.0).abs() < 0.06, "{}: std {std}, want {want}", spec.name);
                    assert!(mean.abs() < 4.0 * want / n.sqrt() + 1e-9, "{}: mean {mean}", spec.name);
                }
            }
        }
    }

    #[test]
    fn from_vec_checks_the_length() {
        let config = Config::preset("tiny").unwrap();
        let e = Params::from_vec(&config, vec![0.0; 10]).unwrap_err();
        assert!(e.message.contains("has 10 values"), "{e}");
        assert!(Params::from_vec(&config, vec![0.0; config.n_params()]).is_ok());
    }

    #[test]
    fn tensors_mut_covers_everything_once() {
        let mut params = Params::zeros(&biased_unshared()).unwrap();
        for (spec, values) in params.tensors_mut() {
            values.iter_mut().for_each(|v| *v += spec.offset as f32);
        }
        for spec in params.layout().specs().to_vec() {
            assert!(params.get(&spec).iter().all(|&v| v == spec.offset as f32), "{}", spec.name);
        }
    }
}
