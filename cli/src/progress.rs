//! What a waiting command says on stderr: on a terminal one line that updates in place (a spinner, the step the
//! broker reports and the time spent); piped or redirected, a plain line each time the step changes, with no
//! control characters, so logs and CI output stay readable.

use std::{io::IsTerminal, time::Duration};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub struct Progress {
    /// `Some` on a terminal.
    bar: Option<ProgressBar>,
    said: String,
}

impl Progress {
    /// Starts reporting on `what` (an instance, a backup...).
    pub fn start(what: &str) -> Self {
        if !std::io::stderr().is_terminal() {
            eprintln!("{what}: waiting");
            return Self {
                bar: None,
                said: String::new(),
            };
        }
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        let style = ProgressStyle::with_template("{spinner} {prefix}: {wide_msg} [{elapsed}]")
            .unwrap_or_else(|_| ProgressStyle::default_spinner());
        bar.set_style(style);
        bar.set_prefix(what.to_string());
        bar.set_message("waiting");
        bar.enable_steady_tick(Duration::from_millis(120));
        Self {
            bar: Some(bar),
            said: String::new(),
        }
    }

    /// The broker's description of the current step; said again only when it changes.
    pub fn step(&mut self, text: &str) {
        if text.is_empty() || text == self.said {
            return;
        }
        self.said = text.to_string();
        match &self.bar {
            Some(bar) => bar.set_message(plain(text)),
            None => eprintln!("  {}", plain(text)),
        }
    }

    /// Ends the report (the caller says how it ended).
    pub fn finish(self) {
        if let Some(bar) = self.bar {
            bar.finish_and_clear();
        }
    }
}

/// `text` without control characters (a description is the broker's, and may carry newlines).
pub fn plain(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_drops_control_characters() {
        assert_eq!(plain("a\nb\r\x1b[2Kc"), "a b  [2Kc");
        assert_eq!(plain("provisioning"), "provisioning");
    }
}
