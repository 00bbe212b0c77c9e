//! Choosing the next token from logits, exactly as llama2.c `run.c` does — greedy,
//! temperature, or top-p (nucleus) — with run.c's xorshift generator, so that the same
//! seed picks the same tokens as `run -s SEED`.

use crate::error::{err, Result};

/// llama2.c's random number generator: xorshift64* (`random_u32` / `random_f32`).
///
/// A zero state stays zero forever (every draw is 0); llama2.c never seeds with 0
/// (it substitutes the time), and neither should callers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rng {
    pub state: u64,
}

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng { state: seed }
    }

    /// run.c `random_u32`: xorshift (12, 25, 27), then the high half of `state · M`.
    pub fn next_u32(&mut self) -> u32 {
        // Multiplier of xorshift64* (Vigna 2016, via Wikipedia "Xorshift").
        const MULTIPLIER: u64 = 0x2545_F491_4F6C_DD1D;
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        (self.state.wrapping_mul(MULTIPLIER) >> 32) as u32
    }

    /// run.c `random_f32`: the top 24 bits of a draw, as a float in [0, 1).
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u32() >> 8) as f32 / 16_777_216.0
    }
}

/// Index of the largest value; the first one on ties (run.c `sample_argmax`).
/// Panics on an empty slice.
pub fn argmax(values: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate().skip(1) {
        if v > values[best] {
            best = i;
        }
    }
    best
}

/// In-place softmax, as run.c: subtract the max, exponentiate, divide by the sum.
pub fn softmax(values: &mut [f32]) {
    let max = values.iter().copied().fold(values[0], f32::max);
    let mut sum = 0.0f32;
    for v in values.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in values.iter_mut() {
        *v /= sum;
    }
}

/// Samples from `probabilities` (summing to 1) with `coin` in [0, 1): the first index
/// where the running sum exceeds `coin`, the last index if rounding leaves it short
/// (run.c `sample_mult`).
pub fn sample_mult(probabilities: &[f32], coin: f32) -> usize {
    let mut cdf = 0.0f32;
    for (i, &p) in probabilities.iter().enumerate() {
        cdf += p;
        if coin < cdf {
            return i;
        }
    }
    probabilities.len() - 1
}

/// Top-p (nucleus) sampling, run.c `sample_topp`: keep the most probable tokens whose
/// cumulative probability first exceeds `topp`, and sample among them with `coin`.
///
/// Like run.c, tokens below `(1 - topp) / (n - 1)` are dropped before sorting: they can
/// never be in the nucleus (if one were, all n-1 others would be at least as small, so
/// the whole nucleus would sum to less than `1 - (1 - topp) = topp`). Sorting is stable
/// (equal probabilities keep index order), where run.c's `qsort` leaves ties unspecified.
pub fn sample_topp(probabilities: &[f32], topp: f32, coin: f32, scratch: &mut Vec<(f32, usize)>) -> usize {
    let n = probabilities.len();
    let cutoff = (1.0 - topp) / (n as f32 - 1.0);
    scratch.clear();
    scratch.extend(probabilities.iter().enumerate().filter(|&(_, &p)| p >= cutoff).map(|(i, &p)| (p, i)));
    scratch.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap_or(std::cmp::Ordering::Equal));

    // Truncate where the cumulative probability first exceeds topp.
    let mut cumulative = 0.0f32;
    let mut last = scratch.len() - 1;
    for (i, &(p, _)) in scratch.iter().enumerate() {
        cumulative += p;
        if cumulative > topp {
            last = i;
            break;
        }
    }
    // Sample from the truncated list, scaling the coin instead of renormalizing.
    let r = coin * cumulative;
    let mut cdf = 0.0f32;
    for &(p, index) in &scratch[..=last] {
        cdf += p;
        if r < cdf {
            return index;
        }
    }
    scratch[last].1
}

/// run.c's `Sampler`: temperature 0 is greedy; otherwise logits are divided by the
/// temperature, softmaxed, and sampled — from everything when `topp` is ≤ 0 or ≥ 1,
/// from the nucleus otherwise.
///
/// ```
/// use llama::Sampler;
///
/// let mut greedy = Sampler::new(0.0, 0.9, 42).unwrap();
/// assert_eq!(greedy.sample(&[0.1, 2.0, 2.0, -1.0]), 1);
/// let mut nucleus = Sampler::new(1.0, 0.9, 42).unwrap();
/// assert!(nucleus.sample(&[0.1, 2.0, 2.0, -1.0]) < 4);
/// ```
#[derive(Clone, Debug)]
pub struct Sampler {
    temperature: f32,
    topp: f32,
    rng: Rng,
    probabilities: Vec<f32>,
    scratch: Vec<(f32, usize)>,
}

impl Sampler {
    /// Errors on a negative or non-finite temperature or a non-finite `topp`.
    pub fn new(temperature: f32, topp: f32, seed: u64) -> Result<Sampler> {
        if !(temperature.is_finite() && temperature >= 0.0) {
            return Err(err!(Input, "temperature is {temperature}; it must be 0 (greedy) or positive"));
        }
        if !topp.is_finite() {
            return Err(err!(Input, "top-p is {topp}; it must be a number in (0, 1), or ≤ 0 / ≥ 1 to disable it"));
        }
        Ok(Sampler { temperature, topp, rng: Rng::new(seed), probabilities: Vec::new(), scratch: Vec::new() })
    }

    /// Always the most likely token.
    pub fn greedy() -> Sampler {
        Sampler::new(0.0, 0.0, 1).expect("greedy parameters are valid")
    }

    pub fn temperature(&self) -> f32 {
        self.temperature
    }

