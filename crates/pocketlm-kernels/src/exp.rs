//! `e^x` for the SiLU and softmax loops on AArch64. `wide`'s eight-lane `exp` goes lane by
//! lane there (about 20 instructions a value in SmolLM2's SiLU, counted under qemu); this one
//! works on four-lane NEON registers: `x = n·ln 2 + r` with `|r| ≤ ln 2 / 2`, `e^r` by its
//! Taylor series to `r⁷` (truncation below 6e-9 relative), `2ⁿ` built in the exponent bits.

#[cfg(target_arch = "aarch64")]
pub(crate) mod neon {
    use std::arch::aarch64::*;

    /// ln 2 split so that `n · LN2_HI` is exact for |n| < 2¹⁰ (its low 12 bits are zero).
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    /// Below this `e^x` is under f32's smallest normal and comes back as 0; above the top it
    /// would overflow (`2ⁿ` with n = 128), so `x` is clamped there.
    const LOWEST: f32 = -87.33;
    const HIGHEST: f32 = 88.37;

    /// `e^x` per lane: within 1e-7 relative of the true value (7.6e-8 measured) for x in
    /// [-87.33, 88.37], 0 below (−∞ included), `e^88.37` above; NaN stays NaN.
    #[inline]
    #[target_feature(enable = "neon")]
    pub fn exp(x: float32x4_t) -> float32x4_t {
        let under = vcltq_f32(x, vdupq_n_f32(LOWEST));
        let x = vminq_f32(vmaxq_f32(x, vdupq_n_f32(LOWEST)), vdupq_n_f32(HIGHEST));
        let n = vrndnq_f32(vmulq_n_f32(x, std::f32::consts::LOG2_E));
        let r = vfmsq_n_f32(vfmsq_n_f32(x, n, LN2_HI), n, LN2_LO);
        let mut p = vdupq_n_f32(1.0 / 5040.0);
        for c in [
            1.0 / 720.0,
            1.0 / 120.0,
            1.0 / 24.0,
            1.0 / 6.0,
            0.5,
            1.0,
            1.0,
        ] {
            p = vfmaq_f32(vdupq_n_f32(c), p, r);
        }
        let two_n = vreinterpretq_f32_s32(vshlq_n_s32::<23>(vaddq_s32(
            vcvtq_s32_f32(n),
            vdupq_n_s32(127),
        )));
        vbslq_f32(under, vdupq_n_f32(0.0), vmulq_f32(p, two_n))
    }

    /// `gate = silu(gate) · up`, four values at a time (the tail by the scalar reference).
    #[target_feature(enable = "neon")]
    pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
        let (gc, gt) = gate.as_chunks_mut::<4>();
        let (uc, ut) = up.as_chunks::<4>();
        let one = vdupq_n_f32(1.0);
        for (g, u) in gc.iter_mut().zip(uc) {
            // SAFETY: four floats each.
            unsafe {
                let v = vld1q_f32(g.as_ptr());
                let silu = vdivq_f32(v, vaddq_f32(one, exp(vnegq_f32(v))));
                vst1q_f32(g.as_mut_ptr(), vmulq_f32(silu, vld1q_f32(u.as_ptr())));
            }
        }
        crate::silu_mul_scalar(gt, ut);
    }

    /// `x[i] = e^(x[i] - max)` for every value; returns their sum.
    #[target_feature(enable = "neon")]
    pub fn exp_shifted(x: &mut [f32], max: f32) -> f32 {
        let (chunks, tail) = x.as_chunks_mut::<4>();
        let m = vdupq_n_f32(max);
        let mut acc = vdupq_n_f32(0.0);
        for c in chunks {
            // SAFETY: four floats.
            unsafe {
                let e = exp(vsubq_f32(vld1q_f32(c.as_ptr()), m));
                acc = vaddq_f32(acc, e);
                vst1q_f32(c.as_mut_ptr(), e);
            }
        }
        crate::exp_shifted_scalar(tail, max, vaddvq_f32(acc))
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn exp4(v: [f32; 4]) -> [f32; 4] {
            let mut out = [0.0; 4];
            // SAFETY: four floats each; NEON is baseline on AArch64.
            unsafe { vst1q_f32(out.as_mut_ptr(), exp(vld1q_f32(v.as_ptr()))) };
            out
        }

        #[test]
        fn exp_is_within_one_ten_millionth_over_its_range() {
            let mut worst = 0.0f64;
            let n = 200_000;
            for i in 0..n {
                let x = LOWEST + (HIGHEST - LOWEST) * i as f32 / n as f32;
                let got = exp4([x; 4])[0] as f64;
                let want = (x as f64).exp();
                worst = worst.max(((got - want) / want).abs());
            }
            assert!(worst < 1e-7, "worst relative error {worst}");
        }

        #[test]
        fn exp_edges() {
            let got = exp4([0.0, f32::NEG_INFINITY, -100.0, 200.0]);
            assert_eq!(got[0], 1.0);
            assert_eq!(got[1], 0.0);
            assert_eq!(got[2], 0.0);
            assert!(got[3].is_finite() && got[3] > 2e38);
            assert!(exp4([f32::NAN; 4])[0].is_nan());
        }
    }
}
