//! The admin API and the plugin registry, over real sockets: uploads take
//! effect at once, swaps under load fail nothing, bad uploads are refused
//! with a reason, tenants cannot see each other, restarts keep the set.

mod support;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use serde_json::{Value, json};
use sluice::config::hash_key;
use support::*;

const ACME_KEY: &str = "sk-test-acme";
const ACME_ADMIN: &str = "sk-admin-acme";
const OTHER_KEY: &str = "sk-test-other";
const OTHER_ADMIN: &str = "sk-admin-other";
const OPERATOR: &str = "sk-operator";

/// Two tenants on one pool, each with an API key and an admin key, an
/// operator key, and a registry in `data_dir`.
fn config(engine: &str, data_dir: &Path, registry_extra: &str) -> String {
    let admin = |id: &str, key: &str| {
        format!(
            "admin_keys = [{{ id = \"{id}-admin\", sha256 = \"{}\" }}]",
            hash_key(key)
        )
    };
    format!(
        "{}{}{}\n[registry]\ndata_dir = {:?}\n{registry_extra}\n[admin]\noperator_keys = [{{ id = \"ops\", sha256 = \"{}\" }}]\n",
        pool("shared", &[engine.to_owned()], ""),
        tenant("acme", "shared", ACME_KEY, &admin("acme", ACME_ADMIN)),
        tenant("other", "shared", OTHER_KEY, &admin("other", OTHER_ADMIN)),
        data_dir,
        hash_key(OPERATOR),
    )
}

struct Admin<'a> {
    gw: &'a Gateway,
    key: &'a str,
}

