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

#[test]
fn u32_shards_hold_ids_beyond_u16_and_read_like_u16_ones() {
    let dir = tempfile::tempdir().unwrap();
    let vocab = 151_936; // Qwen's
    let tokens: Vec<u32> = (0..400u32).map(|i| (i * 7919) % vocab as u32).collect();
    assert!(tokens.iter().any(|&t| t > 65_535));
    let path = dir.path().join("qwen.bin");
    write_tokens(&path, &tokens, TokenWidth::for_vocab(vocab), None).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    // The header: magic, version 1, 4 bytes a token, no flags, reserved, 400 tokens.
    assert_eq!(&bytes[..8], SHARD_MAGIC);
    assert_eq!(
        bytes[8..32],
        [[1, 0, 0, 0], [4, 0, 0, 0], [0; 4], [0; 4]]
            .concat()
            .into_iter()
            .chain(400u64.to_le_bytes())
            .collect::<Vec<u8>>()[..]
    );
    assert_eq!(bytes.len(), 32 + 4 * 400);
    assert_eq!(bytes[32 + 4 * 3..32 + 4 * 4], tokens[3].to_le_bytes());

    let seq = 8;
    let data = Dataset::open(std::slice::from_ref(&path), &HoldOut::Fraction(0.0), vocab, seq).unwrap().train;
    assert!(!data.is_masked());
    let mut window = vec![0u32; seq + 1];
    for index in [0, 17, data.n_windows() - 1] {
        data.window(index, &mut window);
        assert_eq!(window, tokens[index as usize..index as usize + seq + 1]);
    }
    // The same ids in memory, or as u16 where they fit, give the same windows.
    let small: Vec<u32> = tokens.iter().map(|t| t % 60_000).collect();
    let u16_path = dir.path().join("small16.bin");
    let u32_path = dir.path().join("small32.bin");
    write_tokens(&u16_path, &small, TokenWidth::U16, None).unwrap();
    write_tokens(&u32_path, &small, TokenWidth::U32, None).unwrap();
    assert_eq!(std::fs::read(&u16_path).unwrap().len(), 2 * 400, "u16 without a mask stays llama2.c's");
    let (mut a, mut b) = (vec![0u32; 3 * seq], vec![0u32; 3 * seq]);
    let (mut c, mut d) = (vec![0u32; 3 * seq], vec![0u32; 3 * seq]);
    let d16 = Dataset::open(&[u16_path], &HoldOut::Fraction(0.0), 60_000, seq).unwrap().train;
    let d32 = Dataset::open(&[u32_path], &HoldOut::Fraction(0.0), 60_000, seq).unwrap().train;
    d16.sample_batch(&mut Sampler::new(4), &mut a, &mut b);
    d32.sample_batch(&mut Sampler::new(4), &mut c, &mut d);
    assert_eq!((a, b), (c, d));

    // A model whose vocabulary is smaller than the ids: the file, offset and byte.
    let err = Dataset::open(&[path], &HoldOut::Fraction(0.0), 70_000, seq).unwrap_err();
    let first = tokens.iter().position(|&t| t >= 70_000).unwrap();
    assert!(
        matches!(err, DataError::TokenOutOfRange { offset, byte, vocab: 70_000, .. }
            if offset == first as u64 && byte == 32 + 4 * first as u64),
        "{err:?}"
    );
    assert!(err.to_string().contains("qwen.bin"), "{err}");
}

#[test]
fn masked_shards_turn_masked_targets_into_ignore() {
    let dir = tempfile::tempdir().unwrap();
    let tokens: Vec<u32> = (0..200u32).map(|i| 1 + i % 50).collect();
    let mask: Vec<u8> = (0..200).map(|i| u8::from(i % 5 >= 2)).collect();
    let path = dir.path().join("chat.bin");
    write_tokens(&path, &tokens, TokenWidth::U16, Some(&mask)).unwrap();
    assert_eq!(std::fs::read(&path).unwrap().len(), 32 + 2 * 200 + 200);
    let seq = 10;
    let data = Dataset::open(&[path], &HoldOut::Fraction(0.0), 64, seq).unwrap().train;
    assert!(data.is_masked());
    let (mut inputs, mut targets) = (vec![0u32; 8 * seq], vec![0u32; 8 * seq]);
    data.sample_batch(&mut Sampler::new(2), &mut inputs, &mut targets);
    for (row_in, row_t) in inputs.chunks(seq).zip(targets.chunks(seq)) {
        // tokens[i] = 1 + i % 50 and windows are shorter than 50: the first input says where.
        let start = (0..200 - seq).find(|&p| tokens[p..p + seq] == *row_in).unwrap();
        for (s, &target) in row_t.iter().enumerate() {
            let pos = start + s + 1;
            let want = if mask[pos] == 1 { tokens[pos] } else { IGNORE_TARGET };
            assert_eq!(target, want, "target of position {pos}");
        }
    }
    assert_eq!(loss_tokens(&targets), targets.iter().filter(|&&t| t != IGNORE_TARGET).count());
    assert!(loss_tokens(&targets) < targets.len());
}

#[test]
fn bad_headers_and_masks_are_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let open = |name: &str, bytes: Vec<u8>| {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        Dataset::open(&[path], &HoldOut::Fraction(0.0), 100, 2).unwrap_err().to_string()
    };
    let header = |width: u32, flags: u32, n: u64| {
        let mut h = SHARD_MAGIC.to_vec();
        for v in [1u32, width, flags, 0] {
            h.extend_from_slice(&v.to_le_bytes());
        }
        h.extend_from_slice(&n.to_le_bytes());
        h
    };
    // Truncated: the header promises 10 u32 tokens, the file has 9.
    let mut bytes = header(4, 0, 10);
    bytes.extend(std::iter::repeat_n(0u8, 36));
    let e = open("short.bin", bytes);
    assert!(e.contains("short.bin") && e.contains("10 u32 tokens") && e.contains("72 bytes"), "{e}");
    // A width that is neither 2 nor 4.
    let e = open("width.bin", header(3, 0, 1).into_iter().chain([1, 0, 0]).collect());
    assert!(e.contains("width.bin") && e.contains("3 bytes per token"), "{e}");
    // A mask byte that is not 0 or 1.
    let mut bytes = header(2, 1, 3);
    bytes.extend([1, 0, 5, 0, 6, 0, 0, 2, 1]);
    let e = open("mask.bin", bytes);
    assert!(e.contains("mask.bin") && e.contains("loss-mask byte 2 at token offset 1"), "{e}");
    // Shorter than a header.
    let e = open("stub.bin", SHARD_MAGIC.to_vec());
    assert!(e.contains("stub.bin") && e.contains("header"), "{e}");
    // A mask of the wrong length is refused when writing.
    let e = write_tokens(&dir.path().join("w.bin"), &[1, 2], TokenWidth::U16, Some(&[1])).unwrap_err();
    assert!(e.to_string().contains("2 tokens, 1 mask bytes"), "{e}");
    let e = write_tokens(&dir.path().join("w.bin"), &[1, 70_000], TokenWidth::U16, None).unwrap_err();
    assert!(e.to_string().contains("70000 at offset 1 does not fit a u16 shard"), "{e}");
}
