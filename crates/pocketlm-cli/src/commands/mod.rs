//! What each command does, one module per command.

mod bench;
mod chat;
mod convert;
mod eval;
mod inspect;
mod run;
mod serve;
mod verify;

use std::path::Path;

use crate::args::Command;

/// Errors reach `main`, which prints them after `error: ` and exits with failure.
pub type CliResult = Result<(), CliError>;

pub type CliError = Box<dyn std::error::Error + Send + Sync>;

pub fn execute(command: Command) -> CliResult {
    match command {
        Command::Convert(args) => convert::execute(*args),
        Command::Run(args) => run::execute(args),
        Command::Chat(args) => chat::execute(args),
        Command::Inspect(args) => inspect::execute(args),
        Command::Bench(args) => bench::execute(args),
        Command::Verify(args) => verify::execute(args),
        Command::Serve(args) => serve::execute(args),
        Command::Eval(command) => eval::execute(command),
    }
}

/// Reads a text file, naming it in the error.
fn read_text(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))
}
