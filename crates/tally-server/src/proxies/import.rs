//! `POST /v1/import/envoy-ratelimit` (admin): an envoyproxy/ratelimit config (YAML or
//! JSON body) becomes tally limits, as `tally import envoy-ratelimit FILE` does through
//! it. `?dry_run=true` only says what would change. The whole config is validated before
//! anything is written (a bad field → 400, nothing changed); the mapping and what cannot
//! be expressed are in `tally_rls::import`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use tally_rls::import::{self as rl, Action};

use crate::http::{ApiError, AppState, RawBody, Role, authorize, form_pairs};

pub use tally_api::{ImportReply, RuleOutcome, SkippedDescriptor};

fn dry_run(uri: &Uri) -> Result<bool, ApiError> {
    let mut dry = false;
    if let Some(q) = uri.query() {
        for (k, v) in form_pairs(q)? {
            match (k.as_str(), v.as_str()) {
                ("dry_run", "true" | "1" | "") => dry = true,
                ("dry_run", "false" | "0") => dry = false,
                ("dry_run", v) => {
                    return Err(ApiError::invalid(format!(
                        "dry_run={v:?} must be true or false"
                    )));
                }
                (k, _) => {
                    return Err(ApiError::invalid(format!(
                        "unknown query parameter {k:?}; only dry_run is read"
                    )));
                }
            }
        }
    }
    Ok(dry)
}

pub async fn handle(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    uri: Uri,
    body: RawBody,
) -> Result<Response, ApiError> {
    authorize(&s, &headers, Role::Admin)?;
    let dry = dry_run(&uri)?;
    let text = std::str::from_utf8(&body)
        .map_err(|_| ApiError::invalid("the config is not UTF-8 text"))?;
    let invalid = |e: rl::ImportError| match e {
        rl::ImportError::TooLarge => ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            code: "payload_too_large",
            message: e.to_string(),
        },
        e => ApiError::invalid(e.to_string()),
    };
    let plan = rl::plan(&rl::parse(text).map_err(invalid)?).map_err(invalid)?;
    let applied = rl::apply(&s.node, &plan, dry).await?;
    let notes = |id: &str| {
        plan.rules
            .iter()
            .find(|r| r.id == id)
            .map(|r| r.notes.clone())
            .unwrap_or_default()
    };
    let reply = ImportReply {
        domain: plan.domain.clone(),
        dry_run: dry,
        rules: applied
            .actions
            .iter()
            .map(|(id, descriptor, action)| RuleOutcome {
                id: id.clone(),
                descriptor: descriptor.clone(),
                action: action.as_str().to_string(),
                notes: if *action == Action::Deleted {
                    Vec::new()
                } else {
                    notes(id)
                },
            })
            .collect(),
        instances_deleted: applied.instances_deleted as u64,
        skipped: plan
            .skipped
            .iter()
            .map(|k| SkippedDescriptor {
                descriptor: k.descriptor.clone(),
                reason: k.reason.clone(),
            })
            .collect(),
    };
    Ok(axum::Json(reply).into_response())
}

/// `tally import envoy-ratelimit FILE [--dry-run]`: posts the file to the endpoint and
/// prints what became of each descriptor (or the reply as JSON with `--json`).
pub fn run_cli(args: &crate::cli::ImportArgs) -> anyhow::Result<()> {
    use anyhow::{Context as _, bail};
    let crate::cli::ImportCommand::EnvoyRatelimit { file, dry_run } = &args.command;
    let text = if file.as_os_str() == "-" {
        let mut t = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut t)?;
        t
    } else {
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?
    };
    let opts = &args.client;
    let base = opts.url.trim().trim_end_matches('/');
    let url = format!(
        "{base}/v1/import/envoy-ratelimit{}",
        if *dry_run { "?dry_run=true" } else { "" }
    );
    let agent = ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(std::time::Duration::from_secs(120)))
            .build(),
    );
    let mut rb = agent.post(&url).header("content-type", "application/yaml");
    if let Some(t) = opts.token.as_ref().filter(|t| !t.is_empty()) {
        rb = rb.header("authorization", &format!("Bearer {t}"));
    }
    let mut resp = rb.send(text.as_str()).map_err(|e| {
        anyhow::anyhow!("cannot reach {base}: {e}; is `tally serve` running there?")
    })?;
    let status = resp.status().as_u16();
    let body = resp.body_mut().read_to_string()?;
    if !(200..300).contains(&status) {
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        match (v["error"]["code"].as_str(), v["error"]["message"].as_str()) {
            (Some(c), Some(m)) => bail!("{c}: {m}"),
            _ => bail!("http_{status}: {body}"),
        }
    }
    let reply: ImportReply = serde_json::from_str(&body)?;
    if opts.json {
        println!("{}", serde_json::to_string_pretty(&reply)?);
        return Ok(());
    }
    print!("{}", render(&reply));
    Ok(())
}

/// The human-readable report of an import.
pub fn render(r: &ImportReply) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let verb = if r.dry_run { "would be" } else { "" };
    let _ = writeln!(
        out,
        "domain {}{}",
        r.domain,
        if r.dry_run {
            " (dry run: nothing written)"
        } else {
            ""
        }
    );
    let mut t = crate::client::Table::new(&["ACTION", "DESCRIPTOR", "LIMIT ID"]);
    for rule in &r.rules {
        let action = if verb.is_empty() {
            rule.action.clone()
        } else {
            format!("{verb} {}", rule.action)
        };
        t.row(vec![action, rule.descriptor.clone(), rule.id.clone()]);
    }
    out.push_str(&t.render());
    for rule in r.rules.iter().filter(|x| !x.notes.is_empty()) {
        for n in &rule.notes {
            let _ = writeln!(out, "note: {}: {n}", rule.descriptor);
        }
    }
    if r.instances_deleted > 0 {
        let _ = writeln!(
            out,
            "{} wildcard instances of deleted rules {} deleted",
            r.instances_deleted,
            if r.dry_run { "would be" } else { "were" }
        );
    }
    for k in &r.skipped {
        let _ = writeln!(out, "NOT IMPORTED: {}: {}", k.descriptor, k.reason);
    }
    out
}
