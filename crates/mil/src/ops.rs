//! The ops anetrain knows: their arguments and their type and shape inference, with
//! MIL's semantics as coremltools defines them. Adding an op means: an entry in
//! [`spec`], a case in [`infer`], and an implementation in each device.

use std::collections::HashMap;

use crate::ir::{Arg, DType, Dialect, Function, Operation, Program, TensorType, Value};
use crate::{mil_err, Error, Result};

/// The arguments an op takes: required, then optional.
pub struct OpSpec {
    pub required: &'static [&'static str],
    pub optional: &'static [&'static str],
}

const X: &[&str] = &["x"];
const XY: &[&str] = &["x", "y"];
const NONE: &[&str] = &[];

/// Binary elementwise ops with NumPy broadcasting.
pub const BINARY_OPS: &[&str] = &["add", "sub", "mul", "real_div", "pow", "maximum", "minimum"];
/// Unary elementwise ops (some take an `epsilon`).
pub const UNARY_OPS: &[&str] =
    &["sqrt", "rsqrt", "exp", "log", "relu", "sigmoid", "silu", "tanh", "identity", "square", "abs", "inverse"];
/// Reductions over `axes`.
pub const REDUCE_OPS: &[&str] = &["reduce_sum", "reduce_mean", "reduce_max"];

/// The argument spec of a known op, or `None` for an op this crate does not know.
pub fn spec(op: &str) -> Option<OpSpec> {
    let s = |required, optional| Some(OpSpec { required, optional });
    match op {
        "const" => s(NONE, NONE),
        "cast" => s(&["x", "dtype"], NONE),
        o if BINARY_OPS.contains(&o) => s(XY, NONE),
        "rsqrt" | "log" | "inverse" => s(X, &["epsilon"]),
        o if UNARY_OPS.contains(&o) => s(X, NONE),
        // coremltools defaults the axis to -1, but the ANE's compiler is given every
        // argument explicitly; a missing one is a mistake, not a default.
        "softmax" => s(&["x", "axis"], NONE),
        o if REDUCE_OPS.contains(&o) => s(X, &["axes", "keep_dims"]),
        "matmul" => s(XY, &["transpose_x", "transpose_y"]),
        "conv" => s(&["x", "weight"], &["bias", "strides", "pad_type", "pad", "dilations", "groups"]),
        "reshape" => s(&["x", "shape"], NONE),
        "transpose" => s(&["x", "perm"], NONE),
        "slice_by_size" => s(&["x", "begin", "size"], NONE),
        "slice_by_index" => s(&["x", "begin", "end"], &["stride", "begin_mask", "end_mask", "squeeze_mask"]),
        "concat" => s(&["values", "axis"], &["interleave"]),
        "split" => s(&["x", "axis"], &["num_splits", "split_sizes"]),
        "gather" => s(&["x", "indices"], &["axis", "batch_dims", "validate_indices"]),
        "expand_dims" | "squeeze" => s(X, &["axes"]),
        _ => None,
    }
}

/// Every op name [`spec`] knows, for error messages and docs.
pub fn known_ops() -> Vec<&'static str> {
    let mut v = vec!["const", "cast", "softmax", "matmul", "conv", "reshape", "transpose", "slice_by_size"];
    v.extend_from_slice(&["slice_by_index", "concat", "split", "gather", "expand_dims", "squeeze"]);
    v.extend_from_slice(BINARY_OPS);
    v.extend_from_slice(UNARY_OPS);
    v.extend_from_slice(REDUCE_OPS);
    v
}

/// Values in scope while inferring: each name's type, and its value when it is a const.
#[derive(Clone, Debug, Default)]
pub struct Scope {
    vars: HashMap<String, (TensorType, Option<Value>)>,
}

impl Scope {
    pub fn new() -> Scope {
        Scope::default()
    }

    /// Adds a name; returns false if it was already defined.
    pub fn define(&mut self, name: &str, ty: TensorType, value: Option<Value>) -> bool {
        if self.vars.contains_key(name) {
            return false;
        }
        self.vars.insert(name.to_string(), (ty, value));
        true
    }

    pub fn get(&self, name: &str) -> Option<(&TensorType, Option<&Value>)> {
        self.vars.get(name).map(|(t, v)| (t, v.as_ref()))
    }

    pub fn contains(&self, name: &str) -> bool {
        self.vars.contains_key(name)
    }
}

/// An argument resolved against a scope: its type, and its value if constant.
#[derive(Clone, Debug)]
pub struct Resolved<'a> {
    pub ty: TensorType,
    pub value: Option<&'a Value>,
}

/// Resolves a single (non-tuple) argument.
pub fn resolve<'a>(arg: &'a Arg, scope: &'a Scope, arg_name: &str) -> Result<Resolved<'a>> {
    match arg {
        Arg::Var(name) => match scope.get(name) {
            Some((ty, value)) => Ok(Resolved { ty: ty.clone(), value }),
            None => {
                Err(mil_err!(UndefinedName, "argument `{arg_name}` uses `{name}`, which is not defined before this op"))
            }
        },
        Arg::Value(v) => Ok(Resolved { ty: v.ty().clone(), value: Some(v) }),
        Arg::List(_) => Err(mil_err!(BadArgument, "argument `{arg_name}` takes one value, found a tuple")),
    }
}

