//! The planner's candidates: one block's recipe (an encoding, per-matrix exceptions,
//! pruning, low rank), its written form and its parser.

use std::fmt;
use std::str::FromStr;

use crate::lowrank::LowRankOptionError;
use crate::prune::PruneOptionError;
use crate::{
    KeepRule, LowRank, LowRankMethod, PruneMethod, Pruning, RankAllocation, RankTarget, Sparsity,
};
use pocketlm_format::Encoding;

/// What one block gets: the encoding of its matrices (some may differ), and optionally
/// pruning and low rank. Written
/// `ENCODING[~MATRIX=ENCODING...][+SPARSITY[/METHOD]][+lrPERCENT%[/METHOD[/ALLOCATION]]]`,
/// e.g. `q4/g32`, `q4/g32~v=q8/g32~down=q8/g32`, `f16+2:4/sparsegpt`,
/// `q4/g32+lr20%/svdllm/energy`; MATRIX is one of q, k, v, o, gate, up, down.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockRecipe {
    pub weights: Encoding,
    /// Encodings of single matrices, indexed as [`MATRICES`].
    pub matrices: [Option<Encoding>; 7],
    pub pruning: Option<Pruning>,
    pub lowrank: Option<LowRank>,
}

/// Why a block recipe (or a list of them) did not parse; `recipe` is the recipe as given.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum RecipeError {
    /// An encoding that does not parse.
    #[error("'{recipe}': {source}")]
    Encoding {
        recipe: String,
        source: pocketlm_format::EncodingError,
    },
    /// An encoding the converter picks itself (f16 2:4).
    #[error("'{recipe}': {encoding} is chosen by the converter, not requested (use f16+2:4)")]
    NotRequestable { recipe: String, encoding: Encoding },
    #[error("'{recipe}': expected ~MATRIX=ENCODING, got '~{part}'")]
    MatrixSyntax { recipe: String, part: String },
    #[error("'{recipe}': unknown matrix '{matrix}' (q, k, v, o, gate, up, down)")]
    UnknownMatrix { recipe: String, matrix: String },
    /// A matrix, the low rank or the pruning given twice.
    #[error("'{recipe}': {what} given twice")]
    Repeated { recipe: String, what: &'static str },
    #[error("'{recipe}': low rank is written lrP% (e.g. lr20%), got '{part}'")]
    LowRankSyntax { recipe: String, part: String },
    #[error("'{recipe}': {source}")]
    LowRank {
        recipe: String,
        #[source]
        source: LowRankOptionError,
    },
    #[error("'{recipe}': a candidate is one block's recipe; use uniform or energy allocation")]
    GlobalAllocation { recipe: String },
    #[error("'{recipe}': {source}")]
    Pruning {
        recipe: String,
        #[source]
        source: PruneOptionError,
    },
    #[error("'{recipe}': unexpected '/{field}'")]
    UnexpectedField { recipe: String, field: String },
    #[error("no candidate recipes given")]
    NoCandidates,
}

/// Short names of a block's matrices in recipes, and their tensor names.
pub const MATRICES: [(&str, &str); 7] = [
    ("q", "attn_q"),
    ("k", "attn_k"),
    ("v", "attn_v"),
    ("o", "attn_output"),
    ("gate", "ffn_gate"),
    ("up", "ffn_up"),
    ("down", "ffn_down"),
];

impl BlockRecipe {
    /// Every matrix in `weights`.
    pub fn uniform(weights: Encoding) -> BlockRecipe {
        BlockRecipe {
            weights,
            matrices: [None; 7],
            pruning: None,
            lowrank: None,
        }
    }

    /// The per-matrix encodings as `keep` rules for one block's options (patterns that
    /// also match a matrix's low-rank factors).
    pub fn keep_rules(&self) -> Vec<KeepRule> {
        MATRICES
            .iter()
            .zip(&self.matrices)
            .filter_map(|((_, tensor), e)| {
                e.map(|encoding| KeepRule {
                    pattern: format!("*.{tensor}.weight*"),
                    encoding,
                })
            })
            .collect()
    }
}

