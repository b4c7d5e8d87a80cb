//! Progress of long actions while `virtkube apply` (or `delete`) runs: a live migration (data
//! moved of the total, rate, what is left, the expected downtime, the pre-copy iteration), a
//! volume copy (bytes written of the source's), and a graceful shutdown (seconds left before
//! power-off).
//!
//! The hosts ([`crate::host::Hosts`]) send [`ProgressEvent`]s to a [`Sink`] while an action
//! runs; a [`Display`] shows them: [`live::Live`] as progress bars (indicatif) on a terminal,
//! [`Plain`] as a line per action every few seconds at most otherwise (logs, CI). Nothing
//! is shown for actions that end before [`SHOW_AFTER`].

pub mod live;
pub mod run;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use virtkube_engine::migrate::JobProgress;
use virtkube_engine::volume::CopyProgress;

use crate::plan::render;

/// Actions shorter than this show no progress at all.
pub const SHOW_AFTER: Duration = Duration::from_secs(1);

/// How often the engine is asked for a running job's figures.
pub const POLL_EVERY: Duration = Duration::from_millis(500);

/// What a long action reports.
#[derive(Debug, Clone, PartialEq)]
pub enum Progress {
    /// A live migration's job statistics.
    Migration(JobProgress),
    /// A volume copy.
    Copy(CopyProgress),
    /// A graceful shutdown began; the guest is powered off after `deadline`.
    Shutdown {
        /// The time the guest gets.
        deadline: Duration,
    },
}

/// One report about one action of the plan.
#[derive(Debug, Clone, PartialEq)]
pub struct ProgressEvent {
    /// The action's id in the plan.
    pub action: usize,
    /// How the action is named in the output (`~ Domain default/web [node-a]: live-migrate
    /// to node-b`).
    pub label: String,
    /// What it reports.
    pub progress: Progress,
}

/// Where the hosts send progress.
pub type Sink = tokio::sync::mpsc::UnboundedSender<ProgressEvent>;

/// Shows progress. Each call returns the lines to print among the command's own output
/// (a display that draws by itself returns none).
pub trait Display {
    /// A report arrived.
    fn update(&mut self, event: ProgressEvent, now: Instant) -> Vec<String>;
    /// Time passed (a countdown moves without reports).
    fn tick(&mut self, now: Instant) -> Vec<String>;
    /// The action ended: its progress disappears.
    fn finish(&mut self, action: usize);
}

/// Bytes as people read them (`54.4MiB`).
pub fn size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes}B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1}{}", UNITS[unit])
}

/// The one-line description of a report, `elapsed` after the action began.
pub fn describe(progress: &Progress, elapsed: Duration) -> String {
    match progress {
        Progress::Migration(p) => {
            let mut parts = Vec::new();
            match (p.data_processed, p.data_total) {
                (_, Some(0)) | (None, None) => parts.push("starting".into()),
                (Some(done), Some(total)) => parts.push(format!(
                    "{} of {} ({}%)",
                    size(done),
                    size(total),
                    p.percent().unwrap_or(0)
                )),
                (Some(done), None) => parts.push(format!("{} moved", size(done))),
                (None, Some(total)) => parts.push(format!("0B of {}", size(total))),
            }
            if let Some(bps) = p.mem_bps {
                parts.push(format!("{}/s", size(bps)));
            }
            if let Some(left) = p.data_remaining {
                parts.push(format!("{} left", size(left)));
            }
            if let Some(i) = p.iteration {
                parts.push(format!("iteration {i}"));
            }
            if let Some(d) = p.downtime_ms {
                parts.push(format!("expected downtime {d} ms"));
            }
            format!("migrating: {}", parts.join(", "))
        }
        Progress::Copy(c) => match c.total {
            Some(total) if c.written < total => format!(
                "copying: {} of {} written ({}%), {}s",
                size(c.written),
                size(total),
                c.written.saturating_mul(100) / total.max(1),
                elapsed.as_secs()
            ),
            _ => format!(
                "copying: {} allocated of {}, {}s",
                size(c.written),
                render::bytes(c.capacity),
                elapsed.as_secs()
            ),
        },
        Progress::Shutdown { deadline } => {
            let left = deadline.saturating_sub(elapsed);
            format!(
                "shutting down: {}s left before power-off",
                left.as_secs() + u64::from(left.subsec_millis() > 0)
            )
        }
    }
}

