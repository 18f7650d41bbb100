//! Named presets: the best measured recipe for each size, chosen by a name as llama-quantize's
//! types are (`q8`, `q4`, `q3`), so a user need not know the methods. BENCHMARKS.md
//! ("Compression presets") has the measurements each choice rests on.

use std::str::FromStr;

use pocketlm_format::Encoding;

use crate::{ConvertOptions, KeepRule, Method, RecoverMode, Recovery};

/// A named recipe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preset {
    /// 8-bit groups of 32, round to nearest: indistinguishable from f16 on every model
    /// measured; no calibration.
    Q8,
    /// 4-bit groups of 32 with incoherence processing and GPTQ (calibrated).
    Q4,
    /// 3-bit groups of 64 on the non-uniform grid (q3nl) with incoherence processing and
    /// GPTQ, `attn_v` and `ffn_down` in 4-bit groups of 32 (as llama.cpp's Q3_K_M spends more
    /// bits there), then distillation of the grids' scales and the norms over
    /// [`Q3_DISTILL_SAMPLES`] calibration sequences it has not seen (the grid measured 32.77
    /// against uniform q3's 33.41 on SmolLM2; distillation took it from 33.03 to 30.42).
    Q3,
}

/// Calibration sequences `q3`'s distillation makes one pass over: 64 steps of 4. Seen once,
/// they keep it from overfitting the few the quantizer calibrates on.
pub const Q3_DISTILL_SAMPLES: usize = 256;

impl Preset {
    pub const ALL: [Preset; 3] = [Preset::Q8, Preset::Q4, Preset::Q3];

    pub fn name(self) -> &'static str {
        match self {
            Preset::Q8 => "q8",
            Preset::Q4 => "q4",
            Preset::Q3 => "q3",
        }
    }

    /// The conversion options of this preset, without calibration text (the caller adds it
    /// when [`ConvertOptions::needs_calibration`] says so).
    pub fn options(self) -> ConvertOptions {
        let mut options = match self {
            Preset::Q8 => ConvertOptions::with_weights(Encoding::Q8 { group: 32 }),
            Preset::Q4 => ConvertOptions {
                method: Method::Gptq,
                rotate: true,
                ..ConvertOptions::with_weights(Encoding::Q4 {
                    group: 32,
                    asymmetric: false,
                })
            },
            Preset::Q3 => {
                let q4 = Encoding::Q4 {
                    group: 32,
                    asymmetric: false,
                };
                ConvertOptions {
                    method: Method::Gptq,
                    rotate: true,
                    keep: ["*attn_v*", "*ffn_down*"]
                        .into_iter()
                        .map(|pattern| KeepRule {
                            pattern: pattern.into(),
                            encoding: q4,
                        })
                        .collect(),
                    recover: Some(Recovery {
                        mode: RecoverMode::Distill,
                        samples: Some(Q3_DISTILL_SAMPLES),
                        ..Recovery::default()
                    }),
                    ..ConvertOptions::with_weights(Encoding::Q3Grid { group: 64 })
                }
            }
        };
        options.preset = Some(self);
        options
    }
}

impl std::fmt::Display for Preset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A preset name that is not one of [`Preset`]'s.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum UnknownPreset {
    #[error(
        "no 2-bit preset yet: the 2-bit grids this converter has lose too much on small models \
         (the smallest preset is q3)"
    )]
    TwoBit,
    #[error("unknown preset '{name}' (expected q8, q4 or q3)")]
    Other { name: String },
}

impl FromStr for Preset {
    type Err = UnknownPreset;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "q8" => Ok(Preset::Q8),
            "q4" => Ok(Preset::Q4),
            "q3" => Ok(Preset::Q3),
            "q2" => Err(UnknownPreset::TwoBit),
            other => Err(UnknownPreset::Other {
                name: other.to_string(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_parse_print_and_say_what_they_are() {
        for preset in Preset::ALL {
            assert_eq!(preset.name().parse::<Preset>().unwrap(), preset);
            assert_eq!(preset.options().preset, Some(preset));
            let mut options = preset.options();
            options.calibration = Some(crate::Calibration {
                text: "calibration text".into(),
                source: "test".into(),
                samples: 1,
                seq_len: 8,
            });
            match options.validate() {
                // A build without the `recover` feature (the ARM test build) refuses the
                // q3 preset's distillation rather than dropping it.
                Err(crate::Refusal::Recovery(crate::recover::RecoveryOptionError::Unavailable))
                    if !crate::Recovery::AVAILABLE && options.recover.is_some() => {}
                other => other.unwrap(),
            }
        }
        assert!(!Preset::Q8.options().needs_calibration());
        assert!(Preset::Q4.options().needs_calibration());
        let q3 = Preset::Q3.options();
        assert_eq!(q3.weights, Encoding::Q3Grid { group: 64 });
        assert!(q3.rotate);
        let kd = q3.recover.unwrap();
        assert_eq!(
            (kd.mode, kd.codes, kd.samples),
            (RecoverMode::Distill, false, Some(Q3_DISTILL_SAMPLES))
        );
        assert!(Preset::Q4.options().recover.is_none());
        assert_eq!(
            q3.encoding_for("blk.3.ffn_down.weight", &[4, 4]),
            Encoding::Q4 {
                group: 32,
                asymmetric: false
            }
        );
        assert_eq!("q2".parse::<Preset>().unwrap_err(), UnknownPreset::TwoBit);
        assert!(
            "q5".parse::<Preset>()
                .unwrap_err()
                .to_string()
                .contains("q8, q4 or q3")
        );
    }
}
