//! The builder every kernel generator writes programs with. Each op's result type is
//! inferred as it is added ([`crate::ops::infer`]), so a generator states only what it
//! computes. Mistakes (a shape that does not fit) do not interrupt the chain of calls:
//! the first one is kept, and [`FunctionBuilder::finish`] returns it with the op named.

use std::collections::HashMap;

use crate::ir::{Arg, DType, Dialect, Function, Operation, Span, TensorType, Value, Var};
use crate::ops::{self, Scope};
use crate::{mil_err, Error, Result};

/// Builds one function. Constants are deduplicated: asking twice for `fp16(2)` gives the
/// same value.
pub struct FunctionBuilder {
    f: Function,
    scope: Scope,
    consts: HashMap<String, Var>,
    error: Option<Error>,
    counter: usize,
}

impl FunctionBuilder {
    pub fn new(name: &str, dialect: Dialect) -> FunctionBuilder {
        FunctionBuilder {
            f: Function {
                name: name.to_string(),
                opset: dialect.opset().to_string(),
                inputs: Vec::new(),
                ops: Vec::new(),
                outputs: Vec::new(),
                span: Span::default(),
            },
            scope: Scope::new(),
            consts: HashMap::new(),
            error: None,
            counter: 0,
        }
    }

    fn fail(&mut self, e: Error) {
        if self.error.is_none() {
            self.error = Some(e);
        }
    }

    /// Declares an input. Inputs are bound in the order they are declared.
    pub fn input(&mut self, name: &str, ty: TensorType) -> Var {
        let v = Var::new(name, ty.clone());
        if !self.scope.define(name, ty, None) {
            self.fail(mil_err!(DuplicateName, "input `{name}` is declared twice"));
        }
        self.f.inputs.push(v.clone());
        v
    }

    /// Marks a value as a function output (outputs are returned in this order).
    pub fn output(&mut self, v: &Var) {
        self.f.outputs.push(v.name.clone());
    }

    /// The first error met, or the finished function.
    pub fn finish(self) -> Result<Function> {
        match self.error {
            Some(e) => Err(e),
            None if self.f.outputs.is_empty() => {
                Err(mil_err!(BadArgument, "function `{}` returns nothing", self.f.name))
            }
            None => Ok(self.f),
        }
    }

    /// A fresh name with this prefix.
    pub fn fresh(&mut self, prefix: &str) -> String {
        loop {
            self.counter += 1;
            let name = format!("{prefix}_{}", self.counter);
            if !self.scope.contains(&name) {
                return name;
            }
        }
    }

    /// A named constant (a literal or a BLOBFILE tensor).
    pub fn constant(&mut self, name: &str, value: Value) -> Var {
        let ty = value.ty().clone();
        let op = Operation {
            op: "const".into(),
            name: name.to_string(),
            outputs: vec![Var::new(name, ty.clone())],
            args: Vec::new(),
            attrs: vec![("val".into(), value.clone())],
            span: Span::default(),
        };
        if !self.scope.define(name, ty.clone(), Some(value)) {
            self.fail(mil_err!(DuplicateName, "`{name}` is already defined").in_op(name));
        }
        self.f.ops.push(op);
        Var::new(name, ty)
    }

    /// An unnamed literal constant, shared with any equal one made before.
    pub fn literal(&mut self, value: Value) -> Var {
        let key = format!("{value:?}");
        if let Some(v) = self.consts.get(&key) {
            return v.clone();
        }
        let name = self.fresh("c");
        let v = self.constant(&name, value);
        self.consts.insert(key, v.clone());
        v
    }

    pub fn scalar(&mut self, dtype: DType, v: f64) -> Var {
        self.literal(Value::float(dtype, v))
    }

    pub fn int(&mut self, v: i64) -> Var {
        self.literal(Value::int32(v))
    }

    pub fn ints(&mut self, v: &[i64]) -> Var {
        self.literal(Value::int32s(v))
    }

    pub fn boolean(&mut self, v: bool) -> Var {
        self.literal(Value::bool(v))
    }

    pub fn string(&mut self, s: &str) -> Var {
        self.literal(Value::string(s))
    }

