//! Retrying cloud calls: the one policy (tries, backoff with full jitter, the
//! server's `Retry-After`), the one loop that applies it ([`Retry::run`]), and
//! the small helpers every cloud client shares, used by the Azure and GCP
//! backends, the Azure instance metadata reader, the KMS's key unwrapping and
//! the node's KMS client alike.

use std::future::Future;
use std::time::Duration;

use rand_core::RngCore;

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
    /// gave one (the server knows best, so it is not jittered), else a random
    /// share of the backoff ("full jitter", so that callers throttled together
    /// do not come back together); never more than `max_delay`.
    pub fn delay(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        retry_after
            .unwrap_or_else(|| full_jitter(self.backoff(attempt)))
            .min(self.max_delay)
    }

    /// Calls `call(attempt)` (1 for the first) until it is done, fails for
    /// good, or `max_attempts` tries have failed, waiting [`delay`](Self::delay)
    /// between tries. The last retryable error is returned as it is, so each
    /// caller words its own errors; `what` names the call in the log.
    pub async fn run<T, E, F, Fut>(&self, what: &str, mut call: F) -> Result<T, E>
    where
        E: std::fmt::Display,
        F: FnMut(u32) -> Fut,
        Fut: Future<Output = Step<T, E>>,
    {
        let max_attempts = self.max_attempts.max(1);
        let mut attempt = 1;
        loop {
            let (error, retry_after) = match call(attempt).await {
                Step::Done(value) => return Ok(value),
                Step::Fail(error) => return Err(error),
                Step::Retry { error, after } => (error, after),
            };
            if attempt >= max_attempts {
                return Err(error);
            }
            let delay = self.delay(attempt, retry_after);
            tracing::warn!(
                attempt,
                delay_ms = delay.as_millis() as u64,
                error = %error,
                "{what}: retrying"
            );
            tokio::time::sleep(delay).await;
            attempt += 1;
        }
    }
}

/// How one try of [`Retry::run`] ended.
pub enum Step<T, E> {
    /// Success: `run` returns the value.
    Done(T),
    /// A failure that may clear by itself: tried again unless the tries are
    /// used up, after `after` when the server said how long to wait.
    Retry { error: E, after: Option<Duration> },
    /// A failure a repeat will not cure: `run` returns it at once.
    Fail(E),
}

impl<T, E> Step<T, E> {
    /// A retryable failure without a server-given wait.
    pub fn retry(error: E) -> Self {
        Step::Retry { error, after: None }
    }
}

