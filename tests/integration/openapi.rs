//! The API contract: `docs/openapi.yaml` against the daemon. Real requests through the
//! real router (as from a loopback TCP peer) produce every status the spec documents for
//! every route; each answer's media type, documented headers and body are checked against
//! the spec for that route and status, and the spec's routes must be exactly those of
//! `http::router()`. The schemas are checked by a small validator of the JSON Schema
//! subset the spec uses; it refuses any keyword it does not check, so the spec cannot
//! promise more than this test verifies.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::routing::post;
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use serde_json::{Value, json};
use tokend::http::Api;
use tokend::listen::Peer;
use yaml_rust2::{Yaml, YamlLoader};

use crate::support::{
    Harness, MARK, call, client_credentials_account, free_port, manual_provider, request,
    zywave_account,
};

const SPEC: &str = include_str!("../../docs/openapi.yaml");
const ROUTER_SOURCE: &str = include_str!("../../src/http/mod.rs");

const BILLING: (&str, &str) = ("Authorization", "Bearer billing-key-0123456789");
const OPS: (&str, &str) = ("Authorization", "Bearer ops-key-0123456789");

const HTTP_METHODS: &[&str] = &[
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

/// The methods `any(..)` stands for in the router: what the proxy forwards.
const PROXIED_METHODS: &[&str] = &["get", "put", "post", "delete", "patch", "options"];

// ---------------------------------------------------------------------------------------
// The spec: YAML to JSON, lookups, and the schema validator.

fn spec() -> Value {
    let docs = YamlLoader::load_from_str(SPEC)
        .unwrap_or_else(|e| panic!("docs/openapi.yaml is not valid YAML: {e}"));
    assert_eq!(docs.len(), 1, "docs/openapi.yaml holds one YAML document");
    to_json(&docs[0], "")
}

fn to_json(y: &Yaml, at: &str) -> Value {
    match y {
        Yaml::Null => Value::Null,
        Yaml::Boolean(b) => Value::Bool(*b),
        Yaml::Integer(i) => Value::from(*i),
        Yaml::Real(r) => Value::from(
            r.parse::<f64>()
                .unwrap_or_else(|_| panic!("{at}: {r} is not a number")),
        ),
        Yaml::String(s) => Value::String(s.clone()),
        Yaml::Array(a) => a
            .iter()
            .enumerate()
            .map(|(i, v)| to_json(v, &format!("{at}/{i}")))
            .collect(),
        Yaml::Hash(h) => Value::Object(
            h.iter()
                .map(|(k, v)| {
                    let key = match k {
                        Yaml::String(s) => s.clone(),
                        Yaml::Integer(i) => i.to_string(),
                        other => panic!("{at}: the key {other:?} is not a string"),
                    };
                    let value = to_json(v, &format!("{at}/{key}"));
                    (key, value)
                })
                .collect(),
        ),
        Yaml::Alias(_) | Yaml::BadValue => panic!("{at}: YAML aliases are not used in the spec"),
    }
}

/// Follows local `$ref`s (`#/components/...`) to the object they name.
fn resolve<'a>(root: &'a Value, mut v: &'a Value) -> &'a Value {
    for _ in 0..16 {
        let Some(reference) = v.get("$ref").and_then(Value::as_str) else {
            return v;
        };
        let pointer = reference
            .strip_prefix('#')
            .unwrap_or_else(|| panic!("{reference}: only local references are used"));
        v = root
            .pointer(pointer)
            .unwrap_or_else(|| panic!("{reference} names nothing in the spec"));
    }
    panic!("a $ref loop in the spec");
}

/// Keywords that only annotate: they constrain nothing.
const ANNOTATIONS: &[&str] = &["description", "title", "examples", "default", "deprecated"];
/// Keywords the validator checks. Anything else in a schema fails the test.
const CHECKED: &[&str] = &[
    "$ref",
    "type",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "enum",
    "const",
    "minimum",
    "minLength",
    "minItems",
    "allOf",
    "format",
];

fn has_type(value: &Value, t: &str) -> bool {
    match t {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        "boolean" => value.is_boolean(),
        "null" => value.is_null(),
        other => panic!("`type: {other}` is not a JSON Schema type"),
    }
}

/// Validates `value` against `schema`, pushing one message per violation.
fn validate(root: &Value, schema: &Value, value: &Value, at: &str, errors: &mut Vec<String>) {
    let schema = match schema {
        Value::Bool(true) => return,
        Value::Bool(false) => {
            errors.push(format!("{at}: no value is allowed here"));
            return;
        }
        Value::Object(_) => resolve(root, schema),
        other => panic!("{at}: {other} is not a schema"),
    };
    let Some(keywords) = schema.as_object() else {
        return validate(root, schema, value, at, errors);
    };
    for (keyword, arg) in keywords {
        let fail = |errors: &mut Vec<String>, what: String| errors.push(format!("{at}: {what}"));
        match keyword.as_str() {
            "type" => {
                let types: Vec<&str> = match arg {
                    Value::String(t) => vec![t.as_str()],
                    Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
                    _ => panic!("{at}: `type` is a name or a list of names"),
                };
                if !types.iter().any(|t| has_type(value, t)) {
                    fail(errors, format!("{value} is not of type {types:?}"));
                }
            }
            "properties" => {
                if let Some(object) = value.as_object() {
                    for (name, sub) in arg.as_object().expect("properties is a map") {
                        if let Some(v) = object.get(name) {
                            validate(root, sub, v, &format!("{at}.{name}"), errors);
                        }
                    }
                }
            }
            "required" => {
                if let Some(object) = value.as_object() {
                    for name in arg.as_array().expect("required is a list") {
                        let name = name.as_str().expect("required names are strings");
                        if !object.contains_key(name) {
                            fail(errors, format!("the required property `{name}` is missing"));
                        }
                    }
                }
            }
            "additionalProperties" => {
                if let Some(object) = value.as_object() {
                    let known = keywords.get("properties").and_then(Value::as_object);
                    for (name, v) in object {
                        if known.is_some_and(|k| k.contains_key(name)) {
                            continue;
                        }
                        if *arg == Value::Bool(false) {
                            fail(errors, format!("the property `{name}` is not in the spec"));
                        } else {
                            validate(root, arg, v, &format!("{at}.{name}"), errors);
                        }
                    }
                }
            }
            "items" => {
                if let Some(items) = value.as_array() {
                    for (i, v) in items.iter().enumerate() {
                        validate(root, arg, v, &format!("{at}[{i}]"), errors);
                    }
                }
            }
            "enum" => {
                if !arg.as_array().expect("enum is a list").contains(value) {
                    fail(errors, format!("{value} is not one of {arg}"));
                }
            }
            "const" => {
                if arg != value {
                    fail(errors, format!("{value} is not {arg}"));
                }
            }
            "minimum" => {
                if let (Some(n), Some(min)) = (value.as_f64(), arg.as_f64())
                    && value.is_number()
                    && n < min
                {
                    fail(errors, format!("{value} is less than {arg}"));
                }
            }
            "minLength" => {
                if let Some(s) = value.as_str()
                    && (s.chars().count() as u64) < arg.as_u64().expect("minLength")
                {
                    fail(errors, format!("{value} is shorter than {arg}"));
                }
            }
            "minItems" => {
                if let Some(a) = value.as_array()
                    && (a.len() as u64) < arg.as_u64().expect("minItems")
                {
                    fail(errors, format!("fewer than {arg} items"));
                }
            }
            "allOf" => {
                for sub in arg.as_array().expect("allOf is a list") {
                    validate(root, sub, value, at, errors);
                }
            }
            "format" => {
                if let Some(s) = value.as_str() {
                    let ok = match arg.as_str().expect("format is a name") {
                        // The server writes RFC 3339 UTC to the second; anything else is drift.
                        "date-time" => humantime::parse_rfc3339(s).is_ok(),
                        "uri" => url::Url::parse(s).is_ok(),
                        other => panic!("{at}: `format: {other}` is not checked by this test"),
                    };
                    if !ok {
                        fail(errors, format!("{value} is not a {arg}"));
                    }
                }
            }
            k if ANNOTATIONS.contains(&k) => {}
            other => panic!(
                "{at}: the schema keyword `{other}` is not checked by this test: teach validate() or keep it out of docs/openapi.yaml"
            ),
        }
    }
}

/// Every keyword of `schema` (and its subschemas) is one the validator checks, a `$ref`
/// stands alone, and every `examples` entry is valid.
fn audit(root: &Value, schema: &Value, at: &str) {
    let Some(keywords) = schema.as_object() else {
        assert!(schema.is_boolean(), "{at}: {schema} is not a schema");
        return;
    };
    if keywords.contains_key("$ref") {
        let others: Vec<&String> = keywords
            .keys()
            .filter(|k| *k != "$ref" && *k != "description")
            .collect();
        assert!(
            others.is_empty(),
            "{at}: keywords beside $ref are not followed: {others:?}"
        );
        resolve(root, schema);
        return;
    }
    for (keyword, arg) in keywords {
        assert!(
            CHECKED.contains(&keyword.as_str()) || ANNOTATIONS.contains(&keyword.as_str()),
            "{at}: the schema keyword `{keyword}` is not checked by this test"
        );
        match keyword.as_str() {
            "properties" => {
                for (name, sub) in arg.as_object().expect("properties is a map") {
                    audit(root, sub, &format!("{at}/properties/{name}"));
                }
            }
            "additionalProperties" | "items" => audit(root, arg, &format!("{at}/{keyword}")),
            "allOf" => {
                for (i, sub) in arg.as_array().expect("allOf is a list").iter().enumerate() {
                    audit(root, sub, &format!("{at}/allOf/{i}"));
                }
            }
            "examples" => {
                for (i, example) in arg
                    .as_array()
                    .expect("examples is a list")
                    .iter()
                    .enumerate()
                {
                    let mut errors = Vec::new();
                    validate(root, schema, example, "$", &mut errors);
                    assert!(errors.is_empty(), "{at}/examples/{i}: {errors:#?}");
                }
            }
            _ => {}
        }
    }
}

/// Every documented response's headers and body schemas, and every component schema.
fn audit_spec(root: &Value) {
    for (name, schema) in root["components"]["schemas"].as_object().unwrap() {
        audit(root, schema, &format!("#/components/schemas/{name}"));
    }
    let mut responses = Vec::new();
    for (path, item) in root["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            if let Some(map) = op.get("responses").and_then(Value::as_object) {
                for (status, r) in map {
                    responses.push((format!("{method} {path} {status}"), r));
                }
            }
        }
    }
    for (name, r) in root["components"]["responses"].as_object().unwrap() {
        responses.push((format!("#/components/responses/{name}"), r));
    }
    for (label, response) in responses {
        let response = resolve(root, response);
        assert!(
            response.get("description").is_some(),
            "{label}: a response needs a description"
        );
        for (name, h) in response
            .get("headers")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
        {
            audit(
                root,
                &resolve(root, h)["schema"],
                &format!("{label} header {name}"),
            );
        }
        for (media, content) in response
            .get("content")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
        {
            audit(root, &content["schema"], &format!("{label} {media}"));
        }
    }
}

