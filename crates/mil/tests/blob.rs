//! The BLOBFILE weight format against bytes written out by hand from DESIGN.md's
//! description, multi-chunk files, and model directories on disk.

use half::f16;
use mil::blob::{read_chunk, ModelDir, Weights};
use mil::builder::FunctionBuilder;
use mil::{DType, Dialect, ErrorKind, Program, TensorType, Value};

/// A 64-byte header whose listed bytes are set and the rest zero.
fn header(set: &[(usize, u8)]) -> Vec<u8> {
    let mut h = vec![0u8; 64];
    for &(at, b) in set {
        h[at] = b;
    }
    h
}

#[test]
fn one_tensor_file_has_the_documented_bytes() {
    // [1.0, -2.0, 0.5] in fp16 are 0x3C00, 0xC000, 0x3800.
    let mut w = Weights::new();
    let v = w.add_tensor("w", &[3], &[1.0, -2.0, 0.5]);
    assert_eq!(
        v,
        Value::Blob { ty: TensorType::new(DType::Fp16, [3]), path: "@model_path/weights/w.bin".into(), offset: 64 }
    );
    // File header: byte 0 = 1, byte 4 = 2. Chunk header: EF BE AD DE, byte 4 = 1,
    // u32 at +8 = 6 payload bytes, u32 at +16 = 128 (where the payload starts).
    let mut expected = header(&[(0, 1), (4, 2)]);
    expected.extend(header(&[(0, 0xEF), (1, 0xBE), (2, 0xAD), (3, 0xDE), (4, 1), (8, 6), (16, 128)]));
    expected.extend([0x00, 0x3C, 0x00, 0xC0, 0x00, 0x38]);
    assert_eq!(w.file("@model_path/weights/w.bin").unwrap(), expected.as_slice());
    let back = w.read_fp16("@model_path/weights/w.bin", 64, 3).unwrap();
    assert_eq!(back, [f16::from_f32(1.0), f16::from_f32(-2.0), f16::from_f32(0.5)]);
}

#[test]
fn multi_chunk_file_reads_back_by_offset() {
    let mut w = Weights::new();
    let a: Vec<f32> = vec![1.0, 2.0];
    let b: Vec<f32> = (0..6).map(|i| i as f32 - 2.5).collect();
    let c: Vec<f32> = vec![-0.0];
    let values = w.add_tensors("layer0", &[("a", &[2], &a), ("b", &[2, 3], &b), ("c", &[1], &c)]);
    // Chunk headers at 64, then 64 + 64 + 2·2 = 132, then 132 + 64 + 6·2 = 208.
    let offsets: Vec<u64> = values
        .iter()
        .map(|v| match v {
            Value::Blob { offset, path, .. } => {
                assert_eq!(path, "@model_path/weights/layer0.bin");
                *offset
            }
            other => panic!("expected a BLOBFILE value, got {other:?}"),
        })
        .collect();
    assert_eq!(offsets, [64, 132, 208]);
    assert_eq!(values[1].ty(), &TensorType::new(DType::Fp16, [2, 3]));
    let bytes = w.file("@model_path/weights/layer0.bin").unwrap();
    assert_eq!(bytes.len(), 64 + 3 * 64 + 2 * (2 + 6 + 1));
    assert_eq!(bytes[0], 3, "the file header counts the chunks");
    assert_eq!(&bytes[132..136], &[0xEF, 0xBE, 0xAD, 0xDE]);
    assert_eq!(u32::from_le_bytes(bytes[132 + 8..132 + 12].try_into().unwrap()), 12);
    assert_eq!(u32::from_le_bytes(bytes[132 + 16..132 + 20].try_into().unwrap()), 196);
    for (v, data) in values.iter().zip([&a, &b, &c]) {
        let Value::Blob { path, offset, ty } = v else { unreachable!() };
        let got: Vec<f32> = w.read_fp16(path, *offset, ty.numel()).unwrap().iter().map(|h| h.to_f32()).collect();
        assert_eq!(
            got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            data.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
    }
    // The right file, the wrong offset: inside chunk a's payload there is no header.
    let e = w.read_fp16("@model_path/weights/layer0.bin", 128, 2).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Blob);
    assert!(e.message.contains("expected magic EF BE AD DE"), "{e}");
    // The right offset, the wrong size.
    let e = read_chunk(bytes, 132, 5).unwrap_err();
    assert!(e.message.contains("holds 12 bytes, expected 10"), "{e}");
}

/// A program with two weights in two files and one in a shared multi-chunk file.
fn model_with_weights(dialect: Dialect) -> ModelDir {
    let mut weights = Weights::new();
    let mut b = FunctionBuilder::new("main", dialect);
    let x = b.input("x", TensorType::surface(DType::Fp16, 4, 3));
    let w1 = b.constant("w1", weights.add_tensor("w1", &[2, 4, 1, 1], &[0.25; 8]));
    let shared =
        weights.add_tensors("shared", &[("w2", &[4, 2, 1, 1], &[1.5; 8]), ("bias", &[1, 4, 1, 3], &[-1.0; 12])]);
    let w2 = b.constant("w2", shared[0].clone());
    let bias = b.constant("bias", shared[1].clone());
    let h = b.conv1x1("h", &x, &w1);
    let y = b.conv1x1("y", &h, &w2);
    let z = b.add("z", &y, &bias);
    b.output(&z);
    ModelDir { program: Program::new(dialect, b.finish().unwrap()), weights }
}

#[test]
fn model_directories_round_trip_in_both_dialects() {
    for dialect in [Dialect::Ios18, Dialect::Ios16] {
        let model = model_with_weights(dialect);
        let dir = tempfile::tempdir().unwrap();
        model.write(dir.path()).unwrap();
        assert!(dir.path().join("weights/shared.bin").is_file());
        let text = std::fs::read_to_string(dir.path().join("model.mil")).unwrap();
        assert!(text.starts_with(&format!("program({})", dialect.version())));
        let back = ModelDir::read(dir.path()).unwrap();
        assert_eq!(back, model);
        assert_eq!(back.weights.files().count(), 2);
    }
}

#[test]
fn reading_loads_only_the_files_the_program_uses() {
    let model = model_with_weights(Dialect::Ios18);
    let dir = tempfile::tempdir().unwrap();
    model.write(dir.path()).unwrap();
    std::fs::write(dir.path().join("weights/stray.bin"), b"not a weight file").unwrap();
    let back = ModelDir::read(dir.path()).unwrap();
    assert!(back.weights.file("@model_path/weights/stray.bin").is_none());
}

#[test]
fn weight_paths_stay_inside_the_directory() {
    let dir = std::path::Path::new("/models/m");
    assert_eq!(mil::blob::weight_file(dir, "@model_path/weights/w.bin").unwrap(), dir.join("weights/w.bin"));
    for bad in ["@model_path/../w.bin", "/etc/passwd", "@model_path/", "@model_path//abs", "weights/w.bin"] {
        let e = mil::blob::weight_file(dir, bad).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Blob, "{bad}");
    }
}
