//! The ANE lint: everything publicly reported about what the Neural Engine's compiler
//! rejects or silently gets wrong, checked on a [`Program`] before it reaches a Mac.
//!
//! Each limit is a [`Rule`] with a severity and a one-line reason, listed in [`RULES`]
//! (docs/ANE.md mirrors that table, with who reported what):
//!
//! - [`Severity::Error`]: the ANE rejects the program, or runs it and silently computes
//!   something else. Devices refuse to compile these.
//! - [`Severity::Warning`]: reported by some and disputed by others, or worked around by
//!   anetrain's runtime. Worth knowing; not a reason to refuse.
//!
//! The lint never fails: it reads whatever it is given (even a program that does not
//! validate, or uses ops this crate does not know) and reports what it can see.
//!
//! ```
//! use mil::{builder::FunctionBuilder, lint, DType, Dialect, Program, TensorType};
//!
//! // An M1/M2 (ios16) program that casts: the chip's compiler rejects `cast`.
//! let mut b = FunctionBuilder::new("main", Dialect::Ios16);
//! let x = b.input("x", TensorType::surface(DType::Fp16, 256, 128));
//! let y = b.cast("y", &x, DType::Fp32);
//! b.output(&y);
//! let program = Program::new(Dialect::Ios16, b.finish().unwrap());
//!
//! let findings = lint::lint(&program);
//! assert!(findings.iter().any(|f| f.rule == "cast-in-ios16" && f.op.as_deref() == Some("y")));
//! assert!(lint::has_errors(&findings));
//! ```

use std::collections::HashMap;
use std::fmt;

use crate::ir::{Arg, DType, Dialect, Function, Operation, Program, Span, TensorType, Value, Var};

/// The smallest IOSurface allocation reported to evaluate: 48 KiB. Below it the ANE
/// reportedly fails with status 0x1d at eval. Source: the Orion paper's constraint #4
/// ("~49 KB", 49152 bytes in its repository's validator); disputed by other reports.
pub const MIN_SURFACE_BYTES: usize = 48 * 1024;

/// Spatial width (the last axis of a `[1, C, 1, S]` surface) is reported to need a
/// multiple of 16 ("pad seq dim ≥ 16", Orion paper #4); some report 32.
pub const SPATIAL_MULTIPLE: usize = 16;

/// A matmul's inner dimension reportedly must be a multiple of 32, else the result is
/// silently zero. Reported by the seed experiments; not independently confirmed.
pub const MATMUL_INNER_MULTIPLE: usize = 32;

/// No tensor dimension may exceed this. Reported by the seed experiments; not
/// independently confirmed.
pub const MAX_DIMENSION: usize = 65536;

/// BLOBFILE-backed constants per program before compilation reportedly fails
/// (`InvalidMILProgram` at 17). Source: the Orion repository's constraint list (#15),
/// contributed by a user on M4 Max and reproduced on M4.
pub const MAX_BLOB_TENSORS: usize = 16;

/// Every tensor of every program the seed experiments ran on the ANE is rank 4
/// (`[1, C, 1, S]`, `[1, 1, IC, T]`, `[1, H, T, D]`: maderix/ANE, `training/`): the
/// rank anetrain's kernels keep to.
pub const ANE_RANK: usize = 4;

/// Unread positions at the end of an input surface that are not padding worth a
/// finding: `device::padded_width` rounds a surface's width up to the next odd multiple
/// of 32 (the spatial multiple, see [`SPATIAL_MULTIPLE`]), which adds fewer than 64.
pub const SPATIAL_PAD_ALLOWANCE: usize = 64;

/// The `offset` of the first (and, in a one-tensor file, only) chunk in a BLOBFILE.
const FIRST_CHUNK_OFFSET: u64 = 64;

/// How bad a finding is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Severity {
    /// Reported by some, disputed by others, or handled by anetrain's runtime.
    Warning,
    /// The ANE rejects this, or silently computes something else.
    Error,
}

