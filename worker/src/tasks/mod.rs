//! Job tasks the coordinator runs on this worker: generation and embedding shards, the prepare
//! step, training, calibration.
//!
//! The coordinator starts a task ([`TaskRunner::start`]) and polls it ([`TaskRunner::poll`]);
//! each poll renews its lease. A task runs in an owned tokio task (its CPU work on blocking
//! threads), keeps its progress and, once finished, its output until the coordinator has
//! committed it ([`TaskRunner::forget`]), so a restarted coordinator can re-attach. Starting the
//! same attempt twice is a no-op; a newer attempt of a task replaces an older one. Inputs and
//! outputs too large for a message are blobs in the worker's [`BlobStore`].

mod embed;
mod generate;
mod prepare;
mod train;

use crate::capabilities::LlmProbeConfig;
use ragd_shared::blobs::BlobStore;
use ragd_shared::protocol::jobs::{TaskProgress, TaskRef, TaskSpec, TaskStart, TaskState};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Errors of a task, as reported to the coordinator.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// The task's input is unusable: retrying elsewhere will fail the same way.
    #[error("{message}")]
    Invalid {
        /// What is wrong.
        message: String,
    },
    /// Something failed here; another attempt may succeed.
    #[error("{message}")]
    Failed {
        /// What went wrong.
        message: String,
    },
}

impl TaskError {
    fn invalid(message: impl Into<String>) -> Self {
        Self::Invalid {
            message: message.into(),
        }
    }

    fn failed(e: impl std::fmt::Display) -> Self {
        Self::Failed {
            message: e.to_string(),
        }
    }
}

/// The device a task asks for (`auto`, `cpu`, `cuda[:N]`, `metal[:N]`) and its description.
pub(crate) fn select_device(pref: &str) -> Result<(candle_core::Device, String), TaskError> {
    let pref = pref
        .parse::<ragd_engine::device::DevicePref>()
        .map_err(|e| TaskError::invalid(e.to_string()))?;
    let dev = ragd_engine::device::select(pref).map_err(|e| TaskError::invalid(e.to_string()))?;
    let name = ragd_engine::device::describe(&dev);
    Ok((dev, name))
}

/// What a running task writes its progress into.
#[derive(Clone)]
pub(crate) struct ProgressCell(Arc<Mutex<TaskState>>);

impl ProgressCell {
    fn update(&self, f: impl FnOnce(&mut TaskProgress)) {
        let mut state = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let TaskState::Running(p) = &mut *state {
            f(p);
        }
    }
}

struct Entry {
    attempt: u32,
    state: Arc<Mutex<TaskState>>,
    cancel: CancellationToken,
    /// Becomes true when the task ends (polls wait on it).
    ended: tokio::sync::watch::Receiver<bool>,
}

/// Where tasks find their resources.
#[derive(Clone)]
pub struct TaskEnv {
    /// The worker's blob store.
    pub blobs: BlobStore,
    /// Scratch directory for models and runs.
    pub work_dir: PathBuf,
    /// The worker's local LLM endpoints.
    pub llm: LlmProbeConfig,
    /// Generators already built and checked, by their settings (shards of a job share one:
    /// one HTTP client, one model check).
    pub generators: generate::GeneratorCache,
    /// The base model of the last embedding shards (a job's shards share one load).
    pub encoders: embed::EncoderCache,
}

impl TaskEnv {
    /// An environment with an empty generator cache.
    pub fn new(blobs: BlobStore, work_dir: PathBuf, llm: LlmProbeConfig) -> Self {
        Self {
            blobs,
            work_dir,
            llm,
            generators: Default::default(),
            encoders: Default::default(),
        }
    }
}

/// The worker's table of tasks.
pub struct TaskRunner {
    env: TaskEnv,
    entries: Mutex<HashMap<String, Entry>>,
    running: Mutex<JoinSet<()>>,
    busy: Arc<AtomicU32>,
    shutdown: CancellationToken,
}

impl TaskRunner {
    /// A runner; `busy` counts running tasks (reported in heartbeats); `shutdown` stops them all.
    pub fn new(env: TaskEnv, busy: Arc<AtomicU32>, shutdown: CancellationToken) -> Arc<Self> {
        Arc::new(Self {
            env,
            entries: Mutex::default(),
            running: Mutex::new(JoinSet::new()),
            busy,
            shutdown,
        })
    }

