//! Small shared pieces: cancellation token, token-bucket rate limiter, per-thread CPU time.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A cancellation flag that any thread may raise; the engine checks it between batches.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    /// A token that is not cancelled.
    pub fn new() -> Self {
        Self::default()
    }

    /// Requests cancellation (idempotent).
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// True once [`CancelToken::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

#[derive(Debug)]
struct BucketState {
    tokens: f64,
    last: Instant,
}

/// Token bucket shared by every sending thread of one migration.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    state: Mutex<BucketState>,
}

impl TokenBucket {
    /// `rate_bytes_per_s` sustained, with a burst of 50 ms worth of bytes (at least 1 MiB) so
    /// that one batch never has to wait for more than the bucket can hold.
    pub fn new(rate_bytes_per_s: u64) -> Self {
        let rate = rate_bytes_per_s.max(1) as f64;
        let burst = (rate * 0.05).max(1024.0 * 1024.0);
        Self {
            rate,
            burst,
            state: Mutex::new(BucketState {
                tokens: burst,
                last: Instant::now(),
            }),
        }
    }

    /// Blocks until `bytes` may be sent. Returns false (without consuming) if `cancel` fires
    /// while waiting.
    pub fn take(&self, bytes: usize, cancel: &CancelToken) -> bool {
        let need = bytes as f64;
        loop {
            let wait = {
                let mut s = match self.state.lock() {
                    Ok(g) => g,
                    Err(p) => p.into_inner(),
                };
                let now = Instant::now();
                let elapsed = now.duration_since(s.last).as_secs_f64();
                s.tokens = (s.tokens + elapsed * self.rate).min(self.burst.max(need));
                s.last = now;
                if s.tokens >= need {
                    s.tokens -= need;
                    return true;
                }
                Duration::from_secs_f64((need - s.tokens) / self.rate)
            };
            if cancel.is_cancelled() {
                return false;
            }
            // Sleep in short slices so cancellation is noticed promptly.
            std::thread::sleep(wait.min(Duration::from_millis(20)));
        }
    }
}

/// CPU time consumed so far by the calling thread (`CLOCK_THREAD_CPUTIME_ID`), in seconds.
pub fn thread_cpu_time() -> f64 {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cancel_token_is_shared() {
        let t = CancelToken::new();
        let u = t.clone();
        assert!(!u.is_cancelled());
        t.cancel();
        assert!(u.is_cancelled());
    }

    #[test]
    fn bucket_refuses_when_cancelled_and_starved() {
        let b = TokenBucket::new(1);
        let c = CancelToken::new();
        assert!(b.take(1024 * 1024, &c)); // the initial burst
        c.cancel();
        assert!(!b.take(1024 * 1024, &c)); // would need ~12 days at 1 B/s
    }

    #[test]
    fn thread_cpu_time_grows_with_work() {
        let before = thread_cpu_time();
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        assert!(thread_cpu_time() > before);
    }
}
