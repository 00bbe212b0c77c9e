//! Compile time: a validated MIL function becomes a list of [`Step`]s over planned
//! storages.
//!
//! Every value is a [`View`]. Ops that only re-index (`reshape`, `transpose`, the
//! slices, `split`, `expand_dims`, `squeeze`, `identity`, and `cast` between float types
//! unless it must round an fp32 input in fp16 mode) make a new view and no step. Ops that compute get a fresh packed temporary. Temporaries
//! whose lifetimes do not overlap share arena space; a result that is exactly an fp32
//! output is computed straight into the output surface.
//!
//! Aliasing rule the executor relies on: a step's destination storage is never one of
//! its sources. Every destination is a fresh temporary or an output surface, and arena
//! ranges are shared only by temporaries whose step ranges are disjoint.

use std::collections::HashMap;

use half::f16;
use mil::ops::{self, Scope, SliceByIndex};
use mil::{Arg, DType, Data, Function, Operation, Value};

use super::attention::ScoresSoftmax;
use super::elementwise::{Binary, Map, Unary};
use super::exec::{CpuKernel, Gather, Step, StorageKind};
use super::linalg::{Conv, Mat, Matmul};
use super::reduce::{Reduce, ReduceKind, Softmax};
use super::view::{StorageId, View};
use super::Ptr;
use crate::{Error, ErrorKind, Precision, Result, Weights};

/// Arena offsets are multiples of this many elements (64 bytes: a cache line, and the
/// widest SIMD load).
const ALIGN: usize = 16;

/// Placeholder storage id for the destination of a [`Step::StoreF16`] (the surface
/// itself, not a planned storage).
const SURFACE: StorageId = usize::MAX;

struct Planner<'a> {
    precision: Precision,
    weights: &'a Weights,
    scope: Scope,
    kinds: Vec<StorageKind>,
    consts: Vec<Vec<f32>>,
    /// Constants already turned into storages, by name.
    const_views: HashMap<String, View>,
    values: HashMap<String, View>,
    steps: Vec<Step>,
    /// How many times each value is read: by ops' arguments, and once more if it is an
    /// output. A value read once is free to be fused into its reader.
    uses: HashMap<String, usize>,
    /// Whether op sequences may be fused into one step.
    fuse: bool,
    /// The last `add` planned, for [`Planner::fuse_scores_softmax`].
    last_add: Option<AddRecord>,
    /// Values computed straight into their window of an fp32 output surface
    /// ([`place_outputs`]), by name.
    placed: HashMap<String, View>,
}

/// An `add` as planned: its result's storage and its operands (the argument's name, if a
/// variable, and its view broadcast to the result).
type AddRecord = (StorageId, [(Option<String>, View); 2]);

/// [`Planner::uses`] of `f`.
fn count_uses(f: &Function) -> HashMap<String, usize> {
    fn visit(arg: &Arg, uses: &mut HashMap<String, usize>) {
        match arg {
            Arg::Var(name) => *uses.entry(name.clone()).or_default() += 1,
            Arg::List(items) => items.iter().for_each(|a| visit(a, uses)),
            Arg::Value(_) => {}
        }
    }
    let mut uses = HashMap::new();
    for op in &f.ops {
        op.args.iter().for_each(|(_, a)| visit(a, &mut uses));
    }
    for name in &f.outputs {
        *uses.entry(name.clone()).or_default() += 1;
    }
    uses
}

fn program_error(op: &Operation, message: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::Program, format!("op `{}` ({}): {message}", op.name, op.op))
}

fn mil_error(op: &Operation) -> impl Fn(mil::Error) -> Error + '_ {
    move |e| Error::from(e.in_op(op.name.clone()))
}

