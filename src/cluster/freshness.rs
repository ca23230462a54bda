//! How old agentguard's view of the cluster is, so that a replica cut off from the API server
//! refuses agents rather than judge them from caches that no longer follow the cluster.
//!
//! The view is as old as the older of two things:
//!
//! * the last answer from the API server: a heartbeat (`GET /version`, every quarter of
//!   `--max-staleness`, each given a quarter to answer) or any event of a watch. A network
//!   partition that leaves connections open but silent (no error ever reaches a watch) is seen
//!   this way, within the bound;
//! * the first failure of a watch that has not answered since: the API server may answer
//!   `/version` while a watch keeps failing (its rights revoked, its resource gone), and that
//!   kind's cache is then as old as the failure.
//!
//! A kube-runtime watcher resumes a failed watch silently (nothing is emitted until the next
//! change), so a quiet kind would look failed long after it recovered. [`relisting`] therefore
//! starts every failed watch over with a fresh list, whose events say it is back.
//!
//! What is pure here ([`view_age`], [`Freshness`]'s bookkeeping at given times) is unit-tested;
//! the end-to-end suite cuts agentguard off from a real API server (`view_stale`).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt, future::BoxFuture};
use kube::runtime::watcher;

/// The default `--max-staleness`.
pub const DEFAULT_MAX_STALENESS: Duration = Duration::from_secs(60);

/// How old a view becomes before agents are refused, and how the heartbeat follows from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bound(pub Duration);

impl Bound {
    /// A heartbeat every quarter of the bound: a partition that starts just after a heartbeat
    /// is seen within the bound, and three heartbeats in a row may fail (a slow API server, a
    /// dropped connection) before a reachable one counts as stale.
    pub fn heartbeat_every(self) -> Duration {
        (self.0 / 4).max(Duration::from_millis(100))
    }

    /// Whether a view of `age` is too old to judge agents from.
    pub fn stale(self, age: Duration) -> bool {
        age > self.0
    }
}

/// The age at `now` of a view whose last answer came at `last_answer` and whose failing
/// watches first failed at `failing` (all times from one origin).
pub fn view_age(
    now: Duration,
    last_answer: Duration,
    failing: impl IntoIterator<Item = Duration>,
) -> Duration {
    let as_of = failing.into_iter().fold(last_answer, Duration::min);
    now.saturating_sub(as_of)
}

/// The freshness of one process's view: written by the heartbeat and the watches, read by
/// every request to the `agents` webhook (two atomic loads when no watch is failing).
pub struct Freshness {
    origin: Instant,
    /// Milliseconds from `origin` to the last answer from the API server.
    last_answer: AtomicU64,
    /// Number of watches in `failing`: the request path skips the lock when it is zero.
    failing_count: AtomicU64,
    /// Watches that failed and have not answered since, with when they first failed (ms).
    failing: Mutex<HashMap<&'static str, u64>>,
}

impl Default for Freshness {
    fn default() -> Self {
        Self::new()
    }
}

