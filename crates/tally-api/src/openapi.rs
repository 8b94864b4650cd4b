//! The OpenAPI 3.1 document of the HTTP API, built from the types of this crate: their
//! JSON Schemas (2020-12, which OpenAPI 3.1 uses as is) come from `schemars`, the paths
//! from the table in [`document`]. The server serves it at `GET /openapi.json`; the
//! repository commits it as `docs/openapi.json` (a test in tally-server fails when the
//! two differ).

use schemars::generate::SchemaSettings;
use schemars::{JsonSchema, SchemaGenerator};
use serde_json::{Map, Value, json};

use crate::*;

/// Who may call an operation.
#[derive(Clone, Copy, PartialEq)]
enum Auth {
    /// No token needed (health, readiness, metrics, the document, the dashboard files).
    None,
    Client,
    Admin,
}

/// Operations whose body may be left out (every field is optional; no lines).
const EMPTY_BODY_OK: [&str; 5] = [
    "check",
    "resetLimit",
    "putEntity",
    "usageLogs",
    "decommissionNode",
];

/// What a request body is.
enum Body {
    None,
    Json(Value),
    /// Text lines (access logs) or a YAML/JSON config.
    Text(&'static str),
}

struct Op {
    method: &'static str,
    path: &'static str,
    id: &'static str,
    summary: &'static str,
    auth: Auth,
    params: Vec<Value>,
    body: Body,
    /// The 200 reply: a schema (JSON) or a content type and schema.
    ok: (&'static str, Value),
    /// Error statuses the handler itself returns (auth, body-read and fallback errors are
    /// added from `auth` and `body`).
    errors: &'static [u16],
    extra: Vec<(&'static str, Value)>,
}

fn error_description(status: u16) -> &'static str {
    match status {
        400 => "invalid_argument: bad input; nothing changed",
        401 => "unauthenticated: missing or unknown bearer token",
        403 => "permission_denied: the token's role may not do this (an admin token is needed)",
        404 => "not_found",
        405 => "method_not_allowed: the path exists, the method does not (see Allow)",
        408 => "request_timeout: the body did not arrive within 10 s",
        409 => "conflict",
        413 => "payload_too_large: the body is over 1 MiB",
        503 => "unavailable: storage stopped, disk full, or too many bodies in flight; retry later",
        _ => "error",
    }
}

fn path_param(name: &str, description: &str, schema: Value) -> Value {
    json!({"name": name, "in": "path", "required": true, "description": description, "schema": schema})
}

fn query_param(name: &str, description: &str, schema: Value) -> Value {
    json!({"name": name, "in": "query", "required": false, "description": description, "schema": schema})
}

fn id_schema() -> Value {
    json!({"type": "string", "pattern": ID_PATTERN})
}

/// The document. Deterministic: the same build always gives the same bytes.
pub fn document() -> Value {
    let settings = SchemaSettings::draft2020_12().with(|s| {
        s.definitions_path = "/components/schemas".into();
        s.meta_schema = None;
    });
    let mut g = SchemaGenerator::new(settings);
    macro_rules! schema {
        ($t:ty) => {
            <$t as JsonSchema>::json_schema(&mut g).to_value()
        };
    }
    // Named once, referenced everywhere.
    let mut named: Vec<(&str, Value)> = Vec::new();
    macro_rules! named {
        ($($t:ty),* $(,)?) => {
            $( {
                let name = <$t as JsonSchema>::schema_name();
                let s = schema!($t);
                named.push((Box::leak(name.into_owned().into_boxed_str()), s));
            } )*
        };
    }
    named!(
        ErrorReply,
        ErrorBody,
        LimitRequest,
        LimitView,
        LimitList,
        Deleted,
        ResetRequest,
        HistoryReply,
        HistoryEpoch,
        EntityRequest,
        EntityView,
        PriceRequest,
        PriceEntry,
        PriceBatchRequest,
        PricesWritten,
        PriceView,
        PriceList,
        Priced,
        ChargedPrices,
        AccessDenied,
        CheckRequest<'static>,
        CheckReply,
        LimitStatus,
        UsageRequest<'static>,
        UsageReply,
        BatchRequest<'static>,
        BatchReply,
        BatchResult,
        Reservation,
        Released,
        DecommissionRequest,
        Decommissioned,
        RightsView,
        MemberSpec,
        MemberWeight,
        Health,
        Ready,
        ClusterReply,
        Member,
        WhoAmI,
        DenialsReply,
        Denial,
        ForwardAuthReply,
        LogsReply,
        LineError,
        ImportReply,
        RuleOutcome,
        SkippedDescriptor,
    );
    let mut schemas = Map::new();
    for (name, s) in named {
        schemas.insert(name.to_string(), s);
    }
    for (name, s) in g.take_definitions(true) {
        schemas.entry(name).or_insert(s);
    }
    schemas.insert(
        "AttributeValue".into(),
        json!({"type": "string", "minLength": 1, "maxLength": 128,
               "pattern": "^[^\\u0000-\\u001f\\u007f-\\u009f]+$",
               "description": "1 to 128 bytes of UTF-8 without control characters."}),
    );
    // A cost limit's max is USD up to 1e9; a count's is a whole number up to 1e15.
    if let Some(Value::Object(lr)) = schemas.get_mut("LimitRequest") {
        lr.insert(
            "if".into(),
            json!({"properties": {"metric": {"const": "cost"}}}),
        );
        lr.insert(
            "then".into(),
            json!({"properties": {"max": {"maximum": 1e9}}}),
        );
        lr.insert(
            "else".into(),
            json!({"properties": {"max": {"type": "integer"}}}),
        );
    }
    let reference = |name: &str| json!({"$ref": format!("#/components/schemas/{name}")});

    let limit_id = || path_param("id", "Limit id.", id_schema());
    let entity_params = || {
        vec![
            path_param(
                "dimension",
                "Attribute name.",
                json!({"type": "string", "pattern": NAME_PATTERN}),
            ),
            path_param("value", "Attribute value.", reference("AttributeValue")),
        ]
    };
    let model_params = || {
        vec![path_param(
            "model",
            "The model, as requests name it in their `model` attribute (the rest of the path; it may contain `/`).",
            json!({"allOf": [reference("AttributeValue")], "not": {"const": "batch"}}),
        )]
    };
    let ops = vec![
        Op {
            method: "get",
            path: "/healthz",
            id: "healthz",
            summary: "200 while the process serves.",
            auth: Auth::None,
            params: vec![],
            body: Body::None,
            ok: ("application/json", reference("Health")),
            errors: &[],
            extra: vec![],
        },
        Op {
            method: "get",
            path: "/readyz",
            id: "readyz",
            summary: "200 when the node may take traffic: storage healthy and, in a cluster, caught up with a live peer; 503 otherwise.",
            auth: Auth::None,
            params: vec![],
            body: Body::None,
            ok: ("application/json", reference("Ready")),
            errors: &[503],
            extra: vec![],
        },
        Op {
            method: "get",
            path: "/metrics",
            id: "metrics",
            summary: "Prometheus text exposition.",
            auth: Auth::None,
            params: vec![],
            body: Body::None,
            ok: ("text/plain", json!({"type": "string"})),
            errors: &[],
            extra: vec![],
        },
        Op {
            method: "get",
            path: "/openapi.json",
            id: "openapi",
            summary: "This document.",
            auth: Auth::None,
            params: vec![],
            body: Body::None,
            ok: ("application/json", json!({"type": "object"})),
            errors: &[],
            extra: vec![],
        },
        Op {
            method: "get",
            path: "/v1/cluster",
            id: "cluster",
            summary: "The nodes this node's gossip knows.",
            auth: Auth::Client,
            params: vec![],
            body: Body::None,
            ok: ("application/json", reference("ClusterReply")),
            errors: &[],
            extra: vec![],
        },
        Op {
            method: "get",
            path: "/v1/whoami",
            id: "whoami",
            summary: "The role of the caller's token.",
            auth: Auth::Client,
            params: vec![],
            body: Body::None,
            ok: ("application/json", reference("WhoAmI")),
            errors: &[],
            extra: vec![],
        },
        Op {
            method: "get",
            path: "/v1/denials",
            id: "denials",
            summary: "The most recent denied checks of this node, newest first (in memory).",
            auth: Auth::Client,
            params: vec![query_param(
                "limit",
                "How many (default 100).",
                json!({"type": "integer", "minimum": 1, "maximum": DENIALS_MAX}),
            )],
            body: Body::None,
            ok: ("application/json", reference("DenialsReply")),
            errors: &[400],
            extra: vec![],
        },
        Op {
            method: "get",
            path: "/v1/limits",
            id: "listLimits",
            summary: "Every limit, optionally only those whose scope has scope.<dimension>=<value> for each query parameter.",
            auth: Auth::Client,
            params: vec![json!({
                "name": "scope",
                "in": "query",
                "required": false,
                "style": "deepObject",
                "explode": true,
                "description": "Filters: ?scope.team=eng&scope.model=gpt-4o.",
                "schema": {"type": "object", "propertyNames": {"pattern": NAME_PATTERN}, "additionalProperties": {"type": "string"}},
            })],
            body: Body::None,
            ok: ("application/json", reference("LimitList")),
            errors: &[400],
            extra: vec![],
        },
        Op {
            method: "put",
            path: "/v1/limits/{id}",
            id: "putLimit",
            summary: "Create or replace a limit.",
            auth: Auth::Admin,
            params: vec![limit_id()],
            body: Body::Json(reference("LimitRequest")),
            ok: ("application/json", reference("LimitView")),
            errors: &[400, 503],
            extra: vec![],
        },
        Op {
            method: "get",
            path: "/v1/limits/{id}",
            id: "getLimit",
            summary: "A limit and its usage now.",
            auth: Auth::Client,
            params: vec![limit_id()],
            body: Body::None,
            ok: ("application/json", reference("LimitView")),
            errors: &[404],
            extra: vec![],
        },
        Op {
            method: "delete",
            path: "/v1/limits/{id}",
            id: "deleteLimit",
            summary: "Delete a limit.",
            auth: Auth::Admin,
            params: vec![limit_id()],
            body: Body::None,
            ok: ("application/json", reference("Deleted")),
            errors: &[400, 404, 503],
            extra: vec![],
        },
        Op {
            method: "post",
            path: "/v1/limits/{id}/reset",
            id: "resetLimit",
            summary: "Start a new epoch of the limit, at zero or at `used`.",
            auth: Auth::Admin,
            params: vec![limit_id()],
            body: Body::Json(reference("ResetRequest")),
            ok: ("application/json", reference("LimitView")),
            errors: &[400, 404, 503],
            extra: vec![],
        },
        Op {
            method: "get",
            path: "/v1/limits/{id}/history",
            id: "limitHistory",
            summary: "Past and current epochs of a limit, newest first.",
            auth: Auth::Client,
            params: vec![
                limit_id(),
                query_param(
                    "since",
                    "Epochs ending after this time.",
                    json!({"type": "string", "format": "date-time"}),
                ),
                query_param(
                    "until",
                    "Epochs starting before this time.",
                    json!({"type": "string", "format": "date-time"}),
                ),
                query_param(
                    "limit",
                    "Most epochs (default 100).",
                    json!({"type": "integer", "minimum": 1, "maximum": HISTORY_EPOCHS_MAX}),
                ),
            ],
            body: Body::None,
            ok: ("application/json", reference("HistoryReply")),
            errors: &[400, 404, 503],
            extra: vec![],
        },
        Op {
            method: "put",
            path: "/v1/entities/{dimension}/{value}",
            id: "putEntity",
            summary: "Create or replace an entity and its parents (a cycle is a 409).",
            auth: Auth::Admin,
            params: entity_params(),
            body: Body::Json(reference("EntityRequest")),
            ok: ("application/json", reference("EntityView")),
            errors: &[400, 409, 503],
            extra: vec![],
        },
        Op {
            method: "get",
            path: "/v1/entities/{dimension}/{value}",
            id: "getEntity",
            summary: "An entity.",
            auth: Auth::Client,
            params: entity_params(),
            body: Body::None,
            ok: ("application/json", reference("EntityView")),
            errors: &[404],
            extra: vec![],
        },
        Op {
            method: "delete",
            path: "/v1/entities/{dimension}/{value}",
            id: "deleteEntity",
            summary: "Delete an entity.",
            auth: Auth::Admin,
            params: entity_params(),
            body: Body::None,
            ok: ("application/json", reference("Deleted")),
            errors: &[400, 404, 503],
            extra: vec![],
        },
        Op {
            method: "get",
            path: "/v1/prices",
            id: "listPrices",
            summary: "Every model price, by model.",
            auth: Auth::Client,
            params: vec![],
            body: Body::None,
            ok: ("application/json", reference("PriceList")),
            errors: &[],
            extra: vec![],
        },
        Op {
            method: "post",
            path: "/v1/prices/batch",
            id: "putPrices",
            summary: "Create or replace up to 1000 prices in one durable commit (all or nothing).",
            auth: Auth::Admin,
            params: vec![],
            body: Body::Json(reference("PriceBatchRequest")),
            ok: ("application/json", reference("PricesWritten")),
            errors: &[400, 503],
            extra: vec![],
        },
        Op {
            method: "put",
            path: "/v1/prices/{model}",
            id: "putPrice",
            summary: "Create or replace a model's price (USD per million tokens; kept to 9 decimal places).",
            auth: Auth::Admin,
            params: model_params(),
            body: Body::Json(reference("PriceRequest")),
            ok: ("application/json", reference("PriceView")),
            errors: &[400, 503],
            extra: vec![],
        },
        Op {
            method: "get",
            path: "/v1/prices/{model}",
            id: "getPrice",
            summary: "A model's price.",
            auth: Auth::Client,
            params: model_params(),
            body: Body::None,
            ok: ("application/json", reference("PriceView")),
            errors: &[404],
            extra: vec![],
        },
        Op {
            method: "delete",
            path: "/v1/prices/{model}",
            id: "deletePrice",
            summary: "Delete a model's price.",
            auth: Auth::Admin,
            params: model_params(),
            body: Body::None,
            ok: ("application/json", reference("Deleted")),
            errors: &[400, 404, 503],
            extra: vec![],
        },
        Op {
            method: "post",
            path: "/v1/check",
            id: "check",
            summary: "Would a request with these attributes and estimates be allowed? Changes nothing.",
            auth: Auth::Client,
            params: vec![],
            body: Body::Json(reference("CheckRequest")),
            ok: ("application/json", reference("CheckReply")),
            errors: &[400],
            extra: vec![],
        },
        Op {
            method: "post",
            path: "/v1/usage",
            id: "usage",
            summary: "Record usage; replies once it is durable. A repeated id changes nothing (applied: false).",
            auth: Auth::Client,
            params: vec![],
            body: Body::Json(reference("UsageRequest")),
            ok: ("application/json", reference("UsageReply")),
            errors: &[400, 503],
            extra: vec![],
        },
        Op {
            method: "post",
            path: "/v1/usage/batch",
            id: "usageBatch",
            summary: "Record up to 1000 records at once, validated all or nothing.",
            auth: Auth::Client,
            params: vec![],
            body: Body::Json(reference("BatchRequest")),
            ok: ("application/json", reference("BatchReply")),
            errors: &[400, 503],
            extra: vec![],
        },
        Op {
            method: "delete",
            path: "/v1/reservations/{id}",
            id: "releaseReservation",
            summary: "Release an open reservation of this node (hard limits); 404 once settled, released or expired.",
            auth: Auth::Client,
            params: vec![path_param(
                "id",
                "Reservation id, as a check with reserve gave it.",
                json!({"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,128}~[0-9a-f]+~[0-9a-f]+$"}),
            )],
            body: Body::None,
            ok: ("application/json", reference("Released")),
            errors: &[400, 404],
            extra: vec![],
        },
        Op {
            method: "post",
            path: "/v1/nodes/{id}/decommission",
            id: "decommissionNode",
            summary: "Say a node is gone for good: its unspent rights of hard limits pass to a successor (default: this node). Never undone.",
            auth: Auth::Admin,
            params: vec![path_param("id", "Node id.", id_schema())],
            body: Body::Json(reference("DecommissionRequest")),
            ok: ("application/json", reference("Decommissioned")),
            errors: &[400, 503],
            extra: vec![],
        },
        Op {
            method: "post",
            path: "/v1/usage/logs",
            id: "usageLogs",
            summary: "Usage from access-log lines (tally's JSON line or Caddy's access log), one per line; replies once durable.",
            auth: Auth::Client,
            params: vec![],
            body: Body::Text("text/plain"),
            ok: ("application/json", reference("LogsReply")),
            errors: &[400, 503],
            extra: vec![],
        },
        Op {
            method: "post",
            path: "/v1/import/envoy-ratelimit",
            id: "importEnvoyRatelimit",
            summary: "Turn an envoyproxy/ratelimit config (YAML or JSON) into limits; validated whole before anything is written.",
            auth: Auth::Admin,
            params: vec![query_param(
                "dry_run",
                "Only say what would change.",
                json!({"type": "string", "enum": ["true", "false", "1", "0", ""]}),
            )],
            body: Body::Text("application/yaml"),
            ok: ("application/json", reference("ImportReply")),
            errors: &[400, 413, 503],
            extra: vec![],
        },
        Op {
            method: "get",
            path: "/ui/",
            id: "dashboard",
            summary: "The dashboard page (GET /ui redirects here).",
            auth: Auth::None,
            params: vec![],
            body: Body::None,
            ok: ("text/html", json!({"type": "string"})),
            errors: &[],
            extra: vec![(
                "304",
                json!({"description": "Not modified (If-None-Match matched the ETag)."}),
            )],
        },
        Op {
            method: "get",
            path: "/ui/{file}",
            id: "dashboardFile",
            summary: "A file of the dashboard: index.html, app.js, app.css, favicon.svg.",
            auth: Auth::None,
            params: vec![path_param("file", "File name.", json!({"type": "string"}))],
            body: Body::None,
            ok: ("*/*", json!({"type": "string"})),
            errors: &[404],
            extra: vec![(
                "304",
                json!({"description": "Not modified (If-None-Match matched the ETag)."}),
            )],
        },
    ];

    let mut paths = Map::new();
    for op in ops.into_iter().chain(forward_auth_ops()) {
        let mut responses = Map::new();
        let (ctype, schema) = op.ok;
        responses.insert(
            "200".into(),
            json!({"description": "OK", "content": {ctype: {"schema": schema}}}),
        );
        let mut statuses: Vec<u16> = op.errors.to_vec();
        if op.auth != Auth::None {
            statuses.extend([401, 403]);
        }
        if !matches!(op.body, Body::None) {
            statuses.extend([400, 408, 413, 503]);
        }
        // Any path with a method it does not have.
        statuses.push(405);
        statuses.sort_unstable();
        statuses.dedup();
        // Forward-auth answers a denial with the 4xx status the caller chose, so any 4xx
        // of it may be an error or a denial.
        let denies = op.path.starts_with("/v1/forward-auth");
        for s in statuses {
            let schema = if denies && (400..500).contains(&s) {
                json!({"anyOf": [reference("ErrorReply"), reference("ForwardAuthReply")]})
            } else {
                reference("ErrorReply")
            };
            let description = if denies && (400..500).contains(&s) {
                format!(
                    "{}; or a denial answered with this status",
                    error_description(s)
                )
            } else {
                error_description(s).to_string()
            };
            responses.insert(
                s.to_string(),
                json!({"description": description,
                       "content": {"application/json": {"schema": schema}}}),
            );
        }
        for (k, v) in op.extra {
            responses.insert(k.into(), v);
        }
        let mut o = json!({
            "operationId": op.id,
            "summary": op.summary,
            "responses": responses,
        });
        if !op.params.is_empty() {
            o["parameters"] = Value::Array(op.params);
        }
        match op.body {
            Body::None => {}
            // An empty body is read as `{}` (or no lines) where every field is optional.
            Body::Json(s) => {
                let required = !EMPTY_BODY_OK.contains(&op.id);
                o["requestBody"] = json!({"required": required,
                    "content": {"application/json": {"schema": s}}});
            }
            Body::Text(ct) => {
                let required = !EMPTY_BODY_OK.contains(&op.id);
                o["requestBody"] = json!({"required": required,
                    "content": {ct: {"schema": {"type": "string"}}}});
            }
        }
        match op.auth {
            Auth::None => o["security"] = json!([]),
            Auth::Client => o["x-tally-role"] = json!("client"),
            Auth::Admin => o["x-tally-role"] = json!("admin"),
        }
        let item = paths
            .entry(op.path.to_string())
            .or_insert_with(|| json!({}));
        item[op.method] = o;
    }

    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "tally",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Budgets and rate limits for API and LLM gateways. Errors are {\"error\": {\"code\", \"message\"}}. Money is USD as a JSON number, stored as integer micro-USD; times are RFC 3339 in UTC. Roles: an admin token may do everything a client token may. A node started without tokens (loopback only) treats every caller as admin. The reference is docs/API.md.",
            "license": {"name": "MIT OR Apache-2.0", "identifier": "MIT OR Apache-2.0"},
        },
        "servers": [{"url": "http://127.0.0.1:7070"}],
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer",
                           "description": "The admin or client token the node was started with."}
            }
        }
    })
}

