//! Retrying cloud HTTP calls: the policy (tries, backoff, the server's
//! `Retry-After`) and the small helpers every cloud client shares, used by the
//! Azure and GCP backends and by the KMS's key unwrapping alike.

use std::time::Duration;

/// Retries of 429 and 5xx answers (and, from IMDS, 404 and 410, which it
/// documents as transient) and of failed connections.
#[derive(Clone, Debug)]
pub struct Retry {
    /// Tries in all, the first included.
    pub max_attempts: u32,
    /// Wait before the second try; doubled for each further one.
    pub base_delay: Duration,
    /// Longest wait, also for a `Retry-After` in seconds.
    pub max_delay: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            max_attempts: 4,
            base_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(10),
        }
    }
}

impl Retry {
    /// Exponential backoff after failed try `attempt` (1 for the first):
    /// `base_delay` doubled for each try after the first, at most `max_delay`.
    pub fn backoff(&self, attempt: u32) -> Duration {
        self.base_delay
            .saturating_mul(1 << attempt.saturating_sub(1).min(16))
            .min(self.max_delay)
    }

    /// The wait after failed try `attempt`: the server's `Retry-After` when it
    /// gave one, else the backoff; never more than `max_delay`.
    pub fn delay(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        retry_after
            .unwrap_or_else(|| self.backoff(attempt))
            .min(self.max_delay)
    }
}

/// `Retry-After` in seconds; the HTTP-date form falls back to our own backoff.
pub fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let value = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// One line of at most `max` characters.
pub fn clean(text: &str, max: usize) -> String {
    let line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if line.chars().count() <= max {
        line
    } else {
        let mut short: String = line.chars().take(max).collect();
        short.push('…');
        short
    }
}
