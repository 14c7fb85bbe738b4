//! The one shape of every actor of the node (groups, files, and those to
//! come): a thread that owns its state and its database tables, fed through
//! a bounded [`Mailbox`], woken by its inputs and by its own deadlines.
//!
//! Why threads and not tasks: actors commit to redb and hash files, which
//! block; a thread of their own keeps that off the async runtime (and off
//! tokio's blocking pool, which a process with many nodes, the simulator,
//! would exhaust).
//!
//! An actor implements [`Actor`]: it is handed every input and every due
//! deadline with the `now` it should act on, and never reads the clock for
//! its decisions. [`spawn`] runs it: wait for an input or the next deadline,
//! whichever comes first; handle the input (and whatever else is queued, so
//! a burst is handled in one pass); run the deadline's work when due; stop
//! when the node's shutdown token is cancelled or every mailbox is dropped,
//! then call [`Actor::stop`].
//!
//! Callers talk to an actor through its [`Mailbox`]. The event loop
//! [`offer`](Mailbox::offer)s network inputs and never waits: a full
//! mailbox is [`Busy`](MailboxError::Busy) and the input is dropped (the
//! protocols recover: sync brings back gossip, the scheduler retries
//! chunks). The API [`call`](Mailbox::call)s and awaits the reply; a full
//! mailbox answers 503 "busy", a stopped actor "shutting down", and every
//! other failure is one [`ServiceError`] that the API maps to a status code
//! in one place.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

/// The longest an actor sleeps without looking at the shutdown token,
/// when no runtime can wake it (see [`spawn`]).
const MAX_SLEEP: Duration = Duration::from_millis(200);
/// Most queued inputs handled in one pass before deadlines get a turn.
const MAX_BATCH: usize = 1024;

/// Why a service call failed. The API maps each kind to one HTTP status
/// (and the CLI to an exit code); the message is for the user.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ServiceError {
    /// No such object on this node (404; CLI exit 1).
    #[error("{0}")]
    NotFound(String),
    /// The request is malformed or breaks a limit (400).
    #[error("{0}")]
    BadRequest(String),
    /// The caller may not do this (403).
    #[error("{0}")]
    Forbidden(String),
    /// The actor's mailbox is full: try again (503).
    #[error("the node is busy; try again")]
    Busy,
    /// The node is shutting down (503).
    #[error("the node is shutting down")]
    Stopping,
    /// Storage or disk failed (500).
    #[error("{0}")]
    Internal(String),
}

impl From<crate::storage::StoreError> for ServiceError {
    fn from(e: crate::storage::StoreError) -> Self {
        ServiceError::Internal(e.to_string())
    }
}

impl From<MailboxError> for ServiceError {
    fn from(e: MailboxError) -> Self {
        match e {
            MailboxError::Busy => ServiceError::Busy,
            MailboxError::Stopping => ServiceError::Stopping,
        }
    }
}

/// Parses a peer id given to a service call; a malformed one is a 400.
pub(crate) fn parse_peer(s: &str) -> Result<libp2p::PeerId, ServiceError> {
    s.parse()
        .map_err(|e| ServiceError::BadRequest(format!("{s:?} is not a peer id: {e}")))
}

/// Where an actor sends the answer to one call.
pub type Reply<T> = oneshot::Sender<Result<T, ServiceError>>;

/// Why an input was not queued.
#[derive(Debug, Clone, Copy, thiserror::Error, PartialEq, Eq)]
pub enum MailboxError {
    /// The mailbox is full.
    #[error("the actor is busy")]
    Busy,
    /// The actor has stopped.
    #[error("the actor has stopped")]
    Stopping,
}

/// A bounded queue between threads that allocates as it fills:
/// `std::sync::mpsc::sync_channel` allocates a slot for every place up
/// front (an actor's 4096 inputs of a few hundred bytes each are about
/// 1 MB per node, idle or not, and the simulator runs a thousand nodes).
/// The same calls as `sync_channel`'s ends, and a [`Waker`] that makes the
/// receiver's wait end early (an actor's shutdown).
pub fn bounded<T>(capacity: usize) -> (BoundedSender<T>, BoundedReceiver<T>) {
    let (tx, rx) = std_mpsc::channel();
    let len = Arc::new(AtomicUsize::new(0));
    let closed = Arc::new(AtomicBool::new(false));
    let senders = Arc::new(AtomicUsize::new(1));
    (
        BoundedSender {
            tx: tx.clone(),
            len: len.clone(),
            closed: closed.clone(),
            senders: senders.clone(),
            capacity,
        },
        BoundedReceiver {
            rx,
            wake: tx,
            len,
            closed,
            senders,
        },
    )
}