/// `/v1/forward-auth`, with any method, and with the original path appended (Envoy).
fn forward_auth_ops() -> Vec<Op> {
    let reference = |name: &str| json!({"$ref": format!("#/components/schemas/{name}")});
    let headers = || {
        vec![
            json!({"name": "X-Tally-Cost", "in": "header", "required": false,
                   "description": "Estimated USD.", "schema": {"type": "string", "pattern": "^[0-9]{1,9}(\\.[0-9]{1,6})?$"}}),
            json!({"name": "X-Tally-Tokens", "in": "header", "required": false,
                   "description": "Estimated tokens.", "schema": {"type": "string", "pattern": "^[0-9]{1,15}$"}}),
            json!({"name": "X-Tally-Record-Id", "in": "header", "required": false,
                   "description": "When allowed, also record the estimate as usage under this id.", "schema": id_schema()}),
            json!({"name": "X-Tally-Deny-Status", "in": "header", "required": false,
                   "description": "Status of a denial (default 429).", "schema": {"type": "string", "pattern": "^4[0-9][0-9]$"}}),
            json!({"name": "deny_status", "in": "query", "required": false,
                   "description": "Status of a denial (default 429); wins over the header.", "schema": {"type": "integer", "minimum": 400, "maximum": 499}}),
        ]
    };
    let denied = || {
        json!({"description": "Denied (the status asked for with X-Tally-Deny-Status or deny_status; 429 by default). The body is the same shape as an allowed answer.",
               "content": {"application/json": {"schema": reference("ForwardAuthReply")}}})
    };
    // Envoy's HTTP ext_authz sends the original request's method, so every method is the
    // same check.
    const METHODS: [(&str, &str, &str); 8] = [
        ("get", "forwardAuth", "forwardAuthPath"),
        ("post", "forwardAuthPost", "forwardAuthPathPost"),
        ("put", "forwardAuthPut", "forwardAuthPathPut"),
        ("delete", "forwardAuthDelete", "forwardAuthPathDelete"),
        ("patch", "forwardAuthPatch", "forwardAuthPathPatch"),
        ("head", "forwardAuthHead", "forwardAuthPathHead"),
        ("options", "forwardAuthOptions", "forwardAuthPathOptions"),
        ("trace", "forwardAuthTrace", "forwardAuthPathTrace"),
    ];
    let mk = |method, path, id, params: Vec<Value>| Op {
        method,
        path,
        id,
        summary: "A check for proxies: attributes in X-Tally-Attr-<dimension> headers, estimates in X-Tally-Cost and X-Tally-Tokens. Any method.",
        auth: Auth::Client,
        params,
        body: Body::None,
        ok: ("application/json", reference("ForwardAuthReply")),
        errors: &[400, 503],
        extra: vec![("4XX", denied())],
    };
    let with_path = || {
        let mut p = headers();
        p.insert(
            0,
            path_param(
                "original_path",
                "The original request path (Envoy's ext_authz appends it); ignored.",
                json!({"type": "string"}),
            ),
        );
        p
    };
    let mut ops = Vec::new();
    for (method, id, path_id) in METHODS {
        ops.push(mk(method, "/v1/forward-auth", id, headers()));
        ops.push(mk(
            method,
            "/v1/forward-auth/{original_path}",
            path_id,
            with_path(),
        ));
    }
    ops
}

/// The document as committed in `docs/openapi.json`: pretty, with a final newline.
pub fn document_text() -> String {
    let mut s = serde_json::to_string_pretty(&document()).expect("a JSON value prints");
    s.push('\n');
    s
}
