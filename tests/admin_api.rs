//! The admin API as a user meets it: the bearer token, the error shape and the field it
//! names for every kind of bad input, a channel's life (create, disabled, enable, rotate the
//! hook, delete), write-only sealed secrets, the store as the truth for `enabled` across a
//! restart, and the operational endpoints (/healthz, /readyz, /metrics, OpenAPI, /docs).

mod common;
#[path = "common/recorder.rs"]
mod recorder;

use common::*;
use recorder::*;
use serde_json::{json, Value};
use std::path::Path;
use std::time::Duration;

const WITHIN: Duration = Duration::from_secs(20);

/// A config with a small body limit, the echo assistant and one channel declared in config.
fn base_config(extra: &str) -> String {
    format!(
        r#"
[server]
body_limit_bytes = 2048

[assistants.echo]
backend = "echo"

[channels.cfg]
kind = "loopback"
assistant = "echo"
enabled = true
{extra}
"#
    )
}

/// Sends `body` as is (not necessarily JSON) and answers status, headers and the body as
/// JSON (or as a string when it is not JSON).
async fn raw(
    pb: &Patchbay,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
    auth: Option<&str>,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut req = http().request(method.to_uppercase().parse().unwrap(), format!("{}{path}", pb.url));
    if let Some(a) = auth {
        req = req.header("Authorization", a);
    }
    if let Some(b) = body {
        req = req.header("Content-Type", "application/json").body(b);
    }
    let resp = req.send().await.expect("patchbay reachable");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap_or_default();
    (status, headers, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// Asserts the error shape `{"error": {"code", "message", "field"?}}`, the status, the code
/// (when given) and the field (`None`: no field).
#[track_caller]
fn assert_error(what: &str, got: (u16, &Value), status: u16, code: Option<&str>, field: Option<&str>) {
    let (s, v) = got;
    assert_eq!(s, status, "{what}: status; body {v}");
    let obj = v.as_object().unwrap_or_else(|| panic!("{what}: body is not a JSON object: {v}"));
    assert_eq!(obj.len(), 1, "{what}: only `error` at the top level: {v}");
    let err = v["error"].as_object().unwrap_or_else(|| panic!("{what}: no `error` object: {v}"));
    let c = err.get("code").and_then(Value::as_str).unwrap_or_else(|| panic!("{what}: no error.code: {v}"));
    assert!(!c.is_empty(), "{what}: empty code");
    let m = err.get("message").and_then(Value::as_str).unwrap_or_else(|| panic!("{what}: no error.message: {v}"));
    assert!(!m.is_empty(), "{what}: empty message");
    if let Some(code) = code {
        assert_eq!(c, code, "{what}: error.code; body {v}");
    }
    assert_eq!(err.get("field").and_then(Value::as_str), field, "{what}: error.field; body {v}");
    for k in err.keys() {
        assert!(["code", "message", "field"].contains(&k.as_str()), "{what}: unexpected key {k} in {v}");
    }
}

/// The value of `name{channel="channel"}` on /metrics (absent: `None`).
fn metric(text: &str, name: &str, channel: &str) -> Option<f64> {
    let prefix = format!("{name}{{channel=\"{channel}\"}} ");
    text.lines().find_map(|l| l.strip_prefix(&prefix)).map(|v| v.trim().parse().expect("a number"))
}

async fn metrics_text(pb: &Patchbay) -> String {
    let resp = http().get(format!("{}/metrics", pb.url)).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    resp.text().await.unwrap()
}

/// The admin routes registered in src/admin/mod.rs, as (method, full path).
fn admin_routes() -> Vec<(String, String)> {
    let src = include_str!("../src/admin/mod.rs");
    let mut routes = Vec::new();
    for line in src.lines() {
        let line = line.trim();
        let Some(rest) = line.strip_prefix(".route(\"") else { continue };
        let (path, rest) = rest.split_once('"').unwrap();
        let method = rest.split("web::").nth(1).unwrap().split('(').next().unwrap();
        routes.push((method.to_owned(), format!("/api/v1{path}")));
    }
    assert!(routes.len() >= 15, "the route scan found too few routes: {routes:?}");
    routes
}

fn files_containing(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    let mut seen = 0;
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(bytes) = std::fs::read(&p) {
                seen += 1;
                if bytes.windows(needle.len()).any(|w| w == needle) {
                    hits.push(p.display().to_string());
                }
            }
        }
    }
    assert!(seen > 0, "no files under {}", dir.display());
    hits
}

// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_requires_the_admin_token() {
    let pb = Patchbay::start(&base_config(""));
    assert!(pb.token.len() >= 16, "an admin token was created on first start");

    // Every admin route refuses a request without the token, before anything else happens
    // (no body is sent, so a route that parsed first would answer 400).
    for (method, path) in admin_routes() {
        let path = path.replace("{id}", "cfg");
        if path == "/api/v1/openapi.json" {
            let (s, _, v) = raw(&pb, &method, &path, None, None).await;
            assert_eq!(s, 200, "the OpenAPI document is public: {v}");
            continue;
        }
        let (s, h, v) = raw(&pb, &method, &path, None, None).await;
        assert_error(&format!("{method} {path} without a token"), (s, &v), 401, Some("unauthorized"), Some("Authorization"));
        assert_eq!(h.get("www-authenticate").and_then(|v| v.to_str().ok()), Some("Bearer"), "{method} {path}");

        let (s, _, v) = raw(&pb, &method, &path, None, Some("Bearer not-the-admin-token-at-all")).await;
        assert_error(&format!("{method} {path} with a wrong token"), (s, &v), 401, Some("unauthorized"), Some("Authorization"));
    }

    // Other shapes of a wrong Authorization header.
    for auth in [format!("Basic {}", pb.token), pb.token.clone(), "Bearer ".into(), format!("Bearer {}x", pb.token)] {
        let (s, _, v) = raw(&pb, "GET", "/api/v1/channels", None, Some(&auth)).await;
        assert_error(&format!("Authorization: {auth:?}"), (s, &v), 401, Some("unauthorized"), Some("Authorization"));
    }
    // A refused write changes nothing.
    let (s, v) = pb
        .call("POST", "/api/v1/channels", Some(json!({"id": "sneaky", "kind": "loopback", "assistant": "echo"})), Some("wrong-token-wrong-token"))
        .await;
    assert_error("create with a wrong token", (s, &v), 401, Some("unauthorized"), Some("Authorization"));
    let (s, v) = pb.admin("GET", "/api/v1/channels/sneaky", None).await;
    assert_error("the refused channel does not exist", (s, &v), 404, Some("not_found"), None);

    // The right token.
    let (s, v) = pb.admin("GET", "/api/v1/channels", None).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["channels"][0]["id"], "cfg", "{v}");
    let (s, v) = pb.admin("GET", "/api/v1/assistants", None).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["assistants"][0]["id"], "echo", "{v}");

    // An assistant's key reaches its conversations, not the admin API.
    let (s, v) = pb.admin("POST", "/api/v1/assistants", Some(json!({"id": "bot", "backend": "echo"}))).await;
    assert_eq!(s, 201, "{v}");
    let key = v["api_key"].as_str().unwrap().to_owned();
    let (s, v) = pb.call("GET", "/api/v1/channels", None, Some(&key)).await;
    assert_error("an assistant key on the admin API", (s, &v), 401, Some("unauthorized"), Some("Authorization"));
    // And the admin token is not an assistant key.
    let (s, v) = pb
        .call("POST", "/api/v1/conversations/whatever/replies", Some(json!({"replies": [{"text": "x"}]})), Some(&pb.token.clone()))
        .await;
    assert_error("the admin token on the conversations API", (s, &v), 401, Some("unauthorized"), Some("Authorization"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_on_channels_names_the_field() {
    let pb = Patchbay::start(&base_config(""));
    let auth = format!("Bearer {}", pb.token);
    let ok = |extra: Value| {
        let mut base = json!({"id": "fresh", "kind": "loopback", "assistant": "echo"});
        for (k, v) in extra.as_object().unwrap() {
            if v.is_null() {
                base.as_object_mut().unwrap().remove(k);
            } else {
                base[k] = v.clone();
            }
        }
        base
    };

    // Not JSON at all, and JSON of the wrong shape.
    for body in [&b"{\"id\": "[..], b"not json", b""] {
        let (s, _, v) = raw(&pb, "POST", "/api/v1/channels", Some(body.to_vec()), Some(&auth)).await;
        assert_error(&format!("POST body {:?}", String::from_utf8_lossy(body)), (s, &v), 400, Some("bad_json"), None);
    }
    let (s, _, v) = raw(&pb, "POST", "/api/v1/channels", Some(b"[1, 2]".to_vec()), Some(&auth)).await;
    assert_eq!(s, 400, "a JSON array is not a channel: {v}");
    assert_eq!(v["error"]["code"], "bad_json", "{v}");
    let (s, _, v) = raw(&pb, "POST", "/api/v1/channels", Some(br#"["x", "loopback", "echo"]"#.to_vec()), Some(&auth)).await;
    assert_eq!(s, 400, "an array must not be read positionally into a channel: {v}");

    let cases: Vec<(&str, Value, &str)> = vec![
        ("unknown top-level field", ok(json!({"colour": "red"})), "colour"),
        ("missing id", ok(json!({"id": null})), "id"),
        ("missing kind", ok(json!({"kind": null})), "kind"),
        ("enabled not a bool", ok(json!({"enabled": "yes"})), "enabled"),
        ("settings not an object", ok(json!({"settings": "deliver_url=x"})), "settings"),
        ("unknown settings key", ok(json!({"settings": {"deliver_ur": "http://127.0.0.1:1/x"}})), "settings.deliver_ur"),
        ("deliver_url not http", ok(json!({"settings": {"deliver_url": "ftp://x"}})), "settings.deliver_url"),
        ("deliver_url not a URL", ok(json!({"settings": {"deliver_url": "not a url"}})), "settings.deliver_url"),
        ("wait_timeout_ms mistyped", ok(json!({"settings": {"wait_timeout_ms": "soon"}})), "settings.wait_timeout_ms"),
        ("a secret that is not a string", ok(json!({"settings": {"token": {"value": "x"}}})), "settings.token"),
        ("an empty secret", ok(json!({"settings": {"token": ""}})), "settings.token"),
        ("unknown kind", ok(json!({"kind": "carrier-pigeon"})), "kind"),
        ("bad id", ok(json!({"id": "Bad Id"})), "id"),
        ("id too long", ok(json!({"id": "a".repeat(64)})), "id"),
        ("unknown assistant", ok(json!({"assistant": "nobody"})), "assistant"),
        ("hook id too short", ok(json!({"hook_id": "short"})), "hook_id"),
    ];
    for (what, body, field) in cases {
        let (s, v) = pb.admin("POST", "/api/v1/channels", Some(body.clone())).await;
        assert_error(&format!("POST {what}: {body}"), (s, &v), 400, None, Some(field));
    }
    // Nothing was created by any of them.
    let (_, v) = pb.admin("GET", "/api/v1/channels", None).await;
    let ids: Vec<&str> = v["channels"].as_array().unwrap().iter().map(|c| c["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["cfg"], "failed creates leave nothing behind");

    // Over server.body_limit_bytes (2048): 413 in the error shape.
    let big = ok(json!({"settings": {"deliver_url": format!("http://127.0.0.1:1/{}", "x".repeat(4096))}}));
    let (s, _, v) = raw(&pb, "POST", "/api/v1/channels", Some(big.to_string().into_bytes()), Some(&auth)).await;
    assert_error("POST over the body limit", (s, &v), 413, Some("body_too_large"), None);
    // Just under the limit is fine (the limit is not off by a lot).
    let url = "http://127.0.0.1:1/".to_string();
    let mut near = ok(json!({"id": "near"}));
    let pad = 1900 - near.to_string().len() - url.len() - 40;
    near["settings"] = json!({"deliver_url": format!("{url}{}", "y".repeat(pad))});
    assert!(near.to_string().len() < 2048);
    let (s, v) = pb.admin("POST", "/api/v1/channels", Some(near)).await;
    assert_eq!(s, 201, "a body under the limit is accepted: {v}");

    // Duplicate ids: one from config, one from the API.
    let (s, v) = pb.admin("POST", "/api/v1/channels", Some(ok(json!({"id": "cfg"})))).await;
    assert_error("duplicate of a config channel", (s, &v), 409, Some("conflict"), None);
    let (s, v) = pb.admin("POST", "/api/v1/channels", Some(ok(json!({})))).await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = pb.admin("POST", "/api/v1/channels", Some(ok(json!({})))).await;
    assert_error("duplicate of an API channel", (s, &v), 409, Some("conflict"), None);
    // Two channels cannot share a hook id.
    let hook = "abcdefghijklmnopqrstuvwxyz234567";
    let (s, v) = pb.admin("POST", "/api/v1/channels", Some(ok(json!({"id": "h1", "hook_id": hook})))).await;
    assert_eq!(s, 201, "{v}");
    assert!(v["callback_url"].as_str().unwrap().ends_with(hook), "{v}");
    let (s, v) = pb.admin("POST", "/api/v1/channels", Some(ok(json!({"id": "h2", "hook_id": hook})))).await;
    assert_error("a hook id already in use", (s, &v), 409, Some("conflict"), None);

    // Unknown ids: 404 on every channel route.
    for (method, path) in [
        ("GET", "/api/v1/channels/nope"),
        ("DELETE", "/api/v1/channels/nope"),
        ("POST", "/api/v1/channels/nope/check"),
        ("POST", "/api/v1/channels/nope/rotate-hook"),
    ] {
        let (s, v) = pb.admin(method, path, None).await;
        assert_error(&format!("{method} {path}"), (s, &v), 404, Some("not_found"), None);
    }
    let (s, v) = pb.admin("PATCH", "/api/v1/channels/nope", Some(json!({"enabled": true}))).await;
    assert_error("PATCH an unknown channel", (s, &v), 404, Some("not_found"), None);
    // An unknown endpoint under /api/v1 answers in the same shape.
    let (s, v) = pb.admin("GET", "/api/v1/chanels", None).await;
    assert_error("an unknown endpoint", (s, &v), 404, Some("not_found"), None);

    // PATCH: the same checks, and a failed PATCH changes nothing.
    let before = pb.admin("GET", "/api/v1/channels/fresh", None).await.1;
    for body in [&b"{\"enabled\": tru"[..], b"enabled=true"] {
        let (s, _, v) = raw(&pb, "PATCH", "/api/v1/channels/fresh", Some(body.to_vec()), Some(&auth)).await;
        assert_error("PATCH with bad JSON", (s, &v), 400, Some("bad_json"), None);
    }
    let patches: Vec<(&str, Value, &str)> = vec![
        ("unknown top-level field", json!({"enabeld": true}), "enabeld"),
        ("id cannot be patched", json!({"id": "other"}), "id"),
        ("enabled not a bool", json!({"enabled": 1}), "enabled"),
        ("unknown settings key", json!({"settings": {"deliver_ur": "http://127.0.0.1:1/x"}}), "settings.deliver_ur"),
        ("deliver_url not http", json!({"settings": {"deliver_url": "ftp://x"}}), "settings.deliver_url"),
        ("unknown assistant", json!({"assistant": "nobody"}), "assistant"),
    ];
    for (what, body, field) in patches {
        let (s, v) = pb.admin("PATCH", "/api/v1/channels/fresh", Some(body.clone())).await;
        assert_error(&format!("PATCH {what}: {body}"), (s, &v), 400, None, Some(field));
    }
    let big = json!({"settings": {"deliver_url": format!("http://127.0.0.1:1/{}", "x".repeat(4096))}});
    let (s, _, v) = raw(&pb, "PATCH", "/api/v1/channels/fresh", Some(big.to_string().into_bytes()), Some(&auth)).await;
    assert_error("PATCH over the body limit", (s, &v), 413, Some("body_too_large"), None);
    let after = pb.admin("GET", "/api/v1/channels/fresh", None).await.1;
    assert_eq!(before["settings"], after["settings"], "failed PATCHes changed the settings");
    assert_eq!(before["enabled"], after["enabled"]);
    assert_eq!(before["updated_at"], after["updated_at"]);

    // A channel declared in config: its settings live in the config file, `enabled` may be
    // toggled here, and it cannot be deleted here.
    let (s, v) = pb.admin("PATCH", "/api/v1/channels/cfg", Some(json!({"settings": {"deliver_url": "http://127.0.0.1:1/x"}}))).await;
    assert_error("PATCH settings of a config channel", (s, &v), 409, Some("conflict"), None);
    let (s, v) = pb.admin("PATCH", "/api/v1/channels/cfg", Some(json!({"assistant": "echo"}))).await;
    assert_error("PATCH the assistant of a config channel", (s, &v), 409, Some("conflict"), None);
    let (s, v) = pb.admin("PATCH", "/api/v1/channels/cfg", Some(json!({"enabled": false, "settings": {}}))).await;
    assert_error("PATCH enabled and settings of a config channel", (s, &v), 409, Some("conflict"), None);
    assert_eq!(pb.admin("GET", "/api/v1/channels/cfg", None).await.1["enabled"], true, "a refused PATCH toggled nothing");
    let (s, v) = pb.admin("PATCH", "/api/v1/channels/cfg", Some(json!({"enabled": false}))).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["enabled"], false, "{v}");
    let (s, v) = pb.admin("DELETE", "/api/v1/channels/cfg", None).await;
    assert_error("DELETE a config channel", (s, &v), 409, Some("conflict"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_on_assistants_names_the_field() {
    let pb = Patchbay::start(&base_config(""));
    let auth = format!("Bearer {}", pb.token);

    for body in [&b"{\"id\": \"a\", "[..], b"backend=echo"] {
        let (s, _, v) = raw(&pb, "POST", "/api/v1/assistants", Some(body.to_vec()), Some(&auth)).await;
        assert_error("POST assistant with bad JSON", (s, &v), 400, Some("bad_json"), None);
    }
    let cases: Vec<(&str, Value, &str)> = vec![
        ("unknown top-level field", json!({"id": "a", "backend": "echo", "url": "http://x"}), "url"),
        ("missing backend", json!({"id": "a"}), "backend"),
        ("bad id", json!({"id": "Bad Id", "backend": "echo"}), "id"),
        ("unknown backend", json!({"id": "a", "backend": "oracle"}), "backend"),
        ("unknown echo setting", json!({"id": "a", "backend": "echo", "settings": {"colour": 1}}), "settings.colour"),
        ("webhook without url", json!({"id": "a", "backend": "webhook", "settings": {"secret": "0123456789abcdef0123"}}), "settings.url"),
        (
            "webhook url not http",
            json!({"id": "a", "backend": "webhook", "settings": {"url": "ftp://x", "secret": "0123456789abcdef0123"}}),
            "settings.url",
        ),
        (
            "webhook secret too short",
            json!({"id": "a", "backend": "webhook", "settings": {"url": "http://127.0.0.1:1/bot", "secret": "short"}}),
            "settings.secret",
        ),
        (
            "webhook secret not a string",
            json!({"id": "a", "backend": "webhook", "settings": {"url": "http://127.0.0.1:1/bot", "secret": ["x"]}}),
            "settings.secret",
        ),
    ];
    for (what, body, field) in cases {
        let (s, v) = pb.admin("POST", "/api/v1/assistants", Some(body.clone())).await;
        assert_error(&format!("POST assistant {what}: {body}"), (s, &v), 400, None, Some(field));
    }
    let big = json!({"id": "big", "backend": "echo", "settings": {"api_key": "k".repeat(4096)}});
    let (s, _, v) = raw(&pb, "POST", "/api/v1/assistants", Some(big.to_string().into_bytes()), Some(&auth)).await;
    assert_error("POST assistant over the body limit", (s, &v), 413, Some("body_too_large"), None);
    let (_, v) = pb.admin("GET", "/api/v1/assistants", None).await;
    assert_eq!(v["assistants"].as_array().unwrap().len(), 1, "failed creates leave nothing behind: {v}");

    let (s, v) = pb.admin("POST", "/api/v1/assistants", Some(json!({"id": "echo", "backend": "echo"}))).await;
    assert_error("duplicate of a config assistant", (s, &v), 409, Some("conflict"), None);
    let (s, v) = pb.admin("POST", "/api/v1/assistants", Some(json!({"id": "bot", "backend": "echo"}))).await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = pb.admin("POST", "/api/v1/assistants", Some(json!({"id": "bot", "backend": "echo"}))).await;
    assert_error("duplicate of an API assistant", (s, &v), 409, Some("conflict"), None);

    for (method, path, body) in [
        ("GET", "/api/v1/assistants/nope", None),
        ("DELETE", "/api/v1/assistants/nope", None),
        ("PATCH", "/api/v1/assistants/nope", Some(json!({"settings": {}}))),
    ] {
        let (s, v) = pb.admin(method, path, body).await;
        assert_error(&format!("{method} {path}"), (s, &v), 404, Some("not_found"), None);
    }

    // PATCH.
    let (s, _, v) = raw(&pb, "PATCH", "/api/v1/assistants/bot", Some(b"{".to_vec()), Some(&auth)).await;
    assert_error("PATCH assistant with bad JSON", (s, &v), 400, Some("bad_json"), None);
    let (s, v) = pb.admin("PATCH", "/api/v1/assistants/bot", Some(json!({"settings": {}, "backend": "webhook"}))).await;
    assert_error("PATCH assistant unknown field", (s, &v), 400, None, Some("backend"));
    let (s, v) = pb.admin("PATCH", "/api/v1/assistants/bot", Some(json!({"settings": {"colour": 1}}))).await;
    assert_error("PATCH assistant unknown setting", (s, &v), 400, None, Some("settings.colour"));
    let (s, v) = pb.admin("PATCH", "/api/v1/assistants/echo", Some(json!({"settings": {}}))).await;
    assert_error("PATCH a config assistant", (s, &v), 409, Some("conflict"), None);
    let (s, v) = pb.admin("DELETE", "/api/v1/assistants/echo", None).await;
    assert_error("DELETE a config assistant", (s, &v), 409, Some("conflict"), None);

    // An assistant in use cannot be deleted; once its channel is gone it can.
    let (s, v) = pb
        .admin("POST", "/api/v1/channels", Some(json!({"id": "uses-bot", "kind": "loopback", "assistant": "bot"})))
        .await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = pb.admin("DELETE", "/api/v1/assistants/bot", None).await;
    assert_error("DELETE an assistant in use", (s, &v), 409, Some("conflict"), None);
    assert_eq!(pb.admin("DELETE", "/api/v1/channels/uses-bot", None).await.0, 204);
    assert_eq!(pb.admin("DELETE", "/api/v1/assistants/bot", None).await.0, 204);
    let (s, v) = pb.admin("GET", "/api/v1/assistants/bot", None).await;
    assert_error("a deleted assistant", (s, &v), 404, Some("not_found"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_lifecycle_through_the_api() {
    let receiver = Fake::start().await;
    let pb = Patchbay::start(&base_config(""));

    // Create: disabled until the admin enables it, with the callback URL to paste.
    let (s, v) = pb
        .admin("POST", "/api/v1/channels", Some(json!({"id": "life", "kind": "loopback", "assistant": "echo", "settings": {"deliver_url": receiver.url}})))
        .await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["id"], "life");
    assert_eq!(v["kind"], "loopback");
    assert_eq!(v["assistant"], "echo");
    assert_eq!(v["enabled"], false, "a new channel is off until enabled: {v}");
    assert_eq!(v["status"]["state"], "disabled", "{v}");
    assert_eq!(v["settings"]["deliver_url"], receiver.url.as_str(), "{v}");
    let hook1 = v["callback_url"].as_str().unwrap().to_owned();
    let prefix = format!("{}/hooks/loopback/", pb.url);
    let hook_id = hook1.strip_prefix(&prefix).unwrap_or_else(|| panic!("callback {hook1} does not start with {prefix}"));
    assert!(hook_id.len() >= 16 && hook_id.chars().all(|c| c.is_ascii_alphanumeric()), "hook id {hook_id:?}");
    assert!(!hook_id.contains("life"), "the hook id is not the channel's name");
    // GET and the list agree.
    assert_eq!(pb.callback_url("life").await, hook1);
    let (_, list) = pb.admin("GET", "/api/v1/channels", None).await;
    let listed = list["channels"].as_array().unwrap().iter().find(|c| c["id"] == "life").cloned().expect("listed");
    assert_eq!(listed["callback_url"], hook1.as_str());
    assert_eq!(listed["enabled"], false);

    // Disabled: answered, without reaching the assistant.
    let (s, r) = send(&hook1, "m1", "c1", "sent while disabled").await;
    assert_eq!(s, 200, "a disabled channel still answers the platform (no retries): {r}");
    assert_eq!(r["accepted"], false, "{r}");
    let m = metrics_text(&pb).await;
    assert_eq!(metric(&m, "patchbay_messages_dropped_disabled_total", "life"), Some(1.0), "{m}");
    assert_eq!(metric(&m, "patchbay_messages_received_total", "life").unwrap_or(0.0), 0.0, "{m}");

    // Enable: the very next message is answered.
    let (s, v) = pb.admin("PATCH", "/api/v1/channels/life", Some(json!({"enabled": true}))).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["enabled"], true);
    assert_ne!(v["status"]["state"], "disabled", "{v}");
    assert_eq!(v["callback_url"], hook1.as_str(), "enabling keeps the callback URL");
    // A hook bounds the request body too (2048 here): 413 in the error shape.
    let resp = http().post(&hook1).header("Content-Type", "application/json")
        .body(json!({"id": "big", "conversation": "c", "text": "x".repeat(4096)}).to_string()).send().await.unwrap();
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.unwrap_or_default();
    assert_error("a hook body over the limit", (status, &body), 413, Some("body_too_large"), None);

    let (s, r) = send(&hook1, "m2", "c1", "after enabling").await;
    assert_eq!((s, &r["accepted"]), (200, &json!(true)), "{r}");
    eventually(WITHIN, "the reply to m2 delivered", || async {
        receiver.ok().iter().any(|r| r["reply"]["text"] == "echo: after enabling").then_some(())
    })
    .await;
    eventually(WITHIN, "the delivered counter", || async {
        (metric(&metrics_text(&pb).await, "patchbay_replies_delivered_total", "life") == Some(1.0)).then_some(())
    })
    .await;
    let got = receiver.ok();
    assert_eq!(got.len(), 1, "only the message sent while enabled was answered: {got:?}");
    assert_eq!(got[0]["channel_id"], "life", "{got:?}");

    // Rotate the hook: the old URL stops at once, the new one works.
    let (s, v) = pb.admin("POST", "/api/v1/channels/life/rotate-hook", None).await;
    assert_eq!(s, 200, "{v}");
    let hook2 = v["callback_url"].as_str().unwrap().to_owned();
    assert_ne!(hook1, hook2);
    assert!(hook2.starts_with(&prefix), "{hook2}");
    assert_eq!(v["enabled"], true, "rotating keeps the channel on");
    assert_eq!(pb.callback_url("life").await, hook2);
    let (s, r) = send(&hook1, "m3", "c1", "to the old hook").await;
    assert_error("the old callback URL", (s, &r), 404, Some("unknown_hook"), None);
    let (s, r) = send(&hook2, "m4", "c1", "to the new hook").await;
    assert_eq!((s, &r["accepted"]), (200, &json!(true)), "{r}");
    eventually(WITHIN, "the reply to m4 delivered", || async {
        receiver.ok().iter().any(|r| r["reply"]["text"] == "echo: to the new hook").then_some(())
    })
    .await;
    assert!(!receiver.ok().iter().any(|r| r["reply"]["text"] == "echo: to the old hook"));

    // Disable: seen by the very next request.
    let (s, v) = pb.admin("PATCH", "/api/v1/channels/life", Some(json!({"enabled": false}))).await;
    assert_eq!((s, &v["enabled"]), (200, &json!(false)), "{v}");
    let (s, r) = send(&hook2, "m5", "c1", "after disabling").await;
    assert_eq!((s, &r["accepted"]), (200, &json!(false)), "{r}");
    let m = metrics_text(&pb).await;
    assert_eq!(metric(&m, "patchbay_messages_dropped_disabled_total", "life"), Some(2.0), "{m}");

    // Delete: 204, then gone everywhere.
    let (s, _) = pb.admin("DELETE", "/api/v1/channels/life", None).await;
    assert_eq!(s, 204);
    let (s, v) = pb.admin("GET", "/api/v1/channels/life", None).await;
    assert_error("GET a deleted channel", (s, &v), 404, Some("not_found"), None);
    let (s, v) = pb.admin("DELETE", "/api/v1/channels/life", None).await;
    assert_error("DELETE twice", (s, &v), 404, Some("not_found"), None);
    let (s, r) = send(&hook2, "m6", "c1", "after deleting").await;
    assert_error("the callback of a deleted channel", (s, &r), 404, Some("unknown_hook"), None);
    let (_, list) = pb.admin("GET", "/api/v1/channels", None).await;
    assert!(!list["channels"].as_array().unwrap().iter().any(|c| c["id"] == "life"), "{list}");
    // The id can be used again.
    let (s, v) = pb.admin("POST", "/api/v1/channels", Some(json!({"id": "life", "kind": "loopback", "assistant": "echo"}))).await;
    assert_eq!(s, 201, "{v}");
    assert_ne!(v["callback_url"], hook2.as_str(), "a new channel gets a new hook id");

    assert!(!receiver.ok().iter().any(|r| r["reply"]["text"] == "echo: sent while disabled"
        || r["reply"]["text"] == "echo: after disabling"));
    receiver.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_are_write_only_and_sealed() {
    const TOKEN: &str = "tok-Zq8vW3xR7mN2pL5kJ9hG4fD6";
    const TOKEN2: &str = "tok-second-Hy7Ud2Kc9Bx4Mn6Qs";
    const WEBHOOK_SECRET: &str = "whsec-Pf3Lr8Tn1Wv6Yb0Cz5Xq";
    const CONFIG_TOKEN: &str = "cfgtok-Rb4Nw8Jq2Vx6Zt0Hm3Ls";
    const REFUSED: &str = "refused-Gk5Pd9Ws1Ej7Ua3Oi";
    // Debug logging, so that a secret in any log line is caught. A config channel takes its
    // token from the environment.
    let config = base_config("token = \"env:PB_TEST_CFG_TOKEN\"\n[log]\nlevel = \"debug\"\n");
    let mut pb = Patchbay::start_with_env(&config, &[("PB_TEST_CFG_TOKEN", CONFIG_TOKEN)]);
    let mut answers = Vec::new();
    let (s, v) = pb.admin("GET", "/api/v1/channels/cfg", None).await;
    assert_eq!((s, &v["settings"]["token"]), (200, &json!({"set": true})), "{v}");
    answers.push(v);
    // A refused create does not echo what it was given.
    for settings in [json!({"token": REFUSED, "deliver_url": "ftp://x"}), json!({"token": REFUSED, "tokn": REFUSED})] {
        let (s, v) = pb.admin("POST", "/api/v1/channels", Some(json!({"id": "refused", "kind": "loopback", "assistant": "echo", "settings": settings}))).await;
        assert_eq!(s, 400, "{v}");
        answers.push(v);
    }

    // A channel with a secret.
    let (s, v) = pb
        .admin("POST", "/api/v1/channels", Some(json!({"id": "sealed", "kind": "loopback", "assistant": "echo", "enabled": true,
            "settings": {"token": TOKEN}})))
        .await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["settings"]["token"], json!({"set": true}), "{v}");
    answers.push(v.clone());
    let hook = v["callback_url"].as_str().unwrap().to_owned();
    let (s, v) = pb.admin("GET", "/api/v1/channels/sealed", None).await;
    assert_eq!((s, &v["settings"]["token"]), (200, &json!({"set": true})), "{v}");
    answers.push(v);
    answers.push(pb.admin("GET", "/api/v1/channels", None).await.1);
    answers.push(pb.admin("PATCH", "/api/v1/channels/sealed", Some(json!({"settings": {"wait_timeout_ms": 4000}}))).await.1);
    answers.push(pb.admin("POST", "/api/v1/channels/sealed/check", None).await.1);

    // The secret is in use: the hook demands it.
    let post = |hook: &str, auth: Option<String>, id: &str| {
        let mut req = http().post(hook).json(&json!({"id": id, "conversation": "c", "text": "hi", "wait": true}));
        if let Some(a) = auth {
            req = req.header("Authorization", a);
        }
        async move {
            let r = req.send().await.unwrap();
            let s = r.status().as_u16();
            (s, r.json::<Value>().await.unwrap_or_default())
        }
    };
    let (s, v) = post(&hook, None, "n1").await;
    assert_error("hook without the channel token", (s, &v), 401, Some("bad_token"), Some("Authorization"));
    let (s, v) = post(&hook, Some(format!("Bearer {TOKEN}x")), "n2").await;
    assert_eq!(s, 401, "{v}");
    let (s, v) = post(&hook, Some(format!("Bearer {TOKEN}")), "n3").await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["replies"][0]["text"], "echo: hi", "{v}");

    let cfg_hook = pb.callback_url("cfg").await;
    assert_eq!(post(&cfg_hook, None, "k1").await.0, 401);
    assert_eq!(post(&cfg_hook, Some(format!("Bearer {CONFIG_TOKEN}")), "k2").await.0, 200);

    // A webhook assistant's secret, and an echo assistant's generated key.
    let (s, v) = pb
        .admin("POST", "/api/v1/assistants", Some(json!({"id": "hooked", "backend": "webhook",
            "settings": {"url": "http://127.0.0.1:1/bot", "secret": WEBHOOK_SECRET}})))
        .await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["settings"]["secret"], json!({"set": true}), "{v}");
    assert_eq!(v["settings"]["url"], "http://127.0.0.1:1/bot");
    answers.push(v);
    let (s, v) = pb.admin("POST", "/api/v1/assistants", Some(json!({"id": "bot", "backend": "echo"}))).await;
    assert_eq!(s, 201, "{v}");
    let key = v["api_key"].as_str().expect("the generated key is answered once").to_owned();
    assert!(key.len() >= 32, "{key}");
    assert_eq!(v["settings"]["api_key"], json!({"set": true}), "{v}");
    for path in ["/api/v1/assistants/bot", "/api/v1/assistants", "/api/v1/assistants/hooked"] {
        let (s, v) = pb.admin("GET", path, None).await;
        assert_eq!(s, 200);
        answers.push(v);
    }
    let (s, v) = pb.admin("GET", "/api/v1/assistants/bot", None).await;
    assert_eq!(s, 200);
    assert_eq!(v["settings"]["api_key"], json!({"set": true}), "{v}");
    assert!(v.get("api_key").is_none(), "the key is answered only at creation: {v}");
    let (s, v) = pb.admin("PATCH", "/api/v1/assistants/bot", Some(json!({"settings": {}}))).await;
    assert_eq!(s, 200, "{v}");
    assert!(v.get("api_key").is_none(), "{v}");
    answers.push(v);
    // A given key is never echoed back.
    let (s, v) = pb
        .admin("POST", "/api/v1/assistants", Some(json!({"id": "given", "backend": "echo", "settings": {"api_key": TOKEN2}})))
        .await;
    assert_eq!(s, 201, "{v}");
    assert!(v.get("api_key").is_none(), "a key the admin chose is not answered: {v}");
    answers.push(v);
    // The generated key works for its assistant's conversations (404: no such conversation,
    // not 401), a wrong key does not.
    let reply = json!({"replies": [{"text": "later"}]});
    let (s, v) = pb.call("POST", "/api/v1/conversations/nope/replies", Some(reply.clone()), Some(&key)).await;
    assert_error("the generated key", (s, &v), 404, Some("not_found"), None);
    let (s, v) = pb.call("POST", "/api/v1/conversations/nope/replies", Some(reply.clone()), Some(&format!("{key}x"))).await;
    assert_error("a wrong assistant key", (s, &v), 401, Some("unauthorized"), Some("Authorization"));

    // The CLI shows no secret either.
    let cli_show = pb.cli(&["channels", "show", "sealed"]);
    assert!(cli_show.status.success(), "{cli_show:?}");
    let cli_json = pb.cli(&["channels", "list", "--json"]);
    assert!(cli_json.status.success(), "{cli_json:?}");

    let everything = format!(
        "{}\n{}\n{}",
        answers.iter().map(Value::to_string).collect::<Vec<_>>().join("\n"),
        String::from_utf8_lossy(&cli_show.stdout),
        String::from_utf8_lossy(&cli_json.stdout)
    );
    let secrets = [TOKEN, WEBHOOK_SECRET, key.as_str(), TOKEN2, CONFIG_TOKEN, REFUSED];
    let check_everywhere = |pb: &Patchbay, when: &str| {
        for secret in secrets {
            assert!(!everything.contains(secret), "{when}: an API answer or CLI output shows a secret");
            let hits = files_containing(&pb.path().join("data"), secret.as_bytes());
            assert!(hits.is_empty(), "{when}: a secret is stored in clear in {hits:?}");
            assert!(!pb.stderr().contains(secret), "{when}: a secret is in the log:\n{}", pb.stderr());
        }
    };
    let log = pb.stderr();
    assert!(log.contains("patchbay is listening"), "the log check has a log to look at: {log}");
    assert!(!log.contains('\x1b'), "a log written to a file has no colour escapes: {log}");
    check_everywhere(&pb, "while running");
    assert!(pb.path().join("data/patchbay.db").exists());

    // Replace the channel's secret: the old one stops working, the new one works.
    let (s, v) = pb.admin("PATCH", "/api/v1/channels/sealed", Some(json!({"settings": {"token": TOKEN2}}))).await;
    assert_eq!((s, &v["settings"]["token"]), (200, &json!({"set": true})), "{v}");
    assert!(!v.to_string().contains(TOKEN2));
    assert_eq!(post(&hook, Some(format!("Bearer {TOKEN}")), "n4").await.0, 401);
    assert_eq!(post(&hook, Some(format!("Bearer {TOKEN2}")), "n5").await.0, 200);

    // Sealed, not lost: after a restart the stored secrets open again.
    let hook_id = hook.rsplit('/').next().unwrap().to_owned();
    pb.restart();
    // A restart listens on a new port; the hook id is kept.
    let hook = pb.callback_url("sealed").await;
    assert!(hook.ends_with(&format!("/hooks/loopback/{hook_id}")), "{hook}");
    assert_eq!(post(&hook, Some(format!("Bearer {TOKEN}")), "n6").await.0, 401);
    let (s, v) = post(&hook, Some(format!("Bearer {TOKEN2}")), "n7").await;
    assert_eq!(s, 200, "the sealed token works after a restart: {v}");
    let (s, v) = pb.call("POST", "/api/v1/conversations/nope/replies", Some(reply), Some(&key)).await;
    assert_error("the generated key after a restart", (s, &v), 404, Some("not_found"), None);
    let (_, v) = pb.admin("GET", "/api/v1/channels/sealed", None).await;
    assert_eq!(v["settings"]["token"], json!({"set": true}), "{v}");
    assert_eq!(v["settings"]["wait_timeout_ms"], 4000, "{v}");
    check_everywhere(&pb, "after a restart");
    // And after a graceful stop, which checkpoints the WAL into the database file.
    let status = pb.terminate();
    assert!(status.success(), "{status:?}");
    check_everywhere(&pb, "after a graceful stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_is_the_truth_for_enabled_across_restarts() {
    let receiver = Fake::start().await;
    let config = format!(
        r#"
[assistants.echo]
backend = "echo"

[channels.on-in-config]
kind = "loopback"
assistant = "echo"
enabled = true
deliver_url = "{url}"

[channels.off-in-config]
kind = "loopback"
assistant = "echo"
enabled = false
deliver_url = "{url}"
"#,
        url = receiver.url
    );
    let mut pb = Patchbay::start(&config);
    // A restart listens on a new port: compare the hook ids, the part the admin pasted.
    let hook_id = |url: &str| url.rsplit('/').next().unwrap().to_owned();
    let on_id = hook_id(&pb.callback_url("on-in-config").await);
    let off_id = hook_id(&pb.callback_url("off-in-config").await);
    let (_, v) = pb.admin("GET", "/api/v1/channels/on-in-config", None).await;
    assert_eq!((&v["enabled"], &v["source"]), (&json!(true), &json!("config")), "{v}");
    let (_, v) = pb.admin("GET", "/api/v1/channels/off-in-config", None).await;
    assert_eq!(v["enabled"], false, "{v}");

    // The admin rotates a config channel's hook id: the new one is kept across restarts.
    let (s, v) = pb.admin("POST", "/api/v1/channels/off-in-config/rotate-hook", None).await;
    assert_eq!(s, 200, "{v}");
    let rotated = hook_id(v["callback_url"].as_str().unwrap());
    assert_ne!(rotated, off_id);
    let off_id = rotated;

    // The admin flips both.
    assert_eq!(pb.admin("PATCH", "/api/v1/channels/on-in-config", Some(json!({"enabled": false}))).await.0, 200);
    assert_eq!(pb.admin("PATCH", "/api/v1/channels/off-in-config", Some(json!({"enabled": true}))).await.0, 200);

    for round in 0..2 {
        pb.restart();
        let (_, v) = pb.admin("GET", "/api/v1/channels/on-in-config", None).await;
        assert_eq!(v["enabled"], false, "round {round}: a restart re-enabled a channel the admin disabled: {v}");
        assert_eq!(v["status"]["state"], "disabled", "{v}");
        let (_, v) = pb.admin("GET", "/api/v1/channels/off-in-config", None).await;
        assert_eq!(v["enabled"], true, "round {round}: a restart disabled a channel the admin enabled: {v}");
        // The callback URLs the admin pasted into the platform still work.
        let on_hook = pb.callback_url("on-in-config").await;
        let off_hook = pb.callback_url("off-in-config").await;
        assert_eq!(hook_id(&on_hook), on_id);
        assert_eq!(hook_id(&off_hook), off_id);
        // And the hooks behave accordingly.
        let (s, r) = send(&on_hook, &format!("on-{round}"), "c", &format!("to the disabled one {round}")).await;
        assert_eq!((s, &r["accepted"]), (200, &json!(false)), "{r}");
        // One conversation per round: a reply delivered just before the SIGKILL whose
        // delivery was not yet recorded holds its conversation until its lease expires.
        let (s, r) = send(&off_hook, &format!("off-{round}"), &format!("c{round}"), &format!("to the enabled one {round}")).await;
        assert_eq!((s, &r["accepted"]), (200, &json!(true)), "{r}");
        let want = format!("echo: to the enabled one {round}");
        eventually(WITHIN, "the enabled channel answers", || async {
            receiver.ok().iter().any(|r| r["reply"]["text"] == want.as_str()).then_some(())
        })
        .await;
    }
    assert!(!receiver.ok().iter().any(|r| r["channel_id"] == "on-in-config"), "{:?}", receiver.ok());
    receiver.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_metrics_openapi_and_docs() {
    let receiver = Fake::start().await;
    let pb = Patchbay::start(&loopback_config("mx", &receiver.url));

    // Liveness and readiness need no token.
    let (s, _, v) = raw(&pb, "GET", "/healthz", None, None).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["status"], "ok", "{v}");
    let (s, _, v) = raw(&pb, "GET", "/readyz", None, None).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["status"], "ready", "{v}");
    for q in ["inbox", "outbox", "dead_letters"] {
        assert!(v["queues"][q].is_u64(), "readyz shows the {q} depth: {v}");
    }

    // Every channel has its series from the start, at zero (dashboards and alerts see a
    // quiet channel, not a missing one), including one created through the API.
    let (s, v) = pb.admin("POST", "/api/v1/channels", Some(json!({"id": "quiet", "kind": "loopback", "assistant": "echo"}))).await;
    assert_eq!(s, 201, "{v}");
    let m = metrics_text(&pb).await;
    for channel in ["mx", "quiet"] {
        for name in ["patchbay_messages_received_total", "patchbay_replies_delivered_total", "patchbay_failed_total"] {
            assert_eq!(metric(&m, name, channel), Some(0.0), "{name}{{channel=\"{channel}\"}} before any traffic:\n{m}");
        }
    }

    // Traffic: one message, one redelivery of it.
    let hook = pb.callback_url("mx").await;
    assert_eq!(send(&hook, "e1", "c", "count me").await.1["duplicate"], false);
    assert_eq!(send(&hook, "e1", "c", "count me").await.1["duplicate"], true);
    eventually(WITHIN, "the reply delivered", || async { (!receiver.ok().is_empty()).then_some(()) }).await;

    // Every per-channel counter and histogram named in src/metrics.rs is on /metrics.
    let src = include_str!("../src/metrics.rs");
    let names: Vec<&str> = src
        .split('"')
        .filter(|s| s.starts_with("patchbay_") && (s.ends_with("_total") || s.ends_with("_seconds")))
        .collect();
    assert!(names.len() >= 9, "the scan of src/metrics.rs found {names:?}");
    let m = eventually(WITHIN, "the delivered counter", || async {
        let m = metrics_text(&pb).await;
        (metric(&m, "patchbay_replies_delivered_total", "mx") == Some(1.0)).then_some(m)
    })
    .await;
    for name in &names {
        assert!(m.contains(&format!("# TYPE {name} ")), "{name} has no TYPE line:\n{m}");
        let series = if name.ends_with("_seconds") { format!("{name}_count") } else { name.to_string() };
        assert!(metric(&m, &series, "mx").is_some(), "no {series}{{channel=\"mx\"}}:\n{m}");
    }
    for (name, want) in [
        ("patchbay_messages_received_total", 2.0),
        ("patchbay_messages_acknowledged_total", 1.0),
        ("patchbay_messages_duplicate_total", 1.0),
        ("patchbay_messages_dropped_disabled_total", 0.0),
        ("patchbay_replies_delivered_total", 1.0),
        ("patchbay_failed_total", 0.0),
    ] {
        assert_eq!(metric(&m, name, "mx"), Some(want), "{name}:\n{m}");
    }
    // Both requests (the redelivery too) were acknowledged to the platform.
    assert!(m.contains("patchbay_ack_latency_seconds_bucket{channel=\"mx\",le=\"+Inf\"} 2"), "{m}");
    assert_eq!(metric(&m, "patchbay_end_to_end_latency_seconds_count", "mx"), Some(1.0), "{m}");
    assert!(m.contains("patchbay_queue_depth{queue=\"inbox\"}"), "{m}");

    // The OpenAPI document lists every route the admin API registers, and is public.
    let (s, _, doc) = raw(&pb, "GET", "/api/v1/openapi.json", None, None).await;
    assert_eq!(s, 200, "{doc}");
    assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")), "{doc}");
    assert_eq!(doc["servers"][0]["url"], pb.url.as_str(), "the document names this server");
    let mut routes = admin_routes();
    routes.extend([("get", "/healthz"), ("get", "/readyz"), ("get", "/metrics")].map(|(m, p)| (m.to_owned(), p.to_owned())));
    for (method, path) in &routes {
        assert!(
            doc["paths"][path.as_str()][method.as_str()].is_object(),
            "openapi.json does not document {} {path}",
            method.to_uppercase()
        );
    }
    // …and nothing that does not exist (the server's own routes and /docs may be listed).
    let server_src = include_str!("../src/server.rs");
    for (path, methods) in doc["paths"].as_object().unwrap() {
        for method in methods.as_object().unwrap().keys() {
            let registered = routes.iter().any(|(m, p)| m == method && p == path)
                || server_src.contains(&format!(".route(\"{path}\", web::{method}()"));
            assert!(registered, "openapi.json documents {} {path}, which is not a route", method.to_uppercase());
        }
    }

    // Readable docs.
    let resp = http().get(format!("{}/docs", pb.url)).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let ct = resp.headers().get("content-type").unwrap().to_str().unwrap().to_owned();
    assert!(ct.starts_with("text/html"), "{ct}");
    let body = resp.text().await.unwrap();
    assert!(body.to_lowercase().contains("<html") && body.contains("/api/v1/openapi.json"), "{body}");
    receiver.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_of_one_id_make_one_channel_or_assistant() {
    let pb = Patchbay::start(&base_config(""));
    for round in 0..5 {
        let id = format!("race-{round}");
        let tasks: Vec<_> = (0..8)
            .map(|i| {
                let (url, token, id) = (pb.url.clone(), pb.token.clone(), id.clone());
                tokio::spawn(async move {
                    let r = http()
                        .post(format!("{url}/api/v1/channels"))
                        .bearer_auth(token)
                        .json(&json!({"id": id, "kind": "loopback", "assistant": "echo",
                            "settings": {"deliver_url": format!("http://127.0.0.1:9/{i}")}}))
                        .send()
                        .await
                        .unwrap();
                    let s = r.status().as_u16();
                    (s, r.json::<Value>().await.unwrap_or_default())
                })
            })
            .collect();
        let mut created = Vec::new();
        for t in tasks {
            let (s, v) = t.await.unwrap();
            match s {
                201 => created.push(v),
                409 => assert_error("a concurrent duplicate", (s, &v), 409, Some("conflict"), None),
                _ => panic!("unexpected answer {s}: {v}"),
            }
        }
        assert_eq!(created.len(), 1, "round {round}: {} creates of `{id}` answered 201: {created:?}", created.len());
        // The one that answered 201 is the one that exists, with its callback URL.
        let (_, now) = pb.admin("GET", &format!("/api/v1/channels/{id}"), None).await;
        assert_eq!(now["settings"], created[0]["settings"], "{now}");
        assert_eq!(now["callback_url"], created[0]["callback_url"], "{now}");
    }

    // Assistants likewise: one creator gets the id and its generated key, and the key works.
    for round in 0..5 {
        let id = format!("bot-{round}");
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let (url, token, id) = (pb.url.clone(), pb.token.clone(), id.clone());
                tokio::spawn(async move {
                    let r = http()
                        .post(format!("{url}/api/v1/assistants"))
                        .bearer_auth(token)
                        .json(&json!({"id": id, "backend": "echo"}))
                        .send()
                        .await
                        .unwrap();
                    let s = r.status().as_u16();
                    (s, r.json::<Value>().await.unwrap_or_default())
                })
            })
            .collect();
        let mut keys = Vec::new();
        for t in tasks {
            let (s, v) = t.await.unwrap();
            match s {
                201 => keys.push(v["api_key"].as_str().unwrap().to_owned()),
                409 => assert_error("a concurrent duplicate assistant", (s, &v), 409, Some("conflict"), None),
                _ => panic!("unexpected answer {s}: {v}"),
            }
        }
        assert_eq!(keys.len(), 1, "round {round}: {} creates of assistant `{id}` answered 201", keys.len());
        let (s, v) = pb
            .call("POST", "/api/v1/conversations/nope/replies", Some(json!({"replies": [{"text": "x"}]})), Some(&keys[0]))
            .await;
        assert_error("the key of the assistant that was created", (s, &v), 404, Some("not_found"), None);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settings_change_never_undoes_a_concurrent_disable_or_rotation() {
    let pb = Patchbay::start(&base_config(""));
    let (s, v) = pb.admin("POST", "/api/v1/channels", Some(json!({"id": "busy", "kind": "loopback", "assistant": "echo", "enabled": true}))).await;
    assert_eq!(s, 201, "{v}");
    let patch = |body: Value| {
        let (url, token) = (pb.url.clone(), pb.token.clone());
        tokio::spawn(async move {
            let r = http().patch(format!("{url}/api/v1/channels/busy")).bearer_auth(token).json(&body).send().await.unwrap();
            r.status().as_u16()
        })
    };
    for round in 0..40u64 {
        assert_eq!(pb.admin("PATCH", "/api/v1/channels/busy", Some(json!({"enabled": true}))).await.0, 200);
        let edits: Vec<_> = (0..3).map(|i| patch(json!({"settings": {"wait_timeout_ms": 1000 + round * 10 + i}}))).collect();
        let rotate = {
            let (url, token) = (pb.url.clone(), pb.token.clone());
            tokio::spawn(async move {
                let r = http().post(format!("{url}/api/v1/channels/busy/rotate-hook")).bearer_auth(token).send().await.unwrap();
                assert_eq!(r.status().as_u16(), 200);
                r.json::<Value>().await.unwrap()["callback_url"].as_str().unwrap().to_owned()
            })
        };
        let off = patch(json!({"enabled": false}));
        assert_eq!(off.await.unwrap(), 200);
        for e in edits {
            assert_eq!(e.await.unwrap(), 200);
        }
        let rotated = rotate.await.unwrap();
        let (_, v) = pb.admin("GET", "/api/v1/channels/busy", None).await;
        assert_eq!(v["enabled"], false, "round {round}: a concurrent edit re-enabled a channel the admin disabled: {v}");
        assert_eq!(v["callback_url"], rotated.as_str(), "round {round}: a concurrent edit undid the hook rotation: {v}");
    }
}
