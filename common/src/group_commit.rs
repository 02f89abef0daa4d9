//! Group commit: concurrent callers' writes share one statement and one commit.
//!
//! Most of what PostgreSQL does for a small write is per statement, not per row: the round trip,
//! executor start-up, statement-level triggers, the commit and its WAL flush (BENCHMARKS.md, "Where
//! PostgreSQL's work per event goes"). So callers queue their items and wait; at most `slots` writes
//! run at once, each taking every item queued when it starts (up to `max_batch`). A lone caller never
//! waits for company (a free slot takes its item at once); batches form only while every slot is
//! busy, that is while the database is what callers wait for. Each caller gets its own item's result,
//! only once the write holding it has finished.
//!
//! Used by the api for POSTed events and by the worker for its lanes' effects.

use std::future::Future;
use std::sync::Arc;

use prometheus::Histogram;
use tokio::sync::{Semaphore, mpsc, oneshot};

/// Callers waiting for a write; more wait for room (and for their own deadlines).
const QUEUE: usize = 1024;

type Pending<T, R> = (T, oneshot::Sender<R>);

/// Hands items to the task forming batches; cheap to clone.
pub struct GroupCommit<T, R> {
    queue: mpsc::Sender<Pending<T, R>>,
}

impl<T, R> Clone for GroupCommit<T, R> {
    fn clone(&self) -> Self {
        Self { queue: self.queue.clone() }
    }
}

impl<T: Send + 'static, R: Send + 'static> GroupCommit<T, R> {
    /// Starts the task forming batches (call inside the runtime); `sizes` observes how many items
    /// each write takes. `write` gets a batch's items in the order they were queued and returns one
    /// result per item, in the same order. The task ends once every clone of the returned handle is
    /// dropped.
    pub fn start<W, F>(slots: usize, max_batch: usize, sizes: Histogram, write: W) -> Self
    where
        W: Fn(Vec<T>) -> F + Send + Sync + 'static,
        F: Future<Output = Vec<R>> + Send + 'static,
    {
        let (queue, waiting) = mpsc::channel(QUEUE);
        tokio::spawn(form_batches(slots, max_batch, waiting, move |items: Vec<T>| {
            sizes.observe(items.len() as f64);
            write(items)
        }));
        Self { queue }
    }

    /// Items queued for a write that has not started.
    pub fn queued(&self) -> usize {
        self.queue.max_capacity() - self.queue.capacity()
    }

    /// `item`'s result, once the write holding it has finished; `None` if the writing task is gone
    /// (the process is stopping, or the write panicked). A caller that stops waiting before its
    /// batch starts is left out of it; after, its item is written, or not, with its batch.
    pub async fn submit(&self, item: T) -> Option<R> {
        let (reply, result) = oneshot::channel();
        self.queue.send((item, reply)).await.ok()?;
        result.await.ok()
    }
}

