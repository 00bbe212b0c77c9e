//! The ANE device's plain-Rust parts, tested on any OS: opening where there is no ANE,
//! the Foundation values it builds, the compile budget, the NSError mapping, and the
//! program it detects its dialect with.

use std::sync::Arc;

use device::ane::budget::{CompileCounter, DEFAULT_COMPILE_LIMIT};
use device::ane::errors::{framework_error, Step};
use device::ane::ns::{self, NsValue};
use device::ane::{platform_unavailable_reason, runtime::Runtime, AneDevice, DialectTest};
use device::{Device, ErrorKind, Surface, Weights};
use mil::{DType, Dialect};

#[test]
fn opening_without_an_ane_says_why() {
    if cfg!(all(target_os = "macos", target_arch = "aarch64")) {
        return; // A Mac with an ANE may open it; nothing to assert about absence there.
    }
    let e = AneDevice::open().unwrap_err();
    assert_eq!(e.kind, ErrorKind::Unavailable);
    let reason = platform_unavailable_reason().unwrap();
    assert_eq!(e.message, format!("ANE not available on this system: {reason}"));
    if cfg!(target_os = "linux") {
        assert_eq!(
            e.message,
            "ANE not available on this system: AppleNeuralEngine.framework is only on macOS (this is linux)"
        );
    }
}

#[test]
fn a_missing_framework_is_named() {
    let e = Runtime::load(&["/nonexistent/libobjc.dylib", "/b", "/c", "/d", "/e"]).unwrap_err();
    assert!(e.starts_with("cannot load /nonexistent/libobjc.dylib: "), "{e}");
}

#[test]
fn weights_become_the_dictionary_the_descriptor_takes() {
    let mut w = Weights::new();
    w.add_tensor("wq", &[2, 2, 1, 1], &[1.0, 2.0, 3.0, 4.0]);
    w.add_tensor("wk", &[1, 2, 1, 1], &[5.0, 6.0]);
    let dict = ns::weights_dictionary(&w);
    let NsValue::Dict(entries) = &dict else { panic!("not a dictionary: {dict:?}") };
    let keys: Vec<&str> = entries.iter().map(|(k, _)| k.as_ref()).collect();
    assert_eq!(keys, ["@model_path/weights/wk.bin", "@model_path/weights/wq.bin"]);
    let wq = dict.get("@model_path/weights/wq.bin").unwrap();
    assert_eq!(wq.get("offset"), Some(&NsValue::Int(0)));
    // The data is the whole file: 128 header bytes + 4 fp16 values.
    let file = w.file("@model_path/weights/wq.bin").unwrap();
    assert_eq!(file.len(), 128 + 8);
    assert_eq!(wq.get("data"), Some(&NsValue::Data(file)));
}

#[test]
fn weight_free_programs_get_an_empty_dictionary_not_nil() {
    assert_eq!(ns::weights_dictionary(&Weights::new()), NsValue::Dict(Vec::new()));
}

#[test]
fn mil_text_is_utf8_data() {
    let text = "program(1.3)\n// µ";
    assert_eq!(ns::mil_text(text), NsValue::Data(text.as_bytes()));
}

#[test]
fn surfaces_are_flat_byte_buffers() {
    let p = ns::surface_properties(49152);
    let get = |k: &str| p.get(k).and_then(NsValue::as_int);
    assert_eq!(get("IOSurfaceWidth"), Some(49152));
    assert_eq!(get("IOSurfaceHeight"), Some(1));
    assert_eq!(get("IOSurfaceBytesPerElement"), Some(1));
    assert_eq!(get("IOSurfaceBytesPerRow"), Some(49152));
    assert_eq!(get("IOSurfaceAllocSize"), Some(49152));
    assert_eq!(get("IOSurfacePixelFormat"), Some(0));
    assert_eq!(ns::indices(3), NsValue::Array(vec![NsValue::Int(0), NsValue::Int(1), NsValue::Int(2)]));
    assert_eq!(ns::no_options(), NsValue::Dict(Vec::new()));
}

#[test]
fn the_budget_refuses_the_compile_past_it() {
    let c = CompileCounter::new();
    for i in 1..=3 {
        assert_eq!(c.reserve(3).unwrap(), i);
    }
    assert_eq!((c.done(), c.left(3)), (3, 0));
    let e = c.reserve(3).unwrap_err();
    assert_eq!(e.kind, ErrorKind::CompileBudget);
    assert!(e.message.contains("compiled 3 programs and the budget is 3"), "{}", e.message);
    assert!(e.message.contains("checkpoint and restart"), "{}", e.message);
    // Refused compiles are not counted.
    assert_eq!(c.done(), 3);
    assert_eq!(DEFAULT_COMPILE_LIMIT, 119);
}

