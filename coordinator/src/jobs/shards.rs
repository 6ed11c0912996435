//! Sharded stages (generation, embedding): a stage's work is cut into shards, one task each,
//! created once in `jobs.db`; every eligible worker runs lanes, and each lane leases the next
//! pending shard, runs it and commits its result by (shard, attempt). A fast worker therefore
//! takes more shards. A lane whose worker is lost gives its shard back; a shard that keeps
//! failing is set aside after `max_attempts`, and the stage carries on without it. What a stage
//! does with a shard is its [`ShardWork`].

use super::drive::{drive, DriveError, JobCtx};
use super::JobError;
use ragd_shared::protocol::admin::WorkerRecord;
use ragd_shared::protocol::jobs::{TaskOutput, TaskRef, TaskSpec, TaskStart};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// What one sharded stage does with its shards.
pub trait ShardWork: Send + Sync + 'static {
    /// The stage's name in `jobs.db` and in events.
    fn stage(&self) -> &'static str;
    /// How many lanes `worker` (ready) gets; 0 when it cannot take these shards.
    fn lanes(&self, ctx: &JobCtx, worker: &WorkerRecord) -> usize;
    /// What the job log says while no worker can take a shard.
    fn waiting(&self) -> String;
    /// Whether the stage waits for a worker while none can take a shard (otherwise it ends,
    /// leaving the pending shards to its caller).
    fn waits_for_workers(&self) -> bool {
        true
    }
    /// After this many failed shards in a row a worker takes no more shards of this run of the
    /// stage (`None`: it keeps trying; a worker with a broken model would otherwise have every
    /// shard set aside).
    fn failures_in_a_row_allowed(&self) -> Option<u32> {
        None
    }
    /// Whether `worker`'s lane leases another shard: checked before each one (a worker that
    /// reconnected speaking an older protocol, say, takes no more).
    fn takes_shards(&self, ctx: &JobCtx, worker: &str) -> bool {
        ctx.worker_ready(worker)
    }
    /// Readies `worker` before its lane's first shard (sends it the inputs shards share); an
    /// error ends the lane.
    fn ready(&self, ctx: &JobCtx, worker: &str) -> impl Future<Output = Result<(), String>> + Send;
    /// The task of a shard for `worker`, from its payload; an error sets the shard aside.
    fn spec(&self, ctx: &JobCtx, worker: &str, payload: &str) -> Result<TaskSpec, String>;
    /// What to commit for the output of the shard of `payload` (JSON); an error counts as a
    /// failed attempt.
    fn commit(&self, ctx: &JobCtx, payload: &str, output: TaskOutput) -> Result<String, String>;
}

/// How often a sharded stage's live line counts its shards.
const LIVE_COUNT_EVERY: Duration = Duration::from_secs(1);

