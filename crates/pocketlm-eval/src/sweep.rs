//! `eval sweep`: many compressed files of one model measured alike (file size, bits per
//! weight, perplexity, optionally decode speed), beside reference points measured elsewhere
//! (llama.cpp's quant types), with the size–perplexity Pareto front marked and drawn as SVG.

use std::path::Path;
use std::str::FromStr;

use plotters::prelude::*;

use super::bench::{BenchOptions, bench};
use super::report::summarize;
use super::{EvalError, PerplexityOptions, perplexity};
use pocketlm_format::SizeError;
use pocketlm_runtime::model::Model;

/// One point of the sweep.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SweepPoint {
    pub name: String,
    /// Measured here from a .plm file, or given by the caller.
    pub reference: bool,
    pub file_bytes: u64,
    /// Of all stored tensors (as `inspect`); unknown for references.
    pub bits_per_weight: Option<f64>,
    pub ppl: f64,
    pub decode_tokens_per_s: Option<f64>,
    pub prefill_tokens_per_s: Option<f64>,
    /// No other point is both smaller (or as small) and better (or as good).
    pub pareto: bool,
}

/// Why a reference point (`NAME=SIZE:PPL[:DECODE_TOK_S]`) did not parse; `point` is the
/// text given.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum SweepPointError {
    #[error("'{point}': expected NAME=SIZE:PPL[:DECODE_TOK_S]")]
    Syntax { point: String },
    /// A perplexity or speed that is not a positive number.
    #[error("'{point}': bad {what} '{value}'")]
    BadNumber {
        point: String,
        what: &'static str,
        value: String,
    },
    #[error("'{point}': {source}")]
    Size {
        point: String,
        #[source]
        source: SizeError,
    },
}

impl FromStr for SweepPoint {
    type Err = SweepPointError;

    /// `NAME=SIZE:PPL[:DECODE_TOK_S]`, e.g. `Q4_K_M=105.5MB:28.336:80.1`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let syntax = || SweepPointError::Syntax {
            point: s.to_string(),
        };
        let (name, values) = s.rsplit_once('=').ok_or_else(syntax)?;
        let fields: Vec<&str> = values.split(':').collect();
        if !(2..=3).contains(&fields.len()) || name.trim().is_empty() {
            return Err(syntax());
        }
        let number = |f: &str, what: &'static str| -> Result<f64, SweepPointError> {
            f.trim()
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite() && *v > 0.0)
                .ok_or_else(|| SweepPointError::BadNumber {
                    point: s.to_string(),
                    what,
                    value: f.to_string(),
                })
        };
        Ok(SweepPoint {
            name: name.trim().to_string(),
            reference: true,
            file_bytes: pocketlm_format::parse_size(fields[0]).map_err(|source| {
                SweepPointError::Size {
                    point: s.to_string(),
                    source,
                }
            })?,
            bits_per_weight: None,
            ppl: number(fields[1], "perplexity")?,
            decode_tokens_per_s: fields.get(2).map(|f| number(f, "speed")).transpose()?,
            prefill_tokens_per_s: None,
            pareto: false,
        })
    }
}

/// Measures one file: size and bits per weight from its tensor table, perplexity on `text`,
/// and speed when `speed` is given.
pub fn measure_file(
    path: &Path,
    model: &Model,
    text: &str,
    options: &PerplexityOptions,
    speed: Option<&BenchOptions>,
) -> Result<SweepPoint, EvalError> {
    let summary = summarize(model, options.context);
    let ppl = perplexity(model, text, options, |_, _, _| {})?.ppl;
    let speed = speed.map(|o| bench(model, o)).transpose()?;
    Ok(SweepPoint {
        name: path.file_stem().map_or_else(
            || path.display().to_string(),
            |s| s.to_string_lossy().into(),
        ),
        reference: false,
        file_bytes: summary.file_bytes,
        bits_per_weight: Some(summary.bits_per_weight),
        ppl,
        decode_tokens_per_s: speed.as_ref().map(|s| s.decode_tokens_per_s),
        prefill_tokens_per_s: speed.as_ref().map(|s| s.prefill_tokens_per_s),
        pareto: false,
    })
}

/// Marks the size–perplexity Pareto front and sorts the points by size.
pub fn mark_pareto(points: &mut [SweepPoint]) {
    points.sort_by(|a, b| {
        a.file_bytes
            .cmp(&b.file_bytes)
            .then(a.ppl.total_cmp(&b.ppl))
    });
    let snapshot: Vec<(u64, f64)> = points.iter().map(|p| (p.file_bytes, p.ppl)).collect();
    for (i, p) in points.iter_mut().enumerate() {
        p.pareto = !snapshot.iter().enumerate().any(|(j, &(size, ppl))| {
            j != i
                && size <= p.file_bytes
                && ppl <= p.ppl
                && (size < p.file_bytes || ppl < p.ppl || j < i)
        });
    }
}