impl Freshness {
    /// A view that was current when the process started (before the caches synced, the
    /// webhook refuses for that reason instead).
    pub fn new() -> Self {
        Self {
            origin: Instant::now(),
            last_answer: AtomicU64::new(0),
            failing_count: AtomicU64::new(0),
            failing: Mutex::new(HashMap::new()),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The API server answered (a heartbeat, a list or a watch event).
    pub fn answered(&self) {
        self.answered_at(self.now_ms());
    }

    fn answered_at(&self, ms: u64) {
        self.last_answer.fetch_max(ms, Ordering::AcqRel);
    }

    /// `watch` delivered an event that came from the API server: it answers again.
    pub fn watch_answered(&self, watch: &'static str) {
        self.watch_answered_at(watch, self.now_ms());
    }

    fn watch_answered_at(&self, watch: &'static str, ms: u64) {
        self.answered_at(ms);
        if self.failing_count.load(Ordering::Acquire) > 0 {
            let mut failing = self.failing.lock().unwrap_or_else(|e| e.into_inner());
            if failing.remove(watch).is_some() {
                self.failing_count.store(failing.len() as u64, Ordering::Release);
            }
        }
    }

    /// `watch` failed; its cache is as old as its first failure until it answers again.
    pub fn watch_failed(&self, watch: &'static str) {
        self.watch_failed_at(watch, self.now_ms());
    }

    fn watch_failed_at(&self, watch: &'static str, ms: u64) {
        let mut failing = self.failing.lock().unwrap_or_else(|e| e.into_inner());
        failing.entry(watch).or_insert(ms);
        self.failing_count.store(failing.len() as u64, Ordering::Release);
    }

    /// How old the view is now.
    pub fn age(&self) -> Duration {
        self.age_at(self.now_ms())
    }

    fn age_at(&self, now: u64) -> Duration {
        let last = Duration::from_millis(self.last_answer.load(Ordering::Acquire));
        let now = Duration::from_millis(now);
        if self.failing_count.load(Ordering::Acquire) == 0 {
            return view_age(now, last, []);
        }
        let failing = self.failing.lock().unwrap_or_else(|e| e.into_inner());
        view_age(now, last, failing.values().map(|ms| Duration::from_millis(*ms)))
    }

    /// The watches failing now, by name (for the log).
    pub fn failing_watches(&self) -> Vec<&'static str> {
        let mut names: Vec<_> =
            self.failing.lock().unwrap_or_else(|e| e.into_inner()).keys().copied().collect();
        names.sort_unstable();
        names
    }
}

/// Asks the API server for its version every [`Bound::heartbeat_every`], each call given as
/// long to answer, and logs when the view goes stale and when it is current again. Runs until
/// dropped.
pub fn keep_heartbeat(
    client: kube::Client,
    freshness: Arc<Freshness>,
    bound: Bound,
) -> BoxFuture<'static, ()> {
    let every = bound.heartbeat_every();
    async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut was_stale = false;
        loop {
            tick.tick().await;
            match tokio::time::timeout(every, client.apiserver_version()).await {
                Ok(Ok(_)) => freshness.answered(),
                Ok(Err(e)) => tracing::debug!(error = %e, "heartbeat to the API server failed"),
                Err(_) => tracing::debug!(timeout = ?every, "heartbeat to the API server unanswered"),
            }
            let age = freshness.age();
            let stale = bound.stale(age);
            if stale && !was_stale {
                tracing::warn!(
                    age_seconds = age.as_secs(),
                    max_staleness_seconds = bound.0.as_secs(),
                    failing_watches = ?freshness.failing_watches(),
                    "the view of the cluster is older than --max-staleness: agents' requests are refused (HTTP 503) until it is current"
                );
            } else if !stale && was_stale {
                tracing::info!(age_seconds = age.as_secs(), "the view of the cluster is current again");
            }
            was_stale = stale;
        }
    }
    .boxed()
}

/// First wait before a failed watch is started over; doubled on each failure in a row.
pub const RESTART_FIRST: Duration = Duration::from_millis(250);
/// Longest wait between restarts of a failing watch: how late, at most, a watch lists again
/// after the API server is back (a kube-apiserver restart measured 4 s later with 10 s here).
/// Eight watches retrying every 4 s through an outage cost nothing.
pub const RESTART_MAX: Duration = Duration::from_secs(4);

/// The wait before the `failures`-th restart in a row (1-based).
fn restart_after(first: Duration, failures: u32) -> Duration {
    first.saturating_mul(1 << failures.saturating_sub(1).min(16)).min(RESTART_MAX.max(first))
}

/// A watch that, when it fails, yields the error and starts over from a fresh list (after a
/// wait that doubles with each failure in a row, from `first` up to [`RESTART_MAX`]), instead
/// of resuming silently: the new list's events tell [`Freshness`] the watch is back, and the
/// reflector's store is replaced by what the list says (nothing missed while it was down
/// lingers). `make` builds the watcher; it is called once per start.
pub fn relisting<K: Send + 'static>(
    first: Duration,
    make: impl Fn() -> BoxStream<'static, Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
) -> BoxStream<'static, Result<watcher::Event<K>, watcher::Error>> {
    let start: Option<BoxStream<'static, Result<watcher::Event<K>, watcher::Error>>> = None;
    futures::stream::unfold((start, 0u32), move |(current, failures)| {
        let fresh = current.is_none().then(&make);
        async move {
            let mut stream = match (current, fresh) {
                (Some(stream), _) => stream,
                (None, fresh) => {
                    if failures > 0 {
                        tokio::time::sleep(restart_after(first, failures)).await;
                    }
                    fresh?
                }
            };
            match stream.next().await {
                // `Init` is yielded before the list is asked for: not yet an answer.
                Some(Ok(event @ watcher::Event::Init)) => Some((Ok(event), (Some(stream), failures))),
                Some(Ok(event)) => Some((Ok(event), (Some(stream), 0))),
                Some(Err(e)) => Some((Err(e), (None, failures.saturating_add(1)))),
                None => None,
            }
        }
    })
    .boxed()
}