    /// The blob store.
    pub fn blobs(&self) -> &BlobStore {
        &self.env.blobs
    }

    /// Starts a task attempt (idempotent for the same attempt).
    pub fn start(&self, start: TaskStart) -> TaskRef {
        let task = start.task.clone();
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = entries.get(&task.task_id) {
            if e.attempt >= task.attempt {
                return TaskRef {
                    task_id: task.task_id,
                    attempt: e.attempt,
                };
            }
            e.cancel.cancel();
        }
        let state = Arc::new(Mutex::new(TaskState::Running(TaskProgress::default())));
        let cancel = self.shutdown.child_token();
        let (ended_tx, ended) = tokio::sync::watch::channel(false);
        entries.insert(
            task.task_id.clone(),
            Entry {
                attempt: task.attempt,
                state: state.clone(),
                cancel: cancel.clone(),
                ended,
            },
        );
        drop(entries);
        let (env, busy) = (self.env.clone(), self.busy.clone());
        let cell = ProgressCell(state.clone());
        tracing::info!(task = %task, job = %start.job_id, kind = start.spec.kind(), "task started");
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        while running.try_join_next().is_some() {}
        running.spawn(async move {
            busy.fetch_add(1, Ordering::SeqCst);
            let result = run_spec(&env, &task, start.spec, cell, cancel.clone()).await;
            busy.fetch_sub(1, Ordering::SeqCst);
            let final_state = match result {
                _ if cancel.is_cancelled() => TaskState::Cancelled,
                Ok(output) => TaskState::Done(output),
                Err(TaskError::Invalid { message }) => TaskState::Failed {
                    message,
                    retryable: false,
                },
                Err(TaskError::Failed { message }) => TaskState::Failed {
                    message,
                    retryable: true,
                },
            };
            match &final_state {
                TaskState::Failed { message, .. } => {
                    tracing::warn!(task = %task, error = %message, "task failed")
                }
                other => tracing::info!(task = %task, state = state_name(other), "task ended"),
            }
            *state.lock().unwrap_or_else(|p| p.into_inner()) = final_state;
            let _ = ended_tx.send(true);
        });
        start.task
    }

    /// The state of a task attempt once it ends or `wait` has passed, whichever comes first
    /// (a long poll: the coordinator learns of the end at once without polling rapidly).
    pub async fn poll_wait(&self, task: &TaskRef, wait: std::time::Duration) -> TaskState {
        let ended = {
            let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            entries
                .get(&task.task_id)
                .filter(|e| e.attempt == task.attempt)
                .map(|e| e.ended.clone())
        };
        if let Some(mut ended) = ended {
            let _ = tokio::time::timeout(wait, ended.wait_for(|e| *e)).await;
        }
        self.poll(task)
    }

    /// The state of a task attempt, now.
    pub fn poll(&self, task: &TaskRef) -> TaskState {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        match entries.get(&task.task_id) {
            Some(e) if e.attempt == task.attempt => {
                let mut state = e.state.lock().unwrap_or_else(|p| p.into_inner());
                let snapshot = state.clone();
                // Losses travel once: the coordinator stores them.
                if let TaskState::Running(p) = &mut *state {
                    p.losses.clear();
                }
                snapshot
            }
            _ => TaskState::Unknown,
        }
    }

    /// Stops a task attempt; returns its state.
    pub fn cancel(&self, task: &TaskRef) -> TaskState {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        match entries.get(&task.task_id) {
            Some(e) if e.attempt == task.attempt => {
                e.cancel.cancel();
                let state = e.state.lock().unwrap_or_else(|p| p.into_inner()).clone();
                match state {
                    TaskState::Running(_) => TaskState::Cancelled,
                    other => other,
                }
            }
            _ => TaskState::Unknown,
        }
    }

    /// Drops a finished task's record (its output is committed).
    pub fn forget(&self, task: &TaskRef) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries
            .get(&task.task_id)
            .is_some_and(|e| e.attempt == task.attempt)
        {
            if let Some(e) = entries.remove(&task.task_id) {
                e.cancel.cancel();
            }
        }
    }

    /// Cancels every task and waits for them to stop.
    pub async fn shutdown(&self) {
        self.shutdown.cancel();
        let mut running =
            std::mem::take(&mut *self.running.lock().unwrap_or_else(|p| p.into_inner()));
        while running.join_next().await.is_some() {}
    }
}

