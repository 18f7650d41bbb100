//! The command line end to end: what scripts rely on (one JSON object on stdout for every
//! `--json` command; global flags reaching the runtime) on the stories260K fixture.

use std::process::Command;

use pocketlm_convert::{ConvertOptions, LowRank, LowRankMethod, RankAllocation, RankTarget};
use pocketlm_format::Encoding;
use pocketlm_runtime::Model;
use serde_json::Value;

// The converter's fixture helpers (stories260K paths), shared rather than copied.
#[path = "../../pocketlm-convert/tests/common/mod.rs"]
mod common;
use common::{STORY, ZEROSHOT_ARC, convert};

/// Runs the CLI and parses its stdout, which must be exactly one JSON object.
fn cli_json(args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_pocketlm"))
        .args(["-t", "1"])
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("{args:?}: stdout is not one JSON value ({e}): {stdout}"));
    assert!(v.is_object(), "{v}");
    v
}

#[test]
fn every_eval_subcommand_prints_one_json_object() {
    let (dir, f32_path) = convert(&ConvertOptions::with_weights(Encoding::F32));
    let (_q4_dir, q4_path) = convert(&ConvertOptions::with_weights(Encoding::Q4 {
        group: 32,
        asymmetric: true,
    }));
    let text = dir.path().join("story.txt");
    std::fs::write(&text, STORY).unwrap();
    let arc = dir.path().join("arc.jsonl");
    std::fs::write(&arc, ZEROSHOT_ARC).unwrap();
    let (m, b, t) = (
        q4_path.to_str().unwrap(),
        f32_path.to_str().unwrap(),
        text.to_str().unwrap(),
    );

    let ppl = cli_json(&["eval", "ppl", m, "--text", t, "--ctx", "64", "--json"]);
    assert!(ppl["ppl"].as_f64().unwrap() > 1.0);
    let kld = cli_json(&[
        "eval", "kld", m, "--base", b, "--text", t, "--ctx", "64", "--json",
    ]);
    assert!(kld["kld"].as_f64().unwrap() > 0.0);
    assert!(kld["top1_agreement"].as_f64().unwrap() <= 1.0);
    let (x, y) = (kld["ppl"].as_f64().unwrap(), ppl["ppl"].as_f64().unwrap());
    assert!((x - y).abs() < 1e-9 * y, "kld ppl {x} vs ppl {y}");
    let zs = cli_json(&[
        "eval",
        "zeroshot",
        m,
        "--task",
        "arc-easy",
        arc.to_str().unwrap(),
        "--limit",
        "2",
        "--json",
    ]);
    assert_eq!(zs["examples"], 2);
    assert!(zs["accuracy"].is_number() && zs["accuracy_norm"].is_number());
    let report = cli_json(&[
        "eval", "report", m, "--base", b, "--text", t, "--ctx", "64", "--chunks", "2", "--json",
    ]);
    assert!(report["kld"].as_f64().unwrap() > 0.0);
    assert_eq!(
        report["parameters"].as_u64().unwrap(),
        Model::open(&q4_path).unwrap().config().parameter_count()
    );
}

#[test]
fn the_cli_serves_a_lower_rank_on_request() {
    let (_dir, path) = convert(&ConvertOptions {
        lowrank: Some(LowRank {
            method: LowRankMethod::Svd,
            target: RankTarget::Rank(32),
            allocation: RankAllocation::Uniform,
        }),
        ..ConvertOptions::with_weights(Encoding::F32)
    });
    // FLOPs per token `inspect` reports, with `env` set and `extra` global flags.
    let flops = |env: &[(&str, &str)], extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_pocketlm"))
            .envs(env.iter().copied())
            .args(extra)
            .args(["inspect", "--json"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["flops_per_token"].as_u64().unwrap()
    };
    let (full, half) = (flops(&[], &[]), flops(&[], &["--low-rank-percent", "50"]));
    assert!(half < full, "{half} vs {full}");
    // The environment variable is the flag's default; the flag wins over it.
    let env = [("POCKETLM_LOW_RANK_PERCENT", "50")];
    assert_eq!(flops(&env, &[]), half);
    assert_eq!(flops(&env, &["--low-rank-percent", "100"]), full);
    let rejected = std::process::Command::new(env!("CARGO_BIN_EXE_pocketlm"))
        .args(["--low-rank-percent", "0", "inspect"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!rejected.status.success());
}

/// The converter refuses options by `ConvertOptions` field; the CLI says it with the flags
/// the user typed (and nothing is written).
#[test]
fn convert_refusals_name_the_flags() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.plm");
    let fixture = common::fixture("hf");
    let calib = common::fixture("calib.txt");
    let refusal = |flags: &[&str]| -> String {
        let run = Command::new(env!("CARGO_BIN_EXE_pocketlm"))
            .args(["-t", "1", "convert"])
            .arg(&fixture)
            .arg("-o")
            .arg(&out)
            .arg("--calib")
            .arg(&calib)
            .args(flags)
            .output()
            .unwrap();
        assert!(!run.status.success(), "{flags:?} was accepted");
        String::from_utf8(run.stderr).unwrap()
    };
    let err = refusal(&["--weights", "f16", "--residual", "q4/g32"]);
    assert!(
        err.contains("--residual does not work with --weights f16"),
        "{err}"
    );
    let err = refusal(&["--weights", "q4+4:8"]);
    assert!(
        err.contains("--weights q4/g32 --prune METHOD --nm"),
        "{err}"
    );
    let err = refusal(&[
        "--weights",
        "q3",
        "--recover",
        "blockwise",
        "--recover-codes",
    ]);
    assert!(
        err.contains("--recover-codes applies to distillation"),
        "{err}"
    );
    let err = refusal(&[
        "--lowrank",
        "svd",
        "--ratio",
        "0.2",
        "--rank-alloc",
        "global",
        "--prune-channels",
        "0.25",
    ]);
    assert!(
        err.contains("--rank-alloc global does not combine with --prune-channels"),
        "{err}"
    );
    assert!(!out.exists());
}