struct Shown {
    label: String,
    progress: Progress,
    started: Instant,
    printed: Option<Instant>,
    /// What the last line said: a line is printed only when it says something new.
    said: String,
}

/// Progress as plain lines (when the output is not a terminal): per action, a line at most
/// every `every`, none before [`SHOW_AFTER`], and none that would repeat the previous one
/// (a migration in its switch-over reports the same figures for a while).
pub struct Plain {
    every: Duration,
    actions: HashMap<usize, Shown>,
}

impl Plain {
    /// A line per action at most every `every`.
    pub fn new(every: Duration) -> Self {
        Self {
            every,
            actions: HashMap::new(),
        }
    }

    fn due_lines(&mut self, now: Instant) -> Vec<String> {
        let mut ids: Vec<usize> = self.actions.keys().copied().collect();
        ids.sort_unstable();
        let mut lines = Vec::new();
        for id in ids {
            let Some(a) = self.actions.get_mut(&id) else {
                continue;
            };
            let elapsed = now.duration_since(a.started);
            let due = elapsed >= SHOW_AFTER
                && a.printed
                    .is_none_or(|t| now.duration_since(t) >= self.every);
            let text = describe(&a.progress, elapsed);
            if due && text != a.said {
                a.printed = Some(now);
                lines.push(format!("  ..   {}: {text}", a.label));
                a.said = text;
            }
        }
        lines
    }
}

impl Display for Plain {
    fn update(&mut self, event: ProgressEvent, now: Instant) -> Vec<String> {
        let shown = self.actions.entry(event.action).or_insert(Shown {
            label: event.label,
            progress: event.progress.clone(),
            started: now,
            printed: None,
            said: String::new(),
        });
        shown.progress = event.progress;
        self.due_lines(now)
    }

    fn tick(&mut self, now: Instant) -> Vec<String> {
        self.due_lines(now)
    }

    fn finish(&mut self, action: usize) {
        self.actions.remove(&action);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn migration(done: u64) -> Progress {
        Progress::Migration(JobProgress {
            job_type: 1,
            operation: None,
            elapsed_ms: None,
            data_total: Some(256 << 20),
            data_processed: Some(done),
            data_remaining: Some((256 << 20) - done),
            mem_bps: Some(16 << 20),
            downtime_ms: Some(300),
            iteration: Some(1),
        })
    }

    #[test]
    fn plain_lines_wait_for_a_long_action_and_come_at_most_every_interval() {
        let t0 = Instant::now();
        let mut plain = Plain::new(Duration::from_secs(2));
        let mut lines = Vec::new();
        let event = |done| ProgressEvent {
            action: 3,
            label: "~ Domain d/web: live-migrate to b".into(),
            progress: migration(done),
        };
        lines.extend(plain.update(event(1 << 20), t0));
        lines.extend(plain.update(event(2 << 20), t0 + Duration::from_millis(1500)));
        lines.extend(plain.update(event(3 << 20), t0 + Duration::from_millis(2500)));
        lines.extend(plain.update(event(4 << 20), t0 + Duration::from_millis(3600)));
        // The same figures again, later: nothing new to say.
        lines.extend(plain.update(event(4 << 20), t0 + Duration::from_millis(6000)));
        plain.finish(3);
        lines.extend(plain.tick(t0 + Duration::from_secs(10)));
        assert_eq!(
            lines,
            [
                "  ..   ~ Domain d/web: live-migrate to b: migrating: 2.0MiB of 256.0MiB (0%), 16.0MiB/s, 254.0MiB left, iteration 1, expected downtime 300 ms",
                "  ..   ~ Domain d/web: live-migrate to b: migrating: 4.0MiB of 256.0MiB (1%), 16.0MiB/s, 252.0MiB left, iteration 1, expected downtime 300 ms",
            ]
        );
    }

    #[test]
    fn the_countdown_says_the_seconds_left() {
        let p = Progress::Shutdown {
            deadline: Duration::from_secs(30),
        };
        assert_eq!(
            describe(&p, Duration::from_millis(2500)),
            "shutting down: 28s left before power-off"
        );
        assert_eq!(
            describe(&p, Duration::from_secs(31)),
            "shutting down: 0s left before power-off"
        );
    }
}