impl fmt::Display for BlockRecipe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.weights.describe())?;
        for ((short, _), e) in MATRICES.iter().zip(&self.matrices) {
            if let Some(e) = e {
                write!(f, "~{short}={}", e.describe())?;
            }
        }
        if let Some(p) = self.pruning {
            write!(f, "+{}/{}", p.sparsity.describe(), p.method.name())?;
        }
        if let Some(l) = self.lowrank {
            match l.target {
                RankTarget::Ratio(r) => write!(
                    f,
                    "+lr{}%/{}/{}",
                    r * 100.0,
                    l.method.name(),
                    l.allocation.name()
                )?,
                RankTarget::Rank(r) => write!(f, "+rank{r}/{}", l.method.name())?,
            }
        }
        Ok(())
    }
}

impl FromStr for BlockRecipe {
    type Err = RecipeError;

    /// Pruning defaults to SparseGPT and low rank to SVD-LLM with energy allocation (the
    /// best of each measured on SmolLM2; see BENCHMARKS.md).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let recipe_text = || s.to_string();
        let requestable = |encoding: &str| -> Result<Encoding, RecipeError> {
            let e: Encoding = encoding.parse().map_err(|source| RecipeError::Encoding {
                recipe: recipe_text(),
                source,
            })?;
            if e.is_dense() || e.is_quantized() {
                Ok(e)
            } else {
                Err(RecipeError::NotRequestable {
                    recipe: recipe_text(),
                    encoding: e,
                })
            }
        };
        let mut parts = s.trim().split('+');
        let mut encodings = parts.next().unwrap_or_default().split('~');
        let weights = requestable(encodings.next().unwrap_or_default())?;
        let mut recipe = BlockRecipe::uniform(weights);
        for part in encodings {
            let (short, encoding) =
                part.split_once('=')
                    .ok_or_else(|| RecipeError::MatrixSyntax {
                        recipe: recipe_text(),
                        part: part.to_string(),
                    })?;
            let i = MATRICES
                .iter()
                .position(|(name, _)| *name == short.trim())
                .ok_or_else(|| RecipeError::UnknownMatrix {
                    recipe: recipe_text(),
                    matrix: short.to_string(),
                })?;
            if recipe.matrices[i].is_some() {
                return Err(RecipeError::Repeated {
                    recipe: recipe_text(),
                    what: MATRICES[i].0,
                });
            }
            recipe.matrices[i] = Some(requestable(encoding)?);
        }
        for part in parts {
            let mut fields = part.trim().split('/');
            let head = fields.next().unwrap_or_default().trim();
            if let Some(percent) = head.strip_prefix("lr") {
                let low_rank = |source| RecipeError::LowRank {
                    recipe: recipe_text(),
                    source,
                };
                let ratio = percent
                    .strip_suffix('%')
                    .and_then(|p| p.trim().parse::<f64>().ok())
                    .ok_or_else(|| RecipeError::LowRankSyntax {
                        recipe: recipe_text(),
                        part: head.to_string(),
                    })?
                    / 100.0;
                let target = RankTarget::Ratio(ratio);
                target.validate().map_err(low_rank)?;
                let method = fields
                    .next()
                    .map_or(Ok(LowRankMethod::SvdLlm), str::parse)
                    .map_err(low_rank)?;
                let allocation = fields
                    .next()
                    .map_or(Ok(RankAllocation::Energy), str::parse)
                    .map_err(low_rank)?;
                if allocation == RankAllocation::Global {
                    return Err(RecipeError::GlobalAllocation {
                        recipe: recipe_text(),
                    });
                }
                if recipe.lowrank.is_some() {
                    return Err(RecipeError::Repeated {
                        recipe: recipe_text(),
                        what: "low rank",
                    });
                }
                recipe.lowrank = Some(LowRank {
                    method,
                    target,
                    allocation,
                });
            } else {
                let pruning = |source| RecipeError::Pruning {
                    recipe: recipe_text(),
                    source,
                };
                let sparsity: Sparsity = head.parse().map_err(pruning)?;
                let method = fields
                    .next()
                    .map_or(Ok(PruneMethod::SparseGpt), str::parse)
                    .map_err(pruning)?;
                if recipe.pruning.is_some() {
                    return Err(RecipeError::Repeated {
                        recipe: recipe_text(),
                        what: "pruning",
                    });
                }
                recipe.pruning = Some(Pruning { method, sparsity });
            }
            if let Some(extra) = fields.next() {
                return Err(RecipeError::UnexpectedField {
                    recipe: recipe_text(),
                    field: extra.to_string(),
                });
            }
        }
        Ok(recipe)
    }
}