/// The ops' view of their arguments, with the helpers every inference rule needs.
struct Args<'a> {
    op: &'a Operation,
    scope: &'a Scope,
}

impl<'a> Args<'a> {
    fn get(&self, name: &str) -> Result<Option<Resolved<'a>>> {
        match self.op.arg(name) {
            None => Ok(None),
            Some(a) => resolve(a, self.scope, name).map(Some),
        }
    }

    fn req(&self, name: &str) -> Result<Resolved<'a>> {
        self.get(name)?.ok_or_else(|| mil_err!(BadArgument, "missing argument `{name}`"))
    }

    /// A constant argument's value (required when present).
    fn constant(&self, name: &str) -> Result<Option<&'a Value>> {
        match self.get(name)? {
            None => Ok(None),
            Some(r) => match r.value {
                Some(v) => Ok(Some(v)),
                None => Err(mil_err!(BadArgument, "argument `{name}` must be a constant, found a computed value")),
            },
        }
    }

    fn ints(&self, name: &str) -> Result<Option<Vec<i64>>> {
        match self.constant(name)? {
            None => Ok(None),
            Some(v) => match v.as_ints() {
                Some(i) => Ok(Some(i.to_vec())),
                None => Err(mil_err!(TypeMismatch, "argument `{name}` must be int32, found {}", v.ty())),
            },
        }
    }

    fn int(&self, name: &str) -> Result<Option<i64>> {
        match self.ints(name)? {
            None => Ok(None),
            Some(v) if v.len() == 1 => Ok(Some(v[0])),
            Some(v) => Err(mil_err!(BadArgument, "argument `{name}` must be one integer, found {} values", v.len())),
        }
    }

    fn bool(&self, name: &str, default: bool) -> Result<bool> {
        match self.constant(name)? {
            None => Ok(default),
            Some(v) => {
                v.as_bool().ok_or_else(|| mil_err!(TypeMismatch, "argument `{name}` must be bool, found {}", v.ty()))
            }
        }
    }

    fn string(&self, name: &str) -> Result<Option<&'a str>> {
        match self.constant(name)? {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| mil_err!(TypeMismatch, "argument `{name}` must be a string, found {}", v.ty())),
        }
    }

    fn float(&self, name: &str) -> Result<Option<f64>> {
        match self.constant(name)? {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| mil_err!(TypeMismatch, "argument `{name}` must be a number, found {}", v.ty())),
        }
    }

    /// The tensor `x`, which must be fp16 or fp32.
    fn float_x(&self, name: &str) -> Result<TensorType> {
        let x = self.req(name)?.ty;
        if !x.dtype.is_float() {
            return Err(mil_err!(TypeMismatch, "argument `{name}` must be fp16 or fp32, found {x}"));
        }
        Ok(x)
    }
}

/// Normalises a possibly negative axis for a tensor of `rank`.
pub fn norm_axis(axis: i64, rank: usize, what: &str) -> Result<usize> {
    let r = rank as i64;
    let a = if axis < 0 { axis + r } else { axis };
    if a < 0 || a >= r.max(1) {
        return Err(mil_err!(BadArgument, "{what} {axis} is out of range for a rank-{rank} tensor"));
    }
    Ok(a as usize)
}

/// [`norm_axis`] for ops that index the shape at the axis (split, concat, gather,
/// squeeze): a scalar has no axis to take, where a softmax or reduction of one is fine.
fn tensor_axis(axis: i64, rank: usize, what: &str) -> Result<usize> {
    if rank == 0 {
        return Err(mil_err!(BadArgument, "{what} {axis}: a scalar has no axes"));
    }
    norm_axis(axis, rank, what)
}

/// NumPy broadcasting of two shapes.
pub fn broadcast(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let n = a.len().max(b.len());
    let mut out = vec![0; n];
    for i in 0..n {
        let da = if i + a.len() >= n { a[i + a.len() - n] } else { 1 };
        let db = if i + b.len() >= n { b[i + b.len() - n] } else { 1 };
        out[i] = match (da, db) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => return None,
        };
    }
    Some(out)
}