impl Admin<'_> {
    fn url(&self, path: &str) -> String {
        format!("http://{}/admin/v1{path}", self.gw.ops)
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> (u16, Value) {
        let mut req = http_client()
            .request(method, self.url(path))
            .bearer_auth(self.key);
        if let Some(b) = body {
            req = req.body(b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        let v = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"));
        (status, v)
    }

    async fn upload(&self, tenant: &str, name: &str, bytes: Vec<u8>) -> (u16, Value) {
        self.send(
            reqwest::Method::PUT,
            &format!("/tenants/{tenant}/plugins/{name}"),
            Some(bytes),
        )
        .await
    }

    async fn set_chain(&self, tenant: &str, chain: Value) -> (u16, Value) {
        self.send(
            reqwest::Method::PUT,
            &format!("/tenants/{tenant}/chain"),
            Some(serde_json::to_vec(&json!({ "plugins": chain })).unwrap()),
        )
        .await
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.send(reqwest::Method::GET, path, None).await
    }
}

fn ok(r: (u16, Value)) -> Value {
    assert!((200..300).contains(&r.0), "{}: {}", r.0, r.1);
    r.1
}

fn refused(r: (u16, Value), status: u16, code: &str) -> String {
    assert_eq!(r.0, status, "{}", r.1);
    assert_eq!(r.1["error"]["code"], code, "{}", r.1);
    r.1["error"]["message"].as_str().unwrap().to_owned()
}

async fn chat(gw: &Gateway, key: &str, body: &Value) -> (u16, Value) {
    let resp = http_client()
        .post(gw.http_url("/v1/chat/completions"))
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

fn long_prompt() -> Value {
    json!({"model": "deepseek-v4-flash", "max_tokens": 4,
           "messages": [{"role": "user", "content": "word ".repeat(200)}]})
}

fn aliased() -> Value {
    json!({"model": "v4", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
}

/// A chain that caps input at 50 tokens with an uploaded context-cap.
fn cap_chain(name: &str) -> Value {
    json!([{ "plugin": name, "config": { "max_input_tokens": 50 } }])
}

#[tokio::test]
async fn an_upload_is_live_for_the_next_request_and_lists_its_versions() {
    let engine = sim_engine(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(&config(&url(&engine), dir.path(), "")).await;
    let admin = Admin {
        gw: &gw,
        key: ACME_ADMIN,
    };

    // Before: no chain, a long prompt passes.
    assert_eq!(chat(&gw, ACME_KEY, &long_prompt()).await.0, 200);

    let up = ok(admin.upload("acme", "cap", component("context-cap")).await);
    assert_eq!(up["created"], true);
    assert_eq!(up["version"]["version"], 1);
    assert_eq!(up["in_chain"], false);
    let chain = ok(admin.set_chain("acme", cap_chain("cap")).await);
    assert_eq!(chain["source"], "registry");
    assert_eq!(chain["plugins"][0]["version"], 1);

    // The very next request obeys it: the swap happened before the answer.
    let (status, body) = chat(&gw, ACME_KEY, &long_prompt()).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "context_length_exceeded", "{body}");
    // The other tenant is untouched.
    assert_eq!(chat(&gw, OTHER_KEY, &long_prompt()).await.0, 200);

    // A new version must accept the config its chain step gives it: a
    // request-shaper uploaded as "cap" refuses context-cap's config.
    let v2 = admin
        .upload("acme", "cap", component("request-shaper"))
        .await;
    let msg = refused(v2, 422, "plugin_config_refused");
    assert!(msg.contains("max_input_tokens"), "{msg}");
    // The refused upload left v1 live.
    assert_eq!(chat(&gw, ACME_KEY, &long_prompt()).await.0, 400);

    // Same bytes again: no new version.
    let again = admin.upload("acme", "cap", component("context-cap")).await;
    assert_eq!(again.0, 200, "{}", again.1);
    assert_eq!(again.1["created"], false);

    let list = ok(admin.get("/tenants/acme/plugins").await);
    let p = &list["plugins"][0];
    assert_eq!(p["name"], "cap");
    assert_eq!(p["active_version"], 1);
    assert_eq!(p["in_chain"], true);
    assert_eq!(p["versions"].as_array().unwrap().len(), 1);
    let v = &p["versions"][0];
    assert_eq!(v["plugin_name"], "context-cap");
    assert_eq!(v["uploaded_by"], "acme-admin");
    assert_eq!(
        v["size"].as_u64().unwrap() as usize,
        component("context-cap").len()
    );
    assert_eq!(v["sha256"].as_str().unwrap().len(), 64);
    assert!(v["uploaded_at"].as_str().unwrap().ends_with('Z'));
    let one = ok(admin.get("/tenants/acme/plugins/cap").await);
    assert_eq!(one["versions"], p["versions"]);
}

#[tokio::test]
async fn rollback_delete_and_chain_reset() {
    let engine = sim_engine(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(&config(&url(&engine), dir.path(), "")).await;
    let admin = Admin {
        gw: &gw,
        key: ACME_ADMIN,
    };

    // v1: a shaper aliasing "v4"; v2: a shaper without aliases.
    let alias = json!({"model_aliases": {"v4": "deepseek-v4-flash"}});
    ok(admin
        .upload("acme", "shape", component("request-shaper"))
        .await);
    ok(admin
        .set_chain("acme", json!([{ "plugin": "shape", "config": alias }]))
        .await);
    assert_eq!(chat(&gw, ACME_KEY, &aliased()).await.0, 200);
    // v2 is a different component that accepts the same config (the
    // shaper's bytes with its own name changed).
    let v2_bytes = patched(
        component("request-shaper"),
        b"request-shaper",
        b"request-shapeR",
    );
    let v2 = ok(admin.upload("acme", "shape", v2_bytes).await);
    assert_eq!(v2["version"]["version"], 2);
    assert_eq!(v2["in_chain"], true);

    let r = ok(admin
        .send(
            reqwest::Method::POST,
            "/tenants/acme/plugins/shape/rollback",
            None,
        )
        .await);
    assert_eq!(r["active"]["version"], 1);
    assert_eq!(chat(&gw, ACME_KEY, &aliased()).await.0, 200);
    // Roll forward to a named version, and refusals.
    let r = ok(admin
        .send(
            reqwest::Method::POST,
            "/tenants/acme/plugins/shape/rollback",
            Some(br#"{"version": 2}"#.to_vec()),
        )
        .await);
    assert_eq!(r["active"]["version"], 2);
    let r = admin
        .send(
            reqwest::Method::POST,
            "/tenants/acme/plugins/shape/rollback",
            Some(br#"{"version": 9}"#.to_vec()),
        )
        .await;
    refused(r, 404, "version_not_found");
    ok(admin
        .send(
            reqwest::Method::POST,
            "/tenants/acme/plugins/shape/rollback",
            None,
        )
        .await);
    let r = admin
        .send(
            reqwest::Method::POST,
            "/tenants/acme/plugins/shape/rollback",
            None,
        )
        .await;
    refused(r, 409, "no_earlier_version");

    // A plugin in the chain cannot be deleted; out of it, it can.
    let r = admin
        .send(reqwest::Method::DELETE, "/tenants/acme/plugins/shape", None)
        .await;
    refused(r, 409, "plugin_in_chain");
    let reset = ok(admin
        .send(reqwest::Method::DELETE, "/tenants/acme/chain", None)
        .await);
    assert_eq!(reset["source"], "config");
    assert_eq!(
        chat(&gw, ACME_KEY, &aliased()).await.0,
        404,
        "no alias without the shaper"
    );
    ok(admin
        .send(reqwest::Method::DELETE, "/tenants/acme/plugins/shape", None)
        .await);
    let r = admin.get("/tenants/acme/plugins/shape").await;
    refused(r, 404, "plugin_not_found");
    // A name uploaded again does not reuse the numbers it had.
    let again = ok(admin
        .upload("acme", "shape", component("request-shaper"))
        .await);
    assert_eq!(again["version"]["version"], 3);

    // A chain edit based on an old read is refused, not applied over
    // another's change.
    let seen = ok(admin.get("/tenants/acme/chain").await)["revision"]
        .as_u64()
        .unwrap();
    ok(admin
        .set_chain("acme", json!([{ "builtin": "request-shaper" }]))
        .await);
    let body = |v: Value| Some(serde_json::to_vec(&v).unwrap());
    let stale = admin
        .send(
            reqwest::Method::PUT,
            "/tenants/acme/chain",
            body(json!({ "plugins": [], "revision": seen })),
        )
        .await;
    refused(stale, 409, "revision_mismatch");
    let now = ok(admin.get("/tenants/acme/chain").await);
    assert_eq!(now["plugins"][0]["builtin"], "request-shaper");
    let current = json!({ "plugins": [], "revision": now["revision"] });
    ok(admin
        .send(reqwest::Method::PUT, "/tenants/acme/chain", body(current))
        .await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_changes_all_land_and_the_last_one_is_live() {
    let engine = sim_engine(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(&config(&url(&engine), dir.path(), "")).await;
    let admin = Admin {
        gw: &gw,
        key: ACME_ADMIN,
    };
    let uploads = (0..4).map(|i| {
        let name = format!("request-shape{i}");
        let bytes = patched(
            component("request-shaper"),
            b"request-shaper",
            name.as_bytes(),
        );
        admin.upload("acme", "shape", bytes)
    });
    let chains = (0..4).map(|i| {
        let step =
            json!([{ "builtin": "context-cap", "config": { "max_input_tokens": 1000 + i } }]);
        admin.set_chain("acme", step)
    });
    let (ups, sets) = tokio::join!(
        futures_util::future::join_all(uploads),
        futures_util::future::join_all(chains)
    );
    for r in ups.into_iter().chain(sets) {
        ok(r);
    }
    let list = ok(admin.get("/tenants/acme/plugins").await);
    assert_eq!(list["revision"], 8, "every change landed: {list}");
    assert_eq!(list["plugins"][0]["versions"].as_array().unwrap().len(), 4);
    // What runs is what was stored last.
    let chain = ok(admin.get("/tenants/acme/chain").await);
    assert_eq!(chain["revision"], 8, "{chain}");
    let stored = std::fs::read_to_string(dir.path().join("tenants/acme.json")).unwrap();
    let stored: Value = serde_json::from_str(&stored).unwrap();
    assert_eq!(chain["plugins"][0]["config"], stored["chain"][0]["config"]);
}

#[tokio::test]
async fn bad_uploads_and_chains_are_refused_with_a_reason() {
    let engine = sim_engine(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(&config(
        &url(&engine),
        dir.path(),
        "max_plugin_bytes = 1048576",
    ))
    .await;
    let admin = Admin {
        gw: &gw,
        key: ACME_ADMIN,
    };

    let msg = refused(
        admin
            .upload("acme", "p", b"this is not wasm".to_vec())
            .await,
        400,
        "not_a_component",
    );
    assert!(msg.contains("not a WebAssembly component"), "{msg}");
    let msg = refused(
        admin.upload("acme", "p", b"\0asm\x01\0\0\0".to_vec()).await,
        400,
        "not_a_component",
    );
    assert!(msg.contains("core module"), "{msg}");
    let msg = refused(
        admin.upload("acme", "p", vec![0u8; 2 << 20]).await,
        413,
        "plugin_too_large",
    );
    assert!(msg.contains("1048576"), "{msg}");
    let future = patched(
        patched(
            component("hostile"),
            b"sluice:policy/host@0.2.0",
            b"sluice:policy/host@9.2.0",
        ),
        b"sluice:policy/types@0.2.0",
        b"sluice:policy/types@9.2.0",
    );
    let msg = refused(
        admin.upload("acme", "p", future).await,
        422,
        "incompatible_component",
    );
    assert!(msg.contains("sluice:policy/host@9.2.0"), "{msg}");
    let other_world = patched(component("hostile"), b"on-request", b"on-rekuest");
    let msg = refused(
        admin.upload("acme", "p", other_world).await,
        422,
        "incompatible_component",
    );
    assert!(msg.contains("does not fit the sluice:policy"), "{msg}");
    refused(
        admin.upload("acme", "Bad/Name", component("hostile")).await,
        404,
        "not_found",
    );
    refused(
        admin.upload("acme", "-bad", component("hostile")).await,
        400,
        "invalid_plugin_name",
    );

    // Chains: unknown plugin, unknown built-in, a config the plugin refuses,
    // both or neither of plugin/builtin, and a body that is not the shape.
    let msg = refused(
        admin.set_chain("acme", json!([{ "plugin": "nope" }])).await,
        400,
        "invalid_chain",
    );
    assert!(msg.contains("plugins[0]") && msg.contains("nope"), "{msg}");
    let long: Vec<Value> = (0..33)
        .map(|_| json!({ "builtin": "request-shaper" }))
        .collect();
    let msg = refused(
        admin.set_chain("acme", json!(long)).await,
        400,
        "invalid_chain",
    );
    assert!(msg.contains("at most 32"), "{msg}");
    let msg = refused(
        admin
            .set_chain("acme", json!([{ "builtin": "nope" }]))
            .await,
        400,
        "invalid_chain",
    );
    assert!(msg.contains("context-cap"), "lists the built-ins: {msg}");
    let msg = refused(
        admin
            .set_chain(
                "acme",
                json!([{ "builtin": "context-cap", "config": { "max_input_tokens": "lots" } }]),
            )
            .await,
        422,
        "plugin_config_refused",
    );
    assert!(
        msg.contains("plugins[0]") && msg.contains("max_input_tokens"),
        "{msg}"
    );
    refused(
        admin
            .set_chain("acme", json!([{ "builtin": "context-cap", "plugin": "x" }]))
            .await,
        400,
        "invalid_chain",
    );
    refused(
        admin
            .set_chain("acme", json!([{ "builtin": "context-cap", "config": [1] }]))
            .await,
        400,
        "invalid_chain",
    );
    let r = admin
        .send(
            reqwest::Method::PUT,
            "/tenants/acme/chain",
            Some(br#"{"steps": []}"#.to_vec()),
        )
        .await;
    refused(r, 400, "invalid_json");

    // Nothing of that was stored.
    let list = ok(admin.get("/tenants/acme/plugins").await);
    assert_eq!(list["plugins"], json!([]));
    let chain = ok(admin.get("/tenants/acme/chain").await);
    assert_eq!(chain["source"], "config");
    assert_eq!(chat(&gw, ACME_KEY, &long_prompt()).await.0, 200);
}

#[tokio::test]
async fn tenants_cannot_see_or_touch_each_other() {
    let engine = sim_engine(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(&config(&url(&engine), dir.path(), "")).await;
    let acme = Admin {
        gw: &gw,
        key: ACME_ADMIN,
    };
    let other = Admin {
        gw: &gw,
        key: OTHER_ADMIN,
    };
    ok(other.upload("other", "cap", component("context-cap")).await);
    ok(other.set_chain("other", cap_chain("cap")).await);
    let before = ok(other.get("/tenants/other/plugins").await);

    // Every route, on a tenant that exists and on one that does not: the
    // same 404, so acme cannot tell which tenants exist.
    use reqwest::Method as M;
    let routes: Vec<(M, &str, Option<Vec<u8>>)> = vec![
        (M::GET, "plugins", None),
        (M::GET, "plugins/cap", None),
        (M::PUT, "plugins/cap", Some(component("hostile"))),
        (M::DELETE, "plugins/cap", None),
        (M::POST, "plugins/cap/rollback", None),
        (M::GET, "chain", None),
        (M::PUT, "chain", Some(br#"{"plugins": []}"#.to_vec())),
        (M::DELETE, "chain", None),
    ];
    for (method, route, body) in routes {
        let (s1, b1) = acme
            .send(
                method.clone(),
                &format!("/tenants/other/{route}"),
                body.clone(),
            )
            .await;
        let (s2, b2) = acme
            .send(method.clone(), &format!("/tenants/ghost/{route}"), body)
            .await;
        assert_eq!((s1, s2), (404, 404), "{method} {route}: {b1} / {b2}");
        assert_eq!(b1["error"]["code"], "tenant_not_found");
        let strip = |mut b: Value, t: &str| {
            b["error"]["trace_id"] = Value::Null;
            b.to_string().replace(t, "T")
        };
        assert_eq!(strip(b1, "other"), strip(b2, "ghost"), "{method} {route}");
    }
    let tenants = ok(acme.get("/tenants").await);
    assert_eq!(tenants["tenants"], json!(["acme"]));

    // Keys do not cross between the APIs.
    let api_as_admin = Admin {
        gw: &gw,
        key: ACME_KEY,
    };
    refused(
        api_as_admin.get("/tenants/acme/plugins").await,
        401,
        "invalid_admin_key",
    );
    let (status, body) = chat(&gw, ACME_ADMIN, &long_prompt()).await;
    assert_eq!(status, 401, "{body}");
    let nobody = http_client()
        .get(acme.url("/tenants/acme/plugins"))
        .send()
        .await
        .unwrap();
    assert_eq!(nobody.status(), 401);

    // other's plugins and chain are as they were, and still enforced.
    assert_eq!(ok(other.get("/tenants/other/plugins").await), before);
    assert_eq!(chat(&gw, OTHER_KEY, &long_prompt()).await.0, 400);

    // The operator acts on both.
    let op = Admin {
        gw: &gw,
        key: OPERATOR,
    };
    assert_eq!(
        ok(op.get("/tenants").await)["tenants"],
        json!(["acme", "other"])
    );
    assert_eq!(ok(op.get("/tenants/other/plugins").await), before);
    ok(op.upload("acme", "cap", component("context-cap")).await);
    let who = ok(op.get("/whoami").await);
    assert_eq!(who["role"], "operator");
}

#[tokio::test]
async fn a_restart_keeps_the_active_set() {
    let engine = sim_engine(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    let text = config(&url(&engine), dir.path(), "");
    let gw = Gateway::start(&text).await;
    let admin = Admin {
        gw: &gw,
        key: ACME_ADMIN,
    };
    ok(admin.upload("acme", "cap", component("context-cap")).await);
    ok(admin.set_chain("acme", cap_chain("cap")).await);
    let list = ok(admin.get("/tenants/acme/plugins").await);
    gw.shutdown().await;

    let gw = Gateway::start(&text).await;
    let admin = Admin {
        gw: &gw,
        key: ACME_ADMIN,
    };
    assert_eq!(
        chat(&gw, ACME_KEY, &long_prompt()).await.0,
        400,
        "the chain is live after restart"
    );
    assert_eq!(ok(admin.get("/tenants/acme/plugins").await), list);
    let chain = ok(admin.get("/tenants/acme/chain").await);
    assert_eq!(
        chain["plugins"][0]["sha256"],
        list["plugins"][0]["active_sha256"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swaps_under_steady_load_fail_no_request() {
    let engine = sim_engine(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    let gw = Arc::new(Gateway::start(&config(&url(&engine), dir.path(), "")).await);
    let admin = Admin {
        gw: &gw,
        key: ACME_ADMIN,
    };
    let alias = json!({"model_aliases": {"v4": "deepseek-v4-flash"}});
    ok(admin
        .upload("acme", "shape", component("request-shaper"))
        .await);
    ok(admin
        .set_chain("acme", json!([{ "plugin": "shape", "config": alias }]))
        .await);

    // Clients send aliased requests, streaming and not, without pause; every
    // chain the swaps put live keeps the alias, so every answer must be 200.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for c in 0..8 {
        let (gw, stop, done) = (gw.clone(), stop.clone(), done.clone());
        clients.push(tokio::spawn(async move {
            let client = http_client();
            let mut failures = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let mut body = aliased();
                body["stream"] = json!(c % 2 == 0);
                let resp = client
                    .post(gw.http_url("/v1/chat/completions"))
                    .bearer_auth(ACME_KEY)
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                let status = resp.status();
                let text = resp.text().await.unwrap();
                if status != 200 || text.contains("\"error\"") {
                    failures.push(format!("{status}: {text}"));
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            failures
        }));
    }

    // Between swaps, let requests complete on each chain version.
    let progress = |done: Arc<AtomicUsize>| async move {
        let start = done.load(Ordering::Relaxed);
        while done.load(Ordering::Relaxed) < start + 4 {
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
    };
    let v2 = patched(
        component("request-shaper"),
        b"request-shaper",
        b"request-shapeR",
    );
    let mut swaps = 0;
    for round in 0..6 {
        // v2 live (new, then the same bytes again), back to v1, and a chain
        // rewrite with an extra step.
        let up = ok(admin.upload("acme", "shape", v2.clone()).await);
        let live = ok(admin.get("/tenants/acme/chain").await);
        assert_eq!(
            live["plugins"][0]["sha256"], up["version"]["sha256"],
            "v2 is live"
        );
        progress(done.clone()).await;
        let rollback = "/tenants/acme/plugins/shape/rollback";
        let back = ok(admin.send(reqwest::Method::POST, rollback, None).await);
        let live = ok(admin.get("/tenants/acme/chain").await);
        assert_eq!(
            live["plugins"][0]["sha256"], back["active"]["sha256"],
            "v1 is live again"
        );
        assert_ne!(back["active"]["sha256"], up["version"]["sha256"]);
        progress(done.clone()).await;
        let extra = json!([{ "plugin": "shape", "config": alias },
                           { "builtin": "context-cap", "config": { "max_input_tokens": 100000 + round } }]);
        let live = ok(admin.set_chain("acme", extra).await);
        assert_eq!(live["plugins"].as_array().unwrap().len(), 2);
        progress(done.clone()).await;
        ok(admin
            .set_chain("acme", json!([{ "plugin": "shape", "config": alias }]))
            .await);
        progress(done.clone()).await;
        swaps += 4;
    }
    stop.store(true, Ordering::Relaxed);
    let mut failures = Vec::new();
    for c in clients {
        failures.extend(c.await.unwrap());
    }
    let served = done.load(Ordering::Relaxed);
    assert!(
        failures.is_empty(),
        "{} of {served} failed during {swaps} swaps: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(
        served >= 4 * swaps,
        "requests ran on every version ({served} requests)"
    );
}

/// Poll `cond` every 50ms for up to 20s; returns how long it took.
async fn within<F, Fut>(what: &str, mut cond: F) -> std::time::Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = std::time::Instant::now();
    for _ in 0..400 {
        if cond().await {
            return start.elapsed();
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("{what}: not seen within 20s");
}

async fn readyz(gw: &Gateway) -> Value {
    let resp = http_client()
        .get(format!("http://{}/readyz", gw.ops))
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        200,
        "a degraded registry keeps the replica ready"
    );
    resp.json().await.unwrap()
}

fn replica(engine: &str, dir: &Path, redis: &support::redis::RedisServer) -> String {
    config(
        engine,
        dir,
        &format!(
            "redis_url = {:?}\npoll_interval = \"100ms\"\nstore_timeout = \"500ms\"",
            redis.url()
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_the_registry_through_redis() {
    let redis = support::redis::RedisServer::start();
    let engine = sim_engine(&[]).await;
    let (da, db, dc) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let a = Gateway::start(&replica(&url(&engine), da.path(), &redis)).await;
    let b = Gateway::start(&replica(&url(&engine), db.path(), &redis)).await;
    assert_eq!(readyz(&b).await["registry"]["status"], "ok");

    // Change on A: live on A at once, on B after its next poll.
    let on_a = Admin {
        gw: &a,
        key: ACME_ADMIN,
    };
    ok(on_a.upload("acme", "cap", component("context-cap")).await);
    ok(on_a.set_chain("acme", cap_chain("cap")).await);
    assert_eq!(chat(&a, ACME_KEY, &long_prompt()).await.0, 400);
    let took = within("B follows A", || async {
        chat(&b, ACME_KEY, &long_prompt()).await.0 == 400
    })
    .await;
    eprintln!("replica B obeyed A's change after {took:?}");
    let on_b = Admin {
        gw: &b,
        key: ACME_ADMIN,
    };
    assert_eq!(
        ok(on_b.get("/tenants/acme/plugins").await),
        ok(on_a.get("/tenants/acme/plugins").await)
    );

    // Change on B: A follows.
    ok(on_b
        .set_chain(
            "acme",
            json!([{ "plugin": "cap", "config": { "max_input_tokens": 100000 } }]),
        )
        .await);
    within("A follows B", || async {
        chat(&a, ACME_KEY, &long_prompt()).await.0 == 200
    })
    .await;

    // Both write at once: compare-and-swap lets both land, in some order.
    let (r1, r2) = tokio::join!(
        on_a.upload("acme", "one", component("request-shaper")),
        on_b.upload("acme", "two", component("thinking-policy")),
    );
    ok(r1);
    ok(r2);
    let list = ok(on_a.get("/tenants/acme/plugins").await);
    let names: Vec<&str> = list["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["cap", "one", "two"]);

    // A replica that starts now loads the active set before it serves.
    ok(on_a.set_chain("acme", cap_chain("cap")).await);
    let c = Gateway::start(&replica(&url(&engine), dc.path(), &redis)).await;
    assert_eq!(chat(&c, ACME_KEY, &long_prompt()).await.0, 400);
    assert_eq!(chat(&c, OTHER_KEY, &long_prompt()).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_loses_redis_keeps_its_last_good_set() {
    let mut redis = support::redis::RedisServer::start();
    let engine = sim_engine(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    let writer_dir = tempfile::tempdir().unwrap();
    let writer = Gateway::start(&replica(&url(&engine), writer_dir.path(), &redis)).await;
    // The replica under test only follows what the writer changes.
    let text = replica(&url(&engine), dir.path(), &redis);
    let gw = Gateway::start(&text).await;
    let on_writer = Admin {
        gw: &writer,
        key: ACME_ADMIN,
    };
    ok(on_writer
        .upload("acme", "cap", component("context-cap"))
        .await);
    ok(on_writer.set_chain("acme", cap_chain("cap")).await);
    within("the follower has the chain", || async {
        chat(&gw, ACME_KEY, &long_prompt()).await.0 == 400
    })
    .await;
    let admin = Admin {
        gw: &gw,
        key: ACME_ADMIN,
    };

    redis.stop();
    let ready = {
        within("readyz reports the lost store", || async {
            readyz(&gw).await["registry"]["status"] == "degraded"
        })
        .await;
        readyz(&gw).await
    };
    assert_eq!(ready["status"], "ready");
    assert!(
        ready["registry"]["error"]
            .as_str()
            .unwrap()
            .contains("unavailable"),
        "{ready}"
    );
    // Serving goes on with the last good set.
    assert_eq!(chat(&gw, ACME_KEY, &long_prompt()).await.0, 400);
    assert_eq!(chat(&gw, OTHER_KEY, &long_prompt()).await.0, 200);
    // Changes cannot be made while the store is away.
    refused(
        admin
            .upload("acme", "two", component("request-shaper"))
            .await,
        503,
        "registry_unavailable",
    );

    // A restart without Redis serves the local copy.
    gw.shutdown().await;
    let gw = Gateway::start(&text).await;
    assert_eq!(readyz(&gw).await["registry"]["status"], "degraded");
    assert_eq!(chat(&gw, ACME_KEY, &long_prompt()).await.0, 400);

    // Redis back (empty: a new server): healthy again, the set unchanged.
    redis.restart();
    within("readyz sees the store again", || async {
        readyz(&gw).await["registry"]["status"] == "ok"
    })
    .await;
    assert_eq!(chat(&gw, ACME_KEY, &long_prompt()).await.0, 400);
    // A change into the new store goes live although its revision count
    // starts again from 1.
    let admin = Admin {
        gw: &gw,
        key: ACME_ADMIN,
    };
    ok(admin.upload("acme", "cap", component("context-cap")).await);
    ok(admin
        .set_chain(
            "acme",
            json!([{ "plugin": "cap", "config": { "max_input_tokens": 100000 } }]),
        )
        .await);
    assert_eq!(chat(&gw, ACME_KEY, &long_prompt()).await.0, 200);
}
