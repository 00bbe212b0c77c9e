//! MIL text: the printer and the parser, for both dialects.
//!
//! The ANE compiler takes a program as MIL text. Two dialects matter (DESIGN.md, "MIL
//! text: the two dialects"): **ios18** (M3 and later: `program(1.3)`, short scalar forms
//! such as `fp16(0.5)`) and **ios16** (M1/M2: `program(1.0)`, verbose scalars such as
//! `tensor<fp16, []>(0.5)`). [`print()`] writes a program in its own dialect, byte for byte
//! the layout coremltools writes; [`parse`] reads either dialect (and either scalar form
//! in either), so that `parse(&print(&p)) == p`.
//!
//! [`parse`] checks grammar and literals; [`parse_and_validate`] also runs
//! [`crate::validate`], which checks names, ops and types. Errors carry the line:column
//! of the fault and, from validation, the op's name. No input makes either panic (a
//! fuzz target in `fuzz/` keeps that true).
//!
//! ```
//! let text = r#"program(1.3)
//! [buildInfo = dict<string, string>({{"coremlc-version", "3505.4.1"}})]
//! {
//!     func main<ios18>(tensor<fp16, [1, 64, 1, 32]> x) {
//!         fp16 two = const()[name = string("two"), val = fp16(2)];
//!         tensor<fp16, [1, 64, 1, 32]> y = mul(x = x, y = two)[name = string("y")];
//!     } -> (y);
//! }
//! "#;
//! let program = mil::text::parse_and_validate(text).unwrap();
//! assert_eq!(program.main().unwrap().ops[1].op, "mul");
//! assert_eq!(mil::text::print(&program), text);
//! ```

mod lexer;
mod parser;
mod printer;

use crate::ir::Program;
use crate::Result;

/// The program as MIL text in its dialect (`p.dialect`); print `p.to_dialect(d)` for
/// another one.
pub fn print(p: &Program) -> String {
    printer::program(p)
}

/// Reads MIL text in either dialect (told apart by `program(1.3)` / `program(1.0)`).
/// Checks grammar and literals only; see [`parse_and_validate`].
///
/// Errors are [`Syntax`](crate::ErrorKind::Syntax) (including truncated input) or
/// [`BadLiteral`](crate::ErrorKind::BadLiteral), always with a line:column.
pub fn parse(text: &str) -> Result<Program> {
    parser::program(text)
}

/// [`parse`], then [`crate::validate`]: names defined once and before use, every op
/// known and well-argued, declared types equal to inferred ones.
pub fn parse_and_validate(text: &str) -> Result<Program> {
    let program = parse(text)?;
    crate::validate(&program)?;
    Ok(program)
}