/// The candidates tried when none are given: quantized grids that trade size for accuracy in
/// small steps (8.5, 4.5, 4.25 and 3.25 bits per weight), and mixes that keep the two matrices
/// most sensitive to quantization (`attn_v`, `ffn_down`, as llama.cpp's K-quant mixes do)
/// one step finer. Groups of 32 and 64 divide the row lengths of most models.
pub const DEFAULT_CANDIDATES: &str =
    "q8/g32,q4/g32~v=q8/g32~down=q8/g32,q4/g32,q4/g64,q3/g64~v=q4/g32~down=q4/g32,q3/g64";

/// Parses a comma-separated list of recipes.
pub fn parse_candidates(list: &str) -> Result<Vec<BlockRecipe>, RecipeError> {
    let candidates = list
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(str::parse)
        .collect::<Result<Vec<BlockRecipe>, RecipeError>>()?;
    if candidates.is_empty() {
        return Err(RecipeError::NoCandidates);
    }
    Ok(candidates)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recipes_round_trip_and_reject_nonsense() {
        for s in [
            "q4/g32",
            "q8/g32",
            "f16+2:4/sparsegpt",
            "q4/g128+50%/wanda",
            "q4/g32+lr20%/svdllm/energy",
            "f16+2:4/magnitude+lr10%/asvd/uniform",
            "q4/g32~v=q8/g32~down=q8/g32",
            "q3/g64~q=q4/g32+2:4/wanda",
        ] {
            let r: BlockRecipe = s.parse().unwrap();
            assert_eq!(r.to_string(), s);
        }
        let r: BlockRecipe = "q3/g64+2:4".parse().unwrap();
        assert_eq!(r.to_string(), "q3/g64+2:4/sparsegpt");
        for bad in [
            "",
            "q5",
            "f16+2:4+1:4",
            "q4+lr20",
            "q4+lr120%",
            "q4+2:4/fast",
            "q4+2:4/wanda/x",
            "f16+2:4+lr10%+lr20%",
            "q4~x=q8",
            "q4~v=q8~v=q8",
            "q4~v",
            "q4~v=q9",
            "q4~=q8",
        ] {
            assert!(bad.parse::<BlockRecipe>().is_err(), "{bad}");
        }
        // Errors name the recipe, including those of the parts' own parsers.
        let err = "q4+2:4/fast".parse::<BlockRecipe>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "'q4+2:4/fast': unknown pruning method 'fast' (expected magnitude, wanda or sparsegpt)"
        );
        let err = "q4+lr120%".parse::<BlockRecipe>().unwrap_err();
        assert!(
            matches!(
                err,
                RecipeError::LowRank {
                    source: LowRankOptionError::Ratio { .. },
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().starts_with("'q4+lr120%': "), "{err}");
        let err = "q4~v=q8~v=q8".parse::<BlockRecipe>().unwrap_err();
        assert_eq!(err.to_string(), "'q4~v=q8~v=q8': v given twice");
        assert_eq!(parse_candidates(DEFAULT_CANDIDATES).unwrap().len(), 6);
        assert!(parse_candidates(" , ").is_err());
    }
}
