//! Faults a test injects: a hung server (accepts connections, never answers, open watches
//! stall) and canned answers for the next requests that match a predicate.

use std::sync::Mutex;

use tokio::sync::watch;

use crate::request::RequestInfo;
use crate::status::ApiError;

/// What an injected answer says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// 429 Too Many Requests with `Retry-After: secs` (API priority and fairness).
    TooManyRequests {
        /// Seconds the client should wait.
        retry_after: u64,
    },
    /// 500 Internal Server Error.
    InternalError,
    /// 503 Service Unavailable.
    Unavailable,
    /// 409 Conflict (as a stale write would get).
    Conflict,
}

impl Answer {
    /// The error this answer sends.
    pub fn error(&self) -> ApiError {
        match self {
            Answer::TooManyRequests { retry_after } => {
                let mut e = ApiError::with_code(429, "Too many requests, please try again later.");
                e.retry_after = Some(*retry_after);
                e
            }
            Answer::InternalError => ApiError::with_code(500, "injected internal error"),
            Answer::Unavailable => ApiError::with_code(503, "injected: the server is unavailable"),
            Answer::Conflict => ApiError::with_code(
                409,
                "injected conflict: the object has been modified; please apply your changes to the latest version and try again",
            ),
        }
    }
}

/// Which requests an injection applies to.
pub type Matcher = Box<dyn Fn(&RequestInfo) -> bool + Send + Sync>;

struct Injection {
    matches: Matcher,
    remaining: usize,
    answer: Answer,
}

/// The faults in force.
pub struct Faults {
    hung: watch::Sender<bool>,
    injections: Mutex<Vec<Injection>>,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            hung: watch::Sender::new(false),
            injections: Mutex::new(Vec::new()),
        }
    }
}

impl Faults {
    /// Hangs (or resumes) the server.
    pub fn set_hung(&self, hung: bool) {
        self.hung.send_replace(hung);
    }

    /// Whether the server hangs.
    pub fn is_hung(&self) -> bool {
        *self.hung.borrow()
    }

    /// Returns once the server does not hang.
    pub async fn wait_while_hung(&self) {
        let mut rx = self.hung.subscribe();
        let _ = rx.wait_for(|hung| !*hung).await;
    }

    /// Answers the next `count` requests matching `matches` with `answer`.
    pub fn inject(&self, count: usize, answer: Answer, matches: Matcher) {
        if let Ok(mut list) = self.injections.lock() {
            list.push(Injection {
                matches,
                remaining: count,
                answer,
            });
        }
    }

    /// The injected answer for this request, if one applies (and counts it).
    pub fn take(&self, info: &RequestInfo) -> Option<Answer> {
        let mut list = self.injections.lock().ok()?;
        let found = list
            .iter_mut()
            .find(|i| i.remaining > 0 && (i.matches)(info))?;
        found.remaining -= 1;
        let answer = found.answer.clone();
        list.retain(|i| i.remaining > 0);
        Some(answer)
    }

    /// Drops every pending injection.
    pub fn clear(&self) {
        if let Ok(mut list) = self.injections.lock() {
            list.clear();
        }
    }
}
