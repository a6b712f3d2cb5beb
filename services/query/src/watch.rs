//! WatchEvents: catch-up from PostgreSQL, then live, with no gap and no duplicate at the switch.
//!
//! - **One upstream reader per process** (the pump) follows the log with the event store's `Follower` (woken by
//!   the commit announcement, polling as a fallback), and fans events and progress marks out over a broadcast
//!   channel.
//! - **Each subscriber** subscribes first, then replays from the store until a read comes back short (which
//!   covers everything the pump had seen when it subscribed), then takes live items, skipping what it has
//!   delivered. If it lags behind the broadcast buffer, it falls back to replay from the store.
//! - **A slow client** never slows the others or grows memory: its outgoing buffer holds at most
//!   `client_buffer` messages. A live client whose buffer is full goes back to replay from the store, at its own
//!   pace; one that leaves a full buffer unread for `stall_timeout` is ended with RESOURCE_EXHAUSTED
//!   `CONSUMER_TOO_SLOW` (after what is buffered) and resumes with `after_position`.
//! - **Progress** is sent after a second without any message: every later event has a higher position.

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{Stream, StreamExt};
use kiroku::v1::{
    CaughtUp, Event, Progress, WatchEventsRequest, WatchEventsResponse, watch_events_request, watch_events_response,
};
use kiroku_domain::{AuditEvent, UserEvent};
use kiroku_event_store::{Batch, EventStore, Follower, LogFilter, Position, RecordedEvent};
use kiroku_platform::Shutdown;
use kiroku_vault::Vault;
use tokio::sync::{Semaphore, broadcast, mpsc, watch};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use uuid::Uuid;

use crate::error::QueryError;
use crate::wire;

/// Events read from the store per query.
const BATCH: u32 = 500;
/// Events of the log a filtered replay scans per query.
const SCAN: u32 = 5_000;
/// How often a subscriber with nothing to say sends a progress mark.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// How often the pump polls when no commit was announced.
const POLL_EVERY: Duration = Duration::from_millis(250);

/// What the pump broadcasts, in log order.
#[derive(Clone, Debug)]
enum Item {
    Event(Arc<Broadcast>),
    /// Everything at or below this position has been broadcast.
    Progress(Position),
}

/// An event as the pump broadcasts it: the message, built once for every subscriber (each takes a copy rather than
/// converting the stored event again), and what filters look at (its payload taken out: the message has it).
#[derive(Debug)]
struct Broadcast {
    event: RecordedEvent,
    message: Event,
}

impl Broadcast {
    fn new(mut event: RecordedEvent) -> Self {
        let data = std::mem::take(&mut event.data);
        let metadata = std::mem::take(&mut event.metadata);
        let message = wire::event(RecordedEvent { data, metadata, ..event.clone() });
        Broadcast { event, message }
    }
}

/// Settings of the watch feed.
#[derive(Clone, Copy, Debug)]
pub struct WatchSettings {
    /// Messages buffered for one client; a live client whose buffer is full goes back to replay.
    pub client_buffer: usize,
    /// Items the broadcast keeps for subscribers that fall behind before they replay from the store.
    pub broadcast_buffer: usize,
    /// A client that leaves its full buffer unread this long is ended with CONSUMER_TOO_SLOW.
    pub stall_timeout: Duration,
    /// Open streams this process serves at most, and at most per caller (past either, LIMIT_REACHED).
    pub max_streams: usize,
    pub max_streams_per_caller: usize,
    /// Database connections the replays share at most, and at most per caller (a replay read waits for one).
    pub replay_connections: usize,
    pub replay_connections_per_caller: usize,
}

impl Default for WatchSettings {
    fn default() -> Self {
        WatchSettings {
            client_buffer: 1024,
            broadcast_buffer: 4096,
            stall_timeout: Duration::from_secs(30),
            max_streams: 10_000,
            max_streams_per_caller: 100,
            replay_connections: 8,
            replay_connections_per_caller: 4,
        }
    }
}

/// The database connections that replays may hold at once, in all and per caller. A replay read takes one place
/// of each for as long as it reads (and opens) a batch: thousands of subscribers catching up at once then queue
/// for a few connections instead of taking every one of the pool's, which GetUser and the rest need; and one
/// caller's catch-ups leave room for other callers'.
#[derive(Clone)]
struct ReplayBudget {
    total: Arc<Semaphore>,
    per_caller: usize,
    callers: Arc<Mutex<HashMap<String, Arc<Semaphore>>>>,
}

