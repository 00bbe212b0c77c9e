//! Program → MIL text, in the program's dialect.
//!
//! The layout is the one coremltools writes and the seed experiments fed the ANE
//! compiler: four spaces per level, one op per line, arguments in the order kept in the
//! IR, `name` first among the attributes.

use std::fmt::Write;

use super::parser::MAX_DEPTH;
use crate::ir::{Arg, DType, Data, Dialect, Function, Operation, Program, TensorType, Value};

/// Indentation of a function header and of an op line.
const FUNC_INDENT: &str = "    ";
const OP_INDENT: &str = "        ";

pub(super) fn program(p: &Program) -> String {
    let d = p.dialect;
    let mut out = String::new();
    // `write!` into a String cannot fail; the results are ignored for that reason.
    let _ = writeln!(out, "program({})", d.version());
    let st = scalar_type_name(DType::String, d);
    let _ = write!(out, "[buildInfo = dict<{st}, {st}>({{");
    for (i, (k, v)) in p.build_info.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        let _ = write!(out, "{{{}, {}}}", quote(k), quote(v));
    }
    out.push_str("})]\n{\n");
    for f in &p.functions {
        function(&mut out, f, d);
    }
    out.push_str("}\n");
    out
}

fn function(out: &mut String, f: &Function, d: Dialect) {
    let _ = write!(out, "{FUNC_INDENT}func {}<{}>(", f.name, f.opset);
    for (i, v) in f.inputs.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        let _ = write!(out, "{} {}", type_text(&v.ty, d), v.name);
    }
    out.push_str(") {\n");
    for op in &f.ops {
        operation(out, op, d);
    }
    let _ = writeln!(out, "{FUNC_INDENT}}} -> ({});", f.outputs.join(", "));
}

fn operation(out: &mut String, op: &Operation, d: Dialect) {
    out.push_str(OP_INDENT);
    for (i, v) in op.outputs.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        let _ = write!(out, "{} {}", type_text(&v.ty, d), v.name);
    }
    let _ = write!(out, " = {}(", op.op);
    for (i, (name, arg)) in op.args.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        let _ = write!(out, "{name} = ");
        arg_text(out, arg, d);
    }
    out.push_str(")[name = ");
    value(out, &Value::string(op.name.clone()), d);
    for (name, v) in &op.attrs {
        let _ = write!(out, ", {name} = ");
        value(out, v, d);
    }
    out.push_str("];\n");
}

fn arg_text(out: &mut String, arg: &Arg, d: Dialect) {
    match arg {
        Arg::Var(name) => out.push_str(name),
        Arg::Value(v) => value(out, v, d),
        Arg::List(items) => {
            out.push('(');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                arg_text(out, item, d);
            }
            out.push(')');
        }
    }
}

/// `fp16` (ios18) or `tensor<fp16, []>` (ios16) for a scalar; `tensor<…>` otherwise.
fn type_text(ty: &TensorType, d: Dialect) -> String {
    if ty.is_scalar() {
        scalar_type_name(ty.dtype, d)
    } else {
        ty.to_string()
    }
}

fn scalar_type_name(dtype: DType, d: Dialect) -> String {
    match d {
        Dialect::Ios18 => dtype.mil_name().to_string(),
        Dialect::Ios16 => TensorType::scalar(dtype).to_string(),
    }
}

/// A typed literal: `fp16(2)`, `tensor<int32, [4]>([0, 0, 0, 0])`, or a BLOBFILE.
fn value(out: &mut String, v: &Value, d: Dialect) {
    match v {
        Value::Literal { ty, data } => {
            out.push_str(&type_text(ty, d));
            out.push('(');
            if ty.is_scalar() && data.len() == 1 {
                element(out, data, 0, ty.dtype);
            } else if (2..=MAX_DEPTH).contains(&ty.rank())
                && checked_numel(&ty.shape) == Some(data.len())
                && !data.is_empty()
            {
                nested(out, data, &ty.shape, &mut 0, ty.dtype);
            } else {
                // Rank 1, an empty literal (`[]`, however many zero-sized rows its shape
                // has), one of a rank deeper than the parser nests, or an ill-formed one
                // (whose count the parser will report).
                flat(out, data, ty.dtype);
            }
            out.push(')');
        }
        Value::Blob { ty, path, offset } => {
            // The long type form even for scalars: it is what coremltools writes.
            let _ = write!(out, "{ty}(BLOBFILE(path = ");
            value(out, &Value::string(path.clone()), d);
            out.push_str(", offset = ");
            value(out, &Value::uint64(*offset), d);
            out.push_str("))");
        }
    }
}

/// The element count of a shape, `None` if it overflows (a type built in code can
/// hold any shape; the printer must not panic on it).
fn checked_numel(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d))
}

fn flat(out: &mut String, data: &Data, dtype: DType) {
    out.push('[');
    for i in 0..data.len() {
        if i > 0 {
            out.push_str(", ");
        }
        element(out, data, i, dtype);
    }
    out.push(']');
}

/// Row-major data as nested lists, `[[1, 2], [3, 4]]` for a `[2, 2]` literal; `at`
/// walks the data. The caller has checked that the data fills the shape.
fn nested(out: &mut String, data: &Data, shape: &[usize], at: &mut usize, dtype: DType) {
    out.push('[');
    for i in 0..shape[0] {
        if i > 0 {
            out.push_str(", ");
        }
        if shape.len() == 1 {
            element(out, data, *at, dtype);
            *at += 1;
        } else {
            nested(out, data, &shape[1..], at, dtype);
        }
    }
    out.push(']');
}

fn element(out: &mut String, data: &Data, i: usize, dtype: DType) {
    match data {
        Data::Float(v) => out.push_str(&float_text(v[i])),
        // uint64 values are kept as the same 64 bits in an i64.
        Data::Int(v) if dtype == DType::Uint64 => {
            let _ = write!(out, "{}", v[i] as u64);
        }
        Data::Int(v) => {
            let _ = write!(out, "{}", v[i]);
        }
        Data::Bool(v) => out.push_str(if v[i] { "true" } else { "false" }),
        Data::Str(v) => out.push_str(&quote(&v[i])),
    }
}

/// A float that parses back to the same f64: Rust's shortest round-trip digits, plain
/// (`2`, `0.5`) in the usual range and with an exponent (`1e-7`, `6.5e300`) outside it,
/// where plain digits would run to hundreds of characters.
pub(super) fn float_text(v: f64) -> String {
    if v.is_nan() {
        "nan".to_string()
    } else if v.is_infinite() {
        if v > 0.0 { "inf" } else { "-inf" }.to_string()
    } else if v == 0.0 || (1e-5..1e16).contains(&v.abs()) {
        format!("{v}")
    } else {
        format!("{v:e}")
    }
}

/// A string literal's text: `"…"` with `"`, `\` and line breaks escaped.
pub(super) fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_round_trip_and_stay_short() {
        assert_eq!(float_text(2.0), "2");
        assert_eq!(float_text(0.5), "0.5");
        assert_eq!(float_text(-0.0), "-0");
        assert_eq!(float_text(1e-7), "1e-7");
        assert_eq!(float_text(f64::NEG_INFINITY), "-inf");
        for v in [1e300, 5e-324, f64::MAX, 0.1 + 0.2, 65504.0, 6.1e-5, 1e16, 9.999e15] {
            assert_eq!(float_text(v).parse::<f64>().unwrap().to_bits(), v.to_bits(), "{v}");
        }
    }

    #[test]
    fn quotes_escape() {
        assert_eq!(quote("a\"b\\c\n"), "\"a\\\"b\\\\c\\n\"");
    }
}