/// Plans `f` (already validated: `scope` is what validation returned).
pub(crate) fn compile(
    f: &Function,
    scope: Scope,
    weights: &Weights,
    precision: Precision,
    threads: usize,
    fuse: bool,
) -> Result<CpuKernel> {
    let mut p = Planner {
        precision,
        weights,
        scope,
        kinds: Vec::new(),
        consts: Vec::new(),
        const_views: HashMap::new(),
        values: HashMap::new(),
        steps: Vec::new(),
        uses: count_uses(f),
        fuse,
        last_add: None,
        placed: HashMap::new(),
    };
    let mut input_storage = vec![None; f.inputs.len()];
    for (i, v) in f.inputs.iter().enumerate() {
        let view = if v.ty.dtype == DType::Fp32 {
            let st = p.storage(StorageKind::Input(i));
            input_storage[i] = Some(st);
            View::packed(st, 0, &v.ty.shape)
        } else {
            let view = p.new_packed(&v.ty.shape);
            p.steps.push(Step::LoadF16 { input: i, dst: (view.storage, 0) });
            view
        };
        p.values.insert(v.name.clone(), view);
    }
    let outputs = f.output_vars();
    let mut output_storage = vec![None; outputs.len()];
    place_outputs(&mut p, f, &outputs, &mut output_storage);
    for op in &f.ops {
        p.plan_op(op)?;
    }
    for (j, out) in outputs.iter().enumerate() {
        let view = p
            .value(&out.name)?
            .ok_or_else(|| Error::new(ErrorKind::Program, format!("output `{}` is not a tensor value", out.name)))?;
        if let Some(st) = output_storage[j] {
            // Placed by `place_outputs`: the value is the whole surface already; or, if
            // nothing was computed into the surface after all, a whole temporary that
            // becomes the surface; or it is copied in.
            if view.storage == st && view.offset == 0 && view.is_packed() {
                continue;
            }
            let mut used = false;
            for step in &p.steps {
                step.visit_storages(&mut |s| used |= s == st);
            }
            let whole_temp = matches!(p.kinds[view.storage], StorageKind::Temp { len } if len == view.numel())
                && view.offset == 0
                && view.is_packed();
            if whole_temp && !used {
                p.kinds[view.storage] = StorageKind::Output(j);
                output_storage[j] = Some(view.storage);
            } else {
                p.copy(&view, &View::packed(st, 0, &out.ty.shape));
            }
            continue;
        }
        if out.ty.dtype == DType::Fp16 {
            let surface = View::packed(SURFACE, 0, &out.ty.shape);
            p.steps.push(Step::StoreF16 { output: j, map: Map::new(&surface, [&view]) });
            continue;
        }
        let relocatable = matches!(p.kinds[view.storage], StorageKind::Temp { len } if len == view.numel())
            && view.offset == 0
            && view.is_packed();
        if relocatable {
            // The value is exactly this output: compute it in the surface itself.
            p.kinds[view.storage] = StorageKind::Output(j);
            output_storage[j] = Some(view.storage);
        } else {
            let st = p.storage(StorageKind::Output(j));
            output_storage[j] = Some(st);
            p.copy(&view, &View::packed(st, 0, &out.ty.shape));
        }
    }
    if p.fuse {
        p.steps = super::region::form_regions(std::mem::take(&mut p.steps), threads);
    }
    p.check_bounds(f, &outputs)?;
    let (arena_len, temp_offsets) = p.layout_arena();
    // The arena, and the input and output surfaces every caller allocates to run the
    // kernel, must fit in memory: sizes from a program are user input.
    let mut io_elements = f.inputs.iter().map(|v| v.ty.numel()).chain(outputs.iter().map(|v| v.ty.numel()));
    let elements = io_elements.try_fold(arena_len.saturating_add(ALIGN), |acc, n| acc.checked_add(n));
    let what = format!("function `{}`: its tensors", f.name);
    let too_big = |e: crate::memory::AllocError| Error::new(ErrorKind::Program, e.to_string());
    let bytes = crate::memory::bytes_of(&what, &[elements.unwrap_or(usize::MAX), 4]).map_err(too_big)?;
    crate::memory::check(&what, bytes).map_err(too_big)?;
    // One spare line so the arena's start can be aligned to 64 bytes.
    let mut arena = vec![0f32; arena_len + ALIGN];
    let shift = arena.as_ptr().align_offset(ALIGN * 4).min(ALIGN);
    let mut ptrs = vec![Ptr(std::ptr::null_mut()); p.kinds.len()];
    for (st, kind) in p.kinds.iter().enumerate() {
        match kind {
            StorageKind::Temp { .. } => ptrs[st] = Ptr(arena[shift + temp_offsets[st]..].as_mut_ptr()),
            StorageKind::Const(k) => ptrs[st] = Ptr(p.consts[*k].as_mut_ptr()),
            StorageKind::Input(_) | StorageKind::Output(_) => {}
        }
    }
    Ok(CpuKernel {
        inputs: f.inputs.clone(),
        outputs,
        steps: p.steps,
        threads,
        input_storage,
        output_storage,
        consts: p.consts,
        arena,
        ptrs,
    })
}

/// Plans where the values that make up an fp32 output are computed: straight into their
/// window of the output surface, so that a program returning several results in one
/// surface (concatenated on an axis whose leading axes all have size 1, as the packed
/// I/O convention does) costs no copy. Walks back from each output through the ops
/// that only re-index (`cast` between float types that needs no rounding, `reshape`,
/// `identity`) and through `concat`, to the ops that compute; those write into the
/// surface ([`Planner::dst`]). Anything else is copied in at the end, as before.
fn place_outputs(p: &mut Planner<'_>, f: &Function, outputs: &[mil::Var], output_storage: &mut [Option<StorageId>]) {
    let producers: HashMap<&str, &Operation> =
        f.ops.iter().flat_map(|op| op.outputs.iter().map(move |v| (v.name.as_str(), op))).collect();
    for (j, out) in outputs.iter().enumerate() {
        if out.ty.dtype != DType::Fp32 || outputs[..j].iter().any(|o| o.name == out.name) {
            continue;
        }
        let st = p.storage(StorageKind::Output(j));
        output_storage[j] = Some(st);
        let mut work = vec![(out.name.clone(), View::packed(st, 0, &out.ty.shape))];
        while let Some((name, window)) = work.pop() {
            let Some(op) = producers.get(name.as_str()) else { continue };
            if p.placed.contains_key(&name) || f.inputs.iter().any(|v| v.name == name) {
                continue;
            }
            let var_arg = |arg: &str| match op.arg(arg) {
                Some(Arg::Var(v)) => Some(v.clone()),
                _ => None,
            };
            let type_of = |n: &str| f.type_of(n).cloned();
            match op.op.as_str() {
                "cast" | "reshape" | "identity" | "expand_dims" | "squeeze" => {
                    let Some(x) = var_arg("x") else { continue };
                    let Some(xt) = type_of(&x) else { continue };
                    // A cast between float types is a view (it rounds only values of an
                    // input surface, and inputs are not placed).
                    let float_view = op.op != "cast" || (xt.dtype.is_float() && op.outputs[0].ty.dtype.is_float());
                    if float_view {
                        if op.op == "reshape" {
                            // Where the reshape copies, if its input's strides need it.
                            p.placed.insert(name.clone(), window.clone());
                        }
                        work.push((x, View::packed(window.storage, window.offset, &xt.shape)));
                    }
                }
                "concat" => {
                    let Some(Arg::List(items)) = op.arg("values") else { continue };
                    p.placed.insert(name.clone(), window.clone());
                    let shape = &op.outputs[0].ty.shape;
                    let axis = p.int(op, "axis").ok().flatten().unwrap_or(0);
                    let Ok(axis) = ops::norm_axis(axis, shape.len(), "axis") else { continue };
                    if p.flag(op, "interleave").unwrap_or(true) || shape[..axis].iter().any(|&d| d != 1) {
                        continue;
                    }
                    let inner: usize = shape[axis + 1..].iter().product();
                    let mut at = 0;
                    for item in items {
                        let Arg::Var(v) = item else { break };
                        let Some(t) = type_of(v) else { break };
                        work.push((v.clone(), View::packed(window.storage, window.offset + at * inner, &t.shape)));
                        at += t.shape[axis];
                    }
                }
                k if ops::BINARY_OPS.contains(&k)
                    || ops::UNARY_OPS.contains(&k)
                    || ops::REDUCE_OPS.contains(&k)
                    || matches!(k, "matmul" | "softmax" | "conv") =>
                {
                    p.placed.insert(name, window);
                }
                _ => {}
            }
        }
    }
}