impl ReplayBudget {
    fn new(settings: &WatchSettings) -> Self {
        ReplayBudget {
            total: Arc::new(Semaphore::new(settings.replay_connections.max(1))),
            per_caller: settings.replay_connections_per_caller.max(1),
            callers: Arc::default(),
        }
    }

    /// `caller`'s share (the same one for every subscriber of the caller).
    fn of(&self, caller: &str) -> Arc<Semaphore> {
        let mut callers = self.callers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        // Callers that hold nothing are forgotten, so the map holds only callers replaying now.
        if callers.len() > 1024 {
            callers.retain(|_, share| Arc::strong_count(share) > 1);
        }
        callers.entry(caller.to_owned()).or_insert_with(|| Arc::new(Semaphore::new(self.per_caller))).clone()
    }
}

/// Open streams, in all and per caller.
#[derive(Default)]
struct Open {
    total: usize,
    by_caller: HashMap<String, usize>,
}

/// A place among the open streams, given back when the subscriber ends.
struct Slot {
    open: Arc<Mutex<Open>>,
    caller: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(mut open) = self.open.lock() {
            open.total = open.total.saturating_sub(1);
            if let Some(count) = open.by_caller.get_mut(&self.caller) {
                *count -= 1;
                if *count == 0 {
                    open.by_caller.remove(&self.caller);
                }
            }
        }
    }
}

/// The process's watch feed: the pump and the subscribers.
#[derive(Clone)]
pub(crate) struct Watcher {
    store: EventStore,
    vault: Vault,
    items: broadcast::Sender<Item>,
    scanned: watch::Receiver<Position>,
    settings: WatchSettings,
    open: Arc<Mutex<Open>>,
    replays: ReplayBudget,
    shutdown: Shutdown,
}

pub(crate) type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchEventsResponse, Status>> + Send>>;

impl Watcher {
    /// Starts the pump at the current head.
    pub(crate) async fn start(
        store: EventStore,
        vault: Vault,
        settings: WatchSettings,
        shutdown: Shutdown,
    ) -> anyhow::Result<Watcher> {
        let head = store.safe_horizon().await?;
        let (items, _) = broadcast::channel(settings.broadcast_buffer.max(16));
        let (scanned_tx, scanned) = watch::channel(head);
        let follower = store.follow(head, BATCH, POLL_EVERY).await;
        tokio::spawn(pump(follower, vault.clone(), items.clone(), scanned_tx, shutdown.clone()));
        let replays = ReplayBudget::new(&settings);
        Ok(Watcher { store, vault, items, scanned, settings, open: Arc::default(), replays, shutdown })
    }

    /// Validates the request and starts a subscriber.
    pub(crate) async fn watch(&self, request: WatchEventsRequest, caller: &str) -> Result<WatchStream, QueryError> {
        let filter = filter(&request)?;
        let slot = self.take_slot(caller)?;
        let start = match request.start {
            Some(watch_events_request::Start::FromBeginning(true)) => Some(Position::ZERO),
            Some(watch_events_request::Start::AfterPosition(after)) => {
                let head = self.head().await?;
                if after > head.get() {
                    return Err(QueryError::PositionOutOfRange { requested: after, head: head.get() });
                }
                Some(Position::new(after))
            }
            // Neither (or from_beginning: false): live only.
            _ => None,
        };
        let (out, receiver) = mpsc::channel(self.settings.client_buffer.max(1));
        let ending: Arc<Mutex<Option<Status>>> = Arc::default();
        let subscriber = Subscriber {
            store: self.store.clone(),
            vault: self.vault.clone(),
            items: self.items.subscribe(),
            filter,
            replays: (self.replays.total.clone(), self.replays.of(caller)),
            out,
            ending: ending.clone(),
            last: Position::ZERO,
            last_sent: Instant::now(),
            full_since: None,
            stall_timeout: self.settings.stall_timeout,
            shutdown: self.shutdown.clone(),
            phase: Phase::default(),
            _slot: slot,
        };
        // Live only starts after everything final now: what committed before the call is not sent (an older
        // transaction still open commits later in log order, and is sent).
        let horizon = self.store.safe_horizon().await?;
        let live_from = horizon.max(*self.scanned.borrow());
        tokio::spawn(subscriber.run(start, live_from));
        // The client gets what is buffered, then the reason the stream ended.
        let tail = futures::stream::once(async move {
            ending.lock().ok().and_then(|mut e| e.take()).unwrap_or_else(|| Status::unavailable("stream ended"))
        })
        .map(Err);
        Ok(Box::pin(ReceiverStream::new(receiver).map(|message| Ok(*message)).chain(tail)))
    }