/// (method, path) of every operation in the spec.
fn spec_routes(root: &Value) -> BTreeSet<(String, String)> {
    let mut routes = BTreeSet::new();
    for (path, item) in root["paths"].as_object().expect("paths") {
        for key in item.as_object().expect("a path item").keys() {
            if HTTP_METHODS.contains(&key.as_str()) {
                routes.insert((key.clone(), path.clone()));
            }
        }
    }
    routes
}

/// (method, path, status) of every documented response.
fn spec_statuses(root: &Value) -> BTreeSet<(String, String, String)> {
    let mut out = BTreeSet::new();
    for (method, path) in spec_routes(root) {
        for status in root["paths"][&path][&method]["responses"]
            .as_object()
            .unwrap_or_else(|| panic!("{method} {path} documents no responses"))
            .keys()
        {
            out.insert((method.clone(), path.clone(), status.clone()));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// The router's routes, read from its source.

/// Whether `code` calls a function or method named `name` (a whole identifier).
fn calls(code: &str, name: &str) -> bool {
    let pattern = format!("{name}(");
    code.match_indices(&pattern).any(|(i, _)| {
        !code[..i]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
    })
}

/// (method, path) of every `.route(..)` in `src/http/mod.rs` (outside its unit tests). Any
/// way of adding routes this reader does not follow fails, rather than being missed.
fn router_routes(source: &str) -> BTreeSet<(String, String)> {
    let code: String = source
        .split("#[cfg(test)]")
        .next()
        .unwrap()
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n");
    for construct in [
        "nest",
        "nest_service",
        "route_service",
        "fallback_service",
        "on",
        "on_service",
    ] {
        assert!(
            !calls(&code, construct),
            "src/http/mod.rs calls `{construct}(..)`: teach router_routes() in tests/integration/openapi.rs to read it"
        );
    }
    // `.merge(x)` is followed only for routers built in this file (`let x = Router::new()`).
    for merged in code.split(".merge(").skip(1) {
        let name = merged.split(')').next().unwrap().trim();
        assert!(
            code.contains(&format!("let {name} = Router::new()")),
            "src/http/mod.rs merges `{name}`, a router built elsewhere: its routes would be missed"
        );
    }
    let mut routes = BTreeSet::new();
    for call in code.split(".route(").skip(1) {
        let mut depth = 1;
        let end = call
            .char_indices()
            .find(|&(_, c)| {
                match c {
                    '(' => depth += 1,
                    ')' => depth -= 1,
                    _ => {}
                }
                depth == 0
            })
            .map(|(i, _)| i)
            .expect("a closed .route( call");
        let args = &call[..end];
        let mut parts = args.splitn(3, '"');
        let (_, path, methods) = (parts.next(), parts.next(), parts.next());
        let (path, methods) = (
            path.expect("a route's path is a string literal"),
            methods.unwrap(),
        );
        let mut found = false;
        let bytes = methods.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i].is_ascii_alphabetic() || bytes[i] == b'_' {
                let start = i;
                while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                    i += 1;
                }
                let word = &methods[start..i];
                let method = word.strip_suffix("_service").unwrap_or(word);
                // OpenAPI has no catch-all template: `{*path}` is documented as `{path}`.
                let path = path.replace("{*", "{");
                if methods[i..].starts_with('(') && HTTP_METHODS.contains(&method) {
                    routes.insert((method.to_string(), path));
                    found = true;
                } else if methods[i..].starts_with('(') && method == "any" {
                    // The proxy's: every method a request can be forwarded with (HEAD
                    // comes with GET, as everywhere; TRACE and CONNECT answer 405).
                    for m in PROXIED_METHODS {
                        routes.insert((m.to_string(), path.clone()));
                    }
                    found = true;
                }
            } else {
                i += 1;
            }
        }
        assert!(found, "no method found in .route({args})");
    }
    assert!(!routes.is_empty(), "no route found in src/http/mod.rs");
    routes
}

