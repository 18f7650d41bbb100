//! `pocketlm eval zeroshot`.

use pocketlm_eval::zeroshot::{self, Task};

use crate::args::{JsonOutput, ZeroshotArgs};
use crate::commands::CliResult;
use crate::model_options::open_model;
use crate::progress::Progress;

pub fn execute(args: ZeroshotArgs) -> CliResult {
    let ZeroshotArgs {
        model: path,
        task,
        file,
        limit,
        output: JsonOutput { json },
    } = args;
    let task: Task = task.into();
    let model = open_model(&path)?;
    let examples = zeroshot::load_examples(task, &file, limit)?;
    if examples.is_empty() {
        return Err(format!("{}: no examples", file.display()).into());
    }
    let progress = Progress::new("{bar:40} {pos}/{len} examples, acc {msg}");
    let r = zeroshot::evaluate(&model, task, &examples, |done, total, acc| {
        progress.update_with(done, total, format!("{acc:.4}"));
    })?;
    progress.finish();
    if json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    println!(
        "{}: acc {:.4} ± {:.4}, acc_norm {:.4} ± {:.4} over {} examples ({} / {} correct) in {:.1} s",
        r.task,
        r.accuracy,
        r.accuracy_stderr,
        r.accuracy_norm,
        r.accuracy_norm_stderr,
        r.examples,
        r.correct,
        r.correct_norm,
        r.seconds
    );
    if r.truncated > 0 {
        println!(
            "note: {} contexts were cut to fit the model's window",
            r.truncated
        );
    }
    Ok(())
}
