//! AdamW against an f64 re-implementation of PyTorch's update written here, the schedule
//! at known points, clipping, and the loss scaler's state machine.

// Lists of one decay range (`vec![0..2]`) are exactly what is meant here.
#![allow(clippy::single_range_in_vec_init)]

use train::optim::*;

/// PyTorch `torch.optim.AdamW` (non-AMSGrad), written out in f64, one step.
#[allow(clippy::too_many_arguments)]
fn adamw_reference(
    p: &mut [f64],
    g: &[f64],
    m: &mut [f64],
    v: &mut [f64],
    step: u64,
    lr: f64,
    decay: &[bool],
    cfg: AdamWConfig,
) {
    let (b1, b2, eps, wd) = (cfg.beta1, cfg.beta2, cfg.eps, cfg.weight_decay);
    for i in 0..p.len() {
        if decay[i] {
            p[i] *= 1.0 - lr * wd;
        }
        m[i] = b1 * m[i] + (1.0 - b1) * g[i];
        v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
        let m_hat = m[i] / (1.0 - b1.powi(step as i32));
        let v_hat = v[i] / (1.0 - b2.powi(step as i32));
        p[i] -= lr * m_hat / (v_hat.sqrt() + eps);
    }
}

#[test]
fn adamw_matches_reference_over_several_steps_with_decay_mask() {
    let cfg = AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
    let n = 10;
    // Decayed: 1..4 and 6..9; undecayed gaps 0, 4..6, 9.
    let decay_ranges = vec![1..4, 6..9];
    let decay: Vec<bool> = (0..n).map(|i| (1..4).contains(&i) || (6..9).contains(&i)).collect();
    let mut adam = AdamW::new(cfg, n, decay_ranges).unwrap();
    let mut params: Vec<f32> = (0..n).map(|i| 0.5 - 0.1 * i as f32).collect();
    let mut p64: Vec<f64> = params.iter().map(|&p| p as f64).collect();
    let (mut m64, mut v64) = (vec![0.0; n], vec![0.0; n]);
    for step in 1..=5u64 {
        let grads: Vec<f32> = (0..n).map(|i| ((i as f32 + 1.0) * (step as f32) * 0.37).sin()).collect();
        let lr = 0.01 * step as f32;
        adam.update(&mut params, &grads, lr, 1.0);
        let g64: Vec<f64> = grads.iter().map(|&g| g as f64).collect();
        adamw_reference(&mut p64, &g64, &mut m64, &mut v64, step, lr as f64, &decay, cfg);
        for i in 0..n {
            assert!((params[i] as f64 - p64[i]).abs() < 1e-6, "step {step} param {i}: {} vs {}", params[i], p64[i]);
        }
    }
    assert_eq!(adam.step, 5);
}

#[test]
fn adamw_first_step_by_hand() {
    // At step 1 the bias-corrected moments are g and g², so the update is
    // lr·g/(|g| + ε) ≈ lr·sign(g); the decayed parameter first shrinks by 1 − lr·wd.
    let cfg = AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.5 };
    let mut adam = AdamW::new(cfg, 2, vec![0..1]).unwrap();
    let mut params = [2.0f32, 2.0];
    adam.update(&mut params, &[0.25, -4.0], 0.1, 1.0);
    // decayed: 2·(1 − 0.05) − 0.1 = 1.8; undecayed: 2 + 0.1 = 2.1
    assert!((params[0] - 1.8).abs() < 1e-6, "{}", params[0]);
    assert!((params[1] - 2.1).abs() < 1e-6, "{}", params[1]);
    assert!((adam.m[1] - -0.4).abs() < 1e-7 && (adam.v[1] - 0.016).abs() < 1e-7);
}