/// Two windows on the same elements (size-1 axes may have any stride).
fn same_window(a: &View, b: &View) -> bool {
    a.storage == b.storage
        && a.offset == b.offset
        && a.shape == b.shape
        && a.shape.iter().zip(a.strides.iter().zip(&b.strides)).all(|(&d, (x, y))| d == 1 || x == y)
}

impl Planner<'_> {
    /// Where op `op`'s result goes: its window of an output surface if
    /// [`place_outputs`] placed it there, else a fresh packed temporary.
    fn dst(&mut self, op: &Operation, shape: &[usize]) -> View {
        match self.placed.get(&op.outputs[0].name) {
            Some(v) if v.shape.iter().product::<usize>() == shape.iter().product::<usize>() => {
                View::packed(v.storage, v.offset, shape)
            }
            _ => self.new_packed(shape),
        }
    }

    fn storage(&mut self, kind: StorageKind) -> StorageId {
        self.kinds.push(kind);
        self.kinds.len() - 1
    }

    /// A fresh packed temporary of `shape`.
    fn new_packed(&mut self, shape: &[usize]) -> View {
        let st = self.storage(StorageKind::Temp { len: shape.iter().product() });
        View::packed(st, 0, shape)
    }

    fn round(&self, dtype: DType) -> bool {
        self.precision == Precision::Fp16 && dtype.is_float()
    }

    /// Copies `src` into the window `dst` (same shape).
    fn copy(&mut self, src: &View, dst: &View) {
        self.steps.push(Step::Unary { kind: Unary::Identity, round: false, map: Map::new(dst, [src]) });
    }

    /// `v` itself when packed, else a packed copy.
    fn packed(&mut self, v: View) -> View {
        if v.is_packed() {
            return v;
        }
        let dst = self.new_packed(&v.shape);
        self.copy(&v, &dst);
        dst
    }

    /// `v` reshaped, copying first if its strides do not allow a view.
    fn reshaped(&mut self, v: View, shape: &[usize]) -> View {
        match v.reshape(shape) {
            Some(r) => r,
            None => self.packed(v).reshape(shape).expect("a packed view reshapes"),
        }
    }

    /// The value named `name`: a computed one, or a constant made into a storage now.
    /// `None` if there is no tensor of that name.
    fn value(&mut self, name: &str) -> Result<Option<View>> {
        if let Some(v) = self.values.get(name).or_else(|| self.const_views.get(name)) {
            return Ok(Some(v.clone()));
        }
        let Some(value) = self.scope.get(name).and_then(|(_, v)| v.cloned()) else {
            return Ok(None);
        };
        let view = self.constant(&value)?;
        self.const_views.insert(name.to_string(), view.clone());
        Ok(Some(view))
    }

    /// A constant's data as a storage. Values hold their declared type: fp16 literals and
    /// weights are fp16 numbers in either precision; in fp16 mode fp32 literals are
    /// rounded too, as the ANE stores every constant in fp16.
    fn constant(&mut self, value: &Value) -> Result<View> {
        let ty = value.ty().clone();
        let round = ty.dtype == DType::Fp16 || self.round(ty.dtype);
        let data: Vec<f32> = match value {
            Value::Literal { data: Data::Float(v), .. } => {
                v.iter().map(|&x| if round { f16::from_f64(x).to_f32() } else { x as f32 }).collect()
            }
            Value::Literal { data: Data::Int(v), .. } => v.iter().map(|&x| x as f32).collect(),
            Value::Literal { data: Data::Bool(v), .. } => v.iter().map(|&b| if b { 1.0 } else { 0.0 }).collect(),
            Value::Literal { data: Data::Str(_), .. } => {
                return Err(Error::new(ErrorKind::Program, "a string constant is used as a tensor"))
            }
            Value::Blob { path, offset, .. } => {
                self.weights.read_fp16(path, *offset, ty.numel())?.iter().map(|h| h.to_f32()).collect()
            }
        };
        if data.len() != ty.numel() {
            return Err(Error::new(
                ErrorKind::Program,
                format!("constant of type {ty} has {} values, expected {}", data.len(), ty.numel()),
            ));
        }
        self.consts.push(data);
        let st = self.storage(StorageKind::Const(self.consts.len() - 1));
        Ok(View::packed(st, 0, &ty.shape))
    }

    /// A tensor argument of `op`.
    fn arg(&mut self, op: &Operation, name: &str) -> Result<View> {
        let arg = op.arg(name).ok_or_else(|| program_error(op, format!("missing argument `{name}`")))?;
        self.arg_view(op, arg, name)
    }

    fn arg_view(&mut self, op: &Operation, arg: &Arg, name: &str) -> Result<View> {
        match arg {
            Arg::Var(v) => self
                .value(v)
                .map_err(|e| program_error(op, e))?
                .ok_or_else(|| program_error(op, format!("argument `{name}` uses `{v}`, which is not a tensor value"))),
            Arg::Value(v) => self.constant(v).map_err(|e| program_error(op, e)),
            Arg::List(_) => Err(program_error(op, format!("argument `{name}` takes one value, found a tuple"))),
        }
    }

    /// A constant parameter of `op` (`axes`, `perm`, …), if given.
    fn param(&self, op: &Operation, name: &str) -> Result<Option<Value>> {
        match op.arg(name) {
            None => Ok(None),
            Some(a) => {
                let r = ops::resolve(a, &self.scope, name).map_err(mil_error(op))?;
                match r.value {
                    Some(v) => Ok(Some(v.clone())),
                    None => Err(program_error(op, format!("argument `{name}` must be a constant"))),
                }
            }
        }
    }

    fn ints(&self, op: &Operation, name: &str) -> Result<Option<Vec<i64>>> {
        match self.param(op, name)? {
            None => Ok(None),
            Some(v) => v
                .as_ints()
                .map(|i| Some(i.to_vec()))
                .ok_or_else(|| program_error(op, format!("`{name}` must be int32"))),
        }
    }

    fn int(&self, op: &Operation, name: &str) -> Result<Option<i64>> {
        match self.param(op, name)? {
            None => Ok(None),
            Some(v) => v.as_int().map(Some).ok_or_else(|| program_error(op, format!("`{name}` must be one integer"))),
        }
    }

    fn flag(&self, op: &Operation, name: &str) -> Result<bool> {
        match self.param(op, name)? {
            None => Ok(false),
            Some(v) => v.as_bool().ok_or_else(|| program_error(op, format!("`{name}` must be a bool"))),
        }
    }

    fn bools(&self, op: &Operation, name: &str, rank: usize) -> Result<Vec<bool>> {
        match self.param(op, name)? {
            None => Ok(vec![false; rank]),
            Some(Value::Literal { data: Data::Bool(v), .. }) if v.len() == rank => Ok(v),
            Some(_) => Err(program_error(op, format!("`{name}` must be {rank} bools"))),
        }
    }

    fn define(&mut self, op: &Operation, view: View) {
        self.values.insert(op.outputs[0].name.clone(), view);
    }

    fn plan_op(&mut self, op: &Operation) -> Result<()> {
        let kind = op.op.as_str();
        if kind == "const" {
            // Made into a storage when (and if) an op reads it as a tensor.
            return Ok(());
        }
        let out = op.outputs.first().ok_or_else(|| program_error(op, "declares no result"))?.clone();
        let round = self.round(out.ty.dtype);
        match kind {
            "cast" => {
                let x = self.arg(op, "x")?;
                // Only fp32 input surfaces can hold values that are not fp16 numbers in
                // fp16 mode (op results and constants are rounded already).
                let unrounded = matches!(self.kinds[x.storage], StorageKind::Input(_));
                let unary = match out.ty.dtype {
                    DType::Fp16 if round && unrounded => Some(Unary::Identity),
                    DType::Fp16 | DType::Fp32 => None,
                    DType::Int32 => Some(Unary::Trunc),
                    DType::Bool => Some(Unary::NonZero),
                    other => return Err(program_error(op, format!("cannot cast to {other}"))),
                };
                let v = match unary {
                    None => x,
                    Some(kind) => {
                        let dst = self.new_packed(&x.shape);
                        self.steps.push(Step::Unary { kind, round, map: Map::new(&dst, [&x]) });
                        dst
                    }
                };
                self.define(op, v);
            }
            k if ops::BINARY_OPS.contains(&k) => {
                let x = self.arg(op, "x")?.broadcast_to(&out.ty.shape);
                let y = self.arg(op, "y")?.broadcast_to(&out.ty.shape);
                let kind = Binary::from_op(k, out.ty.dtype == DType::Int32).expect("a binary op");
                let dst = self.dst(op, &out.ty.shape);
                self.steps.push(Step::Binary { kind, round, map: Map::new(&dst, [&x, &y]) });
                if k == "add" {
                    let name = |a: &str| match op.arg(a) {
                        Some(Arg::Var(v)) => Some(v.clone()),
                        _ => None,
                    };
                    self.last_add = Some((dst.storage, [(name("x"), x), (name("y"), y)]));
                }
                self.define(op, dst);
            }
            "identity" => {
                let x = self.arg(op, "x")?;
                self.define(op, x);
            }
            k if ops::UNARY_OPS.contains(&k) => {
                let x = self.arg(op, "x")?;
                let x_dtype = op
                    .arg("x")
                    .and_then(|a| ops::resolve(a, &self.scope, "x").ok())
                    .map(|r| r.ty.dtype)
                    .unwrap_or(out.ty.dtype);
                let epsilon = self.epsilon(op, k, x_dtype)?;
                let kind = Unary::from_op(k, epsilon).expect("a unary op");
                let dst = self.dst(op, &out.ty.shape);
                self.steps.push(Step::Unary { kind, round, map: Map::new(&dst, [&x]) });
                self.define(op, dst);
            }
            "softmax" => {
                let x = self.arg(op, "x")?;
                let axis = ops::norm_axis(self.int(op, "axis")?.unwrap_or(-1), x.shape.len(), "axis")
                    .map_err(mil_error(op))?;
                if self.fuse && axis + 1 == x.shape.len() {
                    if let Some(dst) = self.fuse_scores_softmax(op, &x, round) {
                        self.define(op, dst);
                        return Ok(());
                    }
                }
                let x = self.packed(x);
                let dst = self.dst(op, &x.shape);
                let outer = x.shape[..axis.min(x.shape.len())].iter().product();
                let inner = x.shape.get(axis + 1..).map_or(1, |s| s.iter().product());
                self.steps.push(Step::Softmax(Softmax {
                    src: (x.storage, x.offset),
                    dst: (dst.storage, dst.offset),
                    outer,
                    len: x.shape.get(axis).copied().unwrap_or(1),
                    inner,
                    round,
                }));
                self.define(op, dst);
            }
            k if ops::REDUCE_OPS.contains(&k) => {
                let x = self.arg(op, "x")?;
                let axes = ops::reduce_axes(self.ints(op, "axes")?, x.shape.len()).map_err(mil_error(op))?;
                let kind = ReduceKind::from_op(k).expect("a reduction");
                let dst = self.dst(op, &out.ty.shape);
                self.steps.push(Step::Reduce(Reduce::new(kind, round, &x, &axes, (dst.storage, dst.offset))));
                self.define(op, dst);
            }
            "matmul" => self.plan_matmul(op, round, &out.ty.shape)?,
            "conv" => self.plan_conv(op, round, &out.ty.shape)?,
            "reshape" | "expand_dims" | "squeeze" => {
                // expand_dims and squeeze only add or drop size-1 axes: always a view.
                let x = self.arg(op, "x")?;
                let v = match x.reshape(&out.ty.shape) {
                    Some(v) => v,
                    // The strides need a copy: into the result's window of an output
                    // surface when it has one.
                    None if self.placed.contains_key(&op.outputs[0].name) => {
                        let window = self.dst(op, &x.shape);
                        self.copy(&x, &window);
                        window.reshape(&out.ty.shape).expect("a packed window reshapes")
                    }
                    None => self.reshaped(x, &out.ty.shape),
                };
                self.define(op, v);
            }
            "transpose" => {
                let x = self.arg(op, "x")?;
                let perm = ops::check_perm(&self.ints(op, "perm")?.unwrap_or_default(), x.shape.len())
                    .map_err(mil_error(op))?;
                self.define(op, x.permute(&perm));
            }
            "slice_by_size" => {
                let x = self.arg(op, "x")?;
                let begin = self.ints(op, "begin")?.unwrap_or_default();
                let size = self.ints(op, "size")?.unwrap_or_default();
                let (start, extent) = ops::slice_by_size(&x.shape, &begin, &size).map_err(mil_error(op))?;
                let v = x.slice(&start, &vec![1; start.len()], &extent);
                self.define(op, v);
            }
            "slice_by_index" => {
                let x = self.arg(op, "x")?;
                let rank = x.shape.len();
                let s = SliceByIndex {
                    begin: self.ints(op, "begin")?.unwrap_or_default(),
                    end: self.ints(op, "end")?.unwrap_or_default(),
                    stride: self.ints(op, "stride")?.unwrap_or_else(|| vec![1; rank]),
                    begin_mask: self.bools(op, "begin_mask", rank)?,
                    end_mask: self.bools(op, "end_mask", rank)?,
                    squeeze_mask: self.bools(op, "squeeze_mask", rank)?,
                };
                let r = s.resolve(&x.shape).map_err(mil_error(op))?;
                let v = x.slice(&r.start, &r.step, &r.extent);
                let squeezed: Vec<usize> = (0..rank).filter(|&d| s.squeeze_mask[d]).collect();
                self.define(op, v.drop_axes(&squeezed));
            }
            "concat" => self.plan_concat(op, &out.ty.shape)?,
            "split" => {
                let x = self.arg(op, "x")?;
                let axis =
                    ops::norm_axis(self.int(op, "axis")?.unwrap_or(0), x.shape.len(), "axis").map_err(mil_error(op))?;
                let sizes = ops::split_sizes(x.shape[axis], self.int(op, "num_splits")?, self.ints(op, "split_sizes")?)
                    .map_err(mil_error(op))?;
                let mut at = 0;
                for (part, size) in op.outputs.iter().zip(sizes) {
                    let mut start = vec![0; x.shape.len()];
                    start[axis] = at;
                    let mut extent = x.shape.clone();
                    extent[axis] = size;
                    let v = x.slice(&start, &vec![1; start.len()], &extent);
                    self.values.insert(part.name.clone(), v);
                    at += size;
                }
            }
            "gather" => {
                let x = self.arg(op, "x")?;
                let x = self.packed(x);
                let indices = self.arg(op, "indices")?;
                let indices = self.packed(indices);
                let axis =
                    ops::norm_axis(self.int(op, "axis")?.unwrap_or(0), x.shape.len(), "axis").map_err(mil_error(op))?;
                let dst = self.new_packed(&out.ty.shape);
                self.steps.push(Step::Gather(Gather {
                    op: op.name.clone(),
                    axis,
                    x: (x.storage, x.offset),
                    outer: x.shape[..axis].iter().product(),
                    dim: x.shape[axis],
                    inner: x.shape[axis + 1..].iter().product(),
                    indices: (indices.storage, indices.offset),
                    n_indices: indices.numel(),
                    dst: (dst.storage, 0),
                }));
                self.define(op, dst);
            }
            other => {
                return Err(program_error(op, format!("the CPU device does not implement `{other}`")));
            }
        }
        Ok(())
    }

    /// `epsilon` of rsqrt/log/inverse: given, or coremltools' default, in `x`'s dtype.
    fn epsilon(&self, op: &Operation, kind: &str, dtype: DType) -> Result<f32> {
        let (default, given) = match kind {
            "rsqrt" => (1e-12, self.param(op, "epsilon")?),
            "log" => (1e-45, self.param(op, "epsilon")?),
            "inverse" => (1e-4, self.param(op, "epsilon")?),
            _ => return Ok(0.0),
        };
        let (value, dtype) = match given {
            Some(v) => (v.as_f64().ok_or_else(|| program_error(op, "`epsilon` must be a number"))?, v.ty().dtype),
            None => (default, dtype),
        };
        Ok(if dtype == DType::Fp16 { f16::from_f64(value).to_f32() } else { value as f32 })
    }

    fn plan_matmul(&mut self, op: &Operation, round: bool, out_shape: &[usize]) -> Result<()> {
        let x = self.arg(op, "x")?;
        let y = self.arg(op, "y")?;
        let (tx, ty) = (self.flag(op, "transpose_x")?, self.flag(op, "transpose_y")?);
        let rank = out_shape.len();
        let (m, n) = (out_shape[rank - 2], out_shape[rank - 1]);
        let k = if tx { x.shape[x.shape.len() - 2] } else { x.shape[x.shape.len() - 1] };
        let batch_shape = out_shape[..rank - 2].to_vec();
        // Matrix strides after the transposes, and batch strides broadcast to the result.
        let mat = |v: &View, t: bool| {
            let r = v.shape.len();
            let (rs, cs) = (v.strides[r - 2], v.strides[r - 1]);
            let (rs, cs) = if t { (cs, rs) } else { (rs, cs) };
            let batch = View {
                storage: v.storage,
                offset: v.offset,
                shape: v.shape[..r - 2].to_vec(),
                strides: v.strides[..r - 2].to_vec(),
            }
            .broadcast_to(&batch_shape);
            (Mat { storage: v.storage, offset: v.offset, row_stride: rs, col_stride: cs }, batch.strides)
        };
        let (xm, x_batch) = mat(&x, tx);
        let (ym, y_batch) = mat(&y, ty);
        let dst = self.dst(op, out_shape);
        self.steps.push(Step::Matmul(Matmul {
            m,
            n,
            k,
            batch_shape,
            x: xm,
            x_batch,
            y: ym,
            y_batch,
            dst: (dst.storage, dst.offset),
            round,
        }));
        self.define(op, dst);
        Ok(())
    }

    /// Attention's `softmax(matmul(x, y) + mask)` over the last axis, with a constant
    /// mask the same for every batch entry and the scores and masked scores read by
    /// nothing else: the matmul and add steps just planned are replaced by one
    /// [`ScoresSoftmax`] step, whose result is returned. `None` (and nothing changed)
    /// for anything else.
    fn fuse_scores_softmax(&mut self, op: &Operation, x: &View, round: bool) -> Option<View> {
        let Some(Arg::Var(x_name)) = op.arg("x") else { return None };
        let (add_dst, operands) = self.last_add.clone()?;
        let read_once = |name: &Option<String>| name.as_ref().and_then(|n| self.uses.get(n)) == Some(&1);
        let rank = x.shape.len();
        let n = self.steps.len();
        if rank < 2 || n < 2 || !read_once(&Some(x_name.clone())) || add_dst != x.storage {
            return None;
        }
        if x.offset != 0 || !x.is_packed() {
            return None;
        }
        let (Step::Matmul(mm), Step::Binary { kind: Binary::Add, round: add_round, map }) =
            (&self.steps[n - 2], &self.steps[n - 1])
        else {
            return None;
        };
        if map.dst.storage != add_dst || mm.round != round || *add_round != round {
            return None;
        }
        let is_scores = |(name, v): &(Option<String>, View)| {
            v.storage == mm.dst.0 && v.offset == mm.dst.1 && v.is_packed() && v.shape == x.shape && read_once(name)
        };
        let mask = match (is_scores(&operands[0]), is_scores(&operands[1])) {
            (true, false) => &operands[1].1,
            (false, true) => &operands[0].1,
            _ => return None,
        };
        let StorageKind::Const(c) = self.kinds[mask.storage] else { return None };
        if mask.strides[..rank - 2].iter().any(|&s| s != 0) {
            return None;
        }
        let Some(Step::Matmul(mut mm)) = self.steps.drain(n - 2..).next() else { unreachable!("checked above") };
        let dst = self.dst(op, &x.shape);
        mm.dst = (dst.storage, dst.offset);
        let (data, at) = (&self.consts[c], mask.offset as isize);
        let (rs, cs) = (mask.strides[rank - 2], mask.strides[rank - 1]);
        let fused = ScoresSoftmax::new(mm, |i, j| data[(at + i as isize * rs + j as isize * cs) as usize], round);
        self.steps.push(Step::ScoresSoftmax(fused));
        Some(dst)
    }

    fn plan_conv(&mut self, op: &Operation, round: bool, out_shape: &[usize]) -> Result<()> {
        let x = self.arg(op, "x")?;
        let w = self.arg(op, "weight")?;
        let geo = ops::conv_geometry(op, &self.scope, &x.shape, &w.shape).map_err(mil_error(op))?;
        let bias = match op.arg("bias") {
            Some(_) => {
                let b = self.arg(op, "bias")?;
                Some((b.storage, b.offset, b.strides[0]))
            }
            None => None,
        };
        let (o, cg, kh, kw) = (w.shape[0], w.shape[1], w.shape[2], w.shape[3]);
        let w2 = self.reshaped(w, &[o, cg * kh * kw]);
        let wmat = Mat { storage: w2.storage, offset: w2.offset, row_stride: w2.strides[0], col_stride: w2.strides[1] };
        let [n, c, h, wd] = [x.shape[0], x.shape[1], x.shape[2], x.shape[3]];
        let pointwise = kh == 1 && kw == 1 && geo.strides == [1, 1] && geo.pad == [0; 4];
        let out_hw = [out_shape[2], out_shape[3]];
        let (xv, pointwise_col_stride, scratch) = if pointwise {
            // Positions (H, W) as one axis: [N, C, H·W].
            let x3 = self.reshaped(x, &[n, c, h * wd]);
            let strides = [x3.strides[0], x3.strides[1], 0, x3.strides[2]];
            ((x3.storage, x3.offset, strides), Some(x3.strides[2]), None)
        } else {
            let s = self.new_packed(&[cg * kh * kw * out_hw[0] * out_hw[1]]);
            (
                (x.storage, x.offset, [x.strides[0], x.strides[1], x.strides[2], x.strides[3]]),
                None,
                Some((s.storage, 0)),
            )
        };
        let dst = self.dst(op, out_shape);
        self.steps.push(Step::Conv(Conv {
            x: xv,
            x_shape: [n, c, h, wd],
            w: wmat,
            kernel: [kh, kw],
            bias,
            out_channels: o,
            out_hw,
            strides: geo.strides,
            dilations: geo.dilations,
            pad: [geo.pad[0], geo.pad[2]],
            groups: geo.groups,
            pointwise_col_stride,
            scratch,
            dst: (dst.storage, dst.offset),
            round,
        }));
        self.define(op, dst);
        Ok(())
    }

    fn plan_concat(&mut self, op: &Operation, out_shape: &[usize]) -> Result<()> {
        let items: Vec<Arg> = match op.arg("values") {
            Some(Arg::List(items)) => items.clone(),
            Some(other) => vec![other.clone()],
            None => return Err(program_error(op, "missing argument `values`")),
        };
        let axis =
            ops::norm_axis(self.int(op, "axis")?.unwrap_or(0), out_shape.len(), "axis").map_err(mil_error(op))?;
        let interleave = self.flag(op, "interleave")?;
        let dst = match self.placed.get(&op.outputs[0].name) {
            Some(v) => View::packed(v.storage, v.offset, out_shape),
            None => self.new_packed(out_shape),
        };
        let mut at = 0;
        for (j, item) in items.iter().enumerate() {
            let v = self.arg_view(op, item, "values")?;
            let mut window = dst.clone();
            window.shape = v.shape.clone();
            if interleave {
                // Item j fills positions j, j + n, j + 2n, … of the axis.
                window.offset = dst.offset + j * dst.strides[axis] as usize;
                window.strides[axis] *= items.len() as isize;
            } else {
                window.offset = dst.offset + at * dst.strides[axis] as usize;
                at += v.shape[axis];
            }
            if !same_window(&v, &window) {
                self.copy(&v, &window);
            }
        }
        self.define(op, dst);
        Ok(())
    }

    /// Checks that every window of every step lies inside its storage. The executor
    /// trusts the plan with raw pointers; this turns a planner bug into an error instead
    /// of memory corruption.
    fn check_bounds(&self, f: &Function, outputs: &[mil::Var]) -> Result<()> {
        let len = |st: StorageId| match self.kinds[st] {
            StorageKind::Input(i) => f.inputs[i].ty.numel(),
            StorageKind::Output(j) => outputs[j].ty.numel(),
            StorageKind::Const(k) => self.consts[k].len(),
            StorageKind::Temp { len } => len,
        };
        let mut bad = None;
        for (i, step) in self.steps.iter().enumerate() {
            step.visit_spans(&mut |st, (lo, hi)| {
                if st != SURFACE && lo < hi && (lo < 0 || hi > len(st) as isize) && bad.is_none() {
                    bad = Some((i, st, lo, hi));
                }
            });
        }
        match bad {
            None => Ok(()),
            Some((i, st, lo, hi)) => Err(Error::new(
                ErrorKind::Compile,
                format!(
                    "internal error in the CPU device's planner: step {i} ({:?}) reaches {lo}..{hi} of a \
                     storage of {} elements; please report this with the program",
                    self.steps[i],
                    len(st)
                ),
            )),
        }
    }

    /// Places the temporaries in one arena: each lives from the first to the last step
    /// that touches it, and two share space only if those ranges are disjoint. Greedy
    /// first fit in order of first use. Returns the arena length and each storage's
    /// offset (meaningful for temporaries only).
    fn layout_arena(&self) -> (usize, Vec<usize>) {
        let n = self.kinds.len();
        let mut first = vec![usize::MAX; n];
        let mut last = vec![0usize; n];
        for (i, step) in self.steps.iter().enumerate() {
            step.visit_storages(&mut |st| {
                if st != SURFACE {
                    first[st] = first[st].min(i);
                    last[st] = last[st].max(i);
                }
            });
        }
        let mut order: Vec<StorageId> = (0..n)
            .filter(|&st| matches!(self.kinds[st], StorageKind::Temp { .. }) && first[st] != usize::MAX)
            .collect();
        order.sort_by_key(|&st| first[st]);
        let mut offsets = vec![0usize; n];
        // Live allocations: (offset, len, storage), kept sorted by offset.
        let mut live: Vec<(usize, usize, StorageId)> = Vec::new();
        let mut arena = 0;
        for st in order {
            let StorageKind::Temp { len } = self.kinds[st] else { continue };
            let len = len.div_ceil(ALIGN) * ALIGN;
            live.retain(|&(_, _, other)| last[other] >= first[st]);
            let mut at = 0;
            for &(off, l, _) in &live {
                if off >= at + len {
                    break;
                }
                at = at.max(off + l);
            }
            offsets[st] = at;
            arena = arena.max(at + len);
            let pos = live.partition_point(|&(off, _, _)| off < at);
            live.insert(pos, (at, len, st));
        }
        (arena, offsets)
    }
}

