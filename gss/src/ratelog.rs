//! Rate-limited warnings: one line per cause per interval, with a count of
//! the occurrences the line stands for. A flood of hostile connections
//! costs a few log lines, not one per connection.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Default interval between two lines of one cause.
pub const INTERVAL: Duration = Duration::from_secs(10);

/// Most causes tracked at once (causes may carry a principal); past it,
/// the table is cleared (the next line of each cause is printed at once).
const MAX_CAUSES: usize = 1024;

struct Cause {
    /// When this cause's last line was printed.
    printed: Instant,
    /// Occurrences since then, not printed.
    suppressed: u64,
    /// The latest suppressed occurrence's detail.
    last: String,
}

/// A set of causes, each printed at most once per interval.
pub struct RateLog {
    interval: Duration,
    causes: Mutex<HashMap<String, Cause>>,
}

impl RateLog {
    pub fn new(interval: Duration) -> RateLog {
        RateLog {
            interval,
            causes: Mutex::new(HashMap::new()),
        }
    }

    /// Record one occurrence of `cause`; returns the line to log now, if
    /// any: the first occurrence at once, later ones at most once per
    /// interval, with how many occurred since the last line.
    pub fn note(&self, cause: &str, detail: &str, now: Instant) -> Option<String> {
        let mut m = self.causes.lock().unwrap_or_else(PoisonError::into_inner);
        if m.len() >= MAX_CAUSES && !m.contains_key(cause) {
            m.clear();
        }
        match m.get_mut(cause) {
            None => {
                m.insert(
                    cause.to_string(),
                    Cause {
                        printed: now,
                        suppressed: 0,
                        last: String::new(),
                    },
                );
                Some(detail.to_string())
            }
            Some(c) if now.duration_since(c.printed) >= self.interval => {
                let n = c.suppressed;
                c.printed = now;
                c.suppressed = 0;
                c.last.clear();
                Some(if n == 0 {
                    detail.to_string()
                } else {
                    format!(
                        "{detail} (and {n} more like it in the last {}s)",
                        self.interval.as_secs()
                    )
                })
            }
            Some(c) => {
                c.suppressed += 1;
                c.last = detail.to_string();
                None
            }
        }
    }

    /// Lines for causes whose interval has passed with occurrences not yet
    /// printed (call from a timer so a burst's count is not lost).
    pub fn flush(&self, now: Instant) -> Vec<String> {
        let mut m = self.causes.lock().unwrap_or_else(PoisonError::into_inner);
        let mut out = Vec::new();
        m.retain(|_, c| {
            let due = now.duration_since(c.printed) >= self.interval;
            if due && c.suppressed > 0 {
                out.push(format!(
                    "{} ({} like it in the last {}s)",
                    c.last,
                    c.suppressed,
                    self.interval.as_secs()
                ));
                c.printed = now;
                c.suppressed = 0;
                c.last.clear();
                true
            } else {
                // Quiet causes are forgotten after an interval.
                !due
            }
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_cause_per_interval_with_counts() {
        let l = RateLog::new(Duration::from_secs(10));
        let t = Instant::now();
        let s = Duration::from_secs(1);
        assert_eq!(l.note("slow", "a", t).as_deref(), Some("a"));
        for i in 0..1000 {
            assert_eq!(l.note("slow", &format!("x{i}"), t + s), None);
        }
        // Another cause is not held back by the first.
        assert_eq!(l.note("garbage", "g", t + s).as_deref(), Some("g"));
        assert!(l.flush(t + 5 * s).is_empty());
        let f = l.flush(t + 10 * s);
        assert_eq!(f.len(), 1, "{f:?}");
        assert!(f[0].starts_with("x999 (1000 like it"), "{f:?}");
        // Printed at the flush: the next occurrence waits a full interval.
        assert_eq!(l.note("slow", "b", t + 11 * s), None);
        let line = l.note("slow", "c", t + 21 * s).unwrap();
        assert!(line.contains("c (and 1 more"), "{line}");
    }
}