/// Runs the pending shards of `work`'s stage over the cluster until none is left, or until
/// `deadline` (no shard is leased after it; those leased finish, unless their task itself stops
/// at the deadline, as `GenerateWithin` does). The results are in `jobs.db`.
pub async fn run_shards<W: ShardWork>(
    ctx: &JobCtx,
    job: &str,
    work: Arc<W>,
    max_attempts: u32,
    deadline: Option<Instant>,
    cancel: &CancellationToken,
) -> Result<(), JobError> {
    let stage = work.stage();
    let past = || deadline.is_some_and(|d| Instant::now() >= d);
    let mut lanes: JoinSet<bool> = JoinSet::new();
    // The worker of each running lane (a lane that panics is known only by its task id).
    let mut lane_worker: HashMap<tokio::task::Id, String> = HashMap::new();
    let mut active: BTreeMap<String, usize> = BTreeMap::new();
    // Workers that could not be readied: not tried again in this run of the stage.
    let mut refused: HashSet<String> = HashSet::new();
    let mut announced_none = false;
    let mut counted: Option<Instant> = None;
    loop {
        if cancel.is_cancelled() {
            lanes.shutdown().await;
            return Err(JobError::Cancelled);
        }
        ctx.db.expire_leases(job, false, max_attempts).await?;
        let open = ctx.db.open_tasks(job, stage)?;
        let done = !open.leased && (!open.pending || past());
        // Counting reads every task of the stage: the live line is refreshed every
        // LIVE_COUNT_EVERY (and at the end), off the runtime's threads, not every tick.
        if done || counted.is_none_or(|t| t.elapsed() >= LIVE_COUNT_EVERY) {
            counted = Some(Instant::now());
            show_counts(ctx, job, stage, &active).await;
        }
        if done {
            break;
        }
        // Start lanes on eligible workers that have none, while shards wait for one.
        let mut any = !active.is_empty();
        for w in ctx.registry.snapshot() {
            if past()
                || !open.pending
                || active.contains_key(&w.id)
                || refused.contains(&w.id)
                || !ctx.worker_ready(&w.id)
            {
                continue;
            }
            let n = work.lanes(ctx, &w);
            if n == 0 {
                continue;
            }
            for _ in 0..n {
                let (ctx, job, id) = (ctx.clone(), job.to_string(), w.id.clone());
                let (work, cancel) = (work.clone(), cancel.clone());
                let handle = lanes.spawn(async move {
                    let w = work.as_ref();
                    lane(&ctx, &job, &id, w, max_attempts, deadline, &cancel).await
                });
                lane_worker.insert(handle.id(), w.id.clone());
            }
            active.insert(w.id.clone(), n);
            any = true;
        }
        if !any && !work.waits_for_workers() {
            break;
        }
        if !any && !announced_none {
            ctx.db.event(job, &work.waiting())?;
            announced_none = true;
        }
        tokio::select! {
            Some(ended) = lanes.join_next_with_id(), if !lanes.is_empty() => {
                let (task, readied) = match ended {
                    Ok((task, readied)) => (task, readied),
                    Err(e) => {
                        // A panicked lane: its shard's lease expires and goes back; the worker
                        // may take a new lane.
                        tracing::error!(error = %e, stage, "a shard lane panicked");
                        (e.id(), true)
                    }
                };
                if let Some(id) = lane_worker.remove(&task) {
                    if !readied {
                        refused.insert(id.clone());
                    }
                    if let Some(n) = active.get_mut(&id) {
                        *n -= 1;
                        if *n == 0 { active.remove(&id); }
                    }
                }
            }
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }
    lanes.shutdown().await;
    Ok(())
}

/// Sets the stage's live line from its task counts (read on a blocking thread).
async fn show_counts(ctx: &JobCtx, job: &str, stage: &str, active: &BTreeMap<String, usize>) {
    let db = ctx.db.clone();
    let (j, s) = (job.to_string(), stage.to_string());
    let Ok(Ok(counts)) = tokio::task::spawn_blocking(move || db.task_counts(&j, &s)).await else {
        return;
    };
    let counts: BTreeMap<String, u64> = counts.into_iter().collect();
    let count = |k: &str| counts.get(k).copied().unwrap_or(0);
    ctx.set_live(
        job,
        stage,
        format!(
            "{stage}: {}/{} shards done, {} set aside, lanes {active:?}",
            count("done"),
            counts.values().sum::<u64>(),
            count("set_aside"),
        ),
    );
}

/// One lane: ready the worker, then lease, run, commit, until no shard is pending or the worker
/// is gone. Returns false when the worker could not be readied, or failed more shards in a row
/// than the stage allows.
async fn lane<W: ShardWork>(
    ctx: &JobCtx,
    job: &str,
    worker: &str,
    work: &W,
    max_attempts: u32,
    deadline: Option<Instant>,
    cancel: &CancellationToken,
) -> bool {
    if let Err(e) = work.ready(ctx, worker).await {
        let _ = ctx.db.event(
            job,
            &format!("{}: {worker} cannot take shards: {e}", work.stage()),
        );
        return false;
    }
    let mut committed = Vec::new();
    let lane = Lane {
        ctx,
        job,
        worker,
        work,
        max_attempts,
    };
    let usable = lane.run(deadline, cancel, &mut committed).await;
    // What the last request could not carry: the worker may drop these results now.
    if let Some(conn) = ctx.supervisor.connection(worker) {
        for task in &committed {
            let _ = super::remote::forget(&conn, task).await;
        }
    }
    usable
}

/// What a lane works with.
struct Lane<'a, W> {
    ctx: &'a JobCtx,
    job: &'a str,
    worker: &'a str,
    work: &'a W,
    max_attempts: u32,
}

