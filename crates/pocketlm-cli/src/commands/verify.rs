//! `pocketlm verify`: every tensor checksum, without opening the model for inference.

use pocketlm_format::PlmFile;

use crate::args::VerifyArgs;
use crate::commands::CliResult;

pub fn execute(args: VerifyArgs) -> CliResult {
    let VerifyArgs { model } = args;
    let file = PlmFile::open(&model)?;
    file.verify()?;
    println!(
        "{}: OK ({} tensors, checksums match)",
        model.display(),
        file.tensors().len()
    );
    Ok(())
}