    /// Adds any op; returns its results (one per inferred type), named `name`,
    /// `name_1`, … when there are several.
    pub fn op(&mut self, op_type: &str, name: &str, args: Vec<(&str, Arg)>) -> Vec<Var> {
        let mut op = Operation {
            op: op_type.to_string(),
            name: name.to_string(),
            outputs: Vec::new(),
            args: args.into_iter().map(|(n, a)| (n.to_string(), a)).collect(),
            attrs: Vec::new(),
            span: Span::default(),
        };
        let types = match ops::infer(&op, &self.scope) {
            Ok(t) => t,
            Err(e) => {
                self.fail(e.in_op(name));
                // Keep the chain going with a placeholder so later calls still type-check.
                vec![TensorType::scalar(DType::Fp32)]
            }
        };
        let many = types.len() > 1;
        for (i, ty) in types.into_iter().enumerate() {
            let out_name = if many { format!("{name}_{i}") } else { name.to_string() };
            if !self.scope.define(&out_name, ty.clone(), None) {
                self.fail(mil_err!(DuplicateName, "`{out_name}` is already defined").in_op(name));
            }
            op.outputs.push(Var::new(out_name, ty));
        }
        let outs = op.outputs.clone();
        self.f.ops.push(op);
        outs
    }

    /// Adds an op with one result.
    pub fn op1(&mut self, op_type: &str, name: &str, args: Vec<(&str, Arg)>) -> Var {
        self.op(op_type, name, args).swap_remove(0)
    }

    fn binary(&mut self, op: &str, name: &str, x: &Var, y: &Var) -> Var {
        self.op1(op, name, vec![("x", x.into()), ("y", y.into())])
    }

    fn unary(&mut self, op: &str, name: &str, x: &Var) -> Var {
        self.op1(op, name, vec![("x", x.into())])
    }

    pub fn add(&mut self, name: &str, x: &Var, y: &Var) -> Var {
        self.binary("add", name, x, y)
    }
    pub fn sub(&mut self, name: &str, x: &Var, y: &Var) -> Var {
        self.binary("sub", name, x, y)
    }
    pub fn mul(&mut self, name: &str, x: &Var, y: &Var) -> Var {
        self.binary("mul", name, x, y)
    }
    pub fn real_div(&mut self, name: &str, x: &Var, y: &Var) -> Var {
        self.binary("real_div", name, x, y)
    }
    pub fn pow(&mut self, name: &str, x: &Var, y: &Var) -> Var {
        self.binary("pow", name, x, y)
    }
    pub fn maximum(&mut self, name: &str, x: &Var, y: &Var) -> Var {
        self.binary("maximum", name, x, y)
    }
    pub fn minimum(&mut self, name: &str, x: &Var, y: &Var) -> Var {
        self.binary("minimum", name, x, y)
    }
    pub fn relu(&mut self, name: &str, x: &Var) -> Var {
        self.unary("relu", name, x)
    }
    pub fn sigmoid(&mut self, name: &str, x: &Var) -> Var {
        self.unary("sigmoid", name, x)
    }
    pub fn silu(&mut self, name: &str, x: &Var) -> Var {
        self.unary("silu", name, x)
    }
    pub fn tanh(&mut self, name: &str, x: &Var) -> Var {
        self.unary("tanh", name, x)
    }
    pub fn exp(&mut self, name: &str, x: &Var) -> Var {
        self.unary("exp", name, x)
    }
    pub fn sqrt(&mut self, name: &str, x: &Var) -> Var {
        self.unary("sqrt", name, x)
    }
    pub fn square(&mut self, name: &str, x: &Var) -> Var {
        self.unary("square", name, x)
    }
    pub fn identity(&mut self, name: &str, x: &Var) -> Var {
        self.unary("identity", name, x)
    }

    /// `x` multiplied by a scalar constant of its own dtype.
    pub fn scale(&mut self, name: &str, x: &Var, k: f64) -> Var {
        let c = self.scalar(x.ty.dtype, k);
        self.mul(name, x, &c)
    }

    pub fn softmax(&mut self, name: &str, x: &Var, axis: i64) -> Var {
        let axis = self.int(axis);
        self.op1("softmax", name, vec![("axis", (&axis).into()), ("x", x.into())])
    }

    fn reduce(&mut self, op: &str, name: &str, x: &Var, axes: &[i64], keep_dims: bool) -> Var {
        let axes = self.ints(axes);
        let keep = self.boolean(keep_dims);
        self.op1(op, name, vec![("axes", (&axes).into()), ("keep_dims", (&keep).into()), ("x", x.into())])
    }
    pub fn reduce_sum(&mut self, name: &str, x: &Var, axes: &[i64], keep_dims: bool) -> Var {
        self.reduce("reduce_sum", name, x, axes, keep_dims)
    }
    pub fn reduce_mean(&mut self, name: &str, x: &Var, axes: &[i64], keep_dims: bool) -> Var {
        self.reduce("reduce_mean", name, x, axes, keep_dims)
    }
    pub fn reduce_max(&mut self, name: &str, x: &Var, axes: &[i64], keep_dims: bool) -> Var {
        self.reduce("reduce_max", name, x, axes, keep_dims)
    }

