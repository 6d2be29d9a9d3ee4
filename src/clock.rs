//! Wall-clock time, which decides token expiry (tokens outlive the process and the host
//! may sleep), and the detector that wakes the refreshers when the wall clock jumps
//! against the monotonic clock that tokio's timers follow (suspend/resume, a clock step).

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How often the detector compares the two clocks. Cheap: one wake-up for the whole daemon.
pub const JUMP_CHECK_INTERVAL: Duration = Duration::from_secs(5);
/// A difference above this between wall and monotonic progress counts as a jump.
pub const JUMP_THRESHOLD: Duration = Duration::from_secs(2);

/// The source of wall-clock time.
#[derive(Clone)]
pub struct Clock {
    manual: Option<Arc<Manual>>,
}

struct Manual {
    base_wall: SystemTime,
    base_instant: Instant,
    /// Jumps applied so far, forward or backward.
    shift: Mutex<(Duration, Duration)>,
}

impl Clock {
    /// The system's real-time clock.
    pub fn system() -> Clock {
        Clock { manual: None }
    }

    /// A clock that starts at `start` and advances with tokio's (possibly paused) clock,
    /// plus whatever [`Clock::jump_forward`] / [`Clock::jump_backward`] add: it lets tests
    /// simulate a suspended host or a stepped clock.
    pub fn manual(start: SystemTime) -> Clock {
        Clock {
            manual: Some(Arc::new(Manual {
                base_wall: start,
                base_instant: Instant::now(),
                shift: Mutex::new((Duration::ZERO, Duration::ZERO)),
            })),
        }
    }

    pub fn now(&self) -> SystemTime {
        match &self.manual {
            None => SystemTime::now(),
            Some(m) => {
                let (fwd, back) = *m.shift.lock().expect("clock lock");
                m.base_wall + m.base_instant.elapsed() + fwd - back
            }
        }
    }

    /// Moves a manual clock's wall time forward (no effect on the system clock).
    pub fn jump_forward(&self, by: Duration) {
        if let Some(m) = &self.manual {
            m.shift.lock().expect("clock lock").0 += by;
        }
    }

    /// Moves a manual clock's wall time backward (no effect on the system clock).
    pub fn jump_backward(&self, by: Duration) {
        if let Some(m) = &self.manual {
            m.shift.lock().expect("clock lock").1 += by;
        }
    }

    /// How long from now until `t` on the wall clock (zero if `t` is past).
    pub fn until(&self, t: SystemTime) -> Duration {
        t.duration_since(self.now()).unwrap_or(Duration::ZERO)
    }

    /// Starts the jump detector. Each jump bumps the returned counter; refreshers watch it
    /// and re-plan from the wall clock instead of sleeping out a stale monotonic timer.
    pub fn spawn_jump_detector(
        &self,
        tracker: &TaskTracker,
        cancel: CancellationToken,
    ) -> watch::Receiver<u64> {
        let (tx, rx) = watch::channel(0u64);
        let clock = self.clone();
        tracker.spawn(async move {
            let mut last_wall = clock.now();
            let mut last_mono = Instant::now();
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(JUMP_CHECK_INTERVAL) => {}
                }
                let wall = clock.now();
                let mono = Instant::now();
                let mono_elapsed = mono - last_mono;
                let skew = match wall.duration_since(last_wall) {
                    Ok(wall_elapsed) => wall_elapsed.abs_diff(mono_elapsed),
                    Err(back) => back.duration() + mono_elapsed,
                };
                if skew > JUMP_THRESHOLD {
                    tracing::info!(
                        skew = %humantime::format_duration(Duration::from_secs(skew.as_secs())),
                        "wall clock jumped (suspend, resume or clock step): re-planning refreshes"
                    );
                    tx.send_modify(|n| *n += 1);
                }
                last_wall = wall;
                last_mono = mono;
            }
        });
        rx
    }
}

/// A wall-clock time as RFC 3339 in UTC, second precision: how tokend shows times in its
/// answers, sinks and logs.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn manual_clock_follows_tokio_time_and_jumps() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let clock = Clock::manual(start);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(clock.now(), start + Duration::from_secs(10));
        clock.jump_forward(Duration::from_secs(3600));
        assert_eq!(clock.now(), start + Duration::from_secs(3610));
        clock.jump_backward(Duration::from_secs(600));
        assert_eq!(clock.now(), start + Duration::from_secs(3010));
    }

    #[tokio::test(start_paused = true)]
    async fn detector_reports_a_jump_and_stays_quiet_otherwise() {
        let clock = Clock::manual(SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000));
        let tracker = TaskTracker::new();
        let cancel = CancellationToken::new();
        let mut jumps = clock.spawn_jump_detector(&tracker, cancel.clone());
        tokio::time::sleep(JUMP_CHECK_INTERVAL * 4).await;
        assert_eq!(
            *jumps.borrow_and_update(),
            0,
            "no jump without a clock change"
        );
        clock.jump_forward(Duration::from_secs(7200));
        tokio::time::timeout(JUMP_CHECK_INTERVAL * 2, jumps.changed())
            .await
            .expect("jump seen within two checks")
            .unwrap();
        assert_eq!(*jumps.borrow(), 1);
        cancel.cancel();
        tracker.close();
        tracker.wait().await;
    }
}