/// Infers the result types of `op` from its arguments. Declared output types are not
/// looked at; [`validate`] compares them with what this returns.
pub fn infer(op: &Operation, scope: &Scope) -> Result<Vec<TensorType>> {
    let spec = spec(&op.op)
        .ok_or_else(|| mil_err!(UnknownOp, "unknown op `{}`; known ops: {}", op.op, known_ops().join(", ")))?;
    for (name, _) in &op.args {
        if !spec.required.contains(&name.as_str()) && !spec.optional.contains(&name.as_str()) {
            let mut all: Vec<&str> = spec.required.to_vec();
            all.extend_from_slice(spec.optional);
            return Err(mil_err!(BadArgument, "`{}` takes no argument `{name}`; it takes: {}", op.op, all.join(", ")));
        }
        if op.args.iter().filter(|(n, _)| n == name).count() > 1 {
            return Err(mil_err!(BadArgument, "argument `{name}` is given twice"));
        }
    }
    for r in spec.required {
        if op.arg(r).is_none() {
            return Err(mil_err!(BadArgument, "`{}` needs argument `{r}`", op.op));
        }
    }
    let a = Args { op, scope };
    let one = |t: TensorType| Ok(vec![t]);
    match op.op.as_str() {
        "const" => {
            let v = op.attr("val").ok_or_else(|| mil_err!(BadArgument, "`const` needs attribute `val`"))?;
            one(v.ty().clone())
        }
        "cast" => {
            let x = a.req("x")?.ty;
            let to = a.string("dtype")?.unwrap_or_default();
            let d = match to {
                "fp16" | "fp32" | "int32" | "bool" => DType::from_mil_name(to).unwrap(),
                _ => return Err(mil_err!(BadArgument, "cast to `{to}`: expected fp16, fp32, int32 or bool")),
            };
            one(x.with_dtype(d))
        }
        o if BINARY_OPS.contains(&o) => {
            let x = a.req("x")?.ty;
            let y = a.req("y")?.ty;
            if x.dtype != y.dtype {
                return Err(mil_err!(TypeMismatch, "x is {} but y is {}: both must have one dtype", x.dtype, y.dtype));
            }
            if !(x.dtype.is_float() || x.dtype == DType::Int32) {
                return Err(mil_err!(TypeMismatch, "`{o}` takes fp16, fp32 or int32, found {}", x.dtype));
            }
            let shape = broadcast(&x.shape, &y.shape)
                .ok_or_else(|| mil_err!(ShapeMismatch, "shapes {:?} and {:?} do not broadcast", x.shape, y.shape))?;
            one(x.with_shape(shape))
        }
        o if UNARY_OPS.contains(&o) => {
            let x = a.float_x("x")?;
            a.float("epsilon")?;
            one(x)
        }
        "softmax" => {
            let x = a.float_x("x")?;
            norm_axis(a.int("axis")?.unwrap_or(-1), x.rank(), "axis")?;
            one(x)
        }
        o if REDUCE_OPS.contains(&o) => {
            let x = a.float_x("x")?;
            let keep = a.bool("keep_dims", false)?;
            let axes = reduce_axes(a.ints("axes")?, x.rank())?;
            let shape: Vec<usize> = x
                .shape
                .iter()
                .enumerate()
                .filter_map(|(i, &d)| match (axes.contains(&i), keep) {
                    (false, _) => Some(d),
                    (true, true) => Some(1),
                    (true, false) => None,
                })
                .collect();
            one(x.with_shape(shape))
        }
        "matmul" => {
            let x = a.float_x("x")?;
            let y = a.float_x("y")?;
            if x.dtype != y.dtype {
                return Err(mil_err!(TypeMismatch, "x is {} but y is {}: both must have one dtype", x.dtype, y.dtype));
            }
            let (tx, ty) = (a.bool("transpose_x", false)?, a.bool("transpose_y", false)?);
            one(x.with_shape(matmul_shape(&x.shape, &y.shape, tx, ty)?))
        }
        "conv" => infer_conv(&a),
        "reshape" => {
            let x = a.req("x")?.ty;
            let shape = a.ints("shape")?.unwrap_or_default();
            one(x.with_shape(reshape_shape(&x.shape, &shape)?))
        }
        "transpose" => {
            let x = a.req("x")?.ty;
            let perm = a.ints("perm")?.unwrap_or_default();
            let perm = check_perm(&perm, x.rank())?;
            one(x.with_shape(perm.iter().map(|&p| x.shape[p]).collect::<Vec<_>>()))
        }
        "slice_by_size" => {
            let x = a.req("x")?.ty;
            let begin = a.ints("begin")?.unwrap_or_default();
            let size = a.ints("size")?.unwrap_or_default();
            let (_, shape) = slice_by_size(&x.shape, &begin, &size)?;
            one(x.with_shape(shape))
        }
        "slice_by_index" => {
            let x = a.req("x")?.ty;
            let s = SliceByIndex::from_args(&a, x.rank())?;
            one(x.with_shape(s.resolve(&x.shape)?.shape))
        }
        "concat" => infer_concat(&a),
        "split" => {
            let x = a.req("x")?.ty;
            let axis = tensor_axis(a.int("axis")?.unwrap_or(0), x.rank(), "axis")?;
            let sizes = split_sizes(x.shape[axis], a.int("num_splits")?, a.ints("split_sizes")?)?;
            if op.outputs.len() > 1 && op.outputs.len() != sizes.len() {
                return Err(mil_err!(
                    BadArgument,
                    "split makes {} parts but {} outputs are declared",
                    sizes.len(),
                    op.outputs.len()
                ));
            }
            Ok(sizes
                .into_iter()
                .map(|n| {
                    let mut s = x.shape.clone();
                    s[axis] = n;
                    x.with_shape(s)
                })
                .collect())
        }
        "gather" => {
            let x = a.req("x")?.ty;
            let idx = a.req("indices")?.ty;
            if idx.dtype != DType::Int32 && !idx.dtype.is_float() {
                return Err(mil_err!(TypeMismatch, "indices must be int32, found {}", idx.dtype));
            }
            if a.int("batch_dims")?.unwrap_or(0) != 0 {
                return Err(mil_err!(BadArgument, "gather with batch_dims other than 0 is not supported"));
            }
            let axis = tensor_axis(a.int("axis")?.unwrap_or(0), x.rank(), "axis")?;
            let mut shape = x.shape[..axis].to_vec();
            shape.extend_from_slice(&idx.shape);
            shape.extend_from_slice(&x.shape[axis + 1..]);
            one(x.with_shape(shape))
        }
        "expand_dims" => {
            let x = a.req("x")?.ty;
            let axes = a.ints("axes")?.ok_or_else(|| mil_err!(BadArgument, "`expand_dims` needs argument `axes`"))?;
            let out_rank = x.rank() + axes.len();
            let mut norm: Vec<usize> = axes.iter().map(|&ax| norm_axis(ax, out_rank, "axis")).collect::<Result<_>>()?;
            norm.sort_unstable();
            let mut shape = Vec::with_capacity(out_rank);
            let mut it = x.shape.iter();
            for i in 0..out_rank {
                shape.push(if norm.contains(&i) { 1 } else { *it.next().unwrap_or(&1) });
            }
            one(x.with_shape(shape))
        }
        "squeeze" => {
            let x = a.req("x")?.ty;
            let axes = match a.ints("axes")? {
                Some(ax) => ax.iter().map(|&v| tensor_axis(v, x.rank(), "axis")).collect::<Result<Vec<_>>>()?,
                None => (0..x.rank()).filter(|&i| x.shape[i] == 1).collect(),
            };
            for &ax in &axes {
                if x.shape[ax] != 1 {
                    return Err(mil_err!(ShapeMismatch, "cannot squeeze axis {ax} of size {}", x.shape[ax]));
                }
            }
            one(x.with_shape(
                x.shape.iter().enumerate().filter(|(i, _)| !axes.contains(i)).map(|(_, &d)| d).collect::<Vec<_>>(),
            ))
        }
        other => Err(mil_err!(UnknownOp, "unknown op `{other}`")),
    }
}