    /// A place for one more stream of `caller`, or LIMIT_REACHED.
    fn take_slot(&self, caller: &str) -> Result<Slot, QueryError> {
        let mut open = self.open.lock().map_err(|_| QueryError::Internal(anyhow::anyhow!("open streams poisoned")))?;
        let mine = open.by_caller.get(caller).copied().unwrap_or(0);
        if open.total >= self.settings.max_streams {
            return Err(QueryError::LimitReached("this server's WatchEvents streams"));
        }
        if mine >= self.settings.max_streams_per_caller {
            return Err(QueryError::LimitReached("this caller's WatchEvents streams"));
        }
        open.total += 1;
        *open.by_caller.entry(caller.to_owned()).or_default() += 1;
        Ok(Slot { open: self.open.clone(), caller: caller.to_owned() })
    }

    /// The highest position a client may resume after: committed events and announced progress.
    async fn head(&self) -> Result<Position, QueryError> {
        let scanned = *self.scanned.borrow();
        Ok(crate::grpc::log_head(&self.store).await?.max(scanned))
    }
}

/// Follows the log and broadcasts it; the only reader of the store for live delivery in this process.
/// Events go out opened (personal fields while their person's key exists), once for every subscriber.
async fn pump(
    mut follower: Follower,
    vault: Vault,
    items: broadcast::Sender<Item>,
    scanned: watch::Sender<Position>,
    shutdown: Shutdown,
) {
    let mut pending = None;
    loop {
        let batch = match pending.take() {
            Some(batch) => Ok(batch),
            None => tokio::select! {
                () = shutdown.wait() => return,
                batch = follower.next() => batch,
            },
        };
        let opened = match batch {
            Ok(mut batch) => match open(&vault, &mut batch.events).await {
                Ok(()) => Ok(batch),
                Err(error) => {
                    // The follower has moved past this batch: keep it (unchanged: opening is all or nothing) and
                    // open it again.
                    tracing::warn!(%error, "watch feed cannot open the log's personal data");
                    pending = Some(batch);
                    Err(())
                }
            },
            Err(error) => {
                tracing::warn!(%error, "watch feed cannot read the log");
                Err(())
            }
        };
        match opened {
            Ok(batch) => {
                for event in batch.events {
                    // No receivers is fine: nobody is watching.
                    let _ = items.send(Item::Event(Arc::new(Broadcast::new(event))));
                }
                if batch.through > *scanned.borrow() {
                    let _ = items.send(Item::Progress(batch.through));
                    let _ = scanned.send(batch.through);
                }
            }
            Err(()) => {
                tokio::select! {
                    () = shutdown.wait() => return,
                    () = tokio::time::sleep(POLL_EVERY) => {}
                }
            }
        }
    }
}

/// Opens a batch for the feed: an event whose data key does not unwrap goes out without its personal data, marked
/// `personal_unavailable`, rather than stopping the feed for every subscriber (see `Vault::open_what_opens`).
async fn open(vault: &Vault, events: &mut [RecordedEvent]) -> Result<(), kiroku_vault::VaultError> {
    let unopened = vault.open_what_opens(events).await?;
    for event in events.iter_mut().filter(|e| unopened.iter().any(|u| u.position == e.position)) {
        kiroku_vault::mark_unreadable(event);
    }
    Ok(())
}

/// The most entries a WatchEvents filter list takes (there are far fewer event types than that).
const MAX_FILTER_ENTRIES: usize = 64;

