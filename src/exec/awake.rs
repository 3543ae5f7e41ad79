//! Keep a rayon pool's other workers looking for work while a computation runs.
//!
//! A training step alternates parallel regions (a layer's GEMM or convolution, split into one task
//! per thread) with short serial stretches on the calling thread (element-wise operations, the
//! loss). In those stretches rayon's idle workers spin briefly and then sleep, and a sleeping
//! worker takes long to wake: on the 2-core benchmark VM, a join of two 250 µs halves took on
//! average 350 µs after a 100 µs serial gap and 510 µs after a 2 ms one, and in up to a fifth of
//! the joins the calling thread ran both halves itself before the other worker woke (measured
//! with a standalone rayon program; 253–267 µs with the workers kept awake as here). The MLP's
//! step at 2 threads was 1.4× its 1-thread speed, with the second worker busy 2/3 as often as the
//! first.
//!
//! [`install_awake`] runs a computation in a pool this way (the only way in, so that the guard
//! always starts where it must: at the top of the pool's `install`). [`KeepAwake::start`] hands
//! every other worker of the current pool a task that keeps asking
//! the pool for work ([`rayon::yield_now`], which runs a pending or stolen task if there is one)
//! until the guard is dropped, so the tasks of each parallel region start at once. It costs the
//! other cores' idle time while it is held, like an OpenMP runtime with `OMP_WAIT_POLICY=active`;
//! the pool's threads are reserved for the one computation anyway (one pool per job, see
//! [`super::execute`]).
//!
//! On a machine shared with other work, `REPRISE_WAIT=passive` turns this off (the workers sleep
//! between parallel regions, as rayon's own default; slower steps, no spinning cores);
//! `REPRISE_WAIT=active` (or unset) keeps it on. [`wait_policy`] reads the variable once.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// The environment variable that chooses how idle workers wait: `active` (default) or `passive`.
pub const WAIT_ENV: &str = "REPRISE_WAIT";

/// How a pool's idle workers wait while a computation runs (`REPRISE_WAIT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitPolicy {
    /// Kept looking for work (`KeepAwake`): the fastest steps, the other cores busy.
    Active,
    /// rayon's default: they spin briefly, then sleep.
    Passive,
}

impl WaitPolicy {
    /// The policy a value of `REPRISE_WAIT` names (None: unset or empty, the default).
    pub fn parse(value: Option<&str>) -> Result<WaitPolicy, String> {
        match value.map(str::trim) {
            None | Some("") => Ok(WaitPolicy::Active),
            Some(v) if v.eq_ignore_ascii_case("active") => Ok(WaitPolicy::Active),
            Some(v) if v.eq_ignore_ascii_case("passive") => Ok(WaitPolicy::Passive),
            Some(v) => Err(format!(
                "{WAIT_ENV}={v:?}: expected `active` (idle workers keep looking for work; the default) \
                 or `passive` (they sleep; for machines shared with other work)"
            )),
        }
    }
}

/// The policy `REPRISE_WAIT` names, read once per process. The command line checks it before it
/// starts any work (the command line's entry point); a library user with a bad value gets the default
/// and one warning on stderr.
pub fn wait_policy() -> Result<WaitPolicy, String> {
    static POLICY: OnceLock<Result<WaitPolicy, String>> = OnceLock::new();
    POLICY.get_or_init(|| WaitPolicy::parse(std::env::var(WAIT_ENV).ok().as_deref())).clone()
}

/// `pool.install(work)` with the pool's other workers kept awake while `work` runs (unless
/// `REPRISE_WAIT=passive`). This is the one way in: the guard is started at the top of the
/// `install`, in sequential code, as `KeepAwake::start` requires. Called from a worker of `pool`
/// itself (where `install` would run `work` inline, maybe inside a parallel task that other
/// threads wait for), it runs `work` without keeping anyone awake. The pool should be reserved for
/// this computation: parallel work from another thread in the same pool could have its tasks
/// taken up by the spinning workers, which is correct but holds them while they spin.
pub fn install_awake<R: Send>(pool: &rayon::ThreadPool, work: impl FnOnce() -> R + Send) -> R {
    static WARNED: std::sync::Once = std::sync::Once::new();
    if pool.current_thread_index().is_some() {
        return work();
    }
    match wait_policy() {
        Ok(WaitPolicy::Passive) => return pool.install(work),
        Ok(WaitPolicy::Active) => {}
        Err(e) => WARNED.call_once(|| eprintln!("warning: {e}; using `active`")),
    }
    pool.install(|| {
        let _awake = KeepAwake::start();
        work()
    })
}