/// What the queue carries: an item, or a wake-up that carries nothing.
enum Slot<T> {
    Item(T),
    Wake,
}

/// The sending side of [`bounded`]. Cloneable.
pub struct BoundedSender<T> {
    tx: std_mpsc::Sender<Slot<T>>,
    len: Arc<AtomicUsize>,
    closed: Arc<AtomicBool>,
    /// Live senders: the receiver wakes and sees the queue disconnected
    /// when the last one goes (its own waker keeps the std channel open).
    senders: Arc<AtomicUsize>,
    capacity: usize,
}

impl<T> std::fmt::Debug for BoundedSender<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BoundedSender")
            .field("len", &self.len.load(Ordering::Relaxed))
            .field("capacity", &self.capacity)
            .finish()
    }
}

impl<T> Clone for BoundedSender<T> {
    fn clone(&self) -> Self {
        self.senders.fetch_add(1, Ordering::SeqCst);
        BoundedSender {
            tx: self.tx.clone(),
            len: self.len.clone(),
            closed: self.closed.clone(),
            senders: self.senders.clone(),
            capacity: self.capacity,
        }
    }
}

impl<T> Drop for BoundedSender<T> {
    fn drop(&mut self) {
        if self.senders.fetch_sub(1, Ordering::SeqCst) == 1 {
            let _ = self.tx.send(Slot::Wake);
        }
    }
}

impl<T> BoundedSender<T> {
    /// Queues `t` unless the queue is full or its receiver is gone.
    pub fn try_send(&self, t: T) -> Result<(), std_mpsc::TrySendError<T>> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(std_mpsc::TrySendError::Disconnected(t));
        }
        if self.len.fetch_add(1, Ordering::SeqCst) >= self.capacity {
            self.len.fetch_sub(1, Ordering::SeqCst);
            return Err(std_mpsc::TrySendError::Full(t));
        }
        self.tx.send(Slot::Item(t)).map_err(|e| {
            self.len.fetch_sub(1, Ordering::SeqCst);
            match e.0 {
                Slot::Item(t) => std_mpsc::TrySendError::Disconnected(t),
                Slot::Wake => unreachable!("an item was sent"),
            }
        })
    }

    /// Queues `t`, waiting for a free place (a blocking caller only).
    pub fn send(&self, mut t: T) -> Result<(), std_mpsc::SendError<T>> {
        loop {
            match self.try_send(t) {
                Ok(()) => return Ok(()),
                Err(std_mpsc::TrySendError::Full(back)) => {
                    t = back;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(std_mpsc::TrySendError::Disconnected(back)) => {
                    return Err(std_mpsc::SendError(back));
                }
            }
        }
    }
}

/// The receiving side of [`bounded`].
pub struct BoundedReceiver<T> {
    rx: std_mpsc::Receiver<Slot<T>>,
    wake: std_mpsc::Sender<Slot<T>>,
    len: Arc<AtomicUsize>,
    closed: Arc<AtomicBool>,
    senders: Arc<AtomicUsize>,
}

impl<T> std::fmt::Debug for BoundedReceiver<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BoundedReceiver")
            .field("len", &self.len.load(Ordering::Relaxed))
            .finish()
    }
}

impl<T> Drop for BoundedReceiver<T> {
    fn drop(&mut self) {
        self.closed.store(true, Ordering::SeqCst);
    }
}

/// Ends a [`BoundedReceiver`]'s current (or next) wait early, as if it
/// timed out. Holding one does not keep the queue connected.
pub struct Waker<T>(std_mpsc::Sender<Slot<T>>);

impl<T> std::fmt::Debug for Waker<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Waker")
    }
}

impl<T> Waker<T> {
    /// Ends the receiver's wait (a no-op once it is gone).
    pub fn wake(&self) {
        let _ = self.0.send(Slot::Wake);
    }
}