/// Which events a subscriber wants, checked against the event and aggregate types the domain has.
fn filter(request: &WatchEventsRequest) -> Result<LogFilter, QueryError> {
    let known_events: HashSet<&str> = UserEvent::TYPES.iter().chain(AuditEvent::TYPES).copied().collect();
    let known_aggregates = [UserEvent::AGGREGATE_TYPE, AuditEvent::AGGREGATE_TYPE];
    // Bounded before anything else looks at them: each filter list is matched in PostgreSQL on every replay read.
    for (field, list) in [("event_types", &request.event_types), ("aggregate_types", &request.aggregate_types)] {
        if list.len() > MAX_FILTER_ENTRIES {
            return Err(QueryError::invalid(field, format!("takes at most {MAX_FILTER_ENTRIES} entries")));
        }
    }
    for name in &request.event_types {
        if !known_events.contains(name.as_str()) {
            let name = kiroku_platform::echo::clip(name);
            return Err(QueryError::invalid("event_types", format!("unknown event type {name:?}")));
        }
    }
    for name in &request.aggregate_types {
        if !known_aggregates.contains(&name.as_str()) {
            let name = kiroku_platform::echo::clip(name);
            return Err(QueryError::invalid("aggregate_types", format!("unknown aggregate type {name:?}")));
        }
    }
    let aggregate_id = match request.aggregate_id.as_str() {
        "" => None,
        id => Some(Uuid::parse_str(id).map_err(|_| QueryError::invalid("aggregate_id", "must be a UUID"))?),
    };
    Ok(LogFilter {
        event_types: request.event_types.clone(),
        aggregate_types: request.aggregate_types.clone(),
        aggregate_id,
    })
}

/// A replay's next read, on a task of its own so that it runs on the other core; stopped when dropped (the
/// subscriber ended meanwhile).
struct Reading(tokio::task::JoinHandle<Result<Batch, End>>);

impl Reading {
    async fn finish(mut self) -> Result<Batch, End> {
        (&mut self.0).await.map_err(|e| End::Failed(QueryError::Internal(e.into())))?
    }
}

impl Drop for Reading {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct Subscriber {
    store: EventStore,
    vault: Vault,
    items: broadcast::Receiver<Item>,
    filter: LogFilter,
    /// The replays' connections, in all and of this subscriber's caller (see `ReplayBudget`).
    replays: (Arc<Semaphore>, Arc<Semaphore>),
    /// Messages are boxed: the channel allocates its first block of slots up front, for every subscriber, idle
    /// or not, so a slot is a pointer rather than a whole message. Measured with `cargo bench --bench watch`: the
    /// server's memory per idle subscriber went from 17.4 KB to 7.8–8.3 KB. What ends the stream goes through
    /// `ending`, not the channel.
    out: mpsc::Sender<Box<WatchEventsResponse>>,
    ending: Arc<Mutex<Option<Status>>>,
    /// Everything at or below it has been sent or filtered out.
    last: Position,
    last_sent: Instant,
    /// Since when the client's buffer has been found full by a progress mark (reset by any message sent).
    full_since: Option<Instant>,
    stall_timeout: Duration,
    shutdown: Shutdown,
    /// Counts the stream in `kiroku_watch_streams{phase}`.
    phase: Phase,
    /// Given back when the subscriber ends.
    _slot: Slot,
}

/// Where a subscriber is, for the `kiroku_watch_streams{phase="replaying"|"live"}` gauge: moved between phases
/// as it goes, and out of the gauge when dropped.
#[derive(Default)]
struct Phase(Option<&'static str>);

impl Phase {
    fn set(&mut self, phase: &'static str) {
        if self.0 == Some(phase) {
            return;
        }
        if let Some(old) = self.0.replace(phase) {
            metrics::gauge!("kiroku_watch_streams", "phase" => old).decrement(1.0);
        }
        metrics::gauge!("kiroku_watch_streams", "phase" => phase).increment(1.0);
    }
}

impl Drop for Phase {
    fn drop(&mut self) {
        if let Some(old) = self.0 {
            metrics::gauge!("kiroku_watch_streams", "phase" => old).decrement(1.0);
        }
    }
}

/// The help text of WatchEvents' metrics.
pub(crate) fn describe_metrics() {
    use metrics::{describe_counter, describe_gauge};
    describe_gauge!("kiroku_watch_streams", "open WatchEvents streams, by phase (replaying from the store, live)");
    describe_counter!("kiroku_watch_events_delivered_total", "events sent to WatchEvents subscribers, by mode");
    describe_counter!("kiroku_watch_consumer_too_slow_total", "streams ended with CONSUMER_TOO_SLOW");
    // Present from the start (at zero), so that rates and alerts work before the first occurrence.
    for phase in ["replaying", "live"] {
        metrics::gauge!("kiroku_watch_streams", "phase" => phase).increment(0.0);
    }
    for mode in ["replay", "live"] {
        metrics::counter!("kiroku_watch_events_delivered_total", "mode" => mode).increment(0);
    }
    metrics::counter!("kiroku_watch_consumer_too_slow_total").increment(0);
}

/// Why a subscriber stopped.
enum End {
    /// The client went away.
    Gone,
    TooSlow,
    ShuttingDown,
    Failed(QueryError),
}

/// How a message is handed to the client.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// From the store, at the client's pace: wait for room, but not longer than the stall timeout.
    Replay,
    /// From the broadcast: never wait; a full buffer sends the subscriber back to replay.
    Live,
}

/// Whether a live message went out.
enum Sent {
    Yes,
    Behind,
}

impl Subscriber {
    async fn run(mut self, start: Option<Position>, scanned: Position) {
        let Err(end) = self.follow(start, scanned).await else { return };
        let status = match end {
            End::Gone => return,
            End::TooSlow => {
                metrics::counter!("kiroku_watch_consumer_too_slow_total").increment(1);
                QueryError::ConsumerTooSlow.into()
            }
            End::ShuttingDown => QueryError::ShuttingDown.into(),
            End::Failed(error) => error.into(),
        };
        if let Ok(mut ending) = self.ending.lock() {
            *ending = Some(status);
        }
        // Dropping `out` ends the client's stream after what is buffered, then the status above.
    }