    pub fn matmul(&mut self, name: &str, x: &Var, y: &Var, transpose_x: bool, transpose_y: bool) -> Var {
        let tx = self.boolean(transpose_x);
        let ty = self.boolean(transpose_y);
        self.op1(
            "matmul",
            name,
            vec![("transpose_x", (&tx).into()), ("transpose_y", (&ty).into()), ("x", x.into()), ("y", y.into())],
        )
    }

    /// A 1×1 convolution (a linear layer on `[1, C, 1, S]`): weight `[O, C, 1, 1]`.
    pub fn conv1x1(&mut self, name: &str, x: &Var, weight: &Var) -> Var {
        let pad_type = self.string("valid");
        let strides = self.ints(&[1, 1]);
        let pad = self.ints(&[0, 0, 0, 0]);
        let dilations = self.ints(&[1, 1]);
        let groups = self.int(1);
        self.op1(
            "conv",
            name,
            vec![
                ("dilations", (&dilations).into()),
                ("groups", (&groups).into()),
                ("pad", (&pad).into()),
                ("pad_type", (&pad_type).into()),
                ("strides", (&strides).into()),
                ("weight", weight.into()),
                ("x", x.into()),
            ],
        )
    }

    pub fn cast(&mut self, name: &str, x: &Var, to: DType) -> Var {
        let d = self.string(to.mil_name());
        self.op1("cast", name, vec![("dtype", (&d).into()), ("x", x.into())])
    }

    pub fn reshape(&mut self, name: &str, x: &Var, shape: &[i64]) -> Var {
        let s = self.ints(shape);
        self.op1("reshape", name, vec![("shape", (&s).into()), ("x", x.into())])
    }

    pub fn transpose(&mut self, name: &str, x: &Var, perm: &[i64]) -> Var {
        let p = self.ints(perm);
        self.op1("transpose", name, vec![("perm", (&p).into()), ("x", x.into())])
    }

    pub fn slice_by_size(&mut self, name: &str, x: &Var, begin: &[i64], size: &[i64]) -> Var {
        let b = self.ints(begin);
        let s = self.ints(size);
        self.op1("slice_by_size", name, vec![("begin", (&b).into()), ("size", (&s).into()), ("x", x.into())])
    }

    pub fn concat(&mut self, name: &str, values: &[&Var], axis: i64) -> Var {
        let ax = self.int(axis);
        let il = self.boolean(false);
        let list = Arg::List(values.iter().map(|v| Arg::from(*v)).collect());
        self.op1("concat", name, vec![("axis", (&ax).into()), ("interleave", (&il).into()), ("values", list)])
    }

    /// Splits `x` on `axis` into parts of the given sizes; results `name_0`, `name_1`, ….
    pub fn split(&mut self, name: &str, x: &Var, sizes: &[i64], axis: i64) -> Vec<Var> {
        let ax = self.int(axis);
        let s = self.ints(sizes);
        let n = self.int(sizes.len() as i64);
        self.op(
            "split",
            name,
            vec![("axis", (&ax).into()), ("num_splits", (&n).into()), ("split_sizes", (&s).into()), ("x", x.into())],
        )
    }

    pub fn gather(&mut self, name: &str, x: &Var, indices: &Var, axis: i64) -> Var {
        let ax = self.int(axis);
        self.op1("gather", name, vec![("axis", (&ax).into()), ("indices", indices.into()), ("x", x.into())])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn infers_and_dedups() {
        let mut b = FunctionBuilder::new("main", Dialect::Ios18);
        let x = b.input("x", TensorType::surface(DType::Fp16, 8, 4));
        let y = b.scale("y", &x, 2.0);
        let z = b.scale("z", &y, 2.0);
        let m = b.reduce_mean("m", &z, &[1], true);
        assert_eq!(m.ty.shape, vec![1, 1, 1, 4]);
        b.output(&m);
        let f = b.finish().unwrap();
        // one shared fp16(2) const, two muls, the axes/keep_dims consts, one reduce
        assert_eq!(f.ops.iter().filter(|o| o.op == "const").count(), 3);
        crate::ops::validate_function(&f).unwrap();
    }

    #[test]
    fn first_error_is_kept_with_the_op() {
        let mut b = FunctionBuilder::new("main", Dialect::Ios18);
        let x = b.input("x", TensorType::surface(DType::Fp16, 8, 4));
        let w = b.input("w", TensorType::new(DType::Fp16, [5, 3]));
        let bad = b.matmul("bad", &x, &w, false, false);
        let y = b.relu("y", &bad);
        b.output(&y);
        let e = b.finish().unwrap_err();
        assert_eq!(e.kind, crate::ErrorKind::ShapeMismatch);
        assert_eq!(e.op.as_deref(), Some("bad"));
    }
}