impl<T> BoundedReceiver<T> {
    fn took(&self, t: T) -> T {
        self.len.fetch_sub(1, Ordering::SeqCst);
        t
    }

    /// A handle that wakes this receiver.
    pub fn waker(&self) -> Waker<T> {
        Waker(self.wake.clone())
    }

    /// The next item, waiting at most `wait`; a wake-up ends the wait as
    /// a timeout does. Disconnected once every sender is gone and the
    /// queue is empty.
    pub fn recv_timeout(&self, wait: Duration) -> Result<T, std_mpsc::RecvTimeoutError> {
        let r = match Instant::now().checked_add(wait) {
            Some(deadline) => self.rx.recv_timeout(deadline - Instant::now()),
            // "Forever".
            None => self
                .rx
                .recv()
                .map_err(|_| std_mpsc::RecvTimeoutError::Disconnected),
        };
        match r {
            Ok(Slot::Item(t)) => Ok(self.took(t)),
            Ok(Slot::Wake) | Err(_) => match self.try_recv() {
                Ok(t) => Ok(t),
                Err(std_mpsc::TryRecvError::Disconnected) => {
                    Err(std_mpsc::RecvTimeoutError::Disconnected)
                }
                Err(std_mpsc::TryRecvError::Empty) => Err(std_mpsc::RecvTimeoutError::Timeout),
            },
        }
    }

    /// The next queued item, without waiting (wake-ups are skipped).
    pub fn try_recv(&self) -> Result<T, std_mpsc::TryRecvError> {
        loop {
            match self.rx.try_recv() {
                Ok(Slot::Item(t)) => return Ok(self.took(t)),
                Ok(Slot::Wake) => continue,
                Err(_) if self.senders.load(Ordering::SeqCst) == 0 => {
                    return Err(std_mpsc::TryRecvError::Disconnected);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// What is queued now, without waiting.
    pub fn try_iter(&self) -> impl Iterator<Item = T> + '_ {
        std::iter::from_fn(|| self.try_recv().ok())
    }
}

/// The sending side of an actor's bounded mailbox. Cloneable.
#[derive(Debug)]
pub struct Mailbox<I> {
    tx: BoundedSender<I>,
}

impl<I> Clone for Mailbox<I> {
    fn clone(&self) -> Self {
        Mailbox {
            tx: self.tx.clone(),
        }
    }
}

impl<I> Mailbox<I> {
    /// Queues an input without waiting.
    pub fn offer(&self, input: I) -> Result<(), MailboxError> {
        self.tx.try_send(input).map_err(|e| match e {
            std_mpsc::TrySendError::Full(_) => MailboxError::Busy,
            std_mpsc::TrySendError::Disconnected(_) => MailboxError::Stopping,
        })
    }

    /// Queues an input, waiting for room: for threads (never async tasks)
    /// whose input must not be lost, such as a finished hashing job.
    pub fn send_blocking(&self, input: I) -> Result<(), MailboxError> {
        self.tx.send(input).map_err(|_| MailboxError::Stopping)
    }

    /// Queues the input `make` builds around a reply channel and waits for
    /// the answer. Cancel-safe: a cancelled call's answer is dropped.
    pub async fn call<T, J: Into<I>>(
        &self,
        make: impl FnOnce(Reply<T>) -> J,
    ) -> Result<T, ServiceError> {
        let (tx, rx) = oneshot::channel();
        self.offer(make(tx).into())?;
        rx.await.map_err(|_| ServiceError::Stopping)?
    }
}

/// A mailbox and its receiving end, before the actor exists (an actor may
/// need a mailbox to itself, for work it hands to other threads).
#[derive(Debug)]
pub struct Channel<I> {
    /// The sending side, to clone for callers.
    pub mailbox: Mailbox<I>,
    rx: BoundedReceiver<I>,
}

impl<I> Channel<I> {
    /// A mailbox holding at most `capacity` inputs.
    pub fn bounded(capacity: usize) -> Self {
        let (tx, rx) = bounded(capacity);
        Channel {
            mailbox: Mailbox { tx },
            rx,
        }
    }
}

/// State owned by one thread, driven by inputs and deadlines.
pub trait Actor: Send + 'static {
    /// What the actor's mailbox carries.
    type Input: Send + 'static;

    /// Runs once on the actor's thread before the first input (restoring
    /// state from the database, say).
    fn start(&mut self, _now: Instant) {}

    /// Handles one input.
    fn on_input(&mut self, input: Self::Input, now: Instant);

    /// Runs after each pass over the queued inputs (up to `MAX_BATCH` of
    /// them), before timed work: the place to commit what the pass
    /// gathered in one transaction.
    fn end_of_pass(&mut self, _now: Instant) {}

    /// When timed work is next due; `None` when nothing is.
    fn next_deadline(&self) -> Option<Instant>;

    /// Does the timed work due at `now` (called once `now` has reached
    /// [`next_deadline`](Actor::next_deadline)).
    fn on_deadline(&mut self, now: Instant);

    /// Runs once after the last input (flushing what is held).
    fn stop(&mut self, _now: Instant) {}
}

/// Starts `actor` on a thread named `name`, fed by `channel`. The thread
/// ends once `shutdown` is cancelled or every [`Mailbox`] is dropped.
///
/// An idle actor sleeps until its next deadline: called within a tokio
/// runtime, a task wakes it when `shutdown` is cancelled; outside one, it
/// looks at the token every [`MAX_SLEEP`].
pub fn spawn<A: Actor>(
    name: &str,
    mut actor: A,
    channel: Channel<A::Input>,
    shutdown: CancellationToken,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let rx = channel.rx;
    // The actor's own mailbox must not keep it alive.
    drop(channel.mailbox);
    let poll = match tokio::runtime::Handle::try_current() {
        Ok(rt) => {
            let waker = rx.waker();
            let token = shutdown.clone();
            rt.spawn(async move {
                token.cancelled().await;
                waker.wake();
            });
            None
        }
        Err(_) => Some(MAX_SLEEP),
    };
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            actor.start(Instant::now());
            run(&mut actor, &rx, &shutdown, poll);
            actor.stop(Instant::now());
        })
}

