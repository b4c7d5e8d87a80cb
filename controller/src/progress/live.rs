//! Progress bars on a terminal (indicatif): one bar per long action, under the lines
//! `apply` prints, gone when the action ends.

use std::collections::HashMap;
use std::io::Write;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::{Display, Progress, ProgressEvent, SHOW_AFTER, describe};

struct Bar {
    label: String,
    progress: Progress,
    started: Instant,
    bar: Option<ProgressBar>,
}

/// Progress bars drawn on standard output.
pub struct Live {
    multi: MultiProgress,
    bars: HashMap<usize, Bar>,
}

impl Default for Live {
    fn default() -> Self {
        Self::new()
    }
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar())
}

impl Live {
    /// Bars on standard output (call only when it is a terminal).
    pub fn new() -> Self {
        Self {
            multi: MultiProgress::with_draw_target(ProgressDrawTarget::stdout()),
            bars: HashMap::new(),
        }
    }

    /// A writer whose lines are printed above the bars.
    pub fn lines(&self) -> AboveBars {
        AboveBars {
            multi: self.multi.clone(),
            pending: Vec::new(),
        }
    }

    fn draw(bar: &mut Bar, multi: &MultiProgress, now: Instant) {
        let elapsed = now.duration_since(bar.started);
        if elapsed < SHOW_AFTER {
            return;
        }
        let (length, position, template) = match &bar.progress {
            Progress::Migration(p) => (
                p.data_total.unwrap_or(0),
                p.data_processed.unwrap_or(0),
                "  {prefix} [{bar:30}] {msg}",
            ),
            Progress::Copy(c) => match c.total {
                Some(total) if c.written < total => {
                    (total, c.written, "  {prefix} [{bar:30}] {msg}")
                }
                _ => (0, 0, "  {spinner} {prefix} {msg}"),
            },
            Progress::Shutdown { deadline } => (
                deadline.as_millis() as u64,
                (elapsed.as_millis() as u64).min(deadline.as_millis() as u64),
                "  {prefix} [{bar:30}] {msg}",
            ),
        };
        let pb = bar.bar.get_or_insert_with(|| {
            let pb = multi.add(ProgressBar::new(length));
            pb.set_style(style(template));
            pb.set_prefix(bar.label.clone());
            if length == 0 {
                pb.enable_steady_tick(Duration::from_millis(200));
            }
            pb
        });
        pb.set_length(length);
        pb.set_position(position);
        pb.set_message(describe(&bar.progress, elapsed));
    }
}

impl Display for Live {
    fn update(&mut self, event: ProgressEvent, now: Instant) -> Vec<String> {
        let bar = self.bars.entry(event.action).or_insert(Bar {
            label: event.label,
            progress: event.progress.clone(),
            started: now,
            bar: None,
        });
        bar.progress = event.progress;
        Self::draw(bar, &self.multi, now);
        Vec::new()
    }

    fn tick(&mut self, now: Instant) -> Vec<String> {
        for bar in self.bars.values_mut() {
            Self::draw(bar, &self.multi, now);
        }
        Vec::new()
    }

    fn finish(&mut self, action: usize) {
        if let Some(Bar { bar: Some(pb), .. }) = self.bars.remove(&action) {
            pb.finish_and_clear();
            self.multi.remove(&pb);
        }
    }
}

/// Lines written here appear above the progress bars (whole lines only).
pub struct AboveBars {
    multi: MultiProgress,
    pending: Vec<u8>,
}

impl Write for AboveBars {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.pending.extend_from_slice(buf);
        while let Some(end) = self.pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=end).collect();
            self.multi
                .println(String::from_utf8_lossy(&line[..line.len() - 1]))?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if !self.pending.is_empty() {
            let line = String::from_utf8_lossy(&self.pending).into_owned();
            self.pending.clear();
            self.multi.println(line)?;
        }
        Ok(())
    }
}
