//! How the driver's answers reach the tasks waiting for them.
//!
//! The driver thread answers a round's requests together, often thousands at once. Completing
//! each one from the driver thread is a cross-thread wake per request: the waiting task goes
//! through tokio's injection queue (a lock per task), and the task's memory and the reply
//! channel's are pulled from the other core and back. Instead the driver hands the round's
//! answers for one runtime to a *dispatcher* task running on that runtime, with one wake, and
//! the dispatcher completes them there, where waking a task is a push on the worker's own queue
//! and the reply channels never leave the client's core. In a null-driver experiment (4,096
//! tasks on one worker) this doubled the requests a worker completes per second; see
//! `examples/bench.rs` for the engine figures.
//!
//! Routes: a call finds (or starts) the dispatcher of the multi-threaded runtime it runs on and
//! passes its route, a small index, with the request. A call made outside such a runtime, or
//! whose dispatcher has gone (its runtime shut down), is answered directly by the driver.
//! A dispatcher that is dropped hands back what it still holds by answering it directly, so no
//! answer is ever lost.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::runtime::{self, Handle, RuntimeFlavor};
use tokio::sync::{Notify, oneshot};

use crate::engine::driver::Reply;
use crate::sync::lock;

/// The route of a call answered directly by the driver.
pub(crate) const DIRECT: u32 = u32::MAX;

/// A reply channel with its answer.
type Delivery = (oneshot::Sender<Reply>, Reply);

/// Answers waiting for one runtime's dispatcher.
struct Mailbox {
    state: Mutex<MailboxState>,
    /// Wakes the dispatcher; a permit is stored when it is not waiting, so no wake is lost.
    notify: Notify,
}

struct MailboxState {
    /// True while no dispatcher serves this mailbox: deliveries go directly to their callers.
    closed: bool,
    answers: Vec<Delivery>,
}

impl Mailbox {
    /// Hands `deliveries` to the dispatcher, or answers them directly if there is none.
    fn post(&self, deliveries: impl Iterator<Item = Delivery>) {
        let mut state = lock(&self.state);
        if state.closed {
            drop(state);
            deliveries.for_each(|(reply, answer)| {
                let _ = reply.send(answer); // the caller may have given up
            });
            return;
        }
        let was_empty = state.answers.is_empty();
        state.answers.extend(deliveries);
        let posted = !state.answers.is_empty();
        drop(state);
        // A non-empty mailbox already has a wake pending.
        if was_empty && posted {
            self.notify.notify_one();
        }
    }

    /// Marks the mailbox unserved and answers what it holds directly.
    fn close(&self) {
        let answers = {
            let mut state = lock(&self.state);
            state.closed = true;
            std::mem::take(&mut state.answers)
        };
        for (reply, answer) in answers {
            let _ = reply.send(answer);
        }
    }
}

/// Closes its mailbox when the dispatcher ends, whether it returned or its runtime dropped it.
struct CloseOnDrop(Arc<Mailbox>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// The dispatcher: completes the answers posted to `mailbox`, on the runtime it was spawned on.
/// The guard that closes the mailbox is made here, outside the future, which holds it from the
/// start: a runtime that shuts down before the task was first polled drops it unpolled, and an
/// `async fn` would not have made its guard yet, leaving the mailbox open with nobody serving it
/// (answers posted there were never delivered).
fn dispatch(mailbox: Arc<Mailbox>) -> impl std::future::Future<Output = ()> + Send {
    let close = CloseOnDrop(mailbox.clone());
    async move {
        let _close = close;
        serve(&mailbox).await;
    }
}

async fn serve(mailbox: &Mailbox) {
    let mut batch = Vec::new();
    loop {
        mailbox.notify.notified().await;
        {
            let mut state = lock(&mailbox.state);
            if state.closed {
                return;
            }
            std::mem::swap(&mut batch, &mut state.answers);
        }
        for (reply, answer) in batch.drain(..) {
            let _ = reply.send(answer);
        }
    }
}

/// Gives each router a unique id for the per-thread route cache (an address could be reused).
static NEXT_ROUTER_ID: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// The route last found on this thread: (router id, runtime, route). A thread serves one
    /// runtime at a time, so this spares most calls the router's lock.
    static LAST_ROUTE: Cell<Option<(u64, runtime::Id, u32)>> = const { Cell::new(None) };
}

/// One engine's dispatchers, one per runtime its calls came from.
pub(crate) struct ReplyRouter {
    id: u64,
    /// Indexed by route. Mailboxes are never removed, so a route stays valid; one whose runtime
    /// is gone is closed, and reused for the next new runtime.
    mailboxes: Mutex<Vec<(runtime::Id, Arc<Mailbox>)>>,
}