fn state_name(s: &TaskState) -> &'static str {
    match s {
        TaskState::Unknown => "unknown",
        TaskState::Running(_) => "running",
        TaskState::Done(_) => "done",
        TaskState::Failed { .. } => "failed",
        TaskState::Cancelled => "cancelled",
    }
}

async fn run_spec(
    env: &TaskEnv,
    task: &TaskRef,
    spec: TaskSpec,
    progress: ProgressCell,
    cancel: CancellationToken,
) -> Result<ragd_shared::protocol::jobs::TaskOutput, TaskError> {
    if !matches!(spec, TaskSpec::Embed(_)) {
        // The embedding shards are over; their model may go.
        env.encoders
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
    }
    // Each arm's future is boxed: the spawned task's future is then a few words instead of the
    // largest arm's state (training's), which `spawn` would copy into the task for every shard.
    match spec {
        TaskSpec::Generate(g) => Box::pin(generate::run(env, g, None, progress, cancel)).await,
        TaskSpec::GenerateWithin(g) => {
            let within = std::time::Duration::from_millis(g.within_ms);
            Box::pin(generate::run(
                env,
                g.generate,
                Some(within),
                progress,
                cancel,
            ))
            .await
        }
        TaskSpec::Train(t) => {
            let run = train::TrainRun::embedder(t);
            Box::pin(train::run_training(env, task, run, progress, cancel)).await
        }
        TaskSpec::TrainReranker(t) => {
            let run = train::TrainRun::reranker(t);
            Box::pin(train::run_training(env, task, run, progress, cancel)).await
        }
        TaskSpec::Calibrate(c) => Box::pin(train::run_calibration(env, c, progress, cancel)).await,
        TaskSpec::Prepare(p) => Box::pin(prepare::run(env, task, p, None, progress, cancel)).await,
        TaskSpec::Embed(e) => Box::pin(embed::run(env, e, progress, cancel)).await,
        TaskSpec::PrepareEmbedded(p) => {
            let embeddings = Some(p.embeddings);
            Box::pin(prepare::run(
                env, task, p.prepare, embeddings, progress, cancel,
            ))
            .await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ragd_shared::protocol::jobs::{Chunk, GenerateSpec, TaskOutput};

    fn ict_start(id: &str, attempt: u32) -> TaskStart {
        TaskStart {
            task: TaskRef {
                task_id: id.into(),
                attempt,
            },
            job_id: "j".into(),
            spec: TaskSpec::Generate(GenerateSpec {
                chunks: vec![Chunk {
                    id: "d_chunk_0".into(),
                    document_id: "d".into(),
                    text: "Autovacuum removes dead rows from tables. It runs quietly in the background. Busy tables are always processed first.".into(),
                }],
                llm: "ict".into(),
                queries_per_chunk: 2,
                seed: 7,
                temperature: 0.7,
                max_tokens: 64,
                concurrency: 1,
                request_timeout_ms: 1000,
            }),
        }
    }

    #[tokio::test]
    async fn tasks_run_once_per_attempt_and_are_forgotten() {
        let tmp = tempfile::tempdir().unwrap();
        let env = TaskEnv::new(
            BlobStore::open(&tmp.path().join("blobs")).unwrap(),
            tmp.path().join("work"),
            LlmProbeConfig::disabled(),
        );
        let busy = Arc::new(AtomicU32::new(0));
        let runner = TaskRunner::new(env, busy, CancellationToken::new());
        let r = runner.start(ict_start("t1", 1));
        assert_eq!(
            runner.start(ict_start("t1", 1)),
            r,
            "same attempt is a no-op"
        );
        let done = loop {
            match runner.poll(&r) {
                TaskState::Running(_) => {
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await
                }
                other => break other,
            }
        };
        let TaskState::Done(TaskOutput::Generated { questions, .. }) = done else {
            panic!("{done:?}")
        };
        assert_eq!(questions.len(), 2);
        assert!(questions.iter().all(|q| q.chunk_id == "d_chunk_0"));
        let stale = TaskRef {
            task_id: "t1".into(),
            attempt: 9,
        };
        assert_eq!(runner.poll(&stale), TaskState::Unknown);
        runner.forget(&r);
        assert_eq!(runner.poll(&r), TaskState::Unknown);
        runner.shutdown().await;
    }
}