/// The axes a reduction covers (all when `axes` is absent), normalised and sorted.
pub fn reduce_axes(axes: Option<Vec<i64>>, rank: usize) -> Result<Vec<usize>> {
    let mut v: Vec<usize> = match axes {
        None => (0..rank).collect(),
        Some(ax) => ax.iter().map(|&a| norm_axis(a, rank, "axis")).collect::<Result<_>>()?,
    };
    v.sort_unstable();
    v.dedup();
    Ok(v)
}

/// Result shape of `matmul`: the last two dims multiply (after the transposes), leading
/// dims broadcast. Rank-1 operands are not supported (the generators never need them).
pub fn matmul_shape(x: &[usize], y: &[usize], tx: bool, ty: bool) -> Result<Vec<usize>> {
    if x.len() < 2 || y.len() < 2 {
        return Err(mil_err!(ShapeMismatch, "matmul needs rank ≥ 2 operands, found {x:?} and {y:?}"));
    }
    let (xm, xk) = (x[x.len() - 2], x[x.len() - 1]);
    let (m, kx) = if tx { (xk, xm) } else { (xm, xk) };
    let (ym, yk) = (y[y.len() - 2], y[y.len() - 1]);
    let (ky, n) = if ty { (yk, ym) } else { (ym, yk) };
    if kx != ky {
        return Err(mil_err!(
            ShapeMismatch,
            "matmul inner dimensions differ: x {x:?} (transpose_x = {tx}) gives {kx}, y {y:?} (transpose_y = {ty}) gives {ky}"
        ));
    }
    let mut batch = broadcast(&x[..x.len() - 2], &y[..y.len() - 2]).ok_or_else(|| {
        mil_err!(
            ShapeMismatch,
            "matmul batch dimensions {:?} and {:?} do not broadcast",
            &x[..x.len() - 2],
            &y[..y.len() - 2]
        )
    })?;
    batch.extend_from_slice(&[m, n]);
    Ok(batch)
}

