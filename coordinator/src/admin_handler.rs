//! What the admin socket is answered with: the daemon's handler ([`AdminHandler`]: workers, the
//! join token, jobs and models), and the CLI's side ([`admin_request`]), which falls back to the
//! state directory for what needs no daemon.

use crate::admin::{self, AdminRequest, AdminResponse};
use crate::cluster::open_initialised;
use crate::config::CoordinatorConfig;
use crate::jobs::{self, JobService};
use crate::pki::CoordinatorPki;
use crate::policy::EnrolledWorkers;
use crate::registry::Registry;
use crate::store::Store;
use crate::supervisor::Supervisor;
use crate::CoordError;
use ragd_shared::identity::JoinToken;
use std::sync::Arc;

/// The daemon's answers to admin requests.
#[derive(Clone)]
pub struct AdminHandler {
    /// Durable state (workers, join secret).
    pub store: Arc<Store>,
    /// The cluster CA (for the token's fingerprint).
    pub pki: Arc<CoordinatorPki>,
    /// The live worker table.
    pub registry: Arc<Registry>,
    /// The admission policy (revoked on removal).
    pub policy: Arc<EnrolledWorkers>,
    /// Worker sessions (a removed worker is disconnected).
    pub supervisor: Arc<Supervisor>,
    /// Jobs and models.
    pub jobs: Arc<JobService>,
}

impl AdminHandler {
    /// Answers one request.
    pub async fn handle(&self, req: AdminRequest) -> AdminResponse {
        if let Some(resp) = job_admin(&self.jobs, &req) {
            return resp;
        }
        match req {
            AdminRequest::ListWorkers => AdminResponse::Workers(self.registry.snapshot()),
            req @ (AdminRequest::RemoveWorker { .. }
            | AdminRequest::RemoveWorkerRotatingToken { .. }) => {
                let resp = offline_admin(&self.store, &self.pki, req);
                if let AdminResponse::Removed { id } | AdminResponse::RemovedRotated { id, .. } =
                    &resp
                {
                    self.policy.revoke(id);
                    self.registry.removed(id);
                    self.supervisor
                        .disconnect(id, "removed by the cluster admin");
                    tracing::info!(worker = %id, "worker removed");
                }
                resp
            }
            other => offline_admin(&self.store, &self.pki, other),
        }
    }
}

/// Sends an admin request to the running daemon; for requests that only touch durable state,
/// falls back to the state directory when no daemon runs.
pub async fn admin_request(
    cfg: &CoordinatorConfig,
    req: AdminRequest,
) -> Result<AdminResponse, CoordError> {
    let dir = cfg.state_dir()?;
    match admin::call(&dir, &req).await {
        Ok(AdminResponse::Error(e)) => Err(CoordError::Daemon(e)),
        Ok(resp) => Ok(resp),
        Err(admin::AdminError::NotRunning { path }) => match req {
            AdminRequest::ListWorkers => Err(admin::AdminError::NotRunning { path }.into()),
            other => {
                let store = open_initialised(&dir)?;
                let pki = CoordinatorPki::load(&dir)?;
                Ok(offline_admin(&store, &pki, other))
            }
        },
        Err(e) => Err(e.into()),
    }
}

fn offline_admin(store: &Store, pki: &CoordinatorPki, req: AdminRequest) -> AdminResponse {
    let token = |secret| {
        JoinToken {
            ca_fingerprint: pki.ca_fingerprint(),
            secret,
        }
        .to_string()
    };
    let result = match req {
        AdminRequest::ListWorkers => {
            return AdminResponse::Error("listing needs the running daemon".into())
        }
        AdminRequest::RemoveWorker { id } => {
            store.remove(&id).map(|_| AdminResponse::Removed { id })
        }
        AdminRequest::RemoveWorkerRotatingToken { id } => {
            store.remove_rotating(&id, true).map(|secret| {
                let token = secret.map(token).unwrap_or_default();
                AdminResponse::RemovedRotated { id, token }
            })
        }
        AdminRequest::ShowToken => store.join_secret().map(|s| AdminResponse::Token(token(s))),
        AdminRequest::RotateToken => store
            .rotate_join_secret()
            .map(|s| AdminResponse::Token(token(s))),
        _ => {
            return AdminResponse::Error(
                "jobs and models need the running daemon: start it with `ragd-coord serve`".into(),
            )
        }
    };
    result.unwrap_or_else(|e| AdminResponse::Error(e.to_string()))
}

/// Answers the job and model requests of the admin channel (`None` for the others).
fn job_admin(jobs: &Arc<JobService>, req: &AdminRequest) -> Option<AdminResponse> {
    let json = |r: Result<serde_json::Value, String>| match r {
        Ok(v) => AdminResponse::Json(v.to_string()),
        Err(e) => AdminResponse::Error(e),
    };
    let e = |e: jobs::JobError| e.to_string();
    Some(match req {
        AdminRequest::Submit { spec } => json(
            jobs.submit((**spec).clone())
                .map(|id| serde_json::json!({ "id": id })),
        ),
        AdminRequest::ListJobs => json(jobs.list_json().map_err(e)),
        AdminRequest::ShowJob { id } => json(jobs.show_json(id).map_err(e)),
        AdminRequest::JobLogs { id, after } => json(
            jobs.logs(id, *after)
                .map(|l| serde_json::json!(l))
                .map_err(e),
        ),
        AdminRequest::CancelJob { id } => json(
            jobs.cancel(id)
                .map(|()| serde_json::json!({ "cancelled": id })),
        ),
        AdminRequest::ListModels => json(jobs.models_json().map_err(e)),
        AdminRequest::PromoteModel { id, force } => json(
            jobs.promote(id, *force)
                .map(|path| serde_json::json!({ "promoted": id, "path": path })),
        ),
        AdminRequest::RollbackModel => json(
            jobs.rollback("embedder")
                .map(|id| serde_json::json!({ "promoted": id })),
        ),
        AdminRequest::WriteReport { id } => json(
            jobs.write_report(id)
                .map(|path| serde_json::json!({ "report": path }))
                .map_err(e),
        ),
        AdminRequest::RollbackModelKind { kind } => json(
            jobs.rollback(kind)
                .map(|id| serde_json::json!({ "promoted": id })),
        ),
        _ => return None,
    })
}