impl Default for ReplyRouter {
    fn default() -> Self {
        ReplyRouter {
            id: NEXT_ROUTER_ID.fetch_add(1, Ordering::Relaxed),
            mailboxes: Mutex::new(Vec::new()),
        }
    }
}

impl ReplyRouter {
    /// The route for a call made here: the current runtime's dispatcher, started if need be,
    /// or [`DIRECT`] outside a multi-threaded tokio runtime.
    ///
    /// Only a multi-threaded runtime runs its tasks for as long as it lives. A current-thread
    /// runtime runs them only inside its `block_on`, so a call polled by another executor under
    /// its `enter()` guard would wait for a dispatcher that never runs; such calls, and calls on
    /// a current-thread runtime generally, are answered directly.
    pub(crate) fn route_here(&self) -> u32 {
        let Ok(handle) = Handle::try_current() else {
            return DIRECT;
        };
        if handle.runtime_flavor() != RuntimeFlavor::MultiThread {
            return DIRECT;
        }
        let runtime = handle.id();
        if let Some((router, cached_runtime, route)) = LAST_ROUTE.get()
            && router == self.id
            && cached_runtime == runtime
        {
            return route;
        }
        let route = self.find_or_start(&handle, runtime);
        LAST_ROUTE.set(Some((self.id, runtime, route)));
        route
    }

    fn find_or_start(&self, handle: &Handle, runtime: runtime::Id) -> u32 {
        let mut mailboxes = lock(&self.mailboxes);
        let serving = |mailbox: &Mailbox| !lock(&mailbox.state).closed;
        if let Some(route) = mailboxes
            .iter()
            .position(|(id, mailbox)| *id == runtime && serving(mailbox))
        {
            return route as u32;
        }
        let reusable = mailboxes.iter().position(|(_, mailbox)| !serving(mailbox));
        let route = match reusable {
            Some(route) => {
                mailboxes[route].0 = runtime;
                route
            }
            None if mailboxes.len() < DIRECT as usize => {
                let mailbox = Arc::new(Mailbox {
                    state: Mutex::new(MailboxState {
                        closed: true,
                        answers: Vec::new(),
                    }),
                    notify: Notify::new(),
                });
                mailboxes.push((runtime, mailbox));
                mailboxes.len() - 1
            }
            None => return DIRECT,
        };
        let mailbox = mailboxes[route].1.clone();
        lock(&mailbox.state).closed = false;
        // A runtime that is shutting down drops the task, polled or not, which closes the
        // mailbox again: calls routed here are then answered directly.
        drop(handle.spawn(dispatch(mailbox)));
        route as u32
    }

    /// A copy of the mailbox list, for the driver to post to without the router's lock.
    fn snapshot(&self) -> Vec<Arc<Mailbox>> {
        lock(&self.mailboxes)
            .iter()
            .map(|(_, mailbox)| mailbox.clone())
            .collect()
    }
}

impl Drop for ReplyRouter {
    /// Ends the dispatchers: the engine, and with it every caller's way in, is gone.
    fn drop(&mut self) {
        for (_, mailbox) in lock(&self.mailboxes).iter() {
            mailbox.close();
            mailbox.notify.notify_one();
        }
    }
}

/// The driver's side: posts a round's answers to their dispatchers.
pub(crate) struct ReplyPoster {
    router: Arc<ReplyRouter>,
    /// The router's mailboxes as last seen; refreshed when a route beyond it shows up.
    mailboxes: Vec<Arc<Mailbox>>,
}

impl ReplyPoster {
    pub(crate) fn new(router: Arc<ReplyRouter>) -> Self {
        ReplyPoster {
            router,
            mailboxes: Vec::new(),
        }
    }

    /// Delivers `deliveries`, each with its route: runs of one route go to its dispatcher in
    /// one post; direct routes, and a lone answer, are answered here (one wake-up either way,
    /// and a lone caller, as a single client is, is answered without the dispatcher's hop).
    pub(crate) fn post(&mut self, deliveries: impl IntoIterator<Item = (u32, Delivery)>) {
        let mut deliveries = deliveries.into_iter().peekable();
        while let Some((route, first)) = deliveries.next() {
            let lone = deliveries.peek().is_none_or(|(next, _)| *next != route);
            let mailbox = if lone { None } else { self.mailbox(route) };
            let mut run = std::iter::once(first).chain(std::iter::from_fn(|| {
                deliveries
                    .next_if(|(next, _)| *next == route)
                    .map(|(_, d)| d)
            }));
            match mailbox {
                Some(mailbox) => mailbox.post(&mut run),
                None => run.for_each(|(reply, answer)| {
                    let _ = reply.send(answer);
                }),
            }
        }
    }