// ---------------------------------------------------------------------------------------
// Requests and their checks.

struct Reply {
    status: u16,
    headers: HeaderMap,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A request as a local TCP client sends it: from a loopback peer, `Host` naming the
/// loopback address (`headers` may replace it).
async fn send(api: &Api, method: Method, uri: &str, headers: &[(&str, &str)]) -> Reply {
    let mut req = request(method, uri, headers, Body::empty());
    if !req.headers().contains_key(header::HOST) {
        let host = HeaderValue::from_static("127.0.0.1:8731");
        req.headers_mut().insert(header::HOST, host);
    }
    req.extensions_mut()
        .insert(Peer::Tcp("127.0.0.1:40000".parse().unwrap()));
    let (status, headers, body) = call(api, req).await;
    Reply {
        status: status.as_u16(),
        headers,
        body,
    }
}

/// The spec, the answers checked against it, and what went wrong.
struct Contract {
    spec: Value,
    seen: BTreeSet<(String, String, String)>,
    failures: Vec<String>,
}

impl Contract {
    fn new() -> Contract {
        let spec = spec();
        audit_spec(&spec);
        Contract {
            spec,
            seen: BTreeSet::new(),
            failures: Vec::new(),
        }
    }

    /// Sends the request, asserts the status, and checks the answer against the spec's
    /// response for `template` + method + status.
    async fn expect(
        &mut self,
        api: &Api,
        method: Method,
        template: &str,
        uri: &str,
        headers: &[(&str, &str)],
        status: u16,
    ) -> Reply {
        let reply = send(api, method.clone(), uri, headers).await;
        assert_eq!(
            reply.status,
            status,
            "{method} {uri} with {headers:?}: {}",
            reply.text()
        );
        let m = method.as_str().to_ascii_lowercase();
        let key = status.to_string();
        let label = format!("{method} {uri} → {status}");
        let responses = self.spec["paths"]
            .get(template)
            .and_then(|item| item.get(&m))
            .map(|op| &op["responses"]);
        // A status an operation does not list is its `default` (the proxy's upstream).
        let (key, response) = match responses.and_then(|r| r.get(&key)) {
            Some(r) => (key, Some(r.clone())),
            None => (
                "default".to_string(),
                responses.and_then(|r| r.get("default")).cloned(),
            ),
        };
        self.seen.insert((m.clone(), template.to_string(), key));
        match response {
            Some(response) => self.check_response(&response, &reply, &label),
            None => self
                .failures
                .push(format!("{label}: the spec documents no such response")),
        }
        reply
    }

