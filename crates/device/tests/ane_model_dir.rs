//! The ANE model directory: layout, privacy, sharing, and cleanup on drop and on failure.

use std::fs;
use std::path::Path;

use device::ane::model_dir::{relative_weight_path, ModelDir};
use device::{ErrorKind, Weights};

const MIL: &str = "program(1.3)\n{ }\n";

fn weights() -> Weights {
    let mut w = Weights::new();
    w.add_tensor("wq", &[2, 2, 1, 1], &[1.0, 2.0, 3.0, 4.0]);
    w.insert_file("@model_path/weights/sub/extra.bin", vec![1, 2, 3]);
    w
}

#[test]
fn the_directory_holds_the_program_and_its_weights() {
    let root = tempfile::tempdir().unwrap();
    let w = weights();
    let dir = ModelDir::create(root.path(), "A1B2C3_d4", MIL, &w).unwrap();
    assert_eq!(dir.path(), root.path().join("A1B2C3_d4"));
    assert_eq!(fs::read_to_string(dir.path().join("model.mil")).unwrap(), MIL);
    assert_eq!(fs::read(dir.path().join("weights/wq.bin")).unwrap(), w.file("@model_path/weights/wq.bin").unwrap());
    assert_eq!(fs::read(dir.path().join("weights/sub/extra.bin")).unwrap(), [1, 2, 3]);
    let mut entries: Vec<String> =
        fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    entries.sort();
    assert_eq!(entries, ["model.mil", "weights"], "no partial files are left");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(dir.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & 0o077, 0, "only the owner may read it: mode {mode:o}");
        assert_eq!(mode & 0o700, 0o700);
    }
    let path = dir.path().to_path_buf();
    drop(dir);
    assert!(!path.exists());
}

#[test]
fn kernels_of_one_program_share_the_directory_until_the_last_drops() {
    let root = tempfile::tempdir().unwrap();
    let a = ModelDir::create(root.path(), "same", MIL, &Weights::new()).unwrap();
    let b = ModelDir::create(root.path(), "same", MIL, &Weights::new()).unwrap();
    assert_eq!(a.path(), b.path());
    drop(a);
    assert!(b.path().join("model.mil").exists());
    let path = b.path().to_path_buf();
    drop(b);
    assert!(!path.exists());
}

#[test]
fn a_stale_directory_is_replaced() {
    let root = tempfile::tempdir().unwrap();
    let stale = root.path().join("stale");
    fs::create_dir_all(stale.join("weights")).unwrap();
    fs::write(stale.join("leftover"), b"old").unwrap();
    let dir = ModelDir::create(root.path(), "stale", MIL, &Weights::new()).unwrap();
    assert!(!stale.join("leftover").exists());
    assert_eq!(fs::read_to_string(dir.path().join("model.mil")).unwrap(), MIL);
}

#[test]
fn a_failed_write_leaves_nothing_behind() {
    let root = tempfile::tempdir().unwrap();
    let mut w = Weights::new();
    // The second file needs `a.bin` to be a directory, but it is a file.
    w.insert_file("@model_path/weights/a.bin", vec![1]);
    w.insert_file("@model_path/weights/a.bin/b.bin", vec![2]);
    let e = ModelDir::create(root.path(), "broken", MIL, &w).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Compile);
    assert!(e.message.contains("a.bin"), "{}", e.message);
    assert!(!root.path().join("broken").exists());
    // And the name is free again.
    drop(ModelDir::create(root.path(), "broken", MIL, &Weights::new()).unwrap());
}

#[test]
fn weight_paths_must_stay_inside_the_directory() {
    assert_eq!(relative_weight_path("@model_path/weights/w.bin").unwrap(), Path::new("weights/w.bin"));
    for bad in [
        "weights/w.bin",
        "@model_path/../escape.bin",
        "@model_path//etc/passwd",
        "@model_path/",
        "@model_path/model.mil",
    ] {
        let e = relative_weight_path(bad).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Program, "{bad}");
        assert!(e.message.starts_with(&format!("weight file `{bad}`: ")), "{}", e.message);
    }
    let root = tempfile::tempdir().unwrap();
    let mut w = Weights::new();
    w.insert_file("@model_path/../../escape.bin", vec![0]);
    assert!(ModelDir::create(root.path(), "m", MIL, &w).is_err());
    assert!(!root.path().join("m").exists(), "nothing is created for a bad path");
}

#[test]
fn names_must_be_one_plain_component() {
    let root = tempfile::tempdir().unwrap();
    for bad in ["", ".", "..", "a/b", "../x", "a b"] {
        let e = ModelDir::create(root.path(), bad, MIL, &Weights::new()).unwrap_err();
        assert!(e.message.contains("is not a plain directory name"), "{bad}: {}", e.message);
    }
}

#[test]
fn weights_can_be_rewritten_in_place() {
    let root = tempfile::tempdir().unwrap();
    let mut w = Weights::new();
    w.add_tensor("w", &[2], &[1.0, 2.0]);
    let dir = ModelDir::create(root.path(), "reload", MIL, &w).unwrap();
    let mut w2 = Weights::new();
    w2.add_tensor("w", &[2], &[3.0, 4.0]);
    dir.rewrite_weights(&w2).unwrap();
    assert_eq!(fs::read(dir.path().join("weights/w.bin")).unwrap(), w2.file("@model_path/weights/w.bin").unwrap());
    assert_eq!(fs::read_to_string(dir.path().join("model.mil")).unwrap(), MIL);
}