/// A Markdown table, smallest first; Pareto points in bold.
pub fn render_markdown(points: &[SweepPoint]) -> String {
    let speed = points.iter().any(|p| p.decode_tokens_per_s.is_some());
    let mut out = String::from("| file | size (MB) | bpw | ppl |");
    out += if speed {
        " decode tok/s | Pareto |\n"
    } else {
        " Pareto |\n"
    };
    out += if speed {
        "|---|---:|---:|---:|---:|:---:|\n"
    } else {
        "|---|---:|---:|---:|:---:|\n"
    };
    for p in points {
        let bold = |s: String| if p.pareto { format!("**{s}**") } else { s };
        let name = if p.reference {
            format!("{} (reference)", p.name)
        } else {
            p.name.clone()
        };
        out += &format!(
            "| {} | {:.1} | {} | {} |",
            bold(name),
            p.file_bytes as f64 / 1e6,
            p.bits_per_weight.map_or("–".into(), |b| format!("{b:.2}")),
            bold(format!("{:.3}", p.ppl)),
        );
        if speed {
            out += &format!(
                " {} |",
                p.decode_tokens_per_s
                    .map_or("–".into(), |t| format!("{t:.1}"))
            );
        }
        out += if p.pareto { " ✓ |\n" } else { " |\n" };
    }
    out
}

/// The horizontal axis of a chart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Axis {
    /// File size in MB.
    Size,
    /// Decode tokens per second.
    DecodeSpeed,
}

/// Draws perplexity against `axis` as an SVG at `path`: files as blue circles,
/// references as red triangles, each labelled, and (for size) the Pareto front as a line.
pub fn render_svg(points: &[SweepPoint], axis: Axis, path: &Path) -> Result<(), EvalError> {
    let x_of = |p: &SweepPoint| match axis {
        Axis::Size => Some(p.file_bytes as f64 / 1e6),
        Axis::DecodeSpeed => p.decode_tokens_per_s,
    };
    let shown: Vec<(&SweepPoint, f64)> = points
        .iter()
        .filter_map(|p| x_of(p).map(|x| (p, x)))
        .collect();
    if shown.is_empty() {
        return Err(EvalError::Invalid(format!(
            "{}: no point has a value to plot",
            path.display()
        )));
    }
    let (x_min, x_max) = bounds(shown.iter().map(|&(_, x)| x));
    let (y_min, y_max) = bounds(shown.iter().map(|&(p, _)| p.ppl));
    let draw = || -> Result<(), Box<dyn std::error::Error>> {
        let root = SVGBackend::new(path, (900, 600)).into_drawing_area();
        root.fill(&WHITE)?;
        let (caption, x_desc) = match axis {
            Axis::Size => ("perplexity vs file size", "file size (MB)"),
            Axis::DecodeSpeed => ("perplexity vs decode speed", "decode tokens/s"),
        };
        let pad = (x_max - x_min).max(1e-9) * 0.08;
        let y_pad = (y_max - y_min).max(1e-9) * 0.08;
        let mut chart = ChartBuilder::on(&root)
            .caption(caption, ("sans-serif", 22))
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(60)
            .build_cartesian_2d(
                (x_min - pad).max(0.0)..x_max + pad,
                y_min - y_pad..y_max + y_pad,
            )?;
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .y_desc("perplexity")
            .draw()?;
        if axis == Axis::Size {
            let front: Vec<(f64, f64)> = shown
                .iter()
                .filter(|(p, _)| p.pareto)
                .map(|&(p, x)| (x, p.ppl))
                .collect();
            chart
                .draw_series(LineSeries::new(front, GREEN.stroke_width(2)))?
                .label("Pareto front")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], GREEN));
        }
        let files = shown.iter().filter(|(p, _)| !p.reference);
        chart
            .draw_series(files.map(|&(p, x)| Circle::new((x, p.ppl), 5, BLUE.filled())))?
            .label("pocketlm")
            .legend(|(x, y)| Circle::new((x, y), 5, BLUE.filled()));
        if shown.iter().any(|(p, _)| p.reference) {
            let refs = shown.iter().filter(|(p, _)| p.reference);
            chart
                .draw_series(refs.map(|&(p, x)| TriangleMarker::new((x, p.ppl), 7, RED.filled())))?
                .label("reference")
                .legend(|(x, y)| TriangleMarker::new((x, y), 7, RED.filled()));
        }
        // Neighbours often sit close: references are labelled below their point, files
        // alternately above and below.
        chart.draw_series(shown.iter().enumerate().map(|(i, &(p, x))| {
            let offset = if p.reference || i % 2 == 1 {
                (8, 4)
            } else {
                (8, -16)
            };
            EmptyElement::at((x, p.ppl))
                + Text::new(p.name.clone(), offset, ("sans-serif", 12).into_font())
        }))?;
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| EvalError::Io {
        path: path.display().to_string(),
        source: std::io::Error::other(e.to_string()),
    })
}