    async fn follow(&mut self, start: Option<Position>, scanned: Position) -> Result<(), End> {
        match start {
            Some(after) => {
                self.last = after;
                self.replay().await?;
            }
            None => self.last = scanned,
        }
        self.phase.set("live");
        let caught_up = watch_events_response::Kind::CaughtUp(CaughtUp { position: self.last.get() });
        self.send(caught_up, Mode::Replay).await?;
        loop {
            let idle = PROGRESS_EVERY.saturating_sub(self.last_sent.elapsed());
            let behind = tokio::select! {
                () = self.shutdown.wait() => return Err(End::ShuttingDown),
                () = self.out.closed() => return Err(End::Gone),
                () = tokio::time::sleep(idle) => {
                    self.progress()?;
                    false
                }
                item = self.items.recv() => match item {
                    Ok(Item::Event(live)) => {
                        let wanted = self.filter.matches(&live.event);
                        let sent = self.offer(live.event.position, wanted, || live.message.clone(), Mode::Live).await?;
                        matches!(sent, Sent::Behind)
                    }
                    Ok(Item::Progress(position)) => {
                        self.last = self.last.max(position);
                        false
                    }
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        tracing::debug!(missed, "a watcher fell behind the live feed; replaying from the store");
                        true
                    }
                    Err(broadcast::error::RecvError::Closed) => return Err(End::ShuttingDown),
                },
            };
            if behind {
                // Items broadcast from now on are kept for us; the store fills in everything before them.
                self.items = self.items.resubscribe();
                self.replay().await?;
                self.phase.set("live");
            }
        }
    }

    /// Reads from the store after `last` until a read comes back short: that covers everything the pump had
    /// broadcast when this subscriber (re)subscribed, so live items after it continue without a gap. The filter
    /// runs in PostgreSQL, each read scanning a bounded stretch of the log; a stretch with nothing to send ends
    /// with a Progress mark (so that a filtered subscriber can checkpoint), and a client that left is noticed at
    /// every read. The next batch is read while this one is sent: PostgreSQL and this process work at once.
    async fn replay(&mut self) -> Result<(), End> {
        self.phase.set("replaying");
        let mut batch = self.read(self.last).await?;
        loop {
            let Some(next) = batch.full.then(|| Reading(tokio::spawn(self.read(batch.through)))) else {
                return self.send_batch(batch).await;
            };
            self.send_batch(batch).await?;
            batch = next.finish().await?;
        }
    }

