//! The progress bar every long command draws on stderr (indicatif hides it when stderr is not
//! a terminal, so `--json` output and pipes stay clean).

use std::borrow::Cow;

use indicatif::{ProgressBar, ProgressStyle};

pub struct Progress(ProgressBar);

impl Progress {
    /// A bar whose length arrives with the first [`Progress::update`]; `template` is
    /// indicatif's (`{bar:40} {pos}/{len} {msg}`...).
    pub fn new(template: &str) -> Self {
        Self::with_length(0, template)
    }

    pub fn with_length(length: u64, template: &str) -> Self {
        let bar = ProgressBar::new(length);
        bar.set_style(
            ProgressStyle::with_template(template)
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        Self(bar)
    }

    /// `done` of `total`, as the library callbacks report it.
    pub fn update(&self, done: usize, total: usize) {
        self.0.set_length(total as u64);
        self.0.set_position(done as u64);
    }

    /// [`Progress::update`] and the text of `{msg}`.
    pub fn update_with(&self, done: usize, total: usize, message: impl Into<Cow<'static, str>>) {
        self.update(done, total);
        self.set_message(message);
    }

    pub fn set_message(&self, message: impl Into<Cow<'static, str>>) {
        self.0.set_message(message);
    }

    pub fn inc(&self) {
        self.0.inc(1);
    }

    /// Removes the bar before the command prints its result. On an error the bar is left as
    /// it was, showing how far the command got.
    pub fn finish(self) {
        self.0.finish_and_clear();
    }
}