/// While alive, the other workers of the pool it was started in stay awake (see the module
/// documentation). Dropping it lets them sleep again.
#[must_use = "the workers stay awake only while the guard is alive"]
pub(crate) struct KeepAwake {
    state: Option<Arc<State>>,
}

struct State {
    stop: AtomicBool,
    /// Keep-awake tasks that joined, plus [`CLOSED`] once [`KeepAwake::start`] stopped taking
    /// more.
    joined: AtomicUsize,
    /// Keep-awake tasks running now.
    spinning: AtomicUsize,
}

/// The bit of [`State::joined`] that says no keep-awake task may join any more.
const CLOSED: usize = 1 << (usize::BITS - 1);

/// How long [`KeepAwake::start`] waits for the other workers to take up their keep-awake task: a
/// sleeping worker took about 0.2–0.4 ms to wake on the benchmark VM.
const JOIN_WAIT: Duration = Duration::from_millis(50);

impl KeepAwake {
    /// Keep the other workers of the current pool awake. Does nothing outside a rayon pool or in
    /// a pool of one thread (`REPRISE_WAIT` is [`install_awake`]'s to honour).
    ///
    /// Call it from a worker of the pool (inside `install`) in sequential code, with no parallel
    /// work of this pool under way: a keep-awake task taken up by a worker that is waiting inside
    /// another task would keep that task from finishing. So that no keep-awake task is left
    /// waiting in a queue once the computation's parallel work starts, `start` returns only when
    /// every other worker has taken its task up, or after [`JOIN_WAIT`]; a task taken up later
    /// ends at once.
    fn start() -> KeepAwake {
        let Some(me) = rayon::current_thread_index() else {
            return KeepAwake { state: None };
        };
        let others = rayon::current_num_threads().saturating_sub(1);
        if others == 0 {
            return KeepAwake { state: None };
        }
        let state = Arc::new(State { stop: AtomicBool::new(false), joined: AtomicUsize::new(0), spinning: AtomicUsize::new(0) });
        let shared = Arc::clone(&state);
        rayon::spawn_broadcast(move |ctx| {
            if ctx.index() == me || !shared.join() {
                return;
            }
            shared.spinning.fetch_add(1, Ordering::AcqRel);
            while !shared.stop.load(Ordering::Acquire) {
                if !matches!(rayon::yield_now(), Some(rayon::Yield::Executed)) {
                    std::hint::spin_loop();
                }
            }
            shared.spinning.fetch_sub(1, Ordering::AcqRel);
        });
        let since = Instant::now();
        while state.joined.load(Ordering::Acquire) < others && since.elapsed() < JOIN_WAIT {
            std::hint::spin_loop();
        }
        state.joined.fetch_or(CLOSED, Ordering::AcqRel);
        #[cfg(test)]
        tests::STARTED_HERE.with(|n| n.set(n.get() + 1));
        KeepAwake { state: Some(state) }
    }

    /// Whether other workers were asked to stay awake.
    #[cfg(test)]
    fn active(&self) -> bool {
        self.state.is_some()
    }
}

impl State {
    /// Count a keep-awake task in, unless [`KeepAwake::start`] has stopped waiting for them.
    fn join(&self) -> bool {
        let mut seen = self.joined.load(Ordering::Acquire);
        loop {
            if seen & CLOSED != 0 {
                return false;
            }
            match self.joined.compare_exchange_weak(seen, seen + 1, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return true,
                Err(now) => seen = now,
            }
        }
    }
}