    pub fn topp(&self) -> f32 {
        self.topp
    }

    /// The next token for `logits` (one per vocabulary entry; not modified).
    /// Panics on empty logits.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.temperature == 0.0 {
            return argmax(logits) as u32;
        }
        self.probabilities.clear();
        self.probabilities.extend(logits.iter().map(|&l| l / self.temperature));
        softmax(&mut self.probabilities);
        let coin = self.rng.next_f32();
        let index = if self.topp <= 0.0 || self.topp >= 1.0 {
            sample_mult(&self.probabilities, coin)
        } else {
            sample_topp(&self.probabilities, self.topp, coin, &mut self.scratch)
        };
        index as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_matches_an_independent_xorshift64star() {
        // Reference: the same recurrence in u128 arithmetic, written out separately.
        let mut state: u128 = 42;
        let mut rng = Rng::new(42);
        for _ in 0..1000 {
            state ^= state >> 12;
            state ^= (state << 25) & u64::MAX as u128;
            state ^= state >> 27;
            let expected = (((state * 0x2545F4914F6CDD1D) & u64::MAX as u128) >> 32) as u32;
            assert_eq!(rng.next_u32(), expected);
        }
        let mut rng = Rng::new(42);
        for _ in 0..1000 {
            let f = rng.next_f32();
            assert!((0.0..1.0).contains(&f));
        }
    }

    #[test]
    fn argmax_takes_the_first_of_ties() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[5.0]), 0);
        assert_eq!(argmax(&[-1.0, -1.0]), 0);
    }

    #[test]
    fn sample_mult_walks_the_cdf() {
        let p = [0.1, 0.2, 0.3, 0.4];
        assert_eq!(sample_mult(&p, 0.0), 0);
        assert_eq!(sample_mult(&p, 0.15), 1);
        assert_eq!(sample_mult(&p, 0.35), 2);
        assert_eq!(sample_mult(&p, 0.99), 3);
        assert_eq!(sample_mult(&[0.3, 0.3], 0.9), 1); // sums short of the coin: the last
    }

    #[test]
    fn topp_keeps_the_nucleus_only() {
        let p = [0.05, 0.5, 0.05, 0.3, 0.1];
        let mut scratch = Vec::new();
        // topp 0.7: sorted 0.5 (1), 0.3 (3) → cumulative 0.8 > 0.7; nucleus {1, 3}.
        // coin scaled by 0.8: r < 0.5 → 1, else 3.
        assert_eq!(sample_topp(&p, 0.7, 0.0, &mut scratch), 1);
        assert_eq!(sample_topp(&p, 0.7, 0.6, &mut scratch), 1); // r = 0.48
        assert_eq!(sample_topp(&p, 0.7, 0.65, &mut scratch), 3); // r = 0.52
        assert_eq!(sample_topp(&p, 0.7, 0.999, &mut scratch), 3);
        // topp 0.85: 0.5 + 0.3 + 0.1 = 0.9 > 0.85, nucleus {1, 3, 4}.
        let nucleus = |topp: f32, scratch: &mut Vec<(f32, usize)>| -> std::collections::BTreeSet<usize> {
            (0..100).map(|i| sample_topp(&p, topp, i as f32 / 100.0, scratch)).collect()
        };
        assert_eq!(nucleus(0.85, &mut scratch), [1, 3, 4].into_iter().collect());
        // topp 0.92: one 0.05 more; the stable sort takes index 0 before index 2.
        assert_eq!(nucleus(0.92, &mut scratch), [0, 1, 3, 4].into_iter().collect());
    }

    #[test]
    fn sampling_frequencies_follow_the_softmax() {
        let logits = [1.0f32, 2.0, 0.5, 3.0];
        let mut expected = logits;
        softmax(&mut expected);
        let mut sampler = Sampler::new(1.0, 0.0, 1234).unwrap();
        let n = 40_000;
        let mut counts = [0usize; 4];
        for _ in 0..n {
            counts[sampler.sample(&logits) as usize] += 1;
        }
        for (c, p) in counts.iter().zip(expected) {
            let freq = *c as f32 / n as f32;
            // Binomial standard deviation ≤ 0.0025 at n = 40000: 0.012 is ~5σ.
            assert!((freq - p).abs() < 0.012, "frequency {freq} vs probability {p}");
        }
    }

    #[test]
    fn temperature_sharpens() {
        let logits = [1.0f32, 2.0, 0.5, 3.0];
        let mut cold = Sampler::new(0.05, 0.0, 7).unwrap();
        assert!((0..200).all(|_| cold.sample(&logits) == 3));
        assert_eq!(Sampler::greedy().sample(&logits), 3);
    }

    #[test]
    fn same_seed_same_tokens() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let mut a = Sampler::new(0.8, 0.9, 99).unwrap();
        let mut b = Sampler::new(0.8, 0.9, 99).unwrap();
        let xs: Vec<u32> = (0..100).map(|_| a.sample(&logits)).collect();
        let ys: Vec<u32> = (0..100).map(|_| b.sample(&logits)).collect();
        assert_eq!(xs, ys);
        assert!(xs.iter().collect::<std::collections::BTreeSet<_>>().len() > 1);
    }

    #[test]
    fn bad_parameters_are_errors() {
        assert!(Sampler::new(-0.5, 0.9, 1).unwrap_err().message.contains("temperature is -0.5"));
        assert!(Sampler::new(f32::NAN, 0.9, 1).unwrap_err().message.contains("temperature is NaN"));
        assert!(Sampler::new(1.0, f32::INFINITY, 1).unwrap_err().message.contains("top-p is inf"));
    }
}