#[test]
fn the_budget_holds_under_concurrent_compiles() {
    let c = Arc::new(CompileCounter::new());
    let granted: usize = std::thread::scope(|s| {
        let handles: Vec<_> =
            (0..8).map(|_| s.spawn(|| (0..50).filter(|_| c.reserve(DEFAULT_COMPILE_LIMIT).is_ok()).count())).collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    });
    assert_eq!(granted, DEFAULT_COMPILE_LIMIT);
    assert_eq!(c.done(), DEFAULT_COMPILE_LIMIT);
}

#[test]
fn nserror_descriptions_reach_the_rust_error() {
    let desc = "Error Domain=com.apple.appleneuralengine.compiler Code=1 \"_ANECompiler : ANECCompile() FAILED\"";
    let e = framework_error(Step::Compile, "attn_fwd", Some(desc), &[]);
    assert_eq!(e.kind, ErrorKind::Compile);
    assert!(e.message.starts_with(&format!("ANE: compiling `attn_fwd` failed: {desc}")), "{}", e.message);
    assert!(e.message.contains("hint: the ANE compiler rejects some valid MIL"), "{}", e.message);

    let e = framework_error(Step::Eval, "ffn", Some("ANEProgramProcessRequestDirect() Failed with status=0x1d"), &[]);
    assert_eq!(e.kind, ErrorKind::Eval);
    assert!(e.message.contains("hint: status 0x1d is reported for surfaces"), "{}", e.message);

    let e = framework_error(Step::Load, "ffn", None, &[]);
    assert_eq!(e.message, "ANE: loading `ffn` failed: the framework gave no error description");
    let e = framework_error(Step::Descriptor, "ffn", Some("   "), &[]);
    assert_eq!(e.message, "ANE: describing `ffn` failed: the framework gave no error description");
}

#[test]
fn compile_failures_list_the_lint_findings() {
    let mut b = mil::builder::FunctionBuilder::new("main", Dialect::Ios18);
    let x = b.input("x", mil::TensorType::surface(DType::Fp16, 512, 64));
    // Along the height axis: the concat the lint still warns about (on channels or
    // positions, the packed kernels' own, it does not).
    let y = b.concat("y", &[&x, &x], 2);
    b.output(&y);
    let findings = mil::lint::lint(&mil::Program::new(Dialect::Ios18, b.finish().unwrap()));
    let e = framework_error(Step::Compile, "main", Some("InvalidMILProgram"), &findings);
    assert!(e.message.contains("the lint's findings for this program:\n    warning[concat]: op `y`"), "{}", e.message);
    // An eval failure is not about the program's text: no findings.
    let e = framework_error(Step::Eval, "main", Some("x"), &findings);
    assert!(!e.message.contains("findings"), "{}", e.message);
}

#[test]
fn dialect_test_programs_are_lint_clean_and_check_exactly() {
    for dialect in [Dialect::Ios18, Dialect::Ios16] {
        let t = DialectTest::new(dialect);
        mil::validate(&t.program).unwrap();
        assert_eq!(mil::lint::lint(&t.program), vec![], "{dialect}");
        let main = t.program.main().unwrap();
        let io = if dialect == Dialect::Ios18 { DType::Fp32 } else { DType::Fp16 };
        assert_eq!(main.inputs[0].ty.dtype, io);
        assert_eq!(main.output_vars()[0].ty.dtype, io);
        assert_eq!(main.ops.iter().any(|o| o.op == "cast"), dialect == Dialect::Ios18);
        assert_eq!(t.input.byte_len(), 48 * 1024);

        let doubled: Vec<f32> = t.input.to_f32().iter().map(|v| v * 2.0).collect();
        let right = Surface::from_f32(io, t.input.shape(), &doubled);
        t.check(&right).unwrap();
        let mut wrong = doubled.clone();
        wrong[100] += 1.0;
        let e = t.check(&Surface::from_f32(io, t.input.shape(), &wrong)).unwrap_err();
        assert!(e.message.contains("at element 100"), "{}", e.message);
    }
}

/// The device is usable through the trait object like any other (compile-time check).
#[allow(dead_code)]
fn ane_is_a_device(d: AneDevice) -> Box<dyn Device> {
    Box::new(d)
}

#[test]
fn the_dialect_test_programs_print_as_their_dialects() {
    let ios18 = mil::text::print(&DialectTest::new(Dialect::Ios18).program);
    assert!(ios18.starts_with("program(1.3)"), "{ios18}");
    assert!(ios18.contains("func main<ios18>(tensor<fp32, [1, 64, 1, 192]> x)"), "{ios18}");
    assert!(ios18.contains(" = cast("), "{ios18}");
    let ios16 = mil::text::print(&DialectTest::new(Dialect::Ios16).program);
    assert!(ios16.starts_with("program(1.0)"), "{ios16}");
    assert!(ios16.contains("func main<ios16>(tensor<fp16, [1, 128, 1, 192]> x)"), "{ios16}");
    assert!(!ios16.contains("cast"), "{ios16}");
    for (text, dialect) in [(ios18, Dialect::Ios18), (ios16, Dialect::Ios16)] {
        assert_eq!(mil::text::parse(&text).unwrap(), DialectTest::new(dialect).program);
    }
}
