//! The typed IR: a [`Program`] holds [`Function`]s, a function holds [`Operation`]s whose
//! results are named, typed values ([`Var`]). Every value's type is known: inputs declare
//! theirs, op results are inferred by the builder (or declared in text and checked by
//! [`crate::validate`]).

use std::fmt;

/// The element types MIL text uses on the ANE.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    Fp16,
    Fp32,
    Int32,
    Uint64,
    Bool,
    String,
}

impl DType {
    pub const ALL: [DType; 6] = [DType::Fp16, DType::Fp32, DType::Int32, DType::Uint64, DType::Bool, DType::String];

    /// The spelling in MIL text: `fp16`, `int32`, ….
    pub fn mil_name(self) -> &'static str {
        match self {
            DType::Fp16 => "fp16",
            DType::Fp32 => "fp32",
            DType::Int32 => "int32",
            DType::Uint64 => "uint64",
            DType::Bool => "bool",
            DType::String => "string",
        }
    }

    pub fn from_mil_name(name: &str) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.mil_name() == name)
    }

    pub fn is_float(self) -> bool {
        matches!(self, DType::Fp16 | DType::Fp32)
    }

    pub fn is_int(self) -> bool {
        matches!(self, DType::Int32 | DType::Uint64)
    }

    /// Bytes per element in a surface or weight file (strings have no fixed size).
    pub fn size_bytes(self) -> usize {
        match self {
            DType::Fp16 => 2,
            DType::Fp32 | DType::Int32 => 4,
            DType::Uint64 => 8,
            DType::Bool => 1,
            DType::String => 0,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.mil_name())
    }
}

/// A tensor type: element type and static shape. Rank 0 is a scalar.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TensorType {
    pub dtype: DType,
    pub shape: Vec<usize>,
}

impl TensorType {
    pub fn new(dtype: DType, shape: impl Into<Vec<usize>>) -> TensorType {
        TensorType { dtype, shape: shape.into() }
    }

    pub fn scalar(dtype: DType) -> TensorType {
        TensorType { dtype, shape: Vec::new() }
    }

    /// The ANE's activation layout: `[1, C, 1, S]`.
    pub fn surface(dtype: DType, channels: usize, seq: usize) -> TensorType {
        TensorType::new(dtype, vec![1, channels, 1, seq])
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    pub fn is_scalar(&self) -> bool {
        self.shape.is_empty()
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn with_dtype(&self, dtype: DType) -> TensorType {
        TensorType { dtype, shape: self.shape.clone() }
    }

    pub fn with_shape(&self, shape: impl Into<Vec<usize>>) -> TensorType {
        TensorType { dtype: self.dtype, shape: shape.into() }
    }
}

impl fmt::Display for TensorType {
    /// Always the long form `tensor<fp16, [1, 2]>`; the printer picks short scalar forms.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "tensor<{}, [", self.dtype)?;
        for (i, d) in self.shape.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{d}")?;
        }
        f.write_str("]>")
    }
}

/// The elements of a literal, row-major. Floats are kept as f64 so that any fp16/fp32
/// value prints and parses back exactly.
#[derive(Clone, Debug, PartialEq)]
pub enum Data {
    Float(Vec<f64>),
    Int(Vec<i64>),
    Bool(Vec<bool>),
    Str(Vec<String>),
}