fn bounds(values: impl Iterator<Item = f64>) -> (f64, f64) {
    values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(name: &str, mb: f64, ppl: f64) -> SweepPoint {
        SweepPoint {
            name: name.into(),
            reference: false,
            file_bytes: (mb * 1e6) as u64,
            bits_per_weight: None,
            ppl,
            decode_tokens_per_s: None,
            prefill_tokens_per_s: None,
            pareto: false,
        }
    }

    #[test]
    fn pareto_front_keeps_exactly_the_undominated_points() {
        let mut points = vec![
            point("big-good", 100.0, 27.0),
            point("small-bad", 50.0, 60.0),
            point("dominated", 90.0, 40.0),
            point("mid", 75.0, 35.0),
            point("tie-a", 80.0, 30.0),
            point("tie-b", 80.0, 30.0),
            point("worse-and-bigger", 120.0, 28.0),
        ];
        mark_pareto(&mut points);
        let front: Vec<&str> = points
            .iter()
            .filter(|p| p.pareto)
            .map(|p| p.name.as_str())
            .collect();
        // Of two identical points one represents the front.
        assert_eq!(front, ["small-bad", "mid", "tie-a", "big-good"]);
        assert!(
            points
                .windows(2)
                .all(|w| w[0].file_bytes <= w[1].file_bytes)
        );
    }

    #[test]
    fn references_parse_and_bad_ones_say_why() {
        let p: SweepPoint = "llama.cpp Q4_K_M=105.5MB:28.336:80.1".parse().unwrap();
        assert_eq!(p.name, "llama.cpp Q4_K_M");
        assert_eq!(p.file_bytes, 105_500_000);
        assert_eq!(p.ppl, 28.336);
        assert_eq!(p.decode_tokens_per_s, Some(80.1));
        assert!(p.reference);
        for bad in [
            "Q4=105MB",
            "=1MB:2",
            "Q4=1MB:x",
            "Q4=1MB:2:3:4",
            "Q4=zz:2",
            "Q4=1MB:-2",
        ] {
            assert!(bad.parse::<SweepPoint>().is_err(), "{bad}");
        }
        let err = "Q4=1MB:x".parse::<SweepPoint>().unwrap_err();
        assert_eq!(err.to_string(), "'Q4=1MB:x': bad perplexity 'x'");
        let err = "Q4=zz:2".parse::<SweepPoint>().unwrap_err();
        assert!(matches!(err, SweepPointError::Size { .. }), "{err}");
    }

    #[test]
    fn charts_and_tables_show_every_point() {
        let mut points = vec![point("q4", 91.8, 30.05), point("q3", 75.2, 44.9)];
        points.push("Q4_K_M=105.5MB:28.336".parse().unwrap());
        points[0].decode_tokens_per_s = Some(62.0);
        mark_pareto(&mut points);
        // What the JSON report holds reads back unchanged.
        let json = serde_json::to_string(&points).unwrap();
        assert_eq!(
            serde_json::from_str::<Vec<SweepPoint>>(&json).unwrap(),
            points
        );
        let table = render_markdown(&points);
        for name in ["q4", "q3", "Q4_K_M (reference)", "30.050", "62.0"] {
            assert!(table.contains(name), "{name} missing from\n{table}");
        }
        let dir = tempfile::tempdir().unwrap();
        let svg = dir.path().join("size.svg");
        render_svg(&points, Axis::Size, &svg).unwrap();
        let text = std::fs::read_to_string(&svg).unwrap();
        for label in ["q4", "q3", "Q4_K_M", "Pareto front", "file size (MB)"] {
            assert!(text.contains(label), "{label} missing from the SVG");
        }
        let speed = dir.path().join("speed.svg");
        render_svg(&points, Axis::DecodeSpeed, &speed).unwrap();
        assert!(std::fs::read_to_string(&speed).unwrap().contains("q4"));
        let nothing = [point("x", 1.0, 2.0)];
        assert!(render_svg(&nothing, Axis::DecodeSpeed, &speed).is_err());
    }
}