impl Severity {
    pub fn name(self) -> &'static str {
        match self {
            Severity::Warning => "warning",
            Severity::Error => "error",
        }
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One known limit of the ANE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rule {
    /// A short kebab-case name, stable: tests, docs and users refer to it.
    pub name: &'static str,
    pub severity: Severity,
    /// One line: what goes wrong on the ANE.
    pub reason: &'static str,
}

/// Every rule the lint knows. docs/ANE.md mirrors this table with sources.
pub const RULES: &[Rule] = &[
    Rule {
        name: "cast-in-ios16",
        severity: Severity::Error,
        reason: "M1/M2 (the ios16 dialect) reject `cast`: those chips need fp16 I/O and no casts",
    },
    Rule {
        name: "fp32-io-in-ios16",
        severity: Severity::Error,
        reason: "ios16 (M1/M2) programs must take and return fp16: fp32 I/O needs a `cast`, which those chips reject",
    },
    Rule {
        name: "io-dtype",
        severity: Severity::Error,
        reason: "inputs and outputs are IOSurfaces holding fp16 or fp32; no other dtype can be bound",
    },
    Rule {
        name: "sdpa-attn-mask",
        severity: Severity::Error,
        reason: "the ANE ignores `attn_mask` in `scaled_dot_product_attention`: write attention out explicitly",
    },
    Rule {
        name: "sdpa",
        severity: Severity::Warning,
        reason:
            "`scaled_dot_product_attention` runs fused with reported mask bugs; explicit matmul/softmax matches the CPU",
    },
    Rule {
        name: "dimension-too-large",
        severity: Severity::Error,
        reason: "dimensions above 65536 are reported rejected by the ANE compiler",
    },
    Rule {
        name: "concat",
        severity: Severity::Warning,
        reason: "`concat` other than on the channel or spatial axis of rank-4 values is reported rejected (the seed \
                 concatenates outputs on the channel axis)",
    },
    Rule {
        name: "several-inputs",
        severity: Severity::Warning,
        reason: "multi-input ANE requests are reported to fail with 0x1d (seed README): pack every input into one \
                 surface along the spatial axis",
    },
    Rule {
        name: "several-outputs",
        severity: Severity::Warning,
        reason: "the seed's working programs return one surface (outputs concatenated on the channel axis); several \
                 outputs bind in a disputed order",
    },
    Rule {
        name: "rank",
        severity: Severity::Warning,
        reason: "every tensor of every program the seed ran on the ANE is rank 4 ([1,C,1,S], [1,1,IC,T], [1,H,T,D])",
    },
    Rule {
        name: "padding",
        severity: Severity::Warning,
        reason: "an input surface holds positions the program never reads: the seed allocates exact sizes",
    },
    Rule {
        name: "unequal-surface-sizes",
        severity: Severity::Warning,
        reason: "several inputs (or outputs) reportedly need equal allocation sizes: anetrain pads them to the largest",
    },
    Rule {
        name: "small-surface",
        severity: Severity::Warning,
        reason: "surfaces under ~48 KiB are reported to fail at eval (0x1d) when a program has several inputs or \
                 outputs (Orion); the seed's single-surface programs use exact sizes",
    },
    Rule {
        name: "spatial-width",
        severity: Severity::Warning,
        reason: "a surface's spatial width (last axis) is reported to need a multiple of 16",
    },
    Rule {
        name: "matmul-inner-dim",
        severity: Severity::Warning,
        reason: "a matmul inner dimension not a multiple of 32 is reported to give silent zeros (disputed)",
    },
    Rule {
        name: "sqrt-after-reduction",
        severity: Severity::Warning,
        reason: "`sqrt`/`rsqrt` fed by a reduction is reported rejected: use `pow(x, -0.5)` or `pow(x, 0.5)`",
    },
    Rule {
        name: "rsqrt",
        severity: Severity::Warning,
        reason: "`rsqrt` is reported rejected wherever it appears: use `pow(x, -0.5)`",
    },
    Rule {
        name: "gelu",
        severity: Severity::Warning,
        reason: "`gelu` is reported rejected by the ANE compiler (others ran it): use the tanh approximation",
    },
    Rule {
        name: "conv-bias",
        severity: Severity::Warning,
        reason: "`conv` with `bias` is reported rejected: add the bias with a separate `add`",
    },
    Rule {
        name: "too-many-blob-tensors",
        severity: Severity::Warning,
        reason: "more than 16 BLOBFILE constants in one program are reported to fail compilation",
    },
    Rule {
        name: "blob-several-chunks",
        severity: Severity::Warning,
        reason: "some chips reportedly reject weight files holding several chunks: prefer one file per tensor",
    },
];

/// The rule of this name. Panics on an unknown name: rule names are compile-time
/// constants, so that is a bug in this module.
pub fn rule(name: &str) -> &'static Rule {
    RULES.iter().find(|r| r.name == name).unwrap_or_else(|| panic!("lint rule `{name}` is not in RULES"))
}