async fn form_batches<T, R, W, F>(slots: usize, max_batch: usize, mut waiting: mpsc::Receiver<Pending<T, R>>, write: W)
where
    T: Send + 'static,
    R: Send + 'static,
    W: Fn(Vec<T>) -> F + Send + Sync + 'static,
    F: Future<Output = Vec<R>> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(slots));
    loop {
        let slot = Arc::clone(&slots).acquire_owned().await.expect("the semaphore is never closed");
        let mut batch = Vec::new();
        if waiting.recv_many(&mut batch, max_batch).await == 0 {
            return;
        }
        // A caller that stopped waiting (its deadline passed while queued) is not written for: it has
        // answered its client already, and the client may retry.
        batch.retain(|(_, reply): &Pending<T, R>| !reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        let (items, replies): (Vec<T>, Vec<oneshot::Sender<R>>) = batch.into_iter().unzip();
        let written = write(items);
        tokio::spawn(async move {
            let results = written.await;
            if results.len() != replies.len() {
                // A bug in `write`: no caller can be told which result is its own.
                tracing::error!(
                    items = replies.len(),
                    results = results.len(),
                    "a group write did not return one result per item"
                );
                return;
            }
            for (reply, result) in replies.into_iter().zip(results) {
                // A caller that stopped waiting has dropped its receiver.
                let _ = reply.send(result);
            }
            drop(slot);
        });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use super::*;

    fn sizes() -> Histogram {
        Histogram::with_opts(prometheus::HistogramOpts::new("sizes", "batch sizes")).unwrap()
    }

    #[tokio::test]
    async fn a_lone_item_goes_at_once_and_items_queued_meanwhile_share_the_next_write() {
        let batches = Arc::new(Mutex::new(Vec::new()));
        let (release, released) = tokio::sync::watch::channel(false);
        let seen = Arc::clone(&batches);
        let commits = GroupCommit::start(1, 3, sizes(), move |items: Vec<u32>| {
            seen.lock().unwrap().push(items.clone());
            let mut released = released.clone();
            async move {
                released.wait_for(|go| *go).await.unwrap();
                items.into_iter().map(|item| item * 10).collect::<Vec<_>>()
            }
        });
        let first = tokio::spawn({
            let commits = commits.clone();
            async move { commits.submit(1).await }
        });
        // The first write holds the only slot: the next four queue, and go three, then one.
        tokio::time::timeout(Duration::from_secs(5), async {
            while batches.lock().unwrap().is_empty() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap();
        let rest: Vec<_> = (2..=5)
            .map(|item| {
                let commits = commits.clone();
                tokio::spawn(async move { commits.submit(item).await })
            })
            .collect();
        tokio::time::timeout(Duration::from_secs(5), async {
            while commits.queued() < 4 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap();
        release.send(true).unwrap();
        assert_eq!(first.await.unwrap(), Some(10));
        let mut results = Vec::new();
        for handle in rest {
            results.push(handle.await.unwrap());
        }
        assert_eq!(results, [Some(20), Some(30), Some(40), Some(50)], "each caller gets its own item's result");
        assert_eq!(*batches.lock().unwrap(), [vec![1], vec![2, 3, 4], vec![5]]);
    }

    #[tokio::test]
    async fn an_item_whose_caller_gave_up_while_queued_is_not_written() {
        let batches = Arc::new(Mutex::new(Vec::new()));
        let (release, released) = tokio::sync::watch::channel(false);
        let seen = Arc::clone(&batches);
        let commits = GroupCommit::start(1, 8, sizes(), move |items: Vec<u32>| {
            seen.lock().unwrap().push(items.clone());
            let mut released = released.clone();
            async move {
                released.wait_for(|go| *go).await.unwrap();
                items
            }
        });
        let first = tokio::spawn({
            let commits = commits.clone();
            async move { commits.submit(1).await }
        });
        while batches.lock().unwrap().is_empty() {
            tokio::task::yield_now().await;
        }
        // Queued behind the first write, then abandoned (as a request past its deadline).
        let abandoned = tokio::spawn({
            let commits = commits.clone();
            async move { commits.submit(2).await }
        });
        while commits.queued() < 1 {
            tokio::task::yield_now().await;
        }
        abandoned.abort();
        assert!(abandoned.await.unwrap_err().is_cancelled());
        let kept = tokio::spawn({
            let commits = commits.clone();
            async move { commits.submit(3).await }
        });
        while commits.queued() < 2 {
            tokio::task::yield_now().await;
        }
        release.send(true).unwrap();
        assert_eq!(first.await.unwrap(), Some(1));
        assert_eq!(kept.await.unwrap(), Some(3));
        assert_eq!(*batches.lock().unwrap(), [vec![1], vec![3]]);
    }

    #[tokio::test]
    async fn a_write_that_panics_answers_none_and_frees_its_slot() {
        let commits = GroupCommit::start(1, 8, sizes(), |items: Vec<u32>| async move {
            assert!(!items.contains(&0), "poison");
            items
        });
        assert_eq!(commits.submit(0).await, None);
        assert_eq!(commits.submit(7).await, Some(7), "the next write still runs");
    }
}