impl Data {
    pub fn len(&self) -> usize {
        match self {
            Data::Float(v) => v.len(),
            Data::Int(v) => v.len(),
            Data::Bool(v) => v.len(),
            Data::Str(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A constant value: an inline literal, or a tensor stored in a BLOBFILE weight file.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Literal {
        ty: TensorType,
        data: Data,
    },
    /// `BLOBFILE(path = string("@model_path/weights/w.bin"), offset = uint64(64))`:
    /// `offset` is the byte offset of the chunk header in that file.
    Blob {
        ty: TensorType,
        path: String,
        offset: u64,
    },
}

impl Value {
    pub fn ty(&self) -> &TensorType {
        match self {
            Value::Literal { ty, .. } | Value::Blob { ty, .. } => ty,
        }
    }

    pub fn float(dtype: DType, v: f64) -> Value {
        Value::Literal { ty: TensorType::scalar(dtype), data: Data::Float(vec![v]) }
    }

    pub fn int32(v: i64) -> Value {
        Value::Literal { ty: TensorType::scalar(DType::Int32), data: Data::Int(vec![v]) }
    }

    pub fn uint64(v: u64) -> Value {
        Value::Literal { ty: TensorType::scalar(DType::Uint64), data: Data::Int(vec![v as i64]) }
    }

    pub fn bool(v: bool) -> Value {
        Value::Literal { ty: TensorType::scalar(DType::Bool), data: Data::Bool(vec![v]) }
    }

    pub fn string(s: impl Into<String>) -> Value {
        Value::Literal { ty: TensorType::scalar(DType::String), data: Data::Str(vec![s.into()]) }
    }

    /// A rank-1 int32 tensor, e.g. a shape or a permutation.
    pub fn int32s(v: &[i64]) -> Value {
        Value::Literal { ty: TensorType::new(DType::Int32, [v.len()]), data: Data::Int(v.to_vec()) }
    }

    /// A float tensor of the given type; `data` is row-major.
    pub fn floats(ty: TensorType, data: Vec<f64>) -> Value {
        Value::Literal { ty, data: Data::Float(data) }
    }

    /// The integers of an int literal (any rank), if this is one.
    pub fn as_ints(&self) -> Option<&[i64]> {
        match self {
            Value::Literal { data: Data::Int(v), .. } => Some(v),
            _ => None,
        }
    }

    /// The single integer of a scalar (or one-element) int literal.
    pub fn as_int(&self) -> Option<i64> {
        self.as_ints().filter(|v| v.len() == 1).map(|v| v[0])
    }

    pub fn as_floats(&self) -> Option<&[f64]> {
        match self {
            Value::Literal { data: Data::Float(v), .. } => Some(v),
            _ => None,
        }
    }

    /// The single number of a scalar literal, float or int.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Literal { data: Data::Float(v), .. } if v.len() == 1 => Some(v[0]),
            Value::Literal { data: Data::Int(v), .. } if v.len() == 1 => Some(v[0] as f64),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Literal { data: Data::Bool(v), .. } if v.len() == 1 => Some(v[0]),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Literal { data: Data::Str(v), .. } if v.len() == 1 => Some(&v[0]),
            _ => None,
        }
    }
}

/// An op argument: a named value, an inline constant, or a tuple (`values = (a, b)`).
#[derive(Clone, Debug, PartialEq)]
pub enum Arg {
    Var(String),
    Value(Value),
    List(Vec<Arg>),
}

impl From<&Var> for Arg {
    fn from(v: &Var) -> Arg {
        Arg::Var(v.name.clone())
    }
}

impl From<Value> for Arg {
    fn from(v: Value) -> Arg {
        Arg::Value(v)
    }
}

/// A named, typed value: a function input or an op result.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Var {
    pub name: String,
    pub ty: TensorType,
}

impl Var {
    pub fn new(name: impl Into<String>, ty: TensorType) -> Var {
        Var { name: name.into(), ty }
    }
}

/// A position in MIL text (1-based). Line 0 means "not from text" (built in code).
///
/// Spans say where, not what: two spans always compare equal, so a program parsed from
/// text equals the same program built in code or printed and parsed again.
#[derive(Clone, Copy, Debug, Default, Eq)]
pub struct Span {
    pub line: u32,
    pub col: u32,
}

impl Span {
    pub fn new(line: u32, col: u32) -> Span {
        Span { line, col }
    }
}

impl PartialEq for Span {
    fn eq(&self, _other: &Span) -> bool {
        true
    }
}

/// One op: `TYPE out = op(arg = value, …)[name = string("name"), attr = value];`
#[derive(Clone, Debug, PartialEq)]
pub struct Operation {
    /// The op type: `mul`, `matmul`, `const`, ….
    pub op: String,
    /// The `name = string(…)` attribute; the first output's name when text omits it.
    pub name: String,
    pub outputs: Vec<Var>,
    /// Arguments in the order written (the printer keeps it).
    pub args: Vec<(String, Arg)>,
    /// Attributes other than `name`, in order; `const` keeps its value in `val`.
    pub attrs: Vec<(String, Value)>,
    pub span: Span,
}

impl Operation {
    pub fn arg(&self, name: &str) -> Option<&Arg> {
        self.args.iter().find(|(n, _)| n == name).map(|(_, a)| a)
    }

