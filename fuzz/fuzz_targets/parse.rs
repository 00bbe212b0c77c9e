//! Arbitrary bytes, read as text, through the parser and the validator: neither may
//! panic, and whatever parses must print and parse back to the same program.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mil::{Program, Span};

/// The program's Debug form with spans cleared: equal strings mean equal programs, with
/// NaN equal to NaN and -0.0 unequal to 0.0 (which `==` on f64 gets the other way round).
fn strict(p: &Program) -> String {
    let mut p = p.clone();
    for f in &mut p.functions {
        f.span = Span::default();
        for op in &mut f.ops {
            op.span = Span::default();
        }
    }
    format!("{p:?}")
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let Ok(program) = mil::text::parse(&text) else { return };
    let _ = mil::validate(&program);
    let printed = mil::text::print(&program);
    let again = match mil::text::parse(&printed) {
        Ok(p) => p,
        Err(e) => panic!("printed program does not parse: {e}\n{printed}"),
    };
    assert_eq!(strict(&again), strict(&program), "print/parse changed the program:\n{printed}");
    assert_eq!(mil::text::print(&again), printed);
});
