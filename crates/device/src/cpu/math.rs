//! Scalar functions written so that the element loops calling them vectorise: no
//! branches (only selects), no libm calls. Two are written by hand because the standard
//! library's versions are opaque scalar calls inside a loop:
//!
//! - [`round_f16`]: f32 → nearest fp16 value, kept as f32. `half` converts correctly but
//!   one value (or four) per call with a CPU-feature check each time; inlined here, the
//!   rounding fuses into the op's own loop. Checked against `half` in the tests.
//! - [`exp`]: Cephes' `expf` (range reduction by ln 2, degree-5 polynomial, error ≤ 2 ulp
//!   on the normal range), because `f32::exp` is a libm call per element and softmax,
//!   sigmoid and SiLU spend most of their time in it.

/// Largest finite fp16 value.
pub(crate) const F16_MAX: f32 = 65504.0;
/// Smallest positive normal fp16 value, 2⁻¹⁴.
const F16_MIN_NORMAL: f32 = 6.103_515_6e-5;

/// Rounds to the nearest fp16 value (ties to even), as `half::f16::from_f32(x).to_f32()`:
/// overflow gives ±∞, fp16 subnormals are kept, NaN stays NaN.
#[inline(always)]
pub(crate) fn round_f16(x: f32) -> f32 {
    let bits = x.to_bits();
    let sign = bits & 0x8000_0000;
    let abs = f32::from_bits(bits & 0x7FFF_FFFF);
    let b = abs.to_bits();
    // Normal range: drop the low 13 of f32's 23 mantissa bits, rounding to nearest even.
    let normal = f32::from_bits(b.wrapping_add(0x0FFF + ((b >> 13) & 1)) & !0x1FFF);
    // Subnormal range: multiples of 2⁻²⁴. Adding 0.5 (whose ulp is 2⁻²⁴) rounds to them.
    let sub = (abs + 0.5) - 0.5;
    let r = if abs < F16_MIN_NORMAL { sub } else { normal };
    let r = if r > F16_MAX { f32::INFINITY } else { r };
    let r = if abs.is_nan() { abs } else { r };
    f32::from_bits(r.to_bits() | sign)
}

/// Rounds every value of a slice to fp16.
#[inline(always)]
pub(crate) fn round_f16_slice(v: &mut [f32]) {
    for x in v.iter_mut() {
        *x = round_f16(*x);
    }
}

/// e^x in f32 (Cephes `expf`): overflow gives +∞, deep underflow 0, NaN stays NaN.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in a part exact in few bits and a correction (Cephes C1, C2).
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 · 2²³: adding and subtracting it rounds to an integer without a libm call.
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(-104.0, 88.8);
    let shifted = xc * LOG2E + ROUND;
    let n = shifted - ROUND;
    // n as an integer, read from the mantissa bits: `n as i32` would be a saturating,
    // NaN-checking conversion that keeps the loops around `exp` from vectorising.
    let ni = (shifted.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let r = xc - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    // 2ⁿ in two halves so that neither exponent leaves the normal range.
    let n1 = ni >> 1;
    let n2 = ni - n1;
    let s1 = f32::from_bits(((n1 + 127) as u32) << 23);
    let s2 = f32::from_bits(((n2 + 127) as u32) << 23);
    let y = e * s1 * s2;
    let y = if x > 88.722_84 { f32::INFINITY } else { y };
    if x.is_nan() {
        x
    } else {
        y
    }
}

#[inline(always)]
pub(crate) fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;

    fn splitmix(state: &mut u64) -> u64 {
        *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    #[test]
    fn round_f16_matches_half_everywhere() {
        let special = [
            0.0f32,
            -0.0,
            1.0,
            65504.0,
            65519.99,
            65520.0,
            -65520.0,
            1e-8,
            2.98e-8,
            2.9802322e-8,
            5.96e-8,
            6.1e-5,
            6.103_515_6e-5,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MAX,
            f32::MIN_POSITIVE,
            1.0 + 1.0 / 2048.0,
            1.0 + 3.0 / 2048.0,
        ];
        let mut state = 7u64;
        let random: Vec<f32> = (0..2_000_000).map(|_| f32::from_bits(splitmix(&mut state) as u32)).collect();
        // Values spread over the fp16 range, where rounding decisions happen.
        let ranged = (0..2_000_000).map(|i| {
            let e = (i % 40) - 28;
            (1.0 + (splitmix(&mut state) % 8_388_608) as f32 / 8_388_608.0) * 2f32.powi(e)
        });
        let ranged: Vec<f32> = ranged.collect();
        for x in special.into_iter().chain(random).chain(ranged) {
            let want = f16::from_f32(x).to_f32();
            let got = round_f16(x);
            if want.is_nan() {
                assert!(got.is_nan(), "{x:e}");
            } else {
                assert_eq!(got.to_bits(), want.to_bits(), "round_f16({x:e} = {:#x})", x.to_bits());
            }
        }
    }

    #[test]
    fn exp_is_within_two_ulp_of_f64() {
        let mut x = -103.0f32;
        while x < 88.7 {
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            let ulp = if want >= f32::MIN_POSITIVE as f64 {
                2f64.powi((want.log2().floor() as i32) - 23)
            } else {
                2f64.powi(-149)
            };
            assert!((got - want).abs() <= 2.0 * ulp, "exp({x}) = {got}, want {want}");
            x += 0.0137;
        }
        assert_eq!(exp(89.0), f32::INFINITY);
        assert_eq!(exp(-200.0), 0.0);
        assert!(exp(f32::NAN).is_nan());
        assert_eq!(exp(0.0), 1.0);
    }
}