#[test]
fn adamw_grad_scale_is_the_same_as_scaling_the_gradients() {
    let cfg = AdamWConfig::default();
    let grads = [1024.0f32, -512.0, 3.0];
    let mut a = AdamW::new(cfg, 3, vec![0..2]).unwrap();
    let mut b = a.clone();
    let (mut pa, mut pb) = ([1.0f32, 2.0, 3.0], [1.0f32, 2.0, 3.0]);
    a.update(&mut pa, &grads, 1e-2, 1.0 / 1024.0);
    b.update(&mut pb, &grads.map(|g| g / 1024.0), 1e-2, 1.0);
    assert_eq!(pa, pb);
    assert_eq!(a, b);
}

#[test]
fn adamw_state_round_trips_through_json_and_resumes_identically() {
    let cfg = AdamWConfig::default();
    let grads = |s: u32| -> Vec<f32> { (0..6).map(|i| ((i * 7 + s) as f32).cos()).collect() };
    let mut straight = AdamW::new(cfg, 6, vec![0..3]).unwrap();
    let mut p_straight = vec![0.3f32; 6];
    for s in 0..4 {
        straight.update(&mut p_straight, &grads(s), 1e-3, 1.0);
    }
    let mut first = AdamW::new(cfg, 6, vec![0..3]).unwrap();
    let mut p = vec![0.3f32; 6];
    for s in 0..2 {
        first.update(&mut p, &grads(s), 1e-3, 1.0);
    }
    let json = serde_json::to_string(&first).unwrap();
    let mut resumed: AdamW = serde_json::from_str(&json).unwrap();
    resumed.check().unwrap();
    assert_eq!(resumed, first);
    for s in 2..4 {
        resumed.update(&mut p, &grads(s), 1e-3, 1.0);
    }
    assert_eq!(p, p_straight);
    assert_eq!(resumed, straight);
}

#[test]
fn adamw_rejects_bad_decay_ranges_and_state() {
    let cfg = AdamWConfig::default();
    assert_eq!(
        AdamW::new(cfg, 4, vec![2..5]).unwrap_err(),
        OptimError::DecayRangeOutOfBounds { start: 2, end: 5, n_params: 4 }
    );
    assert_eq!(
        AdamW::new(cfg, 8, vec![0..4, 3..6]).unwrap_err(),
        OptimError::DecayRangesOverlap { first: 0..4, second: 3..6 }
    );
    let mut adam = AdamW::new(cfg, 4, vec![]).unwrap();
    adam.v.pop();
    let err = adam.check().unwrap_err();
    assert_eq!(err, OptimError::StateLength { what: "v", found: 3, expected: 4 });
    assert!(err.to_string().contains("`v` holds 3 values, expected 4"), "{err}");
}

#[test]
fn schedule_warms_up_linearly_then_decays_by_cosine() {
    let s = LrSchedule { max_lr: 1e-3, min_lr: 1e-4, warmup_steps: 100, total_steps: 1100 };
    let close = |a: f32, b: f64| (a as f64 - b).abs() < 1e-9;
    assert_eq!(s.lr(0), 0.0);
    assert!(close(s.lr(50), 5e-4));
    assert!(close(s.lr(100), 1e-3));
    // Halfway through the decay, cos(π/2) = 0: the midpoint of max and min.
    assert!(close(s.lr(600), 5.5e-4));
    // A quarter of the way: min + (1 + cos(π/4))/2 · (max − min).
    let quarter = 1e-4 + 0.5 * (1.0 + std::f64::consts::FRAC_PI_4.cos()) * 9e-4;
    assert!(close(s.lr(350), quarter), "{} vs {quarter}", s.lr(350));
    assert_eq!(s.lr(1100), 1e-4);
    assert_eq!(s.lr(5000), 1e-4);
    // No warmup and no decay span must not divide by zero.
    let flat = LrSchedule { max_lr: 1.0, min_lr: 0.5, warmup_steps: 0, total_steps: 0 };
    assert_eq!(flat.lr(0), 0.5);
}