/// `reshape`: 0 copies the input's dimension at that index, one −1 takes what is left.
pub fn reshape_shape(x: &[usize], shape: &[i64]) -> Result<Vec<usize>> {
    // Checked products: shapes and `shape` come from text, and must not overflow.
    let too_big = || mil_err!(ShapeMismatch, "cannot reshape {x:?} to {shape:?}: too many elements");
    let numel = x.iter().try_fold(1usize, |n, &d| n.checked_mul(d)).ok_or_else(too_big)?;
    let mut out = Vec::with_capacity(shape.len());
    let mut infer_at = None;
    for (i, &d) in shape.iter().enumerate() {
        match d {
            -1 if infer_at.is_none() => {
                infer_at = Some(i);
                out.push(1);
            }
            -1 => return Err(mil_err!(BadArgument, "reshape shape {shape:?} has more than one -1")),
            0 => out.push(*x.get(i).ok_or_else(|| {
                mil_err!(BadArgument, "reshape shape {shape:?}: 0 at index {i} but the input has rank {}", x.len())
            })?),
            d if d > 0 => out.push(d as usize),
            d => return Err(mil_err!(BadArgument, "reshape shape {shape:?} has dimension {d}")),
        }
    }
    let known = out.iter().try_fold(1usize, |n, &d| n.checked_mul(d)).ok_or_else(too_big)?;
    if let Some(i) = infer_at {
        if known == 0 || numel % known != 0 {
            return Err(mil_err!(ShapeMismatch, "cannot reshape {x:?} ({numel} elements) to {shape:?}"));
        }
        out[i] = numel / known;
    } else if known != numel {
        return Err(mil_err!(ShapeMismatch, "cannot reshape {x:?} ({numel} elements) to {shape:?} ({known} elements)"));
    }
    Ok(out)
}

/// Checks a permutation of `0..rank` (negative entries count from the end).
pub fn check_perm(perm: &[i64], rank: usize) -> Result<Vec<usize>> {
    if perm.len() != rank {
        return Err(mil_err!(BadArgument, "perm {perm:?} has {} entries for a rank-{rank} tensor", perm.len()));
    }
    let p: Vec<usize> = perm.iter().map(|&v| norm_axis(v, rank, "perm entry")).collect::<Result<_>>()?;
    let mut seen = vec![false; rank];
    for &i in &p {
        if std::mem::replace(&mut seen[i], true) {
            return Err(mil_err!(BadArgument, "perm {perm:?} is not a permutation"));
        }
    }
    Ok(p)
}

/// `slice_by_size`: returns (begin, size) per axis, resolved (size −1 runs to the end).
pub fn slice_by_size(x: &[usize], begin: &[i64], size: &[i64]) -> Result<(Vec<usize>, Vec<usize>)> {
    if begin.len() != x.len() || size.len() != x.len() {
        return Err(mil_err!(BadArgument, "begin {begin:?} and size {size:?} must have one entry per axis of {x:?}"));
    }
    let mut b = Vec::with_capacity(x.len());
    let mut s = Vec::with_capacity(x.len());
    for i in 0..x.len() {
        let d = x[i] as i64;
        let bi = if begin[i] < 0 { begin[i] + d } else { begin[i] };
        let si = if size[i] == -1 { d - bi } else { size[i] };
        if bi < 0 || si < 0 || bi + si > d {
            return Err(mil_err!(
                ShapeMismatch,
                "slice on axis {i}: begin {} size {} does not fit in dimension {d} of {x:?}",
                begin[i],
                size[i]
            ));
        }
        b.push(bi as usize);
        s.push(si as usize);
    }
    Ok((b, s))
}

/// `slice_by_index`, resolved per axis.
#[derive(Clone, Debug)]
pub struct SliceByIndex {
    pub begin: Vec<i64>,
    pub end: Vec<i64>,
    pub stride: Vec<i64>,
    pub begin_mask: Vec<bool>,
    pub end_mask: Vec<bool>,
    pub squeeze_mask: Vec<bool>,
}

/// A resolved strided slice: start and step per axis, the kept extents, and the shape
/// after squeezing.
#[derive(Clone, Debug)]
pub struct ResolvedSlice {
    pub start: Vec<usize>,
    pub step: Vec<i64>,
    pub extent: Vec<usize>,
    pub shape: Vec<usize>,
}

impl SliceByIndex {
    fn from_args(a: &Args<'_>, rank: usize) -> Result<SliceByIndex> {
        let bools = |name: &str| -> Result<Vec<bool>> {
            match a.constant(name)? {
                None => Ok(vec![false; rank]),
                Some(Value::Literal { data: crate::ir::Data::Bool(v), .. }) if v.len() == rank => Ok(v.clone()),
                Some(v) => Err(mil_err!(BadArgument, "argument `{name}` must be {rank} bools, found {}", v.ty())),
            }
        };
        let s = SliceByIndex {
            begin: a.ints("begin")?.unwrap_or_default(),
            end: a.ints("end")?.unwrap_or_default(),
            stride: a.ints("stride")?.unwrap_or_else(|| vec![1; rank]),
            begin_mask: bools("begin_mask")?,
            end_mask: bools("end_mask")?,
            squeeze_mask: bools("squeeze_mask")?,
        };
        if s.begin.len() != rank || s.end.len() != rank || s.stride.len() != rank {
            return Err(mil_err!(BadArgument, "begin, end and stride need {rank} entries each"));
        }
        Ok(s)
    }

