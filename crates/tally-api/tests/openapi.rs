//! `docs/openapi.json` is the document the code generates, byte for byte.

use std::path::PathBuf;

fn committed() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi.json")
}

#[test]
fn committed_document_is_the_generated_one() {
    let generated = tally_api::openapi::document_text();
    let path = committed();
    if std::env::var_os("TALLY_WRITE_OPENAPI").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        on_disk == generated,
        "docs/openapi.json differs from the document the types generate; regenerate it with\n    \
         TALLY_WRITE_OPENAPI=1 cargo test -p tally-api --test openapi\nand commit it"
    );
}

#[test]
fn document_is_openapi_3_1_with_every_route() {
    let d = tally_api::openapi::document();
    assert_eq!(d["openapi"], "3.1.0");
    assert_eq!(
        d["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    let paths: Vec<&str> = d["paths"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        paths,
        [
            "/healthz",
            "/metrics",
            "/openapi.json",
            "/readyz",
            "/ui/",
            "/ui/{file}",
            "/v1/check",
            "/v1/cluster",
            "/v1/denials",
            "/v1/entities/{dimension}/{value}",
            "/v1/forward-auth",
            "/v1/forward-auth/{original_path}",
            "/v1/import/envoy-ratelimit",
            "/v1/limits",
            "/v1/limits/{id}",
            "/v1/limits/{id}/history",
            "/v1/limits/{id}/reset",
            "/v1/nodes/{id}/decommission",
            "/v1/prices",
            "/v1/prices/batch",
            "/v1/prices/{model}",
            "/v1/reservations/{id}",
            "/v1/usage",
            "/v1/usage/batch",
            "/v1/usage/logs",
            "/v1/whoami",
        ]
    );
    // Every $ref resolves.
    let text = d.to_string();
    for r in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
        let name = &r[..r.find('"').unwrap()];
        assert!(
            d["components"]["schemas"].get(name).is_some(),
            "dangling $ref {name}"
        );
    }
    // Authenticated operations declare 401 and 403; open ones opt out of security.
    for (path, item) in d["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let open = op.get("security") == Some(&serde_json::json!([]));
            let r = &op["responses"];
            assert_eq!(
                r.get("401").is_some(),
                !open,
                "{method} {path}: 401 iff authenticated"
            );
            assert!(r.get("200").is_some(), "{method} {path}");
        }
    }
}
