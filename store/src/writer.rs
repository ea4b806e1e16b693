//! The group-commit writer: one thread takes every pending append, commits
//! them as one RocksDB batch (one WAL sync for all), then answers each. While
//! a sync is in progress the next batch gathers, so the sync cost is paid
//! per batch, not per message. Between batches (at least once a second) it
//! sweeps expired messages and checks the free-disk floor.

use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::{Append, Inner, StoreError};

struct Request {
    append: Append,
    done: oneshot::Sender<Result<u64, StoreError>>,
}

pub(crate) struct Writer {
    // No lock around the sender: every connection submits through it.
    tx: Option<mpsc::Sender<Request>>,
    join: Option<JoinHandle<()>>,
}

const SWEEP_EVERY: Duration = Duration::from_secs(1);

impl Writer {
    pub(crate) fn start(inner: Arc<Inner>) -> Writer {
        let (tx, rx) = mpsc::channel::<Request>();
        let join = std::thread::Builder::new()
            .name("edgehub-store-writer".into())
            .spawn(move || run(inner, rx))
            .expect("spawn store writer thread");
        Writer {
            tx: Some(tx),
            join: Some(join),
        }
    }

    pub(crate) fn submit(
        &self,
        append: Append,
    ) -> Result<oneshot::Receiver<Result<u64, StoreError>>, StoreError> {
        let (done, rx) = oneshot::channel();
        self.tx
            .as_ref()
            .ok_or(StoreError::Closed)?
            .send(Request { append, done })
            .map_err(|_| StoreError::Closed)?;
        Ok(rx)
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}

fn run(inner: Arc<Inner>, rx: mpsc::Receiver<Request>) {
    let max = inner.cfg.max_batch.max(1);
    let mut last_sweep = Instant::now();
    loop {
        match rx.recv_timeout(SWEEP_EVERY) {
            Ok(first) => {
                let mut appends = vec![first.append];
                let mut dones = vec![first.done];
                while appends.len() < max {
                    match rx.try_recv() {
                        Ok(r) => {
                            appends.push(r.append);
                            dones.push(r.done);
                        }
                        Err(_) => break,
                    }
                }
                let results = inner.append_batch(&appends);
                for (done, r) in dones.into_iter().zip(results) {
                    let _ = done.send(r);
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if last_sweep.elapsed() >= SWEEP_EVERY {
            last_sweep = Instant::now();
            inner.check_disk();
            if let Err(e) = inner.sweep_expired() {
                tracing::error!(error = %e, "expiry sweep failed");
            }
        }
    }
}