    pub fn resolve(&self, x: &[usize]) -> Result<ResolvedSlice> {
        let mut r = ResolvedSlice { start: vec![], step: vec![], extent: vec![], shape: vec![] };
        for (i, &dim) in x.iter().enumerate() {
            let d = dim as i64;
            let st = self.stride[i];
            if st == 0 {
                return Err(mil_err!(BadArgument, "stride 0 on axis {i}"));
            }
            let clamp = |v: i64, lo: i64, hi: i64| v.max(lo).min(hi);
            let norm = |v: i64| if v < 0 { v + d } else { v };
            let (b, e) = if st > 0 {
                let b = if self.begin_mask[i] { 0 } else { clamp(norm(self.begin[i]), 0, d) };
                let e = if self.end_mask[i] { d } else { clamp(norm(self.end[i]), 0, d) };
                (b, e)
            } else {
                let b = if self.begin_mask[i] { d - 1 } else { clamp(norm(self.begin[i]), -1, d - 1) };
                let e = if self.end_mask[i] { -1 } else { clamp(norm(self.end[i]), -1, d - 1) };
                (b, e)
            };
            let n = if st > 0 { (e - b + st - 1).div_euclid(st) } else { (b - e + (-st) - 1).div_euclid(-st) }.max(0);
            if self.squeeze_mask[i] && n != 1 {
                return Err(mil_err!(ShapeMismatch, "squeeze_mask on axis {i}, but the slice keeps {n} elements"));
            }
            r.start.push(b.max(0) as usize);
            r.step.push(st);
            r.extent.push(n as usize);
            if !self.squeeze_mask[i] {
                r.shape.push(n as usize);
            }
        }
        Ok(r)
    }
}

/// Sizes of the parts `split` makes.
pub fn split_sizes(dim: usize, num_splits: Option<i64>, sizes: Option<Vec<i64>>) -> Result<Vec<usize>> {
    match (num_splits, sizes) {
        (_, Some(s)) => {
            if s.iter().any(|&v| v <= 0) || s.iter().sum::<i64>() != dim as i64 {
                return Err(mil_err!(ShapeMismatch, "split_sizes {s:?} must be positive and add up to {dim}"));
            }
            Ok(s.iter().map(|&v| v as usize).collect())
        }
        (Some(n), None) => {
            // n > dim is refused first: it cannot divide a non-empty axis, and splitting an
            // empty one into (up to 2^31) parts would only exhaust memory.
            if n <= 0 || n as usize > dim || !dim.is_multiple_of(n as usize) {
                return Err(mil_err!(ShapeMismatch, "num_splits {n} does not divide dimension {dim}"));
            }
            Ok(vec![dim / n as usize; n as usize])
        }
        (None, None) => Err(mil_err!(BadArgument, "`split` needs `num_splits` or `split_sizes`")),
    }
}

/// Conv geometry, resolved: what the CPU device needs to run it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConvGeometry {
    pub strides: [usize; 2],
    pub dilations: [usize; 2],
    /// top, bottom, left, right.
    pub pad: [usize; 4],
    pub groups: usize,
}

/// Resolves `conv`'s geometry from its arguments (constants), against input `x` and
/// weight `w` shapes. Exposed so devices share one reading of the defaults.
pub fn conv_geometry(op: &Operation, scope: &Scope, x: &[usize], w: &[usize]) -> Result<ConvGeometry> {
    let a = Args { op, scope };
    let pair = |name: &str| -> Result<[usize; 2]> {
        match a.ints(name)? {
            None => Ok([1, 1]),
            Some(v) if v.len() == 2 && v.iter().all(|&s| s > 0) => Ok([v[0] as usize, v[1] as usize]),
            Some(v) => Err(mil_err!(BadArgument, "`{name}` must be two positive integers, found {v:?}")),
        }
    };
    let strides = pair("strides")?;
    let dilations = pair("dilations")?;
    let groups = a.int("groups")?.unwrap_or(1);
    if groups <= 0 {
        return Err(mil_err!(BadArgument, "groups must be positive, found {groups}"));
    }
    let (kh, kw) = (w[2], w[3]);
    let pad = match a.string("pad_type")?.unwrap_or("valid") {
        "valid" => [0; 4],
        "custom" => match a.ints("pad")? {
            Some(p) if p.len() == 4 && p.iter().all(|&v| v >= 0) => {
                [p[0] as usize, p[1] as usize, p[2] as usize, p[3] as usize]
            }
            Some(p) => return Err(mil_err!(BadArgument, "pad must be 4 non-negative integers, found {p:?}")),
            None => [0; 4],
        },
        "same" => {
            let total = |size: usize, k: usize, s: usize, d: usize| {
                let out = size.div_ceil(s);
                // An empty axis needs no padding (and `out - 1` would underflow).
                if out == 0 {
                    0
                } else {
                    ((out - 1) * s + k.saturating_sub(1) * d + 1).saturating_sub(size)
                }
            };
            let th = total(x[2], kh, strides[0], dilations[0]);
            let tw = total(x[3], kw, strides[1], dilations[1]);
            [th / 2, th - th / 2, tw / 2, tw - tw / 2]
        }
        other => return Err(mil_err!(BadArgument, "pad_type `{other}`: expected valid, same or custom")),
    };
    Ok(ConvGeometry { strides, dilations, pad, groups: groups as usize })
}