    pub fn attr(&self, name: &str) -> Option<&Value> {
        self.attrs.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    /// The value of a `const` op.
    pub fn const_value(&self) -> Option<&Value> {
        if self.op == "const" {
            self.attr("val")
        } else {
            None
        }
    }
}

/// `func NAME<OPSET>(inputs) { ops } -> (outputs);`
#[derive(Clone, Debug, PartialEq)]
pub struct Function {
    pub name: String,
    /// `ios18`, `ios16`, …; follows the program's dialect when printed in another one.
    pub opset: String,
    pub inputs: Vec<Var>,
    pub ops: Vec<Operation>,
    pub outputs: Vec<String>,
    pub span: Span,
}

impl Function {
    /// The type of a named value (an input or an op result), if defined.
    pub fn type_of(&self, name: &str) -> Option<&TensorType> {
        self.inputs
            .iter()
            .chain(self.ops.iter().flat_map(|op| op.outputs.iter()))
            .find(|v| v.name == name)
            .map(|v| &v.ty)
    }

    /// The output values with their types, in declared order.
    pub fn output_vars(&self) -> Vec<Var> {
        self.outputs.iter().filter_map(|n| self.type_of(n).map(|t| Var::new(n.clone(), t.clone()))).collect()
    }
}

/// The two MIL text dialects the ANE compiler takes (DESIGN.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dialect {
    /// M1/M2: `program(1.0)`, verbose scalars `tensor<int32, []>(1)`, no `cast`.
    Ios16,
    /// M3 and later: `program(1.3)`, short scalars `int32(1)`.
    Ios18,
}

impl Dialect {
    pub fn version(self) -> &'static str {
        match self {
            Dialect::Ios16 => "1.0",
            Dialect::Ios18 => "1.3",
        }
    }

    pub fn opset(self) -> &'static str {
        match self {
            Dialect::Ios16 => "ios16",
            Dialect::Ios18 => "ios18",
        }
    }

    pub fn from_name(name: &str) -> Option<Dialect> {
        match name {
            "ios16" => Some(Dialect::Ios16),
            "ios18" => Some(Dialect::Ios18),
            _ => None,
        }
    }

    /// The buildInfo the seed experiments shipped with each dialect. The compiler is
    /// reported to want the coremlc/coremltools keys present.
    pub fn default_build_info(self) -> Vec<(String, String)> {
        let pairs: &[(&str, &str)] = match self {
            Dialect::Ios18 => &[
                ("coremlc-component-MIL", "3510.2.1"),
                ("coremlc-version", "3505.4.1"),
                ("coremltools-component-milinternal", ""),
                ("coremltools-version", "9.0"),
            ],
            Dialect::Ios16 => &[
                ("coremlc-component-MIL", "3304.5.2"),
                ("coremlc-version", "3304.6.2"),
                ("coremltools-component-milinternal", ""),
                ("coremltools-version", "7.1"),
            ],
        };
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }
}

impl fmt::Display for Dialect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.opset())
    }
}

/// A whole MIL program.
#[derive(Clone, Debug, PartialEq)]
pub struct Program {
    pub dialect: Dialect,
    pub build_info: Vec<(String, String)>,
    pub functions: Vec<Function>,
}

impl Program {
    /// A one-function program with the dialect's default buildInfo.
    pub fn new(dialect: Dialect, main: Function) -> Program {
        Program { dialect, build_info: dialect.default_build_info(), functions: vec![main] }
    }

    /// The entry point: the function named `main`, else the first.
    pub fn main(&self) -> Option<&Function> {
        self.functions.iter().find(|f| f.name == "main").or(self.functions.first())
    }

    /// The same program for another dialect: version, opsets and buildInfo change,
    /// ops and values do not.
    pub fn to_dialect(&self, dialect: Dialect) -> Program {
        let mut p = self.clone();
        if p.dialect != dialect {
            p.dialect = dialect;
            p.build_info = dialect.default_build_info();
            for f in &mut p.functions {
                f.opset = dialect.opset().to_string();
            }
        }
        p
    }

    /// Every distinct BLOBFILE path the program refers to, in first-use order.
    pub fn blob_paths(&self) -> Vec<String> {
        let mut paths: Vec<String> = Vec::new();
        for f in &self.functions {
            for op in &f.ops {
                let values = op.attrs.iter().map(|(_, v)| v).chain(op.args.iter().flat_map(|(_, a)| arg_values(a)));
                for v in values {
                    if let Value::Blob { path, .. } = v {
                        if !paths.contains(path) {
                            paths.push(path.clone());
                        }
                    }
                }
            }
        }
        paths
    }
}

fn arg_values(a: &Arg) -> Vec<&Value> {
    match a {
        Arg::Var(_) => Vec::new(),
        Arg::Value(v) => vec![v],
        Arg::List(items) => items.iter().flat_map(arg_values).collect(),
    }
}
