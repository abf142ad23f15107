//! The progress bars of the subcommands: one style everywhere, and plain
//! lines on stderr where there is no terminal to draw on.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

/// A bar of `len` steps (0: set later) counting `unit` (e.g. "images"; may
/// be empty), with a message, the elapsed time and the ETA.
pub fn progress_bar(len: u64, unit: &str) -> ProgressBar {
    let unit = if unit.is_empty() { String::new() } else { format!(" {unit}") };
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{{bar:30}} {{pos}}/{{len}}{unit} {{msg}} [{{elapsed_precise}}, ETA {{eta_precise}}]"
        ))
        .expect("a valid template"),
    );
    bar.enable_steady_tick(Duration::from_millis(500));
    bar
}

/// A line above the bar, or on stderr when the bar is hidden (no terminal).
pub fn say(bar: &ProgressBar, line: String) {
    if bar.is_hidden() {
        eprintln!("{line}");
    } else {
        bar.println(line);
    }
}