fn infer_conv(a: &Args<'_>) -> Result<Vec<TensorType>> {
    let x = a.float_x("x")?;
    let w = a.float_x("weight")?;
    if x.rank() != 4 || w.rank() != 4 {
        return Err(mil_err!(
            ShapeMismatch,
            "conv takes x [N, C, H, W] and weight [O, C/groups, kH, kW], found {:?} and {:?}",
            x.shape,
            w.shape
        ));
    }
    if x.dtype != w.dtype {
        return Err(mil_err!(TypeMismatch, "x is {} but weight is {}", x.dtype, w.dtype));
    }
    if w.shape[2] == 0 || w.shape[3] == 0 {
        return Err(mil_err!(ShapeMismatch, "conv weight {:?} has an empty kernel", w.shape));
    }
    let g = conv_geometry(a.op, a.scope, &x.shape, &w.shape)?;
    if x.shape[1] % g.groups != 0 || w.shape[0] % g.groups != 0 || w.shape[1] * g.groups != x.shape[1] {
        return Err(mil_err!(
            ShapeMismatch,
            "conv with {} groups: x has {} channels, weight {:?} expects {} per group",
            g.groups,
            x.shape[1],
            w.shape,
            w.shape[1]
        ));
    }
    if let Some(b) = a.get("bias")? {
        if b.ty.shape != [w.shape[0]] {
            return Err(mil_err!(ShapeMismatch, "bias must be [{}], found {:?}", w.shape[0], b.ty.shape));
        }
    }
    let out = |size: usize, k: usize, s: usize, d: usize, p: usize| -> Result<usize> {
        let span = (k - 1) * d + 1;
        if size + p < span {
            return Err(mil_err!(
                ShapeMismatch,
                "conv kernel span {span} is larger than the padded input {}",
                size + p
            ));
        }
        Ok((size + p - span) / s + 1)
    };
    let h = out(x.shape[2], w.shape[2], g.strides[0], g.dilations[0], g.pad[0] + g.pad[1])?;
    let wd = out(x.shape[3], w.shape[3], g.strides[1], g.dilations[1], g.pad[2] + g.pad[3])?;
    Ok(vec![x.with_shape([x.shape[0], w.shape[0], h, wd])])
}

fn infer_concat(a: &Args<'_>) -> Result<Vec<TensorType>> {
    let items = match a.op.arg("values") {
        Some(Arg::List(items)) => items,
        Some(other) => std::slice::from_ref(other),
        None => return Err(mil_err!(BadArgument, "missing argument `values`")),
    };
    if items.is_empty() {
        return Err(mil_err!(BadArgument, "concat needs at least one value"));
    }
    let types: Vec<TensorType> =
        items.iter().map(|i| resolve(i, a.scope, "values").map(|r| r.ty)).collect::<Result<_>>()?;
    let first = &types[0];
    let axis = tensor_axis(a.int("axis")?.unwrap_or(0), first.rank(), "axis")?;
    let interleave = a.bool("interleave", false)?;
    let mut total = 0;
    for (i, t) in types.iter().enumerate() {
        if t.dtype != first.dtype {
            return Err(mil_err!(TypeMismatch, "concat value {i} is {}, value 0 is {}", t.dtype, first.dtype));
        }
        let same = t.rank() == first.rank()
            && t.shape.iter().zip(&first.shape).enumerate().all(|(d, (x, y))| d == axis || x == y);
        if !same || (interleave && t.shape[axis] != first.shape[axis]) {
            return Err(mil_err!(
                ShapeMismatch,
                "concat value {i} has shape {:?}, which does not fit {:?} on axis {axis}",
                t.shape,
                first.shape
            ));
        }
        total += t.shape[axis];
    }
    let mut shape = first.shape.clone();
    shape[axis] = total;
    Ok(vec![first.with_shape(shape)])
}