    /// The answer's documented headers, media type and body.
    fn check_response(&mut self, response: &Value, reply: &Reply, label: &str) {
        let root = &self.spec;
        let response = resolve(root, response);
        let mut errors = Vec::new();
        for (name, h) in response
            .get("headers")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
        {
            let h = resolve(root, h);
            match reply.headers.get(name.as_str()).map(|v| v.to_str()) {
                None if h["required"] == true => {
                    errors.push(format!("the documented header {name} is missing"))
                }
                None => {}
                Some(Ok(v)) => validate(
                    root,
                    &h["schema"],
                    &Value::from(v),
                    &format!("header {name}"),
                    &mut errors,
                ),
                Some(Err(_)) => errors.push(format!("header {name} is not visible ASCII")),
            }
        }
        match response.get("content").and_then(Value::as_object) {
            None => {
                if !reply.body.is_empty() {
                    errors.push("documented without a body, but it has one".into());
                }
            }
            Some(content) => {
                let content_type = reply
                    .headers
                    .get(header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default();
                let essence = content_type
                    .split(';')
                    .next()
                    .unwrap()
                    .trim()
                    .to_ascii_lowercase();
                match content.get(&essence) {
                    None => errors.push(format!(
                        "Content-Type {content_type:?} is not among the documented {:?}",
                        content.keys().collect::<Vec<_>>()
                    )),
                    Some(media) => {
                        let body = if essence == "application/json" {
                            serde_json::from_slice(&reply.body).ok()
                        } else if essence.starts_with("text/") {
                            String::from_utf8(reply.body.clone()).ok().map(Value::from)
                        } else {
                            panic!("{label}: no check for {essence}")
                        };
                        match body {
                            Some(body) => validate(root, &media["schema"], &body, "$", &mut errors),
                            None => errors.push(format!("the body is not {essence}")),
                        }
                    }
                }
            }
        }
        for e in errors {
            self.failures
                .push(format!("{label}: {e}\n    body: {}", reply.text()));
        }
    }

    /// Every documented (route, status) of the paths `covers` accepts was answered, and
    /// every answer matched.
    fn finish(self, covers: impl Fn(&str) -> bool) {
        let missing: Vec<_> = spec_statuses(&self.spec)
            .difference(&self.seen)
            .filter(|(_, path, _)| covers(path))
            .cloned()
            .collect();
        assert!(
            self.failures.is_empty(),
            "answers that do not match docs/openapi.yaml:\n{}",
            self.failures.join("\n")
        );
        assert!(
            missing.is_empty(),
            "documented but never produced by this test: {missing:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// The daemon under test.

/// A provider whose refresh tokens last one day (`refresh_token_expires_in`), so that
/// /v1/accounts shows `refresh_token_expires_at` and `warning`. No scope is sent.
fn short_lived_refresh_tokens() -> Router {
    let serial = Arc::new(AtomicU64::new(0));
    Router::new().route(
        "/short/token",
        post(move || {
            let n = serial.fetch_add(1, Ordering::SeqCst);
            async move {
                axum::Json(json!({
                    "access_token": format!("at-short-{n}"),
                    "token_type": "bearer",
                    "expires_in": 3600,
                    "refresh_token": format!("rt-short-{n}"),
                    "refresh_token_expires_in": 86_400,
                }))
            }
        }),
    )
}

const SHORT_ACCOUNT: &str = r#"
[accounts.short]
grant = "refresh_token"
token_url = "http://127.0.0.1/short/token"
client_id = "short-client"
refresh_token = "rt-short-seed"
"#;

const CONSUMERS: &str = r#"
[consumers.billing]
key = "billing-key-0123456789"
accounts = ["zy"]

[consumers.ops]
key = "ops-key-0123456789"
accounts = ["*"]

[server]
metrics_key = "scrape-key-0123456789"
"#;

/// The daemon with the fake provider's `zy` (refresh token) and `cc` (client credentials)
/// accounts plus `extra`, once every account has settled.
async fn start_daemon(extra: &str) -> Harness {
    let (clock, fake) = manual_provider(Duration::from_secs(3600));
    let seed = fake.grant_refresh_token("zy-client", Some("offline_access accounts:read"));
    let accounts = zywave_account("zy", &seed) + &client_credentials_account("cc") + extra;
    let h = Harness::builder(fake, clock, tempfile::tempdir().unwrap())
        .routes(short_lived_refresh_tokens())
        .accounts(&accounts)
        .await;
    h.settle(Duration::from_secs(60)).await;
    h
}

// ---------------------------------------------------------------------------------------
// The tests.

#[test]
fn openapi_documents_exactly_the_routes_of_the_router() {
    let spec = spec();
    assert!(
        spec["openapi"]
            .as_str()
            .unwrap_or_default()
            .starts_with("3.1."),
        "OpenAPI 3.1"
    );
    assert_eq!(
        spec["info"]["version"],
        env!("CARGO_PKG_VERSION"),
        "info.version follows Cargo.toml"
    );
    audit_spec(&spec);
    let documented = spec_routes(&spec);
    let served = router_routes(ROUTER_SOURCE);
    assert_eq!(
        served.difference(&documented).collect::<Vec<_>>(),
        Vec::<&(String, String)>::new(),
        "routes of src/http/mod.rs router() missing from docs/openapi.yaml"
    );
    assert_eq!(
        documented.difference(&served).collect::<Vec<_>>(),
        Vec::<&(String, String)>::new(),
        "routes in docs/openapi.yaml that src/http/mod.rs router() does not serve"
    );
    // Routes are built in src/http/mod.rs only (the fake provider's are its own).
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut pending = vec![src.clone()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.strip_prefix(&src).unwrap().display().to_string();
            if path.is_dir() {
                if name != "demo" {
                    pending.push(path);
                }
                continue;
            }
            if name == "http/mod.rs" || !name.ends_with(".rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            assert!(
                !text.contains(".route(") && !text.contains(".nest("),
                "src/{name} adds routes: document them in docs/openapi.yaml and read them in router_routes()"
            );
        }
    }
}

#[test]
fn openapi_validator_catches_drift() {
    let spec = spec();
    let token = json!({
        "account": "zy",
        "access_token": "at-1",
        "token_type": "Bearer",
        "expires_at": "2027-01-15T09:00:00Z",
        "expires_in": 3599,
        "scope": null,
        "headers": { "Authorization": "Bearer at-1", "Profile": "B 1234" },
    });
    let schema = json!({ "$ref": "#/components/schemas/Token" });
    let errors = |value: &Value| {
        let mut errors = Vec::new();
        validate(&spec, &schema, value, "$", &mut errors);
        errors
    };
    assert_eq!(errors(&token), Vec::<String>::new());
    type Drift = (&'static str, fn(&mut Value));
    let drifts: [Drift; 7] = [
        ("an extra field", |t| t["refresh_token"] = json!("rt")),
        ("a missing field", |t| {
            t.as_object_mut().unwrap().remove("scope");
        }),
        ("a number as a string", |t| t["expires_in"] = json!("3599")),
        ("a negative number", |t| t["expires_in"] = json!(-1)),
        ("a time that is no RFC 3339", |t| {
            t["expires_at"] = json!("1800003600")
        }),
        ("no Authorization header", |t| {
            t["headers"] = json!({ "Profile": "B 1234" })
        }),
        ("a header that is no string", |t| {
            t["headers"]["X-N"] = json!(1)
        }),
    ];
    for (what, drift) in drifts {
        let mut t = token.clone();
        drift(&mut t);
        assert!(!errors(&t).is_empty(), "{what} went unnoticed");
    }
    let mut unavailable = Vec::new();
    validate(
        &spec,
        &json!({ "$ref": "#/components/responses/Unavailable/content/application~1json/schema" }),
        &json!({ "error": "token_unavailable", "error_description": "x", "state": "asleep" }),
        "$",
        &mut unavailable,
    );
    assert!(!unavailable.is_empty(), "a state outside the enum");
    let mut forbidden = Vec::new();
    validate(
        &spec,
        &json!({ "$ref": "#/components/responses/Forbidden/content/application~1json/schema" }),
        &json!({ "error": "unauthorized", "error_description": "x" }),
        "$",
        &mut forbidden,
    );
    assert!(!forbidden.is_empty(), "a 403 with another error code");
}

#[tokio::test(start_paused = true)]
async fn openapi_every_route_and_status_matches_the_daemon() {
    let mut c = Contract::new();
    let get = Method::GET;
    let post = Method::POST;
    const TOKEN: &str = "/v1/token/{account}";
    const PLAIN: &str = "/v1/token/{account}/access_token";
    const REFRESH: &str = "/v1/accounts/{account}/refresh";

    // Open access: no consumers. `bad` holds a refresh token the provider rejects.
    let extra = zywave_account("bad", "rt-unknown") + SHORT_ACCOUNT;
    let d = start_daemon(&extra).await;
    let api = &d.api;

    let token = c
        .expect(api, get.clone(), TOKEN, "/v1/token/zy", &[MARK], 200)
        .await
        .json();
    assert_eq!(
        token["headers"]["Authorization"],
        format!(
            "{} {}",
            token["token_type"].as_str().unwrap(),
            token["access_token"].as_str().unwrap()
        )
    );
    assert_eq!(token["headers"]["Profile"], "B 1234");
    let short = c
        .expect(api, get.clone(), TOKEN, "/v1/token/short", &[MARK], 200)
        .await
        .json();
    assert_eq!(short["scope"], Value::Null, "no scope configured or sent");
    c.expect(
        api,
        get.clone(),
        TOKEN,
        "/v1/token/cc?min_valid=60",
        &[MARK],
        200,
    )
    .await;
    for uri in ["/v1/token/zy?min_valid=soon", "/v1/token/zy?min_valid=-1"] {
        c.expect(api, get.clone(), TOKEN, uri, &[MARK], 400).await;
    }
    for headers in [
        &[][..],
        &[("Tokend-Request", " ")],
        &[MARK, ("Origin", "null")],
        &[MARK, ("X-Forwarded-For", "10.1.2.3")],
        &[MARK, ("Forwarded", "for=10.1.2.3")],
        &[MARK, ("Host", "rebound.example:8731")],
    ] {
        c.expect(api, get.clone(), TOKEN, "/v1/token/zy", headers, 403)
            .await;
    }
    c.expect(api, get.clone(), TOKEN, "/v1/token/nope", &[MARK], 404)
        .await;
    let refused = c
        .expect(api, get.clone(), TOKEN, "/v1/token/bad", &[MARK], 503)
        .await
        .json();
    assert_eq!(refused["state"], "needs_reauth");

    let plain = c
        .expect(
            api,
            get.clone(),
            PLAIN,
            "/v1/token/zy/access_token",
            &[MARK],
            200,
        )
        .await;
    assert_eq!(plain.text(), token["access_token"].as_str().unwrap());
    let uri = "/v1/token/zy/access_token?min_valid=1.5";
    c.expect(api, get.clone(), PLAIN, uri, &[MARK], 400).await;
    let uri = "/v1/token/zy/access_token";
    c.expect(api, get.clone(), PLAIN, uri, &[], 403).await;
    let uri = "/v1/token/nope/access_token";
    c.expect(api, get.clone(), PLAIN, uri, &[MARK], 404).await;
    let uri = "/v1/token/bad/access_token";
    c.expect(api, get.clone(), PLAIN, uri, &[MARK], 503).await;

    // min_interval (5 s in the harness config) holds for forced refreshes too: `zy` got
    // its token a moment ago.
    let too_soon = c
        .expect(
            api,
            post.clone(),
            REFRESH,
            "/v1/accounts/zy/refresh",
            &[MARK],
            503,
        )
        .await
        .json();
    assert_eq!(too_soon["state"], "ok", "{too_soon}");
    // Moves the paused clock past min_interval (no condition is waited for).
    tokio::time::sleep(Duration::from_secs(6)).await;
    let refreshed = c
        .expect(
            api,
            post.clone(),
            REFRESH,
            "/v1/accounts/zy/refresh",
            &[MARK],
            200,
        )
        .await
        .json();
    assert_eq!(refreshed["state"], "ok");
    let uri = "/v1/accounts/bad/refresh";
    let refused = c
        .expect(api, post.clone(), REFRESH, uri, &[MARK], 503)
        .await;
    assert_eq!(refused.json()["state"], "needs_reauth");
    let uri = "/v1/accounts/nope/refresh";
    c.expect(api, post.clone(), REFRESH, uri, &[MARK], 404)
        .await;
    let uri = "/v1/accounts/zy/refresh";
    c.expect(api, post.clone(), REFRESH, uri, &[], 403).await;

    let list = c
        .expect(api, get.clone(), "/v1/accounts", "/v1/accounts", &[], 200)
        .await
        .json();
    let account = |name: &str| {
        list["accounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["account"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("{name} is listed"))
    };
    let (short, bad, cc) = (account("short"), account("bad"), account("cc"));
    assert!(short["refresh_token_expires_at"].is_string(), "{short}");
    assert!(short["warning"].is_string(), "one day left: {short}");
    assert_eq!(bad["state"], "needs_reauth");
    assert!(
        bad["expires_at"].is_null() && bad["last_error"].is_string(),
        "{bad}"
    );
    assert!(cc["refresh_token_issued_at"].is_null(), "{cc}");
    // No reload yet: the config the daemon started with, applied.
    let reload = &list["reload"];
    assert_eq!(reload["generation"], 0, "{reload}");
    assert_eq!(reload["successful"], true, "{reload}");
    assert_eq!(reload["at"], reload["last_success_at"], "{reload}");

    c.expect(api, get.clone(), "/healthz", "/healthz", &[], 200)
        .await;
    let not_ready = c
        .expect(api, get.clone(), "/readyz", "/readyz", &[], 503)
        .await
        .json();
    assert_eq!(not_ready["not_ready"][0]["account"], "bad");
    let metrics = c
        .expect(api, get.clone(), "/metrics", "/metrics", &[], 200)
        .await;
    assert!(metrics.text().contains("tokend_account_state"));
    // Every route holds its Host to this daemon: one, naming loopback.
    for route in ["/healthz", "/readyz", "/metrics", "/v1/accounts"] {
        let twice = [("Host", "127.0.0.1:8731"), ("Host", "rebound.example:8731")];
        c.expect(api, get.clone(), route, route, &twice, 400).await;
        let rebound = [("Host", "rebound.example:8731")];
        c.expect(api, get.clone(), route, route, &rebound, 403)
            .await;
    }
    let via = [("Via", "1.1 proxy")];
    c.expect(api, get.clone(), "/v1/accounts", "/v1/accounts", &via, 403)
        .await;

    // Not a route: the documented NotFound answer. A route asked with another method: 405,
    // no body.
    let reply = send(api, get.clone(), "/v1/tokens/zy", &[MARK]).await;
    assert_eq!(reply.status, 404);
    let not_found = json!({ "$ref": "#/components/responses/NotFound" });
    c.check_response(&not_found, &reply, "GET /v1/tokens/zy → 404");
    for (method, uri) in [
        (Method::DELETE, "/v1/token/zy"),
        (get.clone(), "/v1/accounts/zy/refresh"),
        (post.clone(), "/healthz"),
    ] {
        let reply = send(api, method.clone(), uri, &[MARK]).await;
        assert_eq!((reply.status, reply.body.len()), (405, 0), "{method} {uri}");
    }
    d.stop().await;

    // Consumers configured: keys are required and scoped, and the list is filtered.
    let d = start_daemon(CONSUMERS).await;
    let api = &d.api;
    let wrong = ("Authorization", "Bearer wrong-key");
    for (template, uri, method) in [
        (TOKEN, "/v1/token/zy", get.clone()),
        (PLAIN, "/v1/token/zy/access_token", get.clone()),
        (REFRESH, "/v1/accounts/zy/refresh", post.clone()),
    ] {
        c.expect(api, method.clone(), template, uri, &[MARK], 401)
            .await;
        c.expect(api, method.clone(), template, uri, &[MARK, wrong], 401)
            .await;
        let other = uri.replace("/zy", "/cc");
        c.expect(api, method.clone(), template, &other, &[MARK, BILLING], 403)
            .await;
        let unknown = uri.replace("/zy", "/nope");
        c.expect(api, method, template, &unknown, &[MARK, BILLING], 403)
            .await;
    }
    c.expect(
        api,
        get.clone(),
        TOKEN,
        "/v1/token/zy",
        &[MARK, BILLING],
        200,
    )
    .await;
    c.expect(api, get.clone(), TOKEN, "/v1/token/cc", &[MARK, OPS], 200)
        .await;
    c.expect(api, get.clone(), TOKEN, "/v1/token/nope", &[MARK, OPS], 404)
        .await;
    c.expect(api, get.clone(), "/v1/accounts", "/v1/accounts", &[], 401)
        .await;
    c.expect(
        api,
        get.clone(),
        "/v1/accounts",
        "/v1/accounts",
        &[wrong],
        401,
    )
    .await;
    let names = |list: Value| -> Vec<String> {
        list["accounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["account"].as_str().unwrap().to_string())
            .collect()
    };
    let list = c
        .expect(
            api,
            get.clone(),
            "/v1/accounts",
            "/v1/accounts",
            &[BILLING],
            200,
        )
        .await;
    assert_eq!(names(list.json()), ["zy"]);
    let list = c
        .expect(
            api,
            get.clone(),
            "/v1/accounts",
            "/v1/accounts",
            &[OPS],
            200,
        )
        .await;
    assert_eq!(names(list.json()), ["cc", "zy"]);
    let ready = c
        .expect(api, get.clone(), "/readyz", "/readyz", &[], 200)
        .await;
    assert_eq!(ready.json(), json!({ "ready": true }));
    let ready = c
        .expect(api, get.clone(), "/readyz", "/readyz", &[wrong], 200)
        .await;
    assert_eq!(ready.json(), json!({ "ready": true }));
    for key in [&[][..], &[wrong], &[OPS]] {
        c.expect(api, get.clone(), "/metrics", "/metrics", key, 401)
            .await;
    }
    let scraper = ("Authorization", "Bearer scrape-key-0123456789");
    c.expect(api, get.clone(), "/metrics", "/metrics", &[scraper], 200)
        .await;
    d.stop().await;

    // The proxy's answers need a real clock: `openapi_the_proxy_answers_as_documented`.
    c.finish(|path| !path.starts_with("/proxy/"));
}

/// A request's URI and headers, and the status it must get.
type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], u16);

/// The proxy's routes against the spec, on a real clock: its upstream calls are real
/// loopback HTTP, which tokio's paused clock would time out at once. Every method, every
/// documented status: the upstream's own answer (`default`), each guard, no such account
/// or no proxy, an unreachable upstream, no token, a slow upstream.
#[tokio::test]
async fn openapi_the_proxy_answers_as_documented() {
    const PROXY: &str = "/proxy/{account}/{path}";
    let upstream = Router::new()
        .route(
            "/base/slow",
            axum::routing::any(|| async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                StatusCode::NO_CONTENT
            }),
        )
        .fallback(|| async { StatusCode::NO_CONTENT });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, upstream).await.unwrap() });
    let dead = free_port();
    let extra = format!(
        "{}{SHORT_ACCOUNT}{CONSUMERS}\n[accounts.zy.proxy]\nupstream = \"http://{up}/base\"\ntimeout = \"200ms\"\n\
         \n[accounts.cc.proxy]\nupstream = \"http://127.0.0.1:{dead}/\"\n\
         \n[accounts.bad.proxy]\nupstream = \"http://{up}/\"\n",
        zywave_account("bad", "rt-unknown")
    );
    let d = start_daemon(&extra).await;
    let api = &d.api;
    let mut c = Contract::new();
    for name in PROXIED_METHODS {
        let m = Method::from_bytes(name.to_ascii_uppercase().as_bytes()).unwrap();
        let cases: [Case; 10] = [
            ("/proxy/zy/items?x=1", &[MARK, OPS], 204),
            ("/proxy/zy/a/%2e%2e/b", &[MARK, OPS], 400),
            ("/proxy/zy/items", &[MARK], 401),
            ("/proxy/zy/items", &[OPS], 403),
            ("/proxy/cc/items", &[MARK, BILLING], 403),
            ("/proxy/nope/items", &[MARK, OPS], 404),
            ("/proxy/short/items", &[MARK, OPS], 404),
            ("/proxy/cc/items", &[MARK, OPS], 502),
            ("/proxy/bad/items", &[MARK, OPS], 503),
            ("/proxy/zy/slow", &[MARK, OPS], 504),
        ];
        for (uri, headers, status) in cases {
            c.expect(api, m.clone(), PROXY, uri, headers, status).await;
        }
    }
    let head = send(api, Method::HEAD, "/proxy/zy/items", &[MARK, OPS]).await;
    assert_eq!(head.status, 204, "HEAD goes with GET");
    let trace = send(api, Method::TRACE, "/proxy/zy/items", &[MARK, OPS]).await;
    assert_eq!(trace.status, 405, "TRACE would echo the credentials");
    assert!(trace.body.is_empty());
    d.stop().await;
    c.finish(|path| path == PROXY);
}