/// Whether a watch event came from the API server (every one but `Init`, which a watcher
/// yields before it asks).
pub fn is_answer<K>(event: &watcher::Event<K>) -> bool {
    !matches!(event, watcher::Event::Init)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn the_view_is_as_old_as_its_oldest_part() {
        assert_eq!(view_age(10 * S, 9 * S, []), S);
        // A watch failing since 4s holds the view at 4s even though the heartbeat answered.
        assert_eq!(view_age(10 * S, 9 * S, [4 * S, 7 * S]), 6 * S);
        // A failure after the last answer does not make the view older than that answer.
        assert_eq!(view_age(10 * S, 2 * S, [5 * S]), 8 * S);
        // Clocks never run backwards here, but an answer "after now" is no negative age.
        assert_eq!(view_age(S, 2 * S, []), Duration::ZERO);
    }

    #[test]
    fn the_bound_is_exclusive_and_the_heartbeat_a_quarter_of_it() {
        let bound = Bound(60 * S);
        assert!(!bound.stale(60 * S));
        assert!(bound.stale(60 * S + Duration::from_millis(1)));
        assert_eq!(bound.heartbeat_every(), 15 * S);
        assert_eq!(Bound(Duration::from_millis(10)).heartbeat_every(), Duration::from_millis(100));
    }

    #[test]
    fn freshness_follows_answers_and_failing_watches() {
        let f = Freshness::new();
        f.answered_at(1_000);
        assert_eq!(f.age_at(1_500), Duration::from_millis(500));
        // The heartbeat keeps answering, but the policy watch fails at 2s and keeps failing.
        f.watch_failed_at("clusteragentpolicies", 2_000);
        f.watch_failed_at("clusteragentpolicies", 5_000);
        f.answered_at(9_000);
        assert_eq!(f.age_at(10_000), 8 * S, "as old as the first failure");
        assert_eq!(f.failing_watches(), ["clusteragentpolicies"]);
        // Another watch's events do not vouch for this one.
        f.watch_answered_at("namespaces", 10_000);
        assert_eq!(f.age_at(10_000), 8 * S);
        // Its own list is back: the view is as old as the last answer.
        f.watch_answered_at("clusteragentpolicies", 11_000);
        assert_eq!(f.age_at(11_500), Duration::from_millis(500));
        assert!(f.failing_watches().is_empty());
        // Answers never move the clock back.
        f.answered_at(3_000);
        assert_eq!(f.age_at(12_000), S);
    }

    #[test]
    fn restarts_back_off_up_to_a_ceiling() {
        let first = Duration::from_millis(250);
        let waits: Vec<Duration> = (1..=7).map(|n| restart_after(first, n)).collect();
        let ms = |n| Duration::from_millis(n);
        assert_eq!(waits, [ms(250), ms(500), ms(1000), ms(2000), ms(4000), RESTART_MAX, RESTART_MAX]);
        assert_eq!(RESTART_MAX, ms(4000));
        assert_eq!(restart_after(first, u32::MAX), RESTART_MAX);
    }

    type Item = Result<watcher::Event<String>, watcher::Error>;

    /// A failed watch is started over from a fresh list, and only a real answer resets the wait.
    #[tokio::test]
    async fn a_failed_watch_starts_over_with_a_list() {
        let starts = Arc::new(AtomicU64::new(0));
        let make = {
            let starts = starts.clone();
            move || -> BoxStream<'static, Item> {
                let n = starts.fetch_add(1, Ordering::SeqCst);
                let events: Vec<Item> = match n {
                    // Lists one object, then the watch breaks.
                    0 => vec![
                        Ok(watcher::Event::Init),
                        Ok(watcher::Event::InitApply("a".into())),
                        Ok(watcher::Event::InitDone),
                        Err(watcher::Error::NoResourceVersion),
                    ],
                    // The list itself fails.
                    1 => vec![Ok(watcher::Event::Init), Err(watcher::Error::NoResourceVersion)],
                    // Back: the list says what is there now.
                    _ => vec![
                        Ok(watcher::Event::Init),
                        Ok(watcher::Event::InitApply("b".into())),
                        Ok(watcher::Event::InitDone),
                    ],
                };
                futures::stream::iter(events).boxed()
            }
        };
        let started = Instant::now();
        let seen: Vec<String> = relisting(Duration::from_millis(20), make)
            .map(|item| match item {
                Ok(watcher::Event::Init) => "init".to_owned(),
                Ok(watcher::Event::InitApply(o)) => format!("list {o}"),
                Ok(watcher::Event::InitDone) => "listed".to_owned(),
                Ok(_) => "other".to_owned(),
                Err(_) => "error".to_owned(),
            })
            .collect()
            .await;
        assert_eq!(seen, ["init", "list a", "listed", "error", "init", "error", "init", "list b", "listed"]);
        assert_eq!(starts.load(Ordering::SeqCst), 3);
        // Waited 20 ms after the first failure and 40 ms after the second (Init alone did
        // not reset the count).
        assert!(started.elapsed() >= Duration::from_millis(60), "{:?}", started.elapsed());
        assert!(is_answer(&watcher::Event::InitDone::<String>));
        assert!(!is_answer(&watcher::Event::Init::<String>));
    }
}