/// Checks one function: names defined before use and never twice, every op known and
/// well-argued, and declared result types equal to inferred ones. Errors carry the op
/// and its line:column.
pub fn validate_function(f: &Function) -> Result<Scope> {
    let mut scope = Scope::new();
    if Dialect::from_name(&f.opset).is_none() {
        return Err(
            mil_err!(Syntax, "function `{}` has opset `{}`: expected ios16 or ios18", f.name, f.opset).at(f.span)
        );
    }
    for v in &f.inputs {
        if !v.ty.dtype.is_float() {
            return Err(
                mil_err!(TypeMismatch, "input `{}` is {}: inputs must be fp16 or fp32", v.name, v.ty).at(f.span)
            );
        }
        too_large(&v.name, &v.ty).map_err(|e| e.at(f.span))?;
        if !scope.define(&v.name, v.ty.clone(), None) {
            return Err(mil_err!(DuplicateName, "input `{}` is declared twice", v.name).at(f.span));
        }
    }
    for op in &f.ops {
        let ctx = |e: Error| e.at(op.span).in_op(op.name.clone());
        let inferred = infer(op, &scope).map_err(ctx)?;
        if let Some(Value::Literal { ty, data }) = op.const_value() {
            if data.len() != ty.numel() {
                return Err(ctx(mil_err!(
                    BadLiteral,
                    "literal of type {ty} has {} values, expected {}",
                    data.len(),
                    ty.numel()
                )));
            }
        }
        if inferred.len() != op.outputs.len() {
            return Err(ctx(mil_err!(
                BadArgument,
                "`{}` makes {} results, {} declared",
                op.op,
                inferred.len(),
                op.outputs.len()
            )));
        }
        for (out, ty) in op.outputs.iter().zip(&inferred) {
            if out.ty.dtype != ty.dtype {
                return Err(ctx(mil_err!(
                    TypeMismatch,
                    "`{}` is declared {}, but `{}` gives {}",
                    out.name,
                    out.ty,
                    op.op,
                    ty
                )));
            }
            if out.ty.shape != ty.shape {
                return Err(ctx(mil_err!(
                    ShapeMismatch,
                    "`{}` is declared {}, but `{}` gives {}",
                    out.name,
                    out.ty,
                    op.op,
                    ty
                )));
            }
            too_large(&out.name, &out.ty).map_err(ctx)?;
            if !scope.define(&out.name, out.ty.clone(), op.const_value().cloned()) {
                return Err(ctx(mil_err!(DuplicateName, "`{}` is already defined", out.name)));
            }
        }
    }
    if f.outputs.is_empty() {
        return Err(mil_err!(BadArgument, "function `{}` returns nothing", f.name).at(f.span));
    }
    for name in &f.outputs {
        match scope.get(name) {
            None => {
                return Err(
                    mil_err!(UndefinedName, "function `{}` returns `{name}`, which is not defined", f.name).at(f.span)
                )
            }
            Some((ty, _)) if !ty.dtype.is_float() => {
                return Err(mil_err!(TypeMismatch, "output `{name}` is {ty}: outputs must be fp16 or fp32").at(f.span))
            }
            _ => {}
        }
    }
    Ok(scope)
}

/// Refuses a tensor whose size in bytes overflows (a shape from input such as
/// `[1, 1, 2^40, 2^40]`): every later size computation can then be unchecked.
fn too_large(name: &str, ty: &TensorType) -> Result<()> {
    let elements = ty.shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
    match elements.and_then(|n| n.checked_mul(8)).filter(|&b| b <= isize::MAX as usize) {
        Some(_) => Ok(()),
        None => Err(mil_err!(ShapeMismatch, "`{name}` is {ty}: too large to exist (more than 2^63 bytes)")),
    }
}

/// Validates every function of a program (see [`validate_function`]).
pub fn validate(p: &Program) -> Result<()> {
    if p.functions.is_empty() {
        return Err(mil_err!(Syntax, "the program has no function"));
    }
    for f in &p.functions {
        validate_function(f)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcasting_follows_numpy() {
        assert_eq!(broadcast(&[1, 4, 1, 8], &[3, 1]), Some(vec![1, 4, 3, 8]));
        assert_eq!(broadcast(&[1, 4, 1, 8], &[3, 1, 8]), None);
        assert_eq!(broadcast(&[], &[2, 3]), Some(vec![2, 3]));
        assert_eq!(broadcast(&[2, 3], &[3, 2]), None);
    }

    #[test]
    fn matmul_shapes() {
        assert_eq!(matmul_shape(&[1, 4, 64, 32], &[1, 4, 32, 16], false, false).unwrap(), vec![1, 4, 64, 16]);
        assert_eq!(matmul_shape(&[2, 32, 64], &[16, 32], true, true).unwrap(), vec![2, 64, 16]);
        assert!(matmul_shape(&[4, 5], &[6, 7], false, false).is_err());
    }

    #[test]
    fn reshape_resolves_zero_and_minus_one() {
        assert_eq!(reshape_shape(&[1, 768, 1, 256], &[0, 12, 64, -1]).unwrap(), vec![1, 12, 64, 256]);
        assert!(reshape_shape(&[2, 3], &[4, -1]).is_err());
        assert!(reshape_shape(&[2, 3], &[-1, -1]).is_err());
    }

    #[test]
    fn slice_by_index_matches_python() {
        let s = SliceByIndex {
            begin: vec![1, -1],
            end: vec![5, 0],
            stride: vec![2, -1],
            begin_mask: vec![false, false],
            end_mask: vec![false, true],
            squeeze_mask: vec![false, false],
        };
        // x[1:5:2, ::-1] on a [6, 3] tensor.
        let r = s.resolve(&[6, 3]).unwrap();
        assert_eq!(r.shape, vec![2, 3]);
        assert_eq!(r.start, vec![1, 2]);
    }
}
