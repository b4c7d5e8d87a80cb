//! Running a plan while its long actions show their progress: the executor and the display
//! side by side in one task, so the lines of both go to one writer in order.

use std::cell::RefCell;
use std::io::Write;
use std::time::{Duration, Instant};

use crate::execute::{self, ActionResult, ExecOptions, Report};
use crate::host::Hosts;
use crate::plan::{Action, Plan};

use super::Display;

/// How often a display is given the time (a countdown moves without reports).
const TICK: Duration = Duration::from_millis(250);

/// Runs `plan` on `hosts` as [`execute::execute`] does, with the progress of long actions on
/// `display` (when given); `line` says what to print when an action ends (or nothing), and
/// every line goes to `out`.
pub async fn execute_showing<'d>(
    plan: &Plan,
    hosts: &Hosts,
    options: ExecOptions,
    display: Option<&mut (dyn Display + 'd)>,
    out: &mut dyn Write,
    mut line: impl FnMut(&Action, &ActionResult) -> Option<String>,
) -> Report {
    let (sink, mut reports) = tokio::sync::mpsc::unbounded_channel();
    let mut reporting = hosts.clone();
    if display.is_some() {
        reporting.progress = Some(sink);
    }
    let display = RefCell::new(display);
    let out = RefCell::new(out);
    let executed = execute::execute(plan, &reporting, options, |action, result| {
        if let Some(d) = display.borrow_mut().as_mut() {
            d.finish(action.id);
        }
        if let Some(text) = line(action, result) {
            let _ = writeln!(out.borrow_mut(), "{text}");
        }
    });
    let show = async {
        let mut tick = tokio::time::interval(TICK);
        loop {
            let lines = tokio::select! {
                Some(event) = reports.recv() => display
                    .borrow_mut()
                    .as_mut()
                    .map(|d| d.update(event, Instant::now())),
                _ = tick.tick() => display
                    .borrow_mut()
                    .as_mut()
                    .map(|d| d.tick(Instant::now())),
            };
            for text in lines.into_iter().flatten() {
                let _ = writeln!(out.borrow_mut(), "{text}");
            }
        }
    };
    tokio::select! {
        report = executed => report,
        never = show => never,
    }
}
