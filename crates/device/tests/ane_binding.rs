//! The ANE binding plan (order and allocation sizes of IOSurfaces) and the byte copies
//! between surfaces and IOSurface memory, against hand-computed expectations.

use device::ane::binding::{
    alloc_size, fill_surface, read_rows, surface_bytes, write_rows, BindingRules, RowLayout, SurfacePlan,
    ALLOC_ALIGN_BYTES, MIN_ALLOC_BYTES,
};
use device::{ErrorKind, Surface};
use half::f16;
use mil::{DType, TensorType, Var};

fn var(name: &str, dtype: DType, c: usize, s: usize) -> Var {
    Var::new(name, TensorType::surface(dtype, c, s))
}

fn names(slots: &[device::ane::binding::Slot]) -> Vec<(&str, usize)> {
    slots.iter().map(|s| (s.name.as_str(), s.declared)).collect()
}

#[test]
fn inputs_and_outputs_bind_in_byte_wise_alphabetical_order() {
    // Declared x, lora_A, lora_B, W: the ANE reportedly binds W, lora_A, lora_B, x
    // (uppercase sorts first, as with strcmp).
    let inputs = [
        var("x", DType::Fp16, 768, 32),
        var("lora_A", DType::Fp16, 768, 16),
        var("lora_B", DType::Fp16, 768, 16),
        var("W", DType::Fp16, 64, 64),
    ];
    let outputs =
        [var("q32", DType::Fp32, 64, 256), var("k32", DType::Fp32, 64, 256), var("v32", DType::Fp32, 64, 256)];
    let plan = SurfacePlan::new(&inputs, &outputs, &BindingRules::default());
    assert_eq!(names(&plan.inputs), [("W", 3), ("lora_A", 1), ("lora_B", 2), ("x", 0)]);
    assert_eq!(names(&plan.outputs), [("k32", 1), ("q32", 0), ("v32", 2)]);
}

#[test]
fn each_group_shares_the_largest_allocation() {
    let inputs = [var("x", DType::Fp16, 768, 32), var("lora_A", DType::Fp16, 768, 16)];
    let outputs = [var("y", DType::Fp32, 768, 32)];
    let plan = SurfacePlan::new(&inputs, &outputs, &BindingRules::default());
    // x: 768·32·2 = 49152 bytes, lora_A 24576: both allocated 49152, data sizes kept.
    let sizes: Vec<(usize, usize)> = plan.inputs.iter().map(|s| (s.data_bytes, s.alloc_bytes)).collect();
    assert_eq!(sizes, [(24576, 49152), (49152, 49152)]);
    assert_eq!((plan.outputs[0].data_bytes, plan.outputs[0].alloc_bytes), (98304, 98304));
}

#[test]
fn small_surfaces_are_padded_to_the_minimum_and_aligned() {
    let rules = BindingRules::default();
    assert_eq!(MIN_ALLOC_BYTES, 49152);
    assert_eq!(ALLOC_ALIGN_BYTES, 128);
    assert_eq!(alloc_size(1536, &rules), 49152); // [1, 768, 1, 1] fp16
    assert_eq!(alloc_size(49153, &rules), 49152 + 128);
    assert_eq!(alloc_size(65536, &rules), 65536);
    let plain = BindingRules::none();
    assert_eq!(alloc_size(1536, &plain), 1536);
    assert_eq!(alloc_size(0, &plain), 1, "IOSurfaceCreate needs at least one byte");
}

#[test]
fn without_the_rules_binding_is_declaration_order_at_exact_sizes() {
    let inputs = [var("x", DType::Fp16, 4, 16), var("a", DType::Fp32, 2, 16)];
    let plan = SurfacePlan::new(&inputs, &[var("y", DType::Fp16, 4, 16)], &BindingRules::none());
    assert_eq!(names(&plan.inputs), [("x", 0), ("a", 1)]);
    let sizes: Vec<usize> = plan.inputs.iter().map(|s| s.alloc_bytes).collect();
    assert_eq!(sizes, [128, 128]);
    let inputs = [var("x", DType::Fp16, 4, 16), var("a", DType::Fp32, 4, 16)];
    let plan = SurfacePlan::new(&inputs, &[], &BindingRules::none());
    assert_eq!(plan.inputs.iter().map(|s| s.alloc_bytes).collect::<Vec<_>>(), [128, 256]);
}

#[test]
fn surface_bytes_are_little_endian_of_the_surface_dtype() {
    let s = Surface::from_f32(DType::Fp16, &[1, 1, 1, 3], &[1.0, -2.0, 0.5]);
    let mut out = vec![9u8; 5];
    surface_bytes(&s, &mut out);
    let want: Vec<u8> = [1.0f32, -2.0, 0.5].iter().flat_map(|v| f16::from_f32(*v).to_bits().to_le_bytes()).collect();
    assert_eq!(out, want);
    assert_eq!(out, [0x00, 0x3c, 0x00, 0xc0, 0x00, 0x38]);

    let s = Surface::from_f32(DType::Fp32, &[1, 1, 1, 2], &[1.5, -3.25]);
    surface_bytes(&s, &mut out);
    assert_eq!(out, [1.5f32.to_le_bytes(), (-3.25f32).to_le_bytes()].concat());

    let mut back = Surface::zeros(DType::Fp32, &[1, 1, 1, 2]);
    fill_surface(&mut back, &out).unwrap();
    assert_eq!(back, s);
    let e = fill_surface(&mut back, &out[..7]).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Binding);
}

#[test]
fn copies_follow_bytes_per_row() {
    // Rows of 4 usable bytes, 6 apart (2 bytes of padding each), 3 rows.
    let layout = RowLayout { row_bytes: 4, bytes_per_row: 6, rows: 3 };
    let mut mem = vec![0xAAu8; 16];
    write_rows(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], &mut mem, layout, "x").unwrap();
    assert_eq!(mem, [1, 2, 3, 4, 0xAA, 0xAA, 5, 6, 7, 8, 0xAA, 0xAA, 9, 10, 0xAA, 0xAA]);
    let mut back = [0u8; 10];
    read_rows(&mem, layout, &mut back, "x").unwrap();
    assert_eq!(back, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
    // A flat surface is one memcpy from byte 0.
    let mut flat = vec![0u8; 8];
    write_rows(&[7, 7, 7], &mut flat, RowLayout::flat(8), "x").unwrap();
    assert_eq!(flat, [7, 7, 7, 0, 0, 0, 0, 0]);
}

#[test]
fn copies_that_do_not_fit_are_binding_errors() {
    let layout = RowLayout { row_bytes: 4, bytes_per_row: 6, rows: 2 };
    let mut mem = vec![0u8; 10];
    let e = write_rows(&[0; 9], &mut mem, layout, "input `x`").unwrap_err();
    assert_eq!(e.kind, ErrorKind::Binding);
    assert_eq!(e.message, "input `x`: 9 bytes of data do not fit the IOSurface's 8 usable bytes");
    // A layout larger than the memory behind it.
    let e = read_rows(&mem[..9], layout, &mut [0; 4], "output `y`").unwrap_err();
    assert!(e.message.starts_with("output `y`: IOSurface layout of 2 rows × 4 bytes"), "{}", e.message);
}