    /// The opened events after `after` that the subscriber wants (see `replay`).
    fn read(&self, after: Position) -> impl Future<Output = Result<Batch, End>> + use<> {
        let (store, vault, filter) = (self.store.clone(), self.vault.clone(), self.filter.clone());
        let (total, caller) = self.replays.clone();
        async move {
            // The caller's place first: a caller at its share waits without holding one of everyone's.
            let _caller = caller.acquire_owned().await.map_err(|_| End::ShuttingDown)?;
            let _total = total.acquire_owned().await.map_err(|_| End::ShuttingDown)?;
            let mut batch = if filter.is_empty() {
                store.read_batch(after, BATCH).await
            } else {
                store.read_filtered(after, BATCH, SCAN, &filter).await
            }
            .map_err(|e| End::Failed(e.into()))?;
            open(&vault, &mut batch.events).await.map_err(|e| End::Failed(e.into()))?;
            Ok(batch)
        }
    }

    /// Sends a batch of the replay (see `replay`).
    async fn send_batch(&mut self, batch: Batch) -> Result<(), End> {
        if self.shutdown.is_triggered() {
            return Err(End::ShuttingDown);
        }
        if self.out.is_closed() {
            return Err(End::Gone);
        }
        let nothing = batch.events.is_empty();
        for event in batch.events {
            let (position, wanted) = (event.position, self.filter.matches(&event));
            self.offer(position, wanted, move || wire::event(event), Mode::Replay).await?;
        }
        if batch.through > self.last {
            self.last = batch.through;
            if batch.full && nothing {
                let progress = watch_events_response::Kind::Progress(Progress { position: self.last.get() });
                self.send(progress, Mode::Replay).await?;
            }
        }
        Ok(())
    }

    /// Sends an event the subscriber has not had yet, if it matches; `last` moves only once it went out.
    async fn offer(
        &mut self,
        position: Position,
        wanted: bool,
        message: impl FnOnce() -> Event,
        mode: Mode,
    ) -> Result<Sent, End> {
        if position <= self.last {
            return Ok(Sent::Yes);
        }
        if wanted {
            let sent = self.send(watch_events_response::Kind::Event(message()), mode).await?;
            if matches!(sent, Sent::Behind) {
                return Ok(Sent::Behind);
            }
            let mode = if mode == Mode::Live { "live" } else { "replay" };
            metrics::counter!("kiroku_watch_events_delivered_total", "mode" => mode).increment(1);
        }
        self.last = position;
        Ok(Sent::Yes)
    }

    async fn send(&mut self, kind: watch_events_response::Kind, mode: Mode) -> Result<Sent, End> {
        let message = Box::new(WatchEventsResponse { kind: Some(kind) });
        match mode {
            Mode::Live => match self.out.try_send(message) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => return Ok(Sent::Behind),
                Err(mpsc::error::TrySendError::Closed(_)) => return Err(End::Gone),
            },
            // Room in the buffer (the common case) needs no timer.
            Mode::Replay => match self.out.try_send(message) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Closed(_)) => return Err(End::Gone),
                Err(mpsc::error::TrySendError::Full(message)) => tokio::select! {
                    () = self.shutdown.wait() => return Err(End::ShuttingDown),
                    sent = tokio::time::timeout(self.stall_timeout, self.out.send(message)) => match sent {
                        Ok(Ok(())) => {}
                        Ok(Err(_)) => return Err(End::Gone),
                        Err(_) => return Err(End::TooSlow),
                    },
                },
            },
        }
        self.last_sent = Instant::now();
        self.full_since = None;
        Ok(Sent::Yes)
    }

    /// A progress mark, if there is room for it. There is nothing to replay for a mark, so a full buffer is not
    /// "behind"; but a client whose buffer stays full for the stall timeout is too slow even on a quiet log.
    fn progress(&mut self) -> Result<(), End> {
        let message = Box::new(WatchEventsResponse {
            kind: Some(watch_events_response::Kind::Progress(Progress { position: self.last.get() })),
        });
        match self.out.try_send(message) {
            Ok(()) => self.full_since = None,
            Err(mpsc::error::TrySendError::Full(_)) => {
                let since = *self.full_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= self.stall_timeout {
                    return Err(End::TooSlow);
                }
            }
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(End::Gone),
        }
        // Either way, the next mark is due a second from now.
        self.last_sent = Instant::now();
        Ok(())
    }
}
