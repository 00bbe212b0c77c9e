//! The data loader: windows against the shard bytes, determinism and exact resumption,
//! the held-out split, and an error (naming file and offset) for each kind of bad data.

use std::path::PathBuf;

use train::data::*;

/// A shard whose token at offset `i` is `1 + i % 97`, so a window's content reveals where
/// it starts.
fn ramp(n: usize) -> Vec<u16> {
    (0..n).map(|i| 1 + (i % 97) as u16).collect()
}

fn write(dir: &tempfile::TempDir, name: &str, tokens: &[u16]) -> PathBuf {
    let path = dir.path().join(name);
    write_shard(&path, tokens).unwrap();
    path
}

#[test]
fn shard_files_are_little_endian_u16_without_header() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, "a.bin", &[1, 0x0203, 513]);
    assert_eq!(std::fs::read(&path).unwrap(), [1, 0, 3, 2, 1, 2]);
}

#[test]
fn batches_are_consecutive_windows_of_the_shards() {
    let dir = tempfile::tempdir().unwrap();
    let a = ramp(500);
    let b: Vec<u16> = ramp(300).iter().map(|t| t + 100).collect();
    let paths = [write(&dir, "a.bin", &a), write(&dir, "b.bin", &b)];
    let seq = 16;
    let splits = Dataset::open(&paths, &HoldOut::Fraction(0.0), 256, seq).unwrap();
    assert!(splits.val.is_none());
    let data = splits.train;
    assert_eq!(data.n_tokens(), 800);
    assert_eq!(data.n_windows(), (500 - 16) + (300 - 16));

    let mut sampler = Sampler::new(9);
    let batch = 64;
    let (mut inputs, mut targets) = (vec![0u32; batch * seq], vec![0u32; batch * seq]);
    data.sample_batch(&mut sampler, &mut inputs, &mut targets);
    let (mut from_a, mut from_b) = (0, 0);
    for (row_in, row_tg) in inputs.chunks(seq).zip(targets.chunks(seq)) {
        // Find the window in either shard; it must be seq + 1 consecutive tokens of one.
        let mut window: Vec<u16> = row_in.iter().map(|&t| t as u16).collect();
        window.push(row_tg[seq - 1] as u16);
        assert_eq!(row_in[1..], row_tg[..seq - 1], "targets are inputs shifted by one");
        let in_a = a.windows(seq + 1).any(|w| w == window.as_slice());
        let in_b = b.windows(seq + 1).any(|w| w == window.as_slice());
        assert!(in_a ^ in_b, "window {window:?} is not a stretch of exactly one shard");
        from_a += in_a as usize;
        from_b += in_b as usize;
    }
    assert!(from_a > 0 && from_b > 0, "both shards are sampled ({from_a}, {from_b})");
}

#[test]
fn windows_are_deterministic_and_resume_exactly() {
    let data = Dataset::from_tokens("mem", ramp(5000), 128, 8).unwrap();
    let draw = |sampler: &mut Sampler| {
        let (mut inputs, mut targets) = (vec![0u32; 4 * 8], vec![0u32; 4 * 8]);
        data.sample_batch(sampler, &mut inputs, &mut targets);
        (inputs, targets)
    };
    let mut a = Sampler::new(1234);
    let mut b = Sampler::new(1234);
    let first = draw(&mut a);
    assert_eq!(first, draw(&mut b), "same seed, same windows");
    assert_ne!(first, draw(&mut Sampler::new(1235)), "another seed, other windows");

    // Save after one batch (through JSON, as a checkpoint would), draw on, restore, compare.
    let json = serde_json::to_string(&a.state()).unwrap();
    let expected: Vec<_> = (0..3).map(|_| draw(&mut a)).collect();
    let state: SamplerState = serde_json::from_str(&json).unwrap();
    let mut resumed = Sampler::restore(state);
    let got: Vec<_> = (0..3).map(|_| draw(&mut resumed)).collect();
    assert_eq!(got, expected);
    assert_eq!(resumed.state(), a.state());
}

