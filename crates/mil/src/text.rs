//! MIL text: printer and parser for both dialects. (Being written.)
use crate::ir::Program;
use crate::Result;

pub fn print(_p: &Program) -> String {
    unimplemented!("printer")
}

pub fn parse(_text: &str) -> Result<Program> {
    unimplemented!("parser")
}