impl Drop for KeepAwake {
    fn drop(&mut self) {
        if let Some(state) = &self.state {
            state.stop.store(true, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    thread_local! {
        /// Keep-awake guards started (with workers to keep awake) on this thread.
        pub(super) static STARTED_HERE: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    /// Run `f` on a thread of its own and fail unless it returns within 120 s: a deadlock fails
    /// the test instead of hanging the suite (a failed assertion in `f` fails it too).
    fn finishes_within_two_minutes(f: impl FnOnce() + Send + 'static) {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            f();
            tx.send(()).unwrap();
        });
        assert!(rx.recv_timeout(Duration::from_secs(120)).is_ok(), "failed or deadlocked (see above)");
    }

    #[test]
    fn wait_policy_values() {
        for (value, want) in [(None, WaitPolicy::Active), (Some(""), WaitPolicy::Active), (Some("active"), WaitPolicy::Active), (Some(" Passive "), WaitPolicy::Passive)] {
            assert_eq!(WaitPolicy::parse(value), Ok(want), "{value:?}");
        }
        let e = WaitPolicy::parse(Some("sleep")).unwrap_err();
        assert!(e.contains("REPRISE_WAIT=\"sleep\"") && e.contains("`passive`"), "{e}");
    }

    /// `install_awake` from inside parallel work of the same pool runs its work inline, keeping
    /// nobody awake: a spinning worker could otherwise hold up the tasks the caller waits for.
    #[test]
    fn install_awake_nested_in_its_own_pool_runs_inline() {
        finishes_within_two_minutes(|| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
            for _ in 0..50 {
                let total: usize = install_awake(&pool, || {
                    if wait_policy() == Ok(WaitPolicy::Active) {
                        assert!(STARTED_HERE.with(|n| n.get()) > 0, "the outer call keeps the other worker awake");
                    }
                    (0..16usize)
                        .into_par_iter()
                        .with_max_len(1)
                        .map(|i| {
                            let before = STARTED_HERE.with(|n| n.get());
                            let v = install_awake(&pool, || rayon::join(|| i, || i).0 * 2);
                            assert_eq!(STARTED_HERE.with(|n| n.get()), before, "a nested call started a guard");
                            v
                        })
                        .sum()
                });
                assert_eq!(total, 240);
            }
        });
    }

    #[test]
    fn nothing_to_do_outside_a_pool_or_with_one_thread() {
        // The test's own thread is no rayon worker.
        assert!(!KeepAwake::start().active());
        let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        assert!(!one.install(KeepAwake::start).active());
    }

    /// A worker busy with other work when the guard starts takes its keep-awake task up late,
    /// after `start` has stopped waiting: the task must end at once, not spin (it could be taken
    /// up inside a task that another thread waits for).
    #[test]
    fn a_keep_awake_task_taken_up_late_ends_at_once() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        pool.spawn(move || {
            started_tx.send(()).unwrap();
            release_rx.recv().unwrap();
        });
        started_rx.recv().unwrap();
        pool.install(|| {
            // Runs on the free worker; the other is blocked until released.
            let guard = KeepAwake::start();
            let state = Arc::clone(guard.state.as_ref().unwrap());
            assert_eq!(state.joined.load(Ordering::Acquire), CLOSED, "nobody could join in time");
            release_tx.send(()).unwrap();
            // The released worker runs its queued keep-awake task before this broadcast.
            rayon::broadcast(|_| ());
            assert_eq!(state.joined.load(Ordering::Acquire), CLOSED);
            assert_eq!(state.spinning.load(Ordering::Acquire), 0, "a late keep-awake task is spinning");
            drop(guard);
        });
    }

    /// Guards started and dropped around short parallel regions with nested joins, from
    /// `install` calls made outside the pool one after another (as `reprise bench` does): a
    /// keep-awake task of the next guard must never spin in a worker that is inside a task some
    /// other thread waits for. Run on a thread of its own, and failed if it has not finished
    /// after 120 s (it takes well under a second; even if every `start` waited its full 50 ms,
    /// 500 rounds would take 25 s).
    #[test]
    fn guards_in_quick_succession_do_not_deadlock() {
        finishes_within_two_minutes(|| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
            for round in 0..500 {
                pool.install(|| {
                    let _guard = KeepAwake::start();
                    let v: Vec<u64> = (0..64usize)
                        .into_par_iter()
                        .with_max_len(1)
                        .map(|i| {
                            let (a, b) = rayon::join(|| i as u64, || (i * i) as u64);
                            a + b
                        })
                        .collect();
                    assert_eq!(v[63], 63 + 63 * 63, "round {round}");
                });
            }
        });
    }

    /// Parallel work under a guard gives the results a plain run gives (the awake workers run
    /// its tasks from inside their keep-awake task), and dropping the guard ends the keep-awake
    /// tasks; a second guard in the same pool works the same.
    #[test]
    fn parallel_work_under_a_guard_and_the_workers_released() {
        finishes_within_two_minutes(|| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
            let plain: Vec<u64> = (0..10_000u64).map(|i| i * i % 7).collect();
            for _ in 0..2 {
                let state = pool.install(|| {
                    let guard = KeepAwake::start();
                    assert!(guard.active());
                    let state = Arc::clone(guard.state.as_ref().unwrap());
                    for _ in 0..50 {
                        let v: Vec<u64> = (0..10_000usize).into_par_iter().with_max_len(100).map(|i| (i * i % 7) as u64).collect();
                        assert_eq!(v, plain);
                        // A serial stretch between parallel regions.
                        let t = Instant::now();
                        while t.elapsed() < Duration::from_micros(200) {}
                    }
                    state
                });
                // Every keep-awake task ends once the guard is gone (waiting up to 5 s for the
                // workers to notice).
                for _ in 0..500 {
                    if state.spinning.load(Ordering::Acquire) == 0 {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                assert!(state.joined.load(Ordering::Acquire) & CLOSED != 0);
                assert_eq!(state.spinning.load(Ordering::Acquire), 0, "keep-awake tasks still running");
            }
        });
    }
}
