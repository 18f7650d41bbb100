//! `pocketlm eval ...`, one module per measurement.

mod kld;
mod ppl;
mod report;
mod sensitivity;
mod sweep;
mod zeroshot;

use crate::args::EvalCommand;
use crate::commands::CliResult;

pub fn execute(command: EvalCommand) -> CliResult {
    match command {
        EvalCommand::Ppl(args) => ppl::execute(args),
        EvalCommand::Kld(args) => kld::execute(args),
        EvalCommand::Zeroshot(args) => zeroshot::execute(args),
        EvalCommand::Sweep(args) => sweep::execute(args),
        EvalCommand::Report(args) => report::execute(args),
        EvalCommand::Sensitivity(args) => sensitivity::execute(args),
    }
}