#[test]
fn clipping_scales_to_max_norm_and_zero_disables() {
    let mut g = vec![3.0f32, 4.0];
    let norm = clip_grad_norm(&mut g, 1.0);
    assert_eq!(norm, 5.0);
    assert!((g[0] - 0.6).abs() < 1e-6 && (g[1] - 0.8).abs() < 1e-6, "{g:?}");

    let mut g = vec![3.0f32, 4.0];
    assert_eq!(clip_grad_norm(&mut g, 0.0), 5.0);
    assert_eq!(g, [3.0, 4.0]);
    assert_eq!(clip_grad_norm(&mut g, 10.0), 5.0);
    assert_eq!(g, [3.0, 4.0]);
    assert_eq!(clip_factor(5.0, 10.0), 1.0);
}

#[test]
fn grad_norm_is_finite_unless_a_gradient_is_not() {
    // 1e30² overflows f32 but not the f64 sum.
    let big = vec![1e30f32; 1000];
    let norm = grad_norm(&big);
    assert!((norm as f64 / (1e30 * 1000f64.sqrt()) - 1.0).abs() < 1e-6);
    let mut g = vec![0.1f32; 100_000];
    assert!((grad_norm(&g) as f64 - (0.01f64 * 100_000.0).sqrt()).abs() < 1e-4);
    g[77_777] = f32::INFINITY;
    assert!(!grad_norm(&g).is_finite());
    g[77_777] = f32::NAN;
    assert!(!grad_norm(&g).is_finite());
}

#[test]
fn loss_scaler_halves_on_overflow_and_doubles_after_the_interval() {
    let mut s = LossScaler::new(1024.0, 3);
    assert!(s.update(true));
    assert!(s.update(true));
    assert!(!s.update(false), "an overflow must skip the step");
    assert_eq!(s.scale, 512.0);
    assert_eq!(s.good_steps, 0, "an overflow restarts the count");
    assert!(s.update(true) && s.update(true));
    assert_eq!(s.scale, 512.0);
    assert!(s.update(true));
    assert_eq!(s.scale, 1024.0, "three good steps in a row double the scale");
    assert_eq!(s.skipped_steps, 1);

    let json = serde_json::to_string(&s).unwrap();
    assert_eq!(serde_json::from_str::<LossScaler>(&json).unwrap(), s);

    let mut capped = LossScaler::new(MAX_LOSS_SCALE, 1);
    capped.update(true);
    assert_eq!(capped.scale, MAX_LOSS_SCALE);

    let mut off = LossScaler::disabled();
    assert!(!off.update(false));
    for _ in 0..10 {
        assert!(off.update(true));
    }
    assert_eq!(off.scale, 1.0);
}

#[test]
fn step_with_scaling_unscales_clips_and_skips_overflow() {
    let cfg = AdamWConfig::default();
    let grads = [0.3f32, -0.4];
    // Reference: unscaled gradients, clipped by hand to norm 0.1.
    let mut reference = AdamW::new(cfg, 2, vec![0..2]).unwrap();
    let mut p_ref = [1.0f32, 1.0];
    let factor = 0.1 / (0.5 + 1e-6);
    reference.update(&mut p_ref, &grads.map(|g| g * factor), 0.01, 1.0);

    let mut adam = AdamW::new(cfg, 2, vec![0..2]).unwrap();
    let mut scaler = LossScaler::new(4096.0, 2000);
    let mut p = [1.0f32, 1.0];
    let scaled = grads.map(|g| g * 4096.0);
    let outcome = step_with_scaling(&mut adam, &mut scaler, &mut p, &scaled, 0.01, 0.1);
    assert!(outcome.applied);
    assert!((outcome.grad_norm - 0.5).abs() < 1e-6);
    for i in 0..2 {
        assert!((p[i] - p_ref[i]).abs() < 1e-7, "{p:?} vs {p_ref:?}");
    }

    let before = p;
    let outcome = step_with_scaling(&mut adam, &mut scaler, &mut p, &[f32::INFINITY, 0.0], 0.01, 0.1);
    assert!(!outcome.applied);
    assert_eq!(p, before, "a skipped step leaves the parameters alone");
    assert_eq!(adam.step, 1, "a skipped step leaves the optimizer state alone");
    assert_eq!(outcome.next_scale, 2048.0);
}