    fn mailbox(&mut self, route: u32) -> Option<Arc<Mailbox>> {
        if route == DIRECT {
            return None;
        }
        let index = route as usize;
        if index >= self.mailboxes.len() {
            self.mailboxes = self.router.snapshot();
        }
        self.mailboxes.get(index).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::apply::Unanswered;

    fn answer(reply: oneshot::Sender<Reply>) -> Delivery {
        (reply, Err(Unanswered::TimedOut))
    }

    fn multi_thread_runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .unwrap()
    }

    #[test]
    fn outside_a_multi_threaded_runtime_calls_are_answered_directly() {
        let router = Arc::new(ReplyRouter::default());
        assert_eq!(router.route_here(), DIRECT);
        let current_thread = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        assert_eq!(
            current_thread.block_on(async { router.route_here() }),
            DIRECT
        );
        let mut poster = ReplyPoster::new(router);
        let (reply, mut answer_rx) = oneshot::channel();
        poster.post([(DIRECT, answer(reply))]);
        assert!(matches!(
            answer_rx.try_recv(),
            Ok(Err(Unanswered::TimedOut))
        ));
    }

    #[test]
    fn each_runtime_gets_its_own_dispatcher_and_answers_arrive() {
        let router = Arc::new(ReplyRouter::default());
        let (first, second) = (multi_thread_runtime(), multi_thread_runtime());
        let route_a = first.block_on(async { router.route_here() });
        let route_b = second.block_on(async { router.route_here() });
        assert_ne!(route_a, DIRECT);
        assert_ne!(route_b, DIRECT);
        assert_ne!(route_a, route_b, "one dispatcher per runtime");
        assert_eq!(first.block_on(async { router.route_here() }), route_a);

        let mut poster = ReplyPoster::new(router.clone());
        let (replies, receivers): (Vec<_>, Vec<_>) =
            (0..10).map(|_| oneshot::channel::<Reply>()).unzip();
        let routes = (0..10).map(|i| if i % 3 == 0 { route_b } else { route_a });
        poster.post(routes.zip(replies.into_iter().map(answer)));
        let answered = first.block_on(async {
            let mut answered = 0;
            for receiver in receivers {
                if matches!(receiver.await, Ok(Err(Unanswered::TimedOut))) {
                    answered += 1;
                }
            }
            answered
        });
        assert_eq!(
            answered, 10,
            "every answer arrives, through either dispatcher"
        );
    }

    #[test]
    fn closing_a_mailbox_answers_what_it_held_and_later_posts_directly() {
        let mailbox = Mailbox {
            state: Mutex::new(MailboxState {
                closed: false,
                answers: Vec::new(),
            }),
            notify: Notify::new(),
        };
        let (held, mut held_rx) = oneshot::channel();
        mailbox.post(std::iter::once(answer(held)));
        assert!(held_rx.try_recv().is_err(), "waits for a dispatcher");
        mailbox.close();
        assert!(matches!(held_rx.try_recv(), Ok(Err(Unanswered::TimedOut))));
        let (late, mut late_rx) = oneshot::channel();
        mailbox.post(std::iter::once(answer(late)));
        assert!(matches!(late_rx.try_recv(), Ok(Err(Unanswered::TimedOut))));
    }

    #[test]
    fn a_dead_runtime_closes_its_mailbox_and_the_next_runtime_reuses_it() {
        let router = Arc::new(ReplyRouter::default());
        let runtime = multi_thread_runtime();
        let route = runtime.block_on(async { router.route_here() });
        let mut poster = ReplyPoster::new(router.clone());
        let (held, held_rx) = oneshot::channel();
        poster.post([(route, answer(held))]);
        drop(runtime); // its dispatcher answered, or answers as it is dropped
        assert!(matches!(
            held_rx.blocking_recv(),
            Ok(Err(Unanswered::TimedOut))
        ));
        let (late, mut late_rx) = oneshot::channel();
        poster.post([(route, answer(late))]);
        assert!(
            matches!(late_rx.try_recv(), Ok(Err(Unanswered::TimedOut))),
            "a closed mailbox answers directly"
        );
        let next = multi_thread_runtime();
        assert_eq!(
            next.block_on(async { router.route_here() }),
            route,
            "the closed mailbox serves the next runtime"
        );
    }
}