/// Something the lint found.
#[derive(Clone, Debug, PartialEq)]
pub struct Finding {
    /// The [`Rule::name`].
    pub rule: &'static str,
    pub severity: Severity,
    /// The op at fault, by its `name`, when one is.
    pub op: Option<String>,
    /// Where in the MIL text (line 0 when the program was built in code).
    pub span: Span,
    pub message: String,
}

impl fmt::Display for Finding {
    /// `error[cast-in-ios16] 7:9: op `y`: …` (position and op only when known).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[{}]", self.severity, self.rule)?;
        if self.span.line > 0 {
            write!(f, " {}:{}", self.span.line, self.span.col)?;
        }
        f.write_str(": ")?;
        if let Some(op) = &self.op {
            write!(f, "op `{op}`: ")?;
        }
        f.write_str(&self.message)
    }
}

/// True if any finding is an error.
pub fn has_errors(findings: &[Finding]) -> bool {
    findings.iter().any(|f| f.severity == Severity::Error)
}

/// Checks a program against every rule in [`RULES`]. Findings come in program order,
/// function by function: signature findings first, then ops in order.
pub fn lint(p: &Program) -> Vec<Finding> {
    let mut out = Vec::new();
    for f in &p.functions {
        FunctionLint::new(p.dialect, f, &mut out).run();
    }
    let blobs = p
        .functions
        .iter()
        .flat_map(|f| &f.ops)
        .filter(|op| matches!(op.const_value(), Some(Value::Blob { .. })))
        .count();
    if blobs > MAX_BLOB_TENSORS {
        out.push(finding(
            "too-many-blob-tensors",
            None,
            Span::default(),
            format!("the program has {blobs} BLOBFILE constants; more than {MAX_BLOB_TENSORS} are reported to fail"),
        ));
    }
    out
}

fn finding(rule_name: &'static str, op: Option<&Operation>, span: Span, message: String) -> Finding {
    Finding { rule: rule_name, severity: rule(rule_name).severity, op: op.map(|o| o.name.clone()), span, message }
}

/// The lint of one function: its values by name, so args can be looked up.
struct FunctionLint<'a> {
    dialect: Dialect,
    f: &'a Function,
    /// Every op by the names of its outputs.
    producers: HashMap<&'a str, &'a Operation>,
    out: &'a mut Vec<Finding>,
}

