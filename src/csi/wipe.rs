//! Initial wipes of integrity volumes, run so that no CSI call times out: a
//! stage waits for its volume's wipe up to a budget, then answers ABORTED with
//! the progress and leaves the wipe running; the CO's retry finds it further on
//! or done. A crash loses at most one checkpointed stretch (see
//! [`crate::crypt::wipe`]), and unstage cancels a running wipe before closing.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tonic::Status;

use crate::crypt::{self, wipe};

struct Task {
    progress: wipe::Progress,
    cancel: AtomicBool,
    /// `None` while running, then how it ended.
    result: watch::Receiver<Option<Result<wipe::Wiped, Status>>>,
}

pub struct Wipes {
    budget: Duration,
    tasks: Mutex<HashMap<String, Arc<Task>>>,
}

impl Wipes {
    /// `budget`: how long a stage waits for a wipe before answering ABORTED.
    pub fn new(budget: Duration) -> Self {
        Wipes {
            budget,
            tasks: Mutex::default(),
        }
    }

    /// Finishes the wipe of `volume` (open on `mapped`, header on `device`) that
    /// the token says stopped at `from`: starts it unless it runs already, and
    /// waits for it up to the budget.
    pub async fn ensure(
        &self,
        volume: &str,
        device: PathBuf,
        mapped: PathBuf,
        from: u64,
    ) -> Result<(), Status> {
        let task = {
            let mut tasks = self.tasks.lock().expect("wipe table");
            tasks
                .entry(volume.to_string())
                .or_insert_with(|| spawn(volume, device, mapped, from))
                .clone()
        };
        let mut result = task.result.clone();
        let finished = tokio::time::timeout(self.budget, result.wait_for(Option::is_some)).await;
        match finished {
            Ok(state) => {
                // The worker cannot end without a result short of a panic.
                let outcome = match state {
                    Ok(state) => state.clone().expect("finished"),
                    Err(_) => Err(Status::internal("the integrity wipe worker stopped")),
                };
                self.forget(volume, &task);
                match outcome? {
                    wipe::Wiped::Done => Ok(()),
                    wipe::Wiped::Cancelled { at } => Err(Status::aborted(format!(
                        "volume {volume}: the integrity wipe was cancelled at byte {at}; \
                         the next stage resumes it"
                    ))),
                }
            }
            Err(_) => Err(Status::aborted(format!(
                "volume {volume}: integrity wipe in progress, {}% of {} MiB written; \
                 the stage completes on a retry once it is done",
                task.progress.percent(),
                task.progress.total.load(Ordering::Relaxed) >> 20
            ))),
        }
    }

    /// Stops a running wipe of `volume` at its next checkpoint and waits for it,
    /// so that its mapping can be closed. No-op when none runs.
    pub async fn cancel(&self, volume: &str) {
        let task = self.tasks.lock().expect("wipe table").get(volume).cloned();
        if let Some(task) = task {
            task.cancel.store(true, Ordering::Relaxed);
            let mut result = task.result.clone();
            let _ = result.wait_for(Option::is_some).await;
            self.forget(volume, &task);
            tracing::info!(volume, "integrity wipe stopped for unstage");
        }
    }

    fn forget(&self, volume: &str, task: &Arc<Task>) {
        let mut tasks = self.tasks.lock().expect("wipe table");
        if tasks.get(volume).is_some_and(|t| Arc::ptr_eq(t, task)) {
            tasks.remove(volume);
        }
    }
}

fn spawn(volume: &str, device: PathBuf, mapped: PathBuf, from: u64) -> Arc<Task> {
    let (tx, rx) = watch::channel(None);
    let task = Arc::new(Task {
        progress: wipe::Progress::default(),
        cancel: AtomicBool::new(false),
        result: rx,
    });
    tracing::info!(volume, from, mapped = %mapped.display(), "integrity wipe starting");
    let worker = task.clone();
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || {
        let _entered = span.enter();
        let out = crypt::wipe_blocking(&device, &mapped, from, &worker.progress, &worker.cancel)
            .map_err(Status::from);
        if let Err(e) = &out {
            tracing::warn!(error = %e.message(), "integrity wipe failed; the next stage resumes it");
        }
        let _ = tx.send(Some(out));
    });
    task
}