#[test]
fn fraction_holds_out_the_tail_of_every_shard() {
    let dir = tempfile::tempdir().unwrap();
    let paths = [write(&dir, "a.bin", &ramp(1000)), write(&dir, "b.bin", &ramp(2000))];
    let seq = 9;
    let splits = Dataset::open(&paths, &HoldOut::Fraction(0.1), 128, seq).unwrap();
    let val = splits.val.expect("a validation split");
    assert_eq!(splits.train.n_tokens(), 900 + 1800);
    assert_eq!(val.n_tokens(), 100 + 200);
    assert_eq!(val.split(), Split::Val);
    // Every val window lies in a shard's last 10 %: with the ramp, window 0 of val starts
    // at a's offset 900, whose token is 1 + 900 % 97.
    let mut window = vec![0u32; seq + 1];
    val.window(0, &mut window);
    assert_eq!(window[0], 1 + 900 % 97);
    val.window(100 - seq as u64, &mut window); // first window of b's tail
    assert_eq!(window[0], 1 + 1800 % 97);
    // The train split never reaches into the tail.
    splits.train.window(splits.train.n_windows() - 1, &mut window);
    assert_eq!(window[seq], 1 + (1800 - 1) as u32 % 97);
}

#[test]
fn a_named_shard_can_be_the_validation_split() {
    let dir = tempfile::tempdir().unwrap();
    let train = [write(&dir, "train.bin", &ramp(400))];
    let val_path = write(&dir, "val.bin", &[1, 5, 6, 7, 8, 9]);
    let splits = Dataset::open(&train, &HoldOut::Shard(val_path), 128, 4).unwrap();
    assert_eq!(splits.train.n_tokens(), 400);
    let val = splits.val.unwrap();
    assert_eq!((val.n_tokens(), val.n_windows()), (6, 2));
    let mut window = vec![0u32; 5];
    val.window(1, &mut window);
    assert_eq!(window, [5, 6, 7, 8, 9]);
}

#[test]
fn bad_data_gives_errors_naming_file_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    let good = write(&dir, "good.bin", &ramp(100));

    let bad_token = write(&dir, "bad_token.bin", &[1, 2, 3, 40000, 4]);
    let err = Dataset::open(&[good.clone(), bad_token.clone()], &HoldOut::Fraction(0.0), 32000, 2).unwrap_err();
    assert!(matches!(err, DataError::TokenOutOfRange { offset: 3, token: 40000, vocab: 32000, .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains("bad_token.bin") && message.contains("token offset 3") && message.contains("byte 6"),
        "{message}"
    );

    let empty = dir.path().join("empty.bin");
    std::fs::write(&empty, b"").unwrap();
    let err = Dataset::open(&[empty], &HoldOut::Fraction(0.0), 100, 2).unwrap_err();
    assert!(matches!(err, DataError::Empty { .. }) && err.to_string().contains("empty.bin"), "{err}");

    let odd = dir.path().join("odd.bin");
    std::fs::write(&odd, [1u8, 0, 2]).unwrap();
    let err = Dataset::open(&[odd], &HoldOut::Fraction(0.0), 100, 2).unwrap_err();
    assert!(matches!(err, DataError::OddLength { bytes: 3, .. }) && err.to_string().contains("odd.bin"), "{err}");

    let missing = dir.path().join("missing.bin");
    let err = Dataset::open(&[missing], &HoldOut::Fraction(0.0), 100, 2).unwrap_err();
    assert!(matches!(err, DataError::Io { .. }) && err.to_string().contains("missing.bin"), "{err}");

    let short = write(&dir, "short.bin", &ramp(10));
    let err = Dataset::open(&[short], &HoldOut::Fraction(0.0), 100, 10).unwrap_err();
    assert!(matches!(err, DataError::TooShort { split: Split::Train, longest: 10, window: 11, .. }), "{err:?}");
    assert!(err.to_string().contains("short.bin"), "{err}");

    // 100 tokens, 5 % held out: the val split's 5 tokens cannot hold a window of 9.
    let err = Dataset::open(std::slice::from_ref(&good), &HoldOut::Fraction(0.05), 100, 8).unwrap_err();
    assert!(matches!(err, DataError::TooShort { split: Split::Val, longest: 5, window: 9, .. }), "{err:?}");

    assert!(matches!(
        Dataset::open(std::slice::from_ref(&good), &HoldOut::Fraction(1.0), 100, 2),
        Err(DataError::BadFraction(_))
    ));
    assert!(matches!(Dataset::open(&[], &HoldOut::Fraction(0.0), 100, 2), Err(DataError::NoShards)));
    assert!(matches!(Dataset::from_tokens("mem", vec![], 100, 2), Err(DataError::Empty { .. })));
}