impl<'a> FunctionLint<'a> {
    fn new(dialect: Dialect, f: &'a Function, out: &'a mut Vec<Finding>) -> FunctionLint<'a> {
        let mut producers = HashMap::new();
        for op in &f.ops {
            for v in &op.outputs {
                producers.insert(v.name.as_str(), op);
            }
        }
        FunctionLint { dialect, f, producers, out }
    }

    fn push(&mut self, rule_name: &'static str, op: Option<&Operation>, message: String) {
        let span = op.map_or(self.f.span, |o| o.span);
        self.out.push(finding(rule_name, op, span, message));
    }

    fn run(&mut self) {
        self.signature();
        for op in &self.f.ops {
            self.op(op);
        }
    }

    /// The function's inputs and outputs: the surfaces.
    fn signature(&mut self) {
        let inputs: Vec<Var> = self.f.inputs.clone();
        let outputs: Vec<Var> = self.f.output_vars();
        let several = inputs.len() > 1 || outputs.len() > 1;
        for (what, vars) in [("input", &inputs), ("output", &outputs)] {
            if vars.len() > 1 {
                let names: Vec<String> = vars.iter().map(|v| format!("`{}`", v.name)).collect();
                self.push(
                    if what == "input" { "several-inputs" } else { "several-outputs" },
                    None,
                    format!(
                        "{} {what}s ({}): the seed's working programs have one, with the rest packed into it",
                        vars.len(),
                        names.join(", ")
                    ),
                );
            }
            for v in vars {
                self.surface(what, v, several);
            }
            let sizes: Vec<usize> = vars.iter().map(|v| surface_bytes(&v.ty)).collect();
            if let (Some(min), Some(max)) = (sizes.iter().min(), sizes.iter().max()) {
                if min != max {
                    let list: Vec<String> =
                        vars.iter().zip(&sizes).map(|(v, n)| format!("`{}` {n} B", v.name)).collect();
                    self.push(
                        "unequal-surface-sizes",
                        None,
                        format!(
                            "{what}s have different sizes ({}); allocations are padded to {max} bytes and data \
                             must be packed from byte 0",
                            list.join(", ")
                        ),
                    );
                }
            }
        }
        for v in &inputs {
            self.dims(None, &v.name, &v.ty);
            self.unread_tail(v);
        }
    }

    /// `padding`: an input read only through slices that leave its last positions
    /// unread, beyond [`SPATIAL_PAD_ALLOWANCE`].
    fn unread_tail(&mut self, v: &Var) {
        let Some(&width) = v.ty.shape.last() else { return };
        // The input itself, or its cast (fp32 surfaces are cast to fp16 first).
        let mut names = vec![v.name.as_str()];
        for op in &self.f.ops {
            if op.op == "cast" && var_name_of(op.arg("x")) == Some(v.name.as_str()) {
                names.push(op.outputs[0].name.as_str());
            }
        }
        let mut end = 0usize;
        for op in &self.f.ops {
            let reads = op.args.iter().any(|(_, a)| match a {
                Arg::Var(n) => names.contains(&n.as_str()),
                Arg::List(items) => items.iter().any(|i| matches!(i, Arg::Var(n) if names.contains(&n.as_str()))),
                Arg::Value(_) => false,
            });
            if !reads || names.contains(&op.outputs[0].name.as_str()) {
                continue;
            }
            if op.op != "slice_by_size" {
                return; // read whole
            }
            let (Some(begin), Some(size)) = (self.const_ints(op.arg("begin")), self.const_ints(op.arg("size"))) else {
                return;
            };
            let (Some(&b), Some(&n)) = (begin.last(), size.last()) else { return };
            if n < 0 {
                return;
            }
            end = end.max((b + n) as usize);
        }
        if end > 0 && width >= end + SPATIAL_PAD_ALLOWANCE {
            self.push(
                "padding",
                None,
                format!(
                    "input `{}` ({}) is read up to position {end} of {width}: {} positions of padding",
                    v.name,
                    v.ty,
                    width - end
                ),
            );
        }
    }

    fn const_ints(&self, arg: Option<&Arg>) -> Option<Vec<i64>> {
        let value = match arg? {
            Arg::Var(name) => self.producers.get(name.as_str())?.const_value()?,
            Arg::Value(v) => v,
            Arg::List(_) => return None,
        };
        value.as_ints().map(|v| v.to_vec())
    }

    /// One input or output surface.
    fn surface(&mut self, what: &str, v: &Var, several: bool) {
        let name = &v.name;
        if !v.ty.dtype.is_float() {
            self.push("io-dtype", None, format!("{what} `{name}` is {}: surfaces hold fp16 or fp32", v.ty));
            return;
        }
        if self.dialect == Dialect::Ios16 && v.ty.dtype == DType::Fp32 {
            self.push(
                "fp32-io-in-ios16",
                None,
                format!("{what} `{name}` is {} in an ios16 program: M1/M2 need fp16 I/O", v.ty),
            );
        }
        if v.ty.rank() != ANE_RANK {
            self.push("rank", None, format!("{what} `{name}` is {}, rank {} (not {ANE_RANK})", v.ty, v.ty.rank()));
        }
        let bytes = surface_bytes(&v.ty);
        if several && bytes < MIN_SURFACE_BYTES {
            self.push(
                "small-surface",
                None,
                format!(
                    "{what} `{name}` ({}) is {bytes} bytes, under the reported {MIN_SURFACE_BYTES}-byte minimum",
                    v.ty
                ),
            );
        }
        if let Some(&width) = v.ty.shape.last() {
            if width % SPATIAL_MULTIPLE != 0 {
                self.push(
                    "spatial-width",
                    None,
                    format!(
                        "{what} `{name}` ({}) has spatial width {width}, not a multiple of {SPATIAL_MULTIPLE}",
                        v.ty
                    ),
                );
            }
        }
    }

    /// Every dimension of a type against [`MAX_DIMENSION`].
    fn dims(&mut self, op: Option<&Operation>, name: &str, ty: &TensorType) {
        if let Some(&big) = ty.shape.iter().find(|&&d| d > MAX_DIMENSION) {
            self.push(
                "dimension-too-large",
                op,
                format!("`{name}` ({ty}) has dimension {big}, above the reported limit of {MAX_DIMENSION}"),
            );
        }
    }

    fn op(&mut self, op: &Operation) {
        for v in &op.outputs {
            self.dims(Some(op), &v.name, &v.ty);
            // Scalars (rank 0) and the integer parameters of ops (shapes, axes) are not
            // tensors the ANE lays out.
            let parameter = op.op == "const" && !v.ty.dtype.is_float();
            if v.ty.rank() != 0 && v.ty.rank() != ANE_RANK && !parameter {
                self.push("rank", Some(op), format!("`{}` is {}, rank {} (not {ANE_RANK})", v.name, v.ty, v.ty.rank()));
            }
        }
        match op.op.as_str() {
            "const" => {
                if let Some(Value::Blob { path, offset, .. }) = op.const_value() {
                    if *offset != FIRST_CHUNK_OFFSET {
                        self.push(
                            "blob-several-chunks",
                            Some(op),
                            format!("`{path}` is read at offset {offset}: the file holds several chunks"),
                        );
                    }
                }
            }
            "cast" if self.dialect == Dialect::Ios16 => {
                self.push("cast-in-ios16", Some(op), "`cast` in an ios16 program: M1/M2 reject it".into());
            }
            "scaled_dot_product_attention" => {
                if op.arg("attn_mask").is_some() {
                    self.push(
                        "sdpa-attn-mask",
                        Some(op),
                        "`attn_mask` is ignored on the ANE: attention would see the future".into(),
                    );
                } else {
                    self.push(
                        "sdpa",
                        Some(op),
                        "fused attention: prefer matmul → scale → add mask → softmax → matmul".into(),
                    );
                }
            }
            "concat" => self.concat(op),
            "matmul" => self.matmul(op),
            "sqrt" | "rsqrt" => {
                if let Some(reduction) = self.reduction_behind(op.arg("x")) {
                    self.push(
                        "sqrt-after-reduction",
                        Some(op),
                        format!(
                            "`{}` of the reduction `{reduction}`: use pow(x, {})",
                            op.op,
                            if op.op == "rsqrt" { "-0.5" } else { "0.5" }
                        ),
                    );
                } else if op.op == "rsqrt" {
                    self.push("rsqrt", Some(op), "`rsqrt`: use pow(x, -0.5)".into());
                }
            }
            "gelu" => self.push("gelu", Some(op), "`gelu`: use 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))".into()),
            "conv" if op.arg("bias").is_some() => {
                self.push("conv-bias", Some(op), "`conv` with `bias`: add the bias separately".into());
            }
            _ => {}
        }
    }

    /// `concat` on the channel axis (1) or the spatial axis (3) of rank-4 values is how
    /// the seed returns several results in one surface; anything else is warned about.
    fn concat(&mut self, op: &Operation) {
        let rank4 = op.outputs.first().is_some_and(|v| v.ty.rank() == ANE_RANK);
        let axis = match op.arg("axis") {
            Some(Arg::Var(name)) => {
                self.producers.get(name.as_str()).and_then(|p| p.const_value()).and_then(|v| v.as_int())
            }
            Some(Arg::Value(v)) => v.as_int(),
            _ => None,
        };
        let on_surface_axis = matches!(axis, Some(1) | Some(3) | Some(-1) | Some(-3));
        if !(rank4 && on_surface_axis) {
            self.push(
                "concat",
                Some(op),
                "`concat` off the channel/spatial axis of rank-4 values is reported rejected by the ANE compiler"
                    .into(),
            );
        }
    }

    fn matmul(&mut self, op: &Operation) {
        let (Some(x), Some(y)) = (self.type_of(op.arg("x")), self.type_of(op.arg("y"))) else { return };
        if x.rank() < 2 || y.rank() < 2 {
            return;
        }
        let tx = self.const_bool(op.arg("transpose_x")).unwrap_or(false);
        let ty = self.const_bool(op.arg("transpose_y")).unwrap_or(false);
        // x: [.., M, K] (or [.., K, M] transposed); the inner dimension is K.
        let inner = if tx { x.shape[x.rank() - 2] } else { x.shape[x.rank() - 1] };
        let inner_y = if ty { y.shape[y.rank() - 1] } else { y.shape[y.rank() - 2] };
        if inner == inner_y && inner % MATMUL_INNER_MULTIPLE != 0 {
            self.push(
                "matmul-inner-dim",
                Some(op),
                format!("inner dimension {inner} is not a multiple of {MATMUL_INNER_MULTIPLE}"),
            );
        }
    }

    fn type_of(&self, arg: Option<&Arg>) -> Option<TensorType> {
        match arg? {
            Arg::Var(name) => self.f.type_of(name).cloned(),
            Arg::Value(v) => Some(v.ty().clone()),
            Arg::List(_) => None,
        }
    }

    fn const_bool(&self, arg: Option<&Arg>) -> Option<bool> {
        match arg? {
            Arg::Var(name) => self.producers.get(name.as_str())?.const_value()?.as_bool(),
            Arg::Value(v) => v.as_bool(),
            Arg::List(_) => None,
        }
    }

    /// The name of the reduction feeding `arg`, directly or through elementwise ops
    /// with a constant operand (`reduce_mean` → `add ε` → `rsqrt` is RMSNorm's shape).
    fn reduction_behind(&self, arg: Option<&Arg>) -> Option<String> {
        let mut name = match arg? {
            Arg::Var(n) => n.as_str(),
            _ => return None,
        };
        // A chain of scalar steps is short; the bound only guards against odd programs.
        for _ in 0..8 {
            let op = self.producers.get(name)?;
            if op.op.starts_with("reduce_") {
                return Some(op.name.clone());
            }
            if !matches!(op.op.as_str(), "add" | "sub" | "mul" | "real_div" | "maximum" | "minimum") {
                return None;
            }
            let (x, y) = (op.arg("x")?, op.arg("y")?);
            name = match (self.is_constant(x), self.is_constant(y)) {
                (false, true) => var_name(x)?,
                (true, false) => var_name(y)?,
                _ => return None,
            };
        }
        None
    }

    fn is_constant(&self, arg: &Arg) -> bool {
        match arg {
            Arg::Value(_) => true,
            Arg::Var(n) => self.producers.get(n.as_str()).is_some_and(|op| op.op == "const"),
            Arg::List(_) => false,
        }
    }
}

fn var_name_of(arg: Option<&Arg>) -> Option<&str> {
    var_name(arg?)
}

fn var_name(arg: &Arg) -> Option<&str> {
    match arg {
        Arg::Var(n) => Some(n),
        _ => None,
    }
}

/// Bytes a value of this type takes in a surface.
fn surface_bytes(ty: &TensorType) -> usize {
    ty.numel() * ty.dtype.size_bytes()
}