/// Plans `program` as [`compile`] does for a device, for tests that inspect the steps.
#[cfg(test)]
pub(crate) fn plan_program(
    program: &mil::Program,
    weights: &Weights,
    precision: Precision,
    threads: usize,
    fuse: bool,
) -> CpuKernel {
    let main = program.main().unwrap();
    let scope = ops::validate_function(main).unwrap();
    compile(main, scope, weights, precision, threads, fuse).unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::bench::{conv_program, matmul_program};

    fn plan(program: &mil::Program, weights: &Weights, precision: Precision) -> CpuKernel {
        plan_program(program, weights, precision, 1, true)
    }

    /// The dynamic-weight layer (slice → reshape → transpose-flag → matmul → reshape)
    /// is one GEMM reading the input surface in place and writing the output surface in
    /// place: no copy anywhere, no temporary.
    #[test]
    fn packed_weight_matmul_is_one_gemm_on_the_surfaces() {
        let kernel = plan(&matmul_program(48, 40, 16), &Weights::new(), Precision::Fp32);
        assert_eq!(kernel.steps.len(), 1, "{:?}", kernel.steps);
        let Step::Matmul(m) = &kernel.steps[0] else { panic!("{:?}", kernel.steps[0]) };
        let input = kernel.input_storage[0].unwrap();
        assert_eq!((m.x.storage, m.y.storage), (input, input));
        // Wᵀ: rows are weight columns (stride 1), columns step over the surface's width
        // (S + OC padded).
        let width = crate::padded_width(16 + 40) as isize;
        assert_eq!(width, 96);
        assert_eq!((m.x.offset, m.x.row_stride, m.x.col_stride), (16, 1, width));
        assert_eq!((m.y.offset, m.y.row_stride, m.y.col_stride), (0, width, 1));
        assert_eq!(Some(m.dst.0), kernel.output_storage[0]);
        assert!(kernel.arena.len() <= ALIGN, "no temporaries");
    }

    /// Results returned in one surface, concatenated on the channel axis (the packed
    /// I/O convention), are computed straight into their windows of it: no copy, and
    /// each window at its channel offset. A value that is also read by later steps
    /// stays readable there.
    #[test]
    fn concatenated_outputs_are_computed_in_place() {
        use mil::builder::FunctionBuilder;
        use mil::{DType, Dialect, TensorType};
        let (c, s) = (8i64, 32i64);
        let mut b = FunctionBuilder::new("main", Dialect::Ios18);
        let x = b.input("x", TensorType::surface(DType::Fp32, c as usize, 2 * s as usize));
        let xh = b.cast("x_h", &x, DType::Fp16);
        let a = b.slice_by_size("a_s", &xh, &[0, 0, 0, 0], &[1, c, 1, s]);
        let a = b.reshape("a", &a, &[1, 1, c, s]);
        let w = b.slice_by_size("w_s", &xh, &[0, 0, 0, s], &[1, c, 1, c]);
        let w = b.reshape("w", &w, &[1, 1, c, c]);
        let y1 = b.matmul("y1", &w, &a, true, false);
        let y2 = b.sigmoid("y2", &y1); // reads y1 where it was placed
        let y1s = b.reshape("y1s", &y1, &[1, c, 1, s]);
        let y2s = b.reshape("y2s", &y2, &[1, c, 1, s]);
        let both = b.concat("out_h", &[&y1s, &y2s], 1);
        let out = b.cast("out", &both, DType::Fp32);
        b.output(&out);
        let program = mil::Program::new(Dialect::Ios18, b.finish().unwrap());
        let kernel = plan(&program, &Weights::new(), Precision::Fp32);
        let out_st = kernel.output_storage[0].unwrap();
        assert_eq!(kernel.steps.len(), 2, "a matmul and a sigmoid, no copy: {:?}", kernel.steps);
        let Step::Matmul(m) = &kernel.steps[0] else { panic!("{:?}", kernel.steps[0]) };
        assert_eq!(m.dst, (out_st, 0));
        let Step::Unary { map, .. } = &kernel.steps[1] else { panic!("{:?}", kernel.steps[1]) };
        assert_eq!((map.dst.storage, map.dst.offset), (out_st, (c * s) as usize));
    }

    /// A 1×1 conv on baked weights is one GEMM too, in either precision (the cast of
    /// fp16 weights to fp32 is free: they are fp16 numbers already).
    #[test]
    fn pointwise_conv_is_one_gemm() {
        for precision in [Precision::Fp32, Precision::Fp16] {
            let mut weights = Weights::new();
            let w = crate::cpu::bench::values(24 * 32, 7);
            let kernel = plan(&conv_program(32, 24, 16, &w, &mut weights), &weights, precision);
            assert_eq!(kernel.steps.len(), 1, "{precision:?}: {:?}", kernel.steps);
            let Step::Conv(c) = &kernel.steps[0] else { panic!("{:?}", kernel.steps[0]) };
            assert_eq!(c.pointwise_col_stride, Some(1));
            assert_eq!(Some(c.x.0), kernel.input_storage[0]);
        }
    }

    /// A step reaching outside its storage is refused at compile time.
    #[test]
    fn bounds_check_catches_a_bad_plan() {
        let weights = Weights::new();
        let mut p = Planner {
            precision: Precision::Fp32,
            weights: &weights,
            scope: Scope::new(),
            kinds: Vec::new(),
            consts: Vec::new(),
            const_views: HashMap::new(),
            values: HashMap::new(),
            steps: Vec::new(),
            uses: HashMap::new(),
            fuse: true,
            last_add: None,
            placed: HashMap::new(),
        };
        let small = p.new_packed(&[4]);
        let big = p.new_packed(&[8]);
        let f = mil::Function {
            name: "main".into(),
            opset: "ios18".into(),
            inputs: vec![],
            ops: vec![],
            outputs: vec![],
            span: mil::Span::default(),
        };
        p.copy(&View::packed(small.storage, 0, &[4]), &View::packed(big.storage, 4, &[4]));
        assert!(p.check_bounds(&f, &[]).is_ok());
        p.copy(&View::packed(big.storage, 0, &[8]), &View::packed(small.storage, 0, &[8]));
        let err = p.check_bounds(&f, &[]).unwrap_err();
        assert_eq!(err.kind, ErrorKind::Compile);
        assert!(err.message.contains("step 1"), "{}", err.message);
    }

    /// Temporaries whose lifetimes do not overlap share arena space.
    #[test]
    fn arena_reuses_dead_temporaries() {
        use mil::builder::FunctionBuilder;
        use mil::{DType, Dialect, TensorType};
        let mut b = FunctionBuilder::new("main", Dialect::Ios18);
        let x = b.input("x", TensorType::surface(DType::Fp32, 64, 64));
        let mut v = x;
        for i in 0..6 {
            v = b.exp(&format!("e{i}"), &v);
        }
        let s = b.reduce_sum("s", &v, &[1], true);
        b.output(&s);
        let program = mil::Program::new(Dialect::Ios18, b.finish().unwrap());
        let kernel = plan(&program, &Weights::new(), Precision::Fp32);
        // Six 4096-element results, at most two alive at once.
        assert!(kernel.arena.len() <= 2 * 4096 + 2 * ALIGN, "arena of {} elements", kernel.arena.len());
    }
}