impl<W: ShardWork> Lane<'_, W> {
    /// Returns when the lane is done: false when the worker failed more shards in a row than
    /// the stage allows. Results it has committed wait in `committed` until the next task's
    /// request tells the worker to forget them.
    async fn run(
        &self,
        deadline: Option<Instant>,
        cancel: &CancellationToken,
        committed: &mut Vec<TaskRef>,
    ) -> bool {
        let Lane {
            ctx,
            job,
            worker,
            work,
            max_attempts,
        } = *self;
        let (stage, ttl) = (work.stage(), ctx.lease_ttl.as_millis() as u64);
        let mut failed_here: HashSet<String> = HashSet::new();
        let mut failures_in_a_row = 0u32;
        loop {
            let past = deadline.is_some_and(|d| Instant::now() >= d);
            if past || cancel.is_cancelled() || !work.takes_shards(ctx, worker) {
                return true;
            }
            if work
                .failures_in_a_row_allowed()
                .is_some_and(|n| failures_in_a_row >= n)
            {
                let _ = ctx.db.event(
                    job,
                    &format!(
                        "{stage}: {worker} failed {failures_in_a_row} shards in a row; it takes no more"
                    ),
                );
                return false;
            }
            // The shard's `seconds`: from asking for the lease to handing the result to the writer.
            let t0 = Instant::now();
            let task = match ctx.db.lease_shard(job, stage, worker, ttl).await {
                Ok(Some(t)) => t,
                Ok(None) => return true,
                Err(e) => {
                    tracing::warn!(error = %e, stage, "cannot lease a shard");
                    return true;
                }
            };
            let release = |why: String, limit: u32| {
                let (id, attempt) = (task.id.clone(), task.attempts);
                async move {
                    if let Err(e) = ctx.db.release(&id, attempt, &why, limit).await {
                        tracing::warn!(error = %e, task = %id, "shard release not recorded");
                    }
                }
            };
            let spec = match work.spec(ctx, worker, &task.payload) {
                Ok(s) => s,
                Err(e) => {
                    release(e, 0).await;
                    continue;
                }
            };
            let tref = task.task_ref();
            let start = TaskStart {
                task: tref.clone(),
                job_id: job.to_string(),
                spec,
            };
            let forget = std::mem::take(committed);
            let result = drive(ctx, worker, start, forget, true, cancel, |_| async {}).await;
            match result.map(|out| work.commit(ctx, &task.payload, out)) {
                Ok(Ok(json)) => {
                    failures_in_a_row = 0;
                    let secs = t0.elapsed().as_secs_f64();
                    match ctx
                        .db
                        .commit_task(&task.id, task.attempts, worker, &json, secs)
                        .await
                    {
                        Ok(true) => {
                            tracing::debug!(job, worker, stage, shard = task.idx, "shard committed")
                        }
                        Ok(false) => tracing::info!(
                            job,
                            worker,
                            stage,
                            shard = task.idx,
                            "late result of a re-leased shard ignored"
                        ),
                        Err(e) => tracing::warn!(error = %e, stage, "shard commit failed"),
                    }
                    committed.push(tref);
                }
                Ok(Err(message)) => {
                    failures_in_a_row += 1;
                    release(message, max_attempts).await
                }
                Err(DriveError::Cancelled) => {
                    release("cancelled".into(), u32::MAX).await;
                    return true;
                }
                Err(DriveError::LeaseLost) => {}
                Err(DriveError::Lost(why)) => {
                    let _ = ctx.db.event(
                        job,
                        &format!(
                            "{stage}: worker {worker} lost during shard {} ({why}); shard goes back",
                            task.idx
                        ),
                    );
                    release(why, max_attempts).await;
                    return true;
                }
                Err(DriveError::Failed { message, retryable }) => {
                    tracing::warn!(job, worker, stage, shard = task.idx, error = %message, "shard failed");
                    failures_in_a_row += 1;
                    release(message, if retryable { max_attempts } else { 0 }).await;
                    // A worker that fails the same shard twice leaves it to the others.
                    if !failed_here.insert(task.id.clone()) {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
        }
    }
}
