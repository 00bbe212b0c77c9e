//! # mil — the language the Apple Neural Engine compiler reads
//!
//! MIL ("Model Intermediate Language") is Core ML's program text. The private
//! AppleNeuralEngine framework compiles MIL text plus fp16 weight files into a kernel.
//! This crate is everything anetrain knows about the language, and nothing about devices:
//!
//! - [`ir`]: the typed IR (program → function → op, named typed values);
//! - [`builder`]: how kernel generators write programs, with types inferred as they go;
//! - [`ops`]: each op's arguments and type/shape inference, following coremltools;
//! - [`text`]: printer and parser for both dialects (ios18 for M3+, ios16 for M1/M2);
//! - [`validate`](validate()): a parsed program checked end to end, errors with line:column;
//! - [`blob`]: the BLOBFILE weight format, and model directories (`model.mil` + `weights/`);
//! - [`lint`]: the ANE's publicly reported limits, each with a severity and a reason.
//!
//! ```
//! use mil::{builder::FunctionBuilder, DType, Dialect, Program, TensorType};
//!
//! let mut b = FunctionBuilder::new("main", Dialect::Ios18);
//! let x = b.input("x", TensorType::surface(DType::Fp16, 64, 32));
//! let two = b.scalar(DType::Fp16, 2.0);
//! let y = b.mul("y", &x, &two);
//! b.output(&y);
//! let program = Program::new(Dialect::Ios18, b.finish().unwrap());
//! let text = mil::text::print(&program);
//! assert!(text.contains("tensor<fp16, [1, 64, 1, 32]> y = mul(x = x, y = "));
//! assert_eq!(mil::text::parse(&text).unwrap(), program);
//! ```

pub mod blob;
pub mod builder;
pub mod error;
pub mod ir;
pub mod lint;
pub mod ops;
pub mod text;

pub use error::{Error, ErrorKind, Result};
pub use ir::{Arg, DType, Data, Dialect, Function, Operation, Program, Span, TensorType, Value, Var};
pub use ops::validate;