fn run<A: Actor>(
    actor: &mut A,
    rx: &BoundedReceiver<A::Input>,
    shutdown: &CancellationToken,
    poll: Option<Duration>,
) {
    while !shutdown.is_cancelled() {
        let now = Instant::now();
        let mut wait = actor
            .next_deadline()
            .map_or(Duration::MAX, |d| d.saturating_duration_since(now));
        if let Some(p) = poll {
            wait = wait.min(p);
        }
        match rx.recv_timeout(wait) {
            Ok(input) => {
                actor.on_input(input, Instant::now());
                // What queued meanwhile is handled before timed work, so a
                // burst of responses costs one pass.
                for input in rx.try_iter().take(MAX_BATCH) {
                    actor.on_input(input, Instant::now());
                }
                actor.end_of_pass(Instant::now());
            }
            Err(std_mpsc::RecvTimeoutError::Timeout) => {}
            Err(std_mpsc::RecvTimeoutError::Disconnected) => break,
        }
        let now = Instant::now();
        if actor.next_deadline().is_some_and(|d| d <= now) {
            actor.on_deadline(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts inputs and ticks every 10 ms.
    struct Counter {
        inputs: u32,
        ticks: u32,
        next: Instant,
        done: std::sync::mpsc::Sender<(u32, u32)>,
    }

    impl Actor for Counter {
        type Input = Reply<u32>;
        fn on_input(&mut self, reply: Reply<u32>, _now: Instant) {
            self.inputs += 1;
            let _ = reply.send(Ok(self.inputs));
        }
        fn next_deadline(&self) -> Option<Instant> {
            Some(self.next)
        }
        fn on_deadline(&mut self, now: Instant) {
            self.ticks += 1;
            self.next = now + Duration::from_millis(10);
        }
        fn stop(&mut self, _now: Instant) {
            let _ = self.done.send((self.inputs, self.ticks));
        }
    }

    #[tokio::test]
    async fn calls_deadlines_and_shutdown() {
        let (done, stopped) = std::sync::mpsc::channel();
        let ch = Channel::bounded(4);
        let mailbox = ch.mailbox.clone();
        let shutdown = CancellationToken::new();
        let actor = Counter {
            inputs: 0,
            ticks: 0,
            next: Instant::now(),
            done,
        };
        let t = spawn("counter", actor, ch, shutdown.clone()).expect("spawn");
        assert_eq!(mailbox.call(|r| r).await, Ok(1));
        assert_eq!(mailbox.call(|r| r).await, Ok(2));
        tokio::time::sleep(Duration::from_millis(60)).await;
        shutdown.cancel();
        tokio::task::spawn_blocking(move || t.join())
            .await
            .expect("join")
            .expect("no panic");
        let (inputs, ticks) = stopped.recv().expect("stopped");
        assert_eq!(inputs, 2);
        assert!(ticks >= 2, "deadlines ran: {ticks}");
        assert_eq!(mailbox.call(|r| r).await, Err(ServiceError::Stopping));
    }

    /// Never has a deadline: only a wake-up or its inputs end its wait.
    struct Idle(std::sync::mpsc::Sender<()>);

    impl Actor for Idle {
        type Input = ();
        fn on_input(&mut self, _: (), _now: Instant) {}
        fn next_deadline(&self) -> Option<Instant> {
            None
        }
        fn on_deadline(&mut self, _now: Instant) {}
        fn stop(&mut self, _now: Instant) {
            let _ = self.0.send(());
        }
    }

    #[tokio::test]
    async fn an_idle_actor_stops_on_shutdown_and_when_its_mailboxes_go() {
        // Shutdown: the runtime's task wakes the sleeping thread.
        let (done, stopped) = std::sync::mpsc::channel();
        let ch = Channel::bounded(4);
        let _mailbox = ch.mailbox.clone();
        let shutdown = CancellationToken::new();
        let t = spawn("idle", Idle(done), ch, shutdown.clone()).expect("spawn");
        tokio::time::sleep(Duration::from_millis(20)).await;
        shutdown.cancel();
        let r = tokio::task::spawn_blocking(move || stopped.recv_timeout(Duration::from_secs(30)));
        assert_eq!(r.await.expect("join"), Ok(()), "stopped on shutdown");
        assert!(t.join().is_ok());

        // Every mailbox dropped: the last one wakes it.
        let (done, stopped) = std::sync::mpsc::channel();
        let ch = Channel::bounded(4);
        let mailbox = ch.mailbox.clone();
        let t = spawn("idle", Idle(done), ch, CancellationToken::new()).expect("spawn");
        assert_eq!(mailbox.offer(()), Ok(()));
        let again = mailbox.clone();
        drop(mailbox);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(
            stopped.try_recv(),
            Err(std::sync::mpsc::TryRecvError::Empty)
        );
        drop(again);
        let r = tokio::task::spawn_blocking(move || stopped.recv_timeout(Duration::from_secs(30)));
        assert_eq!(
            r.await.expect("join"),
            Ok(()),
            "stopped when its mailboxes went"
        );
        assert!(t.join().is_ok());
    }

    #[test]
    fn a_full_mailbox_is_busy_not_stopping() {
        let ch: Channel<u8> = Channel::bounded(1);
        assert_eq!(ch.mailbox.offer(1), Ok(()));
        assert_eq!(ch.mailbox.offer(2), Err(MailboxError::Busy));
        let mb = ch.mailbox.clone();
        drop(ch);
        assert_eq!(mb.offer(3), Err(MailboxError::Stopping));
    }

    #[test]
    fn a_bounded_queue_frees_its_places_as_items_leave() {
        let (tx, rx) = bounded::<u8>(2);
        assert!(tx.try_send(1).is_ok());
        assert!(tx.clone().try_send(2).is_ok());
        assert!(matches!(
            tx.try_send(3),
            Err(std_mpsc::TrySendError::Full(3))
        ));
        assert_eq!(rx.try_recv(), Ok(1));
        assert!(tx.try_send(3).is_ok());
        assert_eq!(rx.try_iter().collect::<Vec<_>>(), vec![2, 3]);
        assert_eq!(
            rx.recv_timeout(Duration::from_millis(1)),
            Err(std_mpsc::RecvTimeoutError::Timeout)
        );
        drop(rx);
        assert!(matches!(
            tx.try_send(4),
            Err(std_mpsc::TrySendError::Disconnected(4))
        ));
    }
}