/// A uniformly random duration between zero and `full`, to the millisecond.
fn full_jitter(full: Duration) -> Duration {
    let ms = full.as_millis().min(u64::MAX as u128) as u64;
    if ms == 0 {
        return full;
    }
    Duration::from_millis(rand_core::OsRng.next_u64() % (ms + 1))
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn policy(max_attempts: u32) -> Retry {
        Retry {
            max_attempts,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(2),
        }
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let r = policy(10);
        let ms: Vec<u128> = (1..=7).map(|a| r.backoff(a).as_millis()).collect();
        assert_eq!(ms, [100, 200, 400, 800, 1600, 2000, 2000]);
    }

    #[test]
    fn jitter_stays_within_the_backoff_and_varies() {
        let r = policy(10);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..500 {
            let d = r.delay(3, None);
            assert!(d <= Duration::from_millis(400), "{d:?}");
            seen.insert(d);
        }
        // 401 possible values: 500 draws landing on fewer than 50 is no jitter.
        assert!(seen.len() > 50, "{} distinct delays", seen.len());
        for _ in 0..100 {
            assert!(r.delay(20, None) <= r.max_delay);
        }
    }

    #[test]
    fn retry_after_is_honoured_unjittered_and_capped() {
        let r = policy(10);
        let one = Some(Duration::from_secs(1));
        assert_eq!(r.delay(1, one), Duration::from_secs(1));
        assert_eq!(r.delay(1, Some(Duration::from_secs(60))), r.max_delay);
    }

    #[test]
    fn retry_after_header_in_seconds_only() {
        let mut headers = reqwest::header::HeaderMap::new();
        assert_eq!(retry_after(&headers), None);
        headers.insert(reqwest::header::RETRY_AFTER, " 7 ".parse().unwrap());
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(7)));
        headers.insert(
            reqwest::header::RETRY_AFTER,
            "Wed, 21 Oct 2026 07:28:00 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&headers), None);
    }

    /// Runs `outcomes` in order (the last repeated), counting the tries.
    async fn run_steps(
        r: &Retry,
        outcomes: Vec<Step<u32, String>>,
    ) -> (Result<u32, String>, u32, Vec<u32>) {
        let calls = AtomicU32::new(0);
        let outcomes = std::sync::Mutex::new(outcomes);
        let mut attempts = Vec::new();
        let result = r
            .run("test", |attempt| {
                calls.fetch_add(1, Ordering::SeqCst);
                attempts.push(attempt);
                let mut o = outcomes.lock().unwrap();
                let step = if o.len() > 1 {
                    o.remove(0)
                } else {
                    match &o[0] {
                        Step::Done(v) => Step::Done(*v),
                        Step::Fail(e) => Step::Fail(e.clone()),
                        Step::Retry { error, after } => Step::Retry {
                            error: error.clone(),
                            after: *after,
                        },
                    }
                };
                async move { step }
            })
            .await;
        (result, calls.load(Ordering::SeqCst), attempts)
    }

    #[tokio::test]
    async fn retries_until_done_and_counts_attempts() {
        let r = policy(4);
        let start = tokio::time::Instant::now();
        let (result, calls, attempts) = run_steps(
            &r,
            vec![
                Step::retry("a".into()),
                Step::retry("b".into()),
                Step::Done(7),
            ],
        )
        .await;
        assert_eq!(result, Ok(7));
        assert_eq!(calls, 3);
        assert_eq!(attempts, [1, 2, 3]);
        // Two jittered waits, at most 100 ms and 200 ms (and some scheduling slack).
        assert!(start.elapsed() <= Duration::from_millis(800));
    }

    #[tokio::test]
    async fn gives_up_after_max_attempts_with_the_last_error() {
        let r = policy(3);
        let (result, calls, _) = run_steps(
            &r,
            vec![Step::retry("first".into()), Step::retry("last".into())],
        )
        .await;
        assert_eq!(result, Err("last".into()));
        assert_eq!(calls, 3);
        // Zero tries configured still means one.
        let (result, calls, _) = run_steps(&policy(0), vec![Step::retry("x".into())]).await;
        assert_eq!(result, Err("x".into()));
        assert_eq!(calls, 1);
    }

    #[tokio::test]
    async fn a_failure_for_good_is_not_retried() {
        let (result, calls, _) = run_steps(&policy(5), vec![Step::Fail("no".into())]).await;
        assert_eq!(result, Err("no".into()));
        assert_eq!(calls, 1);
    }

    // Real time, scaled down (a paused clock needs tokio's test-util, which as
    // a dev-dependency feature would make every test build compile tokio and
    // all that depends on it a second time).
    #[tokio::test]
    async fn waits_the_servers_retry_after_capped() {
        let r = Retry {
            max_attempts: 3,
            base_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(200),
        };
        let start = tokio::time::Instant::now();
        let (result, _, _) = run_steps(
            &r,
            vec![
                Step::Retry {
                    error: "slow down".into(),
                    after: Some(Duration::from_millis(150)),
                },
                Step::Retry {
                    error: "slow down".into(),
                    after: Some(Duration::from_secs(3600)),
                },
                Step::Done(1),
            ],
        )
        .await;
        assert_eq!(result, Ok(1));
        // 150 ms as asked, then the 200 ms cap instead of an hour; no jitter on
        // either, so at least 350 ms, and far less than the hour.
        let waited = start.elapsed();
        assert!(
            (Duration::from_millis(350)..Duration::from_secs(5)).contains(&waited),
            "{waited:?}"
        );
    }
}
